"""Native wire types: requests, NDJSON stream events, responses and errors.

One module holds every type of stella's own API, so decoding, encoding and
`/openapi.json` all come from the same definitions (protocol.md is the contract).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

Role = Literal["system", "user", "assistant", "tool"]
# Ollama's ThinkValue (api/types.go): a bool, or an effort.
Think = bool | Literal["high", "medium", "low", "max"]
# The longest end user id (ChatRequest.user_id) the Messages API takes in metadata.user_id.
MAX_USER_ID = 256
# OpenAI's reasoning_effort (chat completions; the Responses API's reasoning.effort).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
FinishReason = Literal[
    "stop", "length", "tool_calls", "cancelled", "content_filter", "client_closed", "error"
]


class Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base for request structs: unknown fields are an error, defaults are not re-sent."""


class FunctionCall(Strict):
    """A function call an assistant made (OpenAI style; arguments as an object)."""

    name: str
    arguments: dict[str, Any] = {}
    # The model's own text of the arguments when it was not a JSON object (see ToolCall).
    raw_arguments: str | None = None


class ToolCallRef(Strict):
    """A tool call carried in an assistant message of the history."""

    function: FunctionCall
    id: str = ""
    type: Literal["function"] = "function"


# A prompt-cache breakpoint's lifetime, as Anthropic's cache_control `ttl` (5m its default).
CacheTtl = Literal["5m", "1h"]
Breakpoint = Annotated[
    CacheTtl,
    Meta(
        description="a prompt-cache breakpoint here, kept for this long (Anthropic's "
        "cache_control): an Anthropic backend caches the prompt up to this point; backends "
        "without prompt caching ignore it"
    ),
]


# The image formats every backend that reads images takes (OpenAI's, Anthropic's, Ollama's).
ImageMediaType = Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
ImageDetail = Literal["auto", "low", "high"]


class Image(Strict):
    """An image in a user or tool message: `data` (base64, no `data:` prefix) with its
    `media_type`, or an http(s) `url` the backend fetches (stella never does)."""

    data: (
        Annotated[str, Meta(description="the image's bytes in base64 (no `data:` prefix)")] | None
    ) = None
    media_type: ImageMediaType | None = None
    url: (
        Annotated[
            str,
            Meta(
                description="an http or https URL the backend fetches the image from "
                "(Anthropic backends, and OpenAI-compatible ones set to: `image_urls`; an "
                "Ollama one takes only data)"
            ),
        ]
        | None
    ) = None
    # OpenAI's image_url.detail: how closely the model looks; other backends ignore it.
    detail: ImageDetail | None = None


class ThinkingBlock(Strict, tag="thinking", tag_field="type"):
    """A block of an assistant's thinking as an Anthropic upstream signed it: sent back
    with the message it came with, it reaches an Anthropic upstream as it was given."""

    thinking: str
    signature: Annotated[
        str,
        Meta(
            min_length=1,
            description="the upstream's signature of this block, which it checks when the "
            "block comes back (a tool loop's next turn needs it)",
        ),
    ]


class RedactedThinking(Strict, tag="redacted_thinking", tag_field="type"):
    """A block of an assistant's thinking an Anthropic upstream encrypted (its safety
    systems flagged it): `data` is opaque, sent back as it came."""

    data: Annotated[str, Meta(min_length=1)]


# An answer's signed thinking, in its order: Anthropic's thinking and redacted_thinking.
SignedThinking = ThinkingBlock | RedactedThinking
ThinkingBlocks = Annotated[
    list[SignedThinking],
    Meta(
        description="the answer's thinking as an Anthropic upstream signed it, block by "
        "block (`reasoning` holds its text): sent back in the assistant message of the "
        "next turn, it reaches an Anthropic upstream unchanged (when that request thinks), "
        "as a tool loop's turns must; other backends ignore it"
    ),
]


