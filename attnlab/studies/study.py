"""A sample-efficiency study from its config: plan, train every group, report.

A study config (engine "study": `experiment.new_config("study", ...)`) is an
ordinary experiment config (the base experiment) with a `study` section
(`StudyConfig`): the attention kinds, the training-set sizes (nested subsets
of one fixed permutation), the seeds, and the model-selection and report
settings. Every (kind, n, seed) is a cell; seeds are paired across
kinds (same subset, same initial key, same training order).

The budget rule is the base experiment's own budget, with a floor:
  * `num_epochs=E` with `study.min_steps=M`: a cell of size n trains for
    max(M, ceil(E * n / batch_size)) steps: small subsets are trained to
    convergence rather than for a handful of steps;
  * `total_steps=S` (or `total_examples`): every cell trains S steps.
It is written into every cell's record (`budget`, `steps`).

Model selection uses a validation split of `config.data.validation_examples`
examples carved once from the training split (disjoint from every subset, the
same for every cell); the test split is scored once per cell, at its selected
step, and only reported.

`run(config, workdir)` plans the groups (one kind per group, all its sizes and
seeds together, at most `study.max_cells_per_group` cells), trains each with
`cells.train_group`, records every finished cell in <workdir>/cells/ at once,
and writes the report (`report.write_report`). A rerun skips the cells
recorded there and resumes an unfinished group from its last checkpoint
(<workdir>/groups/<group>/checkpoints/). A study may grow its seeds in its
workdir (`study.seeds` is run-neutral: a cell trains on its own seed's key and
order only): a group without a checkpoint trains only its unrecorded cells.
`render(config, workdir)` rewrites the report from the recorded cells without
training (eval.py).

Several processes (train.py --jax_distributed): every process plans the same
groups and loads the same data, and each group's cells, side by side, are
split over every process's devices (`stack.cell_mesh`); every process takes
part in the group checkpoints, and only process 0 writes the config, the cell
records and the report and prints progress.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from attnlab import attention as attention_lib
from attnlab import checks
from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import experiment
from attnlab import metrics as metrics_lib
from attnlab import model_fns
from attnlab import workdir as workdir_lib
from attnlab.studies import analysis
from attnlab.studies import cells as cells_lib
from attnlab.studies import groups as groups_lib
from attnlab.studies import report as report_lib
from attnlab.studies import results as results_lib

CELLS_DIR = "cells"
GROUPS_DIR = "groups"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What `config.study` may hold.

  Attributes:
    kinds: attention kinds to compare (any registered kind).
    train_sizes: training-set sizes, increasing: the first n of one fixed
      permutation of the training split, so each subset holds the smaller ones.
    seeds: seeds of every (kind, n); paired across kinds.
    min_steps: floor of every cell's budget in steps (see the module docstring).
    eval_every_steps: score each cell on the validation split this often (and
      at its last step) and keep its best parameters.
    checkpoint_every_steps: save the group being trained this often; None:
      never (a killed group restarts).
    max_cells_per_group: most cells trained together (memory).
    vmap_cells: cells computed side by side in a group's program, the rest one
      chunk after another in the same program; 1: one dispatch per cell of a
      single-cell program (`groups.GroupSetup.vmap_cells`); None: by platform,
      1 on CPU (where side by side is slower per cell), the whole group on GPU
      and TPU. At least a group's size: that whole group side by side, its
      cells split over the devices (several processes need this).
    target_error: test error at which samples-to-target is measured.
    compare: the two kinds of the paired difference (compare[0] - compare[1])
      and of the samples ratio (compare[1] / compare[0]: how many times more
      samples compare[1] needs).
    bootstrap: bootstrap replicates of the fits and the ratio.
    progress_bar: one bar over the study on a terminal (log lines otherwise).
  """

  kinds: tuple[str, ...] = ("sigmoid", "softmax")
  train_sizes: tuple[int, ...] = ()
  seeds: tuple[int, ...] = (0, 1, 2)
  min_steps: int = 1
  eval_every_steps: int | None = 100
  checkpoint_every_steps: int | None = 200
  max_cells_per_group: int = 64
  vmap_cells: int | None = None
  target_error: float = 0.1
  compare: tuple[str, str] = ("sigmoid", "softmax")
  bootstrap: int = 1000
  progress_bar: bool = True

  def __post_init__(self):
    for name in ("kinds", "train_sizes", "seeds", "compare"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for kind in self.kinds:
      if kind not in attention_lib.KINDS:
        raise _error("kinds", self.kinds, f"{kind!r} is not a registered attention kind."
                     f"{configlib.suggest(kind, attention_lib.KINDS)} Known: "
                     f"{', '.join(sorted(attention_lib.KINDS))}.")
    if not self.kinds or len(set(self.kinds)) != len(self.kinds):
      raise _error("kinds", self.kinds, "expected at least one kind, each once.")
    sizes = self.train_sizes
    if not sizes or any(not checks.is_int(n) or n < 1 for n in sizes) or list(sizes) != sorted(set(sizes)):
      raise _error("train_sizes", sizes, "expected positive ints in increasing order, each once.")
    if not self.seeds or any(not checks.is_int(s) or s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
      raise _error("seeds", self.seeds, "expected non-negative ints, each once.")
    if len(self.compare) != 2 or not set(self.compare) <= set(self.kinds) or self.compare[0] == self.compare[1]:
      raise _error("compare", self.compare, f"expected two different kinds of study.kinds={self.kinds}.")
    for name in ("min_steps", "max_cells_per_group", "bootstrap"):
      checks.check_positive_int(name, getattr(self, name), section="study")
    for name in ("eval_every_steps", "checkpoint_every_steps", "vmap_cells"):
      checks.check_positive_int(name, getattr(self, name), or_none=True, section="study")
    if not 0.0 < self.target_error < 1.0:
      raise _error("target_error", self.target_error, "expected a test error in (0, 1).")

  @property
  def cells(self) -> list[groups_lib.Cell]:
    return [groups_lib.Cell(k, n, s) for k in self.kinds for n in self.train_sizes for s in self.seeds]


_error = functools.partial(checks.field_error, section="study")


def split_config(config: ml_collections.ConfigDict) -> tuple[StudyConfig, experiment.ExperimentConfig]:
  """The study section and the base experiment (validated; no data read).

  Raises:
    configlib.ConfigError: a bad study or base-experiment field (named).
  """
  if configlib.engine(config) != "study":
    raise configlib.ConfigError(
        f"config.engine={config.engine!r}: a study's config has engine 'study' and a `study` "
        "section; start from a file in configs/sample_efficiency/.")
  study = configlib.to_dataclass(StudyConfig, config.study, where="config.study")
  base = ml_collections.ConfigDict({k: v for k, v in config.items() if k != "study"})
  exp_cfg = experiment.ExperimentConfig.from_config(base)
  if exp_cfg.data.train_examples is not None:
    raise configlib.ConfigError(
        f"config.data.train_examples={exp_cfg.data.train_examples}: a study sets each cell's "
        "training-set size from config.study.train_sizes; set train_examples=none.")
  return study, exp_cfg


# ----------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------


def budget_rule(study: StudyConfig, exp_cfg: experiment.ExperimentConfig) -> str:
  """The budget rule in words, as recorded with every cell."""
  t = exp_cfg.trainer
  if t.num_epochs is not None:
    rule = f"epochs={t.num_epochs:g}"
  elif t.total_steps is not None:
    rule = f"steps={t.total_steps}"
  else:
    rule = f"examples={t.total_examples}"
  return f"{rule}, min_steps={study.min_steps}, batch={t.batch_size}"


def cell_budget(study: StudyConfig, exp_cfg: experiment.ExperimentConfig, n: int) -> int:
  """Steps of a cell of size n: the base experiment's budget for n examples, at least min_steps."""
  t = exp_cfg.trainer
  steps = data_lib.resolve_num_steps(batch_size=t.batch_size, num_train_examples=n,
                                     total_steps=t.total_steps, num_epochs=t.num_epochs,
                                     total_examples=t.total_examples)
  return max(study.min_steps, steps)


def plan(study: StudyConfig, exp_cfg: experiment.ExperimentConfig) -> list[groups_lib.GroupSpec]:
  """The groups: per kind, its cells ordered by budget, in chunks of max_cells_per_group.

  Cells with close budgets share a group, so that a finished cell leaving the
  stack wastes little; every group is named after its kind (and its chunk).
  """
  rule = budget_rule(study, exp_cfg)
  groups = []
  for kind in study.kinds:
    kind_cells = sorted((c for c in study.cells if c.kind == kind),
                        key=lambda c: (cell_budget(study, exp_cfg, c.n), c.n, c.seed))
    chunks = [kind_cells[i:i + study.max_cells_per_group]
              for i in range(0, len(kind_cells), study.max_cells_per_group)]
    for j, chunk in enumerate(chunks):
      groups.append(groups_lib.GroupSpec(
          name=kind if len(chunks) == 1 else f"{kind}.{j}", cells=tuple(chunk),
          budgets=tuple(cell_budget(study, exp_cfg, c.n) for c in chunk), budget_rule=rule))
  return groups


# ----------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_step: Callable[[str, int], None] | None = None) -> dict[str, Any]:
  """Trains every cell of the study not yet recorded in `workdir`, then writes the report.

  Args:
    config: a study config (engine "study").
    workdir: where cells, checkpoints and the report go.
    on_step: called with (group name, step) after every step of a group: a
      seam for notebooks and tests (e.g. to kill the process mid-group).

  Returns:
    The summary: report paths, the samples ratio, cells trained / skipped,
    the groups resumed from a checkpoint ({name: step}), wall seconds.

  Raises:
    configlib.ConfigError: a bad config, or `workdir` holds another study.
    DatasetNotPreparedError: the data set is missing (before anything is written).
    workdir_lib.WorkdirLockedError: another live process uses `workdir`.
  """
  start = time.perf_counter()
  study, exp_cfg = split_config(config)
  groups = plan(study, exp_cfg)
  _check_processes(study, groups)
  setups = prepare(study, exp_cfg)
  with workdir_lib.run_protocol(config, workdir, trained=lambda: _has_progress(workdir)) as run:
    done = _recorded_cells(workdir)
    todo = [g for g in (_unrecorded(g, done, workdir) for g in groups) if g is not None]
    total = sum(sum(g.budgets) for g in groups)
    progress = _StudyProgress(total, total - sum(sum(g.budgets) for g in todo), len(study.cells),
                              sum(c.name in done for c in study.cells),
                              enabled=study.progress_bar and workdir_lib.writes_files())
    resumed = {}
    for group in todo:
      step = _train_group(group, setups[group.cells[0].kind], workdir, study, progress, on_step)
      if step:
        resumed[group.name] = step
    progress.close()
    summary = {"workdir": workdir}
    if workdir_lib.writes_files():
      summary = _report(study, exp_cfg, workdir)
    summary.update(trained_cells=sum(len(g.cells) for g in todo),
                   skipped_cells=len(study.cells) - sum(len(g.cells) for g in todo),
                   resumed_groups=resumed,
                   seconds=time.perf_counter() - start)
    run.finish(summary)
  return summary


def _unrecorded(group: groups_lib.GroupSpec, done: dict[str, results_lib.CellResult],
                workdir: str) -> groups_lib.GroupSpec | None:
  """What is left to train of `group`: None when every cell is recorded.

  A group with a checkpoint on disk resumes whole: the checkpoint fixes its plan (the
  cells that finished before it are skipped by their budgets). Otherwise only its
  unrecorded cells train, e.g. the new seeds of a study grown in its workdir, instead of
  training its recorded cells again.
  """
  missing = [i for i, c in enumerate(group.cells) if c.name not in done]
  if not missing:
    return None
  if len(missing) == len(group.cells) or os.path.isdir(_group_dir(workdir, group.name)):
    return group
  return dataclasses.replace(group, cells=tuple(group.cells[i] for i in missing),
                             budgets=tuple(group.budgets[i] for i in missing))


def _check_processes(study: StudyConfig, groups: list[groups_lib.GroupSpec]) -> None:
  """Refuses several processes unless every group trains side by side (its cells split over them).

  Cells one at a time or in chunks stay on one device: every process would
  train every cell again, gaining nothing over one host (spreading whole cells
  over the processes instead is another scheme, worth it only on CPU hosts).
  """
  largest, chunk = max(len(g.cells) for g in groups), vmap_cells(study)
  if jax.process_count() > 1 and not groups_lib.side_by_side(chunk, largest):
    raise configlib.ConfigError(
        f"config.study.vmap_cells={study.vmap_cells!r} trains {chunk} cell(s) of a group at a "
        f"time on one device, and this is one of {jax.process_count()} processes: set "
        f"--config.study.vmap_cells={largest} (the largest group) to run each group's cells side "
        "by side, split over every process's devices.")


def render(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Rewrites the report of `workdir` from its recorded cells, without training.

  Raises:
    FileNotFoundError: no cell of this study is recorded there.
    configlib.ConfigError: the workdir holds another study.
  """
  study, exp_cfg = split_config(config)
  workdir_lib.check_same_run(config, workdir, trained=_has_progress(workdir))
  return _report(study, exp_cfg, workdir)


def prepare(study: StudyConfig, exp_cfg: experiment.ExperimentConfig
            ) -> dict[str, groups_lib.GroupSetup]:
  """Opens the data (in memory) and builds, per kind, what its groups share (data included).

  For callers that train groups themselves (benchmarks, notebooks, tests);
  `run` uses it. Raises before anything is written, like `run`.
  """
  largest = max(study.train_sizes)
  try:
    exp = experiment.build(dataclasses.replace(
        exp_cfg, data=dataclasses.replace(exp_cfg.data, train_examples=largest)))
  except configlib.ConfigError as e:
    # The data names train_examples, which the study sets from its largest size.
    raise configlib.ConfigError(
        f"config.study.train_sizes: the largest size, {largest}, is the training pool the "
        f"study opens (as data.train_examples), and the data refuses it: {e}") from e
  if exp_cfg.trainer.batch_size > min(study.train_sizes):
    raise configlib.ConfigError(
        f"config.batch_size={exp_cfg.trainer.batch_size} is larger than the smallest training "
        f"set, config.study.train_sizes[0]={min(study.train_sizes)}: every batch would repeat "
        "examples. Lower the batch size or drop the smallest sizes.")
  data = groups_lib.StudyData.load(exp.datasets, exp.trainer.eval_batch_size)
  num_steps = max(cell_budget(study, exp_cfg, n) for n in study.train_sizes)
  setups = {}
  for kind in study.kinds:
    kind_cfg = dataclasses.replace(exp_cfg, model_fields={**exp_cfg.model_fields, "attention": kind})
    with experiment.as_config_error():
      model = kind_cfg.model_config(exp.datasets.spec)
    fns = model_fns.experiment_fns(model, exp_cfg.optim, num_steps, exp_cfg.trainer.label_smoothing)
    setups[kind] = groups_lib.GroupSetup(
        fns=fns, data=data, batch_size=exp_cfg.trainer.batch_size,
        eval_batch_size=exp_cfg.trainer.eval_batch_size, eval_every_steps=study.eval_every_steps,
        vmap_cells=vmap_cells(study))
  return setups


def vmap_cells(study: StudyConfig) -> int | None:
  """The study's vmap_cells, or the platform's choice when it is None (see StudyConfig)."""
  if study.vmap_cells is not None:
    return study.vmap_cells
  return 1 if jax.default_backend() == "cpu" else None


def _train_group(group: groups_lib.GroupSpec, setup: groups_lib.GroupSetup, workdir: str,
                 study: StudyConfig, progress: _StudyProgress,
                 on_step: Callable[[str, int], None] | None) -> int | None:
  """Trains (or resumes) one group, recording each cell as it finishes; returns the resumed step."""
  group_dir = _group_dir(workdir, group.name)
  checkpointer = checkpoint_lib.Checkpointer(group_dir, keep=2,
                                             every_steps=study.checkpoint_every_steps)
  resumed = checkpointer.latest_step()
  progress.start_group(group, resumed or 0)

  def step_done(step: int, alive: int) -> None:
    progress.step(step, alive)
    if on_step is not None:
      on_step(group.name, step)

  def cell_done(result: results_lib.CellResult) -> None:
    if workdir_lib.writes_files():
      _record_cell(workdir, result)
    progress.cell_done(result)

  try:
    cells_lib.train_group(group, setup, checkpointer=checkpointer, on_cell_done=cell_done,
                          on_step=step_done)
  finally:
    checkpointer.close()
  # Every cell is recorded: the group's checkpoints have served, once every process is done
  # with them.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"study group {group.name} trained")
  if workdir_lib.writes_files():
    shutil.rmtree(group_dir, ignore_errors=True)
  return resumed


# ----------------------------------------------------------------------------
# Recorded cells and the report.
# ----------------------------------------------------------------------------


def _group_dir(workdir: str, name: str) -> str:
  """<workdir>/groups/<group>: the group's checkpoints while it trains (removed after)."""
  return os.path.join(workdir, GROUPS_DIR, name)


def _cell_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, CELLS_DIR, f"{name}.json")


def _record_cell(workdir: str, result: results_lib.CellResult) -> None:
  """<workdir>/cells/<cell>.json, written atomically as soon as the cell has finished."""
  name = groups_lib.Cell(result.kind, result.n, result.seed).name
  os.makedirs(os.path.join(workdir, CELLS_DIR), exist_ok=True)
  results_lib.save_cells([result], _cell_path(workdir, name))


def _recorded_cells(workdir: str) -> dict[str, results_lib.CellResult]:
  found = {}
  for path in glob.glob(os.path.join(workdir, CELLS_DIR, "*.json")):
    (cell,) = results_lib.load_cells(path)
    found[groups_lib.Cell(cell.kind, cell.n, cell.seed).name] = cell
  return found


def _has_progress(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, CELLS_DIR, "*.json"))) or os.path.isdir(
      os.path.join(workdir, GROUPS_DIR))


