r"""A study's cells trained batched (vmapped groups) vs one after another: wall time and ratio.

  python benchmarks/sweep.py                       # the default digits study's sigmoid cells, short budgets
  python benchmarks/sweep.py --kinds sigmoid,softmax --min_steps 500 --epochs 30   # the study's own budgets
  python benchmarks/sweep.py --config configs/sample_efficiency/mqar.py --min_steps 100 --steps 100

All modes train the same cells (the study config's sizes and seeds, for the
kinds asked) with the same budgets, with `attnlab.studies.cells`, compile and
model selection included:

  batched     the study's plan and settings: one group per kind, every size
              and seed in one jitted program, finished cells leaving the stack
              (on CPU the cells run one after another inside the program:
              study.vmap_cells=None picks 1 there);
  vmapped     the same with every cell of the stack side by side under
              jax.vmap (study.vmap_cells = the group's size: what accelerators
              get);
  sequential  every cell as a group of one, one after another in the same
              process, so the compiled programs of the first cell are reused by
              all the others (an honest baseline: a loop of single runs that
              pays no compile or data loading twice).

Each measurement runs in a fresh process (nothing compiled is shared between
modes), the modes alternate, and the table gives medians over --repeats
(shared CPUs are noisy), with the part of each spent in XLA compilation: with
short budgets compilation dominates (a batched group compiles its step once
per stack size, the sequential loop once in all), with long ones the steps do. The
batched and sequential modes' results are checked equal first (on CPU they run the same
one-cell program); vmapped's difference, rounding of batched matmuls amplified by
training, is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("batched", "vmapped", "sequential")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(args):
  # pylint: disable=import-outside-toplevel
  from attnlab import configlib
  from attnlab.studies import study as study_lib

  config = configlib.load(args.config).unlock()
  if args.min_steps is not None:
    config.study.min_steps = args.min_steps
  if args.epochs is not None:
    config.num_epochs, config.total_steps, config.total_examples = args.epochs, None, None
  if args.steps is not None:
    config.num_epochs, config.total_steps, config.total_examples = None, args.steps, None
  config.study.progress_bar = False
  return study_lib, config


def measure(args) -> dict:
  """One measurement of one mode, in this process: seconds and every cell's test loss."""
  import jax  # pylint: disable=import-outside-toplevel
  from attnlab.studies import cells as cells_lib  # pylint: disable=import-outside-toplevel
  from attnlab.studies import groups as groups_lib  # pylint: disable=import-outside-toplevel

  compile_seconds = []  # XLA's own compile time: with short budgets it dominates a mode

  def on_duration(event: str, seconds: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compile_seconds.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  study_lib, config = _study(args)
  start = time.perf_counter()
  study, exp_cfg = study_lib.split_config(config)
  setups = study_lib.prepare(study, exp_cfg)
  # The study's own plan, for the kinds asked (a study compares two kinds; the
  # benchmark may time one).
  groups = [g for g in study_lib.plan(study, exp_cfg) if g.cells[0].kind in args.kinds.split(",")]
  if args.mode == "vmapped":
    setups = {k: dataclasses.replace(s, vmap_cells=None) for k, s in setups.items()}
  if args.mode == "sequential":
    groups = [groups_lib.GroupSpec(name=c.name, cells=(c,), budgets=(b,))
              for g in groups for c, b in zip(g.cells, g.budgets)]
  results = [r for g in groups for r in cells_lib.train_group(g, setups[g.cells[0].kind])]
  seconds = time.perf_counter() - start
  results.sort(key=lambda r: (r.kind, r.n, r.seed))
  return {"seconds": seconds, "compile_seconds": sum(compile_seconds),
          "test_loss": [r.test_loss for r in results],
          "cells": len(results), "cell_steps": sum(r.steps for r in results)}


def _run_child(args, mode: str) -> dict:
  argv = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode,
          "--config", args.config, "--kinds", args.kinds]
  for name in ("min_steps", "epochs", "steps"):
    if getattr(args, name) is not None:
      argv += [f"--{name}", str(getattr(args, name))]
  out = subprocess.run(argv, cwd=REPO, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/sample_efficiency/digits.py")
  parser.add_argument("--kinds", default="sigmoid", help="comma-separated attention kinds")
  parser.add_argument("--min_steps", type=int, default=100, help="study.min_steps (None: the config's)")
  parser.add_argument("--epochs", type=float, default=6.0, help="budget in epochs (or use --steps)")
  parser.add_argument("--steps", type=int, default=None, help="fixed budget in steps instead")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--mode", choices=MODES)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.steps is not None:
    args.epochs = None
  if args.child:
    print(json.dumps(measure(args)))
    return

  times = {mode: [] for mode in MODES}
  compiles = {mode: [] for mode in MODES}
  results = {}
  for r in range(args.repeats):
    for mode in MODES if r % 2 == 0 else MODES[::-1]:
      results[mode] = _run_child(args, mode)
      times[mode].append(results[mode]["seconds"])
      compiles[mode].append(results[mode]["compile_seconds"])
  gap = lambda mode: max(abs(a - b) for a, b in zip(results["batched"]["test_loss"],
                                                     results[mode]["test_loss"]))
  import jax  # pylint: disable=import-outside-toplevel

  # On CPU, batched and sequential run the same one-cell program (cells one at a time):
  # their cells must agree to rounding. vmapped computes the cells' matmuls as batched
  # dots, whose rounding differs (as on accelerators, where every mode's algorithms may
  # differ), and training amplifies it over hundreds of steps (jax 0.12: up to a few
  # 1e-3 in test loss after 6 epochs): that difference is reported, not refused.
  if jax.default_backend() == "cpu" and gap("sequential") > 1e-4:
    raise SystemExit(f"batched and sequential cells disagree (test loss differs by "
                     f"{gap('sequential'):.2e}): they run the same program on CPU")

  median = {m: statistics.median(times[m]) for m in MODES}
  budget = f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs, >= {args.min_steps} steps"
  print(f"{results['batched']['cells']} cells, {results['batched']['cell_steps']} cell-steps "
        f"({args.config}, kinds {args.kinds}, {budget}), compile and selection included; "
        f"median of {args.repeats}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs")
  print(f"  {'mode':<12}{'seconds':>10}{'compile':>10}   runs")
  for mode in MODES:
    runs = " ".join(f"{t:.1f}" for t in times[mode])
    print(f"  {mode:<12}{median[mode]:>10.1f}{statistics.median(compiles[mode]):>10.1f}   {runs}")
  print(f"  sequential / batched = {median['sequential'] / median['batched']:.2f}x, "
        f"sequential / vmapped = {median['sequential'] / median['vmapped']:.2f}x  "
        f"(max |test loss| difference: sequential {gap('sequential'):.1e}, vmapped "
        f"{gap('vmapped'):.1e})")


if __name__ == "__main__":
  main()
