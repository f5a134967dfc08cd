"""Daily quotas (requests_per_day, tokens_per_day) in one process (memory buckets); the
Redis ones, shared by replicas, are in test_redis.py."""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.live import NO_MLX, merge, run_stella
from tests.test_limits import KEY, burst_config, read_burst, sha

H = {"Authorization": f"Bearer {KEY}"}
# A day's last seconds, as the store's clock tells them (see `app_at`).
MIDNIGHT = float(calendar.timegm((2030, 1, 2, 0, 0, 0)))


def chat(text: str = "hi", model: str = "echo", **options: object) -> dict:
    return {
        "model": model,
        "stream": False,
        "messages": [{"role": "user", "content": text}],
        "options": options,
    }


def keyed(**limits: object) -> dict:
    return {"auth": {"keys": {"q": {"sha256": sha(KEY), **limits}}}}


def slow_route(delay_s: float) -> dict:
    """Model `slow`: an echo backend that takes `delay_s` a word."""
    return {
        "backends": {"slow": {"kind": "echo", "delay_s": delay_s}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
    }


def to_midnight() -> float:
    """Seconds from now to the next UTC midnight, on this machine's clock."""
    return 86_400 - time.time() % 86_400


def assert_midnight(r: httpx.Response) -> None:
    """`r` is told to come back at the next UTC midnight, and not before."""
    wait = int(r.headers["retry-after"])
    assert abs(wait - to_midnight()) <= 3, (wait, to_midnight())
    assert r.headers["x-quota-reset"] == r.headers["retry-after"]
    assert r.headers["x-should-retry"] == "false"


def test_a_used_up_daily_quota_is_a_429_of_its_own_in_every_dialect() -> None:
    with run_stella(keyed(requests_per_day=2)) as server:
        left = []
        for _ in range(2):
            r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat())
            assert r.status_code == 200, r.text
            assert r.headers["x-quota-limit"] == "2"
            left.append(r.headers["x-quota-remaining"])
            # No per-minute limit: no X-RateLimit headers, whose meaning stays per minute.
            assert "x-ratelimit-limit" not in r.headers
        assert left == ["1", "0"]
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat())
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "quota_exceeded" and err["retryable"] is False
        assert err["message"].startswith("daily quota of 2 requests used up for key q")
        assert r.headers["x-quota-limit"] == "2" and r.headers["x-quota-remaining"] == "0"
        assert_midnight(r)
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers=H,
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 429
        err = r.json()["error"]
        # OpenAI's own words for a used-up quota, not its rate limit's.
        assert (err["type"], err["code"]) == ("insufficient_quota", "insufficient_quota")
        assert err["message"].startswith("daily quota of 2 requests")
        assert_midnight(r)
        r = httpx.post(
            server.url + "/v1/messages",
            headers={**H, "anthropic-version": "2023-06-01"},
            json={
                "model": "echo",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert r.status_code == 429
        body = r.json()
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        assert body["error"]["message"].startswith("daily quota of 2 requests")
        assert_midnight(r)
        r = httpx.post(server.url + "/api/chat", headers=H, json=chat())
        assert r.status_code == 429 and r.json()["error"].startswith("daily quota of 2 requests")
        metrics = httpx.get(server.url + "/metrics", headers=H).text
        assert 'code="quota_exceeded"' in metrics


def test_tokens_per_day_reserve_then_settle() -> None:
    with run_stella(keyed(tokens_per_day=1000, tokens_per_minute=100_000)) as server:
        # Reserved: max_tokens and the prompt ("one two three": 13 characters, 3 tokens).
        r = httpx.post(
            server.url + "/api/v1/chat", headers=H, json=chat("one two three", max_tokens=300)
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-remaining"] == str(1000 - 303)
        used = r.json()["usage"]["total_tokens"]
        # Settled with the real usage: the next call finds only that spent.
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi", max_tokens=900))
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-remaining"] == str(1000 - used - 900)
        # X-RateLimit still tells the per-minute bucket, as before.
        assert r.headers["x-ratelimit-limit"] == "100000"
        spent = used + r.json()["usage"]["total_tokens"]
        # A reservation over what is left reserves what is left, and is settled as any.
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi", max_tokens=999))
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-remaining"] == "0"
        spent += r.json()["usage"]["total_tokens"]
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi", max_tokens=10))
        assert r.status_code == 200
        assert r.headers["x-quota-remaining"] == str(1000 - spent - 10)


def test_a_small_token_quota_serves_what_is_left_and_a_day_in_debt_is_refused() -> None:
    with run_stella(keyed(tokens_per_day=50)) as server:
        # Each reserves reserve_tokens (256) and its prompt, at most what is left of the 50:
        # not one call a day.
        left = []
        for _ in range(3):
            r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi"))
            assert r.status_code == 200, r.text
            assert r.headers["x-quota-remaining"] == "0"
            left.append(r.json()["usage"]["total_tokens"])
        # A call whose usage passes what was left takes the day below nothing: settled to
        # its real usage, it leaves the day in debt, shown as 0 left.
        words = " ".join(["word"] * 60)
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(words))
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0"
        assert sum(left) + r.json()["usage"]["total_tokens"] > 50
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
        assert r.json()["error"]["message"].startswith(
            "daily quota of 50 tokens used up for key q (0 left); it renews at 00:00 UTC"
        )
        assert r.headers["x-quota-remaining"] == "0" and r.headers["x-quota-limit"] == "50"
        assert_midnight(r)


def test_a_call_refused_by_a_per_minute_limit_counts_nothing_for_the_day() -> None:
    with run_stella(keyed(requests_per_day=10, tokens_per_minute=100)) as server:
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(max_tokens=10))
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "9"
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(max_tokens=500))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert "x-quota-limit" not in r.headers  # the day's quota did not refuse it
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(max_tokens=10))
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "8"


