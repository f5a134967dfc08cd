"""Retries, fallbacks and circuit breakers, on echo backends that fail on purpose."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.live import LiveServer, ndjson, run_stella

MSG = [{"role": "user", "content": "hi there"}]


def chat(url: str, model: str, stream: bool = False) -> httpx.Response:
    return httpx.post(
        url + "/api/v1/chat", json={"model": model, "messages": MSG, "stream": stream}, timeout=10
    )


def test_retry_recovers_before_the_first_token() -> None:
    config = {
        "backends": {"flaky": {"kind": "echo", "fail_first_calls": 2}},
        "models": {
            "routes": {"flaky": {"backend": "flaky", "retries": 2, "retry_backoff_s": 0.01}}
        },
    }
    with run_stella(config) as server:
        r = chat(server.url, "flaky")
        assert r.status_code == 200 and r.json()["response"] == "hi there"
        ev = server.wait_event(lambda e: e["model"] == "flaky")
        assert [a["error"] for a in ev["attempts"]] == ["upstream_error", "upstream_error", None]


def test_breaker_opens_then_probe_closes_it() -> None:
    config = {
        "breaker": {"failure_threshold": 2, "cooldown_s": 0.5},
        "backends": {"flaky": {"kind": "echo", "fail_first_calls": 3}},
        "models": {"routes": {"flaky": {"backend": "flaky", "retries": 0}}},
    }
    with run_stella(config) as server:
        assert chat(server.url, "flaky").status_code == 502
        assert chat(server.url, "flaky").status_code == 502  # second failure opens it
        r = chat(server.url, "flaky")
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert int(r.headers["retry-after"]) >= 1
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert next(m for m in models if m["name"] == "flaky")["circuit"] == "open"
        time.sleep(0.6)
        assert chat(server.url, "flaky").status_code == 502  # the probe fails: open again
        assert chat(server.url, "flaky").status_code == 503
        time.sleep(0.6)
        r = chat(server.url, "flaky")  # the probe succeeds (4th call): closed
        assert r.status_code == 200
        assert chat(server.url, "flaky").status_code == 200
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert next(m for m in models if m["name"] == "flaky")["circuit"] == "closed"
        # One log event per change of state; the calls refused while open log none.
        changes = [
            e
            for e in server.events()
            if e.get("event") in ("circuit_opened", "circuit_half_open", "circuit_closed")
        ]
        assert [(e["event"], e["level"]) for e in changes] == [
            ("circuit_opened", "warning"),
            ("circuit_half_open", "info"),
            ("circuit_opened", "warning"),
            ("circuit_half_open", "info"),
            ("circuit_closed", "info"),
        ], changes
        assert all(e["backend"] == "flaky" for e in changes), changes
        first, again = changes[0], changes[2]
        assert first["failures"] == 2 and first["cooldown_s"] == 0.5, first
        assert first["error"] == "upstream_error" and not first["probe_failed"], first
        assert again["failures"] == 3 and again["probe_failed"], again


def test_a_probe_whose_client_leaves_lets_the_next_one_probe() -> None:
    # The probe (3rd call) stalls before its first token and its client gives up: that
    # is no verdict, and the circuit must not stay shut for every later request.
    config = {
        "breaker": {"failure_threshold": 2, "cooldown_s": 0.3},
        "backends": {"sick": {"kind": "echo", "fail_first_calls": 2, "stall_after": 0}},
        "models": {"routes": {"sick": {"backend": "sick", "retries": 0}}},
    }
    body = {"model": "sick", "stream": False, "messages": [{"role": "user", "content": "x"}]}
    with run_stella(config) as server:
        assert chat(server.url, "sick").status_code == 502
        assert chat(server.url, "sick").status_code == 502
        time.sleep(0.4)
        for _ in range(2):  # each probe is let through, then abandoned by its client
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/api/v1/chat", json=body, timeout=0.4)
            time.sleep(0.3)
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert next(m for m in models if m["name"] == "sick")["circuit"] == "half_open"


def test_open_circuit_falls_back() -> None:
    config = {
        "breaker": {"failure_threshold": 1, "cooldown_s": 60},
        "backends": {"down": {"kind": "echo", "fail_before_first": True}},
        "models": {"routes": {"primary": {"backend": "down", "retries": 0, "fallbacks": ["echo"]}}},
    }
    with run_stella(config) as server:
        for _ in range(3):
            r = chat(server.url, "primary")
            assert r.status_code == 200 and r.json()["backend"] == "echo"
        events = server.events("inference")
        assert events[0]["attempts"][0]["error"] == "upstream_error"
        assert server.wait_event(lambda e: e["attempts"][0].get("error") == "circuit_open")
        lines = ndjson(chat(server.url, "primary", stream=True).text)
        assert lines[-1]["type"] == "done"
        # `start` names the route's backend before any ran; `done` the one that answered.
        assert lines[0]["backend"] == "down" and lines[-1]["backend"] == "echo"


def test_an_open_circuit_is_named_as_its_backend_s() -> None:
    # Two routes on one backend: one fails and opens the backend's circuit; the other,
    # which never failed, is refused naming the backend, not as if it were at fault.
    config = {
        "breaker": {"failure_threshold": 1, "cooldown_s": 60},
        "backends": {"shared": {"kind": "echo", "fail_first_calls": 1}},
        "models": {
            "routes": {
                "a": {"backend": "shared", "retries": 0},
                "b": {"backend": "shared", "retries": 0},
            }
        },
    }
    with run_stella(config) as server:
        assert chat(server.url, "a").status_code == 502
        r = chat(server.url, "b")
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "'b'" in message and "backend 'shared' has its circuit open" in message


@pytest.mark.parametrize(("cooldown_s", "low", "high"), [(30, 1, 30), (600, 31, 60)])
def test_an_open_circuit_whose_fallback_is_full_says_when_to_come_back(
    cooldown_s: int, low: int, high: int
) -> None:
    # The route's circuit is open and its fallback's limit is spent: the 503 names the
    # sooner of the cool-down's end (30 s) and the limit's reset (within a minute).
    config = {
        "breaker": {"failure_threshold": 1, "cooldown_s": cooldown_s},
        "backends": {"dead": {"kind": "echo", "fail_before_first": True}},
        "models": {"routes": {"a": {"backend": "dead", "retries": 0, "fallbacks": ["echo"]}}},
        "limits": {"models": {"echo": {"requests_per_minute": 1}}},
    }
    with run_stella(config) as server:
        r = chat(server.url, "a")  # the fallback answers; the circuit opens
        assert r.status_code == 200 and r.json()["backend"] == "echo", r.text
        r = chat(server.url, "a")
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        assert low <= int(r.headers["retry-after"]) <= high, r.headers
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert [a["error"] for a in ev["attempts"]] == ["circuit_open", "rate_limited"]
        body = {"model": "a", "messages": MSG}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 503, r.text
        assert low <= int(r.headers["retry-after"]) <= high, r.headers


def test_a_chain_whose_upstream_asks_for_an_hour_says_when_a_fallback_frees() -> None:
    # The route's upstream answers 429 asking for an hour; its fallback's limit resets
    # within a minute: the chain's 502 says the sooner.
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    with serve(FakeOpenAI().app) as fake:
        config = {
            "breaker": {"failure_threshold": 0},
            "backends": {"up": {"kind": "openai", "base_url": fake + "/v1"}},
            "models": {
                "routes": {
                    "r": {
                        "backend": "up",
                        "upstream_model": "status-429-3600",
                        "retries": 0,
                        "fallbacks": ["echo"],
                    }
                }
            },
            "limits": {"models": {"echo": {"requests_per_minute": 1}}},
        }
        with run_stella(config) as server:
            assert chat(server.url, "r").status_code == 200  # the fallback answers
            r = chat(server.url, "r")
            assert r.status_code == 502, r.text
            assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers


def test_a_non_stream_answer_that_breaks_midway_starts_over_on_the_fallback() -> None:
    # Nothing has reached a non-stream client when the backend fails after 3 tokens: the
    # fallback answers whole. A stream's client has had tokens: it gets the error.
    config = {
        "backends": {"half": {"kind": "echo", "fail_after": 3}},
        "models": {"routes": {"half": {"backend": "half", "retries": 0, "fallbacks": ["echo"]}}},
    }
    words = "one two three four five"
    body = {"model": "half", "messages": [{"role": "user", "content": words}]}
    with run_stella(config) as server:
        r = httpx.post(server.url + "/api/v1/chat", json={**body, "stream": False})
        assert r.status_code == 200, r.text
        assert r.json()["response"] == words and r.json()["backend"] == "echo"
        ev = server.wait_event(lambda e: e["request_id"] == r.json()["id"])
        assert [a["error"] for a in ev["attempts"]] == ["upstream_error", None]
        lines = ndjson(httpx.post(server.url + "/api/v1/chat", json={**body, "stream": True}).text)
        assert [e["type"] for e in lines].count("delta") == 3 and lines[-1]["type"] == "error"


def test_out_of_time_is_no_backends_fault() -> None:
    # The primary uses up the request's total limit; the fallback is not tried (recorded
    # as such), so its circuit is not charged with a failure it did not have.
    config = {
        "breaker": {"failure_threshold": 2, "cooldown_s": 30},
        "backends": {
            "slowpoke": {"kind": "echo", "delay_s": 0.3},
            "good": {"kind": "echo", "delay_s": 0.02},
        },
        "models": {
            "routes": {
                "slowpoke": {
                    "backend": "slowpoke",
                    "retries": 0,
                    "total_timeout_s": 1.0,
                    "fallbacks": ["good"],
                },
                "good": {"backend": "good", "total_timeout_s": 1.0},
            }
        },
    }
    body = {"stream": False, "messages": [{"role": "user", "content": "a b c d e f"}]}
    with run_stella(config) as server:
        for _ in range(2):
            r = httpx.post(server.url + "/api/v1/chat", json={**body, "model": "slowpoke"})
            assert r.status_code == 504 and "total limit" in r.json()["error"]["message"]
            rid = r.json()["error"]["request_id"]
            ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
            assert [(a["backend"], a["error"]) for a in ev["attempts"]] == [
                ("slowpoke", "upstream_timeout"),
                ("good", "out_of_time"),
            ]
        r = httpx.post(server.url + "/api/v1/chat", json={**body, "model": "good"})
        assert r.status_code == 200, r.text


def test_a_fallback_given_the_requests_last_moments_is_not_blamed() -> None:
    # The primary fails 0.85 s into a 1 s request; the healthy fallback, whose first
    # token takes 0.4 s, is cut by the request's end: its time ran out, no stall. It was
    # judged against the sliver it had, so two such calls opened its circuit for all.
    config = {
        "breaker": {"failure_threshold": 2, "cooldown_s": 30},
        "backends": {
            "dying": {"kind": "echo", "delay_s": 0.85, "fail_after": 1},
            "steady": {"kind": "echo", "delay_s": 0.4},
        },
        "models": {
            "routes": {
                "dying": {
                    "backend": "dying",
                    "retries": 0,
                    "total_timeout_s": 1.0,
                    "fallbacks": ["steady"],
                },
                "steady": {"backend": "steady", "retries": 0, "total_timeout_s": 10},
            }
        },
    }
    body = {"stream": False, "messages": [{"role": "user", "content": "a b"}]}
    with run_stella(config) as server:
        for _ in range(2):
            r = httpx.post(server.url + "/api/v1/chat", json={**body, "model": "dying"})
            assert r.status_code in (502, 504), r.text
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert {m["name"]: m["circuit"] for m in models}["steady"] == "closed"
        r = httpx.post(server.url + "/api/v1/chat", json={**body, "model": "steady"})
        assert r.status_code == 200, r.text


def _fallback_time_config() -> dict[str, Any]:
    """Routes whose fallbacks' turns come late in the request."""
    slow = {"retries": 0, "ttft_timeout_s": 1.0, "total_timeout_s": 5}
    return {
        "backends": {
            "mute": {"kind": "echo", "stall_after": 0},  # never a first token
            "mute-2": {"kind": "echo", "stall_after": 0},
            "mute-3": {"kind": "echo", "stall_after": 0},
            "mute-4": {"kind": "echo", "stall_after": 0},
            # A slow token, then a failure: a non-stream answer cut midway, 0.6 s in.
            "breaks": {"kind": "echo", "delay_s": 0.6, "fail_after": 1},
            "quick": {"kind": "echo"},
        },
        "models": {
            "routes": {
                "mute-first": {"backend": "mute", **slow, "fallbacks": ["quick-short"]},
                "breaks-first": {
                    "backend": "breaks",
                    "retries": 0,
                    "total_timeout_s": 5,
                    "fallbacks": ["quick-short"],
                },
                "mute-then-mute": {"backend": "mute-2", **slow, "fallbacks": ["mute-short"]},
                "mute-out": {
                    "backend": "mute-3",
                    "retries": 0,
                    "ttft_timeout_s": 9,
                    "total_timeout_s": 0.6,
                    "fallbacks": ["quick-short"],
                },
                # Its own total limit is shorter than the time its turn comes after.
                "quick-short": {"backend": "quick", "total_timeout_s": 0.5},
                "mute-short": {
                    "backend": "mute-4",
                    "retries": 0,
                    "ttft_timeout_s": 9,
                    "total_timeout_s": 0.6,
                },
            }
        },
    }


