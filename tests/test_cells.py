"""Tests of attnlab.studies.cells: a group of cells trained together under vmap.

Two references: each cell trained as a group of one (the same engine: checks
that batching the cells changes nothing), and the plainest loop over the
pure `fns.train_step`, `data.epoch_batches` and `fns.eval_step` with model
selection written out by hand (checks the engine itself: stacking, gathering,
per-cell schedules, selection and scoring).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import metrics as metrics_lib
from attnlab.studies import cells as cells_lib
from attnlab.studies import groups as groups_lib
from attnlab.studies import study as study_lib
from attnlab.studies.groups import Cell

# Compile time dominates these tests; both sides of every comparison run the
# same unoptimised programs, so the comparisons are as strict as with XLA's passes.
pytestmark = pytest.mark.usefixtures("fast_xla_compile")

# vmap batches the cells' matmuls and reductions, which may round float32
# differently from the single-cell program; tests/test_train.py measured that
# 256 ulp of noise per step moves the quick run's loss by < 5e-7 over 8 steps,
# while a 1% learning-rate change moves it by 5e-4. 1e-5 sits between the two.
LOSS_TOLERANCE = 1e-5

# The quick digits study: sizes 32 and 64, batch 16, 2 epochs with a 6-step
# floor: 6 steps at n=32 and 8 at n=64 (two budgets in one group), selection
# every 3 steps and at each cell's last step.
CELLS = (Cell("sigmoid", 32, 0), Cell("sigmoid", 64, 1), Cell("sigmoid", 32, 1),
         Cell("sigmoid", 64, 0))
BUDGETS = (6, 8, 6, 8)
QUICK_STUDY = "configs/sample_efficiency/digits.py:quick"


@pytest.fixture(scope="module")
def setup():
  study, exp_cfg = study_lib.split_config(configlib.load(QUICK_STUDY))
  setups = study_lib.prepare(study, exp_cfg)
  return setups["sigmoid"]


@pytest.fixture(scope="module")
def spec():
  return groups_lib.GroupSpec(name="sigmoid", cells=CELLS, budgets=BUDGETS, budget_rule="test")


@pytest.fixture(scope="module")
def batched(spec, setup):
  return cells_lib.train_group(spec, setup)


def train_by_hand(setup, cell: Cell, budget: int):
  """One cell by the plainest loop: (test metrics at the selected step, best step, last loss,
  best (val error, val loss), learning curve with each interval's largest training loss)."""
  fns, data = setup.fns, setup.data
  step_fn, eval_fn = jax.jit(fns.train_step), jax.jit(fns.eval_step)

  def score(params, split):
    sums = [eval_fn(params, {k: v[i:i + setup.eval_batch_size] for k, v in split.items()})
            for i in range(0, split["weights"].shape[0], setup.eval_batch_size)]
    return metrics_lib.means(jax.device_get(jax.tree.map(lambda *x: sum(x), *sums)))

  indices = data_lib.epoch_batches(cell.n, setup.batch_size, cell.seed, 0, budget)
  state = jax.jit(fns.init)(cell.seed)
  best, best_key, best_step, curve = None, (math.inf, math.inf), 0, []
  losses = []  # the training losses since the last selection point
  for s in range(budget):
    state, metrics = step_fn(state, {k: v[indices[s]] for k, v in data.train.items()},
                             fns.budget(np.int32(budget)))
    losses.append(float(metrics["loss"]))
    if (s + 1) % setup.eval_every_steps == 0 or s + 1 == budget:
      val = score(state.params, data.validation)
      key = (1.0 - val["accuracy"], val["loss"])
      curve.append([s + 1, *key, losses[-1], max(losses)])
      losses = []
      if key < best_key:
        best, best_key, best_step = state.params, key, s + 1
  return score(best, data.test), best_step, float(metrics["loss"]), best_key, curve


def assert_same(result, other, exact_error=True):
  assert (result.kind, result.n, result.seed, result.steps, result.diverged_at) == (
      other.kind, other.n, other.seed, other.steps, other.diverged_at)
  for field in ("test_loss", "val_loss", "train_loss"):
    assert getattr(result, field) == pytest.approx(getattr(other, field), abs=LOSS_TOLERANCE)
  # One test image is 1/297 = 3.4e-3: within the loss tolerance no prediction flips.
  if exact_error:
    assert (result.test_error, result.val_error, result.best_step) == (
        other.test_error, other.val_error, other.best_step)
  assert_same_curve(result.curve, other.curve, error_abs=None if exact_error else 0.02)


def assert_same_curve(curve, other, error_abs=None):
  """Learning curves at the same steps, losses within LOSS_TOLERANCE, validation errors
  equal (within `error_abs` if given)."""
  assert [p[0] for p in curve] == [p[0] for p in other]
  for point, expected in zip(curve, other):
    assert point[2:] == pytest.approx(expected[2:], abs=LOSS_TOLERANCE)
    assert point[1] == (expected[1] if error_abs is None
                        else pytest.approx(expected[1], abs=error_abs))


# ----------------------------------------------------------------------------
# A batched group equals its cells trained one by one, budgets and all
# ----------------------------------------------------------------------------


def test_a_batched_group_equals_each_cell_trained_alone(spec, setup, batched):
  assert [(r.kind, r.n, r.seed) for r in batched] == [(c.kind, c.n, c.seed) for c in CELLS]
  assert [r.steps for r in batched] == list(BUDGETS)
  for cell, budget, result in zip(CELLS, BUDGETS, batched):
    (alone,) = cells_lib.train_group(
        groups_lib.GroupSpec(name="one", cells=(cell,), budgets=(budget,), budget_rule="test"), setup)
    assert_same(result, alone)
    assert result.budget == "test" and result.wall_seconds > 0
  # The cells really differ, by much more than the tolerance: a group that
  # trained one cell four times, or mixed up their subsets, fails above.
  test_losses = [r.test_loss for r in batched]
  assert min(abs(a - b) for i, a in enumerate(test_losses) for b in test_losses[i + 1:]) > 1e-3


@pytest.mark.parametrize("vmap_cells", [None, 3])
def test_cells_side_by_side_or_in_chunks_give_the_same_results(spec, setup, batched, vmap_cells):
  # The CPU default computes one cell at a time inside the program (lax.map);
  # None vmaps all four, 3 vmaps a chunk of three and then the fourth alone.
  assert setup.vmap_cells == 1
  other = cells_lib.train_group(spec, dataclasses.replace(setup, vmap_cells=vmap_cells))
  for result, reference in zip(other, batched):
    assert_same(result, reference)


@pytest.mark.parametrize("vmap_cells, stack_sizes", [(1, {3}), (None, {3, 1})])
def test_finished_cells_are_skipped_in_place_one_at_a_time_and_leave_a_vmapped_stack(
    setup, batched, monkeypatch, vmap_cells, stack_sizes):
  # One cell at a time, a finished cell takes a branch that skips its step, so
  # the stack (and the compiled step) keeps one shape for the whole group;
  # vmapped, the branch would run both sides, so finished cells leave.
  sizes = _recording_sizes(monkeypatch)
  spec = groups_lib.GroupSpec(name="three", cells=CELLS[:3], budgets=BUDGETS[:3], budget_rule="test")
  results = cells_lib.train_group(spec, dataclasses.replace(setup, vmap_cells=vmap_cells))
  assert sizes == stack_sizes
  for result, reference in zip(results, batched):
    assert_same(result, reference)


def test_stack_sizes_are_powers_of_two_up_to_the_group():
  assert [cells_lib.stack_size(n, 12) for n in (12, 9, 8, 5, 3, 2, 1)] == [12, 12, 8, 8, 4, 2, 1]
  assert cells_lib.stack_size(3, 3) == 3


def _recording_sizes(monkeypatch) -> set:
  sizes, group_step = set(), cells_lib._group_step

  def recording_group_step(fns, vmap):
    step = group_step(fns, vmap)

    def recorded(stack, *args):
      sizes.add(stack.applied.shape[0])
      return step(stack, *args)
    return recorded

  monkeypatch.setattr(cells_lib, "_group_step", recording_group_step)
  return sizes


def test_a_vmapped_stack_keeps_a_finished_cell_masked_until_it_can_halve(setup, monkeypatch,
                                                                          tmp_path):
  """Budgets 6, 8, 8, 8: after step 6 three cells train in a stack of four, the finished cell
  masked; the results equal one-at-a-time training, uninterrupted and resumed at step 7."""
  spec = groups_lib.GroupSpec(name="four", cells=CELLS, budgets=(6, 8, 8, 8), budget_rule="test")
  reference = cells_lib.train_group(spec, setup)  # one cell at a time (CPU's default)
  sizes = _recording_sizes(monkeypatch)
  vmapped = dataclasses.replace(setup, vmap_cells=None)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=7)
  results = cells_lib.train_group(spec, vmapped, checkpointer=checkpointer)
  checkpointer.close()
  assert sizes == {4}
  for result, expected in zip(results, reference):
    assert_same(result, expected)
  # A rerun resumes from step 7: three training cells, padded back to a stack of four.
  sizes.clear()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=7)
  resumed = cells_lib.train_group(spec, vmapped, checkpointer=checkpointer)
  checkpointer.close()
  assert sizes == {4} and len(resumed) == 3
  for result, expected in zip(resumed, reference[1:]):
    assert_same(result, expected)


