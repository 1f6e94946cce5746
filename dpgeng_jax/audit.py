"""Empirical privacy audit: lower bounds on epsilon from canary attacks.

For each private mechanism the audit runs the production code path (the
same functions a run calls) many times on two neighbouring datasets under
add/remove adjacency: D, which holds one canary example, and D' = D minus
the canary (one example fewer; the padded layouts have the same public
size, as in a run). The canary is chosen worst case: its (clipped)
contribution to the released sum has norm exactly the sensitivity Delta in
a known direction u, and every other example contributes exactly nothing
along u, so for a correct mechanism the projection s of one release on u is
distributed as

    D': N(0, (sigma Delta)^2)      D: (1 - p) N(0, (sigma Delta)^2)
                                      + p N(Delta, (sigma Delta)^2),

the dominating pair of PoissonSampled(p, Gaussian(sigma)) for removal of
one example (p = 1: the plain Gaussian).

Mechanisms (`MECHANISMS`), one release per trial:

* ``feature_matching``: `mechanisms.noisy_targets` on flat data, as a run
  answers it (Poisson sampling at rate p, clipping of the embedding to C,
  per-class sums, noise sigma C); the embedding is the flattened image,
  the canary is 10 C u, the other examples are orthogonal to u (some far
  above C).
* ``feature_matching_sharded``: the same data through
  `parallel.sharded_noisy_targets` (shard_map, per-device sampling, psum,
  noise once) on a mesh of this process's devices.
* ``dp_sgd``: `expert.private_step`, the expert's DP-SGD step with the
  ConvNet per-example gradients of `pergrad` (Poisson batch, clipping to C,
  noise sigma C on the sum). The head's bias saturates the softmax on class
  0, so the gradient of every class-0 example is exactly zero; the canary
  is of class 1, its clipped gradient (computed by the same step without
  noise) gives u.
* ``generator``: `generators.merf.release_class_features` (norm-1 features,
  class sums, noise sigma); u is the canary's feature vector, and the
  noiseless release of D' is subtracted (the others are not orthogonal).
* ``pe_histogram``: Private Evolution's vote histogram
  (`generators.pe.private_histogram` with k = 2 votes of weight 1/sqrt 2,
  then `pe.release_histogram`): u is the canary's vote vector (norm 1),
  and the noiseless histogram of D' is subtracted.
* ``pe_soft_histogram``: the same with soft votes (k = 3, tau 0.5: the
  canary's weights in fixed point, its vote vector of norm just under 1).
* ``class_counts``: `counts.noisy_counts`, the count release M_N (sigma on
  each count, sensitivity 1); s is the canary class's noisy count minus its
  count in D'.

The statistic. The claim "PoissonSampled(p, Gaussian(sigma))" bounds the
power of EVERY test of D' against D at level alpha by

    B_{p, mu}(alpha) = (1 - p) alpha + p Phi_bar(Phi_bar^-1(alpha) - mu),

mu = 1 / sigma (Neyman-Pearson on the dominating pair). For each of
`GRID_POINTS` fixed thresholds t (public: from the claimed sigma, Delta
and the trial count, never from the data) the test "s > t" has level
alpha(t) = P_D'(s > t) and power beta(t) = P_D(s > t); one-sided
Clopper-Pearson bounds alpha_hi and beta_lo, Bonferroni-corrected over the
2 * GRID_POINTS intervals, hold together with probability >= confidence.
Then every t gives a lower bound on the mechanism's mu: mu_t solves
beta_lo = B_{p, mu_t}(alpha_hi) (infinite when beta_lo exceeds even
(1 - p) alpha_hi + p: no noise at rate p explains it). The audit reports
mu_lb = max_t mu_t and the epsilon of PoissonSampled(p, Gaussian(1 /
mu_lb)) at delta: with probability >= confidence the mechanism leaks at
least as much as that subsampled Gaussian on this canary. A correct
mechanism passes (mu_lb <= 1 / sigma, so epsilon_lower_bound <=
epsilon_accounted) except with probability <= 1 - confidence; 0.8x the
claimed noise, twice the sampling rate, a double-counted example or
missing clipping fail (tests/test_audit.py). The classic (epsilon, delta)
threshold bound, which needs ~1/delta trials to see a leak at delta, is
reported beside it (`epsilon_lower_bound_threshold`).

Fault injection (`Fault`) runs the same code paths with a wrong noise
scale, sampling rate, number of copies of the canary or clipping bound,
while the accounted epsilon stays the claimed one.

The sampler check (`sampler_check`) tests the noise itself: a KS test of
the sampler's law, and KS tests of its far tail conditioned through its
random bits (|z| beyond 6.2 and 9.1), which a float32 sampler (support
[-5.42, 5.22]) fails.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special, stats

from dpgeng_jax import (accounting, augment, counts, expert,
                        mechanisms, models, noise, outputs, parallel, pergrad)
from dpgeng_jax.errors import ConfigError, require_int
from dpgeng_jax.generators import merf, pe

MECHANISMS = ("feature_matching", "feature_matching_sharded", "dp_sgd",
              "generator", "pe_histogram", "pe_soft_histogram",
              "class_counts")
# They read the whole dataset.
UNSAMPLED = ("generator", "pe_histogram", "pe_soft_histogram",
             "class_counts")
GRID_POINTS = 40  # thresholds (see the module docstring)
CANARY_NORM = 10.0  # the canary's norm before clipping, in units of C
CHUNK = 2**15  # trials per vmapped chunk (bounds memory)
MIN_TRIALS = 100

_IMAGE_SHAPE = (2, 2, 1)  # d = 4 pixels: small, so trials are cheap
_NUM_CLASSES = 2
_CLIP_NORM = 1.0
_GENERATOR_FEATURES = 8


@dataclasses.dataclass(frozen=True)
class Fault:
  """A deliberately broken variant of a mechanism (all 1: correct).

  noise_scale: the mechanism adds noise_scale times the claimed noise.
  sampling_factor: it samples at sampling_factor * p (capped at 1).
  copies: the canary is held this many times (a double-counted example).
  clip_factor: it clips at clip_factor * C, its noise std staying
    noise_scale * sigma * C; at CANARY_NORM the canary enters unclipped.
  """
  noise_scale: float = 1.0
  sampling_factor: float = 1.0
  copies: int = 1
  clip_factor: float = 1.0

  @property
  def name(self) -> str | None:
    parts = [f"{k}={v:g}" for k, v in dataclasses.asdict(self).items()
             if v != 1]
    return ", ".join(parts) or None


@dataclasses.dataclass(frozen=True)
class AuditRecord:
  """One audited mechanism at one noise level.

  Attributes:
    mechanism: one of `MECHANISMS`.
    noise_multiplier: the claimed sigma.
    sampling_rate: claimed Poisson rate p of one release (1.0: the whole
      dataset).
    epsilon_accounted: PLD epsilon of one release at `delta`.
    epsilon_lower_bound: epsilon at `delta` of PoissonSampled(p,
      Gaussian(1 / mu_lb)), mu_lb the audit's lower bound on the
      mechanism's mu (module docstring); holds with probability >=
      `confidence`; 0 when nothing is certified, inf when no noise at rate
      p explains the observations.
    epsilon_lower_bound_threshold: the classic (epsilon, delta) bound from
      the same threshold tests (weaker).
    mu_lower_bound: mu_lb (claimed mu = 1 / noise_multiplier).
    delta: the delta of the epsilon figures.
    trials: releases per neighbouring dataset (2 * trials in all).
    seconds: wall time of the audit of this mechanism (compile included).
    confidence: confidence of the lower bounds.
    fault: the injected fault (None: the mechanism as it runs).
  """
  mechanism: str
  noise_multiplier: float
  sampling_rate: float
  epsilon_accounted: float
  epsilon_lower_bound: float
  delta: float
  trials: int
  seconds: float
  confidence: float = 0.95
  epsilon_lower_bound_threshold: float = 0.0
  mu_lower_bound: float = 0.0
  fault: str | None = None

  @property
  def passed(self) -> bool:
    return self.epsilon_lower_bound <= self.epsilon_accounted

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["passed"] = self.passed
    return out


# ---------------------------------------------------------------------------
# Statistics: Clopper-Pearson and the epsilon lower bound.


def clopper_pearson(successes, trials, confidence: float):
  """Equal-tailed Clopper-Pearson interval for a binomial proportion.

  Each side fails with probability <= (1 - confidence) / 2. Vectorised over
  `successes` (and `trials`).

  Returns:
    (lower, upper) float arrays; lower = 0 for 0 successes, upper = 1 for
    `trials` successes.
  """
  k = np.asarray(successes, np.float64)
  n = np.asarray(trials, np.float64)
  a = (1.0 - confidence) / 2
  lo = np.where(k > 0, stats.beta.ppf(a, np.maximum(k, 1), n - k + 1), 0.0)
  hi = np.where(k < n, stats.beta.ppf(1 - a, k + 1, np.maximum(n - k, 1)),
                1.0)
  return lo, hi


def threshold_grid(noise_std: float, sensitivity: float, trials: int,
                   points: int = GRID_POINTS):
  """The fixed thresholds of both tails (public quantities only).

  Upper tail t = noise_std * z, lower tail t = sensitivity - noise_std * z,
  for z evenly spaced in [0, z_max] with P(N(0,1) > z_max) = 10 / trials
  (about ten expected false positives at the last one under the claim).
  """
  z_max = float(stats.norm.isf(min(0.5, 10.0 / trials)))
  z = np.linspace(0.0, z_max, points)
  return noise_std * z, sensitivity - noise_std * z


def _count_above(sorted_values: np.ndarray, thresholds: np.ndarray):
  return len(sorted_values) - np.searchsorted(sorted_values, thresholds,
                                              side="right")


def epsilon_lower_bound(with_canary, without_canary, *, delta: float,
                        upper_thresholds, lower_thresholds,
                        confidence: float = 0.95) -> float:
  """Lower bound on epsilon from the statistics of the two datasets.

  Args:
    with_canary: statistics of the trials on D (canary present).
    without_canary: statistics of the trials on D' (canary absent).
    delta: the delta at which epsilon is bounded.
    upper_thresholds: tests "s > t" (TPR vs FPR).
    lower_thresholds: tests "s <= t" (1 - FPR vs 1 - TPR).
    confidence: overall confidence; the candidate tests are corrected by a
      union bound, so the thresholds must not depend on these statistics.

  Returns:
    max(0, the largest certified bound over all candidate tests).
  """
  s1 = np.sort(np.asarray(with_canary, np.float64))
  s0 = np.sort(np.asarray(without_canary, np.float64))
  up = np.asarray(upper_thresholds, np.float64)
  low = np.asarray(lower_thresholds, np.float64)
  per_test = 1.0 - (1.0 - confidence) / (len(up) + len(low))
  n1, n0 = len(s1), len(s0)
  # s > t: TPR from below, FPR from above.
  tpr_lo, _ = clopper_pearson(_count_above(s1, up), n1, per_test)
  _, fpr_hi = clopper_pearson(_count_above(s0, up), n0, per_test)
  # s <= t: P_D'(s <= t) from below, P_D(s <= t) from above.
  tnr_lo, _ = clopper_pearson(n0 - _count_above(s0, low), n0, per_test)
  _, fnr_hi = clopper_pearson(n1 - _count_above(s1, low), n1, per_test)
  with np.errstate(divide="ignore"):
    bounds = np.concatenate([
        np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi),
        np.log(np.maximum(tnr_lo - delta, 0.0) / fnr_hi)])
  return float(max(0.0, np.max(bounds)))


def curve_thresholds(noise_std: float, trials: int,
                     points: int = GRID_POINTS) -> np.ndarray:
  """Thresholds of the curve test: t = noise_std * z for z evenly spaced
  in [-1, z_max], P(N(0, 1) > z_max) = 10 / trials (public quantities)."""
  z_max = float(stats.norm.isf(min(0.5, 10.0 / trials)))
  return noise_std * np.linspace(-1.0, z_max, points)


def mu_lower_bound(with_canary, without_canary, *, sampling_rate: float,
                   sensitivity: float, thresholds,
                   confidence: float = 0.95) -> float:
  """Lower bound on the mu of the smallest PoissonSampled(p, Gaussian)
  curve the observations respect (module docstring).

  Args:
    with_canary: statistics on D; without_canary: on D'.
    sampling_rate: the claimed p.
    sensitivity: Delta, the canary's shift of the statistic.
    thresholds: the tests "s > t" (fixed before seeing the data).
    confidence: probability that all the intervals hold.

  Returns:
    mu_lb in units of 1 / noise multiplier (0: nothing certified; inf: no
    noise at rate p explains the observations).
  """
  s1 = np.sort(np.asarray(with_canary, np.float64)) / sensitivity
  s0 = np.sort(np.asarray(without_canary, np.float64)) / sensitivity
  t = np.asarray(thresholds, np.float64) / sensitivity
  a = (1.0 - confidence) / (2 * len(t))  # one-sided, union over 2 |t|
  k1, k0 = _count_above(s1, t), _count_above(s0, t)
  n1, n0 = len(s1), len(s0)
  beta_lo = np.where(k1 > 0, stats.beta.ppf(a, np.maximum(k1, 1),
                                             n1 - k1 + 1), 0.0)
  alpha_hi = np.where(k0 < n0, stats.beta.ppf(1 - a, k0 + 1,
                                               np.maximum(n0 - k0, 1)), 1.0)
  p = float(sampling_rate)
  # beta_lo = (1 - p) alpha_hi + p Phi_bar(Phi_bar^-1(alpha_hi) - mu_t).
  excess = (beta_lo - (1 - p) * alpha_hi) / p
  with np.errstate(divide="ignore", invalid="ignore"):
    mu_t = np.where(
        excess >= 1.0, np.inf,
        stats.norm.isf(alpha_hi) - stats.norm.isf(np.clip(excess, 1e-300,
                                                          1.0)))
  mu_t = np.where(excess <= alpha_hi, 0.0, mu_t)  # not above chance
  return float(max(0.0, np.max(mu_t)))


def epsilon_of_mu(mu: float, sampling_rate: float, delta: float) -> float:
  """Epsilon at delta of one PoissonSampled(p, Gaussian(1 / mu))."""
  if mu <= 0:
    return 0.0
  if not math.isfinite(mu):
    return math.inf
  return accounted_epsilon(1.0 / mu, sampling_rate, delta)


# ---------------------------------------------------------------------------
# Canary setups: each runs a production mechanism once per key.


class _Setup(NamedTuple):
  """run(keys, data) -> statistics (jitted, vmapped over keys), the data of
  D (with the canary) and D' (without), and the canary's shift Delta."""
  run: Callable[[jax.Array, Any], jax.Array]
  with_canary: Any
  without_canary: Any
  sensitivity: float


def _setup(trial, with_canary, without_canary, sensitivity) -> _Setup:
  return _Setup(jax.jit(jax.vmap(trial, in_axes=(0, None))), with_canary,
                without_canary, float(sensitivity))


def _canary_rows(copies: int):
  """Flattened d = 4 examples: others orthogonal to u (some far above the
  clip norm), then `copies` canaries 10 C u. Returns u, x and y of D and
  of D' (D without the canaries)."""
  d = int(np.prod(_IMAGE_SHAPE))
  u = np.full(d, 1.0 / math.sqrt(d), np.float32)
  others = np.array([[1, -1, 1, -1], [3, 3, -3, -3], [0.2, -0.2, -0.2, 0.2],
                     [5, -5, -5, 5], [0.5, 0.5, -0.5, -0.5], [2, -2, 2, -2]],
                    np.float32)
  y_others = np.array([0, 0, 0, 1, 1, 1], np.int32)
  canary = np.repeat((CANARY_NORM * _CLIP_NORM * u)[None], copies, 0)
  x1 = np.concatenate([others, canary]).reshape(-1, *_IMAGE_SHAPE)
  y1 = np.concatenate([y_others, np.zeros(copies, np.int32)])  # class 0
  return u, (x1, y1), (others.reshape(-1, *_IMAGE_SHAPE), y_others)


