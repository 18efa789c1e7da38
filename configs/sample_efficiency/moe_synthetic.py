r"""The seed paper's synthetic estimation study: sigmoid vs softmax gating, Voronoi losses, rates.

A quadratic-gating mixture of experts (arXiv 2502.00281's reading of one
attention row) with k* = 2 experts in d = 2 is the ground truth, once with
sigmoid and once with softmax gating; Y = f*(X) + N(0, 0.1^2) noise, X Gaussian.
Sigmoid- and softmax-gated students with k = 3 experts (over-specified) are
fitted by least squares (Adam, then L-BFGS; 3 restarts, best training loss
kept) to the same data from both truths, for linear and ReLU experts. Reported
per (truth, expert, student): the Voronoi loss (same-gate students only) and
the test MSE against f*, against n on log-log axes, with the fitted slope
(the empirical rate) and a bootstrap interval over repetitions. The model,
the loss and every choice are in attnlab/studies/moe_estimation.py.

  python -m attnlab.studies.moe_estimation --config configs/sample_efficiency/moe_synthetic.py --workdir runs/moe
  python -m attnlab.studies.moe_estimation --config configs/sample_efficiency/moe_synthetic.py:quick --workdir /tmp/moe
  python train.py --config configs/sample_efficiency/moe_synthetic.py   # once train.py dispatches here (not yet)

Argument (after the colon, comma-separated):
  quick      linear experts, 2 sizes x 2 repetitions, short fits (under a minute on CPU; tests)
  full       the issue's grid: 10^2 ... 10^5 (7 sizes), 20 repetitions
  attention  the attention-level version: one head over 4 tokens as teacher
  sparse     the sparse regime: the first true atom's gate slopes are zero
  partial    partially quadratic scores (no linear term)

Expected (measured): see docs/results.md, section "Synthetic estimation"; the
default grid (10^2 ... 10^4) is filled in there with its runtime in s.
"""

import ml_collections

from attnlab import configlib
from attnlab.studies.moe_estimation import MoEStudyConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, quick=False, full=False, attention=False, sparse=False,
                             partial=False)
  config = ml_collections.ConfigDict()
  config.moe = configlib.from_dataclass(
      MoEStudyConfig,
      family="attention" if args.attention else "moe",
      truths=("sigmoid", "softmax"),
      students=("sigmoid", "softmax"),
      experts=("linear",) if args.attention else ("linear", "relu"),
      score="partial" if args.partial else "full",
      regime="sparse" if args.sparse else "dense",
      dim=2, tokens=4, true_experts=2, fitted_experts=3, truth_seed=0, noise_std=0.1,
      train_sizes=(100, 316, 1000, 3162, 10000),
      seeds=tuple(range(10)),
      restarts=3, adam_steps=1000, learning_rate=0.02, lbfgs_steps=200,
      test_examples=10000, bootstrap=1000,
  )
  if args.full:
    config.moe.update(train_sizes=(100, 316, 1000, 3162, 10000, 31623, 100000),
                      seeds=tuple(range(20)))
  if args.quick:
    config.moe.update(experts=("linear",), train_sizes=(100, 1000), seeds=(0, 1), restarts=2,
                      adam_steps=150, lbfgs_steps=20, test_examples=2000, bootstrap=100)
  return config.lock()
