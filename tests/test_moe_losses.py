"""The estimation losses on constructed cases whose true value is known (attnlab.moe.losses).

Each case is built by hand from a fixed truth: the loss must be 0 exactly where
the fitted mixture is the truth up to a symmetry, clearly > 0 where the
function differs, and of the literature's order under a perturbation of size eps.
"""

import numpy as np
import pytest

from attnlab.moe import losses

GATES = ("sigmoid", "softmax")
EXPERTS = ("linear", "relu", "gelu", "polynomial")
LOSSES = {"voronoi": losses.voronoi_loss, "expert": losses.expert_loss}


def _truth(d=2, k=3):
  """Three well separated atoms in d = 2, every gate slope non-zero."""
  rng = np.random.default_rng(7)
  A = rng.normal(scale=0.5, size=(k, d, d))
  return {"A": A, "b": rng.normal(size=(k, d)), "c": np.array([0.3, -0.4, 0.1]),
          "a": np.array([[1.0, -0.5], [-0.8, 0.9], [0.2, 1.3]]), "e": np.array([0.4, -0.3, 0.8])}


def _stack(*atoms):
  return {k: np.concatenate([a[k] for a in atoms]) for k in atoms[0]}


def _atom(p, i):
  return {k: v[i:i + 1].copy() for k, v in p.items()}


def _f(p, gate, expert):
  return losses.regression(p, losses.default_inputs(2), gate, expert)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("expert", EXPERTS)
def test_zero_at_the_truth_and_its_permutations(loss, gate, expert):
  truth = _truth()
  assert LOSSES[loss](truth, truth, gate=gate, expert=expert) == pytest.approx(0, abs=1e-12)
  permuted = {k: v[[2, 0, 1]] for k, v in truth.items()}
  transposed = {**permuted, "A": np.swapaxes(permuted["A"], 1, 2)}  # the same quadratic form
  assert LOSSES[loss](transposed, truth, gate=gate, expert=expert) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("expert", EXPERTS)
