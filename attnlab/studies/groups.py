"""A study's cells, its groups and their data: what `cells.train_group` is given.

A cell is one (attention kind, training-set size n, seed) run of a study's base
experiment (`Cell`); a group is cells of one kind trained together, each with
its budget (`GroupSpec`), and what they share: the model functions, the data in
memory and the evaluation cadence (`GroupSetup`, `StudyData`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from attnlab import data as data_lib
from attnlab import model_fns


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


def side_by_side(vmap_cells: int | None, num_cells: int) -> bool:
  """Whether a stack of `num_cells` runs all side by side (one vmap), so its cell axis can be split."""
  return vmap_cells is None or vmap_cells >= num_cells
