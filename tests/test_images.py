"""Images in user messages through a live stella: each backend that reads them gets them
in its API's shape (OpenAI-compatible, Anthropic, Ollama fakes), a route whose backend
reads text only answers 400 naming the image (or falls back to one that reads them), bad
images are 400s by path, and no image data reaches the log."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from stella.calls import prompt_estimate
from stella.images import IMAGE_TOKENS, MAX_IMAGES, sniff
from stella.protocol import ChatRequest, Image, Message
from tests.fakes.anthropic import KEY, FakeAnthropic
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

# A 1x1 PNG, and the start of a JPEG, a GIF and a WebP (their magic bytes).
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 20).decode()
GIF = base64.b64encode(b"GIF89a" + b"\x00" * 20).decode()
WEBP = base64.b64encode(b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 20).decode()
URL = "https://example.com/cat.png"

Upstreams = tuple[FakeAnthropic, FakeOpenAI, FakeOllama, LiveServer]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    claude, gpt, llama = FakeAnthropic(), FakeOpenAI(), FakeOllama()
    with (
        serve(claude.app) as claude_url,
        serve(gpt.app) as gpt_url,
        serve(llama.app, "/api/version") as llama_url,
    ):
        config = {
            "backends": {
                "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CK"},
                "gpt": {"kind": "openai", "base_url": gpt_url + "/v1"},
                # The same upstream, which may fetch images by URL.
                "gpt-urls": {"kind": "openai", "base_url": gpt_url + "/v1", "image_urls": True},
                "claude-data": {
                    "kind": "anthropic",
                    "base_url": claude_url,
                    "api_key_env": "CK",
                    "image_urls": False,
                },
                "llama": {"kind": "ollama", "base_url": llama_url},
                # The operator's word that these upstreams' models read text only.
                "gpt-text": {"kind": "openai", "base_url": gpt_url + "/v1", "images": False},
                "llama-text": {"kind": "ollama", "base_url": llama_url, "images": False},
            },
            "models": {
                "routes": {
                    "sonnet": {"backend": "claude", "upstream_model": "claude-ok"},
                    "gpt": {"backend": "gpt", "upstream_model": "ok"},
                    "gpt-urls": {"backend": "gpt-urls", "upstream_model": "ok"},
                    "sonnet-data": {"backend": "claude-data", "upstream_model": "claude-ok"},
                    "llama": {"backend": "llama", "upstream_model": "llama3"},
                    # Text only first, a reader behind it: the reader answers.
                    "seeing": {"backend": "echo", "fallbacks": ["gpt"]},
                    # Ollama first, for an image by URL that only the fallback can take.
                    "local-eyes": {
                        "backend": "llama",
                        "upstream_model": "llama3",
                        "fallbacks": ["gpt-urls"],
                    },
                    "blind": {"backend": "echo", "fallbacks": ["echo"]},
                    # llama.cpp without a projector (the fake refuses any image), said so.
                    "coder": {"backend": "gpt-text", "upstream_model": "text-only"},
                    "coder-eyes": {
                        "backend": "gpt-text",
                        "upstream_model": "text-only",
                        "fallbacks": ["gpt"],
                    },
                    "llama-text": {"backend": "llama-text", "upstream_model": "llama3"},
                    # The same, not said: stella learns it from the upstream's refusal.
                    "coder-unsaid": {"backend": "gpt", "upstream_model": "text-only"},
                    "qwen-unsaid": {
                        "backend": "llama",
                        "upstream_model": "text-only",
                        "retries": 0,
                    },
                    # A reader that fails, a text-only fallback behind it.
                    "failing-eyes": {
                        "backend": "gpt",
                        "upstream_model": "status-500",
                        "retries": 0,
                        "fallbacks": ["echo"],
                    },
                }
            },
            "log": {"content": True},
        }
        with run_stella(config, {"CK": KEY}) as server:
            yield claude, gpt, llama, server


def native(server: LiveServer, model: str, *messages: dict[str, Any]) -> httpx.Response:
    body = {"model": model, "stream": False, "messages": list(messages)}
    return httpx.post(server.url + "/api/v1/chat", json=body, timeout=30)


def user(text: str, *images: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": text, "images": list(images)}


def test_an_openai_compatible_upstream_gets_image_url_parts_before_the_text(
    upstreams: Upstreams,
) -> None:
    _, gpt, _, server = upstreams
    r = native(
        server,
        "gpt-urls",
        {"role": "system", "content": "be brief"},
        user(
            "what is this?", {"data": PNG, "media_type": "image/png"}, {"url": URL, "detail": "low"}
        ),
    )
    assert r.status_code == 200, r.text
    sent = gpt.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "be brief"}  # a string, as before
    assert sent[1]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": URL, "detail": "low"}},
        {"type": "text", "text": "what is this?"},
    ]


def test_an_anthropic_upstream_gets_image_blocks_and_the_breakpoint_stays_last(
    upstreams: Upstreams,
) -> None:
    claude, _, _, server = upstreams
    image = {"data": PNG, "media_type": "image/png"}
    r = native(server, "sonnet", {**user("describe", image, {"url": URL}), "cache": "5m"})
    assert r.status_code == 200, r.text
    assert claude.requests[-1]["messages"] == [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": URL}},
                {"type": "text", "text": "describe", "cache_control": {"type": "ephemeral"}},
            ],
        }
    ]
    # An image alone is a message the API takes: no text block of only whitespace.
    r = native(server, "sonnet", user(" ", image))
    assert r.status_code == 200, r.text
    assert claude.requests[-1]["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    ]


def test_an_ollama_upstream_gets_base64_and_a_url_is_refused_by_path(
    upstreams: Upstreams,
) -> None:
    _, gpt, llama, server = upstreams
    r = native(server, "llama", user("what is this?", {"data": PNG, "media_type": "image/png"}))
    assert r.status_code == 200, r.text
    assert llama.requests[-1]["messages"][-1] == {
        "role": "user",
        "content": "what is this?",
        "images": [PNG],
    }
    sent = len(llama.requests)
    r = native(server, "llama", user("and this?", {"url": URL}))
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "$.messages[0].images[0].url: model 'llama' takes images only as data, not by URL "
        "(stella fetches no URL itself)"
    )
    assert len(llama.requests) == sent  # never sent
    # With a fallback that takes URLs, it answers.
    asked = len(gpt.requests)
    r = native(server, "local-eyes", user("and this?", {"url": URL}))
    assert r.status_code == 200, r.text
    assert len(llama.requests) == sent and len(gpt.requests) == asked + 1


@pytest.mark.parametrize("model", ["gpt", "sonnet-data"])
def test_an_image_by_url_reaches_no_backend_whose_image_urls_is_off(
    upstreams: Upstreams, model: str
) -> None:
    # An OpenAI-compatible server may be self-hosted and fetch the URL inside the
    # operator's network (cloud metadata, admin ports): by default it gets none.
    claude, gpt, _, server = upstreams
    sent = len(claude.requests), len(gpt.requests)
    metadata = {"url": "http://169.254.169.254/latest/meta-data/"}
    r = native(
        server, model, user("what is this?", {"data": PNG, "media_type": "image/png"}, metadata)
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (
        f"$.messages[0].images[1].url: model {model!r} takes images only as data, not by URL "
        "(stella fetches no URL itself)"
    )
    assert (len(claude.requests), len(gpt.requests)) == sent
    # Images as data still go.
    r = native(server, model, user("what is this?", {"data": PNG, "media_type": "image/png"}))
    assert r.status_code == 200, r.text


def test_a_text_only_route_answers_400_naming_the_image(upstreams: Upstreams) -> None:
    *_, server = upstreams
    for model in ("echo", "blind"):
        r = native(
            server,
            model,
            {"role": "user", "content": "hi"},
            user("what is this?", {"data": PNG, "media_type": "image/png"}),
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_request"
        assert r.json()["error"]["message"] == (
            f"$.messages[1].images[0]: model {model!r} reads text only: images are not supported"
        )
    # An empty list is no image.
    assert native(server, "echo", user("hi")).status_code == 200


def test_a_text_only_route_falls_back_to_one_that_reads_images(upstreams: Upstreams) -> None:
    _, gpt, _, server = upstreams
    asked = len(gpt.requests)
    r = native(server, "seeing", user("what is this?", {"data": PNG, "media_type": "image/png"}))
    assert r.status_code == 200, r.text
    assert r.json()["backend"] == "gpt"
    assert len(gpt.requests) == asked + 1
    assert gpt.requests[-1]["messages"][0]["content"][0]["type"] == "image_url"
    rid = r.headers["x-request-id"]
    event = server.wait_event(lambda e: e.get("request_id") == rid)
    assert [a["error"] for a in event["attempts"]] == ["text_only", None]
    assert event["images"] == 1


def test_a_text_only_fallback_never_answers_for_a_reader_that_failed(
    upstreams: Upstreams,
) -> None:
    # Its answer would read as one about images it never saw: the reader's error stands.
    _, gpt, _, server = upstreams
    asked = len(gpt.requests)
    r = native(
        server, "failing-eyes", user("what is this?", {"data": PNG, "media_type": "image/png"})
    )
    assert r.status_code >= 500, r.text
    assert len(gpt.requests) == asked + 1
    rid = r.headers["x-request-id"]
    event = server.wait_event(lambda e: e.get("request_id") == rid)
    assert [a["backend"] for a in event["attempts"]] == ["gpt"]
    # Without images the fallback answers as before.
    r = native(server, "failing-eyes", {"role": "user", "content": "hi"})
    assert r.status_code == 200, r.text
    assert r.json()["backend"] == "echo"


@pytest.mark.parametrize(
    ("image", "path", "why"),
    [
        ({"data": "not base64!", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "iVBORw0KGgo", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "iVBO=w0K", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "iVBORw0K===", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "iVBORw0K====", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "iVBORw0\u00e9", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "iVBO\nRw0K", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "iVBO-w0K", "media_type": "image/png"}, ".data", "not valid base64"),
        ({"data": "", "media_type": "image/png"}, ".data", "must not be empty"),
        ({"data": PNG}, ".media_type", "required with data"),
        ({"data": PNG, "media_type": "image/bmp"}, ".media_type", "Invalid enum value"),
        ({"url": "ftp://example.com/a.png"}, ".url", "http or https"),
        ({"url": "file:///etc/passwd"}, ".url", "http or https"),
        ({"url": "http:///a.png"}, ".url", "http or https"),  # no host
        # Whitespace or a control character, which urlsplit strips or keeps.
        ({"url": "http://a b/x.png"}, ".url", "http or https"),
        ({"url": "http://a/x\n.png"}, ".url", "http or https"),
        ({"url": " http://a/x.png"}, ".url", "http or https"),
        ({"url": "http://a/x.png\t"}, ".url", "http or https"),
        ({"url": "http://a/\x00x.png"}, ".url", "http or https"),
        ({"url": "http://a/\x85x.png"}, ".url", "http or https"),
        ({"url": URL, "media_type": "image/png"}, ".media_type", "only with data"),
        ({"url": URL, "data": PNG, "media_type": "image/png"}, "", "exactly one of"),
        ({}, "", "exactly one of"),
        ({"data": PNG, "media_type": "image/png", "detail": "max"}, ".detail", "Invalid"),
    ],
)
def test_a_bad_image_is_a_400_naming_its_path(
    upstreams: Upstreams, image: dict[str, Any], path: str, why: str
) -> None:
    *_, server = upstreams
    r = native(server, "gpt-urls", user("a", {"data": PNG, "media_type": "image/png"}, image))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert why in message
    assert f"$.messages[0].images[1]{path}" in message


def test_images_only_on_a_user_message(upstreams: Upstreams) -> None:
    *_, server = upstreams
    image = {"data": PNG, "media_type": "image/png"}
    r = native(
        server,
        "gpt",
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a", "images": [image]},
    )
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"]
        == "$.messages[1].images: only a user or tool message may carry images"
    )


def test_no_image_data_in_the_log_even_with_content(upstreams: Upstreams) -> None:
    *_, server = upstreams
    marker = base64.b64encode(b"\x89PNG\r\n\x1a\nSECRET-PIXELS" * 8).decode()
    r = native(server, "gpt", user("look", {"data": marker, "media_type": "image/png"}))
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    event = server.wait_event(lambda e: e.get("request_id") == rid)
    assert event["images"] == 1
    assert event["prompt"] == [{"role": "user", "content": "look", "images": 1}]
    assert not [line for line in server.lines() if marker[:40] in line]


def test_an_image_counts_a_fixed_number_of_tokens_in_the_estimate() -> None:
    big = base64.b64encode(b"\x00" * 300_000).decode()
    text = Message(role="user", content="x" * 400)
    with_images = Message(
        role="user",
        content="x" * 400,
        images=[Image(data=big, media_type="image/png"), Image(url=URL)],
    )
    assert prompt_estimate(ChatRequest(messages=[text])) == 100
    assert prompt_estimate(ChatRequest(messages=[with_images])) == 100 + 2 * IMAGE_TOKENS
    # Every message's images count, not the last one's alone.
    one = Message(role="user", content="x" * 400, images=[Image(url=URL)])
    messages = [with_images, Message(role="assistant", content=""), one, text]
    assert prompt_estimate(ChatRequest(messages=messages)) == 300 + 3 * IMAGE_TOKENS


# Used by the dialects' tests below.
FORMATS = {"image/png": PNG, "image/jpeg": JPEG, "image/gif": GIF, "image/webp": WEBP}


# --- the Anthropic dialect ------------------------------------------------------------


def claude_client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def image_block(data: str = PNG, media_type: str = "image/png") -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def test_anthropic_image_blocks_reach_each_backend_in_its_shape(upstreams: Upstreams) -> None:
    claude, gpt, llama, server = upstreams
    content = [{"type": "text", "text": "what is this?"}, image_block()]
    c = claude_client(server)
    for model in ("sonnet", "gpt", "llama"):
        m = c.messages.create(
            model=model,
            max_tokens=20,
            messages=[{"role": "user", "content": content}],  # type: ignore[typeddict-item]
        )
        assert m.content[0].type == "text"
    assert claude.requests[-1]["messages"][-1]["content"] == [
        image_block(),
        {"type": "text", "text": "what is this?"},
    ]
    assert gpt.requests[-1]["messages"][-1]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "text", "text": "what is this?"},
    ]
    assert llama.requests[-1]["messages"][-1] == {
        "role": "user",
        "content": "what is this?",
        "images": [PNG],
    }
    # A url source goes to Anthropic as one.
    by_url = {"type": "image", "source": {"type": "url", "url": URL}}
    c.messages.create(
        model="sonnet",
        max_tokens=20,
        messages=[{"role": "user", "content": [by_url, {"type": "text", "text": "and?"}]}],  # type: ignore[typeddict-item]
    )
    assert claude.requests[-1]["messages"][-1]["content"][0] == by_url


def test_anthropic_count_tokens_sends_the_images(upstreams: Upstreams) -> None:
    claude, *_, server = upstreams
    counted = claude_client(server).messages.count_tokens(
        model="sonnet",
        messages=[{"role": "user", "content": [image_block(), {"type": "text", "text": "hi"}]}],  # type: ignore[typeddict-item]
    )
    assert counted.input_tokens > 0
    assert claude.counts[-1]["messages"][-1]["content"][0] == image_block()
    with pytest.raises(anthropic.BadRequestError, match="reads text only"):
        claude_client(server).messages.count_tokens(
            model="echo",
            messages=[{"role": "user", "content": [image_block()]}],  # type: ignore[typeddict-item]
        )


def test_anthropic_images_refused_where_they_cannot_go(upstreams: Upstreams) -> None:
    *_, server = upstreams
    c = claude_client(server)
    cases: list[tuple[str, list[dict[str, Any]], str]] = [
        ("echo", [image_block()], r"\$\.messages\[0\]\.images\[0\]: model 'echo' reads text only"),
        ("gpt", [image_block("%%%")], r"\$\.messages\[0\]\.content\[0\]\.source\.data: not valid"),
        (
            "gpt",
            [image_block(media_type="image/tiff")],
            r"\$\.messages\[0\]\.content\[0\]\.source\.media_type: image type 'image/tiff'",
        ),
        (
            "gpt",
            [{"type": "image", "source": {"type": "url", "url": "ftp://x/a.png"}}],
            r"\$\.messages\[0\]\.content\[0\]\.source\.url: an image URL must be",
        ),
        (
            "gpt",
            [{"type": "image", "source": {"type": "file", "file_id": "file_1"}}],
            r"\$\.messages\[0\]\.content\[0\]\.source\.type: 'file' is not supported",
        ),
    ]
    for model, content, match in cases:
        with pytest.raises(anthropic.BadRequestError, match=match):
            c.messages.create(
                model=model,
                max_tokens=5,
                messages=[{"role": "user", "content": content}],  # type: ignore[typeddict-item]
            )
    # An assistant's image is refused by its path, as before.
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[1\]\.content\[0\]\.type"):
        c.messages.create(
            model="gpt",
            max_tokens=5,
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [image_block()]},  # type: ignore[list-item]
            ],
        )


# --- the Ollama dialect ---------------------------------------------------------------


def test_ollama_images_reach_each_backend_in_its_shape(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    # As `ollama.chat(..., images=[path])` sends them: the file's bytes in base64.
    claude, gpt, llama, server = upstreams
    picture = tmp_path / "cat.png"
    picture.write_bytes(base64.b64decode(PNG))
    c = ollama.Client(host=server.url)
    for model in ("llama", "gpt", "sonnet"):
        r = c.chat(
            model=model,
            messages=[{"role": "user", "content": "what is this?", "images": [picture]}],
        )
        assert r.message.role == "assistant"
    assert llama.requests[-1]["messages"][-1]["images"] == [PNG]
    assert gpt.requests[-1]["messages"][-1]["content"][0] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PNG}"},
    }
    assert claude.requests[-1]["messages"][-1]["content"][0] == image_block()
    # /api/generate's images, too.
    r2 = c.generate(model="llama", prompt="and this?", images=[picture])
    assert r2.done
    sent = llama.requests[-1]
    assert sent["messages"][-1] == {"role": "user", "content": "and this?", "images": [PNG]}


@pytest.mark.parametrize("media_type", sorted(FORMATS))
def test_ollama_images_are_typed_by_their_first_bytes(
    upstreams: Upstreams, media_type: str
) -> None:
    claude, *_, server = upstreams
    data = FORMATS[media_type]
    r = httpx.post(
        server.url + "/api/chat",
        json={
            "model": "sonnet",
            "stream": False,
            "messages": [{"role": "user", "content": "what?", "images": [data]}],
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert claude.requests[-1]["messages"][-1]["content"][0] == image_block(data, media_type)


def test_ollama_images_refused_where_they_cannot_go(upstreams: Upstreams) -> None:
    *_, server = upstreams
    bmp = base64.b64encode(b"BM" + b"\x00" * 30).decode()
    for messages, said in (
        (
            [{"role": "user", "content": "a", "images": [PNG, bmp]}],
            "$.messages[0].images[1]: not an image",
        ),
        (
            [{"role": "user", "content": "a", "images": ["%%"]}],
            "$.messages[0].images[0]: not valid base64",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "images": [PNG]},
            ],
            "$.messages[1].images: only a user or tool message's images are taken",
        ),
    ):
        r = httpx.post(
            server.url + "/api/chat",
            json={"model": "llama", "stream": False, "messages": messages},
            timeout=30,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(said), r.text


# --- the Responses dialect ------------------------------------------------------------


def test_responses_input_image_parts_reach_the_upstream(upstreams: Upstreams) -> None:
    _, gpt, _, server = upstreams
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    content = [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "low"},
    ]
    r = c.responses.create(model="gpt", input=[{"role": "user", "content": content}])  # type: ignore[list-item,misc]
    assert r.status == "completed"
    assert gpt.requests[-1]["messages"][-1]["content"] == [
        {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"},
        },
        {"type": "text", "text": "what is this?"},
    ]
    with pytest.raises(openai.BadRequestError, match="reads text only"):
        c.responses.create(model="echo", input=[{"role": "user", "content": content}])  # type: ignore[list-item,misc]


# --- the cap on images in a request -----------------------------------------------------


def _many(n: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """A request of `n` images in each dialect: its endpoint and body."""
    data_url = f"data:image/png;base64,{PNG}"
    parts = [{"type": "image_url", "image_url": {"url": data_url}}] * n
    blocks = [image_block()] * n
    inputs = [{"type": "input_image", "image_url": data_url}] * n
    return {
        "native": (
            "/api/v1/chat",
            {
                "model": "gpt",
                "stream": False,
                "messages": [user("a", *[{"data": PNG, "media_type": "image/png"}] * n)],
            },
        ),
        "openai": (
            "/v1/chat/completions",
            {
                "model": "gpt",
                "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "a"}]}],
            },
        ),
        "responses": (
            "/v1/responses",
            {
                "model": "gpt",
                "input": [
                    {"role": "user", "content": [*inputs, {"type": "input_text", "text": "a"}]}
                ],
            },
        ),
        "anthropic": (
            "/v1/messages",
            {
                "model": "sonnet",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": "a"}]}],
            },
        ),
        "ollama": (
            "/api/chat",
            {
                "model": "gpt",
                "stream": False,
                "messages": [{"role": "user", "content": "a", "images": [PNG] * n}],
            },
        ),
    }


# The first image past the cap, by each dialect's path.
PAST_CAP = {
    "native": "messages[0].images[600]",
    "openai": "messages[0].content[600].image_url",
    "responses": "input[0].content[600]",
    "anthropic": "messages[0].content[600]",
    "ollama": "messages[0].images[600]",
}


@pytest.mark.parametrize("dialect", sorted(PAST_CAP))
def test_a_request_takes_at_most_max_images(upstreams: Upstreams, dialect: str) -> None:
    # A cap bounds what one request's checks cost the event loop (each image is looked
    # at); at it, Anthropic's documented most for a request, the request goes on.
    *_, server = upstreams
    assert MAX_IMAGES == 600
    endpoint, body = _many(MAX_IMAGES + 1)[dialect]
    r = httpx.post(server.url + endpoint, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert f"$.{PAST_CAP[dialect]}: too many images: at most 600 in a request" in r.text
    endpoint, body = _many(MAX_IMAGES)[dialect]
    r = httpx.post(server.url + endpoint, json=body, timeout=30)
    assert r.status_code == 200, r.text


def _tools_then_user(n: int, with_user: bool = True) -> dict[str, tuple[str, dict[str, Any]]]:
    """A request in each dialect whose tool result holds `n` images, then (`with_user`)
    a user message with one image of the client's own."""
    data_url = f"data:image/png;base64,{PNG}"
    data = {"data": PNG, "media_type": "image/png"}
    call = {"id": "c1", "function": {"name": "shot", "arguments": {}}}
    start = [{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call]}]
    own: list[dict[str, Any]] = [user("look", data)] if with_user else []
    blocks = [{"type": "text", "text": "look"}, image_block()] if with_user else []
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [image_block()] * n}
    turns = read_turns()
    turns[-1]["content"] = [result, *blocks]
    inputs: list[dict[str, Any]] = [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
        {
            "type": "function_call_output",
            "call_id": "c1",
            "output": [{"type": "input_image", "image_url": data_url}] * n,
        },
    ]
    if with_user:
        inputs.append(
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": data_url},
                    {"type": "input_text", "text": "look"},
                ],
            }
        )
    ollama_own = [{"role": "user", "content": "look", "images": [PNG]}] if with_user else []
    return {
        "native": (
            "/api/v1/chat",
            {
                "model": "gpt",
                "stream": False,
                "messages": [
                    *start,
                    {"role": "tool", "tool_call_id": "c1", "images": [data] * n},
                    *own,
                ],
            },
        ),
        "responses": ("/v1/responses", {"model": "gpt", "input": inputs}),
        "anthropic": ("/v1/messages", {"model": "gpt", "max_tokens": 5, "messages": turns}),
        "ollama": (
            "/api/chat",
            {
                "model": "gpt",
                "stream": False,
                "messages": [
                    {"role": "user", "content": "go"},
                    {"role": "assistant", "tool_calls": [{"function": call["function"]}]},
                    {"role": "tool", "tool_name": "shot", "content": "", "images": [PNG] * n},
                    *ollama_own,
                ],
            },
        ),
    }


