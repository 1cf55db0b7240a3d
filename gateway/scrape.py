"""Parse a vLLM replica's Prometheus text into the engine fields of `ReplicaState`.

Only a handful of series matter, so this is a line scanner rather than a full
exposition parser: it runs once a second per replica per worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# vLLM names (V1 engine first, then the V0 spelling still served by older releases)
_SUMMED = {
    "vllm:num_requests_running": "num_running",
    "vllm:num_requests_waiting": "num_waiting",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:gpu_prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:gpu_prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:num_preemptions_total": "num_preemptions",
}
_MAXED = {"vllm:kv_cache_usage_perc": "kv_usage", "vllm:gpu_cache_usage_perc": "kv_usage"}


@dataclass(slots=True)
class EngineStats:
    """What one scrape said; fields not found stay None (the replica state keeps its old value)."""

    num_running: float | None = None
    num_waiting: float | None = None
    kv_usage: float | None = None
    kv_capacity_tokens: int | None = None
    max_num_seqs: int | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    num_preemptions: float | None = None


def parse_vllm_metrics(text: str) -> EngineStats:
    """Sum per-model series of one engine; capacity from `vllm:cache_config_info` labels."""
    stats = EngineStats()
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            end = line.rfind("}")
            labels = line[brace + 1 : end]
            rest = line[end + 1 :].split()
        else:
            parts = line.split()
            name, labels, rest = parts[0], "", parts[1:]
        if not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        attr = _SUMMED.get(name)
        if attr is not None:
            old = getattr(stats, attr)
            setattr(stats, attr, value if old is None else old + value)
            continue
        attr = _MAXED.get(name)
        if attr is not None:
            old = getattr(stats, attr)
            setattr(stats, attr, value if old is None else max(old, value))
            continue
        if name == "vllm:cache_config_info":
            lab = dict(_LABEL_RE.findall(labels))
            try:
                blocks = int(float(lab.get("num_gpu_blocks", "") or 0))
                size = int(float(lab.get("block_size", "") or 0))
            except ValueError:
                blocks = size = 0
            if blocks and size:
                stats.kv_capacity_tokens = blocks * size
            seqs = lab.get("max_num_seqs")
            if seqs and seqs.isdigit():
                stats.max_num_seqs = int(seqs)
    return stats
