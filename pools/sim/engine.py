"""The simulated vLLM engine: V1's scheduler over a block-hashed KV cache, priced per step.

Time is passed in (virtual seconds), never read, so the same class runs under a discrete-event
loop (virtual time) and under the HTTP server's clock (wall time x time scale).
Each step: schedule (running requests first, then waiting ones, within `max_num_seqs` and the
`max_num_batched_tokens` budget, chunking prefills), price the batch with the step-time model,
and at the step's end apply it: tokens computed, one token sampled per request whose prompt is
done, finished requests freed.
"""

from __future__ import annotations

import heapq
import math
import random
import struct
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any

import xxhash

from pools.sim.engine_metrics import EngineMetrics
from pools.sim.kv_cache import BlockPool
from pools.sim.presets import GIB, Preset, load_preset
from pools.sim.request import EventKind, RequestEvent, RequestResult, SimRequest
from pools.sim.step_model import StepTimeModel
from pools.sim.tokenizer import BYTES_PER_TOKEN, TextStream

_MASK = (1 << 64) - 1
_digest = xxhash.xxh3_64_intdigest
_pack = struct.Struct("<QQ").pack


class RequestRejected(ValueError):
    """The engine cannot take this request (too long for the model or the KV cache, bad field)."""


@dataclass(slots=True)
class EngineConfig:
    """Engine arguments, vLLM's names."""

    kv_cache_gb: float
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    scheduling_policy: str = "fcfs"  # or "priority"
    seed: int = 0
    model_name: str = ""
    token_events: bool = False  # emit a TOKEN event per generated token (the HTTP server needs them)


class _Req:
    """Engine-side state of one request."""

    __slots__ = (
        "blocks",
        "cached_tokens",
        "done",
        "gen_seed",
        "hashes",
        "last_token_time",
        "num_cached_blocks",
        "num_computed",
        "num_output",
        "priority",
        "prompt_full_blocks",
        "prompt_len",
        "request_id",
        "result",
        "scheduled_once",
        "seq",
        "stop_reason",
        "stream",
        "target",
        "text",
    )

    def __init__(self, request_id: str, prompt_len: int, priority: int, seq: int) -> None:
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.priority = priority
        self.seq = seq
        self.blocks: list[int] = []
        self.hashes: list[int] = []
        self.prompt_full_blocks = 0
        self.num_cached_blocks = 0
        self.num_computed = 0
        self.num_output = 0
        self.cached_tokens = 0
        self.scheduled_once = False
        self.done = False
        self.target = 0
        self.stop_reason = "length"
        self.gen_seed = 0
        self.last_token_time = 0.0
        self.result: RequestResult | None = None
        # text prompts: bytes from the first non-full prompt block on (prompt tail, template's
        # answer prefix, generated text so far), extended on demand to hash answer blocks
        self.stream: bytearray | None = None
        self.text: TextStream | None = None

    def __lt__(self, other: _Req) -> bool:  # heap order for the priority policy: (priority, arrival)
        return (self.priority, self.seq) < (other.priority, other.seq)