class Message(Strict):
    """One chat message. A tool message follows an assistant message with `tool_calls`
    (only other tool messages between; consecutive assistant messages with calls are one
    turn) and its `tool_call_id`, when given, names one of them; otherwise the request is
    a 400."""

    role: Role
    content: str = ""
    # An answer's reasoning, sent back with it as the answer's message had it: taken and
    # not sent on (upstreams ignore an earlier turn's reasoning, or refuse it).
    reasoning: str = ""
    # An assistant message's thinking as an Anthropic upstream signed it: sent back to one
    # (its tool loops need the last turn's), dropped by other backends.
    thinking_blocks: ThinkingBlocks | None = None
    name: str | None = None
    tool_calls: list[ToolCallRef] | None = None
    tool_call_id: str | None = None
    # A tool message's: the call failed. The Anthropic backend sends it on as the
    # tool_result's is_error; to others' models only the content can say so.
    is_error: bool = False
    # A breakpoint at the end of this message: the prompt up to here is what a later
    # request with the same start reads from an Anthropic upstream's cache.
    cache: Breakpoint | None = None
    # A user or tool message's images, which the model reads before its text (a backend
    # puts them first): a user message's go only to routes whose backend reads images
    # (Backend.reads_images); a tool result's reach every backend, as a note in its text
    # where they cannot be read (images.readable).
    images: (
        Annotated[
            list[Image],
            Meta(
                description="a user or tool message's images, read before its text (at most "
                "600 in a request, all messages together); a user message's to a route whose "
                "backend reads text only (the embedded engine, echo) answers 400, a tool "
                "message's reach such a backend as a note in its text, `[image omitted: this "
                "model reads text only]`"
            ),
        ]
        | None
    ) = None


# Engines count tokens in 32-bit integers and take 64-bit seeds; bounds keep a
# 400-digit number from reaching either (or the rate limiter's arithmetic).
MaxTokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Temperature = Annotated[float, Meta(ge=0, le=2)]
# OpenAI's ranges. A token id is a JSON object key, so a string of digits; as an int it
# reaches MLX as an index, and an unbounded one could point anywhere.
Penalty = Annotated[float, Meta(ge=-2, le=2)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
LogitBias = Annotated[
    dict[TokenId, Annotated[float, Meta(ge=-100, le=100)]],
    Meta(
        max_length=300,
        description="token id (a string of digits) -> added to its logit, -100..100 "
        "(-100 bans the token, 100 all but forces it); at most 300 tokens",
    ),
]


class Options(Strict):
    """Sampling and length options; a backend ignores what its engine lacks."""

    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=2**31 - 1)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    max_tokens: MaxTokens | None = None
    stop: Annotated[list[str], Meta(max_length=16)] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None  # < 0: unseeded


def options_from(paths: Mapping[str, str] | None = None, **fields: Any) -> Options:
    """Options from a dialect's fields (None: not given), validated; raises msgspec.ValidationError.

    `paths` maps an option to where the client sent it (`max_tokens` ->
    `options.num_predict`), so the error names the client's own field.
    """
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        return Options()  # nothing to validate: most requests set no option
    try:
        # str_keys: logit_bias's token ids come as JSON keys, strings of digits.
        return msgspec.convert(given, Options, str_keys=True)
    except msgspec.ValidationError as exc:
        if not paths:
            raise
        text = _OPTION_PATH.sub(lambda m: "$." + paths.get(m[1], m[1]), str(exc), count=1)
        raise msgspec.ValidationError(text) from None


_OPTION_PATH = re.compile(r"\$\.(\w+)")


ToolName = Annotated[str, Meta(min_length=1, max_length=64)]


class FunctionSpec(Strict):
    """A function a model may call."""

    name: ToolName
    description: str = ""
    parameters: dict[str, Any] = {}
    # The arguments held to `parameters` (OpenAI's strict, Anthropic's strict tool use):
    # passed on to OpenAI-compatible and Anthropic APIs.
    strict: bool | None = None


class Tool(Strict):
    """An OpenAI-style function tool."""

    function: FunctionSpec
    type: Literal["function"] = "function"
    # A breakpoint after this tool's definition (tools come first in Anthropic's prefix).
    cache: Breakpoint | None = None


class LenientFunction(msgspec.Struct):
    """A function as the OpenAI and Ollama dialects send it: keys stella does not know
    are ignored, as those servers do (clients add new ones over time)."""

    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class LenientTool(msgspec.Struct):
    """A function tool of the OpenAI and Ollama dialects (unknown keys ignored)."""

    function: LenientFunction
    type: Literal["function"] = "function"


