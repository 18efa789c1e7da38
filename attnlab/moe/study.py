r"""The study: groups of fits recorded resumably in a workdir, then the report.

Ground truths and data (model.py): one truth per `truth_seeds` entry, the same
parameters under each gate in `truths`; a repetition (seed) of a truth draws
a pool of max(train_sizes) Gaussian inputs and noise, and size n uses its
first n (nested subsets), so a (truth, repetition) unit has one curve over n.
Both gates' truths share the inputs and noise.

A group is one (expert, n): every student fitted to every (truth gate, truth
seed, repetition) problem (fit.py), then scored in float64 against its truth
on the truth's fixed test inputs: test MSE, the student's own Voronoi loss
(same-gate problems only: the other gate cannot express the truth's mixing
measure) and the expert loss (losses.py), with what the losses pruned,
flipped and which regime the fit is in. Every fitted parameter is recorded,
so the losses can be recomputed without refitting.

  run(config, workdir)     fits the groups not yet in <workdir>/cells/, writes the report
  render(config, workdir)  rewrites the report from the recorded groups
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attnlab import fileio
from attnlab import workdir as workdir_lib
from attnlab.moe import fit
from attnlab.moe import losses
from attnlab.moe import model
from attnlab.moe import report
from attnlab.moe.config import MoEStudyConfig
from attnlab.moe.config import study_config

GROUPS_DIR = "cells"
METRICS = ("voronoi", "expert_loss", "test_mse")


def problems(cfg: MoEStudyConfig) -> list[tuple[str, int, int]]:
  """Every (truth gate, truth seed, repetition) a group fits, in the order of its arrays."""
  return [(g, t, s) for g in cfg.truths for t in cfg.truth_seeds for s in cfg.seeds]


def _scores(cfg, params, truth, x_test, gate_truth, student, expert) -> dict[str, Any]:
  """The metrics of one fitted student against one truth (float64)."""
  f_star = _predict(cfg, truth, x_test, gate_truth, expert)
  mse = float(np.mean((_predict(cfg, params, x_test, student, expert) - f_star) ** 2))
  if cfg.family == "attention":
    param_loss, value_loss = losses.attention_losses(params, truth, student)
    return {"test_mse": mse, "voronoi": param_loss if student == gate_truth else math.nan,
            "expert_loss": value_loss if student == gate_truth else math.nan}
  common = dict(gate=student, expert=expert, inputs=x_test, negligible=cfg.negligible,
                sparse_atoms=model.sparse_atoms(cfg))
  out = {"test_mse": mse}
  expert_score = losses.expert_score(params, truth, **common)
  out.update(expert_loss=expert_score.loss, expert_pruned=expert_score.pruned)
  if student == gate_truth:
    v = losses.voronoi_score(params, truth, **common)
    out.update(voronoi=v.loss, pruned=v.pruned, flipped=v.flipped, cell_sizes=list(v.cell_sizes),
               regime=v.regime, empty_cells=v.empty_cells)
  else:
    out["voronoi"] = math.nan
  return out


def _predict(cfg, params, x, gate, expert) -> np.ndarray:
  if cfg.family == "attention":
    with fit.precision(cfg):
      return np.asarray(model.predict({k: jnp.asarray(v) for k, v in params.items()},
                                      jnp.asarray(x), gate, expert, "attention"), np.float64)
  return losses.regression(params, x, gate, expert)


def fit_group(cfg: MoEStudyConfig, expert: str, n: int) -> dict[str, Any]:
  """Fits and scores every student on every problem at size n; returns the group's record."""
  start = time.perf_counter()
  truths = {t: model.ground_truth(cfg, t) for t in cfg.truth_seeds}
  tests = {t: np.asarray(model.test_inputs(cfg, t), np.float64) for t in cfg.truth_seeds}
  todo = problems(cfg)
  with fit.precision(cfg):
    dtype = jnp.float64 if cfg.float64 else jnp.float32
    xs, ys = [], []
    for gate, t, seed in todo:
      x, noise = model.draw_data(cfg, t, seed, n)
      x = x.astype(dtype)
      truth = {k: jnp.asarray(v, dtype) for k, v in truths[t].items()}
      xs.append(x)
      ys.append(model.predict(truth, x, gate, expert, cfg.family) + noise.astype(dtype))
    x_P, y_P = jnp.stack(xs), jnp.stack(ys)
    fitted = {}
    for s_index, student in enumerate(cfg.students):
      keys = jnp.stack([jax.random.fold_in(jax.random.key(1_000_003 * (1 + seed) + 7919 * t + n), s_index)
                        for _, t, seed in todo])
      inits = jax.vmap(lambda k: jax.vmap(lambda r: model.init_params(
          r, cfg, cfg.fitted_experts, cfg.init_scale))(jax.random.split(k, cfg.restarts)))(keys)
      inits = jax.tree.map(lambda v: v.astype(dtype), inits)
      if cfg.init_at_truth:
        inits = _start_at_truth(inits, [truths[t] for _, t, _ in todo], cfg.true_experts)
      fitted[student] = fit.fit_students(cfg, expert, student, inits, x_P, y_P)
  fit_seconds = time.perf_counter() - start
  cells = []
  for student, result in fitted.items():
    for i, (gate, t, seed) in enumerate(todo):
      params = {k: np.asarray(v[i], np.float64) for k, v in result["params"].items()}
      cells.append({"truth": gate, "truth_seed": t, "seed": seed, "student": student,
                    "train_mse": float(result["train_mse"][i]),
                    "converged": bool(result["converged"][i]),
                    "evaluations": int(result["evaluations"][i]), "rounds": int(result["rounds"][i]),
                    **_scores(cfg, params, truths[t], tests[t], gate, student, expert),
                    "params": {k: v.tolist() for k, v in params.items()}})
  return {"expert": expert, "n": n, "fit_seconds": fit_seconds,
          "seconds": time.perf_counter() - start, "cells": cells}


