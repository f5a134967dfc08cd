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
    # What the first failed request got ("401 Unauthorized: invalid API key", an in-band
    # error line, a broken connection); "" when none failed. The latency figures are of
    # the successful answers only: a fast refusal must not make a server look fast.
    first_error: str = ""


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
    latencies: list[float] = field(default_factory=list)  # of the successful answers
    ttfb: list[float] = field(default_factory=list)  # of the successful answers
    errors: int = 0
    succeeded: int = 0
    answered: int = 0  # answers of any status
    tokens: int = 0
    sent: int = 0
    first_error: str = ""

    def failed(self, why: str) -> None:
        """Count a failed request; the first one's `why` is kept."""
        self.errors += 1
        if not self.first_error:
            self.first_error = why


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
    head = status.split(b" ", 2)
    code = int(head[1])
    reason = head[2].strip().decode("latin-1") if len(head) > 2 else ""
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
    ttfb = 0.0
    inband = b""  # the chunk that holds an in-band error
    if chunked:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if not ttfb:
                ttfb = time.perf_counter() - t0
            if whole or code >= 400:
                parts.append(data[:-2])
            else:
                st.tokens += text_lines(data)
            if not inband and inband_error(data):
                inband = data
        body = b"".join(parts)
    else:
        body = await reader.readexactly(length) if length > 0 else b""
        ttfb = time.perf_counter() - t0
    st.answered += 1
    if code >= 400:
        st.failed(_status_error(code, reason, body))
    elif inband:
        st.failed(f"{code} {reason} with an in-band error: {_inband_line(inband)}")
    else:
        if whole:
            st.tokens += usage_tokens(body)
        st.succeeded += 1
        st.ttfb.append(ttfb)
        st.latencies.append(time.perf_counter() - t0)


def _status_error(code: int, reason: str, body: bytes) -> str:
    """An error answer in words: its status, and what its body says when it is an error
    object (stella's, OpenAI's, Anthropic's or Ollama's)."""
    said = ""
    try:
        err = msgspec.json.decode(body).get("error")
    except (msgspec.DecodeError, UnicodeDecodeError, AttributeError):
        err = None
    if isinstance(err, str):
        said = err
    elif isinstance(err, dict):
        words = [err.get(k) for k in ("code", "message")]
        said = ": ".join(w for w in words if isinstance(w, str) and w)
    line = f"{code} {reason}".strip() + (f": {said}" if said else "")
    return line[:300]


def _inband_line(data: bytes) -> str:
    """The line of `data` that says a stream failed (an SSE `event: error`'s data line),
    at most 300 characters of it."""
    lines = data.splitlines()
    for i, line in enumerate(lines):
        if inband_error(line):
            if line.startswith(b"event:") and i + 1 < len(lines):
                line = lines[i + 1]
            return line.decode("utf-8", "replace").strip()[:300]
    return data.decode("utf-8", "replace").strip()[:300]


def _broken(exc: BaseException, answer_timeout_s: float | None) -> str:
    """A request that got no whole answer, in words."""
    if isinstance(exc, TimeoutError):
        return f"no whole answer within {answer_timeout_s:g} s (--timeout)"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the connection closed in the middle of an answer"
    if isinstance(exc, ValueError):
        return f"an answer that is not HTTP/1.1 ({exc})"
    return f"the connection broke before an answer ({exc or type(exc).__name__})"


async def _connect(
    host: str, port: int, answer_timeout_s: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the target, waited for at most `answer_timeout_s` seconds."""
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), answer_timeout_s)
    except TimeoutError:
        raise ConnectionError(f"no connection within {answer_timeout_s:g} s") from None


async def _worker(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    budget: list[int],
    st: _Stats,
    answer_timeout_s: float | None = None,
) -> None:
    reader, writer = await _connect(host, port, answer_timeout_s)
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            st.sent += 1
            t0 = time.perf_counter()
            writer.write(request)
            try:
                async with asyncio.timeout(answer_timeout_s):  # a handle, not a task per request
                    await _read_response(reader, t0, st)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                st.failed(_broken(exc, answer_timeout_s))
                writer.close()
                reader, writer = await _connect(host, port, answer_timeout_s)
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
    answer_timeout_s: float | None = None,
) -> Result:
    """Keep `concurrency` connections busy for `duration` seconds (or `max_requests`, the
    warm-up's included: it takes at most a tenth of them); `on_measure` is called when
    the warm-up is over. A request without its whole answer within `answer_timeout_s` seconds
    (None: no limit) is a failure, and its connection is replaced."""
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
        warm, _ = await _phase(
            host, port, request, concurrency, warmup, max_requests // 10, answer_timeout_s
        )
        max_requests -= warm.sent
    from stella.bench.servers import check_stop

    check_stop()
    if on_measure is not None:
        on_measure()
    st, seconds = await _phase(
        host, port, request, concurrency, duration, max_requests, answer_timeout_s
    )
    check_stop()
    ms = [x * 1000 for x in st.latencies]
    return Result(
        name=name or url,
        concurrency=concurrency,
        requests=st.answered,
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
        first_error=st.first_error,
    )


async def _phase(
    host: str,
    port: int,
    request: bytes,
    concurrency: int,
    duration: float,
    max_requests: int,
    answer_timeout_s: float | None = None,
) -> tuple[_Stats, float]:
    st = _Stats()
    budget = [max_requests]
    t0 = time.perf_counter()
    deadline = t0 + duration
    await asyncio.gather(
        *(
            _worker(host, port, request, deadline, budget, st, answer_timeout_s)
            for _ in range(concurrency)
        )
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
        from stella.bench.servers import check_stop, die_with_parent

        check_stop()
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            preexec_fn=die_with_parent,
        )
    finally:
        os.unlink(script)
    check_stop()  # a stop asked for while wrk ran (its own exit code is then not the bench's)
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
