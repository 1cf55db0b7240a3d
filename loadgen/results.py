"""Assemble, save and load the result JSON (`config` + `results[name]["summary"]`, stable for scripts)."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loadgen.metrics import EngineCounters, RequestRecord, Slo, WorkflowRecord, per_app, summarize

MAX_SAMPLES = 20_000
SCHEMA_VERSION = 1


def _thin(values: Sequence[Any], limit: int = MAX_SAMPLES) -> list[Any]:
    """At most `limit` evenly spaced items (keeps the distribution's shape for CDF plots)."""
    if len(values) <= limit:
        return list(values)
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


def result_entry(
    requests: Sequence[RequestRecord],
    workflows: Sequence[WorkflowRecord],
    slo: Slo,
    engine: EngineCounters | None,
    duration_s: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `results[name]` entry: summary, per-app summaries and samples for plots."""
    summary = summarize(requests, workflows, slo, engine, duration_s)
    ok = [r for r in requests if r.ok]
    ok_sorted = sorted(ok, key=lambda r: r.scheduled_s)
    entry: dict[str, Any] = {
        "summary": summary,
        "per_app": per_app(requests, workflows, summary["duration_s"], slo),
        "samples": {
            "jct_s": _thin(sorted(w.jct_s for w in workflows if w.ok)),
            "ttft_s": _thin(sorted(t for r in ok if (t := r.ttft_s) is not None)),
            "e2e_s": _thin(sorted(r.e2e_s for r in ok)),
            # (scheduled time, e2e, ttft) in send order: latency over the run
            "timeline": _thin([[round(r.scheduled_s, 4), round(r.e2e_s, 4), round(r.ttft_s or 0.0, 4)]
                               for r in ok_sorted]),
        },
    }
    if extra:
        entry.update(extra)
    return entry


def make_result(config: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The whole document: configuration (for reproducibility) and one entry per policy or target."""
    cfg = {
        "schema_version": SCHEMA_VERSION,
        "command": " ".join(sys.argv),
        "created_unix": time.time(),
        "python": platform.python_version(),
        "host": platform.node(),
        **config,
    }
    return {"config": cfg, "results": results}


def save_result(doc: dict[str, Any], path: str | Path) -> None:
    p = Path(path)
    if p.parent != Path():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def load_result(path: str | Path) -> dict[str, Any]:
    """A saved result; raises ValueError when the file is not one."""
    try:
        doc = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a result JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise ValueError(f"{path}: not a pythia-loadgen result (no 'results' object)")
    return doc
