"""create_app(): the Starlette app, its routes, middleware and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Match, Route
from starlette.routing import Router as StarletteRouter
from starlette.types import Receive, Scope, Send

from stella import __version__, gc_freeze, logs
from stella.api import native, ops
from stella.api.admin import usage_listener
from stella.api.http import (
    CLOSE,
    NATIVE,
    NO_STORE,
    READS,
    Dialect,
    DialectPick,
    Endpoint,
    body_over_limit,
    shown_cut,
    with_header,
)
from stella.auth import Authenticator
from stella.backends import Backend, ConfigError, build_backend, registry
from stella.calls import request_id_for
from stella.core import Admission, Pipeline
from stella.errors import MethodNotAllowed, NotFound, ShuttingDown, StellaError
from stella.routing import Router
from stella.settings import (
    RouteSettings,
    Settings,
    blamed,
    enabled_backends,
    load_settings,
    secret_values,
)
from stella.shutdown import chain_signals
from stella.state import (
    MemoryState,
    RoutingVersion,
    SharedState,
    StateStore,
    StoredKeys,
    Unreadable,
)
from stella.streaming import Drain

# Dialect modules beyond the native API; each exposes `routes` (and may be absent).
DIALECTS = (
    "stella.api.openai",
    "stella.api.responses",
    "stella.api.ollama",
    "stella.api.embed",
    "stella.api.anthropic",
    "stella.api.aliases",
    "stella.api.admin",
    "stella.api.keys",
    "stella.api.key_lifecycle",
)
_log = structlog.get_logger("stella")


class Services:
    """Everything a route needs, built once per app: no hidden globals."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        kinds = registry()
        self.backends: dict[str, Backend] = {
            name: build_backend(name, table, kinds)
            for name, table in enabled_backends(settings).items()
        }
        self.router = Router(settings, self.backends)
        self.auth = Authenticator(settings)
        self.state: StateStore = make_state(settings)
        # Expiries are on the store's clock, as every replica reads them.
        self.auth.wall = self.state.wall
        self.admission: Admission = make_admission(settings, self.state)
        self.pipeline = Pipeline(
            self.router, logs.emitter(), admission=self.admission, log_content=settings.log.content
        )
        self.drain = Drain(settings.server.drain_timeout_s)
        self.pipeline.drain = self.drain
        # The backends' health as /v1/health last probed it (monotonic time, results).
        self.health: tuple[float, dict[str, Any]] | None = None
        self.health_lock = asyncio.Lock()
        # Key changes of this process, one at a time: each moves the one version the
        # others check, so those made at once here would only make each other try again
        # (see api.keys.KEY_CHANGE_TRIES); and each is applied in the order written.
        self.key_changes = asyncio.Lock()
        self.pipeline.listeners.append(usage_listener(self.state))
        self.metrics: Any = None
        self.on_reject: list[Callable[[StellaError, str], None]] = []
        for name in settings.limits.models:
            # A route's own name: the limits go by it (`default` names no route to them).
            if name not in self.router.routes:
                _log.warning(
                    "limits_for_unknown_route",
                    key=f"limits.models.{name}",
                    detail="no configured route has this name; it applies if a runtime "
                    "route of that name is registered",
                )
        # Longest first: (prefix, dialect or DialectPick) from each dialect module's
        # ERROR_PREFIXES.
        self.error_prefixes: list[tuple[str, Dialect | DialectPick]] = [("/api/v1/", NATIVE)]

    def dialect_for(self, path: str, scope: Mapping[str, Any]) -> Dialect:
        """The dialect whose error shape a path's router-level errors take."""
        for prefix, dialect in self.error_prefixes:
            if path.startswith(prefix):
                return dialect if isinstance(dialect, Dialect) else dialect(scope)
        return NATIVE

    def rejected(self, exc: StellaError, api: str) -> None:
        """Tell observers about an inference request refused before the first byte (metrics)."""
        for hook in self.on_reject:
            hook(exc, api)


