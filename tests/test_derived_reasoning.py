"""Reasoning stella derives from another dialect's words, through a live stella: thinking
asked of an Anthropic upstream from a reasoning effort (or Ollama's think), a reasoning
effort asked of an OpenAI-compatible or Ollama upstream from a Messages client's
thinking. A model that refuses it (the fakes' per-model rules, the API's words) is asked
once more without it, and its route's model without it from then on; what a client asks
in its upstream's own words is sent as it came, its refusal the client's. The thinking
budget stays within the models' output cap, and a thinking dropped takes its budget with
it. A signed thinking a client is not shown starts no answer: a failure after it falls
back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import anthropic
import httpx
import openai
import pytest

from stella.core import MAX_LEARNED_MODELS, LearnedModels
from stella.routing import Route
from tests.fakes.anthropic import KEY, FakeAnthropic
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

HELLO = "Hello! How can I help?"
HI = [{"role": "user", "content": "hi"}]
ON = {"type": "enabled", "budget_tokens": 2048}
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
]

Fakes = tuple[FakeAnthropic, FakeOpenAI, FakeOllama]


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[Fakes, dict[str, str]]]:
    claude, gpt, box = FakeAnthropic(), FakeOpenAI(), FakeOllama()
    with serve(claude.app) as c, serve(gpt.app) as g, serve(box.app) as o:
        yield (claude, gpt, box), {"claude": c, "gpt": g, "ollama": o}


@pytest.fixture(scope="module")
def server(fakes: tuple[Fakes, dict[str, str]]) -> Iterator[LiveServer]:
    urls = fakes[1]
    claude = {"kind": "anthropic", "base_url": urls["claude"], "api_key_env": "CK"}
    config = {
        "backends": {
            "claude": claude,
            "adaptive": {**claude, "reasoning_effort_as": "adaptive"},
            "off": {**claude, "reasoning_effort_as": "off"},
            "claude-32k": {**claude, "max_tokens": 32000},
            "gpt": {"kind": "openai", "base_url": urls["gpt"] + "/v1"},
            "gpt-off": {
                "kind": "openai",
                "base_url": urls["gpt"] + "/v1",
                "thinking_as_effort": False,
            },
            "box": {"kind": "ollama", "base_url": urls["ollama"]},
        },
        "models": {
            "routes": {
                "claude": {"backend": "claude", "upstream_model": "claude-ok"},
                "haiku35": {"backend": "claude", "upstream_model": "claude-no-thinking"},
                "haiku35-own": {"backend": "adaptive", "upstream_model": "claude-no-thinking"},
                "opus47": {"backend": "claude", "upstream_model": "claude-adaptive-only"},
                "opus47-adaptive": {
                    "backend": "adaptive",
                    "upstream_model": "claude-adaptive-only",
                },
                "haiku45": {"backend": "adaptive", "upstream_model": "claude-no-effort"},
                "off": {"backend": "off", "upstream_model": "claude-ok"},
                "opus41": {"backend": "claude", "upstream_model": "claude-capped"},
                "opus41-32k": {"backend": "claude-32k", "upstream_model": "claude-capped"},
                "tools": {"backend": "claude", "upstream_model": "claude-tools"},
                "fails": {
                    "backend": "claude",
                    "upstream_model": "claude-thinks-fails",
                    "fallbacks": ["claude"],
                },
                "gpt4o": {"backend": "gpt", "upstream_model": "no-reasoning"},
                "gpt4o-own": {"backend": "gpt", "upstream_model": "no-reasoning"},
                "gpt4o-off": {"backend": "gpt-off", "upstream_model": "no-reasoning"},
                "llama": {"backend": "box", "upstream_model": "no-think"},
            }
        },
        "log": {"content": True},
    }
    with run_stella(config, {"CK": KEY}) as live:
        yield live


@pytest.fixture
def claude(fakes: tuple[Fakes, dict[str, str]]) -> FakeAnthropic:
    return fakes[0][0]


@pytest.fixture
def gpt(fakes: tuple[Fakes, dict[str, str]]) -> FakeOpenAI:
    return fakes[0][1]


@pytest.fixture
def box(fakes: tuple[Fakes, dict[str, str]]) -> FakeOllama:
    return fakes[0][2]


def chat_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def messages_client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def attempts(server: LiveServer, rid: str) -> list[tuple[Any, ...]]:
    """The inference event's attempts of request `rid`: error, upstream status, reasoning."""
    ev = server.wait_event(lambda e: e.get("request_id") == rid)
    return [(a["error"], a.get("upstream_status"), a.get("reasoning")) for a in ev["attempts"]]


