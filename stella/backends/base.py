"""What a backend is: a class with a `kind`, built from its config table.

A backend turns one `ChatRequest` into an async iterator of events: `Delta` and
`ToolCall` while it runs, then exactly one `Done` carrying `finish_reason` and
`usage`. It reports failure by raising a `stella.errors.StellaError` (see
`UpstreamError`, `UpstreamStatus`, `UpstreamTimeout`, `Overloaded`); the core
decides about retries, fallbacks and what the client sees. Closing the iterator
(`aclose()`, or cancellation) must stop the work: close the upstream response,
tell a worker to stop.

A backend that can count a prompt's tokens exactly, as its model reads them, overrides
`count_tokens` (the Anthropic dialect's POST /v1/messages/count_tokens asks it); the
default refuses with NotSupported. So does one that makes embeddings with `embed` (the
embed routes ask it, under the same admission, time limits, retries and circuit).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import ClassVar

import msgspec

from stella.errors import InvalidRequest, NotSupported
from stella.protocol import (
    ChatRequest,
    Delta,
    Done,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    Message,
    ToolCall,
)
from stella.trace import Span

BackendEvent = Delta | ToolCall | Done


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Config table of one `[backends.NAME]`; each kind subclasses it with its keys."""

    kind: str


@dataclass(slots=True)
class CallContext:
    """What a backend may want to know about the call besides the request."""

    request_id: str
    route: str = ""
    # stella's span of the call (stella.trace): an HTTP backend sends its `traceparent`
    # and `tracestate`, so that the upstream's spans join the client's trace.
    span: Span | None = None
    # The longest silence the route's time limits allow (its time to first token or
    # idle limit, the shorter; 0: none known). A backend's own wait for something the
    # answer can do without (a usage count after the finish) must end well within it:
    # the watchdog takes that wait for a silent upstream.
    silence_limit_s: float = 0.0
    # Filled by the backend when it queues work, so the core can report queue_ms: the
    # wait, once the work starts, and when it was queued (time.perf_counter()), for a
    # call that ends before it starts.
    queue_ms: float = 0.0
    queued_at: float = 0.0
    # Set by a backend while the call waits for a place of its own (a free connection in
    # its pool): what it waits for, naming the backend and its size ("" once it has one).
    # A time limit that passes meanwhile is stella's load, not the upstream's fault.
    waiting_for: str = ""
    # When (time.perf_counter()) the core stops waiting for the call's first event (its
    # time to first token, answer or total limit; 0: none set). A backend that had to wait
    # for a place sends nothing once this has passed: the core gives up within a tick.
    first_by: float = 0.0
    # Filled by an engine that had to load the model for this call: the load's share.
    load_ms: float | None = None
    # Filled by an in-process engine: its own time from starting the job to the first
    # token, so the log can tell the model's share of TTFT from the gateway's.
    engine_ttft_ms: float | None = None
    # Counted by a backend for upstream output that yields no event yet (tool-call
    # arguments in fragments, reasoning): the time limits take it as progress.
    beats: int = 0
    # Counted by a backend for an upstream's signs of life that carry no output (an SSE
    # comment such as mlx_lm.server's ": keepalive" while it reads a long prompt, a step
    # of the embedded engine's prompt pass): the silence limits take them as progress;
    # the usage (unlike `beats`) does not.
    alive: int = 0
    # Counted by a backend that joins several upstream pieces into one Delta, or reads
    # output that yields no Delta yet (tool-call arguments): the pieces (about a token
    # each) read so far. A call that ends without the upstream's own count (cut short,
    # or no usage sent) is charged these rather than its Deltas.
    tokens_seen: int = 0
    # Set by a backend whose Done's usage is (partly) its own count, not the upstream's
    # (an upstream that sent none): the call's log says usage_estimated.
    usage_estimated: bool = False
    # Set by a backend that knows the prompt's size before the answer ends: a call cut
    # short (client gone, a time limit) is still charged for its prompt.
    prompt_tokens: int = 0
    # Set by a backend whose answer ended at one of the request's stop strings: which
    # one (Anthropic's Messages API reports it; finish_reason is "stop" either way).
    stop_sequence: str | None = None
    # Set by an engine with a prompt cache: how many of the prompt's tokens it did not
    # have to read again (a conversation's earlier turns).
    cached_tokens: int | None = None
    # Set by a backend whose upstream counts the prompt's tokens it wrote to its cache
    # (Anthropic's cache_creation_input_tokens): the Messages dialect reports them.
    cache_write_tokens: int | None = None
    # Set by a backend whose upstream counts the completion's reasoning tokens (OpenAI's
    # completion_tokens_details.reasoning_tokens): the answer's usage and the log carry it.
    reasoning_tokens: int | None = None
    # The id the upstream gave its answer (its `request-id` or `x-request-id` header),
    # to find the call in the upstream's own logs and support requests.
    upstream_request_id: str = ""
    # Set by a backend whose upstream declined to answer (OpenAI's `refusal` field): the
    # answer's text is the refusal, finished content_filter. An answer the upstream's
    # content filter cut short also finishes content_filter, its text a partial answer
    # (chat completions give the one as `refusal`, the Responses dialect as a `refusal`
    # part; the other as `content`, `output_text`).
    refused: bool = False


