"""The stated (epsilon, delta) holds for a whole run: class sizes are
released (or declared public), every non-private ingredient marks the run
"private": false, declared external guarantees are checked against the
target, the target range is handled or refused, and no private array is a
constant of a compiled program."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from scipy import stats

from dpgeng_jax import cli, counts, noise, pipeline
from dpgeng_jax.config import Config
from dpgeng_jax.data import from_arrays

TINY = ["--ipc", "2", "--steps", "3", "--num-queries", "2", "--eval-epochs",
        "1", "--eval-models", "1", "--extractor-width", "8", "--eval-width",
        "8", "--quiet"]
GEN_TINY = ["--pe-iterations", "1", "--pe-population", "4",
            "--generator-steps", "5", "--generator-features", "20",
            "--generated-per-class", "8", "--pool-models", "1",
            "--pool-checkpoints", "2", "--pool-epochs", "1",
            "--expert-steps", "2", "--expert"]
# Distinctive class sizes: none of them (nor N) is a hyperparameter value.
SIZES = (97, 113, 89, 131)


def _sized_npz(tmp_path, sizes=SIZES):
  rng = np.random.default_rng(5)
  y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
  rng.shuffle(y)
  path = tmp_path / "sized.npz"
  np.savez(path, x_train=rng.integers(0, 256, (len(y), 8, 8), np.uint8),
           y_train=y, x_test=rng.integers(0, 256, (20, 8, 8), np.uint8),
           y_test=np.arange(20) % len(sizes))
  return f"npz:{path}"


def _numbers(obj):
  """Every number in a JSON document."""
  if isinstance(obj, dict):
    for v in obj.values():
      yield from _numbers(v)
  elif isinstance(obj, list):
    for v in obj:
      yield from _numbers(v)
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
    yield obj


def _distill(argv):
  return cli.main(["distill", *argv])


def test_no_exact_private_count_appears_in_any_output(tmp_path, monkeypatch):
  out = tmp_path / "run"
  estimated_for = []  # the N of every cost estimate (printed, saved)
  real_estimate = pipeline.estimate_lib.estimate

  def estimate(cfg, plan, shape, num_train, *args, **kwargs):
    estimated_for.append(num_train)
    return real_estimate(cfg, plan, shape, num_train, *args, **kwargs)

  monkeypatch.setattr(pipeline.estimate_lib, "estimate", estimate)
  # What the expert pads to and divides by, and the distillation's
  # normalisers: public bounds and estimates, never N or N_c (dropping
  # them, or normalising by the exact class counts, changed no output
  # file: a review's mutations).
  from dpgeng_jax import stages
  used = {}
  real_finetune, real_loop = stages.expert_lib.dp_finetune, stages.distill_loop

  def finetune(*args, **kw):
    used["expert"] = (kw.get("num_rows"), kw.get("expected_size"))
    return real_finetune(*args, **kw)

  def loop(cfg, store, state, step, targets, counts_, key):
    used["counts"] = np.asarray(counts_, np.float64)
    return real_loop(cfg, store, state, step, targets, counts_, key)
  monkeypatch.setattr(stages.expert_lib, "dp_finetune", finetune)
  monkeypatch.setattr(stages, "distill_loop", loop)
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out),
                   "--deterministic", *GEN_TINY, *TINY]) == 0
  num_rows, expected = used["expert"]
  assert num_rows is not None and num_rows > sum(SIZES)
  assert expected is not None and expected != sum(SIZES)
  rate = json.loads((out / "config.json").read_text())["sampling_rate"]
  assert np.all(np.abs(used["counts"] - rate * np.array(SIZES)) > 1e-3)
  exact = set(SIZES) | {sum(SIZES)}
  for name in ("privacy.json", "config.json", "metrics.json",
               "stages/state.json"):
    doc = json.loads((out / name).read_text())
    found = exact & {v for v in _numbers(doc) if float(v).is_integer()}
    assert not found, (name, found)
    text = (out / name).read_text()
    for n in exact:
      assert f" {n}," not in text and f"= {n}" not in text, (name, n)
  priv = json.loads((out / "privacy.json").read_text())
  assert priv["class_sizes"]["policy"] == "released"
  counts_mech = next(m for m in priv["mechanisms"]
                     if m["name"] == "class_counts")
  assert counts_mech["sampling_rate"] == 1.0 and counts_mech["steps"] == 1
  assert counts_mech["l2_sensitivity"] == "1"
  assert any("NOT public" in line for line in priv["public_metadata"])
  assert any("timings_s" in line and "peak_rss_mb" in line
             and "input validation" in line
             for line in priv["public_metadata"])
  assert all(u >= n for u, n in zip(priv["class_sizes"]["upper_bound"],
                                    SIZES))
  # The estimate counts M_N's N~ (before the generator's counts refine
  # it), not N: the deterministic noise moves it by 16 here.
  assert len(estimated_for) == 1 and estimated_for[0] != sum(SIZES)
  assert estimated_for[0] <= sum(priv["class_sizes"]["upper_bound"])


def test_public_class_sizes_are_used_exactly_and_declared(tmp_path):
  out = tmp_path / "run"
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out),
                   "--deterministic", "--method", "ndpdc", "--no-eval",
                   "--public-class-sizes", *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert [m["name"] for m in priv["mechanisms"]] == ["feature_matching"]
  assert priv["class_sizes"]["policy"] == "declared public"
  assert priv["class_sizes"]["upper_bound"] == list(SIZES)
  assert any("DECLARED PUBLIC" in line for line in priv["public_metadata"])


def test_number_of_classes_source_is_reported(tmp_path):
  out = tmp_path / "run"
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out),
                   "--method", "ndpdc", "--no-eval", "--num-classes", "4",
                   *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert any("K = 4 (declared by the user" in line
             for line in priv["public_metadata"])
  out2 = tmp_path / "inferred"
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out2),
                   "--method", "ndpdc", "--no-eval", *TINY]) == 0
  priv = json.loads((out2 / "privacy.json").read_text())
  assert any("K = 4 (inferred from the training labels" in line
             for line in priv["public_metadata"])


def test_count_release_is_sized_counts_plus_gaussian_noise():
  y = np.repeat(np.arange(3), [40, 7, 19])
  keys = [noise.deterministic_secret_key(i) for i in range(400)]
  rel = np.stack([np.asarray(counts.release_class_counts(
      k, y, num_classes=3, noise_multiplier=2.5)) for k in keys])
  resid = (rel - np.array([40, 7, 19])).ravel()
  assert stats.kstest(resid, "norm", args=(0, 2.5)).pvalue > 1e-3


def test_count_release_moves_by_one_above_2_24_examples():
  """Classes of 2^24 + 2 and 2^24 + 1 examples (neighbours): the tallies
  differ by exactly 1 (sensitivity 1). A float32 tally rounded them to
  2^24 + 2 and 2^24, a move of 2. The noise is added to the exact count:
  the releases of 2^24 + 1, rounded to float32 (spacing 2) only after
  the noise, average to 2^24 + 1, not to a pre-rounded 2^24."""
  n = 2**24 + 2
  y = np.zeros(n + 1, np.int32)
  y[-1] = 1
  big, small = counts.class_tally(y, 2), counts.class_tally(y[1:], 2)
  assert big.dtype == np.int32 and big.tolist() == [n, 1]
  assert int(big[0]) - int(small[0]) == 1
  rel = np.stack([np.asarray(counts._noisy(
      noise.deterministic_secret_key(i), small, 1.0), np.float64)
      for i in range(300)])
  assert abs(rel[:, 0].mean() - (n - 1)) < 0.3  # std of the mean ~0.07
  assert abs(rel[:, 1].mean() - 1.0) < 0.3


def test_padded_layouts_round_the_bound_up_by_less_than_a_quarter():
  """The private layouts pad to counts.layout_rows(bound on N): never
  below the bound (a short layout would drop examples), less than 1/4
  above it, and one length for a whole bucket, so that runs whose noisy
  bounds differ (std 76 rows at epsilon 1 on ten classes) compile the
  same programs."""
  lengths = [counts.layout_rows(n) for n in range(1, 70000)]
  for n, rows in zip(range(1, 70000), lengths):
    assert n <= rows < max(n, 8) * 5 / 4, (n, rows)
  assert lengths == sorted(lengths)
  assert len(set(lengths)) < 70000 / 500  # buckets, not every length
  # 4000 images at epsilon 1: the bounds of the runs measured
  # (benchmarks/RESULTS.md) spanned 4355-4669, one bucket.
  assert {counts.layout_rows(n) for n in range(4097, 5121)} == {5120}
  assert counts.layout_rows(5121) == 6144
  assert counts.layout_rows(1934) == counts.layout_rows(1800) == 2048
  assert counts.layout_rows(7) == 7  # small n: exact
  assert counts.layout_rows(9) == 10
  with pytest.raises(ValueError, match="n >= 1"):
    counts.layout_rows(0)
  sizes = counts.released_sizes(np.array([40.3, 6.1, 19.7]), 2.5,
                                math.log(1e-12))
  assert sizes.padded_rows == counts.layout_rows(sizes.total_bound)
  assert sizes.padded_rows > sizes.total_bound  # 97 -> 112
  # Never past what the fixed-point release sums accept (2^23 rows):
  # 8.2 M rows would round to 2^23, which fixed_point_bits refuses.
  from dpgeng_jax import clipping
  big = counts.released_sizes(np.array([8.2e6]), 2.5, math.log(1e-12))
  assert counts.layout_rows(big.total_bound) == 2 ** 23
  assert big.total_bound <= big.padded_rows == 2 ** 23 - 1
  clipping.fixed_point_bits(big.padded_rows, 1.0)
  with pytest.raises(ValueError, match="rows of magnitude"):
    clipping.fixed_point_bits(2 ** 23, 1.0)
  # Exact sizes do not move between runs: no padding beyond N.
  public = counts.public_sizes(np.repeat(np.arange(3), [40, 7, 19]), 3)
  assert public.padded_rows == public.total_bound == 66


def test_released_bounds_hold_and_a_violation_aborts():
  noisy = np.array([40.3, 6.1, 19.7])
  sizes = counts.released_sizes(noisy, 2.5, math.log(1e-12))
  z = stats.norm.isf(1e-12)  # P(N(0, 1) > z) = tau
  assert np.all(sizes.bound >= noisy + z * 2.5)
  # The total's noise has std 2.5 sqrt(3): its bound is tighter than the
  # sum of the class bounds, and no tighter than z std above the sum.
  assert sizes.total_bound == math.ceil(noisy.sum() + z * 2.5 * math.sqrt(3))
  assert sizes.total_bound < sizes.bound.sum()
  np.testing.assert_allclose(sizes.expected_counts(0.5), 0.5 * noisy)
  sizes.check(np.repeat(np.arange(3), [40, 7, 19]))
  with pytest.raises(counts.CountBoundError):
    sizes.check(np.repeat(np.arange(3), [40, sizes.bound[1] + 1, 19]))
  # Every class within its bound, all of them above the total's.
  with pytest.raises(counts.CountBoundError):
    sizes.check(np.repeat(np.arange(3), sizes.bound))
  # A negative or tiny noisy count never becomes a zero normaliser.
  low = counts.released_sizes(np.array([-3.0, 0.2]), 2.5, math.log(1e-12))
  assert np.all(low.expected_counts(0.5) >= 0.5)


@pytest.mark.parametrize("flags,reason", [
    (["--references"], "references"),
    (["--init", "real"], "real training images"),
    (["--method", "dm"], "method dm"),
])
def test_anything_non_private_in_the_outputs_marks_the_run(tmp_path, flags,
                                                           reason):
  out = tmp_path / "run"
  assert _distill(["--method", "ndpdc", "--out", str(out), *TINY,
                   *flags]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert priv["private"] is False
  assert any(reason in r for r in priv["not_private_because"]), priv
  assert json.loads((out / "metrics.json").read_text())["private"] is False


def _gen_npz(tmp_path):
  rng = np.random.default_rng(1)
  path = tmp_path / "gen.npz"
  np.savez(path, x=rng.random((40, 8, 8, 1)).astype(np.float32),
           y=np.arange(40) % 10)
  return f"npz:{path}"


@pytest.mark.parametrize("declared", [
    ["--generated-mu", "2"],                   # GDP mu 2: epsilon ~ 10
    ["--generated-epsilon", "2", "--generated-delta", "1e-6"],
    ["--generated-noise-multiplier", "0.3"],
])
def test_external_guarantee_alone_above_the_target_is_refused(
    tmp_path, capsys, declared):
  out = tmp_path / "run"
  assert _distill(["--method", "generator", "--generator",
                   _gen_npz(tmp_path), "--epsilon", "1", "--out", str(out),
                   *declared, *TINY]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and "target" in err
  assert not out.exists()


def test_external_declared_epsilon_delta_alone_is_reported(tmp_path):
  out = tmp_path / "run"
  assert _distill(["--method", "generator", "--generator",
                   _gen_npz(tmp_path), "--epsilon", "1", "--out", str(out),
                   "--generated-epsilon", "0.5", "--generated-delta", "1e-6",
                   *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert priv["private"] is True and priv["mechanisms"] == []
  assert priv["epsilon"] == 0.5 and priv["delta"] == 1e-5
  assert priv["class_sizes"] is None  # nothing read the private data


@pytest.mark.parametrize("flags,message", [
    (["--clip-norm", "inf"], "clip_norm must be a finite number"),
    (["--clip-norm", "nan"], "clip_norm must be a finite number"),
    (["--expert-clip-norm", "inf"], "expert_clip_norm must be a finite"),
    (["--epsilon", "1e6"], "epsilon must be a number in [1e-06, 1000]"),
    (["--epsilon", "1e-300"], "epsilon must be a number in [1e-06, 1000]"),
    (["--epsilon", "inf"], "epsilon must be a number"),
    (["--share-counts", "inf"], "budget shares must be finite"),
    # A share this small made the noisy counts inf after their release
    # (OverflowError), or the calibration divide by zero.
    (["--share-counts", "1e-300"], "budget shares must be in [1e-06, "
                                   "1e+06]"),
    (["--share-features", "5e-324"], "budget shares must be in"),
    (["--share-expert", "1e9"], "budget shares must be in"),
])
def test_unsupported_privacy_settings_are_refused(tmp_path, capsys, flags,
                                                  message):
  out = tmp_path / "run"
  assert _distill(["--out", str(out), *flags, *TINY]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and cli.as_flags(
      message) in err, err
  assert not out.exists()


@pytest.mark.parametrize("epsilon,delta", [("1", "1e-16"), ("1", "1e-30"),
                                           ("100", "1e-5"),
                                           ("200", "1e-5")])
def test_plan_is_right_across_the_range(capsys, epsilon, delta):
  assert cli.main(["plan", "--epsilon", epsilon, "--delta", delta]) == 0
  report = pipeline.plan_budget(Config(epsilon=float(epsilon),
                                       delta=float(delta)))
  assert 0.995 * float(epsilon) <= report["epsilon"] <= float(epsilon)
  for m in report["mechanisms"]:
    assert 0 < m["noise_multiplier"] < 1e3, m
  # The headline delta holds the abort events' and the sampler's shares,
  # and the sampler's support adds no more than its share.
  from dpgeng_jax import accounting, noise
  assert report["delta"] == float(delta)
  assert 0 < report["delta_abort_events"] < report["delta"]
  assert report["delta_sampler_support"] == pytest.approx(
      accounting.SUPPORT_FRACTION * float(delta), rel=1e-12)
  assert report["delta_mechanisms"] + report["delta_abort_events"] + (
      report["delta_sampler_support"]) == pytest.approx(float(delta),
                                                        rel=1e-15)
  mechs = [accounting.Mechanism(m["name"], m["noise_multiplier"],
                                m["sampling_rate"], m["steps"])
           for m in report["mechanisms"]]
  assert noise.support_delta(mechs) <= max(report["delta_sampler_support"],
                                           noise.SUPPORT_FLOOR)


@pytest.mark.parametrize("kw", [{"epsilon": 1000.0}, {"epsilon": 300.0},
                                {"epsilon": 150.0, "share_counts": 100.0}])
def test_noise_too_small_for_the_samplers_support_is_refused(kw):
  """The sampler is exact out to EXACT_Z standard deviations: at epsilon
  1000 the count release's noise multiplier is 0.084, and a neighbour's
  release (1/0.084 = 11.9 sd away) lands beyond that with probability
  0.12, far above delta (a review's case). Refused unless deterministic."""
  from dpgeng_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="noise sampler is exact out to "
                     "13.1 standard deviations"):
    pipeline.plan_budget(Config(**kw))
  pipeline.plan_budget(Config(deterministic=True, **kw))


