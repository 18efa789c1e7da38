"""Least-squares fits of the students: Adam finds a basin, L-BFGS fits to convergence.

Full-batch mean squared error. `adam_steps` of Adam (on the first
`adam_examples` examples) pick a basin; L-BFGS (`lbfgs.minimize`) on all n
then fits, at most `lbfgs_steps` evaluations per round. A fit that has not met
the convergence test after a round is continued in the next, in a batch of
only the unconverged fits (`lbfgs_rounds` rounds in all); one still
unconverged after the last is reported as such (study.py leaves it out of
the rates and counts it). Every restart of every problem is fitted; the
restart with the lowest training loss is kept.

Fits run in float64 when `cfg.float64` (jax's x64 mode, switched on for the
fit only): the convergence test and the losses then measure the fit, not
float32 rounding (a relative change of 1e-6 over 50 evaluations is ~10
float32 ulps of the loss).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnlab.moe import lbfgs
from attnlab.moe import model
from attnlab.moe.config import MoEStudyConfig


def precision(cfg: MoEStudyConfig) -> contextlib.AbstractContextManager:
  """The context a fit runs in: jax's x64 mode when cfg.float64 (and nothing otherwise)."""
  return jax.enable_x64(True) if cfg.float64 else contextlib.nullcontext()


def fit_inputs(x: jax.Array, family: str) -> jax.Array:
  """What a fit evaluates the student on: the features (moe, computed once per data set) or X."""
  return x if family == "attention" else model.features(x)


def _student(params, inputs, gate: str, expert: str, family: str) -> jax.Array:
  if family == "attention":
    return model.predict(params, inputs, gate, expert, family)
  return model.mixture(params, inputs, gate, expert)


def _squared_error(inputs, y, gate: str, expert: str, family: str):
  return lambda p: jnp.mean((_student(p, inputs, gate, expert, family) - y) ** 2)


def _slice(inputs, m: int, family: str):
  """The first m examples of `fit_inputs` (examples last for moe features)."""
  return inputs[:m] if family == "attention" else inputs[:, :m]


def adam_then_lbfgs(params, inputs, y, *, cfg: MoEStudyConfig, gate: str, expert: str) -> lbfgs.Result:
  """One fit's first round: Adam on the first adam_examples examples, then L-BFGS on all."""
  n = y.shape[0]
  m = n if cfg.adam_examples == 0 else min(cfg.adam_examples, n)
  loss = _squared_error(inputs, y, gate, expert, cfg.family)
  adam_grad = jax.grad(_squared_error(_slice(inputs, m, cfg.family), y[:m], gate, expert, cfg.family))
  adam = optax.adam(cfg.learning_rate)

  def adam_step(carry, _):
    p, state = carry
    updates, state = adam.update(adam_grad(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  (p, _), _ = jax.lax.scan(adam_step, (params, adam.init(params)), None, length=cfg.adam_steps)
  if cfg.lbfgs_steps == 0:
    return lbfgs.Result(p, loss(p), jnp.zeros((), bool), jnp.zeros((), jnp.int32))
  return continue_lbfgs(p, inputs, y, cfg=cfg, gate=gate, expert=expert)


def continue_lbfgs(params, inputs, y, *, cfg: MoEStudyConfig, gate: str, expert: str) -> lbfgs.Result:
  """One round of L-BFGS from `params` (a fresh memory)."""
  loss = _squared_error(inputs, y, gate, expert, cfg.family)
  return lbfgs.minimize(jax.value_and_grad(loss), params, max_evaluations=cfg.lbfgs_steps,
                        tolerance=cfg.lbfgs_tolerance)


@functools.lru_cache(maxsize=None)
def _first_round(cfg: MoEStudyConfig, expert: str, gate: str):
  """jit: (params [P, R, ...], inputs [P, ...], y [P, n, ...]) -> Result [P, R]."""
  fit = functools.partial(adam_then_lbfgs, cfg=cfg, gate=gate, expert=expert)
  return jax.jit(jax.vmap(jax.vmap(fit, in_axes=(0, None, None))))


@functools.lru_cache(maxsize=None)
def _next_round(cfg: MoEStudyConfig, expert: str, gate: str):
  """jit: (params [M, ...], inputs [M, ...], y [M, ...]) -> Result [M], M fits each with its data."""
  return jax.jit(jax.vmap(functools.partial(continue_lbfgs, cfg=cfg, gate=gate, expert=expert)))


def fit_students(cfg: MoEStudyConfig, expert: str, gate: str, inits, x_P, y_P) -> dict[str, Any]:
  """Fits every restart of every problem; returns the best restart's fit per problem.

  Args:
    inits: initial parameters [P, R, ...] (P problems, R restarts).
    x_P, y_P: each problem's inputs and targets, [P, n, ...].

  Returns:
    NumPy arrays: "params" {name: [P, ...]}, "train_mse" [P], "converged" [P],
    "evaluations" [P] (L-BFGS evaluations over all rounds), "rounds" [P] (the
    rounds the kept fit took).
  """
  inputs_P = jax.vmap(lambda x: fit_inputs(x, cfg.family))(x_P)
  res = jax.device_get(_first_round(cfg, expert, gate)(inits, inputs_P, y_P))
  params = {k: np.array(v) for k, v in res.params.items()}
  value, converged = np.array(res.value), np.array(res.converged)
  evaluations = np.array(res.evaluations)
  rounds = np.ones_like(evaluations)
  for _ in range(1, cfg.lbfgs_rounds if cfg.lbfgs_steps else 1):
    todo = np.argwhere(~converged & np.isfinite(value))  # [M, 2]: (problem, restart)
    if not len(todo):
      break
    p_idx, r_idx = todo[:, 0], todo[:, 1]
    more = jax.device_get(_next_round(cfg, expert, gate)(
        {k: v[p_idx, r_idx] for k, v in params.items()}, inputs_P[p_idx], y_P[p_idx]))
    for k in params:
      params[k][p_idx, r_idx] = np.asarray(more.params[k])
    value[p_idx, r_idx] = np.asarray(more.value)
    converged[p_idx, r_idx] = np.asarray(more.converged)
    evaluations[p_idx, r_idx] += np.asarray(more.evaluations)
    rounds[p_idx, r_idx] += 1
  best = np.argmin(np.where(np.isfinite(value), value, np.inf), axis=1)
  rows = np.arange(len(best))
  return {"params": {k: v[rows, best] for k, v in params.items()},
          "train_mse": value[rows, best], "converged": converged[rows, best],
          "evaluations": evaluations[rows, best], "rounds": rounds[rows, best]}