class SimEngine:
    """One simulated vLLM replica. See pools/sim/README.md for the driving API."""

    def __init__(self, preset: Preset, config: EngineConfig) -> None:
        if config.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError("scheduling_policy must be 'fcfs' or 'priority'")
        self.preset = preset
        self.config = config
        self.model_name = config.model_name or preset.model.name
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = preset.model.max_model_len
        block_bytes = config.block_size * preset.model.kv_bytes_per_token
        self.num_gpu_blocks = int(config.kv_cache_gb * GIB // block_bytes)
        if self.num_gpu_blocks < 1:
            raise ValueError(f"kv_cache_gb={config.kv_cache_gb} holds no block of {block_bytes} bytes")
        self.kv_capacity_tokens = self.num_gpu_blocks * config.block_size
        self._priority = config.scheduling_policy == "priority"
        self._pool = BlockPool(self.num_gpu_blocks)
        self._timer = StepTimeModel(preset)
        self._seed = config.seed
        self._token_events = config.token_events
        self._eff = preset.engine
        self._running: list[_Req] = []
        self._waiting_fcfs: deque[_Req] = deque()
        self._waiting_heap: list[_Req] = []
        self._num_waiting = 0
        self._reqs: dict[str, _Req] = {}
        self._results: dict[str, RequestResult] = {}
        self._seq = 0
        self._now = 0.0
        self._step_end: float | None = None
        self._batch: dict[_Req, int] = {}
        self._pending: list[RequestEvent] = []
        self.metrics = EngineMetrics()
        self.num_steps = 0
        self.busy_time = 0.0

    @classmethod
    def from_preset(cls, preset: str | Preset, **overrides: Any) -> SimEngine:
        """An engine for a preset (name, path or object); keyword overrides of EngineConfig fields."""
        p = load_preset(preset) if isinstance(preset, str) else preset
        e = p.engine
        kv = overrides.pop("kv_cache_gb", None)
        cfg = EngineConfig(
            kv_cache_gb=p.kv_cache_gb() if kv is None else kv,
            block_size=overrides.pop("block_size", None) or e.block_size,
            max_num_seqs=overrides.pop("max_num_seqs", None) or e.max_num_seqs,
            max_num_batched_tokens=overrides.pop("max_num_batched_tokens", None) or e.max_num_batched_tokens,
            **overrides,
        )
        return cls(p, cfg)

    # ---- live gauges ------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by requests (vllm:kv_cache_usage_perc)."""
        return self._pool.usage()

    @property
    def has_work(self) -> bool:
        return bool(self._running) or self._num_waiting > 0

    @property
    def now(self) -> float:
        """The latest time the engine has been driven to."""
        return self._now

    def next_event_time(self) -> float | None:
        """When the step in flight ends (its events happen then), or None when idle."""
        return self._step_end

    def result(self, request_id: str) -> RequestResult | None:
        """What happened to a request so far (kept until pop_result)."""
        return self._results.get(request_id)

    def pop_result(self, request_id: str) -> RequestResult | None:
        """Forget a request's result and return it."""
        return self._results.pop(request_id, None)

    def generation_seed(self, request_id: str) -> int:
        """Seed of the request's generated text (pools.sim.tokenizer.TextStream)."""
        r = self._reqs.get(request_id)
        if r is not None:
            return r.gen_seed
        res = self._results.get(request_id)
        return res.generation_seed if res is not None else 0

    # ---- driving ----------------------------------------------------------------------------

    def add_request(self, req: SimRequest, now: float) -> None:
        """Queue a request arriving at `now`; raises RequestRejected when it cannot ever run."""
        if req.request_id in self._reqs:
            raise RequestRejected(f"request id {req.request_id!r} is already in the engine")
        prompt_len = req.prompt_tokens
        if prompt_len < 1:
            raise RequestRejected("the prompt is empty")
        max_tokens = req.max_tokens if req.max_tokens is not None else self.max_model_len - prompt_len
        if prompt_len + max(max_tokens, 1) > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        if req.min_tokens < 0 or (req.max_tokens is not None and req.max_tokens < 1):
            raise RequestRejected("max_tokens must be at least 1 and min_tokens at least 0")
        self._run_until(now, self._pending)
        now = max(now, self._now)
        self._now = now
        content = req.content_seed()
        base_seed = req.seed if req.seed is not None else self._seed
        r = _Req(req.request_id, prompt_len, req.priority, self._seq)
        self._seq += 1
        r.gen_seed = (content * 1000003 + base_seed) & _MASK
        r.target, r.stop_reason = self._output_length(req, max_tokens, content, base_seed)
        if prompt_len + r.target > self.kv_capacity_tokens:
            raise RequestRejected(
                f"the request needs {prompt_len + r.target} KV tokens but the cache holds {self.kv_capacity_tokens}"
            )
        r.hashes = req.prompt_block_hashes(self.block_size)
        r.prompt_full_blocks = len(r.hashes)
        if req.prompt_bytes is not None:
            r.stream = bytearray(req.prompt_bytes[r.prompt_full_blocks * self.block_size * BYTES_PER_TOKEN :])
            r.stream += req.generation_prefix
        r.result = RequestResult(req.request_id, now, prompt_len, generation_seed=r.gen_seed)
        self._results[req.request_id] = r.result
        self._reqs[req.request_id] = r
        self._push_waiting(r, front=False)
        if self._step_end is None:
            self._start_step(now, self._pending)

    def advance(self, until: float) -> list[RequestEvent]:
        """Run every step that ends at or before `until`; the events they produced, in time order."""
        events = self._pending
        self._pending = []
        self._run_until(until, events)
        if until > self._now:
            self._now = until
        return events

    def abort_request(self, request_id: str, now: float) -> bool:
        """Drop a request (client gone): free its blocks; no more events for it. False if unknown."""
        r = self._reqs.get(request_id)
        if r is None or r.done:
            return False
        self._run_until(now, self._pending)
        r.done = True
        if r in self._running:
            self._running.remove(r)
        elif not self._priority:
            try:
                self._waiting_fcfs.remove(r)
                self._num_waiting -= 1
            except ValueError:
                pass
        else:
            self._num_waiting -= 1  # lazily dropped from the heap
        self._pool.free(r.blocks)
        r.blocks = []
        self.metrics.success["abort"] += 1
        del self._reqs[request_id]
        return True

    # ---- internals --------------------------------------------------------------------------

    def _output_length(self, req: SimRequest, max_tokens: int, content: int, seed: int) -> tuple[int, str]:
        if req.output_tokens is not None:
            n = max(1, min(req.output_tokens, max_tokens))
            return n, ("length" if n >= max_tokens else "stop")
        if req.ignore_eos:
            return max_tokens, "length"
        rng = random.Random((content ^ (seed * 0x9E3779B97F4A7C15)) & _MASK)
        draw = rng.lognormvariate(math.log(self._eff.output_len_median), self._eff.output_len_sigma)
        n = min(max(round(draw), req.min_tokens, 1), max_tokens)
        return n, ("length" if n >= max_tokens else "stop")

    def _push_waiting(self, r: _Req, front: bool) -> None:
        self._num_waiting += 1
        if self._priority:
            heapq.heappush(self._waiting_heap, r)
        elif front:
            self._waiting_fcfs.appendleft(r)
        else:
            self._waiting_fcfs.append(r)

    def _peek_waiting(self) -> _Req | None:
        if self._priority:
            h = self._waiting_heap
            while h and h[0].done:
                heapq.heappop(h)
            return h[0] if h else None
        return self._waiting_fcfs[0] if self._waiting_fcfs else None

    def _pop_waiting(self) -> None:
        self._num_waiting -= 1
        if self._priority:
            heapq.heappop(self._waiting_heap)
        else:
            self._waiting_fcfs.popleft()

    def _run_until(self, until: float, events: list[RequestEvent]) -> None:
        while self._step_end is not None and self._step_end <= until:
            t = self._step_end
            self._now = t
            self._finish_step(t, events)
            self._start_step(t, events)

    def _block_hash(self, r: _Req, j: int) -> int:
        hashes = r.hashes
        while len(hashes) <= j:  # blocks past the prompt's full ones: prompt tail + generated tokens
            k = len(hashes)
            parent = hashes[-1] if hashes else 0
            if r.stream is None:  # synthetic prompt: answer blocks are unique to the generation seed
                hashes.append(_digest(_pack(r.gen_seed, k), seed=parent))
                continue
            # text prompt: hash the same bytes the next turn's prompt will carry, so a conversation
            # that sends the answer back hits the blocks holding it (as vLLM's token blocks would)
            width = self.block_size * BYTES_PER_TOKEN
            start = (k - r.prompt_full_blocks) * width
            missing = start + width - len(r.stream)
            if missing > 0:
                if r.text is None:
                    r.text = TextStream(r.gen_seed)
                r.stream += r.text.next_tokens(-(-missing // BYTES_PER_TOKEN)).encode("ascii")
            hashes.append(_digest(bytes(r.stream[start : start + width]), seed=parent))
        return hashes[j]

    def _allocate(self, r: _Req, computed: int, n: int, hits: list[int] | None) -> bool:
        """vLLM's allocate_slots: room for `n` more tokens after `computed`, hits taken first."""
        bs = self.block_size
        pool = self._pool
        total = computed + n
        have = len(r.blocks) + (len(hits) if hits else 0)
        need = -(-total // bs) - have
        if need > 0 or hits:
            evictable = 0
            if hits:
                ref = pool.ref_cnt
                for b in hits:
                    if ref[b] == 0:
                        evictable += 1
            if need + evictable > pool.num_free:
                return False
            if hits:
                pool.touch(hits)
                r.blocks.extend(hits)
                r.num_cached_blocks = len(r.blocks)
            if need > 0:
                r.blocks.extend(pool.allocate(need))
        full = total // bs
        if full > r.num_cached_blocks:
            blocks = r.blocks
            for j in range(r.num_cached_blocks, full):
                pool.cache_block(blocks[j], self._block_hash(r, j))
            r.num_cached_blocks = full
        return True

    def _computed_blocks(self, r: _Req) -> list[int]:
        """Longest run of cached blocks for the request's tokens, leaving at least one to compute."""
        max_blocks = (r.prompt_len + r.num_output - 1) // self.block_size
        lookup = self._pool.cached.get
        out: list[int] = []
        for j in range(max_blocks):
            b = lookup(self._block_hash(r, j))
            if b is None:
                break
            out.append(b)
        return out

    def _preempt(self, r: _Req, t: float, events: list[RequestEvent]) -> None:
        self._pool.free(r.blocks)
        r.blocks = []
        r.num_computed = 0
        r.num_cached_blocks = 0
        self._push_waiting(r, front=True)
        self.metrics.num_preemptions += 1
        assert r.result is not None
        r.result.num_preemptions += 1
        events.append(RequestEvent(EventKind.PREEMPTED, r.request_id, t, r.cached_tokens, r.num_output))

    def _schedule(self, t: float, events: list[RequestEvent]) -> dict[_Req, int]:
        budget = self.max_num_batched_tokens
        scheduled: dict[_Req, int] = {}
        running = self._running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = r.prompt_len + r.num_output - r.num_computed
            if n > budget:
                n = budget
            if n <= 0:
                i += 1
                continue
            ok = True
            while not self._allocate(r, r.num_computed, n, None):
                if self._priority:
                    victim = max(running, key=lambda x: (x.priority, x.seq))
                    idx = running.index(victim)
                else:
                    victim = running[-1]
                    idx = len(running) - 1
                running.pop(idx)
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                self._preempt(victim, t, events)
                preempted = True
                if idx < i:
                    i -= 1
                if victim is r:
                    ok = False
                    break
            if not ok:
                break
            scheduled[r] = n
            budget -= n
            i += 1
        if not preempted:
            max_seqs = self.max_num_seqs
            stats = self.metrics
            while budget > 0 and len(running) < max_seqs:
                w = self._peek_waiting()
                if w is None:
                    break
                r = w
                hits = self._computed_blocks(r)
                computed = len(hits) * self.block_size
                n = r.prompt_len + r.num_output - computed
                if n > budget:
                    n = budget
                if not self._allocate(r, computed, n, hits):
                    break
                self._pop_waiting()
                r.num_computed = computed
                if not r.scheduled_once:
                    r.scheduled_once = True
                    r.cached_tokens = computed
                    assert r.result is not None
                    r.result.cached_tokens = computed
                    stats.prefix_cache_queries += r.prompt_len
                    stats.prefix_cache_hits += computed
                running.append(r)
                scheduled[r] = n
                budget -= n
        return scheduled

    def _start_step(self, t: float, events: list[RequestEvent]) -> None:
        self._batch = {}
        self._step_end = None
        if not self.has_work:
            return
        batch = self._schedule(t, events)
        if not batch and self.has_work:  # everything running was preempted: schedule the waiting
            batch = self._schedule(t, events)
        if not batch:
            return
        num_tokens = 0
        pairs = 0.0
        kv_read = 0
        for r, n in batch.items():
            c = r.num_computed
            num_tokens += n
            pairs += n * (c + 0.5 * n)
            kv_read += c + n
        dt = self._timer.step_time(num_tokens, len(batch), pairs, kv_read)
        self._batch = batch
        self._step_end = t + dt
        self.num_steps += 1
        self.busy_time += dt

    def _finish_step(self, t: float, events: list[RequestEvent]) -> None:
        batch = self._batch
        self._batch = {}
        self._step_end = None
        stats = self.metrics
        token_events = self._token_events
        itl = stats.itl
        itl_buckets = itl.buckets
        finished = False
        for r, n in batch.items():
            if r.done:
                continue
            r.num_computed += n
            if r.num_computed < r.prompt_len + r.num_output:
                continue  # a prefill chunk: no token sampled yet
            r.num_output += 1
            stats.generation_tokens += 1
            res = r.result
            assert res is not None
            res.output_tokens = r.num_output
            if r.num_output == 1:
                res.first_token_time = t
                stats.ttft.observe(t - res.arrival_time)
                stats.prompt_tokens += r.prompt_len
                events.append(RequestEvent(EventKind.FIRST_TOKEN, r.request_id, t, r.cached_tokens, 1))
            else:  # inlined Histogram.observe: this runs once per generated token
                dt = t - r.last_token_time
                itl.counts[bisect_left(itl_buckets, dt)] += 1
                itl.sum += dt
                itl.count += 1
                if token_events and r.num_output < r.target:  # the last token rides on FINISHED
                    events.append(
                        RequestEvent(EventKind.TOKEN, r.request_id, t, r.cached_tokens, r.num_output)
                    )
            r.last_token_time = t
            if r.num_output >= r.target:
                r.done = True
                finished = True
                self._pool.free(r.blocks)
                r.blocks = []
                res.finish_time = t
                res.finish_reason = r.stop_reason
                stats.e2e.observe(t - res.arrival_time)
                stats.success[r.stop_reason] += 1
                del self._reqs[r.request_id]
                events.append(
                    RequestEvent(
                        EventKind.FINISHED, r.request_id, t, r.cached_tokens, r.num_output, r.stop_reason
                    )
                )
        if finished:
            self._running = [r for r in self._running if not r.done]

    # ---- metrics ----------------------------------------------------------------------------

    def metrics_snapshot(self) -> dict[str, float]:
        """Current values under the names /metrics exports (counters with _total, histograms _sum/_count)."""
        m = self.metrics
        out: dict[str, float] = {
            "vllm:num_requests_running": float(len(self._running)),
            "vllm:num_requests_waiting": float(self._num_waiting),
            "vllm:kv_cache_usage_perc": self._pool.usage(),
            "vllm:prefix_cache_queries_total": float(m.prefix_cache_queries),
            "vllm:prefix_cache_hits_total": float(m.prefix_cache_hits),
            "vllm:num_preemptions_total": float(m.num_preemptions),
            "vllm:prompt_tokens_total": float(m.prompt_tokens),
            "vllm:generation_tokens_total": float(m.generation_tokens),
            "vllm:request_success_total": float(sum(m.success.values()) - m.success["abort"]),
            "vllm:cache_config_info": 1.0,
            "vllm:num_gpu_blocks": float(self.num_gpu_blocks),
            "vllm:block_size": float(self.block_size),
        }
        for name, h in (
            ("vllm:time_to_first_token_seconds", m.ttft),
            ("vllm:e2e_request_latency_seconds", m.e2e),
            ("vllm:inter_token_latency_seconds", m.itl),
        ):
            out[name + "_sum"] = h.sum
            out[name + "_count"] = float(h.count)
        return out