def test_the_samplers_refusal_points_the_way_that_adds_noise():
  """It said "give that mechanism a larger share", which lowers its noise
  further (a review's finding): it names the mechanism's share flag to
  lower, and following that is accepted; a tiny sampling rate is named
  as the cause where it is one."""
  from dpgeng_jax.errors import ConfigError
  with pytest.raises(ConfigError) as e:
    pipeline.plan_budget(Config(epsilon=150.0, share_counts=100.0))
  assert "(class_counts)" in str(e.value)
  assert "a smaller share (--share-counts)" in str(e.value)
  pipeline.plan_budget(Config(epsilon=150.0, share_counts=0.1))
  with pytest.raises(ConfigError) as e:
    pipeline.plan_budget(Config(sampling_rate=1e-12))
  assert "(feature_matching)" in str(e.value)
  assert "raise its sampling rate --sampling-rate (now 1e-12" in str(e.value)


def test_privacy_report_flags_noise_beyond_the_samplers_reserve():
  """check_report recomputes the sampler's support delta from the listed
  mechanisms: a record whose noise needs more than its reserve (here a
  noise multiplier of 0.15: a neighbour 6.7 sd away reaches the sampler's
  inexact tail with probability ~6e-11, above the 1e-14 reserved at
  delta 1e-5) is flagged; 0.2 (~3e-16) fits. Not checked: a declared
  external guarantee's noise (drawn by another sampler) and a record
  written before the reserve existed (its headline did not claim it)."""
  from dpgeng_jax import accounting as A
  split = A.DeltaSplit(1e-5, support=True)
  def record(sigma, split=split):
    return A.privacy_report([A.Mechanism("m", sigma, 1.0, 1)],
                            target_epsilon=1000.0, delta=1e-5, private=True,
                            public_metadata=[], split=split)
  low = record(0.15)
  assert low["delta_sampler_support"] == pytest.approx(1e-14)
  # privacy_report says so itself: not private, and why ...
  assert not low["private"] and "sampler's support" in (
      low["not_private_because"][0])
  assert not A.check_report(low)
  # ... and check_report catches a record edited to claim otherwise.
  edited = dict(low, private=True, not_private_because=[],
                meets_target=low["epsilon"] <= 1000.0)
  assert [p for p in A.check_report(edited) if "sampler" in p]
  assert record(0.2)["private"] and not A.check_report(record(0.2))
  old = dict(edited)  # as written before the reserve: in the mechanisms'
  old["delta_mechanisms"] += old.pop("delta_sampler_support")
  assert not A.check_report(old)
  edited = record(0.2)
  edited["delta_sampler_support"] *= 1e3  # taken from the mechanisms' part
  edited["delta_mechanisms"] -= edited["delta_sampler_support"] * (1 - 1e-3)
  assert [p for p in A.check_report(edited)
          if "delta_sampler_support" in p and "of delta" in p]
  # The sampler's reserve also left in the mechanisms' part (counted
  # twice): the parts overshoot delta by exactly the reserve, 1e-9 of it.
  twice = record(0.2)
  twice["delta_mechanisms"] += twice["delta_sampler_support"]
  assert [p for p in A.check_report(twice) if "sum of its parts" in p]
  # A reserve 1e-10 above its share, taken from the mechanisms' part.
  wider = record(0.2)
  extra = wider["delta_abort_events"] * 1e-10
  wider["delta_abort_events"] += extra
  wider["delta_mechanisms"] -= extra
  assert [p for p in A.check_report(wider)
          if "delta_abort_events" in p and "of delta" in p]
  declared = A.privacy_report(
      [A.Mechanism("external_generator", 0.15, 1.0, 1,
                   sensitivity="declared")], target_epsilon=1000.0,
      delta=1e-5, private=True, public_metadata=[], split=split)
  assert not A.check_report(declared)


