"""attnlab/stats: pure NumPy/SciPy (no study types, no JAX), and the paired ratio on arrays."""

import ast
import math
import pathlib

import numpy as np
import pytest

import attnlab.stats
from attnlab.stats import proportions
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


# Published Wilson 95% intervals (Newcombe 1998, Table I; Brown, Cai & DasGupta 2001):
# 0/10, 1/10, 5/10, 10/10 and 81/263.
@pytest.mark.parametrize("k,t,low,high", [(0, 10, 0.0, 0.2775), (1, 10, 0.0179, 0.4042),
                                          (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
                                          (81, 263, 0.2553, 0.3662)])
def test_wilson_interval_matches_published_values(k, t, low, high):
  assert proportions.wilson_interval(k, t) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("k,t", [(0, 5), (2, 5), (3, 7), (6, 6), (40, 100)])
def test_wilson_bounds_solve_the_score_equation(k, t):
  # Independent of the closed form: each bound inside (0, 1) is a p at which the score
  # statistic (k/t - p) / sqrt(p (1 - p) / t) equals -+1.96, and k/t lies between them.
  z = 1.959963984540054
  low, high = proportions.wilson_interval(k, t)
  assert low <= k / t <= high
  for p, sign in ((low, 1), (high, -1)):
    if 0 < p < 1:
      assert (k / t - p) / math.sqrt(p * (1 - p) / t) == pytest.approx(sign * z, rel=1e-9)


def test_wilson_interval_rejects_impossible_counts():
  with pytest.raises(ValueError, match="at least one trial"):
    proportions.wilson_interval(0, 0)
  with pytest.raises(ValueError, match=r"\[0, trials=3\]"):
    proportions.wilson_interval(4, 3)


@pytest.mark.parametrize("only_a,only_b,p", [(0, 6, 2 / 64), (1, 5, 2 * 7 / 64), (3, 3, 1.0),
                                             (0, 0, 1.0), (0, 1, 1.0), (10, 0, 2 / 1024)])
def test_mcnemar_exact_p_on_counted_tails(only_a, only_b, p):
  assert proportions.mcnemar_exact_p(only_a, only_b) == pytest.approx(p, rel=1e-12)
  assert proportions.mcnemar_exact_p(only_b, only_a) == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("only_a,only_b", [(2, 9), (7, 1), (12, 20)])
def test_mcnemar_exact_p_agrees_with_scipys_binomial_test(only_a, only_b):
  from scipy import stats
  expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
  assert proportions.mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)
  with pytest.raises(ValueError, match=">= 0"):
    proportions.mcnemar_exact_p(-1, 2)
