"""stella's own API: /api/v1/chat, /api/v1/generate, /api/v1/models and the admin routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import structlog
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api.http import (
    JSONResponse,
    Reply,
    endpoint,
    read_json,
    run_to_end,
    services,
    stream_response,
)
from stella.api.openapi import Operation, document
from stella.api.shapes import GENERATE_SSE_EVENT
from stella.core import Call
from stella.errors import Conflict, InvalidRequest, ModelNotFound, StellaError
from stella.images import check_native
from stella.protocol import (
    ChatRequest,
    ChatResponse,
    DefaultModel,
    GenerateRequest,
    ModelInfo,
    ModelList,
    Options,
    Registered,
    Removed,
)
from stella.routing import Router
from stella.settings import (
    MAX_UPSTREAM_MODEL,
    ROUTE_NAME_PATTERN,
    ROUTE_NAME_RULE,
    Price,
    RouteSettings,
    upstream_model_problem,
)
from stella.streaming import Codec

if TYPE_CHECKING:  # stella.app imports this module
    from stella.app import Services

_chat = msgspec.json.Decoder(ChatRequest)
_generate = msgspec.json.Decoder(GenerateRequest)
NDJSON = Codec()


# ASCII letters, digits and "._:-" in parts split by "/", none empty or only dots (see
# settings.ROUTE_NAME_PATTERN): a name the URL paths of the admin routes can name.
RouteName = Annotated[str, Meta(min_length=1, max_length=128, pattern=ROUTE_NAME_PATTERN)]


# The most aliases, and the most fallbacks, a runtime route may have.
MAX_ROUTE_NAMES = 64


class RegisterRoute(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/v1/models: a runtime route."""

    name: RouteName
    backend: Annotated[str, Meta(min_length=1)]
    # As a configured route's (see settings.upstream_model_problem); "": the name.
    upstream_model: Annotated[str, Meta(max_length=MAX_UPSTREAM_MODEL)] = ""
    # Names a request can use (the `model` field takes at most 256 characters; "" is
    # the default model): checked as the name is. Each once (see _once).
    aliases: Annotated[list[RouteName], Meta(max_length=MAX_ROUTE_NAMES)] = []
    fallbacks: Annotated[list[str], Meta(max_length=MAX_ROUTE_NAMES)] = []
    # More backends serving the same upstream model: a call goes to the least busy.
    balance: Annotated[
        list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_ROUTE_NAMES)
    ] = []
    # USD per million tokens, as a configured route's `price` (absent: unpriced).
    price: Price | None = None


_register = msgspec.json.Decoder(RegisterRoute)
T = TypeVar("T")
_log = structlog.get_logger("stella")


async def respond(request: Request, call: Call, chat: ChatRequest) -> Reply:
    """Admit a chat and answer it as NDJSON stream or JSON, per `chat.stream`."""
    svc = services(request)
    inference = await svc.pipeline.prepare(chat, call)
    headers = inference.permit.headers
    if chat.stream:
        return stream_response(request, inference, NDJSON)
    result = await run_to_end(request, inference)
    return JSONResponse(result, headers=headers)


# Sampling options sent at the top level, as OpenAI's API has them: the error says where
# they go, under the name `options` knows them by.
_OPTIONS = {name: name for name in Options.__struct_fields__} | {
    "max_completion_tokens": "max_tokens"
}


def _hint(exc: InvalidRequest) -> InvalidRequest:
    name = _OPTIONS.get(exc.param)
    if name is not None:
        exc.message += (
            f'; sampling options go inside "options", as {{"options": {{"{name}": ...}}}}'
        )
    return exc


@endpoint(inference=True)
async def chat(request: Request, call: Call) -> Reply:
    """POST /api/v1/chat."""
    try:
        req = await read_json(request, _chat)
    except InvalidRequest as exc:
        raise _hint(exc) from None
    for m in req.messages:
        if m.images:  # the other dialects check theirs as they build the messages
            check_native(req.messages)
            break
    return await respond(request, call, req)


async def read_generate(request: Request) -> GenerateRequest:
    """The body of POST /api/v1/generate (this module's route, or the aliases' one)."""
    try:
        return await read_json(request, _generate)
    except InvalidRequest as exc:
        raise _hint(exc) from None


