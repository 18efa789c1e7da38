"""The single-run training loop: `train_and_evaluate(config, workdir)`.

Building the experiment (config -> typed pieces, data, model functions, train
state, shardings, evaluation of parameters) is `attnlab.experiment`'s job;
this module is the loop and what only the loop needs: checkpoint cadence,
resuming, preemption, the NaN guard and the config check that guards a resume.
`train_and_evaluate` reads top to bottom:

  1. Config -> `experiment.Experiment`. The data opens first, so a missing
     data set fails in seconds with the command that prepares it; a workdir
     whose checkpoints are of another config is refused.
  2. Model functions, the state's shapes (`jax.eval_shape`) and shardings.
  3. Checkpoints: resume from the workdir if it has one, else a fresh state
     created directly with its shardings.
  4. The train step, a pure function (state, batch) -> (state, metrics),
     jitted once with the state donated.
  5. The loop: metrics and progress, NaN guard, checkpoints, the `on_step`
     seam, preemption (SIGTERM, or Orbax's multi-host sync point).
  6. Final evaluation on the evaluation split.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import experiment
from attnlab import metrics as metrics_lib
from attnlab import workdir as workdir_lib

# Called after each step's checkpoint decision with (step, state). The state
# is valid during the call only: the next step donates its buffers.
OnStep = Callable[[int, experiment.TrainState], None]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_step: OnStep | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

  Args:
    config: an experiment config (see configs/); it stops here: everything
      below works on the typed `experiment.Experiment`.
    workdir: where checkpoints, metrics.jsonl and config.json go.
    on_step: called as on_step(step, state) after each step, once that step's
      checkpoint (if any) has been started and before a preemption is acted
      on: a seam for notebooks, studies and tests (e.g. to stop the process at
      a known point). The state must not be kept: the next step donates it.

  Returns:
    {"step", "eval_loss", "eval_accuracy", "workdir", "checkpoint_dir",
    "train_seconds"}.

  Raises:
    DatasetNotPreparedError: the data set is missing (before any training).
    ConfigError, ValueError: an invalid config.
    FloatingPointError: the loss or the parameters became NaN/inf; the message
      names the step, and no checkpoint is written after it.
    SystemExit(143): preempted (SIGTERM, or every host reached Orbax's
      preemption sync point); a checkpoint of the last step was written first.
  """
  # 1. Config -> typed experiment (the data opens first: fail fast).
  exp = experiment.load(config)
  workdir_lib.check_same_run(config, workdir)
  _write_config(config, workdir)
  trainer = exp.trainer

  # 2. Model functions, state shapes, shardings.
  fns = exp.fns()
  abstract_state = experiment.abstract_state(fns, trainer.seed)
  shard = experiment.Shardings.data_parallel(abstract_state, trainer.batch_size)

  # 3. Checkpoints: resume or start.
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=trainer.keep_checkpoints,
                                     every_steps=trainer.checkpoint_every_steps)
  batches = data_lib.train_batches(exp.datasets, batch_size=trainer.batch_size,
                                   num_steps=exp.num_steps, seed=trainer.seed)
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(
        checkpoint_lib.with_shardings(abstract_state, shard.state))
    print(f"Resuming from step {start} in {checkpoint_lib.checkpoint_dir(workdir)}", file=sys.stderr)
  else:
    state = experiment.create_state(fns, trainer.seed, shard)
    data_state, start = None, 0
  data_iter = data_lib.train_iterator(batches, data_state)

  # 4. The jitted steps (the train state is donated: updated in place).
  train_step = jax.jit(fns.train_step, donate_argnums=0,
                       in_shardings=(shard.state, shard.batch), out_shardings=(shard.state, None))
  eval_step = experiment.jit_eval_step(fns, shard)

  def evaluate(params) -> dict[str, float]:
    return experiment.evaluate_params(eval_step, params, exp.datasets.eval,
                                      batch_size=trainer.eval_batch_size,
                                      batch_sharding=shard.batch)

  # 5. The loop.
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  log = _TrainLog(writer, exp, start)
  loop_start = time.perf_counter()
  try:
    with _Preemption(ckpt) as preemption:
      for step in range(start + 1, exp.num_steps + 1):
        state, step_metrics = train_step(state, jax.device_put(next(data_iter), shard.batch))
        log.add(step, step_metrics)
        must_save = ckpt.should_save(step) or step == exp.num_steps
        if step % trainer.log_every_steps == 0 or must_save or step == start + 1:
          log.sync(step)  # the only host sync: every pending step is checked before a checkpoint
        if trainer.eval_every_steps and step % trainer.eval_every_steps == 0 and step != exp.num_steps:
          writer.write(step, "eval", _prefixed(evaluate(state.params)))
        if must_save:
          ckpt.save(step, state, data_iter.get_state())
        if on_step is not None:
          on_step(step, state)
        if preemption.reached(step):
          if not must_save:
            log.check_finite()
            ckpt.save(step, state, data_iter.get_state())
          ckpt.wait()
          print(f"{preemption.cause}: saved a checkpoint at step {step} in "
                f"{checkpoint_lib.checkpoint_dir(workdir)}; exiting.", file=sys.stderr, flush=True)
          raise SystemExit(143)
  finally:
    log.close()
    ckpt.close()  # waits for checkpoints in flight (all of them finite)
  train_seconds = time.perf_counter() - loop_start

  # 6. Final evaluation.
  final_step = int(jax.device_get(state.step))
  result = evaluate(state.params)
  writer.write(final_step, "eval", _prefixed(result))
  writer.close()
  return {
      "step": final_step,
      "eval_loss": result["loss"],
      "eval_accuracy": result["accuracy"],
      "workdir": os.path.abspath(workdir),
      "checkpoint_dir": checkpoint_lib.checkpoint_dir(workdir),
      "train_seconds": train_seconds,
  }


