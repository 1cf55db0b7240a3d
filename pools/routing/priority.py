"""Lookahead priority (Pythia mechanism 4): workflows with fewer predicted steps left go first.

The number is vLLM's `priority` (lower runs earlier, as its priority scheduler orders) and the
gateway admission queue's order. It ages: every `aging_s` of workflow life (plus time spent waiting)
lowers it by one, so a long workflow is never starved by a stream of short ones.
"""

from __future__ import annotations

from pools.routing.base import RoutingContext

MAX_PRIORITY = 64  # beyond this many remaining steps the order no longer changes
COLD_PRIORITY = 4  # a call the predictor knows nothing about: ahead of long workflows, behind finishing ones


def lookahead_priority(ctx: RoutingContext, aging_s: float = 60.0) -> int:
    """Priority from the predicted remaining steps, minus one per `aging_s` of workflow age."""
    p = ctx.prediction
    now = ctx.now
    arrival = ctx.features.arrival_s
    if p.cold or not p.workflow:
        base = COLD_PRIORITY
        started = arrival or now
    else:
        base = round(p.remaining_steps)
        if base > MAX_PRIORITY:
            base = MAX_PRIORITY
        started = ctx.state.workflow_started.get(p.workflow, now)
        if arrival and arrival < started:
            started = arrival
    age = now - started
    if age > 0.0 and aging_s > 0.0:
        base -= int(age / aging_s)
    return base if base > 0 else 0
