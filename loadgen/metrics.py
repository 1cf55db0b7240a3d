"""Per-request and per-workflow records and the summary every result JSON carries.

The same records come from the live driver (wall clock) and the simulator (virtual time),
so one summary function serves both. Latencies count from the *scheduled* send time:
an open-loop client that falls behind shows it in the numbers (no coordinated omission).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(slots=True)
class RequestRecord:
    """One call as the client saw it (times in seconds from the run's start)."""

    workflow_id: str
    app: str
    role: str
    index: int
    scheduled_s: float  # when the open-loop schedule said to send it
    sent_s: float = 0.0  # when it actually left (lag = sent - scheduled)
    first_token_s: float | None = None
    end_s: float = 0.0
    ok: bool = False
    error: str = ""  # kind: http_429, http_503, timeout, connect, disconnect, invalid_stream ...
    detail: str = ""  # the server's error message, when it sent one
    status: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    cached_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    replica: str = ""
    queued_s: float = 0.0  # time spent in a gateway admission queue (simulator only)
    preemptions: int = 0  # simulator only

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.scheduled_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.scheduled_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class WorkflowRecord:
    """One job: arrival to the completion of its last call."""

    workflow_id: str
    app: str
    arrival_s: float
    end_s: float = 0.0
    calls: int = 0
    failed_calls: int = 0
    done: bool = False  # every call finished (ok or not)

    @property
    def ok(self) -> bool:
        return self.done and self.failed_calls == 0

    @property
    def jct_s(self) -> float:
        return self.end_s - self.arrival_s


@dataclass(slots=True, frozen=True)
class Slo:
    """Service-level objectives for goodput; None = not checked."""

    ttft_s: float | None = 2.0
    tpot_s: float | None = 0.1
    e2e_s: float | None = None
    jct_s: float | None = None

    def request_ok(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        ttft, tpot = r.ttft_s, r.tpot_s
        if self.ttft_s is not None and (ttft is None or ttft > self.ttft_s):
            return False
        if self.tpot_s is not None and tpot is not None and tpot > self.tpot_s:
            return False
        return self.e2e_s is None or r.e2e_s <= self.e2e_s

    def as_dict(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s, "jct_s": self.jct_s}


def dist_stats(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """mean, p50, p90, p95, p99 and max of a sample (all None when it is empty)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    qs = np.percentile(a, PERCENTILES)
    return {"mean": float(a.mean()), **{f"p{p}": float(q) for p, q in zip(PERCENTILES, qs, strict=True)},
            "max": float(a.max())}


@dataclass(slots=True)
class EngineCounters:
    """Deltas of the replicas' vLLM counters over the run (None = not available)."""

    prefix_queries: float | None = None
    prefix_hits: float | None = None
    preemptions: float | None = None
    source: str = ""  # "metrics" (scraped /metrics deltas), "sim" (engine snapshots), "" none


def summarize(
    requests: Sequence[RequestRecord],
    workflows: Sequence[WorkflowRecord],
    slo: Slo = Slo(),
    engine: EngineCounters | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """The summary dict of a run (the stable result-JSON fields plus distributions)."""
    ok = [r for r in requests if r.ok]
    errors = Counter(r.error or "unknown" for r in requests if not r.ok)
    examples: dict[str, str] = {}
    for r in requests:
        if not r.ok and r.detail and (r.error or "unknown") not in examples:
            examples[r.error or "unknown"] = r.detail
    done_wfs = [w for w in workflows if w.done]
    ok_wfs = [w for w in done_wfs if w.ok]
    if duration_s is None:
        ends = [r.end_s for r in requests if r.end_s > 0] + [w.end_s for w in done_wfs]
        starts = [w.arrival_s for w in workflows] + [r.scheduled_s for r in requests]
        duration_s = (max(ends) - min(starts)) if ends and starts else 0.0
    dur = max(duration_s, 1e-9)
    jct = [w.jct_s for w in ok_wfs]
    ttft = [t for r in ok if (t := r.ttft_s) is not None]
    e2e = [r.e2e_s for r in ok]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    itl_parts = [np.asarray(r.itl_s, dtype=float) for r in ok if r.itl_s]
    itl: np.ndarray = np.concatenate(itl_parts) if itl_parts else np.zeros(0)
    lag = [r.sent_s - r.scheduled_s for r in requests if r.sent_s > 0]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if slo.request_ok(r)]
    good_wfs = [w for w in ok_wfs if slo.jct_s is None or w.jct_s <= slo.jct_s]
    cached = sum(r.cached_tokens for r in ok)
    hit_rate: float | None = None
    hit_source = ""
    if engine is not None and engine.prefix_queries:
        hit_rate = (engine.prefix_hits or 0.0) / engine.prefix_queries
        hit_source = engine.source
    elif in_tokens and any(r.cached_tokens for r in ok):
        hit_rate, hit_source = cached / in_tokens, "usage"
    preemptions: float | None = engine.preemptions if engine is not None else None
    if preemptions is None and any(r.preemptions for r in requests):
        preemptions = float(sum(r.preemptions for r in requests))
    s_jct, s_ttft, s_e2e = dist_stats(jct), dist_stats(ttft), dist_stats(e2e)
    return {
        "requests": len(requests),
        "ok_requests": len(ok),
        "errors": len(requests) - len(ok),
        "errors_by_kind": dict(sorted(errors.items())),
        "error_examples": examples,
        "workflows": len(workflows),
        "workflows_completed": len(ok_wfs),
        "workflows_failed": len(done_wfs) - len(ok_wfs),
        "workflows_unfinished": len(workflows) - len(done_wfs),
        "duration_s": duration_s,
        "mean_jct_s": s_jct["mean"],
        "p50_jct_s": s_jct["p50"],
        "p95_jct_s": s_jct["p95"],
        "p99_jct_s": s_jct["p99"],
        "mean_ttft_s": s_ttft["mean"],
        "p50_ttft_s": s_ttft["p50"],
        "p95_ttft_s": s_ttft["p95"],
        "p99_ttft_s": s_ttft["p99"],
        "mean_e2e_s": s_e2e["mean"],
        "p50_e2e_s": s_e2e["p50"],
        "p95_e2e_s": s_e2e["p95"],
        "p99_e2e_s": s_e2e["p99"],
        "mean_tpot_s": dist_stats(tpot)["mean"],
        "throughput_rps": len(ok) / dur,
        "output_tokens_per_s": out_tokens / dur,
        "input_tokens_per_s": in_tokens / dur,
        "workflows_per_min": len(ok_wfs) * 60.0 / dur,
        "goodput_rps": len(good) / dur,
        "goodput_fraction": len(good) / len(requests) if requests else None,
        "goodput_workflows_per_min": len(good_wfs) * 60.0 / dur,
        "slo": slo.as_dict(),
        "prefix_hit_rate": hit_rate,
        "prefix_hit_rate_source": hit_source,
        "cached_tokens_fraction": cached / in_tokens if in_tokens else None,
        "preemptions": preemptions,
        "send_lag_s": dist_stats(lag),
        "jct_s": s_jct,
        "ttft_s": s_ttft,
        "e2e_s": s_e2e,
        "tpot_s": dist_stats(tpot),
        "itl_s": dist_stats(itl),
        "queued_s": dist_stats([r.queued_s for r in ok]),
    }


def per_app(requests: Sequence[RequestRecord], workflows: Sequence[WorkflowRecord], duration_s: float,
            slo: Slo = Slo()) -> dict[str, dict[str, Any]]:
    """Summaries split by app (engine counters are cluster-wide, so left out here)."""
    apps = sorted({w.app for w in workflows})
    return {
        a or "(untagged)": summarize([r for r in requests if r.app == a], [w for w in workflows if w.app == a],
                                     slo, None, duration_s)
        for a in apps
    }
