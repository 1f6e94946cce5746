"""Privacy accounting with dp_accounting: events, composition, calibration,
and the privacy report.

Every private mechanism is described as data (a `dp_accounting.DpEvent`) by
one function here; the whole run is their composition. Epsilon is computed
with the PLD accountant (tight); RDP is a cross-check and the Gaussian-DP
central-limit figure is reported only for comparison with the paper (it is an
approximation and can understate epsilon).

Budget allocation: each mechanism gets a public share w_i. Shares are
interpreted in Gaussian-DP units (mu_i^2 proportional to w_i, with mu_i from
the CLT formula) only to fix the *ratio* of the noise multipliers; a single
scale is then calibrated so that the composed PLD epsilon meets the target
without exceeding it. With one mechanism this is plain calibration of its
noise multiplier.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Sequence

import dp_accounting
from absl import logging as absl_logging
import numpy as np
from dp_accounting import pld, rdp
from scipy import optimize, special

from dpgeng_jax.errors import ConfigError, require_int

ADJACENCY = "add-or-remove-one"
# PLD discretisation relative to the target epsilon (`pld_interval`; an
# event with little noise for it is built coarser, `feasible_interval`).
# PLD figures are pessimistic at any discretisation.
PLD_DISCRETIZATION = 1e-4
PLD_RELATIVE_FLOOR = 1e-4
# Calibration is accepted once the composed epsilon is within this fraction
# of the target (never above it).
CALIBRATION_UTILISATION = 0.995
# The calibration searches on a PLD this many times coarser than the
# report's (pessimistic: an upper bound), then checks at the fine one.
COARSE = 30
# Largest target epsilon the calibration accepts (beyond it the guarantee
# says nothing and the noise multipliers are below 0.05).
MAX_EPSILON = 1000.0
# Smallest (at delta 1e-5 it already calibrates noise multipliers of
# about 2e5; targets near 1e-300 underflow the search's GDP scale).
MIN_EPSILON = 1e-6
# The GDP scales (total mu) the calibration searches: beyond them the noise
# multipliers are around 1e8 or 1e-4 (MAX_EPSILON needs about 0.05).
SCALE_RANGE = (1e-8, 1e4)
# The largest ratio of two budget shares `calibrate` takes (the driver's
# options keep to 1e-6..1e6, planning.MIN_SHARE and MAX_SHARE).
MAX_SHARE_RATIO = 1e12
# Share of the target delta reserved for abort events (a Poisson batch over
# its padded capacity, a class above its released upper bound); the
# mechanisms are accounted at the rest. See `failure_log_tail`.
FAILURE_FRACTION = 1e-3
# The smallest sampling rate and target delta accounted: below them the
# accountants' arithmetic overflows (a rate of 1e-160 squared its
# reciprocal past a float; a delta of 5e-324 left no room below it for
# the abort and sampler reserves), and no dataset needs them.
MIN_SAMPLING_RATE = 1e-12
MIN_DELTA = 1e-300
_SMALLEST_NORMAL = float(np.finfo(np.float64).tiny)  # 2.2e-308
# Share of the target delta reserved for the noise sampler's bounded support
# (noise.support_delta: where a neighbour's release lies beyond the depth
# out to which the sampler's law is exact); a run whose noise would need
# more is refused (planning.mechanisms_for).
SUPPORT_FRACTION = 1e-9


# ---------------------------------------------------------------------------
# Events.


def _noise(noise_multiplier) -> float:
  """The noise multiplier as a float (a numpy or JAX scalar too), refused
  unless >= 0 (0: not private) and not nan (a nan would account as
  epsilon 0 under RDP), nor above MAX_NOISE_MULTIPLIER (inf among them),
  which the accountants would refuse only later (check_event)."""
  sigma = float(noise_multiplier)
  if not sigma >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {sigma}")
  if sigma > MAX_NOISE_MULTIPLIER:
    raise ValueError(f"noise_multiplier must be at most "
                     f"{MAX_NOISE_MULTIPLIER:g}, got {sigma} (a release "
                     "with more noise has epsilon 0 to double precision: "
                     "leave it out of the composition)")
  return sigma


def _rate(sampling_rate, what: str = "") -> float:
  """The sampling rate as a float, refused unless in [MIN_SAMPLING_RATE,
  1] (nan too)."""
  return check_sampling_rate(sampling_rate, f"{what}sampling_rate")


def check_sampling_rate(sampling_rate, name: str = "sampling_rate") -> float:
  """`sampling_rate` as a float; ValueError (naming it `name`) unless in
  [MIN_SAMPLING_RATE, 1] (nan too)."""
  q = float(sampling_rate)
  if not MIN_SAMPLING_RATE <= q <= 1:
    raise ValueError(f"{name} must be in [{MIN_SAMPLING_RATE:g}, 1], got "
                     f"{q}")
  return q


def gaussian_event(noise_multiplier: float) -> dp_accounting.DpEvent:
  """One Gaussian release of a sum with L2 sensitivity C, noise sigma * C."""
  return dp_accounting.GaussianDpEvent(_noise(noise_multiplier))


def subsampled_gaussian_event(noise_multiplier: float, sampling_rate: float,
                              steps: int) -> dp_accounting.DpEvent:
  """`steps` Poisson-subsampled Gaussian releases (M_F queries, DP-SGD).
  `steps` must be an integer >= 1 (2.9 is refused, not rounded down)."""
  require_int(steps, "steps", 1)
  inner = dp_accounting.GaussianDpEvent(_noise(noise_multiplier))
  q = _rate(sampling_rate)
  if q < 1.0:
    inner = dp_accounting.PoissonSampledDpEvent(q, inner)
  return dp_accounting.SelfComposedDpEvent(inner, int(steps))


def feature_matching_event(noise_multiplier: float, sampling_rate: float,
                           num_queries: int) -> dp_accounting.DpEvent:
  """M_F: SelfComposed(PoissonSampled(p, Gaussian(sigma_F)), Q)."""
  return subsampled_gaussian_event(noise_multiplier, sampling_rate,
                                   num_queries)


# The most releases one mechanism may have (queries, expert steps, PE
# iterations): composing 1e5 takes about 3 s here, 1e7 does not finish.
MAX_STEPS = 100_000


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """A private mechanism of the run: `steps` releases, each Poisson-sampled
  at `sampling_rate` (1.0 = the full dataset) with Gaussian noise of
  multiplier `noise_multiplier` on a sum of L2 sensitivity C."""
  name: str
  noise_multiplier: float
  sampling_rate: float
  steps: int
  # What one example can change, in the units the noise multiplier scales
  # (for the report): "C" for clipped sums, "1" for counts and the norm-1
  # generator features.
  sensitivity: str = "C"

  def __post_init__(self):
    # numpy and JAX scalars become floats: dp_accounting hashes them, and
    # the PLD cache compares them by value.
    for field in ("noise_multiplier", "sampling_rate"):
      try:
        object.__setattr__(self, field, float(getattr(self, field)))
      except TypeError as e:
        raise ValueError(f"{self.name}: {field} must be a number, got "
                         f"{getattr(self, field)!r}") from e
    try:  # the event builders' check (nan, negative, inf, > 1e100)
      _noise(self.noise_multiplier)
    except ValueError as e:
      raise ValueError(f"{self.name}: {e}") from None
    _rate(self.sampling_rate, f"{self.name}: ")
    steps = self.steps
    if not isinstance(steps, (bool, np.bool_)) and hasattr(
        steps, "__index__"):  # numpy and JAX integer scalars: a Python int
      try:
        object.__setattr__(self, "steps", operator.index(steps))
      except TypeError:
        pass  # a float array: refused below
    require_int(self.steps, f"{self.name}: steps", 1)
    if self.steps > MAX_STEPS:
      raise ConfigError(
          f"{self.name}: {self.steps} releases; at most {MAX_STEPS:,} are "
          "accounted (the PLD of a longer composition takes too long to "
          "build, and the noise each release needs grows with the count)")

  def event(self) -> dp_accounting.DpEvent:
    if self.noise_multiplier <= 0:
      return dp_accounting.NonPrivateDpEvent()
    if self.sampling_rate >= 1.0 and self.steps == 1:
      return gaussian_event(self.noise_multiplier)
    return subsampled_gaussian_event(self.noise_multiplier,
                                     self.sampling_rate, self.steps)

  def with_noise(self, noise_multiplier: float) -> "Mechanism":
    return dataclasses.replace(self, noise_multiplier=float(noise_multiplier))


def composed_event(mechanisms: Sequence[Mechanism]) -> dp_accounting.DpEvent:
  """The whole run as one event."""
  return dp_accounting.ComposedDpEvent([m.event() for m in mechanisms])


# ---------------------------------------------------------------------------
# Epsilon under each accountant.


# Below this delta the PLD figure is not trusted: dp_accounting composes
# PLDs by FFT, whose rounding (~1e-16 of the total mass per bin) and
# default truncations (1e-15) swamp probabilities this small (measured:
# composed epsilons at delta 1e-30 that are not monotone in the noise).
# There the run is accounted, and calibrated, with the RDP accountant,
# a valid (looser) bound at any delta.
PLD_MIN_DELTA = 1e-12


def pld_interval(epsilon: float = 1.0) -> float:
  """PLD discretisation for a target epsilon: PLD_DISCRETIZATION times
  epsilon, a relative resolution of 1e-4 of epsilon at any target (the
  privacy-loss range grows with epsilon, and the build time with range /
  interval; the figures stay pessimistic upper bounds). Above epsilon 1
  this keeps the build fast (measured on the default dpgeng mechanisms at
  epsilon 10: 9.97467 at interval 2e-5, 1e-4 and 1e-3 alike, 1e-3 building
  7x faster than 1e-4); below it, a fixed interval would be a growing
  fraction of the target (the pessimistic rounding alone put epsilon 1e-4
  at delta 1e-8 out of reach), down to epsilon PLD_RELATIVE_FLOOR: finer
  PLDs made the search hunt among figures that the FFT's rounding leaves
  non-monotone (measured: epsilon 1e-6 at delta 1e-5 took 307 PLD builds
  and 330 s at interval 1e-10, 2.5 s at 1e-4)."""
  return PLD_DISCRETIZATION * max(float(epsilon), PLD_RELATIVE_FLOOR)


def accountant_for(delta: float) -> str:
  """'pld' (tight) for delta >= PLD_MIN_DELTA, else 'rdp'."""
  return "pld" if delta >= PLD_MIN_DELTA else "rdp"


def epsilon_of(event: dp_accounting.DpEvent, delta: float,
               interval: float = PLD_DISCRETIZATION) -> float:
  """Epsilon under the accountant `accountant_for(delta)` picks."""
  _check_delta(delta)
  if accountant_for(delta) == "pld":
    return epsilon_pld(event, delta, interval)
  return epsilon_rdp(event, delta)


def _pld_of(event: dp_accounting.DpEvent, interval: float, count: int = 1):
  """The PLD of `count` compositions of `event` (None: no privacy loss),
  as dp_accounting's PLDAccountant builds it (same constructors and
  defaults), for the events the library emits; raises _NonPrivate."""
  gaussian = functools.partial(
      pld.privacy_loss_distribution.from_gaussian_mechanism,
      value_discretization_interval=interval,
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  if isinstance(event, dp_accounting.NoOpDpEvent):
    return None
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return _pld_of(event.event, interval, event.count * count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    parts = [p for p in (_pld_of(e, interval, count) for e in event.events)
             if p is not None]
    return functools.reduce(lambda a, b: a.compose(b), parts) if parts else (
        None)
  if isinstance(event, dp_accounting.GaussianDpEvent):
    if event.noise_multiplier == 0:
      raise _NonPrivate()
    return gaussian(event.noise_multiplier / math.sqrt(count))
  if (isinstance(event, dp_accounting.PoissonSampledDpEvent)
      and isinstance(event.event, dp_accounting.GaussianDpEvent)):
    if event.sampling_probability == 0:
      return None
    if event.event.noise_multiplier == 0:
      raise _NonPrivate()
    return gaussian(event.event.noise_multiplier,
                    sampling_prob=event.sampling_probability
                    ).self_compose(count)
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    raise _NonPrivate()
  raise ValueError(f"unsupported event {event}")


class _NonPrivate(Exception):
  pass


# dp_accounting's Gaussian PLD holds about (1/sigma^2 + 20/sigma) / interval
# points (measured: 3.5e7 at sigma 0.02 and interval 1e-4, 5.7 GB and 46 s
# to build; 1e9 at sigma 0.001, which asked for 76 GiB). An event with that
# little noise for its interval (epsilon above ~1400 from one release; or
# a tiny target epsilon, whose interval is tiny, at a delta so large that
# the noise is near 1) is accounted at the coarser interval that keeps its
# PLD to MAX_PLD_POINTS: still a pessimistic upper bound. The default
# mechanisms at epsilon 1 stay under it (about 2e5 points); at 1e7 a
# `dpgeng plan` at epsilon 1e-4 and delta 0.01 took 113 s, at 3e5 20 s.
MAX_PLD_POINTS = 3e5


def _smallest_sigma(event: dp_accounting.DpEvent, count: int = 1) -> float:
  """The smallest noise multiplier of a Gaussian that `_pld_of` builds for
  `event` (a self-composed plain Gaussian is built as one of sigma /
  sqrt(count)); inf when it builds none."""
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return _smallest_sigma(event.event, event.count * count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return min((_smallest_sigma(e, count) for e in event.events),
               default=math.inf)
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return event.noise_multiplier / math.sqrt(count)
  if isinstance(event, dp_accounting.PoissonSampledDpEvent) and isinstance(
      event.event, dp_accounting.GaussianDpEvent):
    return event.event.noise_multiplier
  return math.inf


def feasible_interval(event: dp_accounting.DpEvent, interval: float,
                      max_points: float = MAX_PLD_POINTS) -> float:
  """`interval`, or the coarser one at which the PLD of `event` has at
  most `max_points` points (MAX_PLD_POINTS, see there)."""
  s = _smallest_sigma(event)
  if not 0 < s < math.inf:
    return interval
  return max(interval, (1 / s ** 2 + 20 / s) / max_points)


def epsilon_pld(event: dp_accounting.DpEvent, delta: float,
                interval: float = PLD_DISCRETIZATION,
                max_points: float = MAX_PLD_POINTS) -> float:
  """PLD epsilon of `event` at `delta` (inf for a non-private event),
  equal to dp_accounting's PLDAccountant(value_discretization_interval=
  interval). The PLD of each distinct event is built once (the calibration
  and the report ask for the same ones many times). An event with very
  little noise is accounted at a coarser interval (`feasible_interval`
  with `max_points`)."""
  _check_delta(delta)
  check_event(event)
  if not (0 < float(interval) < math.inf and float(max_points) >= 1):
    raise ValueError(f"the PLD interval must be finite and > 0 and "
                     f"max_points >= 1, got {interval} and {max_points}")
  interval = feasible_interval(event, interval, max_points)
  key = (_event_key(event), float(interval))
  if key not in _PLD_CACHE:
    if len(_PLD_CACHE) > 256:
      _PLD_CACHE.clear()
    try:
      _PLD_CACHE[key] = _pld_of(event, interval)
    except _NonPrivate:
      _PLD_CACHE[key] = _NonPrivate
  dist = _PLD_CACHE[key]
  if dist is _NonPrivate:
    return math.inf
  if dist is None:
    return 0.0
  return float(dist.get_epsilon_for_delta(delta))


_PLD_CACHE: dict = {}


def _event_key(event: dp_accounting.DpEvent):
  """A key equal for two events exactly when their parameters are equal
  (as floats): not their repr, which numpy's print options may round, so
  that two noise multipliers 1.0 and 1.004 shared one PLD."""
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return ("self", _event_key(event.event), int(event.count))
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return ("composed", tuple(_event_key(e) for e in event.events))
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return ("gaussian", float(event.noise_multiplier))
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    return ("poisson", float(event.sampling_probability),
            _event_key(event.event))
  if isinstance(event, (dp_accounting.NoOpDpEvent,
                        dp_accounting.NonPrivateDpEvent)):
    return (type(event).__name__,)
  raise ValueError(f"unsupported event {event}")


def _check_delta(delta) -> None:
  if not 0 < float(delta) < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")


MAX_NOISE_MULTIPLIER = 1e100
# Below it the accountants overflow (sigma^2 underflows below ~1e-154;
# dp_accounting's PLD raises OverflowError below ~7e-5); one release
# at 1e-3 already has epsilon 5e5 at delta 1e-5.
MIN_NOISE_MULTIPLIER = 1e-3


def check_event(event: dp_accounting.DpEvent) -> None:
  """Raises ValueError for an event the accountants would misread: a
  Gaussian noise multiplier that is nan or negative (RDP accounts nan as
  epsilon 0), a sampling probability outside [0, 1], a self-composition
  count that is not an integer >= 1, or a kind of event this library
  does not emit. The library's own constructors make only valid ones; a
  hand-built event is checked before it is accounted."""
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    c = event.count
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
      raise ValueError(f"a self-composed event needs an integer count >= 1, "
                       f"got {c!r}")
    check_event(event.event)
  elif isinstance(event, dp_accounting.ComposedDpEvent):
    for e in event.events:
      check_event(e)
  elif isinstance(event, dp_accounting.GaussianDpEvent):
    sigma = float(event.noise_multiplier)
    if not 0 <= sigma <= MAX_NOISE_MULTIPLIER:
      # Beyond it the accountants overflow (sigma^2) or divide inf by inf.
      raise ValueError(f"a Gaussian event's noise multiplier must be in "
                       f"[0, {MAX_NOISE_MULTIPLIER:g}], got "
                       f"{event.noise_multiplier} (a release with more noise "
                       "than that has epsilon 0 to double precision: leave "
                       "it out of the composition)")
    if 0 < sigma < MIN_NOISE_MULTIPLIER:
      raise ValueError(f"a Gaussian event's noise multiplier must be 0 (no "
                       f"noise) or at least {MIN_NOISE_MULTIPLIER:g}, got "
                       f"{event.noise_multiplier} (one release at "
                       f"{MIN_NOISE_MULTIPLIER:g} already has epsilon about "
                       "5e5; the accountants overflow below it)")
  elif isinstance(event, dp_accounting.PoissonSampledDpEvent):
    if not 0 <= float(event.sampling_probability) <= 1:
      raise ValueError(f"a sampling probability must be in [0, 1], got "
                       f"{event.sampling_probability}")
    if not isinstance(event.event, dp_accounting.GaussianDpEvent):
      raise ValueError(f"unsupported event {event}: only Poisson-sampled "
                       "Gaussians are accounted here")
    check_event(event.event)
  elif not isinstance(event, (dp_accounting.NoOpDpEvent,
                              dp_accounting.NonPrivateDpEvent)):
    raise ValueError(f"unsupported event {event!r}")


def epsilon_rdp(event: dp_accounting.DpEvent, delta: float) -> float:
  """RDP epsilon of `event` at `delta` (dp_accounting's RdpAccountant,
  add-or-remove-one): a valid, looser bound at any delta; the cross-check
  of the PLD figure and the accountant below PLD_MIN_DELTA."""
  _check_delta(delta)
  check_event(event)
  acc = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  # dp_accounting logs a warning for every fractional order whose series
  # does not converge (it then drops that order, which is safe).
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    eps = float(acc.compose(event).get_epsilon(delta))
  finally:
    absl_logging.set_verbosity(verbosity)
  plain = _without_sampling(event) if eps <= 0 else event
  if plain != event:
    # dp_accounting answers 0 wherever an order's RDP comes out negative,
    # which its Poisson-subsampled Gaussian formula does at extreme noise
    # (measured: -3e-13 at sampling rate 0.01 and noise 1e8; 0 returned
    # at rate 1e-9 and noise 1e3). The event with the sampling dropped
    # (each subsampled Gaussian as its plain Gaussian) bounds it from
    # above and is computed in closed form.
    return epsilon_rdp(plain, delta)
  return eps


def _without_sampling(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  """`event` with every Poisson-sampled event replaced by the event it
  samples: no more private (subsampling only amplifies)."""
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    return _without_sampling(event.event)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return dp_accounting.SelfComposedDpEvent(_without_sampling(event.event),
                                             event.count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent(
        [_without_sampling(e) for e in event.events])
  return event


def gdp_mu(mechanism: Mechanism) -> float:
  """Gaussian-DP mu of a mechanism: exact 1/sigma for one Gaussian, the CLT
  approximation p * sqrt(T (exp(1/sigma^2) - 1)) (Bu et al.) otherwise."""
  s, p, t = mechanism.noise_multiplier, mechanism.sampling_rate, mechanism.steps
  if s <= 0:
    return math.inf
  if p >= 1.0:
    return math.sqrt(t) / s
  try:
    return p * math.sqrt(t * math.expm1(1.0 / s**2))
  except OverflowError:  # sigma below ~0.038: the CLT mu is infinite
    return math.inf


def gdp_delta(mu: float, epsilon: float) -> float:
  """delta(epsilon) of mu-GDP (Dong, Roth and Su), computed in log space:
  Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) cancels catastrophically
  below delta ~ 1e-16 when evaluated directly."""
  a = special.log_ndtr(-epsilon / mu + mu / 2)
  b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
  if b >= a:
    return 0.0
  return float(math.exp(a) * -math.expm1(b - a))


def gdp_epsilon(mu: float, delta: float) -> float:
  """Smallest epsilon with gdp_delta(mu, epsilon) <= delta."""
  if not (mu >= 0 and 0 < delta < 1):  # nan fails too
    raise ValueError(f"need mu >= 0 and delta in (0, 1), got {mu}, {delta}")
  if mu == 0:
    return 0.0
  if not math.isfinite(mu):
    return math.inf
  if gdp_delta(mu, 0.0) <= delta:
    return 0.0
  hi = 1.0
  while gdp_delta(mu, hi) > delta:
    hi *= 2
  return float(optimize.brentq(
      lambda e: math.log(max(gdp_delta(mu, e), 1e-320)) - math.log(delta),
      0.0, hi, xtol=1e-10))


def epsilon_gdp_clt(mechanisms: Sequence[Mechanism], delta: float) -> float:
  """The paper's composition: mu_total^2 = sum mu_i^2 with CLT mu_i."""
  mu = math.sqrt(sum(gdp_mu(m) ** 2 for m in mechanisms))
  return gdp_epsilon(mu, delta)


