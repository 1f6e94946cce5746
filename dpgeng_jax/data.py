"""Datasets: loading, validation and public normalisation constants.

A dataset is always held as a validated `Dataset` of numpy arrays: images are
float32 NHWC in [0, 1], labels int32 in 0..K-1, with every class present in
the training split. Three sources are supported (see `DATASET_SPECS_HELP`):

* `digits`: scikit-learn's bundled 8x8 digits (no download), the default;
* `npz:PATH`: arrays the user brings;
* `tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]]`: a TFDS dataset prepared beforehand in
  array_record format, read through `tfds.data_source` without TensorFlow and
  never downloaded (an unprepared dataset fails at once with instructions).

Normalisation constants (`Dataset.mean`, `Dataset.std`) are public: published
per-dataset values or the data-independent default 0.5 / 0.5. They are never
computed from the (private) training images.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
import zipfile
import zlib
from typing import Any, Sequence

import numpy as np

from dpgeng_jax.errors import DataError

DATASET_SPECS_HELP = (
    "Dataset to distill. 'digits' (default): scikit-learn's bundled 8x8 grey "
    "digits, no download, fixed stratified 80/20 split (1438 train / 359 test). "
    "'npz:PATH': a .npz file holding x_train, y_train, x_test, y_test (the "
    "test arrays may be left out with --no-eval); images "
    "uint8 (0..255) or float in [0, 1], shaped NHWC or NHW, labels integer "
    "0..K-1. 'tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]]' (splits default to train and "
    "test, e.g. tfds:mnist or tfds:cifar10:train[:90%]:test): a TFDS dataset "
    "with 'image' and 'label' features, already prepared in array_record format "
    "under --data-dir (or TFDS_DATA_DIR); it is never downloaded, prepare it "
    "elsewhere with `tfds build NAME --file_format=array_record --data_dir DIR`."
)

_DEFAULT_MEAN = 0.5
_DEFAULT_STD = 0.5

# Published per-channel constants (values in [0, 1] pixel units), as used by
# the dataset distillation literature (Zhao & Bilen's DC/DSA/DM experiments)
# and the PyTorch examples. Keys are TFDS names without config or version.
_PUBLIC_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

# The image shape and class count of the datasets above: a preset's npz
# copy of another shape is run, with a warning (its protocol and constants
# were chosen for these).
_STANDARD_SHAPES = {"mnist": ((28, 28, 1), 10),
                    "fashion_mnist": ((28, 28, 1), 10),
                    "cifar10": ((32, 32, 3), 10),
                    "cifar100": ((32, 32, 3), 100),
                    "svhn_cropped": ((32, 32, 3), 10)}

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0
_TFDS_READ_CHUNK = 4096
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")

# The largest --image-size (pixels per side): beyond it a resized split
# would not fit in memory, and the ConvNets are not built for it.
MAX_IMAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A validated labelled image dataset with a train and a test split.

  Build it with `from_arrays` or `load_dataset`, which validate the arrays;
  the arrays are made read-only. Equality is identity (arrays are not
  compared).

  Attributes:
    name: Short name (e.g. 'digits', 'mnist', 'npz:/path/file.npz').
    x_train: float32 (N, H, W, C) training images in [0, 1].
    y_train: int32 (N,) training labels in 0..K-1.
    x_test: float32 (M, H, W, C) test images in [0, 1] (M = 0: a train-only
      dataset, loaded with require_test False).
    y_test: int32 (M,) test labels in 0..K-1.
    num_classes: K; every class has at least one training example.
    mean: Public per-channel normalisation means (length C).
    std: Public per-channel normalisation standard deviations (length C).
    normalisation_source: Where `mean` and `std` come from.
    num_classes_source: Where K comes from (public metadata).
  """

  name: str
  x_train: np.ndarray = dataclasses.field(repr=False)
  y_train: np.ndarray = dataclasses.field(repr=False)
  x_test: np.ndarray = dataclasses.field(repr=False)
  y_test: np.ndarray = dataclasses.field(repr=False)
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  normalisation_source: str = dataclasses.field(repr=False)
  num_classes_source: str = dataclasses.field(
      default="given", repr=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.x_train.shape[1:])

  @property
  def num_train(self) -> int:
    """Number of training examples N."""
    return int(self.x_train.shape[0])

  @property
  def class_counts(self) -> np.ndarray:
    """int64 (K,) number of training examples of each class."""
    return np.bincount(self.y_train, minlength=self.num_classes)

  def check(self) -> "Dataset":
    """Raises DataError unless the arrays are what `from_arrays` returns
    (float32 NHWC images in [0, 1] of one shape, int32 labels in
    0..K-1, every class in the training split, normalisation constants
    per channel): a Dataset built directly skips that validation, and a
    label >= K would otherwise be dropped silently by the private passes.
    Copies nothing; returns self."""
    for what, x in (("x_train", self.x_train), ("x_test", self.x_test)):
      if not (isinstance(x, np.ndarray) and x.dtype == np.float32
              and x.ndim == 4):
        raise DataError(f"Dataset.{what} must be a float32 (N, H, W, C) "
                        "array (build datasets with data.from_arrays)")
    if self.x_train.shape[0] == 0 or (
        self.x_test.shape[1:] != self.x_train.shape[1:]
        and self.x_test.shape[0]):
      raise DataError("Dataset: x_train is empty or x_test's images have "
                      "another shape")
    for what, x in (("x_train", self.x_train), ("x_test", self.x_test)):
      if x.size and not (np.all(np.isfinite(x)) and x.min() >= 0
                         and x.max() <= 1):
        raise DataError(f"Dataset.{what} has pixels outside [0, 1] or "
                        "non-finite")
    k = self.num_classes
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
      raise DataError(f"Dataset.num_classes must be an integer >= 2, got "
                      f"{k!r}")
    for what, y, x in (("y_train", self.y_train, self.x_train),
                       ("y_test", self.y_test, self.x_test)):
      if not (isinstance(y, np.ndarray) and y.dtype == np.int32
              and y.shape == (x.shape[0],)):
        raise DataError(f"Dataset.{what} must be an int32 array of one "
                        "label per image")
      if y.size and (y.min() < 0 or y.max() >= k):
        raise DataError(f"Dataset.{what} has labels outside 0..{k - 1}")
    if k > len(self.y_train) or np.any(
        np.bincount(self.y_train, minlength=k) == 0):
      raise DataError("Dataset: a class has no training examples")
    c = self.x_train.shape[-1]
    if len(self.mean) != c or len(self.std) != c or not all(
        s > 0 for s in self.std):
      raise DataError(f"Dataset: mean and std need {c} values each, std > 0")
    return self

  def normalize(self, x: Any) -> Any:
    """Returns (x - mean) / std, broadcasting over the last (channel) axis.

    Args:
      x: Images in [0, 1] with channels last; a numpy or a jax array.

    Returns:
      An array of the same kind (numpy in, numpy out; jax in, jax out).
    """
    mean = np.asarray(self.mean, dtype=np.float32)
    std = np.asarray(self.std, dtype=np.float32)
    return (x - mean) / std


