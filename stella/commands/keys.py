"""`stella keys new NAME`: a fresh API key and the config lines with its SHA-256;
`stella keys create | list | update | rotate | revoke`: a running server's keys (its
admin routes)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from stella.commands import add_timeout, ask_server, print_table
from stella.cost import usd_decimal
from stella.settings import MAX_BUDGET, MAX_COUNT

NAME = "keys"
HELP = (
    "API keys: `keys new NAME` prints a key and its [auth.keys] lines; `keys hash` hashes "
    "stdin; `keys create NAME | list | update NAME | rotate NAME | revoke NAME` manage a "
    "running server's keys"
)
# A duration's units (--expires-in 30d, --grace 1h); a bare number is seconds.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# ASCII digits only: float() takes other scripts' digits too ("١٢"), a typo's likely.
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)", re.ASCII)
# A server answers a key change within Redis's timeout: a wait longer than this is a
# server that will not answer.
KEYS_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella keys`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="a new key")
    create = sub.add_parser("create", help="make a runtime key on a running server (admin)")
    for p in (new, create):
        _key_options(p)
    create.add_argument(
        "--expires-in",
        type=_life,
        default=None,
        metavar="DURATION",
        help="it stops working this long from now: 90s, 15m, 12h, 30d (default: never)",
    )
    listing = sub.add_parser("list", help="list a running server's keys (admin)")
    update = sub.add_parser(
        "update", help="change a runtime key's settings on a running server, its key kept (admin)"
    )
    _update_options(update)
    rotate = sub.add_parser(
        "rotate", help="give a runtime key a new key on a running server (admin)"
    )
    rotate.add_argument("name", help="the key's name")
    rotate.add_argument(
        "--grace",
        type=_duration,
        default=0.0,
        metavar="DURATION",
        help="the old key keeps working this long: 90s, 15m, 1h, 7d at most (default: stops now)",
    )
    revoke = sub.add_parser("revoke", help="revoke a key on a running server (admin)")
    revoke.add_argument("name", help="the key's name")
    revoke.add_argument(
        "--purge",
        action="store_true",
        help="drop a runtime key's stored entry too, so that its name is free again",
    )
    for p in (create, listing, update, rotate, revoke):
        p.add_argument("--url", help="server URL (default: $STELLA_URL or http://127.0.0.1:8000)")
        p.add_argument("--api-key", help="an admin API key (default: $STELLA_API_KEY)")
        p.add_argument("--json", action="store_true", help="print JSON")
        add_timeout(p, KEYS_TIMEOUT_S, "the answer")
    sub.add_parser("hash", help="print the SHA-256 of a key read from stdin")


def _key_options(new: argparse.ArgumentParser) -> None:
    """A key's name and settings (`new` and `create`)."""
    new.add_argument("name", help="the key's name (shown in logs and usage)")
    new.add_argument("--admin", action="store_true", help="may use the admin routes")
    models = new.add_mutually_exclusive_group()
    models.add_argument("--models", nargs="+", default=None, help="glob patterns of allowed models")
    # An admin-only key: `models = []`, which `--models` with no pattern can't say.
    models.add_argument(
        "--no-models",
        dest="models",
        action="store_const",
        const=[],
        help="no model at all (an admin-only key, with --admin)",
    )
    new.add_argument("--rpm", type=_count, default=0, help="requests per minute (0: the default)")
    new.add_argument("--tpm", type=_count, default=0, help="tokens per minute (0: the default)")
    new.add_argument(
        "--concurrent", type=_count, default=0, help="requests at once (0: the default)"
    )
    new.add_argument("--rpd", type=_count, default=0, help="requests per UTC day (0: the default)")
    new.add_argument("--tpd", type=_count, default=0, help="tokens per UTC day (0: the default)")
    new.add_argument(
        "--usd", type=_usd, default=0.0, help="a budget in USD per UTC day (0: the default)"
    )


def _update_options(update: argparse.ArgumentParser) -> None:
    """`keys update`: what to change (an option left out: unchanged)."""
    update.add_argument("name", help="the key's name")
    admin = update.add_mutually_exclusive_group()
    admin.add_argument(
        "--admin",
        dest="admin",
        action="store_const",
        const=True,
        default=None,
        help="may use the admin routes",
    )
    admin.add_argument(
        "--no-admin", dest="admin", action="store_const", const=False, help="may not"
    )
    models = update.add_mutually_exclusive_group()
    models.add_argument("--models", nargs="+", default=None, help="glob patterns of allowed models")
    models.add_argument(
        "--no-models", dest="models", action="store_const", const=[], help="no model at all"
    )
    for flag, what in (
        ("--rpm", "requests per minute"),
        ("--tpm", "tokens per minute"),
        ("--concurrent", "requests at once"),
        ("--rpd", "requests per UTC day"),
        ("--tpd", "tokens per UTC day"),
    ):
        update.add_argument(flag, type=_count, default=None, help=f"{what} (0: the default)")
    update.add_argument(
        "--usd", type=_usd, default=None, help="a budget in USD per UTC day (0: the default)"
    )
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in",
        type=_life,
        default=None,
        metavar="DURATION",
        help="it stops working this long from now: 90s, 15m, 12h, 30d",
    )
    expiry.add_argument("--no-expiry", action="store_true", help="it never expires")


