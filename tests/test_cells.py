"""Tests of attnlab.studies.cells: a group of cells trained together under vmap.

The reference for a batched group is each cell trained alone by the plainest
loop over the same pure `fns.train_step` and the data pipeline's own
`train_batches`, so the group's stacking, masking and per-cell evaluation are
all checked against code that does none of them.
"""

import dataclasses

import grain.python as grain
import jax
import numpy as np
import pytest

from attnlab import configlib
from attnlab import data as data_lib
from attnlab import experiment
from attnlab.studies import cells as cells_lib
from attnlab.studies.cells import Cell

# Compile time dominates these tests; both sides of every comparison run the
# same unoptimised programs, so the comparisons are as strict as with XLA's passes.
pytestmark = pytest.mark.usefixtures("fast_xla_compile")

# 8 steps of batch 32 on two subset sizes and three seeds: every cell differs
# from the others in its initialisation, its data order, or its examples.
CELLS = (Cell("sigmoid", 64, 0), Cell("sigmoid", 128, 1), Cell("sigmoid", 64, 2))

# vmap batches the cells' matmuls and reductions, which may round float32
# differently from the single-cell program; tests/test_train.py measured that
# 256 ulp of noise per step moves the quick run's loss by < 5e-7 over 8 steps,
# while a 1% learning-rate change moves it by 5e-4. 1e-5 sits between the two.
# (On the 2-core x86 machine of this test's writing they were bitwise equal.)
LOSS_TOLERANCE = 1e-5


def quick_config(**overrides):
  config = configlib.load("configs/digits_vit.py:sigmoid,quick")
  for field, value in overrides.items():
    config[field] = value
  return config


def train_alone(exp: experiment.Experiment, num_steps: int):
  """One cell trained by the plain loop: (per-step losses, test metrics of the last params)."""
  fns = exp.fns()
  step = jax.jit(fns.train_step)
  batches = data_lib.train_batches(exp.datasets, batch_size=exp.trainer.batch_size,
                                   num_steps=exp.num_steps, seed=exp.trainer.seed)
  state, losses = jax.jit(fns.init)(exp.trainer.seed), []
  for s in range(num_steps):
    state, metrics = step(state, batches[s])
    losses.append(float(metrics["loss"]))
  test = experiment.evaluate_params(jax.jit(fns.eval_step), state.params, exp.datasets.eval,
                                    batch_size=exp.trainer.eval_batch_size)
  return losses, test


@pytest.fixture(scope="module")
def group():
  return cells_lib.build_group(quick_config(), CELLS)


@pytest.fixture(scope="module")
def batched(group):
  return cells_lib.train(group)


@pytest.fixture(scope="module")
def alone(group):
  return [train_alone(exp, group.num_steps) for exp in group.experiments]


def assert_matches_alone(result, losses, test):
  assert result.train_loss == pytest.approx(losses[-1], abs=LOSS_TOLERANCE)
  assert result.test_loss == pytest.approx(test["loss"], abs=LOSS_TOLERANCE)
  # One test image is 1/297 = 3.4e-3: within the loss tolerance no prediction flips.
  assert result.test_accuracy == test["accuracy"]


# ----------------------------------------------------------------------------
# A batched group equals its cells trained one by one
# ----------------------------------------------------------------------------


def test_a_batched_group_gives_each_cell_its_own_run(batched, alone):
  assert [r.cell for r in batched] == list(CELLS)
  for result, (losses, test) in zip(batched, alone):
    assert (result.steps, result.num_steps, result.diverged_at) == (8, 8, None)
    assert_matches_alone(result, losses, test)
    assert result.test_error == pytest.approx(1.0 - result.test_accuracy)
  # The cells really differ, by much more than the tolerance: a group that
  # trained one cell three times, or mixed up their batches, fails above.
  test_losses = [r.test_loss for r in batched]
  assert min(abs(a - b) for i, a in enumerate(test_losses) for b in test_losses[i + 1:]) > 1e-3
  assert len({r.group_seconds for r in batched}) == 1 and batched[0].group_seconds > 0


def test_train_group_builds_and_trains_in_one_call(batched):
  again = cells_lib.train_group(quick_config(), CELLS)
  # Same program, same inputs: bitwise the same numbers.
  assert [dataclasses.replace(r, group_seconds=0) for r in again] == [
      dataclasses.replace(r, group_seconds=0) for r in batched]


# ----------------------------------------------------------------------------
# Data: nested subsets, a shared evaluation split
# ----------------------------------------------------------------------------


def examples(dataset):
  return [(dataset[i]["inputs"], int(dataset[i]["targets"])) for i in range(len(dataset))]


