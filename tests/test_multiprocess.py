"""A real multi-controller run: two processes joined by jax.distributed on 127.0.0.1.

Two child processes with 4 CPU devices each call `jax.distributed.initialize`
(gloo collectives) and train the quick ViT through `train.train_and_evaluate`,
as `train.py --jax_distributed` does: FSDP over all 8 devices (parameters split
across the processes), stopped after the checkpoint of step 2, then resumed on
a data=2 x fsdp=4 mesh (each process one data row) to the end. A third child,
one process with 8 devices, trains the same steps in one go. The two runs
must match: losses, parameters and the final evaluation. Then the pair runs
the first run again with a SIGTERM sent to process 1 alone: both must save
the same step and exit 143 (JAX's preemption service, Orbax's sync point).
"""

import os
import pickle
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from attnlab import configlib
from attnlab import experiment
from attnlab import metrics
from attnlab import sharding
from attnlab import train
from test_sharding import STATE_TOLERANCE, assert_close_to_scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/digits_vit.py:sigmoid,quick"
STEPS = 3
SAVED_AT = 2  # the quick config's checkpoint_every_steps
MESHES = {"first": {"fsdp": -1}, "resumed": {"data": 2, "fsdp": 4}}
TIMEOUT_S = 300  # a hung collective fails the test instead of hanging CI


def _config(data_dir, mesh):
  config = configlib.load(SPEC)
  config.unlock()
  config.data.data_dir = data_dir
  config.mesh = mesh
  config.total_steps = STEPS
  config.log_every_steps = 1  # every step's loss in metrics.jsonl
  config.eval_batch_size = 96  # splits 8 ways (the quick config's 100 does not)
  return config


class _Stop(Exception):
  pass


def _saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _preempted_run(data_dir, workdir):
  """The first run again, process 1 alone sent SIGTERM after step 1: (exit status, saved steps)."""
  def sigterm_process_1(step, state):
    if step == 1 and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # caught by JAX's preemption notifier

  try:
    train.train_and_evaluate(_config(data_dir, MESHES["first"]), workdir,
                             on_step=sigterm_process_1)
  except SystemExit as e:
    return e.code, _saved_steps(workdir)
  return None, _saved_steps(workdir)  # not preempted: the test says so


def _child(role, out_dir, data_dir, port):
  """One of the two processes ("0", "1") or the single 8-device process ("single")."""
  # As attnlab.cli.initialize_distributed with explicit settings.
  if role != "single":
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(role))
  jax.config.update("jax_disable_most_optimizations", True)  # compiling dominates
  assert jax.device_count() == 8, jax.devices()
  workdir = os.path.join(out_dir, "run_two" if role != "single" else "run_single")
  seen = {"process_count": jax.process_count()}

  def keep_last(step, state):
    if step == STEPS:  # fully gathered on every process (the params are split across them)
      seen["state"] = jax.experimental.multihost_utils.process_allgather(state, tiled=True)

  if role != "single":
    def stop_after_saving(step, state):
      if step == SAVED_AT:
        raise _Stop

    try:
      train.train_and_evaluate(_config(data_dir, MESHES["first"]), workdir,
                               on_step=stop_after_saving)
    except _Stop:
      pass
    seen["saved_steps"] = _saved_steps(workdir)
    config = _config(data_dir, MESHES["resumed"])
  else:
    config = _config(data_dir, MESHES["first"])
  seen["result"] = train.train_and_evaluate(config, workdir, on_step=keep_last)
  exp = experiment.load(config)  # the rows of each batch that this process read
  shard = experiment.shardings(exp.trainer, experiment.abstract_state(exp.fns(), 0))
  seen["rows"] = sharding.process_rows(shard.batch, exp.trainer.batch_size)
  seen["state"] = jax.device_get(seen["state"])
  if role != "single":
    seen["preempted"] = _preempted_run(data_dir, os.path.join(out_dir, "run_preempted"))
  with open(os.path.join(out_dir, f"{role}.pkl"), "wb") as f:
    pickle.dump(seen, f)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(role, out_dir, data_dir, port, devices):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  code = ("import sys; sys.path.insert(0, 'tests'); import test_multiprocess; "
          "test_multiprocess._child(*sys.argv[1:])")
  return subprocess.Popen([sys.executable, "-c", code, role, out_dir, data_dir, str(port)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("multiprocess"))
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  experiment.load(_config(data_dir, {}))  # prepares digits once, not in three processes at once
  port = _free_port()
  procs = {role: _spawn(role, out_dir, data_dir, port, devices)
           for role, devices in (("0", 4), ("1", 4), ("single", 8))}
  outputs = {}
  try:
    for role, proc in procs.items():
      outputs[role] = proc.communicate(timeout=TIMEOUT_S)[0]
  finally:
    for proc in procs.values():
      proc.kill()
  for role, proc in procs.items():
    assert proc.returncode == 0, f"process {role}:\n{outputs[role][-5000:]}"
  results = {}
  for role in procs:
    with open(os.path.join(out_dir, f"{role}.pkl"), "rb") as f:
      results[role] = pickle.load(f)
  results["out_dir"], results["output"] = out_dir, outputs
  return results


def _train_losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir) if r["split"] == "train"]