def make_state(settings: Settings) -> StateStore:
    """The state store: Redis when configured, else this process's memory."""
    if settings.state.redis_url:
        try:
            mod = importlib.import_module("stella.state_redis")
        except ImportError as exc:
            raise ConfigError(
                f"state.redis_url: Redis support is not available ({exc}); "
                "pip install 'stella-gateway[redis]'"
            ) from exc
        try:
            return mod.RedisState(settings.state)
        except ValueError as exc:  # redis-py's own reading of the URL (a bad port, ...)
            raise ConfigError(f"state.redis_url: {exc}") from None
    return MemoryState()


def make_admission(settings: Settings, state: StateStore) -> Admission:
    """Rate limits and concurrency, when the limits module is present."""
    try:
        mod = importlib.import_module("stella.limits")
    except ModuleNotFoundError as exc:
        if exc.name != "stella.limits":
            raise
        return Admission()
    return mod.Limiter(settings, state)


class RequestContext:
    """Pure ASGI middleware: request IDs, the X-Request-ID header, refusing while draining."""

    def __init__(self, app: Any, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await enter(self.services, self.app, scope, receive, send)


async def enter(
    svc: Services, app: Any, scope: Scope, receive: Any, send: Any, wrap: bool = True
) -> None:
    """Give the request its ID (the client's X-Request-ID when well formed), then run `app`.

    With `wrap=False` the app is an Endpoint, which adds the X-Request-ID header
    to its response itself.
    """
    given = None
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")
            break
    rid = request_id_for(given)
    state = scope.get("state")
    if state is None:
        scope["state"] = {"request_id": rid}
    else:
        state["request_id"] = rid
    scope["stella"] = svc
    logs.REQUEST_ID.set(rid)  # every log line of this request carries its ID
    header = (b"x-request-id", rid.encode())
    if svc.drain.draining and scope["path"] not in ("/health", "/ready"):
        exc = ShuttingDown("the server is shutting down; retry on another instance")
        refusal = svc.dialect_for(scope["path"], scope).error_response(exc, rid)
        refusal.raw_headers.append(header)
        await refusal(scope, receive, send)
        return
    if not wrap:
        scope["rid_header"] = header
        await app(scope, receive, send)
        return
    await app(scope, receive, with_header(send, header))


class StellaApp(Starlette):
    """Starlette, with stella's own routes dispatched without the generic layers.

    An `Endpoint` already authenticates, maps every error to the dialect's
    shape and never lets a handler's exception escape, so Starlette's error
    middlewares and route matching add only cost on the paths that carry the
    traffic. Those go straight to their endpoint (when no other middleware,
    such as CORS, is installed); everything else takes Starlette's full stack.
    """

    services: Services
    _fast: dict[tuple[str, str], Any] | None = None
    _fast_size = -1

    def _fast_index(self) -> dict[tuple[str, str], Any] | None:
        if len(self.user_middleware) != 1:
            return None  # other middleware must see every request
        index: dict[tuple[str, str], Any] = {}
        for route in self.router.routes:
            if (
                isinstance(route, Route)
                and "{" not in route.path
                and isinstance(route.app, Endpoint)
                and route.methods
            ):
                for method in route.methods:
                    index.setdefault((route.path, method), route.app)
        return index

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Exact paths of Endpoints directly; all else through Starlette."""
        if scope["type"] == "http":
            if self._fast_size != len(self.router.routes):
                self._fast, self._fast_size = self._fast_index(), len(self.router.routes)
            fast = self._fast
            if fast is not None:
                target = fast.get((scope["path"], scope["method"]))
                if target is not None:
                    scope["app"] = self
                    scope["path_params"] = {}
                    await enter(self.services, target, scope, receive, send, wrap=False)
                    return
        await super().__call__(scope, receive, send)


class ExactPathRouter(StarletteRouter):
    """Starlette's router, with paths that have no parameters found by one dict lookup.

    Starlette tries every route's regex in order; with a few dozen routes that scan
    costs more than the rest of the routing. Paths with parameters, mounts and
    misses still go through Starlette's ordered scan, so behaviour is unchanged.
    """

    _index: dict[str, list[Route]]
    _indexed = -1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Starlette's own slash redirect builds its Location from the request's Host
        # header; `not_found` below redirects with a path instead.
        super().__init__(*args, **{**kwargs, "redirect_slashes": False})

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Redirect a path that exists with (or without) a trailing slash; else 404."""
        path = scope.get("path", "")
        if scope["type"] == "http" and path != "/":
            other = path.rstrip("/") if path.endswith("/") else path + "/"
            # "//host" would be read as another site's address: never redirect to one.
            if other and not other.startswith("//"):
                probe = {**scope, "path": other}
                for route in self.routes:
                    if route.matches(probe)[0] is not Match.NONE:
                        location = quote(other, safe="/:@!$&'()*+,;=~")
                        if query := scope.get("query_string", b""):
                            location += "?" + query.decode("latin-1")
                        await RedirectResponse(location)(scope, receive, send)
                        return
        await super().not_found(scope, receive, send)

    def _exact(self, path: str) -> list[Route] | None:
        if self._indexed != len(self.routes):
            index: dict[str, list[Route]] = {}
            for route in self.routes:
                if isinstance(route, Route) and "{" not in route.path:
                    index.setdefault(route.path, []).append(route)
            self._index, self._indexed = index, len(self.routes)
        return self._index.get(path)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch exact paths directly; everything else as Starlette does."""
        if scope["type"] == "http":
            routes = self._exact(scope["path"])
            if routes:
                method = scope["method"]
                for route in routes:
                    if route.methods is None or method in route.methods:
                        scope.setdefault("router", self)
                        scope["endpoint"] = route.endpoint
                        scope["path_params"] = {}
                        await route.handle(scope, receive, send)
                        return
            if scope["path"].endswith("\n"):
                # Starlette's route patterns end in `$`, which a final newline passes
                # (`/v1/models/echo%0A` would be echo's): no route has such a path.
                await self.not_found(scope, receive, send)
                return
        await super().app(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404/405 in stella's error shape."""
    status = getattr(exc, "status_code", 500)
    # The scope's path, as routing read it: request.url's is urlsplit's, which drops \n,
    # \r and \t (`/v1/models/echo%0A` read as echo's path, the route it missed).
    path = request.scope["path"]
    err: StellaError = (
        NotFound(f"no route for {shown_path(path)}")
        if status == 404
        else MethodNotAllowed(f"{request.method} is not allowed on {shown_path(path)}")
        if status == 405
        else StellaError(str(getattr(exc, "detail", "error")))
    )
    err.status = status
    err.headers = dict(getattr(exc, "headers", None) or {})
    if status == 405:
        # Starlette names the methods of the first route on the path; a path served by
        # several routes (GET and POST /api/v1/models) allows all of theirs.
        allowed: set[str] = set()
        for route in request.app.router.routes:
            if isinstance(route, Route) and route.matches(request.scope)[0] is Match.PARTIAL:
                allowed |= route.methods or set()
        if allowed:
            err.headers["Allow"] = ", ".join(sorted(allowed))
    rid = request.scope.get("state", {}).get("request_id", "")
    svc = request.scope.get("stella") or request.app.state.stella
    response = svc.dialect_for(path, request.scope).error_response(err, rid)
    if body_over_limit(request.scope, svc.settings.server.max_body_bytes):
        response.raw_headers.append(CLOSE)
    if request.method in READS:
        # As every GET of the API answers, its errors too (see Endpoint): a 404 is
        # heuristically cacheable, and a route may exist by the next request.
        response.raw_headers.append(NO_STORE)
    return response


def shown_path(path: str) -> str:
    """A request's path as a message quotes it: its control characters escaped (`\\n`),
    cut at SHOWN_PATH_MAX characters (the request line may hold 64 KiB of it)."""
    path = shown_cut(path)
    if path.isprintable():
        return path
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in path)


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; a bad configuration raises ConfigError naming the key.

    Without `settings` (`uvicorn stella.app:create_app --factory`) it reads the
    configuration itself, and a bad one ends the process as `stella serve` ends it: one
    line and exit code 2. (`stella serve --workers N` starts its workers with
    stella.commands.workers.worker_app, which adds the command line's flags.)
    """
    if settings is not None:
        return _build_app(settings)
    try:
        settings = load_settings()
        app = _build_app(settings)
    except ConfigError as exc:
        print(f"stella: config error: {blamed(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    warn_web_concurrency(settings)
    return app


def warn_web_concurrency(settings: Settings) -> None:
    """Warn once when a plain uvicorn may run several workers that the settings do not know of.

    Without --workers, uvicorn runs WEB_CONCURRENCY workers, but the app cannot tell
    whether a --workers flag overrode it (`--workers 1`, `--reload`: one process), and
    some platforms set the variable themselves: it is no reason to refuse anything, only
    to say what several workers without shared state would mean.
    """
    value = os.environ.get("WEB_CONCURRENCY", "").strip()
    if not (value.isdigit() and int(value) > 1):
        return
    if settings.server.workers > 1 or settings.state.redis_url:
        return
    _log.warning(
        "web_concurrency_unshared",
        key="WEB_CONCURRENCY",
        value=int(value),
        detail="if uvicorn runs several workers, runtime routes, rate limits and usage are "
        "per worker: set server.workers to their number (routing changes are then refused) "
        "or state.redis_url (to share them)",
    )


def _build_app(settings: Settings) -> Starlette:
    if logs.sink() is None:
        configure_logs(settings)
    svc = Services(settings)
    routes = [*native.routes, *ops.routes]
    for mod in _optional(DIALECTS):
        routes = [*mod.routes, *routes]
        svc.error_prefixes += getattr(mod, "ERROR_PREFIXES", {}).items()
    svc.error_prefixes.sort(key=lambda item: len(item[0]), reverse=True)
    app = StellaApp(exception_handlers={HTTPException: http_error})
    app.services = svc
    app.router = ExactPathRouter(routes=routes, lifespan=lifespan)
    app.state.stella = svc
    # Added first so it is innermost: what the hooks add (CORS) wraps its answers too,
    # the 503 it sends while draining included.
    app.add_middleware(RequestContext, services=svc)
    for hook in _app_hooks():
        hook(app, svc)
    return app


def _app_hooks() -> list[Callable[[Starlette, Services], None]]:
    """Optional modules that wire themselves in (metrics, CORS)."""
    return [mod.install for mod in _optional(("stella.metrics", "stella.cors"))]


def _optional(names: tuple[str, ...]) -> list[Any]:
    """The modules of `names` that exist (one missing is skipped; a module that fails
    to import for another reason raises)."""
    out = []
    for name in names:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return out


def check_audit_path(settings: Settings, create: bool = True) -> None:
    """Make sure the audit file can be appended to, creating it and its directory (with
    `create` false, whatever the check created is removed again)."""
    path = settings.log.audit_path
    if not path:
        return
    target = Path(path)
    # What the check creates is where the path leads (through a link to a file not there
    # yet, say): the link is the user's, not ours to remove.
    real = Path(os.path.realpath(target))  # never raises, a link loop included
    missing = [p for p in (real, *real.parents) if not os.path.lexists(p)]
    # Found out now, not by audit lines silently dropped later.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.close(logs.open_audit(target))
    except OSError as exc:
        raise ConfigError(f"log.audit_path: cannot write {path}: {exc.strerror}") from None
    finally:
        if not create:  # what did not exist before goes again, the file first
            for made in missing:
                with contextlib.suppress(OSError):
                    made.unlink() if made == real else made.rmdir()


def configure_logs(settings: Settings) -> logs.LogSink:
    """Point structlog at a sink that masks every secret this config knows of."""
    names = [settings.auth.keys_env]
    names += [t["api_key_env"] for t in settings.backends.values() if t.get("api_key_env")]
    check_audit_path(settings)
    return logs.configure(
        fmt=settings.log.format,
        level=settings.log.level,
        audit_path=settings.log.audit_path,
        secrets=[*logs.secrets_from_env(names), *secret_values(settings)],
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Start state and backends; on the way out drain, close and flush."""
    svc: Services = app.state.stella
    follower: asyncio.Task[None] | None = None
    await svc.state.start()
    restored = await _restore_state(svc)
    started: list[Backend] = []
    try:
        for backend in svc.backends.values():
            await backend.start()
            started.append(backend)
        chain_signals(svc.drain)
        if isinstance(svc.state, SharedState):  # shared state: follow other replicas
            follower = asyncio.create_task(_follow_routing(svc, svc.state, restored))
        gc_freeze.freeze_started()
        _log.info(
            "started",
            version=__version__,
            pid=os.getpid(),
            default_model=svc.router.default,
            backends=sorted(svc.backends),
            state=svc.state.kind,
            auth="keys" if svc.auth.enabled else "anonymous",
        )
        yield
    finally:
        if follower is not None:
            follower.cancel()
        svc.drain.begin()
        svc.drain.cut()
        await svc.drain.wait(5)
        # Together and bounded: a stalled upstream or Redis must not keep the process
        # alive past the platform's grace period.
        closing = [asyncio.ensure_future(b.aclose()) for b in started]
        closing.append(asyncio.ensure_future(svc.state.aclose()))
        _, late = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_S)
        for task in late:
            task.cancel()
        for task in closing:  # failures to close are not worth a traceback at exit
            if task.done() and not task.cancelled():
                task.exception()
        _log.info("stopped", pid=os.getpid())  # which worker, as "started" says
        if sink := logs.sink():
            # Bounded: a stdout nobody reads must not keep the process alive. The audit
            # file has a writer of its own, so it gets its lines even then.
            sink.flush(LOG_FLUSH_TIMEOUT_S)