def _flatten_embed(params, x):
  del params
  return x.reshape(x.shape[0], -1)


def _query_setup(sigma, clip, p, copies, sharded=False) -> _Setup:
  u, (x1, y1), (x0, y0) = _canary_rows(copies)
  rows = len(y1)  # the public padded length (flat layout, as a run)
  spec = mechanisms.QuerySpec(
      embed_fn=_flatten_embed, num_classes=_NUM_CLASSES, clip_norm=clip,
      noise_multiplier=sigma, sampling_rate=p,
      capacity=mechanisms.poisson_capacity([rows], p), strategy="none")
  aug = augment.identity_params((_NUM_CLASSES,))
  u = jnp.asarray(u)
  if sharded:
    mesh = parallel.data_mesh(jax.local_device_count())
    shards = parallel.num_shards(mesh)
    spec = dataclasses.replace(spec, capacity=mechanisms.poisson_capacity(
        [parallel.rows_per_device(rows, mesh)], p,
        mechanisms.OVERFLOW_TAIL / shards))

    def data(x, y):
      return mechanisms.FlatData(*parallel.local_rows(mesh, x, y,
                                                      num_rows=rows))

    def trial(key, d):
      sums, _ = parallel.sharded_noisy_targets(spec, d, None, aug, key,
                                               mesh=mesh)
      return sums[0] @ u
  else:
    def data(x, y):
      return mechanisms.FlatData(*map(jnp.asarray,
                                      parallel.padded_rows(rows, x, y)))

    def trial(key, d):
      sums, _ = mechanisms.noisy_targets(spec, d, None, aug, key)
      return sums[0] @ u  # the canary's class row

  # Clipped at clip (possibly a fault above C), the canary moves s by
  # min(clip, 10 C) per copy; Delta is the claimed C.
  return _setup(trial, data(x1, y1), data(x0, y0), _CLIP_NORM)


