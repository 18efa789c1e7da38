r"""Estimation losses of a fitted mixture against the truth (float64 NumPy).

Notation: atom i has gate score parameters (A_i, b_i, c_i) (slopes
beta_1i = (sym A_i, b_i), sym A = (A + A^T)/2, the only part x^T A x sees;
intercept c_i) and expert parameters eta_i = (a_i, e_i). A measure G is the
set of atoms; V_j, the Voronoi cell of true atom j, holds the fitted atoms
nearer to atom j than to any other true atom.

Sources. The softmax Voronoi losses follow the least-squares / Gaussian
softmax-gating MoE papers (arXiv 2305.03288; its code's `rbar = [0,1,4,6]`;
arXiv 2402.02952; and arXiv 2505.10860 eqs. (4) and (6), where the mass of an
atom is exp(beta_0i) and cells of several atoms take exponents that grow with
the cell's size for linear experts). The sigmoid loss follows arXiv
2405.13997's construction for sigmoid gating: the same shape with mass
sigmoid(beta_0i) and squared terms in cells of several atoms. The seed paper
(arXiv 2502.00281) uses the same losses with quadratic scores. Its text, and
2405.13997's exact equations, were not available to us: where a choice below
is ours it says so, and docs/results.md ("The losses") derives it.

voronoi_loss(fitted, truth, gate, expert)  [the gate's own loss]

  D(G, G*) = sum_j | sum_{i in V_j} m_i - m*_j |
           + sum_{j: |V_j| = 1} sum_{i in V_j} m_i (|d beta_1ij| + |d eta_ij|)
           + sum_{j: |V_j| > 1} sum_{i in V_j} m_i T_r(d beta_1ij, d eta_ij)

  * m_i = sigmoid(c_i) (sigmoid) or exp(c_i) (softmax); cells by the distance
    of (beta_1, eta).
  * Sigmoid, d c_ij = c_i - c*_j joins the terms (|d c| in single cells,
    |d c|^2 in larger ones) in the cell of a true atom with non-zero gate
    slopes, and not in that of a constant gate (beta*_1j = 0). A constant gate
    can be split exactly (sum_i sigmoid(c_i) = sigmoid(c*_j): only the mass is
    identified); a sloped one cannot (two sigmoids of the same slopes never
    sum to one sigmoid), so there each atom's intercept must itself converge,
    and without |d c| a wrong split with the right total mass would score 0.
    This follows 2405.13997's regime-dependent losses; the form is ours.
    Softmax splits are exact at any slopes (sum_i exp(c_i) = exp(c*_j)).
  * T_r: strongly identifiable experts (ReLU, GELU) and every sigmoid cell:
    |d beta_1|^2 + |d eta|^2. Weakly identifiable experts under softmax
    (linear, and polynomial, for which the literature gives no finite
    exponent; ours): |d beta_1|^r + |d a|^(r/2) + |d e|^r with r = rbar(|V_j|)
    = 4, 6 for cells of 2, 3 atoms (2305.03288's Lemma 1) and 7 for >= 4 (its
    lower bound; ours).
  * Softmax: f is unchanged when one (A, b, c) is added to every atom. The
    intercepts' translation is taken out exactly by normalising the masses,
    m_i = exp(c_i) / sum_l exp(c_l) (as for the truth; minimising over it
    instead would shrink every fitted mass to 0 and cap D at sum_j m*_j),
    and D is minimised over the slopes' translation of the fitted measure
    (numerically: Nelder-Mead from the best of several aligning starts), not
    computed at a fixed reference.

expert_loss(fitted, truth, gate, expert)  [one definition for both gates]

  E(G, G*) = sum_j | sum_{i in V_j} w_i - w*_j |
           + sum_{j: |V_j| = 1} sum_{i in V_j} w_i |d eta_ij|
           + sum_{j: |V_j| > 1} sum_{i in V_j} w_i T'_r(d eta_ij)

  * w_i = E_x[g_i(x)], the atom's mean gate weight over the input
    distribution (the same sample as the pruning); cells by the distance of
    eta alone; T'_r: |d eta|^2 (ReLU, GELU), |d a|^(r/2) + |d e|^r with
    r = rbar(|V_j|) (linear, polynomial). Nothing in it depends on the gate
    but g itself, so the two gates' slopes compare directly.

Both losses, before scoring:
  * prune: the atom whose removal changes f least is removed while that change
    is below `negligible` x E f*(x)^2 in mean square over the inputs (for
    softmax the other atoms renormalise, so removing an atom is judged by the
    whole f). An atom with a vanishing gate, or a ReLU expert that is zero on
    the inputs, gets no gradient and stays wherever it stopped: it says
    nothing about estimation. The count is recorded.
  * quotient the sigmoid symmetry (linear experts): sigmoid(s) h = h -
    sigmoid(-s) h, and -h is again a linear expert, so flipping an atom
    (A, b, c, a, e) -> (-A, -b, -c, -a, -e) leaves f unchanged up to a free
    linear term +h, which an atom with a saturated gate (sigmoid ~ 1) can
    carry. Each subset F of fitted atoms is flipped in turn, the flipped
    measure is pruned (a saturated atom, once flipped, has a vanishing gate),
    and |sum_{i in F} eta_i| (the free term left over) is added; the minimum
    over F is the loss. It is 0 at every exact representation these flips
    reach.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import numpy as np
import scipy.optimize
import scipy.special

STRONG = ("relu", "gelu")  # strongly identifiable experts
RBAR = {2: 4, 3: 6}        # rbar(|V_j|) of 2305.03288; 7 for larger cells (its lower bound)
RBAR_LARGE = 7
DEFAULT_NEGLIGIBLE = 1e-8
DEFAULT_INPUTS = 4096

_EXPERTS = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + scipy.special.erf(z / math.sqrt(2.0))),
    "polynomial": lambda z: z + 0.5 * z * z,
}


@dataclasses.dataclass(frozen=True)
class Score:
  """A loss and what it saw.

  loss: the value; pruned: atoms removed as negligible; flipped: atoms the best
  sigmoid flip turned; cell_sizes: fitted atoms in each true atom's cell;
  regime: "exact" (one fitted atom per cell), or, where a cell holds several,
  "sparse" (every such cell's true atom has zero gate slopes), "dense" (none
  has) or "mixed"; empty_cells: true atoms with no fitted atom.
  """
  loss: float
  pruned: int
  flipped: int
  cell_sizes: tuple[int, ...]
  regime: str
  empty_cells: int


def rbar(cell_size: int) -> int:
  return RBAR.get(cell_size, RBAR_LARGE)


@functools.lru_cache(maxsize=8)
def default_inputs(dim: int, count: int = DEFAULT_INPUTS, seed: int = 0) -> np.ndarray:
  """A fixed sample of the study's input distribution N(0, I_d)."""
  return np.random.default_rng(seed).standard_normal((count, dim))


