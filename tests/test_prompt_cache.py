"""Prompt-cache breakpoints (Anthropic's cache_control, the native `cache`) through stella:
where an Anthropic upstream gets them, the same prefix on each turn, the usage of a
cached call end to end, the 400s for breakpoints the API refuses, and the backends that
ignore them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from stella.api.anthropic import MessagesRequest, to_chat
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


def _tools() -> list[dict[str, Any]]:
    schema = {"type": "object", "properties": {"path": {"type": "string"}}}
    return [
        {"name": "Read", "description": "read a file", "input_schema": schema},
        {"name": "Bash", "description": "run a command", "input_schema": schema},
    ]


def _claude_code_turns(topic: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two successive requests of a Claude Code session about `topic`: system blocks with
    cache_control, tools, tool_use/tool_result turns, the last block of the last user turn
    marked (moved to the new last block on the second turn, as Claude Code does)."""
    system = [
        {"type": "text", "text": "You are Claude Code.", "cache_control": EPHEMERAL},
        {"type": "text", "text": f"Work on {topic}. " * 50, "cache_control": EPHEMERAL},
    ]
    tools = _tools()
    tools[-1]["cache_control"] = HOUR
    first = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>be careful</system-reminder>"},
                {"type": "text", "text": f"fix the bug in {topic}"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a.py"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "print(1)"},
                {"type": "text", "text": "keep going", "cache_control": EPHEMERAL},
            ],
        },
    ]
    second = json.loads(json.dumps(first))
    del second[-1]["content"][-1]["cache_control"]
    second += [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_2", "name": "Bash", "input": {"path": "b"}}
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "ok",
                    "cache_control": EPHEMERAL,
                }
            ],
        },
    ]
    body = {"model": "sonnet", "max_tokens": 50, "system": system, "tools": tools}
    return {**body, "messages": first}, {**body, "messages": second, "stream": True}


def _bare(value: Any) -> Any:
    """`value` without its cache_control keys, at any depth."""
    if isinstance(value, dict):
        return {k: _bare(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_bare(v) for v in value]
    return value


def _sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_claude_code_turns_reach_an_anthropic_upstream_with_their_breakpoints(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    claude, _, _, server = upstreams
    turn1, turn2 = _claude_code_turns("the parser")
    r = httpx.post(server.url + "/v1/messages", json=turn1, timeout=30)
    assert r.status_code == 200, r.text
    sent = claude.requests[-1]
    # Tools first: the marked definition keeps its breakpoint and its ttl.
    assert "cache_control" not in sent["tools"][0]
    assert sent["tools"][1]["cache_control"] == HOUR
    # The system blocks are one system prompt, marked (the longest of its blocks' ttls).
    assert sent["system"] == [
        {
            "type": "text",
            "text": turn1["system"][0]["text"] + "\n" + turn1["system"][1]["text"],
            "cache_control": EPHEMERAL,
        }
    ]
    # The last user turn: its tool_result, then its text, which holds the breakpoint.
    assert sent["messages"][-2:] == [
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "print(1)"}],
        },
        {
            "role": "user",
            "content": [{"type": "text", "text": "keep going", "cache_control": EPHEMERAL}],
        },
    ]
    marked = [b for m in sent["messages"] for b in m["content"] if "cache_control" in b]
    assert len(marked) == 1
    first_usage = r.json()["usage"]
    written = _prefixes(sent)[-1][1]  # the fake's count of the prompt up to the last breakpoint
    assert first_usage == {
        "input_tokens": 0,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": 0,
        "output_tokens": 6,
    }

    r = httpx.post(server.url + "/v1/messages", json=turn2, timeout=30)
    assert r.status_code == 200, r.text
    again = claude.requests[-1]
    # The same bytes for every block up to the first turn's breakpoint: what makes it hit.
    assert json.dumps(_bare(again["tools"])) == json.dumps(_bare(sent["tools"]))
    assert json.dumps(again["system"]) == json.dumps(sent["system"])
    n = len(sent["messages"])
    assert json.dumps(_bare(again["messages"][:n])) == json.dumps(_bare(sent["messages"]))
    assert again["messages"][-1]["content"][-1]["cache_control"] == EPHEMERAL
    # The upstream read the first turn's prefix from its cache; the client is told so, in
    # message_start and in the final usage, and the log has both counts.
    events = _sse(r.text)
    start = events[0]["message"]["usage"]
    last = _prefixes(again)[-1][1]
    assert start == {
        "input_tokens": 0,
        "cache_creation_input_tokens": last - written,
        "cache_read_input_tokens": written,
        "output_tokens": 0,
    }
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["usage"] == {**start, "output_tokens": 6}
    rid = r.headers["x-request-id"]
    ev = server.wait_event(lambda e: e.get("request_id") == rid)
    assert ev["cached_tokens"] == written and ev["cache_write_tokens"] == last - written
    assert ev["prompt_tokens"] == last


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


