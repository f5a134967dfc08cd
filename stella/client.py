"""A Python client for stella's native API: `Client` (sync) and `AsyncClient`.

    from stella.client import Client
    with Client() as c:                      # STELLA_URL / STELLA_API_KEY, or arguments
        print(c.chat([{"role": "user", "content": "hi"}]).response)
        with c.chat([{"role": "user", "content": "hi"}], stream=True) as events:
            for event in events:             # Start / Delta / ToolCall (stella.protocol), Done
                ...

Errors raise a `StellaClientError` subclass per error code; a stream's HTTP error
raises from the call that makes it (the request is sent, and the answer's head read,
before it returns; the body is read as the stream is iterated), and an in-band `error`
line raises too, after the events already yielded. A request is sent again, up to
`max_retries` times (default 2), after a retryable error: the server's word, or a
connection that was never made; a stream only before it started. `on_retry(error,
seconds)`, when given, is called before each wait, to say so (an exception it raises
ends the retries, raised from the call). A stream's
connection closes, and the server cancels the generation, when the stream is closed:
at the end of its `with` block (`async with` for the async client), by its `close()`
(`aclose()`), or when the stream object is garbage-collected; a `break` out of a loop
over a stream held in a variable leaves it open until one of these.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import email.utils
import math
import os
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import Any, Literal, cast, overload
from urllib.parse import quote, urlencode

import httpx
import msgspec

from stella import protocol
from stella.protocol import (
    Delta,
    EmbedResponse,
    Error,
    FinishReason,
    KeyCreated,
    KeyInfo,
    KeyList,
    KeyRevoked,
    ModelList,
    Ping,
    Start,
    ToolCall,
    UsageReport,
)


# The server sends one of FinishReason; a newer one may end for a reason more, as it may
# send event types and error codes more. The client keeps such a reason as the string it
# came as (its answer is whole), so its own types widen the field the server's keep strict.
class Done(protocol.Done, tag="done"):
    """A stream's `done` line as the client reads it: its `finish_reason` one of
    FinishReason, or a reason a newer server added, as it came."""

    finish_reason: FinishReason | str  # type: ignore[assignment]


class ChatResponse(protocol.ChatResponse):
    """A non-stream answer as the client reads it: its `finish_reason` one of
    FinishReason, or a reason a newer server added, as it came."""

    finish_reason: FinishReason | str  # type: ignore[assignment]


DEFAULT_URL = "http://127.0.0.1:8000"
# As the OpenAI SDK: a long wait for an answer, a short one for a connection.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
# What an HTTP header value may hold (visible ASCII and inner spaces).
_HEADER_SAFE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # the scheme of a URL as typed
_SLASH_SHORT = re.compile(r"https?:/?(?!/)", re.IGNORECASE)  # "http:/host", "https:host"
_event = msgspec.json.Decoder(Start | Delta | Ping | ToolCall | Done | Error)
_response = msgspec.json.Decoder(ChatResponse)
_models = msgspec.json.Decoder(ModelList)
_embedded = msgspec.json.Decoder(EmbedResponse)
_key_created = msgspec.json.Decoder(KeyCreated)
_key_list = msgspec.json.Decoder(KeyList)
_key_revoked = msgspec.json.Decoder(KeyRevoked)
_usage = msgspec.json.Decoder(UsageReport)
_key_info = msgspec.json.Decoder(KeyInfo)


def _usage_path(day: str | None, key: str | None, model: str | None) -> str:
    """GET /api/v1/usage with the filters given."""
    query = {k: v for k, v in (("day", day), ("key", key), ("model", model)) if v}
    return "/api/v1/usage" + ("?" + urlencode(query) if query else "")


def _key_body(
    name: str,
    models: list[str] | None,
    admin: bool,
    limits: dict[str, float],
    expires_in_s: float | None = None,
) -> dict[str, Any]:
    """The body of POST /api/v1/keys: a limit left at 0 is left out (the default), and
    so is an expiry not given (never)."""
    body: dict[str, Any] = {"name": name, "admin": admin}
    if models is not None:
        body["models"] = models
    body.update((field, n) for field, n in limits.items() if n)
    if expires_in_s is not None:
        body["expires_in_s"] = expires_in_s
    return body


def _update_body(
    models: list[str] | None,
    admin: bool | None,
    limits: dict[str, float | None],
    expires_in_s: float | None,
    no_expiry: bool,
) -> dict[str, Any]:
    """The body of PATCH /api/v1/keys/{name}: only what is given (None: unchanged)."""
    if no_expiry and expires_in_s is not None:
        raise ValueError("give expires_in_s or no_expiry, not both")
    body: dict[str, Any] = {f: v for f, v in limits.items() if v is not None}
    if models is not None:
        body["models"] = models
    if admin is not None:
        body["admin"] = admin
    if expires_in_s is not None or no_expiry:
        body["expires_in_s"] = expires_in_s  # null: it never expires
    return body


def _revoke_path(name: str, purge: bool) -> str:
    """DELETE's path for key `name`, with purge=true to drop a runtime key's entry."""
    return _key_path(name) + ("?purge=true" if purge else "")


def _key_path(name: str) -> str:
    """The path that names key `name` (any character of it escaped, '/' too)."""
    return "/api/v1/keys/" + quote(name, safe="")


def _embed_body(
    input: str | list[str], model: str | None, dimensions: int | None
) -> dict[str, Any]:
    """The body of POST /api/v1/embed."""
    body: dict[str, Any] = {"input": input}
    if model is not None:
        body["model"] = model
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


class StellaClientError(Exception):
    """An error from stella, with its HTTP status (0 for in-band errors) and code."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "error",
        request_id: str = "",
        retry_after: float | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.retryable = retryable  # worth sending again (a 429, a 5xx, an in-band retryable)


