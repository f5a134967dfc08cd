"""Admin routes for API keys: revoke one.

A change is written to the state store first and, once it took it, applied to this
process's key table; the other replicas apply it when they next see the routing
version move (see app._follow_routing), so `authenticate` stays a dict lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stella.api.http import JSONResponse, endpoint, services
from stella.api.native import admin_event, shared_state
from stella.api.openapi import Operation, document
from stella.core import Call
from stella.protocol import KeyRevoked

if TYPE_CHECKING:  # stella.app imports this module
    from stella.app import Services


def _shared_keys(svc: Services) -> None:
    shared_state(svc, "a key change", "change the keys in the config file")


@endpoint(auth="admin")
async def revoke_key(request: Request, call: Call) -> Response:
    """DELETE /api/v1/keys/{name}: revoke a key, runtime or configured."""
    svc = services(request)
    auth = svc.auth
    name = request.path_params["name"]
    with admin_event("revoke", name, call, "key_change", source=None) as logged:
        _shared_keys(svc)
        configured = auth.configured_key(name)
        # The store decides (a runtime key another replica made may not be here yet),
        # and refuses the last admin key there, with the write: two revocations at once
        # on two replicas can't both pass.
        stored = await svc.state.revoke_key(name, configured, auth.configured_admins())
        keys, revoked = dict(auth.runtime_specs), dict(auth.revoked)
        if stored == "runtime":
            source = "runtime"
            revoked[name] = auth.runtime[name][0] if name in auth.runtime else ""
        else:
            assert configured is not None  # the store revokes a configured key only so
            source = auth.configured[name][1]
            revoked[name] = configured.digest
        if not revoked[name]:
            revoked.pop(name)  # not here yet: the follower brings it, revoked
        auth.apply_stored(keys, revoked)
        auth.local_changes += 1  # a follower's read from before this write is stale now
        logged["source"] = source
    detail = ""
    if source != "runtime":
        where = "auth.keys" if source == "config" else svc.settings.auth.keys_env
        detail = (
            f"the key is refused from now on, though {where} still lists it; take it out "
            "there too (a new key under this name is not refused)"
        )
    return JSONResponse(KeyRevoked(name, source, detail=detail))  # type: ignore[arg-type]


document(
    Operation(
        "delete",
        "/api/v1/keys/{name}",
        "Revoke an API key, configured or runtime, on every replica (admin)",
        tag="admin",
        response=KeyRevoked,
        admin=True,
        params=("name",),
        errors=(401, 403, 404, 409, 503),
    ),
)

routes = [
    Route("/api/v1/keys/{name:path}", revoke_key, methods=["DELETE"]),
]
