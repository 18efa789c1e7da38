"""Proportions of seeds: Wilson score intervals, and the exact McNemar test for paired outcomes.

A study whose error is bimodal over seeds (each cell either solves the task or does not,
as MQAR near its threshold) is summarised better by how many seeds reached a target than
by a mean error: the mean of 0% and 75% cells is neither. Seeds are few (5-10), so the
intervals are Wilson score intervals, which keep their coverage at small counts and at
0 or all successes (where the normal "Wald" interval collapses to a point), and the
comparison of two kinds on the same seeds is McNemar's exact test, which uses only the
discordant pairs (seeds one kind solved and the other did not).
"""

from __future__ import annotations

import math

from scipy import stats

from attnlab.stats.intervals import CONFIDENCE


def wilson_interval(successes: int, trials: int,
                    confidence: float = CONFIDENCE) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion `successes / trials`.

  The set of p whose score test does not reject at `confidence`: the roots of
  (k/t - p)^2 = z^2 p (1 - p) / t, with z the normal quantile (Wilson, 1927).

  Raises:
    ValueError: trials < 1 or successes outside [0, trials].
  """
  if trials < 1:
    raise ValueError(f"a proportion needs at least one trial; got trials={trials}.")
  if not 0 <= successes <= trials:
    raise ValueError(f"successes must lie in [0, trials={trials}]; got {successes}.")
  z = float(stats.norm.ppf(0.5 + confidence / 2))
  p = successes / trials
  shrink = 1 + z * z / trials
  centre = (p + z * z / (2 * trials)) / shrink
  half = z / shrink * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
  # Clip the rounding at the ends: 0/t has a lower bound of exactly 0, t/t an upper of 1.
  return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
  """Two-sided exact McNemar p-value for paired binary outcomes.

  Under "both kinds succeed equally often", each discordant pair (only a succeeded, or only
  b) is a fair coin, so `only_a` ~ Binomial(only_a + only_b, 1/2); the p-value is twice the
  smaller tail, capped at 1. No discordant pair: p = 1 (no evidence either way).

  Raises:
    ValueError: a negative count.
  """
  if only_a < 0 or only_b < 0:
    raise ValueError(f"discordant pair counts must be >= 0; got {only_a} and {only_b}.")
  total = only_a + only_b
  if total == 0:
    return 1.0
  tail = sum(math.comb(total, i) for i in range(min(only_a, only_b) + 1)) / 2 ** total
  return min(1.0, 2 * tail)
