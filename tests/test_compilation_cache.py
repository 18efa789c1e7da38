"""The suite's shared compilation cache (tests/conftest.py) changes speed, never results or output.

Every subprocess a test starts inherits the cache; the cache is unlocked, so a process can
read an entry another is still writing. These tests build that case on purpose.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("ATTNLAB_TEST_COMPILATION_CACHE") == "0",
                                reason="ATTNLAB_TEST_COMPILATION_CACHE=0 turns the cache off")

_PROGRAM = """
import jax, jax.numpy as jnp
x = jnp.arange(12.0).reshape(3, 4)
print(float(jax.jit(lambda a: jnp.tanh(a @ a.T).sum() * {scale})(x)))
"""


def _run(cache_dir=None, scale=3.0, **env):
  if cache_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  return subprocess.run([sys.executable, "-c", _PROGRAM.format(scale=scale)], capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, **env), check=False)


def _entries(cache_dir):
  return [p for p in pathlib.Path(cache_dir).iterdir() if p.is_file()]


def test_a_command_a_test_starts_writes_into_the_runs_cache():
  shared = os.environ["ATTNLAB_TEST_COMPILATION_CACHE"]
  before = set(_entries(shared))
  # A constant no other test compiles, so the program is new to the cache; tiny, so this
  # also checks that even the fastest compiles are kept.
  proc = _run(scale=os.getpid() + 0.5)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert set(_entries(shared)) - before, "the command compiled without writing to the cache"


def test_a_torn_cache_entry_costs_a_compile_not_a_wrong_value_or_a_line_on_stderr(tmp_path):
  fresh = _run(tmp_path)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  written = _entries(tmp_path)
  assert written, "the program was not cached"
  for entry in written:  # what a reader sees while another process is half-way through a write
    entry.write_bytes(entry.read_bytes()[: max(1, entry.stat().st_size // 2)])

  torn = _run(tmp_path)
  assert torn.returncode == 0, torn.stderr[-3000:]
  assert torn.stdout == fresh.stdout
  assert "persistent compilation cache" not in torn.stderr, torn.stderr[-3000:]

  # The filter is what keeps stderr clean: without it jax does warn.
  unfiltered = _run(tmp_path, PYTHONWARNINGS="default")
  assert unfiltered.stdout == fresh.stdout
  assert "Error reading persistent compilation cache entry" in unfiltered.stderr
