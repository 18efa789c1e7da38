"""Optimizer and learning-rate schedule from `config.optim`."""

from __future__ import annotations

import dataclasses

import jax
import optax

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


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to cfg.learning_rate, then cfg.schedule down to the end value."""
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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation and its learning-rate schedule (for logging)."""
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.grad_clip_norm is None:
    return adamw, schedule
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw), schedule