def test_a_declared_external_guarantee_is_not_held_to_this_samplers_support(
    tmp_path):
  """External generated data declared with mu = 6 (noise 1/6 of its
  sensitivity, drawn by whoever made the data): planned at epsilon 100;
  the support check covers only the noise this run calibrates and draws."""
  from dpgeng_jax import accounting, noise
  np.savez(tmp_path / "g.npz", x=np.zeros((20, 8, 8, 1), np.float32),
           y=np.arange(20) % 10)
  report = pipeline.plan_budget(Config(
      generator=f"npz:{tmp_path / 'g.npz'}", generated_mu=6.0,
      epsilon=100.0, delta=1e-5))
  declared = [m for m in report["mechanisms"]
              if m["name"] == "external_generator"]
  assert declared and declared[0]["noise_multiplier"] == pytest.approx(1 / 6)
  drawn = [accounting.Mechanism(m["name"], m["noise_multiplier"],
                                m["sampling_rate"], m["steps"])
           for m in report["mechanisms"] if m["name"] != "external_generator"]
  assert noise.support_delta(drawn) <= report["delta_sampler_support"]
  assert not accounting.check_report(report)


def test_the_samplers_support_bound_matches_its_draws():
  """EXACT_Z is where the sampler's law stops being exact (exponent 127
  of 128), its largest draw lies just beyond (all exponent bits zero), and
  support_delta is the normal tail beyond EXACT_Z - 1/sigma per release."""
  import jax.numpy as jnp
  from dpgeng_jax import accounting, noise
  def z(exponent_words):
    words = jnp.asarray([[0x80000000], [0]]  # mantissa 0: the smallest u
                        + [[w] for w in exponent_words], jnp.uint32)
    with jax.enable_x64(True):
      return abs(float(noise.standard_normal_from_bits(words)[0]))
  deepest_exact = z([0, 0, 0, 1])  # e = 127: u / 2 in [2^-129, 2^-128)
  cap = z([0, 0, 0, 0])            # all 128 bits zero
  assert deepest_exact <= noise.EXACT_Z < cap < noise.EXACT_Z + 0.06
  m = accounting.Mechanism("m", 0.0839, 1.0, 3)
  assert noise.support_delta([m]) == pytest.approx(
      3 * stats.norm.sf(noise.EXACT_Z - 1 / 0.0839), rel=1e-9)
  assert noise.support_delta([accounting.Mechanism("m", 2.8, 1.0, 10)]) < 1e-30


