"""MNIST and Fashion-MNIST prepared offline from their IDX files.

`python -m attnlab.data.prepare fashion_mnist --from DIR` reads the four IDX
files in DIR (gzipped or not), checks them, and writes them as TFDS's own
`fashion_mnist` (or `mnist`) data set in ArrayRecord files: same name,
version, features (image uint8 [28, 28, 1] stored as PNG, 10-class label) and
example keys as TFDS's builders, so `tfds.data_source("fashion_mnist", ...)`
opens them and the examples come in the order of a copy that TFDS downloaded
itself. No internet and no TensorFlow: the PNGs are encoded with PIL.

A .gz file must be one of the known official copies (sha256 below); an
uncompressed file has no published hash, so it is checked for format and
counts only, and a line says so.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import struct
import sys
import zlib
from collections.abc import Mapping

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from attnlab.data import offline

NUM_CLASSES = 10
IMAGE_SIZE = 28
# split -> the stems of its (images, labels) files, as every MNIST-style set names them.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# sha256 of TFDS's downloads: tensorflow_datasets/url_checksums/{mnist,fashion_mnist}.txt
# (tests/test_prepare_idx.py checks these against the installed TFDS).
TFDS_COPY = "the official file that TFDS downloads"
# Debian's dataset-fashion-mnist (0.0~git20200523.55506a9-1) ships the same gzip
# streams under a different gzip header (no file name, another time stamp),
# hence other hashes. Checked: its files with the original header restored
# (the file name, time stamp 2017-08-31) hash to TFDS's values.
DEBIAN_COPY = "Debian's dataset-fashion-mnist"


class IdxError(Exception):
  """Preparing from IDX files failed for a reason its message explains in full."""


class IdxFileError(IdxError, ValueError):
  """An IDX file is damaged, not an IDX file, or not the official copy."""


class MissingIdxFileError(IdxError, FileNotFoundError):
  """An IDX file is not in the folder; the message says how to get it."""


class NoIdxFilesError(IdxError, ValueError):
  """The data set is not one that comes as IDX files."""


@dataclasses.dataclass(frozen=True)
class IdxDataset:
  """A TFDS data set that can be prepared from local IDX files.

  Attributes:
    name: the TFDS name.
    builder: TFDS's builder of `name`, reading the IDX files from a folder.
    url: where the official IDX files are published.
    apt_package: the Debian/Ubuntu package that installs them; None: none does.
    apt_dir: the folder that package installs them into.
    sha256: file name (.gz) -> {sha256 of a known official copy: which copy}.
  """

  name: str
  builder: type[tfds.core.DatasetBuilder]
  url: str
  apt_package: str | None
  apt_dir: str | None
  sha256: Mapping[str, Mapping[str, str]]

  def command(self, idx_dir: str, data_dir: str) -> str:
    return f"python -m attnlab.data.prepare {self.name} --from {idx_dir} --data_dir {data_dir}"

  def steps(self, data_dir: str) -> str:
    """The commands that prepare this data set offline, one a line."""
    if self.apt_package:
      return f"sudo apt-get install {self.apt_package}\n{self.command(self.apt_dir, data_dir)}"
    return (f"# save the four IDX files of {self.url} in a folder DIR, then\n"
            f"{self.command('DIR', data_dir)}")

  def how_to_get(self, idx_dir: str, data_dir: str) -> str:
    """One sentence: how to get the files and what to run then."""
    if self.apt_package:
      return (f"Install them with `sudo apt-get install {self.apt_package}`, then run: "
              f"{self.command(self.apt_dir, data_dir)}")
    return (f"Save the four IDX files of {self.url} there, then run: "
            f"{self.command(idx_dir, data_dir)}")


# ----------------------------------------------------------------------------
# TFDS's own builders, fed from a folder instead of the internet.
# ----------------------------------------------------------------------------


class _FromIdx(offline.LocalBuilder):
  """Mixin for a TFDS MNIST-style builder: reads the splits from `idx_dir`."""

  def __init__(self, *, idx_dir: str, data_dir: str, **kwargs):
    self._idx_dir, self._root_dir = idx_dir, data_dir
    super().__init__(data_dir=data_dir, **kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    # Read and check every file before TFDS writes anything.
    spec = dataset(self.name)
    splits = {split: read_split(spec, self._idx_dir, split, self._root_dir) for split in SPLIT_FILES}
    return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    # Keyed by index like TFDS's builder, so TFDS shuffles them into the same
    # order. A PIL image, not an array: TFDS encodes arrays with TensorFlow.
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": Image.fromarray(image), "label": int(label)}


class MnistFromIdx(_FromIdx, tfds_mnist.MNIST, skip_registration=True):
  name = "mnist"


class FashionMnistFromIdx(_FromIdx, tfds_mnist.FashionMNIST, skip_registration=True):
  name = "fashion_mnist"


# ----------------------------------------------------------------------------
# The data sets.
# ----------------------------------------------------------------------------


IDX_DATASETS = {
    "mnist": IdxDataset(
        name="mnist",
        builder=MnistFromIdx,
        url="https://storage.googleapis.com/cvdf-datasets/mnist/",
        apt_package=None,
        apt_dir=None,
        sha256={
            "train-images-idx3-ubyte.gz": {
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609": TFDS_COPY},
            "train-labels-idx1-ubyte.gz": {
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c": TFDS_COPY},
            "t10k-images-idx3-ubyte.gz": {
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6": TFDS_COPY},
            "t10k-labels-idx1-ubyte.gz": {
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6": TFDS_COPY},
        },
    ),
    "fashion_mnist": IdxDataset(
        name="fashion_mnist",
        builder=FashionMnistFromIdx,
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        apt_package="dataset-fashion-mnist",
        apt_dir="/usr/share/datasets/fashion-mnist",
        sha256={
            "train-images-idx3-ubyte.gz": {
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84": TFDS_COPY,
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7": DEBIAN_COPY},
            "train-labels-idx1-ubyte.gz": {
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845": TFDS_COPY,
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056": DEBIAN_COPY},
            "t10k-images-idx3-ubyte.gz": {
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073": TFDS_COPY,
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa": DEBIAN_COPY},
            "t10k-labels-idx1-ubyte.gz": {
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5": TFDS_COPY,
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05": DEBIAN_COPY},
        },
    ),
}


def dataset(name: str) -> IdxDataset:
  """The IDX record of data set `name`; a clear error for one without IDX files."""
  if name not in IDX_DATASETS:
    raise NoIdxFilesError(
        f"Data set {name!r} has no IDX files to prepare from; --from works for "
        f"{', '.join(IDX_DATASETS)}. Drop --from to prepare {name!r} the usual way."
    )
  return IDX_DATASETS[name]


def prepare(name: str, idx_dir: str, data_dir: str):
  """Writes data set `name` from the IDX files in `idx_dir` into `data_dir`; returns the builder."""
  builder = dataset(name).builder(idx_dir=idx_dir, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    print(f"{name} is already prepared in {builder.data_dir}; {idx_dir} was not read "
          f"(delete {builder.data_dir} to prepare it again).", file=sys.stderr)
  return offline.prepare(builder, note=f"offline, from {idx_dir}", progress_bar=True)


# ----------------------------------------------------------------------------
# Reading and checking the IDX files.
# ----------------------------------------------------------------------------


def read_split(spec: IdxDataset, idx_dir: str, split: str,
               data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Images [n, 28, 28] uint8 and labels [n] uint8 of `split`, checked (`data_dir`: for messages)."""
  images_stem, labels_stem = SPLIT_FILES[split]
  images_path = find_file(spec, idx_dir, images_stem, data_dir)
  labels_path = find_file(spec, idx_dir, labels_stem, data_dir)
  images = parse_idx(read_checked(spec, images_path), source=images_path, ndim=3)
  labels = parse_idx(read_checked(spec, labels_path), source=labels_path, ndim=1)
  if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise IdxFileError(f"{images_path}: images of {images.shape[1:]} pixels, expected "
                       f"{(IMAGE_SIZE, IMAGE_SIZE)} for {spec.name}.")
  if len(images) != len(labels):
    raise IdxFileError(f"{images_path} holds {len(images)} images but {labels_path} "
                       f"{len(labels)} labels; the two files of a split must match.")
  if labels.size and labels.max() >= NUM_CLASSES:
    raise IdxFileError(f"{labels_path}: label {labels.max()} found, expected 0..{NUM_CLASSES - 1}.")
  return images, labels


