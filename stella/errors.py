"""stella's exceptions: each one carries its HTTP status and its `code`.

Every failure that reaches a client is one of these; routes turn them into the
dialect's error shape, streams into an in-band `error` line. The one exception is what
the HTTP transport (stella.transport) answers itself, before the app sees a request:
its own 400 `invalid_request` for one it cannot parse, 431 `headers_too_large` for a
head past its limits and 501 `not_implemented` for a transfer coding other than chunked,
in the same JSON shape.
"""

from __future__ import annotations

import math
import re
from typing import Any


class StellaError(Exception):
    """Base of every error a client can see."""

    status: int = 500
    code: str = "internal_error"
    retryable: bool = False
    # A retryable error that asking the same backend again would only repeat (a model
    # that cannot load, a whole answer that timed out): the route's fallbacks are tried,
    # its retries are not.
    same_again: bool = True
    # Not retryable, yet another backend may serve the request (an upstream that refuses
    # stella's key, which no retry will change): the route's fallbacks are tried and the
    # backend's circuit breaker counts it as a failure, unless `no_verdict`.
    falls_back: bool = False
    # The failure says nothing of the backend's health (its circuit is not told).
    no_verdict: bool = False
    # A timeout that is the request's time running out, not the backend failing (the
    # total limit passed while it produced, or while an in-process engine worked through
    # its queue): its circuit is not told, and its retries stop.
    out_of_time: bool = False
    # Seconds the upstream asked to wait before the next try (its Retry-After): a retry
    # waits that long, or is not made when the route's backoff cap is shorter.
    retry_after_hint: float | None = None
    # Raised after admission (the inference ran and its one log event counts it), not a
    # refusal before the first byte.
    admitted: bool = False
    # An upstream said it is overloaded (Anthropic's HTTP 529 or `overloaded_error`
    # event): stella's 502 all the same, but the Anthropic dialect answers the API's own
    # overload (529 `overloaded_error`), which its clients know to wait for.
    upstream_overloaded: bool = False

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        param: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        # The request field to blame, as a path without `$.` ("" when none is): dialects
        # that name it apart (OpenAI's `param`) read it from here.
        self.param = param
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers.setdefault("Retry-After", _whole_seconds(retry_after))

    def retry_in(self, seconds: float) -> None:
        """Tell the client to come back after `seconds` (`retry_after` and Retry-After)."""
        self.retry_after = seconds
        self.headers["Retry-After"] = _whole_seconds(seconds)


# When a busy or unavailable server knows no better time to come back: soon, as a queue
# moves or a backend comes back within moments, and late enough not to hammer it.
DEFAULT_RETRY_AFTER_S = 1.0


def whole_seconds(seconds: float) -> int:
    """Retry-After's value: whole seconds, rounded up, at least 1 (0 would invite a storm)."""
    # Up, never down: a client that waits exactly this long must find the way open.
    return max(1, math.ceil(seconds))


def _whole_seconds(seconds: float) -> str:
    """Retry-After's header value (see whole_seconds)."""
    return str(whole_seconds(seconds))


# msgspec names a missing or unknown field apart from the path of the object holding it.
_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")


def field_path(validation_message: str) -> str:
    """The field a msgspec validation message blames (`... - at `$.a.b``) as `a.b`.

    A missing or unknown field is named in the message: `field `x` - at `$.a`` is `a.x`.
    """
    path = ""
    if "$." in validation_message:
        path = validation_message.rpartition("$.")[2].rstrip("`")
    named = _NAMED_FIELD.search(validation_message)
    if named:
        path = f"{path}.{named[1]}" if path else named[1]
    return path


class InvalidRequest(StellaError):
    """Malformed JSON, wrong types, unknown fields, empty messages."""

    status, code = 400, "invalid_request"

    @classmethod
    def blaming(cls, validation_message: str) -> InvalidRequest:
        """The 400 for a msgspec validation message, its `param` the field it blames."""
        return cls(validation_message, param=field_path(validation_message))


