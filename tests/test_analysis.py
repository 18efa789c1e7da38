"""Study statistics end to end: t-intervals, paired differences, power-law fits, samples-to-target,
the report files (attnlab/stats, attnlab/studies/{analysis,results,report}.py).

Expected values are computed by hand (in the comments) or come from synthetic curves with a
known exponent and floor; bootstrap counts are small so the module runs in seconds.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from attnlab.stats import fits
from attnlab.stats import intervals
from attnlab.stats import power_law
from attnlab.stats import targets
from attnlab.studies import analysis
from attnlab.studies import report
from attnlab.studies import results
from attnlab.studies.results import CellResult

SIZES = (100, 300, 1000, 3000, 10000, 30000, 100000)


def synthetic_cells(kind, a, b, c, *, seeds=5, noise=0.02, rng_seed=0, sizes=SIZES):
  """Cells whose error is a * n^-b + c times (1 + noise * N(0, 1)), one per (n, seed)."""
  rng = np.random.default_rng(rng_seed)
  cells = []
  for n in sizes:
    for s in range(seeds):
      err = (a * n ** -b + c) * (1 + noise * rng.standard_normal())
      cells.append(CellResult(kind=kind, n=n, seed=s, test_error=float(err), test_loss=float(2 * err)))
  return cells


def cell(kind, n, seed, error, loss=None):
  return CellResult(kind=kind, n=n, seed=seed, test_error=error,
                    test_loss=2 * error if loss is None else loss)


# --------------------------------------------------------------------------- t-intervals


def test_t_interval_matches_a_hand_computation():
  # mean 0.2; s = 0.1; se = 0.1 / sqrt(3) = 0.0577350; t(0.975, 2) = 4.3026527 -> half 0.2484138.
  iv = intervals.t_interval([0.1, 0.2, 0.3])
  assert iv.count == 3
  assert iv.mean == pytest.approx(0.2)
  assert iv.low == pytest.approx(0.2 - 0.2484138, abs=1e-6)
  assert iv.high == pytest.approx(0.2 + 0.2484138, abs=1e-6)


def test_t_interval_of_one_seed_has_no_width():
  iv = intervals.t_interval([0.4])
  assert iv.mean == 0.4 and iv.count == 1
  assert math.isnan(iv.low) and math.isnan(iv.high)


def test_summarize_per_kind_and_n_counts_failed_cells_apart():
  cells = [cell("softmax", 100, 0, 0.1), cell("softmax", 100, 1, 0.2), cell("softmax", 100, 2, 0.3),
           cell("softmax", 100, 3, math.nan), cell("sigmoid", 100, 0, 0.5), cell("sigmoid", 200, 0, 0.4)]
  rows = analysis.summarize(cells)
  assert [(r.kind, r.n, r.seeds, r.failed) for r in rows] == [
      ("sigmoid", 100, 1, 0), ("sigmoid", 200, 1, 0), ("softmax", 100, 3, 1)]
  softmax = rows[2]
  # The NaN cell is left out: the interval is the hand-computed one of [0.1, 0.2, 0.3].
  assert softmax.error.mean == pytest.approx(0.2)
  assert softmax.error.high == pytest.approx(0.2 + 0.2484138, abs=1e-6)
  assert softmax.loss.mean == pytest.approx(0.4)


def test_duplicate_cells_are_refused():
  with pytest.raises(ValueError, match=r"appears twice"):
    analysis.summarize([cell("softmax", 100, 0, 0.1), cell("softmax", 100, 0, 0.2)])


# --------------------------------------------------------------------------- paired differences


def test_paired_difference_uses_only_seeds_both_kinds_finished():
  cells = [
      # sigmoid has seeds 0-3; softmax has 1-4 and seed 3 failed: only seeds 1 and 2 pair.
      cell("sigmoid", 100, 0, 0.90), cell("sigmoid", 100, 1, 0.30), cell("sigmoid", 100, 2, 0.20),
      cell("sigmoid", 100, 3, 0.10),
      cell("softmax", 100, 1, 0.40), cell("softmax", 100, 2, 0.35), cell("softmax", 100, 3, math.nan),
      cell("softmax", 100, 4, 0.00),
  ]
  (row,) = analysis.paired_differences(cells)
  assert (row.n, row.kind_a, row.kind_b, row.pairs) == (100, "sigmoid", "softmax", 2)
  # Differences -0.10, -0.15: mean -0.125, s = 0.0353553, se = 0.025, t(0.975, 1) = 12.7062047.
  assert row.error.mean == pytest.approx(-0.125)
  assert row.error.half_width == pytest.approx(12.7062047 * 0.025, rel=1e-6)
  assert row.loss.mean == pytest.approx(-0.25)


def test_paired_difference_direction_is_configurable_and_kinds_are_checked():
  cells = [cell("sigmoid", 100, 0, 0.3), cell("softmax", 100, 0, 0.4)]
  (row,) = analysis.paired_differences(cells, kinds=("softmax", "sigmoid"))
  assert row.error.mean == pytest.approx(0.1)
  with pytest.raises(ValueError, match=r"kinds present: \['sigmoid', 'softmax'\]"):
    analysis.paired_differences(cells, kinds=("relu", "softmax"))


def test_unpaired_size_has_no_pairs():
  cells = [cell("sigmoid", 100, 0, 0.3), cell("softmax", 100, 1, 0.4)]
  (row,) = analysis.paired_differences(cells)
  assert row.pairs == 0 and math.isnan(row.error.mean)


# --------------------------------------------------------------------------- power-law fit


def fit_cells(cells, **kwargs):
  return power_law.fit_power_law([c.n for c in cells], [c.test_error for c in cells], **kwargs)


def test_fit_recovers_exponent_and_floor():
  fit = fit_cells(synthetic_cells("softmax", a=2.0, b=0.5, c=0.05), floor="auto", n_boot=100)
  assert fit.floor, fit.criterion
  assert "kept" in fit.criterion
  # Tolerances for 2% noise over 5 seeds and 7 sizes spanning three decades.
  assert fit.b == pytest.approx(0.5, abs=0.05)
  assert fit.c == pytest.approx(0.05, abs=0.005)
  assert fit.a == pytest.approx(2.0, rel=0.3)
  assert fit.boot_ok == 100
  for value, (low, high) in ((fit.b, fit.b_ci), (fit.c, fit.c_ci), (fit.a, fit.a_ci)):
    assert low < value < high


def test_auto_drops_the_floor_when_there_is_none():
  cells = synthetic_cells("softmax", a=2.0, b=0.5, c=0.0, rng_seed=0)
  fit = fit_cells(cells, floor="auto", n_boot=50)
  assert not fit.floor, fit.criterion
  assert "dropped" in fit.criterion
  assert fit.c == 0.0 and fit.c_ci == (0.0, 0.0)
  assert fit.b == pytest.approx(0.5, abs=0.02)
  assert fit.b_ci[0] < 0.5 < fit.b_ci[1]
  # Without the F-test: floor=False on data with a floor is biased towards a smaller exponent.
  forced = fit_cells(synthetic_cells("softmax", a=2.0, b=0.5, c=0.05), floor=False, n_boot=0)
  assert forced.b < 0.4


def test_auto_floor_false_positive_rate_is_small():
  # The F-test at 5% on a boundary parameter (c >= 0) keeps a spurious floor about 2.5% of
  # the time (measured: 5 of 200 datasets); 40 datasets should see 0-3, not a habit.
  kept = sum(fit_cells(synthetic_cells("softmax", a=2.0, b=0.5, c=0.0, rng_seed=r), n_boot=0).floor
             for r in range(40))
  assert kept <= 3


def test_fit_bootstrap_is_seeded():
  cells = synthetic_cells("softmax", a=2.0, b=0.5, c=0.05)
  first, again = (fit_cells(cells, floor=True, n_boot=30, seed=3) for _ in range(2))
  other = fit_cells(cells, floor=True, n_boot=30, seed=4)
  assert first == again
  assert first.b_ci != other.b_ci


def test_fit_refuses_what_it_cannot_fit():
  with pytest.raises(fits.FitError, match=r">= 3 distinct sizes"):
    power_law.fit_power_law([100, 100, 1000], [0.3, 0.3, 0.1], floor=True, n_boot=0)
  with pytest.raises(fits.FitError, match=r"mean error is 0 at n=\[1000\]"):
    power_law.fit_power_law([100, 1000], [0.3, 0.0], floor=False, n_boot=0)
  with pytest.raises(ValueError, match=r"floor must be True, False or 'auto'"):
    power_law.fit_power_law([100, 1000], [0.3, 0.1], floor="yes")


# --------------------------------------------------------------------------- paired fit difference


def _paired(a_cells, b_cells):
  """(n, error_a, error_b) over the (n, seed) both lists hold, in a_cells' order."""
  b = {(c.n, c.seed): c.test_error for c in b_cells}
  keys = [(c.n, c.seed) for c in a_cells if (c.n, c.seed) in b]
  a = {(c.n, c.seed): c.test_error for c in a_cells}
  return [k[0] for k in keys], [a[k] for k in keys], [b[k] for k in keys]


