"""A reasoning model's thinking through a live stella: where each dialect carries it, what a
failure while the model thinks becomes, what the inference log keeps, and what the Python
client and `stella chat` show of it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.openai import REASONING, REASONING_TOKENS, FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, ndjson, reasoned, run_stella, stella_cli

THOUGHT = "".join(REASONING)
WORDS = " w0 w1 w2 w3 w4"  # the fake's answer
SSE = {"Accept": "text/event-stream"}
# The streams that show no reasoning: their status line waits for the answer's first piece.
HELD = ("/v1/messages", "/v1/completions")


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    f = FakeOpenAI()
    with serve(f.app) as url:
        yield f, url


@pytest.fixture(scope="module")
def server(fake: tuple[FakeOpenAI, str]) -> Iterator[LiveServer]:
    routes: dict[str, Any] = {
        # A thinking model's upstream that fails while it thinks: asked three times.
        "fails": {"backend": "up", "upstream_model": "thinks-fails", "retry_backoff_s": 0.01},
        # The same, then a fallback that thinks and answers.
        "falls": {
            "backend": "up",
            "upstream_model": "thinks-fails",
            "retry_backoff_s": 0.01,
            "fallbacks": ["thinks"],
        },
        # An upstream that fails before any output, then a fallback that thinks and answers.
        "first-fails": {
            "backend": "up",
            "upstream_model": "error-first",
            "retry_backoff_s": 0.01,
            "fallbacks": ["thinks"],
        },
        "broken": {"backend": "up", "upstream_model": "error-first", "retry_backoff_s": 0.01},
        # Upstreams that count no reasoning tokens: no usage details, or null ones.
        "plain": {"backend": "up", "upstream_model": "ok"},
        "cached": {"backend": "up", "upstream_model": "cached"},
    }
    for model in (
        "thinks",
        "thinks-apart",
        "thinks-or-apart",
        "thinks-between-apart",
        "thinks-says",
        "thinks-echo",
        "thinks-tools",
    ):
        routes[model] = {"backend": "up", "upstream_model": model}
    config = {
        "backends": {"up": {"kind": "openai", "base_url": fake[1] + "/v1"}},
        "models": {"routes": routes},
        "breaker": {"failure_threshold": 0},  # the failures here are asked for
        "log": {"content": True},
    }
    with run_stella(config) as live:
        yield live


def ask(
    server: LiveServer, path: str, model: str, stream: bool = True, **kw: Any
) -> httpx.Response:
    """One request for `model` in the shape of the API at `path`."""
    msgs = [{"role": "user", "content": "hi"}]
    if path == "/v1/messages":
        body: dict[str, Any] = {"max_tokens": 50, "messages": msgs}
    elif path == "/v1/responses":
        body = {"input": "hi"}
    elif path in ("/v1/completions", "/api/generate", "/api/v1/generate"):
        body = {"prompt": "hi"}
    else:
        body = {"messages": msgs}
    return httpx.post(
        server.url + path, json={"model": model, "stream": stream, **body}, timeout=30, **kw
    )


def sse(r: httpx.Response) -> list[dict[str, Any]]:
    """The JSON of each `data:` line of an SSE answer (not the end marker)."""
    lines = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
    return [json.loads(x) for x in lines if x != "[DONE]"]


def pieces(path: str, r: httpx.Response) -> list[str]:
    """The pieces of text a stream without reasoning sent, where its API carries them."""
    assert r.status_code == 200, r.text
    data = sse(r)
    if path == "/v1/messages":
        return [d["delta"]["text"] for d in data if d["type"] == "content_block_delta"]
    if path == "/v1/responses":
        return [d["delta"] for d in data if d["type"] == "response.output_text.delta"]
    if path == "/v1/completions":
        return [d["choices"][0]["text"] for d in data if d["choices"][0]["finish_reason"] is None]
    return [d["response"] for d in data if "response" in d]  # /api/v1/generate


def event(server: LiveServer, r: httpx.Response) -> dict[str, Any]:
    """The call's inference log event."""
    rid = r.headers["x-request-id"]
    return server.wait_event(lambda e: e["request_id"] == rid)


