"""Real vLLM (CPU build) replicas for the `real_vllm` tests, started once per session by deploy/local/vllm-cpu.sh.

The script installs vLLM and converts the model on first use (minutes); `.ci/run` runs
`deploy/local/vllm-cpu.sh --prepare-only` first so the fixture only pays the ~2 min startup.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, ProcessGroup, free_port

SCRIPT = REPO_ROOT / "deploy" / "local" / "vllm-cpu.sh"
MODEL = "smollm2-135m"
MAX_MODEL_LEN = 2048


@dataclass
class Replica:
    url: str
    port: int
    log: Path

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


def metric_sum(base_url: str, name: str) -> float:
    """Sum of one Prometheus series over its labels, read from the replica's own /metrics."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _script(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def vllm_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    """Two real vLLM replicas on free loopback ports, stopped after the session."""
    run_dir = tmp_path_factory.mktemp("vllm-run")
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    # Generous readiness wait: CI shares two cores between both replicas while they import.
    env = {**os.environ, "PYTHIA_VLLM_RUN_DIR": str(run_dir), "PYTHIA_VLLM_READY_TIMEOUT": "1200"}
    arg = ",".join(map(str, ports))
    t0 = time.monotonic()
    try:
        # Eager mode: torch.compile on two shared cores can take many minutes before the first
        # request, and these tests check the gateway's behaviour, not the engine's step speed.
        done = _script(["--ports", arg, "--", "--enforce-eager"], env, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"vllm-cpu.sh failed ({done.returncode}):\n{done.stderr[-6000:]}")
        print(f"\nreal vLLM replicas {arg} ready in {time.monotonic() - t0:.0f} s")
        yield [Replica(f"http://127.0.0.1:{p}", p, run_dir / f"vllm-{p}.log") for p in ports]
    finally:
        _script(["--stop", "--ports", arg], env, timeout=120)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[ProcessGroup]:
    """`pythia serve` processes started by one test, stopped when it ends."""
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.close()


def pool_of(urls: list[str]) -> list[dict[str, object]]:
    """PYTHIA_POOLS for one pool of the given replicas serving the test model."""
    return [{"name": "cpu", "max_context_tokens": MAX_MODEL_LEN, "models": [MODEL], "replicas": urls}]
