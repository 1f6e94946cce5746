"""The M_F query: Poisson sampling, Gaussian noise, secret keys."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpgeng_jax import augment, clipping, mechanisms, noise
from dpgeng_jax.clipping import clip_rows, clipped_class_sums
from dpgeng_jax.mechanisms import (QuerySpec, class_major, noisy_class_sums,
                                   noisy_targets, poisson_capacity,
                                   poisson_sample)


def _embed(params, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params)


def _spec(clip=1.0, sigma=1.0, p=0.5, cap=20, strategy="none", k=3):
  return QuerySpec(embed_fn=_embed, num_classes=k, clip_norm=clip,
                   noise_multiplier=sigma, sampling_rate=p, capacity=cap,
                   strategy=strategy)


def _data(n=30, k=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
  y = np.arange(n) % k
  return x, y


def _noise_samples(stddev_scale=1.0, reps=40):
  """Noise only: a query whose batch is all padding."""
  spec = _spec(clip=2.0, sigma=1.5)
  x = jnp.zeros((8, 4, 4, 1))
  y = jnp.zeros(8, jnp.int32)
  params = jnp.ones((16, 50))
  keys = jax.random.split(jax.random.key(1), reps)
  out = jax.vmap(lambda k: noisy_class_sums(spec, params, x, y,
                                            jnp.zeros(8), k))(keys)
  return np.asarray(out).ravel(), spec.noise_stddev * stddev_scale


def test_noise_std_is_sigma_times_clip_norm_ks_test():
  samples, std = _noise_samples()
  assert std == pytest.approx(3.0)
  assert stats.kstest(samples, "norm", args=(0, std)).pvalue > 1e-3


@pytest.mark.parametrize("factor", [2 / 3, 3 / 2])
def test_ks_test_rejects_wrong_noise_scale(factor):
  samples, std = _noise_samples()
  assert stats.kstest(samples, "norm", args=(0, std * factor)).pvalue < 1e-6


def test_noise_is_independent_across_coordinates():
  samples, _ = _noise_samples()
  s = samples.reshape(-1, 2)
  assert abs(np.corrcoef(s[:, 0], s[:, 1])[0, 1]) < 0.05


def test_poisson_sampling_includes_each_example_with_rate_p():
  valid = jnp.asarray(np.r_[np.ones(40), np.zeros(10)][None].repeat(2, 0))
  reps = 2000
  keys = jax.random.split(jax.random.key(0), reps)
  idx, mask, over = jax.vmap(
      lambda k: poisson_sample(k, valid, 0.3, 50))(keys)
  counts = np.zeros((2, 50))
  for r in range(reps):  # host-side tally of which indices were taken
    for c in range(2):
      counts[c, np.asarray(idx[r, c])[np.asarray(mask[r, c]) > 0]] += 1
  freq = counts / reps
  assert not np.any(np.asarray(over))
  assert np.all(freq[:, 40:] == 0), "padding entries must never be sampled"
  # Each valid entry: Binomial(2000, 0.3); 5 sigma band.
  band = 5 * math.sqrt(0.3 * 0.7 / reps)
  assert np.all(np.abs(freq[:, :40] - 0.3) < band)
  # Batch sizes vary (Poisson, not fixed-size sampling).
  sizes = np.asarray(mask.sum(-1)).ravel()
  assert sizes.std() > 1.0


def _sampled_entries(key, valid, p):
  """Which entries a Poisson sample of `valid` at rate p takes, rebuilt
  from the sampling stream (noise.bernoulli's definition, written out
  here): the valid entries whose 32-bit word is below floor(p 2^32)."""
  words = np.asarray(jax.random.bits(noise.sampling_stream(key),
                                     np.shape(valid), jnp.uint32))
  return (words < np.uint32(math.floor(p * 2**32))) & (np.asarray(valid) > 0)


def _taken(idx, mask, n):
  """The (K, n) table of entries that (idx, mask) packs, each once."""
  idx, mask = np.asarray(idx), np.asarray(mask)
  taken = np.zeros((idx.shape[0], n), int)
  for c in range(idx.shape[0]):
    np.add.at(taken[c], idx[c][mask[c] > 0], 1)
  assert taken.max() <= 1, "an entry packed twice"
  return taken.astype(bool)


@pytest.mark.parametrize("p", [0.3, 0.75])
def test_poisson_sample_takes_exactly_the_entries_whose_word_is_below_p(p):
  """Exact, not a frequency band: each valid entry is in the batch iff
  its word of the key's sampling stream is below floor(p 2^32), padding
  never, and the mask counts the taken entries. 1190 valid entries: a
  rate 5 % above p flips some of them (about 18 at p = 0.3)."""
  valid = jnp.asarray(np.r_[np.ones(400), np.zeros(20)][None].repeat(3, 0))
  valid = valid.at[1, 390:].set(0.0)  # classes of other sizes
  for seed in range(2):
    key = noise.deterministic_secret_key(seed)
    idx, mask, over = poisson_sample(key, valid, p, 420)
    assert not bool(over)
    want = _sampled_entries(key, valid, p)
    np.testing.assert_array_equal(_taken(idx, mask, 420), want)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), want.sum(1))


def test_capacity_overflow_is_flagged_and_raises():
  valid = jnp.ones((1, 100))
  _, mask, over = poisson_sample(jax.random.key(0), valid, 0.9, 10)
  assert bool(over)
  assert float(mask.sum()) == 10
  with pytest.raises(mechanisms.SamplingOverflowError):
    mechanisms.check_overflow(over)


def test_one_class_over_its_capacity_flags_the_whole_batch():
  """Class-major data: one class over capacity is an overflow though the
  others fit (only the last flag, or all of them, let one example push
  another out unseen); its query releases NaN only."""
  valid = jnp.asarray([[1.0] * 10, [1.0] * 3 + [0.0] * 7])
  for first_fits in (False, True):
    v = valid[::-1] if first_fits else valid
    _, mask, over = poisson_sample(noise.deterministic_secret_key(0), v,
                                   1.0, 5)
    assert bool(over)
    np.testing.assert_array_equal(np.asarray(mask).sum(1),
                                  [3, 5] if first_fits else [5, 3])
  x = np.ones((12, 4, 4, 1), np.float32)
  y = np.r_[np.zeros(10), np.ones(2)].astype(np.int32)
  spec = _spec(clip=1.0, sigma=1.0, p=1.0, cap=10, k=2)
  data = mechanisms.class_major(x, y, 2)
  # capacity 10 holds class 0's ten rows; 9 does not, class 1's two fit
  for cap, overflows in ((10, False), (9, True)):
    sums, over = noisy_targets(
        dataclasses.replace(spec, capacity=cap), data, jnp.ones((16, 16)),
        augment.identity_params((2,)), noise.deterministic_secret_key(1))
    assert bool(over) == overflows
    assert np.all(np.isnan(np.asarray(sums))) == overflows
    assert np.all(np.isfinite(np.asarray(sums))) != overflows


def test_poisson_capacity_meets_the_tail_bound():
  counts = [100, 500, 5000]
  for p in (0.01, 0.2, 0.5):
    cap = poisson_capacity(counts, p)
    assert max(stats.binom.sf(cap, n, p) for n in counts) <= (
        mechanisms.OVERFLOW_TAIL)
    assert cap <= max(counts)
  assert poisson_capacity(counts, 1.0) == 5000
  # The bound is tight: one less would exceed the tail (scipy's isf is
  # unreliable this far out, so the search uses logsf).
  for n, p in ((144, 0.5), (1438, 0.1)):
    cap = poisson_capacity([n], p)
    assert stats.binom.logsf(cap, n, p) <= np.log(mechanisms.OVERFLOW_TAIL)
    assert stats.binom.logsf(cap - 1, n, p) > np.log(mechanisms.OVERFLOW_TAIL)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 144, 1438, 60000])
@pytest.mark.parametrize("p", [1e-6, 0.01, 0.5, 0.999999])
@pytest.mark.parametrize("log_tail", [np.log(0.5), np.log(1e-12), -1000.0])
def test_the_capacity_search_equals_a_scan_of_every_batch_size(n, p,
                                                               log_tail):
  """The bisection finds the first m whose tail P(Binomial(n, p) > m) is
  <= e^log_tail, as a scan over all m = 0..n of the exact tail does (a
  log-space sum of the pmf, which does not underflow where scipy's logsf
  does, at e^-745); at most one more where the tail is below e^-700 and
  the search uses an upper bound of it (the scan took 3.4 s at 18
  million rows)."""
  logpmf = stats.binom.logpmf(np.arange(n + 1), n, p)
  tail = np.r_[np.logaddexp.accumulate(logpmf[::-1])[::-1][1:], -np.inf]
  tol = 1e-9  # the two sums' rounding (P = 0.5 exactly at n 7, p 0.5)
  scan = int(np.argmax(tail <= log_tail + tol))
  cap = poisson_capacity([n], p, log_tail=log_tail)
  assert tail[cap] <= log_tail + tol
  assert cap - scan in ((0,) if log_tail > -700 else (0, 1))


def test_the_capacity_holds_where_scipys_logsf_underflows():
  """Epsilon near the accepted maximum asks for tails near e^-921; logsf
  is -inf from about e^-745, so a search on it took a capacity whose true
  overflow probability was e^-746.7 (a review's case: 1800 rows, p 0.5)."""
  n, p, log_tail = 1800, 0.5, -920.99
  cap = poisson_capacity([n], p, log_tail=log_tail)
  ks = np.arange(cap + 1, n + 1)
  true = float(np.logaddexp.reduce(stats.binom.logpmf(ks, n, p)))
  assert true <= log_tail
  assert stats.binom.logpmf(cap, n, p) > log_tail  # one less would fail


def test_secret_keys_come_from_os_entropy_and_differ():
  a = jax.random.key_data(mechanisms.secret_key())
  b = jax.random.key_data(mechanisms.secret_key())
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  c = jax.random.key_data(mechanisms.deterministic_secret_key(3))
  d = jax.random.key_data(mechanisms.deterministic_secret_key(3))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
  # The test-mode key is not the public key of the same seed.
  assert not np.array_equal(np.asarray(c),
                            np.asarray(jax.random.key_data(
                                jax.random.key(3))))


def _reference_sums(x, y, params, secret, p, strategy, aug_params, k):
  """Unclipped, noiseless sums recomputed by hand from the same draw."""
  data = class_major(x, y, k)
  k_sample, _ = jax.random.split(secret)
  take = np.asarray(noise.bernoulli(k_sample, p, data.valid.shape)
                    & (data.valid > 0))
  out = np.zeros((k, 16))
  for c in range(k):
    xc = np.asarray(data.x[c])[take[c]]
    pc = jax.tree.map(lambda a: a[c], aug_params)
    if len(xc):
      e = np.asarray(_embed(params, augment.apply(jnp.asarray(xc), pc,
                                                  strategy)))
      out[c] = e.sum(0)
  return out


@pytest.mark.parametrize("strategy", ["none", "flip_crop"])
def test_infinite_clip_and_zero_noise_give_plain_sums(strategy):
  """Degenerate parameters reproduce the non-private (dm) statistic."""
  x, y = _data()
  k = 3
  params = jnp.asarray(np.random.default_rng(1).normal(size=(16, 16)),
                       jnp.float32)
  spec = _spec(clip=math.inf, sigma=0.0, p=0.5, cap=10, strategy=strategy)
  aug_params = augment.sample_params(jax.random.key(5), strategy,
                                     batch_shape=(k,))
  secret = jax.random.key(9)
  got, over = noisy_targets(spec, class_major(x, y, k), params, aug_params,
                            secret)
  assert not bool(over)
  want = _reference_sums(x, y, params, secret, 0.5, strategy, aug_params, k)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_noisy_targets_add_noise_once_with_the_claimed_std():
  x, y = _data()
  params = jnp.ones((16, 16)) * 0.1
  aug_params = augment.identity_params((3,))
  spec = _spec(clip=1.0, sigma=2.0, p=1.0, cap=10)
  data = class_major(x, y, 3)
  keys = jax.random.split(jax.random.key(0), 300)
  f = jax.jit(lambda s: noisy_targets(spec, data, params, aug_params, s)[0])
  outs = np.stack([np.asarray(f(s)) for s in keys])
  clean = np.asarray(clipped_class_sums(
      _embed, params, jnp.asarray(x), jnp.asarray(y, jnp.int32),
      jnp.ones(30), num_classes=3, clip_norm=1.0))
  resid = (outs - clean).ravel()
  assert stats.kstest(resid, "norm", args=(0, 2.0)).pvalue > 1e-3


def test_query_jit_matches_eager():
  x, y = _data()
  params = jnp.ones((16, 16)) * 0.1
  spec = _spec(strategy="color_flip")
  aug_params = augment.sample_params(jax.random.key(2), "color_flip",
                                     batch_shape=(3,))
  data = class_major(x, y, 3)
  s = jax.random.key(4)
  a = noisy_targets(spec, data, params, aug_params, s)[0]
  b = jax.jit(lambda d, s: noisy_targets(spec, d, params, aug_params, s)[0])(
      data, s)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                             atol=1e-5)