def test_fit_difference_of_a_kind_with_itself_is_exactly_zero_because_draws_are_paired():
  # Noisy seeds, the same values for both kinds: every replicate draws the same seeds for
  # both and refits the same means, so every difference is 0. An unpaired bootstrap (each
  # kind its own draw) would give an interval of width ~0.05 in b here.
  cells = synthetic_cells("softmax", a=2.0, b=0.5, c=0.05, noise=0.1)
  diff = power_law.paired_fit_difference(*_paired(cells, cells), floors=(True, True), n_boot=50)
  assert (diff.b, diff.c, diff.b_ci, diff.c_ci) == (0.0, 0.0, (0.0, 0.0), (0.0, 0.0))
  assert diff.boot_ok == 50 and diff.min_pairs == 5


@pytest.mark.parametrize("a_params, b_params, floors, want_b, want_c", [
    ((2.0, 0.5, 0.12), (2.0, 0.5, 0.10), (True, True), 0.0, 0.02),  # floors 0.02 apart
    ((2.0, 0.6, 0.0), (2.0, 0.4, 0.0), (False, False), 0.2, 0.0),   # exponents 0.2 apart
])
def test_fit_difference_recovers_known_differences_of_noise_free_curves(a_params, b_params, floors,
                                                                        want_b, want_c):
  a = synthetic_cells("sigmoid", *a_params, noise=0.0)
  b = synthetic_cells("softmax", *b_params, noise=0.0)
  diff = power_law.paired_fit_difference(*_paired(a, b), floors=floors, n_boot=10)
  assert diff.b == pytest.approx(want_b, abs=1e-4) and diff.c == pytest.approx(want_c, abs=1e-5)
  # No noise: every replicate is the curve itself, so the interval is the point.
  assert diff.b_ci == pytest.approx((want_b, want_b), abs=1e-4)
  assert diff.c_ci == pytest.approx((want_c, want_c), abs=1e-5)


