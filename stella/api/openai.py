"""The OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/models.

Requests decode into OpenAI-shaped structs and become one ChatRequest; the
pipeline's events go out as SSE `chat.completion.chunk`s ending in
`data: [DONE]`. Fields stella can't honour (n other than 1, logprobs, audio) get a 400
in OpenAI's error shape naming the parameter; other unknown fields are ignored,
as OpenAI-compatible servers do, so existing clients work unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api import shapes
from stella.api.http import (
    Dialect,
    DialectPick,
    JSONResponse,
    Reply,
    decode,
    endpoint,
    read_body,
    run_to_end,
    services,
    stream_response,
)
from stella.api.openai_request import (
    ChatCompletionRequest,
    CompletionRequest,
    check_completion,
    to_chat,
    to_metadata,
    to_options,
)
from stella.api.openapi import Operation, Schema, document, ref
from stella.backends import BackendHealth
from stella.core import Call, Inference
from stella.errors import Forbidden, InvalidRequest, ModelNotFound, StellaError, Unauthorized
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    Error,
    FunctionSpec,
    Message,
    Start,
    ToolCall,
    arguments_text,
)
from stella.streaming import Codec, json_text, one_line

try:
    import stella.api.anthropic as anthropic_dialect
except ModuleNotFoundError as exc:  # a build without that dialect (see app.DIALECTS)
    if exc.name != "stella.api.anthropic":
        raise
    anthropic_dialect = None  # type: ignore[assignment]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",  # a method the path does not take: the caller's fault
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}
# OpenAI's own words where it has them: its used-up quota is a 429 `insufficient_quota`
# (type and code alike), which clients tell from a rate limit's `rate_limit_exceeded`.
_CODES = {
    "unauthorized": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "quota_exceeded": "insufficient_quota",
}


class OpenAIDialect(Dialect):
    """Errors as {"error": {"message", "type", "param", "code"}}."""

    name = "openai"

    def error_body(self, exc: StellaError, request_id: str) -> Any:
        """OpenAI's error object."""
        return {
            "error": {
                "message": exc.message,
                "type": "insufficient_quota"
                if exc.code == "quota_exceeded"
                else _TYPES.get(exc.status, "server_error" if exc.status >= 500 else "api_error"),
                "param": exc.param or None,
                "code": _CODES.get(exc.code, exc.code),
            }
        }


OPENAI = OpenAIDialect()


class TextCompletionDialect(OpenAIDialect):
    """/v1/completions' errors: its prompt is the pipeline's one user message, so an
    error about `messages` names `prompt`, the parameter the request has."""

    def error_body(self, exc: StellaError, request_id: str) -> Any:
        """OpenAI's error object, `messages` named `prompt`."""
        body = super().error_body(exc, request_id)
        param = body["error"]["param"]
        if param is not None and (param == "messages" or param.startswith("messages[")):
            body["error"]["param"] = "prompt"
            path, colon, rest = exc.message.partition(":")
            if path.startswith("$.messages") and colon:
                body["error"]["message"] = "$.prompt:" + rest
        return body


OPENAI_TEXT = TextCompletionDialect()


def _models_dialect(scope: Mapping[str, Any]) -> Dialect:
    """Anthropic's as well as OpenAI's SDKs ask GET /v1/models; Anthropic's send
    anthropic-version with every call: they get that API's shapes, errors included."""
    if anthropic_dialect is not None:
        for name, _ in scope["headers"]:
            if name == b"anthropic-version":
                return anthropic_dialect.ANTHROPIC
    return OPENAI


# Paths whose errors (404, 405, draining) take this shape; the longest prefix wins.
# /v1/models (and /v1/models/{id}) is Anthropic's too, to a request that says so.
ERROR_PREFIXES: dict[str, Dialect | DialectPick] = {
    "/v1/": OPENAI,
    "/v1/models": _models_dialect,
}


_chat_req = msgspec.json.Decoder(ChatCompletionRequest)
_completion_req = msgspec.json.Decoder(CompletionRequest)
_enc = msgspec.json.Encoder()


