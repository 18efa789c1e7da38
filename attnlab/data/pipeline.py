"""Input pipelines: config -> grain datasets of numpy batches.

Every batch is a dict with the same three keys for every task, so the trainer
and the evaluator need one loss:

  classification: inputs [B, H, W, C] float32 in [-1, 1], targets [B] int32,
                  weights [B] float32 (0 for padding);
  language model: inputs [B, L] int32, targets [B, L] int32 (next tokens),
                  weights [B, L] float32 (MQAR: 1 on answer positions only).

The training order is a pure function of (seed, step): grain's shuffled,
repeated MapDataset is random access, and its iterator's state (the next
index) is what checkpoints store. Subsets (`train_examples`) are the first n
of a fixed permutation drawn with `subset_seed`, so growing n only adds
examples (nested subsets), and the evaluation split never depends on them.
A validation split (`validation_examples`, for model selection) is the last k
of the same permutation, so no training subset ever overlaps it.

Studies, which train many small cells at once, hold the data in memory
(`to_arrays`) and draw their training order with `epoch_batches` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import grain.python as grain  # the long-standing path (grain >= 0.2); newer versions also export it at top level
import numpy as np

from attnlab.configlib import suggest
from attnlab.data import sources

IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
TEXT_DATASETS = ("tiny_shakespeare",)
SYNTHETIC_DATASETS = ("mqar",)
DATASETS = IMAGE_DATASETS + TEXT_DATASETS + SYNTHETIC_DATASETS

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What `config.data` may hold (see configs/ for commented examples).

  Attributes:
    name: one of DATASETS.
    data_dir: TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    train_split: split spec to train on, e.g. "train" or "train[:512]".
    eval_split: split spec to evaluate on; never affected by train_examples.
    train_examples: if set, train on the first n examples of a fixed
      permutation (drawn with subset_seed) of train_split.
    validation_examples: if set to k, hold out the last k examples of that
      same permutation as a validation split (for model selection). Training
      subsets stay the first n, so they are unchanged by k and never overlap
      it; with train_examples None, training uses all but those k. Requires
      1 <= k < the size of train_split and train_examples <= size - k.
    random_shift: image data sets: translate each training image by up to
      this many pixels (uniform per axis, background fill), a fresh draw per
      epoch from (seed, position in the run); 0: no augmentation.
    subset_seed: seed of that permutation; keep it fixed across training seeds
      so that subsets are nested and shared.
    synthetic_seed: synthetic data sets (MQAR): draw the sequences of both
      splits from this seed; None: from the run's seed. Set it when runs with
      different seeds must share one training pool and one evaluation split.
    seq_len: tokens per training window (tiny_shakespeare).
    train_size: number of examples in the synthetic "train" split (MQAR).
    eval_size: number of examples in the synthetic "test" split (MQAR).
    mqar: MQARSpec fields (vocab_size, num_kv_pairs, num_queries, seq_len).
  """

  name: str = "digits"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"
  train_examples: int | None = None
  random_shift: int = 0
  subset_seed: int = 0
  seq_len: int | None = None
  train_size: int | None = None
  eval_size: int | None = None
  mqar: dict[str, Any] | None = None
  validation_examples: int | None = None
  synthetic_seed: int | None = None

  def __post_init__(self):
    if self.name not in DATASETS:
      raise ValueError(
          f"config.data.name={self.name!r} is not a known data set.{suggest(self.name, DATASETS)} "
          f"Expected one of {', '.join(DATASETS)}."
      )
    if self.random_shift and self.name not in IMAGE_DATASETS:
      raise ValueError(f"config.data.random_shift={self.random_shift} applies to images only; "
                       f"{self.name!r} is not an image data set.")
    if self.random_shift < 0:
      raise ValueError(f"config.data.random_shift={self.random_shift}: expected >= 0.")
    if self.train_examples is not None and self.train_examples < 1:
      raise ValueError(f"config.data.train_examples={self.train_examples}: expected >= 1 or None.")
    if self.validation_examples is not None and self.validation_examples < 1:
      raise ValueError(f"config.data.validation_examples={self.validation_examples}: expected >= 1 "
                       "or None (no validation split).")
    if self.synthetic_seed is not None and self.name not in SYNTHETIC_DATASETS:
      raise ValueError(
          f"config.data.synthetic_seed={self.synthetic_seed!r} has no meaning for data set "
          f"{self.name!r} (only for {', '.join(SYNTHETIC_DATASETS)}); remove it."
      )
    needs = {"seq_len": self.name in TEXT_DATASETS, "mqar": self.name in SYNTHETIC_DATASETS,
             "train_size": self.name in SYNTHETIC_DATASETS, "eval_size": self.name in SYNTHETIC_DATASETS}
    for field, needed in needs.items():
      value = getattr(self, field)
      if needed and value is None:
        raise ValueError(f"config.data.{field} must be set for data set {self.name!r}.")
      if not needed and value is not None:
        raise ValueError(
            f"config.data.{field}={value!r} has no meaning for data set {self.name!r}; remove it."
        )


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the model and the loss need to know about a data set.

  Attributes:
    task: "classification" or "lm".
    num_classes: classes (classification) or vocabulary size (lm).
    input_shape: shape of one example's inputs (no batch dimension).
    num_train_examples: examples in the (sub)set trained on.
    num_eval_examples: examples in the evaluation split.
    num_validation_examples: examples in the validation split (0: none).
  """

  task: str
  num_classes: int
  input_shape: tuple[int, ...]
  num_train_examples: int
  num_eval_examples: int
  num_validation_examples: int = 0


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Unbatched, formatted examples of the splits, their spec, and the training augmentation.

  `validation` is None unless config.data.validation_examples is set.
  """

  spec: DataSpec
  train: grain.MapDataset
  eval: grain.MapDataset
  augment: Callable[[Batch, np.random.Generator], Batch] | None = None
  validation: grain.MapDataset | None = None


