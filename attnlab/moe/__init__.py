r"""The seed paper's synthetic estimation study: sigmoid- vs softmax-gated experts.

Yan et al. (arXiv 2502.00281) read a row of self-attention as a mixture of
experts with quadratic gating scores and prove that least-squares estimates of
sigmoid-gated experts converge faster in the sample size n than softmax-gated
ones. This package measures that on synthetic data, one job per module:

  config   MoEStudyConfig: what `config.moe` may hold, checked.
  model    gates, experts, parameters, f(x), ground truths and data draws.
  lbfgs    a vmap-friendly L-BFGS (one loss evaluation per iteration).
  fit      least-squares fits (Adam, then L-BFGS, continued until converged).
  losses   the estimation losses (float64 NumPy): Voronoi and expert losses.
  rates    log-log slopes and paired slope differences, resampling whole curves.
  study    groups of fits, recorded resumably in a workdir; `run`, `render`.
  report   report.md, results.json and rates.png from the recorded groups.

It is entered through train.py / eval.py with a config from
configs/sample_efficiency/moe_synthetic.py; docs/results.md holds what it measured.
"""
