"""The state store: what must outlive a request (default model, runtime routes, usage).

`MemoryState` keeps it in this process. A Redis-backed store with the same
methods lets several workers and replicas share it and keeps it across restarts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from stella.cost import nanos, usd
from stella.errors import Conflict, ModelNotFound

# Days of usage counters a process keeps in memory (Redis keeps them all: it is the
# store of record); a long-running process would otherwise grow a little every day.
USAGE_DAYS = 31


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored route whose bytes are not JSON (written by hand, or by another program):
    listed under its name with the decoder's reason, for the reader to skip alone."""

    reason: str
    # The name as stored is not UTF-8: shown with its bytes escaped, a name no request
    # can give back, so only Redis itself (HDEL) can remove the entry.
    escaped: bool = False


# The routing version: the last change's epoch and a count of changes. The count alone
# starts over in a Redis that restarted empty, was flushed or was restored from an
# older snapshot, and could come back to the number a replica last read: the epoch,
# drawn anew by every change, never does.
RoutingVersion = tuple[str, int]


class StoredKeys(NamedTuple):
    """The keys a store holds, as one read."""

    # Runtime keys by name, each as KeySettings reads it (or an Unreadable).
    keys: dict[str, Any]
    # Revocations: the SHA-256 digest revoked (the key itself, whatever it is named
    # now) -> the name it was revoked under, for the listing and the logs. Only those of
    # the digests the read asked for and of the stored entries' secrets: a revocation
    # of any other digest refuses nothing anyone holds (see StateStore.load_keys).
    revoked: dict[str, str]
    # The store's version of them when read: a change planned on this read is written
    # only while the store still holds it (see StateStore.change_keys).
    version: Hashable
    # When each was made (runtime key name -> UTC ISO 8601) and revoked (digest -> UTC
    # ISO 8601): for the listing. An entry a version before these were kept wrote has
    # none (unknown).
    created: dict[str, str]
    revoked_at: dict[str, str]
    # How many changes the store had counted (its version's count): one lower than a
    # read before says the store went back (restarted empty, restored from a snapshot).
    changes: int


def entry_digests(keys: dict[str, Any]) -> set[str]:
    """The secrets' digests the stored entries name (a key's and a rotation's old one),
    an entry no replica of this version reads included: the revocations a read of the
    keys needs besides the configured keys'."""
    out = set()
    for spec in keys.values():
        if isinstance(spec, dict):
            for field in ("sha256", "previous"):
                digest = spec.get(field)
                # 64 characters: anything else is no digest any replica takes.
                if isinstance(digest, str) and len(digest) == 64:
                    out.add(digest)
    return out


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A key change as a store writes it: digests revoked (digest -> the name revoked
    under), stored entries removed (by name), when (UTC ISO 8601; "" unknown), stored
    entries replaced (name -> spec: an update, a rotation), their time of making kept,
    limit buckets cleared with it (a purge's: the limiter's bucket names, which a
    store that keeps buckets drops; see Admission.key_buckets), and digests whose
    revocation goes (a purge's: of the secrets of the entry it removes, see
    key_plans.purge)."""

    revoke: dict[str, str]
    remove: tuple[str, ...] = ()
    at: str = ""
    put: dict[str, dict[str, Any]] = field(default_factory=dict)
    forget: tuple[str, ...] = ()
    unrevoke: tuple[str, ...] = ()


class StateStore(Protocol):
    """What every state store offers (MemoryState, state_redis.RedisState)."""

    kind: str

    async def start(self) -> None:
        """Connect."""
        ...

    async def aclose(self) -> None:
        """Disconnect."""
        ...

    async def ping(self) -> bool:
        """Whether the store is reachable."""
        ...

    def wall(self) -> float:
        """Now, in seconds since the epoch, on the store's clock."""
        ...

    async def get_default_model(self) -> str | None:
        """The default model set at runtime, if any."""
        ...

    async def set_default_model(self, name: str, runtime: bool = False) -> None:
        """Persist the runtime default model."""
        ...

    async def load_routes(self) -> dict[str, Any]:
        """Runtime-registered routes by name."""
        ...

    async def save_route(self, name: str, spec: dict[str, Any]) -> bool:
        """Persist a runtime route; whether it replaced one stored under its name."""
        ...

    async def delete_route(self, name: str) -> None:
        """Forget a runtime route."""
        ...

    async def load_keys(self, digests: Collection[str] = ()) -> StoredKeys:
        """The runtime keys by name, the revocations of their secrets and of `digests`
        (the configured keys'), and their version, as one read; Unavailable when
        unreadable. The revocations are looked up, not read whole: their number does
        not make the read slower."""
        ...

    async def save_key(self, name: str, spec: dict[str, Any], created_at: str) -> None:
        """Persist a runtime key (`spec` as KeySettings reads it) made at `created_at`
        (UTC ISO 8601); Conflict when the name is taken."""
        ...

    async def change_keys(self, change: KeyChange, seen: Hashable) -> bool:
        """Write `change` if the keys are still as read at version `seen` (see
        StoredKeys), as one step; False, writing nothing, when they changed meanwhile."""
        ...

    def record_usage(self, key: str, model: str, day: str, record: dict[str, Any]) -> None:
        """Count one inference for a key, a model and a day."""
        ...

    async def get_usage(self, day: str | None = None) -> list[dict[str, Any]]:
        """Usage rows, optionally for one day (YYYY-MM-DD)."""
        ...


