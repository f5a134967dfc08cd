"""SIGTERM and SIGINT while serving: the first begins the drain, another one cuts it."""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

import structlog

from stella.commands import _is_tty
from stella.streaming import Drain

_log = structlog.get_logger("stella")

# Under a supervisor (--workers, --reload) a worker gets a Ctrl-C twice: from the
# terminal, and passed on by the supervisor as SIGTERM a moment later. A signal this
# soon after the first is taken as that same one, not as a second asking to cut.
RELAYED_WITHIN_S = 0.5


def chain_signals(drain: Drain) -> None:
    """On SIGTERM/SIGINT begin draining and let the server's own handler run; on another
    one during the drain, cut it (as its timeout does), the server's handler left out."""
    # uvicorn takes a second SIGINT as "force exit": it skips the app's shutdown and
    # cancels the request tasks, so calls end in a 500, a stream without its terminal
    # line, a traceback and a 499 in the log. Cutting the drain ends them as its
    # timeout would, and the shutdown goes on from there, bounded as ever.
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    supervised = multiprocessing.parent_process() is not None
    first: list[float] = []  # when the first signal came, shared by both handlers
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous) or getattr(previous, "_stella", False):
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            # Runs between two bytecodes of the main thread, the loop's own code or a
            # call's included: the work is handed to the loop, in a context of its own
            # (not that call's: its request_id would label the lines).
            now = time.monotonic()
            if not first:
                first.append(now)
                loop.call_soon_threadsafe(begin, drain, signum, context=contextvars.Context())
                previous(signum, frame)
            elif not supervised or now - first[0] >= RELAYED_WITHIN_S:
                loop.call_soon_threadsafe(cut, drain, signum, context=contextvars.Context())

        handler._stella = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


def begin(drain: Drain, signum: int) -> None:
    """Begin the drain for signal `signum`, with a `draining` line saying so."""
    if drain.draining:  # the lifespan's shutdown began it already
        return
    calls = len(drain.tasks)
    extra = {}
    if calls and _at_terminal():
        extra["detail"] = "Ctrl-C again to end the calls now"
    # Nothing else is said until the calls end, up to drain_timeout_s later: without
    # it, a server that waits looks like one that hangs.
    _log.info(
        "draining",
        pid=os.getpid(),
        signal=signal.Signals(signum).name,
        calls=calls,
        drain_timeout_s=drain.timeout_s,
        **extra,
    )
    drain.begin()


def cut(drain: Drain, signum: int) -> None:
    """Cut the drain for a repeated signal `signum`, with a `drain_cut` line saying so."""
    if drain.over:
        return
    _log.info(
        "drain_cut",
        pid=os.getpid(),
        signal=signal.Signals(signum).name,
        calls=len(drain.tasks),
        detail="signalled again: the calls still running end now with shutting_down",
    )
    drain.cut()


def _at_terminal() -> bool:
    """Whether someone reads the output at a terminal (where a Ctrl-C comes from)."""
    return _is_tty(sys.stdout) or _is_tty(sys.stderr)
