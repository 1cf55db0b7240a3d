"""Hand-built cluster states for the routing tests."""

from __future__ import annotations

from pools.request_features import extract_features
from pools.routing import RoutingContext, RoutingState
from pools.types import ClusterView, PoolConfig
from predictor.types import Prediction, Tags

SHORT = ("http://s1", "http://s2", "http://s3")
LONG = ("http://l1", "http://l2")


def cluster(kv_capacity: int = 100_000) -> ClusterView:
    v = ClusterView.from_configs(
        [PoolConfig("short", 16384, ("m",), SHORT), PoolConfig("long", 131072, ("m",), LONG)]
    )
    for p in v.pools:
        for r in p.replicas:
            r.kv_capacity_tokens = kv_capacity
    return v


def call(
    state: RoutingState,
    text: str = "hello",
    *,
    max_tokens: int | None = 64,
    prediction: Prediction | None = None,
    tags: Tags | None = None,
    now: float = 0.0,
    messages: list[dict[str, str]] | None = None,
) -> RoutingContext:
    body: dict = {"model": "m", "messages": messages or [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    f = extract_features(body, True, now)
    return RoutingContext(f, tags or Tags(), prediction or Prediction(), now, state)


def warm(workflow: str, **kw: object) -> Prediction:
    """A confident prediction for a call of `workflow`."""
    base: dict = {"cold": False, "workflow": workflow, "role": "r", "confidence": 0.9,
                  "output_tokens_expected": 200.0, "output_tokens_bound": 400}
    base.update(kw)
    return Prediction(**base)
