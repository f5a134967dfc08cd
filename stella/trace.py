"""W3C Trace Context (https://www.w3.org/TR/trace-context/): stella as one span.

A client's `traceparent` names its trace and its own span; stella makes a span of its
own for each inference, a child of the client's, and names that span as the parent in
the `traceparent` it sends each upstream, so that the upstream's spans join the trace
under stella's. The inference log event carries the ids: stella exports no spans
itself, its log is the record of its span. With no valid `traceparent` stella starts
the trace.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Not a secret, and unique enough: a trace id needs randomness, not a system entropy
# call per request. Seeded again in a forked child, or every worker forked from one
# process would draw the same ids.
_random = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_random.seed)

# version-trace_id-parent_id-flags, lowercase hex only (uppercase is invalid: 3.2.2).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# The flags passed on, by the flags received. Version 00 defines `sampled` (01) and,
# in Trace Context Level 2, `random` (02: the trace id's right half is random, which
# stays true while the trace id does); the other bits are reserved and sent as zero. Of
# a later version only `sampled` is read (4.3).
_FLAGS_00 = {f"{i:02x}": f"{i & 0x03:02x}" for i in range(256)}
_FLAGS_LATER = {f"{i:02x}": f"{i & 0x01:02x}" for i in range(256)}
# The flags of a trace stella starts: sampled. Every inference is logged, so stella's
# span is always recorded; an upstream that samples by its parent records its own too,
# and the trace is whole wherever it is looked up.
NEW_TRACE_FLAGS = "01"
# The longest tracestate passed on: what the spec asks a vendor to pass on at least
# (3.3.1.5: 512 characters, about its 32 list members of 16 characters).
MAX_TRACESTATE = 512
# A member longer than this goes first when a tracestate must be cut (3.3.1.5).
_LONG_MEMBER = 128


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags to pass on) of a valid `traceparent`, else None."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == "00":
        if len(value) != 55:
            return None
        kept = _FLAGS_00[flags]
    elif version == "ff":
        return None
    elif len(value) > 55 and value[55] != "-":
        # A later version may add fields, each after a dash (4.3).
        return None
    else:
        kept = _FLAGS_LATER[flags]
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, kept


def bounded_tracestate(value: str) -> str:
    """`tracestate` as passed on: as it came when within MAX_TRACESTATE characters, else
    cut as the spec says (its members over 128 characters first, then from its end);
    "" for one that is not printable ASCII."""
    if not (value.isascii() and value.isprintable()):
        return ""
    if len(value) <= MAX_TRACESTATE:
        return value
    members = [m for m in (p.strip() for p in value.split(",")) if m]
    members = [m for m in members if len(m) <= _LONG_MEMBER]
    while members and len(",".join(members)) > MAX_TRACESTATE:
        members.pop()
    return ",".join(members)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much
class Span:
    """stella's span of one inference: its ids and the headers that carry it upstream."""

    trace_id: str
    span_id: str
    # The client's span, stella's parent ("": stella started the trace).
    parent_id: str
    # `traceparent` as sent upstream, stella's span its parent.
    traceparent: str
    # `tracestate` as sent upstream ("": none).
    tracestate: str


def new_span(headers: Iterable[tuple[bytes, bytes]]) -> Span:
    """A new span in the trace a request's `traceparent` names (a new trace when it names
    none: no header, two, or one that is invalid, which is never an error)."""
    parent: bytes | None = None
    state: bytes | None = None
    twice = False
    for name, value in headers:
        if name == b"traceparent":
            twice = parent is not None
            parent = value
        elif name == b"tracestate":
            # Several tracestate headers are one list (RFC 9110 5.3).
            state = value if state is None else state + b"," + value
    # A field value's own spaces and tabs around it are no part of it (RFC 9110 5.5).
    got = (
        None
        if parent is None or twice
        else parse_traceparent(parent.decode("latin-1").strip(" \t"))
    )
    if got is None:
        ids = _random.randbytes(24).hex()  # one draw for both ids
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # invalid; a 2**-64 chance
            return new_span(())
        return Span(trace_id, span_id, "", f"00-{trace_id}-{span_id}-{NEW_TRACE_FLAGS}", "")
    trace_id, parent_id, flags = got
    span_id = _random.randbytes(8).hex()
    if span_id == _ZERO_SPAN:
        span_id = "0000000000000001"
    # A tracestate without a valid traceparent is dropped with it (3.3).
    tracestate = bounded_tracestate(state.decode("latin-1")) if state else ""
    return Span(trace_id, span_id, parent_id, f"00-{trace_id}-{span_id}-{flags}", tracestate)
