"""The model table: names and aliases to routes, balanced backends, fallbacks, circuit
breakers."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import structlog

from stella.backends import Backend, ConfigError
from stella.cost import Rates, rates
from stella.errors import Conflict, Forbidden, InvalidRequest, ModelNotFound, StellaError
from stella.settings import RouteSettings, Settings, serves
from stella.state import is_default, taken

# A model name no route claims that stands for the default model as it is now (after a
# switch too); a route or alias named so in the configuration keeps it.
DEFAULT_NAME = "default"

_log = structlog.get_logger("stella")


class CircuitBreaker:
    """Opens after N consecutive failures; after a cool-down lets one probe through.

    Each change of state is logged once (`circuit_opened`, `circuit_half_open`,
    `circuit_closed`): a call that finds the state as it was logs nothing.
    """

    __slots__ = ("cooldown_s", "failures", "name", "opened_at", "probing", "state", "threshold")

    def __init__(self, threshold: int, cooldown_s: float, name: str = "") -> None:
        self.name = name  # the backend's, for the log
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False

    def allow(self) -> bool:
        """Whether a request may go to this backend now (claims the probe when half-open)."""
        if self.state == "closed":
            return True
        if self.state == "open" and self._cooled():
            self.state = "half_open"
            self.probing = False
            _log.info("circuit_half_open", backend=self.name, failures=self.failures)
        if self.state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def available(self) -> bool:
        """Whether `allow()` could say yes now, without claiming anything."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return self._cooled()
        return not self.probing

    def _cooled(self) -> bool:
        # Read only once a circuit is open: a closed one (the usual case) answers first.
        return time.monotonic() - self.opened_at >= self.cooldown_s

    def success(self) -> None:
        """The backend answered: close the circuit."""
        if self.state != "closed":
            self.state = "closed"
            _log.info("circuit_closed", backend=self.name, failures=self.failures)
        self.failures = 0
        self.probing = False

    def failure(self, error: str = "") -> None:
        """The backend failed in a way that says it is unhealthy (`error`: its code)."""
        self.failures += 1
        self.probing = False
        was = self.state
        if was == "half_open" or (self.threshold and self.failures >= self.threshold):
            self.state = "open"
            self.opened_at = time.monotonic()
            if was != "open":  # a call that failed after it opened keeps it open: no news
                _log.warning(
                    "circuit_opened",
                    backend=self.name,
                    failures=self.failures,
                    cooldown_s=self.cooldown_s,
                    error=error,
                    probe_failed=was == "half_open",
                )

    def release(self) -> None:
        """A probe ended without a verdict (client left): let another probe go."""
        self.probing = False

    def now(self) -> str:
        """The state as of now, without claiming anything: an open circuit whose cool-down
        has passed reads half_open (it lets the next request through as its probe)."""
        if self.state == "open" and self._cooled():
            return "half_open"
        return self.state

    def retry_after(self) -> float:
        """Seconds until a probe may go."""
        return max(0.0, self.cooldown_s - (time.monotonic() - self.opened_at))


# A key's scope as a test of a model name (Principal.may_use).
Allowed = Callable[[str], bool]


@dataclass(slots=True)
class Route:
    """A routable model name bound to a backend and an upstream model."""

    name: str
    backend_name: str
    backend: Backend
    upstream_model: str
    settings: RouteSettings
    aliases: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    runtime: bool = False
    # A balanced route (`balance`): one Route per backend serving it, the route's own
    # first, each with the route's name and settings; the same tuple in every one of them.
    pool: tuple[Route, ...] = ()
    # The pool member a tie goes to next: only pool[0]'s counts (see Router.pick and
    # took); the others' stays 0. Light traffic spreads too.
    turn: int = 0
    # Its price, per token (None: unpriced); every backend of a balanced route has the
    # route's: the price is the deployment's, as its limits are.
    price: Rates | None = None
    # The backends the route names (`backend`, then `balance`) that this process lacks
    # (disabled here; for a stored route, also not configured here): served without them.
    left_out: tuple[str, ...] = ()

    def member(self, backend: str) -> Route:
        """The member of this balanced route's pool on `backend` (this one when none is)."""
        return next((m for m in self.pool if m.backend_name == backend), self)


def _disabled(event: str, route: str, field: str, backend: str, what: str) -> None:
    """Say once, as the router is built (so `stella config --check` shows it too), that
    `field` of configured `route` names a disabled backend: not found out under load."""
    _log.warning(
        event,
        key=f"models.routes.{route}.{field}",
        route=route,
        backend=backend,
        detail=f"backends.{backend}.enabled = false: the route {what}",
    )


