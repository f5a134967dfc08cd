"""`stella serve`: run the gateway under uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # uvicorn loads with `serve` alone: every command's start-up builds this module
    import socket

    import uvicorn

NAME = "serve"
HELP = "run the gateway on uvicorn (server.workers processes; PORT and STELLA_* configure it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella serve`."""
    parser.add_argument("--host", help="bind address (default: server.host)")
    parser.add_argument("--port", type=int, help="port (default: PORT or server.port)")
    parser.add_argument("--config", help="a TOML file overlaid on the defaults (STELLA_CONFIG)")
    parser.add_argument("--model", help="default model (models.default)")
    parser.add_argument("--log-format", choices=["json", "console"], help="log.format")
    parser.add_argument(
        "--workers", type=int, help="worker processes on one port (default: server.workers)"
    )
    parser.add_argument("--reload", action="store_true", help="restart on code changes (dev)")


def run(args: argparse.Namespace) -> int:
    """Load the configuration, build the app, serve until SIGTERM (2: bad config; 3: cannot listen)."""
    import msgspec
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from stella.app import create_app
    from stella.backends import ConfigError
    from stella.commands import use_config_file
    from stella.commands.listen import CannotListen, bind, check_host
    from stella.settings import blamed, load_settings, set_by_user

    if not use_config_file(args.config):
        return 2
    # An empty flag (`--host=`) is a value to check, not an absent one: it goes on to be
    # refused as the same empty variable is, rather than silently leave the default.
    overrides: dict = {}
    if args.host is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if args.model is not None:
        overrides.setdefault("models", {})["default"] = args.model
    if args.workers is not None:
        overrides.setdefault("server", {})["workers"] = args.workers
    if args.log_format:
        overrides.setdefault("log", {})["format"] = args.log_format
    try:
        settings = load_settings(overrides)
        check_host(settings.server.host)
        # A terminal reads the console format better, unless the file or env chose one
        # (known once the files are read: a config given as a pipe is read once).
        if not args.log_format and sys.stdout.isatty() and not set_by_user("log.format"):
            overrides.setdefault("log", {})["format"] = "console"
            settings = msgspec.structs.replace(
                settings, log=msgspec.structs.replace(settings.log, format="console")
            )
        app = create_app(settings)
        _say_overridden(overrides)
    except ConfigError as exc:
        print(f"stella: config error: {blamed(exc, overrides)}", file=sys.stderr)
        return 2
    server_cfg = settings.server
    options: dict[str, Any] = dict(
        http=_http_protocol(server_cfg.coalesce_writes),
        host=server_cfg.host,
        port=server_cfg.port,
        lifespan="on",
        access_log=False,
        # stella has no WebSocket route: an upgrade is an HTTP request like any other,
        # answered by stella (not by the websockets library, in plain text).
        ws="none",
        log_level="warning",
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=int(server_cfg.drain_timeout_s) + 5,
    )
    workers = 1 if args.reload else server_cfg.workers
    _set_blas_threads(workers)
    announce = announcement(settings, workers, args.reload)
    if workers > 1 or args.reload:
        extra = os.environ.get("STELLA_CONFIG", "")
        if extra and not os.path.isfile(extra):
            # Each worker reads the file again: a pipe (--config <(...)) is empty by then.
            print(
                f"stella: config error: config file {extra}: not a regular file; with "
                "--workers or --reload each worker reads it again: write it to a file",
                file=sys.stderr,
            )
            return 2
    try:
        # Bound first: a port in use ends here, before any "serving on" or a model load.
        sock = bind(server_cfg.host, server_cfg.port, overrides)
    except CannotListen as exc:
        print(f"stella: {exc}", file=sys.stderr)
        return STARTUP_FAILURE  # 3, as a worker's failed start under --workers
    if args.reload and server_cfg.workers != 1:
        # The reloader runs one process: its app must not take server.workers for the
        # count of processes sharing its port (see native._shared_routing).
        overrides.setdefault("server", {})["workers"] = 1
    if workers > 1 or args.reload:
        return _supervise(settings, overrides, options, workers, args.reload, announce, sock)
    config = uvicorn.Config(app, **options)
    print(announce, file=sys.stderr, flush=True)
    server = _server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _say_overridden(flags: dict[str, Any]) -> None:
    """One `config_overridden` warning when environment variables replace values the
    $STELLA_CONFIG file sets (and no flag replaced both): the file's values look in
    force, and are not."""
    import structlog

    from stella.settings import env_over_file

    path, over = env_over_file(overrides=flags)
    if over:
        structlog.get_logger("stella").warning(
            "config_overridden",
            file=path,
            overrides=over,
            detail="environment variables win over the config file: unset them, or change "
            "these keys through them",
        )


