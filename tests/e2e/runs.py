"""The tiny VQGAN runs of the end-to-end tests: settings, engines, and the training command. The
session fixture that trains each engine's run once is in conftest.py."""
import pytest

from tests.distributed.util import run

# The tiny VQGAN every shared run trains: 4 steps of global batch 4, a checkpoint at steps 2 and 4,
# the discriminator on from step 1, EMA weights (decay 0.5) beside the raw ones.
TINY = ["vqgan.ddconfig.ch=32", "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.resolution=16", "data.size=16",
        "vqgan.ddconfig.attn_resolutions=[8]", "loss.disc_start=1", "loss.discriminator.n_layers=1",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1", "train.image_every=0",
        "logging.wandb_mode=disabled", "logging.progress=false", "data.synthetic_samples=256"]
EMA = "train.ema_decay=0.5"
STEPS, CKPT_EVERY = 4, 2
# engine -> (overrides, processes). DDP saves and loads through single's path (full tensors, one DCP
# save), and ZeRO-1's model/EMA files are ZeRO-2's: one engine per checkpoint layout.
ENGINES = {
    "single": (["engine.kind=single"], 1),
    "fsdp": (["engine.kind=fsdp"], 2),
    "zero2": (["engine.kind=deepspeed", "engine.zero_stage=2"], 2),
    "zero3": (["engine.kind=deepspeed", "engine.zero_stage=3"], 2),
}


def train(out, name, steps, engine, nproc, extra=(), ckpt_every=None):
    """`taming-dist train vqgan-tiny` with TINY and EMA on `nproc` processes, a checkpoint every
    `ckpt_every` steps (default: at the end only)."""
    args = ["-m", "taming_dist", "train", "vqgan-tiny", f"out_dir={out}", f"name={name}", f"train.steps={steps}",
            f"train.ckpt_every={ckpt_every or steps}", *engine, *TINY, EMA, *extra]
    return run(args, nproc=nproc, timeout=600)


def engine_params(engines: dict) -> list:
    """pytest params of `engines` (name -> (overrides, processes)), the one-process entries marked
    one_process: they run in the parallel batch (tests/conftest.py)."""
    return [pytest.param(n, marks=pytest.mark.one_process) if engines[n][1] == 1 else n for n in engines]
