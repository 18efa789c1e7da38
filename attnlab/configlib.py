"""Helpers shared by the experiment configs in `configs/` and the trainer.

Configs are `ml_collections.ConfigDict`s (one file per experiment, big_vision
style); modules never see them: the trainer turns each sub-dict into a typed
frozen dataclass with `to_dataclass`, which rejects unknown fields with the
nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")


class ConfigError(ValueError):
  """A config names a field that does not exist (the message suggests the nearest)."""


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


def nullable(value: Any, field_type: type) -> ml_collections.FieldReference:
  """A config field that may hold None yet keeps its type.

  A plain None field has type NoneType, and `--config.x=3` cannot override it
  ("Type NoneType ... is not supported for overriding"); a typed reference can,
  and may still be set to None later (e.g. by a `quick` variant).
  """
  return ml_collections.FieldReference(value, field_type=field_type)


_OVERRIDABLE_TYPES = (int, float, str, bool)


def _scalar_type(hint: Any) -> type | None:
  """int for `int`, `int | None` or Optional[int] (likewise float, str, bool); else None."""
  if hint in _OVERRIDABLE_TYPES:
    return hint
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in _OVERRIDABLE_TYPES:
      return args[0]
  return None


def from_dataclass(cls: type, *, exclude: Iterable[str] = (), **overrides: Any) -> ml_collections.ConfigDict:
  """A ConfigDict with every field of dataclass `cls` (its default, or None), then `overrides`.

  Listing every field lets `--config.<section>.<field>=...` override any of
  them once the config is locked, and keeps config files short. Fields that
  hold None and are typed `T` or `T | None` (T a scalar) become `nullable`
  references, so they can be overridden from the command line too.

  Args:
    cls: the dataclass the trainer will build from this section.
    exclude: fields the trainer sets itself (e.g. num_classes from the data).
    **overrides: values that differ from the dataclass defaults.
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
    field_type = _scalar_type(hints.get(name))
    if value is None and field_type is not None:
      values[name] = nullable(None, field_type)
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
