"""Accountant figures against dp_accounting, calibration, the report."""

import math
import time

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from dpgeng_jax import accounting as A
from dpgeng_jax import accounting


def _pld(event, delta):
  acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                          value_discretization_interval=A.PLD_DISCRETIZATION)
  return acc.compose(event).get_epsilon(delta)


def test_feature_matching_event_is_self_composed_poisson_gaussian():
  ev = A.feature_matching_event(1.3, 0.1, 7)
  want = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.1, dp_accounting.GaussianDpEvent(1.3)), 7)
  assert ev == want


@pytest.mark.parametrize("sigma,p,q", [(1.0, 0.1, 10), (2.5, 0.5, 4),
                                       (4.0, 1.0, 3)])
def test_epsilon_equals_dp_accounting_for_the_same_event(sigma, p, q):
  m = A.Mechanism("feature_matching", sigma, p, q)
  inner = dp_accounting.GaussianDpEvent(sigma)
  if p < 1:  # sampling the whole dataset is no sampling
    inner = dp_accounting.PoissonSampledDpEvent(p, inner)
  hand = dp_accounting.SelfComposedDpEvent(inner, q)
  assert A.epsilon_pld(m.event(), 1e-5) == pytest.approx(_pld(hand, 1e-5),
                                                        rel=1e-9)
  r = rdp.RdpAccountant().compose(hand).get_epsilon(1e-5)
  assert A.epsilon_rdp(m.event(), 1e-5) == pytest.approx(r, rel=1e-9)


def test_composed_event_equals_dp_accounting_composition():
  """The built-in generator's Gaussian release composed with M_F."""
  ms = [A.Mechanism("generator", 3.0, 1.0, 1),
        A.Mechanism("feature_matching", 1.5, 0.2, 5)]
  hand = dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(3.0),
      dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
          0.2, dp_accounting.GaussianDpEvent(1.5)), 5)])
  assert A.epsilon_pld(A.composed_event(ms), 1e-6) == pytest.approx(
      _pld(hand, 1e-6), rel=1e-9)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_calibration_meets_target_without_exceeding_it(eps):
  m = A.Mechanism("feature_matching", 0.0, 0.25, 5)
  (cal,) = A.calibrate([m], eps, 1e-5)
  got = A.epsilon_pld(cal.event(), 1e-5)
  assert got <= eps
  assert got >= 0.98 * eps


def test_calibration_of_several_mechanisms_respects_shares():
  ms = [A.Mechanism("a", 0.0, 1.0, 1), A.Mechanism("b", 0.0, 0.3, 4)]
  cal = A.calibrate(ms, 2.0, 1e-5, shares=[1.0, 3.0])
  got = A.epsilon_pld(A.composed_event(cal), 1e-5)
  assert 0.98 * 2.0 <= got <= 2.0
  mu = [A.gdp_mu(m) for m in cal]
  assert mu[1] ** 2 / mu[0] ** 2 == pytest.approx(3.0, rel=1e-6)


def test_calibration_rejects_invalid_targets():
  m = A.Mechanism("fm", 0.0, 0.5, 2)
  for eps, delta, what in [(0.0, 1e-5, "epsilon"), (-1.0, 1e-5, "epsilon"),
                           (1.0, 0.0, "delta"), (1.0, 1.0, "delta")]:
    with pytest.raises(ValueError, match=f"^{what} must be a number in"):
      A.calibrate([m], eps, delta)


def test_gdp_of_one_gaussian_is_exact():
  # One Gaussian with sigma is exactly (1/sigma)-GDP, and the PLD accountant
  # of the same Gaussian gives (up to discretisation) the same epsilon.
  sigma = 2.0
  eps_gdp = A.gdp_epsilon(1 / sigma, 1e-5)
  assert A.gdp_delta(1 / sigma, eps_gdp) == pytest.approx(1e-5, rel=1e-6)
  eps_pld = A.epsilon_pld(A.gaussian_event(sigma), 1e-5)
  assert eps_pld == pytest.approx(eps_gdp, rel=2e-3)
  assert eps_pld >= eps_gdp - 1e-9  # PLD is pessimistic, never optimistic


def test_gdp_clt_formula_for_subsampled_gaussian():
  m = A.Mechanism("fm", 1.2, 0.1, 50)
  assert A.gdp_mu(m) == pytest.approx(
      0.1 * math.sqrt(50 * (math.exp(1 / 1.44) - 1)))


