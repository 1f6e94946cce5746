"""What a run will cost, before it starts: FLOPs per stage and the time
they take on this machine.

    dpgeng plan --preset mnist --epsilon 1      # prints the estimate too

`stage_flops` counts the useful FLOPs of every stage from the
configuration and the data's public shape (the ConvNet's convolutions and
dense head, 2 FLOPs per multiply-add; a training or per-example-gradient
step costs 3 forward passes; norms, pooling and the optimiser are left
out). `machine_rate` measures this backend's float32 matmul rate once (a
fraction of a second) and caches it per device kind
($XDG_CACHE_HOME/dpgeng_jax/machine.json, or DPGENG_RATE_CACHE). The
expected time of a stage is FLOPs / (rate x efficiency(stage, shape,
width)) + OVERHEAD_S[stage]: the share of the matmul rate the stage
reaches (at the ConvNet's width) and its fixed cost (compilation, host
work) as measured on the development CPU
(benchmarks/estimate_check.py, table in benchmarks/RESULTS.md); on other
backends the same constants are used until measured there, and the
report's timing table shows measured / estimate.

Private Evolution's API calls (rendering glyphs) are host work, not
FLOPs: they are counted as API samples and the text API is timed per
sample at the run's image shape (cached with the rate).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

from dpgeng_jax import planning, stem
from dpgeng_jax.config import Config

TRAIN = 3.0  # forward + backward ~ 3 forward passes
# Share of the matmul rate each stage reaches, and its fixed seconds
# (compilation and host work), measured on the development machine (2 CPU
# cores) by benchmarks/estimate_check.py.
EFFICIENCY = {"generation": 0.15, "extractor_pool": 0.35, "queries": 0.15,
              "expert": 0.1, "init": 0.2, "distillation": 0.4,
              "evaluation": 0.33}
# The training stages on maps where the first block runs from patch
# statistics (stem.MIN_PIXELS pixels or more; 28x28 and 32x32x3 measured:
# pool 0.57-0.58, distillation 0.54-0.62, evaluation 0.51-0.52 of the
# cached rate, with the chunked steps; the expert's DP-SGD with pergrad's
# fused first block 0.22 on 28x28 beyond its fixed seconds, where 1438
# private rows pad to a 1.6x larger Poisson capacity; the queries 0.30-0.33
# with the flat layout, padding included); smaller images keep
# EFFICIENCY (8x8 digits: 0.25-0.31; 16x16x3 steps ran at about 0.4,
# bench_train_step.py).
EFFICIENCY_LARGE = {"extractor_pool": 0.55, "distillation": 0.55,
                    "evaluation": 0.5, "expert": 0.2, "queries": 0.3}
# ...at width 128 (the runs above). On those maps a narrower ConvNet
# reaches a share about proportional to its width (less work per byte
# moved): --preset quick (width 32) at 32x32x3, 64x64x3 and 128x128x3
# reached pool 0.10-0.16, distillation 0.14-0.16, evaluation 0.13-0.18,
# queries 0.05-0.10 (x (32 / 128) = 0.14, 0.14, 0.13, 0.08 predicted;
# benchmarks/RESULTS.md, "The cost estimate at width 32"). Wider ones are
# not assumed faster.
REFERENCE_WIDTH = 128
OVERHEAD_S = {"calibration": 0.5, "class_sizes": 0.1, "generation": 2.0,
              "extractor_pool": 4.0, "queries": 2.0, "expert": 6.0,
              "init": 0.5, "distillation": 3.0, "evaluation": 3.0}
# Public sizes of the datasets the presets name (train, test, shape, K).
KNOWN = {"digits": (1438, 359, (8, 8, 1), 10),
         "tfds:mnist": (60000, 10000, (28, 28, 1), 10),
         "tfds:fashion_mnist": (60000, 10000, (28, 28, 1), 10),
         "tfds:cifar10": (50000, 10000, (32, 32, 3), 10),
         "tfds:cifar100": (50000, 10000, (32, 32, 3), 100),
         "tfds:celeb_a": (162770, 19962, (32, 32, 3), 2)}


def forward_flops(image_shape, width: int, depth: int,
                  num_classes: int) -> float:
  """Useful FLOPs of one ConvNet forward pass on one image."""
  h, w, c = image_shape
  flops = 0.0
  for _ in range(depth):
    # 3x3 'SAME': the taps that fall inside the map, (3h - 2)(3w - 2).
    flops += 2.0 * max(1, 3 * h - 2) * max(1, 3 * w - 2) * c * width
    c, h, w = width, h // 2, w // 2
  return flops + 2.0 * h * w * c * num_classes


def _examples(n: int, epochs: int, batch: int = 256) -> int:
  """Examples processed by `epochs` epochs of batches of min(batch, n)."""
  return epochs * math.ceil(n / min(batch, n)) * min(batch, n)


def _batch_rows(cfg: Config, rate: float, num_train: int) -> float:
  """Rows a Poisson step computes: the expected batch q N when its
  padding-only microbatches are skipped (the default), else the padded
  capacity over the padded rows (`--no-skip-padding`)."""
  if not cfg.no_skip_padding:
    return rate * num_train
  from dpgeng_jax import counts, mechanisms
  return float(mechanisms.poisson_capacity(
      [counts.layout_rows(num_train)], rate))


def stage_flops(cfg: Config, plan, image_shape, num_train: int,
                num_test: int, num_classes: int) -> dict:
  """{stage: FLOPs} of a run (plan: planning.Plan resolved with the image
  shape), plus {"pe_api_samples": n} for Private Evolution's API calls."""
  k, shape = num_classes, tuple(image_shape)
  depth = plan.depth
  f = plan.factor or 1
  fwd = forward_flops(shape, cfg.extractor_width, depth, k)
  fwd_eval = forward_flops(shape, cfg.eval_width, depth, k)
  out = {"calibration": 0.0, "class_sizes": 0.0}
  n_gen = k * cfg.generated_per_class if plan.uses_generated else 0
  gen = plan.generator or ""
  if plan.uses_generated and gen.startswith("pe"):
    t, pop = cfg.pe_iterations, k * cfg.pe_population
    cand = pop * max(1, cfg.pe_lookahead)
    emb = (0.0 if cfg.pe_embedding == "pixels" else
           forward_flops(shape, cfg.pe_width, depth, k))
    d = (math.prod(shape) if cfg.pe_embedding == "pixels" else
         cfg.pe_width * max(1, shape[0] >> depth) * max(1, shape[1] >> depth))
    votes = 0 if cfg.pe_public_only else num_train
    out["generation"] = t * ((votes + cand) * emb
                             + 2.0 * votes * cfg.pe_population * d)
    out["pe_api_samples"] = (t + 1) * cand + n_gen
    if cfg.pe_warm_start > 0 and not cfg.pe_public_only:
      # The warm start: features of the private rows once and of 2 N_s
      # candidates per iteration, and N_s herding picks over them.
      from dpgeng_jax.generators.pe import PEConfig
      d_warm = PEConfig.warm_features
      w, feat = cfg.pe_warm_start, 4.0 * math.prod(shape) * d_warm
      out["generation"] += (num_train * feat + w * 2 * pop * (
          feat + 4.0 * cfg.pe_population * (2 * d_warm + 1)))
      out["pe_api_samples"] += (w + 1) * pop
  elif plan.uses_generated and gen == "merf":
    p = math.prod(shape)
    feat = 2.0 * p * cfg.generator_features
    mlp = 2.0 * (128 * 256 + 256 * 512 + 512 * p)
    out["generation"] = (num_train * feat + cfg.generator_steps * k * 64
                         * TRAIN * (feat + mlp))
  else:
    out["generation"] = 0.0
  members = planning.pool_members(cfg, plan) if n_gen else 0
  out["extractor_pool"] = (members * _examples(n_gen, cfg.pool_epochs)
                           * TRAIN * fwd) if members else 0.0
  if plan.centre == "generated":
    # the queries' centres: a forward of Q x K x (at most CENTRE_IMAGES)
    # generated images
    from dpgeng_jax.extractors import CENTRE_IMAGES
    out["extractor_pool"] += (cfg.num_queries * k * min(
        CENTRE_IMAGES, cfg.generated_per_class) * fwd)
  out["queries"] = (cfg.num_queries * _batch_rows(cfg, cfg.sampling_rate,
                                                   num_train) * fwd
                    if plan.feature_matching else 0.0)
  # DP-SGD steps, the two test accuracies (for information) and p_ref, a
  # forward pass over the generated set
  out["expert"] = (cfg.expert_steps * _batch_rows(
      cfg, cfg.expert_sampling_rate, num_train) * TRAIN * fwd
                   + (2 * num_test + n_gen) * fwd) if plan.expert else 0.0
  out["init"] = n_gen * fwd if plan.init == "generated" else 0.0
  m = k * cfg.ipc * f * f
  per_step = m * TRAIN * fwd * (2 if plan.expert else 1)
  out["distillation"] = cfg.steps * per_step if plan.feature_matching else 0.0
  if cfg.no_eval:
    out["evaluation"] = 0.0
  else:
    ev = cfg.eval_models * (_examples(m, cfg.eval_epochs) * TRAIN * fwd_eval
                            + num_test * fwd_eval)
    if cfg.references:
      ev += cfg.eval_models * (
          _examples(k * cfg.ipc, cfg.eval_epochs)
          + _examples(num_train, max(1, cfg.eval_epochs // 10))) * (
              TRAIN * fwd_eval)
    out["evaluation"] = ev
  return out


# ---------------------------------------------------------------------------
# The machine's rate.


def rate_cache_path() -> str:
  from dpgeng_jax import outputs
  return outputs.user_cache_path("DPGENG_RATE_CACHE", "machine.json")


def _device_key() -> str:
  import jax
  d = jax.devices()[0]
  return f"{jax.default_backend()}:{d.device_kind}:{jax.device_count()}:" \
         f"{os.cpu_count()}"


def measure_rate(seconds: float = 0.3) -> dict:
  """float32 matmul FLOP/s of the default device (best of repeats), and
  the seconds per sample of the text API (PE's host work)."""
  import jax
  import jax.numpy as jnp
  n = 512 if jax.default_backend() == "cpu" else 4096
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best, t_end = math.inf, time.perf_counter() + seconds
  while time.perf_counter() < t_end or best == math.inf:
    t = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  rate = 2.0 * n ** 3 / best
  return {"matmul_flops_per_s": rate, "device": _device_key(),
          "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def text_api_seconds(image_shape, n: int = 32) -> float:
  """Seconds per sample of the text API (random + variation) at this
  image shape, from n samples (fewer for images above 32x32, whose
  rendering time grows with the pixels: 2 at 1024x1024)."""
  import jax
  import numpy as np
  from dpgeng_jax.generators.apis.text import TextAPI
  pixels = int(image_shape[0]) * int(image_shape[1])
  n = max(2, min(n, n * 32 * 32 // pixels))
  api = TextAPI(tuple(image_shape), 10)
  labels = np.arange(n) % 10
  api.random(jax.random.key(0), labels)  # fonts loaded
  t = time.perf_counter()
  s = api.random(jax.random.key(1), labels)
  api.variation(jax.random.key(2), s, 0.5)
  return (time.perf_counter() - t) / (2 * n)


def machine_rate(cache: bool = True, image_shape=None) -> dict:
  """The measured rate of this machine, from the cache when it has this
  device's (with `image_shape`, also the text API's seconds per sample at
  that shape, under "text_api_s_per_sample")."""
  path = rate_cache_path()
  key = _device_key()
  table, foreign = {}, False
  if cache:
    try:
      with open(path) as f:
        table = json.load(f)
    except FileNotFoundError:
      table = {}
    except (OSError, ValueError):
      table, foreign = {}, os.path.lexists(path)
  if not isinstance(table, dict):  # valid JSON of another shape
    table, foreign = {}, True
  if foreign:  # perhaps a user's file (DPGENG_RATE_CACHE): never replaced
    warnings.warn(f"the machine-rate cache {path} is not a table this tool "
                  "wrote; it is left as it is and the rate is measured "
                  "again (delete it, or point DPGENG_RATE_CACHE elsewhere, "
                  "to cache the rate)", stacklevel=2)
    cache = False
  entry = table.get(key)
  rate = dict(entry) if _valid_entry(entry) else measure_rate()
  shape_key = "x".join(str(int(d)) for d in image_shape) if image_shape else ""
  api = dict(rate.get("text_api", {}))
  if shape_key and shape_key not in api:
    api[shape_key] = text_api_seconds(image_shape)
  rate["text_api"] = api
  changed = table.get(key) != rate
  if shape_key:
    rate = {**rate, "text_api_s_per_sample": api[shape_key]}
  if cache and changed:
    rate_to_save = {k: v for k, v in rate.items()
                    if k != "text_api_s_per_sample"}
    from dpgeng_jax import outputs
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      table[key] = rate_to_save
      outputs.atomic_write(path, lambda f: json.dump(table, f, indent=2))
    except OSError:
      pass  # an unwritable cache: measured again next time
  return rate


def _positive(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v) and v > 0)


def _valid_entry(entry) -> bool:
  """Whether a rate-cache entry is one `machine_rate` wrote: a positive
  finite matmul rate and, if present, a table of positive text-API
  seconds (anything else is measured again and overwritten)."""
  if not isinstance(entry, dict) or not _positive(
      entry.get("matmul_flops_per_s")):
    return False
  api = entry.get("text_api", {})
  return isinstance(api, dict) and all(_positive(v) for v in api.values())


# ---------------------------------------------------------------------------
# The estimate.


def estimate(cfg: Config, plan, image_shape, num_train: int, num_test: int,
             num_classes: int, rate: dict | None = None) -> dict:
  """{"flops": {stage: FLOPs}, "stages_s": {stage_s: seconds}, "total_s",
  "rate": the machine rate used}. Stage keys match metrics.json's
  timings_s."""
  uses_text = _uses_text(plan)
  rate = rate_for(plan, image_shape, rate)
  flops = stage_flops(cfg, plan, image_shape, num_train, num_test,
                      num_classes)
  api = flops.pop("pe_api_samples", 0)
  r = rate["matmul_flops_per_s"]
  seconds = {}
  for stage, fl in flops.items():
    s = OVERHEAD_S.get(stage, 0.0) if (fl or stage in (
        "calibration", "class_sizes")) else 0.0
    width = cfg.eval_width if stage == "evaluation" else (
        cfg.extractor_width)
    s += fl / (r * efficiency(stage, image_shape, width))
    if stage == "generation" and uses_text:
      s += api * rate.get("text_api_s_per_sample", 0.0)
    seconds[f"{stage}_s"] = s
  return {"flops": flops, "pe_api_samples": api, "stages_s": seconds,
          "total_s": sum(seconds.values()), "rate": rate}


def _uses_text(plan) -> bool:
  return bool(plan.uses_generated
              and (plan.generator or "").startswith("pe:text"))


def rate_for(plan, image_shape, rate: dict | None = None) -> dict:
  """The machine rate `estimate` needs for `plan` (`rate` if it has it):
  measured (or read from the cache) without any data, so a run measures
  it before its first release."""
  uses_text = _uses_text(plan)
  if rate is None or (uses_text and "text_api_s_per_sample" not in rate):
    rate = machine_rate(image_shape=tuple(image_shape) if uses_text
                        else None)
  return rate


def efficiency(stage: str, image_shape,
               width: int = REFERENCE_WIDTH) -> float:
  """The share of the matmul rate `stage` is expected to reach on images
  of `image_shape` with ConvNets of `width` channels (EFFICIENCY, or
  EFFICIENCY_LARGE for large maps, scaled by width / REFERENCE_WIDTH up to
  1 there)."""
  if image_shape[0] * image_shape[1] >= stem.MIN_PIXELS and (
      stage in EFFICIENCY_LARGE):
    return EFFICIENCY_LARGE[stage] * min(1.0, width / REFERENCE_WIDTH)
  return EFFICIENCY.get(stage, 0.2)


def known_shape(cfg: Config):
  """(num_train, num_test, image_shape, K) of a dataset the presets name,
  or None (then only `dpgeng distill`, once the data is loaded, can
  estimate)."""
  spec = cfg.dataset
  if spec.startswith("tfds:"):
    spec = "tfds:" + spec[5:].split(":")[0]
  got = KNOWN.get(spec)
  if got and cfg.image_size:
    got = (got[0], got[1], (cfg.image_size, cfg.image_size, got[2][2]),
           got[3])
  return got


def format_table(est: dict) -> str:
  """The estimate as lines for the console."""
  rate = est["rate"]
  lines = [f"cost estimate (matmul rate {rate['matmul_flops_per_s'] / 1e9:.1f}"
           f" GFLOP/s on {rate['device']}):",
           f"  {'stage':<16} {'GFLOP':>10} {'expected s':>11}"]
  for stage, fl in est["flops"].items():
    s = est["stages_s"][f"{stage}_s"]
    lines.append(f"  {stage:<16} {fl / 1e9:>10.1f} {s:>11.1f}")
  total = est["total_s"]
  lines.append(f"  {'total':<16} {sum(est['flops'].values()) / 1e9:>10.1f} "
               f"{total:>11.1f}  (~{_human(total)})")
  return "\n".join(lines)


def _human(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"