def load(config: DataConfig, *, seed: int) -> Datasets:
  """Opens the splits (preparing `digits` if needed) and formats their examples.

  Fails here, before any model is built, when a TFDS data set is missing.

  Args:
    config: the data config.
    seed: the run's seed (used by the synthetic data unless
      config.synthetic_seed is set: its splits are the same for every run
      with this seed).

  Raises:
    sources.DatasetNotPreparedError: a TFDS data set is not prepared.
  """
  if config.name in SYNTHETIC_DATASETS:
    synthetic_seed = seed if config.synthetic_seed is None else config.synthetic_seed
    train_src, eval_src, spec = _mqar_sources(config, synthetic_seed)
  elif config.name in TEXT_DATASETS:
    train_src = sources.TextWindows(
        sources.tfds_source(config.name, config.train_split, config.data_dir), seq_len=config.seq_len)
    eval_src = sources.TextWindows(
        sources.tfds_source(config.name, config.eval_split, config.data_dir), seq_len=config.seq_len)
    spec = dict(task="lm", num_classes=256, input_shape=(config.seq_len,))
  else:
    train_src = sources.tfds_source(config.name, config.train_split, config.data_dir)
    eval_src = sources.tfds_source(config.name, config.eval_split, config.data_dir)
    spec = dict(task="classification", num_classes=_num_classes(train_src),
                input_shape=tuple(np.shape(train_src[0]["image"])))

  train, validation = _split_train(grain.MapDataset.source(train_src), config)
  evaluation = grain.MapDataset.source(eval_src)
  if spec["task"] == "classification":
    train, evaluation = train.map(format_image_example), evaluation.map(format_image_example)
    if validation is not None:
      validation = validation.map(format_image_example)
  spec = DataSpec(**spec, num_train_examples=len(train), num_eval_examples=len(evaluation),
                  num_validation_examples=0 if validation is None else len(validation))
  augment = functools.partial(random_shift, max_shift=config.random_shift) if config.random_shift else None
  return Datasets(spec=spec, train=train, eval=evaluation, augment=augment, validation=validation)


