"""What every hand-written route shares: auth, body decoding, error shapes, running a call.

A dialect is a `Dialect` with its error shape; `endpoint()` wraps a route so it
receives a ready `Call` and every StellaError becomes that dialect's error
response, never a 500.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response

from stella.core import Call, Inference, log_fault, watch_leaving
from stella.errors import (
    ClientGone,
    ClientTooSlow,
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    ShuttingDown,
    StellaError,
    Unauthorized,
    UnsupportedMediaType,
)
from stella.protocol import ChatResponse, ErrorDetail, ErrorResponse
from stella.streaming import WATCH_AFTER_S, Codec, EventStream

if TYPE_CHECKING:  # the app imports every route module
    from stella.app import Services

T = TypeVar("T")
_log = structlog.get_logger("stella")
_json = msgspec.json.Encoder()

# curl -d sends form-urlencoded by default; a JSON API accepts it rather than fail the
# most common first try. LiteLLM's async Ollama calls send octet-stream (Ollama reads
# any body as JSON). Anything else that is clearly not JSON gets 415.
_JSONISH = (
    "application/json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "application/octet-stream",
    "",
)


# The most of a name from a request's path a message or log line repeats: the request
# line may hold 64 KiB of it.
SHOWN_PATH_MAX = 200


def shown_cut(text: str) -> str:
    """`text` from a request's path as messages quote it: cut at SHOWN_PATH_MAX
    characters, and an ellipsis."""
    return text if len(text) <= SHOWN_PATH_MAX else text[:SHOWN_PATH_MAX] + "…"


class JSONResponse(Response):
    """A response whose body is encoded with msgspec (headers built in one step)."""

    media_type = "application/json"

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        headers: dict[str, str] | list[tuple[bytes, bytes]] | None = None,
        media_type: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.background = None
        body = self.body = _json.encode(content)
        raw = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", media_type.encode() if media_type else b"application/json"),
        ]
        if type(headers) is list:
            raw += headers  # already encoded (a permit's rate-limit headers)
        elif headers:
            for k, v in headers.items():  # type: ignore[union-attr]
                raw.append((k.lower().encode("latin-1"), v.encode("latin-1")))
        self.raw_headers = raw


class Dialect:
    """An API's error shape; subclasses override `error_body`."""

    name = "native"
    # The header the copied API names its request ID with, besides X-Request-ID (b"": none).
    id_header = b""

    def error_body(self, exc: StellaError, request_id: str) -> Any:
        """The JSON body of an error response."""
        return ErrorResponse(
            ErrorDetail(
                code=exc.code,
                message=exc.message,
                request_id=request_id,
                retryable=exc.retryable,
            )
        )

    def status(self, exc: StellaError) -> int:
        """The HTTP status of an error in this API (the error's own, unless overridden)."""
        return exc.status

    def error_response(self, exc: StellaError, request_id: str) -> Response:
        """The whole error response, headers included."""
        response = JSONResponse(
            self.error_body(exc, request_id), self.status(exc), headers=exc.headers
        )
        # x-should-retry: the official OpenAI and Anthropic SDKs obey it over their own
        # rule (retry every 5xx): a failure stella knows is final (an upstream's refusal of
        # the request) is not sent again, and one that may pass on another try is. And
        # nosniff: an error's body may quote the request (a path, a model's name), and no
        # browser may read it as anything but JSON (a successful answer, on the hot path,
        # goes without).
        response.raw_headers += _ERROR_HEADERS[exc.retryable]
        if self.id_header:
            response.raw_headers.append((self.id_header, request_id.encode()))
        return response


NOSNIFF = (b"x-content-type-options", b"nosniff")
_ERROR_HEADERS = {
    retry: [(b"x-should-retry", b"true" if retry else b"false"), NOSNIFF] for retry in (True, False)
}


NATIVE = Dialect()
# Picks the dialect by the request's ASGI scope, for a path two APIs share.
DialectPick = Callable[[Mapping[str, Any]], Dialect]


def services(request: Request) -> Services:
    """The app's Services (settings, pipeline, auth, ...)."""
    return request.scope.get("stella") or request.app.state.stella


