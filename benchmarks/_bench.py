"""Shared helpers for the throughput scripts (bench_query.py, bench_dpsgd.py).

Not a script. What it provides:

* `Impl`: one implementation under test (a zero-argument callable that does
  one complete call and returns only when the result exists), plus what is
  known about it before timing (first-call time, compiled memory, FLOPs).
* `jax_impl` / `torch_impl`: build an `Impl`, timing the first call (JAX:
  lower + compile + first run, i.e. the compile cost; torch: first eager call)
  and, for JAX, reading the compiled executable's memory analysis.
* `measure`: the interleaved timing loop. After warm-up, round r runs every
  implementation once (order rotated by r so no implementation always runs
  first after a pause), each call timed alone with perf_counter around a
  blocking call; statistics are medians over rounds. Implementations whose
  first run (after compilation) or warm call is more than `max_slowdown` x
  the median of the others are taken out of the rounds (the times of the
  calls they made are reported, flagged) so one very slow row cannot eat
  the time budget.
* `image_shape`: the HxWxC parser of the scripts' --shapes.
* FLOP counts of the standard ConvNet, matmul-rate rows (jnp.dot and torch.mm
  of n x n float32) measured in the same rounds, markdown tables and JSON.
* A PyTorch ConvNet equivalent to `dpgeng_jax.models.ConvNet` (NCHW; conv3x3
  'same' -> GroupNorm(W, W) (instance norm) -> ReLU -> AvgPool2d(2)), and
  converters between its parameters and the Flax ones for numerical checks.

The machine these ran on is shared and noisy: only compare figures measured
in the same run (the ratios), never across runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

# Import dpgeng_jax from this checkout, not from an installed copy.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def image_shape(s: str) -> tuple[int, int, int]:
  """An image shape argument written HxWxC ('28x28x1') as (H, W, C), the
  `type` of the scripts' --shapes."""
  h, w, c = (int(v) for v in s.split("x"))
  return (h, w, c)

# ---------------------------------------------------------------------------
# Implementations under test.


@dataclasses.dataclass
class Impl:
  """One row of a benchmark table."""
  name: str
  run: Callable[[], Any]          # one blocking call
  framework: str                  # "jax" | "torch"
  items: int                      # images / examples processed per call
  flops: float | None             # analytic FLOPs per call
  first_call_s: float | None = None   # first call (JAX: incl. compile)
  compile_s: float | None = None      # JAX: lower + compile only
  memory: dict | None = None          # JAX: compiled memory analysis
  group: str = "main"                 # "main" or "matmul"
  note: str = ""
  pre: Callable[[], None] | None = None  # untimed, before every call
  fn: Callable | None = None          # JAX: the compiled executable
  args: tuple | None = None           # JAX: its arguments


def _block(out):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.block_until_ready(out)


def jax_memory(compiled) -> dict | None:
  """temp/argument/output/alias bytes of a compiled executable, if known.

  `total_bytes` = temp + argument + output - alias: what XLA plans to have
  live at the peak of one call (a plan, not a measurement).
  """
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if ma is None:
    return None
  keys = ("temp_size_in_bytes", "argument_size_in_bytes",
          "output_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")
  d = {k: int(getattr(ma, k, 0) or 0) for k in keys}
  d["total_bytes"] = (d["temp_size_in_bytes"] + d["argument_size_in_bytes"]
                      + d["output_size_in_bytes"] - d["alias_size_in_bytes"])
  return d


def jax_impl(name: str, fn: Callable, args: tuple, *, items: int,
             flops: float | None, group: str = "main", note: str = "",
             jit_kwargs: dict | None = None) -> Impl:
  """Jits `fn`, compiles it for `args`, times the first call.

  compile_s is lower + compile; first_call_s is that plus the first run
  (the "time to first result" a user sees). Steady-state calls reuse the
  compiled executable.
  """
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  compiled = jax.jit(fn, **(jit_kwargs or {})).lower(*args).compile()
  t1 = time.perf_counter()
  _block(compiled(*args))
  t2 = time.perf_counter()
  return Impl(name=name, run=lambda: _block(compiled(*args)),
              framework="jax", items=items, flops=flops,
              first_call_s=t2 - t0, compile_s=t1 - t0,
              memory=jax_memory(compiled), group=group, note=note,
              fn=compiled, args=args)


