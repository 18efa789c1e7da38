"""Vision Transformer (Dosovitskiy et al. 2020) on the shared attnlab encoder.

Follows big_vision's ViT: conv patch embedding, learned or 2-D sin-cos position
embedding added to the patches, a CLS token ("tok") or global average pooling
("gap"), pre-norm blocks, a final norm and a zero-initialised classifier head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.models import layers
from attnlab.models.config import Array, BackboneConfig, check_rank, config_error, pairs
from attnlab.models.encoder import Encoder
from attnlab.models.params import named_param

# name -> (width, depth, num_heads, mlp_dim). big_vision's table, plus tiny CPU sizes.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 4, 4, 256),      # CPU: 8x8 digits with patch 2, 28x28 with patch 4/7
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}
POOLS = ("tok", "gap")
POSEMBS = ("learned", "sincos2d")
# The config fields a variant name sets: VIT_SIZES' four, then the patch size.
VARIANT_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size")


def parse_variant(variant: str) -> dict[str, Any]:
  """"S/16" -> dict(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16)."""
  size, _, patch = str(variant).partition("/")
  if size not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
    raise config_error("ViTConfig", "variant", variant,
                       f"expected '<size>/<patch>' with size one of {list(VIT_SIZES)} and a "
                       "positive patch size, e.g. 'S/16' or 'mu/2'.")
  return dict(zip(VARIANT_FIELDS, (*VIT_SIZES[size], int(patch)), strict=True))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(BackboneConfig):
  """A ViT; the attention fields are those of `BackboneConfig`.

  Attributes:
    num_classes: classifier outputs.
    image_size: input height and width (int or (h, w)); fixed, because the
      position embedding has one entry per patch.
    patch_size: patch height and width (int or (h, w)); must divide image_size.
    num_channels: input channels.
    pool: "tok" (CLS token) | "gap" (mean of the patch tokens).
    posemb: "learned" | "sincos2d" (fixed, big_vision's posemb_sincos_2d).
    head_zero_init: start the classifier at zero (big_vision), so the initial
      loss is exactly log(num_classes).
  """
  num_classes: int
  image_size: Any = 224
  patch_size: Any = 16
  num_channels: int = 3
  pool: str = "tok"
  posemb: str = "learned"
  head_zero_init: bool = True

  def _check_model_fields(self, owner: str) -> None:
    for field in ("image_size", "patch_size"):
      value = getattr(self, field)
      try:
        pair = pairs(value)
      except TypeError:
        pair = ()
      if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
        raise config_error(owner, field, value, "expected a positive int or (height, width).")
      object.__setattr__(self, field, pair)
    if any(i % p for i, p in zip(self.image_size, self.patch_size)):
      raise config_error(owner, "patch_size", self.patch_size,
                         f"it must divide image_size={self.image_size}; pick a divisor or "
                         "resize the images.")
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise config_error(owner, "num_classes", self.num_classes, "expected a positive int.")
    if self.pool not in POOLS:
      raise config_error(owner, "pool", self.pool, f"expected one of {list(POOLS)}.")
    if self.posemb not in POSEMBS:
      raise config_error(owner, "posemb", self.posemb, f"expected one of {list(POSEMBS)}.")
    if self.posemb == "sincos2d" and self.width % 4:
      raise config_error(owner, "width", self.width, "posemb='sincos2d' needs a multiple of 4.")

  @classmethod
  def from_variant(cls, variant: str, *, num_classes: int, image_size: Any = 224,
                   **overrides: Any) -> "ViTConfig":
    """A named size such as "S/16" or "mu/2", with `overrides` on top: the one place a
    variant is resolved.

    The variant sets `VARIANT_FIELDS` (width, depth, num_heads, mlp_dim,
    patch_size). An override replaces the variant's value, except that an
    override of None for one of those fields keeps the variant's value, so a
    config that leaves e.g. `depth=None` gets the named size's depth. Any other
    field (including None for e.g. num_kv_heads) is passed on as given.

    Example:
      >>> ViTConfig.from_variant("mu/2", num_classes=10, image_size=8, attention="sigmoid")
      >>> ViTConfig.from_variant("S/16", num_classes=10, depth=None, width=768).depth
      12
    """
    fields = parse_variant(variant)
    fields.update({k: v for k, v in overrides.items() if v is not None or k not in fields})
    return cls(num_classes=num_classes, image_size=image_size, **fields)

  @property
  def grid(self) -> tuple[int, int]:
    """Patches along height and width."""
    return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

  @property
  def token_grid(self) -> tuple[tuple[int, int], int]:
    """The patch grid, after the CLS token with pool="tok" (`BackboneConfig.token_grid`)."""
    return self.grid, (1 if self.pool == "tok" else 0)

  @property
  def sequence_length(self) -> int:
    """Tokens the encoder sees: one per patch, plus the CLS token with pool="tok"."""
    return self.grid[0] * self.grid[1] + (1 if self.pool == "tok" else 0)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> Array:
  """Fixed 2-D sin-cos position embedding [h * w, width] (as big_vision)."""
  y_HW, x_HW = jnp.mgrid[:h, :w]
  omega_F = jnp.arange(width // 4, dtype=jnp.float32) / max(width // 4 - 1, 1)
  omega_F = 1.0 / (temperature ** omega_F)
  y_NF = y_HW.reshape(-1, 1).astype(jnp.float32) * omega_F[None, :]
  x_NF = x_HW.reshape(-1, 1).astype(jnp.float32) * omega_F[None, :]
  return jnp.concatenate([jnp.sin(x_NF), jnp.cos(x_NF), jnp.sin(y_NF), jnp.cos(y_NF)], axis=1)


class ViT(nnx.Module):
  """Image classifier: `ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))(images_BHWC)` -> logits.

  Parameters: patch_embed (patch_height, patch_width, channels, embed) + bias;
  pos_embedding (patches, embed) when posemb="learned"; cls (embed,) when
  pool="tok"; encoder (see `attnlab.models.encoder.Encoder`; with inline_local, each attention
  layer's `layers.InlineLocal`); head (embed, classes) + bias.
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ViTConfig):
      raise TypeError(f"cfg must be a ViTConfig; got {type(cfg).__name__}.")
    self.cfg = cfg
    (ph, pw), c, e = cfg.patch_size, cfg.num_channels, cfg.width
    self.patch_embed = layers.dense(
        "BhwPQC,PQCE->BhwE", (ph, pw, c, e), ("patch_height", "patch_width", "channels", "embed"),
        bias_axes=("embed",), cfg=cfg, rngs=rngs, n_in=3,
        kernel_init=jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3))
    num_patches = cfg.grid[0] * cfg.grid[1]
    if cfg.posemb == "learned":
      self.pos_embedding = named_param(jax.nn.initializers.normal(stddev=e ** -0.5),
                                              (num_patches, e), ("patches", "embed"), cfg, rngs)
    if cfg.pool == "tok":
      self.cls = named_param(jax.nn.initializers.zeros, (e,), ("embed",), cfg, rngs)
    self.dropout = layers.dropout(cfg.dropout_rate, rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    head_init = jax.nn.initializers.zeros if cfg.head_zero_init else None
    self.head = layers.dense("BE,EC->BC", (e, cfg.num_classes), ("embed", "classes"),
                             bias_axes=("classes",), cfg=cfg, rngs=rngs, kernel_init=head_init)

  def __call__(self, images_BHWC: Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None, return_attention_weights: bool = False
               ) -> Array | tuple[Array, tuple[Array, ...]]:
    """Classifies a batch of images.

    Args:
      images_BHWC: float images [B, H, W, C] with (H, W) = cfg.image_size.
      deterministic: True disables dropout; None uses the modules' setting
        (`model.eval()` / `model.train()`; dropout is on after construction).
      rngs: the "dropout" stream for this call, e.g. `nnx.Rngs(dropout=step_key)`
        inside a pure train step; None draws from the streams the model was
        built with.
      return_attention_weights: also return each layer's weights [B, H, N, N]
        (N = patches, + 1 with the CLS token), from the same forward pass.

    Returns:
      logits [B, num_classes] float32, or (logits, weights per layer).
    """
    x_BNE = self.embed(images_BHWC, deterministic=deterministic, rngs=rngs)
    x_BNE, maps = self.encoder(x_BNE, deterministic=deterministic, rngs=rngs,
                               return_weights=return_attention_weights)
    pooled_BE = x_BNE[:, 0] if self.cfg.pool == "tok" else jnp.mean(x_BNE, axis=1)
    logits_BC = self.head(pooled_BE).astype(jnp.float32)
    return (logits_BC, maps) if return_attention_weights else logits_BC

  def embed(self, images_BHWC: Array, *, deterministic: bool | None = None,
            rngs: nnx.Rngs | None = None) -> Array:
    """Patch tokens plus position embedding (and the CLS token first): [B, N(+1), E]."""
    cfg = self.cfg
    check_rank("images_BHWC", images_BHWC, 4, "[batch, height, width, channels]")
    expected = (*cfg.image_size, cfg.num_channels)
    if tuple(images_BHWC.shape[1:]) != expected:
      raise ValueError(f"images_BHWC must be [batch, {expected[0]}, {expected[1]}, {expected[2]}]"
                       f" (ViTConfig.image_size, num_channels); got {tuple(images_BHWC.shape)}.")
    b = images_BHWC.shape[0]
    (gh, gw), (ph, pw) = cfg.grid, cfg.patch_size
    patches = images_BHWC.reshape(b, gh, ph, gw, pw, cfg.num_channels).transpose(0, 1, 3, 2, 4, 5)
    x_BNE = self.patch_embed(patches).reshape(b, gh * gw, cfg.width)
    if cfg.posemb == "learned":
      pos_NE = self.pos_embedding[...]
    else:
      pos_NE = posemb_sincos_2d(gh, gw, cfg.width)
    x_BNE = x_BNE + pos_NE[None].astype(x_BNE.dtype)
    if cfg.pool == "tok":
      cls_B1E = jnp.broadcast_to(self.cls[...].astype(x_BNE.dtype), (b, 1, cfg.width))
      x_BNE = jnp.concatenate([cls_B1E, x_BNE], axis=1)
    return self.dropout(x_BNE, deterministic=deterministic, rngs=rngs)
