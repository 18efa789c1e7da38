"""A group of study cells trained together: one jitted, vmapped program for all of them.

A cell is one (attention kind, training-set size n, seed) run of a study's base
experiment. The cells of a group share one model config (the kind is a static
choice, so a group holds one kind), optimizer and batch size, and may have
different budgets in steps (a fixed-epochs budget gives a larger n more steps):

  * Their train states are stacked on a leading cell axis, and one
    `jax.jit(jax.vmap(train_step))` advances all of them by one step. Each
    cell's batch is gathered on the device from the study's training pool
    (`StudyData`) by its own example indices, so every cell keeps its own
    subset (the first n of the pool) and its own training order
    (`data.epoch_batches(n, batch, seed, ...)`), and no batch crosses from
    the host per step.
  * Each cell follows its own learning-rate schedule (its budget is a traced
    input of `train_step`), and finished cells stop costing work. With cells
    computed one at a time (`vmap_cells=1`, CPU's default) a step is one
    dispatch per training cell of a program that updates that cell of the
    stack in place, so a finished cell is skipped, the stack keeps its size
    and the program compiles once; with cells side by side under vmap a
    finished cell leaves the stack (one compile per stack size).
  * Many devices: with the whole stack side by side (`vmap_cells=None`, the
    accelerators' default, or at least the stack's size) the cell axis is
    split over the devices (`cell_mesh`): cells are independent, so each
    device trains its own cells and nothing crosses between them; the data is
    replicated beside them. Several processes (jax.distributed) split it over
    every process's devices: each builds the same stack and data (a study's
    are small and deterministic) and places its own shards (`_put`).
  * Model selection: every `eval_every_steps` steps and at its last step each
    cell is scored on the validation split; its best parameters (lowest
    validation error, ties to the lower loss, then the earlier step) are
    kept and scored once on the test split when it leaves the stack.
  * A cell whose update turns non-finite (a NaN loss or parameter) is frozen
    at its last finite state and reported as diverged (failed) at that step;
    the others train on.
  * With a `checkpoint.Checkpointer`, the whole group's state is saved every
    `checkpointer.every_steps` steps and a rerun resumes from it. The stack at
    a step is a function of that step (cells with a larger budget), so a
    checkpoint needs no other bookkeeping (finished cells kept in the stack
    are left out of it).

  results = cells.train_group(spec, setup)      # one CellResult per cell
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from attnlab import checkpoint as checkpoint_lib
from attnlab import data as data_lib
from attnlab import metrics as metrics_lib
from attnlab import model_fns
from attnlab.studies.results import CellResult


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
  """One run of a study.

  Attributes:
    kind: the attention kind (config.model.attention).
    n: training examples: the first n of the study's fixed permutation, so
      smaller cells' examples are in larger ones'.
    seed: the parameters' initialisation, dropout masks and training order.
      The same seed in two kinds: the same initial key and order (paired).
  """

  kind: str
  n: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.kind}_n{self.n}_seed{self.seed}"


# ----------------------------------------------------------------------------
# The data, in memory.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudyData:
  """A study's splits as arrays on the device, loaded once for every cell.

  Attributes:
    train: the training pool, the first `max n` examples of the fixed
      permutation ({key: [N, ...]}); a cell of size n trains on pool[:n].
    validation: the validation split carved from the training split (the end
      of the same permutation: disjoint from every subset), or None.
    test: the evaluation split, padded with weight-0 examples to a multiple
      of the evaluation batch size.
  """

  train: dict[str, jax.Array]
  validation: dict[str, jax.Array] | None
  test: dict[str, jax.Array]

  @classmethod
  def load(cls, datasets: data_lib.Datasets, eval_batch_size: int) -> StudyData:
    """From a study's opened data (`train_examples` = the largest n)."""
    if datasets.augment is not None:
      raise NotImplementedError(
          "Studies hold their data in memory and do not augment it: set "
          "config.data.random_shift=0 for a study.")
    validation = datasets.validation
    return cls(
        train=jax.device_put(data_lib.to_arrays(datasets.train)),
        validation=None if validation is None else _padded(validation, eval_batch_size),
        test=_padded(datasets.eval, eval_batch_size))


def _padded(dataset, batch_size: int) -> dict[str, jax.Array]:
  """All of `dataset` in memory, padded with weight-0 examples to a multiple of batch_size."""
  arrays = data_lib.to_arrays(dataset)
  pad = -len(dataset) % batch_size
  return jax.device_put({k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                         for k, v in arrays.items()})


