"""Orbax checkpoints of the train state and the data iterator (nanodo style).

A checkpoint at step s holds two items: "state" (the `TrainState` pytree:
step, params, optimizer state, rng) and "data" (the data iterator's JSON
state), so a resumed run continues with the very batch it would have seen.
Restoring takes an abstract target (`jax.eval_shape` of the current model and
optimizer, with the current shardings), so a checkpoint written on another
machine or device count loads onto this one.

Failures are one line, never a wall of Orbax tracebacks:

* Writing. Orbax writes in background threads, so a failed write (full or
  read-only disk) is only known when it ends. `Checkpointer` looks at the
  previous save's outcome at the next `save`, `check`, `wait` and `close` and
  raises `CheckpointWriteError` (an `OSError`) naming the directory and the
  OS error; the checkpoints already finished stay as they were. Step
  directories are created synchronously, so an unwritable directory fails in
  `save` itself (created in the background, its failure left Orbax's other
  threads waiting 300 s for a signal that never came).
* Reading. Once a save has finished, a digest manifest (`DIGEST_FILE`: size and
  sha256 of every file of the step) is written into its directory; `restore`
  checks it, so bytes changed on disk are found rather than loaded. The latest
  checkpoint that is damaged (digest mismatch, or no manifest and Orbax cannot
  read it) is skipped with a one-line warning for the one before it; when none
  restores, or an explicitly requested step is damaged,
  `CheckpointDamagedError` names the directory to delete. Restoring changes
  nothing on disk; a run that fell back replaces the damaged step when it
  saves that step again.
* Orbax's own error logs and the stray tracebacks its threads and coroutines
  leave after a failure repeat the error raised here, so they are hidden
  unless absl logs at INFO (`--verbosity=0`).
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import re
import sys
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from attnlab import fileio

# Written into each finished step directory; its absence means "unverified"
# (a checkpoint of an older attnlab, or a process killed before the manifest).
DIGEST_FILE = "attnlab_digest.json"
_DIGEST_FORMAT = 1
_CHUNK_BYTES = 1 << 20


class CheckpointError(Exception):
  """Base class of the checkpoint failures that a command line reports in one line."""


class CheckpointWriteError(CheckpointError, OSError):
  """A checkpoint could not be written (disk full, directory not writable, ...).

  `errno` is the OS error's number where one is known.
  """


class CheckpointDamagedError(CheckpointError):
  """A checkpoint on disk cannot be restored: files changed, truncated or missing.

  Attributes:
    directory: the damaged step directory (None: every step is damaged).
    step: its step.
    reason: what is wrong with it, one line.
  """

  def __init__(self, message: str, *, directory: str | None = None, step: int | None = None,
               reason: str | None = None):
    super().__init__(message)
    self.directory, self.step, self.reason = directory, step, reason


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves every `every_steps` steps (and on request), keeps the last `keep`."""

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int | None = None):
    self.every_steps = every_steps
    self._directory = checkpoint_dir(workdir)
    _quiet_orbax_failures()
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # Synchronous step directories: see the module docstring.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
        item_names=("state", "data"),
    )
    self._pending: int | None = None  # the step whose save may still be in flight
    # The write error raised, if any: later saves raise it again; close() stays quiet.
    self._error: Exception | None = None
    self._skipped: set[int] = set()  # damaged steps `restore` passed over

  @staticmethod
  def exists(workdir: str) -> bool:
    """Whether `workdir` holds at least one finished checkpoint (without creating anything)."""
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self._directory, str(step))

  def should_save(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def reached_preemption(self, step: int) -> bool:
    """Whether every host of a preempted multi-host run has reached its save step.

    Orbax's view of JAX's preemption sync point: after a preemption notice
    reaches any host, this turns True at the same step on every host, so all
    of them save that step. Always False in a single process. Call it at every
    step (the sync protocol counts on it).
    """
    try:
      return bool(self._manager.reached_preemption(step))
    except RuntimeError:
      # The preemption service is off (jax_enable_preemption_service=False):
      # no sync point. Orbax >= 0.12 returns False itself; 0.11 lets JAX's
      # error through.
      return False

  # --------------------------------------------------------------------------
  # Writing.
  # --------------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None) -> None:
    """Starts writing a checkpoint of `state` at `step` (asynchronously: call `wait`).

    A damaged step that `restore` skipped is replaced: the run is redoing it.

    Raises:
      CheckpointWriteError: this save or the previous one could not be written.
    """
    self._finish()
    self._pending = step
    try:
      for stale in sorted(s for s in self._skipped if s >= step):
        self._manager.delete(stale)
        self._skipped.discard(stale)
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
          ),
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(e) from e

  def check(self) -> None:
    """Raises now if a save that has ended in the background failed; never blocks.

    Cheap enough for every log step: a full disk then stops the run within a
    log interval rather than at the next checkpoint.
    """
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish()

  def wait(self) -> None:
    """Blocks until the save in flight is on disk (with its digest manifest)."""
    self._finish()

  def close(self) -> None:
    """Waits for the save in flight and releases Orbax's threads.

    After a write error has been raised, closes without waiting on or
    re-raising what the failed save's threads left behind (train.py calls this
    in a `finally` around the save that raised).
    """
    failed_before = self._error is not None
    try:
      if not failed_before:
        self._finish()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-exception-caught
        if self._error is None:
          raise self._write_error(e) from e

  def _finish(self) -> None:
    """Waits for the pending save; raises its error, else writes its digest manifest."""
    if self._error is not None:
      raise self._error
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(e, "the checkpoint") from e
    if self._pending is not None and jax.process_index() == 0:
      try:
        _write_manifest(self.step_dir(self._pending))
      except OSError as e:
        raise self._write_error(e, "the digest manifest") from e
    self._pending = None

  def _write_error(self, e: Exception, what: str = "the checkpoint") -> Exception:
    """`e` as a one-line CheckpointWriteError when it is an OS error; `e` itself otherwise."""
    number, reason = _os_error(e)
    if reason is None:
      self._error = e
      return e
    saved = [s for s in self.all_steps() if s != self._pending]
    kept = f"steps {saved} there are intact" if saved else "no earlier checkpoint there"
    error = CheckpointWriteError(
        f"Could not write {what} of step {self._pending} in {self._directory}: {reason}. The run"
        f" stopped ({kept}); free space or make the directory writable, then rerun to resume.")
    error.errno = number
    self._error = error
    return error

  # --------------------------------------------------------------------------
  # Reading.
  # --------------------------------------------------------------------------

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """Restores (state, data_state, step) from `step` or the latest checkpoint that restores.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct (with `.sharding` where
        placement matters) describing the state to restore into.
      step: a saved step; None: the latest, or, if it is damaged, the newest
        one before it that is not (a warning line names each one skipped).

    Raises:
      FileNotFoundError: no checkpoint (at that step).
      CheckpointDamagedError: `step` is damaged, or (step None) every checkpoint is.
    """
    if self._error is None:
      self.wait()  # a save of this process in flight is the latest
    steps = self.all_steps()
    if step is not None and step in steps:
      return self._restore_step(abstract_state, step)
    if not steps or step is not None:
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' at step {step}'} in "
          f"{self._directory}; saved steps: {steps or 'none'}."
      )
    damaged: list[CheckpointDamagedError] = []
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(abstract_state, candidate)
      except CheckpointDamagedError as e:
        damaged.append(e)
        continue
      # Warned only now, so that a run with no restorable step prints one line.
      for e in damaged:
        logging.warning("Checkpoint %s is damaged (%s); restored step %d instead.",
                        e.directory, e.reason, candidate)
        self._skipped.add(e.step)
      return restored
    reasons = "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
    raise CheckpointDamagedError(
        f"No checkpoint in {self._directory} can be restored ({reasons}). Delete "
        f"{self._directory} to start the run from scratch, or move it aside to keep the files.")

  def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict[str, Any], int]:
    directory = self.step_dir(step)
    verified, reason = _verify_manifest(directory)
    if reason is None:
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["data"] or {}), step
      except Exception as e:  # pylint: disable=broad-exception-caught
        if verified:
          raise  # the files are as saved: not damage (e.g. a target of another shape)
        reason = f"Orbax cannot read it: {_one_line(e)}"
    raise CheckpointDamagedError(
        f"The checkpoint {directory} is damaged: {reason}. Delete {directory}, or restore another "
        f"step (saved: {self.all_steps()}).", directory=directory, step=step, reason=reason)


