"""`taming-dist` command line: one module per subcommand under taming_dist/commands/.

Each command module defines HELP (one line), EXAMPLE (a copy-paste example shown in --help),
`add_arguments(parser)` and `run(args) -> int`. Modules import heavy dependencies inside `run`
so that `taming-dist --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module under taming_dist.commands.
COMMANDS = {
    "demo": "demo",
    "train": "train",
    "info": "info",
    "sample": "sample",
    "reconstruct": "reconstruct",
    "import-taming": "import_taming",
    "convert": "convert",
    "shard": "shard",
    "extract-codes": "extract_codes",
    "export": "export",
    "import-diffusers": "import_diffusers",
    "launch": "launch",
    "eval-recon": "eval_recon",
    "eval-gen": "eval_gen",
    "plan": "plan",
    "report": "report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taming-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"taming_dist.commands.{module}")
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.HELP,
            epilog=f"example:\n  {mod.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Configuration and input errors: one clear line, no traceback.
        print(f"taming-dist {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
