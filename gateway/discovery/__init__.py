"""Replica discovery: where each pool's replicas are, when they are not a static list of URLs.

`K8sDiscovery` watches the EndpointSlices of labelled Kubernetes Services (one label selector per
pool, from the `selector` field of a PYTHIA_POOLS entry) and reports the ready replicas per pool.
"""

from gateway.discovery.config import (
    DiscoveryError,
    DiscoverySettings,
    K8sApiConfig,
    PoolSelector,
    parse_pool_selectors,
)
from gateway.discovery.k8s import ApiError, DiscoveryStats, K8sDiscovery, WatchExpired
from gateway.discovery.reconcile import apply_discovered
from gateway.discovery.slices import ready_urls

__all__ = [
    "ApiError",
    "DiscoveryError",
    "DiscoverySettings",
    "DiscoveryStats",
    "K8sApiConfig",
    "K8sDiscovery",
    "PoolSelector",
    "WatchExpired",
    "apply_discovered",
    "parse_pool_selectors",
    "ready_urls",
]
