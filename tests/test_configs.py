"""Tests of the experiment configs in configs/ and of attnlab.configlib / attnlab.cli."""

import ast
import glob
import os
import re
import subprocess
import sys
import typing

import ml_collections
import pytest
from absl import flags

from attnlab import cli
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import experiment
from attnlab import models
from attnlab import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
STUDY_CONFIG_FILES = sorted(
    os.path.join("sample_efficiency", os.path.basename(p))
    for p in glob.glob(os.path.join(REPO, "configs", "sample_efficiency", "*.py")))

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
  exp_cfg = experiment.ExperimentConfig.from_config(config)
  assert exp_cfg.data == configlib.to_dataclass(data_lib.DataConfig, config.data,
                                                where="config.data")
  assert exp_cfg.optim == configlib.to_dataclass(optim.OptimConfig, config.optim,
                                                 where="config.optim")
  model_cfg = exp_cfg.model_config(_spec(config))
  assert model_cfg.attention == "sigmoid"  # every experiment defaults to the paper's subject
  with pytest.raises(AttributeError):
    config.not_a_field = 1


# The rule for a config's "Expected" section: it opens with either
#   Expected (measured, <conditions>): ... with at least one figure (a number
#     with a unit: 96.97%, 151 s, 1.5 nats), or
#   Expected (not measured on CPU: <reason>): ... the reason in words.
# Estimates may follow the latter, but never stand alone as "not yet measured".
_MEASURED = re.compile(r"^Expected \(measured\b")
_NOT_MEASURED = re.compile(r"^Expected \(not measured on CPU: (?P<reason>.+?)\):")
_FIGURE = re.compile(r"\d(?:[\d,]*\d)?(?:\.\d+)?\s?(?:%|s\b|min\b|ms\b|h\b|nats?\b|bits?\b)")


def _expected_problem(docstring: str) -> str | None:
  """What is wrong with a config docstring's Expected section, or None."""
  start = re.search(r"^Expected\b", docstring, re.M)
  if start is None:
    return 'no paragraph starting "Expected (measured, ...)" or "Expected (not measured on CPU: ...)"'
  section = " ".join(docstring[start.start():].split())
  if "not yet measured" in section.lower():
    return '"not yet measured": measure it, or say "not measured on CPU: <reason>"'
  if _MEASURED.match(section):
    return None if _FIGURE.search(section) else "measured, but no figure (number with a unit)"
  match = _NOT_MEASURED.match(section)
  if match is None:
    return 'the Expected section opens with neither "(measured" nor "(not measured on CPU: "'
  if len(match["reason"].split()) < 4:
    return f"the reason it is not measured is too short: {match['reason']!r}"
  return None


@pytest.mark.parametrize("doc, problem", [
    ("x\n\nExpected (measured, seed 0): 96.97% in 2 min.\n", None),
    ("x\n\nExpected (measured, seed 0): better.\n", "no figure"),
    ("x\n\nExpected (not yet measured in attnlab): about 75%.\n", "not yet measured"),
    ("x\n\nExpected (not measured on CPU: the data is not on the machines): ~75%.\n", None),
    ("x\n\nExpected (not measured on CPU: slow): ~75%.\n", "too short"),
    ("x\n\nExpected: about 75%.\n", "neither"),
    ("x\n", "no paragraph"),
])
def test_the_expected_section_rule(doc, problem):
  found = _expected_problem(doc)
  assert (found is None) if problem is None else (problem in found)


# The studies run by attnlab.studies.study (engine "study"); the synthetic MoE
# estimation study (engine "moe") is checked in tests/test_moe_study.py.
ENGINE_STUDY_CONFIG_FILES = [name for name in STUDY_CONFIG_FILES
                             if configlib.engine(configlib.load(f"configs/{name}")) == "study"]


@pytest.mark.parametrize("name", ENGINE_STUDY_CONFIG_FILES)
@pytest.mark.parametrize("arg", [None, "quick", "all"])
def test_every_study_config_builds_its_study_and_base_experiment(name, arg):
  from attnlab.studies import study as study_lib  # pylint: disable=g-import-not-at-top

  config = configlib.load(f"configs/{name}" + (f":{arg}" if arg else ""))
  assert config.is_locked
  study, exp_cfg = study_lib.split_config(config)
  assert set(study.compare) <= set(study.kinds) and len(study.kinds) >= (7 if arg == "all" else 2)
  assert exp_cfg.data.validation_examples  # model selection on a split carved from training
  groups = study_lib.plan(study, exp_cfg)
  assert sorted(c for g in groups for c in g.cells) == sorted(study.cells)
  assert min(study.train_sizes) >= exp_cfg.trainer.batch_size