def names_shown(request: Request) -> bool:
    """Whether a public (keyless) route may name models and backends: only without keys.
    With keys, a key limited to some models is shown `default: null` in the model lists;
    a route anyone may call must not tell what they hide."""
    return not services(request).auth.enabled


def request_id(request: Request) -> str:
    """The request's ID, set by the RequestContext middleware."""
    return request.scope.get("state", {}).get("request_id", "")


# What a route handler answers with: a response, or an inference's stream (an ASGI app
# with raw_headers, as a Response has).
Reply = Response | EventStream
Handler = Callable[[Request, Call], Awaitable[Reply]]


class Endpoint:
    """A route as a plain ASGI app: authenticate, run the handler, map StellaErrors.

    Being ASGI (not a function) spares each request Starlette's
    request/response wrapper and its exception-handling layer; every error a
    handler can raise is a StellaError and becomes the dialect's error shape.
    """

    def __init__(
        self,
        fn: Handler,
        dialect: Dialect,
        auth: str,
        pick: Callable[[dict[str, Any]], Dialect] | None = None,
        inference: bool = False,
    ) -> None:
        self.fn = fn
        self.dialect = dialect
        self.error_status = _error_status(dialect)
        self.auth = auth
        self.pick = pick  # chooses the dialect by the request, for a route two APIs share
        # An inference route's refusals are counted (stella_rejections_total): a lookup's
        # 404 or an admin's 409 is no inference refused, and would skew the ratio of
        # refusals to inferences.
        self.inference = inference
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive, send)
        rid = scope["state"]["request_id"] if "state" in scope else ""
        svc = scope.get("stella") or request.app.state.stella
        dialect = self.dialect
        error_status = self.error_status
        if self.pick is not None:
            dialect = self.pick(scope)
            error_status = _error_status(dialect)
        try:
            call = Call(request_id=rid, api=dialect.name, receive=receive, headers=scope["headers"])
            if error_status is not None:
                call.error_status = error_status
            if self.auth != "none":
                call.principal = svc.auth.authenticate(scope["headers"], call, scope.get("server"))
                if self.auth == "admin" and not call.principal.admin:
                    raise Forbidden("this route needs an admin key")
            response = await self.fn(request, call)
            if dialect.id_header:  # an error response has it from error_response
                response.raw_headers.append((dialect.id_header, rid.encode()))
        except StellaError as exc:
            if isinstance(exc, Unauthorized | Forbidden):
                # A key refused by its scope is known: its name goes with the event.
                svc.auth.failed(exc, scope, rid, call.principal if exc.reason == "scope" else None)
            if self.inference and not exc.admitted:
                # call.api, not the dialect's name: a route may answer in another
                # shape once it has read the body (/api/v1/generate's SSE form).
                svc.rejected(exc, call.api)
            response = dialect.error_response(exc, rid)
            if type(exc) is PayloadTooLarge or body_over_limit(
                scope, svc.settings.server.max_body_bytes
            ):
                # The rest of the body is not worth reading (a chunked one over the
                # limit too): the connection ends, lingering (bounded).
                response.raw_headers.append(CLOSE)
        except Exception as exc:  # a bug: log it, answer in the dialect's shape
            # Its message may quote the request: only with log.content (see log_fault).
            log_fault("request_failed", exc, svc.settings.log.content, path=scope["path"])
            response = dialect.error_response(
                StellaError("internal error; see the server log"), rid
            )
        if scope["method"] in READS:
            # What a GET answers depends on the caller's key, which X-API-Key carries where
            # a shared cache keeps no answer apart (RFC 9111 3.5 protects Authorization
            # alone), or on the server's state now: no cache may keep it.
            response.raw_headers.append(NO_STORE)
        # Reached without the RequestContext middleware (see StellaApp): the ID header
        # goes straight into the response instead of through a wrapped `send`.
        header = scope.get("rid_header")
        if header is not None:
            raw = getattr(response, "raw_headers", None)
            if raw is not None:
                raw.append(header)
            else:
                send = with_header(send, header)
        await response(scope, receive, send)


def _error_status(dialect: Dialect) -> Callable[[StellaError], int] | None:
    """A dialect whose statuses differ from the errors' own tells its calls (for the
    inference log and metrics), bound once per route: the others' calls carry nothing."""
    return None if type(dialect).status is Dialect.status else dialect.status


