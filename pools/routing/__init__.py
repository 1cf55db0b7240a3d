"""The routing core: pure decisions over plain data (see DESIGN.md, 'The seams')."""

from pools.routing.base import (
    Decision,
    Filter,
    Picker,
    Policy,
    PrewarmAction,
    RouteError,
    RoutingContext,
    RoutingState,
    Scorer,
)
from pools.routing.policies import POLICIES, make_policy
from pools.routing.router import route

__all__ = [
    "POLICIES",
    "Decision",
    "Filter",
    "Picker",
    "Policy",
    "PrewarmAction",
    "RouteError",
    "RoutingContext",
    "RoutingState",
    "Scorer",
    "make_policy",
    "route",
]
