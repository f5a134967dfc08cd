"""The shared ticker: deadlines and delayed callbacks without a timer per call."""

from __future__ import annotations

import asyncio

import pytest

from stella.watchdog import TICK_S, Watchdog, ticker


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


async def test_watchdog_cancels_a_silent_wait_and_says_so() -> None:
    dog = Watchdog()
    dog.arm(0.05)
    with pytest.raises(asyncio.CancelledError):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert dog.expired()
            raise
    dog.close()


async def test_watchdog_leaves_waits_that_end_in_time_alone() -> None:
    dog = Watchdog()
    for _ in range(3):
        dog.arm(0.2)
        await asyncio.sleep(0.01)
        dog.waiting = False
    await asyncio.sleep(0.3)  # past the deadline, but no longer waiting
    assert not dog.expired()
    dog.close()
    assert dog not in ticker().items