@endpoint(inference=True)
async def generate(request: Request, call: Call) -> Reply:
    """POST /api/v1/generate: a chat with one user message and an optional system prompt."""
    return await respond(request, call, (await read_generate(request)).to_chat())


async def model_infos(request: Request, call: Call) -> ModelList:
    """Every routable model the key may use, with its state: a key limited to some
    models is told of no other route, as a fallback or the default either."""
    svc = services(request)
    router = svc.router
    may_use = call.principal.may_use
    scoped = call.principal.scope is not None
    out = []
    for route in router.routes.values():
        if not may_use(route.name):
            continue
        backend = route.backend
        fallbacks = route.fallbacks
        if scoped:  # as a call tries them: only those the key may use
            fallbacks = [
                fb for fb in fallbacks if router.knows(fb) and may_use(router.resolve(fb).name)
            ]
        out.append(
            ModelInfo(
                name=route.name,
                backend=route.backend_name,
                kind=backend.kind,
                upstream_model=route.upstream_model,
                aliases=route.aliases,
                fallbacks=fallbacks,
                balance=[r.backend_name for r in route.pool[1:]],
                loaded=backend.loaded(route.upstream_model),
                default=route.name == router.default,
                capabilities=router.capabilities(route, call.principal.scope),
                circuit=router.circuit(route),
                memory_bytes=backend.memory_bytes(route.upstream_model),
                left_out=list(route.left_out),
            )
        )
    # Only an admin may see routes beyond the table (their reasons name backends too).
    skipped = dict(router.skipped) if call.principal.admin else {}
    default = router.default if may_use(router.default) else None
    return ModelList(models=out, default=default, skipped=skipped)


@endpoint()
async def models(request: Request, call: Call) -> Response:
    """GET /api/v1/models."""
    return JSONResponse(await model_infos(request, call))


@contextlib.contextmanager
def admin_event(
    action: str, name: str | None, call: Call, event: str = "routing_change", **fields: Any
) -> Iterator[dict[str, Any]]:
    """One `event` for an admin change, whatever its outcome: `result` is "ok" or the
    error's code; the caller sets what it learns on the way in `fields` (a routing
    change's `route`, the route changed: named by an alias, the route's own name)."""
    fields = {"name": name, **(fields or {"route": None})}
    result = "internal_error"
    try:
        yield fields
        result = "ok"
    except StellaError as exc:
        result = exc.code
        raise
    except asyncio.CancelledError:  # cut short (shutdown): the store may or may not have it
        result = "cancelled"
        raise
    finally:
        _log.info(
            event,
            action=action,
            **fields,
            key=call.principal.name,  # the key's name, never the key
            request_id=call.request_id,
            result=result,
        )


def _shared_routing(svc: Services) -> None:
    """Refuse a routing change that would reach only the worker taking it: with several
    workers the table is shared only through Redis."""
    shared_state(svc, "runtime routing", "change the routes in the config file")


def shared_state(svc: Services, what: str, instead: str) -> None:
    """Refuse a change of `what` that would reach only the worker taking it: with several
    workers it is shared only through Redis."""
    count = svc.settings.server.workers
    if count > 1 and not svc.settings.state.redis_url:
        raise Conflict(
            f"{what} with several workers (server.workers = {count}) needs "
            "state.redis_url: without it a change would reach only the worker that takes "
            f"the call; set state.redis_url, or {instead} and restart"
        )


@endpoint(auth="admin")
async def switch_model(request: Request, call: Call) -> Response:
    """POST /api/v1/models/switch/{name}: make `name` the default model."""
    svc = services(request)
    router = svc.router
    wanted = request.path_params["name"]
    with admin_event("switch", wanted, call) as logged:
        _shared_routing(svc)
        logged["route"] = await _change(
            router,
            lambda: router.set_default(wanted),
            # The route's own name, not the alias asked for; a runtime route must still
            # be in the store when the write lands (another replica may remove it).
            lambda name: svc.state.set_default_model(name, router.routes[name].runtime),
        )
    return JSONResponse(DefaultModel(logged["route"]))


