"""Rate limits, daily quotas and concurrency: token buckets per key and per model, slots
per key and per backend (`limits.backends`).

Buckets live in a `BucketStore`: this process's memory, or Redis (one atomic
Lua script per check, see stella.state_redis) so limits hold across workers
and replicas. Requests are counted at admission (and given back when a call waits
for a concurrency slot in vain); tokens are reserved from `max_tokens` and an
estimate of the prompt at admission, and settled with the real usage at the end.

A daily quota (`requests_per_day`, `tokens_per_day`, and `usd_per_day`, a budget in
nano-dollars: reserved at the call's estimated cost, settled with what it cost, see
stella.cost) is a bucket that never refills
(its rate per second is 0), one per UTC day: its key ends with the day's date, so
the next day starts a full bucket, and it goes through the same checks, in the same
admission (one Lua call with Redis), as the per-minute buckets. Days are told by
the state store's clock (Redis's, with Redis), as the usage counters' are. A daily
bucket keeps the capacity it was counted against beside its level, so that a quota
changed during the day (a runtime key's update) keeps what the day spent. A daily
bucket refused while this process's own running calls hold reserved what it lacks is
not used up: that refusal is retryable within seconds (`Limiter.held`; other replicas'
calls in flight are not known here).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from stella.calls import Admission, Call, Permit, Principal, prompt_estimate
from stella.cost import NANOS_PER_USD, Rates, budget_nanos
from stella.errors import Overloaded, QuotaExceeded, RateLimited
from stella.protocol import ChatRequest, Usage
from stella.routing import Route
from stella.settings import ModelLimits, Settings
from stella.state import StateStore

# A UTC day, in seconds; the days of daily buckets a process keeps in memory (today's,
# and yesterday's, which calls admitted before midnight still settle into).
DAY_S = 86_400
DAYS_KEPT = 2
# The key prefixes of daily buckets, whose keys end with ":YYYY-MM-DD".
DAILY = ("rpd:", "tpd:", "usd:")
# The Retry-After of a daily quota refused while this process's calls still running hold
# what it lacks (reserved, not yet spent): they settle as they end, often giving some back.
HELD_RETRY_S = 3.0
# The most admission plans (a key's buckets and slots on a route) a process keeps made.
PLANS_KEPT = 10_000
# What a bucket counts: requests, tokens (reserved, settled with the usage), nano-dollars
# (a daily budget: reserved, settled with the cost).
REQUEST, TOKEN, USD = "request", "token", "usd"


@dataclass(slots=True)
class Take:
    """The answer of one bucket check."""

    allowed: bool
    remaining: float
    retry_after: float  # seconds until `cost` would fit (0 when allowed)
    reset: float  # seconds until the bucket is full again
    # Taken by this process's stand-in for a shared store (Redis away): settled there.
    local: bool = False
    # What was not taken of the cost: a daily bucket with less left than the cost, but
    # something, gives what it has (a small quota is not one call a day).
    cut: float = 0.0


class BucketStore(Protocol):
    """Where bucket levels live."""

    async def take_all(self, checks: list[tuple[str, float, float, float]]) -> list[Take]:
        """Take from every (key, capacity, per_s, cost) bucket, or from none if one is short;
        a daily bucket (per_s 0) with less than its cost left, but more than nothing, is
        not short: it gives what is left (its Take's `cut` the rest)."""
        ...

    def give(
        self, key: str, capacity: float, per_s: float, amount: float, local: bool = False
    ) -> None:
        """Return `amount` (negative: charge more) to a bucket, never above capacity; to
        the store's stand-in when `local` (the take it settles was the stand-in's)."""
        ...

    def forget_days(self, kept: tuple[str, ...]) -> None:
        """Drop the daily buckets this process holds of days other than `kept`."""
        ...

    def forget(self, keys: Sequence[str]) -> None:
        """Drop what this process holds of these buckets (a shared store's own copies
        go with the key change that names them: KeyChange.forget)."""
        ...


class SlotStore(Protocol):
    """Where concurrency slots are held."""

    async def acquire(self, name: str, size: int, wait_s: float) -> Any | None:
        """A held slot (whatever `release` takes back), or None after `wait_s` seconds."""
        ...

    def release(self, held: Any) -> None:
        """Give a slot back."""
        ...

    def free(self, name: str, size: int) -> bool:
        """Whether `acquire` would hand a slot out now, with no wait (as far as this
        process knows: slots shared by replicas are a guess from its own)."""
        ...


class MemoryBuckets:
    """Token buckets in this process."""

    def __init__(self) -> None:
        # key -> (level, at, the capacity it was counted against)
        self._levels: dict[str, tuple[float, float, float]] = {}

    def _level(self, key: str, capacity: float, per_s: float, now: float) -> float:
        got = self._levels.get(key)
        if got is None:
            return capacity
        level, at, was = got
        if not per_s:
            # A daily bucket keeps what the day spent (capacity - level): a limit changed
            # during the day (a key's update, a restart with another config) moves what
            # is left by as much, never the spend.
            return level + capacity - was
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
            level = self._level(key, cap, per_s, now)
            if level < cost and (per_s or level <= 0):
                ok = False
            levels.append(level)
        out = []
        for level, (key, cap, per_s, cost) in zip(levels, checks, strict=True):
            if ok:
                if level < cost:  # a daily bucket's last: all of it
                    left = 0.0
                    out.append(Take(True, left, 0.0, 0.0, cut=cost - level))
                else:
                    left = level - cost
                    out.append(Take(True, left, 0.0, refill_s(cap - left, per_s)))
            else:
                left = level
                short = cost - level
                wait = refill_s(short, per_s) if short > 0 else 0.0
                fits = short <= 0 or (not per_s and level > 0)
                out.append(Take(fits, left, wait, refill_s(cap - left, per_s)))
            store[key] = (left, now, cap)
        return out

    def give(
        self, key: str, capacity: float, per_s: float, amount: float, local: bool = False
    ) -> None:
        """Refund (or charge) after the fact (`local`: this store is its own stand-in)."""
        now = time.monotonic()
        level = self._level(key, capacity, per_s, now)
        self._levels[key] = (min(capacity, level + amount), now, capacity)

    def forget_days(self, kept: tuple[str, ...]) -> None:
        """Drop daily buckets of days other than `kept` (each key ends with its day)."""
        levels = self._levels
        for key in [k for k in levels if k.startswith(DAILY) and not k.endswith(kept)]:
            del levels[key]

    def forget(self, keys: Sequence[str]) -> None:
        """Drop these buckets: each is full when next checked."""
        for key in keys:
            self._levels.pop(key, None)


def refill_s(tokens: float, per_s: float) -> float:
    """Seconds a bucket takes to refill `tokens`; 0 for a daily bucket, which never
    refills (the limiter counts its wait to midnight)."""
    return tokens / per_s if per_s else 0.0


class _Slot:
    """A slot name's semaphore and its users: the calls that hold or wait for one."""

    __slots__ = ("sem", "users")

    def __init__(self, size: int) -> None:
        self.sem = asyncio.Semaphore(size)
        self.users = 0


class MemorySlots:
    """Concurrency slots of this process: one semaphore per slot name in use.

    A name's semaphore goes once no call holds or waits for it, so the table holds the
    names in use, not every key name ever seen (a purged key's too), and a name's next
    use takes its size then (a key's max_concurrent changed meanwhile).
    """

    def __init__(self) -> None:
        self._sems: dict[str, _Slot] = {}

    async def acquire(self, name: str, size: int, wait_s: float) -> Any | None:
        """A held slot, or None when none freed up within `wait_s` seconds."""
        slot = self._sems.get(name)
        if slot is None:
            slot = self._sems[name] = _Slot(size)
        slot.users += 1
        sem = slot.sem
        if not sem.locked():
            await sem.acquire()  # a slot free: taken with no suspension
            return (name, slot)
        try:
            if wait_s <= 0:  # one look: full
                self._leave(name, slot)
                return None
            async with asyncio.timeout(wait_s):
                await sem.acquire()
        except TimeoutError:
            self._leave(name, slot)
            return None
        except BaseException:  # cancelled while waiting: not a user any more
            self._leave(name, slot)
            raise
        return (name, slot)

    def release(self, held: Any) -> None:
        """Give a slot back."""
        name, slot = held
        slot.sem.release()
        self._leave(name, slot)

    def _leave(self, name: str, slot: _Slot) -> None:
        slot.users -= 1
        if not slot.users and self._sems.get(name) is slot:
            del self._sems[name]

    def free(self, name: str, size: int) -> bool:
        """Whether a slot is free now and no call waits for one."""
        slot = self._sems.get(name)
        return slot is None or not slot.sem.locked()


class LimitPermit(Permit):
    """Releases concurrency slots and settles reserved tokens, once."""

    # Empty until admission fills them (most permits hold no slot): no lists per request.
    # Reserved: key, cap, per_s, cost, and whether the store's stand-in took it (local).
    _reserved: list[tuple[str, float, float, float, bool]] | tuple[()] = ()
    _slots: list[Any] | tuple[()] = ()  # what the slot store handed out
    _backend: Any = None  # the one of them that is the backend's slot

    def __init__(self, limiter: Limiter, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self._limiter = limiter

    def settle(
        self,
        usage: Usage,
        model_usage: Usage | None = None,
        spent: int = 0,
        model_spent: int | None = None,
    ) -> None:
        """Give back what was reserved beyond the real token count: the key's buckets
        by `usage`, the model's by `model_usage` when given (what that model made); the
        budgets' beyond the real cost (`spent`, the model's `model_spent` when given)."""
        if self._reserved:
            used = usage.prompt_tokens + usage.completion_tokens
            made = used
            if model_usage is not None:
                made = model_usage.prompt_tokens + model_usage.completion_tokens
            cost = spent if model_spent is None else model_spent
            give = self._limiter.buckets.give
            held = self._limiter.held
            for key, cap, per_s, reserved, local in self._reserved:
                if not per_s:  # a daily bucket: no longer held by this call
                    left = held.get(key, 0.0) - reserved
                    if left > 0:
                        held[key] = left
                    else:
                        held.pop(key, None)
                if key.startswith("usd:"):
                    # A budget: charged what the call cost, which may take it past its
                    # end (as a token quota's usage may).
                    taken = cost if key.startswith("usd:model:") else spent
                    give(key, cap, per_s, reserved - taken, local)
                    continue
                spent_tokens = made if key.startswith(("tpm:model:", "tpd:model:")) else used
                # Settled where it was taken: a refund of what Redis holds goes to Redis
                # even while it is away, and one of the stand-in's never to Redis.
                give(key, cap, per_s, reserved - spent_tokens, local)
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
        # What this process's running calls hold reserved of each daily bucket (its key
        # with the day): a refusal for want of what they hold is not a day used up.
        self.held: dict[str, float] = {}
        self.rejections = 0
        self._state = state  # whose clock tells the day
        # Today, as daily buckets' keys end: (its first second, its end, ":YYYY-MM-DD").
        self._today: tuple[float, float, str] = (0.0, 0.0, "")

    def _day(self) -> tuple[str, float]:
        """Today's key suffix (the UTC day on the store's clock) and the seconds left in it;
        at a new day, the daily buckets of days past go from this process's memory."""
        now = self._state.wall() if self._state is not None else time.time()
        starts, ends, suffix = self._today
        if not starts <= now < ends:
            starts = now // DAY_S * DAY_S
            ends = starts + DAY_S
            suffix = time.strftime(":%Y-%m-%d", time.gmtime(now))
            kept = tuple(
                time.strftime(":%Y-%m-%d", time.gmtime(starts - i * DAY_S))
                for i in range(DAYS_KEPT)
            )
            self._today = (starts, ends, suffix)
            self.buckets.forget_days(kept)
        return suffix, ends - now

    def key_buckets(self, name: str) -> tuple[str, ...]:
        """Key `name`'s buckets, as _plan names them: per minute, and the daily ones of
        yesterday, today and tomorrow (a call admitted before midnight settles into
        yesterday's; another replica's estimate of the store's clock may be past it)."""
        now = self._state.wall() if self._state is not None else time.time()
        days = [time.strftime(":%Y-%m-%d", time.gmtime(now + d * DAY_S)) for d in (-1, 0, 1)]
        daily = [f"{kind}key:{name}{day}" for kind in DAILY for day in days]
        return (f"rpm:key:{name}", f"tpm:key:{name}", *daily)

    def forget(self, buckets: Sequence[str]) -> None:
        """Drop what this process holds of these buckets."""
        self.buckets.forget(buckets)

    def _plan(self, p: Principal | None, route: Route, backend_slot: bool = True) -> _Plan:
        """The buckets and slots that apply to a key on a route (built once per pair);
        with no key, the route's own: its model's buckets and its backend's slots."""
        cache_key = (
            p.name if p is not None else "",
            route.name,
            route.backend_name if backend_slot else "",
        )
        cached = self._plans.get(cache_key)
        # A runtime route replaced under its name brings its own price.
        if cached is not None and cached.principal is p and cached.rates is route.price:
            return cached
        model = self.limits.models.get(route.name) or ModelLimits()
        on_model = f"model {route.name}"
        # Per-minute buckets first, then the daily ones (their keys get the day's date at
        # each admission); in each, the key's requests, its tokens, the model's, its tokens.
        minute: list[tuple[str, int, str, str]] = [
            (f"rpm:model:{route.name}", model.requests_per_minute, REQUEST, on_model),
            (f"tpm:model:{route.name}", model.tokens_per_minute, TOKEN, on_model),
        ]
        day: list[tuple[str, int, str, str]] = [
            (f"rpd:model:{route.name}", model.requests_per_day, REQUEST, on_model),
            (f"tpd:model:{route.name}", model.tokens_per_day, TOKEN, on_model),
            (f"usd:model:{route.name}", budget_nanos(model.usd_per_day), USD, on_model),
        ]
        slots: list[tuple[str, int]] = []
        if backend_slot:
            slots.append(
                (f"backend:{route.backend_name}", self.limits.backends.get(route.backend_name, 0))
            )
        if p is not None:
            by_key = f"key {p.name}"
            minute[:0] = [
                (f"rpm:key:{p.name}", p.requests_per_minute, REQUEST, by_key),
                (f"tpm:key:{p.name}", p.tokens_per_minute, TOKEN, by_key),
            ]
            day[:0] = [
                (f"rpd:key:{p.name}", p.requests_per_day, REQUEST, by_key),
                (f"tpd:key:{p.name}", p.tokens_per_day, TOKEN, by_key),
                (f"usd:key:{p.name}", budget_nanos(p.usd_per_day), USD, by_key),
            ]
            slots.insert(0, (f"key:{p.name}", p.max_concurrent))
        plan = _Plan(
            p,
            [(k, float(n), n / 60.0, unit, who) for k, n, unit, who in minute if n]
            + [(k, float(n), 0.0, unit, who) for k, n, unit, who in day if n],
            [(name, size) for name, size in slots if size],
            route.price,
        )
        plans = self._plans
        if len(plans) >= PLANS_KEPT and cache_key not in plans:
            # The oldest made goes (dicts keep their order): keys purged and routes
            # removed would otherwise fill the table for good, and nothing new be kept.
            # A plan still in use is made again at its next call, once.
            del plans[next(iter(plans))]
        plans[cache_key] = plan
        return plan

    def admit_now(
        self,
        call: Call,
        route: Route,
        request: ChatRequest,
        backend_slot: bool = True,
        chain: Sequence[Route] = (),
    ) -> Permit | None:
        """Admission decided without waiting: no limit applies, or only buckets in this
        process's memory (raises RateLimited). None when `admit` must wait (Redis, slots).
        `chain`: the routes that may answer, whose dearest price the key's budget takes."""
        plan = self._plan(call.principal, route, backend_slot)
        if not plan.buckets and not plan.slots:
            return _FREE
        buckets = self.buckets
        if plan.slots or type(buckets) is not MemoryBuckets:
            return None
        permit = LimitPermit(self, [])
        checks, day_left = self._checks(plan, request, chain)
        self._charge(plan, checks, buckets.take(checks), permit, day_left=day_left)
        return permit

    async def admit(
        self,
        call: Call,
        route: Route,
        request: ChatRequest,
        backend_slot: bool = True,
        others: Sequence[str] = (),
        chain: Sequence[Route] = (),
    ) -> Permit:
        """Admit the call or raise RateLimited / Overloaded; without the route's backend's
        slot when not `backend_slot` (its circuit is open: a fallback will serve); with
        `others` (a balanced route's other backends), the slot of whichever of them and
        the route's backend frees first, when the route's is not free now; `chain` as for
        `admit_now`."""
        plan = self._plan(call.principal, route, backend_slot)
        if not plan.buckets and not plan.slots:
            return _FREE
        return await self._admit(plan, request, others=others, chain=chain)

    def backend_free(self, backend: str) -> bool:
        """Whether `backend` has a slot free now (limits.backends; always, without one)."""
        size = self.limits.backends.get(backend, 0)
        return not size or self.slots.free(f"backend:{backend}", size)

    async def admit_fallback(
        self,
        route: Route,
        request: ChatRequest,
        backend_held: bool,
        wait_s: float,
        same_route: bool = False,
    ) -> Permit | None:
        """Admission to a fallback route: its model's limits and its backend's slots (the
        key's were taken for the call, and the backend's too when `backend_held`), a slot
        waited for at most `wait_s` (the call's time left). `same_route`: another backend
        of the call's own route (balanced), its slot alone. None when none apply; raises
        as `admit` does."""
        if same_route:
            size = 0 if backend_held else self.limits.backends.get(route.backend_name, 0)
            if not size:
                return None
            plan = _Plan(None, [], [(f"backend:{route.backend_name}", size)])
            return await self._admit(plan, request, wait_s, count=False)
        plan = self._plan(None, route, backend_slot=not backend_held)
        if not plan.buckets and not plan.slots:
            return None
        # A fallback skipped for its model's limit refuses no client: not counted.
        return await self._admit(plan, request, wait_s, count=False)

    async def _admit(
        self,
        plan: _Plan,
        request: ChatRequest,
        wait_s: float | None = None,
        count: bool = True,
        others: Sequence[str] = (),
        chain: Sequence[Route] = (),
    ) -> Permit:
        permit = LimitPermit(self, [])
        checks: list[tuple[str, float, float, float]] = []
        takes: list[Take] = []
        if plan.buckets:
            checks, day_left = self._checks(plan, request, chain)
            buckets = self.buckets
            takes = (
                buckets.take(checks)
                if type(buckets) is MemoryBuckets
                else await buckets.take_all(checks)
            )
            self._charge(plan, checks, takes, permit, count, day_left)
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
                store = self.slots
                for name, size in plan.slots:
                    left = max(deadline - time.monotonic(), 0.0)
                    if not others or not name.startswith("backend:"):
                        slot = await store.acquire(name, size, left)
                    else:
                        # `free` is this process's guess with Redis (another replica may
                        # hold every slot): one ask now, and when that finds none, the
                        # first slot to free on any of the pool's usable backends.
                        slot = (
                            await store.acquire(name, size, 0.0) if store.free(name, size) else None
                        )
                        if slot is None:
                            # One without a slot limit takes the call now (with Redis the
                            # guess may have picked a full one over it): no slot to hold.
                            sizes = self.limits.backends
                            permit.backend = next((b for b in others if not sizes.get(b)), "")
                            if permit.backend:
                                continue
                            left = max(deadline - time.monotonic(), 0.0)
                            slot, permit.backend = await self._first_slot(name, size, others, left)
                    if slot is None:
                        kind, _, who = name.partition(":")
                        running = _counted(size, "request")
                        full = Overloaded(f"{kind} {who} already has {running} running")
                        if kind == "backend":
                            full.backend = who
                        raise full
                    held.append(slot)
                    if name.startswith("backend:"):
                        permit._backend = slot
            except BaseException:
                # Refused, or the client left while queued: nothing stays held, and the
                # request it was counted as goes back (only admitted calls count).
                permit.settle(Usage())
                permit.release()
                for i, (key, cap, per_s, _) in enumerate(checks):
                    if plan.buckets[i][3] == REQUEST:
                        self.buckets.give(key, cap, per_s, 1.0, takes[i].local)
                raise
        return permit

    async def _first_slot(
        self, name: str, size: int, others: Sequence[str], wait_s: float
    ) -> tuple[Any, str]:
        """The slot of `name` or of one of the `others` backends, whichever frees first
        within `wait_s` (a tie: `name`, then the others in their order), and the backend
        it is another's ("" for `name`'s own); (None, "") when none freed. One wait per
        backend, at once: with Redis each asks as a single wait does, and a slot taken by
        one after another's won goes back at once. An `others` backend without a slot
        limit is left out: the call went there before any wait (see `_admit`)."""
        sizes = self.limits.backends
        names = [(name, size)] + [(f"backend:{b}", sizes[b]) for b in others if sizes.get(b, 0)]
        store = self.slots
        waits = [asyncio.ensure_future(store.acquire(n, s, wait_s)) for n, s in names]
        won = -1
        try:
            pending: set[asyncio.Future[Any]] = set(waits)
            while pending and won < 0:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                won = next(
                    (i for i, w in enumerate(waits) if w in done and w.result() is not None), -1
                )
        finally:
            # The losers' waits end here (the client left, or another won): any slot one
            # of them took meanwhile goes back as its wait ends.
            for i, w in enumerate(waits):
                if i != won:
                    w.cancel()
                    w.add_done_callback(partial(_give_back, store))
        if won < 0:
            return None, ""
        return waits[won].result(), names[won][0].partition(":")[2] if won else ""

    def _checks(
        self, plan: _Plan, request: ChatRequest, chain: Sequence[Route] = ()
    ) -> tuple[list[tuple[str, float, float, float]], float]:
        """What each bucket of the plan is asked for: a request, or the token reserve (a
        budget's at the route's price; the key's at the dearest of `chain`'s, the routes
        that may answer); and the seconds left of the UTC day when a daily quota applies
        (else 0)."""
        reserve = budget = dearest = 1.0
        if plan.token_buckets:
            # The answer's tokens (max_tokens) and the prompt's, estimated at four characters
            # a token: a burst of long prompts is refused before their usage is known.
            # Never below one token: a negative reservation would settle as a huge charge.
            answer = max(request.options.max_tokens or self.limits.reserve_tokens, 1)
            prompt = prompt_estimate(request)
            reserve = float(answer + prompt)
            rates = plan.rates
            if rates is not None:
                # A budget reserves what those tokens would cost here; at least a
                # nano-dollar, so that a budget used up refuses every call, one to an
                # unpriced route too (which costs nothing, unless a fallback answers).
                budget = dearest = float(max(rates.cost(prompt, answer), 1))
            if plan.key_budget:
                # The key pays for whichever route answers: a dearer fallback's cost is
                # reserved up front (it takes only its model's budget when it is tried),
                # else a burst of calls whose asked route fails would all pass on a
                # cheap reservation and spend the key's day many times over.
                for r in chain:
                    price = r.price
                    if price is not None and price is not rates:
                        dearest = max(dearest, float(price.cost(prompt, answer)))
        # All buckets of one admission in one step: one Redis round trip, and nothing is
        # taken from any bucket unless every bucket has room.
        checks = []
        for k, n, ps, unit, _ in plan.buckets:
            if unit == REQUEST:
                ask = 1.0
            elif unit == TOKEN:
                ask = reserve
            else:  # a budget: the key's at the dearest route that may answer
                ask = dearest if k.startswith("usd:key:") else budget
            checks.append((k, n, ps, min(ask, n)))
        if not plan.daily:
            return checks, 0.0
        suffix, left = self._day()
        for i in plan.daily:  # today's bucket of each daily quota
            k, n, ps, cost = checks[i]
            checks[i] = (k + suffix, n, ps, cost)
        return checks, left

    def _charge(
        self,
        plan: _Plan,
        checks: list[tuple[str, float, float, float]],
        takes: list[Take],
        permit: LimitPermit,
        count: bool = True,
        day_left: float = 0.0,
    ) -> None:
        """Headers from the takes; RateLimited (QuotaExceeded for a daily quota) when a
        bucket had no room (counted in `rejections` when `count`: a client's refusal);
        the reservation. `day_left`: the seconds until the daily buckets renew."""
        headers = permit.headers
        buckets = plan.buckets
        for take in takes:
            if not take.allowed:
                break
        else:
            # Admitted: the first per-minute bucket (the key's requests, when it has a
            # limit) sets the X-RateLimit headers, the first daily one the X-Quota ones.
            first = plan.minute_first
            if first is not None:
                take = takes[first]
                left = take.remaining
                headers.append((b"x-ratelimit-limit", plan.limit_header))
                headers.append((b"x-ratelimit-remaining", b"%d" % left if left > 0 else b"0"))
                headers.append((b"x-ratelimit-reset", b"%d" % math.ceil(take.reset)))
            if plan.daily:
                i = plan.daily[0]
                left = takes[i].remaining
                if buckets[i][3] == USD:
                    headers.append((b"x-quota-limit", _usd(buckets[i][1]).encode()))
                    headers.append((b"x-quota-remaining", _usd(left).encode()))
                else:
                    headers.append((b"x-quota-limit", b"%d" % buckets[i][1]))
                    headers.append((b"x-quota-remaining", b"%d" % left if left > 0 else b"0"))
                headers.append((b"x-quota-reset", b"%d" % math.ceil(day_left)))
            # Token buckets hold a reservation until the real usage is known.
            if plan.token_buckets:
                reserved = []
                held = self.held
                for i in plan.token_buckets:
                    key, n, ps, cost = checks[i]
                    take = takes[i]
                    taken = cost - take.cut
                    reserved.append((key, n, ps, taken, take.local))
                    if not ps:
                        held[key] = held.get(key, 0.0) + taken
                permit._reserved = reserved
            return
        if count:
            self.rejections += 1
        # The headers describe the limits that refused (their room, their reset): the
        # first per-minute one's X-RateLimit, the first daily one's X-Quota. Retry-After
        # waits for every bucket that was short: after the first's time alone, a client
        # that obeys it would be refused again by another (a daily one: at midnight).
        refused: dict[str, str] = {}
        wait = 0.0
        quota: str | None = None
        minute: str | None = None
        # The first daily quota refused for want of what this process's running calls
        # hold reserved (the day's spend settled so far is under it): they give back
        # what they did not use as they end, so the wait is seconds, not to midnight.
        held_by: str | None = None
        held_headers: dict[str, str] = {}
        for i, take in enumerate(takes):
            if take.allowed:
                continue
            _, n, per_s, unit, who = buckets[i]
            left = max(int(take.remaining), 0)
            if per_s:
                what = _counted(int(n), unit)
                wait = max(wait, take.retry_after)
                if minute is None:
                    minute = f"rate limit of {what} per minute reached for {who}"
                    refused["x-ratelimit-limit"] = str(int(n))
                    refused["x-ratelimit-remaining"] = str(left)
                    refused["x-ratelimit-reset"] = str(math.ceil(take.reset))
                continue
            # Refused only with nothing left: a call gets what is left of a day's tokens.
            holding = self.held.get(checks[i][0], 0.0) if unit != REQUEST else 0.0
            say = _usd if unit == USD else _whole
            of = (
                f"daily budget of {_usd(n)} USD"
                if unit == USD
                else f"daily quota of {_counted(int(n), unit)}"
            )
            told = {
                "x-quota-limit": say(n),
                "x-quota-remaining": say(left),
                "x-quota-reset": str(math.ceil(day_left)),
            }
            if take.remaining + holding > 0:
                if held_by is None:
                    held_by = (
                        f"{of} for {who}: {say(left)} left, {say(holding)} held by calls "
                        f"still running (reserved, not yet spent); retry in {HELD_RETRY_S:g} s"
                    )
                    held_headers = told
                continue
            wait = max(wait, day_left)
            if quota is None:
                quota = (
                    f"{of} used up for {who} ({say(left)} left); "
                    f"it renews at 00:00 UTC, in {math.ceil(day_left)} s"
                )
                refused.update(told)
        if quota is not None:
            # Waiting a minute would not help: the quota, not the rate, is what to tell.
            raise QuotaExceeded(quota, retry_after=wait, headers=refused)
        if held_by is not None:
            refused.update(held_headers)
            wait = max(wait, HELD_RETRY_S)
            raise RateLimited(held_by, retry_after=wait, headers=refused)
        raise RateLimited(minute or "rate limit reached", retry_after=wait, headers=refused)


class _Plan:
    """What admission checks for one key on one route."""

    __slots__ = (
        "buckets",
        "daily",
        "key_budget",
        "limit_header",
        "minute_first",
        "principal",
        "rates",
        "slots",
        "token_buckets",
    )

    def __init__(
        self,
        principal: Principal | None,
        buckets: list[tuple[str, float, float, str, str]],
        slots: list[tuple[str, int]],
        rates: Rates | None = None,
    ) -> None:
        self.principal = principal
        # (bucket key, its number (per minute, or per day; nano-dollars for a budget),
        # per second (0: a daily quota, its key completed by the day), what it counts
        # (REQUEST, TOKEN, USD), whose)
        self.buckets = buckets
        self.rates = rates  # the route's price, which a budget's reservation takes
        self.slots = slots  # (slot name, size)
        minute = [i for i, b in enumerate(buckets) if b[2]]
        self.minute_first = minute[0] if minute else None
        self.limit_header = b"%d" % buckets[minute[0]][1] if minute else b""
        self.daily = [i for i, b in enumerate(buckets) if not b[2]]  # indexes
        # Reserved and settled (tokens, budgets): indexes.
        self.token_buckets = [i for i, b in enumerate(buckets) if b[3] != REQUEST]
        # A key's budget applies: it reserves at the dearest price of the call's chain.
        self.key_budget = any(b[0].startswith("usd:key:") for b in buckets)


_FREE = Permit()


def _give_back(store: SlotStore, wait: asyncio.Future[Any]) -> None:
    """Release the slot a wait that lost the race (`_first_slot`) took after all."""
    if not wait.cancelled() and wait.exception() is None and wait.result() is not None:
        store.release(wait.result())


def _usd(amount: float) -> str:
    """Nano-dollars as USD, to the micro-dollar below (never more than is left), as a
    budget's headers and messages say them (nothing under 0: a budget in debt has
    nothing left)."""
    micro = int(max(amount, 0.0)) // (NANOS_PER_USD // 1_000_000)
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


def _whole(n: float) -> str:
    """A count of requests or tokens, as a quota's headers and messages say it."""
    return str(int(n))


def _counted(n: int, noun: str) -> str:
    """`n` and `noun`, plural but for one: "1 request", "5 requests"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _buckets_for(state: StateStore | None) -> BucketStore:
    make = getattr(state, "buckets", None)
    return make() if callable(make) else MemoryBuckets()
