"""Extended thinking with an Anthropic upstream, through a live stella: what the fake
Messages API refuses of it, the thinking asked for (a client's own `thinking`, a
reasoning effort's budget), its signatures carried through and back across a tool loop,
and an Anthropic client's thinking mapped to an OpenAI-compatible upstream's effort."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from stella.client import Client
from tests.fakes.anthropic import KEY, THOUGHT, FakeAnthropic
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, ndjson, run_stella

WHOLE = "".join(THOUGHT)
HELLO = "Hello! How can I help?"
HI = [{"role": "user", "content": "hi"}]
WEATHER = [
    {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
    }
]
ON = {"type": "enabled", "budget_tokens": 2048}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeAnthropic, FakeOpenAI, str, str]]:
    claude, gpt = FakeAnthropic(), FakeOpenAI()
    with serve(claude.app) as claude_url, serve(gpt.app) as gpt_url:
        yield claude, gpt, claude_url, gpt_url


@pytest.fixture(scope="module")
def server(fakes: tuple[FakeAnthropic, FakeOpenAI, str, str]) -> Iterator[LiveServer]:
    _, _, claude_url, gpt_url = fakes
    config = {
        "backends": {
            "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CK"},
            "adaptive": {
                "kind": "anthropic",
                "base_url": claude_url,
                "api_key_env": "CK",
                "reasoning_effort_as": "adaptive",
            },
            "gpt": {"kind": "openai", "base_url": gpt_url + "/v1"},
        },
        "models": {
            "routes": {
                "claude": {"backend": "claude", "upstream_model": "claude-ok"},
                "claude-tools": {"backend": "claude", "upstream_model": "claude-tools"},
                "claude-redacts": {"backend": "claude", "upstream_model": "claude-redacts"},
                "claude-adaptive": {"backend": "adaptive", "upstream_model": "claude-ok"},
                "gpt": {"backend": "gpt", "upstream_model": "thinks"},
            }
        },
        "log": {"content": True},
    }
    with run_stella(config, {"CK": KEY}) as live:
        yield live


@pytest.fixture
def claude(fakes: tuple[FakeAnthropic, FakeOpenAI, str, str]) -> FakeAnthropic:
    return fakes[0]


@pytest.fixture
def gpt(fakes: tuple[FakeAnthropic, FakeOpenAI, str, str]) -> FakeOpenAI:
    return fakes[1]


def messages_client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def chat_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# --- the fake refuses what the API refuses ------------------------------------------


def _signed_turn(claude: FakeAnthropic) -> list[dict[str, Any]]:
    """A tool loop's history whose assistant turn starts with the fake's signed thinking."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": WHOLE, "signature": claude.sign(WHOLE)},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "greater than or equal to 1024"),
    ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "`max_tokens` must be greater"),
    ({"thinking": {"type": "enabled"}}, "budget_tokens: Field required"),
    ({"thinking": ON, "temperature": 0.5}, "`temperature` may only be set to 1"),
    ({"thinking": ON, "top_k": 5}, "`top_k` must be unset"),
    ({"thinking": ON, "top_p": 0.5}, "`top_p` must be greater than or equal to 0.95"),
    (
        {"thinking": ON, "tools": WEATHER, "tool_choice": {"type": "any"}},
        "tool_choice forces tool use",
    ),
]


@pytest.mark.parametrize(("extra", "said"), REFUSED)
def test_the_fake_refuses_what_the_api_refuses_with_thinking(
    fakes: tuple[FakeAnthropic, FakeOpenAI, str, str], extra: dict[str, Any], said: str
) -> None:
    url = fakes[2]
    body = {"model": "claude-ok", "max_tokens": 4096, "messages": HI, **extra}
    r = httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 400 and said in r.json()["error"]["message"], r.text
    ok = {"model": "claude-ok", "max_tokens": 4096, "messages": HI, "thinking": ON}
    r = httpx.post(url + "/v1/messages", json=ok, headers={"x-api-key": KEY})
    assert r.status_code == 200, r.text


