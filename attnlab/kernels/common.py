"""Shapes, validation, padding and tile maths shared by the GPU and TPU flash kernels.

Both backends run the same algorithm on the same tiling, so everything that is
not backend-specific lives here: the static `KernelConfig`, block-size defaults
and checks, padding to whole blocks, the causal block ranges, the per-tile
mask, activations and dS, and the backward's softmax delta and GQA group sum. The
tile helpers use only `jnp`/`lax` ops that lower in Triton, Mosaic TPU and
interpret mode alike.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.sigmoid_bias import SIGMOID_BIAS_FORMS, sigmoid_bias_logits
from attnlab.kernels import capabilities
from attnlab.kernels.capabilities import KINDS  # stated once there
# "gpu": Triton (any CUDA GPU); "tpu": Mosaic TPU; "mgpu": Mosaic GPU (Hopper, 16-bit inputs).
BACKENDS = ("gpu", "tpu", "mgpu")
SUPPORTED_DTYPES = tuple(jnp.dtype(name) for name in capabilities.DTYPES)

# Masked logits for the online softmax. Finite (unlike -inf) so that
# `exp(m_prev - m_next)` never evaluates `-inf - -inf`; masked entries are also
# zeroed explicitly, so fully masked rows end with l = 0 and output 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one flash-attention call (hashable: a jit / custom_vjp key).

  Lengths are the real, unpadded ones; the arrays the kernels see are padded to
  whole blocks (`q_len_padded`, `kv_len_padded`).
  """
  kind: str
  backend: str
  interpret: bool
  scale: float
  # The sigmoid bias is data (a [B, H] float32 kernel input), not part of the config:
  # a traced or learned bias needs no recompilation. `bias_grad`: the dQ kernel also
  # writes the row sums of dS, from which d bias is summed (sigmoid with a bias that
  # may be differentiated; False skips that work for a constant bias).
  bias_grad: bool
  is_causal: bool
  q_len: int
  kv_len: int
  q_len_padded: int
  kv_len_padded: int
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_heads: int
  num_kv_heads: int
  fast_tanh: bool  # GPU only: tanh.approx for 16-bit inputs, exact tanh otherwise
  num_warps: int | None = None  # GPU only; None = 4 for head_dim <= 64, else 8
  num_stages: int | None = None  # GPU only; None = 2

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def causal_offset(self) -> int:
    """Query i sees keys j <= i + offset (bottom-right aligned, as attnlab.attention.attend)."""
    return self.kv_len - self.q_len

  @property
  def kv_padded(self) -> bool:
    return self.kv_len_padded != self.kv_len


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Everything static about one split-key decode call (`attnlab.kernels.decode_attention`).

  The queries of one kv head's GQA group are the rows of one tile: row r is query
  r % q_len of query head r // q_len of the group; `rows_padded` >= group * q_len.
  Keys are cut into `num_splits` ranges of the *valid* keys (computed in the kernel from the
  traced offset), each a whole number of `block_k` tiles.
  """
  kind: str
  backend: str
  interpret: bool
  scale: float
  q_len: int
  kv_len: int
  kv_len_padded: int
  group: int
  rows_padded: int
  block_k: int
  num_splits: int
  fast_tanh: bool  # GPU only: tanh.approx for 16-bit inputs, exact tanh otherwise
  num_warps: int | None = None  # GPU only
  num_stages: int | None = None  # GPU only

  @property
  def num_tiles(self) -> int:
    return self.kv_len_padded // self.block_k


def decode_split_range(offset: Any, split: Any, cfg: DecodeConfig) -> tuple[Any, Any, Any]:
  """(start, unmasked_end, end) key tiles of split `split` for queries from position `offset`.

  The valid keys are [0, min(offset + q_len, kv_len)) (query i sees keys j <= offset + i,
  and no padded key); their tiles are shared out evenly, so every split has work however
  full the cache is. Tiles [start, unmasked_end) are visible to every query (no mask),
  [unmasked_end, end) need the mask. int32 scalars (traced), all divisions on
  non-negative numbers.
  """
  bk = cfg.block_k
  length = jnp.clip(offset + cfg.q_len, 0, cfg.kv_len)
  n_valid = lax.div(length + bk - 1, bk)
  per_split = lax.div(n_valid + cfg.num_splits - 1, cfg.num_splits)
  start = jnp.minimum(split * per_split, n_valid)
  end = jnp.minimum(start + per_split, n_valid)
  # Key j is visible to every query iff j <= offset (query 0) and j < kv_len.
  n_full = jnp.minimum(lax.div(jnp.maximum(offset + 1, 0), bk), cfg.kv_len // bk)
  return start, jnp.clip(n_full, start, end), end


def decode_tile_mask(offset: Any, k_start: Any, shape: tuple[int, int],
                     cfg: DecodeConfig) -> jax.Array:
  """bool [rows, K]: row r (query r % q_len) sees key j iff j <= offset + r % q_len, j < Lk."""
  q_pos = offset + lax.rem(lax.broadcasted_iota(jnp.int32, shape, 0), jnp.int32(cfg.q_len))
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  return jnp.logical_and(k_pos <= q_pos, k_pos < cfg.kv_len)


# --------------------------------------------------------------------------- validation
def on_gpu() -> bool:
  return jax.default_backend() in capabilities.GPU_PLATFORMS


def resolve_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
  """Picks the kernel family and whether to interpret it on this platform.

  On CPU the default is the GPU-style kernel in interpret mode (the faster
  interpreter); asking for a native GPU/TPU kernel on CPU is an error that names the fix.
  """
  platform = jax.default_backend()
  gpu = on_gpu()
  automatic = backend is None
  if automatic:
    backend = "tpu" if platform == "tpu" else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None (= this platform); got {backend!r}.")
  native = (backend in ("gpu", "mgpu") and gpu) or (backend == "tpu" and platform == "tpu")
  if interpret is None:
    # Only the automatic choice falls back to interpret mode: an explicit backend is
    # a request for the native kernel, and silently interpreting it would hide that.
    interpret = automatic and not native
  if not interpret and not native:
    raise ValueError(
        f"backend={backend!r} cannot run natively on platform {platform!r}; pass interpret=True "
        f"to run the {backend.upper()} kernel in Pallas interpret mode (slow, for testing).")
  return backend, bool(interpret)


def check_inputs(q: Any, k: Any, v: Any, q_segment_ids: Any, kv_segment_ids: Any,
                 kind: str) -> tuple[int, int, int, int, int, int, int]:
  """Validates shapes/dtypes; returns (B, Lq, Lk, H, Hkv, D, Dv)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS} for the flash kernels; got {kind!r}. Other "
                     "kinds run through attnlab.attention.attend(impl='xla' or 'chunked').")
  for name, x, layout in (("q", q, "[B, Lq, H, D]"), ("k", k, "[B, Lk, Hkv, D]"),
                          ("v", v, "[B, Lk, Hkv, Dv]")):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must have rank 4 with layout {layout}; got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
    if x.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"{name} has unsupported dtype {x.dtype}; the flash kernels take "
                       "float32, bfloat16 or float16 (accumulation is always float32).")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  b, lq, h, d = q.shape
  _, lk, hkv, _ = k.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k must be [B, Lk, Hkv, D] with q's B and D; got q {q.shape}, k {k.shape}.")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must match k in B, Lk and Hkv; got k {k.shape}, v {v.shape}.")
  if h % hkv:
    raise ValueError(f"num_heads of q ({h}) must be a multiple of num_kv_heads of k ({hkv}).")
  if lq == 0 or lk == 0:
    raise ValueError(f"sequence lengths must be positive; got Lq={lq}, Lk={lk}.")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("pass both q_segment_ids and kv_segment_ids or neither; got only "
                     f"{'q' if kv_segment_ids is None else 'kv'}_segment_ids.")
  if q_segment_ids is not None:
    for name, ids, length in (("q_segment_ids", q_segment_ids, lq),
                              ("kv_segment_ids", kv_segment_ids, lk)):
      if getattr(ids, "shape", None) != (b, length):
        raise ValueError(f"{name} must have shape [B, L] = {(b, length)}; got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}.")
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array; got dtype {ids.dtype}.")
  return b, lq, lk, h, hkv, d, v.shape[3]


