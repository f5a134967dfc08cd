"""W3C Trace Context: the traceparent parser, and a real stella between a client that
sends one and the fake upstreams, which see stella's span as their parent."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stella.trace import MAX_TRACESTATE, bounded_tracestate, new_span, parse_traceparent
from tests.fakes.anthropic import KEY, FakeAnthropic
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.live import LiveServer, run_stella

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
HEX16 = re.compile("[0-9a-f]{16}")
HEX32 = re.compile("[0-9a-f]{32}")


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (VALID, (TRACE, PARENT, "01")),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, "00")),
        # Level 2's `random` flag is kept with the trace id; reserved bits are not.
        (f"00-{TRACE}-{PARENT}-03", (TRACE, PARENT, "03")),
        (f"00-{TRACE}-{PARENT}-ff", (TRACE, PARENT, "03")),
        # A later version: its first four fields, and of its flags only `sampled`.
        (f"01-{TRACE}-{PARENT}-03", (TRACE, PARENT, "01")),
        (f"cc-{TRACE}-{PARENT}-01-what-the-future-adds", (TRACE, PARENT, "01")),
        (f"fe-{TRACE}-{PARENT}-00", (TRACE, PARENT, "00")),
    ],
)
def test_a_valid_traceparent_is_read(header: str, parsed: tuple[str, str, str]) -> None:
    assert parse_traceparent(header) == parsed


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # uppercase hex
        f"00-{TRACE}-{PARENT.upper()}-01",
        f"00-{TRACE}-{PARENT}-0A",
        f"0A-{TRACE}-{PARENT}-01",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has four fields
        f"00-{TRACE}-{PARENT}-01 ",
        f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
        f"00-{TRACE}1-{PARENT}-01",  # long trace id
        f"00-{TRACE}-{PARENT[:-1]}-01",
        f"00-{TRACE}-{PARENT}-1",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE[:-1]}g-{PARENT}-01",  # not hex
        f"0-{TRACE}-{PARENT}-01",
        f"01-{TRACE}-{PARENT}-01x",  # a later version's next field starts with a dash
        f"01-{TRACE}-{PARENT}",
    ],
)
def test_an_invalid_traceparent_is_none(header: str) -> None:
    assert parse_traceparent(header) is None


def test_a_tracestate_is_passed_on_as_it_came_within_the_bound() -> None:
    assert bounded_tracestate(STATE) == STATE
    at_bound = ",".join(f"v{i:02d}=" + "x" * 11 for i in range(32))[:MAX_TRACESTATE]
    assert bounded_tracestate(at_bound) == at_bound
    assert bounded_tracestate("a=1,\tb=2") == ""  # not printable: dropped
    assert bounded_tracestate("a=é") == ""


def test_a_too_long_tracestate_is_cut_as_the_spec_says() -> None:
    # Members over 128 characters go first, then members from the end, until it fits.
    long = "big=" + "y" * 200
    members = [f"m{i:02d}=" + "x" * 20 for i in range(30)]  # 24 characters each
    value = ",".join([members[0], long, *members[1:]])
    cut = bounded_tracestate(value)
    assert len(cut) <= MAX_TRACESTATE and "big=" not in cut
    assert cut == ",".join(members[:20])  # 20 * 24 + 19 commas = 499; 21 would be 524
    assert bounded_tracestate("z=" + "x" * 600) == ""


def span_of(*headers: tuple[str, str]) -> Any:
    return new_span([(k.encode(), v.encode()) for k, v in headers])


def test_a_span_is_a_child_of_the_clients() -> None:
    span = span_of(("traceparent", VALID), ("tracestate", "a=1"), ("tracestate", "b=2"))
    assert (span.trace_id, span.parent_id, span.tracestate) == (TRACE, PARENT, "a=1,b=2")
    assert HEX16.fullmatch(span.span_id) and span.span_id != PARENT
    assert span.traceparent == f"00-{TRACE}-{span.span_id}-01"
    # A later version is sent on as version 00, its flags as read.
    later = span_of(("traceparent", f"cc-{TRACE}-{PARENT}-01-more"))
    assert later.traceparent == f"00-{TRACE}-{later.span_id}-01"


def test_spaces_and_tabs_around_a_traceparent_are_no_part_of_it() -> None:
    # RFC 9110 5.5: a field value's surrounding whitespace is not its value; a server
    # that leaves it there passes it on.
    for value in (f"{VALID} ", f"{VALID}\t", f" \t{VALID} \t"):
        span = span_of(("traceparent", value))
        assert (span.trace_id, span.parent_id) == (TRACE, PARENT), repr(value)


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("tracestate", STATE),),  # a tracestate alone is dropped
        (("traceparent", f"00-{TRACE.upper()}-{PARENT}-01"), ("tracestate", STATE)),
        (("traceparent", VALID), ("traceparent", f"00-{TRACE}-{'1' * 16}-01")),  # two
    ],
)
def test_without_a_valid_traceparent_a_trace_starts(headers: tuple[tuple[str, str], ...]) -> None:
    span = span_of(*headers)
    assert HEX32.fullmatch(span.trace_id) and span.trace_id != TRACE
    assert HEX16.fullmatch(span.span_id)
    assert (span.parent_id, span.tracestate) == ("", "")
    assert span.traceparent == f"00-{span.trace_id}-{span.span_id}-01"
    assert span_of(*headers).trace_id != span.trace_id  # each a trace of its own


# One stella in front of the three kinds of HTTP upstream.
Fakes = tuple[FakeOpenAI, FakeAnthropic, FakeOllama, LiveServer]


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    oai, claude, box = FakeOpenAI(), FakeAnthropic(), FakeOllama()
    with (
        serve(oai.app) as oai_url,
        serve(claude.app) as claude_url,
        serve(box.app, "/api/version") as box_url,
    ):
        config = {
            "backends": {
                "oai": {"kind": "openai", "base_url": oai_url + "/v1"},
                "claude": {"kind": "anthropic", "base_url": claude_url, "api_key_env": "CK"},
                "box": {"kind": "ollama", "base_url": box_url},
            },
            "models": {
                "routes": {
                    "oai": {"backend": "oai", "upstream_model": "ok", "retries": 0},
                    "emb": {"backend": "oai", "upstream_model": "text-embedding-3-small"},
                    "claude": {"backend": "claude", "upstream_model": "claude-ok"},
                    "llama": {"backend": "box", "upstream_model": "llama3"},
                }
            },
        }
        with run_stella(config, {"CK": KEY}) as server:
            yield oai, claude, box, server


HI = [{"role": "user", "content": "hi"}]
# Each dialect's inference route and a body for it (the model apart).
ASKS: list[tuple[str, dict[str, Any]]] = [
    ("/api/v1/chat", {"messages": HI}),
    ("/api/v1/generate", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": HI}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/responses", {"input": "hi"}),
    ("/v1/messages", {"messages": HI, "max_tokens": 16}),
    ("/api/chat", {"messages": HI}),
    ("/api/generate", {"prompt": "hi"}),
]


def ask(
    server: LiveServer, path: str, body: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
    """POST `body`, wait for its call's inference event and return it."""
    r = httpx.post(server.url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 200, (path, r.text)
    rid = r.headers["x-request-id"]
    return server.wait_event(lambda e: e["request_id"] == rid)


def sent(seen: list[dict[str, str]], event: dict[str, Any]) -> dict[str, str]:
    """The headers the upstream got for the call of `event`."""
    return next(h for h in reversed(seen) if h.get("x-request-id") == event["request_id"])


def assert_child_of_client(up: dict[str, str], ev: dict[str, Any], state: str = STATE) -> None:
    """The call's span is a child of the client's, and the upstream's parent is it."""
    assert ev["trace_id"] == TRACE and ev["parent_span_id"] == PARENT, ev
    assert HEX16.fullmatch(ev["span_id"]) and ev["span_id"] != PARENT
    assert up["traceparent"] == f"00-{TRACE}-{ev['span_id']}-01"
    assert up["tracestate"] == state


@pytest.mark.parametrize(("path", "body"), ASKS)
@pytest.mark.parametrize("stream", [False, True])
def test_each_dialect_names_its_span_to_the_upstream(
    fakes: Fakes, path: str, body: dict[str, Any], stream: bool
) -> None:
    oai, _, _, server = fakes
    headers = {"traceparent": VALID, "tracestate": STATE}
    ev = ask(server, path, {"model": "oai", "stream": stream, **body}, headers)
    assert_child_of_client(sent(oai.headers, ev), ev)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/embed", {"input": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
        ("/api/embed", {"input": "hi"}),
        ("/api/embeddings", {"prompt": "hi"}),
    ],
)
def test_an_embed_call_names_its_span_to_the_upstream(
    fakes: Fakes, path: str, body: dict[str, Any]
) -> None:
    oai, _, _, server = fakes
    ev = ask(server, path, {"model": "emb", **body}, {"traceparent": VALID, "tracestate": STATE})
    assert ev["op"] == "embed"
    assert_child_of_client(sent(oai.headers, ev), ev)


