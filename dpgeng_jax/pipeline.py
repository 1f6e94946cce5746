"""One run of the method, from a dataset and a `Config` to a `RunResult`.

Stages (ALGORITHM.md): calibrate the noise for the target budget (reads no
data), answer the Q private feature-matching queries once (the only stage
that reads private examples), initialise and optimise the synthetic set
against the cached targets (post-processing), evaluate on the real test
split. `write_outputs` saves everything atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpgeng_jax import accounting, data as data_lib, distill, evaluate
from dpgeng_jax import mechanisms, models
from dpgeng_jax.config import Config, METHODS
from dpgeng_jax.errors import ConfigError

OUTPUT_FILES = ("distilled.npz", "privacy.json", "config.json", "grid.png",
                "metrics.json")
# A directory holding any of these holds a finished run.
FINISHED_MARKERS = ("distilled.npz", "privacy.json")


@dataclasses.dataclass
class RunResult:
  """What a run produces.

  Attributes:
    x: distilled images (K * IPC, H, W, C) float32 in pixel space ([0, 1]
      for valid pixels; optimised pixels may leave that range).
    y: their labels (K * IPC,) int32, class-major.
    privacy: the privacy report (privacy.json).
    metrics: evaluation results (metrics.json) or None with no_eval.
    config: the resolved configuration (config.json).
  """
  x: np.ndarray
  y: np.ndarray
  privacy: dict
  metrics: dict | None
  config: dict


# ---------------------------------------------------------------------------
# Validation (before anything is computed or written).


def validate_config(cfg: Config, num_train: int | None = None,
                    class_counts=None) -> None:
  """Raises ConfigError naming the first invalid value."""
  if cfg.method not in METHODS:
    raise ConfigError(f"unknown method {cfg.method!r}; expected one of "
                      f"{METHODS}")
  if not (isinstance(cfg.epsilon, (int, float)) and cfg.epsilon > 0
          and math.isfinite(cfg.epsilon)):
    raise ConfigError(f"epsilon must be a finite number > 0, got "
                      f"{cfg.epsilon}")
  if not 0 < cfg.delta < 1:
    raise ConfigError(f"delta must be in (0, 1), got {cfg.delta}")
  if num_train is not None and cfg.delta >= 1.0 / num_train:
    raise ConfigError(
        f"delta must be < 1/N = {1.0 / num_train:.3g} for N = {num_train} "
        f"training examples, got {cfg.delta} (a larger delta allows "
        "releasing an example outright)")
  if cfg.ipc < 1:
    raise ConfigError(f"ipc must be >= 1, got {cfg.ipc}")
  if class_counts is not None and cfg.method == "dm" and (
      cfg.ipc > int(np.min(class_counts))):
    raise ConfigError(f"ipc {cfg.ipc} exceeds the smallest class "
                      f"({int(np.min(class_counts))} examples), needed for "
                      "real-image initialisation")
  if not 0 < cfg.sampling_rate <= 1:
    raise ConfigError(f"sampling_rate must be in (0, 1], got "
                      f"{cfg.sampling_rate}")
  if not cfg.clip_norm > 0:
    raise ConfigError(f"clip_norm must be > 0, got {cfg.clip_norm}")
  for name in ("num_queries", "steps", "extractor_width", "eval_models",
               "eval_epochs", "eval_width"):
    if getattr(cfg, name) < 1:
      raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
  if cfg.depth < 0:
    raise ConfigError(f"depth must be >= 0 (0 = automatic), got {cfg.depth}")


def check_output_dir(out: str, overwrite: bool) -> None:
  """Refuses to replace a finished run unless `overwrite`."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out {out!r} exists and is not a directory")
  if not overwrite and os.path.isdir(out) and any(
      os.path.exists(os.path.join(out, f)) for f in FINISHED_MARKERS):
    raise ConfigError(f"--out {out!r} already holds a finished run; choose "
                      "another directory or pass --overwrite")


# ---------------------------------------------------------------------------
# The run.


def _mechanisms(cfg: Config, num_train: int) -> list[accounting.Mechanism]:
  fm = accounting.Mechanism("feature_matching", 0.0, cfg.sampling_rate,
                            cfg.num_queries)
  if cfg.method == "dm":
    return [fm]
  return accounting.calibrate([fm], cfg.epsilon, cfg.delta)


def _public_metadata(ds: data_lib.Dataset) -> list[str]:
  return [
      f"number of classes K = {ds.num_classes}",
      f"image shape {tuple(ds.image_shape)}",
      f"training set size N = {ds.num_train} (checks delta < 1/N)",
      "class sizes N_c = " + ", ".join(str(int(c)) for c in ds.class_counts)
      + " (used for the public expected batch sizes p * N_c and the padded "
      "Poisson capacity)",
      f"normalisation constants: {ds.normalisation_source}",
      "all hyperparameters in config.json",
  ]


