"""Data for attnlab: TFDS (ArrayRecord, no TensorFlow) and synthetic tasks, through grain."""

from attnlab.data.pipeline import (
    DATASETS,
    DataConfig,
    Datasets,
    DataSpec,
    epoch_batches,
    eval_batches,
    load,
    resolve_num_steps,
    train_batches,
    to_arrays,
    train_iterator,
)
from attnlab.data.sources import DatasetNotPreparedError, MQARSpec

__all__ = [
    "DATASETS",
    "DataConfig",
    "DataSpec",
    "DatasetNotPreparedError",
    "Datasets",
    "MQARSpec",
    "epoch_batches",
    "eval_batches",
    "load",
    "resolve_num_steps",
    "train_batches",
    "to_arrays",
    "train_iterator",
]
