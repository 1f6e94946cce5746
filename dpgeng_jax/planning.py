"""What a configuration means before any data is read: validation, the
resolved plan (which stages run, with what), the private mechanisms with
their calibrated noise, the delta split and abort events, and the reasons a
run would not be private. `dpgeng plan` is this module alone.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from dpgeng_jax import (accounting, augment, clipping, generators, models,
                        noise, presets)
from dpgeng_jax import data as data_lib
from dpgeng_jax import init as init_lib
from dpgeng_jax.config import Config, METHODS
from dpgeng_jax.errors import ConfigError
from dpgeng_jax.generators.apis.text import MAX_MARKS
from dpgeng_jax.generators.embeddings import EMBEDDINGS
from dpgeng_jax.generators.pe import SOFT_MAX_K

MIN_SHARE, MAX_SHARE = 1e-6, 1e6  # budget shares, relative weights


# Options naming a file or folder: a pathlib.Path is as good as a str.
_PATHS = ("data_dir", "out", "pe_font_dir", "resume", "tensorboard")


def _check_types(cfg: Config) -> None:
  """Each option has its default's type (a Config built from Python can
  hold anything): text for text, a real number for a float (an int is
  one), an int that is not a bool for an int, a bool for a flag; a
  path-like object where the option is a path."""
  import numbers  # pylint: disable=import-outside-toplevel
  for f in dataclasses.fields(cfg):
    value, default = getattr(cfg, f.name), f.default
    if isinstance(default, bool):
      ok, kind = isinstance(value, bool), "True or False"
      if isinstance(value, np.bool_):  # config.json would hold "True"
        kind += " (a Python bool: bool(x) for numpy's)"
    elif isinstance(default, int):
      ok, kind = (isinstance(value, int)
                  and not isinstance(value, bool)), "an integer"
      if not ok and isinstance(value, np.integer):
        kind += " (a Python int: int(x) for a numpy integer)"
    elif isinstance(default, float):
      # float covers numpy's float64; a float32 would not go into JSON.
      ok, kind = (isinstance(value, (int, float))
                  and not isinstance(value, (bool, np.bool_))), "a number"
      if not ok and isinstance(value, numbers.Real) and not isinstance(
          value, (bool, np.bool_)):
        kind += " (a Python float: float(x) for a numpy scalar)"
    elif isinstance(default, str):
      ok, kind = isinstance(value, str) or (
          f.name in _PATHS and isinstance(value, os.PathLike)), "text"
    else:
      continue
    if not ok:
      raise ConfigError(f"{f.name} must be {kind}, got {value!r}")


def validate_config(cfg: Config) -> None:
  """Raises ConfigError naming the first invalid value (reads no data)."""
  _check_types(cfg)
  if cfg.method not in METHODS:
    raise ConfigError(f"unknown method {cfg.method!r}; expected one of "
                      f"{METHODS}")
  for f in dataclasses.fields(cfg):  # the CLI's choices, from Python too
    choices = f.metadata.get("choices")
    if choices is not None and getattr(cfg, f.name) not in choices:
      raise ConfigError(f"{f.name} must be one of {tuple(choices)}, got "
                        f"{getattr(cfg, f.name)!r}")
  augment.parse_strategy(cfg.strategy)  # ConfigError naming the part
  if isinstance(cfg.delta, float) and 0 < cfg.delta < accounting.MIN_DELTA:
    raise ConfigError(f"delta must be >= {accounting.MIN_DELTA:g}, got "
                      f"{cfg.delta:g}")
  try:
    accounting.validate_target(cfg.epsilon, cfg.delta)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cfg.ipc < 1:
    raise ConfigError(f"ipc must be >= 1, got {cfg.ipc}")
  data_lib.check_spec(cfg.dataset)
  if cfg.preset:
    presets.names(cfg.preset)  # unknown names are refused
  if (cfg.image_size < 0 or cfg.image_size == 1
      or cfg.image_size > data_lib.MAX_IMAGE_SIZE):
    raise ConfigError(f"image_size must be 0 (as stored) or 2..."
                      f"{data_lib.MAX_IMAGE_SIZE}, got {cfg.image_size}")
  for name in ("sampling_rate", "expert_sampling_rate",
               "generated_sampling_rate"):
    try:
      accounting.check_sampling_rate(getattr(cfg, name), name)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  private = cfg.method != "dm"
  for name in ("clip_norm", "expert_clip_norm"):
    value = getattr(cfg, name)
    if not value > 0 or (private and not math.isfinite(value)):
      raise ConfigError(
          f"{name} must be a finite number > 0, got {value} (an infinite "
          "clip norm has unbounded sensitivity: no noise can make it "
          "private)")
    if private:
      try:  # a private release sums clipped rows in int32 fixed point
        clipping.fixed_point_bits(1, value)
      except (ValueError, OverflowError) as e:
        raise ConfigError(f"{name} {value} is outside the range an exact "
                          f"fixed-point sum can hold ({e})") from None
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
  try:
    generators.check_spec(cfg.generator)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  _validate_pe(cfg)
  for name in ("share_generator", "share_features", "share_expert",
               "share_counts"):
    value = getattr(cfg, name)
    if not (value > 0 and math.isfinite(value)):
      raise ConfigError(f"budget shares must be finite and > 0, got "
                        f"{name} = {value}")
    if not MIN_SHARE <= value <= MAX_SHARE:
      # Relative weights: beyond these a mechanism's noise multiplier
      # overflows the float32 release (its noisy counts became inf after
      # the count release was spent) or the search divides by zero.
      raise ConfigError(f"budget shares must be in [{MIN_SHARE:g}, "
                        f"{MAX_SHARE:g}] (relative weights), got "
                        f"{name} = {value:g}")
  declared = (cfg.generated_epsilon, cfg.generated_delta, cfg.generated_mu,
              cfg.generated_noise_multiplier)
  if any(not (v >= 0 and math.isfinite(v)) for v in declared):
    raise ConfigError("declared guarantees of generated data must be "
                      "finite and >= 0")
  ways = [n for n in ("generated_epsilon", "generated_mu",
                      "generated_noise_multiplier") if getattr(cfg, n) > 0]
  if len(ways) > 1:
    raise ConfigError("declare the guarantee of external generated data "
                      f"one way, not {len(ways)}: {', '.join(ways)}")
  if cfg.generated_delta > 0 and not cfg.generated_epsilon > 0:
    raise ConfigError("generated_delta needs generated_epsilon")
  if ways and not cfg.generator.startswith("npz:"):
    raise ConfigError(f"{ways[0]} declares the guarantee of external "
                      "generated data (--generator npz:PATH), but the "
                      f"generator is {cfg.generator!r}")
  if cfg.generated_epsilon > 0 and not 0 <= cfg.generated_delta < cfg.delta:
    raise ConfigError(f"generated_delta must be in [0, delta = {cfg.delta})"
                      f", got {cfg.generated_delta}")
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
  if not -2**63 <= cfg.seed < 2**63:
    raise ConfigError(f"seed must fit in 64 bits, got {cfg.seed}")
  # Every other number: nan or inf would train silently to nan (the
  # types were checked first, `_check_types`).
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if (isinstance(value, float) and not math.isfinite(value)
        and not (f.name in ("clip_norm", "expert_clip_norm")
                 and value == math.inf)):
      raise ConfigError(f"{f.name} must be a finite number, got {value}")
  for name in ("lr_img", "expert_lr", "expert_tau"):
    if not getattr(cfg, name) > 0:
      raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
  for name in ("expert_weight", "expert_beta"):
    if not getattr(cfg, name) >= 0:
      raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")


# PE's lookahead multiplies its variations per iteration; beyond this it
# is hours of rendering for no measured gain (RESULTS.md: lookahead 4 did
# not help).
MAX_LOOKAHEAD = 100


def _validate_pe(cfg: Config) -> None:
  for name in ("pe_population", "pe_k", "pe_nearest_k"):
    if getattr(cfg, name) < 1:
      raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
  if cfg.pe_iterations < (0 if cfg.pe_warm_start > 0 else 1):
    raise ConfigError(f"pe_iterations must be >= 1 (>= 0 with "
                      f"pe_warm_start), got {cfg.pe_iterations}")
  if cfg.pe_iterations == 0 and (
      cfg.generated_per_class > cfg.pe_population):
    raise ConfigError(
        f"pe_iterations = 0 returns the warm start's population: "
        f"generated_per_class = {cfg.generated_per_class} needs "
        f"pe_population >= {cfg.generated_per_class}")
  if cfg.pe_k > cfg.pe_population:
    raise ConfigError(f"pe_k = {cfg.pe_k} votes per example need "
                      f"pe_population >= {cfg.pe_k}")
  if not math.isfinite(cfg.pe_vote_tau) or cfg.pe_vote_tau < 0:
    raise ConfigError("pe_vote_tau must be >= 0 and finite, got "
                      f"{cfg.pe_vote_tau}")
  if cfg.pe_vote_tau > 0 and cfg.pe_k > SOFT_MAX_K:
    raise ConfigError(f"soft votes (pe_vote_tau > 0) take pe_k <= "
                      f"{SOFT_MAX_K}, got {cfg.pe_k}")
  if cfg.pe_warm_start < 0 or cfg.pe_warm_weight < 1:
    raise ConfigError("pe_warm_start must be >= 0 and pe_warm_weight >= 1, "
                      f"got {cfg.pe_warm_start} and {cfg.pe_warm_weight}")
  if cfg.pe_warm_start > 0 and cfg.pe_public_only:
    raise ConfigError("pe_warm_start reads the private data (one release); "
                      "a public-only PE run (pe_public_only) reads none")
  if not 0 < cfg.pe_start_degree <= 1:
    raise ConfigError("pe_start_degree must be in (0, 1], got "
                      f"{cfg.pe_start_degree}")
  for name in ("pe_lookahead", "pe_marks"):
    if getattr(cfg, name) < 0:
      raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
  if cfg.pe_lookahead > MAX_LOOKAHEAD:
    raise ConfigError(f"pe_lookahead must be <= {MAX_LOOKAHEAD} (variations "
                      f"per candidate per iteration), got {cfg.pe_lookahead}")
  if cfg.pe_marks > MAX_MARKS:
    raise ConfigError(f"pe_marks must be <= {MAX_MARKS}, got "
                      f"{cfg.pe_marks}")
  if not (cfg.pe_threshold >= 0 and math.isfinite(cfg.pe_threshold)):
    raise ConfigError(f"pe_threshold must be finite and >= 0, got "
                      f"{cfg.pe_threshold}")
  if cfg.pe_embedding not in EMBEDDINGS:
    raise ConfigError(f"pe_embedding must be one of {EMBEDDINGS}, got "
                      f"{cfg.pe_embedding!r}")
  if cfg.pe_texts and any(not t.strip() for t in cfg.pe_texts.split(",")):
    raise ConfigError("pe_texts: every class text (comma-separated) needs "
                      "a visible character")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a configuration resolves to (public; computed before any data is
  read)."""
  init: str
  extractors: str
  centre: str  # generated | none: the queries' centre (generated only with queries)
  factor: int
  depth: int
  uses_generated: bool
  generator: str | None          # the generator's name, if any
  generator_mechanisms: tuple    # its mechanisms (noise 0: templates)
  generator_reads_private: bool
  generator_nonprivate: str | None  # why its output is not private
  feature_matching: bool
  expert: bool
  external: tuple[float, float] | None  # declared (eps, delta) of external G
  fixed: tuple  # accounting.Mechanism of external G with declared noise
  count_release: bool  # the class sizes are released (M_N)

  @property
  def reads_private(self) -> bool:
    """Whether any mechanism of this run reads the private training set."""
    return (self.generator_reads_private or self.feature_matching
            or self.expert)


