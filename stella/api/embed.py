"""Embeddings in three dialects: POST /api/v1/embed (native), /v1/embeddings (OpenAI),
/api/embed and the legacy /api/embeddings (Ollama).

Each decodes its body into the one EmbedRequest, runs it through the pipeline as a chat
runs (key scope, rate limits, slots, time limits, retries, the circuit, one `inference`
event with `op: "embed"`) and writes the vectors in its API's shape. An embed call has no
fallback: another model's vectors are of another space.
"""

from __future__ import annotations

import base64
import sys
import time
from array import array
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api.http import (
    JSONResponse,
    answer_of,
    endpoint,
    read_json,
    services,
)
from stella.api.ollama import OLLAMA, answer_name, check_keep_alive, model_name
from stella.api.openai import OPENAI
from stella.api.openai_request import MAX_USER_CHARS, check_user
from stella.api.openapi import Operation, document
from stella.api.shapes import OLLAMA_ERROR, OPENAI_ERROR
from stella.core import Call, EmbedInference
from stella.errors import InvalidRequest
from stella.protocol import (
    MAX_EMBED_CHARS,
    MAX_EMBED_DIMENSIONS,
    MAX_EMBED_INPUTS,
    Dimensions,
    EmbedRequest,
    EmbedResponse,
    EmbedResult,
    EmbedUsage,
)

_native = msgspec.json.Decoder(EmbedRequest)


async def _run(
    request: Request, call: Call, embed: EmbedRequest, metadata: dict[str, Any] | None = None
) -> tuple[EmbedInference, EmbedResult]:
    """Admit and run an embed call to its end: the inference and its vectors."""
    inference = await services(request).pipeline.prepare_embed(embed, call, metadata)
    return inference, await answer_of(request, inference, inference.embeddings)


def texts_of(value: Any, field: str = "input") -> list[str]:
    """A dialect's input (a string, or a list of strings) as the texts to embed, each
    checked as the native `input` is; a 400 naming the element at fault."""
    if isinstance(value, str):
        _check_text(value, field)
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest(f"$.{field}: expected a string or a list of strings", param=field)
    if not value:
        raise InvalidRequest(f"$.{field}: must hold at least one text", param=field)
    if len(value) > MAX_EMBED_INPUTS:
        raise InvalidRequest(
            f"$.{field}: {len(value)} inputs, over {MAX_EMBED_INPUTS} in a request", param=field
        )
    for i, text in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(text, str):
            if isinstance(text, int | list) and not isinstance(text, bool):
                raise InvalidRequest(
                    f"$.{where}: token ids are not supported; send the text",
                    param=where,
                )
            raise InvalidRequest(f"$.{where}: expected a string", param=where)
        _check_text(text, where)
    return value


def _check_text(text: str, where: str) -> None:
    if not text:
        raise InvalidRequest(f"$.{where}: must not be empty", param=where)
    if len(text) > MAX_EMBED_CHARS:
        raise InvalidRequest(f"$.{where}: over {MAX_EMBED_CHARS} characters", param=where)


# --- native -----------------------------------------------------------------------------


@endpoint(inference=True)
async def embed(request: Request, call: Call) -> Response:
    """POST /api/v1/embed."""
    req = await read_json(request, _native)
    inference, result = await _run(request, call, req)
    n = result.prompt_tokens
    return JSONResponse(
        EmbedResponse(
            model=inference.route.name,
            embeddings=result.embeddings,
            usage=EmbedUsage(prompt_tokens=n, total_tokens=n),
        ),
        headers=inference.permit.headers,
    )


# --- OpenAI -----------------------------------------------------------------------------


class OpenAIEmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings (fields stella does not know are ignored, as the dialect's)."""

    input: Annotated[
        str | list[Any],
        Meta(description="a string or a list of strings (token-id arrays: a 400)"),
    ]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    user: Annotated[str, Meta(max_length=MAX_USER_CHARS)] | None = None


class OpenAIEmbedding(msgspec.Struct):
    """One vector of an OpenAI embeddings answer."""

    index: int
    # A list of floats, or (encoding_format base64) the base64 of little-endian float32s.
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class OpenAIEmbeddingList(msgspec.Struct):
    """Body of POST /v1/embeddings."""

    data: list[OpenAIEmbedding]
    model: str
    usage: EmbedUsage
    object: Literal["list"] = "list"


_openai = msgspec.json.Decoder(OpenAIEmbeddingRequest)


def float32_base64(vector: list[float]) -> str:
    """`vector` as OpenAI's base64 encoding_format: its float32s, little-endian."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


@endpoint(OPENAI, inference=True)
async def embeddings(request: Request, call: Call) -> Response:
    """POST /v1/embeddings."""
    req = await read_json(request, _openai)
    check_user(req.user)
    embed_req = EmbedRequest(input=texts_of(req.input), model=req.model, dimensions=req.dimensions)
    metadata = {"user": req.user} if req.user else None
    inference, result = await _run(request, call, embed_req, metadata)
    encode = float32_base64 if req.encoding_format == "base64" else None
    data = [
        OpenAIEmbedding(index=i, embedding=encode(v) if encode else v)
        for i, v in enumerate(result.embeddings)
    ]
    n = result.prompt_tokens
    return JSONResponse(
        OpenAIEmbeddingList(data=data, model=inference.route.name, usage=EmbedUsage(n, n)),
        headers=inference.permit.headers,
    )


# --- Ollama -----------------------------------------------------------------------------


class OllamaEmbed(msgspec.Struct, kw_only=True):
    """POST /api/embed (api/types.go's EmbedRequest)."""

    model: str
    input: Annotated[str | list[Any], Meta(description="a string or a list of strings")] = []
    # false: an input over the model's window is refused rather than cut (Ollama's).
    truncate: bool | None = None
    # 0: the model's own length; the vectors are shortened to it (Ollama's).
    dimensions: Annotated[int, Meta(ge=0, le=MAX_EMBED_DIMENSIONS)] = 0
    keep_alive: float | str | None = None  # as /api/chat's: checked, the backend's applies
    options: dict[str, Any] | None = None  # taken, not applied


class OllamaEmbeddings(msgspec.Struct, kw_only=True):
    """POST /api/embeddings (api/types.go's EmbeddingRequest, Ollama's older route)."""

    model: str
    prompt: str = ""
    keep_alive: float | str | None = None
    options: dict[str, Any] | None = None  # taken, not applied


class OllamaEmbedResponse(msgspec.Struct):
    """Body of POST /api/embed."""

    model: str
    embeddings: list[list[float]]
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class OllamaEmbeddingResponse(msgspec.Struct):
    """Body of POST /api/embeddings."""

    embedding: list[float]


_ollama_embed = msgspec.json.Decoder(OllamaEmbed)
_ollama_embeddings = msgspec.json.Decoder(OllamaEmbeddings)


@endpoint(OLLAMA, inference=True)
async def ollama_embed(request: Request, call: Call) -> Response:
    """POST /api/embed."""
    started = time.perf_counter()
    req = await read_json(request, _ollama_embed)
    check_keep_alive(req.keep_alive)
    asked = model_name(request, req.model)
    spell = answer_name(services(request).router, req.model)
    if req.input == "" or req.input == []:
        # No text: Ollama loads the model and answers no vectors; here the model is only
        # checked (a remote engine loads it with its first embed).
        route = services(request).pipeline.embed_route(asked, call)
        return JSONResponse(OllamaEmbedResponse(model=spell(route.name), embeddings=[]))
    embed_req = EmbedRequest(
        input=texts_of(req.input),
        model=asked,
        dimensions=req.dimensions or None,
        truncate=req.truncate,
    )
    inference, result = await _run(request, call, embed_req)
    ctx = inference.ctx
    load = ctx.load_ms if ctx is not None and ctx.load_ms is not None else 0.0
    return JSONResponse(
        OllamaEmbedResponse(
            model=spell(inference.route.name),
            embeddings=result.embeddings,
            total_duration=int((time.perf_counter() - started) * 1e9),
            load_duration=int(load * 1e6),
            prompt_eval_count=result.prompt_tokens,
        ),
        headers=inference.permit.headers,
    )


@endpoint(OLLAMA, inference=True)
async def ollama_embeddings(request: Request, call: Call) -> Response:
    """POST /api/embeddings: one prompt's vector (Ollama's older route)."""
    req = await read_json(request, _ollama_embeddings)
    check_keep_alive(req.keep_alive)
    asked = model_name(request, req.model)
    if not req.prompt:
        # As Ollama answers an empty prompt (a load): no vector; the model is checked.
        services(request).pipeline.embed_route(asked, call)
        return JSONResponse(OllamaEmbeddingResponse(embedding=[]))
    embed_req = EmbedRequest(input=texts_of(req.prompt, "prompt"), model=asked)
    inference, result = await _run(request, call, embed_req)
    return JSONResponse(
        OllamaEmbeddingResponse(embedding=result.embeddings[0]),
        headers=inference.permit.headers,
    )


document(
    Operation(
        "post",
        "/api/v1/embed",
        "Embeddings: texts in, one vector per text out",
        request=EmbedRequest,
        response=EmbedResponse,
    ),
    Operation(
        "post",
        "/v1/embeddings",
        "OpenAI embeddings (float or base64 vectors)",
        tag="openai",
        request=OpenAIEmbeddingRequest,
        response=OpenAIEmbeddingList,
        error=OPENAI_ERROR,
    ),
    Operation(
        "post",
        "/api/embed",
        "Ollama embeddings",
        tag="ollama",
        request=OllamaEmbed,
        response=OllamaEmbedResponse,
        error=OLLAMA_ERROR,
    ),
    Operation(
        "post",
        "/api/embeddings",
        "Ollama embedding of one prompt (its older route)",
        tag="ollama",
        request=OllamaEmbeddings,
        response=OllamaEmbeddingResponse,
        error=OLLAMA_ERROR,
    ),
)

routes = [
    Route("/api/v1/embed", embed, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/api/embed", ollama_embed, methods=["POST"]),
    Route("/api/embeddings", ollama_embeddings, methods=["POST"]),
]

__all__ = ["float32_base64", "routes", "texts_of"]
