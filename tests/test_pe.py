"""Private Evolution (generators/pe.py) and its image APIs."""

import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpgeng_jax import accounting, noise
from dpgeng_jax.generators import apis, pe
from dpgeng_jax.generators.apis import strokes, text
from dpgeng_jax.generators.apis.nearest import NearestAPI
from dpgeng_jax.generators.apis.text import TextAPI, TextConfig

K, POP, D = 3, 6, 5


def _toy(n=40, seed=0):
  rng = np.random.default_rng(seed)
  pop = jnp.asarray(rng.normal(size=(K, POP, D)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K, n), jnp.int32)
  return pop, x, y, jnp.ones(n, jnp.float32)


def _double_vote_histogram(pop, x, y, mask, *, k=1, chunk=1024):
  """A broken histogram: every vote counted twice."""
  return 2.0 * pe.vote_histogram(pop, x, y, mask, k=k, chunk=chunk)


def _max_sensitivity(hist_fn, k, trials=20):
  """The largest L2 change of the histogram when one example is removed,
  over random datasets and each example of them."""
  hist_fn = jax.jit(hist_fn, static_argnames="k")  # one compile, not
  worst = 0.0                                       # op-by-op dispatch
  for t in range(trials):
    pop, x, y, mask = _toy(12, seed=t)
    full = hist_fn(pop, x, y, mask, k=k)
    for i in range(len(y)):
      drop = mask.at[i].set(0.0)  # the padded layout of D minus x_i
      worst = max(worst, float(jnp.linalg.norm(
          full - hist_fn(pop, x, y, drop, k=k))))
  return worst


def _released(pop, x, y, mask, *, k):
  """The noiseless release, weighted as the mechanism weights it."""
  return pe.release_histogram(jax.random.key(0), pe.vote_counts(
      pop, x, y, mask, k=k), 0.0, k=k)


@pytest.mark.parametrize("k", [1, 3])
def test_one_example_changes_the_histogram_by_exactly_one(k):
  assert _max_sensitivity(pe.vote_histogram, k) == pytest.approx(1.0,
                                                                 abs=1e-6)
  assert _max_sensitivity(_released, k, trials=5) <= 1.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_release_moves_by_at_most_one_even_with_large_counts(
    k, noise_calls):
  """Float32 sums of 1/sqrt(3) moved by 1.0013 when one of 30000 votes
  of a bin went: the votes are now integers, weighted in float64 with a
  margin, so the bound holds up to int32 counts. The release's own
  arguments are checked (the integer counts, the weight it applies in
  float64, the noise std), then the float64 values it forms from them."""
  seen = noise_calls
  for c in (30_000, 2 ** 24 + 1, 2 ** 31 - 1):
    full = jnp.full((1, k), c, jnp.int32)
    seen.clear()
    a = np.asarray(pe.release_histogram(jax.random.key(0), full, 2.0, k=k))
    b = np.asarray(pe.release_histogram(jax.random.key(0), full - 1, 2.0,
                                        k=k))
    (va, sa, wa), (vb, sb, wb) = seen
    assert va.dtype == vb.dtype == np.int32  # exact counts, not floats
    assert sa == sb == 2.0 * pe.SENSITIVITY and wa == wb
    assert wa <= 1 / np.sqrt(k)
    with jax.enable_x64(True):  # the float64 values before the rounding
      w = jnp.float64(wa)
      wide = float(jnp.linalg.norm(jnp.asarray(va, jnp.float64) * w
                                   - jnp.asarray(vb, jnp.float64) * w))
    assert wide <= 1.0, (c, wide)
    assert np.all(np.isfinite(a - b))


def _soft(tau):
  """vote_histogram with soft votes of decay tau (k given by the caller)."""
  def hist(pop, x, y, mask, *, k):
    return pe.vote_histogram(pop, x, y, mask, k=k, tau=tau)
  return hist


def _soft_released(pop, x, y, mask, *, k, tau=0.3):
  bits = pe.soft_bits(len(y))
  return pe.release_histogram(jax.random.key(0), pe.vote_counts(
      pop, x, y, mask, k=k, tau=tau, bits=bits), 0.0, k=k, tau=tau,
                              bits=bits)


@pytest.mark.parametrize("k,tau", [(1, 0.5), (3, 0.3), (6, 2.0)])
def test_soft_votes_change_the_histogram_by_at_most_one_and_nearly_one(
    k, tau):
  """The fixed-point weights of one example have L2 norm <= 1 and, with
  20 bits (12 rows), within 2^-9 of it (floor per bin, the norm margin)."""
  worst = _max_sensitivity(_soft(tau), k)
  assert 1.0 - 2.0 ** -9 < worst <= 1.0
  assert _max_sensitivity(functools.partial(_soft_released, tau=tau), k,
                          trials=5) <= 1.0


def test_soft_votes_without_the_unit_norm_are_caught():
  """A broken variant (exponential weights not scaled to norm 1: the
  nearest bin gets a full vote, the others more) breaks the bound."""
  def unscaled(pop, x, y, mask, *, k):
    w = pe.soft_weights
    try:
      pe.soft_weights = lambda d, tau: jnp.exp(
          -(d - d[:, :1]) / (tau * (d[:, -1:] - d[:, :1]))) * 0.999
      return pe.vote_histogram(pop, x, y, mask, k=k, tau=0.5)
    finally:
      pe.soft_weights = w
  assert _max_sensitivity(unscaled, 3, trials=2) > 1.2


