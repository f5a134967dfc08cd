"""The cost of keys and rate limits: the same stella on echo with them off, in memory, in Redis."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from stella.bench.echo import _body, measure
from stella.bench.loadgen import BenchError, Result, have_wrk, require_clean
from stella.bench.servers import die_with_parent, end, free_port, sample, spawn, stella_args

KEY = "sk-bench-auth-key"


class AuthRow(msgspec.Struct):
    """One configuration under the same load."""

    setup: str
    result: Result
    cost_vs_off: float  # time per request relative to auth and limits off


class AuthReport(msgspec.Struct):
    """The rows measured, and what was left out and why."""

    rows: list[AuthRow]
    notes: list[str]


NO_REDIS = "redis-server is not on PATH: the Redis setup was left out"
NO_REDIS_PY = (
    "Redis support is not installed (pip install 'stella-gateway[redis]'): "
    "the Redis setup was left out"
)


def _redis_missing() -> str | None:
    """Why the Redis setup cannot run here, or None when it can."""
    try:
        import redis.asyncio  # noqa: F401  # stella's Redis state needs it in the servers
    except ImportError:
        return NO_REDIS_PY
    return None if shutil.which("redis-server") else NO_REDIS


def _pong(port: int) -> bool:
    """Whether a Redis on the loopback port answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def _redis(timeout: float = 10.0) -> Iterator[str | None]:
    """A throwaway redis-server's URL once it answers PING; None when there is none on PATH."""
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        try:
            # A Redis row measured against no Redis would time stella's fallback, not Redis.
            deadline = time.monotonic() + timeout
            while not _pong(port):
                if proc.poll() is not None:
                    log.seek(0)
                    why = " ".join(log.read().decode(errors="replace").split())[-300:]
                    raise BenchError(f"redis-server exited ({proc.returncode}): {why}")
                if time.monotonic() > deadline:
                    raise BenchError(f"redis-server did not answer PING on port {port}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            end(proc, 10)


def compare(concurrency: int = 8, duration: float = 3.0, rounds: int = 3) -> AuthReport:
    """Off vs memory limits vs Redis limits: all three servers up at once, measured in
    turn for `rounds` rounds; each setup keeps its best round (noise only slows)."""
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stella-bench-auth-") as tmp:
        rows = _compare(Path(tmp), concurrency, duration, rounds, notes)
    return AuthReport(rows, notes)


def _compare(
    tmp: Path, concurrency: int, duration: float, rounds: int, notes: list[str]
) -> list[AuthRow]:
    wrk = have_wrk()
    headers = {"Authorization": f"Bearer {KEY}"}
    base = '[models]\ndefault = "echo"\n[backends.local]\nenabled = false\n'
    limits = "[limits]\nrequests_per_minute = 100000000\ntokens_per_minute = 1000000000\n"
    body = _body(False)
    missing = _redis_missing()
    redis = contextlib.nullcontext() if missing else _redis()
    with redis as redis_url, contextlib.ExitStack() as stack:
        setups = [
            ("off", base, {}),
            ("keys + limits in memory", base + limits, {"STELLA_API_KEYS": KEY}),
        ]
        if redis_url is None:
            notes.append(missing or NO_REDIS)
        else:
            setups.append(
                (
                    "keys + limits in Redis",
                    base + limits + f'[state]\nredis_url = "{redis_url}"\n',
                    {"STELLA_API_KEYS": KEY},
                )
            )
        urls = []
        for i, (_, conf_text, env) in enumerate(setups):
            conf = tmp / f"{i}.toml"
            conf.write_text(conf_text)
            port = free_port()
            server = stack.enter_context(
                spawn(stella_args(port), port=port, cpu=0, env={"STELLA_CONFIG": str(conf), **env})
            )
            sample(server.url + "/api/v1/chat", body, headers)  # a 200, or nothing to compare
            urls.append(server.url)
        best: list[Result | None] = [None] * len(setups)
        for _ in range(rounds):
            for i, (name, _, _) in enumerate(setups):
                r = measure(
                    urls[i],
                    body,
                    name,
                    concurrency,
                    duration,
                    wrk,
                    1,
                    headers=headers,
                )
                require_clean(r, "non-stream", name)
                prev = best[i]
                if prev is None or r.rps > prev.rps:
                    best[i] = r
    results = [r for r in best if r is not None]
    off = results[0].rps
    return [
        AuthRow(name, r, round(off / r.rps, 3) if r.rps else 0.0)
        for (name, _, _), r in zip(setups, results, strict=True)
    ]


def table(report: AuthReport) -> str:
    """Markdown table, then the notes."""
    out = [
        "| setup | req/s | p50 ms | p99 ms | time per request vs off |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report.rows:
        out.append(
            f"| {r.setup} | {r.result.rps:,.0f} | {r.result.p50_ms:.2f} | "
            f"{r.result.p99_ms:.2f} | {r.cost_vs_off:.2f}x |"
        )
    notes = [f"- {n}" for n in report.notes]
    return "\n".join([*out, "", *notes] if notes else out)
