"""attnlab/checks.py: one rule for config values in every typed config."""

import numpy as np
import pytest

from attnlab import checks
from attnlab import configlib


@pytest.mark.parametrize("value, is_int", [(3, True), (np.int64(3), True), (np.int32(-1), True),
                                           (True, False), (np.bool_(True), False), (3.0, False),
                                           ("3", False)])
def test_a_numpy_integer_is_an_int_and_a_bool_is_not(value, is_int):
  assert checks.is_int(value) is is_int
  assert checks.is_number(value) is is_int or isinstance(value, float)


def test_check_positive_int_names_the_field_with_its_section():
  checks.check_positive_int("seeds", np.int64(2), section="study")
  checks.check_positive_int("vmap_cells", None, or_none=True, section="study")
  with pytest.raises(configlib.ConfigError, match=r"^config\.study\.bootstrap=0: expected a positive int\.$"):
    checks.check_positive_int("bootstrap", 0, section="study")
  with pytest.raises(configlib.ConfigError, match=r"^config\.seed=True: expected a positive int or None\.$"):
    checks.check_positive_int("seed", True, or_none=True)