def from_arrays(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    name: str = "arrays",
    num_classes: int | None = None,
    num_classes_source: str | None = None,
    require_test: bool = True,
) -> Dataset:
  """Validates arrays and returns them as a `Dataset`.

  Images may be uint8 (scaled by 1/255) or floating (already in [0, 1]),
  shaped (N, H, W, C) or (N, H, W) (a channel axis is added). C must be 1 or
  3. Labels must be integers in 0..K-1, shaped (N,) or (N, 1), with K =
  `num_classes`, or the largest training label + 1 when it is None; every
  class needs at least one training example and test labels must be
  training classes. With require_test False the test split may be empty or
  None (a train-only dataset, for runs that do not evaluate).

  Normalisation constants are the published ones when `name` (without TFDS
  config or version) is in the public table and the channel count matches,
  otherwise the data-independent 0.5 / 0.5.

  Args:
    x_train: Training images.
    y_train: Training labels.
    x_test: Test images.
    y_test: Test labels.
    name: Dataset name, also the key into the public normalisation table.
    num_classes: Number of classes K, or None to infer it from y_train.
    num_classes_source: Where a given K comes from, for the report.
    require_test: Refuse an empty or missing test split.

  Returns:
    The validated dataset (float32 images, int32 labels, read-only arrays).

  Raises:
    DataError: if any check fails; the message names the problem.
  """
  x_train = _images(x_train, "x_train")
  if x_test is None and y_test is None and not require_test:
    x_test = np.zeros((0,) + x_train.shape[1:], np.float32)
    y_test = np.zeros(0, np.int32)
  x_test = _images(x_test, "x_test", allow_empty=not require_test)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(
        f"inconsistent image shapes: x_train images are {x_train.shape[1:]} "
        f"but x_test images are {x_test.shape[1:]}")
  y_train = _labels(y_train, "y_train", len(x_train))
  y_test = _labels(y_test, "y_test", len(x_test))
  k_source = num_classes_source or (
      "given" if num_classes is not None else
      "inferred from the training labels (largest label + 1): public only "
      "if the label set is; declare it with --num-classes")
  num_classes = _num_classes(y_train, num_classes)
  if len(y_test) and y_test.max() >= num_classes:
    raise DataError(
        f"y_test has labels outside the training classes 0..{num_classes - 1}: "
        f"{sorted(set(y_test[y_test >= num_classes].tolist()))[:10]}")
  missing = np.flatnonzero(np.bincount(y_train, minlength=num_classes) == 0)
  if missing.size:
    raise DataError(
        f"classes with no training examples: {missing[:10].tolist()}"
        f"{f' and {missing.size - 10} more' if missing.size > 10 else ''} "
        f"(num_classes={num_classes}); every class 0..{num_classes - 1} needs one"
        + ("; labels count from 0: if yours count from 1, subtract 1"
           if missing.tolist() == [0] else ""))
  mean, std, source = _public_normalisation(name, x_train.shape[-1])
  arrays = [x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)]
  for a in arrays:
    a.setflags(write=False)
  return Dataset(name, *arrays, num_classes=num_classes, mean=mean, std=std,
                 normalisation_source=source, num_classes_source=k_source)