def test_without_a_traceparent_stella_starts_the_trace(fakes: Fakes) -> None:
    oai, _, _, server = fakes
    body = {"model": "oai", "stream": False, "messages": HI}
    events = []
    for headers in ({}, {"tracestate": STATE}, {"traceparent": VALID.upper(), "tracestate": STATE}):
        ev = ask(server, "/v1/chat/completions", body, headers)
        up = sent(oai.headers, ev)
        assert HEX32.fullmatch(ev["trace_id"]) and ev["trace_id"] != TRACE.upper()
        assert HEX16.fullmatch(ev["span_id"]) and "parent_span_id" not in ev
        assert up["traceparent"] == f"00-{ev['trace_id']}-{ev['span_id']}-01"
        assert "tracestate" not in up  # no valid traceparent: nothing to pair it with
        events.append(ev)
    assert len({ev["trace_id"] for ev in events}) == 3  # a new trace each
    assert {ev["request_id"] for ev in events}.isdisjoint(ev["trace_id"] for ev in events)


def test_the_anthropic_backend_names_its_span_to_the_upstream(fakes: Fakes) -> None:
    _, claude, _, server = fakes
    headers = {"traceparent": VALID, "tracestate": STATE}
    for path, body in (ASKS[0], ASKS[5]):
        ev = ask(server, path, {"model": "claude", "stream": True, **body}, headers)
        assert ev["backend"] == "claude"
        assert_child_of_client(sent(claude.headers, ev), ev)


