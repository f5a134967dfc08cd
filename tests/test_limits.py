"""Rate limits and concurrency limits, in one process (memory buckets)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import pytest

from tests.live import ndjson, run_stella

KEY = "sk-limits-test-0001"

# The client of the plain calls below: httpx.post() and its kin build a client, with its
# TLS context (some 50 ms of CPU), for every call, and these tests make hundreds. None
# keeps a connection between calls, as those functions do not.
http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def body(text: str = "one two three", **options: object) -> dict:
    return {
        "model": "echo",
        "stream": False,
        "messages": [{"role": "user", "content": text}],
        "options": options,
    }


def test_tokens_per_minute_reserve_then_settle() -> None:
    config = {"auth": {"keys": {"t": {"sha256": sha(KEY), "tokens_per_minute": 100}}}}
    with run_stella(config) as server:
        h = {"Authorization": f"Bearer {KEY}"}
        # Each call reserves 60 tokens but uses 6: settling refunds 54, so many fit.
        for _ in range(5):
            r = http.post(server.url + "/api/v1/chat", headers=h, json=body(max_tokens=60))
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-limit"] == "100"
        # A reservation over what is left is refused with the token limit named.
        r = http.post(server.url + "/api/v1/chat", headers=h, json=body(max_tokens=100))
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]


def test_tool_definitions_are_reserved_as_part_of_the_prompt() -> None:
    # The model reads the tools as prompt: large ones reserve their four characters a
    # token, where only the messages counted and such a request passed as a short one.
    params = {"type": "object", "properties": {"q": {"type": "string", "description": "y" * 2000}}}
    tool = {"type": "function", "function": {"name": "find", "description": "x" * 4000}}
    tool["function"]["parameters"] = params
    compact = json.dumps(params, separators=(",", ":"))
    estimate = (len("hi") + len("find") + 4000 + len(compact)) // 4
    other = "sk-limits-test-0002"
    keys = {
        "t": {"sha256": sha(KEY), "tokens_per_minute": 100_000},
        "u": {"sha256": sha(other), "tokens_per_minute": 100_000},
    }
    with run_stella({"auth": {"keys": keys}}) as server:
        plain = body("hi", max_tokens=10)
        r = http.post(server.url + "/api/v1/chat", headers={"X-API-Key": KEY}, json=plain)
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == str(100_000 - 10)
        # Each key's bucket starts full: what is left is the reservation, read at admission.
        r = http.post(
            server.url + "/api/v1/chat",
            headers={"X-API-Key": other},
            json={**plain, "tools": [tool]},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining"] == str(100_000 - 10 - estimate)


def test_a_refusal_s_headers_describe_the_limit_that_refused() -> None:
    config = {
        "auth": {
            "keys": {"t": {"sha256": sha(KEY), "requests_per_minute": 30, "tokens_per_minute": 200}}
        }
    }
    with run_stella(config) as server:
        h = {"Authorization": f"Bearer {KEY}"}
        # max_tokens over the bucket reserves all of it: the second call finds it short.
        r = http.post(server.url + "/api/v1/chat", headers=h, json=body(max_tokens=300))
        assert r.status_code == 200 and r.headers["x-ratelimit-limit"] == "30"
        r = http.post(server.url + "/api/v1/chat", headers=h, json=body(max_tokens=300))
        assert r.status_code == 429 and "200 tokens per minute" in r.json()["error"]["message"]
        assert r.headers["x-ratelimit-limit"] == "200"  # not the requests' 30, with room left
        assert int(r.headers["x-ratelimit-remaining"]) < 200
        assert int(r.headers["retry-after"]) >= 1


async def test_retry_after_waits_for_every_limit_that_refused() -> None:
    # The key's tokens come back in seconds, the model's one request a minute in 60: a
    # client that waits the key's time only would be refused again by the model.
    config = {
        "auth": {"keys": {"t": {"sha256": sha(KEY), "tokens_per_minute": 60}}},
        "limits": {"models": {"slow": {"requests_per_minute": 1}}},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.5}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
    }
    h = {"Authorization": f"Bearer {KEY}"}

    def slow(max_tokens: int) -> dict:
        return {**body("a b", max_tokens=max_tokens), "model": "slow"}

    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=10, headers=h) as c:
            # Holds the key's whole token reserve and the model's request while it runs.
            first = asyncio.create_task(c.post(server.url + "/api/v1/chat", json=slow(100)))
            await asyncio.sleep(0.3)
            r = await c.post(server.url + "/api/v1/chat", json=slow(5))
            assert r.status_code == 429, r.text
            # The headers and message name the first limit that refused (the key's).
            assert "tokens per minute reached for key t" in r.json()["error"]["message"]
            assert r.headers["x-ratelimit-limit"] == "60"
            assert int(r.headers["retry-after"]) >= 59
            assert (await first).status_code == 200


async def test_a_call_refused_for_want_of_a_slot_costs_no_request() -> None:
    config = {
        "auth": {"keys": {"t": {"sha256": sha(KEY), "requests_per_minute": 5}}},
        "limits": {"max_concurrent": 1, "queue_timeout_s": 0.2},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.3}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
    }
    h = {"Authorization": f"Bearer {KEY}"}
    slow = {"model": "slow", "stream": False, "messages": [{"role": "user", "content": "a b c"}]}
    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=10, headers=h) as c:
            first = asyncio.create_task(c.post(server.url + "/api/v1/chat", json=slow))
            await asyncio.sleep(0.1)
            for _ in range(3):
                r = await c.post(server.url + "/api/v1/chat", json=body())
                assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert (await first).status_code == 200
            # Five a minute, one used: the three refusals gave theirs back.
            codes = [(await c.post(server.url + "/api/v1/chat", json=body())).status_code]
            codes += [(await c.post(server.url + "/api/v1/chat", json=body())).status_code]
            codes += [(await c.post(server.url + "/api/v1/chat", json=body())).status_code]
            codes += [(await c.post(server.url + "/api/v1/chat", json=body())).status_code]
            assert codes == [200, 200, 200, 200]


def test_per_model_requests_per_minute() -> None:
    config = {"limits": {"models": {"echo": {"requests_per_minute": 3}}}}
    with run_stella(config) as server:
        codes = [http.post(server.url + "/api/v1/chat", json=body()).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        r = http.post(server.url + "/api/v1/chat", json=body())
        assert "model echo" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining"] == "0"


async def test_concurrency_queue_then_overloaded() -> None:
    config = {
        "limits": {"max_concurrent": 1, "queue_timeout_s": 0.3},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
    }
    with run_stella(config) as server:
        slow = {
            "model": "slow",
            "stream": False,
            "messages": [{"role": "user", "content": "a b c d e"}],
        }
        async with httpx.AsyncClient(timeout=10) as c:
            first = asyncio.create_task(c.post(server.url + "/api/v1/chat", json=slow))
            await asyncio.sleep(0.1)
            second = await c.post(server.url + "/api/v1/chat", json=body())
            assert second.status_code == 503
            assert second.json()["error"]["code"] == "overloaded"
            assert (await first).status_code == 200
            third = await c.post(server.url + "/api/v1/chat", json=body())
            assert third.status_code == 200  # the slot came back


async def test_per_backend_concurrency() -> None:
    config = {
        "limits": {"backends": {"slow": 1}, "queue_timeout_s": 0.3},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {"routes": {"slow": {"backend": "slow"}, "slow-too": {"backend": "slow"}}},
    }
    with run_stella(config) as server:
        slow = {
            "model": "slow",
            "stream": False,
            "messages": [{"role": "user", "content": "a b c d e"}],
        }
        async with httpx.AsyncClient(timeout=10) as c:
            first = asyncio.create_task(c.post(server.url + "/api/v1/chat", json=slow))
            await asyncio.sleep(0.1)
            other_route = await c.post(
                server.url + "/api/v1/chat", json={**slow, "model": "slow-too"}
            )
            assert other_route.status_code == 503
            assert "backend slow" in other_route.json()["error"]["message"]
            assert (await c.post(server.url + "/api/v1/chat", json=body())).status_code == 200
            assert (await first).status_code == 200


async def one_wait_for_every_slot(extra: dict[str, object]) -> None:
    """A call that waits for its key's slot, then finds its backend's full, is refused
    once queue_timeout_s has passed since it began to wait: not that again per slot
    (`extra`: more config, e.g. Redis for shared slots)."""
    user = "sk-limits-queue-user-01"
    config = {
        **extra,
        "auth": {"keys": {"u": {"sha256": sha(user), "max_concurrent": 1}}},
        "limits": {"backends": {"held": 1}, "queue_timeout_s": 1.0},
        "backends": {
            "held": {"kind": "echo", "delay_s": 0.2},
            "free": {"kind": "echo", "delay_s": 0.2},
        },
        "models": {"routes": {"held": {"backend": "held"}, "free": {"backend": "free"}}},
    }

    def call(key: str, model: str, words: int) -> dict:
        return {
            "json": {**body(" ".join(["w"] * words)), "model": model},
            "headers": {"Authorization": f"Bearer {key}"},
        }

    with run_stella(config, {"STELLA_API_KEYS": f"admin={KEY}"}) as server:
        url = server.url + "/api/v1/chat"
        async with httpx.AsyncClient(timeout=30) as c:
            # The admin's call holds the backend's one slot for ~2 s (past the refusal's
            # ~1.1 s, with a margin for a loaded machine); the key's first call holds the
            # key's one slot for ~0.8 s, on another backend.
            holders = [
                asyncio.create_task(c.post(url, **call(KEY, "held", 10))),
                asyncio.create_task(c.post(url, **call(user, "free", 4))),
            ]
            try:
                await asyncio.sleep(0.1)
                started = time.monotonic()
                r = await c.post(url, **call(user, "held", 1))
                waited = time.monotonic() - started
            finally:
                held = await asyncio.gather(*holders)
    assert [h.status_code for h in held] == [200, 200]
    assert r.status_code == 503, r.text
    # It got the key's slot (~0.7 s) and was refused for the backend's.
    assert "backend held" in r.json()["error"]["message"], r.text
    # One queue_timeout_s in all (1.7 s when each slot had its own).
    assert 0.9 <= waited < 1.4, waited


async def test_a_wait_for_several_slots_is_one_queue_timeout() -> None:
    await one_wait_for_every_slot({})


async def test_a_wait_for_a_slot_counts_as_queue_time_not_against_the_limits() -> None:
    # The queued call waits ~0.55 s for the slot, then needs ~0.6 s of its own: within
    # its 1 s total limit, which runs from admission, not from the start of the wait.
    config = {
        "limits": {"backends": {"slow": 1}, "queue_timeout_s": 5},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {"routes": {"slow": {"backend": "slow", "total_timeout_s": 1}}},
    }
    slow = {"model": "slow", "stream": False, "messages": [{"role": "user", "content": "a b c"}]}
    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=10) as c:
            first = asyncio.create_task(c.post(server.url + "/api/v1/chat", json=slow))
            await asyncio.sleep(0.05)
            second = await c.post(server.url + "/api/v1/chat", json=slow)
            assert (await first).status_code == 200
        assert second.status_code == 200, second.text
        timings = second.json()["timings"]
        # The wait is queue time, inside ttft and total.
        assert timings["queue_ms"] >= 400, timings
        assert timings["total_ms"] >= timings["ttft_ms"] >= timings["queue_ms"], timings
        rid = second.json()["id"]
        event = server.wait_event(lambda e: e["request_id"] == rid)
        assert event["queue_ms"] >= 300 and event["total_ms"] >= event["queue_ms"]


def test_tokens_a_fallback_made_count_for_its_model_not_the_one_asked_for() -> None:
    # "primary" never answers, "echo" does: each call's 80 tokens are echo's, and the
    # primary model's 200 tokens a minute stay whole however many calls there are.
    config = {
        "backends": {"down": {"kind": "echo", "fail_before_first": True}},
        "models": {"routes": {"primary": {"backend": "down", "retries": 0, "fallbacks": ["echo"]}}},
        "limits": {"models": {"primary": {"tokens_per_minute": 200}}},
    }
    ask = body("abc " * 40, max_tokens=50)
    ask["model"] = "primary"
    with run_stella(config) as server:
        for _ in range(5):
            r = http.post(server.url + "/api/v1/chat", json=ask)
            assert r.status_code == 200, r.text
            assert r.json()["backend"] == "echo" and r.json()["usage"]["total_tokens"] == 80


def test_tokens_the_asked_model_made_before_failing_count_for_it() -> None:
    # "primary" makes 40 tokens, then fails; "second" answers with 1. The 40 count for
    # primary's 150 tokens a minute (its fourth call is refused), not for second's.
    config = {
        "backends": {
            "dies": {"kind": "echo", "fail_after": 40, "reply": "word " * 100},
            "short": {"kind": "echo", "reply": "ok"},
        },
        "models": {
            "routes": {
                "primary": {"backend": "dies", "retries": 0, "fallbacks": ["second"]},
                "second": {"backend": "short"},
            }
        },
        "limits": {
            "models": {"primary": {"tokens_per_minute": 150}, "second": {"tokens_per_minute": 300}}
        },
    }
    ask = body("hi", max_tokens=60)
    ask["model"] = "primary"
    with run_stella(config) as server:
        codes = []
        for _ in range(4):
            r = http.post(server.url + "/api/v1/chat", json=ask)
            codes.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["backend"] == "short"
        assert codes == [200, 200, 200, 429], codes
        assert "model primary" in r.json()["error"]["message"]


def test_a_fallback_holds_to_the_keys_scope_and_its_own_limits() -> None:
    # A failing route's fallbacks are models like any other: a key reaches only those
    # in its scope, and each counts against its own model's limits.
    narrow = "sk-limits-narrow-01"
    config = {
        "auth": {"keys": {"narrow": {"sha256": sha(narrow), "models": ["echo", "cheap"]}}},
        "backends": {
            "down": {"kind": "echo", "fail_before_first": True},
            "premium": {"kind": "echo", "reply": "premium answer"},
        },
        "models": {
            "routes": {
                "cheap": {"backend": "down", "retries": 0, "fallbacks": ["premium-model", "echo"]},
                "premium-model": {"backend": "premium"},
            }
        },
        "limits": {"models": {"premium-model": {"requests_per_minute": 2}}},
        "breaker": {"failure_threshold": 0},
    }
    with run_stella(config, {"STELLA_API_KEYS": f"admin={KEY}"}) as server:

        def ask(key: str) -> dict:
            r = http.post(
                server.url + "/api/v1/chat",
                headers={"Authorization": f"Bearer {key}"},
                json={**body("hi"), "model": "cheap"},
            )
            assert r.status_code == 200, r.text
            return r.json()

        # Out of the narrow key's scope: premium-model is skipped, echo answers.
        answer = ask(narrow)
        assert (answer["backend"], answer["response"]) == ("echo", "hi")
        event = server.wait_event(lambda e: e["key"] == "narrow")
        assert [a["route"] for a in event["attempts"]] == ["cheap", "echo"]
        # In scope, premium-model answers until its own limit of 2 a minute is reached.
        answers = [ask(KEY)["backend"] for _ in range(4)]
        assert answers == ["premium", "premium", "echo", "echo"]
        event = server.wait_event(lambda e: e["key"] == "admin" and e["backend"] == "echo")
        assert [(a["route"], a["error"]) for a in event["attempts"]] == [
            ("cheap", "upstream_error"),
            ("premium-model", "rate_limited"),
            ("echo", None),
        ]


def test_a_direct_name_for_a_configured_route_is_that_route() -> None:
    # models.allow_direct: "backend/upstream" reaches any model of a backend, but a
    # name that is a configured route's keeps that route's limits.
    config = {
        "models": {"allow_direct": True, "routes": {"premium-model": {"backend": "premium"}}},
        "backends": {"premium": {"kind": "echo"}},
        "limits": {"models": {"premium-model": {"requests_per_minute": 2}}},
    }
    with run_stella(config) as server:
        codes = []
        for name in ("premium-model", "premium/premium-model", "premium/premium-model"):
            r = http.post(server.url + "/api/v1/chat", json={**body(), "model": name})
            codes.append(r.status_code)
        assert codes == [200, 200, 429]
        r = http.post(server.url + "/api/v1/chat", json={**body(), "model": "premium/other"})
        assert r.status_code == 200 and r.json()["model"] == "premium/other"


def test_a_fallback_on_the_same_backend_does_not_wait_for_its_own_slot() -> None:
    # The call holds the backend's one slot: its fallback to another route on the same
    # backend runs in it, rather than queue behind itself until queue_timeout_s.
    config = {
        "backends": {"e": {"kind": "echo", "fail_first_calls": 1}},
        "models": {
            "routes": {
                "a": {"backend": "e", "retries": 0, "fallbacks": ["b"]},
                "b": {"backend": "e"},
            }
        },
        "limits": {"backends": {"e": 1}, "queue_timeout_s": 1.0},
        "breaker": {"failure_threshold": 0},
    }
    with run_stella(config) as server:
        started = time.monotonic()
        r = http.post(server.url + "/api/v1/chat", json={**body("hi"), "model": "a"})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 0.5
        event = server.wait_event(lambda e: e["model"] == "a")
        assert [(a["route"], a["error"]) for a in event["attempts"]] == [
            ("a", "upstream_error"),
            ("b", None),
        ]


def test_a_direct_name_finds_the_route_the_key_may_use() -> None:
    cheap, direct_only = "sk-limits-cheap-01", "sk-limits-direct-01"
    config = {
        "auth": {
            "keys": {
                "cheap": {"sha256": sha(cheap), "models": ["cheap-m", "premium/*"]},
                "direct": {"sha256": sha(direct_only), "models": ["premium/*"]},
            }
        },
        "models": {
            "allow_direct": True,
            "routes": {
                "secret-premium": {"backend": "premium", "upstream_model": "m"},
                "cheap-m": {"backend": "premium", "upstream_model": "m"},
            },
        },
        "backends": {"premium": {"kind": "echo"}},
    }
    with run_stella(config, {"STELLA_API_KEYS": f"admin={KEY}"}) as server:

        def ask(key: str) -> httpx.Response:
            return http.post(
                server.url + "/api/v1/chat",
                headers={"Authorization": f"Bearer {key}"},
                json={**body(), "model": "premium/m"},
            )

        r = ask(cheap)
        assert r.status_code == 200 and r.json()["model"] == "cheap-m", r.text
        # Only routes it may not use have that model: no way around them, and no name.
        r = ask(direct_only)
        assert r.status_code == 403 and "secret-premium" not in r.text, r.text
        # Where listings hide what a key may not use, such a route is not there at all.
        hidden = {"Authorization": f"Bearer {direct_only}"}
        r = http.get(server.url + "/v1/models/premium/m", headers=hidden)
        assert r.status_code == 404, r.text
        r = http.post(server.url + "/api/show", headers=hidden, json={"model": "premium/m"})
        assert r.status_code == 404, r.text
        r = http.post(
            server.url + "/api/v1/chat",
            headers={"Authorization": f"Bearer {direct_only}"},
            json={**body(), "model": "premium/other"},
        )
        assert r.status_code == 200 and r.json()["model"] == "premium/other"
        r = http.post(
            server.url + "/api/v1/chat",
            headers={"Authorization": f"Bearer {direct_only}"},
            json={**body(), "model": "nope"},
        )
        assert r.status_code == 404 and "cheap-m" not in r.text, r.text


def fallback_on_a_busy_backend(**b: object) -> dict:
    """Route a fails at once and falls back to b, on a backend with one slot (which
    b-long can hold)."""
    return {
        "backends": {
            "down": {"kind": "echo", "fail_before_first": True},
            "slow": {"kind": "echo", "delay_s": 0.2},
        },
        "models": {
            "routes": {
                "a": {"backend": "down", "retries": 0, "fallbacks": ["b"]},
                "b": {"backend": "slow", **b},
                "b-long": {"backend": "slow"},
            }
        },
        "limits": {"backends": {"slow": 1}, "queue_timeout_s": 5.0},
        "breaker": {"failure_threshold": 0},
    }


@pytest.mark.parametrize("short", ["a", "b"])
async def test_a_fallbacks_wait_for_a_slot_ends_with_the_calls_time(short: str) -> None:
    # The fallback's backend is busy: its slot is waited for within the fallback's time,
    # not queue_timeout_s: its own total limit from its turn (b), within the request's,
    # which the asked route's total limit bounds (a).
    config = fallback_on_a_busy_backend()
    config["models"]["routes"][short]["total_timeout_s"] = 0.6
    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            busy = asyncio.create_task(
                client.post(
                    server.url + "/api/v1/chat",
                    json={**body(" ".join(["w"] * 10)), "model": "b-long"},
                )
            )
            # b's one slot is taken for ~2 s: well past the 0.6 s b may wait for it
            # (were it freed within them, b would answer), with a margin for a loaded
            # machine.
            await asyncio.sleep(0.3)
            started = time.monotonic()
            r = await client.post(server.url + "/api/v1/chat", json={**body("hi"), "model": "a"})
            waited = time.monotonic() - started
            assert r.status_code == 502, r.text
            assert waited < 1.5, waited  # not the 5 s queue_timeout_s
            event = server.wait_event(lambda e: e["model"] == "a")
            assert [(a["route"], a["error"]) for a in event["attempts"]] == [
                ("a", "upstream_error"),
                ("b", "overloaded"),
            ]
            assert (await busy).status_code == 200


async def test_a_fallbacks_wait_for_a_slot_counts_as_queueing() -> None:
    # The wait for a fallback's backend slot is queueing, reported in queue_ms as the
    # wait for the first route's slot is.
    with run_stella(fallback_on_a_busy_backend()) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            busy = asyncio.create_task(
                client.post(server.url + "/api/v1/chat", json={**body("w w w"), "model": "b"})
            )
            await asyncio.sleep(0.2)  # b's one slot is taken for ~0.4 s more
            r = await client.post(server.url + "/api/v1/chat", json={**body("hi"), "model": "a"})
            assert r.status_code == 200, r.text
            assert r.json()["backend"] == "slow"
            queued = r.json()["timings"]["queue_ms"]
            assert 200 <= queued <= r.json()["timings"]["total_ms"], r.json()["timings"]
            event = server.wait_event(lambda e: e["model"] == "a")
            assert event["queue_ms"] == queued
            assert (await busy).status_code == 200


def test_a_call_that_fails_after_admission_still_shows_its_rate_limits() -> None:
    # It counted against the limits: its error says how much is left, as a success does.
    config = {
        "backends": {"down": {"kind": "echo", "fail_before_first": True}},
        "models": {"routes": {"bad": {"backend": "down", "retries": 0}}},
        "limits": {"models": {"bad": {"requests_per_minute": 10}}},
        "breaker": {"failure_threshold": 0},
    }
    with run_stella(config) as server:
        r = http.post(server.url + "/api/v1/chat", json={**body(), "model": "bad"})
        assert r.status_code == 502 and r.headers["x-ratelimit-limit"] == "10", r.headers
        assert r.headers["x-ratelimit-remaining"] == "9"
        held = {"model": "bad", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        r = http.post(server.url + "/v1/chat/completions", json=held)
        assert r.status_code == 502 and r.headers["x-ratelimit-remaining"] == "8", r.headers


def fallback_to_another_backend(**breaker: object) -> dict:
    """Route a's backend (one slot) fails; its fallback b runs on another backend."""
    return {
        "backends": {
            "first": {"kind": "echo", "fail_before_first": True},
            "other": {"kind": "echo", "delay_s": 0.3},
        },
        "models": {
            "routes": {
                "a": {"backend": "first", "retries": 0, "fallbacks": ["b"]},
                "b": {"backend": "other"},
            }
        },
        "limits": {"backends": {"first": 1}, "queue_timeout_s": 0.5},
        "breaker": breaker,
    }


