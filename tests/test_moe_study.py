"""attnlab.moe: data, f*, fits, rates and the quick study end to end (train.py / eval.py).

References are float64 NumPy written here, independent of the package's JAX code.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from attnlab import configlib
from attnlab.moe import fit
from attnlab.moe import losses
from attnlab.moe import model
from attnlab.moe import rates
from attnlab.moe import study
from attnlab.moe.config import MoEStudyConfig
from attnlab.moe.config import study_config

CONFIG = "configs/sample_efficiency/moe_synthetic.py"
QUICK = CONFIG + ":quick"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides) -> MoEStudyConfig:
  return MoEStudyConfig(**{"train_sizes": (10, 20), "seeds": (0, 1), "truth_seeds": (0,),
                           "test_examples": 50, **overrides})


def test_data_is_deterministic_by_truth_and_seed_and_nested_in_n():
  cfg = _cfg()
  x, noise = model.draw_data(cfg, 0, 0, 20)
  x2, noise2 = model.draw_data(cfg, 0, 0, 20)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(noise, noise2)
  x_small, noise_small = model.draw_data(cfg, 0, 0, 10)
  np.testing.assert_array_equal(x_small, x[:10])
  np.testing.assert_array_equal(noise_small, noise[:10])
  assert not np.allclose(model.draw_data(cfg, 0, 1, 20)[0], x)
  assert not np.allclose(model.draw_data(cfg, 1, 0, 20)[0], x)


def test_truths_differ_by_seed_and_their_atoms_are_separated():
  cfg = _cfg(true_experts=3)
  draws = [model.ground_truth(cfg, t) for t in range(5)]
  assert all(model._separated(p) for p in draws)
  assert not np.allclose(draws[0]["A"], draws[1]["A"])
  sparse = model.ground_truth(_cfg(true_experts=3, regime="sparse"), 0)
  assert np.all(sparse["A"][0] == 0) and np.all(sparse["b"][0] == 0)
  np.testing.assert_array_equal(sparse["a"], draws[0]["a"])


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("expert", sorted(model.EXPERTS))
@pytest.mark.parametrize("score", ["full", "partial"])
def test_the_jax_model_matches_the_losses_numpy_regression(gate, expert, score):
  cfg = _cfg(score=score, dim=3, true_experts=3)
  truth = model.ground_truth(cfg, 0)
  assert ("b" in truth) == (score == "full")
  x = np.asarray(model.test_inputs(cfg, 0), np.float64)
  want = []
  for xi in x:
    s = np.array([xi @ truth["A"][k] @ xi + (truth["b"][k] @ xi if "b" in truth else 0.0) + truth["c"][k]
                  for k in range(3)])
    g = 1 / (1 + np.exp(-s)) if gate == "sigmoid" else np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    z = truth["a"] @ xi + truth["e"]
    h = {"linear": z, "relu": np.maximum(z, 0), "polynomial": z + z * z / 2,
         "gelu": 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))}[expert]
    want.append(np.sum(g * h))
  got = model.predict({k: np.float32(v) for k, v in truth.items()}, np.float32(x), gate, expert)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(losses.regression(truth, x, gate, expert), want, rtol=1e-12, atol=1e-12)


def test_noise_free_exactly_specified_fits_recover_the_truth_in_float64():
  cfg = _cfg(noise_std=0.0, train_sizes=(400,), seeds=(0,), restarts=3, adam_steps=500,
             lbfgs_steps=1000, lbfgs_rounds=2, true_experts=2, fitted_experts=2,
             experts=("relu",), test_examples=500)
  record = study.fit_group(cfg, "relu", 400)
  same = {c["student"]: c for c in record["cells"] if c["truth"] == c["student"]}
  for gate in ("sigmoid", "softmax"):
    assert same[gate]["train_mse"] < 1e-8, (gate, same[gate]["train_mse"])
    assert same[gate]["voronoi"] < 1e-3 and same[gate]["expert_loss"] < 1e-3, same[gate]
    assert same[gate]["regime"] == "exact"
  assert all(math.isnan(c["voronoi"]) for c in record["cells"] if c["truth"] != c["student"])
  assert all(np.asarray(c["params"]["a"]).dtype == np.float64 for c in record["cells"])


def test_rates_recover_a_known_slope_and_pair_the_difference():
  rng = np.random.default_rng(0)
  sizes = np.array([1e3, 3e3, 1e4, 3e4])
  unit = np.exp(rng.normal(0, 0.5, size=(40, 1)))  # a unit's level, shared by both students
  a = unit * sizes ** -0.5 * np.exp(rng.normal(0, 0.1, (40, 4)))
  b = unit * sizes ** -0.3 * np.exp(rng.normal(0, 0.1, (40, 4)))
  for statistic in ("mean", "median"):
    s = rates.curve_slope(sizes, a, statistic=statistic, n_boot=300)
    assert s.ci[0] < -0.5 < s.ci[1] and abs(s.slope + 0.5) < 0.05
    d = rates.paired_slope_difference(sizes, a, b, statistic=statistic, n_boot=300)
    assert d.ci[0] < -0.2 < d.ci[1] and d.excludes_zero()
    assert 0 < d.detectable < 0.2
  same = rates.paired_slope_difference(sizes, a, a * 1.1, n_boot=300)
  assert same.difference == pytest.approx(0, abs=1e-12) and not same.excludes_zero()
  # A result left out (NaN) drops from its size only.
  holed = a.copy()
  holed[:5, 2] = np.nan
  assert abs(rates.slope(sizes, holed) + 0.5) < 0.06
  with pytest.raises(ValueError, match="same"):
    rates.paired_slope_difference(sizes, a, b[:-1])


def test_config_errors_name_the_field_and_the_fix():
  with pytest.raises(configlib.ConfigError, match=r"config.moe.experts=.*Did you mean \"relu\""):
    _cfg(experts=("rellu",))
  with pytest.raises(configlib.ConfigError, match=r"config.moe.fitted_experts=1"):
    _cfg(fitted_experts=1)
  with pytest.raises(configlib.ConfigError, match="attention family"):
    _cfg(family="attention")
  with pytest.raises(configlib.ConfigError, match="truth_seeds"):
    _cfg(truth_seeds=(0, 0))


def test_the_quick_variant_runs_end_to_end_and_resumes(tmp_path):
  config = configlib.load(os.path.join(ROOT, QUICK))
  cfg = study_config(config)
  workdir = str(tmp_path)
  summary = study.run(config, workdir)
  assert summary["fitted_groups"] == len(cfg.train_sizes) * len(cfg.experts)
  assert not summary["missing_groups"]
  table = study.rows(cfg, study.recorded(workdir))
  assert len(table) == len(study.problems(cfg)) * len(cfg.students) * len(cfg.train_sizes)
  assert {r["regime"] for r in table if r["truth"] == r["student"]} <= {"exact", "dense", "sparse", "mixed"}
  with open(summary["paths"]["report"], encoding="utf-8") as f:
    text = f.read()
  assert "Paired slope differences" in text and "own truths" in text and "worse than truth" in text
  for path in summary["paths"].values():
    assert os.path.getsize(path) > 0
  again = study.run(config, workdir)
  assert again["fitted_groups"] == 0  # NaN-aware: an undefined interval equals itself
  assert json.dumps(again["differences"]) == json.dumps(summary["differences"])
  for script, said in (("train.py", "0 groups fitted"), ("eval.py", "report:")):
    out = subprocess.run([sys.executable, script, "--config", QUICK, "--workdir", workdir],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and said in out.stdout and "Rates" in out.stdout, (
        script, out.stdout[-2000:], out.stderr[-2000:])
  other = configlib.load(os.path.join(ROOT, QUICK + ",sparse"))
  with pytest.raises(configlib.ConfigError, match="another config"):
    study.run(other, workdir)


@pytest.mark.parametrize("arg", [None, "quick", "large", "attention", "sparse", "partial", "relu",
                                 "quick,attention", "linear,gelu"])
def test_every_variant_of_the_config_builds(arg):
  config = configlib.load(os.path.join(ROOT, CONFIG) + (f":{arg}" if arg else ""))
  assert config.is_locked and configlib.engine(config) == "moe"
  cfg = study_config(config)
  assert set(cfg.students) == set(cfg.truths) == {"sigmoid", "softmax"}
  if arg in (None, "large", "sparse", "partial", "relu", "linear,gelu"):
    assert cfg.fitted_experts > cfg.true_experts == 3
    assert len(cfg.truth_seeds) >= 5 and len(cfg.truth_seeds) * len(cfg.seeds) >= 40
    assert len(cfg.rate_sizes) >= 4 and cfg.rate_sizes[0] >= 1000 and cfg.float64
  if arg == "linear,gelu":
    assert cfg.experts == ("linear", "gelu")


def test_fits_leave_jax_in_float32():
  cfg = _cfg(train_sizes=(20,), seeds=(0,), restarts=1, adam_steps=5, lbfgs_steps=5, lbfgs_rounds=1)
  study.fit_group(dataclasses.replace(cfg, experts=("linear",)), "linear", 20)
  assert jax.numpy.zeros(1).dtype == np.float32


def test_the_oracle_restart_starts_at_the_truth_and_the_truths_training_loss_is_the_noise():
  cfg = _cfg(truth_seeds=(0, 1), true_experts=2, fitted_experts=3, init_at_truth=True)
  truths = [model.ground_truth(cfg, t) for t in (0, 1)]
  inits = {k: jax.numpy.zeros((2, 3, 3) + v.shape[1:]) for k, v in truths[0].items()}  # [P, R, k, ...]
  started = study._start_at_truth(inits, truths, 2)
  for p, truth in enumerate(truths):
    for k, v in truth.items():
      np.testing.assert_array_equal(started[k][p, 0, :2], v)
      assert not np.any(started[k][p, 1:]) and not np.any(started[k][p, 0, 2:])
  mse = study.truth_train_mse(cfg, 1, 0)
  with fit.precision(cfg):  # the fits' data are drawn in float64
    noise = np.asarray(model.draw_data(cfg, 1, 0, 20)[1], np.float64)
  np.testing.assert_allclose(mse, [np.mean(noise[:10] ** 2), np.mean(noise ** 2)], rtol=1e-6)
  with pytest.raises(configlib.ConfigError, match="init_at_truth"):
    _cfg(family="attention", experts=("linear",), init_at_truth=True)