def test_a_tool_result_marked_before_its_turns_text_keeps_the_ttl_order(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    # The client's order is the API's (1h, then 5m); its tool_result goes before the turn's
    # text, so the 5m breakpoint would come first: the API refuses a 1h one after a 5m one.
    claude, _, _, server = upstreams
    msgs = [
        {"role": "user", "content": "read a"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "here it is", "cache_control": HOUR},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "data",
                    "cache_control": EPHEMERAL,
                },
            ],
        },
    ]
    body = {"model": "sonnet", "max_tokens": 20, "tools": _tools(), "messages": msgs}
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 200, r.text
    result, text = claude.requests[-1]["messages"][-2:]
    assert result["content"][0]["cache_control"] == HOUR
    assert text["content"] == [{"type": "text", "text": "here it is", "cache_control": HOUR}]


def test_automatic_caching_marks_the_last_block(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    claude, _, _, server = upstreams
    body = {
        "model": "sonnet",
        "max_tokens": 20,
        "cache_control": HOUR,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "hello"}],
    }
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 200, r.text
    sent = claude.requests[-1]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hello", "cache_control": HOUR}]}
    ]
    assert sent["system"] == "You are terse."


def test_more_than_four_breakpoints_are_refused_before_any_upstream(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    claude, _, _, server = upstreams
    sent = len(claude.requests)
    text = {"type": "text", "text": "hi", "cache_control": EPHEMERAL}
    for model in ("sonnet", "gpt", "echo"):
        body = {
            "model": model,
            "max_tokens": 20,
            "system": [text, text],
            "messages": [{"role": "user", "content": [text, text, text]}],
        }
        r = httpx.post(server.url + "/v1/messages", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {"type": "invalid_request_error", "message": TOO_MANY}
    # Natively, the Anthropic backend refuses them with the API's words (the others
    # ignore the markers).
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


@pytest.mark.parametrize(
    ("where", "control", "path"),
    [
        (
            "message",
            {"type": "ephemeral", "ttl": "2h"},
            "$.messages[2].content[0].cache_control.ttl",
        ),
        ("message", {"type": "persistent"}, "$.messages[2].content[0].cache_control.type"),
        ("message", {"ttl": "5m"}, "$.messages[2].content[0].cache_control"),
        ("tool", {"type": "ephemeral", "ttl": 300}, "$.tools[0].cache_control.ttl"),
        ("system", {"type": "ephemeral", "ttl": "1d"}, "$.system[0].cache_control.ttl"),
        ("top", {"type": "ephemeral", "ttl": "10m"}, "$.cache_control.ttl"),
    ],
)
def test_a_cache_control_the_api_refuses_is_a_400_naming_its_path(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
    where: str,
    control: dict[str, Any],
    path: str,
) -> None:
    server = upstreams[3]
    block = {"type": "text", "text": "more"}
    body: dict[str, Any] = {
        "model": "sonnet",
        "max_tokens": 20,
        "system": [{"type": "text", "text": "be brief"}],
        "tools": _tools(),
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [block]},
        ],
    }
    target = {
        "message": block,
        "tool": body["tools"][0],
        "system": body["system"][0],
        "top": body,
    }[where]
    target["cache_control"] = control
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert path in r.json()["error"]["message"]


