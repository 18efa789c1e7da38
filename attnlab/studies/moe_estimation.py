r"""The seed paper's synthetic estimation study: sigmoid- vs softmax-gated experts fitted by least squares.

Yan et al. (arXiv 2502.00281) read a row of self-attention as a mixture of
experts with quadratic gating scores and prove that least-squares estimates of
sigmoid-gated experts converge faster in the sample size n than softmax-gated
ones. This module measures that: ground truths, students fitted to the same
data, Voronoi losses and test MSE against n, and their log-log slopes.

The model (family "moe"), K experts, x in R^d:

  s_k(x) = x^T A_k x + b_k^T x + c_k        (score="full"; "partial" drops b_k)
  g(x)   = sigmoid(s(x)) elementwise, or softmax(s(x)) over k
  f(x)   = sum_k g_k(x) * h(a_k^T x + e_k)  h = EXPERTS[expert]: identity
           ("linear"), ReLU, GELU (exact), or z + z^2/2 ("polynomial")

Only the symmetric part of A_k enters x^T A_k x, so A is compared as
(A + A^T) / 2. The attention-level version (family "attention") is one head
over N tokens X in R^{N x d}: s_ij = x_i^T W x_j (+ c for sigmoid), row i's
output sum_j g_ij(X) V^T x_j, softmax over j or sigmoid per j.

Ground truth and data. The truth's parameters are drawn once from
`truth_seed` (k* = true_experts atoms; regime "sparse" sets the first atom's
gate slopes A_0, b_0 to zero, "dense" keeps every slope non-zero: our reading
of the two regimes of arXiv 2405.13997, whose text was not available here).
A repetition (seed) draws a pool X of max(train_sizes) Gaussian inputs and
Gaussian noise of std `noise_std`; size n uses the first n (nested subsets),
and both truths share X and the noise. Y = f*(X) + noise.

Students. Both gates, with k = fitted_experts > k* atoms of the truth's
expert type, are fitted to the same data from both truths: full-batch mean
squared error, `adam_steps` of Adam (on the first `adam_examples` examples)
to find a basin, then L-BFGS on all n until converged (`lbfgs_minimize`: the
loss fell by at most `lbfgs_tolerance` relatively over 50 evaluations) or
`lbfgs_steps` loss evaluations, from `restarts` random initialisations; the
restart with the lowest training loss is kept, and each cell records whether
its fit converged. One jitted program per (expert, n) fits every truth x
repetition x restart (vmapped) for both students.

Speed (issue 11: the full grid on a 2-core CPU). Profiled at n = 10^4, 10
seeds, ReLU: an L-BFGS step cost 21x an Adam step (1.66 s vs 79 ms for both
students), 83% of a group. So:
  * L-BFGS: optax's zoom line search is a while_loop; under vmap the whole
    batch runs as many loss evaluations as its slowest fit (8.5 per step vs a
    mean of 1.3). `lbfgs_minimize` tries one step per fit per iteration
    (backtracking spread over iterations) and freezes converged fits, ending
    when all have. It is also a better fit: the training loss ends lower in
    18-19 of 20 seeds (median -0.1 to -0.2%) at n = 3162, and 200 further
    zoom-L-BFGS steps lower its end point by a median 1e-7 (n = 1000), where
    the old fits still moved. The metrics move with it (ReLU, n = 3162, 20
    seeds, same data and inits, old -> new medians): test MSE, sigmoid truth
    8.2e-5 -> 7.7e-5 (sigmoid student), 2.6e-4 -> 3.1e-4 (softmax); softmax
    truth 6.8e-5 -> 8.1e-5 (sigmoid), 6.1e-5 -> 7.3e-5 (softmax); Voronoi
    loss 2.31 -> 2.17 (sigmoid), 0.21 -> 0.39 (softmax): the over-specified
    softmax fit drifts further along its flat valley as it converges.
  * Features: x^T A x + b^T x + c and a^T x + e are rows of one [2K, F] @
    [F, n] matmul over features vec(x x^T), x, 1 formed once per data set,
    examples last; per value_and_grad 1.9x faster than the einsum over x
    (side by side, 20 problems x 3 restarts, n = 10^4), 40% fewer bytes.
  * Adam sees at most `adam_examples` (10^4 in the config): at n = 10^5 it
    only picks a basin, which L-BFGS on all n then fits.
  * Already float32 (jax's default; x64 is never enabled), no host syncs or
    Python loops per step: nothing to change there.
Measured figures and the full grid's extrapolation: the `:full` config.

Metrics, per (truth, expert, student, n, seed):
  * test_mse: mean of (f_hat(x) - f*(x))^2 over `test_examples` fresh inputs
    (the excess risk: noise-free, so it tends to 0 for a well-specified fit
    and to the approximation error for a misspecified one);
  * voronoi: the Voronoi loss between the fitted and the true mixing measure,
    defined when the student's gate is the truth's (the other gate cannot
    express the truth's mixing measure, so it is NaN there and test_mse is
    the comparison). For the attention family (no over-specification) it is
    the first-order parameter distance |W - W*| + |V - V*| (+ |c - c*| for
    sigmoid), Frobenius norms.

The Voronoi loss (family "moe"). Atom i of a measure has a gate mass m_i
(a vector) and a location theta_i (flattened; sym(A) = (A + A^T) / 2, b absent
for a partial score); what is identifiable differs by gate:
  * softmax: invariant to adding one (A, b, c) to every atom, so the measure
    is first put in canonical form: c_i -> c_i - logsumexp(c),
    (A_i, b_i) -> (A_i, b_i) - sum_l w_l (A_l, b_l) with w = softmax(c); then
    m_i = exp(c_i) (the masses sum to 1; an over-fitted cell splits its mass)
    and theta_i = (sym(A_i), b_i, a_i, e_i);
  * sigmoid: gates are not normalised, so an over-fitted cell keeps the true
    gate in every member and splits the expert instead (exactly for linear
    experts, and for ReLU by positive homogeneity); an atom is switched off
    by a vanishing gate or a vanishing expert. So m_i = sigmoid(c_i) (a_i, e_i)
    (the expert scaled by the gate at x = 0) and theta_i = (sym(A_i), b_i, c_i).
Each fitted atom i joins the cell V_j of its nearest true atom j (Euclidean
distance of theta, ties to the lower j). Then

  D(G, G*) = sum_j | sum_{i in V_j} m_i - m*_j |
           + sum_{j : |V_j| = 1} sum_{i in V_j} |m_i| |theta_i - theta*_j|
           + sum_{j : |V_j| > 1} sum_{i in V_j} |m_i| |theta_i - theta*_j|^2

with |.| the Euclidean norm: cells of one fitted atom count first-order
differences, cells of several second-order ones, plus the gate-mass mismatch.
D is 0 at the truth, invariant to permuting atoms and (softmax) to the gate
translation, and 0 at the exact over-specified solutions above. These are our
definitions (the papers' own were not available here): the sigmoid one
follows where an exact over-specified sigmoid fit can put its extra atom.

Rates: per (truth, expert, student, metric), `analysis.loglog_slope` fits
log(mean over seeds) against log n and bootstraps seeds within each n; the
same fit of the per-n medians is reported beside it (the Voronoi loss is
heavy-tailed: a few repetitions far from the truth carry its mean).

  results = run(config, workdir)    # resumable: <workdir>/cells/<expert>_n<n>.json per group
  render(config, workdir)           # report.md, results.json, rates.png from recorded groups
  python -m attnlab.studies.moe_estimation --config configs/sample_efficiency/moe_synthetic.py:quick
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attnlab import configlib
from attnlab import workdir as workdir_lib
from attnlab.studies import analysis

GROUPS_DIR = "cells"
SECTION = "moe"

# Gates of scores s along `axis`, the atom (moe) or key (attention) axis.
GATES: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "sigmoid": lambda s, axis: jax.nn.sigmoid(s),
    "softmax": lambda s, axis: jax.nn.softmax(s, axis=axis),
}

# Expert activations h(a^T x + e): ReLU/GELU are the papers' strongly identifiable
# experts, linear and polynomial the weakly identifiable ones.
EXPERTS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda z: z,
    "relu": jax.nn.relu,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "polynomial": lambda z: z + 0.5 * z * z,
}

FAMILIES = ("moe", "attention")
METRICS = ("voronoi", "test_mse")


@dataclasses.dataclass(frozen=True)
class MoEStudyConfig:
  """What `config.moe` may hold.

  Attributes:
    family: "moe" (quadratic-gating mixture of experts) or "attention" (one head).
    truths: gates of the ground truths.
    students: gates of the fitted models; every student is fitted to every truth.
    experts: expert types (EXPERTS); the attention family has linear values only.
    score: "full" (x^T A x + b^T x + c) or "partial" (no linear term).
    regime: "dense" (every true gate slope non-zero) or "sparse" (the first
      true atom's A and b are zero); see the module docstring.
    dim: input dimension d.
    tokens: tokens N per example (attention family).
    true_experts: k*, atoms of the truth.
    fitted_experts: k, atoms of each student (k > k*: over-specified).
    truth_seed: seed of the ground truth's parameters.
    noise_std: standard deviation of the Gaussian noise added to f*(X).
    train_sizes: sample sizes n, increasing.
    seeds: repetitions: each draws its own inputs, noise and initialisations.
    restarts: random initialisations per fit; the lowest training loss is kept.
    adam_steps, learning_rate: full-batch Adam phase.
    adam_examples: Adam sees the first this many training examples (0: all);
      it only chooses the basin that L-BFGS, on all of them, then fits.
    lbfgs_steps: full-batch L-BFGS phase after Adam, at most this many loss
      evaluations per fit (0: none); a fit stops earlier when converged.
    lbfgs_tolerance: a fit has converged when an accepted L-BFGS step lowers
      its training loss by at most this fraction (see `lbfgs_minimize`).
    init_scale: standard deviation of the students' initial parameters.
    test_examples: fresh inputs of the test MSE (one fixed draw).
    bootstrap: bootstrap replicates of the slopes.
  """

  family: str = "moe"
  truths: tuple[str, ...] = ("sigmoid", "softmax")
  students: tuple[str, ...] = ("sigmoid", "softmax")
  experts: tuple[str, ...] = ("linear", "relu")
  score: str = "full"
  regime: str = "dense"
  dim: int = 2
  tokens: int = 4
  true_experts: int = 2
  fitted_experts: int = 3
  truth_seed: int = 0
  noise_std: float = 0.1
  train_sizes: tuple[int, ...] = (100, 1000, 10000)
  seeds: tuple[int, ...] = (0, 1, 2)
  restarts: int = 4
  adam_steps: int = 1000
  learning_rate: float = 0.02
  adam_examples: int = 0
  lbfgs_steps: int = 300
  lbfgs_tolerance: float = 1e-6
  init_scale: float = 1.0
  test_examples: int = 10000
  bootstrap: int = 1000

  def __post_init__(self):
    for name in ("truths", "students", "experts", "train_sizes", "seeds"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    _choice("family", self.family, FAMILIES)
    _choice("score", self.score, ("full", "partial"))
    _choice("regime", self.regime, ("dense", "sparse"))
    for name, known in (("truths", GATES), ("students", GATES), ("experts", EXPERTS)):
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
    if not sizes or any(not _is_int(n) or n < 2 for n in sizes) or list(sizes) != sorted(set(sizes)):
      raise _error("train_sizes", sizes, "expected ints >= 2 in increasing order, each once.")
    if not self.seeds or any(not _is_int(s) or s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
      raise _error("seeds", self.seeds, "expected non-negative ints, each once.")
    for name in ("dim", "tokens", "true_experts", "restarts", "test_examples", "bootstrap"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
        raise _error(name, getattr(self, name), "expected a positive int.")
    for name in ("adam_steps", "adam_examples", "lbfgs_steps", "truth_seed"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
        raise _error(name, getattr(self, name), "expected a non-negative int.")
    if self.fitted_experts < self.true_experts:
      raise _error("fitted_experts", self.fitted_experts,
                   f"expected >= true_experts={self.true_experts} (an over-specified fit).")
    if self.adam_steps + self.lbfgs_steps == 0:
      raise _error("adam_steps", self.adam_steps, "no optimiser step at all: set adam_steps "
                   "or lbfgs_steps > 0.")
    for name in ("noise_std", "learning_rate", "init_scale", "lbfgs_tolerance"):
      value = getattr(self, name)
      may_be_zero = name in ("noise_std", "lbfgs_tolerance")
      if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not may_be_zero):
        raise _error(name, value, "expected a positive number (noise_std and lbfgs_tolerance "
                     "may be 0).")


def _error(field: str, value: Any, fix: str) -> configlib.ConfigError:
  return configlib.ConfigError(f"config.{SECTION}.{field}={value!r}: {fix}")


def _choice(field: str, value: str, known: tuple[str, ...]) -> None:
  if value not in known:
    raise _error(field, value, f"expected one of {known}.{configlib.suggest(value, known)}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_moe_study(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` describes this study (a `moe` section) rather than a run or attention study."""
  return SECTION in config


def study_config(config: ml_collections.ConfigDict) -> MoEStudyConfig:
  """The typed `config.moe` section. Raises configlib.ConfigError naming a bad field."""
  if not is_moe_study(config):
    raise configlib.ConfigError(f"The config has no `{SECTION}` section; start from "
                                "configs/sample_efficiency/moe_synthetic.py.")
  return configlib.to_dataclass(MoEStudyConfig, config[SECTION], where=f"config.{SECTION}")


# ----------------------------------------------------------------------------
# Models: parameters are dicts of arrays with the atom axis first.
# ----------------------------------------------------------------------------


def init_params(key: jax.Array, cfg: MoEStudyConfig, atoms: int, scale: float) -> dict[str, jax.Array]:
  """Random parameters of `atoms` atoms (ignored by the attention family: one head)."""
  d = cfg.dim
  keys = jax.random.split(key, 5)
  if cfg.family == "attention":
    return {"W": scale * jax.random.normal(keys[0], (d, d)) / math.sqrt(d),
            "V": scale * jax.random.normal(keys[1], (d, d)),
            "c": scale * jax.random.normal(keys[2], ())}
  p = {"A": 0.5 * scale * jax.random.normal(keys[0], (atoms, d, d)),
       "c": 0.5 * scale * jax.random.normal(keys[2], (atoms,)),
       "a": scale * jax.random.normal(keys[3], (atoms, d)),
       "e": 0.5 * scale * jax.random.normal(keys[4], (atoms,))}
  if cfg.score == "full":
    p["b"] = scale * jax.random.normal(keys[1], (atoms, d))
  return p


def features(x: jax.Array) -> jax.Array:
  """[n, d] inputs -> [F, n] features vec(x x^T), x, 1 (F = d^2 + d + 1), examples last.

  Every gate score x^T A_k x + b_k^T x + c_k and every expert input a_k^T x + e_k
  is a linear function of these features, so a fit computes them once per
  data set and each evaluation of the model is one small matmul (`mixture`)
  instead of re-forming the quadratic form from x at every optimiser step;
  examples last keeps the gate and expert arithmetic vectorised over n.
  """
  quad = (x[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)
  return jnp.concatenate([quad, x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1).T


def _feature_weights(params: dict[str, jax.Array]) -> jax.Array:
  """[2K, F]: the K gate-score rows (A, b, c), then the K expert-input rows (0, a, e)."""
  k, d = params["a"].shape
  b = params["b"] if "b" in params else jnp.zeros((k, d), params["a"].dtype)
  score = jnp.concatenate([params["A"].reshape(k, d * d), b, params["c"][:, None]], axis=1)
  expert = jnp.concatenate([jnp.zeros((k, d * d), params["a"].dtype), params["a"],
                            params["e"][:, None]], axis=1)
  return jnp.concatenate([score, expert], axis=0)


def mixture(params: dict[str, jax.Array], phi: jax.Array, gate: str, expert: str) -> jax.Array:
  """f(x) of a moe from its features: [F, n] -> [n]."""
  k = params["c"].shape[0]
  score_and_input = _feature_weights(params) @ phi  # [2K, n]
  s, z = score_and_input[:k], score_and_input[k:]
  return jnp.sum(GATES[gate](s, 0) * EXPERTS[expert](z), axis=0)


def predict(params: dict[str, jax.Array], x: jax.Array, gate: str, expert: str,
            family: str = "moe") -> jax.Array:
  """f(x): [n, d] -> [n] (moe), or [n, N, d] -> [n, N, d] (attention)."""
  if family == "attention":
    s = jnp.einsum("mid,de,mje->mij", x, params["W"], x)
    if gate == "sigmoid":
      s = s + params["c"]
    return jnp.einsum("mij,mjd,de->mie", GATES[gate](s, -1), x, params["V"])
  return mixture(params, features(x), gate, expert)


def ground_truth(cfg: MoEStudyConfig) -> dict[str, np.ndarray]:
  """The truth's parameters (float64 NumPy), the same for both gates and every expert type."""
  p = init_params(jax.random.key(cfg.truth_seed), cfg, cfg.true_experts, 1.0)
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  if cfg.family == "moe" and cfg.regime == "sparse":
    p["A"][0] = 0.0
    if "b" in p:
      p["b"][0] = 0.0
  return p


def draw_inputs(key: jax.Array, cfg: MoEStudyConfig, n: int) -> jax.Array:
  shape = (n, cfg.tokens, cfg.dim) if cfg.family == "attention" else (n, cfg.dim)
  return jax.random.normal(key, shape)


def draw_data(cfg: MoEStudyConfig, seed: int, n: int) -> tuple[jax.Array, jax.Array]:
  """(X, noise) of repetition `seed`: the first n of its pool (nested in n, shared by truths)."""
  pool = max(cfg.train_sizes)
  kx, kn = jax.random.split(jax.random.fold_in(jax.random.key(cfg.truth_seed), 1 + seed))
  x = draw_inputs(kx, cfg, pool)[:n]
  noise = cfg.noise_std * jax.random.normal(kn, x.shape[:-1] + ((cfg.dim,) if cfg.family == "attention" else ()))
  return x, noise[:n]


def test_inputs(cfg: MoEStudyConfig) -> jax.Array:
  """The fixed test draw (its own key, disjoint from every repetition's)."""
  return draw_inputs(jax.random.fold_in(jax.random.key(cfg.truth_seed), 0), cfg, cfg.test_examples)


# ----------------------------------------------------------------------------
# Least squares: Adam, then L-BFGS, vmapped over problems and restarts.
# ----------------------------------------------------------------------------


def fit_inputs(x: jax.Array, family: str) -> jax.Array:
  """What a fit evaluates the student on: the features (moe, computed once per data set) or X."""
  return x if family == "attention" else features(x)


def _student(params, inputs, gate: str, expert: str, family: str) -> jax.Array:
  """The student's predictions on `fit_inputs(x, family)`."""
  if family == "attention":
    return predict(params, inputs, gate, expert, family)
  return mixture(params, inputs, gate, expert)


def _vdot(a, b) -> jax.Array:
  return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _where(flag: jax.Array, a, b):
  return jax.tree.map(lambda u, v: jnp.where(flag, u, v), a, b)


class _LbfgsCarry(NamedTuple):
  params: Any
  value: jax.Array
  grad: Any
  direction: Any       # the descent direction being tried from `params`
  step: jax.Array      # the step size tried next along it
  memory: Any          # optax.scale_by_lbfgs state
  fresh: jax.Array     # the direction is the memoryless one (scaled gradient)
  checkpoint: jax.Array  # the loss _WINDOW evaluations ago
  evaluations: jax.Array
  done: jax.Array      # converged, or no decrease found: frozen


# Halvings of a rejected step before the memory is dropped (the curvature
# pairs of a nearly flat, over-specified fit can give a far too long
# direction), and before a memoryless direction counts as converged.
_RESTART_AFTER = 10
_GIVE_UP_AFTER = 30
# Convergence is judged over this many evaluations, not one step: in the flat
# valleys of an over-specified fit L-BFGS alternates tiny and large decreases
# (a one-step test stopped fits that 200 more zoom-L-BFGS steps lowered by
# up to 3%).
_WINDOW = 50


def lbfgs_minimize(value_and_grad, params, *, max_evaluations: int, tolerance: float):
  """L-BFGS with a backtracking (Armijo) line search of ONE loss evaluation per iteration.

  Why not optax.lbfgs: its zoom line search is a while_loop, and under vmap
  every fit runs as many evaluations as the slowest fit of the batch needs
  (measured: 8.5 evaluations per step for the batch's maximum, 1.3 for the
  mean). Here an iteration tries one step for every fit: accepted, the memory
  and direction are updated; rejected, that fit halves its step and tries
  again next iteration, dropping its memory after _RESTART_AFTER halvings.
  A fit stops (frozen under vmap, the loop ending when all have) when its
  loss fell by at most `tolerance` relatively over the last _WINDOW
  evaluations, or when
  no step along the memoryless direction down to 2^-_GIVE_UP_AFTER decreases
  it (converged in float32). The curvature pair is stored only when
  s^T y > 0; otherwise the memory restarts. Returns (params, loss, converged).
  """
  lbfgs = optax.scale_by_lbfgs()

  def direction(p, g, memory):
    update, memory = lbfgs.update(g, memory, p)
    return jax.tree.map(jnp.negative, update), memory

  def restart(p, g):
    return direction(p, g, lbfgs.init(p))

  value, grad = value_and_grad(params)
  d, memory = restart(params, grad)
  true = jnp.ones((), bool)
  start = _LbfgsCarry(params, value, grad, d, jnp.ones_like(value), memory, true, value,
                      jnp.zeros((), jnp.int32), ~jnp.isfinite(value))

  def body(c: _LbfgsCarry) -> _LbfgsCarry:
    trial = jax.tree.map(lambda p, d: p + c.step * d, c.params, c.direction)
    v, g = value_and_grad(trial)
    accept = ~c.done & jnp.isfinite(v) & (v <= c.value + 1e-4 * c.step * _vdot(c.grad, c.direction))
    d_next, m_next = direction(trial, g, c.memory)
    curvature = c.step * _vdot(c.direction, jax.tree.map(jnp.subtract, g, c.grad))
    keep = (curvature > 0) & (_vdot(g, d_next) < 0)
    d_next, m_next = _where(keep, (d_next, m_next), restart(trial, g))
    # Rejected: halve the step; after _RESTART_AFTER halvings drop the memory.
    step = jnp.where(accept, 1.0, 0.5 * c.step)
    drop = ~accept & ~c.fresh & (step < 2.0 ** -_RESTART_AFTER)
    d_drop, m_drop = restart(c.params, c.grad)
    value = jnp.where(accept, v, c.value)
    window_ends = (c.evaluations + 1) % _WINDOW == 0
    converged = window_ends & (c.checkpoint - value <= tolerance * jnp.abs(c.checkpoint))
    exhausted = ~accept & c.fresh & (step < 2.0 ** -_GIVE_UP_AFTER)
    return _LbfgsCarry(
        params=_where(accept, trial, c.params), value=value,
        grad=_where(accept, g, c.grad),
        direction=_where(accept, d_next, _where(drop, d_drop, c.direction)),
        step=jnp.where(drop, 1.0, step),
        memory=_where(accept, m_next, _where(drop, m_drop, c.memory)),
        fresh=jnp.where(accept, ~keep, c.fresh | drop),
        checkpoint=jnp.where(window_ends, value, c.checkpoint),
        evaluations=c.evaluations + 1, done=c.done | converged | exhausted)

  def running(c: _LbfgsCarry) -> jax.Array:
    return ~c.done & (c.evaluations < max_evaluations)

  end = jax.lax.while_loop(running, body, start)
  return end.params, end.value, end.done & jnp.isfinite(end.value)


def _squared_error(x, y, gate: str, expert: str, family: str):
  """The training loss on (x, y) as a function of the parameters; inputs computed once."""
  inputs = fit_inputs(x, family)
  return lambda p: jnp.mean((_student(p, inputs, gate, expert, family) - y) ** 2)


def fit_one(params, x, y, *, gate: str, expert: str, family: str, adam_steps: int,
            adam_examples: int, learning_rate: float, lbfgs_steps: int, tolerance: float):
  """Fits one student to (x, y) by least squares; returns (params, training MSE, converged).

  Adam on the first `adam_examples` examples (all when 0) finds a basin;
  L-BFGS (`lbfgs_minimize`) on all of them fits to convergence. Without
  L-BFGS steps a fit is reported as not converged.
  """
  loss = _squared_error(x, y, gate, expert, family)
  m = len(x) if adam_examples == 0 else min(adam_examples, len(x))
  adam_grad = jax.grad(_squared_error(x[:m], y[:m], gate, expert, family))
  adam = optax.adam(learning_rate)

  def adam_step(carry, _):
    p, state = carry
    updates, state = adam.update(adam_grad(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  (p_adam, _), _ = jax.lax.scan(adam_step, (params, adam.init(params)), None, length=adam_steps)
  if lbfgs_steps == 0:
    return p_adam, loss(p_adam), jnp.zeros((), bool)
  return lbfgs_minimize(jax.value_and_grad(loss), p_adam, max_evaluations=lbfgs_steps,
                        tolerance=tolerance)


@functools.lru_cache(maxsize=None)
def _fit_program(cfg: MoEStudyConfig, expert: str):
  """jit: ({student: params [P, R, ...]}, x [P, n, ...], y [P, n, ...]) -> best per problem.

  P problems (truth x repetition) share nothing; R restarts share their problem's
  data. Returns {student: (params [P, ...], train MSE [P], converged [P])}, the
  lowest-loss restart.
  """
  def best_of(params_PR, x_P, y_P, student):
    fit = functools.partial(fit_one, gate=student, expert=expert, family=cfg.family,
                            adam_steps=cfg.adam_steps, adam_examples=cfg.adam_examples,
                            learning_rate=cfg.learning_rate,
                            lbfgs_steps=cfg.lbfgs_steps, tolerance=cfg.lbfgs_tolerance)
    over_restarts = jax.vmap(fit, in_axes=(0, None, None))
    params, loss, converged = jax.vmap(over_restarts)(params_PR, x_P, y_P)
    loss = jnp.where(jnp.isfinite(loss), loss, jnp.inf)
    pick = jnp.argmin(loss, axis=1)
    take = lambda v: jnp.take_along_axis(  # noqa: E731
        v, pick.reshape((-1,) + (1,) * (v.ndim - 1)), axis=1)[:, 0]
    return jax.tree.map(take, params), take(loss), take(converged)

  def program(params_by_student, x_P, y_P):
    return {s: best_of(p, x_P, y_P, s) for s, p in params_by_student.items()}

  return jax.jit(program)


@functools.lru_cache(maxsize=None)
def _predict_program(family: str, gate: str, expert: str):
  return jax.jit(jax.vmap(lambda p, x: predict(p, x, gate, expert, family), in_axes=(0, None)))


# ----------------------------------------------------------------------------
# The Voronoi loss (float64 NumPy).
# ----------------------------------------------------------------------------


def _canonical(params: dict[str, np.ndarray], gate: str) -> tuple[np.ndarray, np.ndarray]:
  """(masses [K, m], locations theta [K, p]) of a moe measure (module docstring)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  A = (p["A"] + np.swapaxes(p["A"], 1, 2)) / 2
  slopes = [A.reshape(len(A), -1)] + ([p["b"]] if "b" in p else [])
  experts = np.concatenate([p["a"], p["e"][:, None]], axis=1)
  c = p["c"]
  if gate == "softmax":
    c = c - (c.max() + np.log(np.sum(np.exp(c - c.max()))))
    w = np.exp(c)
    slopes = [s - w @ s for s in slopes]
    return w[:, None], np.concatenate(slopes + [experts], axis=1)
  gate_at_0 = 1.0 / (1.0 + np.exp(-c))
  return gate_at_0[:, None] * experts, np.concatenate(slopes + [c[:, None]], axis=1)


def voronoi_loss(fitted: dict[str, np.ndarray], truth: dict[str, np.ndarray], gate: str) -> float:
  """D(G, G*) of the module docstring, for a moe fit and truth with the same gate."""
  m, theta = _canonical(fitted, gate)
  m_true, theta_true = _canonical(truth, gate)
  dist = np.linalg.norm(theta[:, None, :] - theta_true[None, :, :], axis=-1)  # [k, k*]
  cell = np.argmin(dist, axis=1)
  weight = np.linalg.norm(m, axis=1)
  loss = 0.0
  for j in range(len(m_true)):
    members = np.flatnonzero(cell == j)
    loss += float(np.linalg.norm(m[members].sum(axis=0) - m_true[j]))
    power = 1 if len(members) == 1 else 2
    loss += float(np.sum(weight[members] * dist[members, j] ** power))
  return float(loss)


def parameter_loss(fitted: dict[str, np.ndarray], truth: dict[str, np.ndarray], gate: str,
                   family: str) -> float:
  """The estimation loss of a student whose gate is the truth's (`voronoi` in the records)."""
  if family == "moe":
    return voronoi_loss(fitted, truth, gate)
  names = ("W", "V", "c") if gate == "sigmoid" else ("W", "V")
  return float(sum(np.linalg.norm(np.asarray(fitted[k], np.float64) - truth[k]) for k in names))


# ----------------------------------------------------------------------------
# One group: every truth, repetition and restart of one (expert, n), both students.
# ----------------------------------------------------------------------------


def fit_group(cfg: MoEStudyConfig, expert: str, n: int) -> dict[str, Any]:
  """Fits every student to every truth and repetition at size n; returns the group's record."""
  start = time.perf_counter()
  truth = ground_truth(cfg)
  truth_j = {k: jnp.asarray(v, jnp.float32) for k, v in truth.items()}
  xs, ys = [], []
  data = [draw_data(cfg, seed, n) for seed in cfg.seeds]
  for gate in cfg.truths:
    f_star = _predict_program(cfg.family, gate, expert)
    for x, noise in data:
      xs.append(x)
      ys.append(f_star(jax.tree.map(lambda v: v[None], truth_j), x)[0] + noise)
  x_P, y_P = jnp.stack(xs), jnp.stack(ys)
  problems = [(gate, seed) for gate in cfg.truths for seed in cfg.seeds]
  inits = {}
  for s_index, student in enumerate(cfg.students):
    keys = [jax.random.fold_in(jax.random.key(1_000_003 * (1 + seed) + n), s_index)
            for _, seed in problems]
    inits[student] = jax.vmap(lambda k: jax.vmap(
        lambda r: init_params(r, cfg, cfg.fitted_experts, cfg.init_scale))(jax.random.split(k, cfg.restarts)))(
            jnp.stack(keys))
  fitted = jax.block_until_ready(_fit_program(cfg, expert)(inits, x_P, y_P))

  x_test = test_inputs(cfg)
  targets = {g: np.asarray(_predict_program(cfg.family, g, expert)(
      jax.tree.map(lambda v: v[None], truth_j), x_test)[0], np.float64) for g in cfg.truths}
  cells = []
  for student, (params, train_mse, converged) in fitted.items():
    preds = np.asarray(_predict_program(cfg.family, student, expert)(params, x_test), np.float64)
    for i, (gate, seed) in enumerate(problems):
      p_i = {k: np.asarray(v[i], np.float64) for k, v in params.items()}
      mse = float(np.mean((preds[i] - targets[gate]) ** 2))
      loss = parameter_loss(p_i, truth, gate, cfg.family) if gate == student else math.nan
      cells.append({"truth": gate, "student": student, "seed": seed,
                    "voronoi": loss, "test_mse": mse, "train_mse": float(train_mse[i]),
                    "converged": bool(converged[i]),
                    "params": {k: v.tolist() for k, v in p_i.items()}})
  return {"expert": expert, "n": n, "seconds": time.perf_counter() - start, "cells": cells}


def _group_name(expert: str, n: int) -> str:
  return f"{expert}_n{n}"


def _groups(cfg: MoEStudyConfig) -> list[tuple[str, int]]:
  return [(e, n) for n in cfg.train_sizes for e in cfg.experts]


# ----------------------------------------------------------------------------
# Running, resumably, and the report.
# ----------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_group: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Fits every (expert, n) group not yet recorded in `workdir`, then writes the report.

  Each group is written to <workdir>/cells/<expert>_n<n>.json as soon as it is
  fitted; a rerun skips recorded groups. The workdir lock, the config check
  and finished.json are the engine's (`attnlab.workdir`).

  Raises:
    configlib.ConfigError: a bad config, or `workdir` holds another study.
    workdir_lib.WorkdirLockedError: another live process uses `workdir`.
  """
  start = time.perf_counter()
  cfg = study_config(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.WorkdirLock(workdir):
    workdir_lib.check_same_run(config, workdir, trained=bool(_recorded(workdir)))
    workdir_lib.write_config(config, workdir)
    done = _recorded(workdir)
    todo = [g for g in _groups(cfg) if _group_name(*g) not in done]
    for expert, n in todo:
      record = fit_group(cfg, expert, n)
      _write_json(os.path.join(workdir, GROUPS_DIR, f"{_group_name(expert, n)}.json"), record)
      print(f"moe_estimation: {_group_name(expert, n)} fitted in {record['seconds']:.1f} s", flush=True)
      if on_group is not None:
        on_group(_group_name(expert, n))
    summary = _report(cfg, workdir)
    summary.update(fitted_groups=len(todo), skipped_groups=len(_groups(cfg)) - len(todo),
                   seconds=time.perf_counter() - start)
    workdir_lib.write_finished(workdir, summary)
  return summary


def render(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Rewrites the report of `workdir` from its recorded groups, without fitting."""
  cfg = study_config(config)
  workdir_lib.check_same_run(config, workdir, trained=bool(_recorded(workdir)))
  return _report(cfg, workdir)


def _write_json(path: str, record: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f)  # NaN (an undefined Voronoi loss) is written as NaN
  os.replace(tmp, path)


def _recorded(workdir: str) -> dict[str, dict[str, Any]]:
  found = {}
  for path in glob.glob(os.path.join(workdir, GROUPS_DIR, "*.json")):
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    found[_group_name(record["expert"], record["n"])] = record
  return found


def rows(cfg: MoEStudyConfig, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """One flat row per (truth, expert, student, n, seed) of the recorded groups in the config."""
  out = []
  for expert, n in _groups(cfg):
    record = records.get(_group_name(expert, n))
    for c in record["cells"] if record else ():
      if c["seed"] in cfg.seeds and c["truth"] in cfg.truths and c["student"] in cfg.students:
        out.append({"truth": c["truth"], "expert": expert, "student": c["student"], "n": n,
                    "seed": c["seed"], **{m: c[m] for m in (*METRICS, "train_mse")}})
  return out


def slopes(cfg: MoEStudyConfig, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (truth, expert, student, metric): the log-log slope, or why there is none."""
  out = []
  for truth in cfg.truths:
    for expert in cfg.experts:
      for student in cfg.students:
        mine = [r for r in table if (r["truth"], r["expert"], r["student"]) == (truth, expert, student)]
        for metric in METRICS:
          if metric == "voronoi" and truth != student:
            continue
          entry = {"truth": truth, "expert": expert, "student": student, "metric": metric}
          for name, statistic in (("fit", "mean"), ("median_fit", "median")):
            try:
              entry[name] = analysis.loglog_slope([r["n"] for r in mine],
                                                  [r[metric] for r in mine],
                                                  n_boot=cfg.bootstrap, statistic=statistic)
            except analysis.FitError as e:
              entry[name] = f"no fit: {e}"
          out.append(entry)
  return out


def _report(cfg: MoEStudyConfig, workdir: str) -> dict[str, Any]:
  table = rows(cfg, _recorded(workdir))
  if not table:
    raise FileNotFoundError(f"No group of this study is recorded in {workdir}/{GROUPS_DIR}; "
                            "run it first (python -m attnlab.studies.moe_estimation with the "
                            "same --config and --workdir).")
  fits = slopes(cfg, table)
  missing = [_group_name(*g) for g in _groups(cfg) if not any(
      (r["expert"], r["n"]) == g for r in table)]
  paths = {"json": os.path.join(workdir, "results.json"),
           "report": os.path.join(workdir, "report.md"),
           "plot": os.path.join(workdir, "rates.png")}
  _write_json(paths["json"], {"rows": table})
  with open(paths["report"], "w", encoding="utf-8") as f:
    f.write(_markdown(cfg, table, fits, missing))
  _plot(cfg, table, fits, paths["plot"])
  rates = [{k: v for k, v in e.items() if not k.endswith("fit")}
           | _rate_fields(e["fit"], "") | _rate_fields(e["median_fit"], "median_")
           for e in fits]
  return {"workdir": workdir, "paths": paths, "rates": rates, "missing_groups": missing}


def _rate_fields(fit: analysis.LogLogSlope | str, prefix: str) -> dict[str, Any]:
  if isinstance(fit, analysis.LogLogSlope):
    return {f"{prefix}slope": fit.slope, f"{prefix}slope_ci": list(fit.slope_ci)}
  return {f"{prefix}slope": None, f"{prefix}note": fit}


def stalled_threshold(cfg: MoEStudyConfig) -> float:
  """Training MSE above which a fit has not reached the noise level (1.2 sigma^2)."""
  return max(1.2 * cfg.noise_std ** 2, 1e-6)


def _fmt_slope(fit: analysis.LogLogSlope | str) -> str:
  if isinstance(fit, str):
    return fit
  return f"{fit.slope:+.3f} [{fit.slope_ci[0]:+.3f}, {fit.slope_ci[1]:+.3f}]"


def _markdown(cfg: MoEStudyConfig, table, fits, missing) -> str:
  lines = ["# Synthetic estimation study: sigmoid vs softmax gating", "",
           f"Family {cfg.family}, score {cfg.score}, regime {cfg.regime}, d={cfg.dim}, "
           f"k*={cfg.true_experts}, k={cfg.fitted_experts}, noise std {cfg.noise_std:g}; "
           f"{len(cfg.seeds)} repetitions, {cfg.restarts} restarts, Adam {cfg.adam_steps} steps "
           f"(lr {cfg.learning_rate:g}) then L-BFGS {cfg.lbfgs_steps} steps.", "",
           "## Empirical rates: slope of log(mean metric) against log n", "",
           f"95% bootstrap percentile interval ({cfg.bootstrap} replicates, repetitions resampled "
           "within each n). The parametric rate of a loss is -0.5 for the Voronoi loss "
           "(first-order terms) and -1 for the MSE. The slope of the per-n medians is given "
           "beside it: a few repetitions whose fits end far from the truth carry the mean of "
           "a heavy-tailed loss, not its median.", "",
           "| truth | expert | student | metric | slope of mean [95% CI] | slope of median [95% CI] |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {e['truth']} | {e['expert']} | {e['student']} | {e['metric']} | "
            f"{_fmt_slope(e['fit'])} | {_fmt_slope(e['median_fit'])} |" for e in fits]
  stall = stalled_threshold(cfg)
  lines += ["", "## Mean over repetitions ± half-width of the 95% t-interval", "",
            f"Stalled: fits whose training MSE exceeds {stall:.3g} (1.2 x the noise variance): "
            "for a student with the truth's gate, an optimisation failure (a local minimum of "
            "every restart), which the mean Voronoi loss then carries; the median does not.", "",
            "| truth | expert | student | n | voronoi | median voronoi | test MSE | stalled |",
            "|---|---|---|---|---|---|---|---|"]
  keys = sorted({(r["truth"], r["expert"], r["student"], r["n"]) for r in table})
  for key in keys:
    mine = [r for r in table if (r["truth"], r["expert"], r["student"], r["n"]) == key]
    cells = []
    for metric in METRICS:
      vals = [r[metric] for r in mine if math.isfinite(r[metric])]
      if not vals:
        cells.append("–")
        continue
      iv = analysis.t_interval(vals)
      cells.append(f"{iv.mean:.3g}" + (f" ± {iv.half_width:.2g}" if math.isfinite(iv.low) else ""))
    vor = [r["voronoi"] for r in mine if math.isfinite(r["voronoi"])]
    cells.insert(1, f"{np.median(vor):.3g}" if vor else "–")
    cells.append(f"{sum(r['train_mse'] > stall for r in mine)}/{len(mine)}")
    lines.append(f"| {' | '.join(map(str, key))} | {' | '.join(cells)} |")
  if missing:
    lines += ["", f"Not yet fitted: {', '.join(missing)}."]
  return "\n".join(lines) + "\n"


def _plot(cfg: MoEStudyConfig, table, fits, path: str) -> None:
  from matplotlib.figure import Figure  # a bare Figure: Agg, pyplot's backend untouched

  panels = [(t, e) for t in cfg.truths for e in cfg.experts]
  fig = Figure(figsize=(3.6 * len(panels), 6.4))
  axes = fig.subplots(len(METRICS), len(panels), squeeze=False)
  for col, (truth, expert) in enumerate(panels):
    for row, metric in enumerate(METRICS):
      ax = axes[row, col]
      for student in cfg.students:
        mine = [r for r in table if (r["truth"], r["expert"], r["student"]) == (truth, expert, student)
                and math.isfinite(r[metric])]
        sizes = sorted({r["n"] for r in mine})
        if not sizes:
          continue
        means = [np.mean([r[metric] for r in mine if r["n"] == n]) for n in sizes]
        fit = next(e["fit"] for e in fits if (e["truth"], e["expert"], e["student"], e["metric"])
                   == (truth, expert, student, metric))
        label = student + (f": slope {fit.slope:.2f}" if isinstance(fit, analysis.LogLogSlope) else "")
        (line,) = ax.plot(sizes, means, "o-", label=label)
        if isinstance(fit, analysis.LogLogSlope):
          ax.plot(sizes, fit.predict(sizes), "--", color=line.get_color(), linewidth=0.8)
      ax.set(xscale="log", yscale="log", xlabel="n", ylabel=metric,
             title=f"truth {truth}, {expert}" if row == 0 else None)
      ax.legend(fontsize=7)
  fig.tight_layout()
  tmp = f"{path}.tmp-{os.getpid()}"
  fig.savefig(tmp, format="png", dpi=110)
  os.replace(tmp, path)


def print_summary(summary: dict[str, Any]) -> None:
  """Prints what `run` or `render` returned: the report, its paths, and what was fitted."""
  with open(summary["paths"]["report"], encoding="utf-8") as f:
    print("\n" + f.read().rstrip())
  print(f"\n  report: {summary['paths']['report']}\n  plot:   {summary['paths']['plot']}")
  if "seconds" in summary:
    print(f"  {summary['fitted_groups']} groups fitted, {summary['skipped_groups']} already "
          f"recorded, in {summary['seconds']:.0f} s.")


def main(argv: list[str]) -> None:
  from attnlab import cli  # the entry point's flags; not needed by importers

  cli.run_main(argv, lambda config, workdir: print_summary(run(config, workdir)))


if __name__ == "__main__":
  from absl import app

  from attnlab import cli as _cli

  _cli.define_flags(default_config="configs/sample_efficiency/moe_synthetic.py")
  app.run(main, flags_parser=_cli.parse_flags)
