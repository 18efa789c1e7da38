"""From per-cell study results to intervals, power-law fits, samples-to-target and a report.

Pure NumPy/SciPy (no JAX), so `eval.py` can re-render a report from saved
results on any machine. A study has one `CellResult` per (kind, n, seed); seeds
are paired across kinds (same subset, same initial key), which is what makes the
paired difference and the paired bootstrap of the samples ratio meaningful.

Statistical choices, stated once here and repeated in report.md:
  * Intervals over seeds are 95% Student-t intervals: mean +- t(0.975, k-1) * s / sqrt(k),
    s the sample standard deviation (ddof=1). With one seed there is no interval (NaN).
  * Paired differences (kind A - kind B) use only seeds with a finite result for both kinds
    at that n, and the t-interval of the per-seed differences.
  * The power law error(n) = a * n^-b + c is fitted by `scipy.optimize.curve_fit` to the
    per-n mean errors in log space (every decade weighs the same, as on the log-log plot),
    parametrised as log A, b, c with A the curve's value at the geometric-mean n, which keeps
    A and b nearly uncorrelated. Bounds: b >= 0, 0 <= c < min(mean error).
  * floor="auto" keeps c only when an F-test of the nested fits (with vs without c) rejects
    "no floor" at the 5% level; with fewer than 4 sizes there is no test and no floor.
  * Bootstrap: a seeded NumPy loop. For the fit, seeds are resampled with replacement within
    each n and the chosen model is refitted; for the samples ratio, seed ids are resampled
    once per replicate and the same draw is used at every n and for both kinds (pairing kept).
    Intervals are 2.5/97.5 percentiles of the replicates that could be computed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
_FLOOR_TEST_ALPHA = 0.05  # F-test level at which floor="auto" keeps the floor


# --------------------------------------------------------------------------- cell records


@dataclasses.dataclass(frozen=True)
class CellResult:
  """What one trained (kind, n, seed) cell produced.

  Attributes:
    kind: attention kind (a registered name, e.g. "softmax", "sigmoid").
    n: training-set size of the cell.
    seed: seed of the cell; the same seed in two kinds means the same subset and init key.
    test_error: test error rate (1 - accuracy) at the selected step; NaN if the cell failed.
    test_loss: test loss at the selected step; NaN if the cell failed.
    val_error: validation error at the selected step, if model selection used one.
    val_loss: validation loss at the selected step.
    best_step: step selected on the validation split.
    steps: steps trained (the budget the rule gave this n).
    wall_seconds: training wall time attributed to the cell.
    budget: the budget rule in words, e.g. "epochs=100, min_steps=500".
    diverged_at: the step whose update was non-finite (the cell failed); None: it trained.
    train_loss: training loss of the cell's last applied update.
  """
  kind: str
  n: int
  seed: int
  test_error: float
  test_loss: float
  val_error: float | None = None
  val_loss: float | None = None
  best_step: int | None = None
  steps: int | None = None
  wall_seconds: float | None = None
  budget: str | None = None
  diverged_at: int | None = None
  train_loss: float | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, record: dict[str, Any]) -> CellResult:
    """Builds a cell from `to_dict`'s output; unknown keys are an error, not silently lost."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - names)
    if unknown:
      raise ValueError(f"cell record has unknown fields {unknown}; known fields: {sorted(names)}.")
    # save_cells writes a failed cell's NaN metrics as null.
    metrics = {k: math.nan for k in ("test_error", "test_loss") if record.get(k, 0.0) is None}
    return cls(**{**record, **metrics})


def _finite(cells: Iterable[CellResult]) -> list[CellResult]:
  """Cells that produced a result; a failed cell (NaN) is reported, never averaged."""
  return [c for c in cells if math.isfinite(c.test_error) and math.isfinite(c.test_loss)]


def _check_cells(cells: Sequence[CellResult]) -> list[CellResult]:
  cells = list(cells)
  if not cells:
    raise ValueError("no cell results to analyse; run the study first (train.py with the study config).")
  for c in cells:
    if not isinstance(c, CellResult):
      raise ValueError(f"cells must be CellResult records; got {type(c).__name__}.")
  seen = set()
  for c in cells:
    key = (c.kind, c.n, c.seed)
    if key in seen:
      raise ValueError(f"cell (kind={c.kind!r}, n={c.n}, seed={c.seed}) appears twice; "
                       "each (kind, n, seed) must have exactly one result.")
    seen.add(key)
  return cells