@pytest.mark.parametrize("quota", ["requests_per_day", "tokens_per_day"])
async def test_a_call_refused_for_want_of_a_slot_gives_its_day_back(quota: str) -> None:
    config = {
        **keyed(**{quota: 1000}, max_concurrent=1),
        "limits": {"queue_timeout_s": 0.2},
        **slow_route(0.6),
    }
    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=10, headers=H) as c:
            url = server.url + "/api/v1/chat"
            first = asyncio.create_task(c.post(url, json=chat("a b", "slow", max_tokens=5)))
            await asyncio.sleep(0.2)
            r = await c.post(url, json=chat("a b", "slow", max_tokens=50))
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            a = await first
            assert a.status_code == 200
            r = await c.post(url, json=chat("hi", max_tokens=10))
            assert r.status_code == 200
            if quota == "requests_per_day":
                assert r.headers["x-quota-remaining"] == str(1000 - 2)
            else:
                spent = a.json()["usage"]["total_tokens"]
                assert r.headers["x-quota-remaining"] == str(1000 - spent - 10)


async def test_a_client_that_leaves_is_charged_for_the_day_what_was_made() -> None:
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    fake = FakeOpenAI()
    with serve(fake.app) as up:
        config = burst_config(up)
        config["auth"]["keys"]["alice"] = {"sha256": sha(KEY), "tokens_per_day": 1700}
        with run_stella(config) as server:
            rid = await read_burst(server.url, leave=True)
            ev = await asyncio.to_thread(server.wait_event, lambda e: e["request_id"] == rid)
            assert ev["finish_reason"] == "client_closed"
            # The prompt's 800 and the 40 tokens read, not the 900 reserved.
            r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi", max_tokens=10))
            assert r.status_code == 200, r.text
            assert r.headers["x-quota-remaining"] == str(1700 - 840 - 10)
            # A reservation past what is left (some 850) gets what is left.
            r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(max_tokens=900))
            assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0"


