"""The Anthropic dialect: POST /v1/messages (SSE event sequence or a Message object),
and POST /v1/messages/count_tokens (the prompt's tokens, as the route's backend counts).

Claude-style clients (the `anthropic` SDK) can use any backend: system prompts,
stop sequences, tool_use / tool_result blocks, cache_control breakpoints and usage map
onto the one internal request; errors come back as {"type": "error", "error": {...}}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api import shapes
from stella.api.http import (
    Dialect,
    JSONResponse,
    Reply,
    decode,
    endpoint,
    read_body,
    run_to_end,
    services,
    stream_response,
)
from stella.api.ollama_request import Images, check_images
from stella.api.openapi import Operation, document
from stella.core import Call, Inference, orphan_result
from stella.errors import DEFAULT_RETRY_AFTER_S, InvalidRequest, StellaError
from stella.images import (
    Counter,
    check_data,
    check_kind,
    check_media_type,
    check_url,
    shown,
    tool_image,
)
from stella.protocol import (
    MAX_USER_ID,
    MIN_THINKING_BUDGET,
    CacheTtl,
    ChatRequest,
    Delta,
    Done,
    Error,
    FunctionCall,
    FunctionSpec,
    Image,
    Message,
    NamedFunction,
    NamedToolChoice,
    Options,
    RedactedThinking,
    SignedThinking,
    Start,
    Thinking,
    ThinkingBlock,
    Tool,
    ToolCall,
    ToolCallRef,
    ToolChoice,
    ToolName,
    Usage,
    options_from,
)
from stella.streaming import Codec, json_text, one_line


class CacheControl(msgspec.Struct):
    """A prompt-cache breakpoint, {"type": "ephemeral", "ttl": "5m" | "1h"} (other keys the
    API may add are ignored)."""

    type: Literal["ephemeral"]
    ttl: CacheTtl | None = None  # the API's default: 5m


def _ttl(*marks: CacheControl | None) -> CacheTtl | None:
    """The one breakpoint that `marks` (of blocks that became one native message) make:
    the longest lifetime among them, so each prefix the client marked stays cached at
    least as long as it asked (None: none is marked)."""
    return _longest(c.ttl or "5m" for c in marks if c is not None)


def _longest(ttls: Iterable[CacheTtl | None]) -> CacheTtl | None:
    """The longest of `ttls` (None: none given)."""
    given = [t for t in ttls if t is not None]
    return ("1h" if "1h" in given else "5m") if given else None


class Source(msgspec.Struct):
    """An image block's source: {"type": "base64", "media_type", "data"} or {"type":
    "url", "url"} (a document's sources and a file's id, never taken, are other keys)."""

    type: str
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class Block(msgspec.Struct):
    """A content block (text, tool_use, tool_result, a tool_result's tool_reference, a
    user message's image; an assistant's thinking, kept when signed; others are refused)."""

    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    input: dict[str, Any] = {}
    tool_use_id: str = ""
    content: str | list[Block] | None = None
    is_error: bool = False  # a tool_result's: the tool failed
    tool_name: str = ""  # a tool_reference's: the deferred tool it loads
    source: Source | str | None = None  # an image's (a search_result's is a string)
    cache_control: CacheControl | None = None
    # A thinking block's text and signature; a redacted_thinking block's opaque data.
    thinking: str = ""
    signature: str = ""
    data: str = ""


class AMessage(msgspec.Struct):
    """One message of the conversation."""

    # "system": an instruction at its place in the conversation, as the API takes with the
    # mid-conversation system beta (Claude Code sends one after the first user turn).
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]
    # Ollama's shape of images, which some clients send here too: refused, as an image
    # block is, not ignored.
    images: Images | None = None


class ATool(msgspec.Struct):
    """A client tool definition (the API's server tools, e.g. web_search, are refused)."""

    name: ToolName
    # "custom" or none; a server tool's type (web_search_20250305, bash_20250124, ...) is
    # a 400 naming it (see _check_tools): stella runs none, and taken as a client tool the
    # model would call it and wait for a result no one sends.
    type: str | None = None
    description: str = ""
    input_schema: dict[str, Any] = {}
    # Strict tool use: the call's input held to input_schema (the native FunctionSpec's).
    strict: bool | None = None
    cache_control: CacheControl | None = None  # a breakpoint after this definition
    # Tool search (the advanced-tool-use beta): offered to the model only once a
    # tool_reference in the conversation loads it, as the API does (see _offered).
    defer_loading: bool | None = None


class AToolChoice(msgspec.Struct):
    """{"type": "auto" | "any" | "tool" | "none", "name": ...}."""

    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None

    def internal(self, tools: list[ATool] | None) -> ToolChoice:
        """The same choice in stella's (OpenAI's) terms, checked against `tools` here: the
        pipeline's own check would name OpenAI's fields ('required', function.name)."""
        if self.type == "any":
            if not tools:
                raise InvalidRequest("$.tool_choice: 'any' without tools", param="tool_choice")
            return "required"
        if self.type == "tool":
            name = self.name
            if not name:
                raise InvalidRequest(
                    "$.tool_choice.name: required when type is tool", param="tool_choice.name"
                )
            if not tools:
                raise InvalidRequest(
                    f"$.tool_choice: tool {name!r} without tools", param="tool_choice"
                )
            if all(t.name != name for t in tools):
                raise InvalidRequest(
                    f"$.tool_choice.name: no tool named {name!r}", param="tool_choice.name"
                )
            return NamedToolChoice(function=NamedFunction(name=name))
        return self.type


class AOutputFormat(msgspec.Struct):
    """output_config.format: {"type": "json_schema", "schema": {...}} (the API's only
    type; any other is refused by its path)."""

    type: str
    schema: dict[str, Any] | None = None


class AOutputConfig(msgspec.Struct):
    """output_config: the answer's format and effort; other keys are taken and not applied."""

    format: AOutputFormat | None = None
    # How hard the model should work (Opus 4.5 on): the native `effort`, sent as it is to
    # an Anthropic upstream, a reasoning effort to others. Any string: the API adds levels.
    effort: Annotated[str, Meta(min_length=1, max_length=32)] | None = None


class AThinking(msgspec.Struct):
    """thinking: whether and how much the model thinks, and whether the answer shows it.
    The native `thinking`: sent as it is to an Anthropic upstream; to others an enabled
    one's budget is a reasoning effort (see effort_for). What the model thinks comes back
    as thinking blocks when `type` is not "disabled" (their text when `display` is not
    "omitted")."""

    # Taken as any string ("enabled", "adaptive", "between_tools", ...): the API adds kinds.
    type: Annotated[str, Meta(min_length=1, max_length=32)]
    budget_tokens: int | None = None
    # "summarized" or "omitted" today; any string, as `type`: the upstream judges it.
    display: Annotated[str, Meta(min_length=1, max_length=32)] | None = None


def _thinks(thinking: AThinking | None) -> bool:
    """Whether the request turned thinking on (signed thinking blocks come back)."""
    return thinking is not None and thinking.type != "disabled"


def _shows_thinking(thinking: AThinking | None) -> bool:
    """Whether the request asked to see the model's thinking."""
    return _thinks(thinking) and thinking is not None and thinking.display != "omitted"


def _thinking(thinking: AThinking | None) -> Thinking | None:
    """The request's thinking as the native one; a budget the API refuses is a 400."""
    if thinking is None:
        return None
    budget = thinking.budget_tokens
    if budget is not None and budget < MIN_THINKING_BUDGET:
        raise InvalidRequest(
            f"$.thinking.budget_tokens: must be at least {MIN_THINKING_BUDGET}, got {budget}",
            param="thinking.budget_tokens",
        )
    if budget is not None and budget > 2**31 - 1:
        raise InvalidRequest("$.thinking.budget_tokens: too large", param="thinking.budget_tokens")
    return Thinking(type=thinking.type, budget_tokens=budget, display=thinking.display)


class Prompt(msgspec.Struct, kw_only=True):
    """What a Messages API request gives the model to read: the fields /v1/messages and
    /v1/messages/count_tokens share (others taken and not applied)."""

    model: str
    messages: Annotated[list[AMessage], Meta(min_length=1)]  # the API wants one turn at least
    system: str | list[Block] | None = None
    tools: list[ATool] | None = None
    tool_choice: AToolChoice | None = None
    # The MCP connector's servers are called by the API, as its server tools are: a 400
    # naming the field when any is given (stella calls none; ignored, the model would
    # answer without the tools the client counts on).
    mcp_servers: list[dict[str, Any]] | None = None
    # Structured outputs, the backend's response_format (ignored, the client would get
    # prose where it asked for its schema). `output_format`: the beta's top-level form.
    output_config: AOutputConfig | None = None
    output_format: AOutputFormat | None = None
    # Automatic caching: a breakpoint at the last block, wherever the conversation ends.
    cache_control: CacheControl | None = None
    # Whether and how much the model thinks, and whether thinking blocks come back.
    thinking: AThinking | None = None


class MessagesRequest(Prompt, kw_only=True):
    """POST /v1/messages."""

    max_tokens: int
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None  # Anthropic's range
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(Prompt, kw_only=True):
    """POST /v1/messages/count_tokens: a message's prompt, without max_tokens (the beta's
    context_management is taken and not applied, as on /v1/messages)."""


_req = msgspec.json.Decoder(MessagesRequest)
_count_req = msgspec.json.Decoder(CountTokensRequest)
_enc = msgspec.json.Encoder()

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",  # a method the path does not take: the caller's fault
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",  # the API's own (its SDK's GatewayTimeoutErrorObject)
    529: "overloaded_error",
}
# An error's type in an `error` event after the stream began, by stella's code: as
# before the stream for an overload and a timeout, api_error for the rest.
_INBAND = {
    "overloaded": "overloaded_error",
    "shutting_down": "overloaded_error",
    "upstream_timeout": "timeout_error",
}
STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish_reason: str, inference: Inference) -> tuple[str, str | None]:
    """The Messages API's stop_reason and stop_sequence for a finished call."""
    ctx = inference.ctx
    if finish_reason == "stop" and ctx is not None and ctx.stop_sequence:
        return "stop_sequence", ctx.stop_sequence
    return STOP.get(finish_reason, "end_turn"), None


