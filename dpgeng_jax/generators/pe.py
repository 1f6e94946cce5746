"""Private Evolution (PE) as a DP generator: the mechanism M_PE.

A population of N_s images per class from an image API's `random`; for
t = 1..T:

1. embed the private images (once: the embedding is fixed) and the
   population with a public embedding (`embeddings`);
2. every private example (x_i, y_i) votes for its k nearest population
   images OF ITS OWN CLASS with weight 1/sqrt(k) each: one example adds
   k distinct bins of 1/sqrt(k), so the K x N_s histogram has L2
   sensitivity 1 under add/remove of one example. The votes are counted
   as integers (exact at any N; float32 sums of 1/sqrt(3) moved by 1.0013
   at 30000 rows of a class) and weighted in float64 at the release by
   `vote_weight(k)`, 1/sqrt(k) less a margin of 2^-20 that covers the
   float64 rounding of any int32 count. Soft votes (`vote_tau` > 0,
   ours): the k nearest get weights falling with distance, of L2 norm
   <= 1, counted in fixed point (`soft_weights`, `soft_bits`); the same
   margin covers them, every bin's integer change being 0 or >= 1;
3. the histogram (counts summed over the data mesh with psum) gets
   N(0, sigma^2) noise on every bin ONCE, from the secret key, through the
   atom-free float64 sampler (`noise.add_gaussian_noise`);
4. post-processing: the counts are thresholded, max(h~ - H, 0), and the
   next population is drawn per class in proportion to them (uniformly
   where a class has no count left), then perturbed by the API's
   `variation` at the iteration's degree.

The event is SelfComposed(Gaussian(sigma), T) (`accounting.Mechanism`
with sampling rate 1 and T steps), calibrated with the run's other
mechanisms. The last draw returns `per_class` images per class (the
generated set). Lookahead (optional): a candidate's embedding is the mean
embedding of L of its variations.

Warm start (optional, ours; `herding`): before the votes, one release of
DP-MERF's class sums of random features of the pixels, at sigma /
sqrt(m), which the accountant counts as m more releases at sigma (the
event is SelfComposed(Gaussian(sigma), T + m), exactly); then, as public
post-processing, kernel herding moves the API's first population toward
its noisy class means, and the votes refine it with variations whose
degree starts at `start_degree`.

The released noisy histograms also estimate the class sizes (a class's
bins sum to sqrt(k) N_c plus noise): free refinement of the normalisation
constants (`Output.counts`); not with soft votes, whose sums vary by
example. A warm release's constant coordinate adds its own estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpgeng_jax import accounting, noise
from dpgeng_jax.clipping import check_labels, check_mask
from dpgeng_jax.counts import inverse_variance
from dpgeng_jax.config import Config
from dpgeng_jax.generators import (Context, Output, apis, check_mechanisms,
                                   embeddings, herding, merf)

SENSITIVITY = 1.0  # L2, add/remove one example (module docstring)
RELEASES = "noisy_histograms"  # the T releases, as saved and published
WARM = "warm_release"  # the warm start's release (`herding`), (1, K, 2D + 1)
WARM_PUBLIC = 7  # folded into the public key for the warm start's draws
SETUP = "setup"  # beside checkpointed releases: the settings they need
# The vote weight's margin below 1/sqrt(k): float64 rounds c w with a
# relative error <= 2^-53, so k bins whose integer counts change by 1 move
# by <= sqrt(k) w (1 + 2^-52 c) <= 1 for every count c < 2^31.
VOTE_MARGIN = 2.0 ** -20


def vote_weight(k: int) -> float:
  """The weight of one of a private example's k votes (module docstring)."""
  return (1.0 - VOTE_MARGIN) / math.sqrt(k)


# Soft votes (tau > 0) are counted in fixed point: a weight w in [0, 1]
# adds floor(w 2^bits) units to its bin, with `soft_bits(rows)` the most
# bits (at most 20) that keep a bin's total of at most `rows` weights below
# 2^30 in int32 (at least 8, so soft votes take up to 2^22 rows).
SOFT_MAX_BITS, SOFT_MIN_BITS = 20, 8
# The float32 norm of k weights errs by < (k + 2) 2^-24; dividing by
# (1 + 2^-10) keeps the weight vector's norm <= 1 for k <= SOFT_MAX_K.
SOFT_NORM_MARGIN = 2.0 ** -10
SOFT_MAX_K = 4096