def _report(study: StudyConfig, exp_cfg: experiment.ExperimentConfig, workdir: str) -> dict[str, Any]:
  recorded = _recorded_cells(workdir)
  wanted = study.cells
  missing = [c.name for c in wanted if c.name not in recorded]
  if len(missing) == len(wanted):
    raise FileNotFoundError(
        f"No cell of this study is recorded in {workdir}/{CELLS_DIR}; train it first "
        "(python train.py with the same --config and --workdir).")
  results = [recorded[c.name] for c in wanted if c.name in recorded]
  paths = report_lib.write_report(
      results, workdir, target=study.target_error, compare=study.compare,
      ratio_kinds=(study.compare[1], study.compare[0]), n_boot=study.bootstrap)
  ratio = analysis.samples_ratio(results, study.target_error, (study.compare[1], study.compare[0]),
                                 n_boot=study.bootstrap)
  return {"workdir": workdir, "paths": paths, "missing_cells": missing,
          "ratio": dataclasses.asdict(ratio), "target_error": study.target_error,
          "compare": list(study.compare), "budget": budget_rule(study, exp_cfg),
          "cells": len(results)}


# ----------------------------------------------------------------------------
# Progress over the whole study.
# ----------------------------------------------------------------------------


class _StudyProgress:
  """One bar over the study's cell-steps (log lines when not on a terminal)."""

  def __init__(self, total_work: int, done_work: int, total_cells: int, done_cells: int, *,
               enabled: bool):
    self._bar = metrics_lib.Progress(total_work, done_work, enabled=enabled,
                                     log_every=max(total_work // 50, 1), unit="cell-step")
    self._work, self._cells, self._total_cells = done_work, done_cells, total_cells
    self._group = ""

  def start_group(self, group: groups_lib.GroupSpec, step: int) -> None:
    self._group = group.name
    # A group resumed at `step`: each cell has done min(budget, step) steps, before this run.
    self._work += sum(min(b, step) for b in group.budgets)
    self._bar.skip_to(self._work)

  def step(self, step: int, alive: int) -> None:
    self._work += alive
    self._bar.update(self._work, {}, describe=f"group {self._group} step {step}, cells "
                     f"{self._cells}/{self._total_cells} done")

  def cell_done(self, result: results_lib.CellResult) -> None:
    self._cells += 1

  def close(self) -> None:
    self._bar.close()
