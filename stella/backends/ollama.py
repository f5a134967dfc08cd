"""The `ollama` backend: Ollama's /api/chat over NDJSON."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextvars import Context
from typing import Annotated, Any

import aiohttp
import msgspec
from msgspec import Meta

from stella.backends.base import (
    BackendEvent,
    BackendHealth,
    CallContext,
    content_of,
    counted,
    detail,
    ended,
    new_call_id,
)
from stella.backends.http import (
    BAD_JSON,
    HttpBackend,
    HttpConfig,
    aiohttp_error,
    error_head,
    iter_lines,
    read_body,
    upstream_text,
)
from stella.backends.ollama_keep_alive import keep_alive_of, unloads
from stella.errors import StellaError, UpstreamError, UpstreamStatus, UpstreamTimeout
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    EmbedRequest,
    EmbedResult,
    ReasoningEffort,
    Think,
    ToolCall,
    Usage,
    effort_for,
    effort_from_thinking,
    wire_tools,
)

# The longest load Ollama's `load_duration` is taken for (nanoseconds, a day): a longer
# one is a broken upstream's number, not a load any call waited for.
MAX_LOAD_NS = 86_400 * 10**9


class OllamaConfig(HttpConfig, kw_only=True):
    """[backends.NAME] with kind = "ollama"."""

    base_url: str = "http://127.0.0.1:11434"
    # How long Ollama keeps the model loaded after a call: seconds (negative: for good)
    # or a Go duration ("5m", "1h30m", "-1s"); empty: Ollama's default.
    keep_alive: int | float | str = ""
    # The longest a model's load may take (a request of its own, which no call's time
    # limit cuts); 0: no load of its own, a call not loaded waits for it within its limits.
    load_timeout_s: Annotated[float, Meta(ge=0)] = 600.0
    # Whether the model reads images (a vision model's `images`). Off for one that reads
    # text only: a user's images go to a fallback that reads them (else a 400), a tool
    # result's are notes, and the model lists leave out `vision`.
    images: bool = True
    # Send a Messages client's thinking (or output_config.effort) as `think`; off for a
    # model that takes none (one that refuses it is learned anyway: see Inference).
    thinking_as_effort: bool = True


def _cloud(model: str) -> bool:
    """Whether Ollama runs `model` on ollama.com (a `:cloud` tag, or one ending `-cloud`):
    nothing loads on the server, and /api/ps never lists it."""
    tag = model.rpartition(":")[2].strip().lower() if ":" in model else ""
    return tag == "cloud" or (tag.endswith("-cloud") and "/" not in tag)


def _listed(running: list[_Running], model: str) -> bool:
    """Whether /api/ps's `running` holds `model` (a route may leave out ":latest")."""
    names = {model} if ":" in model else {model, model + ":latest"}
    return any(m.name in names or m.model in names for m in running)


def _fresh(exc: StellaError) -> StellaError:
    """A copy of a shared load's error for one of the calls that waited for it: the core
    amends the error it is given (its message, when to come back)."""
    copy = type(exc).__new__(type(exc))
    copy.args = exc.args
    copy.__dict__.update(exc.__dict__)
    copy.headers = dict(exc.headers)
    return copy


class _Fn(msgspec.Struct):
    name: str
    # Go encodes a call without arguments (a nil map) as null.
    arguments: dict[str, Any] | None = None


class _Call(msgspec.Struct):
    function: _Fn
    # Recent Ollama names each call (`call_` and 8 random letters or digits); older
    # versions leave it out.
    id: str = ""


class _Msg(msgspec.Struct):
    content: str = ""
    tool_calls: list[_Call] | None = None
    thinking: str = ""  # a thinking model's reasoning, before its content


class _Line(msgspec.Struct):
    message: _Msg | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0  # the whole prompt, its cached tokens included
    eval_count: int = 0
    # Nanoseconds the model took to load (or, loaded, to be found ready) for this call.
    load_duration: int = 0
    # The prompt's tokens read from the model's cache (newer Ollama; absent: not said).
    prompt_eval_cached_count: int | None = None
    error: str | None = None