def soft_bits(rows: int) -> int:
  """Fixed-point bits of soft votes over `rows` private rows (padding
  included: the public row count, summed over every device)."""
  # (rows - 1).bit_length() = ceil(log2 rows), in exact integers.
  bits = min(SOFT_MAX_BITS, 30 - (max(rows, 1) - 1).bit_length())
  if bits < SOFT_MIN_BITS:
    raise ValueError(
        f"soft PE votes over {rows} rows would keep {bits} < "
        f"{SOFT_MIN_BITS} bits per weight in int32 counts; use equal votes "
        "(vote_tau 0) at this size")
  return bits


def _checked_bits(bits: int | None, rows: int) -> int:
  """Soft votes' bits: `soft_bits(rows)` if None, else at least
  SOFT_MIN_BITS and at most `soft_bits(rows)` (more could overflow a bin's
  int32 total)."""
  most = soft_bits(rows)
  if bits is None:
    return most
  if not SOFT_MIN_BITS <= bits <= most:
    raise ValueError(f"soft votes over {rows} rows take bits in "
                     f"{SOFT_MIN_BITS}..{most} (got {bits})")
  return bits


def release_scale(k: int, tau: float = 0.0, bits: int | None = None
                  ) -> float:
  """What one unit of `vote_counts` weighs in the release: vote_weight(k)
  for equal votes, (1 - VOTE_MARGIN) 2^-bits for soft votes (tau > 0),
  whose units are the fixed-point weights (the margin's argument in the
  module docstring holds for any integer change of L2 norm <= 2^bits)."""
  if tau <= 0:
    return vote_weight(k)
  if bits is None:
    raise ValueError("soft votes (tau > 0) need the fixed-point bits "
                     "their counts were made with")
  return (1.0 - VOTE_MARGIN) * 2.0 ** -bits


def soft_weights(dist: jax.Array, tau: float) -> jax.Array:
  """Soft votes' weights over a row's k nearest candidates, (n, k) from
  their (n, k) ascending squared distances d (up to a per-row constant):
  w_j proportional to exp(-(d_j - d_1) / (tau (d_k - d_1))) and scaled to
  L2 norm 1 / (1 + SOFT_NORM_MARGIN) < 1. Equal distances give equal
  weights; a row with a non-finite distance gets weights 0 (votes
  nothing)."""
  base = dist[:, :1]
  spread = dist[:, -1:] - base
  rel = (dist - base) / jnp.where(spread > 0, spread, 1.0)
  e = jnp.exp(-rel / tau)
  w = e / (jnp.linalg.norm(e, axis=1, keepdims=True)
           * (1.0 + SOFT_NORM_MARGIN))
  finite = jnp.all(jnp.isfinite(w), axis=1, keepdims=True)
  return jnp.where(finite, w, 0.0)


APIS = ("text", "nearest")


@dataclasses.dataclass(frozen=True)
class PEConfig:
  """Public hyperparameters of PE (the iterations also enter the
  accountant); the defaults are the command's (config.Config.pe_*)."""
  iterations: int = Config.pe_iterations     # T
  population: int = Config.pe_population     # N_s per class voted on
  threshold: float = Config.pe_threshold     # H in noise standard deviations
  k: int = Config.pe_k                       # votes per private example
  vote_tau: float = Config.pe_vote_tau       # > 0: soft votes' decay
  lookahead: int = Config.pe_lookahead       # L variations per candidate
  embedding: str = Config.pe_embedding
  warm_start: int = Config.pe_warm_start     # herding iterations (0: off)
  warm_weight: int = Config.pe_warm_weight   # the warm release = m releases
  start_degree: float = Config.pe_start_degree  # the votes' first degree
  warm_features: int = 500    # random Fourier features of the warm release
  chunk: int = 1024           # private rows per distance block
  history: int = 8            # images per class kept per iteration
  public_only: bool = Config.pe_public_only  # no votes, no private data


# ---------------------------------------------------------------------------
# The histogram (pure, jittable).