def usage_of(
    prompt: int, completion: int, cached: int | None, written: int | None = None
) -> dict[str, int]:
    """The API's usage for stella's counts: the prompt's tokens the backend read from its
    cache are `cache_read_input_tokens`, those it wrote to it `cache_creation_input_tokens`,
    and the API's `input_tokens` leave both out (each only when the backend gave it)."""
    usage = {"input_tokens": max(prompt - (cached or 0) - (written or 0), 0)}
    if written is not None:
        usage["cache_creation_input_tokens"] = written
    if cached is not None:
        usage["cache_read_input_tokens"] = cached
    usage["output_tokens"] = completion
    return usage


def _final_usage(usage: Usage, inference: Inference) -> dict[str, Any]:
    details = usage.prompt_tokens_details
    cached = None if details is msgspec.UNSET else details.cached_tokens
    ctx = inference.ctx  # the attempt that answered
    written = ctx.cache_write_tokens if ctx is not None else None
    out: dict[str, Any] = usage_of(usage.prompt_tokens, usage.completion_tokens, cached, written)
    thought = usage.completion_tokens_details
    if thought is not msgspec.UNSET:
        # The backend's count of the thinking's tokens, as the API breaks its usage down.
        out["output_tokens_details"] = {"thinking_tokens": thought.reasoning_tokens}
    return out


