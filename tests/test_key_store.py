"""The stored keys as they grow: a purge takes its revocations with it, a replica reads
the keys in time however many revocations the store holds, and follows routes and keys
apart; on a real redis-server."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from stella import app as stella_app
from stella import auth as stella_auth
from stella import state_redis
from stella.errors import Unavailable
from stella.settings import StateSettings
from stella.state_redis import RedisState
from tests.live import merge
from tests.test_key_lifecycle import chat, made
from tests.test_keys import BOB, CHAT, KEYS, ROOT, app_for, calls, sha
from tests.test_redis import Redis, redis, redis_server  # noqa: F401  (fixtures)

# Revocations of keys nobody holds (as older versions left one of every secret ever
# revoked or rotated away), or runtime keys: `count` of them, written by Redis itself.
FILL_REVOKED = """
for i = 1, tonumber(ARGV[1]) do
  local digest = redis.sha1hex('k' .. i) .. string.rep('0', 24)
  redis.call('HSET', KEYS[1], digest, 'sess-' .. i)
  redis.call('HSET', KEYS[2], digest, '2026-11-29T00:00:00Z')
end
"""
FILL_KEYS = """
for i = 1, tonumber(ARGV[1]) do
  local digest = redis.sha1hex('key' .. i) .. string.rep('0', 24)
  redis.call('HSET', KEYS[1], 'key-' .. i, cjson.encode({sha256 = digest, models = {'echo'}}))
end
"""


def fill(url: str, script: str, keys: list[str], count: int) -> None:
    """Run a FILL_ script on the test's redis-server."""
    import redis as redis_py

    client = redis_py.Redis.from_url(url, socket_timeout=60)
    try:
        client.eval(script, len(keys), *keys, count)
    finally:
        client.close()


def test_a_purge_drops_its_revocations_but_not_one_the_config_holds() -> None:
    app = app_for(KEYS)
    store = app.state.stella.state
    key = made(app, {"name": "ci"})
    # Revoked, then purged: nothing of it is left in the store, and it stays refused.
    answers = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/ci", ROOT, None),
            ("DELETE", "/api/v1/keys/ci?purge=true", ROOT, None),
        )
    )
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert not store.revoked and not store.revoked_at and not store.keys
    assert chat(app, key).status_code == 401
    # An entry holding a secret the config holds too (written by hand: bob's), revoked
    # with it, and one whose secret was revoked under another name: their revocations
    # stay, and so does the refusal of bob's key.
    other = "sk-keys-other-0004444"
    store.keys.update({"copy": {"sha256": sha(BOB)}, "twin": {"sha256": sha(other)}})
    store.revoked[sha(other)] = "someone"
    store.keys_version += 1
    assert chat(app, BOB).status_code == 200
    answers = asyncio.run(
        calls(
            app,
            ("DELETE", "/api/v1/keys/copy", ROOT, None),
            ("DELETE", "/api/v1/keys/copy?purge=true", ROOT, None),
            ("DELETE", "/api/v1/keys/twin?purge=true", ROOT, None),
        )
    )
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert store.revoked == {sha(BOB): "copy", sha(other): "someone"}
    assert not store.keys
    assert chat(app, BOB).status_code == 401 and chat(app, other).status_code == 401


def test_a_purged_key_leaves_nothing_in_the_limiter_and_its_plans_make_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stella import limits

    monkeypatch.setattr(limits, "PLANS_KEPT", 3)
    app = app_for(merge(KEYS, {"limits": {"max_concurrent": 2, "requests_per_minute": 100}}))
    admission = app.state.stella.admission
    keys = [made(app, {"name": f"k{i}"}) for i in range(5)]
    for key in keys:
        assert chat(app, key).status_code == 200
    # The newest plans kept, the oldest gone: not the first ones kept and nothing new.
    assert len(admission._plans) == 3
    assert {p[0] for p in admission._plans} == {"k2", "k3", "k4"}
    (r,) = asyncio.run(calls(app, ("DELETE", "/api/v1/keys/k4?purge=true", ROOT, None)))
    assert r.status_code == 200, r.text
    # No slot of any name is kept while no call holds one.
    assert admission.slots._sems == {}


