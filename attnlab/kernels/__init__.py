"""Fused Pallas attention kernels (FlashSigmoid and FlashAttention-2 softmax on one tiling).

`flash_attention` is the entry point (`attnlab.attention.attend(..., impl="pallas")`
dispatches to it). One backend per file: `flash_gpu` (Triton, and interpret mode
on CPU) and `flash_tpu` (Mosaic); `common` holds what both share,
`capabilities` states what they support, and `sharded` runs the kernel once
per shard when a mesh is in context (batch over the data axes, heads over "model"). The plain jnp reference the kernels must
match is `attnlab.attention.attend(impl="xla")`.
"""

from attnlab.kernels.flash import flash_attention

__all__ = ["flash_attention"]
