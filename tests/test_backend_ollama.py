"""The ollama backend against the fake Ollama (tests/fakes/ollama.py): what its done line
reports, a model's load, a cloud model's sign-in, through the adapter and through stella."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import ollama as ollama_client
import pytest

from stella.backends import CallContext
from stella.backends import ollama as ollama_backend
from stella.backends.ollama import OllamaBackend, OllamaConfig
from stella.errors import UpstreamStatus, UpstreamTimeout
from stella.protocol import ChatRequest, Done, Message
from tests.fakes.ollama import CACHED, LOAD_S, SIGNIN_URL, FakeOllama
from tests.fakes.server import serve
from tests.live import ndjson, run_stella

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


def test_a_model_the_upstream_does_not_have_goes_to_the_fallbacks(
    box: tuple[FakeOllama, str],
) -> None:
    # README's Backends example: a model not pulled on the Ollama box answers 404. The
    # route's fallback answers; the model is not asked for again on that box, and the
    # box's circuit, which one failure opens here, is not told: its other models answer.
    url = box[1]
    config = route(url, "error-before", retries=2, fallbacks=["echo"])
    config["models"]["routes"]["alone"] = {
        "backend": "box",
        "upstream_model": "not-pulled",  # older Ollama's words
        "retries": 2,
    }
    config["models"]["routes"]["other"] = {"backend": "box", "upstream_model": "llama3"}
    config["breaker"] = {"failure_threshold": 1}
    hi = [{"role": "user", "content": "hi there"}]
    with run_stella(config) as server:
        for _ in range(2):
            r = httpx.post(
                server.url + "/api/v1/chat", json={"model": "m", "messages": hi, "stream": False}
            )
            assert r.status_code == 200 and r.json()["backend"] == "echo", r.text
            assert r.json()["response"] == "hi there"
            ev = server.wait_event(lambda e, r=r: e["request_id"] == r.json()["id"])
            assert [(a["backend"], a["error"]) for a in ev["attempts"]] == [
                ("box", "upstream_rejected"),
                ("echo", None),
            ], ev
            assert ev["attempts"][0]["upstream_status"] == 404
        # Without a fallback, the 404 is the answer: asked once, and final.
        r = httpx.post(
            server.url + "/api/v1/chat", json={"model": "alone", "messages": hi, "stream": False}
        )
        assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
        error = r.json()["error"]
        assert error["code"] == "upstream_rejected" and not error["retryable"], error
        assert 'model "not-pulled" not found, try pulling it first' in error["message"], error
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert len(ev["attempts"]) == 1, ev
        r = httpx.post(
            server.url + "/api/v1/chat", json={"model": "other", "messages": hi, "stream": False}
        )
        assert r.status_code == 200 and r.json()["response"] == "The sky is blue.", r.text
        r = httpx.get(server.url + "/api/v1/models").json()
        assert {m["circuit"] for m in r["models"] if m["backend"] == "box"} == {"closed"}, r


def test_a_path_the_box_does_not_have_is_the_backend_s_fault(
    box: tuple[FakeOllama, str],
) -> None:
    # A base_url with a path Ollama does not serve (a proxy's prefix left in it): Go's
    # plain "404 page not found" to every call, which names no model. Not retried, the
    # fallback answers (a stream too, before its first token), and the box's circuit is
    # told: one failure opens it here.
    url = box[1]
    config = route(url + "/ollama", "llama3", retries=2, fallbacks=["echo"])
    config["breaker"] = {"failure_threshold": 1, "cooldown_s": 60}
    hi = [{"role": "user", "content": "hi there"}]
    with run_stella(config) as server:
        r = httpx.post(server.url + "/api/chat", json={"model": "m", "messages": hi})
        assert r.status_code == 200, r.text
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert "".join(line["message"]["content"] for line in lines) == "hi there", lines
        assert lines[-1]["done"] is True, lines
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert [(a["backend"], a["error"]) for a in ev["attempts"]] == [
            ("box", "upstream_path_not_found"),
            ("echo", None),
        ], ev
        assert ev["attempts"][0]["upstream_status"] == 404
        opened = server.wait_event(lambda e: e["backend"] == "box", name="circuit_opened")
        assert opened["error"] == "upstream_path_not_found", opened
        models = httpx.get(server.url + "/api/v1/models").json()["models"]
        assert next(m for m in models if m["name"] == "m")["circuit"] == "open"
        # Its circuit open, the fallback answers without asking the box.
        r = httpx.post(server.url + "/api/v1/chat", json={"model": "m", "messages": hi})
        assert r.status_code == 200 and ndjson(r.text)[-1]["backend"] == "echo", r.text
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert [a["backend"] for a in ev["attempts"]] == ["box", "echo"], ev
        assert "ms" not in ev["attempts"][0], ev  # skipped: its circuit is open


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


def loads(fake: FakeOllama) -> list[str]:
    """The models of the loads stella asked for (chats without messages), in order."""
    return [r["model"] for r in fake.requests if not r.get("messages")]


async def test_a_model_not_loaded_is_loaded_once_for_every_call_waiting(
    box: tuple[FakeOllama, str],
) -> None:
    # Ollama sends nothing until the model is loaded: the calls waiting for it count as
    # alive (their silence limit, 0.4 s here, does not fire) and share one load.
    fake, url = box
    b = ollama(url, keep_alive=0)
    await b.start()
    try:
        ctxs = [CallContext(request_id=f"r{i}", silence_limit_s=0.4) for i in range(3)]

        async def one(ctx: CallContext) -> list:
            return [e async for e in b.chat(ChatRequest(model="slow-load", messages=HI), ctx)]

        answers = await asyncio.gather(*(one(ctx) for ctx in ctxs))
    finally:
        await b.aclose()
    assert all(isinstance(events[-1], Done) for events in answers)
    assert fake.loads == ["slow-load"] and loads(fake) == ["slow-load"]
    for ctx in ctxs:
        assert ctx.alive >= LOAD_S / 0.1 * 0.8, ctx  # a beat every quarter of 0.4 s
        assert ctx.load_ms is not None and ctx.load_ms >= LOAD_S * 1000 * 0.9, ctx
    load, chat = fake.requests[0], fake.requests[-1]
    # keep_alive 0 would unload the model again: the load leaves it to the chat.
    assert "keep_alive" not in load and chat["keep_alive"] == 0


async def test_a_call_cut_while_its_model_loads_leaves_the_load_running(
    box: tuple[FakeOllama, str],
) -> None:
    # A call cut short (its time limit, its client gone) took the load with it when the
    # load was its own request: each retry began it again.
    fake, url = box
    b = ollama(url)
    await b.start()
    try:
        req = ChatRequest(model="slow-load", messages=HI)
        cut = asyncio.create_task(anext(b.chat(req, CallContext(request_id="r1"))))
        await asyncio.sleep(LOAD_S / 3)
        cut.cancel()
        await asyncio.sleep(LOAD_S)
        assert fake.loaded >= {"slow-load:latest"} and fake.aborted == []
        ctx = CallContext(request_id="r2")
        events = [e async for e in b.chat(req, ctx)]
        assert isinstance(events[-1], Done) and ctx.load_ms == 0.001  # Ollama's: loaded
    finally:
        await b.aclose()
    assert loads(fake) == ["slow-load"]


async def test_while_a_model_loads_other_calls_wait_for_no_api_ps(
    box: tuple[FakeOllama, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ollama's /api/ps answers once a load under way has ended: a call of a loaded model
    # does not wait on it (CONTEXT_WAIT_S, 2 s), and one of the model loading joins its
    # load without asking.
    fake, url = box
    monkeypatch.setattr(ollama_backend, "PS_TTL_S", 0.2)  # /api/ps's answer soon stale
    b = ollama(url)
    await b.start()

    async def one(model: str, ctx: CallContext) -> list:
        return [e async for e in b.chat(ChatRequest(model=model, messages=HI), ctx)]

    try:
        first = asyncio.create_task(one("slow-load-2", CallContext(request_id="r1")))
        await asyncio.sleep(0.5)
        t = time.monotonic()
        assert isinstance((await one("llama3", CallContext(request_id="r2")))[-1], Done)
        assert time.monotonic() - t < 0.5
        ctx = CallContext(request_id="r3")
        assert isinstance((await one("slow-load-2", ctx))[-1], Done)
        assert ctx.load_ms is not None and ctx.load_ms > LOAD_S * 1000, ctx  # it waited
        assert isinstance((await first)[-1], Done)
    finally:
        await b.aclose()
    assert loads(fake) == ["slow-load-2"]


async def test_a_load_by_another_client_does_not_hold_a_call_of_a_loaded_model(
    box: tuple[FakeOllama, str],
) -> None:
    # Open WebUI or `ollama run` loads a model on the same Ollama: stella has no load of
    # its own to tell it, and /api/ps answers only once that load ends. A call of a model
    # already loaded glances at the ask (PS_GLANCE_S) and goes ahead; the ask is shared.
    fake, url = box
    b = ollama(url)
    await b.start()
    try:
        async with httpx.AsyncClient() as other:
            body = {"model": "slow-load-2", "messages": []}
            load = asyncio.create_task(other.post(url + "/api/chat", json=body, timeout=30))
            try:
                await asyncio.sleep(0.3)
                for i in range(2):
                    t = time.monotonic()
                    req = ChatRequest(model="llama3", messages=HI)
                    events = [e async for e in b.chat(req, CallContext(request_id=f"r{i}"))]
                    assert isinstance(events[-1], Done)
                    took = time.monotonic() - t
                    assert took < ollama_backend.CONTEXT_WAIT_S / 2, took
                assert (await load).status_code == 200
            finally:
                load.cancel()  # a failed test leaves no request behind
    finally:
        await b.aclose()
    assert fake.ps_asked == 1  # one ask for both calls, left to run past the first
    assert loads(fake) == ["slow-load-2"]  # the other client's: none of stella's


async def test_a_load_past_load_timeout_s_fails_that_model_not_the_backend(
    box: tuple[FakeOllama, str],
) -> None:
    fake, url = box
    ctx = CallContext(request_id="r")
    with pytest.raises(UpstreamTimeout) as info:
        await call(ollama(url, load_timeout_s=0.3), "slow-load", ctx)
    err = info.value
    assert "did not load within load_timeout_s = 0.3s" in err.message, err.message
    # No verdict on the backend's circuit; the same load again would fare no better.
    assert err.no_verdict and not err.same_again and err.code == "upstream_timeout"
    assert ctx.load_ms is not None and ctx.load_ms >= 300
    for _ in range(50):  # Ollama sees its client leave, and aborts the load
        if fake.aborted:
            break
        await asyncio.sleep(0.02)
    assert fake.aborted == ["slow-load"] and "slow-load:latest" not in fake.loaded


async def test_a_load_s_refusal_is_each_waiting_call_s(box: tuple[FakeOllama, str]) -> None:
    # A model Ollama does not have: its 404 comes from the load, to every call waiting.
    fake, url = box
    b = ollama(url)
    await b.start()
    try:
        req = ChatRequest(model="error-before", messages=HI)

        async def one() -> BaseException | None:
            try:
                [e async for e in b.chat(req, CallContext(request_id="r"))]
            except UpstreamStatus as exc:
                return exc
            return None

        errors = await asyncio.gather(one(), one())
    finally:
        await b.aclose()
    assert loads(fake) == ["error-before"]
    assert all(isinstance(e, UpstreamStatus) and e.upstream_status == 404 for e in errors)
    assert errors[0] is not errors[1]  # each call's own: the core amends what it gets


@pytest.mark.parametrize(
    ("model", "setup"),
    [
        ("llama3", "loaded"),  # /api/ps lists it: the common path, no request more
        ("tools", "ps fails"),  # /api/ps cannot say: the call loads it, as before
        ("tools", "load_timeout_s = 0"),  # no load of its own
        ("gpt-oss:120b-cloud", ""),  # run on ollama.com: nothing loads on the server
        ("qwen3:cloud", ""),
    ],
)
async def test_no_load_of_its_own_where_none_is_needed_or_known(
    box: tuple[FakeOllama, str], model: str, setup: str
) -> None:
    fake, url = box
    fake.ps_fails = setup == "ps fails"
    config = {"load_timeout_s": 0} if setup == "load_timeout_s = 0" else {}
    b = ollama(url, **config)
    await b.start()
    try:
        for _ in range(3):
            req = ChatRequest(model=model, messages=HI)
            events = [e async for e in b.chat(req, CallContext(request_id="r"))]
            assert isinstance(events[-1], Done)
    finally:
        await b.aclose()
    assert loads(fake) == [] and len(fake.requests) == 3
    # /api/ps asked at most once for the three calls (its answer stands PS_TTL_S).
    assert fake.ps_asked == (0 if setup == "load_timeout_s = 0" or "cloud" in model else 1)


def test_ollama_s_own_load_and_unload_reach_the_upstream(box: tuple[FakeOllama, str]) -> None:
    # `ollama run` warms a model with an empty chat, `ollama stop` frees it with an empty
    # generate whose keep_alive is 0: stella passes both on, by the upstream's model name.
    fake, url = box

    def running() -> set[str]:
        return {m["name"] for m in httpx.get(url + "/api/ps").json()["models"]}

    config = route(url, "slow-load")
    config["models"]["routes"]["gone"] = {"backend": "box", "upstream_model": "error-before"}
    with run_stella(config) as server:
        c = ollama_client.Client(host=server.url)
        assert "slow-load:latest" not in running()
        started = time.perf_counter()
        loaded = c.chat(model="m", messages=[])
        assert loaded.done_reason == "load" and loaded.model == "m"
        # Answered once the model is loaded, not before: the next chat waits for nothing.
        assert time.perf_counter() - started >= LOAD_S * 0.9
        assert fake.loads == ["slow-load"] and "slow-load:latest" in running()
        assert c.generate(model="m").done_reason == "load"  # loaded: Ollama answers at once
        unloaded = c.generate(model="m", keep_alive=0)
        assert unloaded.done_reason == "unload" and unloaded.model == "m"
        assert fake.unloads == ["slow-load"] and "slow-load:latest" not in running()
        assert fake.requests[-1] == {"model": "slow-load", "keep_alive": 0}
        # The upstream's refusal is the client's answer (a 502 naming it, as a chat's),
        # not an unload or a load that did nothing.
        with pytest.raises(ollama_client.ResponseError) as info:
            c.generate(model="gone", keep_alive=0)
        assert (
            info.value.status_code == 502
            and "404: model 'error-before' not found" in info.value.error
        )
        with pytest.raises(ollama_client.ResponseError) as info:
            c.chat(model="gone", messages=[])
        assert (
            info.value.status_code == 502
            and "404: model 'error-before' not found" in info.value.error
        )
    assert fake.unloads == ["slow-load"]


async def test_an_unload_while_the_model_loads_frees_it_once_loaded(
    box: tuple[FakeOllama, str],
) -> None:
    # As Ollama frees a model after the requests before its unload: the shared load
    # ends first, and the model is not left loaded by it after the unload.
    fake, url = box
    b = ollama(url)
    await b.start()
    try:
        load = asyncio.create_task(b.load("slow-load"))
        await asyncio.sleep(LOAD_S / 3)
        assert await b.unload("slow-load") is True
        await load
    finally:
        await b.aclose()
    assert fake.loads == ["slow-load"] and fake.unloads == ["slow-load"]
    assert "slow-load:latest" not in fake.loaded


def test_a_load_longer_than_the_time_to_first_token_is_waited_for(
    box: tuple[FakeOllama, str],
) -> None:
    # Through stella: a route whose time to first token (0.5 s) is shorter than its
    # model's load answers once the model is loaded; one whose total limit ends the wait
    # first is a 504 that tells the backend's circuit nothing (one failure would open it
    # here), and its load, not aborted, serves the next call.
    fake, url = box
    limits = {"ttft_timeout_s": 0.5, "idle_timeout_s": 0.5, "retries": 0}
    config = route(url, "slow-load", **limits)
    config["models"]["routes"]["short"] = {
        "backend": "box",
        "upstream_model": "slow-load-2",
        "total_timeout_s": LOAD_S,
        **limits,
    }
    config["models"]["routes"]["local"] = {"backend": "box", "upstream_model": "llama3"}
    config["breaker"] = {"failure_threshold": 1}
    hi = [{"role": "user", "content": "hi"}]

    def ask(model: str) -> httpx.Response:
        body = {"model": model, "messages": hi, "stream": False}
        return httpx.post(server.url + "/api/chat", json=body, timeout=30)

    with run_stella(config) as server:
        r = ask("m")
        assert r.status_code == 200 and r.json()["message"]["content"] == "The sky is blue."
        body = r.json()
        assert body["load_duration"] >= LOAD_S * 0.9e9, body
        assert body["prompt_eval_duration"] < 0.5e9, body  # the load is not the prompt's
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert ev["load_ms"] >= LOAD_S * 900 and ev["status"] == 200, ev
        t = time.monotonic()
        r = ask("short")
        assert r.status_code == 504 and "total limit" in r.json()["error"], r.text
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert ev["attempts"][0].get("out_of_time") and ev["load_ms"] >= LOAD_S * 900, ev
        assert ask("local").status_code == 200  # the circuit is closed
        time.sleep(max(0.0, 2 * LOAD_S - (time.monotonic() - t)) + 0.3)
        t = time.monotonic()
        r = ask("short")
        assert r.status_code == 200 and time.monotonic() - t < LOAD_S, r.text
    assert fake.aborted == [] and loads(fake) == ["slow-load", "slow-load-2"]


def test_think_reaches_ollama_from_its_dialect_and_the_native_api(
    box: tuple[FakeOllama, str],
) -> None:
    # Ollama's `think` (a bool or an effort): an Ollama backend passes it on; another
    # backend (echo) answers as before; a value Ollama would refuse is a 400 naming it.
    fake, url = box
    hi = [{"role": "user", "content": "hi"}]
    with run_stella(route(url, "llama3")) as server:
        asks = [
            ("/api/chat", {"messages": hi, "think": False}, False),
            ("/api/chat", {"messages": hi, "think": "high"}, "high"),
            ("/api/generate", {"prompt": "hi", "think": True}, True),
            ("/api/v1/chat", {"messages": hi, "think": "low"}, "low"),
            ("/api/chat", {"messages": hi}, None),
        ]
        for path, body, sent in asks:
            for model in ("m", "echo"):
                r = httpx.post(server.url + path, json={"model": model, "stream": False, **body})
                assert r.status_code == 200, (path, model, r.text)
            assert fake.requests[-1].get("think") == sent, (path, fake.requests[-1])
        for path, body in (("/api/chat", {"messages": hi}), ("/api/generate", {"prompt": "hi"})):
            r = httpx.post(server.url + path, json={"model": "m", "think": "hard", **body})
            assert r.status_code == 400 and "$.think" in r.json()["error"], r.text


def test_a_reasoning_effort_reaches_ollama_as_its_think(box: tuple[FakeOllama, str]) -> None:
    # OpenAI's words for the effort, from chat completions, the Responses API and the
    # native API, become Ollama's `think`: none is no thinking, the levels Ollama lacks
    # its nearest one; a `think` of the request's own (native) wins; none asked, none sent.
    fake, url = box
    hi = [{"role": "user", "content": "hi"}]
    expected = {
        "none": False,
        "minimal": "low",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "xhigh": "high",
        "max": "max",
    }
    with run_stella(route(url, "llama3")) as server:
        for effort, think in expected.items():
            for path, body in (
                ("/v1/chat/completions", {"messages": hi, "reasoning_effort": effort}),
                ("/v1/responses", {"input": "hi", "reasoning": {"effort": effort}}),
                ("/api/v1/chat", {"messages": hi, "reasoning_effort": effort}),
            ):
                r = httpx.post(server.url + path, json={"model": "m", "stream": False, **body})
                assert r.status_code == 200, (path, r.text)
                assert fake.requests[-1].get("think") == think, (path, effort)
        body = {"messages": hi, "reasoning_effort": "high", "think": False, "stream": False}
        r = httpx.post(server.url + "/api/v1/chat", json={"model": "m", **body})
        assert r.status_code == 200 and fake.requests[-1]["think"] is False, r.text
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": hi})
        assert r.status_code == 200 and "think" not in fake.requests[-1], fake.requests[-1]


def test_ollama_s_thinking_reaches_the_client_where_each_api_carries_it(
    box: tuple[FakeOllama, str],
) -> None:
    # Ollama's `message.thinking`: the native API's `reasoning`, chat completions'
    # `reasoning_content`, and Ollama's own `thinking` again, streamed or not, before the
    # answer's text, which is as it was.
    from tests.fakes.ollama import THINKING
    from tests.live import reasoned

    fake, url = box
    fake.loaded.add("thinking:latest")
    thought, words = "".join(THINKING), "The sky is blue."
    hi = [{"role": "user", "content": "hi"}]
    with run_stella(route(url, "thinking")) as server:
        for path in ("/api/v1/chat", "/v1/chat/completions", "/api/chat", "/api/generate"):
            body = {"prompt": "hi"} if path == "/api/generate" else {"messages": hi}
            for stream in (True, False):
                r = httpx.post(server.url + path, json={"model": "m", "stream": stream, **body})
                got = reasoned(path, stream, r)
                assert got == (thought, words, "rrrttttt" if stream else ""), (path, stream)
