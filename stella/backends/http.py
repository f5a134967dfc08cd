"""What every remote backend shares: one pooled client, error mapping, line reading.

One `httpx.AsyncClient` per backend, made in `start()` on the aiohttp transport
(httpx's own pool slows down as concurrency rises), closed in `aclose()`. The
upstream host comes only from the config's `base_url`.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import os
import re
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Annotated, Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx
import msgspec
import structlog
from aiohttp.client_proto import ResponseHandler
from httpx_aiohttp import AiohttpTransport
from msgspec import Meta

from stella.backends import ConfigError
from stella.backends.base import Backend, BackendConfig, BackendHealth, CallContext
from stella.errors import (
    StellaError,
    UpstreamContextTooLong,
    UpstreamError,
    UpstreamNoSuchPath,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
    waited_out,
)
from stella.logs import mask, mask_cut
from stella.settings import basic_credential, pasted_secret

T = TypeVar("T")


class HttpConfig(BackendConfig, kw_only=True):
    """Keys every remote backend takes."""

    base_url: str
    api_key_env: str = ""  # name of the environment variable holding the key
    headers: dict[str, str] = {}  # extra static headers
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    # Per read; the route's idle timeout is usually shorter.
    read_timeout_s: Annotated[float, Meta(gt=0)] = 300.0
    max_connections: Annotated[int, Meta(ge=1)] = 256
    # An idle pooled connection is closed after this long (0: none is kept, each request
    # has a connection of its own, closed after its answer).
    keepalive_s: Annotated[float, Meta(ge=0)] = 30.0


class _OpenAIError(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    error: _OpenAIError | str | None = None
    message: str | None = None
    detail: str | None = None


_error_body = msgspec.json.Decoder(_ErrorBody)


class _Model(msgspec.Struct):
    id: str


class _Models(msgspec.Struct):
    data: list[_Model] = []


# OpenAI's model list and Anthropic's share this shape: {"data": [{"id": ...}, ...]}.
_models = msgspec.json.Decoder(_Models)

# An upstream's error message as the client and the log get it: at most this long.
MAX_MESSAGE = 500
# How much of an error body is read: an API's JSON error fits; of a non-JSON one its
# words are taken (an HTML page's styles and scripts come first and are dropped whole).
# The rest is never read (its connection is closed): an upstream's error page, however
# long, costs no memory and does not hide its status.
HTML_SCAN = 64 * 1024


# When this task's last request got its connection from the pool (time.perf_counter():
# a wait for a free connection is not time the upstream had the request), and whether
# that connection had served a request before (kept alive: the upstream may have closed
# it meanwhile) or was new.
_connected: ContextVar[tuple[float, bool]] = ContextVar("stella_connected", default=(0.0, False))
# The chat call whose request the task is sending (set around its POST): a wait for the
# pool is told to it. None for the httpx client's requests (model lists, health checks).
_call: ContextVar[CallContext | None] = ContextVar("stella_call", default=None)


class _Handler(ResponseHandler):
    """A connection's protocol whose failure reaches the body being read on it.

    aiohttp (3.14, its C parser) puts a parse error met inside a body (a malformed
    chunk after good ones) on the connection only, closes it and stops its read timer:
    the body already handed out gets neither data, an end, nor the error, and a read
    of it waits for good. Every failure of the connection goes through this method
    (parse error, connection lost, read timeout); the body is told here, once, when it
    happens, so that reads cost nothing more.
    """

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        """Fail the connection, and the body it is reading (unless it ended or failed)."""
        payload = self._payload
        super().set_exception(exc, *args)
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            if not isinstance(exc, aiohttp.ClientError):  # a parser's HttpProcessingError
                cause = exc
                exc = aiohttp.ClientPayloadError(f"Response payload is not completed: {exc!r}")
                exc.__cause__ = cause
            payload.set_exception(exc)

    # Whether a request was given this connection already (set by _Connector.connect).
    used = False


class _Connector(aiohttp.TCPConnector):
    """The pool, noting when each request got its connection, and telling a chat call
    that had to wait for one (a wait is queueing: stella's load, not the upstream's)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name
        # aiohttp declares a partial of ResponseHandler, and partial's stub is invariant
        # in what it makes: a partial making the subclass _Handler is one all the same.
        self._factory = cast(
            "functools.partial[ResponseHandler]", functools.partial(_Handler, loop=self._loop)
        )

    async def connect(self, *args: Any, **kwargs: Any) -> aiohttp.connector.Connection:
        """A connection from the pool (or a new one), the moment and its reuse noted."""
        conn = await super().connect(*args, **kwargs)
        proto = conn.protocol
        reused = proto.used if isinstance(proto, _Handler) else False
        if isinstance(proto, _Handler):
            proto.used = True
        _connected.set((time.perf_counter(), reused))
        return conn

    async def _wait_for_available_connection(self, key: Any, traces: list[Any]) -> None:
        """Wait for a free connection as aiohttp does; a chat call is told of its wait,
        and gives its place up, unsent, when it got one after its time ran out."""
        # Reached only when every connection is taken: the uncontended call pays nothing.
        ctx = _call.get()
        if ctx is None:
            await super()._wait_for_available_connection(key, traces)
            return
        start = time.perf_counter()
        if not ctx.queue_ms:
            ctx.queued_at = start
        ctx.waiting_for = (
            f"a free connection to backend {self.name!r} "
            f"(all of its max_connections = {self.limit} in use)"
        )
        try:
            await super()._wait_for_available_connection(key, traces)
        except asyncio.CancelledError:
            # Woken for a free connection just before being cancelled (its time limit, its
            # client gone): the connection goes to the next in line, not to the next release.
            if self._available_connections(key) > 0:
                self._release_waiter()
            raise  # `waiting_for` stays set: the core reads the cut as a wait for the pool
        now = time.perf_counter()
        what, ctx.waiting_for = ctx.waiting_for, ""
        ctx.queue_ms += (now - start) * 1000
        if ctx.first_by and now >= ctx.first_by:
            # Its limit passed while it waited (the core's ticker cancels it within a tick):
            # a request sent now would be one the upstream works on for nobody.
            self._release_waiter()
            raise waited_out(what, now - start)


