"""DP-MERF's release (generators/merf.py) and external generated data."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpgeng_jax import clipping
from dpgeng_jax.generators import merf as G
from dpgeng_jax.generators.external import load_external
from dpgeng_jax.errors import DataError

SHAPE = (8, 8, 1)


def _fmap(d=40):
  return G.FeatureMap.create(jax.random.key(0), int(np.prod(SHAPE)), d)


def _images(n, seed=0, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), (n, *SHAPE))


def test_bounded_features_have_norm_exactly_one():
  fm = _fmap()
  for scale in (0.0, 1.0, 1e6):
    v = fm.bounded(_images(50, scale=scale))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=1), 1.0,
                               rtol=1e-5)
  assert fm.dim == 81


def test_one_example_moves_the_release_by_at_most_the_sensitivity():
  fm = _fmap()
  x = _images(30, scale=3.0)
  y = jnp.arange(30) % 4
  rel = lambda mask: G.release_class_features(
      fm, x, y, mask, num_classes=4, noise_multiplier=0.0,
      noise_key=jax.random.key(0))
  full = rel(jnp.ones(30))
  diffs = [float(np.linalg.norm(np.asarray(full, np.float64) - np.asarray(
      rel(jnp.ones(30).at[i].set(0.0)), np.float64))) for i in range(30)]
  assert max(diffs) <= G.GENERATOR_SENSITIVITY  # exactly
  assert max(diffs) == pytest.approx(1.0, rel=1e-5)  # attained


def test_release_noise_std_is_the_noise_multiplier():
  fm = _fmap(200)
  x = jnp.zeros((4, *SHAPE))
  y = jnp.zeros(4, jnp.int32)
  out = G.release_class_features(fm, x, y, jnp.zeros(4), num_classes=10,
                                 noise_multiplier=2.5,
                                 noise_key=jax.random.key(3))
  samples = np.asarray(out).ravel()
  assert stats.kstest(samples, "norm", args=(0, 2.5)).pvalue > 1e-3
  assert stats.kstest(samples, "norm", args=(0, 2.5 * 2 / 3)).pvalue < 1e-6
  assert stats.kstest(samples, "norm", args=(0, 2.5 * 1.5)).pvalue < 1e-6


def test_noiseless_release_decodes_to_true_class_means_and_counts():
  fm = _fmap()
  x = _images(20)
  y = jnp.arange(20) % 2
  rel = G.release_class_features(fm, x, y, jnp.ones(20), num_classes=2,
                                 noise_multiplier=0.0,
                                 noise_key=jax.random.key(0))
  means, counts = G.class_means_from_release(rel)
  np.testing.assert_allclose(np.asarray(counts), [10, 10], rtol=1e-5)
  f = np.asarray(fm.rff(x))
  np.testing.assert_allclose(np.asarray(means[1]), f[1::2].mean(0),
                             rtol=1e-4, atol=1e-6)


def test_generator_fits_released_means_and_samples_every_class():
  fm = _fmap()
  x = jax.random.uniform(jax.random.key(1), (40, *SHAPE))
  y = jnp.arange(40) % 2
  rel = G.release_class_features(fm, x, y, jnp.ones(40), num_classes=2,
                                 noise_multiplier=0.0,
                                 noise_key=jax.random.key(0))
  means, _ = G.class_means_from_release(rel)
  cfg = G.GeneratorConfig(num_features=40, steps=60, batch_per_class=16,
                          hidden=64, learning_rate=3e-3)
  ident = lambda a: a
  gen, params = G.train_generator(jax.random.key(2), fm, means,
                                  image_shape=SHAPE, normalize=ident, cfg=cfg)
  xs, ys = G.sample(gen, params, jax.random.key(3), 5, cfg.latent_dim)
  assert xs.shape == (10, *SHAPE) and np.all((xs >= 0) & (xs <= 1))
  np.testing.assert_array_equal(ys, np.repeat([0, 1], 5))


def _save(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


GOOD_X = np.random.default_rng(0).random((12, 8, 8, 1)).astype(np.float32)
GOOD_Y = np.arange(12) % 3


def test_external_generated_data_loads_when_valid(tmp_path):
  x, y = load_external(_save(tmp_path / "g.npz", x=GOOD_X, y=GOOD_Y),
                         image_shape=SHAPE, num_classes=3)
  assert x.shape == GOOD_X.shape and list(np.bincount(y)) == [4, 4, 4]


@pytest.mark.parametrize("arrays,message", [
    ({"x": np.zeros((12, 4, 4, 1), np.float32), "y": GOOD_Y}, "shape"),
    ({"x": GOOD_X, "y": np.arange(12) % 2}, "no image of class(es) [2]"),
    ({"x": np.where(np.arange(12)[:, None, None, None] == 3, np.nan, GOOD_X),
      "y": GOOD_Y}, "NaN"),
    ({"x": GOOD_X}, "lacks"),
    ({"x": GOOD_X, "y": np.arange(12) % 3 + 1}, "y has labels >= the "
     "private data's 3 classes"),
    ({"x": GOOD_X[:0], "y": GOOD_Y[:0]}, "x is empty"),
    ({"x": GOOD_X * 255, "y": GOOD_Y}, "x has float pixels"),
    ({"x": GOOD_X, "y": GOOD_Y[:11]}, "y has 11 labels"),
])
def test_bad_external_generated_data_is_refused(tmp_path, arrays, message):
  path = _save(tmp_path / "g.npz", **arrays)
  with pytest.raises(DataError) as e:
    load_external(path, image_shape=SHAPE, num_classes=3)
  assert message.lower() in str(e.value).lower()
  assert "x_train" not in str(e.value)  # the file's arrays are x and y
  assert "y_train" not in str(e.value) and "splits" not in str(e.value)
  assert "training" not in str(e.value)  # the file holds generated images


def test_a_file_that_is_not_an_npz_is_named_so(tmp_path):
  path = tmp_path / "g.npz"
  path.write_text("hello")
  with pytest.raises(DataError, match="not an npz file.*np.savez"
                     r"\(PATH, x=\.\.\., y=\.\.\.\)"):
    load_external(str(path), image_shape=SHAPE, num_classes=3)


def test_external_data_takes_one_declared_guarantee():
  from dpgeng_jax.errors import ConfigError
  from dpgeng_jax.generators.external import External
  assert External("g.npz", mu=0.5).fixed()[0].noise_multiplier == 2.0
  with pytest.raises(ConfigError, match="one way"):
    External("g.npz", epsilon=0.1, mu=0.5)


def test_the_release_sums_move_by_at_most_one_at_scale():
  """30000 rows of one class: float32 class sums of the norm-1 features
  moved by more than 1 when one row went (their rounding depends on the
  whole sum); the release's fixed-point int32 sums move by exactly the
  removed row's quantised vector, of norm <= 1."""
  fm = G.FeatureMap.create(jax.random.key(0), 64, 40)
  n = 30000
  v = fm.bounded(jax.random.normal(jax.random.key(1), (n, 8, 8, 1)))
  y, m = jnp.zeros(n, jnp.int32), jnp.ones(n)
  bits = clipping.fixed_point_bits(n, 1.0)
  rows = v * clipping.CLIP_MARGIN
  full = np.asarray(clipping.fixed_point_class_sums(rows, y, m, 1, bits),
                    np.int64)
  full32 = np.asarray(clipping.class_sums(v, y, m, 1), np.float64)
  worst32 = 0.0
  for i in range(0, n, 2999):
    drop = m.at[i].set(0.0)
    moved = full - np.asarray(clipping.fixed_point_class_sums(
        rows, y, drop, 1, bits), np.int64)
    want = np.trunc(np.asarray(rows[i], np.float64) * 2.0 ** bits)
    np.testing.assert_array_equal(moved[0], want)
    assert np.linalg.norm(moved * 2.0 ** -bits) <= 1.0
    worst32 = max(worst32, float(np.linalg.norm(full32 - np.asarray(
        clipping.class_sums(v, y, drop, 1), np.float64))))
  assert worst32 > 1.0  # the float32 sums, as the release was


