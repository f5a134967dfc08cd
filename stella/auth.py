"""API keys: stored as SHA-256 digests, each with a name, model scopes and limits."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
import structlog
from msgspec import Meta

from stella.backends import ConfigError
from stella.core import ANONYMOUS, Call, Principal
from stella.errors import Conflict, Forbidden, NotFound, Unauthorized
from stella.settings import KeySettings, LimitsSettings, Settings, origin
from stella.state import (
    KeyChange,
    StoredKeys,
    Unreadable,
    key_not_found,
    key_revoked,
    last_admin,
    utc_stamp,
)

_log = structlog.get_logger("stella")

# At most this many `auth_failed` events a second in a process: a flood of bad keys
# must not flood the logs (nor fill the writers' backlog and push other lines out).
AUTH_FAILED_PER_S = 10
# A refused request's path is cut to this many characters in its event (a request line
# may be 64 KiB).
AUTH_FAILED_PATH = 256

KEY_NAME_RULE = "a key name may not be empty or hold '|' or control characters"
# Why a replica skips a stored runtime key: its config has a key of that name (which
# another replica's config lacks), and logs, usage rows and limits go by name.
CONFIGURED_HERE = "a configured key of this replica has this name"


def is_key_name(name: str) -> bool:
    """Whether `name` may name a key in the config (see KEY_NAME_RULE)."""
    # Names go into log lines and Redis usage fields ("name|model|count").
    return bool(name) and "|" not in name and name.isprintable()


def is_digest(text: str) -> bool:
    """Whether `text` is a SHA-256 hex digest as stored (64 lower-case hex digits)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


Instant = Annotated[float, Meta(ge=0)]


class StoredKey(KeySettings, kw_only=True):
    """A runtime key as the state store keeps it: what an [auth.keys.NAME] table takes,
    when it expires, and the secret a rotation replaced while that still works."""

    # Seconds since the epoch on the store's clock (as every replica compares it); 0:
    # never. A configured key has none.
    expires_at: Instant = 0.0
    # The digest of the secret the last rotation replaced, and when that stops working
    # ("", 0: none). Revoked with the key, and by the next rotation.
    previous: str = ""
    previous_until: Instant = 0.0


# The fields an entry holds only when set: one without them reads as it did before
# they were kept (a replica of an earlier version takes it; one with them, it skips, as
# its KeySettings forbids a field it does not know): a daily budget, an expiry, a
# rotation's grace.
_OPTIONAL_FIELDS = ("usd_per_day", "expires_at", "previous", "previous_until")


def key_spec(k: StoredKey) -> dict[str, Any]:
    """A runtime key's entry as the state store keeps it."""
    spec: dict[str, Any] = msgspec.to_builtins(k)
    for field in _OPTIONAL_FIELDS:
        if not spec[field]:
            del spec[field]
    return spec


def stored_key(name: str, spec: Any) -> StoredKey:
    """A stored runtime key's settings as every replica reads them; ValueError saying why
    when this version can't (not JSON, a field it does not know, not a key name and a
    SHA-256 hex digest)."""
    if isinstance(spec, Unreadable):
        raise ValueError(spec.reason)
    try:
        k = msgspec.convert(spec, StoredKey)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    if not is_digest(k.sha256) or not is_key_name(name):
        raise ValueError("not a key name and a SHA-256 hex digest")
    if k.previous and not is_digest(k.previous):
        raise ValueError("previous: not a SHA-256 hex digest")
    return k


def grace_end(k: StoredKey) -> float:
    """When the secret runtime key `k`'s last rotation replaced stops working: at the end
    of its grace, or with the key, if that expires sooner."""
    return min(k.previous_until, k.expires_at or k.previous_until)


def expired(k: StoredKey, now: float) -> bool:
    """Whether runtime key `k` has expired at `now` (on the store's clock)."""
    return bool(k.expires_at) and now >= k.expires_at


@dataclasses.dataclass(frozen=True, slots=True)
class Revocation:
    """What DELETE /api/v1/keys/{name} changes: the store's change, the sources of the
    keys it revokes (this process's configured key first), and why a stored entry it
    removes could not be read ("" for none)."""

    change: KeyChange
    sources: list[str]
    unreadable: str = ""