def test_fit_difference_interval_covers_the_true_floor_gap_under_noise():
  a = synthetic_cells("sigmoid", 2.0, 0.5, 0.07, seeds=10, rng_seed=1)
  b = synthetic_cells("softmax", 2.0, 0.5, 0.05, seeds=10, rng_seed=2)
  diff = power_law.paired_fit_difference(*_paired(a, b), floors=(True, True), n_boot=200)
  assert diff.c_ci[0] < 0.02 < diff.c_ci[1]
  assert diff.c_ci[0] > 0  # 2% noise over 10 seeds resolves a 2-point floor gap


def test_fit_difference_refuses_what_it_cannot_fit():
  with pytest.raises(ValueError, match="one entry per paired seed"):
    power_law.paired_fit_difference([100, 1000], [0.3, 0.2], [0.3], floors=(False, False))
  with pytest.raises(fits.FitError, match=r">= 3 distinct sizes"):
    power_law.paired_fit_difference([100, 1000], [0.3, 0.2], [0.3, 0.2], floors=(True, False))


def test_analysis_fit_difference_pairs_cells_by_seed_and_says_why_when_a_fit_is_missing():
  cells = (synthetic_cells("sigmoid", 2.0, 0.5, 0.07, noise=0.0)
           + synthetic_cells("softmax", 2.0, 0.5, 0.05, noise=0.0)
           + [cell("softmax", 100, 99, 0.9)])  # an unpaired seed is left out
  kind_fits = analysis.fit_kinds(cells, ["sigmoid", "softmax"], True, 0, 0)
  diff = analysis.fit_difference(cells, kind_fits, n_boot=5)
  assert diff.c == pytest.approx(0.02, abs=1e-5) and diff.min_pairs == 5
  kind_fits["softmax"] = "no fit: curve_fit did not converge"
  assert analysis.fit_difference(cells, kind_fits) == (
      "no difference: softmax: no fit: curve_fit did not converge")


def test_fit_difference_markdown_says_when_c_is_not_a_difference_of_two_floors():
  diff = power_law.PowerLawDifference(b=0.1, c=0.03, b_ci=(0.0, 0.2), c_ci=(0.01, 0.05),
                                      floors=(True, False), min_pairs=4, n_boot=10, boot_ok=9)
  (_, line) = report._fit_difference_markdown(diff, ("sigmoid", "softmax"))
  assert "at least 4 pairs per n; 9/10 replicates" in line
  assert "b +0.1 [0, 0.2], c +0.03 [0.01, 0.05] (c: softmax has no floor" in line
  assert report._fit_difference_markdown("no difference: x", ("sigmoid", "softmax"))[1] == (
      "Paired difference sigmoid - softmax of the fits: no difference: x.")


# --------------------------------------------------------------------------- samples to target

N3 = [100, 1000, 10000]


def test_loglog_slope_recovers_a_known_rate_with_an_interval():
  rng = np.random.default_rng(3)
  n = [m for m in SIZES for _ in range(8)]
  value = [3.0 * m ** -0.5 * np.exp(0.1 * rng.standard_normal()) for m in n]
  fit = fits.loglog_slope(n, value, n_boot=200)
  assert abs(fit.slope + 0.5) < 0.03
  assert fit.slope_ci[0] < fit.slope < fit.slope_ci[1] and fit.slope_ci[1] - fit.slope_ci[0] < 0.1