def test_a_cell_resumed_from_a_checkpoint_without_curves_records_none(spec, setup, batched,
                                                                    monkeypatch, tmp_path):
  """Checkpoints from before learning curves: the resumed cells' results are unchanged but
  their curves are None, not curves that start at the resumed step."""
  save = checkpoint_lib.Checkpointer.save

  def save_as_before(self, step, tree, data_state):
    save(self, step, tree, {k: v for k, v in data_state.items() if k != "curves"})

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save_as_before)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=7)
  first = cells_lib.train_group(spec, setup, checkpointer=checkpointer)
  checkpointer.close()
  assert all(r.curve for r in first)  # an uninterrupted run keeps its curves
  monkeypatch.undo()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=7)
  resumed = cells_lib.train_group(spec, setup, checkpointer=checkpointer)  # from step 7
  checkpointer.close()
  assert [r.n for r in resumed] == [64, 64] and all(r.curve is None for r in resumed)
  for result, expected in zip(resumed, [batched[1], batched[3]]):
    assert_same(dataclasses.replace(result, curve=expected.curve), expected)


def test_a_cell_resumed_from_a_checkpoint_without_loss_maxima_records_none_then_maxima(
    spec, setup, batched, monkeypatch, tmp_path):
  """Checkpoints from before `interval_loss_max`: they still restore; the interval that spans
  the resume has an unknown maximum (None), the next ones have theirs again."""
  save = checkpoint_lib.Checkpointer.save

  def save_as_before(self, step, tree, data_state):
    save(self, step, {k: v for k, v in tree.items() if k != "interval_loss_max"}, data_state)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save_as_before)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=4)
  cells_lib.train_group(spec, setup, checkpointer=checkpointer)
  checkpointer.close()
  monkeypatch.undo()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=4)
  resumed = cells_lib.train_group(spec, setup, checkpointer=checkpointer)  # from step 4
  checkpointer.close()
  assert len(resumed) == 4  # every cell trains past step 4
  for result, expected in zip(resumed, batched):
    # Points at 3, 6 (and 8 at n = 64): step 3's came with the checkpoint, 6's interval
    # (steps 4-6) began before the resume at 4, and 8's (7-8) is whole again.
    assert [p[4] is None for p in result.curve] == [False, True, False][:len(expected.curve)]
    assert_same_curve([p[:4] for p in result.curve], [p[:4] for p in expected.curve])
    for point, reference in zip(result.curve, expected.curve):
      if point[4] is not None:
        assert point[4] == pytest.approx(reference[4], abs=LOSS_TOLERANCE)
    assert_same(dataclasses.replace(result, curve=expected.curve), expected)


