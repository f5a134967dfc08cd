"""The Responses dialect's tools beyond plain functions, as Codex CLI sends them: a
namespace's tools, custom (freeform) tools, built-in tools stella cannot run, and a
tool's output that holds an image. Driven through a live stella, by the official
openai client where it can send the request, the answers read with its own types."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import (
    Response,
    ResponseCustomToolCall,
    ResponseFunctionToolCall,
    ResponseStreamEvent,
)

from tests.fakes.openai import TOOL_INPUT, FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

KEY = "sk-responses-tools-1"
# Codex CLI 0.171.0's first request (`codex exec "list the files"`) as it was sent, its
# instructions cut short: its function tools, the freeform `apply_patch`, the
# `multi_agent_v1` namespace, `web_search` and `tool_search`.
CODEX = json.loads((Path(__file__).parent / "data" / "codex_request.json").read_text())
STREAM_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
PATCH_TOOL = next(t for t in CODEX["tools"] if t["type"] == "custom")
FN = {"type": "function", "parameters": {"type": "object", "properties": {}}}


def namespace(name: str, *tools: dict[str, Any]) -> dict[str, Any]:
    return {"type": "namespace", "name": name, "description": f"{name}'s tools", "tools": tools}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[LiveServer, FakeOpenAI]]:
    """stella with the echo backend and a route to the fake OpenAI upstream whose model
    calls every tool it is offered, recording what it was sent."""
    up = FakeOpenAI()
    with serve(up.app) as up_url:
        config = {
            "backends": {"up": {"kind": "openai", "base_url": up_url + "/v1"}},
            "models": {
                "routes": {
                    "every": {"backend": "up", "upstream_model": "every-tool", "retries": 0},
                    "gpt": {"backend": "up", "upstream_model": "ok", "retries": 0},
                }
            },
        }
        with run_stella(config, {"STELLA_API_KEYS": f"tester={KEY}"}) as server:
            yield server, up


def post(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def events(r: httpx.Response) -> list[Any]:
    """A stream's events, each validated by the SDK's own type for it."""
    assert r.status_code == 200, r.text
    return [
        STREAM_EVENT.validate_python(json.loads(line[len("data: ") :]))
        for line in r.text.splitlines()
        if line.startswith("data: ")
    ]


def codex(model: str, **changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(CODEX), "model": model, **changes}


def test_codex_s_first_request_is_answered_streamed_as_it_asks(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, _ = stack
    got = events(post(server, codex("echo")))
    assert got[-1].type == "response.completed"
    # echo calls the first tool offered, Codex's exec_command.
    [call] = got[-1].response.output
    assert (call.type, call.name, call.namespace) == ("function_call", "exec_command", None)


def test_the_upstream_is_offered_function_tools_only(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    r = post(server, codex("every", stream=False))
    assert r.status_code == 200, r.text
    tools = {t["function"]["name"]: t["function"] for t in up.requests[-1]["tools"]}
    # A namespace's tools in its place, each by its own name; web_search and tool_search,
    # which stella cannot run, left out.
    assert list(tools) == [
        "exec_command",
        "write_stdin",
        "request_user_input",
        "apply_patch",
        "close_agent",
        "resume_agent",
        "send_input",
        "spawn_agent",
        "wait_agent",
        "view_image",
        "get_goal",
        "create_goal",
        "update_goal",
    ]
    assert {t["type"] for t in up.requests[-1]["tools"]} == {"function"}
    spawn = next(t for t in CODEX["tools"] if t["type"] == "namespace")["tools"][3]
    assert tools["spawn_agent"]["parameters"] == spawn["parameters"]
    # The freeform tool: one string, its grammar told to the model in words.
    patch = tools["apply_patch"]
    assert patch["description"] == PATCH_TOOL["description"]
    assert patch["parameters"]["required"] == ["input"]
    said = patch["parameters"]["properties"]["input"]
    assert said["type"] == "string"
    assert said["description"].endswith("lark grammar:\n" + PATCH_TOOL["format"]["definition"])


def _check_calls(output: list[Any]) -> None:
    """The calls of model `every-tool` to Codex's tools, as the API gives them."""
    by_name = {o.name: o for o in output}
    assert len(by_name) == len(output) == 13
    patch = by_name["apply_patch"]
    assert isinstance(patch, ResponseCustomToolCall)
    assert (patch.type, patch.input, patch.namespace) == ("custom_tool_call", TOOL_INPUT, None)
    for name in ("close_agent", "resume_agent", "send_input", "spawn_agent", "wait_agent"):
        call = by_name[name]
        assert isinstance(call, ResponseFunctionToolCall)
        assert (call.type, call.namespace) == ("function_call", "multi_agent_v1")
        assert json.loads(call.arguments) == {"input": TOOL_INPUT}
    plain = by_name["exec_command"]
    assert isinstance(plain, ResponseFunctionToolCall) and plain.namespace is None
    assert "namespace" not in plain.model_dump(exclude_unset=True)
    assert all(o.id and o.call_id for o in output)