async def test_a_call_served_by_a_fallback_elsewhere_gives_its_first_backend_s_slot_back() -> None:
    # Each call fails on `first` at once and is answered by `other` in about 0.9 s: it
    # must not hold `first`'s one slot all that time, so none waits for it in vain.
    with run_stella(fallback_to_another_backend(failure_threshold=0)) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            calls = [
                client.post(server.url + "/api/v1/chat", json={**body("x y z"), "model": "a"})
                for _ in range(3)
            ]
            answers = await asyncio.gather(*calls)
        assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
        assert {r.json()["backend"] for r in answers} == {"other"}


async def test_a_route_whose_circuit_is_open_takes_no_slot_of_its_backend() -> None:
    # `first` fails once (its circuit opens), then its probe (route direct, on `first`)
    # holds the one slot of `first` for about 1.8 s. Calls to a meanwhile go to b at
    # once: `first`'s circuit is not available, so they neither wait for nor take its slot.
    config = fallback_to_another_backend(failure_threshold=1, cooldown_s=0.3)
    config["backends"]["first"] = {"kind": "echo", "fail_first_calls": 1, "delay_s": 0.3}
    config["models"]["routes"]["direct"] = {"backend": "first"}
    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            url = server.url + "/api/v1/chat"
            r = await client.post(url, json={**body("x"), "model": "a"})
            assert r.status_code == 200 and r.json()["backend"] == "other", r.text
            await asyncio.sleep(0.4)  # the cool-down has passed: the next call probes
            probe = asyncio.create_task(
                client.post(url, json={**body("p q r s t u"), "model": "direct"})
            )
            await asyncio.sleep(0.2)
            answers = await asyncio.gather(
                *(client.post(url, json={**body("x y z"), "model": "a"}) for _ in range(2))
            )
            assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
            assert (await probe).status_code == 200
        event = server.wait_event(lambda e: e["request_id"] == answers[0].json()["id"])
        assert [(a["route"], a["error"]) for a in event["attempts"]] == [
            ("a", "circuit_open"),
            ("b", None),
        ]


