"""The shared ticker: deadlines and delayed callbacks without a timer per call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from stella.watchdog import TICK_S, Watchdog, close_quietly, ticker


async def test_later_runs_once_and_cancel_withdraws() -> None:
    ran: list[str] = []
    t = ticker()
    t.later(0.01, lambda: ran.append("a"))
    withdrawn = t.later(0.01, lambda: ran.append("b"))
    withdrawn.cancel()
    await asyncio.sleep(TICK_S * 3)
    assert ran == ["a"]
    # Nothing left to watch: the ticker stops its timer.
    await asyncio.sleep(TICK_S * 2)
    assert not t.items and t._handle is None


async def _silent_wait(dog: Watchdog, seconds: float) -> None:
    dog.waiting = True
    try:
        await asyncio.sleep(seconds)
    finally:
        dog.waiting = False


async def test_watchdog_cancels_a_silent_wait_and_says_so() -> None:
    dog = Watchdog(time.perf_counter() + 60)
    dog.watch(0.1)
    t = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        try:
            await _silent_wait(dog, 5)
        except asyncio.CancelledError:
            assert dog.expired()
            raise
    assert 0.1 <= time.perf_counter() - t < 0.1 + 3 * TICK_S
    dog.close()


async def test_progress_keeps_a_slow_stream_alive() -> None:
    dog = Watchdog(time.perf_counter() + 60)
    dog.watch(0.3)
    # 0.64 s in all, more than the idle limit, but never 0.3 s without an event (the
    # margin is for the 50 ms ticker and a busy machine).
    for _ in range(8):
        await _silent_wait(dog, 0.08)
        dog.progress += 1
    assert not dog.expired()
    dog.close()
    assert dog not in ticker().items


async def test_time_outside_waits_is_not_silence() -> None:
    dog = Watchdog(time.perf_counter() + 60)
    dog.watch(0.1)
    await asyncio.sleep(0.3)  # a slow client, not a silent backend
    await _silent_wait(dog, 0.02)
    assert not dog.expired()
    dog.close()


async def test_the_deadline_ends_even_a_lively_call() -> None:
    dog = Watchdog(time.perf_counter() + 0.2)
    dog.watch(10)
    with pytest.raises(asyncio.CancelledError):
        for _ in range(100):
            await _silent_wait(dog, 0.02)
            dog.progress += 1
    assert dog.expired()
    dog.close()


async def test_the_callback_runs_once_and_a_failing_one_keeps_the_limits() -> None:
    ran: list[int] = []
    dog = Watchdog(time.perf_counter() + 60)
    dog.at, dog.then = time.perf_counter() + 0.01, lambda: ran.append(1)
    dog.watch(10)
    await asyncio.sleep(TICK_S * 3)
    assert ran == [1]
    dog.close()

    def boom() -> None:
        raise RuntimeError("a bug in the callback")

    dog = Watchdog(time.perf_counter() + 60)
    dog.at, dog.then = time.perf_counter(), boom
    dog.watch(0.1)
    with pytest.raises(asyncio.CancelledError):
        try:
            await _silent_wait(dog, 5)
        except asyncio.CancelledError:
            assert dog.expired()  # the silence limit still fired
            raise
    dog.close()


async def test_a_failing_callback_is_logged_with_its_traceback() -> None:
    def boom() -> None:
        raise RuntimeError("a bug in the callback")

    with capture_logs() as logged:
        ticker().later(0, boom)
        await asyncio.sleep(TICK_S * 3)
    [event] = [e for e in logged if e["event"] == "tick_failed"]
    assert event["log_level"] == "error" and event["exc_info"] is True


async def test_a_backend_cleanup_that_fails_is_logged_not_raised() -> None:
    async def chat() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            raise OSError("upstream socket already gone")

    agen = chat()
    await anext(agen)
    with capture_logs() as logged:
        await close_quietly(agen)
    [event] = [e for e in logged if e["event"] == "backend_cleanup_failed"]
    # The message is the backend's own text, which may quote a prompt: only with
    # log.content.
    assert event["error"] == "OSError (message not logged)"
    assert event["generator"].endswith("chat")
    agen = chat()
    await anext(agen)
    with capture_logs() as logged:
        await close_quietly(agen, content=True)
    [event] = [e for e in logged if e["event"] == "backend_cleanup_failed"]
    assert "upstream socket already gone" in event["error"]
