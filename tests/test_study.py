"""Tests of attnlab.studies.study: a whole study from its config, killed and resumed, re-rendered.

The quick digits study (2 kinds x 2 sizes x 2 seeds, budgets of 6 and 8
steps, checkpoints every 3) runs in fresh processes through train.py, as a
researcher runs it; every process uses the same XLA settings, so reruns are
bitwise comparable.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from attnlab import configlib
from attnlab.studies import results
from attnlab.studies import study as study_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/sample_efficiency/digits.py:quick"
# Unoptimised XLA halves compile time; set in every process of this module,
# so the runs compared are the same programs.
ENV = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_PLATFORMS": "cpu"}


def run_python(*args, check=True):
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600, check=False)
  if check and result.returncode != 0:
    raise AssertionError(f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}")
  return result


def cells_without_times(workdir):
  cells = results.load_cells(os.path.join(workdir, "results.json"))
  return [{k: v for k, v in c.to_dict().items() if k != "wall_seconds"} for c in cells]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  result = run_python("train.py", f"--config={QUICK}", f"--workdir={workdir}")
  return workdir, result.stdout


def test_the_quick_study_runs_end_to_end_and_writes_its_report(uninterrupted):
  workdir, stdout = uninterrupted
  for name in ("results.json", "results.csv", "report.md", "error_vs_n.png",
               "paired_difference.png", "config.json", "finished.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  cells = results.load_cells(os.path.join(workdir, "results.json"))
  assert sorted((c.kind, c.n, c.seed) for c in cells) == sorted(
      (k, n, s) for k in ("sigmoid", "softmax") for n in (32, 64) for s in (0, 1))
  for c in cells:
    assert c.steps == (6 if c.n == 32 else 8)  # 2 epochs at batch 16, at least 6 steps
    assert c.budget == "epochs=2, min_steps=6, batch=16"
    # A selection point: a multiple of eval_every_steps (3) or the cell's last step.
    assert 1 <= c.best_step <= c.steps and (c.best_step % 3 == 0 or c.best_step == c.steps)
    assert 0.0 <= c.test_error <= 1.0 and 0.0 <= c.val_error <= 1.0 and c.wall_seconds > 0
  # The printed summary: the report's tables, the plot's path, the ratio.
  assert "Samples to target error 0.1" in stdout
  assert os.path.join(workdir, "error_vs_n.png") in stdout
  assert "8 cells trained, 0 already recorded" in stdout
  # Paired seeds: a sigmoid and a softmax cell of the same (n, seed) start
  # from the same key and order, yet their kinds make them differ.
  by_key = {(c.kind, c.n, c.seed): c for c in cells}
  assert by_key["sigmoid", 64, 0].test_loss != by_key["softmax", 64, 0].test_loss


def test_a_rerun_skips_recorded_cells_and_eval_rerenders_without_training(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  before = cells_without_times(workdir)
  again = run_python("train.py", f"--config={QUICK}", f"--workdir={workdir}")
  assert "0 cells trained, 8 already recorded" in again.stdout
  assert cells_without_times(workdir) == before
  # eval.py with another target (a report setting): the report changes, the cells do not.
  rendered = run_python("eval.py", f"--config={QUICK}", f"--workdir={workdir}",
                        "--config.study.target_error=0.9")
  assert "Samples to target error 0.9" in rendered.stdout
  with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
    assert "Samples to target error 0.9" in f.read()
  assert cells_without_times(workdir) == before
  # A config that trains something else is refused, naming the field.
  refused = run_python("eval.py", f"--config={QUICK}", f"--workdir={workdir}",
                       "--config.optim.learning_rate=0.1", check=False)
  assert refused.returncode == 1 and "optim.learning_rate" in refused.stderr
  # Nothing recorded: a clear error, and the workdir is not created.
  empty = run_python("eval.py", f"--config={QUICK}", f"--workdir={tmp_path / 'none'}", check=False)
  assert empty.returncode == 1 and "No cell of this study is recorded" in empty.stderr


def test_a_study_killed_mid_group_resumes_and_gives_the_uninterrupted_results(uninterrupted, tmp_path):
  workdir = str(tmp_path / "killed")
  # SIGKILL in the second group (softmax) at step 5, once its step-3
  # checkpoint is on disk (saves are asynchronous): no handler runs, as when a
  # machine is lost.
  saved = os.path.join(workdir, "groups", "softmax", "checkpoints", "3")
  script = textwrap.dedent(f"""
      import os, signal, time
      from attnlab import configlib
      from attnlab.studies import study
      def kill(group, step):
        if group == "softmax" and step == 5:
          deadline = time.time() + 60
          while not os.path.isdir({saved!r}) and time.time() < deadline:
            time.sleep(0.05)
          os.kill(os.getpid(), signal.SIGKILL)
      study.run(configlib.load({QUICK!r}), {workdir!r}, on_step=kill)
      """)
  killed = run_python("-c", script, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  recorded = sorted(os.listdir(os.path.join(workdir, "cells")))
  assert recorded == sorted(f"sigmoid_n{n}_seed{s}.json" for n in (32, 64) for s in (0, 1))
  sigmoid_mtimes = {name: os.path.getmtime(os.path.join(workdir, "cells", name)) for name in recorded}

  resumed = run_python("train.py", f"--config={QUICK}", f"--workdir={workdir}")
  assert "4 cells trained, 4 already recorded" in resumed.stdout
  summary = json.load(open(os.path.join(workdir, "finished.json"), encoding="utf-8"))
  assert summary["resumed_groups"] == {"softmax": 3}
  # The finished group was not retrained, and the group's checkpoints are gone.
  assert {name: os.path.getmtime(os.path.join(workdir, "cells", name))
          for name in recorded} == sigmoid_mtimes
  assert not os.listdir(os.path.join(workdir, "groups"))
  assert cells_without_times(workdir) == cells_without_times(uninterrupted[0])


def test_a_study_grown_by_seeds_in_its_workdir_trains_only_the_new_cells(uninterrupted, tmp_path):
  workdir = str(tmp_path / "grown")
  first = run_python("train.py", f"--config={QUICK}", f"--workdir={workdir}", "--config.study.seeds=(0,)")
  assert "4 cells trained, 0 already recorded" in first.stdout
  seed0 = {name: os.path.getmtime(os.path.join(workdir, "cells", name))
           for name in os.listdir(os.path.join(workdir, "cells"))}
  assert sorted(seed0) == sorted(f"{k}_n{n}_seed0.json" for k in ("sigmoid", "softmax") for n in (32, 64))
  # The file's seeds (0, 1) in the same workdir: accepted (seeds are run-neutral), and each
  # group trains its seed-1 cells only: the seed-0 records are not rewritten.
  grown = run_python("train.py", f"--config={QUICK}", f"--workdir={workdir}")
  assert "4 cells trained, 4 already recorded" in grown.stdout
  assert {name: os.path.getmtime(os.path.join(workdir, "cells", name)) for name in seed0} == seed0
  # A cell's result depends on its own seed only: the grown study equals the one run at once.
  assert cells_without_times(workdir) == cells_without_times(uninterrupted[0])


# ----------------------------------------------------------------------------
# The config and the plan
# ----------------------------------------------------------------------------


def quick_config():
  return configlib.load(QUICK)


def test_the_plan_puts_each_kind_in_one_group_with_each_cells_budget():
  study, exp_cfg = study_lib.split_config(quick_config())
  groups = study_lib.plan(study, exp_cfg)
  assert [g.name for g in groups] == ["sigmoid", "softmax"]
  for g in groups:
    assert [(c.n, c.seed) for c in g.cells] == [(32, 0), (32, 1), (64, 0), (64, 1)]
    assert g.budgets == (6, 6, 8, 8)


def test_big_kinds_are_split_into_groups_of_at_most_max_cells():
  config = quick_config().unlock()
  config.study.max_cells_per_group = 3
  study, exp_cfg = study_lib.split_config(config)
  groups = study_lib.plan(study, exp_cfg)
  assert [(g.name, len(g.cells)) for g in groups] == [
      ("sigmoid.0", 3), ("sigmoid.1", 1), ("softmax.0", 3), ("softmax.1", 1)]


def test_the_budget_rule_floors_small_subsets_and_fixed_steps_are_the_same_for_all():
  study, exp_cfg = study_lib.split_config(quick_config())
  assert [study_lib.cell_budget(study, exp_cfg, n) for n in (16, 48, 64, 160)] == [6, 6, 8, 20]
  config = quick_config().unlock()
  config.num_epochs, config.total_steps = None, 11
  study, exp_cfg = study_lib.split_config(config)
  assert {study_lib.cell_budget(study, exp_cfg, n) for n in (32, 64, 1000)} == {11}
  assert study_lib.budget_rule(study, exp_cfg) == "steps=11, min_steps=6, batch=16"


@pytest.mark.parametrize("field, value, message", [
    ("kinds", ("sigmoid", "sigmod"), r"'sigmod' is not a registered attention kind\. Did you mean \"sigmoid\""),
    ("train_sizes", (64, 32), "increasing order"),
    ("seeds", (0, 0), "each once"),
    ("compare", ("sigmoid", "relu"), "two different kinds of study.kinds"),
    ("target_error", 1.5, r"in \(0, 1\)"),
    ("min_steps", 0, "positive int"),
])
def test_a_bad_study_field_is_refused_naming_it(field, value, message):
  config = quick_config().unlock()
  config.study[field] = value
  with pytest.raises(configlib.ConfigError, match=rf"config\.study\.{field}=.*{message}"):
    study_lib.split_config(config)


def test_a_study_with_a_fixed_subset_or_a_batch_larger_than_a_subset_is_refused(tmp_path):
  config = quick_config().unlock()
  config.data.train_examples = 100
  with pytest.raises(configlib.ConfigError, match="study.train_sizes; set train_examples=none"):
    study_lib.split_config(config)
  config = quick_config().unlock()
  config.batch_size = 48
  with pytest.raises(configlib.ConfigError, match=r"batch_size=48 is larger than the smallest"):
    study_lib.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # refused before anything is written
  # A size larger than the training split (less the validation split) names the study's field.
  config = quick_config().unlock()
  config.study.train_sizes = (32, 1300)
  with pytest.raises(configlib.ConfigError, match=r"config\.study\.train_sizes: the largest size, "
                     r"1300.*expected train_examples <= 1200"):
    study_lib.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.usefixtures("fast_xla_compile")
@pytest.mark.parametrize("spec", ["sample_efficiency/mnist.py:quick", "sample_efficiency/cifar10.py:quick",
                                  "sample_efficiency/mqar.py:quick"])
def test_the_other_quick_studies_run_end_to_end(spec, tmp_path):
  """MNIST and CIFAR-10 on TFDS's mocked data (the real data is not on CI machines); MQAR synthetic."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  config = configlib.load(f"configs/{spec}")
  config.data.data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=40):
    summary = study_lib.run(config, str(tmp_path / "run"))
  cells = results.load_cells(summary["paths"]["json"])
  assert len(cells) == 8 and summary["trained_cells"] == 8
  assert all(0.0 <= c.test_error <= 1.0 for c in cells)
  assert os.path.getsize(summary["paths"]["error_plot"]) > 0