ADMIN = "sk-limits-admin-0001"


def burst_config(fake_url: str, **route: object) -> dict:
    """Route `burst` to the fake OpenAI upstream's `burst` model, alice at 1,000 tokens a
    minute, an admin key to read the usage report."""
    return {
        "auth": {
            "keys": {
                "alice": {"sha256": sha(KEY), "tokens_per_minute": 1000},
                "root": {"sha256": sha(ADMIN), "admin": True},
            }
        },
        "backends": {"fake": {"kind": "openai", "base_url": fake_url + "/v1"}},
        "models": {
            "routes": {
                "burst": {"backend": "fake", "upstream_model": "burst", "retries": 0, **route}
            }
        },
    }


# 3,200 characters: 800 tokens at admission's four characters a token.
BURST = {
    "model": "burst",
    "stream": True,
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "x" * 3200}],
}


async def read_burst(url: str, leave: bool) -> str:
    """Stream BURST through the OpenAI dialect; leave after its 40 tokens when `leave`,
    else read to the end. The request's id."""
    async with httpx.AsyncClient(timeout=20) as c:
        h = {"Authorization": f"Bearer {KEY}"}
        async with c.stream("POST", url + "/v1/chat/completions", json=BURST, headers=h) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            seen = 0
            async for line in r.aiter_lines():
                seen += line.count(" t")
                if leave and seen >= 40:
                    break
    return rid


