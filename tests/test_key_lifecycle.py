"""A runtime key's life: expiry, update, rotation with a grace, purge; in one process, on
a live server, and on two replicas sharing one real redis-server."""

from __future__ import annotations

import asyncio
import calendar
import itertools
import re
import time
from typing import Any

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from stella import app as stella_app
from tests.live import merge, run_stella
from tests.test_keys import (
    BOB,
    CHAT,
    KEYS,
    OPS,
    ROOT,
    app_for,
    bearer,
    calls,
    sha,
)
from tests.test_redis import Redis, redis, redis_server  # noqa: F401  (fixtures)

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
OTHER = {**CHAT, "model": "smollm2-135m"}  # a model a key limited to echo may not use
FOLLOW_S = stella_app.ROUTING_POLL_S + 2.0  # how long another replica may take


def listed(app: Any, name: str) -> dict[str, Any]:
    """Key `name`'s row in GET /api/v1/keys, in process."""
    (r,) = asyncio.run(calls(app, ("GET", "/api/v1/keys", ROOT, None)))
    (row,) = [k for k in r.json()["keys"] if k["name"] == name]
    return row


def chat(app: Any, key: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    """One chat with `key`, in process."""
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/chat", key, body)))
    return r


def made(app: Any, body: dict[str, Any]) -> str:
    """Make a runtime key in process; its key."""
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys", ROOT, body)))
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def poll(check: Any, seconds: float) -> None:
    """Wait for `check()` to hold, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "it did not happen in time"
        time.sleep(0.05)


def test_a_key_that_expired_is_refused_saying_so_and_listed_expired() -> None:
    app = app_for(KEYS)
    with capture_logs() as logged:
        (r,) = asyncio.run(
            calls(app, ("POST", "/api/v1/keys", ROOT, {"name": "ci", "expires_in_s": 1.5}))
        )
        assert r.status_code == 201, r.text
        info, key = r.json(), r.json()["key"]
        assert STAMP.match(info["expires_at"]) and "expired" not in info
        assert chat(app, key).status_code == 200
        row = listed(app, "ci")
        assert row["expires_at"] == info["expires_at"] and "expired" not in row
        poll(lambda: chat(app, key).status_code == 401, 5)
    r = chat(app, key)
    error = r.json()["error"]
    # The same code as every 401; the message says why, of this key alone.
    assert error["code"] == "unauthorized"
    assert error["message"] == f"API key expired at {info['expires_at']}"
    assert r.headers["www-authenticate"] == "Bearer"
    row = listed(app, "ci")
    assert row["expired"] is True and row["revoked"] is False
    # Nothing about other keys: an unknown one is refused as before.
    assert chat(app, "sk-nobody-0000000000").json()["error"]["message"] == "invalid API key"
    events = [e for e in logged if e["event"] == "auth_failed"]
    assert events and events[0]["reason"] == "expired" and events[0]["key"] == "ci"
    (made_event,) = [e for e in logged if e["event"] == "key_change"]
    assert (made_event["action"], made_event["expires_in_s"]) == ("create", 1.5)
    # Not a revocation: a PATCH gives it a new life, and it works again.
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/ci", ROOT, {"expires_in_s": None})))
    assert r.status_code == 200, r.text
    assert "expires_at" not in r.json() and "expired" not in r.json()
    assert chat(app, key).status_code == 200


def test_authentication_reads_no_store_and_a_key_without_expiry_pays_no_clock() -> None:
    app = app_for(KEYS)
    auth = app.state.stella.auth
    key = made(app, {"name": "ci"})
    timed = made(app, {"name": "timed", "expires_in_s": 3600})
    asked = []
    auth.wall = lambda: asked.append(1) or time.time()
    headers = [(b"authorization", f"Bearer {key}".encode())]
    assert auth.authenticate(headers).name == "ci" and not asked
    assert auth.authenticate([(b"authorization", f"Bearer {timed}".encode())]).name == "timed"
    assert asked == [1]  # one clock read, for the key that expires


def test_the_lifecycle_fields_are_checked_with_their_paths() -> None:
    app = app_for(KEYS)
    made(app, {"name": "ci"})
    ten_years = 10 * 365 * 86400
    cases = [
        ("POST", "/api/v1/keys", {"name": "a", "expires_in_s": 0}, "$.expires_in_s"),
        ("POST", "/api/v1/keys", {"name": "a", "expires_in_s": -5}, "$.expires_in_s"),
        ("POST", "/api/v1/keys", {"name": "a", "expires_in_s": "1d"}, "$.expires_in_s"),
        ("POST", "/api/v1/keys", {"name": "a", "expires_in_s": ten_years + 1}, "$.expires_in_s"),
        ("PATCH", "/api/v1/keys/ci", {"expires_in_s": 0}, "$.expires_in_s"),
        ("PATCH", "/api/v1/keys/ci", {"models": ["echo", "echo"]}, "$.models[1]"),
        ("PATCH", "/api/v1/keys/ci", {"models": ["ech\u0001o"]}, "$.models[0]"),
        ("PATCH", "/api/v1/keys/ci", {"requests_per_minute": -1}, "$.requests_per_minute"),
        ("PATCH", "/api/v1/keys/ci", {"admin": "yes"}, "$.admin"),
        ("PATCH", "/api/v1/keys/ci", {"name": "other"}, "name"),
        ("PATCH", "/api/v1/keys/ci", {"sha256": sha(BOB)}, "sha256"),
        ("PATCH", "/api/v1/keys/ci", {}, "nothing to change"),
        ("POST", "/api/v1/keys/ci/rotate", {"grace_s": -1}, "$.grace_s"),
        ("POST", "/api/v1/keys/ci/rotate", {"grace_s": 7 * 86400 + 1}, "$.grace_s"),
        ("POST", "/api/v1/keys/ci/rotate", {"grace": 5}, "grace"),
        ("DELETE", "/api/v1/keys/ci?purge=yes", None, "purge: expected true or false"),
    ]
    answers = asyncio.run(calls(app, *((m, p, ROOT, b) for m, p, b, _ in cases)))
    for (method, path, body, where), r in zip(cases, answers, strict=True):
        assert r.status_code == 400, (method, path, body, r.text)
        assert where in r.json()["error"]["message"], (body, r.text)
    # At the bounds: accepted.
    ok = asyncio.run(
        calls(
            app,
            ("POST", "/api/v1/keys", ROOT, {"name": "long", "expires_in_s": ten_years}),
            ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 7 * 86400}),
        )
    )
    assert [r.status_code for r in ok] == [201, 201], [r.text for r in ok]
    # Nothing changed by the refused ones.
    assert listed(app, "ci")["models"] == ["*"] and "expires_at" not in listed(app, "ci")
    # The schema says what `purge` takes: a boolean (true or false), not any string.
    (spec,) = asyncio.run(calls(app, ("GET", "/openapi.json", ROOT, None)))
    params = spec.json()["paths"]["/api/v1/keys/{name}"]["delete"]["parameters"]
    (purge,) = [p for p in params if p["in"] == "query"]
    assert (purge["name"], purge["schema"]) == ("purge", {"type": "boolean", "default": False})


def test_an_update_changes_the_settings_and_keeps_the_key() -> None:
    app = app_for(KEYS)
    key = made(app, {"name": "ci", "models": ["echo"], "requests_per_minute": 1})
    assert chat(app, key, OTHER).status_code in (403, 404)
    with capture_logs() as logged:
        (r,) = asyncio.run(
            calls(
                app,
                (
                    "PATCH",
                    "/api/v1/keys/ci",
                    ROOT,
                    {"models": ["*"], "requests_per_minute": 0, "tokens_per_day": 500},
                ),
            )
        )
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    info = r.json()
    assert "key" not in info and STAMP.match(info.pop("created_at"))
    assert info == {
        "name": "ci",
        "source": "runtime",
        "models": ["*"],
        "admin": False,
        "requests_per_minute": 0,
        "tokens_per_minute": 0,
        "max_concurrent": 0,
        "requests_per_day": 0,
        "tokens_per_day": 500,
        "usd_per_day": 0.0,
        "revoked": False,
    }
    # Fields left out stay: admin, the other limits.
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/ci", ROOT, {"admin": True})))
    assert r.json()["tokens_per_day"] == 500 and r.json()["models"] == ["*"]
    # The same key, its new settings: the rpm of 1 is gone, another model allowed.
    codes = [chat(app, key).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    assert chat(app, key, {**OTHER, "model": "echo"}).status_code == 200
    (r,) = asyncio.run(calls(app, ("GET", "/api/v1/keys", key, None)))  # admin now
    assert r.status_code == 200
    (event,) = [e for e in logged if e["event"] == "key_change"]
    assert (event["action"], event["name"], event["result"]) == ("update", "ci", "ok")
    assert event["fields"] == ["models", "requests_per_minute", "tokens_per_day"]
    assert key not in repr(logged)


def test_update_rotate_and_purge_refuse_what_they_can_t_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STELLA_API_KEYS", f"ops={OPS}")
    app = app_for(KEYS)
    made(app, {"name": "gone"})
    made(app, {"name": "brief", "expires_in_s": 0.2})
    store = app.state.stella.state
    store.keys["junk"] = {"sha256": "not a digest"}
    time.sleep(0.3)
    cases = [
        ("PATCH", "bob", {"admin": True}, 409, "defined in the configuration (auth.keys)"),
        ("PATCH", "ops", {"admin": False}, 409, "(STELLA_API_KEYS)"),
        ("PATCH", "nobody", {"admin": True}, 404, "no key named 'nobody'"),
        ("PATCH", "junk", {"admin": True}, 409, "can't be read"),
        ("DELETE", "gone", None, 200, ""),
        ("PATCH", "gone", {"admin": True}, 409, "key 'gone' is revoked"),
        ("POST", "bob/rotate", None, 409, "defined in the configuration"),
        ("POST", "nobody/rotate", None, 404, "no key named 'nobody'"),
        ("POST", "gone/rotate", None, 409, "is revoked"),
        ("POST", "brief/rotate", None, 409, "expired at"),
        ("DELETE", "bob?purge=true", None, 409, "defined in the configuration"),
        ("DELETE", "nobody?purge=true", None, 404, "no key named 'nobody'"),
    ]
    answers = asyncio.run(
        calls(app, *((m, f"/api/v1/keys/{p}", ROOT, b) for m, p, b, _, _ in cases))
    )
    for (method, path, _, status, said), r in zip(cases, answers, strict=True):
        assert r.status_code == status, (method, path, r.text)
        if said:
            assert said in r.json()["error"]["message"], (method, path, r.text)
    with capture_logs() as logged:
        asyncio.run(calls(app, ("POST", "/api/v1/keys/nobody/rotate", ROOT, None)))
    (event,) = [e for e in logged if e["event"] == "key_change"]
    assert (event["action"], event["result"]) == ("rotate", "not_found")
    # Several workers without Redis: refused as every key change is.
    app = app_for(merge(KEYS, {"server": {"workers": 2}}))
    for method, path, body in [
        ("PATCH", "/api/v1/keys/ci", {"admin": True}),
        ("POST", "/api/v1/keys/ci/rotate", None),
        ("DELETE", "/api/v1/keys/ci?purge=true", None),
    ]:
        (r,) = asyncio.run(calls(app, (method, path, ROOT, body)))
        assert r.status_code == 409 and "state.redis_url" in r.text, (method, r.text)


def test_the_last_admin_key_that_never_expires_keeps_its_admin() -> None:
    app = app_for(KEYS)
    ops = made(app, {"name": "ops2", "admin": True})
    made(app, {"name": "temp", "admin": True, "expires_in_s": 3600})
    (gone,) = asyncio.run(calls(app, ("DELETE", "/api/v1/keys/root", ops, None)))
    assert gone.status_code == 200
    # ops2 is the last admin that never expires: an admin key that will expire is none.
    cases = [
        ("PATCH", "/api/v1/keys/ops2", {"admin": False}, "no longer an admin"),
        ("PATCH", "/api/v1/keys/ops2", {"expires_in_s": 60}, "given an expiry"),
        ("DELETE", "/api/v1/keys/ops2", None, "the last admin key"),
        ("DELETE", "/api/v1/keys/ops2?purge=true", None, "the last admin key"),
    ]
    answers = asyncio.run(calls(app, *((m, p, ops, b) for m, p, b, _ in cases)))
    for (method, _, body, said), r in zip(cases, answers, strict=True):
        assert r.status_code == 409, (method, body, r.text)
        assert said in r.json()["error"]["message"], r.text
    # What keeps it an admin that never expires passes; so does a rotation.
    ok = asyncio.run(
        calls(
            app,
            ("PATCH", "/api/v1/keys/ops2", ops, {"models": [], "requests_per_minute": 5}),
            ("PATCH", "/api/v1/keys/temp", ops, {"admin": False}),
            ("POST", "/api/v1/keys/ops2/rotate", ops, {"grace_s": 60}),
        )
    )
    assert [r.status_code for r in ok] == [200, 200, 201], [r.text for r in ok]
    # Another lasting admin: now ops2 may lose it.
    made_key = asyncio.run(
        calls(app, ("POST", "/api/v1/keys", ops, {"name": "ops3", "admin": True}))
    )[0]
    assert made_key.status_code == 201
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/ops2", ops, {"expires_in_s": 60})))
    assert r.status_code == 200, r.text


def test_a_rotation_without_grace_refuses_the_old_key_at_once() -> None:
    app = app_for(KEYS)
    old = made(app, {"name": "ci", "models": ["echo"], "requests_per_day": 7})
    with capture_logs() as logged:
        (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, None)))
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    info = r.json()
    new = info["key"]
    assert new != old and new.startswith("sk-stella-")
    assert (info["models"], info["requests_per_day"]) == (["echo"], 7)  # its settings kept
    assert "grace_until" not in info
    assert chat(app, old).status_code == 401
    assert chat(app, old).json()["error"]["message"] == "invalid API key"
    assert chat(app, new).status_code == 200
    store = app.state.stella.state
    # Stopped by the entry rewritten, not by a revocation: the store keeps none of it.
    assert store.keys["ci"]["sha256"] == sha(new) and not store.revoked
    assert not any(k in repr(logged) for k in (old, new))
    (event,) = [e for e in logged if e["event"] == "key_change"]
    assert (event["action"], event["grace_s"], event["result"]) == ("rotate", 0.0, "ok")
    # The schema says what was just done: the rotation's body may be left out.
    (spec,) = asyncio.run(calls(app, ("GET", "/openapi.json", ROOT, None)))
    body = spec.json()["paths"]["/api/v1/keys/{name}/rotate"]["post"]["requestBody"]
    assert body["required"] is False
    update = spec.json()["paths"]["/api/v1/keys/{name}"]["patch"]["requestBody"]
    assert update["required"] is True
    # And that an update's body names one field at least (`{}` is a 400).
    schema = update["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/UpdateKey", "minProperties": 1}


def test_a_rotation_s_grace_ends_and_a_revocation_or_another_rotation_ends_it_sooner() -> None:
    app = app_for(KEYS)
    old = made(app, {"name": "ci"})
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 1.5})))
    assert r.status_code == 201, r.text
    new = r.json()["key"]
    assert STAMP.match(r.json()["grace_until"])
    assert listed(app, "ci")["grace_until"] == r.json()["grace_until"]
    # Both work during the grace, under the one name.
    assert chat(app, old).json()["usage"] and chat(app, new).status_code == 200
    poll(lambda: chat(app, old).status_code == 401, 5)
    error = chat(app, old).json()["error"]["message"]
    assert error == f"API key expired at {r.json()['grace_until']} (a rotation replaced it)"
    assert chat(app, new).status_code == 200
    assert "grace_until" not in listed(app, "ci")
    # A second rotation ends the first one's grace at once: one old secret at a time.
    (a,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 600})))
    (b,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 600})))
    assert chat(app, new).status_code == 401  # the first rotation's old secret
    assert chat(app, a.json()["key"]).status_code == 200  # in its grace
    assert chat(app, b.json()["key"]).status_code == 200
    # A revocation takes the secret in its grace too.
    (gone,) = asyncio.run(calls(app, ("DELETE", "/api/v1/keys/ci", ROOT, None)))
    assert gone.status_code == 200
    assert chat(app, a.json()["key"]).status_code == 401
    assert chat(app, b.json()["key"]).status_code == 401


def test_a_grace_that_ended_leaves_the_entry_at_its_next_write() -> None:
    # An entry with a rotation's grace is one an older replica skips: once the grace is
    # over, the next write stores the key as that replica reads it.
    app = app_for(KEYS)
    store = app.state.stella.state
    old = made(app, {"name": "ci", "models": ["echo"]})
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 0.3})))
    new = r.json()["key"]
    assert {"previous", "previous_until"} <= set(store.keys["ci"])
    poll(lambda: chat(app, old).status_code == 401, 5)
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/ci", ROOT, {"admin": False})))
    assert r.status_code == 200, r.text
    assert set(store.keys["ci"]) == {
        "sha256",
        "models",
        "admin",
        "requests_per_minute",
        "tokens_per_minute",
        "max_concurrent",
        "requests_per_day",
        "tokens_per_day",
    }
    assert chat(app, new).status_code == 200 and chat(app, old).status_code == 401
    # One still in its grace is kept by a PATCH.
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 600})))
    newer = r.json()["key"]
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/ci", ROOT, {"admin": False})))
    assert r.json()["grace_until"] and store.keys["ci"]["previous"] == sha(new)
    assert chat(app, new).status_code == 200 and chat(app, newer).status_code == 200


def test_a_grace_too_short_to_outlast_its_write_is_none() -> None:
    app = app_for(KEYS)
    store = app.state.stella.state
    old = made(app, {"name": "ci"})
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 1e-320})))
    assert r.status_code == 201, r.text
    assert "grace_until" not in r.json()
    # As a rotation without grace: the old secret gone from the entry, as before.
    assert "previous" not in store.keys["ci"] and "previous_until" not in store.keys["ci"]
    assert not store.revoked
    assert chat(app, old).json()["error"]["message"] == "invalid API key"
    assert chat(app, r.json()["key"]).status_code == 200


def test_a_purge_frees_the_name_and_the_old_key_stays_refused() -> None:
    app = app_for(KEYS)
    store = app.state.stella.state
    live = made(app, {"name": "ci"})
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys/ci/rotate", ROOT, {"grace_s": 600})))
    rotated = r.json()["key"]
    with capture_logs() as logged:
        purged, again, reused = asyncio.run(
            calls(
                app,
                ("DELETE", "/api/v1/keys/ci?purge=true", ROOT, None),
                ("DELETE", "/api/v1/keys/ci?purge=true", ROOT, None),
                ("POST", "/api/v1/keys", ROOT, {"name": "ci"}),
            )
        )
    # A live key: revoked and dropped in one go.
    assert purged.status_code == 200, purged.text
    assert purged.json()["purged"] is True and purged.json()["revoked"] == "ci"
    assert "revoked, and its entry dropped" in purged.json()["detail"]
    assert again.status_code == 404
    assert reused.status_code == 201, reused.text
    # Neither of its secrets (the one in its grace too) works again, and the store keeps
    # no revocation of them: no entry holds them.
    for key in (live, rotated):
        assert chat(app, key).status_code == 401
    assert not store.revoked and not store.revoked_at
    assert chat(app, reused.json()["key"]).status_code == 200
    assert [(e["action"], e["result"], e.get("revoked")) for e in logged] == [
        ("purge", "ok", True),
        ("purge", "not_found", None),
        ("create", "ok", None),
    ]
    # A revoked key and an expired one: their entries dropped, the names free.
    made(app, {"name": "old"})
    short = made(app, {"name": "short", "expires_in_s": 0.2})
    time.sleep(0.3)
    answers = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/old", ROOT, None),
            ("DELETE", "/api/v1/keys/old?purge=true", ROOT, None),
            ("DELETE", "/api/v1/keys/short?purge=true", ROOT, None),
            ("DELETE", "/api/v1/keys/short?purge=false", ROOT, None),
        )
    )
    assert [r.status_code for r in answers] == [200, 200, 200, 404], [r.text for r in answers]
    assert answers[1].json()["detail"].startswith("its entry dropped")
    assert answers[2].json()["detail"].startswith("revoked, and its entry dropped")
    assert "old" not in store.keys and "short" not in store.keys
    # The revocation of `old` went with its entry; `short` was never revoked, and its
    # key works nowhere all the same.
    assert not store.revoked and not store.revoked_at
    assert chat(app, short).status_code == 401
    names = [
        k["name"]
        for k in asyncio.run(calls(app, ("GET", "/api/v1/keys", ROOT, None)))[0].json()["keys"]
    ]
    assert names == ["root", "bob", "ci"]


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_name_purged_and_made_again_starts_with_full_limits(
    request: pytest.FixtureRequest, store: str
) -> None:
    import redis as redis_py

    # Buckets go by name: the new key must not inherit the old one's day, nor its minute.
    config = KEYS
    if store == "redis":
        url = request.getfixturevalue("redis").url
        config = merge(KEYS, {"state": {"redis_url": url}})
    app = app_for(config)
    svc = app.state.stella
    limits = {
        "models": ["echo"],
        "requests_per_minute": 2,
        "tokens_per_minute": 100_000,
        "requests_per_day": 2,
        "tokens_per_day": 100_000,
        "usd_per_day": 5.0,
    }

    def held() -> list[str]:
        """The bucket names of key ci that the store holds."""
        if store == "memory":
            return [k for k in svc.admission.buckets._levels if ":key:ci" in k]
        client = redis_py.Redis.from_url(url)
        try:
            return sorted(k.decode() for k in client.scan_iter("stella:rl:*:key:ci*"))
        finally:
            client.close()

    async def run() -> tuple[list[httpx.Response], list[str], list[httpx.Response]]:
        async with app.router.lifespan_context(app):
            (r,) = await calls(app, ("POST", "/api/v1/keys", ROOT, {"name": "ci", **limits}))
            old = r.json()["key"]
            used = await calls(app, *[("POST", "/api/v1/chat", old, CHAT)] * 3)
            # Every bucket by name: the minute's, the day's requests, tokens and budget.
            assert len(held()) == 5, held()
            (purged,) = await calls(app, ("DELETE", "/api/v1/keys/ci?purge=true", ROOT, None))
            assert purged.status_code == 200, purged.text
            left = held()
            (r,) = await calls(app, ("POST", "/api/v1/keys", ROOT, {"name": "ci", **limits}))
            new = r.json()["key"]
            again = await calls(
                app,
                *[("POST", "/api/v1/chat", new, CHAT)] * 2,
                ("GET", "/api/v1/usage", ROOT, None),
            )
            return used, left, again

    used, left, again = asyncio.run(run())
    assert [r.status_code for r in used] == [200, 200, 429]
    assert [r.status_code for r in again[:2]] == [200, 200], again[0].text
    assert left == []
    # The usage rows are history: the old key's stay, and the new one adds to them.
    (row,) = [r for r in again[2].json()["usage"] if r["key"] == "ci"]
    assert row["requests"] == 4


def test_two_replicas_share_expiry_updates_rotations_and_purges(
    redis: Redis,  # noqa: F811
) -> None:
    import redis as redis_py

    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    client = redis_py.Redis.from_url(redis.url)
    try:
        with run_stella(cfg) as a, run_stella(cfg) as b:
            admin = bearer(ROOT)

            def on(s: Any, key: str, body: dict[str, Any] = CHAT) -> int:
                return httpx.post(
                    s.url + "/api/v1/chat", json=body, headers=bearer(key)
                ).status_code

            # Expiry: made on A, working on B, refused on both once it passed.
            r = httpx.post(
                a.url + "/api/v1/keys",
                json={"name": "brief", "expires_in_s": 2.5, "models": ["echo"]},
                headers=admin,
            )
            assert r.status_code == 201, r.text
            brief = r.json()["key"]
            stored = msgspec.json.decode(client.hget("stella:keys", "brief"))
            assert stored["expires_at"] > time.time() - 5
            poll(lambda: on(b, brief) == 200, FOLLOW_S)
            poll(lambda: on(a, brief) == 401 and on(b, brief) == 401, 6)
            assert (
                "expired"
                in httpx.post(b.url + "/api/v1/chat", json=CHAT, headers=bearer(brief)).json()[
                    "error"
                ]["message"]
            )
            row = [
                k
                for k in httpx.get(b.url + "/api/v1/keys", headers=admin).json()["keys"]
                if k["name"] == "brief"
            ]
            assert row[0]["expired"] is True

            # An update on A reaches B: another model allowed there too.
            r = httpx.post(
                a.url + "/api/v1/keys", json={"name": "ci", "models": ["echo"]}, headers=admin
            )
            ci = r.json()["key"]
            # A key without an expiry is stored as an earlier stella wrote one.
            assert set(msgspec.json.decode(client.hget("stella:keys", "ci"))) == {
                "sha256",
                "models",
                "admin",
                "requests_per_minute",
                "tokens_per_minute",
                "max_concurrent",
                "requests_per_day",
                "tokens_per_day",
            }
            poll(lambda: on(b, ci) == 200, FOLLOW_S)
            r = httpx.patch(a.url + "/api/v1/keys/ci", json={"models": ["other"]}, headers=admin)
            assert r.status_code == 200, r.text
            poll(lambda: on(b, ci) in (403, 404), FOLLOW_S)
            # And one on B reaches A, the same way.
            r = httpx.patch(b.url + "/api/v1/keys/ci", json={"models": ["*"]}, headers=admin)
            assert r.status_code == 200, r.text
            poll(lambda: on(a, ci) == 200, FOLLOW_S)

            # A rotation with a grace on B: the old key works on A during it, not after.
            r = httpx.post(b.url + "/api/v1/keys/ci/rotate", json={"grace_s": 3}, headers=admin)
            assert r.status_code == 201, r.text
            new = r.json()["key"]
            poll(lambda: on(a, new) == 200, FOLLOW_S)
            assert on(a, ci) == 200 and on(b, ci) == 200  # in its grace, on both
            poll(lambda: on(a, ci) == 401 and on(b, ci) == 401, 8)
            assert on(a, new) == 200

            # A purge on A: the name is free on B, the old keys refused everywhere.
            r = httpx.delete(a.url + "/api/v1/keys/ci?purge=true", headers=admin)
            assert r.status_code == 200 and r.json()["purged"], r.text
            assert client.hget("stella:keys", "ci") is None
            # Its revocations went with it (the rotation's old secret had none).
            assert client.hlen("stella:revoked") == client.hlen("stella:revoked_at") == 0
            poll(lambda: on(b, new) == 401, FOLLOW_S)
            r = httpx.post(b.url + "/api/v1/keys", json={"name": "ci"}, headers=admin)
            assert r.status_code == 201, r.text
            reused = r.json()["key"]
            poll(lambda: on(a, reused) == 200, FOLLOW_S)
            assert on(a, new) == 401 and on(a, ci) == 401
            # No change through the API reads as keys lost from the store.
            assert not [line for line in a.lines() + b.lines() if "stored_keys_lost" in line]
        # A replica started later: the purged key's secrets stay refused.
        with run_stella(cfg) as c:
            assert on(c, new) == 401 and on(c, ci) == 401 and on(c, reused) == 200
            assert on(c, brief) == 401
    finally:
        client.close()


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
def test_a_replica_whose_clock_is_off_reads_expiries_on_redis_s_from_its_first_call(
    redis: Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    skew: float,
) -> None:
    import types

    import redis as redis_py

    from stella import state_redis

    live, gone = "sk-clock-live-000011", "sk-clock-gone-000022"
    client = redis_py.Redis.from_url(redis.url)
    try:
        sec, usec = client.time()
        now = sec + usec / 1e6
        # On Redis's clock, as every replica wrote them: one works half an hour more, the
        # other stopped half an hour ago.
        for name, key, at in (("live", live, now + 1800), ("gone", gone, now - 1800)):
            spec = {"sha256": sha(key), "models": ["echo"], "expires_at": at}
            client.hset("stella:keys", name, msgspec.json.encode(spec))
    finally:
        client.close()
    # This replica's clock is an hour off Redis's.
    real = time.time
    off = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    off.time = lambda: real() + skew
    monkeypatch.setattr(state_redis, "time", off)
    app = app_for(merge(KEYS, {"state": {"redis_url": redis.url}}))

    async def first_calls() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            # Right after start-up, before the flusher's first tick.
            return await calls(
                app, ("POST", "/api/v1/chat", live, CHAT), ("POST", "/api/v1/chat", gone, CHAT)
            )

    on_live, on_gone = asyncio.run(first_calls())
    assert on_live.status_code == 200, on_live.text
    assert on_gone.status_code == 401 and "expired" in on_gone.json()["error"]["message"]


def test_concurrent_changes_of_unrelated_keys_on_two_replicas_all_land(
    redis: Redis,  # noqa: F811
) -> None:
    # Every key change moves the one version: changes that meet are tried again, after
    # a pause that keeps them from meeting again at each try.
    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    a, b = app_for(cfg), app_for(cfg)
    names = [f"k{i}" for i in range(40)]

    async def run() -> list[httpx.Response]:
        async with a.router.lifespan_context(a), b.router.lifespan_context(b):
            for name in names:
                await calls(a, ("POST", "/api/v1/keys", ROOT, {"name": name}))
            return await asyncio.gather(
                *(
                    calls(
                        (a, b)[i % 2],
                        ("PATCH", f"/api/v1/keys/{name}", ROOT, {"requests_per_minute": 7}),
                    )
                    for i, name in enumerate(names)
                )
            )

    answers = [r for (r,) in asyncio.run(run())]
    assert [r.status_code for r in answers] == [200] * len(names), [
        r.text for r in answers if r.status_code != 200
    ][:1]


@pytest.mark.parametrize("window", [0.0, 0.6])
def test_a_key_change_that_keeps_meeting_others_is_503_after_its_paused_tries(
    window: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stella.api import keys

    # Past its count of tries a change goes on trying until its window has passed.
    monkeypatch.setattr(keys, "KEY_CHANGE_WINDOW_S", window)
    app = app_for(KEYS)
    store = app.state.stella.state
    made(app, {"name": "ci"})
    real = store.change_keys
    tries = []

    async def meanwhile(change: Any, seen: Any) -> bool:
        tries.append(time.monotonic())
        store.keys_version += 1  # another replica's change, between the read and the write
        return bool(await real(change, seen))

    store.change_keys = meanwhile
    patch = {"requests_per_minute": 7}
    (r,) = asyncio.run(calls(app, ("PATCH", "/api/v1/keys/ci", ROOT, patch)))
    assert r.status_code == 503 and "kept changing" in r.json()["error"]["message"]
    if not window:
        assert len(tries) == keys.KEY_CHANGE_TRIES
    else:
        assert len(tries) > keys.KEY_CHANGE_TRIES
        assert window <= tries[-1] - tries[0] < window + 0.5
    # Each try after a pause, growing, within its bounds.
    pauses = [b - a for a, b in itertools.pairwise(tries)]
    for i, pause in enumerate(pauses, 1):
        longest = min(keys.KEY_CHANGE_PAUSE_S * 2 ** (i - 1), keys.KEY_CHANGE_PAUSE_MAX_S)
        assert longest / 2 <= pause < longest + 0.5, (i, pauses)
    assert store.keys["ci"]["requests_per_minute"] == 0  # nothing written


def test_a_stale_key_change_is_not_written(redis: Redis) -> None:  # noqa: F811
    from stella.settings import StateSettings
    from stella.state import KeyChange, MemoryState
    from stella.state_redis import RedisState

    async def check(state: Any) -> None:
        await state.start()
        try:
            await state.save_key("ci", {"sha256": sha("a" * 20)}, "2025-01-01T00:00:00Z")
            read = await state.load_keys()
            await state.save_key("other", {"sha256": sha("b" * 20)}, "")  # moves the version
            put = KeyChange({}, put={"ci": {"sha256": sha("c" * 20), "admin": True}})
            assert not await state.change_keys(put, read.version)
            assert (await state.load_keys()).keys["ci"] == {"sha256": sha("a" * 20)}
            fresh = await state.load_keys()
            assert await state.change_keys(put, fresh.version)
            after = await state.load_keys()
            assert after.keys["ci"]["admin"] is True
            assert after.created["ci"] == "2025-01-01T00:00:00Z"  # its making kept
        finally:
            await state.aclose()

    asyncio.run(check(MemoryState()))
    asyncio.run(check(RedisState(StateSettings(redis_url=redis.url))))


def test_the_duration_options_take_units() -> None:
    import argparse

    from stella.commands.keys import _duration

    assert [_duration(t) for t in ("90", "90s", "15m", "12h", "30d", "1.5h")] == [
        90,
        90,
        900,
        43200,
        2592000,
        5400,
    ]
    # Other scripts' digits too, which float() would take ("١٢" is 12).
    for bad in ("", "1w", "-5m", "d", "5 d d", "\u0661\u0662", "\u0661\u0662m", "\uff15s"):
        with pytest.raises(argparse.ArgumentTypeError):
            _duration(bad)


def test_the_clients_and_the_cli_manage_a_key_s_life() -> None:
    import os

    from stella.client import AsyncClient, Client, ConflictError, NotFoundError
    from tests.live import stella_cli

    with run_stella(KEYS) as s:
        with Client(s.url, api_key=ROOT) as c:
            ci = c.create_key("ci", models=["echo"], expires_in_s=3600)
            assert STAMP.match(ci.expires_at) and not ci.expired
            changed = c.update_key("ci", requests_per_minute=9, no_expiry=True)
            assert (changed.requests_per_minute, changed.expires_at) == (9, "")
            assert changed.models == ["echo"]  # left as it was
            with pytest.raises(ValueError):
                c.update_key("ci", expires_in_s=5, no_expiry=True)
            with pytest.raises(ConflictError):
                c.update_key("bob", admin=True)
            rotated = c.rotate_key("ci", grace_s=600)
            assert rotated.key != ci.key and STAMP.match(rotated.grace_until)
            with Client(s.url, api_key=ci.key) as old:  # in its grace
                assert old.chat([{"role": "user", "content": "hi"}], model="echo").response
            gone = c.revoke_key("ci", purge=True)
            assert gone.purged and gone.revoked == "ci"
            with pytest.raises(NotFoundError):
                c.revoke_key("ci", purge=True)

        async def in_async() -> tuple[Any, Any, Any, Any]:
            async with AsyncClient(s.url, api_key=ROOT) as c:
                made = await c.create_key("async-ci", expires_in_s=60)
                updated = await c.update_key("async-ci", admin=True, expires_in_s=120)
                rotated = await c.rotate_key("async-ci")
                purged = await c.revoke_key("async-ci", purge=True)
                return made, updated, rotated, purged

        made, updated, rotated, purged = asyncio.run(in_async())
        assert made.expires_at <= updated.expires_at and updated.admin
        assert rotated.key != made.key and not rotated.grace_until
        assert purged.purged
        assert (
            httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(made.key)).status_code
            == 401
        )

        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
        env["STELLA_API_KEY"] = ROOT
        url = ("--url", s.url)
        created = stella_cli("keys", "create", "cli", "--expires-in", "30d", *url, env=env)
        assert created.returncode == 0, created.stderr
        first = created.stdout.strip()
        bad = stella_cli("keys", "create", "x", "--expires-in", "1w", *url, env=env)
        assert bad.returncode == 2 and "not a duration" in bad.stderr
        table = stella_cli("keys", "list", *url, env=env)
        header = table.stdout.splitlines()[0].split()
        assert header[3:6] == ["CREATED", "EXPIRES", "REVOKED"]
        (row,) = [line.split() for line in table.stdout.splitlines() if line.startswith("cli ")]
        days = (calendar.timegm(time.strptime(row[4], "%Y-%m-%dT%H:%M:%SZ")) - time.time()) / 86400
        assert 29.99 < days < 30.01, row
        updated_cli = stella_cli(
            "keys", "update", "cli", "--models", "echo", "--rpm", "4", "--no-expiry", *url, env=env
        )
        assert updated_cli.returncode == 0, updated_cli.stderr
        assert updated_cli.stdout.strip() == "updated cli"
        with Client(s.url, api_key=ROOT) as c:
            (k,) = [k for k in c.list_keys().keys if k.name == "cli"]
        assert (k.models, k.requests_per_minute, k.expires_at) == (["echo"], 4, "")
        # Told here, as a usage error, not by the server.
        nothing = stella_cli("keys", "update", "cli", "--url", "http://127.0.0.1:1", env=env)
        assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
        assert "--models" in nothing.stderr and "--no-expiry" in nothing.stderr
        for action in ("create", "update"):
            zero = stella_cli("keys", action, "cli", "--expires-in", "0", *url, env=env)
            assert zero.returncode == 2, zero.stderr
            assert "argument --expires-in: must be more than 0" in zero.stderr
        rotated_cli = stella_cli("keys", "rotate", "cli", "--grace", "1h", *url, env=env)
        assert rotated_cli.returncode == 0, rotated_cli.stderr
        second = rotated_cli.stdout.strip()
        assert second.startswith("sk-stella-") and second != first
        assert (
            "shown once" in rotated_cli.stderr and "the old key works until" in rotated_cli.stderr
        )
        for key in (first, second):  # the old one in its grace
            r = httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(key))
            assert r.status_code == 200
        purged_cli = stella_cli("keys", "revoke", "cli", "--purge", *url, env=env)
        assert purged_cli.returncode == 0, purged_cli.stderr
        assert purged_cli.stdout.strip() == "purged cli (runtime)"
        for key in (first, second):
            r = httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(key))
            assert r.status_code == 401
        again = stella_cli("keys", "create", "cli", *url, env=env)
        assert again.returncode == 0, again.stderr
