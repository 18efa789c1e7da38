"""The one product every jnp attention path uses: an einsum that accumulates in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def einsum_f32(spec: str, a: Array, b: Array, *,
               contracts_leading_axes: bool = False) -> Array:
  """`jnp.einsum(spec, a, b)` with float32 accumulation and a float32 result.

  16-bit operands multiply as they are (bf16 x bf16 -> f32), with one exception on CPU.
  `contracts_leading_axes` marks the backward's w^T dO-shaped products (dk, dv), which sum
  over both operands' row axis. XLA CPU may hand them to its generic dot instead of its
  matmul library, depending on shapes and layout, and that dot has no bf16 x bf16 -> f32:
  it fails at run time ("Unsupported element type for DotThunk::Execute", seen at
  B=4 H=2 L=64 D=64, jax 0.12). On CPU those products therefore take float32 upcasts.
  The upcast is exact, so the values are the same; it costs a [Lq, Lk] float32 operand,
  which XLA fuses into the producer of dS or w. Measured on CPU, bf16 fwd+bwd at B=1 H=2
  D=64 L=512-2048 (a shape where the 16-bit products happen to run; loaded machine): this
  upcast costs 1.13-1.37x time and 1.09-1.16x temporary memory, upcasting every product
  1.39-1.69x and 1.12-1.30x (`python benchmarks/bf16_cpu_upcast.py`, benchmarks/results/).
  Without it, 28 of 100 random bf16 shapes failed; with it, 0 of 240.
  """
  if upcasts_16bit(contracts_leading_axes):
    a, b = _upcast_16bit(a), _upcast_16bit(b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def upcasts_16bit(contracts_leading_axes: bool) -> bool:
  """The rule above, read at trace time (benchmarks/bf16_cpu_upcast.py swaps it to compare)."""
  return contracts_leading_axes and jax.default_backend() == "cpu"


def _upcast_16bit(x: Array) -> Array:
  return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x