async def test_a_stream_cut_short_is_charged_its_prompt_and_every_token_read() -> None:
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    fake = FakeOpenAI()
    with serve(fake.app) as up, run_stella(burst_config(up)) as server:
        rid = await read_burst(server.url, leave=True)
        ev = await asyncio.to_thread(server.wait_event, lambda e: e["request_id"] == rid)
        # Forty tokens came in one network read (one delta to the client), and the usage
        # never came: the log has the forty, and the prompt's estimate, marked as such.
        assert ev["finish_reason"] == "client_closed"
        assert (ev["prompt_tokens"], ev["completion_tokens"]) == (800, 40)
        assert ev["usage_estimated"] is True
        # The key was charged 840 of its 1,000: another 900-token reservation is refused.
        h = {"Authorization": f"Bearer {KEY}"}
        r = http.post(server.url + "/v1/chat/completions", json=BURST, headers=h)
        assert r.status_code == 429 and "tokens per minute" in r.text
        admin = {"Authorization": f"Bearer {ADMIN}"}
        rows = http.get(server.url + "/api/v1/usage", headers=admin).json()["usage"]
        row = next(r for r in rows if r["key"] == "alice")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (800, 40)
        metrics = http.get(server.url + "/metrics", headers=admin).text
        prompt = [
            line.rsplit(" ", 1)[1]
            for line in metrics.splitlines()
            if line.startswith("stella_tokens_total{")
            and 'model="burst"' in line
            and 'kind="prompt"' in line
        ]
        assert prompt and float(prompt[0]) == 800


