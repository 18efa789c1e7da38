"""Statistics of results against sample size: pure NumPy/SciPy, no study types.

Functions take numbers (sizes, errors, per-seed arrays) and return small
frozen records, so the attention study (`attnlab/studies/`), the synthetic
estimation study (`attnlab/moe/`) and a notebook share them, and `eval.py`
can re-render a report from saved results on any machine (no JAX here).

  intervals  means with Student-t intervals, paired differences, bootstrap percentiles
  fits       results grouped by size, log-log slopes with bootstrap intervals
  power_law  error(n) = a * n^-b + c with its floor F-test and bootstrap
  targets    samples to reach a target error, and the paired ratio of two curves'
  proportions  seeds that reached a target: Wilson intervals, McNemar's exact test
"""
