"""Class sizes as public metadata: the count release M_N and its bounds.

Under add-or-remove-one adjacency the class sizes N_c (and N) change with
one example, so they are not public unless the user says they are. The
default policy releases them once,

    n~ = (N_1, ..., N_K) + N(0, sigma_N^2 I),     L2 sensitivity 1,

as its own GaussianDpEvent in the run's composition, and every later use
reads only `ClassSizes` built from that release:

* normalisation constants and expected batch sizes: p * max(n~_c, 1);
* padded layouts and Poisson capacities: the upper confidence bound
  U_c = ceil(n~_c + z sigma_N) with P(N(0, 1) > z) = tau; a class above
  its bound aborts the run (`check`), an event of probability <= tau per
  class, whose cost joins delta (accounting.failure_log_tail);
* the delta < 1/N check and the report: sum of n~_c.

`--public-class-sizes` declares the exact sizes public knowledge (a
published benchmark split): then `public_sizes` holds them, nothing is
released, and the report says the user declared them public. Non-private
runs (dm) use `exact_sizes`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from dpgeng_jax import noise
from dpgeng_jax.clipping import MAX_FIXED_POINT_ROWS, check_labels
from dpgeng_jax.errors import PrivacyAbort

COUNT_SENSITIVITY = 1.0  # L2, add/remove one example (one count moves by 1)


class CountBoundError(PrivacyAbort):
  """A class, or all classes together, hold more examples than their
  released upper bound (an event of probability <= tau per bound,
  accounted in delta)."""


def layout_rows(n: int) -> int:
  """n rounded up to a multiple of 2^(bits(n) - 3): less than 1/4 more rows
  (none below 8), and one value for every n of its bucket. The padded length
  of private layouts is a function of the released bound on N, which moves
  with the count release's noise from run to run (std sigma_N sqrt(K): 76
  rows at epsilon 1 on ten classes with the default shares); padded to this,
  two runs on the same data usually share their shapes, and so the
  persistent compilation cache's programs. Padded rows are never sampled,
  and the microbatches holding only padding are skipped (unless
  --no-skip-padding), so on CPU the padding costs memory and the generator's
  private passes, not steps (on accelerators a query takes its padded
  Poisson batch in one piece, so there the sampling rate times the extra
  rows are computed and masked). With buckets of at most 1/16 (2^(bits -
  5)), two runs on 4000 images at epsilon 1 fell in different buckets with
  probability 0.16 (0.27 averaged over N from 1000 to 70000), and the second
  compiled the expert's step, the queries and PE's programs again; with
  these, 0 and 0.09 (benchmarks/RESULTS.md, "Coarser layout buckets")."""
  n = int(n)
  if n < 1:
    raise ValueError(f"need n >= 1 rows, got {n}")
  step = 1 << max(0, n.bit_length() - 3)
  return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class ClassSizes:
  """What the run may use about the class sizes.

  Attributes:
    estimate: (K,) float64: the released noisy counts n~_c, or the exact
      counts where they are public or the run is not private.
    bound: (K,) int64: U_c with N_c <= U_c (checked by `check`).
    policy: "released", "declared public" or "exact (not private)".
    noise_multiplier: sigma_N of the release (0 if none).
    log_tail: log tau, the per-class probability that N_c > U_c
      (-inf if the bound is exact); also that of N > total_upper.
    total_upper: an upper bound on N from the noisy total (tighter than
      the sum of the class bounds); None: the sum.
  """
  estimate: np.ndarray
  bound: np.ndarray
  policy: str
  noise_multiplier: float = 0.0
  log_tail: float = -math.inf
  total_upper: int | None = None
  # Standard deviation of `estimate` (sigma_N after the release; smaller
  # after `refined`), and where it came from.
  estimate_std: float = 0.0
  estimate_source: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.estimate)

  @property
  def total_estimate(self) -> float:
    """The estimate of N used after the release (at least 1)."""
    return float(max(1.0, np.sum(self.estimate)))

  @property
  def total_bound(self) -> int:
    """A public bound on N (the delta < 1/N check, the abort check)."""
    total = int(np.sum(self.bound))
    return total if self.total_upper is None else min(total,
                                                      self.total_upper)

  @property
  def padded_rows(self) -> int:
    """The padded length of flat private layouts: a released (noisy)
    `total_bound` rounded up by `layout_rows`, so that runs whose bounds
    differ a little share their compiled programs (the compilation
    cache); an exact one (public or non-private sizes) as it is."""
    if not self.noise_multiplier > 0:
      return self.total_bound
    # Never rounded past what the fixed-point release sums accept.
    return min(layout_rows(self.total_bound),
               max(self.total_bound, MAX_FIXED_POINT_ROWS))

  def expected_counts(self, rate: float) -> np.ndarray:
    """Public expected Poisson batch sizes rate * max(n~_c, 1), (K,)."""
    return rate * np.maximum(self.estimate, 1.0)

  def check(self, y: np.ndarray) -> None:
    """Aborts when a class exceeds its bound (probability <= K tau).

    Reads the exact counts; only the abort itself is observable, and its
    probability is accounted (accounting.DeltaSplit)."""
    y = np.asarray(y)
    check_labels(y, self.num_classes, len(y))
    exact = np.bincount(y, minlength=self.num_classes)
    if np.any(exact > self.bound) or exact.sum() > self.total_bound:
      raise CountBoundError(
          "a class, or all classes together, hold more examples than the "
          "upper bound derived from the released counts (an event of "
          f"probability <= {math.exp(self.log_tail):.1e} per bound); the "
          "run was aborted before any other release. Re-run.")

  def refined(self, other_estimate, other_std: float,
              source: str) -> "ClassSizes":
    """Post-processing: the inverse-variance combination of the released
    estimate with another independent unbiased release of the same counts
    (the generator's count coordinate); the bounds stay those of M_N."""
    if self.policy != "released" or not other_std > 0:
      return self
    est, std = inverse_variance([(self.estimate, self.estimate_std),
                                 (other_estimate, other_std)])
    return dataclasses.replace(
        self, estimate=est, estimate_std=std,
        estimate_source=f"{self.estimate_source} combined with {source}")

  def report(self) -> dict:
    """privacy.json's view: released values only (never exact private
    counts unless declared public or the run is not private)."""
    out = {"policy": self.policy,
           "estimate": [float(v) for v in self.estimate],
           "upper_bound": [int(v) for v in self.bound],
           "total_estimate": self.total_estimate}
    if self.policy == "released":
      out.update(noise_multiplier=self.noise_multiplier,
                 bound_failure_probability_per_class=math.exp(self.log_tail),
                 estimate_std=self.estimate_std,
                 estimate_source=self.estimate_source)
    return out


def inverse_variance(estimates) -> tuple[np.ndarray, float]:
  """Independent unbiased estimates of the same counts, (estimate, std)
  pairs with std > 0, combined by inverse variance: (estimate, its std)."""
  w = [1.0 / std**2 for _, std in estimates]
  est = sum(wi * np.asarray(e, np.float64)
            for wi, (e, _) in zip(w, estimates)) / sum(w)
  return est, float(sum(w) ** -0.5)


def class_tally(y: np.ndarray, num_classes: int) -> np.ndarray:
  """Exact class counts, tallied on the host: (K,) int32. Labels outside
  0..K-1 are refused (a longer tally would release counts of classes that
  do not exist). Integers, not float32: float32 counts above 2^24 round
  to even numbers, so removing one example could move a count by 2,
  twice the sensitivity the release is accounted with."""
  y = np.asarray(y)
  check_labels(y, num_classes, len(y))
  tally = np.bincount(y, minlength=num_classes)
  if tally.max() >= 2**31:
    raise ValueError("a class of 2^31 examples or more is beyond the "
                     "int32 tally")
  return tally.astype(np.int32)


def noisy_counts(key: jax.Array, tally: jax.Array,
                 noise_multiplier: float) -> jax.Array:
  """tally + N(0, sigma_N^2) per class (atom-free sampler), float32;
  jittable. An integer tally is widened to float64 exactly before the
  noise is added (noise.add_gaussian_noise with unit scale)."""
  tally = jnp.asarray(tally)
  scale = 1.0 if jnp.issubdtype(tally.dtype, jnp.integer) else None
  return noise.add_gaussian_noise(key, tally,
                                  noise_multiplier * COUNT_SENSITIVITY,
                                  scale)


def release_class_counts(key: jax.Array, y: np.ndarray, *, num_classes: int,
                         noise_multiplier: float) -> jax.Array:
  """M_N: exact class counts plus N(0, sigma_N^2) per class, (K,) float32.

  y holds ALL training labels (every process loads them; multi-host runs
  then keep their own rows for the other mechanisms), so every process
  computes the same release from the same secret key. The counts are
  tallied on the host, so no compiled program has the private N in its
  shapes; the noise is added once with the atom-free sampler.
  """
  return _noisy(key, jnp.asarray(class_tally(y, num_classes)),
                float(noise_multiplier))


_noisy = jax.jit(noisy_counts, static_argnums=2)


def bound_z(log_tail: float | None) -> float:
  """z with P(N(0, 1) > z) = tau = exp(log_tail) (0 without a tail)."""
  return 0.0 if log_tail is None else float(-special.ndtri_exp(log_tail))


def total_margin(num_classes: int, noise_multiplier: float,
                 log_tail: float | None) -> float:
  """What `released_sizes` adds to the noisy total for its bound on N:
  z sigma_N sqrt(K) (the noise of the sum has std sigma_N sqrt(K))."""
  return bound_z(log_tail) * noise_multiplier * math.sqrt(num_classes)


def released_sizes(noisy_counts, noise_multiplier: float,
                   log_tail: float) -> ClassSizes:
  """Post-processing of the count release: estimates and upper bounds.

  U_c = ceil(n~_c + z sigma_N) and, for the total, ceil(sum n~ + z sigma_N
  sqrt(K)) (the noise of the sum has std sigma_N sqrt(K)), with
  P(N(0, 1) > z) = tau = exp(log_tail): each bound fails with probability
  tau, K + 1 abort events in all.
  """
  est = np.asarray(noisy_counts, np.float64)
  z = bound_z(log_tail)
  bound = np.maximum(np.ceil(est + z * noise_multiplier), 1).astype(np.int64)
  total = int(max(1, math.ceil(est.sum() + total_margin(
      len(est), noise_multiplier, log_tail))))
  return ClassSizes(est, bound, "released", float(noise_multiplier),
                    float(log_tail), total,
                    estimate_std=float(noise_multiplier * COUNT_SENSITIVITY),
                    estimate_source="the count release (class_counts)")


def public_sizes(y: np.ndarray, num_classes: int,
                 policy: str = "declared public") -> ClassSizes:
  """Exact class sizes, for data whose sizes are public knowledge (or a
  non-private run: policy 'exact (not private)')."""
  y = np.asarray(y)
  check_labels(y, num_classes, len(y))
  exact = np.bincount(y, minlength=num_classes)
  return ClassSizes(exact.astype(np.float64), exact.astype(np.int64), policy)


def exact_sizes(y: np.ndarray, num_classes: int) -> ClassSizes:
  """The true class sizes of labels `y`, marked not private: for tests and
  non-private references, never for a private run (use the M_N release or
  `public_sizes` with the user's declaration)."""
  return public_sizes(y, num_classes, "exact (not private)")