_SATURATE = 1e4  # head bias of class 0: softmax exactly one-hot in float32


def _dp_sgd_setup(sigma, clip, p, copies) -> _Setup:
  model = models.ConvNet(_NUM_CLASSES, width=2, depth=1)
  params = models.init_params(model, jax.random.key(0), (4, 4, 1))
  params = jax.tree.map(lambda a: a, params)
  params["head"]["bias"] = jnp.asarray([_SATURATE, 0.0], jnp.float32)
  params["norm0"]["scale"] = jnp.full_like(params["norm0"]["scale"], 10.0)
  rng = np.random.default_rng(0)
  others = rng.normal(size=(6, 4, 4, 1)).astype(np.float32)
  canary = rng.normal(size=(1, 4, 4, 1)).astype(np.float32)
  x1 = np.concatenate([others, np.repeat(canary, copies, 0)])
  y1 = np.r_[np.zeros(6, np.int32), np.ones(copies, np.int32)]
  x0, y0 = others, np.zeros(6, np.int32)
  rows = len(x1)  # the public bound on N, the same for D and D'
  grad_sum = pergrad.make_grad_sum_fn(model, clip_norm=clip)

  def private_step(sigma_, p_, x, y):
    return expert.private_step(
        grad_sum, expert.ExpertConfig(sampling_rate=p_, clip_norm=clip),
        sigma_, x, y, rows, math.log(mechanisms.OVERFLOW_TAIL))

  # The canary's clipped gradient, through the same step (no noise, p = 1).
  step1, rows1 = private_step(0.0, 1.0, canary, np.ones(1, np.int32))
  g_c = _flat(step1(params, *rows1, jax.random.key(0))[0])
  norm = float(jnp.linalg.norm(g_c))
  if not norm > 0.99 * min(clip, _CLIP_NORM):
    raise AssertionError(f"the canary's gradient ({norm:g}) must be clipped")
  u = g_c / norm
  step, rows_with = private_step(sigma, p, x1, y1)
  _, rows_without = private_step(sigma, p, x0, y0)

  def trial(key, r):
    return _flat(step(params, *r, key)[0]) @ u

  return _setup(trial, rows_with, rows_without, _CLIP_NORM)


