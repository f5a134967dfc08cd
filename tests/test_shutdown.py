"""Graceful shutdown of a real `stella serve` process on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import pty
import select
import signal
import socket
import time
import weakref
from typing import Any

import httpx
import pytest

from stella.bench.asgi import post_scope
from tests.live import run_stella

CONFIG = {
    "server": {"drain_timeout_s": 1.5},
    "backends": {"slow": {"kind": "echo", "delay_s": 0.1}},
    "models": {"routes": {"slow": {"backend": "slow"}}},
}


async def stream(url: str, words: int, out: list[dict], started: asyncio.Event) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", url + "/api/v1/chat", json=body) as r:
            async for line in r.aiter_lines():
                out.append(json.loads(line))
                if out[-1]["type"] == "delta":
                    started.set()


async def test_sigterm_drains_then_cuts_with_shutting_down() -> None:
    with run_stella(CONFIG) as server:
        short: list[dict] = []
        long: list[dict] = []
        s1, s2 = asyncio.Event(), asyncio.Event()
        t_short = asyncio.create_task(stream(server.url, 8, short, s1))
        t_long = asyncio.create_task(stream(server.url, 300, long, s2))
        await asyncio.wait_for(asyncio.gather(s1.wait(), s2.wait()), 10)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        # New work is refused while draining: the listener is closed (a request that
        # still reaches the app gets 503: test_draining_refusals_take_the_dialects_shape).
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(timeout=2) as c:
                await c.post(
                    server.url + "/api/v1/chat",
                    json={"model": "echo", "messages": [{"role": "user", "content": "x"}]},
                )
        await asyncio.wait_for(asyncio.gather(t_short, t_long), 15)
        elapsed = time.monotonic() - t0
        code = await asyncio.to_thread(server.proc.wait, 15)
        assert code == 0
        assert short[-1]["type"] == "done" and short[-1]["finish_reason"] == "stop"
        assert long[-1]["type"] == "error" and long[-1]["code"] == "shutting_down"
        assert [e["type"] for e in long].count("error") == 1
        assert not any(e["type"] == "done" for e in long)
        assert 1.3 < elapsed < 6
        events = server.events("inference")
        assert len(events) == 2
        cut = next(e for e in events if e["request_id"] == long[0]["id"])
        assert cut["finish_reason"] == "cancelled" and cut["error_code"] == "shutting_down"
        assert cut["attempts"][-1]["error"] == "shutting_down"  # as one cut before a token
        assert server.events("stopped"), "logs were flushed before exit"


def test_a_client_that_stopped_reading_does_not_hold_the_shutdown() -> None:
    """The drain's cut writes a `shutting_down` line; to a client that reads nothing (its
    socket full) that write waited until uvicorn's own shutdown limit, 5 s past the
    drain, past the grace period the drain is sized for, with a traceback."""
    with run_stella({"server": {"drain_timeout_s": 1}}) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        body = json.dumps(
            {"model": "echo", "messages": [{"role": "user", "content": "a " * 400_000}]}
        ).encode()
        head = b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
        sock.sendall(head % len(body) + body)
        try:
            time.sleep(1)  # the stream is blocked on the full socket: never read
            t0 = time.monotonic()
            code = server.stop(timeout=30)
            took = time.monotonic() - t0
        finally:
            sock.close()
        assert code == 0
        assert took < 4.5, took  # the drain (1 s), then at most ~1 s for the last write
        assert not [line for line in server.lines() if "Exception in ASGI application" in line]
        (cut,) = server.events("inference")
        assert cut["error_code"] == "shutting_down"


def test_a_body_still_coming_at_sigterm_gets_503_and_does_not_hold_the_shutdown() -> None:
    """A request whose body was still arriving waited in read_body past the drain until
    uvicorn's own limit (drain + 5 s, past a runtime's stop timeout) cancelled it: a 500
    and a traceback. The drain waits for it as for a running call (its body may still
    come: see below), then answers it 503 shutting_down."""
    with run_stella({"server": {"drain_timeout_s": 2}}) as server:
        sock = socket.socket()
        sock.connect(("127.0.0.1", server.port))
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
        head = b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
        sock.sendall(head % len(body) + body.encode()[:-5])  # 5 bytes short
        try:
            time.sleep(0.5)
            t0 = time.monotonic()
            code = server.stop(timeout=30)
            took = time.monotonic() - t0
            sock.settimeout(5)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
        finally:
            sock.close()
        assert code == 0
        assert took < 4, took  # the drain (2 s), not the drain + 5 s
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b'"shutting_down"' in answer
        assert not [line for line in server.lines() if "Exception in ASGI application" in line]


def test_a_client_reading_slowly_still_gets_the_shutting_down_line() -> None:
    """A reader behind the stream (a backlog in the socket) still takes what waits for
    it: the drain's cut waits while it takes anything, not a flat second."""
    with run_stella({"server": {"drain_timeout_s": 1}}) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.settimeout(10)
        body = json.dumps(
            {"model": "echo", "messages": [{"role": "user", "content": "a " * 400_000}]}
        ).encode()
        head = b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
        sock.sendall(head % len(body) + body)
        got = bytearray()
        time.sleep(0.5)  # the stream fills the socket
        server.proc.send_signal(signal.SIGTERM)
        cut = time.monotonic() + 1  # the drain's end
        try:
            while True:
                now = time.monotonic()
                if now > cut + 30:
                    raise AssertionError("the stream did not end")
                # Until 1.8 s past the cut a trickle (2 KB every 0.1 s), then all at once.
                chunk = sock.recv(2048 if now < cut + 1.8 else 65536)
                if not chunk:
                    break
                got += chunk
                if cut - 0.5 < now < cut + 1.8:
                    time.sleep(0.1)
        finally:
            sock.close()
        assert server.proc.wait(15) == 0
        assert got.endswith(b"0\r\n\r\n"), bytes(got[-200:])
        assert b'"code":"shutting_down"' in got[-400:], bytes(got[-400:])


