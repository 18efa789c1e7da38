"""The single-run training loop: `train_and_evaluate(config, workdir)`.

Building the experiment (config -> typed pieces, data, model functions, train
state, shardings, evaluation of parameters) is `attnlab.experiment`'s job;
what a workdir holds about its run (config, lock, finished marker) is
`attnlab.workdir`'s; this module is the loop and what only the loop needs:
checkpoint cadence, resuming, preemption and Ctrl-C, the NaN guard.
`train_and_evaluate` reads top to bottom:

  1. Config -> `experiment.Experiment`. The data opens first, so a missing
     data set fails in seconds with the command that prepares it.
  2. Model functions, the state's shapes (`jax.eval_shape`) and shardings,
     still before anything is written. Then the workdir: one whose
     checkpoints are of another config is refused, a finished one is
     reported and left untouched, and one in use by another live run is
     refused; otherwise this run holds its lock until it ends.
  3. Checkpoints: resume from the workdir if it has one, else a fresh state
     created directly with its shardings.
  4. The train step, a pure function (state, batch) -> (state, metrics),
     jitted once with the state donated.
  5. The loop: metrics and progress, NaN guard, checkpoints, the `on_step`
     seam, preemption (SIGTERM, Ctrl-C, or Orbax's multi-host sync point).
  6. Final evaluation on the evaluation split; the run is marked finished.
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
from attnlab import data as data_lib
from attnlab import experiment
from attnlab import metrics as metrics_lib
from attnlab import model_fns
from attnlab import optim as optim_lib
from attnlab import placement
from attnlab import sharding as sharding_lib
from attnlab import workdir as workdir_lib

# Called after each step's checkpoint decision with (step, state). The state
# is valid during the call only: the next step donates its buffers.
OnStep = Callable[[int, model_fns.TrainState], None]

# Exit statuses of a run stopped by a signal after saving: 128 + the signal
# number, as a shell reports a process killed by it.
EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT,
              "Preemption sync point": 128 + signal.SIGTERM}


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
    {"step", "eval_loss", "eval_accuracy", "train_seconds", "workdir",
    "checkpoint_dir", "already_finished"}. For a workdir whose run had already
    finished: its recorded summary with "already_finished": True, after one
    line on stderr; nothing is trained or written.

  Raises:
    DatasetNotPreparedError: the data set is missing (before any training).
    ConfigError, ValueError: an invalid config, or a workdir whose checkpoints
      were trained under another config.
    WorkdirLockedError: another live process is running in `workdir`; the
      message names it (pid, host). Nothing was written.
    FloatingPointError: the loss or the parameters became NaN/inf; the message
      names the step, and no checkpoint is written after it.
    SystemExit(143): preempted (SIGTERM, or every host reached Orbax's
      preemption sync point); a checkpoint of the last step was written first.
    SystemExit(130): Ctrl-C (SIGINT), handled as SIGTERM.
  """
  # 1. Config -> typed experiment (the data opens first: fail fast).
  # 2. Model functions, state shapes and shardings (a mesh that does not fit the devices, or a
  # batch its data axes cannot split, fails here, before any file is written); then the workdir.
  exp = experiment.load(config)
  fns = exp.fns()
  abstract_state = placement.abstract_state(fns, exp.trainer.seed)
  shard = placement.shardings(exp.trainer, abstract_state)
  # Read-only first, so that rerunning a finished run writes nothing, not even the lock.
  if (finished := _finished_run(config, workdir)) is not None:
    return finished
  with workdir_lib.run_protocol(config, workdir, keep_finished=True) as run:
    # Asked again under the lock: another run may have finished in between.
    if run.finished is not None:
      return _already_finished(run.finished, workdir)
    summary = _train(exp, fns, abstract_state, shard, workdir, on_step)
    run.finish(summary)
  return _with_paths(summary, workdir, already_finished=False)


