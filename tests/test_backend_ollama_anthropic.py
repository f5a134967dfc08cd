"""The ollama and anthropic adapters against fake servers that follow the documented wire formats."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from stella.backends import CallContext, ConfigError, build_backend, registry
from stella.backends.anthropic import AnthropicBackend, AnthropicConfig
from stella.backends.anthropic_request import tool_use_id
from stella.backends.ollama import CONTEXT_WAIT_S, OllamaBackend, OllamaConfig
from stella.errors import StellaError, UpstreamStatus
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    FunctionCall,
    FunctionSpec,
    Message,
    Options,
    Tool,
    ToolCall,
    ToolCallRef,
    Usage,
)
from tests.fakes.anthropic import DELTA_COUNTS, KEY, PINGS_S, REFUSED_AT, FakeAnthropic
from tests.fakes.ollama import CALL_IDS, CONTEXT, FakeOllama
from tests.fakes.server import full_backlog, serve
from tests.live import ndjson, run_stella

HI = [Message(role="system", content="be nice"), Message(role="user", content="hi")]


@pytest.fixture(scope="module")
def ollama_url() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture(scope="module")
def anthropic_url() -> Iterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic()
    with serve(fake.app) as url:
        yield fake, url


async def run(  # type: ignore[no-untyped-def]
    backend, model: str, ctx: CallContext | None = None, **kw: object
) -> list:
    """The events of one call of `model` on `backend` (started and closed around it)."""
    await backend.start()
    try:
        req = ChatRequest(model=model, **{"messages": HI, **kw})  # type: ignore[arg-type]
        return [e async for e in backend.chat(req, ctx or CallContext(request_id="rid-1"))]
    finally:
        await backend.aclose()


def ollama(url: str) -> OllamaBackend:
    return OllamaBackend("o", OllamaConfig(kind="ollama", base_url=url))


def claude(url: str) -> AnthropicBackend:
    os.environ["TEST_ANTHROPIC_KEY"] = KEY
    return AnthropicBackend(
        "a", AnthropicConfig(kind="anthropic", base_url=url, api_key_env="TEST_ANTHROPIC_KEY")
    )


async def test_ollama_stream_usage_options(ollama_url: tuple[FakeOllama, str]) -> None:
    fake, url = ollama_url
    events = await run(ollama(url), "llama3", options=Options(max_tokens=3, temperature=0.1))
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "The sky is"
    assert events[-1] == Done(finish_reason="length", usage=events[-1].usage)
    assert events[-1].usage.prompt_tokens == 26 and events[-1].usage.completion_tokens == 3
    assert fake.requests[-1]["options"] == {"temperature": 0.1, "num_predict": 3}
    assert fake.requests[-1]["messages"][0] == {"role": "system", "content": "be nice"}


async def test_ollama_tools_and_models(ollama_url: tuple[FakeOllama, str]) -> None:
    events = await run(
        ollama(ollama_url[1]), "tools", tools=[Tool(function=FunctionSpec(name="get_weather"))]
    )
    assert events[0] == ToolCall(
        index=0, id=CALL_IDS["Toronto"], name="get_weather", arguments={"city": "Toronto"}
    )
    assert events[-1].finish_reason == "tool_calls"
    b = ollama(ollama_url[1])
    await b.start()
    assert await b.models() == ["llama3:latest"] and (await b.health()).ok
    await b.aclose()


async def test_ollama_call_ids_are_ollama_s_or_unique_ones(
    ollama_url: tuple[FakeOllama, str],
) -> None:
    # Numbered per answer (call_0, call_1), two turns' calls had one id: Anthropic's API
    # refuses such a history. Ollama's own ids are kept; without them (older versions)
    # each call gets a fresh one in OpenAI's form.
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    events = await run(ollama(ollama_url[1]), "two-tools", tools=tools)
    assert [e.id for e in events if isinstance(e, ToolCall)] == list(CALL_IDS.values())
    ids = []
    for _ in range(2):
        events = await run(ollama(ollama_url[1]), "old-tools", tools=tools)
        ids += [e.id for e in events if isinstance(e, ToolCall)]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


async def test_ollama_call_with_null_arguments_is_a_call_without_any(
    ollama_url: tuple[FakeOllama, str],
) -> None:
    # Go encodes a call's nil map of arguments as null: not a malformed line.
    events = await run(
        ollama(ollama_url[1]), "null-args", tools=[Tool(function=FunctionSpec(name="get_time"))]
    )
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [("get_time", {})]
    assert events[-1].finish_reason == "tool_calls"


async def test_ollama_tool_results_name_their_calls_by_id(
    ollama_url: tuple[FakeOllama, str],
) -> None:
    # Ollama links a result to its call by `tool_call_id` (and the call's `id`), and reads
    # the tool's name from `tool_name`: a result that came with only the call's id (an
    # OpenAI or Anthropic client's) is named after the call it answers.
    fake, url = ollama_url
    calls = [
        ToolCallRef(id="call_w", function=FunctionCall(name="get_weather", arguments={"c": 1})),
        ToolCallRef(id="call_t", function=FunctionCall(name="get_time", arguments={})),
    ]
    history = [
        Message(role="user", content="weather and time?"),
        Message(role="assistant", content="", tool_calls=calls),
        Message(role="tool", content="12:00", tool_call_id="call_t"),
        Message(role="tool", content="sunny", tool_call_id="call_w", name="get_weather"),
    ]
    events = await run(ollama(url), "llama3", messages=history)
    assert isinstance(events[-1], Done)
    sent = fake.requests[-1]["messages"]
    assert sent[1]["tool_calls"] == [
        {"id": "call_w", "function": {"name": "get_weather", "arguments": {"c": 1}}},
        {"id": "call_t", "function": {"name": "get_time", "arguments": {}}},
    ]
    assert sent[2:] == [
        {"role": "tool", "content": "12:00", "tool_name": "get_time", "tool_call_id": "call_t"},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather", "tool_call_id": "call_w"},
    ]


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        (-1, -1),
        (0, 0),  # unload after each call: sent, not taken for "Ollama's default"
        ("0", 0),
        ("+90", 90),
        (300, 300),
        (2.5, 2.5),
        ("-1", -1),
        ("90", 90),
        ("1e3", 1000.0),
        ("5m", "5m"),
        ("1h30m", "1h30m"),
        ("2562047h", "2562047h"),  # Go's longest duration, to the hour
        ("2562047h47m16.854775807s", "2562047h47m16.854775807s"),  # to the nanosecond
    ],
)
async def test_ollama_keep_alive_is_seconds_or_a_go_duration(
    ollama_url: tuple[FakeOllama, str], given: object, sent: object
) -> None:
    # Ollama takes a number of seconds (negative: for good) or a Go duration; a bare "-1"
    # string it refuses (missing unit), so a number written as a string goes as a number.
    fake, url = ollama_url
    table = {"kind": "ollama", "base_url": url, "keep_alive": given}
    events = await run(build_backend("o", table, registry()), "llama3")
    assert isinstance(events[-1], Done)
    assert fake.requests[-1]["keep_alive"] == sent
    assert type(fake.requests[-1]["keep_alive"]) is type(sent)


@pytest.mark.parametrize(
    "given",
    [
        "soon",
        "5 min",
        "-1x",
        "m",
        True,
        # Past Go's longest duration (int64 nanoseconds): ParseDuration refuses the
        # string, and the number would overflow Ollama's conversion.
        "2562048h",
        "2562047h47m16.854775808s",  # one nanosecond past: exact, not in float seconds
        "9223372036.8547759",  # seconds whose nanoseconds overflow in float64
        "-99999999999999999999s",
        10**30,
        float("nan"),
        float("inf"),
    ],
)
def test_ollama_keep_alive_ollama_would_refuse_stops_start_up(given: object) -> None:
    with pytest.raises(ConfigError, match=r"^backends\.o\.keep_alive: "):
        build_backend("o", {"kind": "ollama", "keep_alive": given}, registry())


async def test_ollama_context_length_is_the_running_models_window(
    ollama_url: tuple[FakeOllama, str],
) -> None:
    # From Ollama's /api/ps (a route may leave out ":latest"); unknown is None, also
    # when the upstream cannot be reached, within the wait a listing allows.
    b = ollama(ollama_url[1])
    await b.start()
    try:
        assert await b.context_length("llama3") == CONTEXT
        assert await b.context_length("llama3:latest") == CONTEXT
        assert await b.context_length("mistral") is None
    finally:
        await b.aclose()
    with full_backlog() as port:
        b = ollama(f"http://127.0.0.1:{port}")
        await b.start()
        try:
            t = time.monotonic()
            assert await b.context_length("llama3") is None
            assert time.monotonic() - t < CONTEXT_WAIT_S + 1
            # The failure stands a while: a client polling /api/ps does not wait each time.
            t = time.monotonic()
            assert await b.context_length("llama3") is None
            assert time.monotonic() - t < CONTEXT_WAIT_S / 2
        finally:
            await b.aclose()


async def test_ollama_running_models_are_asked_once_for_many_routes(
    ollama_url: tuple[FakeOllama, str],
) -> None:
    # A listing of several routes on one backend, and clients asking again soon after,
    # share one GET /api/ps.
    fake, url = ollama_url
    b = ollama(url)
    await b.start()
    try:
        before = fake.ps_asked
        found = await asyncio.gather(*(b.context_length(m) for m in ("llama3", "mistral", "x")))
        assert found == [CONTEXT, None, None]
        assert await b.context_length("llama3:latest") == CONTEXT
        assert fake.ps_asked == before + 1
    finally:
        await b.aclose()


@pytest.mark.parametrize(
    ("model", "status", "needle"),
    [("error-before", 404, "not found"), ("busy", 503, "server busy")],
)
async def test_ollama_http_errors(
    ollama_url: tuple[FakeOllama, str], model: str, status: int, needle: str
) -> None:
    with pytest.raises(UpstreamStatus) as info:
        await run(ollama(ollama_url[1]), model)
    assert info.value.upstream_status == status and needle in info.value.message
    if status == 503:  # a full queue: tried again, after stella's own backoff
        assert info.value.retry_after_hint is None and info.value.retryable
    else:
        assert not info.value.retryable


async def test_ollama_mid_stream_error_and_malformed(ollama_url: tuple[FakeOllama, str]) -> None:
    b = ollama(ollama_url[1])
    await b.start()
    got: list = []
    with pytest.raises(StellaError, match="error was encountered"):
        async for e in b.chat(
            ChatRequest(messages=HI, model="error-mid"), CallContext(request_id="r")
        ):
            got.append(e)
    assert len(got) == 2
    with pytest.raises(StellaError, match="malformed"):
        async for _ in b.chat(
            ChatRequest(messages=HI, model="malformed"), CallContext(request_id="r")
        ):
            pass
    await b.aclose()


async def _failing(b: Any, model: str) -> tuple[list, str]:
    """The events `b` sent for `model` before it failed, and its error's message."""
    await b.start()
    got: list = []
    try:
        with pytest.raises(StellaError) as info:
            async for e in b.chat(
                ChatRequest(messages=HI, model=model), CallContext(request_id="r")
            ):
                got.append(e)
    finally:
        await b.aclose()
    return got, info.value.message


