"""Admin routes for API keys: revoke (or purge) one, make a runtime one, list them
(key_lifecycle: update and rotate one).

A change is written to the state store first and, once it took it, applied to this
process's key table; the other replicas apply it when they next see the routing
version move (see app._follow_routing), so `authenticate` stays a dict lookup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella import key_plans
from stella.api.http import NO_STORE, JSONResponse, endpoint, read_json, services, shown_cut
from stella.api.native import admin_event, listed_once, shared_state
from stella.api.openapi import Operation, document
from stella.auth import (
    CONFIGURED_HERE,
    KEY_NAME_PATTERN,
    Authenticator,
    Revocation,
    StoredKey,
    expired,
    grace_end,
    hash_key,
    key_principal,
    key_spec,
    new_key,
    stored_key,
)
from stella.calls import Principal
from stella.core import Call
from stella.errors import Conflict, InvalidRequest, Unavailable
from stella.protocol import KeyCreated, KeyInfo, KeyList, KeyRevoked
from stella.settings import Count, UsdPerDay, upstream_model_problem
from stella.state import KeyChange, StoredKeys, utc_stamp

if TYPE_CHECKING:  # stella.app imports this module
    from stella.app import Services

# What a key change's plan gives its caller beside the change itself.
Planned = TypeVar("Planned")

# Up to 64 letters, digits and '_.@-', as a STELLA_API_KEYS name: a URL path names it.
KeyName = Annotated[str, Meta(pattern=f"^{KEY_NAME_PATTERN}$")]
# The most model patterns a runtime key may list, and the longest pattern.
MAX_KEY_MODELS = 64
# How often a key change is planned again when the keys changed between its read and
# its write (another replica's change, of any key); each try is two round trips. Tries go
# on past this count while KEY_CHANGE_WINDOW_S has not passed: a replica slowed by load
# (its round trips, its pauses) still gets its change in while another keeps writing.
KEY_CHANGE_TRIES = 8
KEY_CHANGE_WINDOW_S = 2.0
# Before each try but the first, a pause of up to KEY_CHANGE_PAUSE_S, doubled at each
# try up to KEY_CHANGE_PAUSE_MAX_S, jittered: changes that met at once (of unrelated
# keys: every change moves the one version) would meet again, tried again at once.
KEY_CHANGE_PAUSE_S = 0.005
KEY_CHANGE_PAUSE_MAX_S = 0.05
ModelPattern = Annotated[str, Meta(min_length=1, max_length=256)]
# A runtime key's life: at most ten years, set as seconds from now (the store's clock).
MAX_EXPIRES_IN_S = 10 * 365 * 86400
ExpiresIn = Annotated[
    float,
    Meta(gt=0, le=MAX_EXPIRES_IN_S, description="seconds from now until the key stops working"),
]


class CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/v1/keys: a runtime key, with what an [auth.keys.NAME] table takes."""

    name: KeyName
    # Glob patterns of the models it may use; [] is none (a key for the admin routes).
    # The schema says the default, which a factory's does not show by itself.
    models: Annotated[
        list[ModelPattern],
        Meta(max_length=MAX_KEY_MODELS, extra_json_schema={"default": ["*"]}),
    ] = msgspec.field(default_factory=lambda: ["*"])
    admin: bool = False
    # 0: [limits]' default, as in the config.
    requests_per_minute: Count = 0
    tokens_per_minute: Count = 0
    max_concurrent: Count = 0
    requests_per_day: Count = 0
    tokens_per_day: Count = 0
    usd_per_day: UsdPerDay = 0.0
    # None: it never expires.
    expires_in_s: ExpiresIn | None = None


_create = msgspec.json.Decoder(CreateKey)


def check_models(models: list[str]) -> None:
    """Refuse a runtime key's model patterns that repeat or hold a control character."""
    # As a runtime route's lists: a repeat is a mistake, and a control character would
    # be printed raw by `stella keys list` (a pattern names models, whose names have none).
    listed_once("models", models)
    for i, pattern in enumerate(models):
        problem = upstream_model_problem(pattern)
        if problem:
            raise InvalidRequest(f"$.models[{i}]: {problem}", param=f"models[{i}]")


def _shared_keys(svc: Services) -> None:
    shared_state(svc, "a key change", "change the keys in the config file")


