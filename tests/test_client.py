"""The Python client and the `stella chat` / `stella models` commands, against a live stella."""

from __future__ import annotations

import builtins
import email.utils
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from stella import client as sc
from stella.protocol import ChatResponse, Delta, Done, Start
from tests.live import (
    ROOT,
    LiveServer,
    free_port,
    run_stella,
    stella_cli,
    stella_to_dev_full,
    stella_without_stdout,
    wait_in_kernel,
)

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
        fmt = {"type": "json_object"}
        assert c.chat([{"role": "user", "content": "{}"}], "echo", response_format=fmt).response
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
                "metered": {"backend": "echo"},
            },
        },
        # metered: an answer's tokens, charged after it, leave it short for an hour (a
        # Retry-After past the client's cap, raised without a retry).
        "limits": {
            "models": {"echo": {"requests_per_minute": 2}, "metered": {"tokens_per_minute": 2}}
        },
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
    c = sc.Client(url, KEY, max_retries=0)  # each error as it comes
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
    # Retry-After may be an HTTP date (RFC 9110): seconds from now, as stella.js reads it.
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    r = httpx.Response(429, json={"error": {"code": "rate_limited"}}, headers={"retry-after": when})
    assert 28 <= (sc.error_for(r, r.content).retry_after or 0) <= 31
    for odd in (b"soon", b"\xb2", b"9" * 400, b"-5"):  # b"\xb2" reads as "\u00b2", a digit
        r = httpx.Response(429, headers=[(b"retry-after", odd)])
        assert sc.error_for(r, r.content).retry_after is None, odd


def test_retryable_is_the_servers_word_when_it_gives_one() -> None:
    said = {"error": {"code": "upstream_rejected", "message": "m", "retryable": False}}
    r = httpx.Response(502, json=said)
    assert sc.error_for(r, r.content).retryable is False
    said = {"error": {"code": "invalid_request", "message": "m", "retryable": True}}
    r = httpx.Response(400, json=said)
    assert sc.error_for(r, r.content).retryable is True
    # Another server (or a proxy) says nothing: the status's guess.
    for status, guess in ((502, True), (429, True), (400, False)):
        r = httpx.Response(status, json={"error": {"code": "x", "message": "m"}})
        assert sc.error_for(r, r.content).retryable is guess
        r = httpx.Response(status, json={"error": {"code": "x", "retryable": "no"}})
        assert sc.error_for(r, r.content).retryable is guess


def test_the_codes_the_server_may_send_have_their_exceptions() -> None:
    from stella.protocol import Error

    err = sc._inband(Error(code="context_length_exceeded", message="m"), "r")
    assert isinstance(err, sc.ContextLengthError) and isinstance(err, sc.BadRequestError)
    for status, code, cls in (
        (405, "method_not_allowed", sc.MethodNotAllowedError),
        (500, "internal_error", sc.InternalServerError),
        (431, "headers_too_large", sc.BadRequestError),
    ):
        r = httpx.Response(status, json={"error": {"code": code, "message": "m"}})
        assert isinstance(sc.error_for(r, r.content), cls)
    assert "httpx" not in sc.__all__


def test_every_error_class_is_exported() -> None:
    # InvalidURLError, documented, was left out: `from stella.client import *` missed it.
    errors = {
        name
        for name, value in vars(sc).items()
        if isinstance(value, type) and issubclass(value, sc.StellaClientError)
    }
    # TimeoutError only by name: `import *` would shadow the builtin with it.
    assert errors - {"TimeoutError"} <= set(sc.__all__), errors - set(sc.__all__)


def test_import_star_leaves_the_builtin_timeout_error_alone() -> None:
    # It shadowed the builtin: `except TimeoutError` after `import *` missed the builtin
    # timeouts of asyncio.timeout and the like, though the docstring said it caught both.
    names: dict[str, Any] = {}
    exec("from stella.client import *", names)
    assert "TimeoutError" not in names and "StellaClientError" in names
    from stella.client import TimeoutError as StellaTimeout

    assert StellaTimeout is sc.TimeoutError
    assert issubclass(StellaTimeout, builtins.TimeoutError)


async def test_parallel_tool_calls_reaches_the_upstream() -> None:
    # A native request field the client had no way to send.
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.server import serve

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    up = FakeOpenAI()
    with serve(up.app) as up_url:
        config = {
            "backends": {"up": {"kind": "openai", "base_url": up_url + "/v1"}},
            "models": {"routes": {"gpt": {"backend": "up", "upstream_model": "two-tools"}}},
        }
        with run_stella(config) as server:
            msgs = _say("Paris and Oslo?")
            with sc.Client(server.url) as c:
                assert len(c.chat(msgs, "gpt", tools=tools).message.tool_calls) == 2
                assert "parallel_tool_calls" not in up.requests[-1]  # unset: not sent
                one = c.chat(msgs, "gpt", tools=tools, parallel_tool_calls=False)
                assert len(one.message.tool_calls) == 1
                assert up.requests[-1]["parallel_tool_calls"] is False
            async with sc.AsyncClient(server.url) as ac:
                stream = await ac.chat(
                    msgs, "gpt", stream=True, tools=tools, parallel_tool_calls=False
                )
                calls = [e async for e in stream if type(e).__name__ == "ToolCall"]
                assert len(calls) == 1 and up.requests[-1]["parallel_tool_calls"] is False


