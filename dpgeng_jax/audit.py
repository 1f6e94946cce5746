"""Empirical privacy audit: lower bounds on epsilon from canary attacks.

For each private mechanism of the library the audit runs the library's own
code path many times on two neighbouring datasets (add/remove adjacency):
D' and D = D' + one canary example, chosen worst case: its clipped
contribution to the released sum has norm exactly C (the sensitivity) in a
known direction u, and every other example contributes nothing along u. The
test statistic is the projection of the release onto u (the likelihood ratio
is monotone in it, so a threshold test on it is the most powerful test).

Mechanisms audited, one release per trial:

* ``feature_matching``: `mechanisms.noisy_targets` (Poisson sampling at rate
  p, identity augmentation, per-example clipping of the embedding to C,
  per-class sums, noise sigma * C). The embedding is the flattened image, so
  a canary of norm 10 C along u is clipped to exactly C u.
* ``dp_sgd``: `mechanisms.poisson_batch_indices` + `make_dp_sgd_step`, as in
  `expert.dp_finetune`, with a linear loss whose per-example gradient is the
  example itself (canary gradient 10 C u, clipped to C u). The statistic is
  the released noisy gradient times the public expected batch size.
* ``generator``: `generator.release_class_features` with a
  `generator.FeatureMap` (norm-1 features, class sums, noise sigma); u is the
  canary's own feature vector (its shift along u is |v|^2 = 1). The
  noiseless release of D' (the same function with sigma = 0) is subtracted,
  so the statistic is centred.

For the query and DP-SGD, D' holds a zero example in the canary's place:
its embedding / gradient is exactly 0, so it adds nothing and the release
has exactly the distribution of D with the canary removed, with the same
shapes (one compile). For the generator D' is D without the canary's row.

The accounted epsilon of one trial is that of PoissonSampled(p,
Gaussian(sigma)) (Gaussian(sigma) for p = 1) from `accounting.epsilon_pld`.

Turning trials into a bound. For a threshold t, with TPR = P_D(s > t) and
FPR = P_D'(s > t), (epsilon, delta)-DP implies TPR <= e^eps FPR + delta, so
eps >= log((TPR - delta) / FPR); the other tail gives eps >=
log((1 - FPR - delta) / (1 - TPR)). TPR and FPR are replaced by
Clopper-Pearson bounds (TPR from below, FPR from above). Threshold choice:
thresholds are NOT chosen on the data. A fixed grid of `GRID_POINTS`
thresholds per tail is derived from public quantities only (the claimed
noise std, the sensitivity and the number of trials), and the search over
the 2 * GRID_POINTS candidate tests is corrected by a union bound
(Bonferroni): each candidate's intervals have confidence 1 - alpha / M with
M = 2 * GRID_POINTS and alpha = 1 - confidence. The reported bound is the
maximum over candidates, which then holds with probability >= confidence.

Fault injection (`noise_scale`, `clip_factor` of `audit_mechanism`) runs the
same code path with a wrong noise scale or a clipping bound far above C,
while the accounted epsilon stays the claimed one: the audit must then
report a lower bound above the claim (tests/test_audit.py).
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
import optax
from scipy import stats

from dpgeng_jax import accounting, augment, generator, mechanisms
from dpgeng_jax.errors import ConfigError, require_int

MECHANISMS = ("feature_matching", "dp_sgd", "generator")
GRID_POINTS = 40  # thresholds per tail (see the module docstring)
CANARY_NORM = 10.0  # the canary's norm before clipping, in units of C
CHUNK = 2**15  # trials per vmapped chunk (bounds memory)
MIN_TRIALS = 100

_IMAGE_SHAPE = (2, 2, 1)  # d = 4 pixels: small, so trials are cheap
_NUM_CLASSES = 2
_CLIP_NORM = 1.0
_GENERATOR_FEATURES = 8


@dataclasses.dataclass(frozen=True)
class AuditRecord:
  """One audited mechanism at one noise level.

  Attributes:
    mechanism: one of `MECHANISMS`.
    noise_multiplier: the claimed sigma.
    sampling_rate: Poisson rate p of one release (1.0: the whole dataset).
    epsilon_accounted: PLD epsilon of one release at `delta`.
    epsilon_lower_bound: the empirical lower bound (holds with probability
      >= `confidence`); 0 when the attack certifies nothing.
    delta: the delta of both figures.
    trials: releases per neighbouring dataset (2 * trials in all).
    seconds: wall time of the audit of this mechanism (compile included).
    confidence: confidence of the lower bound.
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

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


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


