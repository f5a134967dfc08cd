"""What the model lists say a route's model can do: `images` (Ollama's `vision`) where its
backend sends images on or a fallback the key may use does, so clients offer attachments
only there, and `embeddings` (Ollama's `embedding`) where it makes vectors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import ollama
import pytest

from tests.live import LiveServer, free_port, run_stella

ALL = "sk-caps-all-0123456789"
BLIND = "sk-caps-blind-0123456789"


def auth(key: str = ALL) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    # Nothing listens at the upstreams' address: a model list asks none of them.
    nowhere = f"http://127.0.0.1:{free_port()}"
    config = {
        "backends": {
            "oa": {"kind": "openai", "base_url": nowhere + "/v1"},
            "cl": {"kind": "anthropic", "base_url": nowhere, "api_key_env": "CAPS_KEY"},
            "ol": {"kind": "ollama", "base_url": nowhere},
            # The operator's word that the model behind reads text only.
            "oa-text": {"kind": "openai", "base_url": nowhere + "/v1", "images": False},
            "ol-text": {"kind": "ollama", "base_url": nowhere, "images": False},
        },
        "models": {
            "routes": {
                "gpt": {"backend": "oa", "upstream_model": "gpt"},
                "claude": {"backend": "cl", "upstream_model": "claude"},
                "llava": {"backend": "ol", "upstream_model": "llava"},
                "coder": {"backend": "oa-text", "upstream_model": "coder"},
                "qwen": {"backend": "ol-text", "upstream_model": "qwen"},
                # Text only, a reader behind it: a user's images are answered there.
                "coder-eyes": {
                    "backend": "oa-text",
                    "upstream_model": "coder",
                    "fallbacks": ["qwen", "gpt"],
                },
            }
        },
        "auth": {
            "keys": {
                "all": {"sha256": hashlib.sha256(ALL.encode()).hexdigest()},
                # May use the text-only route and its text-only fallback, not the reader.
                "blind": {
                    "sha256": hashlib.sha256(BLIND.encode()).hexdigest(),
                    "models": ["coder-eyes", "qwen"],
                },
            }
        },
    }
    with run_stella(config, env={"CAPS_KEY": "k"}) as live:
        yield live


EXPECTED = {
    "echo": ["chat", "tools", "embeddings"],
    "gpt": ["chat", "tools", "images", "embeddings"],
    "claude": ["chat", "tools", "images"],
    "llava": ["chat", "tools", "images", "embeddings"],
    "coder": ["chat", "tools", "embeddings"],
    "qwen": ["chat", "tools", "embeddings"],
    "coder-eyes": ["chat", "tools", "images", "embeddings"],
}
OLLAMA_WORDS = {"tools": "tools", "images": "vision", "embeddings": "embedding"}


def test_the_native_list_says_which_models_read_images(server: LiveServer) -> None:
    models = httpx.get(server.url + "/api/v1/models", headers=auth()).json()["models"]
    got = {m["name"]: m["capabilities"] for m in models}
    assert got == EXPECTED, got


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_ollamas_show_says_vision_where_images_are_read(server: LiveServer, model: str) -> None:
    shown = ollama.Client(host=server.url, headers=auth()).show(model)
    words = [OLLAMA_WORDS[c] for c in EXPECTED[model] if c != "chat"]
    assert shown.capabilities == ["completion", *words], shown


def test_a_fallback_the_key_may_not_use_adds_no_images(server: LiveServer) -> None:
    # `coder-eyes` reads images through `gpt` alone, which this key may not use.
    models = httpx.get(server.url + "/api/v1/models", headers=auth(BLIND)).json()["models"]
    got = {m["name"]: m["capabilities"] for m in models}
    assert got == {
        "coder-eyes": ["chat", "tools", "embeddings"],
        "qwen": ["chat", "tools", "embeddings"],
    }, got
    shown = ollama.Client(host=server.url, headers=auth(BLIND)).show("coder-eyes")
    assert shown.capabilities == ["completion", "tools", "embedding"], shown