def choices(plan: Plan) -> dict:
  """What the `auto` options resolved to: a resumed run must resolve them
  the same way (a newer version may change a default; store.check)."""
  out = {"init": plan.init, "extractors": plan.extractors,
         "centre": plan.centre, "factor": plan.factor, "depth": plan.depth,
         "expert": plan.expert, "generator": plan.generator}
  if plan.external is not None or plan.fixed:
    # External generated data's declared guarantee: a generator given from
    # Python is known by its name only, and the saved calibration holds
    # the declaration the run started with. (JSON types: lists, floats.)
    out["generator_guarantee"] = {
        "epsilon_delta": (None if plan.external is None
                          else [float(v) for v in plan.external]),
        "mechanisms": [[m.name, float(m.noise_multiplier),
                        float(m.sampling_rate), int(m.steps)]
                       for m in plan.fixed]}
  return out


def pool_members(cfg: Config, plan: Plan) -> int:
  """ConvNets the pool stage trains on generated data: the pool when the
  queries use it (`--extractors generated`); otherwise one, whose last
  checkpoint embeds the generated data for the k-means initialisation and
  is the expert's pretrained start; none when nothing uses it."""
  if not plan.uses_generated:
    return 0
  if plan.extractors == "generated":
    return cfg.pool_models
  return int(plan.init == "generated" or plan.expert)