class AnthropicDialect(Dialect):
    """Errors as Anthropic's {"type": "error", "error": {"type", "message"}, "request_id"}."""

    name = "anthropic"
    # Every answer of the API carries it; its SDKs read it (message._request_id,
    # APIStatusError.request_id).
    id_header = b"request-id"

    def error_body(self, exc: StellaError, request_id: str) -> Any:
        """Anthropic's error object."""
        # By the status the client gets: an `overloaded` that every fallback gave too is a
        # 502 of stella's, a 529 here, and its type must say so as the status does.
        kind = _ERROR_TYPES.get(self.status(exc), "api_error")
        return {
            "type": "error",
            "error": {"type": kind, "message": own_names(exc.message)},
            "request_id": request_id,
        }

    def status(self, exc: StellaError) -> int:
        """The API's own status for an overload is 529 (its clients' OverloadedError):
        a full queue's, and an upstream's that said it is overloaded."""
        return 529 if exc.code == "overloaded" or exc.upstream_overloaded else exc.status

    def error_response(self, exc: StellaError, request_id: str) -> Response:
        """The error response; a 529 always says when to come back, as a 503 does (an
        upstream's overload may have given no Retry-After)."""
        response = super().error_response(exc, request_id)
        if response.status_code == 529 and "retry-after" not in response.headers:
            response.headers["Retry-After"] = str(round(DEFAULT_RETRY_AFTER_S))
        return response


ANTHROPIC = AnthropicDialect()
# Paths whose errors (404, 405, draining) take this shape; the longest prefix wins.
ERROR_PREFIXES = {"/v1/messages": ANTHROPIC}


# A route has no release date: the API's own value for an unknown one is the epoch.
_UNKNOWN_DATE = "1970-01-01T00:00:00Z"


def model_info(name: str) -> dict[str, Any]:
    """A route as the API's ModelInfo (GET /v1/models/{id})."""
    # lifecycle: a route answers while it is configured (the SDK requires the field).
    return {
        "type": "model",
        "id": name,
        "display_name": name,
        "created_at": _UNKNOWN_DATE,
        "lifecycle": "active",
    }


# The API's page size when a request names none, and the most it allows.
PAGE_LIMIT, MAX_PAGE_LIMIT = 20, 1000


def model_page(names: list[str], query: Mapping[str, str]) -> dict[str, Any]:
    """Routes as the API's model list: the page that `limit` and the cursor `after_id` or
    `before_id` in `query` ask for, in the order of `names`."""
    limit = _page_limit(query.get("limit"))
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise InvalidRequest("after_id, before_id: give one cursor, not both", param="before_id")
    if before is not None:
        end = _cursor(names, before, "before_id")
        start = max(0, end - limit)
        # has_more looks the way the client pages: here, towards the start.
        more = start > 0
    else:
        start = _cursor(names, after, "after_id") + 1 if after is not None else 0
        end = start + limit
        more = end < len(names)
    data = names[start:end]
    return {
        "data": [model_info(n) for n in data],
        "has_more": more,
        "first_id": data[0] if data else None,
        "last_id": data[-1] if data else None,
    }


def _page_limit(value: str | None) -> int:
    """`limit` as a number from 1 to MAX_PAGE_LIMIT (PAGE_LIMIT when absent)."""
    if value is None:
        return PAGE_LIMIT
    # isdigit() alone takes other scripts' digits, and int() takes "+5", " 5" and "1_0".
    n = int(value) if value.isascii() and value.isdigit() else 0
    if not 1 <= n <= MAX_PAGE_LIMIT:
        raise InvalidRequest(
            f"limit: expected an integer from 1 to {MAX_PAGE_LIMIT}, got {value!r}",
            param="limit",
        )
    return n


def _cursor(names: list[str], value: str, param: str) -> int:
    """The position of the model a cursor names; one not on the list (gone since the last
    page, or never there) is a 400: an empty page would read as the list's end."""
    try:
        return names.index(value)
    except ValueError:
        raise InvalidRequest(f"{param}: no model {value!r} in this list", param=param) from None


