"""Open-loop arrival processes: when each workflow starts, independent of how fast it is served."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from loadgen.workflow import Workflow

ARRIVALS = ("poisson", "gamma", "bursty", "constant")


def arrival_times(
    kind: str,
    rate: float,
    n: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    burstiness: float = 0.25,
    on_s: float = 5.0,
    on_fraction: float = 0.25,
) -> list[float]:
    """Start times (seconds from 0) of `n` workflows, or of all that arrive within `duration_s`.

    poisson: exponential gaps at `rate`/s. gamma: gamma gaps with shape `burstiness` and the same
    mean (vLLM's benchmark convention: 1 = Poisson, < 1 burstier). bursty: on/off source, `on_s`
    seconds at rate/on_fraction then silence, so the long-run mean is still `rate`.
    constant: evenly spaced.
    """
    if kind not in ARRIVALS:
        raise ValueError(f"unknown arrival process {kind!r}; known: {', '.join(ARRIVALS)}")
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if n is None and duration_s is None:
        raise ValueError("give a workflow count or a duration")
    rng = random.Random(f"arrivals:{seed}:{kind}")
    limit = n if n is not None else math.inf
    horizon = duration_s if duration_s is not None else math.inf
    out: list[float] = []
    t = 0.0
    period = on_s / on_fraction if kind == "bursty" else 0.0
    while len(out) < limit:
        if kind == "constant":
            t = len(out) / rate
        elif kind == "poisson":
            t += rng.expovariate(rate) if out else 0.0
        elif kind == "gamma":
            shape = burstiness
            t += rng.gammavariate(shape, 1.0 / (rate * shape)) if out else 0.0
        else:  # bursty: Poisson at a higher rate inside "on" windows only
            if out:
                t += rng.expovariate(rate / on_fraction)
            phase = t % period
            if phase >= on_s:
                t += period - phase
        if t >= horizon:
            break
        out.append(t)
    return out


def assign_arrivals(workflows: Sequence[Workflow], times: Sequence[float]) -> None:
    """Set each workflow's arrival time (in place); raises if the counts differ."""
    if len(workflows) != len(times):
        raise ValueError(f"{len(workflows)} workflows but {len(times)} arrival times")
    for w, t in zip(workflows, times, strict=True):
        w.arrival_s = t
