"""Counts the collectives and host reads of one training step (not a logging step), per engine.

Usage (under torchrun, 2 ranks): python step_counts.py OUT.json SPEC [SPEC ...]
SPEC = stage:engine[:zero_stage][:break]  (e.g. vqgan:fsdp, transformer:deepspeed:3, vqgan:ddp:break)

Every collective of torch.distributed (also through distributed_c10d and DeepSpeed's comm, which
call these functions) and every host read of a tensor (item, float, int, bool, tolist) during the
step is recorded with where it came from (the innermost frames of taming_dist, torch and
DeepSpeed on the stack) and classified:
  fused       the step's one fused all-reduce (tasks/base.py: reduce_step)
  gan_weight  the adaptive GAN weight's mean over ranks (losses/vqgan.py, per micro-batch; allowed)
  grad_norm   an engine's global gradient norm over shards (engines/*: grad_norm)
  engine      inside the engine's own code (FSDP2's all-gathers and reduce-scatters, DDP, DeepSpeed)
  other       anything else: the test allows none
Host reads are counted by the code that asks for them: taming_dist's ("ours"; reduce_step's one read
is counted apart as "fused"), DeepSpeed's own ("deepspeed") or torch's own ("torch", e.g. the CPU
AdamW's step counter), the last two outside our control. `break` adds an all-reduce and a host read per micro-batch (a negative control).
"""
from __future__ import annotations

import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script under torchrun

from taming_dist.engines import build_engine, env_from_environ, exit_process, init_distributed
from taming_dist.tasks.base import StepSync
from taming_dist.train.loop import build_task, grad_accum_steps
from tests.distributed.harness import GLOBAL_BATCH, global_batch, make_cfg

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "barrier", "all_to_all_single", "reduce", "gather", "scatter", "all_gather_object",
               "broadcast_object_list", "all_reduce_coalesced")
READS = ("item", "__float__", "__int__", "__bool__", "tolist")


class Recorder:
    def __init__(self):
        self.on = False
        self.collectives: Counter = Counter()
        self.reads: Counter = Counter()
        self.where: dict[str, list[str]] = {}

    @staticmethod
    def _frames():
        return [(f.filename, f.name) for f in traceback.extract_stack()[:-3]]

    def _note(self, kind: str, what: str, frames) -> None:
        key = f"{kind}:{what}"
        if len(self.where.setdefault(key, [])) < 2:
            self.where[key].append(" <- ".join(f"{Path(f).name}:{n}" for f, n in reversed(frames[-6:])))

    def collective(self, name: str) -> None:
        if not self.on:
            return
        frames = self._frames()
        files = [(f.replace("\\", "/"), n) for f, n in frames]
        # The innermost frame that is ours or an engine library's decides whose collective it is.
        owner = "ours"
        for f, _ in reversed(files):
            if "/torch/distributed/fsdp/" in f or "/deepspeed/" in f or "/torch/nn/parallel/" in f:
                owner = "engine"
                break
            if "/taming_dist/" in f or "/tests/" in f:
                break
        if owner == "engine":
            kind = "engine"
        elif any(f.endswith("taming_dist/tasks/base.py") and n == "reduce_step" for f, n in files):
            kind = "fused"
        elif any(f.endswith("taming_dist/losses/vqgan.py") for f, _ in files):
            kind = "gan_weight"
        elif any("/taming_dist/engines/" in f and n == "grad_norm" for f, n in files):
            kind = "grad_norm"
        else:
            kind = "other"
        self.collectives[kind] += 1
        self._note(kind, name, frames)

    def read(self, name: str) -> None:
        if not self.on:
            return
        frames = self._frames()
        f, n = frames[-1][0].replace("\\", "/"), frames[-1][1]  # the code that asked for the read
        if f.endswith("taming_dist/tasks/base.py") and n == "reduce_step":
            kind = "fused"
        elif "/taming_dist/" in f or "/tests/" in f:
            kind = "ours"
        elif "/deepspeed/" in f:
            kind = "deepspeed"
        else:  # torch itself, e.g. its CPU AdamW reading its step counter (the fused CUDA kernel does not)
            kind = "torch"
        self.reads[kind] += 1
        self._note(f"read-{kind}", name, frames)


REC = Recorder()


def _patch() -> None:
    for mod in (dist, c10d):
        for name in COLLECTIVES:
            real = getattr(mod, name, None)
            if real is None or getattr(real, "_counted", False):
                continue

            def wrapped(*a, __real=real, __name=name, **k):
                REC.collective(__name)
                return __real(*a, **k)

            wrapped._counted = True
            setattr(mod, name, wrapped)
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, __real=real, __name=name, **k):
            REC.read(__name)
            return __real(self, *a, **k)

        setattr(torch.Tensor, name, wrapped)


def _break(engine) -> None:
    real = engine.backward

    def backward(unit, loss):
        engine.all_reduce(torch.zeros((), device=engine.device))  # a collective per micro-batch
        float(loss)  # and a host read
        return real(unit, loss)

    engine.backward = backward


def count(spec: str, env, device) -> dict:
    parts = spec.split(":")
    stage, kind = parts[0], parts[1]
    zero = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 2
    accum = 2
    cfg = make_cfg(stage, kind, zero, "fp32", False, GLOBAL_BATCH // env.world_size // accum)
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, env, device)
    assert grad_accum_steps(cfg, env.world_size) == accum
    task = build_task(cfg, engine, accum)
    if parts[-1] == "break":
        _break(engine)
    result = {}
    for step in range(2):  # step 0 warms up (k-means, lazy init); step 1 is counted
        gb = global_batch(stage, step, cfg)
        chunk = GLOBAL_BATCH // accum
        micro = chunk // env.world_size
        batches = [{k: v[i * chunk + env.rank * micro:i * chunk + (env.rank + 1) * micro] for k, v in gb.items()}
                   for i in range(accum)]
        REC.__init__()
        REC.on = step == 1
        # as the loop sends them: rank 1 got the stop signal, rank 0's clock reads 100
        sync = StepSync(send={"stop": float(env.rank == 1), "clock": 100.0 if env.rank == 0 else 0.0})
        stats = task.train_step(batches, step, sync)
        REC.on = False
        result = {"collectives": dict(REC.collectives), "reads": dict(REC.reads), "where": REC.where,
                  "micro_batches": accum, "skipped": stats["skipped"], "received": sync.received}
    return result


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    env = env_from_environ()
    device = init_distributed(env)
    _patch()
    results = {spec: count(spec, env, device) for spec in specs}
    if env.rank == 0:
        out.write_text(json.dumps(results, indent=1))
    exit_process(0)  # not interpreter shutdown, where a gloo thread can abort a finished rank


if __name__ == "__main__":
    main()