def _flat(tree) -> jax.Array:
  return jnp.concatenate([a.reshape(-1) for a in jax.tree.leaves(tree)])


def _padded_pair(others, canary, copies):
  """(D, D'): six other rows (classes 0 and 1) with and without `copies`
  canaries of class 0, padded to the same public length 6 + copies."""
  rows = 6 + copies

  def padded(x):
    y = np.r_[[0, 0, 0, 1, 1, 1], np.zeros(len(x) - 6)].astype(np.int32)
    return tuple(map(jnp.asarray, parallel.padded_rows(rows, x, y)))

  return (padded(np.concatenate([others, np.repeat(canary, copies, 0)])),
          padded(others))


def _generator_setup(sigma, clip, p, copies) -> _Setup:
  del clip, p  # norm-1 features; the whole dataset
  d = int(np.prod(_IMAGE_SHAPE))
  fmap = merf.FeatureMap.create(jax.random.key(0), d,
                                     _GENERATOR_FEATURES)
  rng = np.random.default_rng(0)
  others = rng.normal(size=(6, *_IMAGE_SHAPE)).astype(np.float32)
  canary = rng.normal(size=(1, *_IMAGE_SHAPE)).astype(np.float32)
  v = fmap.bounded(jnp.asarray(canary))[0]  # the canary's feature: u
  with_canary, without_canary = _padded_pair(others, canary, copies)

  def release(data, sigma_, key):
    return merf.release_class_features(
        fmap, *data, num_classes=_NUM_CLASSES, noise_multiplier=sigma_,
        noise_key=key)

  # The noiseless release of D' (same function, sigma = 0) centres s.
  base = release(without_canary, 0.0, jax.random.key(0))[0] @ v

  def trial(key, data):
    return release(data, sigma, key)[0] @ v - base

  return _setup(trial, with_canary, without_canary,
                merf.GENERATOR_SENSITIVITY)


