"""The synthetic study's report: rates, paired slope differences, regimes, per-size tables, plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnlab import fileio
from attnlab.moe import rates
from attnlab.moe.config import MoEStudyConfig

METRICS = ("voronoi", "expert_loss", "test_mse")
METRIC_NAMES = {"voronoi": "Voronoi (own gate)", "expert_loss": "expert loss", "test_mse": "test MSE"}


def _units(cfg: MoEStudyConfig) -> list[tuple[int, int]]:
  return [(t, s) for t in cfg.truth_seeds for s in cfg.seeds]


def curves(cfg: MoEStudyConfig, table, truth: str, expert: str, student: str, metric: str,
           keep=lambda row: True) -> tuple[np.ndarray, int]:
  """[units, rate sizes] of `metric` (NaN: missing, unconverged or not kept) and the excluded count."""
  index = {u: i for i, u in enumerate(_units(cfg))}
  sizes = {n: j for j, n in enumerate(cfg.rate_sizes)}
  out = np.full((len(index), len(sizes)), np.nan)
  excluded = 0
  for r in table:
    if (r["truth"], r["expert"], r["student"]) != (truth, expert, student) or r["n"] not in sizes:
      continue
    if not r["converged"]:
      excluded += 1
    elif keep(r):
      out[index[(r["truth_seed"], r["seed"])], sizes[r["n"]]] = r[metric]
  return out, excluded


def _comparisons(cfg: MoEStudyConfig) -> list[tuple[str, str, tuple[str, str], tuple[str, str]]]:
  """(name, metric, (truth, student) of a, of b): every paired sigmoid - softmax difference."""
  out = []
  if {"sigmoid", "softmax"} <= set(cfg.truths) & set(cfg.students):
    for metric in METRICS:
      out.append(("own truths", metric, ("sigmoid", "sigmoid"), ("softmax", "softmax")))
  if {"sigmoid", "softmax"} <= set(cfg.students):
    for truth in cfg.truths:
      for metric in ("expert_loss", "test_mse"):
        out.append((f"{truth} truth", metric, (truth, "sigmoid"), (truth, "softmax")))
  return out


def _agreement_both(cfg: MoEStudyConfig, mean: rates.SlopeDifference,
                    median: rates.SlopeDifference) -> str:
  """The verdict of both statistics: one word where they agree, both where they do not."""
  a, b = _agreement(cfg, mean), _agreement(cfg, median)
  return a if a == b else f"mean: {a}; median: {b}"


def _agreement(cfg: MoEStudyConfig, d: rates.SlopeDifference) -> str:
  """Against the paper: sigmoid faster in the dense regime, comparable in the sparse one."""
  if not all(math.isfinite(v) for v in d.ci):
    return "no interval"
  if cfg.regime == "sparse":
    return "yes (comparable)" if not d.excludes_zero() else (
        "no: sigmoid faster" if d.ci[1] < 0 else "no: softmax faster")
  if d.ci[1] < 0:
    return "yes"
  return "no: softmax faster" if d.ci[0] > 0 else "not resolved"


def _fmt(x: float) -> str:
  return "–" if not math.isfinite(x) else f"{x:+.3f}"


def _fmt_slope(s: rates.Slope | rates.SlopeDifference, value: float) -> str:
  return f"{_fmt(value)} [{_fmt(s.ci[0])}, {_fmt(s.ci[1])}]"


def rate_rows(cfg: MoEStudyConfig, table) -> list[dict[str, Any]]:
  out = []
  for truth in cfg.truths:
    for expert in cfg.experts:
      for student in cfg.students:
        for metric in METRICS:
          if metric != "test_mse" and truth != student:
            continue
          values, excluded = curves(cfg, table, truth, expert, student, metric)
          row = {"truth": truth, "expert": expert, "student": student, "metric": metric,
                 "excluded": excluded, "results": int(np.isfinite(values).sum())}
          for statistic in rates.STATISTICS:
            s = rates.curve_slope(cfg.rate_sizes, values, statistic=statistic, n_boot=cfg.bootstrap)
            row[statistic] = s
          out.append(row)
  return out


def difference_rows(cfg: MoEStudyConfig, table) -> list[dict[str, Any]]:
  out = []
  for expert in cfg.experts:
    for name, metric, a, b in _comparisons(cfg):
      va, ea = curves(cfg, table, *a[:1], expert, a[1], metric)
      vb, eb = curves(cfg, table, *b[:1], expert, b[1], metric)
      row = {"expert": expert, "comparison": name, "metric": metric, "excluded": ea + eb}
      for statistic in rates.STATISTICS:
        row[statistic] = rates.paired_slope_difference(cfg.rate_sizes, va, vb, statistic=statistic,
                                                       n_boot=cfg.bootstrap)
      out.append(row)
  return out


def regime_rows(cfg: MoEStudyConfig, table) -> list[dict[str, Any]]:
  out = []
  for truth in cfg.truths:
    if truth not in cfg.students:
      continue
    for expert in cfg.experts:
      mine = [r for r in table if (r["truth"], r["expert"], r["student"]) == (truth, expert, truth)
              and "regime" in r and r["n"] in cfg.rate_sizes and r["converged"]]
      for regime in sorted({r["regime"] for r in mine}):
        values, _ = curves(cfg, table, truth, expert, truth, "voronoi",
                           keep=lambda r, regime=regime: r.get("regime") == regime)
        counts = [int(np.isfinite(values[:, j]).sum()) for j in range(len(cfg.rate_sizes))]
        out.append({"truth": truth, "expert": expert, "regime": regime, "counts": counts,
                    **{s: rates.curve_slope(cfg.rate_sizes, values, statistic=s, n_boot=cfg.bootstrap)
                       for s in rates.STATISTICS}})
  return out


def markdown(cfg: MoEStudyConfig, table, missing: Sequence[str], seconds: dict[str, float],
             differences: list[dict[str, Any]]) -> str:
  units = len(cfg.truth_seeds) * len(cfg.seeds)
  lines = ["# Synthetic estimation study: sigmoid vs softmax gating", "",
           f"Family {cfg.family}, score {cfg.score}, regime {cfg.regime}, d={cfg.dim}, "
           f"k*={cfg.true_experts}, k={cfg.fitted_experts}, noise std {cfg.noise_std:g}; "
           f"{len(cfg.truth_seeds)} truths x {len(cfg.seeds)} repetitions = {units} units per size, "
           f"{cfg.restarts} restarts; Adam {cfg.adam_steps} steps (lr {cfg.learning_rate:g}), then "
           f"L-BFGS up to {cfg.lbfgs_rounds} x {cfg.lbfgs_steps} evaluations"
           f"{'; restart 0 starts at the truth' if cfg.init_at_truth else ''} "
           f"({'float64' if cfg.float64 else 'float32'}). Rates over n = "
           f"{', '.join(map(str, cfg.rate_sizes))}.", "",
           "Slopes are of log(statistic over units) against log n; 95% percentile intervals from "
           f"{cfg.bootstrap} bootstrap resamples of whole (truth, repetition) curves. Fits that did "
           "not meet the convergence test are left out of every rate and counted. The parametric "
           "rate is -0.5 for the parameter losses, -1 for the test MSE.", "",
           "## Paired slope differences, sigmoid - softmax", "",
           "Negative: sigmoid's loss falls faster. `own truths`: each student on its own gate's "
           "truth (the paper's comparison), paired by (truth seed, repetition); `<gate> truth`: both "
           "students on the same data. `detectable`: the smallest true difference of mean slopes "
           "this design detects with 80% power (2.8 bootstrap standard errors). `paper` (own truths "
           "only, the paper's comparison): do the mean's and the median's intervals agree with the "
           "paper's direction (sigmoid faster in the dense regime, comparable in the sparse one)?", "",
           "| expert | comparison | metric | mean: difference [95% CI] | excludes 0 | "
           "median: difference [95% CI] | excludes 0 | detectable | excluded fits | paper |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in differences:
    m, md = r["mean"], r["median"]
    lines.append(f"| {r['expert']} | {r['comparison']} | {METRIC_NAMES[r['metric']]} | "
                 f"{_fmt_slope(m, m.difference)} | {'yes' if m.excludes_zero() else 'no'} | "
                 f"{_fmt_slope(md, md.difference)} | {'yes' if md.excludes_zero() else 'no'} | "
                 f"{m.detectable:.2f} | {r['excluded']} | "
                 f"{_agreement_both(cfg, m, md) if r['comparison'] == 'own truths' else '–'} |")
  lines += ["", "## Rates", "",
            "| truth | expert | student | metric | slope of mean [95% CI] | slope of median [95% CI] "
            "| results | excluded fits |", "|---|---|---|---|---|---|---|---|"]
  for r in rate_rows(cfg, table):
    lines.append(f"| {r['truth']} | {r['expert']} | {r['student']} | {METRIC_NAMES[r['metric']]} | "
                 f"{_fmt_slope(r['mean'], r['mean'].slope)} | "
                 f"{_fmt_slope(r['median'], r['median'].slope)} | {r['results']} | {r['excluded']} |")
  lines += ["", "## Regimes of the fits (own-gate students, converged fits)", "",
            "exact: one fitted atom per true atom after pruning; sparse / dense: a true atom whose "
            "cell holds several fitted atoms has zero / non-zero gate slopes. Voronoi slopes within "
            "each regime (the units in it at each n; counts per n).", "",
            "| truth | expert | regime | fits per n | slope of mean [95% CI] | slope of median [95% CI] |",
            "|---|---|---|---|---|---|"]
  for r in regime_rows(cfg, table):
    lines.append(f"| {r['truth']} | {r['expert']} | {r['regime']} | {'/'.join(map(str, r['counts']))} | "
                 f"{_fmt_slope(r['mean'], r['mean'].slope)} | {_fmt_slope(r['median'], r['median'].slope)} |")
  lines += ["", "## Per size: mean / median over converged fits", "",
            "`worse than truth`: fits whose training MSE is above the truth's own (the noise's "
            "mean square): certainly not the least-squares estimate the theory is about, but a "
            "local minimum (counted over all fits, converged or not).", "",
            "| truth | expert | student | n | converged | worse than truth | Voronoi mean / median | "
            "expert loss mean / median | test MSE mean / median | pruned atoms (mean) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  keys = sorted({(r["truth"], r["expert"], r["student"], r["n"]) for r in table})
  for key in keys:
    mine = [r for r in table if (r["truth"], r["expert"], r["student"], r["n"]) == key]
    ok = [r for r in mine if r["converged"]]
    cells = []
    for metric in METRICS:
      vals = np.array([r[metric] for r in ok if math.isfinite(r[metric])])
      cells.append(f"{np.mean(vals):.3g} / {np.median(vals):.3g}" if vals.size else "–")
    pruned = [r.get("pruned", r.get("expert_pruned", 0)) for r in ok]
    worse = sum(r["worse_than_truth"] for r in mine)
    lines.append(f"| {' | '.join(map(str, key))} | {len(ok)}/{len(mine)} | {worse}/{len(mine)} | "
                 f"{' | '.join(cells)} | "
                 f"{np.mean(pruned) if pruned else 0:.2f} |")
  lines += ["", "Group times (fit and score, s): " + ", ".join(
      f"{k} {v:.0f}" for k, v in sorted(seconds.items())) + "."]
  if missing:
    lines += ["", f"Not yet fitted: {', '.join(missing)}."]
  return "\n".join(lines) + "\n"


def plot(cfg: MoEStudyConfig, table, path: str) -> None:
  from matplotlib.figure import Figure  # noqa: PLC0415  (a bare Figure: Agg, pyplot untouched)

  panels = [(t, e) for t in cfg.truths for e in cfg.experts]
  fig = Figure(figsize=(3.4 * len(panels), 8.4))
  axes = fig.subplots(len(METRICS), len(panels), squeeze=False)
  for col, (truth, expert) in enumerate(panels):
    for row, metric in enumerate(METRICS):
      ax = axes[row, col]
      for student in cfg.students:
        mine = [r for r in table if (r["truth"], r["expert"], r["student"]) == (truth, expert, student)
                and r["converged"] and math.isfinite(r[metric])]
        sizes = sorted({r["n"] for r in mine})
        if not sizes:
          continue
        for statistic, style in (("mean", "o-"), ("median", "s--")):
          centre = [rates.STATISTICS[statistic]([r[metric] for r in mine if r["n"] == n]) for n in sizes]
          ax.plot(sizes, centre, style, label=f"{student} {statistic}", markersize=3)
      ax.set(xscale="log", yscale="log", xlabel="n", ylabel=METRIC_NAMES[metric],
             title=f"truth {truth}, {expert}" if row == 0 else None)
      ax.legend(fontsize=6)
  fig.tight_layout()
  fileio.write_png(path, fig, dpi=100)


def write(cfg: MoEStudyConfig, table, missing: Sequence[str], seconds: dict[str, float],
          workdir: str) -> dict[str, Any]:
  """Writes results.json, report.md and rates.png; returns the summary the entry points print."""
  paths = {"json": os.path.join(workdir, "results.json"), "report": os.path.join(workdir, "report.md"),
           "plot": os.path.join(workdir, "rates.png")}
  fileio.write_atomic(paths["json"], json.dumps({"rows": table}))
  diff_rows = difference_rows(cfg, table)
  fileio.write_atomic(paths["report"], markdown(cfg, table, missing, seconds, diff_rows))
  plot(cfg, table, paths["plot"])
  differences = [{"expert": r["expert"], "comparison": r["comparison"], "metric": r["metric"],
                  "difference": r["mean"].difference, "ci": list(r["mean"].ci),
                  "median_difference": r["median"].difference, "median_ci": list(r["median"].ci)}
                 for r in diff_rows]
  return {"workdir": workdir, "paths": paths, "differences": differences, "missing_groups": list(missing)}
