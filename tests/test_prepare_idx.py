"""Tests of attnlab.data.idx: MNIST-style IDX files prepared offline as TFDS's own data sets.

The IDX files are small ones written here (12 train, 5 test images); nothing
needs /usr/share/datasets or the internet.
"""

import dataclasses
import gzip
import hashlib
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnlab import data
from attnlab.data import idx, prepare, sources

SIZES = {"train": 12, "test": 5}


def idx_bytes(array: np.ndarray) -> bytes:
  """An IDX file written independently of the parser under test."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def make_split_arrays(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n, dtype=np.uint8)) for split, n in SIZES.items()}


def write_idx_dir(folder, arrays, *, gz: bool):
  """Writes the four files into `folder`; returns {file name: sha256 of what was written}."""
  os.makedirs(folder, exist_ok=True)
  hashes = {}
  for split, (images_stem, labels_stem) in idx.SPLIT_FILES.items():
    for stem, array in zip((images_stem, labels_stem), arrays[split]):
      content = idx_bytes(array)
      name = f"{stem}.gz" if gz else stem
      if gz:
        content = gzip.compress(content, mtime=0)
      (folder / name).write_bytes(content)
      hashes[name] = hashlib.sha256(content).hexdigest()
  return hashes


@pytest.fixture
def trust(monkeypatch):
  """Adds the hashes of test files to data set `name`'s known copies, as the official ones are."""
  def add(name, hashes):
    spec = idx.IDX_DATASETS[name]
    known = {file: {**spec.sha256[file], hashes[file]: "the test's copy"} for file in spec.sha256}
    monkeypatch.setitem(idx.IDX_DATASETS, name, dataclasses.replace(spec, sha256=known))
  return add


def assert_same_examples(source, images, labels):
  """Every IDX example read back once, pixels and label exact (TFDS shuffles the order)."""
  assert len(source) == len(images)
  expected = {images[i].tobytes(): int(labels[i]) for i in range(len(images))}
  assert len(expected) == len(images)  # random images: all distinct
  seen = set()
  for i in range(len(source)):
    example = source[i]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    key = example["image"][..., 0].tobytes()
    assert key in expected and int(example["label"]) == expected[key]
    seen.add(key)
  assert seen == set(expected)


# ----------------------------------------------------------------------------
# Preparing and reading back through the path training uses
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, gz", [("fashion_mnist", True), ("fashion_mnist", False),
                                      ("mnist", True)])
def test_prepared_idx_reads_back_exactly_as_tfds_dataset(tmp_path, trust, name, gz):
  arrays = make_split_arrays()
  hashes = write_idx_dir(tmp_path / "idx", arrays, gz=gz)
  if gz:
    trust(name, hashes)
  data_dir = str(tmp_path / "tfds")
  prepare.prepare(name, data_dir, idx_dir=str(tmp_path / "idx"))
  for split, (images, labels) in arrays.items():
    assert_same_examples(sources.tfds_source(name, split, data_dir), images, labels)
  # The features of TFDS's own builder: what training and an internet-prepared copy see.
  info = tfds.builder(name, data_dir=data_dir).info
  assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert isinstance(info.features["image"], tfds.features.Image)
  assert info.features["image"].shape == (28, 28, 1) and info.features["image"].np_dtype == np.uint8
  assert info.features["label"].num_classes == 10 and info.features["label"].np_dtype == np.int64
  assert {s: info.splits[s].num_examples for s in SIZES} == SIZES


def test_prepared_idx_loads_through_the_training_pipeline(tmp_path):
  arrays = make_split_arrays(seed=1)
  write_idx_dir(tmp_path / "idx", arrays, gz=False)
  prepare.prepare("fashion_mnist", str(tmp_path / "tfds"), idx_dir=str(tmp_path / "idx"))
  sets = data.load(data.DataConfig(name="fashion_mnist", data_dir=str(tmp_path / "tfds")), seed=0)
  assert sets.spec.input_shape == (28, 28, 1) and sets.spec.num_classes == 10
  assert (sets.spec.num_train_examples, sets.spec.num_eval_examples) == (12, 5)


