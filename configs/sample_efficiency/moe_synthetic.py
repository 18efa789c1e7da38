r"""The seed paper's synthetic estimation study: sigmoid vs softmax gating, estimation losses, rates.

A quadratic-gating mixture of experts (arXiv 2502.00281's reading of one
attention row) with k* = 3 atoms in d = 2 is the ground truth, drawn from each
of 5 truth seeds, once with sigmoid and once with softmax gating;
Y = f*(X) + N(0, 0.1^2), X Gaussian. Sigmoid- and softmax-gated students with
k = 4 atoms (over-specified) are fitted in float64 by least squares (Adam, then
L-BFGS continued until converged; 3 restarts, best training loss kept) to the
same data from both truths, 8 repetitions per truth: 40 (truth, repetition)
units per size. Reported: each gate's Voronoi loss, the gate-independent
expert loss and the test MSE against n, their log-log slopes over n >= 1,000
and the paired bootstrap interval of every slope difference sigmoid - softmax
(attnlab/moe/: losses.py defines the losses, report.py the tables).

  python train.py --config configs/sample_efficiency/moe_synthetic.py --workdir runs/moe
  python train.py --config configs/sample_efficiency/moe_synthetic.py:quick --workdir /tmp/moe
  python eval.py  --config configs/sample_efficiency/moe_synthetic.py --workdir runs/moe  # re-render

Argument (after the colon, comma-separated):
  (none)     dense regime, full scores, linear/polynomial/ReLU/GELU experts,
             n = 1,000 ... 10,000 (4 sizes), 40 units; measured times and results:
             docs/results.md, "Synthetic estimation".
  linear, polynomial, relu, gelu   only that expert type (a grid split into runs)
  partial    partially quadratic scores (no linear term b)
  sparse     the sparse regime: true atom 0's gate slopes are zero (model.ground_truth)
  large      adds n = 31,623 (5 sizes)
  oracle     restart 0 starts at the truth's atoms (the extra atom random): the rate of
             a fit that at least reaches the truth's basin
  quick      2 truths x 2 repetitions, 2 small sizes, short fits (tests): seconds
  attention  the attention-level version: one head over 4 tokens as teacher

Expected (measured, 40 units per size, n = 1,000 ... 10,000, 2 shared CPU cores, jax
0.12.0.1; `:linear` 31 min, `:relu` 23 min): the own-truth slope difference sigmoid -
softmax of the Voronoi loss, mean / median over units, is +1.01 [+0.24, +1.37] /
+0.19 [-0.20, +0.53] with linear experts and +0.15 [-0.21, +0.46] / -0.08 [-0.34, +0.35]
with ReLU: no sigmoid advantage, and softmax's loss falls faster with linear experts by
the mean. Up to 25 of 40 sigmoid fits per size end above the truth's own training loss
(local minima; softmax: at most 6). docs/results.md ("Synthetic estimation") has every
table, the oracle-started and sparse-regime runs and the variants still to run.
"""

import ml_collections

from attnlab import configlib
from attnlab.moe.config import EXPERT_NAMES
from attnlab.moe.config import MoEStudyConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, quick=False, large=False, attention=False, sparse=False,
                             partial=False, oracle=False, **{e: False for e in EXPERT_NAMES})
  only = tuple(e for e in EXPERT_NAMES if args[e])
  config = ml_collections.ConfigDict()
  config.engine = "moe"
  config.moe = configlib.from_dataclass(
      MoEStudyConfig,
      family="attention" if args.attention else "moe",
      truths=("sigmoid", "softmax"),
      students=("sigmoid", "softmax"),
      experts=("linear",) if args.attention else (only or EXPERT_NAMES),
      score="partial" if args.partial else "full",
      regime="sparse" if args.sparse else "dense",
      dim=2, tokens=4,
      true_experts=1 if args.attention else 3, fitted_experts=1 if args.attention else 4,
      truth_seeds=(0, 1, 2, 3, 4), noise_std=0.1,
      train_sizes=(1000, 2154, 4642, 10000) + ((31623,) if args.large else ()),
      seeds=tuple(range(8)),
      # Adam picks the basin on at most 10^4 examples; L-BFGS fits all n, continued in
      # rounds until converged (a fit still unconverged is left out of the rates).
      restarts=3, adam_steps=1000, adam_examples=10000, learning_rate=0.02,
      lbfgs_steps=1000, lbfgs_rounds=6, lbfgs_tolerance=1e-6, float64=True,
      init_at_truth=args.oracle,
      test_examples=4096, negligible=1e-8, rate_min_n=1000, bootstrap=1000,
  )
  if args.quick:
    config.moe.update(experts=only or ("linear",), truth_seeds=(0, 1), seeds=(0, 1),
                      train_sizes=(100, 300), rate_min_n=100, restarts=2, adam_steps=150,
                      lbfgs_steps=100, lbfgs_rounds=2, lbfgs_tolerance=1e-4, test_examples=1000,
                      bootstrap=100)
  return config.lock()
