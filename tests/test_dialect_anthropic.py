"""The Anthropic dialect, driven by the official anthropic client against a live stella."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import anthropic
import httpx
import pydantic
import pytest

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.openai import FakeOpenAI
from tests.live import LiveServer, run_stella

KEY = "sk-ant-dialect-1"
CONFIG = {
    "backends": {
        "slow": {"kind": "echo", "delay_s": 0.05},
        "tired": {"kind": "echo", "fail_after": 1, "error_code": "overloaded"},
    },
    "models": {"routes": {"echo-slow": {"backend": "slow"}, "echo-tired": {"backend": "tired"}}},
}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with run_stella(CONFIG, {"STELLA_API_KEYS": f"claude={KEY}"}) as s:
        yield s


def client(server: LiveServer, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def test_messages_non_stream(server: LiveServer) -> None:
    m = client(server).messages.create(
        model="echo",
        max_tokens=50,
        system="be brief",
        messages=[{"role": "user", "content": "hello there"}],
    )
    assert m.content[0].type == "text" and m.content[0].text == "hello there"
    assert m.stop_reason == "end_turn"
    assert m.usage.output_tokens == 2 and m.usage.input_tokens == 4


def test_messages_stream(server: LiveServer) -> None:
    with client(server).messages.stream(
        model="echo", max_tokens=50, messages=[{"role": "user", "content": "one two three"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "one two three"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3


def test_line_separators_reach_the_sdk_whole(server: LiveServer) -> None:
    # Escaped inside each event's JSON (tests/test_native_stream.py checks the bytes).
    text = "a\u2028b c\u2029d e\x85f"
    with client(server).messages.stream(
        model="echo", max_tokens=50, messages=[{"role": "user", "content": text}]
    ) as stream:
        assert "".join(stream.text_stream) == text


def test_max_tokens_and_stop_sequences(server: LiveServer) -> None:
    m = client(server).messages.create(
        model="echo", max_tokens=2, messages=[{"role": "user", "content": "a b c d"}]
    )
    assert m.stop_reason == "max_tokens" and m.content[0].text == "a b"
    m = client(server).messages.create(
        model="echo",
        max_tokens=20,
        stop_sequences=[" c"],
        messages=[{"role": "user", "content": "a b c d"}],
    )
    assert m.content[0].text == "a b"
    # The Messages API tells a stop sequence from a natural end, and names it.
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == " c"
    with client(server).messages.stream(
        model="echo-slow",
        max_tokens=20,
        stop_sequences=["zzz", " c"],
        messages=[{"role": "user", "content": "a b c d"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == " c"
    assert final.content[0].text == "a b"
    m = client(server).messages.create(
        model="echo",
        max_tokens=20,
        stop_sequences=["zzz"],
        messages=[{"role": "user", "content": "a b"}],
    )
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    # A stop sequence that begins inside a word already made: the answer ends before it.
    for model in ("echo", "echo-slow"):
        with client(server).messages.stream(
            model=model,
            max_tokens=20,
            stop_sequences=["o b"],
            messages=[{"role": "user", "content": "hello big world"}],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "hell" and final.stop_sequence == "o b", model


def test_text_blocks_stay_apart_and_the_prompt_size_comes_first(server: LiveServer) -> None:
    blocks = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    m = client(server).messages.create(
        model="echo",
        max_tokens=50,
        system=[{"type": "text", "text": "rule one."}, {"type": "text", "text": "rule two."}],
        messages=[{"role": "user", "content": blocks}],
    )
    assert m.content[0].text == "part one\npart two"
    assert m.usage.input_tokens == 8  # the echo backend counts words: none ran together
    with client(server).messages.stream(
        model="echo", max_tokens=50, messages=[{"role": "user", "content": "one two three"}]
    ) as stream:
        first = next(iter(stream))
    assert first.type == "message_start" and first.message.usage.input_tokens == 3


def test_an_empty_turn_is_refused_by_its_path_but_a_last_assistant_one(
    server: LiveServer,
) -> None:
    for empty in ([], "", [{"type": "text", "text": ""}]):
        with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content"):
            client(server).messages.create(
                model="echo", max_tokens=5, messages=[{"role": "user", "content": empty}]
            )
    m = client(server).messages.create(
        model="echo",
        max_tokens=5,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}],
    )
    assert m.content[0].text == "hi"
    # No turn at all, a system prompt alone: refused, as the API refuses it.
    with pytest.raises(anthropic.BadRequestError, match=r"\$\.messages"):
        client(server).messages.create(model="echo", max_tokens=5, system="hi", messages=[])
    # A prefill ending in whitespace: refused with the API's own words.
    hi = {"role": "user", "content": "hi"}
    for prefill in ("The answer is ", [{"type": "text", "text": "The answer is\n"}]):
        with pytest.raises(anthropic.BadRequestError) as info:
            client(server).messages.create(
                model="echo", max_tokens=5, messages=[hi, {"role": "assistant", "content": prefill}]
            )
        assert info.value.body["error"]["message"] == (  # type: ignore[index]
            "messages: final assistant content cannot end with trailing whitespace"
        )
    # Within the text, in an earlier assistant turn, or before a tool_use block that ends
    # the turn, whitespace is fine.
    turns = [
        hi,
        {"role": "assistant", "content": "ok "},
        hi,
        {"role": "assistant", "content": "a b"},
    ]
    assert client(server).messages.create(model="echo", max_tokens=5, messages=turns).content
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    use = {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}
    calling = {"role": "assistant", "content": [{"type": "text", "text": "Let me check.\n"}, use]}
    m = client(server).messages.create(
        model="echo", max_tokens=5, messages=[hi, calling], tools=[tool]
    )
    assert m.content


def test_refusals_name_the_messages_apis_own_fields(server: LiveServer) -> None:
    # In the Messages API's terms and paths, not those of the OpenAI request it becomes.
    def refusal(**body: object) -> str:
        r = httpx.post(
            server.url + "/v1/messages",
            json={"model": "echo", "max_tokens": 5, **body},
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        )
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    hi = [{"role": "user", "content": "hi"}]
    tool = {"name": "lookup", "input_schema": {"type": "object"}}
    assert refusal(messages=hi, tool_choice={"type": "any"}) == (
        "$.tool_choice: 'any' without tools"
    )
    assert refusal(messages=hi, tool_choice={"type": "tool", "name": "clock"}) == (
        "$.tool_choice: tool 'clock' without tools"
    )
    assert refusal(messages=hi, tools=[tool], tool_choice={"type": "tool", "name": "clock"}) == (
        "$.tool_choice.name: no tool named 'clock'"
    )
    assert refusal(messages=hi, tools=[tool], tool_choice={"type": "tool"}) == (
        "$.tool_choice.name: required when type is tool"
    )
    for blocks in ([{"type": "text"}], [{"type": "text", "text": ""}] * 2):
        assert refusal(messages=[{"role": "user", "content": blocks}]) == (
            "$.messages[0].content[0].text: must not be empty"
        )
    assert refusal(messages=[{"role": "user", "content": []}]) == (
        "$.messages[0].content: must not be empty"
    )


def test_a_tool_result_that_answers_no_tool_use_is_refused_by_its_block(
    server: LiveServer,
) -> None:
    # As the API refuses it (a 400 invalid_request_error), not a 502 with an upstream's
    # words for it, nor an answer from a backend that read a result of no call.
    def refusal(messages: list[dict[str, object]]) -> str:
        r = httpx.post(
            server.url + "/v1/messages",
            json={"model": "echo", "max_tokens": 5, "system": "Be brief.", "messages": messages},
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        return r.json()["error"]["message"]

    hi = {"role": "user", "content": "Weather in Paris?"}

    def use(call_id: str) -> dict[str, object]:
        return {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {}}

    def result(call_id: str) -> dict[str, object]:
        return {"type": "tool_result", "tool_use_id": call_id, "content": "sunny"}

    calling = {
        "role": "assistant",
        "content": [{"type": "text", "text": "Let me look."}, use("t1")],
    }
    assert refusal([hi, calling, {"role": "user", "content": [result("t1"), result("t9")]}]) == (
        "$.messages[2].content[1].tool_use_id: 't9' is no tool_use of the assistant turn before it"
    )
    assert refusal(
        [{"role": "user", "content": [{"type": "text", "text": "x"}, result("t1")]}]
    ) == (
        "$.messages[0].content[1].tool_use_id: 't1' answers no tool_use: a tool_result must "
        "be in the message right after an assistant message with tool_use blocks"
    )
    later = [
        hi,
        calling,
        {"role": "user", "content": [result("t1")]},
        {"role": "assistant", "content": "ok"},
    ]
    assert refusal([*later, {"role": "user", "content": [result("t1")]}]).startswith(
        "$.messages[4].content[0].tool_use_id: 't1' answers no tool_use"
    )
    # Consecutive assistant messages are one turn, as the API merges them: both calls'
    # results answer it.
    split = [
        {"role": "assistant", "content": [use("t1")]},
        {"role": "assistant", "content": [use("t2")]},
        {"role": "user", "content": [result("t1"), result("t2")]},
    ]
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": "echo", "max_tokens": 5, "messages": [hi, *split]},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 200, r.text
    twice = {"role": "assistant", "content": [use("t1"), use("t2"), use("t1")]}
    assert refusal([hi, twice]) == (
        "$.messages[1].content[2].id: tool_use id 't1' is used twice in this message"
    )
    # Each turn's results answer that turn's calls, whatever the turns before used.
    again = {"role": "assistant", "content": [use("t2")]}
    m = client(server).messages.create(
        model="echo",
        max_tokens=5,
        messages=[
            *later,
            {"role": "user", "content": "And now?"},
            again,
            {"role": "user", "content": [result("t2")]},
        ],  # type: ignore[list-item]
    )
    assert m.content


def test_tool_choice(server: LiveServer) -> None:
    tools = [
        {"name": "lookup", "input_schema": {"type": "object"}},
        {"name": "clock", "input_schema": {"type": "object"}},
    ]
    c = client(server)
    msgs = [{"role": "user", "content": "Oslo"}]
    m = c.messages.create(
        model="echo",
        max_tokens=50,
        tools=tools,
        messages=msgs,
        tool_choice={"type": "tool", "name": "clock"},
    )
    assert m.content[0].type == "tool_use" and m.content[0].name == "clock"
    m = c.messages.create(
        model="echo", max_tokens=50, tools=tools, messages=msgs, tool_choice={"type": "none"}
    )
    assert m.content[0].type == "text" and m.content[0].text == "Oslo"


def test_tool_use_round_trip(server: LiveServer) -> None:
    tools = [{"name": "lookup", "description": "", "input_schema": {"type": "object"}}]
    c = client(server)
    m = c.messages.create(
        model="echo", max_tokens=50, tools=tools, messages=[{"role": "user", "content": "Oslo"}]
    )
    assert m.stop_reason == "tool_use"
    use = m.content[0]
    assert use.type == "tool_use" and use.name == "lookup" and use.input == {"input": "Oslo"}
    with c.messages.stream(
        model="echo", max_tokens=50, tools=tools, messages=[{"role": "user", "content": "Oslo"}]
    ) as s:
        final = s.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == {"input": "Oslo"}
    m2 = c.messages.create(
        model="echo",
        max_tokens=50,
        tools=tools,
        messages=[
            {"role": "user", "content": "Oslo"},
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "cold"}],
            },
        ],
    )
    assert m2.content[0].text == "cold"


def test_server_tools_are_refused_by_their_path(server: LiveServer) -> None:
    # stella runs no server tool (web search, code execution): taken as a client tool,
    # the model would call it and wait for a result no one sends.
    lookup = {"name": "lookup", "input_schema": {"type": "object"}}
    msgs = [{"role": "user", "content": "Oslo"}]
    for tool in (
        # Claude Code's WebSearch tool asks the API so, in a request of its own.
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 8},
        {"type": "bash_20250124", "name": "bash"},
    ):
        with pytest.raises(anthropic.BadRequestError) as info:
            client(server).messages.create(
                model="echo",
                max_tokens=5,
                tools=[lookup, tool],  # type: ignore[list-item]
                messages=msgs,
            )
        assert info.value.body["error"] == {
            "type": "invalid_request_error",
            "message": f"$.tools[1].type: server tool {tool['type']!r} is not supported: "
            'stella runs no server tools; only client tools (type "custom" or none)',
        }
    # A client tool may say what it is.
    m = client(server).messages.create(
        model="echo", max_tokens=5, tools=[{**lookup, "type": "custom"}], messages=msgs
    )
    assert m.content[0].type == "tool_use" and m.content[0].name == "lookup"


def test_mcp_servers_are_refused_by_their_field(server: LiveServer) -> None:
    # The MCP connector's servers are the API's to call, as server tools are: stella
    # calls none, and ignored, the model would answer without the tools asked for.
    mcp = {"type": "url", "url": "https://mcp.example/sse", "name": "example"}
    msgs = [{"role": "user", "content": "Oslo"}]
    with pytest.raises(anthropic.BadRequestError, match=r"mcp_servers") as info:
        client(server).messages.create(
            model="echo", max_tokens=5, messages=msgs, extra_body={"mcp_servers": [mcp]}
        )
    assert info.value.body["error"]["type"] == "invalid_request_error"
    # None asked for is no refusal.
    m = client(server).messages.create(
        model="echo", max_tokens=5, messages=msgs, extra_body={"mcp_servers": []}
    )
    assert m.content[0].text == "Oslo"


class City(pydantic.BaseModel):
    """The answer a structured-outputs test asks for."""

    name: str
    population: int


def test_structured_outputs_reach_the_backend_as_response_format() -> None:
    # output_config.format (and the beta's top-level output_format) is the backend's
    # response_format: ignored, the client would get prose where it asked for JSON.
    msgs = [{"role": "user", "content": "The largest city of Norway?"}]
    with _claude_and_gpt("claude-ok", "ok") as (server, claude, gpt):
        c = client(server)
        # The SDK's parse() sends the GA form; an Anthropic upstream gets it as sent.
        m = c.messages.parse(model="sonnet", max_tokens=50, messages=msgs, output_format=City)
        assert m.parsed_output == City(name="Oslo", population=4)
        sent = claude.requests[-1]["output_config"]
        assert sent["format"]["type"] == "json_schema"
        schema = sent["format"]["schema"]
        assert set(schema["properties"]) == {"name", "population"}
        with c.messages.stream(
            model="sonnet", max_tokens=50, messages=msgs, output_format=City
        ) as stream:
            final = stream.get_final_message()
        assert final.parsed_output == City(name="Oslo", population=4)
        assert claude.requests[-1]["output_config"] == sent
        # An OpenAI-compatible upstream gets OpenAI's shape, in both forms.
        fmt = {"type": "json_schema", "schema": schema}
        for body in ({"output_config": {"format": fmt}}, {"output_format": fmt}):
            c.messages.create(model="gpt", max_tokens=50, messages=msgs, extra_body=body)
            assert gpt.requests[-1]["response_format"] == {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": schema, "strict": True},
            }
        # effort alone: no format; an Anthropic upstream gets it as sent, an OpenAI-compatible
        # one as reasoning_effort (other keys of output_config are ignored).
        for model in ("sonnet", "gpt"):
            m = c.messages.create(
                model=model,
                max_tokens=50,
                messages=msgs,
                extra_body={"output_config": {"effort": "low", "later": 1}},
            )
            assert m.content[0].type == "text" and m.content[0].text, model
        assert claude.requests[-1]["output_config"] == {"effort": "low"}
        assert "thinking" not in claude.requests[-1]
        assert "response_format" not in gpt.requests[-1]
        assert gpt.requests[-1]["reasoning_effort"] == "low"
        # Taken as a level's name: one of another type is refused by its path, as the API
        # refuses it, rather than ignored as an unknown key is.
        sent = len(claude.requests)
        with pytest.raises(anthropic.BadRequestError, match=r"\$\.output_config\.effort"):
            c.messages.create(
                model="sonnet",
                max_tokens=50,
                messages=msgs,
                extra_body={"output_config": {"effort": 5}},
            )
        assert len(claude.requests) == sent


def test_an_output_format_stella_cannot_honour_is_refused_by_its_path(
    server: LiveServer,
) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    for body, path in (
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
        ({"output_format": {"type": "text", "schema": schema}}, "output_format.type"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
        (
            {
                "output_config": {"format": {"type": "json_schema", "schema": schema}},
                "output_format": {"type": "json_schema", "schema": schema},
            },
            "output_format",
        ),
        ({"output_format": {"schema": schema}}, "output_format"),
    ):
        with pytest.raises(anthropic.BadRequestError) as info:
            client(server).messages.create(
                model="echo", max_tokens=5, messages=msgs, extra_body=body
            )
        error = info.value.body["error"]
        assert error["type"] == "invalid_request_error"
        assert f"$.{path}" in error["message"], (body, error)


def test_a_backends_format_refusal_names_output_config() -> None:
    # The pipeline's refusal names its own field; a Claude client sent output_config.
    from stella.api.anthropic import ANTHROPIC
    from stella.errors import InvalidRequest

    refusal = InvalidRequest("$.response_format: cannot constrain output", param="response_format")
    error = ANTHROPIC.error_body(refusal, "r")["error"]
    assert error["message"] == "$.output_config.format: cannot constrain output"


_THOUGHT = {"type": "thinking", "thinking": "Oslo is cold in May.", "signature": "c2ln"}
_REDACTED = {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"}


def _thought_turns() -> list[dict]:
    """A conversation begun with extended thinking: its assistant turns carry thinking
    blocks before their text and their tool calls, as the API gave them."""
    use = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
    return [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": [_REDACTED, _THOUGHT, {"type": "text", "text": "Cold."}]},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": [_THOUGHT, use]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "4C"}],
        },
    ]


def test_an_assistants_thinking_is_taken_and_dropped(server: LiveServer) -> None:
    # The API takes earlier turns' thinking back and ignores it: refused, a conversation
    # begun with thinking (Claude Code, an SDK's tool loop) could not go on here.
    m = client(server).messages.create(model="echo", max_tokens=50, messages=_thought_turns())
    assert m.content[0].text == "4C"
    # The request's own `thinking` is taken and not applied: the answer has no thinking.
    m = client(server).messages.create(
        model="echo",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=_thought_turns(),
    )
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == "4C"
    # A user's turn holds no thinking, in the API as here.
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\]\.type"):
        client(server).messages.create(
            model="echo", max_tokens=5, messages=[{"role": "user", "content": [_THOUGHT]}]
        )


def test_thinking_reaches_no_upstream() -> None:
    # Another backend's model cannot read it, and an Anthropic one asked to think by no
    # one would be sent blocks signed for another request.
    with _claude_and_gpt("claude-ok", "ok") as (server, claude, gpt):
        for model in ("sonnet", "gpt"):
            client(server).messages.create(model=model, max_tokens=50, messages=_thought_turns())
        sent = [claude.requests[-1]["messages"], gpt.requests[-1]["messages"]]
        assert "thinking" not in json.dumps(sent) and "ZW5jcnlwdGVk" not in json.dumps(sent)
        assert claude.requests[-1]["messages"][1]["content"] == "Cold."
        assert gpt.requests[-1]["messages"][1]["content"] == "Cold."


def _tool_turns(result: dict) -> list[dict]:
    use = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
    return [
        {"role": "user", "content": "Oslo"},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", **result}]},
    ]


def test_a_failed_tool_call_reads_as_one(server: LiveServer) -> None:
    # The echo backend answers with the tool message as the model would read it.
    for result, read in (
        ({"content": "no such city", "is_error": True}, "Error: no such city"),
        (
            {"content": [{"type": "text", "text": "timed out"}], "is_error": True},
            "Error: timed out",
        ),
        ({"content": "Error 404: no such city", "is_error": True}, "Error 404: no such city"),
        ({"is_error": True}, "Error"),
        ({"content": "cold", "is_error": False}, "cold"),
    ):
        m = client(server).messages.create(
            model="echo", max_tokens=50, messages=_tool_turns(result)
        )
        assert m.content[0].text == read, result


def test_blocks_that_are_not_text_are_refused_where_only_text_can_go(
    server: LiveServer,
) -> None:
    image = {"type": "image", "source": {"type": "url", "url": "http://x/cat.png"}}
    text = {"type": "text", "text": "look"}
    # In a tool_result, an image is a note (test_an_image_a_tool_gave_is_a_note); a block
    # that holds text of its own is not read, so refused.
    found = {"type": "search_result", "source": "x", "title": "x", "content": [text]}
    with pytest.raises(
        anthropic.BadRequestError, match=r"messages\[2\]\.content\[0\]\.content\[1\]\.type"
    ):
        client(server).messages.create(
            model="echo", max_tokens=5, messages=_tool_turns({"content": [text, found]})
        )
    with pytest.raises(anthropic.BadRequestError, match=r"system\[1\]\.type"):
        client(server).messages.create(
            model="echo",
            max_tokens=5,
            system=[text, image],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "hi"}],
        )


def test_ollama_style_images_on_a_message_are_refused(server: LiveServer) -> None:
    # Some clients send a message's images as Ollama takes them: refused, as an image
    # block is and as the OpenAI dialect refuses them, not ignored.
    url, headers = server.url + "/v1/messages", {"x-api-key": KEY}
    msgs = [{"role": "user", "content": "What is this?", "images": ["aGk="]}]
    r = httpx.post(url, headers=headers, json={"model": "echo", "max_tokens": 5, "messages": msgs})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error == {
        "type": "invalid_request_error",
        "message": "$.messages[0].images: images are not supported",
    }, error
    msgs[0]["images"] = []  # an empty list asks for nothing
    r = httpx.post(url, headers=headers, json={"model": "echo", "max_tokens": 5, "messages": msgs})
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "What is this?", r.text


def test_errors(server: LiveServer) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        client(server, "wrong").messages.create(
            model="echo", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.NotFoundError):
        client(server).messages.create(
            model="claude-9", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.BadRequestError):
        client(server).messages.create(
            model="echo",
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "x"}}],
                }
            ],
        )


def test_every_answer_carries_the_request_id_as_the_api_does(server: LiveServer) -> None:
    # The API's `request-id` header (stella's X-Request-ID) on each answer, and its
    # `request_id` in each error body: the SDK reads both.
    c = client(server)
    hi = [{"role": "user", "content": "hi"}]
    raw = c.messages.with_raw_response.create(model="echo", max_tokens=5, messages=hi)
    rid = raw.headers["x-request-id"]
    assert raw.headers["request-id"] == rid and raw.parse()._request_id == rid
    with c.messages.stream(model="echo", max_tokens=5, messages=hi) as stream:
        rid = stream.response.headers["x-request-id"]
        assert stream.request_id == rid
        assert stream.get_final_message().content[0].text == "hi"
    failures = [
        (anthropic.AuthenticationError, client(server, "wrong"), {"model": "echo"}),
        (anthropic.NotFoundError, c, {"model": "claude-9"}),
        (anthropic.NotFoundError, c, {"model": "claude-9", "stream": True}),
        (anthropic.BadRequestError, c, {"model": "echo", "tool_choice": {"type": "any"}}),
    ]
    for error, who, body in failures:
        with pytest.raises(error) as info:
            who.messages.create(max_tokens=5, messages=hi, **body)
        rid = info.value.response.headers["x-request-id"]
        assert info.value.request_id == rid and info.value.body["request_id"] == rid, body
    # Answered by the router, not the route: a path under /v1/messages it does not know.
    r = httpx.post(server.url + "/v1/messages/nope", json={}, headers={"x-api-key": KEY})
    assert r.status_code == 404 and r.json()["type"] == "error"
    assert r.headers["request-id"] == r.headers["x-request-id"] == r.json()["request_id"]
    spec = httpx.get(server.url + "/openapi.json").json()
    answers = spec["paths"]["/v1/messages"]["post"]["responses"]
    assert all("request-id" in a["headers"] for a in answers.values())


def test_models_come_in_the_apis_shape_to_its_clients(server: LiveServer) -> None:
    # Anthropic's SDK sends anthropic-version: GET /v1/models answers as its API does.
    c = client(server)
    page = c.models.list()
    ids = [m.id for m in page.data]
    assert {"echo", "echo-slow", "echo-tired"} <= set(ids)
    assert page.has_more is False and page.first_id == ids[0] and page.last_id == ids[-1]
    assert [m.id for m in c.models.list()] == ids  # the SDK's paging ends
    for m in page.data:
        assert m.type == "model" and m.display_name == m.id
        assert m.created_at == datetime(1970, 1, 1, tzinfo=UTC)
    raw = c.models.with_raw_response.retrieve("echo")
    m = raw.parse()
    assert (m.id, m.type, m.display_name) == ("echo", "model", "echo")
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    for who, error, kind in (
        (c, anthropic.NotFoundError, "not_found_error"),
        (client(server, "wrong"), anthropic.AuthenticationError, "authentication_error"),
    ):
        with pytest.raises(error) as info:
            who.models.retrieve("nope")
        body = info.value.body
        assert body["type"] == "error" and body["error"]["type"] == kind, body
        assert body["request_id"] == info.value.request_id
    # Without the header: OpenAI's shapes, as before.
    r = httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY})
    assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "model"
    r = httpx.get(server.url + "/v1/models/nope", headers={"x-api-key": KEY})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "request-id" not in r.headers
    # The router's own answers there too: a 405 in the shape the request asks for.
    for path in ("/v1/models", "/v1/models/echo"):
        r = httpx.post(server.url + path, headers={"x-api-key": KEY, "anthropic-version": "1"})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", r.text
        error = r.json()["error"]
        assert r.json()["type"] == "error" and error["message"] == f"POST is not allowed on {path}"
        assert error["type"] == "invalid_request_error"
        assert r.json()["request_id"] == r.headers["request-id"] == r.headers["x-request-id"]
        r = httpx.post(server.url + path, headers={"x-api-key": KEY})
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_the_model_list_comes_in_the_apis_pages() -> None:
    # limit (1..1000, 20 by default), after_id and before_id as Anthropic's Models API
    # takes them; the SDK's auto-paging walks every page, each model once.
    narrow, none = "sk-ant-narrow-1", "sk-ant-none-12"
    config = {
        "models": {"routes": {f"m{i:02}": {"backend": "echo"} for i in range(25)}},
        "auth": {
            "keys": {
                "narrow": {
                    "sha256": hashlib.sha256(narrow.encode()).hexdigest(),
                    "models": ["m1*"],
                },
                "none": {"sha256": hashlib.sha256(none.encode()).hexdigest(), "models": []},
            }
        },
    }
    with run_stella(config, {"STELLA_API_KEYS": f"claude={KEY}"}) as s:
        c = client(s)
        ids = [m.id for m in c.models.list(limit=1000).data]
        assert len(ids) == 26 and set(ids) == {"echo", *(f"m{i:02}" for i in range(25))}
        assert [m.id for m in c.models.list()] == ids  # auto-paging, 20 then 6
        first = c.models.list()
        assert [m.id for m in first.data] == ids[:20]
        assert (first.has_more, first.first_id, first.last_id) == (True, ids[0], ids[19])
        assert [m.id for m in c.models.list(limit=3)] == ids  # nine pages, each model once
        page = c.models.list(limit=3, after_id=ids[22])
        assert [m.id for m in page.data] == ids[23:] and page.has_more is False
        page = c.models.list(limit=3, after_id=ids[-1])
        assert page.data == [] and page.has_more is False
        assert page.first_id is None and page.last_id is None
        # before_id: the page just before it, in the list's order; has_more looks back.
        page = c.models.list(limit=3, before_id=ids[10])
        assert [m.id for m in page.data] == ids[7:10] and page.has_more is True
        page = c.models.list(limit=3, before_id=ids[2])
        assert [m.id for m in page.data] == ids[:2] and page.has_more is False
        back = [m.id for m in c.models.list(limit=4, before_id=ids[-1])]
        assert sorted(back) == sorted(ids[:-1]) and len(back) == len(set(back))
        # A key sees its own routes only, and pages them alike; none at all: an empty page.
        mine = [m.id for m in client(s, narrow).models.list(limit=4)]
        assert mine == [i for i in ids if i.startswith("m1")]
        page = client(s, none).models.list()
        assert (page.data, page.has_more, page.first_id, page.last_id) == ([], False, None, None)
        # Refusals: 400 invalid_request_error naming the parameter.
        refused = [
            ({"limit": "0"}, "limit"),
            ({"limit": "1001"}, "limit"),
            ({"limit": "ten"}, "limit"),
            ({"limit": ""}, "limit"),
            ({"limit": "+5"}, "limit"),
            ({"after_id": "nope"}, "after_id"),
            ({"before_id": "nope"}, "before_id"),
            ({"after_id": ids[0], "before_id": ids[5]}, "after_id, before_id"),
        ]
        for query, param in refused:
            with pytest.raises(anthropic.BadRequestError) as info:
                c.models.list(extra_query=query)
            error = info.value.body["error"]
            assert error["type"] == "invalid_request_error", error
            assert error["message"].startswith(param + ": "), error
        # A route the key may not use is no cursor for it: as unknown, not a 403.
        with pytest.raises(anthropic.BadRequestError) as info:
            client(s, narrow).models.list(after_id="m00")
        assert info.value.body["error"]["message"] == "after_id: no model 'm00' in this list"
        page = c.models.list(limit=1)
        assert [m.id for m in page.data] == ids[:1] and page.has_more is True
        # Without anthropic-version: OpenAI's one list, the parameters not read.
        r = httpx.get(s.url + "/v1/models?limit=0", headers={"x-api-key": KEY})
        assert r.status_code == 200 and len(r.json()["data"]) == 26


async def test_disconnect_cancels_and_logs_anthropic(server: LiveServer) -> None:
    body = {
        "model": "echo-slow",
        "max_tokens": 500,
        "stream": True,
        "messages": [{"role": "user", "content": " ".join(["w"] * 100)}],
    }
    async with httpx.AsyncClient(timeout=10) as c:
        async with c.stream(
            "POST",
            server.url + "/v1/messages",
            json=body,
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        ) as r:
            rid = r.headers["x-request-id"]
            n = 0
            async for line in r.aiter_lines():
                n += "text_delta" in line
                if n == 3:
                    break
    ev = await asyncio.to_thread(server.wait_event, lambda e: e["request_id"] == rid)
    assert (
        ev["api"] == "anthropic"
        and ev["finish_reason"] == "client_closed"
        and ev["key"] == "claude"
    )


async def test_an_overload_is_a_529_the_client_knows() -> None:
    config = {**CONFIG, "limits": {"backends": {"slow": 1}, "queue_timeout_s": 0.1}}
    with run_stella(config) as s:
        busy_body = {
            "model": "echo-slow",
            "max_tokens": 50,
            "messages": [{"role": "user", "content": " ".join(["w"] * 20)}],
        }
        async with httpx.AsyncClient(timeout=10) as c:
            busy = asyncio.create_task(c.post(s.url + "/v1/messages", json=busy_body))
            await asyncio.sleep(0.2)
            ac = anthropic.AsyncAnthropic(base_url=s.url, api_key="x", max_retries=0)
            with pytest.raises(anthropic.OverloadedError) as info:
                await ac.messages.create(
                    model="echo-slow", max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
            assert info.value.status_code == 529
            assert info.value.body["error"]["type"] == "overloaded_error"
            assert info.value.request_id == info.value.response.headers["x-request-id"]
            assert (await busy).status_code == 200


def _sse(server: LiveServer, body: dict) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a streamed answer, pings left out."""
    import json

    events = []
    with httpx.stream(
        "POST",
        server.url + "/v1/messages",
        json={"max_tokens": 50, "stream": True, **body},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name, (name, data)  # the API repeats it in the data
                if name != "ping":
                    events.append((name, data))
    return events


def test_the_stream_is_the_apis_event_sequence(server: LiveServer) -> None:
    events = _sse(server, {"model": "echo", "messages": [{"role": "user", "content": "a b"}]})
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "a b"
    assert {d["index"] for n, d in events if n.startswith("content_block")} == {0}
    assert events[5][1]["delta"]["stop_reason"] == "end_turn"
    assert events[5][1]["usage"]["output_tokens"] == 2
    # A tool call: its own block, its input as JSON pieces, stop_reason tool_use.
    tool = {"name": "lookup", "input_schema": {"type": "object"}}
    events = _sse(
        server,
        {"model": "echo", "tools": [tool], "messages": [{"role": "user", "content": "x"}]},
    )
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = next(d for n, d in events if n == "content_block_start")
    assert (
        start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "lookup"
    )
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    assert names.count("content_block_start") == names.count("content_block_stop")
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_backends_overload_is_a_529_with_retry_after() -> None:
    # Its own server: the failures would open the `tired` circuit of the shared one.
    routes = {
        **CONFIG["models"]["routes"],
        # Every backend of the chain overloaded: a 529 all the same.
        "echo-tired-twice": {"backend": "tired", "fallbacks": ["echo-tired"]},
    }
    config = {**CONFIG, "models": {"routes": routes}, "breaker": {"failure_threshold": 0}}
    with run_stella(config) as s:
        for model in ("echo-tired", "echo-tired-twice"):
            body = {
                "model": model,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "a b"}],
            }
            r = httpx.post(s.url + "/v1/messages", json=body, timeout=10)
            assert r.status_code == 529, (model, r.text)
            assert r.json()["error"]["type"] == "overloaded_error", (model, r.text)
            assert int(r.headers["retry-after"]) >= 1, (model, r.headers)