def test_a_store_with_many_revocations_is_read_in_time_and_a_restart_reads_them(
    redis: Redis,  # noqa: F811
) -> None:
    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    app = app_for(cfg)
    svc = app.state.stella

    async def first() -> tuple[list[httpx.Response], float]:
        async with app.router.lifespan_context(app):
            (made_key,) = await calls(app, ("POST", "/api/v1/keys", ROOT, {"name": "ci"}))
            (revoked,) = await calls(app, ("DELETE", "/api/v1/keys/bob", ROOT, None))
            assert (made_key.status_code, revoked.status_code) == (201, 200)
            fill(redis.url, FILL_REVOKED, ["stella:revoked", "stella:revoked_at"], 200_000)
            started = time.monotonic()
            (listed,) = await calls(app, ("GET", "/api/v1/keys", ROOT, None))
            took = time.monotonic() - started
            assert listed.status_code == 200, listed.text
            answers = await calls(
                app,
                ("DELETE", "/api/v1/keys/ci", ROOT, None),
                ("GET", "/api/v1/keys", ROOT, None),
                ("POST", "/api/v1/keys", ROOT, {"name": "ci2"}),
                ("PATCH", "/api/v1/keys/ci2", ROOT, {"requests_per_minute": 5}),
                ("POST", "/api/v1/keys/ci2/rotate", ROOT, None),
                ("DELETE", "/api/v1/keys/ci2?purge=true", ROOT, None),
            )
            assert svc.state.down_since is None and svc.state.errors == 0
            return [made_key, *answers], took

    answers, took = asyncio.run(first())
    assert [r.status_code for r in answers[1:]] == [200, 200, 201, 200, 201, 200], [
        r.text for r in answers
    ]
    # Only the revocations of the keys it may take are read, not 200,000 of them: the
    # listing's round trips take what they take with none.
    assert took < state_redis.REDIS_TIMEOUT_S / 2, took
    rows = {(k["name"], k["source"]): k["revoked"] for k in answers[2].json()["keys"]}
    assert rows == {("root", "config"): False, ("bob", "config"): True, ("ci", "runtime"): True}
    # A replica started now reads the keys at once: the revoked configured key and the
    # revoked runtime key refused, not the configured keys alone.
    again = app_for(cfg)

    async def restarted() -> list[httpx.Response]:
        async with again.router.lifespan_context(again):
            return await calls(
                again,
                ("POST", "/api/v1/chat", BOB, CHAT),
                ("POST", "/api/v1/chat", answers[0].json()["key"], CHAT),
                ("GET", "/ready", ROOT, None),
            )

    bob, ci, ready_now = asyncio.run(restarted())
    assert bob.status_code == 401 and ci.status_code == 401
    assert ready_now.status_code == 200 and "keys" not in ready_now.json()["checks"]


