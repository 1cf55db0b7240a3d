"""The live head-to-head harness (`python -m gateway.bench.live_routers`) end to end, Pythia targets only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_each_target_runs_the_same_workflows_on_fresh_engines_into_one_result(tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.bench.live_routers", "--targets", "pythia:pythia,pythia:round_robin",
         "--replicas", "2", "--time-scale", "50", "--rate", "2", "--duration", "2", "--think-scale", "0.02",
         "--output-scale", "0.1", "--baseline", "pythia:round_robin", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"pythia:pythia", "pythia:round_robin"}
    entries = list(doc["results"].values())
    # the same workflows went through both, every call answered, each on its own fresh engines
    sums = [e["summary"] for e in entries]
    assert sums[0]["workflows"] == sums[1]["workflows"] > 0
    assert sums[0]["requests"] == sums[1]["requests"] > 0
    for s in sums:
        assert s["errors"] == 0 and s["workflows_completed"] == s["workflows"]
    assert not set(entries[0]["metrics_endpoints"]) & set(entries[1]["metrics_endpoints"])  # other engines
    assert "pythia:round_robin" in proc.stdout and "pythia:pythia" in proc.stdout