@pytest.mark.parametrize(("model", "before"), [("huge-error-first", 0), ("huge-error-mid", 2)])
async def test_ollama_error_line_is_one_short_line(
    ollama_url: tuple[FakeOllama, str], model: str, before: int
) -> None:
    # An error line of a megabyte over several lines, before the first token or after
    # two: the client gets one line of at most 500 characters, as with an error status.
    got, message = await _failing(ollama(ollama_url[1]), model)
    assert len(got) == before
    assert message.startswith("o: first line second line E") and message.endswith("E...")
    assert len(message) <= len("o: ") + 500 and not any(c in message for c in "\n\r\t")


@pytest.mark.parametrize(
    ("model", "before", "prefix", "head"),
    [
        ("claude-huge-error-first", 0, "a: overloaded: ", "first line second line E"),
        ("claude-huge-error-mid", 1, "a: ", "api_error: first line second line E"),
    ],
)
async def test_anthropic_error_event_is_one_short_line(
    anthropic_url: tuple[FakeAnthropic, str], model: str, before: int, prefix: str, head: str
) -> None:
    # An error event of a megabyte over several lines, before the first token or after
    # one: the client gets one line of at most 500 characters, as with an error status.
    got, message = await _failing(claude(anthropic_url[1]), model)
    assert len(got) == before
    assert message.startswith(prefix + head) and message.endswith("E...")
    assert len(message) <= len(prefix) + 500
    assert not any(c in message for c in "\n\r\t")


