"""Rate limits and concurrency: token buckets per key and per model, slots per key and
per backend (`limits.backends`).

Buckets live in a `BucketStore`: this process's memory, or Redis (one atomic
Lua script per check, see stella.state_redis) so limits hold across workers
and replicas. Requests are counted at admission (and given back when a call waits
for a concurrency slot in vain); tokens are reserved from `max_tokens` and an
estimate of the prompt at admission, and settled with the real usage at the end.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from stella.calls import Admission, Call, Permit, Principal, prompt_estimate
from stella.errors import Overloaded, RateLimited
from stella.protocol import ChatRequest, Usage
from stella.routing import Route
from stella.settings import ModelLimits, Settings
from stella.state import StateStore


@dataclass(slots=True)
class Take:
    """The answer of one bucket check."""

    allowed: bool
    remaining: float
    retry_after: float  # seconds until `cost` would fit (0 when allowed)
    reset: float  # seconds until the bucket is full again


class BucketStore(Protocol):
    """Where bucket levels live."""

    async def take_all(self, checks: list[tuple[str, float, float, float]]) -> list[Take]:
        """Take from every (key, capacity, per_s, cost) bucket, or from none if one is short."""
        ...

    def give(self, key: str, capacity: float, per_s: float, amount: float) -> None:
        """Return `amount` (negative: charge more) to a bucket, never above capacity."""
        ...


class SlotStore(Protocol):
    """Where concurrency slots are held."""

    async def acquire(self, name: str, size: int, wait_s: float) -> Any | None:
        """A held slot (whatever `release` takes back), or None after `wait_s` seconds."""
        ...

    def release(self, held: Any) -> None:
        """Give a slot back."""
        ...


class MemoryBuckets:
    """Token buckets in this process."""

    def __init__(self) -> None:
        self._levels: dict[str, tuple[float, float]] = {}  # key -> (level, at)

    def _level(self, key: str, capacity: float, per_s: float, now: float) -> float:
        level, at = self._levels.get(key, (capacity, now))
        return min(capacity, level + (now - at) * per_s)

    async def take_all(self, checks: list[tuple[str, float, float, float]]) -> list[Take]:
        """Every bucket has room: take from all; otherwise take from none."""
        return self.take(checks)

    def take(self, checks: list[tuple[str, float, float, float]]) -> list[Take]:
        """take_all without the await: memory needs none (the limiter calls this directly)."""
        now = time.monotonic()
        store = self._levels
        levels = []
        ok = True
        for key, cap, per_s, cost in checks:
            got = store.get(key)
            level = cap if got is None else min(cap, got[0] + (now - got[1]) * per_s)
            if level < cost:
                ok = False
            levels.append(level)
        out = []
        for level, (key, cap, per_s, cost) in zip(levels, checks, strict=True):
            if ok:
                left = level - cost
                out.append(Take(True, left, 0.0, (cap - left) / per_s))
            else:
                left = level
                short = cost - level
                out.append(Take(short <= 0, left, max(short, 0.0) / per_s, (cap - left) / per_s))
            store[key] = (left, now)
        return out

    def give(self, key: str, capacity: float, per_s: float, amount: float) -> None:
        """Refund (or charge) after the fact."""
        now = time.monotonic()
        level = self._level(key, capacity, per_s, now)
        self._levels[key] = (min(capacity, level + amount), now)


class MemorySlots:
    """Concurrency slots of this process: one semaphore per slot name."""

    def __init__(self) -> None:
        self._sems: dict[str, asyncio.Semaphore] = {}

    async def acquire(self, name: str, size: int, wait_s: float) -> Any | None:
        """A held slot, or None when none freed up within `wait_s` seconds."""
        sem = self._sems.get(name)
        if sem is None:
            sem = self._sems[name] = asyncio.Semaphore(size)
        try:
            async with asyncio.timeout(wait_s):
                await sem.acquire()
        except TimeoutError:
            return None
        return sem

    def release(self, held: Any) -> None:
        """Give a slot back."""
        held.release()


class LimitPermit(Permit):
    """Releases concurrency slots and settles reserved tokens, once."""

    # Empty until admission fills them (most permits hold no slot): no lists per request.
    _reserved: list[tuple[str, float, float, float]] | tuple[()] = ()  # key, cap, per_s, cost
    _slots: list[Any] | tuple[()] = ()  # what the slot store handed out
    _backend: Any = None  # the one of them that is the backend's slot

    def __init__(self, limiter: Limiter, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self._limiter = limiter

    def settle(self, usage: Usage, model_usage: Usage | None = None) -> None:
        """Give back what was reserved beyond the real token count: the key's buckets
        by `usage`, the model's by `model_usage` when given (what that model made)."""
        if self._reserved:
            used = usage.prompt_tokens + usage.completion_tokens
            made = used
            if model_usage is not None:
                made = model_usage.prompt_tokens + model_usage.completion_tokens
            for key, cap, per_s, reserved in self._reserved:
                spent = made if key.startswith("tpm:model:") else used
                self._limiter.buckets.give(key, cap, per_s, reserved - spent)
            self._reserved = ()

    def release(self) -> None:
        """Free the concurrency slots, once."""
        slots = self._slots
        self._slots = ()
        store = self._limiter.slots
        self._backend = None
        for slot in slots:
            store.release(slot)

    def release_backend(self) -> None:
        """Free the backend's slot alone, once: the call went on to another backend,
        and this one may serve someone else meanwhile (the key's slot stays held)."""
        slot = self._backend
        if slot is None:
            return
        self._backend = None
        self._slots = [s for s in self._slots if s is not slot]
        self._limiter.slots.release(slot)


