"""Inputs and the tolerance rule shared by the reference tests of the sparse and O(L) kinds.

The rule is tests/test_attention.py's (see the reasoning there): float32 errors scale with
the magnitude of the compared quantity (times `cond`, a kind's own conditioning); 16-bit
outputs add half an ulp relative, and one of the magnitude for quantities rounded to 16
bits on the way.
"""

import jax.numpy as jnp
import numpy as np

SHAPES = {
    # name: (B, Lq, Lk, H, Hkv, D, Dv)
    "gqa_odd": (2, 37, 53, 4, 2, 16, 8),
    "mha_square": (1, 16, 16, 2, 2, 8, 8),
    "mqa_long_q": (1, 21, 13, 3, 1, 8, 4),
}
F32_EPS = float(np.finfo(np.float32).eps)
F32_ROUNDING_UNITS = 128


def make_inputs(shape, seed=0, dtype=jnp.float32):
  b, lq, lk, h, hkv, d, dv = SHAPES[shape]
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), dtype)
               for s in ((b, lq, h, d), (b, lk, hkv, d), (b, lk, hkv, dv)))


def padding_mask(shape, seed=1):
  b, _, lk, *_ = SHAPES[shape]
  lengths = np.random.default_rng(seed).integers(lk // 2, lk, size=b)
  return jnp.asarray(np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]


def off_by_one_mask(shape):
  """Hides key max(Lk - Lq, 0), which every causal query from the first one on sees."""
  _, lq, lk, *_ = SHAPES[shape]
  return jnp.asarray(np.arange(lk) != max(lk - lq, 0))[None, None, None, :]


def tolerance(want, out_dtype=jnp.float32, magnitude=None, cond=1.0):
  magnitude = float(np.max(np.abs(want))) if magnitude is None else magnitude
  atol = F32_ROUNDING_UNITS * cond * F32_EPS * magnitude
  u = float(jnp.finfo(out_dtype).eps) / 2
  if jnp.finfo(out_dtype).bits < 32:
    atol += u * magnitude
  return dict(atol=atol, rtol=u)


def assert_close(got, want, out_dtype=jnp.float32, cond=1.0):
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             **tolerance(want, out_dtype, cond=cond))


def directional_fd(fn, args, directions, eps=1e-5):
  """Central difference of fn along `directions` (one per argument)."""
  plus = fn(*[a + eps * d for a, d in zip(args, directions)])
  minus = fn(*[a - eps * d for a, d in zip(args, directions)])
  return (plus - minus) / (2 * eps)
