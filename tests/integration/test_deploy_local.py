"""deploy/local/start.sh and stop.sh for real: gateway, Redis and simulated engines as background
processes on loopback, a request through the gateway, then everything stopped."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "deploy" / "local" / "start.sh"
STOP = ROOT / "deploy" / "local" / "stop.sh"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` consecutive free ports (the engines take consecutive ports)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        if all(_free(base + i) for i in range(count)):
            return list(range(base, base + count))
    raise RuntimeError("no free port range")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "run"
    yield directory
    # whatever happened, nothing we started survives the test
    subprocess.run([str(STOP), str(directory)], capture_output=True, timeout=60, env={**os.environ, "STOP_TIMEOUT_S": "5"})
    for pid in _pids(directory).values() if directory.exists() else []:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "pythia").exists() and shutil.which("pythia") is None,
                    reason="needs the installed `pythia` command")
def test_start_serves_through_the_gateway_and_stop_ends_everything(run_dir: Path) -> None:
    gateway, redis, *engines = _free_ports(5)
    env = {**os.environ, "PYTHIA_LOCAL_DIR": str(run_dir), "GATEWAY_PORT": str(gateway), "REDIS_PORT": str(redis),
           "SIM_BASE_PORT": str(engines[0]), "SHORT_REPLICAS": "2", "LONG_REPLICAS": "1", "TIME_SCALE": "20",
           "START_TIMEOUT_S": "60"}
    started = subprocess.run([str(START)], capture_output=True, text=True, timeout=120, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"http://127.0.0.1:{gateway}/v1" in started.stdout

    pids = _pids(run_dir)
    expected = {"gateway", "sim-short-1", "sim-short-2", "sim-long-1"}
    if shutil.which("redis-server"):
        expected.add("redis")
    assert set(pids) == expected
    assert all(_alive(pid) for pid in pids.values())
    pools = json.loads((run_dir / "pools.json").read_text())
    assert [(p["name"], len(p["replicas"])) for p in pools] == [("short", 2), ("long", 1)]

    body = json.dumps({"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    req = urllib.request.Request(f"http://127.0.0.1:{gateway}/v1/chat/completions", data=body.encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 4

    # a second start refuses to run over the first
    again = subprocess.run([str(START)], capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode != 0 and "already running" in again.stderr

    stopped = subprocess.run([str(STOP), str(run_dir)], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(pid) for pid in pids.values())
    assert not list(run_dir.glob("*.pid"))
    assert not any(_listening(p) for p in (gateway, *engines))


def test_start_refuses_ports_in_use(run_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "PYTHIA_LOCAL_DIR": str(run_dir), "GATEWAY_PORT": str(port)}
        result = subprocess.run([str(START)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0 and f"port {port} is already in use" in result.stderr
    assert not list(run_dir.glob("*.pid"))