def test_class_major_layout_pads_and_marks_valid_rows():
  x, y = _data(n=7, k=3)
  data = class_major(x, y, 3)
  assert data.x.shape == (3, 3, 4, 4, 1)
  np.testing.assert_array_equal(np.asarray(data.valid.sum(1)), [3, 2, 2])
  np.testing.assert_array_equal(np.asarray(data.x[1, 0]), x[1])


# ---------------------------------------------------------------------------
# The flat layout (the run's): one Poisson batch of all classes.


def _flat(x, y, rows=None):
  from dpgeng_jax import parallel
  return mechanisms.FlatData(*map(jnp.asarray, parallel.padded_rows(
      len(y) if rows is None else rows, x, y)))


@pytest.mark.parametrize("strategy", ["none", "color_crop", "flip_scale_rotate"])
def test_flat_query_equals_class_major_when_every_row_is_taken(strategy):
  """p = 1 takes every row in both layouts: the same clipped class sums,
  each row augmented with its own class's parameters."""
  x, y = _data(n=31, k=3)
  params = jnp.asarray(np.random.default_rng(1).normal(size=(16, 16)),
                       jnp.float32)
  aug = augment.sample_params(jax.random.key(5), strategy, batch_shape=(3,))
  spec = _spec(clip=1.5, sigma=0.0, p=1.0, strategy=strategy)
  want, _ = noisy_targets(dataclasses.replace(spec, capacity=11),
                          class_major(x, y, 3), params, aug,
                          jax.random.key(0))
  got, over = noisy_targets(dataclasses.replace(spec, capacity=40),
                            _flat(x, y, rows=40), params, aug,
                            jax.random.key(0))
  assert not bool(over)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
  # A flat query that augmented every row with class 0's parameters (the
  # siamese pairing broken) is caught by this comparison.
  if strategy != "none":
    broken = jax.tree.map(lambda a: jnp.broadcast_to(a[0], a.shape), aug)
    bad, _ = noisy_targets(dataclasses.replace(spec, capacity=40),
                           _flat(x, y, rows=40), params, broken,
                           jax.random.key(0))
    assert not np.allclose(np.asarray(bad), np.asarray(want), atol=1e-3)


