"""Builds `shapes28`: a procedural 28x28 grey-scale, 10-class image dataset.

    python benchmarks/make_shapes.py --out runs/shapes28.npz [--train 2000]
    python benchmarks/make_shapes.py --out runs/shapes32rgb.npz --size 32 --rgb


Used for the second dataset shape of the benchmarks (`--dataset
npz:runs/shapes28.npz`; MNIST's image shape), since this machine reaches no
dataset mirror. Each image is one light shape on a dark background, drawn at
a random position (+-3 px), size, small rotation (+-15 degrees), foreground
(0.55..1) and background (0..0.35) intensity, anti-aliased (drawn at 2x and
averaged), plus Gaussian pixel noise (std 0.08). Classes: 0 disc,
1 ring, 2 square, 3 square outline, 4 triangle, 5 plus, 6 diamond,
7 ellipse, 8 two dots, 9 bar pair. Balanced classes; the train and test
splits use different seeds. Deterministic for a --seed. --size sets the
side (the shapes keep their pixel sizes); --rgb gives each image a random
foreground and background colour (32x32x3, CIFAR-10's shape).
"""

import argparse
import os

import numpy as np

CLASSES = ("disc", "ring", "square", "square outline", "triangle", "plus",
           "diamond", "ellipse", "two dots", "bar pair")


def _mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  r = np.sqrt(u * u + v * v)
  box = np.maximum(abs(u), abs(v))
  if cls == 0:
    return r < 0.9
  if cls == 1:
    return (r < 0.9) & (r > 0.55)
  if cls == 2:
    return box < 0.75
  if cls == 3:
    return (box < 0.8) & (box > 0.5)
  if cls == 4:
    return (v < 0.7) & (abs(u) < (v + 0.9) * 0.6)
  if cls == 5:
    return ((abs(u) < 0.25) & (abs(v) < 0.9)) | ((abs(v) < 0.25)
                                                 & (abs(u) < 0.9))
  if cls == 6:
    return abs(u) + abs(v) < 0.95
  if cls == 7:
    return (u / 0.95) ** 2 + (v / 0.45) ** 2 < 1
  if cls == 8:
    return ((u - 0.5) ** 2 + v * v < 0.12) | ((u + 0.5) ** 2 + v * v < 0.12)
  return (abs(u) < 0.9) & ((abs(v - 0.45) < 0.18) | (abs(v + 0.45) < 0.18))


def make(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """n images (uint8, n x size x size) with balanced labels."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % len(CLASSES)
  rng.shuffle(y)
  hi = 2 * size
  grid = (np.arange(hi) + 0.5) / 2
  gy, gx = np.meshgrid(grid, grid, indexing="ij")
  x = np.empty((n, size, size), np.float32)
  for i, c in enumerate(y):
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    scale = rng.uniform(6, 10)
    a = np.deg2rad(rng.uniform(-15, 15))
    dy, dx = (gy - cy) / scale, (gx - cx) / scale
    u = np.cos(a) * dx + np.sin(a) * dy
    v = -np.sin(a) * dx + np.cos(a) * dy
    m = _mask(int(c), u, v).astype(np.float32)
    m = m.reshape(size, 2, size, 2).mean(axis=(1, 3))
    fg, bg = rng.uniform(0.55, 1), rng.uniform(0, 0.35)
    x[i] = m * fg + (1 - m) * bg + rng.normal(0, 0.08, (size, size))
  return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int32)


def colourise(x: np.ndarray, seed: int) -> np.ndarray:
  """(n, H, W) uint8 grey -> (n, H, W, 3): each image's dark and light
  levels mapped to two random colours."""
  rng = np.random.default_rng(seed)
  lo = rng.uniform(0.0, 0.4, (len(x), 1, 1, 3))
  hi = rng.uniform(0.5, 1.0, (len(x), 1, 1, 3))
  t = x[..., None].astype(np.float32) / 255
  return (np.clip(lo + t * (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/shapes28.npz")
  ap.add_argument("--train", type=int, default=2000)
  ap.add_argument("--test", type=int, default=1000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--size", type=int, default=28)
  ap.add_argument("--rgb", action="store_true")
  args = ap.parse_args()
  x_train, y_train = make(args.train, args.seed, args.size)
  x_test, y_test = make(args.test, args.seed + 1, args.size)
  if args.rgb:
    x_train = colourise(x_train, args.seed + 2)
    x_test = colourise(x_test, args.seed + 3)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, x_train=x_train, y_train=y_train,
                      x_test=x_test, y_test=y_test)
  print(f"wrote {args.out}: train {x_train.shape}, test {x_test.shape}")


if __name__ == "__main__":
  main()