def test_a_bad_native_cache_marker_is_a_400_naming_it(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    server = upstreams[3]
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi", "cache": "2h"}]}
    r = httpx.post(server.url + "/api/v1/chat", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "$.messages[0].cache" in r.json()["error"]["message"]


def test_backends_without_prompt_caching_ignore_the_markers(
    upstreams: tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer],
) -> None:
    _, gpt, llama, server = upstreams
    turn1, _ = _claude_code_turns("the lexer")
    for model in ("gpt", "llama", "echo"):
        r = httpx.post(server.url + "/v1/messages", json={**turn1, "model": model}, timeout=30)
        assert r.status_code == 200, (model, r.text)
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


# --- the dialect's mapping and the backend's body, without a server -----------------


def _chat(**body: Any) -> ChatRequest:
    return to_chat(msgspec.convert({"model": "m", "max_tokens": 5, **body}, MessagesRequest))


def test_each_marked_block_marks_the_native_message_it_became() -> None:
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "data", "cache_control": HOUR}],
    }
    chat = _chat(
        system=[
            {"type": "text", "text": "a", "cache_control": EPHEMERAL},
            {"type": "text", "text": "b"},
        ],
        messages=[
            {"role": "user", "content": "read"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "ok", "cache_control": HOUR},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "Read",
                        "input": {},
                        "cache_control": EPHEMERAL,
                    },
                ],
            },
            {"role": "user", "content": [result, {"type": "text", "text": "go on"}]},
        ],
    )
    assert [(m.role, m.cache) for m in chat.messages] == [
        ("system", "5m"),
        ("user", None),
        ("assistant", "1h"),  # two marked blocks, one breakpoint: the longer ttl
        ("tool", "1h"),  # a block inside the tool_result marks it
        ("user", None),
    ]
    assert chat.tools is None


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


def test_marks_merged_into_one_message_keep_the_longest_ttl_in_either_order() -> None:
    for marks in ((EPHEMERAL, HOUR), (HOUR, EPHEMERAL)):
        blocks = [
            {"type": "text", "text": f"t{i}", "cache_control": c} for i, c in enumerate(marks)
        ]
        chat = _chat(messages=[{"role": "user", "content": blocks}])
        assert [m.cache for m in chat.messages] == ["1h"], marks


def test_the_top_level_breakpoint_counts_toward_the_four() -> None:
    text = {"type": "text", "text": "hi", "cache_control": EPHEMERAL}
    body = {"messages": [{"role": "user", "content": [text, text, text, text]}]}
    _chat(**body)  # four: taken
    with pytest.raises(InvalidRequest, match="Found 5"):
        _chat(**body, cache_control=EPHEMERAL)


def test_a_breakpoint_on_a_deferred_tool_left_out_moves_to_the_tool_before_it() -> None:
    # Anthropic's docs mark the last tool; in tool search that is often a deferred one,
    # which is no part of the prefix: its breakpoint ends the tools before it.
    schema = {"type": "object"}
    tools = [
        {"name": "Read", "input_schema": schema},
        {"name": "Bash", "input_schema": schema},
        {"name": "Web", "input_schema": schema, "defer_loading": True, "cache_control": HOUR},
    ]
    chat = _chat(tools=tools, messages=[{"role": "user", "content": "hi"}])
    assert [(t.function.name, t.cache) for t in chat.tools or ()] == [
        ("Read", None),
        ("Bash", "1h"),
    ]
    # Loaded, it is offered with its own breakpoint.
    messages = [
        {"role": "user", "content": "find"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "tool_reference", "tool_name": "Web"}],
                }
            ],
        },
    ]
    chat = _chat(tools=tools, messages=messages)
    assert [(t.function.name, t.cache) for t in chat.tools or ()] == [
        ("Read", None),
        ("Bash", None),
        ("Web", "1h"),
    ]
