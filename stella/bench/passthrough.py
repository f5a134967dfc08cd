"""The baseline gateway: a bare Starlette passthrough on the same client stack as stella.

One httpx client on the aiohttp transport, made at start-up; each request is
forwarded as is to UPSTREAM_URL/chat/completions and the answer streamed back
unchanged. It adds nothing a gateway needs, so it bounds what stella can reach.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import httpx
from httpx_aiohttp import AiohttpTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9000/v1")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """One pooled client for the process."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    app.state.client = httpx.AsyncClient(
        base_url=UPSTREAM, transport=AiohttpTransport(limits=limits), timeout=60
    )
    yield
    await app.state.client.aclose()


async def chat(request: Request) -> Response:
    """Forward /v1/chat/completions."""
    client: httpx.AsyncClient = request.app.state.client
    body = await request.body()
    upstream = await client.send(
        client.build_request(
            "POST", "/chat/completions", content=body, headers={"content-type": "application/json"}
        ),
        stream=True,
    )
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(
            relay(), status_code=upstream.status_code, media_type="text/event-stream"
        )
    data = await upstream.aread()
    await upstream.aclose()
    return Response(data, status_code=upstream.status_code, media_type="application/json")


async def health(request: Request) -> Response:
    """Liveness."""
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(
    routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)],
    lifespan=lifespan,
)
