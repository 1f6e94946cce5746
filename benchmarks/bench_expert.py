"""The expert's DP-SGD step (the `expert` stage) at a git revision and in
this checkout, side by side.

    python benchmarks/bench_expert.py --before 506c4d2 --out runs/bench/expert.json  # ~4 min
    python benchmarks/bench_expert.py --quick                                        # smoke run

For each image shape (default 28x28x1 and 32x32x3; ConvNet-3 width 128,
10 classes, instance norm) the stage's jitted step is built as
`expert.private_step` builds it for a run: Poisson sampling at q_E of
--num-train private rows (random images), the clipped gradient sum of
`pergrad` in microbatches of `expert.default_microbatch()`, Gaussian
noise. Variants:

  before   pergrad.py, clipping.py, winograd.py and stem.py (pergrad's
           convolutions and first block) as they were at --before (loaded
           from `git show REV:dpgeng_jax/...`), everything else current
           (until the sixteenth session, 2026-12-07, stem.py came from
           this checkout); a revision before the fixed-point sums keeps
           its float32 sums (the current step's `bits` are ignored)
  after    this checkout
  after, microbatch M   this checkout in microbatches of M (--microbatches)
  after, 7x7 on XLA   this checkout with pergrad.WINOGRAD_MIN_PIXELS 64
           (XLA's convolution on 7x7 maps, as models.ConvNet); only for
           shapes with a 7x7 map (28x28)

Timed: the first call (compilation + one step) and, after it, --rounds
interleaved rounds (order rotated) of one step each, round r on the r-th
Poisson batch (the same for every variant). The capacity is sized, as in a
run, for --num-rows rows (a run's public bound on N from its count
release; default N itself). Rate: the estimate's
useful FLOPs of one step (q_E N examples x 3 forward passes, as
dpgeng_jax/estimate.py counts the stage; the padded Poisson capacity is
computed but not counted), per second, and its share of this machine's
float32 matmul rate measured in the same process (estimate.measure_rate).
"Stage" columns: what the stage's --steps steps take at these figures
(first call + steps - 1 medians), with its useful-FLOP rate.

With --distill, also the distillation step with the expert's alignment
term (IPC 10, factor 2, K 10, random extractors of width --width, the
class chunks of stages.distill_class_chunk, the alignment term of a
ConvNet of the same width): distill.py at --before (the term over all
classes, outside the chunks) against this checkout (the term inside each
class chunk), median of --rounds interleaved steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _bench  # noqa: E402  pylint: disable=wrong-import-position

REPO_ROOT = _bench.REPO_ROOT


def _module_at(rev: str, name: str):
  """dpgeng_jax/<name>.py at git revision rev, imported as a module of its
  own (it imports the rest of the package from this checkout)."""
  src = subprocess.run(["git", "show", f"{rev}:dpgeng_jax/{name}.py"],
                       cwd=REPO_ROOT, check=True, capture_output=True,
                       text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), f"{name}_{rev}.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location(f"_{name}_{rev}", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


def _takes_bits(grad_sum):
  """grad_sum, or for a revision before the fixed-point sums (no `bits`
  keyword) a wrapper that ignores bits: its float32 sums, as it ran."""
  params = inspect.signature(grad_sum).parameters.values()
  if any(p.name == "bits" or p.kind == p.VAR_KEYWORD for p in params):
    return grad_sum
  return lambda p, batch, mask, bits=None: grad_sum(p, batch, mask)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--before", default=None,
                  help="git revision for the 'before' variant (omit: after only)")
  ap.add_argument("--shapes", nargs="+", type=_bench.image_shape,
                  default=[(28, 28, 1), (32, 32, 3)])
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--num-train", type=int, default=1438)
  ap.add_argument("--num-rows", type=int, default=0,
                  help="the public bound on N that sizes the Poisson capacity, "
                  "as a run's count release gives it (0: N itself)")
  ap.add_argument("--sampling-rate", type=float, default=0.5)
  ap.add_argument("--steps", type=int, default=10,
                  help="the stage's DP-SGD steps (for the stage columns)")
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--microbatches", type=int, nargs="*", default=[],
                  help="also this checkout with these microbatch sizes")
  ap.add_argument("--distill", action="store_true",
                  help="also time the distillation step with the expert term")
  ap.add_argument("--quick", action="store_true",
                  help="width 16, 200 rows, 28x28x1, 2 rounds")
  ap.add_argument("--out", default=None, help="JSON file for the results")
  args = ap.parse_args(argv)
  env = _bench.environment()
  if args.quick:
    args.width, args.num_train, args.rounds = 16, 200, 2
    args.shapes = [(28, 28, 1)]

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import (accounting, clipping, estimate, expert,  # pylint: disable=import-outside-toplevel
                          mechanisms, models, pergrad)  # pylint: disable=import-outside-toplevel

  impls = {"after": (pergrad, clipping)}
  if args.before:
    old = _module_at(args.before, "pergrad")
    old.winograd = _module_at(args.before, "winograd")  # its layer choice
    old.stem = _module_at(args.before, "stem")  # its first block
    impls = {"before": (old, _module_at(args.before, "clipping")), **impls}
  rate = estimate.measure_rate()["matmul_flops_per_s"] / 1e9
  cfg = expert.ExpertConfig(sampling_rate=args.sampling_rate)
  microbatch = expert.default_microbatch()
  # A run's tail: delta 1e-5 at epsilon 1 over ~400 abort events
  # (accounting.failure_log_tail); 847 rows of 1438 at q_E 0.5.
  log_tail = accounting.failure_log_tail(1e-5, 1.0, 410)
  num_rows = max(args.num_rows, args.num_train)
  capacity = mechanisms.poisson_capacity([num_rows], args.sampling_rate,
                                         log_tail=log_tail)
  rows = []
  for shape in args.shapes:
    model = models.ConvNet(10, width=args.width, depth=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.num_train, *shape)).astype(np.float32)
    y = (np.arange(args.num_train) % 10).astype(np.int32)
    params = models.init_params(model, jax.random.key(0), shape)
    useful = (3 * args.sampling_rate * args.num_train
              * estimate.forward_flops(shape, args.width, 3, 10))
    runs = {}
    variants = {name: (*impl, microbatch) for name, impl in impls.items()}
    for mb in args.microbatches:
      variants[f"after, microbatch {mb}"] = (*impls["after"], mb)
    if any(49 <= (shape[0] >> i) * (shape[1] >> i) < 64 for i in range(3)):
      variants["after, 7x7 on XLA"] = (*impls["after"], microbatch)
    names = list(variants)
    floor = pergrad.WINOGRAD_MIN_PIXELS
    for name, (pg, cl, mb) in variants.items():
      pergrad.WINOGRAD_MIN_PIXELS = 64 if name.endswith("XLA") else floor
      grad_sum = _takes_bits(cl.microbatched(
          pg.make_grad_sum_fn(model, clip_norm=1.0), mb))
      step, data = expert.private_step(grad_sum, cfg, 1.0, x, y,
                                       num_rows, log_tail)
      key = jax.random.key(1)
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, *data, key))
      runs[name] = dict(step=step, data=data, key=key, times=[],
                        first_s=time.perf_counter() - t0)
    pergrad.WINOGRAD_MIN_PIXELS = floor
    for r in range(args.rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        run = runs[name]
        t0 = time.perf_counter()
        # A fresh Poisson batch each round (the same keys for every
        # variant): a step's time may follow the realised batch size.
        jax.block_until_ready(run["step"](
            params, *run["data"], jax.random.fold_in(run["key"], r)))
        run["times"].append(time.perf_counter() - t0)
    base = statistics.median(runs[names[0]]["times"])
    for name in names:
      med = statistics.median(runs[name]["times"])
      stage = runs[name]["first_s"] + (args.steps - 1) * med
      rows.append(dict(shape="x".join(map(str, shape)), variant=name,
                       median_s=med, min_s=min(runs[name]["times"]),
                       first_s=runs[name]["first_s"],
                       gflops=useful / med / 1e9,
                       share=useful / med / 1e9 / rate,
                       speedup=base / med, stage_s=stage,
                       stage_share=args.steps * useful / stage / 1e9 / rate))
  lines = [f"matmul rate (estimate.measure_rate): {rate:.0f} GFLOP/s; width "
           f"{args.width}, N {args.num_train} (bound {num_rows}), q_E "
           f"{args.sampling_rate}, Poisson capacity {capacity}, microbatch {microbatch}, "
           f"{args.rounds} rounds",
           "", "| shape | variant | median s per step | compile + first s "
           "| useful GFLOP/s | share of matmul | speed-up | stage s "
           f"({args.steps} steps) | stage share |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['variant']} | {r['median_s']:.2f} | "
                 f"{r['first_s']:.1f} | {r['gflops']:.0f} | "
                 f"{100 * r['share']:.0f} % | {r['speedup']:.2f} | "
                 f"{r['stage_s']:.1f} | {100 * r['stage_share']:.0f} % |")
  if args.distill:
    lines += ["", *_distill_table(args, impls)]
  print("\n".join(lines))
  if args.out:
    _bench.write_json(args.out, dict(
        matmul_gflops=rate, rows=rows, width=args.width,
        num_train=args.num_train, num_rows=num_rows, capacity=capacity, microbatch=microbatch,
        environment=env))


def distill_setup(shape, width: int, queries: int, k: int = 10,
                  ipc: int = 10, f: int = 2):
  """A distillation problem as a run sets it up (random extractors of
  `width`, the stage's class chunks) with random targets, and the expert's
  alignment term of a ConvNet of the same width: (plan, optimiser,
  targets, counts, stored images, class chunk, term(dec, classes))."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import distill, expert, extractors, models, stages  # pylint: disable=import-outside-toplevel
  model = models.ConvNet(k, width=width, depth=3)
  plan = distill.QueryPlan(extractors.random_pool(model, shape),
                           models.embed_fn(model), k)
  params = models.init_params(model, jax.random.key(3), shape)
  p_ref = jax.nn.softmax(jax.random.normal(jax.random.key(4), (k, k)), -1)
  d = models.embed_fn(model)(params, jnp.zeros((1, *shape))).shape[-1]
  targets = jax.random.normal(jax.random.key(5), (queries, k, d))
  images = jax.random.normal(jax.random.key(1), (k, ipc, *shape))
  chunk = stages.distill_class_chunk(k, ipc * f * f, shape, width)

  def term(dec, classes=None):
    return 0.1 * expert.alignment_loss(params, model, dec, p_ref, tau=1.0,
                                       beta=0.1, classes=classes)

  return (plan, distill.image_optimizer(0.05), targets,
          jnp.full((k,), 70.0), images, chunk, term)


def _distill_table(args, impls) -> list[str]:
  """Median seconds of the distillation step with the expert term."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import distill  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import init as init_lib  # pylint: disable=import-outside-toplevel
  mods = {"after": distill}
  if "before" in impls:
    mods = {"before": _module_at(args.before, "distill"), **mods}
  f = 2
  lines = ["| shape | variant | s per distillation step with the expert term "
           "| speed-up |", "|---|---|---|---|"]
  for shape in args.shapes:
    plan, opt, targets, counts, images, chunk, term = distill_setup(
        shape, args.width, queries=4)
    runs = {}
    for name, mod in mods.items():
      extra = (lambda dec: term(dec)) if name == "before" else term
      step = mod.make_step(plan, opt, clip_norm=1.0,
                           decode=lambda s: init_lib.decode(s, f),
                           extra_loss=extra, class_chunk=chunk)
      state = distill.init_state(jnp.copy(images), opt)
      state, loss = step(state, targets, counts, jax.random.key(0))
      jax.block_until_ready(loss)
      runs[name] = [step, state, []]
    names = list(runs)
    for r in range(args.rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        step, state, times = runs[name]
        t0 = time.perf_counter()
        state, loss = step(state, targets, counts, jax.random.key(0))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
        runs[name][1] = state
    base = statistics.median(runs[names[0]][2])
    for name in names:
      med = statistics.median(runs[name][2])
      lines.append(f"| {'x'.join(map(str, shape))} | {name} | {med:.2f} | "
                   f"{base / med:.2f} |")
  return lines


if __name__ == "__main__":
  main()
