"""A reasoning model's thinking through a live stella: where each dialect carries it, what a
failure while the model thinks becomes, and what the inference log keeps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.openai import REASONING, REASONING_TOKENS, FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, ndjson, reasoned, run_stella

THOUGHT = "".join(REASONING)
WORDS = " w0 w1 w2 w3 w4"  # the fake's answer
SSE = {"Accept": "text/event-stream"}
# The streams that show no reasoning: their status line waits for the answer's first piece.
HELD = ("/v1/messages", "/v1/responses", "/v1/completions")


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    f = FakeOpenAI()
    with serve(f.app) as url:
        yield f, url


@pytest.fixture(scope="module")
def server(fake: tuple[FakeOpenAI, str]) -> Iterator[LiveServer]:
    routes: dict[str, Any] = {
        # A thinking model's upstream that fails while it thinks: asked three times.
        "fails": {"backend": "up", "upstream_model": "thinks-fails", "retry_backoff_s": 0.01},
        # The same, then a fallback that thinks and answers.
        "falls": {
            "backend": "up",
            "upstream_model": "thinks-fails",
            "retry_backoff_s": 0.01,
            "fallbacks": ["thinks"],
        },
        # Upstreams that count no reasoning tokens: no usage details, or null ones.
        "plain": {"backend": "up", "upstream_model": "ok"},
        "cached": {"backend": "up", "upstream_model": "cached"},
    }
    for model in (
        "thinks",
        "thinks-apart",
        "thinks-or-apart",
        "thinks-between-apart",
        "thinks-says",
        "thinks-echo",
    ):
        routes[model] = {"backend": "up", "upstream_model": model}
    config = {
        "backends": {"up": {"kind": "openai", "base_url": fake[1] + "/v1"}},
        "models": {"routes": routes},
        "breaker": {"failure_threshold": 0},  # the failures here are asked for
        "log": {"content": True},
    }
    with run_stella(config) as live:
        yield live


def ask(
    server: LiveServer, path: str, model: str, stream: bool = True, **kw: Any
) -> httpx.Response:
    """One request for `model` in the shape of the API at `path`."""
    msgs = [{"role": "user", "content": "hi"}]
    if path == "/v1/messages":
        body: dict[str, Any] = {"max_tokens": 50, "messages": msgs}
    elif path == "/v1/responses":
        body = {"input": "hi"}
    elif path in ("/v1/completions", "/api/generate", "/api/v1/generate"):
        body = {"prompt": "hi"}
    else:
        body = {"messages": msgs}
    return httpx.post(
        server.url + path, json={"model": model, "stream": stream, **body}, timeout=30, **kw
    )


def sse(r: httpx.Response) -> list[dict[str, Any]]:
    """The JSON of each `data:` line of an SSE answer (not the end marker)."""
    lines = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
    return [json.loads(x) for x in lines if x != "[DONE]"]


def pieces(path: str, r: httpx.Response) -> list[str]:
    """The pieces of text a stream without reasoning sent, where its API carries them."""
    assert r.status_code == 200, r.text
    data = sse(r)
    if path == "/v1/messages":
        return [d["delta"]["text"] for d in data if d["type"] == "content_block_delta"]
    if path == "/v1/responses":
        return [d["delta"] for d in data if d["type"] == "response.output_text.delta"]
    if path == "/v1/completions":
        return [d["choices"][0]["text"] for d in data if d["choices"][0]["finish_reason"] is None]
    return [d["response"] for d in data if "response" in d]  # /api/v1/generate


def event(server: LiveServer, r: httpx.Response) -> dict[str, Any]:
    """The call's inference log event."""
    rid = r.headers["x-request-id"]
    return server.wait_event(lambda e: e["request_id"] == rid)


@pytest.mark.parametrize("path", HELD)
def test_a_failure_while_the_model_thinks_is_retried_and_its_status_an_error(
    server: LiveServer, path: str
) -> None:
    # The client was shown nothing of the reasoning: the answer had not begun, so the
    # route asks again, and the failure is the HTTP error the API gives, as before a
    # first token.
    r = ask(server, path, "fails")
    assert r.status_code == 502, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    ev = event(server, r)
    assert [a["error"] for a in ev["attempts"]] == ["upstream_error"] * 3, ev
    assert ev["status"] == 502 and "reasoning" not in ev, ev