def test_the_fake_refuses_a_tool_loop_without_its_signed_thinking(
    fakes: tuple[FakeAnthropic, FakeOpenAI, str, str],
) -> None:
    claude, _, url, _ = fakes
    body: dict[str, Any] = {
        "model": "claude-tools",
        "max_tokens": 4096,
        "thinking": ON,
        "tools": WEATHER,
        "messages": _signed_turn(claude),
    }
    r = httpx.post(url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 200, r.text
    turn = body["messages"][1]["content"]
    for content, said in (
        (turn[1:], "Expected `thinking` or `redacted_thinking`, but found `tool_use`"),
        ([{**turn[0], "signature": "forged"}, turn[1]], "Invalid `signature`"),
        ([{**turn[0], "thinking": "Something else."}, turn[1]], "Invalid `signature`"),
        ([{"type": "redacted_thinking", "data": "made up"}, turn[1]], "Invalid `data`"),
    ):
        sent = {
            **body,
            "messages": [HI[0], {"role": "assistant", "content": content}, body["messages"][2]],
        }
        r = httpx.post(url + "/v1/messages", json=sent, headers={"x-api-key": KEY})
        assert r.status_code == 400 and said in r.json()["error"]["message"], r.text
    # Thinking off: no thinking block in a last assistant turn.
    off = {**body, "thinking": {"type": "disabled"}, "messages": body["messages"][:2]}
    r = httpx.post(url + "/v1/messages", json=off, headers={"x-api-key": KEY})
    assert r.status_code == 400 and "When thinking is disabled" in r.text, r.text


# --- a Messages client's thinking, to an Anthropic upstream ---------------------------


def test_a_thinking_stream_carries_the_upstreams_signature(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = messages_client(server)
    with c.messages.stream(
        model="claude",
        max_tokens=4096,
        thinking=ON,
        # Refused by the API with thinking on: left out.
        extra_body={"temperature": 0.5, "top_k": 5},
        messages=HI,
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
        rid = stream.response.headers["request-id"]
    assert "signature" in kinds and "thinking" in kinds, kinds
    assert [b.type for b in final.content] == ["thinking", "text"], final
    thinking = final.content[0]
    assert thinking.type == "thinking"
    assert thinking.thinking == WHOLE and thinking.signature == claude.sign(WHOLE), thinking
    details = final.usage.output_tokens_details
    assert details is not None and details.thinking_tokens == len(THOUGHT), final.usage
    sent = claude.requests[-1]
    assert sent["thinking"] == ON and sent["max_tokens"] == 4096, sent
    assert "temperature" not in sent and "top_k" not in sent, sent
    # The thinking's tokens, as the API counts them, in the log's usual field.
    ev = server.wait_event(lambda e: e["request_id"] == rid)
    assert ev["reasoning_tokens"] == len(THOUGHT) and ev["reasoning"] == WHOLE, ev
    assert not [k for k in ev if "signature" in k or "thinking" in k], ev


def test_a_whole_answer_with_thinking_omitted_keeps_the_signature(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = messages_client(server)
    m = c.messages.create(
        model="claude",
        max_tokens=4096,
        thinking={"type": "adaptive", "display": "omitted"},
        messages=HI,
    )
    assert claude.requests[-1]["thinking"] == {"type": "adaptive", "display": "omitted"}
    assert m.content[0].type == "thinking" and m.content[0].thinking == "", m
    assert m.content[0].signature == claude.sign(WHOLE), m
    assert m.content[1].type == "text" and m.content[1].text == HELLO, m
    # Streamed: an empty thinking block, signed, before the text.
    r = httpx.post(
        server.url + "/v1/messages",
        json={
            "model": "claude",
            "max_tokens": 4096,
            "stream": True,
            "thinking": {"type": "adaptive", "display": "omitted"},
            "messages": HI,
        },
    )
    deltas = [d["delta"] for d in _sse(r) if d["type"] == "content_block_delta"]
    assert deltas[0] == {"type": "signature_delta", "signature": claude.sign(WHOLE)}, deltas
    assert all(d["type"] == "text_delta" for d in deltas[1:]), deltas


def test_signatures_round_trip_across_a_three_turn_tool_loop(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = messages_client(server)
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    for turn in range(3):
        # The SDK's stream, then its whole answer: each turn's content sent back as it came.
        if turn == 1:
            m = c.messages.create(
                model="claude-tools", max_tokens=4096, thinking=ON, tools=WEATHER, messages=history
            )
        else:
            with c.messages.stream(
                model="claude-tools", max_tokens=4096, thinking=ON, tools=WEATHER, messages=history
            ) as stream:
                m = stream.get_final_message()
        sent = claude.requests[-1]
        assert sent["thinking"] == ON, sent  # never dropped: the signature came back
        kinds = [b.type for b in m.content]
        # The model thinks at the turn's start only, not again after the tool's results.
        assert kinds == (["thinking", "tool_use"] if turn == 0 else ["tool_use"]), kinds
        history += [
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": m.content[-1].id, "content": "sunny"}
                ],
            },
        ]
        if turn:
            first = sent["messages"][1]["content"][0]
            assert first == {
                "type": "thinking",
                "thinking": WHOLE,
                "signature": claude.sign(WHOLE),
            }, sent
    final = c.messages.create(
        model="claude-tools", max_tokens=4096, thinking=ON, tools=WEATHER, messages=history
    )
    assert final.stop_reason == "tool_use", final


def test_redacted_thinking_goes_out_and_back_as_it_came(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = messages_client(server)
    m = c.messages.create(model="claude-redacts", max_tokens=4096, thinking=ON, messages=HI)
    assert [b.type for b in m.content] == ["thinking", "redacted_thinking", "text"], m
    data = m.content[1].data  # type: ignore[union-attr]
    assert data in claude.redacted
    with c.messages.stream(
        model="claude-redacts", max_tokens=4096, thinking=ON, messages=HI
    ) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == ["thinking", "redacted_thinking", "text"]
    again = [
        *HI,
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": "and then?"},
    ]
    c.messages.create(model="claude", max_tokens=4096, thinking=ON, messages=again)
    sent = claude.requests[-1]["messages"][1]["content"]
    assert sent[:2] == [b.model_dump() for b in m.content[:2]], sent


def test_nothing_unsigned_reaches_the_upstream(server: LiveServer, claude: FakeAnthropic) -> None:
    # stella's own "" signature (another upstream's reasoning) and an empty redacted block:
    # dropped; the loop without its thinking is asked without thinking, never refused.
    c = messages_client(server)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should look.", "signature": ""},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]
    m = c.messages.create(
        model="claude-tools", max_tokens=4096, thinking=ON, tools=WEATHER, messages=history
    )
    assert m.stop_reason == "tool_use", m
    sent = claude.requests[-1]
    assert "thinking" not in sent, sent
    assert [b["type"] for b in sent["messages"][1]["content"]] == ["tool_use"], sent


def test_a_forced_tool_call_is_asked_without_thinking(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = messages_client(server)
    m = c.messages.create(
        model="claude-tools",
        max_tokens=4096,
        thinking=ON,
        tools=WEATHER,
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0.2},
        messages=HI,
    )
    assert m.stop_reason == "tool_use", m
    sent = claude.requests[-1]
    assert "thinking" not in sent and sent["temperature"] == 0.2, sent


@pytest.mark.parametrize(
    ("thinking", "max_tokens", "said"),
    [
        ({"type": "enabled", "budget_tokens": 1000}, 4096, "at least 1024"),
        ({"type": "enabled", "budget_tokens": 4096}, 4096, "less than max_tokens"),
        ({"type": "enabled"}, 4096, "required"),
    ],
)
def test_a_budget_the_api_refuses_is_a_400_naming_it(
    server: LiveServer, claude: FakeAnthropic, thinking: dict[str, Any], max_tokens: int, said: str
) -> None:
    before = len(claude.requests)
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": "claude", "max_tokens": max_tokens, "thinking": thinking, "messages": HI},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "thinking.budget_tokens" in err["message"] and said in err["message"], err
    assert len(claude.requests) == before


# --- reasoning_effort, to an Anthropic upstream -----------------------------------------


@pytest.mark.parametrize(
    ("effort", "max_tokens", "thinking", "limit"),
    [
        ("low", None, {"type": "enabled", "budget_tokens": 1024}, 1024 + 1024),
        ("medium", None, {"type": "enabled", "budget_tokens": 4096}, 1024 + 4096),
        ("high", 6000, {"type": "enabled", "budget_tokens": 3000}, 6000),
        ("high", 2000, None, 2000),  # too few tokens to think and answer
        ("minimal", None, None, 1024),
        ("none", None, None, 1024),
    ],
)
def test_reasoning_effort_asks_an_anthropic_upstream_for_a_budget(
    server: LiveServer,
    claude: FakeAnthropic,
    effort: str,
    max_tokens: int | None,
    thinking: dict[str, Any] | None,
    limit: int,
) -> None:
    c = chat_client(server)
    extra: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}
    r = c.chat.completions.create(
        model="claude",
        messages=HI,  # type: ignore[arg-type]
        reasoning_effort=effort,  # type: ignore[arg-type]
        temperature=0.3,
        **extra,
    )
    sent = claude.requests[-1]
    assert sent.get("thinking") == thinking and sent["max_tokens"] == limit, sent
    message = r.choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    if thinking is None:
        assert sent["temperature"] == 0.3 and reasoning is None, sent
        return
    assert "temperature" not in sent, sent
    assert reasoning == WHOLE and message.content == HELLO, message
    details = r.usage.completion_tokens_details if r.usage else None
    assert details is not None and details.reasoning_tokens == len(THOUGHT), r.usage


def test_reasoning_effort_asks_an_adaptive_backend_for_its_effort(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    chat_client(server).chat.completions.create(
        model="claude-adaptive",
        messages=HI,  # type: ignore[arg-type]
        reasoning_effort="high",
    )
    sent = claude.requests[-1]
    assert sent["thinking"] == {"type": "adaptive"}, sent
    assert sent["output_config"] == {"effort": "high"}, sent


def _sse(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    lines = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
    return [json.loads(x) for x in lines if x != "[DONE]"]


def test_every_dialect_shows_an_anthropic_upstreams_thinking(server: LiveServer) -> None:
    # The Responses API: a reasoning item before the message.
    r = httpx.post(
        server.url + "/v1/responses",
        json={"model": "claude", "input": "hi", "reasoning": {"effort": "low"}},
    )
    output = r.json()["output"]
    assert [o["type"] for o in output] == ["reasoning", "message"], output
    assert output[0]["content"][0]["text"] == WHOLE, output
    # Ollama's chat, whose `think` asks for it: message.thinking.
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "claude", "messages": HI, "think": True, "stream": False},
    )
    assert r.json()["message"]["thinking"] == WHOLE, r.text
    # Chat completions, streamed: reasoning_content chunks, nothing of the signature.
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "claude", "messages": HI, "reasoning_effort": "low", "stream": True},
    )
    deltas = [d["choices"][0]["delta"] for d in _sse(r)[:-1] if d["choices"]]
    thought = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert thought == WHOLE and all(d for d in deltas), deltas


def test_the_native_api_carries_the_signature_there_and_back(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    body = {"model": "claude", "messages": HI, "thinking": ON, "options": {"max_tokens": 4096}}
    r = httpx.post(server.url + "/api/v1/chat", json=body)
    lines = ndjson(r.text)
    deltas = [x for x in lines if x["type"] == "delta"]
    signed = [x for x in deltas if "signature" in x]
    assert signed == [{"type": "delta", "text": "", "signature": claude.sign(WHOLE)}], deltas
    assert "".join(x.get("reasoning", "") for x in deltas) == WHOLE, deltas
    # The whole answer (through the Python client): its message, sent back, reaches the
    # upstream with the block as the upstream signed it.
    answer = Client(server.url).chat(HI, model="claude", stream=False, thinking=ON)
    message = answer.message
    assert message.thinking_blocks is not None, message
    block = message.thinking_blocks[0]
    assert block.signature == claude.sign(WHOLE) and block.thinking == WHOLE, message
    again = [
        *HI,
        {
            "role": "assistant",
            "content": message.content,
            "thinking_blocks": [
                {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
            ],
        },
        {"role": "user", "content": "and then?"},
    ]
    r = httpx.post(server.url + "/api/v1/chat", json={**body, "messages": again, "stream": False})
    assert r.status_code == 200, r.text
    assert claude.requests[-1]["messages"][1]["content"][0]["signature"] == block.signature


# --- a Messages client's thinking, to an OpenAI-compatible upstream --------------------


@pytest.mark.parametrize(
    ("extra", "effort"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
        ({"thinking": {"type": "enabled", "budget_tokens": 5000}}, "medium"),
        ({"thinking": {"type": "enabled", "budget_tokens": 20000}}, "high"),
        ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, "max"),
        ({"output_config": {"effort": "low"}}, "low"),
        ({"thinking": {"type": "adaptive"}}, None),
        ({"thinking": {"type": "disabled"}}, None),
    ],
)
def test_a_messages_clients_thinking_is_an_openai_upstreams_effort(
    server: LiveServer, gpt: FakeOpenAI, extra: dict[str, Any], effort: str | None
) -> None:
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": "gpt", "max_tokens": 30000, "messages": HI, **extra},
    )
    assert r.status_code == 200, r.text
    sent = gpt.requests[-1]
    assert sent.get("reasoning_effort") == effort, sent