def resolve(cfg: Config, image_shape=None,
            generator: generators.DPGenerator | None = None) -> Plan:
  """Resolves `auto` options and the data sources of a configuration.

  Without an image shape (as in `dpgeng plan`, which reads no data) the
  shape-dependent choices (factor, depth) are left at 0. `generator`: a
  plug-in given from Python (default: the one cfg.generator names).
  """
  init = cfg.init
  if init == "auto":
    init = {"dpgeng": "generated", "dm": "real"}.get(cfg.method, "noise")
  if cfg.method == "generator":
    # Its stored images are the k-means pick of the generated data,
    # whatever --init says (unused_options notes a --init given): init
    # "generated" is what every later stage reads.
    init = "generated"
  ext = cfg.extractors
  if ext == "auto":  # random: measured better than trained on G (README)
    ext = "random"
  centre = cfg.centre_features
  if centre == "auto":  # centred wherever generated data exists
    centre = "generated" if cfg.method == "dpgeng" else "none"
  if cfg.method in ("generator", "dm"):
    centre = "none"  # no queries (generator) or C = inf (dm)
  size = min(image_shape[:2]) if image_shape is not None else None
  factor = cfg.factor or (init_lib.default_factor(*image_shape[:2])
                          if image_shape is not None else 0)
  if cfg.method in ("generator", "dm"):
    factor = 1
  expert = cfg.method == "dpgeng" and cfg.expert
  uses_generated = (init == "generated" or ext == "generated" or expert
                    or centre == "generated")
  gen = None
  if uses_generated:
    gen = generator or generators.for_config(cfg)
  external = gen.declared if gen else None
  fixed = tuple(gen.fixed()) if gen else ()
  gen_reads = bool(gen and gen.reads_private)
  if gen_reads and not (tuple(gen.mechanisms()) or fixed or external
                        or gen.nonprivate_reason):
    raise ConfigError(
        f"generator {gen.name} reads the private data (reads_private) but "
        "declares no mechanism, no fixed mechanism, no guarantee and no "
        "nonprivate_reason: what it releases would be unaccounted; give "
        "its mechanisms() (the run calibrates their noise)")
  feature_matching = cfg.method != "generator"
  reads = gen_reads or feature_matching or expert
  depth = cfg.depth or (models.default_depth(size) if size else 0)
  if size and 2 ** depth > size:
    raise ConfigError(
        f"images of {image_shape[0]}x{image_shape[1]} pixels are too small "
        f"for a depth-{depth} ConvNet (each block halves the map; it needs "
        f"at least {2 ** depth} pixels per side): lower --depth")
  return Plan(init=init, extractors=ext, centre=centre, factor=factor,
              depth=depth,
              uses_generated=uses_generated,
              generator=gen.name if gen else None,
              generator_mechanisms=tuple(gen.mechanisms()) if gen else (),
              generator_reads_private=gen_reads,
              generator_nonprivate=gen.nonprivate_reason if gen else None,
              feature_matching=feature_matching, expert=expert,
              external=external, fixed=fixed,
              count_release=(reads and cfg.method != "dm"
                             and not cfg.public_class_sizes))


