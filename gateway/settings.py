"""Gateway configuration: `PYTHIA_*` environment variables, each also a `pythia serve --flag`.

Flags are generated from the model fields, so a new setting is one field here plus
one line in `.env.example` and the README table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pools.admission import DEFAULT_TIMEOUT_S as ADMISSION_TIMEOUT_S
from pools.types import PoolConfig


class Settings(BaseSettings):
    """Everything `pythia serve` reads; env `PYTHIA_<NAME>` or `--<name-with-dashes>`."""

    model_config = SettingsConfigDict(env_prefix="PYTHIA_", extra="ignore")

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (shared by all workers)")
    workers: int = Field(1, ge=1, le=256, description="worker processes sharing the port (SO_REUSEPORT)")
    pools: str = Field("", description="pools as JSON, or a path to a YAML/JSON file (see DESIGN.md)")
    policy: str = Field("round_robin", description="routing policy name (pools.routing.POLICIES)")
    redis_url: str = Field("", description="predictor store; empty = embedded in-memory store")
    redis_key_prefix: str = Field("pythia:", description="prefix of every predictor key in Redis")
    predictor_options: dict[str, float | int] = Field(
        default_factory=dict, description='predictor knobs as JSON, e.g. {"min_workflows": 5}'
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="upstream TCP connect timeout")
    read_timeout_s: float = Field(600.0, gt=0, description="upstream read timeout (max silence between bytes)")
    body_limit_bytes: int = Field(16 * 1024 * 1024, gt=0, description="largest request body accepted (else 413)")
    retries: int = Field(1, ge=0, le=5, description="retries on another replica after connect failure or 5xx")
    health_interval_s: float = Field(0.5, gt=0, description="active /health check period per replica")
    health_timeout_s: float = Field(0.75, gt=0, description="timeout of one /health check")
    unhealthy_after: int = Field(2, ge=1, description="consecutive failed checks/calls that mark a replica down")
    metrics_scrape_interval_s: float = Field(1.0, gt=0, description="period of scraping each replica's /metrics")
    upstream_keepalive_s: float = Field(
        4.0, gt=0, description="idle upstream connection lifetime (below vLLM's 5 s keep-alive)"
    )
    upstream_max_connections: int = Field(0, ge=0, description="open connections per replica; 0 = unlimited")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time given to in-flight requests")
    forward_priority: bool = Field(
        True, description="set vLLM's `priority` from the policy (replicas need --scheduling-policy priority)"
    )
    max_tag_length: int = Field(128, ge=1, le=1024, description="longest accepted app/workflow/agent/session tag")
    routing_headers: bool = Field(False, description="add x-pythia-pool / x-pythia-replica to responses")
    fast_path: bool = Field(
        True, description="serve the two completion endpoints on the lean server path (false = all through aiohttp)"
    )
    expect_build: str = Field(
        "", description="refuse to start unless this build is loaded: compiled, interpreted; empty = either"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_json: bool = Field(True, description="structured JSON log lines (false = plain text)")
    otel_endpoint: str = Field("", description="OTLP/HTTP traces endpoint; empty = tracing off")
    otel_service_name: str = Field("pythia-gateway", description="service.name of exported spans")
    metrics_dir: str = Field("", description="prometheus multiprocess dir; empty = a fresh temp dir")
    discovery: str = Field("static", description="replicas from PYTHIA_POOLS (static) or Kubernetes EndpointSlices (k8s)")
    k8s_namespace: str = Field("", description="namespace of pools' Services; empty = the pod's own")
    k8s_api_url: str = Field("", description="Kubernetes API URL; empty = in-cluster")
    k8s_token_file: str = Field("", description="API bearer token file; empty = the service account's")
    k8s_ca_file: str = Field("", description="API CA bundle; empty = the service account's")
    k8s_watch_timeout_s: int = Field(240, gt=0, description="server-side EndpointSlice watch timeout")
    api_keys: SecretStr = Field(
        SecretStr(""), description="API keys clients must send as `Authorization: Bearer`; empty = no auth"
    )
    admin_api_key: SecretStr = Field(SecretStr(""), description="key for /pythia/* endpoints; empty = as /v1/*")
    upstream_api_key: SecretStr = Field(
        SecretStr(""), description="key sent to replicas (vLLM --api-key); empty = none. Client keys are never forwarded"
    )
    rate_limit_rpm: int = Field(0, ge=0, description="requests per minute per API key (token bucket); 0 = off")
    rate_limit_tpm: int = Field(
        0, ge=0, description="tokens (prompt + max_tokens) per minute per API key (token bucket); 0 = off"
    )
    rate_limit_redis_timeout_s: float = Field(
        0.1, gt=0, description="longest wait on Redis for a rate-limit decision before deciding locally"
    )
    log_payloads: bool = Field(False, description="log prompts and completions (off: they are never logged)")
    # Pythia mechanisms wired live (gateway/admission.py, gateway/prewarm.py, gateway/autoscale.py)
    admission: str = Field("auto", description="gateway admission queue: auto (when the policy sets priorities), on, off")
    admission_timeout_s: float = Field(
        ADMISSION_TIMEOUT_S, gt=0,
        description="longest wait for room in the admission queue; then the call goes to the engine's own queue"
    )
    admission_aging_s: float = Field(10.0, gt=0, description="seconds of queueing worth one priority level")
    admission_max_queue: int = Field(10000, ge=1, description="queued calls per pool and worker at most (else 429)")
    prewarm: bool = Field(True, description="send the policy's pre-warm prefills (max_tokens=1) in the background")
    prewarm_concurrency: int = Field(4, ge=1, description="pre-warm requests in flight per worker at most")
    prewarm_timeout_s: float = Field(10.0, gt=0, description="timeout of one pre-warm request")
    prefix_reconcile: bool = Field(
        True, description="resize each replica's share of the prefix index from the hit rate its engine reports"
    )
    autoscale_interval_s: float = Field(5.0, gt=0, description="period of recomputing pythia_pool_desired_replicas")
    autoscale_horizon_s: float = Field(120.0, gt=0, description="how far ahead the predictive signal looks")
    autoscale_step_s: float = Field(8.0, gt=0, description="typical seconds per workflow step (service + tool time)")
    autoscale_target_utilization: float = Field(0.75, gt=0, le=1, description="replica utilisation to size pools for")
    autoscale_output_tokens_per_s: float = Field(500.0, gt=0, description="decode tokens/s one replica sustains")
    autoscale_prefill_tokens_per_s: float = Field(25000.0, gt=0, description="prefill tokens/s one replica sustains")
    workflow_ttl_s: float = Field(
        900.0, gt=0, description="the router forgets a workflow's pool pin, last replica and start after this long without a call"
    )
    malloc_trim_interval_s: float = Field(
        60.0, ge=0, description="return freed heap memory to the OS this often (glibc malloc_trim); 0 = never"
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("log level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v

    @field_validator("expect_build")
    @classmethod
    def _expect_build(cls, v: str) -> str:
        if v not in ("", "compiled", "interpreted"):
            raise ValueError("expect_build must be 'compiled', 'interpreted' or empty")
        return v

    @field_validator("admission")
    @classmethod
    def _admission(cls, v: str) -> str:
        if v not in ("auto", "on", "off"):
            raise ValueError("admission must be 'auto', 'on' or 'off'")
        return v

    @field_validator("discovery")
    @classmethod
    def _discovery(cls, v: str) -> str:
        if v not in ("static", "k8s"):
            raise ValueError("discovery must be 'static' or 'k8s'")
        return v


class PoolSpec(BaseModel):
    """One pool as written in PYTHIA_POOLS: static `replicas`, or a Kubernetes `selector` (+ namespace/port/scheme)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    max_context_tokens: int = Field(gt=0)
    models: list[str] = Field(min_length=1)
    replicas: list[str] = Field(default_factory=list)
    selector: str | None = None

    @field_validator("replicas")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        out = []
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"replica URL must start with http:// or https://: {u!r}")
            out.append(u.rstrip("/"))
        return out