def _text(content: str | list[Block] | None, path: str) -> str:
    """The text of `content` (a message's, the system's); a block that is not text (an
    image, a document) is refused by its path: dropped, the model would answer as if it
    had seen it (a tool_result's: see _tool_result)."""
    if content is None or isinstance(content, str):
        return content or ""
    # Blocks are separate pieces of text: run together, their words would merge.
    return "\n".join(_block_text(b, f"{path}[{k}]") for k, b in enumerate(content))


def _block_text(b: Block, path: str) -> str:
    """A text block's text; another block is refused by its path."""
    if b.type != "text":
        raise InvalidRequest(
            f"$.{path}.type: {shown(b.type)} is not supported", param=f"{path}.type"
        )
    return b.text


def _image(b: Block, path: str) -> Image:
    """A user message's image block as the native image; a 400 naming its path for a
    source stella cannot send (a file's id: nothing is stored here)."""
    src = b.source
    if not isinstance(src, Source):
        raise InvalidRequest(f"$.{path}.source: must be an object", param=f"{path}.source")
    if src.type == "base64":
        kind = check_media_type(src.media_type or "", f"{path}.source.media_type")
        check_data(src.data or "", f"{path}.source.data")
        check_kind(src.data or "", kind, f"{path}.source.media_type")
        return Image(data=src.data, media_type=kind)
    if src.type == "url":
        check_url(src.url or "", f"{path}.source.url")
        return Image(url=src.url)
    raise InvalidRequest(
        f"$.{path}.source.type: {shown(src.type)} is not supported: base64 or url "
        "(stella stores no files)",
        param=f"{path}.source.type",
    )


# What the model reads for a document a tool gave (Claude Code's Read of a PDF): the same
# words as the other dialects' tool outputs.
_OMITTED = "[{} omitted: this model reads text only]"


def _result_image(b: Block, counter: Counter) -> Image | str:
    """A tool_result's image block as the tool message's image, or the note the model
    reads for one stella cannot send (a bad source, past the request's cap): refused, it
    would stay in the history and fail every later turn of the session."""
    src = b.source if isinstance(b.source, Source) else Source(type="")
    return tool_image(  # its type told by its bytes
        counter,
        data=src.data if src.type == "base64" else None,
        url=src.url if src.type == "url" else None,
    )


def _tool_result(b: Block, path: str, loaded: dict[str, str], counter: Counter) -> Message:
    """A tool_result block as a tool message, its is_error kept (see backends' content_of),
    and its breakpoint, or that of a block inside it. A tool_reference (a tool search's
    answer, as Claude Code's ToolSearch gives) says the tool it loads, which goes into
    `loaded` (by name, with the path of its first reference); an image is one of the
    message's images (Claude Code's Read of a PNG, a screenshot), which the core turns
    into a note for a backend that reads text only; a document is a note saying it was
    left out; another block but text is refused."""
    content = b.content
    inner = content if isinstance(content, list) else ()
    texts: list[str] = []
    images: list[Image] = []
    if not isinstance(content, list):
        texts.append(_text(content, path))
    for k, c in enumerate(inner):
        if c.type == "tool_reference":
            # The API expands it into the tool's definition; here the tool joins the ones
            # offered (see _offered) and the model reads that it may call it now.
            loaded.setdefault(c.tool_name, f"{path}[{k}].tool_name")
            texts.append(f"Tool loaded: {c.tool_name}")
        elif c.type == "image":
            image = _result_image(c, counter)
            if isinstance(image, str):
                texts.append(image)
            else:
                images.append(image)
        elif c.type == "document":
            # Refused, it would stay in the history and fail every later turn; the note
            # tells the model it did not see it (in a message it stays a 400).
            texts.append(_OMITTED.format(c.type))
        else:
            texts.append(_block_text(c, f"{path}[{k}]"))
    return Message(
        role="tool",
        content="\n".join(texts),
        tool_call_id=b.tool_use_id,
        is_error=b.is_error,
        cache=_ttl(b.cache_control, *(c.cache_control for c in inner)),
        images=images or None,
    )


# The API's own limit and words for more cache breakpoints than it takes.
MAX_BREAKPOINTS = 4


def _check_breakpoints(req: Prompt) -> None:
    """A 400 for a cache_control the API refuses: a type or ttl it does not know is one
    at decoding (by its path); more than MAX_BREAKPOINTS here, in the API's words, before
    any backend is asked (an Anthropic upstream would refuse it after a round trip)."""
    n = 0
    for content in (req.system, *(m.content for m in req.messages)):
        if isinstance(content, list):
            for b in content:
                n += b.cache_control is not None
                if isinstance(b.content, list):  # a tool_result's blocks
                    n += sum(c.cache_control is not None for c in b.content)
    n += sum(1 for t in req.tools or () if t.cache_control is not None)
    n += req.cache_control is not None
    if n > MAX_BREAKPOINTS:
        raise InvalidRequest(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {n}.",
            param="messages",
        )


def _ends_in_space(content: str | list[Block]) -> bool:
    """Whether a prefill's text ends in whitespace: its last block's, when that is text
    (a turn ending in tool_use blocks continues no text)."""
    if isinstance(content, str):
        return content[-1:].isspace()
    return bool(content) and content[-1].type == "text" and content[-1].text[-1:].isspace()


