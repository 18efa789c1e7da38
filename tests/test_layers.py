"""Tests of attnlab.models.config and .layers: config validation, the attention block's options,
RoPE, the learned sigmoid bias."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from attnlab import attention
from attnlab.models import TransformerConfig, config, encoder, inspection, layers

WIDTH, HEADS, LEN = 16, 4, 5


pytestmark = pytest.mark.usefixtures("fast_xla_compile")  # tests/conftest.py


def backbone(**overrides) -> config.BackboneConfig:
  return config.BackboneConfig(**{"width": WIDTH, "depth": 1, "num_heads": HEADS, **overrides})


def param_shapes(module: nnx.Module) -> dict[tuple, tuple[int, ...]]:
  return {path: tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def lm_backbone(**overrides) -> TransformerConfig:
  """A config that fixes a sequence length (max_len = LEN), as a learned sigmoid bias needs."""
  fields = dict(width=WIDTH, depth=1, num_heads=HEADS, vocab_size=8, max_len=LEN,
                attention="sigmoid")
  return TransformerConfig(**{**fields, **overrides})


def x_input(seed: int = 0, batch: int = 2) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, LEN, WIDTH))


# --- config validation -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=3), "num_heads"),  # does not divide width 16
    (dict(num_kv_heads=3), "num_kv_heads"),  # does not divide 4 heads
    (dict(attention="softmaxx"), "attention"),
    (dict(attention_impl="cuda"), "attention_impl"),
    (dict(attention="relu", attention_impl="pallas"), "attention_impl"),  # kernels: sigmoid, softmax
    (dict(attention="sigmoid", attention_options={"block_k": 64}), "attention_options"),
    (dict(attention_impl="chunked", attention_impl_options={"block_k": 0}),
     "attention_impl_options"),
    (dict(attention_impl_options={"sigmoid_bias": 1.0}), "attention_impl_options"),
    (dict(attention="sigmoid", attention_options={"window": 3}), "attention_options"),
    (dict(attention="local", attention_options={"window": 0}), "attention_options"),
    (dict(qk_norm="l2"), "qk_norm"),
    (dict(output_gate="channel"), "output_gate"),
    (dict(norm="batch"), "norm"),
    (dict(mlp_activation="tanh"), "mlp_activation"),
    (dict(layer_scale=-1.0), "layer_scale"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(attention_dropout_rate=0.1, attention_impl="chunked"), "attention_dropout_rate"),
    (dict(dtype="int32"), "dtype"),
    (dict(width=0), "width"),
    (dict(remat=1), "remat"),
    (dict(scan_layers="yes"), "scan_layers"),
    # A learned sigmoid bias needs a kind that reads one ...
    (dict(learn_sigmoid_bias=True), "learn_sigmoid_bias"),
    (dict(learn_sigmoid_bias=True, attention="local"), "learn_sigmoid_bias"),  # softmax base
    # ... and a sequence length to start from, which a bare backbone does not fix.
    (dict(learn_sigmoid_bias=True, attention="sigmoid"), "learn_sigmoid_bias"),
])
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"BackboneConfig\.{field}="):
    backbone(**overrides)


def test_pallas_with_a_kind_the_kernels_lack_fails_when_built_naming_their_kinds():
  kinds = attention.impl_kinds("pallas")
  with pytest.raises(ValueError, match=re.escape(f"it supports kinds {list(kinds)}")):
    backbone(attention="relu", attention_impl="pallas")
  for kind in kinds:  # the kinds it names do build
    backbone(attention=kind, attention_impl="pallas")


def test_config_is_frozen_and_hashable_with_options_dict():
  a = backbone(attention="sigmoid", attention_options=ml_collections.ConfigDict(
      {"sigmoid_bias": -2.0}), dtype=jnp.bfloat16)
  b = backbone(attention="sigmoid", attention_options=(("sigmoid_bias", -2.0),), dtype="bfloat16")
  assert a == b and hash(a) == hash(b)
  assert a.attention_options == (("sigmoid_bias", -2.0),)
  assert a.dtype == "bfloat16"
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.width = 32  # type: ignore[misc]
  # replace() re-validates, and derived sizes follow the new fields.
  c = dataclasses.replace(a, width=32)
  assert c.effective_mlp_dim == 128 and c.head_dim == 8


def test_learned_and_fixed_sigmoid_bias_together_is_an_error_naming_both():
  with pytest.raises(ValueError, match=r"TransformerConfig\.learn_sigmoid_bias=True .*"
                                       r"attention_options\['sigmoid_bias'\]"):
    lm_backbone(learn_sigmoid_bias=True, attention_options={"sigmoid_bias": -2.0})


def test_every_registered_kind_is_a_valid_config():
  for kind in attention.KINDS:
    assert backbone(attention=kind).attention == kind


# --- the attention block -----------------------------------------------------------------------
def test_attention_param_tree_and_axes_base():
  mha = layers.MultiHeadAttention(backbone(), rngs=nnx.Rngs(0))
  d = WIDTH // HEADS
  assert param_shapes(mha) == {
      ("query", "kernel"): (WIDTH, HEADS, d), ("query", "bias"): (HEADS, d),
      ("key", "kernel"): (WIDTH, HEADS, d), ("key", "bias"): (HEADS, d),
      ("value", "kernel"): (WIDTH, HEADS, d), ("value", "bias"): (HEADS, d),
      ("out", "kernel"): (HEADS, d, WIDTH), ("out", "bias"): (WIDTH,),
  }


@pytest.mark.parametrize("overrides, added, changed", [
    (dict(qk_norm="rms"), {("q_norm", "scale"): (4,), ("k_norm", "scale"): (4,)}, {}),
    (dict(qk_norm="layernorm"), {("q_norm", "scale"): (4,), ("q_norm", "bias"): (4,),
                                 ("k_norm", "scale"): (4,), ("k_norm", "bias"): (4,)}, {}),
    (dict(output_gate="headwise"), {("gate", "kernel"): (WIDTH, HEADS), ("gate", "bias"): (HEADS,)},
     {}),
    (dict(output_gate="elementwise"), {("gate", "kernel"): (WIDTH, HEADS, 4),
                                       ("gate", "bias"): (HEADS, 4)}, {}),
    (dict(num_kv_heads=2), {}, {("key", "kernel"): (WIDTH, 2, 4), ("key", "bias"): (2, 4),
                                ("value", "kernel"): (WIDTH, 2, 4), ("value", "bias"): (2, 4)}),
    (dict(num_kv_heads=1), {}, {("key", "kernel"): (WIDTH, 1, 4), ("key", "bias"): (1, 4),
                                ("value", "kernel"): (WIDTH, 1, 4), ("value", "bias"): (1, 4)}),
])
def test_attention_options_change_the_param_tree_exactly(overrides, added, changed):
  base = param_shapes(layers.MultiHeadAttention(backbone(), rngs=nnx.Rngs(0)))
  mha = layers.MultiHeadAttention(backbone(**overrides), rngs=nnx.Rngs(0))
  expected = {**base, **changed, **added}
  assert param_shapes(mha) == expected
  out, _ = mha(x_input(), is_causal=True)
  chex.assert_shape(out, (2, LEN, WIDTH))
  chex.assert_tree_all_finite(out)


def test_layer_scale_adds_two_named_vectors_at_init_value():
  base = param_shapes(encoder.EncoderBlock(backbone(), rngs=nnx.Rngs(0)))
  block = encoder.EncoderBlock(backbone(layer_scale=1e-4), rngs=nnx.Rngs(0))
  assert param_shapes(block) == {**base, ("attn_scale",): (WIDTH,), ("mlp_scale",): (WIDTH,)}
  np.testing.assert_array_equal(block.attn_scale[...], np.full(WIDTH, 1e-4, np.float32))
  np.testing.assert_array_equal(block.mlp_scale[...], np.full(WIDTH, 1e-4, np.float32))


def test_layer_scale_scales_each_residual_branch():
  block = encoder.EncoderBlock(backbone(layer_scale=1e-4), rngs=nnx.Rngs(0))
  x = x_input()
  block.attn_scale[...] = jnp.zeros(WIDTH)
  block.mlp_scale[...] = jnp.zeros(WIDTH)
  np.testing.assert_array_equal(block(x, deterministic=True)[0], x)  # both branches off
  block.attn_scale[...] = jnp.ones(WIDTH)
  block.mlp_scale[...] = jnp.ones(WIDTH)
  plain = encoder.EncoderBlock(backbone(), rngs=nnx.Rngs(0))  # same init order -> same weights
  np.testing.assert_allclose(block(x, deterministic=True)[0], plain(x, deterministic=True)[0],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_output_gate_multiplies_sdpa_output_by_sigmoid(gate):
  """With a zero gate kernel and bias b, the pre-projection output is sigmoid(b) times ungated."""
  gated = layers.MultiHeadAttention(backbone(output_gate=gate), rngs=nnx.Rngs(0))
  plain = layers.MultiHeadAttention(backbone(), rngs=nnx.Rngs(0))
  for name in ("query", "key", "value", "out"):
    nnx.update(getattr(gated, name), nnx.state(getattr(plain, name)))
  gated.gate.kernel[...] = jnp.zeros_like(gated.gate.kernel[...])
  gated.gate.bias[...] = jnp.full_like(gated.gate.bias[...], 0.7)
  x = x_input()
  b_out = plain.out.bias[...][None, None, :]
  got = gated(x)[0] - b_out
  want = jax.nn.sigmoid(0.7) * (plain(x)[0] - b_out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # A gate that depends on x: different inputs give different gates, so the ratio varies.
  gated.gate.kernel[...] = jnp.ones_like(gated.gate.kernel[...])
  ratio = (gated(x)[0] - b_out) / (plain(x)[0] - b_out)
  assert float(jnp.std(ratio)) > 1e-3


@pytest.mark.parametrize("kind", sorted(attention.KINDS))
def test_weights_path_equals_attend_path(kind):
  """return_weights computes out = apply_weights(weights) in the same pass; it must equal attend."""
  mha = layers.MultiHeadAttention(backbone(attention=kind, num_kv_heads=2), rngs=nnx.Rngs(0))
  x = x_input()
  mask = jnp.array([[True] * LEN, [True] * (LEN - 2) + [False] * 2])
  # soft is bidirectional and takes no mask (its landmarks pool the whole sequence).
  structured = attention.KINDS[kind].supports_causal
  call = dict(kv_mask_BL=mask, is_causal=True) if structured else {}
  plain, none = mha(x, **call)
  with_w, w = mha(x, **call, return_weights=True)
  assert none is None
  chex.assert_shape(w, (2, HEADS, LEN, LEN))
  np.testing.assert_allclose(with_w, plain, rtol=1e-5, atol=1e-5)
  if structured:
    # Causal and padding structure are visible in the maps: no weight above the diagonal or
    # on pad.
    np.testing.assert_array_equal(np.triu(np.asarray(w), k=1), 0.0)
    np.testing.assert_array_equal(np.asarray(w)[1, :, :, LEN - 2:], 0.0)


def test_softmax_weights_rows_sum_to_one():
  mha = layers.MultiHeadAttention(backbone(), rngs=nnx.Rngs(0))
  _, w = mha(x_input(), return_weights=True)
  np.testing.assert_allclose(jnp.sum(w, axis=-1), 1.0, rtol=1e-6)


def test_attention_dropout_uses_the_dropout_stream():
  mha = layers.MultiHeadAttention(backbone(attention_dropout_rate=0.5),
                                  rngs=nnx.Rngs(params=0, dropout=1))
  x = x_input()
  det1, det2 = mha(x, deterministic=True)[0], mha(x, deterministic=True)[0]
  np.testing.assert_array_equal(det1, det2)
  drop1, drop2 = mha(x, deterministic=False)[0], mha(x, deterministic=False)[0]
  assert not np.allclose(drop1, det1) and not np.allclose(drop1, drop2)


# --- learned sigmoid bias ----------------------------------------------------------------------
@pytest.mark.parametrize("kind_options", [
    dict(attention="sigmoid", num_kv_heads=2),  # one bias per query head, also under GQA
    dict(attention="local", attention_options={"base": "sigmoid", "window": 2}),
])
def test_learned_sigmoid_bias_param_and_fixed_bias_equivalence_at_init(kind_options):
  learned = layers.MultiHeadAttention(lm_backbone(learn_sigmoid_bias=True, **kind_options),
                                      rngs=nnx.Rngs(0))
  options = dict(kind_options.pop("attention_options", {}))
  fixed = layers.MultiHeadAttention(lm_backbone(**kind_options, attention_options=options),
                                    rngs=nnx.Rngs(0))
  # The bias draws no key: every other parameter is the fixed-bias model's, value for value.
  base = nnx.to_pure_dict(nnx.state(fixed, nnx.Param))
  mine = nnx.to_pure_dict(nnx.state(learned, nnx.Param))
  assert set(mine) - set(base) == {"sigmoid_bias"}
  chex.assert_trees_all_equal({k: v for k, v in mine.items() if k != "sigmoid_bias"}, base)
  np.testing.assert_allclose(learned.sigmoid_bias[...], np.full(HEADS, -np.log(LEN)), rtol=1e-6)
  assert inspection.logical_axes(learned)[("sigmoid_bias",)] == ("heads",)
  # At init the learned model is the fixed-default model at its length L = LEN ...
  x = x_input()
  np.testing.assert_allclose(learned(x, is_causal=True)[0], fixed(x, is_causal=True)[0],
                             rtol=1e-6, atol=1e-6)
  # ... and each head reads its own entry: moving head 2's bias changes head 2 only.
  learned.sigmoid_bias[...] = learned.sigmoid_bias[...].at[2].add(3.0)
  _, w_moved = learned(x, is_causal=True, return_weights=True)
  _, w_fixed = fixed(x, is_causal=True, return_weights=True)
  changed = np.abs(np.asarray(w_moved - w_fixed)).max(axis=(0, 2, 3))
  assert changed[2] > 1e-3 and np.all(changed[[0, 1, 3]] < 1e-6), changed


# --- RoPE --------------------------------------------------------------------------------------
def test_rope_scores_depend_only_on_relative_position():
  d, length = 8, 12
  sin, cos = layers.rope_tables(length, d, 10_000.0)
  q = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (d,)), (1, length, 1, d))
  k = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (d,)), (1, length, 1, d))
  rq, rk = layers.apply_rope(q, sin, cos)[0, :, 0], layers.apply_rope(k, sin, cos)[0, :, 0]
  scores = rq @ rk.T  # [i, j]
  # Same offset i - j -> same score; rotation keeps norms.
  np.testing.assert_allclose(scores[3, 1], scores[9, 7], rtol=1e-5)
  np.testing.assert_allclose(scores[2, 6], scores[7, 11], rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q[0, :, 0], axis=-1),
                             rtol=1e-5)
  assert abs(float(scores[3, 1] - scores[3, 2])) > 1e-4  # and it does depend on the offset
