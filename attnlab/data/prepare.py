"""Prepares TFDS data sets in the ArrayRecord format that attnlab reads.

MNIST and Fashion-MNIST, offline from their IDX files (no internet, no
TensorFlow; the .gz files are checked against the official sha256):

  sudo apt-get install dataset-fashion-mnist
  python -m attnlab.data.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist
  python -m attnlab.data.prepare mnist --from DIR  # DIR: the four IDX files, from anywhere

Any of them with internet (and, for image data sets, TensorFlow, which TFDS
needs to encode PNGs while writing; attnlab never needs it to read):

  pip install 'attnlab[prepare]'
  python -m attnlab.data.prepare mnist fashion_mnist cifar10 tiny_shakespeare \\
      --data_dir ~/tensorflow_datasets

`digits` needs none of this: it is prepared offline on first use.
"""

from __future__ import annotations

from absl import app, flags

from attnlab.data import digits as digits_lib
from attnlab.data import idx, sources

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)
_FROM = flags.DEFINE_string(
    "from", None,
    f"Folder with the data set's IDX files (.gz or uncompressed), to prepare offline instead of "
    f"downloading; for {', '.join(idx.IDX_DATASETS)} only.",
)


def prepare(name: str, data_dir: str | None = None, idx_dir: str | None = None) -> str:
  """Writes data set `name` as ArrayRecord files; returns the data dir.

  Args:
    name: "digits", or a TFDS name of sources.PREPARABLE.
    data_dir: the TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    idx_dir: a folder with the IDX files of `name` (mnist, fashion_mnist):
      prepare from them, offline. None: download with TFDS (needs TensorFlow).
  """
  data_dir = sources.resolve_data_dir(data_dir)
  if idx_dir is not None:
    idx.prepare(name, idx_dir, data_dir)
  elif name == "digits":
    digits_lib.prepare(data_dir)
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    tfds.builder(name, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def main(argv):
  names = argv[1:]
  if not names:
    raise app.UsageError(f"Name the data sets to prepare: {', '.join(sources.PREPARABLE + ('digits',))}.")
  if _FROM.value is not None and len(names) != 1:
    raise app.UsageError(f"--from is one data set's folder; got {len(names)} data sets "
                         f"({' '.join(names)}): prepare one at a time.")
  for name in names:
    try:
      print(f"Prepared {name} in {prepare(name, _DATA_DIR.value, _FROM.value)}")
    except idx.IdxError as e:  # The message is the whole story; no traceback.
      raise SystemExit(f"Could not prepare {name}: {e}") from e


if __name__ == "__main__":
  app.run(main)
