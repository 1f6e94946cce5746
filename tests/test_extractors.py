"""The extractor pools: which parameters each query gets."""

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax import extractors
from dpgeng_jax.models import ConvNet, init_params


def test_fixed_pool_gives_query_q_member_q_mod_p():
  """Query q uses member q mod P: every member in turn, the last one (the
  pool's fully trained checkpoint, the expert's start and the k-means
  embedding) at q = P - 1. Member 0 for every query passed every test."""
  stacked = {"w": jnp.arange(5.0)[:, None] * jnp.ones((5, 3)),
             "b": jnp.arange(5)}
  pool = extractors.fixed_pool(stacked)
  for q in range(12):
    p = pool(jax.random.key(q), q)
    assert int(p["b"]) == q % 5
    np.testing.assert_array_equal(np.asarray(p["w"]), np.full(3, q % 5.0))
  assert extractors.pool_size(stacked) == 5


def test_random_pool_draws_each_query_s_extractor_from_its_key():
  model = ConvNet(3, width=4, depth=1)
  pool = extractors.random_pool(model, (4, 4, 1))
  a, b = pool(jax.random.key(1), 0), pool(jax.random.key(2), 0)
  want = init_params(model, jax.random.key(1), (4, 4, 1))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
