"""Where learned counters go: the Store protocol and the embedded MemoryStore."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class SnapshotSink(Protocol):
    """What a store calls back into (the Predictor) when it has fresher shared state."""

    def load_snapshot(self, app: str, counts: Mapping[str, float], texts: Mapping[str, str],
                      pending: Mapping[str, float]) -> None: ...

    def merge_live(self, app: str, wid: str, state: Mapping[str, Any]) -> None: ...

    def finish_checked(self, app: str, wid: str, mine: bool) -> None: ...


class Store(Protocol):
    """Persistence of the model counters. All methods called on the hot path are sync and cheap."""

    def record(self, app: str, key: str, delta: float) -> None: ...

    def record_text(self, app: str, role: str, text: str) -> None: ...

    def record_live(self, app: str, wid: str, state: dict[str, Any]) -> None: ...

    def want_live(self, app: str, wid: str) -> None: ...

    def end_live(self, app: str, wid: str, calls: int) -> None: ...

    def check_finish(self, app: str, wid: str, calls: int) -> None: ...

    async def start(self, sink: SnapshotSink) -> None: ...

    async def stop(self) -> None: ...

    def stats(self) -> dict[str, float]: ...


class MemoryStore:
    """One process, no server: the Predictor's own in-memory model is the whole truth."""

    def record(self, app: str, key: str, delta: float) -> None:
        """Nothing to persist."""

    def record_text(self, app: str, role: str, text: str) -> None:
        """Nothing to persist."""

    def record_live(self, app: str, wid: str, state: dict[str, Any]) -> None:
        """Nothing to share."""

    def want_live(self, app: str, wid: str) -> None:
        """Nothing to fetch."""

    def end_live(self, app: str, wid: str, calls: int) -> None:
        """Nothing to mark."""

    def check_finish(self, app: str, wid: str, calls: int) -> None:
        """Never called: a memory predictor ends its workflows itself."""

    async def start(self, sink: SnapshotSink) -> None:
        """No background work."""

    async def stop(self) -> None:
        """No background work."""

    def stats(self) -> dict[str, float]:
        """No counters."""
        return {}
