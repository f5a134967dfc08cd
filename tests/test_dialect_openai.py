"""The OpenAI dialect, driven by the official openai client against a live stella."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pydantic
import pytest

from tests.fakes.openai import FILTERED, REFUSAL, FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

KEY = "sk-openai-dialect-1"
CONFIG = {
    "backends": {"slow": {"kind": "echo", "delay_s": 0.05}},
    "models": {"routes": {"echo-slow": {"backend": "slow"}}},
    "limits": {"models": {"echo-slow": {"requests_per_minute": 1000}}},
}
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with run_stella(CONFIG, {"STELLA_API_KEYS": f"tester={KEY}"}) as s:
        yield s


def client(server: LiveServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_non_stream(server: LiveServer) -> None:
    r = client(server).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}]
    )
    assert r.choices[0].message.content == "hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 2
    assert r.id.startswith("chatcmpl-")


def test_stream_with_usage(server: LiveServer) -> None:
    stream = client(server).chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6


def test_line_separators_reach_the_sdk_whole(server: LiveServer) -> None:
    # They go escaped inside each event's JSON (tests/test_native_stream.py checks the
    # bytes); the SDK's decoding gives the text back as it was.
    text = "a\u2028b c\u2029d e\x85f"
    c = client(server)
    stream = c.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text
    stream = c.completions.create(model="echo", prompt=text, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == text


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def _sse_chunks(server: LiveServer, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed answer, [DONE] left out."""
    with httpx.stream(
        "POST",
        server.url + path,
        json={"model": "echo", "stream": True, **body},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        return [
            json.loads(line[6:], object_pairs_hook=_no_repeated_keys)
            for line in r.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]


def test_with_include_usage_every_chunk_before_the_usage_one_has_usage_null(
    server: LiveServer,
) -> None:
    # As OpenAI documents stream_options.include_usage: every chunk but the last
    # carries "usage": null; without the option no chunk has the field.
    chat = {"messages": [{"role": "user", "content": "a b"}]}
    tool = {**chat, "tools": WEATHER, "tool_choice": "required"}
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", tool),
        ("/v1/completions", {"prompt": "a b"}),
    ):
        chunks = _sse_chunks(server, path, {**body, "stream_options": {"include_usage": True}})
        assert len(chunks) >= 3, chunks
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), (path, chunks)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        plain = _sse_chunks(server, path, body)
        assert all("usage" not in c for c in plain), (path, plain)


def test_usage_says_the_cached_prompt_tokens_when_the_backend_counted_them() -> None:
    # As OpenAI's usage has it: prompt_tokens_details.cached_tokens, in the answer and in
    # the last chunk of a stream with include_usage; left out (not 0) when unknown.
    from tests.fakes.openai import CACHED, stella_counting_cache

    with stella_counting_cache({"STELLA_API_KEYS": f"tester={KEY}"}) as server:
        c = client(server)
        msgs = [{"role": "user", "content": "hi"}]
        r = c.chat.completions.create(model="cached", messages=msgs)
        assert r.usage is not None and r.usage.prompt_tokens == 3
        assert r.usage.prompt_tokens_details is not None
        assert r.usage.prompt_tokens_details.cached_tokens == CACHED
        ask = {"messages": msgs, "stream_options": {"include_usage": True}}
        last = _sse_chunks(server, "/v1/chat/completions", {**ask, "model": "cached"})[-1]
        assert last["choices"] == []
        assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}
        ev = server.wait_event(lambda e: e["model"] == "cached" and e["stream"])
        assert ev["cached_tokens"] == CACHED
        # The native API's usage has the same shape.
        native = httpx.post(
            server.url + "/api/v1/chat",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "cached", "stream": False, "messages": msgs},
        ).json()["usage"]
        assert native["prompt_tokens_details"] == {"cached_tokens": CACHED}
        # An upstream that gave no count: no claim of none cached.
        for body in (
            {"model": "plain", "messages": msgs, "stream": False},
            {**ask, "model": "plain"},
        ):
            if body.get("stream") is False:
                usage = httpx.post(
                    server.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {KEY}"},
                    json=body,
                ).json()["usage"]
            else:
                usage = _sse_chunks(server, "/v1/chat/completions", body)[-1]["usage"]
            assert usage["prompt_tokens"] == 3 and "prompt_tokens_details" not in usage


async def test_async_client_stream_and_not(server: LiveServer) -> None:
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    r = await c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}])
    assert r.choices[0].message.content == "a b"
    stream = await c.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "x y z"}], stream=True
    )
    parts = [ch.choices[0].delta.content async for ch in stream if ch.choices]
    assert "".join(p or "" for p in parts) == "x y z"
    await c.close()


