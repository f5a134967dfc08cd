"""GET /metrics: counts, histograms, state gauges; labels stay bounded."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.live import LiveServer, run_stella


def scrape(server: LiveServer, **kw: object) -> str:
    r = httpx.get(server.url + "/metrics", **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def value(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def test_metrics_count_requests_tokens_and_latency(stella: LiveServer) -> None:
    before = scrape(stella)
    for _ in range(3):
        httpx.post(
            stella.url + "/api/v1/chat",
            json={
                "model": "echo",
                "stream": False,
                "messages": [{"role": "user", "content": "a b"}],
            },
        )
    httpx.post(
        stella.url + "/api/v1/chat",
        json={"model": "no-such-model-xyz", "messages": [{"role": "user", "content": "a"}]},
    )
    after = scrape(stella)
    label = 'stella_requests_total{api="native",backend="echo",model="echo",status="200"}'
    assert value(after, label) - value(before, label) == 3
    assert value(after, 'stella_tokens_total{kind="completion",model="echo"}') >= 6
    assert 'stella_time_to_first_token_seconds_bucket{le="0.005",model="echo"}' in after
    # Bounds as the Prometheus client libraries write them (and Prometheus 3 stores them):
    # `1.0`, not `1`, or one bucket would be two series across exporters.
    assert 'stella_time_to_first_token_seconds_bucket{le="1.0",model="echo"}' in after
    assert 'stella_request_duration_seconds_bucket{le="120.0",model="echo"}' in after
    assert 'stella_request_duration_seconds_count{model="echo"}' in after
    assert value(after, 'stella_rejections_total{api="native",code="model_not_found"}') >= 1
    assert "no-such-model-xyz" not in after  # client-chosen names never become labels
    assert 'stella_circuit_state{backend="echo"} 0.0' in after
    assert "stella_inflight_requests" in after
    from prometheus_client.parser import text_string_to_metric_families

    types = {f.name: f.type for f in text_string_to_metric_families(after)}
    assert types["stella_rate_limited"] == "counter"  # a running total, not a gauge
    assert types["stella_requests"] == "counter" and types["stella_inflight_requests"] == "gauge"


def test_a_whole_inference_is_bucketed_up_to_the_default_total_timeout(stella: LiveServer) -> None:
    body = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "a"}]}
    assert httpx.post(stella.url + "/api/v1/chat", json=body).status_code == 200
    text = scrape(stella)

    def top(family: str) -> list[str]:
        prefix = family + '_bucket{le="'
        bounds = [
            line[len(prefix) :].split('"', 1)[0]
            for line in text.splitlines()
            if line.startswith(prefix) and 'model="echo"' in line
        ]
        return bounds[-4:]

    # total_timeout_s is 600 s by default: a long answer's time still lands in a bucket.
    assert top("stella_request_duration_seconds") == ["120.0", "300.0", "600.0", "+Inf"]
    # A first token waits ttft_timeout_s (120 s) an attempt, and retries and fallbacks add
    # attempts within total_timeout_s: the client's wait has the same buckets.
    assert top("stella_time_to_first_token_seconds") == ["120.0", "300.0", "600.0", "+Inf"]
    # A slot is waited for within queue_timeout_s.
    assert top("stella_queue_wait_seconds") == ["30.0", "60.0", "120.0", "+Inf"]


def test_every_family_is_in_the_readme_s_table(stella: LiveServer) -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    exposed = dict(
        line.split()[2:4] for line in scrape(stella).splitlines() if line.startswith("# TYPE ")
    )
    # Every name metrics.py gives a family is exposed here (a counter's with `_total`),
    # so this server's scrape names them all, those exposed only sometimes included.
    source = (root / "stella" / "metrics.py").read_text()
    for name in set(re.findall(r'"(stella_[a-z_]+)"', source)):
        assert name in exposed or name + "_total" in exposed, name
    readme = (root / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    # The table's rows: each family once, with its type.
    rows = dict(re.findall(r"^\| `(stella_[a-z_]+)` \| ([a-z]+) \|", section, re.MULTILINE))
    assert rows == exposed


def test_metrics_need_a_key_when_keys_are_set() -> None:
    with run_stella(env={"STELLA_API_KEYS": "sk-metrics-key-1"}) as server:
        assert httpx.get(server.url + "/metrics").status_code == 401
        text = scrape(server, headers={"Authorization": "Bearer sk-metrics-key-1"})
        assert "sk-metrics-key-1" not in text


def test_a_failed_answer_is_counted_once_not_also_as_a_refusal(stella: LiveServer) -> None:
    before = scrape(stella)
    body = {"stream": False, "messages": [{"role": "user", "content": "a b c d e"}]}
    r = httpx.post(stella.url + "/api/v1/chat", json={**body, "model": "echo-fail-after"})
    assert r.status_code == 502
    after = scrape(stella)
    refused = 'stella_rejections_total{api="native",code="upstream_error"}'
    assert value(after, refused) == value(before, refused)
    failed = 'stella_requests_total{api="native",backend="failafter",model="echo-fail-after",'
    assert value(after, failed) - value(before, failed) == 1


def test_a_client_leaving_is_not_a_backend_failure(stella: LiveServer) -> None:
    # The client gives up before the first token: the attempt is cut (logged as
    # client_closed), which says nothing of the backend's health.
    body = {
        "model": "echo-stall-first",
        "stream": False,
        "messages": [{"role": "user", "content": "a"}],
    }
    rid = "metrics-leaver-1"
    try:
        httpx.post(
            stella.url + "/api/v1/chat", json=body, timeout=0.2, headers={"X-Request-ID": rid}
        )
    except httpx.TimeoutException:
        pass
    ev = stella.wait_event(lambda e: e["request_id"] == rid)
    assert ev["finish_reason"] == "client_closed"
    assert ev["attempts"][0]["error"] == "client_closed"
    failures = 'stella_backend_failures_total{backend="stallfirst",code="client_closed"}'
    assert failures not in scrape(stella)


def test_a_call_its_total_limit_cuts_while_producing_is_not_a_backend_failure() -> None:
    # A token every 0.3 s, six of them, within a 1 s limit: the request's time runs out
    # while the backend is answering. The circuit breaker takes that for no failure;
    # the failure counter must agree with it.
    config = {
        "breaker": {"failure_threshold": 3},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.3}},
        "models": {"routes": {"cut": {"backend": "slow", "retries": 0, "total_timeout_s": 1}}},
    }
    body = {
        "model": "cut",
        "stream": False,
        "messages": [{"role": "user", "content": "one two three four five six"}],
    }
    with run_stella(config) as server:
        for i in range(4):
            rid = f"metrics-cut-{i}"
            r = httpx.post(server.url + "/api/v1/chat", json=body, headers={"X-Request-ID": rid})
            assert r.status_code == 504, r.text
        text = scrape(server)
        assert 'stella_circuit_state{backend="slow"} 0.0' in text
        assert 'stella_backend_failures_total{backend="slow"' not in text, text
        # The log keeps the attempt's error, and says it was the request's time.
        ev = server.wait_event(lambda e: e["request_id"] == rid)
        [attempt] = ev["attempts"]
        assert attempt["error"] == "upstream_timeout" and attempt["out_of_time"] is True


def test_a_request_the_backend_cannot_serve_as_asked_is_not_its_failure() -> None:
    # A prompt over the model's context, or a JSON mode the backend cannot keep to, is the
    # client's request, refused by a backend that answered: no failure of it, as its
    # circuit breaker takes it. An upstream's 429 is one: it did not serve the attempt
    # (though, as one model's or one key's limit, its circuit is not told).
    from tests.fakes.anthropic import FakeAnthropic
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    claude, openai_up = FakeAnthropic(), FakeOpenAI()
    with serve(claude.app) as claude_url, serve(openai_up.app) as openai_url:
        config = {
            "backends": {
                "up": {"kind": "openai", "base_url": openai_url + "/v1"},
                "lim": {"kind": "openai", "base_url": openai_url + "/v1"},
                "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CK"},
            },
            "models": {
                "routes": {
                    "ctx": {"backend": "up", "upstream_model": "ctx-openai", "retries": 0},
                    "lim": {"backend": "lim", "upstream_model": "status-429", "retries": 0},
                    # With a fallback, the backend's own refusal comes in its attempt.
                    "json": {
                        "backend": "claude",
                        "upstream_model": "claude-x",
                        "retries": 0,
                        "fallbacks": ["echo"],
                    },
                }
            },
        }
        with run_stella(config, {"CK": "sk-ant-metrics"}) as server:
            hi = [{"role": "user", "content": "hi"}]
            for model, extra, status, code in (
                ("ctx", {}, 400, "context_length_exceeded"),
                ("json", {"response_format": {"type": "json_object"}}, 400, "invalid_request"),
                ("lim", {}, 502, "upstream_rate_limited"),
            ):
                r = httpx.post(
                    server.url + "/api/v1/chat",
                    json={"model": model, "messages": hi, "stream": False, **extra},
                )
                assert r.status_code == status and r.json()["error"]["code"] == code, r.text
                rid = r.headers["x-request-id"]
                ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
                assert [a["error"] for a in ev["attempts"]] == [code], ev
            text = scrape(server)
    assert 'stella_backend_failures_total{backend="up"' not in text, text
    assert 'stella_backend_failures_total{backend="claude"' not in text, text
    assert value(text, 'stella_backend_failures_total{backend="lim",code="upstream_rate_limited"}')
    assert 'stella_circuit_state{backend="lim"} 0.0' in text


def test_a_name_counted_as_other_gets_its_label_once_it_is_a_route() -> None:
    body = {"stream": False, "messages": [{"role": "user", "content": "a"}]}
    with run_stella({"models": {"allow_direct": True}}) as server:
        chat = server.url + "/api/v1/chat"
        assert httpx.post(chat, json={**body, "model": "echo/later"}).status_code == 200
        assert 'model="echo/later"' not in scrape(server)  # a direct name: "(other)"
        route = {"name": "echo/later", "backend": "echo"}
        assert httpx.post(server.url + "/api/v1/models", json=route).status_code == 201
        assert httpx.post(chat, json={**body, "model": "echo/later"}).status_code == 200
        label = 'stella_requests_total{api="native",backend="echo",model="echo/later",status="200"}'
        assert value(scrape(server), label) == 1


def test_a_route_named_other_is_not_counted_with_names_that_are_no_route() -> None:
    config = {"models": {"allow_direct": True, "routes": {"other": {"backend": "echo"}}}}
    body = {"stream": False, "messages": [{"role": "user", "content": "a"}]}
    with run_stella(config) as server:
        chat = server.url + "/api/v1/chat"
        for model in ("other", "echo/direct", "echo/direct"):
            assert httpx.post(chat, json={**body, "model": model}).status_code == 200
        text = scrape(server)
    series = 'stella_requests_total{api="native",backend="echo",model="%s",status="200"}'
    assert value(text, series % "other") == 1, text
    assert value(text, series % "(other)") == 2, text


def series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_a_call_on_a_route_removed_while_it_ran_is_counted_then_its_series_go() -> None:
    import threading
    import time

    config = {"backends": {"slow": {"kind": "echo", "delay_s": 0.2}}}
    with run_stella(config) as server:
        route = {"name": "rslow", "backend": "slow"}
        assert httpx.post(server.url + "/api/v1/models", json=route).status_code == 201
        body = {"model": "rslow", "messages": [{"role": "user", "content": "a b c d e"}]}
        result: list[httpx.Response] = []
        call = threading.Thread(
            target=lambda: result.append(httpx.post(server.url + "/api/v1/chat", json=body))
        )
        call.start()
        time.sleep(0.4)  # the call is running: two of its five words are out
        assert httpx.delete(server.url + "/api/v1/models/rslow").status_code == 200
        assert 'model="rslow"' not in scrape(server)  # running: not counted yet, nor gone
        call.join(10)
        assert result and result[0].status_code == 200
        label = 'stella_requests_total{api="native",backend="slow",model="rslow",status="200"}'
        text = scrape(server)
        assert value(text, label) == 1, text
        assert 'model="(other)"' not in text
        # Counted once it ended, in the scrape after it; the series go after that one.
        text = scrape(server)
        assert 'model="rslow"' not in text and 'model="(other)"' not in text, text


def test_a_call_waiting_for_a_slot_on_a_removed_route_keeps_its_label() -> None:
    import threading
    import time

    config = {
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {"routes": {"hold": {"backend": "slow"}}},
        "limits": {"backends": {"slow": 1}, "queue_timeout_s": 10},
    }
    body = {"stream": False, "messages": [{"role": "user", "content": "a b c"}]}
    with run_stella(config) as server:
        route = {"name": "rwait", "backend": "slow"}
        assert httpx.post(server.url + "/api/v1/models", json=route).status_code == 201
        results: list[httpx.Response] = []
        calls = [
            threading.Thread(
                target=lambda m=m: results.append(
                    httpx.post(server.url + "/api/v1/chat", json={**body, "model": m}, timeout=30)
                )
            )
            for m in ("hold", "rwait")
        ]
        calls[0].start()
        time.sleep(0.2)  # "hold" has the backend's one slot
        calls[1].start()
        for _ in range(100):  # until the call on "rwait" waits for that slot
            if value(scrape(server), "stella_waiting_requests") == 1:
                break
            time.sleep(0.02)
        assert httpx.delete(server.url + "/api/v1/models/rwait").status_code == 200
        assert value(scrape(server), "stella_waiting_requests") == 1  # a scrape while it waits
        for c in calls:
            c.join(30)
        assert sorted(r.status_code for r in results) == [200, 200]
        text = scrape(server)
    label = 'stella_requests_total{api="native",backend="slow",model="rwait",status="200"}'
    assert value(text, label) == 1, text
    assert 'model="(other)"' not in text


def test_a_route_removed_with_no_call_on_it_shows_its_last_counts_once() -> None:
    # Its calls since the last scrape are counted in the next one, under its name: no
    # total goes down, no spend goes missing.
    body = {"model": "exp1", "stream": False, "messages": [{"role": "user", "content": "a b"}]}
    route = {"name": "exp1", "backend": "echo", "price": {"input": 1.0, "output": 2.0}}
    with run_stella() as server:
        assert value(scrape(server), "stella_requests_total") == 0
        assert httpx.post(server.url + "/api/v1/models", json=route).status_code == 201
        for _ in range(5):
            assert httpx.post(server.url + "/api/v1/chat", json=body).status_code == 200
        assert httpx.delete(server.url + "/api/v1/models/exp1").status_code == 200
        text = scrape(server)
        label = 'stella_requests_total{api="native",backend="echo",model="exp1",status="200"}'
        assert value(text, label) == 5, text
        assert value(text, "stella_requests_total") == 5
        assert value(text, 'stella_cost_usd_total{model="exp1"}') > 0, text
        assert 'model="(other)"' not in text
        text = scrape(server)  # shown once: gone from the next one
        assert 'model="exp1"' not in text and value(text, "stella_requests_total") == 0, text


async def test_a_route_another_replica_removed_shows_its_last_counts_once() -> None:
    from stella.app import create_app
    from stella.settings import RouteSettings, load_settings
    from tests.live import NO_MLX

    app = create_app(load_settings(NO_MLX, environ={}))
    body = {"model": "exp1", "stream": False, "messages": [{"role": "user", "content": "a"}]}
    label = 'stella_requests_total{api="native",backend="echo",model="exp1",status="200"}'
    async with app.router.lifespan_context(app):
        router = app.state.stella.router
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            router.apply_stored({"exp1": RouteSettings(backend="echo")}, None)
            assert value((await c.get("/metrics")).text, label) == 0
            for _ in range(3):
                assert (await c.post("/api/v1/chat", json=body)).status_code == 200
            router.apply_stored({}, None)  # the store's read: removed by another replica
            router.apply_stored({}, None)  # and read again before any scrape
            text = (await c.get("/metrics")).text
            assert value(text, label) == 3, text
            assert 'model="exp1"' not in (await c.get("/metrics")).text
            assert "exp1" not in router.counted


def test_removed_routes_leave_no_series_behind() -> None:
    # An operator adding and removing runtime routes (one per experiment, say) must not
    # grow /metrics, nor the process's memory, with every name it ever had.
    chat = {"stream": False, "messages": [{"role": "user", "content": "a b"}]}
    with run_stella() as server:
        url = server.url
        before = series(scrape(server))
        for i in range(30):
            name = f"rt-{i}"
            route = {
                "name": name,
                "backend": "echo",
                "upstream_model": "echo",
                "price": {"input": 1.0, "output": 2.0},
            }
            assert httpx.post(url + "/api/v1/models", json=route).status_code == 201
            r = httpx.post(url + "/api/v1/chat", json={**chat, "model": name})
            assert r.status_code == 200, r.text
            r = httpx.post(url + "/api/v1/embed", json={"model": name, "input": ["x"]})
            assert r.status_code == 200, r.text
            if i == 0:  # counted under its name while it is a route: ttft, cost, embeds
                text = scrape(server)
                for family in (
                    "stella_time_to_first_token_seconds_count",
                    "stella_cost_usd_total",
                    "stella_embed_requests_total",
                    "stella_embed_tokens_total",
                    "stella_tokens_total",
                ):
                    assert f'model="{name}"' in next(
                        (x for x in series(text) if x.startswith(family + "{")), ""
                    ), family
            assert httpx.delete(f"{url}/api/v1/models/{name}").status_code == 200
        last = scrape(server)  # each one's calls since the last scrape, shown once
        after = series(scrape(server))
    assert value(last, 'stella_requests_total{api="native",backend="echo",model="rt-29"') == 1
    # rt-0's went as it was removed: the scrape in its loop had shown them.
    assert 'model="rt-0"' not in last
    assert value(last, "stella_requests_total") == 29, last
    assert value(last, "stella_embed_requests_total") == 29, last
    assert after == before


def test_a_route_added_again_counts_on_until_a_scrape_showed_it_then_from_zero() -> None:
    import threading
    import time

    config = {"backends": {"slow": {"kind": "echo", "delay_s": 0.1}}}
    body = {"model": "again", "stream": False, "messages": [{"role": "user", "content": "a b c"}]}
    label = 'stella_requests_total{api="native",backend="slow",model="again",status="200"}'
    route = {"name": "again", "backend": "slow"}
    with run_stella(config) as server:
        models, chat = server.url + "/api/v1/models", server.url + "/api/v1/chat"
        assert httpx.post(models, json=route).status_code == 201
        for _ in range(2):
            assert httpx.post(chat, json=body).status_code == 200
        assert value(scrape(server), label) == 2
        # Removed with no call on it since that scrape, added again: a counter reset.
        assert httpx.delete(models + "/again").status_code == 200
        assert httpx.post(models, json=route).status_code == 201
        assert httpx.post(chat, json=body).status_code == 200
        assert value(scrape(server), label) == 1
        # A call since, then removed and added again with no scrape between: the call is
        # not seen yet, so the series stay and count on (no reset).
        assert httpx.post(chat, json=body).status_code == 200
        assert httpx.delete(models + "/again").status_code == 200
        assert httpx.post(models, json=route).status_code == 201
        assert httpx.post(chat, json=body).status_code == 200
        assert value(scrape(server), label) == 3
        # Removed while a call on it ran, added again once it ended, with no scrape between:
        # counts on too.
        call = threading.Thread(target=httpx.post, args=(chat,), kwargs={"json": body})
        call.start()
        time.sleep(0.15)
        assert httpx.delete(models + "/again").status_code == 200
        call.join(10)
        assert httpx.post(models, json=route).status_code == 201
        assert httpx.post(chat, json=body).status_code == 200
        assert value(scrape(server), label) == 5


def test_a_fallback_skipped_for_its_limit_refuses_no_client() -> None:
    # stella_rate_limited_total counts the clients refused, not the fallbacks passed over.
    config = {
        "backends": {"broken": {"kind": "echo", "fail_before_first": True}},
        "models": {
            "routes": {
                "pfb": {"backend": "broken", "retries": 0, "fallbacks": ["echolim", "echo"]},
                "echolim": {"backend": "echo"},
            }
        },
        "limits": {"models": {"echolim": {"requests_per_minute": 1}}},
    }
    body = {"stream": False, "messages": [{"role": "user", "content": "a"}]}
    with run_stella(config) as server:
        for _ in range(3):
            r = httpx.post(server.url + "/api/v1/chat", json={**body, "model": "pfb"})
            assert r.status_code == 200, r.text
        assert value(scrape(server), "stella_rate_limited_total") == 0
        r = httpx.post(server.url + "/api/v1/chat", json={**body, "model": "echolim"})
        assert r.status_code == 429
        assert value(scrape(server), "stella_rate_limited_total") == 1


async def test_a_wait_for_the_key_s_slot_is_queue_wait() -> None:
    import asyncio
    import hashlib

    key = "sk-metrics-queue-01"
    config = {
        "auth": {
            "keys": {"k": {"sha256": hashlib.sha256(key.encode()).hexdigest(), "admin": True}}
        },
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
        # The key's slot alone: the backend has no limit of its own.
        "limits": {"max_concurrent": 1, "queue_timeout_s": 10},
    }
    body = {"model": "slow", "stream": False, "messages": [{"role": "user", "content": "a b c"}]}
    auth = {"Authorization": f"Bearer {key}"}
    with run_stella(config) as server:
        async with httpx.AsyncClient(timeout=30, headers=auth) as c:
            calls = [c.post(server.url + "/api/v1/chat", json=body) for _ in range(2)]
            assert [r.status_code for r in await asyncio.gather(*calls)] == [200, 200]
        text = scrape(server, headers=auth)
    # The second call waited ~0.6 s for the first's slot: queue wait, and said so.
    assert value(text, 'stella_queue_wait_seconds_sum{model="slow"}') >= 0.4, text
    help_line = next(x for x in text.splitlines() if x.startswith("# HELP stella_queue_wait"))
    assert "key's" in help_line and "backend's" in help_line, help_line


def test_calls_waiting_for_a_slot_are_not_counted_as_running() -> None:
    import threading
    import time

    config = {
        "backends": {"slow": {"kind": "echo", "delay_s": 0.3}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
        "limits": {"backends": {"slow": 1}, "queue_timeout_s": 10},
    }
    body = {"model": "slow", "stream": False, "messages": [{"role": "user", "content": "a b c"}]}
    with run_stella(config) as server:
        calls = [
            threading.Thread(
                target=httpx.post,
                args=(server.url + "/api/v1/chat",),
                kwargs={"json": body, "timeout": 30},
            )
            for _ in range(3)
        ]
        for c in calls:
            c.start()
        text = ""
        for _ in range(50):  # until all three arrived: one runs, two wait for its slot
            text = scrape(server)
            if value(text, "stella_waiting_requests") == 2:
                break
            time.sleep(0.02)
        assert value(text, "stella_inflight_requests") == 1, text
        assert value(text, "stella_waiting_requests") == 2, text
        for c in calls:
            c.join(30)
        after = scrape(server)
        assert value(after, "stella_inflight_requests") == 0
        assert value(after, "stella_waiting_requests") == 0
        # A body still arriving (a slow upload) is no call running.
        sock = socket.create_connection(("127.0.0.1", server.port))
        raw = json.dumps(body).encode()
        sock.sendall(
            b"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
            % len(raw)
            + raw[:10]
        )
        time.sleep(0.3)
        assert value(scrape(server), "stella_inflight_requests") == 0
        sock.close()


def test_a_refusal_is_counted_under_the_api_that_served_the_request(stella: LiveServer) -> None:
    # /api/v1/generate's SSE form is the `simple` api in logs and request counts:
    # its refusals go under the same label, not the route's native one.
    before = scrape(stella)
    r = httpx.post(
        stella.url + "/api/v1/generate",
        json={"model": "no-such-model-xyz", "prompt": "a"},
        headers={"Accept": "text/event-stream"},
    )
    assert r.status_code == 404
    after = scrape(stella)
    simple = 'stella_rejections_total{api="simple",code="model_not_found"}'
    native = 'stella_rejections_total{api="native",code="model_not_found"}'
    assert value(after, simple) - value(before, simple) == 1
    assert value(after, native) == value(before, native)


def test_only_an_inference_routes_refusals_are_counted(stella: LiveServer) -> None:
    # A lookup's 404 or a report's 400 refuses no inference: counted, they would skew
    # refusals / (requests + refusals). A chat's 404 is one.
    before = value(scrape(stella), "stella_rejections_total")
    assert httpx.get(stella.url + "/v1/models/no-such-model-xyz").status_code == 404
    assert httpx.get(stella.url + "/api/v1/usage?day=bad").status_code == 400
    show = httpx.post(stella.url + "/api/show", json={"model": "no-such-model-xyz"})
    assert show.status_code == 404
    assert value(scrape(stella), "stella_rejections_total") == before
    r = httpx.post(
        stella.url + "/v1/chat/completions",
        json={"model": "no-such-model-xyz", "messages": [{"role": "user", "content": "a"}]},
    )
    assert r.status_code == 404
    after = scrape(stella)
    assert value(after, "stella_rejections_total") - before == 1
    assert value(after, 'stella_rejections_total{api="openai",code="model_not_found"}') >= 1


_MSGS = [{"role": "user", "content": "a"}]
_NO_SUCH = "no-such-model-xyz"


@pytest.mark.parametrize(
    ("path", "api", "body"),
    [
        ("/api/v1/chat", "native", {"messages": _MSGS}),
        ("/api/v1/generate", "native", {"prompt": "a"}),
        ("/v1/chat/completions", "openai", {"messages": _MSGS}),
        ("/v1/chat/stream", "openai", {"messages": _MSGS}),
        ("/v1/completions", "openai", {"prompt": "a"}),
        ("/v1/responses", "responses", {"input": "a"}),
        ("/v1/messages", "anthropic", {"max_tokens": 5, "messages": _MSGS}),
        ("/api/chat", "ollama", {"messages": _MSGS}),
        ("/api/generate", "ollama", {"prompt": "a"}),
        ("/api/chat/invoke", "invoke", {"input_data": {"input": "a"}}),
        ("/generate", "simple", {"prompt": "a"}),
        ("/api/llm/generate", "llm", {"prompt": "a"}),
        ("/api/llm/stream", "llm", {"prompt": "a"}),
    ],
)
def test_every_inference_route_counts_its_refusals(
    stella: LiveServer, path: str, api: str, body: dict[str, object]
) -> None:
    # The routes README lists as inference routes: a refusal of each is counted once,
    # under the api that refused it (refusals / (requests + refusals) covers them all).
    before = scrape(stella)
    r = httpx.post(stella.url + path, json={"model": _NO_SUCH, **body})
    assert r.status_code == 404, r.text
    after = scrape(stella)
    label = f'stella_rejections_total{{api="{api}",code="model_not_found"}}'
    assert value(after, label) - value(before, label) == 1
    assert value(after, "stella_rejections_total") - value(before, "stella_rejections_total") == 1


async def test_the_native_generate_counts_its_refusals_without_the_aliases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # /api/v1/generate is the aliases module's (its SSE form) when that module is there;
    # without it (a dialect module may be absent) the native route serves it, and its
    # refusals count as well.
    import stella.app
    from stella.api import native
    from stella.app import create_app
    from stella.settings import load_settings
    from tests.live import NO_MLX

    dialects = tuple(d for d in stella.app.DIALECTS if d != "stella.api.aliases")
    monkeypatch.setattr(stella.app, "DIALECTS", dialects)
    app = create_app(load_settings(NO_MLX, environ={}))
    [route] = [r for r in app.routes if getattr(r, "path", "") == "/api/v1/generate"]
    assert route.endpoint is native.generate  # type: ignore[attr-defined]
    label = 'stella_rejections_total{api="native",code="model_not_found"}'
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            r = await c.post("/api/v1/generate", json={"model": _NO_SUCH, "prompt": "a"})
            assert r.status_code == 404, r.text
            assert value((await c.get("/metrics")).text, label) == 1


def test_refusals_of_metrics_and_admin_routes_are_not_counted() -> None:
    import hashlib

    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    keys = {
        "boss": {"sha256": sha("sk-metrics-admin-1"), "admin": True},
        "some": {"sha256": sha("sk-metrics-user-1"), "models": ["echo"]},
    }
    admin = {"Authorization": "Bearer sk-metrics-admin-1"}
    with run_stella({"auth": {"keys": keys}}) as server:
        assert httpx.get(server.url + "/metrics").status_code == 401
        user = {"Authorization": "Bearer sk-metrics-user-1"}
        assert httpx.get(server.url + "/metrics", headers=user).status_code == 403
        route = {"name": "echo", "backend": "echo"}  # a configured route's name: 409
        r = httpx.post(server.url + "/api/v1/models", json=route, headers=admin)
        assert r.status_code == 409, r.text
        text = scrape(server, headers=admin)
        assert value(text, "stella_rejections_total") == 0, text
        # An inference refused for want of a key still is.
        body = {"model": "echo", "messages": [{"role": "user", "content": "a"}]}
        assert httpx.post(server.url + "/api/v1/chat", json=body).status_code == 401
        text = scrape(server, headers=admin)
        assert value(text, 'stella_rejections_total{api="native",code="unauthorized"}') == 1


def test_a_first_token_after_several_attempts_lands_in_its_bucket() -> None:
    # Retries and fallbacks each get ttft_timeout_s (120 s): a client's wait of 400 s
    # counts under le=600, not in +Inf with nothing to read a quantile from.
    from types import SimpleNamespace

    from stella.metrics import DURATION_BUCKETS, Metrics

    m = Metrics(SimpleNamespace(router=SimpleNamespace(counted={"r"})))
    m.observe(
        {
            "op": "chat",
            "model": "r",
            "api": "native",
            "backend": "b",
            "status": 200,
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "ttft_ms": 400_000.0,
            "total_ms": 450_000.0,
            "queue_ms": 0.0,
            "attempts": [],
        }
    )
    h = m.ttft["r"]
    assert h.bounds == DURATION_BUCKETS
    assert h.buckets[DURATION_BUCKETS.index(600.0)] == 1 and sum(h.buckets) == 1


async def test_the_text_is_written_off_the_event_loop_once_for_the_scrapes_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With hundreds of routes the text runs to megabytes (a tenth of a second and more to
    # write): written on the loop, it would hold every call the server is serving. Here it
    # is slow: calls are answered meanwhile, it ran on another thread, the scrapes that came
    # meanwhile share it, and it counts what was done when it began, not what came after.
    import asyncio
    import threading
    import time

    import stella.metrics
    from stella.app import create_app
    from stella.settings import load_settings
    from tests.live import NO_MLX

    writers: list[int] = []
    write = stella.metrics.generate_latest

    def slow_write(collector: object) -> bytes:
        writers.append(threading.get_ident())
        time.sleep(1)
        return write(collector)  # type: ignore[arg-type]

    monkeypatch.setattr(stella.metrics, "generate_latest", slow_write)
    app = create_app(load_settings(NO_MLX, environ={}))
    body = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "a"}]}
    label = 'stella_requests_total{api="native",backend="echo",model="echo",status="200"}'
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            assert (await c.post("/api/v1/chat", json=body)).status_code == 200
            scrapes = [asyncio.ensure_future(c.get("/metrics")) for _ in range(3)]
            while not writers:
                await asyncio.sleep(0.01)
            assert (await c.get("/health")).status_code == 200
            assert (await c.post("/api/v1/chat", json=body)).status_code == 200
            assert not any(s.done() for s in scrapes)  # answered while the text was written
            texts = {(await s).text for s in scrapes}
            assert writers[0] != threading.get_ident()  # not on the loop's thread
            assert len(writers) == 1 and len(texts) == 1  # one text for the three scrapes
            assert value(texts.pop(), label) == 1  # the call made meanwhile is not in it
            assert value((await c.get("/metrics")).text, label) == 2