def test_an_overload_after_the_start_is_an_overloaded_error_event(server: LiveServer) -> None:
    events = _sse(
        server, {"model": "echo-tired", "messages": [{"role": "user", "content": "a b c"}]}
    )
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "overloaded_error", events
    assert [n for n, _ in events][:2] == ["message_start", "content_block_start"]


def test_the_prompt_tokens_a_cache_spared_are_cache_read_input_tokens() -> None:
    # The API's input_tokens leave out what was read from the cache; the backend's count
    # of that is cache_read_input_tokens, left out when the backend gave none.
    from tests.fakes.openai import CACHED, stella_counting_cache

    with stella_counting_cache({"STELLA_API_KEYS": f"claude={KEY}"}) as server:
        msgs = [{"role": "user", "content": "hi"}]
        m = client(server).messages.create(model="cached", max_tokens=50, messages=msgs)
        assert (m.usage.input_tokens, m.usage.cache_read_input_tokens) == (3 - CACHED, CACHED)
        events = _sse(server, {"model": "cached", "messages": msgs})
        usage = next(d for n, d in events if n == "message_delta")["usage"]
        assert usage == {
            "input_tokens": 3 - CACHED,
            "cache_read_input_tokens": CACHED,
            "output_tokens": 5,
        }
        m = client(server).messages.create(model="plain", max_tokens=50, messages=msgs)
        assert m.usage.input_tokens == 3 and m.usage.cache_read_input_tokens is None
        events = _sse(server, {"model": "plain", "messages": msgs})
        usage = next(d for n, d in events if n == "message_delta")["usage"]
        assert usage == {"input_tokens": 3, "output_tokens": 5}