# The largest token count taken from an upstream (a signed 32-bit integer's). A count
# past it, or below 0, is a broken or hostile upstream's: taken, a negative one would
# reach the client and the usage report, and a huge one lock a key out of its token
# limit for good. It is not reported, then: stella's own estimate stands.
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(n: int | None) -> bool:
    """Whether `n`, an upstream's token count, is one (None: not given, which is no fault)."""
    return n is None or 0 <= n <= MAX_TOKEN_COUNT


def counted(n: int, ctx: CallContext) -> int:
    """An upstream's token count, or 0 (not reported: the call's usage is estimated) when
    it is outside 0..MAX_TOKEN_COUNT."""
    if 0 <= n <= MAX_TOKEN_COUNT:
        return n
    ctx.usage_estimated = True
    return 0


def detail(n: int | None) -> int | None:
    """An upstream's count of a part of the usage (cached, reasoning tokens), or None (not
    said) when it is outside 0..MAX_TOKEN_COUNT."""
    return n if n is not None and 0 <= n <= MAX_TOKEN_COUNT else None


def first_stop(text: str, stops: Iterable[str]) -> tuple[int, str] | None:
    """Where the first of the stop strings in `text` begins, and which one; None if none."""
    hits = [(i, s) for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits, key=lambda hit: hit[0]) if hits else None


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's form, `call_` and 24 hex digits."""
    # Unique across answers, not numbered per answer: a conversation's history holds the
    # calls of many turns, and Anthropic's API refuses one whose tool_use ids repeat.
    return "call_" + secrets.token_hex(12)


def linked_tool_calls(messages: list[Message]) -> list[Message]:
    """`messages` with an id on every tool call of the history and, on every tool result,
    the id of the call it answers.

    Ollama's clients send calls without ids and results with only the tool's name (a
    native client may too); OpenAI and Anthropic refuse a history whose results name no
    call. A call without one gets `call_<message>_<call>`; a result without one answers
    the first open call of its tool (`name`), else the first open call.
    """
    if all(
        (m.tool_call_id if m.role == "tool" else all(c.id for c in m.tool_calls or ()))
        for m in messages
        if m.role == "tool" or m.tool_calls
    ):
        return messages  # the usual case: linked already
    out = []
    open_calls: list[tuple[str, str]] = []  # (id, tool name) no result answers yet
    for i, m in enumerate(messages):
        if m.tool_calls:
            calls = [
                c if c.id else msgspec.structs.replace(c, id=f"call_{i}_{j}")
                for j, c in enumerate(m.tool_calls)
            ]
            m = msgspec.structs.replace(m, tool_calls=calls)
            # A call a later result names by id is that result's, whatever comes first.
            named = set()
            for later in messages[i + 1 :]:
                if later.role != "tool":
                    break
                named.add(later.tool_call_id)
            open_calls = [(c.id, c.function.name) for c in calls if c.id not in named]
        elif m.role == "tool" and not m.tool_call_id and open_calls:
            answered = next((c for c in open_calls if c[1] == m.name), open_calls[0])
            open_calls.remove(answered)
            m = msgspec.structs.replace(m, tool_call_id=answered[0])
        out.append(m)
    return out


