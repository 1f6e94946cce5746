"""The private mechanisms: secret keys, Poisson sampling, Gaussian noise and
the M_F feature-matching query (ALGORITHM.md).

Privacy-relevant invariants, each tested in tests/test_mechanisms.py:
* Sampling and noise keys come from `secret_key()` (128 bits of OS entropy,
  noise.py) unless the caller asks for the deterministic test mode; they
  are never returned to the caller or written anywhere by this library.
* Poisson sampling includes each private example independently with
  probability p' <= p (`noise.bernoulli`: p' = floor(p 2^32) / 2^32).
  Batches are padded to a fixed capacity (per class for class-major data,
  in all for flat data) so that each query compiles once; the capacity is
  chosen so that overflow has probability <= tau per padded batch (tau
  from the run's delta, see accounting.failure_log_tail), and an overflow
  raises `SamplingOverflowError` instead of dropping examples.
* Noise N(0, (sigma * C)^2) is added once to the (K, d) clipped class sums,
  whose L2 sensitivity is C (see clipping.py), with the atom-free sampler
  (noise.add_gaussian_noise: float64 draw, float64 sum, one rounding).
  With noise the sums are int32 in fixed point (`release_bits`): exact in
  any order, so one example moves them by its own quantised row, norm
  <= C, however many rows, chunks or devices the sum has.
  Sums are released; callers normalise by public constants only.
* Private arrays are arguments of the compiled programs, never constants
  captured by a closure (a persistent compilation cache or an XLA dump
  would otherwise write them to disk).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from dpgeng_jax import augment, noise
from dpgeng_jax.clipping import (check_clip_norm, check_labels,
                                 clipped_class_sums, clipped_grad_sum,
                                 fixed_point_bits, fixed_point_scale,
                                 unclipped)
from dpgeng_jax.errors import PrivacyAbort, require_int
# Re-exported: the secret keys and the sampler, where callers found them.
from dpgeng_jax.noise import (  # noqa: F401
    add_gaussian_noise, deterministic_secret_key, gaussian_noise, secret_key,
    tree_add_gaussian_noise)

# Default per-class, per-batch overflow probability of a Poisson batch when
# the caller gives none (library use). A run derives its tail from its delta
# (accounting.failure_log_tail); an overflow raises, it never truncates.
OVERFLOW_TAIL = 1e-25


class SamplingOverflowError(PrivacyAbort):
  """A Poisson batch exceeded its padded capacity (an event of accounted,
  negligible probability)."""


# ---------------------------------------------------------------------------
# Private layouts (class-major, flat) and Poisson sampling with a fixed
# capacity.


class ClassMajorData(NamedTuple):
  """Private examples grouped by class and padded: x (K, n_max, ...),
  valid (K, n_max) with 1 for real examples."""
  x: jax.Array
  valid: jax.Array


def class_major(x: np.ndarray, y: np.ndarray, num_classes: int,
                rows: int | None = None) -> ClassMajorData:
  """Groups (N, ...) examples into a padded (K, rows, ...) layout.

  rows: the padded length of every class, a PUBLIC bound on the class
  sizes (ClassSizes.bound.max()), so that no shape depends on the private
  counts; default (library use) the largest class. A class larger than
  `rows` is an error (the run checks its bounds first, ClassSizes.check).
  """
  y = np.asarray(y)
  check_labels(y, num_classes, len(x))
  counts = np.bincount(y, minlength=num_classes)
  if rows is not None:
    require_int(rows, "rows", 1)  # 2.5 was truncated to 2
  n_max = int(counts.max()) if rows is None else int(rows)
  if counts.max() > n_max:
    raise ValueError(f"a class has more examples than the padded length "
                     f"{n_max} (the message names no private count)")
  xs = np.zeros((num_classes, n_max, *x.shape[1:]), dtype=x.dtype)
  valid = np.zeros((num_classes, n_max), dtype=np.float32)
  for c in range(num_classes):  # host-side data layout, once per run
    idx = np.flatnonzero(y == c)
    xs[c, :len(idx)] = x[idx]
    valid[c, :len(idx)] = 1.0
  return ClassMajorData(jnp.asarray(xs), jnp.asarray(valid))


class FlatData(NamedTuple):
  """Private examples in one padded table: x (R, ...), y (R,) labels,
  valid (R,) with 1 for real examples, as `parallel.padded_rows(R, x, y)`
  returns them. R is a PUBLIC bound on N (the run uses
  ClassSizes.padded_rows). A Poisson batch of it pads to one capacity
  for all classes, about p R rows, where class-major data pads every class
  to the largest class's bound (K times that class's capacity): at 1438
  rows the flat batch is about half as large (bench_query_layout.py)."""
  x: jax.Array
  y: jax.Array
  valid: jax.Array


def _check_rate(sampling_rate) -> None:
  """A concrete number in (0, 1] (a Python, NumPy or 0-d JAX scalar; the
  rate sizes the padded batch, so it cannot be traced)."""
  try:
    ok = (not isinstance(sampling_rate, bool) and np.ndim(sampling_rate) == 0
          and 0 < float(sampling_rate) <= 1)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    ok = False
  if not ok:
    raise ValueError(f"sampling rate must be a concrete number in (0, 1], "
                     f"got {sampling_rate!r}")


def poisson_capacity(class_counts, sampling_rate: float,
                     tail: float = OVERFLOW_TAIL, *,
                     log_tail: float | None = None) -> int:
  """Smallest per-class capacity m with P(Binomial(N_c, p) > m) <= tail for
  every class c (never more than the largest class). class_counts are
  PUBLIC upper bounds of the class sizes (the tail bound holds for every
  smaller class too); log_tail, if given, replaces log(tail)."""
  class_counts = np.asarray(class_counts)
  if (class_counts.size == 0 or not np.issubdtype(class_counts.dtype,
                                                  np.integer)
      or class_counts.min() < 0):
    raise ValueError("class_counts must be a non-empty list of integers "
                     f">= 0, got {class_counts.tolist()}")
  _check_rate(sampling_rate)
  if sampling_rate >= 1.0:
    return int(class_counts.max())
  if log_tail is None:
    if not 0 < tail < 1:
      raise ValueError(f"tail must be in (0, 1), got {tail}")
    log_tail = math.log(tail)
  elif not log_tail < 0:
    raise ValueError(f"log_tail must be < 0, got {log_tail}")
  # Searched on logsf (accurate far below 1e-16, where binom.isf breaks
  # down) and, below e^-700, on an upper bound of the tail.
  caps = [_binomial_capacity(int(n), sampling_rate, log_tail)
          for n in np.unique(class_counts)]
  return int(min(max(caps), class_counts.max()))


# Below this, scipy's binom.logsf is near or past float64's smallest
# positive number (e^-745) and returns -inf: P > 0 would pass any tail.
_LOGSF_FLOOR = -700.0


def binomial_log_sf_bound(m: int, n: int, p: float) -> float:
  """An upper bound on log P(Binomial(n, p) > m), exact where it is above
  e^-700: scipy's logsf there; below, the geometric bound of the tail,
  P(X > m) <= P(X = m + 1) / (1 - r) with r = (n - m - 1) p / ((m + 2)(1
  - p)), the ratio P(X = k + 1) / P(X = k) at k = m + 1 (the ratios fall
  as k grows), computed from logpmf, which does not underflow. 0 (log 1)
  where that ratio is not below 1."""
  if m >= n:
    return -math.inf
  exact = float(stats.binom.logsf(m, n, p))
  if exact > _LOGSF_FLOOR:
    return exact
  r = (n - m - 1) * p / ((m + 2) * (1 - p))
  if r >= 1:
    return 0.0
  return float(stats.binom.logpmf(m + 1, n, p)) - math.log1p(-r)


def _binomial_capacity(n: int, p: float, log_tail: float) -> int:
  """Smallest m in [0, n] whose bound binomial_log_sf_bound(m, n, p) is
  <= log_tail (so P(Binomial(n, p) > m) <= e^log_tail): bisection, about
  log2(n) evaluations (a scan of all n + 1 took 3.4 s at n = 18
  million). Every m it returns passed the test, so the tail holds even
  where the bound is not monotone."""
  lo, hi = 0, n  # the bound at n is -inf (sf(n) = 0)
  while lo < hi:
    mid = (lo + hi) // 2
    if binomial_log_sf_bound(mid, n, p) <= log_tail:
      hi = mid
    else:
      lo = mid + 1
  return lo


def poisson_sample(key: jax.Array, valid: jax.Array, sampling_rate: float,
                   capacity: int):
  """Poisson-samples a class-major table.

  Each valid entry is included independently with probability p. The
  included indices of each class are packed into `capacity` slots.

  Returns:
    (idx (K, capacity) int32, mask (K, capacity) float32,
     overflow bool scalar: some class had more than `capacity` examples).
  """
  require_int(capacity, "capacity", 1)
  if jnp.ndim(valid) != 2:
    raise ValueError(f"valid must be (K, n) (one row per class; (1, N) "
                     f"for flat data), got shape {jnp.shape(valid)}")
  take = noise.bernoulli(key, sampling_rate, valid.shape) & (valid > 0)

  def pack(row):
    (idx,) = jnp.nonzero(row, size=capacity, fill_value=0)
    n = jnp.sum(row)
    mask = (jnp.arange(capacity) < n).astype(jnp.float32)
    return idx.astype(jnp.int32), mask, n > capacity

  idx, mask, over = jax.vmap(pack)(take)
  return idx, mask, jnp.any(over)


# ---------------------------------------------------------------------------
# Gaussian releases of clipped sums (M_F's class sums, DP-SGD's gradients).


def release_bits(rows: int, clip_norm: float,
                noise_stddev: float) -> int | None:
  """Bits of the fixed-point sums of a noisy release of clipped vectors
  (DP-SGD's gradients, the queries' embeddings) over `rows` padded rows
  in all (every chunk and device): `clipping.fixed_point_bits(rows, C)`,
  each coordinate of a clipped vector being at most C. None (float32
  sums) without noise or clipping (stddev 0 or C = inf: a release with no
  guarantee to keep, which then equals the non-private sums; a grid of
  rows C 2^-31 would lose them for a C far above the vectors' norms)."""
  if unclipped(clip_norm) or not noise_stddev > 0:
    return None
  return fixed_point_bits(rows, float(clip_norm))


def check_declared_clip_norm(grad_sum_fn, clip_norm: float,
                             what: str = "clip_norm") -> None:
  """Raises ValueError where grad_sum_fn carries a `clip_norm` other than
  `clip_norm` (pergrad.make_grad_sum_fn and clipping.microbatched carry
  one). A function without the attribute is the caller's
  responsibility."""
  declared = getattr(grad_sum_fn, "clip_norm", None)
  if declared is not None and float(declared) != float(clip_norm):
    raise ValueError(f"grad_sum_fn clips to {declared}, {what} is "
                     f"{clip_norm}: they must be the same")


@dataclasses.dataclass(frozen=True)
class SumRelease:
  """The Gaussian release of a sum of vectors clipped to L2 norm C (a
  DP-SGD step's gradient sum; a pytree): the sum, taken in fixed point
  with `release_bits` over all its padded rows, plus N(0, (sigma C)^2) on
  every coordinate (float64 draw, float64 sum, one rounding). One object
  carries C and sigma to the fixed point and the noise, so those two
  cannot disagree; the grad-sum function must clip to release.clip_norm.

    bits = release.release_bits(rows)          # rows of every chunk/device
    sums = grad_sum_fn(params, batch, mask, bits=bits)   # clips to C
    noisy = release.release(noise_key, sums, bits)

  clip_norm inf or noise_multiplier 0 is the non-private path (float32
  sums, no noise)."""
  clip_norm: float
  noise_multiplier: float

  def __post_init__(self):
    # Both choose between fixed-point and float sums and size the noise:
    # static numbers (a traced one failed deep inside with JAX's error).
    if noise.concrete_number(self.noise_multiplier, "noise_multiplier"):
      noise.concrete_number(self.clip_norm, "clip_norm of a noisy release")
    check_clip_norm(self.clip_norm)
    noise.check_stddev(self.noise_multiplier)
    if unclipped(self.clip_norm) and self.noise_multiplier > 0:
      raise ValueError("clip_norm inf with noise_multiplier > 0: the noise "
                       "std sigma C is infinite (unclipped sums have no "
                       "sensitivity to calibrate to)")

  @property
  def l2_sensitivity(self) -> float:
    return float(self.clip_norm)

  @property
  def noise_stddev(self) -> float:
    if not self.noise_multiplier:
      return 0.0
    return float(self.noise_multiplier * self.clip_norm)

  def check_grad_sum_fn(self, grad_sum_fn) -> None:
    """`check_declared_clip_norm` against this release's C: the noise is
    sigma * release.clip_norm, so sums clipped to more would be released
    with less noise than their sensitivity needs."""
    check_declared_clip_norm(grad_sum_fn, self.clip_norm,
                             "the release's clip_norm")

  def release_bits(self, rows: int) -> int | None:
    """`release_bits(rows, C, sigma C)`: rows of the whole sum."""
    return release_bits(rows, self.clip_norm, self.noise_stddev)

  def release(self, key: jax.Array, sums: Any, bits: int | None) -> Any:
    """sums (a pytree: int32 at 2^-bits, or float32 with bits None) plus
    N(0, (sigma C)^2) per coordinate, float32 out. A noisy release takes
    fixed-point sums only (`release_bits`): float32 sums of the same rows
    differ with their order, so one example could move them by more than
    C; such sums, or float sums given as fixed point, are refused."""
    self.check_bits(bits)
    return noise.tree_add_gaussian_noise(key, sums, self.noise_stddev,
                                         scale=fixed_point_scale(bits))

  def check_bits(self, bits: int | None) -> None:
    """Raises ValueError for float sums (bits None) given to a noisy
    release (`noise.add_gaussian_noise` refuses integer sums without a
    scale and float sums with one). Static: works under jit."""
    if bits is None and self.noise_stddev > 0:
      raise ValueError(
          "a noisy release needs fixed-point sums: take them with "
          "bits = release_bits(rows) (float sums of the same rows depend "
          "on their order, so their sensitivity exceeds C)")


# ---------------------------------------------------------------------------
# M_F: noisy per-class feature sums.


@dataclasses.dataclass(frozen=True)
class QuerySpec:
  """What one M_F query computes; everything here is public.

  Attributes:
    embed_fn: embed(params, x) -> (n, d).
    num_classes: K.
    clip_norm: C (inf disables clipping: non-private).
    noise_multiplier: sigma_F; the noise std on each sum coordinate is
      sigma_F * C (0 disables noise: non-private).
    sampling_rate: p, Poisson rate per example.
    capacity: padded batch size (see `poisson_capacity`): per class for
      class-major data, of the whole batch for flat data. It must come
      from a PUBLIC bound on the rows (never the private N) through
      `poisson_capacity` with a tail tau that the accountant's delta
      covers: a batch above it aborts the query (an observable event of
      probability <= tau, which the guarantee adds to delta; a capacity
      sized any other way leaves that event unaccounted).
    strategy: DSA augmentation strategy applied siamese-style.
  """
  embed_fn: Callable[[Any, jax.Array], jax.Array]
  num_classes: int
  clip_norm: float
  noise_multiplier: float
  sampling_rate: float
  capacity: int
  strategy: str = augment.DEFAULT_STRATEGY

  def __post_init__(self):
    require_int(self.num_classes, "num_classes", 1)
    SumRelease(self.clip_norm, self.noise_multiplier)  # checks C, sigma
    _check_rate(self.sampling_rate)
    require_int(self.capacity, "capacity", 0)
    augment.parse_strategy(self.strategy)

  @property
  def sum_release(self) -> SumRelease:
    """The Gaussian release of this query's clipped class sums."""
    return SumRelease(self.clip_norm, self.noise_multiplier)

  @property
  def l2_sensitivity(self) -> float:
    return self.sum_release.l2_sensitivity

  @property
  def noise_stddev(self) -> float:
    return self.sum_release.noise_stddev

  def release_bits(self, rows: int) -> int | None:
    """Bits of the fixed-point sums over `rows` padded rows in all (every
    chunk and device of one release): `SumRelease.release_bits` with
    this query's C and noise."""
    return self.sum_release.release_bits(rows)

  def release(self, key: jax.Array, sums: jax.Array,
              bits: int | None) -> jax.Array:
    """sums (int32 at 2^-bits, or float32 with bits None) plus N(0,
    (sigma C)^2) per coordinate: float64 draw, float64 sum, one rounding.
    Checked as `SumRelease.check_bits`."""
    self.sum_release.check_bits(bits)
    return noise.add_gaussian_noise(key, sums, self.noise_stddev,
                                    scale=fixed_point_scale(bits))


def augment_class_major(x: jax.Array, aug_params: augment.AugmentParams,
                        strategy: str) -> jax.Array:
  """Applies one augmentation per class: x (K, m, ...), params with (K,)."""
  return jax.vmap(lambda xc, pc: augment.apply(xc, pc, strategy))(
      x, aug_params)


def noisy_class_sums(spec: QuerySpec, params: Any, x: jax.Array,
                     y: jax.Array, mask: jax.Array,
                     noise_key: jax.Array,
                     chunk_size: int | None = None) -> jax.Array:
  """Clipped class sums (fixed point when there is noise, see
  `release_bits`) plus N(0, (sigma C)^2) on every coordinate."""
  bits = spec.release_bits(x.shape[0])
  sums = clipped_class_sums(spec.embed_fn, params, x, y, mask,
                            num_classes=spec.num_classes,
                            clip_norm=spec.clip_norm, chunk_size=chunk_size,
                            bits=bits)
  return spec.release(noise_key, sums, bits)


def noisy_targets(spec: QuerySpec, data: ClassMajorData | FlatData,
                  params: Any,
                  aug_params: augment.AugmentParams,
                  secret: jax.Array, chunk_size: int | None = None,
                  skip_padding: bool = True):
  """One M_F query: Poisson batch, siamese augmentation, clipped class sums,
  Gaussian noise. chunk_size, skip_padding: see `clipped_class_sums`
  (speed and timing only: the same release).

  Args:
    spec: the public description of the query.
    data: private examples, class-major (`class_major`) or flat
      (`FlatData`); the release is the same mechanism either way.
    params: the query's extractor parameters (public).
    aug_params: augmentation parameters with leading axis K (public); the
      synthetic side uses the same ones.
    secret: secret key for this query (sampling and noise).

  Returns:
    (noisy sums (K, d) float32, overflow flag). The caller must raise on
    overflow (`check_overflow`); the sums are then NaN
    (`withheld_on_overflow`).
  """
  k_sample, k_noise = jax.random.split(secret)
  bits = spec.release_bits(batch_rows(spec, data))
  sums, overflow = sampled_class_sums(spec, data, params, aug_params,
                                      k_sample, chunk_size, bits,
                                      skip_padding)
  return withheld_on_overflow(spec.release(k_noise, sums, bits),
                              overflow), overflow


def batch_rows(spec: QuerySpec, data: ClassMajorData | FlatData) -> int:
  """Padded rows of one Poisson batch of `data`: the capacity for flat
  data, K times the per-class capacity for class-major data."""
  if isinstance(data, FlatData):
    return spec.capacity
  return spec.capacity * data.x.shape[0]


def sampled_class_sums(spec: QuerySpec, data: ClassMajorData | FlatData,
                       params: Any,
                       aug_params: augment.AugmentParams,
                       sample_key: jax.Array,
                       chunk_size: int | None = None,
                       bits: int | None = None,
                       skip_padding: bool = True):
  """The noiseless part of one M_F query: Poisson batch, siamese
  augmentation, clipped class sums (int32 at 2^-bits when bits is set,
  see `clipping.clipped_class_sums`). Returns ((K, d) sums, overflow)."""
  if isinstance(data, FlatData):
    return _sampled_flat_sums(spec, data, params, aug_params, sample_key,
                              chunk_size, bits, skip_padding)
  if tuple(data.valid.shape) != tuple(data.x.shape[:2]):
    # A wider valid would index past a class's rows, and the gather
    # clamps: one example counted several times.
    raise ValueError(f"ClassMajorData: valid has shape {data.valid.shape}, "
                     f"expected x's first two axes {data.x.shape[:2]}")
  if data.x.shape[0] != spec.num_classes:
    # Static, so also under jit, where the extra classes' rows were
    # silently dropped (and missing ones left zero sums).
    raise ValueError(f"ClassMajorData holds {data.x.shape[0]} classes (its "
                     f"first axis), the query {spec.num_classes}")
  idx, mask, overflow = poisson_sample(sample_key, data.valid,
                                       spec.sampling_rate, spec.capacity)
  xb = jax.vmap(lambda xc, ic: xc[ic])(data.x, idx)  # (K, cap, ...)
  xb = augment_class_major(xb.astype(jnp.float32), aug_params, spec.strategy)
  k, cap = idx.shape
  y = jnp.repeat(jnp.arange(k, dtype=jnp.int32), cap)
  flat = xb.reshape((k * cap, *xb.shape[2:]))
  sums = clipped_class_sums(spec.embed_fn, params, flat, y, mask.reshape(-1),
                            num_classes=spec.num_classes,
                            clip_norm=spec.clip_norm, chunk_size=chunk_size,
                            bits=bits, skip_padding=skip_padding)
  return sums, overflow


def _sampled_flat_sums(spec, data: FlatData, params, aug_params,
                       sample_key, chunk_size, bits, skip_padding):
  """`sampled_class_sums` on flat data: one Poisson batch of all classes;
  each row is augmented with its class's parameters (the same as the
  synthetic side of that class), then clipped and summed into its class."""
  n = data.x.shape[0]
  if data.y.shape != (n,) or data.valid.shape != (n,):
    raise ValueError(f"FlatData needs x (R, ...), y (R,) and valid (R,); got "
                     f"{data.x.shape}, {data.y.shape}, {data.valid.shape}")
  check_labels(data.y, spec.num_classes, n)
  idx, mask, overflow = poisson_sample(sample_key, data.valid[None],
                                       spec.sampling_rate, spec.capacity)
  idx, mask = idx[0], mask[0]
  y = data.y[idx]
  per_row = jax.tree.map(lambda a: jnp.asarray(a)[y], aug_params)
  xb = augment.apply(data.x[idx].astype(jnp.float32), per_row,
                     spec.strategy)
  sums = clipped_class_sums(spec.embed_fn, params, xb, y, mask,
                            num_classes=spec.num_classes,
                            clip_norm=spec.clip_norm, chunk_size=chunk_size,
                            bits=bits, skip_padding=skip_padding)
  return sums, overflow


def withheld_on_overflow(noisy: Any, overflow) -> Any:
  """The release with every coordinate NaN where its Poisson batch
  overflowed: a truncated batch lets one example push another out (L2
  change 2C, not C), so such a release must never be used; NaN makes a
  caller that skips `check_overflow` fail loudly instead."""
  over = jnp.asarray(overflow).astype(bool)
  return jax.tree.map(lambda a: jnp.where(over, jnp.nan, a), noisy)


def check_overflow(overflow) -> None:
  """Raises SamplingOverflowError when a Poisson batch did not fit."""
  if bool(overflow):
    raise SamplingOverflowError(
        "a Poisson batch exceeded its padded capacity (an event of "
        "negligible probability, accounted in delta); the release was "
        "discarded, nothing was truncated. Re-run.")


# ---------------------------------------------------------------------------
# M_E: DP-SGD.


def poisson_batch_indices(key: jax.Array, num_examples: int,
                          sampling_rate: float, capacity: int):
  """Poisson sample of range(N) packed into `capacity` slots.

  Returns (idx (capacity,), mask (capacity,), overflow)."""
  idx, mask, over = poisson_sample(key, jnp.ones((1, num_examples)),
                                   sampling_rate, capacity)
  return idx[0], mask[0], over


def make_dp_sgd_step(loss_fn: Callable[..., jax.Array] | None, optimizer, *,
                     clip_norm: float, noise_multiplier: float,
                     expected_batch_size: float,
                     grad_sum_fn: Callable[..., Any] | None = None):
  """One DP-SGD step as a pure function.

  step(params, opt_state, batch, mask, noise_key) ->
      (params, opt_state, noisy_mean_grad)

  The update direction is (sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / B
  with B a PUBLIC expected batch size, never the realised one nor q times
  the exact N (private under add/remove): q * N~ with N~ from a count
  release (`counts.ClassSizes.total_estimate`), or q N where N is public.
  Batches are padded to a fixed size with `mask`, so the step compiles once.
  The clipped sum is `clipped_grad_sum(loss_fn, ...)` unless grad_sum_fn
  (params, batch, mask, bits=None) is given, which must clip to the same
  clip_norm (e.g. `pergrad.make_grad_sum_fn`, possibly
  `clipping.microbatched`; one that carries a `clip_norm` attribute, as
  those do, is refused where it differs). With noise, the sums are taken in fixed
  point (`SumRelease`: bits from the batch's rows, C and sigma C):
  grad_sum_fn must then return the int32 sums of trunc(clip_C(g_i) 2^bits)
  (`clipping.fixed_point_weighted_sum`), to which the noise is added in
  float64 (a float32 sum's rounding depends on every example of the
  batch, so one example could move it by more than C).
  """
  try:
    size_ok = 0 < float(expected_batch_size) < math.inf
  except (TypeError, ValueError):  # not a scalar (or a traced one)
    size_ok = False
  if not size_ok or isinstance(expected_batch_size, bool):
    raise ValueError(f"expected_batch_size must be a finite number > 0 "
                     f"(a public q * N~), got {expected_batch_size!r}")
  spec = SumRelease(clip_norm, noise_multiplier)
  spec.check_grad_sum_fn(grad_sum_fn)
  if grad_sum_fn is None:
    grad_sum_fn = lambda p, b, m, bits=None: clipped_grad_sum(
        loss_fn, p, b, m, clip_norm=clip_norm, bits=bits)

  def step(params, opt_state, batch, mask, noise_key):
    bits = spec.release_bits(mask.shape[0])
    # A grad_sum_fn returning float sums where bits asked for fixed point
    # is refused by the noise sampler (a scale needs integer values).
    g = spec.release(noise_key, grad_sum_fn(params, batch, mask, bits=bits),
                     bits)
    g = jax.tree.map(lambda a: a / expected_batch_size, g)
    updates, opt_state = optimizer.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, g

  return step