def test_soft_fixed_point_weights_keep_norm_one_whatever_the_distances():
  """floor(w 2^bits) as integers: sum of squares <= 2^(2 bits) exactly
  (Python integers), for ties, huge and tiny spreads, k up to the cap;
  a row with a non-finite distance votes nothing."""
  rng = np.random.default_rng(3)
  bits = pe.SOFT_MAX_BITS
  for k in (1, 2, 7, 64, pe.SOFT_MAX_K):
    for tau in (1e-6, 0.2, 1.0, 1e6):
      rows = [np.sort(rng.normal(size=k) * s) for s in (1e-30, 1, 1e30)]
      rows.append(np.zeros(k))                      # all tied
      rows.append(np.r_[0.0, np.full(k - 1, 1e-7)])  # one apart
      d = jnp.asarray(np.stack(rows), jnp.float32)
      u = np.floor(np.asarray(pe.soft_weights(d, tau), np.float64)
                   * 2.0 ** bits).astype(np.int64)
      assert np.all(u >= 0)
      for row in u:
        assert sum(int(v) ** 2 for v in row) <= 4 ** bits, (k, tau)
  bad = jnp.asarray([[0.0, 1.0, np.nan], [0.0, np.inf, np.inf]], jnp.float32)
  assert np.all(np.asarray(pe.soft_weights(bad, 0.5)) == 0.0)


def test_soft_votes_at_tiny_tau_are_single_votes_and_at_large_tau_equal():
  """tau -> 0 puts an example's weight on its nearest candidate (k = 1's
  histogram); tau -> infinity spreads it evenly (equal votes, k)."""
  pop, x, y, mask = _toy(30)
  single = np.asarray(pe.vote_histogram(pop, x, y, mask, k=1))
  np.testing.assert_allclose(
      pe.vote_histogram(pop, x, y, mask, k=4, tau=1e-6), single, rtol=2e-3)
  np.testing.assert_allclose(
      pe.vote_histogram(pop, x, y, mask, k=4, tau=1e6),
      pe.vote_histogram(pop, x, y, mask, k=4), rtol=2e-3)


def test_soft_votes_favour_nearer_candidates():
  """One example at a candidate's image: its weights fall with the rank
  of the distance; the release scale is 2^-bits less the margin."""
  pop, _, _, _ = _toy()
  x = pop[1, 2][None] + 0.01
  counts = np.asarray(pe.vote_counts(pop, x, jnp.ones(1, jnp.int32),
                                     jnp.ones(1), k=POP, tau=0.5))
  d = np.sum((np.asarray(pop[1]) - np.asarray(x)) ** 2, 1)
  assert np.all(np.diff(counts[1][np.argsort(d)]) <= 0)
  assert counts[1, 2] == counts.max() and counts[[0, 2]].sum() == 0
  assert pe.release_scale(POP, 0.5, 19) == (1 - pe.VOTE_MARGIN) * 2.0 ** -19
  assert pe.release_scale(POP) == pe.vote_weight(POP)


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_padded_rows_vote_nothing_and_chunks_and_jit_agree(tau):
  pop, x, y, mask = _toy(10)
  padded = jnp.concatenate([x, 100 * jnp.ones((5, D))])
  yp = jnp.concatenate([y, jnp.zeros(5, jnp.int32)])
  mp = jnp.concatenate([mask, jnp.zeros(5)])
  bits = pe.soft_bits(15) if tau else None
  want = pe.vote_counts(pop, x, y, mask, k=3, tau=tau, bits=bits)
  np.testing.assert_array_equal(
      pe.vote_counts(pop, padded, yp, mp, k=3, tau=tau, bits=bits), want)
  np.testing.assert_array_equal(jax.jit(lambda *a: pe.vote_counts(
      *a, k=3, tau=tau, bits=bits, chunk=4))(pop, padded, yp, mp), want)


def test_soft_votes_refuse_bad_settings():
  pop, x, y, mask = _toy()
  for tau in (-0.1, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="tau"):
      pe.vote_counts(pop, x, y, mask, k=2, tau=tau)
  for bits in (7, 21, 27):  # 8..20 allowed (the cap; 40 rows fit more)
    with pytest.raises(ValueError, match="bits"):
      pe.vote_counts(pop, x, y, mask, k=2, tau=0.5, bits=bits)
  with pytest.raises(ValueError, match="bits"):  # 2^16 rows: at most 14
    pe.private_histogram(pop, jnp.zeros((2 ** 16, D)),
                         jnp.zeros(2 ** 16, jnp.int32),
                         jnp.ones(2 ** 16), k=2, tau=0.5, bits=15)
  with pytest.raises(ValueError, match="bits"):
    pe.release_scale(2, 0.5)  # soft counts need the bits they were made with
  assert pe.soft_bits(1438) == 19 and pe.soft_bits(60_000) == 14
  assert pe.soft_bits(2 ** 22) == pe.SOFT_MIN_BITS
  with pytest.raises(ValueError, match="equal votes"):
    pe.soft_bits(2 ** 22 + 1)


def test_the_soft_release_moves_by_at_most_one_even_with_large_counts():
  """The module docstring's margin for soft votes: an integer change u of
  norm <= 2^bits on counts up to 2^30 moves the float64 values <= 1."""
  bits = pe.SOFT_MIN_BITS
  soft = np.floor(np.asarray(pe.soft_weights(
      jnp.asarray([[0.0, 0.1, 0.3, 0.7]], jnp.float32), 0.5))
      * 2.0 ** bits).astype(np.int64)[0]
  whole = np.array([2 ** bits, 0, 0, 0])  # the largest change: one bin
  scale = pe.release_scale(4, 0.5, bits)
  for u in (soft, whole):
    for c in (1, 2 ** 24 + 1, 2 ** 30 - 2 ** bits):
      with jax.enable_x64(True):
        a = jnp.asarray(c + u, jnp.float64) * scale
        b = jnp.asarray(np.full(4, c), jnp.float64) * scale
        assert float(jnp.linalg.norm(a - b)) <= 1.0


def test_a_histogram_that_counts_a_vote_twice_is_caught():
  assert _max_sensitivity(_double_vote_histogram, 1, trials=2) > 1.5