def tools_from(tools: list[LenientTool] | None) -> list[Tool] | None:
    """The internal tools for a dialect's tool list (None when there are none)."""
    if not tools:
        return None
    return [
        Tool(
            function=FunctionSpec(
                name=t.function.name,
                description=t.function.description or "",
                parameters=t.function.parameters or {},
                strict=t.function.strict,
            )
        )
        for t in tools
    ]


def wire_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    """Tools as OpenAI's and Ollama's APIs take them: `type` always, an empty
    parameter schema when the function takes none."""
    out = []
    for t in tools:
        fn = t.function
        spec: dict[str, Any] = {
            "name": fn.name,
            "parameters": fn.parameters or {"type": "object", "properties": {}},
        }
        if fn.description:
            spec["description"] = fn.description
        if fn.strict is not None:
            spec["strict"] = fn.strict
        out.append({"type": "function", "function": spec})
    return out


class NamedFunction(Strict):
    """The function a named tool choice names."""

    name: ToolName


class NamedToolChoice(Strict):
    """{"type": "function", "function": {"name": ...}}: this tool must be called."""

    function: NamedFunction
    type: Literal["function"] = "function"


# OpenAI's tool_choice: "auto" (the model decides), "none" (no tool: the tools are not
# sent), "required" (some tool), or one named tool; backends that can't force a call
# (Ollama, MLX) take it as "auto".
ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


# Anthropic's effort levels (output_config.effort); others the API may add are sent on too.
AnthropicEffort = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=32,
        description="how much effort an Anthropic model puts into its answer, in the API's "
        "words (`output_config.effort`: low, medium, high, xhigh, max): sent as "
        "`output_config.effort` to Anthropic upstreams; other backends take one of "
        "reasoning_effort's words as reasoning_effort, when that is not given",
    ),
]
# The least thinking budget the Messages API takes.
MIN_THINKING_BUDGET = 1024


class Thinking(Strict):
    """Anthropic's extended thinking (the Messages API's `thinking`): sent as it is to an
    Anthropic upstream; other backends take an enabled one's budget as a reasoning effort."""

    type: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=32,
            description='"enabled" (with budget_tokens), "adaptive" (the model decides), '
            '"disabled", or another type the API takes',
        ),
    ]
    budget_tokens: (
        Annotated[
            int,
            Meta(
                ge=MIN_THINKING_BUDGET,
                le=2**31 - 1,
                description="the most tokens the model may think (an enabled thinking's; "
                "less than max_tokens, which it is part of)",
            ),
        ]
        | None
    ) = None
    display: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=32,
                description='"summarized" or "omitted" (the thinking\'s text left out of the '
                "answer, its signature kept), or another the API takes",
            ),
        ]
        | None
    ) = None


class ChatRequest(Strict):
    """POST /api/v1/chat, and the one internal request every dialect becomes."""

    messages: Annotated[list[Message], Meta(min_length=1)]
    model: str | None = None
    stream: bool = True
    options: Options = msgspec.field(default_factory=Options)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    # false: at most one tool call per answer (OpenAI's parallel_tool_calls, Anthropic's
    # disable_parallel_tool_use); None: the upstream's default (several allowed).
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # Ollama's `think`: whether a thinking model thinks first, or how hard. Passed on by an
    # Ollama backend as it is (None: Ollama's default, which is to think); an Anthropic one
    # takes it as a reasoning effort (true as medium); others ignore it.
    think: Think | None = None
    # The end user's opaque id (a uuid, a hash; no name or email): an Anthropic backend
    # sends it as the API's metadata.user_id, which Anthropic uses to tell abuse by one
    # user from the rest of a key's traffic; others ignore it. A field of its own, not a
    # metadata key: metadata is the log's, and a client may put there what must stay here.
    user_id: Annotated[str, Meta(min_length=1, max_length=MAX_USER_ID)] | None = None
    # OpenAI's words for how hard a reasoning model thinks. Apart from `think` so that each
    # dialect takes exactly its API's values; sent only when given (a model that does
    # not reason may refuse the field).
    reasoning_effort: (
        Annotated[
            ReasoningEffort,
            Meta(
                description="how hard a reasoning model thinks, in OpenAI's words: sent "
                "as `reasoning_effort` to OpenAI-compatible upstreams, as `think` to "
                "Ollama ones when `think` is not given (none: false; minimal, low: "
                '"low"; medium: "medium"; high, xhigh: "high"; max: "max"); '
                "as a `thinking` budget to Anthropic ones when `thinking` is not given "
                "(none, minimal: no thinking; low: 1024 tokens; medium: 4096; high: "
                "16384; xhigh: 24576; max: 32000; see the README); the MLX and echo "
                "backends ignore it. Absent: the upstream's default"
            ),
        ]
        | None
    ) = None
    # Anthropic's words for the same (the Messages API's `thinking` and
    # `output_config.effort`): an Anthropic backend sends them as they came; others map
    # them to a reasoning effort (see effort_for), so each dialect keeps its API's words.
    thinking: (
        Annotated[
            Thinking,
            Meta(
                description="Anthropic's extended thinking, sent as it is to Anthropic "
                "upstreams (see Thinking); to others, an enabled one's budget_tokens is "
                "the reasoning_effort when neither that nor `effort` is given: low below "
                "4096, medium below 16384, high from there"
            ),
        ]
        | None
    ) = None
    effort: AnthropicEffort | None = None