# ---------------------------------------------------------------------------
# Canary setups: each runs the library's own mechanism once per key.


class _Setup(NamedTuple):
  """run(keys, data) -> statistics (jitted, vmapped over keys) and the data
  of D (with the canary) and D' (without)."""
  run: Callable[[jax.Array, Any], jax.Array]
  with_canary: Any
  without_canary: Any


def _setup(trial, with_canary, without_canary) -> _Setup:
  return _Setup(jax.jit(jax.vmap(trial, in_axes=(0, None))), with_canary,
                without_canary)


def _canary_data():
  """Flattened d = 4 examples: others orthogonal to u, canary 10 C u last.

  Returns u, labels, x of D and x of D' (a zero example in the canary's
  place; see the module docstring).
  """
  d = int(np.prod(_IMAGE_SHAPE))
  u = np.full(d, 1.0 / math.sqrt(d), np.float32)
  # Rows orthogonal to u (zero sum), some far above the clip norm.
  others = np.array([[1, -1, 1, -1], [3, 3, -3, -3], [0.2, -0.2, -0.2, 0.2],
                     [5, -5, -5, 5], [0.5, 0.5, -0.5, -0.5], [2, -2, 2, -2]],
                    np.float32)
  y = np.array([0, 0, 0, 1, 1, 1, 0], np.int32)  # canary in class 0
  x_with = np.concatenate([others, (CANARY_NORM * _CLIP_NORM * u)[None]])
  x_without = np.concatenate([others, np.zeros((1, d), np.float32)])
  return u, y, x_with, x_without


def _flatten_embed(params, x):
  del params
  return x.reshape(x.shape[0], -1)


def _feature_matching_setup(noise_multiplier, clip_norm,
                            sampling_rate) -> _Setup:
  u, y, x1, x0 = _canary_data()
  spec = mechanisms.QuerySpec(
      embed_fn=_flatten_embed, num_classes=_NUM_CLASSES, clip_norm=clip_norm,
      noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
      capacity=mechanisms.poisson_capacity(
          np.bincount(y, minlength=_NUM_CLASSES), sampling_rate),
      strategy="none")
  aug_params = augment.identity_params((_NUM_CLASSES,))
  u = jnp.asarray(u)

  def data(x):
    return mechanisms.class_major(x.reshape(-1, *_IMAGE_SHAPE), y,
                                  _NUM_CLASSES)

  def trial(key, data):
    sums, _ = mechanisms.noisy_targets(spec, data, None, aug_params, key)
    return sums[int(y[-1])] @ u  # the canary's class row

  return _setup(trial, data(x1), data(x0))


def _dp_sgd_setup(noise_multiplier, clip_norm, sampling_rate) -> _Setup:
  u, _, x1, x0 = _canary_data()
  u = jnp.asarray(u)
  n = len(x1)
  batch_size = sampling_rate * n  # the public expected batch size

  def loss_fn(p, x):  # per-example gradient = the example itself
    return jnp.sum(x @ p["w"])

  opt = optax.sgd(1.0)
  params = {"w": jnp.zeros(u.shape, jnp.float32)}
  opt_state = opt.init(params)
  dp_step = mechanisms.make_dp_sgd_step(
      loss_fn, opt, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
      expected_batch_size=batch_size)
  capacity = mechanisms.poisson_capacity([n], sampling_rate)

  def trial(key, x):  # as the step of expert.dp_finetune
    k_sample, k_noise = jax.random.split(key)
    idx, mask, _ = mechanisms.poisson_batch_indices(k_sample, n,
                                                    sampling_rate, capacity)
    _, _, g = dp_step(params, opt_state, x[idx], mask, k_noise)
    return batch_size * (g["w"] @ u)  # the noisy clipped sum along u

  return _setup(trial, jnp.asarray(x1), jnp.asarray(x0))