def test_loglog_slope_of_medians_ignores_what_carries_the_mean():
  # Seeds 0-3 follow n^-1; seed 4 is stuck at 10 at every n (a fit far from the truth). The
  # means level off near 10/5 = 2; the medians keep the rate.
  n, value = [], []
  for m in SIZES:
    n += [m] * 5
    value += [m ** -1.0] * 4 + [10.0]
  mean_fit = fits.loglog_slope(n, value, n_boot=0)
  median_fit = fits.loglog_slope(n, value, n_boot=0, statistic="median")
  assert median_fit.slope == pytest.approx(-1.0, abs=1e-9)
  assert mean_fit.slope > -0.05
  with pytest.raises(ValueError, match="statistic='mode'.*median"):
    fits.loglog_slope(n, value, statistic="mode")


def test_samples_to_target_interpolates_linearly_in_log_n():
  # 0.2 lies halfway between 0.3 (n=1000) and 0.1 (n=10000): log10 n = 3.5, n = 3162.28.
  s = targets.samples_to_target(N3, [0.5, 0.3, 0.1], 0.2)
  assert s.status == "interpolated"
  assert s.value == pytest.approx(10 ** 3.5)
  # Unsorted input is the same curve.
  assert targets.samples_to_target(N3[::-1], [0.1, 0.3, 0.5], 0.2) == s
  # A non-monotone curve: the first crossing counts. (0.5 - 0.2) / (0.5 - 0.15) = 6/7 of a
  # decade above 100: n = 100 * 10^(6/7) = 719.69.
  s = targets.samples_to_target([100, 1000, 3000, 10000], [0.5, 0.15, 0.3, 0.1], 0.2)
  assert s.value == pytest.approx(100 * 10 ** (6 / 7))


def test_samples_to_target_not_reached_and_at_most():
  s = targets.samples_to_target(N3, [0.5, 0.3, 0.1], 0.05)
  assert (s.value, s.status, str(s)) == (None, "not_reached", "not reached")
  s = targets.samples_to_target(N3, [0.5, 0.3, 0.1], 0.6)
  assert (s.value, s.status, str(s)) == (100.0, "at_most", "<= 100")
  # Reaching the target exactly at a grid size is that size.
  assert targets.samples_to_target(N3, [0.5, 0.3, 0.1], 0.3).value == pytest.approx(1000)


def ratio_cells(seed_spread=0.0):
  """softmax mean curve [0.5, 0.3, 0.1], sigmoid [0.4, 0.2, 0.05] over N3, two paired seeds."""
  cells = []
  for kind, curve in (("softmax", [0.5, 0.3, 0.1]), ("sigmoid", [0.4, 0.2, 0.05])):
    for n, e in zip(N3, curve):
      spread = 0.0 if e <= 0.1 else seed_spread  # keep the last point's mean exact and positive
      cells += [cell(kind, n, 0, e + spread), cell(kind, n, 1, e - spread)]
  return cells


def test_samples_ratio_on_hand_made_numbers():
  # softmax reaches 0.2 at 10^3.5 (halfway between 0.3 and 0.1), sigmoid at 1000 exactly:
  # ratio 10^0.5 = 3.1623. Identical seeds: every bootstrap draw gives the same ratio.
  r = analysis.samples_ratio(ratio_cells(), 0.2, n_boot=20)
  assert (r.kinds, r.pairs, r.bound) == (("softmax", "sigmoid"), 2, "=")
  assert r.value == pytest.approx(10 ** 0.5)
  assert r.ci == pytest.approx((10 ** 0.5, 10 ** 0.5))
  assert r.boot_ok == 20
  assert str(r).startswith("3.16 [3.16, 3.16]")


def test_samples_ratio_bootstrap_interval_brackets_the_estimate_and_is_seeded():
  cells = ratio_cells(seed_spread=0.05)
  r = analysis.samples_ratio(cells, 0.2, n_boot=40, seed=1)
  assert r.value == pytest.approx(10 ** 0.5)  # the means are the curves above
  assert r.ci[0] <= r.value <= r.ci[1] and r.ci[0] < r.ci[1]
  assert analysis.samples_ratio(cells, 0.2, n_boot=40, seed=1) == r


def test_samples_ratio_not_reached_is_said_plainly():
  # softmax never gets to 0.08 (its best is 0.1): no number, the reason instead.
  r = analysis.samples_ratio(ratio_cells(), 0.08, n_boot=10)
  assert r.value is None and r.ci is None
  assert r.numerator.status == "not_reached"
  assert str(r) == "not reached by softmax"
  r = analysis.samples_ratio(ratio_cells(), 0.01, n_boot=10)
  assert str(r) == "not reached by softmax and sigmoid"
  # Seeds that differ: a resample could reach 0.2 by chance, yet the mean curve does not.
  spread = [cell(k, n, s, e + (0.15 if s == 0 and k == "softmax" and n == 10000 else 0.0))
            for k, curve in (("softmax", [0.5, 0.3, 0.2]), ("sigmoid", [0.4, 0.2, 0.05]))
            for n, e in zip(N3, curve) for s in (0, 1)]
  r = analysis.samples_ratio(spread, 0.2, n_boot=50)  # softmax mean at 10000: 0.275
  assert r.value is None and r.ci is None and r.boot_ok == 0
  assert str(r) == "not reached by softmax"