def _info(
    p: Principal,
    source: str,
    revoked: bool,
    skipped: str = "",
    created_at: str = "",
    revoked_at: str = "",
    k: StoredKey | None = None,
    now: float = 0.0,
) -> KeyInfo:
    """A key as the list shows it; `k` a runtime key's entry, its expiry and grace read
    at `now` (the store's clock)."""
    expires_at = grace_until = ""
    if k is not None and k.expires_at:
        expires_at = utc_stamp(k.expires_at)
    if k is not None and k.previous and not revoked:
        end = grace_end(k)
        grace_until = utc_stamp(end) if end > now else ""
    return KeyInfo(
        name=p.name,
        source=source,  # type: ignore[arg-type]  # one of the Literal's, by its caller
        models=list(p.models),
        admin=p.admin,
        requests_per_minute=p.requests_per_minute,
        tokens_per_minute=p.tokens_per_minute,
        max_concurrent=p.max_concurrent,
        requests_per_day=p.requests_per_day,
        tokens_per_day=p.tokens_per_day,
        usd_per_day=p.usd_per_day,
        revoked=revoked,
        created_at=created_at,
        revoked_at=revoked_at if revoked else "",
        expires_at=expires_at,
        expired=k is not None and expired(k, now),
        grace_until=grace_until,
        skipped=skipped,
    )


# A create on this replica's table read from the store longer ago than this reads the
# store first (see create_key): the follower's reads reach it at least this often.
KEYS_STALE_S = 2.0


async def _read_to_change(svc: Services) -> StoredKeys:
    """The stored keys a change is planned on; a 503 while the store does not answer says
    that nothing was changed, as a failed write's does."""
    try:
        return await svc.state.load_keys(svc.auth.digests)
    except Unavailable as exc:
        why = exc.message.removesuffix("; try again")
        raise Unavailable(
            f"{why}; the change was not applied; try again", retry_after=exc.retry_after or 1
        ) from None


async def _pause_before(attempt: int) -> None:
    """Wait before try `attempt` (from 0) of a key change: not before the first."""
    if attempt:
        longest = min(KEY_CHANGE_PAUSE_S * 2 ** (attempt - 1), KEY_CHANGE_PAUSE_MAX_S)
        await asyncio.sleep(random.uniform(longest / 2, longest))


async def write_key_change(
    svc: Services, plan: Callable[[StoredKeys, float], tuple[KeyChange, Planned]]
) -> tuple[StoredKeys, Planned, float]:
    """Plan a key change on the store's keys (`plan(stored, now)`, `now` on the store's
    clock, gives the change and what else its caller needs of it), write it only while
    they are still as read (two changes at once on two replicas can't each take one of
    the last two admin keys), then apply it to this process's table. Returns the keys
    read, the plan's other part and `now`; a 503 when every try found them changed."""
    auth = svc.auth
    async with svc.key_changes:
        ends = time.monotonic() + KEY_CHANGE_WINDOW_S
        attempt = 0
        while True:
            await _pause_before(attempt)
            stored = await _read_to_change(svc)
            now = svc.state.wall()
            change, planned = plan(stored, now)
            if await svc.state.change_keys(change, stored.version):
                break
            attempt += 1
            if attempt >= KEY_CHANGE_TRIES and time.monotonic() >= ends:
                raise Unavailable("the keys kept changing meanwhile; try again", retry_after=1)
        # As the store applies it (StateStore.change_keys): removed, then put.
        keys = {n: spec for n, spec in stored.keys.items() if n not in change.remove}
        revoked = {**stored.revoked, **change.revoke}
        for digest in change.unrevoke:
            revoked.pop(digest, None)
        await apply_written(auth, {**keys, **change.put}, revoked, stored.changes)
        if change.forget:  # a purge's limit buckets: the store dropped its copies
            svc.admission.forget(change.forget)
    return stored, planned, now


async def apply_written(
    auth: Authenticator, keys: dict[str, Any], revoked: dict[str, str], changes: int | None = None
) -> None:
    """Apply to this process's table the keys a change of its own just wrote (`changes`:
    as Authenticator.apply_stored takes it), under `svc.key_changes`."""
    auth.local_changes += 1  # a follower's read from before this write is stale now
    installs = auth.installs
    built = await auth.build(keys, revoked)  # the loop runs meanwhile: see build
    # A table the follower installed meanwhile was read since this write: it holds it
    # (and may hold more), and this one is no newer.
    if auth.installs == installs:
        auth.install(built, changes)


def purge_asked(request: Request) -> bool:
    """DELETE's `purge` query parameter: true or false (absent: false)."""
    value = request.query_params.get("purge")
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise InvalidRequest("purge: expected true or false", param="purge")


