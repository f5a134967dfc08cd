"""Ollama request shapes and how they become stella's messages and options."""

from __future__ import annotations

from typing import Annotated, Any, get_args

import msgspec
from msgspec import Meta

from stella.errors import InvalidRequest
from stella.images import PAST_CAP_NOTE, Counter, sniff, with_notes
from stella.protocol import (
    FunctionCall,
    Image,
    LenientTool,
    Message,
    Options,
    Think,
    ToolCallRef,
    options_from,
)

# Ollama's images (base64 strings), which some clients send on other shapes too: taken on
# Ollama's own routes (OllamaImages), refused on the others, which have a shape of their
# own for images; dropped, the model would answer as if it had seen none.
Images = Annotated[
    list[str],
    Meta(
        description="images are not supported: a non-empty list is a 400 naming this "
        "field; an empty one is taken"
    ),
]


def check_images(images: list[str] | None, where: str) -> None:
    """400 naming `where` for a non-empty `images` list; an empty one asks for nothing."""
    if images:
        raise InvalidRequest(f"$.{where}: images are not supported", param=where)


OllamaImages = Annotated[
    list[str],
    Meta(
        description="images, each base64 (no `data:` prefix) of a PNG, JPEG, GIF or WebP "
        "(told by its first bytes); a model that reads text only answers 400 (a tool "
        "message's it reads as a note in its text); an empty list is none"
    ),
]


def images_of(
    images: list[str] | None, where: str, counter: Counter, role: str = "user"
) -> list[Image] | None:
    """Ollama's `images` as the native images, each one's type told by its first bytes
    (Ollama's carry none); a 400 naming the image for bad base64 or another format, and
    naming `where` for images on a message that is not a user's or a tool's, or naming a
    user's first past the request's cap (`counter`; a tool's past it is left out, for a
    note). None for none."""
    if not images:
        return None
    if role not in ("user", "tool"):
        raise InvalidRequest(
            f"$.{where}: only a user or tool message's images are taken", param=where
        )
    out = []
    for j, data in enumerate(images):
        if role != "tool":
            counter.add(f"{where}[{j}]")
        elif not counter.room():
            continue  # a note in its place (to_messages)
        out.append(Image(data=data, media_type=sniff(data, f"{where}[{j}]")))
    return out or None


class OllamaOptions(msgspec.Struct):
    """Ollama's `options` (unknown ones are ignored, as Ollama does)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    num_ctx: int | None = None


class OllamaFunctionCall(msgspec.Struct):
    """A function call in a message (arguments are an object)."""

    name: str
    arguments: dict[str, Any] = {}


class OllamaToolCall(msgspec.Struct):
    """A tool call in a message."""

    function: OllamaFunctionCall
    # Ollama 0.12.10 and later name each call; a result names the call it answers by it.
    id: str | None = None


class OllamaMessage(msgspec.Struct):
    """A chat message."""

    role: str
    content: str | None = ""  # Ollama (Go) reads null as ""
    images: OllamaImages | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None  # a tool result's: the id of the call it answers


class OllamaChat(msgspec.Struct, kw_only=True):
    """POST /api/chat."""

    model: str
    messages: list[OllamaMessage] = []
    stream: bool | None = True  # Ollama (Go) reads null as not given: true
    options: OllamaOptions | None = None
    format: Any = None
    tools: list[LenientTool] | None = None
    keep_alive: float | str | None = None  # seconds, or a Go duration ("5m")
    think: Think | None = None  # anything else Ollama refuses: a 400 naming it
    # Named so that they are refused (check_logprobs), not dropped unseen.
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaGenerate(msgspec.Struct, kw_only=True):
    """POST /api/generate."""

    model: str
    prompt: str | None = ""  # null: not given, as Ollama reads it
    system: str | None = None
    stream: bool | None = True
    options: OllamaOptions | None = None
    format: Any = None
    raw: bool | None = False
    images: OllamaImages | None = None
    keep_alive: float | str | None = None  # seconds, or a Go duration ("5m")
    think: Think | None = None
    # Named so that they are refused (generate, check_logprobs), not dropped unseen.
    suffix: str | None = None
    template: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ShowRequest(msgspec.Struct):
    """POST /api/show."""

    model: str = ""
    name: str = ""


ROLES = {"system", "user", "assistant", "tool"}


def to_options(o: OllamaOptions | None) -> Options:
    """Ollama's `options` as stella's; num_predict <= 0 means no limit."""
    if o is None:
        return Options()
    try:
        return options_from(
            _OLLAMA_PATHS,
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k,
            min_p=o.min_p,
            repetition_penalty=o.repeat_penalty,
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
            max_tokens=o.num_predict if o.num_predict and o.num_predict > 0 else None,
            stop=o.stop,
            seed=o.seed,
        )
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None


# Where each option sits in an Ollama request, for error messages.
_OLLAMA_PATHS = {
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "min_p": "options.min_p",
    "repetition_penalty": "options.repeat_penalty",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "max_tokens": "options.num_predict",
    "stop": "options.stop",
    "seed": "options.seed",
}


def think_error(body: bytes) -> InvalidRequest:
    """The 400 for a request body whose `think` Ollama refuses: the values it takes, and
    the one sent (msgspec's own words name neither the same way)."""
    try:
        # (Without the byte-order mark the body's decode ignored, see http.decode.)
        sent = msgspec.json.decode(body.removeprefix(b"\xef\xbb\xbf")).get("think")
    except (msgspec.DecodeError, AttributeError):
        sent = None
    shown = msgspec.json.encode(sent).decode()
    shown = shown if len(shown) <= 40 else shown[:40] + "…"
    effort = next(t for t in get_args(Think) if get_args(t))  # the Literal of efforts
    efforts = ", ".join(f'"{e}"' for e in get_args(effort))
    return InvalidRequest(
        f"$.think: expected true, false or an effort ({efforts}), got {shown}", param="think"
    )


def check_logprobs(logprobs: bool | None, top_logprobs: int | None) -> None:
    """Refuse log probabilities, as the OpenAI dialect does: no backend gives them, and
    an answer without them would read as one that has none to give."""
    if logprobs:
        raise InvalidRequest("$.logprobs: log probabilities are not supported", param="logprobs")
    if top_logprobs:  # 0 and null ask for none
        raise InvalidRequest(
            "$.top_logprobs: log probabilities are not supported", param="top_logprobs"
        )


def to_format(fmt: Any) -> dict[str, Any] | None:
    """Ollama's `format` (\"json\" or a JSON schema) as an OpenAI-style response_format."""
    # null and "" are Ollama's own "not set".
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    # Ollama refuses any other: dropped, the answer would come in no format asked for.
    shown = msgspec.json.encode(fmt).decode()
    shown = shown if len(shown) <= 40 else shown[:40] + "…"
    raise InvalidRequest(
        f'$.format: expected "json" or a JSON schema object, got {shown}', param="format"
    )


def to_messages(req: OllamaChat) -> list[Message]:
    """The chat's messages as stella's; 400 for unknown roles and bad images."""
    messages = []
    counter = Counter()
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"$.messages[{i}].role: {m.role!r} is not one of {sorted(ROLES)}")
        images = images_of(m.images, f"messages[{i}].images", counter, m.role)
        # A tool result's images past the request's cap: notes, as in every dialect.
        past = len(m.images or ()) - len(images or ())
        calls = (
            [
                ToolCallRef(
                    function=FunctionCall(name=c.function.name, arguments=c.function.arguments),
                    id=c.id or "",  # none: linked to its result by the tool's name
                )
                for c in m.tool_calls
            ]
            if m.tool_calls
            else None
        )
        messages.append(
            Message(
                role=m.role,  # type: ignore[arg-type]  # one of ROLES, checked above
                content=with_notes(m.content or "", [PAST_CAP_NOTE] * past)
                if past
                else m.content or "",
                tool_calls=calls,
                name=m.tool_name,
                tool_call_id=m.tool_call_id or None,
                images=images,
            )
        )
    return messages
