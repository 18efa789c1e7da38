"""Tests of attnlab.models.encoder: scan-over-layers and remat compute the unrolled stack's
function (values, gradients, dropout masks, attention maps), and really scan / remat."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab.models import (
    LAYERS_AXIS,
    Encoder,
    Transformer,
    TransformerConfig,
    ViT,
    ViTConfig,
    count_params,
    logical_axes,
)
from attnlab.models.config import BackboneConfig
from test_sharding import assert_close_to_scale  # tests/ is on the path (as in test_multiprocess)

pytestmark = pytest.mark.usefixtures("fast_xla_compile")  # tests/conftest.py

VOCAB, LEN, DEPTH = 11, 8, 2
# GQA, QK-norm and every dropout on: the plumbing a scan or a remat could get wrong.
COMMON = dict(width=16, depth=DEPTH, num_heads=4, num_kv_heads=2, mlp_dim=32, qk_norm="rms",
              dropout_rate=0.2, attention_dropout_rate=0.1)


def make_model(family: str, kind: str, **overrides) -> nnx.Module:
  fields = {**COMMON, "attention": kind, **overrides}
  if family == "vit":
    # A non-zero head, so the gradients reach every parameter.
    cfg = ViTConfig.from_variant("mu/2", num_classes=5, image_size=8, head_zero_init=False,
                                 **fields)
    return ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  cfg = TransformerConfig(vocab_size=VOCAB, max_len=LEN, positions="rope", **fields)
  return Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def model_inputs(family: str) -> tuple[jax.Array, dict]:
  if family == "vit":
    return jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), {}
  toks = jax.random.randint(jax.random.key(0), (2, LEN), 0, VOCAB)
  return toks, {"padding_mask_BL": jnp.arange(LEN)[None, :] < jnp.array([[LEN], [5]])}


def restack_blocks(unrolled: dict) -> dict:
  """A pure state dict of the unrolled model with its blocks stacked as `scan_layers` holds them."""
  blocks = unrolled["encoder"]["blocks"]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[i] for i in range(len(blocks))))
  return {**unrolled, "encoder": {**unrolled["encoder"], "blocks": stacked}}


def scanned_copy(family: str, kind: str, unrolled: nnx.Module, **overrides) -> nnx.Module:
  """A scan_layers model holding the unrolled model's parameters and dropout streams."""
  model = make_model(family, kind, scan_layers=True, **overrides)
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, restack_blocks(nnx.to_pure_dict(nnx.state(unrolled))))
  nnx.update(model, state)
  return model


