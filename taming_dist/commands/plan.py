HELP = ("estimate per-device memory of a training run on every engine (parameters, gradients, optimizer "
        "state, EMA, buffers, activations with and without activation checkpointing) and the largest micro "
        "batch that fits, from the config alone")
EXAMPLE = "taming-dist plan gpt-cin-1.4b --world 8 --gpu-mem 80 --json plan.json"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a preset name (see `taming-dist info`) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. engine.precision=fp32")
    parser.add_argument("--world", type=int, required=True, help="data-parallel world size (GPUs)")
    parser.add_argument("--engine", choices=["ddp", "fsdp", "deepspeed"], default=None,
                        help="only this engine (default: ddp, fsdp and deepspeed zero-1/2/3)")
    parser.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=None,
                        help="with --engine deepspeed: only this stage (default: all three)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="memory per device in GiB (default 80)")
    parser.add_argument("--micro-batch", type=int, default=None, help="micro batch (default: the config's)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON here")


def run(args) -> int:
    import json

    from taming_dist.config import load_config
    from taming_dist.plan import ENGINES, format_table, plan

    if args.zero_stage is not None and args.engine != "deepspeed":
        raise ValueError("--zero-stage needs --engine deepspeed")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    engines = [(k, s) for k, s in ENGINES if args.engine in (None, k) and args.zero_stage in (None, s)]
    cfg = load_config(args.config, args.overrides)
    report = plan(cfg, args.world, engines, micro_batch=args.micro_batch, gpu_mem_gib=args.gpu_mem)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
