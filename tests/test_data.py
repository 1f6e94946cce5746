"""Tests of dpgeng_jax.data: loaders, validation and normalisation constants."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from sklearn import datasets
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_base

from dpgeng_jax import data
from dpgeng_jax.errors import DataError

# Documented digits split (see `load_dataset`).
DIGITS_TRAIN_PER_CLASS = [142, 146, 142, 146, 145, 146, 145, 143, 139, 144]
DIGITS_NUM_TRAIN = 1438
DIGITS_NUM_TEST = 359


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
  return data.load_dataset("digits")


def test_digits_has_documented_sizes_shapes_dtypes_and_range(digits):
  assert digits.name == "digits"
  assert digits.num_train == DIGITS_NUM_TRAIN
  assert digits.x_train.shape == (DIGITS_NUM_TRAIN, 8, 8, 1)
  assert digits.x_test.shape == (DIGITS_NUM_TEST, 8, 8, 1)
  assert digits.y_train.shape == (DIGITS_NUM_TRAIN,)
  assert digits.y_test.shape == (DIGITS_NUM_TEST,)
  assert digits.image_shape == (8, 8, 1)
  assert digits.num_classes == 10
  assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
  assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
  for x in (digits.x_train, digits.x_test):
    assert x.min() == 0.0 and x.max() == 1.0
  np.testing.assert_array_equal(digits.class_counts, DIGITS_TRAIN_PER_CLASS)


def test_digits_split_is_deterministic_and_partitions_all_1797_images(digits):
  again = data.load_dataset("digits")
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(digits, field), getattr(again, field))
  # Train and test together are exactly scikit-learn's 1797 (image, label) pairs.
  full = datasets.load_digits()
  ours = np.concatenate([
      np.concatenate([digits.x_train, digits.x_test]).reshape(1797, 64) * 16,
      np.concatenate([digits.y_train, digits.y_test])[:, None]], axis=1)
  theirs = np.concatenate([full.data, full.target[:, None]], axis=1)
  np.testing.assert_allclose(np.unique(ours, axis=0), np.unique(theirs, axis=0), atol=1e-5)
  assert len(np.unique(ours, axis=0)) == len(np.unique(theirs, axis=0))
  # Stratified: each class sends round(n_c / 5) examples to test.
  full = np.bincount(np.concatenate([digits.y_train, digits.y_test]))
  np.testing.assert_array_equal(np.bincount(digits.y_test), np.round(full / 5))


def test_digits_has_every_class_in_both_splits(digits):
  assert np.all(np.bincount(digits.y_train, minlength=10) > 0)
  assert np.all(np.bincount(digits.y_test, minlength=10) > 0)


def test_digits_uses_data_independent_default_normalisation(digits):
  assert digits.mean == (0.5,) and digits.std == (0.5,)
  assert "0.5" in digits.normalisation_source
  assert "never computed from the private training data" in digits.normalisation_source


def test_dataset_arrays_are_read_only(digits):
  with pytest.raises(ValueError):
    digits.x_train[0, 0, 0, 0] = 0.5


def test_from_arrays_leaves_the_callers_arrays_writable():
  arrays = _valid()
  data.from_arrays(**arrays)
  assert all(a.flags.writeable for a in arrays.values())


def test_normalize_maps_unit_interval_for_numpy_and_jax(digits):
  x = np.array([[[[0.0]], [[0.5]], [[1.0]]]], dtype=np.float32)  # (1, 3, 1, 1)
  np.testing.assert_allclose(digits.normalize(x).ravel(), [-1.0, 0.0, 1.0])
  assert isinstance(digits.normalize(x), np.ndarray)
  out = digits.normalize(jnp.asarray(x))
  assert isinstance(out, type(jnp.zeros(1)))
  np.testing.assert_allclose(np.asarray(out).ravel(), [-1.0, 0.0, 1.0])


def test_normalize_broadcasts_published_constants_on_channel_axis():
  x = np.full((2, 4, 4, 3), 0.5, np.float32)
  ds = data.from_arrays(x, [0, 1], x, [1, 0], name="cifar10")
  assert ds.mean == (0.4914, 0.4822, 0.4465)
  assert "cifar10" in ds.normalisation_source
  expected = (0.5 - np.array(ds.mean)) / np.array(ds.std)
  np.testing.assert_allclose(ds.normalize(ds.x_train)[0, 0, 0], expected, rtol=1e-6)


def test_unlisted_name_or_channel_mismatch_falls_back_to_default_constants():
  x = np.zeros((2, 4, 4, 3), np.float32)
  assert data.from_arrays(x, [0, 1], x, [0, 1], name="mnist").mean == (0.5,) * 3
  assert data.from_arrays(x, [0, 1], x, [0, 1]).std == (0.5,) * 3


def test_npz_round_trip_uint8_nhw_gets_channel_axis_and_scaling(tmp_path):
  rng = np.random.RandomState(0)
  x_train = rng.randint(0, 256, (12, 5, 6), dtype=np.uint8)
  x_test = rng.randint(0, 256, (4, 5, 6), dtype=np.uint8)
  y_train, y_test = np.arange(12) % 3, np.array([2, 1, 0, 0], np.uint8)
  path = tmp_path / "d.npz"
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  ds = data.load_dataset(f"npz:{path}")
  assert ds.image_shape == (5, 6, 1) and ds.num_classes == 3
  np.testing.assert_array_equal(ds.x_train[..., 0], x_train.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.x_test[..., 0], x_test.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.y_test, y_test)
  assert ds.y_test.dtype == np.int32
  assert ds.mean == (0.5,)


def test_npz_round_trip_float_nhwc_keeps_values(tmp_path):
  rng = np.random.RandomState(1)
  x_train = rng.rand(6, 4, 4, 3)  # float64
  x_test = rng.rand(2, 4, 4, 3).astype(np.float32)
  path = tmp_path / "f.npz"
  np.savez(path, x_train=x_train, y_train=np.array([0, 1, 0, 1, 0, 1]),
           x_test=x_test, y_test=np.array([1, 0]))
  ds = data.load_dataset(f"npz:{path}")
  assert ds.image_shape == (4, 4, 3) and ds.x_train.dtype == np.float32
  np.testing.assert_allclose(ds.x_train, x_train, rtol=1e-6)
  np.testing.assert_array_equal(ds.x_test, x_test)


@pytest.mark.parametrize("dtype", ["float16", jnp.bfloat16])
def test_half_precision_images_from_python_are_read_as_float32(dtype):
  """bfloat16 (JAX's dtype, not a numpy floating type) was refused as
  'not uint8 or float'."""
  x = (np.arange(4 * 16).reshape(4, 4, 4, 1) / 64.0).astype(dtype)
  ds = data.from_arrays(x, np.array([0, 1, 0, 1]), x[:2], np.array([0, 1]),
                        name="half")
  assert ds.x_train.dtype == np.float32
  np.testing.assert_array_equal(ds.x_train, np.asarray(x, np.float32))


def test_npz_without_test_split_names_the_missing_keys(tmp_path):
  path = tmp_path / "train_only.npz"
  np.savez(path, x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.array([0, 1]))
  with pytest.raises(DataError, match=r"x_test.*y_test"):
    data.load_dataset(f"npz:{path}")


def test_npz_that_does_not_exist_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match="not found"):
    data.load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_npz_with_object_arrays_is_refused(tmp_path):
  path = tmp_path / "objects.npz"
  np.savez(path, x_train=np.array([None, 1], dtype=object), y_train=[0, 1],
           x_test=np.zeros((1, 2, 2)), y_test=[0])
  with pytest.raises(DataError, match="Python objects") as info:
    data.load_dataset(f"npz:{path}")
  assert "allow_pickle" not in str(info.value)


def _good_npz_bytes(tmp_path) -> bytes:
  path = tmp_path / "good.npz"
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (20, 4, 4), dtype=np.uint8),
           y_train=np.arange(20) % 2,
           x_test=rng.integers(0, 256, (4, 4, 4), dtype=np.uint8),
           y_test=np.arange(4) % 2)
  return path.read_bytes()


def _corrupt(raw: bytes) -> bytes:
  """Flips bytes inside the first stored member's data (CRC mismatch)."""
  start = raw.index(b"\x93NUMPY") + 200
  return raw[:start] + bytes(b ^ 0xFF for b in raw[start:start + 16]) + (
      raw[start + 16:])


FILE_PROBLEMS = {
    "truncated": (lambda raw: raw[:len(raw) // 2], "truncated or corrupt"),
    "corrupted_bytes": (_corrupt, "truncated or corrupt"),
    "empty_file": (lambda raw: b"", r"is empty \(0 bytes\)"),
    "npy_renamed": (None, r"is a \.npy file"),
    "text_file": (lambda raw: b"x_train,y_train\n1,2\n", "not a zip archive"),
    "directory": (None, "is a directory"),
}


@pytest.mark.parametrize("kind", FILE_PROBLEMS)
def test_every_npz_file_problem_is_a_data_error_naming_the_file(tmp_path,
                                                                  kind):
  make, message = FILE_PROBLEMS[kind]
  path = tmp_path / "data.npz"
  if kind == "npy_renamed":
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.uint8))
    os.rename(tmp_path / "a.npy", path)
  elif kind == "directory":
    path.mkdir()
  else:
    path.write_bytes(make(_good_npz_bytes(tmp_path)))
  with pytest.raises(DataError, match=message) as info:
    data.load_dataset(f"npz:{path}")
  assert str(path) in str(info.value)
  assert "allow_pickle" not in str(info.value)


def _valid() -> dict[str, Any]:
  """A small valid input for from_arrays: 3 classes, 6 train, 3 test."""
  return dict(x_train=np.full((6, 4, 4, 1), 0.5, np.float32),
              y_train=np.array([0, 1, 2, 0, 1, 2]),
              x_test=np.full((3, 4, 4, 1), 0.5, np.float32),
              y_test=np.array([2, 1, 0]))


def _with(**changes: Any) -> Callable[[], dict[str, Any]]:
  return lambda: {**_valid(), **changes}


def _with_images(*shape: int) -> Callable[[], dict[str, Any]]:
  """Both splits' images of one other shape (H, W, C), all zero."""
  return _with(x_train=np.zeros((6, *shape), np.float32),
               x_test=np.zeros((3, *shape), np.float32))


def _with_pixel(split: str, value: float) -> Callable[[], dict[str, Any]]:
  def make():
    arrays = _valid()
    arrays[split][0, 1, 2, 0] = value
    return arrays
  return make


BAD_INPUTS = {
    "rank_2_images": (_with(x_train=np.zeros((6, 16), np.float32)), r"rank 3 .* or 4"),
    "rank_5_images": (_with(x_test=np.zeros((3, 4, 4, 1, 1), np.float32)), "rank"),
    "train_test_shapes_differ": (_with(x_test=np.zeros((3, 5, 4, 1), np.float32)),
                                 "inconsistent image shapes"),
    "two_channels": (_with_images(4, 4, 2),
                     r"2 channels .* opacity, drop it: pass x\[\.\.\., :1\]"),
    "rgba": (_with_images(4, 4, 4),
             r"4 channels .* opacity, drop it: pass x\[\.\.\., :3\]"),
    "five_channels": (_with_images(4, 4, 5), r"5 channels .*channels last$"),
    "channels_first": (_with_images(3, 4, 4),
                       r"channels-first .* x.transpose\(0, 2, 3, 1\)"),
    "nan_pixel": (_with_pixel("x_train", np.nan), "NaN or inf"),
    "inf_pixel": (_with_pixel("x_test", np.inf), "NaN or inf"),
    "float_pixel_above_one": (_with_pixel("x_train", 1.5),
                              r"x_train has float pixels above 1;"),
    "float_pixel_below_zero": (_with_pixel("x_test", -0.1),
                               r"x_test has float pixels below 0;"),
    "int32_images": (_with(x_train=np.zeros((6, 4, 4, 1), np.int32)), "uint8"),
    "float_labels": (_with(y_train=np.array([0.0, 1, 2, 0, 1, 2])),
                     r"integer dtype; these are whole numbers: pass "
                     r"y.astype\(np.int64\)"),
    "fractional_float_labels": (_with(y_train=np.array([0.5, 1, 2, 0, 1, 2])),
                                "integer dtype$"),
    # 3x3 images of 2 channels: the channels-first hint would scramble them.
    "small_two_channel_images": (_with_images(3, 3, 2),
                                 r"2 channels .* opacity, drop it"),
    "bool_labels": (_with(y_test=np.array([True, False, True])), "integer dtype"),
    "2d_labels": (_with(y_train=np.array([[0, 1, 2, 0, 1, 2]])), "1-D"),
    "one_hot_labels": (_with(y_train=np.eye(3, dtype=np.int64)[
        [0, 1, 2, 0, 1, 2]]), r"or a column \(N, 1\), got shape \(6, 3\)"),
    "negative_label": (_with(y_train=np.array([0, 1, 2, 0, 1, -1])), "negative"),
    "label_not_below_num_classes": (_with(num_classes=2), "num_classes=2"),
    "test_label_outside_training_classes": (_with(y_test=np.array([0, 1, 3])),
                                            "outside the training classes"),
    # K = max + 1 would be 2^40 classes (an 8 TiB tally): refused first.
    "label_far_above_the_number_of_examples": (
        _with(y_train=np.array([0, 1, 2, 0, 1, 2**40])),
        r"a label at least as large as the number of training examples"),
    "uint64_label_above_int64": (
        _with(y_train=np.array([0, 1, 2, 0, 1, 2**63 + 5], np.uint64)),
        "a label at least as large"),
    "class_without_training_examples": (_with(y_train=np.array([0, 2, 2, 0, 2, 0])),
                                        r"no training examples: \[1\]"),
    "labels_counting_from_one": (
        _with(y_train=np.array([1, 2, 3, 1, 2, 3]), y_test=np.array([1, 2, 3])),
        r"no training examples: \[0\].*if yours count from 1, subtract 1"),
    "num_classes_beyond_present_classes": (_with(num_classes=5),
                                           r"no training examples: \[3, 4\]"),
    "bool_num_classes": (_with(num_classes=True), "num_classes must be an integer"),
    "single_class": (_with(y_train=np.zeros(6, np.int64),
                           y_test=np.zeros(3, np.int64)), "single class"),
    "one_declared_class": (_with(y_train=np.zeros(6, np.int64),
                                 y_test=np.zeros(3, np.int64), num_classes=1),
                           "two classes"),
    "one_pixel_images": (_with(x_train=np.zeros((6, 1, 1, 1), np.float32),
                               x_test=np.zeros((3, 1, 1, 1), np.float32)),
                         "at least 2 pixels per side"),
    "fewer_labels_than_images": (_with(y_train=np.array([0, 1, 2])), "mismatched lengths"),
    "empty_train_split": (_with(x_train=np.zeros((0, 4, 4, 1), np.float32),
                                y_train=np.zeros((0,), np.int64)), "x_train is empty"),
    "empty_test_split": (_with(x_test=np.zeros((0, 4, 4, 1), np.float32),
                               y_test=np.zeros((0,), np.int64)), "x_test is empty"),
}


def test_column_labels_load_as_their_vector():
  """Keras keeps CIFAR's labels as an (N, 1) column; they were refused."""
  arrays = _valid()
  column = data.from_arrays(**{**arrays,
                               "y_train": arrays["y_train"][:, None],
                               "y_test": arrays["y_test"][:, None]})
  flat = data.from_arrays(**arrays)
  np.testing.assert_array_equal(column.y_train, flat.y_train)
  np.testing.assert_array_equal(column.y_test, flat.y_test)
  assert column.y_train.ndim == 1


@pytest.mark.parametrize("make, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_from_arrays_refuses_bad_input_with_a_message_naming_it(make, message):
  with pytest.raises(DataError, match=message):
    data.from_arrays(**make())


def test_a_range_error_does_not_print_the_private_extremes():
  """It printed the data's exact min and max pixel values."""
  with pytest.raises(DataError) as info:
    data.from_arrays(**_with_pixel("x_train", 254.996)())
  assert "254.99" not in str(info.value) and "above 1" in str(info.value)


def test_uint8_images_with_no_value_above_one_are_warned_about():
  """0/1 images stored as uint8 are read as 0..255: all but black (a
  model trained on them scored chance where float 0/1 scored 100 %)."""
  v = _valid()
  binary = (np.random.default_rng(0).random((6, 4, 4, 1)) > 0.5).astype(
      np.uint8)
  with pytest.warns(UserWarning, match="pass them as float"):
    data.from_arrays(binary, v["y_train"], binary[:3], v["y_test"])
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.from_arrays((binary * 255).astype(np.uint8), v["y_train"],
                     (binary[:3] * 255).astype(np.uint8), v["y_test"])


def test_valid_baseline_input_is_accepted():
  ds = data.from_arrays(**_valid())
  assert ds.num_classes == 3 and ds.image_shape == (4, 4, 1)
  np.testing.assert_array_equal(ds.class_counts, [2, 2, 2])


@pytest.mark.parametrize("size", [-1, 1, data.MAX_IMAGE_SIZE + 1, 100000])
def test_an_image_size_outside_2_to_the_maximum_is_refused_before_loading(
    size, monkeypatch):
  monkeypatch.setattr(data, "_load_digits",
                      lambda: pytest.fail("the data was read"))
  with pytest.raises(DataError, match=f"2...{data.MAX_IMAGE_SIZE}"):
    data.load_dataset("digits", image_size=size)


def test_data_error_is_a_value_error():
  assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("spec", ["mnist", "digit", "npz", "tfds", "tfds:", "npz:",
                                  "tfds:mnist:a:b:c"])
def test_unknown_or_malformed_spec_is_a_data_error(spec):
  with pytest.raises(DataError, match=r"spec|npz"):
    data.load_dataset(spec)


def test_unknown_spec_message_lists_the_valid_forms():
  with pytest.raises(DataError, match="unknown dataset spec") as info:
    data.load_dataset("imagenet")
  for form in ("digits", "npz:PATH", "tfds:NAME"):
    assert form in str(info.value)


def test_specs_help_mentions_every_form():
  for form in ("digits", "npz:PATH", "tfds:NAME", "array_record"):
    assert form in data.DATASET_SPECS_HELP


# ---------------------------------------------------------------- tfds ----


@pytest.fixture
def mocked_tfds(monkeypatch):
  """tfds.testing.mock_data, with a fix for its batch reads.

  In tfds 4.9.10 mock_data does support `tfds.data_source`, but the mock it
  installs gives `__getitems__` no `self` (TypeError: missing 'record_keys'),
  while `__getitem__` works. The batch read is routed through `__getitem__`.
  """
  monkeypatch.setattr(tfds_base.BaseDataSource, "__getitems__",
                      lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=64):
    yield


def test_tfds_mock_mnist_loads_through_data_source(mocked_tfds, tmp_path):
  ds = data.load_dataset("tfds:mnist", data_dir=str(tmp_path))
  assert ds.name == "mnist" and ds.num_classes == 10
  assert ds.x_train.shape == (64, 28, 28, 1) and ds.x_test.shape == (64, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() <= ds.x_train.max() <= 1.0
  assert ds.mean == (0.1307,) and ds.std == (0.3081,)
  assert "mnist" in ds.normalisation_source


def test_tfds_mock_cifar10_gets_rgb_images_and_published_constants(mocked_tfds):
  ds = data.load_dataset("tfds:cifar10")
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert ds.std == (0.2023, 0.1994, 0.2010)


class _TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A 3-class dataset of 6x6 grey images, built without TensorFlow.

  Images are given to the Image feature as PIL images: tfds then stores their
  PNG bytes as they are, whereas numpy images would be PNG-encoded with
  TensorFlow. Unregistered, so reading it goes through tfds's read-only
  builder, as for a dataset prepared on another machine.
  """

  name = "dpgeng_tiny_images"
  VERSION = tfds.core.Version("1.0.0")
  NUM_TRAIN, NUM_TEST = 12, 6

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 6, 1)),
        "label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.NUM_TRAIN, seed=0),
            "test": self._generate_examples(self.NUM_TEST, seed=1)}

  def _generate_examples(self, n, seed):
    images, labels = self.arrays(n, seed)
    for i in range(n):
      yield i, {"image": PIL.Image.fromarray(images[i]), "label": labels[i]}

  @staticmethod
  def arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, 6, 6), dtype=np.uint8), np.arange(n) % 3


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _TinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _sorted_by_pixels(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  order = np.lexsort(x.reshape(len(x), -1).T)
  return x[order], y[order]


def test_local_array_record_dataset_round_trips_pixels_and_labels(tiny_tfds_dir):
  ds = data.load_dataset("tfds:dpgeng_tiny_images", data_dir=tiny_tfds_dir)
  assert ds.num_classes == 3 and ds.image_shape == (6, 6, 1)
  assert ds.mean == (0.5,)  # not in the public table
  for split, n, seed in (("train", 12, 0), ("test", 6, 1)):
    images, labels = _TinyImages.arrays(n, seed)
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    got_x, got_y = _sorted_by_pixels(x[..., 0], y)  # tfds shuffles the records
    want_x, want_y = _sorted_by_pixels(images.astype(np.float32) / 255, labels)
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_array_equal(got_y, want_y)


def test_local_array_record_dataset_accepts_version_and_split_slices(tiny_tfds_dir):
  ds = data.load_dataset("tfds:dpgeng_tiny_images:1.0.0:train[:50%]:train[50%:]",
                         data_dir=tiny_tfds_dir)
  assert ds.num_train == 6 and len(ds.y_test) == 6


def test_local_array_record_dataset_with_unknown_split_is_a_data_error(tiny_tfds_dir):
  with pytest.raises(DataError, match="validation"):
    data.load_dataset("tfds:dpgeng_tiny_images:train:validation", data_dir=tiny_tfds_dir)


def test_tfds_dataset_prepared_as_tfrecord_is_refused_with_rebuild_advice(
    tiny_tfds_dir, tmp_path):
  # Relabel a copy as tfrecord (writing real tfrecord files needs TensorFlow).
  shutil.copytree(os.path.join(tiny_tfds_dir, "dpgeng_tiny_images"),
                  tmp_path / "dpgeng_tiny_images")
  info_path = tmp_path / "dpgeng_tiny_images" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(DataError, match="in tfrecord format.*array_record"):
    data.load_dataset("tfds:dpgeng_tiny_images", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "cifar10", "no_such_dataset_xyz"])
def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path, name):
  start = time.perf_counter()
  with pytest.raises(DataError, match="not prepared") as info:
    data.load_dataset(f"tfds:{name}", data_dir=str(tmp_path))
  assert time.perf_counter() - start < 10.0
  message = str(info.value)
  assert f"tfds build {name} --file_format=array_record --data_dir DIR" in message
  assert str(tmp_path) in message and "--data-dir" in message


def test_unprepared_tfds_dataset_in_default_dir_names_tfds_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(DataError, match="not prepared") as info:
    data.load_dataset("tfds:mnist")
  assert time.perf_counter() - start < 10.0
  assert "TFDS_DATA_DIR" in str(info.value)


class _FakeSource:
  """A tfds data source stand-in: examples by index, read in batches."""

  def __init__(self, examples, features=None, fail=None):
    self.examples, self.fail = examples, fail
    self.dataset_info = type("Info", (), {"features": features or {}})()

  def __len__(self):
    return len(self.examples)

  def __getitems__(self, keys):
    if self.fail is not None:
      raise self.fail
    return [self.examples[k] for k in keys]


def _examples(shapes, label=lambda i: i % 2):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, s, dtype=np.uint8),
           "label": label(i), "attributes": {"Male": bool(i % 2)},
           "name": b"n%d" % i} for i, s in enumerate(shapes)]


def test_tfds_images_of_several_sizes_are_resized_one_size_at_a_time():
  """They were stacked before resizing: --image-size failed with a message
  asking for --image-size."""
  shapes = [(10, 8, 1), (6, 6, 1), (10, 8, 1), (7, 9, 1)]
  x, y = data._read_all(_FakeSource(_examples(shapes)), "t", image_size=4)
  assert x.shape == (4, 4, 4, 1) and x.dtype == np.float32
  np.testing.assert_array_equal(y, [0, 1, 0, 1])
  one = data.resize_images(_examples(shapes)[3]["image"][None], 4)[0]
  np.testing.assert_array_equal(x[3], one)
  with pytest.raises(DataError, match="3 different shapes.*--image-size"):
    data._read_all(_FakeSource(_examples(shapes)), "t")


def test_a_tfds_label_feature_that_is_not_integer_says_so():
  """int(b'n0') failed and was reported as images of different shapes."""
  with pytest.raises(DataError, match="label feature 'name' holds"):
    data._read_all(_FakeSource(_examples([(4, 4, 1)] * 2)), "t",
                   label_feature="name")


@pytest.mark.parametrize("error", [
    RuntimeError("open() failed: No such file or directory"),
    RuntimeError("ArrayRecord file should be at least 64KB big")])
def test_unreadable_tfds_files_are_one_data_error(error):
  with pytest.raises(DataError, match="copy the dataset directory again"):
    data._read_all(_FakeSource(_examples([(4, 4, 1)] * 2), fail=error), "t")


def test_a_truncated_prepared_tfds_shard_is_a_data_error(tiny_tfds_dir,
                                                         tmp_path):
  shutil.copytree(os.path.join(tiny_tfds_dir, "dpgeng_tiny_images"),
                  tmp_path / "dpgeng_tiny_images")
  shard, = (tmp_path / "dpgeng_tiny_images" / "1.0.0").glob(
      "*train.array_record*")
  shard.write_bytes(shard.read_bytes()[:100])
  with pytest.raises(DataError, match="train.*copy the dataset directory"):
    data.load_dataset("tfds:dpgeng_tiny_images", data_dir=str(tmp_path))


def test_a_declared_class_count_is_reported_as_declared_for_tfds(monkeypatch):
  """With --label-feature the report said 'inferred from the training
  labels' even when --num-classes had declared K (every celeb_a preset)."""
  features = {"image": None, "attributes": None}
  source = _FakeSource(_examples([(4, 4, 1)] * 4), features)
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: (source, source))
  ds = data.load_dataset("tfds:fake", num_classes=2,
                         label_feature="attributes/Male")
  assert ds.num_classes == 2 and "declared" in ds.num_classes_source
  ds = data.load_dataset("tfds:fake", label_feature="attributes/Male")
  assert "inferred" in ds.num_classes_source


def test_a_test_split_may_be_empty_only_where_the_caller_allows_it():
  rng = np.random.default_rng(0)
  x = rng.random((6, 8, 8, 1)).astype(np.float32)
  y = np.arange(6) % 3
  ds = data.from_arrays(x, y, None, None, require_test=False)
  assert ds.x_test.shape == (0, 8, 8, 1) and ds.y_test.shape == (0,)
  empty = data.from_arrays(x, y, x[:0], y[:0], require_test=False)
  assert empty.x_test.shape == (0, 8, 8, 1) and empty.num_classes == 3
  with pytest.raises(data.DataError, match="x_test is empty.*--no-eval"):
    data.from_arrays(x, y, x[:0], y[:0])
  with pytest.raises(data.DataError, match="shapes"):  # still checked
    data.from_arrays(x, y, np.zeros((0, 4, 4, 1), np.float32), y[:0],
                     require_test=False)


def test_a_label_beyond_n_is_refused_without_printing_it_or_n():
  """The largest label and the number of training examples are the
  private data's: the refusal names the problem, not the values."""
  y = np.array([0, 1, 2, 0, 1, 777])
  with pytest.raises(DataError) as e:
    data.from_arrays(np.zeros((6, 4, 4, 1), np.float32), y,
                     np.zeros((3, 4, 4, 1), np.float32), np.array([0, 1, 2]))
  assert "777" not in str(e.value) and "6" not in str(e.value)