@contextlib.contextmanager
def _claude_and_gpt(
    claude_model: str, gpt_model: str
) -> Iterator[tuple[LiveServer, FakeAnthropic, FakeOpenAI]]:
    """stella with route "sonnet" on a fake Anthropic upstream's `claude_model` and route
    "gpt" on a fake OpenAI-compatible one's `gpt_model`; the fakes keep what they got."""
    from tests.fakes.anthropic import KEY as UPSTREAM_KEY
    from tests.fakes.server import serve

    claude, gpt = FakeAnthropic(), FakeOpenAI()
    with serve(claude.app) as claude_url, serve(gpt.app) as gpt_url:
        config = {
            "backends": {
                "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CK"},
                "gpt": {"kind": "openai", "base_url": gpt_url + "/v1"},
            },
            "models": {
                "routes": {
                    "sonnet": {"backend": "claude", "upstream_model": claude_model},
                    "gpt": {"backend": "gpt", "upstream_model": gpt_model},
                }
            },
        }
        env = {"STELLA_API_KEYS": f"claude={KEY}", "CK": UPSTREAM_KEY}
        with run_stella(config, env) as server:
            yield server, claude, gpt


def test_disable_parallel_tool_use_reaches_the_upstream() -> None:
    with _claude_and_gpt("claude-two-tools", "two-tools") as (server, claude, gpt):
        c = client(server)
        tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
        msgs = [{"role": "user", "content": "Paris and Oslo?"}]
        for model in ("sonnet", "gpt"):
            m = c.messages.create(model=model, max_tokens=50, tools=tools, messages=msgs)
            assert [b.type for b in m.content] == ["tool_use", "tool_use"]
            single = {"type": "auto", "disable_parallel_tool_use": True}
            m = c.messages.create(
                model=model, max_tokens=50, tools=tools, messages=msgs, tool_choice=single
            )
            assert [b.type for b in m.content] == ["tool_use"]
            with c.messages.stream(
                model=model, max_tokens=50, tools=tools, messages=msgs, tool_choice=single
            ) as s:
                final = s.get_final_message()
            assert [b.type for b in final.content] == ["tool_use"]
        assert claude.requests[-1]["tool_choice"] == single
        assert gpt.requests[-1]["parallel_tool_calls"] is False


