"""A real multi-controller run: two processes joined by jax.distributed on 127.0.0.1.

Two child processes with 4 CPU devices each call `jax.distributed.initialize`
(gloo collectives) and train the quick ViT through `train.train_and_evaluate`,
as `train.py --jax_distributed` does: FSDP over all 8 devices (parameters split
across the processes), stopped after the checkpoint of step 2, then resumed on
a data=2 x fsdp=4 mesh (each process one data row) to the end. A third child,
one process with 8 devices, trains the same steps in one go. The two runs
must match: losses, parameters and the final evaluation. The pair then runs
the quick digits study with each group's cells side by side, split over both
processes' devices, stopped after its first group's checkpoint and resumed;
the single process runs it in one go; their per-cell results must match.
Last, the pair runs the first run again, longer, with a SIGTERM sent to
process 1 alone: both must save the same step and exit 143 (JAX's preemption
service, Orbax's sync point).
"""

import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attnlab import configlib
from attnlab import experiment
from attnlab import metrics
from attnlab import placement
from attnlab import sharding
from attnlab import train
from attnlab.studies import results as results_lib
from attnlab.studies import stack
from attnlab.studies import study
from test_sharding import STATE_TOLERANCE, assert_close_to_scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/digits_vit.py:sigmoid,quick"
STEPS = 3
SAVED_AT = 2  # the quick config's checkpoint_every_steps
MESHES = {"first": {"fsdp": -1}, "resumed": {"data": 2, "fsdp": 4}}
TIMEOUT_S = 600  # a hung collective fails the test instead of hanging CI (a loaded one: 300 s)
# The preempted run: long enough that the sync point, a step or two after the signal, falls
# inside it however late the notice crosses a loaded machine (PREEMPT_PAUSE_S per step after
# the signal: 10 s), and it still ends if no preemption is ever agreed.
PREEMPT_STEPS, PREEMPT_PAUSE_S = 200, 0.05
STUDY = "configs/sample_efficiency/digits.py:quick"
# The first group, stopped once its first checkpoint (checkpoint_every_steps=3) is started.
STUDY_STOP, STUDY_SAVED_AT = ("sigmoid", 4), 3


def _config(data_dir, mesh, steps=STEPS):
  config = configlib.load(SPEC)
  config.unlock()
  config.data.data_dir = data_dir
  config.mesh = mesh
  config.total_steps = steps
  config.log_every_steps = 1  # every step's loss in metrics.jsonl
  config.eval_batch_size = 96  # splits 8 ways (the quick config's 100 does not)
  return config


class _Stop(Exception):
  pass


def _saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _preempted_run(data_dir, workdir):
  """The first run, longer, process 1 alone sent SIGTERM after step 1: (exit status, saved steps)."""
  def sigterm_process_1(step, state):
    if step == 1 and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # caught by JAX's preemption notifier
    elif step > 1:
      time.sleep(PREEMPT_PAUSE_S)  # both processes: time for the notice to reach process 0

  config = _config(data_dir, MESHES["first"], PREEMPT_STEPS)
  config.checkpoint_every_steps = PREEMPT_STEPS  # the preemption's save is the only one before
  try:
    train.train_and_evaluate(config, workdir, on_step=sigterm_process_1)
  except SystemExit as e:
    return e.code, _saved_steps(workdir)
  return None, _saved_steps(workdir)  # not preempted: the test says so


def _study_config(data_dir):
  config = configlib.load(STUDY)
  config.unlock()
  config.data.data_dir = data_dir
  # Every group's cells side by side (CPU's default trains them one at a time, which several
  # processes refuse): split over the devices.
  config.study.vmap_cells = config.study.max_cells_per_group
  return config


