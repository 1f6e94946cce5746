"""The atom-free Gaussian sampler and the 128-bit secret keys (noise.py).

What broke before: jax.random.normal in float32 takes ~2^23 values in
[-5.42, 5.22] sigma, so a shifted release lands, with probability ~ d 2^-23,
where its neighbour's cannot (1.6e-4 measured on one generator release).
These tests check the law of the new sampler (KS, tail frequencies, the
conditional far tail through its bits), its resolution, that a float32
sampler fails the same checks, and that every release uses it.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from dpgeng_jax import counts, mechanisms, noise, parallel
from dpgeng_jax.generators import merf as generator

KEY = noise.deterministic_secret_key(11)


def _draws(n, stddev=1.0, key=KEY):
  f = jax.jit(noise.add_gaussian_noise, static_argnums=2)
  return np.asarray(f(key, jnp.zeros(n, jnp.float32), stddev), np.float64)


@pytest.fixture(scope="module")
def four_million():
  return _draws(4_000_000)


def test_ks_accepts_sigma_and_rejects_two_thirds_and_three_halves():
  z = _draws(200_000, stddev=3.0)
  assert stats.kstest(z, "norm", args=(0, 3.0)).pvalue > 1e-3
  for factor in (2 / 3, 3 / 2):
    assert stats.kstest(z, "norm", args=(0, 3.0 * factor)).pvalue < 1e-6


def test_tail_frequencies_match_the_normal(four_million):
  z = np.abs(four_million)
  n = len(z)
  for t in (2.0, 3.0, 4.0, 4.5):
    p = 2 * stats.norm.sf(t)
    got = np.sum(z > t)
    assert abs(got - n * p) < 5 * np.sqrt(n * p) + 1, (t, got, n * p)


def _numpy_normal_from_bits(words):
  """An independent float64 reimplementation of the bits -> z map."""
  w = words.astype(np.uint64)
  sign = np.where((w[0] >> 31) == 1, -1.0, 1.0)
  e = np.zeros(w.shape[1:], np.int64)
  still = np.ones(w.shape[1:], bool)
  for word in w[2:]:
    lz = np.where(word == 0, 32, 31 - np.floor(np.log2(np.maximum(word, 1))))
    e += np.where(still, lz.astype(np.int64), 0)
    still &= word == 0
  m = ((w[0] & 0xFFFFF).astype(np.float64) * 2.0**32 + w[1] + 0.5) * 2.0**-52
  return sign * -special.ndtri(np.ldexp(1.0 + m, -(e + 2)))


def test_bits_to_normal_map_equals_an_independent_float64_computation():
  words = np.array(jax.random.bits(jax.random.key(0), (6, 100_000),
                                     jnp.uint32))
  words[2:, :1000] = 0  # exercise the exponent stream deep into the tail
  words[3, :500] = np.arange(1, 501)
  with jax.enable_x64(True):
    got = np.asarray(noise.standard_normal_from_bits(jnp.asarray(words)))
  want = _numpy_normal_from_bits(words)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
  assert np.abs(got[:500]).min() > 8.4  # u < 2^-55
  assert np.abs(got[500:1000]).min() > 13.0  # u < 2^-129: the cap


def _conditional_tail_words(exponent_zeros: int, n: int, seed: int):
  """Random words with the first `exponent_zeros` words of the exponent
  stream forced to zero: u < 2^-(32 k), i.e. |Z| beyond Phi^-1."""
  words = np.array(jax.random.bits(jax.random.key(seed), (6, n),
                                     jnp.uint32))
  words[2:2 + exponent_zeros] = 0
  return words


def _fast_normal(words):
  """The broken variant: a float32 sampler of jax.random.normal's kind
  (23-bit uniform through the inverse CDF in float32)."""
  u = ((words[0] >> 9).astype(np.float32) + 0.5) * np.float32(2.0**-23)
  return special.ndtri(u.astype(np.float32)).astype(np.float32)


@pytest.mark.parametrize("zeros", [1, 2])
def test_far_tail_has_the_normal_conditional_law(zeros):
  # Given u < 2^-32k, |Z| has P(|Z| > t | |Z| > t0) = sf(t) / sf(t0).
  words = _conditional_tail_words(zeros, 50_000, seed=zeros)
  with jax.enable_x64(True):
    z = np.abs(np.asarray(noise.standard_normal_from_bits(
        jnp.asarray(words))))
  t0 = -special.ndtri(2.0**(-32 * zeros) / 2)
  assert z.min() > t0
  cdf = lambda t: 1 - stats.norm.sf(t) / stats.norm.sf(t0)
  assert stats.kstest(z, cdf).pvalue > 1e-3
  # The float32 sampler cannot produce the tail at all.
  broken = np.abs(_fast_normal(words))
  assert broken.max() < 5.5 < t0


def test_attainable_values_are_far_denser_than_float32_releases():
  # Mantissas 2^12 apart (of 2^52) give |z| values ~2^-40 / |z| apart out
  # to |z| ~ 13 (neighbouring ones coincide in float64), far below the
  # float32 spacing of any release (2^-24 relative); the float32 sampler's
  # last two values are 0.2 sigma apart.
  for e_words in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]):
    words = np.zeros((6, 2), np.uint32)
    words[1] = [7, 7 + 2**12]
    words[2:, :] = np.asarray(e_words, np.uint32)[:, None]
    with jax.enable_x64(True):
      z = np.asarray(noise.standard_normal_from_bits(jnp.asarray(words)))
    assert 0 < abs(z[1] - z[0]) < 1e-12 * abs(z[0])
  top = np.array([[2**32 - 1, 2**32 - 2**9 - 1]], np.uint32).T
  fast = _fast_normal(np.repeat(top, 6, axis=1).T.reshape(6, 2))
  assert abs(fast[1] - fast[0]) > 0.05


def test_release_is_the_float64_sum_snapped_then_rounded_once():
  v = jnp.asarray(np.random.default_rng(0).normal(size=1000) * 1e3,
                  jnp.float32)
  got = noise.add_gaussian_noise(KEY, v, 2.5)
  words = np.asarray(jax.random.bits(KEY, (6, 1000), jnp.uint32))
  q = 2.5 * noise.SNAP  # the public grid of the release
  want = (np.round((np.asarray(v, np.float64)
                    + 2.5 * _numpy_normal_from_bits(words)) / q) * q
          ).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert got.dtype == jnp.float32
  # No noise: the value itself (the non-private path), exactly.
  np.testing.assert_array_equal(noise.add_gaussian_noise(KEY, v, 0.0), v)


def test_sampler_works_under_jit_vmap_and_shard_map():
  v = jnp.zeros((4, 3))
  eager = noise.add_gaussian_noise(KEY, v, 1.0)
  jitted = jax.jit(noise.add_gaussian_noise, static_argnums=2)(KEY, v, 1.0)
  np.testing.assert_array_equal(eager, jitted)
  keys = jax.random.split(KEY, 3)
  batched = jax.vmap(lambda k: noise.add_gaussian_noise(k, v, 1.0))(keys)
  np.testing.assert_array_equal(batched[1],
                                noise.add_gaussian_noise(keys[1], v, 1.0))
  mesh = parallel.data_mesh(1)
  sharded = jax.shard_map(lambda x: noise.add_gaussian_noise(KEY, x, 1.0),
                          mesh=mesh, in_specs=jax.P(), out_specs=jax.P())(v)
  np.testing.assert_array_equal(sharded, eager)


def test_secret_keys_hold_128_bits_and_every_half_matters():
  data = np.asarray(jax.random.key_data(noise.secret_key()))
  assert data.dtype == np.uint32 and data.size == 4
  other = np.asarray(jax.random.key_data(noise.secret_key()))
  assert not np.array_equal(data, other)
  for word in (0, 3):  # a bit of either Threefry half changes the draws
    flipped = data.copy()
    flipped[word] ^= 1
    a = noise.add_gaussian_noise(
        jax.random.wrap_key_data(jnp.asarray(data), impl=noise.SECRET_IMPL),
        jnp.zeros(8), 1.0)
    b = noise.add_gaussian_noise(
        jax.random.wrap_key_data(jnp.asarray(flipped),
                                 impl=noise.SECRET_IMPL),
        jnp.zeros(8), 1.0)
    assert not np.any(np.asarray(a) == np.asarray(b))


def test_secret_key_is_sixteen_fresh_bytes_of_the_os(monkeypatch):
  """The key is the 16 bytes os.urandom gives, all of them (a key of 8
  bytes twice would pass a check of its size and of two keys differing)."""
  raw = bytes(range(101, 117))
  asked = []

  def urandom(n):
    asked.append(n)
    return raw[:n]
  monkeypatch.setattr(noise.os, "urandom", urandom)
  data = np.asarray(jax.random.key_data(noise.secret_key()))
  assert asked == [16]
  np.testing.assert_array_equal(data, np.frombuffer(raw, np.uint32))


def test_bernoulli_threshold_is_the_floor_of_p_times_2_32(monkeypatch):
  """Words just below, at and above floor(p 2^32): only the first is
  taken, so the rate is floor(p 2^32) / 2^32 <= p exactly (ceil would
  take the word at the threshold, a rate above p that 200000 random words
  almost never show)."""
  for p in (0.3, 1 / 3, 2.0 ** -23 + 2.0 ** -40):
    t = int(np.floor(p * 2.0**32))
    words = jnp.asarray([t - 1, t, t + 1], jnp.uint32)
    monkeypatch.setattr(noise.jax.random, "bits",
                        lambda key, shape, dtype, w=words: w)
    got = np.asarray(noise.bernoulli(KEY, p, (3,)))
    assert got.tolist() == [True, False, False], p


def test_bernoulli_rate_never_exceeds_p():
  """Each draw is a 32-bit word below floor(p 2^32): the rate is
  floor(p 2^32) / 2^32 <= p exactly (a statistical band could not see
  float32's 2^-23 excess, nor jax.random.bernoulli's)."""
  for p in (0.3, 0.5, 1 / 3, 2.0 ** -23, 1 - 2.0 ** -30):
    take = np.asarray(noise.bernoulli(KEY, p, (200_000,)))
    words = np.asarray(jax.random.bits(noise.sampling_stream(KEY),
                                       (200_000,), jnp.uint32))
    threshold = int(np.floor(p * 2.0**32))
    np.testing.assert_array_equal(take, words < threshold)
    assert abs(take.mean() - p) < 5 * np.sqrt(p * (1 - p) / take.size) + (
        1e-5)
  assert np.all(np.asarray(noise.bernoulli(KEY, 1.0, (10,))))
  assert not np.any(np.asarray(noise.bernoulli(KEY, 0.0, (1000,))))


# --- Every release draws its noise from the sampler (today's main used
# float32 jax.random.normal in each of these).


def _noise_only(release, *, shape, stddev, key):
  """release(key) on data that contributes nothing must be exactly the
  sampler's noise from the key the mechanism derives."""
  np.testing.assert_array_equal(
      np.asarray(release), np.asarray(noise.add_gaussian_noise(
          key, jnp.zeros(shape, jnp.float32), stddev)))


