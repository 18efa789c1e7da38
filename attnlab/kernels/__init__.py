"""Fused Pallas attention kernels (FlashSigmoid and FlashAttention-2 softmax on one tiling).

`flash_attention` is the entry point (`attnlab.attention.attend(..., impl="pallas")`
dispatches to it). Kernels: `flash_sigmoid` (GPU / Triton, and interpret mode on
CPU) and `flash_sigmoid_tpu` (TPU / Mosaic); `common` holds what both share.
"""

from attnlab.kernels.flash import flash_attention
from attnlab.kernels.flash_sigmoid import attention_reference

__all__ = ["flash_attention", "attention_reference"]