def resolve_provider(
    request: Request, call: Call, chat: ChatRequest, provider: str | None
) -> ChatRequest:
    """`provider` names a configured backend: route to it (never to a URL)."""
    if not provider:
        return chat
    svc = services(request)
    if provider not in svc.backends:
        raise ModelNotFound(
            f"provider {provider!r} not found; known: {sorted(svc.backends)}", param="provider"
        )
    model = chat.model
    # Each route served by the provider, a balanced route's other backends too.
    on = [
        member
        for route in svc.router.routes.values()
        for member in route.pool or (route,)
        if member.backend_name == provider
    ]
    # A route's name or alias first, as the model without `provider` would pick; then
    # a route serving that upstream model.
    matches = [r for r in on if model is None or model == r.name or model in r.aliases]
    matches += [r for r in on if model is not None and model == r.upstream_model]
    if matches:
        allowed = call.principal.scope
        for route in matches:
            if allowed is None or allowed(route.name):
                if route.pool:  # a balanced route: the call starts on the provider named
                    call.pin = provider
                return msgspec.structs.replace(chat, model=route.name)
        # Only routes this key may not use. Refused here, by the name the client sent:
        # core would name the route, which this key's listings hide.
        what = f"model {model!r}" if model else f"the models of provider {provider!r}"
        raise Forbidden(f"this key may not use {what}")
    if not svc.settings.models.allow_direct:
        # Any upstream model by name is what models.allow_direct guards: routes only.
        raise ModelNotFound(
            f"model {chat.model!r} has no route on provider {provider!r} "
            "(models.allow_direct is off)",
            param="model",
        )
    call.backend = provider  # no route names this model: ask the backend for it directly
    return chat


# --- streaming -------------------------------------------------------------------------

FINISH = {"cancelled": "stop", "client_closed": "stop", "error": "stop"}


def refused(inference: Inference) -> bool:
    """Whether the answer is an upstream's refusal (OpenAI's `refusal` field) rather than
    text: one its content filter cut short is text, as far as it went."""
    ctx = inference.ctx
    return ctx is not None and ctx.refused


class ChunkCodec(Codec):
    """Events as chat.completion.chunk SSE lines (or text_completion chunks)."""

    media_type = "text/event-stream"
    shows_signatures = False  # no field for an upstream's signature

    def __init__(
        self, include_usage: bool, text: bool = False, refusal: Callable[[], bool] | None = None
    ) -> None:
        super().__init__()
        self.include_usage = include_usage
        self.text = text
        # Asked at each piece of text: the backend marks a refusal before it yields it.
        self.refusal = refusal
        self.refusing = False  # pieces went out as `delta.refusal`
        self.head = b""
        self.usage_head = b""  # the head of the last chunk, the one with the usage
        self.failed = False
        self.role_sent = text  # completions have no role chunk
        self.shows_reasoning = not text  # a text completion has no field for it

    def start(self, event: Start) -> bytes:
        """Nothing yet: the role chunk goes with the first event (its content is null
        before tool calls, as OpenAI sends it)."""
        obj = "text_completion" if self.text else "chat.completion.chunk"
        prefix = "cmpl-" if self.text else "chatcmpl-"
        head = (
            b'data: {"id":"'
            + (prefix + event.id).encode()
            + b'","object":"'
            + obj.encode()
            + b'","created":'
            + str(int(event.created)).encode()
            + b',"model":'
            + one_line(_enc.encode(event.model))
            + b","
        )
        self.head = head + b'"choices":'
        if self.include_usage:
            # OpenAI's chunks before the usage one carry "usage": null when it was asked
            # for (clients read the field on each): in the head, so no chunk costs more.
            self.usage_head = self.head
            self.head = head + b'"usage":null,"choices":'
        return b""

    def _role(self, kind: type) -> bytes:
        self.role_sent = True
        if self.refusing:  # as OpenAI opens a refusal
            delta = b'"content":null,"refusal":""'
        else:
            delta = b'"content":null' if kind is ToolCall else b'"content":""'
        return (
            self.head
            + b'[{"index":0,"delta":{"role":"assistant",'
            + delta
            + b'},"finish_reason":null}]}\n\n'
        )

    def encode(self, event: Any) -> bytes:
        """One SSE event per pipeline event (each `data:` JSON on one line)."""
        kind = type(event)
        if kind is Delta and self.refusal is not None and not self.refusing:
            self.refusing = self.refusal()
        if not self.role_sent and kind is not Error:
            return self._role(kind) + self._encode(event, kind)
        return self._encode(event, kind)

    def _encode(self, event: Any, kind: type) -> bytes:
        if kind is Done:
            reason = FINISH.get(event.finish_reason, event.finish_reason)
            if self.refusing and reason == "content_filter":
                # The refusal's pieces said what it is; OpenAI ends one with "stop".
                reason = "stop"
            if self.text:
                out = (
                    self.head
                    + b'[{"index":0,"text":"","logprobs":null,"finish_reason":"'
                    + reason.encode()
                    + b'"}]}\n\n'
                )
            else:
                out = (
                    self.head
                    + b'[{"index":0,"delta":{},"finish_reason":"'
                    + reason.encode()
                    + b'"}]}\n\n'
                )
            if self.include_usage:
                out += self.usage_head + b'[],"usage":' + _enc.encode(event.usage) + b"}\n\n"
            return out
        if kind is ToolCall:
            call = {
                "index": event.index,
                "id": event.id,
                "type": "function",
                "function": {
                    "name": event.name,
                    "arguments": arguments_text(event.arguments, event.raw_arguments),
                },
            }
            return (
                self.head
                + b'[{"index":0,"delta":{"tool_calls":['
                + one_line(_enc.encode(call))
                + b']},"finish_reason":null}]}\n\n'
            )
        if kind is Error:
            self.failed = True
            body = {"error": {"message": event.message, "type": "server_error", "code": event.code}}
            return b"data: " + one_line(_enc.encode(body)) + b"\n\n"
        if event.reasoning:
            return self._reasoning(event)
        if not event.text:
            return b""  # an upstream's signature of its thinking: no field for it
        if self.text:
            return (
                self.head
                + b'[{"index":0,"text":'
                + json_text(event.text)
                + b',"logprobs":null,"finish_reason":null}]}\n\n'
            )
        return (
            self.head
            + (
                b'[{"index":0,"delta":{"refusal":'
                if self.refusing
                else b'[{"index":0,"delta":{"content":'
            )
            + json_text(event.text)
            + b'},"finish_reason":null}]}\n\n'
        )

    def _reasoning(self, event: Delta) -> bytes:
        """A Delta with reasoning: a chunk of `reasoning_content` (as vLLM, DeepSeek and
        LiteLLM stream it; the SDKs keep a field they do not know), then one of the text
        that came after it, if any. A text completion has no field for it."""
        text = event.text
        out = b""
        if not self.text:
            out = (
                self.head
                + b'[{"index":0,"delta":{"reasoning_content":'
                + json_text(event.reasoning)
                + b'},"finish_reason":null}]}\n\n'
            )
        if text:
            out += self._encode(Delta(text=text), Delta)
        return out

    def ping(self) -> bytes:
        """An SSE comment."""
        return b": ping\n\n"

    def close(self) -> bytes:
        """The end marker (not after an error event)."""
        return b"" if self.failed else b"data: [DONE]\n\n"


