"""Run an ASGI app in a real uvicorn on a free loopback port, on a background thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from tests.live import free_port


@contextmanager
def serve(app: Any, health: str = "/health") -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
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