def test_the_engine_equals_the_plainest_loop(setup, batched):
  for c in (0, 1):  # one cell of each budget
    test, best_step, last_loss, (val_error, val_loss), curve = train_by_hand(setup, CELLS[c],
                                                                             BUDGETS[c])
    result = batched[c]
    # Every 3 steps and at the last: 3, 6 (n = 32) or 3, 6, 8 (n = 64); the selected point
    # is the curve's best, and its last training loss is the cell's.
    assert [p[0] for p in result.curve] == [3, 6] + ([8] if BUDGETS[c] == 8 else [])
    assert_same_curve(result.curve, curve, error_abs=1e-7)
    assert min(result.curve, key=lambda p: (p[1], p[2]))[0] == result.best_step
    assert result.curve[-1][3] == result.train_loss
    # Each point's maximum is at least its own loss, and above it somewhere: a maximum that
    # only copied the last loss would pass assert_same_curve nowhere else.
    assert all(p[4] >= p[3] for p in result.curve) and any(p[4] > p[3] for p in result.curve)
    assert result.best_step == best_step
    assert result.val_error == pytest.approx(val_error, abs=1e-7)
    assert result.val_loss == pytest.approx(val_loss, abs=LOSS_TOLERANCE)
    assert result.train_loss == pytest.approx(last_loss, abs=LOSS_TOLERANCE)
    assert result.test_loss == pytest.approx(test["loss"], abs=LOSS_TOLERANCE)
    assert result.test_error == pytest.approx(1.0 - test["accuracy"], abs=1e-7)


