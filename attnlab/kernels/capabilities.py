"""What the fused kernels support, stated once and importable without Pallas.

`attnlab.attention` reads this to validate `attend(..., impl="pallas")` (and the
models read it through `attnlab.attention.check_options` when a config is
built), so a kind the kernels cannot run fails at config time, not when traced.
"""

# The attention kinds the fused kernels implement.
KINDS = ("sigmoid", "softmax")
# Input dtypes (names) the kernels take, all accumulating in float32; the Mosaic GPU
# backend ("mgpu", Hopper: wgmma) takes the 16-bit ones only.
DTYPES = ("float32", "bfloat16", "float16")
MGPU_DTYPES = ("bfloat16", "float16")
# jax.default_backend() names under which the GPU kernels run natively; "tpu" for TPU.
GPU_PLATFORMS = ("gpu", "cuda", "rocm")

# The options `flash_attention` takes besides the kind's own (`sigmoid_bias`),
# with their defaults: tuning and layout, none of which changes the result.
OPTIONS = {
    "block_q": None, "block_k": None, "backend": None, "interpret": None,
    "q_segment_ids": None, "kv_segment_ids": None, "num_warps": None, "num_stages": None,
}

# The kernels never build [Lq, Lk]: no mask or bias arrays (segment ids and
# is_causal instead).
TAKES_MASK_AND_BIAS_ARRAYS = False

# ------------------------------------------------------------------ the decode kernel
# `attnlab.kernels.decode_attention` (split-key "flash-decoding"): a few queries against a
# KV cache, forward only. The same kinds, and the same input dtypes (float32, bfloat16,
# float16; float32 accumulation) as the training kernels.
DECODE_KINDS = KINDS
# The kernel families it exists for (GPU: Triton, `decode_gpu`; TPU: Mosaic, `decode_tpu`).
DECODE_BACKENDS = ("gpu", "tpu")
# Where `impl="auto"` picks the decode kernel: the backends it has run on natively. None
# yet: it has been checked in interpret mode and by lowering only (tests/
# test_kernels_decode.py), so auto keeps the jnp paths for decoding until
# benchmarks/gpu_check.sh has run it on a device; `impl="pallas"` (and models with
# attention_impl="pallas") use it where DECODE_BACKENDS allows.
DECODE_AUTO_BACKENDS: tuple[str, ...] = ()
# At most this many queries per call (one decoded token, or a short chunk of them): the
# G * Lq rows of a GQA group (padded to a power of two) form one tile of queries.
DECODE_MAX_Q_LEN = 16
# Head dims (of keys and of values) up to this: one [rows, D] query tile and [block_k, D]
# key/value tiles per program.
DECODE_MAX_HEAD_DIM = 256
# The options `decode_attention` takes besides the kind's own, with their defaults.
DECODE_OPTIONS = {
    "num_splits": None, "block_k": None, "backend": None, "interpret": None,
    "num_warps": None, "num_stages": None,
}
