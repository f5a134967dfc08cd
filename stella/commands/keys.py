"""`stella keys new NAME`: a fresh API key and the config lines with its SHA-256."""

from __future__ import annotations

import argparse
import sys

NAME = "keys"
HELP = "make API keys: `keys new NAME` prints a key and its [auth.keys] lines; `keys hash` hashes stdin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella keys`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="a new key")
    new.add_argument("name", help="the key's name (shown in logs and usage)")
    new.add_argument("--admin", action="store_true", help="may use the admin routes")
    new.add_argument("--models", nargs="*", default=None, help="glob patterns of allowed models")
    new.add_argument("--rpm", type=int, default=0, help="requests per minute (0: the default)")
    new.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: the default)")
    sub.add_parser("hash", help="print the SHA-256 of a key read from stdin")


def run(args: argparse.Namespace) -> int:
    """Print the key once (it is not stored anywhere) and the lines to configure it."""
    from stella.auth import hash_key, new_key

    if args.action == "hash":
        key = sys.stdin.readline().strip()
        if not key:
            print("stella: no key on stdin", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    if not args.name.replace("-", "").replace("_", "").isalnum():
        print("stella: a key name may use letters, digits, - and _", file=sys.stderr)
        return 2
    key = new_key()
    print(f"key: {key}", file=sys.stderr)
    print("(shown once; stella stores only its hash)\n", file=sys.stderr)
    lines = [f"[auth.keys.{args.name}]", f'sha256 = "{hash_key(key)}"']
    if args.models:
        lines.append("models = [" + ", ".join(f'"{m}"' for m in args.models) + "]")
    if args.admin:
        lines.append("admin = true")
    if args.rpm:
        lines.append(f"requests_per_minute = {args.rpm}")
    if args.tpm:
        lines.append(f"tokens_per_minute = {args.tpm}")
    print("\n".join(lines))
    return 0
