"""State and rate limits in Redis, shared by every worker and replica.

What lives here survives a restart: the default-model switch, runtime routes
and usage counters per key, model and day. Each rate-limit check is one Lua
script (atomic, on Redis's clock). When Redis can't be reached, stella keeps
serving: limits fall back to this process, a warning is logged once per outage,
`errors` counts the failures, and Redis is used again as soon as it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stella.errors import Conflict, ModelNotFound, StellaError, Unavailable
from stella.limits import MemoryBuckets, MemorySlots, Take, refill_s
from stella.settings import StateSettings
from stella.state import (
    KeyChange,
    RoutingVersion,
    StoredKeys,
    Unreadable,
    count_usage,
    entry_digests,
    is_default,
    key_taken,
    removed_meanwhile,
    taken,
    usage_row,
)

_log = structlog.get_logger("stella")
# How long Redis remembers the last usage batch of a process it applied (a resend after
# that would count twice; a lost reply is resent within a second or two, or when Redis
# is back).
USAGE_MARK_TTL_S = 3_600
# While Redis is unreachable, admissions try it again at most this often.
REDIS_RETRY_S = 1.0
# The longest /ready waits for Redis's PING (its timeout is 1 s, as is a readiness
# probe's by default): a Redis that answers no sooner reads `degraded`, still ready.
PING_WAIT_S = 0.25
# Connections to Redis per process; more callers at once wait for one.
REDIS_MAX_CONNECTIONS = 256
# Seconds a command (and a wait for a pooled connection, and a connect) may take before
# Redis is taken to be down: a stalled Redis costs a call this long.
REDIS_TIMEOUT_S = 1.0
# The read of the stored keys (load_keys) brings every runtime key, in pages of about
# KEYS_PAGE entries (HSCAN's COUNT, and HMGET's names for the revocations), each parsed
# and decoded as it comes: a page is some milliseconds of this process's work, and the
# event loop runs other calls between pages however many keys there are. The whole read
# still grows with the keys (100,000 keys, some 2 s on the test host); it has
# connections of its own, each round trip with this timeout; one that fails while Redis
# answers a PING is a slow read, not an outage.
REDIS_BULK_TIMEOUT_S = 10.0
REDIS_BULK_CONNECTIONS = 8
KEYS_PAGE = 1_000
# How often a read of the keys is made again when a change landed while it was made
# (see load_keys), before it answers 503.
KEYS_READ_TRIES = 3

# A bucket's time to live: until it would be full again (a bucket in debt keeps its
# debt), at most 30 days; a daily quota's (rate 0: it never refills, its key names its
# day) two days after it was last written, so a day's count goes a day or two after
# the day.
BUCKET_TTL = """
local function ttl(capacity, rate, level)
  if rate <= 0 then
    return 172800
  end
  return math.min(math.ceil((capacity - level) / rate) + 5, 2592000)
end
-- What a daily bucket's level moves by when its capacity is not the one it was counted
-- against (`cap`, as sent: compared as text, a number read back may differ in its last
-- digit): what the day spent (capacity - level) is kept across a limit's change. None
-- kept (a bucket written before it was): none moved.
local function spent_kept(rate, capacity, sent, cap)
  if rate > 0 or not cap or cap == sent then
    return 0
  end
  return capacity - tonumber(cap)
end
"""

# Per key ARGV: capacity, rate, cost, want (the cost and a lease), and a settlement not
# yet sent (refunds and charges of calls that ended), applied before the check. A key
# lives until its bucket would be full again: a bucket in debt keeps its debt.
TAKE_ALL = (
    BUCKET_TTL
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local levels = {}
local ok = true
for i = 1, n do
  local capacity = tonumber(ARGV[5 * i - 4])
  local rate = tonumber(ARGV[5 * i - 3])
  local cost = tonumber(ARGV[5 * i - 2])
  local settle = tonumber(ARGV[5 * i])
  local data = redis.call('HMGET', KEYS[i], 'level', 'at', 'cap')
  local level = tonumber(data[1]) or capacity
  local at = tonumber(data[2]) or now
  level = level + spent_kept(rate, capacity, ARGV[5 * i - 4], data[3])
  -- A debt is bounded (an upstream may report any usage): a thousand buckets' worth.
  level = math.max(math.min(capacity, level + (now - at) * rate + settle), -1000 * capacity)
  levels[i] = level
  -- A daily bucket (rate 0) with something left gives what it has (see stella.limits).
  if level < cost and (rate > 0 or level <= 0) then ok = false end
end
local out = {}
for i = 1, n do
  local capacity = tonumber(ARGV[5 * i - 4])
  local rate = tonumber(ARGV[5 * i - 3])
  local cost = tonumber(ARGV[5 * i - 2])
  local want = tonumber(ARGV[5 * i - 1])
  local level = levels[i]
  local granted = 0
  if ok then
    granted = cost
    if level >= want then granted = want end
    if level < granted then granted = level end
    level = level - granted
  end
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'at', tostring(now), 'cap', ARGV[5 * i - 4])
  redis.call('EXPIRE', KEYS[i], ttl(capacity, rate, level))
  out[3 * i - 2] = tostring(levels[i])
  out[3 * i - 1] = tostring(granted)
  out[3 * i] = tostring(level)
end
return out
"""
)

# Usage counters, applied once per batch: a batch whose reply timed out is sent again
# as it was, and Redis may well have applied it the first time (HINCRBY is not
# idempotent). A process numbers its batches and sends one only once the one before is
# confirmed, so one key per process holding the last number applied tells a resend.
# KEYS[1] that key; KEYS[2..] usage hashes; ARGV[1] the key's time to live, ARGV[2] the
# batch's number, then a (field, amount) pair per usage hash.
USAGE = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[1]))
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], ARGV[2 * i - 1], tonumber(ARGV[2 * i]))
end
return 1
"""

# Concurrency slots: a sorted set per slot name, one member per holder, scored by when
# the holder's claim lapses (a replica that died frees its slots after SLOT_TTL_S).
# KEYS[1] the set; ARGV: time to live, size, member. 1 when the slot was taken. A take
# sent again after it ran (see the pool's retry) finds its member there: taken, once.
TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3])
    or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 5)
  return 1
end
return 0
"""

