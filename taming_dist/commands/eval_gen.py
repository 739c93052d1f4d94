HELP = ("FID and Inception Score of generated samples (a .npz or an image shard folder) against reference "
        "statistics from a local file; or compute such statistics with --save-stats. Without Inception weights: "
        "class accuracy and a Frechet distance from a small classifier of the built-in data (trained once, offline)")
EXAMPLE = ("taming-dist eval-gen samples/samples.npz --ref-stats imagenet256_stats.npz "
           "--inception-weights pt_inception-2015-12-05-6726825d.pth --out gen.json")


def add_arguments(parser) -> None:
    parser.add_argument("samples", help="samples .npz (arr_0: uint8 N x H x W x 3) or image shard folder; with "
                                        "--prompts, the text-conditioned model (folder or run) to sample from")
    parser.add_argument("--inception-weights", default=None,
                        help="local InceptionV3 weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID "
                             "comparable to papers) or torchvision's inception_v3_google-0cc3c7bd.pth. Left out: "
                             "samples of a model trained on the built-in data are scored by the built-in classifier "
                             "(taming_dist/eval/classifier.py) against its held-out split")
    parser.add_argument("--ref-stats", default=None, help="reference statistics .npz with mu and sigma (pytorch-fid's)")
    parser.add_argument("--save-stats", default=None,
                        help="instead of evaluating: write the statistics (mu, sigma) of SAMPLES to this .npz")
    parser.add_argument("--size", type=int, default=None,
                        help="center-crop shard images to SIZE x SIZE (needed when their sizes differ)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--is-splits", type=int, default=10, help="splits for the Inception Score (the original: 10)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    text = parser.add_argument_group("text-conditioned models: sample from a prompts file and score (every rank "
                                     "under torchrun takes its share of the prompts)")
    text.add_argument("--prompts", default=None, help="prompts, one per line: prompt accuracy on built-in captions "
                                                      "(shape by the offline classifier, colours by the pixels)")
    text.add_argument("--text-encoder", default=None, help="the encoder folder the model's features came from")
    text.add_argument("--clip", default=None, help="a local CLIPModel folder: adds the CLIP score against the prompts")
    text.add_argument("--per-prompt", type=int, default=4, help="samples per prompt")
    text.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    text.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import os

    from taming_dist.engines.dist import DistEnv, device_for
    from taming_dist.eval.generate import evaluate_samples, inception_outputs, save_stats
    from taming_dist.eval.inception import InceptionFeatures

    if args.prompts is not None:
        return _run_prompts(args)
    if args.clip or args.text_encoder:
        raise ValueError("--clip and --text-encoder score samples against prompts: pass --prompts FILE and the "
                         "model as SAMPLES")
    if args.inception_weights is None:
        return _run_builtin(args)
    if (args.ref_stats is None) == (args.save_stats is None):
        raise ValueError("pass --ref-stats REF.npz to evaluate the samples, or --save-stats OUT.npz to compute "
                         "reference statistics from them (one of the two)")
    if args.batch_size < 1 or args.is_splits < 1:
        raise ValueError(f"--batch-size ({args.batch_size}) and --is-splits ({args.is_splits}) must be >= 1")
    if args.ref_stats is not None and not os.path.isfile(args.ref_stats):
        raise FileNotFoundError(f"reference statistics {args.ref_stats} do not exist; compute them from reference "
                                f"images with `taming-dist eval-gen REF_SHARDS --save-stats {args.ref_stats} "
                                f"--inception-weights W`")
    device = device_for(DistEnv())
    inception = InceptionFeatures.from_file(args.inception_weights).to(device)
    graph = "tensorflow-fid" if inception.tf_graph else "torchvision"
    if args.save_stats is not None:
        mu, sigma, n, _ = inception_outputs(inception, args.samples, batch_size=args.batch_size, size=args.size,
                                            device=device)
        save_stats(args.save_stats, mu, sigma, n)
        result = {"samples": n, "stats": os.path.abspath(args.save_stats)}
    else:
        result = evaluate_samples(inception, args.samples, args.ref_stats, batch_size=args.batch_size, size=args.size,
                                  is_splits=args.is_splits, device=device)
    return _report(args, {"input": os.path.abspath(args.samples), "inception": graph, **result})


def _report(args, result: dict) -> int:
    import json
    import os

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


def _run_builtin(args) -> int:
    """Samples of a model trained on the built-in data, scored offline by the built-in classifier."""
    import os

    from taming_dist.engines.dist import DistEnv, device_for
    from taming_dist.eval.classifier import score_samples

    if args.ref_stats is not None or args.save_stats is not None:
        raise ValueError("--ref-stats and --save-stats are Inception statistics: pass --inception-weights W with "
                         "them, or neither to score samples of a built-in-data model with the built-in classifier")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    result = score_samples(args.samples, batch_size=args.batch_size, size=args.size, device=device_for(DistEnv()))
    return _report(args, {"input": os.path.abspath(args.samples), "scorer": "builtin-classifier", **result})


def _run_prompts(args) -> int:
    """Sample a text-conditioned model on a prompts file (every rank its share) and score it."""
    import os

    from taming_dist.checkpoint.pretrained import build_model_from_folder
    from taming_dist.commands.sample import read_prompts
    from taming_dist.engines import env_from_environ, init_distributed
    from taming_dist.eval.prompts import evaluate_prompts
    from taming_dist.text import TextEncoder
    from taming_dist.weights.folder import resolve_model_folder

    if not args.text_encoder:
        raise ValueError("--prompts needs --text-encoder DIR (the encoder folder of the model's text features)")
    env = env_from_environ()
    device = init_distributed(env)
    model = build_model_from_folder(resolve_model_folder(args.samples)).to(device).eval()
    encoder = TextEncoder.load(args.text_encoder, device=device)

    def all_reduce(t):
        if env.is_distributed:
            import torch.distributed as dist

            on_device = t.to(device)  # NCCL reduces device tensors only
            dist.all_reduce(on_device)
            t.copy_(on_device.cpu())

    result = evaluate_prompts(model, read_prompts(args.prompts), encoder, per_prompt=args.per_prompt, seed=args.seed,
                              rank=env.rank, world_size=env.world_size, all_reduce=all_reduce, clip=args.clip,
                              device=device, cfg_scale=args.cfg_scale)
    if env.rank != 0:
        return 0
    return _report(args, {"model": os.path.abspath(args.samples), "prompts_file": os.path.abspath(args.prompts),
                          "cfg_scale": args.cfg_scale, **result})
