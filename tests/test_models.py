"""The ConvNet: shapes, no BatchNorm, per-example independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax.models import (ConvNet, default_depth, embed_fn,
                               feature_dim, init_params, logits_fn)


@pytest.mark.parametrize("norm", ["batch", "batchnorm"])
def test_batchnorm_is_refused(norm):
  with pytest.raises(ValueError, match="batch statistics mix private"):
    init_params(ConvNet(10, width=8, depth=2, norm=norm), jax.random.key(0),
                (8, 8, 1))


def test_unknown_norm_is_refused():
  with pytest.raises(ValueError, match="unknown norm"):
    init_params(ConvNet(10, width=8, depth=2, norm="layer"),
                jax.random.key(0), (8, 8, 1))


@pytest.mark.parametrize("shape,depth", [((8, 8, 1), 2), ((28, 28, 1), 3),
                                         ((32, 32, 3), 3)])
def test_feature_and_logit_shapes(shape, depth):
  assert default_depth(shape[0]) == depth
  m = ConvNet(7, width=8, depth=depth)
  p = init_params(m, jax.random.key(0), shape)
  x = jnp.ones((2, *shape))
  assert embed_fn(m)(p, x).shape == (2, feature_dim(m, shape))
  assert logits_fn(m)(p, x).shape == (2, 7)


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_each_example_embedding_ignores_the_rest_of_the_batch(norm):
  """Required for per-example clipping to bound sensitivity."""
  m = ConvNet(10, width=8, depth=2, norm=norm)
  p = init_params(m, jax.random.key(0), (8, 8, 1))
  x = jax.random.normal(jax.random.key(1), (5, 8, 8, 1))
  e = embed_fn(m)(p, x)
  x2 = x.at[1:].set(1e3 * jax.random.normal(jax.random.key(2), (4, 8, 8, 1)))
  e2 = embed_fn(m)(p, x2)
  np.testing.assert_allclose(np.asarray(e[0]), np.asarray(e2[0]), rtol=1e-5,
                             atol=1e-6)


def test_different_keys_give_different_random_extractors():
  m = ConvNet(10, width=8, depth=2)
  a = init_params(m, jax.random.key(0), (8, 8, 1))
  b = init_params(m, jax.random.key(1), (8, 8, 1))
  assert not np.allclose(np.asarray(a["conv0"]["kernel"]),
                         np.asarray(b["conv0"]["kernel"]))


@pytest.mark.parametrize("kw,shape,message", [
    ({"width": 0}, (8, 8, 1), "width"), ({"num_classes": 0}, (8, 8, 1),
                                         "num_classes"),
    ({"depth": 5}, (8, 8, 1), "at least 32 pixels")])
def test_a_convnet_that_cannot_be_built_says_why(kw, shape, message):
  args = {"num_classes": 3, "width": 4, "depth": 2, **kw}
  with pytest.raises(ValueError, match=message):
    init_params(ConvNet(**args), jax.random.key(0), shape)
