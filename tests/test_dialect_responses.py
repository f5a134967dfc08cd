"""The OpenAI Responses dialect, driven by the official openai client against a live stella."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseFailedEvent, ResponseStreamEvent

from tests.fakes.openai import CACHED, FILTERED, REFUSAL, TEXT_BEFORE, FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

KEY = "sk-responses-dialect-1"
WEATHER = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[LiveServer, FakeOpenAI]]:
    """stella with echo routes (slow, failing, rate-limited) and routes to the fake
    OpenAI upstream, which records what it was sent."""
    up = FakeOpenAI()
    with serve(up.app) as up_url:
        config = {
            "backends": {
                "slow": {"kind": "echo", "delay_s": 0.05},
                "failing": {"kind": "echo", "fail_after": 2},
                "up": {"kind": "openai", "base_url": up_url + "/v1"},
            },
            "models": {
                "routes": {
                    "echo-slow": {"backend": "slow"},
                    "echo-fail": {"backend": "failing", "retries": 0},
                    "once": {"backend": "echo"},
                    "gpt": {"backend": "up", "upstream_model": "ok", "retries": 0},
                    "gpt-tools": {"backend": "up", "upstream_model": "two-tools", "retries": 0},
                    "refusal": {"backend": "up", "upstream_model": "refusal", "retries": 0},
                    "filtered": {"backend": "up", "upstream_model": "filtered", "retries": 0},
                    "text-tools": {"backend": "up", "upstream_model": "text-tools", "retries": 0},
                    "cached": {"backend": "up", "upstream_model": "cached", "retries": 0},
                }
            },
            "limits": {"models": {"once": {"requests_per_minute": 1}}},
        }
        with run_stella(config, {"STELLA_API_KEYS": f"tester={KEY}"}) as server:
            yield server, up


@pytest.fixture(scope="module")
def server(stack: tuple[LiveServer, FakeOpenAI]) -> LiveServer:
    return stack[0]


# The SDK's own event types, as strict as its models are (the client itself builds them
# without validating: a body it would accept may still break a typed consumer).
STREAM_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)


def post(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    """POST /v1/responses as it is, past the SDK's own checks."""
    return httpx.post(
        server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )


def validated_events(server: LiveServer, body: dict[str, Any]) -> list[Any]:
    """A stream's events, each validated by the SDK's own type for it."""
    r = post(server, {**body, "stream": True})
    assert r.status_code == 200, r.text
    return [
        STREAM_EVENT.validate_python(json.loads(line[len("data: ") :]))
        for line in r.text.splitlines()
        if line.startswith("data: ")
    ]


