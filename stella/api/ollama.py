"""The Ollama dialect: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Streams are NDJSON with `done: false` lines and a last line carrying
`done_reason`, token counts and durations in nanoseconds; errors are
`{"error": "..."}`, before the stream with their status, after it as a last line.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella import __version__
from stella.api import shapes
from stella.api.http import (
    NO_STORE,
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
from stella.api.ollama_request import (
    OllamaChat,
    OllamaGenerate,
    ShowRequest,
    check_logprobs,
    images_of,
    think_error,
    to_format,
    to_messages,
    to_options,
)
from stella.api.openapi import Operation, document
from stella.core import MAX_MODEL_NAME, Call, Inference
from stella.errors import Forbidden, InvalidRequest, ModelNotFound, StellaError
from stella.images import Counter
from stella.protocol import (
    ChatRequest,
    Done,
    Error,
    Message,
    PromptTokensDetails,
    Start,
    ToolCall,
    tools_from,
)
from stella.routing import Router
from stella.streaming import Codec, one_line

# The Ollama API version this dialect follows, which is what Ollama's clients read from
# /api/version (stella's own version means nothing to them: VS Code's Copilot Chat refuses
# a server below 0.6.4, Open WebUI keeps the lowest of its servers'). The release whose
# docs/api.md, api/types.go and server/routes.go the dialect was last checked against.
OLLAMA_API_VERSION = "0.32.15"

_chat = msgspec.json.Decoder(OllamaChat)
_generate = msgspec.json.Decoder(OllamaGenerate)
_show = msgspec.json.Decoder(ShowRequest)
_enc = msgspec.json.Encoder()


class OllamaDialect(Dialect):
    """Errors as {"error": "text"}."""

    name = "ollama"

    def error_body(self, exc: StellaError, request_id: str) -> Any:
        """Ollama's error object."""
        return {"error": own_names(exc.message)}


OLLAMA = OllamaDialect()
# Paths whose errors (404, 405, draining) take this shape; the longest prefix wins
# (/api/v1/ is the native API's).
ERROR_PREFIXES = {"/api/": OLLAMA}


def own_names(message: str) -> str:
    """An error `message` with the internal request's field named as Ollama's client sent
    it (`response_format` is Ollama's `format`)."""
    if message.startswith("$.response_format"):
        return "$.format" + message[len("$.response_format") :]
    return message


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class OllamaCodec(Codec):
    """Events as Ollama NDJSON lines (`message` for chat, `response` for generate)."""

    shows_signatures = False  # no field for an upstream's signature

    def __init__(self, generate: bool, spell: Callable[[str], str] = str) -> None:
        super().__init__()
        self.generate = generate
        self.spell = spell  # the route's name as the client spelled it (see answer_name)
        self.model = b'""'
        self.start_ns = time.perf_counter_ns()
        self.inference: Inference | None = None  # set once admitted (its load_ms)

    def start(self, event: Start) -> bytes:
        """Nothing yet: Ollama's first line carries the first text (headers go at once)."""
        self.model = _enc.encode(self.spell(event.model))
        return b""

    def _line(self, text: str, extra: bytes = b"") -> bytes:
        body = (
            b'"response":' + _enc.encode(text)
            if self.generate
            else b'"message":{"role":"assistant","content":' + _enc.encode(text) + extra + b"}"
        )
        return (
            b'{"model":'
            + self.model
            + b',"created_at":"'
            + _now().encode()
            + b'",'
            + body
            + b',"done":false}\n'
        )

    def encode(self, event: Any) -> bytes:
        """One line per event."""
        return one_line(self._encode(event))

    def _encode(self, event: Any) -> bytes:
        kind = type(event)
        if kind is Done:
            ctx = self.inference.ctx if self.inference is not None else None
            load = ctx.load_ms if ctx is not None else None
            return _enc.encode(final(event, self.model, self.generate, self.start_ns, load)) + b"\n"
        if kind is ToolCall:
            call = tool_call(event.index, event.id, event.name, event.arguments)
            return self._line("", b',"tool_calls":' + _enc.encode([call]))
        if kind is Error:
            return _enc.encode({"error": own_names(event.message)}) + b"\n"
        if event.reasoning:
            return self._thinking(event.text, event.reasoning)
        if not event.text:
            return b""  # an upstream's signature of its thinking: no field for it
        return self._line(event.text)

    def _thinking(self, text: str, thinking: str) -> bytes:
        """A line with the model's reasoning, where Ollama puts it: `message.thinking` in a
        chat, `thinking` beside `response` in a generate."""
        field = b',"thinking":' + _enc.encode(thinking)
        if not self.generate:
            return self._line(text, field)
        return (
            b'{"model":'
            + self.model
            + b',"created_at":"'
            + _now().encode()
            + b'","response":'
            + _enc.encode(text)
            + field
            + b',"done":false}\n'
        )

    def ping(self) -> bytes:
        """An empty piece of text keeps the connection alive; clients just append ''."""
        return self._line("")


