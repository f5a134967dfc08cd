"""Admin routes that change a runtime key in place: update its settings, rotate its secret.

As a revocation (api/keys.py): planned on the store's keys, written only while they are
still as read, applied here once the store took it, and on the other replicas when they
next see the routing version move.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella import key_plans
from stella.api.http import NO_STORE, JSONResponse, decode, endpoint, read_body, services, shown_cut
from stella.api.keys import (
    MAX_KEY_MODELS,
    ExpiresIn,
    ModelPattern,
    _info,
    _shared_keys,
    check_models,
    write_key_change,
)
from stella.api.native import admin_event
from stella.api.openapi import Operation, document
from stella.auth import StoredKey, expired, hash_key, key_principal, key_spec, new_key
from stella.core import Call
from stella.errors import Conflict, InvalidRequest
from stella.protocol import KeyCreated, KeyInfo
from stella.settings import Count, UsdPerDay
from stella.state import KeyChange, StoredKeys, utc_stamp

if TYPE_CHECKING:  # stella.app imports this module
    from stella.app import Services

# The longest a rotated key's old secret may keep working: a week is time enough to
# roll a new secret out, and short enough that a leaked one does not linger.
MAX_GRACE_S = 7 * 86400


class UpdateKey(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH /api/v1/keys/{name}: the fields to change; one absent stays as it is."""

    models: Annotated[list[ModelPattern], Meta(max_length=MAX_KEY_MODELS)] | UnsetType = UNSET
    admin: bool | UnsetType = UNSET
    requests_per_minute: Count | UnsetType = UNSET
    tokens_per_minute: Count | UnsetType = UNSET
    max_concurrent: Count | UnsetType = UNSET
    requests_per_day: Count | UnsetType = UNSET
    tokens_per_day: Count | UnsetType = UNSET
    usd_per_day: UsdPerDay | UnsetType = UNSET
    # Seconds from now; null: it never expires.
    expires_in_s: ExpiresIn | UnsetType | None = UNSET


class RotateKey(msgspec.Struct, forbid_unknown_fields=True):
    """POST /api/v1/keys/{name}/rotate (the body may be left out): how long the old
    secret keeps working (0: it stops at once)."""

    grace_s: Annotated[float, Meta(ge=0, le=MAX_GRACE_S)] = 0.0


# As the schema shows it: `{}` changes nothing, and is refused (400).
UpdateKeyBody = Annotated[UpdateKey, Meta(extra_json_schema={"minProperties": 1})]
_update = msgspec.json.Decoder(UpdateKey)
_rotate = msgspec.json.Decoder(RotateKey)


def _shown(svc: Services, name: str, k: StoredKey, stored: StoredKeys, now: float) -> KeyInfo:
    """Runtime key `name` as the list shows it, once changed into `k`."""
    p = key_principal(name, k, svc.auth.limits)
    return _info(p, "runtime", False, created_at=stored.created.get(name, ""), k=k, now=now)


@endpoint(auth="admin")
async def update_key(request: Request, call: Call) -> Response:
    """PATCH /api/v1/keys/{name}: change a runtime key's models, admin flag, limits,
    daily budget or expiry; its secret stays."""
    svc = services(request)
    name = request.path_params["name"]
    shown = shown_cut(name)
    with admin_event("update", shown, call, "key_change", source="runtime") as logged:
        _shared_keys(svc)
        body = await read_body(request, svc.settings.server.max_body_bytes)
        spec = decode(body, UpdateKey, _update)
        fields = {f: v for f in spec.__struct_fields__ if (v := getattr(spec, f)) is not UNSET}
        if not fields:
            raise InvalidRequest(
                "nothing to change: give one or more of " + ", ".join(UpdateKey.__struct_fields__)
            )
        if "models" in fields:
            check_models(fields["models"])
        logged["fields"] = sorted(fields)
        life = fields.pop("expires_in_s", UNSET)

        def plan(stored: StoredKeys, now: float) -> tuple[KeyChange, StoredKey]:
            k = key_plans.runtime_key(svc.auth, name, stored, shown)
            new = msgspec.structs.replace(k, **fields)
            if k.previous and k.previous_until <= now:
                # A grace that has ended: the entry is written as an older replica (one
                # without rotations) reads it, as it was before the rotation.
                new = msgspec.structs.replace(new, previous="", previous_until=0.0)
            if life is not UNSET:
                new = msgspec.structs.replace(new, expires_at=now + life if life else 0.0)
            key_plans.keep_an_admin(svc.auth, stored, shown, k, new)
            return KeyChange({}, put={name: key_spec(new)}), new

        stored, k, now = await write_key_change(svc, plan)
    return JSONResponse(_shown(svc, name, k, stored, now), headers=[NO_STORE])


