"""Evaluation of a checkpoint: `evaluate(config, workdir, step=None)`.

Restores the latest (or a given) checkpoint of a run onto this machine's
devices (the target shapes and shardings come from `jax.eval_shape` of the
current model, so the run may have used another device count), scores the
evaluation split and measures what each layer's attention does:

  entropy      mean entropy (nats) of each query's weights normalised to sum
               to 1 (for sigmoid attention, of the normalised row);
  row_sum      mean sum of each query's weights (1 for softmax; free for
               sigmoid: how much total mass the head lets through);
  first_token  mean share of a row's weight on key 0 (the "attention sink";
               for the ViT with pool="tok" this is the CLS token);
  below_1e-3   fraction of (allowed) weights below 1e-3 (sparsity).

Writes <workdir>/eval_<step>.json and prints a table; optionally saves
attention-map PNGs under <workdir>/attention_maps/. `load_model(config, workdir)`
returns the run's trained model itself (to generate from, or to probe). A workdir with no
checkpoint, or whose config.json differs from `config` in what is trained
(`workdir.check_same_run`, the check train.py makes before resuming), is
refused before anything is read or written.

The experiment (data, model functions, state shapes, shardings, scoring of
parameters) is assembled by `attnlab.experiment`, as the trainer's is; this
module never imports the training loop (`attnlab.train`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from attnlab import checkpoint as checkpoint_lib
from attnlab import data as data_lib
from attnlab import experiment
from attnlab import model_fns
from attnlab import models
from attnlab import placement
from attnlab import workdir as workdir_lib
from attnlab.data import pipeline as data_pipeline
from attnlab.models import decode as decode_lib

SMALL_WEIGHT = 1e-3
# --samples: the share of each evaluation window given as the prompt; the model writes the rest.
SAMPLE_PROMPT_FRACTION = 0.25


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, *,
             attention_pngs: bool = False, samples: int = 0, temperature: float = 1.0,
             verbose: bool = True) -> dict[str, Any]:
  """Evaluates the checkpoint at `step` (default: the latest) of the run in `workdir`.

  Args:
    config: the run's config (as given to `train_and_evaluate`).
    workdir: the run directory.
    step: a saved step, or None for the latest.
    attention_pngs: also save head-wise attention maps of the first evaluation
      example per layer as PNG files.
    samples: a language model only: also generate this many sequences (`generate_samples`),
      printed as text for byte-level data and as token ids otherwise.
    temperature: the sampling temperature of `samples` (0 = greedy).
    verbose: print the table.

  Returns:
    {"step", "split", "num_examples", "loss", "accuracy", "attention": [per
    layer {"layer", "entropy", "row_sum", "first_token", "below_1e-3"}],
    "samples" (with samples > 0: one {"prompt", "completion"} per sequence), "path"}; also written to <workdir>/eval_<step>.json.

  Raises:
    FileNotFoundError: the workdir does not exist (it is not created) or has
      no checkpoint (at that step).
    configlib.ConfigError: `config` is not the config the run was trained
      with (`workdir.check_same_run`: the message names the fields that
      differ), or is invalid.
  """
  exp = _load_run(config, workdir)
  if samples:
    decode_lib.check_config(exp.model)  # before the restore: --samples needs a causal LM
  fns, shard, state, step = _restore(exp, workdir, step)

  scores = placement.evaluate_params(placement.jit_eval_step(fns, shard), state.params,
                                      exp.datasets.eval, batch_size=exp.trainer.eval_batch_size,
                                      batch_sharding=shard.batch)
  inputs = _diagnostic_inputs(exp, exp.trainer.diagnostics_examples)
  maps = jax.device_get(_attention_maps(fns, state.params, inputs))
  causal = getattr(exp.model, "causal", False)
  result = {
      "step": int(step),
      "split": exp.data.eval_split,
      "num_examples": exp.datasets.spec.num_eval_examples,
      **scores,
      "attention_kind": exp.model.attention,
      "attention_examples": int(inputs.shape[0]),
      "attention": [{"layer": i, **attention_stats(np.asarray(w), causal=causal)}
                    for i, w in enumerate(maps)],
  }
  if samples:
    result["samples"] = generate_samples(exp, fns.merge(state.params), samples,
                                         seed=exp.trainer.seed, temperature=temperature)
  path = os.path.join(workdir, f"eval_{step}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  result["path"] = path
  if attention_pngs:
    result["pngs"] = save_attention_pngs(maps, os.path.join(workdir, "attention_maps"), step)
  if verbose:
    print(format_table(result, workdir))
  return result


def load_model(config: ml_collections.ConfigDict, workdir: str, step: int | None = None
               ) -> tuple[Any, int]:
  """The run's model with the parameters of its checkpoint at `step` (default: the latest),
  and that step; e.g. to generate from a language model (`attnlab.models.decode.generate`).

  Raises as `evaluate` does (no run or checkpoint in `workdir`, another config).
  """
  exp = _load_run(config, workdir)
  fns, _, state, step = _restore(exp, workdir, step)
  return fns.merge(state.params), step


def _load_run(config: ml_collections.ConfigDict, workdir: str) -> experiment.Experiment:
  """The experiment of the run in `workdir`, once it is known to be this config's run."""
  _check_has_checkpoint(workdir)
  # Before the data opens: a model of another kind or shape would otherwise
  # score untrained parameters or fail deep in the restore.
  workdir_lib.check_same_run(config, workdir)
  return experiment.load(config)


