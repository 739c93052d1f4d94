"""Samples of a text-conditioned model scored against their prompts (issue 23, part 6):

- prompt accuracy on the built-in data: the shape by the offline classifier (eval/classifier.py),
  the two colours by the pixels, in their roles where the class shows them
  (`data.synthetic.colours_match`), for prompts of its caption form ("a red circle on a blue
  background");
- the CLIP score (Hessel et al. 2021, as torchmetrics: 100 x max(cosine, 0) of the image and text
  embeddings) with a local CLIP folder (`CLIPModel` with its tokenizer; nothing downloaded).

`evaluate_prompts` draws `per_prompt` samples of every prompt; rank r takes the prompts r, r + W,
...; the sums are added over ranks by the `all_reduce` passed in.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from taming_dist.data.synthetic import colours_match, parse_caption
from taming_dist.data.images import to_uint8

# CLIP's image normalisation (openai/CLIP, clip.py _transform)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def prompt_hits(images: np.ndarray, prompts: Sequence[str], device="cpu") -> dict:
    """Per-image hits (shape, colours, both) of uint8 images (N, H, W, 3) against their prompts;
    prompts not of the built-in caption form are counted as `unparsed` and left out."""
    from taming_dist.eval.classifier import _outputs, load_classifier

    parsed = [parse_caption(p) for p in prompts]
    keep = [i for i, p in enumerate(parsed) if p is not None]
    out = {"scored": len(keep), "unparsed": len(prompts) - len(keep), "shape": 0, "colours": 0, "all": 0}
    if not keep:
        return out
    with torch.enable_grad():  # trained on first use (then cached), even when called under no_grad
        model, _ = load_classifier(device=device)
    pred = _outputs(model, images[keep], device)[1].argmax(1).cpu().numpy()
    for j, i in enumerate(keep):
        label, fg, bg = parsed[i]
        shape = int(pred[j]) == label
        colours = colours_match(images[i], label, fg, bg)
        out["shape"] += shape
        out["colours"] += colours
        out["all"] += shape and colours
    return out


def _embeds(out) -> torch.Tensor:
    """Unit-norm projected embeddings; transformers 5 returns them as `pooler_output` of an output object."""
    return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


class ClipScorer:
    """CLIP score of images against texts from a local CLIPModel folder."""

    def __init__(self, folder: str, device="cpu"):
        import transformers

        from taming_dist.text.encoder import check_folder

        check_folder(folder)
        self.model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.size = self.model.config.vision_config.image_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """uint8 images (N, H, W, 3), N texts -> N scores in [0, 100]."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - torch.tensor(CLIP_MEAN, device=self.device)[:, None, None]) / \
            torch.tensor(CLIP_STD, device=self.device)[:, None, None]
        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        img = _embeds(self.model.get_image_features(pixel_values=x))
        txt = _embeds(self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()}))
        return (100 * (img * txt).sum(-1).clamp(min=0)).cpu().numpy()


@torch.no_grad()
def evaluate_prompts(model, prompts: Sequence[str], text_encoder, *, per_prompt: int = 4, seed: int = 0,
                     rank: int = 0, world_size: int = 1, all_reduce: Callable[[torch.Tensor], None] = lambda t: None,
                     clip: Optional[str] = None, device="cpu", **sample_kwargs) -> dict:
    """Sample `per_prompt` images of each prompt (this rank's share) and score them: prompt
    accuracy on built-in captions, and the CLIP score with `clip` (a CLIPModel folder)."""
    from taming_dist.models.pipeline import generate_image, get_condition

    if not prompts:
        raise ValueError("no prompts to evaluate")
    scorer = ClipScorer(clip, device) if clip else None
    sums = torch.zeros(7, dtype=torch.float64)  # samples, scored, unparsed, shape, colours, all, clip
    for i in range(rank, len(prompts), world_size):
        texts = [prompts[i]] * per_prompt
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        images = to_uint8(generate_image(model.first_stage_model, model,
                                         get_condition(model, texts, text_encoder=text_encoder), generator=gen,
                                         **sample_kwargs))
        hits = prompt_hits(images, texts, device)
        sums += torch.tensor([len(texts), hits["scored"], hits["unparsed"], hits["shape"], hits["colours"],
                              hits["all"], float(scorer(images, texts).sum()) if scorer else 0.0], dtype=torch.float64)
    all_reduce(sums)
    n, scored = sums[0].item(), sums[1].item()
    out = {"prompts": len(prompts), "samples": int(n), "unparsed_prompts_samples": int(sums[2].item())}
    if scored:
        out.update(shape_accuracy=sums[3].item() / scored, colour_accuracy=sums[4].item() / scored,
                   prompt_accuracy=sums[5].item() / scored)
    if scorer:
        out["clip_score"] = sums[6].item() / n
    return out
