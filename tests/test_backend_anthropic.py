"""The anthropic adapter against the fake Messages API: what the API refuses, what it
sends besides its events, and answers a stream may end or start otherwise, on their own
and through stella's native, OpenAI and Anthropic dialects, streamed and not."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stella.backends import CallContext
from stella.backends.anthropic import (
    AnthropicBackend,
    AnthropicConfig,
    ratelimit_wait,
)
from stella.backends.anthropic_request import request_body
from stella.backends.http import upstream_request_id
from stella.errors import ContextTooLong, InvalidRequest, UpstreamError, UpstreamStatus
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
)
from tests.fakes.anthropic import KEY, LIMITS, PINGS_S, TEXT_START, TOO_LONG, FakeAnthropic
from tests.fakes.server import serve
from tests.live import LiveServer, ndjson, run_stella

HELLO = "Hello! How can I help?"
HI = [{"role": "user", "content": "hi"}]
# Each dialect's chat path, streamed and not.
DIALECTS = [
    (path, stream)
    for path in ("/api/v1/chat", "/v1/chat/completions", "/v1/messages")
    for stream in (True, False)
]
# The fake's models that get a route of their own name in the shared server.
MODELS = [
    "claude-ok",
    "claude-cached",
    "claude-comments",
    "claude-no-message-stop",
    "claude-cut",
    "claude-text-start",
    "claude-json-anyway",
    "claude-json-error-anyway",
    *TOO_LONG,
]


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeAnthropic, str]]:
    api = FakeAnthropic()
    with serve(api.app) as url:
        yield api, url


@pytest.fixture(scope="module")
def server(fake: tuple[FakeAnthropic, str]) -> Iterator[LiveServer]:
    routes: dict[str, Any] = {
        m: {"backend": "claude", "upstream_model": m, "retries": 2, "retry_backoff_s": 0.01}
        for m in MODELS
    }
    # A slow stretch kept open by SSE comments only, longer than the silence limits.
    routes["claude-comments"].update(ttft_timeout_s=PINGS_S / 3, idle_timeout_s=PINGS_S / 3)
    config = {
        "backends": {"claude": {"kind": "anthropic", "base_url": fake[1], "api_key_env": "CK"}},
        "models": {"routes": routes},
        "breaker": {"failure_threshold": 0},  # failures on purpose here
    }
    with run_stella(config, {"CK": KEY}) as live:
        yield live


@dataclass
class Reply:
    """One dialect's answer, in common terms."""

    status: int
    text: str = ""
    end: str = ""  # finish_reason, or the Anthropic dialect's stop_reason
    error: str = ""  # an error's code (its type in the Anthropic dialect)
    message: str = ""  # an error's message
    usage: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""


def ask(server: LiveServer, path: str, stream: bool, model: str, **body: Any) -> Reply:
    """POST a chat to `path` and read its answer (a stream to its end) as a Reply."""
    payload: dict[str, Any] = {"model": model, "stream": stream, "messages": HI, **body}
    if path == "/v1/messages":
        payload.setdefault("max_tokens", 50)
    if path == "/v1/chat/completions" and stream:
        payload["stream_options"] = {"include_usage": True}
    r = httpx.post(server.url + path, json=payload, timeout=30)
    reply = Reply(r.status_code, request_id=r.headers.get("x-request-id", ""))
    if r.status_code != 200:
        err = r.json()["error"]
        reply.error = err.get("code") or err["type"]
        reply.message = err["message"]
        return reply
    if path == "/api/v1/chat":
        lines = ndjson(r.text) if stream else [{"type": "done", **r.json()}]
        for line in lines:
            if line["type"] == "delta":
                reply.text += line["text"]
            elif line["type"] == "done":
                reply.text += line.get("response", "")
                reply.end, reply.usage = line["finish_reason"], line["usage"]
            elif line["type"] == "error":
                reply.error, reply.message = line["code"], line["message"]
        return reply
    if path == "/v1/chat/completions":
        if not stream:
            choice = r.json()["choices"][0]
            reply.text, reply.end = choice["message"]["content"] or "", choice["finish_reason"]
            reply.usage = r.json()["usage"]
            return reply
        for data in _sse_data(r.text):
            if "error" in data:
                reply.error, reply.message = data["error"]["code"], data["error"]["message"]
            for choice in data.get("choices") or ():
                reply.text += choice["delta"].get("content") or ""
                reply.end = choice.get("finish_reason") or reply.end
            reply.usage = data.get("usage") or reply.usage
        return reply
    if not stream:
        m = r.json()
        reply.text = "".join(b.get("text", "") for b in m["content"])
        reply.end, reply.usage = m["stop_reason"], m["usage"]
        return reply
    for data in _sse_data(r.text):
        if data["type"] == "content_block_delta" and data["delta"]["type"] == "text_delta":
            reply.text += data["delta"]["text"]
        elif data["type"] == "message_delta":
            reply.end, reply.usage = data["delta"]["stop_reason"], data["usage"]
        elif data["type"] == "error":
            reply.error, reply.message = data["error"]["type"], data["error"]["message"]
    return reply


