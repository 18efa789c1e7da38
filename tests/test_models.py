"""Tests of attnlab.models: ViT and Transformer shapes, parameter counts, causality,
implementation equivalence, one training step per attention kind, jit/vmap behaviour."""

import importlib.util

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab import attention
from attnlab.models import (
    Transformer,
    TransformerConfig,
    ViT,
    ViTConfig,
    alibi_slopes,
    attention_maps,
    count_params,
    logical_axes,
    posemb_sincos_2d,
)

KINDS = sorted(attention.KINDS)


pytestmark = pytest.mark.usefixtures("fast_xla_compile")  # tests/conftest.py
VOCAB, LEN = 11, 10


def lm_cfg(**overrides) -> TransformerConfig:
  fields = dict(width=16, depth=2, num_heads=4, mlp_dim=32, vocab_size=VOCAB)
  return TransformerConfig(**{**fields, **overrides})


def vit_cfg(**overrides) -> ViTConfig:
  # A non-zero head: with big_vision's zero head every logit and every non-head gradient is 0,
  # which would make any comparison of two models pass trivially.
  fields = dict(width=16, depth=2, num_heads=4, mlp_dim=32, head_zero_init=False)
  return ViTConfig.from_variant("mu/2", num_classes=5, image_size=8, **{**fields, **overrides})


def tokens(batch: int = 2, length: int = LEN, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def images(batch: int = 2, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, 8, 8, 3))


def right_padding(lengths) -> jax.Array:
  return jnp.arange(LEN)[None, :] < jnp.asarray(lengths)[:, None]


# --- parameter counts and shapes of the named variants ------------------------------------------
VIT_TABLE = {  # variant: (width, depth, heads, mlp) from the ViT / big_vision papers
    "Ti/16": (192, 12, 3, 768), "S/16": (384, 12, 6, 1536), "B/16": (768, 12, 12, 3072),
}


def vit_param_formula(width, depth, mlp, patch=16, image=224, channels=3, classes=1000):
  """Count by hand: conv patch embed, posemb per patch, CLS, blocks, final LN, head."""
  patches = (image // patch) ** 2
  embed = (patch * patch * channels * width + width) + patches * width + width
  attn = 4 * (width * width + width)  # q, k, v, out with biases
  mlp_block = (width * mlp + mlp) + (mlp * width + width)
  norms = 2 * (2 * width)  # two LayerNorms (scale + bias) per block
  return embed + depth * (attn + mlp_block + norms) + 2 * width + (width * classes + classes)


def abstract_vit(variant: str) -> ViT:
  cfg = ViTConfig.from_variant(variant, num_classes=1000, image_size=224)
  return nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("variant", sorted(VIT_TABLE))
def test_named_vit_param_count_and_output_shape(variant):
  model = abstract_vit(variant)  # nothing allocated
  width, depth, heads, mlp = VIT_TABLE[variant]
  assert (model.cfg.width, model.cfg.depth, model.cfg.num_heads, model.cfg.mlp_dim) == \
      (width, depth, heads, mlp)
  assert count_params(model) == vit_param_formula(width, depth, mlp)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, deterministic=True), state,
                       jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert (out.shape, out.dtype) == ((2, 1000), jnp.float32)


def test_vit_b16_param_count_golden():
  # 86,567,656 in timm, which also gives the CLS token a position embedding (+768);
  # big_vision (and attnlab) add position embeddings to the 196 patches only.
  assert count_params(abstract_vit("B/16")) == 86_566_888


@pytest.mark.parametrize("variant, size", [("mu/2", 8), ("mu/4", 28)])
def test_tiny_vit_variants_run(variant, size):
  cfg = ViTConfig.from_variant(variant, num_classes=10, image_size=size, num_channels=1)
  logits = ViT(cfg, rngs=nnx.Rngs(0))(jnp.ones((3, size, size, 1)), deterministic=True)
  chex.assert_shape(logits, (3, 10))
  # big_vision's zero-initialised head: the first loss is exactly log(num_classes).
  np.testing.assert_array_equal(logits, 0.0)


