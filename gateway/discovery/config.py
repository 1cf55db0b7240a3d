"""Configuration of Kubernetes replica discovery: which pools are discovered and how to reach the API."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

# Where Kubernetes mounts a pod's service-account credentials.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class DiscoveryError(ValueError):
    """The discovery configuration is unusable (bad pool entry, not in a cluster, ...)."""


@dataclass(slots=True, frozen=True)
class PoolSelector:
    """One discovered pool: the EndpointSlices labelled `selector` in `namespace` are its replicas.

    `port` picks the slice port by name (e.g. "http") or number; None takes the slice's first port.
    """

    pool: str
    selector: str
    namespace: str
    port: str | int | None = None
    scheme: str = "http"


@dataclass(slots=True, frozen=True)
class K8sApiConfig:
    """How to reach the Kubernetes API: base URL plus optional bearer-token file and CA bundle."""

    base_url: str
    token_file: str | None = None
    ca_file: str | None = None
    namespace: str = "default"

    @classmethod
    def in_cluster(cls, namespace: str = "", sa_dir: Path = SERVICE_ACCOUNT_DIR) -> K8sApiConfig:
        """The API as seen from inside a pod: KUBERNETES_SERVICE_HOST/PORT, the mounted token and CA."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise DiscoveryError(
                "PYTHIA_DISCOVERY=k8s but KUBERNETES_SERVICE_HOST is unset (not in a pod?); "
                "set PYTHIA_K8S_API_URL to reach the API from outside"
            )
        if ":" in host:  # IPv6 service address
            host = f"[{host}]"
        ns = namespace or _read_text(sa_dir / "namespace") or "default"
        return cls(
            base_url=f"https://{host}:{port}",
            token_file=str(sa_dir / "token"),
            ca_file=str(sa_dir / "ca.crt"),
            namespace=ns,
        )


class DiscoverySettings(BaseSettings):
    """`PYTHIA_DISCOVERY` and `PYTHIA_K8S_*` variables (the gateway may embed or mirror these fields)."""

    model_config = SettingsConfigDict(env_prefix="PYTHIA_", extra="ignore")

    discovery: Literal["static", "k8s"] = "static"
    k8s_namespace: str = ""  # "" = the pod's own namespace (service account), else "default"
    k8s_api_url: str = ""  # "" = in-cluster (https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)
    k8s_token_file: str = ""  # "" = the service account token when in-cluster, none otherwise
    k8s_ca_file: str = ""  # "" = the service account CA when in-cluster, system CAs otherwise
    k8s_watch_timeout_s: int = 240  # server-side watch timeout; the watch is reopened after it

    def api_config(self) -> K8sApiConfig:
        """Resolve the API endpoint and credentials, in-cluster unless a URL is given."""
        if not self.k8s_api_url:
            cfg = K8sApiConfig.in_cluster(self.k8s_namespace)
            return K8sApiConfig(
                base_url=cfg.base_url,
                token_file=self.k8s_token_file or cfg.token_file,
                ca_file=self.k8s_ca_file or cfg.ca_file,
                namespace=cfg.namespace,
            )
        return K8sApiConfig(
            base_url=self.k8s_api_url.rstrip("/"),
            token_file=self.k8s_token_file or None,
            ca_file=self.k8s_ca_file or None,
            namespace=self.k8s_namespace or "default",
        )


def parse_pool_selectors(pools: Iterable[Mapping[str, Any]], default_namespace: str) -> list[PoolSelector]:
    """The pools of a PYTHIA_POOLS list that carry a `selector` (static pools with `replicas` are skipped).

    A pool entry may add `namespace`, `port` (slice port name or number) and `scheme` next to `selector`.
    """
    selectors: list[PoolSelector] = []
    seen: set[str] = set()
    for entry in pools:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise DiscoveryError(f"pool entry without a name: {dict(entry)!r}")
        selector = entry.get("selector")
        if selector is None:
            continue
        if not isinstance(selector, str) or not selector.strip():
            raise DiscoveryError(f"pool {name!r}: selector must be a non-empty label selector string")
        if entry.get("replicas"):
            raise DiscoveryError(f"pool {name!r}: give either `replicas` or `selector`, not both")
        if name in seen:
            raise DiscoveryError(f"pool {name!r} appears twice")
        seen.add(name)
        port = entry.get("port")
        if port is not None and not isinstance(port, str | int):
            raise DiscoveryError(f"pool {name!r}: port must be a port name or number")
        scheme = entry.get("scheme", "http")
        if scheme not in ("http", "https"):
            raise DiscoveryError(f"pool {name!r}: scheme must be http or https")
        namespace = entry.get("namespace") or default_namespace
        selectors.append(
            PoolSelector(pool=name, selector=selector.strip(), namespace=str(namespace), port=port, scheme=scheme)
        )
    return selectors


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