# An assistant turn's blocks of extended thinking: kept when signed, else dropped.
_THOUGHTS = frozenset({"thinking", "redacted_thinking"})


def _signed(b: Block) -> SignedThinking | None:
    """A thinking block as the native one when an upstream signed it (None: unsigned,
    as stella signs another upstream's reasoning, which no upstream would take back)."""
    if b.type == "thinking":
        return ThinkingBlock(thinking=b.thinking, signature=b.signature) if b.signature else None
    return RedactedThinking(data=b.data) if b.data else None


def _check_tools(tools: list[ATool] | None) -> None:
    """A 400 naming the first server tool among `tools` (a type other than "custom")."""
    for k, t in enumerate(tools or ()):
        if t.type not in (None, "custom"):
            raise InvalidRequest(
                f"$.tools[{k}].type: server tool {t.type!r} is not supported: stella runs no "
                'server tools; only client tools (type "custom" or none)',
                param=f"tools[{k}].type",
            )


def to_chat(req: Prompt) -> ChatRequest:
    """The internal request for a Messages API call (a count's: no sampling, no stream)."""
    if req.mcp_servers:
        raise InvalidRequest(
            "$.mcp_servers: MCP servers are not supported (stella runs no server tools)",
            param="mcp_servers",
        )
    _check_tools(req.tools)
    _check_breakpoints(req)
    messages: list[Message] = []
    if req.system:
        system = _text(req.system, "system")
        cache = (
            None if isinstance(req.system, str) else _ttl(*(b.cache_control for b in req.system))
        )
        messages.append(Message(role="system", content=system, cache=cache))
    # Where each tool_result came from, by its place among `messages`: the pipeline's own
    # check would name a message of the internal request, not the client's block.
    results: dict[int, str] = {}
    # The deferred tools the conversation's tool_reference blocks load, by name.
    loaded: dict[str, str] = {}
    counter = Counter()
    for i, m in enumerate(req.messages):
        check_images(m.images, f"messages[{i}].images")
        empty = not m.content or (
            not isinstance(m.content, str)
            and all(b.type == "text" and not b.text for b in m.content)
        )
        if empty and not (m.role == "assistant" and i == len(req.messages) - 1):
            # As the API: only a last assistant turn (a prefill to continue) may be empty.
            # Blocks with no text are named by the first one's text, where the fault is.
            path = f"messages[{i}].content" + ("[0].text" if m.content else "")
            raise InvalidRequest(f"$.{path}: must not be empty", param=path)
        if m.role != "assistant" and (
            not m.content.strip()
            if isinstance(m.content, str)
            else all(b.type == "text" and not b.text.strip() for b in m.content)
        ):
            # As the API: text of only whitespace is no text (its backend refuses it too).
            path = f"messages[{i}].content" + ("" if isinstance(m.content, str) else "[0].text")
            raise InvalidRequest(f"$.{path}: must not be only whitespace", param=path)
        if m.role == "system":
            # Text only, as the top-level system prompt: a tool_use, tool_result or image
            # here is refused by its path (each backend puts the text where its API takes
            # a system message: the Anthropic backend into its top-level system).
            text = _text(m.content, f"messages[{i}].content")
            cache = (
                None if isinstance(m.content, str) else _ttl(*(b.cache_control for b in m.content))
            )
            messages.append(Message(role="system", content=text, cache=cache))
            continue
        if isinstance(m.content, str):
            messages.append(Message(role=m.role, content=m.content))
            continue
        texts: list[str] = []
        calls: list[ToolCallRef] = []
        images: list[Image] = []
        thoughts: list[SignedThinking] = []
        # The breakpoints of the blocks that make the message after the turn's results.
        marks: list[CacheControl | None] = []
        for j, b in enumerate(m.content):
            if b.type in ("text", "tool_use") or (b.type == "image" and m.role == "user"):
                marks.append(b.cache_control)
            if b.type == "text":
                texts.append(b.text)
            elif b.type == "image" and m.role == "user":
                # Read before the message's text, wherever it stood among its blocks.
                counter.add(f"messages[{i}].content[{j}]")
                images.append(_image(b, f"messages[{i}].content[{j}]"))
            elif b.type == "tool_use":
                if any(c.id == b.id for c in calls):
                    # As the API refuses it: the turn's results could not tell them apart.
                    path = f"messages[{i}].content[{j}].id"
                    raise InvalidRequest(
                        f"$.{path}: tool_use id {b.id!r} is used twice in this message",
                        param=path,
                    )
                calls.append(
                    ToolCallRef(id=b.id, function=FunctionCall(name=b.name, arguments=b.input))
                )
            elif b.type == "tool_result":
                results[len(messages)] = f"messages[{i}].content[{j}]"
                messages.append(
                    _tool_result(b, f"messages[{i}].content[{j}].content", loaded, counter)
                )
            elif b.type in _THOUGHTS and m.role == "assistant":
                # An earlier answer's thinking, sent back as the API's clients do: a signed
                # block goes back to an Anthropic upstream as it came (its tool loop needs
                # the last turn's); other backends' models cannot read it.
                if (thought := _signed(b)) is not None:
                    thoughts.append(thought)
            else:
                raise InvalidRequest(
                    f"$.messages[{i}].content[{j}].type: {shown(b.type)} is not supported",
                    param=f"messages[{i}].content[{j}].type",
                )
        if texts or calls or images:
            messages.append(
                Message(
                    role=m.role,
                    content="\n".join(texts),
                    tool_calls=calls or None,
                    cache=_ttl(*marks),
                    images=images or None,
                    thinking_blocks=thoughts or None,
                )
            )
    if (orphan := orphan_result(messages)) is not None:
        # As the API refuses it (a 502 with an upstream's words for it, else).
        k, stray = orphan
        path = results[k] + ".tool_use_id"
        why = (
            "is no tool_use of the assistant turn before it"
            if stray is not None
            else "answers no tool_use: a tool_result must be in the message right after "
            "an assistant message with tool_use blocks"
        )
        raise InvalidRequest(f"$.{path}: {messages[k].tool_call_id!r} {why}", param=path)
    final = req.messages[-1] if req.messages else None
    if final is not None and final.role == "assistant" and _ends_in_space(final.content):
        # The API's own rule for a prefill: the answer would go on after the space, and a
        # tokenizer reads a lone trailing space as an odd token (the output goes astray).
        raise InvalidRequest(
            "messages: final assistant content cannot end with trailing whitespace",
            param="messages",
        )
    if req.cache_control is not None and messages:
        # Automatic caching: the breakpoint at the end, on the message that ends it.
        last = messages[-1]
        cache = _longest((last.cache, req.cache_control.ttl or "5m"))
        messages[-1] = msgspec.structs.replace(last, cache=cache)
    options, stream, metadata, user_id = Options(), False, None, None
    if isinstance(req, MessagesRequest):
        stream, metadata = req.stream, req.metadata
        user_id = _user_id(metadata)
        try:
            options = options_from(
                {"stop": "stop_sequences"},
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                max_tokens=req.max_tokens,
                stop=req.stop_sequences,
            )
        except msgspec.ValidationError as exc:
            raise InvalidRequest(str(exc)) from None
    offered = _offered(req, loaded)
    tools = (
        [
            Tool(
                function=FunctionSpec(
                    name=t.name,
                    description=t.description,
                    parameters=t.input_schema,
                    strict=t.strict,
                ),
                cache=cache,
            )
            for t, cache in _tool_marks(req.tools or [], offered)
        ]
        if offered
        else None
    )
    return ChatRequest(
        messages=messages,
        model=req.model,
        stream=stream,
        options=options,
        tools=tools,
        tool_choice=req.tool_choice.internal(offered) if req.tool_choice else None,
        parallel_tool_calls=_parallel(req.tool_choice),
        metadata=metadata,
        response_format=_response_format(req),
        user_id=user_id,
        thinking=_thinking(req.thinking),
        effort=req.output_config.effort if req.output_config is not None else None,
    )