@runtime_checkable
class SharedState(StateStore, Protocol):
    """A store several replicas share: each follows the routing changes the others make."""

    async def routing_version(self) -> RoutingVersion | None:
        """The routing version alone (a cheap poll); None when it can't be read."""
        ...

    async def routing(self) -> tuple[RoutingVersion, dict[str, Any], str | None] | None:
        """(version, runtime routes, default model) as one read; None when unreadable."""
        ...


class MemoryState:
    """State in this process only; lost on restart."""

    kind = "memory"
    _day = ""

    def __init__(self) -> None:
        self.default_model: str | None = None
        self.routes: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, Any] = {}
        self.revoked: dict[str, str] = {}  # digest -> the name it was revoked under
        self.created: dict[str, str] = {}  # runtime key name -> when it was made
        self.revoked_at: dict[str, str] = {}  # digest -> when it was revoked
        self.keys_version = 0  # moved by every key change (see change_keys)
        self.usage: dict[tuple[str, str, str], dict[str, int]] = defaultdict(
            lambda: {
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "errors": 0,
                "cost_nanos": 0,
            }
        )

    async def start(self) -> None:
        """Connect (nothing to do in memory)."""

    async def aclose(self) -> None:
        """Disconnect."""

    async def ping(self) -> bool:
        """Whether the store is reachable."""
        return True

    def wall(self) -> float:
        """Now, in seconds since the epoch, on the store's clock (this process's)."""
        return time.time()

    async def get_default_model(self) -> str | None:
        """The default model set at runtime, if any."""
        return self.default_model

    async def set_default_model(self, name: str, runtime: bool = False) -> None:
        """Persist the runtime default model; a `runtime` route must be stored still."""
        if runtime and name not in self.routes:
            raise ModelNotFound(removed_meanwhile(name))
        self.default_model = name

    async def load_routes(self) -> dict[str, dict[str, Any]]:
        """Runtime-registered routes by name."""
        return dict(self.routes)

    async def save_route(self, name: str, spec: dict[str, Any]) -> bool:
        """Persist a runtime route, unless another one answers to its name or an alias;
        whether it replaced one stored under its name."""
        for other, held in self.routes.items():
            if other != name:
                for candidate in (name, *spec.get("aliases", ())):
                    if candidate == other or candidate in held.get("aliases", ()):
                        raise Conflict(taken(candidate, other))
        replaced = name in self.routes
        self.routes[name] = spec
        return replaced

    async def delete_route(self, name: str) -> None:
        """Forget a runtime route, unless it is the default."""
        if name == self.default_model:
            raise Conflict(is_default(name))
        self.routes.pop(name, None)

    async def load_keys(self, digests: Collection[str] = ()) -> StoredKeys:
        """The runtime keys by name, the revocations of their secrets and of `digests`,
        and their version."""
        # As Redis answers it (RedisState.load_keys): the revocations looked up.
        wanted = entry_digests(self.keys).union(digests)
        revoked = {d: self.revoked[d] for d in wanted if d in self.revoked}
        return StoredKeys(
            dict(self.keys),
            revoked,
            self.keys_version,
            dict(self.created),
            {d: self.revoked_at[d] for d in revoked if d in self.revoked_at},
            self.keys_version,
        )

    async def save_key(self, name: str, spec: dict[str, Any], created_at: str) -> None:
        """Persist a runtime key made at `created_at`; Conflict when the name is taken."""
        if name in self.keys:
            raise Conflict(key_taken(name))
        self.keys[name] = spec
        self.created[name] = created_at
        self.keys_version += 1

    async def change_keys(self, change: KeyChange, seen: Hashable) -> bool:
        """Write `change` if the keys are still at version `seen`; whether it was."""
        if seen != self.keys_version:
            return False
        self.revoked.update(change.revoke)
        if change.at:
            self.revoked_at.update(dict.fromkeys(change.revoke, change.at))
        for digest in change.unrevoke:
            self.revoked.pop(digest, None)
            self.revoked_at.pop(digest, None)
        for name in change.remove:
            self.keys.pop(name, None)
            self.created.pop(name, None)
        self.keys.update(change.put)
        self.keys_version += 1
        return True

    def record_usage(self, key: str, model: str, day: str, record: dict[str, Any]) -> None:
        """Count one inference for a key, a model and a day."""
        if day != self._day:  # a new day: the oldest one goes
            self._day = day
            kept = sorted({d for _, _, d in self.usage} | {day})[-USAGE_DAYS:]
            for k in [k for k in self.usage if k[2] not in kept]:
                del self.usage[k]
        count_usage(self.usage[(key, model, day)], record)

    async def get_usage(self, day: str | None = None) -> list[dict[str, Any]]:
        """Usage rows, optionally for one day (YYYY-MM-DD)."""
        return [
            usage_row(k, m, d, row)
            for (k, m, d), row in sorted(self.usage.items())
            if day is None or d == day
        ]