# ---------------------------------------------------------------------------
# Calibration.


def _sigma_for_mu(mu: float, sampling_rate: float, steps: int) -> float:
  """Inverse of `gdp_mu` in sigma."""
  if sampling_rate >= 1.0:
    return math.sqrt(steps) / mu
  return 1.0 / math.sqrt(math.log1p((mu / sampling_rate) ** 2 / steps))


def allocate(mechanisms: Sequence[Mechanism], shares: Sequence[float],
             scale: float) -> list[Mechanism]:
  """Noise multipliers for a total GDP scale: mu_i = scale * sqrt(w_i)."""
  total = float(sum(shares))
  out = []
  for m, w in zip(mechanisms, shares):
    mu = scale * math.sqrt(w / total)
    out.append(m.with_noise(_sigma_for_mu(mu, m.sampling_rate, m.steps)))
  return out


def _number(v):
  """A 0-d NumPy or JAX array of a real dtype as its Python number (the
  event functions take those; a traced one stays and is refused)."""
  if not (hasattr(v, "dtype") and getattr(v, "shape", None) == ()):
    return v
  # jnp.issubdtype knows bfloat16 (np.issubdtype does not); bool and
  # complex are neither.
  import jax.numpy as jnp
  kind = int if jnp.issubdtype(v.dtype, jnp.integer) else (
      float if jnp.issubdtype(v.dtype, jnp.floating) else None)
  if kind is not None:
    try:
      return kind(np.asarray(v))
    except Exception:  # a traced value: not a number here
      return v
  return v