def test_report_has_the_documented_fields_and_flags_nonprivate_runs():
  ms = [A.Mechanism("feature_matching", 1.0, 0.5, 4)]
  r = A.privacy_report(ms, target_epsilon=5.0, delta=1e-5, private=True,
                       public_metadata=["K"])
  for key in ("target_epsilon", "delta", "neighbouring_relation",
              "accountant", "epsilon_pld", "epsilon_rdp", "epsilon_gdp_clt",
              "mechanisms", "public_metadata", "private"):
    assert key in r
  assert r["private"] is True
  assert r["neighbouring_relation"] == "add-or-remove-one"
  assert r["epsilon_rdp"] >= r["epsilon_pld"] * 0.99
  (mech,) = r["mechanisms"]
  assert set(mech) >= {"name", "noise_multiplier", "sampling_rate", "steps",
                       "epsilon_alone"}
  nonpriv = A.privacy_report([ms[0].with_noise(0.0)], target_epsilon=5.0,
                             delta=1e-5, private=True, public_metadata=[])
  assert nonpriv["private"] is False and nonpriv["epsilon_pld"] is None


def test_report_notes_when_clt_understates_epsilon():
  # Large sampling rate, few steps: the CLT is optimistic.
  ms = [A.Mechanism("fm", 0.8, 0.5, 3)]
  r = A.privacy_report(ms, target_epsilon=10, delta=1e-5, private=True,
                       public_metadata=[])
  assert r["epsilon_gdp_clt"] < r["epsilon_pld"]
  assert any("understates" in n for n in r["notes"])


# --- The whole (epsilon, delta) range (issue: calibration broke at tiny
# delta, died on large epsilon and took minutes at epsilon 100).

THREE = [A.Mechanism("generator", 0.0, 1.0, 1),
         A.Mechanism("feature_matching", 0.0, 0.5, 20),
         A.Mechanism("expert", 0.0, 0.5, 10)]


@pytest.mark.parametrize("delta", [1e-5, 1e-11, 1e-13, 1e-16, 1e-30, 1e-100])
def test_calibration_is_right_for_every_delta(delta):
  cal = A.calibrate(THREE, 1.0, delta)
  event = A.composed_event(cal)
  got = A.epsilon_of(event, delta)
  assert A.CALIBRATION_UTILISATION * 1.0 <= got <= 1.0
  # Sane noise: more than for delta 1e-5, and within what RDP alone needs
  # (a valid bound at any delta): never the 1e15-1e17 of a broken search.
  for m in cal:
    assert 1.0 < m.noise_multiplier < 200.0, m
  if A.accountant_for(delta) == "rdp":  # the guarantee is RDP's figure
    assert A.epsilon_rdp(event, delta) == got
  else:  # RDP's bound is looser than the tight PLD figure, never below
    assert A.epsilon_rdp(event, delta) >= got - 1e-6
  assert A.accountant_for(delta) == ("pld" if delta >= A.PLD_MIN_DELTA
                                     else "rdp")


def test_pld_is_not_used_where_its_figures_are_not_monotone():
  # At delta 1e-30 dp_accounting's composed PLD gives epsilons that are not
  # monotone in the noise (FFT rounding swamps probabilities that small);
  # below PLD_MIN_DELTA the report and the calibration use RDP.
  r = A.privacy_report(A.calibrate(THREE, 1.0, 1e-30), target_epsilon=1.0,
                       delta=1e-30, private=True, public_metadata=[])
  assert r["accountant"] == "rdp" and r["epsilon_pld"] is None
  assert 0.995 <= r["epsilon"] <= 1.0
  assert any("RDP" in n for n in r["notes"])


def test_gdp_figures_stay_accurate_at_tiny_delta():
  # The direct formula Phi(a) - e^eps Phi(b) cancels below delta ~ 1e-16;
  # against 50-digit arithmetic (mpmath, a dependency of dp_accounting).
  import mpmath
  mpmath.mp.dps = 50
  mu = 1 / 21.0
  for delta in (1e-5, 1e-20, 1e-30, 1e-100):
    eps = A.gdp_epsilon(mu, delta)
    exact = (mpmath.ncdf(-eps / mu + mu / 2)
             - mpmath.exp(eps) * mpmath.ncdf(-eps / mu - mu / 2))
    assert float(exact) == pytest.approx(delta, rel=1e-6)
  # One Gaussian is exactly GDP: the PLD figure agrees where it is valid.
  eps = A.gdp_epsilon(mu, 1e-11)
  assert eps == pytest.approx(A.epsilon_pld(A.gaussian_event(21.0), 1e-11),
                              rel=1e-5)


@pytest.mark.parametrize("eps", [30.0, 100.0, 1000.0])
def test_large_epsilons_calibrate_quickly(eps):
  t = time.time()
  cal = A.calibrate(THREE, eps, 1e-5)
  got = A.epsilon_of(A.composed_event(cal), 1e-5, A.pld_interval(eps))
  assert A.CALIBRATION_UTILISATION * eps <= got <= eps
  # A coarse guard, not a benchmark: `plan --epsilon 100` took 122 s.
  assert time.time() - t < 60


