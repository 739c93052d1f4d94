"""Rank-0 output, the wandb sink (with a stand-in when disabled) and the training progress line.

Every print of the training code goes through `print0` so that N ranks do not print N times. The
progress line is the same tqdm bar as the other long commands' (taming_dist/progress.py), updated
at every logged step: redrawn on a terminal, one plain line per logged step otherwise. It starts at
the first logged step (the logger is not told the step a resumed run starts from), so its elapsed
time and rate count from there; the logged `eta_s` and rates are the loop's own.
"""
from __future__ import annotations

import json
import os
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
        self.bar = None  # made at the first logged step, which is the resumed step after a resume
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
            shown = " ".join(f"{k}={v:.4g}" for k, v in clean.items() if k.split("/")[-1] in _SHOWN)
            if self.bar is None:
                from taming_dist.progress import progress

                self.bar = progress(total=self.total, initial=step, desc="train", unit="steps", every=0, postfix=shown)
            else:
                self.bar.set_postfix_str(shown, refresh=False)
                self.bar.update(step - self.bar.n)

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
        if self.bar is not None:
            self.bar.close()
        if self.is_main:
            self.run.finish()
            self.log_file.close()


_SHOWN = {"loss", "g_loss", "d_loss", "nll", "lr", "images_per_s", "tokens_per_s", "perplexity", "grad_norm", "mfu",
          "data_wait_frac", "peak_mem_gib"}
