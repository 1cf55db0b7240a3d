"""`python -m gateway.discovery`: print what Kubernetes discovery sees, one JSON line per change.

Reads the same PYTHIA_POOLS / PYTHIA_K8S_* variables as the gateway; run it in a gateway pod
(`kubectl exec deploy/pythia-gateway -- python -m gateway.discovery`) to check selectors and RBAC.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from gateway.discovery.config import DiscoveryError, DiscoverySettings, parse_pool_selectors
from gateway.discovery.k8s import K8sDiscovery
from gateway.settings import ConfigError, read_pool_entries


async def _watch(once: bool) -> int:
    settings = DiscoverySettings()
    api = settings.api_config()
    # PYTHIA_POOLS read exactly as `pythia serve` reads it (inline JSON or a YAML/JSON file)
    selectors = parse_pool_selectors(read_pool_entries(os.environ.get("PYTHIA_POOLS", "")), api.namespace)
    if not selectors:
        print("no pool in PYTHIA_POOLS has a `selector`", file=sys.stderr)
        return 2
    discovery = K8sDiscovery(
        selectors, api, on_change=lambda snap: print(json.dumps(snap), flush=True),
        watch_timeout_s=settings.k8s_watch_timeout_s,
    )
    synced = await discovery.start()
    try:
        if once:
            print(json.dumps(discovery.current()))
            return 0 if synced else 1
        await asyncio.Event().wait()
    finally:
        await discovery.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Print the discovered replicas (`--once`: the first complete list only)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return asyncio.run(_watch(once="--once" in args))
    except (DiscoveryError, ConfigError) as exc:
        print(f"discovery: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