def load_dataset(spec: str, *, data_dir: str | None = None,
                 num_classes: int | None = None,
                 label_feature: str = "label",
                 image_size: int = 0,
                 normalisation: str | None = None,
                 require_test: bool = True) -> Dataset:
  """Loads a dataset from a spec string (see `DATASET_SPECS_HELP`).

  * 'digits': scikit-learn's bundled 8x8 digits, 1797 images, shape (8, 8, 1),
    pixels 0..16 scaled to [0, 1]. Fixed stratified split: within each class
    (in class order) the examples are permuted by one
    `np.random.RandomState(0)` and the first round(n_c / 5) go to test. This
    gives 1438 train and 359 test examples (train per class: 142 146 142 146
    145 146 145 143 139 144), the same every time; each split keeps the
    original example order.
  * 'npz:PATH': arrays x_train, y_train, x_test, y_test from a .npz file.
  * 'tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]]': a prepared TFDS dataset read with
    `tfds.data_source(..., download=False)`. NAME may carry a config and a
    version ('emnist/letters', 'mnist:3.0.1'); split slices such as
    'train[:90%]' are allowed. Images come from the 'image' feature, labels
    from 'label' (its ClassLabel gives K).

  Args:
    spec: The dataset spec.
    data_dir: TFDS data directory (default: TFDS_DATA_DIR or
      ~/tensorflow_datasets); ignored by the other specs.
    num_classes: K declared by the user (public metadata); it must match
      the dataset's own K for digits and TFDS; for npz it replaces the
      inference from the labels.
    label_feature: TFDS only: the feature holding the label ('label'; a
      path like 'attributes/Male' reads a nested boolean attribute as 0/1).
    image_size: resize every image to image_size x image_size (centre
      crop to a square, then antialiased resizing; public preprocessing,
      done chunk by chunk while a TFDS split is read); 0 keeps them.
    normalisation: npz only: the name of a dataset whose published
      normalisation constants to use (`--preset mnist` on an npz copy of
      MNIST runs MNIST's protocol); ignored when the table has none for
      it at this channel count.
    require_test: npz only may go without a test split when this is False
      (a run that does not evaluate: `--no-eval`); the split is then empty.

  Returns:
    The validated dataset.

  Raises:
    DataError: unknown spec, unreadable or invalid data, or a TFDS dataset that
      is not prepared (raised at once, without any network access).
  """
  if image_size < 0 or image_size == 1 or image_size > MAX_IMAGE_SIZE:
    raise DataError(f"image_size must be 0 (as stored) or 2..."
                    f"{MAX_IMAGE_SIZE}, got {image_size}")
  if spec == "digits":
    ds = _load_digits()
  elif spec.startswith("npz:"):
    ds = _load_npz(spec[len("npz:"):], num_classes, require_test)
  elif spec.startswith("tfds:"):
    ds = _load_tfds(spec[len("tfds:"):], data_dir, label_feature, image_size,
                    num_classes)
  else:
    raise _unknown_spec(spec)
  if image_size and tuple(ds.image_shape[:2]) != (image_size, image_size):
    ds = from_arrays(resize_images(ds.x_train, image_size), ds.y_train,
                     resize_images(ds.x_test, image_size), ds.y_test,
                     name=ds.name, num_classes=ds.num_classes,
                     num_classes_source=ds.num_classes_source,
                     require_test=require_test)
  if spec.startswith("npz:"):
    return _with_public_normalisation(ds, normalisation)
  if num_classes is not None and num_classes != ds.num_classes:
    raise DataError(f"--num-classes {num_classes} differs from the "
                    f"{ds.num_classes} classes of {spec} "
                    f"({ds.num_classes_source})")
  return ds


