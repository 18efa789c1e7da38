"""The power law error(n) = a * n^-b + c, its floor test and its bootstrap intervals.

  * Fitted by `scipy.optimize.curve_fit` to the per-n mean errors in log space (every
    decade weighs the same, as on the log-log plot), parametrised as log A, b, c with A
    the curve's value at the geometric-mean n, which keeps A and b nearly uncorrelated.
    Bounds: b >= 0, 0 <= c < min(mean error).
  * floor="auto" keeps c only when an F-test of the nested fits (with vs without c) rejects
    "no floor" at the 5% level; with fewer than 4 sizes there is no test and no floor.
  * Bootstrap: a seeded NumPy loop; seeds are resampled with replacement within each n and
    the chosen model is refitted.
  * Two kinds run on the same seeds: `paired_fit_difference` gives the interval of their
    b and c differences (one draw of seeds for both kinds per replicate).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import optimize, stats

from attnlab.stats import intervals
from attnlab.stats.fits import FitError
from attnlab.stats.fits import group_by_n

_FLOOR_TEST_ALPHA = 0.05  # F-test level at which floor="auto" keeps the floor


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """error(n) = a * n^-b + c fitted to per-n mean errors, with bootstrap 95% intervals.

  Attributes:
    a, b, c: point estimates (c is 0.0 when the fit has no floor).
    floor: whether c was fitted.
    criterion: in words, why the floor was kept or dropped.
    a_ci, b_ci, c_ci: (low, high) percentile intervals; (0, 0) for c without a floor,
      (NaN, NaN) when no bootstrap was run.
    rss: residual sum of squares in log error.
    sizes: number of distinct n fitted.
    n_boot: bootstrap replicates asked for; boot_ok: replicates whose refit converged.
  """
  a: float
  b: float
  c: float
  floor: bool
  criterion: str
  a_ci: tuple[float, float]
  b_ci: tuple[float, float]
  c_ci: tuple[float, float]
  rss: float
  sizes: int
  n_boot: int
  boot_ok: int

  def predict(self, n: Any) -> np.ndarray:
    return self.a * np.asarray(n, dtype=np.float64) ** -self.b + self.c



def _log_power_law(x: np.ndarray, log_A: float, b: float, c: float = 0.0) -> np.ndarray:
  """log(A * exp(-b x) + c) with x = log(n / n0): the model in the space it is fitted in."""
  return np.log(np.exp(log_A - b * x) + c)


def _curve_fit_from(x: np.ndarray, log_e: np.ndarray, start: tuple[float, float, float],
                    floor: bool, c_max: float) -> np.ndarray | None:
  """(log A, b, c) from one start, or None where curve_fit fails from there."""
  log_A0, b0, c0 = start
  b0 = max(b0, 1e-3)  # strictly inside b >= 0, where trf starts best
  # Only the point estimate is used (intervals come from the bootstrap), so
  # curve_fit's warning that it cannot estimate the covariance (e.g. from
  # two sizes) is noise.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optimize.OptimizeWarning)
    return _curve_fit_unwarned(x, log_e, (log_A0, b0, c0), floor, c_max)


def _curve_fit_unwarned(x, log_e, start, floor: bool, c_max: float) -> np.ndarray | None:
  log_A0, b0, c0 = start
  try:
    if floor:
      c0 = min(max(c0, 0.0), 0.99 * c_max)
      p, _ = optimize.curve_fit(_log_power_law, x, log_e, p0=(log_A0, b0, c0), method="trf",
                                bounds=([-np.inf, 0.0, 0.0], [np.inf, np.inf, c_max]))
      return p
    p, _ = optimize.curve_fit(lambda x, log_A, b: _log_power_law(x, log_A, b), x, log_e,
                              p0=(log_A0, b0), bounds=([-np.inf, 0.0], [np.inf, np.inf]), method="trf")
    return np.append(p, 0.0)
  except (RuntimeError, ValueError):  # curve_fit: no convergence / start outside the bounds
    return None


def _fit_means(sizes: np.ndarray, means: np.ndarray, floor: bool,
               starts: Sequence[tuple[float, float, float]] | None = None) -> tuple[np.ndarray, float]:
  """Least-squares fit in log error from each start; returns the best ((a, b, c), rss).

  Raises:
    FitError: a mean error <= 0 (no logarithm), or no start converged.
  """
  if np.any(means <= 0):
    zero = sizes[means <= 0].astype(int).tolist()
    raise FitError(f"mean error is 0 at n={zero}; a power law in log space cannot pass through 0. "
                   "Fit only the sizes below those (the curve has already hit the floor) or fit the loss.")
  log_n, log_e = np.log(sizes), np.log(means)
  n0 = float(np.exp(log_n.mean()))  # A is the curve at n0: well inside the data, so A and b decouple
  x = log_n - math.log(n0)
  c_max = float(means.min()) * (1 - 1e-6)
  if starts is None:
    slope, intercept = np.polyfit(x, log_e, 1)
    # The floor's best value is unknown; a few starts across [0, min error) avoid a local minimum.
    starts = [(intercept, -slope, f * c_max) for f in ((0.01, 0.5, 0.9) if floor else (0.0,))]
  best = None
  for start in starts:
    p = _curve_fit_from(x, log_e, start, floor, c_max)
    if p is None:
      continue
    rss = float(np.sum((_log_power_law(x, *p) - log_e) ** 2))
    if best is None or rss < best[1]:
      best = (p, rss)
  if best is None:
    raise FitError(f"curve_fit did not converge on sizes {sizes.astype(int).tolist()} "
                   f"(floor={floor}); check the error curve for outliers.")
  (log_A, b, c), rss = best
  return np.array([math.exp(log_A) * n0 ** b, b, c]), rss


def _f_test(rss_without: float, rss_with: float, sizes: int) -> float:
  """p-value of adding the floor (one parameter) to the 2-parameter power law."""
  dof = sizes - 3
  if rss_with <= 0:
    return 0.0 if rss_without > 0 else 1.0
  f = (rss_without - rss_with) / (rss_with / dof)
  return float(stats.f.sf(max(f, 0.0), 1, dof))


def fit_power_law(n: Sequence[float], error: Sequence[float], *,
                  floor: bool | Literal["auto"] = "auto", n_boot: int = 1000,
                  seed: int = 0) -> PowerLawFit:
  """Fits error(n) = a * n^-b + c to per-cell errors, with bootstrap intervals over seeds.

  Args:
    n: training-set size of each cell (repeated once per seed).
    error: test error of each cell; NaN cells (failed) are left out.
    floor: True fits c, False fixes c = 0, "auto" keeps c only if an F-test of the nested
      fits rejects c = 0 at the 5% level (needs >= 4 sizes; otherwise no floor).
    n_boot: bootstrap replicates (seeds resampled with replacement within each n, model
      refitted with the floor decision of the point fit); 0 skips the bootstrap.
    seed: seed of the bootstrap's NumPy generator, so intervals are reproducible.

  Returns:
    A PowerLawFit. Raises FitError when the data cannot be fitted.
  """
  if floor not in (True, False, "auto"):
    raise ValueError(f"floor must be True, False or 'auto'; got {floor!r}.")
  sizes, groups = group_by_n(n, error)
  need = 3 if floor is True else 2
  if sizes.size < need:
    raise FitError(f"a power law with floor={floor!r} needs results at >= {need} distinct sizes; "
                   f"got {sizes.astype(int).tolist()}. Add sizes to study.train_sizes.")
  means = np.array([g.mean() for g in groups])

  if floor == "auto":
    p0, rss0 = _fit_means(sizes, means, floor=False)
    if sizes.size < 4:
      use_floor, p, rss = False, p0, rss0
      criterion = f"no floor: the F-test needs >= 4 sizes, got {sizes.size}"
    else:
      p1, rss1 = _fit_means(sizes, means, floor=True)
      pvalue = _f_test(rss0, rss1, sizes.size)
      use_floor = pvalue < _FLOOR_TEST_ALPHA
      p, rss = (p1, rss1) if use_floor else (p0, rss0)
      criterion = (f"floor {'kept' if use_floor else 'dropped'}: F-test p={pvalue:.3g} "
                   f"{'<' if use_floor else '>='} {_FLOOR_TEST_ALPHA}")
  else:
    use_floor = bool(floor)
    p, rss = _fit_means(sizes, means, floor=use_floor)
    criterion = f"floor={'fitted' if use_floor else 'fixed at 0'} (asked)"

  samples = _bootstrap_fit(sizes, groups, use_floor, p, n_boot, seed)
  nan = (math.nan, math.nan)
  cis = [intervals.percentile_interval(samples[:, i]) if len(samples) else nan for i in range(3)]
  return PowerLawFit(a=float(p[0]), b=float(p[1]), c=float(p[2]), floor=use_floor,
                     criterion=criterion, a_ci=cis[0], b_ci=cis[1],
                     c_ci=cis[2] if use_floor else (0.0, 0.0), rss=rss, sizes=int(sizes.size),
                     n_boot=n_boot, boot_ok=len(samples))


def _start_at(point: np.ndarray, sizes: np.ndarray) -> tuple[float, float, float]:
  """A fitted (a, b, c) as a start of `_fit_means` (its log A, b, c parametrisation)."""
  n0 = float(np.exp(np.log(sizes).mean()))
  return (math.log(point[0]) - point[1] * math.log(n0), point[1], point[2])


def _refit(sizes: np.ndarray, means: np.ndarray, floor: bool,
           start: tuple[float, float, float]) -> np.ndarray | None:
  """A bootstrap replicate's (a, b, c), or None when no start converges."""
  try:
    return _fit_means(sizes, means, floor, starts=[start])[0]
  except FitError:
    try:  # a resample far from the data's own curve may need the default starts
      return _fit_means(sizes, means, floor)[0]
    except FitError:
      return None