def vote_histogram(pop_emb: jax.Array, priv_emb: jax.Array, y: jax.Array,
                   mask: jax.Array, *, k: int = 1, chunk: int = 1024,
                   tau: float = 0.0, bits: int | None = None) -> jax.Array:
  """The weighted votes of the private rows, (K, N_s) float32:
  `vote_counts` times `release_scale` (what the release adds noise to, in
  float64; see `release_histogram`)."""
  if tau > 0:
    bits = _checked_bits(bits, priv_emb.shape[0])
  counts = vote_counts(pop_emb, priv_emb, y, mask, k=k, chunk=chunk,
                       tau=tau, bits=bits)
  return counts.astype(jnp.float32) * jnp.float32(release_scale(k, tau,
                                                                bits))


def vote_counts(pop_emb: jax.Array, priv_emb: jax.Array, y: jax.Array,
                mask: jax.Array, *, k: int = 1, chunk: int = 1024,
                tau: float = 0.0, bits: int | None = None) -> jax.Array:
  """The votes of the private rows as exact counts: (K, N_s) int32.

  pop_emb: (K, N_s, d) embeddings of the population, class-major;
  priv_emb: (n, d) of the private rows, y their labels, mask 1 for real
  rows (0 on padding: such a row votes nothing). Each row adds 1 to each
  of its k nearest (squared L2) population images of its class (weighted
  by `vote_weight(k)` at the release). Distances are one matmul per chunk
  of rows (a (chunk, K N_s) block), votes are added with a scatter-add.

  Soft votes (tau > 0): the row's k nearest get `soft_weights` (L2 norm
  < 1, more to the nearer) in fixed point, floor(w 2^bits) units each
  (`bits`: `soft_bits` of the rows over every device; None: of these
  rows), so one row changes the counts by at most 2^bits in L2, exactly.
  """
  num_classes, pop, d = pop_emb.shape
  if not 1 <= k <= pop:
    raise ValueError(f"k = {k} votes need a population of >= k per class "
                     f"(got {pop})")
  n = priv_emb.shape[0]
  if not math.isfinite(tau) or tau < 0:
    raise ValueError(f"tau must be >= 0 and finite (got {tau})")
  if tau > 0:
    if k > SOFT_MAX_K:
      raise ValueError(f"soft votes take k <= {SOFT_MAX_K} (got {k})")
    bits = _checked_bits(bits, n)
  check_labels(y, num_classes, n)  # a -1 would vote in class K-1
  check_mask(mask, n)  # a mask of another shape failed deep in the scan
  chunk = max(1, min(chunk, n))
  pad = (-n) % chunk
  priv = jnp.pad(priv_emb.astype(jnp.float32), ((0, pad), (0, 0)))
  # A traced label outside 0..K-1 votes nothing (as in the clipped class
  # sums): masked out before the int32 cast, which wrapped an int64 label
  # 2^32 + 1 into class 1, and an index -1 read class K-1.
  y = jnp.asarray(y)
  kept = (y >= 0) & (y < num_classes)
  mask = jnp.pad(jnp.where(kept, jnp.asarray(mask, jnp.float32), 0.0),
                 (0, pad))
  y = jnp.pad(jnp.where(kept, y, 0).astype(jnp.int32), (0, pad))
  flat = pop_emb.reshape(num_classes * pop, d).astype(jnp.float32)
  sq_pop = jnp.sum(flat * flat, 1).reshape(num_classes, pop)

  def block(rows):
    e, yb, mb = rows
    cross = (e @ flat.T).reshape(-1, num_classes, pop)
    # ||e||^2 is the same for all candidates of a row: omitted.
    dist = sq_pop[yb] - 2.0 * jnp.take_along_axis(
        cross, yb[:, None, None], axis=1)[:, 0]
    neg, near = jax.lax.top_k(-dist, k)               # (chunk, k) distinct
    bins = (yb[:, None] * pop + near).reshape(-1)
    real = (mb > 0).astype(jnp.int32)[:, None]
    if tau > 0:  # fixed-point weights (exact below 2^24 in float32)
      votes = jnp.floor(soft_weights(-neg, tau) * 2.0 ** bits).astype(
          jnp.int32) * real
    else:
      votes = jnp.broadcast_to(real, near.shape)
    return jnp.zeros(num_classes * pop, jnp.int32).at[bins].add(
        votes.reshape(-1))

  # One histogram per chunk, then their sum (no loop carry: the same code
  # runs inside shard_map, where the rows are device-varying).
  rows = (priv.reshape(-1, chunk, d), y.reshape(-1, chunk),
          mask.reshape(-1, chunk))
  hist = jax.lax.map(block, rows).sum(0, dtype=jnp.int32)  # int32 with x64
  return hist.reshape(num_classes, pop)