def test_the_expected_study_configs_exist():
  assert {"sample_efficiency/digits.py", "sample_efficiency/mqar.py"} <= set(STUDY_CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES + STUDY_CONFIG_FILES)
def test_every_config_documents_its_command_and_expected_result(name):
  with open(os.path.join(REPO, "configs", name), encoding="utf-8") as f:
    module_doc = ast.get_docstring(ast.parse(f.read()))
  assert f"python train.py --config configs/{name}" in module_doc
  assert _expected_problem(module_doc) is None, f"configs/{name}: {_expected_problem(module_doc)}"


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


@pytest.mark.parametrize("name", CONFIG_FILES + STUDY_CONFIG_FILES)
def test_every_config_names_its_engine(name):
  config = configlib.load(f"configs/{name}")
  expected = ("moe" if name.endswith("moe_synthetic.py") else
              "study" if name in STUDY_CONFIG_FILES else "train")
  assert configlib.engine(config) == expected


@pytest.mark.parametrize("engine, message", [
    (None, "names no engine (config.engine)"),
    ("studdy", "names engine 'studdy', which is not one. Did you mean \"study\"?"),
])
def test_a_missing_or_unknown_engine_names_the_engines_and_the_fix(engine, message):
  config = ml_collections.ConfigDict({} if engine is None else {"engine": engine})
  with pytest.raises(configlib.ConfigError) as raised:
    configlib.engine(config)
  assert message in str(raised.value)
  assert all(f"{name!r}:" in str(raised.value) for name in configlib.ENGINES)
  assert 'config.engine = "train"' in str(raised.value)


def test_new_config_lists_the_trainer_fields_the_mesh_and_the_rules():
  config = experiment.new_config("train", model_name="vit", batch_size=8, eval_batch_size=4,
                                 total_steps=3)
  assert config.engine == "train" and config.seed == 0 and config.num_epochs is None
  assert set(config.mesh) == {"data", "fsdp", "model"} and "embed" in config.sharding_rules
  trainer = experiment.trainer_config(
      ml_collections.ConfigDict({**config.to_dict(), "data": {}, "model": {}, "optim": {}}))
  assert trainer == experiment.TrainerConfig(model_name="vit", batch_size=8, eval_batch_size=4,
                                             total_steps=3)
  study = experiment.new_config("study", model_name="vit", batch_size=8, eval_batch_size=4,
                                total_steps=3)
  assert not set(experiment.SINGLE_RUN_FIELDS) & set(study)
  with pytest.raises(configlib.ConfigError, match="a study sets its cadence in config.study"):
    experiment.new_config("study", model_name="vit", batch_size=8, eval_batch_size=4,
                          total_steps=3, log_every_steps=5)
  with pytest.raises(configlib.ConfigError, match=r"lacks \['eval_batch_size'\]"):
    experiment.new_config("train", model_name="vit", batch_size=8, total_steps=3)
  with pytest.raises(configlib.ConfigError, match="expected 'train' or 'study'"):
    experiment.new_config("moe", model_name="vit", batch_size=8, eval_batch_size=4)


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
  # A config in a folder below configs/ is named after the folder too.
  assert cli.default_workdir("configs/sample_efficiency/digits.py:quick") == os.path.join(
      "runs", "sample_efficiency_digits_quick")


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


# ----------------------------------------------------------------------------
# The command line, through the flags train.py and eval.py define (cli).
# ----------------------------------------------------------------------------


def _parse(*overrides: str, config: str | None = None):
  """(config, default workdir) as train.py's flags give them for these arguments."""
  argv = ["train.py"]
  if config is not None:
    argv += ["--config", os.path.join(REPO, "configs", config)]
  argv += list(overrides)
  flag_values = flags.FlagValues()
  cli.define_flags(default_config="configs/digits_vit.py:sigmoid", flag_values=flag_values,
                   argv=argv)
  cli.parse_flags(argv, flag_values)
  return cli.config_and_workdir(flag_values)


def _section_classes(config) -> dict[str, type]:
  """The dataclass each section of `config` is read into, by path ("" = the top level)."""
  model_cls = {"vit": models.ViTConfig, "transformer": models.TransformerConfig}[config.model_name]
  return {"": experiment.TrainerConfig, "data": data_lib.DataConfig,
          "data.mqar": data_lib.MQARSpec, "optim": optim.OptimConfig, "model": model_cls}


def _hints(config, section: str) -> dict[str, typing.Any]:
  return typing.get_type_hints(_section_classes(config)[section])


def _sub(config, section: str):
  for part in filter(None, section.split(".")):
    config = config[part]
  return config


