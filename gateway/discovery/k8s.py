"""Replica discovery from Kubernetes: watch the EndpointSlices of each pool's labelled Services.

One list+watch loop per pool (the informer pattern without client-go): list the slices, then watch
from the list's resourceVersion; a watch that times out is reopened from the last resourceVersion
seen, a 410 Gone (history compacted) triggers a fresh list, and API or network errors back off and
retry while the last known replicas stay in place, so an API-server outage never empties a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.discovery.config import K8sApiConfig, PoolSelector
from gateway.discovery.slices import ready_urls
from gateway.tasks import cancel_and_wait

log = logging.getLogger("pythia.discovery")

OnChange = Callable[[dict[str, list[str]]], Awaitable[None] | None]

SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


class WatchExpired(Exception):
    """The resourceVersion we resume from is too old (HTTP 410 / ERROR event code 410): relist."""


class ApiError(Exception):
    """The API answered with an error status (auth, missing RBAC, server trouble)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"kubernetes API {status}: {message}")
        self.status = status


@dataclass(slots=True)
class DiscoveryStats:
    """Counters an operator (or a test) can read to see how the watch loops are doing."""

    lists: int = 0
    watches: int = 0
    relists_after_gone: int = 0
    errors: int = 0
    events: int = 0


@dataclass(slots=True)
class _PoolWatch:
    selector: PoolSelector
    slices: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    resource_version: str | None = None
    urls: list[str] = field(default_factory=list)
    synced: asyncio.Event = field(default_factory=asyncio.Event)