class BadRequestError(StellaClientError):
    """400 invalid_request (431 headers_too_large: request headers past the server's limits)."""


class ContextLengthError(BadRequestError):
    """400 context_length_exceeded: the prompt is longer than the model can read (in-band
    once a stream has started)."""


class MethodNotAllowedError(StellaClientError):
    """405 method_not_allowed."""


class InternalServerError(StellaClientError):
    """500 internal_error: a bug in the server (its log says more)."""


class AuthenticationError(StellaClientError):
    """401 unauthorized."""


class PermissionDeniedError(StellaClientError):
    """403 forbidden."""


class NotFoundError(StellaClientError):
    """404 model_not_found / not_found."""


class ConflictError(StellaClientError):
    """409 conflict."""


class PayloadTooLargeError(StellaClientError):
    """413 payload_too_large."""


class UnsupportedMediaTypeError(StellaClientError):
    """415 unsupported_media_type."""


class RateLimitError(StellaClientError):
    """429 rate_limited; `retry_after` says when to come back."""


class QuotaExceededError(RateLimitError):
    """429 quota_exceeded: the key's (or model's) daily quota is used up; `retry_after` is
    the seconds until the next UTC midnight. Never retried: it would be refused again."""


class UpstreamError(StellaClientError):
    """502 upstream_error, or the backend failed mid-stream."""


class OverloadedError(StellaClientError):
    """503 overloaded / shutting_down."""


class UnavailableError(StellaClientError):
    """503 unavailable (circuit open)."""


class TimeoutError(StellaClientError, builtins.TimeoutError):
    """504 upstream_timeout, or a timeout mid-stream (code timeout: the client's own).

    A subclass of the builtin TimeoutError, so `except TimeoutError` with the builtin's
    name catches it too. It is not in `__all__`: `from stella.client import *` leaves
    the builtin name alone (an `except` of this class would miss the builtin timeouts
    of `asyncio.timeout` and the like); import it by name, or catch
    `stella.client.TimeoutError`, for stella's alone."""


class NetworkError(StellaClientError):
    """network_error: the server could not be reached, or the connection broke (also a
    stream that ended without its `done` or `error` line)."""


class InvalidURLError(StellaClientError):
    """code invalid_url: a base URL (or STELLA_URL) that is not one."""


class ProtocolError(StellaClientError):
    """bad_response: the answer is not stella's protocol (a proxy's page, say); `status`
    is the answer's HTTP status."""


class _Answer:
    """The HTTP status of the answer being read, once its head has come (0 before)."""

    status = 0


@contextlib.contextmanager
def _network(url: str, timeout: httpx.Timeout | None = None) -> Iterator[_Answer]:
    """httpx's transport failures as this module's errors, like stella.js: a timeout is
    a TimeoutError (code timeout), anything else a NetworkError (code network_error).
    A failure to connect is retryable: nothing was sent (a server restarting refuses
    connections for a moment); one after the request went out is not."""
    answer = _Answer()
    try:
        yield answer
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        waited = _seconds(timeout, "connect" if isinstance(exc, httpx.ConnectTimeout) else "pool")
        what = "connect to" if isinstance(exc, httpx.ConnectTimeout) else "get a connection to"
        raise TimeoutError(
            f"could not {what} {url} within the client's timeout{waited}",
            code="timeout",
            retryable=True,
        ) from exc
    except httpx.TimeoutException as exc:
        waited = _seconds(timeout, "write" if isinstance(exc, httpx.WriteTimeout) else "read")
        raise TimeoutError(
            f"no answer from {url} within the client's timeout{waited} ({type(exc).__name__})",
            code="timeout",
        ) from exc
    except httpx.ConnectError as exc:
        raise NetworkError(
            f"cannot reach {url}: {exc}", code="network_error", retryable=True
        ) from exc
    except httpx.LocalProtocolError:
        # Its text quotes the offending header value, which may be a credential.
        raise NetworkError(
            f"the request to {url} is not valid HTTP (a header value, say): not sent",
            code="network_error",
        ) from None
    except httpx.TransportError as exc:
        message = f"connection to {url} failed: {str(exc) or type(exc).__name__}"
        raise NetworkError(message, code="network_error") from exc
    except httpx.DecodingError as exc:  # a body its Content-Encoding does not decode
        raise ProtocolError(
            f"{url} sent a body that does not decode ({exc})",
            status=answer.status,
            code="bad_response",
        ) from None


def _seconds(timeout: httpx.Timeout | None, which: str) -> str:
    """The client's `which` timeout as words for a message ("" when it has none)."""
    limit = getattr(timeout, which, None)
    return f" of {limit:g} s" if isinstance(limit, int | float) else ""


