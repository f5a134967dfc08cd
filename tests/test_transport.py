"""The corked transport: one socket write per loop turn, nothing held back or lost."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import time
from typing import Any

import msgspec
import pytest
import uvicorn
from uvicorn.server import ServerState

from stella.transport import WRITE_THROUGH, CorkedTransport, HttpToolsProtocol


class Recorder:
    """A transport that records each write (one entry = one send() on a socket)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.closed = False
        self.aborted = False
        self.eof = False  # the write side shut (an error answer's connection, lingering)

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = self.closed = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def write_eof(self) -> None:
        self.eof = True

    @property
    def ended(self) -> bool:
        """Closed, or closing lingering after its last answer."""
        return self.closed or self.eof

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def can_write_eof(self) -> bool:
        return True

    def get_protocol(self) -> Any:
        return None

    def set_protocol(self, protocol: Any) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


BUSY = (
    "this request",
    "another one",
)  # the server's requests in flight, as the transport sees them


async def turn() -> None:
    """Let the loop run the callbacks scheduled so far."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_in_one_turn_go_out_as_one() -> None:
    rec = Recorder()
    t = CorkedTransport(rec, asyncio.get_running_loop(), BUSY)  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"")  # nothing to send: no empty write either
    t.write(b"body")
    assert rec.writes == []
    assert t.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
    await turn()
    assert rec.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"next")
    await turn()
    assert rec.writes[1:] == [b"next"]


async def test_writes_held_past_the_limit_go_out_at_once() -> None:
    # A backend producing without a pause never ends the turn: what it held goes to the
    # transport, whose buffer limits then pause the stream.
    rec = Recorder()
    t = CorkedTransport(rec, asyncio.get_running_loop(), BUSY)  # type: ignore[arg-type]
    chunk = b"x" * 1000
    for _ in range(WRITE_THROUGH // len(chunk) + 1):
        t.write(chunk)
    assert rec.writes and sum(map(len, rec.writes)) >= WRITE_THROUGH
    assert t.get_write_buffer_size() < WRITE_THROUGH


async def test_a_lone_request_writes_straight_through() -> None:
    """With nothing else in flight the early header segment wakes the client sooner."""
    rec = Recorder()
    t = CorkedTransport(rec, asyncio.get_running_loop(), ("this request",))  # type: ignore[arg-type]
    t.write(b"head")
    t.write(b"body")
    assert rec.writes == [b"head", b"body"]


async def test_close_sends_what_is_held_abort_drops_it() -> None:
    rec = Recorder()
    t = CorkedTransport(rec, asyncio.get_running_loop(), BUSY)  # type: ignore[arg-type]
    t.write(b"last words")
    t.close()
    assert rec.writes == [b"last words"] and rec.closed
    await turn()  # the scheduled flush finds nothing left and writes nothing
    assert rec.writes == [b"last words"]

    rec2 = Recorder()
    t2 = CorkedTransport(rec2, asyncio.get_running_loop(), BUSY)  # type: ignore[arg-type]
    t2.write(b"never sent")
    t2.abort()
    await turn()
    assert rec2.writes == [] and rec2.aborted


async def test_a_close_with_bytes_the_client_never_takes_ends_after_the_send_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # asyncio would keep the connection until its buffer drains: for good, for a client
    # that stopped reading with less than a pause's worth left to send.
    import stella.transport as transport

    monkeypatch.setattr(transport, "SEND_TIMEOUT_S", 0.2)

    class Unsent(Recorder):
        def get_write_buffer_size(self) -> int:
            return 0 if self.aborted else 1000

    stuck, done = Unsent(), Recorder()
    for rec in (stuck, done):
        CorkedTransport(rec, asyncio.get_running_loop(), BUSY).close()  # type: ignore[arg-type]
    assert stuck.closed and not stuck.aborted
    await asyncio.sleep(0.05)
    assert not stuck.aborted  # the client still has the send limit to take the rest
    await asyncio.sleep(0.35)
    assert stuck.aborted
    assert done.closed and not done.aborted  # all sent: closed as asked, nothing more


async def test_client_gone_before_the_flush_is_not_an_error() -> None:
    rec = Recorder()
    t = CorkedTransport(rec, asyncio.get_running_loop(), BUSY)  # type: ignore[arg-type]
    t.write(b"late")
    rec.closing = True  # the peer went away within the turn
    await turn()
    assert rec.writes == []


async def test_large_write_goes_through_in_order() -> None:
    rec = Recorder()
    t = CorkedTransport(rec, asyncio.get_running_loop(), BUSY)  # type: ignore[arg-type]
    big = b"x" * WRITE_THROUGH
    t.write(b"head")
    t.write(big)
    t.write(b"tail")
    assert rec.writes == [b"head", big]
    await turn()
    assert rec.writes == [b"head", big, b"tail"]


def _protocol(
    app: Any, busy: bool = True, rec: Recorder | None = None
) -> tuple[HttpToolsProtocol, Recorder]:
    config = uvicorn.Config(app, lifespan="off", http=HttpToolsProtocol)
    config.load()
    state = ServerState()
    if busy:  # another request in flight on the server
        state.tasks.add(asyncio.get_running_loop().create_future())  # type: ignore[arg-type]
    proto = HttpToolsProtocol(
        config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
    )
    rec = rec or Recorder()
    proto.connection_made(rec)  # type: ignore[arg-type]
    return proto, rec


REQUEST = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"


async def test_uvicorn_sends_headers_and_body_in_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b'{"ok":true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    proto, rec = _protocol(app)
    proto.data_received(REQUEST)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(rec.writes) == 1, rec.writes
    head, _, body = rec.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head
    assert body == b'{"ok":true}'
    proto.connection_lost(None)

    # Alone on the server: uvicorn's own two writes.
    proto, rec = _protocol(app, busy=False)
    proto.data_received(REQUEST)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(rec.writes) == 2 and rec.writes[1] == b'{"ok":true}'
    proto.connection_lost(None)


async def test_a_stream_is_not_held_back() -> None:
    """Each event the app produces in its own turn leaves in its own write, at once."""
    sent = asyncio.Event()
    go_on = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        sent.set()
        await go_on.wait()  # the next token is slow to come
        await send({"type": "http.response.body", "body": b"second\n", "more_body": False})

    proto, rec = _protocol(app)
    proto.data_received(REQUEST)
    await sent.wait()
    await turn()
    # The first line is on the wire while the app still waits for the second.
    assert len(rec.writes) == 1 and rec.writes[0].endswith(b"6\r\nfirst\n\r\n")
    go_on.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert rec.writes[1:] == [b"7\r\nsecond\n\r\n0\r\n\r\n"]
    proto.connection_lost(None)


@pytest.mark.parametrize("coalesce", [True, False])
def test_serve_picks_the_protocol(coalesce: bool) -> None:
    from stella.commands.serve import _http_protocol
    from stella.transport import BodyDeadlineProtocol

    chosen = _http_protocol(coalesce)
    assert (chosen is HttpToolsProtocol) is coalesce
    assert issubclass(chosen, BodyDeadlineProtocol)  # the body deadline either way


async def test_a_body_that_stalls_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import stella.transport

    monkeypatch.setattr(stella.transport, "BODY_TIMEOUT_S", 0.05)
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())  # the first 3 bytes
        seen.append(await receive())  # then nothing more: the deadline ends it

    proto, rec = _protocol(app)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nabc")
    await asyncio.sleep(0.2)
    assert rec.closed
    proto.connection_lost(None)
    await turn()
    assert seen[0]["body"] == b"abc" and seen[0]["more_body"] is True
    assert seen[1]["type"] == "http.disconnect"

    # A body that comes whole sets no deadline at all.
    proto, rec = _protocol(app)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc")
    assert proto._body_timer is None
    proto.connection_lost(None)


async def test_a_body_that_keeps_coming_has_more_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # The deadline moves on a second for every BODY_MIN_RATE bytes: a slow uplink's large
    # body, sent steadily at twice that rate, outlasts BODY_TIMEOUT_S; a trickle at a fifth
    # of it (a slowloris) is cut soon after BODY_TIMEOUT_S.
    import stella.transport

    monkeypatch.setattr(stella.transport, "BODY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(stella.transport, "BODY_MIN_RATE", 1000)
    got: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            got.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    # 40 bytes every 20 ms: 2000 bytes a second, 800 bytes in 0.4 s, twice BODY_TIMEOUT_S.
    proto, rec = _protocol(app)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 800\r\n\r\n")
    for _ in range(20):
        await asyncio.sleep(0.02)
        assert not rec.closed, "a body arriving at twice the minimum rate was cut"
        proto.data_received(b"x" * 40)
    await turn()
    assert not rec.closed
    assert b"".join(got) == b"x" * 800
    assert any(w.startswith(b"HTTP/1.1 200") for w in rec.writes)
    proto.connection_lost(None)

    # 4 bytes every 20 ms: 200 bytes a second; cut at about 0.2 / (1 - 0.2) = 0.25 s.
    got.clear()
    proto, rec = _protocol(app)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 800\r\n\r\n")
    started = time.perf_counter()
    while not rec.closed and time.perf_counter() - started < 2:
        await asyncio.sleep(0.02)
        proto.data_received(b"x" * 4)
    assert rec.closed
    assert 0.2 <= time.perf_counter() - started < 1.0
    proto.connection_lost(None)

    # Bytes that came in the headers' own read count as well: 600 of them are 0.6 s more.
    got.clear()
    proto, rec = _protocol(app)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 800\r\n\r\n" + b"x" * 600)
    await asyncio.sleep(0.5)
    assert not rec.closed, "the body sent with the headers earned no time"
    await asyncio.sleep(0.6)
    assert rec.closed
    proto.connection_lost(None)


@pytest.mark.parametrize("sent", [b"{", b""], ids=["part_of_it", "none_of_it"])
async def test_a_body_that_stalls_is_counted_as_too_slow(
    monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    # The server's own body limit closes the connection, and the app's read of the body
    # sees a disconnect: it was counted as a client that left (499 client_closed). It is
    # the server that gave up waiting: 408 client_too_slow, whether some of the body came
    # (the app reading its rest) or none (the app's first read).
    import httpx

    import stella.transport
    from stella.app import create_app
    from stella.settings import load_settings
    from tests.live import NO_MLX, loopback_socket

    monkeypatch.setattr(stella.transport, "BODY_TIMEOUT_S", 0.2)
    app = create_app(load_settings(NO_MLX, environ={}))
    sock = loopback_socket()  # bound until uvicorn listens on it: no other process takes it
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, port=port, http=HttpToolsProtocol, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + sent
        )
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing sent
        writer.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            metrics = (await c.get("/metrics")).text
        assert 'stella_rejections_total{api="openai",code="client_too_slow"} 1.0' in metrics
        assert 'code="client_closed"' not in metrics
    finally:
        server.should_exit = True
        await serving


async def test_a_pipelined_request_waits_without_a_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # B's headers come behind A; uvicorn stops reading while A runs, so B's body can't
    # arrive: B's clock starts when B does, and A's answer is not cut.
    import stella.transport

    monkeypatch.setattr(stella.transport, "BODY_TIMEOUT_S", 0.1)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/a":
            for _ in range(5):  # a 0.5 s streamed answer
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                await asyncio.sleep(0.1)
        await send({"type": "http.response.body", "body": b""})

    proto, rec = _protocol(app)
    proto.data_received(
        b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"
        b"POST /b HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n"
    )
    await asyncio.sleep(0.4)
    assert not rec.closed, "A's stream was cut by B's body deadline"
    await asyncio.sleep(0.35)  # A is done, B runs and its body never comes
    assert rec.closed
    proto.connection_lost(None)


async def test_each_body_gets_its_own_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import stella.transport

    monkeypatch.setattr(stella.transport, "BODY_TIMEOUT_S", 0.4)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    proto, rec = _protocol(app)
    proto.data_received(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\n\r\nab")
    assert proto._body_timer is not None
    await asyncio.sleep(0.25)
    proto.data_received(b"cd")  # complete: its deadline goes
    assert proto._body_timer is None
    await turn()
    proto.data_received(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\n\r\nab")
    await asyncio.sleep(0.25)  # a fresh 0.4 s, not the 0.15 s left of the first one
    assert not rec.closed
    await asyncio.sleep(0.45)
    assert rec.closed
    proto.connection_lost(None)


async def test_an_answer_whose_write_waits_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # uvicorn holds an answer's writes while its client takes nothing (flow control), for
    # good: an answer whose write waits SEND_TIMEOUT_S (a non-stream inference answer: what
    # is left of its total limit, at least SEND_MIN_S) ends the connection. One the client
    # takes on is let be, and so is a running stream, which bounds its own writes.
    import stella.transport

    monkeypatch.setattr(stella.transport, "SEND_TIMEOUT_S", 0.1)
    # Far from SEND_TIMEOUT_S: an answer without a limit of its own waits SEND_TIMEOUT_S.
    monkeypatch.setattr(stella.transport, "SEND_MIN_S", 10.0)
    start = {"type": "http.response.start", "status": 200, "headers": []}
    body = {"type": "http.response.body", "body": b"x" * 100}
    done = asyncio.Event()

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        await send(body)

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        scope["stella.protocol"].send_by = stella.transport.SELF_BOUNDED
        await send(start)
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await done.wait()
        await send({"type": "http.response.body", "body": b"x"})

    # The client takes nothing: the connection is aborted.
    proto, rec = _protocol(answer)
    proto.data_received(REQUEST)
    await turn()
    proto.pause_writing()  # as the transport does: its buffer is past the high-water mark
    await asyncio.sleep(0.25)
    assert rec.aborted
    proto.connection_lost(None)

    # The client takes some of it in time: the wait starts over.
    proto, rec = _protocol(answer)
    proto.data_received(REQUEST)
    await turn()
    proto.pause_writing()
    await asyncio.sleep(0.05)
    proto.resume_writing()
    await asyncio.sleep(0.15)
    assert not rec.closing
    proto.connection_lost(None)

    # ... and a wait after that has the whole limit again, not what the first one left.
    monkeypatch.setattr(stella.transport, "SEND_TIMEOUT_S", 0.4)
    proto, rec = _protocol(answer)
    proto.data_received(REQUEST)
    await turn()
    proto.pause_writing()
    await asyncio.sleep(0.1)
    proto.resume_writing()
    await asyncio.sleep(0.1)
    proto.pause_writing()
    await asyncio.sleep(0.3)  # past the first wait's limit, within the second's
    assert not rec.closing
    await asyncio.sleep(0.25)
    assert rec.aborted
    proto.connection_lost(None)
    monkeypatch.setattr(stella.transport, "SEND_TIMEOUT_S", 0.1)

    # An answer's limit is its own: the next answer on the connection has none set, and
    # one that went out whole leaves no timer behind.
    async def bounded(scope: Any, receive: Any, send: Any) -> None:
        scope["stella.protocol"].send_by = 123.0
        scope["stella.protocol"].send_rid = "r"
        await send(start)
        await send(body)

    proto, rec = _protocol(bounded)
    proto.data_received(REQUEST)
    await turn()
    assert rec.writes  # answered, never paused
    assert proto.send_by is None and proto.send_rid == ""
    assert proto._send_timer is None
    proto.connection_lost(None)

    # A stream: no timer while it runs; its last bytes, still waiting once it is over, get
    # SEND_TIMEOUT_S.
    proto, rec = _protocol(stream, busy=False)
    proto.data_received(REQUEST)
    await turn()
    proto.pause_writing()
    await asyncio.sleep(0.25)
    assert not rec.closing
    proto.resume_writing()
    write = rec.write

    def overflowing(data: bytes) -> None:
        write(data)
        proto.pause_writing()  # the last write is past the high-water mark too

    rec.write = overflowing  # type: ignore[method-assign]
    done.set()
    await asyncio.sleep(0.25)
    assert rec.aborted
    proto.connection_lost(None)

    # A non-stream inference answer whose limit (send_by) is long past when its write
    # waits: still SEND_MIN_S, not SEND_TIMEOUT_S, not at once.
    monkeypatch.setattr(stella.transport, "SEND_TIMEOUT_S", 10.0)
    monkeypatch.setattr(stella.transport, "SEND_MIN_S", 0.2)

    async def late(scope: Any, receive: Any, send: Any) -> None:
        protocol = scope["stella.protocol"]
        protocol.send_by = time.perf_counter() - 5
        await send(start)
        protocol.pause_writing()  # the client takes nothing: the body's write waits
        await send(body)

    proto, rec = _protocol(late)
    proto.data_received(REQUEST)
    await turn()
    await asyncio.sleep(0.05)
    assert not rec.closing
    await asyncio.sleep(0.3)
    assert rec.aborted
    proto.connection_lost(None)


async def test_a_stream_bounds_its_own_writes_and_its_last_lines_get_its_limit() -> None:
    # While a stream runs the server sets no write limit of its own (send_by infinite:
    # the stream cuts a client that stopped reading itself); its terminal lines, written
    # after, get what is left of the route's total limit.
    from stella.app import create_app
    from stella.settings import load_settings

    config = {
        "backends": {"local": {"enabled": False}, "e": {"kind": "echo"}},
        "models": {"default": "e", "routes": {"e": {"backend": "e", "total_timeout_s": 7.0}}},
    }
    app = create_app(load_settings(config, environ={}))
    limits: list[float | None] = []  # the protocol's send_by at each body write

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        protocol = scope["stella.protocol"]

        async def send_watched(message: Any) -> None:
            if message["type"] == "http.response.body":
                limits.append(protocol.send_by)
            await send(message)

        await app(scope, receive, send_watched)

    body = b'{"stream":true,"messages":[{"role":"user","content":"one two three"}]}'
    async with app.router.lifespan_context(app):
        proto, rec = _protocol(watched)
        t0 = time.perf_counter()
        proto.data_received(
            b"POST /api/v1/chat HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        for _ in range(300):
            if b"".join(rec.writes).endswith(b"0\r\n\r\n"):
                break
            await asyncio.sleep(0.01)
        t1 = time.perf_counter()
        proto.connection_lost(None)
    text = b"".join(rec.writes)
    assert text.startswith(b"HTTP/1.1 200 ") and b'"type":"done"' in text
    running = limits.count(math.inf)
    assert 0 < running < len(limits) and limits[:running] == [math.inf] * running, limits
    end_by = limits[-1]
    assert end_by is not None and t0 + 7.0 <= end_by <= t1 + 7.0
    assert limits[running:] == [end_by] * (len(limits) - running)
    assert proto.send_by is None  # the answer is over: the next one has its own


async def test_headers_that_stall_close_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    # A slowloris: a connection that sends nothing for HEADER_TIMEOUT_S, or whose
    # request's headers are still incomplete two looks after they began, is closed; a
    # kept-alive connection between requests, or a long answer, is not.
    import stella.transport

    monkeypatch.setattr(stella.transport, "HEADER_TIMEOUT_S", 0.1)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/long":
            await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"ok"})

    silent, rec = _protocol(app)
    await asyncio.sleep(0.15)
    assert rec.closed  # connected and said nothing
    silent.connection_lost(None)

    partial, rec = _protocol(app)
    partial.data_received(b"POST / HTTP/1.1\r\nhost: t\r\n")
    await asyncio.sleep(0.35)
    assert rec.closed
    partial.connection_lost(None)

    kept, rec = _protocol(app, busy=False)
    kept.data_received(b"GET /long HTTP/1.1\r\nhost: t\r\n\r\n")
    await asyncio.sleep(0.7)  # a long answer, then idle between requests: left open
    assert not rec.closed and b"ok" in b"".join(rec.writes)
    kept.data_received(b"GET / HTTP/1.1\r\nho")  # the next request begins, and stalls
    await asyncio.sleep(0.35)
    assert rec.closed
    kept.connection_lost(None)


async def test_headers_past_the_limits_get_431_and_the_connection_closes() -> None:
    from stella.transport import MAX_HEADER_BYTES, MAX_HEADERS

    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    # Headers that never end, in small pieces: refused once past the byte limit, and
    # nothing of them kept beyond it.
    proto, rec = _protocol(app)
    proto.data_received(b"GET / HTTP/1.1\r\nhost: t\r\n")
    sent = 0
    while not rec.ended and sent < 4 * MAX_HEADER_BYTES:
        chunk = b"x-a: " + b"a" * 1000 + b"\r\n"
        proto.data_received(chunk)
        sent += len(chunk)
    assert rec.ended and sent <= MAX_HEADER_BYTES + 2000
    assert rec.writes[0].startswith(b"HTTP/1.1 431 ") and len(rec.writes) == 1
    assert b"\r\nx-request-id: req_" in rec.writes[0]  # as every answer has one
    head, _, body = rec.writes[0].partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head
    error = msgspec.json.decode(body)["error"]
    assert error["code"] == "headers_too_large" and error["request_id"].startswith("req_")
    assert error["retryable"] is False  # the same headers are refused again
    assert b"\r\nx-should-retry: false\r\n" in head  # as every error answer says it
    assert b"\r\nx-content-type-options: nosniff\r\n" in head  # JSON only, for a browser
    proto.connection_lost(None)

    # Many tiny headers: the count is limited too.
    proto, rec = _protocol(app)
    proto.data_received(b"GET / HTTP/1.1\r\n" + b"x: y\r\n" * (MAX_HEADERS + 1) + b"\r\n")
    assert rec.ended and rec.writes[0].startswith(b"HTTP/1.1 431 ")
    proto.connection_lost(None)

    # One header past the limit, in the very read that ends the headers.
    proto, rec = _protocol(app)
    proto.data_received(b"GET / HTTP/1.1\r\nx-big: " + b"b" * 100_000 + b"\r\n\r\n")
    assert rec.ended and rec.writes[0].startswith(b"HTTP/1.1 431 ")
    proto.connection_lost(None)

    # A long URL counts as well; a large but allowed request is served.
    proto, rec = _protocol(app)
    proto.data_received(b"GET /" + b"u" * MAX_HEADER_BYTES + b" HTTP/1.1\r\nhost: t\r\n\r\n")
    assert rec.ended and rec.writes[0].startswith(b"HTTP/1.1 431 ")
    proto.connection_lost(None)
    proto, rec = _protocol(app, busy=False)
    big = b"x-b: " + b"b" * 8000 + b"\r\n"
    proto.data_received(b"GET /fine HTTP/1.1\r\nhost: t\r\n" + big * 6 + b"\r\n")
    await turn()
    assert b" 200 " in rec.writes[0] and not rec.closed and calls == ["/fine"]
    proto.connection_lost(None)


async def test_a_body_answered_before_it_came_does_not_hold_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 401 (or any answer) to a request whose body has not all come: a client that
    # then sends a byte of it and goes silent is closed at the body deadline (the
    # byte cancelled uvicorn's keep-alive timer); one that sends the rest of it is
    # an idle kept-alive connection again.
    import stella.transport

    monkeypatch.setattr(stella.transport, "BODY_TIMEOUT_S", 0.1)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    head = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n"
    proto, rec = _protocol(app, busy=False)
    proto.data_received(head)
    await turn()
    assert b" 401 " in rec.writes[0]
    proto.data_received(b"x")
    await asyncio.sleep(0.25)
    assert rec.closed
    proto.connection_lost(None)

    proto, rec = _protocol(app, busy=False)
    proto.timeout_keep_alive = 0.2
    proto.data_received(head)
    await turn()
    proto.data_received(b"0123456789")  # the rest of the body: then idle
    assert proto.timeout_keep_alive_task is not None
    await asyncio.sleep(0.12)
    assert not rec.closed  # not cut at the body deadline: the body came whole
    proto.data_received(head + b"0123456789")  # and the connection serves the next one
    await turn()
    assert sum(b" 401 " in w for w in rec.writes) == 2 and not rec.closed
    await asyncio.sleep(0.3)
    assert rec.closed  # closed by the keep-alive timeout once idle
    proto.connection_lost(None)

    # The rest of the body and the next request in one read: the next one runs without
    # a keep-alive timer cutting it.
    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await asyncio.sleep(0.4)
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    proto, rec = _protocol(slow, busy=False)
    proto.timeout_keep_alive = 0.3
    proto.data_received(head)
    await turn()
    proto.data_received(b"0123456789GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await asyncio.sleep(0.55)  # a stale timer would have cut /slow at 0.3 s
    assert not rec.closed and sum(b" 401 " in w for w in rec.writes) == 2
    proto.connection_lost(None)


async def test_a_pipelined_body_is_not_counted_as_headers() -> None:
    # A's large body and the first bytes of B in one read: A is answered, B is served.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    proto, rec = _protocol(app, busy=False)
    body = b"x" * 100_000
    proto.data_received(
        b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(body)
        + body
        + b"GET /b HTTP/1.1\r\nho"
    )
    await turn()
    proto.data_received(b"st: t\r\n\r\n")
    for _ in range(10):
        await turn()
    out = b"".join(rec.writes)
    assert b" 431 " not in out and out.count(b" 200 ") == 2 and not rec.closed
    assert out.index(b"/a") < out.index(b"/b")
    proto.connection_lost(None)

    # A request, then one whose single header runs past the limit in the same read
    # (the parser holds it unfinished): refused once its headers end.
    proto, rec = _protocol(app, busy=False)
    proto.data_received(
        b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nx-big: " + b"b" * 150_000
    )
    for _ in range(5):
        await turn()
    proto.data_received(b"\r\n\r\n")
    for _ in range(5):
        await turn()
    out = b"".join(rec.writes)
    assert out.count(b" 200 ") == 1 and b" 431 " in out and rec.ended, out[:200]
    proto.connection_lost(None)

    # B over the limits (or malformed) while A still streams: A's answer ends whole,
    # then B's error answer goes out and the connection ends (inside A's answer, the
    # error would corrupt it; closing at once would cut it).
    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(5):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": b""})

    bad_heads = (
        (b"GET /b HTTP/1.1\r\n" + b"x: y\r\n" * 300 + b"\r\n", b" 431 "),
        (b"POST /b HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", b" 400 "),
    )
    for bad, status in bad_heads:
        proto, rec = _protocol(streaming, busy=False)
        proto.data_received(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n")
        await turn()
        proto.data_received(bad)
        await asyncio.sleep(0.2)
        out = b"".join(rec.writes)
        a, _, b = out.partition(b"0\r\n\r\n")  # A's chunked answer, whole, then B's
        assert a.count(b"1\r\nx\r\n") == 5 and status not in a, out
        assert b.startswith(b"HTTP/1.1" + status) and rec.ended, out
        proto.connection_lost(None)


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_made_as_the_client_half_closes_is_sent(stream: bool) -> None:
    # A client may send its request and half-close (shutdown(SHUT_WR)) before reading.
    # With another request in flight, the answer is held to the end of the loop turn:
    # it must still go out before the connection ends (it was dropped, logged as sent).
    import json
    import socket
    import time

    from tests.live import run_stella

    def post(text: str) -> bytes:
        body = json.dumps(
            {"model": "echo", "stream": stream, "messages": [{"role": "user", "content": text}]}
        ).encode()
        head = (
            f"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    with run_stella() as server:
        port = int(server.url.rsplit(":", 1)[1])
        # A request whose body never comes: in flight all along, so answers are held.
        hold = socket.create_connection(("127.0.0.1", port))
        hold.sendall(
            b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
        )
        time.sleep(0.3)
        try:
            for i in range(5):
                s = socket.create_connection(("127.0.0.1", port))
                s.settimeout(10)
                s.sendall(post(f"half closed {i}"))
                s.shutdown(socket.SHUT_WR)
                got = b""
                while data := s.recv(65536):
                    got += data
                s.close()
                assert got.startswith(b"HTTP/1.1 200"), (i, got)
                body = got.split(b"\r\n\r\n", 1)[1]
                whole = b'"type":"done"' in body if stream else f"closed {i}".encode() in body
                assert whole, (i, got)
        finally:
            hold.close()


async def test_an_error_for_a_pipelined_request_waits_for_every_answer_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import stella.transport as transport

    # Looks at stalled headers come often: one must not take a request held back
    # behind a long answer for one stalled in its headers.
    monkeypatch.setattr(transport, "HEADER_TIMEOUT_S", 0.05)
    started: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/a":  # a long answer, streamed
            for _ in range(5):
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                await asyncio.sleep(0.06)
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    a = b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n"
    cases = (
        # A valid request queued between: answered before the error.
        (a + b"GET /b HTTP/1.1\r\nhost: t\r\n\r\nGET /c HTTP/1.1\r\nBad Header\r\n\r\n", [b"/b"]),
        # A queued request whose chunked body is malformed: never started, its 400 after A.
        (a + b"POST /b HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\nabc\r\n", []),
    )
    for data, between in cases:
        started.clear()
        proto, rec = _protocol(app, busy=False)
        proto.data_received(data)
        for _ in range(40):
            await asyncio.sleep(0.02)
            if rec.ended:
                break
        out = b"".join(rec.writes)
        answers = out.split(b"HTTP/1.1 ")[1:]
        assert [x[:3] for x in answers] == [b"200"] * (1 + len(between)) + [b"400"], out
        assert answers[0].count(b"1\r\nx\r\n") == 5 and b"/a" in answers[0], out
        for answer, path in zip(answers[1:], between, strict=False):
            assert path in answer, out
        assert rec.ended and started == ["/a", *(p.decode() for p in between)]
        proto.connection_lost(None)


def _answer_to(port: int, head: bytes, body: bytes) -> bytes:
    """Send a request and its body in one sendall, then read: the whole answer, or what
    came before the connection broke (with the error's name)."""
    import socket

    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(head + body)
            while b"\r\n\r\n" not in got or not _whole(got):
                data = s.recv(65536)
                if not data:
                    break
                got += data
        except OSError as exc:
            return got + f" [{type(exc).__name__}]".encode()
    return got


def _whole(answer: bytes) -> bool:
    """Whether `answer` holds a whole response with a Content-Length."""
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


@pytest.mark.parametrize("coalesce", [True, False])
def test_an_answer_before_the_body_is_read_is_not_lost_to_a_reset(coalesce: bool) -> None:
    # Answered (413, or 400 for a broken body, or 431) before the rest of the request is
    # read, a connection closed at once with that rest unread (or still coming) is reset
    # by the kernel, and the client's kernel drops the answer it holds unread: closed
    # lingering, the answer reaches the client every time.
    from concurrent.futures import ThreadPoolExecutor

    from tests.live import run_stella

    body = b'{"model":"echo","messages":[{"role":"user","content":"' + b"x" * 4_000_000 + b'"}]}'
    parts = [body[i : i + 200_000] for i in range(0, len(body), 200_000)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    post = b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    close = b"Connection: close\r\n"
    requests = (
        (post + close + b"Content-Length: %d\r\n\r\n" % len(body), body, b"413"),
        (post + b"Content-Length: %d\r\n\r\n" % len(body), body, b"413"),
        (post + close + b"Transfer-Encoding: chunked\r\n\r\n", chunked, b"413"),
        # A chunk size that is no number, after the first chunk: the parser's 400.
        (
            post + b"Transfer-Encoding: chunked\r\n\r\n",
            b"10\r\n" + body[:16] + b"\r\nZZ\r\n" + body,
            b"400",
        ),
        # Headers past the limit: 431.
        (post + b"x-big: ", body + b"\r\n\r\n", b"431"),
    )
    config = {"server": {"max_body_bytes": 65_536, "coalesce_writes": coalesce}}
    with run_stella(config) as server:
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda i: (requests[i % 5][2], _answer_to(server.port, *requests[i % 5][:2])),
                    range(40),
                )
            )
    bad = [
        (status, a[:60] + a[-40:])
        for status, a in answers
        if not (a.startswith(b"HTTP/1.1 " + status + b" ") and _whole(a))
    ]
    assert not bad, f"{len(bad)} of {len(answers)}: {bad[:5]}"


