"""`stella bench`: load a URL, or run one of the side-by-side comparisons."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

from stella.commands import seconds_option, timeout_seconds

NAME = "bench"
HELP = "measure: `url URL` loads any stella/OpenAI-compatible URL; `upstream` serves a fast fake one; the rest compare"


# `bench url` fails when more of a level's requests than this failed: its figures
# would describe error answers, not the service.
MAX_ERROR_SHARE = 0.01
# `bench url`'s wait for one answer: a server that takes no more (a hung one) fails the
# request, and the run still ends.
URL_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella bench`."""
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    url = sub.add_parser(
        "url",
        help="load one URL (loopback unless --allow-remote)",
        description="Load one URL at each concurrency level. req/s counts successful answers "
        "(status below 400, no in-band error); the errors column counts the rest and broken "
        f"connections. Exit 1 when more than {MAX_ERROR_SHARE:.0%} of a level's requests "
        "failed, or nothing succeeded.",
    )
    url.add_argument("url", help="e.g. http://127.0.0.1:8000/api/v1/chat")
    url.add_argument("--body", default="", help="JSON body (POST); default: a native chat on echo")
    url.add_argument("--openai", action="store_true", help="send an OpenAI chat completion body")
    url.add_argument("--stream", action="store_true", help="ask for a stream")
    url.add_argument("--model", default="echo", help="model in the default body")
    url.add_argument("--header", action="append", default=[], type=_header, help="NAME: VALUE")
    url.add_argument("--allow-remote", action="store_true", help="load a host that is not loopback")
    url.add_argument(
        "--timeout",
        type=seconds_option,
        metavar="SECONDS",
        help="seconds to wait for a connection and for each whole answer, a failure past "
        f"them (default: $STELLA_TIMEOUT, else {URL_TIMEOUT_S:g})",
    )
    dialects = sub.add_parser("dialects", help="the OpenAI dialect's cost vs the native API")
    auth = sub.add_parser("auth", help="keys and rate limits off vs in memory vs in Redis")
    auth.add_argument("-c", "--concurrency", type=_at_least_1, default=8, help="clients")
    auth.add_argument("-d", "--duration", type=_above_0, default=3.0, help="seconds per round")
    auth.add_argument(
        "--rounds", type=_at_least_1, default=3, help="each setup keeps its best round"
    )
    auth.add_argument("--json", action="store_true", help="print JSON instead of a table")
    gateway = sub.add_parser("gateway", help="upstream vs passthrough vs stella (vs LiteLLM)")
    gateway.add_argument(
        "--litellm",
        action="store_true",
        help="also LiteLLM's proxy, installed into a venv of its own "
        "($STELLA_LITELLM_VENV, default /tmp/litellm-venv)",
    )
    echo = sub.add_parser("echo", help="stella on echo vs a bare Starlette app")
    for p in (echo, dialects, gateway):
        p.add_argument(
            "--rounds", type=_at_least_1, default=2, help="each side keeps its best round"
        )
    asgi = sub.add_parser(
        "asgi", help="in-process us per request: stella's app vs the bare app, no sockets"
    )
    asgi.add_argument("-n", "--requests", type=_at_least_1, default=20_000, help="calls per round")
    asgi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for p in (url, echo, dialects, gateway):
        p.add_argument(
            "-c", "--concurrency", type=_concurrency, default="1,8,64", help="comma-separated"
        )
        p.add_argument("-d", "--duration", type=_above_0, default=5.0, help="seconds per run")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    url.add_argument(
        "-n",
        "--requests",
        type=_at_least_1,
        default=1_000_000,
        help="at most this many per concurrency level, the warm-up's included (a tenth at most)",
    )
    up = sub.add_parser(
        "upstream",
        help="serve the fast fake OpenAI-compatible upstream on loopback (Ctrl-C ends it)",
    )
    up.add_argument("--port", type=int, default=9100, help="loopback port to listen on")
    mlx = sub.add_parser("mlx", help="stella's MLX backend vs raw mlx_lm.stream_generate")
    # Decode speed is timed from the first token to the last: one token has none.
    mlx.add_argument("--tokens", type=_at_least(2), default=64, help="tokens per generation")
    mlx.add_argument("--runs", type=_at_least_1, default=3, help="generations per side")
    mlx.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _concurrency(text: str) -> tuple[int, ...]:
    """--concurrency "1,8,64" as its levels."""
    try:
        levels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("each level must be at least 1")
    return levels


def _at_least(low: int) -> Callable[[str], int]:
    """A count option's type: a whole number, `low` or more (0 rounds or requests divide by 0)."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return count


_at_least_1 = _at_least(1)


def _above_0(text: str) -> float:
    """A duration in seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _header(text: str) -> str:
    """--header "NAME: VALUE", checked."""
    name, sep, _ = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME: VALUE")
    return text


def _levels(args: argparse.Namespace) -> tuple[int, ...]:
    """The --concurrency levels."""
    return args.concurrency


def _show(args: argparse.Namespace, result: Any, table: Callable[[Any], str]) -> int:
    """Print `result` as JSON (--json) or as its markdown table."""
    import msgspec

    print(msgspec.json.encode(result).decode() if args.json else table(result))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen measurement and print it."""
    from stella.bench.loadgen import BenchError

    previous = _stop_on_signals()
    try:
        if args.what == "mlx" and not _have_mlx():
            return 1
        return _run(args)
    except BenchError as exc:  # a server answered with errors: there is nothing to compare
        print(f"stella bench: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a server (or raw mlx-lm) that did not start or failed
        print(f"stella: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the servers were stopped on the way out
        print("stella: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _have_mlx() -> bool:
    """Whether MLX and mlx-lm import; if not, say how to install them."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        print(
            f"stella: bench mlx needs MLX ({exc}): pip install 'stella-gateway[mlx]' "
            "(or '.[mlx]' in a checkout)",
            file=sys.stderr,
        )
        return False
    return True


