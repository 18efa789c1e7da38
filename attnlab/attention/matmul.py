"""The one product every jnp attention path uses: an einsum that accumulates in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def einsum_f32(spec: str, a: Array, b: Array) -> Array:
  """`jnp.einsum(spec, a, b)` with float32 accumulation and a float32 result.

  16-bit operands multiply as they are on accelerators (native bf16 x bf16 -> f32). On
  CPU they enter as float32 upcasts instead: when XLA CPU cannot hand a product to its
  matmul library (e.g. a transposed operand, which depends on shapes and layout) it falls
  back to a dot that has no bf16 x bf16 -> f32 and fails at run time ("Unsupported element
  type for DotThunk"). The upcast is exact, so the products and float32 sums are the same.
  """
  if jax.default_backend() == "cpu":
    a, b = _upcast_16bit(a), _upcast_16bit(b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _upcast_16bit(x: Array) -> Array:
  return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x