def _sse_data(text: str) -> list[dict[str, Any]]:
    """The JSON of each `data:` line of an SSE body (OpenAI's [DONE] left out)."""
    return [
        json.loads(line[5:])
        for line in text.splitlines()
        if line.startswith("data:") and line[5:].strip() != "[DONE]"
    ]


def claude(url: str) -> AnthropicBackend:
    os.environ["TEST_ANTHROPIC_KEY"] = KEY
    return AnthropicBackend(
        "a", AnthropicConfig(kind="anthropic", base_url=url, api_key_env="TEST_ANTHROPIC_KEY")
    )


async def run(url: str, model: str, ctx: CallContext | None = None, **kw: Any) -> list[Any]:
    """The events of one call of `model` on a backend to the fake at `url`."""
    backend = claude(url)
    await backend.start()
    try:
        req = ChatRequest(model=model, **{"messages": [Message(role="user", content="hi")], **kw})
        return [e async for e in backend.chat(req, ctx or CallContext(request_id="rid-1"))]
    finally:
        await backend.aclose()


def _asked(fake: FakeAnthropic, model: str) -> int:
    return sum(1 for r in fake.requests if r["model"] == model)


async def test_whitespace_before_tool_calls_is_no_text_block(
    fake: tuple[FakeAnthropic, str],
) -> None:
    # A Qwen-style turn writes "\n\n" before its calls: sent as a text block, which the
    # API refuses ("text content blocks must contain non-whitespace text").
    call = ToolCallRef(id="toolu_1", function=FunctionCall(name="get_weather", arguments={}))
    history = [
        Message(role="user", content="weather?"),
        Message(role="assistant", content="\n\n", tool_calls=[call]),
        Message(role="tool", content="sunny", tool_call_id="toolu_1"),
    ]
    tools = [Tool(function=FunctionSpec(name="get_weather"))]
    events = await run(fake[1], "claude-ok", messages=history, tools=tools)
    assert isinstance(events[-1], Done)
    turn = fake[0].requests[-1]["messages"][1]
    assert [b["type"] for b in turn["content"]] == ["tool_use"]
    # Text beside them goes as it came.
    history[1] = Message(role="assistant", content="Let me see. ", tool_calls=[call])
    await run(fake[1], "claude-ok", messages=history, tools=tools)
    turn = fake[0].requests[-1]["messages"][1]
    assert turn["content"][0] == {"type": "text", "text": "Let me see. "}


@pytest.mark.parametrize("path", ["/api/v1/chat", "/v1/chat/completions"])
def test_a_qwen_style_tool_turn_goes_on_on_a_claude_route(server: LiveServer, path: str) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = {} if path == "/api/v1/chat" else "{}"  # type: ignore[index]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "\n\n", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    reply = ask(server, path, False, "claude-ok", messages=messages)
    assert (reply.status, reply.text) == (200, HELLO), reply


