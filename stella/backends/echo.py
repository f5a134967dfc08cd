"""The echo backend: deterministic answers for tests, demos and load tests.

It streams back the last user (or tool) message word by word (a non-stream request gets
the same text as one delta, as a remote backend's non-stream call would give
it). With tools in the request it calls the first tool (or the one `tool_choice`
names) once with `{"input": <text>}`; after a tool result it echoes that result. Knobs make it fail, stall or slow down on purpose.
It makes embeddings too: each text's vector is the sum of one fixed pseudo-random vector
per word, seeded by the word's hash, made a unit vector (texts sharing words point alike).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from array import array
from collections.abc import AsyncIterator
from operator import add
from typing import Annotated, Literal

from msgspec import Meta

from stella.backends.base import (
    Backend,
    BackendConfig,
    BackendEvent,
    CallContext,
    content_of,
    first_stop,
    new_call_id,
)
from stella.errors import Overloaded, StellaError, Unavailable, UpstreamError, UpstreamTimeout
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    ToolCall,
    Usage,
)

_WORDS = re.compile(r"\s*\S+")


class EchoConfig(BackendConfig, kw_only=True):
    """[backends.NAME] with kind = "echo"."""

    delay_s: Annotated[float, Meta(ge=0)] = 0.0  # pause before each token
    fail_before_first: bool = False  # raise before any token (a retryable upstream error)
    # The first N calls fail before any token, later ones work.
    fail_first_calls: Annotated[int, Meta(ge=0)] = 0
    fail_after: Annotated[int, Meta(ge=-1)] = -1  # raise after this many tokens (-1: never)
    # Stop producing after this many tokens, forever (-1: never).
    stall_after: Annotated[int, Meta(ge=-1)] = -1
    # The failure fail_after raises: what a real backend may end a stream with
    # (fail_before_first and fail_first_calls always raise upstream_error).
    error_code: Literal["upstream_error", "upstream_timeout", "overloaded", "unavailable"] = (
        "upstream_error"
    )
    # Fixed reply instead of the echo, e.g. for load tests with a known size.
    reply: str = ""


# Tokens of an answer without delay_s between two turns of the event loop.
YIELD_EVERY = 256
# The numbers echo adds up while it embeds between two turns of the event loop (some
# 6 ms): a batch of long texts, or of long vectors, must not hold the other calls up.
EMBED_WORK = 65_536
# The length of echo's vectors when a request asks none.
EMBED_DIMENSIONS = 16
# The failures `error_code` can name.
_FAILURES: dict[str, type[StellaError]] = {
    e.code: e for e in (UpstreamError, UpstreamTimeout, Overloaded, Unavailable)
}


class EchoBackend(Backend):
    """Echoes the last user (or tool) message; knobs for failure and pacing."""

    kind = "echo"
    honours_tool_choice = True  # "none": it answers in text
    Config = EchoConfig

    def __init__(self, name: str, config: EchoConfig) -> None:
        super().__init__(name, config)
        self.cfg = config
        self.started = 0
        self.closed = 0  # generators whose cleanup ran (cancel or finish)

    def capabilities(self, upstream_model: str) -> list[str]:
        """Chat and tool calls."""
        return ["chat", "tools"]

    async def models(self) -> list[str]:
        """One model, named after the backend."""
        return ["echo"]

    async def count_tokens(self, request: ChatRequest, ctx: CallContext) -> int:
        """The prompt tokens its answer to `request` reports: the messages' words (the
        failure and pacing knobs are the answer's, not the count's)."""
        return _prompt_tokens(request)

    async def embed(self, request: EmbedRequest, ctx: CallContext) -> EmbedResult:
        """A vector per text (EMBED_DIMENSIONS long, or `dimensions`), the words as its
        tokens; fail_before_first, fail_first_calls, delay_s (once) and stall_after (any
        value: it never answers) apply as to a chat's first token."""
        cfg = self.cfg
        self.started += 1
        try:
            if cfg.fail_before_first or self.started <= cfg.fail_first_calls:
                raise UpstreamError("echo: failing before the answer, as configured")
            if cfg.stall_after >= 0:
                await asyncio.Event().wait()  # stall: only cancellation ends this
            if cfg.delay_s:
                await asyncio.sleep(cfg.delay_s)
            size = request.dimensions or EMBED_DIMENSIONS
            vectors = []
            words = work = 0
            for text in request.texts():
                pieces = text.split()
                words += len(pieces)
                total = [0.0] * size
                for word in pieces or (text,):
                    total = _plus(total, word)
                    work += size
                    if work >= EMBED_WORK:
                        # Many words or long vectors: the other calls get their turn.
                        work = 0
                        await asyncio.sleep(0)
                vectors.append(_unit(total))
                work += size
            return EmbedResult(embeddings=vectors, prompt_tokens=words)
        finally:
            self.closed += 1

    async def chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        """Stream the last user (or tool) message back, word by word."""
        cfg = self.cfg
        self.started += 1
        try:
            prompt_tokens = ctx.prompt_tokens = _prompt_tokens(request)
            if cfg.fail_before_first or self.started <= cfg.fail_first_calls:
                raise UpstreamError("echo: failing before the first token, as configured")
            last = request.messages[-1] if request.messages else None
            tools = request.tools or []
            wants_tool = bool(tools) and request.tool_choice != "none"
            if wants_tool and last is not None and last.role == "user":
                tool = tools[0].function
                choice = request.tool_choice
                if choice is not None and not isinstance(choice, str):  # the named one
                    tool = next(
                        t.function for t in tools if t.function.name == choice.function.name
                    )
                # A fresh id each answer, as for an upstream that names its calls none:
                # a history's ids must not repeat (Anthropic's API refuses it).
                yield ToolCall(
                    index=0, id=new_call_id(), name=tool.name, arguments={"input": last.content}
                )
                yield Done(
                    finish_reason="tool_calls",
                    usage=Usage(prompt_tokens, 1, prompt_tokens + 1),
                )
                return
            text = cfg.reply or _last_text(request)
            limit = request.options.max_tokens
            stops = request.options.stop or ()
            if not request.stream and not (
                cfg.delay_s or cfg.stall_after >= 0 or cfg.fail_after >= 0
            ):
                # A non-stream answer comes in one piece, as from a remote backend's
                # non-stream call: the same text and the same token count.
                n = len(text.split())
                if stops or (limit is not None and n > limit):
                    pieces, finish, ctx.stop_sequence = _pieces(_WORDS.findall(text), limit, stops)
                    text, n = "".join(pieces), len(pieces)
                else:
                    text, finish = text.rstrip(), "stop"
                if text:
                    yield Delta(text=text)
                yield Done(finish_reason=finish, usage=Usage(prompt_tokens, n, prompt_tokens + n))
                return
            pieces, finish, ctx.stop_sequence = _pieces(_WORDS.findall(text), limit, stops)
            n = len(pieces)
            for sent, piece in enumerate(pieces):
                if sent == cfg.stall_after:
                    await asyncio.Event().wait()  # stall: only cancellation ends this
                if sent == cfg.fail_after:
                    err = _FAILURES.get(cfg.error_code, UpstreamError)
                    raise err(f"echo: failing after {sent} tokens, as configured")
                if cfg.delay_s:
                    await asyncio.sleep(cfg.delay_s)
                elif sent and not sent % YIELD_EVERY:
                    # A long answer made without pauses would hold the event loop (and
                    # every other request) until its end: a real backend waits on I/O.
                    await asyncio.sleep(0)
                yield Delta(text=piece)
            yield Done(finish_reason=finish, usage=Usage(prompt_tokens, n, prompt_tokens + n))
        finally:
            self.closed += 1


