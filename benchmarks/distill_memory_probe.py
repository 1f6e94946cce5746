"""Host memory of one jitted distillation step, with or without the
expert's alignment term: resident set size after building, lowering,
compiling and each of a few calls, and XLA's temporaries.

    python benchmarks/distill_memory_probe.py --expert            # ~1 min
    python benchmarks/distill_memory_probe.py --expert --no-retain

IPC 10, factor 2, K 10, ConvNet-3 of --width, random extractors, the class
chunks of stages.distill_class_chunk (bench_expert.distill_setup); --shape
as HxWxC. By default freed host memory is retained as the `dpgeng` command
does (hostmem.retain_freed_memory); --no-retain keeps glibc's default.
"""

from __future__ import annotations

import argparse
import resource
import time

import _bench  # noqa: F401  (puts this checkout first on sys.path)


def _rss() -> str:
  with open("/proc/self/status") as f:
    cur = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return f"RSS {cur:.0f} MB (peak {peak:.0f} MB)"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="32x32x3")
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--expert", action="store_true")
  ap.add_argument("--no-retain", action="store_true")
  ap.add_argument("--calls", type=int, default=3)
  args = ap.parse_args(argv)
  from dpgeng_jax import hostmem
  if not args.no_retain:
    hostmem.retain_freed_memory()
  import jax
  import jax.numpy as jnp
  from bench_expert import distill_setup
  from dpgeng_jax import distill
  from dpgeng_jax import init as init_lib

  shape = tuple(int(v) for v in args.shape.split("x"))
  f = 2
  plan, opt, targets, counts, images, chunk, term = distill_setup(
      shape, args.width, queries=40, f=f)
  if not args.expert:
    term = None
  step = distill.make_step(plan, opt, clip_norm=1.0,
                           decode=lambda s: init_lib.decode(s, f),
                           extra_loss=term, class_chunk=chunk)
  state = distill.init_state(jnp.copy(images), opt)
  print(f"{args.shape}, expert term {args.expert}, class chunk {chunk}, "
        f"retained {not args.no_retain}")
  print("built   ", _rss())
  t0 = time.perf_counter()
  lowered = step.lower(state, targets, counts, jax.random.key(0))
  print("lowered ", _rss(), f"{time.perf_counter() - t0:.1f} s")
  compiled = lowered.compile()
  print("compiled", _rss(), f"{time.perf_counter() - t0:.1f} s")
  print(f"XLA temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MB")
  for i in range(args.calls):
    state, loss = compiled(state, targets, counts, jax.random.key(i),
                           step.arrays)
    jax.block_until_ready(loss)
    print(f"call {i}  ", _rss())


if __name__ == "__main__":
  main()
