"""Training stall per checkpoint, synchronous vs asynchronous saves (train.async_checkpoint), for a
GPT of about 300M parameters in one process and on 2 gloo ranks (FSDP2).

Each world size runs in its own process(es): it trains a GPT unit (AdamW, so the checkpoint is
about 3x the fp32 model) on random codes and, per mode (sync, then async), saves `--repeats`
checkpoints through the real CheckpointManager and `training_state`. Around each save:

  stall    = (the save call + the next --after steps + the final wait for the write)
             - (--after normal steps), the slowest rank's; a normal step is the median of
             --normal steps timed before the saves. Sync: about the save call. Async: the
             staging copy to host memory, plus what the background write takes from the steps
             it overlaps (CPU cores, memory bandwidth).
  write_s  = from the save call until the checkpoint is published (`CheckpointManager.last_write_s`).

Means over the saves after the first (the first asynchronous save allocates the host buffers that
later saves refill; its numbers are reported apart as first_*).

Prints a table and the JSON (also written to --json). Target of issue 22: the async stall at most
20% of the sync one.

    python tools/bench_checkpoint.py                         # ~300M GPT: 1 process, then 2 ranks FSDP2
    python tools/bench_checkpoint.py --n-layer 2 --n-embd 64 --worlds 1 --after 1 --normal 2 --repeats 1
    OMP_NUM_THREADS=1 python tools/bench_checkpoint.py --worlds 1  # training on 1 core, 1 core free

Each process trains on cpu_count / world threads (OMP_NUM_THREADS overrides; the table prints it).
On a CPU machine the background write needs the same cores as training; on a GPU machine training
leaves the host cores to it. OMP_NUM_THREADS=1 in one process on 2 cores gives the writer a core of
its own, as a GPU machine would.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-embd", type=int, default=1024)  # 24 x 1024: 302M parameters with the embeddings
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank and step")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="1 = one process, 2 = 2 gloo ranks FSDP2")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--normal", type=int, default=3, help="steps timed without a save")
    ap.add_argument("--after", type=int, default=2, help="steps trained after each save before waiting for it")
    ap.add_argument("--repeats", type=int, default=3, help="saves per mode")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: result file of one world size
    return ap.parse_args(argv)


def worker(args) -> None:
    """One world size (under torchrun for 2 ranks): both modes, results to args.worker (rank 0)."""
    import torch
    import torch.nn.functional as F

    from taming_dist.checkpoint.manager import CheckpointManager
    from taming_dist.checkpoint.state import TrainState, training_state
    from taming_dist.config import EngineConfig, GPTConfig, OptimConfig
    from taming_dist.engines import build_engine, env_from_environ, exit_process, init_distributed, lr_lambda_for
    from taming_dist.models.gpt import GPT

    env = env_from_environ()
    device = init_distributed(env)
    kind = "fsdp" if env.is_distributed else "single"
    engine = build_engine(EngineConfig(kind=kind), env, device)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                    n_head=max(1, args.n_embd // 64), n_embd=args.n_embd)
    oc = OptimConfig(lr=1e-4, betas=[0.9, 0.95], weight_decay=0.01)
    unit = engine.setup(GPT(cfg), name="transformer", optim=oc, lr=oc.lr, lr_lambda=lr_lambda_for(oc, 10**6))
    n_params = sum(p.numel() for p in unit.raw.parameters())
    progress = TrainState()
    state = training_state(engine, {"transformer": unit}, progress)
    gen = torch.Generator().manual_seed(env.rank)

    def step() -> float:
        t = time.perf_counter()
        idx = torch.randint(cfg.vocab_size, (args.batch, cfg.block_size), generator=gen, device=device)
        logits = unit.module(idx[:, :-1])
        engine.backward(unit, F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()))
        engine.step(unit)
        progress.step += 1
        return time.perf_counter() - t

    def slowest(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if env.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    for _ in range(args.warmup):
        step()
    normal = statistics.median(slowest([step() for _ in range(args.normal)]))
    root = Path(args.dir)
    results = []
    for mode in ("sync", "async"):
        mgr = CheckpointManager(root / mode, engine, keep_last=1, async_save=mode == "async")
        stalls, writes, calls = [], [], []
        for _ in range(args.repeats):
            engine.barrier()
            t0 = time.perf_counter()
            mgr.save(progress.step, state)
            call = time.perf_counter() - t0
            for _ in range(args.after):
                step()
            mgr.wait()
            around = time.perf_counter() - t0
            around, call, write = slowest([around, call, mgr.last_write_s])
            stalls.append(around - args.after * normal)
            calls.append(call)
            writes.append(write)
        mgr.close()
        ckpt = next((root / mode).glob("step_*"))
        steady = slice(1, None) if args.repeats > 1 else slice(None)  # the first async save allocates its buffers
        results.append({"world": env.world_size, "engine": kind, "mode": mode, "params": n_params,
                        "threads": torch.get_num_threads(),
                        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
                        "normal_step_s": normal, "save_call_s": statistics.mean(calls[steady]),
                        "stall_s": statistics.mean(stalls[steady]), "write_s": statistics.mean(writes[steady]),
                        "first_save_call_s": calls[0], "first_stall_s": stalls[0], "stalls_s": stalls})
    if env.rank == 0:
        Path(args.worker).write_text(json.dumps(results))
    exit_process(0)  # not interpreter shutdown, where a gloo thread can abort a finished rank


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list[dict]) -> str:
    head = f"{'setup':<22} {'threads':>7} {'mode':<6} {'ckpt GB':>8} {'step s':>8} {'save call s':>12} " \
           f"{'stall s':>8} {'write s':>8} {'stall/sync':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        setup = "1 process" if r["world"] == 1 else f"{r['world']} gloo ranks FSDP2"
        lines.append(f"{setup:<22} {r['threads']:>7} {r['mode']:<6} {r['checkpoint_bytes'] / 1e9:>8.2f} "
                     f"{r['normal_step_s']:>8.2f} {r['save_call_s']:>12.2f} {r['stall_s']:>8.2f} {r['write_s']:>8.2f} "
                     f"{r['stall_vs_sync']:>10.0%}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.worker:
        worker(args)
        return {}
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    rows = []
    try:
        for world in args.worlds:
            out = root / f"world{world}.json"
            passed = [a for a in (argv if argv is not None else sys.argv[1:])]
            cmd = [sys.argv[0] if argv is None else __file__, *passed, "--dir", str(root / f"w{world}"),
                   "--worker", str(out)]
            cmd[0] = str(Path(cmd[0]).resolve())
            if world > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                       "--master_addr=127.0.0.1", f"--master_port={free_port()}", *cmd]
            else:
                cmd = [sys.executable, *cmd]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // world)))}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            part = json.loads(out.read_text())
            sync = next(r for r in part if r["mode"] == "sync")
            for r in part:
                r["stall_vs_sync"] = r["stall_s"] / sync["stall_s"] if sync["stall_s"] > 0 else float("nan")
            rows += part
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    report = {"rows": rows, "target": "async stall <= 20% of sync",
              "met": all(r["stall_vs_sync"] <= 0.2 for r in rows if r["mode"] == "async")}
    print(table(rows))
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
