"""Training loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom:

  1. Config -> typed pieces (data, model, optimizer configs; budget).
  2. Data: opened (and checked) before anything else, so a missing data set
     fails in seconds with the command that prepares it.
  3. Model, optimizer and train state: shapes first (`jax.eval_shape`), then
     the state is created directly with its shardings.
  4. Checkpoints: resume from the workdir if it has one.
  5. The train step: a pure function (state, batch) -> (state, metrics),
     jitted once with donation. Pure means `jax.vmap` can train many
     (seed, subset) cells at once and a Mesh can shard it.
  6. The loop: metrics, progress, NaN guard, checkpoints, preemption.
  7. Final evaluation on the evaluation split.

The train state is a plain pytree (`TrainState`): the model's parameters split
off its `nnx.GraphDef`, the optax state, the step and a PRNG key. Dropout keys
are derived from (key, step) inside the step and passed to the model at call
time, so the state holds no hidden RNG counters and a resumed run draws the
same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import metrics as metrics_lib
from attnlab import optim
from attnlab import models

# Every top-level config field the trainer reads; anything else is a typo.
CONFIG_FIELDS = (
    "seed", "model_name", "model", "data", "optim", "batch_size", "total_steps", "num_epochs",
    "total_examples", "label_smoothing", "log_every_steps", "eval_every_steps", "eval_batch_size",
    "checkpoint_every_steps", "keep_checkpoints", "progress_bar", "diagnostics_examples",
)
MODEL_NAMES = ("vit", "transformer")

# Test hook (kill/resume test): after the checkpoint of this step is written,
# print a line and sleep until killed.
_HANG_AFTER_STEP_ENV = "ATTNLAB_TEST_HANG_AFTER_STEP"


# ----------------------------------------------------------------------------
# 1. Config -> typed pieces.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The typed view of a config that the trainer and evaluator work with."""

  config: ml_collections.ConfigDict
  data: data_lib.DataConfig
  datasets: data_lib.Datasets
  model_cfg: models.ViTConfig | models.TransformerConfig
  optim: optim.OptimConfig
  num_steps: int

  @property
  def task(self) -> str:
    return self.datasets.spec.task


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for unknown top-level fields (with the nearest valid name)."""
  configlib.check_known(config.keys(), CONFIG_FIELDS, where="config")
  missing = sorted(set(CONFIG_FIELDS) - set(config.keys()))
  if missing:
    raise ValueError(f"Config lacks fields {missing}; start from a file in configs/.")
  if config.model_name not in MODEL_NAMES:
    raise ValueError(
        f"config.model_name={config.model_name!r}: expected one of {MODEL_NAMES}."
        f"{configlib.suggest(config.model_name, MODEL_NAMES)}"
    )


def load_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Validates `config`, opens the data and builds the typed configs."""
  check_config(config)
  data_cfg = configlib.to_dataclass(data_lib.DataConfig, config.data, where="config.data")
  datasets = data_lib.load(data_cfg, seed=config.seed)
  num_steps = data_lib.resolve_num_steps(
      batch_size=config.batch_size,
      num_train_examples=datasets.spec.num_train_examples,
      total_steps=config.total_steps,
      num_epochs=config.num_epochs,
      total_examples=config.total_examples,
  )
  return Experiment(
      config=config,
      data=data_cfg,
      datasets=datasets,
      model_cfg=model_config(config, datasets.spec),
      optim=configlib.to_dataclass(optim.OptimConfig, config.optim, where="config.optim"),
      num_steps=num_steps,
  )


