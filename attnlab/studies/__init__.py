"""Sample-efficiency studies: many (kind, subset size, seed) cells, their statistics and report.

`cells` trains a group of cells together under `jax.vmap`; `analysis` turns
per-cell results into intervals, paired differences, power-law fits and
samples-to-target ratios.
"""
