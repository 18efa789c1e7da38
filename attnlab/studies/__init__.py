"""Sample-efficiency studies: many (kind, subset size, seed) cells, their statistics and report.

`study` turns a study config into a plan of groups, trains them (resumably)
and writes the report; `cells` trains one group of cells together under
`jax.vmap` (`groups`: the cells, groups and their data; `stack`: the stacked
per-cell arrays and where they live; `scoring`: selection, test scores and
records); `results` is the record of one cell and the files of a study's
cells; `analysis` turns cells into intervals, paired differences, power-law
fits, samples-to-target ratios and a budget check (the statistics themselves
live in `attnlab/stats`); `report` writes report.md and the plots.
"""