def model_config(config: ml_collections.ConfigDict, spec: data_lib.DataSpec):
  """The model's frozen dataclass: config.model plus what the data set dictates.

  For the ViT, `config.model.variant` (e.g. "mu/2") names a size; fields of
  config.model that are not None override it. Class count, image size, vocabulary and length come
  from the data.
  """
  fields = config.model.to_dict()
  if config.model_name == "vit":
    if spec.task != "classification":
      raise ValueError(f"model_name='vit' needs an image data set; {config.data.name!r} is {spec.task}.")
    variant = fields.pop("variant", None)
    if variant is not None:
      # The named size fills the fields the config leaves at None.
      sized = models.parse_variant(variant)
      fields = {**sized, **{k: v for k, v in fields.items() if v is not None or k not in sized}}
    return configlib.to_dataclass(
        models.ViTConfig, fields, where="config.model", num_classes=spec.num_classes,
        image_size=tuple(spec.input_shape[:2]), num_channels=spec.input_shape[2])
  if spec.task != "lm":
    raise ValueError(f"model_name='transformer' is set up here for language modelling; "
                     f"{config.data.name!r} is {spec.task}.")
  return configlib.to_dataclass(
      models.TransformerConfig, fields, where="config.model", vocab_size=spec.num_classes,
      max_len=spec.input_shape[0])


def build_model(model_cfg, key: jax.Array) -> nnx.Module:
  """The NNX model for `model_cfg`, its parameters and dropout streams seeded from `key`."""
  rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), dropout=jax.random.fold_in(key, 1))
  if isinstance(model_cfg, models.ViTConfig):
    return models.ViT(model_cfg, rngs=rngs)
  return models.Transformer(model_cfg, rngs=rngs)


def apply_model(model: nnx.Module, inputs: jax.Array, *, deterministic: bool, **kwargs):
  """Logits ([B, C] or [B, L, V]); both model families take the inputs first."""
  return model(inputs, deterministic=deterministic, **kwargs)


# ----------------------------------------------------------------------------
# 3. Train state.
# ----------------------------------------------------------------------------


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
  """The model's static structure and the pure functions built on it."""

  graphdef: nnx.GraphDef
  init: Callable[[jax.Array], TrainState]  # seed -> state
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_step: Callable[[nnx.State, dict], dict]
  merge: Callable[[nnx.State], nnx.Module]  # params -> model (for diagnostics)


def make_model_fns(model_cfg, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   *, label_smoothing: float = 0.0) -> ModelFns:
  """Builds init, train and eval functions for a model config and optimizer.

  All three are pure and unjitted: the caller picks jit / vmap / shardings.
  """
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

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      logits = apply_model(merge(params), batch["inputs"], deterministic=False,
                           rngs=nnx.Rngs(dropout=dropout_key))
      sums = metrics_lib.weighted_sums(logits, batch["targets"], batch["weights"],
                                       label_smoothing=label_smoothing)
      return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    finite = jnp.isfinite(loss) & _all_finite(params)
    step_metrics = {
        "loss": loss,
        "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
        "grad_norm": _global_norm(grads),
        "learning_rate": schedule(state.step),
        "finite": finite,
    }
    return new_state, step_metrics

  def eval_step(params: nnx.State, batch: dict) -> dict:
    logits = apply_model(merge(params), batch["inputs"], deterministic=True)
    return metrics_lib.weighted_sums(logits, batch["targets"], batch["weights"])

  return ModelFns(graphdef=graphdef, init=init, train_step=train_step, eval_step=eval_step,
                  merge=merge)


@functools.lru_cache(maxsize=8)
def experiment_fns(model_cfg, optim_cfg: optim.OptimConfig, num_steps: int,
                   label_smoothing: float = 0.0) -> ModelFns:
  """`make_model_fns` with the experiment's optimizer, memoised.

  The same experiment in one process (train then evaluate, repeated runs in
  a notebook or tests) gets the same function objects, so jax.jit reuses the
  compiled executables instead of compiling again.
  """
  tx, schedule = optim.make_optimizer(optim_cfg, num_steps)
  return make_model_fns(model_cfg, tx, schedule, label_smoothing=label_smoothing)


def _check_only_rng_state(rest: nnx.State) -> None:
  for path, variable in nnx.to_flat_state(rest):
    if not isinstance(variable, nnx.RngState):
      raise NotImplementedError(
          f"The model has non-parameter state {'/'.join(map(str, path))} "
          f"({type(variable).__name__}); attnlab.train carries parameters only."
      )


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