def test_prepare_from_idx_needs_no_tensorflow(tmp_path):
  write_idx_dir(tmp_path / "idx", make_split_arrays(), gz=False)
  out = subprocess.run(
      [sys.executable, "-c",
       "import sys\n"
       "from attnlab.data import prepare, sources\n"
       f"prepare.prepare('fashion_mnist', {str(tmp_path / 'tfds')!r}, "
       f"idx_dir={str(tmp_path / 'idx')!r})\n"
       f"print(len(sources.tfds_source('fashion_mnist', 'train', {str(tmp_path / 'tfds')!r})))\n"
       "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"],
      capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("12")
  # An uncompressed file has no official hash: say so rather than pass it as verified.
  assert "cannot be verified" in out.stderr


def test_gz_files_take_precedence_and_are_verified(tmp_path, trust):
  arrays = make_split_arrays()
  trust("fashion_mnist", write_idx_dir(tmp_path / "idx", arrays, gz=True))
  write_idx_dir(tmp_path / "idx", make_split_arrays(seed=7), gz=False)  # would differ if read
  spec = idx.IDX_DATASETS["fashion_mnist"]
  images, labels = idx.read_split(spec, str(tmp_path / "idx"), "train", "unused")
  np.testing.assert_array_equal(images, arrays["train"][0])
  np.testing.assert_array_equal(labels, arrays["train"][1])


# ----------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------


def test_gz_file_with_unknown_hash_is_an_error_naming_file_and_hashes(tmp_path):
  hashes = write_idx_dir(tmp_path / "idx", make_split_arrays(), gz=True)
  with pytest.raises(idx.IdxFileError) as err:
    prepare.prepare("fashion_mnist", str(tmp_path / "tfds"), idx_dir=str(tmp_path / "idx"))
  message = str(err.value)
  # train comes first; its images file is the first checked.
  assert str(tmp_path / "idx" / "train-images-idx3-ubyte.gz") in message
  assert hashes["train-images-idx3-ubyte.gz"] in message  # actual
  assert "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84" in message  # TFDS's
  assert not os.path.exists(tmp_path / "tfds" / "fashion_mnist" / "3.0.1")  # nothing written


def test_known_hashes_are_those_tfds_ships():
  # TFDS's own record of the files it downloads; the Debian copies are extra.
  tfds_dir = os.path.dirname(tfds.__file__)
  for name, spec in idx.IDX_DATASETS.items():
    path = os.path.join(tfds_dir, "url_checksums", f"{name}.txt")
    assert os.path.exists(path), f"TFDS moved its checksums of {name}; find them and update this test."
    with open(path) as f:
      shipped = {row.split("\t")[3].strip(): row.split("\t")[2] for row in f if row.strip()}
    ours = {file: {sha for sha, copy in known.items() if copy == idx.TFDS_COPY}
            for file, known in spec.sha256.items()}
    assert ours == {file: {sha} for file, sha in shipped.items()}, name


# ----------------------------------------------------------------------------
# Malformed and missing files
# ----------------------------------------------------------------------------


def test_parse_idx_reads_what_was_written():
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  np.testing.assert_array_equal(idx.parse_idx(idx_bytes(array), source="x", ndim=3), array)


@pytest.mark.parametrize("content, match", [
    (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02\x03", r"magic number 0x00000801, "
     r"expected 0x00000803"),  # a labels file where images belong
    (b"\x00\x00\x0d\x03" + struct.pack(">3I", 1, 1, 1) + b"\x00", "magic number 0x00000d03"),
    (b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 28, 28) + bytes(28 * 28), r"2x28x28 = 1568 bytes "
     r"of data, the file holds 784: truncated"),
    (b"\x00\x00\x08\x03" + struct.pack(">2I", 2, 28), "shorter than its 16-byte header"),
    (b"PK", "magic number 0x504b"),
])
def test_malformed_idx_is_a_clear_error(content, match):
  with pytest.raises(idx.IdxFileError, match=match):
    idx.parse_idx(content, source="train-images-idx3-ubyte", ndim=3)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "train": (a["train"][0][:, :14], a["train"][1])}, r"images of \(14, 28\) pixels"),
    (lambda a: {**a, "test": (a["test"][0], a["test"][1][:4])}, "5 images but .* 4 labels"),
    (lambda a: {**a, "train": (a["train"][0], a["train"][1] + 10)}, "label 1[0-9] found"),
])
def test_inconsistent_split_is_a_clear_error(tmp_path, change, match):
  write_idx_dir(tmp_path, change(make_split_arrays()), gz=False)
  with pytest.raises(idx.IdxFileError, match=match):
    prepare.prepare("fashion_mnist", str(tmp_path / "tfds"), idx_dir=str(tmp_path))


