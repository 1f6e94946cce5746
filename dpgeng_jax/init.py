"""Initialisation of the synthetic set from generated data, and the
multi-formation encoding.

* `kmeans`: Lloyd's algorithm in JAX with k-means++-style seeding from a
  key, deterministic for a key; vmapped over classes by `select_per_class`.
* `select_per_class`: embeds each class's generated images, clusters them
  into m clusters and returns, for every centroid, the generated image
  nearest to it (actual generated images, never averages).
* `encode` / `decode`: multi-formation with factor f. `encode` tiles f x f
  images, each downsized to (H/f, W/f), into one stored image; `decode`
  crops the f^2 tiles of every stored image and resizes each back to
  (H, W). Both are linear and differentiable, so distillation optimises the
  stored pixels through `decode`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
  return (jnp.sum(x * x, 1)[:, None] - 2 * x @ c.T
          + jnp.sum(c * c, 1)[None, :])


def kmeans(key: jax.Array, x: jax.Array, num_clusters: int,
           iters: int = 30) -> jax.Array:
  """Centroids (m, d) of the rows of x (n, d); deterministic given key."""
  n = x.shape[0]
  # k-means++ seeding: each next centre drawn with probability ~ D^2.
  first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, n)
  centres = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])

  def seed(i, c):
    d2 = jnp.min(jnp.where(jnp.arange(num_clusters)[None, :] < i,
                           _sq_dists(x, c), jnp.inf), axis=1)
    d2 = jnp.maximum(d2, 0.0)
    p = jnp.where(jnp.sum(d2) > 0, d2 / jnp.sum(d2), 1.0 / n)
    j = jax.random.choice(jax.random.fold_in(key, i), n, p=p)
    return c.at[i].set(x[j])

  centres = jax.lax.fori_loop(1, num_clusters, seed, centres)

  def lloyd(_, c):
    assign = jnp.argmin(_sq_dists(x, c), axis=1)
    onehot = jax.nn.one_hot(assign, num_clusters, dtype=x.dtype)
    counts = onehot.sum(0)
    new = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, new, c)  # keep empty clusters

  return jax.lax.fori_loop(0, iters, lloyd, centres)


def nearest_indices(x: jax.Array, centres: jax.Array) -> jax.Array:
  """Index of the row of x nearest to each centre: (m,)."""
  return jnp.argmin(_sq_dists(x, centres), axis=0)


def select_per_class(key: jax.Array, embed: Callable[[jax.Array], jax.Array],
                     images: jax.Array, num_select: int) -> jax.Array:
  """k-means selection: images (K, n, H, W, C) -> (K, num_select, H, W, C).

  Args:
    key: public key (clustering is deterministic given it).
    embed: x (n, H, W, C) -> (n, d), e.g. an extractor trained on G.
    images: generated images, class-major.
    num_select: clusters per class (IPC * f^2).
  """
  if num_select > images.shape[1]:
    raise ValueError(f"cannot select {num_select} images per class from "
                     f"{images.shape[1]} generated ones")
  keys = jax.random.split(key, images.shape[0])

  def one_class(args):
    k, xc = args
    e = embed(xc)
    idx = nearest_indices(e, kmeans(k, e, num_select))
    return xc[idx]

  # One class at a time: the embeddings of n images are in memory, not of
  # all K n (K = 100 classes of 200 generated images is 20000 at once).
  return jax.lax.map(one_class, (keys, images))


def encode(images: jax.Array, factor: int) -> jax.Array:
  """(..., f*f*m, H, W, C) -> (..., m, H, W, C): tiles f x f downsized
  images into one (row-major tile order)."""
  if factor == 1:
    return images
  *lead, n, h, w, c = images.shape
  f = factor
  if n % (f * f) or h % f or w % f:
    raise ValueError(f"encode: {n} images of {h}x{w} do not tile by {f}")
  small = jax.image.resize(images, (*lead, n, h // f, w // f, c), "linear",
                           antialias=True)
  small = small.reshape(*lead, n // (f * f), f, f, h // f, w // f, c)
  # (..., m, fi, fj, h', w', c) -> (..., m, fi, h', fj, w', c)
  nd = len(lead)
  perm = list(range(nd)) + [nd, nd + 1, nd + 3, nd + 2, nd + 4, nd + 5]
  return small.transpose(perm).reshape(*lead, n // (f * f), h, w, c)


def decode(stored: jax.Array, factor: int) -> jax.Array:
  """(..., m, H, W, C) -> (..., f*f*m, H, W, C): crops the tiles and
  resizes each back to H x W (bilinear); inverse layout of `encode`."""
  if factor == 1:
    return stored
  *lead, m, h, w, c = stored.shape
  f = factor
  nd = len(lead)
  tiles = stored.reshape(*lead, m, f, h // f, f, w // f, c)
  perm = list(range(nd)) + [nd, nd + 1, nd + 3, nd + 2, nd + 4, nd + 5]
  tiles = tiles.transpose(perm).reshape(*lead, m * f * f, h // f, w // f, c)
  return jax.image.resize(tiles, (*lead, m * f * f, h, w, c), "linear")


def default_factor(height: int, width: int) -> int:
  """2 (four tiles) for images of at least 16 px whose sides halve
  exactly, else 1."""
  return 2 if min(height, width) >= 16 and tiles(height, width, 2) else 1


def tiles(height: int, width: int, factor: int) -> bool:
  """Whether f x f tiles of (H / f) x (W / f) pixels fill an H x W image."""
  return height % factor == 0 and width % factor == 0


Embed = Callable[[Any, jax.Array], jax.Array]