# ----------------------------------------------------------------------------
# A group and what it is trained with.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """Cells of one kind trained together, each with its budget in steps.

  Attributes:
    name: names the group's checkpoint directory, e.g. "sigmoid".
    cells: the cells, in the order of the stacked cell axis.
    budgets: each cell's number of steps.
    budget_rule: the rule that gave the budgets, in words (recorded per cell).
  """

  name: str
  cells: tuple[Cell, ...]
  budgets: tuple[int, ...]
  budget_rule: str = ""

  def __post_init__(self):
    if not self.cells or len(self.cells) != len(self.budgets):
      raise ValueError(f"Group {self.name!r}: {len(self.cells)} cells and {len(self.budgets)} "
                       "budgets; expected one budget per cell, and at least one cell.")
    if len({c.kind for c in self.cells}) != 1:
      raise ValueError(f"Group {self.name!r} mixes attention kinds {sorted({c.kind for c in self.cells})}; "
                       "a group holds one kind (it is compiled into the program).")
    if len(set(self.cells)) != len(self.cells):
      raise ValueError(f"Group {self.name!r} holds a cell twice.")

  def alive_at(self, step: int) -> list[int]:
    """Positions of the cells still training after `step` steps (budget > step)."""
    return [i for i, b in enumerate(self.budgets) if b > step]


@dataclasses.dataclass(frozen=True)
class GroupSetup:
  """What every cell of a group shares.

  Attributes:
    fns: the model functions (their train_step takes each cell's budget).
    data: the study's data in memory.
    batch_size: training examples per step and cell.
    eval_batch_size: examples per evaluation batch.
    eval_every_steps: score the validation split this often (and at each
      cell's last step); None: only at the last step (no selection).
    vmap_cells: how many cells the group's program computes side by side
      (`jax.vmap`); the rest of the stack runs one chunk after another inside
      the same program (`jax.lax.map(..., batch_size=vmap_cells)`), so a step
      is still one dispatch and one compile. None (or at least the stack's
      size): the whole stack side by side (accelerators, where C cells fill
      the device), split over `devices`. 1: one dispatch per cell
      of a single-cell program (CPU's default). On CPU a C-cell vmap costs
      what a C-times-larger batch costs, which is more per example than a small
      batch once activations leave the cache, and a program looping over the
      cells ran slower than dispatching each (benchmarks/sweep.py).
    devices: what the cell axis of a stack side by side is split over
      (`cell_mesh`); None: every device (of every process).
  """

  fns: model_fns.ModelFns
  data: StudyData
  batch_size: int
  eval_batch_size: int
  eval_every_steps: int | None = None
  vmap_cells: int | None = None
  devices: tuple[jax.Device, ...] | None = None


# ----------------------------------------------------------------------------
# Training a group.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class _Stack:
  """The group's per-cell arrays along a leading cell axis (one pytree: it is checkpointed)."""

  state: model_fns.TrainState
  best_params: Any
  best_error: jax.Array  # [C] float32: validation error of best_params (inf: none yet)
  best_loss: jax.Array  # [C] float32
  best_step: jax.Array  # [C] int32
  applied: jax.Array  # [C] int32: updates applied (stops growing when a cell diverges)
  alive: jax.Array  # [C] bool: False once an update was non-finite (the cell is frozen)
  last_loss: jax.Array  # [C] float32: training loss of the last applied update

  def tree(self) -> dict[str, Any]:
    # Not dataclasses.asdict: it would turn the TrainState into a dict too.
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def take(self, positions: Sequence[int]) -> _Stack:
    index = np.asarray(positions)
    return _Stack(**jax.tree.map(lambda x: x[index], self.tree()))


def side_by_side(vmap_cells: int | None, num_cells: int) -> bool:
  """Whether a stack of `num_cells` runs all side by side (one vmap), so its cell axis can be split."""
  return vmap_cells is None or vmap_cells >= num_cells


def _shrinks(setup: GroupSetup) -> bool:
  """Whether finished cells leave the stack (vmapped cells) or are skipped in place (one at a time)."""
  return setup.vmap_cells != 1


def train_group(spec: GroupSpec, setup: GroupSetup, *,
                checkpointer: checkpoint_lib.Checkpointer | None = None,
                on_cell_done: Callable[[CellResult], None] | None = None,
                on_step: Callable[[int, int], None] | None = None) -> list[CellResult]:
  """Trains the group's cells together, each to its budget, and scores each on the test split.

  Args:
    spec: the cells and their budgets.
    setup: model functions, data, batch sizes, validation cadence.
    checkpointer: saves the group every `every_steps` steps; a checkpoint it
      holds is resumed from. None: no checkpoints.
    on_cell_done: called with each cell's result as soon as the cell leaves
      the stack (before any later checkpoint), e.g. to record it on disk.
    on_step: called after every step with (step, cells still training).

  Returns:
    One result per cell of the group that trained in this call, in the
    group's order (cells finished before a resumed checkpoint are not
    repeated: `on_cell_done` had them).
  """
  step, stack, seconds = 0, None, {}
  if checkpointer is not None and checkpointer.all_steps():
    step, stack, seconds = _restore(spec, setup, checkpointer)
  if stack is None:
    stack = _init_stack(spec, setup)
  stack, setup = _place(stack, setup)
  alive = spec.alive_at(step)  # the cells still training
  members = list(alive)  # the cells in the stack, in its order (finished ones too, when kept)
  seconds = {i: seconds.get(spec.cells[i].name, 0.0) for i in range(len(spec.cells))}
  results: dict[int, CellResult] = {}
  train_step = _group_step(setup.fns, setup.vmap_cells)
  score = _group_score(setup.fns, setup.vmap_cells)
  budgets_C = setup.fns.budget(np.asarray([spec.budgets[i] for i in members], np.int32))
  while alive:
    start = time.perf_counter()
    segment_end = _segment_end(spec, setup, alive, step, checkpointer)
    indices_SCB = _batch_indices(spec, setup, members, alive, step, segment_end)
    training_C = np.asarray([i in alive for i in members])
    for indices_CB in indices_SCB:
      stack = train_step(stack, setup.data.train, indices_CB, budgets_C, training_C)
      step += 1
      if on_step is not None:
        on_step(step, len(alive))
    due = [i in alive and (_selection_due(setup, step) or spec.budgets[i] == step) for i in members]
    if any(due):
      stack = _select(stack, setup, score, np.asarray(due))
    finished = [p for p, i in enumerate(members) if i in alive and spec.budgets[i] == step]
    tests = _score_split(setup, score, stack.best_params, setup.data.test) if finished else None
    jax.block_until_ready(stack)
    # The segment's wall time (compile included), shared equally by the cells it trained.
    for i in alive:
      seconds[i] += (time.perf_counter() - start) / len(alive)
    per_cell = _per_cell(stack) if finished else None
    for p in finished:
      results[members[p]] = _cell_result(spec, setup, members[p], per_cell, tests, p,
                                         seconds[members[p]])
      if on_cell_done is not None:
        on_cell_done(results[members[p]])
    if finished:
      alive = [i for i in alive if spec.budgets[i] > step]
      if _shrinks(setup) and alive:
        stack, setup = _place(stack.take([members.index(i) for i in alive]), setup)
        members = list(alive)
        budgets_C = setup.fns.budget(np.asarray([spec.budgets[i] for i in alive], np.int32))
    if checkpointer is not None and alive and checkpointer.should_save(step):
      # Only the cells still training: the saved stack is a function of the step.
      saved = stack if members == alive else stack.take([members.index(i) for i in alive])
      checkpointer.save(step, saved.tree(), {"step": step, "cells": [spec.cells[i].name for i in alive],
                                             "seconds": {spec.cells[i].name: seconds[i] for i in alive}})
  if checkpointer is not None:
    checkpointer.wait()
  return [results[i] for i in sorted(results)]


def cell_mesh(num_cells: int, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh ("cells", "copies") a stack of `num_cells` side by side is split over.

  The cell axis is split `c` ways, c the largest divisor of `num_cells` that
  the devices allow, so every device holds as many cells: 18 cells on 8
  devices of one process use 6, and as cells finish the stack moves onto a
  split that divides what is left. Every process of `devices` (default:
  all) takes part with as many devices, in process order, so that each holds
  a share of every group it runs the programs of: the split uses
  lcm(c, processes) devices, and where that is more than c the cells are
  repeated along "copies" (1 cell on 2 processes: a copy on each). One
  process: "copies" is 1.
  A group whose cells are a multiple of the device count keeps every device busy.
  """
  devices = list(jax.devices() if devices is None else devices)
  by_process: dict[int, list[jax.Device]] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  processes, per_process = len(by_process), min(len(ds) for ds in by_process.values())
  cells = max(c for c in range(1, num_cells + 1)
              if num_cells % c == 0 and math.lcm(c, processes) <= processes * per_process)
  used = math.lcm(cells, processes) // processes  # devices of each process
  grid = [d for _, ds in sorted(by_process.items()) for d in ds[:used]]
  return jax.sharding.Mesh(np.asarray(grid).reshape(cells, -1), ("cells", "copies"))


def _stack_sharding(num_cells: int, setup: GroupSetup) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(cell_mesh(num_cells, setup.devices),
                                    jax.sharding.PartitionSpec("cells"))


def _place(stack: _Stack, setup: GroupSetup) -> tuple[_Stack, GroupSetup]:
  """A stack side by side split over `cell_mesh`, with `setup`'s data replicated on it.

  Cells one at a time or in chunks (`lax.map` steps through the cell axis)
  stay where they are.
  """
  if not side_by_side(setup.vmap_cells, len(stack.applied)):
    return stack, setup
  sharding = _stack_sharding(len(stack.applied), setup)
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  splits = {f.name: getattr(setup.data, f.name) for f in dataclasses.fields(StudyData)}
  data = StudyData(**_put(splits, replicated))
  return _put(stack, sharding), dataclasses.replace(setup, data=data)


def _put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`tree`'s arrays on `sharding`, which may span several processes.

  jax.device_put moves arrays within one process; across processes each one
  builds its own shards from the whole value (`_host_value`, the same on
  every process) with `jax.make_array_from_callback`.
  """
  def put(x):
    if x.sharding == sharding:
      return x
    if sharding.is_fully_addressable and x.is_fully_addressable:
      return jax.device_put(x, sharding)
    value = _host_value(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put, tree)


def _host_value(x: jax.Array) -> np.ndarray:
  """The whole of `x` in this process's memory.

  An array split across processes is gathered from all of them: a collective
  that every process calls at the same point (they run the same code).
  """
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _per_cell(stack: _Stack) -> dict[str, np.ndarray]:
  """The stack's per-cell scalars ([C] each) in this process's memory, for the results."""
  return {name: _host_value(getattr(stack, name))
          for name in ("best_error", "best_loss", "best_step", "applied", "last_loss")}


def _init_stack(spec: GroupSpec, setup: GroupSetup) -> _Stack:
  # One compiled init called per seed, then stacked: vmapping init compiles
  # the model's construction under vmap, measured 5.2 s against 2.9 s for
  # the quick digits model (more than the vmapped train step's 5 s).
  init = _jit_init(setup.fns)
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *[init(c.seed) for c in spec.cells])
  num = len(spec.cells)
  # A copy: the stack is donated to each step, and one buffer must not be donated twice.
  return _Stack(state=state, best_params=_copy(state.params),
                best_error=jnp.full((num,), jnp.inf, jnp.float32),
                best_loss=jnp.full((num,), jnp.inf, jnp.float32),
                best_step=jnp.zeros((num,), jnp.int32), applied=jnp.zeros((num,), jnp.int32),
                alive=jnp.ones((num,), bool), last_loss=jnp.full((num,), jnp.nan, jnp.float32))


def _restore(spec: GroupSpec, setup: GroupSetup,
             checkpointer: checkpoint_lib.Checkpointer) -> tuple[int, _Stack, dict[str, float]]:
  """The group's latest checkpoint that restores: its step, its stack and the cells' wall times.

  The stack at a step holds the cells whose budget is larger, so each saved
  step has its own shapes: a damaged latest step falls back to the one
  before it with that step's shapes.
  """
  full = jax.eval_shape(lambda: _init_stack(spec, setup).tree())
  damaged = []
  for step in reversed(checkpointer.all_steps()):
    alive = spec.alive_at(step)
    abstract = jax.tree.map(lambda x, n=len(alive): jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype),
                            full)
    # Straight onto the devices the stack trains on: a stack split across processes is
    # never whole in one of them.
    shardings = (jax.tree.map(lambda _, s=_stack_sharding(len(alive), setup): s, abstract)
                 if side_by_side(setup.vmap_cells, len(alive)) else None)
    abstract = checkpoint_lib.with_shardings(abstract, shardings)
    try:
      tree, data_state, step = checkpointer.restore(abstract, step)
    except checkpoint_lib.CheckpointDamagedError as e:
      damaged.append(e)
      continue
    names = [spec.cells[i].name for i in alive]
    if data_state.get("cells") != names:
      raise checkpoint_lib.CheckpointError(
          f"The checkpoint at step {step} holds cells {data_state.get('cells')}, but this group "
          f"trains {names} at that step: it was written by another study plan. Delete "
          f"{checkpointer.step_dir(step)} (or use a new workdir).")
    return step, _Stack(**tree), dict(data_state.get("seconds", {}))
  raise damaged[-1]


def _segment_end(spec: GroupSpec, setup: GroupSetup, alive: Sequence[int], step: int,
                 checkpointer: checkpoint_lib.Checkpointer | None) -> int:
  """The next step at which something besides training happens (select, finish, save)."""
  ends = [min(spec.budgets[i] for i in alive)]
  for every in (setup.eval_every_steps, checkpointer.every_steps if checkpointer else None):
    if every:
      ends.append((step // every + 1) * every)
  return min(ends)


def _selection_due(setup: GroupSetup, step: int) -> bool:
  return bool(setup.eval_every_steps) and step % setup.eval_every_steps == 0


def _batch_indices(spec: GroupSpec, setup: GroupSetup, members: Sequence[int],
                   alive: Sequence[int], start: int, stop: int) -> np.ndarray:
  """[steps, cells, batch] example indices of steps start..stop-1, each cell in its own order.

  A finished cell kept in the stack gets index 0 (it skips the step).
  """
  idle = np.zeros((stop - start, setup.batch_size), np.int32)
  per_cell = [data_lib.epoch_batches(spec.cells[i].n, setup.batch_size, spec.cells[i].seed,
                                     start, stop) if i in alive else idle for i in members]
  return np.stack(per_cell, axis=1)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _select(stack: _Stack, setup: GroupSetup, score, due_C: np.ndarray) -> _Stack:
  """Keeps each due cell's parameters if they beat its best on the validation split.

  `due_C` marks the cells for which `step` is a selection point (a multiple
  of eval_every_steps, or their last step): another cell's last step must not
  add a selection point to a cell, or its result would depend on its group.
  """
  if setup.data.validation is None:
    # No validation split: the last parameters are the selected ones.
    return stack.replace(best_params=_copy(stack.state.params), best_step=stack.applied)
  val = _score_split(setup, score, stack.state.params, setup.data.validation)
  return _keep_better(stack, 1.0 - np.asarray(val["accuracy"], np.float32),
                      np.asarray(val["loss"], np.float32), due_C)


@jax.jit
def _keep_better(stack: _Stack, error_C, loss_C, due_C) -> _Stack:
  """`_select`'s update, one program: host values enter it as they do the train step."""
  # A diverged cell's state is its last finite one, already scored: no update.
  better = due_C & ((error_C < stack.best_error) |
                    ((error_C == stack.best_error) & (loss_C < stack.best_loss)))
  pick = lambda new, old: jax.vmap(jnp.where)(better, new, old)  # noqa: E731
  return stack.replace(
      best_params=jax.tree.map(pick, stack.state.params, stack.best_params),
      best_error=jnp.where(better, error_C, stack.best_error),
      best_loss=jnp.where(better, loss_C, stack.best_loss),
      best_step=jnp.where(better, stack.applied, stack.best_step))


def _score_split(setup: GroupSetup, score, params_C, split: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """Loss and accuracy ([C] each) of every cell's parameters on a padded split in memory."""
  batch = setup.eval_batch_size
  size = split["weights"].shape[0]
  totals = None
  for start in range(0, size, batch):
    sums = score(params_C, {k: v[start:start + batch] for k, v in split.items()})
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(_host_value, totals)
  per_cell = [metrics_lib.means({k: v[c] for k, v in totals.items()})
              for c in range(totals["weight_sum"].shape[0])]
  return {k: np.asarray([m[k] for m in per_cell]) for k in ("loss", "accuracy")}


def _cell_result(spec: GroupSpec, setup: GroupSetup, i: int, per_cell: dict[str, np.ndarray],
                 tests: dict[str, np.ndarray], p: int, seconds: float) -> CellResult:
  cell, budget = spec.cells[i], spec.budgets[i]
  applied = int(per_cell["applied"][p])
  diverged = applied < budget
  has_val = setup.data.validation is not None
  return CellResult(
      kind=cell.kind, n=cell.n, seed=cell.seed,
      # A diverged cell failed: NaN metrics are counted by the analysis, never averaged.
      test_error=float("nan") if diverged else float(1.0 - tests["accuracy"][p]),
      test_loss=float("nan") if diverged else float(tests["loss"][p]),
      val_error=float(per_cell["best_error"][p]) if has_val and not diverged else None,
      val_loss=float(per_cell["best_loss"][p]) if has_val and not diverged else None,
      best_step=int(per_cell["best_step"][p]), steps=budget,
      wall_seconds=round(seconds, 3), budget=spec.budget_rule,
      diverged_at=applied + 1 if diverged else None,
      train_loss=float(per_cell["last_loss"][p]) if applied else None)


@functools.lru_cache(maxsize=8)
def _jit_init(fns: model_fns.ModelFns):
  return jax.jit(fns.init)


def _over_cells(fn, in_axes, vmap_cells: int | None):
  """`fn` mapped over the stacked cell axis: vmapped, vmapped in chunks, or one cell at a time.

  One at a time (`vmap_cells=1`) is a plain `lax.map`, not chunks of one
  (which would vmap each cell's program over an axis of one); chunks as large
  as the stack are one vmap, as None (and split like it: `_place`).
  """
  if vmap_cells is None:
    return jax.vmap(fn, in_axes=in_axes)

  def chunked(*args):
    mapped = [a for a, axis in zip(args, in_axes) if axis == 0]
    if side_by_side(vmap_cells, jax.tree.leaves(mapped)[0].shape[0]):
      return jax.vmap(fn, in_axes=in_axes)(*args)
    shared = [a for a, axis in zip(args, in_axes) if axis is None]

    def one(xs):
      it_x, it_s = iter(xs), iter(shared)
      return fn(*[next(it_x) if axis == 0 else next(it_s) for axis in in_axes])

    return jax.lax.map(one, mapped, batch_size=None if vmap_cells == 1 else vmap_cells)

  return chunked


@functools.lru_cache(maxsize=16)
def _group_step(fns: model_fns.ModelFns, vmap_cells: int | None = None):
  """One step of every cell in the stack: batches gathered on the device, each cell its schedule.

  Memoised per (`fns`, vmap_cells), so groups of the same model and optimizer
  reuse one compiled executable per stack size.
  """

  def train_cell(state, pool, indices_B, budget, alive, applied, last_loss):
    batch = {k: v[indices_B] for k, v in pool.items()}
    new_state, step_metrics = fns.train_step(state, batch, budget)
    # A cell whose update is non-finite stays frozen at its last finite state
    # from then on: its parameters still evaluate, and NaN never reaches its
    # optimizer state.
    ok = alive & step_metrics["finite"]
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    return state, ok, applied + ok, jnp.where(ok, step_metrics["loss"], last_loss)

  if vmap_cells == 1:
    return _one_cell_at_a_time(train_cell)
  over_cells = _over_cells(train_cell, (0, None, 0, 0, 0, 0, 0), vmap_cells)

  def step(stack: _Stack, pool, indices_CB, budgets_C, training_C) -> _Stack:
    del training_C  # a vmapped stack holds only cells still training
    state, alive, applied, last_loss = over_cells(
        stack.state, pool, indices_CB, budgets_C, stack.alive, stack.applied, stack.last_loss)
    return stack.replace(state=state, alive=alive, applied=applied, last_loss=last_loss)

  return jax.jit(step, donate_argnums=0)


def _one_cell_at_a_time(train_cell):
  """The group's step as one dispatch per training cell of a program that updates cell i in place.

  On CPU this ran faster than the same cells inside one program (`lax.map`:
  505 s against 304 s for the digits study's sigmoid cells, benchmarks/sweep.py),
  it compiles once whatever the stack's size, and a finished cell costs nothing.
  """

  def update_cell(stack: _Stack, pool, i, indices_B, budget) -> _Stack:
    fields = (stack.state, stack.alive, stack.applied, stack.last_loss)
    new = train_cell(jax.tree.map(lambda x: x[i], fields[0]), pool, indices_B, budget,
                     *(x[i] for x in fields[1:]))
    state, alive, applied, last_loss = jax.tree.map(lambda x, y: x.at[i].set(y), fields, new)
    return stack.replace(state=state, alive=alive, applied=applied, last_loss=last_loss)

  update = jax.jit(update_cell, donate_argnums=0)

  def step(stack: _Stack, pool, indices_CB, budgets_C, training_C) -> _Stack:
    for i in np.flatnonzero(training_C):
      stack = update(stack, pool, np.int32(i), indices_CB[i], budgets_C.at(i))
    return stack

  return step


@functools.lru_cache(maxsize=16)
def _group_score(fns: model_fns.ModelFns, vmap_cells: int | None = None):
  """`fns.eval_step` of stacked parameters on one (shared) batch."""
  return jax.jit(_over_cells(fns.eval_step, (0, None), vmap_cells))