@pytest.mark.parametrize("eps", [1e6, math.inf, math.nan, 0.0])
def test_epsilon_outside_the_supported_range_is_refused(eps):
  with pytest.raises(ValueError, match="epsilon"):
    A.calibrate(THREE, eps, 1e-5)


def test_the_abort_tail_is_the_reserve_over_events_and_one_plus_e_eps():
  """tau = FAILURE_FRACTION delta / ((1 + e^eps) events), from the
  formula itself (not from failure_delta, which could share an error)."""
  tail = A.failure_log_tail(1e-5, 1.0, 1000)
  assert tail == pytest.approx(math.log(A.FAILURE_FRACTION * 1e-5)
                               - math.log(1 + math.e) - math.log(1000),
                               rel=1e-12)
  assert A.failure_delta(1.0, 1000, tail) == pytest.approx(
      (1 + math.e) * 1000 * math.exp(tail), rel=1e-12)


def test_abort_events_never_overflow_and_fit_in_the_reserve():
  for eps, delta in ((1.0, 1e-5), (1000.0, 1e-30), (10.0, 1e-300)):
    tail = A.failure_log_tail(delta, eps, 1000)
    assert np.isfinite(tail)
    added = A.failure_delta(eps, 1000, tail)
    assert added == pytest.approx(A.FAILURE_FRACTION * delta, rel=1e-9)
  split = A.DeltaSplit(1e-30, external=2e-31)
  assert split.abort + split.external + split.mechanisms == pytest.approx(
      1e-30, rel=1e-12)
  assert 0 < split.abort < split.total


@pytest.mark.parametrize("kw", [
    {}, {"support": True}, {"external": 1e-7, "support": True},
    {"reserve": False, "support": True}, {"reserve": False}])
def test_delta_split_parts_sum_to_the_total(kw):
  """Every reserve, the sampler's included, comes out of the mechanisms'
  delta: the parts sum to the total far below the reserves' own size."""
  s = A.DeltaSplit(1e-5, **kw)
  assert s.sampler == (A.SUPPORT_FRACTION * 1e-5 if kw.get("support")
                       else 0.0)
  assert s.external + s.abort + s.sampler + s.mechanisms == pytest.approx(
      1e-5, rel=1e-13, abs=0)


def test_headline_delta_is_the_sum_of_its_parts():
  split = A.DeltaSplit(1e-6, external=1e-7)
  r = A.privacy_report([A.Mechanism("fm", 2.0, 0.5, 4)], target_epsilon=5.0,
                       delta=1e-6, private=True, public_metadata=[],
                       external=(0.5, 1e-7), split=split)
  assert r["delta"] == 1e-6
  assert r["delta_mechanisms"] + r["delta_abort_events"] + (
      r["delta_external"]) == pytest.approx(1e-6, rel=1e-12)
  # At the discretisation calibration uses for the mechanisms' part,
  # the target less the external epsilon (a coarser one could report more
  # than a calibration that met the target).
  want = A.epsilon_pld(A.Mechanism("fm", 2.0, 0.5, 4).event(),
                       split.mechanisms, A.pld_interval(4.5)) + 0.5
  assert r["epsilon"] == pytest.approx(want, rel=1e-12)
  assert r["pld_discretization"] == A.pld_interval(4.5)


def _events_from_report(report):
  """The run's DpEvent rebuilt from privacy.json's mechanism list alone."""
  events = []
  for m in report["mechanisms"]:
    inner = dp_accounting.GaussianDpEvent(m["noise_multiplier"])
    if m["sampling_rate"] < 1:
      inner = dp_accounting.PoissonSampledDpEvent(m["sampling_rate"], inner)
    events.append(inner if m["steps"] == 1 and m["sampling_rate"] >= 1
                  else dp_accounting.SelfComposedDpEvent(inner, m["steps"]))
  return dp_accounting.ComposedDpEvent(events)


def test_report_figures_rederive_with_dp_accounting_from_the_report_alone():
  mechs = A.calibrate([A.Mechanism("class_counts", 0.0, 1.0, 1, "1"), *THREE],
                      1.0, 0.999e-5, shares=[0.1, 1, 1, 1])
  r = A.privacy_report(mechs, target_epsilon=1.0, delta=1e-5, private=True,
                       public_metadata=[], split=A.DeltaSplit(1e-5))
  acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                          value_discretization_interval=r["pld_discretization"])
  got = acc.compose(_events_from_report(r)).get_epsilon(r["delta_mechanisms"])
  assert got == pytest.approx(r["epsilon"], rel=1e-9)
  counts = next(m for m in r["mechanisms"] if m["name"] == "class_counts")
  alone = pld.PLDAccountant(
      value_discretization_interval=r["pld_discretization"]).compose(
          dp_accounting.GaussianDpEvent(counts["noise_multiplier"])
      ).get_epsilon(r["delta_mechanisms"])
  assert alone == pytest.approx(counts["epsilon_alone"], rel=1e-9)