# Anthropic's efforts that other backends take as reasoning_effort (its own words).
_EFFORTS: dict[str, ReasoningEffort] = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "xhigh",
    "max": "max",
}


def effort_for(request: ChatRequest) -> ReasoningEffort | None:
    """The reasoning effort a backend other than Anthropic's asks for: `reasoning_effort`,
    else Anthropic's `effort` (one of its words), else an enabled thinking's budget's level
    (None: the upstream's default, as a disabled or adaptive thinking leaves it)."""
    if request.reasoning_effort is not None:
        return request.reasoning_effort
    if request.effort is not None and request.effort in _EFFORTS:
        return _EFFORTS[request.effort]
    thinking = request.thinking
    if thinking is None or thinking.type != "enabled" or thinking.budget_tokens is None:
        return None
    budget = thinking.budget_tokens
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def effort_from_thinking(request: ChatRequest) -> ReasoningEffort | None:
    """The reasoning effort Anthropic's words (`effort`, `thinking`) ask a backend other
    than Anthropic's for, when the request gives no `reasoning_effort` (None: none)."""
    if request.reasoning_effort is not None or (
        request.thinking is None and request.effort is None
    ):
        return None
    return effort_for(request)


class GenerateRequest(Strict):
    """POST /api/v1/generate: one prompt, an optional system prompt."""

    prompt: str
    model: str | None = None
    system: str | None = None
    stream: bool = True
    options: Options = msgspec.field(default_factory=Options)
    metadata: dict[str, Any] | None = None
    reasoning_effort: (
        Annotated[
            ReasoningEffort,
            Meta(description="how hard a reasoning model thinks: as /api/v1/chat's"),
        ]
        | None
    ) = None

    def to_chat(self) -> ChatRequest:
        """The chat request this prompt stands for."""
        messages = [Message(role="user", content=self.prompt)]
        if self.system:
            messages.insert(0, Message(role="system", content=self.system))
        return ChatRequest(
            messages=messages,
            model=self.model,
            stream=self.stream,
            options=self.options,
            metadata=self.metadata,
            reasoning_effort=self.reasoning_effort,
        )


# The most inputs one embed request may carry (OpenAI's own bound for /v1/embeddings),
# the longest input in characters (about 64k tokens: above every embedding model's
# window; a body is bounded by server.max_body_bytes too), and the longest vector asked.
MAX_EMBED_INPUTS = 2048
MAX_EMBED_CHARS = 262_144
MAX_EMBED_DIMENSIONS = 16_384
# The most numbers one embed request may ask for (its inputs times `dimensions`): a full
# batch of the longest vectors embedding models make (4096: NV-Embed, Qwen3-Embedding-8B;
# OpenAI's longest is 3072). More is only an answer of hundreds of megabytes to build.
MAX_EMBED_NUMBERS = MAX_EMBED_INPUTS * 4096

EmbedText = Annotated[str, Meta(min_length=1, max_length=MAX_EMBED_CHARS)]
Dimensions = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_EMBED_DIMENSIONS,
        description="the length of each vector: sent on as the upstream's `dimensions` "
        "(OpenAI's text-embedding-3 models and Ollama shorten their vectors to it); an "
        "answer of another length is a 502; echo makes vectors this long. Absent: the "
        "model's own length. Inputs times dimensions at most 8,388,608",
    ),
]


