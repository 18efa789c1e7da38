"""Losses, accuracies and metric writers shared by training and evaluation.

Every task is scored the same way: a per-position cross-entropy weighted by
`batch["weights"]` (1 for real examples / answer tokens, 0 for padding), so
classification, MQAR (answer positions only) and language modelling share
one loss and one accuracy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def weighted_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  *, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """Sums of cross-entropy, correct predictions and weights over a batch.

  Args:
    logits: [..., C] float.
    targets: [...] int class / token ids.
    weights: [...] float, 0 where a position does not count.
    label_smoothing: mass spread uniformly over the C classes (0: plain CE).

  Returns:
    {"loss_sum", "correct_sum", "weight_sum"} float32 scalars; sums, so that
    evaluation can accumulate them over batches before dividing.
  """
  num_classes = logits.shape[-1]
  labels = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
  ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return {
      "loss_sum": jnp.sum(ce * weights),
      "correct_sum": jnp.sum(correct * weights),
      "weight_sum": jnp.sum(weights),
  }


def means(sums: dict[str, Any]) -> dict[str, float]:
  """{"loss", "accuracy"} from `weighted_sums` (accumulated or not)."""
  total = max(float(sums["weight_sum"]), 1e-9)
  return {"loss": float(sums["loss_sum"]) / total, "accuracy": float(sums["correct_sum"]) / total}


class MetricWriter:
  """Appends metrics to <workdir>/metrics.jsonl, and to TensorBoard if a writer is installed.

  Each line is one JSON object with "step" and "split" ("train" / "eval").
  On resume from step k, lines after step k (written after the checkpoint
  the run resumes from) are dropped, so the file reads as one run. Use it as
  a context manager (or call `close`, which may be called again): an
  unclosed TensorBoard writer reports errors from its thread at exit.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step or 0)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(kept)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  @property
  def closed(self) -> bool:
    return self._file.closed

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False


def _tensorboard_writer(logdir: str):
  """A tensorboardX SummaryWriter if that optional package is installed, else None."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return SummaryWriter(logdir)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def curve(workdir: str, name: str, *, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `name` over the `split` records of <workdir>/metrics.jsonl that
  hold it, as int64 and float64 arrays in step order: a learning curve to plot.

  Training records hold "loss", "accuracy", "grad_norm", "learning_rate",
  "examples_per_sec"; evaluation records (split "eval") "eval_loss", "eval_accuracy".
  """
  records = sorted((r for r in read_metrics(workdir) if r["split"] == split and name in r),
                   key=lambda r: r["step"])
  return (np.array([r["step"] for r in records], np.int64),
          np.array([r[name] for r in records], np.float64))


class Progress:
  """A progress bar with loss and ETA on a terminal; periodic log lines otherwise."""

  def __init__(self, total: int, initial: int, *, enabled: bool = True, log_every: int = 100,
               unit: str = "step"):
    self.total, self.log_every, self.unit = total, log_every, unit
    self._step = self._last_log = initial
    self._bar = None
    self._start, self._start_step = time.perf_counter(), initial
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top  # installed with tfds

      # A pseudo-terminal may report 0 columns, which tqdm would draw as nothing.
      try:
        sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
      except OSError:
        sized = False
      self._bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=sized,
                       ncols=None if sized else 100)
    self.enabled = enabled

  def skip_to(self, step: int) -> None:
    """Moves to `step` over work found already done (a resumed checkpoint), not this run's.

    Rate and ETA count only the work this process did: a resumed study that jumps
    45,000 cell-steps in its first second would otherwise report thousands per second.
    """
    skipped = step - self._step
    self._start_step += skipped
    self._step = self._last_log = step
    if self._bar is not None:
      # Moved without `update`, which would count the jump into tqdm's rate.
      self._bar.initial += skipped
      self._bar.n = self._bar.last_print_n = step
      self._bar.refresh()

  def update(self, step: int, values: dict[str, float], *, describe: str | None = None) -> None:
    """Moves to `step` of `total`, showing `values` (and `describe`, e.g. the current group)."""
    self._step = step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if describe is not None:
        self._bar.set_description(describe, refresh=False)
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
    elif self.enabled and (step // self.log_every > self._last_log // self.log_every or step == self.total):
      self._last_log = step
      elapsed = time.perf_counter() - self._start
      rate = (step - self._start_step) / max(elapsed, 1e-9)
      eta = (self.total - step) / max(rate, 1e-9)
      shown = " ".join(([describe] if describe else []) + [f"{k}={v:.4g}" for k, v in values.items()])
      print(f"{self.unit} {step}/{self.total} {shown} ({rate:.1f} {self.unit}s/s, ETA {eta:.0f}s)",
            file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