BY_CODE: dict[str, type[StellaClientError]] = {
    "invalid_request": BadRequestError,
    "context_length_exceeded": ContextLengthError,
    "method_not_allowed": MethodNotAllowedError,
    "internal_error": InternalServerError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "model_not_found": NotFoundError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "payload_too_large": PayloadTooLargeError,
    "headers_too_large": BadRequestError,
    "not_implemented": BadRequestError,
    "not_supported": BadRequestError,
    "unsupported_media_type": UnsupportedMediaTypeError,
    "rate_limited": RateLimitError,
    "quota_exceeded": QuotaExceededError,
    "upstream_error": UpstreamError,
    "upstream_unreachable": UpstreamError,
    "upstream_rate_limited": UpstreamError,
    "upstream_rejected": UpstreamError,
    "upstream_path_not_found": UpstreamError,
    "overloaded": OverloadedError,
    "shutting_down": OverloadedError,
    "unavailable": UnavailableError,
    "upstream_timeout": TimeoutError,
}
BY_STATUS: dict[int, type[StellaClientError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    429: RateLimitError,
    431: BadRequestError,
    500: InternalServerError,
    501: BadRequestError,
    502: UpstreamError,
    503: OverloadedError,
    504: TimeoutError,
}


def error_for(response: httpx.Response, body: bytes) -> StellaClientError:
    """The exception for an error response."""
    code, message, rid = f"http_{response.status_code}", response.reason_phrase, ""
    # What the server says of a retry, when it says (a 502 upstream_rejected is not worth
    # one); else the status's guess, for other servers and proxies.
    retryable = response.status_code == 429 or response.status_code >= 500
    try:
        err = msgspec.json.decode(body).get("error", {})
        if isinstance(err, dict):
            code, message, rid = (
                err.get("code") or code,
                err.get("message") or message,
                err.get("request_id") or "",
            )
            said = err.get("retryable")
            if isinstance(said, bool):
                retryable = said
    except (msgspec.DecodeError, UnicodeDecodeError, AttributeError):
        pass  # not stella's error shape: the status says what it can
    if not isinstance(code, str):
        code = f"http_{response.status_code}"
    if not isinstance(message, str):
        message = response.reason_phrase
    if not isinstance(rid, str):
        rid = ""
    retry = response.headers.get("retry-after")
    cls = BY_CODE.get(code) or BY_STATUS.get(response.status_code, StellaClientError)
    return cls(
        message,
        status=response.status_code,
        code=code,
        request_id=rid or response.headers.get("x-request-id", ""),
        retry_after=_retry_after(retry),
        retryable=retryable,
    )


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date; None when unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        return None
    return max(0.0, float(math.ceil(at.timestamp() - time.time())))


# Retries (max_retries): a wait the server asks for beyond this is the caller's to decide,
# so the error is raised at once; else exponential backoff from the first wait to the last.
RETRY_AFTER_CAP_S = 60.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
# A client's `on_retry`: told the error and the seconds about to be waited before each
# retry (to say so, as the CLI does); what it raises ends the retries.
OnRetry = Callable[[StellaClientError, float], None]


def retry_wait(exc: StellaClientError, retry: int, max_retries: int) -> float | None:
    """Seconds to wait before sending a request again after `exc` (`retry` counts the
    retries made, from 0), or None when `exc` is to be raised: not retryable, no retries
    left, or a Retry-After longer than RETRY_AFTER_CAP_S."""
    if not exc.retryable or retry >= max_retries:
        return None
    if exc.retry_after is not None:
        return exc.retry_after if exc.retry_after <= RETRY_AFTER_CAP_S else None
    # Jittered down by up to a quarter, as the OpenAI SDK does: clients refused together
    # do not all come back at once.
    return min(BACKOFF_FIRST_S * 2**retry, BACKOFF_MAX_S) * (1 - 0.25 * random.random())


def _redirect(response: httpx.Response, url: str) -> ProtocolError | None:
    """A 3xx as the error it is (a proxy sending http:// on to https://, say): the client
    follows no redirect, so its body was read as an answer that is not stella's."""
    if not 300 <= response.status_code < 400:
        return None
    where = response.headers.get("location")
    to = f" to {_shown(where)}" if where else ""
    return ProtocolError(
        f"{url} answered {response.status_code} {response.reason_phrase}, a redirect{to}; "
        "the client follows none: give the URL it points to as the base URL",
        status=response.status_code,
        code="bad_response",
        request_id=response.headers.get("x-request-id", ""),
    )


def _inband(event: Error, request_id: str) -> StellaClientError:
    """The exception for a stream's `error` line (status 0: the HTTP status was 200)."""
    # The line's own wait: the stream's headers went out before the backend was asked.
    wait = event.retry_after
    return BY_CODE.get(event.code, StellaClientError)(
        event.message,
        code=event.code,
        request_id=request_id,
        retry_after=None if wait is msgspec.UNSET else wait,
        retryable=event.retryable,
    )


def _decode(
    decoder: msgspec.json.Decoder[Any], data: bytes | str, url: str, status: int = 0
) -> Any:
    """A stella answer decoded; anything else is a ProtocolError (with the answer's HTTP
    `status`), not a traceback."""
    try:
        return decoder.decode(data)
    # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a string.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        start = data[:80] if isinstance(data, str) else data[:80].decode("utf-8", "replace")
        raise ProtocolError(
            f"{url} did not answer in stella's protocol ({exc}): {start!r}",
            status=status,
            code="bad_response",
        ) from None


class _Lines:
    """A stream's lines as events: pings and unknown event types skipped (a newer
    server may send more), an `error` line raised, a missing terminal line noticed."""

    def __init__(self, url: str, request_id: str) -> None:
        self.url = url
        self.request_id = request_id
        self.status = 0  # the stream's HTTP status, for a ProtocolError to carry
        self.ended = False
        self.seen = False  # a line came: the body was a stream, if cut short

    def named(self, exc: StellaClientError) -> StellaClientError:
        """`exc` carrying the stream's request ID once it is known (a timeout or a broken
        connection mid-stream has none of its own)."""
        if not exc.request_id:
            exc.request_id = self.request_id
        return exc

    def event(self, line: bytes) -> Any:
        """The line's event, or None for a line to skip."""
        self.seen = True
        try:
            event = _event.decode(line)
        except msgspec.ValidationError as exc:
            kind = _decode(_any_event, line, self.url, self.status).type
            if kind in _KNOWN:  # a known event in a shape stella never sends
                raise ProtocolError(
                    f"{self.url} sent a malformed {kind!r} line: {exc}",
                    status=self.status,
                    code="bad_response",
                ) from None
            return None  # an event type this client does not know yet: skipped
        except (msgspec.DecodeError, UnicodeDecodeError):
            _decode(_event, line, self.url, self.status)  # not JSON: raises the ProtocolError
        kind = type(event)
        if kind is Ping:
            return None
        if kind is Error:
            self.ended = True
            raise _inband(cast(Error, event), self.request_id)
        if kind is Done:
            self.ended = True
        return event

    def end(self) -> None:
        """Raise unless the stream ended with its terminal line (the protocol's promise)."""
        if not self.seen:
            # stella sends its start line at once: an empty body (a proxy's bare 200, a
            # 204) is an answer that is not stella's, as it is to a call without stream.
            raise ProtocolError(
                f"{self.url} did not answer in stella's protocol: an empty body",
                status=self.status,
                code="bad_response",
            )
        if not self.ended:
            raise NetworkError(
                f"the stream from {self.url} ended without a done or error line",
                code="network_error",
                request_id=self.request_id,
            )


class _AnyEvent(msgspec.Struct):
    type: str


_any_event = msgspec.json.Decoder(_AnyEvent)
_json = msgspec.json.Decoder()
_KNOWN = frozenset({"start", "delta", "tool_call", "done", "error", "ping"})


__all__ = [
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "ContextLengthError",
    "InternalServerError",
    "InvalidURLError",
    "MethodNotAllowedError",
    "NetworkError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProtocolError",
    "QuotaExceededError",
    "RateLimitError",
    "StellaClientError",
    "Stream",
    # Not TimeoutError: `import *` would shadow the builtin with this narrower subclass.
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "UpstreamError",
]
_JSON = {"content-type": "application/json"}
_encoder = msgspec.json.Encoder()


def _encode(body: dict[str, Any]) -> bytes:
    """A request body as JSON: plain values, or the protocol's structs (an answer's
    `message` goes back into the next turn as it is)."""
    try:
        return _encoder.encode(body)
    except (TypeError, UnicodeEncodeError) as exc:  # a lone surrogate is not UTF-8
        raise BadRequestError(f"cannot send the request: {exc}", code="invalid_request") from None


def _payload(
    model: str | None, stream: bool, options: dict[str, Any] | None, **fields: Any
) -> dict[str, Any]:
    """A request body: `fields` that are set, the stream flag, the model and options if any."""
    body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    body["stream"] = stream
    if model:
        body["model"] = model
    if options:
        for name, value in options.items():
            # JSON has no NaN or infinity (msgspec would send null: the server's default).
            if isinstance(value, float) and not math.isfinite(value):
                raise BadRequestError(
                    f"options.{name}: {value} is not a number JSON can carry",
                    code="invalid_request",
                )
        body["options"] = options
    return body


def _body(
    messages: list[Any],
    model: str | None,
    stream: bool,
    options: dict[str, Any] | None,
    **extra: Any,
) -> dict[str, Any]:
    return _payload(model, stream, options, messages=messages, **extra)


def _generate_body(
    prompt: str,
    model: str | None,
    system: str | None,
    stream: bool,
    options: dict[str, Any] | None,
    metadata: dict[str, Any] | None = None,
    reasoning_effort: str | None = None,
) -> dict[str, Any]:
    return _payload(
        model,
        stream,
        options,
        prompt=prompt,
        system=system or None,
        metadata=metadata,
        reasoning_effort=reasoning_effort,
    )


def _config(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    # Outer spaces are never part of a URL, as of a key: a pasted one, or a file's newline.
    typed = (base_url or "").strip() or os.environ.get("STELLA_URL", "").strip() or DEFAULT_URL
    # The scheme is looked for before trailing slashes go: "http://" stripped is "http:",
    # which would read as a host named "http".
    url = (typed if "://" in typed else "http://" + typed).rstrip("/")  # "localhost:8000"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        # httpx's reason may quote a part of the user info (a password holding a "/"
        # reads as a port): none of it is shown then.
        why = "percent-encode the user and password" if "@" in url else str(exc)
    else:
        # httpx takes any scheme and an empty host: the request would fail later as a
        # network error, or go to a host read out of a scheme ("http:/host", a slash
        # short, would name the host "http").
        why = (
            "the scheme must be http:// or https://"
            if parsed.scheme not in ("http", "https") or _SLASH_SHORT.match(typed)
            else ("it names no host" if not parsed.host else "")
        )
    if why:
        raise InvalidURLError(f"{_typed(typed)} is not a valid URL: {why}", code="invalid_url")
    key = (api_key if api_key is not None else os.environ.get("STELLA_API_KEY", "")).strip()
    # A key read from a file keeps its newline; outer spaces are never part of a key.
    if key and not _HEADER_SAFE.fullmatch(key):
        raise AuthenticationError(
            "the API key holds characters an HTTP header cannot carry (non-ASCII or control)",
            code="invalid_api_key",
        )
    return url, ({"Authorization": f"Bearer {key}"} if key else {})


def _retries(max_retries: int) -> int:
    """`max_retries`, checked: a whole number, 0 or more."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be a whole number, 0 or more: {max_retries!r}")
    return max_retries


def _shown(url: str) -> str:
    """`url` without a user and password, as it appears in messages."""
    if "@" not in url:
        return url
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except httpx.InvalidURL:
        scheme, _, rest = url.rpartition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _typed(url: str) -> str:
    """`url` as it was given, with its user and password (up to the last "@") masked."""
    if "@" not in url:
        return url
    scheme = _SCHEME.match(url)
    head = scheme.group() if scheme else ""
    return f"{head}***@{url[len(head) :].rpartition('@')[2]}"


def _headers(auth: dict[str, str], kwargs: dict[str, Any]) -> httpx.Headers:
    """The caller's `headers=` (an httpx keyword), with the key's Authorization over them."""
    headers = httpx.Headers(kwargs.pop("headers", None))
    headers.update(auth)
    return headers


def _split(rest: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines of `rest + chunk`, split at b"\n" only, and what is left over
    (httpx's iter_lines also splits at U+2028, U+0085 and others, which a JSON string
    may hold raw)."""
    if b"\n" not in chunk:
        return [], rest + chunk
    *lines, rest = (rest + chunk).split(b"\n")
    return lines, rest


def _byte_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A body's lines, split as `_split` does."""
    rest = b""
    for chunk in chunks:
        lines, rest = _split(rest, chunk)
        yield from lines
    if rest:
        yield rest


async def _abyte_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`_byte_lines` over an async iterator of chunks."""
    rest = b""
    async for chunk in chunks:
        lines, rest = _split(rest, chunk)
        for line in lines:
            yield line
    if rest:
        yield rest


Event = Start | Delta | ToolCall | Done  # what a stream yields (pings skipped, errors raised)


class Stream(Iterator[Event]):
    """A stream's events, as `Client.chat(..., stream=True)` returns them: the request
    was sent and its answer's head read (an HTTP error raised) when it was made; the
    body is read as it is iterated. `close()`, or the end of a `with` block, closes the
    connection, and the server cancels the generation; a loop left early does not while
    the stream lives."""

    def __init__(self, events: Generator[Event | None]) -> None:
        next(events)  # the request sent, the head read: None, or an error raised
        self._events = events

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Event:
        return cast(Event, next(self._events))  # None came first only, taken above

    def close(self) -> None:
        """Close the connection (the server cancels the generation); idempotent."""
        self._events.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(AsyncIterator[Event]):
    """A stream's events, as `await AsyncClient.chat(..., stream=True)` returns them: the
    request was sent and its answer's head read (an HTTP error raised) by that `await`;
    the body is read as it is iterated. `aclose()`, or the end of an `async with` block,
    closes the connection, and the server cancels the generation; a loop left early does
    not while the stream lives."""

    def __init__(self, events: AsyncGenerator[Event | None]) -> None:
        self._events = events

    async def _opened(self) -> AsyncStream:
        """The stream once its request is sent and its head read (an error raised)."""
        await anext(self._events)
        return self

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Event:
        return cast(Event, await anext(self._events))  # None came first only, in _opened

    async def aclose(self) -> None:
        """Close the connection (the server cancels the generation); idempotent."""
        await self._events.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Client:
    """Synchronous client."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,  # None: no timeout, as httpx
        max_retries: int = DEFAULT_MAX_RETRIES,
        on_retry: OnRetry | None = None,
        **httpx_kwargs: Any,
    ) -> None:
        url, auth = _config(base_url, api_key)
        self.url = _shown(url)
        self.max_retries = _retries(max_retries)
        self.on_retry = on_retry
        headers = _headers(auth, httpx_kwargs)
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, **httpx_kwargs)

    def with_options(self, *, max_retries: int) -> Client:
        """This client with another `max_retries` (its `on_retry` kept), on the same
        connection pool (closing either closes it)."""
        clone = copy.copy(self)
        clone.max_retries = _retries(max_retries)
        return clone

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        """The answer to one request, its head read (its body not yet), sent again as
        `max_retries` allows while the failure is retryable; an error status or a
        redirect raised, with its connection released. The caller closes the answer."""
        content, headers = (None, None) if body is None else (_encode(body), _JSON)
        retry = 0
        while True:
            try:
                return self._try(method, path, content, headers)
            except StellaClientError as exc:
                wait = retry_wait(exc, retry, self.max_retries)
                if wait is None:
                    raise
                error = exc
            if self.on_retry is not None:
                self.on_retry(error, wait)
            time.sleep(wait)
            retry += 1

    def _try(
        self, method: str, path: str, content: bytes | None, headers: dict[str, str] | None
    ) -> httpx.Response:
        """One attempt of `_open`."""
        with _network(self.url, self._http.timeout) as answer:
            request = self._http.build_request(method, path, content=content, headers=headers)
            r = self._http.send(request, stream=True)
            try:
                answer.status = r.status_code
                if r.status_code >= 400:
                    raise error_for(r, r.read())  # the body, for its error to carry
                if redirect := _redirect(r, self.url):
                    raise redirect
            except BaseException:
                r.close()
                raise
        return r

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """One request and its whole answer, an error status raised as its exception."""
        r = self._open(method, path, body)
        with _network(self.url, self._http.timeout) as answer, contextlib.closing(r):
            answer.status = r.status_code
            r.read()
        return r

    def _post(self, path: str, body: dict[str, Any]) -> ChatResponse:
        r = self._send("POST", path, body)
        return _decode(_response, r.content, self.url, r.status_code)

    def _stream(self, path: str, body: dict[str, Any]) -> Generator[Event | None]:
        """A stream's events, after a None once the answer's head is read (Stream takes
        it as it is made, so that an HTTP error raises from the call)."""
        lines = _Lines(self.url, "")
        try:
            r = self._open("POST", path, body)
            with _network(self.url, self._http.timeout) as answer, contextlib.closing(r):
                answer.status = lines.status = r.status_code
                lines.request_id = r.headers.get("x-request-id", "")
                yield None
                for line in _byte_lines(r.iter_bytes()):
                    if line.strip():
                        event = lines.event(line)
                        if event is not None:
                            yield event
                lines.end()
        except StellaClientError as exc:
            lines.named(exc)
            raise

    @overload
    def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: Literal[False] = False,
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> ChatResponse: ...

    @overload
    def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: Literal[True],
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> Stream: ...

    @overload
    def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: bool,
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> ChatResponse | Stream: ...

    def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: bool = False,
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> ChatResponse | Stream:
        """A chat: a ChatResponse, or (stream=True) a Stream of events, its request sent
        (an HTTP error raised) before it returns."""
        body = _body(
            messages,
            model,
            stream,
            options,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            metadata=metadata,
            reasoning_effort=reasoning_effort,
            thinking=thinking,
        )
        if stream:
            return Stream(self._stream("/api/v1/chat", body))
        return self._post("/api/v1/chat", body)

    @overload
    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: Literal[False] = False,
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> ChatResponse: ...

    @overload
    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: Literal[True],
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> Stream: ...

    @overload
    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: bool,
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> ChatResponse | Stream: ...

    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: bool = False,
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> ChatResponse | Stream:
        """One prompt: a ChatResponse, or (stream=True) a Stream of events, its request
        sent (an HTTP error raised) before it returns."""
        body = _generate_body(prompt, model, system, stream, options, metadata, reasoning_effort)
        if stream:
            return Stream(self._stream("/api/v1/generate", body))
        return self._post("/api/v1/generate", body)

    def embed(
        self, input: str | list[str], *, model: str | None = None, dimensions: int | None = None
    ) -> EmbedResponse:
        """POST /api/v1/embed: one vector per input (`.embeddings`), and `.usage`."""
        r = self._send("POST", "/api/v1/embed", _embed_body(input, model, dimensions))
        return _decode(_embedded, r.content, self.url, r.status_code)

    def models(self) -> ModelList:
        """The routable models."""
        r = self._send("GET", "/api/v1/models")
        return _decode(_models, r.content, self.url, r.status_code)

    def health(self) -> dict[str, Any]:
        """GET /health."""
        r = self._send("GET", "/health")
        return _decode(_json, r.content, self.url, r.status_code)

    def create_key(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        admin: bool = False,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        max_concurrent: int = 0,
        requests_per_day: int = 0,
        tokens_per_day: int = 0,
        usd_per_day: float = 0.0,
        expires_in_s: float | None = None,
    ) -> KeyCreated:
        """POST /api/v1/keys (admin): a runtime key, expiring `expires_in_s` from now
        (None: never); `.key` is the key, shown this once."""
        limits = {
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "max_concurrent": max_concurrent,
            "requests_per_day": requests_per_day,
            "tokens_per_day": tokens_per_day,
            "usd_per_day": usd_per_day,
        }
        body = _key_body(name, models, admin, limits, expires_in_s)
        r = self._send("POST", "/api/v1/keys", body)
        return _decode(_key_created, r.content, self.url, r.status_code)

    def update_key(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        admin: bool | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_concurrent: int | None = None,
        requests_per_day: int | None = None,
        tokens_per_day: int | None = None,
        usd_per_day: float | None = None,
        expires_in_s: float | None = None,
        no_expiry: bool = False,
    ) -> KeyInfo:
        """PATCH /api/v1/keys/{name} (admin): change a runtime key's settings (None:
        unchanged; `no_expiry` clears its expiry), its secret kept."""
        limits = {
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "max_concurrent": max_concurrent,
            "requests_per_day": requests_per_day,
            "tokens_per_day": tokens_per_day,
            "usd_per_day": usd_per_day,
        }
        body = _update_body(models, admin, limits, expires_in_s, no_expiry)
        r = self._send("PATCH", _key_path(name), body)
        return _decode(_key_info, r.content, self.url, r.status_code)

    def rotate_key(self, name: str, *, grace_s: float = 0) -> KeyCreated:
        """POST /api/v1/keys/{name}/rotate (admin): a new secret for a runtime key
        (`.key`, shown this once); the old one works `grace_s` more seconds."""
        body = {"grace_s": grace_s}
        r = self._send("POST", _key_path(name) + "/rotate", body)
        return _decode(_key_created, r.content, self.url, r.status_code)

    def list_keys(self) -> KeyList:
        """GET /api/v1/keys (admin): every key (`.keys`), never a digest or a key."""
        r = self._send("GET", "/api/v1/keys")
        return _decode(_key_list, r.content, self.url, r.status_code)

    def revoke_key(self, name: str, *, purge: bool = False) -> KeyRevoked:
        """DELETE /api/v1/keys/{name} (admin): revoke a key on every replica; `purge`
        drops a runtime key's stored entry too, so that its name is free again."""
        r = self._send("DELETE", _revoke_path(name, purge))
        return _decode(_key_revoked, r.content, self.url, r.status_code)

    def usage(
        self, day: str | None = None, *, key: str | None = None, model: str | None = None
    ) -> UsageReport:
        """GET /api/v1/usage (admin): a day's rows per key and model (`.usage`, each with
        its `cost_usd`) and their `.totals` (None: today, UTC)."""
        r = self._send("GET", _usage_path(day, key, model))
        return _decode(_usage, r.content, self.url, r.status_code)


