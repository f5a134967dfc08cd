"""`stella keys new NAME`: a fresh API key and the config lines with its SHA-256."""

from __future__ import annotations

import argparse
import json
import re
import sys

from stella.settings import MAX_COUNT

NAME = "keys"
HELP = "make API keys: `keys new NAME` prints a key and its [auth.keys] lines; `keys hash` hashes stdin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella keys`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="a new key")
    new.add_argument("name", help="the key's name (shown in logs and usage)")
    new.add_argument("--admin", action="store_true", help="may use the admin routes")
    new.add_argument("--models", nargs="+", default=None, help="glob patterns of allowed models")
    new.add_argument("--rpm", type=_count, default=0, help="requests per minute (0: the default)")
    new.add_argument("--tpm", type=_count, default=0, help="tokens per minute (0: the default)")
    new.add_argument(
        "--concurrent", type=_count, default=0, help="requests at once (0: the default)"
    )
    new.add_argument("--rpd", type=_count, default=0, help="requests per UTC day (0: the default)")
    new.add_argument("--tpd", type=_count, default=0, help="tokens per UTC day (0: the default)")
    sub.add_parser("hash", help="print the SHA-256 of a key read from stdin")


def _count(text: str) -> int:
    """A whole number >= 0, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}, not {value}")
    return value


def _toml_string(value: str) -> str:
    """`value` as a TOML basic string (JSON's escapes are TOML's; JSON leaves DEL raw,
    which TOML forbids in a string)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def run(args: argparse.Namespace) -> int:
    """Print the key once (it is not stored anywhere) and the lines to configure it."""
    from stella.auth import KEY_NAME_RULE, hash_key, is_key_name, new_key

    if args.action == "hash":
        try:
            key = sys.stdin.readline().strip() if sys.stdin is not None else ""  # None: fd 0 closed
        except UnicodeDecodeError:  # a strict decoder (a UTF-8 locale); a lax one escapes
            print("stella: the key on stdin is not UTF-8 text", file=sys.stderr)
            return 2
        if not key:
            print("stella: no key on stdin", file=sys.stderr)
            return 2
        try:
            print(hash_key(key))
        except UnicodeEncodeError:  # bytes that are not UTF-8 (read as surrogates)
            print("stella: the key on stdin is not UTF-8 text", file=sys.stderr)
            return 2
        return 0
    name = args.name
    if not is_key_name(name):  # what the config takes
        print(f"stella: {KEY_NAME_RULE}", file=sys.stderr)
        return 2
    key = new_key()
    print(f"key: {key}", file=sys.stderr)
    print("(shown once; stella stores only its hash)\n", file=sys.stderr)
    # A bare TOML key when it can be one ("alice"), else quoted ("ci bot", "a.b@corp").
    table = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_string(name)
    lines = [f"[auth.keys.{table}]", f'sha256 = "{hash_key(key)}"']
    if args.models:
        lines.append("models = [" + ", ".join(_toml_string(m) for m in args.models) + "]")
    if args.admin:
        lines.append("admin = true")
    if args.rpm:
        lines.append(f"requests_per_minute = {args.rpm}")
    if args.tpm:
        lines.append(f"tokens_per_minute = {args.tpm}")
    if args.concurrent:
        lines.append(f"max_concurrent = {args.concurrent}")
    if args.rpd:
        lines.append(f"requests_per_day = {args.rpd}")
    if args.tpd:
        lines.append(f"tokens_per_day = {args.tpd}")
    print("\n".join(lines))
    return 0