class EmbedRequest(Strict):
    """POST /api/v1/embed, and the one internal embed request every dialect becomes."""

    input: (
        Annotated[
            list[EmbedText],
            Meta(
                min_length=1,
                max_length=MAX_EMBED_INPUTS,
                description="the texts to embed (a string is one), each non-empty",
            ),
        ]
        | EmbedText
    )
    model: str | None = None
    dimensions: Dimensions | None = None
    # Ollama's `truncate`: false refuses an input over the model's window rather than cut
    # it. Passed on by an Ollama backend alone (None: Ollama's default, true).
    truncate: bool | None = None

    def texts(self) -> list[str]:
        """The inputs, a single string as a list of one."""
        return [self.input] if isinstance(self.input, str) else self.input


class EmbedUsage(msgspec.Struct):
    """The tokens an embed call read (OpenAI's embeddings usage)."""

    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbedResult(msgspec.Struct):
    """What a backend's `embed` returns: one vector per input, in order, and the tokens
    it read (0: the upstream did not say; stella then estimates them)."""

    embeddings: list[list[float]]
    prompt_tokens: int = 0


class EmbedResponse(msgspec.Struct):
    """Body of POST /api/v1/embed."""

    model: str
    embeddings: list[list[float]]
    usage: EmbedUsage


# --- stream events ---------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    """What of the prompt's tokens, as OpenAI's usage breaks them down."""

    cached_tokens: int = 0  # read from the backend's prompt cache, not again


class CompletionTokensDetails(msgspec.Struct):
    """What of the completion's tokens, as OpenAI's usage breaks them down."""

    reasoning_tokens: int = 0  # the model's thinking, part of completion_tokens


class Usage(msgspec.Struct):
    """Token counts of one inference."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Only when the backend reported how many prompt tokens its cache spared it (left
    # out when it did not: an unknown count is not a 0).
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET
    # Only when the backend reported how many of the completion's tokens were reasoning
    # (an OpenAI-compatible upstream's count, an Anthropic one's thinking_tokens; Ollama
    # gives none).
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET


class Timings(msgspec.Struct):
    """Where the time of one inference went, in milliseconds."""

    queue_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    tokens_per_s: float | None = None


class Event(msgspec.Struct, tag_field="type"):
    """Base of the NDJSON stream events (a tagged union on `type`)."""


class Start(Event, tag="start"):
    """First line of every stream, sent before the backend produces anything."""

    id: str
    model: str
    backend: str
    created: float


class Delta(Event, tag="delta", omit_defaults=True):
    """A piece of the assistant's text, and/or of its reasoning (`text` is "" in a line
    of reasoning alone: a client that reads only `text` shows the answer as before)."""

    text: str
    # A reasoning model's thinking, as its upstream streamed it (vLLM's and DeepSeek's
    # reasoning_content, OpenRouter's reasoning, Ollama's thinking); left out when none.
    reasoning: Annotated[
        str,
        Meta(
            description="a piece of the model's reasoning before (or between) pieces of "
            "its text, as a reasoning model's upstream streamed it; absent when none"
        ),
    ] = ""
    # Set (text and reasoning "") where an Anthropic upstream ended a thinking block: the
    # reasoning since the last one is signed so; a client sends it back (thinking_blocks).
    signature: Annotated[
        str,
        Meta(
            description="an Anthropic upstream's signature of the reasoning streamed since "
            "the last signature (its thinking block ends here); absent when none"
        ),
    ] = ""
    redacted_thinking: Annotated[
        str,
        Meta(
            description="a block of thinking an Anthropic upstream encrypted, its opaque "
            "`data`, to send back as it came; absent when none"
        ),
    ] = ""


class Ping(Event, tag="ping"):
    """Keeps the connection alive after a silence."""


class ToolCall(Event, tag="tool_call", omit_defaults=True):
    """A complete function call requested by the model."""

    index: int
    id: str
    name: str
    arguments: dict[str, Any]
    # Set only when the model's arguments were not a JSON object: its text as written
    # (the OpenAI dialect passes it on as the API does), while `arguments` holds
    # {"_raw": text} for invalid JSON, {"value": v} for another JSON value.
    raw_arguments: str | None = None


_arguments_json = msgspec.json.Encoder()


def arguments_text(arguments: dict[str, Any], raw: str | None) -> str:
    """A call's arguments as OpenAI's wire carries them (a JSON string): the model's own
    text when it wrote no JSON object (clients validate it, as the API tells them to)."""
    return raw if raw is not None else _arguments_json.encode(arguments).decode()


_arguments_any = msgspec.json.Decoder()


def arguments_of(raw: str) -> tuple[dict[str, Any], str | None]:
    """A model's tool-call arguments as an object, and its text when that was not one.

    Invalid JSON becomes {"_raw": text}, another JSON value {"value": v}: every API
    that takes an object still gets one, and the text goes on (ToolCall.raw_arguments)
    to those that take the model's string as it is (OpenAI's).
    """
    if not raw.strip():
        return {}, None
    try:
        args = _arguments_any.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return {"_raw": raw}, raw
    if isinstance(args, dict):
        return args, None
    return {"value": args}, raw


class Done(Event, tag="done"):
    """Terminal line of a successful stream."""

    finish_reason: FinishReason
    usage: Usage = msgspec.field(default_factory=Usage)
    timings: Timings = msgspec.field(default_factory=Timings)
    # The backend that answered: `start` names the route's first, sent before a
    # fallback may have taken over.
    backend: str = ""


class Error(Event, tag="error"):
    """Terminal line of a stream that failed after it started."""

    code: str
    message: str
    retryable: bool = False
    # Seconds to wait before sending it again, when stella knows (an upstream's
    # Retry-After, an open circuit's cool-down): a stream's status and headers went out
    # before the backend was asked. Whole seconds, as the Retry-After header; left out
    # when unknown.
    retry_after: (
        Annotated[
            float,
            Meta(
                description="seconds to wait before sending the request again, as a "
                "Retry-After header would say (whole seconds, at least 1); absent when unknown"
            ),
        ]
        | UnsetType
    ) = UNSET


StreamEvent = Start | Delta | Ping | ToolCall | Done | Error


# --- non-stream responses ---------------------------------------------------


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    """The assistant's answer in a non-stream response."""

    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCallRef] | None = None
    reasoning: Annotated[
        str,
        Meta(
            description="the model's reasoning before its answer, as a reasoning model's "
            "upstream gave it; absent when none (taken back in a message of the next "
            "turn, and not sent on)"
        ),
    ] = ""
    thinking_blocks: ThinkingBlocks | None = None