# Keep held slots claimed: KEYS are sets, ARGV[1] the time to live, then a member per key.
# A member no longer there (Redis restarted empty or was flushed, or the claim lapsed)
# is added back: its call still runs here, and left out, another replica would admit
# one more in its place. Should one have done so already, the set holds more than its
# size until calls end: that is how many run, and takes are refused until it drops under.
RENEW_SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], math.ceil(ttl) + 5)
end
return 1
"""

# A routing change: KEYS[1] the routing version, KEYS[2] the runtime routes (a hash of
# JSON specs), KEYS[3] the default model, KEYS[4] the routing epoch, KEYS[5] the runtime
# keys (a hash of JSON specs), KEYS[6] the revocations (digest -> name), KEYS[7] when
# each runtime key was made (name -> UTC ISO 8601), KEYS[8] when each revocation was
# (digest -> UTC ISO 8601), and for "key_change" the buckets it clears; ARGV[1] the
# deadline (Redis's clock), ARGV[2] a new epoch (random, one per change), ARGV[3]
# the change, ARGV[4] the route's name, then:
#   "default" ARGV[5] "1" when the route is a runtime one (then it must be stored still)
#   "save"    ARGV[5] its spec; refused when another stored route answers to its name
#             or one of its aliases (ARGV[6..]); 2 when it replaced one of its name
#   "delete"  refused when it is the default
#   "key_add" ARGV[5] a runtime key's spec, ARGV[6] when; refused when a key has its name
#   "key_change" see below; 3, writing nothing, when the keys changed since they were read
# Keys share the routing version: every replica follows both with one poll.
# 0 when it came too late (its client has given up on it and told its caller so); a
# refusal is {why, name, other route}: checked here, with the write, so two replicas
# changing at once can't both succeed and end up each with a different table.
CHANGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if now > tonumber(ARGV[1]) then
  return 0
end
local op, name = ARGV[3], ARGV[4]
local done = 1
if op == 'default' then
  if ARGV[5] == '1' and redis.call('HEXISTS', KEYS[2], name) == 0 then
    return {'removed', name, name}
  end
  redis.call('SET', KEYS[3], name)
elseif op == 'save' then
  local claimed = {}
  for i = 6, #ARGV do
    claimed[ARGV[i]] = true
  end
  local stored = redis.call('HGETALL', KEYS[2])
  for i = 1, #stored, 2 do
    local other = stored[i]
    if other ~= name then
      if claimed[other] then
        return {'taken', other, other}
      end
      local ok, spec = pcall(cjson.decode, stored[i + 1])
      if ok and type(spec) == 'table' and type(spec.aliases) == 'table' then
        for _, alias in ipairs(spec.aliases) do
          if claimed[alias] then
            return {'taken', alias, other}
          end
        end
      end
    end
  end
  if redis.call('HSET', KEYS[2], name, ARGV[5]) == 0 then
    done = 2
  end
elseif op == 'delete' then
  if redis.call('GET', KEYS[3]) == name then
    return {'default', name, name}
  end
  redis.call('HDEL', KEYS[2], name)
elseif op == 'key_add' then
  if redis.call('HEXISTS', KEYS[5], name) == 1 then
    return {'key_taken', name, name}
  end
  redis.call('HSET', KEYS[5], name, ARGV[5])
  redis.call('HSET', KEYS[7], name, ARGV[6])
elseif op == 'key_change' then
  -- Planned in Python (stella.auth.Authenticator.revocation) on the keys as read at
  -- version ARGV[5], ARGV[6] (epoch, count): written only if none changed since, so two
  -- replicas revoking the last two admin keys at once can't both pass (the second
  -- reads again and is refused). ARGV[7] when, ARGV[8] the number of digests revoked,
  -- ARGV[9] the number of entries replaced, ARGV[10] the number of revocations dropped,
  -- then each revoked as digest, name, each replaced as name, spec (its time of making
  -- kept), each dropped as its digest; then the names of entries removed. (A replica
  -- runs the script it sends, by its own text's SHA: an older one keeps its layout.)
  local epoch = redis.call('GET', KEYS[4]) or ''
  local count = tonumber(redis.call('GET', KEYS[1]) or '0')
  if epoch ~= ARGV[5] or count ~= tonumber(ARGV[6]) then
    return 3
  end
  local n = tonumber(ARGV[8])
  local first = 11 + 2 * n
  for i = 11, first - 1, 2 do
    redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
    if ARGV[7] ~= '' then
      redis.call('HSET', KEYS[8], ARGV[i], ARGV[7])
    end
  end
  local dropped = first + 2 * tonumber(ARGV[9])
  for i = first, dropped - 1, 2 do
    redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1])
  end
  -- Revocations that go with the entry removed (a purge's: see stella.key_plans.purge),
  -- in this one step: a replica reads the entry and its revocations gone together.
  local rest = dropped + tonumber(ARGV[10])
  for i = dropped, rest - 1 do
    redis.call('HDEL', KEYS[6], ARGV[i])
    redis.call('HDEL', KEYS[8], ARGV[i])
  end
  for i = rest, #ARGV do
    redis.call('HDEL', KEYS[5], ARGV[i])
    redis.call('HDEL', KEYS[7], ARGV[i])
  end
  -- KEYS[9..]: limit buckets cleared with it (a purge's: its name is free, its
  -- buckets full again).
  for i = 9, #KEYS do
    redis.call('DEL', KEYS[i])
  end
else
  return redis.error_reply('unknown change ' .. op)
end
-- Every change draws a new epoch: a store that lost its counter or went back to an
-- older one (restarted empty, flushed, restored from a snapshot) may count again to a
-- number a replica has read, never to a version (epoch, count) it has read.
redis.call('SET', KEYS[4], ARGV[2])
redis.call('INCR', KEYS[1])
return done
"""
# How long after Redis's last answer a routing change may still be applied: under the
# client's 1 s socket timeout, so a change whose answer timed out never lands later.
WRITE_WINDOW_S = 0.5

GIVE = (
    BUCKET_TTL
    + """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = redis.call('HMGET', KEYS[1], 'level', 'at', 'cap')
local level = tonumber(data[1]) or capacity
local at = tonumber(data[2]) or now
level = level + spent_kept(rate, capacity, ARGV[1], data[3])
level = math.max(math.min(capacity, level + (now - at) * rate + amount), -1000 * capacity)
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now), 'cap', ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl(capacity, rate, level))
return tostring(level)
"""
)


# The key changes Redis refuses (see CHANGE): the error and its message.
_KEY_REFUSALS: dict[str, tuple[type[StellaError], Callable[[str], str]]] = {
    "key_taken": (Conflict, key_taken),
}


def _version(epoch: bytes | None, count: bytes | None) -> RoutingVersion:
    return (epoch or b"").decode(), int(count or 0)


def _texts(raw: dict[bytes, bytes]) -> dict[str, str]:
    """A hash of text as read (bytes that are not UTF-8 replaced)."""
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}


