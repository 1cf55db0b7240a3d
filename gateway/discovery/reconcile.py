"""Apply discovered replica URLs to the gateway's live cluster view, keeping what it knows of survivors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pools.types import ClusterView, ReplicaState


def apply_discovered(view: ClusterView, urls_by_pool: Mapping[str, Sequence[str]]) -> bool:
    """Set each listed pool's replicas to exactly `urls`, in place; True when anything changed.

    Replicas that stay keep their ReplicaState (in-flight counts, scraped metrics, health); new ones
    start healthy and idle; pools not named in `urls_by_pool` (static pools) are left alone.
    """
    changed = False
    for pool in view.pools:
        urls = urls_by_pool.get(pool.name)
        if urls is None:
            continue
        known = {r.url: r for r in pool.replicas}
        wanted = list(dict.fromkeys(urls))
        if wanted == [r.url for r in pool.replicas]:
            continue
        pool.replicas = [known.get(u) or ReplicaState(url=u, pool=pool.name) for u in wanted]
        changed = True
    return changed