def announcement(settings: Any, workers: int, reload: bool) -> str:
    """The line `serve` prints once it listens."""
    server_cfg = settings.server
    # With Redis the default an admin switched to is stored there, read once serving.
    stored = " unless Redis holds another" if settings.state.redis_url else ""
    return (
        f"stella: serving on {serving_url(server_cfg.host, server_cfg.port)} "
        f"(default model: {settings.models.default}{stored}"
        + (f", {workers} workers" if workers > 1 else "")
        + (", reloading on changes" if reload else "")
        + ")"
    )


def serving_url(host: str, port: int) -> str:
    """The URL a server bound to host:port answers on (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _set_blas_threads(workers: int) -> None:
    """Set each worker's OpenBLAS threads (its share of the CPUs, less one) in the
    environment, unless a variable sets them."""
    from stella.backends.mlx.blas import default_threads, threads_set

    # Each worker process would count every CPU: workers answering at once would run
    # workers x CPUs threads on the CPUs, each slower than one alone. Set here, before
    # the server and the model load start (only the log and MLX threads, idle, run
    # yet), rather than by the engine while requests are served: setenv while another
    # thread reads the environment is unsafe in C. A pthread build reads
    # OPENBLAS_NUM_THREADS, an OpenMP one OMP_NUM_THREADS.
    if not threads_set():
        share = str(default_threads(workers))
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = share


def _supervise(
    settings: Any,
    overrides: dict[str, Any],
    options: dict[str, Any],
    workers: int,
    reload: bool,
    announce: str,
    sock: socket.socket,
) -> int:
    """Several worker processes on one socket (or one that restarts on code changes).

    Each worker builds its own app from the environment, so the command line's
    overrides travel there in one variable (stella.commands.workers). The exit code:
    0, or that of a worker that could not start (2: its configuration was bad).
    """
    import uvicorn
    from uvicorn.supervisors import ChangeReload

    from stella import logs
    from stella.commands.workers import Workers, pass_flags

    pass_flags(overrides)
    if reload:  # stella's own code, wherever it is installed, not the working directory
        options["reload_dirs"] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    config = uvicorn.Config(
        "stella.commands.workers:worker_app",
        factory=True,
        workers=workers,
        reload=reload,
        **options,
    )
    print(announce, file=sys.stderr, flush=True)
    if workers > 1:
        print(
            "stella: warning: with in-memory state each worker keeps its own rate limits "
            "and usage, and runtime routing changes (POST /api/v1/models, switch, DELETE) "
            "are refused; set state.redis_url to share them; /metrics counts per worker"
            if not settings.state.redis_url
            else "stella: note: /metrics counts per worker (a scrape reaches one of them)",
            file=sys.stderr,
            flush=True,
        )
    code = 0
    if reload:
        ChangeReload(config, target=_server(config).run, sockets=[sock]).run()
    else:
        supervisor = Workers(config, sockets=[sock])
        supervisor.run()
        code = supervisor.exit_code
    if (sink := logs.sink()) is not None:
        sink.flush()  # the supervisor's own lines (worker_died)
    return code


def _http_protocol(coalesce: bool) -> Any:
    """stella's httptools protocol (corked unless turned off), or uvicorn's choice when
    httptools is unavailable."""
    try:
        from stella.transport import BodyDeadlineProtocol, HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn falls back to h11
        return "auto"
    return HttpToolsProtocol if coalesce else BodyDeadlineProtocol


def _server(config: uvicorn.Config) -> uvicorn.Server:
    """stella's uvicorn server (its module loads uvicorn, which `serve` alone needs)."""
    from stella.commands.uvicorn_server import Server

    return Server(config)
