"""How tests/data/ckpt_v2/ was made: a checkpoint of format version 2, written by taming_dist at
commit 551d603 (before format 3), kept so that tests/unit/test_checkpoint_v2.py proves version-2
checkpoints still resume. Run once with that commit's code (a git worktree of it):

    PYTHONPATH=WORKTREE torchrun --nproc_per_node=2 tests/data/ckpt_v2/make_v2.py tests/data/ckpt_v2

A tiny GPT (one block, 16 channels) on FSDP2 over 2 ranks trains 2 steps on the engine-equivalence
harness's batches; a synthetic image stream stands in for the data position (3 batches read on
rank 0, 2 on rank 1), with an EMA of the weights. Each rank writes expected_rank<R>.json: what the checkpoint holds (step,
counters, data position, weight and EMA sums) and what follows it (the next RNG draws, the loss of step 3).
"""
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from taming_dist.checkpoint.manager import CheckpointManager
from taming_dist.config import load_config
from taming_dist.data.stream import build_stream
from taming_dist.engines import build_engine, env_from_environ, exit_process, init_distributed
from taming_dist.train.loop import build_task, grad_accum_steps
from tests.distributed.harness import GLOBAL_BATCH, global_batch, make_cfg

GPT = ("transformer.gpt.n_layer=1", "transformer.gpt.n_embd=16", "transformer.gpt.n_head=2", "train.ema_decay=0.5")


def data_cfg():
    return load_config("vqgan-tiny", ["data.size=16", "data.synthetic_samples=64"]).data


def step_batches(step, cfg, env):
    gb = global_batch("transformer", step, cfg)
    micro = GLOBAL_BATCH // env.world_size
    return [{k: v[env.rank * micro:(env.rank + 1) * micro] for k, v in gb.items()}]


def main():
    out = Path(sys.argv[1])
    env = env_from_environ()
    device = init_distributed(env)
    kind = "fsdp" if env.is_distributed else "single"
    cfg = make_cfg("transformer", kind, 2, "fp32", False, GLOBAL_BATCH // env.world_size, extra=GPT)
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, env, device)
    task = build_task(cfg, engine, grad_accum_steps(cfg, env.world_size))
    torch.manual_seed(1000 + env.rank)
    random.seed(2000 + env.rank)
    np.random.seed(3000 + env.rank)
    for step in range(2):
        task.train_step(step_batches(step, cfg, env), step)
    stream = build_stream(data_cfg(), batch_size=2, rank=env.rank, world_size=env.world_size, seed=0)
    batches = iter(stream)
    for _ in range(3 - env.rank):
        next(batches)
    CheckpointManager(out, engine).save(2, task.units, {"skipped_total": 1}, {"data": stream.state_dict()})
    sums = {ema: {f"{name}.{k}": float(v.double().sum()) for name, u in task.units.items()
                  for k, v in engine.full_state_dict(u, ema=ema).items()} for ema in (False, True)}
    expected = {"world_size": env.world_size, "step": 2, "skipped_total": 1,
                "data": {"epoch": stream.epoch, "batches_in_epoch": stream.batches_in_epoch},
                "weight_sums": sums[False], "ema_sums": sums[True], "next_torch": torch.rand(4).tolist(), "next_numpy": np.random.rand(2).tolist(),
                "next_python": [random.random() for _ in range(2)]}
    stats = task.train_step(step_batches(2, cfg, env), 2)
    expected["loss_step3"] = float(stats["loss"])
    (out / f"expected_rank{env.rank}.json").write_text(json.dumps(expected, indent=1))
    exit_process(0)  # not interpreter shutdown, where a gloo thread can abort a finished rank


if __name__ == "__main__":
    main()