def _routes(raw: dict[bytes, bytes]) -> dict[str, Any]:
    """The stored routes by name, each decoded alone: an entry that is not JSON is an
    `Unreadable` (skipped where routes are applied), not a failed read of them all."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            name = key.decode()
        except UnicodeDecodeError:
            # Set by hand: listed with its bytes shown, to be removed with redis-cli.
            name = key.decode(errors="backslashreplace")
            out[name] = Unreadable("the name is not UTF-8: HDEL it in Redis", escaped=True)
            continue
        try:
            out[name] = msgspec.json.decode(value)
        except msgspec.DecodeError as exc:
            out[name] = Unreadable(f"not JSON: {exc}")
    return out


# At shutdown, the longest wait for the flusher's round trip in progress to end.
FLUSHER_STOP_S = 2.0
# Redis's clock is read at start-up, then by the flusher every this many ticks (0.1 s
# each): clocks drift slowly. After an outage (or a start while Redis was down) the
# flusher reads it at its first tick with Redis back, not up to 10 s later. A reading
# whose round trip took longer than CLOCK_READ_MAX_S is not used; start-up tries
# CLOCK_START_TRIES readings at most.
CLOCK_TICKS = 100
CLOCK_READ_MAX_S = 0.1
CLOCK_START_TRIES = 3


def _client(url: str, connections: int, timeout_s: float) -> aioredis.Redis:
    """A Redis client on a pool of its own: `connections` at most, each command's answer
    waited for `timeout_s` (a connect, REDIS_TIMEOUT_S)."""
    # A caller past the pool's size waits for a connection (up to the socket timeout)
    # instead of failing at once: a burst of admissions is load, not Redis gone.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=timeout_s,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=timeout_s,
        health_check_interval=0,
        # A pooled connection Redis closed while it sat idle (a restart, its idle
        # timeout) fails its next command with a ConnectionError, the command lost
        # with the old connection: sent once more on a fresh one, it does not fail
        # the call or read as an outage. Only a ConnectionError, once, at once: a
        # timeout (a stalled Redis, which may have run the command) is never sent
        # again, so a stall still costs its 1 s. Should Redis close a connection
        # after running a command (it died between running and answering), the
        # resend is harmless for what stella sends: reads, the routing change (its
        # effects are the same run twice), usage batches (numbered, counted once),
        # slot takes and renewals (a member held is held once), releases; a
        # settlement counts twice, as keep_gives would resend it anyway (a charge
        # is resent after a timeout too), and a bucket check pays twice (and loses
        # the lease it took): a limit stricter for a moment, never looser.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
    )
    # Replies stay bytes whatever the URL says: redis-py takes any query argument as
    # a keyword, and "?decode_responses=..." (even "false": a non-empty string) made
    # every reply a str, failing each read of the routes, the default and the usage.
    pool.connection_kwargs["decode_responses"] = False
    return aioredis.Redis(connection_pool=pool)


class RedisState:
    """The state store on Redis (same methods as stella.state.MemoryState)."""

    kind = "redis"

    def __init__(self, settings: StateSettings) -> None:
        self.prefix = settings.prefix
        self.redis = _client(settings.redis_url, REDIS_MAX_CONNECTIONS, REDIS_TIMEOUT_S)
        # The keys' read: bulk, see REDIS_BULK_TIMEOUT_S.
        self.bulk = _client(settings.redis_url, REDIS_BULK_CONNECTIONS, REDIS_BULK_TIMEOUT_S)
        self.local = MemoryBuckets()  # the fallback while Redis is away
        self.errors = 0
        self.down_since: float | None = None
        # While Redis is down, admissions skip it until then (one probe a second), so a
        # stalled Redis costs one request its timeout, not every request.
        self.retry_at = 0.0
        self._take_all = self.redis.register_script(TAKE_ALL)
        self._give = self.redis.register_script(GIVE)
        self._change = self.redis.register_script(CHANGE)
        self._add_usage = self.redis.register_script(USAGE)
        self._take_slot = self.redis.register_script(TAKE_SLOT)
        self._renew_slots = self.redis.register_script(RENEW_SLOTS)
        self._probe: asyncio.Task[bool] | None = None  # the PING in flight, if any
        self._slots: RedisSlots | None = None
        self._buckets: RedisBuckets | None = None
        # A usage batch sent but not confirmed: (ID, keys, args), sent again as it is.
        self._unconfirmed: tuple[str, list[str], list[Any]] | None = None
        self._flushing = asyncio.Lock()
        self._batches = 0
        self._instance = f"{os.getpid()}-{secrets.token_hex(4)}"  # batch IDs unique across replicas
        self._usage: dict[tuple[str, str, str], dict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        # Token settlements waiting to go to Redis: key -> [capacity, per_s, amount].
        self._gives: dict[str, list[float]] = {}
        self._ticks = 0
        self.clock_offset = 0.0  # Redis's clock minus this process's (see `wall`)
        # No reading used since start-up or the last outage: until one is, expiries and
        # windows are compared on this process's clock, so the flusher reads at each
        # tick while Redis answers (a TIME is cheap), not at its periodic one.
        self._clock_due = True

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self.retry_at = time.monotonic() + REDIS_RETRY_S
        if self.down_since is None:
            self.down_since = time.monotonic()
            # This process's clock may have jumped meanwhile (a suspended VM, a step).
            self._clock_due = True
            _log.warning(
                "redis_unavailable",
                error=type(exc).__name__,
                fallback="limits enforced per process until Redis is back",
            )

    def local_only(self, now: float) -> bool:
        """Whether an admission should skip Redis now: while it is down, all but one a
        second (the probe) use this process's stand-ins."""
        if self.down_since is None:
            return False
        if now < self.retry_at:
            return True
        self.retry_at = now + REDIS_RETRY_S  # this one probes; the others wait locally
        return False

    def _ok(self) -> None:
        if self.down_since is not None:
            _log.info("redis_recovered", down_s=round(time.monotonic() - self.down_since, 1))
            self.down_since = None

    async def start(self) -> None:
        """Begin flushing usage counters, Redis's clock read first; a Redis that is down
        now is tolerated."""
        self._flusher = asyncio.create_task(self._flush_loop())
        if await self.ping():
            await self._first_clock()

    async def _first_clock(self) -> None:
        """Read Redis's clock before anything is compared with it: the stored keys'
        expiries are applied right after start-up, and a replica whose clock is off
        would otherwise refuse a valid key (or take an expired one) until the
        flusher's first tick. Bounded: a slow Redis leaves it to the flusher."""
        for _ in range(CLOCK_START_TRIES):
            try:
                # A reading slower than this would not be used anyway.
                if await asyncio.wait_for(self._read_clock(), CLOCK_READ_MAX_S):
                    return
            except TimeoutError:
                continue
            except (RedisError, OSError) as exc:
                self._failed(exc)
                return

    async def aclose(self) -> None:
        """Flush what is counted and disconnect."""
        self._closing = True  # the flusher ends at its next turn, even if a cancel is lost
        try:
            if self._flusher:
                self._flusher.cancel()
                # A batch cut in its round trip stays in doubt and is resent below, as it
                # was. Never waited for without end: shutdown must not hang on Redis.
                await asyncio.wait({self._flusher}, timeout=FLUSHER_STOP_S)
            if self._buckets is not None:
                self._buckets.return_leases()  # every lease: sent with the last settlement
            # Each last write bounded too (a flusher still stuck holds the usage lock).
            slots = self._slots
            for last in (
                (lambda: slots.upkeep(final=True)) if slots is not None else None,
                self._flush_gives,
                self._flush,
            ):
                if last is not None:
                    try:
                        await asyncio.wait_for(last(), FLUSHER_STOP_S)
                    except (TimeoutError, RedisError, OSError) as exc:
                        _log.warning("redis_final_flush_failed", error=type(exc).__name__)
        finally:
            if self._probe is not None:
                self._probe.cancel()
            for client in (self.redis, self.bulk):
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers (for /ready): never waited for past PING_WAIT_S, and
        while Redis is known down, as admissions last found it until the retry time."""
        probe = self._probe
        if probe is None:
            now = time.monotonic()
            if self.local_only(now):
                return False  # known down: readiness probes must not each pay the timeout
            # One PING in flight at a time, shared by every /ready that comes meanwhile.
            probe = self._probe = asyncio.create_task(self._ping())
            probe.add_done_callback(self._pinged)
        try:
            # Shielded: a caller that gives up leaves the probe to record what it finds.
            return await asyncio.wait_for(asyncio.shield(probe), PING_WAIT_S)
        except TimeoutError:
            return False

    async def _ping(self) -> bool:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._ok()
        return True

    def _pinged(self, probe: asyncio.Task[bool]) -> None:
        if self._probe is probe:
            self._probe = None

    # --- default model and runtime routes --------------------------------------------

    async def get_default_model(self) -> str | None:
        """The runtime default model, if one was set."""
        try:
            # redis-py types every reply bytes | str; this pool's are bytes (__init__).
            value = cast(bytes | None, await self.redis.get(self._key("default_model")))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._ok()
        return value.decode() if value else None

    async def set_default_model(self, name: str, runtime: bool = False) -> None:
        """Persist the default model; a `runtime` route must be stored still."""
        await self._write("default", name, "1" if runtime else "0")

    async def _write(
        self, op: str, name: str, *args: str | bytes, buckets: tuple[str, ...] = ()
    ) -> int:
        """One routing change and a bump of the routing version, atomically: the other
        replicas poll the version (see `routing`) and reload when it moves.

        The change carries a deadline on Redis's clock, WRITE_WINDOW_S after Redis
        last answered, well within the client's timeout: a change whose answer timed
        out (Redis stalled with it in its socket) is refused when Redis runs it later,
        so a 503 means "not applied", on every replica, for good. A change that conflicts
        with what the store holds is refused there (409, or 404 for a default whose
        route was removed), as the router refuses one that conflicts with its table.
        Returns 1, or 2 for a save that replaced a route stored under its name, or 3 for
        a key change that found the keys changed since they were read (not written).
        `buckets`: the limit buckets a key change clears (limiter names).
        """
        keys = [
            self._key("routing_version"),
            self._key("routes"),
            self._key("default_model"),
            self._key("routing_epoch"),
            self._key("keys"),
            self._key("revoked"),
            self._key("keys_created"),
            self._key("revoked_at"),
            *(self._key("rl", bucket) for bucket in buckets),
        ]
        epoch = secrets.token_hex(8)  # this change's epoch
        try:
            sec, usec = await self.redis.time()
            deadline = sec + usec / 1e6 + WRITE_WINDOW_S
            done = await self._change(keys=keys, args=[repr(deadline), epoch, op, name, *args])
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise Unavailable(
                "the state store (Redis) is unreachable; the change was not applied; try again",
                retry_after=5,
            ) from None
        self._ok()
        if isinstance(done, list):
            why, candidate, owner = (part.decode() for part in done)
            if why == "removed":
                raise ModelNotFound(removed_meanwhile(candidate))
            if why in _KEY_REFUSALS:
                error, message = _KEY_REFUSALS[why]
                raise error(message(candidate))
            raise Conflict(is_default(candidate) if why == "default" else taken(candidate, owner))
        if not done:
            raise Unavailable(
                "the state store (Redis) answered too slowly; the change was not applied; try again"
            )
        return int(done)

    async def routing(self) -> tuple[RoutingVersion, dict[str, Any], str | None] | None:
        """(version, runtime routes, default model) as one consistent read; None when
        Redis can't be read (then nothing should change). A route that is not JSON is
        an `Unreadable`."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self._key("routing_epoch"))
                pipe.get(self._key("routing_version"))
                pipe.hgetall(self._key("routes"))
                pipe.get(self._key("default_model"))
                epoch, version, raw, default = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._ok()
        return _version(epoch, version), _routes(raw), default.decode() if default else None

    async def routing_version(self) -> RoutingVersion | None:
        """The routing version alone (a cheap poll); None when Redis can't be read."""
        try:
            epoch, version = cast(  # bytes: see get_default_model
                list[bytes | None],
                await self.redis.mget(self._key("routing_epoch"), self._key("routing_version")),
            )
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._ok()
        return _version(epoch, version)

    async def load_routes(self) -> dict[str, Any]:
        """Runtime routes by name (one that is not JSON: an `Unreadable`)."""
        try:
            # bytes: see get_default_model
            raw = cast(dict[bytes, bytes], await self.redis.hgetall(self._key("routes")))
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return {}
        self._ok()
        return _routes(raw)

    async def save_route(self, name: str, spec: dict[str, Any]) -> bool:
        """Persist a runtime route, unless another one answers to its name or an alias;
        whether it replaced one stored under its name."""
        names = [name, *spec.get("aliases", ())]
        return await self._write("save", name, msgspec.json.encode(spec), *names) == 2

    async def delete_route(self, name: str) -> None:
        """Forget a runtime route, unless it is the default."""
        await self._write("delete", name)

    # --- keys ----------------------------------------------------------------------

    async def load_keys(self, digests: Collection[str] = ()) -> StoredKeys:
        """Runtime keys by name (one that is not JSON: an `Unreadable`), the revocations
        of their secrets and of `digests`, and the routing version they were read at;
        Unavailable at once while Redis is known down (as the usage report)."""
        if self.local_only(time.monotonic()):
            raise _unreachable()
        for _ in range(KEYS_READ_TRIES):
            try:
                read = await self._read_keys(digests)
            except (RedisError, OSError) as exc:
                raise await self._bulk_failed(exc) from None
            if read is not None:
                self._ok()
                return read
        raise Unavailable("the keys kept changing while they were read; try again", retry_after=1)

    async def _read_keys(self, digests: Collection[str]) -> StoredKeys | None:
        """The keys, then the revocations of their secrets and of `digests`, looked up
        (HMGET), in pages (KEYS_PAGE), each round trip with the routing version as it
        stands after it; None when a change landed meanwhile (every key change moves the
        version: what was read then is one version's, whole). A digest neither
        configured here nor held by a stored entry is no key this replica could take,
        revoked or not, and the store may hold many such revocations (a configured
        key's stays for good; older versions kept every one ever made): the read grows
        with the keys, not with them."""
        version = (self._key("routing_epoch"), self._key("routing_version"))
        seen = cast(
            list[bytes | None], await self.bulk.mget(*version)
        )  # bytes: see get_default_model
        keys: dict[str, Any] = {}
        created: dict[str, str] = {}
        wanted = set(digests)
        for hkey, into, decode in (
            (self._key("keys"), keys, self._keys_page(wanted)),
            (self._key("keys_created"), created, _texts),
        ):
            cursor = 0
            while True:
                async with self.bulk.pipeline(transaction=True) as pipe:
                    pipe.hscan(hkey, cursor, count=KEYS_PAGE)
                    pipe.mget(*version)
                    (cursor, page), now = await pipe.execute()
                if now != seen:
                    return None
                # A page at a time: the loop runs between them. An entry SCAN gives
                # twice (a hash resized meanwhile) is the same entry twice.
                into.update(decode(page))
                if not cursor:
                    break
        # The revocations looked up: of the configured keys' and the entries' secrets.
        asked = list(wanted)
        revoked: dict[str, str] = {}
        revoked_at: dict[str, str] = {}
        for start in range(0, len(asked), KEYS_PAGE):
            part = asked[start : start + KEYS_PAGE]
            async with self.bulk.pipeline(transaction=True) as pipe:
                pipe.hmget(self._key("revoked"), part)
                pipe.hmget(self._key("revoked_at"), part)
                pipe.mget(*version)
                names, times, now = await pipe.execute()
            if now != seen:
                return None
            for d, n, t in zip(part, names, times, strict=True):
                if n is not None:
                    revoked[d] = n.decode(errors="replace")
                    if t is not None:
                        revoked_at[d] = t.decode(errors="replace")
        epoch, count = seen
        return StoredKeys(
            keys, revoked, _version(epoch, count), created, revoked_at, int(count or 0)
        )

    @staticmethod
    def _keys_page(wanted: set[str]) -> Callable[[dict[bytes, bytes]], dict[str, Any]]:
        """A page of the keys' hash decoded (see _routes), its secrets' digests added to
        `wanted` as it comes (the revocations to look up)."""

        def decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
            page = _routes(raw)
            wanted.update(entry_digests(page))
            return page

        return decode

    async def _bulk_failed(self, exc: Exception) -> Unavailable:
        """The 503 of a keys' read that failed. Asked of Redis with a PING: one that
        answers is up, the read was slow (a large answer) or refused, and nothing falls
        back to this process (limits stay on Redis); one that does not is down."""
        if not await self._ping():  # recorded as an outage there
            return _unreachable()
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            why = f"answered the keys' read too slowly (over {REDIS_BULK_TIMEOUT_S:g} s)"
        else:
            why = f"failed the keys' read ({type(exc).__name__})"
        return Unavailable(f"the state store (Redis) {why}; try again", retry_after=5)

    async def save_key(self, name: str, spec: dict[str, Any], created_at: str) -> None:
        """Persist a runtime key made at `created_at`; Conflict when a key has its name."""
        await self._write("key_add", name, msgspec.json.encode(spec), created_at)

    async def change_keys(self, change: KeyChange, seen: Hashable) -> bool:
        """Write `change` if the routing version is still `seen` (StoredKeys.version),
        with it; False, writing nothing, when anything changed since."""
        epoch, count = cast(RoutingVersion, seen)
        args: list[str | bytes] = [epoch, str(count), change.at, str(len(change.revoke))]
        args += [str(len(change.put)), str(len(change.unrevoke))]
        for digest, name in change.revoke.items():
            args += [digest, name]
        for name, spec in change.put.items():
            args += [name, msgspec.json.encode(spec)]
        args += change.unrevoke
        done = await self._write("key_change", "", *args, *change.remove, buckets=change.forget)
        return done != 3

    # --- usage ---------------------------------------------------------------------

    def record_usage(self, key: str, model: str, day: str, record: dict[str, Any]) -> None:
        """Count one inference; counters reach Redis in batches, off the request path."""
        count_usage(self._usage[(key, model, day)], record)

    def wall(self) -> float:
        """Now, in seconds since the epoch, on Redis's clock (estimated locally)."""
        # Usage days are named by it, as every limit's window is timed by it: replicas
        # whose clocks disagree near midnight still file one instant under one day.
        return time.time() + self.clock_offset

    async def _read_clock(self) -> bool:
        """Measure how far Redis's clock is from this process's: one TIME; whether the
        reading was used."""
        before = time.time()
        sec, usec = await self.redis.time()
        after = time.time()
        if after - before > CLOCK_READ_MAX_S:  # a slow answer says little about when
            return False
        self.clock_offset = sec + usec / 1e6 - (before + after) / 2
        self._clock_due = False
        return True

    async def _flush_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(0.1)
            try:
                if self._buckets is not None:
                    # A lease this process no longer uses goes back within LEASE_S and
                    # a tick, not when its key is next checked here (maybe never).
                    self._buckets.return_leases(time.monotonic())
                await self._flush_gives()
                if self._slots is not None:
                    await self._slots.upkeep()
                self._ticks += 1
                if self._ticks % 5 == 0:  # usage counters every 0.5 s
                    await self._flush()
                if self.down_since is None and (self._clock_due or self._ticks % CLOCK_TICKS == 1):
                    await self._read_clock()  # when due, the first tick, then every 10 s
            except (RedisError, OSError) as exc:
                self._failed(exc)
            except Exception as exc:  # a bug must not stop the settling for good
                _log.error("redis_flush_failed", exc_info=exc)

    async def _flush_gives(self) -> None:
        """Settle the reserved tokens of recent requests, in one pipeline."""
        if not self._gives:
            return
        gives, self._gives = self._gives, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, (cap, per_s, amount) in gives.items():
                    await self._give(keys=[key], args=[cap, per_s, amount], client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            self.keep_gives(gives, exc)
            return
        self._ok()

    def keep_gives(self, gives: dict[str, list[float]], exc: BaseException) -> None:
        """Queue settlements again when their round trip surely never ran; after a timeout
        (which may have run them) the charges alone: a charge sent twice is a limit
        stricter for a while, a charge lost lets a key spend past its budget; a refund
        sent twice would give back what was spent, so it goes."""
        timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
        for key, (cap, per_s, amount) in gives.items():
            if amount < 0 or not timed_out:
                self.owe(key, cap, per_s, amount)

    def owe(self, key: str, capacity: float, per_s: float, amount: float) -> None:
        """Queue a settlement of bucket `key` (its Redis key) for the next round trip."""
        pending = self._gives.get(key)
        if pending is None:
            self._gives[key] = [capacity, per_s, amount]
        else:
            pending[2] += amount

    async def _flush(self, errors: int | None = None) -> bool:
        """Send the usage counters: first a batch whose reply was lost (with its ID, so it
        counts once), then what was counted since, as a new batch. One flush at a time:
        the flusher and get_usage() must not overlap (one batch in doubt at most). False
        when Redis failed it; with `errors` (self.errors when the caller began), also when
        a failure came while it waited for the flusher: nothing is sent then."""
        async with self._flushing:
            if errors is not None and self.errors != errors:
                return False
            return await self._flush_once()

    async def _flush_once(self) -> bool:
        if self._unconfirmed is not None and not await self._send_usage(*self._unconfirmed):
            return False
        if not self._usage:
            return True
        pending, self._usage = self._usage, defaultdict(lambda: defaultdict(int))
        self._batches += 1
        keys = [self._key("usage_last", self._instance)]
        args: list[Any] = [USAGE_MARK_TTL_S, self._batches]
        for (key, model, day), row in pending.items():
            for field, n in row.items():
                if n:
                    keys.append(self._key("usage", day))
                    args += [f"{key}|{model}|{field}", n]
        if len(keys) == 1:
            return True
        return await self._send_usage(keys[0], keys, args)

    async def _send_usage(self, batch: str, keys: list[str], args: list[Any]) -> bool:
        try:
            await self._add_usage(keys=keys, args=args)
        except asyncio.CancelledError:
            self._unconfirmed = (batch, keys, args)  # cut (shutdown): resent by aclose
            raise
        except (RedisError, OSError) as exc:
            self._failed(exc)
            self._unconfirmed = (batch, keys, args)  # again later, as the same batch
            return False
        self._unconfirmed = None
        self._ok()
        return True

    async def get_usage(self, day: str | None = None) -> list[dict[str, Any]]:
        """Usage rows from Redis (plus what is not flushed yet); Unavailable at once while
        Redis is known down, as admissions skip it then (one call a second probes it)."""
        # Each wait for a stalled Redis is its 1 s timeout: the flush's and then the
        # read's would make the report wait seconds for its 503. The call that probes
        # pays one of them at most.
        if self.local_only(time.monotonic()) or not await self._flush(self.errors):
            raise _unreachable()
        days = [day] if day else []
        try:
            if not days:
                # bytes: see get_default_model
                keys = [cast(bytes, k) async for k in self.redis.scan_iter(self._key("usage", "*"))]
                days = sorted(k.decode().rsplit(":", 1)[1] for k in keys)
            rows: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)
            for d in days:
                counts = cast(dict[bytes, bytes], await self.redis.hgetall(self._key("usage", d)))
                for field, n in counts.items():
                    # A key's name has no "|" (stella.auth checks); a direct model's may.
                    key, rest = field.decode().split("|", 1)
                    model, name = rest.rsplit("|", 1)
                    rows[(key, model, d)][name] = int(n)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise _unreachable() from None
        return [usage_row(k, m, d, r) for (k, m, d), r in sorted(rows.items())]

    # --- rate limits -------------------------------------------------------------------

    def buckets(self) -> RedisBuckets:
        """The bucket store the limiter uses (one per process: its leases go back on a timer)."""
        if self._buckets is None:
            self._buckets = RedisBuckets(self)
        return self._buckets

    def slots(self) -> RedisSlots:
        """The concurrency slots the limiter uses, shared by every replica."""
        if self._slots is None:
            self._slots = RedisSlots(self)
        return self._slots


