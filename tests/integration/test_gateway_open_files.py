"""`pythia serve` lifts its own open-files limit: every held stream costs two descriptors."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from tests.conftest import ProcessGroup, free_port
from tests.integration.conftest import VENV_BIN


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


def test_gateway_raises_soft_open_files_limit_to_the_hard_one(procs: ProcessGroup) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("hard open-files limit too low to show a raise")
    port = free_port()
    pools = [{"name": "p", "max_context_tokens": 4096, "models": ["m"], "replicas": [f"http://127.0.0.1:{free_port()}"]}]
    env = {"PYTHIA_HOST": "127.0.0.1", "PYTHIA_PORT": str(port), "PYTHIA_WORKERS": "1",
           "PYTHIA_POOLS": json.dumps(pools), "PYTHIA_LOG_LEVEL": "WARNING"}  # fmt: skip
    # started with a soft limit of 256, as a default systemd or container setup might give it
    gw = procs.start(["bash", "-c", f"ulimit -Sn 256 && exec {VENV_BIN / 'pythia'} serve"], env=env, name="gateway",
                     url=f"http://127.0.0.1:{port}", ready_path="/health")  # fmt: skip
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert _soft_nofile(gw.popen.pid) == want > 256
