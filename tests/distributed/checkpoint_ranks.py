"""Per-rank checkpoint state through DCP, for tests/distributed/test_checkpoint_format.py.

    python -m tests.distributed.checkpoint_ranks save OUT            write OUT/step_000002 (format 3) and OUT/expected_rank<R>.json
    python -m tests.distributed.checkpoint_ranks resume CKPTS OUT    resume CKPTS/latest, write OUT/got_rank<R>.json

One process or under torchrun. The run is the one tests/data/ckpt_v2/make_v2.py recorded in format
2 (a tiny GPT with an EMA, FSDP2 on 2 ranks or one process, 2 steps; a synthetic image stream read
3 batches on rank 0 and 2 on rank 1; counters skipped_total=1), so both formats are checked by the
same comparison.
"""
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from taming_dist.checkpoint.manager import CheckpointManager
from taming_dist.checkpoint.state import TrainState, training_state
from taming_dist.config import load_config
from taming_dist.data.stream import build_stream
from taming_dist.engines import build_engine, env_from_environ, exit_process, init_distributed
from taming_dist.train.loop import build_task, grad_accum_steps
from tests.distributed.harness import GLOBAL_BATCH, global_batch, make_cfg

GPT = ("transformer.gpt.n_layer=1", "transformer.gpt.n_embd=16", "transformer.gpt.n_head=2", "train.ema_decay=0.5")


def step_batches(step, cfg, env):
    gb = global_batch("transformer", step, cfg)
    micro = GLOBAL_BATCH // env.world_size
    return [{k: v[env.rank * micro:(env.rank + 1) * micro] for k, v in gb.items()}]


def sums(engine, task, ema):
    return {f"{name}.{k}": float(v.double().sum()) for name, u in task.units.items()
            for k, v in engine.full_state_dict(u, ema=ema).items()}


def rng_draws():
    return {"next_torch": torch.rand(4).tolist(), "next_numpy": np.random.rand(2).tolist(),
            "next_python": [random.random() for _ in range(2)]}


def main():
    mode, args = sys.argv[1], [Path(a) for a in sys.argv[2:]]
    env = env_from_environ()
    device = init_distributed(env)
    kind = "fsdp" if env.is_distributed else "single"
    cfg = make_cfg("transformer", kind, 2, "fp32", False, GLOBAL_BATCH // env.world_size, extra=GPT)
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, env, device)
    task = build_task(cfg, engine, grad_accum_steps(cfg, env.world_size))
    data_cfg = load_config("vqgan-tiny", ["data.size=16", "data.synthetic_samples=64"]).data
    stream = build_stream(data_cfg, batch_size=2, rank=env.rank, world_size=env.world_size, seed=0)
    progress = TrainState()
    state = training_state(engine, task.units, progress, data=stream)
    torch.manual_seed(1000 + env.rank)
    random.seed(2000 + env.rank)
    np.random.seed(3000 + env.rank)
    if mode == "save":
        out = args[0]
        for step in range(2):
            task.train_step(step_batches(step, cfg, env), step)
        batches = iter(stream)
        for _ in range(3 - env.rank):
            next(batches)
        progress.step, progress.skipped_total = 2, 1
        CheckpointManager(out, engine).save(2, state)
    else:
        ckpts, out = args
        mgr = CheckpointManager(ckpts, engine)
        torch.manual_seed(7)  # the RNG a resharded resume must leave as it is
        random.seed(7)
        np.random.seed(7)
        manifest = mgr.load(mgr.latest(), state)
    record = {"world_size": env.world_size, "step": progress.step, "skipped_total": progress.skipped_total,
              "data": {"epoch": stream.epoch, "batches_in_epoch": stream.batches_in_epoch},
              "weight_sums": sums(engine, task, False), "ema_sums": sums(engine, task, True), **rng_draws()}
    if mode == "resume":
        record["format"] = manifest["version"]
    record["loss_step3"] = float(task.train_step(step_batches(2, cfg, env), 2)["loss"])
    name = "expected" if mode == "save" else "got"
    (out / f"{name}_rank{env.rank}.json").write_text(json.dumps(record, indent=1))
    exit_process(0)  # not interpreter shutdown, where a gloo thread can abort a finished rank


if __name__ == "__main__":
    main()