def test_query_release_uses_the_sampler():
  spec = mechanisms.QuerySpec(
      embed_fn=lambda p, x: x.reshape(x.shape[0], -1), num_classes=2,
      clip_norm=1.0, noise_multiplier=2.0, sampling_rate=0.5, capacity=3,
      strategy="none")
  data = mechanisms.ClassMajorData(jnp.zeros((2, 3, 2, 2, 1)),
                                   jnp.zeros((2, 3)))
  from dpgeng_jax import augment
  sums, _ = mechanisms.noisy_targets(spec, data, None,
                                     augment.identity_params((2,)), KEY)
  _noise_only(sums, shape=(2, 4), stddev=2.0,
              key=jax.random.split(KEY)[1])


def test_generator_and_count_releases_use_the_sampler():
  fmap = generator.FeatureMap.create(jax.random.key(0), 4, 3)
  rel = generator.release_class_features(
      fmap, jnp.zeros((2, 2, 2, 1)), jnp.zeros(2, jnp.int32), jnp.zeros(2),
      num_classes=2, noise_multiplier=1.5, noise_key=KEY)
  _noise_only(rel, shape=(2, 7), stddev=1.5, key=KEY)
  got = counts.release_class_counts(KEY, np.array([0, 1, 1]), num_classes=2,
                                    noise_multiplier=3.0)
  np.testing.assert_array_equal(
      np.asarray(got), np.asarray(noise.add_gaussian_noise(
          KEY, jnp.asarray([1.0, 2.0]), 3.0)))


