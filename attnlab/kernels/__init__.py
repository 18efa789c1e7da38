"""Fused Pallas attention kernels (FlashSigmoid and FlashAttention-2 softmax on one tiling).

`flash_attention` is the entry point (`attnlab.attention.attend(..., impl="pallas")`
dispatches to it); `decode_attention` is its split-key decoding variant, for a few
queries against a KV cache (`attend(impl="pallas", q_offset=...)` dispatches to it).
One backend per file: `flash_gpu` and `decode_gpu` (Triton, and interpret mode on CPU),
`flash_tpu` and `decode_tpu` (Mosaic); `common` holds what they share, `capabilities`
states what they support, and `sharded` runs the training kernel once per shard when a
mesh is in context (batch over the data axes, heads over "model"). The plain jnp
reference the kernels must match is `attnlab.attention.attend(impl="xla")`.
"""

from attnlab.kernels.decode import decode_attention
from attnlab.kernels.flash import flash_attention

__all__ = ["decode_attention", "flash_attention"]
