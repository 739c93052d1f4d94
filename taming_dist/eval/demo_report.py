"""What `make demo` ends with: the quality of both models on the built-in data, as a table against
the targets of issue 25, runs/demo/report.json and one picture, runs/demo/overview.png.

- Reconstruction: PSNR / SSIM / codebook usage and perplexity of the VQGAN on held-out images
  (other seeds than training: data/synthetic.py's `heldout` split), and the share of their
  reconstructions the offline classifier (eval/classifier.py) still assigns to their class: the
  ceiling of the samples' shape accuracy.
- Samples from prompts (eval/prompts.py's `prompt_hits`): the shape by the offline classifier, the
  two colours by the pixels; for prompts whose (shape, colours) combination the train split holds,
  and for the combinations it never draws (synthetic.UNSEEN). A Frechet distance in the
  classifier's features to the held-out split, with `fd_real` for scale.
- overview.png: held-out originals over their reconstructions, then each prompt written above four
  of its samples with its score, then the table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

TARGETS = {"wall_time_s": 480.0, "psnr": 26.0, "usage": 0.90, "shape_accuracy": 0.90, "unseen_prompt_accuracy": 0.80}


def _hits(samples: dict, prompts: list[str]) -> dict:
    """Per prompt and in sum: samples whose shape, colours, and both are the prompt's."""
    from taming_dist.data.images import to_uint8
    from taming_dist.eval.prompts import prompt_hits

    per, sums = {}, {"samples": 0, "shape": 0, "colours": 0, "all": 0}
    for prompt in prompts:
        images = samples[prompt]
        h = prompt_hits(to_uint8(images), [prompt] * len(images))
        per[prompt] = {"samples": len(images), "shape": int(h["shape"]), "colours": int(h["colours"]),
                       "all": int(h["all"])}
        for k in sums:
            sums[k] += per[prompt][k]
    n = max(sums["samples"], 1)
    return {"samples": sums["samples"], "shape_accuracy": sums["shape"] / n, "colour_accuracy": sums["colours"] / n,
            "prompt_accuracy": sums["all"] / n, "per_prompt": per}


def demo_quality(vqgan, samples: dict, seen: list[str], unseen: list[str], out: Path, heldout_images: int = 512,
                 sampling: Optional[dict] = None, timing: Optional[dict] = None) -> dict:
    """Measure, print the table, write report.json and overview.png under `out`; returns the dict.
    `samples`: prompt -> (N, 3, S, S) in [-1, 1] generated for it."""
    from taming_dist.config import DataConfig
    from taming_dist.data.images import to_uint8
    from taming_dist.data.synthetic import CLASS_NAMES, SPLIT_SEEDS, ensure_synthetic, generate, parse_caption
    from taming_dist.eval.classifier import load_classifier, score_images
    from taming_dist.eval.recon import evaluate_reconstruction

    size = vqgan.config.ddconfig.resolution
    folder = ensure_synthetic(DataConfig(kind="synthetic", size=size, split="heldout"))
    with torch.no_grad():
        recon, examples = evaluate_reconstruction(vqgan.float().eval(), folder, size=size,
                                                  max_samples=heldout_images, num_examples=8)
    classifier, entry = load_classifier()
    held, held_labels = generate(240, size, len(CLASS_NAMES), seed=SPLIT_SEEDS["heldout"])
    with torch.no_grad():
        x = torch.from_numpy(held).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        recon_scores = score_images(classifier, entry, to_uint8(vqgan(x)[0]), held_labels)
    prompts = seen + unseen
    every = torch.cat([samples[p] for p in prompts])
    labels = np.array([parse_caption(p)[0] for p in prompts for _ in range(len(samples[p]))])
    fd = score_images(classifier, entry, to_uint8(every), labels)
    seen_hits, unseen_hits = _hits(samples, seen), _hits(samples, unseen)
    n = seen_hits["samples"] + unseen_hits["samples"]
    shape_accuracy = (seen_hits["shape_accuracy"] * seen_hits["samples"]
                      + unseen_hits["shape_accuracy"] * unseen_hits["samples"]) / n
    report = {
        "heldout_reconstruction": {"images": recon["samples"], "psnr": recon["psnr"], "ssim": recon["ssim"],
                                   "usage": recon["codebook"]["usage"], "perplexity": recon["codebook"]["perplexity"],
                                   "codebook_size": recon["codebook"]["codebook_size"],
                                   "class_accuracy": recon_scores["class_accuracy"],
                                   "class_accuracy_images": int(len(held_labels))},
        "samples": {"count": n, "prompts": len(prompts), "shape_accuracy": shape_accuracy,
                    "seen_prompts": seen_hits, "unseen_prompts": unseen_hits, "fd": fd["fd"],
                    "fd_real": fd["fd_real"], "sampling": dict(sampling or {})},
        "timing": dict(timing or {}),
        "targets": TARGETS,
    }
    wall = report["timing"].get("train_and_extract_s")
    rows = [("training + codes, wall time (s)", wall, TARGETS["wall_time_s"], "{:.0f}", "<="),
            ("reconstruction PSNR (dB)", recon["psnr"], TARGETS["psnr"], "{:.2f}", ">="),
            ("reconstruction SSIM", recon["ssim"], None, "{:.3f}", ""),
            ("codebook usage", recon["codebook"]["usage"], TARGETS["usage"], "{:.1%}", ">="),
            ("codebook perplexity", recon["codebook"]["perplexity"], None, "{:.1f}", ""),
            ("reconstructions of their own shape", recon_scores["class_accuracy"], None, "{:.1%}", ""),
            ("samples of the prompt's shape", shape_accuracy, TARGETS["shape_accuracy"], "{:.1%}", ">="),
            ("  seen prompts: shape + colours", seen_hits["prompt_accuracy"], None, "{:.1%}", ""),
            ("unseen prompts: shape + colours", unseen_hits["prompt_accuracy"], TARGETS["unseen_prompt_accuracy"],
             "{:.1%}", ">="),
            ("sample FD (classifier features)", fd["fd"], None, "{:.2f}", ""),
            ("  FD of real images, for scale", fd["fd_real"], None, "{:.2f}", "")]
    title = (f"quality on the held-out split ({recon['samples']} images; {n} samples of {len(prompts)} prompts, "
             f"{len(unseen)} of them unseen combinations)")
    cells = [("", "value", "target", "")]
    for name, value, target, fmt, op in rows:
        if value is None:
            continue
        ok = target is None or (value <= target if op == "<=" else value >= target)
        cells.append((name, fmt.format(value), "" if target is None else f"{op} {fmt.format(target)}",
                      "" if target is None else ("ok" if ok else "below target")))
    print("\n".join([title] + [f"{a:<36}{b:>10}{c:>10}  {d}".rstrip() for a, b, c, d in cells]), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_overview(out / "overview.png", examples, samples, seen, unseen, report, title, cells)
    return report


def _text_width(text: str) -> int:
    """Pixels `text` takes in Pillow's default font."""
    from PIL import Image, ImageDraw

    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text)) + 1


