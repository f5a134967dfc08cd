"""`stella serve`: run the gateway under uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

NAME = "serve"
HELP = "run the gateway (uvicorn, one process; PORT and STELLA_* configure it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella serve`."""
    parser.add_argument("--host", help="bind address (default: server.host)")
    parser.add_argument("--port", type=int, help="port (default: PORT or server.port)")
    parser.add_argument("--config", help="a TOML file overlaid on the defaults (STELLA_CONFIG)")
    parser.add_argument("--model", help="default model (models.default)")
    parser.add_argument("--log-format", choices=["json", "console"], help="log.format")
    parser.add_argument("--reload", action="store_true", help="restart on code changes (dev)")


def run(args: argparse.Namespace) -> int:
    """Load the configuration, build the app, serve until SIGTERM; exit 2 on bad config."""
    import os

    from stella.app import create_app
    from stella.backends import ConfigError
    from stella.settings import load_settings

    if args.config:
        os.environ["STELLA_CONFIG"] = args.config
    overrides: dict = {}
    if args.host:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port:
        overrides.setdefault("server", {})["port"] = args.port
    if args.model:
        overrides.setdefault("models", {})["default"] = args.model
    if args.log_format:
        overrides.setdefault("log", {})["format"] = args.log_format
    elif sys.stdout.isatty() and "STELLA_LOG__FORMAT" not in os.environ:
        overrides.setdefault("log", {})["format"] = "console"
    try:
        settings = load_settings(overrides)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"stella: config error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        http=_http_protocol(settings.server.coalesce_writes),
        host=settings.server.host,
        port=settings.server.port,
        lifespan="on",
        access_log=False,
        log_level="warning",
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=int(settings.server.drain_timeout_s) + 5,
    )
    server = Server(config)
    print(
        f"stella: serving on http://{settings.server.host}:{settings.server.port} "
        f"(default model: {settings.models.default})",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    return 0 if server.started else 1


def _http_protocol(coalesce: bool) -> Any:
    """stella's corked httptools protocol, or uvicorn's choice when off or unavailable."""
    if coalesce:
        try:
            from stella.transport import HttpToolsProtocol
        except ImportError:  # httptools missing: uvicorn falls back to h11
            return "auto"
        return HttpToolsProtocol
    return "auto"


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM ends in exit 0 after the drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM without re-raising them after shutdown."""
        # uvicorn re-raises the signal once it has shut down (exit 143); a gateway
        # that drained its streams has finished its work and exits 0.
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
