"""Random-access data sources: index -> example, deterministic.

Each source is a `Sequence` (len + __getitem__) that grain wraps with
`grain.MapDataset.source`. TFDS data sets are read through
`tfds.data_source` (ArrayRecord files, no TensorFlow); the synthetic task
(MQAR) computes example i from (seed, split, i) alone, so any subset, order or
resumption point is reproducible without storing data.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from attnlab.data import digits as digits_lib
from attnlab.data import idx as idx_lib

# Data sets the `prepare` command knows (official TFDS builders; mnist and
# fashion_mnist can also be prepared offline from their IDX files, see
# attnlab/data/idx.py). `digits` is prepared automatically and offline.
PREPARABLE = ("mnist", "fashion_mnist", "cifar10", "tiny_shakespeare")


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS data set is not in the data dir; the message says how to prepare it."""


def resolve_data_dir(data_dir: str | None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def prepare_steps(name: str, data_dir: str) -> str:
  """How to prepare TFDS data set `name` into `data_dir`: the commands, indented, one a line."""
  online = (
      "pip install 'attnlab[prepare]'  # TensorFlow, only to write the files\n"
      f"python -m attnlab.data.prepare {name} --data_dir {data_dir}"
  )
  if name in idx_lib.IDX_DATASETS:
    offline = idx_lib.IDX_DATASETS[name].steps(data_dir)
    steps = f"Prepare it once, offline from its IDX files:\n{_indent(offline)}\nor with internet:\n"
  else:
    steps = "Prepare it once, with internet:\n"
  return steps + _indent(online)


def _indent(lines: str) -> str:
  return "\n".join(f"  {line}" for line in lines.splitlines())


def tfds_source(name: str, split: str, data_dir: str | None) -> Sequence[dict[str, Any]]:
  """Opens split `split` (e.g. "train[:512]") of TFDS data set `name` for random access.

  Args:
    name: a TFDS name; "digits" is prepared here on first use.
    split: a TFDS split spec.
    data_dir: the TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    An ArrayRecord data source (examples are dicts of numpy arrays).

  Raises:
    DatasetNotPreparedError: the data set is not prepared in `data_dir`; the
      message holds the command that prepares it.
  """
  data_dir = resolve_data_dir(data_dir)
  if name == "digits":
    return digits_lib.prepare(data_dir).as_data_source(split=split)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises various types (NotImplementedError, AssertionError...)
    if _is_prepared(name, data_dir):
      raise
    raise DatasetNotPreparedError(
        f"TFDS data set {name!r} is not prepared in {data_dir} (or not in the ArrayRecord "
        f"format that attnlab reads without TensorFlow). {prepare_steps(name, data_dir)}\n"
        f"or point config.data.data_dir / $TFDS_DATA_DIR at a data dir that has it."
    ) from e


def _is_prepared(name: str, data_dir: str) -> bool:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception:  # Unknown name: not prepared either; the caller's message covers it.
    return False
  return builder.is_prepared() and builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


# ----------------------------------------------------------------------------
# Multi-query associative recall (MQAR), after Zoology (Arora et al., 2023).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MQARSpec:
  """Shape of the multi-query associative recall task.

  A sequence of `seq_len + 1` tokens: `num_kv_pairs` key-value pairs
  `k1 v1 k2 v2 ...` first, then `num_queries` of the keys again, each at a
  random even offset in the rest of the sequence, followed by its value;
  every other position holds the filler token 0. Keys come from
  [1, 1 + (vocab_size - 1) // 2), values from the rest of the vocabulary. The
  model reads tokens [0, seq_len) and predicts tokens [1, seq_len + 1); the
  loss weights are 1 only where the input is a query key (the target is its
  value), so a model that has not learned recall is at chance 1 / #values.
  """

  vocab_size: int = 64
  num_kv_pairs: int = 8
  num_queries: int = 8
  seq_len: int = 64

  def __post_init__(self):
    num_keys = (self.vocab_size - 1) // 2
    if self.num_kv_pairs > num_keys:
      raise ValueError(
          f"MQAR num_kv_pairs={self.num_kv_pairs} exceeds the {num_keys} distinct keys that "
          f"vocab_size={self.vocab_size} allows; expected num_kv_pairs <= (vocab_size - 1) // 2."
      )
    if not 1 <= self.num_queries <= self.num_kv_pairs:
      raise ValueError(
          f"MQAR num_queries={self.num_queries}: expected 1 <= num_queries <= "
          f"num_kv_pairs={self.num_kv_pairs} (each key is queried at most once)."
      )
    slots = (self.seq_len + 1 - 2 * self.num_kv_pairs) // 2
    if self.num_queries > slots:
      raise ValueError(
          f"MQAR seq_len={self.seq_len} leaves room for {slots} queries after "
          f"{self.num_kv_pairs} key-value pairs, but num_queries={self.num_queries}; expected "
          f"seq_len >= {2 * (self.num_kv_pairs + self.num_queries) - 1}."
      )


_SPLIT_IDS = {"train": 0, "test": 1, "validation": 2}


class MQARSource(Sequence):
  """`size` MQAR examples of one split; example i depends only on (seed, split, i)."""

  def __init__(self, spec: MQARSpec, *, split: str, size: int, seed: int):
    if split not in _SPLIT_IDS:
      raise ValueError(f"MQAR split {split!r}: expected one of {sorted(_SPLIT_IDS)}.")
    self.spec, self.split, self.size, self.seed = spec, split, size, seed

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index):
    if isinstance(index, slice):
      raise TypeError("MQARSource takes integer indices; wrap it in grain.MapDataset to slice.")
    if not 0 <= index < self.size:
      raise IndexError(f"MQAR index {index} out of range [0, {self.size}).")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(index)])
    return make_mqar_example(self.spec, rng)