def test_samples_ratio_at_most_gives_a_bound():
  # sigmoid is already at 0.4 <= 0.45 at n=100 (<= 100); softmax crosses 0.45 a quarter of a
  # decade above 100: 10^2.25 = 177.83. The ratio is therefore at least 1.7783.
  r = analysis.samples_ratio(ratio_cells(), 0.45, n_boot=10)
  assert r.denominator.status == "at_most"
  assert r.bound == ">="
  assert r.value == pytest.approx(10 ** 0.25)
  assert str(r).startswith(">= 1.78")


# --------------------------------------------------------------------------- report files


def test_write_report_writes_every_file_and_the_key_numbers(tmp_path):
  cells = (synthetic_cells("softmax", a=2.0, b=0.4, c=0.05, seeds=3, rng_seed=2)
           + synthetic_cells("sigmoid", a=2.0, b=0.5, c=0.05, seeds=3, rng_seed=3))
  cells.append(CellResult("sigmoid", 100, 7, math.nan, math.nan, best_step=0, steps=10,
                          wall_seconds=1.5, budget="steps=10"))
  paths = report.write_report(cells, str(tmp_path / "report"), target=0.1, n_boot=20)
  assert set(paths) == {"json", "csv", "report", "error_plot", "difference_plot"}

  loaded = results.load_cells(paths["json"])
  assert loaded[:-1] == cells[:-1]
  assert loaded[-1].budget == "steps=10" and math.isnan(loaded[-1].test_error)
  with open(paths["json"]) as f:
    text = f.read()
  assert "NaN" not in text  # strict JSON: the failed cell's metrics are null
  assert len(json.loads(text)["cells"]) == len(cells)
  with open(paths["csv"]) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith("kind,n,seed,test_error,test_loss") and len(lines) == len(cells) + 1

  text = open(paths["report"], encoding="utf-8").read()
  rows = analysis.summarize(cells)
  assert f"| sigmoid | 100 | 3 | 1 | {rows[0].error.mean:.4g} ±" in text
  fit = power_law.fit_power_law([c.n for c in cells if c.kind == "sigmoid"],
                               [c.test_error for c in cells if c.kind == "sigmoid"], n_boot=20)
  assert f"{fit.b:.4g} [{fit.b_ci[0]:.4g}, {fit.b_ci[1]:.4g}]" in text
  ratio = analysis.samples_ratio(cells, 0.1, n_boot=20)
  assert f"**{ratio}**" in text
  for diff in analysis.paired_differences(cells):
    assert f"| {diff.n} | 3 | {diff.error.mean:.4g} ±" in text
  kind_fits = analysis.fit_kinds(results.finite(cells), ["sigmoid", "softmax"], "auto", 20, 0)
  fit_diff = analysis.fit_difference(cells, kind_fits, n_boot=20)
  assert f"of the fits (seeds resampled" in text
  assert f"b {fit_diff.b:+.4g} [{fit_diff.b_ci[0]:.4g}, {fit_diff.b_ci[1]:.4g}]" in text

  for key in ("error_plot", "difference_plot"):
    with open(paths[key], "rb") as f:
      data = f.read()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def _ended(kind, n, seed, best_step, train_loss, *, steps=100, val=True, error=0.1):
  return CellResult(kind, n, seed, error, 0.2, val_error=0.1 if val else None, best_step=best_step,
                    steps=steps, train_loss=train_loss)


def test_end_of_training_counts_best_last_cells_and_spreads_the_final_training_loss(tmp_path):
  cells = [
      # n = 100: seeds 0 and 2 selected their last step; seed 1 is on a plateau (loss 0.8).
      _ended("softmax", 100, 0, 100, 0.001), _ended("softmax", 100, 1, 40, 0.8),
      _ended("softmax", 100, 2, 100, 0.003),
      # A failed cell is left out; so is a missing training loss (records from before it).
      _ended("softmax", 100, 3, 100, 5.0, error=math.nan),
      _ended("softmax", 200, 0, 60, None), _ended("softmax", 200, 1, 100, None),
      # No validation split: the last step is always kept, which says nothing.
      _ended("sigmoid", 100, 0, 100, 0.5, val=False),
  ]
  rows = analysis.end_of_training(cells)
  assert [(r.kind, r.n, r.cells, r.best_at_end) for r in rows] == [
      ("sigmoid", 100, 1, None), ("softmax", 100, 3, 2), ("softmax", 200, 2, 1)]
  assert rows[1].train_loss == pytest.approx((0.003, 0.001, 0.8))
  assert rows[0].train_loss == pytest.approx((0.5, 0.5, 0.5)) and rows[2].train_loss is None
  text = "\n".join(report._end_of_training_markdown(rows))
  assert "| softmax | 100 | 3 | 2/3 | 0.003 [0.001, 0.8] |" in text
  assert "| sigmoid | 100 | 1 | no validation split | 0.5 [0.5, 0.5] |" in text
  assert "| softmax | 200 | 2 | 1/2 | n/a |" in text
  assert "Best step last in 3 of 5 cells." in text
  # write_report carries the section.
  more = [_ended(k, n, s, 100, 0.01, error=e) for k, e in (("sigmoid", 0.3), ("softmax", 0.35))
          for n in (100, 200) for s in (0, 1)]
  paths = report.write_report(more, str(tmp_path), target=0.32, n_boot=5)
  assert "| sigmoid | 200 | 2 | 2/2 | 0.01 [0.01, 0.01] |" in open(paths["report"]).read()
  assert "curves_plot" not in paths  # no cell recorded a curve