def validate_target(epsilon: float, delta: float) -> tuple[float, float]:
  """Raises ValueError unless MIN_EPSILON <= epsilon <= MAX_EPSILON and
  0 < delta < 1 (both finite numbers, 0-d arrays included); returns them
  as Python numbers."""
  epsilon, delta = _number(epsilon), _number(delta)
  real = (int, float, np.integer, np.floating)
  if not (isinstance(epsilon, real) and not isinstance(epsilon, bool)
          and math.isfinite(epsilon)
          and MIN_EPSILON <= epsilon <= MAX_EPSILON):
    raise ValueError(f"epsilon must be a number in [{MIN_EPSILON:g}, "
                     f"{MAX_EPSILON:g}], got {epsilon!r}")
  if not (isinstance(delta, real) and not isinstance(delta, bool)
          and 0 < delta < 1):
    raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
  if delta < _SMALLEST_NORMAL:
    # A subnormal delta: the conversion's root search lost its bracket
    # (scipy's "f(a) and f(b) must have different signs" at 5e-324).
    raise ValueError(f"delta must be at least {_SMALLEST_NORMAL:g} (the "
                     f"smallest normal float), got {delta!r}")
  return epsilon, delta


def calibrate(mechanisms: Sequence[Mechanism], epsilon: float, delta: float,
              shares: Sequence[float] | None = None,
              fixed: Sequence[Mechanism] = ()) -> list[Mechanism]:
  """Noise multipliers so that the composed PLD epsilon is <= `epsilon` and
  >= CALIBRATION_UTILISATION * epsilon.

  Args:
    mechanisms: the run's mechanisms (their noise_multiplier is ignored).
    epsilon, delta: the target guarantee for the composition (checked by
      `validate_target`).
    shares: public budget weights, one per mechanism (default equal).
    fixed: mechanisms whose noise is given (e.g. external generated data
      with a declared Gaussian guarantee); composed in, not calibrated.

  Returns:
    The mechanisms with calibrated noise multipliers, checked with the
    accountant `accountant_for(delta)` (PLD at `pld_interval(epsilon)`).

  The PLD search runs on a PLD COARSE times coarser (pessimistic, so its
  epsilon is an upper bound of the fine one), aims it at the fine figure
  extrapolated from that PLD and one twice as coarse again, then moves the
  aim by the miss of the fine figure at the coarse root; every accepted
  result is checked at the fine discretisation.
  """
  try:
    return _calibrate(mechanisms, epsilon, delta, shares, fixed)
  except _NoNoiseNeeded as e:
    if e.reached < MIN_EPSILON:
      raise ValueError(
          f"at delta {delta:g} these mechanisms spend epsilon "
          f"{e.reached:.3g} even with almost no noise, so no target epsilon "
          "calibrates them: a delta that large protects nothing (a run "
          "refuses delta >= 1/N); lower the delta") from None
    raise ValueError(
        f"epsilon {epsilon:g} at delta {delta:g} is more than these "
        f"mechanisms spend even with almost no noise (they reach epsilon "
        f"{e.reached:.6g} at the smallest noise searched): lower the "
        "target epsilon") from None