# --- routes ---------------------------------------------------------------------------


async def _run(
    request: Request, call: Call, chat: ChatRequest, include_usage: bool, text: bool
) -> Reply:
    svc = services(request)
    inference = await svc.pipeline.prepare(chat, call)
    headers = inference.permit.headers
    if chat.stream:
        dialect = OPENAI_TEXT if text else OPENAI
        # A text completion has no field for a refusal: its text, finished content_filter.
        refusal = None if text else lambda: refused(inference)
        codec = ChunkCodec(include_usage, text, refusal)
        return stream_response(request, inference, codec, dialect)
    result = await run_to_end(request, inference)
    usage = result.usage  # encoded as it is: msgspec writes structs directly
    reason = FINISH.get(result.finish_reason, result.finish_reason)
    created = int(time.time())
    if text:
        return JSONResponse(
            {
                "id": "cmpl-" + result.id,
                "object": "text_completion",
                "created": created,
                "model": result.model,
                "usage": usage,
                "choices": [
                    {"index": 0, "text": result.response, "logprobs": None, "finish_reason": reason}
                ],
            },
            headers=headers,
        )
    # `refusal` always, null but for an upstream's refusal: the API sends it so and the
    # SDKs' types require it.
    message: dict[str, Any] = {"role": "assistant", "content": result.response, "refusal": None}
    if (
        reason == "content_filter"
        and result.response
        and not result.message.tool_calls
        and refused(inference)
    ):
        # As OpenAI gives one back, content null and finished "stop": the SDK's parse()
        # leaves `parsed` empty and says why in `refusal`.
        message["content"], message["refusal"] = None, result.response
        reason = "stop"
    if result.message.reasoning:
        # vLLM's, DeepSeek's and LiteLLM's field for it (the SDKs keep unknown fields).
        message["reasoning_content"] = result.message.reasoning
    if result.message.tool_calls:
        message["content"] = result.response or None
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": arguments_text(c.function.arguments, c.function.raw_arguments),
                },
            }
            for c in result.message.tool_calls
        ]
    return JSONResponse(
        {
            "id": "chatcmpl-" + result.id,
            "object": "chat.completion",
            "created": created,
            "model": result.model,
            "system_fingerprint": None,
            "usage": usage,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            ],
        },
        headers=headers,
    )


