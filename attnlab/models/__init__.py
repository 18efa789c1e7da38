"""attnlab models: a ViT and a token Transformer built from one shared encoder.

    cfg = ViTConfig.from_variant("mu/2", num_classes=10, image_size=8, attention="sigmoid",
                                 qk_norm="rms", layer_scale=1e-4)
    model = ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    logits_BC = model(images_BHWC, deterministic=True)

    cfg = TransformerConfig(width=64, depth=2, num_heads=4, vocab_size=256, positions="alibi")
    lm = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_BLV = lm(tokens_BL, padding_mask_BL=mask_BL, deterministic=True)

A pure train step (jit- and vmap-friendly: nothing in the model is mutated):

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    def loss_fn(params, batch, key):
      # copy=True: fresh variables in this trace; needed with scan_layers, whose scan
      # threads the blocks' own RNG state through (harmless otherwise).
      m = nnx.merge(graphdef, params, rest, copy=True)
      logits = m(batch["image"], deterministic=False, rngs=nnx.Rngs(dropout=key))
      ...

(`rngs=None` draws dropout masks from the streams the model was built with, the
NNX idiom under `nnx.jit` / `nnx.value_and_grad`; a model without dropout holds
no RNG state at all.)

Attention maps for diagnostics come from the same forward pass:

    maps = attention_maps(model, images_BHWC)        # list per layer of [B, H, N, N] f32
    logits, maps = model(x, deterministic=True, return_attention_weights=True)

Every parameter carries logical axis names (`logical_axes(model)`), which
`nnx.get_partition_spec` turns into mesh shardings under
`flax.linen.logical_axis_rules`. `scan_layers=True` stacks the blocks along a
leading "layers" axis (`LAYERS_AXIS`) and compiles one block; `remat=True`
recomputes each block in the backward pass (see `attnlab.models.encoder`).

Layout: `config` (BackboneConfig and its checks), `params` (parameters with
logical axis names), `layers` (projections, norms, attention, MLP), `encoder`
(the block stack, unrolled or scanned, optionally rematerialised), `vit` and
`transformer` (the two models), `inspection` (functions of a built model), `decode`
(KV-cache decoding and `generate` for the language model).
"""

from attnlab.axes import LAYERS_AXIS
from attnlab.models.config import ACTIVATIONS, BackboneConfig
from attnlab.models.encoder import Encoder, EncoderBlock
from attnlab.models.inspection import attention_maps, count_params, logical_axes
from attnlab.models.layers import Mlp, MultiHeadAttention
from attnlab.models.transformer import Transformer, TransformerConfig, alibi_bias, alibi_slopes
from attnlab.models.vit import VIT_SIZES, ViT, ViTConfig, parse_variant, posemb_sincos_2d

__all__ = [
    "ACTIVATIONS", "BackboneConfig", "Encoder", "EncoderBlock", "LAYERS_AXIS", "Mlp",
    "MultiHeadAttention", "Transformer", "TransformerConfig", "VIT_SIZES", "ViT", "ViTConfig",
    "alibi_bias", "alibi_slopes", "attention_maps", "count_params", "logical_axes",
    "parse_variant", "posemb_sincos_2d",
]
