"""The plugin interfaces of the routing core and the data a decision reads and returns.

Shaped like the Gateway API Inference Extension's scheduler: filters drop replicas,
scorers rate each remaining replica in [0, 1], a picker chooses one. Nothing here
does I/O or reads a clock: time arrives in `RoutingContext.now`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pools.prefix_index import PrefixIndex
from pools.routing.routing_index import RoutingPrefixIndex
from pools.routing.sampling import BLOCKS_FOR, sampled
from pools.types import ClusterView, PoolState, ReplicaState
from predictor.types import Prediction, RequestFeatures, Tags


@dataclass(slots=True)
class RoutingState:
    """Mutable memory of the router, owned by the caller (one per gateway worker or simulation)."""

    prefix_index: PrefixIndex = field(default_factory=RoutingPrefixIndex)
    round_robin: dict[str, int] = field(default_factory=dict)  # pool -> next index
    workflow_pool: dict[str, str] = field(default_factory=dict)  # workflow id -> pinned pool
    # workflow id -> replica of its latest call (pre-warm target, affinity when the index forgot)
    workflow_replica: dict[str, str] = field(default_factory=dict)
    # workflow id -> first time the router saw it (lookahead priority ages with it)
    workflow_started: dict[str, float] = field(default_factory=dict)
    # workflow id -> (replica, full prompt blocks, hash of the last one) of its latest call: tells whether
    # a call continues the previous one's conversation where the engine also cached the answer
    workflow_tip: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    # baselines that keep their own approximate caches (SGLang tree, llm-d LRU indexer), by plugin name
    indexes: dict[str, PrefixIndex] = field(default_factory=dict)
    # prefix tokens the index predicted as hits / tokens routed, per replica since the last reconcile
    predicted_hit_tokens: dict[str, float] = field(default_factory=dict)
    routed_prompt_tokens: dict[str, float] = field(default_factory=dict)
    sized_replicas: set[str] = field(default_factory=set)  # replicas whose index share came from KV capacity
    index_capacity: dict[str, int] = field(default_factory=dict)  # current index share per replica (blocks)
    # scraped (prefix_cache_queries, prefix_cache_hits) per replica at its last reconcile
    reconciled_counters: dict[str, tuple[float, float]] = field(default_factory=dict)
    scraped_queries: dict[str, float] = field(default_factory=dict)  # prefix_cache_queries at the last scrape
    max_workflows: int = 200_000  # memory bound of the per-workflow maps (oldest forgotten first)

    def index(self, name: str, capacity_blocks: int) -> PrefixIndex:
        """A named private prefix index (created on first use with this per-replica capacity)."""
        idx = self.indexes.get(name)
        if idx is None:
            idx = self.indexes[name] = RoutingPrefixIndex(capacity_blocks)
        return idx

    def remember_workflow(self, workflow: str, pool: str, now: float) -> None:
        """Pin a workflow to a pool, forgetting the oldest workflows beyond `max_workflows`."""
        self.workflow_pool[workflow] = pool
        if workflow not in self.workflow_started:
            self.workflow_started[workflow] = now
        if len(self.workflow_pool) > self.max_workflows:
            self.trim_workflows()

    def workflow_maps(self) -> tuple[dict[str, Any], ...]:
        """Every per-workflow map, so that forgetting a workflow forgets it everywhere."""
        return (self.workflow_pool, self.workflow_started, self.workflow_replica, self.workflow_tip)

    def trim_workflows(self) -> None:
        """Forget the oldest workflows beyond `max_workflows` in every per-workflow map."""
        for m in self.workflow_maps():
            for k in list(m)[: len(m) - self.max_workflows]:
                del m[k]


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

    sampled: tuple[int, ...] | None = None
    # set by the KV-capacity filter: (the list it returned, expected free KV fraction of each after this
    # call, load of each, matched prefix blocks of each or None when it did not look), so the placement
    # scorer need not read every replica again
    kv_free: tuple[list[ReplicaState], list[float], list[int], list[int] | None] | None = None
    # (`call_kv_bound`, `call_kv_expected`), worked out once by `pools.routing.kv.call_kv`: the KV filter,
    # the reservation and the gateway's typical-call-size hook all ask; it depends only on `features` and
    # `prediction`, which stay as they are for the life of a context (a routing again keeps it)
    kv_need: tuple[int, int] | None = None

    def sampled_hashes(self) -> tuple[int, ...]:
        """The prompt's block hashes at the positions the routing index keeps (pools.routing.sampling)."""
        if self.sampled is None:
            self.sampled = sampled(self.features.prefix_hashes)
        return self.sampled

    def matched_blocks(self) -> dict[str, int]:
        """Leading prompt blocks each replica holds (to the index's sampled resolution), computed once."""
        if self.prefix_match is None:
            self.prefix_match = self.state.prefix_index.match_mapped(self.sampled_hashes(), BLOCKS_FOR)
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
    prefix_hashes: tuple[int, ...] = ()  # block hashes of the warmed prefix (to count wasted warms)
    workflow: str = ""


@dataclass(slots=True)
class Decision:
    """Where a call goes, at which priority, and what else to do; `error` set when it cannot go.

    `route()` builds a placement positionally (cheaper than keywords, every call): keep the field order."""

    pool: str = ""
    replica: str = ""
    priority: int | None = None
    error: RouteError | None = None
    queue: bool = False  # the pool is saturated: wait in the admission queue, then route again
    prewarm: tuple[PrewarmAction, ...] = ()
    reason: str = ""  # short explanation for spans and logs
    # KV tokens to add to the chosen replica's `reserved_kv_tokens` on dispatch (and remove on completion):
    # prompt + predicted output bound; `kv_expected_tokens` likewise for `reserved_kv_expected_tokens`
    kv_reserve_tokens: int = 0
    kv_expected_tokens: int = 0


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
# runs after the pick (like GIE's PreRequest): record the placement in a plugin's own state
AfterPick = Callable[[RoutingContext, ReplicaState], None]
# extra actions for the decision, e.g. pre-warm of the next call's prefix
ActionsFn = Callable[[RoutingContext, ClusterView, ReplicaState], "tuple[PrewarmAction, ...]"]


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
    after_pick: tuple[AfterPick, ...] = ()
    actions: ActionsFn | None = None
    # reserve KV only for the part of the prompt the chosen replica does not hold already (its prefix
    # match): calls sharing a cached prefix share its blocks in vLLM, so counting the whole prompt of
    # each would double count them and hold back calls that fit
    reserve_uncached: bool = False
