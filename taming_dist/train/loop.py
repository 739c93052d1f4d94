"""The one training loop, for both stages and every engine.

Runs unchanged under plain `python` (one process), torchrun, the deepspeed launcher and srun:
the environment decides rank and world size (engines/dist.py), the config decides the engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import torch

from taming_dist.atomic import write_atomic
from taming_dist.checkpoint.manager import CheckpointManager
from taming_dist.checkpoint.state import TrainState, training_state
from taming_dist.config import RunConfig, batch_layout, dump_config, to_dict
from taming_dist.engines import build_engine, env_from_environ, init_distributed, param_count
from taming_dist.engines.dist import long_collectives, set_collective_timeout
from taming_dist.tasks.base import StepSync
from taming_dist.train import STOP_MARKER_ENV
from taming_dist.logging import RunLogger, print0, set_rank


def build_task(cfg: RunConfig, engine, grad_accum: int):
    if cfg.stage == "vqgan":
        from taming_dist.tasks.vqgan import VQGANTask

        return VQGANTask(cfg, engine, grad_accum)
    from taming_dist.tasks.transformer import TransformerTask

    return TransformerTask(cfg, engine, grad_accum)


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    return batch_layout(cfg.train, world_size)[1]


def resolve_batch(cfg: RunConfig, world_size: int) -> RunConfig:
    """`cfg` with train.micro_batch_size filled in for `world_size` data-parallel ranks (config.batch_layout)."""
    micro, _ = batch_layout(cfg.train, world_size)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))


class _StopFlag:
    """Set by SIGUSR1/SIGUSR2/SIGTERM (SLURM's warning before a time limit or preemption); the
    loop all-reduces it each step so every rank checkpoints at the same step and exits.

    A context manager: the handlers are installed for the run and the previous ones are put back
    when it returns or raises. Left installed, they outlive `train()` in a notebook or a test
    runner: SIGTERM would then only set this flag, `kill PID` no longer ends the process, and every
    process forked from it afterwards inherits the same deafness (it hung the test suite at exit
    once: multiprocessing's Pool.terminate() sends SIGTERM to its workers, then joins them)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self._previous: dict = {}

    def __enter__(self) -> "_StopFlag":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            # None: the previous handler was not installed from Python; the default is what it was.
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._previous.clear()

    def _handler(self, signum, frame):
        self.set = True


def train(cfg: RunConfig, resume: str = "auto") -> dict:
    """Train `cfg`; returns the last logged metrics. `resume`: auto (latest checkpoint if any),
    none, or a checkpoint folder. Signal handlers the run installs are restored when it ends."""
    with contextlib.ExitStack() as scope:
        return _train(cfg, resume, scope)


def _train(cfg: RunConfig, resume: str, scope: contextlib.ExitStack) -> dict:
    env = env_from_environ()
    set_rank(env.rank)
    cfg = resolve_batch(cfg, env.world_size)  # the micro batch for this world size (config.batch_layout)
    # Start-up (rendezvous, model build, checkpoint load, the first step's compilation) runs under
    # the long collective timeout; the steady one applies from the second step on.
    device = init_distributed(env, timeout_s=cfg.engine.startup_timeout_s,
                              connect_timeout_s=cfg.engine.master_connect_timeout_s)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    engine = build_engine(cfg.engine, env, device)
    accum = grad_accum_steps(cfg, env.world_size)
    run_dir = Path(cfg.out_dir) / cfg.name
    if engine.is_main:
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    engine.barrier()

    task = build_task(cfg, engine, accum)
    from taming_dist.data.stream import build_stream

    stream = build_stream(cfg.data, batch_size=cfg.train.micro_batch_size, rank=env.rank,
                          world_size=env.world_size, seed=cfg.train.seed)
    ckpt = CheckpointManager(run_dir / "checkpoints", engine, cfg.train.keep_last,
                             async_save=cfg.train.async_checkpoint)
    # Everything a checkpoint holds, as Stateful parts; the manager saves and restores them all.
    progress = TrainState()
    ckpt_state = training_state(engine, task.units, progress,
                                data=stream if hasattr(stream, "state_dict") else None)
    path = _resume_path(ckpt, resume)
    if path is not None:
        ckpt.load(path, ckpt_state)
    start, bad_in_row, skipped_total = progress.step, 0, progress.skipped_total
    if path is None:
        # Different seeds per rank for what follows init (dropout, pkeep); a resumed run instead
        # continues the RNG streams saved in the checkpoint.
        torch.manual_seed(cfg.train.seed * 1000 + env.rank)
    print0(startup_summary(cfg, env, engine, task, stream, run_dir, path, start, accum))

    logger = RunLogger(run_dir, to_dict(cfg), is_main=engine.is_main, wandb_mode=cfg.logging.wandb_mode,
                       project=cfg.logging.project, total_steps=cfg.train.steps, progress=cfg.logging.progress)
    if path is not None:
        logger.text(f"resumed from {path} at step {start}")  # in log.txt too: `report` marks resumes
    stop = scope.enter_context(_StopFlag())  # from here on, the signals checkpoint and stop
    unit_name, per_sample = task.work_per_sample()
    # MFU: FLOPs of one step counted once (FlopCounterMode for the VQGAN, 6N + attention for the
    # GPT), over the device's peak from a table; left out on CPU and on GPUs not in the table.
    from taming_dist.perf import device_peak_flops, mfu

    peak = device_peak_flops(device, engine.dtype)
    flops_per_step = task.flops_per_sample() * cfg.train.global_batch_size if peak else None
    batches = iter(stream)
    metrics: dict = {}
    t0, done_since_log, data_wait = time.time(), 0, 0.0
    step = start
    while step < cfg.train.steps:
        tw = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        data_wait += time.perf_counter() - tw  # time blocked on the loader (not overlapped with compute)
        # The stop flag and rank 0's clock ride in the step's one fused all-reduce (tasks/base.py:
        # reduce_step): every rank gets the same sums, so all stop or checkpoint at the same step.
        sync = StepSync(send={"stop": float(stop.set), "clock": time.monotonic() if engine.is_main else 0.0})
        stats = task.train_step(micro, step, sync)
        if step == start:  # compiled and warmed up: hangs from here on fail after the steady timeout
            set_collective_timeout(cfg.engine.collective_timeout_s)
            last_ckpt_clock = sync.received.get("clock", 0.0)
        step += 1
        if stats.get("skipped", 0.0):
            bad_in_row += 1
            skipped_total += 1
            logger.text(f"step {step}: non-finite loss or gradient, step skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.train.max_bad_steps:
                raise RuntimeError(
                    f"{bad_in_row} non-finite steps in a row (train.max_bad_steps={cfg.train.max_bad_steps}) at step "
                    f"{step}: lower the learning rate, enable grad clipping (train.optim.grad_clip) or use bf16/fp32"
                )
        else:
            bad_in_row = 0
        done_since_log += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            dt = time.time() - t0
            samples = done_since_log * cfg.train.global_batch_size
            rate = samples * per_sample / dt
            metrics = {**_numbers(stats), f"{unit_name}_per_s": rate,
                       f"{unit_name}_per_s_per_device": rate / env.world_size, "step_s": dt / done_since_log,
                       "data_wait_frac": data_wait / dt, "eta_s": (cfg.train.steps - step) * dt / done_since_log,
                       "skipped_total": skipped_total, **_memory(device)}
            if flops_per_step and peak:
                metrics["mfu"] = mfu(flops_per_step, dt / done_since_log, env.world_size, peak)
            if hasattr(stream, "stats"):
                metrics.update({f"data/{k}": v for k, v in stream.stats().items()})
            logger.log(step, metrics)
            t0, done_since_log, data_wait = time.time(), 0, 0.0
        if cfg.train.image_every and (step % cfg.train.image_every == 0 or step == cfg.train.steps):
            with long_collectives(cfg):  # sampling a grid may take a while on every rank
                for p in task.save_images(micro[0], step, run_dir / "images"):
                    logger.image(step, p.stem.split("_")[0], p)
        stop_now = sync.received.get("stop", float(stop.set)) > 0
        clock = sync.received.get("clock", 0.0)
        by_clock = bool(cfg.train.ckpt_every_min) and clock - last_ckpt_clock >= cfg.train.ckpt_every_min * 60
        if stop_now or by_clock or step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            last_ckpt_clock = clock
            with long_collectives(cfg):
                progress.step, progress.skipped_total = step, skipped_total
                ckpt.save(step, ckpt_state)
        if stop_now:
            logger.text(f"stop signal received: checkpoint written at step {step}, exiting for requeue")
            ckpt.close()  # an asynchronous checkpoint is published before the marker says it exists
            logger.close()
            _write_stop_marker(engine, run_dir, step)
            return {**metrics, "stopped_at": step}
    with long_collectives(cfg):
        ckpt.close()
        task.export(run_dir / "model")
        engine.barrier()
    logger.close()
    return metrics


def _write_stop_marker(engine, run_dir: Path, step: int) -> None:
    """Tell the launcher's after-srun step (taming_dist/launch/requeue.py) that this run stopped on
    the signal with a complete checkpoint, so it requeues without counting a failure. Written by
    rank 0 after the checkpoint's own barrier, then one more barrier: once any rank exits (and
    srun --kill-on-bad-exit may take the rest down) the marker and the checkpoint both exist."""
    marker = os.environ.get(STOP_MARKER_ENV)
    if marker and engine.is_main:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"step": step, "run_dir": str(run_dir)}) + "\n")
    engine.barrier()


