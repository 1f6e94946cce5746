"""The M_F query stage's layout: class-major against flat, side by side.

    python benchmarks/bench_query_layout.py --out runs/bench/query_layout.json   # ~3 min
    python benchmarks/bench_query_layout.py --quick                              # smoke run

One query of a run (`mechanisms.noisy_targets`, jitted as
`stages.answer_queries` jits it; chunks of `clipping.default_query_chunk()`
rows, the default DSA strategy, ConvNet-3 width --width, random weights) on
--num-train random private rows of K = 10 equal classes, with the padding a
run derives from its count release: released class sizes with noise
multiplier --count-sigma (24.0 is the default run's at epsilon 1), the
abort tail of a default run at that epsilon, and

  class-major  every class padded to the largest class bound, the Poisson
               batch to the per-class capacity of that bound (K times it)
  flat         all rows padded to the bound on N, the batch to the capacity
               of that bound (the stage's layout since this script)

Timed: first call (compilation + one query) and the median of --rounds
interleaved queries. Useful FLOPs: the expected batch (p N rows) x one
forward, as dpgeng_jax/estimate.py counts the stage; share of this
machine's float32 matmul rate measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _bench  # noqa: F401  (puts this checkout first on sys.path)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default="28x28x1,32x32x3")
  ap.add_argument("--num-train", type=int, nargs="+", default=[1438, 4000])
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--sampling-rate", type=float, default=0.5)
  ap.add_argument("--count-sigma", type=float, default=24.0)
  ap.add_argument("--epsilon", type=float, default=1.0)
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  if args.quick:
    args.shapes, args.num_train, args.width, args.rounds = (
        "16x16x1", [300], 16, 2)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from dpgeng_jax import (accounting, augment, clipping, counts, estimate,
                          mechanisms, models, parallel, planning)
  from dpgeng_jax.config import Config

  k = 10
  cfg = Config(epsilon=args.epsilon)
  events = planning.abort_events(cfg, planning.resolve(cfg), k)
  log_tail = accounting.failure_log_tail(cfg.delta, cfg.epsilon, events)
  rate = estimate.measure_rate(1.0)["matmul_flops_per_s"]
  print(f"matmul rate {rate / 1e9:.0f} GFLOP/s, abort events {events}, "
        f"log tail {log_tail:.1f}")
  rows_out = []
  for shape in args.shapes.split(","):
    h, w, c = (int(v) for v in shape.split("x"))
    net = models.ConvNet(k, width=args.width, depth=3)
    params = net.init(jax.random.key(0), jnp.zeros((1, h, w, c)))["params"]
    embed = models.embed_fn(net)
    fwd = estimate.forward_flops((h, w, c), args.width, 3, k)
    for n in args.num_train:
      rng = np.random.default_rng(0)
      x = rng.standard_normal((n, h, w, c)).astype(np.float32)
      y = np.arange(n) % k
      sizes = counts.released_sizes(
          np.bincount(y, minlength=k) + rng.normal(0, args.count_sigma, k),
          args.count_sigma, log_tail)
      p = args.sampling_rate
      aug = augment.sample_params(jax.random.key(1), batch_shape=(k,))
      variants = {
          "class-major": (
              mechanisms.class_major(x, y, k, rows=int(sizes.bound.max())),
              mechanisms.poisson_capacity(sizes.bound, p, log_tail=log_tail),
              k),
          "flat": (
              mechanisms.FlatData(*map(jnp.asarray, parallel.padded_rows(
                  sizes.total_bound, x, y))),
              mechanisms.poisson_capacity([sizes.total_bound], p,
                                          log_tail=log_tail), 1),
      }
      calls, first = {}, {}
      for name, (data, cap, per) in variants.items():
        s = mechanisms.QuerySpec(embed, k, 1.0, 1.0, p, cap)
        fn = jax.jit(lambda d, key, s=s: mechanisms.noisy_targets(
            s, d, params, aug, key,
            chunk_size=clipping.default_query_chunk())[0])
        t0 = time.perf_counter()
        fn(data, jax.random.key(2)).block_until_ready()
        first[name] = time.perf_counter() - t0
        calls[name] = (fn, data, cap * per)
      times = {name: [] for name in variants}
      for r in range(args.rounds):
        order = list(variants)[r % 2:] + list(variants)[:r % 2]
        for name in order:
          fn, data, _ = calls[name]
          t0 = time.perf_counter()
          fn(data, jax.random.key(3 + r)).block_until_ready()
          times[name].append(time.perf_counter() - t0)
      useful = p * n * fwd
      base = statistics.median(times["class-major"])
      for name in variants:
        med = statistics.median(times[name])
        row = dict(shape=shape, num_train=n, layout=name,
                   padded_rows=calls[name][2], expected_rows=p * n,
                   first_s=first[name], median_s=med,
                   gflops=useful / med / 1e9,
                   share=useful / med / rate, speedup=base / med)
        rows_out.append(row)
        print(f"| {shape} | {n} | {name} | {row['padded_rows']} | "
              f"{p * n:.0f} | {med:.3f} | {first[name]:.1f} | "
              f"{row['gflops']:.0f} | {100 * row['share']:.0f} % | "
              f"{row['speedup']:.2f} |", flush=True)
  if args.out:
    _bench.write_json(args.out, {"rate": rate, "rows": rows_out,
                                 "environment": _bench.environment(),
                                 "args": vars(args)})


if __name__ == "__main__":
  main()