def test_tool_calls_both_ways(server: LiveServer) -> None:
    c = client(server)
    msgs = [{"role": "user", "content": "Paris"}]
    r = c.chat.completions.create(model="echo", messages=msgs, tools=WEATHER)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "input": "Paris"
    }
    stream = list(
        c.chat.completions.create(model="echo", messages=msgs, tools=WEATHER, stream=True)
    )
    deltas = [
        ch.choices[0].delta.tool_calls
        for ch in stream
        if ch.choices and ch.choices[0].delta.tool_calls
    ]
    assert deltas and deltas[0][0].function.name == "get_weather"
    # The tool's result goes back; echo answers with it.
    follow = [
        *msgs,
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    r2 = c.chat.completions.create(model="echo", messages=follow, tools=WEATHER)
    assert r2.choices[0].message.content == "sunny, 21C"
    # Each call has an id of its own, a later turn's too: Anthropic's API refuses a
    # history whose tool_use ids repeat.
    again = [*follow, r2.choices[0].message.model_dump(exclude_none=True), *msgs]
    r3 = c.chat.completions.create(model="echo", messages=again, tools=WEATHER)
    later = r3.choices[0].message.tool_calls[0].id
    assert re.fullmatch("call_[0-9a-f]{24}", call.id) and later != call.id, (call.id, later)


def test_sdk_strict_tools_are_accepted(server: LiveServer) -> None:
    # The SDK's pydantic helper sends `strict: true` (and the schema it implies).
    class GetWeather(pydantic.BaseModel):
        city: str

    tool = openai.pydantic_function_tool(GetWeather)
    assert tool["function"]["strict"] is True
    r = client(server).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "Paris"}], tools=[tool]
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "GetWeather"


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": []}]},
            "messages[0].content",
        ),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "suffix": "}"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "x", "best_of": 0}, "best_of"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
            "functions",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "function_call": "auto"},
            "function_call",
        ),
    ],
)
def test_what_stella_cannot_honour_is_a_400(
    server: LiveServer, path: str, extra: dict[str, object], param: str
) -> None:
    r = httpx.post(
        server.url + path,
        json={"model": "echo", **extra},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(
    ("fmt", "param", "said"),
    [
        ({"type": "xml"}, "response_format.type", "'xml' is not text"),
        ({"type": "JSON"}, "response_format.type", "'JSON' is not text"),
        ({}, "response_format.type", "required"),
        ({"type": "json_schema"}, "response_format.json_schema", "required for json_schema"),
    ],
)
def test_a_response_format_of_a_type_no_api_knows_is_a_400(
    server: LiveServer, fmt: dict[str, object], param: str, said: str
) -> None:
    # OpenAI refuses it: passed on, an upstream would refuse it, or echo answer in prose.
    msgs = [{"role": "user", "content": "x"}]
    for path in ("/v1/chat/completions", "/api/v1/chat"):
        r = httpx.post(
            server.url + path,
            json={"model": "echo", "stream": False, "messages": msgs, "response_format": fmt},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"].startswith(f"$.{param}: {said}"), error
        if path.startswith("/v1/"):
            assert error["param"] == param and error["type"] == "invalid_request_error"
    for fmt in ({"type": "text"}, {"type": "json_object"}):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "echo", "messages": msgs, "response_format": fmt},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("n", [0, 2, -1])
def test_n_other_than_1_is_a_400_saying_only_1_is_taken(server: LiveServer, n: int) -> None:
    # A 0 is not "more than one": the message names the value sent and the one taken.
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"prompt": "x"}),
    ):
        r = httpx.post(
            server.url + path,
            json={"model": "echo", "n": n, **body},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "n"
        assert r.json()["error"]["message"] == (
            f"$.n: {n} is not supported; only 1 (one choice per request)"
        )


def test_legacy_function_fields_that_ask_for_nothing_pass(server: LiveServer) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b"}]}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={**body, "functions": [], "function_call": "none"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 200, r.text


def test_nullable_n_and_stream(server: LiveServer) -> None:
    # The API reference has both nullable; some clients send the nulls.
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b"}]}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={**body, "n": None, "stream": None},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    message = r.json()["choices"][0]["message"]
    assert r.status_code == 200 and message["content"] == "a b"
    # Always there, null, as the API sends it (the SDKs' types have it required).
    assert "refusal" in message and message["refusal"] is None


def test_penalties_and_logit_bias_are_read_and_checked(server: LiveServer) -> None:
    # The echo backend ignores sampling: here, what the SDK sends is accepted as it sends
    # it, and a value out of OpenAI's ranges is the client's error, naming its field.
    c = client(server)
    msgs = [{"role": "user", "content": "a b"}]
    sampling = {"presence_penalty": 1.5, "frequency_penalty": -2.0}
    r = c.chat.completions.create(
        model="echo", messages=msgs, logit_bias={"50256": -100}, **sampling
    )
    assert r.choices[0].message.content == "a b"
    r2 = c.completions.create(model="echo", prompt="a b", logit_bias={"0": 100}, **sampling)
    assert r2.choices[0].text == "a b"
    for bad, param in (
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"token": 1}}, "logit_bias"),
        ({"logit_bias": {"1": -101}}, "logit_bias[...]"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="echo", messages=msgs, **bad)  # type: ignore[arg-type]
        assert info.value.param == param, info.value


