"""The one pipeline every dialect goes through.

`Pipeline.prepare` resolves the model and admits the call (scope, limits,
queue) before any byte is sent, so refusals are plain HTTP errors. The
returned `Inference` then runs the backend chain with timeouts, retries and
fallbacks, hands each delta and tool call to the caller's `emit`, returns
exactly one `Done` or `Error`, and emits exactly one `inference` log event,
whatever happens.
"""

from __future__ import annotations

import asyncio
import math
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import structlog
from starlette.types import Receive

from stella.backends import BackendEvent, CallContext
from stella.calls import ANONYMOUS, Admission, Call, Permit, Principal, prompt_estimate
from stella.cost import usd
from stella.errors import (
    DEFAULT_RETRY_AFTER_S,
    ClientGone,
    ClientTooSlow,
    ContextTooLong,
    InvalidRequest,
    NotSupported,
    Overloaded,
    RateLimited,
    ShuttingDown,
    StellaError,
    Unavailable,
    UpstreamError,
    UpstreamMakesNoEmbeddings,
    UpstreamNoSuchPath,
    UpstreamStatus,
    UpstreamTimeout,
    waited_out,
    whole_seconds,
)
from stella.images import MAX_IMAGES, ImagesSeen, first_images, readable, within_cap
from stella.logs import mask
from stella.protocol import (
    MAX_EMBED_NUMBERS,
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    CompletionTokensDetails,
    Delta,
    Done,
    EmbedRequest,
    EmbedResult,
    Error,
    FunctionCall,
    Message,
    Options,
    PromptTokensDetails,
    RedactedThinking,
    SignedThinking,
    Start,
    ThinkingBlock,
    Timings,
    ToolCall,
    ToolCallRef,
    ToolChoice,
    Usage,
    arguments_text,
)
from stella.routing import Route, Router
from stella.trace import new_span
from stella.watchdog import Watchdog, backoff, close_quietly, error_text

if TYPE_CHECKING:  # streaming imports this module
    from stella.streaming import Drain

_log = structlog.get_logger("stella")
Emit = Callable[[Delta | ToolCall], Awaitable[None]]
# A model name longer than this is no route's: refused before it is looked up, logged
# and counted (with models.allow_direct, any name reaches the usage counters).
MAX_MODEL_NAME = 256
# Client metadata goes into every log line of its request: bounded like the rest of it.
# The ceiling holds metadata within OpenAI's documented bounds (16 keys of up to 64
# characters, values up to 512: the Responses dialect keeps to them, OpenAI's clients
# send no more) with a `user` beside it (up to 512 characters), whatever characters
# they are: each is at most 6 bytes of JSON (`\u0001`), 58,475 bytes in all with the
# quotes, colons and commas. Metadata within those bounds never fails on its bytes.
MAX_METADATA_DEPTH = 16
MAX_METADATA_BYTES = 65_536
_metadata_json = msgspec.json.Encoder()


class SinkClosed(Exception):
    """Raised by an `emit` callback: the client can no longer be written to."""


Listener = Callable[[dict[str, Any]], None]


# How long a call that reaches admission during a drain may take to be admitted: a free
# slot, not a wait for one.
DRAIN_ADMIT_S = 0.5

# The most routes' models (backend, upstream model) a process remembers of each thing it
# learns of them from their upstreams' refusals (see LearnedModels); the oldest forgotten.
MAX_LEARNED_MODELS = 1024
# What Ollama's runner answers (a 500) for images sent to a model without a projector.
NO_VISION = "missing data required for image input"


class LearnedModels:
    """Routes' models, (backend, upstream model), an upstream's refusal taught this process
    to ask otherwise (at most MAX_LEARNED_MODELS, the oldest forgotten; a restart forgets
    them), with one warning `event` each, naming it and `reason`."""

    __slots__ = ("event", "models", "reason")

    def __init__(self, event: str, reason: str) -> None:
        self.event = event
        self.reason = reason
        self.models: dict[tuple[str, str], None] = {}

    def __contains__(self, route: Route) -> bool:
        return bool(self.models) and (route.backend_name, route.upstream_model) in self.models

    def learn(self, route: Route) -> None:
        """Remember `route`'s model; a warning the first time."""
        key = (route.backend_name, route.upstream_model)
        if key in self.models:
            return
        if len(self.models) >= MAX_LEARNED_MODELS:
            del self.models[next(iter(self.models))]
        self.models[key] = None
        _log.warning(
            self.event,
            backend=route.backend_name,
            route=route.name,
            upstream_model=route.upstream_model,
            reason=self.reason,
        )