def count_usage(counts: dict[str, int], record: dict[str, Any]) -> None:
    """Add one inference's `record` (its log event) to a usage row's counters: the cost
    in whole nano-dollars, as Redis's HINCRBY takes it and totals add up exactly."""
    counts["requests"] += 1
    counts["prompt_tokens"] += record.get("prompt_tokens") or 0
    counts["completion_tokens"] += record.get("completion_tokens") or 0
    counts["errors"] += 1 if record.get("status", 200) >= 500 else 0
    if (cost := record.get("cost_usd")) is not None:  # an unpriced call has none
        counts["cost_nanos"] += nanos(cost)


def usage_row(key: str, model: str, day: str, counts: dict[str, int]) -> dict[str, Any]:
    """A row of the usage report from a store's counters (a counter missing reads 0: a
    row counted before stella priced calls has no cost, which is 0 USD). The cost is
    counted in nano-dollars (whole numbers add up exactly), shown in USD (`cost_nanos`
    kept, for totals summed exactly)."""
    return {
        "key": key,
        "model": model,
        "day": day,
        "requests": counts.get("requests", 0),
        "prompt_tokens": counts.get("prompt_tokens", 0),
        "completion_tokens": counts.get("completion_tokens", 0),
        "errors": counts.get("errors", 0),
        "cost_usd": usd(counts.get("cost_nanos", 0)),
        "cost_nanos": counts.get("cost_nanos", 0),
    }


# The routing changes a store refuses, said as the router says them (stella.routing), so
# that a conflict found in the store reads as one found in this process.
def taken(candidate: str, owner: str) -> str:
    """Why a route can't answer to `candidate`: route `owner` does."""
    what = "the name of another route" if candidate == owner else f"an alias of {owner!r}"
    return f"{candidate!r} is already {what}"


def is_default(name: str) -> str:
    """Why route `name` can't be removed: it is the default."""
    return f"model {name!r} is the default model; it can't be removed"


def removed_meanwhile(name: str) -> str:
    """Why route `name` can't become the default: it was removed."""
    return f"model {name!r} not found (removed meanwhile)"


def key_taken(name: str) -> str:
    """Why a runtime key can't be named `name`: a key has that name."""
    return f"a key named {name!r} exists already (a revoked one keeps its name)"


def utc_stamp(seconds: float) -> str:
    """A time (seconds since the epoch) as UTC ISO 8601, to the second: when a key was
    made or revoked."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def key_configured(name: str, where: str) -> str:
    """Why key `name` can't be changed through the API: the configuration defines it."""
    return (
        f"key {name!r} is defined in the configuration ({where}): change it there and "
        "restart; only a runtime key (POST /api/v1/keys) changes at runtime"
    )


def key_not_found(name: str) -> str:
    """Why key `name` can't be revoked: no key has that name."""
    return f"no key named {name!r}"


def key_revoked(name: str) -> str:
    """Why key `name` can't be revoked: it is already."""
    return f"key {name!r} is revoked already"


def last_admin(name: str, change: str = "revoked") -> str:
    """Why admin key `name` can't be revoked (or lose admin, or get an expiry): no other
    admin key that does not expire would be left."""
    return (
        f"key {name!r} is the last admin key (not revoked, with no expiry): {change}, "
        "nothing could manage keys or routes once it is gone until a new admin key is "
        "configured and every replica restarted; create another admin key first"
    )