def _images(x: Any, what: str, allow_empty: bool = False) -> np.ndarray:
  """Checks one split's images and returns them as float32 NHWC in [0, 1]
  (no images only where allow_empty: a train-only dataset's test split)."""
  x = np.asarray(x)
  if x.ndim not in (3, 4):
    raise DataError(
        f"{what} must have rank 3 (N, H, W) or 4 (N, H, W, C), got shape {x.shape}")
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[-1] not in (1, 3):
    keep = {2: ":1", 4: ":3"}.get(x.shape[-1])  # grey or RGB + alpha
    if x.shape[1] in (1, 3) and x.shape[-1] != x.shape[1] and min(
        x.shape[2:]) >= 4:  # (N, 3, 3, 2): 3x3 images, not channels first
      hint = ("; these look channels-first (N, C, H, W): pass "
              "x.transpose(0, 2, 3, 1)")
    elif keep:
      hint = (f"; if the last channel is opacity, drop it: pass "
              f"x[..., {keep}] (blended onto a background first where it "
              "is not opaque)")
    else:
      hint = ""
    raise DataError(
        f"{what} has {x.shape[-1]} channels (shape {x.shape}); only 1 (grey) or "
        "3 (RGB) channels are supported, with channels last" + hint)
  if 0 in x.shape[1:] or (x.shape[0] == 0 and not allow_empty):
    raise DataError(f"{what} is empty (shape {x.shape}); it needs examples"
                    + (" (a dataset without a test split runs with --no-eval)"
                       if what == "x_test" else ""))
  if min(x.shape[1:3]) < 2:
    raise DataError(
        f"{what} images are {x.shape[1]}x{x.shape[2]}; the ConvNet pools "
        "each block's map 2x2, so images need at least 2 pixels per side")
  if x.shape[0] == 0:
    return np.zeros(x.shape, np.float32)
  if x.dtype == np.uint8:
    if int(x.max()) <= 1:
      warnings.warn(
          f"{what} is uint8 with no value above 1: uint8 images are read "
          "as 0..255, so these are black or nearly so; if they are 0/1 "
          "(binary) images, pass them as float 0.0/1.0", stacklevel=3)
    return x.astype(np.float32) / np.float32(255.0)
  if x.dtype.name == "bfloat16":  # ml_dtypes' (JAX's), not a numpy floating
    x = x.astype(np.float32)
  if not np.issubdtype(x.dtype, np.floating):
    raise DataError(
        f"{what} has dtype {x.dtype}; images must be uint8 (0..255) or float in [0, 1]")
  if not np.all(np.isfinite(x)):
    raise DataError(f"{what} contains NaN or inf pixels")
  # The message says which side, not the private data's extreme values.
  below, above = bool(x.min() < 0.0), bool(x.max() > 1.0)
  if below or above:
    side = " and ".join(w for w, b in (("below 0", below),
                                        ("above 1", above)) if b)
    raise DataError(
        f"{what} has float pixels {side}; float images must be in [0, 1] "
        "(divide 0..255 values by 255) or pass uint8")
  if x.max() <= 1.0 / 255.0:
    # As the uint8 case above: no value is printed, only the symptom.
    warnings.warn(
        f"{what} is float with no value above 1/255: these are all but "
        "black; if they were divided by 255 twice, divide them once",
        stacklevel=3)
  return x.astype(np.float32)


