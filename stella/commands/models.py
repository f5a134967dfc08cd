"""`stella models`: the models a stella server routes."""

from __future__ import annotations

import argparse
import sys

from stella.commands import (
    add_timeout,
    client_error,
    client_exit,
    client_timeout,
    command_client,
    key_from,
    print_table,
)

NAME = "models"
HELP = "list the models of a stella server"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella models`."""
    parser.add_argument("--url", help="server URL (default: $STELLA_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default: $STELLA_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_timeout(parser, MODELS_TIMEOUT_S, "the list")


# A short list that every replica answers from memory: a wait longer than this is a
# server that will not answer.
MODELS_TIMEOUT_S = 30.0


def run(args: argparse.Namespace) -> int:
    """Print a table (or JSON) of the models."""
    import msgspec

    from stella.client import StellaClientError

    timeout = client_timeout(args.timeout, MODELS_TIMEOUT_S)
    if timeout is None:
        return 2
    try:
        with command_client(args, timeout) as client:
            listing = client.models()
    except StellaClientError as exc:
        print(client_error(exc, key_from(args.api_key)), file=sys.stderr)
        return client_exit(exc)
    except OSError as exc:
        print(f"stella: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode(listing).decode())
        return 0
    rows = [("MODEL", "BACKEND", "KIND", "LOADED", "CIRCUIT", "ALIASES")]
    for m in listing.models:
        name = m.name + (" *" if m.default else "")
        aliases = ", ".join(m.aliases)
        if m.left_out:  # backends the route names that this replica serves it without
            aliases = f"{aliases}  (left out here: {', '.join(m.left_out)})".lstrip()
        rows.append((name, m.backend, m.kind, "yes" if m.loaded else "no", m.circuit, aliases))
    # An admin's stored routes this replica does not serve: rows, as `keys list` shows a
    # stored key it does not take, so a table read alone does not hide them.
    for name, why in sorted(listing.skipped.items()):
        rows.append((name, "-", "-", "no", "-", f"(skipped here: {why})"))
    print_table(rows)
    return 0
