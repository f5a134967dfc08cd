"""Shared fixtures: a live stella on loopback for the tests that talk HTTP."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import ssl
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx._transports.default as httpx_transports
import pytest

from stella.backends.mlx.blas import use_blas
from tests.live import LiveServer, run_stella

# The tests that run the MLX engine in this process (not in a server) get the CBLAS a
# server's engine loads: it must be loaded before anything imports MLX.
use_blas("auto")

# A suite started with SIGINT ignored (a background job of a shell without job control)
# would hand that to every command it starts, and Python keeps ignoring SIGINT for good
# when it starts so: the Ctrl-C tests' children would never see theirs. Handled here, it
# is default again in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Where Python is told not to write bytecode (PYTHONDONTWRITEBYTECODE, as some containers
# set), each of the hundreds of stella processes the suite starts would compile stella and
# its dependencies from source again (~0.1-0.2 s of CPU each). This worker's share a
# private bytecode cache instead, outside the source tree (which stays as its owner wants
# it), removed at exit.
if "PYTHONPYCACHEPREFIX" not in os.environ and os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
    os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="stella-pycache-")
    atexit.register(shutil.rmtree, os.environ["PYTHONPYCACHEPREFIX"], ignore_errors=True)

# httpx builds a new SSL context for every client, and every module-level httpx.get is
# one: loading certifi's ~150 certificates each time costs ~55 ms of CPU, and the suite
# makes thousands of them, nearly all to plain-HTTP servers on loopback (a third of some
# files' time). Here the default context is built once per trust setting and shared, as
# httpx's docs advise a program to do (`verify=ctx`); a context asked for explicitly is
# built as before.
_ssl_contexts: dict[tuple[bool, str | None, str | None], ssl.SSLContext] = {}
_build_ssl_context = httpx_transports.create_ssl_context


def _shared_ssl_context(
    verify: ssl.SSLContext | str | bool = True, cert: Any = None, trust_env: bool = True
) -> ssl.SSLContext:
    """httpx's default SSL context, built once per trust setting (see above)."""
    if verify is not True or cert is not None:
        return _build_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    key = (trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    if key not in _ssl_contexts:
        _ssl_contexts[key] = _build_ssl_context(verify=True, trust_env=trust_env)
    return _ssl_contexts[key]


httpx_transports.create_ssl_context = _shared_ssl_context

# Routes every foundation test may use: a plain echo plus echo with each failure knob.
ECHO_ROUTES = {
    "backends": {
        "slow": {"kind": "echo", "delay_s": 0.05},
        "failfirst": {"kind": "echo", "fail_before_first": True},
        "failafter": {"kind": "echo", "fail_after": 3},
        "stall": {"kind": "echo", "stall_after": 2},
        "stallfirst": {"kind": "echo", "stall_after": 0},
        "overloaded": {"kind": "echo", "fail_after": 0, "error_code": "overloaded"},
    },
    "models": {
        "routes": {
            "echo-slow": {"backend": "slow"},
            "echo-fail": {"backend": "failfirst", "retries": 1, "retry_backoff_s": 0.01},
            "echo-fail-fallback": {
                "backend": "failfirst",
                "retries": 0,
                "fallbacks": ["echo"],
            },
            "echo-fail-after": {"backend": "failafter"},
            "echo-stall": {"backend": "stall", "idle_timeout_s": 0.5},
            "echo-slow-total": {"backend": "slow", "total_timeout_s": 0.4},
            "echo-stall-first": {"backend": "stallfirst", "ttft_timeout_s": 0.5, "retries": 0},
            "echo-overloaded": {"backend": "overloaded", "retries": 0},
        }
    },
    "stream": {"ping_interval_s": 0.2},
    # Failures are on purpose here; breakers have their own tests.
    "breaker": {"failure_threshold": 0},
}


@pytest.fixture(scope="session")
def stella() -> Iterator[LiveServer]:
    """One shared stella with the echo test routes (no keys: anonymous on loopback)."""
    with run_stella(ECHO_ROUTES) as server:
        yield server


# The files that take longest on CI's two cores (seconds of test time, measured), heaviest
# first: handed out first, the two workers finish together instead of one of them running
# a long file alone at the end. Ordering only; a file not listed follows them, the files
# with more tests first (xdist's own order).
HEAVY_FILES = (
    "test_mlx.py",  # 183
    "test_redis.py",  # 137
    "test_cli.py",  # 80
    "test_client.py",  # 75
    "test_limits.py",  # 74
    "test_browser.py",  # 68
    "test_reliability.py",  # 54
    "test_settings.py",  # 52
    "test_transport.py",  # 50
    "test_deploy.py",  # 45
    "test_backend_openai.py",  # 43
    "test_bench.py",  # 37
    "test_resilience.py",  # 35
    "test_backend_ollama.py",  # 33
    "test_logs.py",  # 32
    "test_dialect_anthropic.py",  # 28
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the files heaviest first (see HEAVY_FILES); a file's tests keep their order."""
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    per_file: dict[str, int] = {}
    for item in items:
        per_file[str(item.path)] = per_file.get(str(item.path), 0) + 1

    def weight(item: pytest.Item) -> tuple[int, int, str]:
        path = str(item.path)
        return (rank.get(item.path.name, len(rank)), -per_file[path], path)

    items.sort(key=weight)  # stable: each file's own order stays
