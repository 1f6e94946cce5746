"""One run of the method, from a dataset and a `Config` to a `RunResult`.

`run` is the composition of the stages of stages.py (ALGORITHM.md):
calibrate (reads no data) -> class_sizes (M_N) -> generate (M_G) -> pool
-> query (M_F) -> expert (M_E) -> init -> distill -> evaluate -> report;
only the four mechanisms read the private training set. What a
configuration means before any data is read is planning.py (re-exported
here). `write_outputs` publishes the files as one set (outputs.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from dpgeng_jax import data as data_lib
from dpgeng_jax import generators, mechanisms, outputs, parallel, stages
from dpgeng_jax import init as init_lib
from dpgeng_jax import estimate as estimate_lib
from dpgeng_jax import presets, progress as progress_lib, report as report_lib
from dpgeng_jax.generators.external import External
from dpgeng_jax import planning, store as store_lib
from dpgeng_jax.config import Config
from dpgeng_jax.errors import ConfigError, DataError
# The plan of a configuration (reads no data), re-exported: pipeline is
# the module users import.
from dpgeng_jax.planning import (Plan, abort_events, delta_split,  # noqa: F401
                                 mechanisms_for, nonprivate_reasons,
                                 plan_budget, resolve, validate_config)

__all__ = ["OUTPUT_FILES", "Plan", "RunResult", "abort_events",
           "delta_split", "mechanisms_for", "nonprivate_reasons",
           "output_dir", "plan_budget", "resolve", "run", "stage_store",
           "validate_config", "write_outputs"]

STAGES_DIR = "stages"  # the saved stage results (store.py), published too
OUTPUT_FILES = ("distilled.npz", "privacy.json", "config.json",
                *report_lib.FIGURES, report_lib.REPORT, "metrics.json",
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
    x_generated, y_generated: the DP-generated images used and their
      labels (None if none).
    generator_history: (T + 1, K, m, H, W, C) images of PE's population
      before the first and after every iteration (None for other
      generators).
    x_init: the stored images before distillation.
    losses: the distillation loss per step (empty without queries); also
      in metrics, which --no-eval does not make.
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
  y_generated: np.ndarray | None = None
  generator_history: np.ndarray | None = None
  x_init: np.ndarray | None = None
  losses: np.ndarray | None = None


# ---------------------------------------------------------------------------
# Validation (before anything is computed or written).


def output_dir(out: str, overwrite: bool, resume: bool = False,
               inputs: tuple[str, ...] = ()) -> outputs.RunDirectory:
  """--out as a RunDirectory for this run's output names (not yet open:
  `open()` or `with` creates, locks and checks it). `resume`: continue the
  unfinished run staged there; `inputs`: the run's input paths
  (`input_paths`), which publishing must not replace."""
  return outputs.RunDirectory(out, overwrite=overwrite, names=OUTPUT_FILES,
                              resume=resume, inputs=inputs,
                              prepare={STAGES_DIR: store_lib.prepare_published})


def input_paths(cfg: Config) -> tuple[str, ...]:
  """The files and folders a run reads by a path the user gave: an npz
  dataset, external generated data, a pe:nearest collection, a font
  folder, a TFDS data folder."""
  paths = []
  for spec, prefix in ((cfg.dataset, "npz:"), (cfg.generator, "npz:"),
                       (cfg.generator, "pe:nearest:")):
    if spec.startswith(prefix):
      paths.append(spec[len(prefix):])
  paths += [p for p in (cfg.pe_font_dir, cfg.data_dir) if p]
  return tuple(paths)


def stage_store(run_dir: outputs.RunDirectory) -> store_lib.StageStore:
  """Where a run's stages are saved: inside its staging directory."""
  return store_lib.StageStore(os.path.join(run_dir.staging, STAGES_DIR))


# ---------------------------------------------------------------------------
# The run.


