"""The `anthropic` backend: Anthropic's Messages API over SSE."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

import aiohttp
import msgspec

from stella.backends.anthropic_request import (
    derived_effort,
    local_stops,
    request_body,
    schema_of,
    thinking_plan,
    too_many_breakpoints,
    unsendable,
)
from stella.backends.base import (
    BackendEvent,
    BackendHealth,
    CallContext,
    counted,
    detail,
    ended,
    token_count,
)
from stella.backends.http import (
    BAD_JSON,
    HttpBackend,
    HttpConfig,
    aiohttp_error,
    bounded_wait,
    iter_lines,
    read_body,
    upstream_text,
)
from stella.backends.stops import StopBuffer
from stella.errors import (
    ContextTooLong,
    InvalidRequest,
    StellaError,
    UpstreamContextTooLong,
    UpstreamError,
    UpstreamStatus,
)
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    FinishReason,
    ToolCall,
    Usage,
    arguments_of,
)

STOP: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    # The answer filled the model's context window: cut short, as at max_tokens.
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}


# What of a chat's body POST /v1/messages/count_tokens takes: the prompt, not the answer.
_COUNTED = frozenset(
    {"model", "system", "messages", "tools", "tool_choice", "output_config", "thinking"}
)


class AnthropicConfig(HttpConfig, kw_only=True):
    """[backends.NAME] with kind = "anthropic"."""

    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    # The API requires one (1 or more); used when a request sets none.
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 1024
    # Send images given by http(s) URL on (url sources). On by default: Anthropic's API
    # fetches them on its own infrastructure, outside the operator's network; turn it off
    # for a base_url that is a proxy or server of the operator's own that would fetch them.
    image_urls: bool = True
    # How a request's reasoning_effort asks the model to think: "budget", thinking of type
    # enabled with a budget by effort (the models before Claude Opus 4.7 take it),
    # "adaptive", adaptive thinking at that output_config.effort (Claude Opus 4.6, Sonnet
    # 4.6 and later; Opus 4.7 takes only this), or "off", not at all (a model that does
    # not think; one that refuses what is asked is learned anyway: see Inference).
    reasoning_effort_as: Literal["budget", "adaptive", "off"] = "budget"


class _Block(msgspec.Struct):
    type: str = "text"
    text: str = ""
    id: str = ""
    name: str = ""
    input: dict[str, Any] | None = None
    # A thinking block's (the API starts it empty; a whole Message has it all), and a
    # redacted_thinking block's opaque data.
    thinking: str = ""
    signature: str = ""
    data: str = ""


class _BlockDelta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    thinking: str = ""
    signature: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _OutputDetails(msgspec.Struct):
    # How many of output_tokens the model spent thinking.
    thinking_tokens: int | None = None


class _Usage(msgspec.Struct):
    # Only output_tokens is never null: message_delta's usage (MessageDeltaUsage) may
    # send the others as null, counts it does not give again.
    input_tokens: int | None = None
    output_tokens: int = 0
    # With prompt caching, input_tokens are only the prompt's tokens after the last
    # cache breakpoint: those written to the cache and read from it are counted apart.
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    output_tokens_details: _OutputDetails | None = None

    def prompt(self) -> int:
        """The whole prompt's tokens: uncached, written to the cache and read from it."""
        return (
            (self.input_tokens or 0)
            + (self.cache_creation_input_tokens or 0)
            + (self.cache_read_input_tokens or 0)
        )


def _count(start: int | None, delta: int | None) -> int | None:
    """A cumulative count: message_delta's, or message_start's where it left it null
    (or 0); None when neither gave it."""
    return start if delta is None else max(delta, start or 0)


def _cumulative(start: _Usage, delta: _Usage) -> _Usage:
    """message_delta's counts over message_start's."""
    return _Usage(
        _count(start.input_tokens, delta.input_tokens),
        delta.output_tokens,
        _count(start.cache_creation_input_tokens, delta.cache_creation_input_tokens),
        _count(start.cache_read_input_tokens, delta.cache_read_input_tokens),
        delta.output_tokens_details or start.output_tokens_details,
    )


