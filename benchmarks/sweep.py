r"""Study cells trained batched (one vmapped group) vs one after another: wall time and ratio.

  python benchmarks/sweep.py                                  # 3 seeds of the quick digits ViT
  python benchmarks/sweep.py --config configs/digits_vit.py:sigmoid --seeds 3 --n 256 --steps 100

Both modes train the same cells (one kind, one subset size n, seeds 0..k-1)
with `attnlab.studies.cells`, compile included:

  batched     one group of k cells: one jitted vmap over the stacked states;
  sequential  k groups of one cell, one after another in the same process, so
              the compiled programs of the first are reused by the others
              (an honest baseline: what a loop of single runs costs).

Each measurement runs in a fresh process (nothing compiled is shared between
modes), the modes alternate, and the table gives medians over --repeats
(shared CPUs are noisy). The results of both modes are checked equal first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cells(args):
  from attnlab.studies import cells as cells_lib  # pylint: disable=import-outside-toplevel

  return [cells_lib.Cell(kind=args.kind, n=args.n, seed=s) for s in range(args.seeds)]


def _config(args):
  from attnlab import configlib  # pylint: disable=import-outside-toplevel

  config = configlib.load(args.config)
  config.total_steps, config.num_epochs, config.total_examples = args.steps, None, None
  config.progress_bar = False
  return config


def measure(args) -> dict:
  """One measurement of one mode, in this process: seconds and the cells' test losses."""
  from attnlab.studies import cells as cells_lib  # pylint: disable=import-outside-toplevel

  config, cells = _config(args), _cells(args)
  start = time.perf_counter()
  if args.mode == "batched":
    results = cells_lib.train_group(config, cells)
  else:
    results = [r for cell in cells for r in cells_lib.train_group(config, [cell])]
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "test_loss": [r.test_loss for r in results]}


def _run_child(args, mode: str) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode,
          "--config", args.config, "--kind", args.kind, "--n", str(args.n),
          "--seeds", str(args.seeds), "--steps", str(args.steps)]
  out = subprocess.run(argv, cwd=REPO, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits_vit.py:sigmoid,quick")
  parser.add_argument("--kind", default="sigmoid")
  parser.add_argument("--n", type=int, default=256, help="training examples per cell")
  parser.add_argument("--seeds", type=int, default=3, help="cells (seeds 0..k-1)")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--mode", choices=("batched", "sequential"))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args)))
    return

  times = {"batched": [], "sequential": []}
  losses = {}
  for r in range(args.repeats):
    order = ("batched", "sequential") if r % 2 == 0 else ("sequential", "batched")
    for mode in order:
      result = _run_child(args, mode)
      times[mode].append(result["seconds"])
      losses[mode] = result["test_loss"]
  worst = max(abs(a - b) for a, b in zip(losses["batched"], losses["sequential"]))
  if worst > 1e-4:
    raise SystemExit(f"batched and sequential cells disagree (test loss differs by {worst:.2e})")

  import jax  # pylint: disable=import-outside-toplevel

  batched, sequential = (statistics.median(times[m]) for m in ("batched", "sequential"))
  print(f"{args.seeds} cells ({args.config}, kind={args.kind}, n={args.n}, {args.steps} steps), "
        f"compile included; median of {args.repeats}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs")
  print(f"  {'mode':<12}{'seconds':>10}   runs")
  for mode in ("batched", "sequential"):
    runs = " ".join(f"{t:.1f}" for t in times[mode])
    print(f"  {mode:<12}{statistics.median(times[mode]):>10.1f}   {runs}")
  print(f"  sequential / batched = {sequential / batched:.2f}x  "
        f"(max |test loss| difference between modes {worst:.1e})")


if __name__ == "__main__":
  main()
