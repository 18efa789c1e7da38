"""Writing TFDS data sets as ArrayRecord files offline: no download, no TensorFlow.

TFDS writes ArrayRecord files without TensorFlow as long as no feature needs
it to encode an example (plain tensors and class labels do not; an image
feature does only when handed a NumPy array, not a PIL image). The builders
that attnlab defines to prepare data on a machine with neither (`digits`, and
MNIST / Fashion-MNIST from local IDX files) share the two pieces here.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import tensorflow_datasets as tfds
from etils import epath


class LocalBuilder:
  """Mixin for TFDS builders defined in attnlab (list it before the TFDS base)."""

  # TFDS finds a builder's file through importlib resources, which for an
  # editable install of attnlab (a MultiplexedPath) imports the
  # `importlib_resources` backport that Python >= 3.9 does not install.
  # The builder's file is known: say so.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


def prepare(builder: tfds.core.DatasetBuilder, *, note: str, progress_bar: bool):
  """Writes `builder`'s splits as ArrayRecord files in its data dir, unless already there.

  Args:
    builder: a builder made with file_format="array_record" whose
      `_split_generators` needs no download.
    note: why or from where, for the line announcing the work (e.g. "first use, offline").
    progress_bar: show TFDS's per-split progress bars (noise for a second's work).

  Returns:
    `builder`, prepared.
  """
  if builder.is_prepared():
    return builder
  print(f"Preparing the {builder.name} data set in {builder.data_dir} ({note})...",
        file=sys.stderr, flush=True)
  with _progress_bars(progress_bar):
    builder.download_and_prepare()
  return builder


@contextlib.contextmanager
def _progress_bars(show: bool):
  tfds.display_progress_bar(show)
  try:
    yield
  finally:
    tfds.display_progress_bar(True)  # TFDS's default