def _bootstrap_fit(sizes: np.ndarray, groups: list[np.ndarray], floor: bool, point: np.ndarray,
                   n_boot: int, seed: int) -> np.ndarray:
  """[replicates, 3] refitted (a, b, c); replicates whose fit fails are dropped."""
  rng = np.random.default_rng(seed)
  # Starting at the point estimate makes most refits a few iterations long.
  start = _start_at(point, sizes)
  out = []
  for _ in range(n_boot):
    means = np.array([rng.choice(g, size=g.size, replace=True).mean() for g in groups])
    p = _refit(sizes, means, floor, start)
    if p is not None:
      out.append(p)
  return np.array(out).reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class PowerLawDifference:
  """Fitted exponent b and floor c of kind A minus kind B, with paired bootstrap intervals.

  Two per-kind intervals that overlap say little about the difference; this is its own
  interval, from resampling the seeds both kinds ran (the same draw for both at each n).

  Attributes:
    b, c: point differences A - B, both kinds fitted to the per-n means of the paired seeds.
    b_ci, c_ci: (low, high) 95% percentile intervals; (NaN, NaN) when no bootstrap ran.
    floors: whether each kind's fit has a floor (a kind without one has c = 0, so c is then
      the other kind's floor, not a difference of two fitted floors).
    min_pairs: the fewest paired seeds at any n.
    n_boot: replicates asked for; boot_ok: replicates where both kinds' refits converged.
  """
  b: float
  c: float
  b_ci: tuple[float, float]
  c_ci: tuple[float, float]
  floors: tuple[bool, bool]
  min_pairs: int
  n_boot: int
  boot_ok: int


