"""Integration fixtures: fake OpenAI upstreams and `pythia serve` as real processes on loopback."""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.conftest import VENV_BIN, Proc, ProcessGroup, free_port


def start_fake_upstream(group: ProcessGroup, name: str, model: str = "test-model", port: int | None = None) -> Proc:
    """tests/fakes/openai_server.py on a free port, ready when its /health answers."""
    port = port or free_port()
    return group.start(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", str(port), "--name", name, "--model", model],
        name=f"fake-{name}",
        url=f"http://127.0.0.1:{port}",
        ready_path="/health",
    )


def start_gateway(
    group: ProcessGroup, pools: list[dict[str, Any]], workers: int = 2, ready_path: str = "/ready", **settings: Any
) -> Proc:
    """`pythia serve` on a free loopback port with these pools; extra settings become PYTHIA_* variables."""
    port = free_port()
    env = {
        "PYTHIA_HOST": "127.0.0.1",
        "PYTHIA_PORT": str(port),
        "PYTHIA_WORKERS": str(workers),
        "PYTHIA_POOLS": json.dumps(pools),
        "PYTHIA_LOG_LEVEL": "WARNING",
    }
    for k, v in settings.items():
        env[f"PYTHIA_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return group.start(
        [str(VENV_BIN / "pythia"), "serve"],
        env=env,
        name="gateway",
        url=f"http://127.0.0.1:{port}",
        ready_path=ready_path,
    )