def _start_at_truth(inits, truths: list[dict[str, np.ndarray]], k_true: int):
  """Restart 0 of problem p starts with problem p's true atoms in its first k* atoms."""
  out = {}
  for name, v in inits.items():
    true = jnp.asarray(np.stack([t[name] for t in truths]), v.dtype)  # [P, k*, ...]
    out[name] = v.at[:, 0, :k_true].set(true)
  return out


@functools.lru_cache(maxsize=None)
def truth_train_mse(cfg: MoEStudyConfig, truth_seed: int, seed: int) -> np.ndarray:
  """The truth's own training MSE, mean(noise[:n]^2), at every n of the config ([sizes])."""
  with fit.precision(cfg):
    noise = np.asarray(model.draw_data(cfg, truth_seed, seed, max(cfg.train_sizes))[1], np.float64)
  sq = noise.reshape(len(noise), -1) ** 2
  return np.array([np.mean(sq[:n]) for n in cfg.train_sizes])


def group_name(expert: str, n: int) -> str:
  return f"{expert}_n{n}"


def groups(cfg: MoEStudyConfig) -> list[tuple[str, int]]:
  return [(e, n) for n in cfg.train_sizes for e in cfg.experts]


def recorded(workdir: str) -> dict[str, dict[str, Any]]:
  found = {}
  for path in glob.glob(os.path.join(workdir, GROUPS_DIR, "*.json")):
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    found[group_name(record["expert"], record["n"])] = record
  return found


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_group: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Fits every (expert, n) group not yet recorded in `workdir`, then writes the report.

  Each group is written to <workdir>/cells/<expert>_n<n>.json as soon as it is
  fitted; a rerun skips recorded groups.

  Raises:
    configlib.ConfigError: a bad config, or `workdir` holds another study.
    workdir_lib.WorkdirLockedError: another live process uses `workdir`.
  """
  start = time.perf_counter()
  cfg = study_config(config)
  with workdir_lib.run_protocol(config, workdir, trained=lambda: bool(recorded(workdir))) as run:
    done = recorded(workdir)
    todo = [g for g in groups(cfg) if group_name(*g) not in done]
    for expert, n in todo:
      record = fit_group(cfg, expert, n)
      if workdir_lib.writes_files():  # every process fits every group; process 0 records it
        os.makedirs(os.path.join(workdir, GROUPS_DIR), exist_ok=True)
        # NaN (an undefined loss) is written as NaN.
        fileio.write_atomic(os.path.join(workdir, GROUPS_DIR, f"{group_name(expert, n)}.json"),
                            json.dumps(record))
      print(f"moe: {group_name(expert, n)} fitted in {record['fit_seconds']:.1f} s, scored in "
            f"{record['seconds'] - record['fit_seconds']:.1f} s", flush=True)
      if on_group is not None:
        on_group(group_name(expert, n))
    summary = _report(cfg, workdir) if workdir_lib.writes_files() else {"workdir": workdir}
    summary.update(fitted_groups=len(todo), skipped_groups=len(groups(cfg)) - len(todo),
                   seconds=time.perf_counter() - start)
    run.finish(summary)
  return summary


def render(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Rewrites the report of `workdir` from its recorded groups, without fitting."""
  cfg = study_config(config)
  workdir_lib.check_same_run(config, workdir, trained=bool(recorded(workdir)))
  return _report(cfg, workdir)


def rows(cfg: MoEStudyConfig, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """One flat row per (truth, expert, student, n, truth seed, seed) of the config's recorded groups."""
  out = []
  for expert, n in groups(cfg):
    record = records.get(group_name(expert, n))
    for c in record["cells"] if record else ():
      if (c["seed"] in cfg.seeds and c["truth_seed"] in cfg.truth_seeds and c["truth"] in cfg.truths
          and c["student"] in cfg.students):
        truth_mse = truth_train_mse(cfg, c["truth_seed"], c["seed"])[cfg.train_sizes.index(n)]
        out.append({"expert": expert, "n": n, **{k: v for k, v in c.items() if k != "params"},
                    # Above the truth's own training loss: certainly not the least-squares fit.
                    "worse_than_truth": bool(c["train_mse"] > truth_mse)})
  return out


def _report(cfg: MoEStudyConfig, workdir: str) -> dict[str, Any]:
  records = recorded(workdir)
  table = rows(cfg, records)
  if not table:
    raise FileNotFoundError(f"No group of this study is recorded in {workdir}/{GROUPS_DIR}; "
                            "run it first (python train.py with the same --config and --workdir).")
  missing = [group_name(*g) for g in groups(cfg) if group_name(*g) not in records]
  seconds = {group_name(r["expert"], r["n"]): r["seconds"] for r in records.values()}
  return report.write(cfg, table, missing, seconds, workdir)


def print_summary(summary: dict[str, Any]) -> None:
  """Prints what `run` or `render` returned: the report, its paths, and what was fitted."""
  with open(summary["paths"]["report"], encoding="utf-8") as f:
    print("\n" + f.read().rstrip())
  print(f"\n  report: {summary['paths']['report']}\n  plot:   {summary['paths']['plot']}")
  if "seconds" in summary:
    print(f"  {summary['fitted_groups']} groups fitted, {summary['skipped_groups']} already "
          f"recorded, in {summary['seconds']:.0f} s.")