def test_from_variant_none_keeps_the_variant_value_and_other_overrides_win():
  """The one rule for named sizes: a None override of a field the variant sets keeps the
  variant's value (a config leaving it unset); any other override replaces it."""
  plain = ViTConfig.from_variant("S/16", num_classes=10)
  unset = ViTConfig.from_variant("S/16", num_classes=10, width=None, depth=None,
                                 num_heads=None, mlp_dim=None, patch_size=None)
  assert unset == plain
  assert (plain.width, plain.depth, plain.num_heads, plain.mlp_dim, plain.patch_size) == \
      (384, 12, 6, 1536, (16, 16))
  mixed = ViTConfig.from_variant("S/16", num_classes=10, width=768, depth=None, mlp_dim=None,
                                 patch_size=8, num_kv_heads=None, qk_norm="rms")
  # mlp_dim=None keeps the variant's 1536, not BackboneConfig's 4 * width = 3072.
  assert (mixed.width, mixed.depth, mixed.mlp_dim, mixed.patch_size) == (768, 12, 1536, (8, 8))
  assert mixed.num_heads == 6 and mixed.num_kv_heads is None and mixed.qk_norm == "rms"
  # None for a field the variant does not set is passed on: layer_scale=None is "off".
  assert ViTConfig.from_variant("mu/2", num_classes=3, layer_scale=None).layer_scale is None


@pytest.mark.parametrize("overrides, shape", [
    (dict(), (2, LEN, VOCAB)),
    (dict(tie_embeddings=False), (2, LEN, VOCAB)),
    (dict(causal=False, num_classes=3, pool="mean"), (2, 3)),
    (dict(num_classes=3, pool="last", positions="learned", max_len=LEN), (2, 3)),
])
def test_transformer_output_shapes(overrides, shape):
  model = Transformer(lm_cfg(**overrides), rngs=nnx.Rngs(0))
  out = model(tokens(), padding_mask_BL=right_padding([LEN, 6]), deterministic=True)
  assert (out.shape, out.dtype) == (shape, jnp.float32)


def test_tied_and_untied_heads_param_trees():
  tied = Transformer(lm_cfg(), rngs=nnx.Rngs(0))
  untied = Transformer(lm_cfg(tie_embeddings=False), rngs=nnx.Rngs(0))
  extra = set(logical_axes(untied)) - set(logical_axes(tied))
  assert extra == {("lm_head", "kernel")}
  assert untied.lm_head.kernel.shape == (16, VOCAB)
  assert count_params(untied) - count_params(tied) == 16 * VOCAB


# --- logical axis names ------------------------------------------------------------------------
FULL_OPTIONS = dict(qk_norm="layernorm", layer_scale=1e-4, output_gate="elementwise",
                    num_kv_heads=2)


@pytest.mark.parametrize("model_fn", [
    lambda: ViT(vit_cfg(**FULL_OPTIONS), rngs=nnx.Rngs(0)),
    lambda: ViT(vit_cfg(pool="gap", posemb="sincos2d", output_gate="headwise", qk_norm="rms"),
                rngs=nnx.Rngs(0)),
    lambda: Transformer(lm_cfg(positions="learned", max_len=LEN, tie_embeddings=False,
                               norm="rms", **FULL_OPTIONS), rngs=nnx.Rngs(0)),
    lambda: Transformer(lm_cfg(num_classes=3, use_bias=False), rngs=nnx.Rngs(0)),
    lambda: ViT(vit_cfg(**FULL_OPTIONS, attention="sigmoid", learn_sigmoid_bias=True,
                        scan_layers=True), rngs=nnx.Rngs(0)),
], ids=["vit_all_options", "vit_gap_sincos", "lm_learned_untied", "classifier_nobias",
        "vit_scanned_learned_bias"])
def test_every_parameter_has_logical_axes_of_its_rank(model_fn):
  model = model_fn()
  axes = logical_axes(model)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert axes.keys() == params.keys() and params
  for path, names in axes.items():
    assert names is not None, f"{path} has no logical axis names"
    assert len(names) == params[path].ndim, f"{path}: {names} vs shape {params[path].shape}"
    assert all(isinstance(n, str) for n in names), (path, names)