def loss_and_grads(model: nnx.Module, inputs, kwargs, *, key, deterministic: bool):
  """Jitted mean-square loss of the logits and its gradients w.r.t. every parameter."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    # copy=True: fresh variables in this trace (the scan updates the blocks' RNG state).
    m = nnx.merge(graphdef, p, rest, copy=True)
    logits = m(inputs, deterministic=deterministic, rngs=nnx.Rngs(dropout=key), **kwargs)
    return jnp.mean(logits ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, nnx.to_pure_dict(grads)


def assert_close_trees(a, b, tol):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def assert_trees_close_to_scale(a, b, tol):
  """`test_sharding.assert_close_to_scale` leaf by leaf: |a - b| <= tol x the leaf's max |b|.

  Gradients are sums whose terms reach the leaf's scale; an element that cancels
  to a small value keeps the absolute rounding of those terms. The jax 0.10.2 floor
  (CI stage 2) summed one ViT `cls` element, 19119 in a leaf of scale 6.9e5, 0.27
  apart between scan and loop: 1.4e-5 of the element, 3.9e-7 of the scale. A layer's
  gradient lost or misplaced by the scan moves elements by the scale itself.
  """
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert_close_to_scale(x, y, tol)


# --- scan == unrolled ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "lm"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_scan_computes_the_unrolled_function_values_grads_and_dropout(family, kind):
  """Dropout on, same key: the same masks in both layouts, so the same loss and gradients.

  (Deterministic agreement: `test_scan_returns_one_attention_map_per_layer`.)
  """
  unrolled = make_model(family, kind)
  scanned = scanned_copy(family, kind, unrolled)
  inputs, kwargs = model_inputs(family)
  key = jax.random.key(7)
  la, ga = loss_and_grads(unrolled, inputs, kwargs, key=key, deterministic=False)
  lb, gb = loss_and_grads(scanned, inputs, kwargs, key=key, deterministic=False)
  np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
  # The scanned gradients come stacked: restack the unrolled ones to compare leaf by leaf.
  assert_trees_close_to_scale(gb, restack_blocks(ga), 1e-5)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ga)) > 1e-3
  # Dropout really was on: without it the loss differs.
  det = jnp.mean(unrolled(inputs, deterministic=True, **kwargs) ** 2)
  assert abs(float(la - det)) > 1e-6


@pytest.mark.parametrize("family", ["vit", "lm"])
def test_scan_returns_one_attention_map_per_layer(family):
  unrolled = make_model(family, "sigmoid")
  scanned = scanned_copy(family, "sigmoid", unrolled)
  inputs, kwargs = model_inputs(family)
  logits_a, maps_a = unrolled(inputs, deterministic=True, return_attention_weights=True, **kwargs)
  logits_b, maps_b = scanned(inputs, deterministic=True, return_attention_weights=True, **kwargs)
  assert isinstance(maps_b, tuple) and len(maps_b) == DEPTH
  assert_close_trees(maps_b, maps_a, 1e-5)
  np.testing.assert_allclose(logits_b, logits_a, rtol=1e-5, atol=1e-6)
  # The layers differ (a stacked map sliced wrongly would repeat one layer).
  assert not np.allclose(maps_b[0], maps_b[1], atol=1e-4)


def test_scan_draws_a_new_dropout_key_per_layer_like_the_loop():
  """A call's stream advances once per dropout draw, through the scan as through the loop.

  Keys are fold_in(key, count), so distinct counts are distinct masks per layer; a scan
  that broadcast the stream instead of carrying it would stop at one block's count.
  """
  counts = {}
  for scan in (False, True):
    model = make_model("vit", "softmax", scan_layers=scan)
    rngs = nnx.Rngs(dropout=3)
    model(model_inputs("vit")[0], deterministic=False, rngs=rngs)
    counts[scan] = int(rngs.dropout.count[...])
  # Embedding dropout, then per block: attention weights, MLP hidden, two residual branches.
  assert counts[False] == counts[True] == 1 + 4 * DEPTH


def test_scan_with_the_models_own_dropout_streams():
  """rngs=None: each stacked block draws from its own stream, as each unrolled block does."""
  unrolled = make_model("vit", "sigmoid")
  scanned = scanned_copy("vit", "sigmoid", unrolled)
  x, _ = model_inputs("vit")
  np.testing.assert_allclose(scanned(x, deterministic=False), unrolled(x, deterministic=False),
                             rtol=1e-5, atol=1e-6)
  # Every layer's stream has its own key, and the counts advanced in place.
  fresh = make_model("vit", "sigmoid", scan_layers=True)
  keys = jax.random.key_data(fresh.encoder.blocks.dropout.rngs.key[...])
  assert len({tuple(np.asarray(k).ravel()) for k in keys}) == DEPTH
  np.testing.assert_array_equal(scanned.encoder.blocks.dropout.rngs.count[...],
                                unrolled.encoder.blocks[0].dropout.rngs.count[...])
  scanned.eval()  # the flax idiom reaches the stacked block's Dropout modules too
  np.testing.assert_array_equal(scanned(x), scanned(x, deterministic=True))


# --- remat == plain -----------------------------------------------------------------------------
def remat_name() -> str:
  """The name jax gives its rematerialisation primitive ("checkpoint" / "remat2" by version)."""
  return jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name


@pytest.mark.parametrize("family, kind, scan", [
    ("vit", "sigmoid", False), ("lm", "softmax", False), ("lm", "sigmoid", True)])
def test_remat_keeps_values_and_grads_and_rematerialises_each_block(family, kind, scan):
  plain = make_model(family, kind)
  remat = make_model(family, kind, remat=True)
  # Same seed, same construction: the same weights (remat only changes the backward pass).
  assert_close_trees(nnx.to_pure_dict(nnx.state(remat, nnx.Param)),
                    nnx.to_pure_dict(nnx.state(plain, nnx.Param)), 0)
  if scan:
    remat = scanned_copy(family, kind, plain, remat=True)
  inputs, kwargs = model_inputs(family)
  key = jax.random.key(5)
  la, ga = loss_and_grads(plain, inputs, kwargs, key=key, deterministic=False)
  lb, gb = loss_and_grads(remat, inputs, kwargs, key=key, deterministic=False)
  np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
  assert_close_trees(gb, restack_blocks(ga) if scan else ga, 1e-5)

  def grad_jaxpr(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest, copy=True)(  # noqa: E731
        inputs, deterministic=True, **kwargs) ** 2)
    return str(jax.make_jaxpr(jax.grad(loss))(params))

  # One rematerialised call per block (one in the scan body): the flag really is in effect.
  marker = remat_name() + "["
  assert grad_jaxpr(remat).count(marker) == (1 if scan else DEPTH)
  assert grad_jaxpr(plain).count(marker) == 0


# --- scan compiles one block --------------------------------------------------------------------
def test_scanned_program_does_not_grow_with_depth():
  """Tracing cost check: the jaxpr holds one block under scan, `depth` blocks unrolled."""
  def matmuls(depth: int, scan: bool) -> int:
    cfg = BackboneConfig(width=16, depth=depth, num_heads=4, scan_layers=scan)
    enc = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(enc)
    fwd = lambda s, x: nnx.merge(graphdef, s)(x, deterministic=True)[0]  # noqa: E731
    jaxpr = jax.make_jaxpr(fwd)(state, jax.ShapeDtypeStruct((1, 4, 16), jnp.float32))
    return str(jaxpr).count("dot_general")

  assert matmuls(2, scan=True) == matmuls(6, scan=True)
  assert matmuls(6, scan=False) == 3 * matmuls(2, scan=False)  # the measure sees depth
  assert matmuls(6, scan=True) < matmuls(6, scan=False)


# --- axis names and sizes -----------------------------------------------------------------------
def test_scanned_parameters_carry_a_layers_axis_name():
  cfg = ViTConfig.from_variant("Ti/16", num_classes=10, scan_layers=True, layer_scale=1e-4,
                               output_gate="headwise")
  model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
  unrolled = nnx.eval_shape(lambda: ViT(ViTConfig.from_variant("Ti/16", num_classes=10,
                                                               layer_scale=1e-4,
                                                               output_gate="headwise"),
                                        rngs=nnx.Rngs(0)))
  assert count_params(model) == count_params(unrolled)
  axes = logical_axes(model)
  shapes = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  block_paths = [p for p in axes if p[:2] == ("encoder", "blocks")]
  assert len(block_paths) == len([p for p in logical_axes(unrolled)
                                  if p[:3] == ("encoder", "blocks", 0)])
  for path in block_paths:
    assert axes[path][0] == LAYERS_AXIS and shapes[path][0] == 12, (path, axes[path])
    assert len(axes[path]) == len(shapes[path])
  assert axes[("encoder", "blocks", "attn", "query", "kernel")] == (
      "layers", "embed", "heads", "head_dim")
  assert axes[("encoder", "blocks", "attn_scale")] == ("layers", "embed")
  with nn.logical_axis_rules([("layers", None), ("mlp", "model"), ("embed", None)]):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["encoder"]["blocks"]["mlp"]["fc_in"]["kernel"].get_value() == \
      jax.sharding.PartitionSpec(None, None, "model")


def test_scan_and_remat_train_one_step():
  model = make_model("lm", "sigmoid", scan_layers=True, remat=True)
  toks, kwargs = model_inputs("lm")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-2)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest, copy=True)(toks, deterministic=True, **kwargs)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:]))

  before, grads = jax.jit(jax.value_and_grad(loss))(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  after = jax.jit(loss)(optax.apply_updates(params, updates))
  assert after < before