class _Embedded(msgspec.Struct):
    """/api/embed's answer (api/types.go's EmbedResponse)."""

    embeddings: list[list[float]] = []
    prompt_eval_count: int = 0
    load_duration: int = 0  # nanoseconds
    error: str | None = None


class _Refusal(msgspec.Struct):
    """Ollama's 401 for a cloud model while the server is not signed in to ollama.com."""

    signin_url: str = ""


class _Tag(msgspec.Struct):
    name: str


class _Tags(msgspec.Struct):
    models: list[_Tag] = []


class _Running(msgspec.Struct):
    name: str = ""
    model: str = ""
    context_length: int = 0  # Ollama 0.10 and later; older ones leave it out


class _Ps(msgspec.Struct):
    models: list[_Running] = []


# The longest a listing (stella's /api/ps, /api/show) waits for Ollama's own /api/ps.
CONTEXT_WAIT_S = 2.0
# How long an /api/ps answer (or its failure) stands for the listings that read it.
PS_TTL_S = 5.0
# The longest a chat waits for /api/ps before it decides on a load of its own. Ollama
# answers /api/ps only once a load under way has ended, another client's (Open WebUI,
# `ollama run`) included, which stella cannot see: a call would stall on it for
# CONTEXT_WAIT_S. Past this wait the call loads the model itself, within its limits,
# while the ask goes on and its answer serves the calls after it.
PS_GLANCE_S = 0.25
# OpenAI's reasoning efforts as Ollama's `think` (sent when the request has no `think` of
# its own): Ollama's efforts are low, medium, high and max; none is no thinking.
THINK_FOR_EFFORT: dict[ReasoningEffort, Think] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "max",
}


_line = msgspec.json.Decoder(_Line)
_embedded = msgspec.json.Decoder(_Embedded)
_refusal = msgspec.json.Decoder(_Refusal)
_tags = msgspec.json.Decoder(_Tags)
_ps = msgspec.json.Decoder(_Ps)
_enc = msgspec.json.Encoder()


def request_body(request: ChatRequest, keep_alive: int | float | str | None) -> dict[str, Any]:
    """Ollama's /api/chat body for a ChatRequest."""
    messages = []
    # The tool each call of the history named, by its id: a result that came with only
    # the call's id (OpenAI's, Anthropic's clients) names its tool for Ollama too. Older
    # Ollama versions ignore the ids, and read the tool's name alone.
    tools: dict[str, str] = {}
    for m in request.messages:
        msg: dict[str, Any] = {"role": m.role, "content": content_of(m)}
        if m.images:
            # Base64 alone: an image by URL never gets here (reads_image_urls: a user
            # message's goes to another route, a tool result's is a note in its text). A
            # tool message takes images as a user message does.
            msg["images"] = [image.data for image in m.images]
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                call: dict[str, Any] = {
                    "function": {"name": c.function.name, "arguments": c.function.arguments}
                }
                if c.id:  # Ollama 0.12.10 and later link a result to its call by it
                    call["id"] = c.id
                    tools[c.id] = c.function.name
                calls.append(call)
            msg["tool_calls"] = calls
        if m.role == "tool":
            name = m.name or tools.get(m.tool_call_id or "")
            if name:
                msg["tool_name"] = name
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    o = request.options
    options = {
        k: v
        for k, v in {
            "temperature": o.temperature,
            "top_p": o.top_p,
            "top_k": o.top_k,
            "min_p": o.min_p,
            "repeat_penalty": o.repetition_penalty,
            "presence_penalty": o.presence_penalty,
            "frequency_penalty": o.frequency_penalty,
            "num_predict": o.max_tokens,
            "stop": o.stop,
            "seed": o.seed,
        }.items()
        if v is not None
    }
    body: dict[str, Any] = {"model": request.model, "messages": messages, "stream": True}
    if options:
        body["options"] = options
    if request.tools:
        body["tools"] = wire_tools(request.tools)
    fmt = request.response_format or {}
    if fmt.get("type") == "json_object":
        body["format"] = "json"
    elif fmt.get("type") == "json_schema":
        body["format"] = (fmt.get("json_schema") or {}).get("schema", "json")
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    if request.think is not None:
        body["think"] = request.think
    elif (effort := effort_for(request)) is not None:
        body["think"] = THINK_FOR_EFFORT[effort]
    return body


