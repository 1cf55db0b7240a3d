"""The aiohttp application: routes, and the gateway's start/stop tied to the app's lifecycle."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
from aiohttp import web

from gateway.access import install_access
from gateway.errors import error_response
from gateway.metrics import METRICS_SETTLE_S, GatewayMetrics, multiprocess_enabled, render
from gateway.prediction import PredictorLike, make_gateway_predictor
from gateway.proxy import Gateway
from gateway.pythia_live import install_pythia_mechanisms
from gateway.settings import Settings, read_pool_entries
from gateway.tracing import Tracing
from pools.types import PoolConfig

GATEWAY_KEY = web.AppKey("gateway", Gateway)
_OK = orjson.dumps({"status": "ok"})


def build_app(
    settings: Settings,
    pools: list[PoolConfig],
    predictor: PredictorLike | None = None,
    metrics: GatewayMetrics | None = None,
    worker_index: int = 0,
    tracer: Any = None,
) -> web.Application:
    """An application serving the OpenAI API through a `Gateway` (reachable as app[GATEWAY_KEY]).

    `tracer` overrides the OTLP tracer made from the settings (tests pass an in-memory one).
    """
    tracing = Tracing("" if tracer is not None else settings.otel_endpoint, settings.otel_service_name)
    gw = Gateway(
        settings,
        pools,
        predictor if predictor is not None else make_gateway_predictor(settings),
        metrics,
        tracer if tracer is not None else tracing.tracer,
        worker_index,
    )
    # aiohttp enforces the body limit while reading; +1 so that exactly the limit is still accepted
    app = web.Application(client_max_size=settings.body_limit_bytes + 1)
    app[GATEWAY_KEY] = gw

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=_OK, content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        if gw.ready():
            return web.Response(body=_OK, content_type="application/json")
        return error_response(503, "no_healthy_replica", "no healthy replica", retry_after_s=1.0)

    async def metrics_endpoint(request: web.Request) -> web.Response:
        gw.metrics.flush()
        if multiprocess_enabled():
            # other workers publish their counts at the end of their current loop iteration: let them land
            await asyncio.sleep(METRICS_SETTLE_S)
        body, ctype = render(gw.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def replicas(request: web.Request) -> web.Response:
        view = [
            {
                "pool": p.name,
                "max_context_tokens": p.max_context_tokens,
                "models": list(p.models),
                "replicas": [
                    {
                        "url": r.url, "healthy": r.healthy, "inflight": r.inflight,
                        "num_running": r.num_running, "num_waiting": r.num_waiting, "kv_usage": r.kv_usage,
                        "kv_capacity_tokens": r.kv_capacity_tokens, "prefix_cache_hits": r.prefix_cache_hits,
                        "prefix_cache_queries": r.prefix_cache_queries, "num_preemptions": r.num_preemptions,
                        "consecutive_failures": r.consecutive_failures,
                    }
                    for r in p.replicas
                ],
            }
            for p in gw.view.pools
        ]  # fmt: skip
        return web.Response(body=orjson.dumps({"pid": os.getpid(), "pools": view}), content_type="application/json")

    async def apps(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"apps": gw.predictor.apps()}), content_type="application/json")

    async def app_model(request: web.Request) -> web.Response:
        name = request.match_info["app"]
        if name not in gw.predictor.apps():
            return error_response(404, "app_not_found", f"no workflow model for app '{name}'")
        model = gw.predictor.model_json(name)
        return web.Response(body=orjson.dumps(model), content_type="application/json")

    app.router.add_post("/v1/chat/completions", gw.chat_completions)
    app.router.add_post("/v1/completions", gw.completions)
    app.router.add_get("/v1/models", gw.models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/pythia/replicas", replicas)
    app.router.add_get("/pythia/apps", apps)
    app.router.add_get("/pythia/apps/{app}/model", app_model)
    app.router.add_route("*", "/v1/{tail:.*}", gw.passthrough)

    discovery = _make_discovery(settings, gw)

    async def on_startup(app: web.Application) -> None:
        await gw.start()
        if discovery is not None:
            await discovery.start()  # waits (bounded) for the first list; keeps watching after
            gw.set_replicas(discovery.current())

    async def on_cleanup(app: web.Application) -> None:
        if discovery is not None:
            await discovery.stop()
        await gw.stop()
        tracing.shutdown()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    # admission queue, pre-warm sender, autoscaling signal (GET /pythia/autoscale), per PYTHIA_* settings
    install_pythia_mechanisms(app, gw)
    install_access(app, gw)  # API keys, admin key, rate limits (all off unless configured)
    return app


def _make_discovery(settings: Settings, gw: Gateway) -> Any:
    """A Kubernetes EndpointSlice watcher feeding gw.set_replicas, when PYTHIA_DISCOVERY=k8s."""
    if settings.discovery != "k8s":
        return None
    from gateway.discovery import DiscoverySettings, K8sDiscovery, parse_pool_selectors

    ds = DiscoverySettings(
        discovery="k8s",
        k8s_namespace=settings.k8s_namespace,
        k8s_api_url=settings.k8s_api_url,
        k8s_token_file=settings.k8s_token_file,
        k8s_ca_file=settings.k8s_ca_file,
        k8s_watch_timeout_s=settings.k8s_watch_timeout_s,
    )
    api = ds.api_config()
    selectors = parse_pool_selectors(read_pool_entries(settings.pools), api.namespace)

    def on_change(snapshot: dict[str, list[str]]) -> None:
        gw.set_replicas(snapshot)

    return K8sDiscovery(selectors, api, on_change=on_change, watch_timeout_s=settings.k8s_watch_timeout_s)