def test_the_release_itself_moves_by_at_most_one_at_scale(noise_calls):
  """The same through `release_class_features` (not a copy of its
  steps): what it hands the noise sampler (its int32 sums and their
  float64 scale, the std) moves by at most 1 in float64 when one of
  30000 rows goes, and the std is sigma times the sensitivity."""
  from dpgeng_jax import noise
  fm = G.FeatureMap.create(jax.random.key(0), 64, 40)
  n = 30000
  x = jax.random.normal(jax.random.key(1), (n, 8, 8, 1))
  y, m = jnp.zeros(n, jnp.int32), jnp.ones(n)
  key = noise.deterministic_secret_key(0)
  for drop in (None, 0, 12345, n - 1):
    G.release_class_features(
        fm, x, y, m if drop is None else m.at[drop].set(0.0),
        num_classes=1, noise_multiplier=2.0, noise_key=key)
  (full, std, scale), *dropped = noise_calls
  assert std == 2.0 * G.GENERATOR_SENSITIVITY
  assert full.dtype == np.int32
  for moved, std_i, scale_i in dropped:
    assert std_i == std and scale_i == scale
    gap = (full.astype(np.float64) - moved.astype(np.float64)) * scale
    assert 0.5 < np.linalg.norm(gap) <= 1.0


