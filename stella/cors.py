"""CORS from `cors.allowed_origins`: browsers on those origins may call the API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from stella.api.http import NATIVE
from stella.calls import request_id_for
from stella.errors import InvalidRequest
from stella.settings import origin

if TYPE_CHECKING:  # the app installs this module
    from stella.app import Services

EXPOSE = [
    "X-Request-ID",
    "request-id",  # the same ID, where the Anthropic SDKs read it
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-Quota-Limit",
    "X-Quota-Remaining",
    "X-Quota-Reset",
    "Retry-After",
    # Whether to send a failed request again: the OpenAI and Anthropic SDKs obey it, and
    # without it in a browser fall back to retrying every 5xx.
    "x-should-retry",
]


class _CORS(CORSMiddleware):
    """Starlette's CORS, whose preflight answers carry an X-Request-ID as every answer
    does (they are made before the request reaches the middleware that gives one), and
    whose refusals are stella's JSON errors."""

    def preflight_response(self, request_headers: Headers) -> Response:
        """The preflight's answer, with its request ID."""
        response = super().preflight_response(request_headers)
        rid = request_id_for(request_headers.get("x-request-id"))
        if response.status_code >= 400:
            # Starlette's is plain text ("Disallowed CORS origin"): the one answer of the
            # API not in its error shape, nor saying what to change.
            response = self._refusal(request_headers, response, rid)
        response.headers["x-request-id"] = rid
        return response

    def _refusal(self, request_headers: Headers, response: Response, rid: str) -> Response:
        """A refused preflight as stella's 400 invalid_request, naming each refusal, with
        the CORS headers Starlette gave it."""
        text = bytes(response.body).decode("latin-1")
        failures = text.removeprefix("Disallowed CORS ").split(", ")
        whys = [
            _WHY.get(f, f).format(
                origin=request_headers.get("origin", ""),
                method=request_headers.get("access-control-request-method", ""),
                methods=", ".join(self.allow_methods),
            )
            for f in failures
        ]
        refusal = NATIVE.error_response(
            InvalidRequest(f"CORS preflight refused: {'; '.join(whys)}"), rid
        )
        refusal.raw_headers += [
            (name, value)
            for name, value in response.raw_headers
            if name not in (b"content-type", b"content-length")
        ]
        return refusal


# What each of Starlette's preflight failures means, and what would let it pass.
_WHY = {
    "origin": "origin {origin!r} is not one of cors.allowed_origins",
    "method": "method {method!r} is not one of {methods}",
    "headers": "a requested header is not allowed",
    "private-network": "private network access is not allowed",
}


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
