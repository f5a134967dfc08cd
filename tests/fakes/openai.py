"""A fake OpenAI-compatible upstream, following the chat completions wire format.

The model name picks the behaviour: `ok` (default), `tools`, `die-after-3`
(three chunks then a dropped connection), `stall` (silence), `stall-after-2`,
`malformed`, `status-500`, `status-429`, `no-quota` (OpenAI's `insufficient_quota`),
`status-400`, `no-usage` (no usage, streamed
or not), `error-first` (a 200 stream whose one event is an error), `plain-error`
(`{"error": "text"}` as mlx_lm.server sends), `gzip` (a non-stream answer gzipped
whatever the client accepts, as a careless proxy would), `redirect` (307 elsewhere),
`think-S` (S seconds before the answer: the first chunk, or the whole non-stream body),
`endless` (a line that does not end: 20 MB without a newline), `latin1` (bytes that are
not UTF-8 inside a chunk), `abort` (finish_reason "abort", as vLLM says of a request it
cut short), `slow-tools` (a tool call whose arguments take 1.2 s to arrive),
`finish-then-hold` (the answer and its finish reason, then no usage, no [DONE], the
stream held open), `burst` (forty one-token chunks in one write, 5 s of silence, then
the finish and a usage of 10 prompt and 80 completion tokens), `two-tools` (two tool
calls, one when `parallel_tool_calls` is false, as the API honours it), `bad-args` (a
tool call whose arguments are not JSON, as a model may write them; the API passes the
string on), `list-args` (arguments that are JSON but not an object), `huge-error-first`
and `huge-error-after` (an error event of HUGE_ERROR, before any output or after the
first word), `cached` (a usage whose `prompt_tokens_details` says CACHED of the prompt's
tokens came from the upstream's cache, as OpenAI's and vLLM's do), `tools-stop` (a tool
call ended with finish_reason "stop", as OpenAI ends one forced by a named tool_choice,
and vLLM and SGLang others), `no-ids` and `one-id` (two calls without ids, or both with
the same one, as some servers send them), `name-repeat` (the tool's whole name again
in every fragment, the id only in the first, as MiniMax through NIM and some proxies
stream it), `name-pieces` (the name itself in pieces, as Gemini's may come) and
`keepalive` (SSE comments `: keepalive N/M` for 0.6 s before the answer, as
mlx_lm.server writes them while it reads a long prompt), `refusal` (the model declines:
REFUSAL in `refusal`, content null, finish_reason "stop", as OpenAI answers),
`refusal-length` (the same, ended with "length"), `refusal-no-usage` (the same, with no
usage in a whole answer), `filtered` (FILTERED, then finish_reason "content_filter" and no
`refusal`, as an upstream's content filter ends an answer it cuts short), `text-tools`
(TEXT_BEFORE, then the calls of `two-tools`, as a model may say what it is about to do),
`every-tool` (one call to each tool it was offered, in order, each `{"input": TOOL_INPUT}`)
and `reasoning` (a 400 for `max_tokens`, as OpenAI's o-series and gpt-5 answer: they take
`max_completion_tokens`), `no-reasoning` (a 400 for `reasoning_effort`, as gpt-4o answers
it: a model that does not reason), `bogus-usage` (a usage of
-50 prompt tokens, 10**15 completion tokens, -1 cached; its embeddings' 10**15 prompt
tokens), `missing` and `missing-vllm` (a 404 for a model the server does
not have: OpenAI's `code` `model_not_found`, vLLM's "The model `x` does not exist." at the
top of the body). A path it does not serve (a base_url without `/v1`, or with it twice)
is a 404 HTML page, as nginx in front of a server answers it.
Wire quirks of real servers:
- `ctx-openai`, `ctx-llamacpp`, `ctx-vllm`, `ctx-vllm-old`: a 400 for a prompt over the
  context, in each server's shape (OpenAI's `code`, llama.cpp's `type`, vLLM's words
  under `error` or, older, at the top);
- `error-field-context`, `error-field-400`, `error-field-500`: a failure in llama.cpp's
  own SSE field `error: {...}` then `data: [DONE]`, as its builds before #16109 stream it
  (over the context, a 400, a 500 after the first word);
- `limit-ms`, `limit-reset`: a 429 with Azure OpenAI's `retry-after-ms` LIMIT_MS, or with
  OpenAI's `x-ratelimit-reset-requests`/`-tokens` LIMIT_RESETS and no Retry-After (the
  requests limit spent, the tokens one with room: its reset is a full refill);
- `empty-data`: empty `data:` events between the chunks, and for 0.6 s before them, as
  relays send heartbeats;
- `multi-data`: each chunk's JSON over several `data:` lines, one of them in two writes;
- `json-answer`, `json-error`: a stream asked for, a 200 `application/json` body given
  (the whole answer, or an error); `sse-as-json`: a stream labelled `application/json`;
- `finish-then-cut`: the answer and its finish reason, then the connection cut before
  the usage;
- `reasoning-no-usage`: REASONING in `reasoning_content` and `reasoning` chunks, then the
  answer, no usage, streamed or not;
- `thinks` and `thinks-or`: REASONING, then the answer, with its usage: in
  `reasoning_content` (content null), as vLLM, DeepSeek and llama.cpp send it, or in
  `reasoning` (content ""), as OpenRouter and Ollama's OpenAI API do, streamed or in the
  whole answer's message; `thinks-between` (" w0", then REASONING[0] in
  `reasoning_content`, then the rest of `ok`'s words: a model that thinks again after
  some text, as interleaved thinking does); `thinks-between-apart` (the same, the
  reasoning in a read of its own); `thinks-apart` and `thinks-or-apart` (the
  same as `thinks` and `thinks-or`, each piece of the reasoning in a read of its own);
  `thinks-fails` (REASONING in `reasoning_content`, each piece in a read of its own, then
  an error event: an upstream that fails while its model thinks); `thinks-says` (REASONING,
  its last piece in one delta with the answer's first word, as vLLM's DeepSeek-R1 parser
  sends the delta around `</think>`, then the rest of `ok`'s words); `thinks-echo`
  (reasoning "I read: " and the last message's content, then `ok`'s answer); `thinks-only`
  (REASONING in `reasoning_content`, each piece in a read of its own, and no answer: finished
  "length", as a model whose token limit ran out while it thought);
  `thinks-tools` (REASONING, then the calls of `two-tools`, no text); the usage
  of each (when one is sent) counts REASONING_TOKENS in `completion_tokens_details`;
- `whole-calls`, `whole-calls-same`: two tool calls each in one chunk with neither index
  nor id (two tools, or one tool twice).
It records what it saw.

`POST /v1/embeddings` answers as the API does: `data` of `{"object": "embedding", "index",
"embedding"}` in input order, floats or (`encoding_format: "base64"`) the base64 of
little-endian float32s, `usage` with `prompt_tokens` and `total_tokens` (a token a word);
an empty string, an empty list or an `encoding_format` it does not know is a 400 naming
`input` (`encoding_format`), and so is `dimensions` for a model that cannot shorten its
vectors (any but `text-embedding-3-*`). Each vector is EMBED_DIMENSIONS long (or
`dimensions`), a unit vector made from the text's hash. Models: `status-N` (that status),
`no-usage` (no `usage`), `short` (one vector fewer than inputs), `no-embeddings` (a 501
as llama.cpp started without `--embeddings` answers), `chat-only` (the 404 page of a path
it does not serve, as a server that makes no embeddings answers), `huge` (a body of
HUGE_ANSWER bytes, as a non-stream chat's too), `floats-only` (floats whatever
`encoding_format` asks, as a server that knows no base64), `nonfinite` (the last vector
holds an infinity and a NaN, in base64 whatever was asked), `ragged` (the last vector one
shorter), `empty-vector` (the last vector empty), `dup-index` (the last vector's index 0
too), `index-range` (indexes 1 to n), `index-null` (the last index null) and `reversed`
(the vectors last first, each with its index). It records each body in
`embed_requests`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# The prompt tokens model `cached` says its cache spared it.
CACHED = 2

# What model `text-tools` says before its calls.
TEXT_BEFORE = "Let me check."

# What the `refusal` models answer.
REFUSAL = "I'm sorry, I cannot help with that."

# What model `filtered` says before its content filter cuts the answer short.
FILTERED = "Here is how to"

# An upstream's error text of a megabyte over several lines (a traceback, a dump).
HUGE_ERROR = "first line\nsecond line\r\n\t" + "E" * 1_000_000

# What the `ctx-` models answer, each in its server's shape (status 400).
CONTEXT_ERRORS: dict[str, dict[str, Any]] = {
    "ctx-openai": {
        "error": {
            "message": "This model's maximum context length is 128000 tokens. However, your "
            "messages resulted in 130000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
    "ctx-llamacpp": {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 5000,
            "n_ctx": 4096,
        }
    },
    "ctx-vllm": {
        "error": {
            "message": "This model's maximum context length is 4096 tokens. However, your "
            "request has 5000 input tokens. Please reduce the length of the input messages.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    },
    "ctx-vllm-old": {
        "object": "error",
        "message": "This model's maximum context length is 4096 tokens. However, you "
        "requested 5000 tokens (4000 in the messages, 1000 in the completion).",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
}
# llama.cpp's words for a prompt over its context, before it had an error type for it.
LLAMA_CONTEXT = (
    "the request exceeds the available context size. try increasing the context size or "
    "enable context shift"
)
# Model `limit-ms`'s retry-after-ms, and `limit-reset`'s rate-limit resets (requests, tokens).
LIMIT_MS = "1500"
LIMIT_RESETS = ("1.2s", "6m0s")
# What model `reasoning-no-usage` thinks, in pieces: three `reasoning_content`, one `reasoning`.
REASONING = ("Let ", "me ", "think. ", "Done.")
# The models that reason before their answer, and the field each sends the reasoning in.
THINKERS = {
    "thinks": "reasoning_content",
    "thinks-or": "reasoning",
    "thinks-apart": "reasoning_content",
    "thinks-or-apart": "reasoning",
    "thinks-fails": "reasoning_content",
    "thinks-says": "reasoning_content",
    "thinks-echo": "reasoning_content",
    "thinks-only": "reasoning_content",
    "thinks-tools": "reasoning_content",
}
# The reasoning tokens a thinking model's usage counts (completion_tokens_details, as
# OpenAI's, OpenRouter's and vLLM's usage have it, among other counts).
REASONING_TOKENS = 7
# The models whose pieces of reasoning each come in a read of their own.
APART = ("thinks-apart", "thinks-or-apart", "thinks-fails", "thinks-only")


def _thoughts(model: str, body: dict[str, Any]) -> tuple[str, ...]:
    """The pieces of a thinking model's reasoning."""
    if model == "thinks-echo":
        return ("I read: ", str(body["messages"][-1]["content"]))
    return REASONING


