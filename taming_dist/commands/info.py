HELP = "print versions, devices, the distributed environment and the available presets"
EXAMPLE = "taming-dist info"


def add_arguments(parser) -> None:
    parser.add_argument("--preset", help="also print this preset's resolved config")


def run(args) -> int:
    import platform

    import torch

    from taming_dist.config import dump_config, load_config, preset_names

    print(f"taming_dist {__import__('taming_dist').__version__}, python {platform.python_version()}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
          f"devices: {torch.cuda.device_count()}")
    for mod in ("deepspeed", "webdataset", "lpips", "wandb", "submitit"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # report, do not fail: info is a diagnostic command
            print(f"{mod}: not importable ({type(e).__name__}: {e})")
    print("presets:", ", ".join(preset_names()))
    if args.preset:
        print(dump_config(load_config(args.preset)))
    return 0
