"""Request shapes of common self-hosted LLM services, as thin aliases onto the pipeline.

Each shape keeps its own paths and field names so an existing client or script
works unchanged; everything behind it (auth, limits, routing, the inference
log) is stella's. The `api` field of the inference log names the shape.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api import shapes
from stella.api.http import (
    Dialect,
    JSONResponse,
    Reply,
    endpoint,
    names_shown,
    read_json,
    run_to_end,
    services,
    stream_response,
)
from stella.api.native import NDJSON, model_infos, read_generate, respond
from stella.api.ollama_request import Images, check_images
from stella.api.openapi import Operation, document
from stella.core import Call
from stella.errors import StellaError
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    Error,
    MaxTokens,
    Message,
    Options,
    Start,
    Temperature,
)
from stella.streaming import Codec, json_text, one_line

_enc = msgspec.json.Encoder()


class SimpleDialect(Dialect):
    """Errors as {"error": "text", "code": "..."} for the simple shapes."""

    def __init__(self, name: str) -> None:
        self.name = name

    def error_body(self, exc: StellaError, request_id: str) -> Any:
        """A flat error object."""
        return {"error": exc.message, "code": exc.code, "request_id": request_id}


INVOKE = SimpleDialect("invoke")
SIMPLE = SimpleDialect("simple")
# Paths whose 404/405/draining errors take these shapes (longer than the Ollama /api/);
# /generate's too, so that every answer of a route has the one shape it documents.
ERROR_PREFIXES = {"/api/chat/invoke": INVOKE, "/api/llm/": SIMPLE, "/generate": SIMPLE}
LLM = SimpleDialect("llm")


class InputData(msgspec.Struct):
    """`input_data` of an invoke call."""

    input: str
    system: str | None = None
    # Some clients send Ollama's images here too: refused, not ignored.
    images: Images | None = None


class InvokeRequest(msgspec.Struct):
    """POST /api/chat/invoke."""

    input_data: InputData
    model: str | None = None
    options: Options = msgspec.field(default_factory=Options)
    images: Images | None = None  # beside input_data too: refused, not ignored


class PromptRequest(msgspec.Struct):
    """POST /generate and /api/llm/generate|stream: a prompt, optionally a model."""

    prompt: str
    model: str | None = None
    system: str | None = None
    stream: bool = False
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    options: Options | None = None
    images: Images | None = None  # as on InputData: refused, not ignored


_invoke = msgspec.json.Decoder(InvokeRequest)
_prompt = msgspec.json.Decoder(PromptRequest)


def _chat_from_prompt(req: PromptRequest, stream: bool) -> ChatRequest:
    check_images(req.images, "images")
    options = req.options or Options()
    if req.max_tokens is not None or req.temperature is not None:
        options = msgspec.structs.replace(
            options,
            max_tokens=req.max_tokens if req.max_tokens is not None else options.max_tokens,
            temperature=req.temperature if req.temperature is not None else options.temperature,
        )
    messages = [Message(role="user", content=req.prompt)]
    if req.system:
        messages.insert(0, Message(role="system", content=req.system))
    return ChatRequest(messages=messages, model=req.model, stream=stream, options=options)


async def _answer(request: Request, call: Call, chat: ChatRequest) -> Any:
    svc = services(request)
    inference = await svc.pipeline.prepare(chat, call)
    return await run_to_end(request, inference), inference.permit.headers


# 1. {"input_data": {"input": "..."}} -> {"output": "..."}


@endpoint(INVOKE, inference=True)
async def invoke(request: Request, call: Call) -> Response:
    """POST /api/chat/invoke."""
    req: InvokeRequest = await read_json(request, _invoke)
    check_images(req.images, "images")
    check_images(req.input_data.images, "input_data.images")
    messages = [Message(role="user", content=req.input_data.input)]
    if req.input_data.system:
        messages.insert(0, Message(role="system", content=req.input_data.system))
    result, headers = await _answer(
        request,
        call,
        ChatRequest(messages=messages, model=req.model, stream=False, options=req.options),
    )
    return JSONResponse(
        {
            "output": result.response,
            "metadata": {
                "model": result.model,
                "request_id": result.id,
                "usage": msgspec.to_builtins(result.usage),
            },
        },
        headers=headers,
    )


# 2. /api/v1/generate {"prompt","stream"}: SSE `data: {"response": ...}` ... `data: {}`


class ResponseSseCodec(Codec):
    """`data: {"response": "..."}` per piece of text, `data: {}` at the end."""

    media_type = "text/event-stream"
    shows_reasoning = shows_signatures = False  # no field for them

    def start(self, event: Start) -> bytes:
        """A comment, so the first byte goes at once."""
        return b": stream " + event.id.encode() + b"\n\n"

    def encode(self, event: Any) -> bytes:
        """Text pieces and the end marker (each `data:` JSON on one line)."""
        kind = type(event)
        if kind is Delta:
            if not event.text:
                return b""  # reasoning alone: these shapes have no field for it
            return b'data: {"response":' + json_text(event.text) + b"}\n\n"
        if kind is Done:
            return b"data: {}\n\n"
        if kind is Error:
            body = _enc.encode({"error": event.message, "code": event.code})
            return b"data: " + one_line(body) + b"\n\n"
        return b""

    def ping(self) -> bytes:
        """An SSE comment."""
        return b": ping\n\n"


@endpoint(inference=True)
async def generate_v1(request: Request, call: Call) -> Reply:
    """POST /api/v1/generate: native NDJSON/JSON, or SSE `response` events when asked for."""
    svc = services(request)
    chat = (await read_generate(request)).to_chat()
    reply: Reply
    if chat.stream and prefers_sse(request.headers.get("accept", "")):
        call.api = "simple"
        inference = await svc.pipeline.prepare(chat, call)
        reply = stream_response(request, inference, ResponseSseCodec())
    else:
        reply = await respond(request, call, chat)
    reply.raw_headers.append(_VARY_ACCEPT)  # a cache must not give one form for the other
    return reply


_VARY_ACCEPT = (b"vary", b"Accept")
# How specific each media range is for the two forms (RFC 9110 12.5.1: a type's weight is
# that of the most specific range that matches it): (SSE's, NDJSON's), -1 for no match.
_SPECIFIC = {
    "text/event-stream": (2, -1),
    "text/*": (1, -1),
    "application/x-ndjson": (-1, 2),
    "application/*": (-1, 1),
    "*/*": (0, 0),
}


def prefers_sse(accept: str) -> bool:
    """Whether an Accept header weighs SSE above NDJSON, or at the same weight names it
    more specifically (`text/event-stream, */*`); a tie keeps NDJSON, the default: no
    header, `*/*`, both named alike, or neither acceptable."""
    if "," not in accept and ";" not in accept:  # one range, unweighted: no parsing
        return accept.strip().lower() in ("text/event-stream", "text/*")
    sse = ndjson = (-1, 0.0)  # (how specific the range that matched is, its weight)
    for item in accept.lower().split(","):
        kind, *params = item.split(";")
        rank = _SPECIFIC.get(kind.strip())
        if rank is None:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = math.nan
        if not 0.0 <= weight <= 1.0:
            continue  # no weight RFC 9110 12.4.2 allows: the range says nothing
        if rank[0] > sse[0]:
            sse = (rank[0], weight)
        if rank[1] > ndjson[0]:
            ndjson = (rank[1], weight)
    if sse[1] != ndjson[1]:
        return sse[1] > ndjson[1]
    # The same weight: the form the client named more specifically, as a client that lists
    # text/event-stream and then */* (for its errors' JSON) asks for SSE.
    return sse[1] > 0 and sse[0] > ndjson[0]


# 4. POST /generate {"prompt"} -> {"response"}


@endpoint(SIMPLE, inference=True)
async def generate_plain(request: Request, call: Call) -> Response:
    """POST /generate."""
    req: PromptRequest = await read_json(request, _prompt)
    result, headers = await _answer(request, call, _chat_from_prompt(req, False))
    return JSONResponse(
        {
            "response": result.response,
            "model": result.model,
            "usage": msgspec.to_builtins(result.usage),
        },
        headers=headers,
    )


# 5. /api/llm/*


@endpoint(LLM, auth="none")
async def llm_health(request: Request, call: Call) -> Response:
    """GET /api/llm/health: no backend is touched."""
    router = services(request).router
    route = router.resolve(None)
    named = names_shown(request)  # with keys, a public route names no model
    return JSONResponse(
        {
            "status": "ok",
            "model": route.name if named else None,
            "backend": route.backend_name if named else None,
            "loaded": route.backend.loaded(route.upstream_model),
        }
    )


@endpoint(LLM)
async def llm_models(request: Request, call: Call) -> Response:
    """GET /api/llm/models."""
    listing = await model_infos(request, call)
    return JSONResponse({"models": [m.name for m in listing.models], "default": listing.default})


@endpoint(LLM, inference=True)
async def llm_generate(request: Request, call: Call) -> Response:
    """POST /api/llm/generate -> {"response"}."""
    req: PromptRequest = await read_json(request, _prompt)
    result, headers = await _answer(request, call, _chat_from_prompt(req, False))
    return JSONResponse(
        {
            "response": result.response,
            "model": result.model,
            "finish_reason": result.finish_reason,
            "usage": msgspec.to_builtins(result.usage),
        },
        headers=headers,
    )


@endpoint(LLM, inference=True)
async def llm_stream(request: Request, call: Call) -> Reply:
    """POST /api/llm/stream: the native NDJSON stream."""
    svc = services(request)
    req: PromptRequest = await read_json(request, _prompt)
    inference = await svc.pipeline.prepare(_chat_from_prompt(req, True), call)
    return stream_response(request, inference, NDJSON)


document(
    Operation(
        "post",
        "/api/chat/invoke",
        "Invoke shape: input_data.input -> output",
        tag="aliases",
        request=InvokeRequest,
        response=shapes.INVOKE_RESPONSE,
        error=shapes.FLAT_ERROR,
    ),
    Operation(
        "post",
        "/generate",
        "Prompt -> response",
        tag="aliases",
        request=PromptRequest,
        response=shapes.PROMPT_RESPONSE,
        error=shapes.FLAT_ERROR,
    ),
    Operation(
        "get",
        "/api/llm/health",
        "Health of the default model's backend",
        tag="aliases",
        response=shapes.LLM_HEALTH,
        public=True,
        errors=(),
        error=shapes.FLAT_ERROR,
    ),
    Operation(
        "get",
        "/api/llm/models",
        "Model names",
        tag="aliases",
        response=shapes.LLM_MODELS,
        errors=(401,),
        error=shapes.FLAT_ERROR,
    ),
    Operation(
        "post",
        "/api/llm/generate",
        "Prompt -> response",
        tag="aliases",
        request=PromptRequest,
        response=shapes.LLM_RESPONSE,
        error=shapes.FLAT_ERROR,
    ),
    Operation(
        "post",
        "/api/llm/stream",
        "Prompt -> NDJSON stream",
        tag="aliases",
        request=PromptRequest,
        stream="application/x-ndjson",  # the native stream: StreamEvent lines
        error=shapes.FLAT_ERROR,
    ),
)

routes = [
    Route("/api/chat/invoke", invoke, methods=["POST"]),
    Route("/api/v1/generate", generate_v1, methods=["POST"]),
    Route("/generate", generate_plain, methods=["POST"]),
    Route("/api/llm/health", llm_health, methods=["GET"]),
    Route("/api/llm/models", llm_models, methods=["GET"]),
    Route("/api/llm/generate", llm_generate, methods=["POST"]),
    Route("/api/llm/stream", llm_stream, methods=["POST"]),
]
