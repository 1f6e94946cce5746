"""One run of the method, from a dataset and a `Config` to a `RunResult`.

Stages (ALGORITHM.md): calibrate the noise for the target budget (reads no
data), answer the Q private feature-matching queries once (the only stage
that reads private examples), initialise and optimise the synthetic set
against the cached targets (post-processing), evaluate on the real test
split. `write_outputs` publishes the files as one set (outputs.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpgeng_jax import accounting, clipping, data as data_lib, distill
from dpgeng_jax import counts as counts_lib
from dpgeng_jax import evaluate
from dpgeng_jax import extractors, generator, mechanisms, models, parallel
from dpgeng_jax import expert as expert_lib
from dpgeng_jax import init as init_lib
from dpgeng_jax import outputs
from dpgeng_jax import stages
from dpgeng_jax.config import Config, METHODS
from dpgeng_jax.errors import ConfigError

STAGES_DIR = "stages"  # the saved stage results (stages.py), published too
OUTPUT_FILES = ("distilled.npz", "privacy.json", "config.json", "grid.png",
                "init_grid.png", "generated_grid.png", "metrics.json",
                STAGES_DIR)


@dataclasses.dataclass
class RunResult:
  """What a run produces.

  Attributes:
    x: stored distilled images (K * IPC, H, W, C) float32 in pixel space
      ([0, 1] for valid pixels; optimised pixels may leave that range).
    y: their labels (K * IPC,) int32, class-major.
    factor: multi-formation factor f; each stored image decodes to f^2.
    x_decoded, y_decoded: the K * IPC * f^2 images models train on.
    x_generated: the DP-generated images used (None if none).
    x_init: the stored images before distillation.
    privacy: the privacy report (privacy.json).
    metrics: evaluation results (metrics.json) or None with no_eval.
    config: the resolved configuration (config.json).
  """
  x: np.ndarray
  y: np.ndarray
  privacy: dict
  metrics: dict | None
  config: dict
  factor: int = 1
  x_decoded: np.ndarray | None = None
  y_decoded: np.ndarray | None = None
  x_generated: np.ndarray | None = None
  x_init: np.ndarray | None = None


# ---------------------------------------------------------------------------
# Validation (before anything is computed or written).


def validate_config(cfg: Config) -> None:
  """Raises ConfigError naming the first invalid value (reads no data)."""
  if cfg.method not in METHODS:
    raise ConfigError(f"unknown method {cfg.method!r}; expected one of "
                      f"{METHODS}")
  try:
    accounting.validate_target(cfg.epsilon, cfg.delta)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cfg.ipc < 1:
    raise ConfigError(f"ipc must be >= 1, got {cfg.ipc}")
  if not 0 < cfg.sampling_rate <= 1:
    raise ConfigError(f"sampling_rate must be in (0, 1], got "
                      f"{cfg.sampling_rate}")
  private = cfg.method != "dm"
  for name in ("clip_norm", "expert_clip_norm"):
    value = getattr(cfg, name)
    if not value > 0 or (private and not math.isfinite(value)):
      raise ConfigError(
          f"{name} must be a finite number > 0, got {value} (an infinite "
          "clip norm has unbounded sensitivity: no noise can make it "
          "private)")
  for name in ("num_queries", "steps", "extractor_width", "eval_models",
               "eval_epochs", "eval_width"):
    if getattr(cfg, name) < 1:
      raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
  for name in ("generated_per_class", "pool_models", "pool_checkpoints",
               "pool_epochs", "generator_steps", "generator_features",
               "generated_steps", "expert_steps"):
    if getattr(cfg, name) < 1:
      raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
  if cfg.factor not in (0, 1, 2):
    raise ConfigError(f"factor must be 0 (auto), 1 or 2, got {cfg.factor}")
  if cfg.generator != "builtin" and not cfg.generator.startswith("npz:"):
    raise ConfigError(f"generator must be 'builtin' or 'npz:PATH', got "
                      f"{cfg.generator!r}")
  if not 0 < cfg.expert_sampling_rate <= 1:
    raise ConfigError(f"expert_sampling_rate must be in (0, 1], got "
                      f"{cfg.expert_sampling_rate}")
  for name in ("share_generator", "share_features", "share_expert",
               "share_counts"):
    value = getattr(cfg, name)
    if not (value > 0 and math.isfinite(value)):
      raise ConfigError(f"budget shares must be finite and > 0, got "
                        f"{name} = {value}")
  declared = (cfg.generated_epsilon, cfg.generated_delta, cfg.generated_mu,
              cfg.generated_noise_multiplier)
  if any(not (v >= 0 and math.isfinite(v)) for v in declared):
    raise ConfigError("declared guarantees of generated data must be "
                      "finite and >= 0")
  if cfg.generated_epsilon > 0 and not 0 <= cfg.generated_delta < cfg.delta:
    raise ConfigError(f"generated_delta must be in [0, delta = {cfg.delta})"
                      f", got {cfg.generated_delta}")
  if not 0 < cfg.generated_sampling_rate <= 1:
    raise ConfigError("generated_sampling_rate must be in (0, 1]")
  if cfg.depth < 0:
    raise ConfigError(f"depth must be >= 0 (0 = automatic), got {cfg.depth}")
  if cfg.num_classes < 0 or cfg.num_classes == 1:
    raise ConfigError(f"num_classes must be 0 (from the dataset) or >= 2, "
                      f"got {cfg.num_classes}")
  if cfg.devices < 0 or cfg.microbatch < 0:
    raise ConfigError(f"devices and microbatch must be >= 0, got "
                      f"{cfg.devices} and {cfg.microbatch}")
  if cfg.devices > jax.device_count():
    raise ConfigError(f"devices={cfg.devices} but this run sees "
                      f"{jax.device_count()} device(s)")
  if cfg.devices not in (0, jax.device_count()) and jax.process_count() > 1:
    raise ConfigError("a multi-process run uses every device (devices=0)")
  if cfg.checkpoint_every < 0:
    raise ConfigError(f"checkpoint_every must be >= 0, got "
                      f"{cfg.checkpoint_every}")


def _check_delta(cfg: Config, sizes: counts_lib.ClassSizes) -> None:
  """delta < 1/N, with N from the public class sizes (the released
  estimate by default)."""
  n = sizes.total_estimate
  if cfg.delta >= 1.0 / n:
    raise ConfigError(
        f"delta must be < 1/N = {1.0 / n:.3g} for N ~ {n:.0f} training "
        f"examples ({sizes.policy} class sizes), got {cfg.delta} (a larger "
        "delta allows releasing an example outright)")


def output_dir(out: str, overwrite: bool, resume: bool = False
               ) -> outputs.RunDirectory:
  """--out as a RunDirectory for this run's output names (not yet open:
  `open()` or `with` creates, locks and checks it). `resume`: continue the
  unfinished run staged there."""
  return outputs.RunDirectory(out, overwrite=overwrite, names=OUTPUT_FILES,
                              resume=resume)


def stage_store(run_dir: outputs.RunDirectory) -> stages.StageStore:
  """Where a run's stages are saved: inside its staging directory."""
  return stages.StageStore(os.path.join(run_dir.staging, STAGES_DIR))


