"""Operational routes: /, /health, /ready, /config, /openapi.json, /docs, /playground."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stella import __version__
from stella.api.http import NO_STORE, JSONResponse, endpoint, names_shown, services
from stella.api.openapi import DOCS_HEADERS, DOCS_HTML, Operation, build_schema, document
from stella.core import Call
from stella.protocol import ConfigView, Health, Readiness, ServiceInfo
from stella.settings import redacted

STATIC = Path(__file__).resolve().parent.parent / "static"


async def health(request: Request) -> Response:
    """GET /health: liveness; never touches a backend or needs a key."""
    router = services(request).router
    route = router.routes.get(router.default)
    return JSONResponse(
        Health(
            backend=route.backend_name if route and names_shown(request) else None,
            timestamp=datetime.now(UTC).isoformat(timespec="milliseconds"),
        ),
        headers=[NO_STORE],  # the state now: as every GET of the API (see Endpoint)
    )


async def ready(request: Request) -> Response:
    """GET /ready: the state store answers and the default model is loaded or loadable."""
    svc = services(request)
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            checks["state"] = "ok" if await svc.state.ping() else "unreachable"
    except (TimeoutError, OSError) as exc:
        checks["state"] = f"unreachable: {type(exc).__name__}"
    if svc.state.kind != "memory" and checks["state"] != "ok":
        # Limits fall back to this process; serving goes on, so report but stay ready.
        checks["state"] = f"degraded ({checks['state']})"
    auth = svc.auth
    shared = svc.state.kind != "memory"  # keys in this process are read as they change
    if shared and auth.enabled and (not auth.stored_read or auth.stored_error):
        # Serving goes on (as with the limits), but on keys that may be out of date: until
        # a first read, a key revoked in the store is taken if the config has it.
        why = f": {auth.stored_error}" if auth.stored_error else ""
        checks["keys"] = (
            f"degraded (stored keys as last read; reading them again failed{why})"
            if auth.stored_read
            else "degraded (stored keys not read yet: the configured keys alone, none "
            f"revoked; read again every second{why})"
        )
    router = svc.router
    named = names_shown(request)
    try:
        route = router.resolve(None)
        backend, model = route.backend, route.upstream_model
        # With keys, no backend or fallback is named (see names_shown), nor why a load
        # failed: the reason names the model's source.
        if backend.loaded(model):
            checks["default_model"] = "ok"
        elif why := backend.problem(model):
            checks["default_model"] = (
                f"failed: {why}" if named else "failed (the model_load_failed log line says why)"
            )
        elif backend.loading(model):
            checks["default_model"] = "loading"
        else:  # not preloaded, or unloaded after keep_alive_s: the next request loads it
            checks["default_model"] = "ok (loads on first use)"
        breaker = router.breaker(route.backend_name)
        state = breaker.now()
        who = f"{route.backend_name}: " if named else ""
        if state == "open":
            # Another backend of a balanced default route, or a fallback, whose circuit is
            # not open answers for the default model: still ready (the open circuit is
            # reported all the same).
            serving = next(
                (
                    r
                    for r in router.chain(route)[1:]
                    if router.breaker(r.backend_name).now() != "open"
                ),
                None,
            )
            if serving is None:
                checks["circuit"] = f"{who}open"
            elif serving.name == route.name:  # a balanced route's other backend
                other = f"backend {serving.backend_name!r}" if named else "another backend"
                checks["circuit"] = f"ok ({who}open; {other} answers)"
            else:
                fallback = f"fallback {serving.name!r}" if named else "a fallback"
                checks["circuit"] = f"ok ({who}open; {fallback} answers)"
        elif state == "half_open":
            # Ready: the next request is the probe that closes it, and a load balancer
            # that kept it from this instance would keep it open for good.
            whose = f"{route.backend_name}'s" if named else "the"
            checks["circuit"] = f"ok (half_open: {whose} next request probes it)"
    except Exception as exc:  # a broken default must show here, not crash the probe
        # Its message may list the routes (a 404's "known models").
        checks["default_model"] = f"error: {exc if named else type(exc).__name__}"
    if svc.drain.draining:
        checks["server"] = "draining"
    ok = all(v.startswith(("ok", "degraded")) for v in checks.values())
    return JSONResponse(
        Readiness("ok" if ok else "unavailable", checks), 200 if ok else 503, headers=[NO_STORE]
    )


# Admin only: besides secrets (redacted), it shows the upstream hosts and every limit.
@endpoint(auth="admin")
async def config(request: Request, call: Call) -> Response:
    """GET /config: the configuration stella started with (secrets redacted), the default now."""
    svc = services(request)
    return JSONResponse(ConfigView(redacted(svc.settings), svc.router.default))


# Found by the clients that probe GET / for Ollama's "Ollama is running" (see ServiceInfo).
OLLAMA_RUNNING = "Ollama is running: stella answers Ollama's API under /api/"

LINKS = {
    "chat": "/api/v1/chat",
    "generate": "/api/v1/generate",
    "models": "/api/v1/models",
    "openai": "/v1/chat/completions",
    "responses": "/v1/responses",
    "ollama": "/api/chat",
    "anthropic": "/v1/messages",
    "health": "/health",
    "ready": "/ready",
    "metrics": "/metrics",
    "openapi": "/openapi.json",
    "docs": "/docs",
    "playground": "/playground",
}


async def info(request: Request) -> Response:
    """GET /: what this service is; browsers go to the playground."""
    accept = request.headers.get("accept", "")
    if "text/html" in accept and (STATIC / "playground.html").is_file():
        return RedirectResponse("/playground", status_code=307)
    svc = services(request)
    base = svc.settings.server.public_url.rstrip("/")  # absolute links when configured
    return JSONResponse(
        ServiceInfo(
            name="stella",
            version=__version__,
            description="An async LLM gateway",
            ollama=OLLAMA_RUNNING,
            default_model=svc.router.default if names_shown(request) else None,
            uptime_s=round(time.monotonic() - svc.started, 1),
            links={
                name: base + path
                for name, path in LINKS.items()
                if name != "metrics" or svc.settings.metrics.enabled
            },
        ),
        headers=[NO_STORE],
    )


_schemas: dict[tuple[str, bool], bytes] = {}  # per public_url and metrics on/off: built once


async def openapi(request: Request) -> Response:
    """GET /openapi.json (with `servers` when server.public_url is set)."""
    settings = services(request).settings
    public_url = settings.server.public_url.rstrip("/")
    metrics = settings.metrics.enabled
    body = _schemas.get((public_url, metrics))
    if body is None:
        spec = build_schema(frozenset() if metrics else frozenset({"/metrics"}))
        if public_url:
            spec["servers"] = [{"url": public_url}]
        # bytes(): JSONResponse renders bytes (its stub allows a memoryview); no copy.
        body = _schemas[public_url, metrics] = bytes(JSONResponse(spec).body)
    # It changes with the configuration (public_url, metrics): asked again, not kept.
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


async def docs(request: Request) -> Response:
    """GET /docs: a page that renders the schema."""
    return HTMLResponse(DOCS_HTML, headers=DOCS_HEADERS)


# Defence in depth for the playground and its files: no MIME sniffing, no framing (click-
# jacking), only this origin's scripts, styles, images and API (the page has no inline
# code), and no referrer. fetch() still sends the Origin a keyless server checks.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


def _whole(scope: Any) -> None:
    """Drop a Range header from `scope`: these files are small, a whole answer is one a
    server may give (RFC 9110 14.2), and Starlette answers a bad range in plain text."""
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"range"]


def _no_ranges(response: Response) -> Response:
    """`response` without the Accept-Ranges: bytes Starlette gives every file: a range
    asked for gets the whole file (see _whole), and the header promised a part."""
    del response.headers["accept-ranges"]
    return response


class Static(StaticFiles):
    """StaticFiles whose answers browsers check (by ETag) before each use: cached by
    their own rules, the playground would run an old stella.js after an upgrade."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve the file whole, whatever Range was asked."""
        _whole(scope)
        await super().__call__(scope, receive, send)

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        """The file (or 304), marked no-cache, with the playground's headers."""
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return _no_ranges(response)


