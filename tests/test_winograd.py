"""Winograd F(2x2, 3x3) convolution: same function as XLA's convolution,
rounding like a direct convolution, rows independent, and the ConvNet
and the per-example gradients agree across conv_impl."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import clipping, models, pergrad, winograd


def _xla(x, k):
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _inputs(shape, seed=0):
  n, h, w, cin, cout = shape
  kx, kk = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, h, w, cin), jnp.float32)
  k = jax.random.normal(kk, (3, 3, cin, cout), jnp.float32) / np.sqrt(9 * cin)
  return x, k


def _conv64(x, k):
  """Direct 'SAME' correlation in float64 numpy (the reference)."""
  x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + w], k[i, j])
             for i in range(3) for j in range(3))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", [(2, 16, 16, 32, 24), (3, 7, 9, 16, 8),
                                   (1, 1, 1, 3, 2), (2, 4, 6, 5, 7),
                                   (1, 2, 3, 16, 4)])
def test_matches_xla_convolution(shape):
  x, k = _inputs(shape)
  got = jax.jit(winograd.conv3x3)(x, k)
  want = _xla(x, k)
  assert got.shape == want.shape
  assert _rel(got, want) < 1e-5


def test_rounding_error_of_a_direct_convolution():
  """Forward and both gradients against float64: Winograd's f32 error is
  within 2x that of XLA's direct convolution (a wrong transform constant,
  or F(4x4, 3x3)'s larger constants, would be orders of magnitude off or
  several times worse)."""
  x, k = _inputs((4, 16, 16, 64, 64), seed=1)
  g = jax.random.normal(jax.random.key(2), (4, 16, 16, 64), jnp.float32)
  y64 = _conv64(x, k)
  # d/dx <conv(x, k), g> = conv(g, k rotated 180 degrees, Cin <-> Cout).
  gx64 = _conv64(g, np.asarray(k)[::-1, ::-1].transpose(0, 1, 3, 2))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  gk64 = np.stack([np.stack([
      np.einsum("nhwc,nhwo->co", xp[:, i:i + 16, j:j + 16], g)
      for j in range(3)]) for i in range(3)])

  def errors(conv):
    y, vjp = jax.vjp(conv, x, k)
    gx, gk = vjp(g)
    return _rel(y, y64), _rel(gx, gx64), _rel(gk, gk64)

  ours, xla = errors(jax.jit(winograd.conv3x3)), errors(jax.jit(_xla))
  for e_ours, e_xla in zip(ours, xla):
    assert e_ours < 2 * e_xla + 1e-7, (ours, xla)
    assert e_ours < 2e-6


def test_grad_of_grad_and_vmap():
  """The custom VJP composes: vmap of grad (per-example gradients, as
  jax-privacy and clipping.clipped_grad_sum take them) and second order."""
  x, k = _inputs((4, 6, 6, 8, 8), seed=7)

  def loss(conv, kk, xi):
    return jnp.sum(jnp.tanh(conv(xi[None], kk)))

  per_ex = {name: jax.vmap(jax.grad(lambda kk, xi, c=c: loss(c, kk, xi)),
                           in_axes=(None, 0))(k, x)
            for name, c in (("w", winograd.conv3x3), ("x", _xla))}
  assert _rel(per_ex["w"], per_ex["x"]) < 1e-5
  hvp = {name: jax.grad(lambda kk, c=c: jnp.sum(jax.grad(
      lambda k2: loss(c, k2, x[0]))(kk) ** 2))(k)
         for name, c in (("w", winograd.conv3x3), ("x", _xla))}
  assert _rel(hvp["w"], hvp["x"]) < 1e-4


def test_rows_do_not_mix():
  """Row 0's output is bitwise the same whatever the other rows hold, as
  per-example clipping needs (sensitivity)."""
  x, k = _inputs((4, 8, 8, 32, 16), seed=3)
  other = x.at[1:].set(100.0 * jax.random.normal(jax.random.key(4),
                                                 x[1:].shape))
  f = jax.jit(winograd.conv3x3)
  np.testing.assert_array_equal(np.asarray(f(x, k)[0]),
                                np.asarray(f(other, k)[0]))
  zeros = x.at[1:].set(0.0)
  np.testing.assert_array_equal(np.asarray(f(x, k)[0]),
                                np.asarray(f(zeros, k)[0]))


def test_dispatch(monkeypatch):
  assert winograd.use_winograd("winograd", 3, (4, 4))
  assert not winograd.use_winograd("xla", 128, (16, 16))
  assert jax.default_backend() == "cpu"
  assert winograd.use_winograd("auto", winograd.MIN_CHANNELS, (8, 8))
  assert not winograd.use_winograd("auto", winograd.MIN_CHANNELS - 1, (8, 8))
  # digits' second layer (4x4 maps): XLA.
  assert not winograd.use_winograd("auto", 128, (4, 4))
  assert winograd.use_winograd("auto", 128, (7, 10))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not winograd.use_winograd("auto", 128, (16, 16))
  with pytest.raises(ValueError, match="conv_impl"):
    winograd.use_winograd("fft", 128, (16, 16))
  with pytest.raises(ValueError, match="kernel"):
    winograd.conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((5, 5, 3, 2)))


def test_conv3x3_module_has_nn_conv_parameters():
  """Same names, shapes and initial values as nn.Conv, so seeds and saved
  parameters carry over from the nn.Conv ConvNet."""
  x = jnp.zeros((1, 8, 8, 5))
  key = jax.random.key(7)
  ours = models.Conv3x3(12).init(key, x)
  flax_conv = nn.Conv(12, (3, 3), padding="SAME").init(key, x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_conv)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_conv)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _convnets(width=32, depth=3):
  return {impl: models.ConvNet(10, width=width, depth=depth, conv_impl=impl)
          for impl in ("xla", "winograd")}


def test_convnet_and_query_agree_across_impls():
  nets = _convnets(depth=2)
  params = models.init_params(nets["xla"], jax.random.key(0), (16, 16, 3))
  p2 = models.init_params(nets["winograd"], jax.random.key(0), (16, 16, 3))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = jax.random.normal(jax.random.key(1), (20, 16, 16, 3))
  y = jnp.arange(20) % 10
  mask = jnp.arange(20) < 17
  feats = {i: models.embed_fn(m)(params, x) for i, m in nets.items()}
  assert _rel(feats["winograd"], feats["xla"]) < 1e-5
  sums = {i: clipping.clipped_class_sums(models.embed_fn(m), params, x, y,
                                         mask, num_classes=10, clip_norm=1.0)
          for i, m in nets.items()}
  assert _rel(sums["winograd"], sums["xla"]) < 1e-5


def test_per_example_gradients_agree_across_impls():
  """pergrad's clipped gradient sum under both algorithms. (On wider
  random ConvNets the ReLUs can make gradients differ at the 1e-3 level
  between ANY two f32 convolution algorithms; this small one measured
  4e-7.)"""
  nets = _convnets(width=16, depth=2)
  params = models.init_params(nets["xla"], jax.random.key(0), (16, 16, 3))
  x = jax.random.normal(jax.random.key(1), (12, 16, 16, 3))
  y = jnp.arange(12) % 10
  mask = jnp.arange(12) < 10
  sums = {i: jax.jit(pergrad.make_grad_sum_fn(m, clip_norm=0.5))(
      params, (x, y), mask) for i, m in nets.items()}
  for name in ("conv0", "conv1", "head"):
    a = sums["winograd"][name]["kernel"]
    b = sums["xla"][name]["kernel"]
    assert _rel(a, b) < 1e-5, name
