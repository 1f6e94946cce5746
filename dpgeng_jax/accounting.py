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
import math
from typing import Sequence

import dp_accounting
from absl import logging as absl_logging
import numpy as np
from dp_accounting import pld, rdp
from scipy import optimize, stats

ADJACENCY = "add-or-remove-one"
PLD_DISCRETIZATION = 1e-4
# Calibration is accepted once the composed epsilon is within this fraction
# of the target (never above it).
CALIBRATION_UTILISATION = 0.995


# ---------------------------------------------------------------------------
# Events.


def gaussian_event(noise_multiplier: float) -> dp_accounting.DpEvent:
  """One Gaussian release of a sum with L2 sensitivity C, noise sigma * C."""
  return dp_accounting.GaussianDpEvent(noise_multiplier)


def subsampled_gaussian_event(noise_multiplier: float, sampling_rate: float,
                              steps: int) -> dp_accounting.DpEvent:
  """`steps` Poisson-subsampled Gaussian releases (M_F queries, DP-SGD)."""
  inner = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1.0:
    inner = dp_accounting.PoissonSampledDpEvent(sampling_rate, inner)
  return dp_accounting.SelfComposedDpEvent(inner, int(steps))


def feature_matching_event(noise_multiplier: float, sampling_rate: float,
                           num_queries: int) -> dp_accounting.DpEvent:
  """M_F: SelfComposed(PoissonSampled(p, Gaussian(sigma_F)), Q)."""
  return subsampled_gaussian_event(noise_multiplier, sampling_rate,
                                   num_queries)


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """A private mechanism of the run: `steps` releases, each Poisson-sampled
  at `sampling_rate` (1.0 = the full dataset) with Gaussian noise of
  multiplier `noise_multiplier` on a sum of L2 sensitivity C."""
  name: str
  noise_multiplier: float
  sampling_rate: float
  steps: int

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


def epsilon_pld(event: dp_accounting.DpEvent, delta: float) -> float:
  acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                          value_discretization_interval=PLD_DISCRETIZATION)
  return float(acc.compose(event).get_epsilon(delta))


def epsilon_rdp(event: dp_accounting.DpEvent, delta: float) -> float:
  acc = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  # dp_accounting logs a warning for every fractional order whose series
  # does not converge (it then drops that order, which is safe).
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    return float(acc.compose(event).get_epsilon(delta))
  finally:
    absl_logging.set_verbosity(verbosity)


def gdp_mu(mechanism: Mechanism) -> float:
  """Gaussian-DP mu of a mechanism: exact 1/sigma for one Gaussian, the CLT
  approximation p * sqrt(T (exp(1/sigma^2) - 1)) (Bu et al.) otherwise."""
  s, p, t = mechanism.noise_multiplier, mechanism.sampling_rate, mechanism.steps
  if s <= 0:
    return math.inf
  if p >= 1.0:
    return math.sqrt(t) / s
  return p * math.sqrt(t * math.expm1(1.0 / s**2))


def gdp_delta(mu: float, epsilon: float) -> float:
  """delta(epsilon) of mu-GDP (Dong, Roth and Su)."""
  return float(stats.norm.cdf(-epsilon / mu + mu / 2)
               - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
  """Smallest epsilon with gdp_delta(mu, epsilon) <= delta."""
  if not math.isfinite(mu):
    return math.inf
  if gdp_delta(mu, 0.0) <= delta:
    return 0.0
  hi = 1.0
  while gdp_delta(mu, hi) > delta:
    hi *= 2
  return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi,
                               xtol=1e-10))


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


