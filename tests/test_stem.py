"""stem.conv_norm_relu_pool: the first block computed from patch
statistics equals the layer-by-layer block (values, gradients with respect
to parameters and to images, rows independent), and the ConvNet uses it
only where use_stem says, with unchanged parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import models, stem


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _unfused(x, kernel, conv_bias, scale, norm_bias):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  z = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv_bias
  z = models.instance_norm(z, scale, norm_bias)
  return nn.avg_pool(jax.nn.relu(z), (2, 2), strides=(2, 2))


def _block_inputs(shape, cout=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], shape)
  kernel = jax.random.normal(ks[1], (3, 3, shape[-1], cout)) * 0.4
  conv_bias = jax.random.normal(ks[2], (cout,))
  scale = 1.0 + 0.3 * jax.random.normal(ks[3], (cout,))
  norm_bias = 0.3 * jax.random.normal(ks[4], (cout,))
  return x, kernel, conv_bias, scale, norm_bias


@pytest.mark.parametrize("shape", [(3, 8, 8, 1), (2, 28, 28, 1),
                                   (2, 32, 32, 3), (2, 7, 9, 3)])
def test_block_matches_layer_by_layer(shape):
  args = _block_inputs(shape)
  got = stem.conv_norm_relu_pool(*args)
  want = _unfused(*args)
  assert got.shape == want.shape
  assert _rel(got, want) < 1e-5


def test_gradients_match_for_parameters_and_images():
  """Both the training step (parameters) and distillation (images) take
  gradients through the block."""
  args = _block_inputs((3, 12, 12, 3))
  w = jax.random.normal(jax.random.key(5), (3, 6, 6, 8))

  def loss(f):
    return lambda *a: jnp.sum(f(*a) * w)

  got = jax.grad(loss(stem.conv_norm_relu_pool), argnums=(0, 1, 3, 4))(*args)
  want = jax.grad(loss(_unfused), argnums=(0, 1, 3, 4))(*args)
  for name, a, b in zip(("x", "kernel", "scale", "norm_bias"), got, want):
    assert _rel(a, b) < 1e-4, name
  # the conv bias is removed by the normalisation: no gradient either way
  gb = jax.grad(loss(_unfused), argnums=2)(*args)
  assert float(jnp.max(jnp.abs(gb))) < 1e-4 * float(jnp.max(jnp.abs(want[1])))


@pytest.mark.parametrize("shape,chunk", [((3, 28, 28, 1), 0),
                                         ((2, 29, 27, 3), 0),
                                         ((5, 28, 28, 1), 2),
                                         ((3, 29, 27, 3), 2)])
def test_block_per_example_is_the_block_with_each_rows_parameters(shape,
                                                                  chunk):
  """block_per_example (pergrad's first block, its pixels laid out by
  pool phase) equals the layer-by-layer block with per-example copies of
  the parameters, values and each row's parameter gradients, on even and
  odd maps (an odd map drops its last row or column), in one piece and in
  chunks of 2 rows (the last one padded)."""
  x, kernel, conv_bias, scale, norm_bias = _block_inputs(shape, seed=3)
  n, cout, p = shape[0], kernel.shape[-1], 9 * shape[-1]
  # distinct parameters per row: a chunk mixing rows up would show
  kernel = kernel + 0.1 * jax.random.normal(jax.random.key(4),
                                            (n,) + kernel.shape)
  scale = scale + 0.1 * jax.random.normal(jax.random.key(5), (n, cout))
  norm_bias = norm_bias + 0.1 * jax.random.normal(jax.random.key(6),
                                                  (n, cout))
  pc, cov = stem.patch_stats(x)
  copies = (kernel.reshape(n, p, cout), scale, norm_bias)
  got = stem.block_per_example(pc, cov, *copies, chunk=chunk)
  for i in range(n):
    assert _rel(got[i:i + 1], _unfused(x[i:i + 1], kernel[i], conv_bias,
                                       scale[i], norm_bias[i])) < 1e-5
  w = jax.random.normal(jax.random.key(9), got.shape)
  grads = jax.grad(lambda c: jnp.sum(
      stem.block_per_example(pc, cov, *c, chunk=chunk) * w))(copies)
  for i in range(n):
    want = jax.grad(lambda k, s, b, i=i: jnp.sum(
        _unfused(x[i:i + 1], k, conv_bias, s, b) * w[i]),
                    argnums=(0, 1, 2))(kernel[i], scale[i], norm_bias[i])
    assert _rel(grads[0][i], want[0].reshape(p, cout)) < 1e-4
    assert _rel(grads[1][i], want[1]) < 1e-4
    assert _rel(grads[2][i], want[2]) < 1e-4


def test_a_near_constant_image_keeps_its_accuracy():
  """Large mean, small spread (the statistics come from centred patches)."""
  x, kernel, conv_bias, scale, norm_bias = _block_inputs((2, 16, 16, 3))
  x = 50.0 + 1e-2 * x
  ref = _unfused(x, kernel, conv_bias, scale, norm_bias)
  assert _rel(stem.conv_norm_relu_pool(x, kernel, conv_bias, scale,
                                       norm_bias), ref) < 1e-4


def test_rows_do_not_mix():
  """Row 0's output is bitwise the same whatever the other rows hold, as
  per-example clipping needs."""
  x, *rest = _block_inputs((4, 16, 16, 3))
  f = jax.jit(stem.conv_norm_relu_pool)
  other = x.at[1:].set(100.0 * jax.random.normal(jax.random.key(4),
                                                 x[1:].shape))
  np.testing.assert_array_equal(np.asarray(f(x, *rest)[0]),
                                np.asarray(f(other, *rest)[0]))
  np.testing.assert_array_equal(np.asarray(f(x, *rest)[0]),
                                np.asarray(f(x.at[1:].set(0.0), *rest)[0]))


def test_dispatch(monkeypatch):
  assert stem.use_stem("auto", "instance", (5, 28, 28, 1), jnp.float32)
  assert stem.use_stem("auto", "instance", (5, 32, 32, 3), jnp.float32)
  assert not stem.use_stem("xla", "instance", (5, 28, 28, 1), jnp.float32)
  assert not stem.use_stem("winograd", "instance", (5, 28, 28, 1),
                           jnp.float32)
  assert not stem.use_stem("auto", "group", (5, 28, 28, 1), jnp.float32)
  assert not stem.use_stem("auto", "instance", (5, 28, 28, 16), jnp.float32)
  assert not stem.use_stem("auto", "instance", (5, 8, 8, 1), jnp.float32)
  assert not stem.use_stem("auto", "instance", (5, 16, 16, 3), jnp.float32)
  assert not stem.use_stem("auto", "instance", (5, 28, 28, 1), jnp.bfloat16)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not stem.use_stem("auto", "instance", (5, 28, 28, 1), jnp.float32)
  with pytest.raises(ValueError, match="kernel"):
    stem.conv_norm_relu_pool(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 4)),
                             jnp.zeros(4), jnp.ones(4), jnp.zeros(4))


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_convnet_auto_equals_xla_with_the_same_parameters(shape,
                                                          monkeypatch):
  """The ConvNet with the fused first block ('auto', which uses it from
  MIN_PIXELS on) has the unfused network's parameter tree and initial
  values, and computes its logits and gradients."""
  calls = []
  fused = stem.conv_norm_relu_pool
  monkeypatch.setattr(stem, "conv_norm_relu_pool",
                      lambda *a: calls.append(1) or fused(*a))
  depth = models.default_depth(shape[0])
  nets = {impl: models.ConvNet(10, width=16, depth=depth, conv_impl=impl)
          for impl in ("auto", "xla")}
  params = {impl: models.init_params(m, jax.random.key(3), shape)
            for impl, m in nets.items()}
  assert jax.tree.structure(params["auto"]) == jax.tree.structure(
      params["xla"])
  for a, b in zip(jax.tree.leaves(params["auto"]),
                  jax.tree.leaves(params["xla"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  p = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape),
      params["xla"])
  x = jax.random.normal(jax.random.key(1), (6, *shape))
  y = jnp.arange(6) % 10
  logits = {i: m.apply({"params": p}, x) for i, m in nets.items()}
  assert _rel(logits["auto"], logits["xla"]) < 1e-5
  grads = {i: jax.grad(lambda q, m=m: models.cross_entropy(m, q, x, y))(p)
           for i, m in nets.items()}
  for name in ("conv0", "head"):
    assert _rel(grads["auto"][name]["kernel"],
                grads["xla"][name]["kernel"]) < 1e-4, name
  assert _rel(grads["auto"]["norm0"]["scale"],
              grads["xla"]["norm0"]["scale"]) < 1e-4
  assert bool(calls) == (shape[0] * shape[1] >= stem.MIN_PIXELS)


def test_block_per_example_chunks_fit_their_byte_budget():
  """On CPU a chunk's pre-activations stay within stem.CHUNK_BYTES (one
  row at least): 8 rows at 28x28 x 128, 6 at 32x32 x 128."""
  if jax.default_backend() != "cpu":
    pytest.skip("the chunks are CPU-only (all rows at once elsewhere)")
  assert stem.default_chunk(28 * 28 * 128) == 8
  assert stem.default_chunk(32 * 32 * 128) == 6
  assert stem.default_chunk(512 * 512 * 128) == 1
  for acts in (1, 100, 28 * 28 * 16, 64 * 64 * 128):
    c = stem.default_chunk(acts)
    assert c >= 1 and (c * 4 * acts <= stem.CHUNK_BYTES
                       < (c + 1) * 4 * acts)
