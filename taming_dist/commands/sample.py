HELP = "sample images from a trained transformer (a model folder or run folder) and write a PNG grid"
EXAMPLE = "taming-dist sample runs/demo/transformer/model --classes 0,1,2,3 --per-class 8 --out samples.png"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="transformer model folder (config.json + model.safetensors) or run folder")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--classes", default="", help="comma-separated class labels (class-conditional models)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class (or in total if unconditional)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import torch

    from taming_dist.data.images import save_grid
    from taming_dist.models.pipeline import generate_image
    from taming_dist.tasks.init import resolve_model_folder
    from taming_dist.checkpoint.pretrained import build_model_from_folder

    model = build_model_from_folder(resolve_model_folder(args.model)).eval()
    kind = model.config.condition.kind if hasattr(model, "config") else "none"
    gen = torch.Generator().manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
              generator=gen)
    rows = []
    if args.classes:
        if kind != "class":
            raise ValueError(f"--classes given but the model's condition kind is {kind!r}")
        for c in [int(c) for c in args.classes.split(",")]:
            rows.append(generate_image(model.first_stage_model, model, torch.full((args.per_class,), c), **kw))
    else:
        if kind not in ("none",):
            raise ValueError(f"the model is conditioned on {kind!r}: pass --classes for class models")
        rows.append(generate_image(model.first_stage_model, model, None, batch_size=args.per_class, **kw))
    images = torch.cat(rows)
    save_grid(images, args.out, nrow=args.per_class)
    print(f"wrote {images.shape[0]} samples to {args.out}")
    return 0