def load_data(cfg: Config, require_test: bool | None = None
              ) -> data_lib.Dataset:
  """The dataset that cfg names, loaded as a run loads it (a train-only
  npz only where require_test is False, by default with --no-eval).
  An error names the data options a --preset supplied (the user gave
  none of them)."""
  try:
    return data_lib.load_dataset(
        cfg.dataset, data_dir=cfg.data_dir or None,
        num_classes=cfg.num_classes or None, label_feature=cfg.label_feature,
        image_size=cfg.image_size,
        normalisation=presets.normalisation_name(cfg),
        require_test=(not cfg.no_eval if require_test is None
                      else require_test))
  except data_lib.DataError as e:
    used = {k: v for k, v in (presets.values(cfg.preset) if cfg.preset
                              else {}).items()
            if k in ("num_classes", "label_feature", "image_size")
            and getattr(cfg, k) == v}
    if not used:
      raise
    raise data_lib.DataError(
        f"{e} (from --preset {cfg.preset}: " + ", ".join(
            f"{k}={v!r}" for k, v in used.items())
        + "; give the option to override it)") from e


def run(cfg: Config, dataset: data_lib.Dataset | None = None,
        log: Callable[[str], Any] | None = print,
        store: store_lib.StageStore | None = None,
        generator: generators.DPGenerator | None = None) -> RunResult:
  """Runs the configured method: the stages of stages.py in order.

  Private data is read only by the mechanisms: the class-count release
  (M_N), the generator's releases (M_G), the feature-matching
  queries (M_F) and the expert's DP-SGD (M_E). Every later use of the
  class sizes reads M_N's release (or sizes the user declared public).

  With a `store` (store.StageStore) every stage's result is saved as soon
  as it is done; a store that already holds stages (a killed run, checked
  against this configuration and dataset) is resumed: finished stages are
  loaded, not run, so no saved release is drawn again.

  `generator`: a generator plug-in (`generators.DPGenerator`, for example
  `generators.pe.PrivateEvolution(my_api)` over the user's own image API)
  instead of the one `cfg.generator` names.

  `log` is accepted and unused (kept for callers that pass it): progress
  goes through tqdm bars, silenced by cfg.quiet.
  """
  del log  # progress goes through tqdm (disabled by cfg.quiet)
  t0 = time.time()
  validate_config(cfg)
  if jax.process_count() > 1 and (cfg.resume or (
      store is not None and store.exists())):
    # Runs over several processes save no stages: resumed so, every
    # mechanism would be drawn again with fresh noise beside the saved
    # (and then published) releases of the killed run.
    raise ConfigError(
        "--resume continues a run in one process only: a run over several "
        "processes saves no stages, so it would draw every release again "
        "beside the saved ones; resume without --num-processes")
  ds = dataset.check() if dataset is not None else load_data(cfg)
  if cfg.num_classes and dataset is not None and (
      ds.num_classes != cfg.num_classes):
    raise ConfigError(f"num_classes={cfg.num_classes} but the dataset has "
                      f"{ds.num_classes} classes")
  # A generator given from Python overrides cfg's generator options:
  # config.json records what ran.
  given = None if generator is None else _describe(generator)
  if generator is None and resolve(cfg).uses_generated:
    generator = generators.for_config(cfg)
  plan = resolve(cfg, tuple(ds.image_shape), generator)
  _check_before_private_work(cfg, plan, ds, generator)
  if not cfg.quiet:
    for line in planning.unused_options(cfg, plan):
      print(f"note: {line}", file=sys.stderr, flush=True)
  # The cost estimate counts N's examples. N is public only where the
  # class sizes are (declared public, a run that is not private, or one
  # that reads no private data): then it is printed now; otherwise once
  # the count release gives N~ (the true N printed or saved would undo
  # M_N: one example tells two neighbouring datasets apart).
  # The machine's rate is measured (or read) now, before any release.
  rate = estimate_lib.rate_for(plan, ds.image_shape)
  est = None
  if not plan.count_release:
    est = _estimate(cfg, plan, ds, ds.num_train, rate)
  prog = progress_lib.Progress(est and est["stages_s"], cfg.quiet)
  if jax.process_count() > 1:
    store = None  # stages are saved by single-process runs only
  if store is not None:
    data_id = store_lib.fingerprint(ds.x_train, ds.y_train, ds.num_classes,
                                    (ds.mean, ds.std))
    if store.exists():
      store.check(_resume_view(cfg), data_id, planning.choices(plan))
      for name, why in store.drop_damaged():
        warnings.warn(
            f"the saved {name} stage is damaged ({why}); it holds no "
            "private release and is computed again", stacklevel=2)
    else:
      store.start(_resume_view(cfg), data_id, planning.choices(plan))

  # Keys: the public key governs init, extractors, augmentation and the
  # generator's network; the secret key (OS entropy) governs sampling and
  # noise, is given to the private stages only and is never saved.
  keys = stages.PublicKeys(*jax.random.split(jax.random.key(cfg.seed), 6))
  secret = (mechanisms.deterministic_secret_key(cfg.seed)
            if cfg.deterministic else mechanisms.secret_key())
  # One secret for all processes (noise is added once, with one value).
  secrets = stages.Secrets(*jax.random.split(parallel.broadcast_key(secret),
                                             4))
  del secret
  mesh = parallel.data_mesh(cfg.devices or None)
  if parallel.num_shards(mesh) == 1 and jax.process_count() == 1:
    mesh = None  # the unsharded code path
  r = stages.Run(cfg, plan, ds, ds.normalize(ds.x_train),
                 ds.normalize(ds.x_test), mesh, parallel.local_mesh(mesh),
                 keys, store)
  prog.skip = frozenset(n for n, _ in progress_lib.STAGES if r.done(n))

  prog.start("calibrate")
  budget = stages.calibrate(r)
  prog.start("class_sizes")
  sizes = stages.class_sizes(r, budget, secrets.counts)
  if est is None:
    est = _estimate(cfg, plan, ds, max(1, round(sizes.total_estimate)),
                    rate)
    prog.estimate_s = dict(est["stages_s"])
  prog.start("generate")
  gen, sizes = stages.generate(r, budget, sizes, secrets.gen, generator)
  prog.start("pool")
  pool = stages.pool(r, gen)
  plan_q = stages.query_plan(r, pool, gen)
  prog.start("query")
  queries = stages.query(r, budget, sizes, plan_q, secrets.query)
  prog.start("expert")
  expert = stages.expert(r, budget, sizes, pool, gen, secrets.expert)
  del secrets  # no later stage reads private data
  prog.start("init")
  images = stages.init(r, gen, pool, plan_q)
  # Copied now: distillation donates (overwrites) the image buffers.
  x_init = np.asarray(images).reshape(-1, *ds.image_shape)
  prog.start("distill")
  distilled = stages.distill_images(r, plan_q, queries, expert, images, sizes)
  prog.start("evaluate")
  metrics = stages.evaluate_set(r, distilled, expert)
  privacy = stages.report(r, budget, sizes, queries)

  timings = dict(r.stage_timings(), total_s=time.time() - t0)
  if metrics is not None:
    metrics["timings_s"] = timings
    if r.loaded or r.continued:
      metrics["resumed"] = {
          "stages_loaded": sorted(r.loaded),
          "stages_continued": sorted(r.continued),
          "note": "the loaded stages' timings are those of the process "
                  "that computed them, a continued stage's the sum over "
                  "its processes; total_s is this process's"}
    metrics["peak_rss_mb"] = dict(r.peak_rss_mb)
    metrics["private"] = privacy["private"]
  config = cfg.to_dict()
  config.update(resolved=dataclasses.asdict(plan), dataset_name=ds.name,
                poisson_capacity=queries.spec.capacity if queries else None,
                normalisation={"mean": np.asarray(ds.mean).tolist(),
                               "std": np.asarray(ds.std).tolist()},
                versions=_versions(), timings_s=timings,
                generator_given=given,
                peak_rss_mb=dict(r.peak_rss_mb),
                preset_record=presets.record(cfg),
                estimate={"stages_s": est["stages_s"], "flops": est["flops"],
                          "total_s": est["total_s"],
                          "matmul_flops_per_s":
                              est["rate"]["matmul_flops_per_s"],
                          "device": est["rate"]["device"]})
  return RunResult(
      x=_denormalize(ds, distilled.stored), y=distilled.y_stored,
      privacy=privacy, metrics=metrics, config=config, factor=plan.factor,
      x_decoded=_denormalize(ds, distilled.decoded),
      y_decoded=distilled.y_decoded,
      x_generated=None if gen is None else gen.x,
      y_generated=None if gen is None else gen.y,
      generator_history=None if gen is None else gen.extra.get("history"),
      x_init=_denormalize(ds, x_init), losses=np.asarray(distilled.losses))


