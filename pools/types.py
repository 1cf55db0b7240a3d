"""Plain data describing pools, replicas and the cluster as the routing core sees it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class PoolConfig:
    """One context-length class: the models it serves and its replicas' base URLs."""

    name: str
    max_context_tokens: int
    models: tuple[str, ...]
    replicas: tuple[str, ...]


@dataclass(slots=True)
class ReplicaState:
    """What the gateway knows about one replica: its own counters plus scraped engine metrics."""

    url: str
    pool: str
    healthy: bool = True
    # tracked by the gateway itself (exact, updated on every dispatch and completion)
    inflight: int = 0
    inflight_prompt_tokens: int = 0
    # KV tokens the calls in flight may still need, at their predicted output bound
    reserved_kv_tokens: int = 0
    # the same at the predicted *expected* output (<= reserved_kv_tokens); 0 = not tracked
    reserved_kv_expected_tokens: int = 0
    # scraped from the engine's /metrics (vLLM names), possibly a few hundred ms old
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, 0..1
    kv_capacity_tokens: int = 0  # total KV tokens of the engine; 0 = unknown
    max_num_seqs: int = 0  # engine batch limit; 0 = unknown
    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    num_preemptions: float = 0.0
    last_scrape_s: float = 0.0
    consecutive_failures: int = 0

    @property
    def queue_depth(self) -> int:
        """Work waiting or running as far as we know: the larger of our count and the engine's."""
        return max(self.inflight, self.num_running + self.num_waiting)


@dataclass(slots=True)
class PoolState:
    """A pool and the live state of its replicas."""

    name: str
    max_context_tokens: int
    models: tuple[str, ...]
    replicas: list[ReplicaState] = field(default_factory=list)

    def serves(self, model: str) -> bool:
        """True when this pool serves the model (an empty model name matches any pool)."""
        return not model or model in self.models

    def healthy_replicas(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.healthy]


@dataclass(slots=True)
class ClusterView:
    """All pools, smallest context class first, as one consistent snapshot for a decision."""

    pools: list[PoolState]

    def pool(self, name: str) -> PoolState | None:
        for p in self.pools:
            if p.name == name:
                return p
        return None

    def replica(self, url: str) -> ReplicaState | None:
        for p in self.pools:
            for r in p.replicas:
                if r.url == url:
                    return r
        return None

    @classmethod
    def from_configs(cls, configs: list[PoolConfig]) -> ClusterView:
        """A fresh view with every replica assumed healthy and idle."""
        pools = [
            PoolState(
                name=c.name,
                max_context_tokens=c.max_context_tokens,
                models=c.models,
                replicas=[ReplicaState(url=u, pool=c.name) for u in c.replicas],
            )
            for c in sorted(configs, key=lambda c: c.max_context_tokens)
        ]
        return cls(pools=pools)
