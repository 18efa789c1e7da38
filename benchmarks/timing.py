"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def call_seconds(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
  """Wall seconds of one call of fn(*args), until its results are ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def run_times(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of fn(*args), after one warm-up call that compiles."""
  jax.block_until_ready(fn(*args))
  return [call_seconds(fn, args) for _ in range(repeats)]


def median_ms(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
  """Median wall time in milliseconds (medians: shared CPUs are noisy)."""
  return 1e3 * statistics.median(run_times(fn, args, repeats))


def compile_once(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, float]:
  """fn jitted and compiled for args, and its temporary memory (MiB) from XLA's analysis.

  One compilation serves both the timing and the memory figure.
  """
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  return compiled, (float("nan") if mem is None else mem.temp_size_in_bytes / 2**20)
