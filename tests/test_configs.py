"""Tests of the experiment configs in configs/ and of attnlab.configlib / attnlab.cli."""

import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from attnlab import cli
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import optim
from attnlab import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py")))

# The shape of each data set, so that model configs build without the data.
SPECS = {
    "digits": data_lib.DataSpec("classification", 10, (8, 8, 1), 1500, 297),
    "mnist": data_lib.DataSpec("classification", 10, (28, 28, 1), 60000, 10000),
    "fashion_mnist": data_lib.DataSpec("classification", 10, (28, 28, 1), 60000, 10000),
    "cifar10": data_lib.DataSpec("classification", 10, (32, 32, 3), 50000, 10000),
    "mqar": None,  # from the config's own MQAR fields
    "tiny_shakespeare": None,  # from the config's seq_len
}


def _spec(config):
  name = config.data.name
  if name == "mqar":
    return data_lib.DataSpec("lm", config.data.mqar.vocab_size, (config.data.mqar.seq_len,), 1, 1)
  if name == "tiny_shakespeare":
    return data_lib.DataSpec("lm", 256, (config.data.seq_len,), 1, 1)
  return SPECS[name]


def test_the_expected_experiments_exist():
  assert {"digits_vit.py", "mnist_vit.py", "cifar10_vit.py", "mqar_transformer.py",
          "shakespeare_char.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_every_config_builds_typed_configs(name, arg):
  config = configlib.load(f"configs/{name}" + (f":{arg}" if arg else ""))
  assert config.is_locked
  train.check_config(config)
  configlib.to_dataclass(data_lib.DataConfig, config.data, where="config.data")
  configlib.to_dataclass(optim.OptimConfig, config.optim, where="config.optim")
  model_cfg = train.model_config(config, _spec(config))
  assert model_cfg.attention == "sigmoid"  # every experiment defaults to the paper's subject
  with pytest.raises(AttributeError):
    config.not_a_field = 1


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_documents_its_command_and_expected_result(name):
  module_doc = open(os.path.join(REPO, "configs", name)).read()
  assert f"python train.py --config configs/{name}" in module_doc
  assert "Expected" in module_doc


def test_softmax_and_sigmoid_differ_only_in_the_kind():
  sig = configlib.load("configs/digits_vit.py:sigmoid").to_dict()
  soft = configlib.load("configs/digits_vit.py:softmax").to_dict()
  assert soft["model"].pop("attention") == "softmax"
  assert sig["model"].pop("attention") == "sigmoid"
  assert sig == soft


def test_train_examples_argument_reaches_the_data_config():
  config = configlib.load("configs/digits_vit.py:softmax,train_examples=100")
  assert config.data.train_examples == 100 and config.model.attention == "softmax"


def test_parse_arg():
  args = configlib.parse_arg("relu,quick,n=3", attention="sigmoid", quick=False, n=1)
  assert args.to_dict() == {"attention": "relu", "quick": True, "n": 3}
  assert configlib.parse_arg(None, attention="sigmoid").attention == "sigmoid"
  with pytest.raises(configlib.ConfigError, match='Did you mean "quick"'):
    configlib.parse_arg("quik", attention="sigmoid", quick=False)
  with pytest.raises(configlib.ConfigError, match='Did you mean "attention"'):
    configlib.parse_arg("attentoin=relu", attention="sigmoid", quick=False)


def test_from_dataclass_lists_every_field_and_rejects_unknown_ones():
  section = configlib.from_dataclass(optim.OptimConfig, learning_rate=0.5)
  assert section.learning_rate == 0.5 and section.b2 == optim.OptimConfig().b2
  with pytest.raises(configlib.ConfigError, match='Did you mean "weight_decay"'):
    configlib.from_dataclass(optim.OptimConfig, weight_decy=0.1)


def test_to_dataclass_suggests_the_nearest_field():
  with pytest.raises(configlib.ConfigError, match=r'config.optim.lerning_rate. Did you mean "learning_rate"'):
    configlib.to_dataclass(optim.OptimConfig, ml_collections.ConfigDict({"lerning_rate": 1.0}),
                           where="config.optim")


def test_default_workdir_is_per_config_and_argument():
  assert cli.default_workdir("configs/digits_vit.py:sigmoid") == os.path.join(
      "runs", "digits_vit_sigmoid")
  assert cli.default_workdir("/x/configs/mqar_transformer.py:softmax,train_examples=100") == (
      os.path.join("runs", "mqar_transformer_softmax_train_examples_100"))
  assert cli.default_workdir("configs/digits_vit.py") == os.path.join("runs", "digits_vit")


@pytest.mark.parametrize("flags", [
    [],  # the default config, with the bad override only
    ["--config", os.path.join(REPO, "configs/mqar_transformer.py:quick")],
])
def test_command_line_override_typo_is_a_one_line_error(flags, tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), *flags, "--workdir", str(tmp_path),
       "--config.optim.learning_ratee=0.1"],
      capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1
  assert 'Did you mean "learning_rate"' in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.parametrize("name", ["digits_vit.py", "mqar_transformer.py"])
def test_fields_that_hold_none_can_be_overridden_from_the_command_line(name, monkeypatch):
  """`--config.data.train_examples=500` is how a sample-efficiency run picks its subset."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = ["prog", "--config.data.train_examples=500", "--config.total_examples=1000",
          "--config.eval_every_steps=5", "--config.model.mlp_dim=48",
          "--config.data.data_dir=/tmp/tfds"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides when defined
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", name + ":quick"),
                                  flag_values=flag_values, lock_config=True)
  flag_values(argv)
  config = flag_values.config
  assert (config.data.train_examples, config.total_examples, config.eval_every_steps,
          config.model.mlp_dim, config.data.data_dir) == (500, 1000, 5, 48, "/tmp/tfds")
  # Typed references still read as plain values and may be set back to None.
  assert config.to_dict()["data"]["train_examples"] == 500
  config.total_examples = None
  assert config.total_examples is None