def test_flat_query_sums_exactly_the_sampled_rows():
  """p = 0.5: the sums are those of the rows the query's sampling key
  takes (rebuilt from its sampling stream, not by `poisson_sample`, the
  function under test), never of padding. 240 rows: a query sampled at a
  rate 5 % above p would sum some 6 other rows."""
  x, y = _data(n=240, k=3)
  params = jnp.ones((16, 16)) * 0.1
  aug = augment.sample_params(jax.random.key(2), "flip", batch_shape=(3,))
  spec = _spec(clip=math.inf, sigma=0.0, p=0.5, cap=160, strategy="flip")
  secret = jax.random.key(7)
  data = _flat(x, y, rows=250)
  got, over = noisy_targets(spec, data, params, aug, secret)
  assert not bool(over)
  k_sample, _ = jax.random.split(secret)
  rows = np.flatnonzero(_sampled_entries(k_sample, data.valid[None], 0.5)[0])
  assert 0 < len(rows) < 240 and rows.max() < 240  # a real subsample
  one = jax.jit(lambda xi, p_i: _embed(params, augment.apply(xi, p_i,
                                                             "flip"))[0])
  want = np.zeros((3, 16))
  for i in rows:  # one row at a time, with its class's parameters
    p_i = jax.tree.map(lambda a, c=y[i]: a[c], aug)
    want[y[i]] += np.asarray(one(jnp.asarray(x[i:i + 1]), p_i))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_flat_query_ignores_padding_even_if_not_finite():
  x, y = _data(n=30, k=3)
  params = jnp.ones((16, 16)) * 0.1
  aug = augment.identity_params((3,))
  spec = _spec(clip=1.0, sigma=0.0, p=1.0, cap=40)
  clean, _ = noisy_targets(spec, _flat(x, y, rows=40), params, aug,
                           jax.random.key(0))
  data = _flat(x, y, rows=40)
  poisoned = data._replace(x=data.x.at[30:].set(jnp.nan),
                           y=data.y.at[30:].set(1))
  got, _ = noisy_targets(spec, poisoned, params, aug, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(clean))


