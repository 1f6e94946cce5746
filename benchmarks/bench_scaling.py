"""How the private query, the distillation step and the sharded sums scale.

    python benchmarks/bench_scaling.py --out runs/bench/scaling.json               # ~6.5 min on the 2-core VM (load 1-1.7)
    python benchmarks/bench_scaling.py --quick --out runs/bench/scaling_quick.json  # ~85-110 s on the 2-core VM (load 2-4)

(On the 2-core VM most of --quick is XLA:CPU compilation: ~8 s per
distillation-step program and ~7 s per sharded gradient-sum program; every
program that draws random numbers pays ~3 s of it with jax 0.10.2's default
jax_threefry_partitionable=True, against ~0.4 s with it off.)

Three parts (--parts a,b,c), each a markdown table on stdout; all figures
go to --out (JSON). Timing is `_bench.measure`: first call (compile + run)
timed separately, warm-up, then interleaved rounds; medians over rounds.
The machine the figures come from may be shared: compare rows of one run.

a. The M_F query against the number of private images N: a jitted
   `clipping.clipped_class_sums` (chunk_size --chunk, default 50; 0 = one
   batch) of a ConvNet (width --width 128, depth 3, 32x32x3, K = 10 classes,
   instance norm, C = 1) on N in {250, 500, 1000, 2000} random images
   (labels i mod K, all rows real). The work is linear in N, so images/s
   should be constant and "s per image vs smallest N" should stay near 1.
   (Measured quirk, jax 0.10.2 XLA:CPU: with exactly 2 chunks, i.e. a
   lax.scan of length 1, the query ran ~2x slower than unchunked or than 3
   chunks; clipping.py now adds two chunks without a scan.)
   An n x n float32 matmul runs in the same rounds to give the machine's
   rate; GFLOP/s counts the analytic forward convolution FLOPs.
b. One distillation step (`distill.make_step`, Adam on the pixels as in
   `distill.image_optimizer`, targets of Q = 4 queries cached) with a
   `QueryPlan` over a random extractor pool (`extractors.random_pool`, as
   the pipeline builds it for `--extractors random`), for IPC in
   {1, 10, 50} and multi-formation factor f in {1, 2} (the pipeline uses
   f = 2 on images >= 16 px: each stored image decodes to f^2 images, so
   the extractor sees K * IPC * f^2 images per step). No expert term. The
   step re-initialises the query's extractor and augments every image, then
   runs forward + backward; its cost should grow linearly in K * IPC * f^2
   once that is large enough to hide the fixed per-step cost.
c. Device scaling / identity of the sharded sums. One subprocess per
   device count d in {1, 2, 4, 8}, started with
   XLA_FLAGS=--xla_force_host_platform_device_count=8 and (by default)
   JAX_PLATFORMS=cpu, computes on the SAME fixed inputs
   `parallel.sharded_clipped_class_sums` (mesh = `parallel.data_mesh(d)`)
   and `parallel.sharded_grad_sum` of `pergrad.make_grad_sum_fn` (the
   expert's clipped per-example gradient sums), times both, and saves the
   outputs; the main process reports the time per call and the max abs
   difference to d = 1 (absolute, and relative to the largest |entry| of
   the d = 1 output; expected ~1e-6 relative: only the float summation
   order differs). Fake CPU devices share the host's cores, so no speed-up
   is expected from them: the column shows the overhead of sharding, not a
   scaling result.

--quick: width 32, N in {100, 200, 400}, IPC in {1, 5, 10} with f = 1, part
c on width 16 with 64 images, 2 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402  pylint: disable=wrong-import-position

FULL = dict(width=128, sizes="250,500,1000,2000", ipcs="1,10,50",
            factors="1,2", rounds=5, warmup=1, matmul_n=2048,
            c_width=128, c_images=512, c_rounds=3)
QUICK = dict(width=32, sizes="100,200,400", ipcs="1,5,10", factors="1",
             rounds=2, warmup=1, matmul_n=512,
             c_width=16, c_images=64, c_rounds=2)


def build_parser():
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/bench/scaling.json",
                  help="JSON file for all figures (default %(default)s)")
  ap.add_argument("--quick", action="store_true",
                  help="small sizes, 2 rounds (~85-110 s on 2 loaded CPU cores)")
  ap.add_argument("--parts", default="a,b,c",
                  help="which parts to run (default %(default)s)")
  ap.add_argument("--num-classes", type=int, default=10,
                  help="K (default %(default)s)")
  ap.add_argument("--width", type=int, default=None,
                  help="ConvNet width of parts a and b (default 128; "
                       "--quick 32)")
  ap.add_argument("--depth", type=int, default=3,
                  help="ConvNet depth (default %(default)s)")
  ap.add_argument("--image-size", type=int, default=32,
                  help="H = W of the images (default %(default)s)")
  ap.add_argument("--clip-norm", type=float, default=1.0,
                  help="C (default %(default)s)")
  ap.add_argument("--chunk", type=int, default=50,
                  help="chunk_size of clipped_class_sums in parts a and c "
                       "(default %(default)s; 0 = one batch)")
  ap.add_argument("--sizes", default=None,
                  help="part a: total images N (default '250,500,1000,2000';"
                       " --quick '100,200,400')")
  ap.add_argument("--ipcs", default=None,
                  help="part b: images per class (default '1,10,50'; "
                       "--quick '1,5,10')")
  ap.add_argument("--factors", default=None,
                  help="part b: multi-formation factors (default '1,2'; "
                       "--quick '1')")
  ap.add_argument("--num-queries", type=int, default=4,
                  help="part b: cached queries Q (default %(default)s)")
  ap.add_argument("--lr-img", type=float, default=0.05,
                  help="part b: Adam learning rate (default %(default)s)")
  ap.add_argument("--strategy", default=None,
                  help="part b: DSA strategy (default the library's)")
  ap.add_argument("--rounds", type=int, default=None,
                  help="timed rounds of parts a and b (default 5; --quick 2)")
  ap.add_argument("--warmup", type=int, default=None,
                  help="warm-up calls per row after the first (default 1)")
  ap.add_argument("--matmul-n", type=int, default=None,
                  help="part a: matmul size (default 2048; --quick 512; "
                       "0 = none)")
  ap.add_argument("--devices", default="1,2,4,8",
                  help="part c: device counts (default %(default)s)")
  ap.add_argument("--c-width", type=int, default=None,
                  help="part c: ConvNet width (default 128; --quick 16)")
  ap.add_argument("--c-images", type=int, default=None,
                  help="part c: images (default 512; --quick 64)")
  ap.add_argument("--c-rounds", type=int, default=None,
                  help="part c: timed rounds per child (default 3; "
                       "--quick 2)")
  ap.add_argument("--c-platform", default="cpu",
                  help="part c: JAX_PLATFORMS of the children (default "
                       "%(default)s, 8 fake devices; 'default' keeps the "
                       "machine's backend: counts above its devices are "
                       "skipped)")
  ap.add_argument("--c-timeout", type=int, default=600,
                  help="part c: seconds per child (default %(default)s)")
  ap.add_argument("--tol", type=float, default=1e-5,
                  help="part c: relative difference flagged as a mismatch "
                       "(default %(default)s)")
  ap.add_argument("--xla-flags", default="",
                  help="appended to XLA_FLAGS before jax starts (default "
                       "none)")
  ap.add_argument("--seed", type=int, default=0,
                  help="parameter and data seed (default %(default)s)")
  # Child mode (part c); not for direct use.
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--child-devices", type=int, default=1,
                  help=argparse.SUPPRESS)
  ap.add_argument("--child-out", default="", help=argparse.SUPPRESS)
  return ap


def resolve(args) -> None:
  table = QUICK if args.quick else FULL
  for k, v in table.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.xla_flags:
    if "jax" in sys.modules:
      raise RuntimeError("--xla-flags must be applied before importing jax")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + args.xla_flags).strip()


def init_params(model, key, image_shape):
  """models.init_params under one jit: eager Flax init compiles every
  initialiser op separately (~10 s on the loaded 2-core VM)."""
  import jax  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import models  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda k: models.init_params(model, k, image_shape))(key)


# ---------------------------------------------------------------------------
# Part a: the query against N.


def part_a(args, notes):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import clipping, models  # pylint: disable=import-outside-toplevel

  k, hw = args.num_classes, (args.image_size, args.image_size)
  chunk = args.chunk or None
  model = models.ConvNet(num_classes=k, width=args.width, depth=args.depth)
  kp, kx = jax.random.split(jax.random.key(args.seed))
  params = init_params(model, kp, (*hw, 3))
  embed = models.embed_fn(model)
  fwd = _bench.convnet_forward_flops(hw, 3, args.width, args.depth, None)
  sizes = _bench.parse_ints(args.sizes)
  print(f"\n[a] query: clipped_class_sums, ConvNet w{args.width} d"
        f"{args.depth} {hw[0]}x{hw[1]}x3, K={k}, chunk_size={chunk}, "
        f"N in {sizes}", flush=True)

  def query(p, xx, yy, mm):
    return clipping.clipped_class_sums(embed, p, xx, yy, mm, num_classes=k,
                                       clip_norm=args.clip_norm,
                                       chunk_size=chunk)

  impls = []
  for n in sizes:
    x = jax.random.normal(jax.random.fold_in(kx, n), (n, *hw, 3), jnp.float32)
    y = jnp.arange(n, dtype=jnp.int32) % k
    mask = jnp.ones((n,), jnp.float32)
    im = _bench.jax_impl(f"query_N{n}", query, (params, x, y, mask), items=n,
                         flops=n * fwd)
    print(f"  N={n}: first call {im.first_call_s:.2f} s (compile "
          f"{im.compile_s:.2f})", flush=True)
    impls.append(im)
  if args.matmul_n:
    impls += _bench.matmul_impls(args.matmul_n, with_torch=False)
  stats = _bench.measure(impls, rounds=args.rounds, warmup=args.warmup,
                         max_slowdown=0)
  summary = _bench.summarize(impls, stats, baseline=impls[0].name,
                             items_label="images")
  rows = summary["rows"]
  base = rows[0]["median_s"] / rows[0]["items_per_call"]
  for r in rows:
    r["s_per_image_vs_smallest"] = (r["median_s"] / r["items_per_call"]) / base
    r["chunk_size"] = chunk
  lines = [
      f"Query time against N (ConvNet w{args.width} d{args.depth}, "
      f"{hw[0]}x{hw[1]}x3, K={k}, chunk_size={chunk}; "
      f"{_bench.environment_short()})",
      "",
      "| N | median s | min s | max s | images/s | s per image vs N="
      f"{rows[0]['items_per_call']} | GFLOP/s | % of matmul | first call s "
      "| compile s | XLA mem MiB |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    frac = r["fraction_of_matmul"]
    lines.append(
        f"| {r['items_per_call']} | {r['median_s']:.4f} | {r['min_s']:.4f} | "
        f"{r['max_s']:.4f} | {r['images_per_s']:.1f} | "
        f"{r['s_per_image_vs_smallest']:.2f} | "
        f"{_bench._f(r['gflops_per_s'], '.1f')} | "  # pylint: disable=protected-access
        f"{_bench._f(frac * 100 if frac else None, '.1f')} | "  # pylint: disable=protected-access
        f"{r['first_call_s']:.2f} | {r['compile_s']:.2f} | "
        f"{_bench._f(r['memory_total_mib'], '.1f')} |")  # pylint: disable=protected-access
  lines.append("")
  lines.append(f"matmul rate ({args.matmul_n}^2 float32, same rounds): "
               f"{_bench._f(summary['matmul_gflops_machine'], '.1f')} GFLOP/s")  # pylint: disable=protected-access
  return {"summary": summary, "table_markdown": "\n".join(lines)}


# ---------------------------------------------------------------------------
# Part b: one distillation step against IPC.


def step_impl(name, step, state, fargs, *, items, flops, note):
  """An Impl around a jitted step with a donated state: the state produced
  by each call is the input of the next (as in the pipeline's loop)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  compiled = step.lower(state, *fargs).compile()
  t1 = time.perf_counter()
  cell = [state]

  def run():
    cell[0], loss = compiled(cell[0], *fargs, step.arrays)
    return jax.block_until_ready((cell[0], loss))

  out = run()
  t2 = time.perf_counter()
  if not np.isfinite(float(out[1])):
    raise FloatingPointError(f"{name}: non-finite loss {out[1]}")
  return _bench.Impl(name=name, run=run, framework="jax", items=items,
                     flops=flops, first_call_s=t2 - t0, compile_s=t1 - t0,
                     memory=_bench.jax_memory(compiled), note=note,
                     fn=compiled, args=None)


def part_b(args, notes):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import augment, distill, extractors, models  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import init as init_lib  # pylint: disable=import-outside-toplevel

  k, hw = args.num_classes, (args.image_size, args.image_size)
  image_shape = (*hw, 3)
  strategy = args.strategy or augment.DEFAULT_STRATEGY
  model = models.ConvNet(k, width=args.width, depth=args.depth)
  plan = distill.QueryPlan(
      extractor=extractors.random_pool(model, image_shape),
      embed_fn=models.embed_fn(model), num_classes=k, strategy=strategy)
  d = models.feature_dim(model, image_shape)
  q = args.num_queries
  key = jax.random.key(args.seed)
  k_t, k_i, public_key = jax.random.split(key, 3)
  counts = jnp.full((k,), 250.0, jnp.float32)  # public p * N_c
  # Targets of the right scale: sums of ~counts clipped rows of norm <= C.
  targets = (counts[None, :, None] * args.clip_norm / jnp.sqrt(d)
             * jax.random.normal(k_t, (q, k, d), jnp.float32))
  fwd = _bench.convnet_forward_flops(hw, 3, args.width, args.depth, None)
  ipcs, factors = _bench.parse_ints(args.ipcs), _bench.parse_ints(args.factors)
  print(f"\n[b] distillation step: make_step, random extractor pool "
        f"(ConvNet w{args.width} d{args.depth}), strategy {strategy}, Q={q}, "
        f"IPC in {ipcs}, factor in {factors}", flush=True)
  opt = distill.image_optimizer(args.lr_img)
  impls, meta = [], {}
  for f in factors:
    if f > 1 and (hw[0] % f or hw[1] % f):
      notes.append(f"factor {f} skipped: {hw} does not tile")
      continue
    step = distill.make_step(plan, opt, clip_norm=args.clip_norm,
                             decode=lambda s, f=f: init_lib.decode(s, f))
    for ipc in ipcs:
      seen = k * ipc * f * f
      images = jax.random.normal(jax.random.fold_in(k_i, ipc * 10 + f),
                                 (k, ipc, *image_shape), jnp.float32)
      state = distill.init_state(images, opt)
      name = f"step_ipc{ipc}_f{f}"
      im = step_impl(name, step, state, (targets, counts, public_key),
                     items=seen, flops=3.0 * seen * fwd,
                     note="flops ~ 3 x forward of the decoded images")
      print(f"  IPC={ipc} f={f}: first call {im.first_call_s:.2f} s "
            f"(compile {im.compile_s:.2f})", flush=True)
      impls.append(im)
      meta[name] = dict(ipc=ipc, factor=f, images_seen=seen)
  stats = _bench.measure(impls, rounds=args.rounds, warmup=args.warmup,
                         max_slowdown=0)
  summary = _bench.summarize(impls, stats, baseline=impls[0].name,
                             items_label="images")
  rows = summary["rows"]
  by_f = {}
  for r in rows:
    r.update(meta[r["name"]])
    by_f.setdefault(r["factor"], r)  # the smallest IPC of each factor
  for r in rows:
    b = by_f[r["factor"]]
    r["s_per_step_vs_smallest_ipc"] = r["median_s"] / b["median_s"]
    r["s_per_image_vs_smallest_ipc"] = ((r["median_s"] / r["images_seen"])
                                        / (b["median_s"] / b["images_seen"]))
  lines = [
      f"Distillation step against IPC (make_step, random extractor ConvNet "
      f"w{args.width} d{args.depth}, {hw[0]}x{hw[1]}x3, K={k}, strategy "
      f"{strategy}, no expert term; images seen = K * IPC * f^2; "
      f"{_bench.environment_short()})",
      "",
      "| IPC | f | images seen | median s | min s | max s | images/s | "
      "s/step vs smallest IPC | s/image vs smallest IPC | ~GFLOP/s | "
      "first call s | compile s | XLA mem MiB |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['ipc']} | {r['factor']} | {r['images_seen']} | "
        f"{r['median_s']:.4f} | {r['min_s']:.4f} | {r['max_s']:.4f} | "
        f"{r['images_per_s']:.1f} | {r['s_per_step_vs_smallest_ipc']:.2f} | "
        f"{r['s_per_image_vs_smallest_ipc']:.2f} | "
        f"{_bench._f(r['gflops_per_s'], '.1f')} | "  # pylint: disable=protected-access
        f"{r['first_call_s']:.2f} | {r['compile_s']:.2f} | "
        f"{_bench._f(r['memory_total_mib'], '.1f')} |")  # pylint: disable=protected-access
  return {"summary": summary, "table_markdown": "\n".join(lines)}


# ---------------------------------------------------------------------------
# Part c: sharded sums on 1..8 devices (one subprocess each).


def child(args) -> int:
  """Runs in a subprocess with XLA_FLAGS / JAX_PLATFORMS already set."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import models, parallel, pergrad  # pylint: disable=import-outside-toplevel

  dcount = args.child_devices
  result = {"devices": dcount, "device_count_seen": jax.device_count(),
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind}
  if dcount > jax.device_count():
    result["skipped"] = (f"{dcount} devices requested, {jax.device_count()} "
                         "visible")
    with open(args.child_out + ".json", "w") as f:
      json.dump(result, f)
    return 0
  k, hw, n = args.num_classes, (args.image_size, args.image_size), args.c_images
  model = models.ConvNet(num_classes=k, width=args.c_width, depth=args.depth)
  params = init_params(model, jax.random.key(args.seed), (*hw, 3))
  rng = np.random.default_rng(args.seed)  # identical in every child
  x = jnp.asarray(rng.standard_normal((n, *hw, 3), dtype=np.float32))
  y = jnp.asarray(np.arange(n, dtype=np.int32) % k)
  mask = jnp.asarray((np.arange(n) < n - n // 8).astype(np.float32))
  mesh = parallel.data_mesh(dcount)
  embed = models.embed_fn(model)
  chunk = args.chunk or None
  gsum = pergrad.make_grad_sum_fn(model, clip_norm=args.clip_norm)

  def class_sums(p, xx, yy, mm):
    return parallel.sharded_clipped_class_sums(
        embed, p, xx, yy, mm, num_classes=k, clip_norm=args.clip_norm,
        mesh=mesh, chunk_size=chunk)

  def grad_sums(p, xx, yy, mm):
    return parallel.sharded_grad_sum(gsum, p, (xx, yy), mm, mesh=mesh)

  fargs = (params, x, y, mask)
  fwd = _bench.convnet_forward_flops(hw, 3, args.c_width, args.depth, None)
  impls = [
      _bench.jax_impl("class_sums", class_sums, fargs, items=n,
                      flops=n * fwd),
      _bench.jax_impl("grad_sums", grad_sums, fargs, items=n,
                      flops=3 * n * _bench.convnet_forward_flops(
                          hw, 3, args.c_width, args.depth, k)),
  ]
  log = lambda s: print(f"    [d={dcount}] {s.strip()}", flush=True)
  stats = _bench.measure(impls, rounds=args.c_rounds, warmup=1,
                         max_slowdown=0, log=log)
  outs = {}
  for im in impls:
    leaves = jax.tree_util.tree_flatten_with_path(im.fn(*im.args))[0]
    for path, leaf in leaves:
      outs[im.name + "/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    result[im.name] = {
        "median_s": stats[im.name]["median_s"],
        "min_s": stats[im.name]["min_s"], "max_s": stats[im.name]["max_s"],
        "samples_s": stats[im.name]["samples_s"],
        "first_call_s": im.first_call_s, "compile_s": im.compile_s,
        "memory": im.memory}
  np.savez(args.child_out + ".npz", **outs)
  with open(args.child_out + ".json", "w") as f:
    json.dump(result, f)
  return 0


def _diff(ref: dict, got: dict, prefix: str):
  import numpy as np  # pylint: disable=import-outside-toplevel
  keys = [kk for kk in ref if kk.startswith(prefix + "/")]
  if sorted(keys) != sorted(kk for kk in got if kk.startswith(prefix + "/")):
    raise ValueError(f"{prefix}: output structure differs")
  abs_diff = max(float(np.max(np.abs(got[kk] - ref[kk]))) for kk in keys)
  scale = max(float(np.max(np.abs(ref[kk]))) for kk in keys)
  return abs_diff, (abs_diff / scale if scale > 0 else None), scale


def part_c(args, notes):
  import numpy as np  # pylint: disable=import-outside-toplevel
  counts = _bench.parse_ints(args.devices)
  fake = max(counts)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                      f"device_count={fake}").strip()
  if args.c_platform != "default":
    env["JAX_PLATFORMS"] = args.c_platform
  env["PYTHONPATH"] = _bench.REPO_ROOT + (
      os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  print(f"\n[c] sharded sums: one subprocess per device count {counts}, "
        f"XLA_FLAGS={env['XLA_FLAGS']!r}, JAX_PLATFORMS="
        f"{env.get('JAX_PLATFORMS', '(unset)')}; ConvNet w{args.c_width} d"
        f"{args.depth}, {args.c_images} images ({args.c_images // 8} padded "
        f"with mask 0)", flush=True)
  results, outputs = [], {}
  with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
    # The children share a throw-away persistent compilation cache, so the
    # programs that do not depend on d (parameter init: ~10 s of XLA:CPU
    # compile, mostly its random draws) compile once, not once per child.
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    for dcount in counts:
      base = os.path.join(tmp, f"d{dcount}")
      cmd = [sys.executable, os.path.abspath(__file__), "--child",
             "--child-devices", str(dcount), "--child-out", base,
             "--num-classes", str(args.num_classes), "--depth",
             str(args.depth), "--image-size", str(args.image_size),
             "--clip-norm", str(args.clip_norm), "--chunk", str(args.chunk),
             "--c-width", str(args.c_width), "--c-images",
             str(args.c_images), "--c-rounds", str(args.c_rounds),
             "--seed", str(args.seed)]
      t0 = time.perf_counter()
      try:
        proc = subprocess.run(cmd, env=env, timeout=args.c_timeout,
                              check=False)
        rc = proc.returncode
      except subprocess.TimeoutExpired:
        rc = "timeout"
      wall = time.perf_counter() - t0
      if rc != 0 or not os.path.exists(base + ".json"):
        notes.append(f"part c: child d={dcount} failed (rc {rc})")
        print("NOTE:", notes[-1])
        results.append({"devices": dcount, "failed": str(rc),
                        "child_wall_s": wall})
        continue
      with open(base + ".json") as f:
        r = json.load(f)
      r["child_wall_s"] = wall
      if "skipped" not in r:
        with np.load(base + ".npz") as z:
          outputs[dcount] = {kk: z[kk] for kk in z.files}
      results.append(r)
  ref_d = counts[0]
  ref = outputs.get(ref_d)
  if ref_d != 1:
    notes.append(f"part c: differences are against d={ref_d} (no d=1 run)")
  mismatches = []
  for r in results:
    got = outputs.get(r["devices"])
    if ref is None or got is None:
      continue
    for name in ("class_sums", "grad_sums"):
      a, rel, scale = _diff(ref, got, name)
      r[name].update(max_abs_diff_vs_ref=a, rel_diff_vs_ref=rel,
                     ref_max_abs=scale)
      if rel is not None and rel > args.tol:
        mismatches.append(f"{name} d={r['devices']}: rel diff {rel:.2e}")
  if mismatches:
    notes.append("part c MISMATCH (> --tol " f"{args.tol:g}): "
                 + "; ".join(mismatches))
    print("WARNING:", notes[-1])

  def cell(r, name, key, fmt):
    v = r.get(name, {}).get(key)
    return _bench._f(v, fmt)  # pylint: disable=protected-access

  kind = next((r.get("device_kind") for r in results if "device_kind" in r),
              "?")
  lines = [
      f"Sharded clipped class sums and clipped gradient sums on d devices "
      f"(same inputs: {args.c_images} images {args.image_size}x"
      f"{args.image_size}x3, {args.c_images // 8} of them mask-0 padding; "
      f"ConvNet w{args.c_width} d{args.depth}; K={args.num_classes}; "
      f"class sums chunk_size={args.chunk or None}). Devices: {kind}"
      + (f", {fake} FAKE host devices sharing the same CPU cores "
         "(--xla_force_host_platform_device_count): no speed-up is expected;"
         " the times show the cost of sharding, not scaling."
         if args.c_platform == "cpu" else ".")
      + f" Differences are max |out_d - out_{ref_d}| over all entries, and "
      f"that divided by max |out_{ref_d}|.",
      "",
      "| devices | class sums median s | grad sums median s | class sums "
      "max abs diff | class sums rel diff | grad sums max abs diff | "
      "grad sums rel diff | class sums compile s | grad sums compile s |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    if "failed" in r or "skipped" in r:
      lines.append(f"| {r['devices']} | {r.get('failed') or r['skipped']} "
                   "| - | - | - | - | - | - | - |")
      continue
    lines.append(
        f"| {r['devices']} | {cell(r, 'class_sums', 'median_s', '.4f')} | "
        f"{cell(r, 'grad_sums', 'median_s', '.4f')} | "
        f"{cell(r, 'class_sums', 'max_abs_diff_vs_ref', '.2e')} | "
        f"{cell(r, 'class_sums', 'rel_diff_vs_ref', '.2e')} | "
        f"{cell(r, 'grad_sums', 'max_abs_diff_vs_ref', '.2e')} | "
        f"{cell(r, 'grad_sums', 'rel_diff_vs_ref', '.2e')} | "
        f"{cell(r, 'class_sums', 'compile_s', '.2f')} | "
        f"{cell(r, 'grad_sums', 'compile_s', '.2f')} |")
  return {"children": results, "child_env": {
      "XLA_FLAGS": env["XLA_FLAGS"],
      "JAX_PLATFORMS": env.get("JAX_PLATFORMS")},
          "mismatches": mismatches, "table_markdown": "\n".join(lines)}


# ---------------------------------------------------------------------------


def main(argv=None):
  args = build_parser().parse_args(argv)
  resolve(args)
  if args.child:
    return child(args)
  t_start = time.perf_counter()
  env = _bench.environment()
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  print(f"jax {env['jax']} ({env['jax_backend']}, {env['jax_device_kind']} x "
        f"{env['jax_device_count']}), loadavg {env['loadavg_start']}; parts "
        f"{parts}")
  notes, results = [], {}
  runners = {"a": part_a, "b": part_b, "c": part_c}
  for p in parts:
    if p not in runners:
      raise SystemExit(f"unknown part {p!r} (a, b, c)")
    t0 = time.perf_counter()
    results[p] = runners[p](args, notes)
    results[p]["wall_s"] = time.perf_counter() - t0
  print()
  for p in parts:
    print(results[p]["table_markdown"])
    print()
  for nt in notes:
    print("NOTE:", nt)
  total = time.perf_counter() - t_start
  print(f"total {total:.1f} s")
  _bench.write_json(args.out, {
      "benchmark": "scaling", "config": vars(args), "environment": env,
      "notes": notes, "parts": results, "wall_s": total})
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
