"""Operational routes: info, docs, OpenAPI, readiness, config; and `stella config`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.live import NO_MLX, LiveServer, merge, run_stella, to_toml


def test_info_for_api_clients_and_browsers(stella: LiveServer) -> None:
    info = httpx.get(stella.url + "/").json()
    assert info["name"] == "stella" and info["version"]
    assert info["links"]["chat"] == "/api/v1/chat"
    assert info["links"]["responses"] == "/v1/responses"
    r = httpx.get(stella.url + "/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/playground"


def test_the_playground_and_its_scripts_are_revalidated_before_use(stella: LiveServer) -> None:
    # Cached by a browser's own rules, an upgraded server's playground would run old JS.
    for path in ("/playground", "/static/playground.js", "/static/stella.js"):
        r = httpx.get(stella.url + path)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-cache", path
    for path in ("/static/playground.js", "/static/stella.js"):  # revalidated by ETag
        etag = httpx.get(stella.url + path).headers["etag"]
        again = httpx.get(stella.url + path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"


def test_the_playground_and_its_files_carry_defence_in_depth_headers(stella: LiveServer) -> None:
    # No MIME sniffing, no framing, only this origin's code; the playground page also names
    # its icon, so no browser asks for /favicon.ico (a 404 on every load).
    for path in (
        "/playground",
        "/static/playground.js",
        "/static/stella.js",
        "/static/favicon.svg",
    ):
        r = httpx.get(stella.url + path)
        assert r.status_code == 200, path
        assert r.headers["x-content-type-options"] == "nosniff", path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, path
        assert r.headers["referrer-policy"] == "no-referrer", path
    assert httpx.get(stella.url + "/static/favicon.svg").headers["content-type"] == "image/svg+xml"
    assert 'rel="icon" href="/static/favicon.svg"' in httpx.get(stella.url + "/playground").text


def test_get_answers_are_not_stored_by_any_cache() -> None:
    # RFC 9111 3.5 keeps a shared cache from reusing an answer to a request with
    # Authorization, not one with X-API-Key: one key's models, usage or config could reach
    # the next caller; health and readiness are the state of one moment.
    key = "sk-cache-0123456789"
    with run_stella({}, env={"STELLA_API_KEYS": f"ops={key}"}) as server:
        auth = {"X-API-Key": key}
        for path in (
            "/config",
            "/api/v1/usage",
            "/metrics",
            "/api/v1/models",
            "/v1/models",
            "/v1/models/echo",
            "/v1/health",
            "/api/llm/models",
            "/api/llm/health",
            "/api/tags",
            "/api/ps",
            "/api/version",
            "/health",
            "/ready",
            "/",
        ):
            for method in ("GET", "HEAD"):
                r = httpx.request(method, server.url + path, headers=auth)
                assert r.status_code == 200, (method, path, r.text)
                assert r.headers["cache-control"] == "no-store", (method, path, r.headers)
        # Refusals too (a 404 is heuristically cacheable), the router's own among them: a
        # path no route has, a method the path's routes do not take.
        for path, status in (
            ("/v1/models/nope", 404),
            ("/config", 401),
            ("/nope", 404),
            ("/v1/chat/completions", 405),
        ):
            for method in ("GET", "HEAD"):
                r = httpx.request(method, server.url + path, headers=auth if status != 401 else {})
                assert r.status_code == status, (method, path)
                assert r.headers["cache-control"] == "no-store", (method, path, r.headers)
        # The router's refusal of another method is no GET's answer.
        r = httpx.post(server.url + "/nope", headers=auth)
        assert r.status_code == 404 and "cache-control" not in r.headers
        # An inference's answer is no GET's: nothing added on the hot path.
        body = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(server.url + "/api/v1/chat", json=body, headers=auth)
        assert r.status_code == 200 and "cache-control" not in r.headers
        # The files keep their own rule: revalidated by ETag; the schema and its page,
        # which change with the configuration, are asked for again.
        for path in ("/playground", "/static/stella.js", "/openapi.json", "/docs"):
            assert httpx.get(server.url + path).headers["cache-control"] == "no-cache", path


def test_a_trailing_slash_redirects_by_path_not_by_host_header(stella: LiveServer) -> None:
    # A Location built from the Host header would point wherever the client (or a cache
    # poisoned by one) said: the redirect names the path only.
    evil = {"Host": "evil.example"}
    r = httpx.post(stella.url + "/api/v1/chat/", headers=evil, json={"model": "echo"})
    assert r.status_code == 307 and r.headers["location"] == "/api/v1/chat"
    r = httpx.get(stella.url + "/api/tags/?a=b%20c", headers=evil)
    assert r.status_code == 307 and r.headers["location"] == "/api/tags?a=b%20c"
    # Followed, the redirect answers as the path without the slash does.
    r = httpx.post(
        stella.url + "/api/v1/chat/",
        json={"model": "echo", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
        follow_redirects=True,
    )
    assert r.status_code == 200 and r.json()["response"] == "hi"
    # No such route either way: a 404 in stella's shape; "//host" is never a Location.
    r = httpx.get(stella.url + "/nope/")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with httpx.Client() as client:
        req = client.build_request("GET", stella.url + "/")
        req.url = req.url.copy_with(raw_path=b"//docs/")
        r = client.send(req)
    assert r.status_code == 404 and "location" not in r.headers, r.headers


def test_public_url_makes_links_absolute() -> None:
    with run_stella({"server": {"public_url": "https://llm.example.com/"}}) as server:
        info = httpx.get(server.url + "/").json()
        assert info["links"]["chat"] == "https://llm.example.com/api/v1/chat"
        spec = httpx.get(server.url + "/openapi.json").json()
        assert spec["servers"] == [{"url": "https://llm.example.com"}]


def test_openapi_is_generated_from_the_structs(stella: LiveServer) -> None:
    spec = httpx.get(stella.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    chat = spec["paths"]["/api/v1/chat"]["post"]
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ChatRequest"}
    props = spec["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"messages", "model", "stream", "options", "tools", "metadata"} <= set(props)
    options = spec["components"]["schemas"]["Options"]["properties"]
    penalty = {"type": "number", "minimum": -2, "maximum": 2}
    assert options["presence_penalty"]["anyOf"][0] == penalty
    assert options["frequency_penalty"]["anyOf"][0] == penalty
    bias = options["logit_bias"]["anyOf"][0]
    assert bias["maxProperties"] == 300 and "token id" in bias["description"]
    assert bias["additionalProperties"] == {"type": "number", "minimum": -100, "maximum": 100}
    assert "application/x-ndjson" in chat["responses"]["200"]["content"]
    assert "Start" in spec["components"]["schemas"] and "Done" in spec["components"]["schemas"]
    # A stream's error line says when to come back (its headers went out with `start`).
    error = spec["components"]["schemas"]["Error"]
    assert error["properties"]["retry_after"]["type"] == "number"
    assert "retry_after" not in error["required"]
    # Anthropic's API answers an overload with 529, and stella's dialect does too.
    messages = spec["paths"]["/v1/messages"]["post"]["responses"]
    assert "Retry-After" in messages["529"]["headers"]
    # A 502 may be an upstream's own 429 (upstream_rate_limited), whose wait passes on.
    completions = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "Retry-After" in completions["502"]["headers"]


def test_the_request_id_a_client_may_give_is_stated_as_it_is_checked(stella: LiveServer) -> None:
    from stella.calls import RID_PATTERN

    spec = httpx.get(stella.url + "/openapi.json").json()
    assert RID_PATTERN in spec["components"]["headers"]["X-Request-ID"]["description"]
    assert f"`{RID_PATTERN}`" in (Path(__file__).parent.parent / "README.md").read_text()
    for given, kept in (("a.B-9:_" * 16, True), ("a" * 129, False), ("a b", False), ("a/b", False)):
        r = httpx.get(stella.url + "/health", headers={"X-Request-ID": given})
        assert (r.headers["x-request-id"] == given) is kept, given


def test_docs_page_renders_the_schema(stella: LiveServer) -> None:
    r = httpx.get(stella.url + "/docs")
    assert r.status_code == 200 and "openapi.json" in r.text


def test_ready_and_config(stella: LiveServer) -> None:
    ready = httpx.get(stella.url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"]["default_model"] == "ok"
    cfg = httpx.get(stella.url + "/config").json()
    assert cfg["default_model"] == "echo"
    assert cfg["config"]["server"]["max_body_bytes"] == 8 * 1024 * 1024


def test_ready_says_why_the_default_model_failed_to_load() -> None:
    # Not "loading" forever: the reason, as the model_load_failed log line has it.
    config = {
        "models": {"default": "smollm2-135m"},
        "backends": {"local": {"enabled": True, "source": "/nonexistent/model"}},
    }
    with run_stella(config, base={}) as server:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = httpx.get(server.url + "/ready")
            if r.json()["checks"]["default_model"] != "loading":
                break
            time.sleep(0.1)
        assert r.status_code == 503
        assert r.json()["checks"]["default_model"].startswith("failed: mlx: ")
        assert "/nonexistent/model" in r.json()["checks"]["default_model"]


def test_a_model_that_cannot_load_falls_back_without_retries() -> None:
    # Loading a missing file again would fail again: the fallback answers at once.
    config = {
        "models": {
            "default": "echo",
            "routes": {
                "broken": {
                    "backend": "local",
                    "retries": 2,
                    "retry_backoff_s": 1.0,
                    "fallbacks": ["echo"],
                },
                "alone": {"backend": "local", "retries": 2},
            },
        },
        "backends": {"local": {"enabled": True, "preload": False, "source": "/nonexistent/m.gguf"}},
    }
    with run_stella(config, base={}) as server:

        def ask(model: str, stream: bool = False) -> httpx.Response:
            body = {
                "model": model,
                "stream": stream,
                "messages": [{"role": "user", "content": "hi"}],
            }
            return httpx.post(server.url + "/api/v1/chat", json=body, timeout=30)

        # With no fallback, the client is told not to ask again (the SDKs obey it).
        for stream in (False, True):
            r = ask("alone", stream)
            if stream:  # begun at once: the error is the stream's last line
                last = json.loads(r.text.splitlines()[-1])
                assert last["type"] == "error" and last["retryable"] is False, r.text
            else:
                assert r.status_code == 502, r.text
                assert r.headers["x-should-retry"] == "false"
                assert r.json()["error"]["retryable"] is False, r.text
        r = ask("broken")
        assert r.status_code == 200, r.text
        assert r.json()["backend"] == "echo", r.json()
        event = server.wait_event(lambda ev: ev["model"] == "broken")
        assert [(a["route"], a["error"]) for a in event["attempts"]] == [
            ("broken", "upstream_error"),
            ("echo", None),
        ]
        assert event["total_ms"] < 1000  # no backoff was waited for


def test_a_model_that_loads_on_first_use_is_ready() -> None:
    # preload = false: nothing is loading, and the first request loads it; a load
    # balancer following /ready must still send that request.
    config = {
        "models": {"default": "smollm2-135m"},
        "backends": {"local": {"enabled": True, "preload": False}},
    }
    with run_stella(config, base={}) as server:
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["default_model"] == "ok (loads on first use)"


def test_ready_lets_the_probe_come_once_the_cool_down_has_passed() -> None:
    # The default model's backend fails twice: its circuit opens and /ready says 503.
    # After the cool-down, with no traffic at all, /ready is 200 again (a load balancer
    # that kept requests away would otherwise keep the circuit open for good).
    config = {
        "backends": {"flaky": {"kind": "echo", "fail_first_calls": 2}},
        "models": {"default": "flaky", "routes": {"flaky": {"backend": "flaky", "retries": 0}}},
        "breaker": {"failure_threshold": 2, "cooldown_s": 1.0},
    }
    with run_stella(config) as server:
        chat = {"model": "flaky", "stream": False, "messages": [{"role": "user", "content": "x"}]}
        for _ in range(2):
            assert httpx.post(server.url + "/api/v1/chat", json=chat).status_code == 502
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 503 and r.json()["checks"]["circuit"] == "flaky: open"
        assert (
            'stella_circuit_state{backend="flaky"} 2.0' in httpx.get(server.url + "/metrics").text
        )
        time.sleep(1.1)
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 200, r.text
        assert "half_open" in r.json()["checks"]["circuit"]
        assert (
            'stella_circuit_state{backend="flaky"} 1.0' in httpx.get(server.url + "/metrics").text
        )
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert next(m for m in models if m["name"] == "flaky")["circuit"] == "half_open"
        health = httpx.get(server.url + "/v1/health").json()
        assert health["providers"]["flaky"]["circuit"] == "half_open"
        # The probe answers (the backend works now): closed.
        assert httpx.post(server.url + "/api/v1/chat", json=chat).status_code == 200
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 200 and "circuit" not in r.json()["checks"]


def test_ready_while_a_fallback_of_the_default_model_answers() -> None:
    # The default model's backend circuit is open, but its fallback's is not: requests
    # for the default model are answered, so the instance stays ready (and says why).
    config = {
        "backends": {"down": {"kind": "echo", "fail_before_first": True}},
        "models": {
            "default": "main",
            "routes": {
                "main": {"backend": "down", "retries": 0, "fallbacks": ["spare"]},
                "spare": {"backend": "echo"},
            },
        },
        "breaker": {"failure_threshold": 1, "cooldown_s": 60},
    }
    with run_stella(config) as server:
        chat = {"stream": False, "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(server.url + "/api/v1/chat", json=chat)
        assert r.status_code == 200 and r.json()["backend"] == "echo", r.text
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["circuit"] == "ok (down: open; fallback 'spare' answers)"


def test_stella_config_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stella", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["server"]["port"] == 8000
    bad = subprocess.run(
        [sys.executable, "-m", "stella", "config", "--check"],
        env={"STELLA_SERVER__PORT": "x", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "server.port" in bad.stderr


def test_config_shows_each_backend_with_the_defaults_that_apply(tmp_path: Path) -> None:
    # Only the kind written: /config and `stella config` show what the backend runs
    # with (its kind's defaults), not the one line of the file; a plugin kind without a
    # config struct is shown as written.
    config = {"backends": {"gpu-box": {"kind": "ollama"}, "odd": {"kind": "x", "enabled": False}}}
    expected = {
        "kind": "ollama",
        "enabled": True,
        "base_url": "http://127.0.0.1:11434",
        "connect_timeout_s": 10.0,
        "read_timeout_s": 300.0,
        "max_connections": 256,
        "keepalive_s": 30.0,
    }
    with run_stella(config) as server:
        shown = httpx.get(server.url + "/config").json()["config"]["backends"]
    conf = tmp_path / "stella.toml"
    conf.write_text(to_toml(merge(NO_MLX, config)))
    out = subprocess.run(
        [sys.executable, "-m", "stella", "config", "--config", str(conf)],
        env={k: v for k, v in os.environ.items() if not k.startswith("STELLA_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = json.loads(out.stdout)["backends"]
    for backends in (shown, printed):
        assert {k: backends["gpu-box"].get(k) for k in expected} == expected, backends
        assert backends["odd"] == {"kind": "x", "enabled": False}, backends
        assert backends["local"]["enabled"] is False and backends["local"]["max_queue"] == 16


async def test_usage_in_memory_keeps_the_last_31_days() -> None:
    from stella.state import USAGE_DAYS, MemoryState

    state = MemoryState()
    event = {"prompt_tokens": 2, "completion_tokens": 3, "status": 200}
    days = [f"2026-{m:02d}-{d:02d}" for m in (1, 2) for d in range(1, 29)]  # 56 days
    for day in days:
        state.record_usage("k", "echo", day, event)
        state.record_usage("k", "other", day, event)
    kept = sorted({d for _, _, d in state.usage})
    assert kept == days[-USAGE_DAYS:]
    rows = await state.get_usage(days[-1])
    assert [(r["model"], r["requests"], r["completion_tokens"]) for r in rows] == [
        ("echo", 1, 3),
        ("other", 1, 3),
    ]


async def test_usage_without_a_day_reports_today_only() -> None:
    from stella.app import create_app
    from stella.settings import load_settings

    app = create_app(
        load_settings(
            {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}, environ={}
        )
    )
    state = app.state.stella.state
    event = {"prompt_tokens": 2, "completion_tokens": 3, "status": 200}
    state.record_usage("k", "echo", "2020-01-01", event)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    state.record_usage("k", "echo", today, event)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
    ) as c:
        rows = (await c.get("/api/v1/usage")).json()["usage"]
        old = (await c.get("/api/v1/usage", params={"day": "2020-01-01"})).json()["usage"]
    # The UTC day may turn between the two reads: then today's row is yesterday's.
    assert [r["day"] for r in rows] in ([today], [])
    assert [r["day"] for r in old] == ["2020-01-01"]


def test_usage_counts_what_reached_a_backend_and_a_model_filter_takes_an_alias() -> None:
    # README (Keys, limits and shared state): what /api/v1/usage counts.
    config = {
        "backends": {
            "broken": {"kind": "echo", "fail_before_first": True},
            "midway": {"kind": "echo", "fail_after": 1},
            "slow": {"kind": "echo", "delay_s": 0.5},
        },
        "models": {
            "routes": {
                "chatty": {"backend": "echo", "aliases": ["chat-alias"]},
                "limited": {"backend": "echo"},
                "broken": {"backend": "broken", "retries": 0},
                "midway": {"backend": "midway", "retries": 0},
                "slow": {"backend": "slow"},
            }
        },
        "limits": {"models": {"limited": {"requests_per_minute": 1}}},
    }

    def chat(model: str, stream: bool = False) -> httpx.Response:
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "a b"}]}
        return httpx.post(server.url + "/api/v1/chat", json=body, timeout=10)

    with run_stella(config) as server:
        assert chat("chat-alias").status_code == 200  # counted under its route, chatty
        assert chat("nope").status_code == 404  # never reaches a backend: not counted
        assert [chat("limited").status_code for _ in range(2)] == [200, 429]  # 429: not
        assert chat("broken").status_code == 502  # before the first token: an error
        lines = chat("midway", stream=True).text.splitlines()
        assert json.loads(lines[-1])["type"] == "error"  # in-band, status 200: an error
        body = {"model": "slow", "messages": [{"role": "user", "content": "a b c d"}]}
        with httpx.stream("POST", server.url + "/api/v1/chat", json=body) as r:
            next(r.iter_lines())  # the start line, then the client leaves
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            e["finish_reason"] == "client_closed" for e in server.events("inference")
        ):
            time.sleep(0.05)
        usage = httpx.get(server.url + "/api/v1/usage").json()
        rows = {r["model"]: (r["requests"], r["errors"]) for r in usage["usage"]}
        assert rows == {
            "chatty": (1, 0),
            "limited": (1, 0),
            "broken": (1, 1),
            "midway": (1, 1),
            "slow": (1, 0),  # the client left: a request, no error
        }, rows
        assert usage["totals"]["requests"] == 5 and usage["totals"]["errors"] == 2
        for asked in ("chat-alias", "chatty"):  # an alias keeps its route's rows
            r = httpx.get(server.url + "/api/v1/usage", params={"model": asked}).json()
            assert [(u["model"], u["requests"]) for u in r["usage"]] == [("chatty", 1)], asked
        r = httpx.get(server.url + "/api/v1/usage", params={"model": "nope"}).json()
        assert r["usage"] == [] and r["totals"]["requests"] == 0


async def test_usage_rows_per_key_and_day_are_bounded() -> None:
    # With models.allow_direct a key can name any model: its rows stop growing.
    from stella.api.admin import MAX_MODELS_PER_KEY_DAY, usage_listener
    from stella.state import MemoryState

    state = MemoryState()
    record = usage_listener(state)
    for i in range(MAX_MODELS_PER_KEY_DAY + 50):
        record({"key": "k", "model": f"up/model-{i}", "prompt_tokens": 1, "status": 200})
    record({"key": "k", "model": "up/model-0", "prompt_tokens": 1, "status": 200})
    record({"key": "j", "model": "up/model-999", "prompt_tokens": 1, "status": 200})
    rows = await state.get_usage()
    mine = {r["model"]: r["requests"] for r in rows if r["key"] == "k"}
    assert len(mine) == MAX_MODELS_PER_KEY_DAY + 1
    assert mine["(other)"] == 50 and mine["up/model-0"] == 2
    assert {r["model"] for r in rows if r["key"] == "j"} == {"up/model-999"}


def _sse_events(text: str) -> list[dict]:
    """The events of an SSE body, as a reader sees them: `data` lines joined, the `event`
    "message" when it has no name; comments are not events."""
    events: list[dict] = []
    name, data = "message", []
    for line in text.split("\n"):
        if not line:
            if data:
                events.append({"event": name, "data": "\n".join(data)})
            name, data = "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value
    assert not data, "the stream ended inside an event"
    return events


def _validate(spec: dict, method: str, template: str, r: httpx.Response) -> list:
    """Check an answer against what /openapi.json declares for its path, status and media
    type; the bodies validated (each line of NDJSON, each event of SSE)."""
    import jsonschema_rs

    declared = spec["paths"][template][method]["responses"]
    assert str(r.status_code) in declared, (method, template, r.status_code, r.text)
    assert "x-request-id" in r.headers and "X-Request-ID" in declared[str(r.status_code)]["headers"]
    if r.status_code >= 400:  # every error says whether to try again, as declared
        assert r.headers["x-should-retry"] in ("true", "false")
        assert "x-should-retry" in declared[str(r.status_code)]["headers"]
        # An error's body may quote the request: a browser reads it as JSON, nothing else.
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "X-Content-Type-Options" in declared[str(r.status_code)]["headers"]
    if r.status_code == 401:  # RFC 9110 11.6.1
        assert r.headers["www-authenticate"] == "Bearer"
        assert "WWW-Authenticate" in declared["401"]["headers"]
    if method == "get" and r.status_code != 503:  # (a draining server's, before any route)
        # A GET's answer depends on the key or the moment: no cache keeps it.
        assert r.headers["cache-control"] == "no-store", (template, r.headers)
        assert "Cache-Control" in declared[str(r.status_code)]["headers"]
    content = declared[str(r.status_code)]["content"]
    media = r.headers["content-type"].split(";")[0]
    assert media in content, (method, template, r.status_code, media, list(content))
    components = spec["components"]

    class JsonText:
        """contentMediaType application/json: the string's JSON is valid against its
        contentSchema (JSON Schema leaves it an annotation; OpenAPI tools check it)."""

        def __init__(self, parent: dict, value: str, path: list) -> None:
            assert value == "application/json"
            schema = {**parent["contentSchema"], "components": components}
            self.validator = jsonschema_rs.validator_for(schema)

        def validate(self, instance: object) -> None:
            assert isinstance(instance, str)
            self.validator.validate(json.loads(instance))

    # The schema embeds the components, so that its $refs resolve.
    schema = {**content[media]["schema"], "components": components}
    validator = jsonschema_rs.validator_for(schema, keywords={"contentMediaType": JsonText})
    if media == "application/x-ndjson":
        items = [json.loads(line) for line in r.text.splitlines()]
    elif media == "application/json":
        items = [r.json()]
    elif media == "text/event-stream":
        items = _sse_events(r.text)
    else:
        items = [r.text]
    for item in items:
        errors = [e.message for e in validator.iter_errors(item)]
        assert not errors, (method, template, r.status_code, item, errors)
    return items


def _undeclared(schema: dict, item: object, components: dict, at: str = "$") -> list[str]:
    """The paths of the keys of `item` its schema does not name among an object's
    properties: sent, yet missing from the document (which allows more keys, so
    validation alone lets a field the route always sends go undeclared). Of a choice
    (anyOf, oneOf), the alternatives `item` is valid against; an SSE event's `data`, as
    the JSON its contentSchema describes."""
    import jsonschema_rs

    while "$ref" in schema:
        schema = components["schemas"][schema["$ref"].rpartition("/")[2]]
    out = []
    choice = schema.get("anyOf") or schema.get("oneOf")
    if choice:
        fits = [
            alt
            for alt in choice
            if jsonschema_rs.validator_for({**alt, "components": components}).is_valid(item)
        ]
        found = [_undeclared(alt, item, components, at) for alt in fits]
        return min(found, key=len, default=[])
    text = schema.get("else", schema)  # an SSE payload: JSON text, or the end marker
    if isinstance(item, str) and "contentSchema" in text:
        if item == schema.get("if", {}).get("const"):
            return []
        return _undeclared(text["contentSchema"], json.loads(item), components, at)
    if isinstance(item, dict) and "properties" in schema:
        for key, value in item.items():
            if key not in schema["properties"]:
                out.append(f"{at}.{key}")
            else:
                out += _undeclared(schema["properties"][key], value, components, f"{at}.{key}")
    elif isinstance(item, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(item):
            out += _undeclared(schema["items"], value, components, f"{at}[{i}]")
    return out


def test_answers_match_the_openapi_document() -> None:
    """Each answer of stella's own routes is declared by /openapi.json for its status, with
    a body its schema accepts, and carries the headers declared as always sent."""
    key = "sk-openapi-admin-1234"
    auth = {"Authorization": f"Bearer {key}"}
    msg = [{"role": "user", "content": "a b"}]
    config = {"limits": {"requests_per_minute": 100}}
    with run_stella(config, env={"STELLA_API_KEYS": f"ops={key}"}) as server:
        spec = httpx.get(server.url + "/openapi.json").json()
        calls: list[tuple[str, str, str, dict | None, dict]] = [
            ("get", "/", "/", None, {}),
            ("get", "/health", "/health", None, {}),
            ("get", "/ready", "/ready", None, {}),
            ("get", "/config", "/config", None, auth),
            ("get", "/config", "/config", None, {}),  # 401
            ("get", "/metrics", "/metrics", None, auth),
            ("get", "/api/v1/models", "/api/v1/models", None, auth),
            ("post", "/api/v1/chat", "/api/v1/chat", {"model": "echo", "messages": msg}, auth),
            (
                "post",
                "/api/v1/chat",
                "/api/v1/chat",
                {"model": "echo", "stream": False, "messages": msg},
                auth,
            ),
            ("post", "/api/v1/chat", "/api/v1/chat", {"model": "nope", "messages": msg}, auth),
            (
                "post",
                "/api/v1/generate",
                "/api/v1/generate",
                {"model": "echo", "prompt": "x"},
                auth,
            ),
            (
                "post",
                "/api/v1/generate",
                "/api/v1/generate",
                {"model": "echo", "prompt": "x y"},
                {**auth, "Accept": "text/event-stream"},
            ),
            (
                "post",
                "/api/v1/models",
                "/api/v1/models",
                {"name": "e2", "backend": "echo", "aliases": ["e2-alias"]},
                auth,
            ),
            ("post", "/api/v1/models/switch/{name}", "/api/v1/models/switch/e2", None, auth),
            ("post", "/api/v1/models/switch/{name}", "/api/v1/models/switch/echo", None, auth),
            ("delete", "/api/v1/models/{name}", "/api/v1/models/e2-alias", None, auth),
            ("delete", "/api/v1/models/{name}", "/api/v1/models/echo", None, auth),  # 409
            ("get", "/api/v1/usage", "/api/v1/usage", None, auth),
            # A runtime key's life: its answers as declared, the key routes' too.
            ("post", "/api/v1/keys", "/api/v1/keys", {"name": "oa", "expires_in_s": 60}, auth),
            ("patch", "/api/v1/keys/{name}", "/api/v1/keys/oa", {"requests_per_day": 5}, auth),
            ("patch", "/api/v1/keys/{name}", "/api/v1/keys/root", {"admin": True}, auth),  # 404
            ("post", "/api/v1/keys/{name}/rotate", "/api/v1/keys/oa/rotate", {"grace_s": 5}, auth),
            ("get", "/api/v1/keys", "/api/v1/keys", None, auth),
            ("delete", "/api/v1/keys/{name}", "/api/v1/keys/oa?purge=true", None, auth),
            ("post", "/api/v1/embed", "/api/v1/embed", {"model": "echo", "input": "a b"}, auth),
            ("post", "/api/v1/embed", "/api/v1/embed", {"model": "echo", "input": []}, auth),
        ]
        seen = []
        for method, template, path, body, headers in calls:
            r = httpx.request(method, server.url + path, json=body, headers=headers)
            seen.append((path, r.status_code))
            _validate(spec, method, template, r)
            answer = spec["paths"][template][method]["responses"][str(r.status_code)]
            for name in answer.get("headers", {}):
                if name.startswith("X-RateLimit") and r.is_success:
                    assert name.lower() in r.headers, (method, path, name)
        assert ("/api/v1/models/e2-alias", 200) in seen and ("/api/v1/models/echo", 409) in seen
        assert ("/config", 401) in seen and ("/api/v1/chat", 404) in seen
        assert ("/api/v1/keys/oa/rotate", 201) in seen and (
            "/api/v1/keys/oa?purge=true",
            200,
        ) in seen
        # Removed by an alias: answered with the route's own name, and gone by either name.
        r = httpx.post(
            server.url + "/api/v1/chat", json={"model": "e2", "messages": msg}, headers=auth
        )
        assert r.status_code == 404


def test_each_dialects_answers_match_the_openapi_document() -> None:
    """The OpenAI, Ollama, Anthropic and alias routes declare their own shapes: JSON
    answers, stream lines and errors are each valid against the schema /openapi.json
    gives for that path, status and media type."""
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    key = "sk-openapi-dialects-1234"
    auth = {"Authorization": f"Bearer {key}"}
    config = {
        "limits": {"requests_per_minute": 1000},
        "backends": {
            "failafter": {"kind": "echo", "fail_after": 2},
            # A reasoning model's upstream (its URL below): the fields that carry reasoning.
            "thinker": {"kind": "openai"},
        },
        "models": {
            "routes": {
                "echo-fail-after": {"backend": "failafter"},
                "thinks": {"backend": "thinker", "upstream_model": "thinks"},
            }
        },
    }
    chat = [{"role": "user", "content": "a b c d"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    a_tools = [{"name": "f", "input_schema": {"type": "object"}}]
    r_tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    # echo calls the first tool: a namespace's (a function_call with its namespace), or
    # a custom one (a custom_tool_call).
    r_namespace = [{"type": "namespace", "name": "n", "description": "d", "tools": r_tools}]
    r_custom = [{"type": "custom", "name": "c", "format": {"type": "text"}}]
    msgs = {"model": "echo", "max_tokens": 16, "messages": chat}
    calls: list[tuple[str, str, str, dict | None, int, str]] = [
        # OpenAI
        ("post", "/v1/chat/completions", "", {"model": "echo", "messages": chat}, 200, "json"),
        (
            "post",
            "/v1/chat/completions",
            "",
            {"model": "echo", "messages": chat, "tools": tools},
            200,
            "json",
        ),
        (
            "post",
            "/v1/chat/completions",
            "",
            {
                "model": "echo",
                "messages": chat,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            200,
            "event-stream",
        ),
        (
            "post",
            "/v1/chat/completions",
            "",
            {"model": "echo-fail-after", "messages": chat, "stream": True},
            200,
            "event-stream",
        ),
        *(
            ("post", path, "", {"model": "thinks", "messages": chat, "stream": s}, 200, media)
            for path, s, media in (
                ("/v1/chat/completions", False, "json"),
                ("/v1/chat/completions", True, "event-stream"),
                ("/v1/chat/stream", True, "event-stream"),
            )
        ),
        ("post", "/v1/chat/completions", "", {"model": "echo", "messages": chat, "n": 2}, 400, ""),
        ("post", "/v1/chat/completions", "", {"model": "nope", "messages": chat}, 404, ""),
        ("post", "/v1/chat/stream", "", {"model": "echo", "messages": chat}, 200, "event-stream"),
        ("post", "/v1/completions", "", {"model": "echo", "prompt": "a b"}, 200, "json"),
        (
            "post",
            "/v1/completions",
            "",
            {"model": "echo", "prompt": "a b", "stream": True},
            200,
            "event-stream",
        ),
        ("post", "/v1/completions", "", {"model": "echo"}, 400, ""),
        ("get", "/v1/models", "", None, 200, "json"),
        ("get", "/v1/models/{model}", "/v1/models/echo", None, 200, "json"),
        ("get", "/v1/models/{model}", "/v1/models/nope", None, 404, ""),
        ("get", "/v1/health", "", None, 200, "json"),
        ("post", "/v1/embeddings", "", {"model": "echo", "input": ["a b", "c"]}, 200, "json"),
        (
            "post",
            "/v1/embeddings",
            "",
            {"model": "echo", "input": "a", "encoding_format": "base64"},
            200,
            "json",
        ),
        ("post", "/v1/embeddings", "", {"model": "echo", "input": [1, 2]}, 400, ""),
        # OpenAI Responses
        ("post", "/v1/responses", "", {"model": "echo", "input": "a b"}, 200, "json"),
        (
            "post",
            "/v1/responses",
            "",
            # Repeated in the Response, as Codex CLI sends them.
            {
                "model": "echo",
                "input": "a b",
                "reasoning": {"effort": "medium"},
                "text": {"verbosity": "low"},
                "prompt_cache_key": "k",
            },
            200,
            "json",
        ),
        (
            "post",
            "/v1/responses",
            "",
            {"model": "echo", "input": "a", "tools": r_tools},
            200,
            "json",
        ),
        (
            "post",
            "/v1/responses",
            "",
            {"model": "echo", "input": "a b", "max_output_tokens": 1},
            200,
            "json",
        ),
        (
            "post",
            "/v1/responses",
            "",
            {"model": "echo", "input": "a b", "stream": True},
            200,
            "event-stream",
        ),
        (
            "post",
            "/v1/responses",
            "",
            {"model": "echo", "input": "a", "tools": r_tools, "stream": True},
            200,
            "event-stream",
        ),
        *(
            ("post", "/v1/responses", "", {"model": "echo", "input": "a", "tools": t}, 200, "json")
            for t in (r_namespace, r_custom)
        ),
        *(
            (
                "post",
                "/v1/responses",
                "",
                {"model": "echo", "input": "a", "tools": t, "stream": True},
                200,
                "event-stream",
            )
            for t in (r_namespace, r_custom)
        ),
        (
            "post",
            "/v1/responses",
            "",
            {"model": "echo-fail-after", "input": "a b c d", "stream": True},
            200,
            "event-stream",
        ),
        *(
            ("post", "/v1/responses", "", {"model": "thinks", "input": "a", "stream": s}, 200, m)
            for s, m in ((False, "json"), (True, "event-stream"))
        ),
        ("post", "/v1/responses", "", {"model": "echo", "input": "a", "background": True}, 400, ""),
        ("post", "/v1/responses", "", {"model": "nope", "input": "a"}, 404, ""),
        # Ollama
        ("post", "/api/chat", "", {"model": "echo", "messages": chat}, 200, "ndjson"),
        (
            "post",
            "/api/chat",
            "",
            {"model": "echo", "messages": chat, "tools": tools},
            200,
            "ndjson",
        ),
        ("post", "/api/chat", "", {"model": "echo-fail-after", "messages": chat}, 200, "ndjson"),
        (
            "post",
            "/api/chat",
            "",
            {"model": "echo", "messages": chat, "stream": False, "tools": tools},
            200,
            "json",
        ),
        *(
            ("post", "/api/chat", "", {"model": "thinks", "messages": chat, "stream": s}, 200, m)
            for s, m in ((True, "ndjson"), (False, "json"))
        ),
        *(
            ("post", "/api/generate", "", {"model": "thinks", "prompt": "a", "stream": s}, 200, m)
            for s, m in ((True, "ndjson"), (False, "json"))
        ),
        ("post", "/api/chat", "", {"model": "echo", "messages": []}, 200, "json"),  # a load
        ("post", "/api/chat", "", {"model": "echo", "messages": 1}, 400, ""),
        ("post", "/api/generate", "", {"model": "echo", "prompt": "a b"}, 200, "ndjson"),
        (
            "post",
            "/api/generate",
            "",
            {"model": "echo", "prompt": "a b", "stream": False},
            200,
            "json",
        ),
        ("post", "/api/generate", "", {"model": "echo"}, 200, "json"),  # a load
        ("post", "/api/generate", "", {"prompt": "a b"}, 400, ""),
        ("get", "/api/tags", "", None, 200, "json"),
        ("get", "/api/ps", "", None, 200, "json"),
        ("post", "/api/show", "", {"model": "echo"}, 200, "json"),
        ("post", "/api/show", "", {"model": "nope"}, 404, ""),
        ("post", "/api/show", "", {}, 400, ""),
        ("get", "/api/version", "", None, 200, "json"),
        ("post", "/api/embed", "", {"model": "echo", "input": ["a b", "c"]}, 200, "json"),
        ("post", "/api/embed", "", {"model": "echo", "input": []}, 200, "json"),  # a load
        ("post", "/api/embed", "", {"model": "echo", "input": 1}, 400, ""),
        ("post", "/api/embeddings", "", {"model": "echo", "prompt": "a b"}, 200, "json"),
        # Anthropic
        ("post", "/v1/messages", "", msgs, 200, "json"),
        ("post", "/v1/messages", "", {**msgs, "tools": a_tools}, 200, "json"),
        ("post", "/v1/messages", "", {**msgs, "stream": True}, 200, "event-stream"),
        ("post", "/v1/messages", "", {"model": "echo", "messages": chat}, 400, ""),
        ("post", "/v1/messages/count_tokens", "", {"model": "echo", "messages": chat}, 200, "json"),
        ("post", "/v1/messages/count_tokens", "", {"model": "echo", "messages": []}, 400, ""),
        # aliases
        ("post", "/api/chat/invoke", "", {"input_data": {"input": "a b"}}, 200, "json"),
        ("post", "/api/chat/invoke", "", {"input_data": {}}, 400, ""),
        ("post", "/generate", "", {"prompt": "a b"}, 200, "json"),
        ("post", "/generate", "", {}, 400, ""),
        ("get", "/api/llm/health", "", None, 200, "json"),
        ("get", "/api/llm/models", "", None, 200, "json"),
        ("post", "/api/llm/generate", "", {"prompt": "a b"}, 200, "json"),
        ("post", "/api/llm/generate", "", {"prompt": 1}, 400, ""),
        ("post", "/api/llm/stream", "", {"prompt": "a b"}, 200, "ndjson"),
        ("post", "/api/llm/stream", "", {}, 400, ""),
    ]
    with (
        serve(FakeOpenAI().app) as url,
        run_stella(
            merge(config, {"backends": {"thinker": {"base_url": url + "/v1"}}}),
            env={"STELLA_API_KEYS": f"ops={key}"},
        ) as server,
    ):
        spec = httpx.get(server.url + "/openapi.json").json()
        for method, template, path, body, status, media in calls:
            r = httpx.request(method, server.url + (path or template), json=body, headers=auth)
            assert r.status_code == status, (method, path or template, r.status_code, r.text)
            assert media in r.headers["content-type"], (method, template, r.headers)
            items = _validate(spec, method, template, r)
            media_type = r.headers["content-type"].split(";")[0]
            if "json" in media_type or media_type == "text/event-stream":  # each field declared
                declared = spec["paths"][template][method]["responses"][str(r.status_code)]
                schema = declared["content"][media_type]["schema"]
                for item in items:
                    if media_type == "text/event-stream" and item["event"] == "message":
                        item = {"data": item["data"]}  # unnamed: the reader's default name
                    left = _undeclared(schema, item, spec["components"])
                    assert not left, (method, template, r.status_code, left)
            if template in ("/v1/chat/completions", "/api/chat", "/v1/responses") and (
                "echo-fail" in str(body)
            ):
                # The stream that failed after its start ended with its error.
                assert "error" in (items[-1] if media == "ndjson" else r.text), r.text
        for path in ("/v1/models", "/api/tags", "/api/llm/models", "/v1/messages", "/v1/responses"):
            method = "post" if path in ("/v1/messages", "/v1/responses") else "get"
            _validate(spec, method, path, httpx.request(method, server.url + path))  # 401


def test_a_draining_servers_refusals_are_declared_too() -> None:
    import asyncio

    from stella.app import create_app
    from stella.settings import load_settings

    app = create_app(
        load_settings(
            {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}, environ={}
        )
    )

    async def calls() -> tuple[dict, list[tuple[str, str, int]]]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            spec = (await c.get("/openapi.json")).json()
            r = await c.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
            out = [("get", "/", r.status_code)]
            app.state.stella.drain.draining = True
            for method, path in (
                ("get", "/"),
                ("get", "/metrics"),
                ("get", "/api/v1/models"),
                ("post", "/api/v1/chat"),
                ("get", "/health"),
                ("get", "/ready"),
            ):
                r = await c.request(method, path)
                out.append((method, path, r.status_code))
            return spec, out

    spec, seen = asyncio.run(calls())
    assert seen[0][2] == 307 and ("get", "/ready", 503) in seen
    for method, path, status in seen:
        assert str(status) in spec["paths"][path][method]["responses"], (method, path, status)
    assert "503" not in spec["paths"]["/health"]["get"]["responses"]
    # A fault of stella's own may meet any route: each documents its 500.
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert "500" in op["responses"], (method, path)


def test_a_draining_servers_refusals_take_each_dialects_declared_shape() -> None:
    import asyncio

    from stella.app import create_app
    from stella.settings import load_settings

    app = create_app(
        load_settings(
            {"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}}, environ={}
        )
    )
    paths = [
        ("post", "/v1/chat/completions"),
        ("get", "/v1/health"),
        ("post", "/v1/messages"),
        ("post", "/api/chat"),
        ("get", "/api/version"),
        ("post", "/api/chat/invoke"),
        ("post", "/generate"),
        ("get", "/api/llm/health"),
    ]

    async def calls() -> tuple[dict, list[tuple[str, str, httpx.Response]]]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as c:
            spec = (await c.get("/openapi.json")).json()
            app.state.stella.drain.draining = True
            return spec, [(m, p, await c.request(m, p)) for m, p in paths]

    spec, seen = asyncio.run(calls())
    for method, path, r in seen:
        assert r.status_code == 503, (path, r.text)
        _validate(spec, method, path, r)


async def test_a_disabled_metrics_route_is_not_advertised() -> None:
    # With metrics off, GET /metrics is a 404: / and /openapi.json named it all the same.
    from stella.app import create_app
    from stella.settings import load_settings

    def app(metrics: bool) -> object:
        overrides = {
            "models": {"default": "echo"},
            "backends": {"local": {"enabled": False}},
            "metrics": {"enabled": metrics},
        }
        return create_app(load_settings(overrides, environ={}))

    for enabled in (False, True):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app(enabled)), base_url="http://127.0.0.1"
        ) as c:
            links = (await c.get("/")).json()["links"]
            paths = (await c.get("/openapi.json")).json()["paths"]
            status = (await c.get("/metrics")).status_code
        assert ("metrics" in links) is enabled and ("/metrics" in paths) is enabled
        assert (status == 200) is enabled, status
    # The usage report's filters are in the document.
    usage = paths["/api/v1/usage"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in usage] == [
        ("day", "query"),
        ("key", "query"),
        ("model", "query"),
    ]


def test_a_request_id_is_kept_only_as_a_whole_match() -> None:
    # `$` would also match before a last newline: an ID is kept only when it is all of it.
    from stella.calls import request_id_for

    assert request_id_for("trace-1.a:b") == "trace-1.a:b"
    for given in ("abc\n", "abc\r\n", "a b", "x" * 129, ""):
        assert request_id_for(given) != given