@endpoint(auth="admin")
async def rotate_key(request: Request, call: Call) -> Response:
    """POST /api/v1/keys/{name}/rotate: a new secret for a runtime key (201, shown this
    once), its settings kept; the old one works `grace_s` more seconds."""
    svc = services(request)
    name = request.path_params["name"]
    shown = shown_cut(name)
    with admin_event("rotate", shown, call, "key_change", source="runtime") as logged:
        _shared_keys(svc)
        body = await read_body(request, svc.settings.server.max_body_bytes)
        # No body: no grace, as `{}`.
        grace = decode(body, RotateKey, _rotate).grace_s if body.strip() else 0.0
        logged["grace_s"] = grace
        key = new_key()

        def plan(stored: StoredKeys, now: float) -> tuple[KeyChange, StoredKey]:
            k = key_plans.runtime_key(svc.auth, name, stored, shown)
            if expired(k, now):
                raise Conflict(
                    f"key {shown!r} expired at {utc_stamp(k.expires_at)}: give it a new "
                    "expiry first (PATCH expires_in_s), or make a new key"
                )
            # The entry, rewritten, is what stops the secret it no longer holds (the old
            # one without a grace, or one still in its grace from an earlier rotation:
            # one old secret at a time), on every replica as it reads it: a secret is
            # taken from a stored entry or the config alone, and no other entry holds
            # it. So nothing is revoked: a revocation of it would refuse nothing, and
            # stay in the store for good (see key_plans.purge).
            # A grace that ends before the write can land (one under the clock's
            # resolution, as 1e-320, adds nothing to `now`) is none: stored, it would
            # keep an old secret already expired, in an entry an older replica skips.
            until = now + grace
            previous, previous_until = (k.sha256, until) if until > now else ("", 0.0)
            new = msgspec.structs.replace(
                k, sha256=hash_key(key), previous=previous, previous_until=previous_until
            )
            return KeyChange({}, put={name: key_spec(new)}), new

        stored, k, now = await write_key_change(svc, plan)
    info = _shown(svc, name, k, stored, now)
    # The new key itself, shown this once: no cache may keep it.
    created = KeyCreated(**msgspec.structs.asdict(info), key=key)
    return JSONResponse(created, status_code=201, headers=[NO_STORE])


document(
    Operation(
        "patch",
        "/api/v1/keys/{name}",
        "Change a runtime API key's models, admin flag, limits, budget or expiry; its secret "
        "stays (admin)",
        tag="admin",
        request=UpdateKeyBody,
        response=KeyInfo,
        admin=True,
        params=("name",),
        errors=(400, 401, 403, 404, 409, 413, 415, 503),
    ),
    Operation(
        "post",
        "/api/v1/keys/{name}/rotate",
        "Give a runtime API key a new secret, shown this once; the old one works grace_s "
        "more seconds (admin)",
        tag="admin",
        request=RotateKey,
        request_optional=True,
        response=KeyCreated,
        admin=True,
        params=("name",),
        errors=(400, 401, 403, 404, 409, 413, 415, 503),
    ),
)

routes = [
    Route("/api/v1/keys/{name:path}/rotate", rotate_key, methods=["POST"]),
    Route("/api/v1/keys/{name:path}", update_key, methods=["PATCH"]),
]
