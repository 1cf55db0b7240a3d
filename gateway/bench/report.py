"""Markdown tables from docs/results/gateway-overhead.json: `python -m gateway.bench.report [FILE]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _num(d: Any, key: str, fmt: str = "{:,.0f}") -> str:
    v = d.get(key) if isinstance(d, dict) else None
    return fmt.format(v) if isinstance(v, int | float) else "-"


def table(res: dict[str, Any]) -> str:
    """Side-by-side table of every target, then where each goal stands."""
    ns, st = res.get("non_stream", {}), res.get("stream", {})
    c1, added = res.get("c1_p50_ms", {}), res.get("added_latency_c1_ms", {})
    rows = [
        "| target | non-stream req/s | p50 ms | p99 ms | CPU µs/req | of it kernel | stream req/s | p50 ms | CPU µs/req "
        "| c1 p50 ms | added c1 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in ns:
        a, b = ns.get(name, {}), st.get(name, {})
        rows.append(
            f"| `{name}` | {_num(a, 'rps')} | {_num(a, 'p50_ms', '{:.2f}')} | {_num(a, 'p99_ms', '{:.1f}')} | "
            f"{_num(a, 'cpu_us_per_req')} | {_num(a, 'cpu_sys_us_per_req')} | {_num(b, 'rps')} | {_num(b, 'p50_ms', '{:.2f}')} | "
            f"{_num(b, 'cpu_us_per_req')} | {_num(c1, name, '{:.3f}')} | {_num(added, name, '{:.3f}')} |"
        )
    out = ["\n".join(rows), "", *goals(res)]
    return "\n".join(out)


def _rps(section: dict[str, Any], name: str) -> float | None:
    v = section.get(name, {})
    return float(v["rps"]) if isinstance(v, dict) and isinstance(v.get("rps"), int | float) else None


def _cpu(section: dict[str, Any], name: str) -> float | None:
    v = section.get(name, {})
    return float(v["cpu_us_per_req"]) if isinstance(v, dict) and isinstance(v.get("cpu_us_per_req"), int | float) else None


def goals(res: dict[str, Any]) -> list[str]:
    """One line per goal of issue 8: the measured ratio and met / not met."""
    ns, st = res.get("non_stream", {}), res.get("stream", {})
    lines = ["| goal | measured | met |", "|---|---|---|"]

    def ratio(num: float | None, den: float | None) -> str:
        return f"{num / den:.2f}x" if num is not None and den else "-"

    def row(goal: str, num: float | None, den: float | None, need: float, extra: str = "") -> None:
        ok = num is not None and den is not None and den > 0 and num / den >= need
        lines.append(f"| {goal} | {ratio(num, den)}{extra} | {'yes' if ok else 'no'} |")

    p, vr, nginx, prr = _rps(ns, "pythia:pythia"), _rps(ns, "vllm-router:round_robin"), _rps(ns, "nginx"), _rps(ns, "pythia:round_robin")
    cpu_note = ""
    cp, cv = _cpu(ns, "pythia:pythia"), _cpu(ns, "vllm-router:round_robin")
    if cp and cv:
        cpu_note = f" (CPU per request {cp:.0f} vs {cv:.0f} µs)"
    row("`pythia:pythia` non-stream req/s >= `vllm-router:round_robin`", p, vr, 1.0, cpu_note)
    row("`pythia:round_robin` non-stream req/s >= 0.75x `nginx`", prr, nginx, 0.75)
    row("`pythia:pythia` stream req/s >= `vllm-router:round_robin`", _rps(st, "pythia:pythia"), _rps(st, "vllm-router:round_robin"), 1.0)
    add = res.get("added_latency_c1_ms", {})
    for name in ("pythia:round_robin", "pythia:pythia"):
        v = add.get(name)
        if isinstance(v, int | float):
            lines.append(f"| added latency at 1 connection, `{name}`, <= 0.1 ms | {v:.3f} ms | {'yes' if v <= 0.1 else 'no'} |")
    os_ = res.get("open_streams")
    if isinstance(os_, dict):
        rss = os_.get("gateway_rss_all_open_mb")
        opened, n = os_.get("opened"), os_.get("streams")
        ok = isinstance(rss, int | float) and 0 < rss < 1024 and opened == n
        lines.append(f"| {n:,} open SSE streams, gateway RSS < 1 GiB | {opened:,} open, {rss} MB | {'yes' if ok else 'no'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "docs/results/gateway-overhead.json")
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