async def test_a_stream_that_goes_silent_is_charged_its_prompt_and_every_token_read() -> None:
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    fake = FakeOpenAI()
    with serve(fake.app) as up, run_stella(burst_config(up, idle_timeout_s=1)) as server:
        rid = await read_burst(server.url, leave=False)
        ev = await asyncio.to_thread(server.wait_event, lambda e: e["request_id"] == rid)
        assert ev["error_code"] == "upstream_timeout"
        assert (ev["prompt_tokens"], ev["completion_tokens"]) == (800, 40)
        assert ev["usage_estimated"] is True


def test_usage_the_backend_reports_is_not_marked_estimated() -> None:
    config = {"auth": {"keys": {"t": {"sha256": sha(KEY), "tokens_per_minute": 1000}}}}
    with run_stella(config) as server:
        h = {"Authorization": f"Bearer {KEY}"}
        r = http.post(server.url + "/api/v1/chat", headers=h, json=body())
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert ev["prompt_tokens"] == 3 and "usage_estimated" not in ev


def refusing_config(urls: dict[str, str]) -> dict:
    """One route per upstream kind whose 200 holds only an error, for alice at 200 tokens
    a minute; an admin key to read the usage report."""
    return {
        "auth": {
            "keys": {
                "alice": {"sha256": sha(KEY), "tokens_per_minute": 200},
                "root": {"sha256": sha(ADMIN), "admin": True},
            }
        },
        "backends": {
            "claude": {"kind": "anthropic", "base_url": urls["anthropic"], "api_key_env": "CK"},
            "oai": {"kind": "openai", "base_url": urls["openai"] + "/v1"},
            "box": {"kind": "ollama", "base_url": urls["ollama"]},
        },
        "models": {
            "routes": {
                name: {"backend": backend, "upstream_model": upstream, "retries": 0}
                for name, backend, upstream in (
                    ("claude-overloaded", "claude", "claude-error-first"),
                    ("claude-api-error", "claude", "claude-api-error-first"),
                    ("openai-error", "oai", "error-first"),
                    ("ollama-error", "box", "error-first"),
                )
            }
        },
    }


