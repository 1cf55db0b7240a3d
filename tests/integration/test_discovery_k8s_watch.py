"""K8sDiscovery against a fake Kubernetes API server on loopback: list, watch, drops, 410 Gone, errors."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.discovery import (
    K8sApiConfig,
    K8sDiscovery,
    PoolSelector,
    apply_discovered,
)
from pools.types import ClusterView, PoolConfig

TOKEN = "test-token-1"
NS = "pythia"


def make_slice(name: str, pool: str, endpoints: list[tuple[str, bool | None]], port: int = 8000) -> dict[str, Any]:
    """An EndpointSlice as the controller writes it: Service labels copied, one port named http."""
    eps = []
    for addr, ready in endpoints:
        cond: dict[str, Any] = {} if ready is None else {"ready": ready, "serving": ready, "terminating": False}
        eps.append({"addresses": [addr], "conditions": cond, "targetRef": {"kind": "Pod", "name": f"pod-{addr}"}})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"pythia.ai/pool": pool, "kubernetes.io/service-name": f"vllm-{pool}"},
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"}, {"name": "http", "port": port, "protocol": "TCP"}],
    }


@dataclass
class _Watcher:
    namespace: str
    selector: str
    queue: asyncio.Queue[Any]


@dataclass
class FakeK8s:
    """Just enough of the API server: EndpointSlice list (paginated) and watch with history and compaction."""

    token: str = TOKEN
    rv: int = 100
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    compacted_rv: int = 0
    gone_as_http: bool = False  # answer a too-old watch with HTTP 410 instead of an ERROR event
    fail_next: int = 0  # answer this many next requests with HTTP 500
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    watchers: list[_Watcher] = field(default_factory=list)

    # ---- test controls ----
    def upsert(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        kind = "MODIFIED" if obj["metadata"]["name"] in self.slices else "ADDED"
        self.slices[obj["metadata"]["name"]] = obj
        self._emit(kind, obj)

    def delete(self, name: str) -> None:
        self.rv += 1
        obj = self.slices.pop(name)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._emit("DELETED", obj)

    def bookmark(self) -> None:
        self.rv += 1
        obj = {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": str(self.rv)}}
        for w in self.watchers:
            w.queue.put_nowait((self.rv, "BOOKMARK", obj))

    def compact(self) -> None:
        """Forget history: resuming from any resourceVersion seen so far now gets 410 Gone."""
        self.compacted_rv = self.rv + 1
        self.history.clear()

    def drop_watches(self, abrupt: bool) -> None:
        """End every open watch: abrupt = connection reset mid-stream, else a clean end (server timeout)."""
        for w in self.watchers:
            w.queue.put_nowait("DROP" if abrupt else "CLOSE")

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.requests if k == kind)

    # ---- server ----
    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((self.rv, kind, obj))
        for w in self.watchers:
            if w.namespace == obj["metadata"]["namespace"] and _matches(w.selector, obj):
                w.queue.put_nowait((self.rv, kind, obj))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        watching = q.get("watch") in ("true", "1")
        self.requests.append(("watch" if watching else "list", q))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"}, status=401)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"kind": "Status", "code": 500, "message": "etcd is sad"}, status=500)
        ns, selector = request.match_info["ns"], q.get("labelSelector", "")
        if watching:
            return await self._watch(request, ns, selector, int(q.get("resourceVersion") or 0), int(q["timeoutSeconds"]))
        items = [s for s in self.slices.values() if s["metadata"]["namespace"] == ns and _matches(selector, s)]
        items.sort(key=lambda s: s["metadata"]["name"])
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0) or len(items)
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        return web.json_response({"kind": "EndpointSliceList", "metadata": meta, "items": page})

    async def _watch(self, request: web.Request, ns: str, selector: str, rv: int, timeout_s: int) -> web.StreamResponse:
        if rv < self.compacted_rv and self.gone_as_http:
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}, status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if rv < self.compacted_rv:
            err = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}}
            await resp.write(json.dumps(err).encode() + b"\n")
            return resp
        watcher = _Watcher(ns, selector, asyncio.Queue())
        backlog = [h for h in self.history if h[0] > rv and h[2]["metadata"]["namespace"] == ns and _matches(selector, h[2])]
        self.watchers.append(watcher)
        try:
            for _, kind, obj in backlog:
                await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                if item == "CLOSE":
                    break
                if item == "DROP":
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                _, kind, obj = item
                # Write events split across chunks, as a real chunked stream may deliver them.
                data = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                await resp.write(data[:10])
                await resp.write(data[10:])
        finally:
            self.watchers.remove(watcher)
        return resp


def _matches(selector: str, obj: dict[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeK8s, str]]:
    fake = FakeK8s()
    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.drop_watches(abrupt=False)
        await runner.cleanup()


def selectors() -> list[PoolSelector]:
    return [
        PoolSelector(pool="short", selector="pythia.ai/pool=short", namespace=NS, port="http"),
        PoolSelector(pool="long", selector="pythia.ai/pool=long", namespace=NS, port="http"),
    ]


def api_config(base_url: str, tmp_path: Path) -> K8sApiConfig:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return K8sApiConfig(base_url=base_url, token_file=str(token_file), namespace=NS)


async def eventually(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (bounded) until pred() holds; fail with the last state otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def new_discovery(base_url: str, tmp_path: Path, **kw: Any) -> K8sDiscovery:
    return K8sDiscovery(
        selectors(), api_config(base_url, tmp_path),
        watch_timeout_s=kw.pop("watch_timeout_s", 30), backoff_initial_s=0.02, backoff_max_s=0.1, **kw,
    )


async def test_initial_list_gives_ready_replicas_per_pool(fake_api: tuple[FakeK8s, str], tmp_path: Path) -> None:
    fake, url = fake_api
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None)]))
    fake.upsert(make_slice("vllm-short-b", "short", [("10.0.0.4", True), ("10.0.0.1", True)]))
    fake.upsert(make_slice("vllm-long-a", "long", [("10.0.1.1", True)]))
    fake.upsert(make_slice("other", "other", [("10.9.9.9", True)]))
    d = new_discovery(url, tmp_path, page_size=1)  # forces pagination of the short pool's list
    try:
        assert await d.start(sync_timeout_s=5)
        assert d.current() == {
            "short": ["http://10.0.0.1:8000", "http://10.0.0.3:8000", "http://10.0.0.4:8000"],
            "long": ["http://10.0.1.1:8000"],
        }
        lists = [q for k, q in fake.requests if k == "list"]
        assert {q["labelSelector"] for q in lists} == {"pythia.ai/pool=short", "pythia.ai/pool=long"}
    finally:
        await d.stop()


async def test_watch_events_reach_on_change_and_cluster_view(fake_api: tuple[FakeK8s, str], tmp_path: Path) -> None:
    fake, url = fake_api
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True)]))
    view = ClusterView.from_configs([
        PoolConfig("short", 16384, ("m",), ()),
        PoolConfig("long", 131072, ("m",), ()),
        PoolConfig("static", 8192, ("m",), ("http://127.0.0.1:9001",)),
    ])
    snapshots: list[dict[str, list[str]]] = []

    async def on_change(snapshot: dict[str, list[str]]) -> None:
        snapshots.append(snapshot)
        apply_discovered(view, snapshot)

    d = new_discovery(url, tmp_path, on_change=on_change)
    try:
        await d.start(sync_timeout_s=5)
        assert [r.url for r in view.pool("short").replicas] == ["http://10.0.0.1:8000"]  # type: ignore[union-attr]
        survivor = view.replica("http://10.0.0.1:8000")
        assert survivor is not None
        survivor.inflight = 3  # live state the gateway keeps about a replica

        await eventually(lambda: bool(fake.watchers) and len(fake.watchers) == 2)
        # a scale-up: new pod not ready yet, then ready; a new long-pool slice; then a pod terminating
        fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True), ("10.0.0.2", False)]))
        fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True), ("10.0.0.2", True)]))
        fake.upsert(make_slice("vllm-long-a", "long", [("10.0.1.1", True)]))
        await eventually(lambda: d.current()["long"] == ["http://10.0.1.1:8000"])
        assert d.current()["short"] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
        fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", False), ("10.0.0.2", True)]))
        await eventually(lambda: d.current()["short"] == ["http://10.0.0.2:8000"])
        fake.delete("vllm-long-a")
        await eventually(lambda: d.current()["long"] == [])

        assert [r.url for r in view.pool("short").replicas] == ["http://10.0.0.2:8000"]  # type: ignore[union-attr]
        assert view.pool("long").replicas == []  # type: ignore[union-attr]
        assert [r.url for r in view.pool("static").replicas] == ["http://127.0.0.1:9001"]  # type: ignore[union-attr]
        # the short pool went 1 -> 1,2 -> 2; the un-ready step (10.0.0.2 not ready) changed nothing
        short_steps = [s["short"] for i, s in enumerate(snapshots) if i == 0 or s["short"] != snapshots[i - 1]["short"]]
        assert short_steps == [
            ["http://10.0.0.1:8000"], ["http://10.0.0.1:8000", "http://10.0.0.2:8000"], ["http://10.0.0.2:8000"]
        ]
        assert fake.count("list") == 2  # one per pool: every change came through the watch
    finally:
        await d.stop()


async def test_survivor_state_is_kept_across_changes(fake_api: tuple[FakeK8s, str], tmp_path: Path) -> None:
    fake, url = fake_api
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True)]))
    view = ClusterView.from_configs([PoolConfig("short", 16384, ("m",), ()), PoolConfig("long", 131072, ("m",), ())])
    d = new_discovery(url, tmp_path, on_change=lambda snap: apply_discovered(view, snap))
    try:
        await d.start(sync_timeout_s=5)
        view.replica("http://10.0.0.1:8000").inflight = 3  # type: ignore[union-attr]
        await eventually(lambda: len(fake.watchers) == 2)
        fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True), ("10.0.0.5", True)]))
        await eventually(lambda: view.replica("http://10.0.0.5:8000") is not None)
        assert view.replica("http://10.0.0.1:8000").inflight == 3  # type: ignore[union-attr]
    finally:
        await d.stop()


@pytest.mark.parametrize("abrupt", [True, False], ids=["connection-reset", "server-timeout"])
async def test_dropped_watch_resumes_from_last_resource_version(
    fake_api: tuple[FakeK8s, str], tmp_path: Path, abrupt: bool
) -> None:
    fake, url = fake_api
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True)]))
    d = new_discovery(url, tmp_path)
    try:
        await d.start(sync_timeout_s=5)
        await eventually(lambda: len(fake.watchers) == 2)
        fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True), ("10.0.0.2", True)]))
        await eventually(lambda: len(d.current()["short"]) == 2)
        seen_rv = str(fake.rv)
        requests_before = len(fake.requests)
        fake.drop_watches(abrupt=abrupt)
        # a change while nobody watches: it must arrive through the resumed watch's backlog
        fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.2", True)]))
        await eventually(lambda: d.current()["short"] == ["http://10.0.0.2:8000"])
        resumed = [q for k, q in fake.requests[requests_before:] if k == "watch" and q["labelSelector"].endswith("short")]
        assert resumed and resumed[0]["resourceVersion"] == seen_rv
        assert fake.count("list") == 2  # no relist was needed
    finally:
        await d.stop()


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_relists_and_drops_what_was_deleted_meanwhile(
    fake_api: tuple[FakeK8s, str], tmp_path: Path, as_http: bool
) -> None:
    fake, url = fake_api
    fake.gone_as_http = as_http
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True)]))
    fake.upsert(make_slice("vllm-short-b", "short", [("10.0.0.2", True)]))
    d = new_discovery(url, tmp_path)
    try:
        await d.start(sync_timeout_s=5)
        assert len(d.current()["short"]) == 2
        await eventually(lambda: len(fake.watchers) == 2)
        fake.drop_watches(abrupt=True)
        # while disconnected: one slice goes away, one appears, and history is compacted
        fake.slices.pop("vllm-short-a")
        fake.upsert(make_slice("vllm-short-c", "short", [("10.0.0.3", True)]))
        fake.compact()
        await eventually(lambda: d.current()["short"] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"])
        assert d.stats.relists_after_gone >= 1
        assert fake.count("list") >= 3
        # and the relisted pool is watched again
        fake.upsert(make_slice("vllm-short-d", "short", [("10.0.0.4", True)]))
        await eventually(lambda: "http://10.0.0.4:8000" in d.current()["short"])
    finally:
        await d.stop()


async def test_api_errors_back_off_and_keep_known_replicas(fake_api: tuple[FakeK8s, str], tmp_path: Path) -> None:
    fake, url = fake_api
    fake.fail_next = 3  # the first lists fail with 500
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True)]))
    d = new_discovery(url, tmp_path)
    try:
        assert await d.start(sync_timeout_s=5)
        assert d.current()["short"] == ["http://10.0.0.1:8000"]
        assert d.stats.errors >= 3
        await eventually(lambda: len(fake.watchers) == 2)
        # the API goes bad for a while: the watch drops, reconnects fail, replicas stay as last known
        errors_before = d.stats.errors
        fake.fail_next = 4
        fake.drop_watches(abrupt=True)
        await eventually(lambda: d.stats.errors >= errors_before + 4)
        assert d.current()["short"] == ["http://10.0.0.1:8000"]
        # and recovers: new events flow again
        await eventually(lambda: len(fake.watchers) == 2)
        fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True), ("10.0.0.9", True)]))
        await eventually(lambda: "http://10.0.0.9:8000" in d.current()["short"])
    finally:
        await d.stop()


async def test_bookmarks_advance_resume_point_and_token_is_reread(
    fake_api: tuple[FakeK8s, str], tmp_path: Path
) -> None:
    fake, url = fake_api
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True)]))
    d = new_discovery(url, tmp_path)
    try:
        await d.start(sync_timeout_s=5)
        await eventually(lambda: len(fake.watchers) == 2)
        fake.bookmark()
        bookmark_rv = str(fake.rv)
        await asyncio.sleep(0.1)
        # the service-account token is rotated on disk; the next request must carry the new one
        fake.token = "rotated-token"
        (tmp_path / "token").write_text("rotated-token")
        before = len(fake.requests)
        fake.drop_watches(abrupt=False)
        await eventually(lambda: sum(k == "watch" for k, _ in fake.requests[before:]) >= 2)
        resumed = [q for k, q in fake.requests[before:] if k == "watch"]
        assert {q["resourceVersion"] for q in resumed} == {bookmark_rv}
        assert d.current()["short"] == ["http://10.0.0.1:8000"]
        assert d.stats.errors == 0  # no 401: the rotated token was read for the new watch
    finally:
        await d.stop()


async def test_unreachable_api_start_returns_unsynced_and_keeps_trying(tmp_path: Path) -> None:
    d = K8sDiscovery(
        selectors(), api_config("http://127.0.0.1:9", tmp_path), backoff_initial_s=0.02, backoff_max_s=0.05
    )
    try:
        assert await d.start(sync_timeout_s=0.3) is False
        assert d.current() == {"short": [], "long": []}
        assert d.stats.errors >= 2
    finally:
        await d.stop()


async def test_cli_prints_what_discovery_sees(fake_api: tuple[FakeK8s, str], tmp_path: Path) -> None:
    fake, url = fake_api
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True), ("10.0.0.2", False)]))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    pools = [{"name": "short", "max_context_tokens": 16384, "models": ["m"], "selector": "pythia.ai/pool=short", "port": "http"},
             {"name": "static", "max_context_tokens": 8192, "models": ["m"], "replicas": ["http://127.0.0.1:1"]}]
    env = {**os.environ, "PYTHIA_POOLS": json.dumps(pools), "PYTHIA_K8S_API_URL": url, "PYTHIA_K8S_NAMESPACE": NS,
           "PYTHIA_K8S_TOKEN_FILE": str(token)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.discovery", "--once", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"short": ["http://10.0.0.1:8000"]}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
async def test_https_api_is_trusted_only_through_the_given_ca(tmp_path: Path) -> None:
    cert, key = tmp_path / "ca.crt", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    fake = FakeK8s()
    fake.upsert(make_slice("vllm-short-a", "short", [("10.0.0.1", True)]))
    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    trusted = K8sDiscovery(selectors(), K8sApiConfig(f"https://127.0.0.1:{port}", str(token), str(cert), NS))
    untrusted = K8sDiscovery(selectors(), K8sApiConfig(f"https://127.0.0.1:{port}", str(token), None, NS),
                             backoff_initial_s=0.05, backoff_max_s=0.1)
    try:
        assert await trusted.start(sync_timeout_s=5)
        assert trusted.current()["short"] == ["http://10.0.0.1:8000"]
        assert await untrusted.start(sync_timeout_s=0.5) is False  # system CAs don't know this server
        assert untrusted.stats.errors >= 1 and untrusted.current()["short"] == []
    finally:
        await trusted.stop()
        await untrusted.stop()
        fake.drop_watches(abrupt=False)
        await runner.cleanup()