def test_calls_come_back_to_a_namespace_s_tool_and_to_a_custom_tool(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, _ = stack
    body = codex("every", stream=False)
    whole = Response.model_validate(post(server, body).json())
    _check_calls(whole.output)
    # The SDK's own calls, whole and through its stream helper (the last event's Response).
    c = client(server)
    kwargs = {k: body[k] for k in ("model", "input", "tools", "tool_choice", "reasoning")}
    _check_calls(c.responses.create(**kwargs).output)
    with c.responses.stream(**kwargs) as stream:
        _check_calls(stream.get_final_response().output)


def test_a_streamed_custom_call_is_its_input_s_events(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, _ = stack
    got = events(post(server, codex("every")))
    assert [e.sequence_number for e in got] == list(range(len(got)))
    done = {e.item.name: e for e in got if e.type == "response.output_item.done"}
    patch = done["apply_patch"]
    at = (patch.item.id, patch.output_index)
    mine = [e for e in got if getattr(e, "item_id", None) == patch.item.id]
    added = next(e for e in got if e.type == "response.output_item.added" and e.item.id == at[0])
    assert (added.item.type, added.item.input) == ("custom_tool_call", "")
    assert [(e.type, e.output_index) for e in mine] == [
        ("response.custom_tool_call_input.delta", at[1]),
        ("response.custom_tool_call_input.done", at[1]),
    ]
    assert (mine[0].delta, mine[1].input, patch.item.input) == (TOOL_INPUT,) * 3
    close = done["close_agent"]
    assert (close.item.type, close.item.namespace) == ("function_call", "multi_agent_v1")
    args = next(
        e
        for e in got
        if e.type == "response.function_call_arguments.done" and e.item_id == close.item.id
    )
    assert args.name == "close_agent"
    _check_calls(got[-1].response.output)


def test_names_that_collide_are_made_unique_upstream_and_named_back(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    tools = [
        namespace("a", {**FN, "name": "close"}, {**FN, "name": "only_a"}),
        {**FN, "name": "close"},
        namespace("b", {**FN, "name": "close"}, {**FN, "name": "only_a"}),
    ]
    r = client(server).responses.create(model="every", input="hi", tools=tools)
    sent = [t["function"]["name"] for t in up.requests[-1]["tools"]]
    # The top-level tool keeps its name; a namespace's tool keeps its own when free.
    assert sent == ["a__close", "only_a", "close", "b__close", "b__only_a"]
    assert [(o.name, o.namespace) for o in r.output] == [
        ("close", "a"),
        ("only_a", "a"),
        ("close", None),
        ("close", "b"),
        ("only_a", "b"),
    ]
    # The history goes back under the names the upstream knows.
    follow = [
        {"role": "user", "content": "hi"},
        *(o.model_dump(exclude_none=True) for o in r.output),
        *({"type": "function_call_output", "call_id": o.call_id, "output": "ok"} for o in r.output),
    ]
    client(server).responses.create(model="gpt", input=follow, tools=tools)
    calls = up.requests[-1]["messages"][1]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == sent


def test_a_custom_call_and_its_output_go_back_as_a_call_and_a_tool_result(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    tools = [PATCH_TOOL, namespace("multi_agent_v1", {**FN, "name": "close_agent"})]
    follow = [
        {"role": "user", "content": "add a.txt"},
        {
            "type": "custom_tool_call",
            "id": "ctc_1",
            "call_id": "call_p",
            "name": "apply_patch",
            "input": TOOL_INPUT,
            "status": "completed",
        },
        {
            "type": "function_call",
            "call_id": "call_c",
            "name": "close_agent",
            "namespace": "multi_agent_v1",
            "arguments": '{"target": "x"}',
        },
        {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Done!"},
        {"type": "function_call_output", "call_id": "call_c", "output": "closed"},
    ]
    r = client(server).responses.create(model="gpt", input=follow, tools=tools)
    assert r.status == "completed"
    sent = up.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    calls = [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in sent[1]["tool_calls"]
    ]
    assert [(i, n, json.loads(a)) for i, n, a in calls] == [
        ("call_p", "apply_patch", {"input": TOOL_INPUT}),
        ("call_c", "close_agent", {"target": "x"}),
    ]
    assert [(m["tool_call_id"], m["content"]) for m in sent[2:]] == [
        ("call_p", "Done!"),
        ("call_c", "closed"),
    ]
    # On echo, a custom tool named by tool_choice is called with the user's text.
    r = client(server).responses.create(
        model="echo",
        input="*** Begin Patch",
        tools=tools,
        tool_choice={"type": "custom", "name": "apply_patch"},
    )
    [call] = r.output
    assert isinstance(call, ResponseCustomToolCall) and call.input == "*** Begin Patch"


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search", "external_web_access": False},
        {"type": "tool_search", "execution": "client"},
        {"type": "file_search", "vector_store_ids": ["v"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "computer_use_preview", "display_width": 1, "display_height": 1},
        {"type": "mcp", "server_label": "x"},
        {"type": "image_generation"},
        {"type": "local_shell"},
    ],
)
def test_a_built_in_tool_the_model_may_use_is_left_out(
    stack: tuple[LiveServer, FakeOpenAI], tool: dict[str, Any]
) -> None:
    server, up = stack
    r = post(server, {"model": "gpt", "input": "hi", "tools": [tool]})
    assert r.status_code == 200, r.text
    assert "tools" not in up.requests[-1]
    r = post(server, {"model": "gpt", "input": "hi", "tools": [tool, {**FN, "name": "f"}]})
    assert r.status_code == 200, r.text
    assert [t["function"]["name"] for t in up.requests[-1]["tools"]] == ["f"]
    # The Response repeats the tools as they were asked for.
    assert r.json()["tools"] == [tool, {**FN, "name": "f"}]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            {"tools": [{"type": "web_search"}], "tool_choice": "required"},
            "$.tool_choice: 'required', and the only tools are built-in ones",
        ),
        (
            {
                "tools": [{"type": "web_search"}, {**FN, "name": "f"}],
                "tool_choice": {"type": "web_search_preview"},
            },
            "$.tool_choice.type: 'web_search_preview' is not supported",
        ),
        (
            {
                "tools": [{"type": "mcp", "server_label": "x"}],
                "tool_choice": {"type": "mcp", "server_label": "x"},
            },
            "$.tool_choice.type: 'mcp' is not supported",
        ),
        (
            {
                "tools": [{"type": "web_search"}, {**FN, "name": "f"}],
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "required",
                    "tools": [{"type": "web_search"}],
                },
            },
            "$.tool_choice: allowed_tools with mode required, and no tools",
        ),
        (
            {"tools": [PATCH_TOOL], "tool_choice": {"type": "function", "name": "apply_patch"}},
            "$.tool_choice.name: no function tool named 'apply_patch'",
        ),
        (
            {"tools": [{"type": "namespace", "name": "n", "tools": [{"type": "web_search"}]}]},
            "$.tools[0].tools[0].type: 'web_search' is not supported in a namespace",
        ),
        ({"tools": [{"type": "namespace", "tools": []}]}, "$.tools[0].name: required"),
        (
            {"tools": [namespace("n", {"type": "function", "name": "x" * 65})]},
            "length <= 64 - at `$.tools[0].tools[0].name`",
        ),
        ({"tools": [{"type": "functoin", "name": "f"}]}, "$.tools[0].type: 'functoin' is not"),
        # Any JSON may stand for a type: a list or an object is no tool (it was a 500).
        ({"tools": [{"type": ["function"], "name": "f"}]}, "$.tools[0].type: ['function'] is"),
        ({"tools": [{"type": {"a": 1}, "name": "f"}]}, "$.tools[0].type: {'a': 1} is not"),
    ],
)
def test_a_forced_built_in_tool_or_a_tool_stella_cannot_read_is_a_400(
    stack: tuple[LiveServer, FakeOpenAI], extra: dict[str, Any], said: str
) -> None:
    server, _ = stack
    r = post(server, {"model": "echo", "input": "hi", **extra})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(said) or message.endswith(said), r.text


