"""Embeddings through stella: the native route, OpenAI's /v1/embeddings (the official SDK)
and Ollama's /api/embed and /api/embeddings (the official client), against echo and the
fake OpenAI and Ollama upstreams, under keys, limits, time limits, retries and the circuit."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from stella.backends.echo import EMBED_DIMENSIONS, echo_vector
from stella.client import AsyncClient, BadRequestError, Client
from tests.fakes import ollama as fake_ollama
from tests.fakes import openai as fake_openai
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, free_port, run_stella

ADMIN = "sk-embed-admin-1234"
SCOPED = "sk-embed-scoped-1234"  # may use echo alone
RPM = "sk-embed-rpm-1234"  # one request a minute
TPM = "sk-embed-tpm-1234"  # 30 tokens a minute


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def auth(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOllama, LiveServer]]:
    """The two fakes, and one stella with routes to them, to echo and to a chat-only
    (Anthropic) backend, under keys."""
    up, ol = FakeOpenAI(), FakeOllama()
    with serve(up.app) as up_url, serve(ol.app) as ol_url:
        config = {
            "backends": {
                "up": {"kind": "openai", "base_url": up_url + "/v1"},
                "ol": {"kind": "ollama", "base_url": ol_url, "keep_alive": "10m"},
                # Never reached: a chat-only backend is refused before any call.
                "claude": {"kind": "anthropic", "base_url": f"http://127.0.0.1:{free_port()}"},
                "stall": {"kind": "echo", "stall_after": 0},
            },
            "models": {
                "routes": {
                    "emb": {"backend": "up", "upstream_model": "text-embedding-3-small"},
                    "emb-plain": {"backend": "up", "upstream_model": "plain-embed"},
                    "emb-floats": {"backend": "up", "upstream_model": "floats-only"},
                    **{
                        f"emb-{model}": {"backend": "up", "upstream_model": model}
                        for model in (*fake_openai.BROKEN_EMBEDDINGS, "index-null", "reversed")
                    },
                    "emb-500": {
                        "backend": "up",
                        "upstream_model": "status-500",
                        "retries": 1,
                        "retry_backoff_s": 0.01,
                        # Never tried for an embed call: its vectors are of another space.
                        "fallbacks": ["echo"],
                    },
                    "emb-short": {"backend": "up", "upstream_model": "short"},
                    "emb-no-usage": {"backend": "up", "upstream_model": "no-usage"},
                    "oemb": {"backend": "ol", "upstream_model": "nomic-embed-text"},
                    "claude": {"backend": "claude", "upstream_model": "claude-sonnet-4-5"},
                    "echo-stall": {"backend": "stall", "ttft_timeout_s": 0.5, "retries": 0},
                }
            },
            "auth": {
                "keys": {
                    "admin": {"sha256": sha(ADMIN), "admin": True},
                    "scoped": {"sha256": sha(SCOPED), "models": ["echo"]},
                    "rpm": {"sha256": sha(RPM), "requests_per_minute": 1},
                    "tpm": {"sha256": sha(TPM), "tokens_per_minute": 30},
                }
            },
            "breaker": {"failure_threshold": 0},  # failures on purpose here
        }
        with run_stella(config) as server:
            yield up, ol, server


def sdk(server: LiveServer, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def event_of(server: LiveServer, response: httpx.Response | str) -> dict[str, Any]:
    rid = response if isinstance(response, str) else response.headers["x-request-id"]
    return server.wait_event(lambda e: e["request_id"] == rid)


def test_the_openai_sdk_embeds_through_an_openai_compatible_upstream(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    up, _, server = fakes
    client = sdk(server)
    texts = ["the cat sat", "on the mat"]
    expected = [fake_openai.fake_vector(t, fake_openai.EMBED_DIMENSIONS) for t in texts]
    # The SDK asks for base64 by default and decodes it; asked for floats, it keeps them.
    for fmt in (openai.NOT_GIVEN, "float"):
        answer = client.embeddings.create(model="emb", input=texts, encoding_format=fmt)
        assert [d.embedding for d in answer.data] == expected
        assert [d.index for d in answer.data] == [0, 1]
        assert answer.model == "emb" and answer.object == "list"
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == 6
        sent = up.embed_requests[-1]
        # base64 upstream whatever the client asked (a fifth of the bytes); the upstream
        # model's name.
        assert sent == {
            "model": "text-embedding-3-small",
            "input": texts,
            "encoding_format": "base64",
        }
    # A server that knows no base64 answers floats: read as well.
    floats = client.embeddings.create(model="emb-floats", input=texts)
    assert [d.embedding for d in floats.data] == expected
    assert up.embed_requests[-1]["encoding_format"] == "base64"
    raw = client.embeddings.create(model="emb", input="one", encoding_format="base64")
    assert isinstance(raw.data[0].embedding, str)  # asked for: given as it is
    short = client.embeddings.create(model="emb", input="one", dimensions=4)
    assert len(short.data[0].embedding) == 4 and up.embed_requests[-1]["dimensions"] == 4


def test_the_openai_sdk_embeds_on_echo(fakes: tuple[FakeOpenAI, FakeOllama, LiveServer]) -> None:
    _, _, server = fakes
    client = sdk(server)
    texts = ["hello there", "general kenobi"]
    decoded = client.embeddings.create(model="echo", input=texts)  # base64, decoded
    floats = client.embeddings.create(model="echo", input=texts, encoding_format="float")
    expected = [echo_vector(t, EMBED_DIMENSIONS) for t in texts]
    # float32 values both ways: the same numbers.
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data] == expected
    assert floats.usage.prompt_tokens == 4  # echo counts words
    sized = client.embeddings.create(model="echo", input="x", dimensions=5)
    assert len(sized.data[0].embedding) == 5


def test_the_native_route(fakes: tuple[FakeOpenAI, FakeOllama, LiveServer]) -> None:
    _, _, server = fakes
    r = httpx.post(
        server.url + "/api/v1/embed",
        json={"model": "echo", "input": "a b c", "dimensions": 3},
        headers=auth(),
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": "echo",
        "embeddings": [echo_vector("a b c", 3)],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    r = httpx.post(
        server.url + "/api/v1/embed", json={"model": "emb", "input": ["x", "y"]}, headers=auth()
    )
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 2


def test_stellas_python_clients_embed(fakes: tuple[FakeOpenAI, FakeOllama, LiveServer]) -> None:
    _, _, server = fakes
    with Client(server.url, api_key=ADMIN) as client:
        answer = client.embed(["a b", "c"], model="echo", dimensions=4)
        assert answer.embeddings == [echo_vector("a b", 4), echo_vector("c", 4)]
        assert (answer.model, answer.usage.prompt_tokens) == ("echo", 3)
        with pytest.raises(BadRequestError) as caught:
            client.embed("x", model="claude")
        assert caught.value.code == "not_supported"

    async def embed() -> list[list[float]]:
        async with AsyncClient(server.url, api_key=ADMIN) as client:
            return (await client.embed("a b", model="echo")).embeddings

    assert asyncio.run(embed()) == [echo_vector("a b", EMBED_DIMENSIONS)]


def test_the_ollama_client_embeds_through_ollama_and_echo(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, ol, server = fakes
    client = ollama.Client(host=server.url, headers=auth())
    answer = client.embed(model="oemb", input=["a b", "c"], truncate=False, dimensions=4)
    assert answer.model == "oemb" and len(answer.embeddings) == 2
    assert all(len(v) == 4 for v in answer.embeddings)
    assert answer.prompt_eval_count == 3
    assert (answer.load_duration or 0) > 0 and (answer.total_duration or 0) > 0
    sent = ol.embed_requests[-1]
    # The backend's keep_alive, as its chats send it; truncate and dimensions as asked.
    assert sent == {
        "model": "nomic-embed-text",
        "input": ["a b", "c"],
        "truncate": False,
        "dimensions": 4,
        "keep_alive": "10m",
    }
    one = client.embed(model="oemb:latest", input="a b")  # a tag, as Ollama's clients send
    assert one.model == "oemb:latest"
    assert one.embeddings == [fake_ollama.fake_vector("a b", fake_ollama.EMBED_DIMENSIONS)]
    assert client.embed(model="echo", input="a b").embeddings == [
        echo_vector("a b", EMBED_DIMENSIONS)
    ]
    legacy = client.embeddings(model="echo", prompt="a b")
    assert list(legacy.embedding) == echo_vector("a b", EMBED_DIMENSIONS)
    # No text: no vectors, as Ollama answers a load.
    assert client.embed(model="echo", input=[]).embeddings == []
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="claude", input="x")
    assert caught.value.status_code == 400 and "does not make embeddings" in caught.value.error


def test_a_chat_only_backend_is_refused_before_admission(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, _, server = fakes
    r = httpx.post(
        server.url + "/api/v1/embed", json={"model": "claude", "input": "x"}, headers=auth()
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "not_supported"
    assert error["message"] == (
        "model 'claude' does not make embeddings (its backend, anthropic, has none)"
    )
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(server).embeddings.create(model="claude", input="x")
    assert caught.value.code == "not_supported" and caught.value.param == "model"
    # Never admitted: no inference event, a refusal counted.
    time.sleep(0.2)
    assert not [e for e in server.events("inference") if e["request_id"] == error["request_id"]]
    metrics = httpx.get(server.url + "/metrics", headers=auth()).text
    assert 'stella_rejections_total{api="native",code="not_supported"}' in metrics


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/v1/embed", {"model": "echo", "input": ["a", ""]}, "input[1]"),
        ("/api/v1/embed", {"model": "echo", "input": []}, "input"),
        ("/api/v1/embed", {"model": "echo", "input": "a", "dimensions": 0}, "dimensions"),
        ("/api/v1/embed", {"model": "echo", "input": "a", "stream": True}, "stream"),
        ("/v1/embeddings", {"model": "echo", "input": [[1, 2]]}, "input[0]"),
        ("/v1/embeddings", {"model": "echo", "input": ["a", 3]}, "input[1]"),
        ("/v1/embeddings", {"model": "echo", "input": ["a"] * 2049}, "input"),
        ("/v1/embeddings", {"model": "echo", "input": ""}, "input"),
        ("/v1/embeddings", {"model": "echo", "input": "a", "encoding_format": "x"}, None),
        ("/v1/embeddings", {"model": "echo", "input": "a", "user": "u" * 513}, "user"),
        ("/api/embed", {"model": "echo", "input": 5}, None),
        ("/api/embed", {"model": "echo", "input": ["a", ""]}, None),
        ("/api/embed", {"model": "echo", "input": "a", "keep_alive": "soon"}, None),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer], path: str, body: dict, param: str | None
) -> None:
    _, _, server = fakes
    r = httpx.post(server.url + path, json=body, headers=auth())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if path == "/api/embed":  # Ollama's shape: its text
        assert isinstance(error, str) and "$." in error
    elif path == "/v1/embeddings":
        assert error["type"] == "invalid_request_error"
        assert error["param"] == (param or "encoding_format")
    else:
        # The path, or (an unknown field) its name.
        assert (
            error["code"] == "invalid_request"
            and str(param).rpartition(".")[2] in (error["message"])
        )


def test_keys_are_asked_and_scoped(fakes: tuple[FakeOpenAI, FakeOllama, LiveServer]) -> None:
    _, _, server = fakes
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "sk-nobody-0000").embeddings.create(model="echo", input="x")
    r = httpx.post(server.url + "/api/v1/embed", json={"model": "echo", "input": "x"})
    assert r.status_code == 401
    scoped = sdk(server, SCOPED)
    assert scoped.embeddings.create(model="echo", input="x").data
    with pytest.raises(openai.PermissionDeniedError):
        scoped.embeddings.create(model="emb", input="x")
    r = httpx.post(
        server.url + "/api/embed", json={"model": "oemb", "input": "x"}, headers=auth(SCOPED)
    )
    assert r.status_code == 403 and "may not use model 'oemb'" in r.json()["error"]


def test_a_rate_limit_refuses_an_embed_call(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, _, server = fakes
    client = sdk(server, RPM)
    assert client.embeddings.create(model="echo", input="x").data
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model="echo", input="x")
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # A token limit reserves the inputs' estimate (four characters a token): a long input
    # finds no room where a short one does.
    tokens = sdk(server, TPM)
    assert tokens.embeddings.create(model="echo", input="a b").data  # 2 tokens
    with pytest.raises(openai.RateLimitError):
        tokens.embeddings.create(model="echo", input="x" * 400)  # ~100 tokens, over 28
    assert tokens.embeddings.create(model="echo", input="c").data


def test_one_inference_event_per_embed_call(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, _, server = fakes
    raw = sdk(server).embeddings.with_raw_response.create(
        model="emb", input=["a b", "my secret text"], user="u1"
    )
    ev = event_of(server, raw.headers["x-request-id"])
    assert ev["op"] == "embed" and ev["api"] == "openai"
    assert (ev["model"], ev["backend"], ev["upstream_model"]) == (
        "emb",
        "up",
        "text-embedding-3-small",
    )
    assert (ev["status"], ev["finish_reason"], ev["error_code"]) == (200, "stop", None)
    assert (ev["prompt_tokens"], ev["completion_tokens"], ev["inputs"]) == (5, 0, 2)
    assert ev["metadata"] == {"user": "u1"} and ev["stream"] is False
    assert ev["upstream_request_id"] == "req_fake_embed"
    assert [a["error"] for a in ev["attempts"]] == [None]
    # The inputs only with log.content; never the vectors.
    assert "input" not in ev and "my secret text" not in str(ev)
    rid = raw.headers["x-request-id"]
    assert len([e for e in server.events("inference") if e["request_id"] == rid]) == 1
    # A chat's event says it is one.
    r = httpx.post(
        server.url + "/api/v1/chat",
        json={"model": "echo", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(),
    )
    assert event_of(server, r)["op"] == "chat"
    # Counted apart from the chats.
    metrics = httpx.get(server.url + "/metrics", headers=auth()).text
    assert 'stella_embed_requests_total{api="openai",backend="up",model="emb",status="200"}' in (
        metrics
    )
    assert 'stella_embed_tokens_total{model="emb"}' in metrics
    assert 'model="emb"' not in "".join(
        line for line in metrics.splitlines() if line.startswith("stella_requests_total")
    )


def test_retries_stay_on_the_route_and_no_fallback_answers(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    up, _, server = fakes
    before = len(up.embed_requests)
    r = httpx.post(
        server.url + "/api/v1/embed", json={"model": "emb-500", "input": "x"}, headers=auth()
    )
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert len(up.embed_requests) - before == 2  # the try and its one retry
    ev = event_of(server, r)
    assert [(a["route"], a["error"]) for a in ev["attempts"]] == [
        ("emb-500", "upstream_error"),
        ("emb-500", "upstream_error"),
    ]


@pytest.mark.parametrize(
    ("model", "body", "status", "code", "tries"),
    [
        # Vectors that cannot be the answer: not retried, not the circuit's business.
        ("emb-short", {"input": ["a", "b"]}, 502, "upstream_error", 1),
        # The upstream refuses `dimensions` for its model.
        ("emb-plain", {"input": "a", "dimensions": 4}, 502, "upstream_rejected", 1),
        ("echo-stall", {"input": "a"}, 504, "upstream_timeout", 1),
    ],
)
def test_failures_end_in_the_pipelines_errors(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
    model: str,
    body: dict,
    status: int,
    code: str,
    tries: int,
) -> None:
    _, _, server = fakes
    r = httpx.post(server.url + "/api/v1/embed", json={"model": model, **body}, headers=auth())
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.headers["x-should-retry"] == "false"
    ev = event_of(server, r)
    assert ev["op"] == "embed" and ev["status"] == status and len(ev["attempts"]) == tries


def test_an_upstream_without_usage_is_estimated(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, _, server = fakes
    r = httpx.post(
        server.url + "/api/v1/embed",
        json={"model": "emb-no-usage", "input": "x" * 40},
        headers=auth(),
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10
    assert event_of(server, r)["usage_estimated"] is True


def test_log_content_and_the_circuit() -> None:
    """With log.content the inputs are logged (the caller's key masked); a backend whose
    embed calls fail opens its circuit as its chats would."""
    key = "sk-embed-content-1234"
    config = {
        "log": {"content": True},
        "backends": {"down": {"kind": "echo", "fail_before_first": True}},
        "models": {"routes": {"down": {"backend": "down", "retries": 0}}},
        "breaker": {"failure_threshold": 1, "cooldown_s": 60},
    }
    with run_stella(config, {"STELLA_API_KEYS": f"c={key}"}) as server:
        r = httpx.post(
            server.url + "/api/v1/embed",
            json={"model": "echo", "input": ["a b", f"my key is {key}"]},
            headers=auth(key),
        )
        assert r.status_code == 200
        assert event_of(server, r)["input"] == ["a b", "my key is ***"]
        first = httpx.post(
            server.url + "/api/v1/embed", json={"model": "down", "input": "x"}, headers=auth(key)
        )
        assert first.status_code == 502
        then = httpx.post(
            server.url + "/api/v1/embed", json={"model": "down", "input": "x"}, headers=auth(key)
        )
        assert then.status_code == 503 and then.json()["error"]["code"] == "unavailable"
        assert "circuit open" in then.json()["error"]["message"]


@pytest.fixture(scope="module")
def tight() -> Iterator[tuple[FakeOpenAI, FakeOllama, LiveServer]]:
    """A stella whose backends' circuits open at the first failure they are told, with
    routes that retry twice: what reaches the circuit, and what is tried again, shows."""
    up, ol = FakeOpenAI(), FakeOllama()
    again = {"retries": 2, "retry_backoff_s": 0.01}
    with serve(up.app) as up_url, serve(ol.app) as ol_url:
        config = {
            "backends": {
                "up": {"kind": "openai", "base_url": up_url + "/v1"},
                "ol": {"kind": "ollama", "base_url": ol_url},
            },
            "models": {
                "routes": {
                    "e501": {"backend": "up", "upstream_model": "no-embeddings", **again},
                    "e404": {"backend": "up", "upstream_model": "chat-only", **again},
                    "oe501": {"backend": "ol", "upstream_model": "chat-only", **again},
                    "emb": {"backend": "up", "upstream_model": "text-embedding-3-small"},
                    "ehuge": {"backend": "up", "upstream_model": "huge", **again},
                    "chuge": {"backend": "up", "upstream_model": "huge", **again},
                    "chat": {"backend": "up", "upstream_model": "ok"},
                    "ochat": {"backend": "ol", "upstream_model": "chat-only"},
                }
            },
            "breaker": {"failure_threshold": 1, "cooldown_s": 60},
        }
        with run_stella(config, {"STELLA_API_KEYS": f"admin={ADMIN}"}) as server:
            yield up, ol, server


def test_an_upstream_that_makes_no_embeddings_is_no_verdict_on_its_backend(
    tight: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    """llama.cpp without --embeddings (501), Ollama's chat model (501) and a chat-only
    server (404 for the path): a 400 `not_supported` naming the model, asked once, and
    the backend's circuit, which its chats share, is not told."""
    up, ol, server = tight
    for model, seen in (("e501", up.embed_requests), ("e404", up.embed_requests)) * 3 + (
        ("oe501", ol.embed_requests),
    ) * 3:
        before = len(seen)
        r = httpx.post(
            server.url + "/api/v1/embed", json={"model": model, "input": "x"}, headers=auth()
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "not_supported"
        assert error["message"].startswith(f"model {model!r} does not make embeddings (")
        assert len(seen) - before == 1  # not retried
        ev = event_of(server, r)
        assert [a["error"] for a in ev["attempts"]] == ["not_supported"]
    said = httpx.post(
        server.url + "/api/v1/embed", json={"model": "e501", "input": "x"}, headers=auth()
    )
    assert "Start it with `--embeddings`" in said.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(server).embeddings.create(model="e404", input="x")
    assert caught.value.code == "not_supported" and caught.value.param == "model"
    assert "404 for its embeddings path" in caught.value.message
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=server.url, headers=auth()).embed(model="oe501", input="x")
    assert refused.value.status_code == 400
    assert "this model does not support embeddings" in refused.value.error
    # The circuits stayed closed: the chats on both backends answer.
    for model in ("chat", "ochat"):
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={"model": model, "stream": False, "messages": [{"role": "user", "content": "hi"}]},
            headers=auth(),
        )
        assert r.status_code == 200, r.text