def _mqar_sources(config: DataConfig, seed: int):
  mqar = sources.MQARSpec(**config.mqar)
  train_name, train_range = sources.parse_split(config.train_split, config.train_size)
  eval_name, eval_range = sources.parse_split(config.eval_split, config.eval_size)
  train = sources.MQARSource(mqar, split=train_name, size=config.train_size, seed=seed)
  evaluation = sources.MQARSource(mqar, split=eval_name, size=config.eval_size, seed=seed)
  if train_name == eval_name:
    raise ValueError(f"MQAR train_split and eval_split are both {train_name!r}; expected different splits.")
  spec = dict(task="lm", num_classes=mqar.vocab_size, input_shape=(mqar.seq_len,))
  return _Slice(train, train_range), _Slice(evaluation, eval_range), spec


class _Slice:
  """A contiguous range of a random-access source."""

  def __init__(self, source, index_range: range):
    self.source, self.range = source, index_range

  def __len__(self):
    return len(self.range)

  def __getitem__(self, i):
    return self.source[self.range[i]]


def _num_classes(source) -> int:
  features = getattr(getattr(source, "dataset_info", None), "features", None)
  if features is not None and "label" in features:
    return int(features["label"].num_classes)
  raise ValueError("Image data set has no ClassLabel feature named 'label'.")


def _split_train(dataset: grain.MapDataset, config: DataConfig):
  """(training (sub)set, validation split or None), both cut from one fixed permutation.

  The training subset is the first n positions of the permutation and the
  validation split the last k, so they never overlap and the subsets are the
  same with or without a validation split.
  """
  n, k = config.train_examples, config.validation_examples
  if k is None:
    # Unpermuted when no subset is asked for: the order of runs before
    # validation splits existed, kept as it was.
    return (dataset if n is None else _subset(dataset, n, config.subset_seed)), None
  size = len(dataset)
  if k >= size:
    raise ValueError(
        f"config.data.validation_examples={k} leaves no training examples: the training split "
        f"has {size}; expected validation_examples < {size}."
    )
  if n is not None and n > size - k:
    raise ValueError(
        f"config.data.train_examples={n} + validation_examples={k} exceeds the {size} examples "
        f"of the training split; expected train_examples <= {size - k} (lower either one)."
    )
  order = _subset_order(size, config.subset_seed)
  train = _take(dataset, order[: size - k if n is None else n])
  return train, _take(dataset, order[size - k :])


def _subset(dataset: grain.MapDataset, n: int, subset_seed: int) -> grain.MapDataset:
  if n > len(dataset):
    raise ValueError(
        f"config.data.train_examples={n} exceeds the {len(dataset)} examples of the training split."
    )
  return _take(dataset, _subset_order(len(dataset), subset_seed)[:n])


def _subset_order(size: int, subset_seed: int) -> np.ndarray:
  """The fixed permutation that training subsets and the validation split are cut from."""
  return np.random.default_rng(subset_seed).permutation(size)


def _take(dataset: grain.MapDataset, indices: np.ndarray) -> grain.MapDataset:
  """The examples of `dataset` at `indices`, in that order."""
  return grain.MapDataset.range(len(indices)).map(lambda i: dataset[int(indices[i])])


def format_image_example(example: dict[str, Any]) -> Batch:
  """TFDS {"image": uint8 [H, W, C], "label"} -> {"inputs" in [-1, 1], "targets", "weights"}."""
  image = np.asarray(example["image"], np.float32) * (2.0 / 255.0) - 1.0
  return {
      "inputs": image,
      "targets": np.asarray(example["label"], np.int32),
      "weights": np.asarray(1.0, np.float32),
  }