def test_write_report_draws_the_cells_learning_curves_and_keeps_them_in_results_json(tmp_path):
  curve = [[100, 0.5, 1.2, 1.0], [200, 0.2, 0.6, 0.4]]
  cells = [dataclasses.replace(cell(k, n, s, e), curve=curve) for k, e in (("sigmoid", 0.3),
           ("softmax", 0.35)) for n in (100, 200) for s in (0, 1)]
  paths = report.write_report(cells, str(tmp_path), target=0.32, n_boot=5)
  with open(paths["curves_plot"], "rb") as f:
    assert f.read().startswith(b"\x89PNG")
  assert results.load_cells(paths["json"])[0].curve == curve
  with open(paths["csv"]) as f:
    assert "curve" not in f.readline()  # one row per cell: the list stays in results.json


@pytest.mark.parametrize("seeds", [3, 10])
def test_report_warns_when_too_few_seeds_back_the_ratio_interval(tmp_path, seeds):
  cells = (synthetic_cells("softmax", a=2.0, b=0.4, c=0.05, seeds=seeds, rng_seed=2)
           + synthetic_cells("sigmoid", a=2.0, b=0.5, c=0.05, seeds=seeds, rng_seed=3))
  paths = report.write_report(cells, str(tmp_path), target=0.1, n_boot=20)
  text = open(paths["report"], encoding="utf-8").read()
  if seeds < report.MIN_SEEDS_FOR_EVIDENCE:
    # 3 seeds: multisets of size 3 drawn from 3 values, C(5, 3) = 10.
    assert "**Caveat.** Only 3 paired seeds: a bootstrap over them can draw at most 10 " in text
  else:
    assert "Caveat" not in text


def test_write_report_says_not_reached(tmp_path):
  paths = report.write_report(ratio_cells(), str(tmp_path), target=0.08, n_boot=5)
  text = open(paths["report"], encoding="utf-8").read()
  assert "| softmax | not reached |" in text
  assert "**not reached by softmax**" in text


def test_report_compares_every_other_kind_with_the_compared_pair(tmp_path):
  # relu's curve is sigmoid's, so relu / sigmoid = 1 exactly and relu / softmax is the
  # inverse of softmax / sigmoid (10^-0.5); linear's cells all failed: no paired seed.
  cells = ratio_cells()
  cells += [dataclasses.replace(c, kind="relu") for c in cells if c.kind == "sigmoid"]
  cells += [cell("linear", n, s, math.nan, math.nan) for n in N3 for s in (0, 1)]
  text = open(report.write_report(cells, str(tmp_path), target=0.2, n_boot=10)["report"],
              encoding="utf-8").read()
  assert "## Every other kind against sigmoid and softmax" in text
  assert "| kind | / sigmoid | / softmax |" in text
  assert "| relu | 1 [1, 1] | 0.316 [0.316, 0.316] |" in text
  assert "| linear | no seed has results for both ('linear', 'sigmoid')" in text
  # Two kinds only: no such section.
  text = open(report.write_report(ratio_cells(), str(tmp_path / "two"), target=0.2,
                                  n_boot=10)["report"], encoding="utf-8").read()
  assert "Every other kind" not in text


def test_load_cells_names_unknown_fields(tmp_path):
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"cells": [{"kind": "softmax", "n": 1, "seed": 0, "test_error": 0.1,
                                         "test_loss": 0.2, "accuracy": 0.9}]}))
  with pytest.raises(ValueError, match=r"unknown fields \['accuracy'\]"):
    results.load_cells(str(path))


def _budget_cells(errors_by_n, seeds=None):
  return [CellResult("sigmoid", n, s, e, 0.1) for n, errors in errors_by_n.items()
          for s, e in zip(seeds or range(len(errors)), errors)]