def _generator_setup(noise_multiplier, clip_norm, sampling_rate) -> _Setup:
  del clip_norm, sampling_rate  # norm-1 features; the whole dataset
  d = int(np.prod(_IMAGE_SHAPE))
  fmap = generator.FeatureMap.create(jax.random.key(0), d,
                                     _GENERATOR_FEATURES)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(7, *_IMAGE_SHAPE)), jnp.float32)
  y = jnp.asarray([0, 0, 0, 1, 1, 1, 0], jnp.int32)  # canary last, class 0
  v = fmap.bounded(x[-1:])[0]  # the canary's feature: the direction u
  # Every feature has norm 1, so there is no null example: D' is D without
  # the canary's row (one more compile, for the other shape).
  with_canary, without_canary = (x, y), (x[:-1], y[:-1])

  def release(data, sigma, key):
    xs, ys = data
    return generator.release_class_features(
        fmap, xs, ys, jnp.ones(len(xs)), num_classes=_NUM_CLASSES,
        noise_multiplier=sigma, noise_key=key)

  # The noiseless release of D' (same function, sigma = 0) centres s.
  base = release(without_canary, 0.0, jax.random.key(0))[0] @ v

  def trial(key, data):
    return release(data, noise_multiplier, key)[0] @ v - base

  return _setup(trial, with_canary, without_canary)


_SETUPS = {"feature_matching": _feature_matching_setup,
           "dp_sgd": _dp_sgd_setup, "generator": _generator_setup}
# The claimed L2 sensitivity of each release (the canary's shift along u).
_SENSITIVITY = {"feature_matching": _CLIP_NORM, "dp_sgd": _CLIP_NORM,
                "generator": generator.GENERATOR_SENSITIVITY}


@functools.lru_cache(maxsize=32)
def _cached_setup(mechanism: str, noise_multiplier: float, clip_norm: float,
                  sampling_rate: float) -> _Setup:
  """The setup of the mechanism as it actually runs (cached, so repeated
  audits of one configuration compile once)."""
  return _SETUPS[mechanism](noise_multiplier, clip_norm, sampling_rate)


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
          and math.isfinite(noise_multiplier) and noise_multiplier > 0):
    raise ConfigError(f"noise multiplier must be a finite number > 0, got "
                      f"{noise_multiplier}")
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
  return accounting.epsilon_pld(mech.event(), delta)


