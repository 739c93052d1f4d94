from taming_dist.train import EXIT_STOPPED

HELP = "train a VQGAN or a transformer (the engine and stage come from the config)"
EXAMPLE = ("taming-dist train vqgan-tiny train.steps=100 engine.kind=ddp  "
           "# under torchrun --nproc_per_node 2, deepspeed, srun or plain python")


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a preset name (see `taming-dist info`) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=1000")
    parser.add_argument("--resume", default="auto",
                        help="auto (the run's latest checkpoint if any), none, or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    from taming_dist.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    from taming_dist.train.loop import train

    try:
        result = train(cfg, resume=args.resume)
    except BaseException:
        _exit_now_if_distributed()
        raise
    return EXIT_STOPPED if "stopped_at" in result else 0


def _exit_now_if_distributed() -> None:
    """A rank that failed (an exception, a collective that timed out because a peer died or hung)
    leaves at once with status 1 and its traceback, instead of running interpreter shutdown, where a
    process group, loader workers or wandb can block it: the launcher (srun --kill-on-bad-exit,
    torchrun, the deepspeed launcher) sees the failure and ends the other ranks."""
    import os
    import sys
    import traceback

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        print(f"rank {rank}: training failed, exiting now (status 1):\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(1)