def test_logical_axes_on_abstract_model_and_mesh_rules():
  model = abstract_vit("Ti/16")
  axes = logical_axes(model)
  assert axes[("encoder", "blocks", 0, "attn", "query", "kernel")] == ("embed", "heads",
                                                                       "head_dim")
  assert axes[("encoder", "blocks", 3, "mlp", "fc_in", "kernel")] == ("embed", "mlp")
  assert axes[("head", "kernel")] == ("embed", "classes")
  # A trainer maps the names onto its mesh with rules, without touching model code.
  with nn.logical_axis_rules([("mlp", "model"), ("heads", "model"), ("embed", None)]):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["encoder"]["blocks"][3]["mlp"]["fc_in"]["kernel"].get_value() == \
      jax.sharding.PartitionSpec(None, "model")
  lm = nnx.eval_shape(lambda: Transformer(lm_cfg(), rngs=nnx.Rngs(0)))
  assert logical_axes(lm)[("token_embed", "embedding")] == ("vocab", "embed")


# --- causality ---------------------------------------------------------------------------------
# Every kind that runs causally (soft does not: TransformerConfig refuses causal=True for it).
CAUSAL_CASES = ([(k, "xla", "rope", 1) for k in KINDS if attention.KINDS[k].supports_causal]
                + [("softmax", "chunked", "rope", 2), ("sigmoid", "chunked", "alibi", 2),
                   ("sigmoid", "xla", "alibi", 1), ("relu", "chunked", "learned", 1)])


@pytest.mark.parametrize("kind, impl, positions, depth", CAUSAL_CASES)
def test_lm_output_at_t_ignores_inputs_after_t(kind, impl, positions, depth):
  length = 6
  cfg = lm_cfg(attention=kind, attention_impl=impl, positions=positions, max_len=length,
               depth=depth, attention_impl_options={"block_k": 4} if impl == "chunked" else {})
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x_1LE = model.embed(tokens(1, length), deterministic=True)
  jac = jax.jit(jax.jacrev(
      lambda x: nnx.merge(graphdef, state).apply_embedded(x, deterministic=True)))(x_1LE)
  influence_TS = np.asarray(jnp.sum(jnp.abs(jac[0, :, :, 0]), axis=(1, 3)))  # out t <- input s
  future = np.triu(np.ones((length, length), bool), k=1)
  np.testing.assert_array_equal(influence_TS[future], 0.0)  # exactly zero
  # The past does reach the output (ReLU-type weights may be exactly 0 for a few pairs).
  assert np.all(np.diag(influence_TS) > 0), influence_TS
  past = np.tril(np.ones((length, length), bool), k=-1)
  assert np.mean(influence_TS[past] > 0) > 0.5, influence_TS


def test_bidirectional_encoder_sees_the_future():
  model = Transformer(lm_cfg(causal=False), rngs=nnx.Rngs(0))
  x_1LE = model.embed(tokens(1, 4), deterministic=True)
  jac = jax.jacrev(lambda x: model.apply_embedded(x, deterministic=True))(x_1LE)
  assert float(jnp.sum(jnp.abs(jac[0, 0, :, 0, 3]))) > 0


# --- padding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "linear"])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_padded_tokens_do_not_change_the_result(kind, pool):
  cfg = lm_cfg(attention=kind, causal=False, num_classes=3, pool=pool, head_zero_init=False)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  mask = right_padding([LEN, 6])
  toks = tokens()
  other = jnp.where(mask, toks, (toks + 5) % VOCAB)  # different ids at the padded places
  a = model(toks, padding_mask_BL=mask, deterministic=True)
  b = model(other, padding_mask_BL=mask, deterministic=True)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  c = model(other, deterministic=True)  # the same change without the mask does matter
  assert not np.allclose(a[1], c[1], atol=1e-4)


# --- implementations agree ---------------------------------------------------------------------
def lm_loss_fn(cfg, toks, mask):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(toks, padding_mask_BL=mask, deterministic=True)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:])
    valid = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * valid) / jnp.sum(valid), logits

  return loss, params


