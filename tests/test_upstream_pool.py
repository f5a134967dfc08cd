"""The remote adapters' connections: one the upstream closed meanwhile costs no request.

An HTTP server may close a kept-alive connection at any time (its keep-alive timeout,
a restart, after an error it did not announce). A request sent on it just then fails
before any answer; it is sent again once, on a new connection. The upstream here is a
raw socket server on loopback that answers the first request of each connection and
closes the connection on the second without a word: the race, made deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from stella.backends import CallContext, http
from stella.backends.anthropic import AnthropicBackend, AnthropicConfig
from stella.backends.http import HttpBackend
from stella.backends.ollama import OllamaBackend, OllamaConfig
from stella.backends.openai import OpenAIBackend, OpenAIConfig
from stella.errors import Overloaded, StellaError, UpstreamStatus
from stella.protocol import ChatRequest, Delta, Done, Message
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import run_stella

ANSWERS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    },
    "/api/chat": {
        "model": "m",
        "message": {"role": "assistant", "content": "hello"},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 1,
        "eval_count": 1,
    },
}
# The anthropic adapter always streams: its answer is the SSE event sequence.
SSE = [
    {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
    {"type": "message_stop"},
]
BODIES = {path: json.dumps(answer).encode() for path, answer in ANSWERS.items()}
BODIES["/v1/messages"] = b"".join(
    f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in SSE
)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """One request from the connection: its path and its body (sized by content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(
        int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"
    )
    return lines[0].split()[1], await reader.readexactly(length)


class Closer:
    """Answers the first request of a connection; closes it when a later one arrives."""

    def __init__(self, answer_every: int = 1) -> None:
        self.connections = 0
        self.open = 0  # connections not closed yet
        self.answered = 0
        self.answer_every = answer_every  # 0: never answers, closes at once
        self.work_s = 0.0  # how long it seems to work on a request before closing instead
        self.answer_s = 0.0  # how long it takes to answer one

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        served = 0
        try:
            while True:
                path, _ = await read_request(reader)
                if served >= self.answer_every:
                    await asyncio.sleep(self.work_s)
                    return  # closed without an answer, as a server closing an idle connection
                body = BODIES[path]
                # Anthropic's answer is an SSE stream, and says so (the adapter reads a
                # JSON body as one whole Message).
                media = "text/event-stream" if path == "/v1/messages" else "application/json"
                await asyncio.sleep(self.answer_s)
                writer.write(
                    f"HTTP/1.1 200 OK\r\ncontent-type: {media}\r\n".encode()
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@contextlib.asynccontextmanager
async def serving(handle: Any) -> AsyncIterator[str]:
    """A raw upstream on a free loopback port, its URL, until the block ends."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Closer, str]]:
    closer = Closer()
    async with serving(closer.handle) as url:
        yield closer, url


@contextlib.asynccontextmanager
async def started(kind: str, url: str, **kw: Any) -> AsyncIterator[HttpBackend]:
    """A started backend of `kind` on `url`, closed when the block ends."""
    backend = make(kind, url, **kw)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


def make(kind: str, url: str, **kw: Any) -> HttpBackend:
    if kind == "openai":
        return OpenAIBackend("up", OpenAIConfig(kind="openai", base_url=url + "/v1", **kw))
    if kind == "ollama":
        # These upstreams answer chats alone (no /api/ps): no load of its own is asked for.
        kw = {"load_timeout_s": 0, **kw}
        return OllamaBackend("up", OllamaConfig(kind="ollama", base_url=url, **kw))
    return AnthropicBackend("up", AnthropicConfig(kind="anthropic", base_url=url, **kw))


async def ask(backend: HttpBackend) -> list[Any]:
    req = ChatRequest(messages=[Message(role="user", content="hi")], model="m", stream=False)
    return [e async for e in backend.chat(req, CallContext(request_id="req-pool"))]


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
async def test_a_connection_closed_by_the_upstream_is_replaced(
    upstream: tuple[Closer, str], kind: str
) -> None:
    closer, url = upstream
    async with started(kind, url) as backend:
        for _ in range(3):
            events = await ask(backend)
            assert [type(e) for e in events] == [Delta, Done]
            assert events[0].text == "hello"
        # Each request after the first met a connection the upstream closed on it.
        assert closer.answered == 3
        assert closer.connections == 3


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_keepalive_0_closes_each_connection_after_its_answer(
    upstream: tuple[Closer, str], kind: str
) -> None:
    # aiohttp's keep-alive of 0 alone reuses no connection and never closes an idle one:
    # each request left one open for good. No keep-alive: one connection per request,
    # closed once its answer is read.
    closer, url = upstream
    closer.answer_every = 100
    async with started(kind, url, keepalive_s=0) as backend:
        for _ in range(4):
            assert [type(e) for e in await ask(backend)] == [Delta, Done]
        async with asyncio.timeout(5):
            while closer.open:
                await asyncio.sleep(0.02)
        assert closer.connections == 4 and closer.answered == 4


async def test_a_request_dropped_on_a_new_connection_is_not_sent_again(
    upstream: tuple[Closer, str],
) -> None:
    # The upstream reads each request and drops its connection at once: no pooled
    # connection went stale, the upstream refused this request. The route's retries
    # decide (and log) whether it is asked again, not the pool behind their back.
    closer, url = upstream
    closer.answer_every = 0
    async with started("openai", url) as backend:
        for _ in range(2):
            with pytest.raises(StellaError) as info:
                await ask(backend)
            assert info.value.code == "upstream_error"
            assert info.value.retryable
        assert closer.connections == 2  # one per call: none sent twice


async def test_a_request_is_sent_again_once_at_most(upstream: tuple[Closer, str]) -> None:
    # A kept-alive connection closed under the request: sent again on a new connection,
    # which the upstream drops too; that one is the route's to retry.
    closer, url = upstream
    async with started("openai", url) as backend:
        await ask(backend)
        closer.answer_every = 0
        with pytest.raises(StellaError) as info:
            await ask(backend)
        assert info.value.code == "upstream_error"
        assert closer.connections == 2


async def test_an_upstream_that_worked_then_dropped_the_request_is_not_asked_again(
    upstream: tuple[Closer, str],
) -> None:
    # A drop after the upstream had the request for a while (a proxy's idle cut of a long
    # generation) is no stale connection: the route's retries decide, and log, any retry.
    closer, url = upstream
    closer.answer_every, closer.work_s = 0, 0.7
    async with started("openai", url) as backend:
        with pytest.raises(StellaError) as info:
            await ask(backend)
        assert info.value.code == "upstream_error" and info.value.retryable
        assert closer.connections == 1


async def test_a_wait_for_the_pool_does_not_count_as_the_upstream_working(
    upstream: tuple[Closer, str],
) -> None:
    # One connection: the second call waits 0.7 s for it, then finds it closed by the
    # upstream. It failed at once on the connection it got: sent again, and answered.
    closer, url = upstream
    closer.answer_s = 0.7
    async with started("openai", url, max_connections=1) as backend:
        results = await asyncio.gather(ask(backend), ask(backend))
        assert all([type(e) for e in r] == [Delta, Done] for r in results)
        assert closer.answered == 2 and closer.connections == 2


async def test_a_call_whose_time_ran_out_waiting_for_the_pool_is_not_sent(
    upstream: tuple[Closer, str],
) -> None:
    # One connection, held 0.5 s by the first call. The second call's time to its first
    # event ends at 0.2 s; it gets the connection at 0.5 s, before the core's ticker could
    # cancel it: it gives the connection up unsent, overloaded, rather than ask the
    # upstream for an answer nobody waits for.
    closer, url = upstream
    closer.answer_every, closer.answer_s = 100, 0.5
    req = ChatRequest(messages=[Message(role="user", content="hi")], model="m", stream=False)
    async with started("openai", url, max_connections=1) as backend:
        first = asyncio.create_task(ask(backend))
        await asyncio.sleep(0.1)  # it holds the one connection
        ctx = CallContext(request_id="late", first_by=time.perf_counter() + 0.1)
        with pytest.raises(Overloaded) as info:
            async for _ in backend.chat(req, ctx):
                pass
        assert [type(e) for e in await first] == [Delta, Done]
        # A third call in time: it waits for the connection, which it is given.
        third = CallContext(request_id="in-time", first_by=time.perf_counter() + 5)
        t = time.perf_counter()
        second = asyncio.create_task(ask(backend))
        await asyncio.sleep(0.1)
        assert [type(e) async for e in backend.chat(req, third)] == [Delta, Done]
        assert [type(e) for e in await second] == [Delta, Done]
    err = info.value
    assert err.status == 503 and err.code == "overloaded" and err.retryable, err
    assert err.no_verdict and not err.same_again
    assert "backend 'up'" in err.message and "max_connections = 1" in err.message, err
    assert "not sent" in err.message, err
    assert closer.answered == 3  # the late call's request never reached it
    assert 0.3 <= ctx.queue_ms / 1000 < 0.6 and not ctx.waiting_for  # its wait, as queueing
    assert 0.3 <= third.queue_ms / 1000 <= time.perf_counter() - t


def test_a_call_waiting_for_a_full_pool_is_overloaded_and_opens_no_circuit() -> None:
    # Two long streams hold both connections of max_connections = 2. Calls past them wait
    # for stella's own pool: their limit passes before the upstream ever has them. That is
    # stella's load: 503 overloaded, the route's fallbacks tried, the circuit left closed
    # (its threshold of 2 would have opened it), the wait reported in queue_ms.
    fake = FakeOpenAI()
    with serve(fake.app) as up:
        quick = {
            "backend": "up",
            "upstream_model": "ok",
            "retries": 0,
            "ttft_timeout_s": 1,
            "answer_timeout_s": 1,
            "total_timeout_s": 20,
        }
        config = {
            "breaker": {"failure_threshold": 2, "cooldown_s": 60},
            "backends": {"up": {"kind": "openai", "base_url": up + "/v1", "max_connections": 2}},
            "models": {
                "routes": {
                    "long": {"backend": "up", "upstream_model": "think-12", "ttft_timeout_s": 30},
                    "r": quick,
                    "rf": {**quick, "fallbacks": ["echo"]},
                    "rr": {**quick, "fallbacks": ["r"]},  # its fallback on the same pool
                }
            },
        }
        with run_stella(config) as server:
            body = {"model": "long", "messages": MSG, "stream": True}
            for _ in range(2):
                threading.Thread(target=hold, args=(server.url, body), daemon=True).start()
            deadline = time.monotonic() + 10
            while len(fake.requests) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(fake.requests) == 2
            for stream in (False, False, True):
                r = httpx.post(
                    server.url + "/v1/chat/completions",
                    json={"model": "r", "messages": MSG, "stream": stream},
                    timeout=10,
                )
                assert r.status_code == 503, r.text  # a stream's too: before its first byte
                assert r.json()["error"]["code"] == "overloaded", r.text
                message = r.json()["error"]["message"]
                assert "backend 'up'" in message and "max_connections = 2" in message, message
                assert "retry-after" in r.headers
                rid = r.headers["x-request-id"]
                ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
                assert [a["error"] for a in ev["attempts"]] == ["overloaded"], ev
                assert ev["queue_ms"] >= 900, ev
            assert len(fake.requests) == 2  # the upstream never saw them
            models = httpx.get(server.url + "/api/v1/models", timeout=5).json()["models"]
            assert next(m for m in models if m["name"] == "r")["circuit"] == "closed"
            r = httpx.post(
                server.url + "/v1/chat/completions",
                json={"model": "rf", "messages": MSG},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
            assert [a["error"] for a in ev["attempts"]] == ["overloaded", None], ev
            assert ev["backend"] == "echo"
            # A chain that waited out the pool on every route: still stella's 503.
            r = httpx.post(
                server.url + "/v1/chat/completions",
                json={"model": "rr", "messages": MSG},
                timeout=10,
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert r.json()["error"]["message"].startswith("every backend failed"), r.text


MSG = [{"role": "user", "content": "hi"}]


def hold(url: str, body: dict[str, Any]) -> None:
    """Stream `body` from stella and read it to its end (or until stella goes)."""
    with contextlib.suppress(httpx.HTTPError):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for _ in r.iter_bytes():
                pass


# Streamed answers whose HTTP body ends a moment after the answer's last event, as a
# real server writes them (the final chunk's terminator, OpenAI's `data: [DONE]`).
STREAMS: dict[str, tuple[bytes, bytes]] = {
    "/v1/chat/completions": (
        b"".join(
            b"data: " + json.dumps(c).encode() + b"\n\n"
            for c in (
                {"choices": [{"index": 0, "delta": {"content": "hello"}}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
            )
        ),
        b"data: [DONE]\n\n",
    ),
    "/api/chat": (
        json.dumps({"message": {"content": "hello"}, "done": False}).encode()
        + b"\n"
        + json.dumps({"done": True, "done_reason": "stop", "eval_count": 1}).encode()
        + b"\n",
        b"",
    ),
    "/v1/messages": (BODIES["/v1/messages"], b""),
}


class Streamer:
    """Streams each answer in chunks; the body's end comes `end_after_s` after its last
    event (never, when None)."""

    def __init__(self, end_after_s: float | None = 0.02) -> None:
        self.connections = 0
        self.answered = 0
        self.end_after_s = end_after_s

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                path, _ = await read_request(reader)
                events, tail = STREAMS[path]
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    + f"{len(events):x}\r\n".encode()
                    + events
                    + b"\r\n"
                )
                await writer.drain()
                self.answered += 1
                if self.end_after_s is None:
                    await asyncio.sleep(3600)
                await asyncio.sleep(self.end_after_s)
                if tail:
                    writer.write(f"{len(tail):x}\r\n".encode() + tail + b"\r\n")
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def ask_stream(backend: HttpBackend) -> list[Any]:
    req = ChatRequest(messages=[Message(role="user", content="hi")], model="m", stream=True)
    return [e async for e in backend.chat(req, CallContext(request_id="req-pool"))]


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
async def test_a_stream_ending_after_its_last_event_keeps_its_connection(kind: str) -> None:
    streamer = Streamer(end_after_s=0.3)
    async with serving(streamer.handle) as url, started(kind, url) as backend:
        for _ in range(3):
            t = time.perf_counter()
            events = await ask_stream(backend)
            # The answer does not wait the 0.3 s for the body's end...
            assert time.perf_counter() - t < 0.2
            assert [type(e) for e in events] == [Delta, Done]
            await asyncio.sleep(0.4)  # ...which is read meanwhile, off its path
        assert streamer.answered == 3
        assert streamer.connections == 1  # one pooled connection for every stream


async def test_a_call_waiting_for_the_pool_takes_a_connection_being_read_to_its_end() -> None:
    # One connection, a body that ends 1.5 s after its answer: the next call does not
    # wait for that end; the connection being read is closed for it.
    streamer = Streamer(end_after_s=1.5)
    async with (
        serving(streamer.handle) as url,
        started("ollama", url, max_connections=1) as backend,
    ):
        for _ in range(3):
            t = time.perf_counter()
            events = await ask_stream(backend)
            assert [type(e) for e in events] == [Delta, Done]
            assert time.perf_counter() - t < 0.5
        assert streamer.connections == 3
        await asyncio.sleep(0.1)
        assert backend.using == 1  # the last one's body, still being read


async def test_a_body_that_never_ends_after_the_answer_is_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "DRAIN_S", 0.1)
    streamer = Streamer(end_after_s=None)
    async with serving(streamer.handle) as url, started("ollama", url) as backend:
        for _ in range(2):
            events = await ask_stream(backend)
            assert [type(e) for e in events] == [Delta, Done]
        await asyncio.sleep(0.3)
        assert not backend._draining  # the reads gave up; their connections closed
        assert streamer.connections == 2


async def test_health_of_a_refused_port_says_cannot_connect() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens there now
    async with started("openai", f"http://127.0.0.1:{port}") as backend:
        health = await backend.health()
        assert not health.ok
        assert health.detail == "cannot connect (ConnectionRefusedError)"


async def bad_chunk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with a good chunk, then, in a later read, one whose size is not hex; closes."""
    try:
        path, body = await read_request(reader)
        if json.loads(body).get("stream"):
            events = STREAMS[path][0]
            end = events.index(b"\n", events.index(b"hello")) + 1
            good = events[: end + 1 if events[end : end + 1] == b"\n" else end]  # one event
        else:
            good = BODIES[path][: len(BODIES[path]) // 2]  # half a JSON answer
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + f"{len(good):x}\r\n".encode() + good + b"\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)  # the client has the first chunk: the bad one comes apart
        writer.write(b"zz\r\nxxxx\r\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("kind", "stream"), [("openai", True), ("openai", False), ("ollama", True), ("anthropic", True)]
)
async def test_a_malformed_chunk_after_a_good_one_fails_the_answer(kind: str, stream: bool) -> None:
    # aiohttp's parser fails the connection, not the body being read on it: without the
    # body being told, the read waits past any limit of the backend's own.
    req = ChatRequest(messages=[Message(role="user", content="hi")], model="m", stream=stream)
    events: list[Any] = []
    async with serving(bad_chunk) as url, started(kind, url) as backend:
        with pytest.raises(StellaError) as info:
            async with asyncio.timeout(10):  # a hang fails the test rather than holding it
                async for event in backend.chat(req, CallContext(request_id="req-pool")):
                    events.append(event)
    assert info.value.code == "upstream_error", info.value
    assert "ClientPayloadError" in info.value.message
    assert [type(e) for e in events] == ([Delta] if stream else [])


class ErrorBody:
    """Answers with an error status and a long HTML body (chunked, or with its length),
    counting the bytes it managed to write before the connection was closed on it."""

    def __init__(self, status: int, size: int, chunked: bool) -> None:
        self.status, self.size, self.chunked = status, size, chunked
        self.sent = 0
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            framing = (
                "transfer-encoding: chunked" if self.chunked else f"content-length: {self.size}"
            )
            writer.write(
                f"HTTP/1.1 {self.status} Oops\r\ncontent-type: text/html\r\n"
                f"retry-after: 7\r\n{framing}\r\n\r\n".encode()
            )
            page = b"<html><body><p>upstream broke</p>"
            piece = 64 * 1024
            while self.sent < self.size:
                data = (page if not self.sent else b"") + b"x" * piece
                data = data[: min(piece, self.size - self.sent)]
                writer.write(
                    f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.chunked else data
                )
                await writer.drain()
                self.sent += len(data)
            if self.chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.done.set()


@pytest.mark.parametrize(("status", "chunked"), [(500, True), (400, False), (429, True)])
async def test_an_error_answer_is_read_no_further_than_its_words(
    monkeypatch: pytest.MonkeyPatch, status: int, chunked: bool
) -> None:
    # Only the start of an error body is read, then its connection closed: a long one
    # costs no memory, and one longer than MAX_BODY still tells its status (a 400 is no
    # retryable upstream_error) and its Retry-After.
    monkeypatch.setattr(http, "MAX_BODY", 4 * 1024 * 1024)
    upstream = ErrorBody(status, size=32 * 1024 * 1024, chunked=chunked)
    async with serving(upstream.handle) as url, started("openai", url) as backend:
        with pytest.raises(UpstreamStatus) as info:
            await ask(backend)
        async with asyncio.timeout(10):
            await upstream.done.wait()
    err = info.value
    assert err.upstream_status == status and "upstream broke" in err.message, err
    codes = {500: "upstream_error", 400: "upstream_rejected", 429: "upstream_rate_limited"}
    assert err.code == codes[status] and err.retry_after_hint == 7
    assert upstream.sent < upstream.size  # the rest was never asked for: closed under it


def gzip_bomb(start: bytes, filler: bytes, size: int) -> bytes:
    """`start`, then `filler` repeated to `size` bytes, gzipped (a few KB per 10 MiB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    piece = filler * (1024 * 1024 // len(filler))
    out = [z.compress(start)]
    for _ in range(size // len(piece)):
        out.append(z.compress(piece))
    out.append(z.flush())
    return b"".join(out)


class Bomb:
    """Answers 200 with a gzipped body (despite `Accept-Encoding: identity`), its length
    given or chunked, and keeps the connection until the client closes it."""

    def __init__(self, body: bytes, chunked: bool, media: str = "application/json") -> None:
        self.body, self.chunked, self.media = body, chunked, media

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            framing = (
                "transfer-encoding: chunked"
                if self.chunked
                else f"content-length: {len(self.body)}"
            )
            body = f"{len(self.body):x}\r\n".encode() + self.body + b"\r\n0\r\n\r\n"
            writer.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: {self.media}\r\n".encode()
                + f"content-encoding: gzip\r\n{framing}\r\n\r\n".encode()
                + (body if self.chunked else self.body)
            )
            await writer.drain()
            await reader.read()  # until stella closes the connection
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


BOMB_SIZE = 96 * 1024 * 1024  # inflated; each gzipped is a few hundred KB
BOMB_CAP = 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("kind", "stream", "chunked"),
    [
        ("openai", False, False),
        ("openai", False, True),
        ("openai", True, True),
        ("ollama", True, True),
        ("anthropic", True, False),
    ],
)
async def test_a_gzip_bomb_is_refused_within_the_body_limits(
    monkeypatch: pytest.MonkeyPatch, kind: str, stream: bool, chunked: bool
) -> None:
    # An upstream that compresses anyway: the limits count inflated bytes, and no more
    # than them is ever held, whatever length the compressed body declares.
    monkeypatch.setattr(http, "MAX_BODY", BOMB_CAP)
    monkeypatch.setattr(http, "MAX_LINE", BOMB_CAP)
    start = {"openai": b"data: ", "ollama": b"", "anthropic": b"data: "}[kind] if stream else b""
    media = "text/event-stream" if kind == "anthropic" else "application/json"
    upstream = Bomb(gzip_bomb(start + b'{"x": "', b"a", BOMB_SIZE), chunked, media)
    req = ChatRequest(messages=[Message(role="user", content="hi")], model="m", stream=stream)
    async with serving(upstream.handle) as url, started(kind, url) as backend:
        tracemalloc.start()
        try:
            with pytest.raises(StellaError) as info:
                async with asyncio.timeout(30):
                    async for _ in backend.chat(req, CallContext(request_id="req-bomb")):
                        pass
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.code == "upstream_error" and info.value.status == 502, info.value
    assert "over" in info.value.message, info.value
    assert peak < 4 * BOMB_CAP, peak  # the 96 MiB inflated never held


# aiohttp's private methods stella.backends.http extends or calls (its pool's wait for a
# free connection, the body a failed connection was reading), as read in aiohttp 3.14: an
# aiohttp whose copy differs needs a read before it is used (pyproject bounds it).
EXTENDED = {
    ("BaseConnector", "_wait_for_available_connection"): "4e686d9205a054fa",
    ("BaseConnector", "_available_connections"): "6ef7610bcba48aeb",
    ("BaseConnector", "_release_waiter"): "bbdfe8abaff81295",
    ("ResponseHandler", "set_exception"): "83971750bbd9f2f9",
}


def test_the_aiohttp_methods_extended_are_those_read() -> None:
    import hashlib
    import inspect

    import aiohttp
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.connector import BaseConnector

    classes = {"BaseConnector": BaseConnector, "ResponseHandler": ResponseHandler}
    seen = {
        (cls, name): hashlib.sha256(
            inspect.getsource(getattr(classes[cls], name)).encode()
        ).hexdigest()[:16]
        for cls, name in EXTENDED
    }
    assert seen == EXTENDED, f"aiohttp {aiohttp.__version__} changed methods stella extends"