def test_flat_query_sensitivity_is_the_clip_norm_and_attained():
  """Adding one example moves the (K, d) sums by at most C in L2, exactly
  C when its embedding's norm is above C (p = 1, no noise)."""
  x, y = _data(n=30, k=3)
  params = jnp.ones((16, 16))  # embeddings of norm ~4 > C
  aug = augment.identity_params((3,))
  spec = _spec(clip=0.7, sigma=0.0, p=1.0, cap=40)
  a, _ = noisy_targets(spec, _flat(x[:29], y[:29], rows=40), params, aug,
                       jax.random.key(0))
  b, _ = noisy_targets(spec, _flat(x, y, rows=40), params, aug,
                       jax.random.key(0))
  diff = np.asarray(b) - np.asarray(a)
  assert np.linalg.norm(diff) == pytest.approx(0.7, rel=1e-5)
  assert np.count_nonzero(np.abs(diff).sum(1) > 0) == 1  # one class moved


def test_query_sums_move_by_at_most_c_at_scale_in_fixed_point():
  """20000 rows of one class, every embedding clipped to C, p = 1: the
  float32 class sums moved by more than C when one row went (their
  rounding depends on every row and on the rows' slots, which shift), the
  query's int32 sums (to which the noise is added in float64) by exactly
  that row's quantised clipped embedding, norm <= C."""
  n, c = 20000, 1.0
  rng = np.random.default_rng(0)
  x = np.abs(rng.normal(size=(n, 4, 4, 1))).astype(np.float32)
  y = np.zeros(n, np.int32)
  # Positive embeddings of norm > C: every row is clipped, sums grow.
  params = jnp.asarray(np.abs(rng.normal(size=(16, 16))) * 0.3, jnp.float32)
  spec = _spec(clip=c, sigma=1.0, p=1.0, cap=n, k=1)  # sums: no noise
  bits = spec.release_bits(n)
  aug = augment.identity_params((1,))
  data = _flat(x, y)

  def sums(valid, bits_on):
    d = mechanisms.FlatData(data.x, data.y, valid)
    return mechanisms.sampled_class_sums(
        spec, d, params, aug, jax.random.key(0), 1000,
        bits if bits_on else None)[0]

  sums = jax.jit(sums, static_argnums=1)
  full = np.asarray(sums(data.valid, True), np.int64)
  full32 = np.asarray(sums(data.valid, False), np.float64)
  worst32 = 0.0
  for i in (0, 1, 4999, 15000):
    drop = data.valid.at[i].set(0)
    moved = full - np.asarray(sums(drop, True), np.int64)
    row = np.asarray(clip_rows(_embed(params, jnp.asarray(x[i:i + 1])), c),
                     np.float64)
    np.testing.assert_array_equal(moved, np.trunc(row * 2.0 ** bits))
    assert np.linalg.norm(moved * 2.0 ** -bits) <= c
    worst32 = max(worst32, float(np.linalg.norm(
        full32 - np.asarray(sums(drop, False), np.float64))))
  assert worst32 > c  # the float32 sums, as the queries summed before