@pytest.mark.parametrize("k", [1, 2])
def test_votes_go_to_the_nearest_images_of_the_own_class(k):
  pop, x, y, mask = _toy(30)
  h = np.asarray(pe.vote_histogram(pop, x, y, mask, k=k, chunk=7))
  want = np.zeros((K, POP))
  for xi, yi in zip(np.asarray(x), np.asarray(y)):
    d = np.sum((np.asarray(pop[yi]) - xi) ** 2, 1)
    want[yi, np.argsort(d)[:k]] += 1 / math.sqrt(k)
  np.testing.assert_allclose(h, want, atol=1e-5)
  # Class sums: sqrt(k) per example of the class.
  np.testing.assert_allclose(h.sum(1), np.bincount(np.asarray(y),
                                                   minlength=K) * math.sqrt(k),
                             rtol=1e-5)


def test_padded_rows_vote_nothing():
  pop, x, y, mask = _toy(10)
  padded = jnp.concatenate([x, 100 * jnp.ones((5, D))])
  yp = jnp.concatenate([y, jnp.zeros(5, jnp.int32)])
  mp = jnp.concatenate([mask, jnp.zeros(5)])
  np.testing.assert_array_equal(pe.vote_histogram(pop, padded, yp, mp),
                                pe.vote_histogram(pop, x, y, mask))


def test_jit_equals_eager_and_chunking_does_not_change_votes():
  pop, x, y, mask = _toy(50)
  eager = pe.vote_histogram(pop, x, y, mask, k=2, chunk=50)
  jitted = jax.jit(lambda *a: pe.vote_histogram(*a, k=2, chunk=8))(
      pop, x, y, mask)
  np.testing.assert_allclose(eager, jitted, atol=1e-6)


def test_the_noise_has_the_claimed_std():
  sigma = 3.0
  z = np.asarray(pe.release_histogram(noise.deterministic_secret_key(1),
                                      jnp.zeros((100, 200), jnp.int32),
                                      sigma, k=1)).ravel()
  assert stats.kstest(z / sigma, "norm").pvalue > 1e-3
  for wrong in (2 / 3, 3 / 2):
    assert stats.kstest(z / (wrong * sigma), "norm").pvalue < 1e-6


def test_noise_zero_releases_the_histogram():
  pop, x, y, mask = _toy()
  for k in (1, 2):
    counts = pe.vote_counts(pop, x, y, mask, k=k)
    np.testing.assert_array_equal(pe.release_histogram(
        jax.random.key(0), counts, 0.0, k=k), pe.vote_histogram(
            pop, x, y, mask, k=k))


@pytest.mark.parametrize("sigma,steps", [(4.0, 4), (12.0, 10)])
def test_the_event_is_t_gaussian_releases(sigma, steps):
  gen = pe.PrivateEvolution("text", pe.PEConfig(iterations=steps))
  (mech,) = gen.mechanisms()
  ours = accounting.epsilon_pld(mech.with_noise(sigma).event(), 1e-5)
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(sigma), steps))
  assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


def test_public_only_spends_nothing_and_reads_nothing():
  gen = pe.PrivateEvolution("text", pe.PEConfig(public_only=True))
  assert gen.mechanisms() == () and not gen.reads_private


def test_draws_follow_the_weights_and_empty_classes_draw_uniformly():
  w = np.zeros((2, 4))
  w[0, 2] = 5.0
  idx = pe.draw(jax.random.key(0), w, 1000)
  assert np.all(idx[0] == 2)
  counts = np.bincount(idx[1], minlength=4)
  assert counts.min() > 150


def _toy_api(shape=(4, 4, 1)):
  """A user API from two functions: uniform noise images; a variation
  mixes an image with fresh noise in proportion to the degree."""
  def random_fn(key, labels):
    return np.asarray(jax.random.uniform(key, (len(labels), *shape)))

  def variation_fn(key, images, labels, degree):
    fresh = np.asarray(jax.random.uniform(key, images.shape))
    w = 0.5 * degree + 0.05
    return (1 - w) * images + w * fresh

  return apis.FunctionAPI(random_fn, variation_fn, shape)


def _mean_nearest(priv, y, images, labels):
  d = [np.min(np.sum((images[labels == c] - p) ** 2, axis=(1, 2, 3)))
       for p, c in zip(priv, y)]
  return float(np.mean(d))


def test_without_noise_the_population_approaches_the_private_set():
  api = _toy_api()
  rng = np.random.default_rng(0)
  priv = np.clip(rng.normal(0.5, 0.1, (60, 4, 4, 1)), 0, 1).astype(
      np.float32)
  priv[30:] = 1.0 - priv[30:] * 0.3  # class 1: bright images
  y = np.r_[np.zeros(30), np.ones(30)].astype(np.int32)
  flat = lambda x: x.reshape(x.shape[0], -1)
  gaps = []
  for t in (1, 3, 6):
    final, _, _ = pe.evolve(
        api, flat, jnp.asarray(flat(priv)), jnp.asarray(y), jnp.ones(60),
        key=jax.random.key(1), secret=jax.random.key(2),
        noise_multiplier=0.0,
        cfg=pe.PEConfig(iterations=t, population=20, threshold=0.0),
        num_classes=2, normalize=lambda x: x, per_class=20)
    gaps.append(_mean_nearest(priv, y, final.images, final.labels))
  start = api.random(jax.random.key(1), np.repeat([0, 1], 20))
  gaps.insert(0, _mean_nearest(priv, y, start.images, start.labels))
  assert gaps[-1] < 0.5 * gaps[0], gaps
  assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps


def test_every_iteration_draws_fresh_noise_of_std_sigma():
  """With no votes (all rows padded) the T released histograms are the
  noise alone: each N(0, sigma^2) per bin (KS; 2/3 and 3/2 of sigma are
  rejected) and independent of the others (a key reused between
  iterations would repeat the same noise)."""
  api = _toy_api()
  flat = lambda x: x.reshape(x.shape[0], -1)
  priv = np.random.default_rng(0).random((20, 4, 4, 1)).astype(np.float32)
  y = np.arange(20, dtype=np.int32) % 2
  sigma = 2.0
  _, noisy, _ = pe.evolve(
      api, flat, jnp.asarray(flat(priv)), jnp.asarray(y), jnp.zeros(20),
      key=jax.random.key(1), secret=noise.deterministic_secret_key(5), noise_multiplier=sigma,
      cfg=pe.PEConfig(iterations=3, population=1000, threshold=0.0),
      num_classes=2, normalize=lambda x: x, per_class=4)
  assert noisy.shape == (3, 2, 1000)
  for r in noisy.reshape(3, -1):
    assert stats.kstest(r, "norm", args=(0, sigma)).pvalue > 1e-4
    for wrong in (2 / 3, 3 / 2):
      assert stats.kstest(r, "norm", args=(0, wrong * sigma)).pvalue < 1e-6
  flat_noise = noisy.reshape(3, -1)
  corr = np.corrcoef(flat_noise)[np.triu_indices(3, 1)]
  assert np.all(np.abs(corr) < 0.2), corr


def test_every_iteration_releases_exactly_the_noise_of_its_own_key():
  """With no votes (all rows padded) noisy[t] is, bit for bit, the
  release of zero counts with iteration t's key fold_in(secret, t), at
  sigma and the vote weight of k: the KS test above lets 0.9 sigma pass,
  this does not, nor a key shared between iterations."""
  api = _toy_api()
  flat = lambda x: x.reshape(x.shape[0], -1)
  priv = np.random.default_rng(0).random((20, 4, 4, 1)).astype(np.float32)
  y = np.arange(20, dtype=np.int32) % 2
  sigma, k, pop = 2.0, 2, 30
  secret = noise.deterministic_secret_key(5)
  _, noisy, _ = pe.evolve(
      api, flat, jnp.asarray(flat(priv)), jnp.asarray(y), jnp.zeros(20),
      key=jax.random.key(1), secret=secret, noise_multiplier=sigma,
      cfg=pe.PEConfig(iterations=3, population=pop, k=k, threshold=0.0),
      num_classes=2, normalize=lambda x: x, per_class=4)
  assert noisy.shape == (3, 2, pop)
  for t in range(3):
    want = np.asarray(pe.release_histogram(
        jax.random.fold_in(secret, t), jnp.zeros((2, pop), jnp.int32),
        sigma, k=k))
    np.testing.assert_array_equal(noisy[t], want)
  assert 0.5 < np.std(noisy) / sigma < 1.5  # noise, not zeros


def test_lookahead_and_k_votes_run_and_return_the_shape():
  api = _toy_api()
  flat = lambda x: x.reshape(x.shape[0], -1)
  priv = np.random.default_rng(0).random((20, 4, 4, 1)).astype(np.float32)
  final, noisy, hist = pe.evolve(
      api, flat, jnp.asarray(flat(priv)), jnp.zeros(20, jnp.int32) + (
          jnp.arange(20) % 2), jnp.ones(20), key=jax.random.key(0),
      secret=jax.random.key(1), noise_multiplier=1.0,
      cfg=pe.PEConfig(iterations=2, population=5, k=2, lookahead=3,
                      history=4), num_classes=2, normalize=lambda x: x,
      per_class=7)
  assert final.images.shape == (14, 4, 4, 1)
  assert noisy.shape == (2, 2, 5) and hist.shape == (3, 2, 4, 4, 4, 1)
  np.testing.assert_array_equal(final.labels, np.repeat([0, 1], 7))


def test_a_user_api_returning_the_wrong_shape_is_refused():
  api = apis.FunctionAPI(lambda k, l: np.zeros((len(l), 3, 3, 1)),
                         lambda k, x, l, d: x, (4, 4, 1))
  with pytest.raises(ValueError, match="shape"):
    api.random(jax.random.key(0), np.zeros(2, np.int32))


# ---------------------------------------------------------------------------
# The text API.


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_text_api_is_deterministic_and_has_the_data_shape(shape):
  api = TextAPI(shape, 10)
  labels = np.arange(10, dtype=np.int32)
  a = api.random(jax.random.key(3), labels)
  b = api.random(jax.random.key(3), labels)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.images.shape == (10, *shape) and a.images.dtype == np.float32
  assert a.images.min() >= 0 and a.images.max() <= 1
  assert a.images.std() > 0.1  # not blank
  va = api.variation(jax.random.key(4), a, 0.5)
  vb = api.variation(jax.random.key(4), b, 0.5)
  np.testing.assert_array_equal(va.images, vb.images)
  assert va.images.shape == a.images.shape
  c = api.random(jax.random.key(5), labels)
  assert not np.array_equal(a.images, c.images)


def test_text_api_renders_the_class_glyph():
  # A classifier trained on one key's samples recognises another key's.
  # (An RBF SVM on pixels; chance is 0.1.)
  from sklearn.svm import SVC
  api = TextAPI((16, 16, 1), 10)
  labels = np.repeat(np.arange(10, dtype=np.int32), 100)
  train = api.random(jax.random.key(0), labels)
  test = api.random(jax.random.key(1), labels)
  clf = SVC(C=10.0).fit(train.images.reshape(len(labels), -1), labels)
  assert clf.score(test.images.reshape(len(labels), -1), labels) > 0.7


def test_small_variations_stay_close_and_large_ones_move():
  api = TextAPI((16, 16, 1), 10)
  s = api.random(jax.random.key(0), np.repeat(np.arange(10), 10))
  near = api.variation(jax.random.key(1), s, 0.0)
  far = api.variation(jax.random.key(1), s, 1.0)
  d_near = np.mean((near.images - s.images) ** 2)
  d_far = np.mean((far.images - s.images) ** 2)
  assert d_near < 0.5 * d_far


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (10, 14, 3)])
def test_the_elastic_field_is_the_spline_zoom_of_its_control_points(shape):
  """The precomputed basis gives the field a per-image cubic zoom gives."""
  from scipy import ndimage
  api = TextAPI(shape, 10)
  ch, cw = api.canvas
  g = text.WARP_POINTS
  grid = np.random.default_rng(0).uniform(-3, 3, (2, g, g))
  want = np.stack([ndimage.zoom(a, (ch / g, cw / g), order=3)[:ch, :cw]
                   for a in grid])
  got = np.tensordot(grid.reshape(2, -1), api._warp_basis, 1)
  np.testing.assert_allclose(got, want, atol=1e-9)


