"""Decoding (attnlab/models/decode.py): from a KV cache, or from a recurrent state for the
kinds that have one (linear, inline); and the decoding options of `attend`.

The reference is the model's own forward pass over the whole sequence: cached decoding
must give its logits at every position, for every kind that decodes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import attention
from attnlab.models import Transformer, TransformerConfig
from attnlab.models import decode as dec
from attnlab.models.layers import KVCache

pytestmark = pytest.mark.usefixtures("fast_xla_compile")

MAX_LEN, VOCAB, PROMPT = 24, 11, 5
# Every causal kind decodes; options that make each kind's own machinery matter.
DECODING_KINDS = {
    "softmax": {}, "sigmoid": {}, "relu": {}, "polynomial": {"degree": 2}, "softplus": {},
    "gaussian": {}, "local": {"window": 3, "dilation": 2}, "linear": {}, "inline": {},
    "sparsemax": {}, "entmax": {}, "topk": {"top_k": 3},
}


def lm(attention_kind="softmax", options=(), **overrides):
  fields = dict(width=32, depth=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                max_len=MAX_LEN, positions="rope", attention=attention_kind,
                attention_options=dict(options))
  return Transformer(TransformerConfig(**{**fields, **overrides}), rngs=nnx.Rngs(0))


def forward(model, tokens_BL):
  """The model's logits over the whole sequence (the reference), jitted: one compile, not
  one per operation as eagerly (most of this file's time went to those)."""
  graphdef, params = nnx.split(model)
  return _jit_forward(graphdef, params, tokens_BL)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, params, tokens_BL):
  return nnx.merge(graphdef, params)(tokens_BL, deterministic=True)


# `attention.attend` and `attend_with_state` jitted, for the same reason; arrays traced (the
# decoding position q_offset too, as in decoding), the options static.
_STATIC = ("kind", "impl", "is_causal", "key_splits", "feature_map")
attend = jax.jit(attention.attend, static_argnames=_STATIC)
attend_with_state = jax.jit(attention.attend_with_state, static_argnames=_STATIC)


def tokens(batch=2, length=MAX_LEN, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def stale_cache(model, batch):
  """An empty state whose KV cache slots hold garbage: unwritten slots must get no weight.
  (A recurrent state has no unwritten slots: it starts empty.)"""
  state = dec.init_cache(model, batch)
  if not isinstance(state.cache, KVCache):
    return state
  noise = lambda x, s: jax.random.normal(jax.random.key(s), x.shape, x.dtype)  # noqa: E731
  return dec.DecodeState(KVCache(noise(state.cache.k_BLhD, 7), noise(state.cache.v_BLhD, 8)),
                         state.length)


def cached_logits(model, tokens_BL, prompt_len=PROMPT, key_splits=None):
  """Logits [B, L, V]: the prompt in one call, then one token per call."""
  state = stale_cache(model, tokens_BL.shape[0])
  logits, state = dec.decode_step(model, tokens_BL[:, :prompt_len], state,
                                  key_splits=key_splits)
  out = [logits]
  for t in range(prompt_len, tokens_BL.shape[1]):
    logits, state = dec.decode_step(model, tokens_BL[:, t:t + 1], state, key_splits=key_splits)
    out.append(logits)
  assert int(state.length) == tokens_BL.shape[1]
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("kind", sorted(DECODING_KINDS))
def test_cached_decoding_gives_the_full_forward_logits(kind):
  # GQA (2 kv heads for 4 query heads), RoPE; the sequence is max_len long, the length
  # sigmoid's default bias -log(max_len) belongs to in the forward pass as in decoding.
  model = lm(kind, DECODING_KINDS[kind])
  tokens_BL = tokens()
  np.testing.assert_allclose(cached_logits(model, tokens_BL),
                             forward(model, tokens_BL), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,overrides", [
    ("sigmoid", dict(positions="learned", learn_sigmoid_bias=True)),
    ("softmax", dict(positions="alibi", qk_norm="rms", output_gate="headwise")),
    ("sigmoid", dict(positions="alibi", attention_options={"sigmoid_bias": -1.5})),
    ("softmax", dict(positions="learned", scan_layers=True, num_kv_heads=1)),
    ("relu", dict(attention_impl="chunked", attention_impl_options={"block_k": 5})),
], ids=["sigmoid-learned-pos-and-bias", "softmax-alibi-qknorm-gate", "sigmoid-alibi-fixed-bias",
        "softmax-learned-scanned-mqa", "relu-chunked"])
