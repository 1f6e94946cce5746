"""How often two runs on the same data share their private layouts.

The private rows of a run are padded to `ClassSizes.padded_rows`: the
released bound on N (noisy counts plus z sigma_N sqrt(K)) rounded up by
`counts.layout_rows`. The bound moves with the count release's noise, so
two runs on the same data fall in different buckets with some
probability; the second then compiles the expert's step, the queries and
PE's programs again (the persistent compilation cache holds programs by
shape). This script draws the count release many times (the noise only:
no data, no JAX) and reports, for the library's rounding and for finer
ones (multiples of 2^(bits(n) - s)), the probability that two independent
runs differ and the padded rows over N.

    python benchmarks/layout_buckets.py                      # N = 4000
    python benchmarks/layout_buckets.py --sweep 1000 70000   # log-uniform N

sigma_N and the bound's tail default to those of a default run at
epsilon 1 (`dpgeng distill --epsilon 1`, privacy.json's class_sizes:
noise multiplier 24.04, failure probability 4.41e-11 per class).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from dpgeng_jax import counts


def rounded(n: int, s: int) -> int:
  """n rounded up to a multiple of 2^(bits(n) - s)."""
  step = 1 << max(0, int(n).bit_length() - s)
  return -(-int(n) // step) * step


LIBRARY = 3  # counts.layout_rows is rounded(n, LIBRARY); checked in main


def padded(n: int, k: int, sigma: float, log_tail: float, draws: int,
           rng: np.random.Generator, s: int) -> np.ndarray:
  """The padded rows of `draws` runs on n examples in k equal classes."""
  sizes = np.full(k, n / k)
  out = np.empty(draws, np.int64)
  for i in range(draws):
    noisy = sizes + rng.normal(0.0, sigma, k)
    bound = counts.released_sizes(noisy, sigma, log_tail).total_bound
    out[i] = rounded(bound, s)
  return out


def share_and_overhead(rows: np.ndarray, n: int) -> tuple[float, float]:
  """(P(two independent runs differ), mean padded rows / n)."""
  _, c = np.unique(rows, return_counts=True)
  p = c / len(rows)
  return float(1.0 - np.sum(p ** 2)), float(np.mean(rows) / n)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n", type=int, default=4000, help="examples")
  ap.add_argument("--sweep", type=int, nargs=2, default=None,
                  metavar=("LO", "HI"),
                  help="instead of --n: N log-uniform in [LO, HI]")
  ap.add_argument("--sizes", type=int, default=200,
                  help="values of N drawn with --sweep")
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--sigma", type=float, default=24.04,
                  help="the count release's noise multiplier sigma_N")
  ap.add_argument("--tail", type=float, default=4.41e-11,
                  help="the bound's failure probability per class")
  ap.add_argument("--draws", type=int, default=2000,
                  help="count releases per N")
  ap.add_argument("--roundings", type=int, nargs="+", default=[5, 4, 3],
                  help="s of 2^(bits - s); the library uses "
                       f"{LIBRARY}")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  for n in (1, 7, 100, 4000, 4097, 65535, 10 ** 6):
    assert rounded(n, LIBRARY) == counts.layout_rows(n), n
  rng = np.random.default_rng(args.seed)
  if args.sweep:
    lo, hi = args.sweep
    ns = np.exp(rng.uniform(math.log(lo), math.log(hi), args.sizes))
    ns = [int(v) // args.classes * args.classes for v in ns]
  else:
    ns = [args.n]
  log_tail = math.log(args.tail)
  print(f"sigma_N {args.sigma}, tail {args.tail:.2e} per class, "
        f"{args.classes} classes, {args.draws} releases per N, "
        f"N in {min(ns)}..{max(ns)} ({len(ns)} values)")
  print("| rounding | P(two runs differ): mean | max | padded rows / N: "
        "mean | max |")
  print("|---|---|---|---|---|")
  for s in args.roundings:
    differ, over = [], []
    for n in ns:
      rows = padded(n, args.classes, args.sigma, log_tail, args.draws,
                    np.random.default_rng([args.seed, n]), s)
      d, o = share_and_overhead(rows, n)
      differ.append(d)
      over.append(o)
    name = f"2^(bits - {s})" + (" (library)" if s == LIBRARY else "")
    print(f"| {name} | {np.mean(differ):.3f} | {np.max(differ):.3f} | "
          f"{np.mean(over):.3f} | {np.max(over):.3f} |")


if __name__ == "__main__":
  main()