def test_numpy_scalars_are_accepted_as_the_target():
  """np.float32(1.0) was refused with 'epsilon must be a number ... got
  1.0'."""
  m = [accounting.Mechanism("feature_matching", 0.0, 0.5, 20)]
  a = accounting.calibrate(m, epsilon=np.float32(1.0), delta=1e-5)
  b = accounting.calibrate(m, epsilon=1.0, delta=1e-5)
  assert a[0].noise_multiplier == pytest.approx(b[0].noise_multiplier)


@pytest.mark.parametrize("kw", [{"sampling_rate": 1.5}, {"sampling_rate": 0.0},
                                {"steps": 2.5}, {"steps": 0},
                                {"noise_multiplier": float("nan")},
                                {"noise_multiplier": 1e101}])
def test_a_mechanism_outside_the_accountants_domain_is_refused(kw):
  args = {"name": "m", "noise_multiplier": 1.0, "sampling_rate": 0.5,
          "steps": 3, **kw}
  with pytest.raises(ValueError, match=f"^m: {next(iter(kw))} must be"):
    accounting.Mechanism(**args)


def test_a_large_delta_calibrates_or_says_why_instead_of_a_math_error():
  m = [accounting.Mechanism("feature_matching", 0.0, 0.5, 2)]
  out = accounting.calibrate(m, epsilon=1.0, delta=0.5)
  assert out[0].noise_multiplier > 0
  got = accounting.epsilon_of(accounting.composed_event(out), 0.5)
  assert accounting.CALIBRATION_UTILISATION * 1.0 <= got <= 1.0


def test_a_mechanism_with_more_releases_than_are_accounted_is_refused_at_once():
  """10^7 queries would make the PLD self-composition run for hours: the
  count is refused when the mechanism is built, before any accounting."""
  from dpgeng_jax.errors import ConfigError
  A.Mechanism("feature_matching", 1.0, 0.5, A.MAX_STEPS)
  t = time.perf_counter()
  with pytest.raises(ConfigError, match="at most 100,000"):
    A.Mechanism("feature_matching", 1.0, 0.5, 10**7)
  assert time.perf_counter() - t < 1.0


def test_two_events_share_a_cached_pld_only_when_their_parameters_are_equal():
  """The cache was keyed on repr(event): under numpy's print precision 2,
  0-d noise multipliers 1.004 and 1.0 printed alike and the second got
  the first's (smaller) epsilon."""
  with np.printoptions(precision=2):
    A.epsilon_pld(A.gaussian_event(np.asarray(1.004)), 1e-5)
    got = A.epsilon_pld(A.gaussian_event(np.asarray(1.0)), 1e-5)
    m = A.Mechanism("f", np.asarray(2.0), 0.1, 50)
    A.epsilon_pld(A.Mechanism("f", np.asarray(2.004), 0.1, 50).event(), 1e-5)
    got_m = A.epsilon_pld(m.event(), 1e-5)
  acc = dp_accounting.pld.PLDAccountant(
      dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      value_discretization_interval=A.PLD_DISCRETIZATION)
  want = acc.compose(dp_accounting.GaussianDpEvent(1.0)).get_epsilon(1e-5)
  assert got == pytest.approx(want, rel=1e-9)
  assert got_m > A.epsilon_pld(A.subsampled_gaussian_event(2.004, 0.1, 50),
                               1e-5)


@pytest.mark.parametrize("make,what", [
    (lambda: A.subsampled_gaussian_event(1.0, 0.1, 2.9), "steps"),  # was 2
    (lambda: A.subsampled_gaussian_event(1.0, 0.1, 0), "steps"),
    (lambda: A.subsampled_gaussian_event(1.0, float("nan"), 3),
     "sampling_rate"),
    (lambda: A.subsampled_gaussian_event(1.0, 1.5, 3), "sampling_rate"),
    (lambda: A.feature_matching_event(-1.0, 0.5, 3), "noise_multiplier"),
    (lambda: A.gaussian_event(float("nan")), "noise_multiplier"),
    (lambda: A.gaussian_event(float("inf")), "noise_multiplier"),
    (lambda: A.subsampled_gaussian_event(1e101, 0.5, 3), "noise_multiplier"),
])
def test_event_builders_refuse_what_the_accountant_would_misread(make, what):
  with pytest.raises(ValueError, match=f"^{what} must be"):
    make()


