"""A fake Ollama server following its API docs (/api/chat NDJSON, /api/tags, /api/ps,
/api/version).

The model name picks the behaviour: `llama3` (ok), `tools` (`two-tools`: two calls in
one line, as Ollama sends parallel calls; each call with its `id`, as recent Ollama
names them, CALL_IDS), `old-tools` (the call of `tools` without an id, as older
versions send it), `null-args` (a call of `get_time` whose `arguments` are null, as Go
encodes a call without arguments), `error-before` (HTTP 404
{"error": "model 'error-before' not found"}), `not-pulled` (HTTP 404 in older Ollama's
words, `model "not-pulled" not found, try pulling it first`), `error-mid` (a final {"error": ...} line after two pieces), `error-first` (a 200 whose
one line is {"error": ...}), `huge-error-first` and `huge-error-mid` (the same with
HUGE_ERROR), `malformed`, `thinking` (THINKING in `message.thinking`, a line per piece
with content "", then the answer, as a thinking model streams it), `busy` (503 without Retry-After, as Ollama answers a full
queue), `cloud` (401 with a `signin_url`, as Ollama answers a cloud model while it is not
signed in), `no-think` (a model that does not think: a `think` but false is a 400,
`"no-think" does not support thinking`, as Ollama answers it), `cached` (the done line says CACHED of its prompt's tokens came from the
cache, `prompt_eval_cached_count`), `bogus-counts` (the done line's and /api/embed's
counts are BOGUS). A path it does not serve is Go's plain-text 404,
`404 page not found`, as Ollama answers one. A `keep_alive` string Go's time.ParseDuration refuses
(`"-1"`) is a 400, as Ollama answers it. `"stream": false` gets one object, as the API
does (its default is a stream).

Models load as Ollama loads them: a chat of a model not loaded sends nothing, headers
included, until the load is done (`slow-load` takes LOAD_S, `slow-load-2` twice that, the
others none), and a client that drops its connection meanwhile aborts it (the next chat
starts over); loaded, it stays. A chat without messages only loads the model and answers
`done_reason: "load"`; `POST /api/generate` with `keep_alive` 0 and no prompt (Ollama's
unload, the only generate the fake takes) frees it and answers `done_reason: "unload"`,
loaded or not, as Ollama does (an unknown model, `error-before`, is a 404). The done line's `load_duration` is the load this chat waited for.
`POST /api/embed` answers as Ollama's does (api/types.go's EmbedResponse): `embeddings`, one
per input (a string or a list of strings; another type is a 400 `invalid input type`; no
input: no vectors, the model loaded), EMBED_DIMENSIONS long, or shortened to `dimensions`
and made unit vectors again, `prompt_eval_count` (a token a word), `load_duration` (the load
it waited for, as a chat) and `total_duration`; `error-before` is a 404, `busy` a 503, as for
a chat, and `chat-only` a 501, as newer Ollama answers for a model that cannot embed. Each body is in `embed_requests`.
/api/ps lists the loaded models, `llama3:latest` from the start, with a window of
CONTEXT tokens; while a load is under way it answers once the load has ended, as Ollama's
does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

CREATED = "2024-07-22T20:33:28.123648Z"
# An upstream's error text of a megabyte over several lines (a traceback, a dump).
HUGE_ERROR = "first line\nsecond line\r\n\t" + "E" * 1_000_000
# The window /api/ps says llama3 runs with (its num_ctx).
CONTEXT = 8192
# How long `slow-load` takes to load (`slow-load-2` twice as long).
LOAD_S = 1.5
# What `thinking` thinks, a line per piece (`message.thinking`), before its answer.
THINKING = ("Hmm, ", "the sky? ", "Blue.")
# The prompt tokens of `cached` that its done line says were read from the cache.
CACHED = 20
# Ollama's answer to a cloud model while the server is not signed in to ollama.com.
SIGNIN_URL = "https://ollama.com/connect?name=box&key=c3NoLWVkMjU1MTk"
# The ids of the calls of `tools` and `two-tools`, by city: Ollama's shape, `call_` and 8
# random lowercase letters or digits.
CALL_IDS = {"Toronto": "call_k3v9x2qa", "Oslo": "call_7md0e4wz"}
# What Go's time.ParseDuration takes: <number><unit> parts after a sign, or a bare 0.
GO_DURATION = re.compile(r"[-+]?(?:0|(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+)")


# The counts of model `bogus-counts` (its done line's, its embeddings'): no real server's.
BOGUS = {"bogus-counts": {"prompt_eval_count": -5, "eval_count": 10**15, "load_duration": 10**30}}
# The length of the fake's embeddings when a request asks none.
EMBED_DIMENSIONS = 8


def fake_vector(text: str, size: int) -> list[float]:
    """The fake's embedding of `text`: a unit vector from its hash."""
    ints = struct.unpack(f"<{size}i", hashlib.shake_256(text.encode()).digest(4 * size))
    norm = math.sqrt(sum(float(i) * i for i in ints)) or 1.0
    return [i / norm for i in ints]