def torch_impl(name: str, call: Callable[[], Any], *, items: int,
               flops: float | None, group: str = "main", note: str = "",
               threads: int | None = None) -> Impl:
  """Wraps an eager torch call (CPU torch is synchronous); times call 1.

  With `threads`, torch.set_num_threads(threads) runs (untimed) before
  every call, so rows with different thread counts can be interleaved.
  """
  import torch  # pylint: disable=import-outside-toplevel
  n_threads = threads or torch_default_threads()
  pre = lambda: torch.set_num_threads(n_threads)
  pre()
  note = (note + ", " if note else "") + f"torch threads={n_threads}" + (
      "" if threads else " (default)")
  t0 = time.perf_counter()
  call()
  t1 = time.perf_counter()
  return Impl(name=name, run=call, framework="torch", items=items,
              flops=flops, first_call_s=t1 - t0, compile_s=None, memory=None,
              group=group, note=note, pre=pre)


# ---------------------------------------------------------------------------
# Timing.


def measure(impls: list[Impl], *, rounds: int, warmup: int,
            max_slowdown: float = 10.0, log=print) -> dict:
  """Interleaved timing; returns {name: stats dict}.

  Warm-up: every implementation runs `warmup` times (after its first call,
  already done when the Impl was built). Then `rounds` rounds; in round r
  the implementations run once each, in an order rotated by r.
  Rows slower than `max_slowdown` x the median of the other main rows (on
  their first run, then again on their warm-up) skip the rest; their
  figures come from the calls they did make (flagged dropped_too_slow).
  """
  gc.collect()
  warm = {}
  dropped = set()
  # Screen on the first run (the first call minus compilation) so that a
  # very slow row does not even spend its warm-up calls.
  if max_slowdown and max_slowdown > 0:
    main = [im for im in impls if im.group == "main"]
    first = {im.name: (im.first_call_s or 0.0) - (im.compile_s or 0.0)
             for im in main}
    for im in main:
      others = [first[o.name] for o in main if o.name != im.name]
      if others and first[im.name] > max_slowdown * statistics.median(others):
        dropped.add(im.name)
        warm[im.name] = [first[im.name]]
        log(f"  {im.name}: first run {first[im.name]:.3f} s is more than "
            f"{max_slowdown:g}x the median of the others "
            f"({statistics.median(others):.3f} s); no warm-up, not in the "
            "rounds; its first run (after any compilation) is reported")
  for im in impls:
    if im.name in dropped:
      continue
    ts = []
    for _ in range(max(1, warmup)):
      if im.pre is not None:
        im.pre()
      t0 = time.perf_counter()
      im.run()
      ts.append(time.perf_counter() - t0)
    warm[im.name] = ts
    log(f"  warm-up {im.name:32s} {min(ts):9.4f} s")

  if max_slowdown and max_slowdown > 0:
    main = [im for im in impls if im.group == "main"]
    for im in main:
      if im.name in dropped:
        continue
      others = [min(warm[o.name]) for o in main if o.name != im.name]
      if others and min(warm[im.name]) > max_slowdown * statistics.median(
          others):
        dropped.add(im.name)
        log(f"  {im.name}: warm call {min(warm[im.name]):.3f} s is more than "
            f"{max_slowdown:g}x the median of the others "
            f"({statistics.median(others):.3f} s); taken out of the rounds, "
            "its warm-up times are reported instead")

  active = [im for im in impls if im.name not in dropped]
  times = {im.name: [] for im in active}
  faults = {im.name: [] for im in active}
  gc_was_enabled = gc.isenabled()
  try:
    for r in range(rounds):
      gc.collect()
      gc.disable()
      k = r % max(1, len(active))
      order = active[k:] + active[:k]
      for im in order:
        if im.pre is not None:
          im.pre()
        f0 = _minor_faults()
        t0 = time.perf_counter()
        im.run()
        times[im.name].append(time.perf_counter() - t0)
        faults[im.name].append(_minor_faults() - f0)
      if gc_was_enabled:
        gc.enable()
      log(f"  round {r + 1}/{rounds} done")
  finally:
    if gc_was_enabled:
      gc.enable()

  out = {}
  for im in impls:
    ts = warm[im.name] if im.name in dropped else times[im.name]
    out[im.name] = {
        "samples_s": ts,
        "median_s": statistics.median(ts),
        "min_s": min(ts),
        "max_s": max(ts),
        "n": len(ts),
        "dropped_too_slow": im.name in dropped,
        "minor_faults_per_call": (statistics.median(faults[im.name])
                                  if faults.get(im.name) else None),
    }
  return out