def _check_kinds(cells: Sequence[CellResult], kinds: Sequence[str], argument: str) -> None:
  present = sorted({c.kind for c in cells})
  missing = [k for k in kinds if k not in present]
  if missing:
    raise ValueError(f"{argument}={tuple(kinds)} names kinds {missing} that have no cells; "
                     f"kinds present: {present}. Pass {argument}= with two of those.")


# --------------------------------------------------------------------------- t-intervals


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


@dataclasses.dataclass(frozen=True)
class SummaryRow:
  """One (kind, n): seeds with a result, failed seeds, and test error / loss over seeds."""
  kind: str
  n: int
  seeds: int
  failed: int
  error: Interval
  loss: Interval


@dataclasses.dataclass(frozen=True)
class DifferenceRow:
  """Paired difference kind_a - kind_b at one n, over the `pairs` seeds both kinds finished."""
  n: int
  kind_a: str
  kind_b: str
  pairs: int
  error: Interval
  loss: Interval


def summarize(cells: Sequence[CellResult]) -> list[SummaryRow]:
  """Per (kind, n): seed count and mean test error / loss with 95% t-intervals over seeds.

  Failed cells (NaN metrics) are counted in `failed` and left out of the means.
  Rows are sorted by kind, then n.
  """
  cells = _check_cells(cells)
  rows = []
  for kind, n in sorted({(c.kind, c.n) for c in cells}):
    group = [c for c in cells if c.kind == kind and c.n == n]
    done = _finite(group)
    if done:
      error = t_interval([c.test_error for c in done])
      loss = t_interval([c.test_loss for c in done])
    else:
      error = loss = Interval(math.nan, math.nan, math.nan, 0)
    rows.append(SummaryRow(kind, n, len(done), len(group) - len(done), error, loss))
  return rows


def paired_differences(cells: Sequence[CellResult],
                       kinds: tuple[str, str] = ("sigmoid", "softmax")) -> list[DifferenceRow]:
  """Per n: kinds[0] - kinds[1] in test error and loss, paired by seed, with 95% t-intervals.

  Only seeds with a finite result for both kinds at that n count (`pairs` says how many);
  an n where no seed is paired gets NaN intervals and pairs=0.
  """
  cells = _check_cells(cells)
  _check_kinds(cells, kinds, "kinds")
  kind_a, kind_b = kinds
  by_key = {(c.kind, c.n, c.seed): c for c in _finite(cells)}
  rows = []
  for n in sorted({c.n for c in cells if c.kind in kinds}):
    seeds = sorted(s for (k, m, s) in by_key if k == kind_a and m == n and (kind_b, n, s) in by_key)
    if not seeds:
      nan = Interval(math.nan, math.nan, math.nan, 0)
      rows.append(DifferenceRow(n, kind_a, kind_b, 0, nan, nan))
      continue
    a = [by_key[(kind_a, n, s)] for s in seeds]
    b = [by_key[(kind_b, n, s)] for s in seeds]
    error = t_interval([x.test_error - y.test_error for x, y in zip(a, b)])
    loss = t_interval([x.test_loss - y.test_loss for x, y in zip(a, b)])
    rows.append(DifferenceRow(n, kind_a, kind_b, len(seeds), error, loss))
  return rows


# --------------------------------------------------------------------------- power-law fit


class FitError(ValueError):
  """The data cannot be fitted (too few sizes, non-positive errors, no convergence)."""


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


def _group_by_n(n: Sequence[float], error: Sequence[float]) -> tuple[np.ndarray, list[np.ndarray]]:
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
  sizes, groups = _group_by_n(n, error)
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
  cis = [_percentiles(samples[:, i]) if len(samples) else nan for i in range(3)]
  return PowerLawFit(a=float(p[0]), b=float(p[1]), c=float(p[2]), floor=use_floor,
                     criterion=criterion, a_ci=cis[0], b_ci=cis[1],
                     c_ci=cis[2] if use_floor else (0.0, 0.0), rss=rss, sizes=int(sizes.size),
                     n_boot=n_boot, boot_ok=len(samples))