class Router:
    """Resolves model names; owns the routes, the default and the breakers."""

    def __init__(self, settings: Settings, backends: dict[str, Backend]) -> None:
        self.settings = settings
        self.backends = backends
        self.configured_default = settings.models.default
        self.default = settings.models.default
        self.local_changes = 0  # routing writes this process made (see app._follow_routing)
        # The stored runtime routes this process does not serve, by name, with why (as of
        # the last read of the store: see apply_stored): the model list shows them.
        self.skipped: dict[str, str] = {}
        self.routes: dict[str, Route] = {}
        # The names calls are counted under (metrics label only these): every route's,
        # and a removed route's while a call admitted on it runs (see sweep).
        self.counted: set[str] = set()
        # The route names calls are on now, admitted or waiting to be: the pipeline's,
        # asked only when a removed route's name may go.
        self.in_use: Callable[[], Collection[str]] = frozenset
        # Told of the names that go (a removed route's, no call on it left): each drops
        # what it holds by them (metrics: their series).
        self.on_forget: list[Callable[[set[str]], None]] = []
        # Of the names that may go, those whose last values nobody has seen yet (metrics:
        # counted since the last scrape): they stay until a sweep when all were seen.
        self.unseen: Callable[[set[str]], Collection[str]] = lambda names: ()
        self._names: dict[str, str] = {}
        # Calls in flight from this process on each backend of a balanced route (counted
        # by the pipeline's inferences, see Inference.busy_on): what `pick` weighs.
        self.busy: dict[str, int] = {}
        b = settings.breaker
        self.breakers = {
            name: CircuitBreaker(b.failure_threshold, b.cooldown_s, name) for name in backends
        }
        for name, rs in settings.models.routes.items():
            if not serves(rs, backends):
                # Left out, and said so (its balance, all disabled too, goes with it).
                _disabled("route_backend_disabled", name, "backend", rs.backend, "is left out")
                continue
            taken = self._taken(name, rs)
            if taken:
                raise ConfigError(f"models.routes.{name}: {taken}")
            self._add(name, rs, runtime=False)
            # Served on fewer backends than the file lists: its own one disabled too, the
            # others serve it (they serve the same upstream model), said so as for any.
            if rs.backend not in backends:
                what = "is served by its balance without it"
                _disabled("route_backend_disabled", name, "backend", rs.backend, what)
            for i, other in enumerate(rs.balance):
                if other not in backends:
                    what = "is served without it"
                    _disabled("balance_backend_disabled", name, f"balance[{i}]", other, what)

    def _taken(self, name: str, rs: RouteSettings) -> str:
        """Why `name` or one of its aliases can't be added ("" when they all can)."""
        for candidate in (name, *rs.aliases):
            owner = self._names.get(candidate)
            if owner is not None and owner != name:
                return taken(candidate, owner)
        return ""

    def _add(self, name: str, rs: RouteSettings, *, runtime: bool) -> Route:
        # A backend that is disabled (or, for a stored route, unknown here) is left out,
        # the route's own too: the first of the others it names then serves it first. The
        # caller makes sure one of them is here (see `serves`).
        named = list(dict.fromkeys((rs.backend, *rs.balance)))
        left_out = tuple(b for b in named if b not in self.backends)
        served = [b for b in named if b in self.backends]
        # One price for the pool: a plan's cache (limits) knows a replaced route by it.
        price = rates(rs.price)
        route, *others = (self._member(name, rs, b, runtime, left_out, price) for b in served)
        if others:
            pool = (route, *others)
            for member in pool:
                member.pool = pool
                self.busy.setdefault(member.backend_name, 0)
        self.routes[name] = route
        self.counted.add(name)
        self._names[name] = name
        for alias in rs.aliases:
            self._names.setdefault(alias, name)
        return route

    def _member(
        self,
        name: str,
        rs: RouteSettings,
        backend: str,
        runtime: bool,
        left_out: tuple[str, ...],
        price: Rates | None,
    ) -> Route:
        """Route `name` as served by `backend` (its own, or one it balances over)."""
        return Route(
            name=name,
            backend_name=backend,
            backend=self.backends[backend],
            upstream_model=rs.upstream_model or name,
            settings=rs,
            aliases=list(rs.aliases),
            fallbacks=list(rs.fallbacks),
            runtime=runtime,
            price=price,
            left_out=left_out,
        )

    def pick(
        self,
        route: Route,
        usable: Callable[[Route], bool] | None = None,
        free: Callable[[str], bool] | None = None,
    ) -> Route:
        """The member of balanced `route`'s pool a call goes to: of those whose circuit lets
        a call go, the one with the fewest calls in flight (a tie: the next in turn), one
        that is `usable` (e.g. reads the call's images) before one that is not, and one
        whose backend has a slot `free` now (limits.backends) before one whose calls
        queue. All circuits open: the route's own member (the caller says so, as for any
        route). The turn moves only when the call goes there (`took`)."""
        pool = route.pool
        first = pool[0]
        n = len(pool)
        turn = first.turn
        busy = self.busy
        breakers = self.breakers
        best = first
        least = -1
        for i in range(n):
            member = pool[(turn + i) % n]
            if not breakers[member.backend_name].available():
                continue
            load = busy[member.backend_name]
            if usable is not None and not usable(member):
                load += 1 << 30  # any usable member first, however busy
            if free is not None and not free(member.backend_name):
                load += 1 << 20  # then one that takes the call now, not after a wait
            if least < 0 or load < least:
                best, least = member, load
        return best

    def took(self, member: Route) -> None:
        """A call picked for balanced `member` goes there: a tie goes next to the one
        after it. Not moved by calls that never reach a backend (refused before it, a
        model check), nor by a fallback's place in a chain that is never tried."""
        pool = member.pool
        at = pool.index(member) + 1
        pool[0].turn = at if at < len(pool) else 0

    def knows(self, name: str) -> bool:
        """Whether `name` is a route's name or alias (or `default`)."""
        return self.target(name) is not None

    def target(self, name: str) -> str | None:
        """The route name `name` stands for (its own, an alias's route, `default`'s), if any."""
        target = self._names.get(name)
        if target is None and name == DEFAULT_NAME:
            target = self._names.get(self.default)
        return target

    def configured(self, name: str) -> bool:
        """Whether `name` (a name, an alias or `default`) stands for a configured route."""
        target = self.target(name)
        return target is not None and not self.routes[target].runtime

    def resolve(self, model: str | None, allowed: Allowed | None = None) -> Route:
        """The route for a requested model name (None: the default). `allowed` (a key's
        scope) narrows the known models a 404 lists and the routes a direct name finds."""
        name = model or self.default
        target = self.target(name)
        if target is not None:
            return self.routes[target]
        if self.settings.models.allow_direct and "/" in name:
            provider, _, upstream = name.partition("/")
            if provider in self.backends and upstream:
                return self.direct(provider, upstream, allowed)
        known = ", ".join(n for n in sorted(self.routes) if allowed is None or allowed(n))
        raise ModelNotFound(f"model {name!r} not found; known models: {known}")

    def direct(
        self, backend: str, upstream_model: str | None, allowed: Allowed | None = None
    ) -> Route:
        """The route (configured or runtime) serving `backend`'s `upstream_model`, one the
        key may use (None: the default model's upstream model), else a one-off route to
        that backend (never to a host from a request)."""
        if backend not in self.backends:
            raise ModelNotFound(f"backend {backend!r} not found; known: {sorted(self.backends)}")
        upstream = upstream_model or self.resolve(None).upstream_model
        # A configured route by another name: its limits, time limits and fallbacks
        # hold, whichever name the client used (one the key may use, if several).
        # A balanced route's member on that backend: the call starts there.
        matches = [
            r
            for route in self.routes.values()
            for r in (route.pool or (route,))
            if r.backend_name == backend and r.upstream_model == upstream
        ]
        for route in matches:
            if allowed is None or allowed(route.name):
                return route
        if matches:  # only routes this key may not use: no way around their limits
            raise Forbidden(f"this key may not use model {f'{backend}/{upstream}'!r}")
        return Route(
            name=f"{backend}/{upstream}",
            backend_name=backend,
            backend=self.backends[backend],
            upstream_model=upstream,
            settings=RouteSettings(backend=backend),
        )

    def chain(
        self,
        route: Route,
        pick: bool = False,
        usable: Callable[[Route], bool] | None = None,
    ) -> list[Route]:
        """The route (a balanced route's member) followed by its pool's other members, then
        by its fallbacks, each once: a balanced fallback as its members, as the route asked
        itself would be (its own first, or with `pick` the one `pick` chooses now, a
        `usable` one first: e.g. one that reads a call's images; the turn moves only if
        tried), then the others in turn from it."""
        if not route.fallbacks and not route.pool:
            return [route]
        out = self.members(route)
        seen = {route.name}
        for name in route.fallbacks:
            target = self._names.get(name)
            if target and target not in seen:
                seen.add(target)
                fallback = self.routes[target]
                if not fallback.pool:
                    out.append(fallback)
                else:
                    # One backend of it down must not fail the call while the others,
                    # serving the same model, stand idle.
                    out += self.members(self.pick(fallback, usable) if pick else fallback)
        return out

    def members(self, route: Route) -> list[Route]:
        """`route` (a balanced route's member) followed by its pool's other members, in
        turn from the one after it: the backends serving the route's own model."""
        pool = route.pool
        if not pool:
            return [route]
        at = pool.index(route)
        return [route, *pool[at + 1 :], *pool[:at]]

    def capabilities(self, route: Route, allowed: Allowed | None = None) -> list[str]:
        """What a model list says `route`'s model can do: its backend's, with `images` where
        a fallback the key may use (`allowed`) reads them, as a user's images go there (a
        balanced fallback: any of its backends, each in the chain)."""
        backend = route.backend
        reads = backend.reads_images or any(
            r.backend.reads_images
            for r in self.chain(route)[1:]
            if allowed is None or allowed(r.name)
        )
        return backend.listed_capabilities(route.upstream_model, reads)

    def circuit(self, route: Route) -> str:
        """The state of `route`'s circuit as of now: a balanced route's, the most open to
        calls of its backends' (it serves while one of them does)."""
        if not route.pool:
            return self.breakers[route.backend_name].now()
        states = {self.breakers[r.backend_name].now() for r in route.pool}
        return next(s for s in ("closed", "half_open", "open") if s in states)

    def breaker(self, backend_name: str) -> CircuitBreaker:
        """The circuit breaker of a backend."""
        return self.breakers[backend_name]

    def sweep(self) -> None:
        """Forget the names of removed routes no call is on any more and whose last values
        were seen (see `unseen`): what is kept by them goes (their metric series), and a
        route of that name added later starts afresh. A call still running on one keeps
        its name until a sweep after it ended; one counted since the last scrape, until the
        next scrape. Runs on the event loop, at a routing change and a scrape, never per
        call."""
        if len(self.counted) == len(self.routes):
            return  # no route removed since the last sweep: every counted name is a route's
        gone = self.counted.difference(self.routes).difference(self.in_use())
        if gone:
            gone.difference_update(self.unseen(gone))
        if not gone:
            return
        self.counted -= gone
        for forget in self.on_forget:
            forget(gone)

    def snapshot(self) -> tuple[dict[str, Route], dict[str, str], str]:
        """The routing table as it is now, for `restore` (a change the store refused)."""
        return dict(self.routes), dict(self._names), self.default

    def restore(self, snap: tuple[dict[str, Route], dict[str, str], str]) -> None:
        """Put back a table taken by `snapshot`."""
        self.routes, self._names, self.default = dict(snap[0]), dict(snap[1]), snap[2]

    def set_default(self, name: str) -> str:
        """Make a route, configured or runtime (by its name or an alias), the default;
        returns the route name. A direct `backend/model` name that no route serves is
        refused: a one-off route cannot be the default."""
        if not name:
            raise ModelNotFound("no model named")
        route = self.resolve(name)
        if route.name not in self.routes:
            raise ModelNotFound(f"model {name!r} is not a route")
        self.default = route.name
        return route.name

    def register(self, name: str, rs: RouteSettings, *, check_fallbacks: bool = True) -> Route:
        """Add or replace a runtime route; `check_fallbacks`: refuse a backend or a fallback
        not known (a route the store holds already is taken as it is: an unknown fallback
        is skipped, a backend unknown here left out while another it names is here)."""
        if rs.backend not in self.backends and (check_fallbacks or not serves(rs, self.backends)):
            why = self._no_backend(rs.backend)
            raise InvalidRequest(f"$.backend: {why}", param="backend")
        existing = self.routes.get(name)
        if existing is not None and not existing.runtime:
            raise Conflict(f"model {name!r} is configured in the config file; it can't be replaced")
        for i, other in enumerate(rs.balance if check_fallbacks else ()):
            # A stored route takes what this process has (see _add); a new one is refused.
            if other not in self.backends:
                why = self._no_backend(other)
                raise InvalidRequest(f"$.balance[{i}]: {why}", param=f"balance[{i}]")
            if other == rs.backend:
                raise InvalidRequest(
                    f"$.balance[{i}]: {other!r} is the route's own backend", param=f"balance[{i}]"
                )
        for i, fb in enumerate(rs.fallbacks if check_fallbacks else ()):
            if fb not in self._names:
                raise InvalidRequest(
                    f"$.fallbacks[{i}]: unknown route {fb!r}", param=f"fallbacks[{i}]"
                )
        # A name or alias that another route answers to stays that route's.
        taken = self._taken(name, rs)
        if taken:
            raise Conflict(taken)
        if existing is not None:  # replaced: its old aliases go with it
            self._names = {k: v for k, v in self._names.items() if v != name}
        return self._add(name, rs, runtime=True)

    def _no_backend(self, name: str) -> str:
        """Why `name`, not in the table, is no backend a route may use."""
        if name in self.settings.backends:
            # Left out of the table, yet named in the file: "unknown" would mislead.
            return f"backend {name!r} is configured but disabled (backends.{name}.enabled = false)"
        return f"unknown backend {name!r}; known: {sorted(self.backends)}"

    def apply_stored(
        self,
        specs: dict[str, RouteSettings],
        default: str | None,
        unreadable: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Make the runtime routes and the default those the state store holds, whatever
        order they come in (`unreadable`: the stored routes no spec could be read from,
        with why); returns why each one that could not be applied was left out. A route
        served here without a backend it names (unknown or disabled here) is applied, and
        each such backend warned of (`stored_route_backend_missing`), once for this read."""
        # Before: a route removed earlier and stored again now starts afresh (once a scrape
        # showed its last counts; until then it counts on); after: the routes this read
        # removes go, unless a call is on them or calls counted on them are not seen yet.
        self.sweep()
        snap = self.snapshot()
        skipped = dict(self.skipped)
        try:
            why = self._apply_stored(specs, default, unreadable or {})
        except BaseException:
            self.restore(snap)
            self.skipped = skipped
            raise
        self.sweep()
        return why

    def _apply_stored(
        self, specs: dict[str, RouteSettings], default: str | None, unreadable: Mapping[str, str]
    ) -> list[str]:
        # Built again from the configured routes: every replica, whatever it held before
        # and in whatever order the store lists them, ends with the same table.
        self.routes = {n: r for n, r in self.routes.items() if not r.runtime}
        self._names = {}
        for name, route in self.routes.items():
            self._names[name] = name
            for alias in route.aliases:
                self._names.setdefault(alias, name)
        self.skipped = dict(unreadable)
        # All routes first, fallbacks unchecked: two routes may fall back to each other.
        # Sorted: should the store hold two routes claiming one alias (written before it
        # refused that), every replica keeps the same one.
        for name in sorted(specs):
            try:
                route = self.register(name, specs[name], check_fallbacks=False)
            except StellaError as exc:
                self.skipped[name] = exc.message
                continue
            if route.left_out:
                self._served_without(name, specs[name])
        skipped = [f"route {name!r}: {why}" for name, why in sorted(self.skipped.items())]
        # No default in the store (never switched, or a Redis restarted empty): the
        # configured one, as a replica starting now would have it.
        target = default or self.configured_default or self.default
        try:
            self.set_default(target)
        except StellaError as exc:
            # A default naming a route the store no longer holds (written before the store
            # refused that): the configured one, as on a replica starting now. What the
            # replica served before must not decide, or replicas would differ for good.
            skipped.append(f"default {target!r}: {exc.message}")
            self.set_default(self.configured_default)
        return skipped

    def _served_without(self, name: str, rs: RouteSettings) -> None:
        """Say that stored route `name`, made on a replica whose backends differ, is served
        here without some it names: once per read of the store, not per call."""
        named = [("backend", rs.backend)]
        named += [(f"balance[{i}]", b) for i, b in enumerate(rs.balance) if b != rs.backend]
        for where, backend in named:
            if backend not in self.backends:
                _log.warning(
                    "stored_route_backend_missing",
                    route=name,
                    field=where,
                    backend=backend,
                    detail=f"{self._no_backend(backend)}: the route is served here without it",
                )

    def remove(self, name: str) -> str:
        """Remove a runtime route (by its name or an alias) and return its name; the
        configured ones and the default are protected."""
        # `default`, unless a route claims the name, is the default model as it is now.
        target = self.target(name)
        if target is None:
            raise ModelNotFound(f"model {name!r} not found")
        route = self.routes[target]
        if route.name == self.default:
            raise Conflict(is_default(route.name))
        if route.name == self._names.get(self.configured_default, self.configured_default):
            # Still protected after a switch: a restart (or an emptied Redis) goes back to it.
            raise Conflict(
                f"model {route.name!r} is the configured default (models.default); "
                "it can't be removed"
            )
        if not route.runtime:
            raise Conflict(f"model {route.name!r} comes from the config file; it can't be removed")
        del self.routes[route.name]
        self._names = {k: v for k, v in self._names.items() if v != route.name}
        return route.name
