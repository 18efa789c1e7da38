"""Helpers shared by the experiment configs in `configs/` and the trainer.

Configs are `ml_collections.ConfigDict`s (one file per experiment, big_vision
style); modules never see them: the trainer turns each sub-dict into a typed
frozen dataclass with `to_dataclass`, which rejects unknown fields with the
nearest valid name.

Fields that may hold None (`nullable`; `from_dataclass` makes every field typed
`T | None` one) take `--config.x=none` on the command line, in any case (none,
None, NONE). Every other field parses as its type: `--config.batch_size=none`
is an error, and a str field that cannot hold None keeps the text "none"
(model.positions, where "none" is a valid choice). A nullable str field cannot
receive the text "none": none of them has it as a choice (qk_norm and
output_gate have None instead), and a data_dir named none is `./none`.

`training_differences`, `RUN_NEUTRAL_FIELDS` and `RUN_NEUTRAL_SECTIONS` say
which fields change what a run trains: attnlab.cli names a run's default
workdir after them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib.util
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections
from absl import flags
from ml_collections import config_flags

T = TypeVar("T")


class ConfigError(ValueError):
  """A config the run cannot use: an unknown field, or a value out of its range.

  The message names the field and, for a typo, suggests the nearest valid
  name; for a value, it names the value, what is valid and the fix.

  An expected failure: the command line prints it as one line
  (`attnlab.cli.run_main`).
  """


def suggest(name: str, valid: Iterable[str]) -> str:
  """Returns ' Did you mean "x"?' for the closest valid name, or ''."""
  close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
  return f' Did you mean "{close[0]}"?' if close else ""


def check_known(names: Iterable[str], valid: Iterable[str], *, where: str) -> None:
  """Raises ConfigError naming the first of `names` that is not in `valid`."""
  valid = sorted(valid)
  for name in names:
    if name not in valid:
      raise ConfigError(
          f"Unknown field {where}.{name}.{suggest(name, valid)} "
          f"Valid fields: {', '.join(valid)}."
      )


def to_dataclass(cls: type[T], fields: Mapping[str, Any] | None, *, where: str, **extra) -> T:
  """Builds the frozen dataclass `cls` from a config sub-dict.

  Args:
    cls: a dataclass type.
    fields: mapping of field name -> value (a ConfigDict or dict); None = {}.
    where: the config path, used in error messages (e.g. "config.model").
    **extra: fields set by the trainer rather than the config (e.g. the
      number of classes read from the data set); they override `fields`.

  Returns:
    `cls(**fields, **extra)`.

  Raises:
    ConfigError: a field of `fields` is not a field of `cls`.
  """
  values = dict(fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else (fields or {}))
  check_known(values, [f.name for f in dataclasses.fields(cls)], where=where)
  values.update(extra)
  return cls(**values)


# ----------------------------------------------------------------------------
# Fields that may hold None.
# ----------------------------------------------------------------------------

# The command-line spelling of None, compared case-insensitively (none, None,
# NONE). Nothing else means None: "null" or an empty value stays an error.
NONE = "none"


class _Nullable(ml_collections.FieldReference):
  """A FieldReference of type T that may also hold None.

  Values are checked and cast as for T (an int set on a float field becomes a
  float). `get_type()` reports `T | None`: config_flags looks that type up to
  pick the parser of a `--config.x=...` override, and the parser registered
  for it below reads "none" as None. A plain typed reference reports T, whose
  parser takes "none" as text (str) or rejects it (int, float).
  """

  def get_type(self):
    return super().get_type() | None


class _LiteralParser(flags.ArgumentParser):
  """A Python literal ("4", "(2, 4)", "{'a': 1}"), else the text itself."""

  def parse(self, argument):
    if not isinstance(argument, str):
      return argument
    try:
      return ast.literal_eval(argument)
    except (SyntaxError, ValueError):
      return argument


class _NoneOrParser(flags.ArgumentParser):
  """Parses "none" (any case) as None and anything else as `base` does."""

  def __init__(self, base: flags.ArgumentParser):
    super().__init__()
    self._base = base

  def parse(self, argument):
    if isinstance(argument, str) and argument.lower() == NONE:
      return None
    return self._base.parse(argument)

  def flag_type(self):
    return f"{self._base.flag_type()} or none"


# The types a nullable field may have; `object` (any Python literal) for one
# that is not a scalar, e.g. ViTConfig.patch_size: an int or a pair.
_BASE_PARSERS = {
    int: flags.IntegerParser(),
    float: flags.FloatParser(),
    str: flags.ArgumentParser(),
    bool: flags.BooleanParser(),
    object: _LiteralParser(),
}
for _type, _parser in _BASE_PARSERS.items():
  config_flags.register_flag_parser_for_type(_type | None, _NoneOrParser(_parser))


def nullable(value: Any, field_type: type) -> ml_collections.FieldReference:
  """A config field that may hold None yet keeps its type.

  A plain None field has type NoneType, and `--config.x=3` cannot override it
  ("Type NoneType ... is not supported for overriding"); a nullable field can,
  may be set back to None (by a `quick` variant, or `--config.x=none`), and
  casts as `field_type` does.

  Args:
    value: the initial value: None or a `field_type`.
    field_type: int, float, str, bool, or object (any Python literal).

  Raises:
    TypeError: `field_type` is none of those, or `value` is not one.
  """
  if field_type not in _BASE_PARSERS:
    raise TypeError(f"nullable(value, field_type={field_type!r}): expected one of "
                    f"{[t.__name__ for t in _BASE_PARSERS]}.")
  return _Nullable(value, field_type=field_type)


def is_nullable(config: ml_collections.ConfigDict, name: str) -> bool:
  """Whether field `name` of `config` may be set to None (`--config.<...>.name=none`)."""
  return type(None) in typing.get_args(config.get_type(name))


_SCALAR_TYPES = (int, float, str, bool)


def _nullable_type(hint: Any, value: Any) -> type | None:
  """The type of a nullable field for dataclass type `hint` and `value`; None: not nullable.

  A field is nullable when its type admits None (`T | None`, T a scalar), or
  when the config leaves it at None (the ViT sizes that `variant` fills in,
  typed int, or Any for patch_size; data.mqar, a dict, for data sets that
  have none). A field of any other type left at None takes a Python literal.
  """
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    others = [a for a in args if a is not type(None)]
    if len(others) == 1 < len(args) and others[0] in _SCALAR_TYPES:
      return others[0]
  if value is None:
    return hint if hint in _SCALAR_TYPES else object
  return None


def from_dataclass(cls: type, *, exclude: Iterable[str] = (), **overrides: Any) -> ml_collections.ConfigDict:
  """A ConfigDict with every field of dataclass `cls` (its default, or None), then `overrides`.

  Listing every field lets `--config.<section>.<field>=...` override any of
  them once the config is locked, and keeps config files short. Fields typed
  `T | None` (T a scalar), and fields left at None, become `nullable`, so the
  command line can set them to a value or to None (`=none`).

  Args:
    cls: the dataclass the trainer will build from this section.
    exclude: fields the trainer sets itself (e.g. num_classes from the data).
    **overrides: values that differ from the dataclass defaults.

  Raises:
    ConfigError: an override names no field of `cls`, or gives a nullable
      field a value of another type.
  """
  values = {}
  for f in dataclasses.fields(cls):
    if f.name in exclude:
      continue
    if f.default is not dataclasses.MISSING:
      values[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
      values[f.name] = f.default_factory()  # type: ignore[misc]
    else:
      values[f.name] = None
  check_known(overrides, list(values), where=cls.__name__)
  values.update(overrides)
  hints = typing.get_type_hints(cls)
  for name, value in values.items():
    field_type = _nullable_type(hints.get(name), value)
    if field_type is None or isinstance(value, ml_collections.FieldReference):
      continue
    try:
      values[name] = nullable(value, field_type)
    except TypeError:
      raise ConfigError(f"{cls.__name__}.{name}={value!r}: expected a {field_type.__name__} or "
                        "None.") from None
  return ml_collections.ConfigDict(values)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses the `:arg` of `--config file.py:arg` (big_vision style).

  `arg` is a comma-separated list. `key=value` sets a field (the value is
  converted to the type of the default); a bare word sets a boolean field of
  that name to True (`quick`), or else is the value of the first non-boolean
  field (`sigmoid` for `attention=sigmoid`).

  Example: `parse_arg("sigmoid,quick", attention="softmax", quick=False)`
  gives `attention="sigmoid", quick=True`.

  Args:
    arg: the string after the colon, or None.
    **defaults: every accepted field and its default value.

  Returns:
    A locked ConfigDict with one entry per default.

  Raises:
    ValueError: an unknown key, or a positional word with no field to take it.
  """
  result = dict(defaults)
  positional = [k for k, v in defaults.items() if not isinstance(v, bool)]
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if "=" in token:
      key, value = token.split("=", 1)
      check_known([key], defaults, where="config argument")
      result[key] = _convert(value, defaults[key], key)
    elif isinstance(defaults.get(token), bool):
      result[token] = True
    elif _close_to_flag(token, defaults):
      raise ConfigError(
          f"Config argument {token!r} is not a flag.{suggest(token, _flags(defaults))} "
          f"Flags: {', '.join(_flags(defaults))}."
      )
    elif positional:
      key = positional.pop(0)
      result[key] = _convert(token, defaults[key], key)
    else:
      raise ConfigError(
          f"Config argument {token!r} is neither a flag nor a value: expected "
          f"a comma-separated list of {sorted(defaults)} (key=value or flag name)."
          f"{suggest(token, defaults)}"
      )
  return ml_collections.ConfigDict(result).lock()