def _study(data_dir, workdir, stop_at=None):
  """Runs the quick study in `workdir`, first stopped after `stop_at` (group, step) if given.

  Returns the summaries of the runs (the first of a stopped one is None).
  """
  def stop(group, step):
    if (group, step) == stop_at:
      raise _Stop

  summaries = []
  if stop_at is not None:
    try:
      study.run(_study_config(data_dir), workdir, on_step=stop)
    except _Stop:
      summaries.append(None)
  summaries.append(study.run(_study_config(data_dir), workdir))
  return summaries


def _child(role, out_dir, data_dir, port):
  """One of the two processes ("0", "1") or the single 8-device process ("single")."""
  # As attnlab.cli.initialize_distributed with explicit settings.
  if role != "single":
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(role))
  jax.config.update("jax_disable_most_optimizations", True)  # compiling dominates
  assert jax.device_count() == 8, jax.devices()
  runs_as = "two" if role != "single" else "single"
  workdir = os.path.join(out_dir, f"run_{runs_as}")
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
  shard = placement.shardings(exp.trainer, placement.abstract_state(exp.fns(), 0))
  seen["rows"] = sharding.process_rows(shard.batch, exp.trainer.batch_size)
  seen["state"] = jax.device_get(seen["state"])
  # The processes holding a group of 4 cells, then of 2, 1.
  seen["cell_processes"] = [sorted({d.process_index for d in stack.cell_mesh(n).devices.flat})
                            for n in (4, 2, 1)]
  seen["study"] = _study(data_dir, os.path.join(out_dir, f"study_{runs_as}"),
                         None if role == "single" else STUDY_STOP)
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
  # after process 1's signal (step 1; measured: step 2), the last both saved before exiting,
  # well before the end of the run.
  said = [line for line in runs["output"]["0"].splitlines()
          if line.startswith("Preemption sync point: saved a checkpoint at step")]
  assert len(said) == 1, runs["output"]["0"][-3000:]
  step = int(said[0].split("at step ")[1].split()[0])
  assert 1 < step < PREEMPT_STEPS and saved_0 == saved_1 == [step], (step, saved_0, saved_1)
  assert "Preemption sync point" not in runs["output"]["1"]  # only process 0 prints


# ----------------------------------------------------------------------------
# A study on two processes.
# ----------------------------------------------------------------------------


def test_a_study_groups_cells_are_split_over_both_processes(runs):
  # 4 cells: 2 on each process's devices; 2: 1 on each; 1: a copy on each (every process
  # takes part in every program). One process: all its own.
  assert runs["0"]["cell_processes"] == runs["1"]["cell_processes"] == [[0, 1]] * 3
  assert runs["single"]["cell_processes"] == [[0]] * 3


def test_a_study_on_two_processes_resumes_and_gives_each_cell_what_one_process_gives(runs):
  two, single = (os.path.join(runs["out_dir"], f"study_{w}") for w in ("two", "single"))
  # Stopped after the first group's checkpoint, resumed from it on both processes.
  for role in ("0", "1"):
    stopped, resumed = runs[role]["study"]
    assert stopped is None and resumed["resumed_groups"] == {STUDY_STOP[0]: STUDY_SAVED_AT}
    assert resumed["trained_cells"] == 8
  assert "paths" not in runs["1"]["study"][-1]  # only process 0 wrote the report
  got = results_lib.load_cells(os.path.join(two, "results.json"))
  want = results_lib.load_cells(os.path.join(single, "results.json"))
  assert [(c.kind, c.n, c.seed) for c in got] == [(c.kind, c.n, c.seed) for c in want]
  assert len(got) == 8 and len(os.listdir(os.path.join(two, study.CELLS_DIR))) == 8
  for g, w in zip(got, want):
    # As test_sharding's study group: each cell's own program, on whichever devices.
    assert (g.steps, g.best_step, g.diverged_at) == (w.steps, w.best_step, None)
    assert g.test_error == w.test_error and g.val_error == w.val_error
    np.testing.assert_allclose([g.train_loss, g.val_loss, g.test_loss],
                               [w.train_loss, w.val_loss, w.test_loss], rtol=2e-6)