def echo_vector(text: str, size: int) -> list[float]:
    """`text`'s echo embedding: the unit vector along the sum of one pseudo-random vector
    per word (seeded by the word's SHAKE-256 hash), as float32 values (what OpenAI's
    base64 form carries, so both forms give the same numbers)."""
    total = [0.0] * size
    for word in text.split() or (text,):
        total = _plus(total, word)
    return _unit(total)


def _plus(total: list[float], word: str) -> list[float]:
    """`total` plus `word`'s pseudo-random vector (as long as `total`)."""
    return list(
        map(add, total, array("i", hashlib.shake_256(word.encode()).digest(4 * len(total))))
    )


def _unit(total: list[float]) -> list[float]:
    """`total` made a unit vector, as float32 values."""
    norm = math.sqrt(math.fsum(t * t for t in total)) or 1.0
    return array("f", [t / norm for t in total]).tolist()


def _prompt_tokens(request: ChatRequest) -> int:
    """The prompt's size as echo counts it: a token a word, of every message."""
    n = 0
    for m in request.messages:
        n += len(m.content.split())
    return n


def _last_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message.role in ("user", "tool"):
            return content_of(message)  # as a model reads it (a failed call says so)
    return ""


def _pieces(
    words: list[str], limit: int | None, stops: tuple[str, ...] | list[str]
) -> tuple[list[str], FinishReason, str | None]:
    """The deltas of an answer: cut after `limit` words or where a stop string begins
    (then also that stop string), even one that begins inside a word."""
    if not stops and (limit is None or len(words) <= limit):
        return words, "stop", None  # the common case: nothing cuts the answer
    kept = words if limit is None else words[:limit]
    finish: FinishReason = "length" if len(kept) < len(words) else "stop"
    hit = first_stop("".join(kept), stops) if stops else None
    if hit is None:
        return kept, finish, None
    cut, stop = hit
    out: list[str] = []
    at = 0  # where the word begins in the answer
    for word in kept:
        if at + len(word) >= cut:
            if cut > at:
                out.append(word[: cut - at])
            break
        out.append(word)
        at += len(word)
    return out, "stop", stop
