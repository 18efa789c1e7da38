"""Means over seeds with Student-t intervals, paired differences and bootstrap percentiles.

  * Intervals over seeds are 95% Student-t intervals: mean +- t(0.975, k-1) * s / sqrt(k),
    s the sample standard deviation (ddof=1). With one value there is no interval (NaN).
  * A paired difference is the t-interval of the per-seed differences a - b.
  * A bootstrap interval is the 2.5/97.5 percentiles of the replicates that could be computed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean over `count` values with its 95% t-interval (low, high are NaN when count < 2)."""
  mean: float
  low: float
  high: float
  count: int

  @property
  def half_width(self) -> float:
    return (self.high - self.low) / 2


# The interval of no values at all (e.g. every seed of a size failed).
NO_VALUES = Interval(math.nan, math.nan, math.nan, 0)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
  """Mean and Student-t confidence interval of `values` (seeds as independent draws)."""
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    raise ValueError("t_interval needs at least one value; got none.")
  mean = float(x.mean())
  if x.size < 2:
    return Interval(mean, math.nan, math.nan, 1)
  half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
  return Interval(mean, mean - float(half), mean + float(half), int(x.size))


def paired_t_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
  """The t-interval of a[i] - b[i]: the same seed's results, so seed-to-seed variation cancels."""
  if len(a) != len(b):
    raise ValueError(f"paired values need one b per a; got {len(a)} and {len(b)}.")
  return t_interval([x - y for x, y in zip(a, b)])


def percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
  """The central 95% of bootstrap `replicates`: their 2.5 and 97.5 percentiles."""
  tail = 100 * (1 - CONFIDENCE) / 2
  return float(np.percentile(replicates, tail)), float(np.percentile(replicates, 100 - tail))