CLOSE = (b"connection", b"close")
NO_STORE = (b"cache-control", b"no-store")
READS = ("GET", "HEAD")  # the methods whose answers are no-store


def body_over_limit(scope: Mapping[str, Any], max_bytes: int) -> bool:
    """Whether the request announced a body over the limit: an answer before it was read
    (a 401, 403, 404) then ends the connection, lingering, instead of keeping it alive
    by reading every byte announced to drop them."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value) > max_bytes
            except ValueError:
                return False
    return False


def with_header(send: Any, header: tuple[bytes, bytes]) -> Any:
    """`send`, adding `header` to the response start."""

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return wrapped


def endpoint(
    dialect: Dialect = NATIVE,
    *,
    auth: str = "user",
    pick: Callable[[dict[str, Any]], Dialect] | None = None,
    inference: bool = False,
) -> Callable[[Handler], Endpoint]:
    """Wrap a route handler: authenticate (auth = "user" | "admin" | "none"), map errors
    in `dialect`'s shape (or in the one `pick` chooses from the request's ASGI scope);
    an `inference` route (one that runs the pipeline) reports its refusals to metrics."""

    def wrap(fn: Handler) -> Endpoint:
        return Endpoint(fn, dialect, auth, pick, inference)

    return wrap


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing non-JSON types and bodies over `max_bytes`."""
    ctype = b""
    length = None
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            ctype = value
        elif name == b"content-length":
            length = value
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            # Read as JSON, compressed bytes would only be "malformed".
            coding = value.decode("latin-1").strip()
            raise UnsupportedMediaType(
                f"content-encoding {coding!r} is not supported; send the body uncompressed",
                # RFC 9110 15.5.16: the codings a request may use.
                headers={"Accept-Encoding": "identity"},
            )
    if ctype and ctype != b"application/json":
        kind, _, params = ctype.decode("latin-1").partition(";")
        kind = kind.strip().lower()
        if kind not in _JSONISH and not kind.endswith("+json"):
            raise UnsupportedMediaType(
                f"content-type {kind!r} is not supported; send application/json"
            )
        if params and (charset := _charset(params)).startswith(_NOT_ASCII):
            # Read as UTF-8, a UTF-16 body is only "malformed" at its first byte. Other
            # labels (latin-1, as old HTTP clients put on every body) are read as UTF-8:
            # their ASCII JSON is the same bytes, and anything else is a clear 400.
            raise UnsupportedMediaType(
                f"JSON bodies must be UTF-8; the content-type says charset={charset!r}: "
                "send UTF-8 (charset=utf-8, or none)"
            )
    if length is not None:
        try:
            too_big = int(length) > max_bytes
        except ValueError:
            raise InvalidRequest("invalid Content-Length header") from None
        if too_big:
            raise PayloadTooLarge(f"request body over {max_bytes} bytes")
    # Straight from ASGI `receive`: Starlette's stream() wrapper costs more than the read.
    receive = request.receive
    message = await receive()
    if message["type"] != "http.request":
        raise body_gone(request.scope)
    chunk = message.get("body", b"")
    if not message.get("more_body", False):
        if len(chunk) > max_bytes:
            raise PayloadTooLarge(f"request body over {max_bytes} bytes")
        if not chunk and "stella.body_unread" in request.scope:  # see transport.py
            raise InvalidRequest(
                "the request asks to upgrade the connection (an Upgrade header), which "
                "stella does not do, and its body did not come with its headers: send it "
                "without Upgrade (curl: --http1.1)"
            )
        return chunk  # the usual case: the whole body in one message
    return await _read_rest(request, receive, [chunk] if chunk else [], max_bytes)


# Charsets whose text is not ASCII's bytes: a body in one cannot be read as UTF-8.
_NOT_ASCII = ("utf-16", "utf16", "utf-32", "utf32", "ucs-2", "ucs2", "ucs-4", "ucs4", "utf-7")


# One parameter of a media type (RFC 9110 5.6.6): its name, and its value, a quoted string
# (whose `;` is part of it; an unended one runs to the end, and what follows its end up to
# the next `;` is dropped) or a token.
_PARAM = re.compile(r'\s*([^=;]*?)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"?[^;]*|([^;]*)))?(?:;|$)')
_QUOTED_PAIR = re.compile(r"\\(.)")


