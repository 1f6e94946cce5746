"""Where the M_F query's time goes: each ConvNet layer alone, the forward,
our query and jax-privacy's clipped_fun, on one chunk of images.

    python benchmarks/bench_layers.py --out runs/bench/layers.json   # ~1.5 min

On one chunk of --chunk images (default 100, the CPU query chunk; ConvNet-3
width 128, 32x32x3, instance norm, K = 10, C = 1), timed side by side in
interleaved rounds (`_bench.measure`):

  conv<i>          layer i's 3x3 convolution (+ bias) alone, on a random
                   input of that layer's shape
  post<i>          layer i's instance norm + ReLU + 2x2 average pool alone
  forward          the jitted embedding of the chunk (all layers)
  ours             `clipping.clipped_class_sums` of the chunk (one batch)
  jaxprivacy_mbN   jax-privacy's clipped_fun of x -> onehot(y) (x) embed(x),
                   no microbatching (the same chunk is its microbatch)

plus the n x n float32 matmul. The sum of the conv rows is the floor that
any implementation calling XLA's convolutions pays; the table's notes give
it and each row's time as a multiple of it. Per-row GFLOP/s counts the
convolution FLOPs only (post rows: none).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402  pylint: disable=wrong-import-position

FULL = dict(chunk=100, width=128, depth=3, image_size=32, rounds=7,
            warmup=1, matmul_n=2048)
QUICK = dict(chunk=20, width=32, depth=3, image_size=32, rounds=2, warmup=1,
             matmul_n=512)


def main(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _bench.add_shape_args(ap, "runs/bench/layers.json")
  ap.add_argument("--chunk", type=int, default=None,
                  help="images per call (default 100; --quick 20)")
  ap.add_argument("--width", type=int, default=None,
                  help="ConvNet width (default 128; --quick 32)")
  _bench.add_common_args(ap)
  ap.set_defaults(max_slowdown=0)  # every row is one chunk: keep them all
  args = ap.parse_args(argv)
  args.torch_threads = "0"  # no torch rows here
  _bench.resolve(args, FULL, QUICK)

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import clipping, models  # pylint: disable=import-outside-toplevel

  k, n, c_clip, wd = args.num_classes, args.chunk, args.clip_norm, args.width
  hw = args.image_size
  model = models.ConvNet(num_classes=k, width=wd, depth=args.depth)
  key = jax.random.key(args.seed)
  params = models.init_params(model, key, (hw, hw, 3))
  embed = models.embed_fn(model)
  x = jax.random.normal(jax.random.fold_in(key, 1), (n, hw, hw, 3))
  y = jnp.arange(n, dtype=jnp.int32) % k
  mask = jnp.ones((n,), jnp.float32)
  impls, notes = [], []

  def add(name, fn, fargs, flops):
    im = _bench.jax_impl(name, fn, fargs, items=n, flops=flops)
    impls.append(im)
    print(f"{name}: first call {im.first_call_s:.2f} s", flush=True)

  conv_rows = []
  size, cin = hw, 3
  for i in range(args.depth):
    p = params[f"conv{i}"]
    xi = jax.random.normal(jax.random.fold_in(key, 10 + i),
                           (n, size, size, cin))

    def conv(kern, bias, a):
      return jax.lax.conv_general_dilated(
          a, kern, (1, 1), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    flops = 2.0 * n * size * size * cin * 9 * wd
    add(f"conv{i}", conv, (p["kernel"], p["bias"], xi), flops)
    conv_rows.append(f"conv{i}")
    s = params[f"norm{i}"]
    ai = jax.random.normal(jax.random.fold_in(key, 20 + i),
                           (n, size, size, wd))

    def post(scale, bias, a):
      return nn.avg_pool(jax.nn.relu(models.instance_norm(a, scale, bias)),
                         (2, 2), strides=(2, 2))
    add(f"post{i}", post, (s["scale"], s["bias"], ai), 0.0)
    size, cin = size // 2, wd

  flops = n * _bench.convnet_forward_flops((hw, hw), 3, wd, args.depth, None)
  add("forward", embed, (params, x), flops)

  def ours(p, xx, yy, mm):
    return clipping.clipped_class_sums(embed, p, xx, yy, mm, num_classes=k,
                                       clip_norm=c_clip)
  add("ours", ours, (params, x, y, mask), flops)
  try:
    from jax_privacy import clipping as jp_clipping  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    notes.append(f"jax_privacy row skipped: {e}")
  else:
    def per_example(p, xe, ye):
      e = embed(p, xe)[0]
      return jax.nn.one_hot(ye[0], k, dtype=e.dtype)[:, None] * e[None, :]
    cf = jp_clipping.clipped_fun(per_example, batch_argnums=(1, 2),
                                 l2_clip_norm=c_clip)
    add("jaxprivacy_mbNone", lambda p, xx, yy, mm: cf(
        p, xx, yy, is_padding_example=mm == 0), (params, x, y, mask), flops)
  impls += _bench.matmul_impls(args.matmul_n, with_torch=False)

  def floor_notes(stats):
    floor = sum(stats[r]["median_s"] for r in conv_rows)
    post = sum(stats[f"post{i}"]["median_s"] for i in range(args.depth))
    notes.append(f"sum of the conv rows (the convolution floor): "
                 f"{floor:.4f} s; sum of the post rows: {post:.4f} s")
    for name in ("forward", "ours", "jaxprivacy_mbNone"):
      if name in stats:
        notes.append(f"{name}: {stats[name]['median_s'] / floor:.2f}x the "
                     "convolution floor")
    return {"conv_floor_s": floor, "post_s": post}

  _bench.time_and_report(args, impls, notes, baseline="forward",
                         items_label="images", derive=floor_notes, record={
      "benchmark": "layers", "environment": _bench.environment()})


if __name__ == "__main__":
  main()
