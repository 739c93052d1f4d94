"""The built-in data as a folder of captioned images, the layout `taming-dist shard` reads:

  .venv/bin/python tools/captioned_folder.py data/shapes --samples 512 --size 32
  .venv/bin/taming-dist shard data/shapes data/shapes_shards        # NAME.txt beside NAME.png

Class sub-folders (circle/, dots/, ...) with `NNNNNNNN.png` and its caption in `NNNNNNNN.txt`
("a red circle on a blue background"), drawn as taming_dist/data/synthetic.py draws them (the
train split, or --split heldout for the held-out seeds). Optionally a tiny text encoder for these
captions (--tiny-encoder DIR): a T5 encoder built from its config with a tokenizer trained on the
captions, saved like a downloaded model (a stand-in for a real T5 folder; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from taming_dist.data.synthetic import CLASS_NAMES, SPLIT_SEEDS, captions, generate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (class sub-folders of PNG + TXT)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--split", choices=tuple(SPLIT_SEEDS), default="train")
    ap.add_argument("--tiny-encoder", default=None, help="also write a tiny T5 text encoder for the captions here")
    ap.add_argument("--encoder-width", type=int, default=32)
    args = ap.parse_args(argv)
    seed = SPLIT_SEEDS[args.split]
    images, labels = generate(args.samples, args.size, args.classes, seed=seed)
    texts = captions(args.samples, args.classes, seed=seed)
    for i, (image, label, text) in enumerate(zip(images, labels, texts)):
        folder = os.path.join(args.out, CLASS_NAMES[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:08d}.png"))
        with open(os.path.join(folder, f"{i:08d}.txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(f"wrote {args.samples} captioned images to {args.out}")
    if args.tiny_encoder:
        from taming_dist.text.tiny import build_tiny_encoder

        # every caption of both splits, so held-out prompts have no unknown words
        vocab = captions(4096, len(CLASS_NAMES), seed=0) + captions(4096, len(CLASS_NAMES), seed=1)
        build_tiny_encoder(args.tiny_encoder, vocab, kind="t5", width=args.encoder_width)
        print(f"wrote a tiny T5 text encoder ({args.encoder_width} wide) to {args.tiny_encoder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