def test_a_tool_s_strict_reaches_the_upstream() -> None:
    # Strict tool use holds the call's input to its schema: dropped, the model may send
    # input the client's code then fails on.
    with _claude_and_gpt("claude-two-tools", "two-tools") as (server, claude, gpt):
        c = client(server)
        schema = {"type": "object", "properties": {"city": {"type": "string"}}}
        tools = [{"name": "get_weather", "input_schema": schema, "strict": True}]
        msgs = [{"role": "user", "content": "Paris?"}]
        for model in ("sonnet", "gpt"):
            c.messages.create(model=model, max_tokens=50, tools=tools, messages=msgs)
        assert claude.requests[-1]["tools"] == [
            {"name": "get_weather", "description": "", "input_schema": schema, "strict": True}
        ]
        assert gpt.requests[-1]["tools"][0]["function"]["strict"] is True
        # An OpenAI client's strict function reaches an Anthropic upstream the same way;
        # a tool that does not say sends no strict, the upstream's default.
        fn = {"name": "get_weather", "parameters": schema}
        for function, sent in ((fn | {"strict": False}, False), (fn, None)):
            chat = {
                "model": "sonnet",
                "messages": msgs,
                "tools": [{"type": "function", "function": function}],
            }
            r = httpx.post(
                server.url + "/v1/chat/completions",
                json=chat,
                headers={"Authorization": f"Bearer {KEY}"},
            )
            assert r.status_code == 200, r.text
            assert claude.requests[-1]["tools"][0].get("strict") is sent