async def playground(request: Request) -> Response:
    """GET /playground."""
    page = STATIC / "playground.html"
    if not page.is_file():
        return JSONResponse({"error": {"code": "not_found", "message": "no playground"}}, 404)
    _whole(request.scope)
    return _no_ranges(FileResponse(page, headers=PAGE_HEADERS))


document(
    Operation(
        "get",
        "/",
        "What this service is, and where its routes are (browsers go to the playground)",
        tag="ops",
        response=ServiceInfo,
        public=True,
        errors=(),
        bare=((307, "a browser (Accept: text/html) is sent to /playground"),),
    ),
    Operation(
        "get",
        "/health",
        "Liveness; no auth, never touches a backend",
        tag="ops",
        response=Health,
        public=True,
        errors=(),
    ),
    Operation(
        "get",
        "/ready",
        "Readiness: state store and default model",
        tag="ops",
        response=Readiness,
        public=True,
        errors=(),
        others=((503, Readiness),),
    ),
    Operation(
        "get",
        "/config",
        "The configuration stella started with, secrets redacted (admin)",
        tag="ops",
        response=ConfigView,
        errors=(401, 403),
    ),
)

routes = [
    Route("/", info, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/config", config, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    Route("/playground", playground, methods=["GET"]),
    Mount("/static", Static(directory=STATIC, check_dir=False), name="static"),
]