def test_dp_sgd_step_uses_the_sampler():
  import optax
  step = mechanisms.make_dp_sgd_step(
      lambda p, x: jnp.sum(x @ p["w"]), optax.sgd(1.0), clip_norm=1.0,
      noise_multiplier=2.0, expected_batch_size=1.0)
  params = {"w": jnp.zeros(3)}
  _, _, g = step(params, optax.sgd(1.0).init(params), jnp.zeros((2, 3)),
                 jnp.zeros(2), KEY)
  want = noise.tree_add_gaussian_noise(KEY, {"w": jnp.zeros(3)}, 2.0)
  np.testing.assert_array_equal(g["w"], want["w"])


def test_tree_noise_is_one_draw_split_over_the_leaves():
  """tree_add_gaussian_noise draws one vector over all coordinates (one
  sampler in the program) and hands each leaf its own slice: each leaf is
  N(0, s^2) (KS), the leaves are uncorrelated, and values are added."""
  tree = {"a": jnp.zeros((100, 200)), "b": jnp.ones(20000),
          "c": jnp.zeros((3,))}
  got = noise.tree_add_gaussian_noise(KEY, tree, 2.0)
  flat = noise.add_gaussian_noise(KEY, jnp.concatenate(
      [jnp.ravel(tree[k]) for k in ("a", "b", "c")]), 2.0)
  np.testing.assert_array_equal(got["a"].ravel(), flat[:20000])
  np.testing.assert_array_equal(got["b"], flat[20000:40000])
  np.testing.assert_array_equal(got["c"], flat[40000:])
  a = np.asarray(got["a"], np.float64).ravel()
  b = np.asarray(got["b"], np.float64) - 1.0
  assert stats.kstest(a, stats.norm(scale=2.0).cdf).pvalue > 1e-3
  assert stats.kstest(b, stats.norm(scale=2.0).cdf).pvalue > 1e-3
  assert stats.kstest(a, stats.norm(scale=3.0).cdf).pvalue < 1e-6
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.04