def test_a_turn_of_tool_calls_the_upstream_ended_with_stop_is_tool_use() -> None:
    # An OpenAI-compatible upstream ending a call with "stop" (OpenAI for a named
    # tool_choice, vLLM, SGLang), an Anthropic-compatible one with end_turn: an agent
    # loop runs the tools on stop_reason tool_use, and would end here on end_turn.
    with _claude_and_gpt("claude-tools-end-turn", "tools-stop") as (server, _, _):
        c = client(server)
        tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
        msgs = [{"role": "user", "content": "Paris?"}]
        for model in ("sonnet", "gpt"):
            m = c.messages.create(model=model, max_tokens=50, tools=tools, messages=msgs)
            assert ([b.type for b in m.content], m.stop_reason) == (["tool_use"], "tool_use")
            with c.messages.stream(model=model, max_tokens=50, tools=tools, messages=msgs) as s:
                final = s.get_final_message()
            assert [b.type for b in final.content] == ["tool_use"]
            assert final.stop_reason == "tool_use", model


def test_model_objects_validate_as_the_sdks_model_info(server: LiveServer) -> None:
    # The SDK builds its models leniently; strict validation holds them to its types,
    # where `lifecycle` is required.
    from anthropic.types import ModelInfo

    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    listed = httpx.get(server.url + "/v1/models", headers=headers).json()["data"]
    one = httpx.get(server.url + "/v1/models/echo", headers=headers).json()
    for body in [*listed, one]:
        m = ModelInfo.model_validate(body, strict=False)
        ModelInfo.model_validate({**body, "created_at": m.created_at}, strict=True)
        assert m.lifecycle == "active"