def _calibrate(mechanisms, epsilon, delta, shares, fixed):
  epsilon, delta = validate_target(epsilon, delta)
  interval = pld_interval(epsilon)
  if accountant_for(delta) == "pld":
    # The coarse PLDs' cap is COARSE times lower than the fine ones': where
    # the cap binds (little noise for a tiny target's interval, as at a
    # large delta) the search still runs on PLDs COARSE times smaller than
    # the check's, not on the same ones (measured: `dpgeng plan` at
    # epsilon 0.01 and delta 0.3 spent 47 s in 22 such searches).
    coarse = functools.partial(epsilon_pld, delta=delta,
                               interval=COARSE * interval,
                               max_points=MAX_PLD_POINTS / COARSE)
    fine = functools.partial(epsilon_pld, delta=delta, interval=interval)
  else:  # RDP is analytic: search on it directly
    coarse = fine = functools.partial(epsilon_rdp, delta=delta)
  if fixed and fine(composed_event(fixed)) >= epsilon:
    raise ValueError("the fixed mechanisms alone already exceed epsilon "
                     f"{epsilon} at delta {delta}")
  if not mechanisms:
    raise ValueError("no mechanisms to calibrate")
  shares = [1.0] * len(mechanisms) if shares is None else list(shares)
  if len(shares) != len(mechanisms) or not all(
      math.isfinite(w) and w > 0 for w in shares):
    raise ValueError(f"need one finite share > 0 per mechanism, got {shares}")
  if max(shares) > MAX_SHARE_RATIO * min(shares):
    # Relative weights: a share of 1e-320 beside 1 divided by zero.
    raise ValueError(f"shares are relative weights within a factor of "
                     f"{MAX_SHARE_RATIO:g} of each other, got {shares}")

  def at(accountant):
    return functools.lru_cache(None)(lambda t: accountant(composed_event(
        [*fixed, *allocate(mechanisms, shares, math.exp(t))])))

  coarse_eps, fine_eps = at(coarse), at(fine)
  least = fine_eps(math.log(SCALE_RANGE[0]))
  if least >= epsilon:
    rdp_hint = "" if accountant_for(delta) == "pld" else (
        f" (below delta {PLD_MIN_DELTA:g} the run is accounted with RDP, "
        "whose conversion to (epsilon, delta) alone costs about log(1/delta)"
        " / 1023; where the mechanisms' part of delta is at least "
        f"{PLD_MIN_DELTA:g} the run is accounted with PLD)")
    raise ValueError(
        f"epsilon {epsilon:g} at delta {delta:g} cannot be certified: the "
        f"{accountant_for(delta).upper()} accountant still gives epsilon "
        f"{least:.4g} for these mechanisms at the most noise the "
        f"calibration searches (a GDP scale of {SCALE_RANGE[0]:g}){rdp_hint};"
        " raise epsilon or delta")
  low_ok = CALIBRATION_UTILISATION * epsilon
  aim = epsilon * (1 + CALIBRATION_UTILISATION) / 2
  root = math.log(_gdp_mu_for_epsilon(epsilon, delta))
  if least > aim:  # reachable only in the last half-percent: no room to aim
    return allocate(mechanisms, shares,
                    math.exp(_bisect(fine_eps, epsilon, low_ok, root)))
  target = aim
  if coarse is not fine:
    # The pessimistic discretisation's excess grows about linearly with
    # the interval: a PLD twice as coarse again predicts the fine figure
    # at the coarse root, so the first fine check usually lands.
    coarser_eps = at(functools.partial(
        epsilon_pld, delta=delta, interval=2 * COARSE * interval,
        max_points=MAX_PLD_POINTS / (2 * COARSE)))
    root = _solve(coarse_eps, target, root)
    c1, c2 = coarse_eps(root), coarser_eps(root)
    predicted = c1 - (c2 - c1) * (COARSE - 1) / COARSE
    target = min(max(target + (aim - predicted), 0.5 * aim), 2 * aim)
  for _ in range(4):
    root = _solve(coarse_eps, target, root)
    got = fine_eps(root)
    if low_ok <= got <= epsilon:
      return allocate(mechanisms, shares, math.exp(root))
    # Near the root fine = coarse - bias: move the coarse aim by the miss.
    target = min(max(target + (aim - got), 0.5 * aim), 2 * aim)
  # Fallback: bisection on the fine figure itself.
  return allocate(mechanisms, shares,
                  math.exp(_bisect(fine_eps, epsilon, low_ok, root)))