async def _restore_state(svc: Services) -> tuple[RoutingVersion | None, Hashable | None]:
    """Apply what the state store remembers: runtime routes, then the default switch, then
    the keys; returns the versions the routes and the keys were read at, if known
    (shared state), for the follower to go on from."""
    state = svc.state
    version = None
    try:
        if isinstance(state, SharedState):
            # Read with its version: the follower reads again only once it moves, so what
            # can't be applied is warned of once for this version, not again at its start.
            read = await state.routing()
            version, routes, default = read if read is not None else (None, {}, None)
        else:
            routes = await state.load_routes()
            default = await state.get_default_model()
    except OSError as exc:
        _log.warning("state_unavailable", error=str(exc))
        return None, None
    apply_routing(svc.router, routes, default)
    try:
        keys = await state.load_keys(svc.auth.digests)
    except (OSError, StellaError) as exc:
        # The follower reads them again every ROUTING_POLL_S until it can; meanwhile the
        # configured keys alone, none revoked (/ready says so).
        svc.auth.stored_error = _failure(exc)
        _log.warning("state_unavailable", error=str(exc), what="keys")
        return version, None
    await apply_keys(svc.auth, keys)
    return version, keys.version


# At shutdown, the longest a backend or the state store may take to close.
CLOSE_TIMEOUT_S = 10.0
# At shutdown, the longest the log outputs may take to write what is queued.
LOG_FLUSH_TIMEOUT_S = 5.0
# How often a replica on shared state checks for routing changes made elsewhere.
ROUTING_POLL_S = 1.0


