"""What a run directory holds about its run, and who may use it.

A workdir belongs to one run:
  config.json    which config trained the checkpoints next to it:
                 `check_same_run` refuses a config that would train something
                 else from them (`train.py` and `eval.py` both ask it);
  .lock          held (flock) by the one live run: `WorkdirLock`;
  finished.json  written last, with the final summary: `read_finished`.

`run_protocol` is the one way a run (the single run, the study, the synthetic
study) takes a workdir: lock, same-run check, config, work, finished record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections

from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib
from attnlab import fileio

CONFIG_FILE = "config.json"


def check_same_run(config: ml_collections.ConfigDict, workdir: str, *,
                   trained: bool | None = None) -> None:
  """Refuses a workdir whose checkpoints were trained under another config.

  Fields that only change how a run is watched or stored
  (`configlib.RUN_NEUTRAL_FIELDS`: log and checkpoint cadence, ...) may differ.
  A workdir without config.json or without a finished checkpoint passes:
  there is nothing to resume.

  Args:
    config: the config about to train or evaluate in `workdir`.
    workdir: the run directory (not created here).
    trained: whether the workdir holds anything trained under its config;
      None: whether it holds a checkpoint (a single run's).

  Raises:
    configlib.ConfigError: the saved config differs in fields that change what
      is trained; the message names them, both values, and the fix.
  """
  saved = _saved_config(workdir)
  if trained is None:
    trained = checkpoint_lib.Checkpointer.exists(workdir)
  if saved is None or not trained:
    return
  current = _flat_json(config)
  differ = sorted(configlib.training_differences(current, saved))
  if differ:
    raise configlib.ConfigError(
        f"{workdir} holds checkpoints of a run with another config (fields {differ} differ: "
        f"{[(saved.get(k), current.get(k)) for k in differ]}). Use a new --workdir, or the "
        "run's own config to resume it."
    )


def _saved_config(workdir: str) -> dict | None:
  """<workdir>/config.json flattened by dotted path; None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return configlib.flatten(json.load(f))


def _flat_json(config: ml_collections.ConfigDict) -> dict:
  # Through JSON, as config.json was written, so that tuples and lists compare equal.
  return configlib.flatten(json.loads(config.to_json_best_effort()))


# ----------------------------------------------------------------------------
# One live run per workdir.
# ----------------------------------------------------------------------------

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock; the message names it (one line)."""


class WorkdirLock:
  """An exclusive lock on <workdir>/.lock, held by the live process for a whole run.

  The lock is `fcntl.flock` on an open file, not the file's existence: the OS
  releases it when the process exits in any way (SIGKILL and power loss
  included), so a lock file left by a killed run is simply taken over, with
  no pid guessing and no stale-lock timeout. The file itself is never removed
  (removing it while another process waits on the old one would let two runs
  hold "the" lock); it only records the holder (pid, host, start time) for the
  message a second run prints.

  NFS: Linux emulates flock with NFS byte-range locks (NFSv4, or v3 with the
  lock daemon), so it holds across hosts there; on a mount with `nolock` or a
  file system without locking it is only enforced within one host. Multi-host
  runs (jax.distributed) share one workdir: only process 0 takes the lock.

  Use as a context manager; `acquire` raises WorkdirLockedError at once
  (never waits) if another process holds it.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Creates the workdir if needed and takes the lock, or raises WorkdirLockedError."""
    os.makedirs(self.workdir, exist_ok=True)
    # os.open's descriptors are not inherited by child processes, so a child
    # cannot keep the lock alive after this process dies.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirLockedError(
          f"{self.workdir} is in use by another run ({holder}); wait for it to end or stop it, "
          "or use another --workdir.") from None
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    _write_holder(fd)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


# ----------------------------------------------------------------------------
# Several processes (jax.distributed) share one workdir: one writes its files.
# ----------------------------------------------------------------------------


def writes_files() -> bool:
  """Whether this process writes the run's files (config, metrics, records, report) and messages.

  Process 0 of several (they share the workdir); checkpoints are written by
  every process (each its shards: `checkpoint.Checkpointer`).
  """
  return jax.process_index() == 0


def lock(workdir: str) -> contextlib.AbstractContextManager:
  """The workdir's `WorkdirLock`; in a multi-host run only process 0 takes it (they share it)."""
  if not writes_files():
    return contextlib.nullcontext()
  return WorkdirLock(workdir)


def _write_holder(fd: int) -> None:
  record = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
  """'pid 123 on host-a, started ...' from the lock file, as far as it says."""
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    record = {}
  if "pid" not in record:
    # The holder has the lock but has not written its name yet (it is starting).
    return "a process that is starting"
  return (f"pid {record['pid']} on {record.get('host', 'an unknown host')}, "
          f"started {record.get('started', 'at an unknown time')}")


# ----------------------------------------------------------------------------
# A finished run.
# ----------------------------------------------------------------------------

FINISHED_FILE = "finished.json"


def write_finished(workdir: str, summary: dict[str, Any]) -> None:
  """Marks the run finished: <workdir>/finished.json with its final summary, written last.

  A marker file rather than "metrics.jsonl ends with the final evaluation":
  it is one small file written atomically (a reader sees all of it or none),
  and a run killed before it (e.g. during the final evaluation) has none, so a
  rerun completes that run instead of calling it finished.
  """
  fileio.write_atomic(os.path.join(workdir, FINISHED_FILE), json.dumps(summary, indent=2) + "\n")


def read_finished(workdir: str) -> dict[str, Any] | None:
  """The summary `write_finished` recorded, or None if the run has not finished."""
  path = os.path.join(workdir, FINISHED_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """<workdir>/config.json: what `check_same_run` compares a later run's config with.

  Written atomically, so that a run checking the workdir at that moment never
  reads half a file.
  """
  fileio.write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


# ----------------------------------------------------------------------------
# The run protocol: lock, same-run check, config, work, finished record.
# ----------------------------------------------------------------------------


class Run:
  """The workdir a body of `run_protocol` holds.

  Attributes:
    workdir: the run directory.
    finished: the summary of the finished run `run_protocol(keep_finished=True)`
      found there (the body returns it and does nothing); None otherwise.
  """

  def __init__(self, workdir: str, finished: dict[str, Any] | None):
    self.workdir = workdir
    self.finished = finished
    self.summary: dict[str, Any] | None = None

  def finish(self, summary: dict[str, Any]) -> None:
    """Sets the summary that finished.json records once the body has ended without an error."""
    self.summary = summary


@contextlib.contextmanager
def run_protocol(config: ml_collections.ConfigDict, workdir: str, *,
                 trained: Callable[[], bool] | None = None,
                 keep_finished: bool = False) -> Iterator[Run]:
  """Holds `workdir` for one run of `config`; the body does the work and calls `run.finish`.

  On entry, under the workdir's `lock` (process 0's, in a multi-host run): the
  workdir must hold this config's run or nothing (`check_same_run`, asked
  under the lock so no other run changes the answer in between); then process
  0 writes config.json. On a clean exit process 0 writes finished.json, last.
  An exception (an error, a NaN, a preemption's SystemExit) leaves the workdir
  as it is: every checkpoint and cell record already written stays for the
  rerun to resume from, and no finished record is written.

  Args:
    config: the config about to run.
    workdir: the run directory (created if missing).
    trained: asked under the lock: whether the workdir holds anything trained
      under its config.json; None: whether it holds a checkpoint (a single run's).
    keep_finished: a finished run is left as it is: nothing is written and
      `run.finished` holds its summary. False: the body runs again (a study
      re-renders its report from its records).

  Raises:
    configlib.ConfigError: the workdir holds a run of another config.
    WorkdirLockedError: another live process holds the workdir.
    RuntimeError: the body ended without `run.finish` (a bug: the record would be lost).
  """
  os.makedirs(workdir, exist_ok=True)
  with lock(workdir):
    check_same_run(config, workdir, trained=None if trained is None else trained())
    finished = read_finished(workdir) if keep_finished else None
    if finished is None and writes_files():
      write_config(config, workdir)
    run = Run(workdir, finished)
    yield run
    if finished is not None:
      return
    if run.summary is None:
      raise RuntimeError(f"the run in {workdir} ended without run.finish(summary), so it has no "
                         "finished record; call run.finish with the run's summary.")
    if writes_files():
      write_finished(workdir, run.summary)