def test_budget_check_compares_the_change_with_the_seed_spread():
  base = _budget_cells({100: [0.30, 0.34, 0.32], 200: [0.10, 0.11, 0.12]})
  larger = _budget_cells({100: [0.31, 0.33, 0.33], 200: [0.05, 0.06, 0.07]})
  rows = analysis.budget_check(base, larger)
  assert [(r.n, r.seeds, r.converged) for r in rows] == [(100, 3, True), (200, 3, False)]
  assert rows[0].seed_spread == pytest.approx(0.02)
  assert rows[0].change.mean == pytest.approx(0.0033333, abs=1e-6)
  # n = 200: every seed drops by exactly 0.05, so the paired interval has no width.
  assert rows[1].change.mean == pytest.approx(-0.05)
  assert rows[1].change.low == pytest.approx(-0.05) and rows[1].change.high == pytest.approx(-0.05)
  text = report.budget_check_markdown(rows)
  assert "| sigmoid | 200 | 3 | 0.11 | 0.06 | -0.0500 [-0.0500, -0.0500] | 0.01 | no |" in text
  with pytest.raises(ValueError, match="groups the base study lacks: \\[\\('sigmoid', 300\\)\\]"):
    analysis.budget_check(base, _budget_cells({300: [0.3, 0.3]}))


def test_budget_check_pairs_seeds_when_the_larger_study_is_a_subset():
  # The base study: 5 seeds at two sizes; the larger budget: seeds 1 and 3 at one size.
  # The comparison uses those two seeds only, paired: changes -0.02 and -0.04.
  base = _budget_cells({100: [0.50, 0.30, 0.40, 0.20, 0.60], 200: [0.1] * 5})
  larger = _budget_cells({100: [0.28, 0.16]}, seeds=[1, 3])
  (row,) = analysis.budget_check(base, larger)
  assert (row.n, row.seeds) == (100, 2)
  assert row.base == pytest.approx(0.25) and row.larger == pytest.approx(0.22)
  assert row.change.mean == pytest.approx(-0.03)
  # t(0.975, 1) = 12.706; std of (-0.02, -0.04) = 0.014142; half-width 12.706 * 0.01 = 0.12706.
  assert row.change.high == pytest.approx(-0.03 + 0.127062, abs=1e-5)
  assert row.seed_spread == pytest.approx(0.070711, abs=1e-6)  # std of 0.30 and 0.20
  assert row.converged
  with pytest.raises(ValueError, match="no seed finished under both budgets"):
    analysis.budget_check(base, _budget_cells({100: [0.3]}, seeds=[7]))


def test_budget_check_table_says_a_one_seed_change_has_no_interval():
  (row,) = analysis.budget_check(_budget_cells({100: [0.5, 0.3]}),
                                 _budget_cells({100: [0.25]}, seeds=[1]))
  assert row.seeds == 1 and row.change.mean == pytest.approx(-0.05)
  assert "| -0.0500 [no interval: one seed] |" in report.budget_check_markdown([row])


def test_log_axis_floor_is_half_the_smallest_positive_mean():
  assert report.log_axis_floor([0.4, 0.0, 1e-3, 0.0]) == pytest.approx(5e-4)
  assert report.log_axis_floor([0.2, 0.1]) == pytest.approx(0.05)
  assert report.log_axis_floor([0.0, 0.0]) == 1e-3  # nothing positive: a fixed floor


def test_error_plot_draws_a_mean_error_of_zero_on_the_floor_not_off_the_axis():
  # MQAR's large-n cells all solve the task: every seed scores 0.
  cells = [cell(k, n, s, e if n < 400 else 0.0) for k, e in (("sigmoid", 0.02), ("softmax", 0.04))
           for n in (100, 200, 400) for s in (0, 1, 2)]
  rows = analysis.summarize(cells)
  ax = report.error_figure(rows, {}).axes[0]
  floor = report.log_axis_floor([r.error.mean for r in rows])
  assert floor == pytest.approx(0.01)
  bottom, _ = ax.get_ylim()
  assert bottom > floor / 10  # old plot: the zeros were clipped to ~1e-300 and the line fell off
  markers = [ln for ln in ax.get_lines() if ln.get_label().endswith(f"mean error 0 (drawn at {floor:.1g})")]
  assert [ln.get_label().split(":")[0] for ln in markers] == ["sigmoid", "softmax"]
  for ln in markers:
    assert list(ln.get_xdata()) == [400] and list(ln.get_ydata()) == [pytest.approx(floor)]


def test_loss_spikes_finds_a_hundredfold_jump_of_the_training_loss():
  # [step, val_error, val_loss, train_loss]: a fitted cell (loss ~1e-7) jumps to 2.7 at step
  # 300 (the MQAR n = 500 collapse); noise of a few-fold, a jump that stays below the
  # floor, and a point without a training loss are not spikes.
  curve = [[100, 0.1, 0.1, 3e-7], [200, 0.1, 0.1, 2e-7], [300, 0.8, 3.0, 2.7],
           [400, 0.7, 4.0, 0.1], [500, 0.7, 4.0, 0.5], [600, 0.7, 4.0, None],
           [700, 0.7, 4.0, 1e-6], [800, 0.7, 4.0, 5e-5], [900, 0.7, 4.0, 0.02]]
  assert analysis.loss_spikes(curve) == [300, 900]
  assert analysis.loss_spikes([[100, 0.5, 0.7, 0.6], [200, 0.5, 0.7, 0.9]]) == []  # plateau noise
  assert analysis.loss_spikes(None) == [] and analysis.loss_spikes([]) == []