def test_cached_decoding_with_positions_and_layouts(kind, overrides):
  model = lm(kind, **overrides)
  tokens_BL = tokens(length=MAX_LEN - 3)  # a fixed or learned bias does not depend on length
  np.testing.assert_allclose(cached_logits(model, tokens_BL, prompt_len=4),
                             forward(model, tokens_BL), atol=1e-5, rtol=1e-5)


# sigmoid through the KV cache (softmax shares every step of it but the kind's own math,
# which tests/test_attention.py covers in bf16), linear through its recurrent state.
@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_cached_decoding_in_bfloat16(kind):
  model = lm(kind, dtype="bfloat16")
  tokens_BL = tokens()
  want = np.asarray(forward(model, tokens_BL))
  got = np.asarray(cached_logits(model, tokens_BL))
  # bf16 keeps 8 bits: the paths round differently (cache writes, block order).
  np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())


def test_default_sigmoid_bias_is_the_training_one_not_the_cache_length():
  # Decoding 6 tokens uses -log(max_len), as a forward pass at max_len (the training
  # length); a forward pass over just those 6 tokens uses -log(6) and differs.
  model = lm("sigmoid")
  tokens_BL = tokens()
  got = cached_logits(model, tokens_BL[:, :6])  # the prompt, then one step
  np.testing.assert_allclose(got, forward(model, tokens_BL)[:, :6], atol=1e-5)
  assert not np.allclose(got, forward(model, tokens_BL[:, :6]), atol=1e-3)


# One kind per merge of the key blocks: a plain sum (sigmoid), the log-sum-exp (softmax),
# sums of numerator and row sum (softplus, l1). 24 keys: 3 x 8, and 5 x 5 with one padded.
# Every kind and split shape against the xla impl: test_split_impl_equals_xla_with_masks.
@pytest.mark.parametrize("kind,key_splits", [("sigmoid", 3), ("softmax", 5), ("softplus", 5)])
def test_split_key_decoding_equals_unsplit(kind, key_splits):
  model = lm(kind)
  tokens_BL = tokens(length=MAX_LEN - 1)
  np.testing.assert_allclose(cached_logits(model, tokens_BL, key_splits=key_splits),
                             cached_logits(model, tokens_BL), atol=1e-5, rtol=1e-5)


def _qkv(lq, lk, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((2, lq, 4, 8), (2, lk, 2, 8), (2, lk, 2, 8)))


# (lq, lk, key_splits): one query against uneven blocks (53 = 4 x 14 with 3 padded); three
# queries, the last block padded; one key per block. The log-sum-exp merge (softmax) at every
# shape; the plain sum at every shape too, through kinds that bring their own logits, bias
# or post-op (sigmoid's -log(Lk) must be the whole cache's, not a block's).
@pytest.mark.parametrize("kind,lq,lk,key_splits", [
    ("softmax", 1, 53, 4), ("softmax", 3, 53, 7), ("softmax", 2, 9, 9),
    ("sigmoid", 1, 53, 4), ("sigmoid", 3, 53, 7), ("relu", 3, 53, 7),
    ("polynomial", 1, 53, 4), ("gaussian", 2, 9, 9),
])
def test_split_impl_equals_xla_with_masks(kind, lq, lk, key_splits):
  q, k, v = _qkv(lq, lk)
  lengths = jnp.asarray([lk - 7, lk])  # key padding in the first sequence only
  mask = (jnp.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
  for kwargs in (dict(mask=mask), dict(is_causal=True, q_offset=jnp.int32(lk // 2)),
                 dict(is_causal=True, mask=mask)):
    want = attend(q, k, v, kind=kind, impl="xla", **kwargs)
    got = attend(q, k, v, kind=kind, impl="split", key_splits=key_splits, **kwargs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# (kind, options, num_kv_heads, dtype): both feature maps of linear attention and three of
# InLine's, GQA (4 query heads on 2) and MQA (on 1), bfloat16 for each kind.
RECURRENT_CASES = [
    ("linear", {"feature_map": "elu+1"}, 2, jnp.float32),
    ("linear", {"feature_map": "relu"}, 1, jnp.float32),
    ("linear", {"feature_map": "elu+1"}, 2, jnp.bfloat16),
    ("inline", {"feature_map": "identity"}, 2, jnp.float32),
    ("inline", {"feature_map": "exp"}, 1, jnp.float32),
    ("inline", {"feature_map": "relu"}, 2, jnp.bfloat16),
]


@pytest.mark.parametrize("kind,options,hkv,dtype", RECURRENT_CASES,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_recurrent_state_decoding_equals_causal_attention(kind, options, hkv, dtype):
  # A 4-token prefill, then one token per call: each call sees only its own k and v, the
  # rest lives in the state; together they must give causal attention over all 11 tokens.
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 11, h, 8)), dtype) for h in (4, hkv, hkv))
  want = attend(q, k, v, kind=kind, is_causal=True, **options)
  state = attention.init_decode_state(kind, 2, hkv, 8, **options)
  outs = []
  for lo, hi in [(0, 4)] + [(t, t + 1) for t in range(4, 11)]:
    out, state = attend_with_state(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], state,
                                   kind=kind, **options)
    outs.append(out)
  got = jnp.concatenate(outs, axis=1)
  assert got.dtype == dtype
  # bf16: only the output is rounded (both paths sum in float32), so 1-2 bf16 units apart.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["linear", "inline"])