def assert_same_loss_logits_grads(cfg_a, cfg_b, toks, mask, tol):
  results = []
  for cfg in (cfg_a, cfg_b):
    loss, params = lm_loss_fn(cfg, toks, mask)
    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results.append((value, jnp.where(mask[..., None], logits, 0.0), grads))
  (la, oa, ga), (lb, ob, gb) = results
  np.testing.assert_allclose(la, lb, rtol=tol, atol=tol)
  np.testing.assert_allclose(oa, ob, rtol=tol, atol=tol)
  chex.assert_trees_all_close(ga, gb, rtol=tol, atol=tol)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ga)) > 0


# Kind by kind, chunked == xla is attnlab.attention's own test; here: the model's plumbing
# (padding mask, causal flag, GQA, QK-norm, options) reaches both implementations alike.
@pytest.mark.parametrize("kind, extra", [
    ("sigmoid", {}), ("softmax", {}), ("softplus", {}),
    ("sigmoid", dict(learn_sigmoid_bias=True, max_len=LEN)),  # a traced [H] bias, with grads
], ids=["sigmoid", "softmax", "softplus", "sigmoid-learned-bias"])
def test_chunked_matches_xla_logits_and_grads(kind, extra):
  mask = right_padding([LEN, 7])
  assert_same_loss_logits_grads(
      lm_cfg(attention=kind, num_kv_heads=2, qk_norm="rms", **extra),
      lm_cfg(attention=kind, num_kv_heads=2, qk_norm="rms", attention_impl="chunked",
             attention_impl_options={"block_k": 4}, **extra),  # 10 keys: 2 blocks and a tail
      tokens(), mask, tol=2e-5)


def test_chunked_matches_xla_in_the_vit():
  def run(impl):
    cfg = vit_cfg(attention="sigmoid", attention_impl=impl, output_gate="headwise",
                  attention_impl_options={"block_k": 8} if impl == "chunked" else {})
    model = ViT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(images(), deterministic=True) ** 2)  # noqa
    return jax.jit(jax.value_and_grad(loss))(params)
  (la, ga), (lb, gb) = run("xla"), run("chunked")
  np.testing.assert_allclose(la, lb, rtol=2e-5)
  chex.assert_trees_all_close(ga, gb, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(importlib.util.find_spec("attnlab.kernels") is None,
                    reason="attnlab.kernels (the Pallas kernels) is not importable yet")
# Interpret mode is slow: sigmoid only (softmax: the kernel tests), with a fixed and a learned
# per-head bias (a traced [H] array through the kernel, with its gradient).
@pytest.mark.parametrize("learn_bias", [False, True], ids=["sigmoid", "sigmoid-learned-bias"])
def test_pallas_interpret_matches_xla_logits_and_grads(learn_bias):
  length = 16
  mask = jnp.arange(length)[None, :] < jnp.array([[length], [11]])
  small = dict(attention="sigmoid", depth=1, num_kv_heads=2)
  if learn_bias:
    small.update(learn_sigmoid_bias=True, max_len=length)
  assert_same_loss_logits_grads(
      lm_cfg(**small),
      lm_cfg(**small, attention_impl="pallas",
             attention_impl_options={"interpret": True, "block_q": 16, "block_k": 16}),
      tokens(2, length), mask, tol=1e-4)


# --- every kind trains, in both models ---------------------------------------------------------
def one_adamw_step(model, loss_of_model):
  """value_and_grad over the model's nnx.Param state and one optax AdamW update."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p: loss_of_model(nnx.merge(graphdef, p, rest))  # noqa: E731
  tx = optax.adamw(1e-3)

  @jax.jit
  def step(params):
    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return value, grads, loss(optax.apply_updates(params, updates))

  return step(params)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_one_step_in_both_models(kind):
  options = dict(attention=kind, qk_norm="rms", layer_scale=1e-4, output_gate="headwise",
                 num_kv_heads=2, depth=1)
  toks, mask = tokens(), right_padding([LEN, 7])

  def lm_loss(m):
    logits = m(toks, padding_mask_BL=mask, deterministic=True)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:])
    return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  vit = ViT(vit_cfg(**options, head_zero_init=True), rngs=nnx.Rngs(0))
  labels = jnp.array([1, 3])
  vit_loss = lambda m: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      m(images(), deterministic=True), labels))

  runs = [(vit, vit_loss)]
  if attention.KINDS[kind].supports_causal:
    runs.insert(0, (Transformer(lm_cfg(**options), rngs=nnx.Rngs(0)), lm_loss))
  else:  # soft: bidirectional only, so no language model (its config says so)
    with pytest.raises(ValueError, match=r"this kind is not causal"):
      lm_cfg(**options)
  for model, loss_of_model in runs:
    before, grads, after = one_adamw_step(model, loss_of_model)
    assert np.isfinite(before) and np.isfinite(after)
    chex.assert_tree_all_finite(grads)
    assert after < before, (type(model).__name__, before, after)
  np.testing.assert_allclose(vit_loss(vit), np.log(5), rtol=1e-6)  # zero head at init


# --- learned sigmoid bias ----------------------------------------------------------------------
def sigmoid_biases(tree) -> dict[tuple, jax.Array]:
  """The learned sigmoid biases (or their gradients) of a model's state, by path."""
  return {path: v[...] for path, v in nnx.to_flat_state(tree) if path[-1] == "sigmoid_bias"}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_learned_sigmoid_bias_in_the_vit_starts_at_the_default_and_trains(scan):
  x, labels = images(), jnp.array([1, 3])
  learned = ViT(vit_cfg(attention="sigmoid", learn_sigmoid_bias=True, scan_layers=scan),
                rngs=nnx.Rngs(0))
  fixed = ViT(vit_cfg(attention="sigmoid", scan_layers=scan), rngs=nnx.Rngs(0))
  tokens_per_image = 16 + 1  # 4x4 patches and the CLS token
  assert learned.cfg.sequence_length == tokens_per_image
  biases = sigmoid_biases(nnx.state(learned, nnx.Param))
  axes = logical_axes(learned)
  assert len(biases) == (1 if scan else 2)  # one per layer, or one stacked [depth, H]
  for path, b in biases.items():
    assert axes[path] == (("layers",) if scan else ()) + ("heads",)
    assert b.shape == ((2,) if scan else ()) + (4,)
    np.testing.assert_allclose(b, -np.log(tokens_per_image), rtol=1e-6)
  # At init: the fixed-default model (same weights otherwise, the bias draws no key).
  np.testing.assert_allclose(learned(x, deterministic=True), fixed(x, deterministic=True),
                             rtol=1e-6, atol=1e-6)
  loss = lambda m: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      m(x, deterministic=True), labels))
  before, grads, after = one_adamw_step(learned, loss)
  assert after < before
  for path, g in sigmoid_biases(grads).items():  # every layer's every head gets a gradient
    assert np.all(np.abs(np.asarray(g)) > 0), (path, g)


