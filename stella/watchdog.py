"""Time limits and retries for backend calls, cheap enough for every token."""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from collections.abc import Callable
from typing import Any

import structlog

from stella.errors import StellaError

_log = structlog.get_logger("stella")


def backoff(base: float, cap: float, attempt: int, last: StellaError | None) -> float:
    """Exponential backoff with full jitter; an upstream's Retry-After wins when given."""
    hint = last.retry_after_hint if last is not None else None
    if hint is not None:
        return min(float(hint), cap)
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


async def close_quietly(agen: Any, content: bool = False) -> None:
    """Close a backend generator (its cleanup closes upstream requests, stops workers);
    a failing cleanup is logged, its exception's message only with `content`
    (log.content: a backend's message may quote what it was sent)."""
    if getattr(agen, "ag_frame", True) is None:
        return  # already finished: nothing to clean up
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception as exc:  # its cleanup failing must not mask the outcome, only be told
        _log.warning(
            "backend_cleanup_failed",
            generator=getattr(agen, "__qualname__", type(agen).__name__),
            error=error_text(exc, content),
        )


def error_text(exc: BaseException, content: bool) -> str:
    """How a log line names an exception: its repr with `content` (log.content), else
    its type alone (its message is a backend's own text, which may quote a prompt)."""
    return repr(exc) if content else f"{type(exc).__name__} (message not logged)"


# How often the shared ticker checks deadlines: time limits fire at most this late.
TICK_S = 0.05


class Ticker:
    """One periodic timer per event loop that checks every registered deadline.

    A per-call timer costs a heap push and a cancel on every request (a libuv
    timer under uvloop); stella's limits are seconds long, so one tick every
    TICK_S for everything in flight is precise enough and costs the hot path
    only a set insertion. The tick stops when nothing is registered.
    """

    __slots__ = ("_handle", "items", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: set[Any] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, item: Any) -> None:
        """Check `item.tick(now)` on every tick until it returns False or is discarded."""
        self.items.add(item)
        if self._handle is None:
            self._handle = self.loop.call_later(TICK_S, self._tick)

    def discard(self, item: Any) -> None:
        """Stop checking `item`."""
        self.items.discard(item)

    def later(self, seconds: float, fn: Callable[[], Any]) -> Later:
        """Call `fn` once, `seconds` from now (give or take a tick), unless cancelled."""
        entry = Later(self, time.perf_counter() + seconds, fn)
        self.add(entry)
        return entry

    def _tick(self) -> None:
        now = time.perf_counter()
        items = self.items
        for item in list(items):
            try:
                keep = item.tick(now)
            except Exception:  # one bad callback must not stop the others' time limits
                _log.error("tick_failed", item=repr(item), exc_info=True)
                keep = False
            if not keep:
                items.discard(item)
        self._handle = self.loop.call_later(TICK_S, self._tick) if items else None


class Later:
    """A callback the ticker runs once its time has come; `cancel()` withdraws it."""

    __slots__ = ("at", "fn", "ticker")

    def __init__(self, ticker: Ticker, at: float, fn: Callable[[], Any]) -> None:
        self.ticker = ticker
        self.at = at
        self.fn = fn

    def tick(self, now: float) -> bool:
        """Run the callback when due; True while still waiting."""
        if now < self.at:
            return True
        self.fn()
        return False

    def cancel(self) -> None:
        """Withdraw the callback."""
        self.ticker.discard(self)


_current: list[Any] = [None, None]  # the last (loop, ticker) pair: one lookup per call


def ticker() -> Ticker:
    """The running loop's ticker."""
    loop = asyncio.get_running_loop()
    if _current[0] is loop:
        return _current[1]
    found = _tickers.get(loop)
    if found is None:
        found = _tickers[loop] = Ticker(loop)
    _current[0], _current[1] = loop, found
    return found


_tickers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Ticker] = weakref.WeakKeyDictionary()


class Watchdog:
    """Time limits on a backend call, checked by the loop's ticker: per token only a count.

    `watch(limit)` starts a phase in which the backend may stay silent for at
    most `limit` seconds (time to first token, then the idle limit), never past
    `deadline`. The caller sets `waiting` around each wait on the backend and
    counts each event in `progress`; each tick compares the count with the last
    one it saw, so silence is measured to within a tick without reading a clock
    per token. Past a limit the ticker cancels the waiting task; `expired()`
    tells that cancellation from others (client gone, shutdown).
    """

    __slots__ = (
        "_fired",
        "_seen",
        "_since",
        "_task",
        "_ticker",
        "at",
        "ctx",
        "deadline",
        "limit",
        "progress",
        "then",
        "waiting",
        "writing",
    )

    def __init__(self, deadline: float, task: asyncio.Task[Any] | None = None) -> None:
        self.deadline = deadline  # time.perf_counter() value the whole call must end by
        # A callback run once on the first tick past `at` while the call still runs (the
        # HTTP layer's disconnect watch): a second registration with the ticker spared.
        self.at = 0.0
        self.then: Callable[[], Any] | None = None
        self.limit = 0.0
        self.progress = 0
        self.ctx: Any = None  # the call's CallContext: its `beats`, `alive` count as progress
        self.waiting = False
        self.writing = False  # set around a write to the client, which may block
        self._seen = 0
        self._since = 0.0
        self._fired = False
        self._ticker: Ticker | None = None
        self._task = task  # the task to cancel; found at the first watch() when not given

    def watch(self, limit: float) -> None:
        """From now on the backend may be silent for at most `limit` seconds."""
        self.limit = limit
        self._since = time.perf_counter()
        self._seen = self._count()
        if self._ticker is None:
            tk = self._ticker = ticker()
            if self._task is None:
                self._task = asyncio.current_task(tk.loop)  # given the loop: no second lookup
            tk.add(self)

    def expired(self) -> bool:
        """Whether the CancelledError being handled came from this watchdog.

        When it did, the cancellation is withdrawn and the wait should end as a
        timeout; a cancellation from elsewhere (client gone, shutdown) stays.
        """
        if not self._fired:
            return False
        self._fired = False
        return self._task is not None and self._task.uncancel() == 0

    def silence(self, now: float) -> float:
        """Seconds since the backend was last seen making progress (to a tick)."""
        return now - self._since

    def _count(self) -> int:
        ctx = self.ctx
        return self.progress + ctx.beats + ctx.alive if ctx is not None else self.progress

    def tick(self, now: float) -> bool:
        """Cancel the waiting task after too long a silence; stay registered until closed."""
        then = self.then
        if then is not None and now >= self.at:
            self.then = None
            try:
                then()
            except Exception:  # a failing callback must not cost the call its time limits
                pass
        if self._fired or self._task is None:
            return True
        count = self._count()
        if (self.waiting or self.writing) and now >= self.deadline:
            # Past the total limit, waiting on the backend or on a client not reading.
            self._fired = True
            self._task.cancel()
        elif not self.waiting or count != self._seen:
            self._seen = count
            self._since = now
        elif now - self._since >= self.limit:
            self._fired = True
            self._task.cancel()
        return True

    def close(self) -> None:
        """Stop watching."""
        if self._ticker is not None:
            self._ticker.discard(self)
            self._ticker = None
