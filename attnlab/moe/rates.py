"""Empirical rates from whole curves: log-log slopes and paired slope differences (NumPy only).

The independent unit of the synthetic study is a (truth, repetition) pair:
its data at every n are nested draws of one pool, so its losses over n form
one curve. The bootstrap here resamples whole curves (units), never results
within one n, and a difference of two students' slopes resamples the same
units for both (paired: the same truths and data). `attnlab.stats.fits`'s
`loglog_slope` is the other reading, for independent results at each n: it
resamples within each n.

A curve is a row of `values` [units, sizes]; NaN marks a result left out
(an unconverged fit), dropped from that size's statistic only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

from attnlab.stats import intervals

STATISTICS = {"mean": np.nanmean, "median": np.nanmedian}
# (z_{1-alpha/2} + z_{power}): the smallest true difference a two-sided 5% test
# detects with 80% power is about this many standard errors.
_DETECTABLE_SE = 1.959964 + 0.841621


@dataclasses.dataclass(frozen=True)
class Slope:
  """A log-log slope with its bootstrap percentile interval (NaN where undefined)."""
  slope: float
  ci: tuple[float, float]
  sizes: int

  def excludes(self, value: float = 0.0) -> bool:
    return bool(self.ci[0] > value or self.ci[1] < value)


@dataclasses.dataclass(frozen=True)
class SlopeDifference:
  """slope(a) - slope(b) with its paired bootstrap interval and the smallest detectable difference."""
  a: Slope
  b: Slope
  difference: float
  ci: tuple[float, float]
  detectable: float  # about 2.8 bootstrap standard errors: 80% power at the 5% level
  units: int

  def excludes_zero(self) -> bool:
    return bool(self.ci[0] > 0 or self.ci[1] < 0)


def slope(sizes: Sequence[float], values: np.ndarray, statistic: str = "mean") -> float:
  """The least-squares slope of log(statistic over units) against log n; NaN if undefined."""
  values = np.asarray(values, np.float64)
  with warnings.catch_warnings():  # a column with every result left out is NaN, not a warning
    warnings.simplefilter("ignore", RuntimeWarning)
    centres = STATISTICS[statistic](values, axis=0)
  ok = np.isfinite(centres) & (centres > 0)
  if ok.sum() < 2:
    return math.nan
  return float(np.polyfit(np.log(np.asarray(sizes, np.float64)[ok]), np.log(centres[ok]), 1)[0])


def _interval(x: np.ndarray) -> tuple[float, float]:
  """The percentile interval of the replicates whose slope is defined (NaN below 2 of them)."""
  x = x[np.isfinite(x)]
  if x.size < 2:
    return (math.nan, math.nan)
  return intervals.percentile_interval(x)


def _draws(units: int, n_boot: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, units, size=(n_boot, units))


def curve_slope(sizes: Sequence[float], values: np.ndarray, *, statistic: str = "mean",
                n_boot: int = 1000, seed: int = 0) -> Slope:
  """The slope of one student's curves with an interval from resampling whole curves."""
  values = np.asarray(values, np.float64)
  boot = np.array([slope(sizes, values[idx], statistic) for idx in _draws(len(values), n_boot, seed)])
  return Slope(slope(sizes, values, statistic), _interval(boot), len(sizes))


def paired_slope_difference(sizes: Sequence[float], values_a: np.ndarray, values_b: np.ndarray, *,
                            statistic: str = "mean", n_boot: int = 1000, seed: int = 0) -> SlopeDifference:
  """slope(a) - slope(b), the same units resampled for both (row u of a and of b: one unit)."""
  a, b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired curves need the same [units, sizes] shape; got {a.shape} and {b.shape}.")
  draws = _draws(len(a), n_boot, seed)
  boot_a = np.array([slope(sizes, a[idx], statistic) for idx in draws])
  boot_b = np.array([slope(sizes, b[idx], statistic) for idx in draws])
  diff = boot_a - boot_b
  finite = diff[np.isfinite(diff)]
  sa, sb = slope(sizes, a, statistic), slope(sizes, b, statistic)
  return SlopeDifference(
      a=Slope(sa, _interval(boot_a), len(sizes)), b=Slope(sb, _interval(boot_b), len(sizes)),
      difference=sa - sb, ci=_interval(diff),
      detectable=float(_DETECTABLE_SE * np.std(finite)) if finite.size > 1 else math.nan,
      units=len(a))