async def test_temperature_and_top_p_together_send_the_temperature(
    fake: tuple[FakeAnthropic, str],
) -> None:
    # Current models refuse both at once (a 400, a 502 to the client).
    events = await run(fake[1], "claude-ok", options=Options(temperature=0.5, top_p=0.9))
    assert isinstance(events[-1], Done)
    sent = fake[0].requests[-1]
    assert sent["temperature"] == 0.5 and "top_p" not in sent
    await run(fake[1], "claude-ok", options=Options(top_p=0.9))
    assert fake[0].requests[-1]["top_p"] == 0.9 and "temperature" not in fake[0].requests[-1]


@pytest.mark.parametrize(("path", "stream"), DIALECTS)
def test_temperature_and_top_p_together_are_answered_in_every_dialect(
    server: LiveServer, path: str, stream: bool
) -> None:
    sampling = {"temperature": 0.3, "top_p": 0.5}
    body = {"options": sampling} if path == "/api/v1/chat" else sampling
    reply = ask(server, path, stream, "claude-ok", **body)
    assert (reply.status, reply.text, reply.error) == (200, HELLO, ""), reply


def _refusal(messages: list[Message]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        request_body(ChatRequest(model="m", messages=messages), 100)
    return info.value


def test_requests_the_api_refuses_are_400s_naming_the_field() -> None:
    system = Message(role="system", content="be nice")
    blank = _refusal([system, Message(role="user", content=" \n")])
    assert blank.param == "messages[1].content" and blank.message.startswith(
        "$.messages[1].content: "
    )
    assert _refusal([Message(role="user", content="")]).param == "messages[0].content"
    alone = _refusal([system])
    assert alone.param == "messages" and "besides the system prompt" in alone.message
    prefill = _refusal(
        [Message(role="user", content="hi"), Message(role="assistant", content="A ")]
    )
    assert prefill.param == "messages[1].content"
    assert prefill.message == (
        "$.messages[1].content: final assistant content cannot end with trailing whitespace"
    )
    assert _refusal([Message(role="user", content="hi"), Message(role="assistant", content="\n")])
    # What the API takes: an empty prefill, a blank turn earlier (left out), a blank system.
    body = request_body(
        ChatRequest(
            model="m",
            messages=[
                Message(role="system", content="\n"),
                Message(role="user", content="hi"),
                Message(role="assistant", content=" "),
                Message(role="user", content="again"),
                Message(role="assistant", content=""),
            ],
        ),
        100,
    )
    assert "system" not in body
    assert [m["content"] for m in body["messages"]] == ["hi", "again", ""]


@pytest.mark.parametrize("path", ["/api/v1/chat", "/v1/chat/completions"])
def test_requests_the_api_refuses_are_400s_in_the_dialects(
    server: LiveServer, fake: tuple[FakeAnthropic, str], path: str
) -> None:
    # They were sent, and the API's 400 came back a 502 upstream_rejected. Refused before
    # a stream begins, they are a 400 in the native stream too.
    before = len(fake[0].requests)
    cases = [
        ([{"role": "user", "content": "  "}], "messages[0].content"),
        ([{"role": "system", "content": "be nice"}], "messages"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}],
            "messages[1].content",
        ),
    ]
    for messages, param in cases:
        for stream in (True, False):
            reply = ask(server, path, stream, "claude-ok", messages=messages)
            assert (reply.status, reply.error) == (400, "invalid_request"), reply
            assert reply.message.startswith(f"$.{param}: "), reply
    assert len(fake[0].requests) == before