def random_shift(example: Batch, rng: np.random.Generator, *, max_shift: int) -> Batch:
  """Translates example["inputs"] [H, W, C] by up to max_shift pixels, filling with -1 (black)."""
  image = example["inputs"]
  h, w = image.shape[:2]
  padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                  constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=2)
  return {**example, "inputs": padded[dy : dy + h, dx : dx + w]}


# ----------------------------------------------------------------------------
# Budgets and batching.
# ----------------------------------------------------------------------------


def resolve_num_steps(
    *,
    batch_size: int,
    num_train_examples: int,
    total_steps: int | None = None,
    num_epochs: float | None = None,
    total_examples: int | None = None,
) -> int:
  """The number of training steps for a budget in steps, epochs or examples.

  Exactly one of total_steps, num_epochs, total_examples must be set. Epochs
  count passes over the (sub)set trained on, so a sample-efficiency sweep with
  a fixed number of epochs trains small subsets for fewer steps; use
  total_steps or total_examples to give every subset the same compute.

  Returns:
    The number of optimizer steps, at least 1.
  """
  budgets = {"total_steps": total_steps, "num_epochs": num_epochs, "total_examples": total_examples}
  set_ = [k for k, v in budgets.items() if v is not None]
  if len(set_) != 1:
    raise ValueError(
        f"Training budget: exactly one of config.total_steps, config.num_epochs, "
        f"config.total_examples must be set; got {set_ or 'none'}."
    )
  if total_steps is not None:
    steps = int(total_steps)
  elif num_epochs is not None:
    steps = math.ceil(num_epochs * num_train_examples / batch_size)
  else:
    steps = math.ceil(total_examples / batch_size)
  if steps < 1:
    raise ValueError(f"Training budget {budgets} gives {steps} steps; expected at least 1.")
  return steps


