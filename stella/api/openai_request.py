"""OpenAI request shapes and how they become one ChatRequest.

Fields stella can't honour (n other than 1, logprobs, audio in or out) get a 400
naming the parameter; other unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec

from stella.api.ollama_request import Images, check_images
from stella.errors import InvalidRequest
from stella.images import Counter, from_url
from stella.protocol import (
    ChatRequest,
    FunctionCall,
    Image,
    LenientTool,
    Message,
    NamedToolChoice,
    Options,
    ReasoningEffort,
    Tool,
    ToolCallRef,
    ToolChoice,
    arguments_of,
    options_from,
    tools_from,
)

# --- request shapes ---------------------------------------------------------------


class ImageURL(msgspec.Struct):
    """An `image_url` part's image: a data URL of base64, or an http(s) URL."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class Part(msgspec.Struct):
    """One part of a list-of-parts message content."""

    type: str
    text: str = ""
    refusal: str = ""  # of a `refusal` part, which an assistant message may hold


class ChatPart(Part):
    """A part of a chat completions message: an `image_url` part's image too (a user
    message's; the Responses API's parts carry theirs in another shape)."""

    image_url: ImageURL | None = None


class OAIFunctionCall(msgspec.Struct):
    """A function call in an assistant message (arguments as a JSON string)."""

    name: str
    arguments: str = "{}"


class OAIToolCall(msgspec.Struct):
    """A tool call in an assistant message."""

    function: OAIFunctionCall
    id: str = ""
    type: str = "function"


class OAIMessage(msgspec.Struct):
    """A chat message as OpenAI clients send it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatPart] | None = None
    name: str | None = None
    tool_calls: list[OAIToolCall] | None = None
    tool_call_id: str | None = None
    # An assistant's answer that was a refusal, as the API gives it back (content null).
    refusal: str | None = None
    # An earlier audio answer, as the API has a client send it back ({"id": ...}): named
    # so that it is refused, not read as an empty turn.
    audio: Any = None
    # Ollama's shape of images, which some clients send here too: refused, not ignored.
    images: Images | None = None


class StreamOptions(msgspec.Struct):
    """stream_options."""

    include_usage: bool = False


class CompletionCommon(msgspec.Struct, kw_only=True):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool | None = False  # the API reference has n and stream nullable
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (digits) -> bias
    n: int | None = 1
    logprobs: bool | int | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    # Extensions many OpenAI-compatible servers accept.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # stella extension: choose the backend by its configured name (never a URL).
    provider: str | None = None


class ChatCompletionRequest(CompletionCommon, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[OAIMessage]
    tools: list[LenientTool] | None = None
    tool_choice: Any = None  # read by tools_and_choice: its shapes differ by type
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # Exactly the API's words: another is a 400 naming $.reasoning_effort.
    reasoning_effort: ReasoningEffort | None = None
    top_logprobs: int | None = None
    # The deprecated function-calling fields: refused with their replacement named,
    # rather than ignored (the model would answer in text to a client awaiting a call).
    functions: list[Any] | None = None
    function_call: Any = None
    # Output other than text (audio): named so that they are refused, not dropped unseen
    # (the client would wait for audio that never comes).
    modalities: list[str] | None = None
    audio: Any = None


class CompletionRequest(CompletionCommon, kw_only=True):
    """POST /v1/completions (legacy text completions)."""

    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


# --- errors ---------------------------------------------------------------------------


# --- translation ----------------------------------------------------------------------


def _text(
    content: str | Sequence[Part] | None, where: str, assistant: bool = False, images: bool = False
) -> str:
    """The text parts joined by newlines; 400 for a part that is not text (`images`: the
    `image_url` parts were taken already)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        if part.type == "refusal" and assistant:
            # The API takes one in an assistant turn: the model's own words, as its text.
            texts.append(part.refusal)
            continue
        if part.type == "image_url" and images:
            continue
        if part.type != "text":
            said = (
                "a refusal part belongs in an assistant message"
                if part.type == "refusal"
                else "an image_url part belongs in a user message"
                if part.type == "image_url"
                else f"content part type {part.type!r} is not supported"
            )
            raise InvalidRequest(said, param=f"{where}[{i}].type")
        texts.append(part.text)
    return "\n".join(texts)