@pytest.mark.parametrize("stream", [True, False])
def test_the_anthropic_dialect_refuses_a_user_turn_of_only_whitespace(
    server: LiveServer, fake: tuple[FakeAnthropic, str], stream: bool
) -> None:
    # As the API does, naming the message as the client wrote it (the backend would
    # count the system prompt among the messages).
    before = len(fake[0].requests)
    for content, param in (
        ("\n ", "messages[0].content"),
        ([{"type": "text", "text": "\t"}], "messages[0].content[0].text"),
    ):
        reply = ask(
            server,
            "/v1/messages",
            stream,
            "claude-ok",
            system="be nice",
            messages=[{"role": "user", "content": content}],
        )
        assert (reply.status, reply.error) == (400, "invalid_request_error"), reply
        assert reply.message == f"$.{param}: must not be only whitespace"
    assert len(fake[0].requests) == before


def test_the_fake_refuses_what_the_api_refuses(fake: tuple[FakeAnthropic, str]) -> None:
    # The cases above are the API's refusals, not the fake's inventions of them.
    def sent(**body: Any) -> httpx.Response:
        return httpx.post(
            fake[1] + "/v1/messages",
            json={"model": "claude-ok", "max_tokens": 5, "messages": HI, **body},
            headers={"x-api-key": KEY},
        )

    assert sent(temperature=0.5, top_p=0.5).status_code == 400
    assert sent(messages=[]).status_code == 400
    assert sent(messages=[{"role": "user", "content": " "}]).status_code == 400
    tool_turn = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "\n\n"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
    ]
    assert sent(messages=tool_turn).status_code == 400
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a "}]
    assert sent(messages=prefill).status_code == 400
    r = sent()
    assert r.status_code == 200 and r.headers["request-id"].startswith("req_fake_")


@pytest.mark.parametrize("model", list(TOO_LONG))
async def test_a_prompt_too_long_is_context_too_long_with_the_api_s_words(
    fake: tuple[FakeAnthropic, str], model: str
) -> None:
    with pytest.raises(ContextTooLong) as info:
        await run(fake[1], model)
    err = info.value
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    assert err.message == f"a: {TOO_LONG[model]}"
    assert not err.retryable and not err.falls_back


@pytest.mark.parametrize(("path", "stream"), DIALECTS)
def test_a_prompt_too_long_is_a_400_not_retried_in_every_dialect(
    server: LiveServer, fake: tuple[FakeAnthropic, str], path: str, stream: bool
) -> None:
    # The API's 400 for a prompt past the window was a 502 upstream_rejected: it is the
    # request's fault, as the embedded engine's context_length_exceeded.
    for model, words in TOO_LONG.items():
        before = _asked(fake[0], model)
        reply = ask(server, path, stream, model)
        kind = "invalid_request_error" if path == "/v1/messages" else "context_length_exceeded"
        if path == "/api/v1/chat" and stream:
            # The native stream's start line went out at once: an in-band error line.
            assert (reply.status, reply.error) == (200, "context_length_exceeded")
        else:
            assert (reply.status, reply.error) == (400, kind), reply
        assert words in reply.message
        assert _asked(fake[0], model) == before + 1  # not retried (the route allows 2)
        ev = server.wait_event(lambda e, rid=reply.request_id: e["request_id"] == rid)
        assert [a["error"] for a in ev["attempts"]] == ["context_length_exceeded"]
        assert ev["error_code"] == "context_length_exceeded"


def test_a_429_without_retry_after_waits_for_its_spent_limits() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)

    def at(seconds: float) -> str:
        return (now + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": at(2),
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": at(7.5),
        # Not spent: its later reset is not waited for.
        "anthropic-ratelimit-output-tokens-remaining": "100",
        "anthropic-ratelimit-output-tokens-reset": at(60),
    }
    assert ratelimit_wait(headers, now.timestamp()) == 7.5
    # Past resets wait nothing; none spent, or no reset that reads as a moment: no word.
    assert ratelimit_wait(headers, now.timestamp() + 100) == 0.0
    left = {**headers, "anthropic-ratelimit-input-tokens-remaining": "5"}
    assert ratelimit_wait(left, now.timestamp()) == 2
    assert ratelimit_wait({"anthropic-ratelimit-tokens-remaining": "0"}) is None
    spent = {"anthropic-ratelimit-tokens-remaining": "0"}
    assert ratelimit_wait({**spent, "anthropic-ratelimit-tokens-reset": "soon"}) is None
    no_zone = {**spent, "anthropic-ratelimit-tokens-reset": "2025-01-01T00:00:07"}
    assert ratelimit_wait(no_zone) is None
    assert ratelimit_wait({**spent, "anthropic-ratelimit-tokens-reset": at(10**9)}, 0) == 86_400


