"""Samples to reach a target error, and the paired ratio of two curves' samples.

The ratio's bootstrap draws seed rows with replacement once per replicate and
uses that draw at every n and for both curves, so the pairing (and the
correlation across n of one seed's nested subsets) is kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from attnlab.stats import intervals


@dataclasses.dataclass(frozen=True)
class SamplesToTarget:
  """Where a mean error curve first reaches a target.

  status: "interpolated" (value between two grid sizes, linear in log n), "at_most" (already
  at or below the target at the smallest size: value is that size, the true n may be smaller)
  or "not_reached" (above the target at every size; value is None, never extrapolated).
  """
  value: float | None
  status: Literal["interpolated", "at_most", "not_reached"]

  def __str__(self) -> str:
    if self.status == "not_reached":
      return "not reached"
    prefix = "<= " if self.status == "at_most" else ""
    return f"{prefix}{self.value:.4g}"


def samples_to_target(n: Sequence[float], mean_error: Sequence[float], target: float) -> SamplesToTarget:
  """Smallest n at which the mean error curve reaches `target` (error <= target).

  Between the last size above the target and the first size at or below it, the crossing
  is interpolated linearly in log n (error on a linear scale). Never extrapolates.

  Args:
    n: distinct training-set sizes.
    mean_error: mean error at each size.
    target: error to reach.
  """
  n = np.asarray(n, dtype=np.float64)
  e = np.asarray(mean_error, dtype=np.float64)
  if n.shape != e.shape or n.ndim != 1 or n.size == 0:
    raise ValueError(f"n and mean_error must be non-empty 1-D arrays of one length; got shapes "
                     f"{n.shape} and {e.shape}.")
  if len(np.unique(n)) != n.size:
    raise ValueError(f"n must hold distinct sizes (average the seeds first); got {n.tolist()}.")
  if np.any(n <= 0) or not np.all(np.isfinite(e)):
    raise ValueError(f"n must be positive and mean_error finite; got n={n.tolist()}, "
                     f"mean_error={e.tolist()}.")
  order = np.argsort(n)
  n, e = n[order], e[order]
  hits = np.flatnonzero(e <= target)
  if hits.size == 0:
    return SamplesToTarget(None, "not_reached")
  i = int(hits[0])
  if i == 0:
    return SamplesToTarget(float(n[0]), "at_most")
  frac = (e[i - 1] - target) / (e[i - 1] - e[i])
  log_n = math.log(n[i - 1]) + frac * (math.log(n[i]) - math.log(n[i - 1]))
  return SamplesToTarget(float(math.exp(log_n)), "interpolated")


@dataclasses.dataclass(frozen=True)
class SamplesRatio:
  """n-to-target of kinds[0] divided by that of kinds[1], over the seeds both kinds have.

  value is None when the ratio is undefined (see `note`); `bound` says whether value is
  exact ("="), an upper bound ("<=", numerator only "at most") or a lower bound (">=").
  ci is the bootstrap 95% percentile interval over the `boot_ok` of `n_boot` replicates in
  which both kinds reached the target (None when fewer than 2 did).
  """
  kinds: tuple[str, str]
  target: float
  numerator: SamplesToTarget
  denominator: SamplesToTarget
  value: float | None
  bound: Literal["=", "<=", ">="]
  note: str
  ci: tuple[float, float] | None
  n_boot: int
  boot_ok: int
  pairs: int

  def __str__(self) -> str:
    if self.value is None:
      return self.note
    text = f"{'' if self.bound == '=' else self.bound + ' '}{self.value:.3g}"
    if self.ci is not None:
      text += f" [{self.ci[0]:.3g}, {self.ci[1]:.3g}]"
    return text



def _curve(sizes: Sequence[float], errors: np.ndarray, rows: np.ndarray) -> tuple[list, list]:
  """Sizes and mean errors over `rows` of errors [seeds, sizes] (repeats allowed: a bootstrap
  draw); NaN (no result) is left out, and a size with no result in any row is skipped."""
  ns, means = [], []
  for j, n in enumerate(sizes):
    column = errors[rows, j]
    column = column[np.isfinite(column)]
    if column.size:
      ns.append(n)
      means.append(float(np.mean(column)))
  return ns, means


def _ratio(num: SamplesToTarget, den: SamplesToTarget, kinds: tuple[str, str]) -> tuple[Any, str, str]:
  """(value or None, bound, note) of num / den with the "at most" / "not reached" cases spelt out."""
  missing = [k for k, s in zip(kinds, (num, den)) if s.status == "not_reached"]
  if missing:
    return None, "=", f"not reached by {' and '.join(missing)}"
  if num.status == "at_most" and den.status == "at_most":
    return None, "=", "both kinds reach the target at the smallest size; add smaller sizes"
  value = num.value / den.value
  if num.status == "at_most":
    return value, "<=", f"{kinds[0]} reaches the target at the smallest size (ratio is an upper bound)"
  if den.status == "at_most":
    return value, ">=", f"{kinds[1]} reaches the target at the smallest size (ratio is a lower bound)"
  return value, "=", ""



def paired_samples_ratio(sizes: Sequence[float], errors_a: np.ndarray, errors_b: np.ndarray,
                         target: float, kinds: tuple[str, str], *, n_boot: int = 1000,
                         seed: int = 0) -> SamplesRatio:
  """Samples-to-target of curve a over that of curve b, over seeds paired row by row.

  Args:
    sizes: the distinct sizes, one per column of the error arrays.
    errors_a, errors_b: error [seeds, sizes] of each curve; row i of both is seed i, and
      NaN marks a missing result. Every row needs at least one result in each.
    target: the error both curves are to reach.
    kinds: names of the two curves (a, b), as the ratio's note spells them.
    n_boot: bootstrap replicates; 0 skips the interval.
    seed: seed of the bootstrap's NumPy generator.

  A replicate in which a curve reaches the target only "at most" at the smallest size
  contributes that bound as its value; one in which a curve does not reach it is left out
  (boot_ok counts the rest).
  """
  errors = (np.asarray(errors_a, np.float64), np.asarray(errors_b, np.float64))
  if errors[0].shape != errors[1].shape or errors[0].shape[1:] != (len(sizes),):
    raise ValueError(f"paired errors need one [seeds, sizes={len(sizes)}] shape; got "
                     f"{errors[0].shape} and {errors[1].shape}.")
  pairs = len(errors[0])

  def crossings(rows):
    return tuple(samples_to_target(*_curve(sizes, e, rows), target) for e in errors)

  num, den = crossings(np.arange(pairs))
  value, bound, note = _ratio(num, den, kinds)
  rng = np.random.default_rng(seed)
  boot = []
  # No interval around a ratio that does not exist: resamples could only invent one.
  for _ in range(n_boot if value is not None else 0):
    r, _, _ = _ratio(*crossings(rng.choice(pairs, size=pairs, replace=True)), kinds)
    if r is not None:
      boot.append(r)
  ci = intervals.percentile_interval(np.array(boot)) if len(boot) >= 2 else None
  return SamplesRatio(kinds=tuple(kinds), target=float(target), numerator=num, denominator=den,
                      value=value, bound=bound, note=note, ci=ci, n_boot=n_boot,
                      boot_ok=len(boot), pairs=pairs)
