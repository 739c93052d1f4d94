HELP = ("the main job: train a tiny VQGAN, then a tiny class-conditional transformer on its codes, "
        "on the built-in dataset (CPU, a few minutes), and write sample grids and a report page (report.html)")
EXAMPLE = "taming-dist demo --out runs/demo"

# What the demo adds to vqgan-tiny (README, "What `make demo` shows"): k-means initialisation of the
# codebook and restarts of codes whose usage EMA falls below 0.3 of an average code keep every code
# in use (76% of them without).
VQGAN_OVERRIDES = ["vqgan.quantizer.kmeans_init=true", "vqgan.quantizer.dead_code_threshold=0.3"]
# Samples: top-k 32 with classifier-free guidance at scale 3 (transformer-tiny trains with
# class_dropout 0.1 for it); on one demo run guidance at scales 2-4 raised the share of samples of
# their own class from 19% to 30-33%.
SAMPLING = {"top_k": 32, "cfg_scale": 3.0}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for both runs and the sample grids")
    parser.add_argument("--vqgan-steps", type=int, default=None, help="override the vqgan-tiny preset's steps")
    parser.add_argument("--transformer-steps", type=int, default=None,
                        help="override the transformer-tiny preset's steps")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs (e.g. logging.wandb_mode=disabled)")


def run(args) -> int:
    from pathlib import Path

    import torch

    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.config import load_config
    from taming_dist.data.images import save_grid
    from taming_dist.models.pipeline import generate_image
    from taming_dist.report import write_report
    from taming_dist.train.loop import train

    out = Path(args.out)
    common = [f"out_dir={out}", *args.overrides]
    vq = load_config("vqgan-tiny", VQGAN_OVERRIDES + common + ["name=vqgan"] + (
        [f"train.steps={args.vqgan_steps}"] if args.vqgan_steps else []))
    print(f"== 1/5 training the VQGAN ({vq.train.steps} steps; vqgan-tiny with {' '.join(VQGAN_OVERRIDES)}) "
          f"-> {out / 'vqgan'}", flush=True)
    train(vq)
    tr = load_config("transformer-tiny", common + ["name=transformer", f"first_stage_ckpt={out / 'vqgan' / 'model'}"] + (
        [f"train.steps={args.transformer_steps}"] if args.transformer_steps else []))
    print(f"== 2/5 training the transformer ({tr.train.steps} steps) -> {out / 'transformer'}", flush=True)
    train(tr)
    print(f"== 3/5 sampling one row per class (top_k {SAMPLING['top_k']}, cfg_scale {SAMPLING['cfg_scale']})",
          flush=True)
    model = build_model_from_folder(out / "transformer" / "model").eval()
    gen = torch.Generator().manual_seed(0)
    n_classes = tr.transformer.condition.n_classes
    labels = torch.arange(n_classes).repeat_interleave(8)
    images = generate_image(model.first_stage_model, model, labels, generator=gen, **SAMPLING)
    save_grid(images, out / "samples.png", nrow=8)
    print(f"wrote {out / 'samples.png'} (rows = classes 0..{n_classes - 1}); reconstructions and training "
          f"samples are under {out}/*/images/")
    print("== 4/5 quality on the held-out split", flush=True)
    from taming_dist.eval.demo_report import demo_quality

    demo_quality(model.first_stage_model, model, images.float().clamp(-1, 1), labels, out, sampling=SAMPLING)
    print(f"wrote {out / 'report.json'} and {out / 'overview.png'}")
    print("== 5/5 the report of both runs", flush=True)
    report = write_report(out)
    print(f"wrote {report}: open file://{report.resolve()} in a browser (no server needed)")
    return 0