def test_the_ollama_backend_names_its_span_to_the_upstream(fakes: Fakes) -> None:
    _, _, box, server = fakes
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-00"}  # not sampled: passed on so
    for path, body in (ASKS[0], ASKS[6]):
        ev = ask(server, path, {"model": "llama", "stream": False, **body}, headers)
        assert ev["backend"] == "box" and ev["parent_span_id"] == PARENT
        up = sent(box.headers, ev)
        assert up["traceparent"] == f"00-{TRACE}-{ev['span_id']}-00"
        assert "tracestate" not in up


def test_a_token_count_carries_the_trace_to_the_upstream(fakes: Fakes) -> None:
    # No inference and no log event, but an upstream request of the client's trace.
    _, claude, _, server = fakes
    body = {"model": "claude", "messages": HI}
    headers = {"traceparent": VALID, "tracestate": STATE, "anthropic-version": "2023-06-01"}
    r = httpx.post(server.url + "/v1/messages/count_tokens", json=body, headers=headers)
    assert r.status_code == 200, r.text
    up = claude.count_headers[-1]
    assert up["x-request-id"] == r.headers["x-request-id"]
    version, trace_id, span_id, flags = up["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert HEX16.fullmatch(span_id) and span_id != PARENT
    assert up["tracestate"] == STATE