@endpoint(auth="admin")
async def revoke_key(request: Request, call: Call) -> Response:
    """DELETE /api/v1/keys/{name}: revoke a key, runtime or configured."""
    svc = services(request)
    auth = svc.auth
    name = request.path_params["name"]
    shown = shown_cut(name)  # the path may hold 64 KiB: not all of it in the answer or log
    if purge_asked(request):
        return await _purge(svc, name, shown, call)
    with admin_event("revoke", shown, call, "key_change", source=None) as logged:
        _shared_keys(svc)

        # Planned on the store's keys: a runtime key another replica made may not be
        # here yet.
        def revocation(stored: StoredKeys, now: float) -> tuple[KeyChange, Revocation]:
            plan = auth.revocation(name, stored, shown)
            return dataclasses.replace(plan.change, at=utc_stamp(now)), plan

        _, plan, _ = await write_key_change(svc, revocation)
        source = plan.sources[0]
        logged["source"], logged["sources"] = source, plan.sources
    details = []
    if source != "runtime":
        where = key_plans.configured_where(auth, source)
        details.append(
            f"the key is refused from now on, though {where} still lists it; take it out "
            "there too (a new key under this name is not refused)"
        )
    if len(plan.sources) > 1:
        details.append(
            "the runtime key of this name, made on a replica whose config lacks the name, "
            "is revoked too"
        )
    if plan.unreadable:
        details.append(
            f"the stored entry of this name, which no replica can read ({plan.unreadable}), "
            "was removed"
        )
    return JSONResponse(
        KeyRevoked(name, source, plan.sources, detail="; ".join(details)),  # type: ignore[arg-type]
        headers=[NO_STORE],  # a change's answer: no cache may keep it
    )


async def _purge(svc: Services, name: str, shown: str, call: Call) -> Response:
    """DELETE /api/v1/keys/{name}?purge=true: drop a runtime key's stored entry, revoking
    it first if it was not, so that its name may be used again: its limit buckets go
    with it (a new key of the name starts with a full day's quota, not the old key's
    rest); its usage rows stay."""
    auth = svc.auth
    with admin_event("purge", shown, call, "key_change", source="runtime") as logged:
        _shared_keys(svc)

        def purge(stored: StoredKeys, now: float) -> tuple[KeyChange, key_plans.Purge]:
            plan = key_plans.purge(auth, name, stored, shown)
            buckets = svc.admission.key_buckets(name)
            return dataclasses.replace(plan.change, at=utc_stamp(now), forget=buckets), plan

        _, plan, _ = await write_key_change(svc, purge)
        logged["revoked"] = plan.revoked
    detail = "revoked, and its entry dropped" if plan.revoked else "its entry dropped"
    if plan.unreadable:
        detail = f"its entry, which no replica can read ({plan.unreadable}), dropped"
    detail += "; the name is free, and the key's secrets stay refused"
    answer = KeyRevoked(name, "runtime", ["runtime"], detail=detail, purged=True)
    return JSONResponse(answer, headers=[NO_STORE])


@endpoint(auth="admin")
async def create_key(request: Request, call: Call) -> Response:
    """POST /api/v1/keys: make a runtime key (201), its key shown this once."""
    svc = services(request)
    auth = svc.auth
    with admin_event("create", None, call, "key_change", source="runtime") as logged:
        _shared_keys(svc)
        try:
            spec = await read_json(request, _create)
        except InvalidRequest as exc:
            if "matching regex" in exc.message:  # say the rule, not the pattern
                exc.message = (
                    f"$.{exc.param}: a key name is 1 to 64 ASCII letters, digits and "
                    "'_.@-', beginning with a letter or a digit"
                )
            raise
        logged["name"] = spec.name
        check_models(spec.models)
        if not auth.enabled:
            # Keys turned on at runtime would lock every anonymous caller out at once,
            # on some replicas before others.
            raise Conflict(
                "this server takes anonymous calls (no keys configured): runtime keys need "
                "at least one configured key (STELLA_API_KEYS or [auth.keys])"
            )
        if spec.name in auth.configured:
            raise Conflict(f"a key named {spec.name!r} is configured already")
        key = new_key()
        fields = msgspec.structs.asdict(spec)
        del fields["name"]  # the table's name, not a field of it
        life = fields.pop("expires_in_s")
        # On the store's clock, as every replica lists and compares them.
        now = svc.state.wall()
        if life is not None:
            logged["expires_in_s"] = life
        settings = StoredKey(sha256=hash_key(key), expires_at=now + life if life else 0, **fields)
        stored = key_spec(settings)
        created_at = utc_stamp(now)
        # One change of this process at a time (see apply_written).
        async with svc.key_changes:
            # Made on this process's table, unless it was read from the store that long
            # ago: the follower drops a read that a change of this process overtook, so
            # under a steady stream of creates here it would never install one, and
            # other replicas' revocations would never reach this one.
            fresh = None
            if time.monotonic() - auth.read_at > KEYS_STALE_S:
                fresh = await _read_to_change(svc)
            await svc.state.save_key(spec.name, stored, created_at)
            if fresh is not None and auth.changes > fresh.changes:
                # The follower installed a later read during the write: this process's
                # table is newer than `fresh`, and the key is made on it.
                fresh = None
            # This process's table read after the write, as the follower may have
            # installed a newer read meanwhile.
            keys, revoked, changes = (
                (auth.runtime_specs, auth.revoked, None)
                if fresh is None
                else (fresh.keys, fresh.revoked, fresh.changes)
            )
            await apply_written(auth, {**keys, spec.name: stored}, revoked, changes)
    p = key_principal(spec.name, settings, auth.limits)
    info = _info(p, "runtime", False, created_at=created_at, k=settings, now=now)
    # The key itself, shown this once: no cache (a proxy's, a browser's) may keep it.
    created = KeyCreated(**msgspec.structs.asdict(info), key=key)
    return JSONResponse(created, status_code=201, headers=[NO_STORE])