def _bisect(fine_eps, epsilon: float, low_ok: float, root: float) -> float:
  """The log GDP scale with fine_eps in [low_ok, epsilon], by bisection
  from `root`; or, once the scale is pinned to 1e-4 (at a large delta
  epsilon falls to 0 at a finite noise, so a small target sits on a cliff
  that no scale may land on; or only the most noise searched reaches the
  target), the largest scale found with fine_eps <= epsilon, a figure
  below the band (maybe 0: a stronger guarantee)."""
  lo, hi = _bracket(fine_eps, epsilon, root)
  while hi - lo > 1e-4 and not low_ok <= fine_eps(lo):
    mid = (lo + hi) / 2
    if fine_eps(mid) <= epsilon:
      lo = mid
    else:
      hi = mid
  if not fine_eps(lo) <= epsilon:
    raise ValueError(f"calibration to epsilon {epsilon} failed")
  return lo


def _solve(eps_of, target: float, guess: float, rtol: float = 2e-4) -> float:
  """t with eps_of(t) within rtol of target: secant steps on log epsilon
  (nearly linear in the log GDP scale t), from `guess`; a bracketed
  Brent search when they do not settle."""
  t0, t1 = guess, guess + 0.05
  e0 = eps_of(t0)
  # epsilon 0 (a delta this large needs almost no noise) or inf: bracket.
  f0 = math.log(e0 / target) if 0 < e0 < math.inf else None
  for _ in range(8 if f0 is not None else 0):
    e1 = eps_of(t1)
    if not (0 < e1 < math.inf):
      break
    f1 = math.log(e1 / target)
    if abs(f1) <= rtol:
      return t1
    if f1 == f0:
      break
    # At most one e-fold of the scale per step: where the figure is flat
    # (an accountant's floor) an unbounded secant step ran the scale to
    # exp(-1e4) = 0.
    step = min(max(-f1 * (t1 - t0) / (f1 - f0), -1.0), 1.0)
    t0, t1, f0 = t1, t1 + step, f1
  lo, hi = _bracket(eps_of, target, guess)
  return optimize.brentq(lambda t: eps_of(t) - target, lo, hi, xtol=1e-5,
                         maxiter=100)


