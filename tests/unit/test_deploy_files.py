"""deploy/: the Dockerfile, the compose file and the launch scripts, checked offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from gateway.settings import Settings, load_pools
from pools.sim.cli import build_parser as sim_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPTS = [DEPLOY / "local" / "start.sh", DEPLOY / "local" / "stop.sh", DEPLOY / "local" / "lib.sh",
           DEPLOY / "gpu" / "start-vllm-pools.sh"]


def tool(name: str) -> str:
    """A linter installed with the dev extra (next to this Python), else from PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not installed: pip install -e '.[dev]'")
    return found


# ---- Dockerfile --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(fileobj=(DEPLOY / "Dockerfile").open("rb"))
    return parser


def _instructions(df: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in df.structure if i["instruction"] == name]


def _final_stage(df: DockerfileParser) -> list[dict[str, Any]]:
    froms = [n for n, i in enumerate(df.structure) if i["instruction"] == "FROM"]
    return df.structure[froms[-1]:]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_pythia_serve_as_non_root_on_slim_python(dockerfile: DockerfileParser) -> None:
    args = {k: v for k, v in (a.split("=", 1) for a in _instructions(dockerfile, "ARG") if "=" in a)}
    base = args["PYTHON_IMAGE"]
    assert base.startswith("python:3.") and "slim" in base
    final = _final_stage(dockerfile)
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = json.loads(_instructions(dockerfile, "ENTRYPOINT")[-1])
    cmd = json.loads(_instructions(dockerfile, "CMD")[-1])
    assert entry + cmd == ["pythia", "serve"]
    health = _instructions(dockerfile, "HEALTHCHECK")[-1]
    assert "/health" in health and "PYTHIA_PORT" in health


def test_dockerfile_env_defaults_are_gateway_settings(dockerfile: DockerfileParser) -> None:
    env = dockerfile.envs
    pythia = {k: v for k, v in env.items() if k.startswith("PYTHIA_")}
    known = {f"PYTHIA_{name.upper()}" for name in Settings.model_fields} | {"PYTHIA_DISCOVERY"}
    assert pythia and set(pythia) <= known, set(pythia) - known
    assert pythia["PYTHIA_HOST"] == "0.0.0.0"
    assert _instructions(dockerfile, "EXPOSE")[-1] == pythia["PYTHIA_PORT"]


def test_dockerfile_copies_what_the_wheel_needs(dockerfile: DockerfileParser) -> None:
    packages = set()
    for value in _instructions(dockerfile, "COPY"):
        if value.startswith("--from"):
            continue
        *sources, _dest = value.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
            packages.add(src)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pkg in ("gateway", "pools", "predictor", "loadgen"):
        assert pkg in packages and f'"{pkg}*"' in pyproject
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "**" in ignore and all(f"!{p}/**" in ignore for p in ("gateway", "pools", "predictor", "loadgen"))


# ---- compose -----------------------------------------------------------------------------------


def test_compose_services_reference_each_other() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict[str, Any] = compose["services"]
    assert {"gateway", "redis"} <= services.keys()
    gw = services["gateway"]
    build = gw["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    env = gw["environment"]
    pools = load_pools(env["PYTHIA_POOLS"])  # the gateway's own parser accepts it
    assert {p.name for p in pools} == {"short", "long"}
    for pool in pools:
        for url in pool.replicas:
            host, port = urlparse(url).hostname, urlparse(url).port
            assert host in services, f"{url}: no service {host}"
            cmd = services[host]["command"]
            assert cmd[0] == "sim-engine" and cmd[cmd.index("--port") + 1] == str(port)
            sim = sim_parser().parse_args(cmd[1:])  # the simulated engine accepts these flags
            assert sim.host == "0.0.0.0" and sim.port == port  # reachable from the gateway's container
            assert services[host]["image"] == gw["image"]
    assert urlparse(env["PYTHIA_REDIS_URL"]).hostname in services
    for dep in gw["depends_on"]:
        assert dep in services
        assert "healthcheck" in services[dep]
    published = gw["ports"][0].split(":")[-1]
    assert published == env["PYTHIA_PORT"]


# ---- scripts -----------------------------------------------------------------------------------


def test_scripts_pass_shellcheck() -> None:
    result = subprocess.run([tool("shellcheck"), "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SCRIPTS:
        if script.name != "lib.sh":
            assert os.access(script, os.X_OK), f"{script} is not executable"


def _gpu_dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY / "gpu" / "start-vllm-pools.sh"), "--dry-run"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "RUN_DIR": str(tmp_path), "ADVERTISE_HOST": "10.1.2.3", **env},
    )


def test_gpu_script_one_vllm_per_gpu_with_pool_flags(tmp_path: Path) -> None:
    result = _gpu_dry_run(tmp_path, GPUS="0,1,2,3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    commands = [line.split() for line in lines if line.startswith("CUDA_VISIBLE_DEVICES=")]
    assert [c[0] for c in commands] == [f"CUDA_VISIBLE_DEVICES={g}" for g in range(4)]
    pools_line = next(line for line in lines if line.startswith("PYTHIA_POOLS="))
    pools = load_pools(pools_line.split("=", 1)[1].strip("'"))
    by_port = {urlparse(u).port: p for p in pools for u in p.replicas}
    assert [len(p.replicas) for p in pools] == [3, 1]  # a quarter of the GPUs for long contexts
    for cmd in commands:
        assert cmd[1:3] == ["vllm", "serve"] and "--enable-prefix-caching" in cmd
        assert cmd[cmd.index("--scheduling-policy") + 1] == "priority"
        pool = by_port[int(cmd[cmd.index("--port") + 1])]
        assert int(cmd[cmd.index("--max-model-len") + 1]) == pool.max_context_tokens
        assert cmd[cmd.index("--served-model-name") + 1] in pool.models
        assert int(cmd[cmd.index("--max-num-seqs") + 1]) == (256 if pool.name == "short" else 32)
    assert all(urlparse(u).hostname == "10.1.2.3" for p in pools for u in p.replicas)


def test_gpu_script_single_gpu_runs_the_short_pool_only(tmp_path: Path) -> None:
    result = _gpu_dry_run(tmp_path, GPUS="3", SHORT_MAX_MODEL_LEN="8192")
    assert result.returncode == 0, result.stderr
    pools_line = next(line for line in result.stdout.splitlines() if line.startswith("PYTHIA_POOLS="))
    (pool,) = load_pools(pools_line.split("=", 1)[1].strip("'"))
    assert pool.name == "short" and pool.max_context_tokens == 8192
    assert "CUDA_VISIBLE_DEVICES=3 " in result.stdout
    bad = _gpu_dry_run(tmp_path, GPUS="0,1", LONG_GPUS="2")
    assert bad.returncode != 0 and "no GPU for the short pool" in bad.stderr
