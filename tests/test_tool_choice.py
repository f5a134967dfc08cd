"""tool_choice: what each backend is sent, and what the pipeline does for those it can't tell."""

from __future__ import annotations

import msgspec

from stella.backends.anthropic_request import request_body as anthropic_body
from stella.backends.openai import request_body as openai_body
from stella.core import _without_tools
from stella.protocol import (
    ChatRequest,
    FunctionCall,
    FunctionSpec,
    Message,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolCallRef,
)

TOOLS = [Tool(function=FunctionSpec(name="lookup"))]
ASK = [Message(role="user", content="Oslo?")]
# A tool was called and answered: "none" asks for the text answer now.
HISTORY = [
    *ASK,
    Message(
        role="assistant",
        content="",
        tool_calls=[ToolCallRef(id="c1", function=FunctionCall(name="lookup", arguments={}))],
    ),
    Message(role="tool", content="cold", tool_call_id="c1"),
]


def req(messages: list[Message], choice: object) -> ChatRequest:
    return ChatRequest(messages=messages, model="m", tools=TOOLS, tool_choice=choice)  # type: ignore[arg-type]


def test_none_keeps_the_tools_where_the_api_takes_the_choice() -> None:
    # Anthropic rejects tool_use/tool_result blocks without `tools`: they must stay.
    body = anthropic_body(req(HISTORY, "none"), 100)
    assert body["tools"][0]["name"] == "lookup" and body["tool_choice"] == {"type": "none"}
    body = openai_body(req(HISTORY, "none"), False, False)
    assert body["tools"] and body["tool_choice"] == "none"


def test_each_choice_in_each_upstreams_words() -> None:
    named = NamedToolChoice(function=NamedFunction(name="lookup"))
    assert anthropic_body(req(ASK, "required"), 100)["tool_choice"] == {"type": "any"}
    assert anthropic_body(req(ASK, named), 100)["tool_choice"] == {
        "type": "tool",
        "name": "lookup",
    }
    assert openai_body(req(ASK, named), False, False)["tool_choice"] == {
        "type": "function",
        "function": {"name": "lookup"},
    }


def test_for_backends_that_cant_be_told_none_withholds_the_tools() -> None:
    stripped = _without_tools(req(ASK, "none"))
    assert stripped.tools is None and stripped.tool_choice is None
    # ... unless the conversation already holds tool calls a template must render.
    kept = _without_tools(req(HISTORY, "none"))
    assert kept.tools == TOOLS


def test_parallel_tool_calls_false_in_each_upstreams_words() -> None:
    one = msgspec.structs.replace(req(ASK, None), parallel_tool_calls=False)
    assert openai_body(one, False, False)["parallel_tool_calls"] is False
    assert anthropic_body(one, 100)["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    named = NamedToolChoice(function=NamedFunction(name="lookup"))
    body = anthropic_body(msgspec.structs.replace(one, tool_choice=named), 100)
    assert body["tool_choice"] == {
        "type": "tool",
        "name": "lookup",
        "disable_parallel_tool_use": True,
    }
    # "none" calls no tool: the API takes no flag there. Without tools OpenAI refuses it.
    none = msgspec.structs.replace(one, tool_choice="none")
    assert anthropic_body(none, 100)["tool_choice"] == {"type": "none"}
    bare = msgspec.structs.replace(one, tools=None, tool_choice=None)
    assert "parallel_tool_calls" not in openai_body(bare, False, False)
    # Not set: the upstream's default, nothing sent.
    assert "parallel_tool_calls" not in openai_body(req(ASK, None), False, False)
    assert "tool_choice" not in anthropic_body(req(ASK, None), 100)