def test_many_keys_are_read_with_the_bulk_timeout_and_a_slow_read_is_no_outage(
    redis: Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fill(redis.url, FILL_KEYS, ["stella:keys"], 50_000)
    # A per-call timeout well under what reading 50,000 keys takes here (some 0.7 s),
    # well over what any other command takes.
    monkeypatch.setattr(state_redis, "REDIS_TIMEOUT_S", 0.2)

    async def read(bulk_s: float) -> tuple[Any, RedisState]:
        monkeypatch.setattr(state_redis, "REDIS_BULK_TIMEOUT_S", bulk_s)
        st = RedisState(StateSettings(redis_url=redis.url))
        try:
            try:
                got: Any = len((await st.load_keys()).keys)
            except Unavailable as exc:
                got = exc
            # The limits stay on Redis.
            (take,) = await st.buckets().take_all([("rpm:key:k", 10.0, 1.0, 1.0)])
            assert not take.local
            return got, st
        finally:
            await st.aclose()

    got, st = asyncio.run(read(30.0))
    assert got == 50_000
    assert st.down_since is None and st.errors == 0
    # Past the bulk timeout: a 503 that says so, and Redis is not taken to be down.
    got, st = asyncio.run(read(0.001))
    assert isinstance(got, Unavailable), got
    assert "answered the keys' read too slowly" in got.message
    assert st.down_since is None and st.errors == 0


def test_routes_are_followed_while_the_keys_can_t_be_read_and_ready_says_so(
    redis: Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis as redis_py

    monkeypatch.setattr(stella_app, "ROUTING_POLL_S", 0.05)
    cfg = merge(KEYS, {"state": {"redis_url": redis.url}})
    # Bob's key revoked in the store before this replica starts.
    client = redis_py.Redis.from_url(redis.url)
    client.hset("stella:revoked", sha(BOB), "bob")
    client.incr("stella:routing_version")
    client.close()
    app = app_for(cfg)
    svc = app.state.stella
    failing = {"on": True}
    read_keys = svc.state.load_keys

    async def load_keys(digests: Any = ()) -> Any:
        if failing["on"]:
            raise Unavailable("the state store (Redis) answered the keys' read too slowly")
        return await read_keys(digests)

    svc.state.load_keys = load_keys

    async def run() -> tuple[list[httpx.Response], list[httpx.Response], bool]:
        async with app.router.lifespan_context(app):
            before = await calls(
                app,
                ("POST", "/api/v1/chat", BOB, CHAT),
                ("GET", "/ready", ROOT, None),
            )
            # Another replica's routing change, applied here all the same.
            other = RedisState(StateSettings(redis_url=redis.url))
            try:
                await other.save_route("rt", {"backend": "echo"})
            finally:
                await other.aclose()
            for _ in range(100):
                if svc.router.knows("rt"):
                    break
                await asyncio.sleep(0.05)
            followed = svc.router.knows("rt")
            await asyncio.sleep(0.3)  # more failed reads: warned of once
            failing["on"] = False
            for _ in range(100):
                if sha(BOB) not in svc.auth.keys:
                    break
                await asyncio.sleep(0.05)
            after = await calls(
                app,
                ("POST", "/api/v1/chat", BOB, CHAT),
                ("GET", "/ready", ROOT, None),
            )
            return before, after, followed

    with capture_logs() as logged:
        before, after, followed = asyncio.run(run())
    assert followed
    # Until a first read: the configured keys alone, none revoked, and /ready says so.
    assert before[0].status_code == 200, before[0].text
    assert before[1].status_code == 200
    check = before[1].json()["checks"]["keys"]
    assert check.startswith("degraded (stored keys not read yet: the configured keys alone")
    assert "too slowly" in check
    # Once read: refused, and ready with nothing to say of the keys.
    assert after[0].status_code == 401
    assert "keys" not in after[1].json()["checks"]
    events = [e["event"] for e in logged if e["event"].startswith("keys_sync")]
    assert events == ["keys_sync_failed", "keys_sync_recovered"], events
    assert not [e for e in logged if e["event"] in ("redis_unavailable", "stored_keys_lost")]


def test_a_revocation_gone_from_the_store_while_its_key_works_is_told(
    redis: Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis as redis_py

    # A purge takes revocations away as the store moves on: one whose key would work
    # again (the config still holds it) is a loss all the same.
    monkeypatch.setattr(stella_app, "ROUTING_POLL_S", 0.05)
    app = app_for(merge(KEYS, {"state": {"redis_url": redis.url}}))

    async def run() -> int:
        async with app.router.lifespan_context(app):
            (r,) = await calls(app, ("DELETE", "/api/v1/keys/bob", ROOT, None))
            assert r.status_code == 200
            client = redis_py.Redis.from_url(redis.url)
            try:
                client.hdel("stella:revoked", sha(BOB))
                client.incr("stella:routing_version")
            finally:
                client.close()
            for _ in range(100):
                if sha(BOB) in app.state.stella.auth.keys:
                    break
                await asyncio.sleep(0.05)
            (r,) = await calls(app, ("POST", "/api/v1/chat", BOB, CHAT))
            return r.status_code

    with capture_logs() as logged:
        status = asyncio.run(run())
    assert status == 200
    (lost,) = [e for e in logged if e["event"] == "stored_keys_lost"]
    assert (lost["revocations"], lost["runtime_keys"], lost["names"]) == (1, 0, ["bob"])


def test_a_key_change_keeps_the_stored_entries_readable_by_every_replica(
    redis: Redis,  # noqa: F811
) -> None:
    # The change script's arguments, drops of revocations included, as a replica reads
    # them back.
    async def run() -> None:
        st = RedisState(StateSettings(redis_url=redis.url))
        from stella.state import KeyChange

        try:
            await st.save_key("a", {"sha256": sha("a" * 20)}, "2026-01-01T00:00:00Z")
            read = await st.load_keys()
            revoke = KeyChange({sha("a" * 20): "a"}, at="2026-01-02T00:00:00Z")
            assert await st.change_keys(revoke, read.version)
            read = await st.load_keys()
            assert read.revoked == {sha("a" * 20): "a"}
            assert read.revoked_at == {sha("a" * 20): "2026-01-02T00:00:00Z"}
            spec = {"sha256": sha("b" * 20)}
            purge = KeyChange({}, ("a",), put={"b": spec}, unrevoke=(sha("a" * 20),))
            assert await st.change_keys(purge, read.version)
            after = await st.load_keys()
            assert after.keys == {"b": spec} and not after.revoked and not after.revoked_at
            assert after.changes == read.changes + 1
        finally:
            await st.aclose()

    asyncio.run(run())
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    try:
        assert client.hlen("stella:revoked") == 0
        assert msgspec.json.decode(client.hget("stella:keys", "b")) == {"sha256": sha("b" * 20)}
    finally:
        client.close()


def test_a_change_between_the_keys_and_their_revocations_is_read_again(
    redis: Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis as redis_py

    from stella.state import entry_digests

    # Another replica's change lands between the read of the entries and the look-up
    # of their revocations: the read is made again, whole, never half of each.
    client = redis_py.Redis.from_url(redis.url)
    changes = {"left": 1}

    def meanwhile(keys: dict[str, Any]) -> set[str]:
        if changes["left"]:
            changes["left"] -= 1
            client.hset("stella:revoked", sha("a" * 20), "a")
            client.incr("stella:routing_version")
        return entry_digests(keys)

    monkeypatch.setattr(state_redis, "entry_digests", meanwhile)

    async def run() -> tuple[Any, Any]:
        st = RedisState(StateSettings(redis_url=redis.url))
        try:
            await st.save_key("a", {"sha256": sha("a" * 20)}, "")
            read = await st.load_keys()
            changes["left"] = state_redis.KEYS_READ_TRIES  # it keeps changing: a 503
            try:
                await st.load_keys()
            except Unavailable as exc:
                return read, exc
            return read, None
        finally:
            await st.aclose()

    try:
        read, refused = asyncio.run(run())
    finally:
        client.close()
    assert read.revoked == {sha("a" * 20): "a"} and read.changes == 2
    assert isinstance(refused, Unavailable) and "kept changing" in refused.message


def test_many_keys_are_read_in_pages_the_loop_running_between_them(
    redis: Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis as redis_py

    fill(redis.url, FILL_KEYS, ["stella:keys"], 5_000)
    client = redis_py.Redis.from_url(redis.url)
    digest = client.hget("stella:keys", "key-17")
    client.hset("stella:revoked", msgspec.json.decode(digest)["sha256"], "key-17")
    client.close()
    monkeypatch.setattr(state_redis, "KEYS_PAGE", 500)
    ticks = {"n": 0}
    seen_at: list[int] = []  # the ticks counted as each page of keys is decoded
    decode = state_redis._routes

    def page(raw: dict[bytes, bytes]) -> dict[str, Any]:
        seen_at.append(ticks["n"])
        return decode(raw)

    monkeypatch.setattr(state_redis, "_routes", page)

    async def ticker() -> None:
        while True:
            ticks["n"] += 1
            await asyncio.sleep(0)

    async def run() -> Any:
        st = RedisState(StateSettings(redis_url=redis.url))
        task = asyncio.create_task(ticker())
        try:
            return await st.load_keys()
        finally:
            task.cancel()
            await st.aclose()

    read = asyncio.run(run())
    assert len(read.keys) == 5_000 and read.keys["key-4999"]["models"] == ["echo"]
    assert list(read.revoked.values()) == ["key-17"]
    # Page by page, another task running between any two of them.
    assert len(seen_at) >= 5, seen_at
    assert all(a < b for a, b in itertools.pairwise(seen_at)), seen_at


def test_a_change_between_two_pages_of_keys_is_read_again(
    redis: Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis as redis_py

    fill(redis.url, FILL_KEYS, ["stella:keys"], 3_000)
    monkeypatch.setattr(state_redis, "KEYS_PAGE", 500)
    client = redis_py.Redis.from_url(redis.url)
    pages = {"n": 0}
    decode = state_redis._routes

    def page(raw: dict[bytes, bytes]) -> dict[str, Any]:
        # Another replica's change, as the second page comes: a key added, one removed.
        pages["n"] += 1
        if pages["n"] == 2:
            client.hset("stella:keys", "late", msgspec.json.encode({"sha256": sha("l" * 20)}))
            client.hdel("stella:keys", "key-1")
            client.incr("stella:routing_version")
        return decode(raw)

    monkeypatch.setattr(state_redis, "_routes", page)

    async def run() -> Any:
        st = RedisState(StateSettings(redis_url=redis.url))
        try:
            return await st.load_keys()
        finally:
            await st.aclose()

    try:
        read = asyncio.run(run())
    finally:
        client.close()
    assert pages["n"] > 2  # the change landed mid-read, which was made again
    assert "late" in read.keys and "key-1" not in read.keys and len(read.keys) == 3_000
    assert read.changes == 1


def test_many_keys_are_applied_in_parts_the_old_table_in_use_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stella.auth import Authenticator
    from stella.state import StoredKeys

    app = app_for(KEYS)
    auth: Authenticator = app.state.stella.auth
    monkeypatch.setattr(stella_auth, "KEYS_APPLY_PART", 100)
    keys = {f"k{i}": {"sha256": sha(f"secret-{i:06d}"), "models": ["echo"]} for i in range(1_000)}
    stored = StoredKeys(keys, {}, ("e", 1), {}, {}, 1)
    before = auth.keys
    during: list[bool] = []

    async def watch() -> None:
        while True:
            during.append(auth.keys is before)
            await asyncio.sleep(0)

    async def run() -> None:
        task = asyncio.create_task(watch())
        await asyncio.sleep(0)
        assert await stella_app.apply_keys(auth, stored)
        task.cancel()

    asyncio.run(run())
    # The task ran between parts, and saw the old table whole until the swap.
    assert len(during) >= 5 and all(during), during
    assert auth.keys is not before and len(auth.runtime) == 1_000
    assert auth.keys[sha("secret-000999")].name == "k999"
    # A read a change of this process made stale is not applied.
    auth.local_changes += 1
    fresh = StoredKeys({}, {}, ("e", 2), {}, {}, 2)
    assert not asyncio.run(stella_app.apply_keys(auth, fresh, auth.local_changes - 1))
    assert len(auth.runtime) == 1_000


def test_a_create_on_a_table_read_long_ago_brings_in_other_replicas_revocations() -> None:
    # A steady stream of creates on one replica makes its follower drop every read (a
    # change of its own overtook it): a create on a table read from the store longer ago
    # than KEYS_STALE_S reads the store first, so another replica's revocation arrives.
    from stella.api import keys as keys_api

    app = app_for(KEYS)
    store = app.state.stella.state
    auth = app.state.stella.auth
    key = made(app, {"name": "leaked"})
    assert chat(app, key).status_code == 200
    # Revoked on another replica: in the store, not (yet) in this replica's table.
    store.revoked[sha(key)] = "leaked"
    store.keys_version += 1
    made(app, {"name": "fresh-one"})  # its table was read just now: made from it
    assert chat(app, key).status_code == 200
    auth.read_at -= keys_api.KEYS_STALE_S + 1  # as when the follower's reads were dropped
    made(app, {"name": "fresh-two"})
    assert chat(app, key).status_code == 401
    assert chat(app, made(app, {"name": "fresh-three"})).status_code == 200


def test_a_create_keeps_a_later_read_the_follower_installed_during_its_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A create that read the store first (its table stale) and whose write the follower
    # overtook with a later read: the key is made on that later table, not on its own
    # older read, which would take another replica's revocation back out.
    from stella.api import keys as keys_api

    app = app_for(KEYS)
    store = app.state.stella.state
    auth = app.state.stella.auth
    key = made(app, {"name": "leaked"})
    auth.read_at -= keys_api.KEYS_STALE_S + 1
    save = store.save_key

    async def save_then_follow(name: str, spec: dict[str, Any], created_at: str) -> None:
        await save(name, spec, created_at)
        # Revoked on another replica, and read and installed here by the follower.
        store.revoked[sha(key)] = "leaked"
        store.keys_version += 1
        read = await store.load_keys(auth.digests)
        auth.apply_stored(read.keys, read.revoked, read.changes)

    monkeypatch.setattr(store, "save_key", save_then_follow)
    new = made(app, {"name": "other"})
    assert chat(app, key).status_code == 401
    assert chat(app, new).status_code == 200
