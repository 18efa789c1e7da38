"""Tests of attnlab.optim: schedule shape, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab import models
from attnlab import optim


def test_warmup_then_cosine_to_the_end_value():
  cfg = optim.OptimConfig(learning_rate=1.0, warmup_steps=10, end_learning_rate_fraction=0.1)
  schedule = optim.make_schedule(cfg, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.55, abs=1e-6)  # half way down the cosine
  assert float(schedule(110)) == pytest.approx(0.1, abs=1e-6)


def test_warmup_fraction_scales_with_the_budget():
  schedule = optim.make_schedule(optim.OptimConfig(learning_rate=2.0, warmup_fraction=0.1), 200)
  assert float(schedule(10)) == pytest.approx(1.0) and float(schedule(20)) == pytest.approx(2.0)


def test_weight_decay_applies_to_matmul_kernels_only():
  cfg = models.ViTConfig.from_variant("mu/4", num_classes=10, image_size=8, num_channels=1,
                                      depth=1, qk_norm="rms", layer_scale=1e-4)
  params = nnx.state(nnx.eval_shape(lambda: models.ViT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  mask = {jax.tree_util.keystr(path): bool(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))}
  decayed = {k for k, v in mask.items() if v}
  assert decayed and all("kernel" in k for k in decayed)
  assert any("['attn']['query']['kernel']" in k for k in decayed)
  for never in ("bias", "scale", "pos_embedding", "cls", "q_norm"):
    assert not any(never in k for k in decayed), never


def test_gradients_are_clipped_before_adam_sees_them():
  cfg = optim.OptimConfig(grad_clip_norm=1.0, b1=0.9)
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {"w": {"kernel": jnp.zeros((2, 2))}}
  grads = {"w": {"kernel": jnp.full((2, 2), 100.0)}}  # global norm 200
  _, state = tx.update(grads, tx.init(params), params)
  mu = optax.tree_utils.tree_get(state, "mu")  # (1 - b1) * clipped gradient
  np.testing.assert_allclose(jnp.linalg.norm(mu["w"]["kernel"]), 0.1, rtol=1e-5)
  unclipped, _ = optim.make_optimizer(optim.OptimConfig(grad_clip_norm=None), total_steps=10)
  _, state = unclipped.update(grads, unclipped.init(params), params)
  np.testing.assert_allclose(jnp.linalg.norm(optax.tree_utils.tree_get(state, "mu")["w"]["kernel"]),
                             20.0, rtol=1e-5)