def abort_events(cfg: Config, plan: Plan, num_classes: int) -> int:
  """The run's abort events (each of probability <= tau): a class above
  its released bound (K classes and the total), a Poisson batch above its
  capacity (Q queries at p < 1; T_E expert steps at q_E < 1).
  Public: a function of the configuration and K."""
  if cfg.method == "dm":
    return 0
  events = num_classes + 1 if plan.count_release else 0
  if plan.feature_matching and cfg.sampling_rate < 1:
    events += cfg.num_queries
  if plan.expert and cfg.expert_sampling_rate < 1:
    events += cfg.expert_steps
  return events


def delta_split(cfg: Config, plan: Plan) -> accounting.DeltaSplit:
  """How the run spends its delta (reads no data): a reserve for abort
  events whenever it has any (their count does not change the split, only
  the per-event tail), and one for the noise sampler's bounded support
  (noise.support_delta) whenever it draws noise."""
  return accounting.DeltaSplit(cfg.delta,
                               plan.external[1] if plan.external else 0.0,
                               reserve=abort_events(cfg, plan, 1) > 0,
                               support=cfg.method != "dm" and bool(
                                   _uncalibrated(cfg, plan)[0]))


def _uncalibrated(cfg: Config, plan: Plan):
  """(the run's mechanisms whose noise it calibrates and draws, before
  calibration; their budget shares)."""
  mechs, shares = [], []
  if plan.count_release:
    mechs.append(accounting.Mechanism("class_counts", 0.0, 1.0, 1,
                                      sensitivity="1"))
    shares.append(cfg.share_counts)
  for m in plan.generator_mechanisms:
    mechs.append(m)
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
  return mechs, shares