async def test_anthropic_stream_system_usage_headers(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    fake, url = anthropic_url
    events = await run(claude(url), "claude-ok", options=Options(max_tokens=3, stop=["?"]))
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello! How"
    done = events[-1]
    assert done.finish_reason == "length" and done.usage.prompt_tokens == 25
    assert done.usage.completion_tokens == 3  # cumulative output_tokens of message_delta
    sent = fake.requests[-1]
    assert sent["system"] == "be nice" and sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["max_tokens"] == 3 and sent["stop_sequences"] == ["?"]
    assert fake.headers[-1]["anthropic-version"] == "2023-06-01"


async def test_anthropic_stop_sequence_and_prompt_size_reach_the_context(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The upstream names the stop sequence it ended at (the Messages dialect reports it)
    # and the prompt's size in message_start (a call cut short is still charged for it).
    _, url = anthropic_url
    b = claude(url)
    await b.start()
    try:
        req = ChatRequest(model="claude-ok", messages=HI, options=Options(stop=[" can"]))
        ctx = CallContext(request_id="rid-2")
        events = [e async for e in b.chat(req, ctx)]
    finally:
        await b.aclose()
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello! How"
    assert events[-1].finish_reason == "stop"
    assert ctx.stop_sequence == " can" and ctx.prompt_tokens == 25


async def test_anthropic_whitespace_stops_are_stella_s_and_temperature_is_clamped(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The API refuses a stop sequence of only whitespace ("\n", as OpenAI's clients send)
    # and a temperature over 1 (OpenAI's go to 2): they were sent on, a 400 and a 502.
    # Such stops end the answer here, as the API ends at its own; the temperature is
    # the most random the API takes.
    fake, url = anthropic_url
    opts = Options(stop=["\n", " ", "", "zzz"], temperature=1.7)
    ctx = CallContext(request_id="rid-ws")
    events = await run(claude(url), "claude-ok", ctx, options=opts)
    sent = fake.requests[-1]
    assert sent["stop_sequences"] == ["zzz"] and sent["temperature"] == 1.0
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello!"
    assert events[-1].finish_reason == "stop" and ctx.stop_sequence == " "
    assert events[-1].usage.prompt_tokens == 25 and ctx.usage_estimated
    # The pieces read: "Hello", "!" and " How", whose space ended the answer.
    assert events[-1].usage.completion_tokens == 3
    # Only such stops: none sent; a temperature in range goes as it came.
    events = await run(claude(url), "claude-ok", options=Options(stop=["\n"]))
    assert "stop_sequences" not in fake.requests[-1]
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello! How can I help?"
    events = await run(claude(url), "claude-ok", options=Options(temperature=0.4))
    assert isinstance(events[-1], Done)
    assert fake.requests[-1]["temperature"] == 0.4


@pytest.mark.parametrize(
    ("model", "pieces"),
    [
        # The space held (it may begin the stop) comes out when the stream ends...
        ("claude-trailing-space", ["Hello", "!", " Bye.", " ", "done"]),
        # ...and before a tool call, so the text stays ahead of the call it introduces.
        (
            "claude-text-then-tool",
            ["Let me check.", " One moment.", " ", "get_weather", "done"],
        ),
    ],
)
async def test_anthropic_text_held_for_a_local_stop_is_sent_before_what_follows(
    anthropic_url: tuple[FakeAnthropic, str], model: str, pieces: list[str]
) -> None:
    events = await run(claude(anthropic_url[1]), model, options=Options(stop=["  "]))
    seen = [
        e.text if isinstance(e, Delta) else e.name if isinstance(e, ToolCall) else "done"
        for e in events
        if isinstance(e, Delta | ToolCall | Done)
    ]
    assert seen == pieces


async def _call(url: str, model: str) -> tuple[list, CallContext]:
    """The events of one call to the fake Anthropic API, and its context."""
    b = claude(url)
    await b.start()
    try:
        ctx = CallContext(request_id="rid-3")
        return [e async for e in b.chat(ChatRequest(model=model, messages=HI), ctx)], ctx
    finally:
        await b.aclose()


def test_anthropic_pings_keep_the_idle_limit_from_firing(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The API pings through a slow stretch of an answer: a sign of life, as an OpenAI
    # upstream's `: keepalive` comments are, not a silence (it was an upstream_timeout).
    config = claude_route(anthropic_url[1], "claude-pings")
    route = config["models"]["routes"]["sonnet"]
    route.update(retries=0, ttft_timeout_s=PINGS_S / 3, idle_timeout_s=PINGS_S / 3)
    with run_stella(config, {"CK": KEY}) as server:
        body = {"model": "sonnet", "messages": [{"role": "user", "content": "hi"}]}
        lines = ndjson(httpx.post(server.url + "/api/v1/chat", json=body, timeout=30).text)
        assert lines[-1]["type"] == "done", lines[-1]
        text = "".join(e.get("text", "") for e in lines)
        assert text == "Hello! How can I help?"
        ev = server.wait_event(lambda e: e["model"] == "sonnet")
        assert [a["error"] for a in ev["attempts"]] == [None]
        assert "usage_estimated" not in ev


async def test_anthropic_counts_left_null_in_message_delta_are_message_starts(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # MessageDeltaUsage may send input_tokens and the cache's counts as null: not given,
    # not a malformed event (which failed the answer after its text, and was retried).
    events, ctx = await _call(anthropic_url[1], "claude-null-usage")
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello! How can I help?"
    assert events[-1] == Done(finish_reason="stop", usage=Usage(25, 6, 31))
    assert ctx.prompt_tokens == 25 and ctx.cached_tokens is None


async def test_anthropic_zero_in_message_delta_keeps_message_start_s_count(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # A 0 in message_delta is a count not given again, not a prompt of no tokens.
    events, ctx = await _call(anthropic_url[1], "claude-zero-usage")
    assert events[-1] == Done(finish_reason="stop", usage=Usage(25, 6, 31))
    assert ctx.prompt_tokens == 25


async def test_anthropic_message_delta_s_larger_counts_win(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # message_delta's counts are cumulative: grown since message_start, they stand, in
    # the answer's usage and in the context the log and the dialects read.
    events, ctx = await _call(anthropic_url[1], "claude-grown-usage")
    prompt = DELTA_COUNTS["input_tokens"] + DELTA_COUNTS["cache_read_input_tokens"]
    assert events[-1] == Done(finish_reason="stop", usage=Usage(prompt, 6, prompt + 6))
    assert ctx.prompt_tokens == prompt
    assert ctx.cached_tokens == DELTA_COUNTS["cache_read_input_tokens"]


async def test_anthropic_prompt_is_its_cached_tokens_too(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # With prompt caching the API's input_tokens are only the tokens neither written to
    # nor read from the cache: the prompt is all three, the cache's reads `cached_tokens`.
    events, ctx = await _call(anthropic_url[1], "claude-cached")
    assert events[-1] == Done(finish_reason="stop", usage=Usage(1225, 6, 1231))
    assert ctx.prompt_tokens == 1225 and ctx.cached_tokens == 1000


async def test_anthropic_context_window_exceeded_is_length(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The answer filled the model's context window: cut short, as at max_tokens.
    events, _ = await _call(anthropic_url[1], "claude-context-full")
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello! How can I help?"
    assert events[-1].finish_reason == "length"


def test_anthropic_s_refusal_stop_is_an_answer_cut_short_in_every_dialect(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The API's `refusal` stop reason: its classifiers stopped the answer, whose text is
    # the answer as far as it went, not the model's words declining. It ends
    # content_filter (`refusal` again in the Anthropic dialect); the Responses dialect
    # gives the text as `output_text`, as the API gives an answer its filter cut short.
    config = claude_route(anthropic_url[1], "claude-refusal")
    hi = [{"role": "user", "content": "hi"}]
    with run_stella(config, {"CK": KEY}) as server:
        body = {"model": "sonnet", "max_tokens": 20, "messages": hi}
        r = httpx.post(server.url + "/v1/messages", json=body)
        assert r.status_code == 200, r.text
        m = r.json()
        assert (m["content"], m["stop_reason"]) == (
            [{"type": "text", "text": REFUSED_AT}],
            "refusal",
        )
        r = httpx.post(
            server.url + "/v1/chat/completions", json={"model": "sonnet", "messages": hi}
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (
            REFUSED_AT,
            "content_filter",
        )
        r = httpx.post(server.url + "/v1/responses", json={"model": "sonnet", "input": "hi"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["status"] == "incomplete"
        assert answer["incomplete_details"] == {"reason": "content_filter"}
        [item] = answer["output"]
        assert item["content"] == [{"type": "output_text", "text": REFUSED_AT, "annotations": []}]


def test_a_cached_prompt_is_counted_whole_in_every_dialect_and_the_log(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    config = claude_route(anthropic_url[1], "claude-cached")
    hi = [{"role": "user", "content": "hi"}]
    with run_stella(config, {"CK": KEY}) as server:
        answers = []
        r = httpx.post(
            server.url + "/v1/chat/completions", json={"model": "sonnet", "messages": hi}
        )
        answers.append(r)
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {
            "prompt_tokens": 1225,
            "completion_tokens": 6,
            "total_tokens": 1231,
            "prompt_tokens_details": {"cached_tokens": 1000},
        }
        body = {"model": "sonnet", "max_tokens": 20, "messages": hi}
        r = httpx.post(server.url + "/v1/messages", json=body)
        answers.append(r)
        assert r.status_code == 200, r.text
        # The API's input_tokens leave out the cache's writes and reads.
        assert r.json()["usage"] == {
            "input_tokens": 25,
            "cache_creation_input_tokens": 200,
            "cache_read_input_tokens": 1000,
            "output_tokens": 6,
        }
        r = httpx.post(
            server.url + "/api/chat", json={"model": "sonnet", "messages": hi, "stream": False}
        )
        answers.append(r)
        assert r.status_code == 200 and r.json()["prompt_eval_count"] == 1225, r.text
        for rid in (r.headers["x-request-id"] for r in answers):
            # The log, and so the usage report and the limits, take the whole prompt too.
            ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
            assert (ev["prompt_tokens"], ev["cached_tokens"]) == (1225, 1000)


async def test_an_empty_assistant_turn_is_left_out_for_anthropic(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # A turn stopped before its first token is an empty answer in the history; the API
    # refuses empty content anywhere but in a final assistant message (a prefill).
    fake, url = anthropic_url
    stopped = [
        Message(role="user", content="hi"),
        Message(role="assistant", content=""),
        Message(role="user", content="hi again"),
    ]
    events = await run(claude(url), "claude-ok", messages=stopped)
    assert isinstance(events[-1], Done)
    assert fake.requests[-1]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "hi again"},
    ]
    prefill = [Message(role="user", content="hi"), Message(role="assistant", content="")]
    assert isinstance((await run(claude(url), "claude-ok", messages=prefill))[-1], Done)
    assert fake.requests[-1]["messages"][-1] == {"role": "assistant", "content": ""}


# Ids other providers give tool calls (Kimi's, a hand-written one) and one the API takes.
FOREIGN_IDS = ["functions.get_weather:0", "call 1", "call_abc-1"]


def _history(ids: list[str]) -> list[Message]:
    """A turn that called a tool per id, and the results, linked by those ids."""
    calls = [
        ToolCallRef(id=i, function=FunctionCall(name="get_weather", arguments={})) for i in ids
    ]
    return [
        Message(role="user", content="weather?"),
        Message(role="assistant", content="", tool_calls=calls),
        *(Message(role="tool", content="sunny", tool_call_id=i) for i in ids),
    ]


async def test_tool_call_ids_from_other_providers_reach_anthropic_as_ids_it_takes(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The API takes ids of letters, digits, _ and - only: a conversation begun on
    # another backend goes on here with its ids mapped, each call still its result's.
    fake, url = anthropic_url
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    events = await run(claude(url), "claude-ok", messages=_history(FOREIGN_IDS), tools=tools)
    assert isinstance(events[-1], Done)
    sent = fake.requests[-1]["messages"]
    uses = [b["id"] for b in sent[1]["content"]]
    assert uses == [b["tool_use_id"] for b in sent[2]["content"]]
    assert uses[2] == "call_abc-1"  # a valid id goes as it came
    assert len(set(uses)) == 3 and all(re.fullmatch(r"[a-zA-Z0-9_-]+", u) for u in uses)
    # The same id maps the same way every time (a history is sent again each turn), and
    # ids that differ only in what is replaced stay apart.
    await run(claude(url), "claude-ok", messages=_history(FOREIGN_IDS), tools=tools)
    assert [b["id"] for b in fake.requests[-1]["messages"][1]["content"]] == uses
    await run(claude(url), "claude-ok", messages=_history(["a.b", "a:b"]), tools=tools)
    apart = [b["id"] for b in fake.requests[-1]["messages"][1]["content"]]
    assert len(set(apart)) == 2


def _turns(*turns: list[str]) -> list[Message]:
    """A conversation of tool turns: per turn, calls with these ids, then their results
    (each result's content names its call's place: turn.call)."""
    out = [Message(role="user", content="weather?")]
    for t, ids in enumerate(turns):
        calls = [
            ToolCallRef(
                id=i, function=FunctionCall(name="get_weather", arguments={"n": f"{t}.{k}"})
            )
            for k, i in enumerate(ids)
        ]
        out.append(Message(role="assistant", content="", tool_calls=calls))
        out += [Message(role="tool", content=f"{t}.{k}", tool_call_id=i) for k, i in enumerate(ids)]
    return out


def _pairs(sent: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Each tool_result sent, as (its tool_use_id, what the use it names asked, its own
    content), and the ids of the tool_use blocks all apart."""
    uses = {
        b["id"]: b["input"]["n"]
        for m in sent
        if isinstance(m["content"], list)
        for b in m["content"]
        if b["type"] == "tool_use"
    }
    count = sum(
        b["type"] == "tool_use"
        for m in sent
        if isinstance(m["content"], list)
        for b in m["content"]
    )
    assert len(uses) == count, sent  # no id twice
    return [
        (b["tool_use_id"], uses[b["tool_use_id"]], b["content"])
        for m in sent
        if isinstance(m["content"], list)
        for b in m["content"]
        if b["type"] == "tool_result"
    ]


async def test_repeated_tool_call_ids_reach_anthropic_apart(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # A backend that numbered each answer's calls from call_0 (stella's did) left a
    # history whose turns share ids: the API refuses it (`tool_use` ids must be unique).
    # A later use of an id is renamed, with the results that answer it.
    fake, url = anthropic_url
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    ids: list[list[str]] = []
    for turns in (
        (["call_0"], ["call_0"], ["call_0", "call_1"]),
        (["call_0"], ["call_0"], ["call_0_2"]),  # a renamed id must not become another's
        (["x", "x"], ["x"]),  # twice in one turn: its results answer them in order
        (["functions.f:0"], ["functions.f:0"]),  # mapped to the API's pattern, then apart
    ):
        events = await run(claude(url), "claude-ok", messages=_turns(*turns), tools=tools)
        assert isinstance(events[-1], Done), turns
        sent = fake.requests[-1]["messages"]
        ids.append(
            [
                b["id"]
                for m in sent
                if isinstance(m["content"], list)
                for b in m["content"]
                if b["type"] == "tool_use"
            ]
        )
        pairs = _pairs(sent)
        assert all(asked == answer for _, asked, answer in pairs), pairs
        # The same each time the history is sent (a conversation sends it every turn).
        await run(claude(url), "claude-ok", messages=_turns(*turns), tools=tools)
        assert fake.requests[-1]["messages"] == sent
    assert [p[0] for p in _pairs(sent)[:1]] == [tool_use_id("functions.f:0")]
    # As README gives them: the later use gets _2, _3, ... past any id the history holds.
    mapped = tool_use_id("functions.f:0")
    assert ids == [
        ["call_0", "call_0_2", "call_0_3", "call_1"],
        ["call_0", "call_0_3", "call_0_2"],
        ["x", "x_2", "x_3"],
        [mapped, f"{mapped}_2"],
    ]


async def test_the_fake_refuses_a_tool_use_id_twice(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # As the API does (400 "`tool_use` ids must be unique"): what the test above rests on.
    _, url = anthropic_url
    use = {"type": "tool_use", "id": "call_0", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "call_0", "content": "ok"}
    body = {
        "model": "claude-ok",
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "go"},
            *[
                m
                for _ in range(2)
                for m in (
                    {"role": "assistant", "content": [use]},
                    {"role": "user", "content": [result]},
                )
            ],
        ],
    }
    r = httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 400 and "`tool_use` ids must be unique" in r.text


async def test_ollama_thinking_counts_as_progress(ollama_url: tuple[FakeOllama, str]) -> None:
    backend = ollama(ollama_url[1])
    await backend.start()
    ctx = CallContext(request_id="rid-think")
    try:
        req = ChatRequest(messages=HI, model="thinking")
        events = [e async for e in backend.chat(req, ctx)]
    finally:
        await backend.aclose()
    assert isinstance(events[-1], Done)
    assert ctx.beats >= 3 + 5  # the time limits see the thinking lines too


async def test_anthropic_tools(anthropic_url: tuple[FakeAnthropic, str]) -> None:
    events = await run(
        claude(anthropic_url[1]),
        "claude-tools",
        tools=[Tool(function=FunctionSpec(name="get_weather"))],
    )
    assert events[0] == ToolCall(
        index=0, id="toolu_1", name="get_weather", arguments={"location": "Paris"}
    )
    assert events[-1].finish_reason == "tool_calls"
    # A compatible server that ends a turn of tool_use blocks with end_turn: the turn
    # waits for the tools' results all the same.
    events = await run(
        claude(anthropic_url[1]),
        "claude-tools-end-turn",
        tools=[Tool(function=FunctionSpec(name="get_weather"))],
    )
    assert isinstance(events[0], ToolCall) and events[-1].finish_reason == "tool_calls"
    events = await run(claude(anthropic_url[1]), "claude-ok")
    assert events[-1].finish_reason == "stop"
    fake = anthropic_url[0]
    await run(
        claude(anthropic_url[1]),
        "claude-tools",
        tools=[Tool(function=FunctionSpec(name="get_weather"))],
        tool_choice="required",
    )
    assert fake.requests[-1]["tool_choice"] == {"type": "any"}  # Anthropic's word for it
    # A compatible server may give a tool's input whole in content_block_start.
    events = await run(
        claude(anthropic_url[1]),
        "claude-tools-whole",
        tools=[Tool(function=FunctionSpec(name="get_weather"))],
    )
    assert events[0] == ToolCall(
        index=0, id="toolu_1", name="get_weather", arguments={"location": "Paris"}
    )


@pytest.mark.parametrize(
    ("model", "status", "retryable"), [("claude-429", 429, True), ("claude-529", 529, True)]
)
async def test_anthropic_http_errors(
    anthropic_url: tuple[FakeAnthropic, str], model: str, status: int, retryable: bool
) -> None:
    with pytest.raises(UpstreamStatus) as info:
        await run(claude(anthropic_url[1]), model)
    assert info.value.upstream_status == status and info.value.retryable is retryable
    if status == 429:
        assert info.value.retry_after_hint == 3


async def test_anthropic_error_event_malformed_and_auth(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    with pytest.raises(UpstreamStatus) as info:
        await run(claude(anthropic_url[1]), "claude-error-mid")
    assert info.value.upstream_status == 529
    with pytest.raises(StellaError, match="malformed"):
        await run(claude(anthropic_url[1]), "claude-malformed")
    bad = AnthropicBackend("a", AnthropicConfig(kind="anthropic", base_url=anthropic_url[1]))
    with pytest.raises(UpstreamStatus) as info:
        await run(bad, "claude-ok")
    assert info.value.upstream_status == 401 and KEY not in info.value.message


def test_through_stella_with_fallback(
    ollama_url: tuple[FakeOllama, str], anthropic_url: tuple[FakeAnthropic, str]
) -> None:
    config = {
        "backends": {
            "gpu-box": {"kind": "ollama", "base_url": ollama_url[1]},
            "claude": {
                "kind": "anthropic",
                "base_url": anthropic_url[1],
                "api_key_env": "CLAUDE_KEY",
            },
        },
        "models": {
            "routes": {
                "llama": {"backend": "gpu-box", "upstream_model": "llama3"},
                "sonnet": {
                    "backend": "claude",
                    "upstream_model": "claude-529",
                    "retries": 1,
                    "retry_backoff_s": 0.01,
                    "fallbacks": ["llama"],
                },
            }
        },
    }
    with run_stella(config, {"CLAUDE_KEY": KEY}) as server:
        lines = ndjson(
            httpx.post(
                server.url + "/api/v1/chat",
                json={"model": "llama", "messages": [{"role": "user", "content": "hi"}]},
            ).text
        )
        assert "".join(e.get("text", "") for e in lines) == "The sky is blue."
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={
                "model": "sonnet",
                "stream": False,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert r.status_code == 200 and r.json()["backend"] == "gpu-box"
        ev = server.wait_event(lambda e: e["model"] == "sonnet")
        assert [a.get("upstream_status") for a in ev["attempts"]][:2] == [529, 529]
        assert KEY not in "\n".join(server.lines())


def test_penalties_reach_ollama_by_its_names_and_anthropic_not_at_all(
    ollama_url: tuple[FakeOllama, str], anthropic_url: tuple[FakeAnthropic, str]
) -> None:
    # Ollama takes presence_penalty and frequency_penalty in its options (no logit_bias);
    # Anthropic's API has none of the three, so they are left out, not refused.
    config = {
        "backends": {
            "gpu-box": {"kind": "ollama", "base_url": ollama_url[1]},
            "claude": {"kind": "anthropic", "base_url": anthropic_url[1], "api_key_env": "CK"},
        },
        "models": {
            "routes": {
                "llama": {"backend": "gpu-box", "upstream_model": "llama3"},
                "sonnet": {"backend": "claude", "upstream_model": "claude-ok"},
            }
        },
    }
    msgs = [{"role": "user", "content": "hi"}]
    sampling = {"presence_penalty": 1.5, "frequency_penalty": 0.25}
    native = {"messages": msgs, "options": {**sampling, "logit_bias": {"42": 10}}}
    asks = [
        ("/api/v1/chat", native),
        ("/api/chat", {"messages": msgs, "options": sampling}),
        ("/v1/chat/completions", {"messages": msgs, **sampling, "logit_bias": {"42": 10}}),
    ]
    with run_stella(config, {"CK": KEY}) as server:
        for path, body in asks:
            r = httpx.post(server.url + path, json={"model": "llama", "stream": False, **body})
            assert r.status_code == 200, (path, r.text)
            assert ollama_url[0].requests[-1]["options"] == sampling, path
        r = httpx.post(
            server.url + "/api/v1/chat", json={"model": "sonnet", "stream": False, **native}
        )
        assert r.status_code == 200, r.text
    sent = anthropic_url[0].requests[-1]
    assert not {"presence_penalty", "frequency_penalty", "logit_bias"} & sent.keys()


def claude_route(url: str, upstream_model: str) -> dict[str, Any]:
    """A stella config with route "sonnet" on the fake Anthropic API at `url` (key in CK)."""
    return {
        "backends": {"claude": {"kind": "anthropic", "base_url": url, "api_key_env": "CK"}},
        "models": {"routes": {"sonnet": {"backend": "claude", "upstream_model": upstream_model}}},
    }


def test_a_failed_tool_call_reaches_anthropic_as_one(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The Anthropic dialect's is_error crosses the pipeline to the Anthropic backend,
    # which sends it on with the text as written (other backends' models read it marked).
    config = claude_route(anthropic_url[1], "claude-ok")
    uses = [{"type": "tool_use", "id": f"toolu_{n}", "name": "lookup", "input": {}} for n in (1, 2)]
    results = [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": "no such city",
            "is_error": True,
        },
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "cold"},
    ]
    body = {
        "model": "sonnet",
        "max_tokens": 20,
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "Oslo and Atlantis"},
            {"role": "assistant", "content": uses},
            {"role": "user", "content": results},
        ],
    }
    with run_stella(config, {"CK": KEY}) as server:
        r = httpx.post(server.url + "/v1/messages", json=body)
        assert r.status_code == 200, r.text
    sent = anthropic_url[0].requests[-1]["messages"][-1]["content"]
    assert sent == [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": "no such city",
            "is_error": True,
        },
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "cold"},
    ]


def test_a_conversation_begun_on_another_backend_goes_on_on_a_claude_route(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # Through the OpenAI dialect, with the ids another backend gave its calls: the
    # upstream would refuse them (the client got 502 upstream_rejected).
    config = claude_route(anthropic_url[1], "claude-ok")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with run_stella(config, {"CK": KEY}) as server:
        for call_id in FOREIGN_IDS:
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"},
            }
            messages = [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
            ]
            body = {"model": "sonnet", "messages": messages, "tools": tools}
            r = httpx.post(server.url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, (call_id, r.text)
            assert r.json()["choices"][0]["message"]["content"] == "Hello! How can I help?"


def test_anthropic_takes_a_schema_and_refuses_json_mode_without_one(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # The API's structured outputs keep the answer to a JSON schema (output_config.format);
    # it has no bare JSON mode, and one ignored would pass prose for JSON.
    config = claude_route(anthropic_url[1], "claude-x")
    msgs = [{"role": "user", "content": "hi"}]
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    with run_stella(config, {"CK": KEY}) as server:
        fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
        for stream in (False, True):
            r = httpx.post(
                server.url + "/api/v1/chat",
                json={
                    "model": "sonnet",
                    "messages": msgs,
                    "response_format": fmt,
                    "stream": stream,
                },
            )
            assert r.status_code == 200, r.text
            sent = anthropic_url[0].requests[-1]
            assert sent["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
            text = "".join(e.get("text", "") for e in ndjson(r.text)) if stream else ""
            answer = text or r.json()["message"]["content"]
            assert answer == '{"name": "Oslo"}'
        # Ollama's format, a schema, goes the same way.
        r = httpx.post(
            server.url + "/api/chat",
            json={"model": "sonnet", "messages": msgs, "format": schema, "stream": False},
        )
        assert r.status_code == 200, r.text
        assert anthropic_url[0].requests[-1]["output_config"]["format"]["schema"] == schema
        sent = len(anthropic_url[0].requests)
        for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {}}):
            r = httpx.post(
                server.url + "/api/v1/chat",
                json={"model": "sonnet", "messages": msgs, "response_format": fmt},
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"].startswith("$.response_format: ")
        r = httpx.post(
            server.url + "/api/chat", json={"model": "sonnet", "messages": msgs, "format": "json"}
        )
        assert r.status_code == 400 and r.json()["error"].startswith("$.format: "), r.text
        assert len(anthropic_url[0].requests) == sent  # never sent on
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={"model": "sonnet", "messages": msgs, "response_format": {"type": "text"}},
        )
        assert r.status_code == 200


def test_anthropic_refuses_json_mode_without_a_schema_on_a_route_with_fallbacks(
    anthropic_url: tuple[FakeAnthropic, str],
) -> None:
    # A route with fallbacks skips the backend's admit() (the chain would try the next
    # one instead): chat() refuses the schemaless JSON mode itself, before any request.
    config = claude_route(anthropic_url[1], "claude-x")
    config["models"]["routes"]["sonnet"]["fallbacks"] = ["echo"]
    msgs = [{"role": "user", "content": "hi"}]
    sent = len(anthropic_url[0].requests)
    with run_stella(config, {"CK": KEY}) as server:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "sonnet", "messages": msgs, "response_format": {"type": "json_object"}},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith("$.response_format: "), r.text
        assert r.json()["error"]["param"] == "response_format"
    assert len(anthropic_url[0].requests) == sent  # never sent on


async def test_a_malformed_model_list_is_an_upstream_error() -> None:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from stella.backends.openai import OpenAIBackend, OpenAIConfig
    from stella.errors import UpstreamError

    def junk(request: object) -> Response:
        return Response(b'{"models": 5, "data": "x"}', media_type="application/json")

    app = Starlette(routes=[Route(p, junk) for p in ("/api/tags", "/v1/models", "/models")])
    with serve(app) as url:
        for backend in (
            ollama(url),
            claude(url),
            OpenAIBackend("o", OpenAIConfig(kind="openai", base_url=url)),
        ):
            await backend.start()
            try:
                with pytest.raises(UpstreamError, match="malformed answer to GET"):
                    await backend.models()
            finally:
                await backend.aclose()


async def test_an_endless_model_list_or_error_page_is_read_within_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from stella.backends import http
    from stella.backends.openai import OpenAIBackend, OpenAIConfig
    from stella.errors import UpstreamError, UpstreamStatus

    monkeypatch.setattr(http, "MAX_LIST_BYTES", 1024 * 1024)

    async def endless() -> AsyncIterator[bytes]:
        yield b'{"error": {"message": "down for maintenance"}, "pad": "'
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)

    def models(request: Request) -> StreamingResponse:
        status = 503 if request.url.path.startswith("/err") else 200
        return StreamingResponse(endless(), status_code=status, media_type="application/json")

    app = Starlette(routes=[Route("/ok/models", models), Route("/err/models", models)])
    with serve(app) as url:
        for prefix, raised, words in (
            ("/ok", UpstreamError, "over 1048576 bytes"),
            ("/err", UpstreamStatus, "down for maintenance"),
        ):
            backend = OpenAIBackend("o", OpenAIConfig(kind="openai", base_url=url + prefix))
            await backend.start()
            try:
                with pytest.raises(raised, match=words):
                    async with asyncio.timeout(20):  # read whole, it would never end
                        await backend.models()
            finally:
                await backend.aclose()


def test_an_ollama_stream_cut_short_is_charged_its_prompt(
    ollama_url: tuple[FakeOllama, str],
) -> None:
    # Ollama counts the prompt on its done line alone: a stream that fails before it has
    # no count, and the prompt the upstream read is charged at admission's estimate.
    config = {
        "backends": {"gpu-box": {"kind": "ollama", "base_url": ollama_url[1]}},
        "models": {"routes": {"mid": {"backend": "gpu-box", "upstream_model": "error-mid"}}},
    }
    with run_stella(config) as server:
        ask = {"model": "mid", "messages": [{"role": "user", "content": "y" * 400}]}
        r = httpx.post(server.url + "/api/v1/chat", json=ask)
        assert ndjson(r.text)[-1]["type"] == "error"
        ev = server.wait_event(lambda e: e["request_id"] == r.headers["x-request-id"])
        assert (ev["prompt_tokens"], ev["completion_tokens"]) == (100, 2)
        assert ev["usage_estimated"] is True