def _distilled_state_bytes(num_classes: int, ipc: int, image_shape,
                           optimised: bool = True) -> int:
  """float32 bytes of the distilled images and, where they are
  `optimised`, their gradient and Adam's two moments: the least the run
  holds (before any activation)."""
  return (4 if optimised else 1) * 4 * num_classes * ipc * int(
      np.prod(image_shape))


def _check_before_private_work(cfg: Config, plan, ds: data_lib.Dataset,
                               generator) -> None:
  """Checks that need the data's public shape, before any private stage
  (external generated data is read and checked here)."""
  k, f, m = ds.num_classes, plan.factor, cfg.ipc
  h, w = ds.image_shape[:2]
  held = _distilled_state_bytes(k, m, ds.image_shape,
                                optimised=cfg.method != "generator")
  memory = data_lib.physical_memory()
  if held > memory:
    raise ConfigError(
        f"ipc {m} for {k} classes of {'x'.join(map(str, ds.image_shape))} "
        f"images: the distilled set and its optimiser state alone need "
        f"{held / 2 ** 30:.3g} GiB, more than this machine's "
        f"{memory / 2 ** 30:.3g} GiB; lower --ipc")
  _check_array_sizes(cfg, plan, ds, memory)
  if not cfg.no_eval and not len(ds.y_test):
    raise ConfigError("the dataset has no test split: evaluation needs one "
                      "(or run with no_eval, --no-eval)")
  if not init_lib.tiles(h, w, f):
    raise ConfigError(
        f"--factor {f} tiles {f} x {f} images of {h}/{f} x {w}/{f} pixels "
        f"into each stored image, which needs the height and width of the "
        f"images ({h}x{w}) to be multiples of {f}; use --factor 1")
  if min(h, w) // f < 2:
    raise ConfigError(
        f"--factor {f} on {h}x{w} images leaves tiles of {h // f}x{w // f} "
        "pixels, which hold one colour each (images need 2 pixels a side); "
        "use --factor 1")
  if plan.init == "real" and m * f * f > int(np.min(ds.class_counts)):
    # Only in runs that are not private (real images are released).
    raise ConfigError(
        f"real-image initialisation needs ipc * factor^2 = {m * f * f} "
        f"images of every class; the smallest class has "
        f"{int(np.min(ds.class_counts))}")
  per_class = cfg.generated_per_class
  if isinstance(generator, External):
    y_ext = generator.load(tuple(ds.image_shape), k)[1]
    per_class = int(np.min(np.bincount(y_ext, minlength=k)))
  preflight = getattr(generator, "preflight", None)
  if plan.uses_generated and preflight is not None:
    # The generator's options, checked before the count release: a run
    # refused after it would have spent a release (and a rerun composes).
    try:
      preflight(tuple(ds.image_shape), k)
    except (ValueError, OSError) as e:
      if isinstance(e, DataError):
        raise
      raise ConfigError(f"generator {plan.generator}: {e}") from e
  if plan.init == "generated":  # the k-means pick of generated data
    if per_class < m * f * f:
      raise ConfigError(
          f"k-means initialisation needs >= {m * f * f} generated images "
          f"per class (ipc * factor^2), the smallest class has "
          f"{per_class}; " + (
              f"{plan.generator} holds too few: add images or lower --ipc"
              if isinstance(generator, External)
              else "raise --generated-per-class"))


