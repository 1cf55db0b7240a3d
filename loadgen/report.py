"""Render results: a text table (one row per policy or target) and PNG plots."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("requests", "reqs", lambda v: f"{v:d}"),
    ("errors", "errs", lambda v: f"{v:d}"),
    ("workflows_completed", "wfs", lambda v: f"{v:d}"),
    ("mean_jct_s", "JCT mean", lambda v: f"{v:.2f}s"),
    ("p95_jct_s", "JCT p95", lambda v: f"{v:.2f}s"),
    ("mean_ttft_s", "TTFT mean", lambda v: f"{v * 1e3:.0f}ms"),
    ("p95_ttft_s", "TTFT p95", lambda v: f"{v * 1e3:.0f}ms"),
    ("mean_e2e_s", "e2e mean", lambda v: f"{v:.2f}s"),
    ("throughput_rps", "req/s", lambda v: f"{v:.1f}"),
    ("output_tokens_per_s", "out tok/s", lambda v: f"{v:.0f}"),
    ("goodput_fraction", "goodput", lambda v: f"{v:.0%}"),
    ("prefix_hit_rate", "prefix hit", lambda v: f"{v:.0%}"),
    ("preemptions", "preempt", lambda v: f"{v:.0f}"),
)


def _fmt(fn: Callable[[Any], str], v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        return fn(v)
    except (TypeError, ValueError):
        return str(v)


def table(results: dict[str, dict[str, Any]], baseline: str | None = None) -> str:
    """A fixed-width table of the summaries; with `baseline`, adds mean-JCT speedup vs that row."""
    names = list(results)
    header = ["policy", *(h for _, h, _ in COLUMNS)]
    rows: list[list[str]] = []
    base_jct = (results.get(baseline or "", {}).get("summary") or {}).get("mean_jct_s") if baseline else None
    if base_jct:
        header.append(f"vs {baseline}")
    for n in names:
        s = results[n].get("summary", {})
        row = [n, *(_fmt(f, s.get(k)) for k, _, f in COLUMNS)]
        if base_jct:
            j = s.get("mean_jct_s")
            row.append(f"{base_jct / j:.2f}x" if j else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def errors_text(results: dict[str, dict[str, Any]]) -> str:
    """One line per result with errors by kind (empty when there were none)."""
    out = []
    for n, r in results.items():
        s = r.get("summary") or {}
        e = s.get("errors_by_kind") or {}
        if e:
            out.append(f"{n}: errors " + ", ".join(f"{k}={v}" for k, v in e.items()))
            for k, msg in (s.get("error_examples") or {}).items():
                out.append(f"  {k}: {msg}")
    return "\n".join(out)


def plot(doc: dict[str, Any], path: str | Path, title: str = "") -> None:
    """PNG: JCT CDF per policy, latency vs load (or per policy), and latency over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, dict[str, Any]] = doc["results"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for name, r in results.items():
        jct = (r.get("samples") or {}).get("jct_s") or []
        if jct:
            xs = np.sort(np.asarray(jct))
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of workflows")
    ax.set_title("JCT CDF")
    ax.grid(alpha=0.3)
    if any((r.get("samples") or {}).get("jct_s") for r in results.values()):
        ax.legend(fontsize=8)

    ax = axes[1]
    by_policy: dict[str, list[tuple[float, float, float]]] = {}
    for name, r in results.items():
        load = r.get("load")
        s = r.get("summary") or {}
        if load is not None and s.get("mean_jct_s") is not None:
            by_policy.setdefault(r.get("policy", name), []).append((float(load), s["mean_jct_s"], s.get("p95_jct_s") or 0.0))
    if by_policy and any(len(v) > 1 for v in by_policy.values()):
        for pol, pts in by_policy.items():
            pts.sort()
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{pol} mean")[0]
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", color=line.get_color(),
                    label=f"{pol} p95")
        ax.set_xlabel("offered load (fraction of capacity)")
        ax.set_ylabel("JCT (s)")
        ax.set_title("latency vs load")
        ax.legend(fontsize=7)
    else:
        names = list(results)
        means = [(results[n].get("summary") or {}).get("mean_jct_s") or 0.0 for n in names]
        p95 = [(results[n].get("summary") or {}).get("p95_jct_s") or 0.0 for n in names]
        x = np.arange(len(names))
        ax.bar(x - 0.2, means, 0.4, label="mean JCT")
        ax.bar(x + 0.2, p95, 0.4, label="p95 JCT")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title("JCT per policy")
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    for name, r in results.items():
        tl = (r.get("samples") or {}).get("timeline") or []
        if len(tl) >= 2:
            a = np.asarray(tl, dtype=float)
            w = max(1, len(a) // 50)
            kernel = np.ones(w) / w
            ax.plot(a[w - 1 :, 0] if w > 1 else a[:, 0], np.convolve(a[:, 1], kernel, mode="valid"), label=f"{name} e2e")
    ax.set_xlabel("scheduled send time (s)")
    ax.set_ylabel("request latency, rolling mean (s)")
    ax.set_title("latency over the run")
    ax.grid(alpha=0.3)
    if any(len((r.get("samples") or {}).get("timeline") or []) >= 2 for r in results.values()):
        ax.legend(fontsize=7)
    cfg = doc.get("config") or {}
    fig.suptitle(title or f"pythia-loadgen {cfg.get('mode', '')}: {cfg.get('workload') or cfg.get('trace') or ''}")
    fig.tight_layout()
    p = Path(path)
    if p.parent != Path():
        p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