@pytest.mark.parametrize("dialect", ["native", "responses", "anthropic", "ollama"])
@pytest.mark.parametrize("with_user", [True, False], ids=["user-image", "tools-alone"])
def test_a_users_image_counts_before_tool_results_and_theirs_past_the_cap_are_notes(
    upstreams: Upstreams, dialect: str, with_user: bool
) -> None:
    # A session whose tools returned 600 screenshots: the client's own image is taken,
    # the last tool image past the cap is a note, in every dialect that carries them.
    _, gpt, _, server = upstreams
    endpoint, body = _tools_then_user(MAX_IMAGES + (0 if with_user else 1), with_user)[dialect]
    r = httpx.post(server.url + endpoint, json=body, timeout=60)
    assert r.status_code == 200, r.text
    sent = gpt.requests[-1]["messages"]
    assert _image_parts(gpt.requests[-1]) == MAX_IMAGES
    past = f"[image omitted: more than {MAX_IMAGES} images in the request]"
    tool = next(m for m in sent if m["role"] == "tool")
    assert tool["content"].count(past) == 1, tool
    if with_user:
        # The last user message: the tool's images, then the client's own and its text.
        own = sent[-1]["content"]
        assert [p["type"] for p in own[-2:]] == ["image_url", "text"]
        assert own[-1]["text"] == "look"


