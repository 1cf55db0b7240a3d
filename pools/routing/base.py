"""The plugin interfaces of the routing core and the data a decision reads and returns.

Shaped like the Gateway API Inference Extension's scheduler: filters drop replicas,
scorers rate each remaining replica in [0, 1], a picker chooses one. Nothing here
does I/O or reads a clock: time arrives in `RoutingContext.now`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pools.prefix_index import PrefixIndex
from pools.types import ClusterView, PoolState, ReplicaState
from predictor.types import Prediction, RequestFeatures, Tags


@dataclass(slots=True)
class RoutingState:
    """Mutable memory of the router, owned by the caller (one per gateway worker or simulation)."""

    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    round_robin: dict[str, int] = field(default_factory=dict)  # pool -> next index
    workflow_pool: dict[str, str] = field(default_factory=dict)  # workflow id -> pinned pool


@dataclass(slots=True)
class RoutingContext:
    """One request as the routing core sees it."""

    features: RequestFeatures
    tags: Tags
    prediction: Prediction
    now: float
    state: RoutingState
    exclude: frozenset[str] = frozenset()  # replicas not to use (already failed for this call)
    # filled in by route(): the chosen pool and prefix-match lengths, shared by plugins
    pool: PoolState | None = None
    prefix_match: dict[str, int] | None = None

    def matched_blocks(self) -> dict[str, int]:
        """Leading prompt blocks each replica holds, computed once per decision."""
        if self.prefix_match is None:
            self.prefix_match = self.state.prefix_index.match(self.features.prefix_hashes)
        return self.prefix_match


@dataclass(slots=True, frozen=True)
class RouteError:
    """A request the router cannot place; maps one-to-one to an OpenAI-shaped HTTP error."""

    status: int
    code: str
    message: str
    retry_after_s: float | None = None


@dataclass(slots=True, frozen=True)
class PrewarmAction:
    """Send a `max_tokens=1` prefill of these messages to this replica before the next call arrives."""

    replica: str
    messages: tuple[dict[str, str], ...]
    model: str


@dataclass(slots=True)
class Decision:
    """Where a call goes, at which priority, and what else to do; `error` set when it cannot go."""

    pool: str = ""
    replica: str = ""
    priority: int | None = None
    error: RouteError | None = None
    queue: bool = False  # the pool is saturated: wait in the admission queue, then route again
    prewarm: tuple[PrewarmAction, ...] = ()
    reason: str = ""  # short explanation for spans and logs


class Filter(Protocol):
    """Drops replicas that must not take this call."""

    name: str

    def filter(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[ReplicaState]: ...


class Scorer(Protocol):
    """Rates each candidate in [0, 1]; higher is better."""

    name: str

    def score(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[float]: ...


class Picker(Protocol):
    """Chooses one candidate given the weighted total scores."""

    name: str

    def pick(self, ctx: RoutingContext, candidates: list[ReplicaState], scores: list[float]) -> ReplicaState: ...


PoolChooser = Callable[[RoutingContext, ClusterView], "PoolState | RouteError"]
PriorityFn = Callable[[RoutingContext], "int | None"]


@dataclass(slots=True)
class Policy:
    """A named routing policy: how to choose the pool, then filters, weighted scorers and a picker."""

    name: str
    pool_chooser: PoolChooser
    filters: tuple[Filter, ...]
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker
    priority: PriorityFn | None = None
    uses_prefix_index: bool = False  # record each placement in the prefix index
