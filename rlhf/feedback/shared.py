"""What every server process of one labeling app must agree on: rate-limit windows and the auth epoch.

Three places can hold it, chosen by `open_shared(settings, db)`:

- this process's memory: one server process (the default `rlhf label serve`), no round trip at all;
- Redis (`RLHF_LABEL_REDIS_URL`): a sorted set of event times per limited key, changed by one Lua script
  per check (atomic, so the sum over workers respects the limit), and an auth epoch counter that every
  API request reads (without blocking the event loop; requests that ask at once share one GET, sent after
  each of them asked) so a revoked token or a changed user is refused by every worker at once;
- the database (`--workers N` without Redis): a table of recent events, checked and appended in one write
  transaction (under an advisory lock per key on PostgreSQL; SQLite has one writer anyway). No auth epoch
  there: the app turns its token cache off, so each API request reads the token's row (revocation is
  still instant everywhere, at a query per request).

Times are the shared clock's: Redis's TIME, or the database hosts' wall clocks (keep them in sync).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections import deque

from sqlalchemy import delete, func, insert, select, text

from rlhf.errors import ConfigError
from rlhf.feedback.db import Database
from rlhf.feedback.models import RateEvent
from rlhf.feedback.settings import Settings

log = logging.getLogger(__name__)


class Shared:
    """Sliding windows of events per key, and the auth epoch. This base class keeps both in memory."""

    MAX_KEYS = 100_000
    where = "memory"
    slow = False  # True where a check costs a database transaction: async callers use the thread pool

    def __init__(self) -> None:
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, limit: int, window_s: float, add: bool = True) -> float | None:
        """Seconds until `key` may act again if it already has `limit` events in the last `window_s`;
        else None, after counting one more event when `add`."""
        now = time.monotonic()
        with self._lock:
            if len(self._events) > self.MAX_KEYS:  # forget keys whose window has passed: memory stays bounded
                self._events = {k: w for k, w in self._events.items() if w and w[-1] > now - window_s}
            window = self._events.setdefault(key, deque())
            while window and window[0] <= now - window_s:
                window.popleft()
            if len(window) >= limit:
                return window[0] + window_s - now
            if add:
                window.append(now)
        return None

    def add(self, key: str, window_s: float) -> None:
        with self._lock:
            self._events.setdefault(key, deque()).append(time.monotonic())

    def remove_newest(self, key: str) -> None:
        """Take back the latest event of `key` (an action that was counted but did not happen)."""
        with self._lock:
            window = self._events.get(key)
            if window:
                window.pop()

    def auth_epoch(self) -> int | None:
        """A number every process sees change when a user or token changes; None when not shared."""
        return None

    async def auth_epoch_async(self) -> int | None:
        """`auth_epoch` from the event loop, without blocking it."""
        return self.auth_epoch()

    def bump_auth_epoch(self) -> None:
        """Tell every process that users or tokens changed (their cached token lookups are stale)."""

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        self.close()


# KEYS[1]: the window's sorted set; ARGV: limit, window in ms, 1 to count this event, a unique member.
# Scores are Redis's own clock in ms, so workers on several hosts share one clock.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
end
return -1
"""


