"""benchmarks/attention_cpu.py's rows: each named implementation runs the kind and impl its
name says (the table is only as honest as its labels). Tiny shapes; no timing."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import attention

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import attention_cpu  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


@pytest.mark.parametrize("rows", ["core", "mechanisms", "all"])
def test_rows_run_what_their_names_say(rows):
  impls = attention_cpu.implementations(block_k=8, rows=rows)
  names = list(impls)
  assert names[0] == "jax.nn.dpa (xla softmax)"
  mechanisms = [f"{kind} {impl}" for kind, impl in attention_cpu.MECHANISM_ROWS]
  assert (set(mechanisms) <= set(names)) == (rows != "core")
  assert ("softmax chunked" in names) == (rows != "mechanisms")
  q, k, v = (jax.random.normal(key, (1, 20, 2, 8)) for key in jax.random.split(
      jax.random.key(0), 3))
  for name, fn in impls.items():
    if name.startswith("jax.nn.dpa"):
      continue
    kind, impl = name.split()[:2]
    assert impl in attention.api.kind_impls(kind), name
    want = attention.attend(q, k, v, kind=kind, impl=impl, is_causal=name.endswith("causal"),
                            **({"block_k": 8} if impl == "chunked" else {}))
    np.testing.assert_array_equal(fn(q, k, v), want, err_msg=name)
  # Every registered kind has a row but the elementwise ones, which run sigmoid's tiled path
  # (sigmoid's rows stand for them).
  covered = {name.split()[0] for name in attention_cpu.implementations(8, "all")}
  assert set(attention.KINDS) - covered == {"gaussian", "local", "polynomial", "relu",
                                            "softplus"}