class HttpBackend(Backend):
    """Base of the remote adapters: the client and its lifecycle."""

    Config = HttpConfig
    client: httpx.AsyncClient

    def __init__(self, name: str, config: HttpConfig) -> None:
        super().__init__(name, config)
        self.http = config
        self._draining: set[asyncio.Task[None]] = set()
        # Chat calls holding or waiting for a pooled connection (a body being read to its
        # end included): over max_connections, someone waits for the pool.
        self.using = 0
        # Whether connections are kept for the next request (keepalive_s = 0: never).
        self.keep = config.keepalive_s > 0
        url = config.base_url
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != -1
        except ValueError:  # a bad port or bracket
            ok = False
        if not ok or any(c.isspace() for c in url):
            shown = repr(url) if "@" not in url else "the URL"  # it may hold a password
            raise ConfigError(f"backends.{name}.base_url: {shown} is not an http(s) URL")
        if pasted_secret("api_key_env", config.api_key_env):
            # Likely the key itself, pasted where its variable's name goes: not shown, and
            # refused before a warning about the variable could log it.
            raise ConfigError(
                f"backends.{name}.api_key_env: not an environment variable name (letters, "
                "digits, _): name the variable that holds the key, not the key"
            )
        # A user and password in the URL go as a Basic Authorization header of their own:
        # left in it, the pooled client would send them twice (and aiohttp refuses).
        self.basic: dict[str, str] = {}
        if parts.username is not None or parts.password is not None:
            if config.api_key_env or any(h.lower() == "authorization" for h in config.headers):
                raise ConfigError(
                    f"backends.{name}.base_url: holds a user and password, and api_key_env "
                    "or an Authorization header is set too; use one of them"
                )
            self.basic = {"Authorization": "Basic " + basic_credential(url)}
            url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self.base_url = url.rstrip("/")
        self.api_key = ""

    def auth_headers(self) -> dict[str, str]:
        """Headers carrying the key (each adapter says how)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def start(self) -> None:
        """Read the key from the environment and open the pooled client."""
        if self.http.api_key_env:
            self.api_key = os.environ.get(self.http.api_key_env, "")
            if not self.api_key:  # found out now, not from the upstream's 401s later
                _log.warning(
                    "backend_key_missing",
                    backend=self.name,
                    api_key_env=self.http.api_key_env,
                    detail="the variable is not set: requests go without a key",
                )
        # One connection pool per backend. The httpx client runs on it for everything
        # (models, health); the hot chat call uses the same aiohttp session directly,
        # because httpx's per-request bookkeeping (URL merging, cookie extraction) was the
        # largest cost in a profile of stella under load.
        headers = {**self.http.headers, **self.basic, **self.auth_headers()}
        # aiohttp's keep-alive of 0 reuses no connection and schedules no close of idle
        # ones either (they stayed open for good): no keep-alive at all is force_close.
        pool: dict[str, Any] = (
            {"keepalive_timeout": self.http.keepalive_s} if self.keep else {"force_close": True}
        )
        self.session = aiohttp.ClientSession(
            connector=_Connector(self.name, limit=self.http.max_connections, **pool),
            # Uncompressed answers: a proxy that gzips a stream may hold its events back.
            # Should one compress anyway, it is undone (httpx's requests decode their own).
            headers={"Accept-Encoding": "identity", **headers},
            timeout=aiohttp.ClientTimeout(
                sock_connect=self.http.connect_timeout_s, sock_read=self.http.read_timeout_s
            ),
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            transport=AiohttpTransport(client=self.session),
            timeout=httpx.Timeout(self.http.read_timeout_s, connect=self.http.connect_timeout_s),
            headers=headers,
        )

    async def aclose(self) -> None:
        """Close the pool (answers still being read to their end are closed)."""
        for task in list(self._draining):
            task.cancel()
        client = getattr(self, "client", None)
        if client is not None:
            await client.aclose()
        session = getattr(self, "session", None)
        if session is not None and not session.closed:
            await session.close()

    def answer(self, url: str, body: bytes, ctx: CallContext) -> Answer:
        """`async with backend.answer(url, body, ctx) as response`: POST a JSON body on the
        pool for the call `ctx`; an error status raises the StellaError it means."""
        headers = {"content-type": "application/json", "x-request-id": ctx.request_id}
        span = ctx.span
        if span is not None:
            headers["traceparent"] = span.traceparent
            if span.tracestate:
                headers["tracestate"] = span.tracestate
        return Answer(self, url, body, headers, ctx)

    async def whole_answer(self, url: str, body: bytes, ctx: CallContext) -> bytes:
        """POST `body` to `url` for the call `ctx` and read the answer whole (within the
        body limit); an error status or a network failure raises the StellaError it means."""
        try:
            async with self.answer(url, body, ctx) as r:
                return await read_body(r, self.name)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise aiohttp_error(self.name, exc, self.http.connect_timeout_s) from None

    def status_error(self, status: int, headers: Any, body: bytes, url: str = "") -> StellaError:
        """The StellaError for a chat call's error status to `url` (an adapter may read its
        upstream's own words more closely)."""
        return error_from_response(self.name, status, headers, body, url)

    async def model_ids(self, path: str) -> list[str]:
        """GET `path`, a model list shaped {"data": [{"id": ...}, ...]}: the ids."""
        return [m.id for m in (await self.get_json(path, _models)).data]

    async def get_json(self, path: str, decoder: msgspec.json.Decoder[T]) -> T:
        """GET `path` and decode its JSON; an error status or a malformed answer raises."""
        # Read as it comes, within bounds: a broken or hostile upstream's endless answer
        # would otherwise be held whole (a probe or a listing asks every few seconds).
        async with self.client.stream("GET", path) as r:
            failed = r.status_code >= 400
            limit = HTML_SCAN if failed else MAX_LIST_BYTES
            body = bytearray()
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    if failed:
                        del body[limit:]  # the words of an error are at its start
                        break
                    raise UpstreamError(f"{self.name}: answer to GET {path} over {limit} bytes")
        if failed:
            raise error_from_response(self.name, r.status_code, r.headers, bytes(body), str(r.url))
        try:
            return decoder.decode(body)
        except BAD_JSON:
            raise UpstreamError(f"{self.name}: malformed answer to GET {path}") from None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """POST `body` on the pool; a kept-alive connection the upstream closed under it is
        replaced once.

        A server may close a kept-alive connection whenever it likes (its keep-alive
        timeout, a restart, after an error it did not announce); a request written to
        it just then fails at once, before any answer. aiohttp sends such a request
        again on a new connection only for idempotent methods (RFC 9112, 9.3.1). A
        chat request is sent again too when it failed that fast (within STALE_S) on a
        connection reused from the pool: the upstream cannot have worked on it. A
        failure on a new connection (the upstream read the request and dropped it
        itself), or after longer (an upstream that worked, then dropped the
        connection), goes to the route's retries and fallbacks, which count and log
        every attempt; so does a refused connection.
        """
        asked = time.perf_counter()
        try:
            return await self.session.post(url, data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # never connected: nothing was stale
            connected_at, reused = _connected.get()
            if not reused:
                raise  # a new connection cannot be stale: the upstream dropped this request
            # From when the request had its connection (a wait for the pool is not counted).
            if time.perf_counter() - max(asked, connected_at) > STALE_S:
                raise  # the upstream may have worked on it: the route's retries decide
        # One loop turn first: the close of other pooled connections the upstream shut at
        # the same moment (a restart) is then seen, and the pool skips them.
        await asyncio.sleep(0)
        return await self.session.post(url, data=body, headers=headers, allow_redirects=False)

    def finish_later(self, response: aiohttp.ClientResponse) -> None:
        """Read the rest of an answer's body off the call's path, then give the connection
        back to the pool (it is closed instead when the rest is too long or too slow)."""
        task = asyncio.get_running_loop().create_task(_drain(response))
        self._draining.add(task)
        task.add_done_callback(lambda done: self._drained(done, response))

    def _drained(self, task: asyncio.Task[None], response: aiohttp.ClientResponse) -> None:
        self._draining.discard(task)
        self.using -= 1
        # A read cancelled before it began never ran its own release (idempotent).
        response.release()

    async def probe(self, path: str) -> BackendHealth:
        """GET a cheap path (a model list, a version): health without spending tokens."""
        try:
            r = await self.client.get(path, timeout=5)
        except Exception as exc:  # whatever it is, the probe's answer is "not ok"
            cause = exc.__cause__
            if isinstance(cause, aiohttp.ClientConnectorError):
                # The aiohttp transport reports a refused connection as a ConnectTimeout.
                return BackendHealth(
                    ok=False, detail=f"cannot connect ({type(cause.os_error).__name__})"
                )
            return BackendHealth(ok=False, detail=f"{type(exc).__name__}")
        return BackendHealth(ok=r.status_code < 400, detail=f"HTTP {r.status_code}")


class Answer:
    """An upstream answer's response as a context: its connection goes back to the pool.

    A streaming adapter stops reading at the answer's final event; the end of the
    HTTP body (OpenAI's `data: [DONE]`, the last chunk's terminator) often comes in a
    later read. aiohttp closes a connection released with its body unread, so every
    stream would open a new connection (and a TLS handshake). An answer that ended
    normally before its body did is read to its end in the background instead; one
    that failed is released as aiohttp would (closed, unless its body was read).
    """

    __slots__ = ("backend", "body", "ctx", "headers", "response", "url")

    def __init__(
        self,
        backend: HttpBackend,
        url: str,
        body: bytes,
        headers: dict[str, str],
        ctx: CallContext,
    ) -> None:
        self.backend = backend
        self.url = url
        self.body = body
        self.headers = headers
        self.ctx = ctx

    async def __aenter__(self) -> aiohttp.ClientResponse:
        b = self.backend
        b.using += 1
        if b.using > b.http.max_connections and b._draining:
            # The pool is full: a connection being read to its end is given up for this
            # call rather than make it wait.
            next(iter(b._draining)).cancel()
        token = _call.set(self.ctx)
        try:
            try:
                r = self.response = await b.post(self.url, self.body, self.headers)
            finally:
                _call.reset(token)
            self.ctx.upstream_request_id = upstream_request_id(r.headers, self.ctx.request_id)
            if r.status >= 300:
                text = await error_head(r)
                raise b.status_error(r.status, r.headers, text, self.url)
        except BaseException:
            b.using -= 1
            raise
        return r

    async def __aexit__(self, kind: type[BaseException] | None, exc: Any, tb: Any) -> None:
        r = self.response
        b = self.backend
        if (
            kind is None
            and not r.content.at_eof()
            and b.using <= b.http.max_connections
            and b.keep  # else the connection is closed either way: nothing to read it for
        ):
            b.finish_later(r)  # `using` goes down when that read ends
            return
        b.using -= 1
        await r.__aexit__(kind, exc, tb)


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what is left of a body (at most DRAIN_BYTES within DRAIN_S), then release it:
    to the pool when the body ended, else closed."""
    try:
        async with asyncio.timeout(DRAIN_S):
            left = DRAIN_BYTES
            while left > 0:
                chunk = await response.content.readany()
                if not chunk:
                    break
                left -= len(chunk)
    except Exception:  # slow, broken or cut: released below, which closes it
        pass
    finally:
        response.release()


async def error_head(response: aiohttp.ClientResponse) -> bytes:
    """The start of an error answer's body: what error_from_response reads of it (at
    most HTML_SCAN bytes, within ERROR_READ_S). Its connection goes back to the pool when
    that was the whole body, else it is closed; a body cut or slow leaves what came."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(ERROR_READ_S):
            while size < HTML_SCAN:
                chunk = await response.content.read(HTML_SCAN - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        pass  # the status is the answer; its words are a courtesy
    finally:
        if response.content.at_eof():
            response.release()
        else:
            response.close()  # never a connection with a body half read back to the pool
    return b"".join(chunks)


def page_words(html: str) -> str:
    """An HTML page's words: its tags removed, its scripts and styles dropped whole (one
    cut off by the end of the text drops the rest). One pass: the page is untrusted."""
    lower = html.lower()
    out: list[str] = []
    i, n = 0, len(html)
    while i < n:
        lt = html.find("<", i)
        if lt < 0:
            out.append(html[i:])
            break
        out.append(html[i:lt])
        out.append(" ")
        end = -1
        for block in ("script", "style"):
            if lower.startswith(block, lt + 1):
                close = lower.find("</" + block, lt)
                end = -1 if close < 0 else html.find(">", close)
                break
        else:
            end = html.find(">", lt)
        i = n if end < 0 else end + 1
    return "".join(out)


def upstream_text(text: str) -> str:
    """An upstream's own words (its error message) as the client and the log get them:
    its credentials masked, on one line, at most MAX_MESSAGE characters."""
    # Whatever the upstream wrote (a traceback, a page), the client gets one short line.
    # Masked before each cut: a cut inside a quoted key would leave its start unmasked.
    head = text[: MAX_MESSAGE * 4]
    head = mask(head) if len(head) == len(text) else mask_cut(mask(head))
    line = " ".join(head.split())
    if len(line) > MAX_MESSAGE:
        line = mask_cut(line[: MAX_MESSAGE - 3]) + "..."
    return line


def error_from_response(
    name: str, status: int, headers: Any, body: bytes, url: str = ""
) -> StellaError:
    """The StellaError for an upstream error status to `url` (OpenAI's or a plain error
    shape)."""
    message = ""
    code: object = None
    kind: object = None
    said = False  # the body is an error in JSON, the upstream's own words
    if status < 400:
        # Never followed: the prompt and the key go only to base_url's host.
        where = headers.get("location", "")
        message = f"redirect to {where!r} not followed; set base_url to the final address"
        body = b""
    try:
        parsed = _error_body.decode(body)
        said = True
        err = parsed.error
        if isinstance(err, _OpenAIError):
            message = err.message or str(err.code or "")
            code, kind = err.code, err.type
        elif isinstance(err, str):
            message = err
        else:
            message = parsed.message or parsed.detail or ""  # old vLLM's, at the top
    except BAD_JSON:
        if not message:
            message = body[:HTML_SCAN].decode(errors="replace")
            if "html" in headers.get("content-type", "").lower() or message.lstrip()[:1] == "<":
                message = page_words(message)  # a proxy's error page: its words only
    message = upstream_text(message)
    text = f"{name}: upstream answered {status}" + (f": {message}" if message else "")
    if status in (400, 413, 422) and context_overflow(code, kind, message):
        return UpstreamContextTooLong(text, upstream_status=status)
    if status == 404 and not (said and refuses_the_request(code, kind, message)):
        path = urlsplit(url).path
        return UpstreamNoSuchPath(
            f"{name}: upstream answered 404"
            + (f" for {path}" if path else "")
            + (f": {message}" if message else "")
            + "; the upstream has no such path: check the backend's base_url"
        )
    if status == 429 and _final_refusal(code, kind, headers):
        # A quota used up, not a rate: asked again (by stella, or by a client told it may
        # retry) it refuses again until the quota renews, hours away. No Retry-After
        # either: its wait is the upstream's quota's, not this call's.
        refused = UpstreamStatus(text, upstream_status=status)
        refused.retryable = False
        refused.falls_back = True  # another backend has its own key, and its own quota
        return refused
    return UpstreamStatus(text, upstream_status=status, retry_after=retry_hint(status, headers))


def _final_refusal(code: object, kind: object, headers: Any) -> bool:
    """Whether a 429 says not to ask again: OpenAI's `insufficient_quota` (a quota or
    credit used up), or `x-should-retry: false` (a stella's `quota_exceeded`, and any
    upstream that says so, as the OpenAI and Anthropic SDKs obey it)."""
    if "insufficient_quota" in (code, kind):
        return True
    return str(headers.get("x-should-retry", "")).strip().lower() == "false"


# A 404 in the upstream's own JSON error refuses this model or this request: OpenAI's (and
# LiteLLM's) `code` `model_not_found`, vLLM's "The model `x` does not exist.", Ollama's
# "model 'x' not found" (older: `model "x" not found, try pulling it first`),
# mlx_lm.server's "model not loaded", Anthropic's `not_found_error` "model: x",
# OpenRouter's "No endpoints found that support tool use" (the model's providers, not the
# path), Azure's `DeploymentNotFound` (the deployment is the request's model). A wrong
# base_url's 404 is a page, a plain "404 page not found", or a JSON error saying only
# that: "Not Found" (FastAPI's, Anthropic's), "Invalid URL (POST /v1/v1/...)" (OpenAI's).
_MODEL_WORD = re.compile(r"\bmodel\b", re.IGNORECASE)  # "/v1/models" in a path is not it
_PATH_MISS = re.compile(
    r"(404\s*)?(page\s+)?not\s+found\W*|invalid\s+url\b.*|unknown\s+(url|path|route|endpoint)\b.*"
    r"|no\s+(such\s+)?(route|path|endpoint)\b.*|cannot\s+(get|post)\b.*",
    re.IGNORECASE | re.DOTALL,
)


def refuses_the_request(code: object, kind: object, message: str) -> bool:
    """Whether an upstream's JSON 404 refuses this model or request (it names a model,
    or says more than that the path is unknown), not the path itself."""
    for field in (code, kind):
        if isinstance(field, str) and "model" in field.lower():
            return True
    if _MODEL_WORD.search(message):
        return True
    return bool(message.strip()) and _PATH_MISS.fullmatch(message.strip()) is None


# What upstreams say of a prompt longer than the model's context: OpenAI's error code and
# llama.cpp's error type; vLLM's message (OpenAI's too, and most servers' modelled on
# either) and older llama.cpp builds' say it only in words.
CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
CONTEXT_WORDS = ("maximum context length", "exceeds the available context size")


def context_overflow(code: object, kind: object, message: str) -> bool:
    """Whether an upstream's error (its `code`, `type` and message) says the prompt is
    longer than the model's context."""
    if (isinstance(code, str) and code in CONTEXT_CODES) or (
        isinstance(kind, str) and kind in CONTEXT_CODES
    ):
        return True
    lower = message.lower()
    return any(words in lower for words in CONTEXT_WORDS)


def retry_hint(status: int, headers: Any) -> float | None:
    """Seconds an upstream's error answer asks to wait before the next try: Azure OpenAI's
    `retry-after-ms` when present, else Retry-After, else (a 429's) the latest of OpenAI's
    rate-limit resets among the limits its headers say are spent (`x-ratelimit-remaining-*`
    0). A reset is when that limit is whole again: a limit with room left says nothing
    of when a retry passes, and its reset (a token bucket's full refill, minutes) would
    hold back a retry the spent limit allows in a second."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return bounded_wait(float(ms) / 1000)
        except ValueError:
            pass
    seconds = retry_after(headers.get("retry-after"))
    if seconds is None and status == 429:
        resets = [
            s
            for limit in ("requests", "tokens")
            if _spent(headers.get(f"x-ratelimit-remaining-{limit}"))
            and (s := go_seconds(headers.get(f"x-ratelimit-reset-{limit}"))) is not None
        ]
        if resets:
            seconds = bounded_wait(max(resets))
    return seconds


def _spent(remaining: str | None) -> bool:
    """Whether an `x-ratelimit-remaining-*` value says the limit has nothing left."""
    try:
        return remaining is not None and float(remaining) <= 0
    except ValueError:
        return False


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return bounded_wait(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return bounded_wait(when.timestamp() - time.time())


def bounded_wait(seconds: float) -> float:
    """An upstream's wait in seconds, within 0 and a day ("inf" and "nan" are floats too)."""
    return min(max(0.0, seconds), 86_400.0)


# Go's time.ParseDuration: <number><unit> parts after a sign, or a bare 0 (a bare "-1" it
# refuses: missing unit). Ollama reads a keep_alive so; OpenAI writes its rate-limit
# resets so ("6m0s", "1.5s", "20ms").
GO_NUMBER = r"[0-9]+\.?[0-9]*|\.[0-9]+"
GO_UNIT = r"ns|us|µs|μs|ms|s|m|h"
GO_DURATION = re.compile(rf"[-+]?(?:0|(?:(?:{GO_NUMBER})(?:{GO_UNIT}))+)")
GO_PARTS = re.compile(rf"({GO_NUMBER})({GO_UNIT})")
GO_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9}
GO_UNIT_NS |= {"m": 60 * 10**9, "h": 3600 * 10**9}