def test_loss_spikes_sees_a_spike_between_points_through_the_interval_maximum():
  # [step, val_error, val_loss, train_loss, train_loss_max]: at step 300 the one-batch loss is
  # back to 4e-7, but an update between 200 and 300 reached 1.5: a spike the four-entry
  # curve misses. The maximum is compared with the loss recorded at the point before, so a
  # cell whose loss falls through an interval (max 0.9 after 0.8) is not a spike.
  curve = [[100, 0.1, 0.1, 0.8, 0.9], [200, 0.1, 0.1, 3e-7, 0.8], [300, 0.1, 0.1, 4e-7, 1.5],
           [400, 0.1, 0.1, 3e-7, 5e-3], [500, 0.1, 0.1, 3e-7, None], [600, 0.1, 0.1, 0.5, None]]
  # 400: 5e-3 is below the floor; 500: no maximum (a resumed record) and one batch at 3e-7;
  # 600: no maximum, so its one-batch loss 0.5 counts.
  assert analysis.loss_spikes(curve) == [300, 600]
  assert analysis.loss_spikes([p[:4] for p in curve]) == [600]  # without maxima 300 is missed


def test_end_of_training_counts_cells_whose_loss_spiked_among_those_with_a_curve(tmp_path):
  fitted = [[100, 0.1, 0.1, 1e-6], [200, 0.1, 0.1, 1e-6]]
  spike = [[100, 0.1, 0.1, 1e-6], [200, 0.7, 5.0, 1.5]]
  cells = [dataclasses.replace(_ended("sigmoid", 500, s, 100, 1e-6), curve=c)
           for s, c in enumerate((fitted, spike, spike, None))]  # seed 3: a pre-curve record
  cells.append(_ended("softmax", 500, 0, 100, 1e-6))  # no curve at all
  rows = analysis.end_of_training(cells)
  assert [(r.kind, r.spiked) for r in rows] == [("sigmoid", (2, 3)), ("softmax", None)]
  text = "\n".join(report._end_of_training_markdown(rows))
  assert "| sigmoid | 500 | 4 | 4/4 | 1e-06 [1e-06, 1e-06] | 2/3 |" in text
  assert "| softmax | 500 | 1 | 1/1 | 1e-06 [1e-06, 1e-06] | n/a |" in text


def test_solved_at_target_counts_paired_seeds_with_wilson_intervals_and_mcnemar(tmp_path):
  # n = 500: sigmoid solves seeds 0-3 (error <= 0.1, the target itself counts), softmax
  # seeds 0, 4 and 5; seed 5 diverged for sigmoid (NaN): paired, and not solved by it. Seed 6
  # has a softmax cell only: not paired.
  sig = {0: 0.0, 1: 0.1, 2: 0.05, 3: 0.02, 4: 0.75, 5: math.nan}
  soft = {0: 0.01, 1: 0.74, 2: 0.6, 3: 0.75, 4: 0.08, 5: 0.0, 6: 0.0}
  cells = ([cell("sigmoid", 500, s, e) for s, e in sig.items()]
           + [cell("softmax", 500, s, e) for s, e in soft.items()]
           # n = 1000: every seed of both kinds solves; n = 2000: only softmax has a cell.
           + [cell(k, 1000, s, 0.001) for k in ("sigmoid", "softmax") for s in range(3)]
           + [cell("softmax", 2000, 0, 0.0)])
  rows = analysis.solved_at_target(cells, 0.1)
  assert [(r.n, r.pairs, r.solved, r.only) for r in rows] == [
      (500, 6, (4, 3), (3, 2)), (1000, 3, (3, 3), (0, 0))]
  # Wilson 4/6 and 3/6, computed by hand: centre (p + z^2/12) / (1 + z^2/6), z = 1.96.
  assert rows[0].intervals[0] == pytest.approx((0.3000, 0.9032), abs=1e-4)
  assert rows[0].intervals[1] == pytest.approx((0.1876, 0.8124), abs=1e-4)
  assert rows[0].p_value == 1.0  # 3 vs 2 discordant: 2 * P(X <= 2 | 5) = 2 * 16/32
  # Dropping the diverged pair instead would give 4/5 against 2/5 (3 vs 1 discordant).
  assert rows[1].p_value == 1.0 and rows[1].intervals[0][1] == 1.0
  # The report carries the section, in the compared kinds' order.
  paths = report.write_report(cells, str(tmp_path), target=0.1, n_boot=5)
  text = open(paths["report"]).read()
  assert "## Seeds that reach the target error 0.1" in text
  assert "| 500 | 6 | 4/6 [0.30, 0.90] | 3/6 [0.19, 0.81] | 3 / 2 | 1 |" in text
  assert "| 1000 | 3 | 3/3 [0.44, 1.00] | 3/3 [0.44, 1.00] | 0 / 0 | 1 |" in text
