"""attnlab models: a ViT and a token Transformer built from one shared encoder.

    cfg = ViTConfig.from_variant("mu/2", num_classes=10, image_size=8, attention="sigmoid",
                                 qk_norm="rms", layer_scale=1e-4)
    model = ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    logits_BC = model(images_BHWC, deterministic=True)
    maps = attention_maps(model, images_BHWC)      # list per layer of [B, H, N, N]

    cfg = TransformerConfig(width=64, depth=2, num_heads=4, vocab_size=256, positions="alibi")
    lm = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_BLV = lm(tokens_BL, padding_mask_BL=mask_BL)
"""

from attnlab.models.layers import (
    ACTIVATIONS,
    ATTENTION_IMPLS,
    BackboneConfig,
    Encoder,
    EncoderBlock,
    Mlp,
    MultiHeadAttention,
    attention_maps,
    count_params,
    logical_axes,
)
from attnlab.models.transformer import Transformer, TransformerConfig, alibi_bias, alibi_slopes
from attnlab.models.vit import VIT_SIZES, ViT, ViTConfig, parse_variant, posemb_sincos_2d

__all__ = [
    "ACTIVATIONS", "ATTENTION_IMPLS", "BackboneConfig", "Encoder", "EncoderBlock", "Mlp",
    "MultiHeadAttention", "Transformer", "TransformerConfig", "VIT_SIZES", "ViT", "ViTConfig",
    "alibi_bias", "alibi_slopes", "attention_maps", "count_params", "logical_axes",
    "parse_variant", "posemb_sincos_2d",
]
