"""Where the M_F query's time goes: each ConvNet layer alone, the forward,
our query and jax-privacy's clipped_fun, on one chunk of images.

    python benchmarks/bench_layers.py --out runs/bench/layers.json   # ~1.5 min

On one chunk of --chunk images (default 100, the CPU query chunk; ConvNet-3
width 128, 32x32x3, instance norm, K = 10, C = 1), timed side by side in
interleaved rounds (`_bench.measure`):

  conv<i>_xla      layer i's 3x3 convolution (+ bias) alone by XLA, on a
                   random input of that layer's shape
  conv<i>_winograd the same by dpgeng_jax.winograd.conv3x3 (F(2x2, 3x3))
  post<i>          layer i's instance norm + ReLU + 2x2 average pool alone
  forward          the jitted embedding of the chunk (all layers) by
                   dpgeng_jax's ConvNet (conv_impl 'auto': per layer, as
                   winograd.use_winograd picks)
  forward_xlaconv  the same with XLA's convolution in every layer
  ours             `clipping.clipped_class_sums` of the chunk (one batch)
  jaxprivacy_mbNone[_winograd]
                   jax-privacy's clipped_fun of x -> onehot(y) (x) embed(x),
                   no microbatching (the same chunk is its microbatch), on
                   the XLA-convolution network [on dpgeng_jax's]

plus the n x n float32 matmul. The sum of a network's conv rows is the
floor that any implementation of that network pays; the table's notes
give the XLA floor and the 'auto' floor and each row's time as a multiple
of its own. Per-row GFLOP/s counts the direct convolution's FLOPs only
(post rows: none), whatever the algorithm does.
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
  _bench.add_shape_args(ap, "runs/bench/layers.json",
                        quick_width=QUICK["width"])
  ap.add_argument("--chunk", type=int, default=None,
                  help="images per call (default 100; --quick 20)")
  _bench.add_common_args(ap)
  ap.set_defaults(max_slowdown=0)  # every row is one chunk: keep them all
  args = ap.parse_args(argv)
  args.torch_threads = "0"  # no torch rows here
  _bench.resolve(args, FULL, QUICK)

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import clipping, models, winograd  # pylint: disable=import-outside-toplevel

  k, n, c_clip, wd = args.num_classes, args.chunk, args.clip_norm, args.width
  hw = args.image_size
  model = models.ConvNet(num_classes=k, width=wd, depth=args.depth)
  key = jax.random.key(args.seed)
  params = models.init_params(model, key, (hw, hw, 3))
  embed = models.embed_fn(model)
  embed_xla = models.embed_fn(models.ConvNet(
      num_classes=k, width=wd, depth=args.depth, conv_impl="xla"))
  x = jax.random.normal(jax.random.fold_in(key, 1), (n, hw, hw, 3))
  y = jnp.arange(n, dtype=jnp.int32) % k
  mask = jnp.ones((n,), jnp.float32)
  impls, notes = [], []

  def add(name, fn, fargs, flops):
    im = _bench.jax_impl(name, fn, fargs, items=n, flops=flops)
    impls.append(im)
    print(f"{name}: first call {im.first_call_s:.2f} s", flush=True)

  floors = {"xla": [], "auto": []}  # conv rows of each network
  size, cin = hw, 3
  for i in range(args.depth):
    p = params[f"conv{i}"]
    xi = jax.random.normal(jax.random.fold_in(key, 10 + i),
                           (n, size, size, cin))
    flops = 2.0 * n * size * size * cin * 9 * wd
    for impl in ("xla", "winograd"):
      def conv(kern, bias, a, impl=impl):
        return winograd.conv_3x3_same(a, kern, impl) + bias
      add(f"conv{i}_{impl}", conv, (p["kernel"], p["bias"], xi), flops)
    floors["xla"].append(f"conv{i}_xla")
    floors["auto"].append(
        f"conv{i}_winograd" if winograd.use_winograd("auto", cin,
                                                        (size, size))
        else f"conv{i}_xla")
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
  add("forward_xlaconv", embed_xla, (params, x), flops)

  def ours(p, xx, yy, mm):
    return clipping.clipped_class_sums(embed, p, xx, yy, mm, num_classes=k,
                                       clip_norm=c_clip)
  add("ours", ours, (params, x, y, mask), flops)
  try:
    from jax_privacy import clipping as jp_clipping  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    notes.append(f"jax_privacy row skipped: {e}")
  else:
    for suffix, emb in (("", embed_xla), ("_winograd", embed)):
      def per_example(p, xe, ye, emb=emb):
        e = emb(p, xe)[0]
        return jax.nn.one_hot(ye[0], k, dtype=e.dtype)[:, None] * e[None, :]
      cf = jp_clipping.clipped_fun(per_example, batch_argnums=(1, 2),
                                   l2_clip_norm=c_clip)
      add(f"jaxprivacy_mbNone{suffix}", lambda p, xx, yy, mm, cf=cf: cf(
          p, xx, yy, is_padding_example=mm == 0), (params, x, y, mask), flops)
  impls += _bench.matmul_impls(args.matmul_n, with_torch=False)

  def floor_notes(stats):
    floor = {impl: sum(stats[r]["median_s"] for r in rows)
             for impl, rows in floors.items()}
    post = sum(stats[f"post{i}"]["median_s"] for i in range(args.depth))
    notes.append(f"convolution floors (sum of the conv rows): XLA "
                 f"{floor['xla']:.4f} s, auto ({' + '.join(floors['auto'])})"
                 f" {floor['auto']:.4f} s ({floor['xla'] / floor['auto']:.2f}"
                 f"x faster); sum of the post rows: {post:.4f} s")
    for name, impl in (("forward", "auto"), ("forward_xlaconv", "xla"),
                       ("ours", "auto"), ("jaxprivacy_mbNone", "xla"),
                       ("jaxprivacy_mbNone_winograd", "auto")):
      if name in stats:
        notes.append(f"{name}: {stats[name]['median_s'] / floor[impl]:.2f}x "
                     f"the {impl} convolution floor")
    return {"conv_floor_s": floor["xla"], "conv_floor_auto_s": floor["auto"],
            "post_s": post}

  _bench.time_and_report(args, impls, notes, baseline="forward",
                         items_label="images", derive=floor_notes, record={
      "benchmark": "layers", "environment": _bench.environment()})


if __name__ == "__main__":
  main()