def _bootstrap_fit(sizes: np.ndarray, groups: list[np.ndarray], floor: bool, point: np.ndarray,
                   n_boot: int, seed: int) -> np.ndarray:
  """[replicates, 3] refitted (a, b, c); replicates whose fit fails are dropped."""
  rng = np.random.default_rng(seed)
  n0 = float(np.exp(np.log(sizes).mean()))
  # Starting at the point estimate makes most refits a few iterations long.
  start = (math.log(point[0]) - point[1] * math.log(n0), point[1], point[2])
  out = []
  for _ in range(n_boot):
    means = np.array([rng.choice(g, size=g.size, replace=True).mean() for g in groups])
    try:
      p, _ = _fit_means(sizes, means, floor, starts=[start])
    except FitError:
      try:  # a resample far from the data's own curve may need the default starts
        p, _ = _fit_means(sizes, means, floor)
      except FitError:
        continue
    out.append(p)
  return np.array(out).reshape(-1, 3)


def _percentiles(x: np.ndarray) -> tuple[float, float]:
  tail = 100 * (1 - CONFIDENCE) / 2
  return float(np.percentile(x, tail)), float(np.percentile(x, 100 - tail))


# --------------------------------------------------------------------------- log-log slope


@dataclasses.dataclass(frozen=True)
class LogLogSlope:
  """log(mean value) = intercept + slope * log(n), least squares over the per-n means (or
  medians: `loglog_slope`'s statistic).

  Unlike `PowerLawFit` the slope is not bounded: a metric that levels off or grows with n
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
  sizes, groups = _group_by_n(n, value)
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
  ci = _percentiles(np.array(boot)) if len(boot) >= 2 else (math.nan, math.nan)
  return LogLogSlope(float(slope), float(intercept), ci, int(sizes.size), n_boot)


# --------------------------------------------------------------------------- samples to target


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


def _curve(seeds: Sequence[int], by_key: dict, kind: str, sizes: Sequence[int]) -> tuple[list, list]:
  """Sizes and mean errors of `kind` over `seeds` (repeats allowed: a bootstrap draw)."""
  ns, means = [], []
  for n in sizes:
    errs = [by_key[(kind, n, s)] for s in seeds if (kind, n, s) in by_key]
    if errs:
      ns.append(n)
      means.append(float(np.mean(errs)))
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


def samples_ratio(cells: Sequence[CellResult], target: float,
                  kinds: tuple[str, str] = ("softmax", "sigmoid"), *,
                  n_boot: int = 1000, seed: int = 0) -> SamplesRatio:
  """Ratio of samples-to-target, kinds[0] over kinds[1] (> 1: kinds[1] needs fewer samples).

  Uses the seeds with results for both kinds. The bootstrap draws seed ids with replacement
  once per replicate and uses that draw at every n and for both kinds, so the pairing (and
  the correlation across n of one seed's nested subsets) is kept. A replicate in which a
  kind reaches the target only "at most" at the smallest size contributes that bound as its
  value; one in which a kind does not reach it is left out (boot_ok counts the rest).
  """
  cells = _check_cells(cells)
  _check_kinds(cells, kinds, "kinds")
  done = _finite(cells)
  by_key = {(c.kind, c.n, c.seed): c.test_error for c in done}
  seeds = sorted({c.seed for c in done if c.kind == kinds[0]} & {c.seed for c in done if c.kind == kinds[1]})
  if not seeds:
    raise ValueError(f"no seed has results for both {kinds}; the ratio needs paired seeds.")
  sizes = sorted({c.n for c in done if c.kind in kinds})

  def crossings(draw):
    return tuple(samples_to_target(*_curve(draw, by_key, k, sizes), target) for k in kinds)

  num, den = crossings(seeds)
  value, bound, note = _ratio(num, den, kinds)
  rng = np.random.default_rng(seed)
  boot = []
  # No interval around a ratio that does not exist: resamples could only invent one.
  for _ in range(n_boot if value is not None else 0):
    r, _, _ = _ratio(*crossings(rng.choice(seeds, size=len(seeds), replace=True)), kinds)
    if r is not None:
      boot.append(r)
  ci = _percentiles(np.array(boot)) if len(boot) >= 2 else None
  return SamplesRatio(kinds=tuple(kinds), target=float(target), numerator=num, denominator=den,
                      value=value, bound=bound, note=note, ci=ci, n_boot=n_boot,
                      boot_ok=len(boot), pairs=len(seeds))


# --------------------------------------------------------------------------- budget check


@dataclasses.dataclass(frozen=True)
class BudgetCheckRow:
  """One (kind, n) trained under a budget and under a larger one (e.g. doubled).

  Attributes:
    kind, n: the cell group.
    base, larger: mean test error over seeds under each budget.
    change: larger - base.
    seed_spread: standard deviation of the test error over seeds under the base budget.
    converged: |change| < seed_spread: more training moves the error by less
      than the seeds do, so the base budget measures the data, not the optimiser.
  """

  kind: str
  n: int
  base: float
  larger: float
  change: float
  seed_spread: float
  converged: bool


def budget_check(base: Sequence[CellResult], larger: Sequence[CellResult]) -> list[BudgetCheckRow]:
  """Whether a study's budget has converged: the same cells under a larger budget.

  Args:
    base: the study's cells.
    larger: the same (kind, n, seed) cells trained with a larger budget.

  Raises:
    ValueError: the two studies do not hold the same (kind, n) groups.
  """
  def errors(cells):
    out: dict[tuple[str, int], list[float]] = {}
    for c in _finite(_check_cells(cells)):
      out.setdefault((c.kind, c.n), []).append(c.test_error)
    return out

  ours, theirs = errors(base), errors(larger)
  if set(ours) != set(theirs):
    raise ValueError(f"The studies differ in their (kind, n) groups: {sorted(set(ours) ^ set(theirs))}.")
  rows = []
  for kind, n in sorted(ours):
    spread = float(np.std(ours[kind, n], ddof=1)) if len(ours[kind, n]) > 1 else math.nan
    change = float(np.mean(theirs[kind, n]) - np.mean(ours[kind, n]))
    rows.append(BudgetCheckRow(kind, n, float(np.mean(ours[kind, n])),
                               float(np.mean(theirs[kind, n])), change, spread,
                               bool(abs(change) < spread)))
  return rows


def budget_check_markdown(rows: Sequence[BudgetCheckRow]) -> str:
  """The rows of `budget_check` as a markdown table."""
  lines = ["| kind | n | test error | larger budget | change | seed std | converged |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {r.kind} | {r.n} | {_fmt(r.base)} | {_fmt(r.larger)} | {r.change:+.4f} | "
            f"{_fmt(r.seed_spread)} | {'yes' if r.converged else 'no'} |" for r in rows]
  return "\n".join(lines)


# --------------------------------------------------------------------------- files


def _write_atomic(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
  """Writes through a temporary file so a killed re-render never leaves half a report."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
    write(f)
  os.replace(tmp, path)


def save_cells(cells: Sequence[CellResult], path: str) -> None:
  """Writes every cell to results.json ({"cells": [...]}); `load_cells` reads it back."""
  # A failed cell's NaN is written as null: strict JSON, so tools outside Python can read it.
  records = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in c.to_dict().items()} for c in cells]
  _write_atomic(path, lambda f: json.dump({"cells": records}, f, indent=1, allow_nan=False))