def _error_object(body: dict) -> object:
    """The error of an Anthropic error body, as the SDK's own strict types read it."""
    from anthropic.types.shared import ErrorResponse

    return ErrorResponse.model_validate(body, strict=True).error


def test_an_anthropic_upstreams_overload_is_a_529_overloaded_error() -> None:
    # An upstream's HTTP 529, or its overloaded_error as the stream's first event, is the
    # API's overload to a Claude client (the SDK's OverloadedError), not a 502 api_error;
    # one after the start is an overloaded_error event. Every route of a chain overloaded
    # too. The native API keeps its 502 upstream_error.
    from anthropic.types.shared import OverloadedErrorObject

    from tests.fakes.anthropic import KEY as UPSTREAM_KEY
    from tests.fakes.server import serve

    fake = FakeAnthropic()
    with serve(fake.app) as url:
        routes = {
            name: {"backend": "claude", "upstream_model": model, "retries": 0}
            for name, model in (
                ("c529", "claude-529"),
                ("cfirst", "claude-error-first"),
                ("cmid", "claude-error-mid"),
                ("capi", "claude-api-error-first"),
            )
        }
        routes["cchain"] = {**routes["c529"], "fallbacks": ["cfirst"]}
        config = {
            "backends": {"claude": {"kind": "anthropic", "base_url": url, "api_key_env": "CK"}},
            "models": {"routes": routes},
            "breaker": {"failure_threshold": 0},
        }
        with run_stella(config, {"CK": UPSTREAM_KEY}) as s:
            c = anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0)
            hi = [{"role": "user", "content": "hi"}]
            for model in ("c529", "cfirst", "cchain"):
                with pytest.raises(anthropic.OverloadedError) as info:
                    c.messages.create(model=model, max_tokens=20, messages=hi)
                assert info.value.status_code == 529, model
                assert isinstance(_error_object(info.value.body), OverloadedErrorObject)
                assert int(info.value.response.headers["retry-after"]) >= 1, model
                for stream in (True, False):
                    r = httpx.post(
                        s.url + "/v1/messages",
                        json={"model": model, "max_tokens": 20, "stream": stream, "messages": hi},
                    )
                    assert r.status_code == 529, (model, stream, r.text)
                    assert int(r.headers["retry-after"]) >= 1, (model, stream)
                    assert isinstance(_error_object(r.json()), OverloadedErrorObject)
                # The native API: an upstream's failure is stella's 502.
                native = {"model": model, "stream": False, "messages": hi}
                r = httpx.post(s.url + "/api/v1/chat", json=native)
                assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
            # Any other upstream error stays an api_error.
            with pytest.raises(anthropic.InternalServerError) as info:
                c.messages.create(model="capi", max_tokens=20, messages=hi)
            assert info.value.status_code == 502
            assert info.value.body["error"]["type"] == "api_error"
            events = _sse(s, {"model": "cmid", "messages": hi})
            name, data = events[-1]
            assert name == "error" and isinstance(_error_object(data), OverloadedErrorObject)
            assert "content_block_delta" in [n for n, _ in events]


def test_a_timeout_is_a_timeout_error() -> None:
    # stella's 504 (upstream_timeout) is the API's timeout_error, before the stream and in
    # an error event after it (the SDK's GatewayTimeoutErrorObject), not an api_error.
    from anthropic.types.shared import GatewayTimeoutErrorObject

    backends = {
        "late": {"kind": "echo", "fail_after": 0, "error_code": "upstream_timeout"},
        "stops": {"kind": "echo", "fail_after": 1, "error_code": "upstream_timeout"},
    }
    routes = {name: {"backend": name, "retries": 0} for name in backends}
    with run_stella({"backends": backends, "models": {"routes": routes}}) as s:
        hi = [{"role": "user", "content": "a b c"}]
        for stream in (True, False):
            r = httpx.post(
                s.url + "/v1/messages",
                json={"model": "late", "max_tokens": 20, "stream": stream, "messages": hi},
            )
            assert r.status_code == 504, (stream, r.text)
            assert isinstance(_error_object(r.json()), GatewayTimeoutErrorObject)
        name, data = _sse(s, {"model": "stops", "messages": hi})[-1]
        assert name == "error" and isinstance(_error_object(data), GatewayTimeoutErrorObject)


def test_a_user_id_within_the_api_s_bound_passes_whatever_its_characters(
    server: LiveServer,
) -> None:
    # The API bounds metadata.user_id at 256 characters: however many bytes of JSON
    # they are (6 for a control character), the log's metadata ceiling holds them.
    for char in ("日", '"', "\x01"):
        user_id = char * 256
        raw = client(server).messages.with_raw_response.create(
            model="echo",
            max_tokens=5,
            metadata={"user_id": user_id},
            messages=[{"role": "user", "content": "hi"}],
        )
        rid = raw.headers["x-request-id"]
        ev = server.wait_event(lambda e, rid=rid: e.get("request_id") == rid)
        assert ev["metadata"] == {"user_id": user_id}


