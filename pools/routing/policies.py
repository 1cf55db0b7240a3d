"""Named policies: each is a pool chooser plus filters, weighted scorers and a picker.

Baselines live here beside Pythia's own policy so every comparison runs the same core.
"""

from __future__ import annotations

from collections.abc import Callable

from pools.routing.base import Policy
from pools.routing.filters.healthy import HealthyFilter
from pools.routing.pickers.max_score import MaxScorePicker
from pools.routing.pickers.round_robin import RoundRobinPicker
from pools.routing.pickers.session_hash import SessionHashPicker
from pools.routing.pool_choice import smallest_fitting_pool
from pools.routing.scorers.queue_depth import QueueDepthScorer


def round_robin() -> Policy:
    """vllm-project/production-stack `RoundRobinRouter`: next healthy replica in turn."""
    return Policy("round_robin", smallest_fitting_pool, (HealthyFilter(),), (), RoundRobinPicker())


def least_loaded() -> Policy:
    """production-stack's least-loaded idea: fewest in-flight (gateway) plus waiting (engine) requests."""
    return Policy("least_loaded", smallest_fitting_pool, (HealthyFilter(),), ((QueueDepthScorer(), 1.0),), MaxScorePicker())


def session() -> Policy:
    """production-stack `SessionRouter`: sticky on session/workflow id, least-loaded without one."""
    return Policy("session", smallest_fitting_pool, (HealthyFilter(),), ((QueueDepthScorer(), 1.0),), SessionHashPicker())


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "session": session,
}


def make_policy(name: str) -> Policy:
    """A fresh policy by name; raises KeyError listing the known names."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
