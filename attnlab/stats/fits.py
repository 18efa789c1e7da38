"""Results grouped by sample size, and the log-log slope of a metric against n.

The bootstrap here resamples seeds within each n (each size's results are
independent draws); `attnlab/moe/rates.py` resamples whole curves instead,
where one unit's results at every n are nested draws of one pool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnlab.stats import intervals

class FitError(ValueError):
  """The data cannot be fitted (too few sizes, non-positive errors, no convergence)."""


def group_by_n(n: Sequence[float], error: Sequence[float]) -> tuple[np.ndarray, list[np.ndarray]]:
  """Distinct sizes (sorted) and, for each, the errors of its seeds."""
  n = np.asarray(n, dtype=np.float64)
  error = np.asarray(error, dtype=np.float64)
  if n.shape != error.shape or n.ndim != 1:
    raise ValueError(f"n and error must be 1-D arrays of the same length; got shapes {n.shape} "
                     f"and {error.shape}.")
  keep = np.isfinite(error)
  n, error = n[keep], error[keep]
  if np.any(n <= 0):
    raise ValueError(f"training-set sizes must be positive; got {sorted(set(n[n <= 0].tolist()))}.")
  sizes = np.unique(n)
  return sizes, [error[n == s] for s in sizes]


@dataclasses.dataclass(frozen=True)
class LogLogSlope:
  """log(mean value) = intercept + slope * log(n), least squares over the per-n means (or
  medians: `loglog_slope`'s statistic).

  Unlike `power_law.PowerLawFit` the slope is not bounded: a metric that levels off or grows with n
  (a misspecified fit's error) shows it as a slope near or above 0. slope_ci is the 95%
  bootstrap percentile interval (seeds resampled within each n), (NaN, NaN) without one.
  """
  slope: float
  intercept: float
  slope_ci: tuple[float, float]
  sizes: int
  n_boot: int

  def predict(self, n: Any) -> np.ndarray:
    return np.exp(self.intercept + self.slope * np.log(np.asarray(n, dtype=np.float64)))


SLOPE_STATISTICS = {"mean": np.mean, "median": np.median}


def loglog_slope(n: Sequence[float], value: Sequence[float], *, n_boot: int = 1000,
                 seed: int = 0, statistic: str = "mean") -> LogLogSlope:
  """The empirical convergence rate of `value` in n: the slope of the log-log line.

  Args:
    n: sample size of each result (repeated once per seed).
    value: the metric of each result (e.g. an estimation loss); NaN results are left out.
    n_boot: bootstrap replicates; 0 skips the interval.
    seed: seed of the bootstrap's NumPy generator.
    statistic: what summarises the seeds at each n, "mean" or "median" (a heavy-tailed
      loss, whose mean a few failed fits carry, is better read through its median).

  Raises:
    FitError: fewer than 2 distinct sizes, or a mean value <= 0 (no logarithm).
  """
  if statistic not in SLOPE_STATISTICS:
    raise ValueError(f"statistic={statistic!r} is not one of {sorted(SLOPE_STATISTICS)}.")
  summarise = SLOPE_STATISTICS[statistic]
  sizes, groups = group_by_n(n, value)
  if sizes.size < 2:
    raise FitError(f"a log-log slope needs results at >= 2 distinct sizes; got {sizes.astype(int).tolist()}.")

  def fit(centres: np.ndarray) -> np.ndarray:
    if np.any(centres <= 0):
      raise FitError(f"{statistic} value <= 0 at n={sizes[centres <= 0].astype(int).tolist()}: "
                     "no logarithm.")
    return np.polyfit(np.log(sizes), np.log(centres), 1)

  slope, intercept = fit(np.array([summarise(g) for g in groups]))
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(n_boot):
    centres = np.array([summarise(rng.choice(g, size=g.size, replace=True)) for g in groups])
    if np.all(centres > 0):
      boot.append(fit(centres)[0])
  ci = intervals.percentile_interval(np.array(boot)) if len(boot) >= 2 else (math.nan, math.nan)
  return LogLogSlope(float(slope), float(intercept), ci, int(sizes.size), n_boot)