def _restore(exp: experiment.Experiment, workdir: str, step: int | None):
  """(model functions, shardings, the train state at `step` or the latest, its step)."""
  fns = exp.fns()
  abstract_state = placement.abstract_state(fns, exp.trainer.seed)
  shard = placement.shardings(exp.trainer, abstract_state, batch_fields=("eval_batch_size",))
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=exp.trainer.keep_checkpoints)
  state, _, step = ckpt.restore(checkpoint_lib.with_shardings(abstract_state, shard.state), step)
  ckpt.close()
  return fns, shard, state, step


def _check_has_checkpoint(workdir: str) -> None:
  """Refuses a workdir that holds no run yet, without creating anything in it."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(
        f"No run in {workdir}: the directory does not exist. Train it first with train.py and "
        "the same --config, overrides and --workdir, or pass the --workdir of a trained run.")
  if not checkpoint_lib.Checkpointer.exists(workdir):
    raise FileNotFoundError(
        f"No checkpoint in {checkpoint_lib.checkpoint_dir(workdir)}: the run in {workdir} has not "
        "saved one yet. Train it first with train.py and the same --config, overrides and "
        "--workdir.")


def generate_samples(exp: experiment.Experiment, model, n: int, *, seed: int,
                     temperature: float = 1.0) -> list[dict[str, Any]]:
  """`n` sequences from a language model: the first quarter of each of the first `n`
  evaluation windows as the prompt, the rest of the window sampled (`models.decode`).

  Returns one {"prompt", "completion"} per sequence: text for byte-level data sets
  (`TEXT_DATASETS`: tokens are UTF-8 bytes, undecodable bytes shown as U+FFFD), lists
  of token ids otherwise.
  """
  inputs_BL = _diagnostic_inputs(exp, n)
  length = inputs_BL.shape[1]
  prompt_len = max(1, int(length * SAMPLE_PROMPT_FRACTION))
  tokens_BL = np.asarray(decode_lib.generate(model, inputs_BL[:, :prompt_len],
                                             steps=length - prompt_len,
                                             rng=jax.random.key(seed), temperature=temperature))
  as_text = exp.data.name in data_pipeline.TEXT_DATASETS
  show = ((lambda ids: bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace"))
          if as_text else (lambda ids: ids.tolist()))
  return [{"prompt": show(row[:prompt_len]), "completion": show(row[prompt_len:])}
          for row in tokens_BL]


def _diagnostic_inputs(exp: experiment.Experiment, n: int) -> np.ndarray:
  n = min(n, exp.datasets.spec.num_eval_examples)
  return next(data_lib.eval_batches(exp.datasets.eval, n))["inputs"]


def _attention_maps(fns: model_fns.ModelFns, params, inputs):
  return jax.jit(_maps_fn(fns))(params, inputs)


@functools.lru_cache(maxsize=8)
def _maps_fn(fns: model_fns.ModelFns):
  # One function object per model, so jit compiles it once per process.
  return lambda params, inputs: models.attention_maps(fns.merge(params), inputs)


def attention_stats(weights: np.ndarray, *, causal: bool) -> dict[str, float]:
  """Diagnostics of one layer's weights [B, H, Lq, Lk] (see the module docstring).

  With `causal`, only keys j <= i count (the others are zero by construction).
  """
  w = weights.astype(np.float64)
  lq, lk = w.shape[-2:]
  allowed = np.tril(np.ones((lq, lk), bool), k=lk - lq) if causal else np.ones((lq, lk), bool)
  row_sum = w.sum(-1)
  p = w / np.maximum(row_sum, 1e-30)[..., None]
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  below = (w < SMALL_WEIGHT) & allowed
  return {
      "entropy": float(np.mean(-plogp.sum(-1))),
      "row_sum": float(np.mean(row_sum)),
      "first_token": float(np.mean(p[..., 0])),
      "below_1e-3": float(below.sum() / (allowed.sum() * w.shape[0] * w.shape[1])),
  }


def format_table(result: dict[str, Any], workdir: str) -> str:
  """The printed summary of `evaluate`."""
  lines = [
      f"Evaluation of {workdir} at step {result['step']} "
      f"({result['split']} split, {result['num_examples']} examples)",
      f"  loss      {result['loss']:.4f}",
      f"  accuracy  {result['accuracy']:.2%}",
      f"Attention diagnostics ({result['attention_kind']}, {result['attention_examples']} examples):",
      f"  {'layer':>5} {'entropy':>8} {'row_sum':>8} {'first_token':>11} {'below_1e-3':>10}",
  ]
  for row in result["attention"]:
    lines.append(f"  {row['layer']:>5} {row['entropy']:>8.3f} {row['row_sum']:>8.3f} "
                 f"{row['first_token']:>11.3f} {row['below_1e-3']:>10.3f}")
  for i, sample in enumerate(result.get("samples", [])):
    lines.append(f"Sample {i}: prompt {sample['prompt']!r}\n  -> {sample['completion']!r}")
  lines.append(f"Written to {result['path']}")
  return "\n".join(lines)


def save_attention_pngs(maps, directory: str, step: int) -> list[str]:
  """One PNG per layer: each head's weights for the first example."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  paths = []
  for layer, w in enumerate(maps):
    heads = np.asarray(w[0])
    fig, axes = plt.subplots(1, heads.shape[0], figsize=(2.5 * heads.shape[0], 2.6), squeeze=False)
    for h, ax in enumerate(axes[0]):
      ax.imshow(heads[h], cmap="viridis", vmin=0.0)
      ax.set_title(f"head {h}", fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
    fig.suptitle(f"layer {layer}, step {step}", fontsize=9)
    path = os.path.join(directory, f"step{step}_layer{layer}.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  return paths