def test_an_upstream_that_refuses_before_answering_is_not_charged_the_prompt() -> None:
    from tests.fakes.anthropic import KEY as CLAUDE_KEY
    from tests.fakes.anthropic import FakeAnthropic
    from tests.fakes.ollama import FakeOllama
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    with (
        serve(FakeAnthropic().app) as claude,
        serve(FakeOpenAI().app) as oai,
        serve(FakeOllama().app) as box,
    ):
        urls = {"anthropic": claude, "openai": oai, "ollama": box}
        with run_stella(refusing_config(urls), env={"CK": CLAUDE_KEY}) as server:
            h = {"Authorization": f"Bearer {KEY}"}
            for model in ("claude-overloaded", "claude-api-error", "openai-error", "ollama-error"):
                # 100 prompt tokens at admission's estimate and 100 reserved to answer:
                # the whole of alice's 200, given back when the refusal is settled.
                ask = {
                    "model": model,
                    "stream": True,
                    "options": {"max_tokens": 100},
                    "messages": [{"role": "user", "content": "y" * 400}],
                }
                for _ in range(2):  # the second finds the bucket full again
                    r = http.post(server.url + "/api/v1/chat", headers=h, json=ask)
                    assert r.status_code == 200, (model, r.text)
                    assert ndjson(r.text)[-1]["type"] == "error", model
                    rid = r.headers["x-request-id"]
                    ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
                    assert ev["error_code"] is not None, model
                    assert (ev["prompt_tokens"], ev["completion_tokens"]) == (0, 0), model
                    assert "usage_estimated" not in ev, model
            admin = {"Authorization": f"Bearer {ADMIN}"}
            rows = http.get(server.url + "/api/v1/usage", headers=admin).json()["usage"]
            alice = [row for row in rows if row["key"] == "alice"]
            assert alice and all(row["prompt_tokens"] == 0 for row in alice)