def listed_once(field: str, names: list[str]) -> None:
    """Refuse a name listed twice (a route's aliases, fallbacks or balanced backends, a
    runtime key's models), by the repeat's path."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidRequest(f"$.{field}[{i}]: {name!r} is listed twice", param=f"{field}[{i}]")
        seen.add(name)


async def _read_route(request: Request) -> RegisterRoute:
    try:
        spec = await read_json(request, _register)
    except InvalidRequest as exc:
        if "matching regex" in exc.message:  # say the rule, not the pattern
            exc.message = (
                f"$.{exc.param}: a route name is ASCII letters, digits and '._:-' in "
                f"{ROUTE_NAME_RULE}"
            )
        raise
    return spec


@endpoint(auth="admin")
async def register_model(request: Request, call: Call) -> Response:
    """POST /api/v1/models: add a runtime route (201), or replace the one of its name (200)."""
    svc = services(request)
    replaced = False
    with admin_event("register", None, call) as logged:
        _shared_routing(svc)
        spec = await _read_route(request)
        logged["name"] = spec.name  # named in the log from here, a refused list too
        listed_once("aliases", spec.aliases)
        listed_once("fallbacks", spec.fallbacks)
        listed_once("balance", spec.balance)
        problem = upstream_model_problem(spec.upstream_model)
        if problem:
            raise InvalidRequest(f"$.upstream_model: {problem}", param="upstream_model")
        for i, alias in enumerate(spec.aliases):
            if alias == spec.name:  # an alias is another name, not the name again
                raise InvalidRequest(
                    f"$.aliases[{i}]: {alias!r} is the route's own name", param=f"aliases[{i}]"
                )
        rs = RouteSettings(
            backend=spec.backend,
            upstream_model=spec.upstream_model,
            aliases=spec.aliases,
            fallbacks=spec.fallbacks,
            balance=spec.balance,
            price=spec.price,
        )
        router = svc.router

        async def save(_: object) -> None:
            nonlocal replaced
            # The store says, not this table: another replica's route of this name may
            # not have reached it yet.
            replaced = await svc.state.save_route(spec.name, _stored_route(rs))

        await _change(
            router,
            lambda: router.register(spec.name, rs),
            save,
            # Stored, it is applied as a stored route is: a fallback removed meanwhile is
            # skipped (as for any route whose fallback goes), not a reason to drop it.
            lambda: router.register(spec.name, rs, check_fallbacks=False),
        )
        logged["route"] = spec.name
    return JSONResponse(Registered(spec.name), status_code=200 if replaced else 201)


def _stored_route(rs: RouteSettings) -> dict[str, Any]:
    """`rs` as the state store holds it, read back by every replica."""
    spec = msgspec.to_builtins(rs)
    # A replica from before `balance` refuses a route with a field it does not know (its
    # RouteSettings forbids them): during a rolling upgrade it would skip every runtime
    # route a newer one stores. Left out when empty, such a route reads the same to both.
    if not spec["balance"]:
        del spec["balance"]
    if spec["price"] is None:  # likewise
        del spec["price"]
    return spec


@endpoint(auth="admin")
async def delete_model(request: Request, call: Call) -> Response:
    """DELETE /api/v1/models/{name}: remove a runtime route."""
    svc = services(request)
    name = request.path_params["name"]
    router = svc.router
    detail = ""
    with admin_event("delete", name, call) as logged:
        _shared_routing(svc)
        try:
            # Named by an alias, the route itself goes, in the store too: answered by its
            # name.
            logged["route"] = await _change(
                router, lambda: router.remove(name), svc.state.delete_route
            )
        except ModelNotFound:
            # A stored route no replica could apply (not JSON, a backend unknown here:
            # logged as stored_routing_skipped) is in no table, yet the admin must be able
            # to remove it: by its exact name, from the store.
            if not await _stored(svc, name):
                raise
            await svc.state.delete_route(name)
            logged["route"] = name
        except Conflict:
            # A route of this replica's config file: another replica, whose config lacks
            # it, may have stored a runtime route of that name, which this one skips. It
            # must be removable here too, by its exact name; the configured one stays.
            if not router.configured(name) or not await _stored(svc, name):
                raise
            await svc.state.delete_route(name)  # the store still guards its default
            logged["route"] = name
            detail = (
                f"removed the stored runtime route {name!r}; the route this replica's "
                "config file names so stays"
            )
    return JSONResponse(Removed(logged["route"], detail=detail))


async def _stored(svc: Services, name: str) -> bool:
    """Whether the store holds a runtime route under exactly this name (one whose name
    is not UTF-8 is shown escaped: no request names it)."""
    stored = await svc.state.load_routes()
    return name in stored and not getattr(stored[name], "escaped", False)


async def _change(
    router: Router,
    apply: Callable[[], T],
    write: Callable[[T], Awaitable[Any]],
    again: Callable[[], Any] | None = None,
) -> T:
    """A routing change that stands only once the state store took it.

    `apply` runs first to validate (and compute what `write` is given), then the table
    goes back at once, with no await in between, so nothing else ever sees it; after
    the store's write succeeds it is applied for good (by `again`, when given). A failed
    write leaves the table as it is: it never rolls back changes others made during the
    write. The store refuses a change that conflicts with what it holds, so one it took
    applies here too.
    """
    snap = router.snapshot()
    result = apply()
    router.restore(snap)
    await write(result)
    # Removed routes no call is on any more, their last counts scraped, are forgotten
    # (their metric series go) before the change, so a route added again under such a name
    # starts afresh, and after it, so a route it removes goes at once when nothing of it
    # is left to show (no call on it, none counted since the last scrape).
    router.sweep()
    try:
        (again or apply)()
    except StellaError as exc:
        # Not expected (the store checked it); should it happen, shared state brings the
        # table in line at its next read (see app._follow_routing), and it is not silent.
        _log.warning("routing_change_not_applied", reason=exc.message)
    router.local_changes += 1  # a follower's read from before this write is stale now
    router.sweep()
    return result


document(
    Operation(
        "post",
        "/api/v1/chat",
        "Chat: messages in, assistant message out (NDJSON stream or JSON)",
        request=ChatRequest,
        response=ChatResponse,
        stream="application/x-ndjson",
    ),
    Operation(
        "post",
        "/api/v1/generate",
        "Generate: one prompt in, text out",
        description=(
            'A stream (the default) is NDJSON, or SSE (`data: {"response": ...}` events, '
            "then `data: {}`) when the Accept header weighs text/event-stream above "
            "application/x-ndjson: by its q values, case-insensitively, each form weighed by "
            "the most specific range that matches it (text/event-stream or text/*, "
            "application/x-ndjson or application/*, */*); at the same q, by which range is "
            "more specific (`text/event-stream, */*` is SSE). No Accept, `*/*`, a tie between "
            "ranges as specific (`text/event-stream, application/x-ndjson`) or neither "
            "acceptable keeps NDJSON. Its successful answers carry `Vary: Accept`."
        ),
        request=GenerateRequest,
        response=ChatResponse,
        stream="application/x-ndjson",
        streams=(("text/event-stream", GENERATE_SSE_EVENT),),
    ),
    Operation("get", "/api/v1/models", "Routable models", response=ModelList, errors=(401, 403)),
    Operation(
        "post",
        "/api/v1/models",
        "Register a runtime route (admin)",
        tag="admin",
        request=RegisterRoute,
        response=Registered,
        # 201 a new route; 200 one of that name replaced: its backend, upstream model,
        # aliases, fallbacks and balance.
        replaced=True,
        admin=True,
        errors=(400, 401, 403, 409, 413, 415, 503),
    ),
    Operation(
        "post",
        "/api/v1/models/switch/{name}",
        "Make a model the default (admin)",
        tag="admin",
        response=DefaultModel,
        admin=True,
        params=("name",),
        errors=(401, 403, 404, 409, 503),
    ),
    Operation(
        "delete",
        "/api/v1/models/{name}",
        "Remove a runtime route, by its name or an alias (admin)",
        tag="admin",
        response=Removed,
        admin=True,
        params=("name",),
        errors=(401, 403, 404, 409, 503),
    ),
)

routes = [
    Route("/api/v1/chat", chat, methods=["POST"]),
    Route("/api/v1/generate", generate, methods=["POST"]),
    Route("/api/v1/models", models, methods=["GET"]),
    Route("/api/v1/models", register_model, methods=["POST"]),
    Route("/api/v1/models/switch/{name:path}", switch_model, methods=["POST"]),
    Route("/api/v1/models/{name:path}", delete_model, methods=["DELETE"]),
]
