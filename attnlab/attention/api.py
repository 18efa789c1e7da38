"""The public entry points: `attend`, `weights`, `apply_weights`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attnlab import kernels
from attnlab.attention import chunked, core, validate, xla
from attnlab.attention.kinds import KINDS, Mechanism, get_kind
from attnlab.kernels import capabilities as kernel_capabilities

Array = jax.Array

# The implementations and what each supports, stated once: every other module
# (the models' configs included) asks `check_options` / `impl_kinds`.
# "auto" picks one of the others per call (`auto_impl`); it takes no tuning options (to tune,
# name the impl).
IMPLS = ("xla", "chunked", "split", "pallas", "auto")
# Options that belong to an implementation rather than to a kind, with defaults.
IMPL_OPTIONS: dict[str, dict[str, Any]] = {
    "auto": {},
    "xla": {},
    "chunked": {"block_k": chunked.DEFAULT_BLOCK_K},
    # Key blocks run side by side and merged (`chunked.attend`'s split mode): for a few
    # queries against a long KV cache. 8 blocks keep 2-16 cores busy at batch 1.
    "split": {"key_splits": 8},
    # The training kernel's options and the decode kernel's (q_offset given); each kernel
    # reads its own tuning options and ignores the other's.
    "pallas": {**kernel_capabilities.OPTIONS, **kernel_capabilities.DECODE_OPTIONS},
}

# impl="auto" off the fused kernels: the chunked path from this key length on. Measured side
# by side against jax.nn.dot_product_attention (B1 H2 D64 float32, 2 shared CPU cores): for
# softmax and sigmoid, chunked (256-key tiles) and xla (512-key tiles) are level in fwd+bwd
# time from L = 2048 (softmax 0.79x vs 0.80x dpa, sigmoid 0.55x vs 0.56x), chunked with 0.6x
# of xla's memory; at L = 512 xla's single tile is faster for softmax (fwd+bwd 0.73x vs
# 0.85x). The kinds that xla materialises need chunked's memory long before that.
AUTO_CHUNKED_MIN_KV_LEN = 2048


def _positive_int_option(impl: str, name: str) -> Callable[[Any], None]:
  def check(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"impl={impl!r}: {name} must be a positive int; got {value!r}.")
  return check


# Validators of the impl options' values, run by `check_options` so a config fails when it
# is built, not at the first call. The fused kernels check theirs (block sizes depend on the
# backend and dtype) when called.
IMPL_OPTION_CHECKS: dict[str, dict[str, Callable[[Any], None]]] = {
    "chunked": {"block_k": _positive_int_option("chunked", "block_k")},
    "split": {"key_splits": _positive_int_option("split", "key_splits")},
}


def platform() -> str:
  """The platform `auto_impl` chooses for (jax's default backend)."""
  return jax.default_backend()


def auto_impl(kind: str, q: Array, k: Array, v: Array, *, mask: Array | None = None,
              bias: Array | None = None, q_offset: Array | int | None = None) -> str:
  """The impl `impl="auto"` runs for this call: static facts only, so it works under jit/vmap.

  On GPU and TPU the fused Pallas kernel, for the kinds it implements and calls it can take
  (no mask or bias arrays, one dtype for q, k, v; with a q_offset, decoding, only where the
  decode kernel has run natively: `auto_decodes`); otherwise on every platform the chunked
  path from `AUTO_CHUNKED_MIN_KV_LEN` keys on (for the kinds it runs), and the materialising
  path below that.
  """
  fused = (platform() in (*kernel_capabilities.GPU_PLATFORMS, "tpu")
           and kind in impl_kinds("pallas") and _kernel_takes(mask, bias)
           and (q_offset is None or auto_decodes(q.shape[1], max(q.shape[3], v.shape[3])))
           and q.dtype == k.dtype == v.dtype
           and jnp.dtype(q.dtype).name in kernel_capabilities.DTYPES)
  if fused:
    return "pallas"
  long = k.shape[1] >= AUTO_CHUNKED_MIN_KV_LEN
  return "chunked" if long and kind in impl_kinds("chunked") else "xla"


def auto_decodes(q_len: int, head_dim: int = 0) -> bool:
  """Whether `impl="auto"` decodes with the kernel: `pallas_decodes`, on a backend the
  kernel has run on natively (`capabilities.DECODE_AUTO_BACKENDS`)."""
  backend = "tpu" if platform() == "tpu" else "gpu"
  return (backend in kernel_capabilities.DECODE_AUTO_BACKENDS
          and pallas_decodes(q_len, head_dim, backend))


def pallas_decodes(q_len: int, head_dim: int = 0, backend: str | None = None) -> bool:
  """Whether `attend(impl="pallas", q_offset=...)` has a decode kernel for `q_len` queries
  (head dims up to `head_dim`) on `backend`: None is the kernels' default for this platform
  (TPU on a TPU, else the GPU kernel, interpreted off a GPU)."""
  if backend is None:
    backend = "tpu" if platform() == "tpu" else "gpu"
  return (backend in kernel_capabilities.DECODE_BACKENDS
          and q_len <= kernel_capabilities.DECODE_MAX_Q_LEN
          and head_dim <= kernel_capabilities.DECODE_MAX_HEAD_DIM)


def impl_kinds(impl: str) -> tuple[str, ...]:
  """The registered kinds `impl` can run: the fused kernels state theirs; chunked runs every
  kind but those with a `row_map` (sparsemax, entmax: a row's weights need all of its
  scores at once, which a scan over key blocks never holds; top-k, whose kept set a
  running top-k finds, runs); split runs those chunked runs, top-k aside (its kept set
  would need a merge across blocks); xla and auto (falling
  back from the kernels and from chunked) run every kind. Kinds with an `attend_override`
  (linear, inline, soft: O(L), no [Lq, Lk] scores) run that same path under xla, chunked,
  split and auto."""
  _check_impl(impl)
  if impl == "pallas":
    return tuple(k for k in kernel_capabilities.KINDS if k in KINDS)
  if impl == "chunked":
    return tuple(sorted(k for k, mech in KINDS.items()
                        if mech.row_map is None or mech.top_k_of is not None))
  if impl == "split":
    return tuple(sorted(k for k, mech in KINDS.items() if mech.row_map is None))
  return tuple(sorted(KINDS))


def kind_impls(kind: str) -> tuple[str, ...]:
  """The impls that can run `kind` (the inverse of `impl_kinds`), for error messages."""
  return tuple(impl for impl in IMPLS if kind in impl_kinds(impl))


def impls_phrase(kind: str) -> str:
  """The explicit impls that run `kind` as a phrase, e.g. "impl='xla' or 'chunked'"."""
  named = [i for i in kind_impls(kind) if i != "auto"]
  return "impl=" + " or ".join(repr(i) for i in named)


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; expected one of {list(IMPLS)}.")


def check_options(kind: str, impl: str = "xla", **options: Any
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Validates a (kind, impl, options) choice without any array; the config-time check.

  `attend` runs the same check on every call; a model config runs it when it is
  built, so e.g. kind="relu" with impl="pallas" fails there, naming the kinds
  the fused kernels support.

  Args:
    kind: a name in `KINDS`.
    impl: one of `IMPLS`.
    **options: the kind's options and the impl's, mixed (as `attend` takes them).

  Returns:
    (kind_options, impl_options), each complete with defaults.

  Raises:
    ValueError: an unknown kind or impl, a kind the impl cannot run, an option
      neither takes, or an invalid option value.
  """
  mech = get_kind(kind)
  _check_impl(impl)
  if mech.name not in impl_kinds(impl):
    blocks = {"chunked": "chunked scans key blocks", "split": "split cuts the keys into blocks"}
    why = (f" (its weights need a whole row of scores at once; {blocks[impl]})"
           if impl in blocks and mech.row_map is not None else "")
    raise ValueError(f"impl={impl!r} supports kinds {list(impl_kinds(impl))}; got kind="
                     f"{mech.name!r}{why}. Use {impls_phrase(mech.name)} for it.")
  return _split_options(mech, impl, options)


def _split_options(mech: Mechanism, impl: str, options: dict[str, Any]):
  """Separates kind options from implementation options and validates both."""
  impl_accepts = IMPL_OPTIONS[impl]
  kind_given = {k: v for k, v in options.items() if k not in impl_accepts}
  impl_given = {k: v for k, v in options.items() if k in impl_accepts}
  unknown = sorted(set(kind_given) - set(mech.options))
  if unknown:
    raise ValueError(
        f"kind={mech.name!r} with impl={impl!r} does not take option(s) {unknown}; the kind "
        f"accepts {sorted(mech.options) or 'none'} and impl={impl!r} accepts "
        f"{sorted(impl_accepts) or 'none'}.")
  kind_options = {**mech.options, **kind_given}
  mech.check(kind_options)
  impl_options = {**impl_accepts, **impl_given}
  for name, check in IMPL_OPTION_CHECKS.get(impl, {}).items():
    check(impl_options[name])
  return kind_options, impl_options


def _prepare(q, k, v, kind, mask, bias, scale, is_causal, impl, options, q_offset=None):
  mech = get_kind(kind)
  _check_impl(impl)
  dims = validate.check_qkv(q, k, v) if v is not None else None
  if dims is None:
    q_shape, k_shape = validate.check_qk(q, k)
    dims = validate.Dims(q_shape[0], q_shape[1], k_shape[1], q_shape[2], k_shape[2],
                         q_shape[3], k_shape[3])
  validate.check_mask_and_bias(mask, bias, dims)
  validate.check_scale(scale)
  validate.check_q_offset(q_offset, is_causal, dims)
  kind_options, impl_options = check_options(kind, impl, **options)
  mech.check_shapes(kind_options, dims)
  if not mech.has_logits:
    for name, value in (("bias", bias), ("scale", scale)):
      if value is not None:
        raise ValueError(f"kind={kind!r} has no pairwise logits, so it takes no {name}; got "
                         f"{name}={value if name == 'scale' else 'an array'}. Leave it None.")
  if bias is not None and not mech.takes_bias:
    raise ValueError(f"kind={kind!r} never builds the [Lq, Lk] scores an additive bias would "
                     "enter, so it takes no bias; got bias=an array. Leave it None (for "
                     "positions use RoPE or learned embeddings rather than ALiBi).")
  if is_causal and not mech.supports_causal:
    raise ValueError(f"kind={kind!r} is not causal (every output mixes the whole sequence), so "
                     f"it takes no is_causal=True. Use it bidirectionally, or a causal kind "
                     f"(e.g. kind='gaussian' for its exact kernel).")
  mech.check_mask(mask)
  return mech, dims, kind_options, impl_options


def attend(q: Array, k: Array, v: Array, *, kind: str = "softmax", mask: Array | None = None,
           is_causal: bool = False, bias: Array | None = None, scale: float | None = None,
           impl: str = "xla", q_offset: Array | int | None = None, **options: Any) -> Array:
  """Attention of `q` over `k`/`v` with any registered mechanism.

  Two semantics differ on purpose from `jax.nn.dot_product_attention`; code
  ported from it must adapt (tests/test_attention.py pins both):

  * Causal alignment when Lq != Lk. Here the LAST query aligns with the LAST key
    (bottom-right: query i sees keys j <= i + (Lk - Lq)), which is what decoding
    with a KV cache needs. jax aligns the first query with the first key (top-left:
    j <= i). They agree when Lq == Lk. For jax's behaviour pass
    mask = (j <= i)[None, None] and is_causal=False.
  * A row with no visible key (fully masked) returns zeros here, for every kind.
    jax's softmax fills masked logits with a large finite negative number, so such a
    row gets uniform weights and returns the mean of v over all keys.

  Args:
    q: queries [B, Lq, H, D].
    k: keys [B, Lk, Hkv, D]; H must be a multiple of Hkv (grouped-query attention;
      query head h uses key/value head h // (H // Hkv)).
    v: values [B, Lk, Hkv, Dv].
    kind: a name in `KINDS` ("softmax", "sigmoid", "relu", "linear", ...).
    mask: bool, rank 4, broadcastable to [B, H, Lq, Lk]; True = may attend.
    is_causal: query i sees keys j <= i + (Lk - Lq) (bottom-right, see above).
    bias: additive logits bias, rank 4, broadcastable to [B, H, Lq, Lk].
    scale: logits scale; default 1/sqrt(D).
    impl: "auto" (one of the others per call, see `auto_impl`; the models' default), "xla"
      (the plain path: materialised weights, or tiles of `xla.BLOCK_K` keys for the kinds
      with the flash-style backward), "chunked" (blockwise scan, option `block_k`), or
      "split" (decoding: the keys cut into `key_splits` blocks run side by side and merged,
      log-sum-exp for softmax and plain sums for the kinds without a row normaliser; every
      kind chunked runs), or
      "pallas" (the fused kernel of `attnlab.kernels`, for sigmoid and softmax; options
      block_q, block_k, backend, interpret, q_segment_ids, kv_segment_ids, num_warps,
      num_stages; with q_offset the split-key decode kernel `kernels.decode_attention`,
      for up to `kernels.capabilities.DECODE_MAX_Q_LEN` queries, options num_splits,
      block_k, backend, interpret, num_warps, num_stages).
    q_offset: with is_causal=True, the position of the first query among the keys (an
      int, or a traced integer scalar: one compiled step serves every decoding position);
      query i then sees keys j <= q_offset + i, and local windows centre there. None =
      Lk - Lq (bottom-right). For decoding against a preallocated KV cache: the cache
      slots past the current length are simply in the future of every query, so they get
      no weight for every kind; sigmoid's default bias stays -log(Lk) of the whole cache.
      With impl="pallas": the split-key decode kernel (few queries; no segment ids).
    **options: the kind's options (see `KINDS[kind].options`) and the impl's.
      kind="sigmoid" (and "local" with base="sigmoid") takes `sigmoid_bias`, the b
      of sigmoid(s + b): None (default) means `default_sigmoid_bias(Lk)` = -log(Lk);
      otherwise a real number (Python int/float, NumPy scalar of any float type,
      0-d array), an array [H] with one bias per QUERY head (under GQA each head
      of a group has its own), or a rank-4 array broadcastable to [B, H, 1, 1].
      Arrays may be traced (under jit/grad), so the bias can be a learned
      parameter; its gradient flows in the xla and chunked impls. impl="pallas"
      passes it unchanged to `kernels.flash_attention`.

  Returns:
    [B, Lq, H, Dv] in q.dtype. Masked keys get exactly zero weight; a row with
    no visible key returns zeros.

  Raises:
    ValueError: an argument of the wrong shape, dtype or value (the message names
      it, what was seen and what is expected).
  """
  mech, dims, kind_options, impl_options = _prepare(q, k, v, kind, mask, bias, scale,
                                                    is_causal, impl, options, q_offset)
  if impl == "auto":
    impl = auto_impl(mech.name, q, k, v, mask=mask, bias=bias, q_offset=q_offset)
    impl_options = dict(IMPL_OPTIONS[impl])  # auto takes no options: the picked impl's defaults
  scale = core.default_scale(dims.head_dim, scale)
  common = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale)
  if impl == "pallas":
    return _attend_pallas(q, k, v, mech, kind_options, impl_options, q_offset=q_offset,
                          **common)
  common["q_offset"] = q_offset
  if mech.attend_override is not None:
    return mech.attend_override(q, k, v, mech, kind_options, **common)
  if impl == "chunked":
    return chunked.attend(q, k, v, mech, kind_options, block_k=impl_options["block_k"],
                          **common)
  if impl == "split":
    return chunked.attend(q, k, v, mech, kind_options, key_splits=impl_options["key_splits"],
                          **common)
  return xla.attend(q, k, v, mech, kind_options, **common)


def recurrent_kinds() -> tuple[str, ...]:
  """The kinds that decode from a constant-size recurrent state (`Mechanism.decode_step`)
  instead of a cache of every key and value."""
  return tuple(sorted(k for k, mech in KINDS.items() if mech.decode_step is not None))


def init_decode_state(kind: str, batch: int, num_kv_heads: int, head_dim: int,
                      value_dim: int | None = None, **options: Any) -> Any:
  """The empty recurrent state of a kind in `recurrent_kinds` (before any token).

  Its size depends on the batch, heads and head dims only, never on a sequence length.
  `value_dim` defaults to `head_dim`; `options` are the kind's, as `attend` takes them.
  """
  mech = _recurrent_kind(kind)
  kind_options, _ = check_options(kind, "xla", **options)
  return mech.decode_state_init(batch, num_kv_heads, head_dim,
                                head_dim if value_dim is None else value_dim, kind_options)


def attend_with_state(q: Array, k: Array, v: Array, state: Any, *, kind: str,
                      scale: float | None = None, kv_mask_BL: Array | None = None,
                      **options: Any) -> tuple[Array, Any]:
  """Causal attention of L new tokens from a recurrent state: decoding for the kinds in
  `recurrent_kinds`, O(L) whatever the number of tokens before them.

  The new tokens (q [B, L, H, D], their own k [B, L, Hkv, D] and v [B, L, Hkv, Dv]) attend
  to themselves causally and to every token folded into `state` (from `init_decode_state`,
  then from earlier calls), as `attend(..., is_causal=True)` over the whole sequence does.
  `kv_mask_BL` (bool [B, L], True = a real token): padding tokens (a ragged batch's) are
  not folded into the state, so no later query sees them; their own outputs are undefined.

  Returns:
    (out [B, L, H, Dv] in q.dtype, the state with the new tokens folded in).
  """
  mech = _recurrent_kind(kind)
  _, dims, kind_options, _ = _prepare(q, k, v, kind, None, None, scale, True, "xla", options)
  if dims.q_len != dims.kv_len:
    raise ValueError(f"attend_with_state takes the new tokens' own keys and values (the "
                     f"earlier ones are in `state`), so q and k share their length; got "
                     f"q_length={dims.q_len}, kv_length={dims.kv_len}.")
  if kv_mask_BL is not None and (tuple(kv_mask_BL.shape) != (dims.batch, dims.kv_len)
                                 or kv_mask_BL.dtype != jnp.bool_):
    raise ValueError(f"kv_mask_BL must be bool [batch, length] = [{dims.batch}, {dims.kv_len}] "
                     f"(True = a real token); got {kv_mask_BL.dtype} {tuple(kv_mask_BL.shape)}.")
  _check_state(mech, state, dims, kind_options)
  return mech.decode_step(q, k, v, state, kind_options, core.default_scale(dims.head_dim, scale),
                          kv_mask_BL)


def _recurrent_kind(kind: str) -> Mechanism:
  mech = get_kind(kind)
  if mech.decode_step is None:
    raise ValueError(f"kind={kind!r} has no recurrent decode state: it decodes from a cache of "
                     f"its keys and values (attend with is_causal=True and q_offset). Kinds "
                     f"with one: {list(recurrent_kinds())}.")
  return mech


def _check_state(mech: Mechanism, state: Any, dims: validate.Dims, kind_options: Any) -> None:
  """Raises unless `state` has the structure, shapes and dtypes of this call's empty state."""
  want = jax.eval_shape(lambda: mech.decode_state_init(
      dims.batch, dims.num_kv_heads, dims.head_dim, dims.value_dim, kind_options))
  if _layout(state) != _layout(want):
    raise ValueError(f"state does not fit kind={mech.name!r} with batch={dims.batch}, "
                     f"num_kv_heads={dims.num_kv_heads}, head_dim={dims.head_dim}, value_dim="
                     f"{dims.value_dim}: expected {_layout(want)}, got {_layout(state)}. Start "
                     "from init_decode_state with these sizes and pass on the state each call "
                     "returns.")


def _layout(tree: Any) -> Any:
  """`tree` with each array as its "dtype[shape]" (anything else as its type name)."""
  def describe(x: Any) -> str:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      return type(x).__name__
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"
  return jax.tree.map(describe, tree)


def weights(q: Array, k: Array, *, kind: str = "softmax", mask: Array | None = None,
            is_causal: bool = False, bias: Array | None = None, scale: float | None = None,
            **options: Any) -> Array:
  """The attention weights of `kind`, float32 [B, H, Lq, Lk] (materialised).

  Same arguments as `attend`. For linear attention these are the normalised
  feature-map products its O(L) form never builds. `attend(impl="xla")` equals
  `apply_weights(weights(...), v)` for every kind.
  """
  mech, dims, kind_options, _ = _prepare(q, k, None, kind, mask, bias, scale, is_causal, "xla",
                                         options)
  scale = core.default_scale(dims.head_dim, scale)
  common = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale)
  if mech.weights_override is not None:
    return mech.weights_override(q, k, mech, kind_options, **common)
  return xla.attention_weights(q, k, mech, kind_options, **common)


def apply_weights(w: Array, v: Array, *, kind: str = "softmax", out_dtype: Any = None,
                  **options: Any) -> Array:
  """weights [B, H, Lq, Lk] @ values [B, Lk, Hkv, Dv] -> [B, Lq, H, Dv], with the kind's
  output post-op (e.g. ReLA's RMS normalisation). `out_dtype` defaults to v.dtype."""
  mech = get_kind(kind)
  if getattr(w, "ndim", None) != 4 or getattr(v, "ndim", None) != 4:
    raise ValueError(f"apply_weights needs w [B, H, Lq, Lk] and v [B, Lk, Hkv, Dv]; got "
                     f"w {getattr(w, 'shape', None)} and v {getattr(v, 'shape', None)}.")
  if (w.shape[0] != v.shape[0] or w.shape[3] != v.shape[1] or w.shape[1] % v.shape[2]):
    raise ValueError(f"apply_weights: w {tuple(w.shape)} does not match v {tuple(v.shape)} "
                     "(batch, key length, and heads a multiple of kv heads).")
  kind_options, _ = _split_options(mech, "xla", options)
  return xla.apply_weights(w, v, mech, kind_options, v.dtype if out_dtype is None else out_dtype)


def _kernel_takes(mask: Array | None, bias: Array | None) -> bool:
  """Whether the fused kernels can take this call's mask and bias arrays (the capability
  table's rule: today none, so only calls without them)."""
  return kernel_capabilities.TAKES_MASK_AND_BIAS_ARRAYS or (mask is None and bias is None)


def _attend_pallas(q, k, v, mech, kind_options, impl_options, *, mask, bias, is_causal, scale,
                   q_offset):
  if not _kernel_takes(mask, bias):
    raise ValueError("impl='pallas' takes no mask/bias arrays (the fused kernel never builds "
                     "[Lq, Lk]); use is_causal=True and q_segment_ids/kv_segment_ids for "
                     "padding or packed sequences, or impl='chunked'.")
  if q_offset is not None:  # decoding: is_causal=True (checked), the split-key kernel
    for name in ("q_segment_ids", "kv_segment_ids"):
      if impl_options[name] is not None:
        raise ValueError(f"impl='pallas' with q_offset (the decode kernel) takes no {name}: "
                         "the cache's valid length is q_offset + Lq. Use impl='split' with a "
                         "mask for padded sequences.")
    decode_options = {name: impl_options[name] for name in kernel_capabilities.DECODE_OPTIONS}
    return kernels.decode_attention(q, k, v, q_offset, kind=mech.name, scale=scale,
                                    **kind_options, **decode_options)
  training_options = {name: impl_options[name] for name in kernel_capabilities.OPTIONS}
  return kernels.flash_attention(q, k, v, kind=mech.name, scale=scale, is_causal=is_causal,
                                 **kind_options, **training_options)
