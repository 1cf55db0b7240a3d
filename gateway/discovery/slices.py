"""Pure functions from EndpointSlice objects (as the Kubernetes API returns them) to replica base URLs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def slice_port(slice_obj: Mapping[str, Any], wanted: str | int | None) -> int | None:
    """The port number replicas listen on in this slice: by name, a fixed number, or the first one listed."""
    if isinstance(wanted, int):
        return wanted
    ports = slice_obj.get("ports") or []
    for p in ports:
        if not isinstance(p, Mapping) or not isinstance(p.get("port"), int):
            continue
        if wanted is None or p.get("name") == wanted:
            return int(p["port"])
    return None


def endpoint_is_ready(endpoint: Mapping[str, Any]) -> bool:
    """Ready per the EndpointSlice API: `ready` unset means unknown, which consumers treat as ready.

    Terminating pods report ready=false, so draining replicas leave the pool before they stop.
    """
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False


def format_url(scheme: str, address: str, port: int) -> str:
    """http://host:port, with IPv6 literals in brackets."""
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    return f"{scheme}://{host}:{port}"


def ready_urls(slices: Iterable[Mapping[str, Any]], port: str | int | None = None, scheme: str = "http") -> list[str]:
    """Sorted, de-duplicated base URLs of every ready endpoint across the slices of one pool."""
    urls: set[str] = set()
    for s in slices:
        number = slice_port(s, port)
        if number is None:
            continue
        for endpoint in s.get("endpoints") or []:
            if not isinstance(endpoint, Mapping) or not endpoint_is_ready(endpoint):
                continue
            # Every address of one endpoint is the same pod; the first one is enough.
            addresses = endpoint.get("addresses") or []
            if addresses and isinstance(addresses[0], str):
                urls.add(format_url(scheme, addresses[0], number))
    return sorted(urls)