def find_file(spec: IdxDataset, idx_dir: str, stem: str, data_dir: str) -> epath.Path:
  """`stem`.gz in `idx_dir`, else `stem` uncompressed; the .gz first as it can be verified."""
  folder = epath.Path(idx_dir)
  for path in (folder / f"{stem}.gz", folder / stem):
    if path.exists():
      return path
  raise MissingIdxFileError(
      f"{stem}.gz (or uncompressed {stem}) is not in {idx_dir}. "
      f"{spec.how_to_get(idx_dir, data_dir)}"
  )


def read_checked(spec: IdxDataset, path: epath.Path) -> bytes:
  """The IDX bytes of `path`: a .gz verified against the official sha256, then decompressed."""
  data = path.read_bytes()
  if path.suffix != ".gz":
    print(f"{path}: uncompressed, so its sha256 cannot be verified (only the official .gz "
          f"files have one); checking its format and counts only.", file=sys.stderr)
    return data
  verify_sha256(path, data, spec.sha256.get(path.name, {}))
  try:
    return gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise IdxFileError(f"{path}: not a valid gzip file ({e}).") from e


def verify_sha256(path: epath.Path, data: bytes, known: Mapping[str, str]) -> None:
  """Raises unless sha256(`data`) is one of `known` (sha256 -> which copy)."""
  actual = hashlib.sha256(data).hexdigest()
  if actual in known:
    print(f"{path}: sha256 verified ({known[actual]}).", file=sys.stderr)
    return
  expected = " or ".join(f"{sha} ({copy})" for sha, copy in known.items()) or "none known"
  raise IdxFileError(
      f"{path}: sha256 {actual} is not that of an official copy; expected {expected}. The file "
      f"is damaged or comes from elsewhere: get it again. If you trust it, decompress it "
      f"(`gunzip {path}`): an uncompressed file is read without a checksum."
  )


_UNSIGNED_BYTE = 0x08  # IDX type code; MNIST-style files hold nothing else.


def parse_idx(data: bytes, *, source, ndim: int) -> np.ndarray:
  """The uint8 array of an IDX file with `ndim` dimensions; raises IdxFileError if malformed.

  IDX: magic (two zero bytes, the type code, the number of dimensions), then
  each dimension as a big-endian uint32, then the values in C order.
  """
  expected_magic = bytes([0, 0, _UNSIGNED_BYTE, ndim])
  if data[:4] != expected_magic:
    raise IdxFileError(
        f"{source}: magic number 0x{data[:4].hex()}, expected 0x{expected_magic.hex()} "
        f"(unsigned bytes, {ndim} dimensions): not an IDX file of this kind, or damaged."
    )
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFileError(f"{source}: {len(data)} bytes, shorter than its {header}-byte header.")
  dims = struct.unpack(f">{ndim}I", data[4:header])
  if len(data) - header != math.prod(dims):
    raise IdxFileError(
        f"{source}: the header promises {'x'.join(map(str, dims))} = {math.prod(dims)} bytes "
        f"of data, the file holds {len(data) - header}: truncated or damaged; get it again."
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)
