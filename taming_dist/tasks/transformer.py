"""The transformer stage: one unit (the GPT) over the codes of a frozen first stage.

The first stage (and a conditioning VQModel) is moved to the device but never handed to the
engine: it is not sharded, has no optimizer state and gets no gradients. With `data.kind: codes`
the batches carry pre-extracted codes and the first stage only decodes sample images.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from taming_dist.config import RunConfig
from taming_dist.engines.base import Engine, lr_lambda_for
from taming_dist.losses.lm import image_token_loss
from taming_dist.models.transformer import Transformer
from taming_dist.profiling import phase
from taming_dist.tasks.base import StepSync, add_stats, nonfinite, reduce_step, to_device
from taming_dist.tasks.init import load_init_weights, read_weights


# Quantizer buffers that only training uses (restart usage statistics, the k-means flag, the code
# offset, which exports fold into the codebook and leave at zero): a frozen first stage built from
# the transformer's config may lack them, and nothing it computes depends on them.
TRAINING_ONLY_BUFFERS = ("quantize.code_usage", "quantize.kmeans_done", "quantize.code_offset")


def load_first_stage(vqgan, state_dict: dict) -> None:
    """Strict load of a trained VQGAN's weights into the frozen first stage, except for the
    training-only quantizer buffers the first stage does not have (a nonzero offset is refused)."""
    own = vqgan.state_dict()
    extra = [k for k in state_dict if k not in own and k in TRAINING_ONLY_BUFFERS]
    offset = state_dict.get("quantize.code_offset")
    if "quantize.code_offset" in extra and offset is not None and bool(offset.abs().sum() > 0):
        raise ValueError("first_stage_ckpt has an unfolded quantize.code_offset: export the VQGAN run "
                         "(`taming-dist export RUN OUT`) and pass the exported folder")
    vqgan.load_state_dict({k: v for k, v in state_dict.items() if k not in extra}, strict=True)


class TransformerTask:
    def __init__(self, cfg: RunConfig, engine: Engine, grad_accum: int):
        self.cfg, self.engine = cfg, engine
        t, mcfg = cfg.train, cfg.transformer
        model = Transformer(mcfg)
        if cfg.first_stage_ckpt:
            load_first_stage(model.first_stage_model, read_weights(cfg.first_stage_ckpt))
        elif cfg.data.kind != "codes" and not cfg.init_from:
            raise ValueError(
                "stage=transformer needs first_stage_ckpt (a trained VQGAN: model folder, run folder or file) "
                "unless data.kind=codes or init_from holds the whole model"
            )
        if cfg.data.kind == "codes" and os.path.exists(cfg.data.path):
            # a text model without fitting features fails here, not at its first batch (a brace pattern
            # has no manifest: its batches are checked as they come; a missing folder is the stream's error)
            from taming_dist.data.shards import resolve_shards

            _, manifest = resolve_shards(cfg.data.path)
            if manifest is not None:
                model.condition.check_features(manifest.get("text"), cfg.data.path)
        if mcfg.condition.cond_ckpt:  # kind=tokens (the config check refuses it elsewhere)
            model.cond_stage_model.load_state_dict(read_weights(mcfg.condition.cond_ckpt), strict=True)
        if cfg.init_from:
            load_init_weights(cfg.init_from, {"model": model}, engine.is_main)
        self.model = model
        for frozen in (model.first_stage_model, getattr(model, "cond_stage_model", None)):
            if frozen is not None:
                frozen.to(engine.device)
        self.G = engine.setup(model.transformer, name="transformer", optim=t.optim, lr=t.optim.lr,
                              lr_lambda=lr_lambda_for(t.optim, t.steps),
                              micro_batch_size=t.micro_batch_size, grad_accum=grad_accum, ema_decay=t.ema_decay)
        self.units = {"transformer": self.G}

    def work_per_sample(self) -> tuple[str, int]:
        return "tokens", self.cfg.transformer.gpt.block_size

    def flops_per_sample(self) -> float:
        """Training FLOPs per sequence: 6N + attention per token (GPT.flops_per_token)."""
        from taming_dist.perf import transformer_step_flops

        return transformer_step_flops(self.cfg)

    def train_step(self, micro_batches: list[dict], step: int, sync: StepSync | None = None) -> dict:
        eng, n = self.engine, len(micro_batches)
        stats: dict = {}
        # Non-finite losses on this rank, on the device: the step's one fused all-reduce decides
        # (tasks/base.py: reduce_step); nothing is read or reduced per micro-batch.
        bad = torch.zeros((), device=eng.device)
        for mb in eng.accumulate(self.G, micro_batches):
            batch = to_device(mb, eng.device)
            with phase("tokenize"), torch.no_grad(), eng.autocast():  # frozen VQGAN encode, conditions
                inputs = self.model.make_training_inputs(batch)
            with phase("transformer_forward"):
                with eng.autocast():
                    logits = self.G.module(inputs["idx"], **inputs["gpt_kwargs"])
                loss, logs = image_token_loss(logits, inputs["targets"], inputs["c_len"])
            bad = bad + nonfinite(loss)
            with phase("transformer_backward"):
                eng.backward(self.G, loss)
            add_stats(stats, {"loss": loss, **logs}, n)
        norm = eng.prepare_step(self.G)
        flags = {"transformer": bad if norm is None else bad + nonfinite(norm)}
        stats = reduce_step(eng, flags, stats, sync)
        with phase("optimizer_step"):
            stats.update(eng.step(self.G, skip=flags["transformer"] > 0, norm=norm))
        stats["skipped"] = float(stats.pop("skipped"))
        stats["lr"] = eng.lr(self.G)
        return stats

    @torch.no_grad()
    def save_images(self, batch: dict, step: int, folder: Path) -> list[Path]:
        """Samples for the batch's conditions; every rank samples (the GPT may be sharded), with
        a generator seeded by the step so the training RNG stream is untouched."""
        from taming_dist.data.images import save_grid

        batch = to_device(batch, self.engine.device)
        gen = torch.Generator(device=self.engine.device).manual_seed(step)
        gpt = self.G.raw
        was_training = gpt.training
        gpt.eval()
        cond = self.model.condition.from_batch(batch, 8)
        with self.engine.autocast():
            codes = self.model.sample(cond, batch_size=None if cond is not None else 8, generator=gen)
            images = self.model.decode_to_img(codes).float().clamp(-1, 1)
        gpt.train(was_training)
        if not self.engine.is_main:
            return []
        path = folder / f"samples_{step:06d}.png"
        save_grid(images, path, nrow=8)
        return [path]

    def export(self, folder: Path, ema: bool = True) -> None:
        from taming_dist.weights.folder import save_model_folder

        gpt_sd = self.engine.full_state_dict(self.G, ema=ema and bool(self.G.ema))
        if self.engine.is_main:
            sd = {f"transformer.{k}": v for k, v in gpt_sd.items()}
            for k, v in self.model.state_dict().items():
                if not k.startswith("transformer."):
                    sd[k] = v.detach().cpu()
            save_model_folder(folder, "transformer", self.cfg.transformer, sd)