class ConfigError(ValueError):
    """The configuration cannot be used; the message says why."""


def load_pools(spec: str, discovery: str = "static") -> list[PoolConfig]:
    """Pools from JSON text or from a YAML/JSON file path; a list, or {"pools": [...]}."""
    specs = [_validate(p, discovery) for p in read_pool_entries(spec)]
    seen_names: set[str] = set()
    seen_urls: set[str] = set()
    for s in specs:
        if s.name in seen_names:
            raise ConfigError(f"duplicate pool name {s.name!r}")
        seen_names.add(s.name)
        for u in s.replicas:
            if u in seen_urls:
                raise ConfigError(f"replica {u} is listed twice; each replica belongs to one pool")
            seen_urls.add(u)
    return [PoolConfig(s.name, s.max_context_tokens, tuple(s.models), tuple(s.replicas)) for s in specs]


def _validate(entry: Any, discovery: str) -> PoolSpec:
    try:
        s = PoolSpec.model_validate(entry)
    except ValidationError as e:
        raise ConfigError(f"invalid pool: {e}") from None
    if s.selector is None and not s.replicas:
        raise ConfigError(f"pool {s.name!r} needs `replicas` (or a `selector` with PYTHIA_DISCOVERY=k8s)")
    if s.selector is not None and discovery != "k8s":
        raise ConfigError(f"pool {s.name!r} has a `selector`: set PYTHIA_DISCOVERY=k8s")
    return s


def read_pool_entries(spec: str) -> list[dict[str, Any]]:
    """The raw pool objects of PYTHIA_POOLS (inline JSON or a file), not yet validated."""
    text = spec.strip()
    if not text:
        raise ConfigError("no pools configured: set PYTHIA_POOLS (JSON or a path to a YAML/JSON file)")
    data: Any
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"PYTHIA_POOLS is not valid JSON: {e}") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"PYTHIA_POOLS file not found: {text}")
        raw = path.read_text()
        try:
            data = yaml.safe_load(raw) if path.suffix in (".yaml", ".yml") else json.loads(raw)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot parse {text}: {e}") from None
    if isinstance(data, dict):
        data = data.get("pools")
    if not isinstance(data, list) or not data or not all(isinstance(p, dict) for p in data):
        raise ConfigError("pools must be a non-empty list of objects (or an object with a 'pools' list)")
    return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """`pythia serve` flags, one per Settings field; unset flags fall back to env, then defaults."""
    p = argparse.ArgumentParser(
        prog="pythia serve",
        description="Run the Pythia gateway. Every flag is also an environment variable PYTHIA_<NAME>.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        default = "{}" if name == "predictor_options" else repr(field.default)
        help_text = f"{field.description} (env PYTHIA_{name.upper()}, default {default})"
        if field.annotation is bool:
            p.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            typ: Any = int if field.annotation is int else float if field.annotation is float else str
            if name == "predictor_options":
                typ = _json_object
            p.add_argument(_flag(name), dest=name, type=typ, metavar=name.upper(), help=help_text)
    return p


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_settings(argv: list[str]) -> Settings:
    """Settings from flags (highest precedence), then PYTHIA_* env, then defaults."""
    args = vars(build_parser().parse_args(argv))
    return Settings(**args)
