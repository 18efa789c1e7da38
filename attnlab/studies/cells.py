"""A group of study cells trained together: one jitted, vmapped program for all of them.

A cell is one (attention kind, training-set size, seed) run of the base
experiment. Cells that compile to the same program (same model config,
optimizer, budget in steps, batch sizes) form a group: their train states are
stacked on a leading cell axis, each step stacks the cells' own batches
(every cell keeps its own subset and training order), and one
`jax.jit(jax.vmap(train_step))` advances all of them at once. The attention
kind is part of the model config (a static choice), so a group holds one kind.

  group = cells.build_group(config, [Cell("sigmoid", 100, s) for s in range(3)])
  results = cells.train(group)      # or cells.train_group(config, cells_list)

A cell whose update turns non-finite (a NaN loss or parameter) is frozen at
its last finite state by a per-cell mask and reported as diverged at that
step; the other cells of the group train on unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attnlab import configlib
from attnlab import data as data_lib
from attnlab import experiment
from attnlab import metrics as metrics_lib
from attnlab.studies import analysis


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of a study.

  Attributes:
    kind: the attention kind (config.model.attention).
    n: training examples (config.data.train_examples): the first n of the
      fixed permutation, so smaller cells' examples are in larger ones'.
      None: the whole training split.
    seed: config.seed (initialisation, dropout, training order).
  """

  kind: str
  n: int | None
  seed: int


@dataclasses.dataclass(frozen=True)
class TrainedCell:
  """What one cell of a trained group gives.

  Attributes:
    cell: the cell.
    num_steps: the budget in steps (the group's).
    steps: updates applied: num_steps, or fewer if the cell diverged.
    diverged_at: the step whose update was non-finite (and not applied);
      None: trained to the end.
    train_loss: the training loss of the last applied step (NaN if none was).
    test_loss: loss on the evaluation split, of the last finite parameters.
    test_accuracy: accuracy on the evaluation split.
    test_error: 1 - test_accuracy.
    group_seconds: wall time of the whole group (set-up, compile, training,
      evaluation): cells of a group share it, so it is not a per-cell cost.
  """

  cell: Cell
  num_steps: int
  steps: int
  diverged_at: int | None
  train_loss: float
  test_loss: float
  test_accuracy: float
  group_seconds: float
  test_error: float = dataclasses.field(init=False)

  def __post_init__(self):
    object.__setattr__(self, "test_error", 1.0 - self.test_accuracy)

  def result(self) -> analysis.CellResult:
    """This cell as the study's analysis reads it (one result type for every study).

    A diverged cell counts as failed (NaN metrics: the analysis counts it but
    never averages it), not as its last finite parameters' scores.
    """
    if self.cell.n is None:
      raise ValueError(f"{self.cell}: a study cell needs its training-set size n; set "
                       "train_examples instead of training on the whole split.")
    failed = self.diverged_at is not None
    return analysis.CellResult(
        kind=self.cell.kind, n=self.cell.n, seed=self.cell.seed,
        test_error=float("nan") if failed else self.test_error,
        test_loss=float("nan") if failed else self.test_loss, steps=self.steps)


@dataclasses.dataclass(frozen=True)
class Group:
  """Cells that share one compiled program, with their experiments built.

  Attributes:
    cells: the cells, in the order of the stacked cell axis.
    experiments: each cell's experiment (its own data subset and seed).
  """

  cells: tuple[Cell, ...]
  experiments: tuple[experiment.Experiment, ...]

  @property
  def num_steps(self) -> int:
    return self.experiments[0].num_steps

  @property
  def fns(self) -> experiment.ModelFns:
    # Memoised on (model, optim, num_steps, label smoothing), which
    # `build_group` checked are the same: one object for every cell.
    return self.experiments[0].fns()

  def batches(self) -> grain.MapDataset:
    """Element s: every cell's batch of step s, stacked ({key: [cells, batch, ...]})."""
    per_cell = [data_lib.train_batches(e.datasets, batch_size=e.trainer.batch_size,
                                       num_steps=e.num_steps, seed=e.trainer.seed)
                for e in self.experiments]
    return grain.MapDataset.range(self.num_steps).map(
        lambda s: _stack([batches[s] for batches in per_cell]))