def _check_array_sizes(cfg: Config, plan, ds: data_lib.Dataset,
                       memory: float) -> None:
  """Refuses, before any private stage, sizes of which one array alone
  exceeds the machine's memory (a ConvNet of width 200000 ended in an
  out-of-memory traceback, 5 x 10^7 generated images per class in a C++
  abort, some after releases were spent)."""
  pixels = int(np.prod(ds.image_shape))
  k = ds.num_classes

  def kernel(width):  # bytes of a float32 3x3 kernel, width -> width
    return 9 * width ** 2 * 4
  sizes = [("--extractor-width", cfg.extractor_width,
            "a 3x3 convolution kernel of the extractors",
            kernel(cfg.extractor_width))]
  if not cfg.no_eval:
    sizes.append(("--eval-width", cfg.eval_width,
                  "a 3x3 convolution kernel of the evaluation models",
                  kernel(cfg.eval_width)))
  builtin = plan.uses_generated and not plan.external
  if builtin:
    sizes.append(("--generated-per-class", cfg.generated_per_class,
                   "the generated set", k * cfg.generated_per_class
                   * pixels * 4))
  if builtin and cfg.generator.startswith("pe"):
    sizes += [("--pe-population", cfg.pe_population,
               "the Private Evolution population",
               k * cfg.pe_population * pixels * 4),
              ("--pe-width", cfg.pe_width,
               "a 3x3 convolution kernel of the PE embedding",
               kernel(cfg.pe_width))]
  if builtin and cfg.generator == "merf":
    sizes.append(("--generator-features", cfg.generator_features,
                  "DP-MERF's random-feature matrix",
                  cfg.generator_features * pixels * 4))
  for option, value, what, need in sizes:
    if need > memory:
      raise ConfigError(
          f"{option} {value}: {what} alone needs {need / 2 ** 30:.3g} GiB, "
          f"more than this machine's {memory / 2 ** 30:.3g} GiB; lower it")