def _user_id(metadata: dict[str, Any] | None) -> str | None:
    """metadata.user_id, which the client meant for Anthropic (its abuse detection), when
    an Anthropic upstream takes it: a string of 1 to MAX_USER_ID characters (another is
    logged, not sent: the upstream would refuse the request for it)."""
    given = (metadata or {}).get("user_id")
    return given if isinstance(given, str) and 0 < len(given) <= MAX_USER_ID else None


def _tool_marks(tools: list[ATool], offered: list[ATool]) -> list[tuple[ATool, CacheTtl | None]]:
    """Each offered tool with its cache breakpoint. A breakpoint on a tool left out (a
    deferred one not loaded) goes to the last offered tool before it: the prefix it ended,
    as the API caches it (deferred tools are no part of the prefix; Anthropic's docs put
    the breakpoint on the last tool, which in tool search is often a deferred one)."""
    shown = {id(t) for t in offered}
    out: list[tuple[ATool, CacheTtl | None]] = []
    for t in tools:
        if id(t) in shown:
            out.append((t, _ttl(t.cache_control)))
        elif t.cache_control is not None and out:
            last, cache = out[-1]
            out[-1] = (last, _longest((cache, t.cache_control.ttl or "5m")))
    return out


def _offered(req: Prompt, loaded: dict[str, str]) -> list[ATool] | None:
    """The tools the model is offered, as the API's tool search has it: every tool but a
    deferred one (defer_loading) that no tool_reference has `loaded` and no tool_choice
    names (the model must then call it, and reads its definition). A reference to no tool
    given, and tools all deferred, are the API's 400s."""
    names = {t.name for t in req.tools or ()}
    for name, path in loaded.items():
        if name not in names:
            raise InvalidRequest(
                f"$.{path}: Tool reference {name!r} has no corresponding tool definition",
                param=path,
            )
    if not req.tools:
        return None
    if all(t.defer_loading for t in req.tools):
        raise InvalidRequest(
            "$.tools: All tools have defer_loading set. At least one tool must be non-deferred.",
            param="tools",
        )
    choice = req.tool_choice
    named = choice.name if choice is not None and choice.type == "tool" else None
    return [t for t in req.tools if not t.defer_loading or t.name in loaded or t.name == named]