def test_query_release_adds_noise_to_the_fixed_point_sums():
  """With noise the release is int sums x 2^-bits + N(0, (sigma C)^2),
  bits from the padded rows; without noise (or with C = inf) it is the
  float32 sums of the non-private path, exactly."""
  x, y = _data()
  params = jnp.ones((16, 16)) * 0.1
  aug = augment.identity_params((3,))
  data = class_major(x, y, 3)
  spec = _spec(clip=0.5, sigma=2.0, p=1.0, cap=10)
  bits = spec.release_bits(30)
  assert bits == clipping.fixed_point_bits(30, 0.5)
  assert _spec(clip=0.5, sigma=0.0).release_bits(30) is None
  assert _spec(clip=math.inf, sigma=0.0).release_bits(30) is None
  k_sample, k_noise = jax.random.split(jax.random.key(0))
  got, _ = noisy_targets(spec, data, params, aug, jax.random.key(0))
  ints, _ = mechanisms.sampled_class_sums(spec, data, params, aug, k_sample,
                                          bits=bits)
  assert ints.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(
      mechanisms.add_gaussian_noise(k_noise, ints, 1.0, scale=2.0 ** -bits)))
  float_sums = clipped_class_sums(
      _embed, params, jnp.asarray(x), jnp.asarray(y, jnp.int32),
      jnp.ones(30), num_classes=3, clip_norm=0.5)
  np.testing.assert_allclose(np.asarray(ints) * 2.0 ** -bits,
                             np.asarray(float_sums), atol=30 * 2.0 ** -bits)
  quiet = dataclasses.replace(spec, noise_multiplier=0.0)
  got0, _ = noisy_targets(quiet, data, params, aug, jax.random.key(0))
  floats, _ = mechanisms.sampled_class_sums(quiet, data, params, aug,
                                            k_sample)
  np.testing.assert_array_equal(np.asarray(got0), np.asarray(floats))