def test_a_common_translation_of_every_softmax_score_costs_nothing(loss, expert):
  truth = _truth()
  moved = {**truth, "A": truth["A"] + np.array([[0.7, -0.2], [0.4, 1.1]]),
           "b": truth["b"] + np.array([-0.6, 0.9]), "c": truth["c"] + 2.5}
  np.testing.assert_allclose(_f(moved, "softmax", expert), _f(truth, "softmax", expert), atol=1e-12)
  assert LOSSES[loss](moved, truth, gate="softmax", expert=expert) == pytest.approx(0, abs=1e-7)
  # Sigmoid gates are not translation invariant: the same move is another function and loss.
  assert LOSSES[loss](moved, truth, gate="sigmoid", expert=expert) > 0.1


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("expert", EXPERTS)
def test_an_extra_atom_gated_off_is_pruned(loss, gate, expert):
  truth = _truth()
  extra = {"A": np.array([[[0.3, 0.1], [0.1, -0.2]]]), "b": np.array([[2.0, -1.0]]),
           "c": np.array([-60.0]), "a": np.array([[3.0, 3.0]]), "e": np.array([5.0])}
  score = (losses.voronoi_score if loss == "voronoi" else losses.expert_score)(
      _stack(truth, extra), truth, gate=gate, expert=expert)
  assert score.loss == pytest.approx(0, abs=1e-9) and score.pruned == 1


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_an_identically_zero_sigmoid_relu_atom_is_pruned(loss):
  truth = _truth()
  dead = {"A": np.array([[[0.5, 0.0], [0.0, 0.5]]]), "b": np.array([[1.0, 1.0]]),
          "c": np.array([2.0]), "a": np.zeros((1, 2)), "e": np.array([-3.0])}
  fit = _stack(truth, dead)
  np.testing.assert_array_equal(_f(fit, "sigmoid", "relu"), _f(truth, "sigmoid", "relu"))
  assert LOSSES[loss](fit, truth, gate="sigmoid", expert="relu") == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_relu_expert_split_into_unequal_parts_is_a_different_function_and_scores_clearly(loss):
  truth = _truth()
  first, second = _atom(truth, 0), _atom(truth, 0)
  # Parts that sum to the true expert's parameters but point elsewhere: relu(z1) + relu(z2)
  # is not relu(z1 + z2) when their signs differ.
  first["a"] = truth["a"][:1] + np.array([[1.5, 1.0]])
  second["a"] = -np.array([[1.5, 1.0]])
  first["e"], second["e"] = truth["e"][:1] + 0.5, np.array([-0.5])
  fit = _stack(first, second, _atom(truth, 1), _atom(truth, 2))
  assert np.mean((_f(fit, "sigmoid", "relu") - _f(truth, "sigmoid", "relu")) ** 2) > 1e-2
  assert LOSSES[loss](fit, truth, gate="sigmoid", expert="relu") > 0.5


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("expert", EXPERTS)
def test_a_constant_sigmoid_gate_split_in_two_is_exact_and_a_sloped_one_is_not(loss, expert):
  truth = _truth()
  truth["A"][0], truth["b"][0] = 0.0, 0.0  # the sparse regime's atom: a constant gate
  mass = 1 / (1 + np.exp(-truth["c"][0]))
  halves = [_atom(truth, 0), _atom(truth, 0)]
  for part, share in zip(halves, (0.3, 0.7)):
    part["c"] = np.log(share * mass / (1 - share * mass))[None]
  fit = _stack(*halves, _atom(truth, 1), _atom(truth, 2))
  np.testing.assert_allclose(_f(fit, "sigmoid", expert), _f(truth, "sigmoid", expert), atol=1e-12)
  score = (losses.voronoi_score if loss == "voronoi" else losses.expert_score)(
      fit, truth, gate="sigmoid", expert=expert, sparse_atoms=(0,))
  assert score.loss == pytest.approx(0, abs=1e-9)
  assert score.cell_sizes == (2, 1, 1) and score.regime == "sparse"
  # The same split of a sloped gate is another function: sigmoid(s + u) + sigmoid(s + v) != sigmoid(s).
  sloped = _truth()
  fit = _stack(*[{**h, "A": sloped["A"][:1], "b": sloped["b"][:1]} for h in halves],
               _atom(sloped, 1), _atom(sloped, 2))
  assert np.mean((_f(fit, "sigmoid", expert) - _f(sloped, "sigmoid", expert)) ** 2) > 1e-4
  # The expert loss sees the gate only through its mean weight E g_i(x): smaller, still > 0.
  assert LOSSES[loss](fit, sloped, gate="sigmoid", expert=expert) > (0.05 if loss == "voronoi" else 1e-3)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_the_linear_sigmoid_symmetry_is_quotiented(loss):
  """sigmoid(s) h = h - sigmoid(-s) h: atom 0 flipped, its h carried by a saturated gate."""
  truth = _truth()
  flipped = {k: -v for k, v in _atom(truth, 0).items()}
  saturated = {"A": np.zeros((1, 2, 2)), "b": np.zeros((1, 2)), "c": np.array([60.0]),
               "a": truth["a"][:1], "e": truth["e"][:1]}
  fit = _stack(flipped, _atom(truth, 1), _atom(truth, 2), saturated)
  np.testing.assert_allclose(_f(fit, "sigmoid", "linear"), _f(truth, "sigmoid", "linear"), atol=1e-12)
  score = (losses.voronoi_score if loss == "voronoi" else losses.expert_score)(
      fit, truth, gate="sigmoid", expert="linear")
  assert score.loss == pytest.approx(0, abs=1e-9) and score.flipped == 2 and score.pruned == 1
  # A flip whose free term nothing carries changes f, and the loss sees it.
  unbalanced = _stack(flipped, _atom(truth, 1), _atom(truth, 2))
  assert LOSSES[loss](unbalanced, truth, gate="sigmoid", expert="linear") > 0.5


def _split_pair(truth, eps, direction, part):
  """True atom 0 split into two atoms of half its mass (softmax), located at +-eps along `part`."""
  a0, a1 = _atom(truth, 0), _atom(truth, 0)
  for atom, sign in ((a0, 1), (a1, -1)):
    atom["c"] = atom["c"] - np.log(2.0)
    atom[part] = atom[part] + sign * eps * direction[part]
  return _stack(a0, a1, _atom(truth, 1), _atom(truth, 2))


