HELP = ("encode image shards with a trained VQGAN into stage-2 token shards (distributed over ranks "
        "when started with torchrun/srun; resumable: finished input shards are skipped)")
EXAMPLE = ("torchrun --nproc_per_node 8 -m taming_dist extract-codes runs/vqgan/model data/imagenet "
           "data/imagenet_codes --size 256 --flip")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="VQGAN model folder or run folder")
    parser.add_argument("source", help="image shard folder (with manifest.json), or `synthetic`")
    parser.add_argument("out", help="output folder for code shards and their manifest")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the VQGAN's resolution)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--flip", action="store_true", help="also store the codes of the flipped image")


def run(args) -> int:
    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.config import DataConfig
    from taming_dist.data.codes import extract_codes
    from taming_dist.engines import env_from_environ, init_distributed
    from taming_dist.weights.folder import resolve_model_folder

    env = env_from_environ()
    device = init_distributed(env)
    model = build_model_from_folder(resolve_model_folder(args.model)).to(device)
    size = args.size or model.config.ddconfig.resolution
    source = DataConfig(kind="synthetic", size=size) if args.source == "synthetic" else args.source

    def barrier():
        if env.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    result = extract_codes(model, source, args.out, rank=env.rank, world_size=env.world_size,
                           batch_size=args.batch_size, flip=args.flip, device=device, size=size, barrier=barrier)
    print(f"rank {env.rank}: wrote {len(result['written'])} code shards, skipped {len(result['skipped'])} done ones")
    if result["manifest"]:
        print(f"manifest: {result['manifest'].get('total', '?')} samples in {args.out}")
    return 0
