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


@contextlib.asynccontextmanager
async def lifespan_aiohttp(app: Starlette) -> AsyncIterator[None]:
    """One aiohttp session for the process."""
    import aiohttp

    app.state.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app.state.session.close()


async def chat_aiohttp(request: Request) -> Response:
    """Forward /v1/chat/completions with aiohttp directly (stella's hot-path stack)."""
    session = request.app.state.session
    body = await request.body()
    upstream = await session.post(
        UPSTREAM + "/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        return StreamingResponse(
            relay(), status_code=upstream.status, media_type="text/event-stream"
        )
    data = await upstream.read()
    upstream.release()
    return Response(data, status_code=upstream.status, media_type="application/json")


# The same passthrough on aiohttp directly: the client stack stella's chat calls use.
app_aiohttp = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_aiohttp, methods=["POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan_aiohttp,
)
