"""The training loop of a group of study cells: one jitted, vmapped program for all of them.

A cell is one (attention kind, training-set size n, seed) run of a study's base
experiment. The cells of a group share one model config (the kind is a static
choice, so a group holds one kind), optimizer and batch size, and may have
different budgets in steps (a fixed-epochs budget gives a larger n more steps):

  * Their train states are stacked on a leading cell axis, and one
    `jax.jit(jax.vmap(train_step))` advances all of them by one step. Each
    cell's batch is gathered on the device from the study's training pool
    (`groups.StudyData`) by its own example indices, so every cell keeps its own
    subset (the first n of the pool) and its own training order
    (`data.epoch_batches(n, batch, seed, ...)`), and no batch crosses from
    the host per step.
  * Each cell follows its own learning-rate schedule (its budget is a traced
    input of `train_step`), and finished cells stop costing work. With cells
    computed one at a time (`vmap_cells=1`, CPU's default) a step is one
    dispatch per training cell of a program that updates that cell of the
    stack in place, so a finished cell is skipped, the stack keeps its size
    and the program compiles once; with cells side by side under vmap the
    stack shrinks to the next power of two of the cells still training
    (`stack_size`), finished cells padding it masked: a group compiles its
    step a few times (log2 of its size), not once per finishing cell.
  * Many devices: with the whole stack side by side (`vmap_cells=None`, the
    accelerators' default, or at least the stack's size) the cell axis is
    split over the devices (`stack.cell_mesh`): cells are independent, so each
    device trains its own cells and nothing crosses between them; the data is
    replicated beside them. Several processes (jax.distributed) split it over
    every process's devices: each builds the same stack and data (a study's
    are small and deterministic) and places its own shards (`stack.place`).
  * Model selection: every `eval_every_steps` steps and at its last step each
    cell is scored on the validation split; its best parameters (lowest
    validation error, ties to the lower loss, then the earlier step) are
    kept and scored once on the test split when it leaves the stack (`scoring`).
    Each selection point adds to the cell's learning curve its validation
    error and loss, the training loss of that step, and the largest training
    loss since the previous point (a spike between points is not lost).
  * A cell whose update turns non-finite (a NaN loss or parameter) is frozen
    at its last finite state and reported as diverged (failed) at that step;
    the others train on.
  * With a `checkpoint.Checkpointer`, the whole group's state is saved every
    `checkpointer.every_steps` steps and a rerun resumes from it. The stack at
    a step is a function of that step (cells with a larger budget), so a
    checkpoint needs no other bookkeeping (finished cells kept in the stack
    are left out of it).

  results = cells.train_group(spec, setup)      # one CellResult per cell

This module is the loop; `groups` states the cells, groups and their data,
`stack` the stacked per-cell arrays and where they live, `scoring` the
selection, test scores and records.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import checkpoint as checkpoint_lib
from attnlab import data as data_lib
from attnlab import model_fns
from attnlab.studies import groups as groups_lib
from attnlab.studies import scoring
from attnlab.studies import stack as stack_lib
from attnlab.studies.results import CellResult


def _shrinks(setup: groups_lib.GroupSetup) -> bool:
  """Whether finished cells leave the stack (vmapped cells) or are skipped in place (one at a time)."""
  return setup.vmap_cells != 1


def stack_size(num_training: int, num_cells: int) -> int:
  """How many cells a vmapped stack holds while `num_training` of the group's `num_cells` train.

  The next power of two (at most the group): a group compiles its step for at most
  log2(C) + 1 stack sizes instead of one per finishing cell (each compile costs seconds
  on an accelerator, where the masked cells' extra work is nearly free). It depends
  only on how many cells train, so a resumed group steps with the same shapes as an
  uninterrupted one.
  """
  return min(num_cells, 1 << max(0, num_training - 1).bit_length())


def _stack_members(members: Sequence[int], alive: Sequence[int], num_cells: int) -> list[int]:
  """The cells a vmapped stack keeps: those training and, to pad it to `stack_size`, finished
  ones (masked: they take no step), in the stack's order."""
  padding = stack_size(len(alive), num_cells) - len(alive)
  finished = [i for i in members if i not in alive][:padding]
  return [i for i in members if i in alive or i in finished]


def train_group(spec: groups_lib.GroupSpec, setup: groups_lib.GroupSetup, *,
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
  step, stack, seconds, curves = 0, None, {}, {}
  if checkpointer is not None and checkpointer.all_steps():
    step, stack, seconds, curves = _restore(spec, setup, checkpointer)
  if stack is None:
    stack = stack_lib.init_stack(spec, setup)
  alive = spec.alive_at(step)  # the cells still training
  members = list(alive)  # the cells in the stack, in its order (finished ones too, when kept)
  padded = _stack_members(alive + [i for i in range(len(spec.cells)) if i not in alive],
                          alive, len(spec.cells))
  if _shrinks(setup) and len(padded) > len(alive):
    # Resumed: the checkpoint holds the training cells only; pad the stack as the
    # uninterrupted run had it, with copies of a training cell standing in for finished
    # ones (masked, never read).
    stack = stack.take(list(range(len(alive))) + [0] * (len(padded) - len(alive)))
    members = padded
  stack, setup = stack_lib.place(stack, setup)
  seconds = {i: seconds.get(spec.cells[i].name, 0.0) for i in range(len(spec.cells))}
  curves = {i: _curve_so_far(curves, spec.cells[i].name) for i in range(len(spec.cells))}
  results: dict[int, CellResult] = {}
  train_step = _group_step(setup.fns, setup.vmap_cells)
  score = scoring.group_score(setup.fns, setup.vmap_cells)
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
    due_C = np.asarray([i in alive and (_selection_due(setup, step) or spec.budgets[i] == step)
                        for i in members])
    if due_C.any():
      stack, val = scoring.select(stack, setup, score, due_C)
      losses_C = {name: stack_lib.host_value(getattr(stack, name))
                  for name in ("last_loss", "interval_loss_max")}
      for p, point in scoring.curve_points(step, due_C, val, **losses_C).items():
        if curves[members[p]] is not None:
          curves[members[p]].append(point)
      stack = scoring.start_loss_intervals(stack, due_C)
    finished = [p for p, i in enumerate(members) if i in alive and spec.budgets[i] == step]
    tests = (scoring.score_split(setup, score, stack.best_params, setup.data.test) if finished
             else None)
    jax.block_until_ready(stack)
    # The segment's wall time (compile included), shared equally by the cells it trained.
    for i in alive:
      seconds[i] += (time.perf_counter() - start) / len(alive)
    per_cell = stack_lib.per_cell(stack) if finished else None
    for p in finished:
      results[members[p]] = scoring.cell_result(spec, setup, members[p], per_cell, tests, p,
                                                seconds[members[p]], curves[members[p]])
      if on_cell_done is not None:
        on_cell_done(results[members[p]])
    if finished:
      alive = [i for i in alive if spec.budgets[i] > step]
      keep = _stack_members(members, alive, len(spec.cells))
      if _shrinks(setup) and alive and keep != members:
        stack, setup = stack_lib.place(stack.take([members.index(i) for i in keep]), setup)
        members = keep
        budgets_C = setup.fns.budget(np.asarray([spec.budgets[i] for i in members], np.int32))
    if checkpointer is not None and alive and checkpointer.should_save(step):
      # Only the cells still training: the saved stack is a function of the step.
      saved = stack if members == alive else stack.take([members.index(i) for i in alive])
      checkpointer.save(step, saved.tree(), {"step": step, "cells": [spec.cells[i].name for i in alive],
                                             "seconds": {spec.cells[i].name: seconds[i] for i in alive},
                                             "curves": {spec.cells[i].name: curves[i] for i in alive}})
  if checkpointer is not None:
    checkpointer.wait()
  return [results[i] for i in sorted(results)]


def _curve_so_far(curves: dict[str, list | None] | None, name: str) -> list | None:
  """A cell's learning curve up to the resumed step ([] when not resumed).

  A checkpoint written before curves were recorded lacks their start: such a cell
  records None rather than a curve that starts at the resumed step.
  """
  curve = None if curves is None else curves.get(name, [])
  return None if curve is None else list(curve)


def _restore(spec: groups_lib.GroupSpec, setup: groups_lib.GroupSetup,
             checkpointer: checkpoint_lib.Checkpointer
             ) -> tuple[int, stack_lib.Stack, dict[str, float], dict[str, list] | None]:
  """The group's latest checkpoint that restores: its step, its stack, and the cells' wall
  times and learning curves so far by name (None: a checkpoint from before curves).

  The stack at a step holds the cells whose budget is larger, so each saved
  step has its own shapes: a damaged latest step falls back to the one
  before it with that step's shapes.
  """
  full = jax.eval_shape(lambda: stack_lib.init_stack(spec, setup).tree())
  damaged = []
  for step in reversed(checkpointer.all_steps()):
    alive = spec.alive_at(step)
    abstract = jax.tree.map(lambda x, n=len(alive): jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype),
                            full)
    # Straight onto the devices the stack trains on: a stack split across processes is
    # never whole in one of them.
    shardings = (jax.tree.map(lambda _, s=stack_lib.stack_sharding(len(alive), setup): s, abstract)
                 if groups_lib.side_by_side(setup.vmap_cells, len(alive)) else None)
    abstract = checkpoint_lib.with_shardings(abstract, shardings)
    try:
      tree, data_state, step = _restore_step(checkpointer, abstract, step)
    except checkpoint_lib.CheckpointDamagedError as e:
      damaged.append(e)
      continue
    names = [spec.cells[i].name for i in alive]
    if data_state.get("cells") != names:
      raise checkpoint_lib.CheckpointError(
          f"The checkpoint at step {step} holds cells {data_state.get('cells')}, but this group "
          f"trains {names} at that step: it was written by another study plan. Delete "
          f"{checkpointer.step_dir(step)} (or use a new workdir).")
    return (step, stack_lib.Stack(**tree), dict(data_state.get("seconds", {})),
            data_state.get("curves"))
  raise damaged[-1]


def _restore_step(checkpointer: checkpoint_lib.Checkpointer, abstract: dict[str, Any],
                  step: int) -> tuple[dict[str, Any], dict[str, Any], int]:
  """`checkpointer.restore` of a stack, or of one saved before `interval_loss_max` existed.

  Such a checkpoint's maxima are unknown: NaN, which the next selection point
  records as None and then starts afresh.
  """
  try:
    return checkpointer.restore(abstract, step)
  except checkpoint_lib.CheckpointDamagedError:
    raise
  except Exception as error:  # pylint: disable=broad-exception-caught
    older = {k: v for k, v in abstract.items() if k != "interval_loss_max"}
    try:
      tree, data_state, step = checkpointer.restore(older, step)
    except Exception:  # pylint: disable=broad-exception-caught
      raise error from None  # not the older layout either: the first error says why
  missing = abstract["interval_loss_max"]
  nan = jnp.full(missing.shape, jnp.nan, missing.dtype)
  sharding = getattr(missing, "sharding", None)
  tree["interval_loss_max"] = nan if sharding is None else stack_lib.put(nan, sharding)
  return tree, data_state, step


def _segment_end(spec: groups_lib.GroupSpec, setup: groups_lib.GroupSetup, alive: Sequence[int],
                 step: int, checkpointer: checkpoint_lib.Checkpointer | None) -> int:
  """The next step at which something besides training happens (select, finish, save)."""
  ends = [min(spec.budgets[i] for i in alive)]
  for every in (setup.eval_every_steps, checkpointer.every_steps if checkpointer else None):
    if every:
      ends.append((step // every + 1) * every)
  return min(ends)


def _selection_due(setup: groups_lib.GroupSetup, step: int) -> bool:
  return bool(setup.eval_every_steps) and step % setup.eval_every_steps == 0


def _batch_indices(spec: groups_lib.GroupSpec, setup: groups_lib.GroupSetup, members: Sequence[int],
                   alive: Sequence[int], start: int, stop: int) -> np.ndarray:
  """[steps, cells, batch] example indices of steps start..stop-1, each cell in its own order.

  A finished cell kept in the stack gets index 0 (it skips the step).
  """
  idle = np.zeros((stop - start, setup.batch_size), np.int32)
  per_cell = [data_lib.epoch_batches(spec.cells[i].n, setup.batch_size, spec.cells[i].seed,
                                     start, stop) if i in alive else idle for i in members]
  return np.stack(per_cell, axis=1)


# The stack's fields a training step updates, in `train_cell`'s order.
_PER_STEP_FIELDS = ("state", "alive", "applied", "last_loss", "interval_loss_max")


@functools.lru_cache(maxsize=16)
def _group_step(fns: model_fns.ModelFns, vmap_cells: int | None = None):
  """One step of every cell in the stack: batches gathered on the device, each cell its schedule.

  Memoised per (`fns`, vmap_cells), so groups of the same model and optimizer
  reuse one compiled executable per stack size (`stack_size`: a few per group).
  """

  def train_cell(state, pool, indices_B, budget, alive, applied, last_loss, loss_max,
                 training=True):
    batch = {k: v[indices_B] for k, v in pool.items()}
    new_state, step_metrics = fns.train_step(state, batch, budget)
    # A cell whose update is non-finite stays frozen at its last finite state
    # from then on: its parameters still evaluate, and NaN never reaches its
    # optimizer state. A finished cell padding a vmapped stack (`training` False)
    # takes no step either.
    ok = alive & training & step_metrics["finite"]
    state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    loss = step_metrics["loss"]
    # jnp.maximum keeps a NaN (an interval whose start is unknown) until the interval ends.
    return (state, jnp.where(training, ok, alive), applied + ok, jnp.where(ok, loss, last_loss),
            jnp.where(ok, jnp.maximum(loss_max, loss), loss_max))

  if vmap_cells == 1:
    return _one_cell_at_a_time(train_cell)
  over_cells = stack_lib.over_cells(train_cell, (0, None, 0, 0, 0, 0, 0, 0, 0), vmap_cells)

  def step(stack: stack_lib.Stack, pool, indices_CB, budgets_C, training_C) -> stack_lib.Stack:
    updated = over_cells(stack.state, pool, indices_CB, budgets_C,
                         *(getattr(stack, name) for name in _PER_STEP_FIELDS[1:]), training_C)
    return stack.replace(**dict(zip(_PER_STEP_FIELDS, updated)))

  return jax.jit(step, donate_argnums=0)


def _one_cell_at_a_time(train_cell):
  """The group's step as one dispatch per training cell of a program that updates cell i in place.

  On CPU this ran faster than the same cells inside one program (`lax.map`:
  505 s against 304 s for the digits study's sigmoid cells, benchmarks/sweep.py),
  it compiles once whatever the stack's size, and a finished cell costs nothing.
  """

  def update_cell(stack: stack_lib.Stack, pool, i, indices_B, budget) -> stack_lib.Stack:
    fields = tuple(getattr(stack, name) for name in _PER_STEP_FIELDS)
    new = train_cell(jax.tree.map(lambda x: x[i], fields[0]), pool, indices_B, budget,
                     *(x[i] for x in fields[1:]))
    return stack.replace(**dict(zip(_PER_STEP_FIELDS,
                                    jax.tree.map(lambda x, y: x.at[i].set(y), fields, new))))

  update = jax.jit(update_cell, donate_argnums=0)

  def step(stack: stack_lib.Stack, pool, indices_CB, budgets_C, training_C) -> stack_lib.Stack:
    for i in np.flatnonzero(training_C):
      stack = update(stack, pool, np.int32(i), indices_CB[i], budgets_C.at(i))
    return stack

  return step
