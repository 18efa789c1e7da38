"""`digits`: the 8x8 handwritten digits that scikit-learn ships, as a TFDS data set.

1,797 grey images (UCI "Optical Recognition of Handwritten Digits", the test
part, 4-bit intensities 0..16 rescaled here to uint8 0..255) with labels 0-9.
They live inside the scikit-learn package, so this builder prepares offline,
in a second, into the TFDS data dir on first use: the default experiment runs
on a machine with no internet and no TensorFlow (ArrayRecord files are written
without TensorFlow when the features are plain tensors).

The split is fixed by version 1.0.0: a permutation of the 1,797 images drawn
with numpy seed 0; its first 297 are `test`, the other 1,500 `train`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from attnlab.data import offline

NUM_TEST = 297
_SPLIT_SEED = 0  # Part of the data set's definition: changing it needs a new VERSION.


class Digits(offline.LocalBuilder, tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits with a fixed 1,500 / 297 train/test split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: seeded permutation, 297 test images."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # A plain tensor, not tfds.features.Image: PNG encoding would need TensorFlow.
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": np.int32,  # index in sklearn.datasets.load_digits()
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
        citation=(
            "@misc{alpaydin1998optical, author={Alpaydin, E. and Kaynak, C.}, title={Optical "
            "Recognition of Handwritten Digits}, year={1998}, howpublished={UCI Machine "
            "Learning Repository}, doi={10.24432/C50P49}}"
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    order = split_permutation()
    return {
        "train": self._generate_examples(order[NUM_TEST:]),
        "test": self._generate_examples(order[:NUM_TEST]),
    }

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    # 0..16 -> 0..255 so that every image data set shares one uint8 preprocessing.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i in indices:
      yield int(i), {"image": images[i][..., None], "label": int(digits.target[i]), "id": int(i)}


def split_permutation() -> np.ndarray:
  """The fixed permutation of the 1,797 sklearn indices; its first 297 are `test`."""
  return np.random.default_rng(_SPLIT_SEED).permutation(1797)


def prepare(data_dir: str | None = None) -> Digits:
  """Returns the `digits` builder, preparing it into `data_dir` if needed (offline)."""
  builder = Digits(data_dir=data_dir, file_format="array_record")
  return offline.prepare(builder, note="first use, offline", progress_bar=False)