def test_learned_sigmoid_bias_in_the_lm_starts_at_minus_log_max_len():
  short = 6
  learned = Transformer(lm_cfg(attention="sigmoid", learn_sigmoid_bias=True, max_len=LEN),
                        rngs=nnx.Rngs(0))
  default = Transformer(lm_cfg(attention="sigmoid", max_len=LEN), rngs=nnx.Rngs(0))
  at_max_len = Transformer(lm_cfg(attention="sigmoid", max_len=LEN,
                                  attention_options={"sigmoid_bias": -float(np.log(LEN))}),
                           rngs=nnx.Rngs(0))
  # At L = max_len the default -log(L) is the learned init; on shorter inputs the learned
  # bias stays at -log(max_len) (Apple's fixed-length recipe), unlike the default.
  np.testing.assert_allclose(learned(tokens(), deterministic=True),
                             default(tokens(), deterministic=True), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(learned(tokens(2, short), deterministic=True),
                             at_max_len(tokens(2, short), deterministic=True),
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(learned(tokens(2, short), deterministic=True),
                         default(tokens(2, short), deterministic=True), atol=1e-5)


# --- jit, traces, vmap -------------------------------------------------------------------------
@pytest.mark.parametrize("transform", ["jax_jit_of_split_model", "nnx_jit_of_module"])
def test_jitted_forward_matches_eager(transform):
  """A compiled forward (fused, reordered by XLA) equals the op-by-op eager one.

  Two ways a trainer compiles the model: jax.jit of the pure function of its split
  state, and nnx.jit of the module itself (NNX's graph handling in the loop).
  """
  model = Transformer(lm_cfg(attention="sigmoid", positions="alibi"), rngs=nnx.Rngs(0))
  mask = right_padding([LEN, 4])
  eager = model(tokens(), padding_mask_BL=mask, deterministic=True)  # no jit: op by op
  if transform == "jax_jit_of_split_model":
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, padding_mask_BL=m,
                                                             deterministic=True))
    compiled = forward(state, tokens(), mask)
  else:
    forward = nnx.jit(lambda mod, t, m: mod(t, padding_mask_BL=m, deterministic=True))
    compiled = forward(model, tokens(), mask)
  assert not isinstance(eager, jax.core.Tracer)
  np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(eager))) > 1e-3  # not a trivially equal all-zero output