def _response_format(req: Prompt) -> dict[str, Any] | None:
    """output_config.format (or the beta's output_format) as stella's (OpenAI's)
    response_format: a backend that cannot keep to a schema refuses it with a 400."""
    fmt = req.output_config.format if req.output_config is not None else None
    path = "output_config.format"
    if req.output_format is not None:
        if fmt is not None:
            raise InvalidRequest(
                "$.output_format: give output_config.format alone (output_format is its "
                "deprecated form)",
                param="output_format",
            )
        fmt, path = req.output_format, "output_format"
    if fmt is None:
        return None
    if fmt.type != "json_schema":
        raise InvalidRequest(
            f"$.{path}.type: {fmt.type!r} is not supported (json_schema only)",
            param=f"{path}.type",
        )
    if fmt.schema is None:
        raise InvalidRequest(f"$.{path}.schema: required for json_schema", param=f"{path}.schema")
    # The API holds the answer to the schema (constrained decoding): strict, as OpenAI
    # names that. The API's format has no name; OpenAI's requires one.
    spec = {"name": "response", "schema": fmt.schema, "strict": True}
    return {"type": "json_schema", "json_schema": spec}


def own_names(message: str) -> str:
    """An error `message` with the internal request's field named as this API names it
    (`response_format` is output_config.format)."""
    if message.startswith("$.response_format"):
        return "$.output_config.format" + message[len("$.response_format") :]
    return message


def _parallel(choice: AToolChoice | None) -> bool | None:
    """tool_choice.disable_parallel_tool_use as stella's parallel_tool_calls."""
    if choice is None or choice.disable_parallel_tool_use is None:
        return None
    return not choice.disable_parallel_tool_use


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _enc.encode(data) + b"\n\n"


class MessagesCodec(Codec):
    """Events as the Messages API's SSE sequence."""

    media_type = "text/event-stream"

    def __init__(self, inference: Inference, thinking: AThinking | None = None) -> None:
        super().__init__()
        self.inference = inference
        # A reasoning model's thinking goes out as thinking blocks only when the request
        # turned thinking on: a client that did not expects text and tool_use alone. Its
        # text only when the request did not omit it; its signature (an Anthropic
        # upstream's) whenever thinking is on, as the API gives it.
        self.shows_reasoning = _shows_thinking(thinking)
        self.seals = self.shows_signatures = _thinks(thinking)
        self.block = -1  # index of the open content block
        self.open_kind = ""
        self.text_prefix = b""

    def start(self, event: Start) -> bytes:
        """message_start (with the prompt's size when the backend knows it by now), then a
        ping, as the API does."""
        ctx = self.inference.ctx
        usage = (
            usage_of(ctx.prompt_tokens, 0, ctx.cached_tokens, ctx.cache_write_tokens)
            if ctx
            else usage_of(0, 0, None)
        )
        msg: dict[str, Any] = {
            "id": "msg_" + event.id,
            "type": "message",
            "role": "assistant",
            "model": event.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return one_line(
            _event("message_start", {"type": "message_start", "message": msg})
            + _event("ping", {"type": "ping"})
        )

    def _close_block(self) -> bytes:
        if self.block < 0 or not self.open_kind:
            return b""
        out = b""
        if self.open_kind == "thinking":
            # The API signs a thinking block just before its end; stella has no signature
            # to give for another upstream's reasoning (a block sent back signed "" is
            # dropped).
            out = self._delta({"type": "signature_delta", "signature": ""})
        self.open_kind = ""
        return out + _event(
            "content_block_stop", {"type": "content_block_stop", "index": self.block}
        )

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        """Close the open block and start one of `kind`."""
        out = self._close_block()
        self.block += 1
        self.open_kind = kind
        return out + _event(
            "content_block_start",
            {"type": "content_block_start", "index": self.block, "content_block": block},
        )

    def _delta(self, delta: dict[str, Any]) -> bytes:
        """A content_block_delta event of the open block."""
        return _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self.block, "delta": delta},
        )

    def _in_thinking(self, delta: dict[str, Any]) -> bytes:
        """`delta` of the open thinking block, opened first when another block is open."""
        out = b""
        if self.open_kind != "thinking":
            out = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return out + self._delta(delta)

    def _thinking(self, event: Delta) -> bytes:
        """A Delta with reasoning, as a thinking block's delta, then its text's, if any."""
        out = self._in_thinking({"type": "thinking_delta", "thinking": event.reasoning})
        if event.text:
            out += self._encode(Delta(text=event.text))
        return out

    def _seal(self, event: Delta) -> bytes:
        """An Anthropic upstream's signature, ending the open thinking block (or an empty
        one, as the API gives one whose display is omitted), or a redacted_thinking block."""
        if event.redacted_thinking:
            block = {"type": "redacted_thinking", "data": event.redacted_thinking}
            return self._open("redacted_thinking", block) + self._close_block()
        out = self._in_thinking({"type": "signature_delta", "signature": event.signature})
        self.open_kind = "signed"  # ends with no other signature
        return out + self._close_block()

    def encode(self, event: Any) -> bytes:
        """One or more SSE events per pipeline event (each `data:` JSON on one line)."""
        out = self._encode(event)
        # A delta's text is escaped on its own: a stream's many deltas scan only their text.
        return out if type(event) is Delta else one_line(out)

    def _encode(self, event: Any) -> bytes:
        kind = type(event)
        if kind is Delta:
            if event.reasoning and self.shows_reasoning:
                return self._thinking(event)
            if not event.text:
                if self.seals and (event.signature or event.redacted_thinking):
                    return self._seal(event)
                return b""  # reasoning alone, where the request did not turn thinking on
            out = b""
            if self.open_kind != "text":
                out += self._open("text", {"type": "text", "text": ""})
                self.text_prefix = (
                    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                    + str(self.block).encode()
                    + b',"delta":{"type":"text_delta","text":'
                )
            return out + self.text_prefix + json_text(event.text) + b"}}\n\n"
        if kind is ToolCall:
            block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
            out = self._open("tool_use", block)
            partial = _enc.encode(event.arguments).decode()
            out += self._delta({"type": "input_json_delta", "partial_json": partial})
            return out + self._close_block()
        if kind is Done:
            out = self._close_block()
            reason, sequence = stop_reason(event.finish_reason, self.inference)
            out += _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": _final_usage(event.usage, self.inference),
                },
            )
            return out + _event("message_stop", {"type": "message_stop"})
        if kind is Error:
            err = self.inference.error
            # The failure this line reports (the stream layer's own lines, a drain's, have
            # none): an upstream's overload, a 529 before the stream, is one after it too.
            upstream_overloaded = (
                err is not None and err.code == event.code and err.upstream_overloaded
            )
            kind_name = (
                "overloaded_error" if upstream_overloaded else _INBAND.get(event.code, "api_error")
            )
            return _event(
                "error", {"type": "error", "error": {"type": kind_name, "message": event.message}}
            )
        return b""

    def ping(self) -> bytes:
        """The API's own ping event."""
        return _event("ping", {"type": "ping"})