def test_a_nan_delta_is_refused_not_accounted_as_epsilon_zero():
  ev = A.gaussian_event(1.0)
  for f in (A.epsilon_rdp, A.epsilon_pld, A.epsilon_of):
    with pytest.raises(ValueError, match="delta"):
      f(ev, float("nan"))


def test_a_jax_scalar_noise_multiplier_is_accounted():
  """It passed the checks and then failed inside dp_accounting (unhashable)."""
  import jax.numpy as jnp
  m = A.Mechanism("n", jnp.float32(2.0), jnp.float32(0.5), 3)
  assert type(m.noise_multiplier) is float and m.sampling_rate == 0.5
  assert A.epsilon_pld(m.event(), 1e-5) == A.epsilon_pld(
      A.Mechanism("n", 2.0, 0.5, 3).event(), 1e-5)


def test_the_report_says_whether_the_target_is_met():
  ms = A.calibrate([A.Mechanism("f", 0.0, 0.5, 20)], 1.0, 1e-5)
  ok = A.privacy_report(ms, target_epsilon=1.0, delta=1e-5, private=True,
                        public_metadata=[])
  assert ok["meets_target"] and not any("EXCEEDS" in n for n in ok["notes"])
  bad = A.privacy_report(ms, target_epsilon=0.1, delta=1e-5, private=True,
                         public_metadata=[])
  assert not bad["meets_target"]
  assert any("EXCEEDS the target 0.1" in n for n in bad["notes"])
  # Not private (real-image init, undeclared external data): the figures
  # are the mechanisms' as configured, never a target met.
  for kw in ({"private": False}, {"private": True,
                                  "nonprivate_reasons": ["real images"]}):
    off = A.privacy_report(ms, target_epsilon=1.0, delta=1e-5,
                           public_metadata=[], **kw)
    assert off["epsilon"] <= 1.0 and not off["meets_target"]
    assert not any("EXCEEDS" in n for n in off["notes"])
  for target in (-1.0, 0.0, float("nan")):
    with pytest.raises(ValueError, match="target_epsilon"):
      A.privacy_report(ms, target_epsilon=target, delta=1e-5, private=True,
                       public_metadata=[])


def test_an_epsilon_the_mechanisms_cannot_spend_is_named_in_the_message():
  """The message named the search's internal aim (996.503 for 999)."""
  with pytest.raises(ValueError, match="epsilon 999 at delta 1e-05 is more "
                     "than these mechanisms spend"):
    A.calibrate([A.Mechanism("f", 0.0, 0.5, 20)], 999.0, 1e-5)


def _gaussian_epsilon(sigma: float, delta: float) -> float:
  """The exact epsilon of one Gaussian release (sensitivity 1) at delta
  (Balle and Wang 2018), in log space so that epsilon can be 1e5."""
  from scipy import optimize, stats

  def log_delta(eps):
    a = stats.norm.logcdf(-eps * sigma + 0.5 / sigma)
    b = eps + stats.norm.logcdf(-eps * sigma - 0.5 / sigma)
    return a + math.log1p(-math.exp(b - a)) - math.log(delta)

  return optimize.brentq(log_delta, 0.0, 1 / sigma ** 2 + 10 / sigma,
                         xtol=1e-9)


def test_an_event_with_very_little_noise_is_accounted_coarser_not_out_of_memory(
    monkeypatch):
  """sigma 0.001 at interval 1e-4 asked dp_accounting for a PLD of 1e9
  points (76 GiB, `dpgeng audit --noise-multipliers 0.001`); it is built
  at the coarser interval that keeps it to MAX_PLD_POINTS, still an
  upper bound within 1e-4 of the exact epsilon (504265); the events the
  driver calibrates keep their interval. (The cap is lowered 10x here:
  the same code, a tenth of the build time.)"""
  monkeypatch.setattr(A, "MAX_PLD_POINTS", 1e6)
  ev = dp_accounting.GaussianDpEvent(0.001)
  interval = A.feasible_interval(ev, 1e-4)
  assert interval > 1e-4
  assert (1 / 0.001 ** 2 + 20 / 0.001) / interval <= A.MAX_PLD_POINTS
  exact = _gaussian_epsilon(0.001, 1e-5)
  got = A.epsilon_pld(ev, 1e-5)
  assert exact <= got <= exact * (1 + 1e-4), (got, exact)
  # a self-composed Gaussian counts as one of sigma / sqrt(count)
  twice = dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(0.001 * math.sqrt(2)), 2)
  assert A.feasible_interval(twice, 1e-4) == pytest.approx(interval)
  monkeypatch.undo()  # the real cap for the driver's events
  for eps in (1.0, 10.0, 100.0):  # calibrated at the usual targets
    for m in A.calibrate(THREE, eps, 1e-5):
      assert A.feasible_interval(m.event(), A.pld_interval(eps)) == (
          A.pld_interval(eps)), (eps, m)
  # and where the interval is kept, the exact figure is met as well
  assert _gaussian_epsilon(0.5, 1e-5) <= A.epsilon_pld(
      dp_accounting.GaussianDpEvent(0.5), 1e-5) <= _gaussian_epsilon(
          0.5, 1e-5) * (1 + 1e-3)