class Pipeline:
    """Routes, admits, runs and logs inferences."""

    def __init__(
        self,
        router: Router,
        emit: Callable[[str, dict[str, Any]], None],
        *,
        admission: Admission | None = None,
        log_content: bool = False,
    ) -> None:
        self.router = router
        self.emit = emit
        self.admission = admission or Admission()
        self.log_content = log_content
        self.listeners: list[Listener] = []
        self.active: set[Inference] = set()
        # The calls waiting for admission, by route name: with `active`, what keeps a
        # removed route's name (and its metric series) until its calls are counted.
        self.admitting: dict[str, int] = {}
        router.in_use = self.in_flight
        # The server's Drain (streaming.Drain), when there is one: a wait for a slot
        # is one of the calls a shutdown ends.
        self.drain: Drain | None = None
        # The routes' models whose upstream refused a tool result's image and answered
        # with a note in its place: later calls send them notes at once, rather than a
        # request every turn of a session would see refused.
        self.text_only = LearnedModels(
            "tool_images_as_notes",
            "its upstream refused a tool result's image and answered with a note in its "
            "place: from now on its tool results' images are notes (set the backend's "
            "images = false if its model reads text only)",
        )
        # The routes' models whose upstream refused the reasoning stella derived from
        # another dialect's words (thinking from a reasoning effort, an effort from
        # Anthropic's thinking) and answered without it: later calls are sent none.
        self.no_derived_reasoning = LearnedModels(
            "derived_reasoning_dropped",
            "its upstream refused the reasoning asked of it in another dialect's words "
            "(thinking from a reasoning_effort or think, a reasoning effort from a "
            "Messages client's thinking or effort) and answered without it: from now on "
            "it is not asked (see the backend's reasoning_effort_as or thinking_as_effort)",
        )

    def in_flight(self) -> set[str]:
        """The route names of the calls admitted and not yet counted, and of those waiting
        to be admitted."""
        names = {inference.route.name for inference in self.active}
        names.update(self.admitting)
        return names

    def _route(self, request: ChatRequest, call: Call) -> Route:
        """The checked request's route, one the caller's key may use."""
        if not request.messages:
            raise InvalidRequest("$.messages: must contain at least one message", param="messages")
        if request.metadata:
            _check_metadata(request.metadata)
        if request.response_format is not None:
            _check_response_format(request.response_format)
        model = request.model
        if model is not None and len(model) > MAX_MODEL_NAME:
            raise InvalidRequest(f"$.model: over {MAX_MODEL_NAME} characters", param="model")
        choice = request.tool_choice
        if choice is not None and choice != "none" and choice != "auto":
            if not request.tools:
                raise InvalidRequest(
                    f"$.tool_choice: {_choice_name(choice)} without tools", param="tool_choice"
                )
            if not isinstance(choice, str) and all(
                t.function.name != choice.function.name for t in request.tools
            ):
                raise InvalidRequest(
                    f"$.tool_choice.function.name: no tool named {choice.function.name!r}",
                    param="tool_choice.function.name",
                )
        if (orphan := orphan_result(request.messages)) is not None:
            # A client's mistake, refused as every upstream would (OpenAI's and Anthropic's
            # with a 400 that reached the client as a 502), before any backend is asked.
            i, stray = orphan
            if stray is None:
                raise InvalidRequest(
                    f"$.messages[{i}]: a tool message must follow an assistant message "
                    "with tool_calls (only other tool messages between)",
                    param=f"messages[{i}]",
                )
            raise InvalidRequest(
                f"$.messages[{i}].tool_call_id: {stray!r} is no call of the assistant "
                "turn before it",
                param=f"messages[{i}].tool_call_id",
            )
        return self._resolve(request.model, call)

    def _resolve(self, model: str | None, call: Call) -> Route:
        """The route of `model` (None: the default), one the caller's key may use."""
        principal = call.principal
        scope = principal.scope
        router = self.router
        if call.backend:
            route = router.direct(call.backend, model, scope)
        else:
            route = router.resolve(model, scope)
        principal.check(route.name, asked=model)  # an alias keeps its route unnamed
        if route.pool:
            if call.pin:  # `provider` named one of its backends
                route = route.member(call.pin)
            elif call.backend or router.target(model or router.default) is None:
                # A direct `backend/model` name: the member on the backend it names.
                call.pin = route.backend_name
        return route

    async def prepare(self, request: ChatRequest, call: Call) -> Inference:
        """Resolve and admit; raises a StellaError that becomes an HTTP error."""
        route = self._route(request, call)
        router = self.router
        images = first_images(request.messages)
        if images is not None and images.total > MAX_IMAGES:
            request = _within_cap(request)
            images = first_images(request.messages)
        picked = False
        usable = None
        others: tuple[str, ...] = ()
        if route.pool:  # a balanced route; none costs nothing here
            if images is not None and images.first is not None:
                usable = partial(_reads, images=images)
            picked = not call.pin  # a named backend keeps the call
            if picked:
                route = router.pick(route, usable, self.admission.backend_free)
                # Should its slots be full when the call gets to them (they may free
                # meanwhile, or fill while it waits for its key's): the first to free.
                others = self._others(route, usable)
        started = time.perf_counter()
        try:
            inference = await self._admitted(route, request, call, images, picked, None, others)
        except Overloaded as exc:
            spill = self._spill(route, exc, usable, call)
            if spill is None:
                raise
            inference = await self._admitted(spill, request, call, images, True, started)
        self.active.add(inference)
        return inference

    def _others(self, route: Route, usable: Callable[[Route], bool] | None) -> tuple[str, ...]:
        """The backends of balanced `route`'s pool besides its own whose slot a call that
        must wait for one may take instead (whichever frees first): those whose circuit
        lets a call go, and that are `usable` when `route` is (e.g. read its images)."""
        breakers = self.router.breakers
        keep = usable if usable is not None and usable(route) else None
        return tuple(
            m.backend_name
            for m in route.pool
            if m is not route and breakers[m.backend_name].available() and (keep is None or keep(m))
        )

    def _spill(
        self, route: Route, exc: Overloaded, usable: Callable[[Route], bool] | None, call: Call
    ) -> Route | None:
        """Another backend of balanced `route` with a slot free now, for a call refused
        because `route`'s backend's slots (limits.backends) stayed full for its whole wait
        (None: no other has one): a 503 while a backend of the route is idle helps no one.
        None for a call named to its backend (`call.pin`): it stays there, as a route
        without `balance` would, and gets the 503."""
        if exc.backend != route.backend_name or not route.pool or call.pin:
            return None
        # Picked among the others alone: `route`'s slots were just found full, though with
        # Redis this process's guess (`free`) may still call them free (another replica's).
        others = self._others(route, usable)
        if not others:
            return None
        free = self.admission.backend_free
        spill = self.router.pick(route, lambda m: m.backend_name in others, free)
        return spill if spill.backend_name in others and free(spill.backend_name) else None

    async def _admit_on(
        self,
        call: Call,
        route: Route,
        request: ChatRequest,
        backend_slot: bool,
        started: float | None = None,
        others: tuple[str, ...] = (),
        chain: Sequence[Route] = (),
    ) -> tuple[Permit, float, str]:
        """Admission on `route` (`backend_slot`: with a slot of its backend, or of one of
        `others`, whichever frees first: the permit's `backend` then names it): the permit,
        the milliseconds waited for it (since `started`, when given: a wait for another
        backend's slot before it), and the backend the call is counted on in Router.busy
        ("": none), counted from before admission, not from its first attempt: calls
        admitted together, and those waiting for a slot, see each other's choice."""
        busy = self.router.busy
        counted = ""
        if backend_slot and busy and route.backend_name in busy:
            counted = route.backend_name
            busy[counted] += 1
        if started is None:
            started = time.perf_counter()
        try:
            permit = self.admission.admit_now(call, route, request, backend_slot, chain)
            waited = 0.0
            if permit is None:  # a wait is possible (a concurrency slot, Redis): it is timed
                permit = await self._admit_waiting(
                    call, route, request, backend_slot, others, chain
                )
                waited = (time.perf_counter() - started) * 1000
        except BaseException:
            if counted:
                busy[counted] -= 1
            raise
        if permit.backend and counted:  # another backend's slot freed first: counted there
            busy[counted] -= 1
            counted = permit.backend
            busy[counted] += 1
        return permit, waited, counted

    async def _admitted(
        self,
        route: Route,
        request: ChatRequest,
        call: Call,
        images: ImagesSeen | None,
        picked: bool,
        started: float | None = None,
        others: tuple[str, ...] = (),
    ) -> Inference:
        """The call on `route` (a balanced route's member, `picked` by load), admitted
        (`started`: when its wait for admission began, if before this admission; `others`:
        backends of its pool whose slot it may take instead, should route's be full)."""
        router = self.router
        chain = self._chain(route, call, images)
        text_only = images is not None and images.first is not None and not _reads(route, images)
        breakers = router.breakers
        for r in chain:
            if breakers[r.backend_name].available() and not (text_only and r is route):
                break
        else:
            raise self._circuits_open(route, chain[1:] if text_only else chain)
        # The route's own circuit is open, a fallback's is not: the fallbacks serve, and the
        # call neither waits for nor holds a slot of a backend it will not use. So with
        # images the route's backend cannot read: a fallback that reads them answers.
        skip = r is not route
        # Backend admission (e.g. a full local queue) refuses before the first byte;
        # a route with fallbacks lets the chain try the next one instead.
        if len(chain) == 1:
            route.backend.admit(request)
        if skip:
            others = ()
        # The key's budget reserves at the dearest price of the routes that may answer:
        # a fallback dearer than the route asked for could otherwise spend past it.
        permit, waited, counted = await self._admit_on(
            call, route, request, not skip, started, others, chain
        )
        if permit.backend:  # another backend of the pool freed a slot first: it serves
            route = route.member(permit.backend)
            chain = self._chain(route, call, images)
        if picked:
            router.took(route)
        inference = Inference(self, route, chain, request, call, permit, waited)
        inference.busy = counted
        inference.skip_first = "" if not skip else "text_only" if text_only else "circuit_open"
        if images is not None:
            inference.images = images.total
        inference.backend_held = not skip
        return inference

    def _chain(self, route: Route, call: Call, images: ImagesSeen | None) -> list[Route]:
        """The routes a call on `route` tries in turn: its pool's other backends, then the
        fallbacks its key may use, those that read its images when it has some."""
        seen = images if images is not None and images.first is not None else None
        # A balanced fallback's member that reads the images, however busy: one that
        # reads text only would be dropped from the chain below.
        usable = None if seen is None else partial(_reads, images=seen)
        chain = self.router.chain(route, pick=True, usable=usable)
        scope = call.principal.scope
        if scope is not None and len(chain) > 1:
            # A fallback is a model like any other: a key reaches only those in its scope.
            chain = [r for r in chain if r.name == route.name or scope(r.name)]
        if seen is not None:
            chain = _image_readers(route, chain, seen)
        return chain

    def embed_route(self, model: str | None, call: Call) -> Route:
        """The route an embed call of `model` goes to: one the key may use, on a backend
        that makes embeddings (else a 400 `not_supported`, before any admission)."""
        if model is not None and len(model) > MAX_MODEL_NAME:
            raise InvalidRequest(f"$.model: over {MAX_MODEL_NAME} characters", param="model")
        route = self._resolve(model, call)
        if route.pool and not call.pin:
            # The same model on each backend: the same vectors, whichever answers.
            route = self.router.pick(route, _makes_embeddings, self.admission.backend_free)
        backend = route.backend
        if not backend.makes_embeddings:
            what = f"model {model!r}" if model else "the default model"
            raise NotSupported(
                f"{what} does not make embeddings (its backend, {backend.kind}, has none)",
                param="model",
            )
        return route

    async def prepare_embed(
        self, request: EmbedRequest, call: Call, metadata: dict[str, Any] | None = None
    ) -> EmbedInference:
        """Resolve and admit an embed call as a chat is (key scope, rate limits, slots, the
        circuit), with no fallback: another model's vectors are not comparable with this
        one's, so a client that stores them would mix two spaces without a word."""
        model = request.model
        _check_numbers(request)
        route = self.embed_route(model, call)
        picked = bool(route.pool) and not call.pin
        # Should its slots be full when the call gets to them: the first to free, as a chat.
        others = self._others(route, _makes_embeddings) if picked else ()
        texts = request.texts()
        # What admission reads: the inputs as the prompt (the token estimate a rate limit
        # reserves, settled with the real count) and no answer to reserve for but a token.
        chat = ChatRequest(
            messages=[Message(role="user", content=t) for t in texts],
            model=model,
            stream=False,
            options=Options(max_tokens=1),
            metadata=metadata,
        )
        started = time.perf_counter()
        try:
            inference = await self._embed_admitted(route, chat, call, picked, None, others)
        except Overloaded as exc:
            spill = self._spill(route, exc, _makes_embeddings, call)
            if spill is None or not spill.backend.makes_embeddings:
                raise
            inference = await self._embed_admitted(spill, chat, call, True, started)
        inference.embed_request = request
        self.active.add(inference)
        return inference

    async def _embed_admitted(
        self,
        route: Route,
        chat: ChatRequest,
        call: Call,
        picked: bool,
        started: float | None = None,
        others: tuple[str, ...] = (),
    ) -> EmbedInference:
        """The embed call on `route` (a balanced route's member, `picked` by load), admitted
        (`chat`: its inputs as admission reads them; `started`, `others`: as for
        `_admitted`)."""
        chain = _embed_chain(self.router, route)
        breakers = self.router.breakers
        if not any(breakers[r.backend_name].available() for r in chain):
            raise self._circuits_open(route, chain)
        # A named backend whose circuit is open: another member answers, as for a chat,
        # and the call neither waits for nor holds a slot of the backend it skips.
        skip = not breakers[route.backend_name].available()
        if not skip:
            route.backend.admit(chat)
        permit, waited, counted = await self._admit_on(
            call, route, chat, not skip, started, () if skip else others
        )
        if permit.backend:  # another backend of the pool freed a slot first: it serves
            route = route.member(permit.backend)
            chain = _embed_chain(self.router, route)
        if picked:
            self.router.took(route)
        inference = EmbedInference(self, route, chain, chat, call, permit, waited)
        inference.busy = counted
        if skip:
            inference.skip_first = "circuit_open"
            inference.backend_held = False
        return inference

    def _circuits_open(self, route: Route, chain: list[Route]) -> Unavailable:
        """The 503 for a call whose chain has no backend with a circuit that lets it go."""
        breakers = self.router.breakers
        wait = min(breakers[r.backend_name].retry_after() for r in chain)
        # The breaker is a backend's, shared by every route on it: the message names
        # it, or a model that never failed reads as the one at fault.
        held = sorted({r.backend_name for r in chain})
        why = (
            f"backend {held[0]!r} has its circuit open"
            if len(held) == 1
            else f"backends {', '.join(map(repr, held))} have their circuits open"
        )
        return Unavailable(f"model {route.name!r} is unavailable: {why}", retry_after=wait)

    async def count(self, request: ChatRequest, call: Call) -> int:
        """The prompt tokens of `request` as the model asked for reads them, counted by its
        route's backend. Checked, resolved and scoped as an inference is, but none: no
        admission (rate limits, slots), no log event, no usage; an open circuit refuses it."""
        route = self._route(request, call)
        breakers = self.router.breakers
        members = [route]
        if route.pool and not breakers[route.backend_name].available():
            # Another backend of a balanced route serves the same upstream model: its count
            # is the model's, as its answers are.
            members = self.router.members(route)
            route = next((r for r in members if breakers[r.backend_name].available()), route)
        # The route's own backend, never a fallback: another tokenizer's count is another
        # number, and the client sizes its context for the model it asks.
        backend = route.backend
        images = first_images(request.messages)
        if images is not None and images.total > MAX_IMAGES:
            request = _within_cap(request)
        if images is not None and images.first is not None:
            _image_readers(route, [route], images)
        if not breakers[route.backend_name].available():
            # Refused as a message with no fallback is, not sent to a backend known to be
            # down; a half-open circuit's probe is left to a message, whose answer says
            # whether the backend generates again (a count's says less). A balanced route's
            # names each of its backends, as a message's 503 does.
            raise self._circuits_open(route, members)
        ctx = CallContext(request_id=call.request_id, route=route.name, span=new_span(call.headers))
        limit = min(route.settings.ttft_timeout_s, route.settings.total_timeout_s)
        try:
            async with asyncio.timeout(limit) as within:
                return await backend.count_tokens(for_backend(request, route), ctx)
        except NotSupported as exc:
            what = f"model {request.model!r}" if request.model else "the default model"
            raise NotSupported(
                f"token counting is not available for {what}: {exc.message}"
            ) from None
        except TimeoutError:
            if not within.expired():
                raise
            # A count is one short answer: the wait a call's first token is allowed bounds it.
            raise UpstreamTimeout(
                f"no token count from {route.backend_name!r} within {limit:g}s"
            ) from None

    async def _admit_waiting(
        self,
        call: Call,
        route: Route,
        request: ChatRequest,
        backend_slot: bool,
        others: tuple[str, ...] = (),
        chain: Sequence[Route] = (),
    ) -> Permit:
        """Admission that may wait: a shutdown ends the wait (503 shutting_down), and a
        client that leaves gives up its place (499 client_closed), before any backend."""
        task = asyncio.current_task()
        assert task is not None
        drain = self.drain
        if drain is not None:
            if drain.over:
                # Refused here: entering would cancel the task, and a free slot's admission
                # never pauses to take that cancel (it would wait for the caller's next await).
                raise ShuttingDown()
            drain.enter(call, task, waiting=True)
        watcher = (
            asyncio.get_running_loop().create_task(watch_leaving(call.receive, call, task))
            if call.receive is not None
            else None
        )
        # Only a wait can see its route removed before the call is admitted (`active`).
        admitting = self.admitting
        name = route.name
        admitting[name] = admitting.get(name, 0) + 1
        try:
            admit = self.admission.admit(call, route, request, backend_slot, others, chain)
            if drain is not None and drain.draining:
                # Reached admission after the drain began: a free slot is taken (with Redis
                # after a round trip), a real wait is refused, as calls waiting when the
                # drain began were.
                try:
                    # In this task (not wait_for's own): a cancel from outside meets the
                    # check below, whatever admission did with it.
                    async with asyncio.timeout(DRAIN_ADMIT_S):
                        permit = await admit
                except TimeoutError:
                    raise ShuttingDown() from None
            else:
                permit = await admit
            if call.cancel_reason is not None and task.cancelling():
                # Cancelled, and admitted all the same: a library's own timeout (redis-py
                # wraps its socket calls in wait_for) returned its result instead of the
                # cancel. The call still ends as the cancel meant, before any backend.
                permit.settle(Usage(0, 0, 0))
                permit.release()
                raise asyncio.CancelledError
            return permit
        except asyncio.CancelledError:
            reason = call.cancel_reason
            if reason is None:
                raise
            task.uncancel()
            call.cancel_reason = None  # the call is over before it began: nothing to cut
            if reason == "shutting_down":
                raise ShuttingDown() from None
            raise ClientGone("the client left while waiting for a slot") from None
        finally:
            if admitting[name] == 1:
                del admitting[name]
            else:
                admitting[name] -= 1
            if watcher is not None:
                watcher.cancel()
            if drain is not None:
                drain.leave(task)