def _labels(y: Any, what: str, num_images: int) -> np.ndarray:
  """Checks one split's labels (dtype, rank, length, sign)."""
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    whole = (np.issubdtype(y.dtype, np.floating) and y.size
             and bool(np.all(np.isfinite(y)) and np.all(y == np.round(y))))
    raise DataError(
        f"{what} has dtype {y.dtype}; labels must have an integer dtype"
        + ("; these are whole numbers: pass y.astype(np.int64)" if whole
           else ""))
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]  # a column, as Keras's CIFAR arrays hold them
  if y.ndim != 1:
    raise DataError(f"{what} must be 1-D (N,) or a column (N, 1), got shape "
                    f"{y.shape}")
  if len(y) != num_images:
    raise DataError(
        f"mismatched lengths: {what} has {len(y)} labels but there are "
        f"{num_images} images")
  if len(y) and y.min() < 0:
    # No value: error messages do not print the private data's extremes.
    raise DataError(f"{what} has negative labels")
  return y


def _num_classes(y_train: np.ndarray, num_classes: int | None) -> int:
  """Returns K, checking the given value against the training labels."""
  if num_classes is None:
    if y_train.max() >= len(y_train):  # K = max + 1 > N: empty classes
      # No values: the largest label and N are the private data's.
      raise DataError(
          "y_train has a label at least as large as the number of training "
          "examples: labels must be the class indices 0..K-1 with every "
          "class present")
    if y_train.max() < 1:
      raise DataError(
          "y_train has a single class (every label is "
          f"{int(y_train.max())}); a classifier needs at least two classes")
    return int(y_train.max()) + 1
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise DataError(f"num_classes must be an integer, got {num_classes!r}")
  if num_classes < 2:
    raise DataError(f"num_classes must be >= 2 (a classifier needs two "
                    f"classes), got {num_classes}")
  if num_classes > len(y_train):
    # Before any tally of K entries (10^12 asked for 7 TiB): every class
    # needs a training example.
    raise DataError(f"num_classes={num_classes} is more than there are "
                    "training examples: every class needs one")
  if y_train.max() >= num_classes:
    raise DataError(f"y_train has labels >= num_classes={num_classes}")
  return int(num_classes)


def _public_normalisation(
    name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...], str]:
  """Returns (mean, std, source sentence) from public constants only."""
  key = name.split("/")[0].split(":")[0]
  if key in _PUBLIC_NORMALISATION:
    mean, std = _PUBLIC_NORMALISATION[key]
    if len(mean) == channels:
      return mean, std, (
          f"Published per-channel {key} constants (dataset distillation literature "
          "and PyTorch examples), taken from a fixed table: public, never computed "
          "from the loaded training data.")
  return (_DEFAULT_MEAN,) * channels, (_DEFAULT_STD,) * channels, (
      "Data-independent default mean 0.5 and std 0.5 per channel (maps [0, 1] to "
      "[-1, 1]); no published constants are known for this dataset, and they are "
      "never computed from the private training data.")


def _with_public_normalisation(ds: Dataset, name: str | None) -> Dataset:
  """ds with the published constants of dataset `name` where the table
  has them for its channel count (unchanged otherwise)."""
  key = (name or "").split("/")[0].split(":")[0]
  if key not in _PUBLIC_NORMALISATION:
    return ds
  shape, k = _STANDARD_SHAPES.get(key, (None, None))
  if shape is not None and (tuple(ds.image_shape) != shape
                            or ds.num_classes != k):
    warnings.warn(
        f"the {key} preset's protocol is for {key}'s "
        f"{'x'.join(map(str, shape))} images of {k} classes, and this npz "
        f"holds {'x'.join(map(str, ds.image_shape))} images of "
        f"{ds.num_classes}: check that --dataset is a copy of {key} (its "
        "published normalisation constants are used where the channels "
        "match)", stacklevel=3)
  channels = len(_PUBLIC_NORMALISATION[key][0])
  if channels != ds.image_shape[2]:
    why = (f"the {key} preset's published normalisation constants are for "
           f"{channels}-channel images and these have {ds.image_shape[2]}: "
           "they are not used")
    warnings.warn(why + " (the data-independent default is)", stacklevel=3)
    return dataclasses.replace(ds, normalisation_source=(
        f"{ds.normalisation_source} ({why})"))
  mean, std, source = _public_normalisation(key, ds.image_shape[2])
  return dataclasses.replace(ds, mean=mean, std=std,
                             normalisation_source=source + (
                                 f" Chosen by the {key} preset."))