def test_one_trace_per_input_shape():
  model = ViT(vit_cfg(), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=2)
  def forward(state, x):
    return nnx.merge(graphdef, state)(x, deterministic=True)

  for x in (images(2, 0), images(2, 1), images(3, 0), images(3, 1)):  # two shapes, two values
    forward(state, x)
  with pytest.raises(AssertionError):  # a third shape would be a third trace
    forward(state, images(4, 0))


def test_vmapped_train_step_with_dropout_matches_a_loop():
  """A pure step (params, dropout key) -> (loss, grads) vmapped over seeds equals a loop."""
  cfg = vit_cfg(dropout_rate=0.2, attention="sigmoid", depth=1)
  x, labels = images(), jnp.array([0, 4])

  def init(seed):
    return nnx.split(ViT(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)

  def step(params, key):
    def loss(p):
      model = nnx.merge(graphdef, p, rest)
      logits = model(x, deterministic=False, rngs=nnx.Rngs(dropout=key))  # no state mutated
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return jax.value_and_grad(loss)(params)

  graphdef, p0, rest = init(0)
  _, p1, _ = init(1)
  keys = jax.random.split(jax.random.key(3), 2)
  stacked = jax.tree.map(lambda u, v: jnp.stack([u, v]), p0, p1)
  losses, grads = jax.jit(jax.vmap(step))(stacked, keys)
  step = jax.jit(step)
  for i, p in enumerate((p0, p1)):
    loss_i, grads_i = step(p, keys[i])
    np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
    # Gradients reach ~500 here; atol allows float32 cancellation at that scale.
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[i], grads), grads_i, rtol=1e-4,
                                atol=1e-3)
  assert abs(float(losses[0] - losses[1])) > 1e-6
  # Dropout is really on and keyed: another key, another loss; the same key, the same loss.
  assert abs(float(step(p0, keys[1])[0] - losses[0])) > 1e-6
  np.testing.assert_array_equal(step(p0, keys[0])[0], step(p0, keys[0])[0])


def test_dropout_is_random_in_training_and_off_in_eval():
  model = ViT(vit_cfg(dropout_rate=0.3), rngs=nnx.Rngs(params=0, dropout=1))
  x = images()
  np.testing.assert_array_equal(model(x, deterministic=True), model(x, deterministic=True))
  assert not np.allclose(model(x, deterministic=False), model(x, deterministic=False))
  model.eval()  # the flax idiom sets every Dropout's default
  np.testing.assert_array_equal(model(x), model(x, deterministic=True))