@pytest.mark.parametrize("eps,delta", [(1e-4, 1e-8), (1e-6, 1e-8),
                                       (0.01, 1e-12), (1e-6, 1e-5)])
def test_small_epsilons_calibrate_at_small_deltas(eps, delta):
  """Each failed before: (1e-4, 1e-8) as 'out of reach' (a fixed PLD
  interval of 1e-4 is the target itself), (1e-6, 1e-8) in the starting
  guess's bracket, (0.01, 1e-12) as a ZeroDivisionError (a secant step
  ran the noise scale to exp(-1e4) = 0)."""
  t = time.time()
  cal = A.calibrate(THREE, eps, delta)
  got = A.epsilon_of(A.composed_event(cal), delta, A.pld_interval(eps))
  assert A.CALIBRATION_UTILISATION * eps <= got <= eps
  assert time.time() - t < 60  # a guard against a hunting search (330 s)


def test_pld_interval_is_relative_to_epsilon_down_to_its_floor():
  assert A.pld_interval(10.0) == pytest.approx(1e-3)
  assert A.pld_interval(0.01) == pytest.approx(1e-6)
  assert A.pld_interval(1e-6) == pytest.approx(
      A.PLD_DISCRETIZATION * A.PLD_RELATIVE_FLOOR)


def test_rdp_figures_never_fall_to_zero_from_dp_accountings_rounding():
  # dp_accounting's subsampled-Gaussian RDP comes out slightly negative at
  # extreme noise, and it then answers epsilon 0: shown here, so that the
  # test fails if dp_accounting changes and the fallback is no longer hit.
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          1e-9, dp_accounting.GaussianDpEvent(1e3)), 1000)
  raw = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  assert raw.compose(event).get_epsilon(1e-30) == 0
  # Without sampling the same noise is 1000 plain Gaussians, a bound from
  # above, whose conversion to delta 1e-30 alone costs about 0.06.
  plain = dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(1e3), 1000)
  got = A.epsilon_rdp(event, 1e-30)
  assert got == A.epsilon_rdp(plain, 1e-30) > 0.05
  both = dp_accounting.ComposedDpEvent([event, A.gaussian_event(1e6)])
  assert A.epsilon_rdp(both, 1e-30) > 0.05


@pytest.mark.parametrize("delta", [1e-13, 1e-30])
def test_a_target_below_what_the_accountant_resolves_is_refused_at_once(
    delta):
  # Before: accepted after 35-55 s with a reported epsilon of 0.0 (the
  # search had run the noise up to where dp_accounting answers 0), or
  # refused as "out of reach" after seconds.
  scale = math.log(A.SCALE_RANGE[0])
  least = A.epsilon_rdp(A.composed_event(A.allocate(THREE, [1.0] * 3,
                                                    math.exp(scale))), delta)
  assert least > 0.02
  t = time.time()
  with pytest.raises(ValueError, match="cannot be certified.*RDP"):
    A.calibrate(THREE, least * 0.9, delta)
  assert time.time() - t < 5
  cal = A.calibrate(THREE, least * 1.2, delta)
  got = A.epsilon_rdp(A.composed_event(cal), delta)
  assert A.CALIBRATION_UTILISATION * least * 1.2 <= got <= least * 1.2


def test_a_target_reached_only_near_the_most_noise_is_calibrated_below_it():
  """External data spending 1.995 of epsilon 2 left a target the run's
  own mechanism reaches only within the last half-percent: refused as
  'out of reach' (a review's case), now calibrated at or below it."""
  fixed = [A.Mechanism("external", 1.998, 1.0, 1)]
  alone = A.epsilon_of(A.composed_event(fixed), 1e-5, A.pld_interval(2.0))
  assert A.CALIBRATION_UTILISATION * 2.0 < alone < 2.0
  cal = A.calibrate([A.Mechanism("feature_matching", 0.0, 0.5, 40)], 2.0,
                    1e-5, fixed=fixed)
  got = A.epsilon_of(A.composed_event([*fixed, *cal]), 1e-5,
                     A.pld_interval(2.0))
  assert alone <= got <= 2.0