def test_fixed_point_bits_keep_int32_sums_from_overflowing():
  for rows, bound in ((1, 1.0), (30000, 1.0), (60000, 3.0), (10 ** 6, 1.0)):
    s = clipping.fixed_point_bits(rows, bound)
    assert rows * bound * 2.0 ** s < 2 ** 31 - 1
    assert rows * bound * 2.0 ** (s + 1) >= 2 ** 31 - 1
  with pytest.raises(ValueError, match="bits"):
    clipping.fixed_point_bits(10 ** 8, 1.0)
  # The scale 2^s is applied in float32: a bound of 1e-30 gave s >= 128,
  # an inf scale and garbage sums; s stays within float32's range.
  for bound in (1e-20, 1e-6, 1e6, 1e35):
    s = clipping.fixed_point_bits(10, bound)
    assert np.isfinite(np.float32(2.0 ** s)) and np.float32(2.0 ** s) > 0
    v = jnp.full((10, 2), bound * clipping.CLIP_MARGIN, jnp.float32)
    sums = clipping.fixed_point_class_sums(v, jnp.zeros(10, jnp.int32),
                                           jnp.ones(10), 1, s)
    assert np.all(np.asarray(sums) > 0)
    assert abs(float(sums[0, 0]) * 2.0 ** -s / (10 * bound) - 1) < 0.01
  # A bound of 1e-300 overflowed the quotient: "cannot convert float
  # infinity to integer" (a review's finding); the same refusal now.
  for bound in (1e-30, 1e-300, 5e-324):
    with pytest.raises(ValueError, match="bits of resolution"):
      clipping.fixed_point_bits(10, bound)


@pytest.mark.parametrize("rate,steps", [(0.5, 1), (1.0, 2)])
def test_merf_refuses_noise_calibrated_for_other_releases(rate, steps):
  """Noise calibrated for a subsampled release (or two releases) was
  used as given for one release of the whole dataset."""
  from dpgeng_jax import accounting
  m = accounting.Mechanism("generator", 2.0, rate, steps, sensitivity="1")
  with pytest.raises(ValueError, match="merf makes the releases"):
    G.Merf(8, 1).generate(None, None, [m])