def write_overview(path: Path, examples: torch.Tensor, samples: dict, seen: list[str], unseen: list[str],
                   report: dict, title: str, cells: list, per_prompt: int = 4, columns: int = 3) -> None:
    """Originals over reconstructions (examples: k originals then k reconstructions); then each
    prompt written above `per_prompt` of its samples, with how many of all its samples have its
    shape and both its colours; then the table. Pillow's default bitmap font, nothing downloaded."""
    from PIL import Image, ImageDraw

    from taming_dist.data.images import make_grid

    scale, pad, line = 2, 10, 12

    def picture(images: torch.Tensor, k: int) -> Image.Image:
        grid = make_grid(images, k)
        return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)

    k = examples.shape[0] // 2
    originals, recons = picture(examples[:k], k), picture(examples[k:], k)
    blocks = {p: picture(samples[p][:per_prompt], per_prompt) for p in seen + unseen}
    block_w = max(max(b.width for b in blocks.values()), max(_text_width(p) for p in blocks)) + pad
    block_h = next(iter(blocks.values())).height + 2 * line + pad
    sections = [("prompts whose shape-colour combination is in the training data", seen),
                ("combinations never in the training data (synthetic.UNSEEN)", unseen)]
    rows = sum(-(-len(ps) // columns) for _, ps in sections)
    width = max(pad + columns * block_w, 2 * pad + originals.width, _text_width(title) + 2 * pad)
    height = (pad + 2 * (originals.height + line) + len(sections) * (2 * line) + rows * block_h
              + (len(cells) + 2) * line + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for name, img in (("held-out images", originals), ("their reconstructions", recons)):
        draw.text((pad, y), name, fill="black")
        canvas.paste(img, (pad, y + line))
        y += img.height + line
    per = {**report["samples"]["seen_prompts"]["per_prompt"], **report["samples"]["unseen_prompts"]["per_prompt"]}
    for heading, prompts in sections:
        y += line
        draw.text((pad, y), heading, fill="black")
        y += line
        for i, prompt in enumerate(prompts):
            x, row_y = pad + (i % columns) * block_w, y + (i // columns) * block_h
            hits = per[prompt]
            draw.text((x, row_y), prompt, fill="black")
            draw.text((x, row_y + line), f"shape {hits['shape']}/{hits['samples']}, shape + colours "
                      f"{hits['all']}/{hits['samples']}", fill=(90, 90, 90))
            canvas.paste(blocks[prompt], (x, row_y + 2 * line))
        y += -(-len(prompts) // columns) * block_h
    y += line
    draw.text((pad, y), title, fill="black")
    for name, value, target, mark in cells:  # columns at fixed places: the default font is not monospaced
        y += line
        for x, text in ((pad, name), (pad + 230, value), (pad + 300, target), (pad + 370, mark)):
            draw.text((x, y), text, fill=(170, 0, 0) if text == "below target" else "black")
    canvas.save(path)


def write_examples(path: Path, count: int = 12, columns: int = 4) -> None:
    """The first held-out image of each class, each under its caption: what the demo trains on
    (the README's picture of the data). Pillow's default bitmap font."""
    from PIL import Image, ImageDraw

    from taming_dist.data.synthetic import CLASS_NAMES, SPLIT_SEEDS, captions, generate

    seed, scale, pad, line = SPLIT_SEEDS["heldout"], 3, 10, 12
    images, labels = generate(count * 4, 32, len(CLASS_NAMES), seed=seed)
    texts = captions(count * 4, len(CLASS_NAMES), seed=seed)
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(len(CLASS_NAMES))][:count]
    cell_w = max(max(_text_width(texts[i]) for i in first), 32 * scale) + pad
    cell_h = 32 * scale + line + pad
    rows = -(-len(first) // columns)
    canvas = Image.new("RGB", (pad + columns * cell_w, pad + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, i in enumerate(first):
        x, y = pad + (j % columns) * cell_w, pad + (j // columns) * cell_h
        draw.text((x, y), texts[i], fill="black")
        canvas.paste(Image.fromarray(images[i]).resize((32 * scale, 32 * scale), Image.NEAREST), (x, y + line))
    canvas.save(path)