# --- a media type its bytes do not match ---------------------------------------------

GIF87 = base64.b64encode(b"GIF87a" + b"\x00" * 20).decode()


def _typed(dialect: str, data: str, media_type: str) -> tuple[str, dict[str, Any]]:
    """A request in `dialect` with one image of `data` said to be `media_type`."""
    text = {"type": "text", "text": "a"}
    if dialect == "native":
        image = {"data": data, "media_type": media_type}
        return "/api/v1/chat", {"model": "gpt", "stream": False, "messages": [user("a", image)]}
    if dialect == "anthropic":
        content = [image_block(data, media_type), text]
        body = {
            "model": "sonnet",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": content}],
        }
        return "/v1/messages", body
    part = {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    return "/v1/chat/completions", {
        "model": "gpt",
        "messages": [{"role": "user", "content": [part, text]}],
    }


WHERE_TYPED = {
    "native": "messages[0].images[0].media_type",
    "anthropic": "messages[0].content[0].source.media_type",
    "openai": "messages[0].content[0].image_url.url",
}


@pytest.mark.parametrize("dialect", sorted(WHERE_TYPED))
@pytest.mark.parametrize(
    ("data", "media_type", "bytes_are"),
    [
        (JPEG, "image/png", "JPEG"),
        (PNG, "image/jpeg", "PNG"),
        (GIF87, "image/webp", "GIF"),
        (WEBP, "image/gif", "WebP"),
        ("AAAAAAAAAAAAAAAAAAAA", "image/png", "none of PNG, JPEG, GIF or WebP"),
    ],
)
def test_an_image_whose_bytes_are_another_type_is_a_400_naming_its_type(
    upstreams: Upstreams, dialect: str, data: str, media_type: str, bytes_are: str
) -> None:
    # Anthropic's API refuses it ("Image does not match the provided media type"): the
    # client's fault, told as such, never the upstream's 502.
    claude, gpt, _, server = upstreams
    sent = len(claude.requests), len(gpt.requests)
    endpoint, body = _typed(dialect, data, media_type)
    r = httpx.post(server.url + endpoint, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert (
        f"$.{WHERE_TYPED[dialect]}: the image's bytes are {bytes_are}, not {media_type}" in r.text
    )
    assert (len(claude.requests), len(gpt.requests)) == sent


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
def test_image_jpg_is_image_jpeg(upstreams: Upstreams, dialect: str) -> None:
    claude, gpt, _, server = upstreams
    endpoint, body = _typed(dialect, JPEG, "image/jpg")
    r = httpx.post(server.url + endpoint, json=body, timeout=30)
    assert r.status_code == 200, r.text
    if dialect == "anthropic":
        source = claude.requests[-1]["messages"][0]["content"][0]["source"]
        assert source["media_type"] == "image/jpeg"
    else:
        part = gpt.requests[-1]["messages"][0]["content"][0]
        assert part["image_url"]["url"] == f"data:image/jpeg;base64,{JPEG}"


@pytest.mark.parametrize(("data", "kind"), [(GIF87, "image/gif"), (GIF, "image/gif")])
def test_both_gif_signatures_are_sniffed(data: str, kind: str) -> None:
    assert sniff(data, "images[0]") == kind


@pytest.mark.parametrize(
    ("dialect", "where"),
    [("anthropic", "content[0].source.media_type"), ("openai", "content[0].image_url.url")],
)
def test_a_400_repeats_at_most_64_characters_of_a_bad_value(
    upstreams: Upstreams, dialect: str, where: str
) -> None:
    # A megabyte media type is not sent back whole in the error.
    *_, server = upstreams
    endpoint, body = _typed(dialect, PNG, "image/" + "x" * 1_000_000)
    r = httpx.post(server.url + endpoint, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert len(r.content) < 1000
    assert f"$.messages[0].{where}: image type 'image/{'x' * 58}'… is not supported" in r.text
    block = {"type": "image", "source": {"type": "y" * 1_000_000}}
    body = {"model": "sonnet", "max_tokens": 5, "messages": [{"role": "user", "content": [block]}]}
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert len(r.content) < 1000
    assert f"source.type: '{'y' * 64}'… is not supported" in r.text


# --- images in tool results -----------------------------------------------------------


def read_turns(*result: dict[str, Any]) -> list[dict[str, Any]]:
    """Claude Code's conversation after its Read tool opened a screenshot: the tool_result
    holds the file as image blocks (`result`)."""
    use = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "s.png"}}
    return [
        {"role": "user", "content": "what does the screenshot show?"},
        {"role": "assistant", "content": [use]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": list(result)}],
        },
    ]


def claude_code(server: LiveServer, model: str, *result: dict[str, Any]) -> httpx.Response:
    body = {"model": model, "max_tokens": 20, "messages": read_turns(*result)}
    return httpx.post(server.url + "/v1/messages", json=body, timeout=30)


NOTE = "[image omitted: this model reads text only]"
URL_NOTE = "[image omitted: an image by URL, which this model is not sent]"


def test_a_tool_result_image_reaches_an_anthropic_upstream_inside_the_tool_result(
    upstreams: Upstreams,
) -> None:
    claude, *_, server = upstreams
    by_url = {"type": "image", "source": {"type": "url", "url": URL}}
    r = claude_code(server, "sonnet", image_block(), by_url, {"type": "text", "text": "1x1"})
    assert r.status_code == 200, r.text
    assert claude.requests[-1]["messages"][-1] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [image_block(), by_url, {"type": "text", "text": "1x1"}],
            }
        ],
    }
    # The count sends the same tool_result.
    body = {"model": "sonnet", "messages": read_turns(image_block())}
    r = httpx.post(server.url + "/v1/messages/count_tokens", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert claude.counts[-1]["messages"][-1]["content"][0]["content"] == [image_block()]
    # With image_urls off, the image by URL is a note; its data still goes.
    r = claude_code(server, "sonnet-data", image_block(), by_url)
    assert r.status_code == 200, r.text
    assert claude.requests[-1]["messages"][-1]["content"][0]["content"] == [
        image_block(),
        {"type": "text", "text": URL_NOTE},
    ]


def test_a_tool_result_image_on_a_text_only_route_is_a_note(upstreams: Upstreams) -> None:
    # A Claude Code session on echo (or the embedded engine) goes on as before the image:
    # the model reads the note; the route is not left for a fallback that reads images,
    # which a user's image would go to (`seeing`: echo, then gpt).
    _, gpt, _, server = upstreams
    asked = len(gpt.requests)
    for model in ("echo", "blind", "seeing"):
        r = claude_code(server, model, image_block(), {"type": "text", "text": "1x1"})
        assert r.status_code == 200, r.text
        assert r.json()["content"][0]["text"] == f"{NOTE}\n1x1"
    assert len(gpt.requests) == asked
    body = {"model": "echo", "messages": read_turns(image_block())}
    r = httpx.post(server.url + "/v1/messages/count_tokens", json=body, timeout=30)
    assert r.status_code == 200, r.text
    # The native API's tool message takes images too, and so does Ollama's.
    tool = {"role": "tool", "content": "1x1", "tool_call_id": "c1"}
    call = {"id": "c1", "function": {"name": "shot", "arguments": {}}}
    turns = [{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call]}]
    image = {"data": PNG, "media_type": "image/png"}
    r = native(server, "echo", *turns, {**tool, "images": [image, {"url": URL}]})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == f"{NOTE}\n{NOTE}\n1x1"
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "echo", "stream": False, "messages": [*turns, {**tool, "images": [PNG]}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == f"{NOTE}\n1x1"
    schemas = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    said = schemas["Message"]["properties"]["images"]["anyOf"][0]["description"]
    assert said.startswith("a user or tool message's images") and NOTE in said


def test_a_responses_tool_output_image_follows_the_tool_message_to_an_openai_upstream(
    upstreams: Upstreams,
) -> None:
    # Codex's view_image: its function_call_output holds an input_image. A chat
    # completions tool message takes text only: the image follows in a user message.
    _, gpt, _, server = upstreams
    data_url = f"data:image/png;base64,{PNG}"
    shot = {"type": "input_image", "image_url": data_url, "detail": "high"}

    def call(call_id: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "call_id": call_id,
            "name": "view_image",
            "arguments": "{}",
        }

    def output(call_id: str, *parts: dict[str, Any]) -> dict[str, Any]:
        return {"type": "function_call_output", "call_id": call_id, "output": list(parts)}

    body = {
        "model": "gpt",
        "input": [
            {"role": "user", "content": "look at both"},
            call("call_a"),
            call("call_b"),
            output("call_a", {"type": "input_text", "text": "a.png"}, shot),
            output("call_b", shot, {"type": "input_image", "image_url": URL}),
            {"role": "user", "content": "well?"},
        ],
    }
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 200, r.text
    part = {"type": "image_url", "image_url": {"url": data_url, "detail": "high"}}
    # image_urls is off for `gpt`: the image by URL is a note in the tool's text.
    assert gpt.requests[-1]["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c,
                    "type": "function",
                    "function": {"name": "view_image", "arguments": "{}"},
                }
                for c in ("call_a", "call_b")
            ],
        },
        {"role": "tool", "content": "a.png", "tool_call_id": "call_a"},
        {"role": "tool", "content": URL_NOTE, "tool_call_id": "call_b"},
        # The user message after the results takes their images first: no two user
        # messages in a row (some servers' validators refuse them).
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Image returned by tool call call_a (view_image):"},
                part,
                {"type": "text", "text": "Image returned by tool call call_b (view_image):"},
                part,
                {"type": "text", "text": "well?"},
            ],
        },
    ]
    # Where URLs go, the image by URL goes too.
    r = httpx.post(server.url + "/v1/responses", json={**body, "model": "gpt-urls"}, timeout=30)
    assert r.status_code == 200, r.text
    assert gpt.requests[-1]["messages"][4]["content"][-2] == {
        "type": "image_url",
        "image_url": {"url": URL},
    }
    # A result of images alone says where they are, not an empty text.
    assert gpt.requests[-1]["messages"][3]["content"] == "[images in the next message]"
    # On echo, the notes.
    body["input"] = body["input"][:-1]
    r = httpx.post(server.url + "/v1/responses", json={**body, "model": "echo"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == f"{NOTE}\n{NOTE}"


def test_a_tool_result_image_reaches_an_ollama_upstream_as_the_tool_message_s(
    upstreams: Upstreams,
) -> None:
    _, _, llama, server = upstreams
    by_url = {"type": "image", "source": {"type": "url", "url": URL}}
    r = claude_code(server, "llama", image_block(), by_url)
    assert r.status_code == 200, r.text
    # Base64 only: the image by URL is a note (stella fetches no URL).
    assert llama.requests[-1]["messages"][-1] == {
        "role": "tool",
        "content": URL_NOTE,
        "images": [PNG],
        "tool_name": "Read",
        "tool_call_id": "toolu_1",
    }


def test_a_tool_result_image_stella_cannot_send_is_a_note_not_a_400(
    upstreams: Upstreams,
) -> None:
    # The tool's, not the client's to mend: refused, it would fail every later turn of
    # the session. Its type is told by its bytes (a tool may name it by the extension).
    claude, *_, server = upstreams
    bmp = base64.b64encode(b"BM" + b"\x00" * 30).decode()
    r = claude_code(
        server,
        "sonnet",
        image_block(JPEG, "image/png"),
        image_block(bmp, "image/bmp"),
        image_block("not base64!"),
        {"type": "image", "source": {"type": "file", "file_id": "f"}},
    )
    assert r.status_code == 200, r.text
    unsendable = "[image omitted: not a PNG, JPEG, GIF or WebP image stella can send]"
    assert claude.requests[-1]["messages"][-1]["content"][0]["content"] == [
        image_block(JPEG, "image/jpeg"),
        {"type": "text", "text": "\n".join([unsendable] * 3)},
    ]
    # The native API checks a tool message's images as a user message's.
    call = {"id": "c1", "function": {"name": "shot", "arguments": {}}}
    r = native(
        server,
        "echo",
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": "c1",
            "images": [{"data": JPEG, "media_type": "image/png"}],
        },
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (
        "$.messages[2].images[0].media_type: the image's bytes are JPEG, not image/png"
    )


def test_tool_result_images_count_toward_the_cap_and_past_it_are_notes(
    upstreams: Upstreams,
) -> None:
    claude, *_, server = upstreams
    r = claude_code(server, "sonnet", *[image_block()] * (MAX_IMAGES + 1))
    assert r.status_code == 200, r.text
    content = claude.requests[-1]["messages"][-1]["content"][0]["content"]
    assert content[:-1] == [image_block()] * MAX_IMAGES
    assert content[-1] == {
        "type": "text",
        "text": f"[image omitted: more than {MAX_IMAGES} images in the request]",
    }


def test_no_tool_result_image_data_or_url_in_the_log(upstreams: Upstreams) -> None:
    *_, server = upstreams
    marker = base64.b64encode(b"\x89PNG\r\n\x1a\nSECRET-PIXELS" * 8).decode()
    secret_url = "https://example.com/SECRET-SCREENSHOT.png"
    for model in ("sonnet", "gpt-urls", "echo"):
        r = claude_code(
            server,
            model,
            image_block(marker),
            {"type": "image", "source": {"type": "url", "url": secret_url}},
        )
        assert r.status_code == 200, r.text
        rid = r.headers["request-id"]
        event = server.wait_event(lambda e, rid=rid: e.get("request_id") == rid)
        assert event["images"] == 2
        assert event["prompt"][-1] == {
            "role": "tool",
            "content": "",
            "tool_call_id": "toolu_1",
            "images": 2,
        }
    assert not [line for line in server.lines() if marker[:40] in line or "SECRET-SCREEN" in line]


def test_a_backend_set_to_read_text_only_gets_tool_images_as_notes(
    upstreams: Upstreams,
) -> None:
    # `images = false`: the model behind reads text only (llama.cpp without a projector
    # answers any image with a 400). A session whose tool returned a screenshot goes on,
    # the model reading the note, as on echo.
    _, gpt, llama, server = upstreams
    r = claude_code(server, "coder", image_block(), {"type": "text", "text": "1x1"})
    assert r.status_code == 200, r.text
    sent = gpt.requests[-1]
    assert sent["model"] == "text-only"
    assert sent["messages"][-1] == {
        "role": "tool",
        "content": f"{NOTE}\n1x1",
        "tool_call_id": "toolu_1",
    }
    r = claude_code(server, "llama-text", image_block())
    assert r.status_code == 200, r.text
    assert llama.requests[-1]["messages"][-1] == {
        "role": "tool",
        "content": NOTE,
        "tool_name": "Read",
        "tool_call_id": "toolu_1",
    }
    # A user's own image goes to a fallback that reads images, else is a 400.
    image = {"data": PNG, "media_type": "image/png"}
    r = native(server, "coder-eyes", user("what is this?", image))
    assert r.status_code == 200, r.text
    assert gpt.requests[-1]["model"] == "ok"
    for model in ("coder", "llama-text"):
        r = native(server, model, user("what is this?", image))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == (
            f"$.messages[0].images[0]: model {model!r} reads text only: images are not supported"
        )


def _image_parts(body: dict[str, Any]) -> int:
    return sum(
        part.get("type") == "image_url"
        for m in body["messages"]
        if isinstance(m["content"], list)
        for part in m["content"]
    )


def test_a_model_that_refuses_a_tool_image_is_asked_again_with_notes_and_remembered(
    upstreams: Upstreams,
) -> None:
    # No `images = false`: the upstream's 400 for the tool's image is the first word of
    # it. The same backend is asked once more with notes, and later turns send notes at
    # once, so the session goes on where every turn was a 502.
    _, gpt, _, server = upstreams
    asked = len(gpt.requests)
    r = claude_code(server, "coder-unsaid", image_block(), {"type": "text", "text": "1x1"})
    assert r.status_code == 200, r.text
    refused, answered = gpt.requests[asked:]
    assert _image_parts(refused) == 1
    assert _image_parts(answered) == 0
    assert answered["messages"][-1] == {
        "role": "tool",
        "content": f"{NOTE}\n1x1",
        "tool_call_id": "toolu_1",
    }
    rid = r.headers["request-id"]
    event = server.wait_event(lambda e: e.get("request_id") == rid)
    assert [
        (a["error"], a.get("upstream_status"), a.get("tool_images")) for a in event["attempts"]
    ] == [
        ("upstream_rejected", 400, None),
        (None, None, "notes"),
    ]
    # Later turns: notes at once, one request each; one warning for the route's model.
    for _ in range(2):
        asked = len(gpt.requests)
        r = claude_code(server, "coder-unsaid", image_block())
        assert r.status_code == 200, r.text
        assert len(gpt.requests) == asked + 1
        assert gpt.requests[-1]["messages"][-1]["content"] == NOTE
    warned = server.events("tool_images_as_notes")
    assert [(w["backend"], w["route"], w["upstream_model"]) for w in warned] == [
        ("gpt", "coder-unsaid", "text-only")
    ]
    # A user's own image keeps the upstream's error: asked once, never as a note.
    asked = len(gpt.requests)
    r = native(
        server, "coder-unsaid", user("what is this?", {"data": PNG, "media_type": "image/png"})
    )
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_rejected"
    assert len(gpt.requests) == asked + 1
    # Another model of the backend still gets the tool's images.
    r = claude_code(server, "gpt", image_block())
    assert r.status_code == 200, r.text
    assert _image_parts(gpt.requests[-1]) == 1


def test_ollamas_500_for_a_tool_image_is_asked_again_with_notes(upstreams: Upstreams) -> None:
    # Ollama's runner answers images to a model without a projector with a 500 naming it.
    _, _, llama, server = upstreams
    asked = len(llama.requests)
    r = claude_code(server, "qwen-unsaid", image_block())
    assert r.status_code == 200, r.text
    # (A model's load, a request without messages, may come first.)
    refused, answered = [b for b in llama.requests[asked:] if b.get("messages")]
    assert refused["messages"][-1]["images"] == [PNG]
    assert answered["messages"][-1] == {
        "role": "tool",
        "content": NOTE,
        "tool_name": "Read",
        "tool_call_id": "toolu_1",
    }
    asked = len(llama.requests)
    r = claude_code(server, "qwen-unsaid", image_block())
    assert r.status_code == 200, r.text
    chats = [b for b in llama.requests[asked:] if b.get("messages")]
    assert len(chats) == 1
    assert "images" not in chats[0]["messages"][-1]


def test_an_anthropic_turn_of_a_tool_result_and_text_is_one_user_message_upstream(
    upstreams: Upstreams,
) -> None:
    # Claude Code's turn [tool_result(image), text]: the tool message, then one user
    # message holding the result's image and the text (not two user messages in a row).
    _, gpt, _, server = upstreams
    turns = read_turns(image_block())
    turns[-1]["content"].append({"type": "text", "text": "and now?"})
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": "gpt", "max_tokens": 5, "messages": turns},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert gpt.requests[-1]["messages"][-2:] == [
        {"role": "tool", "content": "[image in the next message]", "tool_call_id": "toolu_1"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Image returned by tool call toolu_1 (Read):"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "text", "text": "and now?"},
            ],
        },
    ]
