"""Shared state on a real redis-server: limits across processes, restarts, Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from stella.settings import StateSettings
from stella.state_redis import RedisState
from tests.live import (
    NO_MLX,
    in_ci,
    merge,
    on_free_port,
    run_stella,
    stella_cli,
    wait_serving,
)
from tests.test_limits import one_wait_for_every_slot

KEY = "sk-redis-admin-1"

# The client of the plain calls below: httpx.post() and its kin build a client, with its
# TLS context (some 50 ms of CPU), for every call, and these tests make hundreds. None
# keeps a connection between calls, as those functions do not.
http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


class Redis:
    """A redis-server this test started (stopped by its PID)."""

    def __init__(self, workdir: Path) -> None:
        self.port = 0  # chosen by its first start
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            if in_ci():
                pytest.fail("redis-server is missing: apt-get install redis-server")
            pytest.skip("redis-server is not installed")
        if self.port:  # a restart: the replicas were given this port
            self._start(exe, self.port)
            return
        # Its first start may find the port taken by another test run: another port then.
        self.port = on_free_port(lambda port: self._start(exe, port), "redis-server")

    def _start(self, exe: str, port: int) -> int:
        """Start redis-server on `port` and wait until it, not another process there,
        answers; the port."""
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "1 1",
                "--appendonly",
                "yes",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            import socket

            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        try:
            # Whose PONG it was is checked too: another test run's redis-server's would do.
            wait_serving(self.proc, port, up, 10, "redis-server")
        except BaseException:
            self.stop()
            raise
        return port

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart_empty(self) -> None:
        """Stop, forget what was persisted, start again: a Redis back with nothing."""
        self.stop()
        shutil.rmtree(self.dir / "appendonlydir", ignore_errors=True)
        (self.dir / "dump.rdb").unlink(missing_ok=True)
        self.start()

    def reset(self) -> None:
        """Make it as a redis-server just started on an empty directory would be: running,
        answering (not held by SIGSTOP), no keys and no scripts loaded."""
        import signal

        import redis as redis_py

        if self.proc is None or self.proc.poll() is not None:
            self.start()
        else:
            os.kill(self.proc.pid, signal.SIGCONT)  # a test that failed while it stalled
        client = redis_py.Redis.from_url(self.url, socket_timeout=10)
        try:
            client.flushall()
            client.script_flush()
        finally:
            client.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    """One redis-server for the module's tests (see `redis`)."""
    r = Redis(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()


@pytest.fixture
def redis(redis_server: Redis) -> Redis:
    """The module's redis-server, reset for this test. Sharing it is safe: every test
    starts from what a new server would hold (nothing: FLUSHALL, SCRIPT FLUSH, also
    written to its append-only file, so a restart within a test replays no earlier
    test's keys), and one a test stopped, restarted or held is running again. The
    stella replicas and RedisStates of a test are gone with it, and keep nothing there
    but keys."""
    redis_server.reset()
    return redis_server


def config(redis: Redis, **extra: object) -> dict:
    return {"state": {"redis_url": redis.url}, **extra}


def redis_state(redis: Redis, prefix: str) -> RedisState:
    """A RedisState of this process on the test's server, under its own key prefix."""
    return RedisState(StateSettings(redis_url=redis.url, prefix=prefix))


async def past_outage(st: RedisState) -> None:
    """Wait until `st` asks Redis again after a failure (get_usage skips it till then)."""
    await asyncio.sleep(max(0.0, st.retry_at - time.monotonic()))


AUTH = {"Authorization": f"Bearer {KEY}"}
ENV = {"STELLA_API_KEYS": f"ops={KEY}"}
BODY = {"model": "echo", "stream": False, "messages": [{"role": "user", "content": "hi there"}]}


async def _burst(urls: list[str], n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=20) as c:
        calls = [
            c.post(urls[i % len(urls)] + "/api/v1/chat", json=BODY, headers=AUTH) for i in range(n)
        ]
        return [r.status_code for r in await asyncio.gather(*calls)]


def test_two_processes_share_one_limit(redis: Redis) -> None:
    cfg = config(redis, limits={"requests_per_minute": 30})
    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        codes = asyncio.run(_burst([a.url, b.url], 120))
    ok = codes.count(200)
    assert codes.count(429) == 120 - ok
    assert 30 <= ok <= 31  # the bucket refills 0.5 per second while the burst runs


def test_restart_keeps_the_switch_and_the_usage(redis: Redis) -> None:
    cfg = config(
        redis,
        backends={"other": {"kind": "echo"}},
        models={"routes": {"other-model": {"backend": "other"}}},
    )
    with run_stella(cfg, ENV) as s:
        assert (
            http.post(s.url + "/api/v1/models/switch/other-model", headers=AUTH).status_code == 200
        )
        r = http.post(
            s.url + "/api/v1/models",
            headers=AUTH,
            json={"name": "runtime-echo", "backend": "echo", "aliases": ["rt-alias"]},
        )
        assert r.status_code == 201
        for _ in range(3):
            assert http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH).status_code == 200
        # Usage reaches Redis in batches (every 0.5 s), before the restart below.
        store = redis_store(redis)
        eventually(
            lambda: any(
                store.hget(day, "ops|echo|requests") == b"3"
                for day in store.scan_iter("stella:usage:*")
            ),
            10.0,
        )
    with run_stella(cfg, ENV) as s:
        models = http.get(s.url + "/api/v1/models", headers=AUTH).json()
        assert models["default"] == "other-model"
        assert "runtime-echo" in {m["name"] for m in models["models"]}
        usage = http.get(s.url + "/api/v1/usage", headers=AUTH).json()
        row = next(u for u in usage["usage"] if u["model"] == "echo")
        assert row["key"] == "ops" and row["requests"] == 3 and row["completion_tokens"] == 6
        # Removed by its alias: the route itself goes, from the store too.
        r = http.delete(s.url + "/api/v1/models/rt-alias", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"removed": "runtime-echo"}
        assert http.delete(s.url + "/api/v1/models/other-model", headers=AUTH).status_code == 409
    with run_stella(cfg, ENV) as s:
        models = http.get(s.url + "/api/v1/models", headers=AUTH).json()
        assert "runtime-echo" not in {m["name"] for m in models["models"]}


def test_redis_outage_keeps_serving_then_recovers(redis: Redis) -> None:
    cfg = config(redis, limits={"requests_per_minute": 1000})
    with run_stella(cfg, ENV) as s:
        assert http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH).status_code == 200
        redis.stop()
        for _ in range(5):
            r = http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH)
            assert r.status_code == 200 and r.headers["x-ratelimit-limit"] == "1000"
        s.wait_event(lambda e: True, name="redis_unavailable")
        deadline = time.monotonic() + 5
        while len(s.events("inference")) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(s.events("inference")) == 6
        ready = http.get(s.url + "/ready").json()
        assert ready["checks"]["state"].startswith("degraded")
        redis.start()
        deadline = time.monotonic() + 10
        while not s.events("redis_recovered") and time.monotonic() < deadline:
            http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH)
            time.sleep(0.2)
        assert s.events("redis_recovered")
        assert http.get(s.url + "/ready").json()["checks"]["state"] == "ok"


async def test_leases_never_admit_more_than_the_shared_limit(redis: Redis) -> None:
    from stella.state_redis import LEASE_REQUESTS

    per_minute = 3200.0  # large enough that each Redis call takes a lease of 32 requests
    states = [redis_state(redis, "lease") for _ in range(2)]
    buckets = [s.buckets() for s in states]
    calls = [0, 0]
    for i, st in enumerate(states):
        script = st._take_all

        async def counted(*a: object, _i: int = i, _s: object = script, **kw: object) -> object:
            calls[_i] += 1
            return await _s(*a, **kw)  # type: ignore[operator]

        st._take_all = counted  # type: ignore[method-assign]
    check = [("rpm:key:shared", per_minute, per_minute / 60, 1.0)]
    admitted = 0
    t0 = time.monotonic()
    refused = [False, False]
    while not all(refused):
        for i, b in enumerate(buckets):
            if not refused[i]:
                if (await b.take_all(check))[0].allowed:
                    admitted += 1
                else:
                    refused[i] = True
    refill = (time.monotonic() - t0) * per_minute / 60
    assert admitted <= per_minute + refill + 1  # never more than the bucket held, in total
    assert admitted >= per_minute - 2 * LEASE_REQUESTS  # at most the two leases left unused
    assert sum(calls) < admitted / 10  # most admissions needed no round trip
    for st in states:
        await st.aclose()


async def test_a_bucket_that_needs_redis_every_time_does_not_grow_another_lease(
    redis: Redis,
) -> None:

    st = redis_state(redis, "grow")
    b = st.buckets()
    # requests: 3,200/min leases 32 at a time; tokens: a 2,000-token reserve is more than
    # 1% of 100,000, so that bucket asks Redis on every admission.
    checks = [
        ("rpm:key:k", 3200.0, 3200 / 60, 1.0),
        ("tpm:key:k", 100_000.0, 100_000 / 60, 2000.0),
    ]
    t0 = time.monotonic()
    for _ in range(20):
        assert all(t.allowed for t in await b.take_all(checks))
    refill = (time.monotonic() - t0) * 3200 / 60
    level = float(await st.redis.hget("grow:rl:rpm:key:k", "level"))
    # One lease of 32 plus the first request, not 33 tokens per admission.
    assert level >= 3200 - 33 - 1 - refill
    tokens = float(await st.redis.hget("grow:rl:tpm:key:k", "level"))
    assert tokens <= 100_000 - 20 * 2000 + (time.monotonic() - t0) * 100_000 / 60
    await st.aclose()


def test_a_burst_on_one_replica_admits_the_whole_limit(redis: Redis) -> None:
    # 130 calls at once on 120 a minute: each used to ask Redis for its own lease, the
    # leases took the bucket and 75 calls were refused with it far from empty.
    cfg = config(redis, limits={"requests_per_minute": 120})
    with run_stella(cfg, ENV) as s:
        t0 = time.monotonic()
        codes = asyncio.run(_burst([s.url], 130))
        refill = (time.monotonic() - t0) * 2
    assert 120 <= codes.count(200) <= 120 + refill, codes.count(200)
    assert codes.count(429) == 130 - codes.count(200)


