"""`stella config`: print the effective configuration (secrets redacted), or check it."""

from __future__ import annotations

import argparse
import json
import os
import sys

NAME = "config"
HELP = (
    "print the effective configuration with secrets redacted, exit 2 when stella serve "
    "would refuse it (--check: validate only, and exit 2 too for a model a route needs "
    "that cannot load)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella config`."""
    parser.add_argument("--config", help="a TOML file overlaid on the defaults (STELLA_CONFIG)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only validate; exit 2 on error (0 with warnings, such as a key variable unset)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the configuration as decoded from the file and environment, after building
    the backends and keys as `stella serve` would (a bad backend table is exit 2, not a
    table printed as it was written) and checking the audit file; --check prints nothing."""
    from stella.backends import ConfigError
    from stella.commands import use_config_file
    from stella.commands.listen import check_host
    from stella.settings import (
        blamed,
        enabled_backends,
        env_over_file,
        load_settings,
        redacted,
    )

    if not use_config_file(args.config):
        return 2
    try:
        settings = load_settings()
        check_host(settings.server.host)  # one serve could not listen on
        from stella import logs
        from stella.app import Services, check_audit_path

        # What building them warns of goes to stderr: stdout is the JSON alone.
        sink = logs.configure(fmt="console", stream=sys.stderr.buffer)
        services = Services(settings)  # builds backends and keys: what the file can't tell
        # Its warnings are written by a thread: written before the lines printed below,
        # not in the middle of one.
        sink.flush()
        # serve refuses an audit file it cannot append to; plain `config` too, as its
        # help says. The check leaves nothing behind.
        check_audit_path(settings, create=False)
    except ConfigError as exc:
        print(f"stella: config error: {blamed(exc)}", file=sys.stderr)
        return 2
    # Values the config file sets that the environment replaces: easily missed (an
    # image's ENV, a platform's variables), and the file then looks in force.
    path, found = env_over_file()
    for variable, keys in found.items():
        print(
            f"stella: note: {variable} overrides {', '.join(keys)} set in {path} "
            "(the environment wins over the config file)",
            file=sys.stderr,
        )
    if args.check:
        # A model a route needs that could not load (the engine missing, its file not
        # there): serve would start, and answer that route with errors only.
        problems: dict[str, list[str]] = {}
        for name, route in settings.models.routes.items():
            for backend_name in (route.backend, *route.balance):
                backend = services.backends.get(backend_name)
                if backend is not None and (
                    problem := backend.preflight(route.upstream_model or name)
                ):
                    problems.setdefault(problem, []).append(name)
        for problem, routes in problems.items():
            print(
                f"stella: config error: {problem} (routes using it: {', '.join(routes)})",
                file=sys.stderr,
            )
        if problems:
            return 2
        # What start-up only warns of (backend_key_missing): a warning here too, and still
        # exit 0, as the server still starts (those requests go without a key).
        for name, table in enabled_backends(settings).items():
            key_env = table.get("api_key_env")
            if isinstance(key_env, str) and key_env and not os.environ.get(key_env):
                print(
                    f"stella: warning: backends.{name}.api_key_env: {key_env} is not set; "
                    "requests to this backend go without a key",
                    file=sys.stderr,
                )
        print("stella: configuration ok", file=sys.stderr)
        return 0
    print(json.dumps(redacted(settings), indent=2))
    return 0
