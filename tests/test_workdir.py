"""attnlab.workdir: the same-run check, the lock and the finished marker, without training.

The end-to-end versions (two runs, a finished rerun) are in tests/test_train.py.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from attnlab import configlib
from attnlab import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec="digits_vit.py:sigmoid,quick"):
  return configlib.load(f"configs/{spec}")


def _fake_run(path, config):
  """A workdir with config.json and one finished checkpoint directory (step 2)."""
  os.makedirs(os.path.join(path, "checkpoints", "2"))
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))


def test_check_same_run_refuses_another_config_naming_the_fields(tmp_path):
  _fake_run(str(tmp_path), _config())
  with pytest.raises(configlib.ConfigError) as err:
    workdir_lib.check_same_run(_config("digits_vit.py:softmax,quick"), str(tmp_path))
  message = str(err.value)
  assert "\n" not in message
  assert "another config (fields ['model.attention'] differ" in message
  assert "Use a new --workdir" in message


def test_check_same_run_allows_run_neutral_fields_and_empty_workdirs(tmp_path):
  config = _config()
  _fake_run(str(tmp_path / "run"), config)
  config.log_every_steps = 1  # how a run is watched, not what it trains
  workdir_lib.check_same_run(config, str(tmp_path / "run"))
  # Nothing to resume: no workdir, or config.json without checkpoints. Nothing is created.
  workdir_lib.check_same_run(_config("digits_vit.py:softmax,quick"), str(tmp_path / "none"))
  assert not os.path.exists(tmp_path / "none")
  os.makedirs(tmp_path / "fresh")
  with open(tmp_path / "fresh" / "config.json", "w", encoding="utf-8") as f:
    json.dump(configlib.flatten(config), f)
  workdir_lib.check_same_run(_config("digits_vit.py:softmax,quick"), str(tmp_path / "fresh"))


# ----------------------------------------------------------------------------
# The workdir lock
# ----------------------------------------------------------------------------

# Takes the lock on argv[1], says so, and holds it until killed.
_HOLDER = r"""
import sys, time
from attnlab import workdir
lock = workdir.WorkdirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold(path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, path], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_held_lock_refuses_at_once_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
    tmp_path):
  workdir = str(tmp_path / "run")
  holder = _hold(workdir)
  try:
    start = time.monotonic()
    with pytest.raises(workdir_lib.WorkdirLockedError) as err:
      workdir_lib.WorkdirLock(workdir).acquire()
    assert time.monotonic() - start < 1.0  # no waiting
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{workdir} is in use by another run (pid {holder.pid} on "
                              f"{socket.gethostname()}, started ")
    assert message.endswith("; wait for it to end or stop it, or use another --workdir.")
  finally:
    holder.kill()
    holder.wait()
  assert holder.returncode == -signal.SIGKILL
  # The killed holder's file is still there, naming it; its lock died with it.
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), encoding="utf-8") as f:
    assert json.load(f)["pid"] == holder.pid
  with workdir_lib.WorkdirLock(workdir):
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE), encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()
    # Within one process too: a second holder is refused.
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {os.getpid()} on "):
      workdir_lib.WorkdirLock(workdir).acquire()
  with workdir_lib.WorkdirLock(workdir):  # released on exit
    pass


def test_a_holder_that_has_not_written_its_name_yet_is_described(tmp_path):
  workdir = str(tmp_path)
  fd = os.open(os.path.join(workdir, workdir_lib.LOCK_FILE), os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # locked, the file still empty
    with pytest.raises(workdir_lib.WorkdirLockedError, match=r"\(a process that is starting\)"):
      workdir_lib.WorkdirLock(workdir).acquire()
  finally:
    os.close(fd)


def test_finished_marker_round_trips_and_config_is_written_whole(tmp_path):
  assert workdir_lib.read_finished(str(tmp_path)) is None
  summary = {"step": 8, "eval_loss": 2.25, "eval_accuracy": 0.125, "train_seconds": 1.5}
  workdir_lib.write_finished(str(tmp_path), summary)
  assert workdir_lib.read_finished(str(tmp_path)) == summary
  workdir_lib.write_config(_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "finished.json"]  # no temporary left


def test_run_protocol_writes_config_then_finished_and_releases_the_lock(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lib.run_protocol(_config(), workdir) as run:
    assert os.path.exists(os.path.join(workdir, "config.json"))
    with pytest.raises(workdir_lib.WorkdirLockedError):  # held for the whole body
      workdir_lib.WorkdirLock(workdir).acquire()
    assert workdir_lib.read_finished(workdir) is None
    run.finish({"step": 1})
  assert workdir_lib.read_finished(workdir) == {"step": 1}
  workdir_lib.WorkdirLock(workdir).acquire()  # released on the way out


def test_run_protocol_crash_keeps_what_was_written_and_writes_no_finished_record(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(SystemExit):  # e.g. a preemption after a checkpoint
    with workdir_lib.run_protocol(_config(), workdir) as run:
      _fake_run(workdir, _config())
      run.finish({"step": 2})
      raise SystemExit(143)
  assert workdir_lib.read_finished(workdir) is None
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  # The rerun resumes under the same config, and another config is refused.
  with pytest.raises(configlib.ConfigError, match="another config"):
    with workdir_lib.run_protocol(_config("digits_vit.py:softmax,quick"), workdir):
      pass
  with workdir_lib.run_protocol(_config(), workdir) as run:
    run.finish({"step": 4})
  assert workdir_lib.read_finished(workdir) == {"step": 4}


def test_run_protocol_keep_finished_writes_nothing_and_a_body_must_finish(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  workdir_lib.write_finished(workdir, {"step": 3})
  with workdir_lib.run_protocol(_config(), workdir, keep_finished=True) as run:
    assert run.finished == {"step": 3}
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  with pytest.raises(RuntimeError, match=r"without run\.finish"):
    with workdir_lib.run_protocol(_config(), str(tmp_path / "other")):
      pass
  assert workdir_lib.read_finished(str(tmp_path / "other")) is None