def test_user_id_reaches_an_anthropic_upstream_and_betas_do_not() -> None:
    # metadata.user_id is the inference log's metadata, and an Anthropic upstream's, for
    # its abuse detection; anthropic-beta headers are not forwarded.
    hi = [{"role": "user", "content": "hi"}]
    with _claude_and_gpt("claude-ok", "ok") as (server, claude, gpt):
        raw = client(server).messages.with_raw_response.create(
            model="sonnet",
            max_tokens=20,
            metadata={"user_id": "user-7"},
            messages=hi,  # type: ignore[arg-type]
            extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        )
        rid = raw.headers["x-request-id"]
        ev = server.wait_event(lambda e: e.get("request_id") == rid)
        assert ev["metadata"] == {"user_id": "user-7"}
        assert claude.requests[-1]["metadata"] == {"user_id": "user-7"}
        assert "anthropic-beta" not in claude.headers[-1]
        # Claude Code's, a JSON text; only user_id goes, and only one the API takes.
        for metadata, sent in (
            (_tool_search_body("sonnet")["metadata"], _tool_search_body("sonnet")["metadata"]),
            ({"user_id": "user-7", "team": "blue"}, {"user_id": "user-7"}),
            ({"user_id": "u" * 257}, None),
            ({"user_id": 7}, None),
            ({"user_id": ""}, None),
        ):
            m = client(server).messages.create(
                model="sonnet",
                max_tokens=20,
                messages=hi,  # type: ignore[arg-type]
                extra_body={"metadata": metadata},
            )
            assert m.content[0].type == "text", metadata
            assert claude.requests[-1].get("metadata") == sent, metadata
        # Another dialect's metadata is its log's: a key named user_id stays there.
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "sonnet", "messages": hi, "metadata": {"user_id": "user-7"}},
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200, r.text
        assert "metadata" not in claude.requests[-1]
        # The native API's own field.
        r = httpx.post(
            server.url + "/api/v1/chat",
            json={"model": "sonnet", "messages": hi, "stream": False, "user_id": "user-8"},
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200, r.text
        assert claude.requests[-1]["metadata"] == {"user_id": "user-8"}
        # Other backends take no such id.
        client(server).messages.create(
            model="gpt",
            max_tokens=20,
            metadata={"user_id": "user-7"},
            messages=hi,  # type: ignore[arg-type]
        )
        assert "metadata" not in gpt.requests[-1]


# A request shaped as Claude Code's with the mid-conversation system beta: the user's turn
# in text blocks (one with cache_control), then a system message after it.
_AGENTS = "Available agent types for the Agent tool: general-purpose"


def _claude_code_body(system: str | list[dict]) -> dict:
    user = [
        {"type": "text", "text": "<system-reminder>be careful</system-reminder>"},
        {"type": "text", "text": "say hi", "cache_control": {"type": "ephemeral"}},
    ]
    return {
        "model": "echo",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "You are an agent."}],
        "messages": [
            {"role": "user", "content": user},
            {"role": "system", "content": system},
        ],
    }


def test_a_system_message_in_the_conversation_is_taken(server: LiveServer) -> None:
    # Claude Code sends it with any model name that is not a Claude one; a 400 here ends
    # its session at the first request.
    headers = {"x-api-key": KEY, "anthropic-beta": "mid-conversation-system-2026-04-07"}
    url = server.url + "/v1/messages?beta=true"
    blocks = [{"type": "text", "text": _AGENTS, "cache_control": {"type": "ephemeral"}}]
    for system in (_AGENTS, blocks):
        body = _claude_code_body(system)
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert (
            answer["content"][0]["text"] == "<system-reminder>be careful</system-reminder>\nsay hi"
        )
        # Every message is read: 4 words of system prompt, 4 of the turn, 8 of the message.
        assert answer["usage"]["input_tokens"] == 4 + 4 + 8
        events = _sse(server, body)
        assert events[-1][0] == "message_stop"
        r = httpx.post(
            server.url + "/v1/messages/count_tokens?beta=true", json=body, headers=headers
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"input_tokens": 4 + 4 + 8}
    # The official client sends it as any other message.
    m = client(server).messages.create(
        model="echo",
        max_tokens=50,
        messages=[
            {"role": "user", "content": "hello there"},
            {"role": "system", "content": _AGENTS},  # type: ignore[misc, list-item]
        ],
    )
    assert m.content[0].text == "hello there"


def test_a_system_message_holds_text_only(server: LiveServer) -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"}
    image = {"type": "image", "source": {"type": "url", "url": "http://x/cat.png"}}
    for block in (use, result, image):
        r = httpx.post(
            server.url + "/v1/messages",
            json=_claude_code_body([block]),
            headers={"x-api-key": KEY},
        )
        assert r.status_code == 400, r.text
        assert "$.messages[1].content[0].type" in r.json()["error"]["message"]
    for blank in ("  \n", [{"type": "text", "text": " "}]):
        r = httpx.post(
            server.url + "/v1/messages", json=_claude_code_body(blank), headers={"x-api-key": KEY}
        )
        assert r.status_code == 400, r.text
        assert "only whitespace" in r.json()["error"]["message"]
    # After a turn's tool results, it answers no call and needs none.
    msgs = [*_tool_turns({"content": "cold"}), {"role": "system", "content": _AGENTS}]
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": "echo", "max_tokens": 50, "messages": msgs},
        headers={"x-api-key": KEY},
    )
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == "cold"


def test_a_system_message_reaches_each_upstream_where_it_takes_one() -> None:
    with _claude_and_gpt("claude-ok", "ok") as (server, claude, gpt):
        for model in ("sonnet", "gpt"):
            body = _claude_code_body(_AGENTS) | {"model": model}
            r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY})
            assert r.status_code == 200, r.text
        # The Messages API's top-level system, after the request's own system prompt.
        sent = claude.requests[-1]
        assert sent["system"] == "You are an agent.\n\n" + _AGENTS
        assert [m["role"] for m in sent["messages"]] == ["user"]
        # An OpenAI-compatible API takes a system message in place.
        assert [(m["role"], m["content"]) for m in gpt.requests[-1]["messages"]][-1] == (
            "system",
            _AGENTS,
        )


def test_a_long_agent_sessions_request_is_taken(server: LiveServer) -> None:
    # Claude Code resends a whole session (history, system prompt, tools) each request: on
    # a 1M-token context model that passes 1 MiB, and a 413 there ends the session.
    turns: list[dict] = []
    for k in range(300):
        turns += [
            {"role": "user", "content": f"step {k}: " + "read the file " * 600},
            {"role": "assistant", "content": "done " * 100},
        ]
    turns.append({"role": "user", "content": "next"})
    body = {"model": "echo", "max_tokens": 5, "messages": turns}
    assert 2 * 1024 * 1024 < len(json.dumps(body)) < 8 * 1024 * 1024
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 200, r.text[:200]
    assert r.json()["content"][0]["text"] == "next"


