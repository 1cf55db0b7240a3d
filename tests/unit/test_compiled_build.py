"""The opt-in compiled build (`make compiled`): its modules are C extensions and decide as the source does.

The dev install (`pip install -e .`) must stay pure Python; `make test-compiled` runs this file (and the
routing, prefix-index, predictor and feature tests) with the compiled venv's interpreter and
PYTHIA_EXPECT_BUILD=compiled. The checks against `.venv-compiled` skip when it is absent or older than
the sources (`make test-compiled` requires them to run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pools.build_info import COMPILED_SOURCES, compiled_modules, loaded_build

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPILED_VENV = REPO_ROOT / ".venv-compiled"
COMPILED_PYTHON = COMPILED_VENV / "bin" / "python"


def compiled_build_is_current() -> bool:
    """True when `.venv-compiled` exists and was built from this tree's sources (every .py the same).

    A build left from before someone's edit must not fail their `make test`: the comparisons below
    then skip until `make compiled` (which `make test-compiled` and CI always run first)."""
    installed = next(iter(COMPILED_VENV.glob("lib/python3*/site-packages")), None)
    if not COMPILED_PYTHON.exists() or installed is None:
        return False
    for pkg in ("gateway", "pools", "predictor", "loadgen"):
        ours = {p.relative_to(REPO_ROOT) for p in (REPO_ROOT / pkg).rglob("*.py")}
        theirs = {p.relative_to(installed) for p in (installed / pkg).rglob("*.py")}
        if ours != theirs or any((REPO_ROOT / f).read_bytes() != (installed / f).read_bytes() for f in ours):
            return False
    return True


needs_compiled = pytest.mark.skipif(
    os.environ.get("PYTHIA_EXPECT_BUILD") == "compiled" or not compiled_build_is_current(),
    reason="no .venv-compiled built from these sources (make compiled), or this run already is the compiled build",
)


@pytest.mark.skipif(os.environ.get("PYTHIA_COMPILED_CHECKS") != "1", reason="only where make test-compiled asks")
def test_the_checks_against_the_compiled_build_run() -> None:
    # `make test-compiled` sets PYTHIA_COMPILED_CHECKS=1: there the comparisons below must not skip
    assert compiled_build_is_current()


def test_this_run_imports_the_expected_build() -> None:
    # the dev run must import the source; `make test-compiled` sets PYTHIA_EXPECT_BUILD=compiled
    expected = os.environ.get("PYTHIA_EXPECT_BUILD", "interpreted")
    assert loaded_build() == expected, compiled_modules()
    if expected == "compiled":
        import pools.routing.router

        assert pools.routing.router.__file__ is not None and pools.routing.router.__file__.endswith(".so")


def test_every_listed_source_exists() -> None:
    for source in COMPILED_SOURCES:
        assert (REPO_ROOT / source).is_file() or os.environ.get("PYTHIA_EXPECT_BUILD") == "compiled", source


def _run(python: Path | str, cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHIA_EXPECT_BUILD")}
    done = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_compiled
def test_compiled_venv_loads_extensions(tmp_path: Path) -> None:
    # from a directory outside the repository, so the source tree is not on sys.path
    out = _run(COMPILED_PYTHON, tmp_path, "-c", "import json, pools.build_info as b; print(json.dumps(b.compiled_modules()))")
    modules = json.loads(out)
    assert modules and all(modules.values()), modules


@needs_compiled
def test_compiled_build_makes_the_same_decisions(tmp_path: Path) -> None:
    # every policy and ablation on the decision benchmark's call sequence, each decision's every field
    from pools.routing.policies import POLICIES

    args = ("-m", "pools.routing.bench", "--digest", "--replicas", "16", "--decisions", "600",
            "--policies", ",".join(POLICIES))
    compiled = _run(COMPILED_PYTHON, tmp_path, *args)
    interpreted = _run(sys.executable, REPO_ROOT, *args)
    assert len(compiled.splitlines()) == len(POLICIES)
    assert compiled == interpreted


@needs_compiled
def test_compiled_build_simulates_the_same_run(tmp_path: Path) -> None:
    # predictor (untagged calls: roles and workflows inferred), routing and prefix index together, in
    # virtual time: the whole results JSON but the wall-clock time is the same
    def compare(python: Path | str, cwd: Path, out: Path) -> dict:
        _run(python, cwd, "-m", "loadgen.cli", "compare", "--workload", "mixed", "--workflows", "30", "--untagged",
             "--load", "0.9", "--capacity", "10", "--replicas", "4", "--preset", "llama-3.1-8b-a100",
             "--policies", "pythia,llmd", "--no-progress", "--out", str(out))
        results = json.loads(out.read_text())["results"]
        for r in results.values():
            r["sim"].pop("wall_s")
        return results

    compiled = compare(COMPILED_PYTHON, tmp_path, tmp_path / "compiled.json")
    interpreted = compare(sys.executable, REPO_ROOT, tmp_path / "interpreted.json")
    assert set(compiled) == {"pythia", "llmd"}
    assert compiled == interpreted


@pytest.mark.skipif(not (REPO_ROOT / "deploy").is_dir(), reason="run on a copy of tests/ (make test-compiled)")
def test_container_image_builds_the_compiled_gateway() -> None:
    # deploy/Dockerfile: setup.py in the context and the build stage, PYTHIA_COMPILE=1 unless overridden
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG PYTHIA_COMPILE=1" in dockerfile and 'if [ "${PYTHIA_COMPILE}" = 1 ]' in dockerfile
    assert "COPY pyproject.toml setup.py" in dockerfile
    assert "!setup.py" in (REPO_ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()


def test_serve_refuses_to_start_on_another_build_than_expected(tmp_path: Path) -> None:
    # what the gateway benchmark relies on: `pythia-compiled:*` can never silently measure the source
    want = "interpreted" if os.environ.get("PYTHIA_EXPECT_BUILD") == "compiled" else "compiled"
    pools = '[{"name": "short", "max_context_tokens": 32768, "models": ["m"], "replicas": ["http://127.0.0.1:9"]}]'
    env = {**os.environ, "PYTHIA_EXPECT_BUILD": want, "PYTHIA_POOLS": pools, "PYTHIA_WORKERS": "1", "PYTHIA_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"PYTHIA_EXPECT_BUILD={want} but the {loaded_build()} build is loaded" in done.stderr
