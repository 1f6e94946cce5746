"""k-means selection and multi-formation encode/decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import init


def test_encode_then_decode_returns_the_tiles_up_to_the_resize():
  x = jax.random.normal(jax.random.key(0), (3, 8, 16, 16, 1))
  stored = init.encode(x, 2)
  assert stored.shape == (3, 2, 16, 16, 1)
  back = init.decode(stored, 2)
  assert back.shape == x.shape
  # Each decoded image is its own tile: downsize then upsize of the source.
  small = jax.image.resize(x, (3, 8, 8, 8, 1), "linear", antialias=True)
  want = jax.image.resize(small, x.shape, "linear")
  np.testing.assert_allclose(np.asarray(back), np.asarray(want), atol=1e-5)
  # Tile layout: stored image 0's top-right quadrant is source image 1.
  np.testing.assert_allclose(np.asarray(stored[0, 0, :8, 8:]),
                             np.asarray(small[0, 1]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(stored[0, 0, 8:, :8]),
                             np.asarray(small[0, 2]), atol=1e-6)


def test_factor_one_is_identity():
  x = jnp.ones((2, 3, 8, 8, 1))
  assert init.encode(x, 1) is x and init.decode(x, 1) is x


def test_decode_is_differentiable():
  s = jax.random.normal(jax.random.key(0), (2, 1, 8, 8, 3))
  g = jax.grad(lambda s: jnp.sum(init.decode(s, 2) ** 2))(s)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


def test_encode_refuses_counts_that_do_not_tile():
  with pytest.raises(ValueError, match="tile"):
    init.encode(jnp.ones((1, 3, 8, 8, 1)), 2)


def test_kmeans_is_deterministic_and_finds_separated_clusters():
  centres = jnp.asarray([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  x = (jnp.repeat(centres, 20, axis=0)
       + 0.1 * jax.random.normal(jax.random.key(1), (60, 2)))
  a = init.kmeans(jax.random.key(2), x, 3)
  b = init.kmeans(jax.random.key(2), x, 3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Row by row, each centroid is its cluster's mean (Lloyd's iterations:
  # the k-means++ seeds alone are data points, 0.1 away).
  means = np.asarray(x).reshape(3, 20, 2).mean(1)
  got = np.asarray(a)[np.lexsort(np.round(np.asarray(a)).T[::-1])]
  want = means[np.lexsort(np.round(means).T[::-1])]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_selection_takes_one_image_of_every_cluster():
  """Five well separated groups of six images in a class: the five
  selected images are one of each group (one image selected five times,
  or the k-means seeds alone, passed every test before)."""
  rng = np.random.default_rng(3)
  spots = rng.normal(size=(5, 16)) * 10
  group = np.repeat(np.arange(5), 6)
  imgs = (spots[group] + 0.01 * rng.normal(size=(30, 16))).reshape(
      1, 30, 4, 4, 1).astype(np.float32)
  embed = lambda x: x.reshape(x.shape[0], -1)
  sel = np.asarray(init.select_per_class(jax.random.key(1), embed,
                                         jnp.asarray(imgs), 5))
  pool = imgs[0].reshape(30, -1)
  picked = [int(np.flatnonzero(np.all(pool == img, axis=1))[0])
            for img in sel[0].reshape(5, -1)]
  assert sorted(group[picked]) == [0, 1, 2, 3, 4]


def test_selection_picks_actual_generated_images_per_class():
  imgs = jax.random.normal(jax.random.key(0), (2, 30, 4, 4, 1))
  embed = lambda x: x.reshape(x.shape[0], -1)
  sel = init.select_per_class(jax.random.key(1), embed, imgs, 5)
  assert sel.shape == (2, 5, 4, 4, 1)
  for c in range(2):
    pool = np.asarray(imgs[c]).reshape(30, -1)
    for img in np.asarray(sel[c]).reshape(5, -1):
      assert np.any(np.all(pool == img, axis=1)), "not a generated image"
  sel2 = init.select_per_class(jax.random.key(1), embed, imgs, 5)
  np.testing.assert_array_equal(np.asarray(sel), np.asarray(sel2))


def test_selection_refuses_more_clusters_than_images():
  with pytest.raises(ValueError, match="cannot select"):
    init.select_per_class(jax.random.key(0), lambda x: x.reshape(3, -1),
                          jnp.ones((1, 3, 2, 2, 1)), 4)