def private_histogram(pop_emb, priv_emb, y, mask, *, k: int = 1,
                      chunk: int = 1024, mesh=None, tau: float = 0.0,
                      bits: int | None = None) -> jax.Array:
  """`vote_counts` (int32), with a mesh summed over its devices (psum);
  soft votes' bits (None: `soft_bits` of all the rows) are the same on
  every device."""
  if tau > 0:
    bits = _checked_bits(bits, priv_emb.shape[0])
  fn = functools.partial(vote_counts, k=k, chunk=chunk, tau=tau, bits=bits)
  if mesh is None:
    return fn(pop_emb, priv_emb, y, mask)
  from dpgeng_jax import parallel
  # Counts of at most N votes per bin: the int32 psum cannot overflow.
  return parallel.sharded_sum(lambda p, *r: fn(p, *r), mesh,
                              vary_params=False, integer_sums_fit=True)(
                                  pop_emb, priv_emb, y, mask)


def release_histogram(key: jax.Array, counts: jax.Array,
                      noise_multiplier: float, *, k: int, tau: float = 0.0,
                      bits: int | None = None) -> jax.Array:
  """counts release_scale(k, tau, bits) + N(0, sigma^2) on every bin
  (sensitivity 1), weighted and noised in float64 and rounded once to
  float32. `k` (and tau, bits for soft votes) are those `vote_counts` made
  the counts with; k has no default: a default of 1 under-noised counts
  made with k = 4 by 2x."""
  return noise.add_gaussian_noise(key, counts, noise_multiplier * SENSITIVITY,
                                  scale=release_scale(k, tau, bits))


def count_estimates(noisy: np.ndarray, k: int):
  """Class-size estimates from one noisy histogram (K, N_s) and the std of
  the estimate per unit noise multiplier: sum_j h~[c, j] / (k w_k), each
  example adding k votes of weight w_k = vote_weight(k)."""
  pop = noisy.shape[1]
  unit = k * vote_weight(k)
  return np.asarray(noisy, np.float64).sum(1) / unit, math.sqrt(pop) / unit


def draw(key: jax.Array, weights: np.ndarray, n: int) -> np.ndarray:
  """(K, n) indices into each class's population, drawn with replacement
  in proportion to `weights` (K, N_s) >= 0; uniformly for a class whose
  weights are all 0."""
  w = np.asarray(weights, np.float64)
  w = np.where(w.sum(1, keepdims=True) > 0, w, 1.0)
  logits = jnp.log(jnp.asarray(w / w.sum(1, keepdims=True), jnp.float32))
  return np.asarray(jax.random.categorical(key, logits[:, None, :], axis=-1,
                                           shape=(w.shape[0], n)))


# ---------------------------------------------------------------------------
# The loop.


