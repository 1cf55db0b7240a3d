"""`pythia serve`: N worker processes sharing one port (SO_REUSEPORT), each with its own uvloop loop.

The parent only supervises: it forwards SIGTERM/SIGINT to the workers (which stop
accepting, finish in-flight streams within the grace period and exit), restarts a
worker that died unexpectedly, and cleans the shared metrics directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import wait as wait_sentinels
from multiprocessing.process import BaseProcess

from pydantic import ValidationError

from gateway.logs import setup_logging
from gateway.settings import ConfigError, Settings, load_pools, parse_settings
from pools.types import PoolConfig

log = logging.getLogger("pythia.serve")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


async def serve_worker(settings: Settings, pools: list[PoolConfig], worker_index: int = 0) -> None:
    """Run one worker's server until SIGTERM/SIGINT, then shut down gracefully."""
    from aiohttp import web

    from gateway.app import build_app
    from gateway.http_errors import use_openai_errors

    app = build_app(settings, pools, worker_index=worker_index)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,  # a client that disconnects cancels its upstream request
        shutdown_timeout=settings.shutdown_grace_s,
    )
    await runner.setup()
    assert runner.server is not None  # set by setup()
    use_openai_errors(runner.server)  # malformed HTTP gets an OpenAI-shaped 400, not aiohttp's plain text
    fast = None
    if settings.fast_path:
        from gateway.fastpath import start_fast_server

        # hot endpoints on the lean protocol (gateway.fastpath); other requests continue on aiohttp's
        fast, server = await start_fast_server(
            app, runner.server, settings.host, settings.port, settings.body_limit_bytes, backlog=4096
        )
        addrs = [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets]
    else:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=4096)
        await site.start()
        addrs = [f"{a[0]}:{a[1]}" for a in runner.addresses]
    # start-up objects (modules, settings, the app, its pools) live as long as the worker: moved out of
    # the collector's generations, they are no longer rescanned by every full collection under load
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening", extra={"addresses": addrs, "policy": settings.policy, "pools": [p.name for p in pools]})
    await stop.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    if fast is not None:
        t0 = time.monotonic()
        server.close()  # stop accepting at once
        await fast.shutdown(settings.shutdown_grace_s)  # in-flight hot calls finish within the grace period
        # what is left of the grace period goes to connections aiohttp serves (runner reads it at cleanup)
        runner._shutdown_timeout = max(0.1, settings.shutdown_grace_s - (time.monotonic() - t0))
    await runner.cleanup()  # stop accepting, wait for in-flight handlers up to the grace period


def _run_worker(settings: Settings, pools: list[PoolConfig], worker_index: int) -> None:
    import uvloop

    # Forked with SIGTERM/SIGINT blocked and the parent's handlers installed: drop those handlers first
    # (a SIGTERM before the loop is up then simply ends this worker), then let signals in.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM is handled in the loop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    setup_logging(settings.log_level, settings.log_json)
    uvloop.run(serve_worker(settings, pools, worker_index))


def _setup_metrics_dir(settings: Settings) -> str | None:
    """Point prometheus_client at a shared directory; returns a temp dir we must remove later."""
    if settings.metrics_dir:
        os.makedirs(settings.metrics_dir, exist_ok=True)
        for name in os.listdir(settings.metrics_dir):
            if name.endswith(".db"):
                os.unlink(os.path.join(settings.metrics_dir, name))
        os.environ[MULTIPROC_ENV] = settings.metrics_dir
        return None
    if os.environ.get(MULTIPROC_ENV):
        return None
    path = tempfile.mkdtemp(prefix="pythia-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def _supervise(settings: Settings, pools: list[PoolConfig]) -> int:
    ctx = mp.get_context("fork")
    procs: dict[int, BaseProcess] = {}
    stopping = False
    restarts: list[float] = []

    live: dict[int, int] = {}  # slot -> pid of workers not yet reaped

    def spawn(slot: int) -> None:
        p = ctx.Process(target=_run_worker, args=(settings, pools, slot), name=f"pythia-worker-{slot}", daemon=False)
        # the child must not run our handler (it would swallow SIGTERM): it starts with these blocked
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        procs[slot] = p
        if p.pid is not None:
            live[slot] = p.pid

    def on_signal(signum: int, frame: object) -> None:
        # only os.kill here: waitpid-based calls (is_alive) must not re-enter from a signal handler
        nonlocal stopping
        stopping = True
        for pid in list(live.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(settings.workers):
        spawn(slot)
    log.info("started workers", extra={"workers": settings.workers, "port": settings.port})
    deadline: float | None = None
    while procs:
        wait_sentinels([p.sentinel for p in procs.values()], timeout=0.5)
        if stopping and deadline is None:
            deadline = time.monotonic() + settings.shutdown_grace_s + 5.0
            on_signal(signal.SIGTERM, None)  # again, for any worker that was being forked at the time
        for slot, p in list(procs.items()):
            if p.is_alive():
                continue
            p.join()
            live.pop(slot, None)
            from gateway.metrics import mark_process_dead

            if p.pid is not None:
                mark_process_dead(p.pid)
            del procs[slot]
            if stopping:
                continue
            log.error("worker exited unexpectedly", extra={"pid": p.pid, "exitcode": p.exitcode})
            now = time.monotonic()
            restarts[:] = [t for t in restarts if now - t < 60.0] + [now]
            if len(restarts) > 5 * settings.workers:
                log.error("workers keep dying; giving up")
                on_signal(signal.SIGTERM, None)
                continue
            spawn(slot)
        if deadline is not None and time.monotonic() > deadline:
            for pid in list(live.values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return 0


def _raise_open_files_limit() -> None:
    """Lift the soft open-files limit to the hard one: every held stream costs two descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def main(argv: list[str]) -> int:
    """Entry point of `pythia serve`; returns the process exit status."""
    try:
        settings = parse_settings(argv)
        pools = load_pools(settings.pools, settings.discovery)
        from pools.routing import make_policy

        make_policy(settings.policy)
    except ValidationError as e:
        print(f"pythia serve: invalid setting: {e}", file=sys.stderr)
        return 2
    except (ConfigError, KeyError) as e:
        print(f"pythia serve: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if settings.workers > 1 and settings.port == 0:
        print("pythia serve: --port 0 needs --workers 1 (workers must share one known port)", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    from pools.build_info import loaded_build

    # which build runs (compiled by `make compiled`, or the source); PYTHIA_EXPECT_BUILD makes a wrong
    # one fatal, so a benchmark of the compiled gateway cannot silently measure the interpreted one
    build = loaded_build()
    log.info("build", extra={"build": build})
    if settings.expect_build and settings.expect_build != build:
        print(f"pythia serve: PYTHIA_EXPECT_BUILD={settings.expect_build} but the {build} build is loaded",
              file=sys.stderr)
        return 2
    _raise_open_files_limit()
    if settings.workers == 1:
        if settings.metrics_dir:
            _setup_metrics_dir(settings)
        import uvloop

        from gateway.app import build_app  # noqa: F401  (import errors surface before the loop starts)

        uvloop.run(serve_worker(settings, pools))
        return 0
    tmp = _setup_metrics_dir(settings)
    try:
        return _supervise(settings, pools)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