def test_text_api_uses_given_class_texts_and_refuses_bad_ones():
  api = TextAPI((16, 16, 1), 2, TextConfig(texts=("A", "xy")))
  assert api.texts == ("A", "xy")
  with pytest.raises(ValueError, match="class texts"):
    TextAPI((16, 16, 1), 3, TextConfig(texts=("A", "B")))
  with pytest.raises(ValueError, match="font directory"):
    TextAPI((16, 16, 1), 2, TextConfig(font_dir="/nonexistent/fonts"))
  # Blank class texts (a zero-width space passed str.strip and drew blank
  # images; so would a lone combining accent or a tab).
  for blank in (" ", "\u200b", "\u0301", "\t"):
    with pytest.raises(ValueError, match="visible character"):
      TextAPI((16, 16, 1), 2, TextConfig(texts=(blank, "a")))
  assert TextAPI((16, 16, 1), 2, TextConfig(texts=("é", "7"))).texts
  # Two classes of one text draw the same glyphs (a review's finding:
  # accepted without a word).
  with pytest.warns(UserWarning, match=r"share the texts \['1'\]"):
    TextAPI((16, 16, 1), 3, TextConfig(texts=("1", "2", "1")))


def test_text_api_polarity():
  dark = TextAPI((16, 16, 1), 2, TextConfig(polarity="dark"))
  light = TextAPI((16, 16, 1), 2)
  lab = np.zeros(20, np.int32)
  d = dark.random(jax.random.key(0), lab).images
  l = light.random(jax.random.key(0), lab).images
  # The ground (a corner, and most pixels) is light in one and dark in the
  # other; the glyph is the opposite.
  assert d[:, 0, 0].min() >= 0.8 and l[:, 0, 0].max() <= 0.2
  assert np.median(d) > 0.6 > 0.4 > np.median(l)


def test_random_images_are_the_glyphs_alone_whatever_the_marks():
  labels = np.arange(10, dtype=np.int32)
  plain = TextAPI((16, 16, 1), 10, TextConfig(marks=0))
  marked = TextAPI((16, 16, 1), 10, TextConfig(marks=3))
  a = plain.random(jax.random.key(2), labels)
  b = marked.random(jax.random.key(2), labels)
  np.testing.assert_array_equal(a.images, b.images)
  assert "marks" not in a.state and b.state["marks"].shape == (10, 3, 6)
  assert not b.state["marks"][..., 5].any()  # every slot off


def test_variations_add_and_erase_marks_and_the_marks_are_drawn():
  api = TextAPI((16, 16, 1), 10, TextConfig(marks=2, mark_rate=1.0))
  s = api.random(jax.random.key(0), np.repeat(np.arange(10), 10))
  for t in range(4):
    s = api.variation(jax.random.key(10 + t), s, 0.5)
  kinds = s.state["marks"][..., 5]
  assert (kinds == 1).any() and (kinds == -1).any()
  assert set(np.unique(kinds)) <= {-1.0, 0.0, 1.0}
  assert (s.state["marks"][..., :4] >= 0).all()
  assert (s.state["marks"][..., :4] <= 1).all()
  # The same parameters without their marks draw other images.
  off = dict(s.state, marks=np.zeros_like(s.state["marks"]))
  bare = api.render(s.labels, off)
  changed = np.abs(s.images - bare).reshape(len(bare), -1).max(1) > 0.05
  assert changed.mean() > 0.5
  assert s.images.min() >= 0 and s.images.max() <= 1


def test_an_ink_mark_draws_its_line_and_an_erasing_mark_clears_it():
  api = TextAPI((16, 16, 1), 10)
  ch, cw = api.canvas
  bar = np.array([[0.1, 0.5, 0.9, 0.5, 0.1, 1.0]])   # across the middle
  ink = api._draw_marks(np.zeros((ch, cw), np.float32), bar)
  rows = np.flatnonzero(ink.max(1) > 0.5)
  assert abs(rows.mean() - ch / 2) <= 1 and len(rows) <= 0.15 * ch
  cols = np.flatnonzero(ink.max(0) > 0.5)
  assert cols.min() <= 0.12 * cw and cols.max() >= 0.88 * cw - 1
  erase = bar.copy()
  erase[0, 5] = -1.0
  cleared = api._draw_marks(np.ones((ch, cw), np.float32), erase)
  np.testing.assert_array_equal(cleared == 0, ink > 0.5)


def test_a_new_mark_has_a_length_in_its_range_and_one_slot_per_change():
  api = TextAPI((16, 16, 1), 10, TextConfig(marks=2, mark_rate=1.0,
                                            mark_length=(0.2, 0.3)))
  s = api.random(jax.random.key(0), np.repeat(np.arange(10), 20))
  v = api.variation(jax.random.key(1), s, 1.0)
  marks = v.state["marks"]
  assert ((marks[..., 5] != 0).sum(1) == 1).all()  # one slot each, taken
  first = marks[:, 0]
  length = np.hypot(first[:, 2] - first[:, 0], first[:, 3] - first[:, 1])
  assert length.max() <= 0.3 + 1e-9
  assert np.median(length) >= 0.2 - 1e-9   # shortened only at an edge
  # The rate is the chance that an image's marks change at all.
  rare = TextAPI((16, 16, 1), 10, TextConfig(marks=2, mark_rate=0.1))
  w = rare.variation(jax.random.key(1), s, 1.0)
  changed = (w.state["marks"][..., 5] != 0).any(1).mean()
  assert 0.02 <= changed <= 0.25


