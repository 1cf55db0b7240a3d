"""Discovery pieces without I/O: EndpointSlice -> URLs, pool selector parsing, API config, view updates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.discovery import (
    DiscoveryError,
    DiscoverySettings,
    K8sApiConfig,
    PoolSelector,
    apply_discovered,
    parse_pool_selectors,
    ready_urls,
)
from pools.types import ClusterView, PoolConfig


def _slice(endpoints: list[dict[str, Any]], ports: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"metadata": {"name": "s"}, "endpoints": endpoints, "ports": ports}


def test_ready_urls_skips_unready_and_terminating_and_dedups() -> None:
    s1 = _slice(
        [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True}},
            {"addresses": ["10.0.0.3"]},  # no conditions: unknown, treated as ready
        ],
        [{"name": "http", "port": 8000}],
    )
    s2 = _slice([{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}], [{"name": "http", "port": 8000}])
    assert ready_urls([s1, s2], "http") == ["http://10.0.0.1:8000", "http://10.0.0.3:8000"]


def test_ready_urls_port_by_name_number_or_first() -> None:
    s = _slice([{"addresses": ["10.0.0.1"]}], [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8000}])
    assert ready_urls([s], "http") == ["http://10.0.0.1:8000"]
    assert ready_urls([s], None) == ["http://10.0.0.1:9090"]
    assert ready_urls([s], 7000, scheme="https") == ["https://10.0.0.1:7000"]
    assert ready_urls([s], "grpc") == []  # named port absent: that slice contributes nothing
    assert ready_urls([_slice([{"addresses": ["10.0.0.1"]}], None)], None) == []


def test_ready_urls_brackets_ipv6_and_tolerates_null_endpoints() -> None:
    s = _slice([{"addresses": ["fd00::5"], "conditions": {"ready": True}}], [{"name": "http", "port": 8000}])
    assert ready_urls([s], "http") == ["http://[fd00::5]:8000"]
    assert ready_urls([{"metadata": {"name": "e"}, "endpoints": None, "ports": [{"port": 1}]}]) == []


def test_parse_pool_selectors_takes_selector_pools_only() -> None:
    pools = [
        {"name": "short", "max_context_tokens": 16384, "models": ["m"], "selector": "pythia.ai/pool=short", "port": "http"},
        {"name": "long", "max_context_tokens": 131072, "models": ["m"], "selector": " pythia.ai/pool=long ",
         "namespace": "gpu", "scheme": "https", "port": 8443},
        {"name": "static", "max_context_tokens": 8192, "models": ["m"], "replicas": ["http://127.0.0.1:9001"]},
    ]
    assert parse_pool_selectors(pools, "pythia") == [
        PoolSelector("short", "pythia.ai/pool=short", "pythia", "http", "http"),
        PoolSelector("long", "pythia.ai/pool=long", "gpu", 8443, "https"),
    ]


@pytest.mark.parametrize(
    "entry",
    [
        {"selector": "a=b"},
        {"name": "p", "selector": ""},
        {"name": "p", "selector": "a=b", "replicas": ["http://x:1"]},
        {"name": "p", "selector": "a=b", "scheme": "ftp"},
        {"name": "p", "selector": "a=b", "port": 1.5},
    ],
)
def test_parse_pool_selectors_rejects_bad_entries(entry: dict[str, Any]) -> None:
    with pytest.raises(DiscoveryError):
        parse_pool_selectors([entry], "default")


def test_duplicate_pool_names_rejected() -> None:
    with pytest.raises(DiscoveryError):
        parse_pool_selectors([{"name": "p", "selector": "a=b"}, {"name": "p", "selector": "a=c"}], "default")


def test_in_cluster_config_reads_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "namespace").write_text("pythia\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    cfg = K8sApiConfig.in_cluster(sa_dir=tmp_path)
    assert cfg.base_url == "https://10.96.0.1:443"
    assert cfg.token_file == str(tmp_path / "token") and cfg.ca_file == str(tmp_path / "ca.crt")
    assert cfg.namespace == "pythia"
    assert K8sApiConfig.in_cluster("other", sa_dir=tmp_path).namespace == "other"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert K8sApiConfig.in_cluster(sa_dir=tmp_path).base_url == "https://[fd00::1]:443"


def test_not_in_cluster_without_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("PYTHIA_DISCOVERY", "k8s")
    settings = DiscoverySettings()
    assert settings.discovery == "k8s"
    with pytest.raises(DiscoveryError, match="KUBERNETES_SERVICE_HOST"):
        settings.api_config()


def test_settings_with_explicit_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHIA_K8S_API_URL", "http://127.0.0.1:8001/")
    monkeypatch.setenv("PYTHIA_K8S_NAMESPACE", "pythia")
    cfg = DiscoverySettings().api_config()
    assert cfg == K8sApiConfig(base_url="http://127.0.0.1:8001", token_file=None, ca_file=None, namespace="pythia")


def test_apply_discovered_keeps_survivors_and_static_pools() -> None:
    view = ClusterView.from_configs(
        [PoolConfig("short", 16384, ("m",), ("http://a:1", "http://b:1")), PoolConfig("static", 8192, ("m",), ("http://s:1",))]
    )
    a = view.replica("http://a:1")
    assert a is not None
    a.inflight, a.healthy = 4, False
    assert apply_discovered(view, {"short": ["http://a:1", "http://c:1"], "unknown": ["http://z:1"]})
    short = view.pool("short")
    assert short is not None
    assert [r.url for r in short.replicas] == ["http://a:1", "http://c:1"]
    assert short.replicas[0] is a and a.inflight == 4  # same object: health and load carried over
    assert short.replicas[1].healthy and short.replicas[1].pool == "short"
    assert [r.url for r in view.pool("static").replicas] == ["http://s:1"]  # type: ignore[union-attr]
    assert not apply_discovered(view, {"short": ["http://a:1", "http://c:1"]})