class RedisShared(Shared):
    where = "redis"
    PREFIX = "rlhf:label:"

    def __init__(self, url: str, namespace: str = "") -> None:
        """`namespace` keeps apps on different stores apart in one Redis (see redis_namespace)."""
        super().__init__()
        self.prefix = f"{self.PREFIX}{namespace}:"
        try:
            import redis
            import redis.asyncio
        except ImportError:
            raise ConfigError(
                "RLHF_LABEL_REDIS_URL needs the redis client: pip install 'rlhf-loop[scale]'"
            ) from None
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        # The event loop's reads of the auth epoch (one per API request) go through an asyncio client:
        # a blocking GET would hold up every other request on the loop for the round trip.
        self.aclient = redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._epoch_read: asyncio.Future[int] | None = None  # the next read, not yet sent
        try:
            self.client.ping()
        except redis.RedisError as e:
            raise ConfigError(f"cannot reach Redis at {url}: {e}") from None
        self._take = self.client.register_script(_TAKE)
        self._epoch_key = self.prefix + "auth_epoch"

    def take(self, key: str, limit: int, window_s: float, add: bool = True) -> float | None:
        member = f"{time.time_ns()}-{random.getrandbits(32)}"
        ms = int(window_s * 1000)
        retry_ms = int(self._take(keys=[self.prefix + key], args=[limit, ms, int(add), member]))
        return None if retry_ms < 0 else retry_ms / 1000

    def add(self, key: str, window_s: float) -> None:
        self.take(key, 2**62, window_s)

    def remove_newest(self, key: str) -> None:
        self.client.zpopmax(self.prefix + key)

    def auth_epoch(self) -> int | None:
        value = self.client.get(self._epoch_key)
        return int(value) if value is not None else 0

    async def auth_epoch_async(self) -> int | None:
        """The auth epoch as read by a GET sent after this call: requests that ask while a read is
        waiting to be sent share it (a read sent earlier could miss a change made before they asked)."""
        if self._epoch_read is None:
            self._epoch_read = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._read_epoch(self._epoch_read))
        return await asyncio.shield(self._epoch_read)

    async def _read_epoch(self, result: asyncio.Future[int]) -> None:
        self._epoch_read = None  # from here on, callers wait for the next read: this one is being sent
        try:
            value = await self.aclient.get(self._epoch_key)
        except Exception as e:  # each caller gets the error
            result.set_exception(e)
        except asyncio.CancelledError:  # the app is shutting down
            result.cancel()
            raise
        else:
            result.set_result(int(value) if value is not None else 0)

    def bump_auth_epoch(self) -> None:
        self.client.incr(self._epoch_key)

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        self.client.close()
        await self.aclient.aclose()


class DatabaseShared(Shared):
    where = "database"
    slow = True
    CLEAN_EVERY = 200  # delete expired rows about once per this many events

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        self._longest_s = 60.0

    def take(self, key: str, limit: int, window_s: float, add: bool = True) -> float | None:
        now = time.time()
        self._longest_s = max(self._longest_s, window_s)
        with self.db.session() as session, self.db.write(session):
            if not self.db.is_sqlite:  # one check-and-add per key at a time across processes
                session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})
            n, oldest = session.execute(
                select(func.count(), func.min(RateEvent.at)).where(
                    RateEvent.key == key, RateEvent.at > now - window_s
                )
            ).one()
            if n >= limit:
                return float(oldest) + window_s - now
            if add:
                session.execute(insert(RateEvent), {"key": key, "at": now})
                if random.random() < 1 / self.CLEAN_EVERY:
                    session.execute(delete(RateEvent).where(RateEvent.at < now - self._longest_s))
        return None

    def add(self, key: str, window_s: float) -> None:
        self.take(key, 2**62, window_s)

    def remove_newest(self, key: str) -> None:
        with self.db.session() as session, self.db.write(session):
            newest = select(func.max(RateEvent.id)).where(RateEvent.key == key).scalar_subquery()
            session.execute(delete(RateEvent).where(RateEvent.id == newest))


def redis_namespace(secret: str) -> str:
    """The Redis key namespace of a store, from its app secret (a hash of it: the secret stays secret).
    Every process on one store has that secret, however it spells the database URL; other stores differ."""
    return hashlib.sha256(b"rlhf-redis-namespace:" + secret.encode()).hexdigest()[:16]


def open_shared(settings: Settings, db: Database, secret: str) -> Shared:
    """Redis when configured; else the database for several workers; else this process's memory."""
    shared: Shared
    if settings.redis_url:
        shared = RedisShared(settings.redis_url, redis_namespace(secret))
    elif settings.workers > 1:
        shared = DatabaseShared(db)
    else:
        shared = Shared()
    log.info("rate limits and token revocations shared through %s", shared.where)
    return shared