def test_an_answer_over_the_body_limit_is_neither_retried_nor_a_verdict(
    tight: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    """An answer longer than stella takes whole (an embed call's, a non-stream chat's) is
    its size, not the backend failing: a 502 at once, and the backend's circuit (open at
    its first failure here) still lets calls through."""
    up, _, server = tight
    for path, body, seen in (
        ("/api/v1/embed", {"model": "ehuge", "input": "x"}, up.embed_requests),
        (
            "/api/v1/chat",
            {"model": "chuge", "stream": False, "messages": [{"role": "user", "content": "x"}]},
            up.requests,
        ),
    ):
        before = len(seen)
        r = httpx.post(server.url + path, json=body, headers=auth(), timeout=30)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "upstream_error" and error["retryable"] is False
        assert "a response body over 67108864 bytes" in error["message"]
        assert len(seen) - before == 1
        assert len(event_of(server, r)["attempts"]) == 1
    r = httpx.post(
        server.url + "/api/v1/embed", json={"model": "emb", "input": "x"}, headers=auth()
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("nonfinite", "a number that is not finite (inf or NaN) for input 1"),
        ("ragged", f"vectors of {fake_openai.EMBED_DIMENSIONS} and of 7 dimensions"),
        ("empty-vector", "an empty vector for input 1"),
        ("dup-index", "embeddings answer whose indexes are not 0 to 1"),
        ("index-range", "embeddings answer whose indexes are not 0 to 1"),
        ("index-null", "embeddings answer whose indexes are not 0 to 1"),
    ],
)
def test_vectors_no_client_could_use_are_a_502(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer], model: str, problem: str
) -> None:
    """Infinities and NaNs (JSON has no word for them), vectors of unequal lengths or none,
    indexes that are not 0 to n-1 each once: a 502 `upstream_error`, not retried."""
    up, _, server = fakes
    before = len(up.embed_requests)
    r = httpx.post(
        server.url + "/api/v1/embed",
        json={"model": f"emb-{model}", "input": ["a", "b"]},
        headers=auth(),
    )
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_error" and error["retryable"] is False
    assert problem in error["message"]
    assert len(up.embed_requests) - before == 1