def _order(loss_of, eps_values=(1e-2, 3e-3, 1e-3)):
  vals = [loss_of(eps) for eps in eps_values]
  return np.polyfit(np.log(eps_values), np.log(vals), 1)[0]


DIRECTIONS = {"A": np.array([[[0.6, 0.0], [0.0, -0.8]]]), "b": np.array([[0.6, -0.8]]),
              "a": np.array([[0.8, 0.6]]), "e": np.array([1.0])}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("expert", EXPERTS)
def test_a_perturbation_of_one_exact_atom_costs_first_order(gate, expert):
  truth = _truth()
  for part in ("b", "a"):
    def voronoi(eps):
      fit = {k: v.copy() for k, v in truth.items()}
      fit[part][1] += eps * DIRECTIONS[part][0]
      return losses.voronoi_loss(fit, truth, gate=gate, expert=expert)
    assert _order(voronoi) == pytest.approx(1.0, abs=0.05), part


# (gate, expert, perturbed part) -> the literature's order in a cell of two atoms.
SPLIT_ORDERS = {
    ("softmax", "relu", "b"): 2, ("softmax", "relu", "a"): 2,
    ("softmax", "gelu", "b"): 2, ("softmax", "gelu", "a"): 2,
    ("softmax", "linear", "b"): 4, ("softmax", "linear", "a"): 2, ("softmax", "linear", "e"): 4,
    ("softmax", "polynomial", "b"): 4, ("softmax", "polynomial", "a"): 2,
}


@pytest.mark.parametrize("gate,expert,part", sorted(SPLIT_ORDERS))
def test_a_symmetric_split_costs_the_literatures_order(gate, expert, part):
  truth = _truth()
  order = _order(lambda eps: losses.voronoi_loss(_split_pair(truth, eps, DIRECTIONS, part), truth,
                                                 gate=gate, expert=expert))
  assert order == pytest.approx(SPLIT_ORDERS[(gate, expert, part)], abs=0.1)


@pytest.mark.parametrize("expert,part,order", [("relu", "a", 2), ("linear", "a", 2), ("linear", "e", 4)])
@pytest.mark.parametrize("gate", GATES)
def test_the_expert_loss_takes_the_same_orders_under_both_gates(gate, expert, part, order):
  truth = _truth()
  def expert_loss(eps):
    fit = _split_pair(truth, eps, DIRECTIONS, part)
    if gate == "sigmoid":  # split the expert, not the gate: two half experts keep f's scale
      fit["c"][:2] = truth["c"][0]
    return losses.expert_loss(fit, truth, gate=gate, expert=expert) - losses.expert_loss(
        _split_pair(truth, 0.0, DIRECTIONS, part) | ({"c": fit["c"]} if gate == "sigmoid" else {}),
        truth, gate=gate, expert=expert)
  assert _order(expert_loss) == pytest.approx(order, abs=0.1)


@pytest.mark.parametrize("part", ["A", "a", "e"])
@pytest.mark.parametrize("expert", ["linear", "relu"])
def test_a_split_constant_sigmoid_gate_costs_second_order(expert, part):
  """The sparse regime's cell: a constant gate split exactly, then its members moved by +-eps."""
  truth = _truth()
  truth["A"][0], truth["b"][0] = 0.0, 0.0
  mass = 1 / (1 + np.exp(-truth["c"][0]))

  def voronoi(eps):
    halves = [_atom(truth, 0), _atom(truth, 0)]
    for half, share, sign in zip(halves, (0.3, 0.7), (1, -1)):
      half["c"] = np.log(share * mass / (1 - share * mass))[None]
      half[part] = half[part] + sign * eps * DIRECTIONS[part]
    fit = _stack(*halves, _atom(truth, 1), _atom(truth, 2))
    return losses.voronoi_loss(fit, truth, gate="sigmoid", expert=expert)

  assert _order(voronoi) == pytest.approx(2.0, abs=0.1)