def test_embeddings_count_against_the_day_s_tokens() -> None:
    with run_stella(keyed(tokens_per_day=100)) as server:
        words = " ".join(["word"] * 30)
        r = httpx.post(
            server.url + "/api/v1/embed", headers=H, json={"model": "echo", "input": [words]}
        )
        assert r.status_code == 200, r.text
        read = r.json()["usage"]["prompt_tokens"]
        assert read > 0
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("hi", max_tokens=10))
        assert r.headers["x-quota-remaining"] == str(100 - read - 10)
        # What is left pays for an embed call's reservation; its usage (150 words) is
        # charged whole, and leaves the day in debt.
        many = {"model": "echo", "input": [words] * 5}
        r = httpx.post(server.url + "/api/v1/embed", headers=H, json=many)
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0"
        r = httpx.post(server.url + "/api/v1/embed", headers=H, json=many)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"


def test_a_model_s_daily_quota_holds_for_every_key() -> None:
    other = "sk-quota-other-0002"
    config = {
        "auth": {"keys": {"q": {"sha256": sha(KEY)}, "o": {"sha256": sha(other)}}},
        "limits": {"models": {"echo": {"requests_per_day": 3}}},
    }
    with run_stella(config) as server:
        codes = [
            httpx.post(
                server.url + "/api/v1/chat",
                headers={"Authorization": f"Bearer {k}"},
                json=chat(),
            )
            for k in (KEY, other, KEY, other)
        ]
        assert [r.status_code for r in codes] == [200, 200, 200, 429]
        assert (
            codes[-1]
            .json()["error"]["message"]
            .startswith("daily quota of 3 requests used up for model echo")
        )


def test_limits_defaults_give_every_key_its_daily_quota() -> None:
    config = {**keyed(), "limits": {"requests_per_day": 1}}
    with run_stella(config) as server:
        assert httpx.post(server.url + "/api/v1/chat", headers=H, json=chat()).status_code == 200
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat())
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"


# --- the day's turn: the store's clock, set by the test ----------------------------


@asynccontextmanager
async def app_at(
    config: dict[str, Any], clock: list[float]
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, httpx.ASGITransport]]:
    """The app in this process, its state store's clock reading `clock[0]` (the clock
    that names usage days and quota days): a client for it, its services, and the
    transport that reaches it."""
    from stella.app import create_app
    from stella.settings import load_settings

    application = create_app(load_settings(merge(NO_MLX, config), environ={}))
    svc = application.services  # type: ignore[attr-defined]
    svc.state.wall = lambda: clock[0]
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=H
        ) as c:
            yield c, svc, transport


def test_a_daily_quota_changed_during_the_day_keeps_what_the_day_counted() -> None:
    from stella.limits import MemoryBuckets

    # A key's update changes its quota while the day's bucket holds what is left of the
    # old one: the count is what stays, in this process as in Redis (test_redis.py).
    buckets = MemoryBuckets()
    key = "tpd:key:k:2030-01-01"
    (take,) = buckets.take([(key, 1000.0, 0.0, 300.0)])
    assert take.allowed and take.remaining == 700.0
    buckets.give(key, 2000.0, 0.0, 50.0)  # raised, then settled: 250 counted
    (take,) = buckets.take([(key, 2000.0, 0.0, 100.0)])
    assert take.allowed and take.remaining == 1650.0
    (take,) = buckets.take([(key, 300.0, 0.0, 1.0)])  # lowered under the day's 350
    assert not take.allowed and take.remaining == -50.0
    # A per-minute bucket still refills to its capacity, whatever it was.
    (take,) = buckets.take([("tpm:key:k", 1000.0, 1000 / 60, 900.0)])
    (take,) = buckets.take([("tpm:key:k", 100.0, 100 / 60, 1.0)])
    assert take.allowed and take.remaining < 100.0