# Claude Code 2.1.332's tool search, as it asks it (advanced-tool-use-2025-11-20): tools it
# defers (defer_loading) are loaded by the tool_reference blocks its ToolSearch tool answers
# with. Its fields as sent; descriptions shortened.
_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
_BETAS = (
    "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "advanced-tool-use-2025-11-20,effort-2025-11-24"
)
EPHEMERAL = {"type": "ephemeral"}
_CC_TOOLS = [
    {
        "name": "Bash",
        "description": "Executes a given bash command and returns its output.",
        "input_schema": {
            "$schema": _SCHEMA,
            "type": "object",
            "properties": {"command": {"description": "The command to execute", "type": "string"}},
            "required": ["command"],
            "additionalProperties": False,
        },
    },
    {
        "name": "ToolSearch",
        "description": "Fetches full schema definitions for deferred tools so they can be called.",
        "input_schema": {
            "$schema": _SCHEMA,
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "max_results": {"default": 5, "type": "number"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
    {
        "name": "DeferredToolPlaceholder",
        "description": "Reserved placeholder that keeps deferred tool loading active; never call "
        "this tool.",
        "input_schema": {"type": "object", "properties": {}},
        "defer_loading": True,
    },
    {
        "name": "WebFetch",
        "description": "Fetches a URL, converts the page to markdown, and answers `prompt` "
        "against it using a small fast model.",
        "input_schema": {
            "$schema": _SCHEMA,
            "type": "object",
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "prompt": {"type": "string"},
            },
            "required": ["url", "prompt"],
            "additionalProperties": False,
        },
        "defer_loading": True,
    },
    {
        "name": "NotebookEdit",
        "description": "Replaces the contents of a cell in a Jupyter notebook.",
        "input_schema": {"type": "object", "properties": {"notebook_path": {"type": "string"}}},
        "defer_loading": True,
    },
]
_SEARCH = {
    "type": "tool_use",
    "id": "call_1795908345915",
    "name": "ToolSearch",
    "input": {"query": "select:WebFetch"},
}


def _tool_search_body(model: str, references: list[str] | None = None) -> dict:
    """A Claude Code request after its ToolSearch answered `references` (None: before it
    searched), with the top-level fields 2.1.332 sends beside them."""
    messages: list[dict] = [
        {"role": "user", "content": [{"type": "text", "text": "fetch the page"}]},
    ]
    if references is not None:
        refs = [{"type": "tool_reference", "tool_name": n} for n in references]
        result = {"type": "tool_result", "tool_use_id": _SEARCH["id"], "content": refs}
        messages += [
            {"role": "assistant", "content": [_SEARCH]},
            {"role": "user", "content": [result]},
        ]
    user_id = '{"device_id":"c4420940","account_uuid":"","session_id":"f9860558"}'
    return {
        "model": model,
        "messages": messages,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.150;"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": EPHEMERAL},
        ],
        "tools": _CC_TOOLS,
        "metadata": {"user_id": user_id},
        "max_tokens": 32000,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "stream": True,
    }


def _names(tools: list[dict] | None) -> list[str]:
    """The names of tools in either API's shape."""
    return [t["function"]["name"] if "function" in t else t["name"] for t in tools or ()]


def test_deferred_tools_are_offered_once_a_tool_reference_loads_them() -> None:
    headers = {"x-api-key": KEY, "anthropic-beta": _BETAS}
    with _claude_and_gpt("claude-ok", "ok") as (server, claude, gpt):
        for model, upstream in (("gpt", gpt), ("sonnet", claude)):
            url = server.url + "/v1/messages?beta=true"
            # Before any search: a deferred tool is not the model's to call.
            r = httpx.post(url, json=_tool_search_body(model), headers=headers)
            assert r.status_code == 200, r.text
            assert _names(upstream.requests[-1]["tools"]) == ["Bash", "ToolSearch"]
            # ToolSearch's answer loads WebFetch: offered, and the result says so.
            r = httpx.post(url, json=_tool_search_body(model, ["WebFetch"]), headers=headers)
            assert r.status_code == 200, r.text
            sent = upstream.requests[-1]
            assert _names(sent["tools"]) == ["Bash", "ToolSearch", "WebFetch"]
            if upstream is gpt:
                assert sent["messages"][-1] == {
                    "role": "tool",
                    "content": "Tool loaded: WebFetch",
                    "tool_call_id": _SEARCH["id"],
                }
                web_fetch = sent["tools"][-1]["function"]
                assert web_fetch["parameters"] == _CC_TOOLS[3]["input_schema"]
                assert "defer_loading" not in sent["tools"][-1]
            else:
                result = sent["messages"][-1]["content"][0]
                assert result["type"] == "tool_result"
                assert result["content"] == "Tool loaded: WebFetch"
                assert sent["tools"][-1]["input_schema"] == _CC_TOOLS[3]["input_schema"]
                assert "defer_loading" not in sent["tools"][-1]
        # The count is of what the model reads: the same tools.
        body = _tool_search_body("sonnet", ["WebFetch"])
        for field in ("max_tokens", "stream", "metadata"):
            del body[field]
        r = httpx.post(
            server.url + "/v1/messages/count_tokens?beta=true", json=body, headers=headers
        )
        assert r.status_code == 200, r.text
        assert _names(claude.counts[-1]["tools"]) == ["Bash", "ToolSearch", "WebFetch"]
        # The official client (its beta namespace) is answered the same way.
        m = client(server).beta.messages.create(
            model="gpt",
            max_tokens=50,
            tools=_CC_TOOLS,  # type: ignore[arg-type]
            messages=_tool_search_body("gpt", ["WebFetch"])["messages"],
            betas=["advanced-tool-use-2025-11-20"],
        )
        assert m.content
        assert _names(gpt.requests[-1]["tools"]) == ["Bash", "ToolSearch", "WebFetch"]


def test_tool_search_refusals_are_the_api_s(server: LiveServer) -> None:
    url = server.url + "/v1/messages"
    headers = {"x-api-key": KEY}
    # A reference to a tool the request does not define: the API's 400.
    body = _tool_search_body("echo", ["WebFetch", "WebSearch"]) | {"stream": False}
    r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "message": "$.messages[2].content[0].content[1].tool_name: Tool reference 'WebSearch' "
        "has no corresponding tool definition",
    }
    # Every tool deferred: the API's 400.
    body = _tool_search_body("echo", ["WebFetch"]) | {"stream": False}
    deferred = [t | {"defer_loading": True} for t in _CC_TOOLS]
    r = httpx.post(url, json=body | {"tools": deferred}, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (
        "$.tools: All tools have defer_loading set. At least one tool must be non-deferred."
    )
    # A tool_choice naming a deferred tool loads it: the model must call it.
    body = _tool_search_body("echo") | {"stream": False}
    body["tool_choice"] = {"type": "tool", "name": "NotebookEdit"}
    r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["name"] == "NotebookEdit"


def test_an_image_a_tool_gave_reaches_a_reader_and_is_a_note_elsewhere() -> None:
    # Claude Code's Read of a PNG or a PDF answers with the file as a block: refused, it
    # would fail every later turn of the session, as it stays in the history. An image
    # reaches a backend that reads images; a document, and an image to one that reads
    # text only, is a note.
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    pdf = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}
    content = [
        {"type": "image", "source": png},
        {"type": "text", "text": "page 1"},
        {"type": "document", "source": pdf},
    ]
    with _claude_and_gpt("claude-ok", "ok") as (server, claude, gpt):
        for model in ("gpt", "sonnet", "echo"):
            m = client(server).messages.create(
                model=model, max_tokens=50, messages=_tool_turns({"content": content})
            )
            assert m.content[0].type == "text"
        doc = "page 1\n[document omitted: this model reads text only]"
        assert m.content[0].text == "[image omitted: this model reads text only]\n" + doc
        assert gpt.requests[-1]["messages"][-2:] == [
            {"role": "tool", "content": doc, "tool_call_id": "toolu_1"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Image returned by tool call toolu_1 (lookup):"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{png['data']}"},
                    },
                ],
            },
        ]
        assert claude.requests[-1]["messages"][-1]["content"][0]["content"] == [
            {"type": "image", "source": png},
            {"type": "text", "text": doc},
        ]
        # In a user message, an image reaches a backend that reads images as one.
        client(server).messages.create(
            model="gpt",
            max_tokens=50,
            messages=[{"role": "user", "content": [content[0], content[1]]}],  # type: ignore[list-item]
        )
        assert gpt.requests[-1]["messages"][-1]["content"] == [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "page 1"},
        ]
