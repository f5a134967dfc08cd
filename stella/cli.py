"""The `stella` command: a thin dispatcher over `stella.commands.<name>` modules.

Each command module defines `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`, so a command lives next to nothing but itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stella import __version__
from stella.commands import Output, OutputError

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

COMMANDS = ("serve", "chat", "models", "config", "keys", "usage", "bench", "import_gguf")


class _Parser(argparse.ArgumentParser):
    """argparse, whose help and version text reach the CLI's output handling: argparse
    drops an OSError there, so with stdout closed `--help` said nothing and exited 0.
    A usage message that stderr cannot take is still dropped, its exit code kept."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        file = file or sys.stderr
        if not message or file is None:  # stderr closed too: nowhere to say it
            return
        if isinstance(file, Output):  # stdout: a failure is the CLI's to say
            file.write(message)
            file.flush()  # argparse exits next, past main's flush
            return
        with contextlib.suppress(OSError):  # stderr: as argparse does (a usage error stays 2)
            file.write(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command that can be imported."""
    parser = _Parser(prog="stella", description="An async LLM gateway.")
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
    stdout = sys.stdout
    sys.stdout = Output(stdout)  # stdout None (started with fd 1 closed): writes fail
    try:
        # In the try: a Ctrl-C while the commands load is a Ctrl-C like any other.
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help()
            return 2
        code = int(args.run(args) or 0)
        # A block-buffered stdout (a file, a pipe) writes here, where a failure can still
        # be said in one line, not at exit as an "Exception ignored" and exit 120.
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        # Ctrl-C (a hung server, a prompt for stdin): exit 130 as a shell reports it, no
        # traceback; the shell's prompt on a line of its own, after the terminal's "^C".
        if sys.stderr is not None and sys.stderr.isatty():
            print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `stella config | head`: the reader left; say nothing more, as other tools do.
        _drop_output()
        return 1
    except OutputError as exc:  # `stella config > /dev/full`
        print(f"stella: cannot write output: {exc.strerror or exc}", file=sys.stderr)
        _drop_output()
        return 1
    finally:
        # What a command wrote before it ended otherwise (a SystemExit, Ctrl-C) is
        # written, as Python does with a buffered stdout at exit.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        sys.stdout = stdout


def _drop_output() -> None:
    """Send what stdout still holds to /dev/null: flushed at exit into a broken stdout,
    it would end in an "Exception ignored" message."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