@pytest.mark.parametrize("path", HELD)
def test_a_failure_while_the_model_thinks_is_retried_and_its_status_an_error(
    server: LiveServer, path: str
) -> None:
    # The client was shown nothing of the reasoning: the answer had not begun, so the
    # route asks again, and the failure is the HTTP error the API gives, as before a
    # first token.
    r = ask(server, path, "fails")
    assert r.status_code == 502, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    ev = event(server, r)
    assert [a["error"] for a in ev["attempts"]] == ["upstream_error"] * 3, ev
    assert ev["status"] == 502 and "reasoning" not in ev, ev


@pytest.mark.parametrize("path", [*HELD, "/api/v1/generate"])
def test_a_fallback_answers_after_a_failure_while_the_model_thinks(
    server: LiveServer, path: str
) -> None:
    headers = SSE if path == "/api/v1/generate" else None  # its SSE form: text alone
    r = ask(server, path, "falls", headers=headers)
    got = pieces(path, r)
    assert "".join(got) == WORDS and all(got), (path, got)
    ev = event(server, r)
    routes = [(a["route"], a["error"]) for a in ev["attempts"]]
    assert routes == [("falls", "upstream_error")] * 3 + [("thinks", None)], ev
    # The log has the answer's reasoning, the fallback's, once: not the failed attempts'.
    assert ev["reasoning"] == THOUGHT and ev["completion"] == WORDS, ev


@pytest.mark.parametrize(
    "path", ["/api/v1/chat", "/v1/chat/completions", "/api/chat", "/v1/responses"]
)
def test_a_failure_after_reasoning_was_shown_ends_the_stream(server: LiveServer, path: str) -> None:
    # The client has the reasoning: a switch of model now would be worse than the error.
    r = ask(server, path, "falls")
    assert r.status_code == 200, r.text
    if path == "/v1/responses":
        data = sse(r)
        shown = "".join(d["delta"] for d in data if d["type"] == "response.reasoning_text.delta")
        last = data[-1]
        assert last["type"] == "response.failed", data
        # The output as far as it went: the reasoning, cut short.
        assert last["response"]["output"] == [
            {
                "id": last["response"]["output"][0]["id"],
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": THOUGHT}],
                "status": "incomplete",
            }
        ], last
    elif path == "/v1/chat/completions":
        data = sse(r)
        shown = "".join(d["choices"][0]["delta"].get("reasoning_content", "") for d in data[:-1])
        assert data[-1]["error"]["code"] == "upstream_error", data
    elif path == "/api/v1/chat":
        lines = ndjson(r.text)
        shown = "".join(line.get("reasoning", "") for line in lines)
        assert lines[-1]["type"] == "error", lines
    else:
        lines = ndjson(r.text)
        shown = "".join(line["message"]["thinking"] for line in lines[:-1])
        assert "error" in lines[-1], lines
    assert shown == THOUGHT, r.text
    ev = event(server, r)
    assert [a["error"] for a in ev["attempts"]] == ["upstream_error"], ev


def test_reasoning_and_text_in_one_delta_are_both_kept(server: LiveServer) -> None:
    # vLLM's DeepSeek-R1 parser sends the delta around </think> with both.
    for path in ("/api/v1/chat", "/v1/chat/completions"):
        for stream in (True, False):
            r = ask(server, path, "thinks-says", stream)
            assert reasoned(path, stream, r)[:2] == (THOUGHT, WORDS), (path, stream, r.text)
            ev = event(server, r)
            assert ev["reasoning"] == THOUGHT and ev["completion"] == WORDS, ev


@pytest.mark.parametrize("model", ["thinks-apart", "thinks-or-apart", "thinks-between-apart"])
def test_reasoning_in_reads_of_its_own(server: LiveServer, model: str) -> None:
    # Under either name servers give it, each piece a Delta of reasoning alone (before the
    # text, or after some of it): shown where the API has a place for it, and no empty
    # piece of text where it has none.
    r = ask(server, "/api/v1/chat", model)
    lines = [line for line in ndjson(r.text) if line["type"] == "delta"]
    thought = [line["reasoning"] for line in lines if not line["text"]]
    if model == "thinks-between-apart":
        assert thought == [REASONING[0]] and lines[0] == {"type": "delta", "text": " w0"}, lines
    else:
        assert thought == list(REASONING), lines
    assert reasoned("/api/v1/chat", True, r)[:2] == ("".join(thought), WORDS)
    for path in HELD:
        got = pieces(path, ask(server, path, model))
        assert "".join(got) == WORDS and all(got), (path, got)
    got = pieces("/api/v1/generate", ask(server, "/api/v1/generate", model, headers=SSE))
    assert "".join(got) == WORDS and all(got), got
    # The Responses API: each run of reasoning an item of its own, where it came.
    data = sse(ask(server, "/v1/responses", model))
    items = [d["item"] for d in data if d["type"] == "response.output_item.done"]
    kinds = [item["type"] for item in items]
    if model == "thinks-between-apart":
        assert kinds == ["message", "reasoning", "message"], items
        assert items[1]["content"][0]["text"] == REASONING[0], items
    else:
        assert kinds == ["reasoning", "message"], items
        assert items[0]["content"][0]["text"] == THOUGHT, items
    text = "".join(
        p["text"] for item in items if item["type"] == "message" for p in item["content"]
    )
    assert text == WORDS, items
    assert data[-1]["response"]["output"] == items, data[-1]


