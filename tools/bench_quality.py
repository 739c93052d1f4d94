"""Tokenizer settings side by side: the same budget, data and seed, scored on held-out images.

  .venv/bin/python tools/bench_quality.py --steps 300 --batch 16 --json quality.json
  .venv/bin/python tools/bench_quality.py --data data/train --heldout data/val --size 64 --steps 2000
  .venv/bin/python tools/bench_quality.py --settings vq,kmeans+restarts train.optim.lr=5e-4

Each setting trains the --preset (vqgan-tiny) for --steps steps of --batch images (one process,
`taming_dist.train.loop.train`), then measures its reconstructions of the held-out images as
`taming-dist eval-recon` does: PSNR and SSIM of the 8-bit reconstructions, and the share of codes
used (`usage`) and the perplexity of the code distribution over the held-out set. The data is the
built-in set (trained on its train split, scored on its held-out split) or a shard folder plus a
held-out shard folder. Prints one row per setting; --json writes them with the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# The restart settings use a faster usage EMA (0.9) than the preset's 0.99, so a code unused for
# about 20 steps is restarted: at small budgets a 0.99 EMA would restart nothing.
RESTARTS = ["vqgan.quantizer.dead_code_threshold=0.1", "vqgan.quantizer.ema_decay=0.9"]
KMEANS = ["vqgan.quantizer.kmeans_init=true"]
SETTINGS = {
    "vq": [],  # the preset: taming's VectorQuantizer2, uniform init
    "l2": ["vqgan.quantizer.kind=l2"],  # factorised, l2-normalised 8-d codes (ViT-VQGAN / LlamaGen)
    "kmeans": KMEANS,
    "restarts": RESTARTS,
    "kmeans+restarts": KMEANS + RESTARTS,
    "l2+kmeans": ["vqgan.quantizer.kind=l2"] + KMEANS,
    # the same k-means + restarts on a codebook as large as the implicit ones below
    "kmeans+restarts-1024": ["vqgan.quantizer.n_embed=1024"] + KMEANS + RESTARTS,
    # finite scalar quantization, the paper's ~2^10 level set (vqgan-fsq-tiny's quantizer)
    "fsq": ["vqgan.quantizer.kind=fsq", "vqgan.quantizer.levels=[8,5,5,5]", "vqgan.quantizer.n_embed=1000",
            "vqgan.quantizer.embed_dim=4"],
    # lookup-free quantization, 10 bits with the entropy terms (vqgan-lfq-tiny's quantizer)
    "lfq": ["vqgan.quantizer.kind=lfq", "vqgan.quantizer.codebook_dim=10", "vqgan.quantizer.n_embed=1024",
            "vqgan.quantizer.embed_dim=10", "vqgan.quantizer.entropy_group_bits=5",
            "vqgan.quantizer.entropy_weight=0.1", "vqgan.quantizer.entropy_temperature=0.01"],
}
DEFAULT = ["vq", "l2", "kmeans", "restarts", "kmeans+restarts"]
COLUMNS = ("psnr", "ssim", "usage", "perplexity", "train_window_usage", "train_s")


def train_and_score(name: str, overrides: list[str], args, heldout: str, out_dir: str) -> dict:
    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.config import load_config
    from taming_dist.eval.recon import evaluate_reconstruction
    from taming_dist.train.loop import train

    data = ["data.kind=synthetic"] if args.data == "synthetic" else ["data.kind=shards", f"data.path={args.data}"]
    cfg = load_config(args.preset, [
        f"name={name.replace('+', '_')}", f"out_dir={out_dir}", f"train.steps={args.steps}",
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", f"train.seed={args.seed}",
        f"train.log_every={args.steps}", "train.image_every=0", f"train.ckpt_every={args.steps}",
        "logging.wandb_mode=disabled", "logging.progress=false", f"data.size={args.size}",
        f"vqgan.ddconfig.resolution={args.size}", *data, *overrides, *args.overrides,
    ])
    t0 = time.time()
    last = train(cfg, resume="none")
    train_s = time.time() - t0
    model = build_model_from_folder(os.path.join(out_dir, cfg.name, "model")).float().eval()
    metrics, _ = evaluate_reconstruction(model, heldout, size=args.size, batch_size=64,
                                         max_samples=args.eval_samples, num_examples=0)
    cb = metrics["codebook"]
    return {"setting": name, "overrides": overrides, "psnr": metrics["psnr"], "ssim": metrics["ssim"],
            "usage": cb["usage"], "perplexity": cb["perplexity"], "codes_used": cb["codes_used"],
            "codebook_size": cb["codebook_size"], "train_window_usage": last.get("window_usage"),
            "train_nll": last.get("nll"), "train_s": train_s, "eval_samples": metrics["samples"]}


def format_table(rows: list[dict]) -> str:
    w = max(16, *(len(r["setting"]) + 2 for r in rows))
    head = f"{'setting':<{w}}" + "".join(f"{c:>20}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r[c]:>20.4f}" if isinstance(r[c], float) else f"{str(r[c]):>20}" for c in COLUMNS)
        lines.append(f"{r['setting']:<{w}}" + cells)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides applied to every setting (key=value)")
    p.add_argument("--preset", default="vqgan-tiny")
    p.add_argument("--steps", type=int, default=300, help="training steps per setting")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="synthetic", help="`synthetic` (the built-in train split) or a shard folder")
    p.add_argument("--heldout", default=None,
                   help="held-out shard folder (default with --data synthetic: the built-in held-out split)")
    p.add_argument("--eval-samples", type=int, default=512, help="held-out images scored per setting")
    p.add_argument("--settings", default=",".join(DEFAULT), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--out-dir", default=None, help="run folders (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the rows and the budget here")
    args = p.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    if args.heldout is None:
        if args.data != "synthetic":
            p.error("--heldout FOLDER is needed with a shard folder as --data")
        from taming_dist.config import DataConfig
        from taming_dist.data.synthetic import ensure_synthetic

        args.heldout = ensure_synthetic(DataConfig(kind="synthetic", size=args.size, split="heldout"))
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        out_dir = args.out_dir or tmp
        rows = []
        for name in names:
            rows.append(train_and_score(name, SETTINGS[name], args, args.heldout, out_dir))
            print(f"{name}: psnr {rows[-1]['psnr']:.3f}, usage {rows[-1]['usage']:.3f} ({rows[-1]['train_s']:.0f} s)",
                  file=sys.stderr)
    print(f"{args.preset}, {args.steps} steps x {args.batch} images, held-out: {args.heldout} "
          f"({rows[0]['eval_samples']} images)")
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "steps": args.steps, "batch": args.batch, "size": args.size,
                       "data": args.data, "heldout": args.heldout, "overrides": args.overrides, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
