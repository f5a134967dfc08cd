"""The test harness: a server a test starts is its own, though another test run on this
machine takes the port it was handed (two clones' suites, a developer's beside CI)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests import live
from tests.fakes import server as fakes


@contextmanager
def _threaded(server: socketserver.TCPServer) -> Iterator[int]:
    """Serve `server` on a thread until the block ends; its port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def _another_health() -> Iterator[int]:
    """Another process's HTTP server on loopback, answering every GET 200 as stella's
    /health does; its port."""

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status":"ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with _threaded(ThreadingHTTPServer(("127.0.0.1", 0), Healthy)) as port:
        yield port


def _hands_out_first(port: int) -> Callable[[], int]:
    """A free_port that hands out `port` (taken) once, then free ones."""
    handed = [port]
    real = live.free_port
    return lambda: handed.pop() if handed else real()


def _is_stella(server: live.LiveServer) -> None:
    r = httpx.get(server.url + "/api/v1/models", timeout=10)
    assert r.status_code == 200 and "echo" in r.text, r.text
    assert live.owns_port(server.proc.pid, server.port)


def test_a_stella_whose_port_another_server_answers_on_is_started_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its /health was taken for stella's: the test talked to the other server.
    with _another_health() as taken:
        monkeypatch.setattr(live, "free_port", _hands_out_first(taken))
        with live.run_stella() as server:
            assert server.port != taken
            _is_stella(server)


def test_a_stella_that_could_not_bind_its_port_is_started_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "stella exited at start: ... address already in use" failed the test.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, no SO_REUSEADDR: stella's bind is refused
        taken = holder.getsockname()[1]
        monkeypatch.setattr(live, "free_port", _hands_out_first(taken))
        with live.run_stella() as server:
            assert server.port != taken
            _is_stella(server)


def test_a_stella_that_fails_at_start_for_another_reason_is_not_started_again() -> None:
    # Only a taken port is tried again: a bad config says so at once, with its log.
    said = r"^stella exited at start:\nstella: config error: models.default: empty"
    with pytest.raises(RuntimeError, match=said), live.run_stella({"models": {"default": ""}}):
        pass


def test_a_fake_upstreams_port_is_its_own_before_uvicorn_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The port was free when handed out; another process bound it before uvicorn did,
    # and the fake "did not start".
    startup = uvicorn.Server.startup
    thieves: list[socket.socket] = []

    async def taken_first(self: uvicorn.Server, sockets: Any = None) -> None:
        thief = socket.socket()
        try:
            thief.bind(("127.0.0.1", self.config.port))
            thief.listen()
            thieves.append(thief)
        except OSError:
            thief.close()
        await startup(self, sockets)

    monkeypatch.setattr(uvicorn.Server, "startup", taken_first)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"fake"})

    try:
        with fakes.serve(app) as url:
            assert httpx.get(url + "/x", timeout=5).text == "fake"
        assert not thieves
    finally:
        for thief in thieves:
            thief.close()


def test_a_redis_server_whose_port_another_answers_on_is_started_on_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Another run's redis-server said PONG: the test used (and flushed) it.
    from tests import test_redis

    class Pong(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while self.request.recv(1024):
                self.request.sendall(b"+PONG\r\n")

    pong = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Pong)
    pong.daemon_threads = True
    with _threaded(pong) as taken:
        monkeypatch.setattr(live, "free_port", _hands_out_first(taken))
        monkeypatch.setattr(test_redis, "free_port", _hands_out_first(taken), raising=False)
        redis = test_redis.Redis(tmp_path)
        redis.start()
        try:
            assert redis.port != taken and redis.proc is not None
            assert live.owns_port(redis.proc.pid, redis.port)
        finally:
            redis.stop()
