"""What `config.moe` may hold: the synthetic estimation study's settings, checked."""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

from attnlab import checks
from attnlab import configlib

SECTION = "moe"
FAMILIES = ("moe", "attention")
GATE_NAMES = ("sigmoid", "softmax")
EXPERT_NAMES = ("linear", "relu", "gelu", "polynomial")


@dataclasses.dataclass(frozen=True)
class MoEStudyConfig:
  """The study's settings (`config.moe`).

  Attributes:
    family: "moe" (quadratic-gating mixture of experts) or "attention" (one head).
    truths: gates of the ground truths.
    students: gates of the fitted models; every student is fitted to every truth.
    experts: expert types (model.EXPERTS); the attention family has linear values only.
    score: "full" (x^T A x + b^T x + c) or "partial" (no linear term b).
    regime: "dense" (every true gate slope non-zero) or "sparse" (true atom 0 has
      zero gate slopes A_0 = 0, b_0 = 0: a constant gate; see model.ground_truth).
    dim: input dimension d.
    tokens: tokens N per example (attention family).
    true_experts: k*, atoms of the truth.
    fitted_experts: k, atoms of each student (k > k*: over-specified).
    truth_seeds: one ground truth per seed (parameters drawn from it).
    noise_std: standard deviation of the Gaussian noise added to f*(X).
    train_sizes: sample sizes n, increasing.
    seeds: repetitions per truth: each draws its own inputs, noise and inits.
    restarts: random initialisations per fit; the lowest training loss is kept.
    adam_steps, learning_rate: full-batch Adam phase.
    adam_examples: Adam sees the first this many training examples (0: all).
    lbfgs_steps: L-BFGS loss evaluations per round (0: no L-BFGS).
    lbfgs_rounds: rounds of L-BFGS; a round after the first continues only the
      fits that have not met the convergence test.
    lbfgs_tolerance: converged when the loss fell by at most this fraction over
      the last lbfgs.WINDOW evaluations.
    float64: fit in float64 (jax x64 inside the fit only).
    init_scale: standard deviation of the students' initial parameters.
    init_at_truth: restart 0 starts from the truth's atoms (the extra atoms
      random): the theory's estimator is the global least-squares fit, and
      random restarts can end in local minima that fit the training data worse
      than the truth itself (the report counts them); the literature's own
      simulations start near the truth (2305.03288's code).
    test_examples: fresh inputs of the test MSE and of the losses' expectations.
    negligible: an atom whose removal changes f by less than this mean square
      (relative to E f*(x)^2, over the test inputs) is pruned before scoring.
    rate_min_n: rates are fitted over the sizes n >= this.
    bootstrap: bootstrap replicates of slopes and slope differences.
  """

  family: str = "moe"
  truths: tuple[str, ...] = GATE_NAMES
  students: tuple[str, ...] = GATE_NAMES
  experts: tuple[str, ...] = ("linear", "relu")
  score: str = "full"
  regime: str = "dense"
  dim: int = 2
  tokens: int = 4
  true_experts: int = 3
  fitted_experts: int = 4
  truth_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  noise_std: float = 0.1
  train_sizes: tuple[int, ...] = (1000, 2154, 4642, 10000)
  seeds: tuple[int, ...] = tuple(range(8))
  restarts: int = 3
  adam_steps: int = 1000
  learning_rate: float = 0.02
  adam_examples: int = 0
  lbfgs_steps: int = 1000
  lbfgs_rounds: int = 3
  lbfgs_tolerance: float = 1e-6
  float64: bool = True
  init_scale: float = 1.0
  init_at_truth: bool = False
  test_examples: int = 4096
  negligible: float = 1e-8
  rate_min_n: int = 1000
  bootstrap: int = 1000

  def __post_init__(self):
    for name in ("truths", "students", "experts", "train_sizes", "seeds", "truth_seeds"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    _choice("family", self.family, FAMILIES)
    _choice("score", self.score, ("full", "partial"))
    _choice("regime", self.regime, ("dense", "sparse"))
    for name, known in (("truths", GATE_NAMES), ("students", GATE_NAMES),
                        ("experts", EXPERT_NAMES)):
      values = getattr(self, name)
      if not values or len(set(values)) != len(values):
        raise _error(name, values, "expected at least one name, each once.")
      for v in values:
        if v not in known:
          raise _error(name, values, f"{v!r} is unknown.{configlib.suggest(v, known)} "
                       f"Known: {', '.join(known)}.")
    if self.family == "attention" and self.experts != ("linear",):
      raise _error("experts", self.experts, "the attention family mixes linear values: "
                   "set experts=('linear',).")
    sizes = self.train_sizes
    if not sizes or any(not checks.is_int(n) or n < 2 for n in sizes) or list(sizes) != sorted(set(sizes)):
      raise _error("train_sizes", sizes, "expected ints >= 2 in increasing order, each once.")
    for name in ("seeds", "truth_seeds"):
      values = getattr(self, name)
      if not values or any(not checks.is_int(s) or s < 0 for s in values) or len(set(values)) != len(values):
        raise _error(name, values, "expected non-negative ints, each once.")
    for name in ("dim", "tokens", "true_experts", "restarts", "test_examples", "bootstrap",
                 "lbfgs_rounds"):
      checks.check_positive_int(name, getattr(self, name), section=SECTION)
    for name in ("adam_steps", "adam_examples", "lbfgs_steps", "rate_min_n"):
      if not checks.is_int(getattr(self, name)) or getattr(self, name) < 0:
        raise _error(name, getattr(self, name), "expected a non-negative int.")
    if self.fitted_experts < self.true_experts:
      raise _error("fitted_experts", self.fitted_experts,
                   f"expected >= true_experts={self.true_experts} (an over-specified fit).")
    if self.adam_steps + self.lbfgs_steps == 0:
      raise _error("adam_steps", self.adam_steps, "no optimiser step at all: set adam_steps "
                   "or lbfgs_steps > 0.")
    for name in ("float64", "init_at_truth"):
      if not isinstance(getattr(self, name), bool):
        raise _error(name, getattr(self, name), "expected True or False.")
    if self.init_at_truth and self.family != "moe":
      raise _error("init_at_truth", True, "only the moe family has atoms to start from.")
    for name in ("noise_std", "learning_rate", "init_scale", "lbfgs_tolerance", "negligible"):
      value = getattr(self, name)
      may_be_zero = name in ("noise_std", "lbfgs_tolerance", "negligible")
      if not checks.is_number(value) or value < 0 or (value == 0 and not may_be_zero):
        raise _error(name, value, "expected a positive number (noise_std, lbfgs_tolerance and "
                     "negligible may be 0).")

  @property
  def rate_sizes(self) -> tuple[int, ...]:
    """The sizes the rates are fitted over."""
    return tuple(n for n in self.train_sizes if n >= self.rate_min_n)


_error = functools.partial(checks.field_error, section=SECTION)


def _choice(field: str, value: str, known: tuple[str, ...]) -> None:
  if value not in known:
    raise _error(field, value, f"expected one of {known}.{configlib.suggest(value, known)}")


def study_config(config: ml_collections.ConfigDict) -> MoEStudyConfig:
  """The typed `config.moe` section. Raises configlib.ConfigError naming a bad field."""
  if configlib.engine(config) != "moe":
    raise configlib.ConfigError(
        f"config.engine={config.engine!r}: this study's config has engine 'moe' and a "
        f"`{SECTION}` section; start from configs/sample_efficiency/moe_synthetic.py.")
  return configlib.to_dataclass(MoEStudyConfig, config[SECTION], where=f"config.{SECTION}")