def test_the_report_names_the_pld_interval_it_used():
  """An event with little noise for its interval is built coarser
  (feasible_interval); privacy.json named the nominal interval, at which
  dp_accounting's figure may differ from the report's (a review found one
  above the target)."""
  mechs = A.calibrate([A.Mechanism("generator", 0.0, 1.0, 10),
                       A.Mechanism("expert", 0.0, 5e-4, 20000)], 0.5, 1e-5)
  r = A.privacy_report(mechs, target_epsilon=0.5, delta=1e-5, private=True,
                       public_metadata=[])
  assert r["pld_discretization"] > A.pld_interval(0.5)  # the cap binds
  acc = pld.PLDAccountant(
      dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      value_discretization_interval=r["pld_discretization"])
  again = acc.compose(A.composed_event(mechs)).get_epsilon(
      r["delta_mechanisms"])
  assert again == pytest.approx(r["epsilon_pld"], rel=1e-9)
  assert again <= 0.5


def test_where_the_point_cap_binds_the_search_still_runs_on_coarse_plds(
    monkeypatch):
  """A tiny target at a large delta needs little noise for its tiny
  interval, so MAX_PLD_POINTS binds. The coarse search's PLDs have their
  own cap, COARSE times lower: before, coarse and fine PLDs were the same
  capped ones, and `dpgeng plan --epsilon 0.01 --delta 0.3` spent 47 s
  building them. Every build is recorded: only the fine checks may reach
  the fine cap, and the result still meets the target."""
  built = []
  real = A._pld_of

  def record(event, interval, count=1):
    if count == 1:  # a build (each part of a composed event too)
      s = A._smallest_sigma(event)
      built.append((1 / s ** 2 + 20 / s) / interval)
    return real(event, interval, count)

  monkeypatch.setattr(A, "_pld_of", record)
  A._PLD_CACHE.clear()
  mechs = [A.Mechanism("a", 1.0, 1.0, 10), A.Mechanism("b", 1.0, 0.5, 40)]
  out = A.calibrate(mechs, 0.01, 0.3)
  fine = A.epsilon_pld(A.composed_event(out), 0.3, A.pld_interval(0.01))
  assert A.CALIBRATION_UTILISATION * 0.01 <= fine <= 0.01
  assert max(built) > A.MAX_PLD_POINTS / 2  # the fine cap binds here
  big = [p for p in built if p > 1.01 * A.MAX_PLD_POINTS / A.COARSE]
  assert len(big) <= 6, (len(big), len(built))


@pytest.mark.parametrize("event,message", [
    (dp_accounting.GaussianDpEvent(float("nan")), "noise multiplier"),
    (dp_accounting.GaussianDpEvent(-1.0), "noise multiplier"),
    (dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 0),
     "count >= 1"),
    (dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0),
                                       2.5), "count >= 1"),
    (dp_accounting.PoissonSampledDpEvent(
        1.5, dp_accounting.GaussianDpEvent(1.0)), "sampling probability"),
    (dp_accounting.LaplaceDpEvent(1.0), "unsupported"),
], ids=["nan", "negative", "count 0", "count 2.5", "rate 1.5", "laplace"])
def test_a_hand_built_event_the_accountants_would_misread_is_refused(
    event, message):
  """RDP accounted a nan noise multiplier as epsilon 0 (at delta 1e-13 the
  run's own accountant); a count of 0 or 2.5 died in a division or was
  taken (a review's findings). Both accountants refuse them."""
  for delta in (1e-5, 1e-13):
    with pytest.raises(ValueError, match=message):
      A.epsilon_of(event, delta)
  with pytest.raises(ValueError, match=message):
    A.epsilon_rdp(event, 1e-5)


def test_the_report_refuses_a_negative_external_guarantee_and_is_json():
  """external = (-5, 0) subtracted 5 from the headline and turned
  'meets_target' true; numpy scalars made the report unwritable; a
  Poisson mechanism with noise below 0.038 died in the CLT figure."""
  import json
  m = [A.Mechanism("m", np.float32(1.2), np.float64(0.5), np.int64(20))]
  for bad in ((-5.0, 0.0), (1.0, -1e-6), (1.0, 2e-5), (math.inf, 0.0)):
    with pytest.raises(ValueError, match="external guarantee"):
      A.privacy_report(m, target_epsilon=10.0, delta=1e-5, private=True,
                       public_metadata=(), external=bad)
  rep = A.privacy_report(m, target_epsilon=np.float64(10.0),
                         delta=np.float64(1e-5), private=True,
                         public_metadata=())
  json.dumps(rep)
  tiny = A.privacy_report([A.Mechanism("m", 0.03, 0.5, 2)],
                          target_epsilon=1000.0, delta=1e-5, private=True,
                          public_metadata=())
  assert tiny["epsilon_gdp_clt"] is None and tiny["epsilon"] is not None