def test_an_answer_goes_back_into_the_next_turn(stella: LiveServer) -> None:
    from stella.protocol import Message

    with sc.Client(stella.url) as c:
        first = c.chat([Message(role="user", content="one")], "echo")
        again = [
            Message(role="user", content="one"),
            first.message,  # the protocol's own struct, sent back as it came
            {"role": "user", "content": "two"},
        ]
        assert c.chat(again, "echo").response == "two"
        r = c.generate("noted", "echo", metadata={"ticket": "T-9"})
        ev = stella.wait_event(lambda e: e["request_id"] == r.id)
        assert ev["metadata"] == {"ticket": "T-9"}
        with pytest.raises(sc.BadRequestError, match="cannot send"):
            c.chat([{"role": "user", "content": object()}], "echo")
        with pytest.raises(sc.BadRequestError, match=r"options\.temperature"):
            c.chat([{"role": "user", "content": "x"}], "echo", options={"temperature": math.nan})
        # Options pass through as given: logit_bias's int token ids go as JSON's string keys.
        biased = {"presence_penalty": 1.5, "logit_bias": {50256: -100}}
        assert c.chat([{"role": "user", "content": "x"}], "echo", options=biased).response == "x"
        with pytest.raises(sc.BadRequestError, match=r"options\.frequency_penalty"):
            c.chat([{"role": "user", "content": "x"}], "echo", options={"frequency_penalty": 9})


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


def test_a_stream_held_and_left_closes_with_its_block(stella: LiveServer) -> None:
    # A stream kept in a variable and left with `break` went on generating server-side
    # until the client closed: the stream is a context manager, closed as its block ends.
    words = [{"role": "user", "content": " ".join(["w"] * 100)}]
    with sc.Client(stella.url) as c:
        with c.chat(words, "echo-slow", stream=True) as stream:
            for event in stream:
                if isinstance(event, Start):
                    rid = event.id
                    break
        # The stream is still referenced: no garbage collection closes it.
        ev = stella.wait_event(lambda e: e["request_id"] == rid, timeout=2)
        assert ev["finish_reason"] == "client_closed"
        assert next(stream, None) is None  # closed: nothing more comes
        held = c.generate("w " * 100, "echo-slow", stream=True)
        start = next(held)
        held.close()
        ev = stella.wait_event(lambda e: e["request_id"] == start.id, timeout=2)
        assert ev["finish_reason"] == "client_closed"


async def test_an_async_stream_held_and_left_closes_with_its_block(stella: LiveServer) -> None:
    words = [{"role": "user", "content": " ".join(["w"] * 100)}]
    async with sc.AsyncClient(stella.url) as c:
        async with await c.generate("w " * 100, "echo-slow", stream=True) as stream:
            async for event in stream:
                if isinstance(event, Start):
                    rid = event.id
                    break
        ev = stella.wait_event(lambda e: e["request_id"] == rid, timeout=2)
        assert ev["finish_reason"] == "client_closed"
        held = await c.chat(words, "echo-slow", stream=True)
        start = await anext(held)
        await held.aclose()
        assert await anext(held, None) is None
        ev = stella.wait_event(lambda e: e["request_id"] == start.id, timeout=2)
        assert ev["finish_reason"] == "client_closed"


def test_cli_chat_and_models(stella: LiveServer) -> None:
    env = {"STELLA_URL": stella.url, "PATH": "/usr/bin:/bin"}

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return stella_cli(*args, stdin=stdin, env=env)

    out = cli("chat", "--model", "echo", "hello cli")
    assert out.returncode == 0 and out.stdout.strip() == "hello cli"
    out = cli("chat", "-m", "echo", "--stats", stdin="from stdin")
    assert out.stdout.strip() == "from stdin" and "tok/s" in out.stderr
    out = cli("chat", "-m", "nope", "x")
    assert out.returncode == 1 and "model_not_found" in out.stderr
    out = cli("models")
    assert out.returncode == 0 and "echo" in out.stdout and "BACKEND" in out.stdout


def test_cli_rate_limited_says_when_to_retry(keyed: LiveServer) -> None:
    # The client has the 429's Retry-After; the CLI's line left it out.
    env = {"STELLA_URL": keyed.url, "STELLA_API_KEY": KEY, "PATH": "/usr/bin:/bin"}
    first = stella_cli("chat", "-m", "metered", " ".join(["w"] * 60), env=env)
    assert first.returncode == 0, first.stderr
    t0 = time.monotonic()
    limited = stella_cli("chat", "-m", "metered", "hi", env=env)
    assert time.monotonic() - t0 < 30  # the wait is past the retries' cap: not slept
    assert limited.returncode == 1 and limited.stderr.startswith("stella: rate_limited: ")
    assert re.search(r"; retry after \d+(\.\d+)?s\n\Z", limited.stderr), limited.stderr


def test_cli_without_a_key_says_how_to_give_one(keyed: LiveServer) -> None:
    env = {"STELLA_URL": keyed.url, "PATH": "/usr/bin:/bin"}
    for args in (["chat", "hi"], ["models"]):
        out = stella_cli(*args, env=env)
        assert out.returncode == 1 and "unauthorized" in out.stderr
        assert out.stderr.endswith("; give the key with --api-key or STELLA_API_KEY\n")
        # A key given and refused: the hint to give one was wrong.
        out = stella_cli(*args, env={**env, "STELLA_API_KEY": "sk-wrong"})
        assert out.returncode == 1 and "invalid API key" in out.stderr
        assert out.stderr.endswith("; check the key (from STELLA_API_KEY)\n"), out.stderr
        out = stella_cli(*args, "--api-key", "sk-wrong", env=env)
        assert out.stderr.endswith("; check the key (from --api-key)\n"), out.stderr
    out = stella_cli("models", env={**env, "STELLA_API_KEY": KEY})
    assert out.returncode == 0 and "echo" in out.stdout


