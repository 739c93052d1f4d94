"""Per-engine training throughput and per-rank memory of parameters + gradients + optimizer state.

Run under torchrun (world size 2 on this machine's CPU; 8 GPUs on a node the same way):
  .venv/bin/torchrun --nproc_per_node 2 tools/bench_train.py --stage transformer
  .venv/bin/torchrun --nproc_per_node 2 tools/bench_train.py --stage vqgan
Prints one row per engine: step time, images/s or tokens/s, and the state bytes per rank, with
the ratio to DDP's. Uses the harness' fixed batches (tests/distributed/harness.py); bf16 by default.

--profile adds a second table: the step's time by phase (taming_dist/profiling.py: the device is
synchronised around each phase, so the phases add up to the step), per engine, on rank 0;
"other" is the rest of the step (finite checks, metric reduction, batch slicing).
  .venv/bin/torchrun --nproc_per_node 2 tools/bench_train.py --stage vqgan --profile
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "distributed"))

from harness import GLOBAL_BATCH, global_batch, make_cfg  # noqa: E402

from taming_dist.engines import build_engine, env_from_environ, exit_process, init_distributed  # noqa: E402
from taming_dist.profiling import PhaseTimer  # noqa: E402
from taming_dist.train.loop import build_task, grad_accum_steps  # noqa: E402

ENGINES = [("ddp", 2), ("fsdp", 2), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def bench(stage, kind, zero, env, device, steps, size_args, precision, timer=None):
    micro = GLOBAL_BATCH // env.world_size
    cfg = make_cfg(stage, kind, zero, precision, False, micro, extra=tuple(size_args))
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, env, device)
    task = build_task(cfg, engine, grad_accum_steps(cfg, env.world_size))
    per_rank = GLOBAL_BATCH // env.world_size
    times = []
    for step in range(steps + 1):
        gb = global_batch(stage, step, cfg)
        local = {k: v[env.rank * per_rank:(env.rank + 1) * per_rank] for k, v in gb.items()}
        engine.barrier()
        t = time.perf_counter()
        if step and timer is not None:  # the first step allocates optimizer state
            with timer:
                task.train_step([local], step)
        else:
            task.train_step([local], step)
        engine.barrier()
        if step:
            times.append(time.perf_counter() - t)
    mem = {k: 0 for k in ("params", "grads", "optim")}
    for unit in task.units.values():
        for k, v in engine.state_bytes(unit).items():
            mem[k] += v
    work = GLOBAL_BATCH * (cfg.transformer.gpt.block_size if stage == "transformer" else 1)
    return sum(times) / len(times), work, mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="transformer", choices=["vqgan", "transformer"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--set", nargs="*", default=None, help="config overrides (model size), key=value")
    ap.add_argument("--profile", action="store_true", help="also print the step's time by phase per engine")
    ap.add_argument("--engines", nargs="*", default=None, metavar="KIND[:ZERO]",
                    help="engines to run (default: ddp fsdp deepspeed:1 deepspeed:2 deepspeed:3)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows (bytes, seconds) as JSON")
    args = ap.parse_args()
    size = args.set if args.set is not None else (
        ["transformer.gpt.n_layer=6", "transformer.gpt.n_embd=256"] if args.stage == "transformer"
        else ["vqgan.ddconfig.ch=64"])
    env = env_from_environ()
    device = init_distributed(env)
    rows, phases = [], {}
    engines = ENGINES if args.engines is None else [(e.split(":")[0], int(e.split(":")[1]) if ":" in e else 2)
                                                      for e in args.engines]
    for kind, zero in engines:
        name = f"{kind}" + (f" zero-{zero}" if kind == "deepspeed" else "")
        timer = PhaseTimer() if args.profile else None
        dt, work, mem = bench(args.stage, kind, zero, env, device, args.steps, size, args.precision, timer)
        rows.append((name, dt, work / dt, mem))
        if timer is not None:
            phases[name] = {k: v / args.steps for k, v in timer.seconds.items()}
            phases[name]["other"] = max(dt - sum(phases[name].values()), 0.0)
    if env.rank == 0:
        unit = "tokens/s" if args.stage == "transformer" else "images/s"
        ddp_total = sum(rows[0][3].values())
        print(f"stage={args.stage} precision={args.precision} world_size={env.world_size} "
              f"global_batch={GLOBAL_BATCH} sizes={size} device={device}")
        print(f"{'engine':<14}{'step s':>9}{unit:>12}{'params MiB':>12}{'grads MiB':>11}{'optim MiB':>11}"
              f"{'total MiB':>11}{'vs DDP':>8}")
        for name, dt, rate, mem in rows:
            total = sum(mem.values())
            print(f"{name:<14}{dt:>9.3f}{rate:>12.1f}{mem['params'] / 2**20:>12.2f}{mem['grads'] / 2**20:>11.2f}"
                  f"{mem['optim'] / 2**20:>11.2f}{total / 2**20:>11.2f}{total / ddp_total:>8.2f}")
        if phases:
            print_phases(phases, {name: dt for name, dt, _, _ in rows})
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"stage": args.stage, "precision": args.precision, "world_size": env.world_size,
                           "sizes": size, "rows": [{"engine": name, "step_s": dt, "rate": rate, **mem}
                                                   for name, dt, rate, mem in rows], "phases_s": phases}, f, indent=1)
    exit_process(0)  # not interpreter shutdown, where a gloo thread can abort a finished rank


def print_phases(phases: dict[str, dict[str, float]], step_s: dict[str, float]) -> None:
    """Phase x engine: milliseconds per step and the share of the step."""
    names = list(phases)
    order = []
    for per in phases.values():
        order += [k for k in per if k not in order and k != "other"]
    print("\ntime by phase, ms per step (share of the step)")
    print(f"{'phase':<30}" + "".join(f"{n:>20}" for n in names))
    for key in order + ["other"]:
        cells = "".join(f"{1e3 * phases[n].get(key, 0.0):>12.1f} ({phases[n].get(key, 0.0) / step_s[n]:>4.0%})"
                        for n in names)
        print(f"{key:<30}{cells}")
    print(f"{'step':<30}" + "".join(f"{1e3 * step_s[n]:>12.1f} (100%)" for n in names))


if __name__ == "__main__":
    main()
