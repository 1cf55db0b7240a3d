"""Named policies: each is a pool chooser plus filters, weighted scorers and a picker.

Baselines live here beside Pythia's own policy so every comparison runs the same core.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pools.routing.base import AfterPick, Filter, Policy, PoolChooser, PriorityFn, RouteError, RoutingContext
from pools.routing.filters.healthy import HealthyFilter
from pools.routing.filters.kv_capacity import KvCapacityFilter
from pools.routing.pickers.cache_aware import CacheAwarePicker
from pools.routing.pickers.max_score import MaxScorePicker
from pools.routing.pickers.round_robin import RoundRobinPicker
from pools.routing.pickers.session_hash import SessionHashPicker
from pools.routing.pool_choice import predicted_peak_pool, smallest_fitting_pool
from pools.routing.priority import lookahead_priority
from pools.routing.pythia_hooks import record_workflow
from pools.routing.reconcile import record_prediction
from pools.routing.scorers.gie_kv_utilization import GieKvUtilizationScorer
from pools.routing.scorers.gie_prefix_cache import GiePrefixCacheScorer
from pools.routing.scorers.gie_queue import GieQueueScorer
from pools.routing.scorers.pythia_placement import PythiaPlacementScorer
from pools.routing.scorers.queue_depth import QueueDepthScorer
from pools.types import ClusterView, PoolState


def round_robin() -> Policy:
    """vllm-project/production-stack `RoundRobinRouter`: next healthy replica in turn."""
    return Policy("round_robin", smallest_fitting_pool, (HealthyFilter(),), (), RoundRobinPicker())


def least_loaded() -> Policy:
    """production-stack's least-loaded idea: fewest in-flight (gateway) plus waiting (engine) requests."""
    return Policy("least_loaded", smallest_fitting_pool, (HealthyFilter(),), ((QueueDepthScorer(), 1.0),), MaxScorePicker())


def session() -> Policy:
    """production-stack `SessionRouter`: sticky on session/workflow id, least-loaded without one."""
    return Policy("session", smallest_fitting_pool, (HealthyFilter(),), ((QueueDepthScorer(), 1.0),), SessionHashPicker())


def prefix() -> Policy:
    """SGLang router `cache_aware` (the `sglang-router` package: lightseekorg/smg
    model_gateway/src/policies/cache_aware.rs): approximate radix tree per worker when a prompt matches
    enough of it, least loaded otherwise and whenever `balance_abs/rel_threshold` say the load is imbalanced."""
    return Policy("prefix", smallest_fitting_pool, (HealthyFilter(),), (), CacheAwarePicker())


def llmd() -> Policy:
    """llm-d inference scheduler's default profile (llm-d/llm-d-inference-scheduler, on the Gateway API
    Inference Extension plugins): prefix-cache-scorer x3, kv-cache-utilization-scorer x2, queue-scorer x2,
    max-score-picker (weights of llm-d's documented `inference-scheduling` EndpointPickerConfig)."""
    prefix_scorer = GiePrefixCacheScorer()
    return Policy(
        "llmd",
        smallest_fitting_pool,
        (HealthyFilter(),),
        ((prefix_scorer, 3.0), (GieKvUtilizationScorer(), 2.0), (GieQueueScorer(), 2.0)),
        MaxScorePicker(),
        after_pick=(prefix_scorer.record,),
    )


def pythia(
    pool: bool = True,
    capacity: bool = True,
    prefix: bool = True,
    priority: bool = True,
    prewarm: bool = True,
    *,
    name: str = "pythia",
    max_overflow_probability: float = 0.05,
    kv_budget: float = 1.0,
    max_inflight: int = 0,
    spill_margin: float = math.inf,
    short_penalty: float = 0.05,
    headroom_weight: float = 1.0,
    prefix_weight: float = 8.0,
    prefix_slack: float = 8.0,
    prefix_slack_tokens: float = 1024.0,
    queue_weight: float = 1.0,
    aging_s: float = 60.0,
    reserve_uncached: bool = True,
    likely_peak: bool = True,
) -> Policy:
    """Pythia: workflow-lifetime pools, capacity-predictive choice, prefix affinity, lookahead priority,
    pre-warm; each mechanism switchable (False = ablated) for the `pythia-no-<mechanism>` entries.

    Prefix affinity is load-aware: a replica's prefix bonus fades to 0 once its load exceeds the least
    loaded candidate's by `prefix_slack` calls plus one per `prefix_slack_tokens` matched tokens (a popular
    system prompt no longer pulls every fan-out sibling onto one replica; a long cached conversation
    still stays). `reserve_uncached`: KV reservations and the capacity filter count only the prompt
    tokens the replica does not hold already."""
    from pools.prewarm import choose_prewarm  # late: pools.prewarm imports this package

    filters: list[Filter] = [HealthyFilter()]
    hooks: list[AfterPick] = [record_workflow]
    if capacity:
        filters.append(KvCapacityFilter(max_overflow_probability, kv_budget, max_inflight, reserve_uncached and prefix))
    if prefix:
        hooks.append(record_prediction)
    scorer = PythiaPlacementScorer(
        queue_weight, headroom_weight if capacity else 0.0, prefix_weight if prefix else 0.0, prefix_slack, prefix_slack_tokens
    )
    return Policy(
        name,
        _peak_pool(spill_margin, short_penalty, likely_peak) if pool else smallest_fitting_pool,
        tuple(filters),
        ((scorer, 1.0),),
        MaxScorePicker(),
        priority=_lookahead(aging_s) if priority else None,
        uses_prefix_index=prefix,
        after_pick=tuple(hooks),
        actions=choose_prewarm if prewarm else None,
        reserve_uncached=reserve_uncached and prefix,
    )


# The pool chooser and priority of a policy run on every call: closures passing their settings
# positionally cost less per call than `functools.partial` with keywords (which merges a dict each call).
def _peak_pool(spill_margin: float, short_penalty: float, likely_peak: bool) -> PoolChooser:
    def choose(ctx: RoutingContext, view: ClusterView) -> PoolState | RouteError:
        return predicted_peak_pool(ctx, view, spill_margin, short_penalty, likely_peak)

    return choose


def _lookahead(aging_s: float) -> PriorityFn:
    def priority(ctx: RoutingContext) -> int | None:
        return lookahead_priority(ctx, aging_s)

    return priority


# mechanisms a `pythia-no-<name>` ablation switches off (autoscaling is evaluated on its own)
PYTHIA_MECHANISMS = ("pool", "capacity", "prefix", "priority", "prewarm")


def _ablation(mechanism: str) -> Callable[[], Policy]:
    def make() -> Policy:
        return pythia(**{mechanism: False}, name=f"pythia-no-{mechanism}")

    make.__doc__ = f"Pythia without its {mechanism} mechanism (ablation)."
    return make


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "session": session,
    "prefix": prefix,
    "llmd": llmd,
    "pythia": pythia,
    **{f"pythia-no-{m}": _ablation(m) for m in PYTHIA_MECHANISMS},
}
BASELINES = ("round_robin", "least_loaded", "session", "prefix", "llmd")


def make_policy(name: str) -> Policy:
    """A fresh policy by name; raises KeyError listing the known names."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
