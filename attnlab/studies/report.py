"""A study's report: report.md, the two PNG plots and the cell files, from its cells.

Statistical choices (`attnlab/stats` states each) are repeated in report.md
for its reader. Every file is written whole or not at all (`fileio`), so a
killed re-render leaves the previous report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
from attnlab import fileio
from attnlab.stats import intervals
from attnlab.stats import power_law
from attnlab.stats import targets
from attnlab.studies import analysis
from attnlab.studies import results
from attnlab.studies.results import CellResult

CONFIDENCE = intervals.CONFIDENCE


def _fmt(x: float, digits: int = 4) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _fmt_interval(iv: intervals.Interval) -> str:
  if not math.isfinite(iv.mean):
    return "n/a"
  if not math.isfinite(iv.low):
    return f"{_fmt(iv.mean)} (one seed, no interval)"
  return f"{_fmt(iv.mean)} ± {_fmt(iv.half_width, 2)} [{_fmt(iv.low)}, {_fmt(iv.high)}]"


def _fmt_ci(ci: tuple[float, float]) -> str:
  return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


# Below this many paired seeds a percentile interval over seeds is too narrow to read as
# evidence: resampling N seeds gives at most C(2N-1, N) distinct draws (10 for N = 3); the
# digits study shows what that did to its 3-seed ratio (docs/results.md, "Ten seeds").
MIN_SEEDS_FOR_EVIDENCE = 10


def few_seeds_caveat(pairs: int) -> str | None:
  """The report's warning for a bootstrap over fewer than MIN_SEEDS_FOR_EVIDENCE seeds, or None."""
  if pairs >= MIN_SEEDS_FOR_EVIDENCE:
    return None
  return (f"Only {pairs} paired seed{'s' if pairs != 1 else ''}: a bootstrap over them can draw "
          f"at most {math.comb(2 * pairs - 1, pairs)} distinct seed sets, so this interval (and "
          "the fits' intervals) understate the uncertainty. Read them as indicative; run at least "
          f"{MIN_SEEDS_FOR_EVIDENCE} seeds (--config.study.seeds) before reading them as evidence.")


def budget_check_markdown(rows: Sequence[analysis.BudgetCheckRow]) -> str:
  """The rows of `analysis.budget_check` as a markdown table."""
  lines = ["| kind | n | seeds | test error | larger budget | change [paired 95% t-interval] | "
           "seed std | within seed std |",
           "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r.kind} | {r.n} | {r.seeds} | {_fmt(r.base)} | {_fmt(r.larger)} | "
            f"{_fmt_change(r.change)} | {_fmt(r.seed_spread)} | "
            f"{'yes' if r.converged else 'no'} |" for r in rows]
  return "\n".join(lines)


def _fmt_change(change) -> str:
  """A budget change with its interval; one seed has none, and the table says so, not nan."""
  if math.isnan(change.low):
    return f"{change.mean:+.4f} [no interval: one seed]"
  return f"{change.mean:+.4f} [{change.low:+.4f}, {change.high:+.4f}]"


def _other_kinds_markdown(others: dict[str, dict[str, targets.SamplesRatio | str]],
                          refs: tuple[str, ...]) -> list[str]:
  """Each further kind's samples-to-target over the reference kinds', with intervals."""
  if not others:
    return []
  lines = ["", "## Every other kind against " + " and ".join(refs), "",
           "Samples to target of the kind over the reference kind's (< 1: the kind needs "
           "fewer samples), on the seeds both finished, with the same paired bootstrap as the "
           "ratio above.", "",
           "| kind | " + " | ".join(f"/ {ref}" for ref in refs) + " |",
           "|---|" + "---|" * len(refs)]
  lines += [f"| {kind} | " + " | ".join(str(r) for r in by_ref.values()) + " |"
            for kind, by_ref in others.items()]
  return lines