def check_scalar(name: str, value: Any) -> float | None:
  """`scale` becomes part of the static kernel config, so it must be a concrete number."""
  if value is None:
    return None
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(f"{name} must be a concrete Python number (it is compiled into the kernel); "
                     f"got {type(value).__name__}: {value!r}.") from e


def bias_per_head(sigmoid_bias: Any, kv_len: int, batch: int, num_heads: int) -> jax.Array:
  """The sigmoid bias as the kernels read it: float32 [B, H], one scalar per (batch, head).

  Accepts what `attend` accepts (`attnlab.sigmoid_bias.SIGMOID_BIAS_FORMS`): None
  (= `default_sigmoid_bias(Lk)`), a real scalar or 0-d array, [H] (or [1]), or rank 4
  broadcastable to [B, H, 1, 1]; concrete or traced. The broadcast and the float32 cast
  happen here, outside the custom_vjp, so autodiff sums d bias back to the shape and
  dtype the caller passed.
  """
  if sigmoid_bias is not None:
    try:
      dtype, shape = jnp.result_type(sigmoid_bias), tuple(jnp.shape(sigmoid_bias))
    except TypeError as e:
      raise ValueError(f"sigmoid_bias must be None (= -log(Lk)) or {SIGMOID_BIAS_FORMS}; got "
                       f"{type(sigmoid_bias).__name__}: {sigmoid_bias!r}.") from e
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise ValueError(f"sigmoid_bias must be real-valued ({SIGMOID_BIAS_FORMS}); got dtype "
                       f"{dtype}.")
    per_head = len(shape) == 1 and shape[0] in (1, num_heads)
    rank4 = (len(shape) == 4 and shape[0] in (1, batch) and shape[1] in (1, num_heads)
             and shape[2:] == (1, 1))
    if shape and not (per_head or rank4):
      raise ValueError(f"sigmoid_bias has shape {shape}; for q with batch {batch} and "
                       f"{num_heads} heads pass a scalar, [{num_heads}] (one bias per query "
                       f"head) or an array broadcastable to [{batch}, {num_heads}, 1, 1].")
  b = jnp.asarray(sigmoid_bias_logits(sigmoid_bias, kv_len), jnp.float32)
  return jnp.broadcast_to(b.reshape(b.shape[:2]) if b.ndim == 4 else b, (batch, num_heads))


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def check_block(name: str, block: int, backend: str, multiple: int) -> None:
  """Raises a ValueError unless `block` is a valid tile length for `backend`."""
  if not isinstance(block, int) or isinstance(block, bool):
    raise ValueError(f"{name} must be an int; got {type(block).__name__}.")
  if backend == "gpu" and not (_is_power_of_two(block) and block >= 16):
    raise ValueError(f"{name}={block} is invalid for the GPU (Triton) kernel: tiles must be a "
                     "power of two >= 16 (e.g. 32, 64, 128).")
  if backend == "tpu" and (block <= 0 or block % multiple):
    raise ValueError(f"{name}={block} is invalid for the TPU (Mosaic) kernel: it must be a "
                     f"positive multiple of {multiple} (the (8, 128) vreg tiling).")


