"""uvicorn's server as `stella serve` runs it: a module of its own, so that uvicorn
loads with `serve` alone (every command's start-up imports stella.commands.serve),
and at module level, so that `--reload` can hand it to the process it spawns."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM ends in exit 0 after the drain, and that a
    second signal does not force the exit."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Begin the shutdown, however many signals come."""
        # uvicorn's own forces the exit on a second SIGINT: no app shutdown, the request
        # tasks cancelled (500s, streams cut without their last line, tracebacks).
        # Once serving, the app's handler takes a second signal as a cut of its drain
        # (stella.shutdown); one that came during the start changes nothing.
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM without re-raising them after shutdown."""
        # uvicorn re-raises the signal once it has shut down (exit 143); a gateway
        # that drained its streams has finished its work and exits 0.
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
