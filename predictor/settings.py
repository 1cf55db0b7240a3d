"""Tuning knobs of the predictor (passed as keyword settings to `make_predictor`)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class PredictorSettings:
    """Every knob has a default that works for agent traffic; times are seconds."""

    prune_share: float = 0.05  # transitions below this share of a state's exits are not predicted
    bound_quantile: float = 0.95  # the quantile reported as a length bound
    # the bound uses quantile q + z * sqrt(q(1-q)/n) of n samples: with few samples the plain estimate of
    # p95 falls below the true p95 half the time; z = 1 makes that ~16% (0 = plain quantile)
    bound_confidence_z: float = 1.0
    min_workflows: int = 3  # an app with fewer finished workflows is cold
    min_state_count: float = 5.0  # below this many exits a (role, k) state backs off to its role
    workflow_idle_s: float = 120.0  # a workflow with no call for this long has ended
    fanout_window_s: float = 0.5  # same-role calls this close together are one parallel step
    sibling_window_s: float = 30.0  # ... or this close, when their prompts share the task context
    max_live_workflows: int = 100_000
    # memory bounds on client-controlled names: beyond them, calls count under the app / role "_other"
    max_apps: int = 1024
    max_roles_per_app: int = 256
    max_fingerprints_per_role: int = 16  # distinct system prompts remembered per role
    link_scan: int = 32  # recent workflows considered when linking an untagged call by the automaton
    tick_interval_s: float = 1.0  # how often the background task ends idle workflows
    link_min_prob: float = 0.05  # a workflow must expect the call's role at least this much to claim it
    # Redis store
    flush_interval_s: float = 0.1  # queued writes are sent in one pipeline this often
    refresh_interval_s: float = 0.5  # the in-process snapshot is reloaded this often
    live_ttl_s: float = 900.0  # TTL of live-workflow state in Redis
    redis_timeout_s: float = 0.5  # connect and command timeout
    error_log_interval_s: float = 10.0  # Redis errors are logged at most once per interval


def build_settings(**settings: object) -> PredictorSettings:
    """Settings from keyword values; unknown names raise ValueError, values are cast to the field type."""
    known = {f.name: f for f in fields(PredictorSettings)}
    values: dict[str, object] = {}
    for name, value in settings.items():
        f = known.get(name)
        if f is None:
            raise ValueError(f"unknown predictor setting {name!r}; known: {', '.join(sorted(known))}")
        cast = {"float": float, "int": int}.get(str(f.type))
        values[name] = cast(value) if cast is not None and value is not None else value
    return PredictorSettings(**values)  # type: ignore[arg-type]