def audit_mechanism(mechanism: str, noise_multiplier: float, *,
                    sampling_rate: float = 1.0, trials: int = 100_000,
                    delta: float = 1e-5, key: jax.Array | None = None,
                    confidence: float = 0.95, noise_scale: float = 1.0,
                    clip_factor: float = 1.0) -> AuditRecord:
  """Audits one mechanism at one claimed noise multiplier.

  Args:
    mechanism: one of `MECHANISMS`.
    noise_multiplier: the claimed sigma (used for the accounted epsilon and
      the threshold grid).
    sampling_rate: Poisson rate p (1.0 for the generator).
    trials: releases per neighbouring dataset.
    delta: delta of the accounted epsilon and of the bound.
    key: PRNG key of the audit (public: the audit is a test, not a private
      run); default `jax.random.key(0)`.
    confidence: confidence of the lower bound.
    noise_scale: FAULT INJECTION: the mechanism adds noise_scale times the
      claimed noise (1.0 = correct).
    clip_factor: FAULT INJECTION: the mechanism clips at clip_factor * C
      (its noise std stays noise_scale * sigma * C); with clip_factor >=
      CANARY_NORM the canary enters unclipped (1.0 = correct).

  Returns:
    The AuditRecord (accounted epsilon is always the claimed one).
  """
  if mechanism not in _SETUPS:
    raise ConfigError(f"unknown mechanism {mechanism!r}; expected one of "
                      f"{MECHANISMS}")
  _validate(noise_multiplier, sampling_rate, trials, delta, confidence)
  if mechanism == "generator" and clip_factor != 1.0:
    raise ConfigError("the generator has no clipping to remove: its "
                      "features have norm 1 by construction")
  if mechanism == "generator" and sampling_rate != 1.0:
    raise ConfigError("the generator's release reads the whole dataset "
                      "(sampling rate 1)")
  if not (noise_scale > 0 and clip_factor > 0):
    raise ConfigError("noise_scale and clip_factor must be > 0")
  key = seed_key(0) if key is None else key
  t0 = time.time()
  c = _SENSITIVITY[mechanism]
  # As run: clip at clip_factor * C, noise std noise_scale * sigma * C.
  setup = _cached_setup(mechanism,
                        float(noise_scale * noise_multiplier / clip_factor),
                        float(clip_factor * c), float(sampling_rate))
  k_with, k_without = jax.random.split(key)
  s1 = _statistics(setup.run, setup.with_canary, k_with, trials)
  s0 = _statistics(setup.run, setup.without_canary, k_without, trials)
  # The grid uses the claim only (public), never the faults or the data.
  up, low = threshold_grid(noise_multiplier * c, c, trials)
  lb = epsilon_lower_bound(s1, s0, delta=delta, upper_thresholds=up,
                           lower_thresholds=low, confidence=confidence)
  return AuditRecord(
      mechanism=mechanism, noise_multiplier=float(noise_multiplier),
      sampling_rate=float(sampling_rate),
      epsilon_accounted=accounted_epsilon(noise_multiplier, sampling_rate,
                                          delta),
      epsilon_lower_bound=lb, delta=float(delta), trials=int(trials),
      seconds=time.time() - t0, confidence=float(confidence))


def seed_key(seed: int) -> jax.Array:
  """The audit's PRNG key from a public seed (the audit is not private)."""
  return jax.random.key(seed)


def audit_all(noise_multipliers: Sequence[float] = (1.0, 2.0), *,
              trials: int = 200_000, delta: float = 1e-5,
              key: jax.Array | None = None, sampling_rate: float = 1.0,
              confidence: float = 0.95,
              names: Sequence[str] = MECHANISMS) -> list[AuditRecord]:
  """Audits every mechanism (or those in `names`) at every noise multiplier.

  The feature-matching query and DP-SGD use `sampling_rate`; the generator
  always reads the whole dataset. Keys are folded from `key` per mechanism
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
    p = 1.0 if name == "generator" else sampling_rate
    for j, sigma in enumerate(noise_multipliers):
      records.append(audit_mechanism(
          name, sigma, sampling_rate=p, trials=trials, delta=delta,
          key=jax.random.fold_in(key, 1000 * i + j), confidence=confidence))
  return records


def write_records(records: Sequence[AuditRecord], out: str) -> str:
  """Writes out/audit.json (a list of the records) atomically; its path."""
  # The project's atomic JSON writer (tempfile + os.replace).
  from dpgeng_jax import pipeline  # pylint: disable=import-outside-toplevel
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "audit.json")
  # pylint: disable-next=protected-access
  pipeline._atomic_write(path, pipeline._json([r.to_dict() for r in records]))
  return path


def format_table(records: Sequence[AuditRecord]) -> str:
  """The records as a text table (lower bound next to accounted epsilon)."""
  lines = [f"{'mechanism':<17} {'sigma':>6} {'p':>5} {'eps accounted':>14} "
           f"{'eps lower bd':>13} {'delta':>8} {'trials':>9} {'seconds':>8}"]
  for r in records:
    lines.append(
        f"{r.mechanism:<17} {r.noise_multiplier:>6.3g} "
        f"{r.sampling_rate:>5.3g} {r.epsilon_accounted:>14.4f} "
        f"{r.epsilon_lower_bound:>13.4f} {r.delta:>8.1e} {r.trials:>9d} "
        f"{r.seconds:>8.2f}")
  return "\n".join(lines)