@endpoint(auth="admin")
async def list_keys(request: Request, call: Call) -> Response:
    """GET /api/v1/keys: every key, configured and runtime, revoked ones too."""
    svc = services(request)
    auth = svc.auth
    # The store's, not this table's: a key another replica made or revoked a moment ago
    # is listed as it is (503 while Redis does not answer, as the usage report).
    stored = await svc.state.load_keys(auth.digests)
    now = svc.state.wall()
    at = stored.revoked_at
    out = []
    for name, (digest, source) in auth.configured.items():
        p = auth.principal(name)
        assert p is not None
        out.append(_info(p, source, digest in stored.revoked, revoked_at=at.get(digest, "")))
    # Every stored entry, as apply_stored takes it or says why not: one listed live must
    # work, and one a DELETE removes must be listed.
    for name, spec in sorted(stored.keys.items()):
        try:
            k = stored_key(name, spec)
        except ValueError as exc:
            nothing = Principal(name=name, models=())
            out.append(_info(nothing, "runtime", False, skipped=f"unreadable: {exc}"))
            continue
        p = key_principal(name, k, auth.limits)
        skipped = CONFIGURED_HERE if name in auth.configured else ""
        revoked = k.sha256 in stored.revoked
        made, gone = stored.created.get(name, ""), at.get(k.sha256, "")
        out.append(
            _info(p, "runtime", revoked, skipped, created_at=made, revoked_at=gone, k=k, now=now)
        )
    return JSONResponse(KeyList(out))


document(
    Operation(
        "get",
        "/api/v1/keys",
        "Every API key: name, source, models, admin, limits, revoked, expiry (admin)",
        tag="admin",
        response=KeyList,
        admin=True,
        errors=(401, 403, 503),
    ),
    Operation(
        "post",
        "/api/v1/keys",
        "Make a runtime API key; the answer holds the key, shown this once (admin)",
        tag="admin",
        request=CreateKey,
        response=KeyCreated,
        admin=True,
        errors=(400, 401, 403, 409, 413, 415, 503),
    ),
    Operation(
        "delete",
        "/api/v1/keys/{name}",
        "Revoke an API key, configured or runtime, on every replica (admin)",
        tag="admin",
        description=(
            "With purge=true, a runtime key's stored entry is dropped too, with the "
            "revocations of its secrets (a live key stops working all the same: nothing "
            "holds them any more), so that its name may be used again, with its limit buckets "
            "(a new key of the name starts with full limits); its secrets stay refused, "
            "its usage rows stay."
        ),
        response=KeyRevoked,
        admin=True,
        params=("name",),
        query=(
            (
                "purge",
                "true: drop a runtime key's stored entry too (default false)",
                # The server takes the words true and false alone (400 for any other).
                {"type": "boolean", "default": False},
            ),
        ),
        errors=(400, 401, 403, 404, 409, 503),
    ),
)

routes = [
    Route("/api/v1/keys", list_keys, methods=["GET"]),
    Route("/api/v1/keys", create_key, methods=["POST"]),
    Route("/api/v1/keys/{name:path}", revoke_key, methods=["DELETE"]),
]