def test_releases_are_snapped_to_the_public_grid():
  """Every noisy value is a multiple of stddev * 2^-20 (exactly, in
  float32 below 16 stddev, for a power-of-two stddev): near 0 an unsnapped float32 output pinned one
  float64 draw of the sampler, whose lattice differs between two sums a
  neighbour apart (0.3 and 0.3 - 3 * 2^-20 here)."""
  for value in (0.3, 0.3 - 3 * 2.0**-20):
    for sd in (1.0, 0.25):
      out = np.asarray(noise.add_gaussian_noise(
          KEY, jnp.full((20000,), value, jnp.float32), sd), np.float64)
      small = out[np.abs(out) < 8 * sd]
      assert len(small) > 19000
      k = small / (sd * noise.SNAP)
      np.testing.assert_allclose(k, np.round(k), rtol=0, atol=1e-6)
      assert np.any(np.abs(small) < 1e-3 * sd)  # near 0 too


def test_one_key_for_sampling_and_noise_gives_independent_draws():
  """Sampling and noise drew the same words from one key: with p = 0.5
  every noise coordinate was positive exactly where its example was not
  sampled (a review's finding, passing one key to both). Now the sign
  agrees with the sampling about half the time."""
  n = 4000
  take = np.asarray(noise.bernoulli(KEY, 0.5, (n,)))
  z = np.asarray(noise.add_gaussian_noise(KEY, jnp.zeros(n), 1.0))
  agree = np.mean((z > 0) == take)
  assert abs(agree - 0.5) < 4 * 0.5 / np.sqrt(n), agree


