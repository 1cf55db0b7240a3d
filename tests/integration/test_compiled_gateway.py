"""The compiled gateway (`make compiled`) as `make bench-gateway` runs it: it starts, says it is compiled,
and proxies chat calls with the full `pythia` policy. Skips when `.venv-compiled` has not been built."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from gateway.bench import overhead
from gateway.bench.wrk_body import chat_body
from tests.conftest import free_port
from tests.unit.test_compiled_build import COMPILED_VENV, compiled_build_is_current

pytestmark = pytest.mark.skipif(not compiled_build_is_current(), reason="no .venv-compiled built from these sources (make compiled)")


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def test_compiled_gateway_serves_chat_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overhead, "COMPILED_VENV", COMPILED_VENV)
    mocks = overhead.Procs()
    try:
        port = free_port()
        mocks.start([sys.executable, "-m", "gateway.bench.mock_upstream", "--port", str(port)])
        upstream = f"http://127.0.0.1:{port}"
        overhead.wait_http(upstream + "/health")
        # the target sets PYTHIA_EXPECT_BUILD=compiled: `pythia serve` would exit at start on the source
        with overhead.target("pythia-compiled:pythia", [upstream], tmp_path) as (base, pgids):
            for _ in range(20):
                status, answer = _post(base + "/v1/chat/completions", chat_body(False))
                assert status == 200 and answer["choices"][0]["message"]["content"]
            # and the process really runs the compiled modules: mypyc's shared library is mapped
            maps = Path(f"/proc/{pgids[0]}/maps").read_text()
            assert "__mypyc" in maps and str(COMPILED_VENV) in maps
    finally:
        mocks.stop()