def test_the_self_hosted_shapes_carry_reasoning_in_native_lines_alone(server: LiveServer) -> None:
    # /api/llm/stream and /api/v1/generate without SSE are the native stream (and answer).
    for path in ("/api/llm/stream", "/api/v1/generate"):
        r = httpx.post(server.url + path, json={"model": "thinks", "prompt": "hi"})
        assert reasoned("/api/v1/chat", True, r)[:2] == (THOUGHT, WORDS), (path, r.text)
    r = ask(server, "/api/v1/generate", "thinks", False)
    assert reasoned("/api/v1/chat", False, r)[:2] == (THOUGHT, WORDS), r.text
    # The others have a field for the text alone.
    for path, body, field in (
        ("/api/llm/generate", {"model": "thinks", "prompt": "hi"}, "response"),
        ("/generate", {"model": "thinks", "prompt": "hi"}, "response"),
        ("/api/chat/invoke", {"model": "thinks", "input_data": {"input": "hi"}}, "output"),
    ):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 200 and r.json()[field] == WORDS, (path, r.text)
        assert THOUGHT not in r.text, (path, r.text)


def test_a_key_in_the_reasoning_is_masked_in_the_log() -> None:
    key = "sk-reasoning-masked-1234"
    f = FakeOpenAI()
    with serve(f.app) as url:
        config = {
            "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
            "models": {"routes": {"r": {"backend": "up", "upstream_model": "thinks-echo"}}},
            "log": {"content": True},
            # Known by its digest: the log's sink cannot mask it, the event's own masking must.
            "auth": {"keys": {"k": {"sha256": hashlib.sha256(key.encode()).hexdigest()}}},
        }
        with run_stella(config) as live:
            for stream in (True, False):
                r = httpx.post(
                    live.url + "/api/v1/chat",
                    headers={"Authorization": f"Bearer {key}"},
                    json={
                        "model": "r",
                        "stream": stream,
                        "messages": [{"role": "user", "content": f"my key is {key}"}],
                    },
                )
                assert reasoned("/api/v1/chat", stream, r)[0] == f"I read: my key is {key}"
                ev = event(live, r)
                assert ev["reasoning"] == "I read: my key is ***", ev
                assert key not in json.dumps(ev)


async def test_the_python_client_and_generate_send_a_reasoning_effort(
    fake: tuple[FakeOpenAI, str], server: LiveServer
) -> None:
    from stella.client import AsyncClient, Client, Stream

    f = fake[0]
    msgs = [{"role": "user", "content": "hi"}]
    with Client(server.url) as c:
        for stream in (False, True):
            for effort in ("high", None):
                answer = c.chat(msgs, "thinks", stream=stream, reasoning_effort=effort)
                if isinstance(answer, Stream):
                    list(answer)
                assert f.requests[-1].get("reasoning_effort") == effort, (stream, effort)
                answer = c.generate("hi", "thinks", stream=stream, reasoning_effort=effort)
                if isinstance(answer, Stream):
                    list(answer)
                assert f.requests[-1].get("reasoning_effort") == effort, (stream, effort)
    async with AsyncClient(server.url) as ac:
        await ac.chat(msgs, "thinks", reasoning_effort="low")
        assert f.requests[-1]["reasoning_effort"] == "low"
        await ac.generate("hi", "thinks", reasoning_effort="minimal")
        assert f.requests[-1]["reasoning_effort"] == "minimal"
    # /api/v1/generate takes exactly the chat's words.
    r = httpx.post(
        server.url + "/api/v1/generate",
        json={"model": "thinks", "prompt": "hi", "reasoning_effort": "hard"},
    )
    assert r.status_code == 400 and "$.reasoning_effort" in r.text, r.text


def test_the_python_client_gives_the_reasoning_streamed_or_not(server: LiveServer) -> None:
    from stella.client import Client
    from stella.protocol import Delta

    msgs = [{"role": "user", "content": "hi"}]
    with Client(server.url) as c:
        events = [e for e in c.chat(msgs, "thinks", stream=True) if isinstance(e, Delta)]
        assert "".join(e.reasoning for e in events) == THOUGHT
        assert "".join(e.text for e in events) == WORDS
        whole = c.chat(msgs, "thinks")
        assert (whole.message.reasoning, whole.response) == (THOUGHT, WORDS)


def cli(server: LiveServer, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`stella chat` to `server`, its stdout and stderr each a pipe of its own."""
    return stella_cli("chat", *args, env={"PATH": "/usr/bin:/bin", "STELLA_URL": server.url, **env})


def test_stella_chat_shows_the_thinking_on_stderr_each_line_led(server: LiveServer) -> None:
    # Off a terminal: stdout holds the answer alone, as a script reads it; the thinking
    # goes to stderr, each line led by "[thinking] ".
    out = cli(server, "-m", "thinks", "hi")
    assert (out.returncode, out.stdout) == (0, WORDS + "\n"), out.stderr
    assert out.stderr == f"[thinking] {THOUGHT}\n", out.stderr
    out = cli(server, "-m", "thinks-echo", "two\nlines")  # a line end in the thinking
    assert out.stderr == "[thinking] I read: two\n[thinking] lines\n", out.stderr
    # --no-reasoning leaves it out.
    out = cli(server, "-m", "thinks", "--no-reasoning", "hi")
    assert (out.returncode, out.stdout, out.stderr) == (0, WORDS + "\n", "")


def test_stella_chat_thinking_between_text_starts_its_own_line_in_one_file(
    server: LiveServer,
) -> None:
    # stdout and stderr one pipe (`2>&1`): the thinking after some text, and the text
    # after it, each begin a line.
    out = subprocess.run(
        [sys.executable, "-m", "stella", "chat", "-m", "thinks-between-apart", "hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"PATH": "/usr/bin:/bin", "STELLA_URL": server.url},
        timeout=60,
    )
    assert out.returncode == 0
    assert out.stdout == f" w0\n[thinking] {THOUGHT[:4]}\n{WORDS[3:]}\n", out.stdout


def on_a_terminal(server: LiveServer, *args: str, **env: str) -> str:
    """What `stella chat` shows with stdout and stderr on one terminal."""
    import pty

    leader, follower = pty.openpty()
    environ = {"PATH": "/usr/bin:/bin", "STELLA_URL": server.url, "TERM": "xterm", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stella", "chat", *args],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=environ,
    )
    os.close(follower)
    shown = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the process, the terminal's last writer, is gone
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, shown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    return shown.decode().replace("\r\n", "\n")


def test_stella_chat_shows_the_thinking_dim_on_a_terminal(server: LiveServer) -> None:
    shown = on_a_terminal(server, "-m", "thinks-apart", "hi")
    # Each piece dim (SGR 2), and back to normal (SGR 22) before the answer's line.
    assert shown.startswith("\x1b[2m") and "[thinking]" not in shown, repr(shown)
    pieces = re.findall(r"\x1b\[2m(.*?)\x1b\[22m", shown, re.S)
    assert "".join(pieces) == THOUGHT, repr(shown)
    assert re.sub(r"\x1b\[2m.*?\x1b\[22m", "", shown, flags=re.S) == f"\n{WORDS}\n", repr(shown)
    # NO_COLOR (no-color.org): no escape codes, the lines led as off a terminal.
    shown = on_a_terminal(server, "-m", "thinks-apart", "hi", NO_COLOR="1")
    assert shown == f"[thinking] {THOUGHT}\n{WORDS}\n", repr(shown)


def sdk(server: LiveServer) -> Any:
    """The official OpenAI SDK, pointed at stella."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


# The events of a streamed Response whose model thought, then answered (each run of
# deltas as one: pieces that came in one read are one delta).
THOUGHT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.reasoning_text.delta",
    "response.reasoning_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def kinds(data: list[dict[str, Any]]) -> list[str]:
    """The events' types, each run of deltas as one."""
    out: list[str] = []
    for d in data:
        if not (out and out[-1] == d["type"] and d["type"].endswith(".delta")):
            out.append(d["type"])
    return out


@pytest.mark.parametrize("model", ["thinks-apart", "thinks-says"])
def test_a_responses_stream_carries_the_reasoning_as_an_item_before_the_message(
    server: LiveServer, model: str
) -> None:
    # As the API streams a reasoning item (OpenAI's and vLLM's for gpt-oss): added, its
    # one reasoning_text part, the text's deltas and done, then the item done; the
    # message after it at output_index 1.
    data = sse(ask(server, "/v1/responses", model))
    assert kinds(data) == THOUGHT_EVENTS, data
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    added, part = data[2], data[3]
    rs = added["item"]["id"]
    assert rs.startswith("rs_"), added
    assert added == {
        "type": "response.output_item.added",
        "sequence_number": 2,
        "output_index": 0,
        "item": {
            "id": rs,
            "type": "reasoning",
            "summary": [],
            "content": [],
            "status": "in_progress",
        },
    }
    where = {"item_id": rs, "output_index": 0, "content_index": 0}
    assert part == {
        "type": "response.content_part.added",
        "sequence_number": 3,
        **where,
        "part": {"type": "reasoning_text", "text": ""},
    }
    n = sum(d["type"] == "response.reasoning_text.delta" for d in data)
    deltas = data[4 : 4 + n]
    assert all({k: d[k] for k in where} == where for d in deltas), deltas
    assert "".join(d["delta"] for d in deltas) == THOUGHT, deltas
    done_text, done_part, done_item = data[4 + n : 7 + n]
    assert done_text["text"] == THOUGHT and {k: done_text[k] for k in where} == where
    assert done_part["part"] == {"type": "reasoning_text", "text": THOUGHT}, done_part
    item = {
        "id": rs,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": THOUGHT}],
        "status": "completed",
    }
    assert done_item["output_index"] == 0 and done_item["item"] == item, done_item
    message = [d for d in data[7 + n :] if "output_index" in d]
    assert {d["output_index"] for d in message} == {1}, message
    output = data[-1]["response"]["output"]
    assert output[0] == item and output[1]["type"] == "message", output
    assert output[1]["content"][0]["text"] == WORDS, output


def test_the_openai_sdk_reads_the_reasoning_item(server: LiveServer) -> None:
    from openai.types.responses import (
        ResponseReasoningItem,
        ResponseReasoningTextDeltaEvent,
        ResponseReasoningTextDoneEvent,
    )

    c = sdk(server)
    r = c.responses.create(model="thinks", input="hi")
    assert [item.type for item in r.output] == ["reasoning", "message"], r.output
    thought = r.output[0]
    assert isinstance(thought, ResponseReasoningItem), thought
    assert thought.summary == [] and thought.status == "completed", thought
    assert thought.content is not None and [p.text for p in thought.content] == [THOUGHT]
    assert r.output_text == WORDS and r.output[1].id != thought.id
    # The typed events, as create(stream=True) gives them.
    events = list(c.responses.create(model="thinks", input="hi", stream=True))
    deltas = [e for e in events if isinstance(e, ResponseReasoningTextDeltaEvent)]
    assert "".join(e.delta for e in deltas) == THOUGHT, events
    (done,) = [e for e in events if isinstance(e, ResponseReasoningTextDoneEvent)]
    assert done.text == THOUGHT and done.output_index == 0
    final = events[-1]
    assert final.type == "response.completed", final
    assert isinstance(final.response.output[0], ResponseReasoningItem), final
    # The stream helper's final Response (it checks each item's identity as it goes).
    with c.responses.stream(model="thinks-says", input="hi") as stream:
        got = stream.get_final_response()
    assert isinstance(got.output[0], ResponseReasoningItem), got.output
    assert got.output[0].content is not None and got.output[0].content[0].text == THOUGHT
    assert got.output_text == WORDS


def test_reasoning_before_tool_calls_is_an_item_before_them(server: LiveServer) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    c = sdk(server)
    r = c.responses.create(model="thinks-tools", input="hi", tools=tools)  # type: ignore[arg-type]
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "function_call", "function_call"], r.output
    with c.responses.stream(model="thinks-tools", input="hi", tools=tools) as stream:  # type: ignore[arg-type]
        final = stream.get_final_response()

    def calls(output: list[Any]) -> list[tuple[str, str, str]]:
        return [(i.type, i.call_id, i.arguments) for i in output if i.type == "function_call"]

    assert calls(final.output) == calls(r.output) and len(final.output) == 3, final.output
    thought = final.output[0]
    assert thought.type == "reasoning" and thought.content is not None, final.output
    assert thought.content[0].text == THOUGHT and thought.status == "completed"


def test_a_reasoning_item_sent_back_is_dropped(
    fake: tuple[FakeOpenAI, str], server: LiveServer
) -> None:
    # The next turn's input holds the answer's output, its reasoning item as the SDK
    # gives it back: taken, and not sent on (upstreams ignore an earlier turn's reasoning).
    c = sdk(server)
    r = c.responses.create(model="thinks", input="hi")
    history = [item.model_dump(exclude_none=True) for item in r.output]
    # A history from elsewhere may hold encrypted reasoning too.
    sealed = {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": "gAAA"}
    turn = [
        {"role": "user", "content": "hi"},
        *history,
        sealed,
        {"role": "user", "content": "more"},
    ]
    for stream in (False, True):
        answer = httpx.post(
            server.url + "/v1/responses",
            json={"model": "thinks", "input": turn, "stream": stream},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        sent = fake[0].requests[-1]["messages"]
        assert sent == [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": WORDS},
            {"role": "user", "content": "more"},
        ], sent


def test_a_responses_fallback_answers_after_a_failure_before_any_output(
    server: LiveServer,
) -> None:
    # Nothing has reached the client when the first route fails (its upstream's stream
    # fails before any output): the route asks again, then the fallback answers, its
    # reasoning shown; the status line waited for it.
    r = ask(server, "/v1/responses", "first-fails")
    assert r.status_code == 200, r.text
    data = sse(r)
    assert kinds(data) == THOUGHT_EVENTS, data
    output = data[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message"], output
    assert output[0]["content"][0]["text"] == THOUGHT, output
    ev = event(server, r)
    routes = [(a["route"], a["error"]) for a in ev["attempts"]]
    assert routes == [("first-fails", "upstream_error")] * 3 + [("thinks", None)], ev
    # Without any output at all, the failure is the HTTP error the API gives.
    r = ask(server, "/v1/responses", "broken")
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text
    assert [a["error"] for a in event(server, r)["attempts"]] == ["upstream_error"] * 3


def test_the_reasoning_tokens_an_upstream_counts_are_reported(server: LiveServer) -> None:
    # OpenAI's usage.completion_tokens_details.reasoning_tokens: carried in the native
    # usage, chat completions' and the Responses API's, and the log; left out (0 in the
    # Responses API, whose type requires it) when the upstream gave none.
    c = sdk(server)
    msgs = [{"role": "user", "content": "hi"}]
    known = {"reasoning_tokens": REASONING_TOKENS}
    for model, details in (("thinks", known), ("plain", None), ("cached", None)):
        r = c.chat.completions.with_raw_response.create(model=model, messages=msgs)  # type: ignore[arg-type]
        usage = r.parse().usage
        assert usage is not None
        got = usage.completion_tokens_details
        assert (got and got.model_dump(exclude_none=True)) == details, (model, got)
        ev = event(server, r.http_response)  # type: ignore[arg-type]
        assert ev.get("reasoning_tokens") == (details and REASONING_TOKENS), ev
        body = {"model": model, "stream": True, "messages": msgs}
        body["stream_options"] = {"include_usage": True}
        last = sse(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30))[-1]
        assert last["usage"].get("completion_tokens_details") == details, (model, last)
        for stream in (True, False):
            native = ask(server, "/api/v1/chat", model, stream)
            usage = ndjson(native.text)[-1]["usage"] if stream else native.json()["usage"]
            assert usage.get("completion_tokens_details") == details, (model, usage)
        answer = c.responses.create(model=model, input="hi")
        assert answer.usage is not None
        assert answer.usage.output_tokens_details.reasoning_tokens == (
            REASONING_TOKENS if details else 0
        ), (model, answer.usage)
        with c.responses.stream(model=model, input="hi") as stream_:
            final = stream_.get_final_response()
        assert final.usage is not None
        assert final.usage.output_tokens_details.reasoning_tokens == (
            REASONING_TOKENS if details else 0
        )