def test_bad_mark_settings_are_refused():
  for marks in (-1, 2.5, 10 ** 6):
    with pytest.raises(ValueError, match="marks"):
      TextAPI((16, 16, 1), 10, TextConfig(marks=marks))
  with pytest.raises(ValueError, match="mark_rate"):
    TextAPI((16, 16, 1), 10, TextConfig(mark_rate=1.5))
  with pytest.raises(ValueError, match="mark_length"):
    TextAPI((16, 16, 1), 10, TextConfig(mark_length=(0.5, 0.2)))


def _stroke_only(shape):
  """A text API with the stroke fonts, restricted to them."""
  api = TextAPI(shape, 10, TextConfig(stroke_fonts=True))
  api.fonts = [f for f in api.fonts if strokes.is_stroke_font(f)]
  return api


def test_stroke_fonts_join_the_outline_fonts_when_asked():
  both = TextAPI((16, 16, 1), 10, TextConfig(stroke_fonts=True))
  outline = TextAPI((16, 16, 1), 10)
  stroke = [f for f in both.fonts if strokes.is_stroke_font(f)]
  assert len(stroke) >= 8
  assert not any(strokes.is_stroke_font(f) for f in outline.fonts)
  assert len(both.fonts) == len(outline.fonts) + len(stroke)
  # A character no stroke font draws leaves only the outline fonts.
  assert strokes.usable(["\u03bb"]) == []


def test_stroke_font_samples_render_the_class_glyph():
  from sklearn.svm import SVC
  api = _stroke_only((16, 16, 1))
  labels = np.repeat(np.arange(10, dtype=np.int32), 100)
  train = api.random(jax.random.key(0), labels)
  test = api.random(jax.random.key(1), labels)
  assert train.images.min() >= 0 and train.images.max() <= 1
  clf = SVC(C=10.0).fit(train.images.reshape(len(labels), -1), labels)
  assert clf.score(test.images.reshape(len(labels), -1), labels) > 0.7


def test_a_wider_pen_puts_down_more_ink():
  api = _stroke_only((28, 28, 1))
  s = api.random(jax.random.key(0), np.arange(10, dtype=np.int32))
  ink = []
  for stroke in (0.0, 0.03, 0.06):
    state = dict(s.state, stroke=np.full(10, stroke),
                 blur=np.zeros(10), elastic=np.zeros(10))
    ink.append(api.render(s.labels, state).sum())
  assert ink[0] < ink[1] < ink[2]


def test_stroke_glyph_spans_the_asked_height_with_a_margin():
  img = np.asarray(strokes.draw(strokes.PREFIX + "futural", "7", 40, 3))
  rows = np.flatnonzero(img.max(1) > 0)
  assert rows[0] >= 1 and img.shape[0] - 1 - rows[-1] >= 1
  assert abs((rows[-1] - rows[0] + 1) - 40) <= 2


# ---------------------------------------------------------------------------
# The nearest API.


def test_nearest_api_draws_from_the_class_and_hops_to_neighbours():
  rng = np.random.default_rng(0)
  x = rng.random((40, 4, 4, 1)).astype(np.float32)
  y = np.repeat([0, 1], 20).astype(np.int32)
  api = NearestAPI(x, y, 2, k_max=3)
  s = api.random(jax.random.key(0), np.array([0, 1, 1, 0]))
  assert np.all(y[s.state["index"]] == s.labels)
  stay = api.variation(jax.random.key(1), s, 0.0)
  np.testing.assert_array_equal(stay.state["index"], s.state["index"])
  hop = api.variation(jax.random.key(2), s, 1.0)
  assert np.all(y[hop.state["index"]] == s.labels)
  for i, j in zip(s.state["index"], hop.state["index"]):
    assert j in api.neighbours[i]
  flat = x.reshape(40, -1)
  i = int(s.state["index"][0])
  same = np.flatnonzero(y == y[i])
  d = np.sum((flat[same] - flat[i]) ** 2, 1)
  np.testing.assert_array_equal(np.sort(api.neighbours[i]),
                                np.sort(same[np.argsort(d)[:3]]))


def test_a_font_folder_that_adds_no_font_is_refused_and_links_do_not_loop(
    tmp_path):
  """A review's findings: an empty folder, or one of a corrupt .ttf, ran
  with matplotlib's fonts only while the report named the folder's; a
  link loop in it hung the run (a recursive glob follows links)."""
  import shutil
  from dpgeng_jax.generators.apis import text
  empty = tmp_path / "empty"
  empty.mkdir()
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "x.ttf").write_bytes(np.random.default_rng(0).bytes(5000))
  for folder, unreadable in ((empty, 0), (corrupt, 1)):
    with pytest.raises(ValueError, match=f"no font under --pe-font-dir .*"
                       f"{unreadable} of them unreadable"):
      TextAPI((16, 16, 1), 2, TextConfig(font_dir=str(folder)))
  good = tmp_path / "good"
  (good / "sub").mkdir(parents=True)
  shutil.copy(text.shipped_font_files()[0], good / "sub" / "mine.ttf")
  (good / "loop").symlink_to("..")
  (good / "sub" / "self").symlink_to(".")
  fonts = text.usable_fonts(("0", "1"), str(good))
  assert [f for f in fonts if f.startswith(str(good))] == [
      str(good / "sub" / "mine.ttf")]


def test_a_huge_nearest_k_is_the_class_size():
  """k_max = 1e9 asked for a (n, 1e9) table (1.5 TiB; a review's
  finding): no class has more neighbours than images."""
  x = np.random.default_rng(0).random((5, 4, 4, 1)).astype(np.float32)
  y = np.array([0, 0, 0, 1, 1], np.int32)
  api = NearestAPI(x, y, 2, k_max=10**9)
  assert api.k_max == 3 and api.neighbours.shape == (5, 3)