def _images(content: list[ChatPart], where: str, counter: Counter) -> list[Image] | None:
    """A user message's `image_url` parts as images (None when it has none): a data URL
    as its data and media type, an http(s) URL as it is; a 400 naming the part else, or
    the first past the request's cap (`counter`)."""
    images = None
    for i, part in enumerate(content):
        if part.type != "image_url":
            continue
        at = f"{where}[{i}].image_url"
        if part.image_url is None:
            raise InvalidRequest(f"$.{at}: required", param=at)
        counter.add(at)
        image = from_url(part.image_url.url, f"{at}.url", part.image_url.detail)
        if images is None:
            images = []
        images.append(image)
    return images


def to_options(req: CompletionCommon) -> Options:
    """Sampling options; 400 for what stella can't honour (n other than 1, logprobs)."""
    if req.n not in (1, None):
        # Said of the value sent: a 0 is no request for more choices.
        raise InvalidRequest(
            f"$.n: {req.n} is not supported; only 1 (one choice per request)", param="n"
        )
    if req.logprobs:
        raise InvalidRequest("logprobs are not supported", param="logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    # The newer name wins when both are given (a 0 in it too: that is the client's error).
    newer = req.max_completion_tokens is not None
    try:
        return options_from(
            {"max_tokens": "max_completion_tokens"} if newer else None,
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_completion_tokens if newer else req.max_tokens,
            stop=stop,
            seed=req.seed,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias,
        )
    except msgspec.ValidationError as exc:
        raise InvalidRequest.blaming(str(exc)) from None


# `user` goes into the inference log with the metadata. OpenAI documents no limit for it
# (its successor, safety_identifier, is 64 characters); stella's is that of a metadata
# value, which core's metadata ceiling allows for.
MAX_USER_CHARS = 512


def check_user(user: str | None) -> None:
    """400 naming `user` for one over MAX_USER_CHARS characters."""
    if user is not None and len(user) > MAX_USER_CHARS:
        raise InvalidRequest(f"$.user: over {MAX_USER_CHARS} characters", param="user")


def to_metadata(req: CompletionCommon) -> dict[str, Any] | None:
    """The request's metadata (and `user`) for the inference log."""
    check_user(req.user)
    meta = dict(req.metadata or {})
    if req.user:
        meta["user"] = req.user
    return meta or None


def check_completion(req: CompletionRequest) -> None:
    """400 for the legacy completion options stella can't honour."""
    if req.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    if req.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.best_of not in (None, 1):
        raise InvalidRequest(
            f"$.best_of: {req.best_of} is not supported; only 1 (one completion)", param="best_of"
        )


def open_tool_choice(value: Any) -> Literal["auto", "none", "required"] | dict[str, Any]:
    """A tool_choice string as stella's, or the object to read on (both OpenAI APIs
    take the same strings); any other string or value is a 400."""
    match value:
        case "auto" | "none" | "required":
            return value
        case str():
            raise InvalidRequest(
                f"$.tool_choice: {value!r} is not auto, none or required", param="tool_choice"
            )
        case dict():
            return value
    raise InvalidRequest("$.tool_choice: expected a string or an object", param="tool_choice")


def tools_and_choice(
    tools: list[Tool] | None, value: Any
) -> tuple[list[Tool] | None, ToolChoice | None]:
    """OpenAI's tool_choice as stella's, with the tools to send: `allowed_tools` narrows
    them; a shape stella can't honour is a 400, not a choice the model never got."""
    if value is None:
        return tools, None
    choice = open_tool_choice(value)
    if isinstance(choice, str):
        return tools, choice
    kind = choice.get("type")
    if kind == "function":
        try:
            return tools, msgspec.convert(choice, NamedToolChoice)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"tool_choice: {exc}", param="tool_choice") from None
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools")
        if not isinstance(allowed, dict):
            raise InvalidRequest(
                "$.tool_choice.allowed_tools: expected an object with mode and tools",
                param="tool_choice.allowed_tools",
            )
        return allowed_tools(tools, allowed, "tool_choice.allowed_tools", _chat_tool_name)
    # Custom tools, another API's shape ({"type": "tool", "name"}): taken as auto, the
    # model would be free to answer where the client asked for a call.
    raise InvalidRequest(
        f"$.tool_choice.type: {kind!r} is not supported (function, allowed_tools)",
        param="tool_choice.type",
    )


