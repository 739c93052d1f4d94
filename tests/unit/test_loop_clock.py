"""train.ckpt_every_min: a checkpoint every M minutes of rank 0's wall clock, besides ckpt_every
steps (train/loop.py; the clock travels in the step's fused all-reduce, tests/distributed/
test_step_sync.py checks that every rank receives rank 0's value)."""
from taming_dist.config import load_config
from taming_dist.train.loop import train

TINY = ["train.steps=4", "train.global_batch_size=2", "train.image_every=0", "train.ckpt_every=100",
        "train.keep_last=10", "loss.lpips_backbone=random", "logging.wandb_mode=disabled", "logging.progress=false",
        "data.size=16", "data.synthetic_samples=64", "vqgan.ddconfig.resolution=16", "vqgan.ddconfig.ch=32",
        "vqgan.ddconfig.ch_mult=[1,2]", "vqgan.ddconfig.attn_resolutions=[8]"]


def _saved(tmp_path, *extra) -> list[str]:
    cfg = load_config("vqgan-tiny", [f"out_dir={tmp_path}", *TINY, *extra])
    train(cfg, resume="none")
    return sorted(p.name for p in (tmp_path / cfg.name / "checkpoints").glob("step_*"))


def test_checkpoints_by_the_clock_besides_the_step_count(tmp_path, monkeypatch):
    # a clock that advances 1 minute per step (each step reads it once, on rank 0)
    ticks = iter(range(0, 10_000, 60))
    monkeypatch.setattr("taming_dist.train.loop.time.monotonic", lambda: float(next(ticks)))
    assert _saved(tmp_path / "a", "train.ckpt_every_min=2") == ["step_000003", "step_000004"]  # 2 minutes after step 1; the last
    # Control: without it, only the last step (ckpt_every=100) is saved.
    assert _saved(tmp_path / "b") == ["step_000004"]