# A lease: tokens a process takes from a shared bucket beyond what one request needs,
# to admit its next requests without a round trip. At most LEASE_SHARE of a bucket's
# capacity and LEASE_REQUESTS requests' worth, in whole requests; unused tokens go back
# after LEASE_S. Buckets under 1 / LEASE_SHARE per minute never lease: every request
# asks Redis.
LEASE_SHARE = 0.01
LEASE_REQUESTS = 32
LEASE_S = 1.0


def _unreachable() -> Unavailable:
    """The 503 of a read that needs Redis while it does not answer."""
    return Unavailable("the state store (Redis) is unreachable; try again", retry_after=5)


def lease_size(capacity: float, cost: float, calls: int = 0) -> float:
    """The most a lease of this bucket holds, in whole requests of `cost` (0: no lease):
    LEASE_REQUESTS, or twice the `calls` that waited for its last top-up when more,
    within LEASE_SHARE of the bucket."""
    if cost <= 0:
        return 0.0
    # Sized to the demand: with more calls in flight than a lease pays, most would
    # make the round trip the lease is there to spare. Whole requests: a fraction
    # left in a lease could pay no request, nor could the fraction it leaves in the
    # bucket.
    want = cost * max(LEASE_REQUESTS, 2 * calls)
    return cost * (min(capacity * LEASE_SHARE, want) // cost)


class _Lease:
    __slots__ = ("capacity", "expires", "level", "per_s", "size", "tokens")

    def __init__(self, capacity: float, per_s: float) -> None:
        self.tokens = 0.0  # held by this process, not yet handed to a request
        self.expires = 0.0
        self.level = 0.0  # the shared bucket's level after the last take
        self.capacity = capacity
        self.per_s = per_s
        self.size = 0.0  # the most it holds (see lease_size)


class RedisBuckets:
    """Token buckets in Redis: one Lua script per check, short leases, per-process fallback.

    Every admitted request is paid for by tokens taken atomically from the shared
    bucket, so replicas together never admit more than the limit. A busy
    process takes a small lease with a call (see LEASE_SHARE) and admits from
    it locally until it runs out or expires, which spares most requests the
    round trip when limits are large. A lease holds one lease's worth at most,
    and one top-up per bucket is on its way at a time: a burst of calls would
    otherwise each take a lease and leave the bucket to leases nobody uses.
    """

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self._leases: dict[str, _Lease] = {}
        # Buckets whose lease is being refilled, with the lease's size: calls that it
        # may pay wait for it (the round trip they would make anyway).
        self._asking: dict[str, tuple[asyncio.Future[None], float]] = {}
        # Per bucket, the calls that waited for the top-up on its way, and for the last
        # one: the calls a second's worth of round trips must pay, whose size it sets.
        self._round: dict[str, int] = {}
        self._demand: dict[str, int] = {}

    def _lease(self, key: str, cost: float, now: float) -> _Lease | None:
        """The key's lease when it can pay `cost` now."""
        lease = self._leases.get(key)
        if lease is None or lease.tokens < cost or lease.expires < now:
            return None
        return lease

    def _return(self, key: str, lease: _Lease) -> None:
        if lease.tokens > 0:
            # Taken from Redis, so owed to Redis, even while it is away.
            st = self.state
            st.owe(st._key("rl", key), lease.capacity, lease.per_s, lease.tokens)
        lease.tokens = 0.0

    def return_leases(self, now: float | None = None) -> None:
        """Send back the unused tokens of expired leases (of all of them when `now` is
        None: shutting down) with the next settlement, so other replicas can use them."""
        for key, lease in list(self._leases.items()):
            if now is None or lease.expires < now:
                self._return(key, lease)
                if key not in self._asking:
                    del self._leases[key]
                    self._demand.pop(key, None)

    async def take_all(self, checks: list[tuple[str, float, float, float]]) -> list[Take]:
        """All buckets of one admission: nothing is taken unless every bucket has room.

        Buckets whose lease can pay are paid locally; the others go to Redis in
        one Lua call, each topping its lease up only when it ran short and no
        other call is doing so, so a bucket that always needs the round trip (a
        large token reserve) never makes another bucket's lease grow. A call whose
        bucket's lease is being topped up waits for that instead.
        """
        # A top-up wakes the calls that waited for it: those it could not pay (it was
        # sized to the calls before) wait for the next, a few times at most.
        for _ in range(3):
            waits = self._waits(checks)
            if not waits:
                break
            await asyncio.wait(waits)
        out, short = await self._take_all(checks)
        if short:
            # Refused by Redis while a lease of this process held or was fetching what
            # Redis lacked (a burst: the lease took the bucket's last tokens): once more.
            waits = self._waits(short)
            if waits:
                await asyncio.wait(waits)
            now = time.monotonic()
            if all(self._lease(key, cost, now) for key, _, _, cost in short):
                out, _ = await self._take_all(checks)
            elif self._give_back_short(short):
                # A call costing more than a lease pays, refused while this process's
                # lease held what Redis lacked: the lease goes back with the next try.
                out, _ = await self._take_all(checks)
        return out

    def _give_back_short(self, short: list[tuple[str, float, float, float]]) -> bool:
        """Return the leases of the buckets Redis found short when, with them, it would
        not be (sent with the next check); whether any was."""
        st = self.state
        back = False
        for key, _, _, cost in short:
            lease = self._leases.get(key)
            if lease is not None and lease.tokens > 0 and lease.level + lease.tokens >= cost:
                self._return(key, lease)
                back = True
        return back and st.down_since is None

    def _waits(self, checks: list[tuple[str, float, float, float]]) -> set[asyncio.Future[None]]:
        """The lease top-ups on their way that may pay a bucket its lease can't pay now."""
        if not self._asking or self.state.down_since is not None:
            # During an outage a top-up is the second's probe, which may take its whole
            # timeout: the calls go to the local stand-in at once instead.
            return set()
        now = time.monotonic()
        waits = set()
        for key, _, _, cost in checks:
            asking = self._asking.get(key)
            if asking is not None and asking[1] >= cost and self._lease(key, cost, now) is None:
                waits.add(asking[0])
                self._round[key] = self._round.get(key, 0) + 1
        return waits

    async def _take_all(
        self, checks: list[tuple[str, float, float, float]]
    ) -> tuple[list[Take], list[tuple[str, float, float, float]]]:
        """The takes, and when Redis refused them, the buckets it found short."""
        now = time.monotonic()
        leases = [self._lease(key, cost, now) for key, _, _, cost in checks]
        # Leased buckets pay now (a lease may expire, and go back, during the round
        # trip), and get it back if the admission fails.
        for lease, (_, _, _, cost) in zip(leases, checks, strict=True):
            if lease is not None:
                lease.tokens -= cost
        remote = [i for i, lease in enumerate(leases) if lease is None]
        out: list[Take] = [Take(True, 0.0, 0.0, 0.0)] * len(checks)
        short: list[tuple[str, float, float, float]] = []
        ok = True
        if remote:
            st = self.state
            if st.local_only(now):
                self._refund(leases, checks)
                return await self._local(checks), []
            args: list[float] = []
            keys = [st._key("rl", checks[i][0]) for i in remote]
            pending = st._gives
            carried: dict[str, list[float]] = {}
            asked: dict[str, asyncio.Future[None]] = {}
            sizes: dict[str, float] = {}  # the size of each lease topped up
            for key, i in zip(keys, remote, strict=True):
                name, cap, per_s, cost = checks[i]
                lease = self._leases.get(name)
                if lease is not None and lease.expires < now:
                    self._return(name, lease)  # settled with this check
                top_up = 0.0
                # A daily quota (per_s 0) never leases: a day's last tokens held by one
                # replica would refuse another's call until midnight, not for a second.
                size = lease_size(cap, cost, self._demand.get(name, 0)) if per_s else 0.0
                if size and name not in self._asking and st.down_since is None:
                    top_up = max(size - (lease.tokens if lease is not None else 0.0), 0.0)
                    if top_up:
                        asked[name] = asyncio.get_running_loop().create_future()
                        self._asking[name] = (asked[name], size)
                        sizes[name] = size
                        self._round[name] = 0
                # What calls that ended owe or get back goes with this check, not 0.1 s
                # later: the next call of a key sees its last one settled.
                settle = pending.pop(key, None)
                if settle is not None:
                    carried[key] = settle
                args += [cap, per_s, cost, cost + top_up, settle[2] if settle is not None else 0.0]
            try:
                flat = await st._take_all(keys=keys, args=args)
            except (RedisError, OSError) as exc:
                st._failed(exc)
                st.keep_gives(carried, exc)
                self._refund(leases, checks)
                return await self._local(checks), []
            except BaseException:
                self._refund(leases, checks)
                raise
            finally:
                for name, done in asked.items():
                    del self._asking[name]
                    self._demand[name] = self._round.pop(name, 0)
                    done.set_result(None)
            st._ok()
            ok = all(float(flat[3 * j + 1]) > 0 for j in range(len(remote)))
            expires = time.monotonic() + LEASE_S
            for j, i in enumerate(remote):
                name, cap, per_s, cost = checks[i]
                before, granted, after = (float(x) for x in flat[3 * j : 3 * j + 3])
                held = 0.0
                fits = before >= cost or (not per_s and before > 0)
                if ok and granted > cost:
                    lease = self._leases.get(name)
                    if lease is None:
                        lease = self._leases[name] = _Lease(cap, per_s)
                    lease.size = sizes.get(name, lease.size)
                    held = self._credit(keys[j], lease, granted - cost, after, expires)
                elif not ok and not fits:
                    short.append(checks[i])
                left = after + held
                out[i] = Take(
                    fits if not ok else True,
                    left,
                    0.0 if before >= cost else refill_s(cost - before, per_s),
                    refill_s(cap - left, per_s),
                    cut=cost - granted if ok and granted < cost else 0.0,
                )
            if not ok:
                self._refund(leases, checks)
        for i, lease in enumerate(leases):
            if lease is not None:
                _, cap, per_s, _ = checks[i]
                left = lease.level + lease.tokens
                out[i] = Take(True, left, 0.0, refill_s(cap - left, per_s))
        return out, short

    async def _local(self, checks: list[tuple[str, float, float, float]]) -> list[Take]:
        """The takes of the stand-in while Redis is away, marked so: each is settled
        there, not in Redis, whenever its call ends."""
        takes = await self.state.local.take_all(checks)
        for take in takes:
            take.local = True
        return takes

    def _credit(
        self, key: str, lease: _Lease, tokens: float, level: float, expires: float
    ) -> float:
        """Add tokens Redis granted to a lease, up to its size (the rest goes back)."""
        held = lease.tokens + tokens
        if held > lease.size:  # never more than a lease's worth held here
            self.state.owe(key, lease.capacity, lease.per_s, held - lease.size)
            held = lease.size
        lease.tokens = held
        lease.expires = expires
        lease.level = level
        return held

    @staticmethod
    def _refund(leases: list[_Lease | None], checks: list[tuple[str, float, float, float]]) -> None:
        """Give the leased buckets back what they paid for an admission that failed."""
        for lease, (_, _, _, cost) in zip(leases, checks, strict=True):
            if lease is not None:
                lease.tokens += cost

    def forget_days(self, kept: tuple[str, ...]) -> None:
        """Drop the stand-in's daily buckets of other days (Redis expires its own)."""
        self.state.local.forget_days(kept)

    def forget(self, keys: Sequence[str]) -> None:
        """Drop what this process holds of these buckets (Redis's copies went with the
        key change that named them): leases, settlements not sent, the stand-in's."""
        st = self.state
        for key in keys:
            # A lease's tokens came from the bucket that is gone: not owed to the new one.
            self._leases.pop(key, None)
            self._demand.pop(key, None)
            st._gives.pop(st._key("rl", key), None)
        st.local.forget(keys)

    def give(
        self, key: str, capacity: float, per_s: float, amount: float, local: bool = False
    ) -> None:
        """Settle after the fact, in the background, in the store that took the call's
        reservation: the stand-in when `local`, else Redis, even while it is away."""
        if not amount:
            return
        st = self.state
        if local:
            # Redis never took it: a refund there would restore what the call never
            # spent of Redis's bucket (a whole used-up day, for a daily quota).
            st.local.give(key, capacity, per_s, amount)
            return
        # Settled in batches every 0.1 s: a refund that waits that long changes nothing for
        # a per-minute bucket, and it spares every request a round trip. Taken from Redis,
        # it is owed to Redis during an outage too (sent once it is back): given to the
        # stand-in, Redis would keep the whole reservation (a daily quota, until midnight).
        st.owe(st._key("rl", key), capacity, per_s, amount)


# A slot holder's claim lapses this long after its last renewal (a replica that died
# frees its slots then); live holders renew every third of it.
SLOT_TTL_S = 30.0
SLOT_RENEW_S = SLOT_TTL_S / 3
# The longest pause between two asks of a caller waiting for a slot.
SLOT_POLL_MAX_S = 0.05
# At shutdown, the longest wait for releases already on their way to Redis.
SLOT_RELEASE_WAIT_S = 1.0


class RedisSlots:
    """Concurrency slots shared by every replica: a Redis sorted set per slot name.

    Taking a slot is one Lua call; a holder that finds the set full asks again with
    a growing pause (10 to 50 ms) until the queue timeout, as every replica's
    callers do (no queue: the first to ask after a slot frees up gets it). A
    release goes to Redis at once, in the background, so a client whose requests
    follow one another waits at most one pause for its own last one's slot. Held
    slots are renewed every SLOT_RENEW_S. While Redis is away the slots of this
    process stand in (as the buckets do).
    """

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.local = MemorySlots()
        self.held: dict[str, str] = {}  # member -> set key
        # Members to remove from Redis with the next upkeep: releases that failed, and
        # takes cut or failed in their round trip (Redis may or may not have added them).
        self._released: list[tuple[str, str]] = []
        self._releasing: set[asyncio.Task[None]] = set()  # releases on their way
        self._count = 0
        self._renewed = time.monotonic()
        # Calls of this process asking for each slot name now (a guess of `free`).
        self._waiting: dict[str, int] = {}

    def free(self, name: str, size: int) -> bool:
        """A guess from this process alone (asking Redis would be a round trip): fewer
        of its calls hold or wait for `name`'s slots than there are. Other replicas' calls
        are not seen: one that finds the set full all the same waits, as any would."""
        if self.state.down_since is not None:
            return self.local.free(name, size)
        key = self.state._key("slot", name)
        mine = self._waiting.get(name, 0) + sum(1 for k in self.held.values() if k == key)
        return mine < size

    async def acquire(self, name: str, size: int, wait_s: float) -> Any | None:
        """A held slot, or None when none freed up within `wait_s` seconds."""
        waiting = self._waiting
        waiting[name] = waiting.get(name, 0) + 1
        try:
            return await self._acquire(name, size, wait_s)
        finally:
            if waiting[name] == 1:
                del waiting[name]
            else:
                waiting[name] -= 1

    async def _acquire(self, name: str, size: int, wait_s: float) -> Any | None:
        st = self.state
        deadline = time.monotonic() + wait_s
        key = st._key("slot", name)
        self._count += 1
        member = f"{st._instance}:{self._count}"
        pause = 0.01
        while True:
            now = time.monotonic()
            if st.local_only(now):
                held = await self.local.acquire(name, size, max(deadline - now, 0.0))
                return None if held is None else ("local", held)
            try:
                taken = await st._take_slot(keys=[key], args=[SLOT_TTL_S, size, member])
            except asyncio.CancelledError:
                self._released.append((key, member))  # Redis may have added it already
                raise
            except (RedisError, OSError) as exc:
                # A timeout may come after Redis took the slot: give that back too.
                self._released.append((key, member))
                st._failed(exc)
                continue  # the local slots, until Redis is back
            st._ok()
            if taken:
                self.held[member] = key
                return ("redis", key, member)
            now = time.monotonic()
            if now >= deadline:
                return None
            await asyncio.sleep(min(pause, deadline - now))
            pause = min(pause * 2, SLOT_POLL_MAX_S)

    def release(self, held: Any) -> None:
        """Give a slot back: to Redis at once, in the background."""
        if held[0] == "local":
            self.local.release(held[1])
            return
        _, key, member = held
        if self.held.pop(member, None) is None:
            return
        if self.state.down_since is not None:  # with the upkeep once Redis is back
            self._released.append((key, member))
            return
        try:
            task = asyncio.get_running_loop().create_task(self._release(key, member))
        except RuntimeError:  # no loop (shutting down): with the final upkeep
            self._released.append((key, member))
            return
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, key: str, member: str) -> None:
        st = self.state
        try:
            await st.redis.zrem(key, member)
        except asyncio.CancelledError:
            self._released.append((key, member))
            raise
        except (RedisError, OSError) as exc:
            self._released.append((key, member))  # again with the next upkeep
            st._failed(exc)

    async def upkeep(self, final: bool = False) -> None:
        """Send the releases; renew the claims of held slots when due (all of them at
        shutdown: released)."""
        st = self.state
        if final and self._releasing:  # releases on their way: landed, or queued below
            await asyncio.wait(set(self._releasing), timeout=SLOT_RELEASE_WAIT_S)
            self._released += [(key, member) for member, key in self.held.items()]
            self.held.clear()
        released, self._released = self._released, []
        renew = not final and self.held and time.monotonic() - self._renewed >= SLOT_RENEW_S
        if not released and not renew:
            return
        renewed = dict(self.held) if renew else {}
        try:
            async with st.redis.pipeline(transaction=False) as pipe:
                for key, member in released:
                    pipe.zrem(key, member)
                if renew:
                    keys = list(renewed.values())
                    members = list(renewed)
                    await st._renew_slots(keys=keys, args=[SLOT_TTL_S, *members], client=pipe)
                await pipe.execute()
        except asyncio.CancelledError:
            self._released = released + self._released  # cut (shutdown): the final upkeep
            raise
        except (RedisError, OSError) as exc:
            st._failed(exc)
            if not final:
                self._released = released + self._released  # again with the next flush
            return
        finally:
            # The renewal adds back what is missing: a slot released during its round
            # trip (its removal may have landed first) is removed again, with the next.
            self._released += [(k, m) for m, k in renewed.items() if m not in self.held]
        st._ok()
        if renew:
            self._renewed = time.monotonic()
