"""Fault tests on loopback: stella in front of a faulty OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import full_backlog, serve
from tests.live import LiveServer, free_port, ndjson, run_stella


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI(words=8)
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture(scope="module")
def hole() -> Iterator[int]:
    with full_backlog() as port:
        yield port


@pytest.fixture(scope="module")
def gateway(upstream: tuple[FakeOpenAI, str], hole: int) -> Iterator[LiveServer]:
    url = upstream[1]
    fast = {"retries": 0, "ttft_timeout_s": 0.5, "idle_timeout_s": 0.5}
    config = {
        "backends": {
            "up": {"kind": "openai", "base_url": url + "/v1"},
            # Each failing route has its own backend, so one test's failures don't open
            # the circuit another test depends on.
            "b-die": {"kind": "openai", "base_url": url + "/v1"},
            "b-stall": {"kind": "openai", "base_url": url + "/v1"},
            "b-stall-2": {"kind": "openai", "base_url": url + "/v1"},
            "flaky": {"kind": "openai", "base_url": url + "/v1"},
            "b-429": {"kind": "openai", "base_url": url + "/v1"},
            "b-hung": {"kind": "openai", "base_url": url + "/v1"},
            "b-429-long": {"kind": "openai", "base_url": url + "/v1"},
            "b-beats": {"kind": "openai", "base_url": url + "/v1"},
            "b-401": {"kind": "openai", "base_url": url + "/v1"},
            "b-401-bare": {"kind": "openai", "base_url": url + "/v1"},
            "b-403": {"kind": "openai", "base_url": url + "/v1"},
            "b-429-many": {"kind": "openai", "base_url": url + "/v1"},
            "b-429-then-500": {"kind": "openai", "base_url": url + "/v1"},
            "b-429-rising": {"kind": "openai", "base_url": url + "/v1"},
            "b-500-after-429": {"kind": "openai", "base_url": url + "/v1"},
            "b-400": {"kind": "openai", "base_url": url + "/v1"},
            "b-404": {"kind": "openai", "base_url": url + "/v1"},
            # Without /v1: every chat is a 404 page, the upstream having no such path.
            "b-no-path": {"kind": "openai", "base_url": url},
            "b-hold": {"kind": "openai", "base_url": url + "/v1"},
            "b-400-client": {"kind": "openai", "base_url": url + "/v1"},
            "b-chain-401": {"kind": "openai", "base_url": url + "/v1"},
            "b-chain-403": {"kind": "openai", "base_url": url + "/v1"},
            "down": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "connect_timeout_s": 1,
            },
            "b-hole": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{hole}/v1",
                "connect_timeout_s": 0.3,
            },
        },
        "models": {
            "routes": {
                "down": {
                    "backend": "down",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                    "fallbacks": ["up-ok"],
                },
                "hole": {
                    "backend": "b-hole",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                    "fallbacks": ["up-ok"],
                },
                "hole-alone": {"backend": "b-hole", "retries": 0},
                "up-ok": {"backend": "up", "upstream_model": "ok", **fast},
                "up-die": {"backend": "b-die", "upstream_model": "die-after-3", **fast},
                "up-stall": {
                    "backend": "b-stall",
                    "upstream_model": "stall",
                    **fast,
                    "total_timeout_s": 1.0,
                },
                "up-stall-2": {"backend": "b-stall-2", "upstream_model": "stall-after-2", **fast},
                "up-slow": {"backend": "up", "upstream_model": "slow", **fast},
                "up-think": {
                    "backend": "up",
                    "upstream_model": "think-0.8",
                    **fast,
                    "answer_timeout_s": 3,
                },
                "hung-retries": {
                    "backend": "b-hung",
                    "upstream_model": "stall",
                    "retries": 2,
                    "ttft_timeout_s": 0.3,
                    "total_timeout_s": 3,
                    "fallbacks": ["up-ok"],
                },
                "hung-first": {
                    "backend": "b-hung",
                    "upstream_model": "stall",
                    "retries": 0,
                    "ttft_timeout_s": 0.4,
                    "total_timeout_s": 3,
                    "fallbacks": ["up-ok"],
                },
                "up-slow-tools": {"backend": "up", "upstream_model": "slow-tools", **fast},
                "up-429": {
                    "backend": "b-429",
                    "upstream_model": "status-429",  # Retry-After: 1
                    "retries": 3,
                    "total_timeout_s": 0.6,
                },
                "up-429-long": {
                    "backend": "b-429-long",
                    "upstream_model": "status-429-30",  # Retry-After: 30
                    "retries": 3,
                    "retry_max_backoff_s": 0.2,
                    "fallbacks": ["up-ok"],
                },
                "up-429-then-500": {
                    "backend": "b-429-then-500",
                    "upstream_model": "status-429-30",
                    "retries": 3,
                    "retry_max_backoff_s": 0.2,
                    "fallbacks": ["up-500-after-429"],
                },
                "up-500-after-429": {
                    "backend": "b-500-after-429",
                    "upstream_model": "status-500",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                },
                "up-429-rising": {
                    "backend": "b-429-rising",
                    "upstream_model": "status-429-rising",
                    "retries": 1,
                    "retry_max_backoff_s": 2,
                },
                "up-429-long-alone": {
                    "backend": "b-429-long",
                    "upstream_model": "status-429-30",
                    "retries": 3,
                    "retry_max_backoff_s": 0.2,
                },
                "up-beats": {
                    "backend": "b-beats",
                    "upstream_model": "beats",
                    "retries": 0,
                    "ttft_timeout_s": 0.3,
                    "total_timeout_s": 1.0,
                },
                "up-keepalive": {
                    "backend": "b-beats",
                    "upstream_model": "keepalive",
                    "retries": 0,
                    "ttft_timeout_s": 0.3,
                },
                "up-401": {
                    "backend": "b-401",
                    "upstream_model": "status-401",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                    "fallbacks": ["up-ok"],
                },
                "up-401-bare": {
                    "backend": "b-401-bare",
                    "upstream_model": "status-401",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                },
                "up-401-ok": {"backend": "b-401-bare", "upstream_model": "ok", **fast},
                "up-403": {
                    "backend": "b-403",
                    "upstream_model": "status-403",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                },
                "up-403-ok": {"backend": "b-403", "upstream_model": "ok", **fast},
                "up-429-many": {
                    "backend": "b-429-many",
                    "upstream_model": "status-429-30",  # Retry-After: 30
                    "retries": 2,
                    "retry_max_backoff_s": 0.2,
                },
                "up-429-many-ok": {"backend": "b-429-many", "upstream_model": "ok", **fast},
                "up-400": {
                    "backend": "b-400",
                    "upstream_model": "status-400",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                    "fallbacks": ["up-ok"],
                },
                "up-404": {
                    "backend": "b-404",
                    "upstream_model": "missing",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                    "fallbacks": ["up-ok"],
                },
                "up-404-alone": {
                    "backend": "b-404",
                    "upstream_model": "missing-vllm",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                },
                "up-no-path": {
                    "backend": "b-no-path",
                    "upstream_model": "ok",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                    "fallbacks": ["up-ok"],
                },
                "up-no-path-alone": {
                    "backend": "b-no-path",
                    "upstream_model": "ok",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                },
                "up-404-ok": {"backend": "b-404", "upstream_model": "ok", **fast},
                "up-hold": {
                    "backend": "b-hold",
                    "upstream_model": "finish-then-hold",
                    "retries": 0,
                    "idle_timeout_s": 1,
                },
                "up-400-client": {"backend": "b-400-client", "upstream_model": "status-400"},
                "up-chain": {
                    "backend": "b-chain-401",
                    "upstream_model": "status-401",
                    "retries": 0,
                    "fallbacks": ["up-chain-403"],
                },
                "up-chain-403": {
                    "backend": "b-chain-403",
                    "upstream_model": "status-403",
                    "retries": 0,
                },
                "flaky-bad": {"backend": "flaky", "upstream_model": "status-500", **fast},
                "flaky-ok": {"backend": "flaky", "upstream_model": "ok", **fast},
            }
        },
        "breaker": {"failure_threshold": 3, "cooldown_s": 0.5},
    }
    with run_stella(config) as server:
        yield server


def chat(server: LiveServer, model: str, stream: bool = True) -> httpx.Response:
    return httpx.post(
        server.url + "/api/v1/chat",
        timeout=10,
        json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]},
    )


def test_refused_connection_falls_back(gateway: LiveServer) -> None:
    r = chat(gateway, "down", stream=False)
    assert r.status_code == 200
    assert r.json()["backend"] == "up" and r.json()["response"].strip().startswith("w0")
    ev = gateway.wait_event(lambda e: e["request_id"] == r.json()["id"])
    assert [a["error"] for a in ev["attempts"]] == [
        "upstream_unreachable",
        "upstream_unreachable",
        None,
    ]


def test_a_connection_never_made_is_unreachable_and_falls_back(gateway: LiveServer) -> None:
    # No answer to the connection within connect_timeout_s, as from a host that is down:
    # retried and fallen back from as a refused connection is.
    r = chat(gateway, "hole", stream=False)
    assert r.status_code == 200 and r.json()["backend"] == "up", r.text
    ev = gateway.wait_event(lambda e: e["request_id"] == r.json()["id"])
    assert [a["error"] for a in ev["attempts"]] == [
        "upstream_unreachable",
        "upstream_unreachable",
        None,
    ]
    r = chat(gateway, "hole-alone", stream=False)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    assert "cannot connect (timed out after 0.3s)" in r.json()["error"]["message"]


def test_upstream_dies_after_three_tokens(gateway: LiveServer) -> None:
    lines = ndjson(chat(gateway, "up-die").text)
    assert [e["type"] for e in lines] == ["start", "delta", "delta", "delta", "error"]
    assert lines[-1]["code"] == "upstream_error"


def test_stall_before_first_token(gateway: LiveServer) -> None:
    # A non-stream call upstream has no first token: its whole answer is awaited (here
    # for answer_timeout_s' default, the ttft limit).
    r = chat(gateway, "up-stall", stream=False)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert "no answer from 'b-stall' within 0.5s" in r.json()["error"]["message"]
    # The upstream may still be generating it: a client told to retry would double that.
    assert r.json()["error"]["retryable"] is False and r.headers["x-should-retry"] == "false"
    lines = ndjson(chat(gateway, "up-stall").text)
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "upstream_timeout"
    assert "no first token" in lines[-1]["message"] and lines[-1]["retryable"] is True


def test_a_hung_upstream_leaves_time_for_the_fallback(gateway: LiveServer) -> None:
    # Non-stream, the primary never answers: after the answer limit the fallback does.
    t = time.monotonic()
    r = chat(gateway, "hung-first", stream=False)
    assert r.status_code == 200 and r.json()["backend"] == "up", r.text
    assert time.monotonic() - t < 2


def test_a_whole_answer_timeout_falls_back_without_asking_again(gateway: LiveServer) -> None:
    # A long answer asked again would only run again: the fallback answers instead.
    r = chat(gateway, "hung-retries", stream=False)
    assert r.status_code == 200 and r.json()["backend"] == "up", r.text
    ev = gateway.wait_event(lambda e: e["request_id"] == r.json()["id"])
    assert [a["backend"] for a in ev["attempts"]] == ["b-hung", "up"]


def test_a_whole_answer_has_its_own_limit(
    gateway: LiveServer, upstream: tuple[FakeOpenAI, str]
) -> None:
    # 0.8 s of generation, a 0.5 s first-token limit, answer_timeout_s 3: fine, asked once.
    seen = len(upstream[0].requests)
    r = chat(gateway, "up-think", stream=False)
    assert r.status_code == 200, r.text
    assert len(upstream[0].requests) == seen + 1
    lines = ndjson(chat(gateway, "up-think").text)  # streamed, the first token is late
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "upstream_timeout"


def test_tool_arguments_arriving_slowly_are_progress(gateway: LiveServer) -> None:
    # 1.2 s of argument fragments and no text, under 0.5 s time limits: alive all along.
    lines = ndjson(chat(gateway, "up-slow-tools").text)
    kinds = [e["type"] for e in lines if e["type"] != "ping"]
    assert kinds == ["start", "tool_call", "done"], lines
    assert lines[-2]["arguments"] == {"text": "a" * 10 + "b" * 10 + "c" * 10 + "d" * 10}


def test_no_retry_starts_past_the_total_limit(gateway: LiveServer) -> None:
    # The upstream asks for 1 s before a retry; only 0.6 s are left of the total limit.
    t = time.monotonic()
    r = chat(gateway, "up-429", stream=False)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_rate_limited"
    assert time.monotonic() - t < 0.5
    assert r.headers["retry-after"] == "1"
    ev = gateway.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert len(ev["attempts"]) == 1


def test_a_retry_after_longer_than_the_backoff_cap_ends_the_retries(gateway: LiveServer) -> None:
    # The upstream asks for 30 s; the route waits 0.2 s at most: asking again that soon
    # would be refused again, so the fallback answers at once.
    t = time.monotonic()
    r = chat(gateway, "up-429-long", stream=False)
    assert r.status_code == 200 and r.json()["backend"] == "up", r.text
    ev = gateway.wait_event(lambda e: e["request_id"] == r.json()["id"])
    assert [a["error"] for a in ev["attempts"]] == ["upstream_rate_limited", None]
    # Without a fallback the client is told the upstream's wait, at once.
    r = chat(gateway, "up-429-long-alone", stream=False)
    assert r.status_code == 502 and r.headers["retry-after"] == "30"
    ev = gateway.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert len(ev["attempts"]) == 1
    assert time.monotonic() - t < 1


def test_an_earlier_routes_retry_after_outlives_a_fallbacks_failure(gateway: LiveServer) -> None:
    # The primary's upstream asks for 30 s, the fallback then fails with a 500 that says
    # nothing of when: a client retrying sooner than 30 s would only ask the rate-limited
    # upstream again, so the chain's 502 says 30 s.
    r = chat(gateway, "up-429-then-500", stream=False)
    assert r.status_code == 502 and r.json()["error"]["retryable"] is True, r.text
    assert r.headers["retry-after"] in ("29", "30"), r.headers
    ev = gateway.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert [(a["backend"], a["error"]) for a in ev["attempts"]] == [
        ("b-429-then-500", "upstream_rate_limited"),
        ("b-500-after-429", "upstream_error"),
        ("b-500-after-429", "upstream_error"),
    ]


def test_a_pause_waited_out_is_not_the_answer_s_retry_after(gateway: LiveServer) -> None:
    # The upstream asked for 1 s, was asked again after it, and then asked for 30 s: the
    # answer says 30 s, not the first pause, long over (a client told 1 s asks at once).
    r = chat(gateway, "up-429-rising", stream=False)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_rate_limited", r.text
    assert r.headers["retry-after"] in ("29", "30"), r.headers


def test_a_streams_error_line_says_when_to_come_back(gateway: LiveServer) -> None:
    # The stream's status and headers went out before the upstream answered 429 with
    # Retry-After: 30; the `error` line carries the wait, and both clients read it.
    from stella import client as sc

    lines = ndjson(chat(gateway, "up-429-long-alone").text)
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "upstream_rate_limited"
    assert lines[-1]["retry_after"] == 30 and lines[-1]["retryable"] is True, lines[-1]
    with sc.Client(gateway.url) as c:
        with pytest.raises(sc.UpstreamError) as streamed:
            list(c.chat([{"role": "user", "content": "hi"}], "up-429-long-alone", stream=True))
    assert streamed.value.status == 0 and streamed.value.retry_after == 30
    # When nothing is known of when, the line has no such field.
    lines = ndjson(chat(gateway, "up-die").text)
    assert lines[-1]["type"] == "error" and "retry_after" not in lines[-1], lines[-1]


def test_output_without_text_runs_into_the_total_limit(gateway: LiveServer) -> None:
    # Role-only chunks every 0.1 s keep the 0.3 s first-token limit from firing; the
    # total limit ends it, and says so (the request's time, not the backend's fault).
    lines = ndjson(chat(gateway, "up-beats").text)
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "upstream_timeout"
    assert "the total limit of 1s passed" in lines[-1]["message"], lines[-1]
    ev = gateway.wait_event(lambda e: e["model"] == "up-beats")
    assert ev["attempts"][0]["error"] == "upstream_timeout"
    # Cut while producing, before its first token: no failure of the backend, to its
    # circuit breaker as to the metrics.
    assert ev["attempts"][0]["out_of_time"] is True
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'stella_backend_failures_total{backend="b-beats"' not in metrics, metrics


def test_keep_alive_comments_keep_the_first_token_limit_from_firing(
    gateway: LiveServer,
) -> None:
    # An upstream reading a long prompt says it is alive in SSE comments (mlx_lm.server's
    # `: keepalive N/M`) for longer than the 0.3 s first-token limit: not a silence.
    lines = ndjson(chat(gateway, "up-keepalive").text)
    assert lines[-1]["type"] == "done" and lines[-1]["finish_reason"] == "stop", lines[-1]
    ev = gateway.wait_event(lambda e: e["model"] == "up-keepalive")
    assert ev["attempts"] == [
        {
            "backend": "b-beats",
            "route": "up-keepalive",
            "ms": ev["attempts"][0]["ms"],
            "error": None,
        }
    ]
    assert "usage_estimated" not in ev


def test_stall_after_tokens(gateway: LiveServer) -> None:
    lines = ndjson(chat(gateway, "up-stall-2").text)
    types = [e["type"] for e in lines if e["type"] != "ping"]
    assert types == ["start", "delta", "delta", "error"]
    assert lines[-1]["code"] == "upstream_timeout"


def test_a_finished_answer_held_open_ends_within_a_short_idle_limit(
    gateway: LiveServer,
) -> None:
    # The answer and its finish reason, then neither the usage asked for nor [DONE]: the
    # wait for the usage ends within the route's idle limit of 1 s, as a whole answer,
    # not as a timeout counted against the backend's circuit.
    t = time.monotonic()
    lines = ndjson(chat(gateway, "up-hold").text)
    assert lines[-1]["type"] == "done" and lines[-1]["finish_reason"] == "stop", lines[-1]
    assert "".join(e["text"] for e in lines if e["type"] == "delta").split() == [
        f"w{i}" for i in range(8)
    ]
    assert time.monotonic() - t < 1.5
    ev = gateway.wait_event(lambda e: e["model"] == "up-hold")
    assert ev["attempts"][0]["error"] is None and ev["usage_estimated"] is True


def test_a_key_the_upstream_refuses_goes_to_the_fallback(gateway: LiveServer) -> None:
    # 401: the same key would be refused again (no retry); another backend may answer.
    r = chat(gateway, "up-401", stream=False)
    assert r.status_code == 200 and r.json()["backend"] == "up", r.text
    ev = gateway.wait_event(lambda e: e["request_id"] == r.json()["id"])
    assert [(a["backend"], a["error"]) for a in ev["attempts"]] == [
        ("b-401", "upstream_error"),
        ("up", None),
    ]
    assert ev["attempts"][0]["upstream_status"] == 401


def test_a_chain_that_every_backend_refused_is_not_worth_asking_again(
    gateway: LiveServer,
) -> None:
    # Both upstreams refuse stella's key: the chain's error keeps the last one's verdict
    # (and code), so a client trusting `retryable` does not send it again.
    r = chat(gateway, "up-chain", stream=False)
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "upstream_error", r.text
    assert err["message"].startswith("every backend failed") and err["retryable"] is False
    lines = ndjson(chat(gateway, "up-chain").text)
    assert lines[-1]["type"] == "error" and lines[-1]["retryable"] is False, lines


def test_a_key_the_upstream_refuses_counts_against_its_circuit(gateway: LiveServer) -> None:
    # No fallback: 502 after one attempt. A 401 refuses the backend's key for every model:
    # three of them (the threshold) open the backend's circuit. A 403 may refuse one model
    # to that key (OpenAI: "does not have access to model"): the others still answer.
    # Each backend's check follows its third refusal at once: the circuit is open for the
    # test config's 0.5 s cooldown only, which a busy machine can spend reading events.
    for route, then, status in (("up-401-bare", "up-401-ok", 503), ("up-403", "up-403-ok", 200)):
        rids = []
        for _ in range(3):
            r = chat(gateway, route, stream=False)
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text
            rids.append(r.headers["x-request-id"])
        r = chat(gateway, then, stream=False)
        assert r.status_code == status, r.text
        if status == 503:
            assert r.json()["error"]["code"] == "unavailable"
        for rid in rids:
            ev = gateway.wait_event(lambda e, rid=rid: e["request_id"] == rid)
            assert len(ev["attempts"]) == 1


def test_an_upstream_rate_limit_does_not_open_its_circuit(gateway: LiveServer) -> None:
    # A 429 is the upstream up and enforcing a limit, often one model's or one key's:
    # more of them than the threshold leave the circuit closed, and another model on the
    # same backend still answers.
    for _ in range(4):
        r = chat(gateway, "up-429-many", stream=False)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_rate_limited"
    ready = httpx.get(gateway.url + "/api/v1/models").json()["models"]
    assert next(m for m in ready if m["name"] == "up-429-many-ok")["circuit"] == "closed"
    r = chat(gateway, "up-429-many-ok", stream=False)
    assert r.status_code == 200, r.text


def test_a_request_the_upstream_rejects_ends_the_chain(gateway: LiveServer) -> None:
    # 400: the request itself is bad; no retry and no fallback would change that.
    r = chat(gateway, "up-400", stream=False)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_rejected", r.text
    ev = gateway.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
    assert [a["backend"] for a in ev["attempts"]] == ["b-400"]


def test_a_model_the_upstream_does_not_have_goes_to_the_fallback(gateway: LiveServer) -> None:
    # 404: this upstream has no such model. Asked again it still would not; another
    # backend may have it. One model's absence says nothing of the backend's health.
    for stream in (False, True):
        r = chat(gateway, "up-404", stream=stream)
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
        if stream:
            lines = ndjson(r.text)
            assert lines[-1]["type"] == "done" and lines[-1]["backend"] == "up", lines
        else:
            assert r.json()["backend"] == "up", r.text
        ev = gateway.wait_event(lambda e, rid=rid: e["request_id"] == rid)
        assert [(a["backend"], a["error"]) for a in ev["attempts"]] == [
            ("b-404", "upstream_rejected"),
            ("up", None),
        ], ev
        assert ev["attempts"][0]["upstream_status"] == 404
    # Without a fallback it is the answer, final: more of them than the breaker's
    # threshold leave the backend's circuit closed, and its other models answer.
    for _ in range(4):
        r = chat(gateway, "up-404-alone", stream=False)
        assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
        error = r.json()["error"]
        assert error["code"] == "upstream_rejected" and error["retryable"] is False, error
        rid = r.headers["x-request-id"]
        ev = gateway.wait_event(lambda e, rid=rid: e["request_id"] == rid)
        assert len(ev["attempts"]) == 1, ev
    r = chat(gateway, "up-404-ok", stream=False)
    assert r.status_code == 200, r.text
    models = httpx.get(gateway.url + "/api/v1/models").json()["models"]
    assert next(m for m in models if m["name"] == "up-404-ok")["circuit"] == "closed"


def test_a_path_the_upstream_does_not_have_falls_back_and_opens_its_circuit(
    gateway: LiveServer,
) -> None:
    # A base_url without /v1: every chat is a 404 page that names no model. Asked again
    # it is the same; another backend answers; and the backend's circuit is told, so the
    # misconfiguration shows rather than hide behind the fallback.
    for stream in (False, True):
        r = chat(gateway, "up-no-path", stream=stream)
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
        if stream:  # fallen back from before its first token
            lines = ndjson(r.text)
            assert [line["type"] for line in lines if line["type"] != "delta"] == [
                "start",
                "done",
            ], lines
            assert lines[-1]["backend"] == "up", lines
        else:
            assert r.json()["backend"] == "up", r.text
        ev = gateway.wait_event(lambda e, rid=rid: e["request_id"] == rid)
        assert [(a["backend"], a["error"]) for a in ev["attempts"]] == [
            ("b-no-path", "upstream_path_not_found"),
            ("up", None),
        ], ev
        assert ev["attempts"][0]["upstream_status"] == 404
    # Without a fallback it is the answer, saying what is wrong; the third failure opens
    # the circuit (failure_threshold 3).
    r = chat(gateway, "up-no-path-alone", stream=False)
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_path_not_found" and error["retryable"] is False, error
    assert error["message"] == (
        "b-no-path: upstream answered 404 for /chat/completions: 404 Not Found 404 Not Found "
        "nginx; the upstream has no such path: check the backend's base_url"
    ), error
    rid = r.headers["x-request-id"]
    ev = gateway.wait_event(lambda e, rid=rid: e["request_id"] == rid)
    assert len(ev["attempts"]) == 1, ev
    opened = gateway.wait_event(lambda e: e.get("backend") == "b-no-path", name="circuit_opened")
    assert opened["error"] == "upstream_path_not_found" and opened["failures"] == 3, opened


def test_a_rejected_request_is_not_retryable_with_or_without_a_stream(gateway: LiveServer) -> None:
    # The 502's body says what the stream's error line says; the Python client guessed
    # retryable from the status (5xx: yes) and told the two apart.
    from stella import client as sc

    r = chat(gateway, "up-400-client", stream=False)
    assert r.status_code == 502 and r.json()["error"]["retryable"] is False, r.text
    messages = [{"role": "user", "content": "hi"}]
    with sc.Client(gateway.url) as c:
        with pytest.raises(sc.UpstreamError) as whole:
            c.chat(messages, "up-400-client")
        with pytest.raises(sc.UpstreamError) as streamed:
            list(c.chat(messages, "up-400-client", stream=True))
    assert whole.value.status == 502 and whole.value.code == "upstream_rejected"
    assert whole.value.retryable is False and streamed.value.retryable is False


def test_breaker_opens_and_recovers_after_the_probe(gateway: LiveServer) -> None:
    for _ in range(3):
        assert chat(gateway, "flaky-bad", stream=False).status_code == 502
    r = chat(gateway, "flaky-ok", stream=False)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    ready = httpx.get(gateway.url + "/api/v1/models").json()["models"]
    assert next(m for m in ready if m["name"] == "flaky-ok")["circuit"] == "open"
    time.sleep(0.6)
    assert chat(gateway, "flaky-ok", stream=False).status_code == 200  # the probe
    assert chat(gateway, "flaky-ok", stream=False).status_code == 200


async def test_client_disconnect_closes_the_upstream_at_once(
    gateway: LiveServer, upstream: tuple[FakeOpenAI, str]
) -> None:
    fake = upstream[0]
    before = len(fake.closed_at)
    body = {"model": "up-stall-2", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", gateway.url + "/api/v1/chat", json=body) as r:
            async for line in r.aiter_lines():
                if json.loads(line)["type"] == "delta":
                    break
            left = time.monotonic()
    deadline = time.monotonic() + 2
    while len(fake.closed_at) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    assert len(fake.closed_at) > before, "the upstream never saw its connection closed"
    assert fake.closed_at[-1] - left < 0.1
