"""`pythia-loadgen run` / `replay` against real processes: a simulated engine, and the gateway in front of two."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from loadgen.cli import main
from tests.conftest import VENV_BIN, Proc, ProcessGroup, free_port
from tests.integration.conftest import start_gateway

MODEL = "llama-3.1-8b"
FAST = ["--think-scale", "0.05", "--prompt-scale", "0.2", "--output-scale", "0.1", "--no-progress"]


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessGroup) -> Iterator[tuple[list[Proc], Proc]]:
    engines = []
    for i in range(2):
        port = free_port()
        engines.append(module_procs.start(
            [str(VENV_BIN / "pythia"), "sim-engine", "--port", str(port), "--time-scale", "50", "--seed", str(i)],
            name=f"lg-sim-{i}", url=f"http://127.0.0.1:{port}", ready_path="/health"))
    pools = [{"name": "short", "max_context_tokens": 16384, "models": [MODEL], "replicas": [engines[0].url]},
             {"name": "long", "max_context_tokens": 131072, "models": [MODEL], "replicas": [engines[1].url]}]
    yield engines, start_gateway(module_procs, pools, workers=1, policy="least_loaded")


def result(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def test_run_against_a_simulated_engine(cluster: tuple[list[Proc], Proc], tmp_path: Path) -> None:
    engine = cluster[0][0]
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    rc = main(["run", "--target", engine.url, "--workload", "chat", "--rate", "4", "--duration", "2", *FAST,
               "--out", str(out), "--plot", str(png)])
    assert rc == 0
    doc = result(out)
    s = doc["results"]["target"]["summary"]
    assert doc["config"]["model"] == MODEL  # discovered from /v1/models
    assert s["requests"] > 0 and s["errors"] == 0 and s["workflows_completed"] == s["workflows"] > 0
    assert s["mean_ttft_s"] > 0 and s["mean_e2e_s"] >= s["mean_ttft_s"] and s["itl_s"]["p50"] is not None
    assert s["prefix_hit_rate_source"] == "metrics" and s["prefix_hit_rate"] > 0  # chat turns resend the history
    assert s["preemptions"] == 0
    assert png.stat().st_size > 10_000


def test_run_and_replay_through_the_gateway(cluster: tuple[list[Proc], Proc], tmp_path: Path) -> None:
    engines, gw = cluster
    out = tmp_path / "gw.json"
    assert main(["run", "--target", gw.url, "--workload", "mixed", "--rate", "3", "--duration", "2", *FAST,
                 "--out", str(out)]) == 0
    doc = result(out)
    s = doc["results"]["target"]["summary"]
    assert s["requests"] > 0 and s["errors"] == 0
    assert set(doc["results"]["target"]["metrics_endpoints"]) == {e.url for e in engines}  # found via /pythia/replicas
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 100 * i, "input_length": 600, "output_length": 4, "hash_ids": [0, 100 + i]} for i in range(5)]
    rows += [{"app": "a", "workflow": "w", "agent": "p", "prompt": "plan it", "output_tokens": 3, "timestamp_ms": 50},
             {"app": "a", "workflow": "w", "agent": "s", "prompt": "go", "output_tokens": 3, "after_ms": 10,
              "parallel_group": 1},
             {"app": "a", "workflow": "w", "agent": "s", "prompt": "go2", "output_tokens": 3, "after_ms": 10,
              "parallel_group": 1}]
    trace.write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    out2 = tmp_path / "replay.json"
    assert main(["replay", "--trace", str(trace), "--target", gw.url, "--speed", "4", "--no-progress",
                 "--out", str(out2)]) == 0
    s2 = result(out2)["results"]["target"]["summary"]
    assert (s2["requests"], s2["errors"], s2["workflows"], s2["workflows_completed"]) == (8, 0, 6, 6)


def test_ctrl_c_stops_cleanly_and_still_reports(cluster: tuple[list[Proc], Proc], tmp_path: Path) -> None:
    out = tmp_path / "int.json"
    p = subprocess.Popen([str(VENV_BIN / "pythia-loadgen"), "run", "--target", cluster[0][0].url, "--workload", "chat",
                          "--rate", "2", "--duration", "60", *FAST, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        p.send_signal(signal.SIGINT)
        stdout, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, stdout.decode()[-2000:]
    doc = result(out)
    assert doc["results"]["target"]["cancelled"] is True
    assert doc["results"]["target"]["summary"]["requests"] > 0