async def _follow_routing(
    svc: Services,
    state: SharedState,
    seen: tuple[RoutingVersion | None, Hashable | None] = (None, None),
) -> None:
    """Apply the runtime routes, default switches and key changes other replicas write
    to the state store: a cheap version poll, a full read only when the version moved
    from `seen` (the routes' and the keys', as the start-up restore read them).

    Routes and keys are followed apart, each on its own poll: a read of the keys that
    fails or takes long (Redis slow with many of them) holds no routing change back,
    and keys never read (a start while Redis was away) are read again at each poll."""
    routes_seen, keys_seen = seen
    await asyncio.gather(
        _follow_routes(svc, state, routes_seen), _follow_keys(svc, state, keys_seen)
    )


async def _follow_routes(svc: Services, state: SharedState, seen: RoutingVersion | None) -> None:
    """Apply the routes and the default of each routing version not `seen` yet."""
    # None, not known: the first poll reads them once. A version is (epoch, count): a
    # count alone repeats after Redis restarts empty (see state.RoutingVersion).
    while True:
        await asyncio.sleep(ROUTING_POLL_S)
        try:
            version = await state.routing_version()
            if version is None or version == seen:
                continue
            before = svc.router.local_changes
            read = await state.routing()
            if read is None or svc.router.local_changes != before:
                continue  # a local change landed meanwhile: read again next time
            seen, routes, default = read
            apply_routing(svc.router, routes, default)
        except (OSError, StellaError) as exc:  # the store away, a change refused: in a line
            _log.warning("routing_sync_failed", error=repr(exc))
        except Exception as exc:  # a bug: its traceback, and the following goes on
            _log.error("routing_sync_failed", error=repr(exc), exc_info=exc)