def test_fixed_point_sums_refuse_bits_that_could_overflow():
  x, y = _data()
  args = (_embed, jnp.ones((16, 16)), jnp.asarray(x),
          jnp.asarray(y, jnp.int32), jnp.ones(30))
  ok = clipping.fixed_point_bits(30, 2.0)
  clipped_class_sums(*args, num_classes=3, clip_norm=2.0, bits=ok)
  with pytest.raises(ValueError, match="overflows"):
    clipped_class_sums(*args, num_classes=3, clip_norm=2.0, bits=ok + 1)
  with pytest.raises(ValueError, match="finite clip_norm"):
    clipped_class_sums(*args, num_classes=3, clip_norm=math.inf, bits=ok)
  with pytest.raises(ValueError, match="integer"):
    clipped_class_sums(*args, num_classes=3, clip_norm=2.0, bits=1.5)


def test_flat_query_flags_an_overflowing_batch():
  x, y = _data(n=30, k=3)
  spec = _spec(clip=1.0, sigma=0.0, p=1.0, cap=29)
  _, over = noisy_targets(spec, _flat(x, y), jnp.ones((16, 16)),
                          augment.identity_params((3,)), jax.random.key(0))
  assert bool(over)
  with pytest.raises(mechanisms.SamplingOverflowError):
    mechanisms.check_overflow(over)


