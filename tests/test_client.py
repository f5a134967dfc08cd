"""The Python client and the `stella chat` / `stella models` commands, against a live stella."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from stella import client as sc
from stella.protocol import ChatResponse, Delta, Done, Start
from tests.live import LiveServer, free_port, run_stella

KEY = "sk-client-test-1"


def test_chat_stream_and_not(stella: LiveServer) -> None:
    with sc.Client(stella.url) as c:
        r = c.chat([{"role": "user", "content": "hi there"}], "echo")
        assert isinstance(r, ChatResponse) and r.response == "hi there"
        events = list(c.chat([{"role": "user", "content": "a b c"}], "echo", stream=True))
        assert isinstance(events[0], Start) and isinstance(events[-1], Done)
        assert "".join(e.text for e in events if isinstance(e, Delta)) == "a b c"
        assert c.generate("one two", "echo", system="s").response == "one two"
        tools = [{"function": {"name": "lookup"}}]
        called = c.chat([{"role": "user", "content": "x"}], "echo", tools=tools)
        assert called.message.tool_calls and called.message.tool_calls[0].function.name == "lookup"
        text = c.chat([{"role": "user", "content": "x"}], "echo", tools=tools, tool_choice="none")
        assert text.response == "x" and not text.message.tool_calls
        assert any(m.name == "echo" for m in c.models().models)
        assert c.health()["status"] == "ok"


async def test_async_client(stella: LiveServer) -> None:
    async with sc.AsyncClient(stella.url) as c:
        r = await c.chat([{"role": "user", "content": "x y"}], "echo")
        assert r.response == "x y"
        stream = await c.generate("p q", "echo", stream=True)
        texts = [e.text async for e in stream if isinstance(e, Delta)]
        assert "".join(texts) == "p q"


def test_in_band_error_raises_after_the_deltas(stella: LiveServer) -> None:
    got = []
    with sc.Client(stella.url) as c, pytest.raises(sc.UpstreamError) as info:
        for e in c.chat([{"role": "user", "content": "a b c d e"}], "echo-fail-after", stream=True):
            got.append(e)
    assert sum(isinstance(e, Delta) for e in got) == 3 and info.value.code == "upstream_error"


@pytest.fixture(scope="module")
def keyed() -> Iterator[LiveServer]:
    config = {
        "server": {"max_body_bytes": 4096},
        "backends": {
            "down": {"kind": "echo", "fail_before_first": True},
            "stall": {"kind": "echo", "stall_after": 0},
        },
        "models": {
            "routes": {
                "down": {"backend": "down", "retries": 0},
                "stall": {"backend": "stall", "ttft_timeout_s": 0.3, "retries": 0},
            },
        },
        "limits": {"models": {"echo": {"requests_per_minute": 2}}},
        "breaker": {"failure_threshold": 0},
        "auth": {
            "keys": {
                "narrow": {
                    "sha256": __import__("hashlib").sha256(b"sk-narrow-1").hexdigest(),
                    "models": ["stall"],
                }
            }
        },
    }
    with run_stella(config, {"STELLA_API_KEYS": f"admin={KEY}"}) as s:
        yield s


def test_every_error_code_maps_to_its_exception(keyed: LiveServer) -> None:
    url = keyed.url
    msg = [{"role": "user", "content": "x"}]
    with pytest.raises(sc.AuthenticationError) as e401:
        sc.Client(url, "wrong").chat(msg, "echo")
    assert e401.value.status == 401
    c = sc.Client(url, KEY)
    with pytest.raises(sc.NotFoundError):
        c.chat(msg, "nope")
    with pytest.raises(sc.BadRequestError):
        c.chat([], "echo")
    with pytest.raises(sc.PayloadTooLargeError):
        c.chat([{"role": "user", "content": "x" * 5000}], "echo")
    with pytest.raises(sc.PermissionDeniedError):
        sc.Client(url, "sk-narrow-1").chat(msg, "echo")
    with pytest.raises(sc.ConflictError):
        r = httpx.delete(url + "/api/v1/models/echo", headers={"Authorization": f"Bearer {KEY}"})
        raise sc.error_for(r, r.content)
    with pytest.raises(sc.UnsupportedMediaTypeError):
        r = httpx.post(
            url + "/api/v1/chat",
            content=b"<x/>",
            headers={"content-type": "application/xml", "Authorization": f"Bearer {KEY}"},
        )
        raise sc.error_for(r, r.content)
    with pytest.raises(sc.UpstreamError):
        c.chat(msg, "down")
    with pytest.raises(sc.TimeoutError):
        c.chat(msg, "stall")
    with pytest.raises(sc.RateLimitError) as e429:
        for _ in range(4):
            c.chat(msg, "echo")
    assert e429.value.retry_after and e429.value.retry_after >= 1
    c.close()


def test_overloaded_and_unavailable_map() -> None:
    for code, cls in (("overloaded", sc.OverloadedError), ("unavailable", sc.UnavailableError)):
        r = httpx.Response(
            503,
            json={"error": {"code": code, "message": "m", "request_id": "r"}},
            headers={"retry-after": "3"},
        )
        err = sc.error_for(r, r.content)
        assert isinstance(err, cls) and err.retry_after == 3 and err.request_id == "r"


def test_leaving_a_stream_closes_the_connection(stella: LiveServer) -> None:
    with sc.Client(stella.url) as c:
        stream = c.chat(
            [{"role": "user", "content": " ".join(["w"] * 100)}], "echo-slow", stream=True
        )
        start = next(stream)
        next(stream)
        stream.close()
    ev = stella.wait_event(lambda e: e["request_id"] == start.id)
    assert ev["finish_reason"] == "client_closed"


def test_cli_chat_and_models(stella: LiveServer) -> None:
    env = {"STELLA_URL": stella.url, "PATH": "/usr/bin:/bin"}

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stella", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    out = cli("chat", "--model", "echo", "hello cli")
    assert out.returncode == 0 and out.stdout.strip() == "hello cli"
    out = cli("chat", "-m", "echo", "--stats", stdin="from stdin")
    assert out.stdout.strip() == "from stdin" and "tok/s" in out.stderr
    out = cli("chat", "-m", "nope", "x")
    assert out.returncode == 1 and "model_not_found" in out.stderr
    out = cli("models")
    assert out.returncode == 0 and "echo" in out.stdout and "BACKEND" in out.stdout


def test_a_client_timeout_is_a_timeout_error(stella: LiveServer) -> None:
    msgs = [{"role": "user", "content": " ".join(["w"] * 50)}]
    with sc.Client(stella.url, timeout=0.1) as c, pytest.raises(sc.TimeoutError) as info:
        c.chat(msgs, model="echo-slow")
    assert info.value.code == "timeout"


async def test_an_unreachable_server_is_a_network_error(stella: LiveServer) -> None:
    dead = f"127.0.0.1:{free_port()}"  # no scheme: taken as http://, as curl does
    msgs = [{"role": "user", "content": "x"}]
    with sc.Client(dead) as c, pytest.raises(sc.NetworkError) as info:
        c.chat(msgs)
    assert info.value.code == "network_error" and dead in info.value.message
    with sc.Client(dead) as c, pytest.raises(sc.NetworkError):
        list(c.chat(msgs, stream=True))
    async with sc.AsyncClient(dead) as ac:
        with pytest.raises(sc.NetworkError):
            await ac.models()
    for args in (["chat", "hi"], ["models"]):
        out = subprocess.run(
            [sys.executable, "-m", "stella", *args, "--url", dead],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
        assert "network_error" in out.stderr
