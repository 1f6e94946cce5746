"""The shared training step (extractor pool, evaluation models, PE's
trained embedding) before and after its two CPU paths, side by side.

    python benchmarks/bench_train_step.py --out runs/bench/train_step.json   # ~3 min
    python benchmarks/bench_train_step.py --quick                            # smoke run

For each image shape (default 8x8x1, 28x28x1, 32x32x3; ConvNet of the
shape's default depth, width 128, batch 256, 10 classes, DSA
augmentation, SGD momentum), the one jitted step of `evaluate._step_for`
is compiled in five variants and timed in interleaved rounds (each round
runs every variant once, order rotated), each variant threading its own
parameters and optimiser state through its calls:

  before         the first block layer by layer, the whole batch
                 differentiated at once
  +stem          the first block from patch statistics (stem.py)
  +chunked       and gradients in row chunks of at most
                 evaluate.CHUNK_BYTES first-layer activations (the default)
  chunks/2       the same with half that chunk size
  7x7 Winograd   the default with Winograd from 7x7 maps
                 (winograd.MIN_PIXELS 49 instead of 64; differs from the
                 default only where a layer sees 7x7 maps, i.e. 28x28
                 inputs' third layer; pergrad.py does this)

Below stem.MIN_PIXELS (8x8, 16x16) "+stem" is the "before" program (the
block is fused only on larger maps), and without chunking (8x8 at width
128) "+chunked" is too: their differences there are the machine's noise.

Rate: useful FLOPs (3 x the forward convolutions' direct FLOPs, as in
dpgeng_jax/estimate.py) per second, and its share of this machine's
float32 matmul rate measured in the same process (estimate.measure_rate).
Compare rows within one run only (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import _bench  # the repository's dpgeng_jax first on sys.path

VARIANTS = ("before", "+stem", "+chunked", "chunks/2", "7x7 Winograd")


def main(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", nargs="+", type=_bench.image_shape,
                  default=[(8, 8, 1), (28, 28, 1), (32, 32, 3)])
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--quick", action="store_true",
                  help="width 16, batch 64, 2 rounds, 28x28x1 only")
  ap.add_argument("--out", default=None, help="JSON file for the results")
  args = ap.parse_args(argv)
  if args.quick:
    args.width, args.batch, args.rounds = 16, 64, 2
    args.shapes = [(28, 28, 1)]

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import estimate, evaluate, models, stem, winograd  # pylint: disable=import-outside-toplevel

  rate = estimate.measure_rate()["matmul_flops_per_s"] / 1e9
  use_stem = stem.use_stem
  chunk_bytes = evaluate.CHUNK_BYTES
  min_pixels = winograd.MIN_PIXELS
  rows = []
  for shape in args.shapes:
    depth = models.default_depth(shape[0])
    model = models.ConvNet(10, width=args.width, depth=depth)
    cfg = evaluate.EvalConfig(width=args.width, depth=depth)
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (args.batch, *shape))
    y = jnp.arange(args.batch, dtype=jnp.int32) % 10
    flops = 3 * args.batch * estimate.forward_flops(shape, args.width, depth, 10)
    runs = {}
    for v, name in enumerate(VARIANTS):
      stem.use_stem = use_stem if v >= 1 else (lambda *a, **k: False)
      evaluate.CHUNK_BYTES = (None if v < 2 else chunk_bytes // 2 if v == 3
                              else chunk_bytes)
      winograd.MIN_PIXELS = 49 if name == "7x7 Winograd" else min_pixels
      evaluate._step_for.cache_clear()  # pylint: disable=protected-access
      step, opt = evaluate._train_step(model, cfg)  # pylint: disable=protected-access
      p = models.init_params(model, key, shape)
      s = opt.init(p)
      call_args = (jnp.float32(0.01), key, x, y, jnp.int32(0))
      t0 = time.perf_counter()
      compiled = step.lower(p, s, *call_args).compile()
      p, s = compiled(p, s, *call_args)
      jax.block_until_ready(p)
      runs[name] = dict(compiled=compiled, state=(p, s), args=call_args,
                        first_s=time.perf_counter() - t0, times=[])
    stem.use_stem, evaluate.CHUNK_BYTES = use_stem, chunk_bytes
    winograd.MIN_PIXELS = min_pixels
    evaluate._step_for.cache_clear()  # pylint: disable=protected-access
    for r in range(args.rounds):
      order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
      for name in order:
        run = runs[name]
        t0 = time.perf_counter()
        p, s = run["compiled"](*run["state"], *run["args"])
        jax.block_until_ready(p)
        run["times"].append(time.perf_counter() - t0)
        run["state"] = (p, s)
    base = statistics.median(runs["before"]["times"])
    for name in VARIANTS:
      med = statistics.median(runs[name]["times"])
      rows.append(dict(shape="x".join(map(str, shape)), variant=name,
                       median_ms=1e3 * med, min_ms=1e3 * min(runs[name]["times"]),
                       compile_and_first_s=runs[name]["first_s"],
                       gflops=flops / med / 1e9,
                       share_of_matmul=flops / med / 1e9 / rate,
                       speedup=base / med))
  lines = [f"matmul rate (estimate.measure_rate): {rate:.0f} GFLOP/s; width "
           f"{args.width}, batch {args.batch}, {args.rounds} rounds",
           "", "| shape | variant | median ms | min ms | compile + first s "
           "| GFLOP/s | share of matmul | speed-up vs before |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['variant']} | {r['median_ms']:.1f} | "
                 f"{r['min_ms']:.1f} | {r['compile_and_first_s']:.2f} | "
                 f"{r['gflops']:.0f} | {100 * r['share_of_matmul']:.0f} % | "
                 f"{r['speedup']:.2f} |")
  print("\n".join(lines))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(matmul_gflops=rate, rows=rows, width=args.width,
                     batch=args.batch), f, indent=1)


if __name__ == "__main__":
  main()
