"""RedisStore: the learned model shared by every gateway process through Redis.

Hot path: `record*` only add to in-process dicts. A background task flushes them every
`flush_interval_s` in one pipeline (additive HINCRBYFLOAT through a Lua script, so any number
of processes merge), then reloads every app's counters into the Predictor's in-process model
every `refresh_interval_s`. Live-workflow state is written with a TTL and fetched for workflows
this process meets mid-way, so calls of one workflow may land on different processes.

Redis down, slow or restarted: the hot path never notices. Failed batches go back into the
queue (counters are additive, so nothing is lost or double-counted), errors are counted and
logged once per interval, and the client reconnects on the next cycle. After a restart that
lost the data (no persistence), the first process to flush restores its whole model atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from predictor.settings import PredictorSettings
from predictor.store import SnapshotSink

log = logging.getLogger("pythia.predictor.redis")

# Apply one flushed batch (every app's counters) exactly once: KEYS[1] is the batch's id key (SET NX:
# a batch whose answer was lost, e.g. to a timeout, is retried with the same id and skipped), KEYS[2..]
# the apps' model hashes; ARGV = ttl, then per app: n, then n field/delta pairs. A missing hash (Redis
# lost its data, or a new app) is not written: its 1-based app index is returned for a restore.
GEN_FIELD = "#gen"  # in each model hash: bumped by every write, so a refresh skips apps nobody changed
APPLY_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {-1} end
local missing = {}
local a = 2
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  if redis.call('EXISTS', KEYS[k]) == 0 then
    table.insert(missing, k - 1)
  else
    for i = a, a + 2 * n - 1, 2 do redis.call('HINCRBYFLOAT', KEYS[k], ARGV[i], ARGV[i + 1]) end
    redis.call('HINCRBY', KEYS[k], '#gen', 1)
  end
  a = a + 2 * n
end
return missing
"""

# Restore a whole model (n base pairs) if the hash is still missing, then add the batch's counters once
# (KEYS[2] is the id key of this app's part of the batch). ARGV = ttl, n, base pairs, batch pairs.
RESTORE_LUA = """
local n = tonumber(ARGV[2])
local restored = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 3, 2 * n + 2, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
  restored = 1
end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  for i = 2 * n + 3, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('HINCRBY', KEYS[1], '#gen', 1)
return restored
"""

BATCH_ID_TTL_S = 900  # how long Redis remembers an applied batch id (retries come within the outage)
MAX_UNACKED = 300  # unacknowledged batches kept apart (30 s of flushes); older ones are merged

# Who ends a workflow that went idle: not this process if another one's live state has more calls,
# nor if one already claimed it; else claim it (SET NX) so that exactly one process learns its end.
CHECK_FINISH_LUA = """
local raw = redis.call('GET', KEYS[1])
if raw then
  local ok, st = pcall(cjson.decode, raw)
  if ok and tonumber(st['calls'] or 0) > tonumber(ARGV[1]) then return 'other' end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then return 'mine' end
return 'ended'
"""

FINISH_FALLBACK_S = 30.0  # Redis unreachable this long: a process ends its own idle workflows itself

REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError, ConnectionError)


class ModelSink(SnapshotSink, Protocol):
    """The Predictor, as the Redis store sees it."""

    def model_counts(self, app: str) -> Mapping[str, float]: ...

    def model_texts(self, app: str) -> Mapping[str, str]: ...


def _pairs(d: Mapping[str, float]) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        if v:
            out.append(k)
            out.append(repr(float(v)))
    return out