def _one_line(text: str, limit: int = 400) -> str:
    """`text` on one line; when long, its start and its end (where a traceback's error is)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else f"{flat[:100]} ... {flat[-(limit - 105) :]}"


def _stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP unwind the bench as Ctrl-C does, so its servers and files go too."""

    from stella.bench import servers

    servers.stop_requested = 0

    def stop(signum: int, frame: object) -> None:
        # A second signal must not cut the cleanup (servers stopped, temp files removed) short.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        servers.stop_requested = signum  # raised again at the next step, should this be lost
        raise SystemExit(128 + signum)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, stop)
    return previous


def _serve_upstream(port: int) -> int:
    """Serve the fake upstream until a signal; Ctrl-C is KeyboardInterrupt (exit 130)."""
    import uvicorn

    class Server(uvicorn.Server):
        interrupted = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.interrupted = self.interrupted or sig == signal.SIGINT
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        "stella.bench.upstream:app",
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )
    server = Server(config)
    server.run()
    # uvicorn shuts down on Ctrl-C and returns (the SIGINT it raises again lands in
    # asyncio.run's handler, which has nothing left to cancel): the exit is 0 unless
    # said here, where every other command exits 130.
    if server.interrupted:
        raise KeyboardInterrupt
    return 0


def _run(args: argparse.Namespace) -> int:
    import msgspec

    if args.what == "echo":
        from stella.bench.echo import compare, table

        return _show(args, compare(_levels(args), args.duration, rounds=args.rounds), table)
    if args.what == "asgi":
        from stella.bench.asgi import compare as compare_asgi
        from stella.bench.asgi import table as asgi_table

        return _show(args, compare_asgi(args.requests), asgi_table)
    if args.what == "gateway":
        from stella.bench.compare import compare as compare_gw
        from stella.bench.compare import table as gw_table

        report = compare_gw(_levels(args), args.duration, litellm=args.litellm, rounds=args.rounds)
        return _show(args, report, gw_table)
    if args.what == "auth":
        from stella.bench.auth import compare as compare_auth
        from stella.bench.auth import table as auth_table

        return _show(args, compare_auth(args.concurrency, args.duration, args.rounds), auth_table)
    if args.what == "dialects":
        from stella.bench.echo import compare_dialects, dialect_table

        rows = compare_dialects(_levels(args), args.duration, rounds=args.rounds)
        return _show(args, rows, dialect_table)
    if args.what == "upstream":
        # As serve refuses server.port: uvicorn took 99999 and listened on 34463 (99999
        # mod 65536), after this line had announced 99999 (and 0 listens on a port the
        # line does not name).
        if not 0 < args.port < 65536:
            print(f"stella: --port: {args.port} is not a TCP port (1-65535)", file=sys.stderr)
            return 2
        print(f"stella: fake OpenAI upstream on http://127.0.0.1:{args.port}/v1", file=sys.stderr)
        return _serve_upstream(args.port)
    if args.what == "mlx":
        from stella.bench.mlx import compare as compare_mlx
        from stella.bench.mlx import table as mlx_table

        return _show(args, compare_mlx(tokens=args.tokens, runs=args.runs), mlx_table)
    import asyncio  # here, not at the top: every command's start-up imports this module

    from stella.bench.loadgen import run_load

    if args.body:
        body = args.body.encode()
    else:
        payload: dict = {
            "model": args.model,
            "stream": args.stream,
            "messages": [{"role": "user", "content": "hello there, how are you"}],
        }
        if args.openai and args.stream:
            payload["stream_options"] = {"include_usage": True}
        body = json.dumps(payload).encode()
    headers = dict(h.split(":", 1) for h in args.header)
    answer_timeout_s = timeout_seconds(args.timeout, URL_TIMEOUT_S)
    if answer_timeout_s is None:
        return 2
    results = []
    for c in _levels(args):
        try:
            results.append(
                asyncio.run(
                    run_load(
                        args.url,
                        body,
                        concurrency=c,
                        duration=args.duration,
                        max_requests=args.requests,
                        headers={k.strip(): v.strip() for k, v in headers.items()},
                        allow_remote=args.allow_remote,
                        answer_timeout_s=answer_timeout_s,
                    )
                )
            )
        except ValueError as exc:  # a bad URL or a remote one without --allow-remote
            print(f"stella: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # nothing listening, name not found
            print(f"stella: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(msgspec.json.encode(results).decode())
    else:
        print("| c | req/s | p50 ms | p90 ms | p99 ms | ttfb p50 ms | tokens/s | errors |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            print(
                f"| {r.concurrency} | {r.rps:,.0f} | {r.p50_ms} | {r.p90_ms} | {r.p99_ms} | "
                f"{r.ttfb_p50_ms} | {r.tokens_per_s:,.0f} | {r.errors} |"
            )
    sys.stdout.flush()  # the table before a verdict on stderr, which may be the same file
    if not any(r.succeeded for r in results):
        first = next((r.first_error for r in results if r.first_error), "")
        why = f"; the first failure: {first}" if first else ""
        print(f"stella: no request to {args.url} succeeded{why}", file=sys.stderr)
        return 1
    for r in results:
        if r.errors > MAX_ERROR_SHARE * (r.errors + r.succeeded):
            print(
                f"stella: {r.errors} of {r.errors + r.succeeded} requests to {args.url} failed "
                f"at concurrency {r.concurrency} (more than {MAX_ERROR_SHARE:.0%}); "
                f"the first failure: {r.first_error}",
                file=sys.stderr,
            )
            return 1
    return 0