def _estimate(cfg: Config, plan, ds: data_lib.Dataset, num_train: int,
              rate: dict) -> dict:
  """The run's cost estimate for `num_train` examples (a public N: see
  run) at the machine `rate`, printed unless cfg.quiet."""
  est = estimate_lib.estimate(cfg, plan, ds.image_shape, num_train,
                              len(ds.y_test), ds.num_classes, rate)
  if not cfg.quiet:
    print(estimate_lib.format_table(est), flush=True)
  return est


def _describe(generator) -> dict:
  """What config.json says of a generator given from Python (its options
  replace the configuration's generator options)."""
  out = {"name": getattr(generator, "name", type(generator).__name__),
         "type": type(generator).__name__,
         "note": "given from Python: the configuration's generator options "
                 "were not used"}
  options = getattr(generator, "cfg", None)
  if dataclasses.is_dataclass(options):
    out["options"] = dataclasses.asdict(options)
  return out


def _resume_view(cfg: Config) -> dict:
  """The configuration a resumed run is checked against (store.check)."""
  return json.loads(json.dumps(cfg.to_dict()))


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


def write_outputs(result: RunResult, out: str, overwrite: bool = False,
                  run_dir: outputs.RunDirectory | None = None,
                  store: store_lib.StageStore | None = None) -> list[str]:
  """Writes the run's files as one published set (outputs.RunDirectory):
  staged, then moved into `out` with manifest.json last. `run_dir`: a
  directory opened (and locked) before the run; otherwise one is opened
  here. `store`: the run's saved stages, published as out/stages."""
  if run_dir is None:
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in result.config.items() if k in known})
    with output_dir(out, overwrite, inputs=input_paths(cfg)) as rd:
      return write_outputs(result, out, overwrite, rd)
  if store is not None and store.exists():
    # Published without the data's fingerprint: the record is rewritten
    # just before the stages move (store.prepare_published), which --resume
    # needs until then.
    run_dir.adopt(STAGES_DIR)
  decoded = {} if result.x_decoded is None else {
      "x_decoded": result.x_decoded, "y_decoded": result.y_decoded}
  w = run_dir.write
  w("distilled.npz", lambda f: np.savez(f, x=result.x, y=result.y,
                                        factor=np.int32(result.factor),
                                        **decoded), mode="wb")
  w("privacy.json", _json(result.privacy))
  w("config.json", _json(result.config))
  pngs = report_lib.figures(
      x=result.x, y=result.y, factor=result.factor,
      x_decoded=result.x_decoded, x_init=result.x_init,
      x_generated=result.x_generated, y_generated=result.y_generated,
      history=result.generator_history, metrics=result.metrics,
      losses=result.losses, loss_period=result.config.get("num_queries"))
  for name, data in pngs.items():
    w(name, lambda f, d=data: f.write(d), mode="wb")
  w(report_lib.REPORT, lambda f: f.write(report_lib.html(
      result.privacy, result.config, result.metrics, pngs)))
  if result.metrics is not None:
    w("metrics.json", _json(result.metrics))
  return run_dir.publish({"tool": "dpgeng_jax", "private":
                          bool(result.privacy.get("private"))})