def test_a_prompt_read_by_an_attempt_answered_again_is_charged() -> None:
    # A non-stream call whose first attempt made two tokens, then failed, and whose
    # fallback failed before any output: the first upstream read the prompt.
    from tests.fakes.ollama import FakeOllama
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    with serve(FakeOpenAI().app) as oai, serve(FakeOllama().app) as box:
        config = {
            "backends": {
                "oai": {"kind": "openai", "base_url": oai + "/v1"},
                "box": {"kind": "ollama", "base_url": box},
            },
            "models": {
                "routes": {
                    "mid": {
                        "backend": "box",
                        "upstream_model": "error-mid",
                        "retries": 0,
                        "fallbacks": ["down"],
                    },
                    "down": {"backend": "oai", "upstream_model": "status-500", "retries": 0},
                }
            },
        }
        with run_stella(config) as server:
            ask = {
                "model": "mid",
                "stream": False,
                "messages": [{"role": "user", "content": "y" * 400}],
            }
            r = http.post(server.url + "/api/v1/chat", json=ask)
            assert r.status_code == 502, r.text
            rid = r.headers["x-request-id"]
            ev = server.wait_event(lambda e: e["request_id"] == rid)
    assert ev["discarded_tokens"] == 2, ev
    assert ev["prompt_tokens"] == 100 and ev["completion_tokens"] == 2, ev
    assert ev["usage_estimated"] is True, ev


