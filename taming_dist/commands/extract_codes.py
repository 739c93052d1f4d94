HELP = ("encode image shards with a trained VQGAN into stage-2 token shards (distributed over ranks "
        "when started with torchrun/srun; resumable: finished input shards are skipped)")
EXAMPLE = ("torchrun --nproc_per_node 8 -m taming_dist extract-codes runs/vqgan/model data/imagenet "
           "data/imagenet_codes --size 256 --flip\n  "
           "torchrun --nproc_per_node 8 -m taming_dist extract-codes runs/vqgan/model data/captioned data/t2i_codes "
           "--text-encoder models/t5-v1_1-xl --max-text-tokens 120")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="VQGAN model folder or run folder")
    parser.add_argument("source", help="image shard folder (with manifest.json), or `synthetic`")
    parser.add_argument("out", help="output folder for code shards and their manifest")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the VQGAN's resolution)")
    parser.add_argument("--synthetic-samples", type=int, default=None,
                        help="with source `synthetic`: how many train-split images to draw and encode (default: "
                             "data.synthetic_samples' 4096)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--flip", action="store_true", help="also store the codes of the flipped image")
    text = parser.add_argument_group("text features (text-to-image models, condition.kind=text)")
    text.add_argument("--text-encoder", default=None,
                      help="local Hugging Face text encoder folder (T5EncoderModel, CLIPTextModel, or any model with "
                           "last_hidden_state; its tokenizer in the same folder): encode each sample's caption (txt)")
    text.add_argument("--max-text-tokens", type=int, default=120, help="most vectors per caption (default 120)")
    text.add_argument("--text-dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                      help="stored dtype of the features (default fp16)")


def run(args) -> int:
    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.config import DataConfig
    from taming_dist.data.codes import extract_codes
    from taming_dist.engines import env_from_environ, init_distributed
    from taming_dist.weights.folder import resolve_model_folder

    if args.synthetic_samples is not None and args.source != "synthetic":
        raise ValueError(f"--synthetic-samples is for the built-in data (source `synthetic`), not the shard folder "
                         f"{args.source}: leave it out, or pass `synthetic` as the source")
    env = env_from_environ()
    device = init_distributed(env)
    model = build_model_from_folder(resolve_model_folder(args.model)).to(device)
    size = args.size or model.config.ddconfig.resolution
    samples = {} if args.synthetic_samples is None else {"synthetic_samples": args.synthetic_samples}
    source = DataConfig(kind="synthetic", size=size, **samples) if args.source == "synthetic" else args.source

    def barrier():
        if env.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    text_encoder = None
    if args.text_encoder:
        import torch

        from taming_dist.text import TextEncoder

        # bf16 on a GPU (the encoder's usual training precision), fp32 on the CPU
        text_encoder = TextEncoder.load(args.text_encoder, device=device,
                                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    result = extract_codes(model, source, args.out, rank=env.rank, world_size=env.world_size,
                           batch_size=args.batch_size, flip=args.flip, device=device, size=size, barrier=barrier,
                           text_encoder=text_encoder, max_text_tokens=args.max_text_tokens, text_dtype=args.text_dtype)
    print(f"rank {env.rank}: wrote {len(result['written'])} code shards, skipped {len(result['skipped'])} done ones")
    if result["manifest"]:
        print(f"manifest: {result['manifest'].get('total', '?')} samples in {args.out}")
        text = result["manifest"].get("text")
        if text:
            print(f"text features: {text['encoder']} ({text['width']} wide, {text['dtype']}, at most "
                  f"{text['max_length']} tokens), {text['truncated']} captions truncated, "
                  f"{text['captions_per_s']} captions/s")
    return 0
