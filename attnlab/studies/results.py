"""The record of one trained (kind, n, seed) cell, and the files that hold a study's cells.

A study has one `CellResult` per (kind, n, seed); seeds are paired across
kinds (same subset, same initial key). results.json is strict JSON (a failed
cell's NaN is written as null) and `load_cells` reads it back exactly;
results.csv is the same table for a spreadsheet.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from attnlab import fileio


@dataclasses.dataclass(frozen=True)
class CellResult:
  """What one trained (kind, n, seed) cell produced.

  Attributes:
    kind: attention kind (a registered name, e.g. "softmax", "sigmoid").
    n: training-set size of the cell.
    seed: seed of the cell; the same seed in two kinds means the same subset and init key.
    test_error: test error rate (1 - accuracy) at the selected step; NaN if the cell failed.
    test_loss: test loss at the selected step; NaN if the cell failed.
    val_error: validation error at the selected step, if model selection used one.
    val_loss: validation loss at the selected step.
    best_step: step selected on the validation split.
    steps: steps trained (the budget the rule gave this n).
    wall_seconds: training wall time attributed to the cell.
    budget: the budget rule in words, e.g. "epochs=100, min_steps=500".
    diverged_at: the step whose update was non-finite (the cell failed); None: it trained.
    train_loss: training loss of the cell's last applied update.
    curve: the cell's learning curve, one [step, val_error, val_loss, train_loss,
      train_loss_max] per selection point (every eval_every_steps steps and its last):
      validation error and loss of the parameters at that step (None without a validation
      split), the training loss of that step's update (one batch), and the largest training
      loss of the updates since the previous point (None where unknown: a run resumed from a
      checkpoint that did not keep it). Records written before train_loss_max have four
      entries per point. None: recorded before curves were.
  """
  kind: str
  n: int
  seed: int
  test_error: float
  test_loss: float
  val_error: float | None = None
  val_loss: float | None = None
  best_step: int | None = None
  steps: int | None = None
  wall_seconds: float | None = None
  budget: str | None = None
  diverged_at: int | None = None
  train_loss: float | None = None
  curve: list[list[float | None]] | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, record: dict[str, Any]) -> CellResult:
    """Builds a cell from `to_dict`'s output; unknown keys are an error, not silently lost."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - names)
    if unknown:
      raise ValueError(f"cell record has unknown fields {unknown}; known fields: {sorted(names)}.")
    # save_cells writes a failed cell's NaN metrics as null.
    metrics = {k: math.nan for k in ("test_error", "test_loss") if record.get(k, 0.0) is None}
    return cls(**{**record, **metrics})


def finite(cells: Iterable[CellResult]) -> list[CellResult]:
  """Cells that produced a result; a failed cell (NaN) is reported, never averaged."""
  return [c for c in cells if math.isfinite(c.test_error) and math.isfinite(c.test_loss)]


def check_cells(cells: Sequence[CellResult]) -> list[CellResult]:
  """`cells` as a list, refused when empty, not CellResults, or holding a (kind, n, seed) twice."""
  cells = list(cells)
  if not cells:
    raise ValueError("no cell results to analyse; run the study first (train.py with the study config).")
  for c in cells:
    if not isinstance(c, CellResult):
      raise ValueError(f"cells must be CellResult records; got {type(c).__name__}.")
  seen = set()
  for c in cells:
    key = (c.kind, c.n, c.seed)
    if key in seen:
      raise ValueError(f"cell (kind={c.kind!r}, n={c.n}, seed={c.seed}) appears twice; "
                       "each (kind, n, seed) must have exactly one result.")
    seen.add(key)
  return cells


def check_kinds(cells: Sequence[CellResult], kinds: Sequence[str], argument: str) -> None:
  """Refuses kinds (passed as `argument`) that no cell has, naming the kinds present."""
  present = sorted({c.kind for c in cells})
  missing = [k for k in kinds if k not in present]
  if missing:
    raise ValueError(f"{argument}={tuple(kinds)} names kinds {missing} that have no cells; "
                     f"kinds present: {present}. Pass {argument}= with two of those.")


def save_cells(cells: Sequence[CellResult], path: str) -> None:
  """Writes every cell to results.json ({"cells": [...]}); `load_cells` reads it back."""
  # A failed cell's NaN is written as null: strict JSON, so tools outside Python can read it.
  records = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in c.to_dict().items()} for c in cells]
  fileio.write_atomic(path, json.dumps({"cells": records}, indent=1, allow_nan=False))


def load_cells(path: str) -> list[CellResult]:
  """Reads the cells `save_cells` wrote."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict) or "cells" not in data:
    raise ValueError(f"{path} is not a study results.json (no 'cells' list); was it written by save_cells?")
  return [CellResult.from_dict(r) for r in data["cells"]]


def save_csv(cells: Sequence[CellResult], path: str) -> None:
  """Writes every cell as one row of results.csv (a missing value is an empty field)."""
  # One row per cell: the learning curve (a list) stays in results.json.
  names = [f.name for f in dataclasses.fields(CellResult) if f.name != "curve"]
  text = io.StringIO(newline="")
  w = csv.writer(text)
  w.writerow(names)
  for c in cells:
    w.writerow(["" if v is None else v for v in (getattr(c, k) for k in names)])
  fileio.write_atomic(path, text.getvalue())
