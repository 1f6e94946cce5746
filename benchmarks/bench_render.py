"""Rendering speed of the text API in a PE-like loop.

    python benchmarks/bench_render.py [--shapes 8,8,1 28,28,1 32,32,3]
    PYTHONPATH=<another source tree> python benchmarks/bench_render.py

Per shape: `random` for 100 images per class (10 classes), then 10
variations of 1000 images drawn from the population, at degrees 1 -> 0 (the
work of PE's default 10 iterations, without the votes); prints the wall
time and the time per rendered image. Run two source trees one after the
other, twice, to compare (the machine is shared). Results:
benchmarks/RESULTS.md, "The text API's rendering speed".
"""

import argparse
import time

import jax
import numpy as np

import dpgeng_jax
from dpgeng_jax.generators.apis.text import TextAPI


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shapes", nargs="+", default=["8,8,1", "28,28,1",
                                                  "32,32,3"])
  ap.add_argument("--iterations", type=int, default=10)
  args = ap.parse_args()
  print(f"dpgeng_jax from {dpgeng_jax.__file__}")
  for spec in args.shapes:
    shape = tuple(int(v) for v in spec.split(","))
    api = TextAPI(shape, 10)
    labels = np.repeat(np.arange(10, dtype=np.int32), 100)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    s = api.random(jax.random.key(0), labels)
    for i in range(args.iterations):
      pick = s.take(rng.integers(0, len(labels), len(labels)))
      s = api.variation(jax.random.key(i + 1), pick,
                        1.0 - i / max(1, args.iterations - 1))
    wall = time.perf_counter() - t
    images = len(labels) * (args.iterations + 1)
    print(f"{spec}: {wall:.2f} s for {images} images, "
          f"{1000 * wall / images:.2f} ms per image")


if __name__ == "__main__":
  main()