class OllamaBackend(HttpBackend):
    """Chat through an Ollama server."""

    kind = "ollama"
    # A message's `images`, base64 only: Ollama reads no URL, and stella fetches none.
    reads_image_urls = False
    may_refuse_images = True  # its model may read text only (see `images`)
    Config = OllamaConfig

    def __init__(self, name: str, config: OllamaConfig) -> None:
        super().__init__(name, config)
        self.cfg = config
        self.reads_images = config.images
        self.keep_alive = keep_alive_of(name, config.keep_alive)
        # The last /api/ps answer (monotonic time, models; None: it failed) and the ask in
        # flight: listings of several routes, and clients polling, share one ask.
        self._ps_seen: tuple[float, list[_Running] | None] | None = None
        self._ps_ask: asyncio.Future[list[_Running] | None] | None = None
        # The load under way of each model, shared by the calls that wait for it.
        self._loads: dict[str, asyncio.Task[None]] = {}

    def capabilities(self, upstream_model: str) -> list[str]:
        """Chat and tools."""
        return ["chat", "tools"]

    async def models(self) -> list[str]:
        """GET /api/tags."""
        return [m.name for m in (await self.get_json("/api/tags", _tags)).models]

    async def context_length(self, upstream_model: str) -> int | None:
        """The window Ollama runs the model with (GET /api/ps: its num_ctx, often less than
        the model was trained for); None while it is not loaded there, or unknown."""
        running = await self._running()
        if running is None:
            return None
        # Ollama names a model with its tag; a route may leave out ":latest".
        names = {upstream_model}
        if ":" not in upstream_model:
            names.add(upstream_model + ":latest")
        for m in running:
            if (m.name in names or m.model in names) and m.context_length > 0:
                return m.context_length
        return None

    def _ps_known(self) -> bool:
        """Whether an /api/ps answer (or its failure) younger than PS_TTL_S is at hand."""
        seen = self._ps_seen
        return seen is not None and time.monotonic() - seen[0] < PS_TTL_S

    async def _running(self) -> list[_Running] | None:
        """The upstream's running models (GET /api/ps), at most PS_TTL_S old; None when it
        could not say within CONTEXT_WAIT_S. One ask at a time: a failure is kept as long
        as an answer, so a dead upstream costs a listing that wait once per PS_TTL_S."""
        seen = self._ps_seen
        if seen is not None and self._ps_known():
            return seen[1]
        # Shielded: a listing whose client left must not cancel the others' ask.
        return await asyncio.shield(self._ps_asked())

    def _ps_asked(self) -> asyncio.Future[list[_Running] | None]:
        """The /api/ps ask in flight, begun if there is none."""
        if self._ps_ask is None:
            self._ps_ask = asyncio.ensure_future(self._ask_ps())
        return self._ps_ask

    async def _ask_ps(self) -> list[_Running] | None:
        try:
            async with asyncio.timeout(CONTEXT_WAIT_S):
                models: list[_Running] | None = (await self.get_json("/api/ps", _ps)).models
        except Exception:  # unreachable, an old Ollama, a bad answer: not known, no error
            models = None
        self._ps_seen = (time.monotonic(), models)
        self._ps_ask = None
        return models

    def status_error(self, status: int, headers: Any, body: bytes, url: str = "") -> StellaError:
        """A 401 is Ollama refusing one model (a cloud model, the server not signed in to
        ollama.com), not stella's key: its other models still answer."""
        err = super().status_error(status, headers, body, url)
        if status != 401:
            return err
        try:
            signin = _refusal.decode(body).signin_url
        except BAD_JSON:
            signin = ""
        if not signin and (self.api_key or self.basic or self.http.headers):
            return err  # a key stella sends, refused (a proxy's, ollama.com's): the backend's
        how = "run `ollama signin` on the Ollama server"
        if signin:
            # Its `key` (the server's public key) is masked, as any URL's: whoever opened the
            # link would sign the server in to their own account. The host's `name` shows.
            how += f"; its sign-in link: {upstream_text(signin)}"
        refused = UpstreamStatus(
            f"{err.message}; a cloud model needs the Ollama server signed in to ollama.com: {how}",
            upstream_status=status,
        )
        # One model refused, as a 404 would be: the backend's circuit is not told, and
        # another backend (a fallback) may serve the route.
        refused.code = "upstream_rejected"
        refused.no_verdict = True
        return refused

    async def health(self) -> BackendHealth:
        """GET /api/version: no tokens spent."""
        return await self.probe("/api/version")

    async def aclose(self) -> None:
        """Stop the loads under way, then close the pool."""
        for load in list(self._loads.values()):
            load.cancel()
        await super().aclose()

    async def _loaded(self, model: str, ctx: CallContext) -> None:
        """Return once `model` is loaded upstream: at once when Ollama's /api/ps (at most
        PS_TTL_S old) lists it, or cannot say within PS_GLANCE_S (nor is asked while
        another model loads); else after its load, the one under way when there is one.

        Ollama sends nothing, headers included, until the model is loaded, and aborts the
        load when the request that began it goes (its client's connection closed): a
        call cut at its time to first token took the load with it, and each retry began
        it again. The load is a request of its own (a chat without messages), bounded by
        load_timeout_s alone and shared by every call of the model; a call waiting for it
        counts as alive, so only its total limit ends the wait.
        """
        if not self.cfg.load_timeout_s or not model or _cloud(model):
            return
        load = self._loads.get(model)
        if load is None:
            if self._loads and not self._ps_known():
                # Ollama's /api/ps waits for a load under way to end (sched.go's
                # loadedModels takes each runner's lock, which a loading one holds): asked
                # now, it could not answer in time. Not known, then.
                return
            seen = self._ps_seen
            if seen is not None and self._ps_known():
                running = seen[1]
            else:
                ask = self._ps_asked()
                # A wait, not an await: a call cut here, or past PS_GLANCE_S, leaves the
                # shared ask running (_ask_ps raises nothing, so no error goes unread).
                await asyncio.wait((ask,), timeout=PS_GLANCE_S)
                if not ask.done() or ask.cancelled():
                    return  # no answer yet (a load under way, maybe another client's)
                running = ask.result()
            if running is None or _listed(running, model):
                return  # loaded, or not known: the call itself loads it, within its limits
        load = self._shared_load(model)  # the one begun while this call asked, if any
        started = time.perf_counter()
        # A beat within a quarter of the call's shortest silence limit (at most 1 s).
        beat = min(1.0, ctx.silence_limit_s / 4) if ctx.silence_limit_s else 1.0
        try:
            while not load.done():
                # A wait, not an await of the load: a call cut here leaves it running.
                await asyncio.wait((load,), timeout=beat)
                ctx.alive += 1
        finally:
            waited = time.perf_counter() - started
            ctx.load_ms = (ctx.load_ms or 0.0) + waited * 1000
            if ctx.first_by:
                # Its time to first token ran from the last beat: a chat sent now (after a
                # wait for a pooled connection) is no longer past it.
                ctx.first_by += waited
        self._raise_failed(load, model)

    def _shared_load(self, model: str) -> asyncio.Task[None]:
        """The load of `model` under way, begun if there is none."""
        load = self._loads.get(model)
        if load is None:
            # Not the caller's context: nothing of the call (its pool wait) reaches the load.
            load = asyncio.get_running_loop().create_task(self._load(model), context=Context())
            self._loads[model] = load
            load.add_done_callback(lambda done: self._load_done(model, done))
        return load

    def _raise_failed(self, load: asyncio.Task[None], model: str) -> None:
        """Raise a finished load's error, a copy for each caller that waited for it."""
        if load.cancelled():
            raise UpstreamError(f"{self.name}: the load of {model!r} was stopped")
        exc = load.exception()
        if exc is not None:
            raise _fresh(exc) if isinstance(exc, StellaError) else exc

    async def load(self, upstream_model: str) -> None:
        """Have Ollama load the model now (Ollama's empty chat): the load every call of it
        shares, joined when one is under way, within load_timeout_s."""
        if not upstream_model or _cloud(upstream_model):
            return  # a cloud model runs on ollama.com: nothing loads on the server
        load = self._shared_load(upstream_model)
        # A wait, not an await of the load: a caller gone leaves it running for the others.
        await asyncio.wait((load,))
        self._raise_failed(load, upstream_model)

    async def unload(self, upstream_model: str) -> bool:
        """Have Ollama free the model now (POST /api/generate with keep_alive 0 and no
        prompt, Ollama's documented unload), after a load of it under way, as Ollama frees
        a model once the requests before the unload are done. True once Ollama took it
        (it does not say whether the model was loaded); False for a cloud model, which
        holds nothing on the server."""
        if not upstream_model or _cloud(upstream_model):
            return False
        load = self._loads.get(upstream_model)
        if load is not None:
            await asyncio.wait((load,))  # its failure is the calls' that waited for it
        body = {"model": upstream_model, "keep_alive": 0}
        try:
            await self._post_one_line("/api/generate", body, f"an unload of {upstream_model!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise aiohttp_error(self.name, exc, self.http.connect_timeout_s) from None
        finally:
            self._ps_seen = None  # /api/ps is asked again: it may no longer list the model
        return True

    async def _post_one_line(
        self,
        path: str,
        body: dict[str, Any],
        what: str,
        limits: aiohttp.ClientTimeout | None = None,
    ) -> None:
        """POST `body` to Ollama's `path`, whose answer is one JSON line (a load's, an
        unload's): an error status, a malformed answer or its `error` raises a StellaError
        (`what` names the request: "a load of 'm'"); aiohttp's own errors pass through."""
        url = self.base_url + path
        async with self.session.post(
            url,
            data=_enc.encode(body),
            headers={"content-type": "application/json"},
            timeout=limits or self.session.timeout,  # the load's own, else the session's
            allow_redirects=False,
        ) as r:
            if r.status >= 300:
                # The URL: a 404 that names no model is a wrong base_url, said with its path.
                raise self.status_error(r.status, r.headers, await error_head(r), url)
            raw = await read_body(r, self.name)
        try:
            error = _line.decode(raw).error
        except BAD_JSON:
            raise UpstreamError(f"{self.name}: malformed answer to {what}") from None
        if error is not None:
            raise UpstreamError(f"{self.name}: {upstream_text(error)}")

    def _load_done(self, model: str, load: asyncio.Task[None]) -> None:
        if self._loads.get(model) is load:
            del self._loads[model]
        if not load.cancelled() and load.exception() is None:
            self._ps_seen = None  # /api/ps is asked again: it lists the model now

    async def _load(self, model: str) -> None:
        """Have Ollama load `model` (POST /api/chat without messages: it answers once the
        model is loaded), within load_timeout_s; a failure raises its StellaError."""
        body: dict[str, Any] = {"model": model, "messages": []}
        if self.keep_alive is not None and not unloads(self.keep_alive):
            body["keep_alive"] = self.keep_alive  # 0 would unload it: the chat's sets it
        # load_timeout_s 0 (no load before a chat) still bounds an empty chat's load.
        limit = self.cfg.load_timeout_s or self.http.read_timeout_s
        key = "load_timeout_s" if self.cfg.load_timeout_s else "read_timeout_s"
        timeout = aiohttp.ClientTimeout(total=limit, sock_connect=self.http.connect_timeout_s)
        try:
            await self._post_one_line("/api/chat", body, f"a load of {model!r}", timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and not isinstance(
                exc, aiohttp.ConnectionTimeoutError
            ):
                err = UpstreamTimeout(
                    f"{self.name}: {model!r} did not load within {key} = {limit:g}s"
                )
                # The model's trouble, not the backend's; asked again, the load would
                # begin again from nothing: a fallback is tried instead.
                err.no_verdict = True
                err.same_again = False
                raise err from None
            raise aiohttp_error(self.name, exc, self.http.connect_timeout_s) from None

    async def embed(self, request: EmbedRequest, ctx: CallContext) -> EmbedResult:
        """POST /api/embed: Ollama loads the model itself (no load of stella's: an empty
        chat, its load, is refused by a model that only embeds), within the call's limits."""
        body: dict[str, Any] = {"model": request.model, "input": request.texts()}
        if request.truncate is not None:
            body["truncate"] = request.truncate
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        name = self.name
        raw = await self.whole_answer(self.base_url + "/api/embed", _enc.encode(body), ctx)
        try:
            answer = _embedded.decode(raw)
        except BAD_JSON:
            raise UpstreamError(f"{name}: malformed embed answer") from None
        if answer.error is not None:
            raise UpstreamError(f"{name}: {upstream_text(answer.error)}")
        if 0 < answer.load_duration <= MAX_LOAD_NS:  # Ollama's own load of the model
            ctx.load_ms = answer.load_duration / 1e6
        tokens = counted(answer.prompt_eval_count, ctx)
        if not tokens:
            ctx.usage_estimated = True
        return EmbedResult(embeddings=answer.embeddings, prompt_tokens=tokens)

    def without_derived_reasoning(self, request: ChatRequest) -> ChatRequest | None:
        """`request` without the Anthropic thinking and effort it would send as `think`
        (None: it sends none of theirs; a client's `think`, or reasoning_effort, is the
        client's)."""
        if request.think is not None or effort_from_thinking(request) is None:
            return None
        return msgspec.structs.replace(request, thinking=None, effort=None)

    async def chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        """Stream /api/chat and translate its lines."""
        if not self.cfg.thinking_as_effort:
            request = self.without_derived_reasoning(request) or request
        await self._loaded(request.model or "", ctx)
        body = _enc.encode(request_body(request, self.keep_alive))
        name = self.name
        try:
            async with self.answer(self.base_url + "/api/chat", body, ctx) as r:
                index = 0
                async for raw in iter_lines(r, name):
                    if not raw.strip():
                        continue
                    try:
                        line = _line.decode(raw)
                    except BAD_JSON:
                        raise UpstreamError(f"{name}: malformed stream line") from None
                    if line.error is not None:
                        raise UpstreamError(f"{name}: {upstream_text(line.error)}")
                    ctx.beats += 1  # a thinking model's lines carry no content: still progress
                    msg = line.message
                    if msg is not None:
                        if not line.done:
                            # A line is a token (text, thinking or a call): what a stream
                            # cut before the done line, which has the counts, is charged.
                            ctx.tokens_seen += 1
                        if msg.thinking:
                            yield Delta(text=msg.content, reasoning=msg.thinking)
                        elif msg.content:
                            yield Delta(text=msg.content)
                        for call in msg.tool_calls or ():
                            yield ToolCall(
                                index=index,
                                id=call.id or new_call_id(),
                                name=call.function.name,
                                arguments=call.function.arguments or {},
                            )
                            index += 1
                    if line.done:
                        if 0 < line.load_duration <= MAX_LOAD_NS:  # Ollama's share of the wait
                            ctx.load_ms = (ctx.load_ms or 0.0) + line.load_duration / 1e6
                        cached = detail(line.prompt_eval_cached_count)
                        if cached is not None:
                            ctx.cached_tokens = cached
                        reason = ended(
                            "length" if line.done_reason == "length" else "stop", bool(index)
                        )
                        prompt = counted(line.prompt_eval_count, ctx)
                        made = counted(line.eval_count, ctx)
                        yield Done(finish_reason=reason, usage=Usage(prompt, made, prompt + made))
                        return
                raise UpstreamError(f"{name}: stream ended before done")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise aiohttp_error(name, exc, self.http.connect_timeout_s) from None