# The length of the fake's embeddings when a request asks none.
EMBED_DIMENSIONS = 8


def fake_vector(text: str, size: int) -> list[float]:
    """The fake's embedding of `text`: a unit vector from its hash, float32 values."""
    raw = hashlib.shake_256(text.encode()).digest(4 * size)
    ints = struct.unpack(f"<{size}i", raw)
    norm = math.sqrt(sum(float(i) * i for i in ints)) or 1.0
    return list(struct.unpack(f"<{size}f", struct.pack(f"<{size}f", *(i / norm for i in ints))))


def _invalid(message: str, param: str | None) -> Response:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        },
        400,
    )


class FakeOpenAI:
    """The app plus what it observed."""

    def __init__(self, words: int = 5) -> None:
        self.words = [f" w{i}" for i in range(words)]
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        # Every Authorization header of each request, repeated ones apart (chat and models).
        self.authorizations: list[list[str]] = []
        self.closed_at: list[float] = []  # when a streaming response was cut by the client
        self.embed_requests: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v1/models", self.models),
                Route("/health", self.models),
            ],
            exception_handlers={404: no_such_page},
        )

    async def models(self, request: Request) -> Response:
        self.authorizations.append(request.headers.getlist("authorization"))
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": "ok", "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        self.embed_requests.append(body)
        self.headers.append(dict(request.headers))
        self.authorizations.append(request.headers.getlist("authorization"))
        model = body.get("model") or ""
        if model.startswith("status-"):
            status = int(model.split("-")[1])
            return JSONResponse(
                {"error": {"message": f"fake {status}", "type": "server_error", "code": status}},
                status,
            )
        if model == "no-embeddings":  # llama.cpp started without --embeddings
            message = "This server does not support embeddings. Start it with `--embeddings`"
            error = {"code": 501, "message": message, "type": "not_supported_error"}
            return JSONResponse({"error": error}, 501)
        if model == "chat-only":  # a server that serves chats alone: no such path
            return await no_such_page(request, Exception())
        if model == "huge":
            return _huge()
        given = body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or any(t == "" for t in texts):
            return _invalid(
                "'$.input' is invalid. Please check the API reference: "
                "https://platform.openai.com/docs/api-reference.",
                None,
            )
        fmt = "float" if model == "floats-only" else body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return _invalid(
                f"Invalid value: '{fmt}'. Supported values are: 'float' and 'base64'.",
                "encoding_format",
            )
        size = EMBED_DIMENSIONS
        if body.get("dimensions") is not None:
            if not model.startswith("text-embedding-3"):
                return _invalid("This model does not support specifying dimensions.", None)
            size = body["dimensions"]
        data = []
        for i, text in enumerate(texts):
            # Token ids (a list of ints, or one int) stand for their own text here.
            vector = fake_vector(json.dumps(text) if not isinstance(text, str) else text, size)
            embedding: list[float] | str = vector
            if fmt == "base64":
                embedding = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        if model == "short":
            data.pop()
        _spoil(model, data, size)
        tokens = sum(len(t.split()) if isinstance(t, str) else 1 for t in texts)
        answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if model == "bogus-usage":
            tokens = 10**15
        if model != "no-usage":
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse(answer, headers={"x-request-id": "req_fake_embed"})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.authorizations.append(request.headers.getlist("authorization"))
        model = body.get("model", "ok")
        for i, tool in enumerate(body.get("tools") or []):
            # As the API reference has it: `type` and `function.name` are required.
            if tool.get("type") != "function" or not (tool.get("function") or {}).get("name"):
                param = f"tools[{i}].type" if tool.get("type") is None else f"tools[{i}]"
                return JSONResponse(
                    {
                        "error": {
                            "message": f"Missing required parameter: '{param}'.",
                            "type": "invalid_request_error",
                            "param": param,
                            "code": "missing_required_parameter",
                        }
                    },
                    400,
                )
        if "parallel_tool_calls" in body and not body.get("tools"):
            # As the API answers it.
            return JSONResponse(
                {
                    "error": {
                        "message": "Invalid value for 'parallel_tool_calls': "
                        "'parallel_tool_calls' is only allowed when 'tools' are specified.",
                        "type": "invalid_request_error",
                        "param": "parallel_tool_calls",
                        "code": None,
                    }
                },
                400,
            )
        if (problem := _unlinked(body.get("messages") or [])) is not None:
            param, message = problem
            return JSONResponse(
                {
                    "error": {
                        "message": message,
                        "type": "invalid_request_error",
                        "param": param,
                        "code": None,
                    }
                },
                400,
            )
        if model == "text-only" and _has_images(body):
            # llama.cpp's server without a multimodal projector, as it answers.
            error = {
                "code": 400,
                "message": "image input is not supported - hint: if this is unexpected, "
                "you may need to provide the mmproj",
                "type": "invalid_request_error",
            }
            return JSONResponse({"error": error}, 400)
        if model == "status-429-rising":
            # 1 s the first time, 30 s after (a limit that tightens as it is pressed).
            asked = sum(r.get("model") == model for r in self.requests)
            wait = "1" if asked <= 1 else "30"
            return JSONResponse(
                {"error": {"message": "fake 429", "type": "server_error", "code": 429}},
                429,
                headers={"Retry-After": wait},
            )
        if model == "no-quota":
            # OpenAI's answer to a key whose quota (credit) is used up.
            error = {
                "message": "You exceeded your current quota, please check your plan and "
                "billing details.",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
            return JSONResponse({"error": error}, 429)
        if model == "missing":
            error = {
                "message": f"The model `{model}` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
            return JSONResponse({"error": error}, 404)
        if model == "missing-vllm":
            error = {
                "object": "error",
                "message": f"The model `{model}` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
            return JSONResponse(error, 404)
        if model.startswith("status-"):
            status = int(model.split("-")[1])
            # status-429 asks for 1 s; status-429-30 for 30 s.
            wait = model.split("-")[2] if model.count("-") > 1 else "1"
            headers = {"Retry-After": wait} if status == 429 else {}
            return JSONResponse(
                {"error": {"message": f"fake {status}", "type": "server_error", "code": status}},
                status,
                headers=headers,
            )
        if model == "reasoning" and "max_tokens" in body:
            return JSONResponse(
                {
                    "error": {
                        "message": "Unsupported parameter: 'max_tokens' is not supported with "
                        "this model. Use 'max_completion_tokens' instead.",
                        "type": "invalid_request_error",
                        "param": "max_tokens",
                        "code": "unsupported_parameter",
                    }
                },
                400,
            )
        if model == "no-reasoning" and "reasoning_effort" in body:
            return JSONResponse(
                {
                    "error": {
                        "message": "Unsupported parameter: 'reasoning_effort' is not "
                        "supported with this model.",
                        "type": "invalid_request_error",
                        "param": "reasoning_effort",
                        "code": "unsupported_parameter",
                    }
                },
                400,
            )
        if model in CONTEXT_ERRORS:
            return JSONResponse(CONTEXT_ERRORS[model], 400)
        if model in ("limit-ms", "limit-reset"):
            limit = {"message": "Rate limit reached", "type": "requests"}
            headers = (
                {"retry-after-ms": LIMIT_MS}
                if model == "limit-ms"
                else {
                    "x-ratelimit-remaining-requests": "0",  # the limit that refused it
                    "x-ratelimit-reset-requests": LIMIT_RESETS[0],
                    "x-ratelimit-remaining-tokens": "39000",  # room: its reset is a refill
                    "x-ratelimit-reset-tokens": LIMIT_RESETS[1],
                }
            )
            return JSONResponse(
                {"error": {**limit, "code": "rate_limit_exceeded"}}, 429, headers=headers
            )
        if body.get("stream") and model in ("json-answer", "json-error"):
            # A server that ignores `stream: true`, or a proxy's 200 with an error body.
            if model == "json-error":
                error = {"message": "No models loaded.", "type": "invalid_request_error"}
                return JSONResponse({"error": error})
            body = {**body, "stream": False}
        if model == "redirect":
            target = str(request.url).replace("/chat/completions", "/elsewhere")
            return Response(status_code=307, headers={"Location": target})
        if model == "plain-error":
            return JSONResponse({"error": "model not loaded"}, 404)
        if model.startswith("think-"):
            await asyncio.sleep(float(model[6:]))
        if not body.get("stream"):
            if model == "stall":
                await asyncio.sleep(3600)
            if model == "huge":
                return _huge()
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.words)}
            finish = "abort" if model == "abort" else "stop"
            if model == "tools":
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                }
                finish = "tool_calls"
            if model in TOOL_MODELS:
                content = TEXT_BEFORE if model == "text-tools" else None
                message = {"role": "assistant", "content": content, "tool_calls": _calls(body)}
                finish = "stop" if model == "tools-stop" else "tool_calls"
            if model == "reasoning-no-usage":
                message["reasoning_content"] = "".join(REASONING)
            if model in THINKERS:
                message[THINKERS[model]] = "".join(_thoughts(model, body))
            if model == "thinks-only":
                message["content"] = None
                finish = "length"
            if model.startswith("refusal"):
                message = {"role": "assistant", "content": None, "refusal": REFUSAL}
                finish = "length" if model == "refusal-length" else "stop"
            if model == "filtered":
                message = {"role": "assistant", "content": FILTERED}
                finish = "content_filter"
            answer: dict[str, Any] = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            }
            if model not in ("no-usage", "refusal-no-usage", "reasoning-no-usage"):
                answer["usage"] = self._usage(model)
            return self._maybe_gzip(model, JSONResponse(answer))
        # `sse-as-json`: a stream labelled application/json, as some servers label it.
        kind = "application/json" if model == "sse-as-json" else "text/event-stream"
        return StreamingResponse(self._stream(model, body), media_type=kind)

    def _usage(self, model: str) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": 3,
            "completion_tokens": len(self.words),
            "total_tokens": 3 + len(self.words),
        }
        if model == "bogus-usage":  # counts no real server sends
            usage = {"prompt_tokens": -50, "completion_tokens": 10**15, "total_tokens": 10**15}
            usage["prompt_tokens_details"] = {"cached_tokens": -1}
        if model == "cached":
            usage["prompt_tokens_details"] = {"cached_tokens": CACHED}
            usage["completion_tokens_details"] = None  # as some servers say none
        if model in THINKERS:
            thought = {"reasoning_tokens": REASONING_TOKENS, "audio_tokens": 0}
            usage["completion_tokens_details"] = thought
        return usage

    def _maybe_gzip(self, model: str, response: Response) -> Response:
        if model != "gzip":
            return response
        body = gzip.compress(bytes(response.body))
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return Response(body, headers=headers)

    async def _stream(self, model: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        try:
            if model == "stall":
                await asyncio.sleep(3600)
            if model == "thinks-between-apart":  # text, reasoning, text: each in its own read
                yield chunk({"content": self.words[0]})
                await asyncio.sleep(0.05)
                yield chunk({"reasoning_content": REASONING[0]})
                await asyncio.sleep(0.05)
                for word in self.words[1:]:
                    yield chunk({"content": word})
                yield chunk({}, "stop")
                yield b"data: [DONE]\n\n"
                return
            if model == "thinks-between":  # text, reasoning, text: all in one network read
                yield chunk({"content": self.words[0]}) + chunk({"reasoning_content": REASONING[0]})
                for word in self.words[1:]:
                    yield chunk({"content": word})
                yield chunk({}, "stop")
                yield b"data: [DONE]\n\n"
                return
            if model == "thinks-says":  # the last thought and the first word in one delta
                for part in REASONING[:-1]:
                    yield chunk({"content": None, "reasoning_content": part})
                yield chunk({"reasoning_content": REASONING[-1], "content": self.words[0]})
                for word in self.words[1:]:
                    yield chunk({"content": word})
                yield chunk({}, "stop")
                yield b"data: [DONE]\n\n"
                return
            if model in THINKERS:  # the reasoning first, then the answer as `ok` gives it
                field = THINKERS[model]
                for part in _thoughts(model, body):
                    if model in APART:
                        await asyncio.sleep(0.05)  # each in a read of its own
                    yield chunk(
                        {"content": None if field == "reasoning_content" else "", field: part}
                    )
                if model in APART:
                    await asyncio.sleep(0.05)  # and what follows in another
                if model == "thinks-fails":
                    error = {"message": "model crashed", "type": "server_error", "code": None}
                    yield b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
                    return
                if model == "thinks-only":
                    yield chunk({}, "length")
                    if (body.get("stream_options") or {}).get("include_usage"):
                        usage = self._usage(model)
                        yield (
                            b"data: "
                            + json.dumps({"choices": [], "usage": usage}).encode()
                            + b"\n\n"
                        )
                    yield b"data: [DONE]\n\n"
                    return
            if model == "error-first":  # a refusal after the 200, before any output
                error = {"message": "model overloaded", "type": "server_error", "code": None}
                yield b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
                return
            huge = {"error": {"message": HUGE_ERROR, "type": "server_error"}}
            if model == "huge-error-first":
                yield b"data: " + json.dumps(huge).encode() + b"\n\n"
                return
            if model.startswith("refusal"):  # as OpenAI streams one: in pieces, content null
                yield chunk({"role": "assistant", "content": None, "refusal": ""})
                for part in (REFUSAL[:9], REFUSAL[9:]):
                    yield chunk({"refusal": part})
                yield chunk({}, "length" if model == "refusal-length" else "stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = self._usage(model)
                    yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            if model.startswith("error-field"):  # llama.cpp's own field, before #16109
                fields = {"code": 400, "message": LLAMA_CONTEXT, "type": "invalid_request_error"}
                if model == "error-field-400":
                    fields = {**fields, "message": "'messages' must be an array"}
                if model == "error-field-500":
                    yield chunk({"role": "assistant", "content": ""})
                    yield chunk({"content": self.words[0]})
                    fields = {"code": 500, "message": "boom", "type": "server_error"}
                yield b"error: " + json.dumps(fields).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            yield chunk({"role": "assistant", "content": ""})
            if model == "empty-data":  # a relay's heartbeats, while a long prompt is read
                for i in range(6):
                    await asyncio.sleep(0.1)
                    yield b"data: \n\n" if i % 2 else b"data:\n\n"
            if model == "huge-error-after":
                yield chunk({"content": self.words[0]})
                yield b"data: " + json.dumps(huge).encode() + b"\n\n"
                return
            if model == "keepalive":  # SSE comments while a long prompt is read (mlx_lm.server)
                for i in range(6):
                    await asyncio.sleep(0.1)
                    yield b": keepalive %d/6\n\n" % i
            if model == "beats":  # output without text, forever: alive, answering nothing
                for _ in range(36_000):
                    await asyncio.sleep(0.1)
                    yield chunk({"role": "assistant"})
            if model == "endless":
                yield b'data: {"choices":[{"delta":{"content":"'
                for _ in range(320):
                    yield b"y" * 65536
                return
            if model == "latin1":
                yield chunk({"content": "caf"}).replace(b"caf", b"caf\xe9")
                return
            if model == "malformed":
                yield b"data: {not json\n\n"
                return
            if model == "slow-tools":  # a long tool argument, written slowly
                call = {"index": 0, "id": "call_1", "type": "function"}
                yield chunk({"tool_calls": [{**call, "function": {"name": "write"}}]})
                for part in ('{"text": "', "a" * 10, "b" * 10, "c" * 10, "d" * 10, '"}'):
                    await asyncio.sleep(0.2)
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                yield chunk({}, "tool_calls")
            elif model == "burst":  # a fast upstream: many chunks reach one network read
                yield b"".join(chunk({"content": f" t{i}"}) for i in range(40))
                await asyncio.sleep(5)
                yield chunk({}, "stop")
                usage = {"prompt_tokens": 10, "completion_tokens": 80, "total_tokens": 90}
                yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            elif model in TOOL_MODELS:
                if model == "text-tools":
                    for part in (TEXT_BEFORE[:4], TEXT_BEFORE[4:]):
                        yield chunk({"content": part})
                for index, call in enumerate(_calls(body)):
                    name = call["function"]["name"]
                    pieces = [name[:4], name[4:]] if model == "name-pieces" else [name]
                    head = {**call, "function": {"name": pieces[0], "arguments": ""}}
                    yield chunk({"tool_calls": [{"index": index, **head}]})
                    for piece in pieces[1:]:
                        yield chunk({"tool_calls": [{"index": index, "function": {"name": piece}}]})
                    args = call["function"]["arguments"]
                    for part in (args[:5], args[5:]):  # in fragments, as the API streams
                        fn: dict[str, Any] = {"arguments": part}
                        delta = {"index": index, "function": fn}
                        if model == "name-repeat":
                            fn["name"] = name
                            delta["type"] = "function"
                        yield chunk({"tool_calls": [delta]})
                yield chunk({}, "stop" if model == "tools-stop" else "tool_calls")
            elif model == "tools":
                yield chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ]
                    }
                )
                for part in ('{"ci', 'ty": "Par', 'is"}'):
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                yield chunk({}, "tool_calls")
            elif model in ("whole-calls", "whole-calls-same"):  # each call whole, no index nor id
                tools = (
                    ["get_weather", "get_time"] if model == "whole-calls" else ["get_weather"] * 2
                )
                for name, city in zip(tools, ["Paris", "Oslo"], strict=True):
                    call = {"name": name, "arguments": json.dumps({"city": city})}
                    yield chunk({"tool_calls": [{"type": "function", "function": call}]})
                yield chunk({}, "tool_calls")
            elif model == "reasoning-no-usage":
                for i, part in enumerate(REASONING):
                    yield chunk(
                        {"content": None, "reasoning" if i == 3 else "reasoning_content": part}
                    )
                for word in self.words:
                    yield chunk({"content": word})
                yield chunk({}, "stop")
                yield b"data: [DONE]\n\n"
                return
            elif model == "multi-data":  # each event's JSON over several data lines
                for i, part in enumerate([*self.words, None]):
                    event = chunk({"content": part} if part else {}, None if part else "stop")
                    lines = json.dumps(json.loads(event[6:]), indent=1).split("\n")
                    event = b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"
                    if i == 1:  # an event over two reads, cut inside a line
                        yield event[:50]
                        await asyncio.sleep(0.05)
                        event = event[50:]
                    yield event
                yield b"data: [DONE]\n\n"
                return
            elif model == "filtered":
                for part in (FILTERED[:8], FILTERED[8:]):
                    yield chunk({"content": part})
                yield chunk({}, "content_filter")
            else:
                for i, word in enumerate(self.words):
                    if model == "empty-data":
                        yield b"data: \n\n"
                    if model == "die-after-3" and i == 3:
                        raise RuntimeError("connection dropped on purpose")
                    if model == "stall-after-2" and i == 2:
                        await asyncio.sleep(3600)
                    if model == "slow":
                        await asyncio.sleep(0.05)
                    elif model in ("die-after-3", "stall-after-2"):
                        await asyncio.sleep(0.01)  # tokens spaced as a model makes them
                    yield chunk({"content": word})
                yield chunk({}, "abort" if model == "abort" else "stop")
            if model == "finish-then-hold":  # ignores include_usage, never says [DONE]
                await asyncio.sleep(3600)
            if model == "finish-then-cut":  # the connection cut before the usage and [DONE]
                await asyncio.sleep(0.05)
                raise RuntimeError("connection dropped on purpose")
            if (body.get("stream_options") or {}).get("include_usage") and model != "no-usage":
                usage = self._usage(model)
                yield (
                    b"data: "
                    + json.dumps(
                        {
                            "id": "chatcmpl-1",
                            "object": "chat.completion.chunk",
                            "choices": [],
                            "usage": usage,
                        }
                    ).encode()
                    + b"\n\n"
                )
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.closed_at.append(time.monotonic())
            raise


