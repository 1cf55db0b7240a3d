"""Lifecycle of the gateway's background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel background tasks, then wait until each has finished (its cancellation swallowed)."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError):
            await t


class PeriodicTask:
    """Runs `step` every `interval_s` seconds on the loop between `start()` and `stop()`; a failing step
    is logged and the next one runs on time (a background chore must never end the gateway)."""

    def __init__(self, name: str, interval_s: float, step: Callable[[], Awaitable[Any]], log: logging.Logger) -> None:
        self.name = name
        self.interval_s = interval_s
        self._step = step
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._step()
            except Exception:
                self._log.exception("%s failed", self.name)