def test_plan_refuses_an_epsilon_it_cannot_calibrate(capsys):
  assert cli.main(["plan", "--epsilon", "1e6"]) == 2
  assert "dpgeng: error: epsilon must be" in capsys.readouterr().err


# --- No private array is a compile-time constant (a persistent compilation
# cache or an XLA dump would write it to disk).


def test_private_data_is_never_a_constant_of_a_compiled_program(
    tmp_path, monkeypatch):
  from jax.experimental import serialize_executable
  rng = np.random.default_rng(9)
  x = rng.random((60, 8, 8, 1)).astype(np.float32)
  y = (np.arange(60) % 3).astype(np.int32)
  ds = from_arrays(x, y, x[:6], y[:6], name="marker", num_classes=3)
  secrets = [ds.normalize(ds.x_train), ds.x_train]
  markers = [a[i:i + 1].tobytes() for a in secrets for i in (7, 31)]
  markers.append(y[:32].tobytes())
  # Serialized executables hold raw bytes; StableHLO text prints dense
  # constants as hex.
  markers += [m.hex().upper().encode() for m in markers]
  blobs, real_jit = [], jax.jit

  def recording_jit(fn=None, **kw):
    if fn is None:
      return lambda f: recording_jit(f, **kw)
    jitted = real_jit(fn, **kw)
    seen = []

    def call(*a, **k):
      if not seen:  # the first call of each compiled program
        seen.append(True)
        lowered = jitted.lower(*a, **k)
        blobs.append(lowered.as_text().encode())
        blobs.append(serialize_executable.serialize(lowered.compile())[0])
      return jitted(*a, **k)

    return call

  monkeypatch.setattr(jax, "jit", recording_jit)
  cfg = Config(method="dpgeng", ipc=2, steps=2, num_queries=2,
               extractor_width=8, eval_width=8, generator_steps=3,
               generator_features=8, generated_per_class=8, pool_models=1,
               pe_iterations=1, pe_population=4,
               pool_checkpoints=2, pool_epochs=1, expert_steps=2,
               expert=True, no_eval=True, quiet=True)
  pipeline.run(cfg, dataset=ds)
  assert len(blobs) > 10
  for blob in blobs:
    for marker in markers:
      assert marker not in blob