def go_seconds(value: str | None) -> float | None:
    """The seconds of a Go duration ("7s", "6m0s", "20ms"); None when it is not one."""
    if not value or not GO_DURATION.fullmatch(value := value.strip()):
        return None
    seconds = sum(float(n) * GO_UNIT_NS[unit] for n, unit in GO_PARTS.findall(value)) / 1e9
    return -seconds if value.startswith("-") else seconds


def aiohttp_error(name: str, exc: BaseException, connect_timeout_s: float = 0.0) -> StellaError:
    """The StellaError for an aiohttp failure below HTTP (refused, reset, timed out);
    `connect_timeout_s` is the backend's, named when a connection took longer."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        # No connection could be made (refused, or no answer to it within the connect
        # timeout: a host down or a full backlog): unreachable, not a slow answer.
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            after = f" after {connect_timeout_s:g}s" if connect_timeout_s else ""
            why = f"timed out{after}"
        else:
            why = type(exc).__name__
        return UpstreamUnreachable(f"{name}: cannot connect ({why})")
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"{name}: upstream timed out ({type(exc).__name__})")
    return UpstreamError(f"{name}: upstream connection failed ({type(exc).__name__})")


# What a backend decoding JSON from upstream may get besides a struct: msgspec's errors,
# bad bytes inside a string, and nesting past the recursion limit.
_log = structlog.get_logger("stella")
BAD_JSON = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)
# The longest line a stream may send, and the largest whole body: an upstream that never
# ends a line must not fill the memory.
MAX_LINE = 16 * 1024 * 1024
MAX_BODY = 64 * 1024 * 1024
# The longest model list taken from an upstream (OpenRouter's hundreds of models with
# their descriptions take about 1 MB).
MAX_LIST_BYTES = 16 * 1024 * 1024
# A request that failed on a pooled connection within this long was refused by a stale
# connection (one round trip), not dropped after the upstream worked on it.
STALE_S = 0.5
# The rest of a body after an answer's final event: its end, a `[DONE]`, at most a few
# bytes; an upstream that keeps sending is cut (the connection closed) past these, and
# so is one whose connection a caller waiting for the pool needs.
DRAIN_S = 1.0
DRAIN_BYTES = 64 * 1024
# An error answer's words are read for at most this long: its status is told either way.
ERROR_READ_S = 1.0


class LineBuffer:
    """Splits a streamed body into lines as bytes (`\\r` kept), at most MAX_LINE long.

    A method call per network read, not a generator between the socket and the
    parser; a line split over many reads is joined once, when it ends.
    """

    __slots__ = ("_name", "_pending", "_size")

    def __init__(self, name: str) -> None:
        self._name = name
        self._pending: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes (often several, or none)."""
        pending = self._pending
        if b"\n" not in chunk:
            self._size += len(chunk)
            if self._size > MAX_LINE:
                raise UpstreamError(f"{self._name}: a stream line over {MAX_LINE} bytes")
            pending.append(chunk)
            return []
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending.clear()
        *lines, rest = chunk.split(b"\n")
        self._size = len(rest)
        if rest:
            pending.append(rest)
        return lines

    def tail(self) -> bytes:
        """What is left after the body ended without a final newline."""
        tail = b"".join(self._pending)
        self._pending.clear()
        return tail


