"""The Python client's retries, and its streams sending their request when made, against
a live stella."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stella import client as sc
from stella.protocol import Delta, Done, Start
from tests.conftest import ECHO_ROUTES
from tests.live import LiveServer, free_port, run_stella

WORDS = [{"role": "user", "content": " ".join(["w"] * 100)}]  # 5 s on echo-slow
HI = [{"role": "user", "content": "hi"}]
# A prompt whose tokens, charged after the answer, leave a bucket of 2 tokens a minute
# an hour short: the next request's Retry-After is far past the client's cap.
LONG = [{"role": "user", "content": " ".join(["w"] * 60)}]
# Reserves the whole of a 600-token bucket: the next request waits for it to refill
# the few tokens the answer used (Retry-After: 1).
WHOLE_BUCKET = {"max_tokens": 1000}
METERED = ("sync", "stream", "async", "told")


@pytest.fixture(scope="module")
def flaky() -> Iterator[LiveServer]:
    """Routes that fail their first calls with a retryable 502, and rate-limited ones."""
    names = ("sync", "async", "zero", "stream", "backoff", "told", "atold", "stop")
    config = {
        "backends": {f"flaky-{n}": {"kind": "echo", "fail_first_calls": 2} for n in names},
        "models": {
            "routes": {
                **{f"flaky-{n}": {"backend": f"flaky-{n}", "retries": 0} for n in names},
                **{f"metered-{n}": {"backend": "echo"} for n in METERED},
                "starved": {"backend": "echo"},
            }
        },
        "limits": {
            "models": {
                **{f"metered-{n}": {"tokens_per_minute": 600} for n in METERED},
                "starved": {"tokens_per_minute": 2},
            }
        },
        "breaker": {"failure_threshold": 0},
    }
    with run_stella(config) as server:
        yield server


def _statuses() -> tuple[list[int], dict[str, Any]]:
    """The HTTP status of each answer a client gets (its event hook), and the hook."""
    seen: list[int] = []

    def hook(response: httpx.Response) -> None:
        seen.append(response.status_code)

    return seen, {"event_hooks": {"response": [hook]}}


def _astatuses() -> tuple[list[int], dict[str, Any]]:
    """As _statuses, for the async client."""
    seen: list[int] = []

    async def hook(response: httpx.Response) -> None:
        seen.append(response.status_code)

    return seen, {"event_hooks": {"response": [hook]}}


# --- retries --------------------------------------------------------------------------


def test_a_retryable_error_is_sent_again_with_backoff(flaky: LiveServer) -> None:
    seen, hooks = _statuses()
    with sc.Client(flaky.url, **hooks) as c:
        t0 = time.monotonic()
        assert c.chat(HI, "flaky-backoff").response == "hi"
        waited = time.monotonic() - t0
    assert seen == [502, 502, 200]
    # 0.5 s, then 1 s, each jittered down by up to a quarter.
    assert 0.5 * 0.75 + 1.0 * 0.75 <= waited < 5, waited


def test_max_retries_bounds_the_attempts_and_0_sends_once(flaky: LiveServer) -> None:
    seen, hooks = _statuses()
    with sc.Client(flaky.url, max_retries=1, **hooks) as c:
        with pytest.raises(sc.UpstreamError) as info:
            c.chat(HI, "flaky-sync")
        assert info.value.retryable and seen == [502, 502]
        seen.clear()
        assert c.chat(HI, "flaky-sync").response == "hi"  # its third call
        assert seen == [200]
        seen.clear()
        once = c.with_options(max_retries=0)
        assert once.max_retries == 0 and c.max_retries == 1
        with pytest.raises(sc.UpstreamError):
            once.chat(HI, "flaky-zero")
        assert seen == [502]
        seen.clear()
        with pytest.raises(sc.NotFoundError):  # not retryable: sent once
            c.chat(HI, "no-such-model")
        assert seen == [404]
    with pytest.raises(ValueError):
        sc.Client(flaky.url, max_retries=-1)


def test_a_stream_is_retried_before_it_starts_never_after(flaky: LiveServer) -> None:
    seen, hooks = _statuses()
    with sc.Client(flaky.url, **hooks) as c:
        # stella sends a stream's start line before it asks the backend: the backend's
        # failure comes after it, in-band, and the stream is not sent again.
        with pytest.raises(sc.UpstreamError) as info:
            list(c.chat(HI, "flaky-stream", stream=True))
        assert info.value.retryable and info.value.status == 0 and seen == [200]
        seen.clear()
        # A 429 comes before the stream starts: it is sent again once Retry-After has passed.
        assert c.chat(HI, "metered-stream", options=WHOLE_BUCKET).response == "hi"
        seen.clear()
        t0 = time.monotonic()
        with c.chat(HI, "metered-stream", stream=True, options=WHOLE_BUCKET) as stream:
            assert time.monotonic() - t0 >= 0.9  # Retry-After: 1
            events = list(stream)
        assert seen == [429, 200]
        assert isinstance(events[0], Start) and isinstance(events[-1], Done)


def test_retry_after_is_honoured_up_to_its_cap(flaky: LiveServer) -> None:
    seen, hooks = _statuses()
    with sc.Client(flaky.url, **hooks) as c:
        c.chat(HI, "metered-sync", options=WHOLE_BUCKET)
        seen.clear()
        t0 = time.monotonic()
        assert c.chat(HI, "metered-sync", options=WHOLE_BUCKET).response == "hi"
        assert seen == [429, 200] and time.monotonic() - t0 >= 0.9
        # A wait past the cap (60 s) is the caller's to decide: raised at once.
        c.chat(LONG, "starved")
        seen.clear()
        t0 = time.monotonic()
        with pytest.raises(sc.RateLimitError) as info:
            c.chat(HI, "starved")
        assert time.monotonic() - t0 < 1 and seen == [429]
        assert info.value.retry_after is not None and info.value.retry_after > sc.RETRY_AFTER_CAP_S


async def test_the_async_client_retries_too(flaky: LiveServer) -> None:
    seen, hooks = _astatuses()
    async with sc.AsyncClient(flaky.url, **hooks) as ac:
        assert (await ac.chat(HI, "flaky-async")).response == "hi"
        assert seen == [502, 502, 200]
        seen.clear()
        await ac.generate("hi", "metered-async", options=WHOLE_BUCKET)
        seen.clear()
        stream = await ac.generate("hi", "metered-async", stream=True, options=WHOLE_BUCKET)
        assert seen == [429, 200]
        async with stream:
            texts = [e.text async for e in stream if isinstance(e, Delta)]
        assert texts == ["hi"]
        once = ac.with_options(max_retries=0)
        with pytest.raises(sc.RateLimitError):
            await once.generate("hi", "metered-async", options=WHOLE_BUCKET)


def test_on_retry_is_told_each_error_and_its_wait(flaky: LiveServer) -> None:
    told: list[tuple[sc.StellaClientError, float]] = []
    seen, hooks = _statuses()

    def on_retry(exc: sc.StellaClientError, wait: float) -> None:
        told.append((exc, wait))
        seen.append(-1)  # where in the attempts it was called

    with sc.Client(flaky.url, on_retry=on_retry, **hooks) as c:
        assert c.chat(HI, "flaky-told").response == "hi"
        assert seen == [502, -1, 502, -1, 200]
        assert [(type(e), e.status) for e, _ in told] == [(sc.UpstreamError, 502)] * 2
        # The backoff it is about to sleep: 0.5 s, then 1 s, each jittered down.
        assert 0.375 <= told[0][1] <= 0.5 and 0.75 <= told[1][1] <= 1.0, told
        c.chat(HI, "metered-told", options=WHOLE_BUCKET)
        told.clear()
        clone = c.with_options(max_retries=1)  # the hook goes with the clone
        assert clone.chat(HI, "metered-told", options=WHOLE_BUCKET).response == "hi"
        assert [(type(e), w) for e, w in told] == [(sc.RateLimitError, 1.0)]
        assert told[0][0].retry_after == 1.0
        told.clear()
        with pytest.raises(sc.NotFoundError):  # not retried: not told
            c.chat(HI, "no-such-model")
        assert told == []


def test_what_on_retry_raises_ends_the_retries(flaky: LiveServer) -> None:
    seen, hooks = _statuses()

    def give_up(exc: sc.StellaClientError, wait: float) -> None:
        raise exc

    with sc.Client(flaky.url, on_retry=give_up, **hooks) as c:
        with pytest.raises(sc.UpstreamError) as info:
            c.chat(HI, "flaky-stop")
    assert seen == [502] and info.value.status == 502


async def test_the_async_client_tells_on_retry_too(flaky: LiveServer) -> None:
    told: list[tuple[str, float]] = []
    on_retry = lambda exc, wait: told.append((exc.code, wait))  # noqa: E731
    async with sc.AsyncClient(flaky.url, on_retry=on_retry) as ac:
        assert (await ac.with_options(max_retries=2).chat(HI, "flaky-atold")).response == "hi"
    assert [code for code, _ in told] == ["upstream_error"] * 2
    assert 0.375 <= told[0][1] <= 0.5 and 0.75 <= told[1][1] <= 1.0, told


# --- network failures -----------------------------------------------------------------


def test_a_refused_connection_is_retryable_and_retried_until_the_server_is_up() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with sc.Client(url, max_retries=0) as c, pytest.raises(sc.NetworkError) as info:
        c.models()
    assert info.value.retryable and info.value.code == "network_error"
    # A rolling restart: the server is down when the call begins, up a moment later.
    sent: list[str] = []
    got: dict[str, Any] = {}

    def call() -> None:
        hooks = {"event_hooks": {"request": [lambda request: sent.append(request.url.path)]}}
        try:
            with sc.Client(url, max_retries=6, **hooks) as c:  # waits up to ~18-24 s in all
                got["models"] = c.models()
        except sc.StellaClientError as exc:
            got["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sent  # the first attempt went out while nothing listened
        with run_stella(ECHO_ROUTES, {"PORT": str(port)}, check_ready=False):
            thread.join(60)
    finally:
        thread.join(60)
    assert "models" in got, got
    assert len(sent) >= 2 and any(m.name == "echo" for m in got["models"].models)


def test_a_read_timeout_is_not_retried(stella: LiveServer) -> None:
    sent: list[str] = []
    hooks = {"event_hooks": {"request": [lambda request: sent.append(request.url.path)]}}
    msgs = [{"role": "user", "content": " ".join(["w"] * 50)}]
    with sc.Client(stella.url, timeout=0.1, **hooks) as c, pytest.raises(sc.TimeoutError) as info:
        c.chat(msgs, model="echo-slow")
    # The request went out and the server may be working on it: not sent again.
    assert not info.value.retryable and sent == ["/api/v1/chat"]
    assert "within the client's timeout of 0.1 s" in info.value.message
    sent.clear()
    # Read past the start line (the stall's pings come every 0.2 s): a drop mid-stream.
    with sc.Client(stella.url, timeout=0.1, **hooks) as c, pytest.raises(sc.TimeoutError) as mid:
        list(c.chat(msgs, "echo-stall", stream=True))
    assert mid.value.code == "timeout" and not mid.value.retryable
    assert sent == ["/api/v1/chat"]


def test_no_free_connection_in_the_pool_is_retryable(stella: LiveServer) -> None:
    one = httpx.Limits(max_connections=1)
    with sc.Client(stella.url, max_retries=0, limits=one, timeout=httpx.Timeout(10, pool=0.2)) as c:
        with c.chat(WORDS, "echo-slow", stream=True):  # holds the one connection
            with pytest.raises(sc.TimeoutError) as info:
                c.models()
        assert info.value.retryable  # nothing was sent
        assert "could not get a connection to" in info.value.message
        assert c.models().models  # the stream closed: its connection is free again


# --- a stream sends its request when made ---------------------------------------------


def test_a_streams_http_error_raises_from_the_call(stella: LiveServer) -> None:
    one = httpx.Limits(max_connections=1)
    with sc.Client(stella.url, max_retries=0, limits=one, timeout=httpx.Timeout(10, pool=1)) as c:
        for _ in range(3):  # each failure releases its connection
            with pytest.raises(sc.NotFoundError) as info:
                c.chat(HI, "no-such-model", stream=True)
            assert info.value.status == 404 and info.value.request_id.startswith("req_")
            with pytest.raises(sc.NotFoundError):
                c.generate("hi", "no-such-model", stream=True)
        assert c.models().models


def test_a_stream_reads_its_body_as_it_is_iterated_and_closes_unread(
    stella: LiveServer,
) -> None:
    one = httpx.Limits(max_connections=1)
    rid = f"unread-{time.monotonic_ns()}"
    with sc.Client(
        stella.url, limits=one, timeout=httpx.Timeout(10, pool=1), headers={"X-Request-ID": rid}
    ) as c:
        t0 = time.monotonic()
        stream = c.chat(WORDS, "echo-slow", stream=True)
        assert time.monotonic() - t0 < 2  # the answer takes 5 s: not read at the call
        stream.close()  # never iterated: its connection closes, the server cancels
        ev = stella.wait_event(lambda e: e["request_id"] == rid)
        assert ev["finish_reason"] == "client_closed"
        assert c.models().models  # the one connection is free
        c.chat(WORDS, "echo-slow", stream=True)  # dropped at once: garbage-collected
        gc.collect()
        assert c.models().models


async def test_an_async_streams_http_error_raises_from_the_await(stella: LiveServer) -> None:
    one = httpx.Limits(max_connections=1)
    async with sc.AsyncClient(
        stella.url, max_retries=0, limits=one, timeout=httpx.Timeout(10, pool=1)
    ) as ac:
        for _ in range(3):
            with pytest.raises(sc.NotFoundError) as info:
                await ac.chat(HI, "no-such-model", stream=True)
            assert info.value.status == 404
            with pytest.raises(sc.NotFoundError):
                await ac.generate("hi", "no-such-model", stream=True)
        t0 = time.monotonic()
        stream = await ac.chat(WORDS, "echo-slow", stream=True)
        assert time.monotonic() - t0 < 2
        await stream.aclose()
        assert (await ac.models()).models