@pytest.fixture(scope="module")
def late_fallbacks() -> Iterator[LiveServer]:
    with run_stella(_fallback_time_config()) as server:
        yield server


@pytest.mark.parametrize(
    ("model", "failed", "stream"),
    [
        ("mute-first", "upstream_timeout", False),
        ("mute-first", "upstream_timeout", True),
        # Cut midway: only a non-stream answer, of which the client saw nothing, falls back.
        ("breaks-first", "upstream_error", False),
    ],
)
def test_a_fallback_runs_under_its_own_total_limit_from_its_turn(
    late_fallbacks: LiveServer, model: str, failed: str, stream: bool
) -> None:
    # The primary takes 0.6-1 s to fail; the fallback's own total limit is 0.5 s, counted
    # from its turn (not from the request's start, which it had passed already).
    r = chat(late_fallbacks.url, model, stream=stream)
    if stream:
        lines = ndjson(r.text)
        assert lines[-1]["type"] == "done" and lines[-1]["backend"] == "quick", r.text
        rid = lines[0]["id"]
    else:
        assert r.status_code == 200 and r.json()["backend"] == "quick", r.text
        rid = r.json()["id"]
    ev = late_fallbacks.wait_event(lambda e: e["request_id"] == rid)
    assert [(a["route"], a["error"]) for a in ev["attempts"]] == [
        (model, failed),
        ("quick-short", None),
    ]