class _NoNoiseNeeded(ValueError):
  def __init__(self, reached: float):
    super().__init__(f"epsilon {reached:g} is reached without noise")
    self.reached = reached


def _bracket(eps_of, target: float, guess: float) -> tuple[float, float]:
  """(lo, hi) in log GDP scale with eps_of(lo) <= target < eps_of(hi)
  (epsilon increases with the scale)."""
  least, most = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])
  lo, hi = max(guess - 0.1, least), min(guess + 0.1, most)
  while eps_of(hi) <= target:
    if hi >= most:
      raise _NoNoiseNeeded(eps_of(hi))
    lo, hi = hi, min(hi + 0.5, most)
  while eps_of(lo) > target:
    if lo <= least:
      raise ValueError(f"epsilon {target:g} is out of reach: even "
                       "negligible noise-to-signal ratios exceed it")
    lo, hi = max(lo - 0.5, least), lo
  return lo, hi


def _gdp_mu_for_epsilon(epsilon: float, delta: float) -> float:
  """The mu whose GDP epsilon at delta is `epsilon` (a starting guess)."""
  lo, hi = 1.0, 1.0
  while gdp_epsilon(hi, delta) < epsilon:
    lo, hi = hi, hi * 2
  while gdp_epsilon(lo, delta) >= epsilon:
    lo, hi = lo / 2, lo
  return float(optimize.brentq(lambda m: gdp_epsilon(m, delta) - epsilon,
                               lo, hi, xtol=1e-3 * lo))


def failure_log_tail(delta: float, epsilon: float, events: int) -> float:
  """log of the per-event probability bound tau of the run's abort events
  (Poisson overflow per class and batch, class above its released bound).

  The run equals a never-aborting mechanism except on the union of the
  abort events, of probability <= events * tau on every dataset, so an
  (epsilon, delta_m)-DP guarantee of the latter gives (epsilon, delta_m +
  (1 + e^epsilon) events tau) for the run. tau is chosen so that this
  addition is FAILURE_FRACTION * delta; computed in logs (e^epsilon
  overflows a float beyond epsilon ~ 709).
  """
  return (math.log(FAILURE_FRACTION * delta) - np.logaddexp(0.0, epsilon)
          - math.log(max(1, events)))


def failure_delta(epsilon: float, events: int, log_tail: float) -> float:
  """(1 + e^epsilon) * events * tau: what the abort events add to delta."""
  if events == 0:
    return 0.0
  return float(math.exp(np.logaddexp(0.0, epsilon) + math.log(events)
                        + log_tail))


# ---------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class DeltaSplit:
  """How the target delta is spent.

  total = external + abort + sampler + mechanisms, where `external` is the
  declared delta of external generated data (basic composition), `abort`
  the FAILURE_FRACTION * total reserved for abort events when the run has
  any (`failure_log_tail`), `sampler` the SUPPORT_FRACTION * total
  reserved for the noise sampler's bounded support when `support` is set
  (a run that draws noise; noise.support_delta must fit in it), and
  `mechanisms` the delta at which the run's own composed event is
  accounted.
  """
  total: float
  external: float = 0.0
  reserve: bool = True
  support: bool = False

  @property
  def abort(self) -> float:
    return FAILURE_FRACTION * self.total if self.reserve else 0.0

  @property
  def sampler(self) -> float:
    return SUPPORT_FRACTION * self.total if self.support else 0.0

  @property
  def mechanisms(self) -> float:
    return self.total - self.external - self.abort - self.sampler

  def log_tail(self, epsilon: float, events: int) -> float:
    """log tau for `events` abort events (see `failure_log_tail`)."""
    if not self.reserve:
      raise ValueError("no delta is reserved for abort events")
    return failure_log_tail(self.total, epsilon, events)