class _Message(msgspec.Struct):
    usage: _Usage | None = None
    content: list[_Block] = []
    stop_reason: str | None = None


class _Error(msgspec.Struct):
    type: str = ""
    message: str = ""


class _Event(msgspec.Struct):
    type: str
    index: int = 0
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _BlockDelta | None = None
    usage: _Usage | None = None
    error: _Error | None = None


class _Whole(msgspec.Struct):
    """A whole Message (or an error object), from an upstream that did not stream."""

    type: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: _Usage | None = None
    error: _Error | None = None


class _ErrorBody(msgspec.Struct):
    error: _Error | None = None


class _TokenCount(msgspec.Struct):
    """POST /v1/messages/count_tokens's answer (a count below 0 is no count: malformed)."""

    input_tokens: Annotated[int, msgspec.Meta(ge=0)]


_event = msgspec.json.Decoder(_Event)
_token_count = msgspec.json.Decoder(_TokenCount)
_whole = msgspec.json.Decoder(_Whole)
_error_body = msgspec.json.Decoder(_ErrorBody)
_enc = msgspec.json.Encoder()


def _as_events(message: _Whole) -> list[_Event]:
    """A whole Message as the events a stream of it would have sent."""
    if message.type == "error" and message.error is not None:
        return [_Event("error", error=message.error)]
    events = [_Event("message_start", message=_Message(usage=message.usage))]
    for i, block in enumerate(message.content):
        events += [
            _Event("content_block_start", index=i, content_block=block),
            _Event("content_block_stop", index=i),
        ]
    end = _BlockDelta(stop_reason=message.stop_reason, stop_sequence=message.stop_sequence)
    return [*events, _Event("message_delta", delta=end), _Event("message_stop")]


# The API's words for a prompt past the model's context window (its 400
# invalid_request_error): "prompt is too long: 210000 tokens > 200000 maximum", and
# "input length and `max_tokens` exceed context limit: 180000 + 30000 > 200000, ...".
_TOO_LONG = re.compile(r"prompt is too long|exceed context limit", re.IGNORECASE)


def context_too_long(name: str, error: _Error | None) -> ContextTooLong | None:
    """The ContextTooLong an upstream's 400 means, its own words kept (None: another), the
    same error an OpenAI-compatible upstream's refusal of a long prompt is."""
    if error is None or not _TOO_LONG.search(error.message):
        return None
    return UpstreamContextTooLong(f"{name}: {upstream_text(error.message)}", upstream_status=400)


# The API's rate limit headers: per limit (requests, tokens, input-tokens, ...) what is
# left of it and when it is whole again (RFC 3339).
_RESET = re.compile(r"anthropic-ratelimit-(.+)-reset", re.IGNORECASE)