class AsyncClient:
    """Asynchronous client."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,  # None: no timeout, as httpx
        max_retries: int = DEFAULT_MAX_RETRIES,
        on_retry: OnRetry | None = None,
        **httpx_kwargs: Any,
    ) -> None:
        url, auth = _config(base_url, api_key)
        self.url = _shown(url)
        self.max_retries = _retries(max_retries)
        self.on_retry = on_retry
        headers = _headers(auth, httpx_kwargs)
        self._http = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=timeout, **httpx_kwargs
        )

    def with_options(self, *, max_retries: int) -> AsyncClient:
        """This client with another `max_retries` (its `on_retry` kept), on the same
        connection pool (closing either closes it)."""
        clone = copy.copy(self)
        clone.max_retries = _retries(max_retries)
        return clone

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _open(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        """The answer's head, sent again while retryable, as Client._open."""
        content, headers = (None, None) if body is None else (_encode(body), _JSON)
        retry = 0
        while True:
            try:
                return await self._try(method, path, content, headers)
            except StellaClientError as exc:
                wait = retry_wait(exc, retry, self.max_retries)
                if wait is None:
                    raise
                error = exc
            if self.on_retry is not None:
                self.on_retry(error, wait)
            await asyncio.sleep(wait)
            retry += 1

    async def _try(
        self, method: str, path: str, content: bytes | None, headers: dict[str, str] | None
    ) -> httpx.Response:
        """One attempt of `_open`."""
        with _network(self.url, self._http.timeout) as answer:
            request = self._http.build_request(method, path, content=content, headers=headers)
            r = await self._http.send(request, stream=True)
            try:
                answer.status = r.status_code
                if r.status_code >= 400:
                    raise error_for(r, await r.aread())  # the body, for its error to carry
                if redirect := _redirect(r, self.url):
                    raise redirect
            except BaseException:
                await r.aclose()
                raise
        return r

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """One request and its whole answer, as Client._send."""
        r = await self._open(method, path, body)
        with _network(self.url, self._http.timeout) as answer:
            try:
                answer.status = r.status_code
                await r.aread()
            finally:
                await r.aclose()
        return r

    async def _post(self, path: str, body: dict[str, Any]) -> ChatResponse:
        r = await self._send("POST", path, body)
        return _decode(_response, r.content, self.url, r.status_code)

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncGenerator[Event | None]:
        """A stream's events after a None, as Client._stream."""
        lines = _Lines(self.url, "")
        try:
            r = await self._open("POST", path, body)
            try:
                with _network(self.url, self._http.timeout) as answer:
                    answer.status = lines.status = r.status_code
                    lines.request_id = r.headers.get("x-request-id", "")
                    yield None
                    async for line in _abyte_lines(r.aiter_bytes()):
                        if line.strip():
                            event = lines.event(line)
                            if event is not None:
                                yield event
                    lines.end()
            finally:
                await r.aclose()
        except StellaClientError as exc:
            lines.named(exc)
            raise

    @overload
    async def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: Literal[False] = False,
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> ChatResponse: ...

    @overload
    async def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: Literal[True],
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> AsyncStream: ...

    @overload
    async def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: bool,
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> ChatResponse | AsyncStream: ...

    async def chat(
        self,
        messages: list[Any],
        model: str | None = None,
        *,
        stream: bool = False,
        options: dict[str, Any] | None = None,
        tools: list[Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        thinking: dict[str, Any] | None = None,
    ) -> ChatResponse | AsyncStream:
        """A chat: a ChatResponse, or (stream=True) an AsyncStream of events, its request
        sent (an HTTP error raised) by the await."""
        body = _body(
            messages,
            model,
            stream,
            options,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            metadata=metadata,
            reasoning_effort=reasoning_effort,
            thinking=thinking,
        )
        if stream:
            return await AsyncStream(self._stream("/api/v1/chat", body))._opened()
        return await self._post("/api/v1/chat", body)

    @overload
    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: Literal[False] = False,
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> ChatResponse: ...

    @overload
    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: Literal[True],
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> AsyncStream: ...

    @overload
    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: bool,
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> ChatResponse | AsyncStream: ...

    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        system: str | None = None,
        stream: bool = False,
        options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> ChatResponse | AsyncStream:
        """One prompt: a ChatResponse, or (stream=True) an AsyncStream of events, its
        request sent (an HTTP error raised) by the await."""
        body = _generate_body(prompt, model, system, stream, options, metadata, reasoning_effort)
        if stream:
            return await AsyncStream(self._stream("/api/v1/generate", body))._opened()
        return await self._post("/api/v1/generate", body)

    async def embed(
        self, input: str | list[str], *, model: str | None = None, dimensions: int | None = None
    ) -> EmbedResponse:
        """POST /api/v1/embed: one vector per input (`.embeddings`), and `.usage`."""
        r = await self._send("POST", "/api/v1/embed", _embed_body(input, model, dimensions))
        return _decode(_embedded, r.content, self.url, r.status_code)

    async def models(self) -> ModelList:
        """The routable models."""
        r = await self._send("GET", "/api/v1/models")
        return _decode(_models, r.content, self.url, r.status_code)

    async def health(self) -> dict[str, Any]:
        """GET /health."""
        r = await self._send("GET", "/health")
        return _decode(_json, r.content, self.url, r.status_code)

    async def create_key(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        admin: bool = False,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        max_concurrent: int = 0,
        requests_per_day: int = 0,
        tokens_per_day: int = 0,
        usd_per_day: float = 0.0,
        expires_in_s: float | None = None,
    ) -> KeyCreated:
        """POST /api/v1/keys (admin): a runtime key, expiring `expires_in_s` from now
        (None: never); `.key` is the key, shown this once."""
        limits = {
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "max_concurrent": max_concurrent,
            "requests_per_day": requests_per_day,
            "tokens_per_day": tokens_per_day,
            "usd_per_day": usd_per_day,
        }
        body = _key_body(name, models, admin, limits, expires_in_s)
        r = await self._send("POST", "/api/v1/keys", body)
        return _decode(_key_created, r.content, self.url, r.status_code)

    async def update_key(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        admin: bool | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_concurrent: int | None = None,
        requests_per_day: int | None = None,
        tokens_per_day: int | None = None,
        usd_per_day: float | None = None,
        expires_in_s: float | None = None,
        no_expiry: bool = False,
    ) -> KeyInfo:
        """PATCH /api/v1/keys/{name} (admin): change a runtime key's settings (None:
        unchanged; `no_expiry` clears its expiry), its secret kept."""
        limits = {
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "max_concurrent": max_concurrent,
            "requests_per_day": requests_per_day,
            "tokens_per_day": tokens_per_day,
            "usd_per_day": usd_per_day,
        }
        body = _update_body(models, admin, limits, expires_in_s, no_expiry)
        r = await self._send("PATCH", _key_path(name), body)
        return _decode(_key_info, r.content, self.url, r.status_code)

    async def rotate_key(self, name: str, *, grace_s: float = 0) -> KeyCreated:
        """POST /api/v1/keys/{name}/rotate (admin): a new secret for a runtime key
        (`.key`, shown this once); the old one works `grace_s` more seconds."""
        body = {"grace_s": grace_s}
        r = await self._send("POST", _key_path(name) + "/rotate", body)
        return _decode(_key_created, r.content, self.url, r.status_code)

    async def list_keys(self) -> KeyList:
        """GET /api/v1/keys (admin): every key (`.keys`), never a digest or a key."""
        r = await self._send("GET", "/api/v1/keys")
        return _decode(_key_list, r.content, self.url, r.status_code)

    async def revoke_key(self, name: str, *, purge: bool = False) -> KeyRevoked:
        """DELETE /api/v1/keys/{name} (admin): revoke a key on every replica; `purge`
        drops a runtime key's stored entry too, so that its name is free again."""
        r = await self._send("DELETE", _revoke_path(name, purge))
        return _decode(_key_revoked, r.content, self.url, r.status_code)

    async def usage(
        self, day: str | None = None, *, key: str | None = None, model: str | None = None
    ) -> UsageReport:
        """GET /api/v1/usage (admin), as Client.usage."""
        r = await self._send("GET", _usage_path(day, key, model))
        return _decode(_usage, r.content, self.url, r.status_code)
