"""Time limits and retries for backend calls, cheap enough for every token."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from stella.errors import StellaError


def backoff(base: float, cap: float, attempt: int, last: StellaError | None) -> float:
    """Exponential backoff with full jitter; an upstream's Retry-After wins when given."""
    hint = getattr(last, "retry_after_hint", None)
    if hint is not None:
        return min(float(hint), cap)
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


async def close_quietly(agen: Any) -> None:
    """Close a backend generator (its cleanup closes upstream requests, stops workers)."""
    if getattr(agen, "ag_frame", True) is None:
        return  # already finished: nothing to clean up
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # its cleanup failing must not mask the outcome
        pass


class Watchdog:
    """Time limits on backend waits with one timer per inference, not one per token.

    `arm(seconds)` marks the inference as waiting on the backend until a
    deadline; the caller clears `waiting` when the wait ends. A single timer
    checks the deadline when it fires and re-arms itself for the latest one, so a
    fast stream creates a timer about once per idle period. Past the deadline it
    cancels the waiting task; `expired()` tells that cancellation from others.
    """

    __slots__ = ("_at", "_fired", "_handle", "_loop", "_task", "waiting")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0
        self.waiting = False
        self._fired = False

    def arm(self, seconds: float) -> None:
        """The current task now waits on the backend for at most `seconds`."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
        at = self._at = loop.time() + seconds
        handle = self._handle
        if handle is None or handle.when() > at:
            if handle is not None:
                handle.cancel()
            self._handle = loop.call_at(at, self._check)
        self.waiting = True

    def expired(self) -> bool:
        """Whether the CancelledError being handled came from this watchdog.

        When it did, the cancellation is withdrawn and the wait should end as a
        timeout; a cancellation from elsewhere (client gone, shutdown) stays.
        """
        if not self._fired:
            return False
        self._fired = False
        return self._task is not None and self._task.uncancel() == 0

    def _check(self) -> None:
        self._handle = None
        if not self.waiting or self._task is None or self._loop is None:
            return  # the next arm() starts a new timer
        if self._loop.time() >= self._at:
            self._fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(self._at, self._check)

    def close(self) -> None:
        """Cancel the timer."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