_PE_VOTES = 2  # k of the audited histogram
_PE_SOFT = {"k": 3, "tau": 0.5}  # of the audited soft histogram


def _pe_setup(sigma, clip, p, copies, *, k=_PE_VOTES, tau=0.0) -> _Setup:
  del clip, p  # votes, not clipped sums; the whole dataset
  votes = {"k": k, "tau": tau, "bits": pe.soft_bits(6 + copies)
           if tau > 0 else None}  # the same bits with and without
  rng = np.random.default_rng(0)
  pop = jnp.asarray(rng.normal(size=(_NUM_CLASSES, 4, 4)), jnp.float32)
  others = rng.normal(size=(6, 4)).astype(np.float32)
  canary = rng.normal(size=(1, 4)).astype(np.float32)
  with_canary, without_canary = _padded_pair(others, canary, copies)

  def release(data, sigma_, key):
    counts = pe.private_histogram(pop, *data, **votes)
    return pe.release_histogram(key, counts, sigma_, **votes).reshape(-1)

  # The canary's own votes (a one-row histogram) give u; the noiseless
  # histogram of D' centres s.
  alone = pe.private_histogram(pop, jnp.asarray(canary), jnp.zeros(1,
                                                                  jnp.int32),
                               jnp.ones(1), **votes).reshape(-1)
  alone = alone.astype(jnp.float32)
  u = alone / jnp.linalg.norm(alone)
  base = release(without_canary, 0.0, jax.random.key(0)) @ u

  def trial(key, data):
    return release(data, sigma, key) @ u - base

  return _setup(trial, with_canary, without_canary, pe.SENSITIVITY)