def test_vectors_are_put_in_the_order_of_their_indexes(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, _, server = fakes
    texts = ["a", "b", "c"]
    answer = sdk(server).embeddings.create(model="emb-reversed", input=texts)
    expected = [fake_openai.fake_vector(t, fake_openai.EMBED_DIMENSIONS) for t in texts]
    assert [d.embedding for d in answer.data] == expected


@pytest.mark.parametrize("path", ["/api/v1/embed", "/v1/embeddings", "/api/embed"])
def test_more_numbers_than_a_model_needs_are_a_400_naming_dimensions(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer], path: str
) -> None:
    _, _, server = fakes
    body = {"model": "echo", "input": ["x"] * 2048, "dimensions": 4097}
    r = httpx.post(server.url + path, json=body, headers=auth())
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    said = "2048 inputs of 4097 dimensions are 8390656 numbers, over 8388608 in one request"
    if path == "/api/embed":
        assert said in error and error.startswith("$.dimensions")
    else:
        assert said in error["message"]
        assert error.get("param", "dimensions") == "dimensions"
    # Within the bound: made.
    body = {"model": "echo", "input": ["x"] * 2, "dimensions": 4096}
    assert httpx.post(server.url + path, json=body, headers=auth()).status_code == 200


def test_echo_embeds_a_long_batch_without_holding_the_event_loop(
    fakes: tuple[FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    """Some 300,000 words (a second's work and more): /health answers meanwhile."""
    _, _, server = fakes
    texts = [" ".join(f"w{i}x{j}" for j in range(10_000)) for i in range(30)]
    gaps: list[float] = []

    async def run() -> int:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            embed = asyncio.ensure_future(
                client.post("/api/v1/embed", json={"model": "echo", "input": texts}, headers=auth())
            )
            await asyncio.sleep(0.2)  # the body sent and read
            while not embed.done():
                t = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                gaps.append(time.perf_counter() - t)
            return (await embed).status_code

    assert asyncio.run(run()) == 200
    assert len(gaps) > 5 and max(gaps) < 0.25, (len(gaps), max(gaps))
