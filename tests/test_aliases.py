"""The request shapes of common self-hosted LLM services, each replaying its documented example."""

from __future__ import annotations

import hashlib
import json

import httpx

from tests.conftest import ECHO_ROUTES
from tests.live import LiveServer, run_stella


def test_invoke_shape(stella: LiveServer) -> None:
    # Example: POST /api/chat/invoke {"input_data": {"input": "..."}} -> {"output": "..."}
    r = httpx.post(
        stella.url + "/api/chat/invoke",
        json={"input_data": {"input": "What is LangServe?"}, "model": "echo"},
    )
    assert r.status_code == 200
    assert r.json()["output"] == "What is LangServe?"
    assert httpx.get(stella.url + "/health").json()["status"] == "ok"
    bad = httpx.post(stella.url + "/api/chat/invoke", json={"input_data": {}})
    assert bad.status_code == 400 and "`input` - at `$.input_data`" in bad.json()["error"]


def test_generate_v1_json_ndjson_and_sse(stella: LiveServer) -> None:
    # Example: POST /api/v1/generate {"prompt": "...", "stream": false} -> {"response": "..."}
    body = {"prompt": "Tell me a joke", "stream": False, "model": "echo"}
    assert (
        httpx.post(stella.url + "/api/v1/generate", json=body).json()["response"]
        == "Tell me a joke"
    )
    body["stream"] = True
    r = httpx.post(
        stella.url + "/api/v1/generate", json=body, headers={"Accept": "text/event-stream"}
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "{}"
    assert "".join(json.loads(d)["response"] for d in data[:-1]) == "Tell me a joke"
    r = httpx.post(stella.url + "/api/v1/generate", json=body)
    assert r.headers["content-type"] == "application/x-ndjson"


def test_generate_v1_weighs_the_accept_header(stella: LiveServer) -> None:
    # A substring test took a refused SSE (q=0) for a request of it, and missed one
    # written in capitals (media types are case-insensitive, RFC 9110 8.3.1).
    body = {"prompt": "a b", "model": "echo"}
    for accept, media in (
        ("text/event-stream;q=0, application/x-ndjson", "application/x-ndjson"),
        ("TEXT/EVENT-STREAM", "text/event-stream"),
        ("application/x-ndjson;q=0.5, text/event-stream", "text/event-stream"),
        ("text/event-stream;q=0.5, application/x-ndjson", "application/x-ndjson"),
        ("*/*", "application/x-ndjson"),
        ("application/json, text/event-stream", "text/event-stream"),
        ("", "application/x-ndjson"),
        # At the same q the range that names a form more specifically wins it: a client
        # that lists SSE, then */* for its errors' JSON, asks for SSE.
        ("text/event-stream, */*", "text/event-stream"),
        ("*/*, text/event-stream", "text/event-stream"),
        ("text/event-stream;q=0.5, application/*;q=0.5", "text/event-stream"),
        ("application/x-ndjson, text/*", "application/x-ndjson"),
        # Named alike, or neither acceptable: NDJSON, the default.
        ("text/event-stream, application/x-ndjson", "application/x-ndjson"),
        ("text/*, application/*", "application/x-ndjson"),
        ("text/event-stream;q=0, */*;q=0", "application/x-ndjson"),
    ):
        r = httpx.post(stella.url + "/api/v1/generate", json=body, headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), accept
        # The form depends on Accept: a cache must not give one for the other.
        assert "accept" in r.headers["vary"].lower(), (accept, r.headers)
    r = httpx.post(stella.url + "/api/v1/generate", json={**body, "stream": False})
    assert r.json()["response"] == "a b" and "accept" in r.headers["vary"].lower()
    # /openapi.json says so.
    spec = httpx.get(stella.url + "/openapi.json").json()
    said = spec["paths"]["/api/v1/generate"]["post"]["description"]
    assert "text/event-stream, */*" in said and "Vary: Accept" in said


def test_switch_model_shape(stella: LiveServer) -> None:
    # Example: POST /api/v1/models/switch/{model}
    r = httpx.post(stella.url + "/api/v1/models/switch/echo-slow")
    try:
        assert r.json() == {"default": "echo-slow"}
        assert httpx.get(stella.url + "/api/v1/models").json()["default"] == "echo-slow"
        # "default" names the default as it is now: the switched one.
        body = {"model": "default", "stream": False, "messages": [{"role": "user", "content": "a"}]}
        assert httpx.post(stella.url + "/api/v1/chat", json=body).json()["model"] == "echo-slow"
    finally:
        httpx.post(stella.url + "/api/v1/models/switch/echo").raise_for_status()


def test_config_is_the_configuration_started_with_and_models_the_routing_now(
    stella: LiveServer,
) -> None:
    # README: /config's `config` stays as stella started (its `default_model` follows a
    # switch); a registered route and the switched default show in /api/v1/models.
    r = httpx.post(stella.url + "/api/v1/models", json={"name": "echo-later", "backend": "echo"})
    r.raise_for_status()
    try:
        httpx.post(stella.url + "/api/v1/models/switch/echo-later").raise_for_status()
        shown = httpx.get(stella.url + "/config").json()
        assert shown["config"]["models"]["default"] == "echo"
        assert "echo-later" not in shown["config"]["models"]["routes"]
        assert shown["default_model"] == "echo-later"
        listing = httpx.get(stella.url + "/api/v1/models").json()
        assert listing["default"] == "echo-later"
        assert "echo-later" in [m["name"] for m in listing["models"]]
    finally:
        httpx.post(stella.url + "/api/v1/models/switch/echo").raise_for_status()
        httpx.delete(stella.url + "/api/v1/models/echo-later").raise_for_status()


def test_provider_field_and_chat_stream_and_v1_health(stella: LiveServer) -> None:
    # Example: POST /v1/chat/completions {"provider": "...", "model": "...", "messages": [...]}
    body = {
        "provider": "slow",
        "model": "echo-slow",
        "messages": [{"role": "user", "content": "hi you"}],
    }
    r = httpx.post(stella.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi you"
    # An upstream model no route names is models.allow_direct's to allow (off here).
    r = httpx.post(stella.url + "/v1/chat/completions", json={**body, "model": "anything"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    bad = httpx.post(stella.url + "/v1/chat/completions", json={**body, "provider": "http://evil"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "provider"
    r = httpx.post(
        stella.url + "/v1/chat/stream",
        json={"model": "echo", "messages": [{"role": "user", "content": "a b"}]},
    )
    assert r.text.rstrip().endswith("data: [DONE]")
    health = httpx.get(stella.url + "/v1/health").json()
    assert health["status"] == "ok" and health["providers"]["echo"]["ok"] is True


SCOPED_KEY = "sk-scoped-0123456789"
ELSEWHERE_KEY = "sk-elsewhere-0123456789"  # may use no route on `up`
ALL_KEY = "sk-all-0123456789"  # may use every route
PROVIDER_ROUTES = {
    "backends": {"up": {"kind": "echo"}},
    "models": {
        "routes": {
            # Listed first: the one a `provider` call without a model found first.
            "secret-up": {"backend": "up", "upstream_model": "up-a", "aliases": ["hush"]},
            # Serves upstream model "fast", which is also open-up's alias.
            "by-upstream": {"backend": "up", "upstream_model": "fast"},
            "open-up": {
                "backend": "up",
                "upstream_model": "up-b",
                "aliases": ["echo-cheap", "fast"],
            },
        }
    },
    "auth": {
        "keys": {
            "scoped": {
                "sha256": hashlib.sha256(SCOPED_KEY.encode()).hexdigest(),
                "models": ["open-up"],
            },
            "elsewhere": {
                "sha256": hashlib.sha256(ELSEWHERE_KEY.encode()).hexdigest(),
                "models": ["echo"],
            },
            "all": {"sha256": hashlib.sha256(ALL_KEY.encode()).hexdigest()},
        }
    },
}


def ask_provider(s: LiveServer, body: dict[str, object], key: str = SCOPED_KEY) -> httpx.Response:
    body = {"provider": "up", "messages": [{"role": "user", "content": "hi you"}], **body}
    auth = {"Authorization": f"Bearer {key}"}
    return httpx.post(s.url + "/v1/chat/completions", headers=auth, json=body)


def test_provider_takes_a_route_an_alias_or_an_upstream_model() -> None:
    with run_stella(PROVIDER_ROUTES) as s:
        for body in ({"model": "echo-cheap"}, {"model": "up-b"}, {"model": "open-up"}):
            r = ask_provider(s, body)
            assert r.status_code == 200, (body, r.text)
            assert r.json()["choices"][0]["message"]["content"] == "hi you"
        r = ask_provider(s, {"model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
        # A name or alias wins over another route's upstream model, as without `provider`.
        for body in ({"model": "fast"}, {"model": "fast", "provider": "up"}):
            auth = {"Authorization": f"Bearer {ALL_KEY}"}
            chat = {"messages": [{"role": "user", "content": "hi"}], **body}
            r = httpx.post(s.url + "/v1/chat/completions", headers=auth, json=chat)
            assert r.status_code == 200 and r.json()["model"] == "open-up", (body, r.text)


def test_provider_never_names_a_route_the_key_may_not_use() -> None:
    # A key limited to some models gets a route of its own on that backend; a refusal
    # names what the client sent, never a route the key's listings hide.
    with run_stella(PROVIDER_ROUTES) as s:
        r = ask_provider(s, {})  # no model: any route on the backend, one the key may use
        assert r.status_code == 200, r.text
        for model in ("up-a", "hush", "secret-up"):  # the last is the client's own word
            r = ask_provider(s, {"model": model})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
            message = r.json()["error"]["message"]
            assert message == f"this key may not use model {model!r}", message
            assert "secret-up" not in r.text or model == "secret-up", r.text
        r = ask_provider(s, {}, key=ELSEWHERE_KEY)
        assert r.status_code == 403, r.text
        message = r.json()["error"]["message"]
        assert message == "this key may not use the models of provider 'up'", message


def test_generate_plain_config_and_health_shape(stella: LiveServer) -> None:
    # Example: POST /generate {"prompt": "..."} -> {"response": "..."}; GET /config; GET /health
    r = httpx.post(stella.url + "/generate", json={"prompt": "hello world", "model": "echo"})
    assert r.json()["response"] == "hello world"
    cfg = httpx.get(stella.url + "/config").json()
    assert "config" in cfg
    h = httpx.get(stella.url + "/health").json()
    assert h["backend"] == "echo" and h["timestamp"].endswith("+00:00")


def test_llm_shape(stella: LiveServer) -> None:
    # Example: GET /api/llm/health, GET /api/llm/models, POST /api/llm/generate, POST /api/llm/stream
    assert httpx.get(stella.url + "/api/llm/health").json()["status"] == "ok"
    assert "echo" in httpx.get(stella.url + "/api/llm/models").json()["models"]
    r = httpx.post(stella.url + "/api/llm/generate", json={"prompt": "x y z", "model": "echo"})
    assert r.json()["response"] == "x y z"
    r = httpx.post(stella.url + "/api/llm/stream", json={"prompt": "x y", "model": "echo"})
    types = [json.loads(line)["type"] for line in r.text.splitlines()]
    assert types == ["start", "delta", "delta", "done"]
    info = httpx.get(stella.url + "/").json()
    assert info["name"] == "stella"


def test_direct_names_and_providers_only_with_allow_direct() -> None:
    # "backend/upstream-model" and {"provider", "model"} reach any upstream model by name:
    # both only when models.allow_direct is on.
    body = {"messages": [{"role": "user", "content": "hi you"}], "stream": False}
    with run_stella({**ECHO_ROUTES, "models": {"allow_direct": True}}) as s:
        r = httpx.post(s.url + "/api/v1/chat", json={**body, "model": "slow/anything"})
        assert r.status_code == 200 and r.json()["model"] == "slow/anything"
        r = httpx.post(
            s.url + "/v1/chat/completions", json={**body, "provider": "slow", "model": "x"}
        )
        assert r.status_code == 200 and r.json()["model"] == "slow/x"
        r = httpx.post(s.url + "/api/v1/chat", json={**body, "model": "nope/anything"})
        assert r.status_code == 404


def test_a_direct_name_switches_to_the_route_serving_it_or_is_not_a_route() -> None:
    # A direct "backend/upstream-model" name is the route serving that model, a runtime
    # one too, and that route becomes the default; a one-off route cannot be the default.
    with run_stella({**ECHO_ROUTES, "models": {"allow_direct": True}}) as s:
        rt = {"name": "rt", "backend": "slow", "upstream_model": "x"}
        assert httpx.post(s.url + "/api/v1/models", json=rt).status_code == 201
        r = httpx.post(s.url + "/api/v1/models/switch/slow/x")
        assert r.status_code == 200 and r.json() == {"default": "rt"}, r.text
        r = httpx.post(s.url + "/api/v1/models/switch/slow/other")
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert (error["code"], error["message"]) == (
            "model_not_found",
            "model 'slow/other' is not a route",
        )
        assert httpx.get(s.url + "/api/v1/models").json()["default"] == "rt"


def test_images_are_refused_not_ignored(stella: LiveServer) -> None:
    # Some clients send Ollama's `images` to these shapes too: dropped, the model would
    # answer as if it had seen none. A 400 naming the field; an empty list asks for none.
    for path, body, field in (
        ("/generate", {"prompt": "what is this?", "images": ["aGk="]}, "images"),
        ("/api/llm/generate", {"prompt": "what is this?", "images": ["aGk="]}, "images"),
        ("/api/llm/stream", {"prompt": "what is this?", "images": ["aGk="]}, "images"),
        (
            "/api/chat/invoke",
            {"input_data": {"input": "what is this?", "images": ["aGk="]}},
            "input_data.images",
        ),
        (
            "/api/chat/invoke",
            {"input_data": {"input": "what is this?"}, "images": ["aGk="]},
            "images",
        ),
    ):
        r = httpx.post(stella.url + path, json={"model": "echo", **body})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["code"] == "invalid_request", r.text
        assert r.json()["error"] == f"$.{field}: images are not supported", r.text
    for path, body in (
        ("/generate", {"prompt": "ab", "images": []}),
        ("/api/llm/generate", {"prompt": "ab", "images": []}),
        ("/api/llm/stream", {"prompt": "ab", "images": None}),
        ("/api/chat/invoke", {"input_data": {"input": "ab", "images": []}}),
        ("/api/chat/invoke", {"input_data": {"input": "ab"}, "images": []}),
    ):
        r = httpx.post(stella.url + path, json={"model": "echo", **body})
        assert r.status_code == 200 and "ab" in r.text, (path, r.text)
    # /openapi.json says so where it documents the field.
    schemas = httpx.get(stella.url + "/openapi.json").json()["components"]["schemas"]
    for name in ("PromptRequest", "InputData", "InvokeRequest"):
        described = schemas[name]["properties"]["images"]["anyOf"][0]["description"]
        assert described.startswith("images are not supported: a non-empty list is a 400")