def _load_digits() -> Dataset:
  """scikit-learn's 8x8 digits with the fixed stratified 80/20 split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int64)
  rng = np.random.RandomState(_DIGITS_SEED)
  test = []
  for c in range(10):
    members = rng.permutation(np.flatnonzero(y == c))
    test.append(members[:int(round(len(members) * _DIGITS_TEST_FRACTION))])
  is_test = np.zeros(len(y), dtype=bool)
  is_test[np.concatenate(test)] = True
  return from_arrays(x[~is_test], y[~is_test], x[is_test], y[is_test],
                     name="digits", num_classes=10,
                     num_classes_source="fixed by the dataset (10 digits)")


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member, an empty archive
_NPY_MAGIC = b"\x93NUMPY"
_NPZ_HOW = ("an npz dataset is a zip archive of the arrays x_train, y_train, "
            "x_test and y_test: np.savez(PATH, x_train=..., y_train=..., "
            "x_test=..., y_test=...)")


def _check_npz_file(path: str, how: str = _NPZ_HOW) -> None:
  """Refuses, by its first bytes, anything that is not a zip archive
  (`how`: what the file should hold, for the message)."""
  if os.path.isdir(path):
    raise DataError(f"{path} is a directory, not an npz file; {how}")
  if not os.path.exists(path):
    raise DataError(f"npz file not found: {path}")
  if not os.path.isfile(path):
    # A FIFO with no writer blocked the run at the read below.
    raise DataError(f"{path} is not a regular file (a pipe or a device); "
                    f"{how}")
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from e
  if not head:
    raise DataError(f"{path} is empty (0 bytes); {how}")
  if head.startswith(_NPY_MAGIC):
    raise DataError(f"{path} is a .npy file (a single array), not an npz "
                    f"archive; {how}")
  if not head.startswith(_ZIP_MAGIC):
    raise DataError(f"{path} is not an npz file (not a zip archive: it "
                    f"starts with {head[:4]!r}); {how}")
  try:
    with zipfile.ZipFile(path) as z:
      size = sum(i.file_size for i in z.infolist())
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                    f"{e}); write it again") from e
  memory = physical_memory()
  if size > memory:
    # Checked before any array is read: a small compressed file can
    # declare arrays that do not fit (the allocation failed, or the
    # kernel's out-of-memory killer ended the process).
    raise DataError(f"{path} holds {size / 2**30:.1f} GiB of arrays "
                    f"uncompressed, more than this machine's memory "
                    f"({memory / 2**30:.1f} GiB)")


def physical_memory() -> float:
  """This machine's memory in bytes (inf where the OS does not say)."""
  try:
    size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return math.inf
  return size if size > 0 else math.inf  # -1: the value is unknown


# What np.load raises for a truncated or corrupt npz archive.
NPZ_DAMAGE = (zipfile.BadZipFile, EOFError, zlib.error)


def _load_npz(path: str, num_classes: int | None = None,
              require_test: bool = True) -> Dataset:
  """Arrays x_train, y_train, x_test, y_test from a .npz file (without
  require_test, x_test and y_test may both be absent). Every problem with
  the file (not a zip archive, empty, truncated, corrupt, a .npy, a
  directory, pickled objects) is a DataError naming the file."""
  if not path:
    raise DataError("npz spec needs a path: 'npz:PATH'")
  _check_npz_file(path)
  try:
    with np.load(path, allow_pickle=False) as npz:
      required = ("x_train", "y_train", "x_test", "y_test")
      missing = [k for k in required if k not in npz.files]
      if (not require_test and missing == ["x_test", "y_test"]):
        required, missing = required[:2], []
      if missing:
        raise DataError(
            f"{path} lacks the arrays {missing} (it has {sorted(npz.files)}); an npz "
            "dataset needs x_train, y_train, x_test and y_test (x_test and "
            "y_test may both be left out for a run with --no-eval)")
      arrays = []
      for k in required:
        try:
          arrays.append(npz[k])
        except ValueError as e:
          if "pickle" not in str(e):
            raise
          raise DataError(
              f"{path}: array {k} holds Python objects (pickled), which are "
              "refused because unpickling can run code; store plain numeric "
              "arrays (uint8 or float images, integer labels)") from None
  except DataError:
    raise
  except NPZ_DAMAGE as e:
    raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                    f"{e}); write it again") from e
  except MemoryError as e:
    raise DataError(f"{path}: its arrays do not fit in this machine's "
                    f"memory ({e})") from e
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f"cannot read {path} as an npz of plain arrays "
                    f"({type(e).__name__}: {e}); {_NPZ_HOW}") from e
  if len(arrays) == 2:
    arrays += [None, None]
  return from_arrays(*arrays, name=f"npz:{path}", num_classes=num_classes,
                     require_test=require_test,
                     num_classes_source=(
                         "declared by the user (--num-classes)"
                         if num_classes is not None else None))


def _split_fields(text: str) -> list[str]:
  """Splits on ':' outside square brackets, keeping slices like train[:90%]."""
  fields, current, depth = [], [], 0
  for ch in text:
    if ch == ":" and depth == 0:
      fields.append("".join(current))
      current = []
      continue
    depth += {"[": 1, "]": -1}.get(ch, 0)
    current.append(ch)
  fields.append("".join(current))
  return fields


def check_spec(spec: str) -> None:
  """Raises DataError unless `spec` has one of the valid forms (reads no
  data; whether the file or dataset exists is checked when it is loaded)."""
  if spec == "digits" or (spec.startswith("npz:") and spec != "npz:"):
    return
  if spec.startswith("tfds:"):
    _parse_tfds_spec(spec[len("tfds:"):])
    return
  raise _unknown_spec(spec)


def _unknown_spec(spec: str) -> DataError:
  return DataError(
      f"unknown dataset spec {spec!r}; valid forms are 'digits', 'npz:PATH' "
      "and 'tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]]'")


def _parse_tfds_spec(rest: str) -> tuple[str, str, str]:
  """'NAME[:VERSION][:TRAIN_SPLIT[:TEST_SPLIT]]' -> (name, train, test)."""
  fields = _split_fields(rest)
  if len(fields) > 1 and _VERSION_RE.fullmatch(fields[1]):
    fields[:2] = [f"{fields[0]}:{fields[1]}"]
  if len(fields) > 3 or any(not f for f in fields):
    raise DataError(
        f"bad tfds spec 'tfds:{rest}'; expected 'tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]]'")
  train = fields[1] if len(fields) > 1 else "train"
  test = fields[2] if len(fields) > 2 else "test"
  return fields[0], train, test


def resize_images(x: np.ndarray, size: int, chunk: int = 256) -> np.ndarray:
  """(N, H, W[, C]) images (uint8 or float in [0, 1]) -> float32 (N, size,
  size, C) in [0, 1]: the centred square crop, resized with antialiasing
  (area-like when shrinking). Public preprocessing, in chunks."""
  import jax
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  n, h, w, c = x.shape
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  scale = 255.0 if x.dtype == np.uint8 else 1.0
  out = np.empty((n, size, size, c), np.float32)
  resize = jax.jit(lambda a: jax.image.resize(
      a, (a.shape[0], size, size, c), "linear", antialias=True))
  for i in range(0, n, chunk):
    a = x[i:i + chunk, top:top + side, left:left + side].astype(
        np.float32) / scale
    out[i:i + len(a)] = np.clip(np.asarray(resize(a)), 0.0, 1.0)
  return out


def _label(example: dict, path: str, what: str):
  v = example
  for part in path.split("/"):
    v = v[part]
  a = np.asarray(v)
  if a.shape != () or not (np.issubdtype(a.dtype, np.integer)
                           or a.dtype == np.bool_):
    raise DataError(f"TFDS split {what}: the label feature {path!r} holds "
                    f"{a.dtype} values of shape {a.shape}, not one integer "
                    "or boolean per example (--label-feature)")
  return int(a)


def _load_tfds(rest: str, data_dir: str | None, label_feature: str = "label",
               image_size: int = 0,
               declared_classes: int | None = None) -> Dataset:
  """A prepared TFDS dataset, read in bulk through `tfds.data_source`.
  K comes from the label's ClassLabel, else from `declared_classes`
  (--num-classes), else from the labels."""
  name, train_split, test_split = _parse_tfds_spec(rest)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # tfds's logger

  # tfds logs a warning per version folder it probes; a dataset that is
  # not prepared gets one clear DataError instead.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    train, test = tfds.data_source(
        name, split=[train_split, test_split], data_dir=data_dir,
        download=False, try_gcs=False)
  except Exception as e:  # tfds raises KeyError, ValueError, NotImplementedError, ...
    raise DataError(_tfds_failure(tfds, name, data_dir, e)) from e
  finally:
    absl_logging.set_verbosity(verbosity)
  features = train.dataset_info.features
  label_top = label_feature.split("/")[0]
  if "image" not in features or label_top not in features:
    raise DataError(
        f"TFDS dataset {name} has features {sorted(features.keys())}; "
        f"'image' and '{label_top}' are needed (--label-feature)")
  num_classes = (getattr(features["label"], "num_classes", None)
                 if label_feature == "label" else None)
  source = "the TFDS label feature (ClassLabel)"
  if num_classes is None and declared_classes is not None:
    num_classes, source = declared_classes, (
        "declared by the user (--num-classes)")
  x_train, y_train = _read_all(train, f"{name} {train_split}", label_feature,
                               image_size)
  x_test, y_test = _read_all(test, f"{name} {test_split}", label_feature,
                             image_size)
  return from_arrays(x_train, y_train, x_test, y_test, name=name,
                     num_classes=num_classes,
                     num_classes_source=(
                         source if num_classes is not None else None))


def _read_all(source: Sequence[Any], what: str, label_feature: str = "label",
              image_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Reads every (image, label) of a data source in chunks of records
  (resized chunk by chunk with `image_size`, so that the full-size split
  is never held at once)."""
  images, labels = [], []
  for start in range(0, len(source), _TFDS_READ_CHUNK):
    keys = list(range(start, min(len(source), start + _TFDS_READ_CHUNK)))
    try:
      examples = source.__getitems__(keys)
    except (OSError, RuntimeError, ValueError) as e:  # array_record's
      raise DataError(
          f"cannot read TFDS split {what} ({_first_line(e)}); its prepared "
          "files look incomplete or damaged: copy the dataset directory "
          "again") from e
    chunk = []
    for example in examples:
      try:
        chunk.append(np.asarray(example["image"]))
        labels.append(_label(example, label_feature, what))
      except (KeyError, TypeError) as e:
        raise DataError(f"TFDS split {what}: no label feature "
                        f"{label_feature!r} ({type(e).__name__}: {e})") from e
    if image_size and chunk:
      images.extend(_resize_each_shape(chunk, image_size))
    else:
      images.extend(chunk)
  if not images:
    raise DataError(f"TFDS split {what} is empty")
  shapes = {a.shape for a in images}
  if len(shapes) > 1:
    raise DataError(
        f"TFDS split {what} has images of {len(shapes)} different shapes "
        f"(for example {sorted(shapes)[:2]}); pass --image-size SIZE to "
        "resize every image to SIZE x SIZE")
  return np.stack(images), np.asarray(labels)


def _resize_each_shape(chunk: list, size: int) -> list:
  """The images of `chunk` resized to size x size, batched by shape (a
  dataset may store images of several sizes), in their order."""
  out = [None] * len(chunk)
  by_shape: dict = {}
  for i, a in enumerate(chunk):
    by_shape.setdefault(a.shape, []).append(i)
  for idx in by_shape.values():
    resized = resize_images(np.stack([chunk[i] for i in idx]), size)
    for i, r in zip(idx, resized):
      out[i] = r
  return out


def _tfds_failure(tfds: Any, name: str, data_dir: str | None, error: Exception) -> str:
  """Explains why a TFDS dataset could not be opened and how to prepare it."""
  where = data_dir or (
      f"{tfds.core.constants.get_default_data_dir()} (TFDS_DATA_DIR or the default)")
  base = name.split(":")[0]
  how = (
      f" It is never downloaded here. Prepare it on a machine with TensorFlow and "
      f"network access: `pip install tensorflow tensorflow-datasets` then "
      f"`tfds build {base} --file_format=array_record --data_dir DIR`; copy DIR to "
      "this machine and pass --data-dir DIR (or set TFDS_DATA_DIR=DIR).")
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    prepared = builder.is_prepared()
    file_format = builder.info.file_format
  except Exception:  # pylint: disable=broad-except
    return (f"TFDS dataset {name} is not prepared under {where}, and TFDS has no "
            f"builder of that name ({_first_line(error)}).{how}")
  if not prepared:
    return f"TFDS dataset {name} is not prepared under {where}.{how}"
  if file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
    fmt = getattr(file_format, "value", file_format)
    return (f"TFDS dataset {name} is prepared under {where} in {fmt} format, which "
            "tfds.data_source cannot read; rebuild it in array_record format."
            f"{how}")
  return f"cannot open TFDS dataset {name} under {where}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
  """The first line of an exception's message (tfds messages can be long)."""
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__
