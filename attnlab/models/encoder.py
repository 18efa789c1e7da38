"""The encoder every attnlab model shares: pre-norm blocks, unrolled or scanned, then a norm.

`BackboneConfig.scan_layers` and `BackboneConfig.remat` change how the stack is
compiled and differentiated, never what it computes:

* unrolled (default): `blocks` is a list, `blocks[i]` the i-th `EncoderBlock`;
  XLA sees `depth` copies of the block.
* scanned: `blocks` is one `EncoderBlock` whose parameters (and dropout RNG
  streams) are stacked along a leading axis named "layers", applied with
  `nnx.scan`, so XLA compiles the block once (MaxText, big_vision).
* remat: each block's activations are recomputed in the backward pass
  (`nnx.remat`), in either layout.

Dropout keys: a `rngs` passed at call time is one stream shared by all blocks;
each draw advances its counter, in block order. The scan carries that stream
(counter included) from block to block, so both layouts draw the same key for
the same dropout of the same block, and every block a different one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.axes import LAYERS_AXIS
from attnlab.models.config import BackboneConfig
from attnlab.models.layers import LayerCache, Mlp, MultiHeadAttention, dropout, norm_layer
from attnlab.models.params import named_param

Array = jax.Array
# (block, x_BLE, rngs, traced attention inputs) -> (x_BLE, weights or None)
BlockFn = Callable[..., tuple[Array, Array | None]]

# nnx.List holds submodules as graph nodes (flax >= 0.12); a plain list did so before.
_ModuleList = getattr(nnx, "List", list)
# What the scan and the stacked initialisation do to each parameter's axis names.
_STACKED = {nnx.PARTITION_NAME: LAYERS_AXIS}


class EncoderBlock(nnx.Module):
  """Pre-norm block: x + LS(attn(norm(x))), then x + LS(mlp(norm(x)))."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    self.attn_norm = norm_layer(cfg.norm, cfg.width, "embed", cfg, rngs)
    self.attn = MultiHeadAttention(cfg, rngs=rngs)
    self.mlp_norm = norm_layer(cfg.norm, cfg.width, "embed", cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.dropout = dropout(cfg.dropout_rate, rngs)
    self.use_layer_scale = cfg.layer_scale is not None
    if self.use_layer_scale:
      init = jax.nn.initializers.constant(cfg.layer_scale)
      self.attn_scale = named_param(init, (cfg.width,), ("embed",), cfg, rngs)
      self.mlp_scale = named_param(init, (cfg.width,), ("embed",), cfg, rngs)

  def __call__(self, x_BLE: Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None, return_weights: bool = False,
               **attn_kwargs: Any) -> tuple[Array, Array | None]:
    """`attn_kwargs` are `MultiHeadAttention`'s (kv_mask_BL, is_causal, bias, rope)."""
    y_BLE, weights = self.attn(self.attn_norm(x_BLE), deterministic=deterministic, rngs=rngs,
                               return_weights=return_weights, **attn_kwargs)
    return self._after_attention(x_BLE, y_BLE, deterministic, rngs), weights

  def decode(self, x_BLE: Array, cache: LayerCache, **decode_kwargs: Any
             ) -> tuple[Array, LayerCache]:
    """The block on new tokens against this layer's cache (`MultiHeadAttention.decode`'s
    kwargs); no dropout."""
    y_BLE, cache = self.attn.decode(self.attn_norm(x_BLE), cache, **decode_kwargs)
    return self._after_attention(x_BLE, y_BLE, True, None), cache

  def _after_attention(self, x_BLE: Array, y_BLE: Array, deterministic: bool | None,
                       rngs: nnx.Rngs | None) -> Array:
    """The attention residual, then the MLP's."""
    x_BLE = x_BLE + self._branch(y_BLE, "attn_scale", deterministic, rngs)
    y_BLE = self.mlp(self.mlp_norm(x_BLE), deterministic=deterministic, rngs=rngs)
    return x_BLE + self._branch(y_BLE, "mlp_scale", deterministic, rngs)

  def _branch(self, y_BLE: Array, scale_name: str, deterministic: bool | None,
              rngs: nnx.Rngs | None) -> Array:
    y_BLE = self.dropout(y_BLE, deterministic=deterministic, rngs=rngs)
    if self.use_layer_scale:
      scale_E = getattr(self, scale_name)[...].astype(y_BLE.dtype)
      y_BLE = y_BLE * scale_E.reshape((1,) * (y_BLE.ndim - 1) + scale_E.shape)
    return y_BLE


def stacked_blocks(cfg: BackboneConfig, rngs: nnx.Rngs) -> EncoderBlock:
  """`cfg.depth` blocks as one `EncoderBlock` with every variable stacked [depth, ...].

  Each block is initialised from its own split of every stream of `rngs`;
  parameters get "layers" as the name of their new leading axis.
  """
  @nnx.split_rngs(splits=cfg.depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.depth, transform_metadata=_STACKED)
  def make(block_rngs: nnx.Rngs) -> EncoderBlock:
    return EncoderBlock(cfg, rngs=block_rngs)

  return make(rngs)


class Encoder(nnx.Module):
  """`depth` encoder blocks and the final norm (`encoder_norm`).

  With `cfg.scan_layers`, `blocks` is a single `EncoderBlock` holding every
  block's variables stacked along a leading "layers" axis; otherwise a list of
  `depth` blocks. See the module docstring for remat and dropout keys.
  """

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    self.scan_layers, self.remat = cfg.scan_layers, cfg.remat
    if cfg.scan_layers:
      self.blocks = stacked_blocks(cfg, rngs)
    else:
      self.blocks = _ModuleList([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.encoder_norm = norm_layer(cfg.norm, cfg.width, "embed", cfg, rngs)

  def __call__(self, x_BLE: Array, *, kv_mask_BL: Array | None = None, is_causal: bool = False,
               bias: Array | None = None, rope: tuple[Array, Array] | None = None,
               deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
               return_weights: bool = False) -> tuple[Array, tuple[Array, ...]]:
    """Runs every block; returns the normed hidden states and (if asked) each layer's weights.

    Args:
      x_BLE: embedded tokens [B, L, E].
      kv_mask_BL, is_causal, bias, rope: as `MultiHeadAttention`.
      deterministic: True disables dropout (None: each module's setting).
      rngs: the "dropout" stream for this call (None: the blocks' own streams).
      return_weights: also return each layer's attention weights [B, H, L, L].

    Returns:
      (normed hidden states [B, L, E], per-layer weights: a tuple of `depth`
      arrays, or () unless return_weights).
    """
    def apply(block: EncoderBlock, x_BLE: Array, rngs: nnx.Rngs | None,
              arrays: dict[str, Any]) -> tuple[Array, Array | None]:
      # Traced inputs are arguments (remat must see them); Python settings are closed over.
      return block(x_BLE, rngs=rngs, is_causal=is_causal, deterministic=deterministic,
                   return_weights=return_weights, **arrays)

    if self.remat:
      # Inside a scan XLA cannot merge the recomputation back into the forward pass, so the
      # CSE guard is unneeded there and only costs speed (jax.checkpoint's docs).
      apply = nnx.remat(apply, prevent_cse=not self.scan_layers)
    run = self._scan if self.scan_layers else self._loop
    x_BLE, maps = run(apply, x_BLE, rngs, dict(kv_mask_BL=kv_mask_BL, bias=bias, rope=rope))
    return self.encoder_norm(x_BLE), (maps if return_weights else ())

  def decode(self, x_BLE: Array, cache: LayerCache, **decode_kwargs: Any
             ) -> tuple[Array, LayerCache]:
    """Every block on new tokens against its layer of `cache` (`layers.empty_cache` with
    every leaf stacked [depth, ...]); returns the normed hidden states and the updated
    cache. `decode_kwargs`: as `MultiHeadAttention.decode`."""
    if self.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                transform_metadata=_STACKED)
      def body(x_BLE, block, layer_cache):
        return block.decode(x_BLE, layer_cache, **decode_kwargs)

      x_BLE, cache = body(x_BLE, self.blocks, cache)
    else:
      layer_caches = []
      for i, block in enumerate(self.blocks):
        x_BLE, layer_cache = block.decode(x_BLE, jax.tree.map(lambda c: c[i], cache),
                                          **decode_kwargs)
        layer_caches.append(layer_cache)
      cache = jax.tree.map(lambda *layers: jnp.stack(layers), *layer_caches)
    return self.encoder_norm(x_BLE), cache

  def _loop(self, apply: BlockFn, x_BLE: Array, rngs: nnx.Rngs | None,
            arrays: dict[str, Any]) -> tuple[Array, tuple[Array | None, ...]]:
    maps = []
    for block in self.blocks:
      x_BLE, w = apply(block, x_BLE, rngs, arrays)
      maps.append(w)
    return x_BLE, tuple(maps)

  def _scan(self, apply: BlockFn, x_BLE: Array, rngs: nnx.Rngs | None,
            arrays: dict[str, Any]) -> tuple[Array, tuple[Array, ...]]:
    # The call's rngs travel in the carry, so each block draws after the previous one.
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), transform_metadata=_STACKED)
    def body(carry, block):
      x_BLE, rngs = carry
      x_BLE, w = apply(block, x_BLE, rngs, arrays)
      return (x_BLE, rngs), w

    (x_BLE, _), w_stacked = body((x_BLE, rngs), self.blocks)
    if w_stacked is None:
      return x_BLE, ()
    return x_BLE, tuple(w_stacked[i] for i in range(w_stacked.shape[0]))