def ended(finish: FinishReason, called: bool) -> FinishReason:
    """An answer's finish reason, `tool_calls` when it called a tool and simply stopped.

    OpenAI ends a call forced by a named tool_choice with "stop", vLLM, SGLang and some
    Anthropic-compatible servers end others so (end_turn), Ollama says only "stop": the
    turn waits for the tools' results all the same, and agent loops go on only on
    tool_calls. A call cut short ("length") stays cut short.
    """
    return "tool_calls" if called and finish == "stop" else finish


def content_of(m: Message) -> str:
    """A message's text as a model reads it: a failed tool call's result says so.

    For an API with no field for it (OpenAI's, Ollama's, a chat template): without
    a word, the model would read the error as the tool's result. Anthropic's backend
    sends the flag instead, and the text as the client wrote it.
    """
    if not m.is_error:
        return m.content
    text = m.content
    return text if text.lstrip()[:5].lower() == "error" else f"Error: {text}" if text else "Error"


@dataclass(slots=True)
class BackendHealth:
    """Result of `Backend.health()`: never spends tokens."""

    ok: bool
    detail: str = "ok"


class Backend:
    """Base class of every backend adapter."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type[BackendConfig]] = BackendConfig
    # True when a non-stream call's first event is the whole answer (the upstream is asked
    # for it in one piece): waiting for it is the generation, bounded by the route's
    # answer_timeout_s rather than its time-to-first-token limit.
    whole_answers: ClassVar[bool] = False
    # True when the backend passes tool_choice "none" on (the model then calls no tool
    # but still sees the tools); otherwise the pipeline withholds the tools.
    honours_tool_choice: ClassVar[bool] = False
    # True when the backend passes parallel_tool_calls false on (the model then makes at
    # most one call); otherwise the pipeline keeps the first call of the answer alone.
    honours_parallel_tool_calls: ClassVar[bool] = False
    # True for an engine whose calls wait in this process's own queue (the in-process
    # MLX worker): a first-token timeout there is not tried again behind the same queue,
    # and its circuit is told only when the engine showed no sign of work for that
    # long (wedged, not busy: see `working`).
    local_queue: ClassVar[bool] = False
    # True when the backend sends a message's images to a model that reads them
    # (Message.images): a user message's and a tool message's, each where its API takes
    # them. A request whose user messages hold images is never sent to one that would
    # drop them: the pipeline tries a fallback that reads them, else answers 400; a tool
    # message's reach one that reads none as a note in its text (images.readable).
    # An attribute, not a ClassVar: a backend may set it from its config (`images`: an
    # OpenAI-compatible or Ollama server's model may read text only).
    reads_images: bool = False
    # False when an image by URL is not sent there, as stella fetches no URL itself: its
    # API takes images only as data (Ollama's), or the operator keeps its upstream from
    # fetching addresses a client chose (`image_urls`, per backend: a self-hosted server
    # would fetch them from inside the operator's network). An attribute, not a ClassVar:
    # a backend may set it from its config.
    reads_image_urls: bool = True
    # True when the upstream's model may read text only and refuse a request with images
    # though the backend sends them (an OpenAI-compatible or Ollama server: llama.cpp
    # without a projector, a coder model): a refusal of a tool result's images is asked
    # once more with notes in their place, and on success the route's model is sent notes.
    may_refuse_images: ClassVar[bool] = False

    def __init__(self, name: str, config: BackendConfig) -> None:
        self.name = name
        self.config = config

    def without_derived_reasoning(self, request: ChatRequest) -> ChatRequest | None:
        """`request` without what its upstream would be asked to reason by that stella
        derived from another dialect's words (an effort from Anthropic's thinking, thinking
        from an effort), or None when it derives nothing. An upstream that refuses a
        request is asked once more so (see Inference), and its model so from then on."""
        return None

    async def start(self) -> None:
        """Open clients, load models; called once in the app's lifespan."""

    def admit(self, request: ChatRequest) -> None:
        """Refuse at once (raise Overloaded) when the backend's queue is full."""

    def refuse_json_mode(self, request: ChatRequest) -> None:
        """Raise InvalidRequest for a JSON mode, for a backend that cannot keep to one."""
        fmt = request.response_format
        if fmt is not None and fmt.get("type") != "text":
            # An answer in prose would pass for one that obeyed. Refused like a prompt
            # too long for the context: not retried, and no fallback is tried for it.
            raise InvalidRequest(
                f"$.response_format: the model's backend ({self.kind}) cannot constrain "
                "output to JSON; send the request without it",
                param="response_format",
            )

    def chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[BackendEvent]:
        """Run one chat; `request.model` is already the upstream model name."""
        raise NotImplementedError

    async def count_tokens(self, request: ChatRequest, ctx: CallContext) -> int:
        """The prompt tokens a chat of `request` would feed the model (`request.model` is
        already the upstream model name): an exact count, never an estimate; asks nothing
        that spends tokens. A backend with no way to count raises NotSupported."""
        # An estimate (four characters a token) would pass for the model's own count, and
        # a client sizing its context by it would be wrong without a word.
        raise NotSupported(f"the {self.kind} backend has no way to count a prompt's tokens")

    @property
    def makes_embeddings(self) -> bool:
        """Whether this backend implements `embed` (the embed routes refuse a route whose
        backend does not before admission: no slot, no rate limit, no log event)."""
        return type(self).embed is not Backend.embed

    async def embed(self, request: EmbedRequest, ctx: CallContext) -> EmbedResult:
        """One vector per input of `request` (`request.model` is already the upstream
        model's name), in order, and the tokens read; a failure raises a StellaError, as
        a chat's does. The default refuses: the backend makes no embeddings."""
        raise NotSupported(f"model {request.model!r} does not make embeddings")

    async def models(self) -> list[str]:
        """Model names the engine offers."""
        return []

    async def health(self) -> BackendHealth:
        """Whether the engine is reachable, without spending tokens."""
        return BackendHealth(ok=True)

    def loaded(self, upstream_model: str) -> bool:
        """Whether this model is ready to answer without a load."""
        return True

    def problem(self, upstream_model: str) -> str:
        """Why the model can't be loaded, when an attempt failed ("" otherwise)."""
        return ""

    def preflight(self, upstream_model: str) -> str:
        """Why the model could not load, as far as cheap checks tell without loading it or
        calling anyone (an engine missing, a model file not there); "" when none found."""
        return ""

    def loading(self, upstream_model: str) -> bool:
        """Whether a load of this model is under way now."""
        return False

    def memory_bytes(self, upstream_model: str) -> int | None:
        """Memory the loaded model holds, when the backend knows it."""
        return None

    def expires_at(self, upstream_model: str) -> float | None:
        """When the loaded model is unloaded unless a request uses it first (Unix time;
        math.inf: never), when the backend knows it (None: unknown)."""
        return None

    async def context_length(self, upstream_model: str) -> int | None:
        """The context window the model answers within, in tokens, when the backend knows
        it (None: unknown, and left out of what the APIs report); asks nothing that spends
        tokens, and answers within a few seconds."""
        return None

    async def load(self, upstream_model: str) -> None:
        """Make the model ready to answer (an engine in this process loads it now)."""

    def working(self, seconds: float) -> bool:
        """Whether a local-queue engine showed a sign of work in the last `seconds`."""
        return False

    async def unload(self, upstream_model: str) -> bool:
        """Free the model's memory now; whether there was anything to free."""
        return False

    def capabilities(self, upstream_model: str) -> list[str]:
        """What the model can do: chat, tools, ..."""
        return ["chat"]

    def listed_capabilities(self, upstream_model: str, images: bool | None = None) -> list[str]:
        """What a model list says the model can do: `capabilities`, plus `images` where this
        backend sends a request's images on (or `images` says a fallback reads them) and
        `embeddings` where it makes them (its upstream's model may still refuse either: a
        chat model asked for vectors)."""
        caps = self.capabilities(upstream_model)
        reads = self.reads_images if images is None else images
        extra = [
            name
            for name, has in (("images", reads), ("embeddings", self.makes_embeddings))
            if has and name not in caps
        ]
        return [*caps, *extra] if extra else caps

    async def aclose(self) -> None:
        """Release clients, models and threads; called once at shutdown."""
