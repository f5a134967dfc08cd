"""In-process cost per request: stella's ASGI app vs the bare Starlette app, no sockets.

Both apps are called directly with the same scope and body, one request after
the other, so the figure is the application's own Python work per request,
free of the network stack and of the load generator's noise. stella runs with
logging on (into /dev/null) and metrics on, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

from stella.bench.loadgen import BenchError
from stella.bench.servers import is_setting

WORDS = " ".join(f"word{i}" for i in range(20))  # the same 20-token answer as `bench echo`


# Requests traced to count bytecodes: the count is exact, so a few suffice.
COUNTED = 200


class AsgiRow(msgspec.Struct):
    """Microseconds per request, each app alone on the loop, and its bytecodes."""

    mode: str
    stella_us: float
    bare_us: float
    ratio: float  # bare's time / stella's: the share of the bare app's rate stella keeps
    # Python bytecodes run per request on the loop's thread (the app, its framework and
    # the harness alike): a count, not a time, so the same on a busy machine as on an
    # idle one; two commits compare exactly on one Python version.
    stella_ops: float = 0.0
    bare_ops: float = 0.0


def _body(stream: bool) -> bytes:
    return json.dumps(
        {"model": "echo", "stream": stream, "messages": [{"role": "user", "content": WORDS}]}
    ).encode()


def post_scope(path: str, length: int) -> dict[str, Any]:
    """The ASGI scope of a POST of `length` bytes of JSON to `path` from loopback."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _call(app: Any, body: bytes, out: list[dict[str, Any]] | None = None) -> None:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the client waits for the answer
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if out is not None:
            out.append(message)

    await app(post_scope("/api/v1/chat", len(body)), receive, send)


async def _per_request_us(app: Any, body: bytes, n: int) -> float:
    for _ in range(min(n, 1000)):  # warm up: caches, specialised bytecode
        await _call(app, body)
    best = float("inf")
    for _ in range(3):  # the best of three rounds: the least disturbed by the machine
        gc.collect()
        t = time.perf_counter()
        for _ in range(n):
            await _call(app, body)
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return round(best, 2)


async def _ops_per_request(app: Any, body: bytes, n: int = COUNTED) -> float:
    """Python bytecodes run per request by `n` calls (after a warm-up), on this thread."""
    for _ in range(100):  # warm up: one-off caches and imports are no request's work
        await _call(app, body)
    ops = 0

    def count(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal ops
        if event == "opcode":
            ops += 1
        return count

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return count

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for _ in range(n):
            await _call(app, body)
    finally:
        sys.settrace(previous)
    return round(ops / n, 1)


async def _measure(app: Any, n: int) -> list[AsgiRow]:
    rows = []
    async with app.router.lifespan_context(app):
        bodies = {}
        for stream in (False, True):
            out: list[dict[str, Any]] = []
            await _call(app, _body(stream), out)
            bodies[stream] = b"".join(m.get("body", b"") for m in out if m["type"].endswith("body"))
            status = next(m["status"] for m in out if m["type"] == "http.response.start")
            if status != 200:  # the bare app replays these bytes: they must be an answer
                raise BenchError(f"stella answered {status} to a sample request in process")
        with tempfile.TemporaryDirectory(prefix="stella-bench-asgi-") as name:
            tmp = Path(name)
            (tmp / "body.json").write_bytes(bodies[False])
            (tmp / "stream.ndjson").write_bytes(bodies[True])
            os.environ["BARE_BODY"] = str(tmp / "body.json")
            os.environ["BARE_STREAM"] = str(tmp / "stream.ndjson")
            # The bare app reads its bytes when imported: the files may go after this.
            bare = importlib.reload(importlib.import_module("stella.bench.bare")).app
        for mode, stream in (("non-stream", False), ("stream", True)):
            s = await _per_request_us(app, _body(stream), n)
            b = await _per_request_us(bare, _body(stream), n)
            row = AsgiRow(mode, s, b, round(b / s, 3))
            row.stella_ops = await _ops_per_request(app, _body(stream))
            row.bare_ops = await _ops_per_request(bare, _body(stream))
            rows.append(row)
    return rows


@contextlib.contextmanager
def _without_settings() -> Iterator[None]:
    """os.environ without stella's settings for the block."""
    # The app is made in this process: a STELLA_API_KEYS in the caller's shell would
    # otherwise make it answer 401s, and those would be timed.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if is_setting(k)}
    try:
        yield
    finally:
        os.environ.update(saved)


def compare(requests: int = 20_000) -> list[AsgiRow]:
    """Both apps in this process, one after the other, `requests` calls per round."""
    from stella import logs
    from stella.app import create_app
    from stella.settings import load_settings

    with open(os.devnull, "wb") as devnull:
        sink = logs.configure(fmt="json", stream=devnull)
        overrides = {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}
        try:
            with _without_settings():
                app = create_app(load_settings(overrides))
                return asyncio.run(_measure(app, requests))
        finally:
            sink.close()


def table(rows: list[AsgiRow]) -> str:
    """Markdown table of the rows."""
    out = [
        "| mode | stella us/request | bare us/request | bare / stella "
        "| stella bytecodes/request | bare bytecodes/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r.mode} | {r.stella_us:.1f} | {r.bare_us:.1f} | {r.ratio:.2f} "
            f"| {r.stella_ops:,.0f} | {r.bare_ops:,.0f} |"
        )
    return "\n".join(out)
