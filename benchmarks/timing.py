"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def run_times(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of fn(*args), after one warm-up call that compiles."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def median_ms(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
  """Median wall time in milliseconds (medians: shared CPUs are noisy)."""
  return 1e3 * statistics.median(run_times(fn, args, repeats))
