"""Fit the simulator's step-time model to step times measured on real vLLM (step_profile.py output).

    .venv/bin/python deploy/local/vllm/fit_preset.py --steps steps.json [--out pools/sim/presets/smollm2-135m-cpu.yaml]

The simulator prices a step as  overhead + per_seq * seqs + max(compute / F, memory / BW)
(pools/sim/step_model.py). This finds F (achieved FLOP/s), BW (achieved bytes/s), the per-step
and per-sequence overheads, and the fixed cost of one request outside the engine's steps (HTTP,
input and output processing: measured TTFT = that + one prefill step), by a grid search that
minimises the squared log error over every measured point. The result is written as a preset:
mfu = F / peak_flops and mbu = BW / mem_bw of the nominal hardware given below.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# SmolLM2-135M-Instruct (config.json of the converted checkpoint)
MODEL: dict[str, Any] = {
    "name": "smollm2-135m",
    "params_b": 0.1345,
    "layers": 30,
    "hidden": 576,
    "heads": 9,
    "kv_heads": 3,
    "head_dim": 64,
    "dtype_bytes": 2,
    "max_model_len": 2048,
}
# Nominal peak of this machine: 2 cores of an AMD EPYC with AVX-512 BF16 (2 x 2.5 GHz x 64 bf16
# FLOP/cycle) and a VM's share of DDR bandwidth. Only F/peak and BW/bw are fitted, so the nominal
# values just set the scale of mfu and mbu.
HARDWARE: dict[str, Any] = {
    "name": "cpu-2core-avx512",
    "peak_flops": 3.2e11,
    "mem_bw": 4.0e10,
    "mem_gb": 24,
    "tensor_parallel": 1,
}
# What deploy/local/vllm-cpu.sh runs vLLM with
ENGINE: dict[str, Any] = {"kv_cache_gb": 1.0, "block_size": 128, "max_num_seqs": 32, "max_num_batched_tokens": 2048}


def _features(tokens: float, seqs: float, pairs: float, kv: float) -> tuple[float, float, float]:
    """Work of one step in the simulator's terms: FLOPs, bytes read, sequences."""
    m = MODEL
    flops = 2.0 * m["params_b"] * 1e9 * tokens + 4.0 * m["layers"] * m["heads"] * m["head_dim"] * pairs
    kv_bytes_per_token = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * m["dtype_bytes"]
    mem = m["params_b"] * 1e9 * m["dtype_bytes"] + kv_bytes_per_token * kv
    return flops, mem, seqs


