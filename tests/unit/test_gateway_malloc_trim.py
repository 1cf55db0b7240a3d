"""The periodic malloc_trim: installed per PYTHIA_MALLOC_TRIM_INTERVAL_S, off at 0, harmless without glibc."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from gateway.malloc_trim import MallocTrimmer, find_malloc_trim
from gateway.prediction import ColdPredictor
from gateway.proxy import Gateway
from gateway.pythia_live import MALLOC_TRIM_KEY, install_pythia_mechanisms
from gateway.settings import Settings
from pools.types import PoolConfig

POOLS = [PoolConfig("short", 16384, ("m",), ("http://h:1",))]


def recorder(calls: list[int]) -> Callable[[int], int]:
    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    return trim


def installed(interval_s: float) -> MallocTrimmer:
    gw = Gateway(Settings.model_validate({"malloc_trim_interval_s": interval_s}), POOLS, ColdPredictor())
    app = web.Application()
    install_pythia_mechanisms(app, gw)
    return app[MALLOC_TRIM_KEY]


async def test_trims_periodically_while_running_and_stops() -> None:
    calls: list[int] = []
    t = MallocTrimmer(0.01, trim=recorder(calls))
    await t.start()
    for _ in range(500):  # bounded wait for two trims
        if len(calls) >= 2:
            break
        await asyncio.sleep(0.01)
    await t.stop()
    assert len(calls) >= 2 and set(calls) == {0}
    after = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == after  # stopped


async def test_interval_zero_never_trims() -> None:
    calls: list[int] = []
    t = MallocTrimmer(0, trim=recorder(calls))
    await t.start()
    await asyncio.sleep(0.03)
    await t.stop()
    assert not t.active and calls == []


def test_wired_from_settings_and_callable_on_this_libc() -> None:
    assert installed(60.0).interval_s == 60.0 and installed(0).active is False
    trim = find_malloc_trim()
    if trim is not None:  # glibc (Linux CI): a real trim returns 0 or 1 and leaves the process fine
        assert MallocTrimmer(60.0, trim).trim_now() in (True, False)
    else:
        assert MallocTrimmer(60.0, None).trim_now() is False