def test_damaged_gzip_is_a_clear_error(tmp_path, trust):
  hashes = write_idx_dir(tmp_path, make_split_arrays(), gz=True)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-6])  # truncated
  trust("fashion_mnist", {**hashes, path.name: hashlib.sha256(path.read_bytes()).hexdigest()})
  with pytest.raises(idx.IdxFileError, match=f"{path}: not a valid gzip file"):
    idx.read_split(idx.IDX_DATASETS["fashion_mnist"], str(tmp_path), "train", "unused")


def test_missing_file_names_it_the_folder_the_package_and_the_command(tmp_path):
  write_idx_dir(tmp_path, make_split_arrays(), gz=False)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  with pytest.raises(idx.MissingIdxFileError) as err:
    prepare.prepare("fashion_mnist", "/data/tfds", idx_dir=str(tmp_path))
  message = str(err.value)
  assert "\n" not in message
  assert f"t10k-labels-idx1-ubyte.gz (or uncompressed t10k-labels-idx1-ubyte) is not in {tmp_path}" in message
  assert "sudo apt-get install dataset-fashion-mnist" in message
  assert ("python -m attnlab.data.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist "
          "--data_dir /data/tfds") in message


def test_missing_mnist_file_says_where_the_files_are_published(tmp_path):
  with pytest.raises(idx.MissingIdxFileError) as err:
    prepare.prepare("mnist", "/data/tfds", idx_dir=str(tmp_path))
  assert "https://storage.googleapis.com/cvdf-datasets/mnist/" in str(err.value)
  assert f"python -m attnlab.data.prepare mnist --from {tmp_path} --data_dir /data/tfds" in str(err.value)


def test_not_prepared_error_gives_the_offline_route_beside_the_internet_one(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.load(data.DataConfig(name="fashion_mnist", data_dir=str(tmp_path)), seed=0)
  message = str(err.value)
  assert "sudo apt-get install dataset-fashion-mnist" in message
  assert (f"python -m attnlab.data.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist "
          f"--data_dir {tmp_path}") in message
  assert f"python -m attnlab.data.prepare fashion_mnist --data_dir {tmp_path}" in message


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


def run_prepare(*args):
  return subprocess.run([sys.executable, "-m", "attnlab.data.prepare", *args], capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_command_prepares_from_idx_and_says_where(tmp_path):
  write_idx_dir(tmp_path / "idx", make_split_arrays(), gz=False)
  out = run_prepare("fashion_mnist", "--from", str(tmp_path / "idx"), "--data_dir", str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"Prepared fashion_mnist in {tmp_path}" in out.stdout
  again = run_prepare("fashion_mnist", "--from", str(tmp_path / "nowhere"), "--data_dir",
                      str(tmp_path))
  assert again.returncode == 0 and "already prepared" in again.stderr


@pytest.mark.parametrize("args, match", [
    (["cifar10", "--from", "/x"], "'cifar10' has no IDX files to prepare from; --from works for "
     "mnist, fashion_mnist"),
    (["mnist", "fashion_mnist", "--from", "/x"], "--from is one data set's folder"),
    (["mnist", "--from", "/nowhere"], "train-images-idx3-ubyte.gz .* is not in /nowhere"),
])
def test_command_errors_are_one_clear_message(tmp_path, args, match):
  out = run_prepare(*args, "--data_dir", str(tmp_path))
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  assert re.search(match, out.stderr), out.stderr[-2000:]
