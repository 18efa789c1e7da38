"""attnlab/stats: pure NumPy/SciPy (no study types, no JAX), and the paired ratio on arrays."""

import ast
import math
import pathlib

import numpy as np
import pytest

import attnlab.stats
from attnlab.stats import targets

ALLOWED = {"__future__", "dataclasses", "math", "warnings", "collections", "typing", "numpy", "scipy",
           "attnlab"}


@pytest.mark.parametrize("path", sorted(pathlib.Path(attnlab.stats.__file__).parent.glob("*.py")),
                         ids=lambda p: p.name)
def test_stats_imports_only_numpy_scipy_and_itself(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [node.module]
    else:
      continue
    for name in names:
      assert name.split(".")[0] in ALLOWED, f"{path.name} imports {name}"
      if name.startswith("attnlab"):
        assert name.startswith("attnlab.stats"), f"{path.name} imports {name}: stats sits below the studies"


def test_paired_samples_ratio_on_arrays():
  # Rows are seeds, columns sizes 100, 1000; a NaN is a missing result, left out of that size's mean.
  a = np.array([[0.4, 0.1], [0.4, math.nan]])  # mean 0.4 -> 0.1: crosses 0.2 at 10^(2 + 2/3)
  b = np.array([[0.3, 0.1], [0.3, 0.1]])  # crosses 0.2 at 10^2.5
  r = targets.paired_samples_ratio([100, 1000], a, b, 0.2, ("a", "b"), n_boot=10)
  assert r.value == pytest.approx(10 ** (2 / 3) / 10 ** 0.5)
  assert (r.pairs, r.bound) == (2, "=")
  # A draw of seed 1 twice has no result at n=1000: a never reaches 0.2 there and is left out;
  # every other draw holds seed 0, so its curves are the point estimate's.
  assert 0 < r.boot_ok < 10 and r.ci == pytest.approx((r.value, r.value))
  with pytest.raises(ValueError, match=r"one \[seeds, sizes=2\] shape"):
    targets.paired_samples_ratio([100, 1000], a, b[:1], 0.2, ("a", "b"))
