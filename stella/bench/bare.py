"""The baseline: a bare Starlette app that returns fixed bytes, as stella would.

The bytes come from files named by BARE_BODY (non-stream JSON) and
BARE_STREAM (NDJSON lines), so the comparison sends exactly what stella sent.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

BODY = Path(os.environ.get("BARE_BODY", "/dev/null")).read_bytes()
LINES = Path(os.environ.get("BARE_STREAM", "/dev/null")).read_bytes().splitlines(keepends=True)


async def chat(request: Request) -> Response:
    """Answer like stella's /api/v1/chat, from fixed bytes."""
    payload = await request.body()
    if b'"stream":false' in payload.replace(b" ", b""):
        return Response(BODY, media_type="application/json")

    async def lines() -> AsyncIterator[bytes]:
        for line in LINES:
            yield line

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def health(request: Request) -> Response:
    """Liveness."""
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(routes=[Route("/api/v1/chat", chat, methods=["POST"]), Route("/health", health)])