def test_a_class_smaller_than_k_keeps_each_image_its_own_first_neighbour():
  """np.resize refilled the table of a small class row-major: rows took
  other images' neighbours, and a hop at degree 0 (PE's last variation)
  moved images."""
  x = np.random.default_rng(0).random((5, 4, 4, 1)).astype(np.float32)
  y = np.array([0, 0, 0, 1, 1], np.int32)
  api = NearestAPI(x, y, 2, k_max=10)
  np.testing.assert_array_equal(api.neighbours[:, 0], np.arange(5))
  for i in range(5):
    assert set(api.neighbours[i]) == set(np.flatnonzero(y == y[i]))
  s = api.random(jax.random.key(0), np.array([0, 0, 0, 1, 1]))
  stay = api.variation(jax.random.key(1), s, 0.0)
  np.testing.assert_array_equal(stay.state["index"], s.state["index"])


class _BadAPI:
  """A user API whose answers break the protocol in one way."""

  def __init__(self, how, shape=(4, 4, 1)):
    self.how, self.shape = how, shape

  def random(self, key, labels):
    return self._out(np.asarray(labels))

  def variation(self, key, samples, degree):
    return self._out(samples.labels)

  def _out(self, labels):
    x = np.full((len(labels), *self.shape), 0.5, np.float32)
    if self.how == "array":
      return x
    if self.how == "255":
      x = x * 255
    if self.how == "nan":
      x[0, 0, 0, 0] = np.nan
    if self.how == "count":
      x, labels = x[1:], labels[1:]
    if self.how == "labels":
      labels = np.zeros_like(labels)
    return apis.Samples(x, labels)


@pytest.mark.parametrize("how,says", [
    ("array", "returns apis.Samples"), ("255", "outside \\[0, 1\\]"),
    ("nan", "non-finite"), ("count", "shape"), ("labels", "other labels")])
def test_a_user_api_that_breaks_the_protocol_is_named(how, says):
  """Pixels 0..255 and nan were used silently (a nan distilled set); a
  wrong count or a plain array failed deep inside with a reshape or an
  attribute error."""
  rng = np.random.default_rng(0)
  priv = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  embed = lambda x: jnp.asarray(x).reshape(len(x), -1)  # noqa: E731
  with pytest.raises(ValueError, match=says):
    pe.evolve(_BadAPI(how), embed, priv, jnp.arange(8) % 2, jnp.ones(8),
              key=jax.random.key(0), secret=jax.random.key(1),
              noise_multiplier=1.0, cfg=pe.PEConfig(iterations=2,
                                                    population=3, k=1),
              num_classes=2, normalize=lambda x: x, per_class=2,
              image_shape=(4, 4, 1))


@pytest.mark.parametrize("t", [1, 2, 5])
def test_the_degree_schedule_ends_at_zero_whatever_the_iterations(t):
  """With one iteration the only variation, which makes the generated
  set, was at degree 1: the voted images were redrawn from scratch."""
  d = apis.degrees(t)
  assert len(d) == t and d[-1] == 0.0 and all(0 <= v <= 1 for v in d)
  assert d == sorted(d, reverse=True)
  if t > 1:
    assert d[0] == 1.0


def test_the_histogram_release_needs_the_votes_per_example():
  """k had a default of 1: counts made with k = 4 (L2 change 2 per
  example) were released at weight 1, twice the accounted sensitivity."""
  with pytest.raises(TypeError, match="k"):
    pe.release_histogram(jax.random.key(0), jnp.zeros((2, 3), jnp.int32),
                         1.0)  # pylint: disable=missing-kwoa


def test_votes_refuse_a_mask_that_is_not_one_value_per_row():
  """A mask of shape (n, 1) or (1,) failed deep inside the chunked scan
  ('different leading axis sizes'); it is named."""
  pop, x, y, mask = _toy()
  for bad in (mask[:, None], mask[:1], jnp.ones(()), jnp.ones(2 * len(y))):
    with pytest.raises(ValueError, match="mask must have shape"):
      pe.vote_counts(pop, x, y, bad, k=1)


# ---------------------------------------------------------------------------
# The warm start (one DP-MERF-style release, then public herding).


@pytest.mark.parametrize("sigma,steps,m", [(4.0, 4, 2), (12.0, 10, 5)])
def test_the_warm_release_is_accounted_as_m_of_pe_s_releases(sigma, steps,
                                                             m):
  """T + m Gaussians at sigma compose, exactly, as the warm release at
  sigma / sqrt(m) and the T histograms at sigma (dp_accounting's PLD)."""
  cfg = pe.PEConfig(iterations=steps, warm_start=3, warm_weight=m)
  (mech,) = pe.PrivateEvolution("text", cfg).mechanisms()
  assert mech.steps == steps + m
  ours = accounting.epsilon_pld(mech.with_noise(sigma).event(), 1e-5)
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.GaussianDpEvent(pe.warm_sigma(sigma, cfg)))
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(sigma), steps))
  assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=2e-3)
  assert pe.warm_sigma(sigma, cfg) == pytest.approx(sigma / math.sqrt(m))
  # Public-only: no warm release either (the planning refuses the pair).
  public = pe.PEConfig(public_only=True, warm_start=3)
  assert pe.PrivateEvolution("text", public).mechanisms() == ()


def _warm_context(mask, shape=(4, 4, 1), n=20):
  from dpgeng_jax.generators import Context
  x = np.random.default_rng(0).random((n, *shape)).astype(np.float32)
  return Context(jnp.asarray(x), jnp.asarray(np.arange(n) % 2, jnp.int32),
                 jnp.asarray(mask, jnp.float32), None, shape, 2,
                 lambda v: v, jax.random.key(3), 5)


