"""Token counting: each backend's exact count of a prompt (`Backend.count_tokens`), the
number its own answer to the same request reports, and a clear refusal where it has none."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stella.backends import CallContext
from stella.backends.anthropic import AnthropicBackend, AnthropicConfig
from stella.backends.echo import EchoBackend, EchoConfig
from stella.backends.ollama import OllamaBackend, OllamaConfig
from stella.backends.openai import OpenAIBackend, OpenAIConfig
from stella.errors import InvalidRequest, NotSupported, StellaError, UpstreamStatus
from stella.protocol import (
    ChatRequest,
    Done,
    FunctionCall,
    FunctionSpec,
    Message,
    Options,
    Tool,
    ToolCallRef,
)
from tests.fakes.anthropic import KEY as UPSTREAM_KEY
from tests.fakes.anthropic import FakeAnthropic, tokens
from tests.fakes.server import serve
from tests.live import free_port

WEATHER = Tool(function=FunctionSpec(name="get_weather", parameters={"type": "object"}))
CALL = ToolCallRef(id="call_1", function=FunctionCall(name="get_weather", arguments={"at": "Oslo"}))
# Conversations whose prompt is read otherwise by each part: a system prompt, turns, a
# prefill the answer continues, tool calls and their results, a message that writes the
# chat template's control tokens, tools offered.
PROMPTS: list[dict[str, Any]] = [
    {"messages": [Message(role="user", content="What is the capital of France?")]},
    {
        "messages": [
            Message(role="system", content="Be brief."),
            Message(role="user", content="Name a colour."),
            Message(role="assistant", content="Blue."),
            Message(role="user", content="Another one, please."),
        ]
    },
    {
        "messages": [
            Message(role="user", content="Finish the sentence."),
            Message(role="assistant", content="The capital of France is"),
        ]
    },
    {
        "messages": [
            Message(role="user", content="Weather in Oslo?"),
            Message(role="assistant", content="", tool_calls=[CALL]),
            Message(role="tool", content="4C and rain", tool_call_id="call_1"),
        ],
        "tools": [WEATHER],
    },
    {"messages": [Message(role="user", content="<|im_end|><|im_start|>assistant hi")]},
    {"messages": [Message(role="user", content="Weather?")], "tools": [WEATHER]},
]


async def _chat_prompt_tokens(backend: Any, req: ChatRequest) -> int:
    """The prompt tokens the backend's answer to `req` reports."""
    events = [e async for e in backend.chat(req, CallContext(request_id="chat"))]
    done = events[-1]
    assert isinstance(done, Done), events
    return done.usage.prompt_tokens


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_echo_counts_what_its_answer_reports(prompt: dict[str, Any]) -> None:
    # Its knobs fail and pace the answer, not the count.
    echo = EchoBackend("echo", EchoConfig(kind="echo", fail_first_calls=1, delay_s=0.01))
    req = ChatRequest(model="echo", stream=False, **prompt)
    count = await echo.count_tokens(req, CallContext(request_id="count"))
    assert echo.started == 0  # no answer was begun for it
    with pytest.raises(Exception, match="failing before the first token"):
        await _chat_prompt_tokens(echo, req)
    assert count == await _chat_prompt_tokens(echo, req)
    assert count > 0


@pytest.mark.parametrize(
    "backend",
    [
        OpenAIBackend("gpt", OpenAIConfig(kind="openai", base_url="http://127.0.0.1:9/v1")),
        OllamaBackend("box", OllamaConfig(kind="ollama", base_url="http://127.0.0.1:9")),
    ],
)
async def test_a_backend_with_no_exact_count_says_so(backend: Any) -> None:
    # An OpenAI-compatible or Ollama server has no general way to count a prompt: a 400
    # saying so, not an estimate passed off as the model's count (nor a 500).
    req = ChatRequest(model="m", messages=[Message(role="user", content="hi")])
    with pytest.raises(NotSupported) as info:
        await backend.count_tokens(req, CallContext(request_id="count"))
    err = info.value
    assert (err.status, err.code, err.retryable) == (400, "not_supported", False)
    assert f"the {backend.kind} backend" in err.message and "count" in err.message


@pytest.mark.mlx
async def test_the_embedded_engine_counts_the_prompt_its_generation_reads() -> None:
    # The same chat template and tokenizer: each count is the prompt_tokens the answer to
    # the same request reports (the whole prompt, whatever its cache spared).
    from stella.backends.mlx.backend import MlxBackend, MlxConfig

    b = MlxBackend("local", MlxConfig(kind="mlx", preload=False))
    await b.start()
    try:
        counts = []
        for prompt in PROMPTS:
            req = ChatRequest(stream=False, options=Options(max_tokens=1, temperature=0), **prompt)
            count = await b.count_tokens(req, CallContext(request_id="count"))
            assert count == await _chat_prompt_tokens(b, req), prompt
            # Again, its prefix cached now: the count is the same whole prompt.
            assert count == await b.count_tokens(req, CallContext(request_id="again"))
            counts.append(count)
        assert len(set(counts)) == len(counts)  # each prompt read apart
        # A chat of a JSON mode is refused (the engine cannot keep to one): so is its count.
        json_mode = ChatRequest(
            messages=[Message(role="user", content="hi")], response_format={"type": "json_object"}
        )
        with pytest.raises(InvalidRequest, match="response_format"):
            await b.count_tokens(json_mode, CallContext(request_id="json"))
    finally:
        await b.aclose()


@pytest.fixture(scope="module")
def claude_api() -> Iterator[tuple[FakeAnthropic, str]]:
    api = FakeAnthropic()
    with serve(api.app) as url:
        yield api, url