def test_a_fallbacks_own_total_limit_still_bounds_it(late_fallbacks: LiveServer) -> None:
    # The request may run 5 s; the silent fallback is cut at its own 0.6 s, counted
    # from its turn (~1 s in), and the message names the limit that cut it.
    t = time.monotonic()
    r = chat(late_fallbacks.url, "mute-then-mute")
    took = time.monotonic() - t
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
    assert "the total limit of 0.6s passed" in r.json()["error"]["message"]
    assert 1.4 < took < 2.5, took
    ev = late_fallbacks.wait_event(lambda e: e["request_id"] == r.json()["error"]["request_id"])
    assert [(a["route"], a["error"]) for a in ev["attempts"]] == [
        ("mute-then-mute", "upstream_timeout"),
        ("mute-short", "upstream_timeout"),
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_fallback_the_requests_time_ran_out_before_is_recorded(
    late_fallbacks: LiveServer, stream: bool
) -> None:
    # The asked route's 0.6 s are spent on its silent backend: no time is left for the
    # fallback, which is recorded as not tried, and the error says why.
    r = chat(late_fallbacks.url, "mute-out", stream=stream)
    if stream:
        last = ndjson(r.text)[-1]
        assert last["type"] == "error", r.text
        rid = ndjson(r.text)[0]["id"]
    else:
        assert r.status_code == 504 and r.headers.get("retry-after") is None, r.text
        last, rid = r.json()["error"], r.json()["error"]["request_id"]
    assert last["code"] == "upstream_timeout" and last["retryable"] is True
    assert "the total limit of 0.6s passed" in last["message"], last
    assert "the time ran out before fallback 'quick-short' could run" in last["message"]
    assert "every backend failed" not in last["message"]
    ev = late_fallbacks.wait_event(lambda e: e["request_id"] == rid)
    assert ev["attempts"][1:] == [
        {"backend": "quick", "route": "quick-short", "error": "out_of_time"}
    ]
    assert ev["attempts"][0]["error"] == "upstream_timeout"


def test_a_request_that_runs_out_of_its_total_limit_midway_opens_no_circuit() -> None:
    # Each answer outlasts the route's own total limit after its first token: the
    # request's time ran out, the backend is answering; the route sharing that backend
    # must not be refused for it.
    config = {
        "breaker": {"failure_threshold": 2, "cooldown_s": 30},
        # A token every 0.15 s: never silent for half the limit (0.35 s) when it is cut.
        "backends": {"slow": {"kind": "echo", "delay_s": 0.15}},
        "models": {
            "routes": {
                "long": {"backend": "slow", "retries": 0, "total_timeout_s": 0.7},
                "short": {"backend": "slow", "retries": 0},
            }
        },
    }
    words = "one two three four five six seven eight"
    body = {"model": "long", "messages": [{"role": "user", "content": words}]}
    with run_stella(config) as server:
        for stream in (True, True, False, False):
            r = httpx.post(server.url + "/api/v1/chat", json={**body, "stream": stream})
            if stream:
                last = ndjson(r.text)[-1]
                assert last["type"] == "error" and "total limit" in last["message"], r.text
            else:
                assert r.status_code == 504 and "total limit" in r.json()["error"]["message"]
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert next(m for m in models if m["name"] == "short")["circuit"] == "closed"
        r = chat(server.url, "short")
        assert r.status_code == 200 and r.json()["response"] == "hi there"


@pytest.mark.parametrize("stall_after", [1, 0])
def test_a_backend_silent_until_the_total_limit_opens_its_circuit(stall_after: int) -> None:
    # Silent until the total limit cut it (the idle and first-token limits are longer),
    # after its first token or before it: stalled, not slow. Its circuit opens as an
    # idle or first-token timeout would open it.
    config = {
        "breaker": {"failure_threshold": 2, "cooldown_s": 30},
        "backends": {"hang": {"kind": "echo", "stall_after": stall_after}},
        "models": {"routes": {"a": {"backend": "hang", "retries": 0, "total_timeout_s": 0.6}}},
    }
    body = {"model": "a", "messages": [{"role": "user", "content": "one two three"}]}
    with run_stella(config) as server:
        for stream in (True, False):
            r = httpx.post(server.url + "/api/v1/chat", json={**body, "stream": stream})
            assert "total limit" in r.text, r.text
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert next(m for m in models if m["name"] == "a")["circuit"] == "open"
        r = httpx.post(server.url + "/api/v1/chat", json={**body, "stream": False})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_a_failed_call_logs_no_first_token_time() -> None:
    # The primary had tokens before it broke; the fallback failed before any: the
    # inference as a whole had no first token, and its log must not claim one.
    config = {
        "backends": {
            "half": {"kind": "echo", "fail_after": 2},
            "dead": {"kind": "echo", "fail_before_first": True},
        },
        "models": {
            "routes": {
                "half": {"backend": "half", "retries": 0, "fallbacks": ["dead"]},
                "dead": {"backend": "dead", "retries": 0},
            }
        },
        "breaker": {"failure_threshold": 0},
    }
    body = {"model": "half", "stream": False, "messages": [{"role": "user", "content": "a b c d"}]}
    with run_stella(config) as server:
        r = httpx.post(server.url + "/api/v1/chat", json=body)
        assert r.status_code == 502
        ev = server.wait_event(lambda e: e["request_id"] == r.json()["error"]["request_id"])
        assert ev["ttft_ms"] is None
        assert [a["error"] for a in ev["attempts"]] == ["upstream_error", "upstream_error"]


async def test_a_backend_failing_after_done_keeps_the_answer() -> None:
    from stella.app import Services
    from stella.calls import Call
    from stella.protocol import ChatRequest, Delta, Done, Message, Usage
    from stella.settings import load_settings

    settings = load_settings(
        {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}, environ={}
    )
    svc = Services(settings)
    calls = []

    async def chat(request: Any, ctx: Any) -> Any:
        calls.append(1)
        yield Delta(text="whole answer")
        yield Done(finish_reason="stop", usage=Usage(1, 2, 3))
        raise RuntimeError("cleanup went wrong")  # after the answer was complete

    svc.backends["echo"].chat = chat  # type: ignore[method-assign]
    request = ChatRequest(messages=[Message(role="user", content="x")], stream=False)
    inference = await svc.pipeline.prepare(request, Call(request_id="r1"))
    result = await inference.result()
    assert result.response == "whole answer" and len(calls) == 1