BAD_ARGS = '{"city": "Par'
LIST_ARGS = '["Paris", "Oslo"]'
# The models that answer with the calls of _calls(), streamed in fragments.
TOOL_MODELS = frozenset(
    ("two-tools", "text-tools", "bad-args", "list-args", "tools-stop", "no-ids", "one-id")
    + ("name-repeat", "name-pieces", "every-tool", "thinks-tools")
)
# The input `every-tool` gives each tool: lines, quotes, as a patch would hold them.
TOOL_INPUT = '*** Begin Patch\n*** Add File: a.txt\n+say "hi"\n*** End Patch\n'


# nginx's own 404 page, as a proxy in front of an upstream answers a path it does not have.
NOT_FOUND_PAGE = (
    "<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    "<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def _spoil(model: str, data: list[dict[str, Any]], size: int) -> None:
    """An embeddings answer's `data` as a broken or careless server gives it (the models
    BROKEN_EMBEDDINGS names); `reversed` is the API's own, in another order."""
    if model == "nonfinite":  # an infinity and a NaN among float32s, as base64 carries them
        bad = struct.pack(f"<{size}f", math.inf, math.nan, *[0.5] * (size - 2))
        data[-1]["embedding"] = base64.b64encode(bad).decode()
    elif model in ("ragged", "empty-vector"):
        last = data[-1]["embedding"]
        keep = size - 1 if model == "ragged" else 0
        if isinstance(last, str):  # base64: 4 bytes a float
            data[-1]["embedding"] = base64.b64encode(base64.b64decode(last)[: 4 * keep]).decode()
        else:
            data[-1]["embedding"] = last[:keep]
    elif model == "dup-index":
        data[-1]["index"] = 0
    elif model == "index-range":
        for item in data:
            item["index"] += 1
    elif model == "index-null":
        data[-1]["index"] = None
    elif model == "reversed":
        data.reverse()


# Embedding models whose answer is broken: no client could use it as it is.
BROKEN_EMBEDDINGS = ("nonfinite", "ragged", "empty-vector", "dup-index", "index-range")


# What model `huge` answers: a JSON body (spaces, then an error) longer than any answer
# a client takes whole, sent without a length.
HUGE_ANSWER = 65 * 1024 * 1024


def _huge() -> Response:
    async def body() -> AsyncIterator[bytes]:
        piece = b" " * (1024 * 1024)
        for _ in range(HUGE_ANSWER // len(piece)):
            yield piece
        yield b'{"error": {"message": "the end of a huge answer"}}'

    return StreamingResponse(body(), media_type="application/json")


async def no_such_page(request: Request, exc: Exception) -> Response:
    """The 404 of a path the fake does not serve: an HTML page."""
    return HTMLResponse(NOT_FOUND_PAGE, 404)


def _has_images(body: dict[str, Any]) -> bool:
    """Whether any message of a chat body holds an image_url part."""
    return any(
        isinstance(part, dict) and part.get("type") == "image_url"
        for m in body.get("messages") or []
        if isinstance(m.get("content"), list)
        for part in m["content"]
    )


def _calls(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls of TOOL_MODELS: two (one when parallel tool calls are off) but for
    `bad-args`, `list-args`, `tools-stop`, `name-repeat`, `name-pieces` and `every-tool`."""
    model = body.get("model")
    if model == "every-tool":
        return [
            {
                "id": f"call_{i + 1}",
                "type": "function",
                "function": {
                    "name": tool["function"]["name"],
                    "arguments": json.dumps({"input": TOOL_INPUT}),
                },
            }
            for i, tool in enumerate(body.get("tools") or [])
        ]
    if model in ("bad-args", "list-args"):
        args = BAD_ARGS if model == "bad-args" else LIST_ARGS
        return [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": args},
            }
        ]
    one = body.get("parallel_tool_calls") is False or model in (
        "tools-stop",
        "name-repeat",
        "name-pieces",
    )
    calls: list[dict[str, Any]] = [
        {
            "id": f"call_{i + 1}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        for i, city in enumerate(["Paris"] if one else ["Paris", "Oslo"])
    ]
    for call in calls:
        if model == "no-ids":
            del call["id"]
        elif model == "one-id":
            call["id"] = "call_1"
    return calls


def _unlinked(messages: list[dict[str, Any]]) -> tuple[str, str] | None:
    """What the API answers about tool calls and results that are not linked by id:
    an empty call id, a `tool` message without `tool_call_id` or answering no call of
    the assistant message before it; and about a `tool` message's part that is not text."""
    ids: set[str] = set()
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or []):
            if not call.get("id"):
                return (
                    f"messages.[{i}].tool_calls.[{j}].id",
                    f"Invalid 'messages[{i}].tool_calls[{j}].id': empty string. Expected a "
                    "string with minimum length 1, but got an empty string instead.",
                )
        if m.get("tool_calls"):
            ids = {c["id"] for c in m["tool_calls"]}
        elif m.get("role") == "tool":
            for j, part in enumerate(m["content"] if isinstance(m.get("content"), list) else ()):
                if part.get("type") != "text":
                    # The API's schema: a tool message's parts are text only.
                    return (
                        f"messages[{i}].content[{j}].type",
                        f"Invalid value: {part.get('type')!r}. Supported values are: 'text'.",
                    )
            if not m.get("tool_call_id"):
                return (
                    "messages.tool_call_id",
                    "Missing parameter 'tool_call_id': messages with role 'tool' must have "
                    "a 'tool_call_id'.",
                )
            if m["tool_call_id"] not in ids:
                return (
                    f"messages.[{i}].role",
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                )
        else:
            ids = set()
    return None


@contextlib.contextmanager
def stella_counting_cache(env: dict[str, str]) -> Iterator[Any]:
    """stella (a tests.live LiveServer, `env` set) with two routes on this fake: "cached",
    whose answers count CACHED prompt tokens read from a cache, and "plain", whose
    answers say nothing of a cache."""
    from tests.fakes.server import serve
    from tests.live import run_stella

    with serve(FakeOpenAI().app) as url:
        config = {
            "backends": {"up": {"kind": "openai", "base_url": url + "/v1"}},
            "models": {
                "routes": {
                    "cached": {"backend": "up", "upstream_model": "cached"},
                    "plain": {"backend": "up", "upstream_model": "ok"},
                }
            },
        }
        with run_stella(config, env) as server:
            yield server