def _flags(defaults: dict[str, Any]) -> list[str]:
  return [k for k, v in defaults.items() if isinstance(v, bool)]


def _close_to_flag(token: str, defaults: dict[str, Any]) -> bool:
  """A misspelt flag ("quik") is an error, not a value for the positional field."""
  return bool(difflib.get_close_matches(token, _flags(defaults), n=1, cutoff=0.75))


def _convert(value: str, default: Any, key: str) -> Any:
  """Converts the string `value` to the type of `default`."""
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"Config argument {key}={value!r}: expected true or false.")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads "path/to/config.py[:arg]" as `--config` does (for tests and notebooks).

  A relative path is tried from the working directory, then from the
  repository root (where configs/ lives).
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, path)
  module_spec = importlib.util.spec_from_file_location("_attnlab_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"No config file {spec.partition(':')[0]!r}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


# ----------------------------------------------------------------------------
# What runs a config: its engine.
# ----------------------------------------------------------------------------

# Every config names the engine that runs it (`config.engine`); train.py and
# eval.py dispatch on it. Name -> what it runs.
ENGINES = {
    "train": "one run (attnlab.train, attnlab.evaluate): configs/*.py",
    "study": "a sample-efficiency study of many cells (attnlab.studies): configs/sample_efficiency/",
    "moe": "the synthetic MoE estimation study (attnlab.moe): configs/sample_efficiency/moe_synthetic.py",
}


def engine(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
  """`config.engine`, checked: one of `ENGINES`.

  Raises:
    ConfigError: the config names no engine, or an unknown one (with "did you
      mean"); the message lists the engines and the fix.
  """
  name = config.get("engine") if isinstance(config, (ml_collections.ConfigDict, Mapping)) else None
  if name in ENGINES:
    return name
  what = ("names no engine (config.engine)" if name is None
          else f"names engine {name!r}, which is not one.{suggest(str(name), ENGINES)}")
  engines = "; ".join(f"{key!r}: {value}" for key, value in ENGINES.items())
  raise ConfigError(f"The config {what} Engines: {engines}. Set config.engine in the config "
                    "file's get_config (e.g. config.engine = \"train\"), or start from a file in "
                    "configs/.")


# ----------------------------------------------------------------------------
# What a run trains: which fields name it.
# ----------------------------------------------------------------------------

# Fields that change how a run is watched or stored, never what it trains: a
# run may resume another's checkpoints with other values of these, and they do
# not name its default workdir (so a resumed run with another log cadence
# finds its checkpoints). Paths as in `flatten`.
RUN_NEUTRAL_FIELDS = (
    "progress_bar", "log_every_steps", "eval_every_steps", "eval_batch_size",
    "checkpoint_every_steps", "keep_checkpoints", "diagnostics_examples", "data.data_dir",
    # A study's report settings and bookkeeping: its cells train the same.
    "study.checkpoint_every_steps", "study.progress_bar", "study.target_error", "study.compare",
    "study.bootstrap", "moe.bootstrap",
    # Which seeds a study holds: a cell trains on its own seed's key and order only, so a
    # study may grow its seeds in its workdir (`study.run` trains the missing cells).
    "study.seeds",
    # How a group's cells are laid out in its program (side by side or in
    # turn): the same numbers to float rounding, as any change of group does.
    "study.vmap_cells",
    # What runs the config (`engine`): fixed by the file, not a choice of what is trained
    # (another engine fails on the sections this file lacks), and absent from the
    # config.json of runs recorded before configs named it, which must still resume.
    "engine",
)
# Top-level sections all of whose fields are run-neutral: where a run's arrays
# live (`attnlab.sharding`), not what it trains. Another mesh gives the same
# numbers to float rounding, and a checkpoint restores onto any mesh.
RUN_NEUTRAL_SECTIONS = ("mesh", "sharding_rules")

# Longest directory name `run_dirname` makes; longer ones end with a hash.
_MAX_DIRNAME = 160


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"data.train_examples": 500, ...}: every leaf of a ConfigDict or nested dict by dotted path."""
  items = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  flat = {}
  for key, value in items.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def training_differences(config: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of `config` that differ from `base` and change what is trained, by path.

  Either may be a ConfigDict, a nested dict (e.g. a saved config.json) or an
  already `flatten`ed dict. The values are `config`'s.
  """
  ours, theirs = flatten(config), flatten(base)
  return {path: ours.get(path) for path in sorted(ours.keys() | theirs.keys())
          if ours.get(path) != theirs.get(path) and not is_run_neutral(path)}


def is_run_neutral(path: str) -> bool:
  """Whether the field at dotted `path` leaves what a run trains unchanged (see above)."""
  return path in RUN_NEUTRAL_FIELDS or path.partition(".")[0] in RUN_NEUTRAL_SECTIONS


def short_names(paths: Iterable[str], all_paths: Iterable[str]) -> dict[str, str]:
  """Each path's shortest ending (whole dotted parts) that no other of `all_paths` has.

  "data.train_examples" -> "train_examples"; "data.seq_len" -> "data.seq_len"
  when the config also has "data.mqar.seq_len" (-> "mqar.seq_len").
  """
  others = list(all_paths)
  names = {}
  for path in paths:
    parts = path.split(".")
    for start in range(len(parts) - 1, -1, -1):
      name = ".".join(parts[start:])
      if not any(p != path and (p == name or p.endswith("." + name)) for p in others):
        break
    names[path] = name
  return names


def run_dirname(differences: Mapping[str, Any], all_paths: Iterable[str]) -> str:
  """A directory name for a run that differs from its config file: "seed=1,train_examples=500".

  Sorted `name=value` pairs, each name the shortest unambiguous ending of its
  path (`short_names`), values sanitised for any file system; a name longer
  than _MAX_DIRNAME characters is cut and ends with a hash of the whole.
  """
  names = short_names(differences, all_paths)
  pairs = sorted(f"{names[path]}={_dirname_value(value)}" for path, value in differences.items())
  dirname = ",".join(pairs)
  if len(dirname) > _MAX_DIRNAME:
    digest = hashlib.sha1(dirname.encode()).hexdigest()[:12]
    dirname = f"{dirname[:_MAX_DIRNAME - 13]}~{digest}"
  return dirname


def _dirname_value(value: Any) -> str:
  """str(value) with anything but letters, digits and . + - replaced by _ ("(2, 4)" -> "2_4")."""
  return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "_"