def _chat_tool_name(entry: Any) -> tuple[str, Any]:
    """The name an allowed_tools entry of chat completions gives, and its field."""
    fn = entry.get("function") if isinstance(entry, dict) else None
    return "function.name", fn.get("name") if isinstance(fn, dict) else None


def allowed_tools(
    tools: list[Tool] | None,
    allowed: dict[str, Any],
    path: str,
    name_of: Callable[[Any], tuple[str, Any]],
) -> tuple[list[Tool] | None, ToolChoice | None]:
    """An `allowed_tools` choice (at `path`): only the tools it lists are sent, with its
    mode, so the model cannot call one the client left out; listing none calls none."""
    mode = allowed.get("mode")
    if mode not in ("auto", "required"):
        raise InvalidRequest(
            f"$.{path}.mode: expected auto or required, got {mode!r}", param=f"{path}.mode"
        )
    listed = allowed.get("tools")
    if not isinstance(listed, list):
        raise InvalidRequest(f"$.{path}.tools: expected a list of tools", param=f"{path}.tools")
    known = {t.function.name for t in tools or ()}
    names = set()
    for i, entry in enumerate(listed):
        field, name = name_of(entry)
        at = f"{path}.tools[{i}]"
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"$.{at}.{field}: required", param=f"{at}.{field}")
        if name not in known:
            raise InvalidRequest(f"$.{at}.{field}: no tool named {name!r}", param=f"{at}.{field}")
        names.add(name)
    if not names:
        if mode == "required":
            raise InvalidRequest(
                "$.tool_choice: allowed_tools with mode required, and no tools",
                param="tool_choice",
            )
        return tools, "none" if tools else None
    return [t for t in tools or () if t.function.name in names], mode


def to_chat(req: ChatCompletionRequest) -> ChatRequest:
    """The internal request for a chat completion."""
    if req.top_logprobs:
        raise InvalidRequest("logprobs are not supported", param="top_logprobs")
    for legacy, current in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(req, legacy) not in (None, [], "none"):  # asking for nothing is fine
            raise InvalidRequest(
                f"{legacy} is deprecated and not supported: use {current}", param=legacy
            )
    other = [m for m in req.modalities or () if m != "text"]
    if other:
        raise InvalidRequest(
            f"$.modalities: {other[0]!r} is not supported; only text", param="modalities"
        )
    if req.audio is not None:
        raise InvalidRequest("$.audio: audio output is not supported (text only)", param="audio")
    messages = []
    counter = Counter()
    for i, m in enumerate(req.messages):
        if m.audio is not None:
            # Dropped, the turn would reach the model empty (or not at all, upstream).
            raise InvalidRequest(
                f"$.messages[{i}].audio: an earlier answer's audio is not supported; "
                "send its transcript as the message's content",
                param=f"messages[{i}].audio",
            )
        check_images(m.images, f"messages[{i}].images")
        if m.role in ("user", "system", "developer") and (m.content is None or m.content == []):
            # OpenAI requires it; an empty turn would only get an empty answer.
            raise InvalidRequest(
                f"a {m.role} message needs content", param=f"messages[{i}].content"
            )
        calls = None
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                # A model's arguments that were no JSON object come back as it wrote them
                # (stella passed them on so): kept, as the answer had them.
                args, raw = arguments_of(c.function.arguments)
                calls.append(
                    ToolCallRef(
                        id=c.id,
                        function=FunctionCall(
                            name=c.function.name, arguments=args, raw_arguments=raw
                        ),
                    )
                )
        where = f"messages[{i}].content"
        images = None
        if m.role == "user" and type(m.content) is list:
            images = _images(m.content, where, counter)
        text = _text(m.content, where, m.role == "assistant", images is not None)
        if m.role == "assistant" and m.refusal:
            # An answer that was a refusal is that turn's text: left out, the model would
            # read an empty turn, and the upstream get content "".
            text = "\n".join(t for t in (text, m.refusal) if t)
        messages.append(
            Message(
                role="system" if m.role == "developer" else m.role,
                content=text,
                name=m.name,
                tool_calls=calls,
                tool_call_id=m.tool_call_id,
                images=images,
            )
        )
    tools, choice = tools_and_choice(tools_from(req.tools), req.tool_choice)
    return ChatRequest(
        messages=messages,
        model=req.model,
        stream=bool(req.stream),
        options=to_options(req),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=req.response_format,
        metadata=to_metadata(req),
        reasoning_effort=req.reasoning_effort,
    )