@endpoint(ANTHROPIC, inference=True)
async def messages(request: Request, call: Call) -> Reply:
    """POST /v1/messages."""
    svc = services(request)
    body = await read_body(request, svc.settings.server.max_body_bytes)
    req = decode(body, MessagesRequest, _req)
    chat = to_chat(req)
    inference = await svc.pipeline.prepare(chat, call)
    if chat.stream:
        codec = MessagesCodec(inference, req.thinking)
        return stream_response(request, inference, codec, ANTHROPIC)
    result = await run_to_end(request, inference)
    content: list[dict[str, Any]] = []
    signed = result.message.thinking_blocks
    if signed and _thinks(req.thinking):
        # An Anthropic upstream's blocks, as it gave them (the native ones are its shape).
        content += msgspec.to_builtins(signed)
    elif _shows_thinking(req.thinking) and result.message.reasoning:
        # Signed "": stella has no signature to give (a block sent back is dropped).
        content.append({"type": "thinking", "thinking": result.message.reasoning, "signature": ""})
    if result.response:
        content.append({"type": "text", "text": result.response})
    for c in result.message.tool_calls or []:
        content.append(
            {"type": "tool_use", "id": c.id, "name": c.function.name, "input": c.function.arguments}
        )
    reason, sequence = stop_reason(result.finish_reason, inference)
    return JSONResponse(
        {
            "id": "msg_" + result.id,
            "type": "message",
            "role": "assistant",
            "model": result.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": _final_usage(result.usage, inference),
        },
        headers=inference.permit.headers,
    )


document(
    Operation(
        "post",
        "/v1/messages",
        "Anthropic Messages API (SSE when stream)",
        tag="anthropic",
        request=MessagesRequest,
        response=shapes.ANTHROPIC_MESSAGE,
        stream="text/event-stream",
        stream_item=shapes.ANTHROPIC_EVENT,
        error=shapes.ANTHROPIC_ERROR,
        # The API's own status for an overload (a full queue) is 529.
        errors=(400, 401, 403, 404, 413, 415, 429, 502, 503, 504, 529),
        headers=("request-id",),
    )
)


document(
    Operation(
        "post",
        "/v1/messages/count_tokens",
        "Anthropic token counting: the prompt's tokens as the model reads them, counted by "
        "its route's backend (the embedded engine's tokenizer, an Anthropic upstream's own "
        "count, echo's); a backend with no exact count answers 400 saying so",
        tag="anthropic",
        request=CountTokensRequest,
        response=shapes.ANTHROPIC_TOKEN_COUNT,
        error=shapes.ANTHROPIC_ERROR,
        # Not an inference: no rate limit refuses it (a 429 upstream is a 502 here).
        errors=(400, 401, 403, 404, 413, 415, 502, 503, 504, 529),
        headers=("request-id",),
    )
)


@endpoint(ANTHROPIC)
async def count_tokens(request: Request, call: Call) -> Response:
    """POST /v1/messages/count_tokens: {"input_tokens": N}, the backend's exact count."""
    svc = services(request)
    body = await read_body(request, svc.settings.server.max_body_bytes)
    req = decode(body, CountTokensRequest, _count_req)
    # Claude Code asks this many times as it starts and for its /context view: no
    # inference, so no rate limit, log event or usage; the key's scope holds as for a
    # message, and the same request's faults are the same 400s.
    n = await svc.pipeline.count(to_chat(req), call)
    return JSONResponse({"input_tokens": n})


routes = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
