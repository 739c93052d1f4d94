HELP = "print versions, devices, the distributed environment and the available presets"
EXAMPLE = "taming-dist info"


def add_arguments(parser) -> None:
    parser.add_argument("--preset", help="also print this preset's resolved config")


def run(args) -> int:
    import platform
    from importlib import metadata
    from pathlib import Path

    import torch

    import taming_dist
    from taming_dist.config import dump_config, load_config, preset_names
    from taming_dist.config.load import PRESET_DIR

    # Where the package and its presets were found tells a checkout from an installed wheel.
    print(f"taming_dist {taming_dist.__version__} ({Path(taming_dist.__file__).parent}), "
          f"python {platform.python_version()}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
          f"devices: {torch.cuda.device_count()}")
    for mod in ("deepspeed", "webdataset", "lpips", "wandb", "submitit"):
        try:
            __import__(mod)
            print(f"{mod} {metadata.version(mod)}")  # lpips has no __version__
        except Exception as e:  # report, do not fail: info is a diagnostic command
            print(f"{mod}: not importable ({type(e).__name__}: {e})")
    print(f"presets: {', '.join(preset_names())} (from {PRESET_DIR})")
    if args.preset:
        print(dump_config(load_config(args.preset)))
    return 0