# ----------------------------------------------------------------------------
# Digest manifests.
# ----------------------------------------------------------------------------


def _file_digests(directory: str) -> dict[str, dict[str, Any]]:
  """{relative path: {"size", "sha256"}} of every file under `directory` but the manifest."""
  digests = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == DIGEST_FILE or rel.startswith(DIGEST_FILE + "."):
        continue
      digests[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
  return dict(sorted(digests.items()))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def _write_manifest(directory: str) -> None:
  """Writes `directory`/DIGEST_FILE atomically (a killed process leaves none, never half of one)."""
  manifest = {"format": _DIGEST_FORMAT, "files": _file_digests(directory)}
  fileio.write_atomic(os.path.join(directory, DIGEST_FILE), json.dumps(manifest, indent=1), fsync=True)


def _verify_manifest(directory: str) -> tuple[bool, str | None]:
  """(whether a manifest was checked, what differs from it or None).

  Files that are not in the manifest are let be: they cannot change what the
  recorded ones hold.
  """
  path = os.path.join(directory, DIGEST_FILE)
  if not os.path.exists(path):
    return False, None
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return True, f"its digest manifest {path} is unreadable ({_one_line(e)})"
  for rel, expected in recorded.items():
    file = os.path.join(directory, rel)
    if not os.path.isfile(file):
      return True, f"{file} is missing"
    size = os.path.getsize(file)
    if size != expected["size"]:
      return True, f"{file} holds {size} bytes, {expected['size']} when saved"
    if _sha256(file) != expected["sha256"]:
      return True, f"{file} differs from what was saved (sha256 mismatch)"
  return True, None


# ----------------------------------------------------------------------------
# One-line errors.
# ----------------------------------------------------------------------------


def _os_error(e: BaseException) -> tuple[int | None, str | None]:
  """(errno, "[Errno n] text") of the OS error behind `e`, or (None, None) if none is.

  Orbax raises Python's OSError, or TensorStore's ValueError that carries the
  OS error's number as `os_error_code='n'`.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e.errno, f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
    if match := re.search(r"os_error_code='(\d+)'", str(e)):
      number = int(match.group(1))
      return number, f"[Errno {number}] {os.strerror(number)}"
    e = _cause(e)
  return None, None


def _cause(e: BaseException) -> BaseException | None:
  """The exception `e` was raised from or while handling, as a traceback would show it."""
  return e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def _one_line(e: BaseException, limit: int = 300) -> str:
  """The root cause of `e` as "Type: message" on one line, at most `limit` characters.

  The root, because Orbax wraps TensorStore's precise error ("OUT_OF_RANGE:
  ... byte range [0, 2291) is not valid for value of size 1278") in one that
  dumps the whole TensorStore spec.
  """
  seen = {id(e)}
  while (inner := _cause(e)) is not None and id(inner) not in seen:
    seen.add(id(inner))
    e = inner
  message = str(e).split(" [tensorstore_spec=")[0]
  message = " ".join(f"{type(e).__name__}: {message}".split())
  return message if len(message) <= limit else message[:limit - 3] + "..."


_ORBAX_PATH = f"{os.sep}orbax{os.sep}"


class _OrbaxErrorLogFilter(std_logging.Filter):
  """Drops ERROR records about Orbax's failed reads and writes unless absl logs INFO.

  Orbax's own (absl logger), and asyncio's about an Orbax task that failed
  while its event loop shut down (Orbax 0.11). Each repeats an error that
  `Checkpointer` raises or warns of itself, in one line, with the original
  chained; `--verbosity=0` shows them again.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    about_orbax = _ORBAX_PATH in record.pathname or (
        record.name == "asyncio" and _ORBAX_PATH in record.getMessage())
    return not (about_orbax and record.levelno >= std_logging.ERROR
                and logging.get_verbosity() < logging.INFO)


def _quiet_orbax_failures() -> None:
  """Installs `_OrbaxErrorLogFilter` and `_drop_orbax_unraisables` (once per process)."""
  for name in ("absl", "asyncio"):
    logger = std_logging.getLogger(name)
    if not any(isinstance(f, _OrbaxErrorLogFilter) for f in logger.filters):
      logger.addFilter(_OrbaxErrorLogFilter())
  if getattr(sys.unraisablehook, "__name__", "") != _drop_orbax_unraisables.__name__:
    _drop_orbax_unraisables.previous = sys.unraisablehook
    sys.unraisablehook = _drop_orbax_unraisables


def _drop_orbax_unraisables(unraisable: Any) -> None:
  """Drops the stray tracebacks a failed Orbax read or write leaves; passes on the rest.

  When one of a save's or restore's concurrent operations fails, Orbax closes
  the others' coroutines and event loop while TensorStore still completes into
  them: each is an "unraisable" error printed as a traceback after the one
  error that `Checkpointer` reports. Shown again with absl verbosity INFO.
  """
  closed_loop = (unraisable.exc_type is RuntimeError
                 and str(unraisable.exc_value) == "Event loop is closed")
  code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
  orbax_coroutine = code is not None and _ORBAX_PATH in code.co_filename
  if not (closed_loop or orbax_coroutine) or logging.get_verbosity() >= logging.INFO:
    _drop_orbax_unraisables.previous(unraisable)


def with_shardings(abstract: Any, shardings: Any = None) -> Any:
  """`abstract` (ShapeDtypeStructs) with `shardings`, default: all on the first local device.

  Orbax restores each array onto the sharding of its target, so this is what
  makes a checkpoint from another topology load here.
  """
  if shardings is None:
    device = jax.local_devices()[0]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
