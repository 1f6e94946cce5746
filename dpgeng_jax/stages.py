"""The stages of a run, each a function with explicit inputs and outputs.

    calibrate -> class_sizes -> generate -> pool -> query -> expert
              -> init -> distill -> evaluate -> report

`pipeline.run` composes them. The private stages are the only readers of
the private training set, each through one mechanism, and the only ones
given a secret key: `class_sizes` (M_N), `generate` (M_G, the built-in
generator), `query` (M_F) and `expert` (M_E). Every other stage is
post-processing of their releases and of public data.

Every stage saves its result in the run's `store.StageStore` (when it has
one) as soon as it is done, and a stage the store already holds is loaded
instead of run: that is how `--resume` continues a killed run without
drawing any saved release again. `Run` carries what every stage may read:
the configuration, the resolved plan, the data, the device meshes, the
PUBLIC keys and the store; never a secret key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpgeng_jax import accounting, clipping, data as data_lib, distill
from dpgeng_jax import counts as counts_lib
from dpgeng_jax import evaluate, extractors, generators, mechanisms, models
from dpgeng_jax import expert as expert_lib
from dpgeng_jax import init as init_lib
from dpgeng_jax import parallel, planning
from dpgeng_jax import progress as progress_lib
from dpgeng_jax import store as store_lib
from dpgeng_jax.config import Config
from dpgeng_jax.errors import (ConfigError, DataError, PrivacyAbort,
                               StageFailed)

STAGES = store_lib.STAGES


class PublicKeys(NamedTuple):
  """Keys of the public randomness (from --seed): extractors and query
  augmentation, initialisation, evaluation, references, the generator's
  network, the extractor pool."""
  query: jax.Array
  init: jax.Array
  eval: jax.Array
  ref: jax.Array
  gen: jax.Array
  pool: jax.Array


class Secrets(NamedTuple):
  """One independent secret key per private mechanism (OS entropy)."""
  counts: jax.Array
  gen: jax.Array
  query: jax.Array
  expert: jax.Array


@dataclasses.dataclass
class Run:
  """What every stage may read (see module docstring)."""
  cfg: Config
  plan: planning.Plan
  ds: data_lib.Dataset
  x_train: jax.Array   # normalised private images: mechanisms only
  x_test: jax.Array    # normalised test images
  mesh: Any            # data mesh of the private passes (None: one device)
  train_mesh: Any      # this process's devices, for non-private training
  keys: PublicKeys
  store: store_lib.StageStore | None = None
  timings: dict = dataclasses.field(default_factory=dict)
  # The process's peak resident memory (MB) when each stage ended: where
  # it rises, that stage set a new high-water mark.
  peak_rss_mb: dict = dataclasses.field(default_factory=dict)
  # Stages this process loaded from the store (a resumed run) and did not
  # compute again: their timings are the process that computed them.
  loaded: set = dataclasses.field(default_factory=set)
  # Stages this process continued from a saved checkpoint (distillation):
  # their timings add the earlier processes' to this one's.
  continued: set = dataclasses.field(default_factory=set)

  @property
  def num_classes(self) -> int:
    return self.ds.num_classes

  @property
  def image_shape(self) -> tuple:
    return tuple(self.ds.image_shape)

  def done(self, name: str) -> bool:
    return self.store is not None and self.store.finished(name)

  def save(self, name: str, **what) -> None:
    self.loaded.discard(name)
    if self.store is not None:
      self.store.save(name, **what)

  def load(self, name: str, **kw):
    self.loaded.add(name)
    return self.store.load(name, **kw)

  def timed(self, key: str, t0: float) -> None:
    self.timings[key] = self.timings.get(key, 0.0) + time.time() - t0
    self.peak_rss_mb[key.removesuffix("_s")] = peak_rss_mb()
    if self.store is not None:  # kept for a resumed run's metrics
      self.store.save_timings({k: v for k, v in self.timings.items()
                               if _STAGE_OF.get(k) not in self.loaded})

  def stage_timings(self) -> dict:
    """Seconds per stage: this process's, except for the stages it loaded
    from an earlier (killed) process of the run, whose own times the store
    kept."""
    saved = self.store.saved_timings() if self.store is not None else {}
    return {**self.timings, **{k: v for k, v in saved.items()
                               if _STAGE_OF.get(k) in self.loaded}}


_STAGE_OF = {key: name for name, key in progress_lib.STAGES}


def peak_rss_mb() -> float:
  """This process's peak resident set size so far, in MB (Linux and
  macOS report ru_maxrss in KiB and bytes)."""
  import resource
  import sys
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def by_name(mechs, name):
  """The mechanism called `name` of a list, or None."""
  return next((m for m in mechs if m.name == name), None)


def expert_config(cfg: Config) -> expert_lib.ExpertConfig:
  return expert_lib.ExpertConfig(steps=cfg.expert_steps,
                                 sampling_rate=cfg.expert_sampling_rate,
                                 clip_norm=cfg.expert_clip_norm,
                                 learning_rate=cfg.expert_lr)


def eval_config(cfg: Config, depth: int) -> evaluate.EvalConfig:
  return evaluate.EvalConfig(num_models=cfg.eval_models,
                             epochs=cfg.eval_epochs, width=cfg.eval_width,
                             depth=depth, strategy=cfg.strategy,
                             conv_impl=cfg.conv_impl)


def extractor_model(run: Run) -> models.ConvNet:
  return models.ConvNet(run.num_classes, width=run.cfg.extractor_width,
                        depth=run.plan.depth, conv_impl=run.cfg.conv_impl)


def _tail(log_tail: float | None) -> float:
  """The log tail of the run's abort events (the library default for runs
  that have none, such as dm)."""
  return math.log(mechanisms.OVERFLOW_TAIL) if log_tail is None else log_tail


# ---------------------------------------------------------------------------
# 1. calibrate: the mechanisms' noise (reads no data).


@dataclasses.dataclass(frozen=True)
class Budget:
  mechs: list            # accounting.Mechanism, calibrated
  split: accounting.DeltaSplit
  events: int            # abort events
  log_tail: float | None  # log probability of each abort event

  def mechanism(self, name: str):
    return by_name(self.mechs, name)


def _check_saved_calibration(saved: list, now: list, path: str) -> None:
  """Refuses a saved calibration that differs from the one this
  configuration calibrates to (the checked options and `auto` choices are
  the saved run's, so they agree unless the record was edited): the
  privacy report of a resumed run is computed from the saved mechanisms,
  and an edited noise multiplier there would understate what the saved
  releases cost (a review's finding: epsilon 0.69 reported for a run
  calibrated to 10)."""
  def key(m):
    return (m.name, m.sampling_rate, m.steps, m.sensitivity)
  same = len(saved) == len(now) and all(
      key(a) == key(b) and math.isclose(a.noise_multiplier,
                                        b.noise_multiplier, rel_tol=1e-9)
      for a, b in zip(saved, now))
  if not same:
    raise ConfigError(store_lib.damaged(path, (
        "its calibration differs from the one its configuration "
        "calibrates to (the record was edited, the run is resumed with "
        "a generator that makes other releases, or by a version that "
        "calibrates otherwise: finish it with the version that started "
        "it): saved " + ", ".join(
            f"{m.name} {m.noise_multiplier:.6g}" for m in saved)
        + "; now " + ", ".join(f"{m.name} {m.noise_multiplier:.6g}"
                                for m in now))))


def calibrate(run: Run) -> Budget:
  cfg, plan, t0 = run.cfg, run.plan, time.time()
  if run.done("calibrate"):  # the noise the saved releases were drawn with
    saved = run.load("calibrate")[2]
    try:
      mechs = [accounting.Mechanism(**m) for m in saved]
    except (TypeError, ValueError) as e:
      raise ConfigError(store_lib.damaged(
          run.store.path, f"its calibration: {e}")) from e
    _check_saved_calibration(mechs, planning.mechanisms_for(cfg, plan),
                             run.store.path)
  else:
    mechs = planning.mechanisms_for(cfg, plan)
    run.save("calibrate", info=[dataclasses.asdict(m) for m in mechs])
  split, events, log_tail = _abort_tail(cfg, plan, run.num_classes)
  run.timed("calibration_s", t0)
  return Budget(mechs, split, events, log_tail)


def _abort_tail(cfg: Config, plan, k: int):
  """(the delta split, the abort events, the log of each event's tail
  probability; None without events) of `cfg` (reads no data)."""
  split = planning.delta_split(cfg, plan)
  events = planning.abort_events(cfg, plan, k)
  return split, events, (split.log_tail(cfg.epsilon, events) if events
                         else None)


# ---------------------------------------------------------------------------
# 2. class_sizes: M_N, before any other release.


def _spent_counts(budget: Budget, sizes: counts_lib.ClassSizes,
                  delta: float, lead: str = "the bound comes from",
                  saved: bool = False) -> str:
  """What a refusal after the count release says about the release: it
  is spent (printed bounds are post-processing of it), with its epsilon
  alone, and a rerun composes with it (its noise is fresh: reruns must not
  be used to average it away). `saved`: the run is kept, and a --resume
  (whose options pass the check) reuses the release. Empty without a
  release (or a budget)."""
  if budget is None or sizes is None or sizes.policy != "released":
    return ""
  m = budget.mechanism("class_counts")
  eps = accounting.epsilon_of(m.event(), delta)
  rerun = ("it is saved, and --resume reuses it (with options that pass "
           "this check); a new run would release the counts again, and "
           "the runs compose" if saved else
           "a rerun releases the counts again, and the runs compose")
  return (f"; {lead} this run's count release (noise "
          f"multiplier {m.noise_multiplier:.4g}, epsilon {eps:.4g} alone at "
          f"delta {delta:g}), which is spent: {rerun}")


def _spent_generator(mechs, finished: bool = False,
                     saved: int = 0) -> str:
  """What a generator that failed (or `finished` with an unusable answer)
  spent of its own releases; `saved` of them are checkpointed, which a
  resumed run reuses."""
  names = ", ".join(m.name for m in mechs if m is not None)
  if not names:
    return ""
  kept = (f" ({saved} of them are saved and a resumed run reuses them)"
          if saved else "")
  if finished:
    return (f"; the generator's own releases ({names}) are spent as "
            f"well{kept}")
  return (f"; any of the generator's own releases ({names}) drawn before "
          f"it failed are spent as well{kept}")


def _generator_failed(run: Run, budget: Budget, sizes, mechs, what: str,
                      finished: bool = False) -> ConfigError:
  """The error for a generator that failed after the count release, naming
  what is spent: StageFailed (the run is kept to resume) where the store
  holds a private release (the counts', or the generator's checkpointed
  ones), so that a new run does not draw them again; else ConfigError."""
  saved = _partial_count(run)
  kept = saved > 0 or (run.plan.count_release and run.done("class_sizes"))
  return (StageFailed if kept else ConfigError)(
      what + _spent_counts(budget, sizes, run.cfg.delta, "it failed after",
                           saved=kept)
      + _spent_generator(mechs, finished=finished, saved=saved))


def _partial_count(run: Run) -> int:
  """How many releases the generate stage has checkpointed: the leading
  axes of its arrays summed (PE's histograms and its warm release, one
  DP-MERF release), their 0-d settings not counted."""
  if run.store is None:
    return 0
  try:
    saved = run.store.partial("generate") or {}
  except ConfigError:
    return 0
  return sum(len(v) for v in map(np.asarray, saved.values()) if v.ndim)


def _check_delta(cfg: Config, sizes: counts_lib.ClassSizes,
                 budget: Budget | None = None) -> None:
  """delta < 1/N, with N from the public class sizes: by default the
  released upper bound on N (N <= it but for the accounted abort
  probability), so that a delta that passes is below 1/N for the true N,
  not only for its noisy estimate."""
  n = sizes.total_bound
  if cfg.delta >= 1.0 / n:
    spent = _spent_counts(budget, sizes, cfg.delta)
    raise ConfigError(
        f"delta must be < 1/N = {1.0 / n:.3g} for N <= {n} training "
        f"examples ({sizes.policy} class sizes), got {cfg.delta} (a larger "
        "delta allows releasing an example outright)" + (
            spent + " (a larger --share-counts or --epsilon tightens the "
            "bound; --public-class-sizes where they are public)"
            if spent else ""))


def _count_margin(cfg: Config, plan, k: int) -> float:
  """What the released bound on N adds to N (counts.total_margin) for
  `cfg` as calibrated."""
  mechs = planning.mechanisms_for(cfg, plan)
  sigma = next(m for m in mechs if m.name == "class_counts").noise_multiplier
  return counts_lib.total_margin(k, sigma, _abort_tail(cfg, plan, k)[2])


def _passing_delta(cfg: Config, plan, k: int, floor: float):
  """A delta that `_check_delta_before_release` takes, near the largest:
  1/floor recalibrated (a smaller delta calibrates more noise, so 1/floor
  at the given delta is refused again) until it passes; with its margin
  (None, None where calibration refuses every such delta)."""
  delta = 1.0 / floor
  for _ in range(12):
    try:
      margin = _count_margin(dataclasses.replace(cfg, delta=delta), plan, k)
    except ConfigError:
      return None, None
    if delta * (k + margin) < 1.0:
      return delta, margin
    delta = 0.99 / (k + margin)
  return None, None


def _check_delta_before_release(cfg: Config, plan, k: int, sigma: float,
                                log_tail: float) -> None:
  """Refuses, before the count release, a delta that `_check_delta` would
  refuse after it with probability >= 1/2 whatever the data: the released
  bound on N is the noisy total plus z sigma sqrt(K) (counts.
  released_sizes), whose median is N + z sigma sqrt(K) >= K + z sigma
  sqrt(K), every class holding an example (a review's finding: 10 images
  at delta 0.09 spent the release, then were refused). The delta it
  suggests passes this check at its own calibration (the first advice,
  1/floor at the given delta's noise, was refused again: a review's
  finding); the data's N still needs delta below about 1/(N + margin)."""
  margin = counts_lib.total_margin(k, sigma, log_tail)
  floor = k + margin
  if cfg.delta * floor >= 1.0:
    below, at = _passing_delta(cfg, plan, k, floor)
    if below is not None:  # shown to 3 digits, rounded down (it passes)
      unit = 10.0 ** (math.floor(math.log10(below)) - 2)
      below = math.floor(below / unit) * unit
    lower = "" if below is None else (
        f"lower --delta below {below:.3g} (about the largest this check "
        "takes: "
        "a smaller delta calibrates more noise, and a wider margin; with "
        f"N training examples the run then needs delta below about 1/(N + "
        f"{at:.3g}), and the usual choice is far below 1/N), ")
    raise ConfigError(
        f"delta {cfg.delta:g} is too large for this run's count release: "
        f"a run refuses delta >= 1/N with N's upper bound from the noisy "
        f"counts, which is about N + {margin:.3g} "
        f"(noise multiplier {sigma:.4g}, {k} classes), so at least "
        f"{math.ceil(floor)} here whatever the data, and the run would be "
        f"refused after spending the release; {lower}raise --share-counts "
        "or --epsilon, or declare the class sizes with --public-class-sizes "
        "where they are public")


def _check_release_rows(run: Run, budget: Budget,
                        sizes: counts_lib.ClassSizes) -> None:
  """Refuses, before the generator, queries or expert steps whose padded
  Poisson batch is too large for an int32 fixed-point sum (more than 2^23
  rows, `clipping.fixed_point_bits`), which would otherwise stop the run
  at that stage after the generator and the pool."""
  cfg, shards = run.cfg, (1 if run.mesh is None
                          else parallel.num_shards(run.mesh))
  checks = []
  fm = budget.mechanism("feature_matching")
  if fm is not None and run.plan.feature_matching:
    checks.append(("feature-matching query", "--sampling-rate", query_capacity(
        sizes.padded_rows, cfg.sampling_rate, budget.log_tail, run.mesh),
        clip_norm(cfg), fm.noise_multiplier))
  ex = budget.mechanism("expert")
  if ex is not None and run.plan.expert:
    checks.append(("expert step", "--expert-sampling-rate",
                   expert_lib.step_capacity(
                       expert_config(cfg), sizes.padded_rows,
                       _tail(budget.log_tail), run.mesh),
                   cfg.expert_clip_norm, ex.noise_multiplier))
  for what, flag, capacity, c, sigma in checks:
    release = mechanisms.SumRelease(c, sigma)
    try:
      release.release_bits(capacity * shards)
    except ValueError as e:
      try:
        release.release_bits(1)
        fix = f"too many rows for this clip norm: lower {flag} (or C)"
      except ValueError:
        fix = "the clip norm is outside the range of any fixed-point sum"
      raise ConfigError(
          f"a {what}'s Poisson batch would have {capacity * shards} padded "
          f"rows, and its exact fixed-point sum cannot hold them ({e}); "
          f"{fix}" + _spent_counts(budget, sizes, cfg.delta,
                                   saved=bool(cfg.resume))) from None


def class_sizes(run: Run, budget: Budget, secret: jax.Array
                ) -> counts_lib.ClassSizes | None:
  """The class sizes the run may use: M_N's release (default), the exact
  sizes when declared public or the run is not private, None when no
  mechanism reads the private data."""
  cfg, plan, ds, t0 = run.cfg, run.plan, run.ds, time.time()
  if cfg.method == "dm":
    sizes = counts_lib.exact_sizes(ds.y_train, ds.num_classes)
  elif not plan.reads_private:
    sizes = None
  elif not plan.count_release:
    sizes = counts_lib.public_sizes(ds.y_train, ds.num_classes)
  else:
    sigma = budget.mechanism("class_counts").noise_multiplier
    if run.done("class_sizes"):
      noisy = run.load("class_sizes")[0]["noisy_counts"]
    else:
      _check_delta_before_release(cfg, plan, ds.num_classes, sigma,
                                  budget.log_tail)
      noisy = np.asarray(counts_lib.release_class_counts(
          secret, ds.y_train, num_classes=ds.num_classes,
          noise_multiplier=sigma))
    sizes = counts_lib.released_sizes(noisy, sigma, budget.log_tail)
    sizes.check(ds.y_train)
    if not run.done("class_sizes"):
      run.save("class_sizes", arrays={"noisy_counts": noisy})
  if sizes is not None:
    _check_delta(cfg, sizes, budget)
    _check_release_rows(run, budget, sizes)
  run.timed("class_sizes_s", t0)
  return sizes


# ---------------------------------------------------------------------------
# 3. generate: M_G, through the run's generator plug-in.


@dataclasses.dataclass(frozen=True)
class Generated:
  x: np.ndarray           # generated images, pixel space
  y: np.ndarray
  x_norm: jax.Array       # normalised
  class_major: jax.Array  # (K, m, H, W, C) normalised, m per class
  extra: dict = dataclasses.field(default_factory=dict)  # e.g. PE history


def _equal_class_major(x, y, k):
  """(K, m, ...) with the first m images of every class, m the smallest
  class count (public data: generated images)."""
  y = np.asarray(y)
  m = min(int(np.sum(y == c)) for c in range(k))
  return np.stack([np.asarray(x)[np.flatnonzero(y == c)[:m]]
                   for c in range(k)])


def _private_rows(mesh, x, y, num_rows: int):
  """(x, y, mask) padded to the public `num_rows` (mask 0 on padding): on
  a mesh, this process's `process_rows`, split over the devices."""
  if mesh is None:
    return tuple(map(jnp.asarray, parallel.padded_rows(num_rows, x, y)))
  return parallel.local_rows(mesh, x, y, num_rows=num_rows)


def generator_context(run: Run, sizes, generator) -> generators.Context:
  """What a generator plug-in may read: the private rows (padded to the
  released bound on N) only if it reads private data, through its
  mechanisms."""
  ds = run.ds
  if sizes is None or not generator.reads_private:
    rows = (None, None, None)
  else:
    rows = _private_rows(run.mesh, run.x_train, ds.y_train,
                         sizes.padded_rows)
  return generators.Context(
      *rows, mesh=run.mesh, image_shape=run.image_shape,
      num_classes=ds.num_classes, normalize=ds.normalize, key=run.keys.gen,
      per_class=run.cfg.generated_per_class,
      model=models.ConvNet(ds.num_classes, width=run.cfg.pe_width,
                           depth=run.plan.depth,
                           conv_impl=run.cfg.conv_impl),
      quiet=run.cfg.quiet)


def generate(run: Run, budget: Budget, sizes, secret: jax.Array,
             generator: generators.DPGenerator):
  """M_G through the run's generator plug-in: (Generated or None, the
  class sizes refined by the noisy counts its release carries, if any)."""
  plan, ds, t0 = run.plan, run.ds, time.time()
  if not plan.uses_generated:
    return None, sizes
  mechs = [budget.mechanism(m.name) for m in plan.generator_mechanisms]
  if run.done("generate"):
    run.store.drop_partial("generate")  # a kill just after the save
    saved = run.load("generate")
    arrays, info = saved[0], saved[2] or {}
    out = generators.Output(
        arrays.pop("x_gen"), arrays.pop("y_gen"),
        arrays.pop("noisy_counts", None), info.get("count_std"), arrays)
  else:
    try:  # the releases it makes are the calibrated ones (a resumed run
      # loads the saved calibration; a plug-in given from Python may make
      # others under the same name, say more PE iterations)
      generators.check_mechanisms(generator,
                                  [m for m in mechs if m is not None])
    except ValueError as e:
      raise ConfigError(f"generator {plan.generator}: {e}; the run would "
                        "not be private as stated") from e
    try:
      ctx = generator_context(run, sizes, generator)
      if run.store is not None:  # its releases so far, saved as drawn
        ctx = dataclasses.replace(
            ctx, saved=run.store.partial("generate"),
            checkpoint=lambda arrays: run.store.save_partial("generate",
                                                             arrays))
      out = generator.generate(ctx, secret, mechs)
    except (ValueError, OSError, RuntimeError) as e:
      # An API's answer at a later call (a user's model server down is a
      # RuntimeError; so is XLA's out of memory): the releases are named,
      # and the run stays resumable with those that were saved. An abort
      # (accounted in delta, nothing released) stays one.
      if isinstance(e, PrivacyAbort):
        raise
      raise _generator_failed(run, budget, sizes, mechs,
                              f"generator {plan.generator}: {e}") from e
    try:  # a plug-in's answer, as external files are checked
      out.x, out.y = generators.check_images(
          out.x, out.y, image_shape=run.image_shape,
          num_classes=run.num_classes)
    except DataError as e:
      raise _generator_failed(
          run, budget, sizes, mechs, f"generator {plan.generator} returned "
          f"images the run cannot use: {e}", finished=True) from e
    arrays = {"x_gen": out.x, "y_gen": out.y, **out.arrays}
    if out.counts is not None:
      arrays["noisy_counts"] = out.counts
    run.save("generate", arrays=arrays, info={"count_std": out.count_std})
    if run.store is not None:
      run.store.drop_partial("generate")
  if out.counts is not None and out.count_std and sizes is not None:
    # Post-processing: a generator release that carries noisy class counts
    # refines M_N's estimate (inverse-variance combination).
    sizes = sizes.refined(out.counts, out.count_std,
                          f"the {plan.generator} release's class counts")
  x_norm = ds.normalize(out.x)
  gen = Generated(np.asarray(out.x), np.asarray(out.y), x_norm, jnp.asarray(
      _equal_class_major(x_norm, out.y, run.num_classes)),
      {k: v for k, v in out.arrays.items() if k == "history"})
  run.timed("generation_s", t0)
  return gen, sizes


# ---------------------------------------------------------------------------
# 4. pool: extractors trained on generated data (post-processing).


@dataclasses.dataclass(frozen=True)
class Pool:
  params: Any    # stacked parameters (leading axis: members)
  trained: Any   # the last member: k-means embedding, expert pretraining


def pool(run: Run, gen: Generated | None) -> Pool | None:
  members = planning.pool_members(run.cfg, run.plan)
  if gen is None or not members:
    return None
  cfg, t0 = run.cfg, time.time()
  if run.done("pool"):
    params = run.load("pool")[1]["pool"]
  else:
    pcfg = dataclasses.replace(eval_config(cfg, run.plan.depth),
                               width=cfg.extractor_width)
    total = members * evaluate.training_steps(len(gen.x_norm), pcfg,
                                              cfg.pool_epochs)
    with tqdm(total=total, desc="extractor pool (generated data)",
              disable=cfg.quiet) as bar:
      params = extractors.train_generated_pool(
          run.keys.pool, gen.x_norm, gen.y, num_classes=run.num_classes,
          model=extractor_model(run), num_models=members,
          epochs=cfg.pool_epochs, checkpoints=cfg.pool_checkpoints,
          cfg=pcfg, progress=bar.update, mesh=run.train_mesh)
    run.save("pool", trees={"pool": params})
  trained = extractors.fixed_pool(params)(None,
                                          extractors.pool_size(params) - 1)
  run.timed("extractor_pool_s", t0)
  return Pool(params, trained)


# ---------------------------------------------------------------------------
# 5. query: M_F, the Q noisy class sums, computed once.


def query_plan(run: Run, pool_: Pool | None,
               gen: Generated | None = None) -> distill.QueryPlan:
  """The extractors and augmentation of the queries (both sides), with
  the public centres of `--centre-features generated`."""
  model = extractor_model(run)
  ext = (extractors.fixed_pool(pool_.params)
         if run.plan.extractors == "generated"
         else extractors.random_pool(model, run.image_shape))
  embed = models.embed_fn(model)
  if run.plan.centre == "generated":
    t0 = time.time()
    x_gen = gen.class_major[:, :extractors.CENTRE_IMAGES]
    # Waited for here, so that the time is this stage's, not the first
    # query's (the work is dispatched asynchronously).
    centres = jax.block_until_ready(extractors.generated_centres(
        ext, embed, run.keys.query, x_gen, run.cfg.num_queries,
        run.cfg.strategy))
    ext, embed = (extractors.centred(ext, centres),
                  extractors.centred_embed(embed))
    run.timed("extractor_pool_s", t0)
  return distill.QueryPlan(extractor=ext, embed_fn=embed,
                           num_classes=run.num_classes,
                           strategy=run.cfg.strategy)


@dataclasses.dataclass(frozen=True)
class Queries:
  targets: jax.Array   # (Q, K, d) noisy sums
  spec: mechanisms.QuerySpec


def query_capacity(rows: int, sampling_rate: float, log_tail, mesh) -> int:
  """The padded Poisson batch of one query over `rows` (a public bound on
  N), per device of `mesh`, whose overflow has probability <= the run's
  tail (split over the devices)."""
  return parallel.flat_capacity(rows, sampling_rate, _tail(log_tail), mesh)


def answer_queries(cfg, spec, plan_q, k_query, x_train, ds, secret, mesh,
                   sizes, log_tail):
  """M_F: the Q noisy class sums, computed once. The private rows are
  padded to the public bound on N (flat layout: one Poisson batch of all
  classes, `query_capacity`); returns (targets, the spec used, with its
  capacity)."""
  query_chunk = cfg.microbatch or clipping.default_query_chunk()
  rows = sizes.padded_rows
  private_data = mechanisms.FlatData(*_private_rows(mesh, x_train,
                                                    ds.y_train, rows))
  spec = dataclasses.replace(spec, capacity=query_capacity(
      rows, spec.sampling_rate, log_tail, mesh))
  if mesh is None:
    answer = functools.partial(mechanisms.noisy_targets, spec,
                               chunk_size=query_chunk,
                               skip_padding=not cfg.no_skip_padding)
  else:
    # On a mesh these are this process's rows (`_private_rows`).
    answer = functools.partial(parallel.sharded_noisy_targets, spec,
                               mesh=mesh, chunk_size=query_chunk,
                               skip_padding=not cfg.no_skip_padding)

  @jax.jit
  def query_fn(data, secret_q, q, arrays):
    params, aug_params = plan_q.with_arrays(arrays).params(k_query, q)
    return answer(data, params, aug_params, secret_q)

  # The pool's arrays (centres, trained members) as arguments: the
  # program is the same in every run of these shapes (distill.Hoisted).
  pool_arrays = distill.as_arguments(plan_q.arrays())
  targets = []
  for q in tqdm(range(cfg.num_queries), desc="private queries",
                disable=cfg.quiet):
    sums, overflow = query_fn(private_data, jax.random.fold_in(secret, q), q,
                              pool_arrays)
    mechanisms.check_overflow(overflow)
    targets.append(sums)
  return jnp.stack(targets), spec


def query(run: Run, budget: Budget, sizes, plan_q: distill.QueryPlan,
          secret: jax.Array) -> Queries | None:
  cfg, t0 = run.cfg, time.time()
  if not run.plan.feature_matching:
    return None
  spec = mechanisms.QuerySpec(
      embed_fn=plan_q.embed_fn, num_classes=run.num_classes,
      clip_norm=clip_norm(cfg),
      noise_multiplier=budget.mechanism("feature_matching").noise_multiplier,
      sampling_rate=cfg.sampling_rate,
      capacity=0,  # answer_queries sets it (a resumed run: the saved one)
      strategy=cfg.strategy)
  if run.done("query"):
    saved, _, capacity = run.load("query")
    targets = jnp.asarray(saved["targets"])
    spec = dataclasses.replace(spec, capacity=capacity)
  else:
    targets, spec = answer_queries(cfg, spec, plan_q, run.keys.query,
                                   run.x_train, run.ds, secret, run.mesh,
                                   sizes, budget.log_tail)
    run.save("query", arrays={"targets": targets}, info=spec.capacity)
  run.timed("queries_s", t0)
  return Queries(targets, spec)


def clip_norm(cfg: Config) -> float:
  """C of the queries and of the synthetic side (inf for dm)."""
  return math.inf if cfg.method == "dm" else cfg.clip_norm


# ---------------------------------------------------------------------------
# 6. expert: pretrained on G (a pool member, free), fine-tuned with DP-SGD.


@dataclasses.dataclass(frozen=True)
class Expert:
  params: Any
  info: dict   # test accuracies, for information
  loss: Callable  # (decoded, classes) -> the alignment term of L


def expert(run: Run, budget: Budget, sizes, pool_: Pool, gen: Generated,
           secret: jax.Array) -> Expert | None:
  cfg, ds, t0 = run.cfg, run.ds, time.time()
  if not run.plan.expert:
    return None
  model = extractor_model(run)
  if run.done("expert"):
    _, trees, info = run.load("expert")
    params = trees["params"]
  else:
    with tqdm(total=cfg.expert_steps, desc="DP expert (DP-SGD)",
              disable=cfg.quiet) as bar:
      params = expert_lib.dp_finetune(
          pool_.trained, model, run.x_train, ds.y_train,
          cfg=expert_config(cfg),
          noise_multiplier=budget.mechanism("expert").noise_multiplier,
          secret=secret, progress=bar.update, mesh=run.mesh,
          microbatch=cfg.microbatch or expert_lib.default_microbatch(),
          skip_padding=not cfg.no_skip_padding,
          num_rows=sizes.padded_rows,
          expected_size=sizes.total_estimate,
          log_tail=_tail(budget.log_tail))
    info = {} if not len(ds.y_test) else {  # a train-only dataset: none
        "test_accuracy_pretrained_on_generated": expert_lib.accuracy(
            pool_.trained, model, run.x_test, ds.y_test),
        "test_accuracy_after_dp_finetuning": expert_lib.accuracy(
            params, model, run.x_test, ds.y_test),
        "note": "expert test accuracy is logged for information only"}
    run.save("expert", trees={"params": params}, info=info)
  p_ref = expert_lib.reference_distributions(params, model, gen.class_major,
                                             cfg.expert_tau)
  loss = distill.Hoisted(  # params and p_ref: arguments of the jitted step
      lambda arrays, dec, classes: cfg.expert_weight
      * expert_lib.alignment_loss(arrays[0], model, dec, arrays[1],
                                  tau=cfg.expert_tau, beta=cfg.expert_beta,
                                  classes=classes), (params, p_ref))
  run.timed("expert_s", t0)
  return Expert(params, info, loss)


# ---------------------------------------------------------------------------
# 7. init: the synthetic set's starting images (K, IPC, H, W, C).


def init(run: Run, gen: Generated | None, pool_: Pool | None,
         plan_q: distill.QueryPlan) -> jax.Array:
  cfg, plan, ds, t0 = run.cfg, run.plan, run.ds, time.time()
  k, f, m = run.num_classes, plan.factor, cfg.ipc
  if run.done("init"):
    images = jnp.asarray(run.load("init")[0]["images"])
  else:
    if plan.init == "generated":  # k-means pick of generated data
      embed_net = models.embed_fn(extractor_model(run))
      embed = lambda xb: embed_net(pool_.trained, xb)
      chosen = init_lib.select_per_class(run.keys.init, embed,
                                         gen.class_major, m * f * f)
      images = init_lib.encode(chosen, f)
    elif plan.init == "real":  # NOT private: starts from real images
      xs, _ = evaluate.random_real_subset(run.keys.init, run.x_train,
                                          ds.y_train, m * f * f, k)
      images = init_lib.encode(
          jnp.asarray(xs.reshape(k, -1, *run.image_shape)), f)
    else:
      images = jax.random.normal(run.keys.init, (k, m, *run.image_shape))
    run.save("init", arrays={"images": images})
  run.timed("init_s", t0)
  return images


# ---------------------------------------------------------------------------
# 8. distill: the pixels against the cached targets (post-processing).


@dataclasses.dataclass(frozen=True)
class Distilled:
  stored: np.ndarray    # (K * IPC, H, W, C) normalised
  decoded: np.ndarray   # (K * IPC * f^2, H, W, C) normalised
  y_stored: np.ndarray
  y_decoded: np.ndarray
  losses: np.ndarray


def distill_loop(cfg: Config, store, state, step, targets, counts, key):
  """cfg.steps image updates from `state`; with a store, the state is
  saved every cfg.checkpoint_every steps and at the end, and a saved one
  is resumed from. Returns (state, the loss of every step)."""
  name, start, before = "distill", time.time(), 0.0
  losses: list = []
  if store is not None and store.finished(name):
    arrays, trees, _ = store.load(name, targets={"state": state})
    state, losses = trees["state"], list(arrays["losses"])
    before = store.saved_timings().get("distillation_s", 0.0)
  with tqdm(total=cfg.steps, initial=len(losses), desc="distillation",
            disable=cfg.quiet) as bar:
    while len(losses) < cfg.steps:
      state, loss = step(state, targets, counts, key)
      losses.append(loss)
      bar.update(1)
      n = len(losses)
      if store is not None and (n == cfg.steps or (
          cfg.checkpoint_every and n % cfg.checkpoint_every == 0)):
        # The time to this checkpoint, over the processes that ran it
        # (written first: a kill between the two writes overstates it by
        # one save at most, where after the save it lost it).
        store.save_timings({"distillation_s": before + time.time() - start})
        store.save(name, arrays={"losses": _host(losses)},
                   trees={"state": state}, info={"step": n})
  return state, _host(losses)


def _host(values: list) -> np.ndarray:
  """Device scalars to one float32 array, copied without a compiled stack
  (jnp.stack of n scalars compiles anew for every n)."""
  return np.asarray(jax.device_get(values), np.float32).reshape(-1)


def distill_class_chunk(num_classes: int, per_class: int, image_shape,
                        width: int) -> int | None:
  """Classes per gradient chunk of the distillation step (None: all at
  once): whole classes of `per_class` decoded images, split into as many
  chunks as evaluate.chunk_rows splits their rows into."""
  total = num_classes * per_class
  rows = evaluate.chunk_rows(total, image_shape[:2], width)
  if rows >= total:
    return None
  chunks = -(-total // rows)
  return -(-num_classes // chunks)


def _overflow_causes(cfg: Config, expert: bool) -> str:
  """The options whose extreme values overflow the distillation in
  float32, for its warning and error."""
  causes = [f"a very large --lr-img ({cfg.lr_img})"]
  if not clipping.unclipped(clip_norm(cfg)):
    causes.insert(0, "a clip norm far above the features' scale "
                  f"(--clip-norm {cfg.clip_norm})")
  if expert:
    causes.append(f"the expert term (--expert-weight {cfg.expert_weight}, "
                  f"--expert-lr {cfg.expert_lr}, --expert-tau "
                  f"{cfg.expert_tau})")
  return " or ".join(causes)


def _warn_unless_finite(losses: np.ndarray, cfg: Config,
                        expert: bool) -> None:
  """A loss that overflowed float32 (inf or nan) moved the images nowhere
  useful at that step; the run goes on, and says so (images that became
  non-finite are refused: `_check_images_finite`)."""
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    warnings.warn(
        f"the distillation loss was not finite at {bad.size} of "
        f"{len(losses)} steps (first at step {bad[0]}): float32 overflowed,"
        f" for example from {_overflow_causes(cfg, expert)}; those steps "
        "did not follow the targets", RuntimeWarning, stacklevel=2)


def _check_images_finite(images: np.ndarray, cfg: Config,
                         expert: bool) -> None:
  """Refuses to publish a distilled set with non-finite pixels (an expert
  trained at --expert-lr 1e30 made every pixel nan, and the run had
  published them with status 0)."""
  bad = ~np.isfinite(images)
  if bad.any():
    raise ConfigError(
        f"the distilled images are not finite ({bad.mean():.0%} of their "
        f"pixels are inf or nan): float32 overflowed, for example from "
        f"{_overflow_causes(cfg, expert)}; nothing is published, but this "
        "run's releases (the budget of its privacy plan) were drawn and "
        "are spent: a rerun with smaller values draws them again, and the "
        "runs compose")


def distill_images(run: Run, plan_q: distill.QueryPlan,
                   queries: Queries | None, expert_: Expert | None,
                   images: jax.Array, sizes) -> Distilled:
  cfg, t0 = run.cfg, time.time()
  k, f, m = run.num_classes, run.plan.factor, cfg.ipc
  losses = np.zeros(0)
  if queries is not None:
    opt = distill.image_optimizer(cfg.lr_img)
    step = distill.make_step(
        plan_q, opt, clip_norm=clip_norm(cfg),
        decode=lambda s: init_lib.decode(s, f),
        extra_loss=None if expert_ is None else expert_.loss,
        class_chunk=distill_class_chunk(k, m * f * f, run.image_shape,
                                        cfg.extractor_width))
    counts = jnp.asarray(sizes.expected_counts(cfg.sampling_rate),
                         jnp.float32)
    if run.done("distill"):  # a checkpoint: the earlier processes' time
      run.continued.add("distill")
      run.timings["distillation_s"] = run.timings.get(
          "distillation_s", 0.0) + run.store.saved_timings().get(
              "distillation_s", 0.0)
    state, losses = distill_loop(cfg, run.store,
                                 distill.init_state(images, opt), step,
                                 queries.targets, counts, run.keys.query)
    images = state.images
    _warn_unless_finite(np.asarray(losses), cfg, expert_ is not None)
    _check_images_finite(np.asarray(images), cfg, expert_ is not None)
  shape = run.image_shape
  out = Distilled(
      stored=np.asarray(images).reshape(k * m, *shape),
      decoded=np.asarray(init_lib.decode(images, f)).reshape(-1, *shape),
      y_stored=np.repeat(np.arange(k, dtype=np.int32), m),
      y_decoded=np.repeat(np.arange(k, dtype=np.int32), m * f * f),
      losses=losses)
  run.timed("distillation_s", t0)
  return out


# ---------------------------------------------------------------------------
# 9. evaluate: models trained on the distilled set, tested on real data.


def _evaluate(key, x, y, x_test, y_test, k, ecfg, quiet, desc, mesh):
  steps = ecfg.num_models * evaluate.training_steps(len(x), ecfg)
  t = time.time()
  with tqdm(total=steps, desc=desc, disable=quiet) as bar:
    result = evaluate.evaluate(key, x, y, x_test, y_test, num_classes=k,
                               cfg=ecfg, progress=bar.update, mesh=mesh)
  result["seconds"] = time.time() - t
  return result


def evaluate_set(run: Run, distilled: Distilled,
                 expert_: Expert | None) -> dict | None:
  cfg, ds, t0 = run.cfg, run.ds, time.time()
  if cfg.no_eval:
    return None
  k, quiet, mesh = run.num_classes, cfg.quiet, run.train_mesh
  options = {n: getattr(cfg, n) for n in (
      "eval_models", "eval_epochs", "eval_width", "references")}
  saved = run.load("evaluate")[2] if run.done("evaluate") else None
  if saved and saved.get("options") == options and isinstance(
      saved.get("metrics"), dict):  # else evaluated again (post-processing)
    metrics = copy.deepcopy(saved["metrics"])
  else:
    ecfg = eval_config(cfg, run.plan.depth)
    metrics = _evaluate(run.keys.eval, distilled.decoded, distilled.y_decoded,
                        run.x_test, ds.y_test, k, ecfg, quiet, "evaluation",
                        mesh)
    if cfg.references:
      xr, yr = evaluate.random_real_subset(run.keys.ref, run.x_train,
                                           ds.y_train, cfg.ipc, k)
      metrics["reference_random_real_subset"] = _evaluate(
          run.keys.eval, xr, yr, run.x_test, ds.y_test, k, ecfg, quiet,
          "reference: random real subset", mesh)
      # A class smaller than IPC gives all of its images (not private:
      # the reference reads the real data).
      metrics["reference_random_real_subset"]["images_per_class"] = (
          np.bincount(yr, minlength=k).tolist())
      metrics["reference_full_training_set"] = _evaluate(
          run.keys.eval, run.x_train, ds.y_train, run.x_test, ds.y_test, k,
          dataclasses.replace(ecfg, epochs=max(1, cfg.eval_epochs // 10)),
          quiet, "reference: full training set", mesh)
      metrics["references_note"] = (
          "references are NOT private: they train on real training images")
    # A copy: what is added to `metrics` later (timings, memory) is not
    # this stage's result and stays out of the stage record.
    run.save("evaluate", info={"options": options,
                               "metrics": copy.deepcopy(metrics)})
    run.timed("evaluation_s", t0)
  if expert_ is not None:
    metrics["expert"] = expert_.info
  losses = distilled.losses
  metrics.update(method=cfg.method,
                 first_loss=float(losses[0]) if len(losses) else None,
                 last_loss=float(losses[-1]) if len(losses) else None,
                 distillation_losses=[float(v) for v in losses])
  return metrics


# ---------------------------------------------------------------------------
# 10. report: privacy.json's content.


def public_metadata(ds: data_lib.Dataset,
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
        "check with N's upper bound) reads only that release (class_sizes)")
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
      "not protected either: the stage times (timings_s) and peak memory "
      "(peak_rss_mb) in the run's files, which grow with N; and input "
      "validation, a precondition: a training set with an empty class, a "
      "label outside 0..K-1 or a pixel outside the image range is refused "
      "before any release, and the refusal is not private",
  ]
  return out


def report(run: Run, budget: Budget, sizes,
           queries: Queries | None) -> dict:
  cfg, plan = run.cfg, run.plan
  reasons = planning.nonprivate_reasons(cfg, plan)
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
  if budget.events:
    abort = {"events": budget.events,
             "probability_per_event": math.exp(budget.log_tail),
             "what": "a class above its released upper bound (K + 1 bounds)"
             " and a Poisson batch above its padded capacity (per query,"
             " per expert step); each aborts the run: the release it"
             " occurs in is withheld and never used (those saved before it"
             " are kept, and --resume reuses them), so the run differs from"
             " one that never aborts only on these events",
             "delta_added": accounting.failure_delta(
                 cfg.epsilon, budget.events, budget.log_tail)}
    if queries is not None:
      abort["query_capacity"] = queries.spec.capacity
  if plan.centre == "generated":
    notes.append("Each query clips embeddings minus a public centre (the "
                 "generated data's mean embedding under that query's "
                 "extractor and augmentation): L2 sensitivity still C")
  if plan.generator_mechanisms:
    notes.append(f"generator {plan.generator}: its own release's noisy "
                 "class counts refine the normalising class sizes")
  for m in plan.fixed:
    notes.append(
        f"external generated data ({plan.generator}): declared by the user "
        f"as {m.steps} Gaussian release(s) of noise multiplier "
        f"{m.noise_multiplier:.6g} at sampling rate {m.sampling_rate:g}, "
        f"composed as the mechanism {m.name}; the declaration is not "
        "checked")
  gen = plan.generator or ""
  if gen.startswith("pe:") and plan.generator_mechanisms and (
      cfg.pe_warm_start > 0):
    m = cfg.pe_warm_weight
    notes.append(f"PE's warm start: one release of class sums of norm-1 "
                 f"random features (L2 sensitivity 1) at the generator's "
                 f"noise multiplier / sqrt({m}), accounted as {m} of the "
                 f"generator's {cfg.pe_iterations + m} Gaussian "
                 "releases")
  if gen.startswith("pe:nearest:"):
    notes.append(f"PE's image API draws from the collection "
                 f"{gen[len('pe:nearest:'):]}, assumed public (not checked: "
                 "private images in it would be published)")
  elif gen.startswith("pe:user"):
    notes.append("PE's image API is the user's own, assumed public with "
                 "every model and image it uses (not checked)")
  elif gen.startswith("pe:text") and cfg.pe_font_dir:
    notes.append(f"the text simulator also uses the fonts of "
                 f"{cfg.pe_font_dir}, assumed public")
  privacy = accounting.privacy_report(
      budget.mechs, target_epsilon=cfg.epsilon, delta=cfg.delta,
      private=not reasons, public_metadata=public_metadata(run.ds, sizes),
      notes=notes, external=plan.external, split=budget.split,
      abort_events=abort, nonprivate_reasons=reasons)
  privacy["method"] = cfg.method
  privacy["clip_norm"] = None if cfg.method == "dm" else cfg.clip_norm
  privacy["class_sizes"] = None if sizes is None else sizes.report()
  return privacy