def test_recurrent_kinds_keep_a_state_whose_size_does_not_depend_on_max_len(kind):
  # depth 2, batch 3, Hkv 2, head_dim 8: the running sums, never a [max_len] axis.
  want = {"linear": {"s_BhDE": (2, 3, 2, 8, 8), "z_BhD": (2, 3, 2, 8)},
          "inline": {"sums.s_BhDE": (2, 3, 2, 8, 8), "sums.z_BhD": (2, 3, 2, 8),
                     "v_sum_BhE": (2, 3, 2, 8), "n_B": (2, 3)}}[kind]
  def shapes(state):
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.cache))
    return {".".join(key.name for key in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.cache)[0]}

  assert shapes(dec.init_cache(lm(kind, max_len=MAX_LEN), 3)) == want
  model = lm(kind, max_len=4 * MAX_LEN)
  state = dec.init_cache(model, 3)
  assert shapes(state) == want
  _, state = dec.decode_step(model, tokens(batch=3, length=PROMPT), state)
  assert shapes(state) == want and int(state.length) == PROMPT


def test_q_offset_matches_attending_to_the_prefix():
  q, k, v = _qkv(3, 20)
  pos = 9  # queries at 9, 10, 11 see keys 0..11: the first 12 keys, bottom-right aligned
  # The xla path (every scoring kind's), and the prefix sums of the two O(L) kinds.
  for kind in ("softmax", "linear", "inline"):
    got = attend(q, k, v, kind=kind, is_causal=True, q_offset=jnp.int32(pos))
    want = attend(q, k[:, :pos + 3], v[:, :pos + 3], kind=kind, is_causal=True)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=kind)


# A ragged batch: prompts of 5, 2 and 8 tokens in one [3, 8] array, left-padded inside.
RAGGED_LENGTHS = (5, 2, 8)


def ragged_cached_logits(model, prompt_BL, lengths, continuation_BC):
  """Per row, the logits of its real tokens, [len_b + C, V]: the ragged prompt in one call
  (left-padded, stale noise in every cache slot first), then one token per call."""
  padded_BL, start_B = dec.left_pad(prompt_BL, jnp.asarray(lengths))
  state = dec.init_cache(model, prompt_BL.shape[0], start=start_B)
  if isinstance(state.cache, KVCache):
    state = dec.DecodeState(stale_cache(model, prompt_BL.shape[0]).cache, state.length,
                            state.start)
  logits, state = dec.decode_step(model, padded_BL, state)
  steps = []
  for t in range(continuation_BC.shape[1]):
    step_logits, state = dec.decode_step(model, continuation_BC[:, t:t + 1], state)
    steps.append(step_logits)
  steps = jnp.concatenate(steps, axis=1)
  length = prompt_BL.shape[1]
  return [np.concatenate([logits[b, length - n:], steps[b]]) for b, n in enumerate(lengths)]


def ragged_reference(model, prompt_BL, lengths, continuation_BC):
  """Per row, the forward pass's logits over its own sequence (prompt, then continuation)
  alone: one [B, max_len] buffer, zeros after each sequence (causal: they change nothing
  before them), so the forward pass compiles once."""
  rows = [jnp.concatenate([prompt_BL[b, :n], continuation_BC[b]]) for b, n in enumerate(lengths)]
  buffer_BT = jnp.stack([jnp.pad(r, (0, MAX_LEN - r.shape[0])) for r in rows])
  logits = forward(model, buffer_BT)
  return [np.asarray(logits[b, :r.shape[0]]) for b, r in enumerate(rows)]


