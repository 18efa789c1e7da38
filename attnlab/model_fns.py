"""The model's pure functions on a train state: init, apply, loss, train and eval steps.

`make_model_fns(model_cfg, optim_cfg, num_steps)` (memoised: `experiment_fns`)
builds them for a model config and an optimizer. All are pure and unjitted:
the caller picks jit, vmap and shardings (`attnlab.placement` for one run,
`attnlab.studies` for a stack of cells).

The train state is a plain pytree (`TrainState`): the model's parameters split
off its `nnx.GraphDef`, the optax state, the step and a PRNG key. Dropout keys
are derived from (key, step) inside the step and passed to the model at call
time, so the state holds no hidden RNG counters and a resumed run draws the
same masks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnlab import metrics as metrics_lib
from attnlab import models
from attnlab import optim

ModelConfig = models.ViTConfig | models.TransformerConfig

# optax.tree.norm (optax >= 0.2.5) is the global L2 norm; optax 0.2.8 deprecates
# optax.global_norm in its favour, and the floor (0.2.4) has only the latter.
# Both sum the squares leaf by leaf in tree order: the same numbers.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (vmap- and shard-able).

  Attributes:
    step: int32 [], number of updates applied.
    params: the model's nnx.Param state.
    opt_state: the optax state.
    rng: uint32 key data; dropout at step s uses fold_in(rng, s).
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelFns:
  """The model's static structure and the pure functions built on it.

  Attributes:
    graphdef: the model's structure, parameters split off.
    init: seed -> a fresh TrainState.
    apply: (params, inputs, deterministic=, rngs=) -> logits ([B, C] or [B, L, V]).
    loss: (params, batch, dropout_key) -> (mean training loss, weighted sums);
      dropout_key None: deterministic (no dropout).
    train_step: (state, batch, total_steps=None) -> (state, metrics): one
      optimizer update, at the learning rate of a run of `total_steps` steps
      (None: the experiment's budget). An `optim.Budget` of (traced) int arrays
      (from `budget`) gives each cell of a vmapped study the schedule of its own
      budget; the metrics hold the "learning_rate" used.
    budget: total steps (an int array, one per cell) -> their `optim.Budget`,
      computed on the host with the experiment's optimizer config.
    eval_step: (params, batch) -> weighted sums of the plain loss and accuracy.
    merge: params -> the nnx model (for diagnostics such as attention maps).
  """

  graphdef: nnx.GraphDef
  init: Callable[[jax.Array], TrainState]
  apply: Callable[..., jax.Array]
  loss: Callable[[nnx.State, dict, jax.Array | None], tuple[jax.Array, dict]]
  train_step: Callable[..., tuple[TrainState, dict]]
  eval_step: Callable[[nnx.State, dict], dict]
  merge: Callable[[nnx.State], nnx.Module]
  budget: Callable[[Any], optim.Budget]


def build_model(model_cfg: ModelConfig, key: jax.Array) -> nnx.Module:
  """The NNX model for `model_cfg`, its parameters and dropout streams seeded from `key`."""
  rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), dropout=jax.random.fold_in(key, 1))
  if isinstance(model_cfg, models.ViTConfig):
    return models.ViT(model_cfg, rngs=rngs)
  return models.Transformer(model_cfg, rngs=rngs)


def make_model_fns(model_cfg: ModelConfig, optim_cfg: optim.OptimConfig, num_steps: int, *,
                   label_smoothing: float = 0.0) -> ModelFns:
  """Builds the model's functions for a model config and optimizer.

  All of them are pure and unjitted: the caller picks jit / vmap / shardings.

  Args:
    model_cfg: the model.
    optim_cfg: the optimizer and its learning-rate schedule.
    num_steps: the budget whose schedule `train_step` follows by default.
    label_smoothing: of the training targets (see `TrainerConfig`).
  """
  tx = optim.make_optimizer(optim_cfg)
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, jax.random.key(0)))
  graphdef, _, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  _check_only_rng_state(abstract_rest)
  # The non-parameter state (if any) is the dropout streams the model was
  # built with. Every call below passes its own dropout key instead, so those
  # streams are never read or advanced: one concrete copy serves every state,
  # step and vmapped cell, and the train state holds parameters only.
  rest = jax.jit(lambda: nnx.split(build_model(model_cfg, jax.random.key(0)), nnx.Param, ...)[2])()

  def init(seed: jax.Array) -> TrainState:
    key = jax.random.key(seed)
    params = nnx.state(build_model(model_cfg, jax.random.fold_in(key, 0)), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  def merge(params: nnx.State) -> nnx.Module:
    # copy=True: fresh variables in the current trace, so that NNX never sees
    # a variable created at another trace level.
    return nnx.merge(graphdef, params, rest, copy=True)

  def apply(params: nnx.State, inputs: jax.Array, *, deterministic: bool, rngs=None) -> jax.Array:
    # Both model families take the inputs first.
    return merge(params)(inputs, deterministic=deterministic, rngs=rngs)

  def loss(params: nnx.State, batch: dict, dropout_key: jax.Array | None):
    deterministic = dropout_key is None
    logits = apply(params, batch["inputs"], deterministic=deterministic,
                   rngs=None if deterministic else nnx.Rngs(dropout=dropout_key))
    sums = metrics_lib.weighted_sums(logits, batch["targets"], batch["weights"],
                                     label_smoothing=label_smoothing)
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

  def train_step(state: TrainState, batch: dict,
                 total_steps: int | optim.Budget | None = None) -> tuple[TrainState, dict]:
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (mean_loss, sums), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch,
                                                                       dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    total = num_steps if total_steps is None else total_steps
    lr = optim.learning_rate(optim_cfg, state.step, total)
    params = optax.apply_updates(state.params, optim.scale_by_learning_rate(updates, lr))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    step_metrics = {
        "loss": mean_loss,
        "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
        "grad_norm": _global_norm(grads),
        "learning_rate": lr,
        "finite": jnp.isfinite(mean_loss) & _all_finite(params),
    }
    return new_state, step_metrics

  def eval_step(params: nnx.State, batch: dict) -> dict:
    logits = apply(params, batch["inputs"], deterministic=True)
    return metrics_lib.weighted_sums(logits, batch["targets"], batch["weights"])

  return ModelFns(graphdef=graphdef, init=init, apply=apply, loss=loss, train_step=train_step,
                  eval_step=eval_step, merge=merge,
                  budget=functools.partial(optim.budget, optim_cfg))


@functools.lru_cache(maxsize=8)
def experiment_fns(model_cfg: ModelConfig, optim_cfg: optim.OptimConfig, num_steps: int,
                   label_smoothing: float = 0.0) -> ModelFns:
  """`make_model_fns` with the experiment's optimizer, memoised.

  The same experiment in one process (train then evaluate, repeated runs in
  a notebook or tests) gets the same function objects, so jax.jit reuses the
  compiled executables instead of compiling again.
  """
  return make_model_fns(model_cfg, optim_cfg, num_steps, label_smoothing=label_smoothing)


def _check_only_rng_state(rest: nnx.State) -> None:
  for path, variable in nnx.to_flat_state(rest):
    if not isinstance(variable, nnx.RngState):
      raise NotImplementedError(
          f"The model has non-parameter state {'/'.join(map(str, path))} "
          f"({type(variable).__name__}); the train state carries parameters only."
      )


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))