def _hung_server() -> socket.socket:
    """A loopback socket that takes connections (the kernel's backlog) and never answers."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    return hung


def test_cli_timeout_is_one_line_and_exit_1() -> None:
    # `stella models` and `stella chat` waited 600 s for a server that never answers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    with _hung_server() as hung:
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        for args, extra in (
            (["models", "--timeout", "0.5"], {}),
            (["chat", "hi", "--timeout", "0.5"], {}),
            (["chat", "hi"], {"STELLA_TIMEOUT": "0.5"}),
        ):
            t0 = time.monotonic()
            out = stella_cli(*args, "--url", url, env={**env, **extra})
            assert time.monotonic() - t0 < 20
            assert out.returncode == 1, out.stderr
            assert out.stderr == (
                f"stella: timeout: no answer from {url} within the client's timeout of 0.5 s "
                "(ReadTimeout); wait longer with --timeout SECONDS (or STELLA_TIMEOUT)\n"
            )
    for bad in ("0", "-1", "nan", "soon"):
        out = stella_cli("models", "--url", url, "--timeout", bad, env=env)
        assert out.returncode == 2 and "--timeout" in out.stderr, bad
        out = stella_cli("models", "--url", url, env={**env, "STELLA_TIMEOUT": bad})
        assert out.returncode == 2 and out.stderr.startswith("stella: STELLA_TIMEOUT: "), bad


def test_cli_waits_long_for_an_answer_and_briefly_for_a_connection(monkeypatch: Any) -> None:
    from stella.commands import CONNECT_TIMEOUT_S, client_timeout
    from stella.commands.chat import CHAT_TIMEOUT_S
    from stella.commands.models import MODELS_TIMEOUT_S

    monkeypatch.delenv("STELLA_TIMEOUT", raising=False)
    assert client_timeout(None, CHAT_TIMEOUT_S) == httpx.Timeout(600, connect=10)
    assert client_timeout(None, MODELS_TIMEOUT_S) == httpx.Timeout(30, connect=10)
    assert client_timeout(2.5, MODELS_TIMEOUT_S) == httpx.Timeout(2.5)
    monkeypatch.setenv("STELLA_TIMEOUT", "120")
    assert client_timeout(None, MODELS_TIMEOUT_S) == httpx.Timeout(120, connect=CONNECT_TIMEOUT_S)
    # The library's own default is the same long read and short connect.
    assert sc.Client("http://127.0.0.1:9")._http.timeout == httpx.Timeout(600, connect=10)


def test_a_client_timeout_is_a_timeout_error(stella: LiveServer) -> None:
    msgs = [{"role": "user", "content": " ".join(["w"] * 50)}]
    with sc.Client(stella.url, timeout=0.1) as c, pytest.raises(sc.TimeoutError) as info:
        c.chat(msgs, model="echo-slow")
    assert info.value.code == "timeout"


async def test_an_unreachable_server_is_a_network_error(stella: LiveServer) -> None:
    dead = f"127.0.0.1:{free_port()}"  # no scheme: taken as http://, as curl does
    msgs = [{"role": "user", "content": "x"}]
    with sc.Client(dead, max_retries=0) as c, pytest.raises(sc.NetworkError) as info:
        c.chat(msgs)
    assert info.value.code == "network_error" and dead in info.value.message
    with sc.Client(dead, max_retries=0) as c, pytest.raises(sc.NetworkError):
        c.chat(msgs, stream=True)
    async with sc.AsyncClient(dead, max_retries=0) as ac:
        with pytest.raises(sc.NetworkError):
            await ac.models()
    for args in (["chat", "hi"], ["models"]):
        out = stella_cli(*args, "--url", dead)
        assert out.returncode == 1, out.stderr
        # A line for each retry, then the error's: no traceback.
        *retries, last = out.stderr.splitlines()
        assert [line.endswith(f"({n} of 2)") for n, line in enumerate(retries, 1)] == [True] * 2
        assert last.startswith("stella: network_error: ") and "Traceback" not in out.stderr


def _chat_typed(
    url: str, then: Callable[[subprocess.Popen[bytes], int], None]
) -> tuple[int, str, str]:
    """Run `stella chat` with stdin and stderr on a terminal (stdout to a pipe); once it
    says it reads stdin, `then(process, terminal)`; its exit code, stdout and what the
    terminal showed."""
    import pty
    import select

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stella", "chat", "--url", url, "-m", "echo"],
        stdin=follower,
        stderr=follower,
        stdout=subprocess.PIPE,
        env=env,
    )
    os.close(follower)
    shown = b""
    try:
        deadline = time.monotonic() + 30
        while b"Ctrl-D" not in shown and proc.poll() is None and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                shown += os.read(leader, 4096)
        assert b"reading the prompt from stdin; end it with Ctrl-D" in shown, shown
        then(proc, leader)
        stdout, _ = proc.communicate(timeout=30)
        while select.select([leader], [], [], 0)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    return proc.returncode, stdout.decode(), shown.decode(errors="replace")


def test_ctrl_c_while_a_prompt_is_typed_exits_130_quietly() -> None:
    # It printed a KeyboardInterrupt traceback and died of the signal.
    def interrupt(proc: subprocess.Popen[bytes], terminal: int) -> None:
        os.write(terminal, b"half a prom")
        proc.send_signal(signal.SIGINT)

    code, out, shown = _chat_typed(f"http://127.0.0.1:{free_port()}", interrupt)
    assert code == 130 and out == "", shown
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown


def test_a_prompt_typed_on_a_terminal_ends_with_ctrl_d(stella: LiveServer) -> None:
    def type_it(proc: subprocess.Popen[bytes], terminal: int) -> None:
        os.write(terminal, b"typed at a terminal\n\x04")

    code, out, shown = _chat_typed(stella.url, type_it)
    assert code == 0, shown
    assert out.strip() == "typed at a terminal"


def _misbehaving_app() -> Any:
    """A server that looks like stella until it doesn't: truncated streams, HTML, newer
    event types, error bodies with null fields."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        body = await request.json()
        content = body["messages"][-1]["content"]
        if content == "truncate":
            lines = [
                b'{"type":"start","id":"r1","model":"m","backend":"b","created":1.0}\n',
                b'{"type":"delta","text":"partial"}\n',
            ]
        elif content == "newer":
            lines = [
                b'{"type":"start","id":"r2","model":"m","backend":"b","created":1.0}\n',
                b'{"type":"usage_hint","tokens":3}\n',
                b'{"type":"delta","text":"ok"}\n',
                b'{"type":"done","finish_reason":"stop"}\n',
            ]
        elif content == "newer-reason":  # a way to end this client does not know yet
            lines = [
                b'{"type":"start","id":"r5","model":"m","backend":"b","created":1.0}\n',
                b'{"type":"delta","text":"ok"}\n',
                b'{"type":"done","finish_reason":"pause_turn","backend":"b"}\n',
            ]
            if not body.get("stream"):
                answer = {
                    "id": "r5",
                    "model": "m",
                    "backend": "b",
                    "message": {"role": "assistant", "content": "ok"},
                    "response": "ok",
                    "finish_reason": "pause_turn",
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    "timings": {},
                }
                return Response(json.dumps(answer).encode(), media_type="application/json")
        elif content == "retryable":
            lines = [
                b'{"type":"start","id":"r3","model":"m","backend":"b","created":1.0}\n',
                b'{"type":"error","code":"upstream_timeout","message":"slow","retryable":true}\n',
            ]
        elif content == "null-code":
            return Response(b'{"error":{"code":null,"message":null}}', status_code=500)
        elif content == "list-code":
            return Response(b'{"error":{"code":["x"],"message":7}}', status_code=502)
        elif content == "bad-utf8-error":
            return Response(b'{"error":{"code":"x","message":"bad \xff"}}', status_code=502)
        elif content == "bad-utf8":
            return Response(b'{"message":{"role":"assistant","content":"\xff"}}')
        elif content == "bad-gzip":
            return Response(b"not-gzip", headers={"content-encoding": "gzip"})
        elif content == "redirect":  # a proxy that serves https:// only
            where = {"location": "https://proxy.example/api/v1/chat", "x-request-id": "req_moved"}
            return Response(b"", status_code=308, headers=where)
        elif content == "empty":
            return Response(b"")
        elif content == "bad-utf8-stream":
            lines = [
                b'{"type":"start","id":"r4","model":"m","backend":"b","created":1.0}\n',
                b'{"type":"delta","text":"\xff"}\n',
            ]
        else:
            return Response(b"<html>a proxy's page</html>", media_type="text/html")

        async def gen() -> Any:
            for line in lines:
                yield line

        return StreamingResponse(gen(), headers={"x-request-id": "req_fake"})

    async def models(request: Request) -> Response:
        return Response(b"<html>a proxy's page</html>", media_type="text/html")

    async def health(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(
        routes=[
            Route("/api/v1/chat", chat, methods=["POST"]),
            Route("/api/v1/models", models),
            Route("/health", health),
        ]
    )


@pytest.fixture(scope="module")
def odd_server() -> Iterator[str]:
    from tests.fakes.server import serve

    with serve(_misbehaving_app()) as url:
        yield url


def _say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_answers_outside_the_protocol_are_client_errors(odd_server: str) -> None:
    with sc.Client(odd_server) as c:
        with pytest.raises(sc.NetworkError) as cut:
            list(c.chat(_say("truncate"), stream=True))
        assert cut.value.code == "network_error" and cut.value.request_id == "req_fake"
        newer = list(c.chat(_say("newer"), stream=True))  # an unknown event type is skipped
        assert [type(e) for e in newer] == [Start, Delta, sc.Done]
        # A finish_reason a newer server may add is kept as it came, as unknown event
        # types and error codes are taken: it was a ProtocolError after the whole answer.
        *_, done = c.chat(_say("newer-reason"), stream=True)
        assert isinstance(done, Done) and done.finish_reason == "pause_turn"
        assert c.chat(_say("newer-reason")).finish_reason == "pause_turn"
        with pytest.raises(sc.TimeoutError) as inband:
            list(c.chat(_say("retryable"), stream=True))
        assert inband.value.retryable and inband.value.status == 0
        with pytest.raises(sc.ProtocolError) as html:
            c.chat(_say("html"))
        assert html.value.code == "bad_response" and "html" in html.value.message
        with pytest.raises(sc.ProtocolError):
            c.models()
        with pytest.raises(sc.StellaClientError) as null:
            c.chat(_say("null-code"))
        assert null.value.code == "http_500" and null.value.retryable
    async with sc.AsyncClient(odd_server) as ac:
        stream = await ac.chat(_say("truncate"), stream=True)
        with pytest.raises(sc.NetworkError):
            async for _ in stream:
                pass
    for args in (["chat", "truncate"], ["chat", "html"], ["models"]):
        out = stella_cli(*args, "--url", odd_server)
        assert out.returncode == 1, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one line, no traceback


async def test_malformed_bytes_are_protocol_errors_not_tracebacks(odd_server: str) -> None:
    # Invalid UTF-8 inside a JSON string (msgspec raises UnicodeDecodeError for it) and a
    # body its Content-Encoding does not decode are answers outside the protocol.
    with sc.Client(odd_server) as c:
        for text in ("bad-utf8", "bad-gzip"):
            with pytest.raises(sc.ProtocolError) as bad:
                c.chat(_say(text))
            assert bad.value.code == "bad_response", text
        with pytest.raises(sc.ProtocolError):
            list(c.chat(_say("bad-utf8-stream"), stream=True))
        for text in ("bad-utf8-error", "list-code"):  # not stella's error shape
            with pytest.raises(sc.UpstreamError) as err:
                c.chat(_say(text))
            assert err.value.code == "http_502" and err.value.status == 502, text
            assert isinstance(err.value.message, str)
    async with sc.AsyncClient(odd_server) as ac:
        with pytest.raises(sc.ProtocolError):
            await ac.chat(_say("bad-utf8"))
        stream = await ac.chat(_say("bad-utf8-stream"), stream=True)
        with pytest.raises(sc.ProtocolError):
            async for _ in stream:
                pass


async def test_a_protocol_error_carries_the_answers_status(odd_server: str) -> None:
    # It said 0, as for an in-band error, though the answer came with 200.
    sync = sc.Client(odd_server)
    async with sc.AsyncClient(odd_server) as ac:
        for what in ("html", "bad-utf8", "bad-gzip"):
            with pytest.raises(sc.ProtocolError) as bad:
                sync.chat(_say(what))
            assert bad.value.status == 200, what
            with pytest.raises(sc.ProtocolError) as abad:
                await ac.chat(_say(what))
            assert abad.value.status == 200, what
        with pytest.raises(sc.ProtocolError) as listing:
            sync.models()
        assert listing.value.status == 200
        with pytest.raises(sc.ProtocolError) as alisting:
            await ac.models()
        assert alisting.value.status == 200
        with pytest.raises(sc.ProtocolError) as streamed:
            list(sync.chat(_say("bad-utf8-stream"), stream=True))
        assert streamed.value.status == 200
        stream = await ac.chat(_say("bad-utf8-stream"), stream=True)
        with pytest.raises(sc.ProtocolError) as astreamed:
            async for _ in stream:
                pass
        assert astreamed.value.status == 200
    sync.close()


async def test_a_redirect_or_an_empty_body_is_a_protocol_error_streamed_or_not(
    odd_server: str,
) -> None:
    # Streamed, both were a NetworkError with status 0: "ended without a done or error
    # line"; without stream a ProtocolError with the status.
    async def raised(text: str, stream: bool, asynchronous: bool) -> sc.StellaClientError:
        try:
            if asynchronous:
                async with sc.AsyncClient(odd_server) as ac:
                    answer = await ac.chat(_say(text), stream=stream)
                    if stream:
                        async for _ in answer:
                            pass
            else:
                with sc.Client(odd_server) as c:
                    answer = c.chat(_say(text), stream=stream)
                    if stream:
                        list(answer)
        except sc.StellaClientError as exc:
            return exc
        raise AssertionError(f"{text}: no error")

    for stream in (False, True):
        for asynchronous in (False, True):
            moved = await raised("redirect", stream, asynchronous)
            assert isinstance(moved, sc.ProtocolError), (stream, asynchronous, moved)
            assert moved.code == "bad_response" and moved.status == 308
            assert "redirect to https://proxy.example/api/v1/chat" in moved.message
            assert moved.request_id == "req_moved"
            empty = await raised("empty", stream, asynchronous)
            assert isinstance(empty, sc.ProtocolError), (stream, asynchronous, empty)
            assert empty.code == "bad_response" and empty.status == 200


def test_the_clients_timeout_error_is_the_builtin_one_too(stella: LiveServer) -> None:
    # `from stella.client import *` shadows the builtin: an `except TimeoutError` meant
    # for either catches both.
    assert issubclass(sc.TimeoutError, builtins.TimeoutError)
    assert issubclass(sc.TimeoutError, sc.StellaClientError)
    msgs = [{"role": "user", "content": " ".join(["w"] * 50)}]
    with sc.Client(stella.url, timeout=0.1) as c, pytest.raises(builtins.TimeoutError) as info:
        c.chat(msgs, model="echo-slow")
    assert isinstance(info.value, sc.TimeoutError) and info.value.code == "timeout"
    assert str(info.value) == info.value.message


@pytest.mark.parametrize("unbuffered", [True, False])
def test_cli_output_that_cannot_be_written_is_said_so(stella: LiveServer, unbuffered: bool) -> None:
    # `models` ended in an OSError traceback; `chat` blamed the server: "cannot reach the
    # server: [Errno 28] No space left on device".
    env = {"STELLA_URL": stella.url}
    error = "stella: cannot write output: No space left on device"
    for args in (["models"], ["models", "--json"], ["chat", "-m", "echo", "hi"]):
        assert stella_to_dev_full(*args, unbuffered=unbuffered, env=env) == ["1", error], args


def test_cli_chat_output_stdout_cannot_take_is_said_so(stella: LiveServer) -> None:
    # A UnicodeEncodeError traceback (stdout's encoding without the answer's emoji), and
    # an AttributeError one (stdout closed: sys.stdout is None).
    env = {"PATH": "/usr/bin:/bin", "STELLA_URL": stella.url, "PYTHONIOENCODING": "ascii"}
    out = stella_cli("chat", "-m", "echo", "party \N{PARTY POPPER}", env=env)
    assert out.returncode == 1 and out.stdout == "party", out.stderr
    assert out.stderr == (
        "stella: cannot write output: stdout's encoding (ascii) has no '\\U0001f389'\n"
    )
    closed = stella_without_stdout("chat", "-m", "echo", "hi", env={"STELLA_URL": stella.url})
    assert closed.returncode == 1
    assert closed.stderr == "stella: cannot write output: stdout is closed\n"


@pytest.mark.parametrize("unbuffered", [False, True])
def test_cli_chat_to_a_pipe_streams_and_keeps_its_lines_in_order(
    stella: LiveServer, unbuffered: bool
) -> None:
    # stdout and stderr one pipe (`2>&1 | cat`): the --stats line was glued to the
    # answer, the answer's line end coming after it; the answer still streams.
    env = {"PATH": "/usr/bin:/bin", "STELLA_URL": stella.url}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stella",
            "chat",
            "-m",
            "echo-slow",
            "--stats",
            " ".join(["w"] * 30),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    try:
        first = proc.stdout.read1(64)  # the first words, while the answer goes on
        assert first.startswith(b"w") and proc.poll() is None, first
        rest = proc.stdout.read()
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait(timeout=30)
    answer, stats, end = (first + rest).decode().split("\n")
    assert answer == " ".join(["w"] * 30) and stats.startswith("[stop] ") and end == ""


def test_cli_chat_error_line_after_partial_output_starts_a_line(stella: LiveServer) -> None:
    # On a terminal (stdout and stderr one file) it read "abcstella: cannot write output".
    env = {"PATH": "/usr/bin:/bin", "STELLA_URL": stella.url, "PYTHONIOENCODING": "ascii"}
    out = subprocess.run(
        [sys.executable, "-m", "stella", "chat", "-m", "echo", "abc h\u00e9llo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1
    assert (
        out.stdout == "abc\nstella: cannot write output: stdout's encoding (ascii) has no '\\xe9'\n"
    )


def test_cli_chat_numbers_are_checked_and_explained() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    for bad in ("nan", "inf", "-inf", "warm"):
        out = stella_cli("chat", "--url", "http://127.0.0.1:9", "--temperature", bad, "hi", env=env)
        # A usage error, as any bad flag (it was exit 1: refused by the client).
        assert out.returncode == 2 and "--temperature" in out.stderr, (bad, out.stderr)
    # A count of tokens is a whole number, 1 or more: -5 and 0 reached the server.
    for bad, why in (("-5", "must be at least 1"), ("0", "must be at least 1"), ("1.5", "")):
        out = stella_cli("chat", "--url", "http://127.0.0.1:9", "--max-tokens", bad, "hi", env=env)
        assert out.returncode == 2 and "argument --max-tokens: " in out.stderr, (bad, out.stderr)
        assert why in out.stderr and "Traceback" not in out.stderr, out.stderr
    helped = " ".join(stella_cli("chat", "--help", env=env).stdout.split())
    assert "--max-tokens MAX_TOKENS at most this many tokens in the answer" in helped
    assert "--temperature TEMPERATURE sampling temperature" in helped


def test_ctrl_c_while_models_waits_on_a_hung_server_exits_130_quietly() -> None:
    # A KeyboardInterrupt traceback, and death by the signal.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        hung.settimeout(30)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "stella", "models", "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = hung.accept()  # the request came: it waits for an answer that won't
            with conn:
                conn.settimeout(30)
                assert conn.recv(4096).startswith(b"GET /api/v1/models ")
                # Once the client waits for the answer, as a user's Ctrl-C would come.
                wait_in_kernel(proc.pid, "poll")
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 130, err
    assert err == "" and out == ""


@pytest.mark.parametrize(
    ("lines", "then"),
    [
        ([], b"^C\r\n"),
        (['{"type":"delta","text":"abc"}'], b"abc^C\r\n"),
        (['{"type":"delta","text":"","reasoning":"hmm"}'], b"\x1b[2mhmm\x1b[22m^C\r\n"),
    ],
    ids=["before-any-text", "mid-answer", "mid-thinking"],
)
def test_ctrl_c_in_chat_leaves_the_terminal_on_a_new_line(lines: list[str], then: bytes) -> None:
    # Ctrl-C typed while `stella chat` waited for its first words: the terminal showed
    # "^C" and the shell's prompt after it on the same line. One line end, whatever
    # line was open.
    import fcntl
    import pty
    import select
    import termios

    def own_terminal() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as at a shell, not a test run's
        fcntl.ioctl(2, termios.TIOCSCTTY, 0)  # its Ctrl-C signals this process

    leader, follower = pty.openpty()
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        hung.settimeout(30)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "stella", "chat", "--url", url, "hi"],
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
            env={"PATH": "/usr/bin:/bin", "TERM": "xterm"},
            start_new_session=True,
            preexec_fn=own_terminal,
        )
        os.close(follower)
        shown = b""
        try:
            conn, _ = hung.accept()
            with conn:
                conn.settimeout(30)
                assert conn.recv(4096).startswith(b"POST /api/v1/chat ")
                start = '{"type":"start","id":"r1","model":"m","backend":"b","created":1.0}'
                body = "".join(f"{line}\n" for line in [start, *lines]).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    + f"{len(body):x}\r\n".encode()
                    + body
                    + b"\r\n"
                )
                if lines:  # its words on the terminal, before the Ctrl-C
                    deadline = time.monotonic() + 30
                    while not shown.endswith(then[:-4]) and time.monotonic() < deadline:
                        if select.select([leader], [], [], 0.2)[0]:
                            shown += os.read(leader, 4096)
                wait_in_kernel(proc.pid, "poll")
                os.write(leader, b"\x03")  # Ctrl-C, as typed
                assert proc.wait(timeout=30) == 130
            while select.select([leader], [], [], 1)[0]:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the terminal's last writer is gone
                    break
                if not chunk:
                    break
                shown += chunk
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            os.close(leader)
    assert shown == then, shown