def _train(exp: experiment.Experiment, fns: model_fns.ModelFns, abstract_state: Any,
           shard: sharding_lib.Shardings, workdir: str, on_step: OnStep | None) -> dict[str, Any]:
  """Sections 3-6 of `train_and_evaluate`, in a workdir this process holds; the final summary."""
  trainer = exp.trainer

  # 3. Checkpoints: resume or start.
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=trainer.keep_checkpoints,
                                     every_steps=trainer.checkpoint_every_steps)
  # Each process reads only the rows of every batch that its devices hold.
  rows = sharding_lib.process_rows(shard.batch, trainer.batch_size)
  batches = data_lib.train_batches(exp.datasets, batch_size=trainer.batch_size,
                                   num_steps=exp.num_steps, seed=trainer.seed, rows=rows)
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(
        checkpoint_lib.with_shardings(abstract_state, shard.state))
    _say(f"Resuming from step {start} in {checkpoint_lib.checkpoint_dir(workdir)}")
  else:
    state = placement.create_state(fns, trainer.seed, shard)
    data_state, start = None, 0
  data_iter = data_lib.train_iterator(batches, data_state)

  # 4. The jitted steps (the train state is donated: updated in place).
  train_step = placement.jit_train_step(fns, shard)
  eval_step = placement.jit_eval_step(fns, shard)

  def evaluate(params) -> dict[str, float]:
    return placement.evaluate_params(eval_step, params, exp.datasets.eval,
                                      batch_size=trainer.eval_batch_size,
                                      batch_sharding=shard.batch)

  # 5. The loop. The writer closes on every way out (a NaN, a signal, an
  # error), so no half-closed TensorBoard writer reports at interpreter exit.
  with _metric_writer(workdir, start) as writer:
    log = _TrainLog(writer, exp, start)
    loop_start = time.perf_counter()
    try:
      with _Preemption(ckpt) as preemption:
        for step in range(start + 1, exp.num_steps + 1):
          batch = sharding_lib.put_batch(next(data_iter), shard.batch, trainer.batch_size)
          state, step_metrics = train_step(state, batch)
          log.add(step, step_metrics)
          must_save = ckpt.should_save(step) or step == exp.num_steps
          if step % trainer.log_every_steps == 0 or must_save or step == start + 1:
            log.sync(step)  # the only host sync: every pending step is checked before a checkpoint
            ckpt.check()  # a save that failed in the background stops the run here, not a save later
          if (trainer.eval_every_steps and step % trainer.eval_every_steps == 0
              and step != exp.num_steps):
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
            _say(f"{preemption.cause}: saved a checkpoint at step {step} in "
                 f"{checkpoint_lib.checkpoint_dir(workdir)}; exiting.")
            raise SystemExit(EXIT_CODES[preemption.cause])
    finally:
      log.close()
      ckpt.close()  # waits for checkpoints in flight (all of them finite)
    train_seconds = time.perf_counter() - loop_start

    # 6. Final evaluation (the protocol writes the finished marker after it).
    final_step = int(jax.device_get(state.step))
    result = evaluate(state.params)
    writer.write(final_step, "eval", _prefixed(result))
  return {"step": final_step, "eval_loss": result["loss"],
          "eval_accuracy": result["accuracy"], "train_seconds": train_seconds}


# ----------------------------------------------------------------------------
# The workdir: finished runs and the lock.
# ----------------------------------------------------------------------------