@pytest.mark.parametrize("path", [*HELD, "/api/v1/generate"])
def test_a_fallback_answers_after_a_failure_while_the_model_thinks(
    server: LiveServer, path: str
) -> None:
    headers = SSE if path == "/api/v1/generate" else None  # its SSE form: text alone
    r = ask(server, path, "falls", headers=headers)
    got = pieces(path, r)
    assert "".join(got) == WORDS and all(got), (path, got)
    ev = event(server, r)
    routes = [(a["route"], a["error"]) for a in ev["attempts"]]
    assert routes == [("falls", "upstream_error")] * 3 + [("thinks", None)], ev
    # The log has the answer's reasoning, the fallback's, once: not the failed attempts'.
    assert ev["reasoning"] == THOUGHT and ev["completion"] == WORDS, ev


@pytest.mark.parametrize("path", ["/api/v1/chat", "/v1/chat/completions", "/api/chat"])
def test_a_failure_after_reasoning_was_shown_ends_the_stream(server: LiveServer, path: str) -> None:
    # The client has the reasoning: a switch of model now would be worse than the error.
    r = ask(server, path, "falls")
    assert r.status_code == 200, r.text
    if path == "/v1/chat/completions":
        data = sse(r)
        shown = "".join(d["choices"][0]["delta"].get("reasoning_content", "") for d in data[:-1])
        assert data[-1]["error"]["code"] == "upstream_error", data
    elif path == "/api/v1/chat":
        lines = ndjson(r.text)
        shown = "".join(line.get("reasoning", "") for line in lines)
        assert lines[-1]["type"] == "error", lines
    else:
        lines = ndjson(r.text)
        shown = "".join(line["message"]["thinking"] for line in lines[:-1])
        assert "error" in lines[-1], lines
    assert shown == THOUGHT, r.text
    ev = event(server, r)
    assert [a["error"] for a in ev["attempts"]] == ["upstream_error"], ev


def test_reasoning_and_text_in_one_delta_are_both_kept(server: LiveServer) -> None:
    # vLLM's DeepSeek-R1 parser sends the delta around </think> with both.
    for path in ("/api/v1/chat", "/v1/chat/completions"):
        for stream in (True, False):
            r = ask(server, path, "thinks-says", stream)
            assert reasoned(path, stream, r)[:2] == (THOUGHT, WORDS), (path, stream, r.text)
            ev = event(server, r)
            assert ev["reasoning"] == THOUGHT and ev["completion"] == WORDS, ev


@pytest.mark.parametrize("model", ["thinks-apart", "thinks-or-apart", "thinks-between-apart"])
def test_reasoning_in_reads_of_its_own(server: LiveServer, model: str) -> None:
    # Under either name servers give it, each piece a Delta of reasoning alone (before the
    # text, or after some of it): shown where the API has a place for it, and no empty
    # piece of text where it has none.
    r = ask(server, "/api/v1/chat", model)
    lines = [line for line in ndjson(r.text) if line["type"] == "delta"]
    thought = [line["reasoning"] for line in lines if not line["text"]]
    if model == "thinks-between-apart":
        assert thought == [REASONING[0]] and lines[0] == {"type": "delta", "text": " w0"}, lines
    else:
        assert thought == list(REASONING), lines
    assert reasoned("/api/v1/chat", True, r)[:2] == ("".join(thought), WORDS)
    for path in HELD:
        got = pieces(path, ask(server, path, model))
        assert "".join(got) == WORDS and all(got), (path, got)
    got = pieces("/api/v1/generate", ask(server, "/api/v1/generate", model, headers=SSE))
    assert "".join(got) == WORDS and all(got), got
    r = ask(server, "/v1/responses", model)
    kinds = [d["type"] for d in sse(r)]
    assert kinds.count("response.output_item.added") == 1, kinds


def test_the_self_hosted_shapes_carry_reasoning_in_native_lines_alone(server: LiveServer) -> None:
    # /api/llm/stream and /api/v1/generate without SSE are the native stream (and answer).
    for path in ("/api/llm/stream", "/api/v1/generate"):
        r = httpx.post(server.url + path, json={"model": "thinks", "prompt": "hi"})
        assert reasoned("/api/v1/chat", True, r)[:2] == (THOUGHT, WORDS), (path, r.text)
    r = ask(server, "/api/v1/generate", "thinks", False)
    assert reasoned("/api/v1/chat", False, r)[:2] == (THOUGHT, WORDS), r.text
    # The others have a field for the text alone.
    for path, body, field in (
        ("/api/llm/generate", {"model": "thinks", "prompt": "hi"}, "response"),
        ("/generate", {"model": "thinks", "prompt": "hi"}, "response"),
        ("/api/chat/invoke", {"model": "thinks", "input_data": {"input": "hi"}}, "output"),
    ):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 200 and r.json()[field] == WORDS, (path, r.text)
        assert THOUGHT not in r.text, (path, r.text)