def cell_config(exp_cfg: experiment.ExperimentConfig, cell: Cell) -> experiment.ExperimentConfig:
  """The base experiment with the cell's attention kind, subset size and seed."""
  return dataclasses.replace(
      exp_cfg,
      trainer=dataclasses.replace(exp_cfg.trainer, seed=cell.seed),
      data=dataclasses.replace(exp_cfg.data, train_examples=cell.n),
      model_fields={**exp_cfg.model_fields, "attention": cell.kind})


def build_group(base_config: ml_collections.ConfigDict, cells: Sequence[Cell]) -> Group:
  """Builds every cell's experiment and checks that they can share one program.

  Raises:
    configlib.ConfigError: no cells, a cell's config is invalid (e.g. n larger
      than the training split, or below the batch size), or two cells differ
      in what the compiled program depends on (the message names the field).
  """
  if not cells:
    raise configlib.ConfigError("A group needs at least one cell; got none.")
  exp_cfg = experiment.ExperimentConfig.from_config(base_config)
  exps = tuple(experiment.build(cell_config(exp_cfg, cell)) for cell in cells)
  for cell, exp in zip(cells[1:], exps[1:]):
    _check_same_program(cells[0], exps[0], cell, exp)
  _check_same_eval_split(cells, exps)
  return Group(cells=tuple(cells), experiments=exps)


def _program_key(exp: experiment.Experiment) -> dict[str, object]:
  """What the group's jitted programs are specialised to (shapes and static choices)."""
  return {"num_steps": exp.num_steps, "model": exp.model, "optim": exp.optim,
          "batch_size": exp.trainer.batch_size, "eval_batch_size": exp.trainer.eval_batch_size,
          "label_smoothing": exp.trainer.label_smoothing}


def _check_same_program(first: Cell, first_exp: experiment.Experiment, cell: Cell,
                        exp: experiment.Experiment) -> None:
  want, got = _program_key(first_exp), _program_key(exp)
  for name in want:
    if want[name] == got[name]:
      continue
    detail = f"{name}={got[name]!r} vs {want[name]!r}"
    if dataclasses.is_dataclass(want[name]):
      differ = [f.name for f in dataclasses.fields(want[name])
                if getattr(want[name], f.name) != getattr(got[name], f.name)]
      detail = ", ".join(f"{name}.{f}={getattr(got[name], f)!r} vs {getattr(want[name], f)!r}"
                         for f in differ)
    raise configlib.ConfigError(
        f"Cells {cell} and {first} cannot share a group: they differ in {detail}. A group "
        "trains under one compiled program; put cells with another attention kind, budget "
        "in steps (e.g. a fixed-epochs budget at another n) or batch size in their own group.")


def _check_same_eval_split(cells: Sequence[Cell], exps: Sequence[experiment.Experiment]) -> None:
  """Refuses cells whose evaluation splits differ: their test numbers would not compare.

  The first evaluation batch stands for the split: a split that depends on a
  cell's seed or subset differs there already, and reading it is cheap.
  """
  def first_batch(exp):
    return next(data_lib.eval_batches(exp.datasets.eval, exp.trainer.eval_batch_size))

  reference = first_batch(exps[0])
  for cell, exp in zip(cells[1:], exps[1:]):
    same = (len(exp.datasets.eval) == len(exps[0].datasets.eval) and
            all(np.array_equal(v, reference[k]) for k, v in first_batch(exp).items()))
    if not same:
      raise configlib.ConfigError(
          f"Cells {cell} and {cells[0]} have different evaluation splits "
          f"(data set {exp.data.name!r}), so their test numbers would not compare. The "
          "evaluation split must not depend on the seed or the subset size; fix the data "
          "set's split (attnlab/data) rather than the study.")


# ----------------------------------------------------------------------------
# Training a group.
# ----------------------------------------------------------------------------


def train_group(base_config: ml_collections.ConfigDict, cells: Sequence[Cell]) -> list[TrainedCell]:
  """`train(build_group(base_config, cells))`; the wall time includes the build."""
  start = time.perf_counter()
  return train(build_group(base_config, cells), start_time=start)


