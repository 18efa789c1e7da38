"""What the fused kernels support, stated once and importable without Pallas.

`attnlab.attention` reads this to validate `attend(..., impl="pallas")` (and the
models read it through `attnlab.attention.check_options` when a config is
built), so a kind the kernels cannot run fails at config time, not when traced.
"""

# The attention kinds the fused kernels implement.
KINDS = ("sigmoid", "softmax")

# The options `flash_attention` takes besides the kind's own (`sigmoid_bias`),
# with their defaults: tuning and layout, none of which changes the result.
OPTIONS = {
    "block_q": None, "block_k": None, "backend": None, "interpret": None,
    "q_segment_ids": None, "kv_segment_ids": None, "num_warps": None, "num_stages": None,
}

# The kernels never build [Lq, Lk]: no mask or bias arrays (segment ids and
# is_causal instead).
TAKES_MASK_AND_BIAS_ARRAYS = False