# ---------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a configuration resolves to (public; computed before any data is
  read)."""
  init: str
  extractors: str
  factor: int
  depth: int
  uses_generated: bool
  builtin_generator: bool
  feature_matching: bool
  expert: bool
  external: tuple[float, float] | None  # declared (eps, delta) of external G
  fixed: tuple  # accounting.Mechanism of external G with declared noise
  external_declared: bool
  count_release: bool  # the class sizes are released (M_N)

  @property
  def reads_private(self) -> bool:
    """Whether any mechanism of this run reads the private training set."""
    return self.builtin_generator or self.feature_matching or self.expert


def resolve(cfg: Config, image_shape=None) -> Plan:
  """Resolves `auto` options and the data sources of a configuration.

  Without an image shape (as in `dpgeng plan`, which reads no data) the
  shape-dependent choices (factor, depth) are left at 0.
  """
  init = cfg.init
  if init == "auto":
    init = {"dpgeng": "generated", "dm": "real"}.get(cfg.method, "noise")
  ext = cfg.extractors
  if ext == "auto":
    ext = "generated" if cfg.method == "dpgeng" else "random"
  size = min(image_shape[:2]) if image_shape is not None else None
  factor = cfg.factor or (init_lib.default_factor(size) if size else 0)
  if cfg.method in ("generator", "dm"):
    factor = 1
  expert = cfg.method == "dpgeng" and not cfg.no_expert
  uses_generated = (cfg.method == "generator" or init == "generated"
                    or ext == "generated" or expert)
  builtin = uses_generated and cfg.generator == "builtin"
  external, fixed, declared = None, (), False
  if uses_generated and not builtin:
    if cfg.generated_epsilon > 0:
      external, declared = (cfg.generated_epsilon, cfg.generated_delta), True
    elif cfg.generated_mu > 0:
      fixed = (accounting.Mechanism("external_generator", 1.0 /
                                    cfg.generated_mu, 1.0, 1),)
      declared = True
    elif cfg.generated_noise_multiplier > 0:
      fixed = (accounting.Mechanism(
          "external_generator", cfg.generated_noise_multiplier,
          cfg.generated_sampling_rate, cfg.generated_steps),)
      declared = True
  feature_matching = cfg.method != "generator"
  reads = builtin or feature_matching or expert
  return Plan(init=init, extractors=ext, factor=factor,
              depth=cfg.depth or (models.default_depth(size) if size else 0),
              uses_generated=uses_generated, builtin_generator=builtin,
              feature_matching=feature_matching, expert=expert,
              external=external, fixed=fixed, external_declared=declared,
              count_release=(reads and cfg.method != "dm"
                             and not cfg.public_class_sizes))


def abort_events(cfg: Config, plan: Plan, num_classes: int) -> int:
  """The run's abort events (each of probability <= tau): a class above
  its released bound (K classes and the total), a Poisson batch above its
  capacity (K classes x Q queries at p < 1; T_E expert steps at q_E < 1).
  Public: a function of the configuration and K."""
  if cfg.method == "dm":
    return 0
  events = num_classes + 1 if plan.count_release else 0
  if plan.feature_matching and cfg.sampling_rate < 1:
    events += cfg.num_queries * num_classes
  if plan.expert and cfg.expert_sampling_rate < 1:
    events += cfg.expert_steps
  return events


def delta_split(cfg: Config, plan: Plan) -> accounting.DeltaSplit:
  """How the run spends its delta (reads no data): a reserve for abort
  events whenever it has any (their count does not change the split, only
  the per-event tail)."""
  return accounting.DeltaSplit(cfg.delta,
                               plan.external[1] if plan.external else 0.0,
                               reserve=abort_events(cfg, plan, 1) > 0)


def _mechanisms(cfg: Config, plan: Plan) -> list[accounting.Mechanism]:
  """The run's private mechanisms with calibrated noise (reads no data);
  checks every declared external guarantee against the target."""
  mechs, shares = [], []
  if plan.count_release:
    mechs.append(accounting.Mechanism("class_counts", 0.0, 1.0, 1,
                                      sensitivity="1"))
    shares.append(cfg.share_counts)
  if plan.builtin_generator:
    mechs.append(accounting.Mechanism("generator", 0.0, 1.0, 1,
                                      sensitivity="1"))
    shares.append(cfg.share_generator)
  if plan.feature_matching:
    mechs.append(accounting.Mechanism("feature_matching", 0.0,
                                      cfg.sampling_rate, cfg.num_queries))
    shares.append(cfg.share_features)
  if plan.expert:
    mechs.append(accounting.Mechanism("expert", 0.0,
                                      cfg.expert_sampling_rate,
                                      cfg.expert_steps))
    shares.append(cfg.share_expert)
  if cfg.method == "dm":
    return mechs
  split = delta_split(cfg, plan)
  eps, delta = cfg.epsilon, split.mechanisms
  if plan.external:
    eps = eps - plan.external[0]
    if eps < 0 or (eps == 0 and mechs) or delta <= 0:
      raise ConfigError(
          f"the declared guarantee of the generated data ({plan.external}) "
          f"leaves no budget of the target ({cfg.epsilon}, {cfg.delta})")
  if not mechs:  # only external generated data
    if plan.fixed:
      got = accounting.epsilon_of(accounting.composed_event(plan.fixed),
                                  delta, accounting.pld_interval(eps))
      if got > eps:
        raise ConfigError(
            f"the declared guarantee of the generated data alone is "
            f"epsilon {got:.4g} at delta {delta:g}, above the target "
            f"epsilon {cfg.epsilon}")
    return list(plan.fixed)
  try:
    cal = accounting.calibrate(mechs, eps, delta, shares=shares,
                               fixed=plan.fixed)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  return [*plan.fixed, *cal]


def nonprivate_reasons(cfg: Config, plan: Plan) -> list[str]:
  """Why a run's outputs are NOT differentially private (empty: they are).
  Anything non-private that touches an output makes the run non-private."""
  reasons = []
  if cfg.method == "dm":
    reasons.append("method dm: no clipping, no noise, initialised from "
                   "real images")
  elif plan.init == "real":
    reasons.append("initialised from real training images (--init real)")
  if cfg.deterministic:
    reasons.append("deterministic test mode: the noise and sampling keys "
                   "derive from the public --seed")
  if plan.uses_generated and not plan.builtin_generator and (
      not plan.external_declared):
    reasons.append("external generated data came with no declared "
                   "guarantee")
  if cfg.references and not cfg.no_eval:
    reasons.append("--references: metrics.json holds models trained on "
                   "real training images")
  return reasons


def plan_budget(cfg: Config) -> dict:
  """The budget allocation of a configuration, computed from the
  configuration alone (no data is read): per mechanism its noise
  multiplier, sampling rate, steps and epsilon alone, and the composed
  figures."""
  validate_config(cfg)
  plan = resolve(cfg)
  mechs = _mechanisms(cfg, plan)
  return accounting.privacy_report(
      mechs, target_epsilon=cfg.epsilon, delta=cfg.delta,
      private=not nonprivate_reasons(cfg, plan),
      public_metadata=["computed without any data"],
      external=plan.external, split=delta_split(cfg, plan),
      nonprivate_reasons=nonprivate_reasons(cfg, plan))


def _public_metadata(ds: data_lib.Dataset,
                     sizes: counts_lib.ClassSizes | None) -> list[str]:
  out = [
      f"number of classes K = {ds.num_classes} ({ds.num_classes_source})",
      f"image shape {tuple(ds.image_shape)}",
  ]
  if sizes is None:
    out.append("class sizes: not used (no mechanism of this run reads the "
               "private training set)")
  elif sizes.policy == "released":
    out.append(
        "class sizes: NOT public; released once with Gaussian noise "
        "(mechanism class_counts, L2 sensitivity 1); every later use "
        "(normalisation p * n~_c, padded layouts and Poisson capacities "
        "from upper confidence bounds, the expert's q * N~, the delta < 1/N "
        "check) reads only that release (class_sizes)")
  elif sizes.policy == "declared public":
    out.append(
        "class sizes N_c = " + ", ".join(str(int(c)) for c in sizes.bound)
        + f" (N = {sizes.total_bound}) DECLARED PUBLIC by the user "
        "(--public-class-sizes): used exactly for normalisation, layouts "
        "and capacities")
  else:
    out.append("class sizes: exact (the run is not private)")
  out += [
      f"normalisation constants: {ds.normalisation_source}",
      "all hyperparameters in config.json",
      "the test split is not protected: metrics.json and the expert's test "
      "accuracy are non-private functions of it, for information",
  ]
  return out


def _by_name(mechs, name):
  return next((m for m in mechs if m.name == name), None)


def _class_sizes(cfg: Config, plan: Plan, ds: data_lib.Dataset, mechs,
                 secret: jax.Array, log_tail: float | None
                 ) -> counts_lib.ClassSizes | None:
  """The class sizes the run may use: M_N's release (default), the exact
  sizes when declared public or the run is not private, None when no
  mechanism reads the private data."""
  if cfg.method == "dm":
    return counts_lib.exact_sizes(ds.y_train, ds.num_classes)
  if not plan.reads_private:
    return None
  if not plan.count_release:
    return counts_lib.public_sizes(ds.y_train, ds.num_classes)
  mech = _by_name(mechs, "class_counts")
  noisy = counts_lib.release_class_counts(
      secret, ds.y_train, num_classes=ds.num_classes,
      noise_multiplier=mech.noise_multiplier)
  sizes = counts_lib.released_sizes(np.asarray(noisy), mech.noise_multiplier,
                                    log_tail)
  sizes.check(ds.y_train)
  return sizes


def run(cfg: Config, dataset: data_lib.Dataset | None = None,
        log: Callable[[str], Any] | None = print,
        store: stages.StageStore | None = None) -> RunResult:
  """Runs the configured method.

  Private data is read only by the mechanisms: the class-count release
  (M_N), the built-in generator's release (M_G), the feature-matching
  queries (M_F) and the expert's DP-SGD (M_E). Every later use of the
  class sizes reads M_N's release (or sizes the user declared public).

  With a `store` (stages.StageStore) every stage's result is saved as soon
  as it is done; a store that already holds stages (a killed run, checked
  against this configuration and dataset) is resumed: finished stages are
  loaded, not run, so no saved release is drawn again.
  """
  log = log or (lambda s: None)
  quiet = cfg.quiet
  validate_config(cfg)
  ds = dataset or data_lib.load_dataset(
      cfg.dataset, data_dir=cfg.data_dir or None,
      num_classes=cfg.num_classes or None)
  if cfg.num_classes and dataset is not None and (
      ds.num_classes != cfg.num_classes):
    raise ConfigError(f"num_classes={cfg.num_classes} but the dataset has "
                      f"{ds.num_classes} classes")
  if jax.process_count() > 1:
    store = None  # stages are saved by single-process runs only
  if store is not None:
    data_id = stages.fingerprint(ds.x_train, ds.y_train, ds.num_classes)
    if store.exists():
      store.check(_resume_view(cfg), data_id)
    else:
      store.start(_resume_view(cfg), data_id)
  done = (lambda name: store is not None and store.finished(name))
  timings = {}
  t0 = time.time()
  k, image_shape = ds.num_classes, tuple(ds.image_shape)
  plan = resolve(cfg, image_shape)
  depth, f = plan.depth, plan.factor
  m_stored = cfg.ipc  # stored images per class; f*f*ipc after decoding
  if plan.init == "real" and m_stored * f * f > int(np.min(ds.class_counts)):
    # Only in runs that are not private (real images are released).
    raise ConfigError(
        f"real-image initialisation needs ipc * factor^2 = "
        f"{m_stored * f * f} images of every class; the smallest class has "
        f"{int(np.min(ds.class_counts))}")
  x_gen = y_gen = None
  if plan.uses_generated and not plan.builtin_generator:
    x_gen, y_gen = generator.load_external(
        cfg.generator[len("npz:"):], image_shape=image_shape, num_classes=k)
  if plan.init == "generated" or cfg.method == "generator":
    # Checked before any private data is touched.
    per_class = (cfg.generated_per_class if y_gen is None
                 else int(np.min(np.bincount(y_gen, minlength=k))))
    if per_class < m_stored * f * f:
      raise ConfigError(
          f"k-means initialisation needs >= {m_stored * f * f} generated "
          f"images per class (ipc * factor^2), the smallest class has "
          f"{per_class}; raise --generated-per-class")

  # Keys: the public key governs init, extractors, augmentation and the
  # generator's network; the secret key (OS entropy) governs sampling and
  # noise and is never saved.
  public_key = jax.random.key(cfg.seed)
  k_query, k_init, k_eval, k_ref, k_gen, k_pool = jax.random.split(
      public_key, 6)
  secret = (mechanisms.deterministic_secret_key(cfg.seed)
            if cfg.deterministic else mechanisms.secret_key())
  # One secret for all processes (noise is added once, with one value).
  secret = parallel.broadcast_key(secret)
  mesh = parallel.data_mesh(cfg.devices or None)
  if parallel.num_shards(mesh) == 1 and jax.process_count() == 1:
    mesh = None  # the unsharded code path
  # Non-private training (extractor pool, evaluation) on this process's
  # devices of the mesh.
  train_mesh = parallel.local_mesh(mesh)
  s_counts, s_gen, s_query, s_expert = jax.random.split(secret, 4)

  # 1. Accounting (no data read).
  if done("calibrate"):  # the noise the saved releases were drawn with
    mechs = [accounting.Mechanism(**m) for m in store.load("calibrate")[2]]
  else:
    mechs = _mechanisms(cfg, plan)
    if store is not None:
      store.save("calibrate", info=[dataclasses.asdict(m) for m in mechs])
  split = delta_split(cfg, plan)
  events = abort_events(cfg, plan, k)
  log_tail = split.log_tail(cfg.epsilon, events) if events else None
  nonprivate = cfg.method == "dm"
  clip_norm = math.inf if nonprivate else cfg.clip_norm
  timings["calibration_s"] = time.time() - t0

  # 1b. The class sizes (M_N), before any other private release.
  t1 = time.time()
  if plan.count_release and done("class_sizes"):
    noisy = store.load("class_sizes")[0]["noisy_counts"]
    sizes = counts_lib.released_sizes(
        noisy, _by_name(mechs, "class_counts").noise_multiplier, log_tail)
  else:
    sizes = _class_sizes(cfg, plan, ds, mechs, s_counts, log_tail)
    if store is not None and plan.count_release:
      store.save("class_sizes", arrays={"noisy_counts": sizes.estimate})
  del s_counts
  if sizes is not None:
    _check_delta(cfg, sizes)
  timings["class_sizes_s"] = time.time() - t1
  x_train = ds.normalize(ds.x_train)
  x_test = ds.normalize(ds.x_test)

  # 2. Generated data G: the built-in generator's one private release, then
  # post-processing; or external generated data.
  extractor_model = models.ConvNet(k, width=cfg.extractor_width, depth=depth,
                                   conv_impl=cfg.conv_impl)
  pool = trained = gen_cm = None
  if plan.uses_generated:
    t1 = time.time()
    if plan.builtin_generator and done("generate"):
      saved = store.load("generate")[0]
      x_gen, y_gen, gen_counts = (saved["x_gen"], saved["y_gen"],
                                  saved["noisy_counts"])
    elif plan.builtin_generator:
      x_gen, y_gen, gen_counts = _builtin_generate(
          cfg, ds, x_train, k_gen, s_gen, _by_name(mechs, "generator"), mesh,
          sizes)
      if store is not None:
        store.save("generate", arrays={"x_gen": x_gen, "y_gen": y_gen,
                                       "noisy_counts": gen_counts})
    if plan.builtin_generator:
      # Post-processing: the generator's release carries its own noisy
      # class counts (std sqrt(2) sigma_G); combined with M_N's they give
      # the normalisation constants a smaller error.
      sizes = sizes.refined(
          gen_counts, generator.count_stddev(
              _by_name(mechs, "generator").noise_multiplier),
          "the generator release's count coordinate")
    x_gen_n = ds.normalize(x_gen)
    gen_cm = jnp.asarray(_equal_class_major(x_gen_n, y_gen, k))
    timings["generation_s"] = time.time() - t1
    t1 = time.time()
    pcfg = dataclasses.replace(_eval_config(cfg, depth),
                               width=cfg.extractor_width)
    total = cfg.pool_models * evaluate.training_steps(len(x_gen_n), pcfg,
                                                      cfg.pool_epochs)
    if done("pool"):
      pool = store.load("pool")[1]["pool"]
    else:
      with tqdm(total=total, desc="extractor pool (generated data)",
                disable=quiet) as bar:
        pool = extractors.train_generated_pool(
            k_pool, x_gen_n, y_gen, num_classes=k, model=extractor_model,
            num_models=cfg.pool_models, epochs=cfg.pool_epochs,
            checkpoints=cfg.pool_checkpoints, cfg=pcfg, progress=bar.update,
            mesh=train_mesh)
      if store is not None:
        store.save("pool", trees={"pool": pool})
    # The last checkpoint of the last pool member: a fully trained
    # extractor, used for k-means and as the expert's pretraining.
    trained = extractors.fixed_pool(pool)(None,
                                          extractors.pool_size(pool) - 1)
    timings["extractor_pool_s"] = time.time() - t1
  del s_gen

  # 3. The private feature-matching queries.
  plan_q = distill.QueryPlan(
      extractor=(extractors.fixed_pool(pool) if plan.extractors == "generated"
                 else extractors.random_pool(extractor_model, image_shape)),
      embed_fn=models.embed_fn(extractor_model), num_classes=k,
      strategy=cfg.strategy)
  fm = _by_name(mechs, "feature_matching")
  spec = None
  if plan.feature_matching:
    t1 = time.time()
    spec = mechanisms.QuerySpec(
        embed_fn=plan_q.embed_fn, num_classes=k, clip_norm=clip_norm,
        noise_multiplier=fm.noise_multiplier,
        sampling_rate=cfg.sampling_rate,
        capacity=mechanisms.poisson_capacity(sizes.bound, cfg.sampling_rate,
                                             log_tail=_tail(log_tail)),
        strategy=cfg.strategy)
    if done("query"):
      saved, _, capacity = store.load("query")
      targets = jnp.asarray(saved["targets"])
      spec = dataclasses.replace(spec, capacity=capacity)
    else:
      targets, spec = _answer_queries(cfg, spec, plan_q, k_query, x_train,
                                      ds, s_query, mesh, sizes, log_tail)
      if store is not None:
        store.save("query", arrays={"targets": targets}, info=spec.capacity)
    timings["queries_s"] = time.time() - t1
  del s_query

  # 3b. The DP expert: pretrained on G (a pool member, free), fine-tuned on
  # D with DP-SGD (M_E).
  extra_loss, expert_info = None, None
  if plan.expert:
    t1 = time.time()
    mech_e = _by_name(mechs, "expert")
    if done("expert"):
      _, trees, expert_info = store.load("expert")
      e_params = trees["params"]
    else:
      with tqdm(total=cfg.expert_steps, desc="DP expert (DP-SGD)",
                disable=quiet) as bar:
        e_params = expert_lib.dp_finetune(
            trained, extractor_model, x_train, ds.y_train,
            cfg=_expert_config(cfg),
            noise_multiplier=mech_e.noise_multiplier, secret=s_expert,
            progress=bar.update, mesh=mesh, microbatch=cfg.microbatch,
            num_rows=sizes.total_bound, expected_size=sizes.total_estimate,
            log_tail=_tail(log_tail))
      expert_info = {
          "test_accuracy_pretrained_on_generated": expert_lib.accuracy(
              trained, extractor_model, x_test, ds.y_test),
          "test_accuracy_after_dp_finetuning": expert_lib.accuracy(
              e_params, extractor_model, x_test, ds.y_test),
          "note": "expert test accuracy is logged for information only"}
      if store is not None:
        store.save("expert", trees={"params": e_params}, info=expert_info)
    p_ref = expert_lib.reference_distributions(e_params, extractor_model,
                                               gen_cm, cfg.expert_tau)
    extra_loss = lambda dec: cfg.expert_weight * expert_lib.alignment_loss(
        e_params, extractor_model, dec, p_ref, tau=cfg.expert_tau,
        beta=cfg.expert_beta)
    timings["expert_s"] = time.time() - t1
  del secret, s_expert

  # 4. Initialisation (post-processing, or real images for dm).
  t2 = time.time()
  if done("init"):
    images = jnp.asarray(store.load("init")[0]["images"])
  elif plan.init == "generated" or cfg.method == "generator":
    embed = lambda xb: plan_q.embed_fn(trained, xb)
    chosen = init_lib.select_per_class(k_init, embed, gen_cm, m_stored * f * f)
    images = init_lib.encode(chosen, f)
  elif plan.init == "real":  # NOT private: starts from real images
    xs, _ = evaluate.random_real_subset(k_init, x_train, ds.y_train,
                                        m_stored * f * f, k)
    images = init_lib.encode(jnp.asarray(xs.reshape(k, -1, *image_shape)), f)
  else:
    images = jax.random.normal(k_init, (k, m_stored, *image_shape))
  if store is not None and not done("init"):
    store.save("init", arrays={"images": images})

  x_init = np.asarray(images).reshape(k * m_stored, *image_shape)

  # 5. Distillation against the cached targets (post-processing).
  losses = np.zeros(0)
  if plan.feature_matching:
    opt = distill.image_optimizer(cfg.lr_img)
    state = distill.init_state(images, opt)
    step = distill.make_step(plan_q, opt, clip_norm=clip_norm,
                             decode=lambda s: init_lib.decode(s, f),
                             extra_loss=extra_loss)
    counts = jnp.asarray(sizes.expected_counts(cfg.sampling_rate),
                         jnp.float32)
    state, losses = _distill_loop(cfg, store, state, step, targets, counts,
                                  k_query)
    images = state.images
  stored = np.asarray(images).reshape(k * m_stored, *image_shape)
  decoded = np.asarray(init_lib.decode(images, f)).reshape(-1, *image_shape)
  y_stored = np.repeat(np.arange(k, dtype=np.int32), m_stored)
  y_decoded = np.repeat(np.arange(k, dtype=np.int32), m_stored * f * f)
  timings["distillation_s"] = time.time() - t2

  # 6. Evaluation on the real test split.
  reasons = nonprivate_reasons(cfg, plan)
  metrics = None
  eval_options = {n: getattr(cfg, n) for n in (
      "eval_models", "eval_epochs", "eval_width", "references")}
  saved_eval = store.load("evaluate")[2] if done("evaluate") else None
  if not cfg.no_eval and saved_eval and (
      saved_eval["options"] == eval_options):
    metrics = saved_eval["metrics"]
  elif not cfg.no_eval:
    t3 = time.time()
    ecfg = _eval_config(cfg, depth)
    metrics = _evaluate(k_eval, decoded, y_decoded, x_test, ds.y_test, k,
                        ecfg, quiet, "evaluation", train_mesh)
    if cfg.references:
      xr, yr = evaluate.random_real_subset(k_ref, x_train, ds.y_train,
                                           cfg.ipc, k)
      metrics["reference_random_real_subset"] = _evaluate(
          k_eval, xr, yr, x_test, ds.y_test, k, ecfg, quiet,
          "reference: random real subset", train_mesh)
      metrics["reference_full_training_set"] = _evaluate(
          k_eval, x_train, ds.y_train, x_test, ds.y_test, k,
          dataclasses.replace(ecfg, epochs=max(1, cfg.eval_epochs // 10)),
          quiet, "reference: full training set", train_mesh)
      metrics["references_note"] = (
          "references are NOT private: they train on real training images")
    timings["evaluation_s"] = time.time() - t3
    if store is not None:
      store.save("evaluate", info={"options": eval_options,
                                   "metrics": metrics})
  if metrics is not None:
    if expert_info is not None:
      metrics["expert"] = expert_info
    metrics.update(method=cfg.method,
                   first_loss=float(losses[0]) if len(losses) else None,
                   last_loss=float(losses[-1]) if len(losses) else None)
  timings["total_s"] = time.time() - t0

  notes = [
      "Noise and sampling randomness came from "
      + ("the public seed (deterministic TEST mode): this run is NOT private"
         if cfg.deterministic else
         "128 bits of the operating system's entropy and was never saved")
      + "; Gaussian noise from the atom-free float64 sampler "
      "(dpgeng_jax/noise.py), added to float64 sums and rounded once",
  ]
  if sizes is not None and plan.feature_matching:
    notes.append("Targets are sums normalised by the public expected counts "
                 f"p * n~_c ({sizes.policy} class sizes)")
  abort = None
  if events:
    abort = {"events": events, "probability_per_event": math.exp(log_tail),
             "what": "a class above its released upper bound (K + 1 bounds)"
             " and a Poisson batch above its padded capacity (per class and"
             " query, per expert step); each aborts the run before anything"
             " is released",
             "delta_added": accounting.failure_delta(cfg.epsilon, events,
                                                     log_tail)}
    if spec is not None:
      abort["query_capacity_per_class"] = spec.capacity
  if plan.builtin_generator:
    notes.append("built-in generator: its normalising class counts are read "
                 "from the same noisy release (constant coordinate)")
  privacy = accounting.privacy_report(
      mechs, target_epsilon=cfg.epsilon, delta=cfg.delta,
      private=not reasons, public_metadata=_public_metadata(ds, sizes),
      notes=notes, external=plan.external, split=split, abort_events=abort,
      nonprivate_reasons=reasons)
  privacy["method"] = cfg.method
  privacy["clip_norm"] = None if nonprivate else cfg.clip_norm
  privacy["class_sizes"] = None if sizes is None else sizes.report()
  if metrics is not None:
    metrics["timings_s"] = timings
    metrics["private"] = privacy["private"]
  config = cfg.to_dict()
  config.update(resolved=dataclasses.asdict(plan), dataset_name=ds.name,
                poisson_capacity=spec.capacity if spec else None,
                versions=_versions(), timings_s=timings)
  return RunResult(x=_denormalize(ds, stored), y=y_stored, privacy=privacy,
                   metrics=metrics, config=config, factor=f,
                   x_decoded=_denormalize(ds, decoded), y_decoded=y_decoded,
                   x_generated=None if x_gen is None else np.asarray(x_gen),
                   x_init=_denormalize(ds, x_init))


def _resume_view(cfg: Config) -> dict:
  """The configuration a resumed run is checked against (stages.check)."""
  return json.loads(json.dumps(cfg.to_dict()))


def _distill_loop(cfg: Config, store, state, step, targets, counts, key):
  """cfg.steps image updates from `state`; with a store, the state is
  saved every cfg.checkpoint_every steps and at the end, and a saved one
  is resumed from. Returns (state, the loss of every step)."""
  name = "distill"
  losses: list = []
  if store is not None and store.finished(name):
    arrays, trees, _ = store.load(name, targets={"state": state})
    state, losses = trees["state"], list(arrays["losses"])
  with tqdm(total=cfg.steps, initial=len(losses), desc="distillation",
            disable=cfg.quiet) as bar:
    while len(losses) < cfg.steps:
      state, loss = step(state, targets, counts, key)
      losses.append(loss)
      bar.update(1)
      n = len(losses)
      if store is not None and (n == cfg.steps or (
          cfg.checkpoint_every and n % cfg.checkpoint_every == 0)):
        store.save(name, arrays={"losses": np.asarray(
            jnp.stack(losses) if n else np.zeros(0))},
                   trees={"state": state}, info={"step": n})
  losses = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
  return state, losses


def _tail(log_tail: float | None) -> float:
  """The log tail of the run's abort events (the library default for runs
  that have none, such as dm)."""
  return math.log(mechanisms.OVERFLOW_TAIL) if log_tail is None else log_tail


def _equal_class_major(x, y, k):
  """(K, m, ...) with the first m images of every class, m the smallest
  class count (public data: generated images)."""
  y = np.asarray(y)
  m = min(int(np.sum(y == c)) for c in range(k))
  return np.stack([np.asarray(x)[np.flatnonzero(y == c)[:m]]
                   for c in range(k)])


def _expert_config(cfg: Config) -> expert_lib.ExpertConfig:
  return expert_lib.ExpertConfig(steps=cfg.expert_steps,
                                 sampling_rate=cfg.expert_sampling_rate,
                                 clip_norm=cfg.expert_clip_norm,
                                 learning_rate=cfg.expert_lr)


def _eval_config(cfg: Config, depth: int) -> evaluate.EvalConfig:
  return evaluate.EvalConfig(num_models=cfg.eval_models,
                             epochs=cfg.eval_epochs, width=cfg.eval_width,
                             depth=depth, strategy=cfg.strategy,
                             conv_impl=cfg.conv_impl)


def _builtin_generate(cfg, ds, x_train, k_gen, secret, mech, mesh, sizes):
  """M_G: one noisy release of class feature sums, then post-processing."""
  k_map, k_fit, k_sample = jax.random.split(k_gen, 3)
  fmap = generator.FeatureMap.create(
      k_map, int(np.prod(ds.image_shape)), cfg.generator_features)
  rows = _private_rows(mesh, x_train, ds.y_train, sizes.total_bound)
  release = jax.jit(functools.partial(
      generator.release_class_features, num_classes=ds.num_classes,
      noise_multiplier=mech.noise_multiplier, mesh=mesh))(
          fmap, *rows, noise_key=secret)
  means, noisy_counts = generator.class_means_from_release(release)
  gcfg = generator.GeneratorConfig(num_features=cfg.generator_features,
                                   steps=cfg.generator_steps)
  with tqdm(total=gcfg.steps, desc="generator (post-processing)",
            disable=cfg.quiet) as bar:
    gen, params = generator.train_generator(
        k_fit, fmap, means, image_shape=ds.image_shape,
        normalize=ds.normalize, cfg=gcfg, progress=bar.update)
  x_gen, y_gen = generator.sample(gen, params, k_sample,
                                  cfg.generated_per_class, gcfg.latent_dim)
  return x_gen, y_gen, np.asarray(noisy_counts, np.float64)


def _private_rows(mesh, x, y, num_rows: int):
  """(x, y, mask) padded to the public `num_rows` (mask 0 on padding): on
  a mesh, this process's `process_rows`, split over the devices."""
  if mesh is None:
    return tuple(map(jnp.asarray, parallel.padded_rows(num_rows, x, y)))
  return parallel.local_rows(mesh, x, y, num_rows=num_rows)