def key_principal(name: str, k: KeySettings, lim: LimitsSettings) -> Principal:
    """The Principal of key `name` as its settings (a config table or a runtime key's)
    say, each limit left at 0 taking [limits]' default."""
    return Principal(
        name=name,
        admin=k.admin,
        # An empty list is no model (a key for the admin routes only), never all.
        models=tuple(k.models),
        requests_per_minute=k.requests_per_minute or lim.requests_per_minute,
        tokens_per_minute=k.tokens_per_minute or lim.tokens_per_minute,
        max_concurrent=k.max_concurrent or lim.max_concurrent,
        requests_per_day=k.requests_per_day or lim.requests_per_day,
        tokens_per_day=k.tokens_per_day or lim.tokens_per_day,
        usd_per_day=k.usd_per_day or lim.usd_per_day,
        expires_at=k.expires_at if isinstance(k, StoredKey) else 0.0,
    )


# Runtime keys made into the table at a time (see Authenticator.build): some 7 ms.
KEYS_APPLY_PART = 1_000


@dataclasses.dataclass(slots=True)
class StoredTable:
    """A table of the stored keys being made (see Authenticator.build): what it was made
    of, and what it has so far."""

    keys: dict[str, Any]
    revoked: dict[str, str]
    table: dict[str, Principal] = dataclasses.field(default_factory=dict)
    runtime: dict[str, tuple[str, Principal]] = dataclasses.field(default_factory=dict)
    previous: dict[str, Principal] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest stored in the config instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "sk-stella-" + secrets.token_urlsafe(24)