def mechanisms_for(cfg: Config, plan: Plan) -> list[accounting.Mechanism]:
  """The run's private mechanisms with calibrated noise (reads no data);
  checks every declared external guarantee against the target."""
  mechs, shares = _uncalibrated(cfg, plan)
  names = [m.name for m in (*plan.fixed, *mechs)]
  if len(set(names)) < len(names):
    # The stages find their calibrated noise by name: a plug-in's
    # mechanism named like another would be handed that one's noise.
    raise ConfigError(
        f"the run's private mechanisms need distinct names, got {names}: "
        "rename the generator's mechanisms")
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
  if not cfg.deterministic:  # a deterministic run claims no guarantee
    # The calibrated mechanisms: the noise this run's sampler draws (a
    # declared external guarantee's noise was drawn elsewhere).
    _check_sampler_support(cfg, cal, split)
  return [*plan.fixed, *cal]


def _check_sampler_support(cfg: Config, mechs, split) -> None:
  """Refuses noise so small that the sampler's bounded support (exact out
  to noise.EXACT_Z standard deviations) would add more to delta
  (noise.support_delta) than the split reserves for it
  (accounting.SUPPORT_FRACTION of delta), or 2^-100 where that is larger
  (the size of the support's own unaccounted mass, 2^-128 per coordinate,
  at any noise)."""
  extra = noise.support_excess(mechs, split.sampler)
  if extra:
    low = min((m for m in mechs if m.noise_multiplier > 0),
              key=lambda m: m.noise_multiplier)
    share = _SHARE_FLAGS.get(low.name)
    fixes = ["lower --epsilon"]
    if share:  # a smaller share is more noise for it (a review's finding:
      # the message said larger, which made it worse)
      fixes.append(f"give {low.name} a smaller share ({share}) so that its "
                   "noise grows")
    if low.sampling_rate < 1:
      rate = _RATE_FLAGS.get(low.name, "its sampling rate")
      fixes.append(f"raise its sampling rate {rate} (now "
                   f"{low.sampling_rate:g}: a tiny rate calibrates tiny "
                   "noise)")
    raise ConfigError(
        f"epsilon {cfg.epsilon} at delta {cfg.delta:g} needs noise as small "
        f"as {low.noise_multiplier:.3g} times the sensitivity "
        f"({low.name}): the noise sampler is exact out to "
        f"{noise.EXACT_Z:.1f} standard deviations, so a neighbouring "
        f"dataset's releases would add about {extra:.2g} to delta, beyond "
        f"what is accounted; {', or '.join(fixes)}")


# The flags of the mechanisms' budget shares and sampling rates.
_SHARE_FLAGS = {"class_counts": "--share-counts",
                "generator": "--share-generator",
                "feature_matching": "--share-features",
                "expert": "--share-expert"}
_RATE_FLAGS = {"feature_matching": "--sampling-rate",
               "expert": "--expert-sampling-rate"}


def nonprivate_reasons(cfg: Config, plan: Plan) -> list[str]:
  """Why a run's outputs are NOT differentially private (empty: they are).
  Anything non-private that touches an output makes the run non-private."""
  reasons = []
  if cfg.method == "dm":
    reasons.append("method dm: no clipping, no noise"
                   + (", initialised from real images"
                      if plan.init == "real" else ""))
  elif plan.init == "real":
    reasons.append("initialised from real training images (--init real)")
  if cfg.deterministic:
    reasons.append("deterministic test mode: the noise and sampling keys "
                   "derive from the public --seed")
  if plan.generator_nonprivate:
    reasons.append(plan.generator_nonprivate)
  if cfg.references and not cfg.no_eval:
    reasons.append("--references: metrics.json holds models trained on "
                   "real training images")
  return reasons


