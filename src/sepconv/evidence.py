"""One verdict rule for every claim the demo (and the benchmarks) test: paired draws, an interval, a side.

A claim compares a *treatment* with a *control* measured on the same draws (seeds, folds): the
per-draw differences ``d_i = treatment_i - control_i`` have a mean and a two-sided 95 % Student-t
interval ``mean +- t_{0.975, n-1} s / sqrt(n)`` (s the sample standard deviation; Student 1908).
The claim names its side:

* ``"greater"`` -- the treatment is larger: **held** when the interval lies above 0, **did not hold**
  when it lies below 0, **inconclusive** otherwise;
* ``"less"`` -- the mirror image;
* ``"no_worse"`` with a margin ``delta >= 0`` -- the treatment is not smaller by more than ``delta``
  (a non-inferiority claim): held when the interval lies above ``-delta``, did not hold when it lies
  below ``-delta``, inconclusive otherwise;
* ``"no_greater"`` with ``delta`` -- the mirror image (not larger by more than ``delta``).

One draw has no interval and is always inconclusive: one draw decides nothing. A claim with several
parts (:func:`combine`) holds when every part held, did not hold when any part did not, and is
inconclusive otherwise; a claim that holds somewhere on a grid (:func:`combine_some`) holds when
some part held and none did not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy import stats

from .errors import ConfigError

__all__ = ["CLAIMS", "Comparison", "combine", "combine_some", "compare", "mean_interval", "pooled_accuracy",
           "verdict_word"]

CLAIMS = ("greater", "less", "no_worse", "no_greater")


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its two-sided Student-t interval at ``level``
    (``lo = -inf, hi = inf`` for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"mean_interval: need finite values, got {vals!r}")
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return mean, -math.inf, math.inf
    half = float(stats.t.ppf(0.5 + level / 2, len(vals) - 1)) * statistics.stdev(vals) / math.sqrt(len(vals))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Comparison:
    """A paired comparison and its verdict (``True`` held, ``False`` did not hold, ``None`` inconclusive)."""

    what: str
    claim: str
    delta: float
    n: int
    mean: float
    lo: float
    hi: float
    level: float
    held: bool | None

    @property
    def side(self) -> str:
        """The claim as the side the interval must lie on, e.g. ``"above 0"`` or ``"above -0.02"``."""
        threshold = {"greater": 0.0, "less": 0.0, "no_worse": -self.delta, "no_greater": self.delta}[self.claim]
        return f"{'above' if self.claim in ('greater', 'no_worse') else 'below'} {threshold:g}"

    def describe(self, scale: float = 1.0, unit: str = "", spec: str = ".2f") -> str:
        """E.g. ``"+1.20 (+0.40 to +2.00) pp over 3 seeds, 95 % t-interval"``; values times ``scale``."""
        def f(v: float) -> str:
            return format(scale * v, "+" + spec) if math.isfinite(v) else ("-inf" if v < 0 else "+inf")
        bound = ""
        if self.claim in ("no_worse", "no_greater"):
            bound = f"; margin {format(scale * self.delta, spec)}{unit}"
        return (f"{f(self.mean)}{unit} ({f(self.lo)} to {f(self.hi)}) over {self.n} paired draw"
                f"{'s' if self.n != 1 else ''}, {round(100 * self.level)} % t-interval{bound}")


def compare(treatment: Sequence[float], control: Sequence[float], claim: str = "greater", delta: float = 0.0,
            level: float = 0.95, what: str = "") -> Comparison:
    """The verdict of ``claim`` on paired draws ``treatment[i]`` vs ``control[i]`` (see the module text)."""
    if claim not in CLAIMS:
        raise ConfigError(f"compare: claim must be one of {', '.join(CLAIMS)}, got {claim!r}")
    if len(treatment) != len(control) or not treatment:
        raise ConfigError(f"compare: need paired draws of equal, non-zero length, got {len(treatment)} and "
                          f"{len(control)}")
    if not (0 < level < 1) or not (math.isfinite(delta) and delta >= 0):
        raise ConfigError(f"compare: need 0 < level < 1 and a finite delta >= 0, got {level!r} and {delta!r}")
    mean, lo, hi = mean_interval([float(a) - float(b) for a, b in zip(treatment, control)], level)
    # the threshold the interval must clear, and on which side the claim lies
    threshold = {"greater": 0.0, "less": 0.0, "no_worse": -delta, "no_greater": delta}[claim]
    above = claim in ("greater", "no_worse")
    if above:
        held = True if lo > threshold else False if hi < threshold else None
    else:
        held = True if hi < threshold else False if lo > threshold else None
    return Comparison(what, claim, float(delta), len(treatment), mean, lo, hi, level, held)


def combine(parts: Iterable[bool | None]) -> bool | None:
    """A claim of several parts: held when all held, did not hold when any did not, else inconclusive."""
    parts = list(parts)
    if any(p is False for p in parts):
        return False
    return True if parts and all(p is True for p in parts) else None


def combine_some(parts: Iterable[bool | None]) -> bool | None:
    """A claim that holds *somewhere* on a grid (e.g. "improves certified accuracy" over several
    radii): held when some part held and none did not, did not hold when any part did not,
    inconclusive otherwise (no part decided)."""
    parts = list(parts)
    if any(p is False for p in parts):
        return False
    return True if any(p is True for p in parts) else None


def verdict_word(held: bool | None) -> str:
    """The verdict's name: ``Held``, ``Did not hold`` or ``Inconclusive``."""
    return {True: "Held", False: "Did not hold", None: "Inconclusive"}[held]


def pooled_accuracy(accuracies: Sequence[float], sizes: Sequence[int]) -> tuple[float, float]:
    """``(accuracy, standard error)`` of test sets of ``sizes`` images scored ``accuracies``, pooled:
    the fraction of all images classified correctly and its binomial standard error
    ``sqrt(p (1 - p) / N)``. Over the folds of a partition every image is counted once."""
    if len(accuracies) != len(sizes) or not sizes or any(n <= 0 for n in sizes):
        raise ConfigError(f"pooled_accuracy: need one positive size per accuracy, got {list(sizes)!r}")
    n = sum(sizes)
    p = sum(a * k for a, k in zip(accuracies, sizes)) / n
    return p, math.sqrt(max(p * (1 - p), 0.0) / n)