def test_a_key_in_the_reasoning_is_masked_in_the_log() -> None:
    key = "sk-reasoning-masked-1234"
    f = FakeOpenAI()
    with serve(f.app) as url:
        config = {
            "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
            "models": {"routes": {"r": {"backend": "up", "upstream_model": "thinks-echo"}}},
            "log": {"content": True},
            # Known by its digest: the log's sink cannot mask it, the event's own masking must.
            "auth": {"keys": {"k": {"sha256": hashlib.sha256(key.encode()).hexdigest()}}},
        }
        with run_stella(config) as live:
            for stream in (True, False):
                r = httpx.post(
                    live.url + "/api/v1/chat",
                    headers={"Authorization": f"Bearer {key}"},
                    json={
                        "model": "r",
                        "stream": stream,
                        "messages": [{"role": "user", "content": f"my key is {key}"}],
                    },
                )
                assert reasoned("/api/v1/chat", stream, r)[0] == f"I read: my key is {key}"
                ev = event(live, r)
                assert ev["reasoning"] == "I read: my key is ***", ev
                assert key not in json.dumps(ev)


async def test_the_python_client_and_generate_send_a_reasoning_effort(
    fake: tuple[FakeOpenAI, str], server: LiveServer
) -> None:
    from stella.client import AsyncClient, Client, Stream

    f = fake[0]
    msgs = [{"role": "user", "content": "hi"}]
    with Client(server.url) as c:
        for stream in (False, True):
            for effort in ("high", None):
                answer = c.chat(msgs, "thinks", stream=stream, reasoning_effort=effort)
                if isinstance(answer, Stream):
                    list(answer)
                assert f.requests[-1].get("reasoning_effort") == effort, (stream, effort)
                answer = c.generate("hi", "thinks", stream=stream, reasoning_effort=effort)
                if isinstance(answer, Stream):
                    list(answer)
                assert f.requests[-1].get("reasoning_effort") == effort, (stream, effort)
    async with AsyncClient(server.url) as ac:
        await ac.chat(msgs, "thinks", reasoning_effort="low")
        assert f.requests[-1]["reasoning_effort"] == "low"
        await ac.generate("hi", "thinks", reasoning_effort="minimal")
        assert f.requests[-1]["reasoning_effort"] == "minimal"
    # /api/v1/generate takes exactly the chat's words.
    r = httpx.post(
        server.url + "/api/v1/generate",
        json={"model": "thinks", "prompt": "hi", "reasoning_effort": "hard"},
    )
    assert r.status_code == 400 and "$.reasoning_effort" in r.text, r.text


def sdk(server: LiveServer) -> Any:
    """The official OpenAI SDK, pointed at stella."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_the_reasoning_tokens_an_upstream_counts_are_reported(server: LiveServer) -> None:
    # OpenAI's usage.completion_tokens_details.reasoning_tokens: carried in the native
    # usage, chat completions' and the Responses API's, and the log; left out (0 in the
    # Responses API, whose type requires it) when the upstream gave none.
    c = sdk(server)
    msgs = [{"role": "user", "content": "hi"}]
    known = {"reasoning_tokens": REASONING_TOKENS}
    for model, details in (("thinks", known), ("plain", None), ("cached", None)):
        r = c.chat.completions.with_raw_response.create(model=model, messages=msgs)  # type: ignore[arg-type]
        usage = r.parse().usage
        assert usage is not None
        got = usage.completion_tokens_details
        assert (got and got.model_dump(exclude_none=True)) == details, (model, got)
        ev = event(server, r.http_response)  # type: ignore[arg-type]
        assert ev.get("reasoning_tokens") == (details and REASONING_TOKENS), ev
        body = {"model": model, "stream": True, "messages": msgs}
        body["stream_options"] = {"include_usage": True}
        last = sse(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30))[-1]
        assert last["usage"].get("completion_tokens_details") == details, (model, last)
        for stream in (True, False):
            native = ask(server, "/api/v1/chat", model, stream)
            usage = ndjson(native.text)[-1]["usage"] if stream else native.json()["usage"]
            assert usage.get("completion_tokens_details") == details, (model, usage)
        answer = c.responses.create(model=model, input="hi")
        assert answer.usage is not None
        assert answer.usage.output_tokens_details.reasoning_tokens == (
            REASONING_TOKENS if details else 0
        ), (model, answer.usage)
        with c.responses.stream(model=model, input="hi") as stream_:
            final = stream_.get_final_response()
        assert final.usage is not None
        assert final.usage.output_tokens_details.reasoning_tokens == (
            REASONING_TOKENS if details else 0
        )