def privacy_report(mechanisms: Sequence[Mechanism], *, target_epsilon: float,
                   delta: float, private: bool, public_metadata: Sequence[str],
                   notes: Sequence[str] = (),
                   external: tuple[float, float] | None = None,
                   split: DeltaSplit | None = None,
                   abort_events: dict | None = None,
                   nonprivate_reasons: Sequence[str] = ()) -> dict:
  """privacy.json content (see DESIGN.md).

  `external` is an (epsilon, delta) guarantee declared for data made
  outside this run (external generated data); it is added by basic
  composition: the run's mechanisms are accounted at `split.mechanisms`
  (which excludes the external delta and the abort reserve) and their
  epsilon is increased by epsilon_ext. `abort_events` describes the abort
  events (counts and tail) covered by `split.abort`. Any
  `nonprivate_reasons` make the run "private": false, each reason listed.
  "meets_target" says whether the run is private and its headline
  epsilon within `target_epsilon` (a note says so where it is not): the
  epsilon figures of a run that is not private account its mechanisms as
  configured, a guarantee its outputs do not have.
  """
  if not (math.isfinite(float(target_epsilon)) and target_epsilon > 0):
    raise ValueError(f"target_epsilon must be finite and > 0, got "
                     f"{target_epsilon}")
  _check_delta(delta)
  target_epsilon, delta = float(target_epsilon), float(delta)  # JSON types
  if not isinstance(private, (bool, np.bool_)):
    # bool("no") is True: a flag that is not a bool says nothing.
    raise ValueError(f"private must be True or False, got {private!r}")
  notes = list(notes)
  eps_ext, delta_ext = map(float, external) if external else (0.0, 0.0)
  if not (0 <= eps_ext < math.inf and 0 <= delta_ext <= delta):
    # A negative declaration would lower the headline figure.
    raise ValueError(f"an external guarantee needs 0 <= epsilon < inf and "
                     f"0 <= delta <= the total delta {delta:g}, got "
                     f"{external}")
  split = split or DeltaSplit(delta, delta_ext, reserve=False)
  if not (math.isclose(split.total, delta, rel_tol=1e-12)
          and math.isclose(split.external, delta_ext, rel_tol=1e-12,
                           abs_tol=0.0)):
    # A split of another total, or without the external delta, made the
    # headline delta understate what the run spends.
    raise ValueError(f"split {split} does not match delta {delta:g} and "
                     f"the external delta {delta_ext:g}")
  d = split.mechanisms
  # The discretisation calibration used: the run's mechanisms were
  # calibrated to the target less the external epsilon.
  interval = pld_interval(target_epsilon - eps_ext)
  accountant = accountant_for(d) if d > 0 else "pld"
  event = composed_event(mechanisms)
  reasons = list(nonprivate_reasons)
  unbounded = any(m.noise_multiplier <= 0 for m in mechanisms) or d <= 0
  if any(m.noise_multiplier <= 0 for m in mechanisms):
    reasons.append("a mechanism has no noise")
  elif private:
    from dpgeng_jax import noise  # pylint: disable=import-outside-toplevel
    extra = noise.support_excess(mechanisms, split.sampler)
    if extra:  # more delta than the split reserves for the sampler
      reasons.append(f"its noise is too small for the sampler's support "
                     f"({extra:.3g} more delta than the "
                     f"{split.sampler:.3g} reserved)")
  if d <= 0:
    reasons.append("no delta is left for the mechanisms")
  # The epsilon figures account the mechanisms as configured; "private"
  # says whether the outputs are protected by them.
  if unbounded:
    eps_pld = eps_rdp = eps_clt = math.inf
  elif not mechanisms:
    eps_pld = eps_rdp = eps_clt = eps_ext
  else:
    eps_pld = (epsilon_pld(event, d, interval) + eps_ext
               if accountant == "pld" else None)
    eps_rdp = epsilon_rdp(event, d) + eps_ext
    eps_clt = epsilon_gdp_clt(mechanisms, d) + eps_ext
  if eps_pld is None:
    notes.append(f"delta {d:g} is below {PLD_MIN_DELTA:g}, where the PLD "
                 "figure is not reliable: the run is accounted (and was "
                 "calibrated) with the RDP accountant")
  headline = eps_rdp if eps_pld is None else eps_pld
  if external:
    notes.append(
        f"external generated data declared ({eps_ext:g}, {delta_ext:g})-DP, "
        "added by basic composition to the other mechanisms accounted at "
        f"delta {d:g}")
  if (eps_pld is not None and math.isfinite(eps_pld) and eps_clt < eps_pld
      and f"{eps_clt:.6g}" != f"{eps_pld:.6g}"):
    notes.append(
        f"The GDP-CLT figure ({eps_clt:.6g}) is below the PLD figure "
        f"({eps_pld:.6g}): the CLT approximation understates epsilon here; "
        "the guarantee is the PLD figure.")
  per = []
  for m in mechanisms:
    e = (math.inf if m.noise_multiplier <= 0 or d <= 0
         else epsilon_of(m.event(), d, interval))
    per.append({
        "name": m.name,
        "noise_multiplier": float(m.noise_multiplier),
        "sampling_rate": float(m.sampling_rate),
        "steps": int(m.steps),
        "l2_sensitivity": m.sensitivity,
        "epsilon_alone": _finite_or_none(e),
    })
  private = bool(private) and not reasons
  meets = private and bool(headline <= target_epsilon)
  if private and not meets:
    notes.append(f"epsilon {headline:.6g} EXCEEDS the target "
                 f"{target_epsilon:g}: the guarantee is the larger figure")
  notes = [f"NOT private: {r}" for r in reasons] + notes
  return {
      "private": private,
      "not_private_because": reasons,
      "target_epsilon": target_epsilon,
      "delta": split.total,
      "delta_mechanisms": d,
      "delta_abort_events": split.abort,
      "delta_sampler_support": split.sampler,
      "delta_external": split.external,
      "abort_events": abort_events,
      "neighbouring_relation": ADJACENCY,
      "accountant": accountant,
      "epsilon": _finite_or_none(headline),
      "meets_target": meets,
      "epsilon_pld": _finite_or_none(eps_pld),
      "epsilon_rdp": _finite_or_none(eps_rdp),
      "epsilon_gdp_clt": _finite_or_none(eps_clt),
      "pld_discretization": feasible_interval(event, interval),
      "mechanisms": per,
      "external_generated_data": (
          {"epsilon": eps_ext, "delta": delta_ext} if external else None),
      "public_metadata": list(public_metadata),
      "notes": notes,
      "dp_event": repr(event),
  }


