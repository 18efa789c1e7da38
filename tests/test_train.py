"""End-to-end tests of attnlab.train and attnlab.evaluate on the quick configs.

Each quick config trains a tiny model for a few steps; these tests check the
plumbing (data -> train -> checkpoint -> resume -> evaluate), determinism,
the purity of the train step, and the failure modes (NaN, SIGKILL, SIGTERM).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import evaluate as evaluate_lib
from attnlab import metrics as metrics_lib
from attnlab import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def quick_config(spec: str, data_dir: str, **overrides):
  """configs/<spec> with data_dir set and dotted overrides ("optim.learning_rate": 1.0)."""
  config = configlib.load(f"configs/{spec}")
  config.data.data_dir = data_dir
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def train_metrics(workdir):
  """metrics.jsonl without the wall-clock field."""
  return [{k: v for k, v in r.items() if k != "examples_per_sec"}
          for r in metrics_lib.read_metrics(workdir)]


def restore(config, workdir, step=None):
  exp = train.load_experiment(config)
  fns = train.experiment_fns(exp.model_cfg, exp.optim, exp.num_steps, config.label_smoothing)
  abstract = checkpoint_lib.with_shardings(jax.eval_shape(fns.init, config.seed))
  ckpt = checkpoint_lib.Checkpointer(workdir)
  state, data_state, step = ckpt.restore(abstract, step)
  ckpt.close()
  return state, data_state, step


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def digits_run(data_dir, tmp_path_factory):
  config = quick_config("digits_vit.py:sigmoid,quick", data_dir)
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  return config, workdir, train.train_and_evaluate(config, workdir)


# ----------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------


def test_digits_quick_trains_checkpoints_and_evaluates(digits_run):
  config, workdir, summary = digits_run
  assert summary["step"] == 8
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [6, 8]  # keep_checkpoints=2
  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
  assert {"loss", "accuracy", "learning_rate", "grad_norm", "examples_per_sec"} <= set(records[0])
  assert records[-1]["split"] == "eval"
  assert records[-1]["eval_accuracy"] == pytest.approx(summary["eval_accuracy"])

  result = evaluate_lib.evaluate(config, workdir, attention_pngs=True, verbose=False)
  assert result["step"] == 8 and result["num_examples"] == 297
  # Same parameters, same split: the evaluator reproduces the trainer's final numbers.
  assert result["accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-9)
  assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
  with open(os.path.join(workdir, "eval_8.json")) as f:
    assert json.load(f)["accuracy"] == result["accuracy"]
  (layer,) = result["attention"]  # the quick model has one layer
  assert 0.0 < layer["entropy"] <= np.log(4) + 1e-6  # quick model: 4x4 patches of 8x8, 4 tokens
  assert 0.0 <= layer["first_token"] <= 1.0 and 0.0 <= layer["below_1e-3"] <= 1.0
  assert all(os.path.getsize(p) > 0 for p in result["pngs"])
  assert "tensorflow" not in sys.modules  # TFDS read through ArrayRecord, no TensorFlow


def test_evaluate_an_earlier_step_and_a_missing_one(digits_run):
  config, workdir, _ = digits_run
  assert evaluate_lib.evaluate(config, workdir, step=6, verbose=False)["step"] == 6
  with pytest.raises(FileNotFoundError, match="saved steps: \\[6, 8\\]"):
    evaluate_lib.evaluate(config, workdir, step=5, verbose=False)


def test_same_config_and_seed_give_identical_metrics(digits_run, tmp_path):
  config, workdir, summary = digits_run
  again = train.train_and_evaluate(config, str(tmp_path))
  assert train_metrics(str(tmp_path)) == train_metrics(workdir)
  assert again["eval_loss"] == summary["eval_loss"]


def test_mqar_quick_end_to_end(tmp_path):
  config = configlib.load("configs/mqar_transformer.py:softmax,quick")
  summary = train.train_and_evaluate(config, str(tmp_path))
  result = evaluate_lib.evaluate(config, str(tmp_path), verbose=False)
  assert result["accuracy"] == pytest.approx(summary["eval_accuracy"])
  (layer,) = result["attention"]
  assert layer["row_sum"] == pytest.approx(1.0, abs=1e-5)  # softmax rows sum to one
  # Causal: on average a query sees (L + 1) / 2 keys, so the mean entropy is below log L.
  assert layer["entropy"] < np.log(16)


@pytest.mark.parametrize("spec", ["mnist_vit.py:mnist,quick", "shakespeare_char.py:quick"])
def test_tfds_path_end_to_end_on_mocked_data(spec, data_dir, tmp_path):
  config = quick_config(spec, data_dir)
  with tfds.testing.mock_data(num_examples=16):
    summary = train.train_and_evaluate(config, str(tmp_path))
    result = evaluate_lib.evaluate(config, str(tmp_path), verbose=False)
  assert summary["step"] == 4 and result["step"] == 4
  assert np.isfinite(result["loss"])


# ----------------------------------------------------------------------------
# The train step is a pure function of (state, batch)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_fns(data_dir):
  config = quick_config("digits_vit.py:sigmoid,quick", data_dir)  # dropout 0.1: keys matter
  exp = train.load_experiment(config)
  fns = train.experiment_fns(exp.model_cfg, exp.optim, exp.num_steps, config.label_smoothing)
  batches = [data_lib.train_batches(exp.datasets, batch_size=8, num_steps=1, seed=s)[0]
             for s in (0, 1)]
  return fns, jax.jit(fns.train_step), batches


def test_train_step_vmaps_over_seeds(step_fns):
  fns, step, batches = step_fns
  states = [jax.jit(fns.init)(seed) for seed in (0, 1)]
  singles = [step(st, b) for st, b in zip(states, batches)]
  stack = lambda *xs: jnp.stack(xs)  # noqa: E731
  batched = jax.jit(jax.vmap(fns.train_step))(jax.tree.map(stack, *states),
                                              jax.tree.map(stack, *batches))
  for i, single in enumerate(singles):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x[i], y, rtol=2e-5, atol=1e-6),
                 batched, single)
  # The two cells really differ (other init, other data); the zero-init head
  # makes both initial losses log(10), so compare the gradients.
  assert float(singles[0][1]["grad_norm"]) != float(singles[1][1]["grad_norm"])


def test_train_step_is_pure(step_fns):
  fns, step, batches = step_fns
  state = jax.jit(fns.init)(0)
  first, second = step(state, batches[0]), step(state, batches[0])
  assert_trees_equal(first, second)  # dropout keys come from (rng, step), not hidden state
  advanced = step(first[0], batches[0])
  assert float(advanced[1]["loss"]) != float(first[1]["loss"])


# ----------------------------------------------------------------------------
# Failure modes
# ----------------------------------------------------------------------------


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  config = quick_config("digits_vit.py:sigmoid,quick", data_dir, checkpoint_every_steps=1,
                        **{"optim.learning_rate": 1e38, "optim.warmup_steps": 1})
  with pytest.raises(FloatingPointError, match=r"at step \d+") as err:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
  saved = checkpoint_lib.Checkpointer(str(tmp_path)).all_steps()
  assert saved and max(saved) < bad_step
  state, _, _ = restore(config, str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_unknown_config_fields_suggest_the_nearest(data_dir):
  config = quick_config("digits_vit.py:quick", data_dir)
  config.unlock()
  config.chekpoint_every_steps = 3
  with pytest.raises(configlib.ConfigError, match='Did you mean "checkpoint_every_steps"'):
    train.load_experiment(config)
  config = quick_config("digits_vit.py:quick", data_dir)
  config.model.unlock()
  config.model.qk_nrom = "rms"
  with pytest.raises(configlib.ConfigError, match=r'config.model.qk_nrom. Did you mean "qk_norm"'):
    train.load_experiment(config)


def test_resuming_under_another_config_is_refused(digits_run):
  _, workdir, _ = digits_run
  other = configlib.load("configs/digits_vit.py:softmax,quick")
  other.data.data_dir = digits_run[0].data.data_dir
  with pytest.raises(configlib.ConfigError, match=r"another config \(fields \['model.attention'\]"):
    train.train_and_evaluate(other, workdir)


def test_missing_data_fails_before_training(tmp_path):
  config = quick_config("mnist_vit.py:quick", str(tmp_path / "empty"))
  with pytest.raises(data_lib.DatasetNotPreparedError, match="attnlab.data.prepare mnist"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def _train_cmd(workdir, *flags):
  return [sys.executable, os.path.join(REPO, "train.py"), "--config",
          os.path.join(REPO, "configs/digits_vit.py:sigmoid,quick"), "--workdir", workdir, *flags]


def _env(data_dir, **extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": data_dir, **extra}


def _wait_for_line(proc, text, timeout=180):
  deadline = time.monotonic() + timeout
  lines = []
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line and proc.poll() is not None:
      break
    lines.append(line)
    if text in line:
      return
  proc.kill()
  raise AssertionError(f"never printed {text!r}; output: {''.join(lines)[-2000:]}")


def test_killed_run_resumes_bitwise_identical(data_dir, digits_run, tmp_path):
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_train_cmd(killed), env=_env(data_dir, ATTNLAB_TEST_HANG_AFTER_STEP="4"),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  _wait_for_line(proc, "HANGING after step 4")
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert checkpoint_lib.Checkpointer(killed).all_steps() == [2, 4]

  resumed = subprocess.run(_train_cmd(killed), env=_env(data_dir), capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from step 4" in resumed.stderr

  # The uninterrupted run: the same config trained in this process.
  config, straight, _ = digits_run
  assert train_metrics(killed) == train_metrics(straight)
  killed_state, killed_data, _ = restore(config, killed, 8)
  straight_state, straight_data, _ = restore(config, straight, 8)
  assert_trees_equal(killed_state, straight_state)
  assert killed_data == straight_data


def test_sigterm_saves_then_exits_and_another_device_count_restores(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # Two CPU devices: the state is replicated and the batch split across them.
  env = _env(data_dir, ATTNLAB_TEST_HANG_AFTER_STEP="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.Popen(_train_cmd(workdir), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_line(proc, "HANGING after step 1")
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 143, stderr[-3000:]
  assert "SIGTERM: saved a checkpoint at step 1" in stderr
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [1]
  # This process has one device: eval_shape targets put every array on it.
  assert jax.device_count() == 1
  config = quick_config("digits_vit.py:sigmoid,quick", data_dir)
  result = evaluate_lib.evaluate(config, workdir, verbose=False)
  assert result["step"] == 1 and np.isfinite(result["loss"])
