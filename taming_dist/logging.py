"""Rank-0 output, the wandb sink (with a stand-in when disabled) and a progress line.

Every print of the training code goes through `print0` so that N ranks do not print N times.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_RANK = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def set_rank(rank: int) -> None:
    global _RANK
    _RANK = rank


def print0(*args, **kwargs) -> None:
    if _RANK == 0:
        print(*args, **kwargs, flush=True)


class _NullRun:
    """Stand-in for a wandb run when logging is disabled or on ranks > 0."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


class RunLogger:
    """Metrics to wandb (offline by default), to `log.txt` as JSON lines, and a progress line."""

    def __init__(self, run_dir: Path, config: dict, *, is_main: bool, wandb_mode: str, project: str,
                 total_steps: int, progress: bool = True):
        self.is_main = is_main
        self.total = total_steps
        self.progress = progress and is_main
        self.start = time.time()
        self.run = _NullRun()
        self.log_file = None
        if not is_main:
            return
        self.log_file = open(run_dir / "log.txt", "a")
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), mode=wandb_mode,
                                  config=config, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self.run.log(clean, step=step)
        self.log_file.write(json.dumps({"step": step, **clean}) + "\n")
        self.log_file.flush()
        if self.progress:
            frac = step / max(1, self.total)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            shown = " ".join(f"{k}={v:.4g}" for k, v in clean.items() if k.split("/")[-1] in _SHOWN)
            eta = f" eta {_duration(clean['eta_s'])}" if "eta_s" in clean else ""
            print(f"[{bar}] step {step}/{self.total}{eta} {shown}", file=sys.stderr, flush=True)

    def image(self, step: int, key: str, path: Path) -> None:
        if not self.is_main or isinstance(self.run, _NullRun):
            return
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def text(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)
            self.log_file.write(json.dumps({"message": msg}) + "\n")
            self.log_file.flush()

    def close(self) -> None:
        if self.is_main:
            self.run.finish()
            self.log_file.close()


_SHOWN = {"loss", "g_loss", "d_loss", "nll", "lr", "images_per_s", "tokens_per_s", "perplexity", "grad_norm", "mfu",
          "data_wait_frac", "peak_mem_gib"}


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
