"""What a runtime key's update, rotation or purge changes in the state store.

Each is planned on one read of the stored keys and written only while they are still as
read (StateStore.change_keys), as a revocation is (Authenticator.revocation): two
replicas changing the last two admin keys at once can't both pass.
"""

from __future__ import annotations

import dataclasses

from stella.auth import Authenticator, StoredKey, stored_key
from stella.errors import Conflict, NotFound
from stella.state import KeyChange, StoredKeys, key_configured, key_not_found, last_admin


def configured_where(auth: Authenticator, source: str) -> str:
    """Where a configured key of `source` ("config" or "env") is defined: its table, or
    the variable."""
    return "auth.keys" if source == "config" else auth.keys_env


def runtime_key(auth: Authenticator, name: str, stored: StoredKeys, shown: str) -> StoredKey:
    """The stored runtime key `name` an update or a rotation changes: Conflict for a key
    the configuration defines, a revoked one or an entry no replica of this version can
    read; NotFound for no such key. `shown` is the name as messages quote it."""
    if name in auth.configured:
        raise Conflict(key_configured(shown, configured_where(auth, auth.configured[name][1])))
    spec = stored.keys.get(name)
    if spec is None:
        raise NotFound(key_not_found(shown))
    try:
        k = stored_key(name, spec)
    except ValueError as exc:
        raise Conflict(
            f"the stored entry of key {shown!r} can't be read ({exc}); a DELETE removes it"
        ) from None
    if k.sha256 in stored.revoked:
        raise Conflict(
            f"key {shown!r} is revoked: a revoked key stays so; make a new key (a DELETE "
            "with ?purge=true frees its name)"
        )
    return k


def keep_an_admin(
    auth: Authenticator, stored: StoredKeys, shown: str, before: StoredKey, after: StoredKey
) -> None:
    """Conflict when changing runtime key `before` into `after` leaves no admin key that
    is not revoked and never expires (see state.last_admin)."""
    lasting = auth.admins(stored) - stored.revoked.keys()
    if lasting == {before.sha256} and not (after.admin and not after.expires_at):
        change = "given an expiry" if after.admin else "no longer an admin"
        raise Conflict(last_admin(shown, change))


@dataclasses.dataclass(frozen=True, slots=True)
class Purge:
    """What DELETE /api/v1/keys/{name}?purge=true changes: the store's change; whether it
    revoked the key too (it was not revoked yet); why the entry could not be read ("")."""

    change: KeyChange
    revoked: bool
    unreadable: str = ""


def purge(auth: Authenticator, name: str, stored: StoredKeys, shown: str) -> Purge:
    """Drop runtime key `name`'s stored entry, so that its name is free, and with it the
    revocations of its secrets (its key's and the one a rotation replaced): a purged
    key never works again, as nothing holds its secrets any more. Conflict for a
    configured key, or for the last admin key (as a revocation); NotFound for no stored
    entry of the name."""
    if name in auth.configured:
        raise Conflict(
            f"key {shown!r} is defined in the configuration "
            f"({configured_where(auth, auth.configured[name][1])}): a purge drops a runtime key's stored entry; "
            "revoke it (DELETE without purge) and take it out of the configuration"
        )
    spec = stored.keys.get(name)
    if spec is None:
        raise NotFound(key_not_found(shown))
    try:
        k = stored_key(name, spec)
    except ValueError:
        # As a DELETE removes one: its digest revoked, should it have one.
        plan = auth.revocation(name, stored, shown)
        return Purge(plan.change, False, plan.unreadable)
    live = k.sha256 not in stored.revoked
    if live and auth.admins(stored) - stored.revoked.keys() == {k.sha256}:
        raise Conflict(last_admin(shown))
    # A secret is taken by its digest from a stored entry or the config alone. The entry
    # goes, in the same step as its revocations (a replica reads both gone together, or
    # neither): no entry holds its secrets after it (a new key gets a new one), so
    # their revocations would refuse nothing, for good, and every replica would read
    # them at each key change. Kept: a digest this replica's config holds (the config
    # still has the secret), and one revoked under another name (another key holding
    # the same secret was revoked, which is not this purge's to take back). Should
    # another replica's config hold the secret too (a runtime key's copied there by
    # hand), it takes that key again, and says so (stored_keys_lost).
    drop = tuple(
        d
        for d in dict.fromkeys((k.sha256, k.previous))
        if d and stored.revoked.get(d) == name and d not in auth.digests
    )
    return Purge(KeyChange({}, (name,), unrevoke=drop), live)