def test_tool_choice(server: LiveServer) -> None:
    c = client(server)
    msgs = [{"role": "user", "content": "Paris"}]
    other = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    r = c.chat.completions.create(model="echo", messages=msgs, tools=WEATHER, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == "Paris"
    named = {"type": "function", "function": {"name": "get_time"}}
    r = c.chat.completions.create(
        model="echo", messages=msgs, tools=[*WEATHER, other], tool_choice=named
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    # allowed_tools listing none: no tool may be called, as "none".
    none = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}
    r = c.chat.completions.create(
        model="echo",
        messages=msgs,
        tools=WEATHER,
        tool_choice=none,  # type: ignore[arg-type]
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == "Paris"
    r = c.chat.completions.create(model="echo", messages=msgs, tools=[], tool_choice="auto")
    assert r.choices[0].message.content == "Paris"
    with pytest.raises(openai.BadRequestError, match="no tool named 'nope'"):
        c.chat.completions.create(
            model="echo",
            messages=msgs,
            tools=WEATHER,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def _allowed(mode: str, *names: str) -> dict[str, object]:
    tools = [{"type": "function", "function": {"name": n}} for n in names]
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}}


@pytest.mark.parametrize(
    ("choice", "said", "param"),
    [
        # Anthropic's shape, sent to the wrong API: taken as auto, the model would be free
        # not to call the tool the client forces.
        (
            {"type": "tool", "name": "get_weather"},
            "$.tool_choice.type: 'tool' is not supported",
            "tool_choice.type",
        ),
        ({"type": "custom", "custom": {"name": "x"}}, "$.tool_choice.type", "tool_choice.type"),
        ({"name": "get_weather"}, "$.tool_choice.type: None", "tool_choice.type"),
        (5, "$.tool_choice: expected a string or an object", "tool_choice"),
        (
            {"type": "allowed_tools", "allowed_tools": ["get_weather"]},
            "$.tool_choice.allowed_tools: expected an object",
            "tool_choice.allowed_tools",
        ),
        (
            _allowed("sometimes", "get_weather"),
            "$.tool_choice.allowed_tools.mode: expected auto or required, got 'sometimes'",
            "tool_choice.allowed_tools.mode",
        ),
        (
            _allowed("required", "get_weather", "get_time"),
            "$.tool_choice.allowed_tools.tools[1].function.name: no tool named 'get_time'",
            "tool_choice.allowed_tools.tools[1].function.name",
        ),
        (
            {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{}]}},
            "$.tool_choice.allowed_tools.tools[0].function.name: required",
            "tool_choice.allowed_tools.tools[0].function.name",
        ),
        (
            _allowed("required"),
            "$.tool_choice: allowed_tools with mode required, and no tools",
            "tool_choice",
        ),
    ],
)
def test_a_tool_choice_stella_cannot_honour_is_a_400_naming_it(
    server: LiveServer, choice: object, said: str, param: str
) -> None:
    msgs = [{"role": "user", "content": "Paris"}]
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(
            model="echo",
            messages=msgs,
            tools=WEATHER,
            tool_choice=choice,  # type: ignore[arg-type]
        )
    assert info.value.body["message"].startswith(said), info.value.body  # type: ignore[index]
    assert info.value.param == param


def test_allowed_tools_sends_only_those_tools_with_its_mode(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # A tool the client left out is not offered: the model cannot call it.
    server, up = fake_upstream
    other = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    msgs = [{"role": "user", "content": "Paris"}]
    for mode in ("required", "auto"):
        client(server).chat.completions.create(
            model="plain",
            messages=msgs,
            tools=[*WEATHER, other],
            tool_choice=_allowed(mode, "get_time"),  # type: ignore[arg-type]
        )
        sent = up.requests[-1]
        assert [t["function"]["name"] for t in sent["tools"]] == ["get_time"]
        assert sent["tool_choice"] == mode


def test_errors_map_to_the_client_exceptions(server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError) as nf:
        client(server).chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": "x"}]
        )
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).chat.completions.create(
            model="echo", n=2, messages=[{"role": "user", "content": "x"}]
        )
    assert bad.value.param == "n"


def test_metadata_within_the_api_s_bounds_passes_whatever_its_characters(
    server: LiveServer,
) -> None:
    # OpenAI bounds metadata by characters (16 keys of 64, values of 512): CJK (3 bytes
    # of JSON each), quotes (2) and control characters (6) at those bounds, with a
    # `user` at its own, pass and are the inference log's metadata.
    c = client(server)
    user = "\x01" * 512
    for char in ("日", '"', "\x01"):
        metadata = {f"{char * 61}{i:03}": char * 512 for i in range(16)}
        for raw in (
            c.chat.completions.with_raw_response.create(
                model="echo",
                messages=[{"role": "user", "content": "x"}],
                metadata=metadata,
                user=user,
            ),
            c.completions.with_raw_response.create(
                model="echo", prompt="x", extra_body={"metadata": metadata}, user=user
            ),
        ):
            rid = raw.headers["x-request-id"]
            ev = server.wait_event(lambda e, rid=rid: e["request_id"] == rid)
            assert ev["metadata"] == {**metadata, "user": user}


def test_user_is_bounded_and_named_on_its_own(server: LiveServer) -> None:
    # `user` joins the metadata in the log: a long one is a 400 naming `user`, though
    # the client sent no metadata.
    auth = {"Authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "x"}]
    for user in ("u" * 513, "u" * 20_000):
        for path, body in (
            ("/v1/chat/completions", {"messages": msgs}),
            ("/v1/completions", {"prompt": "x"}),
        ):
            body = {"model": "echo", "user": user, **body}
            r = httpx.post(server.url + path, json=body, headers=auth)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["param"], error["message"]) == ("user", "$.user: over 512 characters")
    r = client(server).chat.completions.create(model="echo", messages=msgs, user="日" * 512)
    assert r.choices[0].message.content == "x"


