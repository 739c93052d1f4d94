"""Shared by the export tests: tiny models with trained-looking weights, written as model folders, and
images to tokenize (the built-in synthetic classes, and real photographs when scikit-image's data
folder is installed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from taming_dist.config import ConditionConfig, EncoderDecoderConfig, GPTConfig, QuantizerConfig, TransformerModelConfig, VQModelConfig
from taming_dist.weights.folder import save_model_folder

DD = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def vq_config(kind: str = "vq", n_embed: int = 128, embed_dim: int = 16, training_buffers: bool = True, **dd) -> VQModelConfig:
    """vqgan-tiny's net (32 px, f4, attention at 8 px); with k-means and dead-code restarts on, so the
    state dict carries code_offset, code_usage and kmeans_done as a trained model's does."""
    q = dict(kind=kind, n_embed=n_embed, embed_dim=embed_dim)
    if training_buffers and kind in ("vq", "ema"):
        q.update(kmeans_init=True, dead_code_threshold=0.1)
    return VQModelConfig(ddconfig=EncoderDecoderConfig(**{**DD, **dd}), quantizer=QuantizerConfig(**q))


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init (zero biases, unit norms, zero pos_emb), as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def trained_vqgan(cfg: VQModelConfig, seed: int = 0):
    """Our VQModel with perturbed weights and, when the config keeps one, a non-zero code_offset."""
    from taming_dist.models.vqgan import VQModel

    torch.manual_seed(seed)
    model = perturb(VQModel(cfg), seed)
    q = model.quantize
    if cfg.quantizer.kind in ("vq", "ema"):
        # codes spread like the encoder's outputs, as training leaves them: the uniform init (+-1/K)
        # puts every code at nearly the same distance from any latent, ties everywhere
        with torch.no_grad():
            x = synthetic_images(4, cfg.ddconfig.resolution)[:, :cfg.ddconfig.in_channels]
            z = model.quant_conv(model.encoder(x))
            q.embedding.weight.copy_(torch.randn(q.embedding.weight.shape, generator=torch.Generator().manual_seed(seed))
                                     * z.std())
    if hasattr(q, "code_offset"):
        q.code_offset.copy_(torch.randn(q.code_offset.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.05)
        q.kmeans_done.fill_(1.0)
        q.code_usage.uniform_(0.5, 1.5)
    return model


def save_vqgan(folder: Path, model) -> Path:
    return save_model_folder(folder, "vqgan", model.config, model.state_dict())


def gpt_config(kind: str = "class", vocab: int = 140, **gpt) -> TransformerModelConfig:
    """A GPT over vq_config's 128 codes (8x8 tokens); class: 12 labels + the null class, vocab 140
    so that labels 128..139 exist as tokens but never as codes."""
    cond = {"none": ConditionConfig(kind="none", sos_token=3),
            "class": ConditionConfig(kind="class", n_classes=12, class_dropout=0.1),
            "tokens": ConditionConfig(kind="tokens", cond_vqgan=vq_config(n_embed=64, training_buffers=True,
                                                                          in_channels=1, resolution=16,
                                                                          ch_mult=[1, 2], attn_resolutions=[])),
            }[kind]
    block = 80 if kind != "tokens" else 8 * 8 + 64
    g = GPTConfig(**{"vocab_size": vocab, "block_size": block, "n_layer": 2, "n_head": 4, "n_embd": 64, **gpt})
    return TransformerModelConfig(gpt=g, condition=cond, first_stage=vq_config())


def trained_transformer(cfg: TransformerModelConfig, seed: int = 0):
    from taming_dist.models.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(cfg)
    first = trained_vqgan(cfg.first_stage, seed)
    model.first_stage_model.load_state_dict(first.state_dict())
    if cfg.condition.kind == "tokens":
        model.cond_stage_model.load_state_dict(trained_vqgan(cfg.condition.cond_vqgan, seed + 7).state_dict())
    perturb(model.transformer, seed + 3, 0.1)
    return model.eval()


def synthetic_images(n: int = 12, size: int = 32) -> torch.Tensor:
    """One image of each built-in class, (n, 3, size, size) in [-1, 1]."""
    from taming_dist.data.synthetic import generate

    images, _ = generate(n, size, min(n, 12), seed=5)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")


def photo_folder() -> Path | None:
    """scikit-image's data folder (photographs shipped in its wheel), found without importing it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if all((folder / p).exists() for p in PHOTOS) else None


def photographs(size: int = 32, crops: int = 4) -> torch.Tensor:
    """`crops` square crops of each photograph resized to `size` px, (n, 3, size, size) in [-1, 1]."""
    from PIL import Image

    folder = photo_folder()
    out = []
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        img = Image.open(folder / name).convert("RGB")
        w, h = img.size
        for _ in range(crops):
            side = int(rng.integers(min(w, h) // 4, min(w, h)))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
            out.append(np.asarray(crop))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def near_tie_codebook(model, images: torch.Tensor, gaps: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite `model`'s codebook so that latents of `images` sit between two codes a, b whose squared
    distances differ by gap * |z|^2 (sign random), every other code far off. -> (the nearer code,
    the gap used) per latent position (B, h, w). With kind vq the rewrite goes through the
    embedding weight (code_offset, if any, zeroed)."""
    g = torch.Generator().manual_seed(seed)
    q = model.quantize
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images))  # (B, D, h, w)
        B, D, H, W = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, D)
        n = zf.shape[0]
        if 2 * n > q.n_e:
            raise ValueError(f"{n} latents need {2 * n} codes, the codebook has {q.n_e}")
        # every other code: far away (100x the latents' scale)
        book = torch.randn(q.n_e, D, generator=g) * 100 * zf.norm(dim=1).max()
        nearer = torch.empty(n, dtype=torch.long)
        used = torch.empty(n)
        for i in range(n):
            gap = gaps[i % len(gaps)]
            zi = zf[i].double()
            d = torch.randn(D, generator=g, dtype=torch.float64)
            d = d / d.norm() * 0.3 * zi.norm()
            # |z - a|^2 = |d|^2, |z - b|^2 = |d|^2 (1 + e)^2: the gap is |d|^2 (2e + e^2) = gap |z|^2
            e = -1 + torch.sqrt(1 + gap * zi.pow(2).sum() / d.pow(2).sum())
            a, b = zi + d, zi - (1 + e) * d
            first_nearer = bool(torch.rand((), generator=g) < 0.5)
            book[2 * i], book[2 * i + 1] = (a, b) if first_nearer else (b, a)
            nearer[i] = 2 * i if first_nearer else 2 * i + 1
            used[i] = gap
        q.embedding.weight.copy_(book)
        if hasattr(q, "code_offset"):
            q.code_offset.zero_()
    return nearer.view(B, H, W), used.view(B, H, W)
