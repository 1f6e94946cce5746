"""PE's warm start: kernel herding (post-processing) and the population
it moves toward the released class means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax.generators import herding, pe
from test_pe import _toy_api  # uniform-noise images, blended variations


def _pool(seed=0, m=40, d=6):
  return np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)


def test_herding_finds_the_subset_whose_mean_is_the_target():
  """Rows 0..4 around the target, the rest far away: the 5 picks are
  those rows, each once."""
  rng = np.random.default_rng(1)
  near = rng.normal(0.0, 0.1, (5, 3))
  far = rng.normal(0.0, 0.1, (30, 3)) + 10.0
  f = jnp.asarray(np.concatenate([near, far]), jnp.float32)
  pick = np.asarray(herding.herd(f, jnp.asarray(near.mean(0)), 5))
  assert sorted(pick.tolist()) == [0, 1, 2, 3, 4]


def test_herded_mean_is_closer_to_the_target_than_random_subsets():
  f = _pool()
  target = _pool(seed=2, m=200).mean(0) * 0.5
  n = 10
  pick = np.asarray(herding.herd(jnp.asarray(f), jnp.asarray(target), n))
  assert len(set(pick.tolist())) == n  # distinct
  herded = np.linalg.norm(f[pick].mean(0) - target)
  rng = np.random.default_rng(3)
  rand = [np.linalg.norm(f[rng.choice(len(f), n, replace=False)].mean(0)
                         - target) for _ in range(200)]
  assert herded < min(rand)


def test_herding_jit_vmap_and_eager_agree():
  f = np.stack([_pool(seed=s) for s in range(3)])
  t = f[:, :7].mean(1)
  batched = np.asarray(herding.herd_classes(jnp.asarray(f), jnp.asarray(t),
                                            7))
  for c in range(3):
    eager = np.asarray(herding.herd(jnp.asarray(f[c]), jnp.asarray(t[c]),
                                    7))
    np.testing.assert_array_equal(batched[c], eager)


def test_herding_refuses_more_picks_than_rows_and_skips_nonfinite_rows():
  f = _pool(m=6)
  with pytest.raises(ValueError, match="distinct rows"):
    herding.herd(jnp.asarray(f), jnp.zeros(6), 7)
  f[2] = np.nan
  f[4, 1] = np.inf
  pick = np.asarray(herding.herd(jnp.asarray(f), jnp.asarray(f[0] * 0), 4))
  assert set(pick.tolist()) == {0, 1, 3, 5}
  pick = np.asarray(herding.herd(jnp.asarray(f), jnp.zeros(6), 6))
  assert set(pick[4:].tolist()) == {2, 4}  # only once nothing else is left


def test_the_warm_start_moves_the_population_toward_the_targets():
  """Targets: the mean image of a dark class and of a bright one; the
  population keeps N_s per class, class-major, and its class means move
  toward the targets as the iterations grow."""
  api = _toy_api()
  pop = 12
  labels = np.repeat(np.arange(2, dtype=np.int32), pop)
  start = api.random(jax.random.key(0), labels)
  flat = lambda x: x.reshape(x.shape[0], -1)
  targets = np.stack([np.full(16, 0.2), np.full(16, 0.8)]).astype(
      np.float32)

  def gap(s):
    means = s.images.reshape(2, pop, -1).mean(1)
    return float(np.abs(means - targets).mean())

  check = lambda out, lab, what: pe._checked(out, lab, (4, 4, 1), what)
  gaps = [gap(start)]
  for it in (2, 8):
    out = herding.warm_start(api, flat, jnp.asarray(targets), start,
                             key=jax.random.key(1), iterations=it,
                             check=check)
    np.testing.assert_array_equal(out.labels, labels)
    assert out.images.shape == (2 * pop, 4, 4, 1)
    gaps.append(gap(out))
  assert gaps[2] < gaps[1] < gaps[0] and gaps[2] < 0.7 * gaps[0], gaps


def test_the_warm_start_keeps_the_text_api_s_state_with_its_images():
  """The text API varies each image's rendering parameters (its state):
  the herded population's state must be its images' own, so a variation
  of it starts from those images: rendering that state gives them."""
  from dpgeng_jax.generators.apis.text import TextAPI
  api = TextAPI((8, 8, 1), 2)
  labels = np.repeat(np.arange(2, dtype=np.int32), 5)
  start = api.random(jax.random.key(0), labels)
  check = lambda out, lab, what: pe._checked(out, lab, (8, 8, 1), what)
  out = herding.warm_start(api, lambda x: x.reshape(x.shape[0], -1),
                           jnp.full((2, 64), 0.3), start,
                           key=jax.random.key(1), iterations=2, check=check)
  assert set(out.state) == set(start.state)
  np.testing.assert_allclose(api.render(out.labels, out.state), out.images,
                             atol=1e-6)


def test_herding_s_first_picks_are_the_shorter_herd():
  """Greedy picks do not look ahead: the first k of n picks are the k
  picks, so a warm start's first per_class images are its best
  per_class (what --pe-iterations 0 returns)."""
  f = jnp.asarray(_pool(seed=4, m=50))
  t = jnp.asarray(_pool(seed=5, m=30).mean(0))
  full = np.asarray(herding.herd(f, t, 30))
  for k in (1, 7, 20):
    np.testing.assert_array_equal(np.asarray(herding.herd(f, t, k)),
                                  full[:k])
