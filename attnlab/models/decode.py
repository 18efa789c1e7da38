"""Generation from a Transformer language model with a KV cache.

    tokens_BT = generate(model, prompt_BL, steps=32, rng=jax.random.key(0), top_k=5)

The prompt is processed in one call (prefill), then one token per call. Each layer
carries a decode cache (`layers.empty_cache`, every layer stacked) of one of two forms:

* a KV cache (`KVCache`, preallocated to the model's max_len, only the Hkv key/value
  heads): each call writes its tokens' keys and values and attends over the whole cache
  with `attend(..., is_causal=True, q_offset=pos)`; the slots not written yet are in the
  future of every query, so they get no weight, for every kind. Sigmoid's default bias
  is the training one, -log(max_len) (`MultiHeadAttention._kind_options`), as in a
  forward pass at max_len.
* a recurrent state, for the kinds that have one (`attention.recurrent_kinds()`: linear
  and InLine attention): their running sums over the tokens so far, whose size does not
  depend on max_len; each token costs O(1) in the sequence length.

Either way cached decoding gives the logits of a forward pass over the whole sequence.

Prompts of different lengths decode in one batch (`generate(..., prompt_lengths=...)`):
they are left-padded to the longest, so every sequence writes the same cache slot at each
step; sequence b's real tokens start at slot `DecodeState.start[b]`, its positions count
from there, and the padding slots are masked out of every query's keys (or never enter a
recurrent state). Each sequence then gets the logits it would get alone. The fused decode
kernel takes no mask, so a ragged batch decodes with the jnp paths.
Every causal kind decodes: each row's weights depend only on the keys up to it (the
sparse row maps included). A model that is not a causal language model (causal=False,
a classifier, so also the bidirectional `soft`) cannot generate, and is refused.

Each (graph, shape, impl, sampling) compiles once: prefill once per prompt shape, the
step once for all positions (the position is a traced scalar).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab import attention
from attnlab.models.layers import LayerCache, empty_cache
from attnlab.models.transformer import Transformer, TransformerConfig

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """What decoding carries from call to call.

  Attributes:
    cache: every layer's `layers.empty_cache`, each leaf stacked [depth, B, ...]: keys and
      values [depth, B, max_len, Hkv, D] (`KVCache`), or the kind's recurrent state.
    length: int32 scalar, the slots written so far (the next token's slot; its position,
      unless the batch is ragged).
    start: int32 [B], a left-padded ragged batch's first real slot per sequence (the
      padding before it is masked); None: no padding.
  """
  cache: LayerCache
  length: Array
  start: Array | None = None

  @property
  def batch_size(self) -> int:
    """The number of sequences decoded (every cache leaf is [depth, B, ...])."""
    return jax.tree.leaves(self.cache)[0].shape[1]


@dataclasses.dataclass(frozen=True)
class DecodeImpl:
  """The attention implementation decoding runs (`decode_impl`); hashable, so jit-static."""
  impl: str
  options: tuple[tuple[str, Any], ...] = ()

  def for_tokens(self, q_len: int, head_dim: int, ragged: bool = False) -> DecodeImpl:
    """The impl a call with `q_len` new tokens runs: "pallas" only where the decode kernel
    takes the call (`attention.pallas_decodes`: its backend, up to its query limit; no
    ragged batch, whose padding mask it cannot take), the prompt (prefill), ragged batches
    and backends without a decode kernel "auto", i.e. the jnp paths."""
    backend = dict(self.options).get("backend")
    if self.impl == "pallas" and (ragged or not attention.pallas_decodes(q_len, head_dim, backend)):
      return DecodeImpl("auto")
    return self


def decode_impl(model: Transformer, key_splits: int | None = None) -> DecodeImpl:
  """The model's own attention impl, or the split-key one with `key_splits` blocks.

  impl="pallas" decodes its steps with the split-key decode kernel
  (`kernels.decode_attention`, through `attend(impl="pallas", q_offset=...)`) and its
  prompt, or everything where there is no decode kernel, with "auto"
  (`DecodeImpl.for_tokens`).
  """
  cfg = model.cfg
  if key_splits is not None:
    return DecodeImpl("split", (("key_splits", key_splits),))
  return DecodeImpl(cfg.attention_impl, tuple(sorted(dict(cfg.attention_impl_options).items())))


def check_decodable(model: Transformer) -> None:
  """Raises ValueError unless `model` is a causal language model with a max_len to cache."""
  if not isinstance(model, Transformer):
    raise ValueError(f"decoding needs an attnlab Transformer language model; got "
                     f"{type(model).__name__}.")
  check_config(model.cfg)


def check_config(cfg: Any) -> None:
  """`check_decodable` for a model config, before any model is built."""
  if not isinstance(cfg, TransformerConfig):
    raise ValueError(f"decoding needs a Transformer language model (TransformerConfig); got "
                     f"{type(cfg).__name__}.")
  if cfg.num_classes is not None or not cfg.causal:
    what = "a classifier (num_classes set)" if cfg.num_classes is not None else "bidirectional"
    raise ValueError(f"cannot decode incrementally with kind={cfg.attention!r}: the model is "
                     f"{what}, so a token's output depends on later tokens. Generate from a "
                     "causal language model (TransformerConfig causal=True, num_classes=None) "
                     "with a causal kind.")
  if cfg.max_len is None:
    raise ValueError("decoding needs TransformerConfig.max_len, the size of the KV cache; "
                     "set it to the training sequence length.")


def init_cache(model: Transformer, batch_size: int, dtype: Any = None, *,
               start: Array | None = None) -> DecodeState:
  """An empty cache for `batch_size` sequences of up to max_len tokens.

  `dtype`: the KV cache's (None: the compute dtype); recurrent states keep float32 sums.
  `start`: int [B], for a left-padded ragged batch (`left_pad`) the slot of each
  sequence's first real token; None: no padding.
  """
  check_decodable(model)
  cfg = model.cfg
  layer = empty_cache(cfg, batch_size, cfg.max_len,
                      cfg.compute_dtype if dtype is None else dtype)
  stacked = jax.tree.map(lambda x: jnp.repeat(x[None], cfg.depth, axis=0), layer)
  if start is not None:
    start = jnp.asarray(start)
    if start.shape != (batch_size,) or not jnp.issubdtype(start.dtype, jnp.integer):
      raise ValueError(f"start must be int [batch_size] = [{batch_size}] (each sequence's "
                       f"first real slot); got {start.dtype} {start.shape}.")
    start = start.astype(jnp.int32)
  return DecodeState(stacked, jnp.zeros((), jnp.int32), start)


def left_pad(prompt_BL: Array, lengths_B: Array, pad_id: int = 0) -> tuple[Array, Array]:
  """Prompts stored from slot 0 (row b's first lengths_B[b] tokens real, the rest ignored)
  moved to end at the last slot: ([B, L] with `pad_id` before each prompt, the first real
  slot per row int32 [B]), the layout `init_cache(start=...)` decodes."""
  start_B = (prompt_BL.shape[1] - jnp.asarray(lengths_B)).astype(jnp.int32)
  return _shift_rows(prompt_BL, start_B, pad_id), start_B


def _shift_rows(x_BT: Array, shift_B: Array, fill: int) -> Array:
  """Each row b moved shift_B[b] places right (left where negative): out[b, t] =
  x[b, t - shift_B[b]], `fill` where that falls outside the row."""
  source_BT = jnp.arange(x_BT.shape[1])[None, :] - shift_B[:, None]
  inside_BT = (source_BT >= 0) & (source_BT < x_BT.shape[1])
  moved = jnp.take_along_axis(x_BT, jnp.clip(source_BT, 0, x_BT.shape[1] - 1), axis=1)
  return jnp.where(inside_BT, moved, fill).astype(x_BT.dtype)


def decode_step(model: Transformer, tokens_BL: Array, state: DecodeState, *,
                key_splits: int | None = None) -> tuple[Array, DecodeState]:
  """Logits [B, L, vocab] of L new tokens after those in `state`, and the advanced state.

  A prompt (prefill) or one token; jitted per shape. The state's buffers are donated:
  use the returned one.
  """
  check_decodable(model)
  _check_fits(model, tokens_BL, state)
  graphdef, params = nnx.split(model)
  return _jit_step(graphdef, params, tokens_BL, state, decode_impl(model, key_splits))


def generate(model: Transformer, prompt_BL: Array, steps: int, rng: Array,
             temperature: float = 1.0, top_k: int | None = None, *,
             prompt_lengths: Array | None = None, key_splits: int | None = None) -> Array:
  """The prompt followed by `steps` sampled tokens, [B, L + steps] int32.

  Args:
    model: a causal Transformer language model with max_len set.
    prompt_BL: int token ids [B, L], L >= 1.
    steps: tokens to sample; L + steps must not exceed max_len.
    rng: a PRNG key; the token in cache slot t draws from fold_in(rng, t), so a fixed key
      gives a fixed output.
    temperature: softmax temperature of the logits; 0 = greedy (argmax).
    top_k: sample among the k most likely tokens only (None: all); 1 = greedy.
    prompt_lengths: int [B], prompts of different lengths in one batch: row b's prompt is
      prompt_BL[b, :prompt_lengths[b]] (the rest is ignored). Row b of the result is then
      its prompt, its `steps` tokens, and 0s after them (its length: prompt_lengths[b] +
      steps). Each row's tokens are those it would get decoded alone (greedy decoding:
      tested equal; sampling draws from the batch's shared key per slot). None: every
      prompt is L long.
    key_splits: decode with the split-key impl in this many key blocks (None: the model's
      attention impl); no effect on kinds that decode from a recurrent state.
  """
  check_decodable(model)
  _check_sampling(steps, temperature, top_k, model.cfg.vocab_size)
  prompt_BL = jnp.asarray(prompt_BL)
  start_B = None
  if prompt_lengths is not None:
    _check_tokens(prompt_BL)
    _check_lengths(prompt_lengths, prompt_BL.shape)
    prompt_BL, start_B = left_pad(prompt_BL, jnp.asarray(prompt_lengths))
  state = init_cache(model, prompt_BL.shape[0], start=start_B)
  _check_fits(model, prompt_BL, state, steps)
  graphdef, params = nnx.split(model)
  impl = decode_impl(model, key_splits)
  sample = functools.partial(_jit_sample, temperature=float(temperature), top_k=top_k)
  tokens, next_B1 = [prompt_BL.astype(jnp.int32)], prompt_BL.astype(jnp.int32)
  for _ in range(steps):
    logits_BLV, state = _jit_step(graphdef, params, next_B1, state, impl)
    # fold_in(rng, the drawn token's slot): a fixed key gives a fixed output.
    next_B1 = sample(logits_BLV[:, -1], jax.random.fold_in(rng, state.length))[:, None]
    tokens.append(next_B1)
  out_BT = jnp.concatenate(tokens, axis=1)
  if start_B is None:
    return out_BT
  # Back to the caller's layout: each row from its first real token, then 0s. (state.start:
  # the array passed in went with the first step's donated state.)
  return _shift_rows(out_BT, -state.start, 0)


def _check_lengths(prompt_lengths: Any, shape: tuple[int, int]) -> None:
  lengths = np.asarray(prompt_lengths)
  if (lengths.shape != shape[:1] or not np.issubdtype(lengths.dtype, np.integer)
      or lengths.min() < 1 or lengths.max() > shape[1]):
    raise ValueError(f"prompt_lengths must be ints [batch] = [{shape[0]}] in [1, {shape[1]}] "
                     f"(prompt_BL's length); got {lengths.dtype} {lengths.shape} "
                     f"{lengths.tolist()}.")


def _check_tokens(tokens_BL: Array) -> None:
  if getattr(tokens_BL, "ndim", None) != 2 or tokens_BL.shape[1] < 1:
    raise ValueError(f"tokens must be int ids [batch, length >= 1]; got shape "
                     f"{getattr(tokens_BL, 'shape', None)}.")


def _check_fits(model: Transformer, tokens_BL: Array, state: DecodeState, steps: int = 0) -> None:
  _check_tokens(tokens_BL)
  if tokens_BL.shape[0] != state.batch_size:
    raise ValueError(f"tokens have batch {tokens_BL.shape[0]} but the cache holds "
                     f"{state.batch_size} sequences; init_cache with that batch.")
  max_len = model.cfg.max_len
  total = int(state.length) + tokens_BL.shape[1] + steps
  if total > max_len:
    raise ValueError(f"{int(state.length)} cached + {tokens_BL.shape[1]} new tokens + {steps} "
                     f"steps = {total} exceeds max_len={max_len}, the cache size (and the "
                     "longest sequence the model was built for); shorten the prompt or steps.")


def _check_sampling(steps: Any, temperature: Any, top_k: Any, vocab_size: int) -> None:
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise ValueError(f"steps must be a non-negative int; got {steps!r}.")
  if not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature must be a number >= 0 (0 = greedy); got {temperature!r}.")
  if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab_size}]; got "
                     f"{top_k!r}.")


def step(graphdef: nnx.GraphDef, params: nnx.State, tokens_BL: Array, state: DecodeState,
         impl: DecodeImpl) -> tuple[Array, DecodeState]:
  """The pure decode step `decode_step` and `generate` jit (graphdef and impl static): for
  custom loops and benchmarks. No checks: see `decode_step`."""
  model = nnx.merge(graphdef, params)
  impl = impl.for_tokens(tokens_BL.shape[1], model.cfg.head_dim, ragged=state.start is not None)
  logits_BLV, cache = model.decode(tokens_BL, state.cache, state.length, start_B=state.start,
                                   impl=impl.impl, impl_options=dict(impl.options))
  return logits_BLV, DecodeState(cache, state.length + tokens_BL.shape[1], state.start)


# The cache is donated: decoding updates it in place.
_jit_step = jax.jit(step, static_argnums=(0, 4), donate_argnums=(3,))


@functools.partial(jax.jit, static_argnames=("temperature", "top_k"))
def _jit_sample(logits_BV: Array, key: Array, *, temperature: float, top_k: int | None) -> Array:
  """One token id per row, int32 [B]."""
  if temperature == 0 or top_k == 1:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  if top_k is not None:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV / temperature, axis=-1).astype(jnp.int32)
