"""Throughput of the M_F query: per-class clipped sums of ConvNet embeddings.

    python benchmarks/bench_query.py --out runs/bench/query.json               # ~2.5 min
    python benchmarks/bench_query.py --quick --out runs/bench/query_quick.json  # ~30 s

(times measured on the 2-core VM with other jobs running, load ~5.)

Measures, side by side in one process (interleaved rounds after warm-up,
median over rounds; 2-core shared CPU: compare ratios, not absolute
figures across runs), the query on the standard ConvNet (width 128, depth 3,
32x32x3 inputs, instance norm), K = 10 classes x 50 images = 500 images,
clip norm C = 1:

  jax_forward            non-private jitted embedding of all images (floor)
                         by dpgeng_jax's ConvNet (conv_impl='auto': on CPU
                         its wide layers are Winograd F(2x2, 3x3) batched
                         matmuls, dpgeng_jax/winograd.py)
  jax_forward_xlaconv    the same network with XLA's convolution
                         (conv_impl='xla'; what flax.linen.Conv runs)
  ours                   jitted dpgeng_jax.clipping.clipped_class_sums
  ours_chunk<c>          the same with chunk_size=c (skipped if the keyword
                         does not exist yet)
  ours_xlaconv_chunk<c>  ours_chunk<c> on the XLA-convolution network
  ours_fixed_chunk<c>    ours_chunk<c> (largest c) in fixed point (bits,
                         int32 sums), as the query's release takes them
  jaxprivacy_onehot_mb*  jax_privacy.clipping.clipped_fun of the per-example
                         function x -> onehot(y) (x) embed(x) (a (K, d) output
                         whose norm is the embedding's), summed over the
                         batch; microbatch_size None and 50; on the standard
                         ConvNet with XLA's convolution, as a jax-privacy
                         user writes it with flax.linen.Conv
  jaxprivacy_classvmap   clipped_fun(embed) summed within a class, vmapped
                         over the 10 classes of the class-major (K, n, ...)
                         layout (XLA convolution)
  jaxprivacy_onehot_mb*_winograd
                         the same on dpgeng_jax's ConvNet: how much of the
                         gap is the convolution algorithm
  torch_forward          no-grad eager forward of all images (torch floor)
  torch_eager_class_loop PyTorch eager in the NDPDC reference style: a Python
                         loop over classes, embed the class's images under
                         no_grad, clip rows, sum, add Gaussian noise

plus an n x n float32 matmul in JAX and torch in the same rounds; the larger
of the two medians is the machine's matmul rate, and each row's achieved
GFLOP/s (analytic conv FLOPs, forward only) is given as a fraction of it.
The JAX rows add no noise (the brief's definition; noise on the (10, 2048)
sums costs microseconds); the torch loop does.

With --quick the sizes shrink (10 images per class, width 64) and the script
checks that ours, the chunked variants, jax-privacy's sums and torch's sums
(Flax parameters copied in, noise off) agree on the same inputs.
Output: a markdown table on stdout; all figures in --out (JSON).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402  pylint: disable=wrong-import-position

FULL = dict(per_class=50, width=128, depth=3, image_size=32, rounds=5,
            warmup=1, chunks="50,100", jp_microbatch="50,100", matmul_n=2048)
QUICK = dict(per_class=10, width=64, depth=3, image_size=32, rounds=2,
             warmup=1, chunks="10,50", jp_microbatch="10", matmul_n=1024)


def main(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _bench.add_shape_args(ap, "runs/bench/query.json",
                        quick_width=QUICK["width"])
  ap.add_argument("--per-class", type=int, default=None,
                  help="images per class (default 50; --quick 10)")
  ap.add_argument("--noise-multiplier", type=float, default=1.0,
                  help="torch loop's noise (default %(default)s)")
  ap.add_argument("--chunks", default=None,
                  help="chunk sizes for ours (default '50,100'; --quick "
                       "'10,50'; '' for none)")
  ap.add_argument("--jp-microbatch", default=None,
                  help="jax-privacy microbatch sizes besides None "
                       "(default '50,100'; --quick '10'; '' for none)")
  _bench.add_common_args(ap)
  args = ap.parse_args(argv)
  _bench.resolve(args, FULL, QUICK)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import clipping  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import models  # pylint: disable=import-outside-toplevel

  env = _bench.environment()
  threads = _bench.torch_thread_rows(args.torch_threads)
  torch = None if args.no_torch else _bench.maybe_torch()

  k, n_c, c_clip = args.num_classes, args.per_class, args.clip_norm
  n = k * n_c
  hw = (args.image_size, args.image_size)
  model = models.ConvNet(num_classes=k, width=args.width, depth=args.depth)
  key = jax.random.key(args.seed)
  kp, kx = jax.random.split(key)
  params = models.init_params(model, kp, (*hw, 3))
  embed = models.embed_fn(model)
  # The same parameters run by XLA's convolution (flax.linen.Conv's).
  embed_xla = models.embed_fn(models.ConvNet(
      num_classes=k, width=args.width, depth=args.depth, conv_impl="xla"))
  x = jax.random.normal(kx, (n, *hw, 3), jnp.float32)
  y = jnp.repeat(jnp.arange(k, dtype=jnp.int32), n_c)  # class-major
  mask = jnp.ones((n,), jnp.float32)
  d = _bench.convnet_feature_dim(hw, args.width, args.depth)
  flops = n * _bench.convnet_forward_flops(hw, 3, args.width, args.depth, None)
  notes = []
  outputs = {}  # name -> (K, d) result for the checks

  print(f"query: K={k} x {n_c} images = {n}, {hw[0]}x{hw[1]}x3, width "
        f"{args.width}, depth {args.depth}, d={d}, C={c_clip}; "
        f"{flops / 1e9:.2f} GFLOP per call (forward)")
  print(f"jax {env['jax']} ({env['jax_device_kind']}), torch {env['torch']} "
        f"threads {threads} (default {env.get('torch_default_num_threads')}), "
        f"loadavg "
        f"{env['loadavg_start']}")

  impls = []

  def add_jax(name, fn, fargs, note=""):
    print(f"compiling {name} ...", flush=True)
    im = _bench.jax_impl(name, fn, fargs, items=n, flops=flops, note=note)
    impls.append(im)
    print(f"  first call {im.first_call_s:.2f} s (compile {im.compile_s:.2f})")
    return im

  add_jax("jax_forward", embed, (params, x))
  add_jax("jax_forward_xlaconv", embed_xla, (params, x))

  def ours(p, xx, yy, mm):
    return clipping.clipped_class_sums(embed, p, xx, yy, mm, num_classes=k,
                                       clip_norm=c_clip)
  outputs["ours"] = add_jax("ours", ours, (params, x, y, mask))

  for c in _bench.parse_ints(args.chunks):
    def ours_c(p, xx, yy, mm, c=c):
      return clipping.clipped_class_sums(embed, p, xx, yy, mm, num_classes=k,
                                         clip_norm=c_clip, chunk_size=c)
    try:
      jax.eval_shape(ours_c, params, x, y, mask)
    except TypeError as e:
      msg = (f"ours_chunk{c} skipped: clipped_class_sums has no chunk_size "
             f"keyword yet ({e})")
      print("NOTE:", msg)
      notes.append(msg)
      continue
    except Exception as e:  # pylint: disable=broad-except
      msg = f"ours_chunk{c} skipped: {type(e).__name__}: {e}"
      print("NOTE:", msg)
      notes.append(msg)
      continue
    outputs[f"ours_chunk{c}"] = add_jax(f"ours_chunk{c}", ours_c,
                                        (params, x, y, mask))
  if args.chunks:
    c = max(_bench.parse_ints(args.chunks))

    def ours_xla(p, xx, yy, mm):
      return clipping.clipped_class_sums(embed_xla, p, xx, yy, mm,
                                         num_classes=k, clip_norm=c_clip,
                                         chunk_size=c)
    outputs[f"ours_xlaconv_chunk{c}"] = add_jax(
        f"ours_xlaconv_chunk{c}", ours_xla, (params, x, y, mask))
    if "bits" in inspect.signature(clipping.clipped_class_sums).parameters:
      bits = clipping.fixed_point_bits(x.shape[0], c_clip)

      def ours_fixed(p, xx, yy, mm):
        return clipping.clipped_class_sums(
            embed, p, xx, yy, mm, num_classes=k, clip_norm=c_clip,
            chunk_size=c, bits=bits).astype(jnp.float32) * 2.0 ** -bits
      outputs[f"ours_fixed_chunk{c}"] = add_jax(
          f"ours_fixed_chunk{c}", ours_fixed, (params, x, y, mask))

  # jax-privacy.
  try:
    from jax_privacy import clipping as jp_clipping  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    jp_clipping = None
    notes.append(f"jax_privacy rows skipped: {e}")
    print("NOTE:", notes[-1])
  if jp_clipping is not None:
    def jp_onehot_fn(emb, mb):
      def per_example_onehot(p, xe, ye):
        # xe: (1, H, W, 3), ye: (1,) (clipped_fun keeps a batch axis of 1).
        e = emb(p, xe)[0]
        return jax.nn.one_hot(ye[0], k, dtype=e.dtype)[:, None] * e[None, :]
      cf = jp_clipping.clipped_fun(per_example_onehot, batch_argnums=(1, 2),
                                   l2_clip_norm=c_clip, microbatch_size=mb)

      def jp_onehot(p, xx, yy, mm):
        return cf(p, xx, yy, is_padding_example=mm == 0)
      return jp_onehot

    mbs = []
    for mb in [None] + _bench.parse_ints(args.jp_microbatch):
      if mb is not None and n % mb:
        notes.append(f"jaxprivacy_onehot_mb{mb} skipped: {mb} does not "
                     f"divide {n}")
        print("NOTE:", notes[-1])
        continue
      mbs.append(mb)
    for suffix, emb, note in (
        ("", embed_xla, "XLA convolution"),
        ("_winograd", embed, "dpgeng_jax's ConvNet (conv_impl auto)")):
      for mb in mbs:
        name = f"jaxprivacy_onehot_mb{mb if mb else 'None'}{suffix}"
        outputs[name] = add_jax(name, jp_onehot_fn(emb, mb),
                                (params, x, y, mask), note=note)

    cf_emb = jp_clipping.clipped_fun(lambda p, xe: embed_xla(p, xe)[0],
                                     batch_argnums=1, l2_clip_norm=c_clip)
    xk = x.reshape(k, n_c, *x.shape[1:])
    mk = mask.reshape(k, n_c)

    def jp_classvmap(p, xx, mm):
      return jax.vmap(lambda xc, mc: cf_emb(p, xc,
                                            is_padding_example=mc == 0))(xx, mm)
    outputs["jaxprivacy_classvmap"] = add_jax("jaxprivacy_classvmap",
                                              jp_classvmap, (params, xk, mk))

  # PyTorch.
  torch_check = None
  if torch is not None:
    net = _bench.torch_convnet(3, args.width, args.depth, k, hw)
    net.eval()
    xt = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)).contiguous()
    xs = [xt[c * n_c:(c + 1) * n_c].contiguous() for c in range(k)]
    stddev = args.noise_multiplier * c_clip

    def torch_forward():
      with torch.no_grad():
        return net.embed(xt)

    def torch_class_loop(noise=True):
      sums = []
      for c in range(k):  # the reference style: one forward per class
        with torch.no_grad():
          e = net.embed(xs[c])
          norms = e.norm(dim=1, keepdim=True)
          e = e * torch.clamp(c_clip / (norms + 1e-12), max=1.0)
          s = e.sum(0)
          if noise:
            s = s + stddev * torch.randn_like(s)
        sums.append(s)
      return torch.stack(sums)

    print("torch rows ...", flush=True)
    for t in threads:
      impls.append(_bench.torch_impl(
          "torch_forward" + _bench.thread_suffix(t), torch_forward, items=n,
          flops=flops, threads=t))
      impls.append(_bench.torch_impl(
          "torch_eager_class_loop" + _bench.thread_suffix(t),
          torch_class_loop, items=n, flops=flops, threads=t,
          note=f"noise sigma={args.noise_multiplier}"))
    torch_check = (net, torch_class_loop)
  else:
    notes.append("torch rows skipped: torch not importable or --no-torch")

  impls += _bench.matmul_impls(args.matmul_n, with_torch=torch is not None,
                               torch_threads=threads)

  checks = {}
  if args.quick:
    print("checks (same inputs):")
    ref = np.asarray(outputs["ours"].fn(*outputs["ours"].args))
    checks["ours_shape"] = list(ref.shape)
    for name, im in outputs.items():
      if name == "ours":
        continue
      got = np.asarray(im.fn(*im.args))
      diff = float(np.max(np.abs(got - ref)))
      checks[f"max_abs_diff_{name}_vs_ours"] = diff
      print(f"  {name} vs ours: shape {got.shape}, max abs diff {diff:.3g}")
      assert got.shape == ref.shape, (name, got.shape, ref.shape)
      assert diff < 1e-3, (name, diff)
    if torch_check is not None:
      net, loop = torch_check
      _bench.load_flax_params_into_torch(
          net, params, args.depth, _bench.feat_hw(hw, args.depth))
      got = loop(noise=False).numpy()  # (K, C*h*w) NCHW flatten order
      fh, fw = _bench.feat_hw(hw, args.depth)
      got_nhwc = got.reshape(k, args.width, fh, fw).transpose(0, 2, 3, 1
                                                              ).reshape(k, -1)
      diff = float(np.max(np.abs(got_nhwc - ref)))
      checks["torch_shape"] = list(got.shape)
      checks["max_abs_diff_torch_vs_ours"] = diff
      print(f"  torch class loop: shape {got.shape} (ours {ref.shape}), "
            f"max abs diff {diff:.3g} (Flax params copied in, no noise)")
      assert got.shape == ref.shape
      assert diff < 1e-3, diff

  _bench.time_and_report(args, impls, notes, baseline="ours",
                         items_label="images", record={
      "benchmark": "query", "environment": env,
      "feature_dim": d, "images_per_call": n,
      "flops_per_call_forward": flops, "checks": checks})


if __name__ == "__main__":
  main()