def _charset(params: str) -> str:
    """The charset a Content-Type's parameters name, lowercased ("" when none)."""
    for match in _PARAM.finditer(params):
        name, quoted, token = match.groups()
        if name.lower() == "charset":
            value = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else token or ""
            charset = value.strip().lower()
            return charset if len(charset) <= 40 else charset[:40] + "…"
    return ""


def body_gone(scope: Mapping[str, Any]) -> StellaError:
    """Why a request's body stopped coming: the client left (499 client_closed), or the
    server stopped waiting for it (408 client_too_slow; stella.transport's body limit)."""
    late = scope.get("stella.body_late")
    if late is not None:  # set only by stella.transport, which is loaded then
        from stella.transport import BODY_MIN_RATE

        return ClientTooSlow(
            f"the request body stopped arriving: {late:g}s after its headers, it came slower"
            f" than {BODY_MIN_RATE} bytes a second"
        )
    return ClientGone("the client disconnected while sending the body")


class _BodyRead:
    """What the drain ends for a body still arriving (it has no call yet)."""

    __slots__ = ("cancel_reason",)
    reading_body = True  # not a call running: the in-flight gauge leaves it out

    def __init__(self) -> None:
        self.cancel_reason: str | None = None


async def _read_rest(request: Request, receive: Any, chunks: list[bytes], max_bytes: int) -> bytes:
    """The rest of a body that did not come in one message. A shutdown's drain waits
    for it as for a running call, and ends it when the drain is over (503
    shutting_down): uvicorn's own limit, past the drain, would cancel it with a 500."""
    size = sum(map(len, chunks))
    if size > max_bytes:
        raise PayloadTooLarge(f"request body over {max_bytes} bytes")
    svc = request.scope.get("stella")
    task = asyncio.current_task()
    read = _BodyRead()
    drain = svc.drain if svc is not None and task is not None else None
    if drain is not None and not drain.enter(read, task):
        raise ShuttingDown("the server is shutting down; retry on another instance")
    try:
        while True:
            try:
                message = await receive()
            except asyncio.CancelledError:
                if read.cancel_reason == "shutting_down":
                    raise ShuttingDown(
                        "the server is shutting down; retry on another instance"
                    ) from None
                raise
            if message["type"] != "http.request":
                raise body_gone(request.scope)
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"request body over {max_bytes} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        if drain is not None:
            drain.leave(task)


def decode(body: bytes, type_: type[T], decoder: msgspec.json.Decoder[T] | None = None) -> T:
    """Decode a JSON body into a struct; InvalidRequest carries msgspec's JSON path.

    The error's `param` is the offending field's path without the leading `$.`
    ("" when the body as a whole is wrong), for dialects that name it apart.
    """
    if not body.strip():
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        return decoder.decode(body) if decoder else msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidRequest.blaming(str(exc)) from None
    except msgspec.DecodeError as exc:
        if body.startswith(_UTF8_BOM) and not body.startswith(_UTF8_BOM, 3):
            # RFC 8259 8.1: a parser may ignore a leading byte-order mark. Looked for only
            # once a body failed (at its byte 0): a body without one pays nothing for it.
            return decode(body[3:], type_, decoder)
        if body.startswith(_UTF16_BOMS):
            raise UnsupportedMediaType(
                "JSON bodies must be UTF-8; this one starts with a UTF-16 byte-order mark"
            ) from None
        text = str(exc)  # "JSON is malformed: ... (byte N)" or "Input data was truncated"
        if text.startswith("Invalid UTF-8"):  # msgspec 0.23 checks the bytes itself
            raise InvalidRequest("request body is not valid UTF-8") from None
        if not text.startswith("JSON is malformed"):
            # msgspec reads the 6 bytes after an escaped high surrogate as the low one it
            # needs, and calls fewer left "truncated", though the string ends right there.
            lone = _LONE_HIGH_SURROGATE.search(body)
            if lone is not None:
                text = f"JSON is malformed: invalid utf-16 surrogate pair (byte {lone.end()})"
            else:
                text = f"JSON is malformed: {text[:1].lower()}{text[1:]}"
        raise InvalidRequest(text) from None
    # Neither is a msgspec error: bad bytes inside a string, and a body nested deeper
    # than Python's recursion limit (a few KB of brackets in any free-form field).
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # (UTF-32's begin as UTF-16's little-endian one)


