"""Test-wide settings: CPU, no silent rank promotion (a classic source of wrong broadcasts), and
one on-disk compilation cache shared by the run's workers and the processes they start."""

import gc
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the platform is pinned)

jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_xla_compile():
  """Skips XLA's optimisation passes for a module that checks values, not speed.

  Halves compile time of the model tests. Opt in per module with
  `pytestmark = pytest.mark.usefixtures("fast_xla_compile")`; restored afterwards
  so memory-analysis tests elsewhere in the same worker see the optimised programs.
  """
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_module():
  """Drops every compiled XLA program when a test module ends.

  Each CPU executable keeps its own memory mappings until its cache entry dies, and one
  pytest-xdist worker runs half the suite: near the end it passed the kernel's
  `vm.max_map_count` (65,530 by default), and the next compile failed with "LLVM compilation
  error: Cannot allocate memory" / "Failed to materialize symbols" (CI, 2026-12-06;
  reproduced by lowering the limit to 6,000 under tests/test_train.py). The few programs a
  later module shares are compiled again, which costs seconds.
  """
  yield
  jax.clear_caches()
  gc.collect()


# One directory per test run, made by the first process that configures (the xdist controller,
# or pytest alone) and inherited by its workers and every subprocess they start (train.py,
# notebooks' kernels, multi-process runs) through the environment. Set it to a path to keep
# the cache between runs, or to "0" to compile everything afresh.
_CACHE_ENV = "ATTNLAB_TEST_COMPILATION_CACHE"
_OWNED_CACHE = pytest.StashKey[str]()
# Warning filters for jax's words when an entry it looks up is still being written by another
# process, as pytest's `filterwarnings` and Python's PYTHONWARNINGS both spell them.
_IGNORE_TORN_CACHE_ENTRIES = tuple(
    f"ignore:{message}:UserWarning" for message in (
        "Error reading persistent compilation cache entry",
        "Error writing persistent compilation cache entry"))


def pytest_configure(config):
  """Turns on JAX's persistent compilation cache for the whole run.

  Most of the suite's CPU time is XLA compiling the same small programs again: in each
  subprocess a test starts, in each xdist worker, and in each module after
  `_free_compiled_programs_after_each_module`. A program's cache key is its HLO plus the
  compile options (XLA flags included, so `fast_xla_compile`'s programs are kept apart) and
  the jax version, so a hit is the executable a fresh compile would give.

  The cache is unbounded: with a size limit jax locks the directory and scans every entry
  on each write, which made the suite slower than no cache at all. Unlocked, a process can
  look up an entry while another is still writing it; jax then fails to decompress it,
  warns and compiles afresh. That warning is silenced, in the tests and in the commands
  they start, so that tests reading a command's stderr line by line never see it.
  """
  path = os.environ.get(_CACHE_ENV)
  if path == "0":
    return
  if not path:
    path = tempfile.mkdtemp(prefix="attnlab-test-jax-cache-")
    os.environ[_CACHE_ENV] = path
    config.stash[_OWNED_CACHE] = path
  settings = {"jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)  # for the subprocesses
    jax.config.update(name, value)
  for ignore in _IGNORE_TORN_CACHE_ENTRIES:
    config.addinivalue_line("filterwarnings", ignore)


@pytest.fixture(autouse=True, scope="session")
def _silence_torn_cache_reads_in_subprocesses():
  """Passes `_IGNORE_TORN_CACHE_ENTRIES` to the commands tests start.

  Set here, in the process that runs the tests, not in `pytest_configure`: xdist workers
  would inherit it from the controller at start-up, and pytest shows DeprecationWarnings
  only when the interpreter started without warning options.
  """
  if os.environ.get(_CACHE_ENV) == "0":
    yield
    return
  before = os.environ.get("PYTHONWARNINGS")
  os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (before, *_IGNORE_TORN_CACHE_ENTRIES)))
  yield
  if before is None:
    del os.environ["PYTHONWARNINGS"]
  else:
    os.environ["PYTHONWARNINGS"] = before


def pytest_unconfigure(config):
  path = config.stash.get(_OWNED_CACHE, None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
