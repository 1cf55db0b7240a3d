"""A small mergeable quantile sketch: counts in fixed log-spaced buckets.

Buckets are the same in every process, so two sketches merge by adding counts, and
a sketch is stored in Redis as one counter per non-empty bucket (HINCRBYFLOAT).
Bucket i >= 1 holds values in [GAMMA**(i-1), GAMMA**i); bucket 0 holds values below 1.
With GAMMA = 1.05 a quantile is overestimated by at most 5%, which errs on the safe
side for a bound, and small integers (step counts) get a bucket of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GAMMA = 1.05
_LOG_GAMMA = math.log(GAMMA)
MAX_BUCKET = 400  # GAMMA**400 ~ 3e8: more than any token count we will see


def bucket_of(x: float) -> int:
    """The bucket index holding value `x`."""
    b = _INT_BUCKETS.get(x) if type(x) is int else None  # token counts recur: remembered per integer
    if b is not None:
        return b
    if x < 1.0:
        return 0
    b = min(MAX_BUCKET, int(math.log(x) / _LOG_GAMMA) + 1)
    if type(x) is int and len(_INT_BUCKETS) < _INT_BUCKETS_MAX:
        _INT_BUCKETS[x] = b
    return b


_INT_BUCKETS: dict[int, int] = {}
_INT_BUCKETS_MAX = 1 << 16


def bucket_upper(i: int) -> int:
    """The largest integer a value in bucket `i` can have (0 for bucket 0)."""
    if i <= 0:
        return 0
    return max(1, math.ceil(GAMMA**i) - 1)


@dataclass(slots=True)
class LogSketch:
    """Counts per log bucket plus the running sum (for the mean)."""

    counts: dict[int, float] = field(default_factory=dict)
    total: float = 0.0
    sum: float = 0.0

    def add_bucket(self, bucket: int, weight: float) -> None:
        """Add `weight` observations to one bucket (how stored counters are replayed)."""
        self.counts[bucket] = self.counts.get(bucket, 0.0) + weight
        self.total += weight

    def add(self, x: float, weight: float = 1.0) -> int:
        """Observe value `x`; returns its bucket."""
        b = bucket_of(x)
        self.add_bucket(b, weight)
        self.sum += x * weight
        return b

    @property
    def mean(self) -> float:
        """Mean of the observed values (0 when empty)."""
        return self.sum / self.total if self.total > 0 else 0.0

    def quantile(self, q: float) -> int:
        """The `q` quantile, log-interpolated inside its bucket and rounded up (0 when empty)."""
        if self.total <= 0:
            return 0
        target = q * self.total
        acc = 0.0
        last = 0
        for b in sorted(self.counts):
            c = self.counts[b]
            if c <= 0:
                continue
            if acc + c >= target - 1e-9:
                if b <= 1:
                    return bucket_upper(b)
                # log-interpolate inside the bucket: removes most of the rounding-up bias of the edge
                frac = min(1.0, max(0.0, (target - acc) / c))
                return min(bucket_upper(b), math.ceil(GAMMA ** (b - 1 + frac)))
            acc += c
            last = b
        return bucket_upper(last)

    def merge(self, other: LogSketch) -> None:
        """Add another sketch's counts to this one."""
        for b, c in other.counts.items():
            self.add_bucket(b, c)
        self.sum += other.sum