async def test_the_quota_renews_at_utc_midnight() -> None:
    clock = [MIDNIGHT - 30.0]
    async with app_at(keyed(requests_per_day=1, tokens_per_day=500), clock) as (c, svc, _):
        r = await c.post("/api/v1/chat", json=chat(max_tokens=5))
        assert r.status_code == 200 and r.headers["x-quota-reset"] == "30"
        r = await c.post("/api/v1/chat", json=chat(max_tokens=5))
        assert r.status_code == 429
        assert r.headers["retry-after"] == "30" and r.headers["x-quota-reset"] == "30"
        assert "in 30 s" in r.json()["error"]["message"]
        clock[0] = MIDNIGHT - 0.5
        r = await c.post("/api/v1/chat", json=chat(max_tokens=5))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        clock[0] = MIDNIGHT
        r = await c.post("/api/v1/chat", json=chat(max_tokens=5))
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-remaining"] == "0"  # the new day's one request
        assert r.headers["x-quota-reset"] == "86400"
        # The days before yesterday are gone from memory: a process does not grow daily.
        clock[0] = MIDNIGHT + 2 * 86_400
        assert (await c.post("/api/v1/chat", json=chat(max_tokens=5))).status_code == 200
        levels = svc.pipeline.admission.buckets._levels
        days = {k.rsplit(":", 1)[1] for k in levels if k.startswith(("rpd:", "tpd:"))}
        assert days == {"2030-01-04"}


async def test_a_call_that_ends_after_midnight_settles_into_the_day_it_was_admitted() -> None:
    clock = [MIDNIGHT - 10.0]
    config = {
        **keyed(tokens_per_day=1000),
        **slow_route(0.3),
    }
    async with app_at(config, clock) as (c, svc, _):
        # Reserves 800 and its prompt of the old day, and ends in the new one.
        slow = asyncio.create_task(c.post("/api/v1/chat", json=chat("a b", "slow", max_tokens=800)))
        await asyncio.sleep(0.1)
        clock[0] = MIDNIGHT + 1
        r = await slow
        assert r.status_code == 200
        used = r.json()["usage"]["total_tokens"]
        r = await c.post("/api/v1/chat", json=chat("hi", max_tokens=10))
        # The new day's bucket is whole but for this call's reserve.
        assert r.headers["x-quota-remaining"] == str(1000 - 10)
        # The old call's refund went to the day its reserve was taken from: that day is
        # charged its real usage, not the reserve.
        levels = svc.pipeline.admission.buckets._levels
        assert levels["tpd:key:q:2030-01-01"][0] == 1000 - used


async def test_the_python_client_does_not_retry_a_used_up_quota() -> None:
    from stella.client import AsyncClient, QuotaExceededError, RateLimitError

    clock = [MIDNIGHT - 5.0]
    async with app_at(keyed(requests_per_day=1), clock) as (_, _, transport):
        retries: list[float] = []

        def on_retry(exc: Exception, wait: float) -> None:
            retries.append(wait)

        async with AsyncClient(
            "http://127.0.0.1", KEY, max_retries=3, on_retry=on_retry, transport=transport
        ) as client:
            await client.chat([{"role": "user", "content": "hi"}], model="echo")
            started = time.monotonic()
            with pytest.raises(QuotaExceededError) as info:
                await client.chat([{"role": "user", "content": "hi"}], model="echo")
        # A Retry-After of 5 s (under the client's 60 s cap) is still not waited for.
        assert retries == [] and time.monotonic() - started < 2
        err = info.value
        assert isinstance(err, RateLimitError)  # a rate-limit handler still catches it
        assert err.code == "quota_exceeded" and err.retry_after == 5 and not err.retryable


