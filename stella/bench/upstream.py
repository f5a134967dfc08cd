"""A fast fake OpenAI-compatible upstream for benchmarks: a raw ASGI app, bytes prepared once.

Non-stream answers one chat.completion; a stream sends CHUNKS content chunks,
a finish chunk, a usage chunk and [DONE] — 20 pieces of text, like the peer
measurements this project compares against.
"""

from __future__ import annotations

import json
from typing import Any

CHUNKS = 20
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
        for piece in STREAM:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": WHOLE})