async def test_draining_refusals_take_the_dialects_shape() -> None:
    from stella.app import create_app
    from stella.settings import load_settings

    settings = load_settings(
        {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}, environ={}
    )
    app = create_app(settings)
    app.state.stella.drain.draining = True
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        r = await c.post("/v1/messages", json={})
        assert r.status_code == 503 and r.json()["type"] == "error"  # Anthropic
        r = await c.post("/api/chat", json={})
        assert r.status_code == 503 and isinstance(r.json()["error"], str)  # Ollama
        r = await c.post("/v1/chat/completions", json={})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"  # OpenAI
        # /v1/models is both APIs': Anthropic's SDK (anthropic-version) gets its shape.
        r = await c.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        assert r.json()["request_id"] == r.headers["request-id"]
        r = await c.get("/v1/models")
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        r = await c.post("/api/v1/chat", json={}, headers={"X-Request-ID": "req-drain-1"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        # The retry can go elsewhere at once; the ID is in the headers, as on any answer.
        assert r.headers["retry-after"] == "1"
        assert r.headers["x-request-id"] == "req-drain-1"
        assert (await c.get("/health")).status_code == 200  # probes still answer


async def test_draining_refusals_carry_the_cors_headers() -> None:
    # A browser on an allowed origin must be able to read the 503, not see a bare
    # network error: the CORS layer wraps the refusal as it wraps any answer.
    from stella.app import create_app
    from stella.settings import load_settings

    settings = load_settings(
        {
            "cors": {"allowed_origins": ["https://app.example"]},
            "models": {"default": "echo"},
            "backends": {"local": {"enabled": False}},
            "auth": {"allow_anonymous": True},
        },
        environ={},
    )
    app = create_app(settings)
    app.state.stella.drain.draining = True
    origin = {"Origin": "https://app.example"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        r = await c.post(
            "/api/v1/chat",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={**origin, "X-Request-ID": "req-drain-cors"},
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        exposed = r.headers["access-control-expose-headers"].lower()
        assert "retry-after" in exposed and "x-request-id" in exposed
        assert r.headers["x-request-id"] == "req-drain-cors"
        r = await c.post("/v1/chat/completions", json={}, headers=origin)
        assert r.status_code == 503
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        # The preflight is answered, so the browser goes on to the request and its 503.
        r = await c.options(
            "/api/v1/chat", headers={**origin, "Access-Control-Request-Method": "POST"}
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"


async def test_calls_waiting_for_a_slot_end_with_the_drain_or_when_their_client_leaves() -> None:
    # One slot on the backend: calls behind the running one wait in admission. A client
    # that leaves there gives up its place before any backend attempt; at SIGTERM the
    # waiting ones get 503 shutting_down at once (they had not started, and must not
    # start work on a server going away), the running one its in-band error at the
    # drain's end, and the process ends then, not at uvicorn's.
    config = {
        **CONFIG,
        "server": {"drain_timeout_s": 3.0},
        "limits": {"backends": {"slow": 1}, "queue_timeout_s": 30},
    }
    with run_stella(config) as server:
        running: list[dict] = []
        started = asyncio.Event()
        t_running = asyncio.create_task(stream(server.url, 300, running, started))
        await asyncio.wait_for(started.wait(), 10)
        body = {"model": "slow", "messages": [{"role": "user", "content": "a b"}]}
        async with httpx.AsyncClient(timeout=0.5) as c:  # leaves while queued
            try:
                await c.post(server.url + "/api/v1/chat", json={**body, "metadata": {"q": 1}})
            except httpx.TimeoutException:
                pass
        async with httpx.AsyncClient(timeout=30) as c:
            waiting = [
                asyncio.create_task(c.post(server.url + "/api/v1/chat", json=body)),
                asyncio.create_task(
                    c.post(server.url + "/api/v1/chat", json={**body, "stream": False})
                ),
            ]
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(*waiting), 15)
            answered = time.monotonic() - t0
        await asyncio.wait_for(t_running, 15)
        code = await asyncio.to_thread(server.proc.wait, 15)
        took = time.monotonic() - t0
        assert answered < 2.0, answered  # when the drain began, not at its end (3 s)
        assert code == 0 and took < 6, took  # the drain (3 s), not uvicorn's 6 s more
        for r in answers:
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert r.headers["retry-after"] == "1"
        assert running[-1]["type"] == "error" and running[-1]["code"] == "shutting_down"
        lines = "\n".join(server.lines())
        assert "Exception in ASGI application" not in lines and "Traceback" not in lines
        # The client that left: no backend attempt, no inference event; one refusal.
        events = server.events("inference")
        assert not [e for e in events if (e.get("metadata") or {}).get("q") == 1]
        assert len(events) == 1  # the running call only


async def test_a_call_admitted_at_once_during_the_drain_is_served() -> None:
    # Its request began before SIGTERM and its body came after: a free slot is taken
    # without waiting, and the call runs as on a route without limits (only calls that
    # would wait are refused).
    config = {
        "server": {"drain_timeout_s": 3.0},
        "backends": {"echo": {"delay_s": 0.05}},
        "limits": {"backends": {"echo": 5}},
    }
    with run_stella(config) as server:
        body = json.dumps(
            {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "a b c"}]}
        ).encode()
        head = (
            b"POST /api/v1/chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        )
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        for s in socks:
            s.sendall(head + body[:10])
        await asyncio.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        # Past uvicorn's shutdown of each connection (its next 0.1 s tick): the rest of
        # the body comes during the drain, which waits for it.
        await asyncio.sleep(0.5)
        for s in socks:
            s.sendall(body[10:])
        for s in socks:
            s.settimeout(10)
            got = b""
            while b'"done"' not in got and b"finish_reason" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
            s.close()
        assert await asyncio.to_thread(server.proc.wait, 15) == 0


async def test_a_call_that_would_wait_during_the_drain_is_refused_soon() -> None:
    # The slot is taken by a long stream; a request whose body comes after SIGTERM would
    # wait for it: 503 shutting_down soon, not at the drain's end (nor served then).
    config = {
        "server": {"drain_timeout_s": 6.0},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.1}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
        "limits": {"backends": {"slow": 1}},
    }
    with run_stella(config) as server:
        running: list[dict] = []
        started = asyncio.Event()
        holder = asyncio.create_task(stream(server.url, 300, running, started))
        await asyncio.wait_for(started.wait(), 10)
        body = json.dumps(
            {"model": "slow", "stream": False, "messages": [{"role": "user", "content": "a"}]}
        ).encode()
        late = socket.create_connection(("127.0.0.1", server.port))
        late.sendall(
            b"POST /api/v1/chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body[:5])
        )
        await asyncio.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        late.sendall(body[5:])
        late.settimeout(10)
        got = await asyncio.to_thread(late.recv, 65536)
        took = time.monotonic() - t0
        late.close()
        assert got.startswith(b"HTTP/1.1 503 ") and b"shutting_down" in got, got[:300]
        assert took < 3.0, took  # DRAIN_ADMIT_S, not the 6 s drain
        await asyncio.wait_for(holder, 15)
        assert await asyncio.to_thread(server.proc.wait, 15) == 0


async def chat_once(url: str, words: int) -> httpx.Response:
    """One non-stream chat completion on the slow model (OpenAI's dialect)."""
    body = {"model": "slow", "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url + "/v1/chat/completions", json=body)


async def test_a_second_ctrl_c_cuts_the_drain_as_its_timeout_does() -> None:
    """Ctrl-C twice (nothing said while the drain waited): uvicorn forced its exit,
    cancelling the calls: a 500, a stream without its last line, tracebacks, 499s in the
    log. The second signal now cuts the drain, as its timeout would, and the exit follows."""
    with run_stella({**CONFIG, "server": {"drain_timeout_s": 30}}) as server:
        lines: list[dict] = []
        started = asyncio.Event()
        streaming = asyncio.create_task(stream(server.url, 300, lines, started))
        answering = asyncio.create_task(chat_once(server.url, 300))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.5)  # the non-stream call runs as well
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        draining = await asyncio.to_thread(server.wait_event, lambda e: True, 10, "draining")
        await asyncio.sleep(0.7)
        server.proc.send_signal(signal.SIGINT)
        answer = await asyncio.wait_for(answering, 10)
        await asyncio.wait_for(streaming, 10)
        code = await asyncio.to_thread(server.proc.wait, 15)
        took = time.monotonic() - t0
        assert code == 0
        assert took < 5, took  # not the 30 s drain
        assert draining["signal"] == "SIGINT" and draining["calls"] == 2
        assert draining["drain_timeout_s"] == 30
        assert "detail" not in draining  # no terminal to press Ctrl-C at
        (cut,) = server.events("drain_cut")
        assert cut["calls"] == 2 and "request_id" not in cut
        assert lines[-1]["type"] == "error" and lines[-1]["code"] == "shutting_down"
        assert [e["type"] for e in lines].count("error") == 1
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "shutting_down"
        logged = server.lines()
        assert not [ln for ln in logged if "Traceback" in ln or "Exception in ASGI" in ln], logged
        events = server.events("inference")
        assert sorted(e["stream"] for e in events) == [False, True]
        for event in events:
            assert event["status"] == 503 and event["error_code"] == "shutting_down", event
        assert server.events("stopped"), "logs were flushed before exit"


def test_a_ctrl_c_at_a_terminal_says_how_to_end_the_calls_at_once() -> None:
    """The `draining` line tells someone at a terminal that Ctrl-C again ends the calls."""
    main, side = pty.openpty()
    try:
        with run_stella({**CONFIG, "server": {"drain_timeout_s": 30}}, stdout=side) as server:
            os.close(side)
            side = -1
            body = {"model": "slow", "messages": [{"role": "user", "content": "w " * 300}]}
            with httpx.Client(timeout=30) as client:
                with client.stream("POST", server.url + "/api/v1/chat", json=body) as r:
                    lines = r.iter_lines()
                    assert json.loads(next(lines))["type"] == "start"
                    assert json.loads(next(lines))["type"] == "delta"
                    server.proc.send_signal(signal.SIGINT)
                    said = _read_until(main, b'"event":"draining"')
                    server.proc.send_signal(signal.SIGINT)
                    assert json.loads(list(lines)[-1])["code"] == "shutting_down"
            assert server.proc.wait(15) == 0
    finally:
        os.close(main)
        if side >= 0:
            os.close(side)
    (draining,) = [json.loads(ln) for ln in said.splitlines() if b'"draining"' in ln]
    assert draining["calls"] == 1
    assert draining["detail"] == "Ctrl-C again to end the calls now"


def _read_until(fd: int, marker: bytes, timeout: float = 10) -> bytes:
    """What the terminal `fd` shows, read until a line with `marker` has come whole."""
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in got and got.endswith(b"\n"):
            return got
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            got += os.read(fd, 65536)
    raise AssertionError(f"no {marker!r} within {timeout}s: {got[-2000:]!r}")


def test_a_ctrl_c_under_workers_is_not_taken_twice_for_the_supervisor_passing_it_on() -> None:
    """At a terminal a Ctrl-C reaches the supervisor and every worker, and the supervisor
    passes it on as SIGTERM: a worker takes that as the same signal, not as a second one
    cutting its drain; another Ctrl-C later does cut it."""
    config = {**CONFIG, "server": {"drain_timeout_s": 30, "workers": 2}}
    with run_stella(config) as server:
        pids: set[int] = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = {e["pid"] for e in server.events("started")}
            time.sleep(0.05)
        assert len(pids) == 2, server.lines()

        def ctrl_c() -> None:  # as a terminal sends it: to the supervisor and its workers
            for pid in (server.proc.pid, *pids):
                with contextlib.suppress(ProcessLookupError):  # an idle worker has ended
                    os.kill(pid, signal.SIGINT)

        body = {"model": "slow", "messages": [{"role": "user", "content": "w " * 300}]}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", server.url + "/api/v1/chat", json=body) as r:
                lines = r.iter_lines()
                assert json.loads(next(lines))["type"] == "start"
                ctrl_c()
                server.wait_event(lambda e: True, 10, "draining")
                time.sleep(1)  # the supervisor's SIGTERM has come
                assert not server.events("drain_cut")
                assert server.proc.poll() is None
                ctrl_c()
                ended = json.loads(list(lines)[-1])
        assert ended["code"] == "shutting_down", ended
        assert server.proc.wait(15) == 0
        assert {e["pid"] for e in server.events("draining")} == pids
        # The idle worker ended with the first Ctrl-C (had it not yet, its cut ends nothing).
        assert [c["calls"] for c in server.events("drain_cut") if c["calls"]] == [1]
        assert not [ln for ln in server.lines() if "Traceback" in ln]
        assert {e["pid"] for e in server.events("stopped")} == pids


def in_process(**extra: object) -> Any:
    """The services of an app built in this process on the echo backend (no server)."""
    from stella.app import create_app
    from stella.settings import load_settings

    overrides = {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}
    app = create_app(load_settings({**overrides, **extra}, environ={}))
    return app.services  # type: ignore[attr-defined]


def swallowing(svc: Any, sleep_s: float) -> list[str]:
    """Make `svc`'s admission lose a cancel: it waits `sleep_s`, then returns a permit
    whatever happened (as redis-py's wait_for may); what the permit had given back."""
    from stella.calls import Admission, Call, Permit

    given_back: list[str] = []

    class Swallowing(Admission):
        async def admit(
            self,
            call: Call,
            route: object,
            request: object,
            slot: bool = True,
            others: object = (),
            chain: object = (),
        ):  # type: ignore[no-untyped-def, override]
            try:
                await asyncio.sleep(sleep_s)
            except asyncio.CancelledError:
                pass  # the cancel is lost: a result comes back instead
            permit = Permit()
            permit.release = lambda: given_back.append("released")  # type: ignore[method-assign]
            return permit

    svc.pipeline.admission = Swallowing()
    return given_back


def prepare(svc: Any, request_id: str) -> Any:
    """The coroutine admitting one chat on the echo model."""
    from stella.calls import Call
    from stella.protocol import ChatRequest, Message

    request = ChatRequest(messages=[Message(role="user", content="hi")], model="echo")
    return svc.pipeline.prepare(request, Call(request_id=request_id))


async def test_a_cancel_that_admission_swallowed_still_ends_the_call() -> None:
    # redis-py wraps its socket calls in wait_for, which (Python 3.11) may return the
    # result of a call cancelled in the same turn: admitted, the call must still end as
    # the drain's cancel meant, its permit given back, before any backend.
    from stella.errors import ShuttingDown

    svc = in_process()
    given_back = swallowing(svc, 5)
    task = asyncio.create_task(prepare(svc, "r1"))
    await asyncio.sleep(0.05)
    svc.drain.begin()
    try:
        await asyncio.wait_for(task, 2)
        raise AssertionError("admitted")
    except ShuttingDown:
        pass
    assert given_back == ["released"] and not svc.pipeline.active
    assert task.cancelling() == 0


async def test_a_cancel_swallowed_while_admitted_during_the_drain_gives_the_permit_back() -> None:
    # The drain began before the call came to admission, and its cut (or the client
    # leaving) cancels the call there: a result that comes back anyway is given back.
    from stella.errors import ShuttingDown

    svc = in_process()
    given_back = swallowing(svc, 0.3)
    svc.drain.timeout_s = 0.1
    svc.drain.begin()
    task = asyncio.create_task(prepare(svc, "r2"))
    with contextlib.suppress(ShuttingDown):
        await asyncio.wait_for(task, 2)
        raise AssertionError("admitted")
    assert given_back == ["released"] and not svc.pipeline.active


async def test_a_call_that_comes_after_the_drain_s_cut_leaves_no_cancel_pending() -> None:
    # The cut is over when the call comes to admission, and a slot is free (admission
    # never pauses): 503 shutting_down, and the cancel that said so is not left for the
    # caller's next await.
    from stella.errors import ShuttingDown

    svc = in_process(limits={"backends": {"echo": 5}})
    svc.drain.timeout_s = 0.05
    svc.drain.begin()
    await asyncio.sleep(0.1)
    assert svc.drain.over

    async def call() -> str:
        try:
            await prepare(svc, "late")
            return "admitted"
        except ShuttingDown:
            pass
        await asyncio.sleep(0)  # the caller goes on: no cancel may be waiting for it
        return "went on"

    assert await asyncio.wait_for(asyncio.create_task(call()), 2) == "went on"
    assert not svc.pipeline.active


async def test_the_cut_ends_each_call_once_and_leaves_no_timer_to_cut_again() -> None:
    # The lifespan begins the drain and cuts at once: the drain's timer, set by begin(),
    # must not cut again later, nor may a second cut(); either would cancel a call that
    # is still sending its last line after the first cancel.
    from stella.calls import Call
    from stella.streaming import Drain

    drain = Drain(timeout_s=0.05)
    ended: list[str] = []

    async def call(request_id: str) -> str:
        task = asyncio.current_task()
        assert task is not None
        drain.enter(Call(request_id=request_id), task)
        try:
            await asyncio.sleep(10)
            return "not cut"
        except asyncio.CancelledError:
            ended.append(request_id)
            await asyncio.sleep(0.2)  # its last line, going out
            return "ended once"
        finally:
            drain.leave(task)

    task = asyncio.create_task(call("timer"))
    await asyncio.sleep(0)
    drain.begin()
    drain.cut()
    assert await asyncio.wait_for(task, 2) == "ended once"
    drain = Drain(timeout_s=30)
    task = asyncio.create_task(call("twice"))
    await asyncio.sleep(0)
    drain.begin()
    drain.cut()
    await asyncio.sleep(0.05)
    drain.cut()
    assert await asyncio.wait_for(task, 2) == "ended once"
    assert ended == ["timer", "twice"]
    # The timer itself is gone, not merely made harmless by `over`: one still scheduled
    # would keep the drain, and the calls it held, alive for its whole timeout.
    cut = weakref.ref(drain)
    drain = Drain(timeout_s=30)  # the cut one let go
    del task
    gc.collect()
    assert cut() is None, "cut() left the drain's timer scheduled"


class AsgiClient:
    """One request to an ASGI app in this process: its body given when `ready` is set,
    each message sent slow by `slow_s` when `slow` says so; what was sent."""

    def __init__(self, app: Any, path: str, body: dict[str, Any]) -> None:
        self.app, self.path, self.body = app, path, json.dumps(body).encode()
        self.ready = asyncio.Event()
        self.ready.set()
        self.slow: Any = lambda message: False
        self.slowed = asyncio.Event()  # a slow send began
        self.sent: list[dict[str, Any]] = []

    async def run(self) -> None:
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if not given:
                await self.ready.wait()
                given = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            await asyncio.Event().wait()  # the client stays
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if self.slow(message):
                self.slowed.set()
                await asyncio.sleep(0.5)  # a client taking its last bytes slowly
            self.sent.append(message)

        await self.app(post_scope(self.path, len(self.body)), receive, send)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent if "body" in m["type"]).decode()


def in_process_app(delay_s: float = 0.01) -> Any:
    """An app built in this process on an echo backend (a token each `delay_s`)."""
    from stella.app import create_app
    from stella.settings import load_settings

    overrides = {
        "models": {"default": "e", "routes": {"e": {"backend": "e"}}},
        "backends": {"local": {"enabled": False}, "e": {"kind": "echo", "delay_s": delay_s}},
    }
    return create_app(load_settings(overrides, environ={}))


def chat(path: str, stream: bool) -> dict[str, Any]:
    """A body for `path` asking the echo model for three words."""
    if path == "/v1/responses":
        return {"model": "e", "input": "one two three", "stream": stream}
    body = {"model": "e", "messages": [{"role": "user", "content": "one two three"}]}
    body["stream"] = stream
    return {**body, "max_tokens": 9} if path == "/v1/messages" else body


async def test_a_call_that_starts_after_the_cut_is_ended_shutting_down_and_not_left_cancelled() -> (
    None
):
    # Its request began before the drain and its body came after the cut: it must not
    # start, and its answer says so (nothing left to cancel its task after the answer).
    cases = [
        ("/api/v1/chat", False, 503),
        ("/api/v1/chat", True, 200),  # a native stream starts at once: then its error line
        ("/v1/chat/completions", False, 503),
        ("/v1/chat/completions", True, 503),
        ("/v1/messages", True, 503),
        ("/v1/responses", False, 503),
        ("/v1/responses", True, 503),
    ]
    for path, stream, status in cases:
        app = in_process_app(delay_s=0)  # an answer that never pauses: no await takes a cancel
        events: list[dict[str, Any]] = []
        app.services.pipeline.listeners.append(events.append)
        async with app.router.lifespan_context(app):
            client = AsgiClient(app, path, chat(path, stream))
            client.ready.clear()
            task = asyncio.create_task(client.run())
            await asyncio.sleep(0.05)
            app.services.drain.begin()
            app.services.drain.cut()
            client.ready.set()
            await asyncio.wait_for(task, 5)
        assert not task.cancelled(), path
        assert client.status == status, (path, stream)
        assert "shutting down" in client.text and "one" not in client.text, client.text
        assert [(e["status"], e["finish_reason"]) for e in events] == [(503, "cancelled")]


async def test_a_cut_while_the_last_lines_go_out_sends_no_second_terminal_line() -> None:
    # The answer is settled and logged before its last lines are written: a shutdown's
    # cut then must not add an error after (or in place of) the `done` line.
    for path in ("/api/v1/chat", "/v1/chat/completions", "/v1/messages", "/v1/responses"):
        for slow_on in ("done", "close"):
            app = in_process_app()
            events: list[dict[str, Any]] = []
            app.services.pipeline.listeners.append(events.append)
            async with app.router.lifespan_context(app):
                client = AsgiClient(app, path, chat(path, True))
                if slow_on == "done":  # the terminal line's own send
                    client.slow = lambda m: any(
                        s in m.get("body", b"")
                        for s in (
                            b'"done"',
                            b'"finish_reason":"stop"',
                            b"message_delta",
                            b"response.completed",
                        )
                    )
                else:  # the send that closes the body
                    client.slow = lambda m: (
                        m["type"] == "http.response.body" and not m.get("more_body", False)
                    )
                task = asyncio.create_task(client.run())
                await asyncio.wait_for(client.slowed.wait(), 5)
                app.services.drain.begin()
                app.services.drain.cut()
                await asyncio.wait_for(task, 5)
            assert "shutting_down" not in client.text, (path, slow_on, client.text)
            assert [(e["status"], e["finish_reason"]) for e in events] == [(200, "stop")]


async def test_a_messages_stream_cut_by_the_drain_ends_with_an_overloaded_error_event() -> None:
    # The Messages API has no shutting_down type: a stream cut by the drain ends with the
    # `error` event an overloaded server sends, which its clients take as one to retry.
    app = in_process_app(delay_s=0.05)
    words = " ".join(["w"] * 200)
    body = {"model": "e", "max_tokens": 400, "stream": True}
    body["messages"] = [{"role": "user", "content": words}]
    async with app.router.lifespan_context(app):
        client = AsgiClient(app, "/v1/messages", body)
        task = asyncio.create_task(client.run())
        deadline = time.monotonic() + 10
        while "text_delta" not in client.text:
            assert time.monotonic() < deadline, client.text
            await asyncio.sleep(0.02)
        app.services.drain.begin()
        app.services.drain.cut()
        await asyncio.wait_for(task, 5)
    assert client.status == 200
    frames = [f for f in client.text.split("\n\n") if f.startswith("event: error")]
    assert len(frames) == 1, client.text[-500:]
    error = json.loads(frames[0].split("data: ", 1)[1])["error"]
    assert error["type"] == "overloaded_error" and "shutting down" in error["message"]
    assert "message_stop" not in client.text


async def test_a_body_that_starts_after_the_cut_is_not_waited_for() -> None:
    # A request that began before the drain sends the first part of its body after the
    # cut: 503 at once, not a read that waits for the rest as long as the client likes.
    app = in_process_app()
    sent: list[dict[str, Any]] = []
    parts = [b'{"model": "e", "stream": false, ', None]  # the rest never comes
    cut = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await cut.wait()
        part = parts.pop(0)
        if part is None:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": part, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = post_scope("/api/v1/chat", 100)  # a body of 100 bytes, its first part alone sent
    async with app.router.lifespan_context(app):
        call = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.05)  # in, reading its body
        app.services.drain.begin()
        app.services.drain.cut()
        cut.set()
        t0 = time.monotonic()
        await asyncio.wait_for(call, 5)
        # At once: not a wait for the rest (wait_for's own cancel would end it, as a cut).
        assert time.monotonic() - t0 < 1
    assert sent[0]["status"] == 503 and b"shutting_down" in sent[1]["body"]