def test_refined_estimate_is_the_inverse_variance_combination():
  sizes = counts.released_sizes(np.array([100.0, 50.0]), 20.0,
                                math.log(1e-12))
  fine = sizes.refined(np.array([110.0, 40.0]), 10.0, "another release")
  np.testing.assert_allclose(fine.estimate, [108.0, 42.0])
  assert fine.estimate_std == pytest.approx((1 / 400 + 1 / 100) ** -0.5)
  np.testing.assert_array_equal(fine.bound, sizes.bound)  # from M_N only
  assert fine.total_bound == sizes.total_bound
  # Sizes the user declared public are exact: nothing to refine.
  public = counts.public_sizes(np.array([0, 1, 1]), 2)
  assert public.refined(np.array([5.0, 5.0]), 1.0, "x") is public


def test_the_delta_check_uses_the_upper_bound_on_n_not_its_estimate():
  """A released estimate below the true N must not let a delta >= 1/N
  through: the check divides by the bound (>= N but for the accounted
  abort probability)."""
  from dpgeng_jax import stages
  from dpgeng_jax.errors import ConfigError
  sizes = counts.released_sizes(np.array([40.0, 40.0]), 5.0, math.log(1e-9))
  assert sizes.total_estimate == 80 and sizes.total_bound > 100
  stages._check_delta(Config(delta=0.9 / sizes.total_bound), sizes)
  with pytest.raises(ConfigError, match=f"N <= {sizes.total_bound}"):
    stages._check_delta(Config(delta=1 / 90), sizes)  # < 1/80, >= 1/U


