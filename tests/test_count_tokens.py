"""Token counting: each backend's exact count of a prompt (`Backend.count_tokens`), the
number its own answer to the same request reports, and a clear refusal where it has none."""

from __future__ import annotations

from typing import Any

import pytest

from stella.backends import CallContext
from stella.backends.echo import EchoBackend, EchoConfig
from stella.backends.ollama import OllamaBackend, OllamaConfig
from stella.backends.openai import OpenAIBackend, OpenAIConfig
from stella.errors import InvalidRequest, NotSupported
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