def test_several_processes_refuse_cells_one_at_a_time_naming_vmap_cells(tmp_path, monkeypatch):
  # As one of 2 processes (jax.distributed; the run itself: test_multiprocess): CPU's default,
  # one cell at a time on one device, would train every cell again in every process.
  monkeypatch.setattr(study_lib.jax, "process_count", lambda: 2)
  for vmap_cells in (None, 1, 3):  # None: 1 on CPU (tests run there); 3: chunks of a group of 4
    config = quick_config().unlock()
    config.study.vmap_cells = vmap_cells
    with pytest.raises(configlib.ConfigError, match=r"config\.study\.vmap_cells=.* one of 2 "
                       r"processes: set --config\.study\.vmap_cells=4 \(the largest group\)"):
      study_lib.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # refused before anything is written


class _TestSplitRead(Exception):
  pass


def test_the_tuning_entry_never_reads_the_test_split(tmp_path, monkeypatch):
  """Hyperparameters are chosen on data the final figure never sees: `:tune` opens no test split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  opened = []
  real = tfds.core.DatasetBuilder.as_data_source

  def guarded(self, split=None, *args, **kwargs):
    opened.append(str(split))
    if str(split).split("[")[0].strip() == "test":
      raise _TestSplitRead(f"the test split was read: {split}")
    return real(self, split, *args, **kwargs)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", guarded)
  monkeypatch.setattr(tfds, "data_source", lambda name, split, **kw: guarded(None, split))
  # The guard sees reads: the ordinary quick study opens the test split and is stopped.
  with pytest.raises(_TestSplitRead):
    study_lib.run(configlib.load(QUICK), str(tmp_path / "ordinary"))
  opened.clear()
  summary = study_lib.run(configlib.load(QUICK + ",tune"), str(tmp_path / "tune"))
  assert summary["trained_cells"] == 8 and "train[1200:]" in opened and "train[:1200]" in opened, opened