def tool_call(index: int, call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A call as Ollama writes it: its id, which the client's result names it by (Ollama
    0.12.10 and later), and its place among the answer's calls."""
    function = {"index": index, "name": name, "arguments": arguments}
    return {"id": call_id, "function": function} if call_id else {"function": function}


def final(
    done: Done, model: bytes | str, generate: bool, start_ns: int, load_ms: float | None = None
) -> dict[str, Any]:
    """The last line's fields (also the body of a non-stream answer, minus the text)."""
    t = done.timings
    total_ns = time.perf_counter_ns() - start_ns
    load_ns = int((load_ms or 0) * 1e6)  # the model's load, when this call waited for it
    first_ns = int((t.ttft_ms or 0) * 1e6)
    # Ollama's prompt_eval_duration is the prompt's processing alone: the first token's
    # time less the load and the wait behind other calls (clients divide counts by it).
    prompt_ns = max(0, first_ns - load_ns - int(t.queue_ms * 1e6))
    out: dict[str, Any] = {
        "model": model.decode().strip('"') if isinstance(model, bytes) else model,
        "created_at": _now(),
        "done": True,
        "done_reason": "length" if done.finish_reason == "length" else "stop",
        "total_duration": total_ns,
        "load_duration": load_ns,
        "prompt_eval_count": done.usage.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": done.usage.completion_tokens,
        "eval_duration": max(0, total_ns - first_ns),
    }
    details = done.usage.prompt_tokens_details
    if isinstance(details, PromptTokensDetails):  # as newer Ollama says it; else left out
        out["prompt_eval_cached_count"] = details.cached_tokens
    if generate:
        out["response"] = ""
    else:
        out["message"] = {"role": "assistant", "content": ""}
    return out


async def _run(
    request: Request, call: Call, chat: ChatRequest, generate: bool, asked: str
) -> Reply:
    svc = services(request)
    spell = answer_name(svc.router, asked)
    codec = OllamaCodec(generate, spell)
    inference = codec.inference = await svc.pipeline.prepare(chat, call)
    if chat.stream:
        return stream_response(request, inference, codec, OLLAMA)
    result = await run_to_end(request, inference)
    done = Done(finish_reason=result.finish_reason, usage=result.usage, timings=result.timings)
    load = inference.ctx.load_ms if inference.ctx is not None else None
    body = final(done, spell(result.model), generate, codec.start_ns, load)
    thinking = result.message.reasoning
    if generate:
        body["response"] = result.response
        if thinking:
            body["thinking"] = thinking
    else:
        message: dict[str, Any] = {"role": "assistant", "content": result.response}
        if thinking:
            message["thinking"] = thinking
        if result.message.tool_calls:
            message["tool_calls"] = [
                tool_call(i, c.id, c.function.name, c.function.arguments)
                for i, c in enumerate(result.message.tool_calls)
            ]
        body["message"] = message
    return JSONResponse(body, headers=inference.permit.headers)


def model_name(request: Request, name: str | None) -> str | None:
    """`name` as routed: Ollama's clients say `llama3:latest` for `llama3`."""
    if name and name.endswith(":latest"):
        router = services(request).router
        if not router.knows(name):
            return name[: -len(":latest")]
    return name


def listed_name(router: Router, name: str) -> str:
    """A route's name as /api/tags and /api/ps list it: `<name>:latest` for a name with
    no tag, as Ollama lists every model (`llama3.2:latest`); its clients (Open WebUI)
    complete a bare name with `:latest` and look that up in the list."""
    if ":" in name:
        return name
    tagged = name + ":latest"
    # Another route or alias called that: the listing would name it, not this route.
    return name if router.knows(tagged) else tagged


def answer_name(router: Router, asked: str | None) -> Callable[[str], str]:
    """How an answer names the route that answered, as Ollama echoes the request's model:
    a name the client tagged `:latest` (the one /api/tags lists) comes back tagged; a
    bare name, a tag of the route's own or an alias as the route's name."""
    if asked and asked.endswith(":latest") and not router.knows(asked):
        return lambda name: listed_name(router, name)
    return str


