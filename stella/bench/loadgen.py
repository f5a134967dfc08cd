"""A small HTTP/1.1 load generator on raw asyncio streams (keep-alive, chunked bodies).

Bounded by duration and by request count; refuses targets off this machine
unless told otherwise. It measures latency, time to first byte, and tokens per
second: for streams the stream lines that carry text, in any dialect stella speaks;
for whole JSON answers the generated tokens their usage reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec


class Result(msgspec.Struct):
    """What one load run measured."""

    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    tokens_per_s: float = 0.0
    tool: str = "stella-loadgen"
    # Answers with a status below 400 (`requests` counts every answer, `errors` the
    # answers of 400 and up and the connections that broke).
    succeeded: int = 0
    # The server's CPU time per request during the run (microseconds; Linux), when known.
    cpu_us: float | None = None


class BenchError(RuntimeError):
    """A comparison that cannot stand: a server answered with errors."""


def require_clean(result: Result, mode: str, server: str = "") -> Result:
    """`result` when it measured requests and none of them failed; else a BenchError
    naming the server."""
    if result.errors or not result.requests:
        raise BenchError(
            f"{server or result.name}: {result.errors} errors in {result.requests} requests "
            f"({mode}, concurrency {result.concurrency}); nothing was compared"
        )
    return result


# How a stream that began says it failed (status 200 already sent): a native `error`
# line, an OpenAI or Ollama error object, Anthropic's error event.
INBAND_ERRORS = (b'"type":"error"', b'{"error":', b"event: error")


def inband_error(data: bytes) -> bool:
    """Whether a stream's bytes hold an error sent after its start."""
    return any(marker in data for marker in INBAND_ERRORS)


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the calling thread on `cpu` alone for the block (Linux; elsewhere a no-op)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class _Stats:
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: int = 0
    succeeded: int = 0
    tokens: int = 0
    sent: int = 0


def is_local(host: str) -> bool:
    """Whether `host` resolves only to loopback addresses."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, nearest rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def text_lines(data: bytes) -> int:
    """Stream lines in `data` that carry text: native and OpenAI deltas, Ollama and
    Anthropic text (empty contents, roles and terminal lines do not count)."""
    return (
        data.count(b'"type":"delta"')
        + data.count(b'"text_delta"')
        + data.count(b'"content":"')
        - data.count(b'"content":""')
        + data.count(b'"response":"')
        - data.count(b'"response":""')
    )


# Where a whole (non-stream) answer counts the tokens it generated: the native and
# OpenAI `usage.completion_tokens`, Anthropic's `usage.output_tokens`, Ollama's
# `eval_count`.
USAGE_KEYS = (b'"completion_tokens":', b'"output_tokens":', b'"eval_count":')


def usage_tokens(body: bytes) -> int:
    """The generated tokens a whole JSON answer's usage reports (0 when it has none)."""
    for key in USAGE_KEYS:
        at = body.find(key)
        if at >= 0:
            digits = body[at + len(key) : at + len(key) + 24].lstrip()
            end = 0
            while end < len(digits) and 48 <= digits[end] <= 57:  # b"0"..b"9"
                end += 1
            return int(digits[:end]) if end else 0
    return 0


async def _read_response(reader: asyncio.StreamReader, t0: float, st: _Stats) -> None:
    status = await reader.readline()
    if not status:
        raise ConnectionError("closed")
    code = int(status.split(b" ", 2)[1])
    length = -1
    chunked = False
    whole = False  # a JSON answer (not a stream): its tokens are in its usage
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"content-type":
            whole = value.strip().lower().startswith(b"application/json")
    first = True
    failed = False
    if chunked:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if first:
                st.ttfb.append(time.perf_counter() - t0)
                first = False
            if whole:
                parts.append(data[:-2])
            else:
                st.tokens += text_lines(data)
            failed = failed or inband_error(data)
        if whole and code < 400:
            st.tokens += usage_tokens(b"".join(parts))
    else:
        data = await reader.readexactly(length) if length > 0 else b""
        st.ttfb.append(time.perf_counter() - t0)
        if whole and code < 400:
            st.tokens += usage_tokens(data)
    if code >= 400 or failed:
        st.errors += 1
    else:
        st.succeeded += 1