def test_the_count_release_refuses_labels_outside_its_classes():
  """A label K or above would lengthen the tally: counts of classes that
  do not exist would be released."""
  with pytest.raises(ValueError, match="labels must be in 0..2"):
    counts.release_class_counts(jax.random.key(0), np.array([0, 0, 5]),
                                num_classes=3, noise_multiplier=1.0)


def test_a_batch_too_large_for_the_fixed_point_sums_is_refused_after_the_counts():
  """More than 2^23 padded rows in one query or expert step leave fewer
  than 8 bits per row in an int32 sum; the run refuses right after the
  count release (before the generator and the pool), naming the flag,
  and a batch that fits passes."""
  import types
  from dpgeng_jax import planning, stages
  from dpgeng_jax.errors import ConfigError
  for expert, flag in ((False, "--sampling-rate"),
                       (True, "--expert-sampling-rate")):
    cfg = Config(expert=expert, sampling_rate=0.01 if expert else 0.5,
                 expert_sampling_rate=0.5)
    plan = planning.resolve(cfg, (8, 8, 1))
    run = types.SimpleNamespace(cfg=cfg, plan=plan, mesh=None)
    mechs = [dataclasses.replace(m, noise_multiplier=1.0)
             for m in planning.mechanisms_for(cfg, plan)]
    budget = stages.Budget(mechs, None, 1, math.log(1e-12))
    big = counts.released_sizes(np.array([9e6, 9e6]), 1.0, math.log(1e-12))
    with pytest.raises(ConfigError,
                       match=f"too many rows for this clip norm: lower {flag}"):
      stages._check_release_rows(run, budget, big)
    small = counts.released_sizes(np.array([1e3, 1e3]), 1.0, math.log(1e-12))
    stages._check_release_rows(run, budget, small)
  tiny_c = types.SimpleNamespace(
      cfg=Config(clip_norm=1e-30), plan=planning.resolve(
          Config(clip_norm=1e-30), (8, 8, 1)), mesh=None)
  mechs = [dataclasses.replace(m, noise_multiplier=1.0) for m in
           planning.mechanisms_for(tiny_c.cfg, tiny_c.plan)]
  with pytest.raises(ConfigError, match="clip norm is outside the range"):
    stages._check_release_rows(
        tiny_c, stages.Budget(mechs, None, 1, math.log(1e-12)), small)


def test_a_bound_below_the_private_rows_is_refused_without_naming_them():
  """Library callers that pass a public bound smaller than the data get
  an error that names the bound, not the private count (a message is an
  output too)."""
  from dpgeng_jax import mechanisms, parallel
  x = np.zeros((37, 2, 2, 1), np.float32)
  y = np.zeros(37, np.int32)
  mesh = parallel.data_mesh(None)
  for call in (lambda: mechanisms.class_major(x, y, 2, rows=30),
               lambda: parallel.padded_rows(30, x, y),
               lambda: parallel.local_rows(mesh, x, y, num_rows=30),
               lambda: parallel.sharded_class_major(x, y, 2, 1,
                                                    rows_per_shard=30)):
    with pytest.raises(ValueError, match="names no private count") as e:
      call()
    assert "37" not in str(e.value)


def test_a_refusal_after_the_count_release_names_what_it_spent(tmp_path,
                                                               capsys):
  """delta >= 1/N is known only from M_N's bound: the refusal comes after
  that release, says it is spent (with its epsilon) and that a rerun
  composes with it, and leaves no output."""
  out = tmp_path / "run"
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out),
                   "--delta", "0.005", *TINY]) == 2
  err = capsys.readouterr().err
  assert "1/N" in err and "which is spent" in err and "compose" in err
  assert "epsilon" in err and str(sum(SIZES)) not in err
  assert not out.exists()


