"""Gateway settings: env and flags, pool files, and that every setting is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway.settings import ConfigError, Settings, build_parser, load_pools, parse_settings

ROOT = Path(__file__).resolve().parents[2]
POOLS = [
    {"name": "long", "max_context_tokens": 131072, "models": ["m"], "replicas": ["http://h:3/"]},
    {"name": "short", "max_context_tokens": 16384, "models": ["m"], "replicas": ["http://h:1", "http://h:2"]},
]


def test_flags_override_env_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHIA_PORT", "9100")
    monkeypatch.setenv("PYTHIA_POLICY", "session")
    s = parse_settings(["--port", "9200", "--workers", "3", "--routing-headers"])
    assert (s.port, s.policy, s.workers, s.routing_headers) == (9200, "session", 3, True)
    assert parse_settings([]).read_timeout_s == Settings.model_fields["read_timeout_s"].default


def test_every_setting_has_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(Settings.model_fields)


def test_every_setting_is_in_env_example_and_readme() -> None:
    env_example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        var = f"PYTHIA_{name.upper()}"
        assert re.search(rf"^#?\s*{var}=", env_example, re.M), f"{var} missing from .env.example"
        assert f"`{var}`" in readme, f"{var} missing from the README table"


def test_pools_from_json_yaml_and_object_forms(tmp_path: Path) -> None:
    got = load_pools(json.dumps(POOLS))
    assert [p.name for p in got] == ["long", "short"]
    assert got[0].replicas == ("http://h:3",)  # trailing slash dropped
    y = tmp_path / "pools.yaml"
    y.write_text("pools:\n" + "".join(
        f"  - name: {p['name']}\n    max_context_tokens: {p['max_context_tokens']}\n    models: [m]\n"
        f"    replicas: {json.dumps(p['replicas'])}\n" for p in POOLS
    ))  # fmt: skip
    assert load_pools(str(y)) == got
    j = tmp_path / "pools.json"
    j.write_text(json.dumps({"pools": POOLS}))
    assert load_pools(str(j)) == got


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "[]",
        "not-a-file.yaml",
        "[{",
        json.dumps([{**POOLS[0], "replicas": ["h:1"]}]),
        json.dumps([{**POOLS[0], "max_context_tokens": 0}]),
        json.dumps([POOLS[0], {**POOLS[1], "name": "long"}]),
        json.dumps([POOLS[0], {**POOLS[1], "replicas": ["http://h:3"]}]),
    ],
)
def test_bad_pools_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        load_pools(spec)


def test_serve_rejects_bad_config_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.serve import main

    assert main(["--pools", ""]) == 2
    assert main(["--pools", json.dumps(POOLS), "--policy", "nope"]) == 2
    assert main(["--pools", json.dumps(POOLS), "--workers", "2", "--port", "0"]) == 2
    assert main(["--pools", json.dumps(POOLS), "--log-level", "loud"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_selector_pools_need_k8s_discovery() -> None:
    sel = [{"name": "short", "max_context_tokens": 8192, "models": ["m"], "selector": "app=vllm"}]
    with pytest.raises(ConfigError, match="PYTHIA_DISCOVERY=k8s"):
        load_pools(json.dumps(sel))
    (pool,) = load_pools(json.dumps(sel), discovery="k8s")
    assert pool.replicas == ()
    with pytest.raises(ConfigError, match="needs `replicas`"):
        load_pools(json.dumps([{**sel[0], "selector": None}]), discovery="k8s")
