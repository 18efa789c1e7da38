"""The sigmoid bias b of sigmoid(s + b): its default and the forms it may take.

One definition, below both the fused kernels (`attnlab.kernels`) and the attention
library (`attnlab.attention`), which both read it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def default_sigmoid_bias(kv_len: int) -> float:
  """b = -log(Lk), Apple's recommendation (arXiv 2409.04431).

  It keeps the output norm independent of the key length. The one definition of
  the default: every implementation, the fused kernels included, asks this.
  """
  return -math.log(max(kv_len, 1))


SIGMOID_BIAS_FORMS = ("a real number (Python int/float, a NumPy scalar, a 0-d array), an array "
                      "[H] (one bias per query head) or a rank-4 array broadcastable to "
                      "[B, H, 1, 1]; traced values are fine, so the bias can be learned")


def sigmoid_bias_logits(sigmoid_bias: Any, kv_len: int) -> Array | float:
  """The bias as an addend to float32 scores [B, H, Lq, K]: a scalar or [B|1, H|1, 1, 1]."""
  if sigmoid_bias is None:
    return default_sigmoid_bias(kv_len)
  # float32 like the scores; astype keeps the gradient to a learned bf16/float32 bias.
  b = jnp.asarray(sigmoid_bias).astype(jnp.float32)
  return b.reshape(1, -1, 1, 1) if b.ndim == 1 else b
