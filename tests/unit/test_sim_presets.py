"""Presets load from YAML, size the KV cache like vLLM, and stay calibrated."""

from __future__ import annotations

from pathlib import Path

import pytest

from pools.sim import SimEngine, load_preset, preset_names
from pools.sim.calibrate import calibrate
from pools.sim.presets import PRESET_DIR, parse_preset

REQUIRED = {"llama-3.1-8b-a100", "llama-3.1-8b-h100", "llama-3.1-70b-a100-tp4", "llama-3.1-70b-h100-tp4"}


def test_shipped_presets_load() -> None:
    assert set(preset_names()) >= REQUIRED
    for name in preset_names():
        p = load_preset(name)
        assert p.name == name
        assert p.kv_cache_gb() > 0


def test_kv_bytes_and_blocks_follow_the_model() -> None:
    p = load_preset("llama-3.1-8b-a100")
    assert p.model.kv_bytes_per_token == 131072  # 2 x 32 layers x 8 kv heads x 128 x 2 bytes
    eng = SimEngine.from_preset(p, kv_cache_gb=4.0)
    assert eng.num_gpu_blocks == 4 * 2**30 // (16 * 131072)
    assert eng.kv_capacity_tokens == eng.num_gpu_blocks * 16
    big = load_preset("llama-3.1-70b-h100-tp4")
    assert big.model.kv_bytes_per_token == 327680
    assert big.hardware.tensor_parallel == 4


def test_preset_from_a_yaml_path_and_schema_errors(tmp_path: Path) -> None:
    src = PRESET_DIR / "llama-3.1-8b-a100.yaml"
    f = tmp_path / "mine.yaml"
    f.write_text(src.read_text().replace("name: llama-3.1-8b-a100", "name: mine"))
    assert load_preset(str(f)).name == "mine"
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("no-such-preset")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_preset({"name": "x", "model": {"name": "m", "params_b": 1, "layers": 1, "hidden": 1, "heads": 1,
                                              "kv_heads": 1, "head_dim": 1, "colour": "red"},
                      "hardware": {"name": "h", "peak_flops": 1, "mem_bw": 1, "mem_gb": 1}})  # fmt: skip


def test_presets_are_within_25_percent_of_published_vllm_numbers() -> None:
    rows = calibrate()
    assert len(rows) >= 12
    bad = [(r.preset, r.metric, f"{r.error:+.0%}") for r in rows if abs(r.error) > 0.25]
    assert not bad