async def test_a_burst_of_checks_takes_one_lease_at_a_time(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stella.state_redis import LEASE_REQUESTS

    # The burst's round trips queue behind each other: on a loaded machine one can pass
    # the 1 s timeout, read as Redis down (per-process limits), which is not under test.
    monkeypatch.setattr("stella.state_redis.REDIS_TIMEOUT_S", 30.0)
    st = redis_state(redis, "one-lease")
    b = st.buckets()
    try:
        # Requests: 120 in the bucket (no refill to speak of), 130 at once: exactly 120.
        requests = [("rpm:key:k", 120.0, 1e-6, 1.0)]
        takes = await asyncio.gather(*(b.take_all(requests) for _ in range(130)))
        assert sum(t.allowed for [t] in takes) == 120
        # Tokens: 200 calls reserving 257 each, half of 100,000: all of them go through.
        tokens = [("tpm:key:k", 100_000.0, 1e-6, 257.0)]
        takes = await asyncio.gather(*(b.take_all(tokens) for _ in range(200)))
        assert all(t.allowed for [t] in takes)
        # A lease never holds more than its size: the rest is in the shared bucket.
        assert b._leases["tpm:key:k"].tokens <= min(1000.0, 257.0 * LEASE_REQUESTS)
        level = float(await st.redis.hget("one-lease:rl:tpm:key:k", "level"))
        assert level + b._leases["tpm:key:k"].tokens == pytest.approx(100_000 - 200 * 257)
    finally:
        await st.aclose()


async def test_many_calls_in_flight_on_one_key_are_paid_by_leases(redis: Redis) -> None:
    # 200 calls at a time on a key with a large limit, each yielding as a request does:
    # a top-up is sized to the calls waiting for it, so most never make a round trip
    # (with leases of 32 requests, most of them did).
    st = redis_state(redis, "demand")
    b = st.buckets()
    trips = 0
    take = st._take_all

    async def counted(**kw: object) -> object:
        nonlocal trips
        trips += 1
        return await take(**kw)

    st._take_all = counted  # type: ignore[method-assign]
    check = [("rpm:key:k", 1e7, 1e7 / 60, 1.0)]

    async def caller() -> int:
        ok = 0
        for _ in range(50):
            ok += (await b.take_all(check))[0].allowed
            await asyncio.sleep(0)
        return ok

    try:
        assert sum(await asyncio.gather(*(caller() for _ in range(200)))) == 200 * 50
        assert trips < 0.05 * 200 * 50, trips
    finally:
        await st.aclose()


async def test_a_stalled_redis_holds_up_only_its_probe_on_a_leased_key(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    from stella import state_redis

    # 6000 a minute: the bucket leases. Once the outage is known, the next probe waits
    # for its timeout; the calls beside it go to the local stand-in at once, instead of
    # waiting for the probe as for a lease top-up.
    # A lease kept, and the next probe due, after 0.2 s rather than a second: the waits
    # for them below are that much shorter; Redis's 1 s timeout, which the others must
    # not wait out, stays.
    monkeypatch.setattr(state_redis, "LEASE_S", 0.2)
    monkeypatch.setattr(state_redis, "REDIS_RETRY_S", 0.2)
    st = redis_state(redis, "stall-lease")
    b = st.buckets()
    check = [("rpm:key:k", 6000.0, 100.0, 1.0)]
    assert redis.proc is not None
    try:
        assert (await b.take_all(check))[0].allowed
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)  # the lease expires: the next call asks Redis
            await b.take_all(check)  # times out: the outage is known
            await asyncio.sleep(0.3)  # the next call is the probe

            async def timed() -> float:
                t = time.monotonic()
                await b.take_all(check)
                return time.monotonic() - t

            probe = asyncio.ensure_future(timed())
            await asyncio.sleep(0.01)
            others = await asyncio.gather(*(timed() for _ in range(10)))
            await probe
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert max(others) < 0.5, others
    finally:
        await st.aclose()


async def test_a_call_larger_than_a_lease_gets_what_the_lease_holds(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 950 calls of 100 tokens leave ~4,000 in Redis and up to 1,000 in this process's
    # lease: a call of 4,500 fits in both together. It was refused while the lease kept
    # the tokens Redis lacked; the lease goes back with the next try.
    # The lease must outlive the 950 calls, which a busy machine can stretch past 1 s.
    monkeypatch.setattr("stella.state_redis.LEASE_S", 30.0)
    monkeypatch.setattr("stella.state_redis.REDIS_TIMEOUT_S", 30.0)  # (as above)
    st = redis_state(redis, "big-call")
    b = st.buckets()
    try:
        small = [("tpm:key:k", 100_000.0, 1e-6, 100.0)]
        takes = await asyncio.gather(*(b.take_all(small) for _ in range(950)))
        assert all(t.allowed for [t] in takes)
        held = b._leases["tpm:key:k"].tokens
        level = float(await st.redis.hget("big-call:rl:tpm:key:k", "level"))
        assert held > 0 and level < 4500 <= level + held, (level, held)
        [big] = await b.take_all([("tpm:key:k", 100_000.0, 1e-6, 4500.0)])
        assert big.allowed
    finally:
        await st.aclose()


async def test_a_lease_left_idle_goes_back_to_the_shared_bucket(redis: Redis) -> None:
    # Replica A takes a lease, then gets none of the key's calls: the lease goes back
    # after a second, so replica B can use the whole bucket (it refills 1 token an hour).
    check = ("rpm:key:k", 3200.0, 1 / 3600, 1.0)
    a, b = redis_state(redis, "idle"), redis_state(redis, "idle")
    await a.start()
    await b.start()
    try:
        assert (await a.buckets().take_all([check]))[0].allowed  # and a lease of 32
        rest = ("rpm:key:k", 3200.0, 1 / 3600, 3200.0 - 33)
        assert (await b.buckets().take_all([rest]))[0].allowed
        whole = ("rpm:key:k", 3200.0, 1 / 3600, 32.0)
        assert not (await b.buckets().take_all([whole]))[0].allowed  # A holds it
        # A's flusher gives it back within LEASE_S and a tick: the shared bucket has it.
        deadline = time.monotonic() + 10
        while float(await b.redis.hget("idle:rl:rpm:key:k", "level")) < 31.99:
            assert time.monotonic() < deadline, "the lease never went back"
            await asyncio.sleep(0.02)
        assert (await b.buckets().take_all([whole]))[0].allowed
    finally:
        await a.aclose()
        await b.aclose()


async def test_leases_go_back_at_shutdown(redis: Redis) -> None:
    check = ("rpm:key:k", 3200.0, 1 / 3600, 1.0)
    st = redis_state(redis, "bye")
    await st.start()
    assert (await st.buckets().take_all([check]))[0].allowed  # and a lease of 32
    await st.aclose()
    level = float(await redis_state(redis, "bye").redis.hget("bye:rl:rpm:key:k", "level"))
    assert level == pytest.approx(3199, abs=0.01)


def test_token_reservations_are_settled_in_redis(redis: Redis) -> None:
    """Each request reserves tokens up front; the real usage is settled afterwards, in
    both directions, in the shared bucket."""
    cfg = config(redis, limits={"tokens_per_minute": 2000, "reserve_tokens": 256})
    store = redis_store(redis)

    def settles(r: httpx.Response, refund: bool) -> None:
        """Wait for the settlement of the call `r` answered to reach Redis (it goes every
        0.1 s), before the next call. The call's take left the bucket's stored level at
        what its X-RateLimit-Remaining says (a reservation over 1% of the bucket takes
        no lease); only the settlement writes it again, up for a refund, down for a
        charge (the refill in between is a few tokens, a settlement 150 and more)."""
        left = int(r.headers["x-ratelimit-remaining"])
        deadline = time.monotonic() + 10
        while True:
            level = float(store.hget("stella:rl:tpm:key:ops", "level") or b"nan")
            if level > left + 1 if refund else level < left:
                return
            assert time.monotonic() < deadline, f"not settled in Redis: {level} after {left}"
            time.sleep(0.02)

    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        # 20 small answers, ~4 tokens each: 80 tokens in all, though each reserves 256.
        codes = []
        for i in range(20):
            r = http.post((a, b)[i % 2].url + "/api/v1/chat", json=BODY, headers=AUTH)
            codes.append(r.status_code)
            if r.status_code == 200:
                settles(r, refund=True)
        assert codes == [200] * 20
        # A 300-word prompt reserves 151 tokens (max_tokens and 600 characters at four a
        # token) but uses ~301: the rest is charged afterwards.
        big = {**BODY, "messages": [{"role": "user", "content": "w " * 300}]}
        big["options"] = {"max_tokens": 1}
        codes = []
        for i in range(20):
            r = http.post((a, b)[i % 2].url + "/api/v1/chat", json=big, headers=AUTH)
            codes.append(r.status_code)
            if r.status_code == 200:
                settles(r, refund=False)
        assert codes.count(200) <= 10 and codes.count(429) >= 10, codes  # 2,000 tokens + refill


def test_a_burst_of_long_prompts_is_paid_for_across_replicas(redis: Redis) -> None:
    # 40 calls at once over two replicas, each a 200-token prompt (four characters a word)
    # and max_tokens 1, on 1,000 tokens a minute: the prompts' estimate is reserved, so
    # about 1,000 tokens' worth go through (each reserving 1 token let 35 of them in).
    cfg = config(redis, limits={"tokens_per_minute": 1000})
    prompt = {**BODY, "messages": [{"role": "user", "content": "abc " * 200}]}
    prompt["options"] = {"max_tokens": 1}

    async def burst(urls: list[str]) -> list[int]:
        async with httpx.AsyncClient(timeout=20) as c:
            calls = [
                c.post(urls[i % 2] + "/api/v1/chat", json=prompt, headers=AUTH) for i in range(40)
            ]
            return [r.status_code for r in await asyncio.gather(*calls)]

    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        codes = asyncio.run(burst([a.url, b.url]))
    assert 4 <= codes.count(200) <= 6, codes
    assert codes.count(429) == 40 - codes.count(200)


def test_a_key_s_next_call_sees_its_last_one_settled(redis: Redis) -> None:
    # Each call reserves 600 of 1,000 tokens a minute and uses a few: the refund goes to
    # Redis with the next check, so calls one after the other all fit.
    cfg = config(redis, limits={"tokens_per_minute": 1000})
    small = {**BODY, "options": {"max_tokens": 600}}
    with run_stella(cfg, ENV) as s:
        codes = [
            http.post(s.url + "/api/v1/chat", json=small, headers=AUTH).status_code
            for _ in range(6)
        ]
    assert codes == [200] * 6


async def test_a_bucket_in_debt_keeps_it_until_it_has_refilled(redis: Redis) -> None:
    st = redis_state(redis, "debt")
    buckets = st.buckets()
    try:
        # 60 a minute (too few to lease), 300 owed: 360 to refill at 1 a second.
        [take] = await buckets.take_all([("tpm:key:k", 60.0, 1.0, 1.0)])
        assert take.allowed
        buckets.give("tpm:key:k", 60.0, 1.0, -300.0)
        await st._flush_gives()
        ttl = await st.redis.ttl("debt:rl:tpm:key:k")
        assert ttl > 300, ttl  # it used to expire after 65 s, its debt forgiven
        [take] = await buckets.take_all([("tpm:key:k", 60.0, 1.0, 1.0)])
        assert not take.allowed and take.retry_after > 200
    finally:
        await st.aclose()


def test_a_change_sent_to_a_stalled_redis_is_not_applied_later(redis: Redis) -> None:
    import os
    import signal

    cfg = config(redis)
    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)  # the change waits in Redis's socket
        try:
            r = http.post(
                a.url + "/api/v1/models",
                headers=AUTH,
                json={"name": "ghost", "backend": "echo"},
                timeout=10,
            )
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert r.status_code == 503 and "not applied" in r.json()["error"]["message"], r.text
        time.sleep(1.5)  # the replicas poll the routing version every 0.5 s
        for server in (a, b):
            models = http.get(server.url + "/api/v1/models", headers=AUTH).json()["models"]
            assert "ghost" not in {m["name"] for m in models}
        # Redis answering again, the same change goes through.
        r = http.post(
            a.url + "/api/v1/models", headers=AUTH, json={"name": "ghost", "backend": "echo"}
        )
        assert r.status_code == 201, r.text


def test_an_admin_change_the_store_refuses_is_not_applied(redis: Redis) -> None:
    cfg = config(
        redis,
        backends={"other": {"kind": "echo"}},
        models={"routes": {"other-model": {"backend": "other"}}},
    )
    with run_stella(cfg, ENV) as s:
        redis.stop()
        r = http.post(s.url + "/api/v1/models/switch/other-model", headers=AUTH)
        assert r.status_code == 503
        r = http.post(
            s.url + "/api/v1/models", headers=AUTH, json={"name": "rt", "backend": "echo"}
        )
        assert r.status_code == 503
        models = http.get(s.url + "/api/v1/models", headers=AUTH).json()
        assert models["default"] == "echo"
        assert "rt" not in {m["name"] for m in models["models"]}
        chat = {**BODY, "model": "rt"}
        assert http.post(s.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 404


def test_routing_changes_reach_the_other_replicas(redis: Redis) -> None:
    cfg = config(
        redis,
        backends={"other": {"kind": "echo"}},
        models={"routes": {"other-model": {"backend": "other"}}},
    )

    def eventually(check: Any, seconds: float = 5.0) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, "the other replica did not follow"
            time.sleep(0.1)

    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        chat = {**BODY, "model": "rt"}
        r = http.post(
            a.url + "/api/v1/models", headers=AUTH, json={"name": "rt", "backend": "echo"}
        )
        assert r.status_code == 201
        eventually(
            lambda: http.post(b.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 200
        )
        r = http.post(a.url + "/api/v1/models/switch/other-model", headers=AUTH)
        assert r.status_code == 200
        eventually(
            lambda: (
                http.get(b.url + "/api/v1/models", headers=AUTH).json()["default"] == "other-model"
            )
        )
        assert http.delete(a.url + "/api/v1/models/rt", headers=AUTH).status_code == 200
        eventually(
            lambda: http.post(b.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 404
        )
        # Redis restarted empty: the store holds no switch, so both go back to the
        # configured default, as a replica starting now would use.
        subprocess.run(["redis-cli", "-u", redis.url, "flushall"], check=True, capture_output=True)
        for server in (a, b):
            eventually(
                lambda s=server: (  # type: ignore[misc]
                    http.get(s.url + "/api/v1/models", headers=AUTH).json()["default"] == "echo"
                )
            )


def test_workers_that_share_redis_take_routing_changes(redis: Redis) -> None:
    # Several workers refuse routing changes only when nothing shares them.
    with run_stella(config(redis, server={"workers": 2}), ENV) as s:
        r = http.post(
            s.url + "/api/v1/models", headers=AUTH, json={"name": "rt", "backend": "echo"}
        )
        assert r.status_code == 201, r.text
        chat = {**BODY, "model": "rt"}
        eventually(
            lambda: all(
                http.post(s.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 200
                for _ in range(6)
            )
        )


def eventually(check: Any, seconds: float = 5.0) -> None:
    """Wait for `check()` to hold (a replica follows the store within a second)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the replica did not follow the store"
        time.sleep(0.1)


@pytest.mark.parametrize("empty", ["flushall", "restart", "snapshot"])
def test_a_store_emptied_and_counted_back_to_a_replicas_version_still_moves_it(
    redis: Redis, empty: str
) -> None:
    import signal

    import redis as redis_py

    cfg = config(redis)
    store = redis_py.Redis.from_url(redis.url)
    saved: dict[bytes, bytes] = {}

    def serves(server: Any, model: str) -> bool:
        chat = {**BODY, "model": model}
        return http.post(server.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 200

    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        if empty == "snapshot":
            # A Redis restored from a snapshot taken before the last change (a crash
            # between save points) counts from that snapshot's number.
            r = http.post(
                a.url + "/api/v1/models", headers=AUTH, json={"name": "kept", "backend": "echo"}
            )
            assert r.status_code == 201, r.text
            saved.update({k: store.dump(k) for k in store.keys("*")})
        r = http.post(
            a.url + "/api/v1/models", headers=AUTH, json={"name": "old", "backend": "echo"}
        )
        assert r.status_code == 201, r.text
        eventually(lambda: serves(b, "old"))  # b has read the store's last change
        # b holds still (it can't poll) while the store is emptied and its first change
        # after that brings the count back to the number b last read.
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            if empty == "flushall":
                subprocess.run(
                    ["redis-cli", "-u", redis.url, "flushall"], check=True, capture_output=True
                )
            elif empty == "restart":
                redis.restart_empty()
            else:
                store.flushall()
                for key, value in saved.items():
                    store.restore(key, 0, value)
            r = http.post(
                a.url + "/api/v1/models", headers=AUTH, json={"name": "new", "backend": "echo"}
            )
            assert r.status_code == 201, r.text
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        for server in (a, b):  # the writer too: it had "old" from before
            eventually(lambda s=server: serves(s, "new") and not serves(s, "old"))  # type: ignore[misc]
            names = {
                m["name"]
                for m in http.get(server.url + "/api/v1/models", headers=AUTH).json()["models"]
            }
            assert "old" not in names and "new" in names


def test_the_first_calls_after_a_redis_restart_succeed(redis: Redis) -> None:
    import signal

    async def usage_at_once(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=10, headers=AUTH) as client:
            calls = [client.get(url + "/api/v1/usage") for _ in range(8)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    with run_stella(config(redis), ENV) as s:
        # Several connections in the pool, each left idle there.
        assert asyncio.run(usage_at_once(s.url)) == [200] * 8
        # Redis restarts while stella holds still: stella never sees it down, only its
        # pooled connections closed by the Redis that went.
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            redis.stop()
            redis.start()
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
        for name in ("r1", "r2", "r3"):
            r = http.post(
                s.url + "/api/v1/models", headers=AUTH, json={"name": name, "backend": "echo"}
            )
            assert r.status_code == 201, r.text
        assert asyncio.run(usage_at_once(s.url)) == [200] * 8
        time.sleep(1.2)  # the routing follower's poll too
        assert not s.events("redis_unavailable"), s.events("redis_unavailable")


async def test_a_slot_take_sent_again_after_it_ran_holds_one_slot(redis: Redis) -> None:
    # The pool sends a command again after a ConnectionError, which may come after
    # Redis ran it: the second take must find the slot its member holds, not refuse.
    st = redis_state(redis, "again")
    try:
        args = [30.0, 1, "member-1"]
        assert await st._take_slot(keys=["again:slot:s"], args=args) == 1
        assert await st._take_slot(keys=["again:slot:s"], args=args) == 1
        assert await st.redis.zcard("again:slot:s") == 1
        assert await st._take_slot(keys=["again:slot:s"], args=[30.0, 1, "member-2"]) == 0
    finally:
        await st.aclose()


async def test_a_balanced_call_takes_the_first_shared_slot_that_frees(redis: Redis) -> None:
    # Slots shared through Redis: a call on a balanced route whose backends are all full
    # takes the first slot that frees on any of them, and the one its other wait may
    # have taken goes back to Redis.
    from stella.backends import build_backend, registry
    from stella.calls import Call
    from stella.core import Pipeline
    from stella.limits import Limiter
    from stella.protocol import ChatRequest, Message
    from stella.routing import Router
    from stella.settings import enabled_backends, load_settings

    routes = {
        "m": {"backend": "echo", "balance": ["other"]},
        "e": {"backend": "echo"},
        "o": {"backend": "other"},
    }
    settings = load_settings(
        {
            "backends": {"local": {"enabled": False}, "other": {"kind": "echo"}},
            "models": {"default": "echo", "routes": routes},
            "limits": {"backends": {"echo": 1, "other": 1}, "queue_timeout_s": 2},
        },
        environ={},
    )
    kinds = registry()
    made = {n: build_backend(n, t, kinds) for n, t in enabled_backends(settings).items()}
    r = Router(settings, made)
    st = redis_state(redis, "spread")
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(settings, st))
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="e")
    try:
        held = await pipeline.prepare(ask, Call(request_id="h"))
        freed = await pipeline.prepare(
            msgspec.structs.replace(ask, model="o"), Call(request_id="f")
        )
        on = msgspec.structs.replace(ask, model="m")
        waiting = asyncio.create_task(pipeline.prepare(on, Call(request_id="w")))
        await asyncio.sleep(0.2)
        assert not waiting.done() and r.busy == {"echo": 2, "other": 1}
        keys = [f"spread:slot:backend:{b}" for b in ("echo", "other")]
        assert [await st.redis.zcard(k) for k in keys] == [1, 1]
        freed.finish()
        inference = await asyncio.wait_for(waiting, 1)
        assert inference.route.backend_name == "other" and inference.waited_ms < 1000
        assert r.busy == {"echo": 1, "other": 1}
        held.finish()
        inference.finish()
        for _ in range(50):  # releases go to Redis in the background
            sets = [await st.redis.zcard(k) for k in keys]
            if sets == [0, 0]:
                break
            await asyncio.sleep(0.02)
        assert sets == [0, 0]
    finally:
        await st.aclose()


def balanced_pipeline(
    redis: Redis, prefix: str, limits: dict[str, Any], breaker: dict[str, Any] | None = None
) -> tuple[Any, Any, RedisState]:
    """A pipeline of this process whose slots are shared through Redis under `prefix`,
    with route `pair` (backend e1, balance [e2]) and `e1` (e1 alone): its router, the
    pipeline and its RedisState."""
    from stella.backends import build_backend, registry
    from stella.core import Pipeline
    from stella.limits import Limiter
    from stella.routing import Router
    from stella.settings import enabled_backends, load_settings

    settings = load_settings(
        {
            "backends": {
                "local": {"enabled": False},
                "e1": {"kind": "echo"},
                "e2": {"kind": "echo"},
            },
            "models": {
                "default": "e1",
                "routes": {"pair": {"backend": "e1", "balance": ["e2"]}, "e1": {"backend": "e1"}},
            },
            "limits": limits,
            **({"breaker": breaker} if breaker else {}),
        },
        environ={},
    )
    kinds = registry()
    made = {n: build_backend(n, t, kinds) for n, t in enabled_backends(settings).items()}
    r = Router(settings, made)
    st = redis_state(redis, prefix)
    pipeline = Pipeline(r, lambda event, fields: None, admission=Limiter(settings, st))
    return r, pipeline, st


async def test_a_balanced_call_goes_at_once_to_a_backend_free_across_the_replicas(
    redis: Redis,
) -> None:
    # Another replica holds e1's one slot: this process holds none, so its guess calls e1
    # free and the call is picked for e1 (its turn). Redis says full: the call takes e2's
    # free slot at once, not after queue_timeout_s waiting for e1 alone (then a 503).
    from stella.calls import Call
    from stella.protocol import ChatRequest, Message

    limits = {"backends": {"e1": 1, "e2": 1}, "queue_timeout_s": 3}
    r, pipeline, st = balanced_pipeline(redis, "across", limits)
    replica = redis_state(redis, "across")  # the other replica, on the same Redis
    theirs = await replica.slots().acquire("backend:e1", 1, 0.0)
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="pair")
    try:
        assert theirs is not None and pipeline.admission.backend_free("e1")
        inference = await asyncio.wait_for(pipeline.prepare(ask, Call(request_id="c")), 2)
        assert inference.route.backend_name == "e2" and inference.waited_ms < 500
        assert r.busy == {"e1": 0, "e2": 1}
        inference.finish()
        # e1 frees across the replicas: the next call, picked for e1, takes its slot.
        replica.slots().release(theirs)
        for _ in range(50):
            if not await st.redis.zcard("across:slot:backend:e1"):
                break
            await asyncio.sleep(0.02)
        inference = await asyncio.wait_for(pipeline.prepare(ask, Call(request_id="n")), 2)
        assert inference.route.backend_name == "e1" and inference.waited_ms < 500
        inference.finish()
    finally:
        for state in (st, replica):
            await state.aclose()


async def test_a_balanced_call_goes_at_once_to_a_backend_without_a_slot_limit(
    redis: Redis,
) -> None:
    # e1's one slot is another replica's, e2 has no slot limit: the call picked for e1
    # (this process's guess calls it free) goes to e2 at once, holding no slot there.
    from stella.calls import Call
    from stella.protocol import ChatRequest, Message

    r, pipeline, st = balanced_pipeline(
        redis, "unlimited", {"backends": {"e1": 1}, "queue_timeout_s": 3}
    )
    replica = redis_state(redis, "unlimited")
    theirs = await replica.slots().acquire("backend:e1", 1, 0.0)
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="pair")
    try:
        assert theirs is not None
        inference = await asyncio.wait_for(pipeline.prepare(ask, Call(request_id="c")), 2)
        assert inference.route.backend_name == "e2" and inference.waited_ms < 500
        assert r.busy == {"e1": 0, "e2": 1}
        assert not st.slots().held  # none of e1's, and e2 has none to hold
        inference.finish()
        assert r.busy == {"e1": 0, "e2": 0}
        replica.slots().release(theirs)
    finally:
        for state in (st, replica):
            await state.aclose()


async def test_a_zero_wait_for_a_shared_slot_asks_redis_once(redis: Redis) -> None:
    # The one ask a balanced call makes before it waits on every backend: a full set
    # answers None after one round trip, not after a pause and another.
    a, b = (redis_state(redis, "once") for _ in "ab")
    sa, sb = a.slots(), b.slots()
    theirs = await sb.acquire("backend:x", 1, 0.0)
    assert theirs is not None

    async def asks() -> int:  # scripts run by Redis so far (a take is one)
        stats = await a.redis.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_eval"))

    before = await asks()
    started = time.monotonic()
    assert await sa.acquire("backend:x", 1, 0.0) is None
    assert await asks() - before == 1 and time.monotonic() - started < 0.1
    sb.release(theirs)
    for _ in range(50):
        mine = await sa.acquire("backend:x", 1, 0.0)
        if mine is not None:
            break
        await asyncio.sleep(0.02)
    assert mine is not None and not sa.free("backend:x", 1)
    sa.release(mine)
    for st in (a, b):
        await st.aclose()


async def test_a_full_backend_spills_to_another_that_was_unusable_when_picked(
    redis: Redis,
) -> None:
    # e2's circuit is open as the call comes: it waits for e1, whose one slot another
    # replica holds (this process's guess calls it free). By the end of its wait e2's
    # circuit lets a call go: the call goes there, not back to e1 for a 503.
    from stella.calls import Call
    from stella.protocol import ChatRequest, Message

    limits = {"backends": {"e1": 1, "e2": 1}, "queue_timeout_s": 0.6}
    r, pipeline, st = balanced_pipeline(
        redis, "spill", limits, {"failure_threshold": 1, "cooldown_s": 0.3}
    )
    replica = redis_state(redis, "spill")
    theirs = await replica.slots().acquire("backend:e1", 1, 0.0)
    r.breakers["e2"].failure("unavailable")
    ask = ChatRequest(messages=[Message(role="user", content="hi")], model="pair")
    try:
        assert theirs is not None and not r.breakers["e2"].available()
        inference = await asyncio.wait_for(pipeline.prepare(ask, Call(request_id="c")), 2)
        assert inference.route.backend_name == "e2" and inference.waited_ms >= 500
        assert r.busy == {"e1": 0, "e2": 1}
        inference.finish()
        replica.slots().release(theirs)
    finally:
        for state in (st, replica):
            await state.aclose()


async def test_a_usage_batch_whose_reply_is_lost_counts_once(redis: Redis) -> None:
    """Redis stalls after taking a batch (the client times out), then applies it when it
    wakes: the batch sent again must not count twice."""
    import os
    import signal

    st = redis_state(redis, "idem")
    day = "2026-11-26"
    record = {"prompt_tokens": 2, "completion_tokens": 3, "status": 200}
    st.record_usage("k", "m", day, record)
    await st._flush()  # Redis knows the script now; one request counted
    assert redis.proc is not None
    for _ in range(3):
        st.record_usage("k", "m", day, record)
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        await st._flush()  # times out: sent, but not confirmed
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    assert st._unconfirmed is not None
    st.record_usage("k", "m", day, record)  # counted while the batch was in doubt
    await past_outage(st)
    rows = await st.get_usage(day)  # flushes: the batch again, then the new one
    assert [(r["requests"], r["prompt_tokens"]) for r in rows] == [(5, 10)]
    # Three batches, one key telling resends: not a key per batch piling up for an hour.
    assert len([k async for k in st.redis.scan_iter("idem:usage_last:*")]) == 1
    await st.aclose()


async def test_usage_days_are_named_on_redis_s_clock(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from stella import state_redis
    from stella.api import admin

    # This replica's clock runs a day ahead (a skew of seconds does the same near
    # midnight): its calls are still counted under the day Redis's clock says.
    real = time.time
    ahead = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    ahead.time = lambda: real() + 86_400
    monkeypatch.setattr(admin, "time", ahead)
    monkeypatch.setattr(state_redis, "time", ahead)
    st = redis_state(redis, "clock")
    record = admin.usage_listener(st)
    # Before Redis's clock is read, this process's is all there is: tomorrow, here.
    record({"key": "k", "model": "m", "prompt_tokens": 1, "status": 200})
    await st.start()
    try:
        # start() reads Redis's clock (the flusher again later): a day behind this one's.
        deadline = time.monotonic() + 10
        while abs(st.clock_offset + 86_400) > 60:
            assert time.monotonic() < deadline, st.clock_offset
            await asyncio.sleep(0.02)
        days = set()
        for _ in range(2):  # the UTC day may turn meanwhile
            sec, _ = await st.redis.time()
            days.add(time.strftime("%Y-%m-%d", time.gmtime(sec)))
            record({"key": "k", "model": "m", "prompt_tokens": 1, "status": 200})
        rows = [r for day in sorted(days) for r in await st.get_usage(day)]
        assert sum(r["requests"] for r in rows) == 2, rows
    finally:
        await st.aclose()


def _skewed_time(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """state_redis's clock made `skew` seconds ahead of the real one, and `step` more at
    each reading (a round trip that takes that long): the dict sets both."""
    import types

    from stella import state_redis

    real = time.time
    knobs = {"skew": 86_400.0, "step": 0.0, "calls": 0.0}

    def now() -> float:
        knobs["calls"] += 1
        return real() + knobs["skew"] + knobs["step"] * knobs["calls"]

    skewed = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    skewed.time = now
    monkeypatch.setattr(state_redis, "time", skewed)
    return knobs


async def test_a_slow_reading_of_redis_s_clock_is_not_used(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stella.state_redis import CLOCK_READ_MAX_S

    knobs = _skewed_time(monkeypatch)
    st = redis_state(redis, "slowclock")
    try:
        # Each reading of the local clock half a second on: the round trip seems slow,
        # and its midpoint says little about when Redis read its clock.
        knobs["step"] = CLOCK_READ_MAX_S * 5
        await st._read_clock()
        assert st.clock_offset == 0.0
        knobs["step"] = 0.0
        await st._read_clock()
        assert abs(st.clock_offset + 86_400) < 60, st.clock_offset
    finally:
        await st.aclose()


async def test_redis_s_clock_is_read_again_every_clock_ticks(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stella import state_redis

    knobs = _skewed_time(monkeypatch)
    monkeypatch.setattr(state_redis, "CLOCK_TICKS", 3)  # every 0.3 s, not 10 s

    st = redis_state(redis, "clockticks")

    async def offset_near(target: float) -> None:
        deadline = time.monotonic() + 10
        while abs(st.clock_offset - target) > 60:
            assert time.monotonic() < deadline, st.clock_offset
            await asyncio.sleep(0.05)

    await st.start()
    try:
        await offset_near(-86_400)  # the first tick's reading
        knobs["skew"] = 2 * 86_400  # this process's clock jumps a day more
        await offset_near(-2 * 86_400)  # a later tick's reading sees it
    finally:
        await st.aclose()


async def test_redis_s_clock_is_read_as_soon_as_redis_is_back(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stella.state_redis import CLOCK_TICKS

    knobs = _skewed_time(monkeypatch)
    st = redis_state(redis, "clockback")
    redis.stop()  # the replica starts while Redis is down
    try:
        await st.start()
        assert st.down_since is not None
        redis.start()
        deadline = time.monotonic() + 10
        while not await st.ping():  # as /ready or the routing poll would find it back
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        back = time.monotonic()
        # Read at the flusher's next tick, not its periodic reading up to 10 s on: till
        # then a key's expiry is compared on this process's clock, a day ahead here.
        while abs(st.clock_offset + knobs["skew"]) > 60:
            assert time.monotonic() - back < CLOCK_TICKS * 0.1 / 5, st.clock_offset
            await asyncio.sleep(0.02)
    finally:
        await st.aclose()


async def test_usage_of_a_direct_model_with_a_bar_in_its_name_stays_its_keys(redis: Redis) -> None:
    # Fields are "key|model|count": a "|" in a direct model's name must not move the key.
    st = redis_state(redis, "bar")
    day = "2026-11-26"
    record = {"prompt_tokens": 2, "completion_tokens": 3, "status": 200}
    st.record_usage("rpm", "echo/x|admin", day, record)
    st.record_usage("rpm", "echo/plain", day, record)
    rows = await st.get_usage(day)
    assert sorted((r["key"], r["model"], r["requests"]) for r in rows) == [
        ("rpm", "echo/plain", 1),
        ("rpm", "echo/x|admin", 1),
    ]
    await st.aclose()


@pytest.mark.parametrize("query", ["decode_responses=true", "protocol=3"])
async def test_a_url_asking_for_other_replies_still_reads_the_store(
    redis: Redis, query: str
) -> None:
    # redis-py takes any query argument of the URL as a keyword: decode_responses (any
    # value, "false" too, is a non-empty string) would make every reply a str, and RESP3
    # other shapes.
    url = f"{redis.url}?{query}"
    st = RedisState(StateSettings(redis_url=url, prefix="decoded-" + query[:4]))
    await st.start()
    try:
        await st.set_default_model("echo")
        assert await st.get_default_model() == "echo"
        await st.save_route("rt", {"backend": "echo"})
        assert await st.load_routes() == {"rt": {"backend": "echo"}}
        read = await st.routing()
        assert read is not None and read[1] == {"rt": {"backend": "echo"}} and read[2] == "echo"
        assert await st.routing_version() == read[0]
        day = "2026-11-26"
        st.record_usage("rpm", "echo", day, {"prompt_tokens": 2, "completion_tokens": 3})
        rows = await st.get_usage()
        assert [(r["key"], r["model"], r["requests"]) for r in rows] == [("rpm", "echo", 1)]
    finally:
        await st.aclose()


def test_a_stalled_redis_costs_one_request_its_timeout_not_every_request(redis: Redis) -> None:
    import os
    import signal

    # Under 100 a minute a bucket never leases: every admission asks Redis.
    cfg = config(redis, limits={"requests_per_minute": 90})
    with run_stella(cfg, ENV) as s:
        assert http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH).status_code == 200
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)  # up, but not answering
        codes, took = [], []
        try:
            with httpx.Client(timeout=30) as c:
                for _ in range(10):
                    t0 = time.monotonic()
                    codes.append(
                        c.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH).status_code
                    )
                    took.append(time.monotonic() - t0)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert codes == [200] * 10
        # One request a second probes the stalled Redis and waits out its 1 s timeout;
        # the others go on at once. Counted, not summed: a busy machine makes the fast
        # ones slower, and more probes fall due while they run (every one waited before).
        waited = [round(t, 2) for t in took if t >= 0.9]
        assert len(waited) <= 4, took


def test_usage_answers_503_at_once_while_redis_is_known_down(redis: Redis) -> None:
    import os
    import signal

    # As admissions do, a usage report skips a Redis known to be down: before, each
    # report waited out the flush's 1 s timeout, then the read's, for its 503.
    cfg = config(redis, limits={"requests_per_minute": 90})  # every admission asks Redis
    with run_stella(cfg, ENV) as s, httpx.Client(timeout=30, headers=AUTH) as c:
        assert c.post(s.url + "/api/v1/chat", json=BODY).status_code == 200
        assert c.get(s.url + "/api/v1/usage").status_code == 200
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)  # up, but not answering
        codes, took = [], []
        try:
            t = time.monotonic()
            # Its admission waits out the timeout: Redis is known down from now on.
            assert c.post(s.url + "/api/v1/chat", json=BODY).status_code == 200
            assert time.monotonic() - t >= 0.9
            stop = time.monotonic() + 2.5
            while time.monotonic() < stop:
                t = time.monotonic()
                codes.append(c.get(s.url + "/api/v1/usage").status_code)
                took.append(round(time.monotonic() - t, 2))
                time.sleep(0.05)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert set(codes) == {503}, codes
        assert took[0] < 0.5, took  # right after the outage was found: no wait at all
        # A report that probes Redis (one a second at most) waits out one timeout, not
        # the flush's and the read's; the others answer at once.
        assert all(t < 1.8 for t in took), took
        assert len([t for t in took if t >= 0.5]) <= 3, took
        # Redis answers again: the counts are all there, the one made meanwhile too.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = c.get(s.url + "/api/v1/usage")
            if r.status_code == 200 and r.json()["totals"]["requests"] == 2:
                break
            time.sleep(0.2)
        assert r.status_code == 200 and r.json()["totals"]["requests"] == 2, r.text


def test_ready_answers_at_once_while_redis_stalls(redis: Redis) -> None:
    import os
    import signal

    # Every replica shares one Redis: were each /ready to wait out Redis's 1 s timeout
    # (a readiness probe's own, by default), a stall would take them all out of service.
    with run_stella(config(redis), ENV) as s:
        assert http.get(s.url + "/ready").json()["checks"]["state"] == "ok"
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)  # up, but not answering
        times: list[float] = []
        states: set[str] = set()
        try:
            stop = time.monotonic() + 3
            with httpx.Client(timeout=10) as c:
                while time.monotonic() < stop:
                    t = time.monotonic()
                    r = c.get(s.url + "/ready")
                    times.append(time.monotonic() - t)
                    assert r.status_code == 200, r.text
                    states.add(r.json()["checks"]["state"])
                    time.sleep(0.05)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        # 1 s each before (Redis's timeout); now at most the 0.25 s wait, and a margin for
        # a loaded machine's HTTP round trip.
        assert max(times) < 0.9, times
        assert states == {"degraded (unreachable)"}, states
        # Redis answers again: the next probe (at most a second on) finds it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if http.get(s.url + "/ready").json()["checks"]["state"] == "ok":
                break
            time.sleep(0.1)
        assert http.get(s.url + "/ready").json()["checks"]["state"] == "ok"


async def test_pings_of_a_stalled_redis_send_one_probe_at_a_time(redis: Redis) -> None:
    import os
    import signal

    st = redis_state(redis, "ping")
    assert await st.ping()
    real = st.redis.ping
    flying, most, sent = 0, 0, 0

    async def counted() -> Any:
        nonlocal flying, most, sent
        flying += 1
        sent += 1
        most = max(most, flying)
        try:
            return await real()
        finally:
            flying -= 1

    st.redis.ping = counted  # type: ignore[method-assign]

    async def timed() -> tuple[bool, float]:
        t = time.monotonic()
        up = await st.ping()
        return up, time.monotonic() - t

    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        results = []
        stop = time.monotonic() + 2.5
        while time.monotonic() < stop:
            results += await asyncio.gather(*(timed() for _ in range(10)))
            await asyncio.sleep(0.1)
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    assert not any(up for up, _ in results)
    assert max(t for _, t in results) < 0.9, results  # not Redis's 1 s timeout
    assert most == 1 and sent <= 4, (most, sent)  # a probe a second, not one per caller
    deadline = time.monotonic() + 5
    while not await st.ping() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert st.down_since is None
    await st.aclose()


def test_concurrency_slots_hold_across_replicas(redis: Redis) -> None:
    cfg = config(
        redis,
        limits={"max_concurrent": 2, "queue_timeout_s": 0.5},
        backends={"slow": {"kind": "echo", "delay_s": 0.1}},
        models={"routes": {"slow": {"backend": "slow"}}},
    )
    body = {**BODY, "model": "slow", "messages": [{"role": "user", "content": "w " * 15}]}

    async def four(urls: list[str]) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as c:
            calls = [
                c.post(urls[i % 2] + "/api/v1/chat", json=body, headers=AUTH) for i in range(4)
            ]
            return sorted(r.status_code for r in await asyncio.gather(*calls))

    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        # Each answer takes ~1.5 s; two replicas, one key: two run, two wait 0.5 s and go.
        assert asyncio.run(four([a.url, b.url])) == [200, 200, 503, 503]
        # The releases reach Redis (at once, in the background): no slot is held there.
        store = redis_store(redis)
        eventually(lambda: store.zcard("stella:slot:key:ops") == 0, 10.0)
        # The slots came back: the same again, not four refusals.
        assert asyncio.run(four([b.url, a.url])) == [200, 200, 503, 503]


async def test_a_wait_for_several_shared_slots_is_one_queue_timeout(redis: Redis) -> None:
    await one_wait_for_every_slot(config(redis))


async def test_slots_come_back_from_leavers_and_from_replicas_that_died(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stella import state_redis

    monkeypatch.setattr(state_redis, "SLOT_TTL_S", 0.5)
    live, dead = (redis_state(redis, "slots") for _ in "ab")
    slots, gone = live.slots(), dead.slots()
    # The dead replica takes both slots and never renews them.
    assert await gone.acquire("key:k", 2, 0.1) and await gone.acquire("key:k", 2, 0.1)
    assert await slots.acquire("key:k", 2, 0.1) is None  # full for now
    first = await slots.acquire("key:k", 2, 2.0)  # the lapsed claims free the slots
    assert first is not None and first[0] == "redis"
    # A client that leaves while queued leaves nothing held behind.
    second = await slots.acquire("key:k", 2, 0.1)
    assert second is not None
    waiting = asyncio.create_task(slots.acquire("key:k", 2, 5.0))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.release(first)
    await asyncio.sleep(0.1)  # the release goes out at once, in the background
    await slots.upkeep()  # and the leaver's take, cut in its round trip, is removed
    assert await live.redis.zcard("slots:slot:key:k") == 1
    assert await slots.acquire("key:k", 2, 0.5) is not None
    for st in (live, dead):
        await st.aclose()


async def test_slots_held_when_redis_comes_back_empty_are_claimed_again(redis: Redis) -> None:
    from stella.state_redis import SLOT_RENEW_S

    # Two calls hold a key's two slots on replica a when Redis restarts empty, or is
    # flushed: a's next renewal puts them back, so b does not admit two more beside them.
    a, b = redis_state(redis, "back"), redis_state(redis, "back")
    sa, sb = a.slots(), b.slots()
    for restart in (True, False):
        held = [await sa.acquire("key:k", 2, 0.1) for _ in range(2)]
        assert all(h is not None and h[0] == "redis" for h in held), held
        if restart:
            redis.restart_empty()
        else:
            await flushall(redis)
        sa._renewed -= SLOT_RENEW_S  # the renewal is due
        await sa.upkeep()
        assert await a.redis.zcard("back:slot:key:k") == 2
        assert await sb.acquire("key:k", 2, 0.2) is None  # before: taken, four at once
        for h in held:
            sa.release(h)
        await sa.upkeep()
        await asyncio.sleep(0.1)  # the releases go out in the background
    assert a.down_since is None
    # b took a freed place before a's renewal: the set then holds more than its size,
    # as many as run, and no one more is admitted until it is back under.
    held = [await sa.acquire("key:k", 2, 0.1) for _ in range(2)]
    await flushall(redis)
    other = await sb.acquire("key:k", 2, 0.1)
    assert other is not None and other[0] == "redis"
    sa._renewed -= SLOT_RENEW_S
    await sa.upkeep()
    assert await a.redis.zcard("back:slot:key:k") == 3
    sa.release(held[0])
    await asyncio.sleep(0.1)
    assert await sb.acquire("key:k", 2, 0.1) is None  # 2 run: still full
    sa.release(held[1])
    await asyncio.sleep(0.1)
    assert await sb.acquire("key:k", 2, 0.5) is not None
    for st in (a, b):
        await st.aclose()


async def flushall(redis: Redis) -> None:
    """Empty the test's Redis (every key of every prefix), on a connection of its own."""
    st = redis_state(redis, "flush")
    try:
        await st.redis.flushall()
    finally:
        await st.aclose()


async def test_a_slot_released_during_its_renewal_is_not_claimed_again(redis: Redis) -> None:
    from stella.state_redis import SLOT_RENEW_S

    # A renewal adds back what it misses: a release that lands before it (on another
    # connection) must not leave a slot claimed that no call holds.
    st = redis_state(redis, "race")
    slots = st.slots()
    await asyncio.gather(*(st.redis.ping() for _ in range(4)))  # a release finds a connection
    for i in range(20):
        held = await slots.acquire("key:k", 1, 1.0)
        assert held is not None
        slots._renewed -= SLOT_RENEW_S
        renewal = asyncio.create_task(slots.upkeep())
        for _ in range(i % 10):  # released at different points of its round trip
            await asyncio.sleep(0)
        await asyncio.sleep(0.0001 * (i // 10))
        slots.release(held)
        await asyncio.wait_for(renewal, 5)
        # The release's own round trip, then any removal queued again by the renewal: a
        # slot claimed again for no call would stay (until its 30 s lapse).
        deadline = time.monotonic() + 3
        while True:
            await slots.upkeep()
            left = await st.redis.zcard("race:slot:key:k")
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert left == 0, i
    await st.aclose()


async def test_a_slot_given_back_goes_to_redis_at_once(redis: Redis) -> None:
    # A release goes to Redis at once (not with the 0.1 s flush): a client whose requests
    # follow one another waits at most one short pause for its own last one's slot.

    st = redis_state(redis, "reuse")
    slots = st.slots()
    held = await slots.acquire("key:k", 1, 0.1)
    for _ in range(5):
        slots.release(held)
        t = time.monotonic()
        held = await slots.acquire("key:k", 1, 1.0)
        assert held is not None and time.monotonic() - t < 0.05
    assert await st.redis.zcard("reuse:slot:key:k") == 1
    slots.release(held)
    await asyncio.sleep(0.1)
    assert await st.redis.zcard("reuse:slot:key:k") == 0
    await st.aclose()


async def test_a_slot_is_free_as_far_as_this_process_knows(redis: Redis) -> None:
    # What a balanced route asks of a backend without a round trip: this process's own
    # holders and waiters, not the other replicas'.
    a, b = (redis_state(redis, "guess") for _ in "ab")
    sa, sb = a.slots(), b.slots()
    assert sa.free("backend:x", 2)
    first = await sa.acquire("backend:x", 2, 0.1)
    assert sa.free("backend:x", 2) and not sa.free("backend:x", 1)
    second = await sb.acquire("backend:x", 2, 0.1)  # another replica's: unseen
    assert sa.free("backend:x", 2)
    waiting = asyncio.create_task(sa.acquire("backend:x", 2, 5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done() and not sa.free("backend:x", 2)  # a waiter of its own
    sb.release(second)
    third = await waiting
    assert third is not None and not sa.free("backend:x", 2)
    for held in (first, third):
        sa.release(held)
    assert sa.free("backend:x", 2)
    for st in (a, b):
        await st.aclose()


async def test_two_replicas_share_a_slot_both_ways(redis: Redis) -> None:
    # No replica keeps a key's slots to itself: while one runs requests back to back,
    # the other's waiting callers still get their turns.

    a, b = (redis_state(redis, "fair") for _ in "ab")
    sa, sb = a.slots(), b.slots()
    stop = time.monotonic() + 2.0

    async def busy(slots: Any) -> int:
        n = 0
        while time.monotonic() < stop:
            held = await slots.acquire("key:k", 2, 1.0)
            if held is not None:
                await asyncio.sleep(0.05)
                slots.release(held)
                n += 1
        return n

    counts = await asyncio.gather(busy(sa), busy(sa), busy(sa), busy(sb))
    assert counts[3] >= 3, counts  # b's one caller, against a's three
    for st in (a, b):
        await st.aclose()


async def test_a_take_cut_in_its_round_trip_is_never_handed_out(redis: Redis) -> None:
    # A take cancelled (its client left) or failed may or may not have reached Redis:
    # it is only ever removed, never counted as a slot someone holds.

    st = redis_state(redis, "cut")
    slots = st.slots()
    first = await slots.acquire("key:k", 1, 0.1)
    assert first is not None
    for _ in range(20):  # cut at different points of the round trip
        late = asyncio.create_task(slots.acquire("key:k", 1, 2.0))
        await asyncio.sleep(0.0005 * _)
        late.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            assert await late is None
    assert await slots.acquire("key:k", 1, 0.05) is None  # still full: first holds it
    slots.release(first)
    await slots.upkeep()
    second = await slots.acquire("key:k", 1, 1.0)
    assert second is not None
    assert await slots.acquire("key:k", 1, 0.05) is None
    assert await st.redis.zcard("cut:slot:key:k") == 1
    await st.aclose()


async def test_closing_never_waits_forever_on_the_flusher(redis: Redis) -> None:
    # A cancellation lost inside a Redis call once kept a worker from exiting: the
    # flusher also ends by itself once closing, and closing waits for it a bounded time.

    st = redis_state(redis, "close")
    calls = []
    real = st._flush_gives

    async def loses_the_cancel() -> None:
        calls.append(1)
        if len(calls) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pass  # as a client library that swallows it would
        await real()

    st._flush_gives = loses_the_cancel  # type: ignore[method-assign]
    await st.start()
    await until_called(calls)  # the flusher is in its stubborn call
    t = time.monotonic()
    await asyncio.wait_for(st.aclose(), 10)
    assert time.monotonic() - t < 3
    assert st._flusher is not None
    await asyncio.wait_for(st._flusher, 1)  # it ended by itself


async def test_closing_is_bounded_with_the_flusher_stuck_in_a_usage_write(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stuck inside the usage write it holds the flush lock: the last flush gives up in
    # time, says so, and the connection is still closed.
    from stella import state_redis

    # Closing waits out this twice here (the flusher, then the last usage write): 0.5 s
    # rather than 2 s each, still far from the stuck write's 30 s.
    monkeypatch.setattr(state_redis, "FLUSHER_STOP_S", 0.5)
    st = redis_state(redis, "stuck")
    real = st._add_usage
    calls = []

    async def stubborn(**kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            await asyncio.sleep(30)
        return await real(**kw)

    st._add_usage = stubborn  # type: ignore[method-assign]
    await st.start()
    st.record_usage("k", "m", "2026-11-26", {"prompt_tokens": 1})
    await until_called(calls)  # the flusher is in its usage write
    t = time.monotonic()
    await asyncio.wait_for(st.aclose(), 10)
    assert time.monotonic() - t < 6


async def until_called(calls: list[int]) -> None:
    """Wait for the first call of the test's stand-in in the flusher's way (the flusher
    makes it within a tick, or five for a usage write)."""
    deadline = time.monotonic() + 10
    while not calls:
        assert time.monotonic() < deadline, "the flusher never called"
        await asyncio.sleep(0.01)


async def test_a_stalled_redis_neither_holds_slots_nor_delays_every_waiter(redis: Redis) -> None:
    import os
    import signal

    st = redis_state(redis, "stall")
    slots = st.slots()
    held = await slots.acquire("key:x", 1, 1)  # the script is loaded
    slots.release(held)
    await slots.upkeep()
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        # Redis may take this slot and then time out: the slot must still come back.
        held = await slots.acquire("key:x", 1, 5)
        assert held is not None and held[0] == "local"
        slots.release(held)
        # Requests waiting now use the local slots; at most one a second probes Redis.
        times = []
        for _ in range(5):
            t = time.monotonic()
            h = await slots.acquire("key:y", 5, 5)
            times.append(time.monotonic() - t)
            assert h is not None
        assert sum(t > 0.5 for t in times) <= 1, times
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    assert time.monotonic() - t0 < 5
    await asyncio.sleep(0.3)
    await slots.upkeep()  # the releases queued during the stall go out
    assert await st.redis.zcard("stall:slot:key:x") == 0
    assert await slots.acquire("key:x", 1, 0.5) is not None  # not held by a ghost
    await st.aclose()


async def test_overlapping_usage_flushes_lose_nothing(redis: Redis) -> None:
    from redis.exceptions import TimeoutError as RedisTimeout

    st = redis_state(redis, "overlap")
    real = st._add_usage
    failing = [2]  # the next two sends time out without Redis applying them

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failing[0] > 0:
            failing[0] -= 1
            await asyncio.sleep(0.1)
            raise RedisTimeout("timed out")
        return await real(*args, **kwargs)

    st._add_usage = flaky  # type: ignore[method-assign]
    day = "2026-11-26"
    record = {"prompt_tokens": 1, "completion_tokens": 1, "status": 200}
    st.record_usage("alice", "m", day, record)
    first = asyncio.create_task(st._flush())  # the flusher, in flight with alice
    await asyncio.sleep(0.02)
    st.record_usage("bob", "m", day, record)
    await asyncio.gather(first, st._flush())  # get_usage's flush, at the same time
    await past_outage(st)
    rows = await st.get_usage(day)
    assert sorted((r["key"], r["requests"]) for r in rows) == [("alice", 1), ("bob", 1)]
    await st.aclose()


async def test_a_follower_read_from_before_a_local_change_does_not_undo_it(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stella import app as stella_app
    from stella.api.native import _change
    from stella.settings import RouteSettings, load_settings

    monkeypatch.setattr(stella_app, "ROUTING_POLL_S", 0.1)
    # MLX off, as in every test server: its model loading in the background would
    # hold the shutdown up for seconds, and the follower is all these tests are about.
    settings = load_settings(merge(NO_MLX, {"state": {"redis_url": redis.url, "prefix": "follow"}}))
    application = stella_app.create_app(settings)
    svc = application.services  # type: ignore[attr-defined]
    async with application.router.lifespan_context(application):
        await svc.state.save_route("old", {"backend": "echo"})  # moves the version
        slow_read = asyncio.Event()
        real = svc.state.routing

        async def routing() -> Any:
            read = await real()  # the store as it was before the change below
            slow_read.set()
            await asyncio.sleep(0.3)
            return read

        svc.state.routing = routing
        await asyncio.wait_for(slow_read.wait(), 5)
        router = svc.router
        await _change(
            router,
            lambda: router.register("x", RouteSettings(backend="echo")),
            lambda _: svc.state.save_route("x", {"backend": "echo"}),
        )
        await asyncio.sleep(0.5)  # the stale read has come back
        assert router.knows("x")


async def test_a_follower_that_fails_logs_a_traceback_only_for_a_bug(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import capture_logs

    from stella import app as stella_app
    from stella.errors import Conflict
    from stella.settings import load_settings

    monkeypatch.setattr(stella_app, "ROUTING_POLL_S", 0.05)
    # MLX off, as in every test server: its model loading in the background would
    # hold the shutdown up for seconds, and the follower is all these tests are about.
    settings = load_settings(merge(NO_MLX, {"state": {"redis_url": redis.url, "prefix": "fails"}}))
    application = stella_app.create_app(settings)
    svc = application.services  # type: ignore[attr-defined]
    # A bug, the store away, a change refused (a StellaError: expected, as the store's).
    failures = [KeyError("a bug"), OSError("connection reset"), Conflict("route r changed")]

    async def routing() -> Any:
        if failures:
            raise failures.pop(0)
        return None  # read nothing: the follower waits for the next version

    with capture_logs() as logged:
        async with application.router.lifespan_context(application):
            await svc.state.save_route("r", {"backend": "echo"})  # moves the version
            svc.state.routing = routing
            for _ in range(100):
                if not failures:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
    bug, away, refused = [e for e in logged if e["event"] == "routing_sync_failed"][:3]
    assert bug["log_level"] == "error" and isinstance(bug["exc_info"], KeyError)
    for expected, said in ((away, "connection reset"), (refused, "route r changed")):
        assert expected["log_level"] == "warning" and "exc_info" not in expected, expected
        assert said in expected["error"]


async def test_a_burst_of_checks_is_load_not_an_outage(redis: Redis) -> None:
    # 300 admissions at once on one process: more than a pool's worth of connections.
    # Callers wait for one; Redis is not declared unavailable.
    st = redis_state(redis, "burst")
    buckets = st.buckets()
    try:
        checks = [("rpm:key:k", 50.0, 50 / 60, 1.0)]  # too small to lease: each asks Redis
        await asyncio.gather(*(buckets.take_all(checks) for _ in range(300)))
        assert st.down_since is None and st.errors == 0
    finally:
        await st.aclose()


async def test_a_debt_of_any_size_keeps_the_bucket_working(redis: Redis) -> None:
    # An upstream may report any usage: the debt is bounded, the key's life too.
    st = redis_state(redis, "huge")
    buckets = st.buckets()
    try:
        await buckets.take_all([("tpm:key:k", 60.0, 1.0, 1.0)])
        buckets.give("tpm:key:k", 60.0, 1.0, -1e18)
        await st._flush_gives()
        [take] = await buckets.take_all([("tpm:key:k", 60.0, 1.0, 1.0)])
        assert not take.allowed and st.errors == 0 and st.down_since is None
        assert 0 < await st.redis.ttl("huge:rl:tpm:key:k") <= 30 * 86400
    finally:
        await st.aclose()


async def test_a_settlement_redis_never_got_is_sent_again(redis: Redis) -> None:
    st = redis_state(redis, "kept")
    buckets = st.buckets()
    try:
        await buckets.take_all([("tpm:key:k", 60.0, 1.0, 50.0)])  # level ~10
        buckets.give("tpm:key:k", 60.0, 1.0, 40.0)  # the call used 10 of its 50
        redis.stop()
        await st._flush_gives()  # refused: nothing reached Redis
        assert st._gives, "the settlement was dropped"
        redis.start()
        await st._flush_gives()
        level = float(await st.redis.hget("kept:rl:tpm:key:k", "level"))
        assert level >= 49, level
    finally:
        await st.aclose()


async def test_redis_refuses_what_would_leave_routing_inconsistent(redis: Redis) -> None:
    from tests.test_routing import check_the_store_refuses_conflicts

    state = redis_state(redis, "conflicts")
    try:
        await check_the_store_refuses_conflicts(state)
    finally:
        await state.aclose()


def test_routes_that_fall_back_to_each_other_reach_every_replica_and_a_restart(
    redis: Redis,
) -> None:
    cfg = config(redis)
    chat = {**BODY, "model": "r2"}
    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        for spec, status in (
            ({"name": "r1", "backend": "echo"}, 201),
            ({"name": "r2", "backend": "echo", "fallbacks": ["r1"]}, 201),
            ({"name": "r1", "backend": "echo", "fallbacks": ["r2"]}, 200),  # replaced
        ):
            r = http.post(a.url + "/api/v1/models", headers=AUTH, json=spec)
            assert r.status_code == status, r.text
        deadline = time.monotonic() + 5
        while http.post(b.url + "/api/v1/chat", json=chat, headers=AUTH).status_code != 200:
            assert time.monotonic() < deadline, "the other replica did not follow"
            time.sleep(0.1)
        assert not b.events("stored_routing_skipped")
    with run_stella(cfg, ENV) as c:  # a restart reads them from the store
        models = http.get(c.url + "/api/v1/models", headers=AUTH).json()["models"]
        assert {m["name"] for m in models} >= {"r1", "r2"}
        assert http.post(c.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 200


def test_a_route_another_replica_registered_is_replaced_and_said_so(redis: Redis) -> None:
    cfg = config(redis)
    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        r = http.post(
            a.url + "/api/v1/models", headers=AUTH, json={"name": "rt", "backend": "echo"}
        )
        assert r.status_code == 201, r.text
        # Asked at once, before b could have followed: the store, not b's table, says.
        r = http.post(
            b.url + "/api/v1/models",
            headers=AUTH,
            json={"name": "rt", "backend": "echo", "aliases": ["rt-b"]},
        )
        assert r.status_code == 200, r.text
        eventually(
            lambda: (
                http.post(
                    a.url + "/api/v1/chat", json={**BODY, "model": "rt-b"}, headers=AUTH
                ).status_code
                == 200
            )
        )


def test_two_replicas_claiming_one_alias_at_once_do_not_both_succeed(redis: Redis) -> None:
    cfg = config(redis)
    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        # Each replica asked before it could have followed the other's change.
        first = http.post(
            a.url + "/api/v1/models",
            headers=AUTH,
            json={"name": "x", "backend": "echo", "aliases": ["shared"]},
        )
        second = http.post(
            b.url + "/api/v1/models",
            headers=AUTH,
            json={"name": "y", "backend": "echo", "aliases": ["shared"]},
        )
        assert first.status_code == 201, first.text
        assert second.status_code == 409 and "alias of 'x'" in second.text, second.text
        # A default switched to a route another replica removes at the same time: one wins.
        deadline = time.monotonic() + 5
        while http.post(b.url + "/api/v1/chat", json={**BODY, "model": "x"}, headers=AUTH).is_error:
            assert time.monotonic() < deadline, "the other replica did not follow"
            time.sleep(0.1)
        http.post(a.url + "/api/v1/models/switch/x", headers=AUTH).raise_for_status()
        r = http.delete(b.url + "/api/v1/models/x", headers=AUTH)
        assert r.status_code == 409 and "default model" in r.text, r.text


async def test_two_changes_racing_on_one_replica_answer_for_what_it_serves(redis: Redis) -> None:
    # Both validated against the table before either was written: the store takes one.
    with run_stella(config(redis), ENV) as s:
        async with httpx.AsyncClient(timeout=10, headers=AUTH) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        s.url + "/api/v1/models",
                        json={"name": name, "backend": "echo", "aliases": ["shared"]},
                    )
                    for name in ("x", "y")
                )
            )
            assert sorted(r.status_code for r in answers) == [201, 409], [r.text for r in answers]
            won = next(r.json()["registered"] for r in answers if r.status_code == 201)
            r = await client.post(s.url + "/api/v1/chat", json={**BODY, "model": "shared"})
            assert r.status_code == 200 and r.json()["model"] == won, r.text


def test_a_stored_route_that_is_not_json_is_skipped_alone_and_can_be_removed(
    redis: Redis,
) -> None:
    import redis as redis_py

    cfg = config(redis)
    store = redis_py.Redis.from_url(redis.url)
    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        store.hset("stella:routes", "junk", "not json")
        r = http.post(
            a.url + "/api/v1/models", headers=AUTH, json={"name": "rt", "backend": "echo"}
        )
        assert r.status_code == 201, r.text
        # The other replica still follows the store: the junk is skipped, by its name.
        eventually(
            lambda: (
                http.post(
                    b.url + "/api/v1/chat", json={**BODY, "model": "rt"}, headers=AUTH
                ).status_code
                == 200
            )
        )
        skipped = b.wait_event(lambda e: "'junk'" in e["reason"], name="stored_routing_skipped")
        assert "not JSON" in skipped["reason"], skipped
        # A replica started now starts, with the routes it can apply.
        with run_stella(cfg, ENV) as c:
            chat = {**BODY, "model": "rt"}
            assert http.post(c.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 200
            assert c.events("stored_routing_skipped")
            # An admin removes it by its name, though no replica serves it.
            r = http.delete(c.url + "/api/v1/models/junk", headers=AUTH)
            assert r.status_code == 200 and r.json() == {"removed": "junk"}, r.text
            assert not store.hexists("stella:routes", "junk")
            r = http.delete(c.url + "/api/v1/models/junk", headers=AUTH)
            assert r.status_code == 404, r.text
            # A name that is not UTF-8 is shown with its bytes escaped: no request names
            # it, so a DELETE of the escaped text removes nothing and says so (404).
            store.hset("stella:routes", b"x\xff", "not json")
            store.incr("stella:routing_version")
            c.wait_event(lambda e: "HDEL" in e["reason"], name="stored_routing_skipped")
            r = http.delete(c.url + "/api/v1/models/x%5Cxff", headers=AUTH)
            assert r.status_code == 404, r.text
            assert store.hexists("stella:routes", b"x\xff")
        for server in (a, b):
            assert not server.events("routing_sync_failed"), server.events("routing_sync_failed")


def test_a_stored_route_named_as_a_configured_one_here_can_be_removed_here(
    redis: Redis,
) -> None:
    # Replicas with different configs: `slowm` is a route of a's file, not of b's.
    slowm = {"routes": {"slowm": {"backend": "echo", "aliases": ["sm"]}}}
    with run_stella(config(redis, models=slowm), ENV) as a, run_stella(config(redis), ENV) as b:
        for name in ("slowm", "sm"):
            r = http.post(
                b.url + "/api/v1/models", headers=AUTH, json={"name": name, "backend": "echo"}
            )
            assert r.status_code == 201, r.text
        a.wait_event(lambda e: "'sm'" in e["reason"], name="stored_routing_skipped")
        store = redis_store(redis)
        for name in ("slowm", "sm"):  # by its name, or by an alias of a's route
            r = http.delete(a.url + f"/api/v1/models/{name}", headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json() == {
                "removed": name,
                "detail": f"removed the stored runtime route {name!r}; the route this "
                "replica's config file names so stays",
            }
            assert not store.hexists("stella:routes", name)
        chat = {**BODY, "model": "slowm"}
        eventually(
            lambda: http.post(b.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 404
        )
        assert http.post(a.url + "/api/v1/chat", json=chat, headers=AUTH).status_code == 200
        # Nothing stored under the name any more: a's own route is protected, as before.
        r = http.delete(a.url + "/api/v1/models/slowm", headers=AUTH)
        assert r.status_code == 409 and "comes from the config file" in r.text, r.text


def test_a_stored_route_naming_a_backend_a_replica_lacks_is_said_once_per_version(
    redis: Redis,
) -> None:
    # Replicas with different configs: `wide` is a backend of a's, not of b's.
    side = {"side": {"kind": "echo"}}
    a_cfg = config(redis, backends={"wide": {"kind": "echo"}, **side})
    b_cfg = config(redis, backends=side)
    missing = "stored_route_backend_missing"
    with run_stella(a_cfg, ENV) as a:
        for spec in (
            {"name": "both", "backend": "echo", "balance": ["wide"]},
            {"name": "flip", "backend": "wide", "balance": ["side"]},
            {"name": "away", "backend": "wide"},
        ):
            r = http.post(a.url + "/api/v1/models", headers=AUTH, json=spec)
            assert r.status_code == 201, r.text
        with run_stella(b_cfg, ENV) as b:
            # b serves each on the backends it has: `flip` on its balance alone.
            for model, backend in (("both", "echo"), ("flip", "side")):
                for _ in range(3):  # calls warn of nothing
                    r = http.post(
                        b.url + "/api/v1/chat", json={**BODY, "model": model}, headers=AUTH
                    )
                    assert r.status_code == 200 and r.json()["backend"] == backend, r.text
            listed = http.get(b.url + "/api/v1/models", headers=AUTH).json()
            models = {m["name"]: m for m in listed["models"]}
            assert [models["both"][k] for k in ("backend", "balance", "left_out")] == [
                "echo",
                [],
                ["wide"],
            ]
            assert [models["flip"][k] for k in ("backend", "balance", "left_out")] == [
                "side",
                [],
                ["wide"],
            ]
            # The one it serves not at all is not listed as a model, and said so there.
            assert "away" not in models
            assert listed["skipped"] == {
                "away": "$.backend: unknown backend 'wide'; known: ['echo', 'side']"
            }
            # `stella models` says both: a route's backends left out, a route skipped.
            env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
            out = stella_cli("models", "--url", b.url, env={**env, "STELLA_API_KEY": KEY})
            assert out.returncode == 0, out.stderr
            rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
            for name in ("both", "flip"):
                assert rows[name].endswith("(left out here: wide)"), out.stdout
            assert rows["away"].split(None, 5) == [
                "away",
                "-",
                "-",
                "no",
                "-",
                "(skipped here: $.backend: unknown backend 'wide'; known: ['echo', 'side'])",
            ]
            raw = stella_cli("models", "--url", b.url, "--json", env={**env, "STELLA_API_KEY": KEY})
            assert msgspec.json.decode(raw.stdout)["skipped"] == listed["skipped"]
            time.sleep(2.5)  # the follower's polls: the version has not moved
            said = b.events(missing)
            assert sorted((e["route"], e["field"], e["backend"], e["level"]) for e in said) == [
                ("both", "balance[0]", "wide", "warning"),
                ("flip", "backend", "wide", "warning"),
            ]
            assert said[0]["detail"] == (
                "unknown backend 'wide'; known: ['echo', 'side']: the route is served here "
                "without it"
            )
            assert len(b.events("stored_routing_skipped")) == 1  # `away`, once too
            # The version moves (a route made elsewhere): each said once more, at that read.
            r = http.post(
                a.url + "/api/v1/models", headers=AUTH, json={"name": "x", "backend": "echo"}
            )
            assert r.status_code == 201, r.text
            eventually(lambda: len(b.events(missing)) == 4)
            time.sleep(1.5)
            assert len(b.events(missing)) == 4
            # Not to a key (made last: a key change moves the version too) that is no admin: no route beyond its own is named to it.
            r = http.post(
                b.url + "/api/v1/keys", headers=AUTH, json={"name": "narrow", "models": ["both"]}
            )
            assert r.status_code == 201, r.text
            narrow = {"Authorization": f"Bearer {r.json()['key']}"}
            listed = http.get(b.url + "/api/v1/models", headers=narrow).json()
            assert [m["name"] for m in listed["models"]] == ["both"] and listed["skipped"] == {}
        # The replica that has every backend serves them all, and says nothing.
        listed = http.get(a.url + "/api/v1/models", headers=AUTH).json()
        assert listed["skipped"] == {}
        assert all(m["left_out"] == [] for m in listed["models"])
        assert not a.events(missing) and not a.events("stored_routing_skipped")


def redis_store(redis: Redis) -> Any:
    """A redis-py client of the test's server, to read what stella stored."""
    import redis as redis_py

    return redis_py.Redis.from_url(redis.url)


# --- daily quotas, shared by replicas ---------------------------------------------


def test_two_replicas_share_a_daily_quota_exactly(redis: Redis) -> None:
    cfg = config(redis, limits={"requests_per_day": 7, "requests_per_minute": 6000})
    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        codes = asyncio.run(_burst([a.url, b.url], 40))
        assert codes.count(200) == 7 and codes.count(429) == 33
        r = http.post(b.url + "/v1/chat/completions", json=BODY, headers=AUTH)
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
        assert r.headers["x-quota-remaining"] == "0" and r.headers["x-should-retry"] == "false"
        wait = int(r.headers["retry-after"])
        sec, _ = asyncio.run(_redis_time(redis))
        assert abs(wait - (86_400 - sec % 86_400)) <= 3
        # Each day's count is one Redis key, gone a day or two after its day.
        day = time.strftime("%Y-%m-%d", time.gmtime(sec))
        ttl = asyncio.run(_ttl(redis, f"stella:rl:rpd:key:ops:{day}"))
        assert 172_000 < ttl <= 172_800


async def test_a_daily_quota_never_leases(redis: Redis) -> None:
    # A per-minute bucket this size leases 32 requests with a call; a day's must not: the
    # last of a day's requests held by one replica would refuse another's call until
    # midnight, not for a second.
    st = redis_state(redis, "noleases")
    buckets = st.buckets()
    try:
        day = [("rpd:key:k:2030-01-01", 3200.0, 0.0, 1.0)]
        minute = [("rpm:key:k", 3200.0, 3200 / 60, 1.0)]
        for _ in range(2):
            takes = await buckets.take_all(day + minute)
            assert all(t.allowed for t in takes)
        left = float(await st.redis.hget("noleases:rl:rpd:key:k:2030-01-01", "level"))
        assert left == 3198.0  # two calls, nothing more
        leased = float(await st.redis.hget("noleases:rl:rpm:key:k", "level"))
        assert leased < 3198.0  # the per-minute bucket's lease, as before
    finally:
        await st.aclose()


async def test_a_daily_limit_changed_during_the_day_keeps_what_the_day_spent(
    redis: Redis,
) -> None:
    # A key's update (or a config edit on one replica) changes its daily limit while
    # the day's bucket holds what is left of the old one: the spend is what stays.
    st = redis_state(redis, "moved")
    buckets = st.buckets()
    key = "usd:key:k:2030-01-01"
    try:
        (take,) = await buckets.take_all([(key, 1000.0, 0.0, 300.0)])
        assert take.allowed and take.remaining == 700.0
        # Raised: 300 spent of 2000, settled as what the call cost (250).
        buckets.give(key, 2000.0, 0.0, 50.0)
        await st._flush_gives()
        assert float(await st.redis.hget(f"moved:rl:{key}", "level")) == 1750.0
        (take,) = await buckets.take_all([(key, 2000.0, 0.0, 100.0)])
        assert take.allowed and take.remaining == 1650.0
        # Lowered under the day's spend (350): nothing left, the call refused.
        (take,) = await buckets.take_all([(key, 300.0, 0.0, 1.0)])
        assert not take.allowed and take.remaining == -50.0
        # A bucket written before its capacity was kept with it: its level as it is.
        await st.redis.hset(f"moved:rl:{key}", "level", "100")
        await st.redis.hdel(f"moved:rl:{key}", "cap")
        (take,) = await buckets.take_all([(key, 5000.0, 0.0, 10.0)])
        assert take.allowed and take.remaining == 90.0
    finally:
        await st.aclose()


async def _redis_time(redis: Redis) -> tuple[int, int]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis.url)
    try:
        return await r.time()
    finally:
        await r.aclose()


async def _ttl(redis: Redis, key: str) -> int:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis.url)
    try:
        return int(await r.ttl(key))
    finally:
        await r.aclose()


def test_a_day_s_tokens_are_reserved_and_settled_across_replicas(redis: Redis) -> None:
    cfg = config(redis, limits={"tokens_per_day": 1000})
    ask = {**BODY, "options": {"max_tokens": 600}}  # "hi there": 8 characters, 2 tokens

    def settled(used: int) -> None:
        """Wait for Redis's count of the day to be settled to `used`: a day's bucket
        never refills nor leases, so its level is exactly what is left."""
        eventually(lambda: _day_level(redis, "tpd:key:ops") == 1000 - used, 10.0)

    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        r = http.post(a.url + "/api/v1/chat", json=ask, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == str(1000 - 602)
        used = r.json()["usage"]["total_tokens"]
        # Settled with the real usage on Redis (within 0.1 s, or with the replica's next
        # check), seen by the other replica.
        settled(used)
        r = http.post(b.url + "/api/v1/chat", json=ask, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == str(1000 - used - 602)
        used += r.json()["usage"]["total_tokens"]
        big = {**BODY, "options": {"max_tokens": 1000 - used}}  # one token more than is left
        settled(used)
        # Redis gives what is left of the day, no more (it has no lease to give).
        r = http.post(a.url + "/api/v1/chat", json=big, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0"
        used += r.json()["usage"]["total_tokens"]
        settled(used)
        level = float(redis_store(redis).hget(_day_key(redis, "tpd:key:ops"), "level") or b"nan")
        assert level == 1000 - used  # settled to its usage: what was left less the call's
        # A call whose usage passes what is left (echo's answer repeats its long prompt)
        # takes the day into debt, which holds on every replica.
        long = {**BODY, "messages": [{"role": "user", "content": "word " * 600}]}
        r = http.post(b.url + "/api/v1/chat", json=long, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0"
        assert r.json()["usage"]["total_tokens"] > 1000 - used
        settled(used + r.json()["usage"]["total_tokens"])
        for s in (a, b):  # and the day in debt: nothing left, refused everywhere
            r = http.post(s.url + "/api/v1/chat", json=ask, headers=AUTH)
            assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
            assert "(0 left)" in r.text and r.headers["x-quota-remaining"] == "0"


async def test_the_quota_turns_at_midnight_on_every_replica(redis: Redis) -> None:
    from tests.test_quota import MIDNIGHT, app_at, chat

    clock = [MIDNIGHT - 20.0]
    cfg = {
        "auth": {"keys_env": "NONE", "keys": {"ops": {"sha256": _sha(KEY)}}},
        "limits": {"requests_per_day": 2},
        "state": {"redis_url": redis.url, "prefix": "midnight"},
    }
    async with app_at(cfg, clock) as (a, _, _), app_at(cfg, clock) as (b, _, _):
        a.headers.update(AUTH)
        b.headers.update(AUTH)
        assert (await a.post("/api/v1/chat", json=chat())).status_code == 200
        assert (await b.post("/api/v1/chat", json=chat())).status_code == 200
        r = await a.post("/api/v1/chat", json=chat())
        assert r.status_code == 429 and r.headers["retry-after"] == "20"
        clock[0] = MIDNIGHT + 1
        r = await b.post("/api/v1/chat", json=chat())
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "1"
        r = await a.post("/api/v1/chat", json=chat())
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0"
        r = await b.post("/api/v1/chat", json=chat())
        assert r.status_code == 429 and r.headers["retry-after"] == str(86_400 - 1)


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def test_a_redis_outage_counts_the_day_per_process_as_the_rate_limits_do(redis: Redis) -> None:
    cfg = config(redis, limits={"requests_per_day": 2})
    with run_stella(cfg, ENV) as s:
        for _ in range(2):
            assert http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH).status_code == 200
        assert http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH).status_code == 429
        redis.stop()
        # Redis away: the process counts the day on its own, from nothing, as its
        # per-minute buckets do; the quota still holds within it.
        codes = [
            http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH).status_code for _ in range(3)
        ]
        assert codes == [200, 200, 429]
        s.wait_event(lambda e: True, name="redis_unavailable")
        redis.start()
        deadline = time.monotonic() + 10
        while not s.events("redis_recovered") and time.monotonic() < deadline:
            http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH)
            time.sleep(0.2)
        assert s.events("redis_recovered")
        # Back on Redis, whose count of the day (kept on disk) is used up.
        r = http.post(s.url + "/api/v1/chat", json=BODY, headers=AUTH)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"


def _day_key(redis: Redis, name: str) -> str:
    """The Redis key of today's daily bucket `name` (e.g. "tpd:key:ops")."""
    sec, _ = asyncio.run(_redis_time(redis))
    return f"stella:rl:{name}:{time.strftime('%Y-%m-%d', time.gmtime(sec))}"


def _day_level(redis: Redis, name: str) -> float:
    """The level Redis holds of today's daily bucket `name`."""
    return float(redis_store(redis).hget(_day_key(redis, name), "level") or b"nan")


def _recovered(s: Any, seen: int) -> None:
    """Wait for `s` to find Redis back (its log's `seen`+1th `redis_recovered`)."""
    deadline = time.monotonic() + 10
    while len(s.events("redis_recovered")) <= seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(s.events("redis_recovered")) > seen


def test_a_call_settles_in_the_store_that_took_its_reservation(redis: Redis) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cfg = config(
        redis,
        limits={"tokens_per_day": 1000},
        backends={"slow": {"kind": "echo", "delay_s": 0.4, "reply": "a b c d e f g h"}},
        models={"routes": {"slow": {"backend": "slow"}}},
    )
    slow = {**BODY, "model": "slow", "options": {"max_tokens": 600}}  # reserves 602

    def post(body: dict) -> httpx.Response:
        return http.post(s.url + "/api/v1/chat", json=body, headers=AUTH, timeout=30)

    with run_stella(cfg, ENV) as s, ThreadPoolExecutor(2) as pool:
        # Reserved in Redis, settled while Redis is away: what it did not use goes back to
        # Redis once it is back, not to the process's stand-in.
        call = pool.submit(post, slow)
        deadline = time.monotonic() + 5
        while _day_level(redis, "tpd:key:ops") != 1000 - 602 and time.monotonic() < deadline:
            time.sleep(0.05)
        redis.stop()
        assert post(BODY).status_code == 200  # finds Redis away: admitted by the stand-in
        r = call.result()
        assert r.status_code == 200
        used = r.json()["usage"]["total_tokens"]
        assert used < 100
        redis.start()
        _recovered(s, 0)
        eventually(lambda: _day_level(redis, "tpd:key:ops") == 1000 - used, 10.0)
        # Reserved by the stand-in while Redis is away, settled once it is back: Redis,
        # which never took the reservation, gets none of its refund.
        redis.stop()
        assert post(BODY).status_code == 200
        call = pool.submit(post, slow)
        time.sleep(0.3)
        redis.start()
        _recovered(s, 1)
        assert not call.done(), "the call ended before Redis was back"
        assert call.result().status_code == 200
        time.sleep(0.5)  # the settlement's flush, had it gone to Redis
        assert _day_level(redis, "tpd:key:ops") == 1000 - used


# --- budgets and cost, shared by replicas -------------------------------------------


def test_two_replicas_share_a_daily_budget_in_whole_nano_dollars(redis: Redis) -> None:
    # $1 a million tokens both ways: a token is a micro-dollar, 1,000 nano-dollars. A
    # budget of $0.001 (1,000,000 nano-dollars): a call reserves 602 tokens' worth.
    price = {"input": 1.0, "output": 1.0}
    cfg = config(redis, limits={"usd_per_day": 0.001})
    cfg["models"] = {"routes": {"echo": {"backend": "echo", "price": price}}}
    ask = {**BODY, "options": {"max_tokens": 600}}  # "hi there": 2 tokens of estimate

    def settled(spent: int) -> None:
        eventually(lambda: _day_level(redis, "usd:key:ops") == 1_000_000 - spent, 10.0)

    with run_stella(cfg, ENV) as a, run_stella(cfg, ENV) as b:
        r = http.post(a.url + "/api/v1/chat", json=ask, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0.000398", r.text
        spent = r.json()["usage"]["total_tokens"] * 1000
        settled(spent)  # with what it cost, seen by the other replica
        # Kept as a whole number of nano-dollars, not a float's digits.
        raw = redis_store(redis).hget(_day_key(redis, "usd:key:ops"), "level")
        assert raw == str(1_000_000 - spent).encode()
        r = http.post(b.url + "/api/v1/chat", json=ask, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-remaining"] == f"{(1_000_000 - spent - 602_000) / 1e9:.6f}"
        spent += r.json()["usage"]["total_tokens"] * 1000
        settled(spent)
        # A call costing more than is left takes the day past the budget (echo's answer
        # repeats its long prompt), then every replica refuses the key until midnight.
        long = {**BODY, "messages": [{"role": "user", "content": "word " * 600}]}
        r = http.post(a.url + "/api/v1/chat", json=long, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-quota-remaining"] == "0.000000"
        spent += r.json()["usage"]["total_tokens"] * 1000
        assert spent > 1_000_000
        settled(spent)
        for s in (a, b):
            r = http.post(s.url + "/api/v1/chat", json=ask, headers=AUTH)
            assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
            assert r.json()["error"]["message"].startswith("daily budget of 0.001000 USD")
            assert r.headers["x-quota-limit"] == "0.001000"
        # The usage report, read on either replica, has what the day cost, exactly.
        report = eventually_report(b.url, 3)
        assert report["totals"]["cost_usd"] == pytest.approx(spent / 1e9, abs=1e-12)


def eventually_report(url: str, requests: int) -> dict:
    """The usage report once it counts `requests` calls (replicas send theirs each 0.5 s)."""
    deadline = time.monotonic() + 10
    while True:
        report = http.get(url + "/api/v1/usage", headers=AUTH).json()
        if report["totals"]["requests"] >= requests or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


async def test_usage_rows_counted_before_costs_read_as_costing_nothing(redis: Redis) -> None:
    st = redis_state(redis, "costs")
    try:
        day = "2026-11-26"
        # A row an older stella wrote: no cost field.
        await st.redis.hset(
            f"costs:usage:{day}", mapping={"k|old|requests": 2, "k|old|prompt_tokens": 5}
        )
        st.record_usage("k", "new", day, {"prompt_tokens": 1, "cost_usd": 0.000123456})
        rows = {r["model"]: r for r in await st.get_usage(day)}
        assert rows["old"]["requests"] == 2 and rows["old"]["cost_usd"] == 0
        assert rows["new"]["cost_usd"] == 0.000123456
        # Counted in whole nano-dollars: HINCRBY takes no fractions.
        assert await st.redis.hget(f"costs:usage:{day}", "k|new|cost_nanos") == b"123456"
    finally:
        await st.aclose()


async def test_a_charge_whose_settlement_timed_out_is_sent_again_a_refund_is_not(
    redis: Redis,
) -> None:
    import signal

    st = redis_state(redis, "owed")
    b = st.buckets()
    charged, refunded = "usd:key:a:2025-06-01", "usd:key:b:2025-06-01"
    for key in (charged, refunded):  # a daily budget of 1000, 100 reserved: 900 left
        assert (await b.take_all([(key, 1000.0, 0.0, 100.0)]))[0].allowed
    # Their calls end: one cost 150 more than it reserved, the other 30 less.
    b.give(charged, 1000.0, 0.0, -150.0)
    b.give(refunded, 1000.0, 0.0, 30.0)
    store = redis_store(redis)

    def level(key: str) -> float:
        return float(store.hget(f"owed:rl:{key}", "level") or b"nan")

    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        await st._flush_gives()  # Redis's 1 s timeout: whether it ran is not known
        assert time.monotonic() - t >= 0.9
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    try:
        # Whatever the stalled round trip did, the next one sends the charge again (were
        # it lost, the key would spend past its budget) and not the refund (sent twice,
        # it would give back what was spent).
        stalled = level(charged), level(refunded)
        await st._flush_gives()
        assert (level(charged), level(refunded)) == (stalled[0] - 150.0, stalled[1])
    finally:
        await st.aclose()