def _decode(body: bytes, decoder: msgspec.json.Decoder[Any]) -> Any:
    return decode(body, object, decoder)


@endpoint(OPENAI, inference=True)
async def chat_completions(request: Request, call: Call) -> Reply:
    """POST /v1/chat/completions."""
    body = await read_body(request, services(request).settings.server.max_body_bytes)
    req: ChatCompletionRequest = _decode(body, _chat_req)
    chat = resolve_provider(request, call, to_chat(req), req.provider)
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _run(request, call, chat, include, text=False)


@endpoint(OPENAI, inference=True)
async def chat_stream(request: Request, call: Call) -> Reply:
    """POST /v1/chat/stream: a chat completion that always streams (SSE)."""
    body = await read_body(request, services(request).settings.server.max_body_bytes)
    req: ChatCompletionRequest = _decode(body, _chat_req)
    chat = msgspec.structs.replace(
        resolve_provider(request, call, to_chat(req), req.provider), stream=True
    )
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _run(request, call, chat, include, text=False)


@endpoint(OPENAI_TEXT, inference=True)
async def completions(request: Request, call: Call) -> Reply:
    """POST /v1/completions: a prompt completed as the assistant's answer."""
    body = await read_body(request, services(request).settings.server.max_body_bytes)
    req: CompletionRequest = _decode(body, _completion_req)
    check_completion(req)
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise InvalidRequest("exactly one prompt per request is supported", param="prompt")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    chat = ChatRequest(
        messages=[Message(role="user", content=prompt)],
        model=req.model,
        stream=bool(req.stream),
        options=to_options(req),
        metadata=to_metadata(req),
    )
    chat = resolve_provider(request, call, chat, req.provider)
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _run(request, call, chat, include, text=True)