def train_batches(datasets: Datasets, *, batch_size: int, num_steps: int, seed: int,
                  rows: slice | None = None) -> grain.MapDataset:
  """Shuffled (reshuffled each epoch), repeated, batched training examples.

  Element `s` is the batch of step `s`; batches may straddle epochs.

  Args:
    datasets: the opened splits.
    batch_size: examples per step (the global batch).
    num_steps: steps to cover.
    seed: the training order (and augmentation).
    rows: only these rows of each batch, and only their examples are read: one
      process's share of the global batch (`sharding.process_rows`); None: all.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1.")
  epochs = math.ceil(num_steps * batch_size / len(datasets.train))
  examples = datasets.train.seed(seed).shuffle().repeat(epochs)
  if datasets.augment is not None:
    # After repeat: the random draw depends on the position in the run, so
    # every epoch sees other shifts, and a resumed run the same ones.
    examples = examples.random_map(datasets.augment)
  if rows is None or (rows.start, rows.stop) == (0, batch_size):
    return examples.batch(batch_size, drop_remainder=True)
  return grain.MapDataset.source(_BatchRows(examples, batch_size, rows)).batch(
      rows.stop - rows.start, drop_remainder=True)


class _BatchRows:
  """Rows [start, stop) of each run of `batch_size` consecutive examples, as one sequence.

  Example i is read only when asked for, so a process reads its share alone,
  and each example is the one the whole batch holds at that row (the same
  order and augmentation as one process reading everything).
  """

  def __init__(self, examples: grain.MapDataset, batch_size: int, rows: slice):
    self._examples, self._batch_size = examples, batch_size
    self._start, self._width = rows.start, rows.stop - rows.start

  def __len__(self) -> int:
    return len(self._examples) // self._batch_size * self._width

  def __getitem__(self, i: int):
    step, row = divmod(i, self._width)
    return self._examples[step * self._batch_size + self._start + row]


def epoch_batches(num_examples: int, batch_size: int, seed: int, start_step: int,
                  stop_step: int) -> np.ndarray:
  """Example indices of training steps [start_step, stop_step), reshuffled every epoch.

  This is the training order of studies, which hold their (small) data sets
  in memory (`to_arrays`) and gather each batch by index. It differs from
  `train_batches`' grain order used by single runs: grain's per-index shuffle
  costs ~37 us per example, too slow for studies that draw millions of
  indices, while one NumPy permutation per epoch is cheap.

  Epoch e is `np.random.default_rng([seed, e]).permutation(num_examples)`;
  epochs are concatenated and cut into consecutive batches, which may straddle
  epochs (as in `train_batches`). The result is a pure function of the
  arguments, so any step range (e.g. after resuming) can be computed alone
  and equals those rows of a longer range; only the epochs it touches are
  drawn.

  Args:
    num_examples: examples in the set trained on.
    batch_size: examples per step, 1 <= batch_size <= num_examples.
    seed: the run's data-order seed, >= 0.
    start_step: first step of the range, >= 0.
    stop_step: one past the last step, >= start_step.

  Returns:
    int32 [stop_step - start_step, batch_size]: row s - start_step holds the
    example indices of step s.
  """
  _check_epoch_batches_args(num_examples, batch_size, seed, start_step, stop_step)
  first, stop = start_step * batch_size, stop_step * batch_size
  indices = np.empty(stop - first, np.int32)
  position = first  # Flat position in the run of the next index to fill.
  while position < stop:
    epoch, offset = divmod(position, num_examples)
    take = min(num_examples - offset, stop - position)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    indices[position - first : position - first + take] = order[offset : offset + take]
    position += take
  return indices.reshape(stop_step - start_step, batch_size)


def _check_epoch_batches_args(num_examples, batch_size, seed, start_step, stop_step):
  if batch_size < 1:
    raise ValueError(f"epoch_batches: batch_size={batch_size}: expected >= 1.")
  if batch_size > num_examples:
    raise ValueError(
        f"epoch_batches: batch_size={batch_size} exceeds num_examples={num_examples}; expected "
        "batch_size <= num_examples (use a smaller batch or more training examples)."
    )
  if num_examples >= 2**31:
    raise ValueError(f"epoch_batches: num_examples={num_examples} does not fit int32 indices.")
  if seed < 0:
    raise ValueError(f"epoch_batches: seed={seed}: expected >= 0 (NumPy seeds are non-negative).")
  if not 0 <= start_step <= stop_step:
    raise ValueError(
        f"epoch_batches: start_step={start_step}, stop_step={stop_step}: expected "
        "0 <= start_step <= stop_step."
    )


def train_iterator(batches: grain.MapDataset, state: dict[str, Any] | None = None):
  """A checkpointable iterator over `batches`; `state` is a previous `get_state()`."""
  iterator = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
  if state is not None:
    iterator.set_state(state)
  return iterator


def eval_batches(dataset: grain.MapDataset, batch_size: int,
                 rows: slice | None = None) -> Iterator[Batch]:
  """The whole evaluation split in order, the last batch padded with weight-0 examples.

  `rows`: only these rows of each batch (one process's share, as in
  `train_batches`); None: all of them.
  """
  rows = slice(0, batch_size) if rows is None else rows
  blank = {k: np.zeros_like(v) for k, v in dataset[0].items()}
  for start in range(0, len(dataset), batch_size):
    examples = [dataset[i] for i in range(start + rows.start,
                                          min(start + rows.stop, len(dataset)))]
    examples += [blank] * (rows.stop - rows.start - len(examples))
    yield {k: np.stack([e[k] for e in examples]) for k in blank}


def to_arrays(dataset: grain.MapDataset) -> dict[str, np.ndarray]:
  """Every example of a formatted `dataset`, stacked along a new leading axis.

  For holding small data sets in memory (studies); reads each example once.
  """
  if len(dataset) == 0:
    raise ValueError("to_arrays: the data set has no examples, so there is nothing to stack.")
  examples = [dataset[i] for i in range(len(dataset))]
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}