def test_a_fallback_s_used_up_quota_does_not_hold_the_chain_back_till_midnight() -> None:
    config = {
        **keyed(),
        "backends": {"bad": {"kind": "echo", "fail_before_first": True}},
        "models": {
            "routes": {
                "prim": {"backend": "bad", "fallbacks": ["echo"], "retries": 0},
                "solo": {"backend": "bad", "retries": 0},
            }
        },
        "limits": {"models": {"echo": {"requests_per_day": 1}}},
        "breaker": {"failure_threshold": 0},
    }
    with run_stella(config) as server:
        solo = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(model="solo"))
        assert solo.status_code == 502
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(model="prim"))
        assert r.status_code == 200  # the fallback's one request of the day
        r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat(model="prim"))
        # The first route's passing failure is the answer, as without the fallback: a
        # retry may pass in a moment, not only after midnight.
        assert r.status_code == 502 and r.json()["error"]["retryable"] is True
        assert r.headers.get("retry-after") == solo.headers.get("retry-after")
        assert r.headers["x-should-retry"] == "true"
        ev = server.wait_event(lambda e: e.get("model") == "prim" and e["status"] == 502)
        assert [a["error"] for a in ev["attempts"]][-1] == "quota_exceeded"


def test_an_upstream_s_used_up_quota_is_not_asked_again() -> None:
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    fake = FakeOpenAI()
    with run_stella(keyed(requests_per_day=1)) as inner, serve(fake.app) as up:
        assert httpx.post(inner.url + "/api/v1/chat", headers=H, json=chat()).status_code == 200
        config = {
            "backends": {
                "inner": {"kind": "openai", "base_url": inner.url + "/v1", "api_key_env": "QK"},
                "openai": {"kind": "openai", "base_url": up + "/v1"},
            },
            "models": {
                "routes": {
                    # A stella behind a stella (its 429 quota_exceeded says x-should-retry:
                    # false), and OpenAI's own used-up quota (insufficient_quota).
                    "behind": {"backend": "inner", "upstream_model": "echo"},
                    "broke": {"backend": "openai", "upstream_model": "no-quota"},
                }
            },
        }
        with run_stella(config, env={"QK": KEY}) as outer:
            for model in ("behind", "broke"):
                r = httpx.post(outer.url + "/api/v1/chat", json=chat(model=model))
                assert r.status_code == 502, r.text
                err = r.json()["error"]
                assert err["code"] == "upstream_rate_limited" and err["retryable"] is False
                # Not told to come back at the upstream quota's midnight, nor at all.
                assert "retry-after" not in r.headers, r.headers
                assert r.headers["x-should-retry"] == "false"
                ev = outer.wait_event(lambda e, m=model: e.get("model") == m)
                assert len(ev["attempts"]) == 1, ev["attempts"]  # not asked again
        assert [b.get("model") for b in fake.requests] == ["no-quota"]


async def test_a_limit_of_one_is_named_in_the_singular() -> None:
    config = {
        **keyed(max_concurrent=1),
        "limits": {"queue_timeout_s": 0.1},
        **slow_route(0.5),
    }
    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=10, headers=H) as c:
            url = server.url + "/api/v1/chat"
            first = asyncio.create_task(c.post(url, json=chat("a", "slow")))
            await asyncio.sleep(0.2)
            r = await c.post(url, json=chat("a"))
            assert r.json()["error"]["message"] == "key q already has 1 request running"
            assert (await first).status_code == 200

    def refusal(config: dict) -> str:
        with run_stella(config) as server:
            for _ in range(2):
                r = httpx.post(server.url + "/api/v1/chat", headers=H, json=chat("a", max_tokens=1))
            assert r.status_code == 429
            return str(r.json()["error"]["message"])

    assert refusal(keyed(requests_per_day=1)).startswith(
        "daily quota of 1 request used up for key q (0 left)"
    )
    assert refusal(keyed(tokens_per_minute=1)).startswith(
        "rate limit of 1 token per minute reached for key q"
    )
    by_model = {**keyed(), "limits": {"models": {"echo": {"requests_per_minute": 1}}}}
    assert refusal(by_model).startswith("rate limit of 1 request per minute reached for model echo")