def calibrate(mechanisms: Sequence[Mechanism], epsilon: float, delta: float,
              shares: Sequence[float] | None = None,
              fixed: Sequence[Mechanism] = ()) -> list[Mechanism]:
  """Noise multipliers so that the composed PLD epsilon is <= `epsilon` and
  >= CALIBRATION_UTILISATION * epsilon.

  Args:
    mechanisms: the run's mechanisms (their noise_multiplier is ignored).
    epsilon, delta: the target guarantee for the composition.
    shares: public budget weights, one per mechanism (default equal).
    fixed: mechanisms whose noise is given (e.g. external generated data
      with a declared Gaussian guarantee); composed in, not calibrated.

  Returns:
    The mechanisms with calibrated noise multipliers.
  """
  if epsilon <= 0 or not 0 < delta < 1:
    raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon}, "
                     f"{delta}")
  if fixed and epsilon_pld(composed_event(fixed), delta) >= epsilon:
    raise ValueError("the fixed mechanisms alone already exceed epsilon "
                     f"{epsilon} at delta {delta}")
  shares = [1.0] * len(mechanisms) if shares is None else list(shares)
  if len(shares) != len(mechanisms) or min(shares) <= 0:
    raise ValueError("one positive share per mechanism is required")

  cache = {}

  def eps_at(log_scale: float) -> float:
    if log_scale not in cache:
      cache[log_scale] = epsilon_pld(composed_event(
          [*fixed, *allocate(mechanisms, shares, math.exp(log_scale))]),
          delta)
    return cache[log_scale]

  # Epsilon grows with the GDP scale. Start from the GDP-CLT guess, bracket
  # in log space, then Brent towards the middle of the accepted band
  # [CALIBRATION_UTILISATION * epsilon, epsilon]; keep the feasible end.
  aim = epsilon * (1 + CALIBRATION_UTILISATION) / 2
  guess = math.log(_gdp_mu_for_epsilon(epsilon, delta))
  lo, hi = guess - 0.2, guess + 0.2
  while eps_at(hi) <= aim:
    lo, hi = hi, hi + 0.5
    if hi > math.log(1e4):
      raise ValueError(f"epsilon {epsilon} needs no noise at all here")
  while eps_at(lo) > aim:
    lo, hi = lo - 0.5, lo
  if eps_at(lo) < CALIBRATION_UTILISATION * epsilon:
    root = optimize.brentq(lambda t: eps_at(t) - aim, lo, hi, xtol=1e-4,
                           maxiter=50)
    if eps_at(root) <= epsilon:
      lo = root
    else:  # Brent's last iterate can sit just above: bisect to feasibility.
      hi = root
      for _ in range(60):
        mid = (lo + hi) / 2
        if eps_at(mid) <= epsilon:
          lo = mid
          if eps_at(mid) >= CALIBRATION_UTILISATION * epsilon:
            break
        else:
          hi = mid
  assert eps_at(lo) <= epsilon
  return allocate(mechanisms, shares, math.exp(lo))


def _gdp_mu_for_epsilon(epsilon: float, delta: float) -> float:
  """The mu whose GDP epsilon at delta is `epsilon` (a starting guess)."""
  hi = 1.0
  while gdp_epsilon(hi, delta) < epsilon:
    hi *= 2
  return float(optimize.brentq(lambda m: gdp_epsilon(m, delta) - epsilon,
                               1e-6, hi, xtol=1e-6))


# ---------------------------------------------------------------------------
# The report.


def privacy_report(mechanisms: Sequence[Mechanism], *, target_epsilon: float,
                   delta: float, private: bool, public_metadata: Sequence[str],
                   notes: Sequence[str] = (),
                   external: tuple[float, float] | None = None) -> dict:
  """privacy.json content (see DESIGN.md).

  `external` is an (epsilon, delta) guarantee declared for data made
  outside this run (external generated data); it is added by basic
  composition: the run's mechanisms are accounted at delta - delta_ext and
  their epsilon is increased by epsilon_ext.
  """
  notes = list(notes)
  eps_ext, delta_ext = external if external else (0.0, 0.0)
  d = delta - delta_ext
  event = composed_event(mechanisms)
  nonprivate = any(m.noise_multiplier <= 0 for m in mechanisms)
  if nonprivate or d <= 0:
    eps_pld = eps_rdp = eps_clt = math.inf
  else:
    eps_pld = epsilon_pld(event, d) + eps_ext
    eps_rdp = epsilon_rdp(event, d) + eps_ext
    eps_clt = epsilon_gdp_clt(mechanisms, d) + eps_ext
  if external:
    notes.append(
        f"external generated data declared ({eps_ext:g}, {delta_ext:g})-DP, "
        "added by basic composition to the other mechanisms accounted at "
        f"delta {d:g}")
  if eps_clt < eps_pld:
    notes.append(
        f"The GDP-CLT figure ({eps_clt:.4g}) is below the PLD figure "
        f"({eps_pld:.4g}): the CLT approximation understates epsilon here; "
        "the guarantee is the PLD figure.")
  per = []
  for m in mechanisms:
    e = math.inf if m.noise_multiplier <= 0 else epsilon_pld(m.event(), delta)
    per.append({
        "name": m.name,
        "noise_multiplier": m.noise_multiplier,
        "sampling_rate": m.sampling_rate,
        "steps": m.steps,
        "epsilon_alone_pld": _finite_or_none(e),
    })
  private = bool(private) and not nonprivate
  return {
      "private": private,
      "target_epsilon": target_epsilon,
      "delta": delta,
      "neighbouring_relation": ADJACENCY,
      "accountant": "pld",
      "epsilon": _finite_or_none(eps_pld),
      "epsilon_pld": _finite_or_none(eps_pld),
      "epsilon_rdp": _finite_or_none(eps_rdp),
      "epsilon_gdp_clt": _finite_or_none(eps_clt),
      "pld_discretization": PLD_DISCRETIZATION,
      "mechanisms": per,
      "external_generated_data": (
          {"epsilon": eps_ext, "delta": delta_ext} if external else None),
      "public_metadata": list(public_metadata),
      "notes": notes,
      "dp_event": repr(event),
  }


def _finite_or_none(x: float):
  return float(x) if np.isfinite(x) else None
