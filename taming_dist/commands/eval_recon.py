HELP = ("reconstruction metrics of a VQGAN over a shard set: PSNR, SSIM, LPIPS, codebook usage and perplexity, "
        "rFID (distributed over ranks when started with torchrun/srun)")
EXAMPLE = ("torchrun --nproc_per_node 8 -m taming_dist eval-recon runs/vqgan/model data/imagenet_val --out "
           "recon.json --lpips-vgg vgg16-397923af.pth --inception-weights pt_inception-2015-12-05-6726825d.pth")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="VQGAN model folder (config.json + model.safetensors) or run folder")
    parser.add_argument("data", help="image shard folder (with manifest.json), or `synthetic` (the built-in data's "
                                     "held-out split: images no model trained on)")
    parser.add_argument("--out", default="recon.json", help="JSON report; example grids are written beside it")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward, per rank")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the VQGAN's resolution)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="evaluate only the first N samples (in manifest order, the same at any world size)")
    parser.add_argument("--lpips-vgg", default="",
                        help="torchvision's vgg16-397923af.pth for LPIPS (default: $TORCH_HOME/hub/checkpoints; "
                             "LPIPS is left out with a note when no copy is found)")
    parser.add_argument("--lpips-backbone", choices=("pretrained", "random"), default="pretrained",
                        help="`random`: an untrained VGG (tests only; the values mean nothing)")
    parser.add_argument("--inception-weights", default=None,
                        help="local InceptionV3 weights for rFID (pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                             "or torchvision's inception_v3_google-0cc3c7bd.pth); rFID is left out without it")
    parser.add_argument("--examples", type=int, default=8, help="originals/reconstruction pairs in the grid")
    parser.add_argument("--max-corrupt-fraction", type=float, default=0.01,
                        help="unreadable samples are skipped and counted (`skipped_samples`); more than this "
                             "fraction of a shard (of 100 or more samples) is an error, as data.max_corrupt_fraction "
                             "in training")


def _lpips(args, notes: list, device):
    """The LPIPS module, or None with a note when no VGG weights are found and none were asked for."""
    import torch

    from taming_dist.config.schema import VQLossConfig
    from taming_dist.losses.lpips import build_lpips

    cfg = VQLossConfig(lpips_vgg_path=args.lpips_vgg, lpips_backbone=args.lpips_backbone)
    try:
        # A fixed seed gives a random backbone the same weights on every rank and in every run.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            module = build_lpips(cfg)
    except FileNotFoundError as e:
        if args.lpips_vgg:
            raise
        notes.append(f"LPIPS left out: {e}")
        return None
    if args.lpips_backbone == "random":
        notes.append("LPIPS uses a random VGG backbone (--lpips-backbone random): the values mean nothing")
    return module.to(device).eval().requires_grad_(False)


def run(args) -> int:
    import json
    import os

    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.config import DataConfig
    from taming_dist.data.images import save_grid
    from taming_dist.data.synthetic import ensure_synthetic
    from taming_dist.engines import env_from_environ, init_distributed
    from taming_dist.eval.inception import InceptionFeatures, load_inception_state
    from taming_dist.eval.recon import all_reduce_sum, evaluate_reconstruction
    from taming_dist.logging import print0, set_rank
    from taming_dist.models.vqgan import VQModel
    from taming_dist.weights.folder import resolve_model_folder

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    notes: list[str] = []
    # Missing weight files fail before any work (and before the process group waits on peers).
    inception_state = load_inception_state(args.inception_weights) if args.inception_weights is not None else None
    env = env_from_environ()
    set_rank(env.rank)
    device = init_distributed(env)
    model = build_model_from_folder(resolve_model_folder(args.model))
    if not isinstance(model, VQModel):
        raise ValueError(f"{args.model} holds a {type(model).__name__}; eval-recon evaluates a VQGAN (VQModel) folder")
    model = model.float().to(device).eval()
    size = args.size or model.config.ddconfig.resolution
    folder = ensure_synthetic(DataConfig(kind="synthetic", size=size, split="heldout")) if args.data == "synthetic" \
        else args.data
    lpips = _lpips(args, notes, device)
    inception = None
    if inception_state is not None:
        inception = InceptionFeatures(inception_state).to(device)
        if not inception.tf_graph:
            notes.append("rFID uses torchvision's Inception weights: not comparable to published (TF-graph) FIDs")
    else:
        notes.append("rFID left out: pass --inception-weights PATH (a local InceptionV3 weight file)")
    metrics, examples = evaluate_reconstruction(
        model, folder, size=size, batch_size=args.batch_size, device=device, rank=env.rank,
        world_size=env.world_size, all_reduce_fn=all_reduce_sum(device), lpips=lpips, inception=inception,
        max_samples=args.max_samples, num_examples=args.examples, max_corrupt_fraction=args.max_corrupt_fraction)
    if env.rank == 0:
        report = {"model": os.path.abspath(args.model), "data": os.path.abspath(folder), "size": size,
                  "world_size": env.world_size, **metrics, "notes": notes}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        if examples is not None:
            k = examples.shape[0] // 2
            grid = os.path.splitext(args.out)[0] + "_examples.png"
            save_grid(examples, grid, nrow=k)
            print0(f"examples (top: originals, bottom: reconstructions): {grid}")
        cb = metrics["codebook"]
        shown = {k: metrics[k] for k in ("psnr", "ssim", "lpips", "rfid") if k in metrics}
        print0(f"{metrics['samples']} samples: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
               + f", codebook usage {cb['usage']:.1%} ({cb['codes_used']}/{cb['codebook_size']}), "
               f"perplexity {cb['perplexity']:.1f}")
        for note in notes:
            print0(f"note: {note}")
        print0(f"report: {args.out}")
    return 0  # the process group ends with the process (cli.program)