@pytest.mark.parametrize(
    ("path", "host", "status"),
    [
        ("/api/v1/chat", "127.0.0.1", b"413"),
        ("/api/v1/chat", "evil.example", b"403"),  # answered before the body is looked at
        ("/api/v1/nope", "127.0.0.1", b"404"),
    ],
)
def test_a_body_over_the_limit_is_not_read_to_its_end(path: str, host: str, status: bytes) -> None:
    # An answer before the body on a keep-alive connection kept it open while stella
    # read (and dropped) every byte the client announced, up to the 30 s body deadline:
    # a body announced over the limit ends the connection, after the lingering close.
    from tests.live import run_stella

    with run_stella({"server": {"max_body_bytes": 65_536}}) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
            sock.sendall(
                head
                + b"content-type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
                + bytes(100_000)
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
            assert b"connection: close" in answer.lower()
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 6 and not closed:  # the client goes on sending
                try:
                    sock.sendall(b"x" * 65_536)
                    time.sleep(0.05)
                except OSError:  # reset or broken pipe: the server closed it
                    closed = True
            assert closed, "the connection was kept to read the announced body"
        finally:
            sock.close()


async def test_closing_lingering_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # An answer that closes the connection before the body is all read shuts the write
    # side and drops what still comes, unparsed; the connection closes after LINGER_S,
    # past LINGER_BYTES, or at once in a shutdown. A body read whole closes at once.
    import stella.transport as transport

    monkeypatch.setattr(transport, "LINGER_S", 0.1)
    monkeypatch.setattr(transport, "LINGER_BYTES", 1000)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"2"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": b"no"})

    head = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n"

    async def answered() -> tuple[HttpToolsProtocol, Recorder]:
        proto, rec = _protocol(app, busy=False)
        proto.data_received(head + b"x" * 10)
        await turn()
        assert b" 413 " in rec.writes[0] and rec.eof and not rec.closed
        return proto, rec

    proto, rec = await answered()
    sent = len(rec.writes)
    proto.data_received(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 500)  # dropped, never parsed
    await turn()
    assert len(rec.writes) == sent and not rec.closed
    await asyncio.sleep(0.2)
    assert rec.closed  # the client never closed: LINGER_S
    proto.connection_lost(None)

    proto, rec = await answered()
    proto.data_received(b"x" * 1001)
    assert rec.closed  # past LINGER_BYTES
    proto.connection_lost(None)

    proto, rec = await answered()
    proto.shutdown()
    assert rec.closed  # a shutdown does not wait
    proto.connection_lost(None)

    proto, rec = _protocol(app, busy=False)
    proto.data_received(head + b"x" * 10)
    proto.shutdown()  # shutting down before the answer: no lingering after it
    await turn()
    assert b" 413 " in rec.writes[0] and rec.closed and not rec.eof
    proto.connection_lost(None)

    proto, rec = _protocol(app, busy=False)
    proto.data_received(head.replace(b"100000", b"3") + b"abc")  # the body read whole
    await turn()
    assert b" 413 " in rec.writes[0] and rec.closed and not rec.eof
    proto.connection_lost(None)


def test_a_pipelining_client_that_leaves_costs_no_traceback() -> None:
    """A client that pipelined many requests, read nothing and left: the cycle still
    running wrote to the closed connection ("unable to perform operation on
    <TCPTransport closed=True>", an ASGI exception in the log)."""
    from tests.live import run_stella

    with run_stella({}) as server:
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n" * 100)
            time.sleep(1)
            sock.close()
        time.sleep(0.5)
        lines = server.lines()
        assert not [line for line in lines if "Exception in ASGI application" in line]
        assert not [line for line in lines if "closed=True" in line]


class ReadingRecorder(Recorder):
    """A Recorder that knows whether the connection is being read (a paused transport
    delivers nothing)."""

    reading = True

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def _reading_protocol(app: Any) -> tuple[HttpToolsProtocol, ReadingRecorder]:
    """A protocol on a ReadingRecorder, alone on its server."""
    config = uvicorn.Config(app, lifespan="off", http=HttpToolsProtocol)
    config.load()
    proto = HttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    rec = ReadingRecorder()
    proto.connection_made(rec)  # type: ignore[arg-type]
    return proto, rec


async def _path_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the request's path."""
    while (await receive()).get("more_body"):
        pass
    body = scope["path"].encode()
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def test_pipelined_requests_are_not_read_far_ahead_of_their_answers() -> None:
    # uvicorn reads again after every answer, and parses a whole read: a client that
    # pipelines without reading its answers had every byte it sent parsed into a queued
    # request (hundreds of MB). Few may wait; the rest waits unread (and unparsed).
    from stella.transport import PARSE_STEP, PIPELINE_MAX

    req = b"GET /%05d HTTP/1.1\r\nhost: t\r\n\r\n"
    per_step = PARSE_STEP // len(req % 0) + 1  # requests one parsed step can hold

    # One write of 3,000 requests (~100 KB, one or two reads): answered in order, with
    # at most a step's worth waiting at a time.
    proto, rec = _reading_protocol(_path_app)
    proto.data_received(b"".join(req % i for i in range(3000)))
    most = 0
    for _ in range(10_000):
        most = max(most, len(proto.pipeline))
        await asyncio.sleep(0)
        if rec.writes and rec.writes[-1].endswith(b"/02999"):
            break
    out = b"".join(rec.writes)
    paths = [line[:6] for line in out.split(b"\r\n\r\n")[1:]]
    assert paths == [b"/%05d" % i for i in range(3000)], out[-300:]
    assert most <= PIPELINE_MAX + per_step, most
    assert rec.reading and not rec.closed
    proto.connection_lost(None)

    # A client that sends 200 more requests whenever the connection is read: what waits
    # stays bounded (uvicorn read again after each answer and queued 200 more).
    proto, rec = _reading_protocol(_path_app)
    batch = b"".join(req % i for i in range(200))
    most = sent = 0
    for _ in range(500):
        if rec.reading:
            proto.data_received(batch)
            sent += 200
        most = max(most, len(proto.pipeline))
        await asyncio.sleep(0)
    assert most <= PIPELINE_MAX + 200, most
    answered = b"".join(rec.writes).count(b"HTTP/1.1 200")
    assert sent - answered <= PIPELINE_MAX + 200 + 1, (sent, answered)
    proto.connection_lost(None)


async def test_headers_cut_short_behind_waiting_requests_are_not_a_stall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # /a streams for a while; /b waits its turn, so the connection is not read, and /c's
    # headers stop where the read stopped: the client is not stalling, and /c is served.
    import stella.transport as transport

    monkeypatch.setattr(transport, "HEADER_TIMEOUT_S", 0.05)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/a":
            for _ in range(6):
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    proto, rec = _reading_protocol(app)
    proto.data_received(
        b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nhost: t\r\n\r\nGET /c HTTP/1.1\r\nho"
    )
    assert not rec.reading
    await asyncio.sleep(0.25)
    assert not rec.closed
    while not rec.reading:
        await asyncio.sleep(0.02)
    proto.data_received(b"st: t\r\n\r\n")
    await asyncio.sleep(0.1)
    out = b"".join(rec.writes)
    assert out.count(b"HTTP/1.1 200") == 3 and out.index(b"/b") < out.index(b"/c"), out
    proto.connection_lost(None)


async def test_a_waiting_request_body_is_not_read_far_ahead() -> None:
    # A request's body waiting behind others (pipelined) is read up to uvicorn's limit
    # for an unread body, then no more until that request runs: one read was let in
    # after each answer before it.
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    proto, rec = _reading_protocol(app)
    proto.data_received(
        b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n" * 12
        + b"POST /c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    last = proto.cycle
    chunk = b"%x\r\n%s\r\n" % (16_000, b"y" * 16_000)
    most = 0
    for _ in range(300):
        if rec.reading:
            proto.data_received(chunk)
        if proto.pipeline:
            most = max(most, len(last.body))
        await asyncio.sleep(0)
    assert most <= HIGH_WATER_LIMIT + len(chunk), most
    assert b"".join(rec.writes).count(b"HTTP/1.1 200") == 12 and rec.reading
    proto.connection_lost(None)


def _rss_kb(pid: int) -> int:
    """A process's resident memory, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_pipelining_client_that_never_reads_does_not_grow_the_server() -> None:
    """Three connections pipeline /health for 4 s and read nothing: the server's memory
    grew by hundreds of MB (every read parsed into queued requests)."""
    import threading

    import httpx

    from tests.live import run_stella

    req = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" * 200
    with run_stella({}) as server:
        before = _rss_kb(server.proc.pid)
        stop = time.monotonic() + 4

        def flood() -> None:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", server.port))
                sock.setblocking(False)
                while time.monotonic() < stop:
                    try:
                        sock.send(req)
                    except BlockingIOError:
                        time.sleep(0.02)
                grown.append(_rss_kb(server.proc.pid) - before)

        grown: list[int] = []
        threads = [threading.Thread(target=flood) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max(grown) < 40_000, f"grew by {max(grown)} KiB"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_pipelining_client_gets_every_answer_in_order() -> None:
    from tests.live import run_stella

    n = 500
    with (
        run_stella({}) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        sock.sendall(
            b"".join(
                b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: req_pipe%05d\r\n\r\n" % i
                for i in range(n)
            )
        )
        out = b""
        while out.count(b"x-request-id: req_pipe") < n or not out.endswith(b"}"):
            data = sock.recv(65536)
            assert data, out[-300:]
            out += data
    assert out.count(b"HTTP/1.1 200 OK") == n
    ids = [int(x) for x in re.findall(rb"x-request-id: req_pipe(\d+)", out)]
    assert ids == list(range(n))


async def test_a_chunked_body_answered_before_it_came_is_read_up_to_a_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A chunked body's size is not announced: after an early answer (a 401) its rest was
    # read and dropped, without a cap, until the body deadline (gigabytes). Up to
    # LINGER_BYTES of it is read (a body of a usual size keeps the connection); past
    # that the connection ends, lingering.
    import stella.transport as transport

    monkeypatch.setattr(transport, "LINGER_BYTES", 1000)
    monkeypatch.setattr(transport, "LINGER_S", 0.1)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"no"})

    head = b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (300, b"x" * 300)

    proto, rec = _protocol(app, busy=False)
    proto.data_received(head + chunk)
    await turn()
    assert b" 401 " in rec.writes[0] and not rec.ended
    for _ in range(3):
        proto.data_received(chunk)
    assert not rec.ended  # 918 bytes of it so far: read
    proto.data_received(chunk)
    assert rec.eof and not rec.closed  # past the limit: the write side shut, lingering
    proto.data_received(chunk)  # dropped unparsed
    await asyncio.sleep(0.2)
    assert rec.closed and b"".join(rec.writes).count(b"HTTP/1.1 ") == 1
    proto.connection_lost(None)

    # A body that ends within the limit: the connection serves the next request.
    proto, rec = _protocol(app, busy=False)
    proto.data_received(head + chunk)
    await turn()
    proto.data_received(chunk + b"0\r\n\r\n")
    proto.data_received(head + chunk + b"0\r\n\r\n")
    await turn()
    assert sum(b" 401 " in w for w in rec.writes) == 2 and not rec.ended
    proto.connection_lost(None)


def test_a_chunked_body_answered_early_is_not_read_to_its_end() -> None:
    # The server's 404 comes before the body; the client streams chunks on: the server
    # stops reading them soon after LINGER_BYTES (it read for 30 s, ~80 GB on loopback).
    from tests.live import run_stella

    with run_stella({}) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(
                b"POST /api/v1/nope HTTP/1.1\r\nHost: localhost\r\n"
                b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n"
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
            chunk = b"%x\r\n%s\r\n" % (65_536, bytes(65_536))
            sent, t0, closed = 0, time.monotonic(), False
            while time.monotonic() - t0 < 6 and not closed:
                try:
                    sock.sendall(chunk)
                    sent += len(chunk)
                except OSError:  # reset or broken pipe: the server closed it
                    closed = True
            assert closed, f"{sent >> 20} MiB read and the connection still open"
            assert sent < 64 << 20  # LINGER_BYTES read, LINGER_BYTES lingering, buffers
        finally:
            sock.close()


MALFORMED = {
    # Request smuggling shapes: framing two readers may read two ways.
    "content-length and chunked": b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n"
    b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "two content-lengths": b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n"
    b"content-length: 6\r\n\r\nhello!",
    "chunked, identity": b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked, identity"
    b"\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nhost: t\r\nx-a: a\r\n b\r\n\r\n",
    "chunk size": b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\nabc\r\n",
    "method": b"FOO / HTTP/1.1\r\nhost: t\r\n\r\n",
    "non-ASCII path": "GET /é HTTP/1.1\r\nhost: t\r\n\r\n".encode(),
    # RFC 9112 3.2: one Host header, required in HTTP/1.1.
    "no host": b"GET / HTTP/1.1\r\nx-a: b\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nhost: t\r\nhost: evil.example\r\n\r\n",
    "two hosts, HTTP/1.0": b"GET / HTTP/1.0\r\nhost: t\r\nhost: evil.example\r\n\r\n",
    # RFC 9112 6.1: HTTP/1.0 has no Transfer-Encoding; a message with one is faulty framing.
    "chunked, HTTP/1.0": b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("shape", MALFORMED)
async def test_a_malformed_request_gets_a_json_400_and_the_connection_closes(shape: str) -> None:
    # uvicorn's answer was plain text with no X-Request-ID; a request without a Host
    # header, or with two, was served.
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    proto, rec = _protocol(app, busy=False)
    proto.data_received(MALFORMED[shape])
    await turn()
    out = b"".join(rec.writes)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 400 bad request", out
    assert b"content-type: application/json" in lines and b"connection: close" in lines
    assert b"x-content-type-options: nosniff" in lines
    rid = next(line for line in lines if line.startswith(b"x-request-id: req_"))[14:]
    error = msgspec.json.decode(body)["error"]
    assert error["code"] == "invalid_request" and error["retryable"] is False
    assert error["request_id"].encode() == rid and error["message"].strip()
    # Only the 400 (a chunked body's request starts before its body breaks; never served).
    assert rec.ended and out.count(b"\r\n\r\n") == 1
    assert calls == ([] if shape != "chunk size" else ["/"])
    proto.connection_lost(None)


def test_the_transports_own_answers_carry_a_date() -> None:
    """RFC 9110 6.6.1: an origin server with a clock sends Date on its answers; the ones
    the transport writes itself (a request it cannot read or serve) had none."""
    from email.utils import parsedate_to_datetime

    from tests.live import run_stella

    with run_stella({}) as server:
        for request, status in (
            (b"GET /health HTTP/1.1\r\n\r\n", b"400"),  # no Host
            (b"GET /health HTTP/1.1\r\nHost: t\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
            (b"CONNECT t:443 HTTP/1.1\r\nHost: t\r\n\r\n", b"400"),
            (
                b"POST /api/v1/chat HTTP/1.1\r\nHost: t\r\n"
                b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                b"501",
            ),
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(request)
                got = b""
                while chunk := sock.recv(65536):  # to the end: the server closes it
                    got += chunk
            head = got.partition(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")
            assert head[0].startswith("http/1.1 " + status.decode()), got
            dates = [line[6:] for line in head if line.startswith("date: ")]
            assert len(dates) == 1, got
            assert abs(parsedate_to_datetime(dates[0]).timestamp() - time.time()) < 5, dates


async def test_an_http_1_0_request_without_host_is_served() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    proto, rec = _protocol(app, busy=False)
    proto.data_received(b"GET / HTTP/1.0\r\n\r\n")
    await turn()
    assert b"".join(rec.writes).startswith(b"HTTP/1.1 200 ")
    proto.connection_lost(None)


def test_a_host_trailer_does_not_refuse_the_next_request() -> None:
    """A chunked body's trailer fields pass through on_header as headers do: a `Host`
    trailer was counted into the next request's Host headers (400, "more than one")."""
    from tests.live import run_stella

    with run_stella({}) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = b'{"model":"echo","stream":false,"messages":[{"role":"user","content":"hi"}]}'
        sock.sendall(
            b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\nHost: trailer\r\n\r\n"
            + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        sock.settimeout(5)
        got = b""
        while got.count(b"HTTP/1.1 ") < 2 or not got.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        sock.close()
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", got) == [b"200", b"200"], got


def test_an_http_1_0_request_with_transfer_encoding_is_refused() -> None:
    """RFC 9112 6.1: a server that receives HTTP/1.0 with Transfer-Encoding must treat its
    framing as faulty. Read as chunked, its body's end was where a proxy reading it as
    HTTP/1.0 saw none, and the request after it was served on the same connection."""
    from tests.live import run_stella

    body = b'{"model":"echo","stream":false,"messages":[{"role":"user","content":"hi"}]}'
    with run_stella({}) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(
            b"POST /api/v1/chat HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n"
            + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        got = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break  # the server closed it: nothing after the 400 was read
            got += chunk
        else:
            raise AssertionError(f"the connection stayed open: {got!r}")
        sock.close()
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", got) == [b"400"], got
        head, _, answer = got.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        error = msgspec.json.decode(answer)["error"]
        assert error["code"] == "invalid_request" and "HTTP/1.0" in error["message"], error
        # HTTP/1.0 with a Content-Length is served as ever.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(
                b"POST /api/v1/chat HTTP/1.0\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        assert got.startswith(b"HTTP/1.1 200 ") and b'"hi"' in got, got


def test_a_transfer_coding_other_than_chunked_is_refused_with_501() -> None:
    """RFC 9112 6.1: a transfer coding the server does not understand is answered 501.
    llhttp undoes the chunks alone: the gzip under them reached the JSON decoder ("JSON is
    malformed"), as if the client had sent bad JSON."""
    import gzip

    from tests.live import run_stella

    body = b'{"model":"echo","stream":false,"messages":[{"role":"user","content":"hi"}]}'
    zipped = gzip.compress(body)

    def answer(port: int, codings: bytes, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n%s"
                b"Content-Type: application/json\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (codings, len(data), data)
            )
            got = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    return got  # closed: nothing after the refusal was read
                got += chunk
                if got.count(b"HTTP/1.1 ") == 2 and got.endswith(b"}"):
                    return got
        raise AssertionError(f"the connection stayed open: {got!r}")

    with run_stella({}) as server:
        for codings in (
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"Transfer-Encoding: GZIP ,chunked\r\n",
            b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",  # one list
        ):
            got = answer(server.port, codings, zipped)
            assert re.findall(rb"HTTP/1\.1 (\d{3}) ", got) == [b"501"], (codings, got)
            head, _, text = got.partition(b"\r\n\r\n")
            assert b"connection: close" in head.lower() and b"x-should-retry: false" in head
            error = msgspec.json.decode(text)["error"]
            assert error["code"] == "not_implemented" and error["retryable"] is False, error
            assert "'gzip'" in error["message"], error
            assert head.lower().count(b"x-request-id: " + error["request_id"].encode()) == 1
        # Chunked alone (any case) is read as ever, and the next request served.
        for codings in (b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: Chunked\r\n"):
            got = answer(server.port, codings, body)
            assert re.findall(rb"HTTP/1\.1 (\d{3}) ", got) == [b"200", b"200"], got
        # Chunked not last stays the parser's 400 (RFC 9112 6.3: the length is unknown).
        got = answer(server.port, b"Transfer-Encoding: chunked, gzip\r\n", body)
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", got) == [b"400"], got


async def test_a_trailer_past_the_limit_ends_the_request() -> None:
    # A chunked body's trailer fields are header fields (RFC 9112 7.1.2): the head's limit
    # holds for them. Nothing limited them, and httptools copies a field whole for each
    # piece of it: one field without end stalled the server for seconds per MiB.
    from stella.transport import MAX_HEADER_BYTES

    bodies: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        body = message.get("body", b"")
        while message.get("more_body") and message["type"] == "http.request":
            message = await receive()
            body += message.get("body", b"")
        if message["type"] != "http.request":
            return  # the client is gone (or refused): nothing to answer
        bodies.append(body)
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    head = b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
    for field in (b"x-t: " + b"a" * 1000, b"x-t: a\r\n" * 125):  # one field; many fields
        proto, rec = _protocol(app, busy=False)
        proto.data_received(head + b"5\r\nhello\r\n0\r\n")
        await turn()
        sent = 0
        while not rec.ended and sent < 4 * MAX_HEADER_BYTES:
            proto.data_received(field)
            sent += len(field)
        assert rec.ended and sent <= MAX_HEADER_BYTES + 2000, sent
        assert len(rec.writes) == 1 and rec.writes[0].startswith(b"HTTP/1.1 431 ")
        error = msgspec.json.decode(rec.writes[0].partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "headers_too_large" and "trailer" in error["message"]
        await turn()
        assert bodies == []  # the request was never served
        proto.connection_lost(None)

    # Chunks larger than the limit, reads that end after a chunk's size line, and a short
    # trailer: served as before, and the connection kept.
    proto, rec = _protocol(app, busy=False)
    chunk = b"x" * (3 * MAX_HEADER_BYTES)
    proto.data_received(head + b"%x\r\n" % len(chunk))
    for _ in range(2):
        proto.data_received(chunk + b"\r\n")
        proto.data_received(b"%x\r\n" % len(chunk))
        await turn()
    proto.data_received(chunk + b"\r\n0\r\nx-t: " + b"a" * 30_000 + b"\r\n\r\n")
    await turn()
    assert bodies == [chunk * 3] and b" 200 " in rec.writes[0] and not rec.ended
    proto.connection_lost(None)

    # Answered before the body came (a 401): a long trailer after it ends the connection,
    # lingering, with no second answer.
    async def early(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"no"})

    proto, rec = _protocol(early, busy=False)
    proto.data_received(head + b"5\r\nhello\r\n")
    await turn()
    assert b" 401 " in rec.writes[0]
    proto.data_received(b"0\r\nx-t: ")
    sent = 0
    while not rec.ended and sent < 4 * MAX_HEADER_BYTES:
        proto.data_received(b"a" * 1000)
        sent += 1000
    assert rec.eof and not rec.closed and sent <= MAX_HEADER_BYTES + 2000, sent
    assert b"".join(rec.writes).count(b"HTTP/1.1 ") == 1
    proto.connection_lost(None)


def test_a_long_trailer_does_not_stall_the_server() -> None:
    """One connection sending a trailer field without end froze every other one (a
    /health took 18-30 s): it is refused 431 once past the limit, and /health answers
    meanwhile."""
    import threading

    from tests.live import run_stella

    with run_stella({}) as server:
        waits: list[tuple[float, bytes]] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                        got = s.recv(100)[:12]
                except OSError as exc:
                    got = repr(exc).encode()
                waits.append((time.monotonic() - t0, got))
                time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
                sock.sendall(
                    b"POST /api/v1/chat HTTP/1.1\r\nHost: localhost\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: "
                )
                sent = 0
                while sent < 16 << 20:  # the server stalled for seconds before this
                    try:
                        sock.sendall(b"a" * 65_536)
                    except OSError:  # refused and closed: what was sent is dropped
                        break
                    sent += 65_536
                answer = sock.recv(65_536)
        finally:
            stop.set()
            prober.join()
    assert answer.startswith(b"HTTP/1.1 431 "), (sent, answer[:200])
    assert b'"code":"headers_too_large"' in answer
    assert waits and all(got == b"HTTP/1.1 200" for _, got in waits), waits
    assert max(wait for wait, _ in waits) < 5, waits


async def test_an_upgrade_request_body_in_a_large_read_is_read_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A read over PARSE_STEP is parsed a piece at a time: the body of a request that asks
    # to upgrade (the parser stops at its headers) was taken from the first piece alone,
    # and a body over ~16 KiB that came with its headers was refused as not come.
    import stella.transport as transport

    monkeypatch.setattr(transport, "LINGER_BYTES", 1000)
    got: list[tuple[bytes, bool]] = []
    answer = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        got.append((message["body"], "stella.body_unread" in scope))
        await answer.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    body = b"x" * (5 * transport.PARSE_STEP + 7)
    head = (
        b"POST / HTTP/1.1\r\nhost: t\r\nconnection: Upgrade\r\nupgrade: h2c\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    then = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"
    proto, rec = _protocol(app, busy=False)
    proto.data_received(head + body + then)
    await turn()
    assert got == [(body, False)]
    answer.set()
    await turn()
    # Answered once (what came after it is not a request), and closed lingering.
    assert b"".join(rec.writes).count(b"HTTP/1.1 ") == 1 and rec.eof and not rec.closed
    proto.connection_lost(None)

    # A body after its headers: said unread; what comes is dropped, not parsed, up to
    # LINGER_BYTES (past it the connection ends, lingering, with no second answer).
    answer.clear()
    got.clear()
    proto, rec = _protocol(app, busy=False)
    proto.data_received(head)
    await turn()
    assert got == [(b"", True)]
    proto.data_received(body[:900])
    await turn()
    assert rec.writes == [] and not rec.ended
    proto.data_received(body[:200])
    assert rec.eof and not rec.closed
    answer.set()
    await turn()
    assert b"".join(rec.writes).count(b"HTTP/1.1 ") == 0  # the client heard the end
    proto.connection_lost(None)


def test_an_upgrade_request_is_answered_whole() -> None:
    """`curl --http2` asks for h2c on every http:// request: a body over ~16 KiB sent with
    its headers was refused as not sent with them, and a body too large for one read got
    its 400 reset away (the connection closed with the rest of the body unread)."""
    import json

    from tests.live import run_stella

    with run_stella({}) as server:
        for size, status in ((100_000, b"200"), (600_000, b"400")):
            body = json.dumps(
                {
                    "model": "echo",
                    "stream": False,
                    "messages": [{"role": "user", "content": "x" * size}],
                }
            ).encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /api/v1/chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                    b"Upgrade: h2c\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body
                )
                time.sleep(0.2)  # the answer is there before the client reads it
                got, end = b"", "EOF"
                try:
                    while data := sock.recv(65_536):
                        got += data
                except OSError as exc:  # a reset: what the client had not read yet is lost
                    end = type(exc).__name__
            assert got.startswith(b"HTTP/1.1 " + status + b" ") and _whole(got), (size, got[-200:])
            assert end == "EOF", (size, end)
            if status == b"400":
                assert b"without Upgrade" in got


async def test_an_answer_before_a_held_back_body_closes_the_connection() -> None:
    # A client that sends `Expect: 100-continue` holds its body back until a 100 Continue:
    # answered before it (a 401, a 404), the connection was kept with no word of it (RFC
    # 9110 10.1.1 asks the answer to say), the server waiting for a body the client may
    # never send, or reading the body it does send where the next request should be.
    async def early(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"no"})

    async def reads(scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    head = b"POST / HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n"
    proto, rec = _protocol(early, busy=False)
    proto.data_received(head)
    await turn()
    answer = b"".join(rec.writes)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"\r\nconnection: close\r\n" in answer
    assert rec.eof and not rec.closed  # lingering: the body may come after all
    proto.connection_lost(None)

    # Asked for (the 100 Continue), or come with its headers anyway: the connection is kept.
    proto, rec = _protocol(reads, busy=False)
    proto.data_received(head)
    await turn()
    assert rec.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    proto.data_received(b"hello")
    await turn()
    answer = b"".join(rec.writes[1:])
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nhello")
    assert b"connection: close" not in answer and not rec.ended
    proto.connection_lost(None)
    proto, rec = _protocol(early, busy=False)
    proto.data_received(head + b"hello")
    await turn()
    assert b" 401 " in rec.writes[0] and b"connection: close" not in rec.writes[0]
    assert not rec.ended
    proto.connection_lost(None)


def test_an_early_answer_to_expect_100_continue_says_it_closes() -> None:
    from tests.live import run_stella

    with run_stella({"server": {"max_body_bytes": 65_536}}) as server:
        for path, host, status in (
            ("/api/v1/nope", "localhost", b"404"),
            ("/api/v1/chat", "evil.example", b"403"),
            ("/api/v1/chat", "localhost", b"413"),  # which said it already
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
                    + b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                    b"Content-Length: %d\r\n\r\n" % (100 if status != b"413" else 100_000)
                )
                got = b""
                while data := sock.recv(65_536):  # to the end: the server closes it
                    got += data
            head = got.partition(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 " + status + b" ") and _whole(got), got
            assert b"\r\nconnection: close" in head, got

        # A body the server asks for: served, and the connection kept for the next request.
        body = b'{"model":"echo","stream":false,"messages":[{"role":"user","content":"hi"}]}'
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /api/v1/chat HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            assert sock.recv(65_536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body + b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            got = b""
            while got.count(b"HTTP/1.1 200 ") < 2 or not got.endswith(b"}"):
                data = sock.recv(65_536)
                assert data, got
                got += data
            assert b"connection: close" not in got.lower()


# uvicorn's methods stella.transport replaces outright (copies plus its changes), as read
# in uvicorn 0.54.0: a uvicorn whose copy differs needs a read before it is used.
REPLACED = {
    "_unsupported_upgrade_warning": "55bbd2762b189d9a",
    "send_400_response": "ae5a4a3782b646fd",
    "on_header": "65d62c044f61fdbd",
    "on_body": "dba9c32aeba35b6a",
    "pause_writing": "17a8fd215d96a13c",
    "resume_writing": "7844bbaa8cceb1ef",
}


def test_the_uvicorn_methods_replaced_are_those_read() -> None:
    import hashlib
    import inspect

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base

    seen = {
        name: hashlib.sha256(inspect.getsource(getattr(Base, name)).encode()).hexdigest()[:16]
        for name in REPLACED
    }
    assert seen == REPLACED, f"uvicorn {uvicorn.__version__} changed methods stella replaces"
    for name in REPLACED:  # and each is still replaced, not inherited
        assert name in vars(HttpToolsProtocol) or any(
            name in vars(c) for c in HttpToolsProtocol.__mro__[1:] if c is not Base
        )


async def test_a_held_answer_is_judged_by_its_own_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other requests in flight: the answer's writes are held to the end of the loop turn,
    # after uvicorn has called it complete. With the client behind, its bytes go out as it
    # completes, so the pause they cause is judged by its limit (what is left of its
    # total), not by the default.
    import structlog

    import stella.transport

    monkeypatch.setattr(stella.transport, "SEND_TIMEOUT_S", 10.0)
    monkeypatch.setattr(stella.transport, "SEND_MIN_S", 0.01)

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        protocol = scope["stella.protocol"]
        protocol.send_by, protocol.send_rid = time.perf_counter() + 0.2, "req-held"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 100})

    class Behind(Recorder):
        def get_write_buffer_size(self) -> int:
            return 1000  # an earlier answer's bytes still wait: the client is behind

    proto, rec = _protocol(answer, rec=Behind())  # busy: writes are held
    write = rec.write

    def overflowing(data: bytes) -> None:
        write(data)
        proto.pause_writing()  # the answer is past the transport's high-water mark

    rec.write = overflowing  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        proto.data_received(REQUEST)
        await asyncio.sleep(0.1)
        assert rec.writes and not rec.closing  # out, and waiting on the client
        await asyncio.sleep(0.3)
        assert rec.aborted
    dropped = [e for e in logs if e["event"] == "answer_dropped"]
    assert len(dropped) == 1 and dropped[0]["request_id"] == "req-held", logs
    proto.connection_lost(None)


async def test_without_coalescing_the_write_limits_hold_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # server.coalesce_writes = false: writes go straight out, and a close with bytes the
    # client never takes still ends SEND_TIMEOUT_S later (the limits live on the transport).
    import stella.transport
    from stella.transport import BodyDeadlineProtocol, CorkedTransport

    monkeypatch.setattr(stella.transport, "SEND_TIMEOUT_S", 0.2)

    class Unsent(Recorder):
        def get_write_buffer_size(self) -> int:
            return 0 if self.aborted else 1000

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"connection", b"close")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"last"})

    config = uvicorn.Config(answer, lifespan="off", http=BodyDeadlineProtocol)
    config.load()
    state = ServerState()
    state.tasks.add(asyncio.get_running_loop().create_future())  # type: ignore[arg-type]
    proto = BodyDeadlineProtocol(
        config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
    )
    rec = Unsent()
    proto.connection_made(rec)  # type: ignore[arg-type]
    assert isinstance(proto.transport, CorkedTransport)
    proto.data_received(REQUEST)
    await turn()
    assert len(rec.writes) == 2  # not held: uvicorn's own two writes, busy server or not
    assert rec.closed and not rec.aborted
    await asyncio.sleep(0.05)
    assert not rec.aborted
    await asyncio.sleep(0.35)
    assert rec.aborted
    proto.connection_lost(None)