def _check_abort_events(abort, target: float, reserved: float) -> list:
  """What the abort events of a record add to delta, (1 + e^epsilon)
  events tau (`failure_delta`), recomputed from their count and tau: it
  must be the listed delta_added and fit in the reserve. (Bounds sized for
  one event where there are many passed every test before.)"""
  if not abort:
    return []
  try:
    events, tau = int(abort["events"]), float(abort["probability_per_event"])
    listed = float(abort["delta_added"])
  except (KeyError, TypeError, ValueError) as e:
    return [f"its abort_events cannot be read ({type(e).__name__}: {e})"]
  added = failure_delta(target, events, math.log(tau)) if tau > 0 else 0.0
  problems = []
  if not math.isclose(listed, added, rel_tol=1e-6):
    problems.append(f"abort_events' delta_added {listed:g} where {events} "
                    f"events of probability {tau:g} add {added:g}")
  if added > reserved * (1 + 1e-9):
    problems.append(f"its {events} abort events of probability {tau:g} add "
                    f"{added:.3g} to delta, more than the {reserved:.3g} "
                    "reserved (delta_abort_events)")
  return problems


def check_report(record: dict, rel_tol: float = 1e-6) -> list[str]:
  """What in a privacy.json `record` (privacy_report's dict) disagrees
  with its own mechanisms: its composed epsilon figures and accountant
  recomputed from the listed mechanisms, delta split and external
  guarantee, each mechanism's epsilon alone, what its abort events add to
  delta against their reserve, its headline and
  `meets_target` from those. Empty when all agree. (`dpgeng report`
  rebuilds a report from the file and must not repeat a hand-edited
  headline.)"""
  problems = []
  try:
    mechs = [Mechanism(m["name"], m["noise_multiplier"], m["sampling_rate"],
                       m["steps"], m.get("l2_sensitivity", "C"))
             for m in record["mechanisms"]]
    target = float(record["target_epsilon"])
    d = float(record["delta_mechanisms"])
    parts = (float(record["delta_external"]),
             float(record["delta_abort_events"]),
             float(record.get("delta_sampler_support", 0.0)), d)
    ext = record.get("external_generated_data") or {}
    eps_ext = float(ext.get("epsilon", 0.0))
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    return [f"its fields cannot be read ({type(e).__name__}: {e})"]
  # Far below the smallest reserve (SUPPORT_FRACTION of delta): a part
  # counted twice must not pass as rounding.
  if not math.isclose(sum(parts), float(record.get("delta", -1)),
                      rel_tol=1e-12):
    problems.append(f"delta {record.get('delta')} is not the sum of its "
                    f"parts {sum(parts):g}")
  total = float(record.get("delta", 0.0) or 0.0)
  for key, part, fraction in (("delta_abort_events", parts[1],
                               FAILURE_FRACTION),
                              ("delta_sampler_support", parts[2],
                               SUPPORT_FRACTION)):
    # A reserve is its fixed share of delta, or none: a larger one would
    # lower the mechanisms' delta that the figures are checked at.
    if part and not math.isclose(part, fraction * total, rel_tol=1e-12):
      problems.append(f"{key} {part:g} is not {fraction:g} of delta")
  problems += _check_abort_events(record.get("abort_events"), target,
                                  parts[1])
  if not mechs or d <= 0 or any(m.noise_multiplier <= 0 for m in mechs):
    want = {"epsilon_rdp": eps_ext if not mechs and d > 0 else None}
  else:
    event = composed_event(mechs)
    want = {"epsilon_rdp": epsilon_rdp(event, d) + eps_ext}
    if record.get("accountant") != accountant_for(d):
      problems.append(f"accountant {record.get('accountant')!r} is not "
                      f"the one for delta {d:g} ({accountant_for(d)!r})")
    elif accountant_for(d) == "pld":
      want["epsilon_pld"] = epsilon_pld(
          event, d, pld_interval(target - eps_ext)) + eps_ext
  for key, value in want.items():
    got = record.get(key)
    if value is None or not math.isfinite(value):
      ok = got is None
    else:
      ok = isinstance(got, (int, float)) and math.isclose(
          got, value, rel_tol=rel_tol)
    if not ok:
      problems.append(f"{key} {got} where its mechanisms give "
                      f"{_finite_or_none(value)}")
  interval = pld_interval(target - eps_ext)
  for m, listed in zip(mechs, record["mechanisms"]):
    # Each mechanism's own figure, as privacy_report computes it.
    alone = (math.inf if m.noise_multiplier <= 0 or d <= 0
             else epsilon_of(m.event(), d, interval))
    got = listed.get("epsilon_alone")
    ok = got is None if not math.isfinite(alone) else (
        isinstance(got, (int, float)) and math.isclose(got, alone,
                                                       rel_tol=rel_tol))
    if not ok:
      problems.append(f"{m.name}'s epsilon_alone {got} where its "
                      f"parameters give {_finite_or_none(alone)}")
  headline = record.get("epsilon_pld" if record.get("accountant") == "pld"
                        else "epsilon_rdp")
  if record.get("epsilon") != headline:
    problems.append(f"epsilon {record.get('epsilon')} is not its "
                    f"accountant's figure {headline}")
  if record.get("private") and "delta_sampler_support" in record:
    # A record written before the reserve existed has none to check
    # against.
    from dpgeng_jax import noise  # pylint: disable=import-outside-toplevel
    extra = noise.support_excess(mechs, parts[2])
    if extra:
      problems.append(f"its noise is too small for the sampler's support: "
                      f"{extra:.3g} more delta than the {parts[2]:.3g} "
                      "reserved (delta_sampler_support)")
  meets = bool(record.get("private")) and headline is not None and (
      headline <= target)
  if record.get("meets_target") != meets:
    problems.append(f"meets_target {record.get('meets_target')} where "
                    f"its figures give {meets}")
  return problems


def _finite_or_none(x):
  return float(x) if x is not None and np.isfinite(x) else None