def paired_fit_difference(n: Sequence[float], error_a: Sequence[float], error_b: Sequence[float], *,
                          floors: tuple[bool, bool], n_boot: int = 1000,
                          seed: int = 0) -> PowerLawDifference:
  """Paired bootstrap of the power-law fits of two kinds run on the same seeds.

  Args:
    n: training-set size of each pair of cells.
    error_a, error_b: test errors of kind A's and kind B's cell of the same (n, seed); pairs
      where either is NaN (failed) are left out.
    floors: each kind's floor decision (as its own `fit_power_law` made it); kept fixed in
      the bootstrap, as there.
    n_boot: replicates: at each n the paired seeds are resampled with replacement, the same
      draw for both kinds, and both are refitted; 0 skips the bootstrap.
    seed: seed of the bootstrap's NumPy generator.

  Raises:
    ValueError: the three sequences differ in length.
    FitError: either kind cannot be fitted on the paired seeds.
  """
  n, error_a, error_b = (np.asarray(x, dtype=np.float64) for x in (n, error_a, error_b))
  if not n.shape == error_a.shape == error_b.shape or n.ndim != 1:
    raise ValueError(f"n, error_a and error_b must be 1-D arrays of one length (one entry per "
                     f"paired seed); got shapes {n.shape}, {error_a.shape}, {error_b.shape}.")
  both = np.isfinite(error_a) & np.isfinite(error_b)
  n, error_a, error_b = n[both], error_a[both], error_b[both]
  sizes, _ = group_by_n(n, error_a)
  groups = [np.stack([error_a[n == s], error_b[n == s]]) for s in sizes]  # [2, pairs] per n
  need = 3 if any(floors) else 2
  if sizes.size < need:
    raise FitError(f"a paired power-law difference with floors={floors} needs paired results at "
                   f">= {need} distinct sizes; got {sizes.astype(int).tolist()}.")
  points = [_fit_means(sizes, np.array([g[k].mean() for g in groups]), floors[k])[0] for k in (0, 1)]
  starts = [_start_at(p, sizes) for p in points]
  rng = np.random.default_rng(seed)
  diffs = []
  for _ in range(n_boot):
    drawn = [g[:, rng.integers(0, g.shape[1], size=g.shape[1])] for g in groups]
    refits = [_refit(sizes, np.array([d[k].mean() for d in drawn]), floors[k], starts[k])
              for k in (0, 1)]
    if refits[0] is not None and refits[1] is not None:
      diffs.append(refits[0] - refits[1])
  diffs = np.array(diffs).reshape(-1, 3)
  nan = (math.nan, math.nan)
  b_ci, c_ci = (intervals.percentile_interval(diffs[:, i]) if len(diffs) else nan for i in (1, 2))
  return PowerLawDifference(b=float(points[0][1] - points[1][1]), c=float(points[0][2] - points[1][2]),
                            b_ci=b_ci, c_ci=c_ci, floors=tuple(floors),
                            min_pairs=int(min(g.shape[1] for g in groups)), n_boot=n_boot,
                            boot_ok=len(diffs))