def _nullable_paths(spec: str) -> list[str]:
  """Every field of the config `spec` that may hold None, from its dataclasses' types.

  A field may hold None when its type admits None, or when the config file
  leaves it at None (the ViT sizes that `variant` fills in). A field that holds
  a whole sub-config (MQAR's data.mqar) is set field by field, not to None.
  """
  config = configlib.load(spec)
  paths = []
  for section in [""] + list(_section_classes(config)):
    sub = _sub(config, section) if section == "" or section in config or "." in section else None
    if not isinstance(sub, ml_collections.ConfigDict):
      continue
    hints = _hints(config, section)
    for name in sub:
      value = sub[name]
      if isinstance(value, ml_collections.ConfigDict) or name not in hints:
        continue
      if type(None) in typing.get_args(hints[name]) or value is None:
        paths.append(f"{section}.{name}".lstrip("."))
  return sorted(set(paths))


def _build_typed(config) -> None:
  """Builds every typed piece the trainer makes of `config` (no data read)."""
  exp_cfg = experiment.ExperimentConfig.from_config(config)
  spec = _spec(config)
  exp_cfg.model_config(spec)
  exp_cfg.num_steps(spec)


_NULLABLE_CASES = [(name, path) for name in CONFIG_FILES
                   for path in _nullable_paths(f"configs/{name}")]


def test_the_nullable_fields_include_those_of_issue_8():
  """The enumeration below finds the fields the issue names (it is not empty by accident)."""
  digits = set(_nullable_paths("configs/digits_vit.py"))
  assert {"model.qk_norm", "model.output_gate", "model.layer_scale", "model.mlp_dim",
          "model.num_kv_heads", "model.patch_size", "optim.grad_clip_norm", "optim.warmup_steps",
          "data.train_examples", "eval_every_steps", "num_epochs", "total_steps",
          "total_examples"} <= digits
  assert "batch_size" not in digits and "model.attention" not in digits


@pytest.mark.parametrize("spelling", ["None", "none"])
@pytest.mark.parametrize("name, path", _NULLABLE_CASES)
def test_every_field_that_may_hold_none_takes_none_from_the_command_line(name, path, spelling):
  """`--config.<path>=none` sets None, and the typed configs build (or name the field)."""
  config, _ = _parse(f"--config.{path}={spelling}", config=name)
  section, _, field = path.rpartition(".")
  assert _sub(config, section)[field] is None
  try:
    _build_typed(config)
  except ValueError as e:  # None is not valid here: e.g. the only budget, MQAR's sizes.
    assert f"config.{path}" in str(e) and "'none'" not in str(e).lower(), e


def test_none_is_only_none_where_a_field_may_hold_it():
  # An int field: "none" is a wrong type, as before.
  with pytest.raises(SystemExit, match=r"--config.batch_size=none: invalid literal for int"):
    _parse("--config.batch_size=none")
  # A nullable int field: a typo is still an error.
  with pytest.raises(SystemExit, match=r"--config.data.train_examples=nonee: invalid literal"):
    _parse("--config.data.train_examples=nonee")
  # A nullable str field: a typo is text, which the model config rejects by name.
  config, _ = _parse("--config.model.qk_norm=nonee")
  with pytest.raises(ValueError, match="qk_norm"):
    _build_typed(config)
  # A str field whose choices include the text "none" keeps it.
  config, _ = _parse("--config.model.positions=none", config="mqar_transformer.py")
  assert config.model.positions == "none"
  _build_typed(config)


@pytest.mark.parametrize("path", ["model.qk_norm", "model.output_gate"])
def test_no_nullable_str_choice_is_the_text_none(path):
  """"none" means None on the command line, so it must not also be a valid string value.

  (data.data_dir, a path, is the one nullable str field without choices: a
  directory named none is given as ./none.)
  """
  config = configlib.load("configs/digits_vit.py")
  section, _, field = path.rpartition(".")
  assert type(None) in typing.get_args(typing.get_type_hints(models.ViTConfig)[field])
  _sub(config, section)[field] = "none"
  with pytest.raises(ValueError, match=field):
    _build_typed(config)


def test_a_field_left_at_none_typed_any_takes_a_literal():
  """model.patch_size (typed Any, None = the variant's) takes an int or a pair."""
  config, _ = _parse("--config.model.patch_size=4")
  assert config.model.patch_size == 4
  assert experiment.ExperimentConfig.from_config(config).model_config(_spec(config)).patch_size == (4, 4)
  config, _ = _parse("--config.model.patch_size=(2, 4)")
  assert experiment.ExperimentConfig.from_config(config).model_config(_spec(config)).patch_size == (2, 4)