DEGRADED = [("upstream_rejected", 400, None), (None, None, "dropped")]


def learned(server: LiveServer) -> list[tuple[str, str, str]]:
    return [
        (w["backend"], w["route"], w["upstream_model"])
        for w in server.events("derived_reasoning_dropped")
    ]


# --- thinking asked of an Anthropic upstream from another dialect's effort ------------


def test_codex_s_effort_to_a_model_without_thinking_answers_without_it(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    # Codex sends reasoning.effort on every call: Claude 3.5 Haiku takes no thinking.
    c = chat_client(server)
    raw = c.responses.with_raw_response.create(
        model="haiku35", input="hi", reasoning={"effort": "high"}
    )
    assert raw.parse().output_text == HELLO
    refused, answered = claude.requests[-2:]
    assert refused["thinking"] == {"type": "enabled", "budget_tokens": 16384}, refused
    assert refused["max_tokens"] == 1024 + 16384, refused
    # Asked again as before stella thought of thinking: no budget left in max_tokens.
    assert "thinking" not in answered and answered["max_tokens"] == 1024, answered
    assert attempts(server, raw.headers["x-request-id"]) == DEGRADED
    # Learned: later calls are sent no thinking at once, one request each; one warning.
    for _ in range(2):
        asked = len(claude.requests)
        raw = c.responses.with_raw_response.create(
            model="haiku35", input="hi", reasoning={"effort": "low"}
        )
        assert raw.parse().output_text == HELLO
        assert len(claude.requests) == asked + 1
        assert "thinking" not in claude.requests[-1], claude.requests[-1]
        assert attempts(server, raw.headers["x-request-id"]) == [(None, None, None)]
    assert learned(server).count(("claude", "haiku35", "claude-no-thinking")) == 1


def test_a_chat_effort_to_an_adaptive_only_model_on_a_budget_backend(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = chat_client(server)
    raw = c.chat.completions.with_raw_response.create(
        model="opus47",
        messages=HI,
        reasoning_effort="medium",  # type: ignore[arg-type]
    )
    assert raw.parse().choices[0].message.content == HELLO
    assert claude.requests[-2]["thinking"]["type"] == "enabled"
    assert "thinking" not in claude.requests[-1]
    assert attempts(server, raw.headers["x-request-id"]) == DEGRADED
    # The same model on an adaptive backend thinks, as it takes adaptive thinking.
    r = c.chat.completions.create(
        model="opus47-adaptive",
        messages=HI,  # type: ignore[arg-type]
        reasoning_effort="medium",
    )
    assert r.choices[0].message.content == HELLO
    sent = claude.requests[-1]
    assert sent["thinking"] == {"type": "adaptive"}, sent
    assert sent["output_config"] == {"effort": "medium"}, sent


def test_ollama_s_think_to_a_model_without_effort_on_an_adaptive_backend(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    # Haiku 4.5 takes neither adaptive thinking nor effort; an Ollama client's think: true.
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "haiku45", "messages": HI, "think": True, "stream": False},
    )
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == HELLO
    refused, answered = claude.requests[-2:]
    assert refused["thinking"] == {"type": "adaptive"}, refused
    assert refused["output_config"] == {"effort": "medium"}, refused
    assert "thinking" not in answered and "output_config" not in answered, answered
    assert attempts(server, r.headers["x-request-id"]) == DEGRADED
    assert ("adaptive", "haiku45", "claude-no-effort") in learned(server)


def test_a_messages_client_s_own_thinking_is_sent_as_it_came_and_refused(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = messages_client(server)
    asked = len(claude.requests)
    with pytest.raises(anthropic.APIStatusError) as raised:
        c.messages.create(model="haiku35-own", max_tokens=4096, thinking=ON, messages=HI)  # type: ignore[arg-type]
    assert "does not support thinking" in str(raised.value), raised.value
    assert len(claude.requests) == asked + 1  # asked once, as the API would answer it
    assert claude.requests[-1]["thinking"] == ON
    assert ("adaptive", "haiku35-own", "claude-no-thinking") not in learned(server)


def test_reasoning_effort_as_off_asks_for_no_thinking(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = chat_client(server)
    r = c.chat.completions.create(model="off", messages=HI, reasoning_effort="high")  # type: ignore[arg-type]
    assert r.choices[0].message.content == HELLO
    sent = claude.requests[-1]
    assert "thinking" not in sent and "output_config" not in sent, sent
    assert sent["max_tokens"] == 1024, sent


# --- a reasoning effort asked of others from a Messages client's thinking -------------


def test_claude_code_s_thinking_to_a_model_without_reasoning_effort(
    server: LiveServer, gpt: FakeOpenAI
) -> None:
    c = messages_client(server)
    raw = c.messages.with_raw_response.create(
        model="gpt4o",
        max_tokens=4096,
        thinking=ON,  # type: ignore[arg-type]
        messages=HI,  # type: ignore[arg-type]
    )
    m = raw.parse()
    assert m.content[-1].type == "text" and m.content[-1].text == " w0 w1 w2 w3 w4", m
    refused, answered = gpt.requests[-2:]
    assert refused["reasoning_effort"] == "low", refused
    assert "reasoning_effort" not in answered, answered
    assert attempts(server, raw.headers["request-id"]) == DEGRADED
    asked = len(gpt.requests)
    c.messages.create(model="gpt4o", max_tokens=4096, thinking=ON, messages=HI)  # type: ignore[arg-type]
    assert len(gpt.requests) == asked + 1 and "reasoning_effort" not in gpt.requests[-1]
    assert learned(server).count(("gpt", "gpt4o", "no-reasoning")) == 1


def test_a_chat_client_s_own_reasoning_effort_is_sent_as_it_came_and_refused(
    server: LiveServer, gpt: FakeOpenAI
) -> None:
    c = chat_client(server)
    asked = len(gpt.requests)
    with pytest.raises(openai.APIStatusError) as raised:
        c.chat.completions.create(model="gpt4o-own", messages=HI, reasoning_effort="low")  # type: ignore[arg-type]
    assert "reasoning_effort" in str(raised.value), raised.value
    assert len(gpt.requests) == asked + 1
    assert gpt.requests[-1]["reasoning_effort"] == "low"


def test_thinking_as_effort_off_sends_no_reasoning_effort(
    server: LiveServer, gpt: FakeOpenAI
) -> None:
    asked = len(gpt.requests)
    c = messages_client(server)
    c.messages.create(model="gpt4o-off", max_tokens=4096, thinking=ON, messages=HI)  # type: ignore[arg-type]
    assert len(gpt.requests) == asked + 1
    assert "reasoning_effort" not in gpt.requests[-1], gpt.requests[-1]


def test_a_messages_client_s_thinking_to_an_ollama_model_that_does_not_think(
    server: LiveServer, box: FakeOllama
) -> None:
    c = messages_client(server)
    raw = c.messages.with_raw_response.create(
        model="llama",
        max_tokens=4096,
        thinking=ON,  # type: ignore[arg-type]
        messages=HI,  # type: ignore[arg-type]
    )
    assert raw.parse().content[-1].type == "text"
    refused, answered = [r for r in box.requests if r.get("messages")][-2:]
    assert refused["think"] == "low" and "think" not in answered, (refused, answered)
    assert attempts(server, raw.headers["request-id"]) == DEGRADED
    # Ollama's own think (and, as before, a reasoning effort) is the client's: refused.
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "llama", "messages": HI, "think": True, "stream": False},
    )
    assert r.status_code >= 400 and "does not support thinking" in r.text, r.text


# --- the thinking budget and max_tokens ------------------------------------------------


def test_a_budget_never_pushes_max_tokens_past_the_output_cap(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = chat_client(server)
    asked = len(claude.requests)
    r = c.chat.completions.create(model="opus41", messages=HI, reasoning_effort="max")  # type: ignore[arg-type]
    assert r.choices[0].message.content == HELLO
    assert len(claude.requests) == asked + 1  # answered at once, thinking
    sent = claude.requests[-1]
    assert sent["max_tokens"] == 32000, sent
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 32000 - 1024}, sent
    # A backend whose own max_tokens fills the cap: the budget fits within it, at most
    # half, as within a request's own max_tokens.
    c.chat.completions.create(model="opus41-32k", messages=HI, reasoning_effort="low")  # type: ignore[arg-type]
    assert len(claude.requests) == asked + 2
    sent = claude.requests[-1]
    assert sent["max_tokens"] == 32000, sent
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}, sent
    c.chat.completions.create(model="opus41-32k", messages=HI, reasoning_effort="max")  # type: ignore[arg-type]
    sent = claude.requests[-1]
    assert sent["max_tokens"] == 32000, sent
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 16000}, sent


