"""Check presets against published vLLM measurements: `python -m pools.sim.calibrate [--markdown]`.

Replays the exact request traces of the LambdaLabsML/vllm-benchmark runs (input and output token
counts per request, all sent at once) through the engine in virtual time and compares what a
client would measure: decode ms/token of a lone request, time to first token of a burst, output
throughput. Reference data and sources: pools/sim/calibration/*.json and docs/sim-calibration.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from pools.sim.engine import SimEngine
from pools.sim.request import SimRequest
from pools.sim.virtual import Arrival, run_trace

DATA_DIR = Path(__file__).with_name("calibration")


@dataclass(slots=True)
class Row:
    """One compared quantity for one preset."""

    preset: str
    metric: str
    measured: float
    simulated: float
    source: str

    @property
    def error(self) -> float:
        return (self.simulated - self.measured) / self.measured


def _burst(preset: str, input_lens: list[int], output_lens: list[int], **engine: int) -> tuple[float, float]:
    """All requests at t=0, fixed lengths: (median TTFT s, output tokens/s over the whole run)."""
    eng = SimEngine.from_preset(preset, seed=0, **engine)
    arrivals = [
        Arrival(
            0.0, SimRequest.synthetic(f"r{i}", p, hash_ids=[i], output_tokens=max(o, 1), max_tokens=max(o, 1))
        )
        for i, (p, o) in enumerate(zip(input_lens, output_lens, strict=True))
    ]
    res = run_trace(eng, arrivals)
    ttfts = [r.ttft for r in res.values() if r.ttft is not None]
    duration = max(r.finish_time or 0.0 for r in res.values())
    return statistics.median(ttfts), sum(r.output_tokens for r in res.values()) / duration


def _decode_ms(preset: str) -> float:
    """ms per output token of a lone request (29-token prompt, 741 tokens out, as in the trace's tail)."""
    eng = SimEngine.from_preset(preset, seed=0)
    req = SimRequest.synthetic("solo", 29, hash_ids=[1], output_tokens=741, max_tokens=741)
    r = run_trace(eng, [Arrival(0.0, req)])["solo"]
    assert r.first_token_time is not None and r.finish_time is not None
    return (r.finish_time - r.first_token_time) / (r.output_tokens - 1) * 1000


def calibrate(data_dir: Path = DATA_DIR) -> list[Row]:
    """Every comparison the reference data files allow, one Row each."""
    rows: list[Row] = []
    for path in sorted(data_dir.glob("*.json")):
        rows += _calibrate_file(json.loads(path.read_text()))
    return rows


def _calibrate_file(data: dict) -> list[Row]:
    rows: list[Row] = []
    for run in data["runs"]:
        preset, src = run["preset"], run["file"]
        n = run["num_prompts"]
        inputs = data["prompt10_input_lens"] if n == 10 else data["prompt320_input_lens"]
        # requests that produced no text are dropped from the benchmark's TTFT, as it does
        kept = [(p, o) for p, o in zip(inputs, run["output_lens"], strict=True)]
        ttft, tput = _burst(preset, [p for p, _ in kept], [o for _, o in kept], **data.get("engine_args", {}))
        if n == 10:
            rows.append(
                Row(
                    preset,
                    "decode ms/token, 1 request",
                    run["tail_itl_ms_per_10_steps"] / 10,
                    _decode_ms(preset),
                    src,
                )
            )
            total_in = sum(inputs)
            rows.append(
                Row(
                    preset,
                    f"prefill tok/s ({total_in}-token burst)",
                    total_in / (run["median_ttft_ms"] / 1000),
                    total_in / ttft,
                    src,
                )
            )
            rows.append(Row(preset, "output tok/s, 10 concurrent", run["output_throughput"], tput, src))
        else:
            rows.append(
                Row(preset, "saturated output tok/s (320 at once)", run["output_throughput"], tput, src)
            )
            rows.append(Row(preset, "median TTFT s (320 at once)", run["median_ttft_ms"] / 1000, ttft, src))
    return rows


def to_markdown(rows: list[Row]) -> str:
    """The calibration table as Markdown."""
    out = ["| preset | quantity | published vLLM | simulated | error |", "|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.preset} | {r.metric} | {r.measured:.4g} | {r.simulated:.4g} | {r.error:+.1%} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the calibration table; exit 1 when an error exceeds --max-error."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-error", type=float, default=0.25)
    args = p.parse_args(argv)
    rows = calibrate()
    print(to_markdown(rows))
    worst = max(abs(r.error) for r in rows)
    print(f"\nworst error {worst:.1%} (limit {args.max_error:.0%})")
    return 0 if worst <= args.max_error else 1


if __name__ == "__main__":
    sys.exit(main())
