"""Compatible dialects hold a stream's status line for its first event, as the APIs they
copy do: a backend that fails before its first token is an HTTP error each official
client raises with its status (and can retry); the native stream still starts at once."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.live import LiveServer

HI = [{"role": "user", "content": "hi there"}]


def test_openai_stream_failing_before_its_first_token_is_a_502(stella: LiveServer) -> None:
    client = openai.OpenAI(base_url=stella.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        for _ in client.chat.completions.create(model="echo-fail", messages=HI, stream=True):
            pass
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error", info.value.body
    rid = info.value.response.headers["x-request-id"]
    ev = stella.wait_event(lambda e: e["request_id"] == rid)
    assert ev["api"] == "openai" and ev["status"] == 502 and ev["stream"] is True


def test_anthropic_stream_failing_before_its_first_token_is_a_502(stella: LiveServer) -> None:
    client = anthropic.Anthropic(base_url=stella.url, api_key="x", max_retries=0)
    with (
        pytest.raises(anthropic.InternalServerError) as info,
        client.messages.stream(model="echo-fail", max_tokens=20, messages=HI) as s,
    ):
        s.get_final_message()
    assert info.value.status_code == 502
    assert info.value.body["type"] == "error", info.value.body
    # The refusal carries the request's ID as the API's own answers do (header and body).
    rid = info.value.response.headers["x-request-id"]
    assert info.value.request_id == rid and info.value.body["request_id"] == rid


def test_ollama_stream_failing_before_its_first_token_is_a_502(stella: LiveServer) -> None:
    client = ollama.Client(host=stella.url)
    with pytest.raises(ollama.ResponseError) as info:
        for _ in client.chat(model="echo-fail", messages=HI, stream=True):
            pass
    assert info.value.status_code == 502 and "failing before the first token" in info.value.error


def test_a_held_stream_starts_once_its_first_event_is_slow_to_come(stella: LiveServer) -> None:
    # ping_interval_s is 0.2 here: a first token later than that (never, on this route;
    # its ttft limit is 0.5 s) starts the stream anyway, and the failure is in-band.
    started = time.monotonic()
    with httpx.stream(
        "POST",
        stella.url + "/v1/chat/completions",
        json={"model": "echo-stall-first", "messages": HI, "stream": True},
        timeout=10,
    ) as r:
        assert r.status_code == 200
        assert 0.15 < time.monotonic() - started < 0.45
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    # The headers went first, then the error: no role chunk without a message.
    assert [json.loads(x[6:])["error"]["code"] for x in lines] == ["upstream_timeout"]


def test_held_streams_answer_as_before(stella: LiveServer) -> None:
    client = openai.OpenAI(base_url=stella.url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="echo", messages=HI, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi there"
    # Before tool calls the role chunk's content is null, as OpenAI sends it.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with client.chat.completions.stream(model="echo", messages=HI, tools=tools) as s:
        final = s.get_final_completion()
    message = final.choices[0].message
    assert message.content is None and message.tool_calls[0].function.name == "f"


def test_the_native_stream_still_starts_at_once(stella: LiveServer) -> None:
    with httpx.stream(
        "POST",
        stella.url + "/api/v1/chat",
        json={"model": "echo-fail", "messages": HI},
        timeout=10,
    ) as r:
        assert r.status_code == 200
        lines = [json.loads(x) for x in r.iter_lines()]
    assert lines[0]["type"] == "start" and lines[-1]["type"] == "error"


def _app(delay: float) -> Any:
    from stella.app import create_app
    from stella.settings import load_settings

    return create_app(
        load_settings(
            {
                "models": {"default": "echo", "routes": {"s": {"backend": "s"}}},
                "backends": {
                    "local": {"enabled": False},
                    "s": {"kind": "echo", "delay_s": delay},
                },
                "stream": {"ping_interval_s": 0.1},
            }
        )
    )


async def _call(app: Any, path: str, body: dict, send: Any) -> None:
    """One request straight into the ASGI app, with the given `send`."""
    import asyncio

    raw = json.dumps(body).encode()
    given = []

    async def receive() -> dict:
        if not given:
            given.append(1)
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)


@pytest.mark.parametrize("delay", [0.13, 0.15, 0.17])
async def test_the_status_line_goes_once_and_first_whoever_starts_the_stream(
    delay: float,
) -> None:
    # The watcher starts a held stream after ping_interval_s while the first token may
    # be on its way: with a server whose send of the status line takes a while, no body
    # may overtake it, and it goes out once.
    import asyncio

    from stella import logs

    sent: list[dict] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            await asyncio.sleep(0.05)  # a paused write buffer, another server
        sent.append(message)

    with open("/dev/null", "wb") as null:
        sink = logs.configure(fmt="json", stream=null)
        body = {"model": "s", "stream": True, "messages": HI}
        await _call(_app(delay), "/v1/chat/completions", body, send)
        sink.close()
    kinds = [m["type"] for m in sent]
    assert kinds[0] == "http.response.start" and kinds.count("http.response.start") == 1
    text = b"".join(m.get("body", b"") for m in sent[1:])
    assert b'"content":"hi"' in text and text.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("delay", [0.0, 0.3])
async def test_a_start_whose_first_bytes_fail_is_the_client_gone(delay: float) -> None:
    # The status line went out, the opening bytes could not (the client left): nobody
    # sends the status line again, and the call ends as client_closed, not as a bug.
    from stella import logs

    sent: list[dict] = []
    events: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            raise OSError("connection reset")

    with open("/dev/null", "wb") as null:
        sink = logs.configure(fmt="json", stream=null)
        app = _app(delay)
        app.state.stella.pipeline.listeners.append(events.append)
        body = {"model": "s", "stream": True, "max_tokens": 5, "messages": HI}
        await _call(app, "/v1/messages", body, send)
        sink.close()
    assert [m["type"] for m in sent].count("http.response.start") == 1
    assert [e["finish_reason"] for e in events] == ["client_closed"]