# An escaped high surrogate (an unescaped backslash before its `\u`) followed neither by
# an escaped low one nor by the start of one cut off by the body's end (a real truncation).
_LONE_HIGH_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}"
    rb"(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"(?!(?:\\(?:u(?:[dD](?:[c-fC-F][0-9a-fA-F]{0,2})?)?)?)?\Z)"
)


async def read_json(request: Request, decoder: msgspec.json.Decoder[T]) -> T:
    """Read and decode the body with a prebuilt decoder."""
    body = await read_body(request, services(request).settings.server.max_body_bytes)
    # msgspec 0.23 types a decoder's `type` as a TypeForm, 0.22 as a type: the same object.
    return decode(body, cast("type[T]", decoder.type), decoder)


def stream_response(
    request: Request, inference: Inference, codec: Codec, dialect: Dialect | None = None
) -> EventStream:
    """The streaming response for an admitted inference, in a dialect's codec.

    The native stream starts at once (protocol.md). With a `dialect`, the status line
    waits for the first event (at most stream.ping_interval_s), as the API copied
    would: a failure before it is an HTTP error in the dialect's shape.
    """
    svc = services(request)
    refuse = None
    if dialect is not None:
        rid = inference.call.request_id

        def refuse(exc: StellaError) -> Response:
            return dialect.error_response(with_rate_headers(exc, inference), rid)

    return EventStream(
        inference,
        codec,
        drain=svc.drain,
        ping_interval_s=svc.settings.stream.ping_interval_s,
        headers=inference.permit.headers,
        refuse=refuse,
    )


async def run_to_end(request: Request, inference: Inference) -> ChatResponse:
    """Run a non-stream inference to its end (see `answer_of`)."""
    return await answer_of(request, inference, inference.result)


async def answer_of(
    request: Request, inference: Inference, produce: Callable[[], Awaitable[T]]
) -> T:
    """Run a non-stream inference to its end: what `produce` (the inference's own way to
    run it whole: a chat's `result`, an embed's `embeddings`) returns.

    A client that disconnects cancels the backend, as in a stream; shutdown past
    the drain deadline ends the call with 503 `shutting_down`.
    """
    svc = services(request)
    call = inference.call
    task = asyncio.current_task()
    assert task is not None
    entered = svc.drain.enter(call, task)
    inference.task = task
    # Most answers are ready long before a client gives up: watch for a disconnect
    # only once the call has taken a while (the call's watchdog says when), so fast
    # calls pay no extra task.
    watcher: list[asyncio.Task[Any]] = []
    inference.slow = (
        WATCH_AFTER_S,
        lambda: watcher.append(
            task.get_loop().create_task(watch_leaving(request.receive, call, task))
        ),
    )
    try:
        if not entered:  # the drain is over: ended before it began
            raise ShuttingDown()
        result = await produce()
        protocol = request.scope.get("stella.protocol")
        if protocol is not None:
            # Its write gets what is left of the total limit, at least a second: a client
            # that stops reading is then dropped (stella.transport), as a stream's is.
            protocol.send_by = inference.ends_at
            protocol.send_rid = call.request_id
        return result
    except asyncio.CancelledError:
        if call.cancel_reason is None:
            raise
        task.uncancel()
        gone: StellaError = (
            ClientGone("the client disconnected before the answer was ready")
            if call.cancel_reason == "client_closed"
            else ShuttingDown()
        )
        gone.admitted = True
        raise gone from None
    except StellaError as exc:
        exc.admitted = True  # the inference's log event and metrics have it already
        with_rate_headers(exc, inference)
        raise
    finally:
        for w in watcher:
            w.cancel()
        inference.finish()
        svc.drain.leave(task)


def with_rate_headers(exc: StellaError, inference: Inference) -> StellaError:
    """`exc` carrying the admitted call's X-RateLimit headers too: a call that failed
    still counted against them."""
    if inference.permit.headers:
        rate = {k.decode("latin-1"): v.decode("latin-1") for k, v in inference.permit.headers}
        exc.headers = {**rate, **exc.headers}
    return exc