class K8sDiscovery:
    """Per pool, the base URLs of the ready replicas behind the Services its label selector matches.

    `current()` is a cheap snapshot; `on_change(snapshot)` (sync or async) runs after every change.
    """

    def __init__(
        self,
        pools: Sequence[PoolSelector],
        api: K8sApiConfig,
        on_change: OnChange | None = None,
        *,
        watch_timeout_s: int = 240,
        request_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        page_size: int = 500,
    ) -> None:
        self._pools = [_PoolWatch(selector=p) for p in pools]
        self._api = api
        self._on_change = on_change
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._page_size = page_size
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = DiscoveryStats()

    # ---- public interface -------------------------------------------------------------------------

    async def start(self, sync_timeout_s: float = 10.0) -> bool:
        """Start one watch loop per pool and wait up to `sync_timeout_s` for every first list.

        Returns whether every pool was listed; if not, the loops keep retrying in the background.
        """
        if self._tasks:
            return self.synced
        ssl_ctx: ssl.SSLContext | bool = False
        if self._api.base_url.startswith("https://"):
            ssl_ctx = ssl.create_default_context(cafile=self._api.ca_file or None)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=0))
        self._tasks = [
            asyncio.create_task(self._run(pw), name=f"k8s-discovery-{pw.selector.pool}") for pw in self._pools
        ]
        if await self.wait_synced(sync_timeout_s):
            return True
        log.warning("k8s discovery: not every pool listed within %.1fs; retrying in the background", sync_timeout_s)
        return False

    async def stop(self) -> None:
        """Cancel the watch loops and close the HTTP session."""
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def current(self) -> dict[str, list[str]]:
        """Pool name -> sorted ready replica base URLs, as last seen (a fresh dict each call)."""
        return {pw.selector.pool: list(pw.urls) for pw in self._pools}

    @property
    def synced(self) -> bool:
        """True once every pool has been listed at least once."""
        return all(pw.synced.is_set() for pw in self._pools)

    async def wait_synced(self, timeout_s: float) -> bool:
        """Wait until every pool has been listed once, or the timeout; returns `synced`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(pw.synced.wait() for pw in self._pools)), timeout_s)
        return self.synced

    # ---- the list + watch loop --------------------------------------------------------------------

    async def _run(self, pw: _PoolWatch) -> None:
        failures = 0
        while True:
            try:
                if pw.resource_version is None:
                    await self._list(pw)
                    failures = 0
                started = asyncio.get_running_loop().time()
                got_events = await self._watch(pw)
                if got_events:
                    failures = 0
                elif asyncio.get_running_loop().time() - started < 1.0:
                    # An empty watch that closed at once: don't hammer the API server.
                    await asyncio.sleep(self._backoff_initial_s)
            except asyncio.CancelledError:
                raise
            except WatchExpired:
                self.stats.relists_after_gone += 1
                log.info("k8s discovery: pool %s: resourceVersion expired, relisting", pw.selector.pool)
                pw.resource_version = None
                failures += 1
                if failures > 1:  # a second 410 in a row without progress: don't spin
                    await asyncio.sleep(self._backoff(failures))
            except (aiohttp.ClientError, TimeoutError, ApiError, ValueError) as exc:
                self.stats.errors += 1
                failures += 1
                delay = self._backoff(failures)
                log.warning(
                    "k8s discovery: pool %s: %s: %s; keeping %d known replicas, retrying in %.1fs",
                    pw.selector.pool, type(exc).__name__, exc, len(pw.urls), delay,
                )
                await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        base = min(self._backoff_max_s, self._backoff_initial_s * 2 ** max(0, failures - 1))
        return base * random.uniform(0.5, 1.0)  # jitter: gateway replicas don't retry in lockstep

    async def _list(self, pw: _PoolWatch) -> None:
        """Replace the pool's slices with a fresh (paginated) list and remember its resourceVersion."""
        slices: dict[str, Mapping[str, Any]] = {}
        cont = ""
        timeout = aiohttp.ClientTimeout(total=self._request_timeout_s)
        while True:
            params = {"labelSelector": pw.selector.selector, "limit": str(self._page_size)}
            if cont:
                params["continue"] = cont
            async with self._http().get(
                self._url(pw), params=params, headers=self._headers(), timeout=timeout
            ) as resp:
                body = await resp.read()
                _raise_for_status(resp.status, body)
            doc = orjson.loads(body)
            for item in doc.get("items") or []:
                slices[_name(item)] = item
            meta = doc.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
        self.stats.lists += 1
        pw.slices = slices
        pw.resource_version = str(meta.get("resourceVersion") or "") or None
        if pw.resource_version is None:
            raise ValueError("list response without metadata.resourceVersion")
        await self._refresh(pw)
        pw.synced.set()

    async def _watch(self, pw: _PoolWatch) -> bool:
        """Follow one watch stream until the server closes it; True when it delivered any event."""
        assert pw.resource_version is not None
        params = {
            "labelSelector": pw.selector.selector,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": pw.resource_version,
            "timeoutSeconds": str(self._watch_timeout_s),
        }
        # The server ends the stream after timeoutSeconds; a silent connection longer than that is dead.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._request_timeout_s, sock_read=self._watch_timeout_s + 30
        )
        self.stats.watches += 1
        got_events = False
        async with self._http().get(self._url(pw), params=params, headers=self._headers(), timeout=timeout) as resp:
            if resp.status != 200:
                _raise_for_status(resp.status, await resp.read())
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        await self._apply_event(pw, orjson.loads(line))
                        got_events = True
            if buf.strip():
                await self._apply_event(pw, orjson.loads(buf))
                got_events = True
        return got_events

    async def _apply_event(self, pw: _PoolWatch, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                raise WatchExpired(obj.get("message", "gone"))
            raise ApiError(code, str(obj.get("message", "watch error")))
        self.stats.events += 1
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            pw.slices[_name(obj)] = obj
        elif kind == "DELETED":
            pw.slices.pop(_name(obj), None)
        elif kind != "BOOKMARK":
            log.debug("k8s discovery: ignoring watch event type %r", kind)
        if rv:
            pw.resource_version = str(rv)
        if kind != "BOOKMARK":
            await self._refresh(pw)

    async def _refresh(self, pw: _PoolWatch) -> None:
        urls = ready_urls(pw.slices.values(), pw.selector.port, pw.selector.scheme)
        if urls == pw.urls:
            return
        log.info("k8s discovery: pool %s: %d ready replicas %s", pw.selector.pool, len(urls), urls)
        pw.urls = urls
        if self._on_change is None:
            return
        try:
            result = self._on_change(self.current())
            if inspect.isawaitable(result):
                await result
        except Exception:  # a faulty callback must not kill the watch loop
            log.exception("k8s discovery: on_change callback failed")

    # ---- HTTP helpers -----------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("K8sDiscovery.start() has not been called")
        return self._session

    def _url(self, pw: _PoolWatch) -> str:
        return self._api.base_url.rstrip("/") + SLICES_PATH.format(namespace=pw.selector.namespace)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api.token_file:
            # Re-read every time: projected service-account tokens are rotated on disk.
            try:
                token = Path(self._api.token_file).read_text().strip()
            except OSError as exc:
                raise ApiError(401, f"cannot read token file {self._api.token_file}: {exc}") from exc
            headers["Authorization"] = f"Bearer {token}"
        return headers


def _raise_for_status(status: int, body: bytes) -> None:
    if status == 200:
        return
    message = body[:300].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        message = str(orjson.loads(body).get("message", message))
    if status == 410:
        raise WatchExpired(message)
    raise ApiError(status, message)


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("name") or meta.get("uid") or id(obj))