def _producing(watchdog: Watchdog, now: float, total_s: float) -> bool:
    """Whether a backend cut by the request's time, on a route whose own total limit is
    `total_s`, was still producing: seen at work within the last half of that limit. A
    cut while producing is the request's time running out, no verdict on the backend;
    silent that long, it had stalled. (A fallback given only the request's last moments
    is judged by its own limit, not that sliver: it is no stall to be slower.)"""
    return watchdog.silence(now) < total_s / 2


async def watch_leaving(receive: Receive, call: Call, task: asyncio.Task[Any]) -> None:
    """Cancel `task`, as `call`'s client leaving, when ASGI `receive` says it disconnected
    (the request's body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            call.cancel_reason = "client_closed"
            task.cancel()
            return


class Inference:
    """One admitted call: its events, its outcome, its one log event."""

    # What the call does, as its log event's `op` says: a chat (every dialect's chat,
    # generate, messages and responses calls) or an embed.
    op: ClassVar[str] = "chat"

    __slots__ = (
        "admit_ms",
        "attempts",
        "backend_held",
        "backend_name",
        "busy",
        "call",
        "chain",
        "collect",
        "completion_tokens",
        "created",
        "ctx",
        "discarded_by",
        "ends_at",
        "engine_ttft_ms",
        "error",
        "estimated",
        "fallback_permit",
        "fallback_slot",
        "finish_reason",
        "images",
        "logged",
        "permit",
        "pipeline",
        "plain_reasoning",
        "queue_ms",
        "reasonings",
        "request",
        "route",
        "sealed",
        "skip_first",
        "slow",
        "span",
        "t0",
        "t_end",
        "task",
        "terminal",
        "texts",
        "thinking_blocks",
        "timings",
        "tool_calls",
        "tool_notes",
        "ttft",
        "upstream_model",
        "usage",
        "waited_ms",
    )

    def __init__(
        self,
        pipeline: Pipeline,
        route: Route,
        chain: list[Route],
        request: ChatRequest,
        call: Call,
        permit: Permit,
        admit_ms: float = 0.0,
    ) -> None:
        self.pipeline = pipeline
        self.route = route
        self.chain = chain
        self.request = request
        self.call = call
        self.permit = permit
        # Time limits run from here; a wait for a concurrency slot before it (admit_ms)
        # is added to the reported queue_ms, ttft and total, not to the limits.
        self.t0 = time.perf_counter()
        # When the asked route's total limit ends: the whole request's, its answer's last
        # write included (the stream's last lines, a non-stream answer's bytes).
        self.ends_at = self.t0 + route.settings.total_timeout_s
        self.admit_ms = admit_ms
        self.created = time.time()
        # stella's span: every attempt's upstream request names it as its parent.
        self.span = new_span(call.headers)
        self.ttft: float | None = None
        self.queue_ms = admit_ms
        self.engine_ttft_ms: float | None = None
        self.attempts: list[dict[str, Any]] = []
        self.backend_name = route.backend_name
        self.upstream_model = route.upstream_model
        self.usage = Usage()
        self.completion_tokens = 0  # the last attempt's Deltas
        # Whether some of the usage is stella's count, not the backend's (see finish).
        self.estimated = False
        # Tokens of attempts that failed after producing them and were answered again
        # (a non-stream call's; a stream's that sent only reasoning its client is not
        # shown), by the route that made them: the client never sees them, the upstream
        # made (and may bill) them.
        self.discarded_by: dict[str, int] | None = None
        self.finish_reason: str = "error"
        self.error: StellaError | None = None
        self.texts: list[str] = []
        self.reasonings: list[str] = []  # the reasoning's pieces, collected as the texts
        # The reasoning an Anthropic upstream signed, block by block (collected as the
        # texts), and how many of its pieces the last block's signature ended.
        self.thinking_blocks: list[SignedThinking] = []
        self.sealed = 0
        self.tool_calls: list[ToolCall] = []
        self.logged = False
        self.terminal = False
        self.t_end = 0.0
        self.timings: Timings | None = None  # those of the Done, for the log event
        # (seconds, callback): run once if the call is still going after that long.
        self.slow: tuple[float, Callable[[], Any]] | None = None
        self.task: asyncio.Task[Any] | None = None  # the task running it, when known
        # The permit of the fallback route being tried (its model's own limits): given
        # back when it fails, settled with the usage when the call ends on it.
        self.fallback_permit: tuple[str, Permit] | None = None  # (route name, permit)
        # The slot of a balanced fallback's backend taken after another of its backends
        # failed (the fallback's model limits stay with fallback_permit): given back with it.
        self.fallback_slot: Permit | None = None
        # Why the route's own backend is not tried at all, admitted without its slot
        # ("": it is): its circuit is open (circuit_open), or the request's images are more
        # than it can read (text_only) and a fallback reads them.
        self.skip_first = ""
        self.images = 0  # how many images the request's messages carry
        # The routes whose upstream refused the tool results' images in this call: sent
        # them as notes since (see _images_refused).
        self.tool_notes: tuple[str, ...] = ()
        # The routes whose upstream refused the reasoning stella derived for it in this
        # call: sent none since (see _reasoning_refused).
        self.plain_reasoning: tuple[str, ...] = ()
        # Whether the call holds its route's backend's slot (when limits.backends sets one).
        self.backend_held = True
        # The waits settled before the current attempt: for admission, for fallbacks'
        # backend slots, in earlier attempts' backend queues (queue_ms adds the current
        # attempt's own wait to it).
        self.waited_ms = admit_ms
        self.ctx: CallContext | None = None  # the last attempt's
        self.collect = not request.stream or pipeline.log_content
        # The backend of a balanced route the call is counted on in Router.busy ("": none).
        self.busy = ""

    def busy_on(self, backend: str) -> None:
        """Count the call as in flight on `backend` (when a balanced route has it; "": on
        none), no longer on the one before."""
        busy = self.pipeline.router.busy
        was = self.busy
        if was:
            busy[was] -= 1
        if backend in busy:
            busy[backend] += 1
            self.busy = backend
        else:
            self.busy = ""

    def start_event(self) -> Start:
        """The `start` line, sent before the backend produces anything."""
        return Start(
            id=self.call.request_id,
            model=self.route.name,
            backend=self.route.backend_name,
            created=round(self.created, 3),
        )

    async def run(
        self, emit: Emit | None = None, shows_reasoning: bool = True, shows_signatures: bool = True
    ) -> Done | Error:
        """Run the backend chain: deltas and tool calls go to `emit`; returns the terminal event.

        The events are pushed, not pulled: a token crosses one await instead
        of two generator frames. Whatever happens, the answer ends in exactly
        one Done or Error (returned, for the caller to send) and one log event.
        `emit` raises SinkClosed when the client can no longer be written to.
        Without `shows_reasoning` (the client's dialect has no place for it), a Delta
        of reasoning alone is not emitted: until something else is, a stream's failure
        may start the answer over, as a non-stream call's does. Nor, then, is one of a
        signature alone (or a redacted block) without `shows_signatures`.
        """
        router = self.pipeline.router
        # Nothing has reached the client yet, and its dialect shows no reasoning.
        unseen = emit is not None and not shows_reasoning
        # The asked route's total limit bounds the whole request; a fallback's own limit
        # runs from its turn, within that bound.
        asked_total = self.route.settings.total_timeout_s
        end = self.ends_at
        watchdog = Watchdog(end, self.task)
        if self.slow is not None:
            watchdog.at, watchdog.then = self.t0 + self.slow[0], self.slow[1]
        last: StellaError | None = None
        # When (on the perf_counter clock) a route of the chain may take the call again,
        # the soonest any said: one that could not be tried (its circuit open, its limits
        # full) or whose upstream asked for a pause (its Retry-After). A client told to
        # come back sooner would find the chain's first route still refusing it.
        soonest = math.inf  # none known
        # Fallbacks whose turn came after the request's time had run out: never tried.
        untried: list[str] = []
        turned = ""  # the balanced fallback whose turn this call moved
        try:
            for route in self.chain:
                if route is self.route and self.skip_first:
                    # Never sent: its circuit is open, or (text_only) its answer would be
                    # one made without the request's images.
                    self.attempts.append(
                        {
                            "backend": route.backend_name,
                            "route": route.name,
                            "error": self.skip_first,
                        }
                    )
                    if self.skip_first == "circuit_open":
                        wait = router.breaker(route.backend_name).retry_after()
                        soonest = min(soonest, time.perf_counter() + wait)
                        last = self.pipeline._circuits_open(route, [route])
                    continue
                rs = route.settings
                start = self.t0
                if route is not self.route:
                    # The one before failed: its place goes back (its backend's alone when
                    # this is another backend of the same balanced fallback).
                    self._give_back_fallback(
                        keep=route.name if route.name != self.route.name else ""
                    )
                    if route.backend_name != self.route.backend_name:
                        # On to another backend: the first one's slot may serve another call.
                        self.permit.release_backend()
                        self.backend_held = False
                    start = time.perf_counter()
                    if start >= end:
                        self._out_of_time(route, untried)
                        continue
                # This route's time: its own total limit from its turn, within the request's.
                deadline = min(end, start + rs.total_timeout_s)
                # The limit that ends it, as messages name it.
                total_s = rs.total_timeout_s if deadline < end else asked_total
                if route is not self.route:
                    # An open circuit is recorded below, without spending the route's limits.
                    if router.breaker(route.backend_name).available():
                        refused = await self._admit_fallback(route, deadline)
                        if refused is not None:
                            # A per-minute limit frees soon; a used-up daily quota (not
                            # retryable) only at midnight, which is no time for a client to
                            # come back to a chain whose first route failed for a moment.
                            if refused.retry_after is not None and refused.retryable:
                                wait = refused.retry_after
                                soonest = min(soonest, time.perf_counter() + wait)
                            last = last or refused
                            continue
                        if route.pool and route.name not in (self.route.name, turned):
                            # A balanced fallback's turn moves when tried, once: as the
                            # asked route's, by the backend picked, not by the others.
                            router.took(route)
                            turned = route.name
                breaker = router.breaker(route.backend_name)
                watchdog.deadline = deadline
                for attempt in range(rs.retries + 1):
                    if time.perf_counter() >= deadline:
                        if not attempt:  # its wait for a slot took the time: not tried
                            self._out_of_time(route, untried)
                        break  # out of time: no attempt, and no backend blamed for it
                    if not breaker.allow():
                        self.attempts.append(
                            {
                                "backend": route.backend_name,
                                "route": route.name,
                                "error": "circuit_open",
                            }
                        )
                        wait = breaker.retry_after()
                        soonest = min(soonest, time.perf_counter() + wait)
                        # Opened since the call was admitted (e.g. while it waited for a
                        # slot): in the words a call refused at the door for it reads.
                        last = last or self.pipeline._circuits_open(route, [route])
                        break
                    # Only the call that took a half-open circuit's probe may give it back.
                    probe = breaker.state == "half_open"
                    try:
                        if attempt:
                            hint = last.retry_after_hint if last is not None else None
                            if hint is not None and hint > rs.retry_max_backoff_s:
                                # The upstream asked for a longer pause than the route
                                # waits: asking it sooner would only be refused again.
                                if probe:
                                    breaker.release()
                                break
                            pause = backoff(
                                rs.retry_backoff_s, rs.retry_max_backoff_s, attempt, last
                            )
                            if time.perf_counter() + pause >= deadline:
                                if probe:
                                    breaker.release()
                                break  # no time left for another try within the total limit
                            await asyncio.sleep(pause)
                        opened = await self._first(route, watchdog, total_s)
                        if isinstance(opened, StellaError) and self._images_refused(route, opened):
                            # A model that reads text only refused the tool results' images
                            # (llama.cpp without a projector): once more with notes in their
                            # place, as a backend that reads text only is sent them.
                            self.tool_notes = (*self.tool_notes, route.name)
                            opened = await self._first(route, watchdog, total_s)
                            self.attempts[-1]["tool_images"] = "notes"
                            if not isinstance(opened, StellaError):
                                self.pipeline.text_only.learn(route)
                        if isinstance(opened, StellaError) and self._reasoning_refused(
                            route, opened
                        ):
                            # Refused what stella derived from another dialect's words (a
                            # model without thinking, or without this kind of it): once
                            # more without it, as before stella derived it.
                            self.plain_reasoning = (*self.plain_reasoning, route.name)
                            opened = await self._first(route, watchdog, total_s)
                            self.attempts[-1]["reasoning"] = "dropped"
                            if not isinstance(opened, StellaError):
                                self.pipeline.no_derived_reasoning.learn(route)
                    except BaseException:
                        # Cut before any verdict (client gone, shutdown): a half-open
                        # circuit's probe must go back, or the circuit stays shut for good.
                        if probe:
                            breaker.release()
                        raise
                    if isinstance(opened, StellaError):
                        if opened.retry_after_hint is not None:
                            soonest = min(soonest, time.perf_counter() + opened.retry_after_hint)
                        if opened.out_of_time:
                            # The request's time ran out, not the backend: no verdict.
                            if probe:
                                breaker.release()
                            last = last or opened
                            break
                        last = opened
                        if last.retryable or last.falls_back:
                            if last.no_verdict:
                                if probe:
                                    breaker.release()
                            else:
                                breaker.failure(last.code)
                            if not last.retryable or not last.same_again:
                                break  # the same failure again: fall back
                            continue
                        if probe:
                            breaker.release()
                        return self.fail(last)
                    # The stream phase, inline: every event crosses as few frames as possible.
                    agen, ctx, event = opened
                    self.ttft = time.perf_counter()
                    idle = rs.idle_timeout_s
                    watchdog.watch(idle)
                    collect = self.collect
                    texts = self.texts
                    tokens = 0
                    try:
                        while True:
                            kind = type(event)
                            if kind is Delta:
                                tokens += 1
                                if collect:
                                    texts.append(event.text)
                                    if event.reasoning:
                                        self.reasonings.append(event.reasoning)
                                    elif not event.text and (
                                        event.signature or event.redacted_thinking
                                    ):
                                        self._seal(event)
                            elif kind is ToolCall:
                                self.tool_calls.append(event)
                            elif kind is Done:
                                self.completion_tokens = tokens
                                breaker.success()
                                self.queue_ms = self.waited_ms + ctx.queue_ms
                                # Done is the backend's last event: let it return normally so
                                # its cleanup runs without a GeneratorExit (and its garbage).
                                try:
                                    await anext(agen, None)
                                except Exception as exc:  # the answer is whole: cleanup only
                                    _log.warning(
                                        "backend_cleanup_failed",
                                        backend=route.backend_name,
                                        error=error_text(exc, self.pipeline.log_content),
                                    )
                                return self._done(event)
                            else:
                                raise UpstreamError(
                                    f"backend sent an unknown event {kind.__name__}"
                                )
                            if (
                                unseen
                                and kind is Delta
                                and not event.text
                                and not (
                                    shows_signatures
                                    and (event.signature or event.redacted_thinking)
                                )
                            ):
                                # Reasoning alone, or its signature, which this client is
                                # not shown.
                                pass
                            elif emit is not None:  # a Delta or a ToolCall, to the client
                                unseen = False
                                watchdog.writing = True
                                try:
                                    await emit(event)
                                except asyncio.CancelledError:
                                    _too_slow(watchdog, total_s)
                                    raise
                                except SinkClosed:
                                    raise
                                except Exception as exc:
                                    # stella's own fault (a dialect's encoder, say), not the
                                    # backend's: no retry, no verdict on its circuit, and the
                                    # attempt, which the backend served, is no failure.
                                    return self.fail(_stella_failed(exc, self.pipeline.log_content))
                                finally:
                                    watchdog.writing = False
                            watchdog.waiting = True
                            try:
                                event = await anext(agen)
                            except StopAsyncIteration:
                                raise UpstreamError(
                                    f"backend {route.backend_name!r} ended without done"
                                ) from None
                            except asyncio.CancelledError:
                                if watchdog.expired():
                                    now = time.perf_counter()
                                    out_of_time = now >= deadline
                                    if out_of_time:
                                        why = f"ran past the total limit of {total_s:g}s"
                                    else:
                                        why = f"went silent for {idle:g}s"
                                    timeout = UpstreamTimeout(
                                        f"backend {route.backend_name!r} {why}"
                                    )
                                    timeout.out_of_time = out_of_time and _producing(
                                        watchdog, now, rs.total_timeout_s
                                    )
                                    raise timeout from None
                                raise
                            except StellaError:
                                raise
                            except Exception as exc:
                                # A backend's bug is its failure, as before its first
                                # token: recorded, counted, told to its breaker (below).
                                raise _backend_failed(
                                    route.backend_name, exc, self.pipeline.log_content
                                ) from None
                            finally:
                                watchdog.waiting = False
                            watchdog.progress += 1
                    except SinkClosed:
                        raise
                    except StellaError as exc:
                        self.attempts[-1]["error"] = exc.code
                        if exc.out_of_time:  # as before the first token (see _first)
                            self.attempts[-1]["out_of_time"] = True
                        if exc.retryable:
                            # The request's own time ran out, not the backend's: no verdict
                            # (the probe, if this was one, goes back below), as before the
                            # first token.
                            if not exc.out_of_time:
                                breaker.failure(exc.code)
                            if emit is None or unseen:
                                # Nothing has reached the client yet (a non-stream call, a
                                # stream that had only reasoning it does not show): the
                                # answer can start over (a retry, then a fallback).
                                texts.clear()
                                self.reasonings.clear()
                                self.thinking_blocks.clear()
                                self.sealed = 0
                                self.tool_calls.clear()
                                pieces = max(tokens, ctx.tokens_seen)
                                if pieces:
                                    made = self.discarded_by = self.discarded_by or {}
                                    made[route.name] = made.get(route.name, 0) + pieces
                                tokens = ctx.tokens_seen = 0  # counted once, as discarded
                                self.ttft = None
                                self.engine_ttft_ms = None
                                self.waited_ms += ctx.queue_ms
                                self.queue_ms = self.waited_ms
                                last = exc
                                continue
                        # A stream's client has had tokens: a switch of model mid-answer
                        # is worse than the error.
                        return self.fail(exc)
                    except Exception as exc:  # a bug past the backend still ends the stream
                        return self.fail(
                            _backend_failed(route.backend_name, exc, self.pipeline.log_content)
                        )
                    finally:
                        self.completion_tokens = tokens
                        # A verdict (success, failure) already ended a probe; without one
                        # (client gone, a bug, a client too slow) the probe goes back.
                        if probe:
                            breaker.release()
                        if getattr(agen, "ag_frame", True) is not None:  # not finished yet
                            await close_quietly(agen, self.pipeline.log_content)
            err = last or Unavailable("no backend could take this request")
            tried = self.attempts
            if len(self.chain) > 1 and tried and all(a["error"] == "circuit_open" for a in tried):
                # Every backend's circuit open, as a call refused at the door for it finds
                # them: named as its 503 names them.
                err = self.pipeline._circuits_open(self.route, self.chain)
            wait = soonest - time.perf_counter()  # inf when none is known
            own = err.retry_after
            if own is None and isinstance(err, Unavailable | Overloaded):
                own = DEFAULT_RETRY_AFTER_S  # what its answer says when nothing better is known
            if own is not None and 0 < wait < own:
                # Another route of the chain may take the call sooner than this one (an
                # upstream's own 429 may ask for an hour; a fallback's limit frees sooner).
                # A time already past is no such word: a pause the route waited out before
                # asking again, whose later answer (`own`) is the one that stands.
                err.retry_in(wait)
            elif own is None and err.retryable and 0 < wait < math.inf:
                # The last route said nothing of when to come back, an earlier one did (its
                # upstream's 429 asked for 30 s, say): a retry sooner only asks it again.
                err.retry_in(wait)
            # Fallbacks never tried are named: not every backend failed.
            late = (
                f"; the time ran out before fallback {', '.join(map(repr, untried))} could run"
                if untried
                else ""
            )
            if len(self.chain) > 1 and not isinstance(err, UpstreamTimeout | Unavailable):
                last_err = err
                code, last_retryable = err.code, err.retryable
                overloaded = err.upstream_overloaded
                # The code is kept, and with it when to come back (an `overloaded` is
                # Anthropic's 529, which promises a Retry-After as a 503 does).
                head = "every backend tried failed" if untried else "every backend failed"
                err = UpstreamError(
                    f"{head}; last: {err.message}{late}", retry_after=err.retry_after
                )
                # And whether sending it again may help, and whether the upstream said it
                # is overloaded (a 529 in Anthropic's dialect): the last failure's verdict.
                err.code, err.retryable = code, last_retryable
                err.upstream_overloaded = overloaded
                if isinstance(last_err, Overloaded):
                    # stella's own load (a full queue or pool), as its code says: a 503.
                    err.status = last_err.status
            elif late:
                err.message += late
            return self.fail(err)
        finally:
            watchdog.close()
            self.finish()

    def _out_of_time(self, route: Route, untried: list[str]) -> None:
        """Record fallback `route` as not tried: the time for it had run out."""
        self.attempts.append(
            {"backend": route.backend_name, "route": route.name, "error": "out_of_time"}
        )
        if route.name not in untried:  # a balanced fallback's backends: named once
            untried.append(route.name)

    async def _admit_fallback(self, route: Route, deadline: float) -> StellaError | None:
        """Admit the call to a fallback route under its own model's limits; the refusal
        (recorded as an attempt) when they are full. A slot is waited for until `deadline`."""
        # The call holds its backend's slot already when the fallback is on the same one
        # (unless it was admitted without it, or gave it back for another backend's turn).
        held = route.backend_name == self.route.backend_name and self.backend_held
        # Another backend of the asked route (balanced), or of the balanced fallback tried
        # before it: the call holds its model's limits already (taken once, as for the
        # asked route), and takes that backend's slot alone.
        same_route = route.name == self.route.name
        held_by = self.fallback_permit
        again = not same_route and held_by is not None and held_by[0] == route.name
        # A slot is waited for within the route's time, as its attempts are.
        now = time.perf_counter()
        left = deadline - now
        try:
            permit = await self.pipeline.admission.admit_fallback(
                route, self.request, held, left, same_route or again
            )
        except (RateLimited, Overloaded) as exc:
            self.attempts.append(
                {"backend": route.backend_name, "route": route.name, "error": exc.code}
            )
            return exc
        finally:
            # A wait for the fallback's slot is queueing, as the wait for the first one.
            self.waited_ms += (time.perf_counter() - now) * 1000
            self.queue_ms = self.waited_ms
        if permit is not None:
            if again:
                self.fallback_slot = permit
            else:
                self.fallback_permit = (route.name, permit)
        return None

    def _give_back_fallback(self, final: Usage | None = None, keep: str = "") -> None:
        """Settle and release the fallback's permit with what its route made: the
        answer's `final` usage when the call ended there, and tokens its failed
        attempts made. `keep`: the route tried next; when it is the fallback's (another
        of its backends), its model's limits stay held, its backend's slot goes back."""
        slot, self.fallback_slot = self.fallback_slot, None
        if slot is not None:
            slot.release()
        held = self.fallback_permit
        if held is not None and keep and held[0] == keep:
            held[1].release_backend()
            return
        self.fallback_permit = None
        if held is not None:
            name, permit = held
            try:
                made = self._made_on(name, final)
                permit.settle(made, spent=self._cost_on(name, made, final))
            finally:
                permit.release()

    def _made_on(self, name: str, final: Usage | None) -> Usage:
        """The tokens route `name` made: its discarded attempts', and `final` (the last
        attempt's usage) when the call ended on it."""
        made = (self.discarded_by or {}).get(name, 0)
        if final is not None and self.ctx is not None and self.ctx.route == name:
            return Usage(
                final.prompt_tokens, final.completion_tokens + made, final.total_tokens + made
            )
        return Usage(0, made, made)

    def _cost_on(self, name: str, made: Usage, final: Usage | None) -> int:
        """What route `name` made (`made`, see _made_on) cost at its price, in nano-dollars
        (0 unpriced): the prompt's cached tokens at their rate when the call ended there."""
        route = next((r for r in self.chain if r.name == name), None)
        if route is None or route.price is None:
            return 0
        ctx = self.ctx
        cached = None
        if final is not None and ctx is not None and ctx.route == name:
            cached = ctx.cached_tokens
        return route.price.cost(made.prompt_tokens, made.completion_tokens, cached)

    async def _first(
        self, route: Route, watchdog: Watchdog, total_s: float
    ) -> tuple[AsyncIterator[BackendEvent], CallContext, Any] | StellaError:
        """Open the backend stream and wait for its first event within ttft_timeout_s
        (and before `watchdog.deadline`, the total limit `total_s`)."""
        rs = route.settings
        self.backend_name = route.backend_name
        self.upstream_model = route.upstream_model
        if self.pipeline.router.busy and route.backend_name != self.busy:
            self.busy_on(route.backend_name)
        ctx = self.ctx = watchdog.ctx = CallContext(
            request_id=self.call.request_id,
            route=route.name,
            span=self.span,
            silence_limit_s=min(rs.ttft_timeout_s, rs.idle_timeout_s),
        )
        agen, whole = self._open(route, ctx)
        t = time.perf_counter()
        record: dict[str, Any] = {"backend": route.backend_name, "route": route.name}
        self.attempts.append(record)
        ttft, awaited = rs.ttft_timeout_s, "first token"
        if whole:
            # The first event is the whole answer: its own limit, so that a hung upstream
            # still leaves time for a retry or a fallback.
            ttft, awaited = rs.answer_timeout_s or rs.ttft_timeout_s, "answer"
        left = watchdog.deadline - t
        limit = max(min(ttft, left), 0.001)
        ctx.first_by = t + limit
        watchdog.watch(limit)
        watchdog.waiting = True
        try:
            first = await anext(agen)
        except StopAsyncIteration:
            err: StellaError = UpstreamError(f"backend {route.backend_name!r} ended without output")
        except StellaError as exc:
            err = exc
        except asyncio.CancelledError:
            if not watchdog.expired():
                # Cut from outside (client gone, shutdown): the attempt's record still ends.
                now = time.perf_counter()
                record["ms"] = _ms(now - t)
                record["error"] = self.call.cancel_reason or "cancelled"
                self._queued(ctx, now)
                raise
            if ctx.waiting_for:
                # Still waiting for a place of stella's own (a free pooled connection): the
                # upstream never had the request. stella's load: no verdict, fallbacks tried.
                err = waited_out(ctx.waiting_for, limit)
                err.out_of_time = time.perf_counter() >= watchdog.deadline
            elif time.perf_counter() < watchdog.deadline:
                # The silence limit, not the total one (output such as keep-alive
                # chunks restarts the silence limit, so this may be long after `limit`).
                err = UpstreamTimeout(
                    f"no {awaited} from {route.backend_name!r} within {limit:.3g}s"
                )
                # A long answer would only run as long again: fall back instead. So would
                # an in-process engine's long queue (its steps through this call's prompt
                # restart the limit): its own load, not a fault, unless it showed no sign
                # of work all that time (wedged: a verdict).
                local = route.backend.local_queue
                err.same_again = awaited != "answer" and not local
                if awaited == "answer":
                    # The upstream may still be generating it: a client's retry (the
                    # SDKs follow `retryable`) would double the work, as ours would.
                    err.retryable, err.falls_back = False, True
                if local and route.backend.working(limit):
                    err.no_verdict = True
            else:
                err = UpstreamTimeout(f"the total limit of {total_s:g}s passed")
                # An in-process engine's queue or long prompt is its load, never a fault.
                err.out_of_time = route.backend.local_queue or _producing(
                    watchdog, time.perf_counter(), rs.total_timeout_s
                )
        except Exception as exc:  # a backend bug must still end the stream properly
            err = _backend_failed(route.backend_name, exc, self.pipeline.log_content)
        else:
            self.queue_ms = self.waited_ms + ctx.queue_ms
            self.engine_ttft_ms = ctx.engine_ttft_ms
            record["ms"] = _ms(time.perf_counter() - t)
            record["error"] = None
            if ctx.upstream_request_id:
                record["upstream_request_id"] = ctx.upstream_request_id
            return agen, ctx, first
        finally:
            watchdog.waiting = False
        await close_quietly(agen, self.pipeline.log_content)
        now = time.perf_counter()
        record["ms"] = _ms(now - t)
        record["error"] = err.code
        if err.out_of_time:
            # The request's time, not the backend: no failure to the breaker nor to metrics.
            record["out_of_time"] = True
        self._queued(ctx, now)
        if isinstance(err, UpstreamStatus):
            record["upstream_status"] = err.upstream_status
        if ctx.upstream_request_id:  # the upstream's own id of the failed answer
            record["upstream_request_id"] = ctx.upstream_request_id
        return err

    def _images_refused(self, route: Route, err: StellaError) -> bool:
        """Whether `err` may be `route`'s upstream refusing the tool results' images it was
        sent (a model that reads text only), for the first time in this call: a 400 or
        so to a request whose images are all a tool's (a user's own keep the error)."""
        backend = route.backend
        refused = err.code == "upstream_rejected" or (
            # Ollama's runner says it with a 500 (its ErrNoVisionModel).
            isinstance(err, UpstreamStatus) and NO_VISION in err.message
        )
        if (
            not refused
            or not backend.may_refuse_images
            or route.name in self.tool_notes
            or route in self.pipeline.text_only
        ):
            return False
        seen = first_images(self.request.messages)
        if seen is None or seen.first is not None:
            return False
        sent = readable(self.request.messages, backend.reads_images, backend.reads_image_urls)
        return any(m.images for m in sent if m.role == "tool")

    def _reasoning_refused(self, route: Route, err: StellaError) -> bool:
        """Whether `err` may be `route`'s upstream refusing the reasoning stella derived for
        it from another dialect's words, for the first time in this call: a 4xx refusing
        the request (not the key, the model, a limit or the prompt's length)."""
        if (
            not isinstance(err, UpstreamStatus)
            or not 400 <= err.upstream_status < 500
            or err.upstream_status in (401, 403, 404, 429)
            or isinstance(err, ContextTooLong)
            or route.name in self.plain_reasoning
            or route in self.pipeline.no_derived_reasoning
        ):
            return False
        sent = for_backend(self.request, route, route.name in self.tool_notes)
        return route.backend.without_derived_reasoning(sent) is not None

    def _open(self, route: Route, ctx: CallContext) -> tuple[AsyncIterator[BackendEvent], bool]:
        """The backend's events for one attempt on `route`, and whether the first is the
        whole answer (a non-stream call to a backend that asks for it in one piece)."""
        notes = route.name in self.tool_notes or route in self.pipeline.text_only
        req = for_backend(self.request, route, notes)
        if self.plain_reasoning or self.pipeline.no_derived_reasoning.models:
            if route.name in self.plain_reasoning or route in self.pipeline.no_derived_reasoning:
                req = route.backend.without_derived_reasoning(req) or req
        agen = route.backend.chat(req, ctx)
        if (
            req.parallel_tool_calls is False
            and req.tools
            and not route.backend.honours_parallel_tool_calls
        ):
            agen = _first_tool_call(agen)
        return agen, not req.stream and route.backend.whole_answers

    def _queued(self, ctx: CallContext, now: float) -> None:
        """Count the queue wait of an attempt that ended without a first token: until its
        job started, or until now when it never did."""
        waited = ctx.queue_ms or ((now - ctx.queued_at) * 1000 if ctx.queued_at else 0.0)
        self.waited_ms += waited
        self.queue_ms = self.waited_ms

    def _counted(self) -> int:
        """The last attempt's output as stella counted it: its Deltas, or the pieces its
        backend read when it joined several into one Delta (or read tool-call input)."""
        ctx = self.ctx
        return max(self.completion_tokens, ctx.tokens_seen if ctx is not None else 0)

    def _settled(self, usage: Usage, answered: bool) -> Usage:
        """`usage` with what the backend did not count filled in with stella's count (the
        output it read; the prompt's estimate once the upstream began its answer, or
        `answered`), marking the call's usage estimated when it is: what the client is
        told, the log, the limits and the usage report all take this one figure."""
        counted = self._counted()
        ctx = self.ctx
        if ctx is not None and ctx.usage_estimated:
            self.estimated = True  # the backend's figures are its own count, no upstream's
        if (not usage.completion_tokens and counted) or self.discarded_by:
            self.estimated = True  # discarded tokens are always stella's count
        usage = _completed(usage, counted)
        if not usage.prompt_tokens and ctx is not None:
            # No count of the prompt from the backend (cut short before its usage came, or
            # an upstream that sends none): the prompt it read still counts. The backend's
            # figure when it had one early, else the estimate admission reserved, once the
            # upstream began its answer (it read the prompt); a refusal before that is not.
            n = ctx.prompt_tokens
            # An attempt answered again after it made output read the prompt as well.
            if not n and (answered or ctx.beats or counted or self.ttft or self.discarded_by):
                n = prompt_estimate(self.request)
                if n:
                    self.estimated = True
            if n:
                usage = Usage(n, usage.completion_tokens, n + usage.completion_tokens)
        return usage

    def _seal(self, event: Delta) -> None:
        """Keep a block of signed thinking: the reasoning since the last signature with
        this one, or a redacted block."""
        if event.redacted_thinking:
            self.thinking_blocks.append(RedactedThinking(data=event.redacted_thinking))
            return
        thought = "".join(self.reasonings[self.sealed :])
        self.sealed = len(self.reasonings)
        self.thinking_blocks.append(ThinkingBlock(thinking=thought, signature=event.signature))

    def _done(self, done: Done) -> Done:
        now = time.perf_counter()
        usage = self._settled(done.usage, True)
        ctx = self.ctx
        if ctx is not None and ctx.cached_tokens is not None:
            # The backend's count of the prompt tokens its cache spared it; the answer
            # says nothing of a cache when it gave none.
            details = PromptTokensDetails(cached_tokens=ctx.cached_tokens)
            usage = msgspec.structs.replace(usage, prompt_tokens_details=details)
        if ctx is not None and ctx.reasoning_tokens is not None:
            # The backend's count of the completion's reasoning tokens, when it gave one.
            thought = CompletionTokensDetails(reasoning_tokens=ctx.reasoning_tokens)
            usage = msgspec.structs.replace(usage, completion_tokens_details=thought)
        self.usage = usage
        self.finish_reason = done.finish_reason
        self.terminal = True
        self.t_end = now
        timings = self.timings = self._timings(usage, now, self.ttft or now)
        return Done(
            finish_reason=done.finish_reason,
            usage=usage,
            timings=timings,
            backend=self.backend_name,
        )

    def _timings(self, usage: Usage, now: float, ttft: float | None) -> Timings:
        """The call's figures in milliseconds, a wait for admission included."""
        tps = self._rate(usage, now)
        waited = self.admit_ms
        return Timings(
            queue_ms=_2(self.queue_ms),
            ttft_ms=_2((ttft - self.t0) * 1000 + waited) if ttft else None,
            total_ms=_2((now - self.t0) * 1000 + waited),
            tokens_per_s=_2(tps) if tps else None,
        )

    def _rate(self, usage: Usage, now: float) -> float | None:
        """Completion tokens per second: from the first token when the answer streamed in
        several deltas, over the whole call when it came in one piece (a non-stream call)."""
        if usage.completion_tokens < 2 or not self.ttft:
            return None
        gen_s = now - (self.ttft if self.completion_tokens > 1 else self.t0)
        return usage.completion_tokens / gen_s if gen_s > 0 else None

    def fail(self, exc: StellaError) -> Error:
        """Record `exc` as the outcome and return its terminal `error` event."""
        # An upstream's error text may quote a credential it was sent (an API key it
        # refused, a header): the client gets it masked, as the logs have it.
        exc.message = mask(exc.message)
        self.error = exc
        self.finish_reason = "error"
        self.terminal = True
        self.t_end = time.perf_counter()
        return error_event(exc)

    async def result(self) -> ChatResponse:
        """Run to the end and return the whole answer; raise the error if it failed."""
        done = await self.run()
        if type(done) is not Done:
            assert self.error is not None
            raise self.error
        text = "".join(self.texts)
        calls = [
            ToolCallRef(
                id=c.id,
                function=FunctionCall(
                    name=c.name, arguments=c.arguments, raw_arguments=c.raw_arguments
                ),
            )
            for c in self.tool_calls
        ] or None
        return ChatResponse(
            id=self.call.request_id,
            model=self.route.name,
            backend=self.backend_name,
            message=AssistantMessage(
                role="assistant",
                content=text,
                tool_calls=calls,
                reasoning="".join(self.reasonings),
                thinking_blocks=self.thinking_blocks or None,
            ),
            response=text,
            finish_reason=done.finish_reason,
            usage=done.usage,
            timings=done.timings,
        )

    def finish(self) -> None:
        """Release the permit and emit the one `inference` event (idempotent)."""
        if self.logged:
            return
        self.logged = True
        if not self.terminal:
            # Ended before a terminal event: the client left, or shutdown cut it.
            shutdown = self.call.cancel_reason == "shutting_down"
            self.finish_reason = "cancelled" if shutdown else "client_closed"
            last = self.attempts[-1] if self.attempts else None
            if last is not None and last.get("error") is None:
                # Cut after its first token: the attempt says why, as one cut before it.
                last["error"] = "shutting_down" if shutdown else "client_closed"
        pipeline = self.pipeline
        pipeline.active.discard(self)
        if self.busy:
            self.busy_on("")
        now = self.t_end or time.perf_counter()
        # After a Done, self.usage is settled already (as the client was told); a call
        # cut short before one is settled here with what was counted.
        usage = self._settled(self.usage, False)
        ctx = self.ctx
        final = usage
        discarded = sum(self.discarded_by.values()) if self.discarded_by else 0
        if discarded:  # made, though never sent: they count for the limits too
            usage = Usage(
                usage.prompt_tokens,
                usage.completion_tokens + discarded,
                usage.total_tokens + discarded,
            )
        made = None  # the asked model made it all, as usual
        if self.discarded_by or (ctx is not None and ctx.route != self.route.name):
            made = self._made_on(self.route.name, final)
        # What it cost (nano-dollars), when a route of its chain has a price: the price
        # of the route that made each part (a fallback's answer at the fallback's).
        cost: int | None = None
        model_cost: int | None = None
        if self.route.price is not None or len(self.chain) > 1:
            cost, model_cost = self._costs(final, made)
        try:
            # The key pays for all that was made; each model for what it made.
            self.permit.settle(usage, made, cost or 0, model_cost)
        finally:
            self.permit.release()
            if self.fallback_permit is not None:
                # The call ended on this fallback (answered, or cut short there).
                self._give_back_fallback(final)
        reason = self.finish_reason
        err = self.error
        if reason == "client_closed":
            status = 499
        elif reason == "cancelled":
            status = 503
        elif err is not None:
            # The status the client got (or would have, had the stream not begun) in its API.
            of = self.call.error_status
            status = err.status if of is None else of(err)
        else:
            status = 200
        timings = self.timings  # the Done's, when the call got that far
        if timings is None or not self.ttft:
            timings = self._timings(usage, now, self.ttft)
        span = self.span
        record: dict[str, Any] = {
            "request_id": self.call.request_id,
            "trace_id": span.trace_id,
            "span_id": span.span_id,
            "op": self.op,
            "api": self.call.api,
            "key": self.call.principal.name,
            "model": self.route.name,
            "backend": self.backend_name,
            "upstream_model": self.upstream_model,
            "stream": self.request.stream,
            "status": status,
            "finish_reason": reason,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "queue_ms": timings.queue_ms,
            "ttft_ms": timings.ttft_ms,
            "total_ms": timings.total_ms,
            "tokens_per_s": timings.tokens_per_s,
            "attempts": self.attempts,
            "error_code": (
                "shutting_down"
                if reason == "cancelled"
                else err.code
                if err is not None and reason == "error"
                else None
            ),
        }
        if span.parent_id:
            record["parent_span_id"] = span.parent_id  # the client's span
        if self.engine_ttft_ms is not None:
            record["engine_ttft_ms"] = self.engine_ttft_ms
        if discarded:
            record["discarded_tokens"] = discarded
        if self.estimated:
            record["usage_estimated"] = True
        if cost is not None:
            record["cost_usd"] = usd(cost)
        if ctx is not None:
            if ctx.upstream_request_id:
                record["upstream_request_id"] = ctx.upstream_request_id
            if ctx.cached_tokens is not None:
                record["cached_tokens"] = ctx.cached_tokens
            if ctx.cache_write_tokens is not None:
                # Billed apart (an Anthropic upstream's cache writes cost 1.25x or 2x).
                record["cache_write_tokens"] = ctx.cache_write_tokens
            if ctx.reasoning_tokens is not None:
                record["reasoning_tokens"] = ctx.reasoning_tokens
            if ctx.load_ms is not None:
                record["load_ms"] = ctx.load_ms
        if self.images:
            record["images"] = self.images  # how many; never their data, whatever `content`
        if self.op != "chat":
            record["inputs"] = len(self.request.messages)  # an embed call's texts
        if self.request.metadata:
            record["metadata"] = self.request.metadata
        if pipeline.log_content:
            self._log_content(record)
        secret = self.call.secret
        if len(secret) >= 4 and (self.request.metadata or pipeline.log_content):
            # A client may echo its own key in what it writes: never logged as it is.
            for field in ("metadata", "prompt", "completion", "reasoning", "tool_calls", "input"):
                if field in record:
                    record[field] = _masked(record[field], secret)
        for listener in pipeline.listeners:
            try:
                listener(record)
            except Exception as exc:  # a metrics bug must not lose the log line
                record.setdefault("listener_errors", []).append(repr(exc))
        pipeline.emit("inference", record)

    def _costs(self, final: Usage, made: Usage | None) -> tuple[int | None, int | None]:
        """The call's cost and the asked model's part of it (None: as the call's), in
        nano-dollars; (None, None) when no route of its chain is priced."""
        if all(r.price is None for r in self.chain):
            return None, None
        names = dict.fromkeys(r.name for r in self.chain)
        parts = {name: self._cost_on(name, self._made_on(name, final), final) for name in names}
        own = None if made is None else parts[self.route.name]
        return sum(parts.values()), own

    def _log_content(self, record: dict[str, Any]) -> None:
        """Put what the call read and wrote into its log event (log.content)."""
        record["prompt"] = [_logged_message(m) for m in self.request.messages]
        record["completion"] = "".join(self.texts)
        if self.reasonings:
            # The model's thinking is part of what it wrote, apart from its answer.
            record["reasoning"] = "".join(self.reasonings)
        if self.tool_calls:
            # What the model asked a tool to do is part of its answer: an audit
            # trail without the arguments would miss what was done in its name.
            record["tool_calls"] = [
                _logged_call(c.id, c.name, arguments_text(c.arguments, c.raw_arguments))
                for c in self.tool_calls
            ]


