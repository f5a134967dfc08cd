"""`stella usage`: a running server's usage report (its admin route GET /api/v1/usage),
per key, model and UTC day, with what the calls cost."""

from __future__ import annotations

import argparse

from stella.commands import add_timeout, ask_server, print_table
from stella.cost import usd_text

NAME = "usage"
HELP = "a running server's usage per key and model for a UTC day, with its cost (admin)"
# The report is one read (with Redis, a flush and a scan): a longer wait is a server
# that will not answer.
USAGE_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella usage`."""
    parser.add_argument("--day", help="YYYY-MM-DD, UTC (default: today)")
    parser.add_argument("--key", dest="key_name", help="only this key's rows")
    parser.add_argument("--model", help="only this model's rows (a route's name or alias)")
    parser.add_argument("--url", help="server URL (default: $STELLA_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="an admin API key (default: $STELLA_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_timeout(parser, USAGE_TIMEOUT_S, "the report")


def run(args: argparse.Namespace) -> int:
    """Print the report as a table (or JSON): a row per key and model, then the totals."""
    import msgspec

    report, failed = ask_server(
        args,
        USAGE_TIMEOUT_S,
        lambda client: client.usage(args.day, key=args.key_name, model=args.model),
    )
    if failed is not None:
        return failed
    if args.json:
        print(msgspec.json.encode(report).decode())
        return 0
    rows: list[tuple[str, ...]] = [
        ("KEY", "MODEL", "DAY", "REQUESTS", "PROMPT", "COMPLETION", "ERRORS", "COST_USD")
    ]
    for r in report.usage:
        counts = (r.requests, r.prompt_tokens, r.completion_tokens, r.errors)
        rows.append((r.key, r.model, r.day, *map(str, counts), usd_text(r.cost_usd)))
    t = report.totals
    counts = (t.requests, t.prompt_tokens, t.completion_tokens, t.errors)
    rows.append(("(total)", "", "", *map(str, counts), usd_text(t.cost_usd)))
    print_table(rows)
    return 0