def run(cfg: Config, dataset: data_lib.Dataset | None = None,
        log: Callable[[str], Any] | None = print) -> RunResult:
  """Runs the configured method; reads private data only through M_F."""
  log = log or (lambda s: None)
  quiet = cfg.quiet
  validate_config(cfg)
  ds = dataset or data_lib.load_dataset(cfg.dataset,
                                        data_dir=cfg.data_dir or None)
  validate_config(cfg, ds.num_train, ds.class_counts)
  timings = {}
  t0 = time.time()
  k, image_shape = ds.num_classes, tuple(ds.image_shape)
  depth = cfg.depth or models.default_depth(min(image_shape[:2]))

  # Keys: the public key governs init, extractors and augmentation; the
  # secret key (OS entropy) governs sampling and noise and is never saved.
  public_key = jax.random.key(cfg.seed)
  k_query, k_init, k_eval, k_ref = jax.random.split(public_key, 4)
  secret = (mechanisms.deterministic_secret_key(cfg.seed)
            if cfg.deterministic else mechanisms.secret_key())

  # 1. Accounting (no data read).
  mechs = _mechanisms(cfg, ds.num_train)
  fm = mechs[0]
  nonprivate = cfg.method == "dm"
  clip_norm = math.inf if nonprivate else cfg.clip_norm
  timings["calibration_s"] = time.time() - t0

  # 2. The private queries.
  t1 = time.time()
  extractor = models.ConvNet(k, width=cfg.extractor_width, depth=depth)
  plan = distill.QueryPlan(
      init_extractor=lambda key: models.init_params(extractor, key,
                                                    image_shape),
      embed_fn=models.embed_fn(extractor), num_classes=k,
      strategy=cfg.strategy)
  spec = mechanisms.QuerySpec(
      embed_fn=plan.embed_fn, num_classes=k, clip_norm=clip_norm,
      noise_multiplier=fm.noise_multiplier,
      sampling_rate=cfg.sampling_rate,
      capacity=mechanisms.poisson_capacity(ds.class_counts,
                                           cfg.sampling_rate),
      strategy=cfg.strategy)
  private_data = mechanisms.class_major(ds.normalize(ds.x_train),
                                        ds.y_train, k)

  @jax.jit
  def query(data, secret_q, q):
    params, aug_params = plan.params(k_query, q)
    return mechanisms.noisy_targets(spec, data, params, aug_params, secret_q)

  targets = []
  for q in tqdm(range(cfg.num_queries), desc="private queries",
                disable=quiet):
    sums, overflow = query(private_data, jax.random.fold_in(secret, q), q)
    mechanisms.check_overflow(overflow)
    targets.append(sums)
  targets = jnp.stack(targets)
  del secret, private_data
  expected_counts = jnp.asarray(cfg.sampling_rate * ds.class_counts,
                                jnp.float32)
  timings["queries_s"] = time.time() - t1

  # 3. Initialisation and distillation (post-processing).
  t2 = time.time()
  if cfg.method == "dm":  # non-private: starts from real images
    xs, _ = evaluate.random_real_subset(k_init, ds.normalize(ds.x_train),
                                        ds.y_train, cfg.ipc, k)
    images = jnp.asarray(xs.reshape(k, cfg.ipc, *image_shape))
  else:
    images = jax.random.normal(k_init, (k, cfg.ipc, *image_shape))
  opt = distill.image_optimizer(cfg.lr_img)
  state = distill.init_state(images, opt)
  step = distill.make_step(plan, opt, clip_norm=clip_norm)
  losses = []
  for _ in tqdm(range(cfg.steps), desc="distillation", disable=quiet):
    state, loss = step(state, targets, expected_counts, k_query)
    losses.append(loss)
  syn = np.asarray(state.images).reshape(k * cfg.ipc, *image_shape)
  y_syn = np.repeat(np.arange(k, dtype=np.int32), cfg.ipc)
  timings["distillation_s"] = time.time() - t2
  losses = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)

  # 4. Evaluation on the real test split.
  metrics = None
  if not cfg.no_eval:
    t3 = time.time()
    ecfg = evaluate.EvalConfig(num_models=cfg.eval_models,
                               epochs=cfg.eval_epochs, width=cfg.eval_width,
                               depth=depth, strategy=cfg.strategy)
    x_test = ds.normalize(ds.x_test)
    metrics = _evaluate(k_eval, syn, y_syn, x_test, ds.y_test, k, ecfg,
                        quiet, "evaluation")
    if cfg.references:
      xr, yr = evaluate.random_real_subset(k_ref, ds.normalize(ds.x_train),
                                           ds.y_train, cfg.ipc, k)
      metrics["reference_random_real_subset"] = _evaluate(
          k_eval, xr, yr, x_test, ds.y_test, k, ecfg, quiet,
          "reference: random real subset")
      metrics["reference_full_training_set"] = _evaluate(
          k_eval, ds.normalize(ds.x_train), ds.y_train, x_test, ds.y_test, k,
          dataclasses.replace(ecfg, epochs=max(1, cfg.eval_epochs // 10)),
          quiet, "reference: full training set")
      metrics["references_note"] = (
          "references are NOT private: they train on real training images")
    timings["evaluation_s"] = time.time() - t3
    metrics.update(method=cfg.method, private=cfg.private,
                   first_loss=float(losses[0]) if len(losses) else None,
                   last_loss=float(losses[-1]) if len(losses) else None)
  timings["total_s"] = time.time() - t0

  notes = [
      "Noise and sampling randomness came from "
      + ("the public seed (deterministic TEST mode): this run is NOT private"
         if cfg.deterministic else
         "the operating system's entropy and was never saved"),
      f"Poisson batches are padded to {spec.capacity} examples per class; "
      f"overflow (probability <= {mechanisms.OVERFLOW_TAIL:g} per class "
      "and query) aborts the run instead of truncating",
      "Targets are sums normalised by the public expected counts p * N_c",
  ]
  if nonprivate:
    notes.insert(0, "method dm is NOT private: no clipping, no noise, "
                 "initialised from real images")
  privacy = accounting.privacy_report(
      mechs, target_epsilon=cfg.epsilon, delta=cfg.delta,
      private=cfg.private, public_metadata=_public_metadata(ds),
      notes=notes)
  privacy["method"] = cfg.method
  privacy["clip_norm"] = None if nonprivate else cfg.clip_norm
  if metrics is not None:
    metrics["timings_s"] = timings
  config = cfg.to_dict()
  config.update(resolved_depth=depth, dataset_name=ds.name,
                poisson_capacity=spec.capacity,
                versions=_versions(), timings_s=timings)
  x_pixels = _denormalize(ds, syn)
  return RunResult(x=x_pixels, y=y_syn, privacy=privacy, metrics=metrics,
                   config=config)


def _evaluate(key, x, y, x_test, y_test, k, ecfg, quiet, desc):
  n = len(x)
  steps = ecfg.num_models * ecfg.epochs * math.ceil(
      n / min(ecfg.batch_size, n))
  t = time.time()
  with tqdm(total=steps, desc=desc, disable=quiet) as bar:
    result = evaluate.evaluate(key, x, y, x_test, y_test, num_classes=k,
                               cfg=ecfg, progress=bar.update)
  result["seconds"] = time.time() - t
  return result


def _denormalize(ds: data_lib.Dataset, x: np.ndarray) -> np.ndarray:
  mean = np.asarray(ds.mean, np.float32)
  std = np.asarray(ds.std, np.float32)
  return (np.asarray(x, np.float32) * std + mean).astype(np.float32)


def _versions() -> dict:
  import flax
  import optax
  import dp_accounting  # noqa: F401
  from importlib import metadata
  return {"jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__,
          "dp_accounting": metadata.version("dp-accounting"),
          "backend": jax.default_backend()}


# ---------------------------------------------------------------------------
# Outputs.


def _atomic_write(path: str, write: Callable[[Any], None], mode="w") -> None:
  d = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path),
                             suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _json(obj) -> Callable[[Any], None]:
  return lambda f: json.dump(obj, f, indent=2, sort_keys=False, default=str)


def grid_image(x: np.ndarray, num_classes: int, cell: int = 32):
  """A PIL image with one row per class of the (class-major) images."""
  from PIL import Image
  n, h, w, c = x.shape
  per = n // num_classes
  img = np.clip(x, 0.0, 1.0)
  img = (img * 255).round().astype(np.uint8)
  if c == 1:
    img = np.repeat(img, 3, axis=-1)
  g = img.reshape(num_classes, per, h, w, 3).transpose(0, 2, 1, 3, 4)
  g = g.reshape(num_classes * h, per * w, 3)
  scale = max(1, cell // max(h, w))
  return Image.fromarray(g).resize((per * w * scale, num_classes * h * scale),
                                   Image.NEAREST)


def write_outputs(result: RunResult, out: str, overwrite: bool = False
                  ) -> list[str]:
  """Writes the run's files into `out`, each atomically."""
  check_output_dir(out, overwrite)
  os.makedirs(out, exist_ok=True)
  k = int(result.y.max()) + 1
  paths = []

  def p(name):
    paths.append(os.path.join(out, name))
    return paths[-1]

  _atomic_write(p("distilled.npz"),
                lambda f: np.savez(f, x=result.x, y=result.y), mode="wb")
  _atomic_write(p("privacy.json"), _json(result.privacy))
  _atomic_write(p("config.json"), _json(result.config))
  _atomic_write(p("grid.png"),
                lambda f: grid_image(result.x, k).save(f, format="PNG"),
                mode="wb")
  if result.metrics is not None:
    _atomic_write(p("metrics.json"), _json(result.metrics))
  elif os.path.exists(os.path.join(out, "metrics.json")):
    os.remove(os.path.join(out, "metrics.json"))  # stale, from --overwrite
  return paths