def _class_major(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def _checked(out, labels: np.ndarray, image_shape, what: str):
  """An API's answer, checked: an `apis.Samples` with one image per label
  (the labels asked for), of the data's shape, finite and in [0, 1]."""
  if not isinstance(out, apis.Samples):
    raise ValueError(f"{what} returned {type(out).__name__}; an image API "
                     "returns apis.Samples(images, labels, state)")
  if image_shape is None:
    image_shape = np.shape(out.images)[1:]
  images = apis.check_images(out.images, labels, tuple(image_shape), what)
  if not np.array_equal(np.asarray(out.labels), labels):
    raise ValueError(f"{what} returned other labels than it was asked for "
                     "(one image per label, in the labels' order)")
  return apis.Samples(images, np.asarray(labels, np.int32), out.state)


def evolve(api, embed, priv_emb, y, mask, *, key: jax.Array,
           secret: jax.Array, noise_multiplier: float, cfg: PEConfig,
           num_classes: int, normalize, per_class: int, mesh=None,
           progress=None, image_shape=None, released=None,
           on_release=None, start=None):
  """PE's T iterations (module docstring). Returns (final Samples with
  `per_class` images per class, class-major; noisy histograms (T, K, N_s);
  history (T + 1, K, m, H, W, C): the first m images per class of the
  initial and of every later population). Every answer of the API is
  checked (`_checked`; image_shape None: the shape of its first answer).

  Resuming: `released` holds the first t noisy histograms an earlier
  attempt drew (its checkpoints); they are used as they are, the loop
  replaying its public steps (draws and variations) up to iteration t,
  and only the T - t others are drawn, at their own iterations' keys.
  `start` (None: the API's `random`): the first population (N_s per
  class, class-major), such as a warm start's. The variations' degrees
  fall linearly from `cfg.start_degree` to 0.
  `on_release(noisy)` is called with all the histograms so far as soon as
  each new one is drawn, before the API sees anything derived from it: a
  kill after that call loses no release (a resumed run reuses it), and a
  kill before it lost only a release nothing outside the process saw."""
  pop_n, t_max = cfg.population, cfg.iterations
  released = _checked_releases(released, t_max, num_classes, pop_n,
                               cfg.public_only)
  k_random, k_loop = jax.random.split(key)
  first = _class_major(num_classes, pop_n)
  samples = _checked(
      api.random(k_random, first) if start is None else start, first,
      image_shape, "the image API's random" if start is None
      else "the warm start")
  image_shape = samples.images.shape[1:]
  schedule = [cfg.start_degree * d for d in apis.degrees(t_max)]
  history = [samples.images.reshape(num_classes, pop_n,
                                    *samples.images.shape[1:])[:,
                                                              :cfg.history]]
  bits = (soft_bits(priv_emb.shape[0])
          if cfg.vote_tau > 0 and not cfg.public_only else None)
  hist_fn = jax.jit(functools.partial(private_histogram, k=cfg.k,
                                      chunk=cfg.chunk, mesh=mesh,
                                      tau=cfg.vote_tau, bits=bits))
  for t in range(t_max):
    k_look, k_draw, k_var = jax.random.split(jax.random.fold_in(k_loop, t),
                                             3)
    degree = schedule[t]
    if cfg.public_only:  # the same loop without votes: uniform draws
      weights = np.ones((num_classes, pop_n))
    else:
      if t < len(released):  # drawn by an earlier attempt: reused
        noisy = released[t]
      else:
        cand = _candidate_embeddings(api, embed, samples, k_look, degree,
                                     cfg.lookahead, normalize, image_shape)
        hist = hist_fn(cand.reshape(num_classes, pop_n, -1), priv_emb, y,
                       mask)
        noisy = np.asarray(release_histogram(
            jax.random.fold_in(secret, t), hist, noise_multiplier, k=cfg.k,
            tau=cfg.vote_tau, bits=bits))
        released.append(noisy)
        if on_release is not None:
          on_release(np.stack(released))
      h = cfg.threshold * noise_multiplier * SENSITIVITY
      weights = np.maximum(noisy - h, 0.0)
    n_next = per_class if t == t_max - 1 else pop_n
    index = draw(k_draw, weights, n_next)
    index = index + (np.arange(num_classes) * pop_n)[:, None]
    chosen = samples.take(index.reshape(-1))
    samples = _checked(api.variation(k_var, chosen, degree), chosen.labels,
                       image_shape, "the image API's variation")
    history.append(samples.images.reshape(num_classes, n_next,
                                          *samples.images.shape[1:])[
                                              :, :cfg.history])
    if progress is not None:
      progress(1)
  if t_max == 0:  # no votes (a warm start alone): each class's first
    # per_class, a warm start's best per_class by herding's greedy order
    if per_class > pop_n:
      raise ValueError(f"with no iterations the generated set is the first "
                       f"population: {per_class} images per class need a "
                       f"population of at least {per_class}, not {pop_n}")
    samples = samples.take((np.arange(num_classes)[:, None] * pop_n
                            + np.arange(per_class)).reshape(-1))
  m = min(h.shape[1] for h in history)
  released = np.stack(released) if released else np.zeros(
      (0, num_classes, pop_n), np.float32)
  return samples, released, np.stack([h[:, :m] for h in history])


def warm_releases(cfg: PEConfig) -> int:
  """How many of PE's Gaussian releases the warm start counts as (m; 0
  without one)."""
  return cfg.warm_weight if cfg.warm_start > 0 and not cfg.public_only else 0


def warm_sigma(noise_multiplier: float, cfg: PEConfig) -> float:
  """The warm release's noise multiplier, sigma / sqrt(m): as private as m
  releases at sigma."""
  return noise_multiplier / math.sqrt(cfg.warm_weight)


def _saved_warm(saved, num_classes: int, dim: int):
  """The warm release an earlier attempt checkpointed (its settings
  already checked with the histograms', `_saved_releases`), or None."""
  if not saved or WARM not in saved:
    return None
  r = np.asarray(saved[WARM], np.float32)
  if r.shape != (1, num_classes, dim) or not np.all(np.isfinite(r)):
    raise ValueError(f"the saved PE warm release of shape {r.shape} does "
                     f"not fit {num_classes} classes x {dim} features")
  return r


def _checked_releases(saved, iterations: int, num_classes: int,
                      population: int, public_only: bool) -> list:
  """An earlier attempt's checkpointed histograms as a list, checked
  against this configuration (at most T of shape (K, N_s), finite)."""
  if saved is None:
    return []
  saved = np.asarray(saved, np.float32)
  if public_only or saved.ndim != 3 or saved.shape[0] > iterations or (
      saved.shape[1:] != (num_classes, population)) or not np.all(
          np.isfinite(saved)):
    raise ValueError(
        f"saved PE releases of shape {saved.shape} do not fit "
        f"{iterations} iterations of {num_classes} x {population} "
        "candidates" + (" (a public-only run releases none)"
                        if public_only else ""))
  return list(saved)


def _candidate_embeddings(api, embed, samples, key, degree, lookahead,
                          normalize, image_shape):
  if lookahead <= 0:
    return embeddings.apply(embed, normalize(samples.images))
  total = 0.0
  for i in range(lookahead):
    v = _checked(api.variation(jax.random.fold_in(key, i), samples, degree),
                 samples.labels, image_shape, "the image API's variation")
    total = total + embeddings.apply(embed, normalize(v.images))
  return total / lookahead


# ---------------------------------------------------------------------------
# The plug-in.


def _api_options(cfg) -> dict:
  texts = tuple(t for t in cfg.pe_texts.split(",")) if cfg.pe_texts else ()
  return {"texts": texts, "font_dir": cfg.pe_font_dir,
          "polarity": cfg.pe_polarity, "nearest_k": cfg.pe_nearest_k,
          "stroke_fonts": cfg.pe_stroke_fonts, "marks": cfg.pe_marks}


@dataclasses.dataclass
class PrivateEvolution:
  """The PE generator over an image API: `api` is "text", "nearest:PATH"
  or an `apis.ImageAPI` object (a user's, from Python)."""
  api: object
  cfg: PEConfig = PEConfig()
  api_options: dict = dataclasses.field(default_factory=dict)
  seed_embedding_epochs: int = 20
  declared = None
  nonprivate_reason = None

  @property
  def reads_private(self) -> bool:
    return not self.cfg.public_only

  @classmethod
  def from_config(cls, cfg) -> "PrivateEvolution":
    api = cfg.generator[len("pe:"):]
    return cls(api, PEConfig(iterations=cfg.pe_iterations,
                             population=cfg.pe_population,
                             threshold=cfg.pe_threshold, k=cfg.pe_k,
                             vote_tau=cfg.pe_vote_tau,
                             warm_start=cfg.pe_warm_start,
                             warm_weight=cfg.pe_warm_weight,
                             start_degree=cfg.pe_start_degree,
                             lookahead=cfg.pe_lookahead,
                             embedding=cfg.pe_embedding,
                             public_only=cfg.pe_public_only),
               _api_options(cfg))

  @property
  def name(self) -> str:
    name = ("pe:" + self.api) if isinstance(self.api, str) else "pe:user"
    return name + (" (public only)" if self.cfg.public_only else "")

  def mechanisms(self) -> tuple:
    """T Gaussian releases at sigma, plus m with a warm start: its one
    release at sigma / sqrt(m) is, exactly, m Gaussians at sigma (the
    privacy loss of Gaussians of one sensitivity composes as one Gaussian
    with 1 / sigma^2 summed)."""
    if self.cfg.public_only:
      return ()
    return (accounting.Mechanism("generator", 0.0, 1.0,
                                 self.cfg.iterations + warm_releases(self.cfg),
                                 sensitivity="1"),)

  def fixed(self) -> tuple:
    return ()

  def image_api(self, image_shape, num_classes: int, key=None):
    """The API object (built from its name for the built-in ones)."""
    if not isinstance(self.api, str):
      return self.api
    o = self.api_options
    if self.api == "text":
      from dpgeng_jax.generators.apis.text import TextAPI, TextConfig
      return TextAPI(image_shape, num_classes, TextConfig(
          texts=o.get("texts", ()), font_dir=o.get("font_dir", ""),
          polarity=o.get("polarity", "light"),
          stroke_fonts=o.get("stroke_fonts", False),
          marks=o.get("marks", TextConfig.marks)))
    if self.api.startswith("nearest:"):
      from dpgeng_jax.generators.apis import nearest
      x, y = nearest.load_collection(self.api[len("nearest:"):],
                                     image_shape=image_shape,
                                     num_classes=num_classes)
      return nearest.NearestAPI(x, y, num_classes,
                                k_max=o.get("nearest_k", 10))
    raise ValueError(f"unknown PE API {self.api!r}; expected text, "
                     "nearest:PATH or an ImageAPI object")

  def preflight(self, image_shape, num_classes: int) -> None:
    """Builds the API and checks one `random` image per class (shape,
    range, labels): a bad option (a font directory, the class texts, a
    collection, a user API's answer) fails here, before the run's first
    release, not after it. Public work only."""
    api = self.image_api(tuple(image_shape), num_classes)
    labels = _class_major(num_classes, 1)
    _checked(api.random(jax.random.key(0), labels), labels,
             tuple(image_shape), "the image API's random")

  def _setup(self, sigma: float) -> np.ndarray:
    """What the saved releases depend on besides the public keys (a
    configuration's fields, checked on resume, do not cover a plug-in
    given from Python): the settings that shape a release, its noise and
    the API's name."""
    fields = {k: v for k, v in dataclasses.asdict(self.cfg).items()
              if k not in ("chunk", "history")}  # no release changes
    return np.asarray(json.dumps({**fields, "noise_multiplier": sigma,
                                  "api": self.name}, sort_keys=True))

  def _saved_releases(self, saved, setup: np.ndarray):
    """The releases an earlier attempt checkpointed, if drawn with these
    settings, `_setup` (refused otherwise: votes for other candidates)."""
    if not saved or (RELEASES not in saved and WARM not in saved):
      return None
    if str(saved.get(SETUP)) != str(setup):
      n = len(saved[RELEASES]) if RELEASES in saved else 0
      raise ValueError(
          f"the saved PE releases of this run ({n} histograms"
          f"{', a warm release' if WARM in saved else ''}) were "
          f"drawn with other settings ({saved.get(SETUP)}, now {setup}): "
          "resume with the generator that drew them, or start a new run "
          "(--overwrite; those releases are spent)")
    return saved.get(RELEASES)

  def generate(self, ctx: Context, secret: jax.Array, mechanisms) -> Output:
    if not self.cfg.public_only:
      mechanisms = check_mechanisms(self, mechanisms)
    sigma = 0.0 if self.cfg.public_only else mechanisms[0].noise_multiplier
    setup = self._setup(sigma)
    k_api, k_embed, k_evolve = jax.random.split(ctx.key, 3)
    api = self.image_api(ctx.image_shape, ctx.num_classes, k_api)
    embed = embeddings.make(self.cfg.embedding, key=k_embed, api=api,
                            model=ctx.model, image_shape=ctx.image_shape,
                            num_classes=ctx.num_classes,
                            normalize=ctx.normalize,
                            epochs=self.seed_embedding_epochs)
    if self.cfg.public_only:
      priv_emb = None
    elif ctx.mesh is not None:
      priv_emb = jax.jit(embed)(ctx.x_private)
    else:
      priv_emb = embeddings.apply(embed, ctx.x_private)
    released = self._saved_releases(ctx.saved, setup)
    warm, start = None, None
    if warm_releases(self.cfg):
      warm, start = self._warm_start(ctx, api, secret, sigma, setup)
    keep = {} if warm is None else {WARM: warm}
    with tqdm(total=self.cfg.iterations, desc="private evolution",
              disable=ctx.quiet) as bar:
      final, noisy, history = evolve(
          api, embed, priv_emb, ctx.y_private, ctx.mask, key=k_evolve,
          secret=secret, noise_multiplier=sigma,
          cfg=self.cfg, num_classes=ctx.num_classes,
          normalize=ctx.normalize, per_class=ctx.per_class, mesh=ctx.mesh,
          progress=bar.update, image_shape=ctx.image_shape,
          released=released, start=start,
          on_release=None if ctx.checkpoint is None else (
              lambda noisy: ctx.checkpoint({RELEASES: noisy, SETUP: setup,
                                            **keep})))
    arrays = {"history": history}
    if self.cfg.public_only:
      return Output(final.images, final.labels, arrays=arrays)
    arrays = {RELEASES: noisy, **keep, **arrays}
    # Post-processing: class-size estimates from the releases, combined
    # by inverse variance: the T histograms' (not with soft votes, whose
    # sums vary by example; equal variances: their plain mean) and the
    # warm release's constant coordinate.
    estimates = []
    if self.cfg.vote_tau == 0 and len(noisy):
      counts = np.mean([count_estimates(h, self.cfg.k)[0] for h in noisy], 0)
      unit = count_estimates(noisy[0], self.cfg.k)[1]
      estimates.append((counts, unit * sigma * SENSITIVITY
                        / math.sqrt(len(noisy))))
    if warm is not None:
      estimates.append((np.asarray(merf.class_means_from_release(warm[0])[1],
                                   np.float64),
                        merf.count_stddev(warm_sigma(sigma, self.cfg))))
    if not estimates:
      return Output(final.images, final.labels, arrays=arrays)
    exact = [c for c, std in estimates if std == 0]  # noise 0
    if exact:
      return Output(final.images, final.labels, np.mean(exact, 0), 0.0,
                    arrays)
    counts, std = inverse_variance(estimates)
    return Output(final.images, final.labels, counts, std, arrays)

  def _warm_start(self, ctx: Context, api, secret: jax.Array, sigma: float,
                  setup: np.ndarray):
    """The warm release (an earlier attempt's, if it checkpointed one;
    else drawn and checkpointed before the API sees anything derived from
    it) and the population herded towards its class means (`herding`)."""
    k_map, k_first, k_herd = jax.random.split(
        jax.random.fold_in(ctx.key, WARM_PUBLIC), 3)
    fmap = merf.FeatureMap.create(k_map, int(np.prod(ctx.image_shape)),
                                  self.cfg.warm_features)
    warm = _saved_warm(ctx.saved, ctx.num_classes, fmap.dim)
    if warm is None:
      # Its own key: the votes' are fold_in(secret, t) for t < T.
      warm = np.asarray(jax.jit(functools.partial(
          merf.release_class_features, num_classes=ctx.num_classes,
          noise_multiplier=warm_sigma(sigma, self.cfg), mesh=ctx.mesh))(
              fmap, ctx.x_private, ctx.y_private, ctx.mask,
              noise_key=jax.random.fold_in(secret, self.cfg.iterations)))[
                  None]  # one release (as saved: a leading axis)
      if ctx.checkpoint is not None:
        ctx.checkpoint({WARM: warm, SETUP: setup})
    means = merf.class_means_from_release(jnp.asarray(warm[0]))[0]
    labels = _class_major(ctx.num_classes, self.cfg.population)
    first = _checked(api.random(k_first, labels), labels, ctx.image_shape,
                     "the image API's random")
    with tqdm(total=self.cfg.warm_start, desc="PE warm start (public)",
              disable=ctx.quiet) as bar:
      start = herding.warm_start(
          api, lambda x: fmap.rff(ctx.normalize(x)), means, first,
          key=k_herd, iterations=self.cfg.warm_start,
          check=lambda out, labels, what: _checked(out, labels,
                                                   ctx.image_shape, what),
          progress=bar.update)
    return warm, start
