"""The aiohttp application: routes, and the gateway's start/stop tied to the app's lifecycle."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.errors import error_response
from gateway.metrics import GatewayMetrics, render
from gateway.prediction import PredictorLike, make_gateway_predictor
from gateway.proxy import Gateway
from gateway.settings import Settings
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
) -> web.Application:
    """An application serving the OpenAI API through a `Gateway` (reachable as app[GATEWAY_KEY])."""
    tracing = Tracing(settings.otel_endpoint, settings.otel_service_name)
    gw = Gateway(
        settings,
        pools,
        predictor if predictor is not None else make_gateway_predictor(settings),
        metrics,
        tracing.tracer,
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
        body, ctype = render(gw.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": ctype})

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
    app.router.add_get("/pythia/apps", apps)
    app.router.add_get("/pythia/apps/{app}/model", app_model)
    app.router.add_route("*", "/v1/{tail:.*}", gw.passthrough)

    async def on_startup(app: web.Application) -> None:
        await gw.start()

    async def on_cleanup(app: web.Application) -> None:
        await gw.stop()
        tracing.shutdown()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
