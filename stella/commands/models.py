"""`stella models`: the models a stella server routes."""

from __future__ import annotations

import argparse

from stella.commands import add_timeout, ask_server, print_table

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

    listing, failed = ask_server(args, MODELS_TIMEOUT_S, lambda client: client.models())
    if failed is not None:
        return failed
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
