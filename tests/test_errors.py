"""Every error before the first byte: status, code, the field's path, never a 500."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import httpx
import pytest

from stella.errors import RateLimited, Unavailable
from tests.live import ROOT, LiveServer, run_stella

ADMIN, LIMITED, USER = "sk-admin-0123456789", "sk-limited-0123456789", "sk-user-0123456789"
SCOPED = "sk-scoped-0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


CONFIG = {
    "server": {"max_body_bytes": 4096},
    "models": {"routes": {"other": {"backend": "echo", "aliases": ["oth"], "fallbacks": ["echo"]}}},
    "auth": {
        "keys": {
            "admin": {"sha256": sha(ADMIN), "admin": True},
            "limited": {"sha256": sha(LIMITED), "models": ["echo"], "requests_per_minute": 2},
            "user": {"sha256": sha(USER)},
            # May not use the default model (echo).
            "scoped": {"sha256": sha(SCOPED), "models": ["other"]},
        }
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with run_stella(CONFIG) as s:
        yield s


def post(
    server: LiveServer, body: object = None, key: str | None = USER, **kw: object
) -> httpx.Response:
    headers = dict(kw.pop("headers", {}) or {})  # type: ignore[arg-type]
    if key:
        headers["Authorization"] = f"Bearer {key}"
    path = str(kw.pop("path", "/api/v1/chat"))
    if body is not None and "content" not in kw:
        kw["json"] = body
    return httpx.post(server.url + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def error_of(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code
    assert body["request_id"] == r.headers["x-request-id"]
    return body["message"]


MSG = [{"role": "user", "content": "hi"}]


def test_malformed_json(server: LiveServer) -> None:
    r = post(server, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert error_of(r, 400, "invalid_request") == "JSON is malformed: input data was truncated"
    r = post(server, content=b'{"messages": [{"role": "user", "content": "x"}]} x')
    message = error_of(r, 400, "invalid_request")
    assert message.startswith("JSON is malformed: trailing characters (byte ")


def test_a_lone_surrogate_escape_is_named_as_such(server: LiveServer) -> None:
    # msgspec calls a lone high surrogate near a string's end "truncated" (it reads the
    # next 6 bytes as the low one it needs), a lone low one an invalid pair: both are one.
    json_type = {"content-type": "application/json"}

    def message(text: str) -> str:
        body = '{"model":"echo","messages":[{"role":"user","content":"' + text + '"}]}'
        return error_of(
            post(server, content=body.encode(), headers=json_type), 400, "invalid_request"
        )

    at = len('{"model":"echo","messages":[{"role":"user","content":"a\\ud800')
    for text in ("a\\ud800", "a\\ud800b"):  # fewer than 6 bytes follow the escape
        assert message(text) == f"JSON is malformed: invalid utf-16 surrogate pair (byte {at})"
    assert message("a\\udc00b").startswith("JSON is malformed: invalid utf-16 surrogate pair")
    # Cut off inside (or right after) the escape, the body is what msgspec says it is.
    for cut in ('{"messages":[{"content":"\\ud800', '{"messages":[{"content":"\\ud800\\ud'):
        r = post(server, content=cut.encode(), headers=json_type)
        assert error_of(r, 400, "invalid_request") == "JSON is malformed: input data was truncated"
    # An escaped backslash before `ud800` is no escape; a whole pair is a character.
    r = post(server, content=b'{"messages": [{"role":"x\\\\ud800', headers=json_type)
    assert error_of(r, 400, "invalid_request") == "JSON is malformed: input data was truncated"
    pair = {
        "model": "echo",
        "stream": False,
        "messages": [{"role": "user", "content": "\U0001f600"}],
    }
    r = post(server, content=json.dumps(pair).encode(), headers=json_type)  # as \\ud83d\\ude00
    assert r.status_code == 200 and r.json()["message"]["content"] == "\U0001f600", r.text


# Each route's smallest valid body, and a field of it that takes any JSON.
JSON_ROUTES = {
    "/api/v1/chat": (b'{"model":"echo","messages":[{"role":"user","content":"x"}]', b"metadata"),
    "/v1/chat/completions": (b'{"messages":[{"role":"user","content":"x"}]', b"metadata"),
    "/api/chat": (b'{"model":"echo","messages":[{"role":"user","content":"x"}]', b"format"),
    "/v1/messages": (
        b'{"model":"echo","max_tokens":5,"messages":[{"role":"user","content":"x"}]',
        b"tool_choice",
    ),
    "/generate": (b'{"prompt":"x"', b"unknown"),  # skipped, but read all the same
}


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_bad_bytes_and_deep_nesting_are_400(server: LiveServer, path: str) -> None:
    # Neither raises a msgspec error (a UnicodeDecodeError, a RecursionError): both were 500s.
    base, field = JSON_ROUTES[path]
    bodies = {
        "not valid UTF-8": base.replace(b'"x"', b'"\xff"') + b"}",
        "nested too deeply": base + b',"' + field + b'":{"a":' + b"[" * 1500 + b"]" * 1500 + b"}}",
    }
    for what, body in bodies.items():
        r = post(server, content=body, path=path, headers={"content-type": "application/json"})
        assert r.status_code == 400, (what, r.text)
        assert what in r.text, r.text
    r = post(server, content=base + b"}", path=path, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_body_in_another_charset_is_415_and_a_utf8_bom_is_ignored(
    server: LiveServer, path: str
) -> None:
    # Both read as "JSON is malformed: invalid character (byte 0)".
    body = JSON_ROUTES[path][0] + b"}"

    def send(content: bytes, ctype: str = "application/json") -> httpx.Response:
        return post(server, content=content, path=path, headers={"content-type": ctype})

    # RFC 8259 8.1: a parser may ignore a UTF-8 byte-order mark.
    for ctype in ("application/json", "text/plain"):
        r = send(b"\xef\xbb\xbf" + body, ctype)
        assert r.status_code == 200, (ctype, r.text)
    # Not two, nor one inside; a body of a mark alone is empty.
    assert "malformed" in send(b"\xef\xbb\xbf" * 2 + body).text
    assert "empty" in send(b"\xef\xbb\xbf").text
    for ctype in (
        "application/json; charset=UTF-8",
        'application/json;charset="utf8"',
        "text/plain;charset=us-ascii",
        # Old HTTP clients label every body latin-1: its ASCII JSON is UTF-8's bytes.
        "text/plain; charset=ISO-8859-1",
        # A quoted value's `;` is part of it (RFC 9110 5.6.6): no parameter follows.
        'application/json; foo="a;charset=utf-16"',
        'application/json; foo="a\\";charset=utf-16"',
    ):
        assert send(body, ctype).status_code == 200, ctype
    utf16 = body.decode().encode("utf-16")  # with its byte-order mark
    for content, ctype, said in (
        (utf16, "application/json; charset=utf-16", "charset='utf-16'"),
        (utf16[2:], "application/json; Charset=UTF-16LE", "charset='utf-16le'"),
        (utf16, "application/json; charset=UTF-32", "charset='utf-32'"),
        (utf16, 'application/json; foo="a;b"; charset="UTF-16"', "charset='utf-16'"),
        (utf16, "application/json", "UTF-16 byte-order mark"),
    ):
        r = send(content, ctype)
        assert r.status_code == 415, (ctype, r.text)
        assert "must be UTF-8" in r.text and said in r.text, r.text


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/generate", {"prompt": "x", "max_tokens": -100000000}, "$.max_tokens"),
        ("/api/llm/generate", {"prompt": "x", "max_tokens": 0}, "$.max_tokens"),
        ("/api/llm/stream", {"prompt": "x", "temperature": 99}, "$.temperature"),
        ("/api/v1/chat", {"messages": MSG, "options": {"max_tokens": 10**400}}, "max_tokens"),
        ("/api/v1/chat", {"messages": MSG, "options": {"top_k": 10**30}}, "top_k"),
        ("/api/v1/chat", {"messages": MSG, "options": {"seed": 2**64}}, "seed"),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 10**400}, "max_tokens"),
        (
            "/v1/messages",
            {"model": "echo", "max_tokens": 5, "messages": MSG, "tools": [{"name": ""}]},
            "$.tools[0].name",
        ),
    ],
)
def test_out_of_range_numbers_are_400(
    server: LiveServer, path: str, body: dict[str, object], where: str
) -> None:
    # Unchecked, a negative max_tokens on the prompt routes became a negative token
    # reservation that locked a limited model for weeks; a 400-digit one crashed the limiter.
    r = post(server, body, path=path)
    assert r.status_code == 400, r.text
    assert where in r.text


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        (
            "/api/chat",
            {"model": "echo", "messages": MSG, "options": {"temperature": 5}},
            "$.options.temperature",
        ),
        (
            "/api/chat",
            {"model": "echo", "messages": MSG, "options": {"repeat_penalty": 0}},
            "$.options.repeat_penalty",
        ),
        (
            "/api/chat",
            {"model": "echo", "messages": MSG, "options": {"presence_penalty": 2.5}},
            "$.options.presence_penalty",
        ),
        (
            "/api/generate",
            {"model": "echo", "prompt": "x", "options": {"frequency_penalty": -3}},
            "$.options.frequency_penalty",
        ),
        ("/v1/chat/completions", {"messages": MSG, "presence_penalty": 3}, "$.presence_penalty"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": -2.5}, "$.frequency_penalty"),
        # logit_bias as OpenAI has it: token ids (strings of digits) to -100..100, bounded.
        ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"a": 1}}, "$.logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, "$.logit_bias"),
        ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"5": 101}}, "$.logit_bias[...]"),
        (
            "/v1/chat/completions",
            {"messages": MSG, "logit_bias": {str(i): 1 for i in range(301)}},
            "$.logit_bias",
        ),
        (
            "/api/v1/chat",
            {"messages": MSG, "options": {"logit_bias": {"1.5": 1}}},
            "$.options.logit_bias",
        ),
        (
            "/api/v1/generate",
            {"prompt": "x", "options": {"logit_bias": {"99999999999": 1}}},
            "$.options.logit_bias",
        ),
        (
            "/api/v1/chat",
            {"messages": MSG, "options": {"presence_penalty": -2.1}},
            "$.options.presence_penalty",
        ),
        (
            "/v1/chat/completions",
            {"messages": MSG, "max_completion_tokens": -1},
            "$.max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": MSG, "max_completion_tokens": 0, "max_tokens": 5},
            "$.max_completion_tokens",
        ),
        (
            "/v1/messages",
            {"model": "echo", "max_tokens": 9, "messages": MSG, "stop_sequences": ["a"] * 17},
            "$.stop_sequences",
        ),
        (
            "/v1/messages",
            {"model": "echo", "max_tokens": 9, "messages": MSG, "temperature": 1.5},
            "$.temperature",
        ),
    ],
)
def test_translated_options_name_the_clients_field(
    server: LiveServer, path: str, body: dict[str, object], where: str
) -> None:
    r = post(server, body, path=path)
    assert r.status_code == 400, r.text
    assert f"`{where}`" in r.text, r.text


def test_wrong_type_names_the_path(server: LiveServer) -> None:
    r = post(server, {"model": "echo", "messages": MSG, "options": {"temperature": "hot"}})
    assert "$.options.temperature" in error_of(r, 400, "invalid_request")


def test_unknown_field_is_named(server: LiveServer) -> None:
    r = post(server, {"model": "echo", "messages": MSG, "temprature": 1})
    assert "temprature" in error_of(r, 400, "invalid_request")


def test_a_top_level_sampling_option_says_where_it_goes(server: LiveServer) -> None:
    # OpenAI's API has them at the top level; the native API in `options`.
    for name in ("temperature", "max_tokens"):
        r = post(server, {"model": "echo", "messages": MSG, name: 1})
        message = error_of(r, 400, "invalid_request")
        assert f"unknown field `{name}`" in message
        assert f'{{"options": {{"{name}": ...}}}}' in message
    # OpenAI's newer name goes under the one `options` knows.
    r = post(server, {"model": "echo", "messages": MSG, "max_completion_tokens": 5})
    message = error_of(r, 400, "invalid_request")
    assert '{"options": {"max_tokens": ...}}' in message
    r = post(server, {"model": "echo", "messages": MSG, "options": {"max_tokens": 5}})
    assert r.status_code == 200
    r = post(server, {"prompt": "x", "seed": 1}, path="/api/v1/generate")
    assert '"options"' in error_of(r, 400, "invalid_request")
    r = post(server, {"model": "echo", "messages": MSG, "temprature": 1})
    assert '"options"' not in error_of(r, 400, "invalid_request")


def test_openai_errors_name_the_missing_or_unknown_field(server: LiveServer) -> None:
    for body, param in (
        ({"model": "echo"}, "messages"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": "echo", "messages": [{"content": "x"}]}, "messages[0].role"),
    ):
        r = post(server, body, path="/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_model_name_is_bounded(server: LiveServer) -> None:
    for path in ("/api/v1/chat", "/v1/chat/completions"):
        r = post(server, {"model": "m" * 257, "messages": MSG}, path=path)
        assert r.status_code == 400 and "$.model: over 256 characters" in r.text, r.text


def test_metadata_is_bounded(server: LiveServer) -> None:
    # It goes into the request's log line: nested past reason or too large is a 400.
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    for path in ("/api/v1/chat", "/v1/chat/completions"):
        r = post(server, {"model": "echo", "messages": MSG, "metadata": deep}, path=path)
        assert r.status_code == 400 and "$.metadata: nested deeper than 16" in r.text, r.text
    r = post(server, {"model": "echo", "stream": False, "messages": MSG, "metadata": {"a": [1]}})
    assert r.status_code == 200
    with run_stella() as roomy:  # the default body limit, 1 MiB
        r = httpx.post(
            roomy.url + "/api/v1/chat",
            json={"model": "echo", "messages": MSG, "metadata": {"a": "x" * 70_000}},
        )
        assert r.status_code == 400 and "$.metadata: over 65536 bytes" in r.text, r.text


def test_bad_role_and_missing_messages(server: LiveServer) -> None:
    r = post(server, {"messages": [{"role": "wizard", "content": "x"}]})
    assert "$.messages[0].role" in error_of(r, 400, "invalid_request")
    r = post(server, {"model": "echo"})
    assert "messages" in error_of(r, 400, "invalid_request")


def test_empty_messages_and_empty_body(server: LiveServer) -> None:
    assert "$.messages" in error_of(post(server, {"messages": []}), 400, "invalid_request")
    r = post(server, content=b"", headers={"content-type": "application/json"})
    error_of(r, 400, "invalid_request")


def test_missing_and_wrong_key(server: LiveServer) -> None:
    error_of(post(server, {"messages": MSG}, key=None), 401, "unauthorized")
    error_of(post(server, {"messages": MSG}, key="sk-wrong"), 401, "unauthorized")
    ok = post(
        server,
        {"model": "echo", "messages": MSG, "stream": False},
        key=None,
        headers={"X-API-Key": USER},
    )
    assert ok.status_code == 200
    # An empty bearer (a client with an unset variable) does not hide the X-API-Key.
    ok = post(
        server,
        {"model": "echo", "messages": MSG, "stream": False},
        key=None,
        headers={"Authorization": "Bearer", "X-API-Key": USER},
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/chat"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/messages"),
        ("POST", "/api/chat"),
        ("POST", "/generate"),
        ("POST", "/api/llm/generate"),
        ("POST", "/api/chat/invoke"),
        ("GET", "/config"),
        ("GET", "/v1/models"),
    ],
)
def test_a_401_names_the_scheme_that_would_pass(server: LiveServer, method: str, path: str) -> None:
    # RFC 9110 11.6.1: a 401 MUST carry WWW-Authenticate, in every dialect's shape.
    for key in (None, "sk-wrong-0123456789"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.request(method, server.url + path, headers=headers, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer", (path, r.headers)


def test_forbidden_model_and_admin_route(server: LiveServer) -> None:
    # Register a second route as admin, then the limited key may not use it.
    r = post(server, {"name": "echo2", "backend": "echo"}, key=ADMIN, path="/api/v1/models")
    assert r.status_code == 201, r.text
    error_of(post(server, {"model": "echo2", "messages": MSG}, key=LIMITED), 403, "forbidden")
    error_of(post(server, None, key=USER, path="/api/v1/models/switch/echo2"), 403, "forbidden")


def test_models_outside_a_keys_scope_are_hidden_or_forbidden(server: LiveServer) -> None:
    # Per route, as inference and the listings are: hidden where listings leave the model
    # out, 403 where Ollama's empty "load" call would otherwise answer for it.
    auth = {"Authorization": f"Bearer {LIMITED}"}
    assert httpx.get(server.url + "/v1/models/other", headers=auth).status_code == 404
    assert httpx.get(server.url + "/v1/models/echo", headers=auth).status_code == 200
    assert httpx.get(server.url + "/v1/models/", headers=auth).status_code == 404
    r = post(server, {"model": "other"}, key=LIMITED, path="/api/show")
    assert r.status_code == 404
    assert post(server, {"model": "echo"}, key=LIMITED, path="/api/show").status_code == 200
    for path in ("/api/chat", "/api/generate"):
        assert post(server, {"model": "other"}, key=LIMITED, path=path).status_code == 403
        assert post(server, {"model": "other"}, key=USER, path=path).status_code == 200


def test_a_hidden_model_asked_for_by_an_alias_is_not_found_by_that_alias(
    server: LiveServer,
) -> None:
    # "oth" names route "other", which this key may not use: its 404 names "oth" alone.
    auth = {"Authorization": f"Bearer {LIMITED}"}
    for r in (
        httpx.get(server.url + "/v1/models/oth", headers=auth),
        httpx.get(server.url + "/v1/models/oth", headers={**auth, "anthropic-version": "x"}),
        httpx.post(server.url + "/api/show", headers=auth, json={"model": "oth"}),
    ):
        assert r.status_code == 404, r.text
        assert "'oth'" in r.text and "other" not in r.text, r.text
    # A call by that alias is refused 403 (the key may not use it), by that alias too.
    msgs = [{"role": "user", "content": "hi"}]
    for path, body in (
        ("/api/v1/chat", {"model": "oth", "messages": msgs}),
        ("/v1/chat/completions", {"model": "oth", "messages": msgs}),
        ("/api/chat", {"model": "oth", "messages": msgs}),
        ("/api/chat", {"model": "oth"}),  # Ollama's empty "load" call
        ("/v1/messages", {"model": "oth", "max_tokens": 5, "messages": msgs}),
    ):
        r = httpx.post(server.url + path, headers=auth, json=body)
        assert r.status_code == 403, (path, r.text)
        assert "'oth'" in r.text and "other" not in r.text, (path, r.text)


def test_listings_name_no_route_a_key_may_not_use(server: LiveServer) -> None:
    # The default (echo) and other's fallback (echo) are routes this key may not use.
    auth = {"Authorization": f"Bearer {SCOPED}"}
    listing = httpx.get(server.url + "/api/v1/models", headers=auth).json()
    assert listing["default"] is None
    assert [(m["name"], m["aliases"], m["fallbacks"]) for m in listing["models"]] == [
        ("other", ["oth"], [])
    ]
    assert httpx.get(server.url + "/api/llm/models", headers=auth).json() == {
        "models": ["other"],
        "default": None,
    }
    # A key that may use them is told of them.
    auth = {"Authorization": f"Bearer {USER}"}
    listing = httpx.get(server.url + "/api/v1/models", headers=auth).json()
    assert listing["default"] == "echo"
    assert next(m for m in listing["models"] if m["name"] == "other")["fallbacks"] == ["echo"]
    assert httpx.get(server.url + "/api/llm/models", headers=auth).json()["default"] == "echo"


def test_a_call_for_the_default_model_a_key_may_not_use_names_no_route(
    server: LiveServer,
) -> None:
    # No model asked for is the default (echo), which this key's listings hide: the 403
    # says "the default model", in every dialect, and names no route.
    auth = {"Authorization": f"Bearer {SCOPED}"}
    for path, body in (
        ("/api/v1/chat", {"messages": MSG}),
        ("/api/v1/generate", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": MSG}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/responses", {"input": "hi"}),
        ("/v1/messages", {"model": "", "max_tokens": 5, "messages": MSG}),
        ("/api/chat", {"model": "", "messages": MSG}),
        ("/api/chat", {"model": ""}),  # Ollama's empty "load" call
        ("/api/generate", {"model": "", "prompt": "hi"}),
        ("/generate", {"prompt": "hi"}),
        ("/api/chat/invoke", {"input_data": {"input": "hi"}}),
        ("/api/llm/generate", {"prompt": "hi"}),
        ("/api/llm/stream", {"prompt": "hi"}),
    ):
        r = httpx.post(server.url + path, headers=auth, json=body)
        assert r.status_code == 403, (path, r.text)
        assert "this key may not use the default model" in r.text, (path, r.text)
        assert "echo" not in r.text, (path, r.text)
    # A key that may use it is answered by it.
    r = post(server, {"messages": MSG, "stream": False})
    assert r.status_code == 200 and r.json()["model"] == "echo", r.text


def test_model_not_found_lists_known(server: LiveServer) -> None:
    msg = error_of(post(server, {"model": "gpt-17", "messages": MSG}), 404, "model_not_found")
    assert "echo" in msg and "other" in msg
    # A key scoped to some models is told of those only.
    r = post(server, {"model": "gpt-17", "messages": MSG}, key=LIMITED)
    msg = error_of(r, 404, "model_not_found")
    assert msg.endswith("known models: echo"), msg
    limited = {"Authorization": f"Bearer {LIMITED}"}
    for r in (
        httpx.get(server.url + "/v1/models/gpt-17", headers=limited),
        httpx.post(server.url + "/api/show", headers=limited, json={"model": "gpt-17"}),
        httpx.post(server.url + "/api/chat", headers=limited, json={"model": "gpt-17"}),
    ):
        assert r.status_code == 404 and "other" not in r.text, r.text


def test_conflict_deleting_default(server: LiveServer) -> None:
    r = httpx.delete(
        server.url + "/api/v1/models/echo", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    error_of(r, 409, "conflict")


def test_payload_too_large(server: LiveServer) -> None:
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 5000}]}
    error_of(post(server, big), 413, "payload_too_large")

    # Without Content-Length (chunked), the limit holds while reading.
    def gen() -> Iterator[bytes]:
        yield b'{"messages":[{"role":"user","content":"'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = post(server, content=gen(), headers={"content-type": "application/json"})
    error_of(r, 413, "payload_too_large")

    # The limit is the last byte allowed: a body of exactly max_body_bytes is read.
    def sized(n: int) -> bytes:
        head = b'{"model":"echo","stream":false,"messages":[{"role":"user","content":"'
        tail = b'"}]}'
        return head + b"z" * (n - len(head) - len(tail)) + tail

    json_type = {"content-type": "application/json"}
    assert post(server, content=sized(4096), headers=json_type).status_code == 200
    error_of(post(server, content=sized(4097), headers=json_type), 413, "payload_too_large")


def test_unsupported_media_type(server: LiveServer) -> None:
    r = post(server, content=b"<xml/>", headers={"content-type": "application/xml"})
    error_of(r, 415, "unsupported_media_type")


def test_curl_default_content_type_is_accepted(server: LiveServer) -> None:
    body = b'{"model":"echo","stream":false,"messages":[{"role":"user","content":"hi there"}]}'
    r = post(server, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["response"] == "hi there"


def test_octet_stream_is_read_as_json_as_ollama_does(server: LiveServer) -> None:
    # LiteLLM's async Ollama provider labels its JSON body so; Ollama reads it anyway.
    body = b'{"model":"echo","stream":false,"messages":[{"role":"user","content":"hi there"}]}'
    for path in ("/api/chat", "/api/v1/chat"):
        headers = {"content-type": "application/octet-stream"}
        r = post(server, content=body, headers=headers, path=path)
        assert r.status_code == 200, r.text


def test_rate_limited_with_headers(server: LiveServer) -> None:
    body = {"model": "echo", "messages": MSG, "stream": False}
    statuses = [post(server, body, key=LIMITED) for _ in range(4)]
    # Two a minute: whatever earlier tests spent, the third and fourth are refused.
    assert [r.status_code for r in statuses][2:] == [429, 429], [r.text for r in statuses]
    r = statuses[2]
    error_of(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert r.headers["x-ratelimit-limit"] == "2" and r.headers["x-ratelimit-remaining"] == "0"


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    # A client that waits exactly Retry-After must not be refused again: 2.001 s is 3.
    for seconds, header in ((2.001, "3"), (2.0, "2"), (2.6, "3"), (0.2, "1"), (0.0, "1")):
        assert RateLimited("x", retry_after=seconds).headers["Retry-After"] == header, seconds
    err = Unavailable("x")
    err.retry_in(1.0001)
    assert err.headers["Retry-After"] == "2" and err.retry_after == 1.0001


def test_a_backends_overload_says_when_to_come_back() -> None:
    # A backend that ends its answer with `overloaded` (no time of its own): the 503 (and
    # Anthropic's 529) still carries a Retry-After, as every 503 does.
    env = {
        "STELLA_BACKENDS__ECHO__FAIL_AFTER": "1",
        "STELLA_BACKENDS__ECHO__ERROR_CODE": "overloaded",
    }
    words = [{"role": "user", "content": "one two three"}]  # it fails after the first
    body = {"model": "echo", "messages": words, "stream": False}
    # No circuit opens on these failures: each call reaches the backend.
    with run_stella({"breaker": {"failure_threshold": 0}}, env) as s:
        for path, status in (
            ("/api/v1/chat", 503),
            ("/v1/chat/completions", 503),
            ("/v1/messages", 529),
        ):
            extra = {"max_tokens": 5} if path == "/v1/messages" else {}
            r = httpx.post(s.url + path, json={**body, **extra}, timeout=10)
            assert r.status_code == status, (path, r.text)
            assert int(r.headers["retry-after"]) >= 1, (path, r.headers)


def test_unknown_path_and_method(server: LiveServer) -> None:
    r = httpx.get(server.url + "/nope")
    error_of(r, 404, "not_found")
    r = httpx.get(server.url + "/api/v1/chat", headers={"Authorization": f"Bearer {USER}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_compressed_body_is_unsupported_not_malformed(server: LiveServer) -> None:
    import gzip
    import json

    body = gzip.compress(json.dumps({"model": "echo", "messages": MSG}).encode())
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    r = post(server, None, content=body, headers=headers)
    assert "'gzip'" in error_of(r, 415, "unsupported_media_type")
    # RFC 9110 15.5.16: a 415 for a coding says which the server takes.
    assert r.headers["accept-encoding"] == "identity"
    r = post(
        server,
        {"model": "echo", "messages": MSG, "stream": False},
        headers={"content-encoding": "identity"},
    )
    assert r.status_code == 200


def test_a_405_allows_every_method_of_the_path(server: LiveServer) -> None:
    # GET and POST /api/v1/models are two routes (a user's list, an admin's registration).
    r = httpx.put(server.url + "/api/v1/models", headers={"Authorization": f"Bearer {USER}"})
    error_of(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, HEAD, POST"


def test_a_405_on_generate_takes_its_flat_shape(server: LiveServer) -> None:
    r = httpx.put(server.url + "/generate", headers={"Authorization": f"Bearer {USER}"})
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    assert isinstance(r.json()["error"], str)  # as /generate's own errors have it
    r = post(server, {"prompt": 1}, path="/generate")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


# The last ones a URL path can't name (HTTP clients drop "." and ".." segments).
UNNAMEABLE = [".", "..", "...", "a/../b", "a/./b", "/lead", "trail/", "x//y"]


@pytest.mark.parametrize("alias", ["", " spaced ", "a\u0001", "x" * 129, "x7\n", *UNNAMEABLE])
def test_a_runtime_alias_is_checked_as_a_name_is(server: LiveServer, alias: str) -> None:
    route = {"name": "checked", "backend": "echo", "aliases": ["fine", alias]}
    r = post(server, route, key=ADMIN, path="/api/v1/models")
    assert "$.aliases[1]" in error_of(r, 400, "invalid_request")
    # The name itself too ("$" in a pattern also matches before a final newline).
    r = post(server, {"name": alias, "backend": "echo"}, key=ADMIN, path="/api/v1/models")
    assert "$.name" in error_of(r, 400, "invalid_request")


@pytest.mark.parametrize(
    ("upstream", "why"),
    [
        ("m" * 257, "length <= 256"),
        ("a\nb", "holds a control character ('\\n' at 1)"),
        ("a\u0000b", "holds a control character ('\\x00' at 1)"),
        ("tab\tbed", "holds a control character ('\\t' at 3)"),
    ],
)
def test_a_runtime_route_s_upstream_model_is_bounded_and_printable(
    server: LiveServer, upstream: str, why: str
) -> None:
    body = {"name": "upstreamed", "backend": "echo", "upstream_model": upstream}
    message = error_of(post(server, body, key=ADMIN, path="/api/v1/models"), 400, "invalid_request")
    assert message.startswith("$.upstream_model") or "`$.upstream_model`" in message, message
    assert why in message, message
    r = post(server, {**body, "upstream_model": "m" * 256}, key=ADMIN, path="/api/v1/models")
    assert r.status_code in (200, 201), r.text


def test_a_route_name_is_ascii(server: LiveServer) -> None:
    # README: ASCII letters; a letter such as "é" is refused, and the rule says why.
    r = post(server, {"name": "café", "backend": "echo"}, key=ADMIN, path="/api/v1/models")
    message = error_of(r, 400, "invalid_request")
    assert message.startswith("$.name: a route name is ASCII letters, digits and '._:-'"), message
    readme = (ROOT / "README.md").read_text()
    assert "a name or alias is ASCII letters, digits and `._:-`" in readme


def test_a_route_named_with_slashes_dots_and_colons_is_reached_by_its_path(
    server: LiveServer,
) -> None:
    route = {"name": "org/model:tag", "backend": "echo", "aliases": ["a.b", ".x/v1.2"]}
    r = post(server, route, key=ADMIN, path="/api/v1/models")
    assert r.status_code == 201, r.text
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(server.url + "/api/v1/models/switch/a.b", headers=auth)
    assert r.json() == {"default": "org/model:tag"}, r.text
    httpx.post(server.url + "/api/v1/models/switch/echo", headers=auth).raise_for_status()
    r = httpx.delete(server.url + "/api/v1/models/.x/v1.2", headers=auth)
    assert r.json() == {"removed": "org/model:tag"}, r.text


def test_registering_a_runtime_route_s_name_again_replaces_it_and_says_so(
    server: LiveServer,
) -> None:
    def register(**fields: object) -> httpx.Response:
        body = {"name": "again", "backend": "echo", **fields}
        return post(server, body, key=ADMIN, path="/api/v1/models")

    r = register(aliases=["again-1"])
    assert (r.status_code, r.json()) == (201, {"registered": "again"}), r.text
    r = register(backend="echo", aliases=["again-2"])
    assert (r.status_code, r.json()) == (200, {"registered": "again"}), r.text
    chat = {"stream": False, "messages": MSG}
    assert post(server, {**chat, "model": "again-2"}).status_code == 200
    assert post(server, {**chat, "model": "again-1"}).status_code == 404  # gone with it
    auth = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.delete(server.url + "/api/v1/models/again", headers=auth).status_code == 200
    assert register().status_code == 201  # removed, it is new again
    responses = httpx.get(server.url + "/openapi.json").json()["paths"]["/api/v1/models"]
    answers = responses["post"]["responses"]
    assert (
        answers["201"]["description"] == "Created" and "Replaced" in answers["200"]["description"]
    )
    assert answers["200"]["content"] == answers["201"]["content"]


def test_deleting_default_is_deleting_the_default_model(server: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.delete(server.url + "/api/v1/models/default", headers=auth)
    assert error_of(r, 409, "conflict") == "model 'echo' is the default model; it can't be removed"


def test_a_runtime_route_lists_each_alias_and_fallback_once_and_at_most_64(
    server: LiveServer,
) -> None:
    def register(**fields: object) -> httpx.Response:
        body = {"name": "listed", "backend": "echo", **fields}
        return post(server, body, key=ADMIN, path="/api/v1/models")

    message = error_of(register(aliases=["l1", "l2", "l1"]), 400, "invalid_request")
    assert message == "$.aliases[2]: 'l1' is listed twice"
    message = error_of(register(fallbacks=["other", "echo", "other"]), 400, "invalid_request")
    assert message == "$.fallbacks[2]: 'other' is listed twice"
    # Its own name is no alias; a fallback or backend it can't have is named by its path.
    r = register(aliases=["l1", "listed"])
    assert error_of(r, 400, "invalid_request") == "$.aliases[1]: 'listed' is the route's own name"
    r = register(fallbacks=["echo", "nope"])
    assert error_of(r, 400, "invalid_request") == "$.fallbacks[1]: unknown route 'nope'"
    r = register(backend="nope")
    assert error_of(r, 400, "invalid_request").startswith("$.backend: unknown backend 'nope'")
    many = [f"l{i}" for i in range(65)]
    assert "$.aliases" in error_of(register(aliases=many), 400, "invalid_request")
    assert "$.fallbacks" in error_of(register(fallbacks=many), 400, "invalid_request")
    r = register(aliases=many[:64])
    assert r.status_code == 201, r.text


def test_router_errors_take_the_shape_of_the_paths_dialect(server: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {USER}"}
    r = httpx.get(server.url + "/v1/messages", headers=auth)  # Anthropic
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["type"] == "error" and r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completion", headers=auth)  # OpenAI, a typo
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.delete(server.url + "/v1/chat/completions", headers=auth)  # the client's fault
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/api/pull", headers=auth)  # Ollama: the error is a string
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = httpx.post(server.url + "/api/v1/nope", headers=auth)  # the native API
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.post(server.url + "/api/llm/nope", headers=auth)  # stella's simple aliases
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_a_404_or_405_names_the_path_routing_read(server: LiveServer) -> None:
    # request.url's path is urlsplit's, which drops \n, \r and \t: a miss of
    # /v1/models/echo%0A named /v1/models/echo, a path that has a route.
    auth = {"Authorization": f"Bearer {USER}"}
    r = httpx.get(server.url + "/v1/models/echo%0A", headers=auth)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["message"] == "no route for /v1/models/echo\\n", r.text
    r = httpx.put(server.url + "/v1/models/ec%09ho", headers=auth)  # a route, not its method
    assert r.status_code == 405, r.text
    assert r.json()["error"]["message"] == "PUT is not allowed on /v1/models/ec\\tho", r.text
    r = httpx.get(server.url + "/api/v1/nope%0D%00", headers=auth)  # the native shape too
    assert error_of(r, 404, "not_found") == "no route for /api/v1/nope\\r\\x00"
    # A long path is cut (the request line may hold 64 KiB of it).
    r = httpx.get(server.url + "/api/v1/" + "a" * 10_000, headers=auth)
    message = error_of(r, 404, "not_found")
    assert message == "no route for /api/v1/" + "a" * 192 + "…", message


def test_public_routes_need_no_key(server: LiveServer) -> None:
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["timestamp"]
    assert health["backend"] is None  # keys are set: a public route names no backend
    assert httpx.get(server.url + "/ready").status_code == 200
    error_of(httpx.get(server.url + "/config"), 401, "unauthorized")


def test_usage_day_must_be_a_date(server: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    cases = (("abcd-ef-gh", 400), ("2026-02-30", 400), ("2026-11-7", 400), ("2026-11-26", 200))
    for day, status in cases:
        r = httpx.get(server.url + "/api/v1/usage", params={"day": day}, headers=auth)
        assert r.status_code == status, (day, r.text)


def test_usage_without_a_day_is_todays(server: LiveServer) -> None:
    import time

    auth = {"Authorization": f"Bearer {ADMIN}"}
    body = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(server.url + "/api/v1/chat", json=body, headers=auth).status_code == 200
    today = time.strftime("%Y-%m-%d", time.gmtime())
    rows = httpx.get(server.url + "/api/v1/usage", headers=auth).json()["usage"]
    # The UTC day may turn between the call and the check: then the report is empty.
    assert {r["day"] for r in rows} <= {today, time.strftime("%Y-%m-%d", time.gmtime())}
    assert rows or time.strftime("%Y-%m-%d", time.gmtime()) != today