def test_a_tiny_stddev_gives_finite_values():
  """A positive stddev so small that value / (stddev * 2^-20) overflows
  float64 (1e-300 against 3e38) released -inf before (a review's finding);
  such noise is below float32's resolution, so the value comes back."""
  x = jnp.array([1.0, 0.0, -3e38, 3e38], jnp.float32)
  for sd in (1e-250, 1e-300, 1e-305):
    out = noise.add_gaussian_noise(KEY, x, sd)
    assert np.all(np.isfinite(out)), (sd, out)
    np.testing.assert_array_equal(np.abs(out), np.abs(x))


@pytest.mark.parametrize("scale", [math.inf, math.nan, 0.0, -1.0])
def test_a_unit_that_is_not_finite_and_positive_is_refused(scale):
  """An infinite unit released inf, nan or -inf per coordinate, so each
  coordinate's sign of the sum, which no noise masks (a review's
  finding); 0 or a negative unit is a caller's bug."""
  with pytest.raises(ValueError, match="finite and > 0"):
    noise.add_gaussian_noise(noise.deterministic_secret_key(0),
                             jnp.array([3, -2, 0], jnp.int32), 1.0, scale)


@pytest.mark.parametrize("stddev", ["1.0", True, 1 + 0j, -1.0, math.inf,
                                    math.nan])
def test_a_stddev_that_is_not_a_finite_real_number_is_refused(stddev):
  """A string or bool standard deviation was converted by float() and
  used (a review's finding); a complex one, a negative or a non-finite
  one is refused too."""
  with pytest.raises(ValueError, match="standard deviation must be"):
    noise.add_gaussian_noise(noise.deterministic_secret_key(0),
                             jnp.zeros(3), stddev)


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.bool_])
def test_noise_on_values_that_are_not_real_numbers_is_refused(dtype):
  """Complex sums came back as float32 with their imaginary part dropped
  and the noise on the real part only."""
  with pytest.raises(ValueError, match="real values"):
    noise.add_gaussian_noise(noise.deterministic_secret_key(0),
                             jnp.ones(3, dtype), 1.0)


def test_a_release_from_a_key_of_another_kind_warns():
  """noise and sampling from jax.random.key(seed) or PRNGKey(seed) (a
  seed that may be published: anyone could redraw the noise) warn, under
  jit too; the library's secret keys, deterministic ones and keys split
  from them do not (a review's finding: every release function took any
  key without a word)."""
  import warnings
  x = jnp.zeros(3)
  for key in (jax.random.key(0), jax.random.PRNGKey(0)):
    with pytest.warns(noise.PublicKeyWarning, match="not private"):
      noise.add_gaussian_noise(key, x, 1.0)
    with pytest.warns(noise.PublicKeyWarning, match="Poisson sampling"):
      noise.bernoulli(key, 0.5, (3,))
  with pytest.warns(noise.PublicKeyWarning):
    jax.jit(lambda k: noise.add_gaussian_noise(k, x, 1.0))(
        jax.random.key(1))
  with warnings.catch_warnings():
    warnings.simplefilter("error", noise.PublicKeyWarning)
    for key in (noise.secret_key(), noise.deterministic_secret_key(0),
                jax.random.split(noise.secret_key(), 2)[1]):
      noise.add_gaussian_noise(key, x, 1.0)
      noise.bernoulli(key, 0.5, (3,))
    noise.add_gaussian_noise(jax.random.key(0), x, 0.0)  # no noise drawn


def test_a_tree_mixing_integer_and_float_leaves_is_refused():
  """Concatenated, an int32 leaf of fixed-point sums became float32 and
  was released at unit 1, without the scale that add_gaussian_noise
  demands of integer values."""
  import jax.numpy as jnp
  tree = {"a": jnp.array([3, 2 ** 25 + 1], jnp.int32), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="integer and float leaves"):
    noise.tree_add_gaussian_noise(noise.deterministic_secret_key(0), tree,
                                  1.0)
