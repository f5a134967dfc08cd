"""Who calls and what admission hands out: the types every layer shares."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import msgspec
from starlette.types import Receive

from stella.errors import Forbidden, ModelNotFound, StellaError
from stella.images import IMAGE_TOKENS
from stella.protocol import ChatRequest, Usage
from stella.routing import Allowed, Route

_random = random.Random()


def new_request_id() -> str:
    """A sortable, unique request ID (not a secret: no system entropy call per request)."""
    return f"req_{time.time_ns():x}{_random.getrandbits(40):010x}"


# A client's X-Request-ID that is kept (README and /openapi.json quote it).
RID_PATTERN = "[A-Za-z0-9._:-]{1,128}"
_RID = re.compile(RID_PATTERN)


def request_id_for(given: str | None) -> str:
    """The request's ID: the client's `X-Request-ID` when well-formed, else a new one."""
    return given if given is not None and _RID.fullmatch(given) else new_request_id()


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: a key's name and what it may do."""

    name: str = "anonymous"
    admin: bool = False
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    requests_per_day: int = 0
    tokens_per_day: int = 0
    usd_per_day: float = 0.0  # a daily budget in USD (0: none)
    # When the key stops working, in seconds since the epoch on the state store's clock
    # (0: never): a runtime key's expiry, or a rotated key's old secret's end of grace.
    expires_at: float = 0.0

    def may_use(self, model: str) -> bool:
        """Whether a model name matches one of the key's glob patterns."""
        if self.models == ("*",):
            return True
        return any(fnmatchcase(model, p) for p in self.models)

    @property
    def scope(self) -> Allowed | None:
        """`may_use` for a key limited to some models; None for one that may use any."""
        return None if self.models == ("*",) else self.may_use

    def check(self, model: str, *, asked: str | None, hide: bool = False) -> None:
        """Raise unless the key may use `model`: 403, or 404 where listings hide it (named
        as `asked`, the name the client used: an alias must not reveal its route)."""
        if not self.may_use(model):
            # No name asked for is the default model, which this key's listings hide
            # (`default: null`): the refusal names it no more than they do.
            what = f"model {asked!r}" if asked else "the default model"
            if hide:
                raise ModelNotFound(f"{what} not found")
            raise Forbidden(f"this key may not use {what}")


ANONYMOUS = Principal(admin=True)


@dataclass(slots=True)
class Call:
    """One client call as it crosses the pipeline."""

    request_id: str
    api: str = "native"
    principal: Principal = ANONYMOUS
    # Set by the stream layer before it cancels the task: client_closed | shutting_down.
    cancel_reason: str | None = None
    # A configured backend chosen by the client (OpenAI `provider`): bypasses routes.
    backend: str | None = None
    # The backend of a balanced route the client named (a direct `backend/model` name,
    # OpenAI `provider`): the call starts there rather than on the least busy one. Set by
    # core.Pipeline._resolve (a direct name) and api/openai.py (`provider`).
    pin: str = ""
    # The API key the caller presented: masked where its request's log line holds what
    # the client wrote (metadata, content), should the client have echoed it there.
    secret: str = ""
    # The request's ASGI receive: a wait for a concurrency slot watches it for the
    # client leaving (None outside HTTP).
    receive: Receive | None = None
    # The request's headers (ASGI's: lowercase names): an inference reads its trace
    # context there (stella.trace), only once it is admitted.
    headers: Sequence[tuple[bytes, bytes]] = ()
    # The HTTP status the call's API gives an error, when not the error's own (the
    # Anthropic dialect's 529 for an overload): the inference log records what the client
    # got. None: the error's own status.
    error_status: Callable[[StellaError], int] | None = None


def prompt_estimate(request: ChatRequest) -> int:
    """The prompt's tokens, estimated before any tokenizer has read it: four characters
    a token (a common rule of thumb for English text), settled with the real count.
    An image counts IMAGE_TOKENS, whatever the size of its base64."""
    chars = 0
    images = 0
    for m in request.messages:
        chars += len(m.content)
        if m.images:
            images += len(m.images)
    tools = request.tools
    if tools:
        # The model reads the tool definitions as part of its prompt: a request with large
        # ones reserves for them too, rather than passing as a short prompt.
        for tool in tools:
            fn = tool.function
            chars += len(fn.name) + len(fn.description)
            if fn.parameters:
                chars += len(_encode(fn.parameters))
    return chars // 4 + images * IMAGE_TOKENS


_encode = msgspec.json.encode


class Permit:
    """What admission handed out: released when the inference ends."""

    # Response headers for the answer (rate-limit state), encoded: (lowercase name, value).
    headers: list[tuple[bytes, bytes]]
    # The backend whose slot the call holds when admission took one of `others` (another
    # backend of a balanced route) in place of its route's: "" when it did not.
    backend = ""

    def __init__(self) -> None:
        self.headers = []

    def settle(
        self,
        usage: Usage,
        model_usage: Usage | None = None,
        spent: int = 0,
        model_spent: int | None = None,
    ) -> None:
        """Correct reserved tokens with the real usage: `usage` for the key's limits,
        `model_usage` (when given) for the model's, which made only part of it when a
        fallback route answered; daily budgets likewise with what the call cost, in
        nano-dollars: `spent` the key's, `model_spent` (when given) the model's."""

    def release(self) -> None:
        """Give back concurrency slots."""

    def release_backend(self) -> None:
        """Give back the backend's concurrency slot alone (the call moved on to another)."""


class Admission:
    """Limits and queues consulted before a call starts (see stella.limits)."""

    def admit_now(
        self,
        call: Call,
        route: Route,
        request: ChatRequest,
        backend_slot: bool = True,
        chain: Sequence[Route] = (),
    ) -> Permit | None:
        """A permit decided without waiting (or a refusal raised), else None: then `admit`;
        `backend_slot`: whether the call takes a slot of the route's backend; `chain`: the
        routes the call may be answered by (its fallbacks too), whose dearest price the
        key's budget reserves at."""
        return None

    async def admit(
        self,
        call: Call,
        route: Route,
        request: ChatRequest,
        backend_slot: bool = True,
        others: Sequence[str] = (),
        chain: Sequence[Route] = (),
    ) -> Permit:
        """Admit or raise RateLimited / Overloaded; `others`: backends whose slot the call
        may take in place of its route's backend's, whichever frees first (the permit's
        `backend` names the one taken); `chain` as for `admit_now`."""
        return Permit()

    def backend_free(self, backend: str) -> bool:
        """Whether a call would take a slot of `backend` now, without waiting (a guess,
        asked without a wait when a balanced route picks one of its backends)."""
        return True

    def key_buckets(self, name: str) -> tuple[str, ...]:
        """The rate-limit and quota buckets of key `name` (none without limits)."""
        return ()

    def forget(self, buckets: Sequence[str]) -> None:
        """Drop what this process holds of these buckets (see key_buckets)."""

    async def admit_fallback(
        self,
        route: Route,
        request: ChatRequest,
        backend_held: bool,
        wait_s: float,
        same_route: bool = False,
    ) -> Permit | None:
        """Admission to a route the call falls back to (its model's own limits), or None;
        `backend_held`: the call holds that backend's slot already; `wait_s`: the longest
        wait for a slot (the call's time left); `same_route`: another backend of the route
        the call was admitted to (a balanced one), whose model's limits it holds."""
        return None