def _count_setup(sigma, clip, p, copies) -> _Setup:
  del clip, p
  y0 = np.array([0, 0, 0, 1, 1, 1], np.int32)
  y1 = np.r_[y0, np.zeros(copies, np.int32)]  # the canary: one more of 0
  t1, t0 = (jnp.asarray(counts.class_tally(y, _NUM_CLASSES))
            for y in (y1, y0))

  def trial(key, tally):
    return counts.noisy_counts(key, tally, sigma)[0] - t0[0]

  return _setup(trial, t1, t0, counts.COUNT_SENSITIVITY)


_SETUPS = {
    "feature_matching": _query_setup,
    "feature_matching_sharded": functools.partial(_query_setup,
                                                  sharded=True),
    "dp_sgd": _dp_sgd_setup, "generator": _generator_setup,
    "pe_histogram": _pe_setup,
    "pe_soft_histogram": functools.partial(_pe_setup, **_PE_SOFT),
    "class_counts": _count_setup}


@functools.lru_cache(maxsize=64)
def _cached_setup(mechanism: str, noise_multiplier: float, clip_norm: float,
                  sampling_rate: float, copies: int) -> _Setup:
  """The setup of the mechanism as it actually runs (cached, so repeated
  audits of one configuration compile once)."""
  return _SETUPS[mechanism](noise_multiplier, clip_norm, sampling_rate,
                            copies)