def test_flat_query_jit_matches_eager_with_the_claimed_noise():
  x, y = _data()
  params = jnp.ones((16, 16)) * 0.1
  aug = augment.sample_params(jax.random.key(2), "color_flip",
                              batch_shape=(3,))
  data = _flat(x, y, rows=36)
  spec = _spec(strategy="color_flip", p=1.0, cap=36, sigma=2.0)
  s = jax.random.key(4)
  a = noisy_targets(spec, data, params, aug, s)[0]
  f = jax.jit(lambda d, s: noisy_targets(spec, d, params, aug, s)[0])
  np.testing.assert_allclose(np.asarray(a), np.asarray(f(data, s)),
                             rtol=1e-5, atol=1e-5)
  clean = noisy_targets(dataclasses.replace(spec, noise_multiplier=0.0),
                        data, params, aug, s)[0]
  keys = jax.random.split(jax.random.key(0), 200)
  resid = np.stack([np.asarray(f(data, k)) for k in keys]) - np.asarray(clean)
  assert stats.kstest(resid.ravel(), "norm", args=(0, 2.0)).pvalue > 1e-3


@pytest.mark.parametrize("kw,message", [
    ({"clip": float("nan")}, "clip_norm"), ({"clip": -1.0}, "clip_norm"),
    ({"sigma": -2.0}, "standard deviation"),
    ({"sigma": float("inf")}, "standard deviation"),
    ({"p": 1.5}, "sampling rate"), ({"p": 0.0}, "sampling rate"),
    ({"cap": -1}, "capacity"), ({"k": 0}, "num_classes"),
    ({"clip": float("inf")}, "infinite"),   # noise std sigma C = inf
    ({"strategy": "bogus"}, "augmentation component")])
def test_a_query_spec_with_bad_privacy_parameters_is_refused(kw, message):
  with pytest.raises(ValueError, match=message):
    _spec(**kw)


def test_noise_with_a_negative_or_non_finite_std_is_refused():
  for std in (-1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="standard deviation"):
      mechanisms.add_gaussian_noise(jax.random.key(0), jnp.zeros(3), std)


@pytest.mark.parametrize("args,kw,what", [
    (([100, 50], float("nan")), {}, "sampling rate"),
    (([100, 50], -0.1), {}, "sampling rate"),
    (([100, 50], 1.5), {}, "sampling rate"), (([], 0.1), {}, "class_counts"),
    (([100, -1], 0.1), {}, "class_counts"),
    (([100], 0.1), {"tail": 2.0}, "tail"),
    (([100], 0.1), {"log_tail": 1.0}, "log_tail")])
def test_poisson_capacity_refuses_what_has_no_tail_bound(args, kw, what):
  with pytest.raises(ValueError, match=f"^{what} must be"):
    poisson_capacity(*args, **kw)


def test_flat_data_with_mismatched_lengths_and_bad_labels_are_refused():
  x, y = _data(n=6, k=2)
  spec = _spec(clip=1.0, sigma=0.0, p=1.0, cap=6, k=2)
  bad = mechanisms.FlatData(jnp.asarray(x), jnp.asarray(y[:3]), jnp.ones(6))
  with pytest.raises(ValueError, match="FlatData"):
    noisy_targets(spec, bad, jnp.ones((16, 16)),
                  augment.identity_params((2,)), jax.random.key(0))
  with pytest.raises(ValueError, match="labels"):
    class_major(x, y + 1, 2)
