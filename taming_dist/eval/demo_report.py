"""What `make demo` ends with: the quality of both models on the built-in data's held-out split, as
a table, runs/demo/report.json and one picture, runs/demo/overview.png.

- Reconstruction: PSNR / SSIM / codebook usage and perplexity of the VQGAN on held-out images
  (other seeds than training, the same 12 classes: data/synthetic.py's `heldout` split).
- The class accuracy of the reconstructions of held-out images: the ceiling of the samples' class
  accuracy (a sample cannot look more like its class than the tokenizer can draw it).
- Samples: the class accuracy of the class-conditional samples and their Frechet distance to the
  held-out split, both in the feature space of the small offline classifier (eval/classifier.py),
  with `fd_real`, what as many real training images score, for scale.
- overview.png: held-out originals over their reconstructions, then one labelled row of samples per
  class.
The targets of the demo (issue "Quality you can see") are printed beside the figures.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TARGETS = {"psnr": 24.0, "usage": 0.90, "class_accuracy": 0.90}


def demo_quality(vqgan, transformer, samples: torch.Tensor, labels: torch.Tensor, out: Path,
                 heldout_images: int = 512, sampling: dict | None = None) -> dict:
    """Measure, print the table, write report.json and overview.png under `out`; returns the dict.
    `samples`: (N, 3, S, S) in [-1, 1] generated for `labels` (N,)."""
    from taming_dist.config import DataConfig
    from taming_dist.data.images import to_uint8
    from taming_dist.data.synthetic import CLASS_NAMES, SPLIT_SEEDS, ensure_synthetic, generate
    from taming_dist.eval.classifier import load_classifier, score_images
    from taming_dist.eval.recon import evaluate_reconstruction

    size = vqgan.config.ddconfig.resolution
    folder = ensure_synthetic(DataConfig(kind="synthetic", size=size, split="heldout"))
    with torch.no_grad():
        recon, examples = evaluate_reconstruction(vqgan.float().eval(), folder, size=size,
                                                  max_samples=heldout_images, num_examples=8)
    classifier, entry = load_classifier()
    scores = score_images(classifier, entry, to_uint8(samples), labels.numpy())
    held, held_labels = generate(240, size, len(CLASS_NAMES), seed=SPLIT_SEEDS["heldout"])
    with torch.no_grad():
        x = torch.from_numpy(held).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        recon_scores = score_images(classifier, entry, to_uint8(vqgan(x)[0]), held_labels)
    report = {
        "heldout_reconstruction": {"images": recon["samples"], "psnr": recon["psnr"], "ssim": recon["ssim"],
                                   "usage": recon["codebook"]["usage"], "perplexity": recon["codebook"]["perplexity"],
                                   "codebook_size": recon["codebook"]["codebook_size"],
                                   "class_accuracy": recon_scores["class_accuracy"],
                                   "class_accuracy_images": int(len(held_labels))},
        "samples": {"count": int(len(labels)), "class_accuracy": scores["class_accuracy"],
                    "per_class_accuracy": scores["per_class_accuracy"], "fd": scores["fd"],
                    "fd_real": scores["fd_real"], "sampling": dict(sampling or {})},
        "targets": TARGETS,
    }
    rows = [("reconstruction PSNR (dB)", report["heldout_reconstruction"]["psnr"], TARGETS["psnr"], "{:.2f}"),
            ("reconstruction SSIM", report["heldout_reconstruction"]["ssim"], None, "{:.3f}"),
            ("codebook usage", report["heldout_reconstruction"]["usage"], TARGETS["usage"], "{:.1%}"),
            ("codebook perplexity", report["heldout_reconstruction"]["perplexity"], None, "{:.1f}"),
            ("reconstructions of their own class", recon_scores["class_accuracy"], None, "{:.1%}"),
            ("samples of their own class", scores["class_accuracy"], TARGETS["class_accuracy"], "{:.1%}"),
            ("sample FD (classifier features)", scores["fd"], None, "{:.2f}"),
            ("  FD of real images, for scale", scores["fd_real"], None, "{:.2f}")]
    lines = [f"quality on the held-out split ({recon['samples']} images; {len(labels)} samples)",
             f"{'':<34}{'value':>10}{'target':>10}"]
    for name, value, target, fmt in rows:
        mark = "" if target is None else ("  ok" if value >= target else "  below target")
        lines.append(f"{name:<34}{fmt.format(value):>10}{'' if target is None else fmt.format(target):>10}{mark}")
    print("\n".join(lines), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_overview(out / "overview.png", examples, samples, labels, CLASS_NAMES)
    return report


def write_overview(path: Path, examples: torch.Tensor, samples: torch.Tensor, labels: torch.Tensor,
                   class_names) -> None:
    """Originals over reconstructions (examples: k originals then k reconstructions), then per class
    a row of its samples with the class name on the left."""
    from PIL import Image, ImageDraw

    from taming_dist.data.images import make_grid

    k = examples.shape[0] // 2
    blocks = [("held-out", make_grid(examples[:k], k)), ("reconstructed", make_grid(examples[k:], k))]
    for c in torch.unique(labels).tolist():
        blocks.append((str(class_names[c]), make_grid(samples[labels == c][:k], k)))
    label_w, scale = 110, 2
    width = label_w + max(b.shape[1] for _, b in blocks) * scale
    height = sum(b.shape[0] for _, b in blocks) * scale
    canvas = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for name, block in blocks:
        img = Image.fromarray(block).resize((block.shape[1] * scale, block.shape[0] * scale), Image.NEAREST)
        canvas.paste(img, (label_w, y))
        draw.text((6, y + img.height // 2 - 6), name, fill="black")
        y += img.height
    canvas.save(path)


