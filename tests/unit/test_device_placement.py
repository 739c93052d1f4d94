"""Every tensor the step and the sampler make lands on the model's device.

A tensor made without `device=` (`torch.tensor(x)`) lands on the default device: the CPU, which on
a CPU machine is also the model's, so the CPU tests cannot see the mistake; on a GPU the step then
fails (the first CUDA run found `disc_factor` on the CPU, next to CUDA statistics, in the step's one
all-reduce). Here the model stays on the CPU and the default device is made `meta` for one step:
a tensor made without a device is then on `meta`, and mixing it with the CPU tensors fails exactly
as it would with CUDA ones. The first step runs outside, so the optimizers make their state (torch's
host-side step counters are meant to be on the CPU)."""
import pytest
import torch

from taming_dist.engines import DistEnv, build_engine
from tests.distributed.harness import global_batch, make_cfg

TEXT = ("transformer.condition.kind=text", "transformer.gpt.cross_attention=true", "transformer.gpt.context_dim=48",
        "transformer.condition.context_len=6")


def _stats_device(stage: str, extra: tuple) -> set:
    from taming_dist.train.loop import build_task

    cfg = make_cfg(stage, "single", 2, "fp32", False, 4, extra=extra)
    torch.manual_seed(0)
    task = build_task(cfg, build_engine(cfg.engine, DistEnv(), torch.device("cpu")), 1)
    task.train_step([global_batch(stage, 0, cfg)], 0)
    batch = global_batch(stage, 1, cfg)
    with torch.device("meta"):
        stats = task.train_step([batch], 1)
    return {v.device.type for v in stats.values() if torch.is_tensor(v)}


@pytest.mark.parametrize("stage,extra", [
    ("vqgan", ()),  # LPIPS, PatchGAN and the adaptive weight from step 0
    ("vqgan", ("loss.lecam_weight=0.1", "train.ema_decay=0.5", "loss.adaptive_weight=false")),
    ("transformer", ()),
    ("transformer", TEXT + ("train.ema_decay=0.5",)),
], ids=["vqgan-gan", "vqgan-lecam-ema-fixed-weight", "transformer-class", "transformer-text-ema"])
def test_the_step_makes_no_tensor_off_the_model_device(stage, extra):
    assert _stats_device(stage, extra) == {"cpu"}


def test_the_check_sees_a_tensor_made_without_a_device(monkeypatch):
    # the negative control: the mistake the first CUDA run found, put back, fails here
    from taming_dist.losses import vqgan as loss_mod

    real = loss_mod.VQGANLoss.generator_objective

    def planted(self, x, xrec, qloss, step, **kw):
        out = real(self, x, xrec, qloss, step, **kw)
        out.logs["disc_factor"] = torch.tensor(self.disc_factor(step))
        return out

    monkeypatch.setattr(loss_mod.VQGANLoss, "generator_objective", planted)
    with pytest.raises(RuntimeError, match="device"):
        _stats_device("vqgan", ())


def test_sampling_makes_no_tensor_off_the_model_device():
    from taming_dist.config.schema import GPTConfig
    from taming_dist.models.gpt import GPT
    from taming_dist.models.sampling import generate

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=32, block_size=9, n_layer=1, n_head=2, n_embd=32)).eval()
    prefix = torch.zeros(2, 1, dtype=torch.long)
    for kw in ({}, {"use_cache": False}, {"top_p": 0.9}, {"cfg_scale": 2.0, "null_prefix": torch.ones(2, 1, dtype=torch.long)}):
        with torch.device("meta"):
            out = generate(gpt, prefix, 8, top_k=8, generator=torch.Generator().manual_seed(0), **kw)
        assert out.device.type == "cpu" and out.shape == (2, 8), kw