@pytest.mark.parametrize("kind,overrides", [
    *[(kind, {}) for kind in sorted(DECODING_KINDS)],
    ("sigmoid", dict(positions="learned", learn_sigmoid_bias=True)),
    ("softmax", dict(positions="alibi", num_kv_heads=1)),
    ("sigmoid", dict(attention_impl="split", attention_impl_options={"key_splits": 3})),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_a_ragged_batch_decodes_each_sequence_as_if_alone(kind, overrides):
  # Each row's logits at its real positions equal the forward pass over that row alone:
  # padding is masked out of every key set (softmax's normaliser, sparsemax's support,
  # top-k's ranks, local windows) or never enters the recurrent state (linear, inline),
  # and positions count from each row's first real token (RoPE, learned rows).
  model = lm(kind, DECODING_KINDS.get(kind, {}), **overrides)
  prompt_BL, continuation_BC = tokens(batch=3, length=8, seed=2), tokens(batch=3, length=16)
  got = ragged_cached_logits(model, prompt_BL, RAGGED_LENGTHS, continuation_BC)
  want = ragged_reference(model, prompt_BL, RAGGED_LENGTHS, continuation_BC)
  for b in range(3):
    np.testing.assert_allclose(got[b], want[b], atol=1e-5, rtol=1e-5, err_msg=f"row {b}")


def test_generate_with_prompt_lengths_gives_each_prompt_its_own_tokens():
  model = lm("sigmoid")
  prompt_BL = tokens(batch=3, length=8, seed=2)
  got = dec.generate(model, prompt_BL, steps=6, rng=jax.random.key(0), temperature=0.0,
                     prompt_lengths=RAGGED_LENGTHS)
  assert got.shape == (3, 8 + 6) and got.dtype == jnp.int32
  for b, n in enumerate(RAGGED_LENGTHS):
    alone = dec.generate(model, prompt_BL[b:b + 1, :n], steps=6, rng=jax.random.key(0),
                         temperature=0.0)
    np.testing.assert_array_equal(got[b, :n + 6], alone[0], err_msg=f"row {b}")
    assert not np.any(got[b, n + 6:]), "after each sequence: 0s"
  # Sampling: a fixed key gives a fixed output.
  sample = lambda: dec.generate(model, prompt_BL, steps=6, rng=jax.random.key(1), top_k=4,  # noqa: E731
                                prompt_lengths=jnp.asarray(RAGGED_LENGTHS))
  np.testing.assert_array_equal(sample(), sample())


def test_a_pallas_model_decodes_a_ragged_batch_with_the_jnp_paths():
  impl = dec.DecodeImpl("pallas", (("backend", "triton"),))
  assert impl.for_tokens(1, 64, ragged=True) == dec.DecodeImpl("auto")


def test_ragged_decoding_refuses_bad_lengths():
  model = lm("softmax")
  prompt_BL = tokens(batch=3, length=8)
  for lengths in ((5, 0, 8), (5, 2, 9), (5, 2), (5.0, 2.0, 8.0)):
    with pytest.raises(ValueError, match=r"prompt_lengths must be ints \[batch\] = \[3\] in "
                                         r"\[1, 8\]"):
      dec.generate(model, prompt_BL, steps=2, rng=jax.random.key(0), prompt_lengths=lengths)
  with pytest.raises(ValueError, match=r"start must be int \[batch_size\] = \[3\]"):
    dec.init_cache(model, 3, start=jnp.zeros(2, jnp.int32))
  q, k, v = _qkv(3, 3)
  with pytest.raises(ValueError, match=r"kv_mask_BL must be bool \[batch, length\] = \[2, 3\]"):
    attention.attend_with_state(q, k, v, attention.init_decode_state("linear", 2, 2, 8),
                                kind="linear", kv_mask_BL=jnp.ones((2, 4), bool))


def test_greedy_generation_is_the_argmax_of_the_full_forward():
  model = lm("softmax")
  prompt_BL = tokens(length=PROMPT)
  got = dec.generate(model, prompt_BL, steps=8, rng=jax.random.key(0), temperature=0.0)
  # One buffer of the final length (causal: position t's logits ignore what follows it),
  # so the forward pass compiles once.
  seq = jnp.concatenate([prompt_BL, jnp.zeros((2, 8), prompt_BL.dtype)], axis=1)
  for t in range(PROMPT, PROMPT + 8):
    next_B = jnp.argmax(forward(model, seq)[:, t - 1], axis=-1)
    seq = seq.at[:, t].set(next_B.astype(seq.dtype))
  np.testing.assert_array_equal(got, seq)
  np.testing.assert_array_equal(
      dec.generate(model, prompt_BL, steps=8, rng=jax.random.key(3), top_k=1), seq)


def test_sampling_is_deterministic_per_key_and_compiles_once_per_shape():
  model = lm("sigmoid")
  prompt_BL = tokens(length=PROMPT)
  sample = lambda key: dec.generate(model, prompt_BL, steps=10, rng=key, top_k=4)  # noqa: E731
  first = sample(jax.random.key(0))
  compiled = dec._jit_step._cache_size()  # pylint: disable=protected-access
  np.testing.assert_array_equal(sample(jax.random.key(0)), first)
  assert not np.array_equal(sample(jax.random.key(1)), first)
  assert dec._jit_step._cache_size() == compiled  # pylint: disable=protected-access
  assert first.shape == (2, PROMPT + 10) and first.dtype == jnp.int32
  assert int(first.min()) >= 0 and int(first.max()) < VOCAB


def test_decoding_refuses_what_it_cannot_do():
  model = lm("softmax")
  with pytest.raises(ValueError, match=r"0 cached \+ 25 new tokens .* exceeds max_len=24"):
    dec.generate(model, tokens(length=MAX_LEN + 1), steps=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"5 new tokens \+ 20 steps = 25 exceeds max_len=24"):
    dec.generate(model, tokens(length=PROMPT), steps=20, rng=jax.random.key(0))
  full = dec.DecodeState(dec.init_cache(model, 2).cache, jnp.int32(MAX_LEN))
  with pytest.raises(ValueError, match="24 cached"):
    dec.decode_step(model, tokens(length=1), full)
  for kind in ("softmax", "linear"):  # a KV cache and a recurrent state know their batch
    with pytest.raises(ValueError, match="tokens have batch 3 but the cache holds 2"):
      dec.decode_step(lm(kind), tokens(batch=3, length=1), dec.init_cache(lm(kind), 2))
  with pytest.raises(ValueError, match="top_k must be None or an int"):
    dec.generate(model, tokens(length=PROMPT), steps=2, rng=jax.random.key(0), top_k=0)
  with pytest.raises(ValueError, match="cannot decode incrementally with kind='soft'.*"
                                       "bidirectional"):
    dec.generate(lm("soft", causal=False), tokens(length=PROMPT), 2, jax.random.key(0))
  with pytest.raises(ValueError, match="classifier"):
    dec.init_cache(lm("softmax", num_classes=3), 2)
  with pytest.raises(ValueError, match="needs TransformerConfig.max_len"):
    dec.init_cache(lm("softmax", max_len=None), 2)


def test_attend_refuses_bad_decoding_options():
  q, k, v = _qkv(1, 12)
  with pytest.raises(ValueError, match="pass is_causal=True"):
    attention.attend(q, k, v, q_offset=3)
  with pytest.raises(ValueError, match=r"expected 0 <= q_offset <= 11"):
    attention.attend(q, k, v, is_causal=True, q_offset=12)
  with pytest.raises(ValueError, match="q_offset must be None or an integer scalar"):
    attention.attend(q, k, v, is_causal=True, q_offset=1.5)
  with pytest.raises(ValueError, match="impl='split' supports kinds .* cuts the keys into"):
    attention.attend(q, k, v, kind="sparsemax", impl="split")
  with pytest.raises(ValueError, match="key_splits must be a positive int"):
    attention.attend(q, k, v, impl="split", key_splits=0)
  with pytest.raises(ValueError, match="kind='softmax' has no recurrent decode state.*"
                                       r"Kinds with one: \['inline', 'linear'\]"):
    attention.init_decode_state("softmax", 2, 2, 8)
  state = attention.init_decode_state("linear", 2, 2, 8)
  with pytest.raises(ValueError, match="share their length"):
    attention.attend_with_state(q, k, v, state, kind="linear")
  with pytest.raises(ValueError, match=r"state does not fit kind='inline'.*init_decode_state"):
    attention.attend_with_state(q, k[:, :1], v[:, :1], state, kind="inline")
