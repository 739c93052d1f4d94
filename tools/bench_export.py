"""Export time and worst deviation of every export format, against the real libraries.

A VQGAN of the given preset (default vqgan-f16-16384: the released ImageNet f16 model's size) with random, perturbed weights (weights do not change the time) is written as a model
folder and exported by `taming_dist.checkpoint.export.export_run` to each format; each export is
then loaded by its library and compared with ours on the same inputs:
  taming_dist   VQModel.from_pretrained: reconstruction, max |diff|
  taming        the original layout re-imported by import-taming: tensors equal?
  diffusers     diffusers.VQModel: code indices (fraction equal), decode of our codes (max |diff|)
  onnx          ONNX Runtime CPU: code indices (fraction equal), decode (max |diff|)
  transformers  GPT2LMHeadModel (a GPT over this codebook, --gpt-layers x --gpt-width, class-
                conditional): logits (max |diff|), greedy generate (tokens equal?)

    python tools/bench_export.py [--preset vqgan-f16-16384] [--images 2] [--json out.json]

Inputs are the built-in synthetic images (and near nothing else: deviations on trained weights and
photographs are measured by the tests). Timings are wall-clock on this machine's CPUs, one run each.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def perturb(model: torch.nn.Module, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def images(n: int, size: int) -> torch.Tensor:
    from taming_dist.data.synthetic import generate

    x, _ = generate(n, size, min(n, 12), seed=5)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vqgan-f16-16384")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--gpt-layers", type=int, default=4)
    ap.add_argument("--gpt-width", type=int, default=256)
    ap.add_argument("--formats", nargs="+", default=["taming_dist", "taming", "diffusers", "onnx", "transformers"])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from taming_dist.checkpoint.export import export_run
    from taming_dist.config import ConditionConfig, GPTConfig, TransformerModelConfig, load_config
    from taming_dist.models.transformer import Transformer
    from taming_dist.models.vqgan import VQModel
    from taming_dist.weights.folder import save_model_folder

    torch.manual_seed(0)
    cfg = load_config(args.preset).vqgan
    model = VQModel(cfg).eval()
    perturb(model)
    params = sum(p.numel() for p in model.parameters())
    x = images(args.images, cfg.ddconfig.resolution)
    with torch.no_grad():
        codes = model.encode_to_indices(x)
        recon = model.decode_code(codes)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        save_model_folder(work / "vqgan", "vqgan", cfg, model.state_dict())
        for fmt in args.formats:
            if fmt == "transformers":
                continue
            out = work / f"out-{fmt}"
            _, secs = timed(lambda: export_run(work / "vqgan", out, fmt=fmt))
            row = {"format": fmt, "model": f"{args.preset} ({params / 1e6:.0f}M)", "export_s": round(secs, 2)}
            with torch.no_grad():
                if fmt == "taming_dist":
                    back = VQModel.from_pretrained(out)
                    row["decode_max_abs"] = float((back.decode_code(codes) - recon).abs().max())
                    row["codes_equal"] = float((back.encode_to_indices(x) == codes).float().mean())
                elif fmt == "taming":
                    from taming_dist.checkpoint.taming_import import import_taming_checkpoint

                    res = import_taming_checkpoint(out / "model.ckpt", config=str(out / "model.yaml"))
                    sd = model.state_dict()
                    row["tensors_equal"] = all(torch.equal(res.model_state_dict[k], sd[k]) for k in sd)
                elif fmt == "diffusers":
                    import diffusers

                    dm = diffusers.VQModel.from_pretrained(str(out)).eval()
                    h = dm.encode(x).latents
                    theirs = dm.quantize(h)[2][2].view(codes.shape)
                    row["codes_equal"] = float((theirs == codes).float().mean())
                    B, H, W = codes.shape
                    lat = dm.quantize.get_codebook_entry(codes.flatten(), (B, H, W, dm.config.vq_embed_dim))
                    row["decode_max_abs"] = float((dm.decode(lat, force_not_quantize=True).sample - recon).abs().max())
                    row["ours_max_abs"] = float(recon.abs().max())
                elif fmt == "onnx":
                    import onnxruntime as ort

                    opts = {"providers": ["CPUExecutionProvider"]}
                    enc = ort.InferenceSession(str(out / "encode.onnx"), **opts)
                    dec = ort.InferenceSession(str(out / "decode.onnx"), **opts)
                    theirs = enc.run(None, {"image": x.numpy()})[0]
                    row["codes_equal"] = float((theirs == codes.numpy()).mean())
                    row["decode_max_abs"] = float(np.abs(dec.run(None, {"codes": codes.numpy()})[0] - recon.numpy()).max())
            rows.append(row)
            print(json.dumps(row), flush=True)
        if "transformers" in args.formats:
            side = cfg.ddconfig.resolution // cfg.downsample_factor
            n = cfg.quantizer.n_embed
            tcfg = TransformerModelConfig(
                gpt=GPTConfig(vocab_size=n + 1001, block_size=side * side, n_layer=args.gpt_layers,
                              n_head=max(1, args.gpt_width // 64), n_embd=args.gpt_width),
                condition=ConditionConfig(kind="class", n_classes=1000, class_dropout=0.1), first_stage=cfg)
            tm = Transformer(tcfg).eval()
            tm.first_stage_model.load_state_dict(model.state_dict())
            perturb(tm.transformer, 0.05)
            save_model_folder(work / "gpt", "transformer", tcfg, tm.state_dict())
            out = work / "out-transformers"
            _, secs = timed(lambda: export_run(work / "gpt", out, fmt="transformers"))
            from transformers import GPT2LMHeadModel

            gpt2 = GPT2LMHeadModel.from_pretrained(str(out)).eval()
            labels = torch.tensor([1, 2])
            idx = torch.cat([labels[:, None], codes.reshape(codes.shape[0], -1)[:2, :-1]], 1)
            with torch.no_grad():
                dev = float((gpt2(idx).logits - tm(idx)).abs().max())
                steps = 16
                ours = tm.sample(labels, num_steps=steps, top_k=1)
                theirs = gpt2.generate(labels[:, None], max_new_tokens=steps, do_sample=False)[:, 1:]
            gpt_params = sum(p.numel() for p in tm.transformer.parameters())
            row = {"format": "transformers", "model": f"GPT {args.gpt_layers}x{args.gpt_width} ({gpt_params / 1e6:.0f}M)",
                   "export_s": round(secs, 2), "logits_max_abs": dev, "greedy_equal": bool(torch.equal(ours, theirs))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'format':<14}{'model':<28}{'export s':>10}  deviation")
    for r in rows:
        dev = {k: v for k, v in r.items() if k not in ("format", "model", "export_s")}
        print(f"{r['format']:<14}{r['model']:<28}{r['export_s']:>10.2f}  {json.dumps(dev)}")
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
