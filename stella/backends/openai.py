"""The `openai` backend: any OpenAI-compatible server (OpenAI, OpenRouter, vLLM, llama.cpp, mlx_lm.server)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import sys
from array import array
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import aiohttp
import msgspec

from stella.backends.base import (
    BackendEvent,
    BackendHealth,
    CallContext,
    content_of,
    counted,
    detail,
    ended,
    linked_tool_calls,
    new_call_id,
    token_count,
)
from stella.backends.http import (
    BAD_JSON,
    MAX_LINE,
    HttpBackend,
    HttpConfig,
    LineBuffer,
    aiohttp_error,
    context_overflow,
    read_body,
    upstream_text,
)
from stella.errors import StellaError, UpstreamContextTooLong, UpstreamError, UpstreamStatus
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    Image,
    Message,
    ToolCall,
    Usage,
    arguments_of,
    arguments_text,
    effort_for,
    effort_from_thinking,
    wire_tools,
)

FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}
# What vLLM, SGLang and others say of an answer they cut short themselves: not a success.
FAILED = frozenset({"abort", "error", "cancelled"})
# How long a finished stream may keep the usage chunk it was asked for (it comes at
# once from a server that sends it) before the answer ends with its deltas counted;
# at most this share of the route's silence limit, which the wait must not run into.
USAGE_GRACE_S = 2.0
USAGE_GRACE_SHARE = 0.5


class OpenAIConfig(HttpConfig, kw_only=True):
    """[backends.NAME] with kind = "openai"."""

    # Send stream_options.include_usage (some older servers reject the field).
    stream_usage: bool = True
    # The name the token limit goes under: OpenAI's reasoning models (o-series, gpt-5)
    # refuse max_tokens; some older compatible servers know no other.
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # Send a Messages client's thinking (or output_config.effort) as reasoning_effort; off
    # for a model that takes none (one that refuses it is learned anyway: see Inference).
    thinking_as_effort: bool = True
    # Send images given by http(s) URL on, for the upstream to fetch. Off by default: a
    # self-hosted server (vLLM, llama.cpp) fetches them from inside the operator's
    # network, so a client could have it ask internal addresses (cloud metadata, admin
    # ports); with it off such an image is a 400, or goes to a fallback that takes it.
    image_urls: bool = False
    # Whether the upstream's model reads images. Off for one that reads text only (llama.cpp
    # without a projector, most coder models), which refuses a request with any: a user's
    # images then go to a fallback that reads them (else a 400), a tool result's are notes.
    images: bool = True


class _Fn(msgspec.Struct):
    name: str | None = None
    arguments: str | dict[str, Any] | None = None  # a string by the spec; some send an object


class _ToolDelta(msgspec.Struct):
    index: int | None = None  # missing when a server sends each call whole
    id: str | None = None
    function: _Fn | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    # OpenAI's answer when the model declines (content then null): the answer's text.
    refusal: str | None = None
    tool_calls: list[_ToolDelta] | None = None
    # A reasoning model's thinking (vLLM's and DeepSeek's `reasoning_content`, OpenRouter's
    # and Groq's `reasoning`): no text of the answer, but tokens it made. Any type: a
    # server's other shape for it must not fail the answer.
    reasoning_content: Any = None
    reasoning: Any = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    message: _Delta | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # OpenAI's, vLLM's, llama.cpp's (some send null, or leave out the count)
    prompt_tokens_details: _PromptDetails | None = None
    # OpenAI's, OpenRouter's, vLLM's for reasoning models (null or absent elsewhere)
    completion_tokens_details: _CompletionDetails | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


class _Embedding(msgspec.Struct):
    index: int | None = None  # the input's place; a server that leaves it out keeps order
    # base64 as asked, or floats from a server that does not know it.
    embedding: list[float] | str = []


class _EmbedUsage(msgspec.Struct):
    prompt_tokens: int = 0


class _Embeddings(msgspec.Struct):
    data: list[_Embedding] | None = None
    usage: _EmbedUsage | None = None
    error: Any = None


_chunk = msgspec.json.Decoder(_Chunk)
_embeddings = msgspec.json.Decoder(_Embeddings)
_json = msgspec.json.Encoder()


def request_body(
    request: ChatRequest, stream: bool, stream_usage: bool, max_tokens_param: str = "max_tokens"
) -> dict[str, Any]:
    """The chat completions body for a ChatRequest, its token limit named `max_tokens_param`."""
    messages: list[dict[str, Any]] = []
    history = linked_tool_calls(request.messages)
    # The tool each call of the history named, by its id: a result's images say which.
    tools: dict[str, str] = {}
    # The parts of the user message that carries the current run of tool results' images.
    shown: list[dict[str, Any]] = []
    for k, m in enumerate(history):
        msg: dict[str, Any] = {"role": m.role, "content": content_of(m)}
        if m.images and m.role == "tool":
            shown += _shown(m, tools)
            if not msg["content"]:
                # Not an empty result: the model reads where its images are.
                many = "images" if len(m.images) > 1 else "image"
                msg["content"] = f"[{many} in the next message]"
        elif m.images or (shown and m.role == "user"):
            # Parts, the images first; a plain string as before for every other message.
            # A user message right after a run of tool results takes their images first:
            # two user messages in a row are refused by some servers' validators.
            parts = [*shown, *map(_image_part, m.images or ())]
            shown = []
            if m.content:
                parts.append({"type": "text", "text": m.content})
            msg["content"] = parts
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": arguments_text(c.function.arguments, c.function.raw_arguments),
                    },
                }
                for c in m.tool_calls
            ]
            if not m.content:
                msg["content"] = None
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
        for c in m.tool_calls or ():
            tools[c.id] = c.function.name
        if shown and (k + 1 == len(history) or history[k + 1].role not in ("tool", "user")):
            # A tool message takes text alone (the API's schema): the images of a run of
            # results follow it in one user message, each after a line naming its call
            # (the next message, when it is a user's).
            messages.append({"role": "user", "content": shown})
            shown = []
    body: dict[str, Any] = {"model": request.model, "messages": messages, "stream": stream}
    o = request.options
    for key in (
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",  # token ids as ints: the JSON encoder writes them as string keys
    ):
        value = getattr(o, key)
        if value is not None:
            body[max_tokens_param if key == "max_tokens" else key] = value
    if request.tools:
        body["tools"] = wire_tools(request.tools)
        if request.tool_choice is not None:
            choice = request.tool_choice
            body["tool_choice"] = (
                choice
                if isinstance(choice, str)
                else {"type": "function", "function": {"name": choice.function.name}}
            )
        if request.parallel_tool_calls is not None:  # the API takes it only with tools
            body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.response_format:
        body["response_format"] = request.response_format
    # Never invented: not every model takes it (an Anthropic dialect's thinking or effort
    # is one the client gave, in Anthropic's words: see without_derived_reasoning).
    if (effort := effort_for(request)) is not None:
        body["reasoning_effort"] = effort
    if stream and stream_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def _shown(m: Message, tools: dict[str, str]) -> list[dict[str, Any]]:
    """A tool message's images as user message parts, after a text naming the call."""
    call = m.tool_call_id or ""
    name = m.name or tools.get(call)
    which = f"{call} ({name})" if name else call
    many = "Images" if len(m.images or ()) > 1 else "Image"
    text = f"{many} returned by tool call {which}:"
    return [{"type": "text", "text": text}, *map(_image_part, m.images or ())]