def points(steps: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flops, bytes, seqs, is_ttft, measured seconds) for every measured point."""
    rows = []
    for p in steps["prefill"]:
        n = p["tokens"]
        rows.append((*_features(n, 1, n * n / 2.0, n), 1.0, p["ttft_s"]))
    for d in steps["decode"]:
        b, c = d["batch"], d["context"]
        if d["step_s"] == d["step_s"]:  # not NaN
            rows.append((*_features(b, b, b * (c + 0.5), b * c), 0.0, d["step_s"]))
    a = np.array(rows, dtype=float)
    return a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4]


def fit(steps: dict[str, Any]) -> dict[str, float]:
    """Grid search of (F, BW, step overhead, per-seq overhead, request overhead) in log-error."""
    flops, mem, seqs, is_ttft, y = points(steps)
    f_grid = np.geomspace(2e10, 8e11, 48)
    bw_grid = np.geomspace(2e9, 1.5e11, 48)
    s0_grid = np.linspace(0.0, 0.06, 25)
    ps_grid = np.linspace(0.0, 0.012, 25)
    c_grid = np.linspace(0.0, 0.2, 21)
    best: tuple[float, dict[str, float]] = (np.inf, {})
    for c in c_grid:
        for ps in ps_grid:
            for s0 in s0_grid:
                base = s0 + ps * seqs + c * is_ttft  # (points,)
                comp = flops[None, :] / f_grid[:, None]  # (F, points)
                memt = mem[None, :] / bw_grid[:, None]  # (BW, points)
                pred = base[None, None, :] + np.maximum(comp[:, None, :], memt[None, :, :])
                err = ((np.log(pred) - np.log(y)[None, None, :]) ** 2).sum(axis=2)
                i, j = np.unravel_index(np.argmin(err), err.shape)
                if err[i, j] < best[0]:
                    best = (
                        float(err[i, j]),
                        {"F": f_grid[i], "BW": bw_grid[j], "s0": s0, "ps": ps, "c": c},
                    )
    params = {k: float(v) for k, v in best[1].items()}
    params["rms_log_error"] = float(np.sqrt(best[0] / len(y)))
    return params


def predicted(steps: dict[str, Any], p: dict[str, float]) -> list[tuple[str, float, float]]:
    flops, mem, seqs, is_ttft, y = points(steps)
    pred = p["s0"] + p["ps"] * seqs + p["c"] * is_ttft + np.maximum(flops / p["F"], mem / p["BW"])
    labels = [f"prefill {q['tokens']}" for q in steps["prefill"]]
    labels += [
        f"decode b={d['batch']} ctx={d['context']}" for d in steps["decode"] if d["step_s"] == d["step_s"]
    ]
    return list(zip(labels, y.tolist(), pred.tolist(), strict=True))


def preset_yaml(p: dict[str, float], source: str) -> str:
    mfu = p["F"] / HARDWARE["peak_flops"]
    mbu = p["BW"] / HARDWARE["mem_bw"]
    m, hw, e = MODEL, HARDWARE, ENGINE
    return f"""# Fitted by deploy/local/vllm/fit_preset.py from {source} (real vLLM 0.32.0 CPU build on this
# project's 2-core machine, shared with other work while measured). Fixed cost of one request outside
# the engine steps (HTTP, input/output processing), not modelled by the simulator: {p["c"] * 1000:.0f} ms.
# Fit: rms log error {p["rms_log_error"]:.2f}. See docs/sim-calibration.md.
name: smollm2-135m-cpu
description: SmolLM2-135M-Instruct, bf16, vLLM CPU build on 2 AVX-512 cores (deploy/local/vllm-cpu.sh)
model:
  name: {m["name"]}
  params_b: {m["params_b"]}
  layers: {m["layers"]}
  hidden: {m["hidden"]}
  heads: {m["heads"]}
  kv_heads: {m["kv_heads"]}
  head_dim: {m["head_dim"]}
  dtype_bytes: {m["dtype_bytes"]}
  max_model_len: {m["max_model_len"]}
hardware:
  name: {hw["name"]}
  peak_flops: {hw["peak_flops"]:.3e}
  mem_bw: {hw["mem_bw"]:.3e}
  mem_gb: {hw["mem_gb"]}
  tensor_parallel: {hw["tensor_parallel"]}
efficiency:
  mfu: {mfu:.4f}
  mbu: {mbu:.4f}
  step_overhead_s: {p["s0"]:.4f}
  per_seq_overhead_s: {p["ps"]:.5f}
engine:
  kv_cache_gb: {e["kv_cache_gb"]}
  block_size: {e["block_size"]}
  max_num_seqs: {e["max_num_seqs"]}
  max_num_batched_tokens: {e["max_num_batched_tokens"]}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=Path, required=True, help="step_profile.py output")
    ap.add_argument("--out", type=Path, help="preset YAML to write")
    args = ap.parse_args(argv)
    steps = json.loads(args.steps.read_text())
    p = fit(steps)
    print(
        f"F={p['F'] / 1e9:.0f} GFLOP/s BW={p['BW'] / 1e9:.1f} GB/s step={p['s0'] * 1000:.1f} ms "
        f"per-seq={p['ps'] * 1000:.2f} ms request={p['c'] * 1000:.0f} ms rms-log-err={p['rms_log_error']:.2f}"
    )
    for label, y, yhat in predicted(steps, p):
        print(f"  {label:24s} measured {y * 1000:8.1f} ms  model {yhat * 1000:8.1f} ms")
    if args.out:
        args.out.write_text(preset_yaml(p, args.steps.name))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
