"""API keys at runtime: revocation, runtime keys and their listing, on one process, a live
server, and two replicas on one real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from stella import app as stella_app
from stella.app import create_app
from stella.auth import Authenticator
from stella.errors import Unauthorized
from stella.settings import load_settings
from tests.live import NO_MLX, merge, run_stella
from tests.test_redis import Redis, redis, redis_server  # noqa: F401  (fixtures)

ROOT = "sk-keys-root-0000111"  # an admin key
OPS = "sk-keys-ops-00002222"  # another admin key
BOB = "sk-keys-bob-00003333"  # a key for the echo model only
CHAT = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "hi"}]}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


KEYS: dict[str, Any] = {
    "auth": {
        "keys": {
            "root": {"sha256": sha(ROOT), "admin": True},
            "bob": {"sha256": sha(BOB), "models": ["echo"]},
        }
    }
}


def app_for(config: dict[str, Any]) -> Any:
    return create_app(load_settings(merge(NO_MLX, config), environ={}))


async def calls(app: Any, *requests: tuple[str, str, str, Any]) -> list[httpx.Response]:
    """(method, path, key, json body or None) in turn, in process."""
    out = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
    ) as c:
        for method, path, key, body in requests:
            out.append(await c.request(method, path, headers=bearer(key), json=body))
    return out


def test_a_revoked_config_key_is_refused_as_an_unknown_one() -> None:
    app = app_for(KEYS)
    with capture_logs() as logged:
        before, revoked, after, again = asyncio.run(
            calls(
                app,
                ("POST", "/api/v1/chat", BOB, CHAT),
                ("DELETE", "/api/v1/keys/bob", ROOT, None),
                ("POST", "/api/v1/chat", BOB, CHAT),
                ("DELETE", "/api/v1/keys/bob", ROOT, None),
            )
        )
    assert before.status_code == 200
    assert revoked.status_code == 200, revoked.text
    body = revoked.json()
    assert body["revoked"] == "bob" and body["source"] == "config"
    assert "auth.keys still lists it" in body["detail"]
    assert after.status_code == 401
    assert after.json()["error"]["message"] == "invalid API key"
    assert again.status_code == 404
    assert "revoked already" in again.json()["error"]["message"]
    events = [e for e in logged if e["event"] == "key_change"]
    assert [(e["action"], e["name"], e["source"], e["key"], e["result"]) for e in events] == [
        ("revoke", "bob", "config", "root", "ok"),
        ("revoke", "bob", None, "root", "not_found"),
    ]


def test_revoking_asks_an_admin_and_a_key_that_exists() -> None:
    app = app_for(KEYS)
    by_bob, unknown = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/root", BOB, None),
            ("DELETE", "/api/v1/keys/nobody", ROOT, None),
        )
    )
    assert by_bob.status_code == 403
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "no key named 'nobody'"


def test_the_last_admin_key_is_not_revoked_and_one_may_revoke_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STELLA_API_KEYS", f"ops={OPS}")  # the app's Authenticator reads it
    app = app_for(KEYS)
    last_but_one, own_gone, last = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/ops", ROOT, None),  # an env key: source env
            ("POST", "/api/v1/chat", OPS, CHAT),
            ("DELETE", "/api/v1/keys/root", ROOT, None),  # itself, the last admin
        )
    )
    assert last_but_one.status_code == 200
    assert last_but_one.json()["source"] == "env"
    assert "STELLA_API_KEYS still lists it" in last_but_one.json()["detail"]
    assert own_gone.status_code == 401
    assert last.status_code == 409
    assert "the last admin key" in last.json()["error"]["message"]
    # Not the last: a key revokes itself (a holder who thinks it leaked).
    app = app_for(KEYS)
    own, after = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/root", ROOT, None),
            ("GET", "/api/v1/usage", ROOT, None),
        )
    )
    assert own.status_code == 200
    assert after.status_code == 401


def test_a_revocation_refuses_the_name_with_its_key_not_a_new_key_of_that_name() -> None:
    # The revocation a store holds names the key's digest: a later config giving the
    # name another key has that key accepted.
    old = Authenticator(load_settings(merge(NO_MLX, KEYS), environ={}), {})
    revoked = {"bob": sha(BOB)}
    old.apply_stored({}, revoked)
    bob = [(b"authorization", f"Bearer {BOB}".encode())]
    with pytest.raises(Unauthorized, match="invalid API key"):
        old.authenticate(bob)
    new_bob = "sk-keys-bob-new-4444"
    cfg = merge(KEYS, {"auth": {"keys": {"bob": {"sha256": sha(new_bob)}}}})
    new = Authenticator(load_settings(merge(NO_MLX, cfg), environ={}), {})
    new.apply_stored({}, revoked)
    assert new.authenticate([(b"authorization", f"Bearer {new_bob}".encode())]).name == "bob"


def test_several_workers_without_redis_refuse_a_key_change() -> None:
    app = app_for(merge(KEYS, {"server": {"workers": 2}}))
    (r,) = asyncio.run(calls(app, ("DELETE", "/api/v1/keys/bob", ROOT, None)))
    assert r.status_code == 409
    assert "state.redis_url" in r.json()["error"]["message"]


def test_a_live_server_refuses_a_key_as_soon_as_it_is_revoked() -> None:
    with run_stella(KEYS) as s:
        assert httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB)).status_code == 200
        r = httpx.delete(s.url + "/api/v1/keys/bob", headers=bearer(ROOT))
        assert r.status_code == 200, r.text
        r = httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB))
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "invalid API key"


def eventually(check: Callable[[], bool], seconds: float) -> float:
    """Wait for `check()` to hold; the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, "the other replica did not follow"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_revocation_on_one_replica_is_refused_on_the_other(redis: Redis) -> None:  # noqa: F811
    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    with run_stella(cfg) as a, run_stella(cfg) as b:
        assert httpx.post(b.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB)).status_code == 200
        r = httpx.delete(a.url + "/api/v1/keys/bob", headers=bearer(ROOT))
        assert r.status_code == 200, r.text

        def refused() -> bool:
            r = httpx.post(b.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB))
            return r.status_code == 401

        # Within the poll interval (and a round trip or two).
        assert eventually(refused, stella_app.ROUTING_POLL_S + 1.0) <= stella_app.ROUTING_POLL_S + 1
        # The other replica refuses the last admin key too: the store counts them.
        r = httpx.delete(b.url + "/api/v1/keys/root", headers=bearer(ROOT))
        assert r.status_code == 409
    # A replica started later reads the revocation as it starts.
    with run_stella(cfg) as c:
        r = httpx.post(c.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB))
        assert r.status_code == 401
