"""A reasoning model's thinking through the Anthropic dialect of a live stella: thinking
blocks when the request turns thinking on, the text alone when it does not."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from tests.fakes.openai import REASONING
from tests.live import LiveServer
from tests.test_reasoning import THOUGHT, WORDS, event, fake, server, sse

__all__ = ["fake", "server"]  # the live stella and its upstream, shared with test_reasoning

ON: list[dict[str, Any]] = [
    {"type": "enabled", "budget_tokens": 1024},
    {"type": "adaptive"},
    {"type": "adaptive", "display": "summarized"},
]
OFF: list[dict[str, Any] | None] = [
    None,
    {"type": "disabled"},
    {"type": "adaptive", "display": "omitted"},
]


def ask(
    server: LiveServer, model: str, thinking: dict[str, Any] | None, stream: bool = True
) -> httpx.Response:
    """A Messages API request for `model`, with `thinking` when given."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 50,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if thinking is not None:
        body["thinking"] = thinking
    return httpx.post(server.url + "/v1/messages", json=body, timeout=30)


def blocks(r: httpx.Response) -> list[dict[str, Any]]:
    """A stream's content blocks as the events built them, in order."""
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = []
    for d in sse(r):
        if d["type"] == "content_block_start":
            assert d["index"] == len(out), d
            out.append({**d["content_block"], "deltas": [], "stopped": False})
        elif d["type"] == "content_block_delta":
            block = out[d["index"]]
            assert not block["stopped"], d
            block["deltas"].append(d["delta"])
        elif d["type"] == "content_block_stop":
            out[d["index"]]["stopped"] = True
    assert all(b["stopped"] for b in out), out
    return out


@pytest.mark.parametrize("thinking", ON)
def test_thinking_streams_as_a_thinking_block_before_the_text(
    server: LiveServer, thinking: dict[str, Any]
) -> None:
    got = blocks(ask(server, "thinks", thinking))
    assert [b["type"] for b in got] == ["thinking", "text"], got
    first, second = got
    assert first["thinking"] == "" and first["signature"] == "", first
    thoughts = [d for d in first["deltas"] if d["type"] == "thinking_delta"]
    assert "".join(d["thinking"] for d in thoughts) == THOUGHT, first
    # The API's order: the thinking, then the block's signature just before its end.
    assert first["deltas"][-1] == {"type": "signature_delta", "signature": ""}, first
    assert len(first["deltas"]) == len(thoughts) + 1, first
    assert "".join(d["text"] for d in second["deltas"]) == WORDS, second


@pytest.mark.parametrize("thinking", OFF)
def test_without_thinking_on_the_answer_is_the_text_alone(
    server: LiveServer, thinking: dict[str, Any] | None
) -> None:
    got = blocks(ask(server, "thinks", thinking))
    assert [b["type"] for b in got] == ["text"], got
    r = ask(server, "thinks", thinking, stream=False)
    assert r.status_code == 200, r.text
    assert r.json()["content"] == [{"type": "text", "text": WORDS}], r.text


def test_thinking_between_pieces_of_text_is_a_block_of_its_own(server: LiveServer) -> None:
    # Interleaved thinking: text, thinking, text, each its own block, in the stream's order.
    got = blocks(ask(server, "thinks-between-apart", {"type": "adaptive"}))
    assert [b["type"] for b in got] == ["text", "thinking", "text"], got
    assert got[1]["deltas"][0] == {"type": "thinking_delta", "thinking": REASONING[0]}, got


def test_reasoning_and_text_in_one_delta_are_both_kept(server: LiveServer) -> None:
    got = blocks(ask(server, "thinks-says", {"type": "adaptive"}))
    assert [b["type"] for b in got] == ["thinking", "text"], got
    said = "".join(d.get("thinking", "") for d in got[0]["deltas"])
    assert said == THOUGHT and "".join(d["text"] for d in got[1]["deltas"]) == WORDS, got


@pytest.mark.parametrize("thinking", ON)
def test_a_whole_answer_has_its_thinking_block_first(
    server: LiveServer, thinking: dict[str, Any]
) -> None:
    r = ask(server, "thinks", thinking, stream=False)
    assert r.status_code == 200, r.text
    assert r.json()["content"] == [
        {"type": "thinking", "thinking": THOUGHT, "signature": ""},
        {"type": "text", "text": WORDS},
    ], r.text


def test_the_sdk_reads_the_thinking_and_a_turn_sends_it_back(server: LiveServer) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    with client.messages.stream(
        model="thinks",
        max_tokens=50,
        thinking={"type": "adaptive"},
        messages=[{"role": "user", "content": "hi"}],
    ) as stream:
        thought = "".join(e.thinking for e in stream if e.type == "thinking")
        final = stream.get_final_message()
    assert thought == THOUGHT, thought
    assert [b.type for b in final.content] == ["thinking", "text"], final
    # The SDK's next turn sends the block back as it came: taken and dropped.
    again = client.messages.create(
        model="thinks",
        max_tokens=50,
        thinking={"type": "adaptive"},
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [b.model_dump() for b in final.content]},
            {"role": "user", "content": "and then?"},
        ],
    )
    assert [b.type for b in again.content] == ["thinking", "text"], again


def test_a_failure_after_thinking_was_shown_ends_the_stream(server: LiveServer) -> None:
    # The client has the thinking: a switch of model now would be worse than the error.
    r = ask(server, "falls", {"type": "adaptive"})
    assert r.status_code == 200, r.text
    data = sse(r)
    said = "".join(d["delta"].get("thinking", "") for d in data if "delta" in d)
    assert said == THOUGHT, data
    assert data[-1]["type"] == "error", data
    ev = event(server, r)
    assert [a["error"] for a in ev["attempts"]] == ["upstream_error"], ev


def test_without_thinking_on_a_failure_while_the_model_thinks_is_retried(
    server: LiveServer,
) -> None:
    # Nothing was shown: the route asks again and a fallback answers, as before.
    r = ask(server, "falls", {"type": "disabled"})
    assert [b["type"] for b in blocks(r)] == ["text"], r.text
    ev = event(server, r)
    assert [a["route"] for a in ev["attempts"]] == ["falls"] * 3 + ["thinks"], ev


@pytest.mark.parametrize(
    "thinking", [{}, {"type": 1}, "on", {"type": "enabled", "budget_tokens": "x"}]
)
def test_a_bad_thinking_is_a_400_naming_it(server: LiveServer, thinking: Any) -> None:
    r = ask(server, "thinks", thinking)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "thinking" in err["message"], err