async def iter_lines(response: aiohttp.ClientResponse, name: str) -> AsyncIterator[bytes]:
    """Lines of a streamed body as bytes, without decoding to str first (at most MAX_LINE)."""
    buf = LineBuffer(name)
    async for chunk in response.content.iter_any():
        for line in buf.feed(chunk):
            yield line.rstrip(b"\r")
    tail = buf.tail()
    if tail.strip():
        yield tail.rstrip(b"\r")


async def read_body(response: aiohttp.ClientResponse, name: str) -> bytes:
    """A whole response body, at most MAX_BODY bytes (inflated, if it came compressed)."""
    length = response.content_length
    # A compressed body's length is not what it inflates to (a few hundred KB of gzip
    # can hold gigabytes): such a body is read in pieces and its inflated bytes counted.
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if length is not None and encoding in ("", "identity"):
        if length > MAX_BODY:
            raise _too_long(f"{name}: a response body of {length} bytes (over {MAX_BODY})")
        return await response.read()  # the common case, in one piece
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_long(f"{name}: a response body over {MAX_BODY} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_long(message: str) -> UpstreamError:
    """The error of an answer over MAX_BODY: its size, not the backend's health. Asked
    again, the same request is answered as long (a batch of vectors, a long completion),
    so it is not retried; the backend answers other requests, so its circuit is not told."""
    err = UpstreamError(message)
    err.retryable = False
    err.no_verdict = True
    return err


# The longest upstream request id taken (Anthropic's are ~30 characters, OpenAI's ~40).
MAX_REQUEST_ID = 128


def upstream_request_id(headers: Any, own: str) -> str:
    """The id an upstream gave its answer (Anthropic's `request-id`, `x-request-id` from
    OpenAI-compatible ones), for its logs; "" when it gave none or sent back `own`."""
    given = headers.get("request-id") or headers.get("x-request-id") or ""
    # Short, printable ASCII without spaces: whatever an upstream sends reaches the log,
    # where it is an id to search for, not text.
    given = "".join(c for c in given[:MAX_REQUEST_ID] if " " < c < "\x7f")
    return "" if given == own else given