def test_rate_limit_error() -> None:
    config = {"limits": {"models": {"echo": {"requests_per_minute": 1}}}}
    with run_stella(config) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
        assert info.value.response.headers["retry-after"]


def test_completions_and_models(server: LiveServer) -> None:
    c = client(server)
    r = c.completions.create(model="echo", prompt="say this")
    assert r.choices[0].text == "say this"
    parts = [
        ch.choices[0].text for ch in c.completions.create(model="echo", prompt="a b c", stream=True)
    ]
    assert "".join(parts) == "a b c"
    ids = {m.id for m in c.models.list()}
    assert {"echo", "echo-slow"} <= ids
    assert c.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


async def test_disconnect_cancels_and_logs_openai(server: LiveServer) -> None:
    body = {
        "model": "echo-slow",
        "stream": True,
        "messages": [{"role": "user", "content": " ".join(["w"] * 100)}],
    }
    async with httpx.AsyncClient(timeout=10) as c:
        async with c.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as r:
            rid = r.headers["x-request-id"]
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data:")
                if n == 4:
                    break
    ev = await asyncio.to_thread(server.wait_event, lambda e: e["request_id"] == rid)
    assert ev["api"] == "openai" and ev["finish_reason"] == "client_closed"
    assert ev["completion_tokens"] < 50
    time.sleep(0.1)
    assert len([e for e in server.events("inference") if e["request_id"] == rid]) == 1


def test_parallel_tool_calls_false_reaches_the_upstream_or_keeps_one_call() -> None:
    from tests.fakes.ollama import FakeOllama
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    up, box = FakeOpenAI(), FakeOllama()
    with serve(up.app) as up_url, serve(box.app, "/api/version") as box_url:
        config = {
            "backends": {
                "up": {"kind": "openai", "base_url": up_url + "/v1"},
                "box": {"kind": "ollama", "base_url": box_url},
            },
            "models": {
                "routes": {
                    "gpt": {"backend": "up", "upstream_model": "two-tools", "retries": 0},
                    "llama": {"backend": "box", "upstream_model": "two-tools", "retries": 0},
                }
            },
        }
        with run_stella(config, {"STELLA_API_KEYS": f"tester={KEY}"}) as server:
            c = client(server)
            msgs = [{"role": "user", "content": "Paris and Oslo?"}]

            def calls(model: str, stream: bool, **kw: object) -> list[str]:
                if not stream:
                    r = c.chat.completions.create(model=model, messages=msgs, tools=WEATHER, **kw)
                    return [t.function.arguments for t in r.choices[0].message.tool_calls or ()]
                chunks = c.chat.completions.create(
                    model=model, messages=msgs, tools=WEATHER, stream=True, **kw
                )
                return [
                    t.function.arguments
                    for ch in chunks
                    if ch.choices
                    for t in ch.choices[0].delta.tool_calls or ()
                ]

            for stream in (False, True):
                # The OpenAI upstream is told, and answers with one call.
                assert len(calls("gpt", stream)) == 2
                assert "parallel_tool_calls" not in up.requests[-1]
                assert len(calls("gpt", stream, parallel_tool_calls=False)) == 1
                assert up.requests[-1]["parallel_tool_calls"] is False
                # Ollama can't be told: the first of its calls alone reaches the client.
                assert len(calls("llama", stream)) == 2
                one = calls("llama", stream, parallel_tool_calls=False)
                assert [json.loads(a) for a in one] == [{"city": "Toronto"}]


@pytest.mark.parametrize("model", ["bad-args", "list-args"])
def test_arguments_that_are_no_json_object_pass_through_as_the_model_wrote_them(
    model: str,
) -> None:
    from tests.fakes.openai import BAD_ARGS, LIST_ARGS, FakeOpenAI
    from tests.fakes.server import serve

    written = BAD_ARGS if model == "bad-args" else LIST_ARGS
    up = FakeOpenAI()
    with serve(up.app) as up_url:
        config = {
            "backends": {"up": {"kind": "openai", "base_url": up_url + "/v1"}},
            "models": {"routes": {"gpt": {"backend": "up", "upstream_model": model}}},
        }
        with run_stella(config, {"STELLA_API_KEYS": f"tester={KEY}"}) as server:
            c = client(server)
            msgs = [{"role": "user", "content": "Paris?"}]
            r = c.chat.completions.create(model="gpt", messages=msgs, tools=WEATHER)
            call = r.choices[0].message.tool_calls[0]
            # As the API: the model's string, for the client to validate.
            assert call.function.arguments == written
            chunks = c.chat.completions.create(
                model="gpt", messages=msgs, tools=WEATHER, stream=True
            )
            parts = [
                t.function.arguments
                for ch in chunks
                if ch.choices
                for t in ch.choices[0].delta.tool_calls or ()
            ]
            assert "".join(p or "" for p in parts) == written
            # Sent back in the history, it reaches the upstream as written.
            follow = [
                *msgs,
                r.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "not valid JSON"},
            ]
            c.chat.completions.create(model="gpt", messages=follow, tools=WEATHER)
            sent = up.requests[-1]["messages"][1]["tool_calls"][0]["function"]["arguments"]
            assert sent == written
            # The native API keeps an object in `arguments`, the text beside it.
            native = httpx.post(
                server.url + "/api/v1/chat",
                headers={"Authorization": f"Bearer {KEY}"},
                json={
                    "model": "gpt",
                    "stream": False,
                    "messages": msgs,
                    "tools": [{"function": {"name": "get_weather"}}],
                },
            ).json()["message"]["tool_calls"][0]["function"]
            wrapped = {"_raw": written} if model == "bad-args" else {"value": ["Paris", "Oslo"]}
            assert native == {
                "name": "get_weather",
                "arguments": wrapped,
                "raw_arguments": written,
            }