def _minor_faults() -> int:
  """Minor page faults of this process so far (a freshly mapped buffer
  costs one per 4 KiB page when first touched)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---------------------------------------------------------------------------
# FLOPs and the matmul rate.


def convnet_forward_flops(image_hw: tuple[int, int], in_channels: int,
                          width: int, depth: int,
                          num_classes: int | None) -> float:
  """Analytic FLOPs of one example's forward pass (multiply-add = 2).

  Conv layer i: 2 * H_i * W_i * Cin_i * 9 * Cout ('same' 3x3, stride 1),
  with H, W halved by each 2x2 pool; the dense head (if num_classes is not
  None): 2 * d * K. Norm, ReLU and pooling are not counted (they are O(HWC),
  two orders below the convolutions).
  """
  h, w = image_hw
  cin = in_channels
  total = 0.0
  for _ in range(depth):
    total += 2.0 * h * w * cin * 9 * width
    cin = width
    h, w = h // 2, w // 2
  if num_classes is not None:
    total += 2.0 * h * w * width * num_classes
  return total


def convnet_feature_dim(image_hw, width: int, depth: int) -> int:
  h, w = image_hw
  for _ in range(depth):
    h, w = h // 2, w // 2
  return h * w * width


def matmul_impls(n: int, *, with_torch: bool = True,
                 torch_threads: list[int] | None = None) -> list[Impl]:
  """Rows timing an n x n @ n x n float32 matmul in JAX (and torch, once per
  thread count in `torch_threads`; [0] or None = torch's default)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  flops = 2.0 * n ** 3
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  rows = [jax_impl(f"matmul_jax_{n}", jnp.dot, (a, b), items=1, flops=flops,
                   group="matmul")]
  if with_torch:
    torch = maybe_torch()
    if torch is not None:
      ta = torch.from_numpy(np.array(a))
      tb = torch.from_numpy(np.array(b))
      for t in torch_threads or [0]:
        rows.append(torch_impl(
            f"matmul_torch_{n}" + (f"_t{t}" if t else ""),
            lambda: torch.mm(ta, tb), items=1, flops=flops, group="matmul",
            threads=t))
  return rows


# ---------------------------------------------------------------------------
# Reporting.


def environment() -> dict:
  env = {
      "time": datetime.datetime.now().isoformat(timespec="seconds"),
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "loadavg_start": list(os.getloadavg()),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          env["cpu_model"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  import jax  # pylint: disable=import-outside-toplevel
  env["jax"] = jax.__version__
  env["jax_backend"] = jax.default_backend()
  env["jax_device_kind"] = jax.devices()[0].device_kind
  env["jax_device_count"] = jax.device_count()
  import dpgeng_jax  # pylint: disable=import-outside-toplevel
  env["dpgeng_jax_file"] = dpgeng_jax.__file__
  for mod in ("flax", "optax", "jax_privacy", "opacus"):
    try:
      env[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      env[mod] = None
  torch = maybe_torch()
  env["torch"] = torch.__version__ if torch is not None else None
  if torch is not None:
    env["torch_default_num_threads"] = torch_default_threads()
  return env


def environment_short() -> str:
  """One line for table captions: backend, device kind x count, load."""
  import jax  # pylint: disable=import-outside-toplevel
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  return (f"jax {jax.__version__} on {jax.default_backend()}: "
          f"{jax.devices()[0].device_kind} x {jax.device_count()}, "
          f"{os.cpu_count()} CPUs, loadavg {load}")


def summarize(impls: list[Impl], stats: dict, *, baseline: str | None,
              items_label: str) -> dict:
  """Combines build-time facts and timings into result rows + matmul rate."""
  mm = {}
  for im in impls:
    if im.group == "matmul":
      s = stats[im.name]
      mm[im.name] = {"median_s": s["median_s"], "min_s": s["min_s"],
                     "max_s": s["max_s"],
                     "gflops": im.flops / s["median_s"] / 1e9,
                     "first_call_s": im.first_call_s}
  machine = max((v["gflops"] for v in mm.values()), default=None)
  base = stats.get(baseline) if baseline else None
  rows = []
  for im in impls:
    if im.group != "main":
      continue
    s = stats[im.name]
    gf = im.flops / s["median_s"] / 1e9 if im.flops else None
    rows.append({
        "name": im.name,
        "framework": im.framework,
        "items_per_call": im.items,
        f"{items_label}_per_s": im.items / s["median_s"],
        "median_s": s["median_s"],
        "min_s": s["min_s"],
        "max_s": s["max_s"],
        "n_timed": s["n"],
        "samples_s": s["samples_s"],
        "dropped_too_slow": s["dropped_too_slow"],
        "minor_faults_per_call": s.get("minor_faults_per_call"),
        "speedup_vs_baseline": (base["median_s"] / s["median_s"]
                                if base else None),
        "first_call_s": im.first_call_s,
        "compile_s": im.compile_s,
        "memory": im.memory,
        "memory_total_mib": (im.memory["total_bytes"] / 2 ** 20
                             if im.memory else None),
        "flops_per_call": im.flops,
        "gflops_per_s": gf,
        "fraction_of_matmul": (gf / machine if gf and machine else None),
        "note": im.note,
    })
  return {"rows": rows, "matmul": mm, "matmul_gflops_machine": machine,
          "baseline": baseline}


def _f(v, fmt):
  return "-" if v is None else format(v, fmt)


def markdown(summary: dict, *, items_label: str) -> str:
  base = summary["baseline"]
  lines = [
      f"| impl | {items_label}/s | median s | min s | max s | "
      f"speed vs {base} | first call s | compile s | XLA mem MiB | "
      "GFLOP/s | % of matmul | faults/call |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in summary["rows"]:
    name = r["name"] + (" (too slow, not in rounds)" if r["dropped_too_slow"]
                        else "")
    frac = r["fraction_of_matmul"]
    lines.append(
        f"| {name} | {_f(r[items_label + '_per_s'], '.1f')} | "
        f"{_f(r['median_s'], '.4f')} | {_f(r['min_s'], '.4f')} | "
        f"{_f(r['max_s'], '.4f')} | {_f(r['speedup_vs_baseline'], '.2f')}x | "
        f"{_f(r['first_call_s'], '.2f')} | {_f(r['compile_s'], '.2f')} | "
        f"{_f(r['memory_total_mib'], '.1f')} | "
        f"{_f(r['gflops_per_s'], '.1f')} | "
        f"{_f(frac * 100 if frac is not None else None, '.1f')} | "
        f"{_f(r['minor_faults_per_call'], '.0f')} |")
  lines.append("")
  lines.append("| matmul | median s | min s | max s | GFLOP/s |")
  lines.append("|---|---:|---:|---:|---:|")
  for k, v in summary["matmul"].items():
    lines.append(f"| {k} | {v['median_s']:.4f} | {v['min_s']:.4f} | "
                 f"{v['max_s']:.4f} | {v['gflops']:.1f} |")
  lines.append("")
  lines.append(f"machine matmul rate (max of the medians): "
               f"{_f(summary['matmul_gflops_machine'], '.1f')} GFLOP/s")
  return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
  def default(o):
    if isinstance(o, (np.floating, np.integer)):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
    return str(o)
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  payload = dict(payload)
  payload.setdefault("environment", {})["loadavg_end"] = list(os.getloadavg())
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=default)


def resolve(args, full: dict, quick: dict) -> None:
  """Fills options left at None with the full or --quick default; applies
  --xla-flags (must run before jax is imported)."""
  full = {"torch_threads": "1,2", **full}
  quick = {"torch_threads": "1", **quick}
  table = quick if args.quick else full
  for k, v in full.items():
    if getattr(args, k) is None:
      setattr(args, k, table.get(k, v))
  if getattr(args, "xla_flags", ""):
    if "jax" in sys.modules:
      raise RuntimeError("--xla-flags must be applied before importing jax")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + args.xla_flags).strip()
  # After XLA_FLAGS: importing dpgeng_jax imports jax.
  if getattr(args, "retain_host_memory", False):
    from dpgeng_jax import hostmem  # pylint: disable=import-outside-toplevel
    if not hostmem.retain_freed_memory():
      raise RuntimeError("--retain-host-memory needs glibc's mallopt")


def add_shape_args(ap, out_default: str, quick_width: int) -> None:
  """Output, size and timing options shared by bench_query, bench_dpsgd
  and bench_layers (each script adds its own batch options); the ConvNet
  width defaults to 128, or `quick_width` with --quick (the scripts'
  FULL / QUICK dicts, applied by `resolve`)."""
  ap.add_argument("--out", default=out_default,
                  help="JSON file for all figures (default %(default)s)")
  ap.add_argument("--width", type=int, default=None,
                  help=f"ConvNet width (default 128; --quick {quick_width})")
  ap.add_argument("--quick", action="store_true",
                  help="small sizes, 2 rounds, correctness checks (< 60 s)")
  ap.add_argument("--num-classes", type=int, default=10,
                  help="K (default %(default)s)")
  ap.add_argument("--depth", type=int, default=None, help="default 3")
  ap.add_argument("--image-size", type=int, default=None, help="default 32")
  ap.add_argument("--clip-norm", type=float, default=1.0,
                  help="C (default %(default)s)")
  ap.add_argument("--rounds", type=int, default=None,
                  help="timed rounds (default 5; --quick 2)")
  ap.add_argument("--warmup", type=int, default=None,
                  help="warm-up calls per row after the first (default 1)")
  ap.add_argument("--matmul-n", type=int, default=None,
                  help="matmul size (default 2048; --quick 1024)")
  ap.add_argument("--max-slowdown", type=float, default=10.0,
                  help="take rows slower than this x the median out of the "
                       "rounds (default %(default)s; 0 = never)")


def add_common_args(ap) -> None:
  """Options shared by the scripts."""
  ap.add_argument("--torch-threads", default=None,
                  help="torch rows once per thread count, set with "
                       "torch.set_num_threads before each call (default "
                       "'1,2'; --quick '1'; '0' = torch's default, one row)")
  ap.add_argument("--xla-flags", default="",
                  help="appended to XLA_FLAGS before jax starts, e.g. "
                       "'--xla_cpu_multi_thread_eigen=false "
                       "intra_op_parallelism_threads=1' (default none)")
  ap.add_argument("--no-torch", action="store_true",
                  help="skip all torch/opacus rows")
  ap.add_argument("--seed", type=int, default=0,
                  help="parameter and data seed (default %(default)s)")
  ap.add_argument("--retain-host-memory", action="store_true",
                  help="keep freed host memory mapped for the whole process "
                       "(dpgeng_jax.hostmem, as the dpgeng command does on "
                       "CPU): applies to every row alike")


def torch_thread_rows(spec: str) -> list[int]:
  """'1,2' -> [1, 2]; '0' or '' -> [0] (torch's default, no suffix)."""
  return parse_ints(spec) or [0]


def thread_suffix(t: int) -> str:
  return f"_t{t}" if t else ""


def parse_ints(s: str) -> list[int]:
  return [int(t) for t in s.split(",") if t.strip()] if s else []


# ---------------------------------------------------------------------------
# PyTorch side.


_TORCH_DEFAULT_THREADS = []


def torch_default_threads() -> int:
  """torch's thread count as first seen (before any set_num_threads)."""
  if not _TORCH_DEFAULT_THREADS:
    import torch  # pylint: disable=import-outside-toplevel
    _TORCH_DEFAULT_THREADS.append(torch.get_num_threads())
  return _TORCH_DEFAULT_THREADS[0]


def maybe_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except Exception:  # pylint: disable=broad-except
    return None
  return torch


def torch_convnet(in_channels: int, width: int, depth: int, num_classes: int,
                  image_hw):
  """The PyTorch twin of dpgeng_jax.models.ConvNet (instance norm)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class TorchConvNet(nn.Module):
    def __init__(self):
      super().__init__()
      layers = []
      c = in_channels
      for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1),
                   nn.GroupNorm(width, width, eps=1e-5, affine=True),
                   nn.ReLU(), nn.AvgPool2d(2)]
        c = width
      self.features = nn.Sequential(*layers)
      self.head = nn.Linear(convnet_feature_dim(image_hw, width, depth),
                            num_classes)

    def embed(self, x):
      return torch.flatten(self.features(x), 1)

    def forward(self, x):
      return self.head(self.embed(x))

  return TorchConvNet()


def load_flax_params_into_torch(net, params, depth: int, feat_hw) -> None:
  """Copies Flax ConvNet parameters into `torch_convnet` (in place).

  Conv kernels HWIO -> OIHW; the head's input order is converted from Flax's
  NHWC flatten to torch's NCHW flatten, so logits agree.
  """
  import torch  # pylint: disable=import-outside-toplevel
  t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
  with torch.no_grad():
    for i in range(depth):
      conv = net.features[4 * i]
      norm = net.features[4 * i + 1]
      conv.weight.copy_(t(np.transpose(params[f"conv{i}"]["kernel"],
                                       (3, 2, 0, 1))))
      conv.bias.copy_(t(params[f"conv{i}"]["bias"]))
      norm.weight.copy_(t(params[f"norm{i}"]["scale"]))
      norm.bias.copy_(t(params[f"norm{i}"]["bias"]))
    if "head" in params:
      k = np.asarray(params["head"]["kernel"])  # (h*w*c, K), NHWC order
      h, w = feat_hw
      c = k.shape[0] // (h * w)
      k = k.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], -1)
      net.head.weight.copy_(t(k))
      net.head.bias.copy_(t(params["head"]["bias"]))


def torch_grads_to_flax(grads: dict, depth: int, feat_hw) -> dict:
  """Inverse of the layout conversion above, for gradient dicts keyed by
  torch parameter names (features.{4i}.weight, ..., head.weight)."""
  g = {k: v.detach().cpu().numpy() for k, v in grads.items()}
  out = {}
  for i in range(depth):
    out[f"conv{i}"] = {
        "kernel": np.transpose(g[f"features.{4 * i}.weight"], (2, 3, 1, 0)),
        "bias": g[f"features.{4 * i}.bias"]}
    out[f"norm{i}"] = {"scale": g[f"features.{4 * i + 1}.weight"],
                       "bias": g[f"features.{4 * i + 1}.bias"]}
  if "head.weight" in g:
    w = g["head.weight"]  # (K, c*h*w), NCHW order
    h, wd = feat_hw
    kk = w.shape[0]
    c = w.shape[1] // (h * wd)
    out["head"] = {
        "kernel": w.reshape(kk, c, h, wd).transpose(2, 3, 1, 0).reshape(-1, kk),
        "bias": g["head.bias"]}
  return out


def max_abs_diff_trees(a, b) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), (len(la), len(lb))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(la, lb))


def feat_hw(image_hw, depth):
  h, w = image_hw
  for _ in range(depth):
    h, w = h // 2, w // 2
  return h, w


def time_and_report(args, impls, notes, *, baseline: str, items_label: str,
                    record: dict,
                    derive: Callable[[dict], dict] | None = None) -> None:
  """Runs the interleaved rounds, prints the table and the notes, and
  writes the JSON (record plus the summary) to args.out. derive(stats), if
  given, runs on the timings before the report: it may append to `notes`
  and returns extra fields for the JSON."""
  print(f"timing: {args.rounds} rounds, warm-up {args.warmup}", flush=True)
  stats = measure(impls, rounds=args.rounds, warmup=args.warmup,
                  max_slowdown=args.max_slowdown)
  if derive is not None:
    record = {**record, **derive(stats)}
  summary = summarize(impls, stats, baseline=baseline,
                      items_label=items_label)
  table = markdown(summary, items_label=items_label)
  print()
  print(table)
  for nt in notes:
    print("NOTE:", nt)
  write_json(args.out, {**record, "config": vars(args), "notes": notes,
                        **summary, "table_markdown": table})
  print(f"wrote {args.out}")