def _answer_queries(cfg, spec, plan_q, k_query, x_train, ds, secret, mesh,
                    sizes, log_tail):
  """M_F: the Q noisy class sums, computed once. The private table is
  padded to the public class bound; returns (targets, the spec used)."""
  k = ds.num_classes
  query_chunk = cfg.microbatch or clipping.default_query_chunk()
  bound = int(np.max(sizes.bound))
  if mesh is None:
    private_data = mechanisms.class_major(x_train, ds.y_train, k, rows=bound)
    answer = functools.partial(mechanisms.noisy_targets, spec,
                               chunk_size=query_chunk)
  else:
    # This process's rows, in a layout whose size follows from the
    # public class bound; the capacity is per device of the mesh.
    rows = parallel.process_rows_by_class(ds.y_train, k)
    per_device = parallel.rows_per_device(bound, mesh)
    local = parallel.sharded_class_major(
        x_train[rows], ds.y_train[rows], k, parallel.local_shards(mesh),
        rows_per_shard=per_device, as_numpy=True)
    private_data = mechanisms.ClassMajorData(
        parallel.global_rows(mesh, local.x, 1),
        parallel.global_rows(mesh, local.valid, 1))
    spec = dataclasses.replace(spec, capacity=mechanisms.poisson_capacity(
        [per_device], spec.sampling_rate,
        log_tail=_tail(log_tail) - math.log(parallel.num_shards(mesh))))
    answer = functools.partial(parallel.sharded_noisy_targets, spec,
                               mesh=mesh, chunk_size=query_chunk)

  @jax.jit
  def query(data, secret_q, q):
    params, aug_params = plan_q.params(k_query, q)
    return answer(data, params, aug_params, secret_q)

  targets = []
  for q in tqdm(range(cfg.num_queries), desc="private queries",
                disable=cfg.quiet):
    sums, overflow = query(private_data, jax.random.fold_in(secret, q), q)
    mechanisms.check_overflow(overflow)
    targets.append(sums)
  return jnp.stack(targets), spec


