HELP = "encode and decode images with a VQGAN (model folder or run folder) and write a PNG grid"
EXAMPLE = "taming-dist reconstruct runs/demo/vqgan/model --images a.png b.jpg --out recon.png"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="VQGAN model folder (config.json + model.safetensors) or run folder")
    parser.add_argument("--images", nargs="*", default=[], help="image files; default: built-in dataset samples")
    parser.add_argument("--count", type=int, default=8, help="samples from the built-in dataset when no --images")
    parser.add_argument("--out", default="recon.png", help="PNG grid: originals on top, reconstructions below")


def run(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.data.images import save_grid
    from taming_dist.weights.folder import resolve_model_folder

    model = build_model_from_folder(resolve_model_folder(args.model)).eval()
    size = model.config.ddconfig.resolution
    if args.images:
        arrs = []
        for p in args.images:
            img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
            arrs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        x = torch.stack(arrs)
    else:
        from taming_dist.config import DataConfig
        from taming_dist.data.stream import build_stream

        stream = build_stream(DataConfig(kind="synthetic", size=size, hflip=False), batch_size=args.count,
                              rank=0, world_size=1, seed=0)
        x = next(iter(stream))["image"]
    with torch.no_grad():
        xrec, _, info = model(x)
    save_grid(torch.cat([x, xrec.clamp(-1, 1)]), args.out, nrow=x.shape[0])
    mse = torch.mean((x - xrec) ** 2).item()
    print(f"wrote {args.out}: {x.shape[0]} images, PSNR {10 * np.log10(4.0 / max(mse, 1e-12)):.2f} dB, "
          f"codebook perplexity {float(info['perplexity']):.1f}")
    return 0
