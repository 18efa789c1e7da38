"""Sample-efficiency studies: many (kind, subset size, seed) cells, their statistics and report.

`study` turns a study config into a plan of groups, trains them (resumably)
and writes the report; `cells` trains one group of cells together under
`jax.vmap`; `analysis` turns per-cell results into intervals, paired
differences, power-law fits, samples-to-target ratios, plots and a budget
check.
"""