def _image_part(image: Image) -> dict[str, Any]:
    """An image as the chat completions API takes it: an `image_url` part (a data URL
    for the image's bytes)."""
    url = image.url if image.url is not None else f"data:{image.media_type};base64,{image.data}"
    spec = {"url": url}
    if image.detail is not None:
        spec["detail"] = image.detail
    return {"type": "image_url", "image_url": spec}


class OpenAIBackend(HttpBackend):
    """Chat completions against an OpenAI-compatible base URL (…/v1)."""

    kind = "openai"
    whole_answers = True  # non-stream calls are non-stream upstream
    honours_tool_choice = True
    honours_parallel_tool_calls = True
    may_refuse_images = True  # its model may read text only (see `images`)
    Config = OpenAIConfig

    def __init__(self, name: str, config: OpenAIConfig) -> None:
        super().__init__(name, config)
        self.cfg = config
        # As image_url parts: the upstream's model may still refuse them (see `images`).
        self.reads_images = config.images
        self.reads_image_urls = config.image_urls
        self.chat_url = self.base_url + "/chat/completions"
        self.embed_url = self.base_url + "/embeddings"

    def capabilities(self, upstream_model: str) -> list[str]:
        """Chat and tools (the upstream decides what it really supports)."""
        return ["chat", "tools"]

    async def models(self) -> list[str]:
        """GET /models."""
        return await self.model_ids("/models")

    async def health(self) -> BackendHealth:
        """GET /models: reachable and authorised, no tokens spent."""
        return await self.probe("/models")

    async def embed(self, request: EmbedRequest, ctx: CallContext) -> EmbedResult:
        """POST /embeddings on the pooled client, base64 asked; the upstream's usage."""
        body: dict[str, Any] = {
            "model": request.model,
            "input": request.texts(),
            # A float32 in 5.3 bytes, not some 20 of JSON: 2048 inputs of 1536 floats fit
            # well within MAX_BODY (as floats they are ~72 MB). A server that knows no
            # base64 sends floats: both are read.
            "encoding_format": "base64",
        }
        if request.dimensions is not None:  # only when asked: most models refuse it
            body["dimensions"] = request.dimensions
        name = self.name
        raw = await self.whole_answer(self.embed_url, _json.encode(body), ctx)
        try:
            answer = _embeddings.decode(raw)
        except BAD_JSON:
            raise UpstreamError(f"{name}: malformed embeddings answer") from None
        if answer.error is not None:
            raise _failure(name, answer.error, "upstream error")
        items = _in_order(name, answer.data or [])
        vectors = [_floats(name, item.embedding) for item in items]
        if answer.usage is None:
            ctx.usage_estimated = True  # the core counts the inputs at four characters a token
            return EmbedResult(embeddings=vectors)
        tokens = counted(answer.usage.prompt_tokens, ctx)
        return EmbedResult(embeddings=vectors, prompt_tokens=tokens)

    def without_derived_reasoning(self, request: ChatRequest) -> ChatRequest | None:
        """`request` without the Anthropic thinking and effort it would send as
        reasoning_effort (None: it sends none of theirs; a client's own reasoning_effort
        is the client's)."""
        if effort_from_thinking(request) is None:
            return None
        return msgspec.structs.replace(request, thinking=None, effort=None)

    async def chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        """Stream (or fetch) one completion and translate it into events."""
        stream = request.stream
        cfg = self.cfg
        if not cfg.thinking_as_effort:
            request = self.without_derived_reasoning(request) or request
        body = _json.encode(request_body(request, stream, cfg.stream_usage, cfg.max_tokens_param))
        name = self.name
        try:
            async with self.answer(self.chat_url, body, ctx) as r:
                if not stream:
                    async for event in self._whole(await read_body(r, name), ctx):
                        yield event
                    return
                reads: AsyncIterator[bytes] = r.content.iter_any().__aiter__()
                if r.content_type == "application/json":
                    # A server that ignored `stream: true`, or a proxy's 200 with an error
                    # body, answers with one JSON body: its answer or its error, as a whole
                    # answer's. A stream labelled so is still read as one.
                    head = await anext(reads, b"")
                    if head.lstrip()[:1] in (b"{", b""):
                        answer = head + await read_body(r, name)
                        async for event in self._whole(answer, ctx):
                            yield event
                        return
                    reads = _after(head, reads)
                calls = _Calls(frozenset(t.function.name for t in request.tools or ()))
                finish: str | None = None
                usage: _Usage | None = None
                ended = False
                # The data of an event split over several `data:` lines whose end (a
                # blank line) has not come yet (see _gather).
                pending = b""
                # One network read often holds several SSE events (a fast upstream, or a
                # burst after a pause): their text goes out as one Delta, one send.
                buf = LineBuffer(name)
                grace = USAGE_GRACE_S
                if ctx.silence_limit_s:
                    grace = min(grace, ctx.silence_limit_s * USAGE_GRACE_SHARE)
                while True:
                    if finish is None:
                        raw = await anext(reads, None)
                    else:
                        # The answer is whole, the usage asked for has not come: an
                        # upstream that ignores stream_options may hold the stream open
                        # without [DONE]. Wait briefly, then count the deltas instead. A
                        # connection cut meanwhile costs only the usage too.
                        try:
                            async with asyncio.timeout(grace):
                                raw = await anext(reads, None)
                        except (TimeoutError, aiohttp.ClientError):
                            break
                    if raw is None:
                        break
                    lines = buf.feed(raw)
                    if not lines:
                        continue
                    rest: Iterator[bytes] = iter(lines)
                    if pending:
                        data, whole = _gather(name, pending, rest)
                        if not whole:
                            pending = data
                            continue
                        pending = b""
                        try:
                            _chunk.decode(data)
                        except BAD_JSON:
                            raise UpstreamError(f"{name}: malformed stream line") from None
                        rest = itertools.chain((b"data:" + data,), rest)
                    texts: list[str] = []
                    # The read's reasoning: a list only once some came (most reads hold none).
                    thoughts: list[str] | None = None
                    for line in rest:
                        if not line.startswith(b"data:"):
                            if not line:  # the blank line after each event
                                continue
                            if line[:1] == b":":  # a comment (": keepalive"): alive
                                ctx.alive += 1
                            elif line.startswith(b"error:"):
                                # llama.cpp before ggml-org/llama.cpp#16109 told a failure
                                # in a field of its own, `error: {...}`, then `data: [DONE]`.
                                if texts or thoughts:
                                    yield _delta(texts, thoughts)
                                raise _failure(name, _error_field(line[6:]))
                            continue  # event names, ids, a CRLF stream's blank lines
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            ended = True
                            break
                        try:
                            chunk = _chunk.decode(data)
                        except BAD_JSON:
                            if not data:
                                # An empty event (a relay's heartbeat): alive, as a comment.
                                ctx.alive += 1
                                continue
                            # The first of the event's data lines, or a malformed one.
                            data, whole = _gather(name, data, rest)
                            if not whole:  # its end comes in a later read
                                pending = data
                                continue
                            try:
                                chunk = _chunk.decode(data)
                            except BAD_JSON:
                                if texts or thoughts:
                                    yield _delta(texts, thoughts)
                                raise UpstreamError(f"{name}: malformed stream line") from None
                        if chunk.error is not None:
                            if texts or thoughts:
                                yield _delta(texts, thoughts)
                            raise _failure(name, chunk.error)
                        ctx.beats += 1  # upstream output, with or without text: progress
                        if chunk.usage is not None:
                            usage = chunk.usage
                        for choice in chunk.choices or ():
                            d = choice.delta
                            if d is not None:
                                # Counted per piece, not per Delta (one read's pieces go out
                                # as one): a stream cut before its usage is charged these.
                                # A delta may hold both (vLLM's DeepSeek-R1 parser's, around
                                # `</think>`): its reasoning came first.
                                if d.reasoning_content or d.reasoning:
                                    ctx.tokens_seen += 1
                                    thought = _reasoning(d)
                                    if thought:
                                        if texts:
                                            # Reasoning after text: the text goes first,
                                            # so each line keeps the model's order.
                                            yield _delta(texts, thoughts)
                                            texts, thoughts = [], None
                                        if thoughts is None:
                                            thoughts = []
                                        thoughts.append(thought)
                                if d.content:
                                    ctx.tokens_seen += 1
                                    texts.append(d.content)
                                if d.refusal:
                                    ctx.tokens_seen += 1
                                    texts.append(d.refusal)
                                    # A refusal, not an answer (the Responses dialect).
                                    ctx.refused = True
                                if d.tool_calls:
                                    ctx.tokens_seen += len(d.tool_calls)
                                    calls.add(d.tool_calls)
                            if choice.finish_reason:
                                finish = choice.finish_reason
                        if finish and (usage is not None or not self.cfg.stream_usage):
                            ended = True
                            break
                    if texts or thoughts:
                        yield _delta(texts, thoughts)
                    if ended:
                        break
                if pending:  # an event cut before its end
                    raise UpstreamError(f"{name}: malformed stream line")
                for event in calls.events():
                    yield event
                if finish is None:
                    raise UpstreamError(f"{name}: stream ended without a finish reason")
                if finish in FAILED:
                    raise UpstreamError(f"{name}: the upstream ended the answer ({finish})")
                yield Done(
                    finish_reason=_finish(finish, bool(calls.slots), ctx.refused),
                    usage=_usage(usage, ctx),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise aiohttp_error(name, exc, self.http.connect_timeout_s) from None

    async def _whole(self, raw: bytes, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        try:
            chunk = _chunk.decode(raw)
        except BAD_JSON:
            raise UpstreamError(f"{self.name}: malformed response body") from None
        if chunk.error is not None:
            raise _failure(self.name, chunk.error, "upstream error")
        if not chunk.choices:
            raise UpstreamError(f"{self.name}: response has no choices")
        choice = chunk.choices[0]
        if choice.finish_reason in FAILED:
            raise UpstreamError(
                f"{self.name}: the upstream ended the answer ({choice.finish_reason})"
            )
        msg = choice.message or choice.delta or _Delta()
        text = (msg.content or "") + (msg.refusal or "")
        ctx.refused = bool(msg.refusal)
        thought = _reasoning(msg)
        if text or thought:
            yield Delta(text=text, reasoning=thought)
        calls = _Calls()
        for call in msg.tool_calls or ():
            calls.put(call)
        events = calls.events()
        if chunk.usage is None:
            # No count from the upstream: the answer's size at four characters a token, as
            # admission estimates a prompt (one Delta would count as one token), its
            # reasoning included (tokens the model made).
            size = len(text) + sum(len(slot[2]) for slot in calls.slots.values())
            size += sum(len(r) for r in (msg.reasoning_content, msg.reasoning) if type(r) is str)
            ctx.tokens_seen = max(size // 4, 1) if size else 0
        for event in events:
            yield event
        yield Done(
            finish_reason=_finish(choice.finish_reason or "stop", bool(events), ctx.refused),
            usage=_usage(chunk.usage, ctx),
        )


def _in_order(name: str, items: list[_Embedding]) -> list[_Embedding]:
    """An answer's vectors in input order: by their `index`, which must be 0 to n-1 each
    once, or be absent from all (then in the order given). Else a vector could be stored
    against another input's text, or one input get none: not retried (asked again, the
    upstream answers alike)."""
    indexes = [item.index for item in items]
    if all(i is None for i in indexes):
        return items
    if sorted(i if i is not None else -1 for i in indexes) == list(range(len(items))):
        return sorted(items, key=lambda item: item.index or 0)
    err = UpstreamError(f"{name}: embeddings answer whose indexes are not 0 to {len(items) - 1}")
    err.retryable = False
    raise err


def _floats(name: str, embedding: list[float] | str) -> list[float]:
    """A vector as floats: OpenAI's base64 form is its float32s, little-endian."""
    if not isinstance(embedding, str):
        return embedding
    try:
        packed = array("f", base64.b64decode(embedding, validate=True))
    except ValueError:  # not base64, or not a whole number of float32s
        raise UpstreamError(f"{name}: malformed embedding in the answer") from None
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def _reasoning(d: _Delta) -> str:
    """A delta's or a message's reasoning text, under either name servers give it ("" when
    none, or in another shape than a string)."""
    r = d.reasoning_content or d.reasoning
    return r if type(r) is str else ""


def _delta(texts: list[str], thoughts: list[str] | None) -> Delta:
    """One read's text and reasoning as one Delta (the reasoning came first)."""
    if thoughts is None:
        return Delta(text="".join(texts))
    return Delta(text="".join(texts), reasoning="".join(thoughts))


async def _after(head: bytes, reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The reads of a body whose first one was taken already (`head`)."""
    yield head
    async for raw in reads:
        yield raw


def _gather(name: str, data: bytes, lines: Iterator[bytes]) -> tuple[bytes, bool]:
    """An event's data, `data` and the `data:` lines that follow it in `lines`, joined with
    newlines as SSE joins them, up to the blank line that ends the event; and whether it
    ended there (else `lines` ran out first)."""
    parts = [data]
    size = len(data)
    for line in lines:
        if line == b"" or line == b"\r":
            return b"\n".join(parts), True
        if line.startswith(b"data:"):  # other fields (comments, event names) are no data
            piece = line[5:].strip()
            parts.append(piece)
            size += len(piece) + 1
            if size > MAX_LINE:
                raise UpstreamError(f"{name}: a stream line over {MAX_LINE} bytes")
    return b"\n".join(parts), False


def _error_field(raw: bytes) -> Any:
    """The value of an SSE `error:` field: its JSON, or its text."""
    try:
        return msgspec.json.decode(raw)
    except BAD_JSON:
        return raw.decode(errors="replace")


def _failure(name: str, error: Any, where: str = "upstream error in stream") -> StellaError:
    """The error an upstream's error object (in a stream, or as its whole answer) means: a
    prompt over the context is stella's 400 `context_length_exceeded`, a 4xx `code` the
    upstream's refusal (not retried but where its status would be), anything else an
    upstream failure."""
    message = _message(error)
    text = f"{name}: {where}: {message}"
    code = kind = None
    if isinstance(error, dict):
        code, kind = error.get("code"), error.get("type")
    status = code if type(code) is int and 400 <= code < 500 else None
    # A server error's words are not a verdict on the prompt (as an HTTP 5xx's are not).
    failed = type(code) is int and code >= 500
    if not failed and context_overflow(code, kind, message):
        return UpstreamContextTooLong(text, upstream_status=status or 400)
    if status is not None:
        return UpstreamStatus(text, upstream_status=status)
    return UpstreamError(text)


class _Calls:
    """Tool calls assembled from streamed fragments: [id, name, arguments] per call.

    Servers differ: some send no index (each call whole, with or without an id), some
    reuse an index for the next call (a new id), some repeat the whole name (with or
    without the id) in every fragment, some send the name in pieces, some send the
    arguments as an object.
    """

    __slots__ = ("names", "slots", "where")

    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        self.names = names  # the tools the request declared
        self.slots: dict[int, list[Any]] = {}  # in order of arrival
        self.where: dict[int, int] = {}  # the upstream's index -> its current call

    def add(self, deltas: list[_ToolDelta]) -> None:
        """Take one chunk's fragments."""
        slots = self.slots
        for t in deltas:
            index = -1 if t.index is None else t.index
            key = self.where.get(index)
            slot = slots.get(key) if key is not None else None
            fn = t.function
            if (
                slot is None
                or (t.id and slot[0] and t.id != slot[0])
                # No index, and no ids to tell: the name says whether a call begins.
                or (
                    t.index is None
                    and not (t.id and slot[0])
                    and fn is not None
                    and fn.name
                    and self._begins(slot, fn.name)
                )
            ):
                key = len(slots)  # a call of its own (a new id under a reused index)
                slot = slots[key] = ["", "", ""]
                self.where[index] = key
            if fn is not None:
                # The whole name again (MiniMax through NIM and some proxies repeat it
                # in every fragment, the id only in the first) is a repeat, not more
                # name; pieces that happen to be equal are joined only when that makes
                # a declared tool's name.
                if fn.name and (fn.name != slot[1] or slot[1] + fn.name in self.names):
                    slot[1] += fn.name
                if isinstance(fn.arguments, dict):
                    slot[2] = _json.encode(fn.arguments).decode()
                elif fn.arguments:
                    slot[2] += fn.arguments
            if t.id:
                slot[0] = t.id

    def _begins(self, slot: list[Any], name: str) -> bool:
        """Whether a fragment naming `name`, with neither index nor id, begins a call after
        the one in `slot` (servers that send each call whole say so in no other way)."""
        have = slot[1]
        if not have:
            return False  # the call's first name
        names = self.names
        if name != have and have in names and have + name not in names:
            return True  # a declared tool's whole name, then not a piece of a longer one
        if not slot[2]:
            return False
        try:  # arguments that are whole JSON already: more name is another call's
            msgspec.json.decode(slot[2])
        except BAD_JSON:
            return False
        return True

    def put(self, call: _ToolDelta) -> None:
        """Take one call of a whole message: a call of its own, whatever its id."""
        # A whole message's calls have no index, and may have no id or share one: each
        # place in the list is a call, as each index is in the stream.
        fn = call.function or _Fn()
        args = fn.arguments
        raw = _json.encode(args).decode() if isinstance(args, dict) else args or ""
        self.slots[len(self.slots)] = [call.id or "", fn.name or "", raw]

    def events(self) -> list[ToolCall]:
        """One ToolCall per call, arguments decoded (kept raw when not JSON)."""
        out = []
        seen: set[str] = set()
        for index, (call_id, name, raw) in self.slots.items():
            args, kept = arguments_of(raw)
            call_id = call_id or new_call_id()  # unique across turns, not call_<index>
            if call_id in seen:
                # An upstream that gave two calls one id: their results could not be told
                # apart (and Anthropic's API refuses a history with a tool_use id twice).
                call_id = f"{call_id}_{index}"
            seen.add(call_id)
            out.append(
                ToolCall(
                    index=index,
                    id=call_id,
                    name=name,
                    arguments=args,
                    raw_arguments=kept,
                )
            )
        return out


def _finish(reason: str, called: bool, refused: bool = False) -> FinishReason:
    """The finish reason of an answer, `tool_calls` when it called a tool and ended,
    `content_filter` when the model refused (whatever reason the upstream gave)."""
    if refused:
        # OpenAI ends a refusal with "stop": read so, a client would take it for an
        # answer (a parse of the text as the schema asked fails, or passes empty).
        return "content_filter"
    return ended(FINISH.get(reason, "stop"), called)


def _usage(usage: _Usage | None, ctx: CallContext) -> Usage:
    if usage is None:
        # No count from the upstream: the completion is the pieces stella counted, the
        # prompt the core's estimate; the log says so even when both come to 0.
        ctx.usage_estimated = True
        pieces = ctx.tokens_seen
        return Usage(0, pieces, pieces)
    details = usage.prompt_tokens_details
    if details is not None and detail(details.cached_tokens) is not None:
        ctx.cached_tokens = details.cached_tokens  # the log's and the answer's usage
    done = usage.completion_tokens_details
    if done is not None and detail(done.reasoning_tokens) is not None:
        ctx.reasoning_tokens = done.reasoning_tokens  # as cached_tokens
    fair = all(token_count(n) for n in (usage.prompt_tokens, usage.completion_tokens))
    prompt = counted(usage.prompt_tokens, ctx)
    completion = counted(usage.completion_tokens, ctx)
    total = usage.total_tokens
    if not (fair and total and token_count(total)):
        total = prompt + completion  # a count not taken is not in the total either
    return Usage(prompt, completion, total)


def _message(error: Any) -> str:
    """An error chunk's message, as a client may get it (one short line, masked)."""
    if isinstance(error, dict):
        return upstream_text(str(error.get("message") or error))
    return upstream_text(str(error))
