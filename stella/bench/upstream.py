"""A fast fake OpenAI-compatible upstream for benchmarks: a raw ASGI app, bytes prepared once.

Non-stream answers one chat.completion; a stream sends a role chunk, CHUNKS content
chunks, a finish chunk, a usage chunk and [DONE] (24 SSE events, 20 pieces of text,
like the peer measurements this project compares against), each event in a write
of its own, GAP_S apart, as a model's tokens arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from typing import Any

CHUNKS = 20
# Long enough for a gateway on another core to read each event on its own (one read
# per event, as from a real model), short enough to keep the upstream far from the
# limit at concurrency 8 and up; GAP_US in the environment overrides it.
GAP_S = float(os.environ.get("GAP_US", "80")) / 1e6
_HEAD = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench"}


def _sse(delta: dict[str, Any], finish: str | None = None) -> bytes:
    data = {**_HEAD, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


STREAM = (
    [_sse({"role": "assistant", "content": ""})]
    + [_sse({"content": f" tok{i}"}) for i in range(CHUNKS)]
    + [
        _sse({}, "stop"),
        b"data: "
        + json.dumps(
            {
                **_HEAD,
                "choices": [],
                "usage": {
                    "prompt_tokens": 8,
                    "completion_tokens": CHUNKS,
                    "total_tokens": 8 + CHUNKS,
                },
            },
            separators=(",", ":"),
        ).encode()
        + b"\n\n",
        b"data: [DONE]\n\n",
    ]
)
WHOLE = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(f" tok{i}" for i in range(CHUNKS)),
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": CHUNKS, "total_tokens": 8 + CHUNKS},
    },
    separators=(",", ":"),
).encode()
MODELS = (
    b'{"object":"list","data":[{"id":"bench","object":"model","created":0,"owned_by":"bench"}]}'
)
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


# Streams waiting out their gap, in the order they are due (one gap for all: FIFO).
_due: deque[tuple[float, asyncio.Future[None]]] = deque()
_ticker: list[asyncio.Task[None]] = []


async def _tick() -> None:
    """Wake each waiting stream once its gap is over, a loop turn at a time."""
    # uvloop's timers count whole milliseconds; one task turning the loop wakes
    # every stream due, instead of each stream spinning on its own.
    while _due:
        now = time.perf_counter()
        while _due and _due[0][0] <= now:
            future = _due.popleft()[1]
            if not future.done():  # a client that left cancels its wait
                future.set_result(None)
        # The load generator shares this core: a loop turning without a pause would
        # hold it and delay the client's wake-ups by a scheduler slice (a p99 of 9 ms).
        os.sched_yield()
        await asyncio.sleep(0)
    _ticker.clear()


async def _pause() -> None:
    """Wait GAP_S (at least a loop turn)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    _due.append((time.perf_counter() + GAP_S, future))
    if not _ticker:
        _ticker.append(loop.create_task(_tick()))
    await future


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The whole upstream."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"].endswith("/models") or scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": MODELS})
        return
    if b'"stream":true' in body.replace(b" ", b""):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for i, piece in enumerate(STREAM):
            if i:
                await _pause()
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": WHOLE})