def _duration(text: str) -> float:
    """Seconds from "90", "90s", "15m", "12h" or "30d", for argparse."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (a number and s, m, h or d: 90s, 15m, 12h, 30d)"
        )
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


def _life(text: str) -> float:
    """A key's life (--expires-in): a duration more than 0, for argparse."""
    value = _duration(text)
    if value <= 0:  # the server's rule, said here as a usage error naming the option
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text!r}")
    return value


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


def _usd(text: str) -> float:
    """An amount of USD >= 0 (a daily budget), for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_BUDGET:  # NaN too
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_BUDGET:g}, not {text}")
    return value


def _toml_string(value: str) -> str:
    """`value` as a TOML basic string (JSON's escapes are TOML's; JSON leaves DEL raw,
    which TOML forbids in a string)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def run(args: argparse.Namespace) -> int:
    """Print the key once (it is not stored anywhere) and the lines to configure it."""
    from stella.auth import KEY_NAME_RULE, hash_key, is_key_name, new_key

    if args.action == "update" and not _changes(args):
        flags = "--models, --no-models, --admin, --no-admin, --rpm, --tpm, --concurrent, "
        flags += "--rpd, --tpd, --usd, --expires-in, --no-expiry"
        print(
            f"stella: keys update: nothing to change: give one or more of {flags}", file=sys.stderr
        )
        return 2
    if args.action in ("create", "list", "update", "rotate", "revoke"):
        return _on_server(args)
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
    if args.models is not None:
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
    if args.usd:
        # Decimals: `1e-05` is TOML too, but reads as a typo to most.
        lines.append(f"usd_per_day = {usd_decimal(args.usd)}")
    print("\n".join(lines))
    return 0


def _changes(args: argparse.Namespace) -> bool:
    """Whether `keys update` was given anything to change."""
    given = (args.models, args.admin, args.rpm, args.tpm, args.concurrent, args.rpd, args.tpd)
    return any(v is not None for v in (*given, args.usd, args.expires_in)) or args.no_expiry


def _on_server(args: argparse.Namespace) -> int:
    """`create`, `list`, `update`, `rotate` or `revoke` against a server; the answer as
    a table or JSON."""
    import msgspec

    def ask(client: Any) -> Any:
        """The call the action names."""
        if args.action == "create":
            return client.create_key(
                args.name,
                models=args.models,
                admin=args.admin,
                requests_per_minute=args.rpm,
                tokens_per_minute=args.tpm,
                max_concurrent=args.concurrent,
                requests_per_day=args.rpd,
                tokens_per_day=args.tpd,
                usd_per_day=args.usd,
                expires_in_s=args.expires_in,
            )
        if args.action == "list":
            return client.list_keys()
        if args.action == "update":
            return client.update_key(
                args.name,
                models=args.models,
                admin=args.admin,
                requests_per_minute=args.rpm,
                tokens_per_minute=args.tpm,
                max_concurrent=args.concurrent,
                requests_per_day=args.rpd,
                tokens_per_day=args.tpd,
                usd_per_day=args.usd,
                expires_in_s=args.expires_in,
                no_expiry=args.no_expiry,
            )
        if args.action == "rotate":
            return client.rotate_key(args.name, grace_s=args.grace)
        return client.revoke_key(args.name, purge=args.purge)

    answer, failed = ask_server(args, KEYS_TIMEOUT_S, ask)
    if failed is not None:
        return failed
    if args.json:
        print(msgspec.json.encode(answer).decode())
    elif args.action in ("create", "rotate"):
        print("(shown once; the server stores only its hash)", file=sys.stderr)
        if args.action == "rotate":
            until = f"until {answer.grace_until}" if answer.grace_until else "no longer"
            print(f"(the old key works {until})", file=sys.stderr)
        print(answer.key)
    elif args.action == "update":
        print(f"updated {answer.name}")
    elif args.action == "list":
        # The limits that apply, as --json gives them (0: unlimited).
        limit_names = ("RPM", "TPM", "CONC", "RPD", "TPD", "USD/DAY")
        rows: list[tuple[str, ...]] = [
            ("NAME", "SOURCE", "ADMIN", "CREATED", "EXPIRES", "REVOKED", *limit_names, "MODELS")
        ]
        for k in answer.keys:
            admin = "yes" if k.admin else "no"
            # When, where the server knows it ("yes": revoked at a time not kept).
            revoked = (k.revoked_at or "yes") if k.revoked else "no"
            created = k.created_at or "-"
            # "-": never; an expired key's time says so.
            expires = (k.expires_at + (" (expired)" if k.expired else "")) or "-"
            limits = (
                k.requests_per_minute,
                k.tokens_per_minute,
                k.max_concurrent,
                k.requests_per_day,
                k.tokens_per_day,
                usd_decimal(k.usd_per_day or 0.0),
            )
            models = ", ".join(k.models) or "(none)"
            if k.skipped:
                models += f"  (skipped here: {k.skipped})"
            row = (k.name, k.source, admin, created, expires, revoked, *map(str, limits), models)
            rows.append(row)
        print_table(rows)
    else:
        done = "purged" if answer.purged else "revoked"
        print(f"{done} {answer.revoked} ({', '.join(answer.sources or [answer.source])})")
        if answer.detail:
            print(answer.detail, file=sys.stderr)
    return 0