class Limiter(Admission):
    """Admission: per-key and per-model buckets, per-key and per-backend concurrency."""

    def __init__(self, settings: Settings, state: StateStore | None = None) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.buckets: BucketStore = _buckets_for(state)
        make = getattr(state, "slots", None)
        # Shared through the state store when it offers slots (Redis), else this process's.
        self.slots: SlotStore = make() if callable(make) else MemorySlots()
        self._plans: dict[tuple[str, str, str], _Plan] = {}
        self.rejections = 0

    def _plan(self, p: Principal | None, route: Route, backend_slot: bool = True) -> _Plan:
        """The buckets and slots that apply to a key on a route (built once per pair);
        with no key, the route's own: its model's buckets and its backend's slots."""
        cache_key = (
            p.name if p is not None else "",
            route.name,
            route.backend_name if backend_slot else "",
        )
        cached = self._plans.get(cache_key)
        if cached is not None and cached.principal is p:
            return cached
        model = self.limits.models.get(route.name) or ModelLimits()
        buckets = [
            (
                f"rpm:model:{route.name}",
                model.requests_per_minute,
                False,
                f"model {route.name}",
            ),
            (
                f"tpm:model:{route.name}",
                model.tokens_per_minute,
                True,
                f"model {route.name}",
            ),
        ]
        slots: list[tuple[str, int]] = []
        if backend_slot:
            slots.append(
                (f"backend:{route.backend_name}", self.limits.backends.get(route.backend_name, 0))
            )
        if p is not None:
            buckets[:0] = [
                (f"rpm:key:{p.name}", p.requests_per_minute, False, f"key {p.name}"),
                (f"tpm:key:{p.name}", p.tokens_per_minute, True, f"key {p.name}"),
            ]
            slots.insert(0, (f"key:{p.name}", p.max_concurrent))
        plan = _Plan(
            p,
            [(k, float(n), n / 60.0, tokens, who) for k, n, tokens, who in buckets if n],
            [(name, size) for name, size in slots if size],
        )
        if len(self._plans) < 10_000:
            self._plans[cache_key] = plan
        return plan

    def admit_now(
        self, call: Call, route: Route, request: ChatRequest, backend_slot: bool = True
    ) -> Permit | None:
        """Admission decided without waiting: no limit applies, or only buckets in this
        process's memory (raises RateLimited). None when `admit` must wait (Redis, slots)."""
        plan = self._plan(call.principal, route, backend_slot)
        if not plan.buckets and not plan.slots:
            return _FREE
        buckets = self.buckets
        if plan.slots or type(buckets) is not MemoryBuckets:
            return None
        permit = LimitPermit(self, [])
        checks = self._checks(plan, request)
        self._charge(plan, checks, buckets.take(checks), permit)
        return permit

    async def admit(
        self, call: Call, route: Route, request: ChatRequest, backend_slot: bool = True
    ) -> Permit:
        """Admit the call or raise RateLimited / Overloaded; without the route's backend's
        slot when not `backend_slot` (its circuit is open: a fallback will serve)."""
        plan = self._plan(call.principal, route, backend_slot)
        if not plan.buckets and not plan.slots:
            return _FREE
        return await self._admit(plan, request)

    async def admit_fallback(
        self,
        route: Route,
        request: ChatRequest,
        backend_held: bool,
        wait_s: float,
    ) -> Permit | None:
        """Admission to a fallback route: its model's limits and its backend's slots (the
        key's were taken for the call, and the backend's too when `backend_held`), a slot
        waited for at most `wait_s` (the call's time left). None when none apply; raises
        as `admit` does."""
        plan = self._plan(None, route, backend_slot=not backend_held)
        if not plan.buckets and not plan.slots:
            return None
        # A fallback skipped for its model's limit refuses no client: not counted.
        return await self._admit(plan, request, wait_s, count=False)

    async def _admit(
        self, plan: _Plan, request: ChatRequest, wait_s: float | None = None, count: bool = True
    ) -> Permit:
        permit = LimitPermit(self, [])
        checks: list[tuple[str, float, float, float]] = []
        if plan.buckets:
            checks = self._checks(plan, request)
            buckets = self.buckets
            takes = (
                buckets.take(checks)
                if type(buckets) is MemoryBuckets
                else await buckets.take_all(checks)
            )
            self._charge(plan, checks, takes, permit, count)
        if plan.slots:
            held: list[Any] = []
            permit._slots = held
            try:
                queue_s = self.limits.queue_timeout_s
                if wait_s is not None:
                    queue_s = max(0.0, min(queue_s, wait_s))
                # One deadline for all the slots: a call that waited for its key's slot
                # waits for its backend's only for what is left of queue_timeout_s.
                deadline = time.monotonic() + queue_s
                for name, size in plan.slots:
                    left = max(deadline - time.monotonic(), 0.0)
                    slot = await self.slots.acquire(name, size, left)
                    if slot is None:
                        what = name.replace(":", " ", 1)
                        raise Overloaded(f"{what} already has {size} requests running")
                    held.append(slot)
                    if name.startswith("backend:"):
                        permit._backend = slot
            except BaseException:
                # Refused, or the client left while queued: nothing stays held, and the
                # request it was counted as goes back (only admitted calls count).
                permit.settle(Usage())
                permit.release()
                for i, (key, cap, per_s, _) in enumerate(checks):
                    if not plan.buckets[i][3]:
                        self.buckets.give(key, cap, per_s, 1.0)
                raise
        return permit

    def _checks(self, plan: _Plan, request: ChatRequest) -> list[tuple[str, float, float, float]]:
        """What each bucket of the plan is asked for: a request, or the token reserve."""
        reserve = 1.0
        if plan.token_buckets:
            # The answer's tokens (max_tokens) and the prompt's, estimated at four characters
            # a token: a burst of long prompts is refused before their usage is known.
            # Never below one token: a negative reservation would settle as a huge charge.
            answer = request.options.max_tokens or self.limits.reserve_tokens
            reserve = float(max(answer, 1) + prompt_estimate(request))
        # All buckets of one admission in one step: one Redis round trip, and nothing is
        # taken from any bucket unless every bucket has room.
        return [
            (k, n, ps, min(reserve, n) if tokens else 1.0) for k, n, ps, tokens, _ in plan.buckets
        ]

    def _charge(
        self,
        plan: _Plan,
        checks: list[tuple[str, float, float, float]],
        takes: list[Take],
        permit: LimitPermit,
        count: bool = True,
    ) -> None:
        """Headers from the takes; RateLimited when a bucket had no room (counted in
        `rejections` when `count`: a client's refusal); the reservation."""
        headers = permit.headers
        for i, take in enumerate(takes):
            if not take.allowed:
                # The headers describe the limit that refused (its room, its reset).
                _, n, _, tokens, who = plan.buckets[i]
                if count:
                    self.rejections += 1
                refused = {
                    "x-ratelimit-limit": str(int(n)),
                    "x-ratelimit-remaining": str(max(int(take.remaining), 0)),
                    "x-ratelimit-reset": str(math.ceil(take.reset)),
                }
                # Retry-After waits for every bucket that was short: after the first's
                # time alone, a client that obeys it would be refused again by another.
                wait = max(t.retry_after for t in takes if not t.allowed)
                raise RateLimited(
                    f"rate limit of {int(n)} {'tokens' if tokens else 'requests'} per "
                    f"minute reached for {who}",
                    retry_after=wait,
                    headers=refused,
                )
        # Admitted: the first bucket (the key's requests, when it has a limit) sets them.
        first = takes[0]
        left = first.remaining
        headers.append((b"x-ratelimit-limit", plan.limit_header))
        headers.append((b"x-ratelimit-remaining", b"%d" % left if left > 0 else b"0"))
        headers.append((b"x-ratelimit-reset", b"%d" % math.ceil(first.reset)))
        # Token buckets hold a reservation until the real usage is known.
        if plan.token_buckets:
            permit._reserved = [checks[i] for i in plan.token_buckets]


class _Plan:
    """What admission checks for one key on one route."""

    __slots__ = ("buckets", "limit_header", "principal", "slots", "token_buckets")

    def __init__(
        self,
        principal: Principal | None,
        buckets: list[tuple[str, float, float, bool, str]],
        slots: list[tuple[str, int]],
    ) -> None:
        self.principal = principal
        self.buckets = buckets  # (bucket key, per minute, per second, counts tokens, whose)
        self.slots = slots  # (slot name, size)
        self.limit_header = b"%d" % buckets[0][1] if buckets else b""
        self.token_buckets = [i for i, b in enumerate(buckets) if b[3]]  # indexes


_FREE = Permit()


def _buckets_for(state: StateStore | None) -> BucketStore:
    make = getattr(state, "buckets", None)
    return make() if callable(make) else MemoryBuckets()
