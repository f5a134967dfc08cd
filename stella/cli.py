"""The `stella` command: a thin dispatcher over `stella.commands.<name>` modules.

Each command module defines `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`, so a command lives next to nothing but itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from stella import __version__

COMMANDS = ("serve", "chat", "models", "config", "keys", "bench", "import_gguf")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command that can be imported."""
    parser = argparse.ArgumentParser(prog="stella", description="An async LLM gateway.")
    parser.add_argument("--version", action="version", version=f"stella {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        try:
            module = importlib.import_module(f"stella.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"stella.commands.{module_name}":
                continue
            raise
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stella` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:
        # `stella config | head`: the reader left; say nothing more, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
