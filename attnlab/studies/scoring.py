"""Scoring a group's cells: selection on the validation split, the test score, the records.

Every `eval_every_steps` steps and at its last step each cell is scored on the
validation split (`select`); its best parameters (lowest validation error,
ties to the lower loss, then the earlier step) are kept and scored once on the
test split when it leaves the stack (`score_split`), and its record is made
(`cell_result`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import metrics as metrics_lib
from attnlab import model_fns
from attnlab.studies import groups as groups_lib
from attnlab.studies import stack as stack_lib
from attnlab.studies.results import CellResult


def select(stack: stack_lib.Stack, setup: groups_lib.GroupSetup, score,
           due_C: np.ndarray) -> tuple[stack_lib.Stack, dict[str, np.ndarray] | None]:
  """Keeps each due cell's parameters if they beat its best on the validation split.

  `due_C` marks the cells for which `step` is a selection point (a multiple
  of eval_every_steps, or their last step): another cell's last step must not
  add a selection point to a cell, or its result would depend on its group.

  Returns:
    The stack, and every cell's validation {"error", "loss"} ([C] each) at this step
    (None without a validation split), for the learning curves.
  """
  if setup.data.validation is None:
    # No validation split: the last parameters are the selected ones.
    return stack.replace(best_params=stack_lib.copy_tree(stack.state.params),
                         best_step=stack.applied), None
  val = score_split(setup, score, stack.state.params, setup.data.validation)
  scores = {"error": 1.0 - np.asarray(val["accuracy"], np.float32),
            "loss": np.asarray(val["loss"], np.float32)}
  return _keep_better(stack, scores["error"], scores["loss"], due_C), scores


def curve_points(step: int, due_C: np.ndarray, val: dict[str, np.ndarray] | None,
                 last_loss: np.ndarray, interval_loss_max: np.ndarray
                 ) -> dict[int, list[float | None]]:
  """Each due cell's learning-curve point at `step`, by its place in the stack:
  [step, val_error, val_loss, train_loss, train_loss_max] (`CellResult.curve`)."""
  def value(x):
    return float(x) if np.isfinite(x) else None
  return {p: [step, value(val["error"][p]) if val else None, value(val["loss"][p]) if val else None,
              value(last_loss[p]), value(interval_loss_max[p])]
          for p in np.flatnonzero(due_C)}


@jax.jit
def start_loss_intervals(stack: stack_lib.Stack, due_C) -> stack_lib.Stack:
  """The due cells' training-loss maxima start again (their curves just recorded them)."""
  return stack.replace(interval_loss_max=jnp.where(due_C, -jnp.inf, stack.interval_loss_max))


@jax.jit
def _keep_better(stack: stack_lib.Stack, error_C, loss_C, due_C) -> stack_lib.Stack:
  """`select`'s update, one program: host values enter it as they do the train step."""
  # A diverged cell's state is its last finite one, already scored: no update.
  better = due_C & ((error_C < stack.best_error) |
                    ((error_C == stack.best_error) & (loss_C < stack.best_loss)))
  pick = lambda new, old: jax.vmap(jnp.where)(better, new, old)  # noqa: E731
  return stack.replace(
      best_params=jax.tree.map(pick, stack.state.params, stack.best_params),
      best_error=jnp.where(better, error_C, stack.best_error),
      best_loss=jnp.where(better, loss_C, stack.best_loss),
      best_step=jnp.where(better, stack.applied, stack.best_step))


def score_split(setup: groups_lib.GroupSetup, score, params_C,
                split: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """Loss and accuracy ([C] each) of every cell's parameters on a padded split in memory."""
  batch = setup.eval_batch_size
  size = split["weights"].shape[0]
  totals = None
  for start in range(0, size, batch):
    sums = score(params_C, {k: v[start:start + batch] for k, v in split.items()})
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(stack_lib.host_value, totals)
  per_cell = [metrics_lib.means({k: v[c] for k, v in totals.items()})
              for c in range(totals["weight_sum"].shape[0])]
  return {k: np.asarray([m[k] for m in per_cell]) for k in ("loss", "accuracy")}


def cell_result(spec: groups_lib.GroupSpec, setup: groups_lib.GroupSetup, i: int,
                per_cell: dict[str, np.ndarray], tests: dict[str, np.ndarray], p: int, seconds: float,
                curve: list[list[float | None]] | None = None) -> CellResult:
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
      train_loss=float(per_cell["last_loss"][p]) if applied else None,
      curve=curve)


@functools.lru_cache(maxsize=16)
def group_score(fns: model_fns.ModelFns, vmap_cells: int | None = None):
  """`fns.eval_step` of stacked parameters on one (shared) batch."""
  return jax.jit(stack_lib.over_cells(fns.eval_step, (0, None), vmap_cells))