def startup_summary(cfg: RunConfig, env, engine, task, stream, run_dir: Path, resumed_from, start: int,
                    accum: int) -> str:
    """The one block rank 0 prints before the first step: where, what, on what, how much."""
    layout = getattr(engine, "layout", f"{env.world_size} rank(s)")
    e = cfg.engine
    kind = engine.describe()
    params = ", ".join(f"{name} {param_count(u.raw) / 1e6:.2f}M" for name, u in task.units.items())
    d = cfg.data
    where = d.path or "built-in synthetic shards"
    samples = (getattr(stream, "manifest", None) or {}).get("total", "?")
    classes = getattr(stream, "num_classes", 0) or "-"
    t = cfg.train
    lines = [
        f"run folder: {run_dir.resolve()}",
        f"resume: {f'{resumed_from} (step {start})' if resumed_from is not None else 'none (fresh start)'}",
        f"engine: {kind}, {e.precision}, world size {env.world_size} (launched by {env.source}), {layout}"
        + (", compiled" if e.compile else "") + (", activation checkpointing" if e.activation_checkpointing else ""),
        f"parameters: {params}",
        f"data: {d.kind} from {where}, {samples} samples, {classes} classes, {d.size}px",
        f"steps: {start} -> {t.steps}; batch: global {t.global_batch_size} = micro {t.micro_batch_size} x "
        f"{env.world_size} rank(s) x {accum} accumulation step(s)",
        f"collective timeout: {e.startup_timeout_s}s at start-up and checkpoints, {e.collective_timeout_s}s per step",
    ]
    return "\n".join(["== taming-dist train " + "=" * 40, *lines, "=" * 61])


def _resume_path(ckpt: CheckpointManager, resume: str):
    if resume == "none":
        return None
    if resume == "auto":
        return ckpt.latest()
    p = Path(resume)
    if not (p / "manifest.json").exists() and not (p / "meta.pt").exists():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no manifest.json)")
    return p  # an old-format folder (meta.pt) is refused with its format version by the manager


def _numbers(stats: dict) -> dict:
    """The step's metrics as Python numbers: its device tensors read in one transfer (on logging
    steps only; the other steps never read them)."""
    keys = [k for k, v in stats.items() if torch.is_tensor(v)]
    values = torch.stack([stats[k].detach().double().reshape(()) for k in keys]).tolist() if keys else []
    return {**{k: v for k, v in stats.items() if not torch.is_tensor(v)}, **dict(zip(keys, values))}


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