def make_mqar_example(spec: MQARSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One MQAR sequence as {"inputs", "targets", "weights"}, each of length seq_len."""
  num_keys = (spec.vocab_size - 1) // 2
  keys = 1 + rng.choice(num_keys, size=spec.num_kv_pairs, replace=False)
  values = 1 + num_keys + rng.integers(0, spec.vocab_size - 1 - num_keys, size=spec.num_kv_pairs)
  seq = np.zeros(spec.seq_len + 1, np.int32)
  seq[0 : 2 * spec.num_kv_pairs : 2] = keys
  seq[1 : 2 * spec.num_kv_pairs : 2] = values
  context = 2 * spec.num_kv_pairs
  slots = rng.choice((spec.seq_len + 1 - context) // 2, size=spec.num_queries, replace=False)
  which = rng.choice(spec.num_kv_pairs, size=spec.num_queries, replace=False)
  query_pos = context + 2 * slots
  seq[query_pos] = keys[which]
  seq[query_pos + 1] = values[which]
  weights = np.zeros(spec.seq_len, np.float32)
  weights[query_pos] = 1.0
  return {"inputs": seq[:-1], "targets": seq[1:], "weights": weights}


_SLICE = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\])?$")


def parse_split(split: str, size: int) -> tuple[str, range]:
  """Parses "train" / "train[a:b]" (absolute indices) for synthetic sources."""
  match = _SLICE.match(split.strip())
  if not match:
    raise ValueError(
        f"Split {split!r}: synthetic data sets take 'name' or 'name[start:stop]' with "
        "integer bounds (use config.data.train_examples for a subset)."
    )
  start = int(match.group(2) or 0)
  stop = min(int(match.group(3) or size), size)
  return match.group(1), range(start, stop)


# ----------------------------------------------------------------------------
# Character (byte) level language modelling on a TFDS text data set.
# ----------------------------------------------------------------------------


class TextWindows(Sequence):
  """Non-overlapping windows of `seq_len + 1` bytes over the concatenated texts.

  Tokens are UTF-8 bytes (vocabulary 256), so no vocabulary has to be built
  or stored, and mocked or new texts need no special handling.
  """

  def __init__(self, texts: Sequence[dict[str, Any]], *, seq_len: int, feature: str = "text"):
    pieces = [_as_bytes(texts[i][feature]) for i in range(len(texts))]
    self.tokens = np.frombuffer(b"".join(pieces), np.uint8).astype(np.int32)
    self.seq_len = seq_len
    if len(self) == 0:
      raise ValueError(
          f"Text of {self.tokens.size} bytes is too short for one window of seq_len={seq_len} + 1."
      )

  def __len__(self) -> int:
    return max((self.tokens.size - 1) // self.seq_len, 0)

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f"Window {index} out of range [0, {len(self)}).")
    window = self.tokens[index * self.seq_len : (index + 1) * self.seq_len + 1]
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "weights": np.ones(self.seq_len, np.float32),
    }


def _as_bytes(text) -> bytes:
  if isinstance(text, np.ndarray):
    text = text.item()
  return text if isinstance(text, bytes) else str(text).encode("utf-8")
