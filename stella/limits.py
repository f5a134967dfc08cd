"""Rate limits and concurrency: token buckets per key and per model, slots per key.

Buckets live in a `BucketStore`: this process's memory, or Redis (one atomic
Lua script per check, see stella.state_redis) so limits hold across workers
and replicas. Requests are counted at admission; tokens are reserved from
`max_tokens` at admission and settled with the real usage at the end.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from stella.calls import Admission, Call, Permit
from stella.errors import Overloaded, RateLimited
from stella.protocol import ChatRequest, Usage
from stella.routing import Route
from stella.settings import Settings


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


class MemoryBuckets:
    """Token buckets in this process."""

    def __init__(self) -> None:
        self._levels: dict[str, tuple[float, float]] = {}  # key -> (level, at)

    def _level(self, key: str, capacity: float, per_s: float, now: float) -> float:
        level, at = self._levels.get(key, (capacity, now))
        return min(capacity, level + (now - at) * per_s)

    async def take_all(self, checks: list[tuple[str, float, float, float]]) -> list[Take]:
        """Every bucket has room: take from all; otherwise take from none."""
        now = time.monotonic()
        levels = [self._level(k, cap, ps, now) for k, cap, ps, _ in checks]
        ok = all(level >= cost for level, (_, _, _, cost) in zip(levels, checks, strict=True))
        out = []
        for level, (key, cap, ps, cost) in zip(levels, checks, strict=True):
            left = level - cost if ok else level
            self._levels[key] = (left, now)
            wait = 0.0 if level >= cost else (cost - level) / ps
            out.append(Take(level >= cost, left, wait, (cap - left) / ps))
        return out

    def give(self, key: str, capacity: float, per_s: float, amount: float) -> None:
        """Refund (or charge) after the fact."""
        now = time.monotonic()
        level = self._level(key, capacity, per_s, now)
        self._levels[key] = (min(capacity, level + amount), now)


class LimitPermit(Permit):
    """Releases concurrency slots and settles reserved tokens, once."""

    def __init__(self, limiter: Limiter, headers: dict[str, str]) -> None:
        self.headers = headers
        self._limiter = limiter
        self._reserved: list[tuple[str, float, float, float]] = []  # key, cap, per_s, cost
        self._slots: list[asyncio.Semaphore] = []
        self._done = False

    def settle(self, usage: Usage) -> None:
        """Give back what was reserved beyond the real token count."""
        used = usage.prompt_tokens + usage.completion_tokens
        for key, cap, per_s, reserved in self._reserved:
            self._limiter.buckets.give(key, cap, per_s, reserved - used)
        self._reserved = []

    def release(self) -> None:
        """Free the concurrency slots."""
        if self._done:
            return
        self._done = True
        for slot in self._slots:
            slot.release()


class Limiter(Admission):
    """Admission: per-key and per-model buckets, per-key concurrency."""

    def __init__(self, settings: Settings, state: Any = None) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.buckets: BucketStore = _buckets_for(state)
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.rejections = 0

    def _slot(self, name: str, size: int) -> asyncio.Semaphore:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = asyncio.Semaphore(size)
        return slot

    async def admit(self, call: Call, route: Route, request: ChatRequest) -> Permit:
        """Admit the call or raise RateLimited / Overloaded."""
        p = call.principal
        model = self.limits.models.get(route.name, {})
        backend_slots = self.limits.backends.get(route.backend_name, 0)
        if not (
            p.requests_per_minute
            or p.tokens_per_minute
            or p.max_concurrent
            or model
            or backend_slots
        ):
            return _FREE
        headers: dict[str, str] = {}
        permit = LimitPermit(self, headers)
        reserve = float(request.options.max_tokens or self.limits.reserve_tokens)
        checks = [
            (f"rpm:key:{p.name}", p.requests_per_minute, 1.0, False),
            (f"tpm:key:{p.name}", p.tokens_per_minute, reserve, True),
            (f"rpm:model:{route.name}", model.get("requests_per_minute", 0), 1.0, False),
            (f"tpm:model:{route.name}", model.get("tokens_per_minute", 0), reserve, True),
        ]
        active = [(k, float(n), n / 60.0, float(min(c, n)), t) for k, n, c, t in checks if n]
        # All buckets of one admission in one step: one Redis round trip, and nothing is
        # taken from any bucket unless every bucket has room.
        takes = (
            await self.buckets.take_all([(k, n, ps, c) for k, n, ps, c, _ in active])
            if active
            else []
        )
        for (key, per_minute, per_s, cost, tokens), take in zip(active, takes, strict=True):
            if key.startswith("rpm:key:") or not headers:
                headers.update(_headers(int(per_minute), take))
            if not take.allowed:
                self.rejections += 1
                raise RateLimited(
                    f"rate limit of {int(per_minute)} {'tokens' if tokens else 'requests'} per "
                    f"minute reached for {'key ' + p.name if ':key:' in key else 'model ' + route.name}",
                    retry_after=take.retry_after,
                    headers=headers,
                )
            if tokens:
                permit._reserved.append((key, per_minute, per_s, cost))
        for name, size in (
            (f"key:{p.name}", p.max_concurrent),
            (f"backend:{route.backend_name}", backend_slots),
        ):
            if not size:
                continue
            slot = self._slot(name, size)
            try:
                async with asyncio.timeout(self.limits.queue_timeout_s):
                    await slot.acquire()
            except TimeoutError:
                permit.settle(Usage())
                permit.release()
                what = name.replace(":", " ", 1)
                raise Overloaded(
                    f"{what} already has {size} requests running", retry_after=1
                ) from None
            permit._slots.append(slot)
        return permit


_FREE = Permit()


def _headers(limit: int, take: Take) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(max(0, math.floor(take.remaining))),
        "X-RateLimit-Reset": str(math.ceil(take.reset)),
    }


def _buckets_for(state: Any) -> BucketStore:
    make = getattr(state, "buckets", None)
    return make() if callable(make) else MemoryBuckets()