async def _follow_keys(svc: Services, state: SharedState, seen: Hashable | None) -> None:
    """Apply the stored keys of each version not `seen` yet; a read that fails is made
    again at the next poll, warned of once until one succeeds."""
    auth = svc.auth
    failing_since: float | None = None
    while True:
        await asyncio.sleep(ROUTING_POLL_S)
        try:
            version = await state.routing_version()
            if version is None or version == seen:
                continue
            before = auth.local_changes
            keys = await state.load_keys(auth.digests)
            if not await apply_keys(auth, keys, before):
                continue  # a local change landed meanwhile: read again next time
            seen = keys.version
            if failing_since is not None:
                _log.info(
                    "keys_sync_recovered", failed_s=round(time.monotonic() - failing_since, 1)
                )
                failing_since = None
        except (OSError, StellaError) as exc:  # the store away or slow: in a line, once
            auth.stored_error = _failure(exc)
            if failing_since is None:
                failing_since = time.monotonic()
                _log.warning(
                    "keys_sync_failed",
                    error=repr(exc),
                    keys="as last read" if auth.stored_read else "configured alone, none revoked",
                )
        except Exception as exc:  # a bug: its traceback, and the following goes on
            _log.error("keys_sync_failed", error=repr(exc), exc_info=exc)


def _failure(exc: Exception) -> str:
    """Why a read of the stored keys failed, as /ready may say it (an OSError's text may
    name the store's address)."""
    if isinstance(exc, StellaError):
        return exc.message.removesuffix("; try again")
    return type(exc).__name__


