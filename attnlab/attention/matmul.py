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
  D=64 L=1024-2048 (a shape where the 16-bit products happen to run): this upcast costs
  1.1-1.3x time and 1.15x temporary memory; upcasting every product cost 1.5-1.75x.
  Without it, 28 of 100 random bf16 shapes failed; with it, 0 of 240.
  """
  if contracts_leading_axes and jax.default_backend() == "cpu":
    a, b = _upcast_16bit(a), _upcast_16bit(b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _upcast_16bit(x: Array) -> Array:
  return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x