class ChatResponse(msgspec.Struct):
    """Body of a non-stream chat or generate response."""

    id: str
    model: str
    backend: str
    message: AssistantMessage
    response: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class ErrorDetail(msgspec.Struct):
    """What went wrong, for an error returned before the first byte."""

    code: str
    message: str
    request_id: str = ""
    # Whether sending the same request again may succeed, as a stream's `error` line says
    # it: the status alone can't tell (a 502 upstream_rejected will fail again).
    retryable: bool = False


class ErrorResponse(msgspec.Struct):
    """Body of every native error response."""

    error: ErrorDetail


# --- models, health --------------------------------------------------------


class ModelInfo(msgspec.Struct):
    """One routable model."""

    name: str
    backend: str
    kind: str
    upstream_model: str = ""
    aliases: list[str] = []
    fallbacks: list[str] = []
    # The other backends this replica balances the route over (`backend`, above, never
    # listed here): its configured `balance`, less those in `left_out`.
    balance: list[str] = []
    loaded: bool = False
    default: bool = False
    capabilities: list[str] = []
    circuit: str = "closed"
    memory_bytes: int | None = None
    # The backends the route names (its `backend`, then `balance`) that this replica
    # lacks (disabled here; a stored route's, also not configured here): it is served
    # here without them, `backend` then naming the first of the others.
    left_out: list[str] = []


class ModelList(msgspec.Struct):
    """GET /api/v1/models."""

    models: list[ModelInfo]
    # None for a key that may not use the default model (not its name either).
    default: str | None
    # For an admin: the stored runtime routes this replica does not serve (made on one
    # whose backends differ, say), by name, with why; as of its last read of the store.
    skipped: dict[str, str] = {}


class Health(msgspec.Struct):
    """GET /health: liveness, plus which backend serves the default model (null when keys
    are configured: the route is public) and when."""

    status: str = "ok"
    backend: str | None = None
    timestamp: str = ""


