"""The timing side channel of skipped padding, and what closing it costs.

The expert's DP-SGD step (and the queries, where they run in chunks)
computes its padded Poisson batch in microbatches and, by default, skips
the microbatches of padding only (`clipping.microbatched`): a step's time
then follows the realised batch size. `--no-skip-padding`
(`skip_padding=False`) computes every microbatch. This script times one
jitted clipped-gradient-sum step of the expert's ConvNet over a padded
batch of the capacity a run on --rows private rows uses (at the expert's
rate q_E and the library's overflow tail), with the first R rows real, R
from the batch's realised range (expected q N and +-4 std) down to a
small batch, skipping and not, interleaved over --rounds rounds; medians.

    python benchmarks/bench_skip_padding.py                  # 28x28x1, w32
    python benchmarks/bench_skip_padding.py --shape 32x32x3 --width 64

Results: benchmarks/RESULTS.md, "Skipped padding: the timing side channel".
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp

import _bench
from dpgeng_jax import clipping, expert, hostmem, mechanisms, pergrad
from dpgeng_jax.config import Config
from dpgeng_jax.models import ConvNet, init_params


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", type=_bench.image_shape, default=(28, 28, 1))
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--rows", type=int, default=4096,
                  help="padded private rows (a run's bound on N)")
  ap.add_argument("--rate", type=float, default=Config.expert_sampling_rate)
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()
  hostmem.retain_freed_memory()
  cap = mechanisms.poisson_capacity([args.rows], args.rate)
  mean = args.rate * args.rows
  std = math.sqrt(args.rows * args.rate * (1 - args.rate))
  realised = sorted({min(cap, max(1, round(mean + z * std)))
                     for z in (-4, 0, 4)} | {max(1, round(mean / 4))})
  model = ConvNet(num_classes=10, width=args.width)
  params = init_params(model, jax.random.key(0), args.shape)
  x = jax.random.uniform(jax.random.key(1), (cap, *args.shape))
  y = jnp.arange(cap) % 10
  base = pergrad.make_grad_sum_fn(model, clip_norm=1.0)
  chunk = expert.default_microbatch()
  steps = {skip: jax.jit(clipping.microbatched(base, chunk,
                                               skip_padding=skip))
           for skip in (True, False)}
  masks = {r: (jnp.arange(cap) < r).astype(jnp.float32) for r in realised}
  times = {(r, s): [] for r in realised for s in steps}
  for step in steps.values():  # compile, warm
    jax.block_until_ready(step(params, (x, y), masks[realised[0]]))
  for i in range(args.rounds + 1):
    for r in realised:
      for s in ((True, False) if i % 2 else (False, True)):
        t = time.perf_counter()
        jax.block_until_ready(steps[s](params, (x, y), masks[r]))
        if i:  # round 0 warms every mask
          times[(r, s)].append(time.perf_counter() - t)
  print(f"{args.shape} width {args.width}: {args.rows} rows, q {args.rate}, "
        f"capacity {cap} (expected batch {mean:.0f} +- {std:.0f}), "
        f"microbatch {chunk}; {_bench.environment_short()}")
  print("| realised batch | skipping, s | computing all, s | ratio |")
  print("|---|---|---|---|")
  for r in realised:
    a, b = (statistics.median(times[(r, s)]) for s in (True, False))
    print(f"| {r} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


if __name__ == "__main__":
  main()
