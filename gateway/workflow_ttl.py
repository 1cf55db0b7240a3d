"""Forget the router's memory of workflows that have gone quiet (bounded memory for a long-running gateway).

`pools.routing.RoutingState` keeps three maps keyed by workflow id: the pool a workflow is pinned to,
the replica of its latest call and when it began (lookahead priority ages with it). The routing
core only caps them at `RoutingState.max_workflows` (200,000 by default, days of traffic), so
without this a gateway's memory grows with every workflow it has ever served. Here each workflow's
last call is noted (an after-pick hook) and a periodic sweep drops every workflow with no call for
`PYTHIA_WORKFLOW_TTL_S` from all three maps. A call that arrives later simply starts afresh: its
workflow chooses a pool again, as a new workflow would.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.tasks import PeriodicTask
from pools.routing import RoutingContext, RoutingState
from pools.types import ReplicaState

log = logging.getLogger("pythia.workflow_ttl")

MAX_SWEEP_INTERVAL_S = 30.0


class WorkflowStateReaper:
    """Drops the routing state of workflows idle for longer than `ttl_s` (sweeps every `interval_s`)."""

    def __init__(self, state: RoutingState, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.ttl_s = ttl_s
        self.interval_s = min(MAX_SWEEP_INTERVAL_S, max(0.05, ttl_s / 4))
        self.clock = clock
        # workflow id -> time of its latest call, oldest activity first
        self.last_call: OrderedDict[str, float] = OrderedDict()
        self.forgotten = 0  # workflows dropped so far (exported as a predictor-style stat)
        self._periodic = PeriodicTask("pythia-workflow-ttl", self.interval_s, self._sweep, log)

    def touch(self, ctx: RoutingContext, chosen: ReplicaState) -> None:
        """After-pick hook: the workflow of this call is active now."""
        wf = ctx.prediction.workflow or ctx.tags.workflow  # workflow_id(ctx), inline: every call asks
        if wf:
            last = self.last_call
            last[wf] = self.clock()
            last.move_to_end(wf)

    def sweep(self, now: float | None = None) -> int:
        """Forget every workflow with no call for `ttl_s`; returns how many were forgotten."""
        now = self.clock() if now is None else now
        st = self.state
        maps = st.workflow_maps()
        # workflows pinned without ever being placed (their calls were refused or timed out) have
        # no after-pick: they are first seen here, and expire a TTL later like the others
        last = self.last_call
        for m in maps:
            for wf in m:
                if wf not in last:
                    last[wf] = now
        n = 0
        while last:
            wf, t = next(iter(last.items()))
            if t + self.ttl_s > now:
                break  # ordered by activity: the rest are newer
            del last[wf]
            for m in maps:
                m.pop(wf, None)
            n += 1
        self.forgotten += n
        return n

    async def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def _sweep(self) -> None:
        self.sweep()