def test_allowed_tools_among_built_in_ones_offers_the_functions_allowed(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "web_search"}, {"type": "function", "name": "close_agent"}],
    }
    tools = [
        {"type": "web_search"},
        {**FN, "name": "f"},
        namespace("n", {**FN, "name": "close_agent"}),
    ]
    r = post(server, {"model": "gpt", "input": "hi", "tools": tools, "tool_choice": choice})
    assert r.status_code == 200, r.text
    assert [t["function"]["name"] for t in up.requests[-1]["tools"]] == ["close_agent"]
    assert up.requests[-1]["tool_choice"] == "required"
    # An entry whose type is no string is no built-in tool: matched by its name (a 500
    # once, looking a list up among the built-in types).
    choice = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": ["x"], "name": "f"}]}
    r = post(server, {"model": "gpt", "input": "hi", "tools": tools, "tool_choice": choice})
    assert r.status_code == 200, r.text
    assert [t["function"]["name"] for t in up.requests[-1]["tools"]] == ["f"]


def _view_image_turn() -> dict[str, Any]:
    """Codex's request after its view_image tool ran: the image in the tool's output."""
    log = Path(__file__).parent / "data" / "codex_view_image.json"
    return json.loads(log.read_text())


def test_an_image_in_a_tool_s_output_is_a_note_for_a_model_that_reads_text_only(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    body = _view_image_turn()
    output = body["input"][-1]["output"]
    assert [p["type"] for p in output] == ["input_image"]
    # echo answers with the tool's result, as the model reads it.
    r = post(server, {**body, "model": "echo", "stream": False})
    assert r.status_code == 200, r.text
    assert Response.model_validate(r.json()).output_text == (
        "[image omitted: this model reads text only]"
    )
    # Its text parts kept, a file noted too; the session goes on (a later turn).
    body["input"][-1]["output"] = [
        {"type": "input_text", "text": "x.png, 4x4:"},
        *output,
        {"type": "input_file", "file_data": "data:text/plain;base64,aGk=", "filename": "a.txt"},
    ]
    r = post(server, {**body, "model": "echo", "stream": False})
    assert r.status_code == 200, r.text
    # The image's note first, where a backend that reads images reads the image.
    assert Response.model_validate(r.json()).output_text == (
        "[image omitted: this model reads text only]\nx.png, 4x4:\n"
        "[file omitted: this model reads text only]"
    )
    body["input"].append({"role": "user", "content": "just say hello"})
    r = post(server, {**body, "model": "gpt", "stream": False})
    assert r.status_code == 200, r.text
    # To a backend that reads images, the image follows the tool's text (see test_images).
    tool = next(m for m in up.requests[-1]["messages"] if m["role"] == "tool")
    assert tool["content"] == "x.png, 4x4:\n[file omitted: this model reads text only]"
    # In a user's message an image is the model's to read, where its backend reads images
    # (an OpenAI-compatible one), and refused where it reads text only (echo).
    body["input"].append({"role": "user", "content": [output[0]]})
    r = post(server, {**body, "model": "gpt", "stream": False})
    assert r.status_code == 200, r.text
    assert up.requests[-1]["messages"][-1]["content"][0]["type"] == "image_url"
    r = post(server, {**body, "model": "echo"})
    assert r.status_code == 400 and "reads text only" in r.json()["error"]["message"], r.text


def test_a_custom_tool_s_input_from_what_the_model_wrote() -> None:
    # A model that ignores the one-string schema still reaches the tool with its input.
    from stella.api.responses_tools import custom_input

    assert custom_input({"input": "*** Begin Patch"}, None) == "*** Begin Patch"
    # No JSON object written at all: the model's own text, as it wrote it.
    assert custom_input({}, "*** Begin Patch\n*** End Patch") == "*** Begin Patch\n*** End Patch"
    assert custom_input({"patch": "abc"}, None) == "abc"  # its one string, however named
    assert custom_input({"input": 5}, None) == '{"input":5}'