class Authenticator:
    """Maps a request's key to its Principal; with no keys configured, everyone is anonymous."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        lim = self.limits = settings.limits
        # The table `authenticate` reads: the configured keys and the runtime ones, less
        # the revoked; made anew (and swapped whole) when the stored keys change.
        self.keys: dict[str, Principal] = {}
        # The keys of the config and STELLA_API_KEYS by name: (digest, source).
        self.configured: dict[str, tuple[str, str]] = {}
        self._configured: dict[str, Principal] = {}  # by digest
        for name, k in settings.auth.keys.items():
            if not is_key_name(name):
                raise ConfigError(f"auth.keys.{name!r}: {KEY_NAME_RULE}")
            digest = k.sha256.strip().lower()
            if not is_digest(digest):
                raise ConfigError(f"auth.keys.{name}.sha256: not a SHA-256 hex digest")
            self._add(digest, f"auth.keys.{name}", "config", key_principal(name, k, lim))
        # Quick start: STELLA_API_KEYS="key1,key2" or "alice=key1,bob=key2": admin keys.
        source = self.keys_env = settings.auth.keys_env
        for name, key in env_keys(environ.get(source, ""), source):
            principal = key_principal(name, KeySettings(sha256="", admin=True), lim)
            self._add(hash_key(key), f"{source} key {name!r}", "env", principal)
        self.keys = dict(self._configured)
        # The configured keys' digests: their revocations are read with the stored keys.
        self.digests = frozenset(self._configured)
        self.enabled = bool(self.keys)
        # What the state store holds (see apply_stored): runtime keys by name, as
        # (digest, Principal), and revocations, digest -> the name revoked under.
        self.runtime: dict[str, tuple[str, Principal]] = {}
        self.runtime_specs: dict[str, Any] = {}  # as stored, for a change applied here
        self.revoked: dict[str, str] = {}
        # The secrets rotations replaced that are in the table (working out their grace):
        # digest -> the key's name, for the refusal's message once they stop.
        self.rotated: dict[str, str] = {}
        # Now on the state store's clock, which expiries are on (the app gives it the
        # store's; this process's until then).
        self.wall: Callable[[], float] = time.time
        # Key changes this process wrote (see app._follow_routing): a follower's read
        # from before one is stale.
        self.local_changes = 0
        # Tables installed (see install): a change of this process applied after a
        # table was installed from a read made since its write has nothing to add.
        self.installs = 0
        # When (monotonic) the table installed last was read from the store (0: never).
        self.read_at = 0.0
        # The count of changes of the store's last read applied (StoredKeys.changes): a
        # read that counts fewer is of a store that went back (see apply_stored).
        self.changes = 0
        # Whether a read of the store's keys was applied (until then the configured keys
        # alone count, none revoked), and why the last read failed ("": it did not),
        # for /ready.
        self.stored_read = False
        self.stored_error = ""
        host = settings.server.host
        # With no keys, a loopback server's caller is its operator; on a network
        # (auth.allow_anonymous) anyone may call, so nobody gets the admin routes.
        self.anonymous = (
            Principal(
                name="anonymous",
                admin=is_loopback(host),
                requests_per_minute=lim.requests_per_minute,
                tokens_per_minute=lim.tokens_per_minute,
                max_concurrent=lim.max_concurrent,
                requests_per_day=lim.requests_per_day,
                tokens_per_day=lim.tokens_per_day,
                usd_per_day=lim.usd_per_day,
            )
            if (
                lim.requests_per_minute
                or lim.tokens_per_minute
                or lim.max_concurrent
                or lim.requests_per_day
                or lim.tokens_per_day
                or lim.usd_per_day
            )
            or not is_loopback(host)
            else ANONYMOUS
        )
        self.allow_anonymous = settings.auth.allow_anonymous
        # Anonymous callers on a network address (a server bound by another name than
        # server.host, as `uvicorn --host`): never admins, and refused without
        # auth.allow_anonymous. Found per local address, once: NETWORK, TCP_LOOPBACK or
        # LOCAL_SOCKET.
        self._local: dict[tuple[Any, ...] | None, int] = {}
        # The loopback rule trusts the machine, not every page its browser opens: a
        # trusted call must name this machine in its Host (a page that rebinds its own
        # name to 127.0.0.1 sends that name) and come from no other site's page.
        self.guard_browsers = self.anonymous.admin
        # This machine's own name too (`curl http://$(hostname):8000`): a page can rebind
        # only a name whose DNS its site controls.
        hosts = [
            *settings.server.allowed_hosts,
            urlsplit(settings.server.public_url).hostname,
            socket.gethostname(),
        ]
        self.hosts = frozenset(_config_host(h) for h in hosts if h)
        origins = settings.cors.allowed_origins
        self.any_origin = "*" in origins
        self.origins = frozenset(map(origin, origins))
        self._host_ok: dict[bytes, bool] = {}  # Host header -> trusted; a handful per server
        self.network_anonymous = dataclasses.replace(self.anonymous, admin=False)
        # The `auth_failed` events' budget (see failed): the second it counts from, the
        # events written in it, and those left out since the last one written.
        self._second = 0.0
        self._written = 0
        self._suppressed = 0
        if not self.enabled and not settings.auth.allow_anonymous and not is_loopback(host):
            raise ConfigError(
                f"auth: no API keys configured and server.host={host!r} is not loopback; "
                "set keys (STELLA_API_KEYS or [auth.keys]) or auth.allow_anonymous = true"
            )

    def _add(self, digest: str, where: str, source: str, principal: Principal) -> None:
        """Register a key; ConfigError when its name or the key itself is taken already."""
        # Logs, usage rows and limit buckets go by name: two keys under one name could
        # not be told apart (nor limited apart), and one key twice would take one
        # name's scopes and limits at random.
        name = principal.name
        if name in self.configured:
            raise ConfigError(f"{where}: the key name {name!r} is used twice")
        if digest in self._configured:
            raise ConfigError(f"{where}: the same key as {self._configured[digest].name!r}")
        self.configured[name] = (digest, source)
        self._configured[digest] = principal

    def principal(self, name: str) -> Principal | None:
        """The configured or else runtime key named `name` (revoked or not)."""
        if name in self.configured:
            return self._configured[self.configured[name][0]]
        if name in self.runtime:
            return self.runtime[name][1]
        return None

    def revocation(self, name: str, stored: StoredKeys, shown: str) -> Revocation:
        """What revoking key `name` changes in a store holding `stored`: every key this
        process knows by that name, its configured key and the stored runtime key (both,
        when another replica's config lacks the name and made a runtime key of it), each
        by its digest; a stored entry no replica of this version can read is removed
        (its digest revoked, should it have one: a replica that reads it would take it).
        NotFound for no such key or all revoked already, Conflict when no admin key
        would be left; `shown` is the name as messages quote it."""
        revoke: dict[str, str] = {}  # digest -> source
        admin = self.admins(stored)
        if name in self.configured:
            digest, source = self.configured[name]
            revoke[digest] = source
        unreadable = ""
        for other, spec in stored.keys.items():
            try:
                k = stored_key(other, spec)
            except ValueError as exc:
                if other == name:
                    unreadable = str(exc)
                    sha = spec.get("sha256") if isinstance(spec, dict) else None
                    if isinstance(sha, str) and is_digest(sha):
                        revoke.setdefault(sha, "runtime")
                continue  # no replica of this version takes it: no admin of theirs
            if other == name:
                revoke.setdefault(k.sha256, "runtime")
                if k.previous:  # the secret a rotation replaced, still in its grace
                    revoke.setdefault(k.previous, "runtime")
        if not revoke and not unreadable:
            raise NotFound(key_not_found(shown))
        new = {d: s for d, s in revoke.items() if d not in stored.revoked}
        if not new and not unreadable:
            raise NotFound(key_revoked(shown))
        if admin & new.keys() and not admin - stored.revoked.keys() - new.keys():
            raise Conflict(last_admin(shown))
        sources = list(dict.fromkeys(new.values())) or ["runtime"]
        remove = (name,) if unreadable else ()
        return Revocation(KeyChange(dict.fromkeys(new, name), remove), sources, unreadable)

    def admins(self, stored: StoredKeys) -> set[str]:
        """The digests of the admin keys that never expire, configured and stored (one
        no replica of this version reads is none), revoked ones too: the last of them,
        not revoked, stays (see state.last_admin)."""
        admin = {d for d, p in self._configured.items() if p.admin}
        for name, spec in stored.keys.items():
            try:
                k = stored_key(name, spec)
            except ValueError:
                continue
            if k.admin and not k.expires_at:
                admin.add(k.sha256)
        return admin

    def apply_stored(
        self, keys: dict[str, Any], revoked: dict[str, str], changes: int | None = None
    ) -> list[str]:
        """Make the table `authenticate` reads what the store holds: the configured keys
        and `keys` (runtime keys by name), less every key whose digest is `revoked`,
        whatever its name now. `changes`: the store's count when read (StoredKeys), None
        for a change of this process applied as written. Returns why any stored entry
        was left out; warns (`stored_keys_lost`) when revocations or runtime keys
        applied before are gone from the store (a Redis that restarted empty), which no
        change through the API does. In one step: see `build` for many keys."""
        built = self._start(keys, revoked)
        self._build_part(built, list(keys.items()))
        return self.install(built, changes)

    async def build(self, keys: dict[str, Any], revoked: dict[str, str]) -> StoredTable:
        """The table `apply_stored` would make of `keys` and `revoked`, made KEYS_APPLY_PART
        entries at a time, the event loop running other calls between parts (some 7 µs
        an entry: 100,000 keys took 0.7 s in one go); the table in use meanwhile is the
        one before, until `install`."""
        built = self._start(keys, revoked)
        entries = list(keys.items())
        for start in range(0, len(entries), KEYS_APPLY_PART):
            if start:
                await asyncio.sleep(0)
            self._build_part(built, entries[start : start + KEYS_APPLY_PART])
        return built

    def _start(self, keys: dict[str, Any], revoked: dict[str, str]) -> StoredTable:
        """A table of `keys` begun: the configured keys not `revoked` in it, first."""
        table = {d: p for d, p in self._configured.items() if d not in revoked}
        return StoredTable(keys, revoked, table)

    def _build_part(self, built: StoredTable, entries: list[tuple[str, Any]]) -> None:
        """Add `entries` (runtime keys, in the store's order) to `built`."""
        revoked, table = built.revoked, built.table
        for name, spec in entries:
            try:
                k = stored_key(name, spec)
            except ValueError as exc:
                built.skipped.append(f"key {name!r}: {exc}")
                continue
            if name in self.configured:  # the configured one counts here
                built.skipped.append(f"key {name!r}: {CONFIGURED_HERE}")
                continue
            p = key_principal(name, k, self.limits)
            built.runtime[name] = (k.sha256, p)
            # After the configured keys, in the store's order: the first to hold a
            # digest has it (the previous secrets come after them all, in install).
            if k.sha256 not in revoked and k.sha256 not in table:
                table[k.sha256] = p
            if k.previous and k.previous_until:
                # Its own Principal, made here and not per call: the same key, whose
                # old secret stops at the end of its grace (or with the key, if sooner).
                built.previous[k.previous] = dataclasses.replace(p, expires_at=grace_end(k))

    def install(self, built: StoredTable, changes: int | None = None) -> list[str]:
        """Make `built` (see build) the table `authenticate` reads, swapped whole; as
        apply_stored says."""
        keys, revoked, runtime, table = built.keys, built.revoked, built.runtime, built.table
        skipped = built.skipped
        for digest, name in revoked.items():
            if not is_digest(digest):
                skipped.append(f"revocation {digest[:80]!r} ({name!r}): not a SHA-256 digest")
        for digest, p in built.previous.items():
            if digest not in revoked and digest not in table:
                table[digest] = p
        # A revocation is never taken back while a key holding it works: one gone whose
        # key works again is the store's loss. A purge removes an entry, and the
        # revocations of its secrets go from what is read with it (only the stored
        # entries' and the configured keys' are read), as a store's loss takes them: the
        # two are told apart by the store's count of changes, which went back with the
        # loss (restarted empty, restored from a snapshot) and moved on with the purge.
        went_back = changes is not None and changes < self.changes
        lost_revoked = [
            n for d, n in self.revoked.items() if d not in revoked and (went_back or d in table)
        ]
        lost_keys = []
        if went_back:
            lost_keys = [
                n for n, (d, _) in self.runtime.items() if n not in keys and d not in revoked
            ]
        if changes is not None:  # a table read from the store, not one made from this one
            self.changes = changes
            self.stored_read, self.stored_error = True, ""
            self.read_at = time.monotonic()
        if lost_revoked or lost_keys:
            _log.warning(
                "stored_keys_lost",
                revocations=len(lost_revoked),
                runtime_keys=len(lost_keys),
                names=sorted({*lost_revoked, *lost_keys})[:20],
            )
        # Swapped whole: a request reads the old table or the new one, never half of each.
        self.runtime, self.runtime_specs = runtime, dict(keys)
        self.revoked, self.keys = dict(revoked), table
        self.rotated = {d: p.name for d, p in built.previous.items() if d in table}
        self.installs += 1
        return skipped

    def authenticate(
        self,
        headers: Iterable[tuple[bytes, bytes]],
        call: Call | None = None,
        server: Any = None,
    ) -> Principal:
        """The caller's Principal from raw ASGI headers; Unauthorized when the key is wrong.
        With `call`, the key presented is kept on it (see Call.secret). `server` is the
        ASGI scope's (local address, port): without keys, what a caller may do depends
        on whether it came in on a loopback address."""
        if not self.enabled:
            # The listening address: a handful per server, so each is judged once.
            key = tuple(server) if server else None
            kind = self._local.get(key)
            if kind is None:
                # A Unix socket is local: no server at all, or (its path, None) as
                # uvicorn gives it.
                local, port = key or ("", None)
                kind = (
                    LOCAL_SOCKET
                    if not local or (port is None and _ip(local) is None)
                    else TCP_LOOPBACK
                    if is_loopback(local)
                    else NETWORK
                )
                if len(self._local) < 256:
                    self._local[key] = kind
            if kind:
                if self.guard_browsers:
                    self._check_browser(headers, kind == TCP_LOOPBACK)
                return self.anonymous
            if not self.allow_anonymous:
                raise Unauthorized(
                    "this server has no API keys and takes anonymous calls on loopback only; "
                    "set keys (STELLA_API_KEYS) or auth.allow_anonymous",
                    reason="missing",
                )
            return self.network_anonymous
        token = _token(headers)
        if not token:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'",
                reason="missing",
            )
        digest = hashlib.sha256(token).hexdigest()
        principal = self.keys.get(digest)
        if principal is None:
            raise Unauthorized("invalid API key")
        # A float compare for a key that expires, nothing more: the table holds the
        # expiry, so no call asks the store.
        if principal.expires_at and self.wall() >= principal.expires_at:
            raise self._expired(digest, principal)
        if call is not None:
            call.secret = token.decode("latin-1")
        return principal

    def _expired(self, digest: str, principal: Principal) -> Unauthorized:
        """The 401 for a key past its expiry (or an old secret past its grace): says so
        and when, of this key alone."""
        when = utc_stamp(principal.expires_at)
        why = " (a rotation replaced it)" if digest in self.rotated else ""
        return Unauthorized(f"API key expired at {when}{why}", reason="expired", key=principal.name)

    def failed(
        self,
        exc: Unauthorized | Forbidden,
        scope: Mapping[str, Any],
        request_id: str,
        principal: Principal | None = None,
    ) -> None:
        """Log a refused call as an `auth_failed` warning (never its key, nor any part of
        it), at most AUTH_FAILED_PER_S a second; the next one written says how many were
        left out (`suppressed`)."""
        now = time.monotonic()
        if now - self._second >= 1.0:
            self._second, self._written = now, 0
        if self._written >= AUTH_FAILED_PER_S:
            self._suppressed += 1
            return
        self._written += 1
        client = scope.get("client")
        event: dict[str, Any] = {
            "reason": exc.reason,
            "method": scope.get("method"),
            "path": scope.get("path", "")[:AUTH_FAILED_PATH],
            "client": client[0] if client else None,
            "request_id": request_id,
        }
        if principal is not None:  # the key was right, its scope was not: its name
            event["key"] = principal.name
        elif isinstance(exc, Unauthorized) and exc.key:  # a known key, expired
            event["key"] = exc.key
        if self._suppressed:
            event["suppressed"], self._suppressed = self._suppressed, 0
        _log.warning("auth_failed", **event)

    def _check_browser(self, headers: Iterable[tuple[bytes, bytes]], tcp: bool) -> None:
        """Forbidden for a trusted (loopback, key-less) call a web page may have made:
        a Host that is not this machine's name, or another site's Origin."""
        host = origin = None
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        # Over a Unix socket (or in-process) the Host is whatever the client made up
        # ("http://x"), and no browser reaches one unproxied: only the Origin counts.
        if tcp and host is not None:
            ok = self._host_ok.get(host)
            if ok is None:
                hostname = host_name(host.decode("latin-1"))
                # Any address written out (0.0.0.0, a LAN address) is as safe: rebinding
                # needs a name, and a page served from an address is that server's own.
                ok = (
                    is_loopback_name(hostname)
                    or hostname in self.hosts
                    or _ip(hostname) is not None
                )
                if len(self._host_ok) < 256:
                    self._host_ok[host] = ok
            if not ok:
                raise Forbidden(
                    f"Host {host.decode('latin-1')!r} is not a name of this machine: without "
                    "API keys stella trusts calls to localhost or a loopback address only "
                    "(a web page can point its own name at 127.0.0.1); list the name in "
                    "server.allowed_hosts, or set keys",
                    reason="browser",
                )
        # Every method, GET too: browsers send Origin only on a script's cross-origin
        # call (and on any non-GET), never on a link or the playground's own GETs. A GET
        # changes nothing and CORS hides its answer from the page, but refusing it here
        # keeps the model list, the usage and any GET that costs work out of other sites'
        # reach whatever the CORS settings, with a 403 that says why.
        if origin is not None and not self.any_origin:
            text = origin.decode("latin-1").strip().lower()
            _, sep, authority = text.partition("://")
            same = sep and host is not None and authority == host.decode("latin-1").lower()
            if not same and text.rstrip("/") not in self.origins:
                raise Forbidden(
                    f"a page on {origin.decode('latin-1')!r} may not call this server: "
                    "without API keys stella trusts its own pages and local clients, not "
                    "other sites; list the origin in cors.allowed_origins, or set keys",
                    reason="browser",
                )


# How a call reached the server, for the loopback rule (falsy: not trusted).
NETWORK, TCP_LOOPBACK, LOCAL_SOCKET = 0, 1, 2

# A key shorter than this is refused at start-up: guessable, or a mistake.
MIN_KEY_LENGTH = 12
# A STELLA_API_KEYS name, and a runtime key's (a URL path names it to revoke it).
KEY_NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"
_KEY_NAME = re.compile(KEY_NAME_PATTERN)


def env_keys(raw: str, source: str = "STELLA_API_KEYS") -> list[tuple[str, str]]:
    """(name, key) pairs from "k1,k2" or "alice=k1,bob=k2"; ConfigError for a short key
    or a name that is not one.

    What follows an entry's first `=` is its key, unless it is only `=` signs: a base64
    key ends in `=` or `==`, and splitting it there would make its padding the key and
    the key its logged name.
    """
    out = []
    for i, entry in enumerate(e.strip() for e in raw.split(",") if e.strip()):
        name, sep, key = entry.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not key.strip("="):
            name, key = f"env-{i + 1}", entry  # one key, its padding included
        elif not _KEY_NAME.fullmatch(name):
            # Not quoted: it may be part of a key.
            raise ConfigError(
                f"{source}: entry {i + 1} is not name=key: what comes before its '=' is not "
                "a name (up to 64 letters, digits, '_', '.', '@', '-')"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"{source}: key {i + 1} is shorter than {MIN_KEY_LENGTH} characters "
                "(`stella keys new NAME` makes one)"
            )
        out.append((name, key))
    return out


def _token(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The key from `Authorization: Bearer` (preferred) or `X-API-Key`; Unauthorized when
    either header gives two different keys."""
    # Every header is read: which of two keys counts must not depend on the header's
    # order (a proxy that adds its own would decide it), so two are no key at all.
    bearer = api_key = b""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, rest = value.partition(b" ")
            token = rest.strip()
            if token and scheme.lower() == b"bearer":  # an empty one leaves X-API-Key its say
                if bearer and token != bearer:
                    raise Unauthorized(TWO_KEYS, reason="duplicate")
                bearer = token
        elif name == b"x-api-key":
            token = value.strip()
            if token:
                if api_key and token != api_key:
                    raise Unauthorized(TWO_KEYS, reason="duplicate")
                api_key = token
    return bearer or api_key


TWO_KEYS = "more than one API key given: send one 'Authorization: Bearer <key>' or one 'X-API-Key'"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `text` writes (brackets allowed), or None when it is no address."""
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def host_name(value: str) -> str:
    """The name in a Host header or URL authority: lower case, without port, brackets or
    a final dot."""
    v = value.strip().lower()
    if v.startswith("["):  # an IPv6 address: its colons are no port
        end = v.find("]")
        name = v[1:end] if end > 0 else v
    else:
        name, sep, port = v.rpartition(":")
        if not sep or not port.isdigit():
            name = v
    return name.removesuffix(".")


def _config_host(entry: str) -> str:
    """A host name from the config as host_name() writes one (a bare IPv6 address too)."""
    e = entry.strip().lower()
    return e.strip("[]") if _ip(e) is not None else host_name(e)


def is_loopback_name(name: str) -> bool:
    """Whether a host name (from host_name()) can only mean this machine: localhost, a
    *.localhost name (browsers resolve them to loopback themselves), a loopback address."""
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts local connections."""
    if host in ("localhost", ""):
        return host == "localhost"
    ip = _ip(host)
    if ip is None:
        return False
    # On a dual-stack `::` socket an IPv4 caller arrives as ::ffff:127.0.0.1.
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback
