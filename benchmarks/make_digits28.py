"""28x28 digit data the text simulator did not make: the embedded 8x8
handwritten digits (scikit-learn's, the same train/test split), each
upscaled to 20x20 (bicubic), placed in a 28x28 frame (as MNIST), and
distorted with a random elastic field and a small random affine map.

    python benchmarks/make_digits28.py --copies 2 --out runs/digits28.npz

Every training image gives `--copies` distorted versions (default 2:
2876 training images), every test image one (359).
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image
from scipy import ndimage

from dpgeng_jax import data


def distort(img8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  big = np.asarray(Image.fromarray((img8 * 255).astype(np.uint8)).resize(
      (20, 20), Image.BICUBIC), np.float32) / 255.0
  frame = np.zeros((28, 28), np.float32)
  frame[4:24, 4:24] = big
  th = np.deg2rad(rng.uniform(-10, 10))
  a = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
  a = a @ np.diag(rng.uniform(0.9, 1.1, 2))
  centre = np.array([13.5, 13.5])
  frame = ndimage.affine_transform(frame, a, offset=centre - a @ centre,
                                   order=1)
  field = [ndimage.gaussian_filter(rng.uniform(-1, 1, (28, 28)), 4) * 30
           for _ in range(2)]
  yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
  frame = ndimage.map_coordinates(frame, [yy + field[0], xx + field[1]],
                                  order=1)
  return np.clip(frame, 0, 1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--copies", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="runs/digits28.npz")
  args = ap.parse_args()
  ds = data.load_dataset("digits")
  rng = np.random.default_rng(args.seed)

  def make(x, y, copies):
    xs = [distort(img[..., 0], rng) for img in x for _ in range(copies)]
    return (np.stack(xs)[..., None] * 255).round().astype(np.uint8), (
        np.repeat(y, copies).astype(np.int32))

  x_tr, y_tr = make(ds.x_train, ds.y_train, args.copies)
  x_te, y_te = make(ds.x_test, ds.y_test, 1)
  np.savez_compressed(args.out, x_train=x_tr, y_train=y_tr, x_test=x_te,
                      y_test=y_te)
  print(f"wrote {args.out}: {len(x_tr)} train, {len(x_te)} test, 28x28x1")


if __name__ == "__main__":
  main()