def _evaluate(key, x, y, x_test, y_test, k, ecfg, quiet, desc, mesh):
  steps = ecfg.num_models * evaluate.training_steps(len(x), ecfg)
  t = time.time()
  with tqdm(total=steps, desc=desc, disable=quiet) as bar:
    result = evaluate.evaluate(key, x, y, x_test, y_test, num_classes=k,
                               cfg=ecfg, progress=bar.update, mesh=mesh)
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


def write_outputs(result: RunResult, out: str, overwrite: bool = False,
                  run_dir: outputs.RunDirectory | None = None,
                  store: stages.StageStore | None = None) -> list[str]:
  """Writes the run's files as one published set (outputs.RunDirectory):
  staged, then moved into `out` with manifest.json last. `run_dir`: a
  directory opened (and locked) before the run; otherwise one is opened
  here. `store`: the run's saved stages, published as out/stages."""
  if run_dir is None:
    with output_dir(out, overwrite) as rd:
      return write_outputs(result, out, overwrite, rd)
  if store is not None and store.exists():
    state = store.published_state()
    outputs.atomic_write(store.path, lambda f: json.dump(state, f, indent=2))
    run_dir.adopt(STAGES_DIR)
  k = int(result.y.max()) + 1
  decoded = {} if result.x_decoded is None else {
      "x_decoded": result.x_decoded, "y_decoded": result.y_decoded}
  w = run_dir.write
  w("distilled.npz", lambda f: np.savez(f, x=result.x, y=result.y,
                                        factor=np.int32(result.factor),
                                        **decoded), mode="wb")
  w("privacy.json", _json(result.privacy))
  w("config.json", _json(result.config))
  w("grid.png", lambda f: grid_image(result.x, k).save(f, format="PNG"),
    mode="wb")
  if result.x_generated is not None:
    per = min(10, len(result.x_generated) // k)
    xg = result.x_generated.reshape(k, -1, *result.x_generated.shape[1:])
    w("generated_grid.png", lambda f: grid_image(xg[:, :per].reshape(
        -1, *xg.shape[2:]), k).save(f, format="PNG"), mode="wb")
  if result.x_init is not None:
    w("init_grid.png",
      lambda f: grid_image(result.x_init, k).save(f, format="PNG"), mode="wb")
  if result.metrics is not None:
    w("metrics.json", _json(result.metrics))
  return run_dir.publish({"tool": "dpgeng_jax", "private":
                          bool(result.privacy.get("private"))})