def test_a_delta_the_count_release_would_refuse_anyway_is_refused_before_it(
    tmp_path, capsys, monkeypatch):
  """With K classes the released bound on N is at least about K + z sigma
  sqrt(K) whatever the data (its median for N = K), so a delta above 1/that
  was refused only after the release had been spent (a review's finding:
  10 images at delta 0.09); it is refused before, and a delta just below
  that floor still gets to the release."""
  from dpgeng_jax import counts as counts_lib
  released = []
  real = counts_lib.release_class_counts
  monkeypatch.setattr(counts_lib, "release_class_counts",
                      lambda *a, **k: released.append(1) or real(*a, **k))
  out = tmp_path / "run"
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out),
                   "--delta", "0.01", *TINY]) == 2
  err = capsys.readouterr().err
  assert "too large for this run's count release" in err, err
  assert "spent" not in err.replace("after spending", "") and not released
  # The delta it suggests passes the check at its own calibration (the
  # first advice, 1/floor at the given delta's noise, was refused again).
  below = float(err.split("lower --delta below ")[1].split(" ")[0])
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out),
                   "--delta", str(below), *TINY]) == 2
  assert "which is spent" in capsys.readouterr().err and released
  released.clear()
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out", str(out),
                   "--delta", str(1.02 * below), *TINY]) == 2
  assert "too large for this run's count release" in (
      capsys.readouterr().err) and not released


class _Pixels255:
  """A user image API answering in 0..255, not [0, 1]."""

  def random(self, key, labels):
    from dpgeng_jax.generators import apis
    labels = np.asarray(labels)
    return apis.Samples(np.full((len(labels), 8, 8, 1), 200.0, np.float32),
                        labels)

  def variation(self, key, samples, degree):
    return self.random(key, samples.labels)


@pytest.mark.parametrize("how", ["texts", "user api"])
def test_a_bad_generator_option_is_refused_before_the_count_release(
    tmp_path, monkeypatch, capsys, how):
  """Class texts no font draws, or a user API's out-of-range answer, were
  found at the generator's first call, after the count release: the run
  was refused with a release spent (and a rerun composes with it)."""
  def spent(*a, **k):
    raise AssertionError("the class counts were released")
  monkeypatch.setattr(counts, "release_class_counts", spent)
  ds = _sized_npz(tmp_path)
  if how == "texts":
    assert _distill(["--dataset", ds, "--out", str(tmp_path / "run"),
                     "--pe-texts", "\U00013000,a,b,c", *TINY, *GEN_TINY]) == 2
    assert "no font has glyphs" in capsys.readouterr().err
  else:
    from dpgeng_jax.errors import ConfigError
    from dpgeng_jax.generators import pe
    cfg = Config(dataset=ds, ipc=2, steps=3, num_queries=2, eval_epochs=1,
                 eval_models=1, extractor_width=8, eval_width=8, quiet=True,
                 pe_iterations=1, pe_population=4, generated_per_class=8)
    with pytest.raises(ConfigError, match="outside \\[0, 1\\]"):
      pipeline.run(cfg, generator=pe.PrivateEvolution(
          _Pixels255(), pe.PEConfig(iterations=1, population=4)))


def test_generator_mechanisms_named_like_the_runs_own_are_refused():
  """The stages find their calibrated noise by name: a plug-in mechanism
  called "feature_matching" was handed its own (smaller) noise by the
  query stage."""
  from dpgeng_jax import accounting, planning
  from dpgeng_jax.errors import ConfigError
  from dpgeng_jax.generators import pe

  class Named(pe.PrivateEvolution):
    def mechanisms(self):
      return (accounting.Mechanism("feature_matching", 0.0, 1.0, 1,
                                   sensitivity="1"),)

  cfg = Config(method="dpgeng")
  plan = planning.resolve(cfg, (8, 8, 1), Named("text"))
  with pytest.raises(ConfigError, match="distinct names"):
    planning.mechanisms_for(cfg, plan)
  plan = planning.resolve(cfg, (8, 8, 1), pe.PrivateEvolution("text"))
  assert len(planning.mechanisms_for(cfg, plan)) == 3


class _BadVariation(_Pixels255):
  """A user API whose random images are fine and whose variation is not."""

  def random(self, key, labels):
    from dpgeng_jax.generators import apis
    labels = np.asarray(labels)
    return apis.Samples(np.full((len(labels), 8, 8, 1), 0.5, np.float32),
                        labels)

  def variation(self, key, samples, degree):
    return _Pixels255.random(self, key, samples.labels)


def test_a_generator_failing_after_the_count_release_says_it_is_spent(
    tmp_path):
  """The check before the releases sees only `random`: a variation that
  fails later is refused with the count release named as spent."""
  from dpgeng_jax.errors import ConfigError
  from dpgeng_jax.generators import pe
  cfg = Config(dataset=_sized_npz(tmp_path), ipc=2, steps=3, num_queries=2,
               eval_epochs=1, eval_models=1, extractor_width=8,
               eval_width=8, quiet=True, generated_per_class=8)
  with pytest.raises(ConfigError, match="variation.*outside .* it failed "
                     "after this run's count release .* which is spent"):
    pipeline.run(cfg, generator=pe.PrivateEvolution(
        _BadVariation(), pe.PEConfig(iterations=1, population=4)))


class _RawGenerator:
  """A user's DPGenerator that is not PE: no mechanism, reads nothing
  private, and answers with `bad` applied to good images."""
  name = "user"
  declared = None
  nonprivate_reason = None
  reads_private = False

  def __init__(self, bad=None):
    self.bad = bad

  def mechanisms(self):
    return ()

  def fixed(self):
    return ()

  def generate(self, ctx, secret, mechanisms):
    from dpgeng_jax.generators import Output
    y = np.repeat(np.arange(ctx.num_classes), ctx.per_class)
    x = np.random.default_rng(0).random(
        (len(y), *ctx.image_shape)).astype(np.float32)
    if self.bad:
      x, y = self.bad(x, y)
    return Output(x, y)


