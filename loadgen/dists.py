"""Sampling distributions for template fields (token counts, think times, fan-out widths)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

KINDS = ("fixed", "uniform", "uniform_int", "normal", "lognormal", "exponential", "choice")


class TemplateError(ValueError):
    """A workload template is malformed; the message names the offending field."""


@dataclass(slots=True, frozen=True)
class Dist:
    """One distribution, clamped to [min, max].

    YAML forms: a plain number (fixed), or a mapping with `dist` and its parameters:
    `fixed: value`, `uniform: min max`, `uniform_int: min max`, `normal: mean std`,
    `lognormal: median sigma` (the median is exp(mu)), `exponential: mean`,
    `choice: values [weights]`.
    """

    kind: str
    a: float = 0.0
    b: float = 0.0
    lo: float = -math.inf
    hi: float = math.inf
    values: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()

    def sample(self, rng: random.Random) -> float:
        """One draw, clamped to the distribution's bounds."""
        k = self.kind
        if k == "fixed":
            x = self.a
        elif k == "uniform":
            x = rng.uniform(self.a, self.b)
        elif k == "uniform_int":
            x = float(rng.randint(int(self.a), int(self.b)))
        elif k == "normal":
            x = rng.gauss(self.a, self.b)
        elif k == "lognormal":
            x = rng.lognormvariate(math.log(self.a), self.b)
        elif k == "exponential":
            x = rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        else:  # choice
            x = rng.choices(self.values, weights=self.weights or None)[0]
        return min(max(x, self.lo), self.hi)

    def sample_int(self, rng: random.Random, at_least: int = 0) -> int:
        """One draw rounded to an integer, at least `at_least`."""
        return max(at_least, round(self.sample(rng)))

    @property
    def mean_estimate(self) -> float:
        """The distribution's mean before clamping (for calibration and docs)."""
        k = self.kind
        if k == "fixed":
            return self.a
        if k in ("uniform", "uniform_int"):
            return (self.a + self.b) / 2
        if k == "normal":
            return self.a
        if k == "lognormal":
            return self.a * math.exp(self.b**2 / 2)
        if k == "exponential":
            return self.a
        w = self.weights or tuple(1.0 for _ in self.values)
        return sum(v * x for v, x in zip(self.values, w, strict=True)) / sum(w)


def parse_dist(raw: Any, where: str) -> Dist:
    """A `Dist` from its YAML form; raises TemplateError naming `where`."""
    if isinstance(raw, bool):
        raise TemplateError(f"{where}: expected a number or a distribution mapping, got {raw!r}")
    if isinstance(raw, int | float):
        return Dist("fixed", float(raw))
    if not isinstance(raw, dict) or "dist" not in raw:
        raise TemplateError(f"{where}: expected a number or a mapping with 'dist' (one of {', '.join(KINDS)})")
    kind = raw["dist"]
    if kind not in KINDS:
        raise TemplateError(f"{where}: unknown dist {kind!r}; known: {', '.join(KINDS)}")

    def num(key: str, default: float | None = None) -> float:
        v = raw.get(key, default)
        if v is None:
            raise TemplateError(f"{where}: dist {kind!r} needs '{key}'")
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TemplateError(f"{where}.{key}: expected a number, got {v!r}")
        return float(v)

    lo = num("min", -math.inf)
    hi = num("max", math.inf)
    if kind == "fixed":
        return Dist(kind, num("value"), lo=lo, hi=hi)
    if kind in ("uniform", "uniform_int"):
        a, b = num("min"), num("max")
        if b < a:
            raise TemplateError(f"{where}: max < min")
        return Dist(kind, a, b, lo, hi)
    if kind == "normal":
        return Dist(kind, num("mean"), num("std"), lo, hi)
    if kind == "lognormal":
        median = num("median")
        if median <= 0:
            raise TemplateError(f"{where}: lognormal median must be > 0")
        return Dist(kind, median, num("sigma"), lo, hi)
    if kind == "exponential":
        return Dist(kind, num("mean"), lo=lo, hi=hi)
    values = raw.get("values")
    if not isinstance(values, list) or not values or not all(isinstance(v, int | float) for v in values):
        raise TemplateError(f"{where}: dist 'choice' needs a non-empty list 'values' of numbers")
    weights = raw.get("weights", [])
    if weights and (len(weights) != len(values) or not all(isinstance(w, int | float) and w >= 0 for w in weights)):
        raise TemplateError(f"{where}: 'weights' must be non-negative numbers, one per value")
    return Dist(kind, lo=lo, hi=hi, values=tuple(float(v) for v in values), weights=tuple(float(w) for w in weights))
