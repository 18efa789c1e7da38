"""Optimizer and learning-rate schedule from `config.optim`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup and decay, gradient clipping and masked weight decay.

  Attributes:
    learning_rate: peak learning rate (reached at the end of warmup).
    schedule: decay after warmup: "cosine" | "linear" | "constant".
    warmup_steps: linear warmup from 0; None: warmup_fraction of the run.
    warmup_fraction: warmup as a fraction of the total steps (so a budget
      sweep keeps the same shape of schedule).
    end_learning_rate_fraction: final learning rate / peak.
    b1, b2, eps: Adam moments.
    weight_decay: decoupled weight decay (AdamW; multiplied by the learning
      rate, as in optax), applied to matmul kernels only (see `decay_mask`).
    grad_clip_norm: clip the global gradient norm to this; None: no clipping.
  """

  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int | None = None
  warmup_fraction: float = 0.05
  end_learning_rate_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4
  grad_clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"config.optim.schedule={self.schedule!r}: expected one of {SCHEDULES}.")
    if not 0.0 <= self.warmup_fraction <= 1.0:
      raise ValueError(f"config.optim.warmup_fraction={self.warmup_fraction}: expected in [0, 1].")
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      raise ValueError(f"config.optim.grad_clip_norm={self.grad_clip_norm}: expected > 0 or None.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Budget:
  """A run's budget in steps and its warmup, as the train step takes them for a study's cells.

  Both are known on the host before training (`budget`); carried as (traced) int arrays,
  one entry per cell of a vmapped study, so cells of different budgets share one step
  function and the warmup's rounding is Python's, not the device's.
  """
  total_steps: ArrayLike
  warmup_steps: ArrayLike

  def at(self, i: int) -> Budget:
    """Cell i's budget, of a budget with one entry per cell."""
    return Budget(self.total_steps[i], self.warmup_steps[i])


def budget(cfg: OptimConfig, total_steps: ArrayLike) -> Budget:
  """The budgets of runs of `total_steps` steps (an int or an int array), on the host.

  The warmup is min(warmup_steps or round(warmup_fraction * total_steps), total_steps),
  rounded in float64 half to even as Python's `round` does (at nominal ties, such as
  0.15 * 190 = 28.5, float32 arithmetic on the device would round the other way).
  """
  total = np.asarray(total_steps)
  if not np.issubdtype(total.dtype, np.integer):
    raise TypeError(f"total_steps must be ints (steps); got {total.dtype} {total_steps!r}.")
  if cfg.warmup_steps is not None:
    warmup = np.minimum(cfg.warmup_steps, total)
  else:
    warmup = np.minimum(np.round(cfg.warmup_fraction * total.astype(np.float64)), total)
  return Budget(total, warmup.astype(total.dtype))


def learning_rate(cfg: OptimConfig, step: ArrayLike, total_steps: int | Budget) -> jax.Array:
  """Linear warmup to cfg.learning_rate, then cfg.schedule down to the end value.

  `step` may be a Python int or a (traced) int array. `total_steps` is a Python int (a
  single run: the schedule's constants are then folded into the step) or a `Budget` of
  (traced) arrays from `budget`, e.g. one per cell of a vmapped study, so that cells of
  different budgets train in one step function. The arithmetic is optax's own, op for
  op (`join_schedules` of `linear_schedule` warmup and `cosine_decay_schedule` /
  `linear_schedule` / `constant_schedule` decay), so a run gets the float32 learning
  rates that those schedules gave (tests check every step).

  A traced budget can differ from a Python int one in the last bit: XLA turns a
  division by a compile-time constant into a multiplication by its float32 reciprocal,
  while a traced total divides at run time.

  Args:
    cfg: the optimizer config.
    step: updates applied so far (the schedule's count).
    total_steps: the run's budget in steps (>= 1), or its `Budget`.

  Returns:
    The float32 learning rate at `step`.
  """
  if not isinstance(total_steps, Budget):
    if not isinstance(total_steps, (int, np.integer)):
      raise TypeError(f"total_steps must be a Python int or an optim.Budget (per-cell arrays "
                      f"from optim.budget(cfg, totals), computed on the host); got "
                      f"{type(total_steps).__name__}.")
    total_steps = Budget(int(total_steps), int(budget(cfg, int(total_steps)).warmup_steps))
  total, warmup = total_steps.total_steps, total_steps.warmup_steps
  decay_steps = jnp.maximum(total - warmup, 1)
  peak = cfg.learning_rate
  # Warmup: optax.linear_schedule(0.0, peak, warmup). For warmup 0 its 0/0 is
  # never selected below (step >= 0), as join_schedules then drops it.
  frac = 1 - jnp.clip(step, 0, warmup) / warmup
  warming = (0.0 - peak) * frac + peak
  decaying = _DECAYS[cfg.schedule](cfg, step - warmup, decay_steps)
  return jnp.where(step < warmup, warming, decaying).astype(jnp.float32)


def _cosine_decay(cfg: OptimConfig, count: jax.Array, decay_steps: ArrayLike) -> jax.Array:
  """optax.cosine_decay_schedule(peak, decay_steps, alpha=end fraction)."""
  alpha = cfg.end_learning_rate_fraction
  # optax turns an int decay_steps into a float before the ops below; the
  # same float32 for a traced one (exact below 2**24 steps).
  decay_steps = jnp.asarray(decay_steps, jnp.float32)
  count = jnp.minimum(count, decay_steps)
  cosine = 0.5 * (1 + jnp.cos(jnp.pi * count / decay_steps))
  # optax's `cosine ** exponent` (exponent 1.0) is left out: XLA folds x**1 to x.
  return cfg.learning_rate * ((1 - alpha) * cosine + alpha)


def _linear_decay(cfg: OptimConfig, count: jax.Array, decay_steps: ArrayLike) -> jax.Array:
  """optax.linear_schedule(peak, end, decay_steps)."""
  peak = cfg.learning_rate
  end = peak * cfg.end_learning_rate_fraction
  frac = 1 - jnp.clip(count, 0, decay_steps) / decay_steps
  # (peak - end) is a Python float, rounded once to float32, as in optax.
  return (peak - end) * frac + end


def _constant(cfg: OptimConfig, count: jax.Array, decay_steps: ArrayLike) -> jax.Array:
  del count, decay_steps
  return jnp.asarray(cfg.learning_rate, jnp.float32)


_DECAYS = {"cosine": _cosine_decay, "linear": _linear_decay, "constant": _constant}


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """`learning_rate` of a fixed budget as an optax schedule (step -> rate), for logging."""
  return functools.partial(learning_rate, cfg, total_steps=total_steps)


def decay_mask(params):
  """True for the parameters weight decay applies to: matmul kernels.

  Following big_vision, only "kernel" leaves (dense, einsum and patch
  projections) decay. Not biases and norm scales (decaying them only fights the
  normalisation), nor embeddings, position embeddings, CLS tokens or
  LayerScale: they are lookup tables / per-channel gains with no fan-in, and
  pulling them toward zero biases the model toward ignoring position and rare
  tokens rather than regularising a function.
  """

  def is_kernel(path, leaf) -> bool:
    # The last dict key names the variable (nnx.State paths end in `.value`).
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return bool(names) and names[-1] == "kernel" and len(getattr(leaf, "shape", ())) >= 2

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """optax.adamw's chain without its learning rate, after optional gradient clipping.

  The caller multiplies the updates by `-learning_rate(cfg, step, total)`
  (`scale_by_learning_rate`), so the budget is an argument of the step, not
  a constant of the optimizer, and one optimizer serves cells of different
  budgets. Clipping, Adam and masked weight decay are optax.adamw's own
  transformations in its order, so the numbers are those of optax.adamw.
  """
  clip = [] if cfg.grad_clip_norm is None else [optax.clip_by_global_norm(cfg.grad_clip_norm)]
  return optax.chain(
      *clip,
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
  )


def scale_by_learning_rate(updates, lr: jax.Array):
  """`updates` times -lr, leaf by leaf: optax.scale_by_learning_rate's own ops."""
  return jax.tree.map(lambda u: jnp.array(-lr, dtype=u.dtype) * u, updates)