def test_cli_chat_error_line_and_a_reader_that_leaves(stella: LiveServer) -> None:
    env = {**os.environ, "STELLA_URL": stella.url}
    out = stella_cli("chat", "-m", "nope", "x", env=env)
    assert out.returncode == 1 and out.stderr.startswith("stella: model_not_found")
    assert "(request req_" in out.stderr  # the ID that finds the log line
    words = " ".join(["word"] * 400)
    piped = subprocess.run(
        f"{shlex.quote(sys.executable)} -m stella chat -m echo {shlex.quote(words)} | head -c 3",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert piped.stdout == "wor" and "Broken pipe" not in piped.stderr, piped.stderr


def test_keys_new_prints_valid_toml(tmp_path: Any) -> None:
    import tomllib

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return stella_cli("keys", "new", *args)

    out = keys("k1", "--models", 'a"b', "c\\d", "gpt-*", "--rpm", "5", "--concurrent", "2")
    table = tomllib.loads(out.stdout)["auth"]["keys"]["k1"]
    assert table["models"] == ['a"b', "c\\d", "gpt-*"] and table["requests_per_minute"] == 5
    # Control characters, DEL included (printed raw: TOML forbids it), read back as given.
    odd = ["m\x7f", "t\tab", "\x01x"]
    assert tomllib.loads(keys("k2", "--models", *odd).stdout)["auth"]["keys"]["k2"]["models"] == odd
    assert table["max_concurrent"] == 2
    # Daily quotas, as the config spells them, and loaded by it as given.
    out = keys("k4", "--rpd", "500", "--tpd", "200000")
    table = tomllib.loads(out.stdout)["auth"]["keys"]["k4"]
    assert (table["requests_per_day"], table["tokens_per_day"]) == (500, 200_000)
    from stella.settings import KeySettings

    assert msgspec.convert(table, KeySettings).tokens_per_day == 200_000
    # Any name the config takes is printed as a TOML key that reads back as it.
    assert "café" in tomllib.loads(keys("café").stdout)["auth"]["keys"]
    big = str(2**53 + 1)  # past what the config takes (and a float holds exactly)
    for bad in (
        ["a|b"],
        ["k2", "--rpm", "-5"],
        ["k3", "--models"],
        ["k5", "--tpd", "x"],
        ["k6", "--rpd", big],
    ):
        out = keys(*bad)
        assert out.returncode == 2 and not out.stdout, bad


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_an_option_json_cannot_carry_is_invalid_request(value: float) -> None:
    with sc.Client("http://127.0.0.1:9") as c, pytest.raises(sc.BadRequestError) as info:
        c.chat([{"role": "user", "content": "x"}], "echo", options={"temperature": value})
    assert info.value.code == "invalid_request" and "options.temperature" in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:abc",
        "http://[::1",
        # httpx takes these: "http://" became "http://http:" (a host named "http"), and
        # the others failed as network errors, exit 1.
        "http://",
        "https://",
        "http://:8000",
        "http:///api",
        "ftp://127.0.0.1:9",
        "ws://127.0.0.1:9",
        # A slash short: a host named "http" (a DNS lookup, then a network error).
        "http:/127.0.0.1:9",
        "HTTPS:/127.0.0.1:9",
    ],
)
def test_a_malformed_url_is_an_invalid_url_error(url: str) -> None:
    with pytest.raises(sc.InvalidURLError) as info:
        sc.Client(url)
    assert info.value.code == "invalid_url" and url in info.value.message
    with pytest.raises(sc.InvalidURLError):
        sc.AsyncClient(url)
    for args in (["chat", "hi"], ["models"]):
        out = stella_cli(*args, "--url", url)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
        assert out.stderr.startswith("stella: invalid_url: ")
    env = {"PATH": "/usr/bin:/bin", "STELLA_URL": url}
    assert stella_cli("models", env=env).returncode == 2


