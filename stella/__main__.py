"""`python -m stella` is the `stella` command."""

import sys


def run() -> int:
    """The `stella` console script: the CLI, with a Ctrl-C while it loads included."""
    try:
        from stella.cli import main
    except KeyboardInterrupt:  # exit 130 and no traceback, as in main()
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