class Unauthorized(StellaError):
    """Missing or wrong API key."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str, *, reason: str = "invalid", key: str = "") -> None:
        # RFC 9110 11.6.1: a 401 names the scheme that would pass (X-API-Key too is taken).
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})
        # Why, for the `auth_failed` log event: missing, invalid, duplicate or expired.
        self.reason = reason
        # An expired key's name, for that event ("": none known).
        self.key = key


class Forbidden(StellaError):
    """The key may not use this model or route."""

    status, code = 403, "forbidden"

    def __init__(self, message: str, *, reason: str = "scope") -> None:
        super().__init__(message)
        # Why, for the `auth_failed` log event: scope (the key's models, or admin), or
        # browser (a keyless server's guard against other sites' pages).
        self.reason = reason


class NotSupported(StellaError):
    """The model's backend cannot do what the request asks (count a prompt's tokens): the
    request's fault for that model, as another model's backend may do it."""

    status, code = 400, "not_supported"


class ModelNotFound(StellaError):
    """No route for the requested model."""

    status, code = 404, "model_not_found"


class NotFound(StellaError):
    """No such path."""

    status, code = 404, "not_found"


class MethodNotAllowed(StellaError):
    """The path exists but not for this method."""

    status, code = 405, "method_not_allowed"


class Conflict(StellaError):
    """The change would break a protected state (e.g. removing the default model)."""

    status, code = 409, "conflict"


class PayloadTooLarge(StellaError):
    """Body over server.max_body_bytes."""

    status, code = 413, "payload_too_large"


class ContextTooLong(StellaError):
    """The prompt does not fit the model's context window."""

    status, code = 400, "context_length_exceeded"


class UnsupportedMediaType(StellaError):
    """The body is not JSON."""

    status, code = 415, "unsupported_media_type"


class RateLimited(StellaError):
    """A rate limit was hit; Retry-After says when to come back."""

    status, code, retryable = 429, "rate_limited", True


class QuotaExceeded(RateLimited):
    """A daily quota is used up: nothing passes before the next UTC midnight, which
    Retry-After counts down to. Not retryable: a client that retried would only be
    refused again (and told so by `retryable` and x-should-retry)."""

    code, retryable = "quota_exceeded", False


class UpstreamError(StellaError):
    """The backend failed (and every fallback too)."""

    status, code, retryable = 502, "upstream_error", True


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made: refused, or not made within the
    backend's connect timeout (a host down, a full backlog), not a slow answer."""

    code = "upstream_unreachable"


class ClientTooSlow(StellaError):
    """A client too slow to wait for: a streaming client stopped reading and the route's
    total limit passed, or a request's body did not arrive within the server's limit."""

    status, code = 408, "client_too_slow"


class _ComeBackLater(StellaError):
    """A 503 that always says when to come back (README, /openapi.json)."""

    status, retryable = 503, True

    def __init__(
        self, message: str, *, retry_after: float = DEFAULT_RETRY_AFTER_S, **kwargs: Any
    ) -> None:
        super().__init__(message, retry_after=retry_after, **kwargs)


class Overloaded(_ComeBackLater):
    """A queue is full."""

    code = "overloaded"
    # The backend whose slots (limits.backends) stayed full for the whole wait, when that
    # is the queue: another backend of a balanced route may take the call.
    backend = ""


def waited_out(what: str, seconds: float) -> Overloaded:
    """The error of a call whose time ran out while it waited for a place of stella's
    own (`what`, a free pooled connection): the request was never sent."""
    err = Overloaded(f"waited {seconds:.3g}s for {what}; the request was not sent upstream")
    # stella's load, not the upstream's fault: its circuit is not told, and the route's
    # fallbacks are tried rather than the same full pool again.
    err.no_verdict = True
    err.same_again = False
    return err


class Unavailable(_ComeBackLater):
    """A circuit is open or the backend cannot serve now."""

    code = "unavailable"


class ClientGone(StellaError):
    """The client disconnected before its answer was ready; nothing can be sent."""

    status, code = 499, "client_closed"


class ShuttingDown(_ComeBackLater):
    """The server is draining and takes no new work."""

    code = "shutting_down"

    def __init__(self, message: str = "the server is shutting down; retry the request") -> None:
        # Another replica (or this one, restarted) can take the retry at once: the default
        # Retry-After, soon.
        super().__init__(message)


