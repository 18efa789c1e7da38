"""attnlab.workdir: the same-run check (the lock and finished-run tests come with them)."""

import json
import os

import pytest

from attnlab import configlib
from attnlab import workdir as workdir_lib


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