class Readiness(msgspec.Struct):
    """GET /ready: 200 when every check is ok, else 503."""

    status: str
    checks: dict[str, str]


class ServiceInfo(msgspec.Struct):
    """GET /: what this service is, and where its routes are."""

    name: str
    version: str
    description: str
    # Ollama answers GET / with the text "Ollama is running", and its clients (Open WebUI,
    # editors' Ollama providers) probe a server for that phrase by substring: carried here,
    # the probe succeeds and this stays the JSON document it is. A probe wanting that
    # exact text still fails.
    ollama: str
    default_model: str | None  # null when keys are configured: the route is public
    uptime_s: float
    links: dict[str, str]


class Registered(msgspec.Struct):
    """POST /api/v1/models: the runtime route added."""

    registered: str


class DefaultModel(msgspec.Struct):
    """POST /api/v1/models/switch/{name}: the route that is the default now."""

    default: str


class Removed(msgspec.Struct, omit_defaults=True):
    """DELETE /api/v1/models/{name}: the runtime route removed."""

    removed: str
    # What else to know: a stored route removed while this replica's own one stays.
    detail: str = ""


class KeyInfo(msgspec.Struct, omit_defaults=True):
    """A key as GET /api/v1/keys lists it: never its digest, nor the key."""

    name: str
    source: Literal["config", "env", "runtime"]
    models: list[str]
    admin: bool
    # The limits that apply: the key's own, or [limits]' default where it sets none
    # (0: unlimited).
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent: int
    requests_per_day: int
    tokens_per_day: int
    revoked: bool
    # The daily budget in USD (0: none), listed as the limits are (None: from a server
    # before budgets, which lists none).
    usd_per_day: float | None = None
    # When a runtime key was made and when a key was revoked (UTC ISO 8601, to the
    # second; absent: unknown, as for a configured key's making or an entry kept before
    # stella stored these).
    created_at: str = ""
    revoked_at: str = ""
    # When a runtime key stops working (UTC ISO 8601, to the second, on the store's
    # clock; absent: never), and whether it has.
    expires_at: str = ""
    expired: bool = False
    # When the secret a rotation replaced stops working (absent: none works any more).
    grace_until: str = ""
    # Why this replica does not take a stored runtime key (absent: it does): an entry
    # no replica of this version can read (not JSON, a field it does not know, a bad
    # name or digest: listed with no models, no admin, limits 0; DELETE removes it), or
    # one whose name this replica's config gives its own key (another replica, whose
    # config lacks it, made it: it works there).
    skipped: str = ""


class KeyList(msgspec.Struct):
    """GET /api/v1/keys."""

    keys: list[KeyInfo]


class KeyCreated(KeyInfo, kw_only=True):
    """POST /api/v1/keys: the runtime key made, and the key itself (shown this once)."""

    key: str


class KeyRevoked(msgspec.Struct, omit_defaults=True):
    """DELETE /api/v1/keys/{name}: the key revoked, and where it came from."""

    revoked: str
    # Where the key revoked came from; this replica's configured key's when a stored
    # runtime key of the name went with it.
    source: Literal["config", "env", "runtime"]
    # Every source revoked: the configured key's and "runtime" when both had the name.
    sources: list[Literal["config", "env", "runtime"]] = msgspec.field(default_factory=list)
    # What else to know: a configured key's table or entry is still in the config.
    detail: str = ""
    # DELETE ?purge=true: the runtime key's stored entry is gone, its name free again
    # (its secrets stay revoked).
    purged: bool = False


class ConfigView(msgspec.Struct):
    """GET /config: the configuration stella started with (secrets redacted), the default now."""

    config: dict[str, Any]
    default_model: str


class UsageRow(msgspec.Struct):
    """One key's use of one model on one UTC day."""

    key: str
    model: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    # What the calls cost, in USD, at their routes' prices (0: unpriced routes, or rows
    # counted before stella priced calls).
    cost_usd: float = 0.0


class UsageTotals(msgspec.Struct):
    """The sums over the rows shown."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    cost_usd: float = 0.0


class UsageReport(msgspec.Struct):
    """GET /api/v1/usage."""

    usage: list[UsageRow]
    totals: UsageTotals