class EmbedInference(Inference):
    """One admitted embed call: the chat's pipeline (time limits, retries, circuit, one log
    event), its one attempt a backend's `embed` whose answer comes as a lone Done."""

    op = "embed"
    __slots__ = ("embed_request", "vectors")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.embed_request: EmbedRequest | None = None
        self.vectors: list[list[float]] = []

    def _open(self, route: Route, ctx: CallContext) -> tuple[AsyncIterator[BackendEvent], bool]:
        """The embed attempt as one event, the whole answer (its route's answer limit)."""
        return self._embedded(route, ctx), True

    async def _embedded(self, route: Route, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        request = self.embed_request
        assert request is not None
        if request.model != route.upstream_model:
            request = msgspec.structs.replace(request, model=route.upstream_model)
        try:
            result = await route.backend.embed(request, ctx)
        except UpstreamStatus as exc:
            if exc.upstream_status != 501 and not isinstance(exc, UpstreamNoSuchPath):
                raise
            raise _no_embeddings(route, exc) from None
        _check_vectors(route.backend_name, request, result)
        self.vectors = result.embeddings
        n = result.prompt_tokens
        yield Done(finish_reason="stop", usage=Usage(n, 0, n))

    def _log_content(self, record: dict[str, Any]) -> None:
        """The inputs, never the vectors (numbers no reader of a log can use)."""
        record["input"] = [m.content for m in self.request.messages]

    async def embeddings(self) -> EmbedResult:
        """Run to the end: the vectors and the tokens read; raise the error if it failed."""
        done = await self.run()
        if type(done) is not Done:
            assert self.error is not None
            raise self.error
        return EmbedResult(embeddings=self.vectors, prompt_tokens=done.usage.prompt_tokens)


def _check_numbers(request: EmbedRequest) -> None:
    """A 400 naming `dimensions` for a request that asks more numbers than any model needs
    (MAX_EMBED_NUMBERS): its answer would be hundreds of megabytes, built and written on
    the event loop every call shares."""
    dimensions = request.dimensions
    if dimensions is None:
        return  # the model's own length, bounded by the answer's size
    count = len(request.texts())
    if count * dimensions > MAX_EMBED_NUMBERS:
        raise InvalidRequest(
            f"$.dimensions: {count} inputs of {dimensions} dimensions are "
            f"{count * dimensions} numbers, over {MAX_EMBED_NUMBERS} in one request; send "
            "fewer inputs or ask shorter vectors",
            param="dimensions",
        )


def _no_embeddings(route: Route, exc: UpstreamStatus) -> UpstreamMakesNoEmbeddings:
    """The error of an embed call whose upstream makes no embeddings for the model: its
    501, or its 404 for the embeddings path (which, for a chat's path, says base_url is
    wrong; here the chats on the same base_url say whether it is)."""
    said = exc.message
    if isinstance(exc, UpstreamNoSuchPath):
        # Its words are a page's or "Not Found", and its advice (base_url) a chat's.
        said = f"{route.backend_name}: upstream answered 404 for its embeddings path"
    return UpstreamMakesNoEmbeddings(
        f"model {route.name!r} does not make embeddings ({said})",
        upstream_status=exc.upstream_status,
    )


def _check_vectors(backend: str, request: EmbedRequest, result: EmbedResult) -> None:
    """Refuse an answer that is not one vector per input, each as long as the others (and
    `dimensions` long when the request asks a length), none empty, every number finite: a
    client would store vectors it cannot use, or the wrong ones against its texts (an
    infinity or a NaN, which base64 can carry, reaches JSON as null). Not retried: asked
    again, the upstream answers alike."""
    count = len(request.texts())
    got = result.embeddings
    problem = ""
    if len(got) != count:
        problem = f"{len(got)} vectors for {count} inputs"
    elif got:
        size = len(got[0])
        for i, v in enumerate(got):
            if not v:
                problem = f"an empty vector for input {i}"
            elif request.dimensions is not None and len(v) != request.dimensions:
                problem = (
                    f"a vector of {len(v)} dimensions where {request.dimensions} were asked "
                    "(the model does not shorten its vectors)"
                )
            elif len(v) != size:
                problem = f"vectors of {size} and of {len(v)} dimensions"
            # One sum per vector in C; a sum that overflows is looked at number by number.
            elif not math.isfinite(sum(v)) and not all(map(math.isfinite, v)):
                problem = f"a number that is not finite (inf or NaN) for input {i}"
            if problem:
                break
    if problem:
        err = UpstreamError(f"backend {backend!r} answered {problem}")
        err.retryable = False
        raise err


def _logged_call(call_id: str, name: str, arguments: str) -> dict[str, str]:
    """A tool call as the inference event logs it (arguments as the JSON text OpenAI's
    API carries, or the model's own text when it wrote no JSON object)."""
    return {"id": call_id, "name": name, "arguments": arguments}


def _logged_message(m: Message) -> dict[str, Any]:
    """A message of the history as the inference event logs it: an assistant's tool
    calls and the call a tool's answer belongs to included."""
    logged: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        logged["tool_calls"] = [
            _logged_call(
                c.id,
                c.function.name,
                arguments_text(c.function.arguments, c.function.raw_arguments),
            )
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        logged["tool_call_id"] = m.tool_call_id
    if m.is_error:
        logged["is_error"] = True
    if m.images:
        # How many, never their data: a log is no place for megabytes of a user's pictures.
        logged["images"] = len(m.images)
    return logged


def _within_cap(request: ChatRequest) -> ChatRequest:
    """`request` with its tool results' images past MAX_IMAGES, a user's counted first, as
    notes: a dialect reads a tool's before the user's that follow it, and a client's own
    image must not be refused for a tool's."""
    return msgspec.structs.replace(request, messages=within_cap(request.messages))


def _embed_chain(router: Router, route: Route) -> list[Route]:
    """The routes an embed call on `route` tries in turn: a balanced route's other members
    serve the same model, tried after it as a chat's are (fallbacks, other models, never)."""
    return [r for r in router.members(route) if r is route or r.backend.makes_embeddings]


def _makes_embeddings(route: Route) -> bool:
    """Whether `route`'s backend makes embeddings (a balanced embed call's pick)."""
    return route.backend.makes_embeddings


def _reads(route: Route, images: ImagesSeen) -> bool:
    """Whether `route`'s backend reads the request's images not in a tool result (by URL
    too, if any is)."""
    backend = route.backend
    return backend.reads_images and (images.by_url is None or backend.reads_image_urls)


def _image_readers(route: Route, chain: list[Route], images: ImagesSeen) -> list[Route]:
    """`chain` without the fallbacks that cannot read the request's images (the asked
    route kept first, to be skipped); a 400 naming the first image when none can. A tool
    result's images choose no route: each backend is sent them as it can read them."""
    readers = [r for r in chain if r is route or _reads(r, images)]
    if len(readers) > 1 or _reads(route, images):
        return readers
    first, by_url = images.first or "messages", images.by_url
    if by_url is not None and any(r.backend.reads_images for r in chain):
        raise InvalidRequest(
            f"$.{by_url}.url: model {route.name!r} takes images only as data, not by URL "
            "(stella fetches no URL itself)",
            param=f"{by_url}.url",
        )
    raise InvalidRequest(
        f"$.{first}: model {route.name!r} reads text only: images are not supported",
        param=first,
    )


def log_fault(event: str, exc: BaseException, content: bool, **fields: Any) -> None:
    """Log an unexpected exception as `event` with its traceback; without `content`
    (log.content) each exception's message is left out (see _traceback_only)."""
    if content:
        _log.error(event, exc_info=exc, **fields)
    else:
        _log.error(event, exception=_traceback_only(exc), **fields)


def _backend_failed(backend: str, exc: Exception, content: bool) -> UpstreamError:
    """Log an unexpected exception from a backend (or past it); the error it ends in."""
    log_fault("backend_failed", exc, content, backend=backend)
    return UpstreamError(f"backend {backend!r} failed: {type(exc).__name__}")


def _traceback_only(exc: BaseException) -> str:
    """`exc`'s traceback as Python prints it (the exceptions that led to it first), each
    exception's message left out: a backend's message is its own text, and may quote
    what it was sent (`KeyError: '<a word of the prompt>'`)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    parts = []
    for e in reversed(chain):
        kind = type(e)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else (f"{kind.__module__}.{kind.__qualname__}")
        )
        tb = "".join(traceback.format_tb(e.__traceback__))
        parts.append(f"Traceback (most recent call last):\n{tb}{name} (message not logged)\n")
    return "\nwhich led to:\n\n".join(parts).rstrip("\n")


def error_event(exc: StellaError) -> Error:
    """The terminal `error` event for `exc`: its code, message, whether to send the
    request again and, when known, after how long (the seconds its Retry-After says)."""
    wait = exc.retry_after
    return Error(
        code=exc.code,
        message=exc.message,
        retryable=exc.retryable,
        retry_after=msgspec.UNSET if wait is None else whole_seconds(wait),
    )


def _stella_failed(exc: Exception, content: bool) -> StellaError:
    """Log a bug of stella's own past the backend (its message may quote the event it
    failed to write); the 500 `internal_error` it ends in."""
    log_fault("stream_failed", exc, content)
    return StellaError("internal error; see the server log")


def _too_slow(watchdog: Watchdog, total_s: float) -> None:
    """Raise ClientTooSlow when the watchdog cut a write: the client stopped reading."""
    if watchdog.expired():
        raise ClientTooSlow(
            f"the client stopped reading and the total limit of {total_s:g}s passed"
        ) from None


def _choice_name(choice: ToolChoice) -> str:
    return repr(choice) if isinstance(choice, str) else f"tool {choice.function.name!r}"


# The response_format types OpenAI's API takes (and so every backend knows).
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _check_response_format(fmt: dict[str, Any]) -> None:
    """Refuse a response_format of a type no backend knows, as OpenAI's API does: passed
    on, an upstream would refuse it or answer in prose a client takes for the format."""
    kind = fmt.get("type")
    if kind is None:
        raise InvalidRequest(
            "$.response_format.type: required (text, json_object or json_schema)",
            param="response_format.type",
        )
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"$.response_format.type: {kind!r} is not text, json_object or json_schema",
            param="response_format.type",
        )
    if kind == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise InvalidRequest(
            "$.response_format.json_schema: required for json_schema (an object)",
            param="response_format.json_schema",
        )


def orphan_result(messages: Sequence[Message]) -> tuple[int, str | None] | None:
    """The first tool message that answers no call: its index, and the id it names when
    that is none of the calls of the assistant turn before it (None when no assistant
    message with calls comes before it, only tool messages between); None if all answer.

    Consecutive assistant messages with calls are one turn: Anthropic's API merges
    consecutive assistant messages, and a Responses input may put a text item between a
    turn's function calls. A tool message without an id (Ollama's histories link results
    by the tool's name, in order) needs only the calls before it."""
    calls: set[str] | None = None  # the ids of the turn the tool messages answer
    after_calls = False  # the message before was an assistant message with calls
    for i, m in enumerate(messages):
        if m.role == "tool":
            if calls is None:
                return i, None
            if m.tool_call_id and m.tool_call_id not in calls:
                return i, m.tool_call_id
            after_calls = False
        elif m.role == "assistant" and m.tool_calls:
            ids = {c.id for c in m.tool_calls}
            calls = calls | ids if after_calls and calls is not None else ids
            after_calls = True
        else:
            calls, after_calls = None, False
    return None


def _check_metadata(metadata: dict[str, Any]) -> None:
    """Refuse metadata nested deeper than MAX_METADATA_DEPTH or over MAX_METADATA_BYTES."""
    level: list[Any] = [metadata]
    for _ in range(MAX_METADATA_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            break
    else:
        raise InvalidRequest(
            f"$.metadata: nested deeper than {MAX_METADATA_DEPTH} levels", param="metadata"
        )
    if len(_metadata_json.encode(metadata)) > MAX_METADATA_BYTES:
        raise InvalidRequest(
            f"$.metadata: over {MAX_METADATA_BYTES} bytes of JSON", param="metadata"
        )


def _masked(node: Any, secret: str) -> Any:
    """`node` with `secret` replaced by *** in every string, keys included."""
    if isinstance(node, str):
        return node.replace(secret, "***") if secret in node else node
    if isinstance(node, dict):
        return {_masked(k, secret): _masked(v, secret) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_masked(v, secret) for v in node]
    return node


async def _first_tool_call(agen: AsyncIterator[BackendEvent]) -> AsyncIterator[BackendEvent]:
    """`agen`'s events with its first tool call alone: parallel_tool_calls false for a
    backend that can't be told (its model may answer with several)."""
    called = False
    try:
        async for event in agen:
            if type(event) is ToolCall:
                if called:
                    continue
                called = True
            yield event
    finally:
        await close_quietly(agen)  # closed early (client gone, a limit): the upstream too


def for_backend(request: ChatRequest, route: Route, text_only: bool = False) -> ChatRequest:
    """`request` as `route`'s backend gets it: its upstream model's name, no tools for
    a tool_choice "none" it cannot be told, and a tool result's images it cannot read (or
    any, `text_only`: its model refused them) as notes in its text."""
    req = request
    backend = route.backend
    if req.model != route.upstream_model:
        req = msgspec.structs.replace(req, model=route.upstream_model)
    if req.tool_choice == "none" and not backend.honours_tool_choice:
        req = _without_tools(req)
    # The note where a 400 would be: a text-only route that answered a session before its
    # tool returned an image answers it after (Claude Code's Read of a screenshot).
    reads = backend.reads_images and not text_only
    messages = readable(req.messages, reads, backend.reads_image_urls)
    if messages is not req.messages:
        req = msgspec.structs.replace(req, messages=messages)
    return req


def _without_tools(req: ChatRequest) -> ChatRequest:
    """tool_choice "none" for a backend that can't be told: no tools offered, unless the
    conversation already holds tool calls (a chat template may need them to render it)."""
    for m in req.messages:
        if m.tool_calls or m.role == "tool":
            return req
    return msgspec.structs.replace(req, tools=None, tool_choice=None)


def _2(x: float) -> float:
    """`x` to two decimals (round(x, 2) formats through a string: 4x slower)."""
    try:
        return round(x * 100) / 100
    except (OverflowError, ValueError):  # inf or nan (a plugin's queue_ms): as it is
        return x


def _ms(seconds: float) -> float:
    """Seconds as milliseconds, to two decimals."""
    return _2(seconds * 1000)


def _completed(usage: Usage, counted: int) -> Usage:
    """`usage` with what the backend left out filled in: the deltas counted, the total."""
    completion = usage.completion_tokens or counted
    if completion == usage.completion_tokens and usage.total_tokens:
        return usage
    return Usage(usage.prompt_tokens, completion, usage.prompt_tokens + completion)


__all__ = [
    "ANONYMOUS",
    "Admission",
    "Call",
    "EmbedInference",
    "Inference",
    "Permit",
    "Pipeline",
    "Principal",
]
