"""Run an ASGI app in a real uvicorn on a free loopback port, on a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from tests.live import loopback_socket


@contextmanager
def full_backlog() -> Iterator[int]:
    """A loopback port whose listener never accepts and whose backlog is full: a new
    connection to it is never made (its SYN is dropped), as to a host that is down."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # one fills a backlog of 0; the rest wait in SYN-SENT
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for s in (*fillers, listener):
            s.close()


@contextmanager
def serve(app: Any, health: str = "/health") -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    # Bound here and handed to uvicorn: a port free a moment ago may be another test
    # run's by the time uvicorn binds it (it then fails to start).
    sock = loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    try:
        httpx.get(url + health, timeout=2)
    except httpx.HTTPError:
        pass
    try:
        yield url
    finally:
        server.should_exit = True
        server.force_exit = True  # stalled fake streams must not hold the shutdown
        thread.join(10)
        sock.close()
