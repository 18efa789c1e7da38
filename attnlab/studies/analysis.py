"""A study's cells as statistics: per-(kind, n) intervals, paired differences, fits, ratios.

The glue between the cell records (`results`) and the pure statistics
(`attnlab/stats`): it groups cells by kind, n and seed and hands numbers on.
Seeds are paired across kinds (same subset, same initial key), which is what
makes the paired difference and the paired bootstrap of the samples ratio
meaningful. Failed cells (NaN) are counted, never averaged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from attnlab.stats import fits
from attnlab.stats import intervals
from attnlab.stats import power_law
from attnlab.stats import proportions
from attnlab.stats import targets
from attnlab.studies.results import CellResult
from attnlab.studies.results import check_cells
from attnlab.studies.results import check_kinds
from attnlab.studies.results import finite


@dataclasses.dataclass(frozen=True)
class SummaryRow:
  """One (kind, n): seeds with a result, failed seeds, and test error / loss over seeds."""
  kind: str
  n: int
  seeds: int
  failed: int
  error: intervals.Interval
  loss: intervals.Interval


@dataclasses.dataclass(frozen=True)
class DifferenceRow:
  """Paired difference kind_a - kind_b at one n, over the `pairs` seeds both kinds finished."""
  n: int
  kind_a: str
  kind_b: str
  pairs: int
  error: intervals.Interval
  loss: intervals.Interval


def summarize(cells: Sequence[CellResult]) -> list[SummaryRow]:
  """Per (kind, n): seed count and mean test error / loss with 95% t-intervals over seeds.

  Failed cells (NaN metrics) are counted in `failed` and left out of the means.
  Rows are sorted by kind, then n.
  """
  cells = check_cells(cells)
  rows = []
  for kind, n in sorted({(c.kind, c.n) for c in cells}):
    group = [c for c in cells if c.kind == kind and c.n == n]
    done = finite(group)
    if done:
      error = intervals.t_interval([c.test_error for c in done])
      loss = intervals.t_interval([c.test_loss for c in done])
    else:
      error = loss = intervals.NO_VALUES
    rows.append(SummaryRow(kind, n, len(done), len(group) - len(done), error, loss))
  return rows


def paired_differences(cells: Sequence[CellResult],
                       kinds: tuple[str, str] = ("sigmoid", "softmax")) -> list[DifferenceRow]:
  """Per n: kinds[0] - kinds[1] in test error and loss, paired by seed, with 95% t-intervals.

  Only seeds with a finite result for both kinds at that n count (`pairs` says how many);
  an n where no seed is paired gets NaN intervals and pairs=0.
  """
  cells = check_cells(cells)
  check_kinds(cells, kinds, "kinds")
  kind_a, kind_b = kinds
  by_key = {(c.kind, c.n, c.seed): c for c in finite(cells)}
  rows = []
  for n in sorted({c.n for c in cells if c.kind in kinds}):
    seeds = _paired_seeds(by_key, kinds, n)
    if not seeds:
      rows.append(DifferenceRow(n, kind_a, kind_b, 0, intervals.NO_VALUES, intervals.NO_VALUES))
      continue
    a = [by_key[(kind_a, n, s)] for s in seeds]
    b = [by_key[(kind_b, n, s)] for s in seeds]
    error = intervals.paired_t_interval([x.test_error for x in a], [y.test_error for y in b])
    loss = intervals.paired_t_interval([x.test_loss for x in a], [y.test_loss for y in b])
    rows.append(DifferenceRow(n, kind_a, kind_b, len(seeds), error, loss))
  return rows


def _paired_seeds(by_key: dict[tuple[str, int, int], object], kinds: tuple[str, str],
                  n: int) -> list[int]:
  """The seeds, sorted, that `by_key` ({(kind, n, seed): ...}) holds at n for both kinds."""
  return sorted(s for (k, m, s) in by_key if k == kinds[0] and m == n and (kinds[1], n, s) in by_key)


def fit_kinds(cells: Sequence[CellResult], kinds: Sequence[str],
              floor: bool | Literal["auto"], n_boot: int,
              seed: int) -> dict[str, power_law.PowerLawFit | str]:
  """Power-law fit of each kind's test error, or the reason there is none (a FitError's message)."""
  out = {}
  for kind in kinds:
    mine = [c for c in cells if c.kind == kind]
    try:
      out[kind] = power_law.fit_power_law([c.n for c in mine], [c.test_error for c in mine],
                                          floor=floor, n_boot=n_boot, seed=seed)
    except fits.FitError as e:
      out[kind] = f"no fit: {e}"
  return out


def fit_difference(cells: Sequence[CellResult], kind_fits: dict[str, power_law.PowerLawFit | str],
                   kinds: tuple[str, str] = ("sigmoid", "softmax"), *, n_boot: int = 1000,
                   seed: int = 0) -> power_law.PowerLawDifference | str:
  """Power-law b and c of kinds[0] minus kinds[1], paired by seed, or why there is none.

  `kind_fits` are the kinds' own fits (`fit_kinds`); each kind keeps its fit's floor decision.
  """
  unfitted = [k for k in kinds if not isinstance(kind_fits.get(k), power_law.PowerLawFit)]
  if unfitted:
    return "no difference: " + "; ".join(f"{k}: {kind_fits.get(k, 'not fitted')}" for k in unfitted)
  errors = {(c.kind, c.n, c.seed): c.test_error for c in finite(check_cells(cells))}
  keys = [(n, s) for n in sorted({n for _, n, _ in errors}) for s in _paired_seeds(errors, kinds, n)]
  try:
    return power_law.paired_fit_difference(
        [n for n, _ in keys], [errors[(kinds[0], *k)] for k in keys],
        [errors[(kinds[1], *k)] for k in keys],
        floors=(kind_fits[kinds[0]].floor, kind_fits[kinds[1]].floor), n_boot=n_boot, seed=seed)
  except fits.FitError as e:
    return f"no difference: {e}"


def samples_ratio(cells: Sequence[CellResult], target: float,
                  kinds: tuple[str, str] = ("softmax", "sigmoid"), *,
                  n_boot: int = 1000, seed: int = 0) -> targets.SamplesRatio:
  """Ratio of samples-to-target, kinds[0] over kinds[1] (> 1: kinds[1] needs fewer samples).

  Uses the seeds with results for both kinds, paired as `targets.paired_samples_ratio`
  describes (the same bootstrap draw of seeds at every n and for both kinds).
  """
  cells = check_cells(cells)
  check_kinds(cells, kinds, "kinds")
  done = finite(cells)
  by_key = {(c.kind, c.n, c.seed): c.test_error for c in done}
  seeds = sorted({c.seed for c in done if c.kind == kinds[0]} & {c.seed for c in done if c.kind == kinds[1]})
  if not seeds:
    raise ValueError(f"no seed has results for both {kinds}; the ratio needs paired seeds.")
  sizes = sorted({c.n for c in done if c.kind in kinds})
  errors = [np.array([[by_key.get((kind, n, s), math.nan) for n in sizes] for s in seeds])
            for kind in kinds]
  return targets.paired_samples_ratio(sizes, *errors, target, tuple(kinds), n_boot=n_boot, seed=seed)


@dataclasses.dataclass(frozen=True)
class SolvedRow:
  """One n: how many paired seeds of each compared kind reached the target error.

  Attributes:
    n: the training-set size.
    kinds: (kind_a, kind_b).
    pairs: seeds with a result for both kinds at n, a failed (diverged) one included.
    solved: seeds (of those pairs) whose test error is <= the target, per kind; a cell that
      diverged did not reach it.
    intervals: the 95% Wilson interval of each kind's proportion solved/pairs.
    only: discordant pairs: (seeds only kind_a solved, seeds only kind_b solved).
    p_value: McNemar's exact two-sided p-value on the discordant pairs.
  """

  n: int
  kinds: tuple[str, str]
  pairs: int
  solved: tuple[int, int]
  intervals: tuple[tuple[float, float], tuple[float, float]]
  only: tuple[int, int]
  p_value: float


def solved_at_target(cells: Sequence[CellResult], target: float,
                     kinds: tuple[str, str] = ("sigmoid", "softmax")) -> list[SolvedRow]:
  """Per n, sorted: the paired seeds each kind brought to test error <= `target`.

  Where the error over seeds is bimodal (a cell solves the task or memorises it), the
  proportion of seeds that solve is the figure the mean error hides. Seeds are paired
  (same subset and initial key for both kinds), so the kinds are compared on the
  discordant pairs (McNemar). An n where no seed is paired is left out.

  A diverged cell (NaN error) counts as not solved, its pair kept: leaving the pair out
  would favour the kind that diverges more.
  """
  cells = check_cells(cells)
  check_kinds(cells, kinds, "kinds")
  errors = {(c.kind, c.n, c.seed): c.test_error for c in cells}  # NaN <= target is False
  rows = []
  for n in sorted({c.n for c in cells if c.kind in kinds}):
    seeds = _paired_seeds(errors, kinds, n)
    if not seeds:
      continue
    hits = [[errors[kind, n, s] <= target for s in seeds] for kind in kinds]
    solved = (sum(hits[0]), sum(hits[1]))
    only = (sum(a and not b for a, b in zip(*hits)), sum(b and not a for a, b in zip(*hits)))
    rows.append(SolvedRow(
        n, tuple(kinds), len(seeds), solved,
        tuple(proportions.wilson_interval(k, len(seeds)) for k in solved),
        only, proportions.mcnemar_exact_p(*only)))
  return rows


@dataclasses.dataclass(frozen=True)
class EndOfTrainingRow:
  """How one (kind, n)'s cells ended training: signs of whether the budget sufficed.

  Attributes:
    kind, n: the cell group.
    cells: cells that trained to their budget (failed cells are left out).
    best_at_end: of those selected on a validation split, the cells whose selected step
      was their last: their validation error was still falling (or level), so a larger
      budget may lower it. None: no cell was selected on a validation split (the last
      step is then always the one kept, and says nothing).
    train_loss: the last update's training loss (one batch) over the cells that
      recorded one: (median, min, max); None if none did. One cell far above the
      others marks a cell still on a plateau, not one that lacked data.
    spiked: (cells whose training loss spiked at least once (`loss_spikes`), cells
      that recorded a learning curve); None if none recorded one. A spike
      after the fit can undo what the cell had learned (a generalising MQAR cell fell
      back to memorising): its selected step may then predate the spike.
  """

  kind: str
  n: int
  cells: int
  best_at_end: int | None
  train_loss: tuple[float, float, float] | None
  spiked: tuple[int, int] | None = None


# A rise of the training loss by this factor above the loss recorded at the previous
# selection point, to at least the floor, is a spike:
# far beyond one batch's noise once a cell has fit its data (loss ~1e-6 -> ~1), and out of
# reach of a loss that sits at a label-smoothing floor (~0.5).
SPIKE_FACTOR = 100.0
SPIKE_FLOOR = 0.01


def loss_spikes(curve: Sequence[Sequence[float | None]] | None) -> list[int]:
  """The steps of a cell's learning curve (`CellResult.curve`) where its training loss spiked.

  A spike at a selection point: the largest training loss since the previous point
  (`train_loss_max`) is SPIKE_FACTOR times the training loss recorded at that previous
  point, and at least SPIKE_FLOOR. Points without a training loss are skipped. A point
  without the maximum (records from before it was kept, or the first point after a
  resume from such a checkpoint) falls back to its own one-batch loss, which misses a
  spike that rose and fell between two points.
  """
  points = [(p[0], p[3], p[4] if len(p) > 4 and p[4] is not None else p[3])
            for p in curve or () if p[3] is not None]
  return [step for (_, before, _), (step, _, highest) in zip(points, points[1:])
          if highest >= SPIKE_FLOOR and highest >= SPIKE_FACTOR * before]


def end_of_training(cells: Sequence[CellResult]) -> list[EndOfTrainingRow]:
  """Per (kind, n), sorted: how many cells' best step was their last, their final training
  loss, and how many had a training-loss spike."""
  cells = check_cells(cells)
  rows = []
  for kind, n in sorted({(c.kind, c.n) for c in cells}):
    done = finite([c for c in cells if c.kind == kind and c.n == n])
    selected = [c for c in done if c.val_error is not None and c.best_step is not None]
    best_at_end = (sum(c.best_step == c.steps for c in selected) if selected else None)
    losses = [c.train_loss for c in done if c.train_loss is not None]
    train_loss = ((float(np.median(losses)), float(min(losses)), float(max(losses)))
                  if losses else None)
    curved = [c for c in done if c.curve]
    spiked = (sum(bool(loss_spikes(c.curve)) for c in curved), len(curved)) if curved else None
    rows.append(EndOfTrainingRow(kind, n, len(done), best_at_end, train_loss, spiked))
  return rows


# --------------------------------------------------------------------------- budget check


@dataclasses.dataclass(frozen=True)
class BudgetCheckRow:
  """One (kind, n) trained under a budget and under a larger one (e.g. doubled).

  Attributes:
    kind, n: the cell group.
    seeds: the seeds compared (those with a finite result under both budgets).
    base, larger: mean test error over those seeds under each budget.
    change: larger - base, with its paired t-interval over the seeds (the same seed's
      subset, initial key and order under both budgets, so seed-to-seed variation
      cancels; `change.mean` is larger - base).
    seed_spread: standard deviation of the test error over those seeds under the base
      budget.
    converged: |change| < seed_spread: more training moves the error by less
      than the seeds do, so the base budget measures the data, not the optimiser.
  """

  kind: str
  n: int
  seeds: int
  base: float
  larger: float
  change: intervals.Interval
  seed_spread: float
  converged: bool


def budget_check(base: Sequence[CellResult], larger: Sequence[CellResult]) -> list[BudgetCheckRow]:
  """Whether a study's budget has converged: the same cells under a larger budget.

  The larger-budget study may hold fewer cells than the base one (some sizes, some
  seeds: it costs twice as much); each (kind, n) it holds is compared on the seeds
  both studies finished, seed by seed.

  Args:
    base: the study's cells.
    larger: some of the same (kind, n, seed) cells trained with a larger budget.

  Raises:
    ValueError: `larger` holds a (kind, n) the base study lacks, or one with no seed
      finished under both budgets.
  """
  def errors(cells):
    out: dict[tuple[str, int], dict[int, float]] = {}
    for c in finite(check_cells(cells)):
      out.setdefault((c.kind, c.n), {})[c.seed] = c.test_error
    return out

  ours, theirs = errors(base), errors(larger)
  extra = sorted(set(theirs) - set(ours))
  if extra:
    raise ValueError(f"The larger-budget study holds (kind, n) groups the base study lacks: "
                     f"{extra}; compare studies of the same cells.")
  rows = []
  for kind, n in sorted(theirs):
    seeds = sorted(set(ours[kind, n]) & set(theirs[kind, n]))
    if not seeds:
      raise ValueError(f"({kind!r}, {n}): no seed finished under both budgets (base seeds "
                       f"{sorted(ours[kind, n])}, larger {sorted(theirs[kind, n])}).")
    before = [ours[kind, n][s] for s in seeds]
    after = [theirs[kind, n][s] for s in seeds]
    change = intervals.paired_t_interval(after, before)
    spread = float(np.std(before, ddof=1)) if len(seeds) > 1 else math.nan
    rows.append(BudgetCheckRow(kind, n, len(seeds), float(np.mean(before)), float(np.mean(after)),
                               change, spread, bool(abs(change.mean) < spread)))
  return rows