def _statistics(run, data, key: jax.Array, trials: int,
                chunk: int = CHUNK) -> np.ndarray:
  """run(keys, data) on `trials` independent keys, in chunks of `chunk`."""
  chunk = min(chunk, trials)
  out = []
  for i in range(-(-trials // chunk)):
    keys = jax.random.split(jax.random.fold_in(key, i), chunk)
    out.append(np.asarray(run(keys, data)))
  return np.concatenate(out)[:trials]


# ---------------------------------------------------------------------------
# The audit.


def _validate(noise_multiplier, sampling_rate, trials, delta, confidence):
  if not (isinstance(noise_multiplier, (int, float))
          and accounting.MIN_NOISE_MULTIPLIER <= noise_multiplier
          <= accounting.MAX_NOISE_MULTIPLIER):
    raise ConfigError(
        f"noise multiplier must be a number in "
        f"[{accounting.MIN_NOISE_MULTIPLIER:g}, "
        f"{accounting.MAX_NOISE_MULTIPLIER:g}], got {noise_multiplier}")
  if not 0 < sampling_rate <= 1:
    raise ConfigError(f"sampling rate must be in (0, 1], got "
                      f"{sampling_rate}")
  require_int(trials, "trials", MIN_TRIALS)
  if not 0 < delta < 1:
    raise ConfigError(f"delta must be in (0, 1), got {delta}")
  if not 0 < confidence < 1:
    raise ConfigError(f"confidence must be in (0, 1), got {confidence}")


def accounted_epsilon(noise_multiplier: float, sampling_rate: float,
                      delta: float) -> float:
  """PLD epsilon of one release: PoissonSampled(p, Gaussian(sigma))."""
  mech = accounting.Mechanism("audit", float(noise_multiplier),
                              float(sampling_rate), 1)
  return accounting.epsilon_of(mech.event(), delta)


def audit_mechanism(mechanism: str, noise_multiplier: float, *,
                    sampling_rate: float = 0.5, trials: int = 100_000,
                    delta: float = 1e-5, key: jax.Array | None = None,
                    confidence: float = 0.95,
                    fault: Fault = Fault()) -> AuditRecord:
  """Audits one mechanism at one claimed noise multiplier.

  Args:
    mechanism: one of `MECHANISMS`.
    noise_multiplier: the claimed sigma (used for the accounted epsilon and
      the threshold grid).
    sampling_rate: claimed Poisson rate p (forced to 1 for the generator
      and the class counts, which read the whole dataset).
    trials: releases per neighbouring dataset.
    delta: delta of the accounted epsilon and of the bounds.
    key: PRNG key of the audit (public: the audit is a test, not a private
      run); default `seed_key(0)`.
    confidence: confidence of the lower bounds.
    fault: FAULT INJECTION (default: the mechanism as it runs).

  Returns:
    The AuditRecord (the accounted epsilon is always the claimed one).
  """
  if mechanism not in _SETUPS:
    raise ConfigError(f"unknown mechanism {mechanism!r}; expected one of "
                      f"{MECHANISMS}")
  if mechanism in UNSAMPLED:
    sampling_rate = 1.0
    if fault.clip_factor != 1.0:
      raise ConfigError(f"{mechanism} has no clipping to remove: its "
                        "contributions are bounded by construction")
  _validate(noise_multiplier, sampling_rate, trials, delta, confidence)
  if not (fault.noise_scale > 0 and fault.clip_factor > 0
          and fault.sampling_factor > 0 and fault.copies >= 1):
    raise ConfigError("fault parameters must be > 0")
  key = seed_key(0) if key is None else key
  t0 = time.time()
  c = 1.0 if mechanism in UNSAMPLED else _CLIP_NORM
  # As run: clip at clip_factor * C, noise std noise_scale * sigma * C.
  setup = _cached_setup(
      mechanism, float(fault.noise_scale * noise_multiplier
                       / fault.clip_factor),
      float(fault.clip_factor * c),
      float(min(1.0, fault.sampling_factor * sampling_rate)),
      int(fault.copies))
  k_with, k_without = jax.random.split(key)
  s1 = _statistics(setup.run, setup.with_canary, k_with, trials)
  s0 = _statistics(setup.run, setup.without_canary, k_without, trials)
  # The thresholds use the claim only (public), never the faults or data.
  noise_std = noise_multiplier * setup.sensitivity
  mu = mu_lower_bound(s1, s0, sampling_rate=sampling_rate,
                      sensitivity=setup.sensitivity,
                      thresholds=curve_thresholds(noise_std, trials),
                      confidence=confidence)
  up, low = threshold_grid(noise_std, setup.sensitivity, trials)
  classic = epsilon_lower_bound(s1, s0, delta=delta, upper_thresholds=up,
                                lower_thresholds=low, confidence=confidence)
  return AuditRecord(
      mechanism=mechanism, noise_multiplier=float(noise_multiplier),
      sampling_rate=float(sampling_rate),
      epsilon_accounted=accounted_epsilon(noise_multiplier, sampling_rate,
                                          delta),
      epsilon_lower_bound=epsilon_of_mu(mu, sampling_rate, delta),
      epsilon_lower_bound_threshold=classic, mu_lower_bound=mu,
      delta=float(delta), trials=int(trials), seconds=time.time() - t0,
      confidence=float(confidence), fault=fault.name)


def seed_key(seed: int) -> jax.Array:
  """The audit's PRNG key from a public seed (the audit is not private);
  of the secret keys' kind (noise.SECRET_IMPL), as the mechanisms get."""
  return noise.deterministic_secret_key(seed)


def audit_all(noise_multipliers: Sequence[float] = (1.0, 2.0), *,
              trials: int = 100_000, delta: float = 1e-5,
              key: jax.Array | None = None, sampling_rate: float = 0.5,
              confidence: float = 0.95,
              names: Sequence[str] = MECHANISMS) -> list[AuditRecord]:
  """Audits every mechanism (or those in `names`) at every noise multiplier.

  The sampled mechanisms use `sampling_rate`; the generator and the class
  counts read the whole dataset. Keys are folded from `key` per mechanism
  and noise level. All arguments are validated before any computation.

  Returns:
    One AuditRecord per (mechanism, noise multiplier), mechanism-major.

  Raises:
    ConfigError: for an invalid argument.
  """
  if not noise_multipliers:
    raise ConfigError("at least one noise multiplier is required")
  unknown = [m for m in names if m not in MECHANISMS]
  if unknown or not names:
    raise ConfigError(f"unknown mechanism(s) {unknown}; expected some of "
                      f"{MECHANISMS}")
  for s in noise_multipliers:
    _validate(s, sampling_rate, trials, delta, confidence)
  key = seed_key(0) if key is None else key
  records = []
  for i, name in enumerate(MECHANISMS):
    if name not in names:
      continue
    for j, sigma in enumerate(noise_multipliers):
      records.append(audit_mechanism(
          name, sigma, sampling_rate=sampling_rate, trials=trials,
          delta=delta, key=jax.random.fold_in(key, 1000 * i + j),
          confidence=confidence))
  return records


def fault_variants(mechanism: str) -> list[Fault]:
  """The broken variants the audit must catch for a mechanism: 0.8x the
  noise, a double-counted example, and where they apply twice the
  sampling rate and no clipping."""
  faults = [Fault(noise_scale=0.8), Fault(copies=2)]
  if mechanism not in UNSAMPLED:
    faults += [Fault(sampling_factor=2.0),
               Fault(clip_factor=CANARY_NORM)]
  return faults


def audit_faults(noise_multiplier: float, *, trials: int, delta: float,
                 key: jax.Array, sampling_rate: float, confidence: float,
                 names: Sequence[str] = MECHANISMS) -> list[AuditRecord]:
  """Every `fault_variants` of every mechanism in `names`, audited as
  `audit_mechanism` does (a caught fault has passed = False)."""
  records = []
  for i, name in enumerate(MECHANISMS):
    if name not in names:
      continue
    for j, fault in enumerate(fault_variants(name)):
      records.append(audit_mechanism(
          name, noise_multiplier, sampling_rate=sampling_rate,
          trials=trials, delta=delta, confidence=confidence, fault=fault,
          key=jax.random.fold_in(key, 10_000 + 100 * i + j)))
  return records


# ---------------------------------------------------------------------------
# The noise sampler itself.


@dataclasses.dataclass(frozen=True)
class SamplerCheck:
  """KS p-values of the sampler: its law, and its far tail conditioned
  through its bits (|z| beyond `tail_starts`); max_abs_z of the draws."""
  ks_pvalue: float
  tail_starts: tuple
  tail_ks_pvalues: tuple
  max_abs_z: float
  draws: int
  passed: bool

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def sampler_check(draws: int = 100_000, key: jax.Array | None = None,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  level: float = 1e-4) -> SamplerCheck:
  """Tests the atom-free sampler (noise.standard_normal_from_bits), or a
  `transform` (words (6, n) uint32 -> z) in its place.

  A KS test of `draws` normals, and for k = 1, 2 a KS test of |z| given
  that the first k words of the exponent stream are zero (u < 2^-32k),
  against the normal law conditioned on |Z| > Phi_bar^-1(2^-(32k+1)):
  a float32 sampler has no mass there and fails.
  """
  key = jax.random.key(0) if key is None else key
  transform = transform or _sampler_transform
  words = np.array(jax.random.bits(key, (noise.WORDS_PER_NORMAL, draws),
                                   jnp.uint32))
  z = transform(words)
  pvalues, starts = [], []
  for k in (1, 2):
    w = words.copy()
    w[2:2 + k] = 0
    tail = np.abs(transform(w))
    t0 = float(-special.ndtri(2.0**(-32 * k) / 2))
    cdf = lambda t, t0=t0: np.clip(1 - stats.norm.sf(t) / stats.norm.sf(t0),
                                   0, 1)
    pvalues.append(float(stats.kstest(tail, cdf).pvalue))
    starts.append(t0)
  ks = float(stats.kstest(z, "norm").pvalue)
  return SamplerCheck(ks, tuple(starts), tuple(pvalues),
                      float(np.max(np.abs(z))), int(draws),
                      bool(ks > level and min(pvalues) > level))


def _sampler_transform(words: np.ndarray) -> np.ndarray:
  with jax.enable_x64(True):
    return np.asarray(noise.standard_normal_from_bits(jnp.asarray(words)))


def write_records(records: Sequence[AuditRecord], out: str,
                  sampler: SamplerCheck | None = None,
                  faults: Sequence[AuditRecord] = ()) -> str:
  """Writes out/audit.json atomically (a list of the records, or
  {"records", "sampler", "faults"} with a sampler check); returns its
  path."""
  # The project's atomic JSON writer (tempfile + os.replace).
  from dpgeng_jax import pipeline  # pylint: disable=import-outside-toplevel
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "audit.json")
  doc = [r.to_dict() for r in records]
  if sampler is not None:
    doc = {"records": doc, "sampler": sampler.to_dict(),
           "faults": [r.to_dict() for r in faults]}
  # pylint: disable-next=protected-access
  outputs.atomic_write(path, pipeline._json(doc))
  return path


def format_table(records: Sequence[AuditRecord]) -> str:
  """The records as a text table (lower bounds next to accounted
  epsilon)."""
  lines = [f"{'mechanism':<25} {'sigma':>6} {'p':>5} {'eps accounted':>14} "
           f"{'eps lower bd':>13} {'threshold bd':>13} {'trials':>8} "
           f"{'seconds':>8}  {'':<4}"]
  for r in records:
    lines.append(
        f"{r.mechanism:<25} {r.noise_multiplier:>6.3g} "
        f"{r.sampling_rate:>5.3g} {r.epsilon_accounted:>14.4f} "
        f"{r.epsilon_lower_bound:>13.4f} "
        f"{r.epsilon_lower_bound_threshold:>13.4f} {r.trials:>8d} "
        f"{r.seconds:>8.2f}  {'ok' if r.passed else 'FAIL'}"
        + (f"  fault: {r.fault}" if r.fault else ""))
  return "\n".join(lines)