async def test_a_429_without_retry_after_says_when_its_limits_reset(
    fake: tuple[FakeAnthropic, str],
) -> None:
    with pytest.raises(UpstreamStatus) as info:
        await run(fake[1], "claude-429-limits")
    err = info.value
    latest = max(reset for left, reset in LIMITS.values() if left == 0)
    assert err.upstream_status == 429 and err.retryable
    assert err.retry_after_hint is not None and latest - 1 < err.retry_after_hint <= latest
    assert err.headers["Retry-After"] == str(latest)


def test_a_429_without_retry_after_is_not_retried_at_once(
    fake: tuple[FakeAnthropic, str],
) -> None:
    # It was asked again at once, twice, and refused each time: now its wait (3 s) is
    # longer than the route's retry_max_backoff_s, which ends the retries there, and the
    # client is told when to come back.
    config = {
        "backends": {"claude": {"kind": "anthropic", "base_url": fake[1], "api_key_env": "CK"}},
        "models": {
            "routes": {
                "limited": {
                    "backend": "claude",
                    "upstream_model": "claude-429-limits",
                    "retries": 2,
                    "retry_backoff_s": 0.01,
                    "retry_max_backoff_s": 1,
                }
            }
        },
    }
    with run_stella(config, {"CK": KEY}) as live:
        before = _asked(fake[0], "claude-429-limits")
        r = httpx.post(
            live.url + "/api/v1/chat", json={"model": "limited", "stream": False, "messages": HI}
        )
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_rate_limited"
        assert r.headers["retry-after"] == "3", r.headers
        assert _asked(fake[0], "claude-429-limits") == before + 1


@pytest.mark.parametrize(("path", "stream"), DIALECTS)
def test_sse_comments_keep_the_silence_limits_from_firing(
    server: LiveServer, path: str, stream: bool
) -> None:
    # OpenRouter and proxies keep a slow stream open with `: keepalive` comment lines:
    # signs of life, as the API's pings are (it was an upstream_timeout).
    reply = ask(server, path, stream, "claude-comments")
    assert (reply.status, reply.text, reply.error) == (200, HELLO, ""), reply


@pytest.mark.parametrize(("path", "stream"), DIALECTS)
def test_a_stream_with_its_stop_reason_but_no_message_stop_is_whole(
    server: LiveServer, fake: tuple[FakeAnthropic, str], path: str, stream: bool
) -> None:
    # As the API's SDK takes it: it failed ("stream ended before message_stop"), and a
    # non-stream call was asked three times.
    before = _asked(fake[0], "claude-no-message-stop")
    reply = ask(server, path, stream, "claude-no-message-stop")
    assert (reply.status, reply.text, reply.error) == (200, HELLO, ""), reply
    assert reply.end in ("stop", "end_turn")
    assert _asked(fake[0], "claude-no-message-stop") == before + 1


async def test_a_stream_cut_before_its_stop_reason_still_fails(
    fake: tuple[FakeAnthropic, str],
) -> None:
    got: list[Any] = []
    with pytest.raises(UpstreamError, match="ended before message_stop"):
        got += await run(fake[1], "claude-cut")
    events = await run(fake[1], "claude-no-message-stop")
    assert "".join(e.text for e in events if isinstance(e, Delta)) == HELLO
    assert events[-1].finish_reason == "stop" and events[-1].usage.completion_tokens == 6