def apply_routing(router: Router, routes: dict[str, Any], default: str | None) -> None:
    """Make the runtime part of `router` what the store holds: its routes, its default
    (what can't be applied is left out with a warning, every time it is read)."""
    specs: dict[str, RouteSettings] = {}
    unreadable: dict[str, str] = {}
    for name, spec in routes.items():
        if isinstance(spec, Unreadable):
            unreadable[name] = spec.reason
            continue
        try:
            specs[name] = msgspec.convert(spec, RouteSettings)
        except msgspec.ValidationError as exc:
            unreadable[name] = str(exc)
    for why in router.apply_stored(specs, default, unreadable):
        _log.warning("stored_routing_skipped", reason=why)


async def apply_keys(auth: Authenticator, keys: StoredKeys, local: int | None = None) -> bool:
    """Make the runtime keys and revocations `auth` applies what the store holds (a key
    that can't be applied is left out with a warning, every time it is read), unless
    `auth.local_changes` is no longer `local` (its count when the read began) once the
    table is made: then the read is stale, and nothing is applied. Whether it was."""
    # Made in parts, the loop running between them and the table before in use; then
    # swapped whole.
    built = await auth.build(keys.keys, keys.revoked)
    if local is not None and auth.local_changes != local:
        return False
    for why in auth.install(built, keys.changes):
        _log.warning("stored_key_skipped", reason=why)
    return True
