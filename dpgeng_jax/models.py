"""The standard dataset-distillation ConvNet in Flax linen.

`ConvNet` is depth x [3x3 conv(width) -> norm -> ReLU -> 2x2 average pool]
followed by a dense head. `features` returns the flattened embedding before
the head (psi in ALGORITHM.md). Normalisation is per example (instance norm)
or per example in channel groups (group norm); BatchNorm is refused because
batch statistics mix private examples and break per-example clipping.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dpgeng_jax import stem, winograd
from dpgeng_jax.errors import require_int

NORMS = ("instance", "group", "none")


def default_depth(image_size: int) -> int:
  """Number of conv/pool blocks for square images of this size.

  32x32 and 28x28 use 3 (the standard ConvNet-3); 8x8 uses 2, leaving a
  2x2 map; never pools below 2x2.
  """
  return max(1, min(3, int(math.floor(math.log2(image_size))) - 1))


def _check_norm(norm: str) -> None:
  if norm == "batch" or norm == "batchnorm":
    raise ValueError(
        "norm='batch' is refused: batch statistics mix private examples, so "
        "one example would influence every other example's embedding and "
        "per-example clipping would no longer bound the sensitivity. Use "
        "'instance' (default) or 'group'.")
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


class InstanceNorm(nn.Module):
  """Per-example, per-channel normalisation over H and W with a learned
  scale and bias (the parameters of nn.GroupNorm(group_size=1), same names
  and shapes). Two-pass variance, the scale folded into the rsqrt: on
  XLA:CPU this ran the ConvNet forward ~1.2x faster than nn.GroupNorm
  (benchmarks/RESULTS.md)."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias = _norm_params(self, x.shape[-1])
    return instance_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def _norm_params(module: nn.Module, channels: int):
  """InstanceNorm's (scale, bias), created in `module`'s scope."""
  return (module.param("scale", nn.initializers.ones, (channels,),
                       jnp.float32),
          module.param("bias", nn.initializers.zeros, (channels,),
                       jnp.float32))


def _conv_params(module: nn.Module, in_channels: int, features: int):
  """Conv3x3's (kernel, bias), created in `module`'s scope."""
  return (module.param("kernel", nn.initializers.lecun_normal(),
                       (3, 3, in_channels, features), jnp.float32),
          module.param("bias", nn.initializers.zeros_init(), (features,),
                       jnp.float32))


class ConvParams(nn.Module):
  """Conv3x3's parameters alone (the same names, shapes and initial
  values), for a block that computes the convolution fused with what
  follows (stem.conv_norm_relu_pool)."""
  features: int

  @nn.compact
  def __call__(self, in_channels: int):
    return _conv_params(self, in_channels, self.features)


class NormParams(nn.Module):
  """InstanceNorm's parameters alone, as ConvParams."""

  @nn.compact
  def __call__(self, channels: int):
    return _norm_params(self, channels)


def instance_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
                  epsilon: float = 1e-5) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over axes (1, 2), f32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


class Conv3x3(nn.Module):
  """3x3 stride-1 'SAME' convolution with the parameters of
  nn.Conv(features, (3, 3), padding='SAME') (same names, shapes and
  initialisers, so parameter trees and seeds carry over), computed by
  `winograd.conv_3x3_same` with `impl` ('auto': Winograd F(2x2, 3x3) on
  CPU for wide layers on maps of 8x8 or more, XLA's convolution elsewhere;
  winograd.use_winograd)."""
  features: int
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = _conv_params(self, x.shape[-1], self.features)
    y = winograd.conv_3x3_same(x.astype(self.dtype),
                               kernel.astype(self.dtype), self.impl)
    return y + bias.astype(self.dtype)


class ConvNet(nn.Module):
  """ConvNet-D with width W; see module docstring. `conv_impl` picks the
  convolution algorithm (winograd.IMPLS; 'auto' also computes the first
  block from patch statistics on CPU, stem.use_stem); every choice
  computes the same function up to float rounding."""
  num_classes: int
  width: int = 128
  depth: int = 3
  norm: str = "instance"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def setup(self):
    _check_norm(self.norm)

  def _check(self, x) -> None:
    for name in ("num_classes", "width", "depth"):
      require_int(getattr(self, name), f"ConvNet {name}", 1)
    if x.ndim != 4:
      raise ValueError(f"ConvNet takes images (n, H, W, C), got shape "
                       f"{x.shape}")
    if min(x.shape[1:3]) < 2 ** self.depth:
      raise ValueError(f"depth {self.depth} halves {x.shape[1]}x"
                       f"{x.shape[2]} images {self.depth} times; it needs "
                       f"sides of at least {2 ** self.depth} pixels")

  @nn.compact
  def features(self, x: jax.Array) -> jax.Array:
    """Embedding psi(x): (n, H, W, C) -> (n, d)."""
    _check_norm(self.norm)
    self._check(x)
    x = x.astype(self.dtype)
    first = 0
    if stem.use_stem(self.conv_impl, self.norm, x.shape, self.dtype):
      kernel, bias = ConvParams(self.width, name="conv0")(x.shape[-1])
      scale, shift = NormParams(name="norm0")(self.width)
      x = stem.conv_norm_relu_pool(x, kernel, bias, scale, shift, 1e-5)
      first = 1
    for i in range(first, self.depth):
      x = Conv3x3(self.width, impl=self.conv_impl, dtype=self.dtype,
                  name=f"conv{i}")(x)
      if self.norm == "instance":
        x = InstanceNorm(epsilon=1e-5, dtype=self.dtype, name=f"norm{i}")(x)
      elif self.norm == "group":
        x = nn.GroupNorm(num_groups=min(32, self.width), epsilon=1e-5,
                         dtype=self.dtype, name=f"norm{i}")(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return x.reshape((x.shape[0], -1)).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits: (n, H, W, C) -> (n, num_classes)."""
    h = self.features(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h).astype(
        jnp.float32)


def init_params(model: ConvNet, key: jax.Array, image_shape) -> Any:
  """Initialises the full model (features and head) on one dummy image."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return model.init(key, x)["params"]


def embed_fn(model: ConvNet):
  """Returns embed(params, x) -> (n, d), the feature extractor psi."""

  def embed(params, x):
    return model.apply({"params": params}, x, method=ConvNet.features)

  return embed


def logits_fn(model: ConvNet):
  """Returns logits(params, x) -> (n, K)."""

  def logits(params, x):
    return model.apply({"params": params}, x)

  return logits


def cross_entropy(model: ConvNet, params: Any, x: jax.Array,
                  y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of the model's logits on labelled x."""
  logits = model.apply({"params": params}, x)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def feature_dim(model: ConvNet, image_shape) -> int:
  """Length of the embedding for images of `image_shape`."""
  h, w = image_shape[0], image_shape[1]
  for _ in range(model.depth):
    h, w = h // 2, w // 2
  return h * w * model.width