def _gen_cfg(tmp_path):
  return Config(dataset=_sized_npz(tmp_path), ipc=2, steps=3, num_queries=2,
                eval_epochs=1, eval_models=1, extractor_width=8,
                eval_width=8, quiet=True, generated_per_class=8,
                pool_models=1, pool_epochs=1, out=str(tmp_path / "run"))


@pytest.mark.parametrize("bad,message", [
    (lambda x, y: (np.where(x > 0.99, np.nan, x), y), "NaN"),
    (lambda x, y: (x * 255, y), "above 1"),
    (lambda x, y: (x, np.where(y == 3, 2, y)), "no image of class(es) [3]"),
    (lambda x, y: (x, np.where(y == 0, 7, y)), "labels >= the private data"),
    (lambda x, y: (x, y.astype(np.float32)), "integer dtype"),
    (lambda x, y: (x[:, :4], y), "shape"),
    (lambda x, y: (x, y[:-1]), "mismatched lengths"),
], ids=["nan", "0..255 floats", "missing class", "label out of range",
        "float labels", "other shape", "fewer labels"])
def test_a_plug_ins_unusable_images_are_refused_in_one_line(tmp_path, bad,
                                                            message):
  """A plug-in's Output is checked as an external file is (before, NaN
  pixels, labels out of range and 0..255 floats ran to a 'private' result
  and a missing class died in a modulo by zero), with the spent count
  release named; the run publishes nothing."""
  from dpgeng_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="returned images the run cannot "
                     "use") as e:
    pipeline.run(_gen_cfg(tmp_path), generator=_RawGenerator(bad))
  assert message in str(e.value) and "which is spent" in str(e.value)
  assert not (tmp_path / "run" / "distilled.npz").exists()


def test_a_plug_in_that_reads_private_data_unaccounted_is_refused(
    tmp_path, monkeypatch):
  """reads_private with no mechanism, fixed mechanism, declared guarantee
  or non-private reason would release private data with nothing in the
  report (it was reported private); refused before any release."""
  from dpgeng_jax.errors import ConfigError

  def spent(*a, **k):
    raise AssertionError("the class counts were released")

  monkeypatch.setattr(counts, "release_class_counts", spent)
  gen = _RawGenerator()
  gen.reads_private = True
  with pytest.raises(ConfigError, match="reads the private data .* "
                     "unaccounted"):
    pipeline.run(_gen_cfg(tmp_path), generator=gen)
  gen.nonprivate_reason = "a test's copy of the data"
  from dpgeng_jax import planning
  assert planning.resolve(Config(), (8, 8, 1), gen).generator_nonprivate


def test_an_ipc_whose_distilled_set_cannot_fit_is_refused_before_release(
    tmp_path, monkeypatch):
  """ipc 10^9 died in an XLA check failure (a process abort) after the
  releases had been drawn (a review's finding): refused first."""
  def spent(*a, **k):
    raise AssertionError("the class counts were released")

  monkeypatch.setattr(counts, "release_class_counts", spent)
  assert _distill(["--dataset", _sized_npz(tmp_path), "--out",
                   str(tmp_path / "run"), *TINY, "--ipc", "1000000000"]) == 2
  assert not (tmp_path / "run").exists()


class _ServerDown(_BadVariation):
  """A user API whose variation raises what a remote model's client
  raises when its server is down."""

  def variation(self, key, samples, degree):
    raise RuntimeError("my diffusion server is down")


def test_a_runtime_error_of_a_users_api_after_a_release_names_it_spent(
    tmp_path):
  """A RuntimeError from the user's API came out as a bare traceback
  without the note that the count release (and the generator's first
  histogram) are spent (a review's finding)."""
  from dpgeng_jax.errors import ConfigError
  from dpgeng_jax.generators import pe
  cfg = Config(dataset=_sized_npz(tmp_path), ipc=2, steps=3, num_queries=2,
               eval_epochs=1, eval_models=1, extractor_width=8,
               eval_width=8, quiet=True, generated_per_class=8)
  with pytest.raises(ConfigError, match="server is down; it failed after "
                     "this run's count release .* which is spent.* "
                     "generator's own releases"):
    pipeline.run(cfg, generator=pe.PrivateEvolution(
        _ServerDown(), pe.PEConfig(iterations=2, population=4)))


def test_an_abort_inside_a_generator_stays_an_abort(tmp_path):
  """A PrivacyAbort (a RuntimeError: nothing released, accounted in delta)
  raised while generating is not turned into a refusal that calls the
  releases spent."""
  from dpgeng_jax.errors import PrivacyAbort
  from dpgeng_jax.generators import pe

  class Aborts(_BadVariation):
    def variation(self, key, samples, degree):
      raise PrivacyAbort("a class above its released bound")

  cfg = Config(dataset=_sized_npz(tmp_path), ipc=2, steps=3, num_queries=2,
               eval_epochs=1, eval_models=1, extractor_width=8,
               eval_width=8, quiet=True, generated_per_class=8)
  with pytest.raises(PrivacyAbort, match="released bound"):
    pipeline.run(cfg, generator=pe.PrivateEvolution(
        Aborts(), pe.PEConfig(iterations=2, population=4)))
