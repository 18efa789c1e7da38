"""Prepares TFDS data sets in the ArrayRecord format that attnlab reads.

Run once, on a machine with internet (and, for image data sets, TensorFlow,
which TFDS needs to encode PNGs while writing; attnlab never needs it to read):

  pip install 'attnlab[prepare]'
  python -m attnlab.data.prepare mnist fashion_mnist cifar10 tiny_shakespeare \
      --data_dir ~/tensorflow_datasets

`digits` needs none of this: it is prepared offline on first use.
"""

from __future__ import annotations

from absl import app, flags

from attnlab.data import digits as digits_lib
from attnlab.data import sources

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)


def prepare(name: str, data_dir: str | None = None) -> str:
  """Downloads and writes data set `name` as ArrayRecord files; returns the data dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = sources.resolve_data_dir(data_dir)
  if name == "digits":
    digits_lib.prepare(data_dir)
  else:
    tfds.builder(name, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def main(argv):
  names = argv[1:]
  if not names:
    raise app.UsageError(f"Name the data sets to prepare: {', '.join(sources.PREPARABLE + ('digits',))}.")
  for name in names:
    print(f"Prepared {name} in {prepare(name, _DATA_DIR.value)}")


if __name__ == "__main__":
  app.run(main)