def test_shares_far_apart_are_refused_not_divided_by_zero():
  """shares (1e-320, 1) died in a ZeroDivisionError (a review's finding);
  relative weights within MAX_SHARE_RATIO are calibrated."""
  with pytest.raises(ValueError, match="relative weights"):
    A.calibrate(THREE[:2], 1.0, 1e-5, shares=[1e-320, 1.0])
  got = A.calibrate(THREE[:2], 1.0, 1e-5, shares=[1e-6, 1e5])
  assert got[0].noise_multiplier > got[1].noise_multiplier


def test_hand_built_figures_from_jax_scalars_and_huge_or_tiny_noise_are_clear():
  """A review's findings: Mechanism(steps=jnp.int32(10)) was refused as
  "got 10"; a Gaussian event of infinite noise or 1e300 died in the
  accountants (NaN to int, OverflowError); privacy_report(private="no")
  reported a private run."""
  import jax.numpy as jnp
  from dpgeng_jax.errors import ConfigError
  m = accounting.Mechanism("q", jnp.float32(2.0), jnp.float32(0.5),
                           jnp.int32(10))
  assert m.steps == 10 and type(m.steps) is int
  assert m.event() == accounting.Mechanism("q", 2.0, 0.5, 10).event()
  with pytest.raises(ConfigError, match="integer"):
    accounting.Mechanism("q", 2.0, 0.5, jnp.float32(10))
  for sigma in (math.inf, 1e300):
    # Built by hand (gaussian_event itself refuses these at once).
    for fn in (accounting.epsilon_pld, accounting.epsilon_rdp):
      with pytest.raises(ValueError, match="noise multiplier must be in"):
        fn(dp_accounting.GaussianDpEvent(sigma), 1e-5)
    with pytest.raises(ValueError, match="noise_multiplier must be at most"):
      accounting.gaussian_event(sigma)
  # Tiny noise crashed the accountants (ZeroDivisionError below ~1e-154,
  # PLD's OverflowError below ~7e-5), reachable from
  # --generated-noise-multiplier and audit.
  for sigma in (1e-5, 1e-20, 1e-200, 1e-300):
    for fn in (accounting.epsilon_pld, accounting.epsilon_rdp):
      with pytest.raises(ValueError, match="must be 0 .no noise. or at "):
        fn(accounting.gaussian_event(sigma), 1e-5)
  least = accounting.gaussian_event(accounting.MIN_NOISE_MULTIPLIER)
  assert accounting.epsilon_pld(least, 1e-5) > 1e5
  assert accounting.epsilon_rdp(least, 1e-5) > 1e5
  with pytest.raises(ValueError, match="private must be True or False"):
    accounting.privacy_report([], target_epsilon=1.0, delta=1e-5,
                              private="no", public_metadata=[])


def test_a_subnormal_delta_is_refused_by_name_in_the_library():
  """accounting.calibrate at delta 5e-324 ended in scipy's 'f(a) and f(b)
  must have different signs'; 1e-300 (the CLI's floor) calibrates."""
  with pytest.raises(ValueError, match="smallest normal float"):
    A.calibrate([A.Mechanism("m", 0.0, 1.0, 1)], 1.0, 5e-324)
  assert A.calibrate([A.Mechanism("m", 0.0, 1.0, 1)], 1.0, 1e-300)[
      0].noise_multiplier > 0


def test_privacy_report_refuses_a_split_of_another_delta():
  """A split of another total, or one without the external delta, made
  the headline understate the run's delta (1e-5 reported where the
  mechanisms were accounted at 9.99e-6 and the external data added
  5e-6)."""
  m = A.Mechanism("q", 1.0, 0.1, 100)
  kw = dict(target_epsilon=10.0, delta=1e-5, private=True,
            public_metadata=[])
  with pytest.raises(ValueError, match="does not match"):
    A.privacy_report([m], external=(0.5, 5e-6), split=A.DeltaSplit(1e-5),
                     **kw)
  with pytest.raises(ValueError, match="does not match"):
    A.privacy_report([m], split=A.DeltaSplit(1e-3), **kw)
  r = A.privacy_report([m], external=(0.5, 5e-6),
                       split=A.DeltaSplit(1e-5, 5e-6), **kw)
  assert r["delta_external"] == 5e-6 and not A.check_report(r)