def test_each_cell_follows_its_own_learning_rate_schedule(setup):
  # The budget is the schedule's length: the same cell with another budget
  # has another learning rate at the same step (6 steps: no warmup, near the
  # end of the cosine; 600: 30 warmup steps, at 5/30 of the peak).
  fns = setup.fns
  state = jax.jit(fns.init)(0)
  batch = {k: v[:setup.batch_size] for k, v in setup.data.train.items()}
  state = state.replace(step=jnp.int32(5))
  _, short = fns.train_step(state, batch, fns.budget(np.int32(6)))
  _, long = fns.train_step(state, batch, fns.budget(np.int32(600)))
  peak = configlib.load(QUICK_STUDY).optim.learning_rate  # the config's, not the step's
  assert float(short["learning_rate"]) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
  assert float(long["learning_rate"]) == pytest.approx(peak * 5 / 30)


# ----------------------------------------------------------------------------
# The data: nested subsets, shared validation and test splits
# ----------------------------------------------------------------------------


def test_subsets_are_nested_and_the_validation_and_test_splits_are_disjoint_from_them(setup):
  data = setup.data
  pool = np.asarray(data.train["inputs"])
  assert pool.shape[0] == 64  # the largest size: cells of n < 64 train on its first n
  # A cell of size n draws only indices below n, each epoch a permutation of range(n).
  indices = data_lib.epoch_batches(32, 16, 0, 0, 4)
  assert indices.max() < 32 and sorted(indices[:2].ravel()) == list(range(32))
  train_images = {x.tobytes() for x in pool}
  weights = np.asarray(data.validation["weights"])
  validation = np.asarray(data.validation["inputs"])[weights > 0]
  assert validation.shape[0] == 300
  assert not train_images & {x.tobytes() for x in validation}
  # The pool is the first 64 of the fixed permutation, whatever else is asked of the data.
  again = data_lib.load(dataclasses.replace(data_lib.DataConfig(name="digits"), train_examples=64,
                                            validation_examples=300), seed=5)
  np.testing.assert_array_equal(data_lib.to_arrays(again.train)["inputs"], pool)


# ----------------------------------------------------------------------------
# Divergence: one cell fails, the others do not notice
# ----------------------------------------------------------------------------


def test_a_diverging_cell_is_frozen_and_recorded_and_the_others_finish(spec, setup, batched):
  # Example 40 is in the n=64 cells' subsets only: they meet NaN in their
  # first epoch; the n=32 cells never see it.
  train = dict(setup.data.train)
  train["inputs"] = train["inputs"].at[40].set(jnp.nan)
  poisoned_setup = dataclasses.replace(setup, data=dataclasses.replace(setup.data, train=train))
  poisoned = cells_lib.train_group(spec, poisoned_setup)
  for cell, result, clean in zip(CELLS, poisoned, batched):
    if cell.n == 32:
      assert_same(result, clean)
      continue
    assert result.diverged_at is not None and 1 <= result.diverged_at <= 4
    # Failed: NaN metrics, counted by the analysis and never averaged.
    assert math.isnan(result.test_error) and math.isnan(result.test_loss)
    assert result.steps == 8