def _model_obj(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


@endpoint(OPENAI, pick=_models_dialect)
async def list_models(request: Request, call: Call) -> Response:
    """GET /v1/models: every route the key may use."""
    router = services(request).router
    routes = [r for r in router.routes.values() if call.principal.may_use(r.name)]
    if call.api == "anthropic":
        return JSONResponse(
            anthropic_dialect.model_page([r.name for r in routes], request.query_params)
        )
    data = [_model_obj(r.name, r.backend_name) for r in routes]
    return JSONResponse({"object": "list", "data": data})


@endpoint(OPENAI, pick=_models_dialect)
async def get_model(request: Request, call: Call) -> Response:
    """GET /v1/models/{id}."""
    router = services(request).router
    name = request.path_params["model"]
    # "" would resolve to the default
    try:
        route = router.resolve(name, call.principal.scope) if name else None
    except Forbidden:  # a route this key may not see: as if there were none
        route = None
    if route is None or route.name not in router.routes:
        raise ModelNotFound(f"model {name!r} not found")
    call.principal.check(route.name, hide=True, asked=name)  # as /v1/models leaves it out
    if call.api == "anthropic":
        return JSONResponse(anthropic_dialect.model_info(route.name))
    return JSONResponse(_model_obj(route.name, route.backend_name))


# /v1/health probes the upstreams for anyone without keys set, and for any key's holder
# with them: they are asked at most this often (in parallel), whatever the rate of calls.
HEALTH_TTL_S = 5.0


async def _backend_health(svc: Any) -> dict[str, BackendHealth]:
    """Each backend's health, probed at most every HEALTH_TTL_S."""
    async with svc.health_lock:
        cached = svc.health
        if cached is not None and time.monotonic() - cached[0] < HEALTH_TTL_S:
            return cached[1]
        names = list(svc.backends)
        results = await asyncio.gather(
            *(svc.backends[n].health() for n in names), return_exceptions=True
        )
        fresh = {
            # A plugin's probe that raises is that backend's answer, not the route's 500.
            n: r if isinstance(r, BackendHealth) else BackendHealth(False, type(r).__name__)
            for n, r in zip(names, results, strict=True)
        }
        svc.health = (time.monotonic(), fresh)
        return fresh


@endpoint(OPENAI, auth="none")
async def v1_health(request: Request, call: Call) -> Response:
    """GET /v1/health: the service and each provider (backend), no tokens spent."""
    svc = services(request)
    if svc.auth.enabled:
        try:
            svc.auth.authenticate(request.scope["headers"])
        except Unauthorized:
            # Anyone may call it; with keys set, only a key's holder sees the backends
            # (names, kinds, probe details, circuits), as the other public routes hide
            # them. Nor are the upstreams probed for an anonymous caller.
            return JSONResponse({"status": "ok"})
    providers = {}
    for name, health in (await _backend_health(svc)).items():
        providers[name] = {
            "kind": svc.backends[name].kind,
            "ok": health.ok,
            "detail": health.detail,
            "circuit": svc.router.breaker(name).now(),
        }
    return JSONResponse({"status": "ok", "providers": providers})


def _either(name: str, first: Schema, second: Schema) -> Schema:
    """OpenAI's shape, or (with anthropic-version) Anthropic's."""
    return Schema(name, {"anyOf": [ref(first), ref(second)]}, uses=(first, second))


if anthropic_dialect is None:
    _MODELS, _MODEL, _MODELS_ERROR = shapes.OPENAI_MODELS, shapes.OPENAI_MODEL, shapes.OPENAI_ERROR
    _MODELS_HEADERS: tuple[str, ...] = ()
    _MODELS_QUERY: tuple[tuple[str, str], ...] = ()
else:
    _MODELS = _either("OpenAIOrAnthropicModelList", shapes.OPENAI_MODELS, shapes.ANTHROPIC_MODELS)
    _MODEL = _either("OpenAIOrAnthropicModel", shapes.OPENAI_MODEL, shapes.ANTHROPIC_MODEL)
    _MODELS_ERROR = _either("OpenAIOrAnthropicError", shapes.OPENAI_ERROR, shapes.ANTHROPIC_ERROR)
    _MODELS_HEADERS = ("request-id",)
    _MODELS_QUERY = (
        ("limit", "with anthropic-version: models per page, 1 to 1000 (20)"),
        ("after_id", "with anthropic-version: the page right after this model"),
        ("before_id", "with anthropic-version: the page right before this model"),
    )

document(
    Operation(
        "post",
        "/v1/chat/completions",
        "OpenAI chat completions (SSE when stream)",
        tag="openai",
        request=ChatCompletionRequest,
        response=shapes.OPENAI_CHAT,
        stream="text/event-stream",
        stream_item=shapes.OPENAI_CHAT_EVENT,
        error=shapes.OPENAI_ERROR,
    ),
    Operation(
        "post",
        "/v1/chat/stream",
        "OpenAI chat completion, always streamed",
        tag="openai",
        request=ChatCompletionRequest,
        stream="text/event-stream",
        stream_item=shapes.OPENAI_CHAT_EVENT,
        error=shapes.OPENAI_ERROR,
    ),
    Operation(
        "post",
        "/v1/completions",
        "OpenAI text completions",
        tag="openai",
        request=CompletionRequest,
        response=shapes.OPENAI_COMPLETION,
        stream="text/event-stream",
        stream_item=shapes.OPENAI_TEXT_EVENT,
        error=shapes.OPENAI_ERROR,
    ),
    Operation(
        "get",
        "/v1/models",
        "OpenAI model list (Anthropic's, with an anthropic-version header)",
        tag="openai",
        response=_MODELS,
        errors=(400, 401) if _MODELS_QUERY else (401,),
        error=_MODELS_ERROR,
        headers=_MODELS_HEADERS,
        query=_MODELS_QUERY,
    ),
    Operation(
        "get",
        "/v1/models/{model}",
        "One OpenAI model (Anthropic's, with an anthropic-version header)",
        tag="openai",
        response=_MODEL,
        params=("model",),
        errors=(401, 404),
        error=_MODELS_ERROR,
        headers=_MODELS_HEADERS,
    ),
    Operation(
        "get",
        "/v1/health",
        "Service and provider health",
        tag="openai",
        response=shapes.OPENAI_HEALTH,
        public=True,
        errors=(),
        error=shapes.OPENAI_ERROR,
    ),
)

routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/chat/stream", chat_stream, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/health", v1_health, methods=["GET"]),
]

__all__ = ["OPENAI", "ChunkCodec", "FunctionSpec", "routes"]