def length_multiples(block_q: int, block_k: int, block_q_bwd: int, block_k_bwd: int
                     ) -> tuple[int, int]:
  """(query, key) lengths are padded to multiples of these: whole forward and backward tiles."""
  return math.lcm(block_q, block_q_bwd), math.lcm(block_k, block_k_bwd)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def next_power_of_two(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------ padding
def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of `x` up to `size` (a no-op, without a copy, when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


# ------------------------------------------------------------------- causal block ranges
# Causal: row r may see key c iff c <= r + offset. These return traced int32 scalars
# so they work on program ids; all divisions act on non-negative numbers.
def kv_blocks_end(q_block: Any, cfg: KernelConfig, block_q: int, block_k: int) -> Any:
  """One past the last key block that any row of `q_block` can see."""
  n_k = cfg.kv_len_padded // block_k
  if not cfg.is_causal:
    return jnp.int32(n_k)
  last_key = (q_block + 1) * block_q - 1 + cfg.causal_offset  # may be < 0: block sees nothing
  end = lax.div(jnp.maximum(last_key + 1, 0) + block_k - 1, block_k)
  return jnp.minimum(end, n_k)


def kv_blocks_unmasked_end(q_block: Any, cfg: KernelConfig, block_q: int, block_k: int,
                           has_segments: bool) -> Any:
  """Key blocks [0, this) need no mask at all for any row of `q_block`."""
  if has_segments:
    return jnp.int32(0)
  n_full = jnp.int32(cfg.kv_len // block_k)  # a partly padded last block needs the mask
  if cfg.is_causal:
    first_row = q_block * block_q + cfg.causal_offset  # keys <= this are visible to every row
    n_full = jnp.minimum(n_full, lax.div(jnp.maximum(first_row + 1, 0), block_k))
  return jnp.minimum(n_full, kv_blocks_end(q_block, cfg, block_q, block_k))


def q_blocks_start(kv_block: Any, cfg: KernelConfig, block_q: int, block_k: int) -> Any:
  """First query block with a row that can see some key of `kv_block`."""
  if not cfg.is_causal:
    return jnp.int32(0)
  first_row = kv_block * block_k - cfg.causal_offset  # first row that sees the block's first key
  start = lax.div(jnp.maximum(first_row, 0), block_q)
  return jnp.minimum(start, cfg.q_len_padded // block_q)


def q_blocks_unmasked_start(kv_block: Any, cfg: KernelConfig, block_q: int, block_k: int,
                            has_segments: bool) -> Any:
  """Query blocks [this, n_q) see every key of `kv_block` (no mask needed)."""
  n_q = cfg.q_len_padded // block_q
  if has_segments:
    return jnp.int32(n_q)
  start = q_blocks_start(kv_block, cfg, block_q, block_k)
  if cfg.is_causal:
    first_row = (kv_block + 1) * block_k - 1 - cfg.causal_offset  # sees the block's last key
    start = jnp.maximum(start, lax.div(jnp.maximum(first_row, 0) + block_q - 1, block_q))
  start = jnp.minimum(start, n_q)
  if cfg.kv_padded:  # the last, partly padded key block is masked for every query block
    start = jnp.where((kv_block + 1) * block_k > cfg.kv_len, n_q, start)
  return start


# --------------------------------------------------------------------------- tile maths
def tile_mask(q_start: Any, k_start: Any, shape: tuple[int, int], cfg: KernelConfig,
              q_seg_Q1: jax.Array | None, kv_seg_1K: jax.Array | None,
              iota: Callable[..., jax.Array] = lax.broadcasted_iota) -> jax.Array | None:
  """bool [Q, K]: which (query, key) pairs of this tile may attend; None if all may.

  `iota(dtype, shape, dim)` builds the positions (Mosaic GPU passes one with a register layout).
  """
  mask = None

  def both(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if cfg.kv_padded or cfg.is_causal:
    k_pos = k_start + iota(jnp.int32, shape, 1)
    if cfg.kv_padded:
      mask = k_pos < cfg.kv_len
    if cfg.is_causal:
      q_pos = q_start + iota(jnp.int32, shape, 0)
      mask = both(mask, k_pos <= q_pos + cfg.causal_offset)
  if q_seg_Q1 is not None:
    mask = both(mask, q_seg_Q1 == kv_seg_1K)
  return mask


def needs_mask(cfg: KernelConfig, has_segments: bool) -> bool:
  """Whether any tile can need a mask; if not, every kernel runs only its unmasked path."""
  return cfg.is_causal or cfg.kv_padded or has_segments


def sigmoid_probs(s: jax.Array, half_bias: Any, cfg: KernelConfig,
                  tanh: Callable[[jax.Array], jax.Array] = jnp.tanh) -> jax.Array:
  """sigmoid(scale * s + b) through tanh: 0.5 * (1 + tanh(x / 2)) (one MUFU op on GPU).

  `half_bias` is b / 2 as read from the bias input (a scalar, or [1, 1] on TPU), so
  x / 2 is still one fused multiply-add per element.
  """
  return 0.5 + 0.5 * tanh(s * (0.5 * cfg.scale) + half_bias)


def score_grad(p_QK: jax.Array, dp_QK: jax.Array, delta_Q1: jax.Array | None,
               cfg: KernelConfig) -> jax.Array:
  """dS of one tile (the gradient w.r.t. the scaled logits) from P and dP = dO V^T.

  Sigmoid: dS = dP * P * (1 - P). Softmax: dS = P * (dP - delta), delta = rowsum(dO * O)
  (`softmax_delta`). Masked entries stay exactly 0 because P is 0 there.
  """
  if cfg.kind == "sigmoid":
    return dp_QK * p_QK * (1.0 - p_QK)
  return p_QK * (dp_QK - delta_Q1)


def dot_precision(dtype: Any) -> Any:
  """float32 inputs get full-precision MXU/tensor-core passes (Triton defaults to TF32)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ------------------------------------------------------------------- backward, outside
def softmax_delta(out_BQHD: jax.Array, do_BQHD: jax.Array) -> jax.Array:
  """delta = rowsum(dO * O), [B, H, Lq] float32: the softmax backward's per-row term.

  Computed by XLA before the kernels (one fused elementwise pass), not per tile.
  """
  return jnp.einsum("bqhd,bqhd->bhq", do_BQHD.astype(jnp.float32), out_BQHD.astype(jnp.float32))


def sum_kv_groups(x_BLHD: jax.Array, num_kv_heads: int, dtype: Any) -> jax.Array:
  """Sums per-query-head dK or dV [B, L, H, D] over each GQA group -> [B, L, Hkv, D] in `dtype`.

  The kernels write one dK/dV per query head (as FlashAttention-2 does) in float32, so
  this sum does not round `group` times.
  """
  b, length, h, d = x_BLHD.shape
  return x_BLHD.reshape(b, length, num_kv_heads, h // num_kv_heads, d).sum(axis=3).astype(dtype)
