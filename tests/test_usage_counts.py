"""Token counts no upstream could mean (below 0, or past 2**31-1) are not taken: the
call's usage is stella's own count (`usage_estimated`), for chats and embed calls, on
OpenAI-compatible, Ollama and Anthropic backends, through a real stella on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes import anthropic as fake_anthropic
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

KEY = "sk-counts-1234"  # 2000 tokens a minute: a count of 10**15 would lock it out


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    up, ol, claude = FakeOpenAI(), FakeOllama(), FakeAnthropic()
    with serve(up.app) as up_url, serve(ol.app) as ol_url, serve(claude.app) as claude_url:
        config = {
            "backends": {
                "up": {"kind": "openai", "base_url": up_url + "/v1"},
                "ol": {"kind": "ollama", "base_url": ol_url},
                "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CK"},
            },
            "models": {
                "routes": {
                    "up": {"backend": "up", "upstream_model": "bogus-usage"},
                    "ol": {"backend": "ol", "upstream_model": "bogus-counts"},
                    "claude": {"backend": "claude", "upstream_model": "claude-bogus-usage"},
                }
            },
            "auth": {
                "keys": {
                    "k": {
                        "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                        "tokens_per_minute": 2000,
                    }
                }
            },
        }
        with run_stella(config, {"CK": fake_anthropic.KEY}) as live:
            yield live


def post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    r = httpx.post(
        server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r


def event_of(server: LiveServer, r: httpx.Response) -> dict[str, Any]:
    rid = r.headers["x-request-id"]
    return server.wait_event(lambda e: e["request_id"] == rid)


@pytest.mark.parametrize("model", ["up", "ol", "claude"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_chats_counts_out_of_range_are_estimated(
    server: LiveServer, model: str, stream: bool
) -> None:
    body = {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "how many tokens is this prompt"}],
    }
    for _ in range(3):  # a key with 2000 tokens a minute is never locked out
        r = post(server, "/api/v1/chat", body)
    ev = event_of(server, r)
    assert ev["usage_estimated"] is True
    # The prompt's estimate (its characters over four), the pieces stella read.
    assert 0 < ev["prompt_tokens"] < 50 and 0 < ev["completion_tokens"] < 50, ev
    assert "cached_tokens" not in ev
    assert ev.get("load_ms", 0) < 60_000  # Ollama's load_duration of 10**30 ns not taken
    last = r.text.strip().splitlines()[-1] if stream else r.text
    usage = httpx.Response(200, content=last).json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        ev["prompt_tokens"],
        ev["completion_tokens"],
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("model", ["up", "ol"])
def test_an_embed_calls_count_out_of_range_is_estimated(server: LiveServer, model: str) -> None:
    for _ in range(3):
        r = post(server, "/api/v1/embed", {"model": model, "input": "x" * 40})
    assert r.json()["usage"] == {"prompt_tokens": 10, "total_tokens": 10}
    ev = event_of(server, r)
    assert ev["usage_estimated"] is True and ev["prompt_tokens"] == 10
    assert ev.get("load_ms", 0) < 60_000