def test_a_url_without_a_scheme_is_http(stella: LiveServer) -> None:
    bare = stella.url.removeprefix("http://") + "/"  # "127.0.0.1:PORT/", as curl takes it
    with sc.Client(bare) as c:
        assert any(m.name == "echo" for m in c.models().models)
    out = stella_cli("models", "--url", bare)
    assert out.returncode == 0 and "echo" in out.stdout, out.stderr


async def test_a_url_with_outer_whitespace_is_trimmed(stella: LiveServer) -> None:
    # A URL pasted with its spaces, or read from a file with its newline, was refused as
    # one whose "scheme must be http:// or https://"; the key was trimmed already.
    with sc.Client(f" {stella.url}/\n") as c:
        assert c.url == stella.url and any(m.name == "echo" for m in c.models().models)
    async with sc.AsyncClient(f"\t{stella.url} ") as ac:
        assert ac.url == stella.url
    env = {"PATH": "/usr/bin:/bin", "STELLA_URL": f" {stella.url}\n"}
    out = stella_cli("models", env=env)
    assert out.returncode == 0 and "echo" in out.stdout, out.stderr


SEPARATORS = "one\u2028two three\u2029four five\x85six"


def test_line_separators_inside_the_text_keep_their_line(stella: LiveServer) -> None:
    # httpx's iter_lines splits at U+2028, U+2029 and U+0085 too, as str.splitlines does;
    # the stream's lines end at b"\n" only.
    msgs = [{"role": "user", "content": SEPARATORS}]
    with sc.Client(stella.url) as c:
        events = list(c.chat(msgs, "echo", stream=True))
    assert "".join(e.text for e in events if isinstance(e, Delta)) == SEPARATORS
    assert isinstance(events[-1], Done)