# Options that only one part of the method reads, by that part.
_PE_OPTIONS = ("pe_iterations", "pe_public_only", "pe_population",
               "pe_threshold", "pe_k", "pe_vote_tau", "pe_warm_start",
               "pe_warm_weight", "pe_start_degree", "pe_lookahead",
               "pe_embedding", "pe_width")
_TEXT_OPTIONS = ("pe_texts", "pe_font_dir", "pe_stroke_fonts", "pe_marks",
                 "pe_polarity")
_NEAREST_OPTIONS = ("pe_nearest_k",)
_MERF_OPTIONS = ("generator_features", "generator_steps")
_QUERY_OPTIONS = ("num_queries", "sampling_rate", "clip_norm",
                  "share_features", "extractors", "centre_features")
_EXPERT_OPTIONS = ("expert", "expert_steps", "expert_sampling_rate",
                   "expert_clip_norm", "share_expert", "expert_lr",
                   "expert_weight", "expert_tau", "expert_beta")


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def unused_options(cfg: Config, plan: Plan) -> list[str]:
  """Options set away from their default (or their --preset's value) that
  this run does not read, one line per part of the method: a sweep that
  passes the same flags to every method should see which of them a
  method ignores, rather than think they took effect."""
  base = Config(**presets.values(cfg.preset)) if cfg.preset else Config()
  gen = plan.generator or ""

  def changed(names):
    return [_flag(n) for n in names if getattr(cfg, n) != getattr(base, n)]

  why = {}
  if not cfg.dataset.startswith("tfds:"):
    why["only tfds: datasets read them"] = changed(("label_feature",
                                                    "data_dir"))
  if not plan.uses_generated:
    why[f"method {cfg.method} uses no generated data"] = changed(
        ("generator", "generated_per_class", *_PE_OPTIONS, *_TEXT_OPTIONS,
         *_NEAREST_OPTIONS, *_MERF_OPTIONS))
  elif gen != "pe:user":
    used = (() if gen.startswith("pe:") else _PE_OPTIONS) + (
        () if gen.startswith("pe:text") else _TEXT_OPTIONS) + (
        () if gen.startswith("pe:nearest") else _NEAREST_OPTIONS) + (
        () if gen == "merf" else _MERF_OPTIONS)
    why[f"the generator is {gen}"] = changed(used)
  if not cfg.generated_noise_multiplier > 0:
    why["no --generated-noise-multiplier is declared"] = changed(
        ("generated_sampling_rate", "generated_steps"))
  if not plan.feature_matching:
    why[f"method {cfg.method} makes no feature-matching queries"] = changed(
        _QUERY_OPTIONS)
  if not plan.expert:
    why[("the expert runs with method dpgeng and --expert only"
         if cfg.method != "dpgeng" else "the expert is off (--expert)")
        ] = changed(_EXPERT_OPTIONS)
  if cfg.method == "generator":
    why["method generator picks its images from the generated data"] = (
        changed(("init",)))
  if plan.factor and cfg.factor not in (0, plan.factor):
    why[f"method {cfg.method} stores images at factor {plan.factor}"] = (
        changed(("factor",)))
  return [f"{', '.join(flags)} not used: {reason}"
          for reason, flags in why.items() if flags]


def plan_budget(cfg: Config) -> dict:
  """The budget allocation of a configuration, computed from the
  configuration alone (no data is read): per mechanism its noise
  multiplier, sampling rate, steps and epsilon alone, and the composed
  figures."""
  validate_config(cfg)
  plan = resolve(cfg)
  mechs = mechanisms_for(cfg, plan)
  return accounting.privacy_report(
      mechs, target_epsilon=cfg.epsilon, delta=cfg.delta,
      private=not nonprivate_reasons(cfg, plan),
      public_metadata=["computed without any data"],
      external=plan.external, split=delta_split(cfg, plan),
      nonprivate_reasons=nonprivate_reasons(cfg, plan))