class UpstreamTimeout(StellaError):
    """Time to first token, idle time or total time exceeded."""

    status, code, retryable = 504, "upstream_timeout", True


class UpstreamStatus(UpstreamError):
    """An upstream answered with an HTTP error status.

    `upstream_status` drives retries: 408, 409, 425, 429 and 5xx are worth another try;
    401 and 403 (the backend's key expired or revoked) and 404 (no such model there) go
    to the fallbacks; 403, 404 and 429 tell the backend's circuit nothing. A 404 whose
    body is a page, or a JSON error saying no more than "Not Found" or "Invalid URL", is
    UpstreamNoSuchPath; any other JSON 404 refuses that model or request.
    """

    def __init__(
        self, message: str, *, upstream_status: int, retry_after: float | None = None
    ) -> None:
        # The upstream's own Retry-After goes to the client too: it knows best when to come back.
        super().__init__(message, retry_after=retry_after)
        self.upstream_status = upstream_status
        self.retry_after_hint = retry_after
        self.retryable = upstream_status in (408, 409, 425, 429) or upstream_status >= 500
        # The same key again is refused again; another backend has its own key. A 404 is
        # the upstream without the model (not pulled on an Ollama box, a name another
        # provider spells otherwise): asked again it would not have it, a fallback may.
        self.falls_back = upstream_status in (401, 403, 404)
        # A 401 refuses the backend's key, for every model on it: a verdict on the
        # backend. A 403 often refuses one model to that key ("no access to model X"), a
        # 404 is one model's absence, and a 429 is the upstream up and enforcing a limit,
        # often per model or per key: the backend's other models still answer, so its
        # circuit is not told.
        self.no_verdict = upstream_status in (403, 404, 429)
        self.upstream_overloaded = upstream_status == 529
        if upstream_status == 429:
            self.code = "upstream_rate_limited"
        elif upstream_status in (400, 404, 413, 422):
            # The upstream rejected what we sent: retrying won't help (nor, but for a 404's
            # missing model, falling back).
            self.code = "upstream_rejected"


class UpstreamNoSuchPath(UpstreamStatus):
    """An upstream's 404 whose body is a page, or a JSON error saying no more than "Not
    Found" or "Invalid URL": it has no such path (a wrong base_url), the backend's fault
    for every model on it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, upstream_status=404)
        self.code = "upstream_path_not_found"
        # The same path is missing again on a retry; another backend may answer. Unlike a
        # missing model, it fails every call to the backend: its circuit is told, so a
        # misconfigured backend shows (/ready, circuit_opened, the metrics) rather than
        # hiding behind the fallbacks.
        self.falls_back = True
        self.no_verdict = False


class UpstreamContextTooLong(UpstreamStatus, ContextTooLong):
    """An upstream refused the prompt as longer than its model's context: stella's own 400
    `context_length_exceeded`, as the embedded engine answers it, in the upstream's words."""

    status, code = 400, "context_length_exceeded"

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message, upstream_status=upstream_status)
        self.code = ContextTooLong.code
        self.param = "messages"
        # The same prompt is as long on every try: as with the embedded engine's refusal,
        # no retry, no fallback, and no verdict on the backend, which answered.
        self.retryable = self.falls_back = False


class UpstreamMakesNoEmbeddings(UpstreamStatus, NotSupported):
    """An embed call's upstream answered that it makes no embeddings: a 501 (llama.cpp
    started without --embeddings, Ollama's "this model does not support embeddings"), or
    a 404 for its embeddings path (a chat-only server). stella's own 400 `not_supported`,
    as for a backend without embeddings: the model cannot do what was asked, and the
    upstream, which answered, is well (its chats go on)."""

    status, code = 400, "not_supported"

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message, upstream_status=upstream_status)
        self.code = NotSupported.code
        self.param = "model"
        # Asked again, or of a fallback (none for an embed call), the answer is the same;
        # and it is no verdict on the backend, whose circuit its chats share.
        self.retryable = self.falls_back = False
        self.no_verdict = True
