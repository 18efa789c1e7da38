r"""The model, its ground truths and the data they generate.

The model (family "moe"), K atoms, x in R^d:

  s_k(x) = x^T A_k x + b_k^T x + c_k        (score "full"; "partial" drops b_k)
  g(x)   = sigmoid(s(x)) elementwise, or softmax(s(x)) over k
  f(x)   = sum_k g_k(x) * h(a_k^T x + e_k)  h = EXPERTS[expert]: identity
           ("linear"), ReLU, GELU (exact), or z + z^2/2 ("polynomial")

Only the symmetric part of A_k enters x^T A_k x. The attention-level version
(family "attention") is one head over N tokens X in R^{N x d}:
s_ij = x_i^T W x_j (+ c for sigmoid), row i's output sum_j g_ij(X) V^T x_j.

Parameters are dicts of arrays with the atom axis first: A [K,d,d], b [K,d],
c [K] for the score, a [K,d], e [K] for the experts (attention: W, V, c).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.moe.config import MoEStudyConfig

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

  Every gate score and every expert input is a linear function of these
  features, so a fit computes them once per data set and each evaluation of
  the model is one small matmul (`mixture`); examples last keeps the gate and
  expert arithmetic vectorised over n.
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


# A truth's atoms must be told apart: redrawn until every two atoms' expert
# parameters (a, e) and gate parameters (sym A, b) are at least this far apart.
MIN_SEPARATION = 0.5
_MAX_DRAWS = 1000


def _separated(p: dict[str, np.ndarray]) -> bool:
  k = len(p["c"])
  A = (p["A"] + np.swapaxes(p["A"], 1, 2)) / 2
  gate = np.concatenate([A.reshape(k, -1)] + ([p["b"]] if "b" in p else []), axis=1)
  expert = np.concatenate([p["a"], p["e"][:, None]], axis=1)
  for theta in (gate, expert):
    dist = np.linalg.norm(theta[:, None] - theta[None], axis=-1)
    if np.min(dist + np.eye(k) * 1e9) < MIN_SEPARATION:
      return False
  return True


def ground_truth(cfg: MoEStudyConfig, truth_seed: int) -> dict[str, np.ndarray]:
  """The truth's parameters (float64 NumPy), shared by both gates and every expert type.

  Drawn as a student's initialisation at scale 1, redrawn (deterministically)
  until its atoms are MIN_SEPARATION apart in gate and in expert parameters.
  Regime "sparse": atom 0 gets zero gate slopes (A_0 = 0, b_0 = 0), a constant
  gate. Under the sigmoid gate that atom is the only one an over-specified
  fit can split exactly (sum_i sigmoid(c_i) = sigmoid(c*_0) with the same
  expert; a split of a sloped sigmoid gate cannot sum to one sigmoid), so the
  extra fitted atom either splits atom 0 (the sparse regime of arXiv 2405.13997
  occurs) or vanishes; each fit records which (losses.regime). Softmax gates
  are translation invariant: zero slopes only mark a reference atom there.
  """
  key = jax.random.key(truth_seed)
  for draw in range(_MAX_DRAWS):
    p = init_params(jax.random.fold_in(key, 10_000 + draw) if draw else key, cfg,
                    cfg.true_experts, 1.0)
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    if cfg.family == "attention" or cfg.true_experts == 1 or _separated(p):
      break
  else:
    raise RuntimeError(f"No truth with atoms {MIN_SEPARATION} apart in {_MAX_DRAWS} draws.")
  if cfg.family == "moe" and cfg.regime == "sparse":
    p["A"][0] = 0.0
    if "b" in p:
      p["b"][0] = 0.0
  return p


def sparse_atoms(cfg: MoEStudyConfig) -> tuple[int, ...]:
  """The true atoms with zero gate slopes."""
  return (0,) if cfg.family == "moe" and cfg.regime == "sparse" else ()


def draw_inputs(key: jax.Array, cfg: MoEStudyConfig, n: int) -> jax.Array:
  shape = (n, cfg.tokens, cfg.dim) if cfg.family == "attention" else (n, cfg.dim)
  return jax.random.normal(key, shape)


def draw_data(cfg: MoEStudyConfig, truth_seed: int, seed: int, n: int) -> tuple[jax.Array, jax.Array]:
  """(X, noise) of repetition `seed` of a truth: the first n of its pool (nested in n, shared by gates)."""
  pool = max(cfg.train_sizes)
  kx, kn = jax.random.split(jax.random.fold_in(jax.random.key(truth_seed), 1 + seed))
  x = draw_inputs(kx, cfg, pool)[:n]
  noise = cfg.noise_std * jax.random.normal(
      kn, x.shape[:-1] + ((cfg.dim,) if cfg.family == "attention" else ()))
  return x, noise[:n]


def test_inputs(cfg: MoEStudyConfig, truth_seed: int) -> jax.Array:
  """A truth's fixed test draw (its own key, disjoint from every repetition's)."""
  return draw_inputs(jax.random.fold_in(jax.random.key(truth_seed), 0), cfg, cfg.test_examples)
