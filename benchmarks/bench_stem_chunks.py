"""The first block (stem.py) in row chunks against all rows at once, side
by side.

    python benchmarks/bench_stem_chunks.py --out runs/bench/stem_chunks.json  # ~4 min
    python benchmarks/bench_stem_chunks.py --quick                           # smoke run

For each image shape (default 28x28x1 and 32x32x3; width 128, 10
classes), timed in interleaved rounds (`_bench.measure`, medians):

  block/<c>      `stem.block_per_example` (pergrad's first block with
                 per-example parameters), forward and the gradients of
                 its per-example parameters, on one 96-row microbatch, in
                 chunks of c rows (0: all at once; 8 is the CPU default)
  clipped/<c>    one whole 96-row microbatch of the expert's DP-SGD
                 (`pergrad.convnet_clipped_grad_sum`, int32 fixed point as
                 the step releases it) with stem.default_chunk giving c
                 (its CPU default: 8 rows at 28x28, 6 at 32x32)
  train/<c>      the shared training step (`evaluate._train_step`, batch
                 256: pool, evaluation) with the shared-kernel block
                 (`stem.conv_norm_relu_pool`) whole (0) or under a
                 lax.map over chunks of c rows (a scratch variant the
                 library does not use: this measures why)

Compare rows within one run only (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", nargs="+", type=_bench.image_shape,
                  default=[(28, 28, 1), (32, 32, 3)])
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--rows", type=int, default=96)
  ap.add_argument("--chunks", nargs="+", type=int, default=[0, 4, 6, 8, 16])
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--quick", action="store_true",
                  help="width 16, 24 rows, 28x28x1, chunks 0 8, 2 rounds")
  ap.add_argument("--out", default=None, help="JSON file for the results")
  args = ap.parse_args(argv)
  if args.quick:
    args.width, args.rows, args.rounds = 16, 24, 2
    args.shapes, args.chunks = [(28, 28, 1)], [0, 8]

  from dpgeng_jax import hostmem  # pylint: disable=import-outside-toplevel
  hostmem.retain_freed_memory()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import (clipping, estimate, evaluate, models, pergrad,  # pylint: disable=import-outside-toplevel
                          stem)

  default_chunk, shared_block = stem.default_chunk, stem.conv_norm_relu_pool
  n, w = args.rows, args.width
  tables = {}
  for shape in args.shapes:
    impls = []
    fwd = estimate.forward_flops(shape, w, 3, 10)
    x = jax.random.uniform(jax.random.key(0), (n, *shape))
    y = jnp.arange(n, dtype=jnp.int32) % 10
    pc, cov = stem.patch_stats(x)
    p = 9 * shape[-1]
    copies = (jax.random.normal(jax.random.key(1), (n, p, w)) * 0.1,
              jnp.ones((n, w)), jnp.zeros((n, w)))
    g_out = jax.random.normal(jax.random.key(2),
                              (n, shape[0] // 2, shape[1] // 2, w))
    for c in args.chunks:
      def block(pc, cov, copies, g, c=c):
        out, vjp = jax.vjp(lambda t: stem.block_per_example(
            pc, cov, *t, chunk=c), copies)
        return out, vjp(g)
      impls.append(_bench.jax_impl(f"block/{c}", block, (pc, cov, copies,
                                                         g_out),
                                   items=n, flops=None))
    model = models.ConvNet(10, width=w, depth=3)
    params = models.init_params(model, jax.random.key(3), shape)
    bits = clipping.fixed_point_bits(4 * n, 1.0)
    for c in args.chunks:
      stem.default_chunk = lambda _, c=c: c  # read when traced (compiled here)
      impls.append(_bench.jax_impl(
          f"clipped/{c}",
          lambda p, x, y, m: pergrad.convnet_clipped_grad_sum(
              model, p, x, y, m, clip_norm=1.0, bits=bits),
          (params, x, y, jnp.ones(n)), items=n, flops=3 * n * fwd))
    stem.default_chunk = default_chunk
    batch = 256 if not args.quick else 32
    xt = jax.random.normal(jax.random.key(4), (batch, *shape))
    yt = jnp.arange(batch, dtype=jnp.int32) % 10
    cfg = evaluate.EvalConfig(width=w, depth=3)
    for c in (0, 8):
      def chunked(x, *rest, c=c):
        if not c or x.shape[0] <= c:
          return shared_block(x, *rest)
        parts = clipping.split_rows(x, c)
        out = jax.lax.map(lambda xc: shared_block(xc, *rest), parts)
        return out.reshape(-1, *out.shape[2:])[:x.shape[0]]
      stem.conv_norm_relu_pool = chunked
      evaluate._step_for.cache_clear()  # pylint: disable=protected-access
      step, opt = evaluate._train_step(model, cfg)  # pylint: disable=protected-access
      own = jax.tree.map(jnp.copy, params)  # the step donates its state
      state = [own, opt.init(own)]
      call = (jnp.float32(0.01), jax.random.key(5), xt, yt, jnp.int32(0))
      compiled = step.lower(*state, *call).compile()

      def run(compiled=compiled, state=state, call=call):
        state[:] = compiled(*state, *call)
        return jax.block_until_ready(state[0])
      run()
      impls.append(_bench.Impl(name=f"train/{c}", run=run, framework="jax",
                               items=batch, flops=3 * batch * fwd))
    stem.conv_norm_relu_pool = shared_block
    evaluate._step_for.cache_clear()  # pylint: disable=protected-access
    impls += _bench.matmul_impls(512, with_torch=False)
    stats = _bench.measure(impls, rounds=args.rounds, warmup=1)
    summary = _bench.summarize(impls, stats, baseline=f"clipped/{args.chunks[0]}",
                               items_label="rows")
    name = "x".join(map(str, shape))
    tables[name] = summary
    print(f"\n{name}, width {w}, {n} rows "
          f"({_bench.environment_short()})")
    print(_bench.markdown(summary, items_label="rows"))
  if args.out:
    _bench.write_json(args.out, {"environment": _bench.environment(),
                                 "tables": tables})


if __name__ == "__main__":
  main()