# --- attention maps ----------------------------------------------------------------------------
def test_attention_maps_from_the_same_pass():
  model = ViT(vit_cfg(attention="softmax"), rngs=nnx.Rngs(0))
  x = images()
  maps = attention_maps(model, x)
  assert len(maps) == 2
  chex.assert_shape(maps, (2, 4, 17, 17))  # 16 patches + CLS
  for w in maps:
    np.testing.assert_allclose(jnp.sum(w, axis=-1), 1.0, rtol=1e-5)
  logits, again = model(x, deterministic=True, return_attention_weights=True)
  np.testing.assert_allclose(logits, model(x, deterministic=True), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(list(again), maps)
  lm = Transformer(lm_cfg(attention="sigmoid"), rngs=nnx.Rngs(0))
  lm_maps = nnx.jit(attention_maps)(lm, tokens(), padding_mask_BL=right_padding([LEN, 5]))
  np.testing.assert_array_equal(np.triu(np.asarray(lm_maps[0]), k=1), 0.0)
  np.testing.assert_array_equal(np.asarray(lm_maps[1])[1, :, :, 5:], 0.0)


# --- dtypes ------------------------------------------------------------------------------------
def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = images()
  f32 = ViT(vit_cfg(attention="sigmoid"), rngs=nnx.Rngs(0))
  bf16 = ViT(vit_cfg(attention="sigmoid", dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
  out = bf16(x, deterministic=True)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, f32(x, deterministic=True), rtol=0.1, atol=0.1)


# --- position embeddings -----------------------------------------------------------------------
def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
  # 6 heads: the 4-head sequence, then every other slope of the 8-head one.
  np.testing.assert_allclose(alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                               2.0 ** -1, 2.0 ** -3])


def test_sincos2d_posemb():
  pe = posemb_sincos_2d(2, 3, 8)
  chex.assert_shape(pe, (6, 8))
  np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # position (0, 0)
  # Patch (y=1, x=2): sin(x * omega) with omega = [1, 1e-4].
  np.testing.assert_allclose(pe[5, :2], np.sin([2.0, 2e-4]), rtol=1e-5)
  np.testing.assert_allclose(pe[5, 4:6], np.sin([1.0, 1e-4]), rtol=1e-5)


# --- bad configs and inputs --------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: ViTConfig.from_variant("X/16", num_classes=10), r"ViTConfig\.variant="),
    (lambda: ViTConfig.from_variant("S/x", num_classes=10), r"ViTConfig\.variant="),
    (lambda: ViTConfig.from_variant("S/16", num_classes=10, image_size=100),
     r"ViTConfig\.patch_size="),
    (lambda: ViTConfig.from_variant("mu/2", num_classes=10, num_heads=3),
     r"ViTConfig\.num_heads="),
    (lambda: ViTConfig.from_variant("mu/2", num_classes=10, num_kv_heads=3),
     r"ViTConfig\.num_kv_heads="),
    (lambda: ViTConfig.from_variant("mu/2", num_classes=0), r"ViTConfig\.num_classes="),
    (lambda: ViTConfig.from_variant("mu/2", num_classes=2, pool="cls"), r"ViTConfig\.pool="),
    (lambda: ViTConfig.from_variant("mu/2", num_classes=2, posemb="rope"), r"ViTConfig\.posemb="),
    (lambda: lm_cfg(positions="alibi", attention="linear"),
     r"TransformerConfig\.positions=.*attention='linear'"),
    (lambda: lm_cfg(positions="alibi", attention_impl="pallas", attention="sigmoid"),
     r"TransformerConfig\.positions=.*pallas"),
    (lambda: lm_cfg(positions="learned"), r"TransformerConfig\.max_len="),
    (lambda: lm_cfg(attention="sigmoid", learn_sigmoid_bias=True), r"TransformerConfig\.max_len="),
    (lambda: vit_cfg(attention="relu", learn_sigmoid_bias=True),
     r"ViTConfig\.learn_sigmoid_bias=.*'relu'"),
    (lambda: lm_cfg(width=12, num_heads=4), r"TransformerConfig\.positions=.*even"),
    (lambda: lm_cfg(num_heads=5), r"TransformerConfig\.num_heads="),
    (lambda: lm_cfg(pool="max"), r"TransformerConfig\.pool="),
    (lambda: lm_cfg(vocab_size=0), r"TransformerConfig\.vocab_size="),
    (lambda: lm_cfg(attention="nope"), r"TransformerConfig\.attention="),
])
def test_bad_config_raises_naming_the_field(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_inputs_raise_clear_errors():
  vit = ViT(vit_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"images_BHWC must be \[batch, 8, 8, 3\]"):
    vit(jnp.ones((2, 16, 16, 3)))
  lm = Transformer(lm_cfg(positions="learned", max_len=4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="integer token ids"):
    lm(jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="max_len"):
    lm(tokens(2, 5))
  with pytest.raises(ValueError, match="padding_mask_BL must be bool"):
    lm(tokens(2, 4), padding_mask_BL=jnp.ones((2, 4), jnp.int32))
  with pytest.raises(TypeError, match="TransformerConfig"):
    Transformer(vit_cfg(), rngs=nnx.Rngs(0))
