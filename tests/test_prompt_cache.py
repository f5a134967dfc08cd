"""Prompt-cache breakpoints (Anthropic's cache_control, the native `cache`) through stella:
where an Anthropic upstream gets them, the same prefix on each turn, the usage of a
cached call end to end, the 400s for breakpoints the API refuses, and the backends that
ignore them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from stella.backends.anthropic_request import request_body
from stella.errors import InvalidRequest
from stella.protocol import (
    ChatRequest,
    FunctionCall,
    FunctionSpec,
    Message,
    Tool,
    ToolCallRef,
)
from tests.fakes.anthropic import KEY, FakeAnthropic, _prefixes
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

EPHEMERAL = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}
TOO_MANY = "A maximum of 4 blocks with cache_control may be provided. Found 5."


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer]]:
    claude, gpt, llama = FakeAnthropic(), FakeOpenAI(), FakeOllama()
    with (
        serve(claude.app) as claude_url,
        serve(gpt.app) as gpt_url,
        serve(llama.app, "/api/version") as llama_url,
    ):
        config = {
            "backends": {
                "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CK"},
                "gpt": {"kind": "openai", "base_url": gpt_url + "/v1"},
                "llama": {"kind": "ollama", "base_url": llama_url},
            },
            "models": {
                "routes": {
                    "sonnet": {"backend": "claude", "upstream_model": "claude-ok"},
                    "gpt": {"backend": "gpt", "upstream_model": "ok"},
                    "llama": {"backend": "llama", "upstream_model": "llama3"},
                }
            },
        }
        with run_stella(config, {"CK": KEY}) as server:
            yield claude, gpt, llama, server


def test_native_cache_markers_reach_an_anthropic_upstream(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    claude, _, _, server = upstreams
    call = {"id": "call_1", "function": {"name": "Read", "arguments": {"path": "a"}}}
    body = {
        "model": "sonnet",
        "stream": False,
        "tools": [
            {"function": {"name": "Read", "parameters": {"type": "object"}}, "cache": "1h"},
            {"function": {"name": "Bash", "parameters": {"type": "object"}}},
        ],
        "messages": [
            {"role": "system", "content": "You are careful.", "cache": "1h"},
            {"role": "user", "content": "read a"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "data", "tool_call_id": "call_1", "cache": "5m"},
            {"role": "user", "content": "and now?", "cache": "5m"},
        ],
    }
    r = httpx.post(server.url + "/api/v1/chat", json=body, timeout=30)
    assert r.status_code == 200, r.text
    sent = claude.requests[-1]
    assert sent["tools"][0]["cache_control"] == HOUR and "cache_control" not in sent["tools"][1]
    assert sent["system"] == [{"type": "text", "text": "You are careful.", "cache_control": HOUR}]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "read a"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "Read", "input": {"path": "a"}}
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "content": "data",
                    "cache_control": EPHEMERAL,
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "text", "text": "and now?", "cache_control": EPHEMERAL}],
        },
    ]
    # The native usage: the whole prompt, what the cache spared in its details.
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == _prefixes(sent)[-1][1]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_a_bad_native_cache_marker_is_a_400_naming_it(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    server = upstreams[3]
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi", "cache": "2h"}]}
    r = httpx.post(server.url + "/api/v1/chat", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "$.messages[0].cache" in r.json()["error"]["message"]


def test_more_than_four_native_breakpoints_are_refused_before_an_anthropic_upstream(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    claude, _, _, server = upstreams
    sent = len(claude.requests)
    # The Anthropic backend refuses them with the API's words; the others ignore them.
    msgs = [{"role": "user", "content": f"m{i}", "cache": "5m"} for i in range(5)]
    r = httpx.post(
        server.url + "/api/v1/chat", json={"model": "sonnet", "messages": msgs}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == TOO_MANY
    r = httpx.post(
        server.url + "/api/v1/chat",
        json={"model": "echo", "stream": False, "messages": msgs},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert len(claude.requests) == sent


def test_backends_without_prompt_caching_ignore_the_markers(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, gpt, llama, server = upstreams
    for model in ("gpt", "llama", "echo"):
        native = {
            "model": model,
            "stream": False,
            "tools": [{"function": {"name": "Read"}, "cache": "1h"}],
            "messages": [
                {"role": "system", "content": "be brief", "cache": "1h"},
                {"role": "user", "content": "hi", "cache": "5m"},
            ],
        }
        r = httpx.post(server.url + "/api/v1/chat", json=native, timeout=30)
        assert r.status_code == 200, (model, r.text)
    for request in (*gpt.requests, *llama.requests):
        assert "cache" not in json.dumps(request)


# --- the backend's body, without a server ---------------------------------------------


def test_the_backend_puts_each_breakpoint_on_the_last_block_of_its_message() -> None:
    calls = [
        ToolCallRef(id="c1", function=FunctionCall(name="Read")),
        ToolCallRef(id="c2", function=FunctionCall(name="Bash")),
    ]
    req = ChatRequest(
        model="m",
        tools=[Tool(function=FunctionSpec(name="Read"), cache="5m")],
        messages=[
            Message(role="system", content="one"),
            Message(role="system", content="two", cache="5m"),
            Message(role="user", content="go"),
            Message(role="assistant", content="both", tool_calls=calls, cache="5m"),
            Message(role="tool", content="r1", tool_call_id="c1"),
            Message(role="tool", content="r2", tool_call_id="c2", cache="1h"),
        ],
    )
    body = request_body(req, 100)
    # A 1h breakpoint after 5m ones: those before it are 1h too, as the API wants them.
    assert body["tools"][0]["cache_control"] == HOUR
    assert body["system"] == [
        {"type": "text", "text": "one"},
        {"type": "text", "text": "two", "cache_control": HOUR},
    ]
    assistant, results = body["messages"][1:]
    assert [b.get("cache_control") for b in assistant["content"]] == [None, None, HOUR]
    assert [b.get("cache_control") for b in results["content"]] == [None, HOUR]
    # Without markers the body is as it always was: strings, no cache_control anywhere.
    plain = request_body(
        msgspec.structs.replace(
            req, tools=None, messages=[msgspec.structs.replace(m, cache=None) for m in req.messages]
        ),
        100,
    )
    assert plain["system"] == "one\n\ntwo" and plain["messages"][0]["content"] == "go"
    assert "cache_control" not in json.dumps(plain)
    five = msgspec.structs.replace(
        req, messages=[*req.messages, Message(role="user", content="x", cache="5m")]
    )
    with pytest.raises(InvalidRequest, match=TOO_MANY):
        request_body(five, 100)
