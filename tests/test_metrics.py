"""GET /metrics: counts, histograms, state gauges; labels stay bounded."""

from __future__ import annotations

import httpx

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
    assert 'stella_request_duration_seconds_count{model="echo"}' in after
    assert value(after, 'stella_rejections_total{api="native",code="model_not_found"}') >= 1
    assert "no-such-model-xyz" not in after  # client-chosen names never become labels
    assert 'stella_circuit_state{backend="echo"} 0.0' in after
    assert "stella_inflight_requests" in after
    from prometheus_client.parser import text_string_to_metric_families

    types = {f.name: f.type for f in text_string_to_metric_families(after)}
    assert types["stella_rate_limited"] == "counter"  # a running total, not a gauge
    assert types["stella_requests"] == "counter" and types["stella_inflight_requests"] == "gauge"


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


def test_a_name_counted_as_other_gets_its_label_once_it_is_a_route() -> None:
    body = {"stream": False, "messages": [{"role": "user", "content": "a"}]}
    with run_stella({"models": {"allow_direct": True}}) as server:
        chat = server.url + "/api/v1/chat"
        assert httpx.post(chat, json={**body, "model": "echo/later"}).status_code == 200
        assert 'model="echo/later"' not in scrape(server)  # a direct name: "other"
        route = {"name": "echo/later", "backend": "echo"}
        assert httpx.post(server.url + "/api/v1/models", json=route).status_code == 201
        assert httpx.post(chat, json={**body, "model": "echo/later"}).status_code == 200
        label = 'stella_requests_total{api="native",backend="echo",model="echo/later",status="200"}'
        assert value(scrape(server), label) == 1