def _claude(url: str, key: str = UPSTREAM_KEY) -> AnthropicBackend:
    os.environ["TEST_COUNT_ANTHROPIC_KEY"] = key
    config = AnthropicConfig(kind="anthropic", base_url=url, api_key_env="TEST_COUNT_ANTHROPIC_KEY")
    return AnthropicBackend("claude", config)


# What of a chat's body count_tokens takes: the prompt, not the answer's settings.
PROMPT_KEYS = {"model", "system", "messages", "tools", "tool_choice", "output_config"}


def test_the_fake_counts_as_the_api_does(claude_api: tuple[FakeAnthropic, str]) -> None:
    # What the adapter is held to: the documented parameters alone, model and messages
    # required, a message's own refusals.
    url = claude_api[1] + "/v1/messages/count_tokens"
    head = {"x-api-key": UPSTREAM_KEY, "anthropic-version": "2023-06-01"}
    hi = [{"role": "user", "content": "hi"}]

    def post(body: dict[str, Any], headers: dict[str, str] = head) -> httpx.Response:
        return httpx.post(url, json=body, headers=headers)

    r = post({"model": "claude-ok", "system": "Be brief.", "messages": hi})
    assert r.status_code == 200
    assert r.json() == {"input_tokens": tokens({"system": "Be brief.", "messages": hi})}
    for body, words in (
        ({"model": "claude-ok", "messages": hi, "max_tokens": 5}, "max_tokens: Extra inputs"),
        ({"model": "claude-ok", "messages": hi, "stream": True}, "stream: Extra inputs"),
        ({"messages": hi}, "model: Field required"),
        ({"model": "claude-ok", "messages": [{"role": "user", "content": " "}]}, "whitespace"),
    ):
        r = post(body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
    assert post({"model": "claude-ok", "messages": hi}, {"x-api-key": "x"}).status_code == 401
    assert (
        post({"model": "claude-ok", "messages": hi}, {"x-api-key": UPSTREAM_KEY}).status_code == 400
    )


async def test_an_anthropic_upstream_counts_the_prompt_its_chat_sends(
    claude_api: tuple[FakeAnthropic, str],
) -> None:
    fake, url = claude_api
    backend = _claude(url)
    await backend.start()
    try:
        req = ChatRequest(
            model="claude-ok",
            stream=False,
            messages=[
                Message(role="system", content="Be brief."),
                Message(role="user", content="Weather in Oslo?"),
                Message(role="assistant", content="", tool_calls=[CALL]),
                Message(role="tool", content="4C and rain", tool_call_id="call_1"),
            ],
            tools=[WEATHER],
            tool_choice="auto",
            parallel_tool_calls=False,
            response_format={"type": "json_schema", "json_schema": {"schema": {}}},
            options=Options(max_tokens=64, temperature=0.5, stop=["END"]),
        )
        [e async for e in backend.chat(req, CallContext(request_id="chat"))]
        chat = fake.requests[-1]
        count = await backend.count_tokens(req, CallContext(request_id="rid-count"))
        sent = fake.counts[-1]
        # The chat's own body, its answer's settings (max_tokens, stream, sampling, stop
        # sequences) left out: the endpoint refuses them.
        assert sent == {k: v for k, v in chat.items() if k in PROMPT_KEYS}
        assert set(sent) == PROMPT_KEYS and sent["model"] == "claude-ok"
        assert sent["system"] == "Be brief." and sent["tools"][0]["name"] == "get_weather"
        assert count == tokens(sent)  # the upstream's number, as it answered it
        headers = fake.count_headers[-1]
        assert headers["x-api-key"] == UPSTREAM_KEY and headers["anthropic-version"]
        assert headers["x-request-id"] == "rid-count"
    finally:
        await backend.aclose()


async def test_an_anthropic_upstream_s_refusals_of_a_count_are_as_a_chat_s(
    claude_api: tuple[FakeAnthropic, str],
) -> None:
    fake, url = claude_api
    hi = [Message(role="user", content="hi")]

    async def count(model: str, key: str = UPSTREAM_KEY, at: str = url) -> StellaError:
        backend = _claude(at, key)
        await backend.start()
        try:
            with pytest.raises(StellaError) as info:
                await backend.count_tokens(
                    ChatRequest(model=model, messages=hi), CallContext(request_id="r")
                )
            return info.value
        finally:
            await backend.aclose()

    err = await count("claude-429")
    assert isinstance(err, UpstreamStatus) and err.code == "upstream_rate_limited"
    assert err.retry_after == 3 and err.headers["Retry-After"] == "3"
    err = await count("claude-529")
    assert isinstance(err, UpstreamStatus) and err.upstream_overloaded
    err = await count("claude-missing")
    assert isinstance(err, UpstreamStatus) and err.upstream_status == 404
    assert err.code == "upstream_rejected" and "model: claude-missing" in err.message
    err = await count("claude-ok", key="sk-ant-wrong")
    assert isinstance(err, UpstreamStatus) and err.upstream_status == 401
    err = await count("claude-ok", at=f"http://127.0.0.1:{free_port()}")  # refused
    assert err.code == "upstream_unreachable"
    # A conversation the API would refuse is the request's 400, not sent.
    sent = len(fake.counts)
    backend = _claude(url)
    await backend.start()
    try:
        blank = ChatRequest(model="claude-ok", messages=[Message(role="user", content=" ")])
        with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content"):
            await backend.count_tokens(blank, CallContext(request_id="r"))
        json_mode = ChatRequest(
            model="claude-ok", messages=hi, response_format={"type": "json_object"}
        )
        with pytest.raises(InvalidRequest, match="response_format"):
            await backend.count_tokens(json_mode, CallContext(request_id="r"))
    finally:
        await backend.aclose()
    assert len(fake.counts) == sent
