"""CORS from `cors.allowed_origins`: browsers on those origins may call the API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from stella.calls import request_id_for
from stella.settings import origin

if TYPE_CHECKING:  # the app installs this module
    from stella.app import Services

EXPOSE = [
    "X-Request-ID",
    "request-id",  # the same ID, where the Anthropic SDKs read it
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
]


class _CORS(CORSMiddleware):
    """Starlette's CORS, whose preflight answers carry an X-Request-ID as every answer
    does (they are made before the request reaches the middleware that gives one)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        """The preflight's answer, with its request ID."""
        response = super().preflight_response(request_headers)
        response.headers["x-request-id"] = request_id_for(request_headers.get("x-request-id"))
        return response


def install(app: Starlette, svc: Services) -> None:
    """Add the CORS middleware when any origin is configured (none: no CORS headers)."""
    origins = svc.settings.cors.allowed_origins
    if not origins:
        return
    app.add_middleware(
        _CORS,
        # Starlette compares them as they are: as the Host/Origin guard reads them.
        allow_origins=[origin(o) for o in origins],
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        # Any request header: the official SDKs send their own (x-stainless-*,
        # anthropic-version, ...), and keys travel in headers, not cookies.
        allow_headers=["*"],
        expose_headers=EXPOSE,
        max_age=svc.settings.cors.max_age_s,
    )