async def _worker(
    host: str, port: int, request: bytes, deadline: float, budget: list[int], st: _Stats
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            st.sent += 1
            t0 = time.perf_counter()
            writer.write(request)
            try:
                await _read_response(reader, t0, st)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                st.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            st.latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def run_load(
    url: str,
    body: bytes | None,
    *,
    name: str = "",
    concurrency: int = 8,
    duration: float = 5.0,
    max_requests: int = 1_000_000,
    headers: dict[str, str] | None = None,
    warmup: float = 0.5,
    allow_remote: bool = False,
    on_measure: Callable[[], None] | None = None,
) -> Result:
    """Keep `concurrency` connections busy for `duration` seconds (or `max_requests`, the
    warm-up's included: it takes at most a tenth of them); `on_measure` is called when
    the warm-up is over."""
    parts = urlsplit(url)
    # Plain HTTP only: an https:// URL would be sent in clear text to its TLS port.
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: not an http:// URL (https and URLs without one are not loaded)")
    host, port = parts.hostname, parts.port or 80
    if not allow_remote and not is_local(host):
        raise ValueError(f"{host} is not a loopback address; pass --allow-remote to load it")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    if warmup and max_requests >= 10:
        warm, _ = await _phase(host, port, request, concurrency, warmup, max_requests // 10)
        max_requests -= warm.sent
    if on_measure is not None:
        on_measure()
    st, seconds = await _phase(host, port, request, concurrency, duration, max_requests)
    ms = [x * 1000 for x in st.latencies]
    return Result(
        name=name or url,
        concurrency=concurrency,
        requests=len(ms),
        errors=st.errors,
        seconds=round(seconds, 3),
        # Answers per second that were answers: a server failing fast must not look fast.
        rps=round(st.succeeded / seconds, 1) if seconds else 0.0,
        p50_ms=round(percentile(ms, 50), 3),
        p90_ms=round(percentile(ms, 90), 3),
        p99_ms=round(percentile(ms, 99), 3),
        ttfb_p50_ms=round(percentile([x * 1000 for x in st.ttfb], 50), 3),
        tokens_per_s=round(st.tokens / seconds, 1) if seconds else 0.0,
        succeeded=st.succeeded,
    )


async def _phase(
    host: str, port: int, request: bytes, concurrency: int, duration: float, max_requests: int
) -> tuple[_Stats, float]:
    st = _Stats()
    budget = [max_requests]
    t0 = time.perf_counter()
    deadline = t0 + duration
    await asyncio.gather(
        *(_worker(host, port, request, deadline, budget, st) for _ in range(concurrency))
    )
    return st, time.perf_counter() - t0


WRK_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""
# For streams: a 200 whose body holds an in-band error is counted, and reported by done().
WRK_INBAND_LUA = """
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) inband = 0 end
function response(status, headers, body)
  if status < 300 and body and ({checks}) then inband = inband + 1 end
end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + (t:get("inband") or 0) end
  io.write(string.format("In-band errors: %d\\n", n))
end
"""


def have_wrk() -> bool:
    """Whether the wrk binary is on PATH."""
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: bytes | None,
    *,
    name: str = "",
    concurrency: int = 8,
    duration: float = 5.0,
    cpu: int | None = None,
    headers: dict[str, str] | None = None,
) -> Result:
    """The same measurement with wrk (C, so the client is never the bottleneck)."""
    import json
    import tempfile

    host = urlsplit(url).hostname or ""
    if not is_local(host):
        raise ValueError(f"{host} is not a loopback address")
    seconds = max(1, round(duration))
    # wrk counts an answer slower than its timeout (2 s by default) as an error; a slow
    # gateway under load is slow, not broken, so the limit lies past the run's end.
    args = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", f"--timeout={seconds + 10}s"]
    args.append("--latency")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        if body is not None:
            fh.write(WRK_LUA.format(body=json.dumps(body.decode())))
            if (json.loads(body) or {}).get("stream"):
                checks = " or ".join(
                    f"body:find({json.dumps(m.decode())}, 1, true)" for m in INBAND_ERRORS
                )
                fh.write(WRK_INBAND_LUA.format(checks=checks))
        for k, v in (headers or {}).items():
            fh.write(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n")
        script = fh.name
    args += ["-s", script, url]
    if cpu is not None:
        args = ["taskset", "-c", str(cpu), *args]
    try:
        from stella.bench.servers import die_with_parent

        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            preexec_fn=die_with_parent,
        )
    finally:
        os.unlink(script)
    if done.returncode or "requests in" not in done.stdout:
        why = " ".join((done.stderr or done.stdout).split())[:200]
        raise BenchError(f"wrk could not measure {url} (exit {done.returncode}): {why}")
    return parse_wrk(done.stdout, name or url, concurrency, duration)


def parse_wrk(out: str, name: str, concurrency: int, duration: float) -> Result:
    """The Result of a `wrk --latency` report."""
    total = 0
    non_2xx = 0
    socket_errors = 0
    inband = 0
    for line in out.splitlines():
        if "requests in" in line:
            total = int(line.split()[0])
        elif "Non-2xx" in line:
            non_2xx = int(line.split()[-1])
        elif line.startswith("In-band errors:"):
            inband = int(line.split()[-1])
        elif "Socket errors:" in line:
            # "Socket errors: connect 0, read 1, write 0, timeout 2": connections that
            # broke or answers that never came, none of them in `total`.
            counts = line.split(":", 1)[1].replace(",", " ").split()
            socket_errors = sum(int(n) for n in counts[1::2])
    return Result(
        name=name,
        concurrency=concurrency,
        requests=total,
        errors=non_2xx + socket_errors + inband,
        seconds=duration,
        rps=float(_after(out, "Requests/sec:") or 0),
        p50_ms=_latency(out, "50%"),
        p90_ms=_latency(out, "90%"),
        p99_ms=_latency(out, "99%"),
        ttfb_p50_ms=0.0,
        tool="wrk",
        succeeded=max(0, total - non_2xx - inband),
    )


def _after(text: str, marker: str) -> str | None:
    for line in text.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip().split()[0]
    return None


def _latency(text: str, pct: str) -> float:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == pct:
            value = parts[1]
            for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
                if value.endswith(unit):
                    return round(float(value[: -len(unit)]) * scale, 3)
    return 0.0
