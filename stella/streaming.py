"""Streaming responses: an early first byte, heartbeats, disconnect, drain.

`EventStream` is a plain ASGI response. It sends the headers and the `start`
event immediately (given a dialect's `refuse`, the status line waits for the first
event, at most `ping_interval_s`, so a failure before it is an HTTP error status),
encodes each pipeline event with the dialect's codec, sends a ping after a silence,
cancels the backend when the client goes away, and on shutdown ends the stream with
an in-band `shutting_down` error. Every stream ends with exactly one terminal event
from the pipeline or from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import sys
import termios
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import msgspec
import structlog

from stella.core import Inference, SinkClosed, error_event, log_fault
from stella.errors import ShuttingDown, StellaError
from stella.protocol import Delta, Done, Error, Start, ToolCall
from stella.transport import SELF_BOUNDED
from stella.watchdog import ticker

_log = structlog.get_logger("stella")
# Streams older than this get a task that watches for a disconnect and sends pings.
WATCH_AFTER_S = 0.05
# A stream's last line (an error, the close) goes out unless its client takes nothing
# of what is waiting for it for END_WRITE_S (it stopped reading), or it takes longer
# than END_WRITE_MAX_S in all (a reader too slow for a shutdown's budget): then the
# connection is dropped.
END_WRITE_S = 1.0
END_WRITE_MAX_S = 3.0
Send = Callable[[dict[str, Any]], Any]
Receive = Callable[[], Any]
_encode = msgspec.json.Encoder().encode


def one_line(data: bytes) -> bytes:
    """JSON `data` with U+2028, U+2029 and U+0085 escaped, so that it stays one line.

    msgspec writes them raw inside strings (valid JSON), but readers that split lines
    as Python's str.splitlines() does (httpx's iter_lines, and so the official ollama
    client) would cut an NDJSON line, or an SSE event's `data:` line, at them. Go's
    encoder, Ollama's own, escapes the first two as well. Their bytes occur only inside strings (JSON's syntax is ASCII)
    and only as these characters (0xC2 and 0xE2 lead UTF-8 sequences).
    """
    if not data.isascii() and (
        b"\xe2\x80\xa8" in data or b"\xe2\x80\xa9" in data or b"\xc2\x85" in data
    ):
        data = _escaped(data)
    return data


def json_text(text: str) -> bytes:
    """`text` as a JSON string that stays on one line, as one_line makes it.

    For a stream's text pieces: the test is on the str (its ASCII flag, then a search
    for each character), far cheaper than one_line's byte searches of a whole event.
    """
    data = _encode(text)
    if text.isascii() or not ("\u2028" in text or "\u2029" in text or "\x85" in text):
        return data
    return _escaped(data)


def _escaped(data: bytes) -> bytes:
    return (
        data.replace(b"\xe2\x80\xa8", b"\\u2028")
        .replace(b"\xe2\x80\xa9", b"\\u2029")
        .replace(b"\xc2\x85", b"\\u0085")
    )


class Codec:
    """How a dialect writes events on the wire; the native one is NDJSON."""

    media_type = "application/x-ndjson"
    # Whether a Delta of reasoning alone reaches the client. When not, such a Delta is no
    # start of the answer: a failure after it may still be retried, or fall back, and the
    # status line held for it (`refuse`) may still be an error.
    shows_reasoning = True
    # Whether a Delta of an upstream's signature alone (or a redacted block) reaches the
    # client; when not, it starts no answer either (see shows_reasoning).
    shows_signatures = True

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()

    def start(self, event: Start) -> bytes:
        """Bytes for the start of the stream (b"" sends only the headers)."""
        return one_line(self._encoder.encode(event)) + b"\n"

    def encode(self, event: Delta | ToolCall | Done | Error) -> bytes:
        """Bytes for one pipeline event (Delta, ToolCall, Done, Error)."""
        return one_line(self._encoder.encode(event)) + b"\n"

    def ping(self) -> bytes:
        """Bytes that keep the connection alive without meaning anything."""
        return b'{"type":"ping"}\n'

    def close(self) -> bytes:
        """Bytes after the terminal event (e.g. SSE's `data: [DONE]`)."""
        return b""


class Cancellable(Protocol):
    """What the drain ends: a call, or a body still arriving; `cancel_reason` says why."""

    cancel_reason: str | None


class Drain:
    """Tracks running calls so shutdown can let them finish, then end them."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.over = False  # cut: calls still running were ended
        self.tasks: dict[asyncio.Task[Any], Cancellable] = {}
        self.waiting: set[asyncio.Task[Any]] = set()  # of those, the ones awaiting a slot
        self._timer: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self, call: Cancellable, task: asyncio.Task[Any], waiting: bool = False) -> bool:
        """Register `task` as serving `call`, or with `waiting` as waiting to be admitted
        (ended when the drain begins); False, registering nothing, when the drain is over:
        the call must not start (its cancel_reason says why)."""
        if self.over:
            # Not a cancel: a call that never pauses would take it only after its answer.
            call.cancel_reason = "shutting_down"
            return False
        self.tasks[task] = call
        if waiting:
            self.waiting.add(task)
        if len(self.tasks) == 1:
            self.idle.clear()
        return True

    def leave(self, task: asyncio.Task[Any]) -> None:
        """Unregister `task`."""
        self.tasks.pop(task, None)
        self.waiting.discard(task)
        if not self.tasks:
            self.idle.set()

    def begin(self) -> None:
        """Stop taking new calls: those waiting for a slot end now (they would start new
        work on a server going away), the running ones after the timeout."""
        if self.draining:
            return
        self.draining = True
        for task in list(self.waiting):
            _end(task, self.tasks[task])
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.timeout_s, self.cut)

    def cut(self) -> None:
        """End every running call now, each with a `shutting_down` outcome (once: a call
        already ended may be sending its last line, which a second cancel would lose)."""
        if self._timer is not None:  # the lifespan cuts before the timeout: no second cut
            self._timer.cancel()
            self._timer = None
        if self.over:
            return
        self.over = True
        for task, call in list(self.tasks.items()):
            _end(task, call)

    async def wait(self, seconds: float) -> None:
        """Wait until every running call has ended, at most `seconds`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.idle.wait()


def _end(task: asyncio.Task[Any], call: Cancellable) -> None:
    """Cancel `task`, its call ending as `shutting_down`."""
    call.cancel_reason = "shutting_down"
    task.cancel()


class EventStream:
    """ASGI response streaming one inference through a codec."""

    def __init__(
        self,
        inference: Inference,
        codec: Codec,
        *,
        drain: Drain,
        ping_interval_s: float = 15.0,
        headers: list[tuple[bytes, bytes]] | None = None,
        refuse: Callable[[StellaError], Any] | None = None,
    ) -> None:
        self.inference = inference
        self.codec = codec
        self.drain = drain
        self.ping_interval_s = ping_interval_s
        # With `refuse` (a dialect's error response), the status line waits for the first
        # event, at most ping_interval_s: a failure before it is then an HTTP error, as
        # the API this dialect copies gives it, and its clients' retries see the status.
        self.refuse = refuse
        self._started = refuse is None  # decided: the stream starts (or has started)
        self._ready = refuse is None  # the status line has gone out: the body may follow
        self._starting: asyncio.Future[None] | None = None  # the start, while it is sent
        self._status_sent = False  # http.response.start went out (never twice)
        self.raw_headers = [
            (b"content-type", codec.media_type.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *(headers or ()),
        ]
        self._last = 0.0  # loop time of the last line sent
        self._loop_time: Callable[[], float] = time.monotonic  # the loop's clock, once running
        self._open = True

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        inference = self.inference
        call = inference.call
        tk = ticker()
        loop = tk.loop
        self._loop_time = loop.time
        task = asyncio.current_task(loop)
        assert task is not None
        entered = self.drain.enter(call, task)
        inference.task = task
        protocol = scope.get("stella.protocol")
        if protocol is not None:
            # No write limit of the server's own while the stream runs: it cuts a client
            # that stopped reading itself, at its total limit (408 client_too_slow).
            protocol.send_by = SELF_BOUNDED
        # Short streams end before anyone could notice a disconnect or need a ping:
        # the watcher task starts only once the stream has run for a moment.
        watcher: list[asyncio.Task[Any]] = []
        later = tk.later(
            min(WATCH_AFTER_S, self.ping_interval_s),
            lambda: watcher.append(loop.create_task(self._watch(receive, send, task, call))),
        )
        encode = self.codec.encode

        async def emit(event: Any) -> None:
            try:
                if not self._ready:
                    await self._begin(send)
                chunk = encode(event)
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self._last = loop.time()
            except OSError:
                raise SinkClosed from None

        try:
            if not entered:  # the drain is over: ended before it began
                if self._started:
                    await self._send_start(send)
                await self._end(scope, receive, send, ShuttingDown())
                return
            if self._started:
                await self._send_start(send)
            terminal = await inference.run(
                emit, self.codec.shows_reasoning, self.codec.shows_signatures
            )
            if not self._started and type(terminal) is Error and inference.error is not None:
                # Nothing was sent yet: the failure is the answer's status.
                self._open = False
                await self._refuse(scope, receive, send, inference.error)
                return
            if type(terminal) is Error and terminal.code == "client_too_slow":
                # Nothing more can be written to this client: drop the connection.
                self._open = False
                await _drop(scope, send, self.codec.encode(terminal))
                return
            # The last lines get what is left of the total limit (at least a second): a
            # client that stopped reading must not hold the connection after the answer.
            # (A Later on the loop's ticker: asyncio.timeout costs a stream ~10 us.)
            left = inference.ends_at - time.perf_counter()
            if protocol is not None:
                protocol.send_by = inference.ends_at  # so do their bytes still unsent at the end
            stuck: list[bool] = []

            def cut() -> None:
                stuck.append(True)
                task.cancel()

            limit = tk.later(max(left, 1.0), cut)
            try:
                await emit(terminal)
                self._open = False
                await send(
                    {"type": "http.response.body", "body": self.codec.close(), "more_body": False}
                )
            except asyncio.CancelledError:
                # The answer is settled (its event logged): a shutdown's cut sends no
                # second terminal line, it ends the connection as a stuck client's is.
                if not stuck and call.cancel_reason != "shutting_down":
                    raise
                task.uncancel()
                self._open = False
                await _drop(scope, send, b"")
            finally:
                limit.cancel()
        except asyncio.CancelledError:
            if call.cancel_reason is None:
                raise  # cancelled by the server itself: let it through
            task.uncancel()
            if call.cancel_reason == "shutting_down":
                await self._end(scope, receive, send, ShuttingDown())
        except (OSError, SinkClosed):
            # The client went away and a write failed: same as a disconnect.
            call.cancel_reason = call.cancel_reason or "client_closed"
        except Exception as exc:
            # A bug after the first byte: the stream still gets its one terminal line.
            # Its message may quote what was being written: only with log.content.
            log_fault(
                "stream_failed",
                exc,
                inference.pipeline.log_content,
                request_id=call.request_id,
            )
            if self._open:
                err = StellaError("internal error; see the server log")
                await self._end(scope, receive, send, err)
                inference.fail(StellaError("internal error"))
        finally:
            self._open = False
            later.cancel()
            for w in watcher:
                w.cancel()
            inference.finish()
            self.drain.leave(task)

    async def _send_start(self, send: Send) -> None:
        """The status line, the headers and the codec's opening bytes (only those, when a
        start cut short had sent the status line already)."""
        if not self._status_sent:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            self._status_sent = True
        first = self.codec.start(self.inference.start_event())
        if first or self.refuse is None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        self._last = self._loop_time()

    async def _begin(self, send: Send) -> None:
        """Start a held stream (the first event came, or the wait for it was long enough).

        The stream's task and its watcher may both ask: the start is sent once, and
        neither goes on before it is out (a body before the status line would break the
        response). A start cut in its send (its task cancelled) is sent by the next.
        """
        while not self._ready:
            starting = self._starting
            if starting is not None:
                await asyncio.shield(starting)
                continue
            self._started = True
            starting = self._starting = asyncio.get_running_loop().create_future()
            try:
                await self._send_start(send)
                self._ready = True
            finally:
                self._starting = None
                starting.set_result(None)

    async def _refuse(self, scope: dict[str, Any], receive: Receive, send: Send, err: Any) -> None:
        """Answer with the dialect's error response instead of a stream."""
        self._started = True
        response = self.refuse(err)  # type: ignore[misc]
        header = scope.get("rid_header")  # see Endpoint: it could not add it to this one
        if header is not None:
            response.raw_headers.append(header)
        with contextlib.suppress(OSError), anyio.CancelScope(shield=True):
            await response(scope, receive, send)

    async def _end(
        self, scope: dict[str, Any], receive: Receive, send: Send, err: StellaError
    ) -> None:
        self._open = False
        if not self._started:
            await self._refuse(scope, receive, send, err)
            return
        body = self.codec.encode(error_event(err))
        # Bounded: to a client that stopped reading (its socket full) these writes would
        # wait for good, a shutdown's cut until the server's own limit, past the drain.
        with (
            contextlib.suppress(OSError),
            anyio.move_on_after(END_WRITE_MAX_S, shield=True) as cut,
        ):
            guard = asyncio.get_running_loop().create_task(
                _cut_when_stalled(scope.get("stella.protocol"), cut)
            )
            try:
                if not self._ready:  # the watcher is sending the start: after it
                    await self._begin(send)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await send(
                    {"type": "http.response.body", "body": self.codec.close(), "more_body": False}
                )
            finally:
                guard.cancel()
        if cut.cancelled_caught:
            await _drop(scope, send, b"")

    async def _watch(
        self, receive: Receive, send: Send, task: asyncio.Task[Any], call: Cancellable
    ) -> None:
        """Notice a disconnect at once; send a ping after each silence."""
        loop = asyncio.get_running_loop()
        interval = self.ping_interval_s
        while True:
            remaining = self._last + interval - loop.time() if self._last else interval
            try:
                async with asyncio.timeout(max(remaining, 0.01)):
                    message = await receive()
            except TimeoutError:
                if not self._started:
                    if self._open:  # no first event for a whole interval: start anyway
                        try:
                            await self._begin(send)
                        except OSError:
                            return
                    continue
                if self._open and self._last and loop.time() - self._last >= interval:
                    self._last = loop.time()
                    # Made when sent: a dialect's ping may carry the time and the model.
                    ping = self.codec.ping()
                    try:
                        await send({"type": "http.response.body", "body": ping, "more_body": True})
                    except OSError:
                        return
                continue
            if message["type"] == "http.disconnect":
                if self._open:
                    call.cancel_reason = "client_closed"
                    task.cancel()
                return


async def _cut_when_stalled(protocol: Any, cut: anyio.CancelScope) -> None:
    """Cancel `cut` once the client has taken nothing of what waits for it for END_WRITE_S
    (without stella's server protocol, which tells, after END_WRITE_S)."""
    transport = getattr(protocol, "transport", None)
    if transport is None:
        await asyncio.sleep(END_WRITE_S)
        cut.cancel()
        return
    step = END_WRITE_S / 4
    waiting = _unsent(transport)
    still = 0.0
    while still < END_WRITE_S:
        await asyncio.sleep(step)
        now = _unsent(transport)
        still = still + step if now >= waiting else 0.0  # taken: a reader, however slow
        waiting = now
    cut.cancel()


def _unsent(transport: Any) -> int:
    """Bytes written to a connection that its client has not taken yet: in the transport's
    buffer, and (on Linux) in the kernel's send queue, where most of a backlog waits."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and _OUTQ is not None:
        with contextlib.suppress(OSError, ValueError):
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
    return size


# SIOCOUTQ (Linux): the unsent bytes of a TCP socket's send queue.
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


async def _drop(scope: dict[str, Any], send: Send, last: bytes) -> None:
    """End a response whose client stopped reading.

    stella's server protocol puts itself in the scope: it aborts the connection, so
    nothing waits on the client again. Elsewhere the error line gets one
    second to go out, and the server closes the connection after the app returns.
    """
    protocol = scope.get("stella.protocol")
    if protocol is not None:
        protocol.drop()
        return
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1):
            await send({"type": "http.response.body", "body": last, "more_body": False})
