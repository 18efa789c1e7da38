"""Tests of attnlab.data: the offline digits builder, MQAR, text windows, pipelines, budgets."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnlab import data
from attnlab.data import digits, pipeline, sources


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits_sets(data_dir):
  return data.load(data.DataConfig(name="digits", data_dir=data_dir), seed=0)


# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------


def test_digits_prepares_offline_with_fixed_disjoint_splits(data_dir, digits_sets):
  builder = digits.prepare(data_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1500
  assert builder.info.splits["test"].num_examples == digits.NUM_TEST == 297
  train_ids = {int(builder.as_data_source("train")[i]["id"]) for i in range(1500)}
  test_ids = {int(builder.as_data_source("test")[i]["id"]) for i in range(297)}
  assert not train_ids & test_ids
  assert train_ids | test_ids == set(range(1797))
  # Fixed: the test split is the first 297 of the seed-0 permutation, on any machine.
  assert test_ids == set(np.random.default_rng(0).permutation(1797)[:297].tolist())
  assert digits_sets.spec == data.DataSpec(task="classification", num_classes=10,
                                           input_shape=(8, 8, 1), num_train_examples=1500,
                                           num_eval_examples=297)


def test_digits_images_match_sklearn(data_dir):
  from sklearn.datasets import load_digits

  reference = load_digits()
  example = digits.prepare(data_dir).as_data_source("test")[5]
  i = int(example["id"])
  np.testing.assert_array_equal(
      example["image"][..., 0], np.round(reference.images[i] * 255 / 16).astype(np.uint8))
  assert int(example["label"]) == int(reference.target[i])


def test_digits_prepare_and_read_need_no_tensorflow(tmp_path):
  code = (
      "import sys\n"
      "from attnlab import data\n"
      f"d = data.load(data.DataConfig(name='digits', data_dir={str(tmp_path)!r}), seed=0)\n"
      "b = data.train_batches(d, batch_size=4, num_steps=2, seed=0)[0]\n"
      "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
      "print('ok', b['inputs'].shape)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ok (4, 8, 8, 1)" in out.stdout


def test_image_examples_are_formatted(digits_sets):
  example = digits_sets.train[0]
  assert example["inputs"].dtype == np.float32 and example["inputs"].shape == (8, 8, 1)
  assert -1.0 <= example["inputs"].min() and example["inputs"].max() <= 1.0
  assert example["targets"].dtype == np.int32 and example["weights"] == 1.0


# ----------------------------------------------------------------------------
# Subsets, order, iterator state, evaluation batches, budgets
# ----------------------------------------------------------------------------


def test_train_subsets_are_nested_and_leave_eval_unchanged(data_dir, digits_sets):
  def subset(n):
    sets = data.load(data.DataConfig(name="digits", data_dir=data_dir, train_examples=n), seed=3)
    return sets, np.stack([sets.train[i]["inputs"] for i in range(n)])

  small_sets, small = subset(50)
  _, large = subset(120)
  np.testing.assert_array_equal(small, large[:50])
  assert small_sets.spec.num_train_examples == 50
  assert small_sets.spec.num_eval_examples == 297
  np.testing.assert_array_equal(small_sets.eval[7]["inputs"], digits_sets.eval[7]["inputs"])


def test_train_subset_larger_than_split_is_an_error(data_dir):
  with pytest.raises(ValueError, match="train_examples=5000 exceeds the 1500"):
    data.load(data.DataConfig(name="digits", data_dir=data_dir, train_examples=5000), seed=0)


def test_train_order_depends_only_on_seed_and_reshuffles_each_epoch(digits_sets):
  a = data.train_batches(digits_sets, batch_size=500, num_steps=6, seed=1)
  b = data.train_batches(digits_sets, batch_size=500, num_steps=6, seed=1)
  c = data.train_batches(digits_sets, batch_size=500, num_steps=6, seed=2)
  np.testing.assert_array_equal(a[4]["targets"], b[4]["targets"])
  assert not np.array_equal(a[0]["targets"], c[0]["targets"])
  # Batches 0-2 and 3-5 are two epochs: same examples, another order.
  epoch1 = np.concatenate([a[i]["inputs"] for i in range(3)]).reshape(1500, -1)
  epoch2 = np.concatenate([a[i]["inputs"] for i in range(3, 6)]).reshape(1500, -1)
  assert not np.array_equal(epoch1, epoch2)
  np.testing.assert_array_equal(np.sort(epoch1.sum(1)), np.sort(epoch2.sum(1)))


def test_iterator_state_resumes_at_the_same_batch(digits_sets):
  batches = data.train_batches(digits_sets, batch_size=16, num_steps=20, seed=0)
  it = data.train_iterator(batches)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = next(it)
  resumed = data.train_iterator(batches, state)
  np.testing.assert_array_equal(next(resumed)["inputs"], expected["inputs"])


def test_eval_batches_cover_the_split_once_with_zero_weight_padding(digits_sets):
  batches = list(data.eval_batches(digits_sets.eval, 128))
  assert [b["inputs"].shape[0] for b in batches] == [128, 128, 128]
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.sum() == 297 and np.all(weights[297:] == 0)


# ----------------------------------------------------------------------------
# Validation split, in-memory arrays, study training order
# ----------------------------------------------------------------------------


def _digits(data_dir, seed=0, **fields):
  return data.load(data.DataConfig(name="digits", data_dir=data_dir, **fields), seed=seed)


def _ids(dataset):
  """Each formatted digits example as bytes, so sets of examples can be compared."""
  return [dataset[i]["inputs"].tobytes() + dataset[i]["targets"].tobytes()
          for i in range(len(dataset))]


def test_subsets_without_validation_are_the_permutation_prefix(data_dir, digits_sets):
  sets = _digits(data_dir, train_examples=40, subset_seed=5)
  chosen = np.random.default_rng(5).permutation(1500)[:40]
  assert _ids(sets.train) == [_ids(digits_sets.train[int(i):int(i) + 1])[0] for i in chosen]
  assert sets.validation is None and sets.spec.num_validation_examples == 0
  assert _digits(data_dir).validation is None


def test_validation_split_is_the_permutation_suffix_and_leaves_subsets_unchanged(data_dir,
                                                                                  digits_sets):
  plain = _digits(data_dir, train_examples=40, subset_seed=5)
  sets = _digits(data_dir, train_examples=40, subset_seed=5, validation_examples=30)
  assert _ids(sets.train) == _ids(plain.train)  # bitwise the same subset, same order
  suffix = np.random.default_rng(5).permutation(1500)[-30:]
  assert _ids(sets.validation) == [_ids(digits_sets.train[int(i):int(i) + 1])[0] for i in suffix]
  assert sets.spec.num_validation_examples == 30 and sets.spec.num_train_examples == 40
  example = sets.validation[0]  # formatted like the other splits
  assert example["inputs"].dtype == np.float32 and example["inputs"].shape == (8, 8, 1)


def test_validation_split_is_fixed_and_disjoint_from_nested_subsets(data_dir):
  # The 1500 digits training images are distinct, so examples compare by content.
  validation, subsets = None, []
  for n, seed in [(10, 0), (100, 1), (1400, 2), (None, 3)]:
    sets = _digits(data_dir, seed=seed, train_examples=n, validation_examples=100)
    validation = validation or _ids(sets.validation)
    assert _ids(sets.validation) == validation  # independent of the subset size and the seed
    subsets.append(_ids(sets.train))
    assert not set(subsets[-1]) & set(validation)
  for small, large in zip(subsets, subsets[1:]):
    assert large[:len(small)] == small  # nested
  order = np.random.default_rng(0).permutation(1500)
  digits_all = _ids(_digits(data_dir).train)
  assert subsets[-1] == [digits_all[i] for i in order[:1400]]  # None: all but validation
  assert validation == [digits_all[i] for i in order[1400:]]


@pytest.mark.parametrize("fields, match", [
    (dict(validation_examples=0), "validation_examples=0: expected >= 1"),
    (dict(validation_examples=1500), "validation_examples=1500 leaves no training.*< 1500"),
    (dict(validation_examples=100, train_examples=1401),
     r"train_examples=1401 \+ validation_examples=100 exceeds the 1500.*<= 1400"),
])
def test_bad_validation_split_is_a_clear_error(data_dir, fields, match):
  with pytest.raises(ValueError, match=match):
    _digits(data_dir, **fields)


def test_mqar_validation_split_is_cut_from_the_train_split():
  cfg = data.DataConfig(name="mqar", train_split="train[:40]", train_size=100, eval_size=30,
                        mqar=MQAR, train_examples=8, validation_examples=10)
  sets = data.load(cfg, seed=0)
  assert sets.spec.num_validation_examples == 10 and sets.spec.num_train_examples == 8
  source = sources.MQARSource(data.MQARSpec(**MQAR), split="train", size=100, seed=0)
  order = np.random.default_rng(0).permutation(40)
  np.testing.assert_array_equal(sets.validation[3]["inputs"], source[int(order[33])]["inputs"])
  np.testing.assert_array_equal(sets.train[2]["inputs"], source[int(order[2])]["inputs"])


def test_text_windows_get_a_validation_split(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    sets = data.load(data.DataConfig(name="tiny_shakespeare", data_dir=str(tmp_path), seq_len=8,
                                     eval_split="validation", validation_examples=2), seed=0)
  assert sets.spec.num_validation_examples == 2
  assert sets.validation[1]["inputs"].shape == (8,)


def _mqar_sets(seed, synthetic_seed):
  cfg = data.DataConfig(name="mqar", train_size=20, eval_size=10, mqar=MQAR,
                        synthetic_seed=synthetic_seed)
  return data.load(cfg, seed=seed)


def test_synthetic_seed_makes_mqar_splits_independent_of_the_run_seed():
  a, b = _mqar_sets(seed=0, synthetic_seed=7), _mqar_sets(seed=1, synthetic_seed=7)
  for split in ("train", "eval"):
    np.testing.assert_array_equal(data.to_arrays(getattr(a, split))["inputs"],
                                  data.to_arrays(getattr(b, split))["inputs"])
  c, d = _mqar_sets(seed=0, synthetic_seed=None), _mqar_sets(seed=1, synthetic_seed=None)
  assert not np.array_equal(c.train[0]["inputs"], d.train[0]["inputs"])  # None: the run's seed
  np.testing.assert_array_equal(_mqar_sets(seed=7, synthetic_seed=None).eval[4]["inputs"],
                                a.eval[4]["inputs"])


def test_synthetic_seed_for_real_data_is_a_clear_error():
  with pytest.raises(ValueError, match="synthetic_seed=3 has no meaning for data set 'digits'"):
    data.DataConfig(name="digits", synthetic_seed=3)


def test_to_arrays_stacks_every_example(digits_sets):
  arrays = data.to_arrays(digits_sets.eval)
  assert set(arrays) == {"inputs", "targets", "weights"}
  for key, value in arrays.items():
    expected = np.stack([digits_sets.eval[i][key] for i in range(297)])
    np.testing.assert_array_equal(value, expected)
    assert value.dtype == expected.dtype


def test_epoch_batches_covers_each_epoch_once_and_straddles():
  batches = data.epoch_batches(10, 4, seed=3, start_step=0, stop_step=5)  # 20 = two epochs
  assert batches.shape == (5, 4) and batches.dtype == np.int32
  flat = batches.reshape(-1)
  np.testing.assert_array_equal(flat[:10], np.random.default_rng([3, 0]).permutation(10))
  np.testing.assert_array_equal(flat[10:], np.random.default_rng([3, 1]).permutation(10))
  assert not np.array_equal(flat[:10], flat[10:])  # reshuffled each epoch
  np.testing.assert_array_equal(batches[2], flat[8:12])  # step 2 straddles epochs 0 and 1
  assert not np.array_equal(batches, data.epoch_batches(10, 4, 4, 0, 5))


@pytest.mark.parametrize("start, stop", [(0, 0), (0, 9), (3, 4), (2, 7), (5, 9), (9, 9)])
def test_epoch_batches_of_a_range_equal_those_rows_of_a_longer_range(start, stop):
  whole = data.epoch_batches(7, 3, seed=11, start_step=0, stop_step=9)
  part = data.epoch_batches(7, 3, seed=11, start_step=start, stop_step=stop)
  assert part.shape == (stop - start, 3)
  np.testing.assert_array_equal(part, whole[start:stop])


@pytest.mark.parametrize("args, match", [
    (dict(batch_size=0), "batch_size=0: expected >= 1"),
    (dict(batch_size=11), "batch_size=11 exceeds num_examples=10"),
    (dict(start_step=-1), "start_step=-1, stop_step=4: expected 0 <= start_step <= stop_step"),
    (dict(start_step=5), "start_step=5, stop_step=4"),
    (dict(seed=-1), "seed=-1: expected >= 0"),
])
def test_epoch_batches_bad_arguments_are_clear_errors(args, match):
  kwargs = dict(num_examples=10, batch_size=2, seed=0, start_step=0, stop_step=4)
  with pytest.raises(ValueError, match=match):
    data.epoch_batches(**{**kwargs, **args})


@pytest.mark.parametrize("budget, expected", [
    (dict(total_steps=7), 7),
    (dict(num_epochs=2), 30),  # 2 * 1500 / 100
    (dict(num_epochs=0.5), 8),  # ceil(7.5)
    (dict(total_examples=1001), 11),
])
def test_budget_in_steps_epochs_or_examples(budget, expected):
  assert data.resolve_num_steps(batch_size=100, num_train_examples=1500, **budget) == expected


@pytest.mark.parametrize("budget", [{}, dict(total_steps=3, num_epochs=1)])
def test_budget_needs_exactly_one_kind(budget):
  with pytest.raises(ValueError, match="exactly one of"):
    data.resolve_num_steps(batch_size=8, num_train_examples=100, **budget)


# ----------------------------------------------------------------------------
# MQAR
# ----------------------------------------------------------------------------

MQAR = dict(vocab_size=32, num_kv_pairs=4, num_queries=3, seq_len=20)


def test_mqar_examples_are_deterministic_and_answerable():
  spec = data.MQARSpec(**MQAR)
  source = sources.MQARSource(spec, split="train", size=100, seed=0)
  again = sources.MQARSource(spec, split="train", size=100, seed=0)
  for i in range(20):
    ex = source[i]
    np.testing.assert_array_equal(ex["inputs"], again[i]["inputs"])
    seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
    np.testing.assert_array_equal(ex["targets"], seq[1:])
    keys, values = seq[0:8:2], seq[1:8:2]
    assert len(set(keys.tolist())) == 4 and keys.max() < 16 <= values.min()
    answers = np.flatnonzero(ex["weights"])
    assert len(answers) == 3 and answers.min() >= 8
    for p in answers:  # the target at a query is the value paired with that key
      assert ex["targets"][p] == values[list(keys).index(ex["inputs"][p])]


def test_mqar_splits_and_seeds_differ():
  spec = data.MQARSpec(**MQAR)
  train = sources.MQARSource(spec, split="train", size=10, seed=0)
  test = sources.MQARSource(spec, split="test", size=10, seed=0)
  other = sources.MQARSource(spec, split="train", size=10, seed=1)
  assert not np.array_equal(train[0]["inputs"], test[0]["inputs"])
  assert not np.array_equal(train[0]["inputs"], other[0]["inputs"])


def test_mqar_pipeline_spec_and_split_slices():
  cfg = data.DataConfig(name="mqar", train_split="train[:40]", train_size=100, eval_size=30,
                        mqar=MQAR)
  sets = data.load(cfg, seed=0)
  assert sets.spec == data.DataSpec(task="lm", num_classes=32, input_shape=(20,),
                                    num_train_examples=40, num_eval_examples=30)
  batch = data.train_batches(sets, batch_size=8, num_steps=3, seed=0)[0]
  assert batch["inputs"].shape == batch["weights"].shape == (8, 20)


@pytest.mark.parametrize("fields, match", [
    (dict(num_kv_pairs=20), "distinct keys"),
    (dict(num_queries=5), "num_queries=5"),
    (dict(seq_len=10), "seq_len >= 13"),
])
def test_mqar_bad_spec_is_a_clear_error(fields, match):
  with pytest.raises(ValueError, match=match):
    data.MQARSpec(**{**MQAR, **fields})


# ----------------------------------------------------------------------------
# Named TFDS data sets: missing, mocked, text windows
# ----------------------------------------------------------------------------


def test_missing_tfds_dataset_names_the_command_that_prepares_it(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.load(data.DataConfig(name="mnist", data_dir=str(tmp_path)), seed=0)
  assert f"python -m attnlab.data.prepare mnist --data_dir {tmp_path}" in str(err.value)


def test_mocked_mnist_goes_through_the_same_path(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    sets = data.load(data.DataConfig(name="mnist", data_dir=str(tmp_path)), seed=0)
    batch = data.train_batches(sets, batch_size=4, num_steps=2, seed=0)[1]
  assert sets.spec.input_shape == (28, 28, 1) and sets.spec.num_classes == 10
  assert batch["inputs"].shape == (4, 28, 28, 1) and batch["targets"].dtype == np.int32


def test_text_windows_are_next_byte_pairs():
  texts = [{"text": b"hello "}, {"text": np.array(b"world!", dtype=object)}]
  windows = sources.TextWindows(texts, seq_len=4)
  assert len(windows) == 2  # (12 - 1) // 4
  first = windows[0]
  assert bytes(first["inputs"].astype(np.uint8)) == b"hell"
  assert bytes(first["targets"].astype(np.uint8)) == b"ello"
  assert bytes(windows[1]["inputs"].astype(np.uint8)) == b"o wo"


def test_mocked_tiny_shakespeare_loads_as_byte_lm(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    sets = data.load(data.DataConfig(name="tiny_shakespeare", data_dir=str(tmp_path), seq_len=8,
                                     eval_split="validation"), seed=0)
  assert sets.spec.task == "lm" and sets.spec.num_classes == 256
  assert sets.train[0]["inputs"].shape == (8,)


@pytest.mark.parametrize("fields, match", [
    (dict(name="mnsit"), 'Did you mean "mnist"'),
    (dict(name="digits", seq_len=8), "seq_len=8 has no meaning"),
    (dict(name="tiny_shakespeare"), "seq_len must be set"),
])
def test_bad_data_config_is_a_clear_error(fields, match):
  with pytest.raises(ValueError, match=match):
    data.DataConfig(**fields)


def test_random_shift_is_deterministic_and_redrawn_each_epoch(data_dir):
  sets = data.load(data.DataConfig(name="digits", data_dir=data_dir, random_shift=1), seed=0)
  plain = data.load(data.DataConfig(name="digits", data_dir=data_dir), seed=0)
  a = data.train_batches(sets, batch_size=500, num_steps=6, seed=1)
  b = data.train_batches(sets, batch_size=500, num_steps=6, seed=1)
  unshifted = data.train_batches(plain, batch_size=500, num_steps=6, seed=1)
  np.testing.assert_array_equal(a[3]["inputs"], b[3]["inputs"])
  np.testing.assert_array_equal(a[3]["targets"], unshifted[3]["targets"])  # same order
  assert a[3]["inputs"].shape == (500, 8, 8, 1)
  assert not np.array_equal(a[3]["inputs"], unshifted[3]["inputs"])
  # Every shifted image is its original translated by at most one pixel.
  original, shifted = unshifted[0]["inputs"][0, ..., 0], a[0]["inputs"][0, ..., 0]
  padded = np.pad(original, 1, constant_values=-1.0)
  assert any(np.array_equal(padded[dy:dy + 8, dx:dx + 8], shifted)
             for dy in range(3) for dx in range(3))


def test_prepare_command_prepares_digits_offline(tmp_path):
  out = subprocess.run([sys.executable, "-m", "attnlab.data.prepare", "digits", "--data_dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"Prepared digits in {tmp_path}" in out.stdout
  assert (tmp_path / "digits" / "1.0.0" / "dataset_info.json").exists()
