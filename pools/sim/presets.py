"""Presets: a model on a GPU (or CPU) with engine defaults, loaded from presets/*.yaml.

The schema is documented in presets/SCHEMA.md; adding a preset means adding one YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).with_name("presets")
GIB = 1 << 30


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """The served model: sizes that decide FLOPs, weight bytes and KV bytes per token."""

    name: str
    params_b: float  # parameters, billions (all of them for a dense model)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # weights and KV cache element size (bf16 = 2)
    max_model_len: int = 131072

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token, the whole model (all TP ranks together)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass(slots=True, frozen=True)
class HardwareSpec:
    """One accelerator and how many of them serve the model with tensor parallelism."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s of one device
    mem_bw: float  # HBM bytes/s of one device
    mem_gb: float  # memory of one device, GiB
    tensor_parallel: int = 1
    link_bw: float = 0.0  # all-reduce bus bandwidth between devices, bytes/s (NVLink)
    allreduce_latency_s: float = 0.0  # fixed cost of one all-reduce


@dataclass(slots=True, frozen=True)
class Efficiency:
    """How close the engine gets to the roofline, and its fixed per-step costs."""

    mfu: float = 0.6  # achieved fraction of peak FLOP/s in big matmuls
    mbu: float = 0.8  # achieved fraction of peak memory bandwidth
    step_overhead_s: float = 0.002  # scheduler, launch, sampling: per step
    per_seq_overhead_s: float = 0.0  # input prep and sampling: per sequence in the batch


@dataclass(slots=True, frozen=True)
class EngineDefaults:
    """vLLM engine arguments the preset runs with unless overridden."""

    kv_cache_gb: float | None = None  # total over TP ranks; None = derive like vLLM does
    gpu_memory_utilization: float = 0.9
    activation_reserve_gb: float = 4.0  # per device: activations, CUDA graphs (not KV)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    output_len_median: float = 200.0  # tokens, when neither ignore_eos nor output_tokens decide
    output_len_sigma: float = 0.8  # lognormal shape of that draw


@dataclass(slots=True, frozen=True)
class Preset:
    """A named model + hardware + efficiency + engine defaults."""

    name: str
    model: ModelSpec
    hardware: HardwareSpec
    efficiency: Efficiency = field(default_factory=Efficiency)
    engine: EngineDefaults = field(default_factory=EngineDefaults)
    description: str = ""

    def kv_cache_gb(self) -> float:
        """KV memory over all TP ranks: the configured value, else what vLLM would leave."""
        if self.engine.kv_cache_gb is not None:
            return self.engine.kv_cache_gb
        hw = self.hardware
        per_dev = hw.mem_gb * self.engine.gpu_memory_utilization
        per_dev -= self.model.weight_bytes / hw.tensor_parallel / GIB + self.engine.activation_reserve_gb
        return max(per_dev, 0.0) * hw.tensor_parallel


def _build(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    data = dict(data or {})
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    return cls(**data)


def parse_preset(data: dict[str, Any], where: str = "preset") -> Preset:
    """A Preset from the parsed YAML mapping; raises ValueError naming a bad key."""
    known = {"name", "description", "model", "hardware", "efficiency", "engine"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    return Preset(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        model=_build(ModelSpec, data["model"], f"{where}.model"),
        hardware=_build(HardwareSpec, data["hardware"], f"{where}.hardware"),
        efficiency=_build(Efficiency, data.get("efficiency"), f"{where}.efficiency"),
        engine=_build(EngineDefaults, data.get("engine"), f"{where}.engine"),
    )


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name, or a preset YAML file by path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {name_or_path!r}; known: {', '.join(preset_names())}")
    with path.open() as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset must be a mapping")
    return parse_preset(data, str(path))
