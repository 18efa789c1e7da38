"""The pre-registered MQAR test (docs/results.md, "Planned before it runs"), as planned.

Written (commit-dated) before the last chunk finished. Run from the repository root:
  python docs/results/mqar_confirm_analysis.py [report_dir]

Pools the recorded cells of runs/mqar500_confirm_{a,b,c} (each cells/*.json; a chunk whose
workdir this machine lacks is read from its record, docs/results/records/mqar500_confirm_*),
checks they are the planned 36 (n = 500, seeds 9-26, both kinds), and prints the primary test
(McNemar exact, solved at <= 10%) and the reported-not-tested figures. Partial chunks print
what is in.
"""
import glob
import os
import sys

from attnlab.stats import proportions
from attnlab.studies import analysis, report, results


def chunk_files(chunk: str) -> list[str]:
  workdir = f"runs/mqar500_confirm_{chunk}"
  if os.path.isdir(workdir):
    return sorted(glob.glob(f"{workdir}/cells/*.json"))
  return glob.glob(f"docs/results/records/mqar500_confirm_{chunk}_seeds*.json")


cells = [c for chunk in "abc" for path in chunk_files(chunk) for c in results.load_cells(path)]
planned = {(k, 500, s) for k in ("sigmoid", "softmax") for s in range(9, 27)}
got = {(c.kind, c.n, c.seed) for c in cells}
assert got <= planned, f"cells outside the plan: {sorted(got - planned)}"
print(f"{len(got)} of {len(planned)} planned cells recorded; missing: {sorted(planned - got)}")
err = {(c.kind, c.seed): c.test_error for c in cells}
seeds = sorted({s for (_, s) in err if ("sigmoid", s) in err and ("softmax", s) in err})
print("paired seeds:", seeds)
for s in seeds:
  print(f"  seed {s}: sigmoid {100*err['sigmoid', s]:.1f}%  softmax {100*err['softmax', s]:.1f}%")

(row,) = analysis.solved_at_target(cells, 0.1)
print(f"PRIMARY: solved <= 10%: sigmoid {row.solved[0]}/{row.pairs} {row.intervals[0]}, "
      f"softmax {row.solved[1]}/{row.pairs} {row.intervals[1]}; only sigmoid / only softmax "
      f"{row.only[0]} / {row.only[1]}; McNemar exact two-sided p = {row.p_value:.4g}")
lower = [err["sigmoid", s] < err["softmax", s] for s in seeds
         if err["sigmoid", s] != err["softmax", s]]
print(f"sign test on untied pairs: sigmoid lower in {sum(lower)}, softmax in "
      f"{len(lower) - sum(lower)}; "
      f"p = {proportions.mcnemar_exact_p(sum(lower), len(lower) - sum(lower)):.4g}")
for kind in ("sigmoid", "softmax"):
  mem = sum(err[kind, s] >= 0.5 for s in seeds)
  print(f"{kind}: left in memorisation (error >= 50%): {mem}/{len(seeds)}")
(diff,) = analysis.paired_differences(cells)
print(f"paired mean sigmoid - softmax: {diff.error}")
for r in analysis.end_of_training(cells):
  print(f"{r.kind}: best step last {r.best_at_end}/{r.cells}, final train loss {r.train_loss}, "
        f"loss spikes {r.spiked}")
for c in sorted(cells, key=lambda c: (c.kind, c.seed)):
  print(f"  {c.kind} seed {c.seed}: best step {c.best_step}, "
        f"spikes at {analysis.loss_spikes(c.curve)}")
if len(sys.argv) > 1:  # a directory: the pooled report (tables, plots, learning curves)
  print(report.write_report(cells, sys.argv[1], target=0.1))