GO_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9}
GO_UNIT_NS |= {"m": 60 * 10**9, "h": 3600 * 10**9}


def go_duration_ns(text: str) -> bool:
    """Whether Go's time.ParseDuration takes `text`: its grammar, and at most int64
    nanoseconds (it fails with "invalid duration" past that)."""
    if not GO_DURATION.fullmatch(text):
        return False
    parts = re.findall(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)", text)
    total = sum(Fraction(n) * GO_UNIT_NS[unit] for n, unit in parts)
    return total <= 2**63 - 1 if not text.startswith("-") else total <= 2**63


async def no_such_path(request: Request, exc: Exception) -> Response:
    """Go's net/http 404, as Ollama answers a path it does not serve."""
    return PlainTextResponse("404 page not found", 404)


class FakeOllama:
    """The app plus the bodies it received."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # those of each chat, as requests
        self.ps_asked = 0  # GET /api/ps requests
        self.ps_fails = False  # set: /api/ps answers 500
        self.loaded = {"llama3:latest"}  # the models loaded, by name and tag
        self.loads: list[str] = []  # each load begun, by model
        self.aborted: list[str] = []  # each load its client's disconnect aborted
        self.unloads: list[str] = []  # each unload asked, by model
        self.embed_requests: list[dict[str, Any]] = []
        # The load under way of each model, which every chat of it waits for.
        self._loading: dict[str, asyncio.Task[None]] = {}
        self.app = Starlette(
            routes=[
                Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/embed", self.embed, methods=["POST"]),
                Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/tags", self.tags),
                Route("/api/ps", self.ps),
                Route("/api/version", self.version),
                Route("/health", self.version),
            ],
            exception_handlers={404: no_such_path},
        )

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.5.1"})

    async def tags(self, request: Request) -> Response:
        return JSONResponse(
            {
                "models": [
                    {
                        "name": "llama3:latest",
                        "model": "llama3:latest",
                        "modified_at": CREATED,
                        "size": 1,
                        "digest": "x",
                        "details": {"family": "llama"},
                    }
                ]
            }
        )

    async def ps(self, request: Request) -> Response:
        self.ps_asked += 1
        if self.ps_fails:
            return JSONResponse({"error": "internal error"}, 500)
        while self._loading:  # sched.go's loadedModels waits on each loading runner's lock
            await asyncio.sleep(0.02)
        return JSONResponse(
            {
                "models": [
                    {
                        "name": name,
                        "model": name,
                        "size": 1,
                        "digest": "x",
                        "details": {"family": "llama"},
                        "expires_at": CREATED,
                        "size_vram": 1,
                        "context_length": CONTEXT,
                    }
                    for name in sorted(self.loaded)
                ]
            }
        )

    async def _load(self, request: Request, model: str) -> int | None:
        """Load `model` for this chat, as Ollama's scheduler does: the nanoseconds this
        chat waited for it (0 when it was loaded); None when the client left first. A load
        is tied to the request that began it (sched.go, WaitUntilRunning(req.ctx)): its
        client gone, the load is aborted, and a chat that waited for it begins another."""
        tagged = model if ":" in model else model + ":latest"
        if tagged in self.loaded:
            return 0
        started = time.perf_counter_ns()
        while tagged not in self.loaded:
            load = self._loading.get(tagged)
            own = load is None
            if load is None:
                self.loads.append(model)
                seconds = {"slow-load": LOAD_S, "slow-load-2": 2 * LOAD_S}.get(model, 0.0)
                load = self._loading[tagged] = asyncio.create_task(asyncio.sleep(seconds))
                load.add_done_callback(lambda done: self._loaded(tagged, done))
            while not load.done():
                if await request.is_disconnected():
                    if own:
                        # llama_server.go: "client connection closed before llama-server
                        # finished loading, aborting load".
                        self.aborted.append(model)
                        load.cancel()
                    return None
                await asyncio.sleep(0.02)
            # Its done callback may not have run yet: without this the loop would spin,
            # the load done but not yet counted, and never yield to let it run.
            self._loaded(tagged, load)
        return time.perf_counter_ns() - started

    def _loaded(self, tagged: str, load: asyncio.Task[None]) -> None:
        if self._loading.get(tagged) is load:
            del self._loading[tagged]
        if not load.cancelled():
            self.loaded.add(tagged)

    async def embed(self, request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await request.json()
        self.embed_requests.append(body)
        model = body["model"]
        if model == "error-before":
            return JSONResponse({"error": f"model '{model}' not found"}, 404)
        if model == "busy":
            busy = "server busy, please try again.  maximum pending requests exceeded"
            return JSONResponse({"error": busy}, 503)
        if model == "chat-only":  # a chat model: newer Ollama refuses to embed with it
            return JSONResponse({"error": "this model does not support embeddings"}, 501)
        given = body.get("input", [])
        texts = [given] if isinstance(given, str) and given else given or []
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return JSONResponse({"error": "invalid input type"}, 400)
        load_ns = await self._load(request, model)
        if load_ns is None:
            return Response(status_code=499)
        size = EMBED_DIMENSIONS
        vectors = []
        for text in texts:
            vector = fake_vector(text, size)
            dims = body.get("dimensions") or 0
            if 0 < dims < size:  # as Ollama shortens them: the first ones, unit again
                norm = math.sqrt(sum(x * x for x in vector[:dims])) or 1.0
                vector = [x / norm for x in vector[:dims]]
            vectors.append(vector)
        answer = {
            "model": model,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": load_ns or 1_000,
            "prompt_eval_count": sum(len(t.split()) for t in texts),
        }
        return JSONResponse({**answer, **BOGUS.get(model, {})})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        keep_alive = body.get("keep_alive")
        if isinstance(keep_alive, str) and not go_duration_ns(keep_alive):
            # Ollama reads a string with Go's time.ParseDuration, a number as seconds.
            return JSONResponse({"error": f"time: invalid duration {keep_alive!r}"}, 400)
        model = body["model"]
        if model == "error-before":
            return JSONResponse({"error": f"model '{model}' not found"}, 404)
        if model == "not-pulled":
            return JSONResponse({"error": f'model "{model}" not found, try pulling it first'}, 404)
        if model == "busy":
            # As Ollama answers a full queue (server/routes.go, ErrMaxQueue): 503, no
            # Retry-After.
            busy = "server busy, please try again.  maximum pending requests exceeded"
            return JSONResponse({"error": busy}, 503)
        if model == "no-think" and body.get("think") not in (None, False):
            # routes.go: a model whose capabilities have no thinking.
            return JSONResponse({"error": f'"{model}" does not support thinking'}, 400)
        if model == "cloud":  # routes.go: a cloud model, the server not signed in
            return JSONResponse({"error": "unauthorized", "signin_url": SIGNIN_URL}, 401)
        if model == "text-only" and any(m.get("images") for m in body.get("messages") or []):
            # As Ollama's runner answers images to a model without a projector (its
            # ErrNoVisionModel, a 500).
            error = "this model is missing data required for image input"
            return JSONResponse({"error": error}, 500)
        load_ns = await self._load(request, model)
        if load_ns is None:
            return Response(status_code=499)  # nobody to read it
        if not body.get("messages"):
            done = {"model": model, "created_at": CREATED, "done": True, "done_reason": "load"}
            return JSONResponse({**done, "message": {"role": "assistant", "content": ""}})
        words = ["The", " sky", " is", " blue", "."]
        limit = (body.get("options") or {}).get("num_predict")
        lines = self._lines(model, words, limit, load_ns or 1_000)
        if body.get("stream", True) is False:  # one object, the pieces joined
            return await self._whole(lines)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    async def generate(self, request: Request) -> Response:
        """Ollama's unload: routes.go's GenerateHandler expires the model's runner for a
        request without a prompt whose keep_alive is 0."""
        body = await request.json()
        self.requests.append(body)
        model = body["model"]
        if body.get("prompt") or body.get("keep_alive") not in (0, "0", "0s"):
            return JSONResponse({"error": "the fake only unloads"}, 400)
        if model == "error-before":
            return JSONResponse({"error": f"model '{model}' not found"}, 404)
        self.unloads.append(model)
        self.loaded.discard(model if ":" in model else model + ":latest")
        done = {"model": model, "created_at": CREATED, "response": "", "done": True}
        return JSONResponse({**done, "done_reason": "unload"})

    async def _whole(self, lines: AsyncIterator[bytes]) -> Response:
        """The non-stream answer: the last line, with the content of all of them."""
        text = thinking = ""
        calls: list[Any] = []
        last: dict[str, Any] = {}
        async for raw in lines:
            try:
                last = json.loads(raw)
            except ValueError:
                return JSONResponse({"error": "internal error"}, 500)
            if "error" in last:
                return JSONResponse({"error": last["error"]}, 500)
            text += last["message"]["content"]
            thinking += last["message"].get("thinking", "")
            calls += last["message"].get("tool_calls") or []
        last["message"]["content"] = text
        if thinking:
            last["message"]["thinking"] = thinking
        if calls:
            last["message"]["tool_calls"] = calls
        return JSONResponse(last)

    async def _lines(
        self, model: str, words: list[str], limit: int | None, load_ns: int
    ) -> AsyncIterator[bytes]:
        def line(obj: dict[str, Any]) -> bytes:
            return json.dumps(obj).encode() + b"\n"

        if model in ("tools", "two-tools", "old-tools", "null-args"):
            cities = ["Toronto", "Oslo"] if model == "two-tools" else ["Toronto"]
            calls: list[dict[str, Any]] = [
                {"function": {"name": "get_weather", "arguments": {"city": city}}}
                for city in cities
            ]
            if model in ("tools", "two-tools"):
                for call, city in zip(calls, cities, strict=True):
                    call["id"] = CALL_IDS[city]
            if model == "null-args":
                calls = [{"function": {"name": "get_time", "arguments": None}}]
            yield line(
                {
                    "model": model,
                    "created_at": CREATED,
                    "message": {"role": "assistant", "content": "", "tool_calls": calls},
                    "done": False,
                }
            )
            yield line(
                {
                    "model": model,
                    "created_at": CREATED,
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "stop",
                    "total_duration": 1000,
                    "prompt_eval_count": 10,
                    "eval_count": 3,
                }
            )
            return
        if model == "thinking":  # a thinking model's lines: no content yet
            for part in THINKING:
                message = {"role": "assistant", "content": "", "thinking": part}
                yield line(
                    {"model": model, "created_at": CREATED, "message": message, "done": False}
                )
        sent = 0
        for word in words:
            if limit is not None and sent >= limit:
                break
            if (model == "error-mid" and sent == 2) or model == "error-first":
                yield line({"error": "an error was encountered while running the model"})
                return
            if (model == "huge-error-mid" and sent == 2) or model == "huge-error-first":
                yield line({"error": HUGE_ERROR})
                return
            if model == "malformed" and sent == 1:
                yield b"{this is not json\n"
                return
            yield line(
                {
                    "model": model,
                    "created_at": CREATED,
                    "message": {"role": "assistant", "content": word},
                    "done": False,
                }
            )
            sent += 1
        yield line(
            {
                "model": model,
                "created_at": CREATED,
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "length" if limit is not None and sent >= limit else "stop",
                "total_duration": 5_000_000 + load_ns,
                "load_duration": load_ns,
                "prompt_eval_count": 26,
                **({"prompt_eval_cached_count": CACHED} if model == "cached" else {}),
                "prompt_eval_duration": 100_000,
                "eval_count": sent,
                "eval_duration": 900_000,
                **BOGUS.get(model, {}),
            }
        )
