"""Secret randomness: 128-bit secret keys and atom-free Gaussian noise.

Why not `jax.random.normal`. In float32 it maps 23 random bits through
erfinv, so it takes about 2^23 values in [-5.42, 5.22] with point masses at
the ends and wide gaps between neighbouring values in the tails. A release
s + z of a sum s whose neighbour is s' = s + Delta then falls, with
probability of order d * 2^-23 over its d coordinates, on a value that
s' + z cannot produce: the two datasets are told apart with certainty
whatever the noise multiplier (Mironov 2012 describes the same failure for
Laplace noise). That probability (1.6e-4 measured on one generator release)
is far above the delta the accountant reports.

The sampler here (`standard_normal`, `add_gaussian_noise`):

* draws, per coordinate, six 32-bit words from the (secret) key: one sign
  bit, a 52-bit mantissa and a 128-bit stream whose leading zeros give a
  geometric binary exponent, so u = (1 + m) 2^-(e+1) is uniform on (0, 1)
  with RELATIVE precision 2^-52 everywhere, including its smallest values;
* computes |z| = -ndtri(u / 2) and the sign in float64 (under
  `jax.enable_x64` inside the traced function, so it works in jit, vmap and
  shard_map on CPU and GPU), which makes z an exact N(0, 1) draw up to the
  float64 evaluation of ndtri (relative error ~1e-15) and the 2^-52
  resolution of u: neighbouring attainable values of z are ~2^-52 / |z|
  apart, far below the float32 spacing of any release, out to |z| ~ 13;
* adds sigma * z to the float64 value of the sum, rounds that to the
  nearest multiple of sigma * 2^-20 (SNAP) and then to float32.
  Rounding the exact-Gaussian release is post-processing. The grid comes
  first because near 0 float32 is finer than the lattice of the sampler's
  attainable values, which differs between two sums a neighbour apart:
  unsnapped, an output within ~2e-9 sigma of 0 could tell them apart (a
  review measured ~1e-9 delta per changed coordinate and release); a grid
  cell holds ~1e9 attainable values, so its probability is the Gaussian's
  to ~1e-9 relatively.

Residual caveats: with probability 2^-128 per coordinate (all 128
exponent bits zero) u is capped at 2^-129, i.e. |z| at about 13.2 sigma;
the law is exact out to EXACT_Z (13.1). At a very small noise multiplier
sigma a neighbouring release (shifted by 1/sigma standard deviations)
lands beyond that with a probability that is not small: the delta this
adds is `support_delta`. A run reserves accounting.SUPPORT_FRACTION of
its delta for it (privacy.json's `delta_sampler_support`, part of the
headline delta), and a run whose calibrated noise would need more (and
more than SUPPORT_FLOOR) is refused (planning.mechanisms_for; at the
default shares and delta 1e-5, epsilon 200 passes and 300 is refused).
The float64 ndtri and the 2^-52 grid of u deform the law by ~1e-15
relatively. Neither the cap's own 2^-128, nor that deformation, nor a
support_delta below SUPPORT_FLOOR beyond the reserve (delta < 8e-22) is
accounted.

Secret keys (`secret_key`) hold 128 bits of OS entropy: they use the
`threefry2x32x2` PRNG defined here, two independent Threefry-2x32 streams
whose bits are XORed, so recovering the noise needs both 64-bit halves.
Every jax.random function (split, fold_in, bernoulli, bits) accepts them.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

_HALF = "threefry2x32"
WORDS_PER_NORMAL = 6  # sign + mantissa (2 words), exponent stream (4 words)
EXPONENT_BITS = 128
# |z| out to which the sampler's law is exact (u / 2 >= 2^-129).
EXACT_Z = 13.10862617448018  # -ndtri(2^-(EXPONENT_BITS + 1))
SUPPORT_FLOOR = 2.0**-100  # below this, as negligible as the 2^-128 cap
# Releases are rounded to multiples of stddev * SNAP (add_gaussian_noise).
SNAP = 2.0**-20


# ---------------------------------------------------------------------------
# 128-bit keys: two Threefry-2x32 streams, XORed.


def _halves(key: jax.Array):
  return (jax.random.wrap_key_data(key[..., :2], impl=_HALF),
          jax.random.wrap_key_data(key[..., 2:], impl=_HALF))


def _join(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.concatenate([jax.random.key_data(a), jax.random.key_data(b)], -1)


def _seed(seed: jax.Array) -> jax.Array:
  a = jax.random.key(seed, impl=_HALF)
  return _join(a, jax.random.fold_in(a, 0x128B17))


def _split(key: jax.Array, shape) -> jax.Array:
  a, b = _halves(key)
  return _join(jax.random.split(a, shape), jax.random.split(b, shape))


def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
  a, b = _halves(key)
  return _join(jax.random.fold_in(a, data), jax.random.fold_in(b, data))


def _random_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
  a, b = _halves(key)
  dtype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32,
           64: jnp.uint64}[bit_width]
  return jax.random.bits(a, shape, dtype) ^ jax.random.bits(b, shape, dtype)


SECRET_IMPL = jex_random.define_prng_impl(
    key_shape=(4,), seed=_seed, split=_split, random_bits=_random_bits,
    fold_in=_fold_in, name="threefry2x32x2", tag="tf2x2")


class PublicKeyWarning(UserWarning):
  """Noise or sampling drawn from a key that is not of this library's
  secret kind (`secret_key`, `deterministic_secret_key`)."""


def warn_unless_secret(key: jax.Array, what: str) -> None:
  """Warns (PublicKeyWarning) when `key` is not of the secret keys' kind:
  a `jax.random.key(seed)` or `PRNGKey(seed)` from a seed that is
  published makes the release reproducible by anyone, so not private.
  A key split or folded from a secret key keeps its kind. Not an error:
  a user may hold a secret threefry key of their own."""
  try:
    kind = jax.random.key_impl(key)
  except (TypeError, ValueError):  # a raw uint32 key (jax's default kind)
    kind = "raw uint32"
  if kind != SECRET_IMPL:
    warnings.warn(
        f"{what} drawn from a {kind} key, not from this library's secret "
        "keys (noise.secret_key()): if the key comes from a seed that is "
        "published, the release is not private", PublicKeyWarning,
        stacklevel=3)


def secret_key() -> jax.Array:
  """A PRNG key holding 128 bits of the operating system's entropy.

  Used for Poisson sampling and Gaussian noise. It does not depend on any
  user seed, so publishing the seed reveals nothing about the noise.
  """
  words = np.frombuffer(os.urandom(16), dtype=np.uint32)
  return jax.random.wrap_key_data(jnp.asarray(words), impl=SECRET_IMPL)


def deterministic_secret_key(seed: int) -> jax.Array:
  """Test mode only: a 'secret' key derived from a public seed.

  A run that uses it is NOT private (anyone with the seed can subtract the
  noise); the privacy report must say so.
  """
  return jax.random.fold_in(jax.random.key(seed, impl=SECRET_IMPL), 0x5EC7E7)


# ---------------------------------------------------------------------------
# Atom-free standard normals.


def _leading_zeros(words: jax.Array) -> jax.Array:
  """Leading zero bits of the concatenation words[0], words[1], ...
  (uint32, leading axis), as int32; all-zero gives 32 * len(words)."""
  total = jnp.zeros(words.shape[1:], jnp.int32)
  still_zero = jnp.ones(words.shape[1:], bool)
  for w in words:
    total = total + jnp.where(still_zero, jax.lax.clz(w).astype(jnp.int32), 0)
    still_zero = still_zero & (w == 0)
  return total


def support_delta(mechanisms) -> float:
  """Upper bound on the delta that the sampler's bounded support adds to a
  run's mechanisms (accounting.Mechanism: noise multiplier sigma relative
  to the L2 sensitivity, steps releases).

  The law is exact for |z| <= EXACT_Z. A neighbouring dataset moves a
  release by at most 1/sigma noise standard deviations in L2, worst on one
  coordinate (the tail below is convex in the shift); the outputs whose
  other-dataset z would lie beyond EXACT_Z, where that law is not exact
  (or zero), have probability at most P(Z > EXACT_Z - 1/sigma) per
  release. Counted in full, summed over releases."""
  from scipy import special  # pylint: disable=import-outside-toplevel
  return float(sum(m.steps * special.ndtr(1.0 / m.noise_multiplier - EXACT_Z)
                   for m in mechanisms if m.noise_multiplier > 0))


def support_excess(mechanisms, reserved: float) -> float:
  """The support delta of the mechanisms whose noise this sampler draws
  (a "declared" external guarantee's was drawn elsewhere) where it exceeds
  the delta `reserved` for it and SUPPORT_FLOOR; 0 where it fits. The one
  test of planning's refusal, privacy_report and check_report."""
  extra = support_delta([m for m in mechanisms
                         if getattr(m, "sensitivity", None) != "declared"])
  return extra if extra > max(reserved, SUPPORT_FLOOR) else 0.0


def standard_normal_from_bits(words: jax.Array) -> jax.Array:
  """Exact-law N(0, 1) draws from random words, as float64.

  Args:
    words: uint32 (WORDS_PER_NORMAL, *shape) independent uniform words.

  Returns:
    float64 (*shape) standard normals (see the module docstring). Call it
    inside `jax.enable_x64(True)`; `standard_normal` does.
  """
  w0, w1, exp_words = words[0], words[1], words[2:]
  sign = jnp.where((w0 >> 31) == 1, -1.0, 1.0)
  e = _leading_zeros(exp_words)  # P(e = k) = 2^-(k+1)
  hi = (w0 & jnp.uint32(0xFFFFF)).astype(jnp.float64)
  mantissa = (hi * 2.0**32 + w1.astype(jnp.float64) + 0.5) * 2.0**-52
  # u uniform on [2^-(e+1), 2^-e) given e: uniform on (0, 1) overall.
  u = jnp.ldexp(1.0 + mantissa, -(e + 2))  # = u / 2, P(|Z| > z) = u
  return sign * -jax.scipy.special.ndtri(u)


def standard_normal(key: jax.Array, shape) -> jax.Array:
  """float64 N(0, 1) draws of `shape` from `key` (works inside jit, vmap and
  shard_map; the caller's arrays keep their dtypes)."""
  words = jax.random.bits(key, (WORDS_PER_NORMAL, *tuple(shape)), jnp.uint32)
  with jax.enable_x64(True):
    return standard_normal_from_bits(words)


def concrete_number(value, what: str) -> float:
  """`value` as a Python float; a clear error for a traced value (a
  privacy parameter must be a static number, not a jit argument) or a
  non-number."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{what} must be a static number, not a traced value "
                    "(pass it outside jit, e.g. with functools.partial)")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{what} must be a number, got {value!r}") from None


def check_stddev(stddev) -> None:
  """Raises ValueError for a noise standard deviation that is negative or
  not finite (a traced value is the caller's responsibility)."""
  if isinstance(stddev, jax.core.Tracer):
    return
  if isinstance(stddev, (str, bytes, bool)) or np.iscomplexobj(stddev):
    raise ValueError(f"noise standard deviation must be a real number, got "
                     f"{stddev!r}")
  v = float(np.asarray(stddev))
  if not (math.isfinite(v) and v >= 0):
    raise ValueError(f"noise standard deviation must be finite and >= 0, "
                     f"got {v}")


def add_gaussian_noise(key: jax.Array, value: jax.Array,
                       stddev: float, scale: float | None = None
                       ) -> jax.Array:
  """value (* scale) + N(0, stddev^2) per coordinate, as float32, rounded
  once.

  The value (a clipped sum, float32, or integer counts) is widened to
  float64, multiplied by `scale` there if given (PE's vote weight on exact
  integer counts, 2^-bits on fixed-point sums), the float64 normal draw
  scaled by stddev is added, and the result is rounded to float32 once.
  stddev = 0 returns the (scaled) value as float32: the non-private path.
  A traced scale that is not both finite and > 0, or a traced stddev
  that is not both finite and >= 0, gives NaN everywhere (a concrete one
  is refused). A release, not a differentiable op: with
  noise its gradient with respect to `value` is 0 (the snap to the public
  grid), without noise 1.
  """
  value = jnp.asarray(value)
  check_stddev(stddev)
  if not (jnp.issubdtype(value.dtype, jnp.integer)
          or jnp.issubdtype(value.dtype, jnp.floating)):
    raise ValueError(f"noise is added to real values (float sums or integer "
                     f"counts), got {value.dtype}")
  # A scale goes with integer values only, both ways: fixed-point sums are
  # in units of 2^-bits, so without their scale the noise would be 2^bits
  # times too small against them, and float sums scaled by 2^-bits (a sum
  # function that ignored the bits it was given) would shrink the release.
  integer = jnp.issubdtype(value.dtype, jnp.integer)
  if integer and scale is None:
    raise ValueError("integer values (fixed-point sums or counts) need "
                     "their scale (the value of one unit, e.g. "
                     "clipping.fixed_point_scale(bits))")
  if scale is not None and not integer:
    raise ValueError(f"a scale is the unit of integer (fixed point) sums, "
                     f"but the values are {value.dtype}: a sum function "
                     "must pass bits on to clipping (see clipped_grad_sum)")
  if scale is not None and not isinstance(scale, jax.core.Tracer):
    unit = float(np.asarray(scale))
    if not (math.isfinite(unit) and unit > 0):
      # An infinite unit would publish each coordinate's sign (inf, nan
      # or -inf, which no noise masks); 0 or a negative one is a bug.
      raise ValueError(f"scale (the value of one integer unit) must be "
                       f"finite and > 0, got {unit}")
  zero = isinstance(stddev, (int, float)) and stddev == 0
  if zero and scale is None:
    return value.astype(jnp.float32)
  bad = []  # checks of traced parameters (concrete ones were refused)
  if isinstance(scale, jax.core.Tracer):
    # As clip_scale does for a traced C: an infinite unit would publish
    # each coordinate's sign, a negative one flip the release.
    bad.append(~(jnp.isfinite(scale) & (scale > 0)))
  if isinstance(stddev, jax.core.Tracer):
    # A negative one skipped the snap to the public grid.
    bad.append(~(jnp.isfinite(stddev) & (stddev >= 0)))

  def withheld(out):
    out = out.astype(jnp.float32)
    for b in bad:
      out = jnp.where(b, jnp.nan, out)
    return out
  if not zero:
    warn_unless_secret(key, "Gaussian noise")
    words = jax.random.bits(key, (WORDS_PER_NORMAL, *value.shape),
                            jnp.uint32)
  with jax.enable_x64(True):
    wide = value.astype(jnp.float64)
    if scale is not None:
      wide = wide * jnp.asarray(scale, jnp.float64)
    if zero:
      return withheld(wide)
    z = standard_normal_from_bits(words)
    sd = jnp.asarray(stddev, jnp.float64)
    out = wide + sd * z
    # Snapped to the public grid of multiples of sd * SNAP before the
    # float32 rounding (post-processing): near 0 float32 is finer than the
    # sampler's lattice, and each output would pin one float64 draw, on a
    # lattice that differs between neighbouring datasets.
    # A stddev so small (below ~1e-290) that out / q overflows leaves out
    # as drawn: its noise is below float32's resolution of out anyway.
    q = jnp.where(sd > 0, sd * SNAP, 1.0)
    steps = out / q
    out = jnp.where((sd > 0) & jnp.isfinite(steps), jnp.round(steps) * q,
                    out)
    return withheld(out)


def tree_add_gaussian_noise(key: jax.Array, tree: Any, stddev: float,
                            scale: float | None = None) -> Any:
  """`add_gaussian_noise` on every leaf of a pytree: independent noise per
  coordinate, drawn as one vector over all leaves (one sampler in the
  compiled program, not one per leaf: a ConvNet's 12 leaves compiled in
  2.9 s that way, a sixth of that as one draw). `scale` as there (2^-bits
  for fixed-point sums); the result is float32."""
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  integer = {bool(jnp.issubdtype(jnp.result_type(a), jnp.integer))
             for a in leaves}
  if len(integer) > 1:
    # Concatenated, integer leaves became floats and passed the
    # integer-needs-its-scale check of add_gaussian_noise unseen.
    raise ValueError("tree_add_gaussian_noise got integer and float leaves "
                     "in one tree: fixed-point sums (integers at `scale`) "
                     "and float sums need separate releases")
  flat = jnp.concatenate([jnp.ravel(a) for a in leaves])
  noisy = add_gaussian_noise(key, flat, stddev, scale=scale)
  out, start = [], 0
  for a in leaves:
    size = math.prod(jnp.shape(a))
    out.append(noisy[start:start + size].reshape(jnp.shape(a)))
    start += size
  return jax.tree.unflatten(treedef, out)


def gaussian_noise(key: jax.Array, shape, stddev: float) -> jax.Array:
  """float32 N(0, stddev^2) noise from the atom-free sampler.

  Prefer `add_gaussian_noise`: adding this float32 noise to a float32 sum
  rounds twice, which re-introduces a (small) dependence of the rounding
  pattern on the sum.
  """
  shape = (shape,) if isinstance(shape, (int, np.integer)) else shape
  return add_gaussian_noise(key, jnp.zeros(tuple(shape), jnp.float32),
                            stddev)


def bernoulli(key: jax.Array, p: float, shape) -> jax.Array:
  """Independent Bernoulli(p') draws with p' = floor(p 2^32) / 2^32 <= p
  (p' = 1 for p >= 1): integer comparison of 32-bit words, so the rate is
  never above the accounted p (jax.random.bernoulli compares a float32
  uniform on a 2^-23 grid, which can exceed p by up to 2^-23)."""
  p = concrete_number(p, "sampling rate")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"sampling rate must be in [0, 1], got {p}")
  if p >= 1.0:
    return jnp.ones(tuple(shape), bool)
  threshold = np.uint32(int(np.floor(float(p) * 2.0**32)))
  warn_unless_secret(key, "Poisson sampling")
  return jax.random.bits(sampling_stream(key), tuple(shape),
                         jnp.uint32) < threshold


# Sampling draws its words from the key folded with this tag, the noise
# from the key itself: a caller who passes one key to both (DP-SGD's
# sampling and its noise_key, say) gets independent draws. Drawn from the
# same key they were the same words, and each noise coordinate's sign
# told whether that example was sampled (a review's finding).
SAMPLING_TAG = 0x5A3D1E


def sampling_stream(key: jax.Array) -> jax.Array:
  """The key `bernoulli` draws its words from (domain-separated from the
  Gaussian noise's)."""
  return jax.random.fold_in(key, SAMPLING_TAG)
