"""uvicorn's httptools protocol, with each connection's writes sent once per loop turn.

uvicorn writes a response's status line and headers in one `send()` and its body
in another. On a small JSON answer those two system calls (and the two wake-ups
of the client they cause) cost more than the answer itself. Under load, corking
the socket for the rest of the current event-loop turn sends both as one
segment, and the turn's sends go out together after its work; a streamed answer
still goes out as each event is produced, since every event is a turn of its
own (events produced in the same turn share a write).

With a single request in flight there is nothing to gain and a little to lose:
the early header segment wakes the client while the body is still being
written, so a lone request writes straight through, as uvicorn does.

Either way (`BodyDeadlineProtocol` is the same without the corking: its
CorkedTransport writes straight through) a connection
must send a request's first byte within HEADER_TIMEOUT_S of opening, a request's
headers must be complete one to two HEADER_TIMEOUT_S after its first byte (one
timer per connection looks every HEADER_TIMEOUT_S: nothing to do per request),
and its body must keep arriving: BODY_TIMEOUT_S after its headers, plus a second for
every BODY_MIN_RATE bytes of it received (Apache's mod_reqtimeout rule), or the connection
is closed (the app's read of a body cut so fails as 408 client_too_slow, not as a
client that left): uvicorn itself never gives up on a client that connects and sends
nothing, or part of its headers, or headers and then stalls (a slowloris), which
holds a connection, and for a body a task, for as long as it likes.

A request the parser cannot read (smuggling shapes such as Content-Length with
Transfer-Encoding, a broken chunk size, an unknown method), without exactly one Host
header (RFC 9112 3.2; an HTTP/1.0 one may have none), or in HTTP/1.0 with a
Transfer-Encoding (RFC 9112 6.1: faulty framing) is answered 400 invalid_request in
stella's JSON error shape, with an X-Request-ID (as a 431 for headers past the limits
is), and the connection closes: uvicorn's 400 was plain text without one, a request
without a Host, or with two, was served, and an HTTP/1.0 body was read as chunked. A chunked body's trailer fields are
header fields, held to the same size limit (431, or the connection closed when the answer
went out first): httptools copies a field whole for each piece of it read, so a trailer
field without end stalled the event loop (for ~25 s at 40 MiB).

A connection closed after an answer while its request's body is still unread (a 413
with `Connection: close`, a 400 or 431) closes lingering: closing a socket with
unread input makes the kernel reset it, and the client's kernel then drops the
answer it holds unread. The write side is shut after the answer, and what still
comes is read and dropped until the client closes, for at most LINGER_S and
LINGER_BYTES (at once during a shutdown).
A body still coming after its request was answered (a 401 before a chunked body, whose
size is not announced) is read and dropped up to LINGER_BYTES, the connection kept;
past that the connection closes, lingering. An answer to an `Expect: 100-continue`
request made before its body was asked for (no 100 Continue sent) says `connection:
close` and closes so: the client may hold the body back for good, and uvicorn kept the
connection, waiting for it, or reading it where the next request should be.

An answer whose write waits (its client takes too little of it to drain the
transport's buffer, uvicorn's flow control) waits at most SEND_TIMEOUT_S, a
non-stream inference answer what is left of its route's total limit (at least
SEND_MIN_S), and then the connection is aborted: uvicorn waits for good, so a
client that stopped reading held its connection and the answer's bytes. One timer,
armed only when a write waits (`pause_writing`); a stream, while it runs, bounds
its own writes (streaming.py) and arms none.

A pipelining client's connection is read only while at most PIPELINE_MAX of its
requests wait their turn, and a large read is parsed PARSE_STEP bytes at a time, the
rest held unparsed until they drain: uvicorn reads again after every answer and
parses all it reads, so a client that pipelined and never read its answers had the
server queue all it sent (hundreds of MB).

`stella serve` uses this protocol; plain uvicorn gets it with
`--http stella.transport:HttpToolsProtocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import sys
import time
from collections.abc import Sized
from typing import Any, cast

import httptools
import msgspec
import structlog
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol

from stella.calls import new_request_id

# A write this large goes out at once: joining it to what is held would only copy it.
# No more than the transports' high-water mark (64 KiB in asyncio and uvloop): what is
# held then never pauses a client whose buffer was empty (see on_response_complete).
WRITE_THROUGH = 65_536
# Seconds a request body may take to arrive after its headers, plus one second for every
# BODY_MIN_RATE bytes that arrive (Apache mod_reqtimeout's `body=20,MinRate=500`, stricter):
# a client sending at least that fast is never cut, however large its body (up to
# server.max_body_bytes: 8 MiB takes at most ~17 min), and one trickling a few bytes at a
# time (a slowloris) is cut after about BODY_TIMEOUT_S. A fixed 30 s cut an 8 MiB body
# slower than ~280 KB/s, a slow uplink's whole long conversation.
BODY_TIMEOUT_S = 30.0
BODY_MIN_RATE = 8192
# A request's line and headers together may be this large, in at most MAX_HEADERS
# headers: past either it is answered 431 and the connection closed (uvicorn's
# httptools parser keeps whatever it is sent until the headers end).
MAX_HEADER_BYTES = 65_536
MAX_HEADERS = 256
# How often a connection is looked at for a request whose headers do not come: a
# first byte is due this long after the connection opened, complete headers within
# two such looks of their first byte (an idle kept-alive connection is left to
# uvicorn's keep-alive timeout).
HEADER_TIMEOUT_S = 10.0
# After an answer that ends a connection whose request's body was not all read, what
# still comes is read and dropped for at most this long and this much, then the
# connection closes (see BodyDeadlineProtocol._linger).
LINGER_S = 2.0
LINGER_BYTES = 8 * 1024 * 1024
# A connection with more than this many pipelined requests waiting for their turn is not
# read from until they drain to it: uvicorn reads again after every answer, so a client
# that pipelined and never read had the server parse and queue all it sent (hundreds of
# MB). A few more than one: the next read of a pipelining client is parsed while the
# last of its previous one are answered, and what waits is a few KB a request.
PIPELINE_MAX = 16
# A read larger than this is parsed this much at a time, and the rest held unparsed
# while PIPELINE_MAX requests wait: one read (up to 256 KiB) of small pipelined requests
# is thousands of them. A small request is parsed in one piece, as before.
PARSE_STEP = 16_384
# An answer's write may wait this long for its client to take some of it (nginx's
# send_timeout): past it the client is taken to have stopped reading, and the connection
# is aborted. A non-stream inference answer waits what is left of its route's total
# limit instead, at least SEND_MIN_S (the answer set `send_by`).
SEND_TIMEOUT_S = 60.0
SEND_MIN_S = 1.0
# `send_by` while a stream runs: its writes are bounded by the stream itself (a client
# that stops reading ends as 408 client_too_slow), not by a timer here.
SELF_BOUNDED = math.inf

_log = structlog.get_logger("stella")
# SO_LINGER on, for 0 s: closing the socket resets the connection, dropping what it holds.
_RESET = struct.pack("ii", 1, 0)


def _not_a_client_fault(record: logging.LogRecord) -> bool:
    """False for uvicorn's warning of a request its parser could not read: a client's
    fault this protocol answers itself (a JSON 400), which any client could repeat to
    flood the server's stderr; uvicorn's other records pass."""
    return record.msg != "Invalid HTTP request received."


logging.getLogger("uvicorn.error").addFilter(_not_a_client_fault)


class _PipelineFlow(FlowControl):
    """uvicorn's flow control for one connection, which reads again only while few
    pipelined requests wait, and parses what it held back before reading more."""

    def __init__(self, transport: asyncio.Transport, protocol: BodyDeadlineProtocol) -> None:
        super().__init__(transport)
        self._protocol = protocol

    def resume_reading(self) -> None:
        """Read again, unless more than PIPELINE_MAX requests already wait their turn."""
        if self.read_paused:
            protocol = self._protocol
            pipeline = protocol.pipeline
            if len(pipeline) > PIPELINE_MAX or (
                pipeline and len(protocol.cycle.body) > HIGH_WATER_LIMIT
            ):
                # Or the last request's body, waiting its turn, is past uvicorn's own
                # limit for an unread body: it is read on once that request runs.
                return
            if protocol._held:
                protocol._parse_held_soon()  # the held input first; reading after it
                return
            self.read_paused = False
            self._transport.resume_reading()


class CorkedTransport:
    """A transport that, while other requests are in flight, holds writes until the end of
    the loop turn and then sends them as one; a lone request's writes go straight out."""

    __slots__ = (
        "_buf",
        "_held",
        "_loop",
        "_tasks",
        "_transport",
        "can_write_eof",
        "get_extra_info",
        "get_protocol",
        "is_closing",
        "is_reading",
        "pause_reading",
        "resume_reading",
        "set_protocol",
        "set_write_buffer_limits",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        in_flight: Sized = (),
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._tasks = in_flight  # the server's running requests: cork only when not alone
        self._buf: list[bytes] | None = None
        self._held = 0  # bytes in _buf
        # Bound once: uvicorn calls these per request, and a __getattr__ hop costs more.
        self.can_write_eof = transport.can_write_eof
        self.get_extra_info = transport.get_extra_info
        self.get_protocol = transport.get_protocol
        self.is_closing = transport.is_closing
        self.is_reading = transport.is_reading
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.set_protocol = transport.set_protocol
        self.set_write_buffer_limits = transport.set_write_buffer_limits

    def write(self, data: bytes) -> None:
        """Queue `data`; the first write of a turn schedules the flush at its end."""
        if not data:
            return
        buf = self._buf
        if len(data) >= WRITE_THROUGH:
            if buf is not None:
                self.flush()
            if not self._transport.is_closing():
                self._transport.write(data)
        elif buf is None:
            if len(self._tasks) < 2:
                # Alone: nothing to batch with. A connection that closed under a cycle
                # still running (a pipelining client that left) takes nothing.
                if not self._transport.is_closing():
                    self._transport.write(data)
                return
            self._buf = [data]
            self._held = len(data)
            self._loop.call_soon(self.flush)
        else:
            buf.append(data)
            self._held += len(data)
            if self._held >= WRITE_THROUGH:
                # Held past the limit (a backend producing without pause): out now, where
                # the transport's flow control sees it and pauses a client not reading.
                self.flush()

    def writelines(self, chunks: Any) -> None:
        """Queue each chunk."""
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what is held, as one write."""
        buf = self._buf
        if buf is None:
            return
        self._buf = None
        if self._transport.is_closing():
            return  # the client left: nobody to send it to
        self._transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def behind(self) -> bool:
        """Whether bytes are held here while the transport's own buffer still has some:
        their flush may pause the protocol (an empty buffer takes up to WRITE_THROUGH)."""
        return self._buf is not None and self._transport.get_write_buffer_size() > 0

    def get_write_buffer_size(self) -> int:
        """Bytes not yet sent: held here plus the transport's own buffer."""
        held = self._held if self._buf else 0
        return held + self._transport.get_write_buffer_size()

    def write_eof(self) -> None:
        """Send what is held, then half-close."""
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        """Send what is held, then close; what the client still has not taken
        SEND_TIMEOUT_S later is dropped with the connection."""
        self.flush()
        transport = self._transport
        transport.close()
        if transport.get_write_buffer_size():
            # asyncio keeps a closing connection until its buffer drains, for good if the
            # client stopped reading (a keep-alive's end, a `connection: close` answer).
            self._loop.call_later(SEND_TIMEOUT_S, transport.abort)

    def abort(self) -> None:
        """Drop what is held and close at once."""
        self._buf = None
        self._transport.abort()


class _BodyStillComing:
    """A request cycle's transport while its body is still coming: closing it after a
    whole answer closes lingering."""

    __slots__ = ("_cycle", "_protocol", "is_closing", "write")

    def __init__(self, protocol: BodyDeadlineProtocol, cycle: Any) -> None:
        self._protocol = protocol
        self._cycle = cycle
        transport = cycle.transport
        self.write = transport.write
        self.is_closing = transport.is_closing

    def close(self) -> None:
        """Close lingering if the answer is whole and the body still unread, else close."""
        cycle = self._cycle
        if cycle.response_complete and cycle.more_body and cycle is self._protocol.cycle:
            self._protocol._linger()
        else:
            self._protocol.transport.close()


def unknown_codings(codings: bytes) -> str:
    """The transfer codings of a Transfer-Encoding list, other than its final chunked,
    as a client would read them ("" when there are none, or when chunked is not last:
    the parser refuses that framing itself, 400 as RFC 9112 6.3 has it)."""
    names = [c.split(b";", 1)[0].strip().lower() for c in codings.split(b",")]
    names = [n for n in names if n]
    if not names or names[-1] != b"chunked":
        return ""
    other = dict.fromkeys(n for n in names[:-1] if n != b"chunked")
    shown = ", ".join(repr(n.decode("latin-1")) for n in other)
    return shown if len(shown) <= 200 else shown[:200] + "…"


def _close_if_answered_first(cycle: Any) -> None:
    """Have a request cycle end its connection if it answers before it asks for the body
    its client holds back (`Expect: 100-continue`): a 401, a 404 before the body."""
    send = cycle.send

    async def send_closing(message: Any) -> None:
        if cycle.waiting_for_100_continue and cycle.more_body:
            # No 100 Continue went out: the client may never send the body (the server
            # waited for it), or send it anyway, where the next request is expected. RFC
            # 9110 10.1.1 asks the answer to say which: it closes (`connection: close`),
            # lingering, as an early 413 does.
            cycle.keep_alive = False
        await send(message)

    cycle.send = send_closing


class _AnsweredLast(_BodyStillComing):
    """The transport of a request that asked to upgrade, the last of its connection:
    closing it after a whole answer closes lingering (what followed it is not read)."""

    __slots__ = ()

    def close(self) -> None:
        """Close lingering if the answer is whole, else close."""
        if self._cycle.response_complete:
            self._protocol._linger()
        else:
            self._protocol.transport.close()


class _Upgraded:
    """The parser of a connection after a request that asked to upgrade: no request
    follows it, and what comes is dropped unread, up to LINGER_BYTES (past that the
    connection ends, lingering)."""

    __slots__ = ("_dropped", "_protocol")

    def __init__(self, protocol: BodyDeadlineProtocol) -> None:
        self._protocol = protocol
        self._dropped = 0

    def feed_data(self, data: bytes) -> None:
        """Drop `data`; past LINGER_BYTES, end the connection."""
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self._protocol._linger()

    def should_upgrade(self) -> bool:
        """True: the connection asked to upgrade (no more requests are parsed)."""
        return True


class BodyDeadlineProtocol(_HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers or body
    stall."""

    _body_timer: asyncio.TimerHandle | None = None
    _body_from = 0.0  # loop time the current body's deadline started
    _body_due = 0.0  # and when it falls, moved on by the body's bytes as they come
    _header_timer: asyncio.TimerHandle | None = None
    _parsing: Any = None  # the scope of a request whose headers were incomplete at a look
    _head_bytes = 0  # received while the current request's headers were incomplete
    _read = 0  # the size of the read being parsed
    _ended = False  # whether a request ended in the read being parsed
    _inexact = False  # the count of the current headers may miss one still being read
    _refused = False  # answered 431 (the parser's complaint that may follow is not sent)
    _idle_again = False  # a body answered early came whole: the keep-alive timer is due
    _deferred: bytes | None = None  # an error answer waiting for the running one to end
    _linger_timer: asyncio.TimerHandle | None = None  # set while closing lingering
    _lingered = 0  # bytes dropped while lingering
    _dropped = 0  # bytes of a body read after its request was answered
    _hosts = 0  # Host headers of the request being read
    _framed = False  # it has a Transfer-Encoding header
    _codings = b""  # its values, joined by commas (as one field's list)
    _trailing = False  # its head is read: fields now are a chunked body's trailer
    _chunk_empty = False  # a chunk's size line was read, none of its data: maybe the last
    _trailer_bytes = 0  # read since then (the last chunk's trailer, counted to the limit)
    _shutting = False  # the server is shutting down: no lingering
    _held = b""  # input not parsed yet: more than PIPELINE_MAX pipelined requests wait
    _held_soon = False  # its parsing is scheduled
    _parsed: bytes = b""  # the read being parsed (an upgrade request's body is in it)
    _steps = b""  # a large read being parsed PARSE_STEP bytes at a time (_parsed: a piece)
    _step_at = 0  # where in it the piece being parsed starts
    # When the answer being written must be out by (time.perf_counter()), set by the app
    # (see pause_writing): None for SEND_TIMEOUT_S, SELF_BOUNDED for a running stream.
    send_by: float | None = None
    send_rid = ""  # its request ID, for the log line if it is dropped
    _send_timer: asyncio.TimerHandle | None = None  # set while a write waits

    # Whether writes are held to the end of the loop turn while other requests are in
    # flight (HttpToolsProtocol); either way the connection's transport is a
    # CorkedTransport, whose flush and close the write limits rely on.
    coalesce = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Accept as uvicorn does; from now on, a look every HEADER_TIMEOUT_S."""
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        corked = CorkedTransport(
            cast(asyncio.Transport, transport), self.loop, self.tasks if self.coalesce else ()
        )
        super().connection_made(cast(asyncio.Transport, corked))
        # Before any request: each request's cycle takes the connection's flow control.
        self.flow = _PipelineFlow(self.transport, self)
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._look)

    def _head_size(self) -> int:
        """The bytes of the current request's line and headers the parser has kept."""
        return len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)

    def _refuse_head(self, why: str) -> None:
        """Answer 431 and close: the request's line and headers are past the limits."""
        self._refuse(b"431 Request Header Fields Too Large", "headers_too_large", why)

    def _refuse(self, status: bytes, code: str, why: str) -> None:
        """Answer an error in stella's JSON shape and close: the request cannot be read
        (or must not be served), so the connection's framing is not to be trusted."""
        if self._refused:
            return
        self._refused = True  # the broken parser's later complaints are not sent
        rid = new_request_id()  # the client's own may be among what was not read
        # stella's error object: JSON that the OpenAI and Anthropic clients read too (the
        # dialect is not known: the path may be among what was not read).
        body = msgspec.json.encode(
            {"error": {"code": code, "message": why, "request_id": rid, "retryable": False}}
        )
        # uvicorn's own headers, as on every other answer: the Date it keeps once a second
        # (RFC 9110 6.6.1: an origin server with a clock sends one), a Server if configured.
        default = b"".join(b"%s: %s\r\n" % pair for pair in self.server_state.default_headers)
        self._last_word(
            b"HTTP/1.1 %s\r\n%scontent-type: application/json\r\nx-request-id: %s\r\n"
            b"x-should-retry: false\r\n"  # as every error says (the same bytes fail again)
            b"x-content-type-options: nosniff\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, default, rid.encode(), len(body), body)
        )

    def _unsupported_upgrade_warning(self) -> None:
        """Serve a request that asks to upgrade (WebSocket, `curl --http2`'s h2c) as plain
        HTTP/1.1: the parser stopped at its headers, so its body is taken from the read
        here, and the connection ends with its answer, lingering (what follows is dropped)."""
        # Called in uvicorn's handler of the parser's HttpParserUpgrade (its argument: where
        # the request's headers ended in the read); uvicorn's own warnings would only
        # tell of a WebSocket library to install.
        cycle = self.cycle
        exc = sys.exc_info()[1]
        # ASGI lets a server add its own keys to the scope; uvicorn's type names only the
        # spec's.
        scope = cast(dict[str, Any], cycle.scope) if cycle is not None else None
        if cycle is None or scope is None:
            return
        cycle.keep_alive = False
        # No request follows this one: what comes after it is dropped, not parsed (the
        # parser, stopped, would refuse it, answering twice), and the connection closes
        # lingering (a close with it unread resets the connection, and the client's
        # kernel drops the answer).
        self.parser = cast(httptools.HttpRequestParser, _Upgraded(self))
        # Alike, not a subclass: the cycle only writes to, asks and closes it.
        cycle.transport = cast(asyncio.Transport, _AnsweredLast(self, cycle))
        length = 0
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.strip().isdigit() else -1
            elif name == b"transfer-encoding":
                length = -1
        if not length:
            return
        at = exc.args[0] if exc is not None and exc.args else len(self._parsed)
        # The whole read, not the PARSE_STEP piece of it the parser was given.
        read = self._parsed
        if self._steps:
            read, at = self._steps, self._step_at + at
        body = read[at : at + length] if length > 0 else b""
        if length > 0 and len(body) == length and not cycle.response_complete:
            cycle.body += body  # before the app's first read: the parser said "no body"
        else:  # a chunked body, or one still to come: the app says it cannot be read
            scope["stella.body_unread"] = True

    def send_400_response(self, msg: str) -> None:
        """A request the parser cannot read: 400 invalid_request, in stella's JSON shape,
        naming the parser's reason (uvicorn's is plain text with no request ID)."""
        # Called from uvicorn's handler of the parser's error: the reason is that error's
        # (llhttp's own words, none of the client's bytes).
        exc = sys.exc_info()[1]
        if isinstance(exc, httptools.HttpParserCallbackError):
            cause = exc.__context__
            reason = (
                "the request target is not ASCII"
                if isinstance(cause, UnicodeError)
                else "the request could not be read"
            )
        else:
            reason = str(exc).rstrip(".") if exc is not None else ""
        why = f"malformed HTTP request: {reason}" if reason else "malformed HTTP request"
        self._refuse(b"400 Bad Request", "invalid_request", why)

    def _last_word(self, answer: bytes) -> None:
        """Send an error answer for the request being read, then close; after the answers
        still due to the requests before it (pipelined), which it would land inside."""
        cycle = self.cycle
        if cycle is not None and cycle.more_body:
            # The error is in this request's body: the one being answered (answered now),
            # or one queued behind others, which will never start.
            queued = [item for item in self.pipeline if item[0] is cycle]
            for item in queued:
                self.pipeline.remove(item)
            busy = bool(queued)
        else:
            busy = bool(self.pipeline) or (cycle is not None and not cycle.response_complete)
        if busy:
            self._deferred = answer
            self.transport.pause_reading()  # nothing more is read: the parser is done
            return
        self.transport.write(answer)
        self._linger()

    def _linger(self) -> None:
        """Close after the answer written, without a reset: shut the write side, then read
        and drop what the client still sends until it closes, for at most LINGER_S and
        LINGER_BYTES (a close with input unread resets the connection, and the client's
        kernel drops the answer the client has not read yet)."""
        transport = self.transport
        if self._linger_timer is not None or transport.is_closing():
            return
        if self._shutting or not transport.can_write_eof():
            transport.close()
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A request whose body broke off is never answered: its app hears it now.
            cycle.disconnected = True
            cycle.message_event.set()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._unset_keepalive_if_required()
        self._held = b""  # requests behind this answer are never served
        self._linger_timer = self.loop.call_later(LINGER_S, transport.close)
        transport.write_eof()  # after the answer: the client reads it, then sees the end
        self.flow.read_paused = False
        transport.resume_reading()

    def on_message_begin(self) -> None:
        """Begin a request as uvicorn does, reading its head."""
        self._trailing = False
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep a header as uvicorn does, counting Host headers and noting Transfer-Encoding
        (uvicorn's own method, which this replaces, so that a header costs two comparisons
        more, not a call)."""
        if self._trailing:
            # A chunked body's trailer fields come here too: uvicorn added them to the
            # request's headers (a `Host` trailer made the request look sent from
            # elsewhere, and was counted into the next request's Host headers). A
            # trailer may not carry such fields (RFC 9110 6.5.1): none is kept.
            return
        name = name.lower()
        if name == b"host":
            self._hosts += 1
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        elif name == b"transfer-encoding":
            self._framed = True
            self._codings = self._codings + b"," + value if self._codings else value
        self.headers.append((name, value))

    def on_chunk_header(self) -> None:
        """A chunk's size line is read: if no data follows, it is the last chunk (size 0),
        and what comes until the body ends is its trailer, counted from the next read."""
        # httptools tells neither the size nor where in the read the line ended: the
        # read it is in is left out of the count (up to PARSE_STEP more may pass).
        self._chunk_empty = True
        self._trailer_bytes = -self._read

    def on_body(self, body: bytes) -> None:
        """Keep a body's bytes as uvicorn does (its own method, which this replaces, so
        that a body costs one store more, not a call): the chunk they are in is no
        trailer."""
        self._chunk_empty = False
        self._body_due += len(body) / BODY_MIN_RATE  # read only while a deadline runs
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return  # answered already (or upgrading): dropped
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def _refuse_trailer(self) -> None:
        """A chunked body's trailer past the head's limit: 431 if nothing was answered yet,
        else the connection ends (lingering)."""
        # httptools builds each field by appending to it, copying it whole each time: a
        # trailer field without end, read PARSE_STEP bytes at a time, stalled the loop for
        # ~25 s at 40 MiB. Trailer fields are header fields (RFC 9112 7.1.2): the same limit.
        self._chunk_empty = False
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self._refused = True  # nothing more is parsed: the answer is out
            self._linger()
            return
        self._refuse_head(f"request trailer fields over {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:
        """Start the request as uvicorn does, its scope carrying a way to drop the client."""
        # The limits, once per request: the size is summed only when this read, with what
        # came before it, could hold that much.
        if len(self.headers) > MAX_HEADERS:
            self._refuse_head(f"more than {MAX_HEADERS} request headers")
        elif (self._inexact or self._head_bytes + self._read > MAX_HEADER_BYTES) and (
            self._head_size() > MAX_HEADER_BYTES
        ):
            self._refuse_head(f"request line and headers over {MAX_HEADER_BYTES} bytes")
        elif self._hosts != 1 and (self._hosts or self.parser.get_http_version() == "1.1"):
            # RFC 9112 3.2: an HTTP/1.1 request names its host once; any request names it
            # at most once (two may be read differently by a proxy in front).
            self._refuse(
                b"400 Bad Request",
                "invalid_request",
                "an HTTP/1.1 request needs one Host header"
                if self._hosts == 0
                else "more than one Host header",
            )
        elif self._framed and self.parser.get_http_version() != "1.1":
            # RFC 9112 6.1: HTTP/1.0 has no Transfer-Encoding, so its framing is faulty (a
            # proxy in front that speaks 1.0 reads the body by its end, or its length, and
            # the chunks llhttp reads could hide a request of their own).
            self._refuse(
                b"400 Bad Request",
                "invalid_request",
                "Transfer-Encoding in an HTTP/1.0 request (send HTTP/1.1, or a Content-Length)",
            )
        elif self._framed and (unknown := unknown_codings(self._codings)):
            # RFC 9112 6.1: a transfer coding the server does not understand is a 501 (llhttp
            # undoes the chunks alone: a gzip under them reached the app, "malformed" JSON).
            self._refuse(
                b"501 Not Implemented",
                "not_implemented",
                f"transfer coding {unknown} is not supported: send the body chunked alone, "
                "or with a Content-Length",
            )
        self._hosts = 0
        self._framed = False
        self._codings = b""
        self._trailing = True
        self._inexact = False
        if self._refused:
            raise ValueError("refused")  # stops the parser: this request never starts
        # For a stream whose client stopped reading (see `drop`). ASGI lets a server add
        # its own keys to the scope; uvicorn's HTTPScope TypedDict lists only the spec's.
        self.scope["stella.protocol"] = self  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()
        if self.expect_100_continue:
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope:
                _close_if_answered_first(cycle)

    def _parse_steps(self, data: bytes) -> None:
        """Parse `data` PARSE_STEP bytes at a time (each a read of its own); what is left
        once more than PIPELINE_MAX requests wait is held, with reading paused, until
        they drain."""
        self._held = b""
        start, end = 0, len(data)
        self._steps = data  # an upgrade request's body is taken from it whole
        try:
            while start < end:
                if len(self.pipeline) > PIPELINE_MAX and self._linger_timer is None:
                    self._held = data[start:]
                    self.flow.pause_reading()
                    return
                self._step_at = start
                self.data_received(data[start : start + PARSE_STEP])
                start += PARSE_STEP
                if self._refused or self.transport.is_closing() or self.parser.should_upgrade():
                    return  # the parser is done with this connection: the rest is not read
        finally:
            self._steps = b""

    def _parse_held_soon(self) -> None:
        """Parse the held input in a loop turn of its own (not inside the answer that let
        it in, which starts the next pipelined request after this returns)."""
        if not self._held_soon:
            self._held_soon = True
            self.loop.call_soon(self._parse_held)

    def _parse_held(self) -> None:
        self._held_soon = False
        if not self._held or self.transport.is_closing():
            return
        self._parse_steps(self._held)
        if not self._held:
            self.flow.resume_reading()  # all parsed and few wait: read on

    def _look(self) -> None:
        """Close a connection that sent nothing, or whose request's headers stalled."""
        self._header_timer = None
        if self.transport.is_closing() or self._deferred is not None:
            return  # an error answer waits for the answers before it: their limits hold
        if self._linger_timer is not None:
            return  # closing lingering: its own timer ends it
        # uvicorn makes a request's scope at its first byte and its cycle once the
        # headers are complete: a scope that no cycle has is a request still in its
        # headers, and the same one as at the last look has stalled a whole period.
        scope, cycle = self.scope, self.cycle
        in_headers = scope is not None and (cycle is None or cycle.scope is not scope)
        if self.pipeline:
            # Not read while pipelined requests wait: headers cut short at the end of what
            # was read are not the client's stall.
            in_headers = False
        if scope is None or (in_headers and scope is self._parsing):
            self.transport.close()
            return
        self._parsing = scope if in_headers else None
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._look)

    def drop(self) -> None:
        """Abort the connection at once, with a reset: the running response is over,
        nothing waits on it, and what the kernel still holds of it is discarded."""
        cycle = self.cycle
        if cycle is not None:
            cycle.disconnected = True  # known now, not a loop turn later (no server error)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # A plain close leaves the unsent bytes (megabytes, for a client that stopped
                # reading) to the kernel, which keeps trying to send them for minutes.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does; a running request's body still incomplete gets a deadline,
        headers past the limits are refused, and a large read is parsed a step at a time
        while few pipelined requests wait."""
        if self._linger_timer is not None:
            # Answered and closing: dropped unparsed, up to the limit.
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        if self._held or len(data) > PARSE_STEP:
            self._parse_steps(self._held + data if self._held else data)
            return
        if self._body_timer is not None and self.cycle.response_complete:
            # The rest of a body answered before it came (a 401 say), dropped as it
            # comes: up to LINGER_BYTES of it, as a body of a size the connection can
            # be kept for; past that the connection ends, lingering. (A Content-Length
            # over the limit ends it with the answer; a chunked body's size is unknown.)
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self._linger()
                return
        self._read = len(data)
        self._ended = False
        self._parsed = data
        super().data_received(data)
        self._parsed = b""
        if self._chunk_empty:  # in a chunked body's trailer, or before a chunk's data
            self._trailer_bytes += len(data)
            if self._trailer_bytes > MAX_HEADER_BYTES:
                self._refuse_trailer()
                return
        scope, cycle = self.scope, self.cycle
        if scope is not None and (cycle is None or cycle.scope is not scope):
            # Still in a request's headers (see _look), kept by the parser: counted. A
            # read in which no other request ended was all this request's headers; after
            # one that ended in it (a body, then the next request), what the parser has
            # kept of them so far is counted.
            if self._ended:
                self._head_bytes = self._head_size()
                self._inexact = True  # a header still being read is not in it yet
            else:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._refuse_head(f"request line and headers over {MAX_HEADER_BYTES} bytes")
                return
            if len(self.headers) > MAX_HEADERS:
                self._refuse_head(f"more than {MAX_HEADERS} request headers")
                return
        elif self._head_bytes:
            self._head_bytes = 0
        if self._idle_again:
            self._idle_again = False
            # Idle again, unless another request began in the same read: its keep-alive
            # timer back, as uvicorn arms it after an answer.
            if (
                cycle is not None
                and cycle.scope is scope
                and cycle.response_complete
                and not self.pipeline
                and self.timeout_keep_alive_task is None
                and not self.transport.is_closing()
            ):
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
        # Nearly every body comes with its headers: no timer at all for those. A
        # pipelined request waits with reading paused, so its clock starts with it.
        self._arm()

    def on_message_complete(self) -> None:
        """The body is all there: its deadline goes."""
        self._ended = True
        self._chunk_empty = False  # the last chunk's trailer ended with it
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:
            # The rest of a body answered before it came (a 401, a 413): its bytes
            # cancelled the keep-alive timer on their way (see data_received).
            cycle.more_body = False
            self._idle_again = True

    def on_response_complete(self) -> None:
        """A pipelined request may start now, with its body still to come; or the error
        answer that waited for this one goes out, and the connection ends."""
        by = self.send_by
        if by is not None:
            # What the loop turn holds of this answer goes out now when the client is
            # behind already: the pause it causes is judged by this answer's limit, not by
            # the next one's (or none's). With the client's buffer empty, what a turn holds
            # (under WRITE_THROUGH) cannot pause it; its flush stays where it was, at the
            # turn's end (flushing every answer here cost a quarter of the requests/s at
            # concurrency 64).
            transport = cast(CorkedTransport, self.transport)
            if transport.behind():
                transport.flush()
            # The next answer has its own limit (none: SEND_TIMEOUT_S). A stream's last
            # bytes, if they still wait, get one now: the stream no longer bounds them.
            self.send_by = None
            self.send_rid = ""
            if self.flow.write_paused and self._send_timer is None:
                self._arm_send(None if by == SELF_BOUNDED else by)
        if self._deferred is not None:
            if self.pipeline:  # the next of those before it starts; the error waits
                super().on_response_complete()
                self.transport.pause_reading()
                return
            self.server_state.total_requests += 1
            self.transport.write(self._deferred)
            self._deferred = None
            self._linger()
            return
        if self._linger_timer is not None:  # the answer closed the connection lingering
            self.server_state.total_requests += 1
            return
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        """Start the current request's body deadline, when its body is still to come
        (also after its answer: the connection is held until the rest of it arrives)."""
        cycle = self.cycle
        if self._deferred is not None:
            return  # the request still reading its body is the broken one: never served
        if cycle is not None and cycle.more_body and self._body_timer is None and not self.pipeline:
            now = self.loop.time()
            self._body_from = now
            # What of the body came with the headers counts as any that comes later.
            self._body_due = now + BODY_TIMEOUT_S + len(cycle.body) / BODY_MIN_RATE
            self._body_timer = self.loop.call_at(self._body_due, self._body_late, cycle)
            self._dropped = 0
            if cycle.transport is self.transport:
                # Only a body that spans reads: an answer that closes the connection
                # before the rest of it is read closes lingering (see _linger).
                # Alike, not a subclass: the cycle only writes to, asks and closes it.
                cycle.transport = cast(asyncio.Transport, _BodyStillComing(self, cycle))

    def _body_late(self, cycle: Any) -> None:
        self._body_timer = None
        if cycle is not self.cycle:
            return
        now = self.loop.time()
        if now < self._body_due:  # the body came on meanwhile: its time is later
            self._body_timer = self.loop.call_at(self._body_due, self._body_late, cycle)
            return
        if cycle.more_body and not self.transport.is_closing():
            # The app's receive() sees a disconnect; the client sees the connection close.
            # The mark tells the app it was the server that gave up (408 client_too_slow,
            # not a client that left: stella.api.http.read_body).
            late = round(now - self._body_from, 1)
            cycle.scope["stella.body_late"] = late  # type: ignore[typeddict-unknown-key]
            self.transport.close()

    def pause_writing(self) -> None:
        """The client is behind: the answer's writes wait, as in uvicorn, and for at most
        the answer's limit (see SEND_TIMEOUT_S)."""
        self.flow.pause_writing()
        if self._send_timer is None:
            self._arm_send(self.send_by)

    def resume_writing(self) -> None:
        """The client took enough: the answer's writes go on, as in uvicorn."""
        self.flow.resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _arm_send(self, by: float | None) -> None:
        """Abort the connection if its writes still wait once `by` (or SEND_TIMEOUT_S)
        has passed."""
        if by is None:
            wait = SEND_TIMEOUT_S
        elif by == SELF_BOUNDED:
            return  # a stream cuts a client that stopped reading itself (client_too_slow)
        else:
            wait = max(by - time.perf_counter(), SEND_MIN_S)
        self._send_timer = self.loop.call_later(wait, self._send_late, wait, self.send_rid)

    def _send_late(self, wait: float, rid: str) -> None:
        """The client took nothing for `wait` seconds: it stopped reading."""
        self._send_timer = None
        if not self.flow.write_paused:
            return
        # An answer already logged (a non-stream inference's event says 200) did not
        # reach its client: said once, here.
        fields = {"request_id": rid} if rid else {}
        _log.warning(
            "answer_dropped",
            reason="client_too_slow",
            waited_s=round(wait, 1),
            unsent=self.transport.get_write_buffer_size(),
            **fields,
        )
        self.drop()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadlines with the connection."""
        self._held = b""
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Shut down as uvicorn does; a connection closing lingering closes at once, and
        none starts lingering from now on."""
        self._shutting = True
        if self._linger_timer is not None:
            self.transport.close()
            return
        super().shutdown()


class HttpToolsProtocol(BodyDeadlineProtocol):
    """uvicorn's httptools protocol on a CorkedTransport that holds writes while other
    requests are in flight (with the body deadline)."""

    coalesce = True

    def eof_received(self) -> None:
        """The client half-closed (or left): what is held goes out before the connection
        ends, as uvicorn ends it on end of input (an answer made in this loop turn was
        dropped otherwise, and logged as sent)."""
        cast(CorkedTransport, self.transport).flush()
        super().eof_received()
