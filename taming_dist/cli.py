"""`taming-dist` command line: one module per subcommand under taming_dist/commands/.

Each command module defines HELP (one line), EXAMPLE (a copy-paste example shown in --help),
`add_arguments(parser)` and `run(args) -> int`. Modules import heavy dependencies inside `run`
so that `taming-dist --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

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


TRACEBACK_ENV = "TAMING_DIST_TRACEBACK"


def _raised_by_us(e: BaseException) -> bool:
    """True when taming_dist's own code raised `e` (a check of a setting or an input, worded for the
    user), False when it came out of a library or the interpreter (a bug to see in full)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).parent)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Configuration and input errors that our checks raise: one clear line, no traceback.
        # The same types raised inside a library are internal errors: they keep their traceback
        # (so does everything with TAMING_DIST_TRACEBACK=1).
        if not _raised_by_us(e) or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"taming-dist {args.command}: error: {e}", file=sys.stderr)
        return 2


def program() -> None:
    """The `taming-dist` executable and `python -m taming_dist`: main(), then exit_process, which
    leaves a process that holds a process group without interpreter shutdown (where a gloo thread
    can abort a rank that finished; taming_dist/engines/dist.py). main() is for calls in-process."""
    code = main()
    from taming_dist.engines.dist import exit_process

    exit_process(code)


if __name__ == "__main__":
    program()