async def test_line_separators_inside_the_text_keep_their_line_async(stella: LiveServer) -> None:
    async with sc.AsyncClient(stella.url) as c:
        stream = await c.chat([{"role": "user", "content": SEPARATORS}], "echo", stream=True)
        texts = [e.text async for e in stream if isinstance(e, Delta)]
    assert "".join(texts) == SEPARATORS


def test_a_key_with_outer_whitespace_is_trimmed(keyed: LiveServer) -> None:
    with sc.Client(keyed.url, api_key=f" {KEY}\n") as c:
        assert any(m.name == "echo" for m in c.models().models)
    out = stella_cli("models", "--url", keyed.url, env={**os.environ, "STELLA_API_KEY": KEY + "\n"})
    assert out.returncode == 0 and "echo" in out.stdout


@pytest.mark.parametrize("key", ["sk-prod-\u20acbcdef", "sk-a\nb-secret", "sk-\x7fx"])
def test_a_key_no_header_can_carry_is_refused_without_showing_it(key: str) -> None:
    for make in (sc.Client, sc.AsyncClient):
        with pytest.raises(sc.AuthenticationError) as info:
            make("http://127.0.0.1:9", api_key=key)
        assert info.value.code == "invalid_api_key" and key.strip() not in info.value.message
    env = {**os.environ, "STELLA_API_KEY": key}
    env.pop("STELLA_URL", None)
    out = stella_cli("models", "--url", "http://127.0.0.1:9", env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert out.stderr.startswith("stella: invalid_api_key: ") and "secret" not in out.stderr


def test_a_header_value_httpx_refuses_is_not_quoted() -> None:
    with sc.Client("http://127.0.0.1:9", headers={"x-secret": "tok\n"}) as c:
        with pytest.raises(sc.NetworkError) as info:
            c.models()
    assert "tok" not in info.value.message


def test_a_password_in_the_url_stays_out_of_messages() -> None:
    dead = f"http://user:hunter2@127.0.0.1:{free_port()}"
    with sc.Client(dead) as c, pytest.raises(sc.NetworkError) as info:
        c.models()
    assert "hunter2" not in info.value.message and "127.0.0.1" in info.value.message
    for url in (
        "http://user:hunter2@127.0.0.1:abc",
        "http://admin:Zk9/pQ2x@127.0.0.1:1",  # httpx reads "Zk9" as a port
        "http://admin:hunter2#x@127.0.0.1:1",
        "ftp://user:hunter2@127.0.0.1:1",
        "http://user:hunter2@",
        "user:hunter2@:1",  # no scheme and no host
    ):
        with pytest.raises(sc.InvalidURLError) as bad:
            sc.Client(url)
        assert "hunter2" not in bad.value.message and "Zk9" not in bad.value.message


def test_text_that_is_not_unicode_is_a_bad_request() -> None:
    with sc.Client("http://127.0.0.1:9") as c, pytest.raises(sc.BadRequestError) as info:
        c.chat([{"role": "user", "content": "caf\udce9"}], "echo")
    assert info.value.code == "invalid_request"
    out = subprocess.run(
        [sys.executable, "-m", "stella", "chat", "--url", "http://127.0.0.1:9", "-m", "echo"],
        input=b"caf\xe9 latin-1\n",
        capture_output=True,
        timeout=60,
    )
    # Said of stdin, as `keys hash` does, not sent on to fail as invalid_request.
    assert out.returncode == 2, out.stderr
    assert out.stderr.decode() == "stella: the prompt on stdin is not UTF-8 text\n"


async def test_a_timeout_mid_stream_names_the_request(stella: LiveServer) -> None:
    msgs = [{"role": "user", "content": "a b c d e"}]
    with sc.Client(stella.url, timeout=0.2) as c, pytest.raises(sc.TimeoutError) as info:
        for e in c.chat(msgs, "echo-stall", stream=True):
            if isinstance(e, Start):
                started = e.id
    assert info.value.request_id == started
    async with sc.AsyncClient(stella.url, timeout=0.2) as ac:
        stream = await ac.chat(msgs, "echo-stall", stream=True)
        with pytest.raises(sc.TimeoutError) as ainfo:
            async for e in stream:
                if isinstance(e, Start):
                    started = e.id
    assert ainfo.value.request_id == started


def test_headers_of_the_caller_go_with_the_key(keyed: LiveServer) -> None:
    rid = "trace-4711"
    headers = {"X-Request-ID": rid, "Authorization": "Bearer not-this-one"}
    with sc.Client(keyed.url, api_key=KEY, headers=headers) as c:
        with c._http.stream("GET", "/api/v1/models") as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == rid
    with sc.Client(keyed.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert c.models().models  # no api_key given: the caller's own header is sent


def test_every_code_stella_sends_has_its_client_error() -> None:
    # A code with no entry falls to its status's class, or the base one: the client's
    # table follows the server's codes, the transport's own included.
    import re
    from pathlib import Path

    from stella.client import BY_CODE, BY_STATUS

    root = Path(__file__).parent.parent / "stella"
    errors = (root / "errors.py").read_text()
    codes = set(re.findall(r'code(?: =|: str =| = \d+,) "([a-z_]+)"', errors))
    codes |= set(re.findall(r'status, code = \d+, "([a-z_]+)"', errors))
    codes |= {"headers_too_large", "not_implemented"}  # stella.transport's own
    # Never read by a client: the connection is gone.
    codes -= {"client_too_slow", "client_closed"}
    assert {"not_supported", "upstream_path_not_found", "internal_error"} <= codes
    assert codes <= set(BY_CODE), codes - set(BY_CODE)
    assert {400, 431, 501} <= set(BY_STATUS)


def test_the_readme_s_python_client_example_runs_as_given(stella: LiveServer) -> None:
    """README's Python client section had no example to copy, and its Embeddings section
    called `embed` on the class; its example now runs as written, with STELLA_URL set."""
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"(?<!\w)(Async)?Client\.(chat|generate|embed|models|health)\(", readme)
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```$", readme, re.M | re.S)
    (code,) = [textwrap.dedent(b) for _, b in blocks if "from stella.client import" in b]
    env = {**os.environ, "STELLA_URL": stella.url, "STELLA_API_KEY": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # echo answers with the last user message, word for word.
    assert out.stdout.splitlines() == [
        "Why is the sky blue? stop 5",
        "And at sunset?",
        "[stop]",
        "2",
    ]
