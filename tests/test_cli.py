"""The command line's expected failures: refused before anything is written, one line each.

Each test runs the real train.py / eval.py in a subprocess on the quick digits
config (seconds) and checks the exit status, that stderr ends with exactly one
`Error: ...` line and no traceback, and what is (not) on disk afterwards
(issue #9: "settings refused before anything is written", "one line, not a
traceback"). A few in-process tests cover what a subprocess cannot show
cheaply: the "did you mean" before any data is read, and that an unexpected
error keeps its traceback.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from absl import logging

from attnlab import checkpoint as checkpoint_lib
from attnlab import cli
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import evaluate as evaluate_lib
from attnlab import experiment
from attnlab import workdir as workdir_lib
from attnlab.models import decode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/digits_vit.py:sigmoid,quick"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _env(data_dir, **extra):
  env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  return {**env, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": data_dir, **extra}


def _run(script, data_dir, *flag_args, config=QUICK, **env):
  """`python <script> --config <config> <flag_args>`, run from the repository root."""
  return subprocess.run([sys.executable, os.path.join(REPO, script), "--config", config,
                         *flag_args], cwd=REPO, env=_env(data_dir, **env), capture_output=True,
                        text=True, timeout=300)


def _error_line(proc) -> str:
  """The one `Error:` line a refused command ends with (asserts exit status 1, no traceback)."""
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("Error: "), proc.stderr[-3000:]
  assert sum(line.startswith("Error: ") for line in lines) == 1, proc.stderr[-3000:]
  assert cli.TRACEBACK_ENV in lines[-1]  # says how to see the traceback
  return lines[-1]


# ----------------------------------------------------------------------------
# Settings refused before anything is written.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("keep_checkpoints", 0),  # Orbax would delete every checkpoint
    ("eval_batch_size", 0),  # would train fully, then crash in the final evaluation
    ("log_every_steps", 0),  # ZeroDivisionError
    ("checkpoint_every_steps", 0),
    ("batch_size", 0),
    ("batch_size", -4),
])
def test_invalid_trainer_value_is_refused_before_the_workdir_exists(data_dir, tmp_path, field,
                                                                    value):
  workdir = tmp_path / "run"
  line = _error_line(_run("train.py", data_dir, "--workdir", str(workdir),
                          f"--config.{field}={value}"))
  assert f"config.{field}={value}: expected a positive int" in line
  assert not workdir.exists()  # no config.json, no checkpoints/


def test_batch_the_devices_cannot_split_is_refused_before_the_workdir_exists(data_dir,
                                                                             tmp_path):
  # Three fake CPU devices cannot split the quick config's batch of 32.
  workdir = tmp_path / "run"
  line = _error_line(_run("train.py", data_dir, "--workdir", str(workdir),
                          XLA_FLAGS="--xla_force_host_platform_device_count=3"))
  assert "config.batch_size=32" in line and "3 devices" in line, line
  assert not workdir.exists()


@pytest.mark.parametrize("override, source", [
    ("--config.data.train_examples=10", "config.data.train_examples=10"),
    ("--config.data.train_split=train[:20]", "config.data.train_split='train[:20]' of 'digits'"),
])
def test_batch_larger_than_the_training_set_is_refused_not_clipped(data_dir, tmp_path, override,
                                                                   source):
  workdir = tmp_path / "run"
  line = _error_line(_run("train.py", data_dir, "--workdir", str(workdir), override))
  n = 10 if "train_examples" in override else 20
  assert f"config.batch_size=32: larger than the {n} training examples ({source})" in line
  assert f"Set --config.batch_size to at most {n}, or train on at least 32 examples." in line
  assert not workdir.exists()


def test_batch_equal_to_the_training_set_is_accepted():
  # The boundary of the refusal above: one full batch per epoch is fine.
  exp_cfg = experiment.ExperimentConfig.from_config(configlib.load(QUICK))
  spec = data_lib.DataSpec(task="classification", num_classes=10, input_shape=(8, 8, 1),
                           num_train_examples=32, num_eval_examples=10)
  experiment.check_batch_size(exp_cfg.trainer, exp_cfg.data, spec)
  with pytest.raises(configlib.ConfigError, match="larger than the 31 training examples"):
    experiment.check_batch_size(exp_cfg.trainer, exp_cfg.data,
                                dataclasses.replace(spec, num_train_examples=31))


def test_unknown_attention_kind_suggests_the_nearest_before_reading_data():
  config = configlib.load(QUICK)
  with config.unlocked():
    config.model.attention = "sigmod"
  # from_config reads no data: the typo fails before the data set is opened.
  with pytest.raises(configlib.ConfigError,
                     match=r"""config.model.attention='sigmod': not a known attention kind. """
                           r"""Did you mean "sigmoid"\? Expected one of .*softmax"""):
    experiment.ExperimentConfig.from_config(config)
  with config.unlocked():
    config.model.attention, config.model.attention_impl = "sigmoid", "chunkd"
  with pytest.raises(configlib.ConfigError, match=r'attention_impl.*Did you mean "chunked"'):
    experiment.ExperimentConfig.from_config(config)


def test_unknown_attention_kind_override_is_one_line(data_dir, tmp_path):
  workdir = tmp_path / "run"
  line = _error_line(_run("train.py", data_dir, "--workdir", str(workdir),
                          "--config.model.attention=sigmod"))
  assert 'Did you mean "sigmoid"?' in line
  assert not workdir.exists()


def test_a_config_without_an_engine_is_one_line(data_dir, tmp_path):
  config_file = tmp_path / "no_engine.py"
  config_file.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                         "  return ml_collections.ConfigDict({'batch_size': 8}).lock()\n")
  workdir = tmp_path / "run"
  line = _error_line(_run("train.py", data_dir, "--workdir", str(workdir),
                          config=str(config_file)))
  assert "names no engine (config.engine)" in line and "'study':" in line
  assert not workdir.exists()


def test_model_value_error_is_one_line(data_dir, tmp_path):
  # A ValueError of the model config (here: heads that do not divide the
  # width) arrives as a ConfigError: one line, nothing written.
  workdir = tmp_path / "run"
  line = _error_line(_run("train.py", data_dir, "--workdir", str(workdir),
                          "--config.model.width=33"))
  assert "num_heads=2 is invalid: it must divide width=33" in line
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# eval.py: the same run only, and no run is not created.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli_run") / "run")
  proc = _run("train.py", data_dir, "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _eval_files(workdir):
  return sorted(n for n in os.listdir(workdir) if n.startswith("eval_"))


@pytest.mark.parametrize("override, field", [
    ("--config.model.attention=softmax", "model.attention"),  # would score untrained parameters
    ("--config.model.width=64", "model.width"),  # was an 81-line shape traceback
])
def test_eval_refuses_a_config_other_than_the_runs(data_dir, trained_run, override, field):
  before = _eval_files(trained_run)
  line = _error_line(_run("eval.py", data_dir, "--workdir", trained_run, override))
  assert f"another config (fields ['{field}'] differ" in line
  assert _eval_files(trained_run) == before  # nothing scored, nothing written


def test_eval_of_the_runs_own_config_still_works(data_dir, trained_run):
  proc = _run("eval.py", data_dir, "--workdir", trained_run,
              "--config.log_every_steps=4")  # run-neutral: may differ
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "eval_8.json" in _eval_files(trained_run)


def test_rerunning_a_finished_run_prints_one_line_and_no_summary(data_dir, trained_run):
  proc = _run("train.py", data_dir, "--workdir", trained_run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == ""  # no second "Test accuracy ..." block
  line = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert "holds a finished run: step 8" in line and "nothing to do" in line


def test_eval_of_a_damaged_checkpoint_is_one_line(data_dir, trained_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained_run, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "8")
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state"))
           for n in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  line = _error_line(_run("eval.py", data_dir, "--workdir", workdir, "--step=8"))
  assert f"{step_dir} is damaged" in line


def test_eval_of_a_missing_workdir_does_not_create_it(data_dir, tmp_path):
  workdir = tmp_path / "never_trained"
  line = _error_line(_run("eval.py", data_dir, "--workdir", str(workdir)))
  assert f"No run in {workdir}: the directory does not exist. Train it first" in line
  assert not workdir.exists()


def test_eval_of_an_empty_workdir_writes_nothing(data_dir, tmp_path):
  line = _error_line(_run("eval.py", data_dir, "--workdir", str(tmp_path)))
  assert f"No checkpoint in {tmp_path / 'checkpoints'}" in line
  assert os.listdir(tmp_path) == []  # no checkpoints/ made by opening it


def test_eval_samples_prints_sequences_generated_by_a_trained_lm(data_dir, tmp_path):
  # The whole path behind --samples: the run's checkpoint, decoding, the printed table.
  lm, workdir = "configs/mqar_transformer.py:sigmoid,quick", str(tmp_path / "lm")
  trained = _run("train.py", data_dir, "--workdir", workdir, config=lm)
  assert trained.returncode == 0, trained.stderr[-3000:]
  proc = _run("eval.py", data_dir, "--workdir", workdir, "--samples=2", "--temperature=0",
              config=lm)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Sample 0: prompt" in proc.stdout and "Sample 1: prompt" in proc.stdout
  (written,) = _eval_files(workdir)
  with open(os.path.join(workdir, written), encoding="utf-8") as f:
    samples = json.load(f)["samples"]
  config = configlib.load(lm)
  mqar = config.data.mqar
  assert [len(s["prompt"]) + len(s["completion"]) for s in samples] == [mqar.seq_len] * 2
  assert all(0 <= t < mqar.vocab_size for s in samples for t in s["completion"])
  # evaluate.load_model (the notebook's way in) restores the same model: greedy decoding
  # from it writes the same completions.
  model, step = evaluate_lib.load_model(config, workdir)
  assert written == f"eval_{step}.json"
  prompts = np.asarray([s["prompt"] for s in samples])
  tokens = decode.generate(model, prompts, steps=len(samples[0]["completion"]),
                           rng=jax.random.key(1), temperature=0.0)
  assert np.asarray(tokens)[:, prompts.shape[1]:].tolist() == [s["completion"] for s in samples]


@pytest.mark.parametrize("flag_args, named", [
    (("--samples=2",), "--samples acts on one trained run's checkpoint"),
    (("--step=3", "--attention_png"), "--step and --attention_png act on one trained run's"),
], ids=["samples", "step-and-attention-png"])
def test_eval_refuses_single_run_flags_with_a_study(data_dir, tmp_path, flag_args, named):
  # Was silently ignored: the study's report was re-rendered and no sample printed.
  workdir = tmp_path / "study"
  line = _error_line(_run("eval.py", data_dir, "--workdir", str(workdir), *flag_args,
                          config="configs/sample_efficiency/digits.py:quick"))
  assert named in line and "--config is a study" in line
  assert "pass the --config and --workdir of a single run" in line
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# One line, not a traceback.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
@pytest.mark.parametrize("overrides", [(), ("--config.batch_size=8",)])
def test_missing_config_file_is_one_line(data_dir, tmp_path, script, overrides):
  # Was 42 lines and two chained tracebacks, the real cause last; with an
  # override the failure happens while the flags are parsed.
  workdir = tmp_path / "run"
  line = _error_line(_run(script, data_dir, "--workdir", str(workdir), *overrides,
                          config="configs/no_such_experiment.py:quick"))
  assert "No config file 'configs/no_such_experiment.py'" in line
  assert not workdir.exists()


def test_workdir_that_is_a_file_is_one_line(data_dir, tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a run")
  line = _error_line(_run("train.py", data_dir, "--workdir", str(path)))
  assert f"--workdir {path} is a file, not a directory" in line
  assert path.read_text() == "not a run"
  line = _error_line(_run("train.py", data_dir, "--workdir", str(path / "below")))
  assert "Not a directory" in line


def _unwritable_dir(tmp_path) -> str | None:
  """A directory in which this process cannot create a workdir, or None."""
  locked = tmp_path / "read_only"
  locked.mkdir()
  locked.chmod(0o500)
  # root ignores permission bits; sysfs refuses new entries even to root.
  for parent in (str(locked), "/sys"):
    try:
      os.makedirs(os.path.join(parent, "attnlab_probe"))
    except PermissionError:
      return parent
    else:
      os.rmdir(os.path.join(parent, "attnlab_probe"))
  return None


def test_unwritable_workdir_is_one_line(data_dir, tmp_path):
  parent = _unwritable_dir(tmp_path)
  if parent is None:
    pytest.skip("no directory here refuses this process a new entry")
  workdir = os.path.join(parent, "attnlab_test_run")
  line = _error_line(_run("train.py", data_dir, "--workdir", workdir))
  assert workdir in line and ("Permission denied" in line or "not permitted" in line)
  assert not os.path.exists(workdir)


def test_workdir_in_use_is_one_line(data_dir, tmp_path):
  workdir = tmp_path / "run"
  with workdir_lib.WorkdirLock(str(workdir)):  # this process stands in for a live run
    line = _error_line(_run("train.py", data_dir, "--workdir", str(workdir)))
  assert f"Error: {workdir} is in use by another run (pid {os.getpid()} " in line
  assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]  # no config.json, no checkpoints/


def test_traceback_on_request(data_dir, tmp_path):
  workdir = tmp_path / "run"
  for extra, env in (((), {cli.TRACEBACK_ENV: "1"}), (("--verbosity=1",), {})):
    proc = _run("train.py", data_dir, "--workdir", str(workdir), "--config.keep_checkpoints=0",
                *extra, **env)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError: config.keep_checkpoints=0" in proc.stderr
    assert not workdir.exists()


@pytest.fixture
def absl_verbosity():
  # run_main lowers absl's log level when --verbosity is not given; put it back.
  previous = logging.get_verbosity()
  yield
  logging.set_verbosity(previous)


def _flag_values(*args):
  argv = ["train.py", "--config", os.path.join(REPO, QUICK), *args]
  flag_values = flags.FlagValues()
  cli.define_flags(default_config=QUICK, flag_values=flag_values, argv=argv)
  cli.parse_flags(argv, flag_values)
  return flag_values


@pytest.mark.parametrize("error", [
    configlib.ConfigError("config.x=1: expected 2.\nSecond line."),
    FileNotFoundError("No run in runs/x"),
    PermissionError(13, "Permission denied", "/ro/run"),
    FloatingPointError("Loss is NaN at step 3."),
    workdir_lib.WorkdirLockedError("runs/x is in use by another run (pid 1)."),
    checkpoint_lib.CheckpointWriteError("Cannot write a checkpoint in runs/x/checkpoints."),
    checkpoint_lib.CheckpointDamagedError("runs/x/checkpoints/8 is damaged."),
])
def test_run_main_turns_expected_failures_into_one_line(tmp_path, monkeypatch, absl_verbosity,
                                                        error):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

  def fail(config, workdir):
    raise error

  with pytest.raises(SystemExit) as exit_:
    cli.run_main(["train.py"], fail, _flag_values("--workdir", str(tmp_path)))
  message = exit_.value.code
  assert isinstance(message, str) and message.startswith("Error: ") and "\n" not in message
  assert " ".join(str(error).split("\n")) in message


@pytest.mark.parametrize("error", [ValueError("a bug"), RuntimeError("a bug"),
                                   KeyError("a bug")])
def test_run_main_keeps_the_traceback_of_unexpected_errors(tmp_path, absl_verbosity, error):
  def fail(config, workdir):
    raise error

  with pytest.raises(type(error)):
    cli.run_main(["train.py"], fail, _flag_values("--workdir", str(tmp_path)))


def test_ctrl_c_outside_the_loop_is_one_line_and_exit_130(tmp_path, monkeypatch, absl_verbosity,
                                                          capsys):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

  def interrupted(config, workdir):  # e.g. Ctrl-C while the data set is being prepared
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_:
    cli.run_main(["train.py"], interrupted, _flag_values("--workdir", str(tmp_path)))
  assert exit_.value.code == 130
  (line,) = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert line.startswith("Interrupted (Ctrl-C) outside the training loop")


# ----------------------------------------------------------------------------
# Many devices and hosts: the mesh overrides and --jax_distributed.
# ----------------------------------------------------------------------------

# Every training config (and study) file; the synthetic MoE study trains no model of config.model.
TRAINING_CONFIGS = sorted(
    os.path.relpath(os.path.join(root, name), REPO)
    for root, _, names in os.walk(os.path.join(REPO, "configs")) for name in names
    if name.endswith(".py") and name != "moe_synthetic.py")


@pytest.mark.parametrize("spec", TRAINING_CONFIGS)
def test_every_training_config_takes_mesh_overrides_that_name_no_workdir(spec):
  argv = ["train.py", "--config", os.path.join(REPO, spec), "--config.mesh.fsdp=-1",
          "--config.sharding_rules.embed=none", "--config.sharding_rules.mlp=('fsdp', 'model')"]
  flag_values = flags.FlagValues()
  cli.define_flags(default_config=spec, flag_values=flag_values, argv=argv, distributed=True)
  cli.parse_flags(argv, flag_values)
  config = flag_values["config"].value
  assert config.is_locked
  trainer = experiment.trainer_config({k: v for k, v in config.items() if k != "study"})
  assert trainer.mesh == (("data", 1), ("fsdp", -1), ("model", 1))
  rules = dict(trainer.sharding_rules)
  assert rules["embed"] == () and rules["mlp"] == ("fsdp", "model") and rules["heads"] == ("model",)
  # Where the arrays live is not what is trained: the workdir is the config's own.
  assert cli.default_workdir(spec, config) == cli.default_workdir(spec)
  assert configlib.training_differences(config, configlib.load(spec)) == {}


def test_a_distributed_setting_without_jax_distributed_is_one_line(data_dir, tmp_path):
  line = _error_line(_run("train.py", data_dir, "--process_id=1", "--workdir", str(tmp_path / "r")))
  assert "--process_id given without --jax_distributed" in line
  assert not os.path.exists(tmp_path / "r")


def test_jax_distributed_without_a_cluster_or_settings_is_one_line(data_dir, tmp_path):
  # No SLURM or Cloud TPU here, and no --coordinator_address: jax cannot start.
  env = {k: "" for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_"))}
  line = _error_line(_run("train.py", data_dir, "--jax_distributed", "--workdir",
                          str(tmp_path / "r"), **env))
  assert "jax.distributed.initialize() failed" in line
  assert "--coordinator_address=" in line and "--num_processes=N" in line
  assert not os.path.exists(tmp_path / "r")
