"""W3C Trace Context: the traceparent parser and the span stella makes of a request."""

from __future__ import annotations

import re
from typing import Any

import pytest

from stella.trace import MAX_TRACESTATE, bounded_tracestate, new_span, parse_traceparent

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