@pytest.mark.parametrize(("path", "stream"), DIALECTS)
def test_text_in_a_text_block_s_start_is_kept(server: LiveServer, path: str, stream: bool) -> None:
    reply = ask(server, path, stream, "claude-text-start")
    assert (reply.status, reply.text) == (200, TEXT_START + HELLO), reply


async def test_text_in_a_text_block_s_start_meets_the_stop_strings(
    fake: tuple[FakeAnthropic, str],
) -> None:
    # Held for a local stop (only whitespace, which the API refuses) as any text is.
    events = await run(fake[1], "claude-text-start", options=Options(stop=["\n", " "]))
    assert [e.text for e in events if isinstance(e, Delta)] == [TEXT_START.split(" ")[0]]
    assert events[-1].finish_reason == "stop"


@pytest.mark.parametrize(("path", "stream"), DIALECTS)
def test_a_whole_message_answered_to_a_stream_is_the_answer(
    server: LiveServer, fake: tuple[FakeAnthropic, str], path: str, stream: bool
) -> None:
    # An upstream that ignores `stream: true` and answers one JSON Message: it failed as
    # a stream without message_stop, three times.
    before = _asked(fake[0], "claude-json-anyway")
    reply = ask(server, path, stream, "claude-json-anyway")
    assert (reply.status, reply.text, reply.error) == (200, HELLO, ""), reply
    assert reply.end in ("stop", "end_turn")
    assert _asked(fake[0], "claude-json-anyway") == before + 1
    prompt = reply.usage.get("prompt_tokens", reply.usage.get("input_tokens"))
    assert prompt == 25


async def test_a_whole_message_s_tools_usage_and_errors(fake: tuple[FakeAnthropic, str]) -> None:
    events = await run(fake[1], "claude-json-anyway")
    assert "".join(e.text for e in events if isinstance(e, Delta)) == HELLO
    assert events[-1].usage.prompt_tokens == 25 and events[-1].usage.completion_tokens == 6
    with pytest.raises(UpstreamStatus) as info:
        await run(fake[1], "claude-json-error-anyway")
    assert info.value.upstream_status == 529  # an overloaded_error object, as the event


def test_a_whole_error_object_answered_to_a_stream_is_the_upstream_s_overload(
    server: LiveServer, fake: tuple[FakeAnthropic, str]
) -> None:
    before = _asked(fake[0], "claude-json-error-anyway")
    reply = ask(server, "/v1/messages", True, "claude-json-error-anyway")
    assert (reply.status, reply.error) == (529, "overloaded_error"), reply
    assert _asked(fake[0], "claude-json-error-anyway") == before + 3  # retryable: 2 retries


