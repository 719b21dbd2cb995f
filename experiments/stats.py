"""95% intervals for the numbers a run report prints, and how they are written.

Proportions (accuracies, rates) get the Wilson score interval, which stays inside [0, 1] and is
sensible at n = 4 and at 0 or n successes, where the normal interval collapses to a point:

    centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).

Means get Student's t interval, mean +- t_{0.975, n-1} * s / sqrt(n) with s the sample standard
deviation (ddof = 1): the small-n version of the normal interval, exact for normal data. Elo
intervals are the eval stage's bootstrap percentiles (`cai_jax.eval.elo`) and are not recomputed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from scipy import stats as _scipy_stats

__all__ = ["Estimate", "Z95", "auto_digits", "mean_estimate", "mean_from_stderr", "wilson"]

Z95 = float(_scipy_stats.norm.ppf(0.975))  # 1.959964...


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval [lo, hi], its n and the interval's method."""

    value: float
    lo: float
    hi: float
    n: int
    method: str  # "Wilson" | "t" | "bootstrap" | "" (no interval)

    def fmt(self, digits: int | None = None, *, signed: bool = False) -> str:
        """'0.63 [0.31, 0.86]'; NaN bounds (no interval) print as the value alone.

        `digits` defaults to two significant digits of the interval's width (of the value when
        there is no interval), so an Elo of a few points prints "+3 [-9, +15]" and a proportion
        "0.50 [0.15, 0.85]".
        """
        if digits is None:
            width = self.hi - self.lo if math.isfinite(self.hi - self.lo) and self.hi > self.lo else abs(self.value)
            digits = auto_digits(width)
        f = (lambda x: f"{x:+.{digits}f}") if signed else (lambda x: f"{x:.{digits}f}")
        if not math.isfinite(self.value):
            return "NaN"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f(self.value)
        return f"{f(self.value)} [{f(self.lo)}, {f(self.hi)}]"

    def contains(self, x: float) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo <= x <= self.hi

    def overlaps(self, other: Estimate) -> bool:
        if not all(math.isfinite(v) for v in (self.lo, self.hi, other.lo, other.hi)):
            return True  # without both intervals nothing tells them apart
        return self.lo <= other.hi and other.lo <= self.hi


def auto_digits(scale: float) -> int:
    """Decimals that show two significant digits of `scale` (0 to 6)."""
    if not math.isfinite(scale) or scale <= 0:
        return 3
    return max(0, min(6, 2 - math.ceil(math.log10(scale))))


def wilson(successes: float, n: int) -> Estimate:
    """Wilson score 95% interval of a proportion successes / n (successes may be fractional, e.g.
    an accuracy that counts ties as half right). n == 0 gives NaN."""
    n = int(n)
    if n <= 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "Wilson")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson: successes={successes} must lie in [0, n={n}]")
    p, z2 = successes / n, Z95 * Z95
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, "Wilson")


def mean_from_stderr(mean: float, stderr: float, n: int) -> Estimate:
    """Student t 95% interval from a mean, its standard error s / sqrt(n) and n (NaN for n < 2)."""
    n = int(n)
    if n < 2 or not (math.isfinite(mean) and math.isfinite(stderr)):
        return Estimate(float(mean), math.nan, math.nan, n, "t")
    half = float(_scipy_stats.t.ppf(0.975, n - 1)) * float(stderr)
    return Estimate(float(mean), mean - half, mean + half, n, "t")


def mean_estimate(values: Sequence[float]) -> Estimate:
    """Mean of `values` with its Student t 95% interval (NaN interval for fewer than two values).

    None and non-finite values are left out (and not counted in n).
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "t")
    mean = math.fsum(xs) / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, 1, "t")
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean_from_stderr(mean, math.sqrt(var / n), n)
