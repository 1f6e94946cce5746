"""PE's warm start (ours): one kernel-mean release, then a public search.

Private Evolution's histogram votes are noisy per candidate: at epsilon 10
on 144 private images per class the noise std is about 4 votes per bin
over 60 releases (benchmarks/RESULTS.md). A warm start spends a part of
the generator's budget on ONE release that carries much more per unit of
budget, DP-MERF's (`merf.release_class_features`: the per-class sums of
norm-1 random Fourier features of the pixels, L2 sensitivity 1), and
then, as post-processing, moves the API's population towards the noisy
class means in that feature space:

    for each of the warm-start iterations (degree falling from 1 to 0):
      pool = population + API.variation(population, degree)
      population = herd(pool's features, the class's noisy mean, N_s)

`herd` is greedy kernel herding without repeats: it picks, one at a time,
the candidate that brings the running mean of the picked features closest
to the target, so the population it returns covers the class's kernel
mean embedding rather than piling onto its mode. PE's votes then refine
that population. Nothing here reads private data; the release's accounting
is the PE plug-in's (`pe.PrivateEvolution.mechanisms`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax.generators import apis, embeddings


def herd(features: jax.Array, target: jax.Array, n: int) -> jax.Array:
  """Indices (n,) of distinct rows of `features` (m, d), m >= n, picked
  greedily: pick i minimises ||target - mean(features[picked so far + i])||
  over the rows not yet picked. Non-finite rows are never picked before
  finite ones. Pure and jittable (n static)."""
  m = features.shape[0]
  if not 0 <= n <= m:
    raise ValueError(f"herding picks n distinct rows of {m}, got n = {n}")
  f = features.astype(jnp.float32)
  bad = ~jnp.all(jnp.isfinite(f), axis=-1)
  f = jnp.where(bad[:, None], 0.0, f)
  target = target.astype(jnp.float32)

  def pick(i, state):
    total, used, out = state
    mean = (total[None, :] + f) / (i + 1.0)
    cost = jnp.sum((mean - target[None, :]) ** 2, axis=-1)
    cost = jnp.where(bad, jnp.finfo(jnp.float32).max, cost)
    cost = jnp.where(used, jnp.inf, cost)
    j = jnp.argmin(cost)
    return total + f[j], used.at[j].set(True), out.at[i].set(j)

  state = (jnp.zeros(f.shape[1], jnp.float32), jnp.zeros(m, bool),
           jnp.zeros(n, jnp.int32))
  return jax.lax.fori_loop(0, n, pick, state)[2]


@functools.partial(jax.jit, static_argnums=2)
def herd_classes(features: jax.Array, targets: jax.Array,
                 n: int) -> jax.Array:
  """`herd` per class: features (K, m, d), targets (K, d) -> (K, n)."""
  return jax.vmap(herd, in_axes=(0, 0, None))(features, targets, n)


def _joined(a: apis.Samples, b: apis.Samples) -> apis.Samples:
  """a's samples then b's (their API state too, key by key)."""
  if (a.state is None) != (b.state is None) or (
      a.state is not None and set(a.state) != set(b.state)):
    raise ValueError("the image API's variation returned another state "
                     "than its random's")
  state = None if a.state is None else {
      k: np.concatenate([np.asarray(a.state[k]), np.asarray(b.state[k])])
      for k in a.state}
  return apis.Samples(np.concatenate([a.images, b.images]),
                      np.concatenate([a.labels, b.labels]), state)


def warm_start(api, feature_fn, targets, start: apis.Samples, *,
               key: jax.Array, iterations: int, check, progress=None
               ) -> apis.Samples:
  """The population after `iterations` herding steps (module docstring).

  start: the API's first population, class-major with N_s per class;
  feature_fn: pixels [0, 1] -> features (jittable); targets (K, d): the
  noisy class means in that space (post-processing of the release);
  check(samples, labels, what): the caller's check of an API answer.
  Returns N_s per class, class-major, each class in herding order (its
  first n are the best n-subset the greedy search found)."""
  num_classes = targets.shape[0]
  pop = len(start.labels) // num_classes
  samples = start
  for t, degree in enumerate(apis.degrees(iterations)):
    kids = check(api.variation(jax.random.fold_in(key, t), samples, degree),
                 samples.labels, "the image API's variation")
    pool = _joined(samples, kids)
    order = np.argsort(pool.labels, kind="stable")  # class-major, 2 N_s each
    pool = pool.take(order)
    feats = embeddings.apply(feature_fn, jnp.asarray(pool.images)).reshape(
        num_classes, 2 * pop, -1)
    pick = np.asarray(herd_classes(feats, jnp.asarray(targets), pop))
    samples = pool.take((pick + 2 * pop * np.arange(num_classes)[:, None]
                         ).reshape(-1))
    if progress is not None:
      progress(1)
  return samples
