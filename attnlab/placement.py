"""A run's state and batches on the devices of its mesh, and the jitted steps that keep them there.

  1. `abstract_state` (shapes from `jax.eval_shape`, nothing allocated),
     `shardings` (the config's mesh and sharding rules: `attnlab.sharding`),
     then `create_state` makes each array directly where its sharding puts it;
  2. `jit_train_step` / `jit_eval_step` keep them there;
  3. `evaluate_params`: loss and accuracy of parameters on a whole split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grain.python as grain
import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import data as data_lib
from attnlab import experiment
from attnlab import metrics as metrics_lib
from attnlab import sharding as sharding_lib
from attnlab.model_fns import ModelFns
from attnlab.model_fns import TrainState


def shardings(trainer: experiment.TrainerConfig, abstract_state: TrainState, *,
              batch_fields: Iterable[str] = ("batch_size", "eval_batch_size"),
              devices: Iterable[jax.Device] | None = None) -> sharding_lib.Shardings:
  """Where the state and batches of a run live: the trainer's mesh and sharding rules.

  Args:
    trainer: its `mesh` and `sharding_rules` (see `attnlab.sharding`).
    abstract_state: the state's shapes (`abstract_state`: nothing allocated).
    batch_fields: the trainer fields whose batch sizes must split over the
      data axes (evaluation alone checks only "eval_batch_size").
    devices: the mesh's devices; None: every device.

  Raises:
    configlib.ConfigError: a mesh that does not fit the devices, a batch
      size that does not split, or a parameter that its rule cannot split.
  """
  mesh = sharding_lib.make_mesh(trainer.mesh, devices)
  return sharding_lib.Shardings.create(
      abstract_state, mesh, trainer.sharding_rules,
      batch_sizes={f"config.{f}": getattr(trainer, f) for f in batch_fields})


def abstract_state(fns: ModelFns, seed: int) -> TrainState:
  """The train state's shapes and dtypes (jax.ShapeDtypeStruct leaves; nothing allocated)."""
  return jax.eval_shape(fns.init, seed)


def create_state(fns: ModelFns, seed: int, shard: sharding_lib.Shardings) -> TrainState:
  """A fresh train state, each array created directly where `shard` puts it."""
  return jax.jit(fns.init, out_shardings=shard.state)(seed)


def jit_train_step(fns: ModelFns, shard: sharding_lib.Shardings) -> Callable[..., tuple]:
  """`fns.train_step` jitted for a state and batches placed by `shard`, the state donated.

  The state comes back with the same shardings (FSDP's stay split); the
  metrics are replicated. Traced with the mesh in context, so the fused
  kernel runs per shard (`sharding.under_mesh`).
  """
  return jax.jit(sharding_lib.under_mesh(fns.train_step, shard.mesh), donate_argnums=0,
                 in_shardings=(shard.state, shard.batch), out_shardings=(shard.state, None))


def jit_eval_step(fns: ModelFns, shard: sharding_lib.Shardings
                  ) -> Callable[[nnx.State, dict], dict]:
  """`fns.eval_step` jitted for parameters and batches placed by `shard` (mesh in context)."""
  return jax.jit(sharding_lib.under_mesh(fns.eval_step, shard.mesh),
                 in_shardings=(shard.state.params, shard.batch))


def evaluate_params(eval_step: Callable[[nnx.State, dict], dict], params: nnx.State,
                    dataset: grain.MapDataset, *, batch_size: int,
                    batch_sharding: jax.sharding.Sharding | None = None) -> dict[str, float]:
  """Loss and accuracy of `params` on the whole of `dataset` (e.g. `exp.datasets.eval`).

  Args:
    eval_step: `fns.eval_step`, jitted or not (`jit_eval_step`).
    params: the model's parameters.
    dataset: unbatched examples; the last batch is padded with weight-0 examples.
    batch_size: examples per batch.
    batch_sharding: where to put each batch (each process reads only its
      rows of it: `sharding.put_batch`); None: where jit puts it.
  """
  totals = None
  rows = None if batch_sharding is None else sharding_lib.process_rows(batch_sharding, batch_size)
  for batch in data_lib.eval_batches(dataset, batch_size, rows):
    if batch_sharding is not None:
      batch = sharding_lib.put_batch(batch, batch_sharding, batch_size)
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return metrics_lib.means(jax.device_get(totals))