# ----------------------------------------------------------------------------
# Resuming: the same run only.
# ----------------------------------------------------------------------------

def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """<workdir>/config.json: what `workdir.check_same_run` compares a resumed run's config with."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))


# ----------------------------------------------------------------------------
# Training metrics and the NaN guard.
# ----------------------------------------------------------------------------


class _TrainLog:
  """Step metrics kept on the device until a sync, then NaN-checked, written and shown."""

  def __init__(self, writer: metrics_lib.MetricWriter, exp: experiment.Experiment, start: int):
    self._writer, self._num_steps = writer, exp.num_steps
    self._batch_size, self._log_every = exp.trainer.batch_size, exp.trainer.log_every_steps
    self._progress = metrics_lib.Progress(exp.num_steps, start, enabled=exp.trainer.progress_bar,
                                          log_every=self._log_every)
    self._pending: list[tuple[int, dict]] = []  # device metrics not yet checked for NaN
    self._last_log = (start, time.perf_counter())

  def add(self, step: int, step_metrics: dict) -> None:
    self._pending.append((step, step_metrics))

  def check_finite(self) -> dict[str, float]:
    """Fetches the pending steps' metrics (raising on NaN); returns the last step's."""
    values = _check_finite(self._pending)
    self._pending.clear()
    return values

  def sync(self, step: int) -> None:
    """Checks the pending steps, writes `step`'s metrics if it is a log step, updates progress."""
    values = self.check_finite()
    if step % self._log_every == 0 or step == self._num_steps:
      now = time.perf_counter()
      rate = (step - self._last_log[0]) * self._batch_size / max(now - self._last_log[1], 1e-9)
      self._writer.write(step, "train", {**values, "examples_per_sec": rate})
      self._last_log = (step, now)
    self._progress.update(step, {"loss": values["loss"], "acc": values["accuracy"]})

  def close(self) -> None:
    self._progress.close()


def _check_finite(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """Fetches pending step metrics; raises on the first non-finite one; returns the last."""
  if not pending:
    return {}
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), values in zip(pending, fetched):
    if not bool(values["finite"]):
      raise FloatingPointError(
          f"Non-finite training loss or parameters at step {step} (loss={float(values['loss'])}, "
          f"grad_norm={float(values['grad_norm'])}, learning_rate={float(values['learning_rate'])})."
          " No checkpoint was written after the last finite step; lower the learning rate or "
          "enable gradient clipping (config.optim.grad_clip_norm)."
      )
  return {k: float(v) for k, v in fetched[-1].items() if k != "finite"}


def _prefixed(values: dict[str, float]) -> dict[str, float]:
  return {f"eval_{k}": v for k, v in values.items()}


# ----------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------


class _Preemption:
  """When a preempted run saves and stops: at the end of the step in flight.

  One process: a SIGTERM handler (main thread only) records the notice instead
  of dying at once. Several processes (jax.distributed): JAX's preemption
  service owns SIGTERM and passes the notice to every host, and Orbax's
  `reached_preemption(step)` turns True at the same step on all of them, so
  every host saves that one step (a checkpoint is a collective write). Our own
  handler would replace JAX's there, so it is only installed in one process.
  """

  def __init__(self, ckpt: checkpoint_lib.Checkpointer):
    self._ckpt = ckpt
    self.cause: str | None = None
    self._previous = None
    self._installed = False

  def __enter__(self) -> _Preemption:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.cause = self.cause or "SIGTERM"

  def reached(self, step: int) -> bool:
    """Whether to save and exit after `step`. Call it at every step (Orbax's sync needs that)."""
    if self._ckpt.reached_preemption(step):
      self.cause = self.cause or "Preemption sync point"
    return self.cause is not None

  def __exit__(self, *exc) -> bool:
    if self._installed:
      # A handler installed outside Python reads back as None: restore the default.
      previous = self._previous if self._previous is not None else signal.SIG_DFL
      signal.signal(signal.SIGTERM, previous)
    return False