def test_two_processes_train_as_one_process_with_8_devices(runs):
  two, single = runs["0"], runs["single"]
  assert (two["process_count"], runs["1"]["process_count"], single["process_count"]) == (2, 2, 1)
  # metrics.jsonl: steps 1-2 of the first run, step 3 after the resume, each written once
  # (by process 0 alone); the losses are the single process's (float32; only the order of
  # the sums over the batch and the devices differs, as in test_sharding).
  got = _train_losses(os.path.join(runs["out_dir"], "run_two"))
  want = _train_losses(os.path.join(runs["out_dir"], "run_single"))
  assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=2e-6)
  for role in ("0", "1"):
    state = runs[role]["state"]
    assert int(state.step) == STEPS
    jax.tree.map(lambda a, b: assert_close_to_scale(a, b, STATE_TOLERANCE), state.params,
                 single["state"].params)
    jax.tree.map(lambda a, b: assert_close_to_scale(a, b, STATE_TOLERANCE), state.opt_state,
                 single["state"].opt_state)
  np.testing.assert_allclose(two["result"]["eval_loss"], single["result"]["eval_loss"], rtol=1e-5)
  assert runs["1"]["result"]["eval_loss"] == two["result"]["eval_loss"]


def test_each_process_reads_only_its_rows_of_a_batch(runs):
  batch = configlib.load(SPEC).batch_size
  assert runs["0"]["rows"] == slice(0, batch // 2)
  assert runs["1"]["rows"] == slice(batch // 2, batch)
  assert runs["single"]["rows"] == slice(0, batch)


def test_both_processes_wrote_the_checkpoint_and_it_restored_on_another_mesh(runs):
  # Both saw the step-2 checkpoint (split 8 ways across the processes) and the final one.
  assert runs["0"]["saved_steps"] == runs["1"]["saved_steps"] == [SAVED_AT]
  assert runs["0"]["result"]["step"] == STEPS and not runs["0"]["result"]["already_finished"]
  checkpoints = os.path.join(runs["out_dir"], "run_two", "checkpoints")
  assert sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) == [SAVED_AT, STEPS]


def test_a_sigterm_on_one_host_makes_every_host_save_the_same_step(runs):
  (code_0, saved_0), (code_1, saved_1) = runs["0"]["preempted"], runs["1"]["preempted"]
  assert code_0 == code_1 == 143, (code_0, code_1)  # None: the run ended unpreempted
  # The notice reaches process 0 through the coordination service; the sync point is a step
  # after process 1's signal (step 1; measured: step 2), the last both saved before exiting.
  assert saved_0 == saved_1 and saved_0[-1] in (2, 3), (saved_0, saved_1)
  assert "Preemption sync point: saved a checkpoint" in runs["output"]["0"]
  assert "Preemption sync point" not in runs["output"]["1"]  # only process 0 prints