async def test_a_whole_message_s_tool_call(fake: tuple[FakeAnthropic, str]) -> None:
    # A whole Message's tool_use has its input whole: the call, as from a stream.
    events = await run(
        fake[1],
        "claude-tools-json-anyway",
        tools=[Tool(function=FunctionSpec(name="get_weather"))],
    )
    assert events[0] == ToolCall(
        index=0, id="toolu_1", name="get_weather", arguments={"location": "Paris"}
    )
    assert events[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize(("path", "stream"), DIALECTS)
def test_the_upstream_s_request_id_is_in_the_log(
    server: LiveServer, fake: tuple[FakeAnthropic, str], path: str, stream: bool
) -> None:
    reply = ask(server, path, stream, "claude-ok")
    assert reply.status == 200, reply
    given = fake[0].request_ids[-1]
    ev = server.wait_event(lambda e: e["request_id"] == reply.request_id)
    assert ev["upstream_request_id"] == given
    assert [a.get("upstream_request_id") for a in ev["attempts"]] == [given]


def test_each_failed_attempt_s_upstream_request_id_is_in_the_log(
    server: LiveServer, fake: tuple[FakeAnthropic, str]
) -> None:
    reply = ask(server, "/api/v1/chat", False, "claude-cut")
    assert reply.status == 502, reply
    ev = server.wait_event(lambda e: e["request_id"] == reply.request_id)
    ids = [a.get("upstream_request_id") for a in ev["attempts"]]
    assert ids == fake[0].request_ids[-3:] and len(set(ids)) == 3
    assert ev["upstream_request_id"] == ids[-1]


async def test_the_upstream_s_request_id_reaches_the_call_on_an_error_status(
    fake: tuple[FakeAnthropic, str],
) -> None:
    ctx = CallContext(request_id="rid-429")
    with pytest.raises(UpstreamStatus):
        await run(fake[1], "claude-429", ctx)
    assert ctx.upstream_request_id == fake[0].request_ids[-1]


def test_an_upstream_request_id_is_read_from_either_header() -> None:
    assert upstream_request_id({"request-id": "req_011CS"}, "mine") == "req_011CS"
    assert upstream_request_id({"x-request-id": "req_abc"}, "mine") == "req_abc"
    both = {"request-id": "req_a", "x-request-id": "req_b"}
    assert upstream_request_id(both, "mine") == "req_a"
    # An upstream that sends stella's own back (echoing X-Request-ID) gave none of its own.
    assert upstream_request_id({"x-request-id": "mine"}, "mine") == ""
    assert upstream_request_id({}, "mine") == ""
    # Kept short and printable: it goes into the log as it came.
    assert upstream_request_id({"request-id": "a\tb c" + "x" * 500}, "mine") == "abc" + "x" * 123


def test_an_openai_compatible_upstream_s_x_request_id_is_in_the_log() -> None:
    async def chat(request: Request) -> Response:
        answer = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return JSONResponse(answer, headers={"x-request-id": "req_openai_1"})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with serve(app, health="/") as url:
        config = {
            "backends": {"gpt": {"kind": "openai", "base_url": url + "/v1"}},
            "models": {"routes": {"gpt": {"backend": "gpt", "upstream_model": "m"}}},
        }
        with run_stella(config) as live:
            r = httpx.post(
                live.url + "/v1/chat/completions",
                json={"model": "gpt", "messages": HI},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            rid = r.headers["x-request-id"]
            ev = live.wait_event(lambda e: e["request_id"] == rid)
            assert ev["upstream_request_id"] == "req_openai_1"
            assert ev["attempts"][0]["upstream_request_id"] == "req_openai_1"


@pytest.mark.parametrize("stream", [True, False])
def test_cache_writes_are_cache_creation_input_tokens_on_v1_messages(
    server: LiveServer, stream: bool
) -> None:
    # The fake's claude-cached: 25 input tokens, 200 written to the cache, 1000 read.
    reply = ask(server, "/v1/messages", stream, "claude-cached")
    assert reply.status == 200, reply
    assert reply.usage == {
        "input_tokens": 25,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 1000,
        "output_tokens": 6,
    }
    # The log has both counts: reads and writes are billed apart.
    ev = server.wait_event(lambda e: e.get("request_id") == reply.request_id)
    assert (ev["prompt_tokens"], ev["cached_tokens"], ev["cache_write_tokens"]) == (1225, 1000, 200)
    # The prompt is whole everywhere else (README's usage paragraph).
    reply = ask(server, "/api/v1/chat", stream, "claude-cached")
    assert reply.usage["prompt_tokens"] == 1225


def test_message_start_counts_cache_writes_apart(server: LiveServer) -> None:
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": "claude-cached", "max_tokens": 50, "stream": True, "messages": HI},
        timeout=30,
    )
    start = next(d for d in _sse_data(r.text) if d["type"] == "message_start")
    assert start["message"]["usage"] == {
        "input_tokens": 25,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 1000,
        "output_tokens": 0,
    }


def test_a_wrong_base_url_s_404_is_the_backend_s_fault_a_missing_model_s_is_not(
    fake: tuple[FakeAnthropic, str],
) -> None:
    # A base_url ending in /v1 makes /v1/v1/messages: the API's 404 "Not Found" to every
    # call. It falls back, and counts against the backend's circuit, so /ready and the
    # metrics show the misconfiguration; the API's 404 for a model it does not have
    # ("model: x") falls back too but says nothing of the backend.
    good = {"kind": "anthropic", "base_url": fake[1], "api_key_env": "CK"}
    tries = {"retries": 2, "retry_backoff_s": 0.01}
    config = {
        "backends": {"claude": good, "wrong": {**good, "base_url": fake[1] + "/v1"}},
        "models": {
            "default": "wrong-alone",
            "routes": {
                "missing": {"backend": "claude", "upstream_model": "claude-missing", **tries},
                "missing-fb": {
                    "backend": "claude",
                    "upstream_model": "claude-missing",
                    "fallbacks": ["echo"],
                    **tries,
                },
                "wrong": {
                    "backend": "wrong",
                    "upstream_model": "claude-ok",
                    "fallbacks": ["echo"],
                    **tries,
                },
                "wrong-alone": {"backend": "wrong", "upstream_model": "claude-ok", **tries},
            },
        },
        "breaker": {"failure_threshold": 3, "cooldown_s": 60},
    }

    def attempts(live: LiveServer, r: httpx.Response) -> list[tuple[str, str | None]]:
        rid = r.headers["x-request-id"]
        ev = live.wait_event(lambda e: e["request_id"] == rid)
        assert all(a.get("upstream_status", 404) == 404 for a in ev["attempts"]), ev
        return [(a["backend"], a["error"]) for a in ev["attempts"]]

    with run_stella(config, {"CK": KEY}) as live:
        for _ in range(2):
            r = httpx.post(live.url + "/api/v1/chat", json={"model": "missing-fb", "messages": HI})
            assert r.status_code == 200 and ndjson(r.text)[-1]["backend"] == "echo", r.text
            assert attempts(live, r) == [("claude", "upstream_rejected"), ("echo", None)]
            r = httpx.post(
                live.url + "/v1/messages",
                json={"model": "missing", "max_tokens": 9, "messages": HI},
            )
            assert r.status_code == 502, r.text
            assert (
                r.json()["error"]["message"]
                == "claude: upstream answered 404: model: claude-missing"
            )
            assert attempts(live, r) == [("claude", "upstream_rejected")]
        models = httpx.get(live.url + "/api/v1/models").json()["models"]
        assert {m["circuit"] for m in models if m["backend"] == "claude"} == {"closed"}

        # The wrong path: not retried, fallen back from, streamed (before the first
        # token) and not; the third failure opens the circuit.
        for stream in (True, False):
            r = httpx.post(
                live.url + "/api/v1/chat",
                json={"model": "wrong", "stream": stream, "messages": HI},
            )
            assert r.status_code == 200, r.text
            said = ndjson(r.text)[-1] if stream else r.json()
            assert said["backend"] == "echo", r.text
            assert attempts(live, r) == [("wrong", "upstream_path_not_found"), ("echo", None)]
        r = httpx.post(live.url + "/api/v1/chat", json={"stream": False, "messages": HI})
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "upstream_path_not_found" and error["retryable"] is False
        assert error["message"] == (
            "wrong: upstream answered 404 for /v1/v1/messages: Not Found; the upstream has "
            "no such path: check the backend's base_url"
        ), error
        assert attempts(live, r) == [("wrong", "upstream_path_not_found")]
        opened = live.wait_event(lambda e: e["backend"] == "wrong", name="circuit_opened")
        assert opened["error"] == "upstream_path_not_found", opened
        ready = httpx.get(live.url + "/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["circuit"] == "wrong: open"
        metrics = httpx.get(live.url + "/metrics").text
        assert 'stella_circuit_state{backend="wrong"} 2.0' in metrics
        assert 'stella_circuit_state{backend="claude"} 0.0' in metrics