@pytest.fixture(scope="module")
def tool_server() -> Iterator[LiveServer]:
    """A stella whose routes lead to the fake OpenAI upstream's tool-call shapes."""
    from tests.fakes.openai import TOOL_MODELS, FakeOpenAI
    from tests.fakes.server import serve

    up = FakeOpenAI()
    with serve(up.app) as up_url:
        routes = {m: {"backend": "up", "upstream_model": m, "retries": 0} for m in TOOL_MODELS}
        config = {
            "backends": {"up": {"kind": "openai", "base_url": up_url + "/v1"}},
            "models": {"routes": routes},
        }
        with run_stella(config, {"STELLA_API_KEYS": f"tester={KEY}"}) as server:
            yield server


def _tool_answer(server: LiveServer, model: str, stream: bool) -> tuple[str | None, list]:
    """The finish reason and the calls (id, name, arguments) as an SDK user reads them."""
    c = client(server)
    msgs = [{"role": "user", "content": "Paris and Oslo?"}]
    if not stream:
        r = c.chat.completions.create(model=model, messages=msgs, tools=WEATHER)
        calls = r.choices[0].message.tool_calls or ()
        return r.choices[0].finish_reason, [
            (t.id, t.function.name, json.loads(t.function.arguments)) for t in calls
        ]
    finish = None
    parts: dict[int, list[str]] = {}
    for ch in c.chat.completions.create(model=model, messages=msgs, tools=WEATHER, stream=True):
        for choice in ch.choices:
            finish = choice.finish_reason or finish
            for t in choice.delta.tool_calls or ():
                part = parts.setdefault(t.index, ["", "", ""])
                part[0] += t.id or ""
                part[1] += (t.function and t.function.name) or ""
                part[2] += (t.function and t.function.arguments) or ""
    return finish, [(i, n, json.loads(a)) for i, n, a in parts.values()]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_the_upstream_ended_with_stop_finishes_as_tool_calls(
    tool_server: LiveServer, stream: bool
) -> None:
    # OpenAI's finish_reason for a call forced by a named tool_choice (vLLM's and
    # SGLang's for others): agent loops run the tools on tool_calls, and stop on stop.
    finish, calls = _tool_answer(tool_server, "tools-stop", stream)
    assert calls == [("call_1", "get_weather", {"city": "Paris"})]
    assert finish == "tool_calls"


@pytest.mark.parametrize("model", ["name-repeat", "name-pieces"])
def test_a_streamed_tool_name_reaches_the_client_once(tool_server: LiveServer, model: str) -> None:
    # An upstream repeating the whole name in every fragment, or sending it in pieces:
    # the SDK user joins the name's fragments, and reads the name the model called.
    for stream in (False, True):
        finish, calls = _tool_answer(tool_server, model, stream)
        assert calls == [("call_1", "get_weather", {"city": "Paris"})], stream
        assert finish == "tool_calls"