def _ratio_or_reason(cells, target, kinds, n_boot, seed) -> targets.SamplesRatio | str:
  try:
    return analysis.samples_ratio(cells, target, kinds, n_boot=n_boot, seed=seed)
  except ValueError as e:  # no seed finished both kinds: say so in the cell
    return str(e)


def _fit_difference_markdown(diff, compare) -> list[str]:
  """The paired difference of the two compared kinds' fitted b and c, under the fit table."""
  if diff is None:
    return []
  head = f"Paired difference {compare[0]} - {compare[1]} of the fits"
  if isinstance(diff, str):
    return ["", f"{head}: {diff}."]
  floors = ("" if all(diff.floors) else
            " (c: " + " and ".join(f"{k} has no floor" for k, f in zip(compare, diff.floors) if not f)
            + ", so this is not a difference of two fitted floors)")
  return ["", f"{head} (seeds resampled within each n, the same draw for both kinds; at least "
              f"{diff.min_pairs} pairs per n; {diff.boot_ok}/{diff.n_boot} replicates refitted "
              f"both): b {diff.b:+.4g} {_fmt_ci(diff.b_ci)}, c {diff.c:+.4g} {_fmt_ci(diff.c_ci)}{floors}."]


def _report_markdown(rows, diffs, fits, crossings, ratio, target, compare, n_boot,
                     others=None, ends=None, solved=None, fit_diff=None) -> str:
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
  lines += _fit_difference_markdown(fit_diff, compare)
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
  lines += _solved_markdown(solved or [], target)
  lines += _other_kinds_markdown(others or {}, tuple(compare))
  lines += _end_of_training_markdown(ends or [])
  return "\n".join(lines) + "\n"


