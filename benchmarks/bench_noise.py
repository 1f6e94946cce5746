"""The cost of the atom-free Gaussian sampler against float32 jax.random.normal.

    python benchmarks/bench_noise.py --out runs/bench/noise.json

Rows, each adding N(0, sigma^2) noise to a float32 sum of n coordinates
inside one jitted call, timed side by side in interleaved rounds (see
_bench.py): `float32_normal` (what the releases used before: float32
jax.random.normal, ~2^23 values in [-5.42, 5.22] sigma) and `atom_free`
(dpgeng_jax.noise.add_gaussian_noise: six 32-bit words per coordinate from
a 128-bit key, float64 inverse CDF, float64 sum, one rounding). The sizes
are those of the releases: the generator's (10 x 1001), one M_F query
(10 x 2048, ConvNet-3 w128 at 32x32), one expert DP-SGD step (about 154k
parameters: ConvNet-3 w128 on 28x28x1) and 1e6.
Expected on the 2-core VM: the sampler is ~10x slower per coordinate, a
few milliseconds per release, below 10 % of a DP-SGD step.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import _bench
from dpgeng_jax import noise

SIZES = {"generator_release_10x1001": 10 * 1001,
         "query_10x2048": 10 * 2048,
         "dp_sgd_step_154k": 154_000,
         "1e6": 1_000_000}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="runs/bench/noise.json")
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  args = ap.parse_args()
  args.max_slowdown = float("inf")  # keep every row in the rounds
  secret = noise.deterministic_secret_key(0)  # timing only
  public = jax.random.key(0)
  impls = []
  for label, n in SIZES.items():
    sums = jnp.zeros(n, jnp.float32)
    impls.append(_bench.jax_impl(
        f"float32_normal {label}",
        lambda k, s: s + 2.0 * jax.random.normal(k, s.shape, jnp.float32),
        (public, sums), items=n, flops=None, note="before"))
    impls.append(_bench.jax_impl(
        f"atom_free {label}",
        lambda k, s: noise.add_gaussian_noise(k, s, 2.0),
        (secret, sums), items=n, flops=None, note="now"))
  notes = ["items are noise coordinates; compare rows of one size"]
  _bench.time_and_report(args, impls, notes, baseline="float32_normal 1e6",
                         items_label="coordinates",
                         record={"environment": _bench.environment()})


if __name__ == "__main__":
  main()