class RedisStore:
    """Counters and live-workflow state in Redis, behind in-process queues and snapshots."""

    shares_live = True

    def __init__(self, url: str, key_prefix: str = "pythia:", settings: PredictorSettings | None = None) -> None:
        self.url = url
        self.prefix = key_prefix
        self.settings = settings or PredictorSettings()
        self._pending: dict[str, dict[str, float]] = {}  # app -> counter -> delta not yet sent
        # batches sent (or to send) but not acknowledged, with their ids: retried as they are
        self._unacked: list[tuple[str, dict[str, dict[str, float]]]] = []
        self._batch_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:12]}-"
        self._batch_seq = 0
        self._texts: dict[str, dict[str, str]] = {}  # app -> role -> system prompt not yet in Redis
        self._live: dict[tuple[str, str], dict[str, Any]] = {}
        self._wanted: set[tuple[str, str]] = set()
        self._ended: set[tuple[str, str]] = set()
        self._checks: dict[tuple[str, str], tuple[int, float]] = {}  # idle workflow -> (its calls, since)
        # apps whose model hash this process has seen in Redis: only for those is a missing hash a lost one
        # (a new app's first flush also finds none, and that is no reason to warn)
        self._seen_in_redis: set[str] = set()
        # per app: the `#gen` of the hash this process last loaded, and its own writes since then; a refresh
        # reloads (and invalidates the app's cached views) only when another process wrote too
        self._loaded_gen: dict[str, int] = {}
        self._own_writes: dict[str, int] = {}
        self._client: aioredis.Redis | None = None
        self._sink: ModelSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._errors_since_log = 0
        self._last_log = 0.0
        self.counters: dict[str, float] = {"redis_errors": 0, "redis_flushes": 0, "redis_refreshes": 0,
                                           "redis_restores": 0, "redis_connected": 0, "redis_live_merged": 0,
                                           "redis_refresh_skipped": 0}

    # ------------------------------------------------------------------ hot path (sync, no I/O)

    def record(self, app: str, key: str, delta: float) -> None:
        """Queue a counter increment."""
        d = self._pending.get(app)
        if d is None:
            d = self._pending[app] = {}
        d[key] = d.get(key, 0.0) + delta

    def record_text(self, app: str, role: str, text: str) -> None:
        """Queue a role's system prompt text."""
        self._texts.setdefault(app, {})[role] = text

    def record_live(self, app: str, wid: str, state: dict[str, Any]) -> None:
        """Queue the latest state of a live workflow (written with a TTL)."""
        self._live[(app, wid)] = state

    def want_live(self, app: str, wid: str) -> None:
        """Ask for another process's state of this workflow (merged in the background)."""
        self._wanted.add((app, wid))

    def end_live(self, app: str, wid: str, calls: int) -> None:
        """The workflow ended: its live state can go."""
        self._live.pop((app, wid), None)
        self._ended.add((app, wid))

    def check_finish(self, app: str, wid: str, calls: int) -> None:
        """Ask Redis whether this process should end an idle workflow (answered through finish_checked)."""
        if not self.counters["redis_connected"] and self._sink is not None:
            self._sink.finish_checked(app, wid, True)  # Redis is away: no one can coordinate, end it here
            return
        self._checks.setdefault((app, wid), (calls, time.monotonic()))

    def stats(self) -> dict[str, float]:
        """Counters for /metrics: errors, flushes, refreshes, restores, whether Redis answered last time."""
        out = dict(self.counters)
        out["redis_pending_counters"] = float(sum(len(d) for d in self._pending.values())
                                              + sum(len(d) for _b, batch in self._unacked for d in batch.values()))
        return out

    # ------------------------------------------------------------------ background

    def _key(self, kind: str, app: str) -> str:
        return f"{self.prefix}{kind}:{app}"

    async def start(self, sink: SnapshotSink) -> None:
        """Connect (lazily) and start the flush/refresh loop; never fails when Redis is down."""
        self._sink = sink  # type: ignore[assignment]
        t = self.settings.redis_timeout_s
        self._client = aioredis.Redis.from_url(self.url, socket_timeout=t, socket_connect_timeout=t,
                                               decode_responses=True, retry_on_timeout=False)
        self._stopping = False
        with contextlib.suppress(*REDIS_ERRORS):
            await self._refresh()  # a warm start when Redis is there; the loop retries otherwise
            self.counters["redis_connected"] = 1
        self._task = asyncio.create_task(self._run(), name="pythia-predictor-redis")

    async def stop(self) -> None:
        """Stop the loop, try one last flush (bounded by the timeout), close the connection."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._client is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(self._flush(), timeout=max(1.0, 4 * self.settings.redis_timeout_s))
            with contextlib.suppress(*REDIS_ERRORS, Exception):
                await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        s = self.settings
        next_refresh = time.monotonic() + s.refresh_interval_s
        while not self._stopping:
            try:
                await asyncio.wait_for(self._flush(), timeout=4 * s.redis_timeout_s + 1)
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + s.refresh_interval_s
                    await asyncio.wait_for(self._refresh(), timeout=4 * s.redis_timeout_s + 1)
                self.counters["redis_connected"] = 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down or slow: keep queuing, report once per interval
                self._failed(e)
            await asyncio.sleep(s.flush_interval_s)

    def _failed(self, e: BaseException) -> None:
        self.counters["redis_errors"] += 1
        self.counters["redis_connected"] = 0
        self._errors_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= self.settings.error_log_interval_s:
            log.warning("predictor Redis store unavailable (%s: %s); %d errors since last report, "
                        "predicting from the last snapshot and queuing writes", type(e).__name__, e,
                        self._errors_since_log)
            self._last_log = now
            self._errors_since_log = 0

    def _unflushed(self, app: str) -> dict[str, float]:
        """This process's counters of `app` that Redis has not acknowledged (queued or unacked batches)."""
        out: dict[str, float] = {}
        for _bid, batch in self._unacked:
            for k, v in batch.get(app, {}).items():
                out[k] = out.get(k, 0.0) + v
        for k, v in self._pending.get(app, {}).items():
            out[k] = out.get(k, 0.0) + v
        return out

    def _next_batch(self) -> None:
        """Move the queued counters into a new batch with its own id."""
        if not any(self._pending.values()):
            return
        self._batch_seq += 1
        self._unacked.append((f"{self._batch_prefix}{self._batch_seq}", self._pending))
        self._pending = {}
        if len(self._unacked) > MAX_UNACKED:  # a long outage: merge all but the newest few into one
            keep = self._unacked[-4:]
            merged: dict[str, dict[str, float]] = {}
            for _bid, batch in self._unacked[:-4]:
                for app, d in batch.items():
                    m = merged.setdefault(app, {})
                    for k, v in d.items():
                        m[k] = m.get(k, 0.0) + v
            self._batch_seq += 1
            self._unacked = [(f"{self._batch_prefix}{self._batch_seq}", merged), *keep]

    async def _flush(self) -> None:
        """Send unacknowledged batches, texts and live state in one pipeline; keep them on failure."""
        client = self._client
        if client is None:
            return
        self._next_batch()
        batches = list(self._unacked)
        texts, self._texts = self._texts, {}
        live, self._live = self._live, {}
        ended, self._ended = self._ended, set()
        wanted, self._wanted = self._wanted, set()
        try:
            if batches or texts or live or ended:
                pipe = client.pipeline(transaction=False)
                sent: list[tuple[str, list[str]]] = []
                apps_seen: set[str] = set()
                for bid, batch in batches:
                    apps = [a for a, d in batch.items() if d]
                    args: list[str] = [str(BATCH_ID_TTL_S)]
                    for app in apps:
                        pairs = _pairs(batch[app])
                        args.append(str(len(pairs) // 2))
                        args.extend(pairs)
                    pipe.eval(APPLY_LUA, 1 + len(apps), f"{self.prefix}batch:{bid}",
                              *[self._key("model", a) for a in apps], *args)
                    sent.append((bid, apps))
                    apps_seen.update(apps)
                for app in sorted(apps_seen):
                    pipe.sadd(f"{self.prefix}apps", app)
                for app, t in texts.items():
                    pipe.hset(self._key("text", app), mapping=dict(t))  # type: ignore[arg-type]
                ttl = max(1, int(self.settings.live_ttl_s))
                for (app, wid), state in live.items():
                    pipe.set(f"{self.prefix}live:{app}:{wid}", json.dumps(state, separators=(",", ":")), ex=ttl)
                for app, wid in ended:
                    pipe.delete(f"{self.prefix}live:{app}:{wid}")
                res = await pipe.execute()
                missing: list[tuple[str, str, dict[str, float]]] = []
                for (bid, apps), r in zip(sent, res[: len(sent)], strict=True):
                    absent = set()
                    for i in r or []:
                        if int(i) > 0:
                            app = apps[int(i) - 1]
                            absent.add(app)
                            missing.append((bid, app, dict(next(b for b_id, b in batches if b_id == bid)[app])))
                    applied = [a for a in apps if a not in absent]
                    self._seen_in_redis.update(applied)
                    if r != [-1]:  # -1: a retried batch Redis had applied already (no second write)
                        for a in applied:
                            self._own_writes[a] = self._own_writes.get(a, 0) + 1
                if missing:
                    await self._restore(client, missing)
                done = {bid for bid, _ in sent}
                self._unacked = [b for b in self._unacked if b[0] not in done]
                self.counters["redis_flushes"] += 1
        except BaseException:
            for app, t in texts.items():
                self._texts.setdefault(app, {}).update({r: x for r, x in t.items() if r not in self._texts[app]})
            for key, state in live.items():
                self._live.setdefault(key, state)
            self._ended |= ended
            self._wanted |= wanted
            raise
        checks, self._checks = self._checks, {}
        if (wanted or checks) and self._sink is not None:
            keys = list(wanted)
            check_keys = list(checks)
            pipe = client.pipeline(transaction=False)
            for app, wid in keys:
                pipe.get(f"{self.prefix}live:{app}:{wid}")
            ttl_s = str(max(1, int(self.settings.live_ttl_s)))
            for app, wid in check_keys:
                pipe.eval(CHECK_FINISH_LUA, 2, f"{self.prefix}live:{app}:{wid}", f"{self.prefix}ended:{app}:{wid}",
                          str(checks[(app, wid)][0]), ttl_s)
            try:
                got = await pipe.execute()
            except BaseException:
                self._wanted |= wanted
                now = time.monotonic()
                for key, (calls, since) in checks.items():
                    if now - since >= FINISH_FALLBACK_S:  # Redis has been away too long: end it here
                        self._sink.finish_checked(key[0], key[1], True)
                    else:
                        self._checks.setdefault(key, (calls, since))
                raise
            for (app, wid), raw in zip(keys, got[: len(keys)], strict=True):
                if raw:
                    self._sink.merge_live(app, wid, json.loads(raw))
                    self.counters["redis_live_merged"] += 1
            for (app, wid), verdict in zip(check_keys, got[len(keys):], strict=True):
                self._sink.finish_checked(app, wid, verdict == "mine")

    async def _restore(self, client: aioredis.Redis, missing: list[tuple[str, str, dict[str, float]]]) -> None:
        """Some apps' hashes are missing: restore this process's model of each (if no process has yet),
        then add the batch's counters that were not applied."""
        sink = self._sink
        pipe = client.pipeline(transaction=False)
        based: set[str] = set()
        for bid, app, counters in missing:
            base_pairs: list[str] = []
            if sink is not None and app not in based:
                based.add(app)
                # what this process knows minus what Redis has not acknowledged: the history it has seen
                base = dict(sink.model_counts(app))
                for k, v in self._unflushed(app).items():
                    base[k] = base.get(k, 0.0) - v
                base_pairs = _pairs({k: v for k, v in base.items() if abs(v) > 1e-9})
            pipe.eval(RESTORE_LUA, 2, self._key("model", app), f"{self.prefix}batch:{bid}:{app}",
                      str(BATCH_ID_TTL_S), str(len(base_pairs) // 2), *base_pairs, *_pairs(counters))
        for app in based:
            texts = dict(sink.model_texts(app)) if sink is not None else {}
            if texts:
                pipe.hset(self._key("text", app), mapping=texts)  # type: ignore[arg-type]
            pipe.sadd(f"{self.prefix}apps", app)
        res = await pipe.execute()
        restored = sum(1 for r in res[: len(missing)] if r == 1 or r == "1")
        lost = sorted(a for a in based if a in self._seen_in_redis)
        self._seen_in_redis |= based
        if restored and lost:
            self.counters["redis_restores"] += 1
            log.warning("predictor Redis store: model of %s was missing (Redis restarted?); restored", lost)
        elif restored:
            log.debug("predictor Redis store: first model of %s written", sorted(based))

    async def _refresh(self) -> None:
        """Reload every app's shared counters into the in-process model (plus what is still queued)."""
        client, sink = self._client, self._sink
        if client is None or sink is None:
            return
        apps = sorted(str(a) for a in await client.smembers(f"{self.prefix}apps"))
        if not apps:
            return
        pipe = client.pipeline(transaction=False)
        for app in apps:
            pipe.hget(self._key("model", app), GEN_FIELD)
        gens = await pipe.execute()
        changed = [app for app, g in zip(apps, gens, strict=True)
                   if g is None or app not in self._loaded_gen
                   or int(g) != self._loaded_gen[app] + self._own_writes.get(app, 0)]
        self.counters["redis_refresh_skipped"] += len(apps) - len(changed)
        if changed:
            pipe = client.pipeline(transaction=False)
            for app in changed:
                pipe.hgetall(self._key("model", app))
                pipe.hgetall(self._key("text", app))
            res = await pipe.execute()
            for i, app in enumerate(changed):
                counts, texts = res[2 * i], res[2 * i + 1]
                gen = counts.pop(GEN_FIELD, None) if counts else None
                if not counts:
                    continue  # lost or not written yet: keep what this process knows
                self._seen_in_redis.add(app)
                sink.load_snapshot(app, {k: float(v) for k, v in counts.items()}, texts or {}, self._unflushed(app))
                # read with the counters in one command: a write after it shows as a newer #gen next time
                if gen is not None:
                    self._loaded_gen[app] = int(gen)
                else:
                    self._loaded_gen.pop(app, None)
                self._own_writes[app] = 0
        self.counters["redis_refreshes"] += 1