def load_cells(path: str) -> list[CellResult]:
  """Reads the cells `save_cells` wrote."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or "cells" not in data:
    raise ValueError(f"{path} is not a study results.json (no 'cells' list); was it written by save_cells?")
  return [CellResult.from_dict(r) for r in data["cells"]]


def _save_csv(cells: Sequence[CellResult], path: str) -> None:
  names = [f.name for f in dataclasses.fields(CellResult)]

  def write(f):
    w = csv.writer(f)
    w.writerow(names)
    for c in cells:
      w.writerow(["" if v is None else v for v in (getattr(c, k) for k in names)])
  _write_atomic(path, write)


def _fmt(x: float, digits: int = 4) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _fmt_interval(iv: Interval) -> str:
  if not math.isfinite(iv.mean):
    return "n/a"
  if not math.isfinite(iv.low):
    return f"{_fmt(iv.mean)} (one seed, no interval)"
  return f"{_fmt(iv.mean)} ± {_fmt(iv.half_width, 2)} [{_fmt(iv.low)}, {_fmt(iv.high)}]"


def _fmt_ci(ci: tuple[float, float]) -> str:
  return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _fit_kinds(cells: Sequence[CellResult], kinds: Sequence[str], floor, n_boot: int,
               seed: int) -> dict[str, PowerLawFit | str]:
  """Fit per kind, or the reason there is none (a FitError's message)."""
  fits = {}
  for kind in kinds:
    mine = [c for c in cells if c.kind == kind]
    try:
      fits[kind] = fit_power_law([c.n for c in mine], [c.test_error for c in mine], floor=floor,
                                 n_boot=n_boot, seed=seed)
    except FitError as e:
      fits[kind] = f"no fit: {e}"
  return fits


# Below this many paired seeds a percentile interval over seeds is too narrow to read as
# evidence: resampling N seeds gives at most C(2N-1, N) distinct draws (10 for N = 3), and
# on digits seeds 0-2 gave a ratio of 0.83 [0.78, 0.90] where seeds 0-9 give 1.00
# [0.89, 1.16] (docs/results.md, "Ten seeds").
MIN_SEEDS_FOR_EVIDENCE = 10


def few_seeds_caveat(pairs: int) -> str | None:
  """The report's warning for a bootstrap over fewer than MIN_SEEDS_FOR_EVIDENCE seeds, or None."""
  if pairs >= MIN_SEEDS_FOR_EVIDENCE:
    return None
  return (f"Only {pairs} paired seed{'s' if pairs != 1 else ''}: a bootstrap over them can draw "
          f"at most {math.comb(2 * pairs - 1, pairs)} distinct seed sets, so this interval (and "
          "the fits' intervals) understate the uncertainty. Read them as indicative; run at least "
          f"{MIN_SEEDS_FOR_EVIDENCE} seeds (--config.study.seeds) before reading them as evidence.")


def _report_markdown(rows, diffs, fits, crossings, ratio, target, compare, n_boot) -> str:
  lines = ["# Sample-efficiency study", "",
           f"Test error and loss per (kind, n): mean over seeds ± half-width of the "
           f"{CONFIDENCE:.0%} Student-t interval [low, high].", "",
           "| kind | n | seeds | failed | test error | test loss |", "|---|---|---|---|---|---|"]
  lines += [f"| {r.kind} | {r.n} | {r.seeds} | {r.failed} | {_fmt_interval(r.error)} | "
            f"{_fmt_interval(r.loss)} |" for r in rows]
  lines += ["", f"## Paired difference {compare[0]} - {compare[1]}", "",
            f"Per seed, {compare[0]} minus {compare[1]}, over the seeds both finished (pairs); "
            "negative error means "
            f"{compare[0]} is better. {CONFIDENCE:.0%} t-interval over pairs.", "",
            "| n | pairs | Δ test error | Δ test loss |", "|---|---|---|---|"]
  lines += [f"| {d.n} | {d.pairs} | {_fmt_interval(d.error)} | {_fmt_interval(d.loss)} |" for d in diffs]
  lines += ["", "## Power-law fit: error(n) = a · n^-b + c", "",
            "Least squares on per-n mean test error in log space; 95% bootstrap percentile intervals "
            f"({n_boot} replicates, seeds resampled within each n).", "",
            "| kind | a | b | c | floor rule | bootstrap refits |", "|---|---|---|---|---|---|"]
  for kind, fit in fits.items():
    if isinstance(fit, str):
      lines.append(f"| {kind} | – | – | – | {fit} | – |")
    else:
      c = f"{_fmt(fit.c)} {_fmt_ci(fit.c_ci)}" if fit.floor else "0 (no floor)"
      lines.append(f"| {kind} | {_fmt(fit.a)} {_fmt_ci(fit.a_ci)} | {_fmt(fit.b)} {_fmt_ci(fit.b_ci)} "
                   f"| {c} | {fit.criterion} | {fit.boot_ok}/{fit.n_boot} |")
  lines += ["", f"## Samples to target error {target:g}", "",
            "Smallest n at which the mean test error reaches the target, interpolated linearly in log n "
            "between the two bracketing sizes; never extrapolated beyond the grid.", "",
            "| kind | samples to target |", "|---|---|"]
  lines += [f"| {kind} | {s} |" for kind, s in crossings.items()]
  lines += ["", f"Ratio {ratio.kinds[0]} / {ratio.kinds[1]} (> 1: {ratio.kinds[1]} needs fewer samples), "
            f"over {ratio.pairs} paired seeds: **{ratio}**"]
  if ratio.value is not None:
    lines.append(f"(95% bootstrap interval over seeds, paired across kinds and sizes; "
                 f"{ratio.boot_ok}/{ratio.n_boot} resamples reached the target for both kinds)"
                 + (f". {ratio.note}." if ratio.note else "."))
    caveat = few_seeds_caveat(ratio.pairs)
    if caveat:
      lines += ["", f"**Caveat.** {caveat}"]
  return "\n".join(lines) + "\n"


def _plot(rows, diffs, fits, compare, error_path: str, diff_path: str) -> None:
  # A bare Figure renders with Agg and leaves pyplot's global backend (a notebook's) alone.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  for kind in sorted({r.kind for r in rows}):
    mine = [r for r in rows if r.kind == kind and math.isfinite(r.error.mean)]
    n = np.array([r.n for r in mine], dtype=np.float64)
    mean = np.array([r.error.mean for r in mine])
    (line,) = ax.plot(n, mean, "o-", label=kind)
    low = np.array([r.error.low for r in mine])
    high = np.array([r.error.high for r in mine])
    ok = np.isfinite(low)
    # A t-interval can dip below 0; clip at a tenth of the mean so the log axis can draw it.
    ax.fill_between(n[ok], np.maximum(low[ok], mean[ok] / 10), high[ok], color=line.get_color(), alpha=0.2)
    fit = fits.get(kind)
    if isinstance(fit, PowerLawFit) and n.size:
      grid = np.geomspace(n.min(), n.max(), 100)
      ax.plot(grid, fit.predict(grid), "--", color=line.get_color(),
              label=f"{kind} fit: b={fit.b:.2f}" + (f", c={fit.c:.3g}" if fit.floor else ""))
  ax.set(xscale="log", yscale="log", xlabel="training examples n", ylabel="test error",
         title=f"Test error vs n (mean, {CONFIDENCE:.0%} t-interval over seeds)")
  ax.legend()
  fig.tight_layout()
  _write_atomic(error_path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")

  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  d = [r for r in diffs if math.isfinite(r.error.mean)]
  n = np.array([r.n for r in d], dtype=np.float64)
  ax.plot(n, [r.error.mean for r in d], "o-")
  low = np.array([r.error.low for r in d])
  high = np.array([r.error.high for r in d])
  ok = np.isfinite(low)
  ax.fill_between(n[ok], low[ok], high[ok], alpha=0.2)
  ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set(xscale="log", xlabel="training examples n", ylabel=f"test error, {compare[0]} - {compare[1]}",
         title=f"Paired difference ({CONFIDENCE:.0%} t-interval over paired seeds)")
  fig.tight_layout()
  _write_atomic(diff_path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")


def write_report(cells: Sequence[CellResult], directory: str, *, target: float,
                 compare: tuple[str, str] = ("sigmoid", "softmax"),
                 ratio_kinds: tuple[str, str] = ("softmax", "sigmoid"),
                 floor: bool | Literal["auto"] = "auto", n_boot: int = 1000,
                 seed: int = 0) -> dict[str, str]:
  """Writes results.json, results.csv, report.md and two PNG plots into `directory`.

  Args:
    cells: every cell of the study (failed cells included; they are counted, not averaged).
    directory: where to write (created if missing); existing report files are replaced.
    target: test error that samples-to-target is measured at.
    compare: kinds of the paired difference, compare[0] - compare[1].
    ratio_kinds: kinds of the samples ratio, ratio_kinds[0] / ratio_kinds[1].
    floor: power-law floor rule, as in `fit_power_law`.
    n_boot: bootstrap replicates for the fits and the ratio.
    seed: bootstrap seed.

  Returns:
    {"json", "csv", "report", "error_plot", "difference_plot"}: the paths written.
  """
  cells = _check_cells(cells)
  _check_kinds(cells, compare, "compare")
  _check_kinds(cells, ratio_kinds, "ratio_kinds")
  os.makedirs(directory, exist_ok=True)
  paths = {name: os.path.join(directory, file) for name, file in (
      ("json", "results.json"), ("csv", "results.csv"), ("report", "report.md"),
      ("error_plot", "error_vs_n.png"), ("difference_plot", "paired_difference.png"))}

  rows = summarize(cells)
  diffs = paired_differences(cells, compare)
  kinds = sorted({c.kind for c in cells})
  fits = _fit_kinds(_finite(cells), kinds, floor, n_boot, seed)
  crossings = {}
  for kind in kinds:
    mine = [r for r in rows if r.kind == kind and r.seeds]
    crossings[kind] = (samples_to_target([r.n for r in mine], [r.error.mean for r in mine], target)
                       if mine else "no finished cells")
  ratio = samples_ratio(cells, target, ratio_kinds, n_boot=n_boot, seed=seed)

  save_cells(cells, paths["json"])
  _save_csv(cells, paths["csv"])
  text = _report_markdown(rows, diffs, fits, crossings, ratio, target, compare, n_boot)
  _write_atomic(paths["report"], lambda f: f.write(text))
  _plot(rows, diffs, fits, compare, paths["error_plot"], paths["difference_plot"])
  return paths
