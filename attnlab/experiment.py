"""Experiment assembly: a config becomes typed pieces, then an experiment with its data opened.

In the order a caller uses it:

  1. `ExperimentConfig.from_config(config)`: the ml_collections ConfigDict
     (the command-line boundary: nothing below sees it) becomes frozen
     dataclasses, `TrainerConfig` (the config's own top-level fields),
     `DataConfig`, `OptimConfig` and the model section (field names checked),
     without reading any data, so a typo fails at once. Config files build
     their top level with `new_config` (the TrainerConfig fields, the mesh and
     the sharding rules), stating only what they change.
  2. `build(exp_cfg)` opens the data (a missing data set fails in seconds,
     before any model is built) and completes what the data dictates: the
     model config (classes, image size, vocabulary) and the number of steps
     of the budget. The result is an `Experiment`; `load(config)` is 1 + 2.

Then `Experiment.fns()` gives the model's pure functions on a train state
(`attnlab.model_fns`), and `attnlab.placement` puts that state and the
batches on the devices of the config's mesh and jits the steps.

`attnlab.train` (the single-run loop) and `attnlab.evaluate` (scoring a
checkpoint) both build on these modules and neither imports the other. A study
(`attnlab.studies`) that trains many (kind, subset-size, seed) cells at once
assembles the same way without the loop: it `build`s the experiment once with
the largest subset, `dataclasses.replace`s the model fields per kind, and
`jax.vmap`s `fns.train_step` over (state, batch, total_steps), each cell with
its own budget and so its own learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from attnlab import attention as attention_lib
from attnlab import checks
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import model_fns as model_fns_lib
from attnlab import models
from attnlab import optim
from attnlab import sharding as sharding_lib

MODEL_NAMES = ("vit", "transformer")
BUDGET_FIELDS = ("total_steps", "num_epochs", "total_examples")
# Top-level sections that become their own dataclasses; every other top-level
# field but `engine` (what runs the config: `configlib.engine`) is a TrainerConfig field.
SECTIONS = ("data", "model", "optim")
ENGINE_FIELD = "engine"
# The TrainerConfig fields a study's config leaves out (at their defaults): the
# single run's cadence, which a study sets in config.study, and its seed (each
# cell's seed is in study.seeds; the subsets are one fixed permutation).
SINGLE_RUN_FIELDS = ("seed", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "progress_bar", "diagnostics_examples")
# The fields of config.model that the data set decides (they override the config).
_DATA_MODEL_FIELDS = {"vit": ("num_classes", "image_size", "num_channels"),
                      "transformer": ("vocab_size", "max_len")}


# ----------------------------------------------------------------------------
# 1. Config -> typed pieces (no data read).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
  """The config's own top-level fields (all but the data / model / optim sections).

  Frozen and hashable. Invalid values raise `configlib.ConfigError` naming the
  field, the value and the fix.

  Attributes:
    model_name: "vit" (image classification) or "transformer" (language
      modelling); picks the class config.model is read into.
    batch_size: training examples per step (split across the data axes of
      the mesh): a multiple of their size, at most the size of the (sub)set
      trained on. A larger one is refused by `build`, not clipped: every batch
      would hold some examples twice, and clipping it in silence would change
      the batch size (and with it the step count and the gradient noise) of
      one cell of a sample-efficiency study and not of the others. A study
      with small subsets sets the batch size per subset, so that it is in
      config.json and in the workdir's name.
    eval_batch_size: examples per evaluation batch (the last one is padded);
      a multiple of the data axes' size, like batch_size.
    seed: the parameters, dropout masks and training order (and MQAR's data)
      all derive from it.
    total_steps: budget in optimizer steps.
    num_epochs: budget in passes over the (sub)set trained on.
    total_examples: budget in training examples seen. Exactly one of the
      three budgets is set (`data.resolve_num_steps` turns it into steps).
    label_smoothing: mass of the training targets spread uniformly over the
      classes, in [0, 1); evaluation always scores the plain loss.
    log_every_steps: write training metrics (and check for NaN) this often.
    eval_every_steps: evaluate during training this often; None: at the end only.
    checkpoint_every_steps: save this often; None: only at the end (and on
      preemption).
    keep_checkpoints: how many of the latest checkpoints to keep.
    progress_bar: show a bar on a terminal (log lines otherwise); False: neither.
    diagnostics_examples: evaluation: attention statistics on this many
      evaluation examples.
    mesh: the device mesh, axis name ("data", "fsdp", "model") -> size, -1
      for the rest of the devices; the default {} is {"data": -1}, data
      parallel. Its shape picks the strategy (`attnlab.sharding`: data
      parallel, FSDP, tensor parallel, combined). Stored as `sharding.mesh_shape`.
    sharding_rules: logical axis name -> mesh axis (or a list of them, or
      None: replicated), overriding `sharding.DEFAULT_RULES`. Stored as
      `sharding.sharding_rules` (every name, defaults included).
  """

  model_name: str
  batch_size: int
  eval_batch_size: int
  seed: int = 0
  total_steps: int | None = None
  num_epochs: float | None = None
  total_examples: int | None = None
  label_smoothing: float = 0.0
  log_every_steps: int = 100
  eval_every_steps: int | None = None
  checkpoint_every_steps: int | None = None
  keep_checkpoints: int = 3
  progress_bar: bool = True
  diagnostics_examples: int = 64
  mesh: Mapping[str, int] | sharding_lib.MeshShape = ()
  sharding_rules: Mapping[str, Any] | sharding_lib.Rules = ()

  def __post_init__(self):
    # Checked, completed and made hashable (the config gives dicts).
    object.__setattr__(self, "mesh", sharding_lib.mesh_shape(self.mesh))
    object.__setattr__(self, "sharding_rules", sharding_lib.sharding_rules(self.sharding_rules))
    if self.model_name not in MODEL_NAMES:
      hint = configlib.suggest(str(self.model_name), MODEL_NAMES)
      raise _error("model_name", self.model_name, f"expected one of {MODEL_NAMES}.{hint}")
    if not checks.is_int(self.seed):
      raise _error("seed", self.seed, "expected an int.")
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "keep_checkpoints",
                  "diagnostics_examples"):
      checks.check_positive_int(field, getattr(self, field))
    for field in ("eval_every_steps", "checkpoint_every_steps", "total_steps", "total_examples"):
      checks.check_positive_int(field, getattr(self, field), or_none=True)
    if self.num_epochs is not None and not (checks.is_number(self.num_epochs) and self.num_epochs > 0):
      raise _error("num_epochs", self.num_epochs, "expected a positive number or None.")
    budgets = {f: getattr(self, f) for f in BUDGET_FIELDS if getattr(self, f) is not None}
    if len(budgets) != 1:
      got = ", ".join(f"{k}={v}" for k, v in budgets.items()) or "none"
      raise configlib.ConfigError(
          f"Training budget: exactly one of config.total_steps, config.num_epochs, "
          f"config.total_examples must be set; got {got}. Set one, and the others to None."
      )
    if not (checks.is_number(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0):
      raise _error("label_smoothing", self.label_smoothing, "expected a number in [0, 1); 0: none.")
    if not isinstance(self.progress_bar, bool):
      raise _error("progress_bar", self.progress_bar, "expected True or False.")


_error = checks.field_error


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A config as typed pieces, before any data is read.

  Attributes:
    trainer: the top-level fields.
    data: config.data.
    optim: config.optim.
    model_fields: config.model as given (names checked against the model
      class; for the ViT also `variant`); `model_config` completes it with
      what the data set dictates.
  """

  trainer: TrainerConfig
  data: data_lib.DataConfig
  optim: optim.OptimConfig
  model_fields: dict[str, Any]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ExperimentConfig:
    """Validates `config` and splits it into typed pieces.

    Raises:
      configlib.ConfigError: an unknown or missing field (the message names
        the nearest valid one), an unknown attention kind or impl (likewise),
        or an invalid trainer, data or optimizer value.
    """
    trainer = trainer_config(config)
    with as_config_error():
      data = configlib.to_dataclass(data_lib.DataConfig, config.data, where="config.data")
      optim_cfg = configlib.to_dataclass(optim.OptimConfig, config.optim, where="config.optim")
    return cls(trainer=trainer, data=data, optim=optim_cfg,
               model_fields=model_fields(trainer.model_name, config.model))

  def num_steps(self, spec: data_lib.DataSpec) -> int:
    """The budget in optimizer steps, for a data set of this size."""
    t = self.trainer
    return data_lib.resolve_num_steps(
        batch_size=t.batch_size, num_train_examples=spec.num_train_examples,
        total_steps=t.total_steps, num_epochs=t.num_epochs, total_examples=t.total_examples)

  def model_config(self, spec: data_lib.DataSpec) -> model_fns_lib.ModelConfig:
    """The model's frozen dataclass: config.model plus what the data set dictates.

    For the ViT, `variant` (e.g. "mu/2") names a size and config.model fields
    that are None take the variant's value; class count and image size come
    from the data. For the Transformer, vocabulary and length do.
    """
    fields = dict(self.model_fields)
    if self.trainer.model_name == "vit":
      if spec.task != "classification":
        raise ValueError(f"model_name='vit' needs an image data set; {self.data.name!r} is "
                         f"{spec.task}.")
      data_fields = dict(num_classes=spec.num_classes, image_size=tuple(spec.input_shape[:2]),
                         num_channels=spec.input_shape[2])
      variant = fields.pop("variant", None)
      if variant is None:
        return models.ViTConfig(**{**fields, **data_fields})
      return models.ViTConfig.from_variant(variant, **{**fields, **data_fields})
    if spec.task != "lm":
      raise ValueError(f"model_name='transformer' is set up here for language modelling; "
                       f"{self.data.name!r} is {spec.task}.")
    return models.TransformerConfig(**{**fields, "vocab_size": spec.num_classes,
                                       "max_len": spec.input_shape[0]})


def new_config(engine: str, **fields: Any) -> ml_collections.ConfigDict:
  """A config's top level: its `engine`, the TrainerConfig fields, `mesh` and `sharding_rules`.

  Config files start from it, state only the trainer values that differ from
  `TrainerConfig`'s defaults, then add the data, model and optim sections (and
  a study's `study`). Every field is listed (`configlib.from_dataclass`), so
  the locked config takes a `--config.<field>=...` override of any of them,
  and `sharding.config_sections` gives the mesh and sharding_rules sections
  every field (`--config.mesh.fsdp=-1`).

  Args:
    engine: "train" (one run) or "study" (a study's base experiment: without
      `SINGLE_RUN_FIELDS`, which a study does not read from here).
    **fields: TrainerConfig values; model_name, batch_size and
      eval_batch_size are required.

  Raises:
    configlib.ConfigError: another engine, an unknown or missing field, or a
      single-run field given to a study (each named, with the fix).
  """
  if engine not in ("train", "study"):
    raise configlib.ConfigError(
        f"new_config(engine={engine!r}): expected 'train' or 'study' (an experiment's engines; "
        f"configlib.ENGINES lists every one).{configlib.suggest(str(engine), ('train', 'study'))}")
  excluded = ("mesh", "sharding_rules") + (SINGLE_RUN_FIELDS if engine == "study" else ())
  for name in sorted(set(fields) & set(excluded)):
    fix = ("a study sets its cadence in config.study and its seeds in config.study.seeds"
           if name in SINGLE_RUN_FIELDS else f"set the fields of config.{name} after new_config")
    raise configlib.ConfigError(f"new_config(engine={engine!r}, {name}=...): {fix}.")
  required = [f.name for f in dataclasses.fields(TrainerConfig) if f.default is dataclasses.MISSING]
  missing = [name for name in required if name not in fields]
  if missing:
    raise configlib.ConfigError(f"new_config(...) lacks {missing}: a config states these.")
  config = configlib.from_dataclass(TrainerConfig, exclude=excluded, **fields)
  config.engine = engine
  for name, section in sharding_lib.config_sections().items():
    config[name] = section
  return config


def trainer_config(config: ml_collections.ConfigDict) -> TrainerConfig:
  """The TrainerConfig of `config`'s top-level fields; rejects unknown and missing ones."""
  trainer_fields = dataclasses.fields(TrainerConfig)
  not_trainer = SECTIONS + (ENGINE_FIELD,)
  configlib.check_known(config.keys(), [f.name for f in trainer_fields] + list(not_trainer),
                        where="config")
  required = [f.name for f in trainer_fields if f.default is dataclasses.MISSING]
  missing = sorted(set(SECTIONS + tuple(required)) - set(config.keys()))
  if missing:
    raise configlib.ConfigError(f"Config lacks fields {missing}; start from a file in configs/.")
  return configlib.to_dataclass(
      TrainerConfig, {k: v for k, v in config.items() if k not in not_trainer}, where="config")


def model_fields(model_name: str, section: Mapping[str, Any]) -> dict[str, Any]:
  """config.model as a dict, its names checked against the model class (and `variant`)."""
  fields = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
  cls = models.ViTConfig if model_name == "vit" else models.TransformerConfig
  valid = [f.name for f in dataclasses.fields(cls)] + (["variant"] if model_name == "vit" else [])
  configlib.check_known(fields, valid, where="config.model")
  # The model config checks these too, but only once the data is open, and
  # without a suggestion; a typo in an override should fail at once, like
  # a typo in a field name.
  _check_choice("model.attention", fields.get("attention"), attention_lib.KINDS, "attention kind")
  _check_choice("model.attention_impl", fields.get("attention_impl"), attention_lib.IMPLS,
                "attention impl")
  for name in _DATA_MODEL_FIELDS[model_name]:
    fields.pop(name, None)  # the data set decides these
  return fields


def _check_choice(field: str, value: Any, choices: Iterable[str], what: str) -> None:
  """Refuses a `value` of config.`field` that is not one of `choices` (None: the default)."""
  choices = sorted(choices)
  if value is None or value in choices:
    return
  hint = configlib.suggest(str(value), choices)
  raise _error(field, value, f"not a known {what}.{hint} Expected one of {', '.join(choices)}.")


@contextlib.contextmanager
def as_config_error():
  """Re-raises a ValueError of config building as a ConfigError (its message unchanged).

  The dataclasses of data, optimizer and model raise ValueError naming the
  field; as a ConfigError it is an expected failure that the command line
  prints as one line (`attnlab.cli.run_main`), while a ValueError from
  anywhere else keeps its traceback.
  """
  try:
    yield
  except configlib.ConfigError:
    raise
  except ValueError as e:
    raise configlib.ConfigError(str(e)) from e


# ----------------------------------------------------------------------------
# 2. The data opened: the experiment.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One run's typed pieces with its data opened: what the loop and evaluator work with.

  Attributes:
    trainer: the top-level fields.
    data: the data config.
    datasets: both splits, opened, and their spec.
    model: the model's config (hashable: it keys `model_fns.experiment_fns`).
    optim: the optimizer's config (hashable, likewise).
    num_steps: the budget in optimizer steps.
  """

  trainer: TrainerConfig
  data: data_lib.DataConfig
  datasets: data_lib.Datasets
  model: model_fns_lib.ModelConfig
  optim: optim.OptimConfig
  num_steps: int

  @property
  def task(self) -> str:
    return self.datasets.spec.task

  def fns(self) -> model_fns_lib.ModelFns:
    """The model functions of this experiment (memoised: `model_fns.experiment_fns`)."""
    return model_fns_lib.experiment_fns(self.model, self.optim, self.num_steps,
                                        self.trainer.label_smoothing)


def build(cfg: ExperimentConfig) -> Experiment:
  """Opens the data of `cfg` and completes the model config and budget from it.

  Nothing is written (the digits data set aside, which prepares itself on
  first use), so a caller that builds before it creates its workdir refuses
  a bad config with nothing on disk.

  Raises:
    DatasetNotPreparedError: the data set is missing (before any model is built).
    configlib.ConfigError: the model does not fit the data, the budget gives
      no step, a split or subset does not exist, or the batch size is larger
      than the training set.
  """
  with as_config_error():
    datasets = data_lib.load(cfg.data, seed=cfg.trainer.seed)
    check_batch_size(cfg.trainer, cfg.data, datasets.spec)
    num_steps = cfg.num_steps(datasets.spec)
    model = cfg.model_config(datasets.spec)
  return Experiment(trainer=cfg.trainer, data=cfg.data, datasets=datasets, model=model,
                    optim=cfg.optim, num_steps=num_steps)


def check_batch_size(trainer: TrainerConfig, data: data_lib.DataConfig,
                      spec: data_lib.DataSpec) -> None:
  """Refuses a batch size larger than the training set (see `TrainerConfig.batch_size`).

  Raises:
    configlib.ConfigError: naming both numbers, the field that sets the
      training set's size, and the fix.
  """
  n = spec.num_train_examples
  if trainer.batch_size <= n:
    return
  source = (f"config.data.train_examples={data.train_examples}" if data.train_examples is not None
            else f"config.data.train_split={data.train_split!r} of {data.name!r}")
  raise _error("batch_size", trainer.batch_size,
               f"larger than the {n} training examples ({source}), so every batch would "
               f"repeat examples; refused rather than clipped. Set --config.batch_size to at "
               f"most {n}, or train on at least {trainer.batch_size} examples.")


def load(config: ml_collections.ConfigDict) -> Experiment:
  """`build(ExperimentConfig.from_config(config))`: validate, then open the data."""
  return build(ExperimentConfig.from_config(config))
