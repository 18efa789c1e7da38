"""Token Transformer on the shared attnlab encoder: a causal LM or a bidirectional classifier.

The same module is a decoder-only language model (``causal=True``, per-token
logits over the vocabulary) or a sequence classifier (``num_classes`` set:
pooled hidden state -> classes; usually with ``causal=False``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import attention
from attnlab.models import layers
from attnlab.models.config import Array, BackboneConfig, check_rank, config_error
from attnlab.models.encoder import Encoder
from attnlab.models.params import named_param, with_logical_axes

POSITIONS = ("rope", "alibi", "learned", "none")
POOLS = ("mean", "first", "last")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(BackboneConfig):
  """A token Transformer; the attention fields are those of `BackboneConfig`.

  Attributes:
    vocab_size: number of token ids.
    max_len: longest sequence; needed for positions="learned" (table size) and
      for learn_sigmoid_bias (the bias starts at -log(max_len)), otherwise only
      checked when set.
    positions: "rope" (rotary, on q and k) | "alibi" (linear distance bias
      added in full to the logits, Press et al. 2021) | "learned" | "none".
    causal: query i sees keys j <= i (language model); False = bidirectional.
    tie_embeddings: the LM head reuses the token embedding (no head params).
    num_classes: None = language model (logits [B, L, vocab]); an int = a
      sequence classifier (logits [B, num_classes]) reading the `pool`ed state.
    pool: "mean" (over real tokens) | "first" | "last" (last real token; the
      natural choice with causal=True).
    rope_base: RoPE wavelength base.
    head_zero_init: start the classifier head (num_classes set) at zero, so the
      initial loss is exactly log(num_classes) (as the ViT).
  """
  vocab_size: int
  max_len: int | None = None
  positions: str = "rope"
  causal: bool = True
  tie_embeddings: bool = True
  num_classes: int | None = None
  pool: str = "mean"
  rope_base: float = 10_000.0
  head_zero_init: bool = True

  def _check_model_fields(self, owner: str) -> None:
    if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
      raise config_error(owner, "vocab_size", self.vocab_size, "expected a positive int.")
    if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
      raise config_error(owner, "max_len", self.max_len, "expected a positive int or None.")
    if self.positions not in POSITIONS:
      raise config_error(owner, "positions", self.positions, f"expected one of {list(POSITIONS)}.")
    if self.positions == "learned" and self.max_len is None:
      raise config_error(owner, "max_len", None, "positions='learned' needs max_len (the size "
                         "of the position table).")
    if self.learn_sigmoid_bias and self.max_len is None:
      raise config_error(owner, "max_len", None, "learn_sigmoid_bias=True starts the bias at "
                         "-log(max_len), the length the model trains at; set max_len.")
    if self.positions == "rope" and self.head_dim % 2:
      raise config_error(owner, "positions", "rope", f"RoPE rotates channel pairs, so head_dim "
                         f"(width // num_heads = {self.head_dim}) must be even.")
    if self.positions == "alibi":
      self._check_alibi(owner)
    if self.causal and not attention.KINDS[self.attention].supports_causal:
      raise config_error(owner, "attention", self.attention,
                         "this kind is not causal (every output mixes the whole sequence); "
                         "use it with causal=False (a classifier) or pick a causal kind.")
    if self.num_classes is not None and (not isinstance(self.num_classes, int)
                                         or self.num_classes < 1):
      raise config_error(owner, "num_classes", self.num_classes,
                         "expected None (language model) or a positive int (classifier).")
    if self.pool not in POOLS:
      raise config_error(owner, "pool", self.pool, f"expected one of {list(POOLS)}.")

  @property
  def sequence_length(self) -> int | None:
    """max_len: the length the model is built (and trained) for."""
    return self.max_len

  def _check_alibi(self, owner: str) -> None:
    if not attention.KINDS[self.attention].takes_bias:
      raise config_error(owner, "positions", "alibi",
                         f"attention={self.attention!r} takes no additive logits bias, so ALiBi "
                         "cannot be applied; use positions='rope' / 'learned' / 'none' or a kind "
                         "with pairwise scores.")
    if self.attention_impl == "pallas":
      raise config_error(owner, "positions", "alibi",
                         "attention_impl='pallas' takes no bias arrays; use attention_impl='xla'"
                         " or 'chunked' with ALiBi, or positions='rope'.")


def alibi_slopes(num_heads: int) -> Array:
  """Per-head ALiBi slopes: the geometric sequence 2^(-8/n), ... of Press et al. 2021.

  For a head count that is not a power of two, the slopes of the next lower
  power of two are followed by every other slope of the next higher one (the
  paper's reference code).
  """
  def geometric(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  lower = 2 ** math.floor(math.log2(num_heads))
  slopes = geometric(lower)
  if lower < num_heads:
    slopes += geometric(2 * lower)[0::2][: num_heads - lower]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, length: int) -> Array:
  """Additive logits bias [1, H, L, L] = -slope_h * |i - j| (full, not just relative shifts).

  Sigmoid attention is not invariant to adding a constant to a row, so the
  bias must be the paper's exact values, not a row-shifted equivalent.
  """
  return alibi_bias_at(num_heads, jnp.arange(length), jnp.arange(length))


def alibi_bias_at(num_heads: int, q_pos_Q: Array, k_pos_K: Array) -> Array:
  """`alibi_bias` for queries and keys at the given positions: [1, H, Lq, Lk] (decoding:
  the new tokens' positions against every cache slot)."""
  distance_QK = jnp.abs(q_pos_Q[:, None] - k_pos_K[None, :]).astype(jnp.float32)
  return -(alibi_slopes(num_heads)[:, None, None] * distance_QK[None])[None]


class Transformer(nnx.Module):
  """Language model or sequence classifier over token ids.

  `Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=1))(tokens_BL)` returns
  logits [B, L, vocab_size] (LM) or [B, num_classes] (classifier).

  Parameters: token_embed.embedding (vocab, embed); pos_embedding (length,
  embed) when positions="learned"; encoder (see `attnlab.models.encoder.Encoder`); lm_head
  (embed, vocab) when not tied; classifier (embed, classes) + bias when
  num_classes is set.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, TransformerConfig):
      raise TypeError(f"cfg must be a TransformerConfig; got {type(cfg).__name__}.")
    self.cfg = cfg
    e = cfg.width
    # std 1/sqrt(width): unit-variance logits through the tied head at init (as nanodo).
    embed_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    self.token_embed = nnx.Embed(cfg.vocab_size, e, dtype=cfg.compute_dtype,
                                 param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                                 embedding_init=with_logical_axes(embed_init, ("vocab", "embed")))
    if cfg.positions == "learned":
      self.pos_embedding = named_param(jax.nn.initializers.normal(stddev=e ** -0.5),
                                       (cfg.max_len, e), ("length", "embed"), cfg, rngs)
    self.dropout = layers.dropout(cfg.dropout_rate, rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    if cfg.num_classes is not None:
      self.classifier = layers.dense("BE,EC->BC", (e, cfg.num_classes), ("embed", "classes"),
                                     bias_axes=("classes",), cfg=cfg, rngs=rngs,
                                     kernel_init=jax.nn.initializers.zeros
                                     if cfg.head_zero_init else None)
    elif not cfg.tie_embeddings:
      self.lm_head = layers.dense("BLE,EV->BLV", (e, cfg.vocab_size), ("embed", "vocab"),
                                  bias_axes=None, cfg=cfg, rngs=rngs,
                                  kernel_init=jax.nn.initializers.lecun_normal())

  def __call__(self, tokens_BL: Array, *, padding_mask_BL: Array | None = None,
               deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
               return_attention_weights: bool = False
               ) -> Array | tuple[Array, tuple[Array, ...]]:
    """Logits for a batch of token sequences.

    Args:
      tokens_BL: int token ids [B, L].
      padding_mask_BL: bool [B, L], True for real tokens (None: all real).
        Padding keys get no attention weight and are left out of the pooling.
      deterministic: True disables dropout; None uses the modules' setting
        (`model.eval()` / `model.train()`; dropout is on after construction).
      rngs: the "dropout" stream for this call, e.g. `nnx.Rngs(dropout=step_key)`
        inside a pure train step; None draws from the streams the model was
        built with.
      return_attention_weights: also return each layer's weights [B, H, L, L].

    Returns:
      logits (float32) [B, L, vocab_size], or [B, num_classes] for a
      classifier; or (logits, weights per layer).
    """
    x_BLE = self.embed(tokens_BL, deterministic=deterministic, rngs=rngs)
    return self.apply_embedded(x_BLE, padding_mask_BL=padding_mask_BL,
                               deterministic=deterministic, rngs=rngs,
                               return_attention_weights=return_attention_weights)

  def embed(self, tokens_BL: Array, *, deterministic: bool | None = None,
            rngs: nnx.Rngs | None = None) -> Array:
    """Token (+ learned position) embeddings [B, L, E]."""
    check_rank("tokens_BL", tokens_BL, 2, "[batch, length]")
    if not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
      raise ValueError(f"tokens_BL must hold integer token ids; got dtype {tokens_BL.dtype}.")
    self._check_length(tokens_BL.shape[1])
    x_BLE = self._embed_at(tokens_BL, 0)
    return self.dropout(x_BLE, deterministic=deterministic, rngs=rngs)

  def _embed_at(self, tokens_BL: Array, pos: Array | int) -> Array:
    """Token (+ learned position) embeddings of tokens at positions pos..pos+L-1 (or
    positions [B, L], one row per sequence)."""
    x_BLE = self.token_embed(tokens_BL)
    if self.cfg.positions == "learned":
      x_BLE = x_BLE + _rows_at(self.pos_embedding[...], pos, tokens_BL.shape[1]).astype(x_BLE.dtype)
    return x_BLE

  def decode(self, tokens_BL: Array, cache: layers.LayerCache, pos: Array, *,
             start_B: Array | None = None, impl: str = "auto", impl_options: dict | None = None
             ) -> tuple[Array, layers.LayerCache]:
    """Logits [B, L, vocab] (float32) of L new tokens in cache slots pos..pos+L-1,
    attending to themselves and to the `cache` of the tokens before them (every layer's
    `layers.empty_cache`, stacked [depth, ...]); and the updated cache.

    The language model's incremental form (`attnlab.models.decode` drives it): a prompt
    in one call (prefill), then one token per call. Positions enter at the right offset
    (RoPE angles, the learned table's rows, ALiBi distances to every cache slot); no
    dropout. `impl`/`impl_options`: the attention implementation to decode with.

    `start_B` (int32 [B]; None: 0): a ragged batch, left-padded. Sequence b's real tokens
    begin in slot start_B[b], so its token in slot s sits at position s - start_B[b]
    (RoPE, learned rows; ALiBi depends on slot differences alone), and the slots before
    start_B[b] are masked out of every query's keys. The padding slots' logits are
    undefined.
    """
    cfg = self.cfg
    length, max_len = tokens_BL.shape[1], cfg.max_len
    # Positions: one row for all sequences, or (ragged) one per sequence, padding at 0.
    at = pos if start_B is None else jnp.maximum(
        pos + jnp.arange(length)[None, :] - start_B[:, None], 0)
    x_BLE = self._embed_at(tokens_BL, at)
    rope = None
    if cfg.positions == "rope":
      rope = tuple(_rows_at(table, at, length)
                   for table in layers.rope_tables(max_len, cfg.head_dim, cfg.rope_base))
    bias = (alibi_bias_at(cfg.num_heads, pos + jnp.arange(length), jnp.arange(max_len))
            if cfg.positions == "alibi" else None)
    h_BLE, cache = self.encoder.decode(x_BLE, cache, pos=pos, bias=bias, rope=rope,
                                       start_B=start_B, impl=impl, impl_options=impl_options)
    return self._head(h_BLE, None).astype(jnp.float32), cache

  def apply_embedded(self, x_BLE: Array, *, padding_mask_BL: Array | None = None,
                     deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
                     return_attention_weights: bool = False
                     ) -> Array | tuple[Array, tuple[Array, ...]]:
    """Everything after `embed`: positions in attention, the encoder and the head.

    Exposed so a test or probe can differentiate through the embeddings.
    """
    cfg = self.cfg
    check_rank("x_BLE", x_BLE, 3, "[batch, length, width]")
    b, length = x_BLE.shape[:2]
    self._check_length(length)
    if padding_mask_BL is not None:
      if tuple(padding_mask_BL.shape) != (b, length) or padding_mask_BL.dtype != jnp.bool_:
        raise ValueError(f"padding_mask_BL must be bool [{b}, {length}] (True = real token); got "
                         f"{padding_mask_BL.dtype} {tuple(padding_mask_BL.shape)}.")
    rope = layers.rope_tables(length, cfg.head_dim, cfg.rope_base) if cfg.positions == "rope" \
        else None
    bias = alibi_bias(cfg.num_heads, length) if cfg.positions == "alibi" else None
    h_BLE, maps = self.encoder(x_BLE, kv_mask_BL=padding_mask_BL, is_causal=cfg.causal,
                               bias=bias, rope=rope, deterministic=deterministic, rngs=rngs,
                               return_weights=return_attention_weights)
    logits = self._head(h_BLE, padding_mask_BL).astype(jnp.float32)
    return (logits, maps) if return_attention_weights else logits

  def _check_length(self, length: int) -> None:
    if self.cfg.max_len is not None and length > self.cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds TransformerConfig.max_len="
                       f"{self.cfg.max_len}.")

  def _head(self, h_BLE: Array, padding_mask_BL: Array | None) -> Array:
    cfg = self.cfg
    if cfg.num_classes is not None:
      return self.classifier(pool(h_BLE, padding_mask_BL, cfg.pool))
    if cfg.tie_embeddings:
      return self.token_embed.attend(h_BLE)
    return self.lm_head(h_BLE)


def _rows_at(table_LX: Array, at: Array | int, length: int) -> Array:
  """Rows of a per-position table: `length` rows from position `at` (a scalar), [1, L, X]
  (the same for every sequence); or the rows of positions `at` [B, L], [B, L, X]."""
  if jnp.ndim(at) == 0:
    return jax.lax.dynamic_slice_in_dim(table_LX, at, length)[None]
  return table_LX[at]


def pool(h_BLE: Array, padding_mask_BL: Array | None, how: str) -> Array:
  """One vector per sequence: mean over real tokens, the first token, or the last real one."""
  if how == "first":
    return h_BLE[:, 0]
  if padding_mask_BL is None:
    return h_BLE[:, -1] if how == "last" else jnp.mean(h_BLE, axis=1)
  mask_BL = padding_mask_BL
  if how == "last":
    last_B = jnp.maximum(jnp.sum(mask_BL, axis=1) - 1, 0)
    return jnp.take_along_axis(h_BLE, last_B[:, None, None], axis=1)[:, 0]
  weights_BL1 = mask_BL[..., None].astype(h_BLE.dtype)
  total_BE = jnp.sum(h_BLE * weights_BL1, axis=1)
  return total_BE / jnp.maximum(jnp.sum(weights_BL1, axis=1), 1.0)