def test_nullable_fields_keep_their_type():
  section = configlib.from_dataclass(models.ViTConfig, exclude=("num_classes",), layer_scale=1,
                                     qk_norm="rms")
  assert section.layer_scale == 1.0 and isinstance(section.layer_scale, float)
  assert configlib.is_nullable(section, "qk_norm") and not configlib.is_nullable(section, "norm")
  with pytest.raises(configlib.ConfigError, match=r"ViTConfig.qk_norm=3: expected a str or None"):
    configlib.from_dataclass(models.ViTConfig, exclude=("num_classes",), qk_norm=3)
  section.qk_norm = None
  assert section.to_dict()["qk_norm"] is None


# ----------------------------------------------------------------------------
# Default workdirs: runs that differ get different directories.
# ----------------------------------------------------------------------------


def test_an_override_that_changes_the_run_names_a_subdirectory():
  _, workdir = _parse("--config.data.train_examples=500")
  assert workdir == os.path.join("runs", "digits_vit_sigmoid", "train_examples=500")
  _, workdir = _parse("--config.seed=1", "--config.model.qk_norm=none", "--config.optim.b2=0.99")
  assert workdir == os.path.join("runs", "digits_vit_sigmoid", "b2=0.99,qk_norm=None,seed=1")


def test_the_section_prefix_stays_where_a_name_is_ambiguous():
  # MQAR has data.seq_len (text windows) and data.mqar.seq_len.
  _, workdir = _parse("--config.data.mqar.seq_len=16", "--config.model.width=32",
                      config="mqar_transformer.py:softmax")
  assert workdir == os.path.join("runs", "mqar_transformer_softmax", "mqar.seq_len=16,width=32")


@pytest.mark.parametrize("path", configlib.RUN_NEUTRAL_FIELDS)
def test_overrides_that_do_not_change_what_is_trained_keep_the_workdir(path):
  # A study's report settings live in study configs; every other field in the single-run one.
  spec, expected = {
      "study": ("sample_efficiency/digits.py", "sample_efficiency_digits"),
      "moe": ("sample_efficiency/moe_synthetic.py", "sample_efficiency_moe_synthetic"),
  }.get(path.partition(".")[0], ("digits_vit.py:sigmoid", "digits_vit_sigmoid"))
  section, _, field = path.rpartition(".")
  holder = _sub(configlib.load(f"configs/{spec}"), section)
  value, field_type = holder[field], holder.get_type(field)
  field_type = next((t for t in typing.get_args(field_type) if t is not type(None)), field_type)
  other, flag = {bool: lambda: (not value,) * 2, int: lambda: ((value or 0) + 7,) * 2,
                 float: lambda: (value / 2,) * 2, str: lambda: ("/tmp/elsewhere",) * 2,
                 tuple: lambda: (value[::-1], f"({','.join(map(repr, value[::-1]))})")}[field_type]()
  config, workdir = _parse(f"--config.{path}={flag}", config=spec)
  assert configlib.flatten(config)[path] == other  # the override took effect...
  assert workdir == os.path.join("runs", expected)  # ...and names no directory


def test_an_override_to_the_files_own_value_keeps_the_workdir():
  _, workdir = _parse("--config.seed=0", "--config.data.train_examples=none")
  assert workdir == os.path.join("runs", "digits_vit_sigmoid")


def test_run_dirname_is_sorted_sanitised_and_bounded():
  paths = ["seed", "model.patch_size", "model.variant", "data.seq_len", "data.mqar.seq_len"]
  assert configlib.run_dirname({"model.variant": "S/16", "seed": 2, "model.patch_size": (2, 4),
                                "data.seq_len": 8}, paths) == (
                                    "data.seq_len=8,patch_size=2_4,seed=2,variant=S_16")
  long_a = configlib.run_dirname({"model.variant": "x" * 300}, paths)
  long_b = configlib.run_dirname({"model.variant": "x" * 299 + "y"}, paths)
  assert len(long_a) <= 160 and long_a != long_b


def test_fashion_mnist_large_n_is_the_recipe_chosen_for_large_subsets():
  """`:large_n` swaps in the large-n recipe and sizes; with `tune` it stays off the test split."""
  small = configlib.load("configs/sample_efficiency/fashion_mnist.py")
  large = configlib.load("configs/sample_efficiency/fashion_mnist.py:large_n")
  tune = configlib.load("configs/sample_efficiency/fashion_mnist.py:tune,large_n")
  assert (small.optim.learning_rate, small.optim.weight_decay) == (1e-2, 2.0)
  assert (large.optim.learning_rate, large.optim.weight_decay) == (3e-3, 0.1)
  assert tuple(large.study.train_sizes) == (16_000, 32_000, 55_000)
  assert large.data.eval_split == "test" and large.study.seeds == small.study.seeds
  assert tuple(tune.study.train_sizes) == (16_000,) and tune.data.eval_split == "train[50000:]"
  assert (tune.optim.learning_rate, tune.optim.weight_decay) == (3e-3, 0.1)