def train(group: Group, *, batches: grain.MapDataset | None = None,
          start_time: float | None = None) -> list[TrainedCell]:
  """Trains the group's cells together, then evaluates each on the evaluation split.

  Args:
    group: from `build_group`.
    batches: the stacked training batches, element s for step s; None:
      `group.batches()`. Another source (e.g. one that corrupts a cell's
      batch to test divergence) must keep its shapes.
    start_time: `time.perf_counter()` at which the group's wall time starts;
      None: now.

  Returns:
    One result per cell, in the group's order.
  """
  start_time = time.perf_counter() if start_time is None else start_time
  fns, num_cells = group.fns, len(group.cells)
  batches = group.batches() if batches is None else batches

  # One compiled init called per seed, then stacked: vmapping init compiles
  # the model's construction under vmap, measured 5.2 s against 2.9 s for
  # the quick digits model (more than the vmapped train step's 5 s).
  init = _jit_init(fns)
  state_C = jax.tree.map(lambda *xs: jnp.stack(xs), *[init(cell.seed) for cell in group.cells])
  alive_C = jnp.ones((num_cells,), bool)
  step = _group_step(fns)
  history = []  # per step: (loss_C, applied_C), left on the device until the end
  data_iter = data_lib.train_iterator(batches)
  for _ in range(group.num_steps):
    state_C, alive_C, loss_C = step(state_C, next(data_iter), alive_C)
    history.append((loss_C, alive_C))
  loss_SxC, applied_SxC = (np.stack(h) for h in zip(*jax.device_get(history)))

  test = _evaluate(group, state_C.params)
  seconds = time.perf_counter() - start_time
  return [_cell_result(group, c, loss_SxC[:, c], applied_SxC[:, c], test[c], seconds)
          for c in range(num_cells)]


@functools.lru_cache(maxsize=8)
def _jit_init(fns: experiment.ModelFns):
  return jax.jit(fns.init)


@functools.lru_cache(maxsize=8)
def _group_step(fns: experiment.ModelFns):
  """`fns.train_step` over stacked cells, a cell frozen once an update is non-finite.

  Memoised per `fns` (itself memoised per model, optimizer and budget), so
  groups with the same program reuse one compiled executable.
  """

  def masked_step(state, batch, alive):
    new_state, step_metrics = fns.train_step(state, batch)
    applied = alive & step_metrics["finite"]
    # Keeps the last finite state of a diverged cell: its parameters still
    # evaluate, and NaN never reaches its optimizer state.
    state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), new_state, state)
    return state, applied, step_metrics["loss"]

  return jax.jit(jax.vmap(masked_step), donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _group_eval_step(fns: experiment.ModelFns):
  """`fns.eval_step` of stacked parameters on one (shared) evaluation batch."""
  return jax.jit(jax.vmap(fns.eval_step, in_axes=(0, None)))


def _evaluate(group: Group, params_C) -> list[dict[str, float]]:
  """Loss and accuracy of each cell's parameters on the (shared) evaluation split."""
  exp = group.experiments[0]
  eval_step = _group_eval_step(group.fns)
  totals_C = None
  for batch in data_lib.eval_batches(exp.datasets.eval, exp.trainer.eval_batch_size):
    sums_C = eval_step(params_C, batch)
    totals_C = sums_C if totals_C is None else jax.tree.map(jnp.add, totals_C, sums_C)
  totals_C = jax.device_get(totals_C)
  return [metrics_lib.means({k: v[c] for k, v in totals_C.items()})
          for c in range(len(group.cells))]


def _cell_result(group: Group, c: int, loss_S: np.ndarray, applied_S: np.ndarray,
                 test: dict[str, float], seconds: float) -> TrainedCell:
  # `applied` only turns False, never back: the mask carries over steps.
  steps = int(applied_S.sum())
  return TrainedCell(
      cell=group.cells[c], num_steps=group.num_steps, steps=steps,
      diverged_at=None if steps == group.num_steps else steps + 1,
      train_loss=float(loss_S[steps - 1]) if steps else float("nan"),
      test_loss=test["loss"], test_accuracy=test["accuracy"], group_seconds=seconds)


def _stack(batches: Sequence[data_lib.Batch]) -> data_lib.Batch:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}
