"""The `anthropic` backend: Anthropic's Messages API over SSE."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import aiohttp
import msgspec

from stella.backends.base import (
    BackendEvent,
    BackendHealth,
    CallContext,
    ended,
    linked_tool_calls,
)
from stella.backends.http import (
    BAD_JSON,
    HttpBackend,
    HttpConfig,
    aiohttp_error,
    iter_lines,
    upstream_text,
)
from stella.backends.stops import StopBuffer
from stella.errors import InvalidRequest, UpstreamError, UpstreamStatus
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    FinishReason,
    Message,
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


# The ids the API takes for a tool_use (and so a tool_result's tool_use_id).
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")
_NOT_IN_ID = re.compile(r"[^a-zA-Z0-9_-]")


def tool_use_id(call_id: str) -> str:
    """`call_id` as an id the Messages API takes, the same for the same id every time."""
    if not call_id or _TOOL_ID.fullmatch(call_id):
        return call_id
    # Other providers' ids (Kimi's `functions.get_weather:0`, a client's `call 1`) would
    # make the API refuse the history. The digest keeps apart ids that differ only in
    # what is replaced; the client's own ids are never touched, only what is sent here.
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:8]
    return f"{_NOT_IN_ID.sub('_', call_id)}_{digest}"


class _ToolUseIds:
    """A history's tool_use ids as sent: each unique, each result naming its own call.

    Clients keep the ids their backends gave, and some backends numbered every answer's
    calls from call_0: the API refuses a history whose tool_use ids repeat. A repeated id
    is renamed in the later tool_use and in the results that answer it (those after it,
    before the id's next use), the same way each time the history is sent.
    """

    def __init__(self, history: list[Message]) -> None:
        # Every id the history sends (a renamed one must not become another call's).
        self.taken = {tool_use_id(c.id) for m in history for c in m.tool_calls or ()}
        self.sent: set[str] = set()
        # Per id as the client wrote it (mapped), the ids sent for it in the last turn
        # that used it: its results answer those, in order.
        self.latest: dict[str, list[str]] = {}

    def turn(self, call_ids: list[str]) -> list[str]:
        """The ids to send for one assistant turn's calls."""
        out = []
        fresh: dict[str, list[str]] = {}
        for call_id in call_ids:
            given = tool_use_id(call_id)
            sent = given
            n = 1
            while sent in self.sent or (sent != given and sent in self.taken):
                n += 1
                sent = f"{given}_{n}"
            self.sent.add(sent)
            fresh.setdefault(given, []).append(sent)
            out.append(sent)
        self.latest.update(fresh)
        return out

    def result(self, call_id: str) -> str:
        """The id a tool_result sends, for the id its client wrote."""
        given = tool_use_id(call_id)
        sent = self.latest.get(given)
        if not sent:
            return given
        # A turn with the id twice: its results answer those calls one after another.
        return sent.pop(0) if len(sent) > 1 else sent[0]


class AnthropicConfig(HttpConfig, kw_only=True):
    """[backends.NAME] with kind = "anthropic"."""

    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    # The API requires one (1 or more); used when a request sets none.
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 1024


class _Block(msgspec.Struct):
    type: str = "text"
    text: str = ""
    id: str = ""
    name: str = ""
    input: dict[str, Any] | None = None


class _BlockDelta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _Usage(msgspec.Struct):
    # Only output_tokens is never null: message_delta's usage (MessageDeltaUsage) may
    # send the others as null, counts it does not give again.
    input_tokens: int | None = None
    output_tokens: int = 0
    # With prompt caching, input_tokens are only the prompt's tokens after the last
    # cache breakpoint: those written to the cache and read from it are counted apart.
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

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


_event = msgspec.json.Decoder(_Event)
_enc = msgspec.json.Encoder()


def _schema(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema of a `json_schema` response_format (None for any other)."""
    if fmt is None or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def local_stops(stop: list[str] | None) -> list[str]:
    """The stop strings of only whitespace ("\\n"), which the API refuses: stella applies them."""
    return [s for s in stop or () if s and not s.strip()]


def request_body(request: ChatRequest, default_max: int) -> dict[str, Any]:
    """The Messages API body: system pulled out, tool calls and results as blocks."""
    system = "\n\n".join(m.content for m in request.messages if m.role == "system")
    messages: list[dict[str, Any]] = []
    history = linked_tool_calls(request.messages)
    ids = _ToolUseIds(history)
    for m in history:
        if m.role == "system":
            continue
        if m.role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": ids.result(m.tool_call_id or ""),
                "content": m.content,
            }
            if m.is_error:
                block["is_error"] = True
            if (
                messages
                and messages[-1]["role"] == "user"
                and isinstance(messages[-1]["content"], list)
            ):
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": "user", "content": [block]})
            continue
        if m.tool_calls:
            blocks: list[dict[str, Any]] = (
                [{"type": "text", "text": m.content}] if m.content else []
            )
            blocks += [
                {
                    "type": "tool_use",
                    "id": sent,
                    "name": c.function.name,
                    "input": c.function.arguments,
                }
                for c, sent in zip(
                    m.tool_calls, ids.turn([c.id for c in m.tool_calls]), strict=True
                )
            ]
            messages.append({"role": "assistant", "content": blocks})
        elif m.role == "assistant" and not m.content.strip():
            # A turn that answered nothing (stopped before its first token): the API
            # refuses empty content but in a final prefill, and the turn says nothing.
            if m is history[-1]:
                messages.append({"role": "assistant", "content": m.content})
        else:
            messages.append({"role": m.role, "content": m.content})
    o = request.options
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "stream": True,
        "max_tokens": o.max_tokens or default_max,
    }
    if system:
        body["system"] = system
    for key, value in (
        # The API's range is 0 to 1 (OpenAI's 0 to 2): above it, the most random it takes.
        ("temperature", None if o.temperature is None else min(o.temperature, 1.0)),
        ("top_p", o.top_p),
        ("top_k", o.top_k),
        ("stop_sequences", [s for s in o.stop or () if s.strip()] or None),
    ):
        if value is not None:
            body[key] = value
    if (schema := _schema(request.response_format)) is not None:
        body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    if request.tools:
        body["tools"] = [
            {
                "name": t.function.name,
                "description": t.function.description,
                "input_schema": t.function.parameters or {"type": "object"},
            }
            for t in request.tools
        ]
        choice = request.tool_choice
        if choice == "none":
            body["tool_choice"] = {"type": "none"}
        elif choice == "required":
            body["tool_choice"] = {"type": "any"}
        elif choice is not None and not isinstance(choice, str):
            body["tool_choice"] = {"type": "tool", "name": choice.function.name}
        if request.parallel_tool_calls is False and choice != "none":
            # The API's switch lives in tool_choice (auto, any or tool; none calls none).
            body.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
    return body


class AnthropicBackend(HttpBackend):
    """Claude models through the Messages API."""

    kind = "anthropic"
    honours_tool_choice = True
    honours_parallel_tool_calls = True
    Config = AnthropicConfig

    def __init__(self, name: str, config: AnthropicConfig) -> None:
        super().__init__(name, config)
        self.cfg = config

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
        """Refuse a JSON mode without a schema: the Messages API's structured outputs
        take a schema (output_config.format) and have no bare JSON mode."""
        self._refuse_schemaless(request)

    def _refuse_schemaless(self, request: ChatRequest) -> None:
        fmt = request.response_format
        if fmt is not None and fmt.get("type") != "text" and _schema(fmt) is None:
            # As refuse_json_mode: an answer in prose would pass for one that obeyed.
            raise InvalidRequest(
                "$.response_format: the model's backend (anthropic) constrains output to a "
                "JSON schema only (json_schema with a schema); send one, or none",
                param="response_format",
            )

    async def chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        """Stream one message and translate the SSE events."""
        self._refuse_schemaless(request)  # also on a route with fallbacks (no admit())
        body = _enc.encode(request_body(request, self.cfg.max_tokens))
        name = self.name
        try:
            async with self.answer(self.base_url + "/v1/messages", body, ctx) as r:
                usage = _Usage()
                tools: dict[int, list[Any]] = {}  # index -> [id, name, json, input at start]
                stop: str | None = None
                calls = 0
                # OpenAI's clients often stop at "\n": the API refuses it, so it is held here.
                held = StopBuffer(local_stops(request.options.stop))
                async for line in iter_lines(r, name):
                    if not line.startswith(b"data:"):
                        continue
                    try:
                        ev = _event.decode(line[5:])
                    except BAD_JSON:
                        raise UpstreamError(f"{name}: malformed event") from None
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
                    if kind == "content_block_delta" and ev.delta is not None:
                        # Text and tool input alike: a stream cut before message_delta's
                        # count is charged the pieces read.
                        ctx.tokens_seen += 1
                        if ev.delta.type == "text_delta":
                            text, hit = held.feed(ev.delta.text)
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
                        elif ev.delta.type == "input_json_delta" and ev.index in tools:
                            tools[ev.index][2] += ev.delta.partial_json
                    elif kind == "content_block_start" and ev.content_block is not None:
                        block = ev.content_block
                        if block.type == "tool_use":
                            tools[ev.index] = [block.id, block.name, "", block.input]
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
                        usage = ev.message.usage
                        # Early, for a call cut short and the Messages dialect's message_start.
                        ctx.prompt_tokens = usage.prompt()
                        ctx.cached_tokens = usage.cache_read_input_tokens
                    elif kind == "message_delta":
                        if ev.delta is not None and ev.delta.stop_reason:
                            stop = ev.delta.stop_reason
                            ctx.stop_sequence = ev.delta.stop_sequence
                        if ev.usage is not None:
                            usage = _cumulative(usage, ev.usage)
                            ctx.prompt_tokens = usage.prompt()
                            ctx.cached_tokens = usage.cache_read_input_tokens
                    elif kind == "message_stop":
                        if text := held.flush():
                            yield Delta(text=text)
                        prompt = usage.prompt()
                        yield Done(
                            finish_reason=ended(STOP.get(stop or "end_turn", "stop"), calls > 0),
                            usage=Usage(prompt, usage.output_tokens, prompt + usage.output_tokens),
                        )
                        return
                raise UpstreamError(f"{name}: stream ended before message_stop")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise aiohttp_error(name, exc, self.http.connect_timeout_s) from None