def _solved_markdown(rows: Sequence[analysis.SolvedRow], target: float) -> list[str]:
  """The report's section on how many paired seeds each compared kind brought to the target."""
  if not rows:
    return []
  a, b = rows[0].kinds
  lines = ["", f"## Seeds that reach the target error {target:g}", "",
           f"Per n, of the seeds both {a} and {b} ran (pairs): how many reached test error "
           f"<= {target:g} (a cell that diverged did not), with the {CONFIDENCE:.0%} Wilson "
           "interval of the proportion. Where "
           "the error is bimodal over seeds (a cell solves the task or does not) this is the "
           "figure the mean hides. *Only*: discordant pairs, seeds that one kind solved and "
           "the other did not; *McNemar p*: the exact two-sided test on them (small: one kind "
           "solves seeds the other does not).", "",
           f"| n | pairs | {a} solved | {b} solved | only {a} / only {b} | McNemar p |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    counts = [f"{k}/{r.pairs} [{lo:.2f}, {hi:.2f}]" for k, (lo, hi) in zip(r.solved, r.intervals)]
    lines.append(f"| {r.n} | {r.pairs} | {counts[0]} | {counts[1]} | {r.only[0]} / {r.only[1]} "
                 f"| {r.p_value:.3g} |")
  return lines


def _end_of_training_markdown(rows: Sequence[analysis.EndOfTrainingRow]) -> list[str]:
  """The report's section on whether the cells finished learning within their budget."""
  if not rows:
    return []
  lines = ["", "## How the cells ended training", "",
           "Signs of whether the budget sufficed; `analysis.budget_check` measures it (the same "
           "cells with a larger budget). *Best step last*: cells whose selected step (lowest "
           "validation error) was their last, so their error was still falling or level; ties go "
           "to the lower validation loss, so a cell at validation error 0 counts while its loss "
           "still falls. *Final training loss*: of each cell's last update (one batch), median "
           "[min, max] over its seeds; a seed far above the others is still on a plateau: it "
           "says how fast the optimiser is, not how much data the kind needs. *Loss spikes*: "
           "cells whose training loss, at any update between two selection points, rose "
           f"{analysis.SPIKE_FACTOR:g}-fold above the loss recorded at the first of them, to at "
           f"least {analysis.SPIKE_FLOOR:g} (`analysis.loss_spikes`); a spike can undo what a "
           "cell had learned, and its selected step may predate it.", "",
           "| kind | n | cells | best step last | final training loss | loss spikes |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    at_end = "no validation split" if r.best_at_end is None else f"{r.best_at_end}/{r.cells}"
    loss = ("n/a" if r.train_loss is None
            else f"{_fmt(r.train_loss[0], 3)} [{_fmt(r.train_loss[1], 3)}, {_fmt(r.train_loss[2], 3)}]")
    spiked = "n/a" if r.spiked is None else f"{r.spiked[0]}/{r.spiked[1]}"
    lines.append(f"| {r.kind} | {r.n} | {r.cells} | {at_end} | {loss} | {spiked} |")
  selected = [r for r in rows if r.best_at_end is not None]
  if selected:
    lines += ["", f"Best step last in {sum(r.best_at_end for r in selected)} of "
              f"{sum(r.cells for r in selected)} cells."]
  return lines


def log_axis_floor(means: Sequence[float]) -> float:
  """Where a log-scale error plot draws a mean error of 0: half the smallest positive mean.

  A study whose cells all solve their task at large n (MQAR) has means of exactly 0;
  matplotlib would clip them to a tiny number and draw the line falling off the axis.
  1e-3 when no mean is positive.
  """
  positive = [m for m in means if m > 0]
  return min(positive) / 2 if positive else 1e-3


def _plot(rows, diffs, fits, compare, error_path: str, diff_path: str) -> None:
  fileio.write_png(error_path, error_figure(rows, fits), dpi=120)
  fileio.write_png(diff_path, _difference_figure(diffs, compare), dpi=120)


def error_figure(rows: Sequence[analysis.SummaryRow], fits: dict):
  """Mean test error against n on log-log axes, a line and t-interval band per kind."""
  # A bare Figure renders with Agg and leaves pyplot's global backend (a notebook's) alone.
  from matplotlib.figure import Figure  # noqa: PLC0415  (matplotlib only when a report is drawn)

  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  drawn = [r for r in rows if math.isfinite(r.error.mean)]
  floor = log_axis_floor([r.error.mean for r in drawn])
  for kind in sorted({r.kind for r in drawn}):
    mine = [r for r in drawn if r.kind == kind]
    n = np.array([r.n for r in mine], dtype=np.float64)
    mean = np.array([r.error.mean for r in mine])
    (line,) = ax.plot(n, np.maximum(mean, floor), "o-", label=kind)
    zero = mean <= 0
    if zero.any():  # a perfect score has no place on a log axis: an open marker on the floor says so
      ax.plot(n[zero], np.full(zero.sum(), floor), "v", markersize=9, markerfacecolor="white",
              color=line.get_color(), label=f"{kind}: mean error 0 (drawn at {floor:.1g})")
    low = np.array([r.error.low for r in mine])
    high = np.array([r.error.high for r in mine])
    ok = np.isfinite(low)
    # A t-interval can dip below 0; clip at a tenth of the mean (and at the floor) so the
    # log axis can draw it.
    ax.fill_between(n[ok], np.maximum(np.maximum(low[ok], mean[ok] / 10), floor),
                    np.maximum(high[ok], floor), color=line.get_color(), alpha=0.2)
    fit = fits.get(kind)
    if isinstance(fit, power_law.PowerLawFit) and n.size:
      grid = np.geomspace(n.min(), n.max(), 100)
      ax.plot(grid, fit.predict(grid), "--", color=line.get_color(),
              label=f"{kind} fit: b={fit.b:.2f}" + (f", c={fit.c:.3g}" if fit.floor else ""))
  ax.set(xscale="log", yscale="log", xlabel="training examples n", ylabel="test error",
         title=f"Test error vs n (mean, {CONFIDENCE:.0%} t-interval over seeds)")
  ax.legend()
  fig.tight_layout()
  return fig


def _difference_figure(diffs, compare):
  from matplotlib.figure import Figure  # noqa: PLC0415

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
  return fig


def _plot_curves(cells: Sequence[CellResult], path: str) -> bool:
  """Every cell's validation error against its step, a panel per kind, a colour per n.

  Draws nothing and returns False when no cell recorded a validation curve.
  """
  from matplotlib import colormaps  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415
  from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

  drawn = [c for c in cells if c.curve and any(p[1] is not None for p in c.curve)]
  if not drawn:
    return False
  kinds = sorted({c.kind for c in drawn})
  sizes = sorted({c.n for c in drawn})
  colour = {n: colormaps["viridis"](i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}
  cols = min(3, len(kinds))
  rows = math.ceil(len(kinds) / cols)
  fig = Figure(figsize=(4.5 * cols, 3.5 * rows))
  axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
  for ax, kind in zip(axes.flat, kinds):
    labelled = set()
    for c in sorted((c for c in drawn if c.kind == kind), key=lambda c: (c.n, c.seed)):
      points = [(p[0], p[1]) for p in c.curve if p[1] is not None]
      ax.plot(*zip(*points), color=colour[c.n], alpha=0.7, linewidth=1,
              label=None if c.n in labelled else f"n = {c.n}")
      labelled.add(c.n)
    ax.set(title=kind, xlabel="step", ylabel="validation error")
    # Long runs' step labels (10000, 12000, ...) run into each other at the default density.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
  for ax in list(axes.flat)[len(kinds):]:
    ax.set_visible(False)
  axes.flat[0].legend(fontsize="small")
  fig.suptitle("Learning curves: each cell (one line per seed)")
  fig.tight_layout()
  fileio.write_png(path, fig, dpi=120)
  return True


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
    floor: power-law floor rule, as in `power_law.fit_power_law`.
    n_boot: bootstrap replicates for the fits and the ratio.
    seed: bootstrap seed.

  Returns:
    {"json", "csv", "report", "error_plot", "difference_plot"}: the paths written, and
    "curves_plot" (learning_curves.png) when cells recorded validation curves.
  """
  cells = results.check_cells(cells)
  results.check_kinds(cells, compare, "compare")
  results.check_kinds(cells, ratio_kinds, "ratio_kinds")
  os.makedirs(directory, exist_ok=True)
  paths = {name: os.path.join(directory, file) for name, file in (
      ("json", "results.json"), ("csv", "results.csv"), ("report", "report.md"),
      ("error_plot", "error_vs_n.png"), ("difference_plot", "paired_difference.png"))}

  rows = analysis.summarize(cells)
  diffs = analysis.paired_differences(cells, compare)
  kinds = sorted({c.kind for c in cells})
  fits = analysis.fit_kinds(results.finite(cells), kinds, floor, n_boot, seed)
  crossings = {}
  for kind in kinds:
    mine = [r for r in rows if r.kind == kind and r.seeds]
    crossings[kind] = (targets.samples_to_target([r.n for r in mine], [r.error.mean for r in mine], target)
                       if mine else "no finished cells")
  ratio = analysis.samples_ratio(cells, target, ratio_kinds, n_boot=n_boot, seed=seed)
  # A study of more kinds (`:all`) asks how each compares with the two compared ones.
  others = {kind: {ref: _ratio_or_reason(cells, target, (kind, ref), n_boot, seed)
                   for ref in compare}
            for kind in kinds if kind not in compare}

  results.save_cells(cells, paths["json"])
  results.save_csv(cells, paths["csv"])
  text = _report_markdown(rows, diffs, fits, crossings, ratio, target, compare, n_boot, others,
                          analysis.end_of_training(cells),
                          analysis.solved_at_target(cells, target, compare),
                          analysis.fit_difference(cells, fits, compare, n_boot=n_boot, seed=seed))
  fileio.write_atomic(paths["report"], text)
  _plot(rows, diffs, fits, compare, paths["error_plot"], paths["difference_plot"])
  curves_path = os.path.join(directory, "learning_curves.png")
  if _plot_curves(cells, curves_path):
    paths["curves_plot"] = curves_path
  return paths