def test_the_warm_release_is_dp_merf_s_at_sigma_over_sqrt_m_on_its_own_key():
  """With every row padded the warm release is the noise alone: bit for
  bit merf.release_class_features of zero rows at sigma / sqrt(m), drawn
  with fold_in(secret, T), a key no histogram uses."""
  from dpgeng_jax.generators import merf
  sigma, t, m = 2.0, 2, 4
  cfg = pe.PEConfig(iterations=t, population=6, warm_start=2, warm_weight=m,
                    embedding="pixels", threshold=0.0)
  gen = pe.PrivateEvolution(_toy_api(), cfg)
  ctx = _warm_context(np.zeros(20))
  secret = noise.deterministic_secret_key(9)
  (mech,) = gen.mechanisms()
  out = gen.generate(ctx, secret, [mech.with_noise(sigma)])
  fmap = merf.FeatureMap.create(jax.random.split(jax.random.fold_in(
      ctx.key, pe.WARM_PUBLIC), 3)[0], 16, cfg.warm_features)
  want = np.asarray(merf.release_class_features(
      fmap, ctx.x_private, ctx.y_private, ctx.mask, num_classes=2,
      noise_multiplier=sigma / math.sqrt(m),
      noise_key=jax.random.fold_in(secret, t)))
  np.testing.assert_array_equal(out.arrays[pe.WARM], want[None])
  for i in range(t):  # and the histograms keep their own keys
    np.testing.assert_array_equal(
        out.arrays[pe.RELEASES][i], np.asarray(pe.release_histogram(
            jax.random.fold_in(secret, i), jnp.zeros((2, 6), jnp.int32),
            sigma, k=cfg.k)))


def test_the_warm_release_moves_by_at_most_one_when_an_example_leaves():
  """Noise 0: removing one private row changes the warm release by an L2
  norm <= 1, and nearly 1 (the bound is attained)."""
  cfg = pe.PEConfig(iterations=1, population=6, warm_start=1,
                    embedding="pixels")
  gen = pe.PrivateEvolution(_toy_api(), cfg)
  (mech,) = gen.mechanisms()
  secret = noise.deterministic_secret_key(1)
  full = gen.generate(_warm_context(np.ones(20)), secret,
                      [mech.with_noise(0.0)]).arrays[pe.WARM]
  gaps = []
  for i in (0, 7, 19):
    mask = np.ones(20)
    mask[i] = 0
    less = gen.generate(_warm_context(mask), secret,
                        [mech.with_noise(0.0)]).arrays[pe.WARM]
    gaps.append(float(np.linalg.norm(full.astype(np.float64) - less)))
  assert max(gaps) <= 1.0 and min(gaps) > 0.999, gaps


def test_warm_start_counts_join_the_votes_by_inverse_variance():
  sigma, t, m = 3.0, 2, 5
  cfg = pe.PEConfig(iterations=t, population=6, k=2, warm_start=1,
                    warm_weight=m, embedding="pixels")
  gen = pe.PrivateEvolution(_toy_api(), cfg)
  (mech,) = gen.mechanisms()
  out = gen.generate(_warm_context(np.ones(20)),
                     noise.deterministic_secret_key(2),
                     [mech.with_noise(sigma)])
  from dpgeng_jax.generators import merf
  votes = pe.count_estimates(out.arrays[pe.RELEASES][0], 2)[1] * sigma / (
      math.sqrt(t))
  warm = merf.count_stddev(sigma / math.sqrt(m))
  assert out.count_std == pytest.approx((votes ** -2 + warm ** -2) ** -0.5)
  assert out.counts.shape == (2,)
  assert np.all(np.abs(out.counts - 10) < 6 * out.count_std)
  soft = pe.PrivateEvolution(_toy_api(), pe.PEConfig(
      iterations=t, population=6, k=2, vote_tau=0.5, warm_start=1,
      warm_weight=m, embedding="pixels"))
  out = soft.generate(_warm_context(np.ones(20)),
                      noise.deterministic_secret_key(2),
                      [mech.with_noise(sigma)])
  assert out.count_std == pytest.approx(warm)  # soft votes carry none


def test_the_start_degree_scales_the_votes_variation_schedule():
  seen = []
  api = _toy_api()
  real = api.variation

  def spy(key, samples, degree):
    seen.append(degree)
    return real(key, samples, degree)
  api.variation = spy
  flat = lambda x: x.reshape(x.shape[0], -1)
  priv = np.random.default_rng(0).random((10, 4, 4, 1)).astype(np.float32)
  start = api.random(jax.random.key(7), np.repeat([0, 1], 5).astype(
      np.int32))
  _, _, hist = pe.evolve(
      api, flat, jnp.asarray(flat(priv)), jnp.asarray(np.arange(10) % 2),
      jnp.ones(10), key=jax.random.key(1), secret=jax.random.key(2),
      noise_multiplier=1.0, start=start,
      cfg=pe.PEConfig(iterations=3, population=5, start_degree=0.4,
                      history=5), num_classes=2, normalize=lambda x: x,
      per_class=5)
  assert seen == pytest.approx([0.4, 0.2, 0.0])
  np.testing.assert_array_equal(
      hist[0], start.images.reshape(2, 5, 4, 4, 1))  # the start, not random


def test_no_iterations_return_the_start_s_first_per_class():
  api = _toy_api()
  flat = lambda x: x.reshape(x.shape[0], -1)
  priv = np.random.default_rng(0).random((10, 4, 4, 1)).astype(np.float32)
  start = api.random(jax.random.key(7), np.repeat([0, 1], 6).astype(
      np.int32))
  args = dict(key=jax.random.key(1), secret=jax.random.key(2),
              noise_multiplier=1.0, start=start, num_classes=2,
              normalize=lambda x: x,
              cfg=pe.PEConfig(iterations=0, population=6))
  final, noisy, hist = pe.evolve(
      api, flat, jnp.asarray(flat(priv)), jnp.asarray(np.arange(10) % 2),
      jnp.ones(10), per_class=4, **args)
  assert noisy.shape == (0, 2, 6) and hist.shape[0] == 1
  np.testing.assert_array_equal(
      final.images, start.images.reshape(2, 6, 4, 4, 1)[:, :4].reshape(
          8, 4, 4, 1))
  np.testing.assert_array_equal(final.labels, np.repeat([0, 1], 4))
  with pytest.raises(ValueError, match="population of at least 7"):
    pe.evolve(api, flat, jnp.asarray(flat(priv)),
              jnp.asarray(np.arange(10) % 2), jnp.ones(10), per_class=7,
              **args)
