"""Bookkeeping Pythia's policy does after each pick (pure, on `RoutingState`)."""

from __future__ import annotations

from pools.routing.base import RoutingContext
from pools.types import ReplicaState


def record_workflow(ctx: RoutingContext, chosen: ReplicaState) -> None:
    """Remember where the workflow's latest call went and when the workflow began (for aging)."""
    wf = ctx.prediction.workflow or ctx.tags.workflow  # workflow_id(ctx), inline: every call asks
    if not wf:
        return
    st = ctx.state
    st.workflow_replica[wf] = chosen.url
    if wf not in st.workflow_started:
        st.workflow_started[wf] = ctx.features.arrival_s or ctx.now
        if len(st.workflow_started) > st.max_workflows:
            st.trim_workflows()