def _finished_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The recorded summary if `workdir` holds this config's finished run (saying so), else None.

  Raises:
    ConfigError: the workdir's checkpoints are of another config.
  """
  workdir_lib.check_same_run(config, workdir)
  finished = workdir_lib.read_finished(workdir)
  return None if finished is None else _already_finished(finished, workdir)


def _already_finished(finished: dict[str, Any], workdir: str) -> dict[str, Any]:
  """The summary a finished run recorded, as `train_and_evaluate` returns it, saying so."""
  _say(f"{os.path.abspath(workdir)} holds a finished run: step {finished['step']}, eval accuracy "
       f"{finished['eval_accuracy']:.2%} (loss {finished['eval_loss']:.4f}); nothing to do. "
       "To train again, use a new --workdir.")
  return _with_paths(finished, workdir, already_finished=True)


def _with_paths(summary: dict[str, Any], workdir: str, *, already_finished: bool) -> dict[str, Any]:
  return {**summary, "workdir": os.path.abspath(workdir),
          "checkpoint_dir": checkpoint_lib.checkpoint_dir(workdir),
          "already_finished": already_finished}


# ----------------------------------------------------------------------------
# Several processes: one writes the run's files.
# ----------------------------------------------------------------------------


def _say(message: str) -> None:
  """One line on stderr, from process 0 only."""
  if workdir_lib.writes_files():
    print(message, file=sys.stderr, flush=True)


class _NoMetrics:
  """The metric writer of processes other than 0: writes nothing."""

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    del step, split, values

  def __enter__(self) -> _NoMetrics:
    return self

  def __exit__(self, *exc) -> bool:
    return False


def _metric_writer(workdir: str, start: int) -> metrics_lib.MetricWriter | _NoMetrics:
  if not workdir_lib.writes_files():
    return _NoMetrics()
  return metrics_lib.MetricWriter(workdir, resume_step=start)


# ----------------------------------------------------------------------------
# Training metrics and the NaN guard.
# ----------------------------------------------------------------------------


class _TrainLog:
  """Step metrics kept on the device until a sync, then NaN-checked, written and shown."""

  def __init__(self, writer: metrics_lib.MetricWriter, exp: experiment.Experiment, start: int):
    self._writer, self._num_steps, self._optim = writer, exp.num_steps, exp.optim
    self._batch_size, self._log_every = exp.trainer.batch_size, exp.trainer.log_every_steps
    self._progress = metrics_lib.Progress(exp.num_steps, start,
                                          enabled=exp.trainer.progress_bar and workdir_lib.writes_files(),
                                          log_every=self._log_every)
    self._pending: list[tuple[int, dict]] = []  # device metrics not yet checked for NaN
    self._last_log = (start, time.perf_counter())

  def add(self, step: int, step_metrics: dict) -> None:
    self._pending.append((step, step_metrics))

  def check_finite(self) -> dict[str, float]:
    """Fetches the pending steps' metrics (raising on NaN); returns the last step's."""
    values = _check_finite(self._pending, self._optim)
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


def _check_finite(pending: list[tuple[int, dict]], optim_cfg: optim_lib.OptimConfig
                  ) -> dict[str, float]:
  """Fetches pending step metrics; raises on the first non-finite one; returns the last."""
  if not pending:
    return {}
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), values in zip(pending, fetched):
    if not bool(values["finite"]):
      raise FloatingPointError(
          f"Non-finite training loss or parameters at step {step} (loss={float(values['loss'])}, "
          f"grad_norm={float(values['grad_norm'])}, learning_rate={float(values['learning_rate'])})."
          f" No checkpoint was written after the last finite step. {_nan_advice(optim_cfg)}"
      )
  return {k: float(v) for k, v in fetched[-1].items() if k != "finite"}


def _nan_advice(optim_cfg: optim_lib.OptimConfig) -> str:
  """What to change after a NaN: clipping only if it is off; always a new workdir."""
  # The workdir's checkpoints refuse a changed config (workdir.check_same_run).
  where = "in a new --workdir (this one refuses a changed config)"
  lr = f"config.optim.learning_rate (now {optim_cfg.learning_rate:g})"
  if optim_cfg.grad_clip_norm is None:
    return (f"Gradient clipping is off: set config.optim.grad_clip_norm (e.g. 1.0) or lower "
            f"{lr}, {where}.")
  return (f"Gradient clipping is already on (config.optim.grad_clip_norm="
          f"{optim_cfg.grad_clip_norm:g}): lower {lr} {where}.")


def _prefixed(values: dict[str, float]) -> dict[str, float]:
  return {f"eval_{k}": v for k, v in values.items()}


# ----------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------


class _Preemption:
  """When a preempted or interrupted run saves and stops: at the end of the step in flight.

  One process: SIGTERM and SIGINT (Ctrl-C) handlers (main thread only)
  record the notice instead of dying at once; a second Ctrl-C interrupts at
  once, as usual, for a user who will not wait for the save. Several processes
  (jax.distributed): JAX's preemption service owns SIGTERM and passes the
  notice to every host, and Orbax's `reached_preemption(step)` turns True at
  the same step on all of them, so every host saves that one step (a
  checkpoint is a collective write). Our own handlers would replace JAX's and
  save on one host only there, so they are only installed in one process.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, ckpt: checkpoint_lib.Checkpointer):
    self._ckpt = ckpt
    self.cause: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _Preemption:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.cause = self.cause or signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def reached(self, step: int) -> bool:
    """Whether to save and exit after `step`. Call it at every step (Orbax's sync needs that)."""
    if self._ckpt.reached_preemption(step):
      self.cause = self.cause or "Preemption sync point"
    return self.cause is not None

  def __exit__(self, *exc) -> bool:
    for signum, previous in self._previous.items():
      # A handler installed outside Python reads back as None: restore the default.
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    return False