def client(server: LiveServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def native_usage(server: LiveServer, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The usage the native API gives for the same conversation on echo."""
    return httpx.post(
        server.url + "/api/v1/chat",
        json={"model": "echo", "stream": False, "messages": messages},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()["usage"]


def test_create_gives_a_response_whose_usage_is_the_native_api_s(server: LiveServer) -> None:
    r = client(server).responses.create(
        model="echo", instructions="Answer briefly.", input="hello there"
    )
    assert r.output_text == "hello there"
    assert (r.object, r.status, r.model, r.error) == ("response", "completed", "echo", None)
    assert r.id.startswith("resp_") and r.instructions == "Answer briefly."
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert [(c.type, c.text, c.annotations) for c in item.content] == [
        ("output_text", "hello there", [])
    ]
    native = native_usage(
        server,
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "hello there"},
        ],
    )
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        native["prompt_tokens"],
        native["completion_tokens"],
        native["total_tokens"],
    )
    assert r.usage.input_tokens_details.cached_tokens == 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    ev = server.wait_event(lambda e: e["request_id"] == r.id.removeprefix("resp_"))
    assert ev["api"] == "responses" and ev["stream"] is False


@pytest.mark.parametrize(
    "body",
    [
        {"model": "echo", "input": "hello there", "metadata": {"k": "v"}, "user": "u"},
        {"model": "echo", "input": "a b c d e", "max_output_tokens": 2},
        {"model": "echo", "input": "Paris", "tools": WEATHER, "tool_choice": "required"},
        {
            "model": "echo",
            "input": "{}",
            "text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA}},
        },
    ],
)
def test_bodies_and_events_validate_as_the_sdk_s_own_types(
    server: LiveServer, body: dict[str, Any]
) -> None:
    r = post(server, body)
    assert r.status_code == 200, r.text
    whole = Response.model_validate(r.json())
    assert whole.usage is not None and whole.usage.input_tokens_details.cache_write_tokens == 0
    events = validated_events(server, body)
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.status == whole.status


def _types_in_order(events: list[Any]) -> list[str]:
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return [e.type for e in events]


def test_the_stream_helper_and_create_stream_true(server: LiveServer) -> None:
    c = client(server)
    with c.responses.stream(model="echo", input="one two three") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "one two three" and final.status == "completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "one two three" and len(deltas) == 3
    raw = list(c.responses.create(model="echo", input="one two three", stream=True))
    assert _types_in_order(raw) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    item_id = raw[2].item.id
    assert all(e.item_id == item_id for e in raw[3:-2] if hasattr(e, "item_id"))
    assert raw[7].text == "one two three"
    done = raw[-1].response
    assert done.id == raw[0].response.id and done.output_text == "one two three"
    # The same usage as a whole answer's.
    whole = c.responses.create(model="echo", input="one two three")
    assert done.usage == whole.usage


def test_an_empty_answer_holds_an_empty_message_streamed_or_not(server: LiveServer) -> None:
    c = client(server)
    whole = c.responses.create(model="echo", input="")
    events = list(c.responses.create(model="echo", input="", stream=True))
    assert [e.type for e in events if e.type.startswith("response.output_")] == [
        "response.output_item.added",
        "response.output_text.done",
        "response.output_item.done",
    ]
    streamed = events[-1].response
    for r in (whole, streamed):
        assert [(o.type, o.status, o.content[0].text) for o in r.output] == [
            ("message", "completed", "")
        ]
        assert r.output_text == "" and r.status == "completed"


def test_the_pipeline_s_errors_name_the_responses_api_s_fields() -> None:
    # The pipeline speaks of chat completions' fields: the error names this API's own.
    from stella.api.responses import RESPONSES
    from stella.errors import ContextTooLong, InvalidRequest

    too_long = ContextTooLong("$.messages: the prompt is 9 tokens", param="messages")
    assert RESPONSES.error_body(too_long, "r")["error"] == {
        "message": "$.input: the prompt is 9 tokens",
        "type": "invalid_request_error",
        "param": "input",
        "code": "context_length_exceeded",
    }
    fmt = InvalidRequest("$.response_format: no JSON here", param="response_format")
    assert RESPONSES.error_body(fmt, "r")["error"]["param"] == "text.format"
    other = InvalidRequest("$.temperature: over 2", param="temperature")
    assert RESPONSES.error_body(other, "r")["error"]["param"] == "temperature"


async def test_async_client_stream_and_not(server: LiveServer) -> None:
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    r = await c.responses.create(model="echo", input=[{"role": "user", "content": "a b"}])
    assert r.output_text == "a b"
    stream = await c.responses.create(model="echo", input="x y z", stream=True)
    deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "x y z"
    async with c.responses.stream(model="echo", input="p q") as helper:
        final = await helper.get_final_response()
    assert final.output_text == "p q"
    await c.close()


def test_instructions_and_developer_messages_reach_the_model_as_system(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    r = client(server).responses.create(
        model="gpt",
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use French."},
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "salut"}]},
            {"type": "message", "role": "user", "content": "again"},
        ],
    )
    assert r.output_text == " w0 w1 w2 w3 w4"
    assert up.requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use French."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "salut"},
        {"role": "user", "content": "again"},
    ]


def test_tool_calls_both_ways_and_the_result_back(server: LiveServer) -> None:
    c = client(server)
    r = c.responses.create(model="echo", input="Paris", tools=WEATHER)
    [call] = r.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.name == "get_weather" and json.loads(call.arguments) == {"input": "Paris"}
    assert call.call_id and call.id and r.status == "completed"
    events = list(c.responses.create(model="echo", input="Paris", tools=WEATHER, stream=True))
    assert _types_in_order(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[4].arguments == call.arguments and events[4].name == "get_weather"
    with c.responses.stream(model="echo", input="Paris", tools=WEATHER) as stream:
        final = stream.get_final_response()
    assert [(o.type, o.name, o.arguments) for o in final.output] == [
        ("function_call", "get_weather", call.arguments)
    ]
    # The tool's result goes back in the next request; echo answers with it.
    follow = [
        {"role": "user", "content": "Paris"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"},
    ]
    r2 = c.responses.create(model="echo", input=follow, tools=WEATHER)
    assert r2.output_text == "sunny, 21C"


def test_text_before_tool_calls_is_a_message_item_before_the_calls(server: LiveServer) -> None:
    # A model may say what it is about to do, then call: its text is not lost, and the
    # message is whole (closed) before the first call's item begins.
    body = {"model": "text-tools", "input": "Paris and Oslo?", "tools": WEATHER}
    r = post(server, body)
    assert r.status_code == 200, r.text
    whole = Response.model_validate(r.json())
    assert [(o.type, o.status) for o in whole.output] == [
        ("message", "completed"),
        ("function_call", "completed"),
        ("function_call", "completed"),
    ]
    assert whole.output_text == TEXT_BEFORE
    events = validated_events(server, body)
    _types_in_order(events)
    kinds = [
        (e.type, getattr(e, "item", None) and e.item.type)
        for e in events
        if e.type.startswith("response.output_") or e.type.startswith("response.content_")
    ]
    first_call = kinds.index(("response.output_item.added", "function_call"))
    assert kinds[first_call - 3 : first_call] == [
        ("response.output_text.done", None),
        ("response.content_part.done", None),
        ("response.output_item.done", "message"),
    ]
    assert [e.text for e in events if e.type == "response.output_text.done"] == [TEXT_BEFORE]
    done = events[-1].response
    assert done.output_text == TEXT_BEFORE
    assert [(o.type, o.status) for o in done.output] == [(o.type, o.status) for o in whole.output]
    assert [o.arguments for o in done.output[1:]] == [o.arguments for o in whole.output[1:]]


def test_function_call_outputs_reach_the_upstream_as_tool_messages(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    c = client(server)
    ask = {"role": "user", "content": "Paris and Oslo?"}
    r = c.responses.create(model="gpt-tools", input=[ask], tools=WEATHER)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [json.loads(o.arguments) for o in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert up.requests[-1]["tools"][0]["function"]["name"] == "get_weather"
    results = [
        {"type": "function_call_output", "call_id": o.call_id, "output": f"sunny {i}"}
        for i, o in enumerate(calls)
    ]
    follow = [ask, *(o.model_dump(exclude_none=True) for o in r.output), *results]
    c.responses.create(model="gpt", input=follow, tools=WEATHER)
    sent = up.requests[-1]["messages"]
    # One assistant turn holding both calls, then each result linked by its id (the
    # fake answers 400 otherwise, as the API does).
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [t["id"] for t in sent[1]["tool_calls"]] == [o.call_id for o in calls]
    assert [json.loads(t["function"]["arguments"]) for t in sent[1]["tool_calls"]] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ]
    assert [(m["tool_call_id"], m["content"]) for m in sent[2:]] == [
        (calls[0].call_id, "sunny 0"),
        (calls[1].call_id, "sunny 1"),
    ]


def test_tool_choice_and_parallel_tool_calls(stack: tuple[LiveServer, FakeOpenAI]) -> None:
    server, up = stack
    c = client(server)
    other = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
    r = c.responses.create(model="echo", input="Paris", tools=WEATHER, tool_choice="none")
    assert r.output_text == "Paris"
    r = c.responses.create(
        model="echo",
        input="Paris",
        tools=[*WEATHER, other],
        tool_choice={"type": "function", "name": "get_time"},
    )
    assert r.output[0].name == "get_time"
    c.responses.create(
        model="gpt-tools",
        input="Paris and Oslo?",
        tools=WEATHER,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    sent = up.requests[-1]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(
            model="echo",
            input="Paris",
            tools=WEATHER,
            tool_choice={"type": "function", "name": "nope"},
        )
    assert info.value.param == "tool_choice.name"


def test_text_format_reaches_the_upstream_as_response_format(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    c = client(server)
    fmt = {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}
    r = c.responses.create(model="gpt", input="Which city?", text={"format": fmt})
    assert up.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }
    assert r.text.format.type == "json_schema"
    c.responses.create(model="gpt", input="JSON please", text={"format": {"type": "json_object"}})
    assert up.requests[-1]["response_format"] == {"type": "json_object"}
    c.responses.create(model="gpt", input="prose", text={"format": {"type": "text"}})
    assert "response_format" not in up.requests[-1]


def test_input_parts_reasoning_and_null_tool_fields_as_the_upstream_sees_them(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    tool = {"type": "function", "name": "f", "description": None, "parameters": None}
    fmt = {"type": "json_schema", "name": "a", "schema": SCHEMA, "description": "A city."}
    body = {
        "model": "gpt",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                ],
            },
            # An earlier turn's reasoning, from a history made elsewhere: nothing to send.
            {"type": "reasoning", "id": "rs_1", "summary": []},
            # An earlier refusal is that turn's text.
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
            {"role": "user", "content": "again"},
        ],
        # Only the allowed tools are offered: the model cannot call one left out.
        "tools": [*WEATHER, tool],
        "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [tool]},
        "text": {"format": fmt},
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    sent = up.requests[-1]
    assert sent["messages"] == [
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "I can't."},
        {"role": "user", "content": "again"},
    ]
    assert sent["tool_choice"] == "required"
    assert [t["function"]["name"] for t in sent["tools"]] == ["f"]
    assert "description" not in sent["tools"][0]["function"]
    assert sent["response_format"]["json_schema"]["description"] == "A city."
    auto = {"type": "allowed_tools", "mode": "auto", "tools": [tool]}
    r = post(server, {**body, "tool_choice": auto})
    assert r.status_code == 200, r.text
    assert up.requests[-1]["tool_choice"] == "auto"
    assert [t["function"]["name"] for t in up.requests[-1]["tools"]] == ["f"]


def test_a_refusal_is_a_refusal_part_the_sdk_does_not_parse(server: LiveServer) -> None:
    # The upstream declines (OpenAI's `refusal`, content null): the answer's message holds
    # a `refusal` part, as the API's does, so `parse()` gives no parsed output instead of
    # failing to read the refusal as the schema.
    import pydantic

    class City(pydantic.BaseModel):
        city: str

    r = client(server).responses.parse(model="refusal", input="Which city?", text_format=City)
    # A refusal is a finished answer, as the API gives one: completed.
    assert r.status == "completed" and r.incomplete_details is None
    (part,) = r.output[0].content
    assert part.type == "refusal" and part.refusal
    assert r.output_parsed is None
    r = post(server, {"model": "refusal", "input": "hi"})
    openai.types.responses.Response.model_validate(r.json())
    # And as /openapi.json declares the answer (a generated client reads it so).
    from tests.test_ops import _validate

    _validate(httpx.get(server.url + "/openapi.json").json(), "post", "/v1/responses", r)


@pytest.mark.parametrize(
    ("model", "part"), [("refusal", ("refusal", REFUSAL)), ("filtered", ("output_text", FILTERED))]
)
def test_only_a_refusal_is_a_refusal_part(server: LiveServer, model: str, part: object) -> None:
    # A refusal (OpenAI's `refusal`) is no answer, a completed Response holding a
    # `refusal` part as the API gives one; text the upstream's content filter cut short
    # (content_filter after some content) is the answer as far as it went, `output_text`,
    # incomplete for content_filter.
    r = client(server).responses.create(model=model, input="hi")
    if model == "refusal":
        assert r.status == "completed" and r.incomplete_details is None
    else:
        assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter"
    [item] = r.output
    assert item.status == ("completed" if model == "refusal" else "incomplete")
    [content] = item.content
    text = content.refusal if content.type == "refusal" else content.text
    assert (content.type, text) == part
    assert r.output_text == (FILTERED if model == "filtered" else "")


def test_a_stream_a_content_filter_cut_short_holds_its_text(server: LiveServer) -> None:
    # Text the upstream's content filter cut short (content_filter, no `refusal`) is the
    # answer as far as it went: `output_text` as it comes, the stream ending incomplete
    # for content_filter, as chat completions streams it as `content`.
    events = validated_events(server, {"model": "filtered", "input": "hi"})
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == FILTERED
    assert not any(e.type.startswith("response.refusal.") for e in events)
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "content_filter"
    [item] = last.response.output
    assert [(c.type, c.text) for c in item.content] == [("output_text", FILTERED)]


def test_a_streamed_refusal_is_a_refusal_part_as_the_api_streams_one(server: LiveServer) -> None:
    # The upstream declines (OpenAI's `refusal`, in pieces): the stream says so as the API
    # does, a `refusal` part whose pieces are response.refusal.delta events, not
    # output_text, ended by response.completed holding the whole answer's Response.
    from tests.test_ops import _sse_events, _validate

    r = post(server, {"model": "refusal", "input": "hi", "stream": True})
    assert r.status_code == 200, r.text
    _validate(httpx.get(server.url + "/openapi.json").json(), "post", "/v1/responses", r)
    events = [(e["event"], json.loads(e["data"])) for e in _sse_events(r.text)]
    for name, data in events:
        assert data["type"] == name
        STREAM_EVENT.validate_python(data)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data for name, data in events if name == "response.refusal.delta"]
    assert deltas and "".join(d["delta"] for d in deltas) == REFUSAL
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.refusal.delta"] * len(deltas),
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    item_id = events[2][1]["item"]["id"]
    assert events[2][1]["item"]["content"] == []
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    assert events[3][1] == {
        "type": "response.content_part.added",
        "sequence_number": 3,
        **where,
        "part": {"type": "refusal", "refusal": ""},
    }
    for d in deltas:  # the API's fields, and no others (no `logprobs`, as output_text has)
        seq = d["sequence_number"]
        assert d == {"type": "response.refusal.delta", "sequence_number": seq, **where} | {
            "delta": d["delta"]
        }
    n = 4 + len(deltas)
    part = {"type": "refusal", "refusal": REFUSAL}
    assert events[n][1] == {
        "type": "response.refusal.done",
        "sequence_number": n,
        **where,
        "refusal": REFUSAL,
    }
    assert events[n + 1][1] == {
        "type": "response.content_part.done",
        "sequence_number": n + 1,
        **where,
        "part": part,
    }
    item = events[n + 2][1]["item"]
    assert item == {
        "type": "message",
        "id": item_id,
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    # The end is the whole answer's Response: completed, its message a `refusal` part.
    done = events[-1][1]["response"]
    whole = post(server, {"model": "refusal", "input": "hi"}).json()
    assert (whole["status"], whole["incomplete_details"]) == ("completed", None)
    assert [{**o, "id": ""} for o in whole["output"]] == [{**item, "id": ""}]
    assert done["output"] == [item]
    for key in ("status", "incomplete_details", "usage"):
        assert done[key] == whole[key], key
    # Both finished: each says when (two calls, so perhaps a second apart).
    assert abs(done["completed_at"] - whole["completed_at"]) <= 2


def test_the_sdk_s_stream_helper_leaves_a_refusal_unparsed(server: LiveServer) -> None:
    # `responses.stream(text_format=...)` parses each output_text as the schema: a refusal
    # read so failed. As the API streams one, the helper ends with nothing parsed and the
    # refusal in its part, as `parse()` gives it.
    class City(pydantic.BaseModel):
        city: str

    c = client(server)
    with c.responses.stream(model="refusal", input="Which city?", text_format=City) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(e.delta for e in events if e.type == "response.refusal.delta") == REFUSAL
    [done] = [e for e in events if e.type == "response.refusal.done"]
    assert done.refusal == REFUSAL
    assert not any(e.type.startswith("response.output_text.") for e in events)
    assert final.output_parsed is None and final.output_text == ""
    [item] = final.output
    [part] = item.content
    assert (part.type, part.refusal) == ("refusal", REFUSAL)
    assert (final.status, final.incomplete_details) == ("completed", None)


def test_a_refusal_after_text_is_a_refusal_part_after_it() -> None:
    # An upstream that refuses after some text: what went out as output_text ends as it
    # went, the refusal a part of its own after it in the same message.
    from stella.api.responses import ResponsesCodec
    from stella.api.responses_request import ResponsesRequest, echoed
    from stella.protocol import Delta, Done, Start, Usage

    said = [False]
    codec = ResponsesCodec(echoed(ResponsesRequest(model="m", input="x")), lambda: said[0])
    raw = codec.start(Start(id="r1", model="m", backend="b", created=1.0))
    raw += codec.encode(Delta(text="Sure: "))
    said[0] = True
    raw += codec.encode(Delta(text="I'm "))
    raw += codec.encode(Delta(text="sorry."))
    raw += codec.encode(Done(finish_reason="content_filter", usage=Usage(1, 3, 4)))
    events = [
        STREAM_EVENT.validate_python(json.loads(line[len(b"data: ") :]))
        for line in raw.split(b"\n")
        if line.startswith(b"data: ")
    ]
    assert [(e.type, getattr(e, "content_index", None)) for e in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", None),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.content_part.added", 1),
        ("response.refusal.delta", 1),
        ("response.refusal.delta", 1),
        ("response.refusal.done", 1),
        ("response.content_part.done", 1),
        ("response.output_item.done", None),
        ("response.completed", None),
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[7].part.type == "refusal" and events[10].refusal == "I'm sorry."
    final = events[-1].response
    assert (final.status, final.incomplete_details) == ("completed", None)
    [item] = final.output
    assert item.status == "completed"
    assert [c.model_dump() for c in item.content] == [
        {"type": "output_text", "text": "Sure: ", "annotations": [], "logprobs": None},
        {"type": "refusal", "refusal": "I'm sorry."},
    ]


def test_sampling_and_the_token_limit(stack: tuple[LiveServer, FakeOpenAI]) -> None:
    server, up = stack
    c = client(server)
    c.responses.create(
        model="gpt", input="hi", temperature=0.5, top_p=0.9, max_output_tokens=7, store=False
    )
    sent = up.requests[-1]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"]) == (0.5, 0.9, 7)
    r = c.responses.create(model="echo", input="a b c d e", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "a b" and r.output[0].status == "incomplete"
    events = list(
        c.responses.create(model="echo", input="a b c d e", max_output_tokens=2, stream=True)
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(model="echo", input="x", max_output_tokens=0)
    assert info.value.param == "max_output_tokens"


def test_fields_taken_and_not_applied_pass(server: LiveServer) -> None:
    r = client(server).responses.create(
        model="echo",
        input="a b",
        store=True,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "low"},
        truncation="auto",
        metadata={"ticket": "42"},
        user="u-1",
        extra_body={"some_future_field": 1},
    )
    assert r.output_text == "a b" and r.metadata == {"ticket": "42"}
    rid = r.id.removeprefix("resp_")
    ev = server.wait_event(lambda e: e["request_id"] == rid)
    assert ev["metadata"] == {"ticket": "42", "user": "u-1"}


def test_a_response_echoes_what_it_was_asked_and_stores_nothing(server: LiveServer) -> None:
    c = client(server)
    for stream in (False, True):
        body = {
            "model": "echo",
            "input": "a b",
            "store": True,
            "truncation": "auto",
            "parallel_tool_calls": False,
            "tools": WEATHER,
            "tool_choice": "none",
            # As Codex CLI sends them.
            "reasoning": {"effort": "medium"},
            "text": {"verbosity": "low"},
            "prompt_cache_key": "session-1",
        }
        if stream:
            r = validated_events(server, body)[-1].response
        else:
            r = Response.model_validate(post(server, body).json())
        assert r.status == "completed" and r.completed_at is not None
        assert r.completed_at >= r.created_at
        # Stored nothing, whatever was asked; the rest as sent.
        assert (r.store, r.truncation, r.parallel_tool_calls) == (False, "auto", False)
        assert r.reasoning is not None
        assert r.reasoning.model_dump(exclude_unset=True) == {"effort": "medium", "summary": None}
        assert r.text is not None and (r.text.verbosity, r.prompt_cache_key) == ("low", "session-1")
    r = c.responses.create(model="echo", input="a b")
    assert (r.store, r.truncation, r.parallel_tool_calls) == (False, "disabled", True)
    assert (r.reasoning, r.prompt_cache_key) == (None, None)
    assert r.text is not None and r.text.verbosity is None
    # Not completed: no completion time.
    r = c.responses.create(model="echo", input="a b c d e", max_output_tokens=2)
    assert r.status == "incomplete" and r.completed_at is None
    events = list(c.responses.create(model="echo", input="a b c", stream=True))
    assert events[0].response.completed_at is None and events[-1].response.completed_at


def test_cached_prompt_tokens_are_the_backend_s_count(server: LiveServer) -> None:
    c = client(server)
    r = c.responses.create(model="cached", input="hi")
    assert r.usage is not None and r.usage.input_tokens_details.cached_tokens == CACHED
    events = list(c.responses.create(model="cached", input="hi", stream=True))
    usage = events[-1].response.usage
    assert usage is not None and usage.input_tokens_details.cached_tokens == CACHED


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"background": True}, "background"),
        # A built-in tool is left out (tests/test_dialect_responses_tools.py); forced, a 400.
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "web_searhc"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [*WEATHER, {"type": "function", "name": "x" * 65}]}, "tools[1].name"),
        ({"tools": [{"type": "function", "name": "f", "parameters": []}]}, "tools[0].parameters"),
        (
            {
                "tools": [*WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}],
                "tool_choice": {"type": "file_search"},
            },
            "tool_choice.type",
        ),
        ({"tool_choice": {"type": "web_search_preview"}, "tools": WEATHER}, "tool_choice.type"),
        # allowed_tools as on chat completions: a tool not among `tools` is named.
        (
            {
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "required",
                    "tools": [{"type": "function", "name": "get_time"}],
                },
                "tools": WEATHER,
            },
            "tool_choice.tools[0].name",
        ),
        (
            {
                "tool_choice": {"type": "allowed_tools", "tools": [WEATHER[0]]},
                "tools": WEATHER,
            },
            "tool_choice.mode",
        ),
        (
            # An image by a URL that is neither data: nor http(s); one by a stored file.
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "look"},
                    {"role": "user", "content": [{"type": "input_file", "file_id": "f"}]},
                ]
            },
            "input[1].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        # A refusal is an assistant's part: a user does not refuse.
        (
            {"input": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
            "input[0].content[0].type",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "Paris"},
                    {"type": "function_call", "call_id": "c1", "arguments": "{}"},
                ]
            },
            "input[1].name",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}, "tools": WEATHER}, "tool_choice.name"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"top_logprobs": 2}, "top_logprobs"),
        # Instructions or system messages alone are no conversation.
        ({"instructions": "Be brief.", "input": None}, "input"),
        ({"input": [{"role": "system", "content": "Be brief."}]}, "input"),
        ({"input": []}, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format.name"),
        ({"metadata": {"n": 1}}, "metadata"),
        ({"metadata": {"k": None}}, "metadata"),
        ({"metadata": {"k": {"nested": "v"}}}, "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"input": [{"type": "message", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"content": "hi"}]}, "input[0].type"),
        # An output answering no call before it, as the API refuses it.
        ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "o"}]}, "input"),
        (
            {
                "input": [
                    {"role": "user", "content": "Paris"},
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c2", "output": "o"},
                ]
            },
            "input",
        ),
    ],
)
def test_what_stella_cannot_honour_is_a_400_naming_the_field(
    server: LiveServer, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "echo", "input": "x", **extra}
    r = httpx.post(
        server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), r.text


@pytest.mark.parametrize(
    ("item", "said"),
    [
        (
            {"type": "message", "content": "hi"},
            "$.input[0].role: missing (user, assistant, system or developer)",
        ),
        ({"content": "hi"}, "$.input[0].type: missing (and no role:"),
        (
            {"type": "function_call_output", "call_id": "c9", "output": "o"},
            "$.input[0].call_id: no function_call item before it has call_id 'c9'",
        ),
        (
            {"type": "item_reference", "id": "msg_1"},
            "$.input[0].type: 'item_reference' refers to a stored item; stella keeps none: "
            "send the item itself (the AI SDK's OpenAI provider does so when its "
            "providerOptions say openai.store: false)",
        ),
    ],
)
def test_what_is_missing_is_said_missing(
    server: LiveServer, item: dict[str, Any], said: str
) -> None:
    r = post(server, {"model": "echo", "input": [item]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(said), r.text
    assert "None" not in r.json()["error"]["message"]


def test_a_text_item_between_a_turn_s_function_calls_keeps_their_outputs_answering(
    server: LiveServer,
) -> None:
    # The text item starts an assistant message of its own: the outputs of the first
    # call read as answering no call, a 400, though the input is the API's.
    def call(call_id: str) -> dict[str, Any]:
        return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}"}

    def output(call_id: str) -> dict[str, Any]:
        return {"type": "function_call_output", "call_id": call_id, "output": "o"}

    text = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "thinking"}],
    }
    body = {
        "model": "echo",
        "input": [
            {"role": "user", "content": "hi"},
            call("a"),
            text,
            call("b"),
            output("a"),
            output("b"),
        ],
    }
    r = post(server, body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("choice", "said"),
    [
        ("sometimes", "$.tool_choice: 'sometimes' is not auto, none or required"),
        ([], "$.tool_choice: expected a string or an object"),
        (5, "$.tool_choice: expected a string or an object"),
        (
            {"type": "allowed_tools", "mode": "required", "tools": []},
            "$.tool_choice: allowed_tools with mode required, and no tools",
        ),
    ],
)
def test_a_tool_choice_stella_cannot_read_is_said_as_sent(
    server: LiveServer, choice: Any, said: str
) -> None:
    r = post(server, {"model": "echo", "input": "hi", "tool_choice": choice})
    assert r.status_code == 400 and r.json()["error"]["message"] == said, r.text
    assert r.json()["error"]["param"] == "tool_choice"


def test_a_function_tool_choice_without_a_name_is_said_required(server: LiveServer) -> None:
    body = {"model": "echo", "input": "hi", "tools": WEATHER, "tool_choice": {"type": "function"}}
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["message"], error["param"]) == (
        "$.tool_choice.name: required",
        "tool_choice.name",
    )


def test_an_output_for_no_call_never_reaches_the_upstream(
    stack: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, up = stack
    sent = len(up.requests)
    item = {"type": "function_call_output", "call_id": "call_gone", "output": "sunny"}
    with pytest.raises(openai.BadRequestError) as info:
        client(server).responses.create(
            model="gpt", input=[{"role": "user", "content": "Paris?"}, item], tools=WEATHER
        )
    assert info.value.param == "input" and "call_gone" in info.value.message
    assert len(up.requests) == sent


def test_metadata_at_the_api_s_bounds_is_repeated_as_sent(server: LiveServer) -> None:
    metadata = {"k" * 64: "v" * 512, **{f"k{i}": "" for i in range(15)}}
    r = post(server, {"model": "echo", "input": "x", "metadata": metadata})
    assert r.status_code == 200, r.text
    assert Response.model_validate(r.json()).metadata == metadata


def test_metadata_at_the_api_s_bounds_passes_whatever_its_characters(
    server: LiveServer,
) -> None:
    # The API counts characters: CJK (3 bytes of JSON each), quotes (2) and control
    # characters (6) at its bounds are no 400, with a `user` at its bound beside them.
    user = "\x01" * 512
    for char in ("日", '"', "\x01"):
        metadata = {f"{char * 61}{i:03}": char * 512 for i in range(16)}
        r = post(server, {"model": "echo", "input": "x", "metadata": metadata, "user": user})
        assert r.status_code == 200, r.text[:300]
        assert Response.model_validate(r.json()).metadata == metadata
        rid = r.json()["id"].removeprefix("resp_")
        ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
        assert ev["metadata"] == {**metadata, "user": user}


def test_user_is_bounded_and_named_on_its_own(server: LiveServer) -> None:
    # `user` joins the metadata in the log: a long one is a 400 naming `user`, though
    # the client sent no metadata.
    for user in ("u" * 513, "u" * 20_000):
        r = post(server, {"model": "echo", "input": "hi", "user": user})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["param"], error["message"]) == ("user", "$.user: over 512 characters")
    r = post(server, {"model": "echo", "input": "hi", "user": "日" * 512})
    assert r.status_code == 200, r.text


def test_a_refusal_reaches_the_sdk_as_bad_request(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).responses.create(model="echo", input="x", previous_response_id="resp_1")
    assert info.value.param == "previous_response_id"


def test_errors_map_to_the_client_exceptions(server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").responses.create(model="echo", input="x")
    with pytest.raises(openai.NotFoundError) as nf:
        client(server).responses.create(model="gpt-17", input="x")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # a stream's refusal too, before its start
        client(server).responses.create(model="gpt-17", input="x", stream=True)
    client(server).responses.create(model="once", input="x")
    with pytest.raises(openai.RateLimitError) as info:
        client(server).responses.create(model="once", input="x")
    assert info.value.response.headers["retry-after"]
    assert info.value.code == "rate_limit_exceeded"


def test_a_failure_mid_stream_is_response_failed(server: LiveServer) -> None:
    events = list(client(server).responses.create(model="echo-fail", input="a b c d", stream=True))
    last = events[-1]
    assert last.type == "response.failed", [e.type for e in events]
    assert last.response.status == "failed"
    # The API's code (the SDK takes no other); stella's own leads the message.
    assert last.response.error.code == "server_error"
    assert last.response.error.message.startswith("upstream_error: ")
    assert "failing after 2 tokens" in last.response.error.message
    # What came before the failure, as far as it went.
    assert [(o.type, o.status, o.content[0].text) for o in last.response.output] == [
        ("message", "incomplete", "a b")
    ]
    assert not any(e.type == "response.completed" for e in events)
    _types_in_order(events)


def test_a_failed_response_validates_as_the_sdk_s_event(server: LiveServer) -> None:
    [*_, last] = validated_events(server, {"model": "echo-fail", "input": "a b c d"})
    assert last.type == "response.failed" and last.response.error.code == "server_error"


@pytest.mark.parametrize(
    ("code", "api_code"),
    [
        ("upstream_error", "server_error"),
        ("upstream_timeout", "server_error"),
        ("overloaded", "server_error"),
        ("unavailable", "server_error"),
        ("shutting_down", "server_error"),
        ("internal_error", "server_error"),
        ("rate_limited", "rate_limit_exceeded"),
        ("upstream_rate_limited", "rate_limit_exceeded"),
        ("context_length_exceeded", "invalid_prompt"),
        ("invalid_request", "invalid_prompt"),
        ("upstream_rejected", "invalid_prompt"),
    ],
)
def test_every_code_of_a_failure_is_one_the_sdk_takes(code: str, api_code: str) -> None:
    from stella.api.responses import ResponsesCodec
    from stella.api.responses_request import ResponsesRequest, echoed
    from stella.protocol import Error, Start

    codec = ResponsesCodec(echoed(ResponsesRequest(model="m", input="x")))
    codec.start(Start(id="r1", model="m", backend="b", created=1.0))
    raw = codec.encode(Error(code=code, message="it broke"))
    data = json.loads(raw.split(b"data: ", 1)[1])
    event = ResponseFailedEvent.model_validate(data)
    assert (event.response.error.code, event.response.error.message) == (
        api_code,
        f"{code}: it broke",
    )


async def test_leaving_the_stream_cancels_the_backend_and_logs_once(server: LiveServer) -> None:
    body = {"model": "echo-slow", "stream": True, "input": " ".join(["w"] * 100)}
    async with httpx.AsyncClient(timeout=10) as c:
        async with c.stream(
            "POST",
            server.url + "/v1/responses",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data:") and "output_text.delta" in line
                if n == 3:
                    break
    ev = await asyncio.to_thread(server.wait_event, lambda e: e["request_id"] == rid)
    assert ev["api"] == "responses" and ev["finish_reason"] == "client_closed"
    assert ev["completion_tokens"] < 50
    time.sleep(0.2)
    assert len([e for e in server.events("inference") if e["request_id"] == rid]) == 1


def test_openapi_lists_the_route(server: LiveServer) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    op = spec["paths"]["/v1/responses"]["post"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert "application/json" in op["responses"]["200"]["content"]
    assert op["tags"] == ["openai"]
