"""Tests of attnlab.optim: schedule shape and its identity with optax's, weight-decay mask,
clipping, and the train step's per-call (per-cell under vmap) budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab import model_fns
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
  tx = optim.make_optimizer(cfg)
  params = {"w": {"kernel": jnp.zeros((2, 2))}}
  grads = {"w": {"kernel": jnp.full((2, 2), 100.0)}}  # global norm 200
  _, state = tx.update(grads, tx.init(params), params)
  mu = optax.tree_utils.tree_get(state, "mu")  # (1 - b1) * clipped gradient
  np.testing.assert_allclose(jnp.linalg.norm(mu["w"]["kernel"]), 0.1, rtol=1e-5)
  unclipped = optim.make_optimizer(optim.OptimConfig(grad_clip_norm=None))
  _, state = unclipped.update(grads, unclipped.init(params), params)
  np.testing.assert_allclose(jnp.linalg.norm(optax.tree_utils.tree_get(state, "mu")["w"]["kernel"]),
                             20.0, rtol=1e-5)


# ----------------------------------------------------------------------------
# learning_rate is optax's schedule, with the budget a (traced) argument
# ----------------------------------------------------------------------------


def optax_schedule(cfg: optim.OptimConfig, total_steps: int) -> optax.Schedule:
  """The optax-built schedule that `optim.learning_rate` replaced (the reference)."""
  warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_fraction * total_steps)
  warmup = min(int(warmup), total_steps)
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_fraction
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_fraction)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


SCHEDULE_CASES = [
    dict(schedule=s, warmup_steps=w, end_learning_rate_fraction=e, learning_rate=3e-3)
    for s in optim.SCHEDULES for w in (None, 0, 5) for e in (0.0, 0.1)
] + [dict(warmup_fraction=0.15, learning_rate=1e-3),  # 0.15 * 190: a float64 tie
     dict(warmup_fraction=1.0, schedule="linear")]


@pytest.mark.parametrize("fields", SCHEDULE_CASES)
def test_learning_rate_is_the_optax_schedule_bit_for_bit(fields):
  cfg = optim.OptimConfig(**fields)
  # In the train step both the step and (for a vmapped study) the total are
  # traced int32; a single run's total is a Python int closed over.
  traced = jax.jit(jax.vmap(lambda s, t: optim.learning_rate(cfg, s, t), in_axes=(0, None)))
  budget = lambda total: optim.budget(cfg, np.int32(total))  # noqa: E731
  for total in (1, 2, 7, 100, 190, 1172):
    steps = jnp.arange(total + 3, dtype=jnp.int32)
    want = np.asarray(jax.jit(jax.vmap(optax_schedule(cfg, total)))(steps), np.float32)
    closed = jax.jit(jax.vmap(lambda s, t=total: optim.learning_rate(cfg, s, t)))(steps)
    np.testing.assert_array_equal(np.asarray(closed), want, err_msg=f"total={total}")
    # XLA turns a division by a compile-time constant (the closed-over
    # total) into a multiplication by its float32 reciprocal; a traced total
    # divides at run time, so step / total may differ in the last bit (and
    # 1 + cos(pi * step / total) near the end of a cosine carries it over).
    np.testing.assert_allclose(traced(steps, budget(total)), want, rtol=0,
                               atol=4e-7 * cfg.learning_rate, err_msg=f"traced total={total}")
    # Eagerly (op by op, no constant folding) too.
    assert optim.make_schedule(cfg, total)(steps[-1]) == optax_schedule(cfg, total)(steps[-1])


def test_host_budgets_round_the_warmup_like_python():
  cfg = optim.OptimConfig(warmup_fraction=0.15)
  totals = np.array([190, 350, 10, 1172, 3], np.int32)
  budgets = optim.budget(cfg, totals)
  assert budgets.warmup_steps.dtype == np.int32
  # 0.15 * 190 = 28.5 in float64: Python rounds to 28, float32 arithmetic would give 29.
  np.testing.assert_array_equal(budgets.warmup_steps, [28, 52, 2, 176, 0])
  np.testing.assert_array_equal(budgets.warmup_steps, [round(0.15 * int(t)) for t in totals])
  np.testing.assert_array_equal(budgets.total_steps, totals)
  fixed = optim.budget(optim.OptimConfig(warmup_steps=5), totals)
  np.testing.assert_array_equal(fixed.warmup_steps, [5, 5, 5, 5, 3])  # never past the total
  assert fixed.at(4) == optim.Budget(3, 3)


def test_no_host_callback_in_the_step_and_traced_totals_need_a_budget():
  """The per-cell warmup arrives computed; the step program calls nothing on the host."""
  cfg = optim.OptimConfig(warmup_fraction=0.15)
  jaxpr = jax.make_jaxpr(lambda s, b: optim.learning_rate(cfg, s, b))(
      jnp.int32(3), optim.budget(cfg, np.array([190, 10], np.int32)))
  assert "callback" not in str(jaxpr)
  with pytest.raises(TypeError, match=r"total_steps must be a Python int or an optim\.Budget "
                                      r"\(per-cell arrays from optim\.budget"):
    jax.jit(lambda s, t: optim.learning_rate(cfg, s, t))(jnp.int32(3), jnp.int32(190))
  with pytest.raises(TypeError, match=r"total_steps must be ints"):
    optim.budget(cfg, 190.0)


# ----------------------------------------------------------------------------
# train_step: the budget per call, and per cell under vmap
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_fns():
  cfg = models.ViTConfig.from_variant("mu/4", num_classes=10, image_size=8, num_channels=1,
                                      depth=1)
  fns = model_fns.make_model_fns(cfg, optim.OptimConfig(learning_rate=1e-2, warmup_steps=2),
                                  num_steps=10)
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32),
           "targets": jnp.asarray([0, 3, 5, 9], jnp.int32),
           "weights": jnp.ones((4,), jnp.float32)}
  state = jax.jit(fns.init)(0)
  for _ in range(3):  # past warmup, so that the budgets' schedules differ
    state, _ = jax.jit(fns.train_step)(state, batch)
  return fns, state, batch


def test_vmapped_cells_follow_their_own_budgets(tiny_fns):
  fns, state, batch = tiny_fns
  totals = fns.budget(np.array([10, 20], np.int32))
  stack = lambda *xs: jnp.stack(xs)  # noqa: E731
  batched = jax.jit(jax.vmap(fns.train_step))(jax.tree.map(stack, state, state),
                                              jax.tree.map(stack, batch, batch), totals)
  step = jax.jit(fns.train_step)
  singles = [step(state, batch, totals.at(i)) for i in range(2)]
  for i, single in enumerate(singles):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x[i], y, rtol=1e-6, atol=1e-7),
                 batched, single)
  lrs = [float(single[1]["learning_rate"]) for single in singles]
  assert lrs[0] < lrs[1]  # the shorter budget has decayed further


def test_train_step_defaults_to_the_experiment_budget(tiny_fns):
  fns, state, batch = tiny_fns
  step = jax.jit(fns.train_step)
  default = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, default,
               jax.jit(lambda s, b: fns.train_step(s, b, 10))(state, batch))
  # A traced 10 divides at run time (see the schedule test): equal to a float32 ulp.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               default, step(state, batch, fns.budget(np.int32(10))))
  other = step(state, batch, fns.budget(np.int32(20)))
  assert float(other[1]["learning_rate"]) != float(default[1]["learning_rate"])