def no_usage_config(fake_url: str) -> dict:
    """Route `quiet` to the fake OpenAI upstream's `no-usage` model: no count, ever."""
    return {
        "backends": {"fake": {"kind": "openai", "base_url": fake_url + "/v1"}},
        "models": {"routes": {"quiet": {"backend": "fake", "upstream_model": "no-usage"}}},
    }


def sse(text: str) -> list[dict]:
    """The JSON objects of an SSE body's data lines ([DONE] left out)."""
    return [
        json.loads(line[5:])
        for line in text.splitlines()
        if line.startswith("data:") and line[5:].strip() != "[DONE]"
    ]


def told(url: str, dialect: str, stream: bool, prompt: str) -> tuple[str, tuple[int, int]]:
    """Ask `quiet` through `dialect`: the request's id, and the (prompt, completion)
    tokens the client was told."""
    messages = [{"role": "user", "content": prompt}]
    if dialect == "native":
        ask = {"model": "quiet", "stream": stream, "messages": messages}
        r = http.post(url + "/api/v1/chat", json=ask)
        usage = ndjson(r.text)[-1]["usage"] if stream else r.json()["usage"]
        counts = (usage["prompt_tokens"], usage["completion_tokens"])
    elif dialect == "openai":
        ask = {"model": "quiet", "stream": stream, "messages": messages}
        if stream:
            ask["stream_options"] = {"include_usage": True}
        r = http.post(url + "/v1/chat/completions", json=ask)
        usage = sse(r.text)[-1]["usage"] if stream else r.json()["usage"]
        counts = (usage["prompt_tokens"], usage["completion_tokens"])
    elif dialect == "anthropic":
        ask = {"model": "quiet", "stream": stream, "max_tokens": 50, "messages": messages}
        r = http.post(url + "/v1/messages", json=ask)
        if stream:
            usage = next(e for e in sse(r.text) if e["type"] == "message_delta")["usage"]
        else:
            usage = r.json()["usage"]
        counts = (usage["input_tokens"], usage["output_tokens"])
    else:
        ask = {"model": "quiet", "stream": stream, "messages": messages}
        r = http.post(url + "/api/chat", json=ask)
        last = ndjson(r.text)[-1] if stream else r.json()
        counts = (last["prompt_eval_count"], last["eval_count"])
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"], counts


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_is_told_the_usage_it_is_charged_when_the_upstream_sends_none(
    stream: bool,
) -> None:
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    with serve(FakeOpenAI().app) as up, run_stella(no_usage_config(up)) as server:
        for dialect in ("native", "openai", "anthropic", "ollama"):
            # 400 characters: 100 tokens at admission's estimate, charged and told alike.
            rid, counts = told(server.url, dialect, stream, "z" * 400)
            ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
            assert counts == (ev["prompt_tokens"], ev["completion_tokens"]), dialect
            assert ev["prompt_tokens"] == 100 and ev["usage_estimated"] is True, dialect


@pytest.mark.parametrize("stream", [True, False])
def test_usage_an_upstream_never_sent_is_marked_estimated_however_short_the_prompt(
    stream: bool,
) -> None:
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    with serve(FakeOpenAI().app) as up, run_stella(no_usage_config(up)) as server:
        # "hi" is 0 tokens at four characters a token: the completion alone is stella's.
        rid, counts = told(server.url, "native", stream, "hi")
        ev = server.wait_event(lambda e: e["request_id"] == rid)
        assert ev["prompt_tokens"] == 0 and ev["completion_tokens"] > 0
        assert counts == (0, ev["completion_tokens"])
        assert ev["usage_estimated"] is True


async def test_a_slot_name_no_call_uses_is_not_kept() -> None:
    from stella.limits import MemorySlots

    slots = MemorySlots()
    first = await slots.acquire("key:a", 1, 0.0)
    assert first is not None
    # A wait that times out, and one cancelled, leave no trace either.
    assert await slots.acquire("key:a", 1, 0.05) is None
    waiting = asyncio.ensure_future(slots.acquire("key:a", 1, 5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not slots.free("key:a", 1)
    slots.release(first)
    assert slots._sems == {}
    # Its next use takes the size it has then (a key's max_concurrent changed).
    held = [await slots.acquire("key:a", 2, 0.0) for _ in range(3)]
    assert held[0] is not None and held[1] is not None and held[2] is None
    for h in held[:2]:
        slots.release(h)
    assert slots._sems == {}
