HELP = ("sample images from a trained transformer (a model folder or run folder): a PNG grid, or with "
        "--num-samples N samples at scale over ranks (torchrun/srun) as image shards or one .npz for FID tools")
EXAMPLE = ("taming-dist sample runs/demo/transformer/model --classes 0,1,2,3 --per-class 8 --out samples.png\n  "
           "taming-dist sample runs/t2i --prompt \"a red circle on a blue background\" --text-encoder models/t5 "
           "--cfg-scale 3\n  "
           "torchrun --nproc_per_node 8 -m taming_dist sample runs/cin/model --num-samples 50000 --out-dir "
           "samples --format npz --cfg-scale 1.5 --top-k 600")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="transformer model folder (config.json + model.safetensors) or run folder")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--classes", default="",
                        help="comma-separated class labels (class-conditional models; with --num-samples they are "
                             "cycled, default all classes)")
    parser.add_argument("--per-class", type=int, default=8,
                        help="samples per class or prompt (or in total if unconditional)")
    text = parser.add_argument_group("text-conditioned models (condition.kind=text)")
    text.add_argument("--prompt", action="append", default=[],
                      help="a caption to draw (repeat the flag for more rows), e.g. \"a red circle on a blue background\"")
    text.add_argument("--prompts", default=None, help="a file of prompts, one per line (a row of samples each)")
    text.add_argument("--text-encoder", default=None,
                      help="the local text encoder folder the model's features were extracted with")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    scale = parser.add_argument_group("sampling at scale")
    scale.add_argument("--num-samples", type=int, default=None,
                       help="draw N samples, split over the ranks (distinct seeds per batch, the same images at any "
                            "world size for a given seed and batch size)")
    scale.add_argument("--out-dir", default=None, help="output folder, shared by every rank")
    scale.add_argument("--format", choices=("shards", "npz"), default="npz",
                       help="npz: one samples.npz (arr_0 uint8 N x H x W x 3, arr_1 labels); shards: webdataset "
                            "image shards per rank plus manifest.json")
    scale.add_argument("--batch-size", type=int, default=32, help="samples per forward (part of the seed plan)")
    scale.add_argument("--shard-size", type=int, default=1000, help="samples per shard (format shards)")


def read_prompts(path: str) -> list[str]:
    """Prompts of a file, one per line (blank lines and lines starting with # skipped)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one per line)")
    return prompts


def _grid(args, model) -> int:
    import os

    import torch

    from taming_dist.data.images import save_grid
    from taming_dist.models.pipeline import generate_image

    condition = model.condition
    gen = torch.Generator().manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
              generator=gen)
    rows = []
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if prompts:
        if condition.wants != "prompts":
            raise ValueError(f"--prompt/--prompts given but the model's condition kind is "
                             f"{model.config.condition.kind!r} (text models take prompts)")
        # Without --text-encoder, the folder recorded with the model when it exists here (`make demo`
        # records its encoder's path in condition.text_encoder).
        recorded = model.config.condition.text_encoder
        folder = args.text_encoder or (recorded if recorded and os.path.isdir(recorded) else None)
        if not folder:
            raise ValueError("--prompt needs --text-encoder DIR: the encoder folder the model's text features came "
                             f"from{' (' + recorded + ')' if recorded else ''}")
        from taming_dist.models.pipeline import get_condition
        from taming_dist.text import TextEncoder

        encoder = TextEncoder.load(folder, device=model.device)
        for p in prompts:
            rows.append(generate_image(model.first_stage_model, model,
                                       get_condition(model, [p] * args.per_class, text_encoder=encoder), **kw))
            print(f"row {len(rows)}: {p}")
    elif args.classes:
        if condition.wants != "labels":
            raise ValueError(f"--classes given but the model's condition kind is {model.config.condition.kind!r}")
        for c in [int(c) for c in args.classes.split(",")]:
            rows.append(generate_image(model.first_stage_model, model, torch.full((args.per_class,), c), **kw))
    else:
        if condition.wants is not None:
            raise ValueError(f"the model is conditioned on {model.config.condition.kind!r}: pass "
                             f"{condition.expects()}")
        rows.append(generate_image(model.first_stage_model, model, None, batch_size=args.per_class, **kw))
    images = torch.cat(rows)
    save_grid(images, args.out, nrow=args.per_class)
    print(f"wrote {images.shape[0]} samples to {args.out}")
    return 0


def _at_scale(args, folder) -> int:
    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.engines import env_from_environ, init_distributed
    from taming_dist.eval.generate import sample_to_folder
    from taming_dist.logging import print0, set_rank

    if not args.out_dir:
        raise ValueError("--num-samples needs --out-dir (a folder every rank can write to)")
    env = env_from_environ()
    set_rank(env.rank)
    device = init_distributed(env)
    model = build_model_from_folder(folder).to(device).eval()

    def barrier():
        if env.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    settings = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "cfg_scale": args.cfg_scale, "model": str(folder)}
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    result = sample_to_folder(model, args.out_dir, num_samples=args.num_samples, batch_size=args.batch_size,
                              seed=args.seed, fmt=args.format, rank=env.rank, world_size=env.world_size,
                              barrier=barrier, classes=classes, shard_size=args.shard_size, device=device,
                              settings=settings, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              cfg_scale=args.cfg_scale)
    print(f"rank {env.rank}: drew {result['written']} samples")
    print0(f"wrote {args.num_samples} samples to {result['output']}")
    return 0  # the process group ends with the process (cli.program)


def run(args) -> int:
    from taming_dist.weights.folder import resolve_model_folder

    folder = resolve_model_folder(args.model)
    if args.num_samples is not None:
        return _at_scale(args, folder)
    if args.out_dir:
        raise ValueError("--out-dir is for sampling at scale: pass --num-samples N too (or --out for one grid)")
    from taming_dist.checkpoint.pretrained import build_model_from_folder

    return _grid(args, build_model_from_folder(folder).eval())
