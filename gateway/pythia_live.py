"""Wires the Pythia mechanisms that need I/O into a gateway app: admission queue, pre-warm sender,
autoscaling signal (`GET /pythia/autoscale`, `pythia_pool_desired_replicas`), the TTL of the router's
per-workflow state and the periodic malloc_trim. One call from build_app."""

from __future__ import annotations

from aiohttp import web

from gateway.admission import AdmissionController, admission_enabled
from gateway.autoscale import AutoscaleSignal
from gateway.malloc_trim import MallocTrimmer
from gateway.prewarm import PrewarmSender
from gateway.proxy import Gateway
from gateway.workflow_ttl import WorkflowStateReaper

ADMISSION_KEY = web.AppKey("pythia_admission", AdmissionController)
PREWARM_KEY = web.AppKey("pythia_prewarm", PrewarmSender)
AUTOSCALE_KEY = web.AppKey("pythia_autoscale", AutoscaleSignal)
WORKFLOW_TTL_KEY = web.AppKey("pythia_workflow_ttl", WorkflowStateReaper)
MALLOC_TRIM_KEY = web.AppKey("pythia_malloc_trim", MallocTrimmer)


def install_pythia_mechanisms(app: web.Application, gw: Gateway) -> None:
    """Install the hooks on `gw` per its settings, add the endpoint, and tie background work to the app."""
    s = gw.settings
    admission = AdmissionController(gw) if admission_enabled(s.admission, gw.policy) else None
    prewarm = PrewarmSender(gw) if s.prewarm and gw.policy.actions is not None else None
    autoscale = AutoscaleSignal(gw)
    if admission is not None:
        admission.install()
        app[ADMISSION_KEY] = admission
    if prewarm is not None:
        prewarm.install()
        app[PREWARM_KEY] = prewarm
    autoscale.install()
    app[AUTOSCALE_KEY] = autoscale
    app.router.add_get("/pythia/autoscale", autoscale.handle)
    # bounded memory: the router's per-workflow maps forget workflows idle for PYTHIA_WORKFLOW_TTL_S
    reaper = WorkflowStateReaper(gw.routing_state, s.workflow_ttl_s)
    gw.policy.after_pick = (*gw.policy.after_pick, reaper.touch)
    app[WORKFLOW_TTL_KEY] = reaper
    trimmer = app[MALLOC_TRIM_KEY] = MallocTrimmer(s.malloc_trim_interval_s)  # RSS follows live memory
    parts = [x for x in (admission, prewarm, autoscale, reaper, trimmer) if x is not None]

    async def start(app: web.Application) -> None:
        for x in parts:
            await x.start()

    async def stop(app: web.Application) -> None:
        for x in parts:
            await x.stop()

    app.on_startup.append(start)
    app.on_cleanup.insert(0, stop)  # before the gateway closes its upstream pool: queued calls get an answer