def _as64(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _atoms(p) -> int:
  return len(p["c"])


def _take(p, keep) -> dict[str, np.ndarray]:
  return {k: v[keep] for k, v in p.items()}


def _slopes(p) -> np.ndarray:
  """beta_1: [K, d*d (+ d)] = (sym A, b)."""
  A = (p["A"] + np.swapaxes(p["A"], 1, 2)) / 2
  return np.concatenate([A.reshape(len(A), -1)] + ([p["b"]] if "b" in p else []), axis=1)


def _eta(p) -> np.ndarray:
  return np.concatenate([p["a"], p["e"][:, None]], axis=1)


def _terms(p, x: np.ndarray, gate: str, expert: str) -> tuple[np.ndarray, np.ndarray]:
  """(scores s [K, m], expert outputs h [K, m]) at inputs x [m, d]."""
  s = np.einsum("kij,mi,mj->km", p["A"], x, x) + p["c"][:, None]
  if "b" in p:
    s = s + p["b"] @ x.T
  return s, _EXPERTS[expert](p["a"] @ x.T + p["e"][:, None])


def gate_weights(s: np.ndarray, gate: str) -> np.ndarray:
  if gate == "sigmoid":
    return scipy.special.expit(s)
  return scipy.special.softmax(s, axis=0)


def regression(p, x: np.ndarray, gate: str, expert: str) -> np.ndarray:
  """f(x) [m] of a moe (float64)."""
  if _atoms(p) == 0:
    return np.zeros(len(x))
  s, h = _terms(p, x, gate, expert)
  return np.sum(gate_weights(s, gate) * h, axis=0)


def prune(p, x: np.ndarray, gate: str, expert: str, threshold: float) -> tuple[dict, int]:
  """Removes, one at a time, the atom whose removal changes f least, while that is < threshold."""
  removed = 0
  while _atoms(p) > 0:
    s, h = _terms(p, x, gate, expert)
    f = np.sum(gate_weights(s, gate) * h, axis=0)
    k = _atoms(p)
    change = np.empty(k)
    for i in range(k):
      rest = np.arange(k) != i
      f_rest = np.sum(gate_weights(s[rest], gate) * h[rest], axis=0) if k > 1 else 0.0 * f
      change[i] = np.mean((f - f_rest) ** 2)
    i = int(np.argmin(change))
    if change[i] >= threshold:
      break
    p = _take(p, np.arange(k) != i)
    removed += 1
  return p, removed


def _flip(p, subset: tuple[int, ...]) -> tuple[dict, np.ndarray]:
  """Flips the atoms in `subset` (sigmoid(s) h = h - sigmoid(-s) h); returns (measure, free term)."""
  q = {k: v.copy() for k, v in p.items()}
  idx = list(subset)
  free = _eta(p)[idx].sum(axis=0) if idx else np.zeros(p["a"].shape[1] + 1)
  for k in q:
    q[k][idx] = -q[k][idx]
  return q, free


# ----------------------------------------------------------------------------
# Cells and the cell terms.
# ----------------------------------------------------------------------------


def _cell_terms(masses, locations, true_masses, true_locations, parts, true_parts, multi_term,
                counted=None):
  """sum_j |sum m - m*_j| + first-order single-cell terms + multi_term(...) in larger cells.

  counted [k*, parts]: which parts' distances count in true atom j's cell (default all).
  """
  dist = np.linalg.norm(locations[:, None, :] - true_locations[None, :, :], axis=-1)
  cell = np.argmin(dist, axis=1) if len(masses) else np.zeros(0, int)
  if counted is None:
    counted = np.ones((len(true_masses), len(parts)), bool)
  loss = 0.0
  sizes = []
  for j in range(len(true_masses)):
    members = np.flatnonzero(cell == j)
    sizes.append(len(members))
    loss += abs(float(np.sum(masses[members])) - true_masses[j])
    diffs = [[np.linalg.norm(part[i] - true_part[j]) * use
              for part, true_part, use in zip(parts, true_parts, counted[j])]
             for i in members]
    for i, diff in zip(members, diffs):
      loss += masses[i] * (sum(diff) if len(members) == 1 else multi_term(diff, len(members)))
  return loss, tuple(sizes)


def _multi_term(split_expert: bool):
  """T_r of the module docstring: rbar(|V_j|) exponents over parts (beta_1, a, e) when the
  expert is split (weak experts under softmax), squares of every part otherwise."""
  if not split_expert:
    return lambda diff, size: sum(v ** 2 for v in diff)
  return lambda diff, size: diff[0] ** rbar(size) + diff[1] ** (rbar(size) / 2) + diff[2] ** rbar(size)


def _regime(sizes: tuple[int, ...], sparse_atoms: tuple[int, ...]) -> str:
  split = [j for j, s in enumerate(sizes) if s > 1]
  if not split:
    return "exact"
  sparse = [j in sparse_atoms for j in split]
  return "sparse" if all(sparse) else "dense" if not any(sparse) else "mixed"


def _masses(c: np.ndarray, gate: str) -> np.ndarray:
  """sigmoid(c), or exp(c) normalised to sum to 1: the intercepts' translation taken out exactly."""
  return scipy.special.expit(c) if gate == "sigmoid" else scipy.special.softmax(c)


def _voronoi_at(p, truth, gate: str, expert: str, shift: np.ndarray | None = None):
  """D(G, G*) with the fitted slopes shifted by `shift` (softmax's translation)."""
  slopes, c = _slopes(p), p["c"]
  if shift is not None:
    slopes = slopes + shift
  mass, t_mass = (_masses(c, gate), _masses(truth["c"], gate))
  t_slopes = _slopes(truth)
  weak_softmax = gate == "softmax" and expert not in STRONG
  parts = [slopes, p["a"], p["e"][:, None]] if weak_softmax else [slopes, _eta(p)]
  t_parts = [t_slopes, truth["a"], truth["e"][:, None]] if weak_softmax else [t_slopes, _eta(truth)]
  counted = None
  if gate == "sigmoid":  # the intercept counts in the cells of sloped true gates only
    parts, t_parts = parts + [c[:, None]], t_parts + [truth["c"][:, None]]
    sloped = np.any(t_slopes != 0, axis=1)
    counted = np.concatenate([np.ones((len(sloped), 2), bool), sloped[:, None]], axis=1)
  return _cell_terms(mass, np.concatenate([slopes, _eta(p)], axis=1), t_mass,
                     np.concatenate([t_slopes, _eta(truth)], axis=1), parts, t_parts,
                     _multi_term(weak_softmax), counted)


def _sym_shift(t: np.ndarray, d: int) -> np.ndarray:
  """[d(d+1)/2 (+ d)] free parameters -> a shift of (vec sym A (, b))."""
  iu = np.triu_indices(d)
  S = np.zeros((d, d))
  S[iu] = t[:len(iu[0])]
  S = S + np.triu(S, 1).T
  return np.concatenate([S.reshape(-1), t[len(iu[0]):]])


def _softmax_voronoi(p, truth, expert: str) -> tuple[float, tuple[int, ...]]:
  """min over slope translations t of D(G + t, G*): Nelder-Mead from the best few aligning starts."""
  d = p["a"].shape[1]
  iu = np.triu_indices(d)

  def free_of(shift):  # (vec sym A, b) shift -> free parameters
    return np.concatenate([shift[:d * d].reshape(d, d)[iu], shift[d * d:]])

  def value(t):
    return _voronoi_at(p, truth, "softmax", expert, _sym_shift(t, d))[0]

  slopes, t_slopes = _slopes(p), _slopes(truth)
  starts = [free_of(np.zeros(slopes.shape[1])),
            free_of(_masses(truth["c"], "softmax") @ t_slopes - _masses(p["c"], "softmax") @ slopes)]
  starts += [free_of(t_slopes[j] - slopes[i]) for i in range(_atoms(p)) for j in range(_atoms(truth))]
  starts.sort(key=value)
  best_t, best = starts[0], value(starts[0])
  for start in starts[:3]:
    res = scipy.optimize.minimize(value, start, method="Nelder-Mead",
                                  options={"xatol": 1e-10, "fatol": 1e-13,
                                           "maxiter": 4000 * len(start), "adaptive": True})
    if res.fun < best:
      best, best_t = float(res.fun), res.x
  return best, _voronoi_at(p, truth, "softmax", expert, _sym_shift(best_t, d))[1]


def _expert_at(p, truth, x, gate: str, expert: str):
  w = np.mean(gate_weights(_terms(p, x, gate, expert)[0], gate), axis=1) if _atoms(p) else np.zeros(0)
  w_true = np.mean(gate_weights(_terms(truth, x, gate, expert)[0], gate), axis=1)
  if expert in STRONG:
    parts, t_parts = [_eta(p)], [_eta(truth)]
    multi = lambda diff, size: diff[0] ** 2  # noqa: E731
  else:
    parts, t_parts = [p["a"], p["e"][:, None]], [truth["a"], truth["e"][:, None]]
    multi = lambda diff, size: diff[0] ** (rbar(size) / 2) + diff[1] ** rbar(size)  # noqa: E731
  return _cell_terms(w, _eta(p), w_true, _eta(truth), parts, t_parts, multi)


# ----------------------------------------------------------------------------
# The losses.
# ----------------------------------------------------------------------------


def _score(kind: str, fitted, truth, *, gate: str, expert: str, inputs, negligible: float,
           sparse_atoms: tuple[int, ...]) -> Score:
  fitted, truth = _as64(fitted), _as64(truth)
  x = default_inputs(truth["a"].shape[1]) if inputs is None else np.asarray(inputs, np.float64)
  threshold = negligible * float(np.mean(regression(truth, x, gate, expert) ** 2))
  subsets = [()]
  if gate == "sigmoid" and expert == "linear":
    k = _atoms(fitted)
    subsets = [c for r in range(k + 1) for c in itertools.combinations(range(k), r)]
  best = None
  for subset in subsets:
    flipped, free = _flip(fitted, subset)
    kept, removed = prune(flipped, x, gate, expert, threshold)
    if kind == "expert":
      loss, sizes = _expert_at(kept, truth, x, gate, expert)
    elif gate == "softmax" and _atoms(kept):
      loss, sizes = _softmax_voronoi(kept, truth, expert)
    else:
      loss, sizes = _voronoi_at(kept, truth, gate, expert)
    loss += float(np.linalg.norm(free))
    if best is None or loss < best.loss:
      best = Score(float(loss), removed, len(subset), sizes, _regime(sizes, sparse_atoms),
                   sum(s == 0 for s in sizes))
  return best


def voronoi_score(fitted, truth, *, gate: str, expert: str, inputs=None,
                  negligible: float = DEFAULT_NEGLIGIBLE, sparse_atoms: tuple[int, ...] = ()) -> Score:
  """The gate's own Voronoi loss D(G, G*) with what it saw (module docstring)."""
  return _score("voronoi", fitted, truth, gate=gate, expert=expert, inputs=inputs,
                negligible=negligible, sparse_atoms=sparse_atoms)


def expert_score(fitted, truth, *, gate: str, expert: str, inputs=None,
                 negligible: float = DEFAULT_NEGLIGIBLE, sparse_atoms: tuple[int, ...] = ()) -> Score:
  """The gate-independent expert loss E(G, G*) with what it saw (module docstring)."""
  return _score("expert", fitted, truth, gate=gate, expert=expert, inputs=inputs,
                negligible=negligible, sparse_atoms=sparse_atoms)


def voronoi_loss(fitted, truth, *, gate: str, expert: str, **kwargs) -> float:
  """D(G, G*) of the module docstring: the literature's Voronoi loss for `gate`."""
  return voronoi_score(fitted, truth, gate=gate, expert=expert, **kwargs).loss


def expert_loss(fitted, truth, *, gate: str, expert: str, **kwargs) -> float:
  """E(G, G*) of the module docstring: how well each true expert and its gate share are recovered."""
  return expert_score(fitted, truth, gate=gate, expert=expert, **kwargs).loss


def attention_losses(fitted, truth, gate: str) -> tuple[float, float]:
  """(parameter loss, value loss) of one attention head: first-order Frobenius distances.

  No atoms, no over-specification: |W - W*| + |V - V*| (+ |c - c*| for
  sigmoid), and |V - V*| alone as the gate-independent loss.
  """
  fitted, truth = _as64(fitted), _as64(truth)
  names = ("W", "V", "c") if gate == "sigmoid" else ("W", "V")
  param = float(sum(np.linalg.norm(fitted[k] - truth[k]) for k in names))
  return param, float(np.linalg.norm(fitted["V"] - truth["V"]))
