"""API keys at runtime: revocation, runtime keys and their listing, on one process, a live
server, and two replicas on one real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
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


def authenticator(config: dict[str, Any], env: str = "") -> Authenticator:
    settings = load_settings(merge(NO_MLX, config), environ={})
    return Authenticator(settings, {"STELLA_API_KEYS": env} if env else {})


def accepted(auth: Authenticator, key: str) -> str | None:
    """The name `auth` takes `key` under, or None when it refuses it."""
    try:
        return auth.authenticate([(b"authorization", f"Bearer {key}".encode())]).name
    except Unauthorized:
        return None


def test_a_revocation_is_of_the_key_whatever_its_name_and_not_of_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Revoked on a server whose STELLA_API_KEYS names its keys by their place...
    one, two = "sk-keys-env-one-5555", "sk-keys-env-two-6666"
    monkeypatch.setenv("STELLA_API_KEYS", f"{one},{two}")
    app = app_for(KEYS)
    gone_one, gone_bob = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/env-1", ROOT, None),
            ("DELETE", "/api/v1/keys/bob", ROOT, None),
        )
    )
    assert gone_one.status_code == gone_bob.status_code == 200
    store = app.state.stella.state
    assert store.revoked == {sha(one): "env-1", sha(BOB): "bob"}
    # ...the key stays refused under any name a later config gives it: the entries
    # reordered, the table renamed, the key given a name of its own.
    root = KEYS["auth"]["keys"]["root"]
    renamed = {"auth": {"keys": {"root": root, "robert": {"sha256": sha(BOB)}}}}
    for config, env in [
        (KEYS, f"{two},{one}"),
        (renamed, f"{one},{two}"),
        (KEYS, f"leaked={one}"),
    ]:
        auth = authenticator(config, env)
        auth.apply_stored(store.keys, store.revoked)
        assert accepted(auth, one) is None, env
        assert accepted(auth, BOB) is None, config
    auth = authenticator(KEYS, f"{two},{one}")
    auth.apply_stored(store.keys, store.revoked)
    assert accepted(auth, two) == "env-1"  # its own key, in the first place now
    # A new key under a revoked name is not refused.
    new_bob = "sk-keys-bob-new-4444"
    cfg = merge(KEYS, {"auth": {"keys": {"bob": {"sha256": sha(new_bob)}}}})
    auth = authenticator(cfg)
    auth.apply_stored(store.keys, store.revoked)
    assert accepted(auth, new_bob) == "bob"


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


def test_a_runtime_key_s_fields_are_checked_with_their_paths() -> None:
    app = app_for(KEYS)
    cases = [
        ({"name": "ci", "models": ["echo", ""]}, "$.models[1]"),
        ({"name": "bad name"}, "$.name"),
        ({"name": ""}, "$.name"),
        ({"name": "ci", "requests_per_minute": -1}, "$.requests_per_minute"),
        ({"name": "ci", "tokens_per_day": "lots"}, "$.tokens_per_day"),
        ({"name": "ci", "admin": "yes"}, "$.admin"),
        ({"name": "ci", "sha256": sha(BOB)}, "sha256"),  # the server makes the key
        ({"models": ["*"]}, "name"),
        # As a runtime route's lists: no repeat, and no control character, which the
        # key list would print raw.
        ({"name": "ci", "models": ["echo", "e*", "echo"]}, "$.models[2]: 'echo' is listed twice"),
        ({"name": "ci", "models": ["*", "ech\u0001o"]}, "$.models[1]: holds a control character"),
    ]
    answers = asyncio.run(calls(app, *(("POST", "/api/v1/keys", ROOT, b) for b, _ in cases)))
    for (body, where), r in zip(cases, answers, strict=True):
        assert r.status_code == 400, (body, r.text)
        assert where in r.json()["error"]["message"], (body, r.text)
    r = answers[1]
    assert "a key name is 1 to 64 ASCII letters" in r.json()["error"]["message"]
    # The schema shows the models' default, as the other fields show theirs.
    (spec,) = asyncio.run(calls(app, ("GET", "/openapi.json", ROOT, None)))
    models = spec.json()["components"]["schemas"]["CreateKey"]["properties"]["models"]
    assert models["default"] == ["*"]


def test_a_runtime_key_is_made_once_and_works_as_a_configured_one() -> None:
    app = app_for(KEYS)
    body = {"name": "ci", "models": ["echo"], "requests_per_minute": 2}
    with capture_logs() as logged:
        made, taken, configured, by_bob = asyncio.run(
            calls(
                app,
                ("POST", "/api/v1/keys", ROOT, body),
                ("POST", "/api/v1/keys", ROOT, body),
                ("POST", "/api/v1/keys", ROOT, {"name": "bob"}),
                ("POST", "/api/v1/keys", BOB, {"name": "eve"}),
            )
        )
    assert made.status_code == 201, made.text
    # The key is in this answer alone: no cache may keep it.
    assert made.headers["cache-control"] == "no-store"
    info = made.json()
    key = info.pop("key")
    assert key.startswith("sk-stella-")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", info.pop("created_at"))
    assert info == {
        "name": "ci",
        "source": "runtime",
        "models": ["echo"],
        "admin": False,
        "requests_per_minute": 2,
        "tokens_per_minute": 0,
        "max_concurrent": 0,
        "requests_per_day": 0,
        "tokens_per_day": 0,
        "revoked": False,
        "usd_per_day": 0.0,
    }
    assert taken.status_code == 409 and "exists already" in taken.text
    assert configured.status_code == 409 and "configured already" in configured.text
    assert by_bob.status_code == 403
    # Only its digest is kept: nothing the state store holds is the key.
    stored = app.state.stella.state.keys["ci"]
    assert stored["sha256"] == sha(key) and key not in repr(stored)
    assert not any(key in repr(e) for e in logged)
    assert [
        (e["action"], e["name"], e["result"]) for e in logged if e["event"] == "key_change"
    ] == [
        ("create", "ci", "ok"),
        ("create", "ci", "conflict"),
        ("create", "bob", "conflict"),
    ]
    other = {**CHAT, "model": "smollm2-135m"}
    one, two, three, elsewhere, revoked, after = asyncio.run(
        calls(
            app,
            ("POST", "/api/v1/chat", key, CHAT),
            ("POST", "/api/v1/chat", key, CHAT),
            ("POST", "/api/v1/chat", key, CHAT),  # its requests_per_minute, as a config key's
            ("POST", "/api/v1/chat", key, other),  # not one of its models
            ("DELETE", "/api/v1/keys/ci", ROOT, None),
            ("POST", "/api/v1/chat", key, CHAT),
        )
    )
    assert (one.status_code, two.status_code, three.status_code) == (200, 200, 429)
    assert three.headers["x-ratelimit-limit"] == "2"
    assert elsewhere.status_code in (403, 404)
    assert revoked.status_code == 200
    assert revoked.headers["cache-control"] == "no-store"
    assert revoked.json() == {"revoked": "ci", "source": "runtime", "sources": ["runtime"]}
    assert after.status_code == 401


def test_a_server_without_keys_makes_none_at_runtime() -> None:
    app = app_for({})
    (r,) = asyncio.run(calls(app, ("POST", "/api/v1/keys", "", {"name": "ci"})))
    assert r.status_code == 409
    assert "no keys configured" in r.json()["error"]["message"]


def test_a_runtime_key_admin_may_revoke_the_configured_last_one() -> None:
    # A runtime admin key counts as an admin: the configured one may go then.
    app = app_for(KEYS)
    (made,) = asyncio.run(
        calls(app, ("POST", "/api/v1/keys", ROOT, {"name": "ops2", "admin": True}))
    )
    assert made.status_code == 201
    key = made.json()["key"]
    gone, last = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/root", key, None),
            ("DELETE", "/api/v1/keys/ops2", key, None),
        )
    )
    assert gone.status_code == 200
    assert last.status_code == 409


def test_a_runtime_key_made_on_one_replica_works_on_the_other(redis: Redis) -> None:  # noqa: F811
    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    with run_stella(cfg) as a, run_stella(cfg) as b:
        body = {"name": "ci", "models": ["echo"], "requests_per_day": 3}
        r = httpx.post(a.url + "/api/v1/keys", json=body, headers=bearer(ROOT))
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        # The name is taken on every replica: Redis checks it with the write.
        r = httpx.post(b.url + "/api/v1/keys", json=body, headers=bearer(ROOT))
        assert r.status_code == 409

        def served() -> bool:
            r = httpx.post(b.url + "/api/v1/chat", json=CHAT, headers=bearer(key))
            return r.status_code == 200

        assert eventually(served, stella_app.ROUTING_POLL_S + 1.0) <= stella_app.ROUTING_POLL_S + 1
        # Its daily quota is one count across replicas, as a configured key's.
        codes = [
            httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(key)).status_code
            for s in (a, b, a)
        ]
        assert codes == [200, 200, 429]
        # Revoked on the other replica: refused here within the poll interval.
        r = httpx.delete(b.url + "/api/v1/keys/ci", headers=bearer(ROOT))
        assert r.status_code == 200 and r.json()["source"] == "runtime"

        def refused() -> bool:
            r = httpx.post(a.url + "/api/v1/chat", json=CHAT, headers=bearer(key))
            return r.status_code == 401

        assert eventually(refused, stella_app.ROUTING_POLL_S + 1.0) <= stella_app.ROUTING_POLL_S + 1
        # Both times are the store's: the other replica lists them as they were written.
        (row,) = [
            k
            for k in httpx.get(a.url + "/api/v1/keys", headers=bearer(ROOT)).json()["keys"]
            if k["name"] == "ci"
        ]
        assert row["revoked"] and row["created_at"] <= row["revoked_at"], row
        made = httpx.post(a.url + "/api/v1/keys", json={"name": "later"}, headers=bearer(ROOT))
        assert made.status_code == 201
    # Redis keeps both across restarts: a replica started now has them as they are.
    with run_stella(cfg) as c:
        assert httpx.post(c.url + "/api/v1/chat", json=CHAT, headers=bearer(key)).status_code == 401
        later = bearer(made.json()["key"])
        assert httpx.post(c.url + "/api/v1/chat", json=CHAT, headers=later).status_code == 200


def test_the_list_names_every_key_and_never_a_digest_or_a_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STELLA_API_KEYS", f"ops={OPS}")
    app = app_for(merge(KEYS, {"limits": {"tokens_per_minute": 5000}}))
    by_bob, made, _, listed = asyncio.run(
        calls(
            app,
            ("GET", "/api/v1/keys", BOB, None),
            ("POST", "/api/v1/keys", ROOT, {"name": "ci", "admin": True, "max_concurrent": 2}),
            ("DELETE", "/api/v1/keys/bob", ROOT, None),
            ("GET", "/api/v1/keys", ROOT, None),
        )
    )
    key = made.json()["key"]
    assert listed.status_code == 200, listed.text
    rows = {k["name"]: k for k in listed.json()["keys"]}
    # When a runtime key was made and a key revoked, as the store keeps them (UTC ISO
    # 8601); a configured key's making is unknown: absent.
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"
    assert re.match(stamp, rows["ci"]["created_at"]) and "revoked_at" not in rows["ci"]
    assert made.json()["created_at"] == rows["ci"]["created_at"]
    assert re.match(stamp, rows["bob"]["revoked_at"]) and "created_at" not in rows["bob"]
    assert not {"created_at", "revoked_at"} & (rows["root"].keys() | rows["ops"].keys())
    assert [(k["name"], k["source"], k["admin"], k["revoked"]) for k in rows.values()] == [
        ("root", "config", True, False),
        ("bob", "config", False, True),
        ("ops", "env", True, False),
        ("ci", "runtime", True, False),
    ]
    assert rows["bob"]["models"] == ["echo"] and rows["ci"]["models"] == ["*"]
    # The limits that apply: its own, else [limits]' default.
    assert (rows["ci"]["max_concurrent"], rows["ci"]["tokens_per_minute"]) == (2, 5000)
    for secret in (key, sha(key), sha(ROOT), sha(BOB), sha(OPS), OPS, ROOT):
        assert secret not in listed.text
    assert by_bob.status_code == 403


def test_the_list_reads_the_store_and_answers_503_while_redis_does_not(
    redis: Redis,  # noqa: F811
) -> None:
    import os
    import signal

    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    with run_stella(cfg) as a, run_stella(cfg) as b:
        r = httpx.post(a.url + "/api/v1/keys", json={"name": "ci"}, headers=bearer(ROOT))
        assert r.status_code == 201
        # At once on the other replica: the list is the store's, not its table's.
        listed = httpx.get(b.url + "/api/v1/keys", headers=bearer(ROOT)).json()["keys"]
        assert [k["name"] for k in listed] == ["root", "bob", "ci"]
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)  # up, but not answering
        try:
            with httpx.Client(timeout=30, headers=bearer(ROOT)) as c:
                codes = [c.get(b.url + "/api/v1/keys").status_code for _ in range(3)]
                gone = c.delete(a.url + "/api/v1/keys/bob")
                # Meanwhile each replica serves with the keys it last read.
                chat = c.post(b.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB))
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert codes == [503, 503, 503]
        assert gone.status_code == 503
        assert "the change was not applied" in gone.json()["error"]["message"]
        assert chat.status_code == 200
        assert httpx.post(b.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB)).status_code == 200


def test_the_clients_and_the_cli_manage_a_live_server_s_keys() -> None:
    import os

    from stella.client import AsyncClient, Client, ConflictError
    from tests.live import stella_cli

    with run_stella(KEYS) as s:
        with Client(s.url, api_key=ROOT) as c:
            made = c.create_key("ci", models=["echo"], requests_per_day=5)
            assert made.name == "ci" and made.requests_per_day == 5
            with pytest.raises(ConflictError):
                c.create_key("ci")
            with Client(s.url, api_key=made.key) as ci:
                assert ci.chat([{"role": "user", "content": "hi"}], model="echo").response

        async def in_async() -> tuple[Any, Any]:
            async with AsyncClient(s.url, api_key=ROOT) as c:
                other = await c.create_key("async-ci", admin=True)
                listed = await c.list_keys()
                return other, listed

        other, listed = asyncio.run(in_async())
        assert other.admin and other.source == "runtime"
        assert [(k.name, k.source) for k in listed.keys] == [
            ("root", "config"),
            ("bob", "config"),
            ("async-ci", "runtime"),
            ("ci", "runtime"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
        env["STELLA_API_KEY"] = ROOT
        url = ("--url", s.url)
        made_cli = stella_cli(
            "keys", "create", "cli-key", "--models", "echo", "--rpm", "9", *url, env=env
        )
        assert made_cli.returncode == 0, made_cli.stderr
        key = made_cli.stdout.strip()
        assert key.startswith("sk-stella-") and "shown once" in made_cli.stderr
        # An admin-only key: no model at all.
        ops = stella_cli("keys", "create", "ops-cli", "--admin", "--no-models", *url, env=env)
        assert ops.returncode == 0, ops.stderr
        with Client(s.url, api_key=ops.stdout.strip()) as c:
            assert [k.models for k in c.list_keys().keys if k.name == "ops-cli"] == [[]]
        table = stella_cli("keys", "list", *url, env=env)
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].split() == [
            "NAME",
            "SOURCE",
            "ADMIN",
            "CREATED",
            "EXPIRES",
            "REVOKED",
            "RPM",
            "TPM",
            "CONC",
            "RPD",
            "TPD",
            "USD/DAY",
            "MODELS",
        ]
        # The limits that apply, as --json gives them: its own rpm, the others unlimited;
        # when a runtime key was made ("-": a configured key's, unknown); no expiry ("-").
        lines = {line.split()[0]: line.split() for line in table.stdout.splitlines()}
        cli_row = lines["cli-key"]
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", cli_row.pop(3)), cli_row
        # No expiry ("-"), not revoked, its rpm, the other limits and the budget 0.
        assert cli_row == ["cli-key", "runtime", "no", "-", "no", "9", *["0"] * 5, "echo"]
        assert lines["root"][3:6] == ["-", "-", "no"]
        assert lines["ops-cli"][2] == "yes" and lines["ops-cli"][-1] == "(none)"
        gone = stella_cli("keys", "revoke", "bob", *url, env=env)
        assert gone.returncode == 0, gone.stderr
        assert gone.stdout.strip() == "revoked bob (config)" and "still lists it" in gone.stderr
        again = stella_cli("keys", "revoke", "bob", "--json", *url, env=env)
        assert again.returncode == 1 and "revoked already" in again.stderr
        with Client(s.url, api_key=ROOT) as c:
            assert c.revoke_key("cli-key").source == "runtime"
            rows = {k.name: k.revoked for k in c.list_keys().keys}
        assert rows["bob"] and rows["cli-key"] and not rows["ci"]
        # A revoked key's row says when.
        table = stella_cli("keys", "list", *url, env=env)
        (bob,) = [line.split() for line in table.stdout.splitlines() if line.startswith("bob ")]
        assert re.match(r"^\d{4}-\d\d-\d\dT", bob[5]) and bob[3] == bob[4] == "-", bob
        assert httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(key)).status_code == 401


ENVK = "sk-keys-envk-0007777"  # an env key one replica has and the other lacks


def test_a_name_a_replica_configures_and_another_made_at_runtime_is_revoked_whole(
    redis: Redis,  # noqa: F811
) -> None:
    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    with run_stella(cfg) as a, run_stella(cfg, {"STELLA_API_KEYS": f"envk={ENVK}"}) as b:
        # A's config lacks the name: a runtime key may take it there.
        r = httpx.post(a.url + "/api/v1/keys", json={"name": "envk"}, headers=bearer(ROOT))
        assert r.status_code == 201, r.text
        runtime = r.json()["key"]
        listed = httpx.get(b.url + "/api/v1/keys", headers=bearer(ROOT)).json()["keys"]
        rows = [(k["name"], k["source"], k["revoked"], k.get("skipped")) for k in listed]
        # Both listed on B, the runtime one said to be skipped there.
        assert rows == [
            ("root", "config", False, None),
            ("bob", "config", False, None),
            ("envk", "env", False, None),
            ("envk", "runtime", False, "a configured key of this replica has this name"),
        ]
        r = httpx.delete(b.url + "/api/v1/keys/envk", headers=bearer(ROOT))
        assert r.status_code == 200, r.text
        assert (r.json()["source"], r.json()["sources"]) == ("env", ["env", "runtime"])
        chat = httpx.post(b.url + "/api/v1/chat", json=CHAT, headers=bearer(ENVK))
        assert chat.status_code == 401

        def refused() -> bool:
            r = httpx.post(a.url + "/api/v1/chat", json=CHAT, headers=bearer(runtime))
            return r.status_code == 401

        eventually(refused, stella_app.ROUTING_POLL_S + 2.0)
        listed = httpx.get(b.url + "/api/v1/keys", headers=bearer(ROOT)).json()["keys"]
        assert [(k["name"], k["revoked"]) for k in listed if k["name"] == "envk"] == [
            ("envk", True),
            ("envk", True),
        ]
        again = httpx.delete(b.url + "/api/v1/keys/envk", headers=bearer(ROOT))
        assert again.status_code == 404 and "revoked already" in again.text


def test_the_last_admin_is_counted_among_the_stored_keys_a_replica_takes() -> None:
    app = app_for(KEYS)
    store = app.state.stella.state
    admin = {"sha256": sha("sk-keys-stored-88888"), "admin": True}
    # Stored admin entries no replica takes: a field this version does not know, a
    # name a key may not have, a digest that is none.
    store.keys.update(
        {
            "newer": {**admin, "team": "ml"},
            "bad|name": admin,
            "short": {"sha256": "abc", "admin": True},
        }
    )
    (last,) = asyncio.run(calls(app, ("DELETE", "/api/v1/keys/root", ROOT, None)))
    assert last.status_code == 409, last.text
    assert "the last admin key" in last.json()["error"]["message"]


def test_stored_entries_no_replica_reads_are_listed_and_a_delete_removes_them(
    redis: Redis,  # noqa: F811
) -> None:
    import redis as redis_py

    entry = {"sha256": sha("sk-keys-newer-99999"), "team": "ml"}
    client = redis_py.Redis.from_url(redis.url)
    try:
        client.hset(
            "stella:keys",
            mapping={
                "junk": b"{not json",
                "newer": msgspec.json.encode(entry),
                "bad|name": msgspec.json.encode({"sha256": sha("sk-keys-bad-000000")}),
            },
        )
        cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
        with run_stella(cfg) as s, httpx.Client(base_url=s.url, headers=bearer(ROOT)) as c:
            listed = c.get("/api/v1/keys").json()["keys"]
            rows = {k["name"]: k for k in listed if k["source"] == "runtime"}
            assert sorted(rows) == ["bad|name", "junk", "newer"]
            for row in rows.values():  # listed, and said to work nowhere
                assert row["skipped"].startswith("unreadable: "), row
                assert (row["admin"], row["models"], row["revoked"]) == (False, [], False)
            assert "not JSON" in rows["junk"]["skipped"]
            assert "team" in rows["newer"]["skipped"]
            # The name is taken while the entry is there; a DELETE removes it.
            assert c.post("/api/v1/keys", json={"name": "junk"}).status_code == 409
            for name in ("junk", "newer", "bad%7Cname"):
                r = c.delete(f"/api/v1/keys/{name}")
                assert r.status_code == 200, r.text
                assert "was removed" in r.json()["detail"]
            assert [k["source"] for k in c.get("/api/v1/keys").json()["keys"]] == [
                "config",
                "config",
            ]
            assert c.post("/api/v1/keys", json={"name": "junk"}).status_code == 201
            assert c.delete("/api/v1/keys/newer").status_code == 404
        # The removed entry's key stays refused by a replica that would read it.
        assert client.hget("stella:revoked", entry["sha256"]) == b"newer"
    finally:
        client.close()


def test_a_store_that_comes_back_without_its_keys_is_logged(redis: Redis) -> None:  # noqa: F811
    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    with run_stella(cfg) as s, httpx.Client(base_url=s.url, headers=bearer(ROOT)) as c:
        assert c.delete("/api/v1/keys/bob").status_code == 200
        made = c.post("/api/v1/keys", json={"name": "ci"})
        assert made.status_code == 201
        # A revocation or a runtime key changed through the API is no loss.
        assert c.delete("/api/v1/keys/ci").status_code == 200
        assert c.post("/api/v1/keys", json={"name": "ci2"}).status_code == 201
        time.sleep(stella_app.ROUTING_POLL_S + 0.5)  # the follower has read them all
        assert not [line for line in s.lines() if "stored_keys_lost" in line]
        redis.restart_empty()

        def warned() -> list[str]:
            return [line for line in s.lines() if "stored_keys_lost" in line]

        eventually(lambda: bool(warned()), stella_app.ROUTING_POLL_S + 5.0)
        (line,) = warned()
        event = msgspec.json.decode(line)
        assert (event["revocations"], event["runtime_keys"]) == (2, 2), event
        assert event["names"] == ["bob", "ci", "ci2"]
        # As documented: the revocations are gone with the store.
        chat = httpx.post(s.url + "/api/v1/chat", json=CHAT, headers=bearer(BOB))
        assert chat.status_code == 200


def test_a_long_name_is_cut_in_the_answer_and_the_log() -> None:
    app = app_for(KEYS)
    name = "n" * 10_000
    with capture_logs() as logged:
        (r,) = asyncio.run(calls(app, ("DELETE", f"/api/v1/keys/{name}", ROOT, None)))
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert message == f"no key named {'n' * 200 + '…'!r}"
    (event,) = [e for e in logged if e["event"] == "key_change"]
    assert event["name"] == "n" * 200 + "…"


def test_keys_stored_before_their_times_were_kept_are_listed_without_them(
    redis: Redis,  # noqa: F811
) -> None:
    import redis as redis_py

    old = "sk-keys-old-00004444"
    client = redis_py.Redis.from_url(redis.url)
    try:
        # As an earlier version wrote them: no time of making, none of revoking.
        client.hset("stella:keys", "old", msgspec.json.encode({"sha256": sha(old)}))
        client.hset("stella:revoked", sha(BOB), "bob")
        cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
        with run_stella(cfg) as s, httpx.Client(base_url=s.url, headers=bearer(ROOT)) as c:
            rows = {k["name"]: k for k in c.get("/api/v1/keys").json()["keys"]}
            assert (rows["old"]["source"], rows["old"].get("skipped")) == ("runtime", None)
            assert "created_at" not in rows["old"] and "revoked_at" not in rows["bob"]
            assert rows["bob"]["revoked"]
            assert c.post("/api/v1/chat", json=CHAT, headers=bearer(old)).status_code == 200
            assert c.delete("/api/v1/keys/old").status_code == 200
            (row,) = [k for k in c.get("/api/v1/keys").json()["keys"] if k["name"] == "old"]
            assert row["revoked"] and row["revoked_at"] and "created_at" not in row
    finally:
        client.close()