def _decode(body: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    try:
        return decode(body, object, decoder)
    except InvalidRequest as exc:
        if exc.param == "think":
            raise think_error(body) from None
        raise


@endpoint(OLLAMA, inference=True)
async def chat(request: Request, call: Call) -> Reply:
    """POST /api/chat."""
    req: OllamaChat = _decode(
        await read_body(request, services(request).settings.server.max_body_bytes), _chat
    )
    check_keep_alive(req.keep_alive)
    check_logprobs(req.logprobs, req.top_logprobs)
    messages = to_messages(req)
    if not messages:
        name, reason = await _load(request, call, req.model, req.keep_alive)
        return JSONResponse(
            {
                "model": answer_name(services(request).router, req.model)(name),
                "created_at": _now(),
                "done": True,
                "done_reason": reason,
                "message": {"role": "assistant", "content": ""},
            }
        )
    chat_req = ChatRequest(
        messages=messages,
        model=model_name(request, req.model),
        stream=req.stream is not False,
        options=to_options(req.options),
        tools=tools_from(req.tools),
        response_format=to_format(req.format),
        think=req.think,
    )
    return await _run(request, call, chat_req, generate=False, asked=req.model)


async def _load(request: Request, call: Call, model: str, keep_alive: Any) -> tuple[str, str]:
    """An empty chat or generate, as Ollama reads it: load the model, or with
    `keep_alive` 0 unload it (the in-process engine its weights, an Ollama upstream its
    own; a backend that holds no model has none to load or free). The route's name and
    the done_reason."""
    asked = model_name(request, model)
    principal = call.principal
    router = services(request).router
    if _is_zero(keep_alive):
        # Every key's next request would wait for the weights again: an operator's call.
        if not principal.admin:
            raise Forbidden("unloading a model needs an admin key")
        # An admin key administers every route, as it switches or removes any: it unloads
        # a model it may not chat with (an admin-only key has `models = []`).
        route = router.resolve(asked)
        # Nothing to free (not loaded, or a backend holding no model) is still "unload",
        # as Ollama answers one of a model it has not loaded; a failure raises.
        await route.backend.unload(route.upstream_model)
        return route.name, "unload"
    route = router.resolve(asked, principal.scope)
    principal.check(route.name, asked=asked)
    await route.backend.load(route.upstream_model)
    return route.name, "load"


def _is_zero(keep_alive: Any) -> bool:
    """Whether Ollama's keep_alive (seconds, or a Go duration such as "0s", "5m", "0m0s")
    is 0."""
    if isinstance(keep_alive, bool) or keep_alive is None:
        return False
    if isinstance(keep_alive, int | float):
        return keep_alive == 0
    if isinstance(keep_alive, str):
        text = keep_alive.strip().lstrip("+-")
        if _DURATION.fullmatch(text):  # every part's number is 0: the sum is 0
            return all(float(n) == 0 for n, _ in _DURATION_PART.findall(text))
        try:
            return float(text) == 0  # a bare number, as a lenient reading of seconds
        except ValueError:
            return False
    return False


def check_keep_alive(keep_alive: float | str | None) -> None:
    """Refuse a keep_alive string that is neither a Go duration nor a number (Ollama's
    decoder fails on it: 400); a bare number ("-1") is read as seconds, more leniently
    than Ollama, which wants a unit: a client's value is only looked at for an unload."""
    if not isinstance(keep_alive, str):
        return
    text = keep_alive.strip().lstrip("+-")
    if _DURATION.fullmatch(text):
        return
    try:
        float(text)  # a bare number, read leniently as seconds
    except ValueError:
        raise InvalidRequest(
            f'$.keep_alive: {keep_alive[:40]!r} is not a duration (e.g. "5m", "30s", 0)',
            param="keep_alive",
        ) from None


# Go's time.ParseDuration: one or more <number><unit>.
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION = re.compile(r"(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")


def _check_insert(req: OllamaGenerate) -> None:
    """Refuse a suffix (fill-in-the-middle) and a request's own template: either would be
    dropped, and the answer would be an ordinary completion of the prompt. Checked
    before an empty prompt reads as a load: a suffix with no prompt is an insert too."""
    if req.suffix:  # "" is none (the official client sends it so)
        # Ollama refuses it for a model without the insert capability; no backend here has
        # it: each reads the prompt through the model's chat template.
        raise InvalidRequest(
            "$.suffix: fill-in-the-middle is not supported: the prompt is always read "
            "through the model's chat template, which has no place for a suffix; send the "
            "prompt without one",
            param="suffix",
        )
    if req.template:
        raise InvalidRequest(
            "$.template: a request's own template is not supported: the prompt is always "
            "read through the model's chat template; send it without template",
            param="template",
        )


@endpoint(OLLAMA, inference=True)
async def generate(request: Request, call: Call) -> Reply:
    """POST /api/generate."""
    req: OllamaGenerate = _decode(
        await read_body(request, services(request).settings.server.max_body_bytes), _generate
    )
    images = images_of(req.images, "images", Counter())
    check_keep_alive(req.keep_alive)
    check_logprobs(req.logprobs, req.top_logprobs)
    _check_insert(req)
    if not req.prompt and not images:  # with an image, a question about it
        name, reason = await _load(request, call, req.model, req.keep_alive)
        return JSONResponse(
            {
                "model": answer_name(services(request).router, req.model)(name),
                "created_at": _now(),
                "response": "",
                "done": True,
                "done_reason": reason,
            }
        )
    if req.raw:
        # A raw prompt is the model's whole input, template tokens and all; stella's
        # request is a list of messages that each backend renders with its chat template
        # (or an upstream's chat API does), so the prompt would be templated all the same.
        raise InvalidRequest(
            "$.raw: raw prompts are not supported: the prompt is always read through the "
            "model's chat template; send it without raw",
            param="raw",
        )
    messages = [Message(role="user", content=req.prompt or "", images=images)]
    if req.system:
        messages.insert(0, Message(role="system", content=req.system))
    chat_req = ChatRequest(
        messages=messages,
        model=model_name(request, req.model),
        stream=req.stream is not False,
        options=to_options(req.options),
        response_format=to_format(req.format),
        think=req.think,
    )
    return await _run(request, call, chat_req, generate=True, asked=req.model)


def _model_entry(router: Router, route: Any) -> dict[str, Any]:
    name = listed_name(router, route.name)
    return {
        "name": name,
        "model": name,
        "modified_at": "1970-01-01T00:00:00Z",
        "size": route.backend.memory_bytes(route.upstream_model) or 0,
        "digest": "",
        "details": details(route.backend.kind),
    }


def details(kind: str) -> dict[str, Any]:
    """Ollama's ModelDetails, every field of it, as Ollama always sends them (clients
    read `details.families.join(...)` unguarded); the family is the backend's kind."""
    return {
        "parent_model": "",
        "format": kind,
        "family": kind,
        "families": [kind],
        "parameter_size": "",
        "quantization_level": "",
    }


@endpoint(OLLAMA)
async def tags(request: Request, call: Call) -> Response:
    """GET /api/tags: routable models."""
    router = services(request).router
    models = [
        _model_entry(router, r) for r in router.routes.values() if call.principal.may_use(r.name)
    ]
    return JSONResponse({"models": models})


# Go's zero time, which Ollama's clients parse: the backend does not say when (a remote
# engine unloads by its own rules; echo holds nothing).
UNKNOWN_EXPIRY = "0001-01-01T00:00:00Z"
# Ollama's "never" (a negative keep_alive) is now plus Go's longest duration (~292 years).
_FOREVER_S = (2**63 - 1) / 1e9


def expiry(at: float | None) -> str:
    """/api/ps's expires_at for a backend's expires_at (Unix time; math.inf: never)."""
    if at is None:
        return UNKNOWN_EXPIRY
    # A keep-alive too long for a date (past year 9999, a `keep_alive_s = 1e12` meant as
    # forever) is never, as Ollama writes it, not a 500.
    at = min(at, time.time() + _FOREVER_S)
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


@endpoint(OLLAMA)
async def ps(request: Request, call: Call) -> Response:
    """GET /api/ps: loaded models."""
    router = services(request).router
    routes = [
        r
        for r in router.routes.values()
        if r.backend.loaded(r.upstream_model) and call.principal.may_use(r.name)
    ]
    # Asked together: a backend may ask its upstream (each within a few seconds).
    contexts = await asyncio.gather(*(r.backend.context_length(r.upstream_model) for r in routes))
    out = []
    for r, context in zip(routes, contexts, strict=True):
        entry = _model_entry(router, r)
        entry["size_vram"] = 0
        entry["expires_at"] = expiry(r.backend.expires_at(r.upstream_model))
        if context:  # as Ollama's own: the window the model runs with; unknown: left out
            entry["context_length"] = context
        out.append(entry)
    return JSONResponse({"models": out})


@endpoint(OLLAMA)
async def show(request: Request, call: Call) -> Response:
    """POST /api/show: one model's details."""
    req: ShowRequest = _decode(await read_body(request, 65536), _show)
    router = services(request).router
    name = model_name(request, req.model or req.name)
    if not name:
        raise InvalidRequest("$.model: required")
    if len(name) > MAX_MODEL_NAME:  # as a chat's model: not quoted back whole
        raise InvalidRequest(f"$.model: over {MAX_MODEL_NAME} characters", param="model")
    try:
        route = router.resolve(name, call.principal.scope)
    except Forbidden:  # a route this key may not see: as if there were none
        raise ModelNotFound(f"model {name!r} not found") from None
    if route.name not in router.routes:
        raise ModelNotFound(f"model {name!r} not found")
    call.principal.check(route.name, hide=True, asked=name)  # as /api/tags leaves it out
    backend = route.backend
    info: dict[str, Any] = {
        # Ollama's clients read "<general.architecture>.context_length"; the family is
        # the backend's kind, as in `details`.
        "general.architecture": backend.kind,
        "stella.backend": route.backend_name,
        "stella.upstream_model": route.upstream_model,
    }
    context = await backend.context_length(route.upstream_model)
    if context:  # unknown: left out, as no length is claimed
        info[f"{backend.kind}.context_length"] = context
    return JSONResponse(
        {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": details(backend.kind),
            "model_info": info,
            "capabilities": capabilities(router.capabilities(route, call.principal.scope)),
            "modified_at": "1970-01-01T00:00:00Z",
        }
    )


# stella's capability words as Ollama's /api/show names them (Open WebUI and editors'
# Ollama providers offer image attachments for a model whose list has `vision`; Ollama
# says `embedding` of a model /api/embed serves).
_OLLAMA_CAPABILITY = {"tools": "tools", "images": "vision", "embeddings": "embedding"}


def capabilities(caps: list[str]) -> list[str]:
    """A model's capabilities in Ollama's words: `completion` first, as Ollama lists them."""
    return ["completion", *(_OLLAMA_CAPABILITY[c] for c in caps if c in _OLLAMA_CAPABILITY)]


async def version(request: Request) -> Response:
    """GET /api/version: the Ollama API version the dialect follows, and stella's own."""
    # Ollama's clients read `version` alone (ollama-js types it as {version}; ollama-python
    # does not ask), so stella's own version rides along in a field of its own.
    return JSONResponse(
        {"version": OLLAMA_API_VERSION, "stella_version": __version__},
        headers=[NO_STORE],  # as every GET of the API (see Endpoint)
    )


document(
    Operation(
        "post",
        "/api/chat",
        "Ollama chat (NDJSON stream by default)",
        tag="ollama",
        request=OllamaChat,
        response=shapes.OLLAMA_CHAT,
        stream="application/x-ndjson",
        stream_item=shapes.OLLAMA_CHAT_LINE,
        error=shapes.OLLAMA_ERROR,
    ),
    Operation(
        "post",
        "/api/generate",
        "Ollama generate",
        tag="ollama",
        request=OllamaGenerate,
        response=shapes.OLLAMA_GENERATE,
        stream="application/x-ndjson",
        stream_item=shapes.OLLAMA_GENERATE_LINE,
        error=shapes.OLLAMA_ERROR,
    ),
    Operation(
        "get",
        "/api/tags",
        "Ollama model list",
        tag="ollama",
        response=shapes.OLLAMA_TAGS,
        errors=(401,),
        error=shapes.OLLAMA_ERROR,
    ),
    Operation(
        "get",
        "/api/ps",
        "Ollama loaded models",
        tag="ollama",
        response=shapes.OLLAMA_PS,
        errors=(401,),
        error=shapes.OLLAMA_ERROR,
    ),
    Operation(
        "post",
        "/api/show",
        "Ollama model details",
        tag="ollama",
        request=ShowRequest,
        response=shapes.OLLAMA_SHOW,
        errors=(400, 401, 404),
        error=shapes.OLLAMA_ERROR,
    ),
    Operation(
        "get",
        "/api/version",
        "Ollama-compatible version",
        tag="ollama",
        response=shapes.OLLAMA_VERSION,
        public=True,
        errors=(),
        error=shapes.OLLAMA_ERROR,
    ),
)

routes = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version, methods=["GET"]),
]
