"""The native NDJSON stream contract, against a real stella process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

import httpx
import pytest

from tests.live import LiveServer, ndjson, run_stella


def chat(server: LiveServer, model: str, text: str = "hi there", **body: object) -> httpx.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": text}], **body}
    return httpx.post(server.url + "/api/v1/chat", json=payload, timeout=10)


def test_echo_stream_is_start_deltas_done(stella: LiveServer) -> None:
    r = chat(stella, "echo")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    lines = ndjson(r.text)
    assert [e["type"] for e in lines] == ["start", "delta", "delta", "done"]
    assert lines[0]["id"] == r.headers["x-request-id"]
    assert lines[0]["model"] == "echo" and lines[0]["backend"] == "echo"
    assert "".join(e["text"] for e in lines[1:3]) == "hi there"
    done = lines[-1]
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert set(done["timings"]) == {"queue_ms", "ttft_ms", "total_ms", "tokens_per_s"}


def test_every_line_ends_with_newline(stella: LiveServer) -> None:
    r = chat(stella, "echo")
    assert r.text.endswith("\n")
    assert all(line for line in r.text.split("\n")[:-1])


def test_line_separators_in_text_are_escaped(stella: LiveServer) -> None:
    # Readers that split lines as str.splitlines() does would cut a raw one in two.
    text = "a\u2028b c\u2029d e\x85f"
    r = chat(stella, "echo", text)
    for raw in ("\u2028", "\u2029", "\x85"):
        assert raw not in r.text
    assert r.text.splitlines() == r.text.split("\n")[:-1]
    assert "".join(e.get("text", "") for e in ndjson(r.text)) == text


SEPARATED = "a\u2028b c\u2029d e\x85f"
MSGS = [{"role": "user", "content": SEPARATED}]


def _data(text: str) -> list[dict]:
    """The JSON of each SSE `data:` line (stella ends every line with \\n alone)."""
    out = []
    for line in text.split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.split("\n") if line]


# Every streaming dialect: its path, its request, its Accept, and its text from the body.
STREAMS = {
    "native": (
        "/api/v1/chat",
        {"messages": MSGS},
        "",
        lambda t: [e.get("text", "") for e in _lines(t)],
    ),
    "ollama chat": (
        "/api/chat",
        {"messages": MSGS},
        "",
        lambda t: [e.get("message", {}).get("content", "") for e in _lines(t)],
    ),
    "ollama generate": (
        "/api/generate",
        {"prompt": SEPARATED},
        "",
        lambda t: [e.get("response", "") for e in _lines(t)],
    ),
    "openai chat": (
        "/v1/chat/completions",
        {"messages": MSGS, "stream": True},
        "",
        lambda t: [c["delta"].get("content") or "" for e in _data(t) for c in e["choices"]],
    ),
    "openai chat stream": (
        "/v1/chat/stream",
        {"messages": MSGS},
        "",
        lambda t: [c["delta"].get("content") or "" for e in _data(t) for c in e["choices"]],
    ),
    "openai completions": (
        "/v1/completions",
        {"prompt": SEPARATED, "stream": True},
        "",
        lambda t: [c["text"] for e in _data(t) for c in e["choices"]],
    ),
    "anthropic": (
        "/v1/messages",
        {"messages": MSGS, "max_tokens": 50, "stream": True},
        "",
        lambda t: [
            e["delta"].get("text", "") for e in _data(t) if e["type"] == "content_block_delta"
        ],
    ),
    "generate sse": (
        "/api/v1/generate",
        {"prompt": SEPARATED, "stream": True},
        "text/event-stream",
        lambda t: [e.get("response", "") for e in _data(t)],
    ),
}


@pytest.mark.parametrize("dialect", list(STREAMS))
def test_no_stream_dialect_sends_a_raw_line_separator(stella: LiveServer, dialect: str) -> None:
    # U+2028, U+2029 and U+0085 go as JSON escapes on every stream, SSE ones too: readers
    # that split lines as str.splitlines() does would otherwise cut an event in two.
    path, body, accept, texts = STREAMS[dialect]
    headers = {"Accept": accept} if accept else {}
    r = httpx.post(stella.url + path, json={"model": "echo", **body}, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    for raw in ("\u2028", "\u2029", "\x85"):
        assert raw not in r.text, (dialect, raw)
    assert r.text.splitlines() == r.text.split("\n")[:-1]
    assert "".join(texts(r.text)) == SEPARATED, r.text


def test_non_stream_response(stella: LiveServer) -> None:
    r = chat(stella, "echo", stream=False)
    assert r.status_code == 200
    body = r.json()
    assert body["message"] == {"role": "assistant", "content": "hi there"}
    assert body["response"] == "hi there"
    assert body["finish_reason"] == "stop"
    assert body["id"] == r.headers["x-request-id"]
    assert body["usage"]["total_tokens"] == 4


def test_generate_with_system(stella: LiveServer) -> None:
    r = httpx.post(
        stella.url + "/api/v1/generate",
        json={"model": "echo", "prompt": "one two three", "system": "be brief", "stream": False},
    )
    assert r.status_code == 200
    assert r.json()["response"] == "one two three"
    assert r.json()["usage"]["prompt_tokens"] == 5


def test_max_tokens_gives_length(stella: LiveServer) -> None:
    lines = ndjson(chat(stella, "echo", "a b c d e", options={"max_tokens": 2}).text)
    assert [e["type"] for e in lines] == ["start", "delta", "delta", "done"]
    assert lines[-1]["finish_reason"] == "length"


def test_failure_before_first_token_is_in_band_after_retries(stella: LiveServer) -> None:
    r = chat(stella, "echo-fail")
    lines = ndjson(r.text)
    assert r.status_code == 200
    assert [e["type"] for e in lines] == ["start", "error"]
    assert lines[-1]["code"] == "upstream_error" and lines[-1]["retryable"] is True
    ev = stella.wait_event(lambda e: e["request_id"] == lines[0]["id"])
    assert len(ev["attempts"]) == 2  # one retry
    assert ev["status"] == 502 and ev["error_code"] == "upstream_error"


def test_failure_non_stream_is_502(stella: LiveServer) -> None:
    r = chat(stella, "echo-fail", stream=False)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"


def test_fallback_serves_when_primary_fails(stella: LiveServer) -> None:
    r = chat(stella, "echo-fail-fallback", stream=False)
    assert r.status_code == 200
    assert r.json()["response"] == "hi there"
    assert r.json()["backend"] == "echo"
    ev = stella.wait_event(lambda e: e["request_id"] == r.json()["id"])
    assert [a["backend"] for a in ev["attempts"]] == ["failfirst", "echo"]
    assert ev["attempts"][0]["error"] == "upstream_error" and ev["attempts"][1]["error"] is None


def test_failure_after_tokens_keeps_tokens_then_error(stella: LiveServer) -> None:
    lines = ndjson(chat(stella, "echo-fail-after", "one two three four five").text)
    assert [e["type"] for e in lines] == ["start", "delta", "delta", "delta", "error"]
    assert lines[-1]["code"] == "upstream_error"


async def test_a_fault_in_the_dialect_s_encoder_is_stella_s_not_the_backend_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backend answered; writing its delta failed in stella itself. That is a 500
    # internal_error, not retryable, and says nothing of the backend: its circuit (one
    # failure opens it here) and its failure count are untouched, and it serves on.
    from structlog.testing import capture_logs

    from stella.api import native
    from stella.app import create_app
    from stella.protocol import Delta
    from stella.settings import load_settings

    encode = native.NDJSON.encode

    def broken(event: object) -> bytes:
        if type(event) is Delta:
            raise TypeError("a bug in the encoder")
        return encode(event)

    overrides = {
        "models": {"default": "echo"},
        "backends": {"local": {"enabled": False}},
        "breaker": {"failure_threshold": 1},
    }
    app = create_app(load_settings(overrides, environ={}))
    svc = app.state.stella
    events: list[dict] = []
    svc.pipeline.listeners.append(events.append)
    body = {"messages": [{"role": "user", "content": "hi there"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            monkeypatch.setattr(native.NDJSON, "encode", broken)
            with capture_logs() as logged:
                r = await c.post("/api/v1/chat", json=body)
            monkeypatch.undo()
            lines = ndjson(r.text)
            assert [e["type"] for e in lines] == ["start", "error"]
            assert lines[-1] == {
                "type": "error",
                "code": "internal_error",
                "message": "internal error; see the server log",
                "retryable": False,
            }
            errors = [e for e in logged if e["log_level"] == "error"]
            assert [e["event"] for e in errors] == ["stream_failed"]
            # Its traceback, without the message (it may quote the event: log.content off).
            assert "TypeError (message not logged)" in errors[0]["exception"]
            # (The traceback's source lines stay: the raise statement is shown, as written.)
            assert "TypeError: a bug in the encoder" not in repr(errors[0])
            ev = events[-1]
            assert ev["status"] == 500 and ev["error_code"] == "internal_error"
            assert [a["error"] for a in ev["attempts"]] == [None]  # the backend served
            assert svc.router.breaker("echo").state == "closed"
            metrics = (await c.get("/metrics")).text
            assert 'stella_backend_failures_total{backend="echo"' not in metrics
            r = await c.post("/api/v1/chat", json=body)
            assert [e["type"] for e in ndjson(r.text)] == ["start", "delta", "delta", "done"]


async def _chat_with(
    monkeypatch: pytest.MonkeyPatch,
    target: object,
    name: str,
    broken: object,
    body: dict[str, Any],
    settings: dict[str, Any] | None = None,
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """One POST /api/v1/chat of `body` to an in-process app on echo, `target.name`
    replaced by `broken` for it alone; the answer, and the log events written meanwhile."""
    from structlog.testing import capture_logs

    from stella.app import create_app
    from stella.settings import load_settings

    overrides = {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}
    app = create_app(load_settings({**overrides, **(settings or {})}, environ={}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            monkeypatch.setattr(target, name, broken)
            with capture_logs() as logged:
                r = await c.post("/api/v1/chat", json=body)
            monkeypatch.undo()
    return r, logged


async def test_a_fault_writing_the_last_line_ends_the_stream_and_keeps_its_message_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Writing the `done` line fails in stella itself (past the pipeline): the stream
    # still gets one terminal line, and without log.content the log has the fault's
    # traceback but not its message, which may quote what was being written.
    from stella.api import native
    from stella.protocol import Done

    encode = native.NDJSON.encode

    def broken(event: object) -> bytes:
        if type(event) is Done:
            raise ValueError("SECRET-PROMPT-WORD")
        return encode(event)

    body = {"messages": [{"role": "user", "content": "hi there"}]}
    r, logged = await _chat_with(monkeypatch, native.NDJSON, "encode", broken, body)
    lines = ndjson(r.text)
    assert [e["type"] for e in lines] == ["start", "delta", "delta", "error"]
    assert lines[-1]["code"] == "internal_error"
    [fault] = [e for e in logged if e["event"] == "stream_failed"]
    assert "ValueError (message not logged)" in fault["exception"]
    assert "ValueError: SECRET-PROMPT-WORD" not in repr(fault) and "exc_info" not in fault


def test_stall_after_start_times_out_in_band(stella: LiveServer) -> None:
    t = time.monotonic()
    lines = ndjson(chat(stella, "echo-stall", "one two three four").text)
    assert time.monotonic() - t < 5
    types = [e["type"] for e in lines if e["type"] != "ping"]
    assert types == ["start", "delta", "delta", "error"]
    assert lines[-1]["code"] == "upstream_timeout"


def test_a_lively_stream_still_ends_at_the_total_limit(stella: LiveServer) -> None:
    # 40 words at 0.05 s each would take 2 s; the route allows 0.4 s in all.
    t = time.monotonic()
    lines = ndjson(chat(stella, "echo-slow-total", " ".join(["w"] * 40)).text)
    assert time.monotonic() - t < 1.5
    deltas = [e for e in lines if e["type"] == "delta"]
    assert 3 <= len(deltas) < 40
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "upstream_timeout"
    assert "total limit of 0.4s" in lines[-1]["message"]


def test_stall_before_first_token_is_504_non_stream(stella: LiveServer) -> None:
    r = chat(stella, "echo-stall-first", stream=False)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"


def test_pings_during_silence(stella: LiveServer) -> None:
    # echo-stall-first is silent for 0.5 s before its timeout; pings come every 0.2 s.
    lines = ndjson(chat(stella, "echo-stall-first").text)
    assert lines[0]["type"] == "start"
    assert lines[-1]["type"] == "error"
    assert sum(e["type"] == "ping" for e in lines) >= 1
    assert [e["type"] for e in lines].count("error") == 1


def test_start_line_arrives_before_first_token(stella: LiveServer) -> None:
    payload = {"model": "echo-stall-first", "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", stella.url + "/api/v1/chat", json=payload, timeout=10) as r:
        t = time.monotonic()
        first = next(r.iter_lines())
        assert json.loads(first)["type"] == "start"
        assert time.monotonic() - t < 0.4  # well before the 0.5 s stall timeout


async def test_disconnect_cancels_and_logs_client_closed(stella: LiveServer) -> None:
    payload = {
        "model": "echo-slow",
        "messages": [{"role": "user", "content": " ".join(["word"] * 200)}],
    }
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", stella.url + "/api/v1/chat", json=payload) as r:
            rid = r.headers["x-request-id"]
            seen = 0
            async for line in r.aiter_lines():
                if json.loads(line)["type"] == "delta":
                    seen += 1
                if seen == 3:
                    break
    ev = await asyncio.to_thread(stella.wait_event, lambda e: e["request_id"] == rid)
    assert ev["finish_reason"] == "client_closed"
    assert ev["status"] == 499
    assert 3 <= ev["completion_tokens"] < 20
    # Cut after its first token, the attempt says why, as one cut before it does.
    assert ev["attempts"][-1]["error"] == "client_closed"
    events = [e for e in stella.events("inference") if e["request_id"] == rid]
    assert len(events) == 1


async def test_non_stream_disconnect_cancels_and_logs_client_closed(stella: LiveServer) -> None:
    """A client that gives up on a slow non-stream answer stops the backend at once."""
    words = 200
    payload = {
        "model": "echo-slow",
        "stream": False,
        "messages": [{"role": "user", "content": " ".join(["word"] * words)}],
    }
    rid = "req-nonstream-gone-1"
    async with httpx.AsyncClient(timeout=0.4) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                stella.url + "/api/v1/chat", json=payload, headers={"X-Request-ID": rid}
            )
    ev = await asyncio.to_thread(stella.wait_event, lambda e: e["request_id"] == rid)
    assert ev["finish_reason"] == "client_closed" and ev["status"] == 499
    assert ev["attempts"][-1]["error"] == "client_closed"
    # Stopped within a tick or two of the client leaving, long before all 200 words.
    assert ev["completion_tokens"] < words / 2
    assert ev["total_ms"] < 1000
    assert len([e for e in stella.events("inference") if e["request_id"] == rid]) == 1
    await asyncio.sleep(0.1)
    assert not [e for e in stella.events() if e.get("request_id") == rid and e["level"] == "error"]


async def test_an_attempt_cut_before_its_first_token_is_recorded(stella: LiveServer) -> None:
    payload = {
        "model": "echo-stall-first",
        "stream": False,
        "messages": [{"role": "user", "content": "x"}],
    }
    rid = "req-attempt-cut-1"
    async with httpx.AsyncClient(timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                stella.url + "/api/v1/chat", json=payload, headers={"X-Request-ID": rid}
            )
    ev = await asyncio.to_thread(stella.wait_event, lambda e: e["request_id"] == rid)
    assert ev["finish_reason"] == "client_closed"
    [attempt] = ev["attempts"]
    assert attempt["error"] == "client_closed" and attempt["ms"] >= 100


async def test_client_gone_while_sending_the_body_is_not_an_error(stella: LiveServer) -> None:
    rid = "req-upload-gone-1"
    _reader, writer = await asyncio.open_connection("127.0.0.1", stella.port)
    writer.write(
        b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-Request-ID: " + rid.encode() + b'\r\nContent-Length: 100\r\n\r\n{"messages":'
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)
    assert not [e for e in stella.events() if e.get("request_id") == rid]


@pytest.mark.parametrize("model", ["echo", "echo-fail", "echo-fail-after", "echo-stall"])
def test_exactly_one_inference_event_with_fields(stella: LiveServer, model: str) -> None:
    r = chat(stella, model, "one two three four five", metadata={"user": "abc"})
    rid = r.headers["x-request-id"]
    time.sleep(0.2)
    stella.wait_event(lambda e: e["request_id"] == rid)
    events = [e for e in stella.events("inference") if e["request_id"] == rid]
    assert len(events) == 1
    ev = events[0]
    for field in (
        "request_id",
        "trace_id",
        "span_id",
        "api",
        "key",
        "model",
        "backend",
        "upstream_model",
        "stream",
        "status",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "queue_ms",
        "ttft_ms",
        "total_ms",
        "tokens_per_s",
        "attempts",
        "error_code",
    ):
        assert field in ev, field
    assert ev["api"] == "native" and ev["key"] == "anonymous" and ev["model"] == model
    assert ev["metadata"] == {"user": "abc"}
    assert "prompt" not in ev and "completion" not in ev  # log.content is off


def test_client_request_id_is_kept(stella: LiveServer) -> None:
    r = httpx.post(
        stella.url + "/api/v1/chat",
        json={"model": "echo", "messages": [{"role": "user", "content": "x"}]},
        headers={"X-Request-ID": "my-trace-123"},
    )
    assert r.headers["x-request-id"] == "my-trace-123"
    assert ndjson(r.text)[0]["id"] == "my-trace-123"
    bad = httpx.get(stella.url + "/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert bad.headers["x-request-id"].startswith("req_")


def stalled_reader(
    server: LiveServer, model: str, request_id: str, stream: bool = True
) -> socket.socket:
    """A chat on `model` from a client with a tiny receive buffer that reads the start
    of the response and then nothing more."""
    body = json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    )
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    s.sendall(
        b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (request_id.encode(), len(body), body.encode())
    )
    s.recv(100)  # the response has begun; from now on nothing is read
    return s


def read_to_the_end(s: socket.socket) -> bytes:
    """What the server sent, until it closed or reset the connection."""
    s.settimeout(5)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(1 << 20):
            got += chunk
    s.close()
    return got


def test_a_client_that_stops_reading_is_let_go_at_the_total_limit() -> None:
    # A big answer, a client with a tiny receive buffer that reads the headers and no
    # more: at the route's total limit the call ends (408 client_too_slow in the log),
    # the backend is stopped and the connection dropped, instead of all held open.
    config = {
        # ~9 MB of answer: more than the socket buffers on both sides take.
        "backends": {"flood": {"kind": "echo", "reply": "wordwordword " * 200000}},
        "models": {"routes": {"flood": {"backend": "flood", "total_timeout_s": 1.0}}},
    }
    with run_stella(config) as server:
        s = stalled_reader(server, "flood", "req-stalled-reader")
        ev = server.wait_event(lambda e: e["request_id"] == "req-stalled-reader", timeout=10)
        assert ev["error_code"] == "client_too_slow" and ev["status"] == 408
        assert ev["total_ms"] < 3000
        read_to_the_end(s)  # what was sent, then the end: the connection is gone
        assert not [line for line in server.lines() if "ERROR" in line]  # nor a server error


def test_clients_that_stop_reading_together_are_each_let_go() -> None:
    # With other requests in flight the server holds a turn's writes to send them as one:
    # held past 64 KiB they still go out, where flow control pauses each stream. Words of
    # a kilobyte fill the kernel's buffers (4 MiB at most) in a few thousand lines, well
    # within the limit on a busy machine (as small words might not: then the limit cuts
    # a backend still producing, a 504).
    config = {
        "backends": {"flood": {"kind": "echo", "reply": ("w" * 999 + " ") * 6000}},
        "models": {"routes": {"flood": {"backend": "flood", "total_timeout_s": 1.5}}},
    }
    with run_stella(config) as server:
        from stella.bench.servers import rss_bytes

        rss = rss_bytes(server.proc.pid)
        sockets = [stalled_reader(server, "flood", f"req-stalled-{i}") for i in range(4)]
        for i in range(4):
            ev = server.wait_event(lambda e, i=i: e["request_id"] == f"req-stalled-{i}", timeout=10)
            assert ev["error_code"] == "client_too_slow" and ev["status"] == 408, ev
        assert rss_bytes(server.proc.pid) - rss < 40_000_000  # not each whole answer held in memory
        for s in sockets:
            s.close()


def test_a_client_that_stops_reading_before_the_last_line_is_let_go() -> None:
    # One 8 MB token: its write goes to the buffers, the terminal line is what waits.
    config = {
        "backends": {"big": {"kind": "echo", "reply": "w" * 8_000_000}},
        "models": {"routes": {"big": {"backend": "big", "total_timeout_s": 1.0}}},
    }
    with run_stella(config) as server:
        s = stalled_reader(server, "big", "req-stalled-at-the-end")
        time.sleep(2.5)  # past the limit (and its one-second grace for the last lines)
        got = read_to_the_end(s)
        assert not got.endswith(b"0\r\n\r\n")  # dropped, not held until the client read
        assert not [line for line in server.lines() if "ERROR" in line]


def test_a_non_stream_answer_to_a_client_that_stops_reading_is_let_go() -> None:
    # An 8 MB answer made at once: its write, not the call, is what waits on the client.
    # It gets what is left of the route's total limit (at least a second); then the
    # connection is dropped, instead of held (with the answer) until the client reads.
    config = {
        "backends": {"big": {"kind": "echo", "reply": "w" * 8_000_000}},
        "models": {"routes": {"big": {"backend": "big", "total_timeout_s": 1.0}}},
    }
    with run_stella(config) as server:
        t0 = time.monotonic()
        s = stalled_reader(server, "big", "req-stalled-json", stream=False)
        ev = server.wait_event(lambda e: e["request_id"] == "req-stalled-json")
        assert ev["status"] == 200  # the answer was made and logged as such
        dropped = server.wait_event(lambda e: True, name="answer_dropped")
        assert dropped["request_id"] == "req-stalled-json", dropped
        assert dropped["reason"] == "client_too_slow" and dropped["level"] == "warning"
        assert time.monotonic() - t0 < 5
        # Reset: what the kernel held of it is discarded, not sent on for minutes.
        s.settimeout(5)
        got, reset = 0, False
        try:
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            reset = True
        s.close()
        assert reset and got < 8_000_000, got
        assert not [line for line in server.lines() if "ERROR" in line]


@pytest.mark.parametrize("content", [False, True])
async def test_a_bug_in_a_route_is_a_500_whose_log_keeps_the_message_out(
    monkeypatch: pytest.MonkeyPatch, content: bool
) -> None:
    # A route's own fault (past the pipeline, before the answer) is stella's 500 in the
    # dialect's shape; its log line has the traceback, and the exception's message
    # (it may quote the request) only with log.content.
    from stella.api import native

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("SECRET-PROMPT-WORD")

    body = {"messages": [{"role": "user", "content": "hi there"}], "stream": False}
    settings = {"log": {"content": content}}
    r, logged = await _chat_with(monkeypatch, native, "JSONResponse", broken, body, settings)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "SECRET" not in r.text
    [fault] = [e for e in logged if e["event"] == "request_failed"]
    assert fault["path"] == "/api/v1/chat"
    if content:
        assert isinstance(fault["exc_info"], ValueError)
    else:
        assert "ValueError (message not logged)" in fault["exception"]
        assert "ValueError: SECRET-PROMPT-WORD" not in repr(fault) and "exc_info" not in fault