@pytest.mark.parametrize("model", ["no-ids", "one-id"])
def test_the_calls_of_a_whole_answer_are_those_of_the_stream(
    tool_server: LiveServer, model: str
) -> None:
    # Calls without ids, or sharing one: two calls either way, not one made of both
    # (the same but for ids made fresh for each answer).
    answers = [_tool_answer(tool_server, model, stream) for stream in (False, True)]
    shown = [(finish, [c[1:] for c in calls]) for finish, calls in answers]
    assert shown[0] == shown[1]
    finish, calls = answers[0]
    assert finish == "tool_calls"
    assert [(name, args) for _, name, args in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert len({call_id for call_id, _, _ in calls}) == 2  # two ids, one per call


def test_a_text_completion_s_errors_about_messages_name_its_prompt() -> None:
    # /v1/completions' prompt is the pipeline's one user message: what the pipeline says
    # of `messages` is said of `prompt`, the parameter the request has.
    from stella.api.openai import OPENAI, OPENAI_TEXT
    from stella.errors import ContextTooLong, InvalidRequest

    err = InvalidRequest("$.messages[0].content: too odd", param="messages[0].content")
    assert OPENAI_TEXT.error_body(err, "r")["error"] == {
        "message": "$.prompt: too odd",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_request",
    }
    too_long = ContextTooLong("the prompt is 9 tokens", param="messages")
    assert OPENAI_TEXT.error_body(too_long, "r")["error"]["param"] == "prompt"
    assert OPENAI.error_body(too_long, "r")["error"]["param"] == "messages"
    other = InvalidRequest("$.temperature: over 2", param="temperature")
    assert OPENAI_TEXT.error_body(other, "r") == OPENAI.error_body(other, "r")


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[tuple[LiveServer, FakeOpenAI]]:
    """A stella in front of the fake OpenAI upstream: `plain` answers, `refusal` declines
    every request, `reasoning` takes only max_completion_tokens (and its backend is set to
    send that)."""
    up = FakeOpenAI()
    with serve(up.app) as up_url:
        config = {
            "backends": {
                # Sent images by URL too (off by default, for a self-hosted upstream).
                "up": {"kind": "openai", "base_url": up_url + "/v1", "image_urls": True},
                "o": {
                    "kind": "openai",
                    "base_url": up_url + "/v1",
                    "max_tokens_param": "max_completion_tokens",
                },
            },
            "models": {
                "routes": {
                    "plain": {"backend": "up", "upstream_model": "ok", "retries": 0},
                    "refusal": {"backend": "up", "upstream_model": "refusal", "retries": 0},
                    "filtered": {"backend": "up", "upstream_model": "filtered", "retries": 0},
                    "reasoning": {"backend": "o", "upstream_model": "reasoning", "retries": 0},
                    "rejected": {"backend": "up", "upstream_model": "status-400", "retries": 0},
                    "limited": {"backend": "up", "upstream_model": "status-429", "retries": 0},
                }
            },
        }
        with run_stella(config, {"STELLA_API_KEYS": f"tester={KEY}"}) as server:
            yield server, up


class Answer(pydantic.BaseModel):
    city: str


def test_an_upstream_s_refusal_reaches_the_client_as_one(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # OpenAI answers `refusal` (content null, finish_reason "stop") when a model declines,
    # often to a json_schema: each dialect gets the text, ended as a refusal, not as an
    # empty success. Chat completions give it back as the API does, in `refusal`.
    server, _ = fake_upstream
    c = client(server)
    msgs = [{"role": "user", "content": "Which city?"}]
    r = c.chat.completions.create(model="refusal", messages=msgs)
    message = r.choices[0].message
    assert (message.content, message.refusal, r.choices[0].finish_reason) == (
        None,
        REFUSAL,
        "stop",
    )
    chunks = list(c.chat.completions.create(model="refusal", messages=msgs, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.refusal or "" for d in deltas) == REFUSAL
    assert all(not d.content for d in deltas)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    # The SDK's structured-output helpers leave `parsed` empty and say why in `refusal`,
    # rather than failing to read the text as the schema asked.
    parsed = c.chat.completions.parse(model="refusal", messages=msgs, response_format=Answer)
    assert (parsed.choices[0].message.refusal, parsed.choices[0].message.parsed) == (REFUSAL, None)
    with c.chat.completions.stream(
        model="refusal", messages=msgs, response_format=Answer
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert "".join(e.delta for e in events if e.type == "refusal.delta") == REFUSAL
    assert (final.choices[0].message.refusal, final.choices[0].message.parsed) == (REFUSAL, None)
    assert final.choices[0].finish_reason == "stop"
    m = httpx.post(
        server.url + "/v1/messages",
        json={"model": "refusal", "max_tokens": 50, "messages": msgs},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    ).json()
    assert (m["content"], m["stop_reason"]) == ([{"type": "text", "text": REFUSAL}], "refusal")
    deadline = time.monotonic() + 10  # the last line may still be on its way
    while True:
        logged = [e["finish_reason"] for e in server.events("inference") if e["model"] == "refusal"]
        if len(logged) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert logged == ["content_filter"] * 5


def test_an_answer_a_content_filter_cut_short_is_content_not_a_refusal(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # Text the upstream's content filter cut short (content_filter, no `refusal`) is the
    # answer as far as it went: `content`, finished content_filter, as the API gives it.
    server, _ = fake_upstream
    c = client(server)
    msgs = [{"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model="filtered", messages=msgs)
    message = r.choices[0].message
    assert (message.content, message.refusal, r.choices[0].finish_reason) == (
        FILTERED,
        None,
        "content_filter",
    )
    chunks = list(c.chat.completions.create(model="filtered", messages=msgs, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == FILTERED
    assert all(d.refusal is None for d in deltas)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "content_filter"
    with pytest.raises(openai.ContentFilterFinishReasonError):
        c.chat.completions.parse(model="filtered", messages=msgs, response_format=Answer)


def test_a_refusal_is_as_openapi_json_declares_it(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # A generated client reads the answer and each chunk as /openapi.json declares them.
    from tests.test_ops import _validate

    server, _ = fake_upstream
    spec = httpx.get(server.url + "/openapi.json").json()
    for stream in (False, True):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={
                "model": "refusal",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200, r.text
        _validate(spec, "post", "/v1/chat/completions", r)


def test_a_backend_set_to_max_completion_tokens_sends_the_limit_so(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # OpenAI's reasoning models refuse max_tokens; the backend's max_tokens_param names
    # the field, whichever of the two the client used.
    server, up = fake_upstream
    c = client(server)
    msgs = [{"role": "user", "content": "hi"}]
    for limit in ({"max_tokens": 9}, {"max_completion_tokens": 9}):
        for stream in (False, True):
            if stream:
                chunks = c.chat.completions.create(
                    model="reasoning", messages=msgs, stream=True, **limit
                )
                assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
            else:
                r = c.chat.completions.create(model="reasoning", messages=msgs, **limit)
                assert r.choices[0].finish_reason == "stop"
            sent = up.requests[-1]
            assert sent["max_completion_tokens"] == 9 and "max_tokens" not in sent, limit


def test_a_refusal_in_the_history_reaches_the_upstream_as_that_turn_s_text(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # As the API gives a refusal back (content null, `refusal`), and as a content part of
    # type "refusal", which it takes in an assistant message: the turn's text, not "".
    server, up = fake_upstream
    c = client(server)
    ask = {"role": "user", "content": "Which city?"}
    again = {"role": "user", "content": "Please?"}
    for turn, text in (
        ({"role": "assistant", "content": None, "refusal": REFUSAL}, REFUSAL),
        ({"role": "assistant", "content": [{"type": "refusal", "refusal": REFUSAL}]}, REFUSAL),
        # Text and a refusal both: the turn said both, one line each.
        ({"role": "assistant", "content": "Well.", "refusal": REFUSAL}, "Well.\n" + REFUSAL),
    ):
        r = c.chat.completions.create(model="plain", messages=[ask, turn, again])
        assert r.choices[0].finish_reason == "stop"
        sent = up.requests[-1]["messages"]
        assert sent[1] == {"role": "assistant", "content": text}, turn
    # A user's message holds none: a 400 naming the part.
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": "plain",
            "messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}],
        },
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content[0].type"
    assert "a refusal part belongs in an assistant message" in r.json()["error"]["message"]


def test_a_tool_result_that_answers_no_call_is_a_400_in_every_dialect(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # The upstream would refuse it (OpenAI: "must be a response to a preceeding message
    # with 'tool_calls'"), or an Ollama model read a result of no call: a 400 naming the
    # field, before any backend is asked.
    server, up = fake_upstream
    ask = {"role": "user", "content": "Weather in Paris?"}
    answer = {"role": "tool", "tool_call_id": "a", "content": "sunny"}
    stray = {"role": "tool", "tool_call_id": "b", "content": "rain"}
    headers = {"Authorization": f"Bearer {KEY}"}
    before = len(up.requests)
    for path, stream, arguments in (
        ("/v1/chat/completions", False, "{}"),  # OpenAI's arguments are a JSON string
        ("/v1/chat/completions", True, "{}"),
        ("/api/v1/chat", True, {}),
        ("/api/chat", False, {}),
    ):
        call = {"id": "a", "type": "function", "function": {"name": "get_weather"}}
        call["function"]["arguments"] = arguments  # type: ignore[index]
        calling = {"role": "assistant", "content": "", "tool_calls": [call]}
        for messages, field in (
            ([ask, calling, answer, stray], "messages[3].tool_call_id"),
            ([ask, calling, stray], "messages[2].tool_call_id"),
            ([ask, answer], "messages[1]"),
            # Only other tool messages may come between a call and its result.
            ([ask, calling, answer, {"role": "user", "content": "And?"}, answer], "messages[4]"),
        ):
            body = {"model": "plain", "messages": messages, "stream": stream}
            r = httpx.post(server.url + path, json=body, headers=headers)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            message = error if isinstance(error, str) else error["message"]
            assert message.startswith(f"$.{field}: "), (path, message)
            if path == "/v1/chat/completions":
                assert error["param"] == field
    assert len(up.requests) == before
    # Ollama's results may name their call by the tool's name alone, in order.
    by_name = {"role": "tool", "tool_name": "get_weather", "content": "sunny"}
    ollama_call = {"function": {"name": "get_weather", "arguments": {}}}
    r = httpx.post(
        server.url + "/api/chat",
        json={
            "model": "plain",
            "stream": False,
            "messages": [ask, {"role": "assistant", "tool_calls": [ollama_call]}, by_name],
        },
        headers=headers,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "plain", "stream": False, "messages": [ask, by_name]},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["error"].startswith("$.messages[1]: "), r.text
    # The Responses API's own check names the item; the pipeline's, the field alone.
    fc = {"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "a", "output": "sunny"}
    later = {"role": "user", "content": "And?"}
    for items in ([later, output], [later, fc, later, output]):
        r = httpx.post(
            server.url + "/v1/responses",
            json={"model": "plain", "input": items},
            headers=headers,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text


def test_the_sdk_sends_again_only_what_may_pass_on_another_try(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # The SDK retries every 5xx unless told otherwise (x-should-retry): an upstream's
    # refusal of the request (502 upstream_rejected) would only be refused again.
    server, up = fake_upstream
    msgs = [{"role": "user", "content": "hi"}]
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=2)
    before = len(up.requests)
    with pytest.raises(openai.InternalServerError) as err:
        c.chat.completions.create(model="rejected", messages=msgs)
    assert err.value.response.headers["x-should-retry"] == "false"
    assert err.value.code == "upstream_rejected"
    assert len(up.requests) - before == 1  # asked once: the SDK did not try again
    # An upstream's rate limit may pass later: the SDK is told it may try again.
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "limited", "messages": msgs},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code >= 429 and r.headers["x-should-retry"] == "true"
    # A client's own mistake is final too (the SDK does not retry a 400 anyway).
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "plain", "messages": []},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400 and r.headers["x-should-retry"] == "false"


def _refused(server: LiveServer, body: dict[str, object]) -> dict[str, object]:
    """The OpenAI error object of a chat completion stella must refuse with a 400."""
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "plain", **body},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request", error
    return error


def test_audio_output_is_refused_not_answered_in_text(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # A client asking for audio (modalities, audio) would wait for audio that never comes:
    # a 400 naming the parameter, before any upstream is asked.
    server, up = fake_upstream
    msgs = [{"role": "user", "content": "Say hi"}]
    voice = {"voice": "alloy", "format": "wav"}
    before = len(up.requests)
    for body, param, said in (
        ({"modalities": ["text", "audio"], "audio": voice}, "modalities", "'audio'"),
        ({"modalities": ["audio"]}, "modalities", "'audio'"),
        ({"audio": voice}, "audio", "audio output is not supported"),
        ({"modalities": ["text"], "audio": voice}, "audio", "audio output is not supported"),
    ):
        error = _refused(server, {"messages": msgs, **body})
        assert error["param"] == param and said in str(error["message"]), (body, error)
    assert len(up.requests) == before
    # Text only, said so or not: answered (audio null is none asked for).
    c = client(server)
    for extra in (
        {"modalities": ["text"]},
        {"audio": None},
        {"modalities": ["text"], "audio": None},
    ):
        r = c.chat.completions.create(model="plain", messages=msgs, **extra)  # type: ignore[call-overload]
        assert r.choices[0].finish_reason == "stop", extra
    assert len(up.requests) == before + 3


def test_an_earlier_audio_answer_is_refused_not_sent_as_an_empty_turn(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # The SDK sends an audio answer back by its id, content null: read as text, the turn
    # would reach the model empty (and an Anthropic upstream not at all).
    server, up = fake_upstream
    before = len(up.requests)
    msgs = [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": None, "audio": {"id": "audio_abc"}},
        {"role": "user", "content": "Again?"},
    ]
    error = _refused(server, {"messages": msgs})
    assert error["param"] == "messages[1].audio", error
    assert str(error["message"]).startswith("$.messages[1].audio: "), error
    assert len(up.requests) == before
    # Null, as a client may send every field of a message: none.
    msgs[1] = {"role": "assistant", "content": "Hi!", "audio": None}
    r = client(server).chat.completions.create(model="plain", messages=msgs)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "stop"
    assert up.requests[-1]["messages"][1] == {"role": "assistant", "content": "Hi!"}


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "aGk=", "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,aGk="}},
    ],
)
def test_a_content_part_that_is_not_text_is_refused(
    fake_upstream: tuple[LiveServer, FakeOpenAI], part: dict[str, object]
) -> None:
    # Dropped, the model would answer as if it had seen no image, audio or file.
    server, up = fake_upstream
    before = len(up.requests)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    error = _refused(server, {"messages": msgs})
    assert error["param"] == "messages[0].content[1].type", error
    assert f"content part type {part['type']!r} is not supported" in str(error["message"])
    assert len(up.requests) == before


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_image_url_parts_reach_an_upstream_that_reads_images(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # As the SDK sends them (a data URL, an http one with its detail), the text after.
    server, up = fake_upstream
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}},
    ]
    r = client(server).chat.completions.create(
        model="plain",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],  # type: ignore[list-item,misc]
    )
    assert r.choices[0].finish_reason == "stop"
    assert up.requests[-1]["messages"] == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.com/a.jpg", "detail": "high"},
                },
                {"type": "text", "text": "What is this?"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("data:image/png;base64,not base64!", "not valid base64"),
        ("data:image/bmp;base64,aGk=", "image type 'image/bmp' is not supported"),
        ("data:image/png,aGk=", "a data URL must be base64"),
        ("ftp://example.com/a.png", "an image URL must be an http or https URL"),
    ],
)
def test_a_bad_image_url_is_refused_by_path(
    fake_upstream: tuple[LiveServer, FakeOpenAI], url: str, why: str
) -> None:
    server, up = fake_upstream
    before = len(up.requests)
    part = {"type": "image_url", "image_url": {"url": url}}
    error = _refused(server, {"messages": [{"role": "user", "content": [part]}]})
    assert error["param"] == "messages[0].content[0].image_url.url", error
    assert why in str(error["message"]), error
    assert len(up.requests) == before


def test_an_image_url_part_outside_a_user_message_is_refused(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    server, _ = fake_upstream
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [part]}]
    error = _refused(server, {"messages": msgs})
    assert error["param"] == "messages[1].content[0].type", error
    assert error["message"] == "an image_url part belongs in a user message"


def test_an_image_to_a_text_only_model_is_refused(server: LiveServer) -> None:
    # The echo backend reads text only: answering without the image would pass for an
    # answer about it.
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model="echo-slow",
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}],  # type: ignore[list-item]
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "messages[0].images[0]", error
    assert error["message"] == (
        "$.messages[0].images[0]: model 'echo-slow' reads text only: images are not supported"
    )


def test_ollama_style_images_on_a_message_are_refused(
    fake_upstream: tuple[LiveServer, FakeOpenAI],
) -> None:
    # Some clients send a message's images as Ollama takes them: refused, not ignored.
    server, up = fake_upstream
    before = len(up.requests)
    msgs = [{"role": "user", "content": "What is this?", "images": ["aGk="]}]
    error = _refused(server, {"messages": msgs})
    assert error["param"] == "messages[0].images", error
    assert error["message"] == "$.messages[0].images: images are not supported"
    assert len(up.requests) == before
    msgs[0]["images"] = []
    r = client(server).chat.completions.create(model="plain", messages=msgs)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "stop"
