"""OpenAI Responses API request shapes and how they become one ChatRequest.

stella keeps no state: a request must carry its whole conversation in `input`.
What only a stateful or tool-running server could honour (`previous_response_id`,
`conversation`, stored `prompt`s, `background`, a forced built-in tool, stored files,
audio in a message) is a 400 naming the field; other unknown fields are ignored, as in
the chat completions dialect. Tools are read in responses_tools.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

# A content part: the same shape as chat completions' (input_text, output_text, refusal).
from stella.api.openai_request import Part, check_user
from stella.api.responses_tools import ToolSet
from stella.errors import InvalidRequest
from stella.images import (
    Counter,
    from_url,
    tool_image,
)
from stella.protocol import (
    ChatRequest,
    FunctionCall,
    Image,
    Message,
    Options,
    ReasoningEffort,
    Role,
    ToolCallRef,
    arguments_of,
    options_from,
)


class InputPart(Part):
    """A part of a Responses message: an `input_image`'s image too (a URL string: a data
    URL of base64 or an http(s) one; or a stored file's id, refused)."""

    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputItem(msgspec.Struct):
    """One item of `input`: a message (with or without `type: "message"`), a
    function_call or custom_tool_call, its output, or another kind (refused or dropped)."""

    type: str | None = None
    role: str | None = None
    content: str | list[InputPart] | None = None
    call_id: str = ""
    name: str = ""
    namespace: str | None = None  # a function_call's to a namespace's tool
    arguments: str = ""
    input: str = ""  # a custom_tool_call's
    output: str | list[InputPart] | None = None


class FormatSpec(msgspec.Struct, omit_defaults=True):
    """text.format: {"type": "text" | "json_object" | "json_schema", ...}."""

    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct):
    """`text`: the output's format; `verbosity` only repeated (others are ignored)."""

    format: FormatSpec | None = None
    verbosity: str | None = None


class ReasoningConfig(msgspec.Struct):
    """`reasoning`: its `effort` is the backend's reasoning_effort (`summary` and others
    are ignored: the reasoning items that come back hold the thinking itself)."""

    effort: ReasoningEffort | None = None
    summary: str | None = None  # repeated in the Response, not applied


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """POST /v1/responses."""

    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    stream: bool | None = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # Each a dict: a built-in tool's shape is whatever its type says, refused by that type.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    # Its effort is applied (another value is a 400 naming reasoning.effort).
    reasoning: ReasoningConfig | None = None
    # Taken, and not applied: stella stores nothing, trims no input.
    store: bool | None = None
    include: list[str] | None = None
    truncation: str | None = None
    top_logprobs: int | None = None
    prompt_cache_key: str | None = None  # repeated in the Response; caching is the backend's
    # Refused when given: they need a server that keeps state or runs in the background.
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    # stella extension, as in the chat completions dialect: a backend by its name.
    provider: str | None = None


# Fields that need state stella does not keep: a 400 naming each when it is given.
_STATEFUL = {
    "previous_response_id": "stella keeps no responses: send the whole conversation in input",
    "conversation": "stella keeps no conversations: send the whole conversation in input",
    "prompt": "stored prompts are not supported: send instructions and input",
}
# Parts of a message that are text, by role: an assistant's earlier output comes back
# as output_text (or a refusal, which is that turn's text, as in chat completions).
_TEXT_PARTS = {"input_text", "output_text", "text"}
# A message's role as stella's (a developer message is a system prompt, as in chat).
_ROLES: dict[str, Role] = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
}
# Input items of a kind that carries nothing a backend could read, dropped: an earlier
# turn's reasoning, as stella's answers hold it (or a history from elsewhere, its
# encrypted_content too): upstreams ignore an earlier turn's reasoning, or refuse it.
_DROPPED = {"reasoning"}


def _text(
    content: str | Sequence[Part] | None, where: str, assistant: bool = False, images: bool = False
) -> str:
    """The text of a message's content; a part that is not text (a file, audio, an image
    outside a user message) is a 400 naming its path: dropped, the model would answer
    without it (`images`: a user message's input_image parts were taken already)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type in _TEXT_PARTS:
            texts.append(part.text)
        elif part.type == "refusal" and assistant:
            texts.append(part.refusal)
        elif part.type == "input_image" and images:
            continue
        else:
            raise InvalidRequest(
                f"$.{where}[{j}].type: {part.type!r} is not supported (text only)",
                param=f"{where}[{j}].type",
            )
    # Parts are separate pieces of text: run together, their words would merge.
    return "\n".join(texts)


def _images(content: list[InputPart], where: str, counter: Counter) -> list[Image] | None:
    """A user message's input_image parts as images (None: it has none): `image_url` a
    data URL (as data and media type) or an http(s) URL; a `file_id` is a 400, as nothing
    is stored here; a bad one a 400 naming its path, as is the first past the request's
    cap (`counter`)."""
    images = None
    for j, part in enumerate(content):
        if part.type != "input_image":
            continue
        at = f"{where}[{j}]"
        if part.image_url is None:
            why = (
                "stella stores no files: send the image as image_url"
                if part.file_id
                else "required"
            )
            raise InvalidRequest(f"$.{at}.image_url: {why}", param=f"{at}.image_url")
        # A detail the native image lacks (`original`) is the upstream's default.
        counter.add(at)
        image = from_url(part.image_url, f"{at}.image_url", part.detail)
        if images is None:
            images = []
        images.append(image)
    return images


def _tool_output(
    output: str | list[InputPart] | None, counter: Counter
) -> tuple[str, list[Image] | None]:
    """A tool's output as text and images: an `input_image` part (the image Codex's
    view_image returns) one of the tool message's images, which the core turns into a note
    for a backend that reads text only; another part that is not text (a file) a note
    saying so. Refused, it would stay in the history and fail every later turn; noted, the
    model reads plainly that it did not see it (so an image stella cannot send, too)."""
    if output is None or isinstance(output, str):
        return output or "", None
    texts = []
    images: list[Image] = []
    for part in output:
        if part.type in _TEXT_PARTS:
            texts.append(part.text)
        elif part.type == "input_image":
            # A stored file's id (no image_url) is one stella cannot send: a note.
            image = tool_image(counter, url=part.image_url, detail=part.detail)
            if isinstance(image, str):
                texts.append(image)
            else:
                images.append(image)
        else:
            kind = part.type.removeprefix("input_")
            texts.append(f"[{kind} omitted: this model reads text only]")
    return "\n".join(texts), images or None


# Input items that are a model's tool call, and those that are a tool's output.
_CALLS = {"function_call", "custom_tool_call"}
_OUTPUTS = {"function_call_output", "custom_tool_call_output"}


def _call(item: InputItem, tools: ToolSet) -> ToolCallRef:
    """A function_call or custom_tool_call item as the call the backend made: under the
    name its tool is offered as, a custom tool's input its one argument."""
    name = tools.upstream(item.name, item.namespace) or item.name
    if item.type == "custom_tool_call":
        args, raw = {"input": item.input}, None
    else:
        args, raw = arguments_of(item.arguments)
    return ToolCallRef(
        id=item.call_id, function=FunctionCall(name=name, arguments=args, raw_arguments=raw)
    )


def _messages(req: ResponsesRequest, tools: ToolSet) -> list[Message]:
    """The conversation: instructions first, then `input`'s items as chat messages, each
    run of tool call items one assistant turn with its tool calls."""
    messages: list[Message] = []
    if req.instructions:
        messages.append(Message(role="system", content=req.instructions))
    if isinstance(req.input, str):
        messages.append(Message(role="user", content=req.input))
        return messages
    # The call_ids of the call items so far: an output answers one of them.
    called: set[str] = set()
    counter = Counter()
    for i, item in enumerate(req.input or ()):
        kind = item.type or ("message" if item.role else None)
        where = f"input[{i}]"
        if kind == "message":
            role = _ROLES.get(item.role or "")
            if role is None:
                said = "missing (" if item.role is None else f"{item.role!r} is not ("
                raise InvalidRequest(
                    f"$.{where}.role: {said}user, assistant, system or developer)",
                    param=f"{where}.role",
                )
            images = None
            if role == "user" and type(item.content) is list:
                images = _images(item.content, f"{where}.content", counter)
            text = _text(item.content, f"{where}.content", role == "assistant", images is not None)
            messages.append(Message(role=role, content=text, images=images))
        elif kind in _CALLS:
            if not item.name:
                raise InvalidRequest(f"$.{where}.name: required", param=f"{where}.name")
            called.add(item.call_id)
            call = _call(item, tools)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                # The calls of one answer (and its text before them) are one turn, as the
                # chat format has them: each tool result then follows its call.
                messages[-1] = msgspec.structs.replace(
                    last, tool_calls=[*(last.tool_calls or ()), call]
                )
            else:
                messages.append(Message(role="assistant", tool_calls=[call]))
        elif kind in _OUTPUTS:
            if item.call_id not in called:
                # As the API refuses it: an upstream would too, and its refusal is a 502.
                raise InvalidRequest(
                    f"$.{where}.call_id: no {kind.removesuffix('_output')} item before it "
                    f"has call_id {item.call_id!r}",
                    param="input",
                )
            output, images = _tool_output(item.output, counter)
            messages.append(
                Message(role="tool", content=output, tool_call_id=item.call_id, images=images)
            )
        elif kind in _DROPPED:
            continue
        else:
            if kind is None:
                said = "missing (and no role: messages, tool calls and their outputs)"
            elif kind == "item_reference":
                # The Vercel AI SDK's Responses provider sends these for earlier turns
                # unless told `store: false`: say so, as the SDK's user cannot send items.
                said = (
                    f"{kind!r} refers to a stored item; stella keeps none: send the item "
                    "itself (the AI SDK's OpenAI provider does so when its providerOptions "
                    "say openai.store: false)"
                )
            else:
                said = (
                    f"{kind!r} is not supported (messages, function_call, custom_tool_call "
                    "and their outputs only)"
                )
            raise InvalidRequest(f"$.{where}.type: {said}", param=f"{where}.type")
    return messages


def _format(text: TextConfig | None) -> dict[str, Any] | None:
    """text.format as chat completions' response_format."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        if fmt.schema is None:
            raise InvalidRequest(
                "$.text.format.schema: required for json_schema", param="text.format.schema"
            )
        if not fmt.name:
            raise InvalidRequest(
                "$.text.format.name: required for json_schema", param="text.format.name"
            )
        spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
        if fmt.description is not None:
            spec["description"] = fmt.description
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": spec}
    raise InvalidRequest(
        f"$.text.format.type: {fmt.type!r} is not text, json_object or json_schema",
        param="text.format.type",
    )


def _options(req: ResponsesRequest) -> Options:
    try:
        return options_from(
            {"max_tokens": "max_output_tokens"},
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_output_tokens,
        )
    except msgspec.ValidationError as exc:
        raise InvalidRequest.blaming(str(exc)) from None


# metadata as the API bounds it (a Response repeats it, and the SDK's type is str to str).
_META_KEYS, _META_KEY_CHARS, _META_VALUE_CHARS = 16, 64, 512
_JSON_KINDS = {bool: "a boolean", dict: "an object", list: "an array"}


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    """400 for metadata the API would refuse: its Response could not repeat it."""
    if not metadata:
        return
    if len(metadata) > _META_KEYS:
        raise InvalidRequest(
            f"$.metadata: {len(metadata)} keys, at most {_META_KEYS}", param="metadata"
        )
    for key, value in metadata.items():
        if len(key) > _META_KEY_CHARS:
            raise InvalidRequest(
                f"$.metadata: the key {key[:20]!r}... is over {_META_KEY_CHARS} characters",
                param="metadata",
            )
        if not isinstance(value, str):
            kind = "null" if value is None else _JSON_KINDS.get(type(value), "a number")
            raise InvalidRequest(f"$.metadata.{key}: {kind}, not a string", param="metadata")
        if len(value) > _META_VALUE_CHARS:
            raise InvalidRequest(
                f"$.metadata.{key}: over {_META_VALUE_CHARS} characters", param="metadata"
            )


def check(req: ResponsesRequest) -> None:
    """400 for what needs state, background runs or logprobs, which stella can't give,
    and for metadata (or a `user`) over its bounds."""
    for name, said in _STATEFUL.items():
        if getattr(req, name) is not None:
            raise InvalidRequest(f"$.{name}: {said}", param=name)
    if req.background:
        raise InvalidRequest(
            "$.background: background responses are not supported (stella keeps none "
            "to fetch later)",
            param="background",
        )
    if req.top_logprobs:
        raise InvalidRequest("$.top_logprobs: logprobs are not supported", param="top_logprobs")
    _check_metadata(req.metadata)
    check_user(req.user)


def to_chat(req: ResponsesRequest, toolset: ToolSet) -> ChatRequest:
    """The internal request for a Responses API call, its tools read into `toolset`
    (ToolSet.read(req.tools)), which maps the model's calls back."""
    check(req)
    messages = _messages(req, toolset)
    if not any(m.role != "system" for m in messages):
        raise InvalidRequest("$.input: required (the conversation so far)", param="input")
    tools, choice = toolset.choice(req.tool_choice)
    meta = dict(req.metadata or {})
    if req.user:
        meta["user"] = req.user
    return ChatRequest(
        messages=messages,
        model=req.model,
        stream=bool(req.stream),
        options=_options(req),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=_format(req.text),
        metadata=meta or None,
        reasoning_effort=req.reasoning.effort if req.reasoning is not None else None,
    )


def _reasoning_echoed(reasoning: ReasoningConfig | None) -> dict[str, Any] | None:
    """`reasoning` as a Response repeats it: its effort and summary (null when not given)."""
    if reasoning is None:
        return None
    return {"effort": reasoning.effort, "summary": reasoning.summary}


def echoed(req: ResponsesRequest) -> dict[str, Any]:
    """The request's parameters as a Response object repeats them."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    text: dict[str, Any] = {"format": msgspec.to_builtins(fmt) if fmt else {"type": "text"}}
    if req.text is not None and req.text.verbosity is not None:
        text["verbosity"] = req.text.verbosity
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "prompt_cache_key": req.prompt_cache_key,
        "reasoning": _reasoning_echoed(req.reasoning),
        "store": False,  # whatever was asked: stella keeps nothing
        "temperature": req.temperature,
        "text": text,
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "top_p": req.top_p,
        "truncation": req.truncation or "disabled",
        "user": req.user,
    }