# ----------------------------------------------------------------------------
# Shardings (data parallel over all local devices; one device: trivial).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Where the state and the batches live. Override to shard differently."""

  mesh: jax.sharding.Mesh
  state: Any  # pytree of shardings matching TrainState
  batch: jax.sharding.Sharding

  @classmethod
  def data_parallel(cls, abstract_state: TrainState, batch_size: int) -> "Shardings":
    devices = np.asarray(jax.devices())
    if batch_size % devices.size:
      raise ValueError(
          f"config.batch_size={batch_size} must be a multiple of the {devices.size} devices "
          "(the batch is split across them)."
      )
    mesh = jax.sharding.Mesh(devices, ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return cls(mesh=mesh, state=jax.tree.map(lambda _: replicated, abstract_state),
               batch=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


# ----------------------------------------------------------------------------
# The whole run.
# ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

  Args:
    config: an experiment config (see configs/).
    workdir: where checkpoints, metrics.jsonl and config.json go.

  Returns:
    {"step", "eval_loss", "eval_accuracy", "workdir", "checkpoint_dir",
    "train_seconds"}.

  Raises:
    DatasetNotPreparedError: the data set is missing (before any training).
    ValueError: an invalid config.
    FloatingPointError: the loss or the parameters became NaN/inf; the message
      names the step, and no checkpoint is written after it.
    SystemExit(143): SIGTERM arrived; a checkpoint was written first.
  """
  # 1-2. Config and data (fail fast).
  exp = load_experiment(config)
  _check_same_run(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))

  # 3. Model, optimizer, state shapes.
  fns = experiment_fns(exp.model_cfg, exp.optim, exp.num_steps, config.label_smoothing)
  abstract_state = jax.eval_shape(fns.init, config.seed)
  shard = Shardings.data_parallel(abstract_state, config.batch_size)

  # 4. Checkpoints: resume or start.
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                     every_steps=config.checkpoint_every_steps)
  batches = data_lib.train_batches(exp.datasets, batch_size=config.batch_size,
                                   num_steps=exp.num_steps, seed=config.seed)
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(
        checkpoint_lib.with_shardings(abstract_state, shard.state))
    print(f"Resuming from step {start} in {checkpoint_lib.checkpoint_dir(workdir)}", file=sys.stderr)
  else:
    state = jax.jit(fns.init, out_shardings=shard.state)(config.seed)
    data_state, start = None, 0
  data_iter = data_lib.train_iterator(batches, data_state)

  # 5. The jitted train step (state donated: updated in place).
  train_step = jax.jit(fns.train_step, donate_argnums=0,
                       in_shardings=(shard.state, shard.batch), out_shardings=(shard.state, None))
  eval_step = jax.jit(fns.eval_step, in_shardings=(shard.state.params, shard.batch))

  # 6. The loop.
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  progress = metrics_lib.Progress(exp.num_steps, start, enabled=config.progress_bar,
                                  log_every=config.log_every_steps)
  hang_after = int(os.environ.get(_HANG_AFTER_STEP_ENV, "-1"))
  pending: list[tuple[int, dict]] = []  # device metrics not yet checked for NaN
  last_log = (start, time.perf_counter())
  loop_start = time.perf_counter()
  try:
    with _PreemptionSignal() as preemption:
      for step in range(start + 1, exp.num_steps + 1):
        state, step_metrics = train_step(state, jax.device_put(next(data_iter), shard.batch))
        pending.append((step, step_metrics))
        must_save = ckpt.should_save(step) or step == exp.num_steps
        if step % config.log_every_steps == 0 or must_save or step == start + 1:
          # The only host sync: every pending step is checked before a checkpoint.
          values = _check_finite(pending)
          pending.clear()
          if step % config.log_every_steps == 0 or step == exp.num_steps:
            now = time.perf_counter()
            rate = (step - last_log[0]) * config.batch_size / max(now - last_log[1], 1e-9)
            writer.write(step, "train", {**values, "examples_per_sec": rate})
            last_log = (step, now)
          progress.update(step, {"loss": values["loss"], "acc": values["accuracy"]})
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step != exp.num_steps:
          writer.write(step, "eval", _prefixed(evaluate_params(exp, eval_step, state.params, shard)))
        if must_save:
          ckpt.save(step, state, data_iter.get_state())
        if step == hang_after:
          ckpt.wait()
          print(f"HANGING after step {step}", flush=True)
          while not preemption.received:
            time.sleep(0.05)
        if preemption.received:
          if not must_save:
            _check_finite(pending)
            ckpt.save(step, state, data_iter.get_state())
          ckpt.wait()
          print(f"SIGTERM: saved a checkpoint at step {step} in "
                f"{checkpoint_lib.checkpoint_dir(workdir)}; exiting.", file=sys.stderr, flush=True)
          raise SystemExit(143)
  finally:
    progress.close()
    ckpt.close()  # waits for checkpoints in flight (all of them finite)
  train_seconds = time.perf_counter() - loop_start

  # 7. Final evaluation.
  final_step = int(jax.device_get(state.step))
  result = evaluate_params(exp, eval_step, state.params, shard)
  writer.write(final_step, "eval", _prefixed(result))
  writer.close()
  summary = {
      "step": final_step,
      "eval_loss": result["loss"],
      "eval_accuracy": result["accuracy"],
      "workdir": os.path.abspath(workdir),
      "checkpoint_dir": checkpoint_lib.checkpoint_dir(workdir),
      "train_seconds": train_seconds,
  }
  return summary


# Fields that may change when a run resumes: they do not change what is trained.
_RESUMABLE_CHANGES = ("progress_bar", "log_every_steps", "eval_every_steps", "eval_batch_size",
                      "checkpoint_every_steps", "keep_checkpoints", "diagnostics_examples",
                      "data.data_dir")


def _check_same_run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir's checkpoints under a config that trains something else."""
  path = os.path.join(workdir, "config.json")
  if not (os.path.exists(path) and checkpoint_lib.Checkpointer.exists(workdir)):
    return
  with open(path, encoding="utf-8") as f:
    saved = _flatten(json.load(f))
  current = _flatten(json.loads(config.to_json_best_effort()))
  differ = sorted(k for k in saved.keys() | current.keys()
                  if saved.get(k) != current.get(k) and k not in _RESUMABLE_CHANGES)
  if differ:
    raise configlib.ConfigError(
        f"{workdir} holds checkpoints of a run with another config (fields {differ} differ: "
        f"{[(saved.get(k), current.get(k)) for k in differ]}). Use a new --workdir, or the "
        "run's own config to resume it."
    )


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _prefixed(values: dict[str, float]) -> dict[str, float]:
  return {f"eval_{k}": v for k, v in values.items()}


def _check_finite(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """Fetches pending step metrics; raises on the first non-finite one; returns the last."""
  if not pending:
    return {}
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), values in zip(pending, fetched):
    if not bool(values["finite"]):
      raise FloatingPointError(
          f"Non-finite training loss or parameters at step {step} (loss={float(values['loss'])}, "
          f"grad_norm={float(values['grad_norm'])}, learning_rate={float(values['learning_rate'])})."
          " No checkpoint was written after the last finite step; lower the learning rate or "
          "enable gradient clipping (config.optim.grad_clip_norm)."
      )
  return {k: float(v) for k, v in fetched[-1].items() if k != "finite"}


def evaluate_params(exp: Experiment, eval_step, params: nnx.State, shard: Shardings | None = None
                    ) -> dict[str, float]:
  """Loss and accuracy of `params` on the whole evaluation split."""
  totals = None
  for batch in data_lib.eval_batches(exp.datasets.eval, exp.config.eval_batch_size):
    if shard is not None:
      batch = jax.device_put(batch, shard.batch)
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return metrics_lib.means(jax.device_get(totals))


class _PreemptionSignal:
  """Records SIGTERM while training (main thread only) instead of dying at once."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
