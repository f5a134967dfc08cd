"""Reliability: property tests of the wire types, schemathesis against the live schema,
and fault injection with the invariant "one terminal outcome and one inference event per
request, nothing left open"."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    Error,
    GenerateRequest,
    Message,
    Options,
    Start,
    StreamEvent,
    Timings,
    ToolCall,
    Usage,
)
from tests.live import LiveServer, in_ci, run_stella

text = st.text(max_size=40)
messages = st.lists(
    st.builds(Message, role=st.sampled_from(["system", "user", "assistant", "tool"]), content=text),
    min_size=1,
    max_size=4,
)
options = st.builds(
    Options,
    temperature=st.none() | st.floats(0, 2),
    max_tokens=st.none() | st.integers(1, 4096),
    stop=st.none() | st.lists(text, max_size=3),
    seed=st.none() | st.integers(-(2**31), 2**31),
)
events = st.one_of(
    st.builds(Start, id=text, model=text, backend=text, created=st.floats(0, 2e9)),
    st.builds(Delta, text=text),
    st.builds(
        ToolCall,
        index=st.integers(0, 8),
        id=text,
        name=text,
        arguments=st.dictionaries(text, st.integers() | text, max_size=3),
    ),
    st.builds(
        Done,
        finish_reason=st.sampled_from(["stop", "length", "tool_calls"]),
        usage=st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6)),
        timings=st.builds(Timings, queue_ms=st.floats(0, 1e6)),
    ),
    st.builds(Error, code=text, message=text, retryable=st.booleans()),
)


@given(
    st.builds(
        ChatRequest,
        messages=messages,
        model=st.none() | text,
        stream=st.booleans(),
        options=options,
    )
)
def test_chat_request_round_trip(req: ChatRequest) -> None:
    assert msgspec.json.decode(msgspec.json.encode(req), type=ChatRequest) == req


@given(st.builds(GenerateRequest, prompt=text, system=st.none() | text, options=options))
def test_generate_request_round_trip(req: GenerateRequest) -> None:
    assert msgspec.json.decode(msgspec.json.encode(req), type=GenerateRequest) == req
    assert req.to_chat().messages[-1].content == req.prompt


@given(st.lists(events, max_size=8))
def test_ndjson_stream_round_trip(evs: list) -> None:
    body = b"".join(msgspec.json.encode(e) + b"\n" for e in evs)
    decoder = msgspec.json.Decoder(StreamEvent)
    assert [decoder.decode(line) for line in body.splitlines()] == evs


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
    max_leaves=10,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(
        st.sampled_from(["model", "messages", "stream", "options", "tools", "x"]),
        json_values,
        max_size=5,
    )
)
def test_random_bodies_never_get_a_5xx(stella: LiveServer, body: dict) -> None:
    for path in ("/api/v1/chat", "/v1/chat/completions", "/api/chat", "/v1/messages"):
        r = httpx.post(
            stella.url + path,
            content=json.dumps(body),
            timeout=10,
            headers={"content-type": "application/json"},
        )
        assert r.status_code < 500, (path, body, r.text)


def test_schemathesis_finds_no_server_errors() -> None:
    import schemathesis

    key = "sk-fuzz-key-123"
    with run_stella(env={"STELLA_API_KEYS": key}) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        schema = schema.exclude(path_regex="^/api/v1/models/switch|^/api/v1/models/\\{").exclude(
            method="DELETE"
        )
        failures = []
        tested = 0
        for op in schema.get_all_operations():
            operation = op.ok()
            tested += 1
            _fuzz(operation, server.url, key, failures)
        assert tested > 10, "schemathesis ran too few operations"
        assert not failures, failures


def _fuzz(operation, url: str, key: str, failures: list) -> None:  # type: ignore[no-untyped-def]
    """Run bounded generated cases for one operation; record responses that are 5xx."""
    from schemathesis.checks import not_a_server_error

    @settings(
        max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def run(case) -> None:  # type: ignore[no-untyped-def]
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
        response = case.call(base_url=url, timeout=10)
        if response.status_code >= 500:
            failures.append((operation.label, response.status_code, response.text[:300]))
        case.validate_response(response, checks=(not_a_server_error,))

    run()


def _open_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


async def _faulty_load(server: LiveServer) -> list[str]:
    """Every fault at once; returns each request's terminal outcome."""
    outcomes: list[str] = []

    async def stream(model: str, leave_after: int | None = None) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "a b c d e f"}]}
        async with httpx.AsyncClient(timeout=10) as c:
            async with c.stream("POST", server.url + "/api/v1/chat", json=body) as r:
                terminal = []
                n = 0
                async for line in r.aiter_lines():
                    ev = json.loads(line)
                    n += 1
                    if ev["type"] in ("done", "error"):
                        terminal.append(ev["type"])
                    if leave_after is not None and n >= leave_after:
                        outcomes.append("left")
                        return
                assert len(terminal) == 1, terminal
                outcomes.append(terminal[0])

    jobs = []
    for _ in range(6):
        jobs += [
            stream("echo"),
            stream("echo-fail"),
            stream("echo-fail-after"),
            stream("echo-stall"),
            stream("echo-slow", leave_after=2),
            stream("echo-stall-first"),
        ]
    await asyncio.gather(*jobs)
    return outcomes


def test_faults_leave_one_outcome_each_and_nothing_behind(stella: LiveServer) -> None:
    pid = stella.proc.pid
    before_events = len(stella.events("inference"))
    asyncio.run(_faulty_load(stella))  # warm-up: pools and lazily made objects
    fds_before = _open_fds(pid)
    outcomes = asyncio.run(_faulty_load(stella))
    assert len(outcomes) == 36
    # A slow client that sends a request and reads nothing, then goes away.
    sock = socket.create_connection(("127.0.0.1", stella.port))
    body = json.dumps(
        {"model": "echo-slow", "messages": [{"role": "user", "content": " ".join(["w"] * 50)}]}
    )
    sock.sendall(
        f"POST /api/v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    time.sleep(0.5)
    sock.close()
    deadline = time.monotonic() + 10
    while len(stella.events("inference")) < before_events + 73 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stella.events("inference")) == before_events + 73  # one per request, no more
    time.sleep(0.5)
    assert _open_fds(pid) <= fds_before + 2, "connections or files left open"
    metrics = httpx.get(stella.url + "/metrics").text
    inflight = next(
        line for line in metrics.splitlines() if line.startswith("stella_inflight_requests ")
    )
    assert float(inflight.split()[1]) == 0.0


@pytest.mark.skipif(
    not os.environ.get("STELLA_SOAK") and not in_ci(),
    reason="soak: set STELLA_SOAK=1 (CI runs it with short bounds)",
)
def test_soak_rss_growth_is_bounded() -> None:
    seconds = float(os.environ.get("STELLA_SOAK_SECONDS", "20"))
    from stella.bench.loadgen import run_load
    from stella.bench.servers import rss_bytes

    with run_stella() as server:
        body = json.dumps(
            {"model": "echo", "messages": [{"role": "user", "content": "soak " * 20}]}
        ).encode()
        asyncio.run(
            run_load(server.url + "/api/v1/chat", body, concurrency=64, duration=3, warmup=0)
        )
        start = rss_bytes(server.proc.pid)
        result = asyncio.run(
            run_load(server.url + "/api/v1/chat", body, concurrency=64, duration=seconds, warmup=0)
        )
        end = rss_bytes(server.proc.pid)
    assert result.errors == 0 and result.requests > 100
    assert end <= start * 1.10, (start, end)