def test_subsets_are_nested_and_deterministic_and_the_eval_split_is_shared():
  cells = [Cell("sigmoid", 16, 0), Cell("sigmoid", 32, 1)]
  small, large = cells_lib.build_group(quick_config(batch_size=16), cells).experiments
  small_x, large_x = examples(small.datasets.train), examples(large.datasets.train)
  assert (len(small_x), len(large_x)) == (16, 32)
  # The first n of one fixed permutation: the 16 are the 32's first 16, in order.
  for (a, y), (b, z) in zip(small_x, large_x):
    np.testing.assert_array_equal(a, b)
    assert y == z
  assert len({x.tobytes() for x, _ in large_x}) == 32  # 32 distinct images, not one repeated
  # Deterministic: another build (other seeds, too) picks the same examples.
  rebuilt = cells_lib.build_group(quick_config(batch_size=16), [Cell("sigmoid", 32, 7)])
  for (a, _), (b, _) in zip(examples(rebuilt.experiments[0].datasets.train), large_x):
    np.testing.assert_array_equal(a, b)
  # The evaluation split does not depend on the subset or the seed.
  for a, b in zip(examples(small.datasets.eval), examples(large.datasets.eval), strict=True):
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_stacked_batches_keep_each_cells_own_order(group):
  stacked = group.batches()[3]
  for c, exp in enumerate(group.experiments):
    own = data_lib.train_batches(exp.datasets, batch_size=32, num_steps=8, seed=exp.trainer.seed)[3]
    for key, value in own.items():
      np.testing.assert_array_equal(stacked[key][c], value)
  assert not np.array_equal(stacked["inputs"][0], stacked["inputs"][2])  # same n, other seed


# ----------------------------------------------------------------------------
# Group validation
# ----------------------------------------------------------------------------


def test_cells_with_different_step_budgets_are_refused():
  # 2 epochs of batch 32: 4 steps at n=64, 8 at n=128.
  config = quick_config(total_steps=None, num_epochs=2.0)
  with pytest.raises(configlib.ConfigError,
                     match=r"differ in num_steps=8 vs 4\. A group trains under one compiled"):
    cells_lib.build_group(config, [Cell("sigmoid", 64, 0), Cell("sigmoid", 128, 0)])


def test_cells_with_different_kinds_are_refused():
  with pytest.raises(configlib.ConfigError,
                     match=r"differ in model.attention='softmax' vs 'sigmoid'\..*own group"):
    cells_lib.build_group(quick_config(), [Cell("sigmoid", 64, 0), Cell("softmax", 64, 0)])


def test_an_empty_group_and_a_bad_cell_are_refused():
  with pytest.raises(configlib.ConfigError, match="at least one cell"):
    cells_lib.build_group(quick_config(), [])
  with pytest.raises(configlib.ConfigError, match=r"batch_size=32: larger than the 16"):
    cells_lib.build_group(quick_config(), [Cell("sigmoid", 16, 0)])


def test_cells_whose_eval_splits_differ_are_refused():
  # MQAR draws its test split from the run's seed, so its cells of two seeds
  # are scored on different examples: a study must not compare them.
  config = configlib.load("configs/mqar_transformer.py:sigmoid,quick")
  with pytest.raises(configlib.ConfigError, match="different evaluation splits"):
    cells_lib.build_group(config, [Cell("sigmoid", None, 0), Cell("sigmoid", None, 1)])


# ----------------------------------------------------------------------------
# Divergence: one cell fails, the others do not notice
# ----------------------------------------------------------------------------


def test_a_diverging_cell_is_frozen_and_recorded_and_the_others_finish(group, batched, alone):
  bad_cell, bad_step = 1, 4
  clean = group.batches()

  def poison(s):
    batch = clean[s]
    if s + 1 >= bad_step:  # element s is step s + 1
      batch["inputs"][bad_cell] = np.nan
    return batch

  poisoned = cells_lib.train(group, batches=grain.MapDataset.range(len(clean)).map(poison))
  for c, (result, clean_result) in enumerate(zip(poisoned, batched)):
    if c != bad_cell:  # the same program on the same inputs: bitwise the same
      assert dataclasses.replace(result, group_seconds=0) == dataclasses.replace(
          clean_result, group_seconds=0)
  result = poisoned[bad_cell]
  assert (result.diverged_at, result.steps, result.num_steps) == (bad_step, bad_step - 1, 8)
  # Frozen at its last finite state: the cell alone after 3 steps.
  losses, test = train_alone(group.experiments[bad_cell], bad_step - 1)
  assert_matches_alone(result, losses, test)
  assert np.isfinite(result.test_loss)
  # For the study's analysis the diverged cell is a failure (NaN), the others are results.
  assert np.isnan(result.result().test_error) and np.isnan(result.result().test_loss)
  kept = poisoned[0].result()
  assert (kept.kind, kept.n, kept.seed, kept.steps) == (
      group.cells[0].kind, group.cells[0].n, group.cells[0].seed, 8)
  assert kept.test_error == poisoned[0].test_error