def test_a_thinking_dropped_for_a_forced_tool_call_takes_its_budget_with_it(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    c = chat_client(server)
    r = c.chat.completions.create(
        model="tools",
        messages=HI,  # type: ignore[arg-type]
        tools=WEATHER,  # type: ignore[arg-type]
        tool_choice="required",
        reasoning_effort="high",
    )
    assert r.choices[0].message.tool_calls, r
    sent = claude.requests[-1]
    assert "thinking" not in sent and sent["max_tokens"] == 1024, sent


# --- a signature a client is not shown starts no answer --------------------------------


def test_a_failure_after_a_signed_thinking_a_client_is_not_shown_falls_back(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    # The native generate's SSE shows text alone: the thinking and its signature go to
    # no client, so the upstream's failure after them is the fallback's to answer.
    r = httpx.post(
        server.url + "/api/v1/generate",
        json={"model": "fails", "prompt": "hi", "reasoning_effort": "low"},
        headers={"accept": "text/event-stream"},
    )
    assert r.status_code == 200, r.text
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert "".join(e.get("response", "") for e in events) == HELLO, r.text
    assert events[-1] == {}, r.text  # ended, not failed
    assert claude.requests[-2]["model"] == "claude-thinks-fails"
    rid = r.headers["x-request-id"]
    ev = server.wait_event(lambda e: e.get("request_id") == rid)
    tried = [(a["route"], a["error"]) for a in ev["attempts"]]
    # Retried, then fallen back: nothing had reached the client.
    assert tried[-1] == ("claude", None) and set(tried[:-1]) == {("fails", "upstream_error")}


# --- what the Messages dialect takes ---------------------------------------------------


def test_a_thinking_display_the_api_adds_reaches_the_upstream(
    server: LiveServer, claude: FakeAnthropic
) -> None:
    r = httpx.post(
        server.url + "/v1/messages",
        json={
            "model": "claude",
            "max_tokens": 4096,
            "thinking": {**ON, "display": "verbatim"},
            "messages": HI,
        },
    )
    # The upstream judges it (the fake, as the API today, refuses it).
    assert claude.requests[-1]["thinking"]["display"] == "verbatim", r.text


def test_learned_models_are_bounded_oldest_first() -> None:
    models = LearnedModels("learned", "why")
    routes = [
        cast(Route, SimpleNamespace(name=f"r{i}", backend_name="b", upstream_model=f"m{i}"))
        for i in range(MAX_LEARNED_MODELS + 1)
    ]
    for route in routes:
        models.learn(route)
    assert len(models.models) == MAX_LEARNED_MODELS
    assert routes[0] not in models and routes[1] in models and routes[-1] in models
