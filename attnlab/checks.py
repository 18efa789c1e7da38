"""Checks of config values, one rule for all: the typed configs' `__post_init__` use them.

An int is a Python or NumPy integer, never a bool (True is an int to Python,
not a size to a config); a number is an int or a Python or NumPy float. Every
error names the field as the config spells it, the value seen and the fix.
(`attnlab/models/config.py` has its own `config_error`, a ValueError that
names the dataclass instead; it predates this module.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnlab.configlib import ConfigError


def is_int(value: Any) -> bool:
  """Whether `value` is an int (Python or NumPy), not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_int_scalar(value: Any) -> bool:
  """Whether `value` is an int (as `is_int`) or a 0-d integer array, concrete or traced."""
  dtype = getattr(value, "dtype", None)
  return is_int(value) or (dtype is not None and np.issubdtype(dtype, np.integer)
                           and np.ndim(value) == 0)


def is_number(value: Any) -> bool:
  """Whether `value` is an int (as `is_int`) or a float (Python or NumPy)."""
  return is_int(value) or isinstance(value, (float, np.floating))


def field_error(field: str, value: Any, fix: str, *, section: str | None = None) -> ConfigError:
  """`config.<section>.<field>=<value>: <fix>` as a ConfigError."""
  name = f"{section}.{field}" if section else field
  return ConfigError(f"config.{name}={value!r}: {fix}")


def check_positive_int(field: str, value: Any, *, or_none: bool = False,
                       section: str | None = None) -> None:
  """Refuses anything but an int >= 1 (or None, with or_none)."""
  if value is None and or_none:
    return
  if not (is_int(value) and value >= 1):
    raise field_error(field, value, f"expected a positive int{' or None' if or_none else ''}.",
                      section=section)