def ratelimit_wait(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds until every exhausted rate limit (`anthropic-ratelimit-*-remaining` 0) is
    reset, from their `-reset` times; None when none says so. At most a day."""
    latest: float | None = None
    for name, value in headers.items():
        limit = _RESET.fullmatch(name)
        if limit is None:
            continue
        left = headers.get(f"anthropic-ratelimit-{limit[1]}-remaining", "").strip()
        if left != "0":
            continue  # not the limit that refused (another one is, or none said)
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            continue
        if when.tzinfo is None:
            continue  # no time zone: no moment
        # The latest: a retry before every exhausted limit is reset is refused again.
        latest = when.timestamp() if latest is None else max(latest, when.timestamp())
    if latest is None:
        return None
    return bounded_wait(latest - (time.time() if now is None else now))


class AnthropicBackend(HttpBackend):
    """Claude models through the Messages API."""

    kind = "anthropic"
    honours_tool_choice = True
    honours_parallel_tool_calls = True
    reads_images = True  # image blocks, base64 or url sources
    Config = AnthropicConfig

    def __init__(self, name: str, config: AnthropicConfig) -> None:
        super().__init__(name, config)
        self.cfg = config
        self.reads_image_urls = config.image_urls
        self.effort_as = config.reasoning_effort_as

    def auth_headers(self) -> dict[str, str]:
        """x-api-key and anthropic-version."""
        headers = {"anthropic-version": self.cfg.anthropic_version}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    def capabilities(self, upstream_model: str) -> list[str]:
        """Chat and tools."""
        return ["chat", "tools"]

    async def models(self) -> list[str]:
        """GET /v1/models."""
        return await self.model_ids("/v1/models")

    async def health(self) -> BackendHealth:
        """GET /v1/models: no tokens spent."""
        return await self.probe("/v1/models")

    def admit(self, request: ChatRequest) -> None:
        """Refuse, before a stream begins, what the API would: a JSON mode without a
        schema (its structured outputs take one, output_config.format, and it has no bare
        JSON mode), a conversation it would refuse (see unsendable), and more cache
        breakpoints than it takes."""
        self._refuse_schemaless(request)
        if (refused := unsendable(request.messages) or too_many_breakpoints(request)) is not None:
            raise refused
        if request.thinking is not None:  # a budget the API would refuse, named
            thinking_plan(request, self.cfg.max_tokens)

    def without_derived_reasoning(self, request: ChatRequest) -> ChatRequest | None:
        """`request` without the reasoning effort (or Ollama's think) its upstream would be
        asked to think by, when it is (None: it asks for no thinking of another dialect's
        words; a client's own `thinking` and `effort` are the client's)."""
        if derived_effort(request) is None or self.effort_as == "off":
            return None
        try:
            sent = request_body(request, self.cfg.max_tokens, self.effort_as)
        except InvalidRequest:
            return None
        if "thinking" not in sent:
            return None  # dropped already (a forced tool call, a prefill): not why it failed
        return msgspec.structs.replace(request, reasoning_effort=None, think=None)

    def _refuse_schemaless(self, request: ChatRequest) -> None:
        fmt = request.response_format
        if fmt is not None and fmt.get("type") != "text" and schema_of(fmt) is None:
            # As refuse_json_mode: an answer in prose would pass for one that obeyed.
            raise InvalidRequest(
                "$.response_format: the model's backend (anthropic) constrains output to a "
                "JSON schema only (json_schema with a schema); send one, or none",
                param="response_format",
            )

    def status_error(
        self, status: int, headers: Mapping[str, str], body: bytes, url: str = ""
    ) -> StellaError:
        """The error for an error status; the API's prompt too long is the request's
        ContextTooLong, and a 429 without Retry-After waits for its exhausted limits."""
        err = super().status_error(status, headers, body, url)
        if not isinstance(err, UpstreamStatus):
            return err
        if status == 400:
            try:
                said = _error_body.decode(body).error
            except BAD_JSON:
                said = None
            # A prompt the model cannot take: not retried, no failure of the backend's.
            return context_too_long(self.name, said) or err
        if status == 429 and err.retry_after_hint is None:
            # The API always sends retry-after; a compatible proxy may send only the
            # limits' headers, and a retry at once would be refused again.
            wait = ratelimit_wait(headers)
            if wait is not None:
                err.retry_in(wait)
                err.retry_after_hint = wait
        return err

    async def count_tokens(self, request: ChatRequest, ctx: CallContext) -> int:
        """The upstream's own count (POST /v1/messages/count_tokens) of the prompt a chat
        of `request` sends: the same model, system prompt, tools and messages."""
        self._refuse_schemaless(request)
        chat = request_body(request, self.cfg.max_tokens, self.effort_as)
        # The prompt's parts alone: the endpoint refuses the answer's (max_tokens, stream,
        # sampling) as inputs it does not take.
        body = _enc.encode({k: v for k, v in chat.items() if k in _COUNTED})
        name = self.name
        raw = await self.whole_answer(self.base_url + "/v1/messages/count_tokens", body, ctx)
        try:
            return _token_count.decode(raw).input_tokens
        except BAD_JSON:
            raise UpstreamError(f"{name}: malformed answer to count_tokens") from None

    async def chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        """Stream one message and translate the SSE events (or a whole Message, from an
        upstream that answers one though asked for a stream)."""
        self._refuse_schemaless(request)  # also on a route with fallbacks (no admit())
        body = _enc.encode(request_body(request, self.cfg.max_tokens, self.effort_as))
        name = self.name
        try:
            async with self.answer(self.base_url + "/v1/messages", body, ctx) as r:
                usage = _Usage()
                tools: dict[int, list[Any]] = {}  # index -> [id, name, json, input at start]
                signed: dict[int, str] = {}  # an open thinking block's index -> its signature
                stop: str | None = None
                calls = 0
                # OpenAI's clients often stop at "\n": the API refuses it, so it is held here.
                held = StopBuffer(local_stops(request.options.stop))
                whole = r.content_type == "application/json"
                events = _whole_events(r, name) if whole else _sse_events(r, name, ctx)
                async for ev in events:
                    kind = ev.type
                    if kind == "error" and ev.error is not None:
                        # A refusal, not output: no beat (the core takes beats as the
                        # upstream having begun its answer, which is charged its prompt).
                        if ev.error.type == "overloaded_error":
                            raise UpstreamStatus(
                                f"{name}: overloaded: {upstream_text(ev.error.message)}",
                                upstream_status=529,
                            )
                        said = upstream_text(f"{ev.error.type}: {ev.error.message}")
                        raise UpstreamError(f"{name}: {said}")
                    if kind == "ping":
                        # A sign of life through a slow stretch, not output: the silence
                        # limits take it, as an OpenAI upstream's `: keepalive` comments.
                        ctx.alive += 1
                        continue
                    ctx.beats += 1  # tool input and thinking are progress, though silent
                    piece = ""
                    if kind == "content_block_delta" and ev.delta is not None:
                        # Text and tool input alike: a stream cut before message_delta's
                        # count is charged the pieces read.
                        ctx.tokens_seen += 1
                        if ev.delta.type == "text_delta":
                            piece = ev.delta.text
                        elif ev.delta.type == "input_json_delta" and ev.index in tools:
                            tools[ev.index][2] += ev.delta.partial_json
                        elif ev.delta.type == "thinking_delta" and ev.delta.thinking:
                            if text := held.flush():  # the text before it is whole
                                yield Delta(text=text)
                            yield Delta(text="", reasoning=ev.delta.thinking)
                        elif ev.delta.type == "signature_delta" and ev.index in signed:
                            signed[ev.index] += ev.delta.signature
                    elif kind == "content_block_start" and ev.content_block is not None:
                        block = ev.content_block
                        if block.type == "tool_use":
                            tools[ev.index] = [block.id, block.name, "", block.input]
                        elif block.type == "text" and block.text:
                            # The API starts a text block empty; a compatible server (or a
                            # whole Message) may start it with text.
                            ctx.tokens_seen += 1
                            piece = block.text
                        elif block.type == "thinking":
                            # Signed at its end (a whole Message's: here already).
                            signed[ev.index] = block.signature
                            if block.thinking:
                                ctx.tokens_seen += 1
                                if text := held.flush():
                                    yield Delta(text=text)
                                yield Delta(text="", reasoning=block.thinking)
                        elif block.type == "redacted_thinking" and block.data:
                            if text := held.flush():
                                yield Delta(text=text)
                            yield Delta(text="", redacted_thinking=block.data)
                    elif kind == "content_block_stop" and ev.index in signed:
                        if signature := signed.pop(ev.index):
                            yield Delta(text="", signature=signature)
                    elif kind == "content_block_stop" and ev.index in tools:
                        call_id, tool, raw, given = tools.pop(ev.index)
                        # Anthropic starts a tool_use with `input: {}` and streams it as
                        # deltas; a compatible server may give it whole at the start.
                        args, kept = arguments_of(raw) if raw.strip() else (given or {}, None)
                        if text := held.flush():  # the text before the call is whole
                            yield Delta(text=text)
                        yield ToolCall(
                            index=calls, id=call_id, name=tool, arguments=args, raw_arguments=kept
                        )
                        calls += 1
                    elif kind == "message_start" and ev.message is not None and ev.message.usage:
                        usage = _fair(ev.message.usage, ctx)
                        # Early, for a call cut short and the Messages dialect's message_start.
                        _tell(ctx, usage)
                    elif kind == "message_delta":
                        if ev.delta is not None and ev.delta.stop_reason:
                            stop = ev.delta.stop_reason
                            ctx.stop_sequence = ev.delta.stop_sequence
                        if ev.usage is not None:
                            usage = _cumulative(usage, _fair(ev.usage, ctx))
                            _tell(ctx, usage)
                    elif kind == "message_stop":
                        break
                    if piece:
                        text, hit = held.feed(piece)
                        if text:
                            yield Delta(text=text)
                        if hit:
                            # Ended here, as the API ends at a stop sequence: the rest is
                            # not read (nor waited for), and its count not known.
                            ctx.stop_sequence = held.matched
                            ctx.usage_estimated = True
                            prompt = usage.prompt()
                            out = ctx.tokens_seen
                            yield Done(
                                finish_reason=ended("stop", calls > 0),
                                usage=Usage(prompt, out, prompt + out),
                            )
                            return
                else:
                    # Ended without message_stop: whole all the same once its stop reason
                    # came (message_delta), as the API's SDK takes it; cut short if not.
                    if stop is None:
                        raise UpstreamError(f"{name}: stream ended before message_stop")
                if text := held.flush():
                    yield Delta(text=text)
                prompt = usage.prompt()
                yield Done(
                    finish_reason=ended(STOP.get(stop or "end_turn", "stop"), calls > 0),
                    usage=Usage(prompt, usage.output_tokens, prompt + usage.output_tokens),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise aiohttp_error(name, exc, self.http.connect_timeout_s) from None


def _fair(usage: _Usage, ctx: CallContext) -> _Usage:
    """`usage` with each count outside 0..MAX_TOKEN_COUNT as not given (the call's usage
    then estimated, where it is needed)."""
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_creation_input_tokens,
        usage.cache_read_input_tokens,
    )
    if all(token_count(n) for n in counts):
        return usage
    ctx.usage_estimated = True
    return _Usage(
        detail(usage.input_tokens),
        counted(usage.output_tokens, ctx),
        detail(usage.cache_creation_input_tokens),
        detail(usage.cache_read_input_tokens),
        usage.output_tokens_details,
    )


def _tell(ctx: CallContext, usage: _Usage) -> None:
    """The counts so far, where the core and the dialects read them."""
    ctx.prompt_tokens = usage.prompt()
    ctx.cached_tokens = usage.cache_read_input_tokens
    ctx.cache_write_tokens = usage.cache_creation_input_tokens
    if usage.output_tokens_details is not None:
        # The completion's thinking, as an OpenAI-compatible upstream's reasoning_tokens.
        ctx.reasoning_tokens = detail(usage.output_tokens_details.thinking_tokens)


async def _sse_events(
    response: aiohttp.ClientResponse, name: str, ctx: CallContext
) -> AsyncIterator[_Event]:
    """The events of an SSE answer; its comments (`: keepalive`) are signs of life."""
    async for line in iter_lines(response, name):
        if not line.startswith(b"data:"):
            # OpenRouter and proxies keep a slow stream open with SSE comments: a sign of
            # life for the silence limits, as the API's own pings are.
            if line[:1] == b":":
                ctx.alive += 1
            continue  # event names, blank lines
        try:
            yield _event.decode(line[5:])
        except BAD_JSON:
            raise UpstreamError(f"{name}: malformed event") from None


async def _whole_events(response: aiohttp.ClientResponse, name: str) -> AsyncIterator[_Event]:
    """The events of a whole Message (or error) answered in one JSON body."""
    body = await read_body(response, name)
    try:
        message = _whole.decode(body)
    except BAD_JSON:
        raise UpstreamError(f"{name}: malformed answer") from None
    for ev in _as_events(message):
        yield ev
