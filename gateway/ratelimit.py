"""Per-key token buckets (requests per minute, tokens per minute), shared by gateway replicas through Redis.

One Lua script per admitted call refills both buckets on Redis's clock and takes from them
atomically, so N gateway processes enforce one limit together. When Redis is unreachable or slow,
each process falls back to its own buckets (the limit then holds per process) and tries Redis
again after a pause: a Redis outage never fails or stalls requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pythia.ratelimit")

WINDOW_S = 60.0  # limits are per minute: a bucket holds one minute's allowance and refills over a minute
MAX_REDIS_CONNECTIONS = 32  # per gateway worker
SLOW_CALLS_MEAN_DOWN = 3  # Redis timeouts in a row that count as an outage
MAX_LOCAL_KEYS = 100_000  # local buckets kept per process (oldest dropped): bounded memory

# KEYS[1] request bucket, KEYS[2] token bucket; ARGV rpm, tpm, token cost. Each bucket is a hash
# {l: level, t: last update (Redis time, s)}; an absent bucket is full. Nothing is written on denial:
# the stored (level, time) pair already yields the right refill later.
_LUA = """
local tv = redis.call('TIME')
local now = tonumber(tv[1]) + tonumber(tv[2]) / 1000000
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  local l = tonumber(v[1])
  local t = tonumber(v[2])
  if l == nil or t == nil then return cap end
  return math.min(cap, l + math.max(0, now - t) * cap / 60)
end
local r = 0
local k = 0
local wait = 0
local which = ''
if rpm > 0 then
  r = level(KEYS[1], rpm)
  if r < 1 then wait = (1 - r) * 60 / rpm; which = 'requests' end
end
if tpm > 0 then
  if cost > tpm then cost = tpm end
  k = level(KEYS[2], tpm)
  if k < cost then
    local w = (cost - k) * 60 / tpm
    if w > wait then wait = w; which = 'tokens' end
  end
end
if wait > 0 then return {0, tostring(wait), which} end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'l', tostring(r - 1), 't', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'l', tostring(k - cost), 't', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120)
end
return {1, '0', ''}
"""


@dataclass(slots=True)
class Verdict:
    """Whether a call may go now; if not, how long until it could and which limit ran out."""

    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""  # "requests" or "tokens"
    shared: bool = True  # decided by the Redis buckets (False: this process's own fallback)


@dataclass(slots=True)
class _Bucket:
    requests: float
    tokens: float
    updated: float


class LocalBuckets:
    """The same token buckets in this process only (no Redis, or Redis down)."""

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, tokens: int) -> Verdict:
        """Take one request and `tokens` tokens from `key`'s buckets, or say how long to wait."""
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= MAX_LOCAL_KEYS:
                self._buckets.pop(next(iter(self._buckets)))
            b = self._buckets[key] = _Bucket(float(self.rpm), float(self.tpm), now)
        elapsed = max(0.0, now - b.updated)
        b.updated = now
        b.requests = min(float(self.rpm), b.requests + elapsed * self.rpm / WINDOW_S)
        b.tokens = min(float(self.tpm), b.tokens + elapsed * self.tpm / WINDOW_S)
        cost = min(tokens, self.tpm)
        wait, which = 0.0, ""
        if self.rpm > 0 and b.requests < 1:
            wait, which = (1 - b.requests) * WINDOW_S / self.rpm, "requests"
        if self.tpm > 0 and b.tokens < cost:
            w = (cost - b.tokens) * WINDOW_S / self.tpm
            if w > wait:
                wait, which = w, "tokens"
        if wait > 0:
            return Verdict(False, wait, which, shared=False)
        if self.rpm > 0:
            b.requests -= 1
        if self.tpm > 0:
            b.tokens -= cost
        return Verdict(True, shared=False)


class RateLimiter:
    """Token buckets per key: shared through Redis when `redis_url` is set, else (or while it is down) local."""

    def __init__(
        self,
        rpm: int,
        tpm: int,
        redis_url: str = "",
        key_prefix: str = "pythia:",
        timeout_s: float = 0.1,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.local = LocalBuckets(rpm, tpm, clock)
        self.prefix = key_prefix + "rl:"
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.clock = clock
        self._down_until = 0.0
        self._errors = 0
        self._slow = 0  # timeouts in a row
        self._redis: Any = None
        self._script: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            # a bounded pool: a burst of calls queues for a few connections instead of opening one each
            pool = aioredis.BlockingConnectionPool.from_url(
                redis_url,
                max_connections=MAX_REDIS_CONNECTIONS,
                timeout=None,  # waiting for a free connection is bounded by take()'s own timeout
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            self._redis = aioredis.Redis(connection_pool=pool)
            self._script = self._redis.register_script(_LUA)

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    async def take(self, key: str, tokens: int) -> Verdict:
        """Admit one call of `tokens` tokens for `key` (an opaque id, never the API key itself)."""
        if self._script is None or self.clock() < self._down_until:
            return self.local.take(key, tokens)
        try:
            allowed, wait, which = await asyncio.wait_for(
                self._script(
                    keys=[f"{self.prefix}{key}:r", f"{self.prefix}{key}:t"], args=[self.rpm, self.tpm, tokens]
                ),
                self.timeout_s * 2,
            )
        except Exception as e:  # any Redis trouble: decide locally, never fail the call
            self._errors += 1
            self._slow += 1
            # refused/reset: down now; timeouts: down after a few in a row (one slow call in a burst is not an outage)
            if self._slow >= SLOW_CALLS_MEAN_DOWN or not isinstance(e, TimeoutError | aioredis_timeout()):
                if self.clock() >= self._down_until:
                    log.warning(
                        "rate limit Redis unavailable; limiting per process for now",
                        extra={
                            "error": e.__class__.__name__,
                            "retry_s": self.retry_s,
                            "errors": self._errors,
                        },
                    )
                self._down_until = self.clock() + self.retry_s
            return self.local.take(key, tokens)
        self._slow = 0
        if self._errors:
            log.info("rate limit Redis answers; limits are shared again", extra={"errors": self._errors})
            self._errors = 0
        w = float(wait.decode() if isinstance(wait, bytes) else wait)
        return Verdict(bool(int(allowed)), w, which.decode() if isinstance(which, bytes) else str(which))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
            self._redis = None
            self._script = None


def aioredis_timeout() -> type[Exception]:
    """redis-py's own timeout exception (a socket read that timed out)."""
    from redis.exceptions import TimeoutError as RedisTimeout

    return RedisTimeout


def retry_after_header(wait_s: float) -> str:
    """Whole seconds for `Retry-After`, at least 1."""
    return str(max(1, math.ceil(wait_s)))
