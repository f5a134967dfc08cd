"""The ollama backend against the fake Ollama (tests/fakes/ollama.py): what its done line
reports, a model's load, a cloud model's sign-in, through the adapter and through stella."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from stella.backends import CallContext
from stella.backends.ollama import OllamaBackend, OllamaConfig
from stella.protocol import ChatRequest, Done, Message
from tests.fakes.ollama import CACHED, SIGNIN_URL, FakeOllama
from tests.fakes.server import serve
from tests.live import run_stella

HI = [Message(role="user", content="hi")]


@pytest.fixture
def box() -> Iterator[tuple[FakeOllama, str]]:
    """A fresh fake Ollama (its models loaded as a test leaves them) and its URL."""
    fake = FakeOllama()
    with serve(fake.app, "/api/version") as url:
        yield fake, url


def ollama(url: str, **config: object) -> OllamaBackend:
    return OllamaBackend("box", OllamaConfig(kind="ollama", base_url=url, **config))  # type: ignore[arg-type]


async def call(backend: OllamaBackend, model: str, ctx: CallContext) -> list:
    """The events of one chat of `model` (the backend started and closed around it)."""
    await backend.start()
    try:
        req = ChatRequest(model=model, messages=HI)
        return [e async for e in backend.chat(req, ctx)]
    finally:
        await backend.aclose()


def route(url: str, upstream_model: str, **settings: object) -> dict:
    """A stella config with route "m" on the fake Ollama at `url`."""
    return {
        "backends": {"box": {"kind": "ollama", "base_url": url}},
        "models": {
            "routes": {"m": {"backend": "box", "upstream_model": upstream_model, **settings}}
        },
    }


async def test_the_done_line_s_load_and_cached_tokens_reach_the_call(
    box: tuple[FakeOllama, str],
) -> None:
    # Ollama's load_duration (ns) is the call's load_ms; its prompt_eval_cached_count
    # (newer versions) the prompt's cached tokens, part of prompt_eval_count.
    fake, url = box
    fake.loaded.add("cached:latest")
    ctx = CallContext(request_id="r")
    events = await call(ollama(url), "cached", ctx)
    assert isinstance(events[-1], Done) and events[-1].usage.prompt_tokens == 26
    assert ctx.cached_tokens == CACHED and ctx.load_ms == 0.001
    ctx = CallContext(request_id="r")
    await call(ollama(url), "llama3", ctx)
    assert ctx.cached_tokens is None  # not said: not known, not 0


def test_ollama_s_load_and_cached_tokens_in_every_dialect_and_the_log(
    box: tuple[FakeOllama, str],
) -> None:
    fake, url = box
    fake.loaded.add("cached:latest")
    hi = [{"role": "user", "content": "hi"}]
    with run_stella(route(url, "cached")) as server:
        body = httpx.post(
            server.url + "/api/chat", json={"model": "m", "messages": hi, "stream": False}
        ).json()
        # As Ollama writes them: the load (1 us here) apart from the prompt's reading.
        assert body["load_duration"] == 1_000, body
        assert body["prompt_eval_cached_count"] == CACHED and body["prompt_eval_count"] == 26
        text = httpx.post(server.url + "/api/chat", json={"model": "m", "messages": hi}).text
        last = json.loads(text.splitlines()[-1])
        assert last["done"] and last["prompt_eval_cached_count"] == CACHED, last
        assert last["load_duration"] == 1_000, last
        r = httpx.post(
            server.url + "/api/v1/chat", json={"model": "m", "messages": hi, "stream": False}
        )
        assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert ev["cached_tokens"] == CACHED and ev["load_ms"] == 0.001, ev
        # A backend that counted none: none claimed, not 0.
        body = httpx.post(
            server.url + "/api/chat", json={"model": "echo", "messages": hi, "stream": False}
        ).json()
        assert "prompt_eval_cached_count" not in body and body["load_duration"] == 0, body


def test_a_cloud_model_s_sign_in_refuses_that_model_not_the_backend(
    box: tuple[FakeOllama, str],
) -> None:
    # Ollama's 401 for a cloud model while the server is not signed in: the message says
    # how to sign in, a fallback serves the route, and the backend's circuit, which one
    # failure opens here, is not told: its local models still answer.
    url = box[1]
    config = route(url, "cloud", retries=2, fallbacks=["local"])
    config["models"]["routes"]["local"] = {"backend": "box", "upstream_model": "llama3"}
    config["models"]["routes"]["alone"] = {"backend": "box", "upstream_model": "cloud"}
    config["breaker"] = {"failure_threshold": 1}
    hi = [{"role": "user", "content": "hi"}]
    with run_stella(config) as server:
        for _ in range(2):
            r = httpx.post(
                server.url + "/api/v1/chat",
                json={"model": "alone", "messages": hi, "stream": False},
            )
            assert r.status_code == 502, r.text
            error = r.json()["error"]
            assert error["code"] == "upstream_rejected" and not error["retryable"], error
            assert "`ollama signin`" in error["message"], error
            # The link names the host; its key is masked, as any URL's is.
            link = SIGNIN_URL.partition("&key=")[0] + "&key=***"
            assert error["message"].endswith(f"its sign-in link: {link}"), error
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert len(ev["attempts"]) == 1, ev  # not asked again: it would refuse again
        r = httpx.post(
            server.url + "/api/v1/chat", json={"model": "m", "messages": hi, "stream": False}
        )
        assert r.status_code == 200 and r.json()["response"] == "The sky is blue.", r.text
        r = httpx.get(server.url + "/api/v1/models").json()
        assert {m["circuit"] for m in r["models"] if m["backend"] == "box"} == {"closed"}, r


def test_a_401_to_a_key_stella_sends_is_still_the_backend_s() -> None:
    # Behind a proxy, or at ollama.com itself, a 401 without Ollama's signin_url refuses
    # the key stella sends: every model of the backend alike.
    b = OllamaBackend("box", OllamaConfig(kind="ollama", headers={"Authorization": "Bearer k"}))
    err = b.status_error(401, {}, b'{"error":"unauthorized"}')
    assert err.code == "upstream_error" and not err.no_verdict and err.falls_back
    signed = b.status_error(
        401, {}, b'{"error":"unauthorized","signin_url":"https://ollama.com/c"}'
    )
    assert signed.code == "upstream_rejected" and signed.no_verdict
    # Without a key of stella's, Ollama's bare 401 is its own refusal too.
    bare = ollama("http://127.0.0.1:9").status_error(401, {}, b'{"error":"unauthorized"}')
    assert bare.code == "upstream_rejected" and "`ollama signin`" in bare.message
