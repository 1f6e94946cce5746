"""Differentiable siamese augmentation (DSA) with explicitly sampled parameters.

DSA (Zhao & Bilen, ICML 2021) augments the real and the synthetic side of a
matching query with the *same* random transformation and differentiates
through it into the synthetic pixels. Here the randomness is explicit: draw an
`AugmentParams` with `sample_params(key, ...)`, then `apply(x, params)` to any
number of batches. `apply` is a deterministic function of `(x, params)` that is
linear in `x` apart from the colour offsets, so its gradient w.r.t. `x` is
exact.

Strategy strings join components with "_" (DSA spelling):

  color   brightness, saturation and contrast jitter
  crop    translation by up to `CROP_PAD_RATIO` of the size, zero padding
  cutout  a zeroed square of side `CUTOUT_RATIO` of the size
  flip    horizontal flip with probability `FLIP_PROB`
  scale   independent x / y zoom in [1 / SCALE_RATIO, SCALE_RATIO]
  rotate  rotation by up to `ROTATE_DEGREES`

"none" or "" is the identity. Like the DSA reference (its default
`aug_mode='S'`), `mode="single"` (the default) applies ONE component of the
strategy per draw, chosen uniformly; `mode="all"` composes all of them. The
choice is made in `sample_params`: components not chosen hold identity values,
so `apply` never needs to know the mode.

`apply` runs colour jitter, then one bilinear resampling by a 2x3 affine map
that combines crop, flip, scale and rotate (zero outside the image), then the
cutout mask. Crop shifts are rounded to whole pixels, as in DSA, so a pure
crop or flip is an exact pixel permutation.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dpgeng_jax.errors import ConfigError

COMPONENTS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("single", "all")
DEFAULT_MODE = "single"

# DSA default magnitudes (ParamDiffAug of the DC/DSA/DM reference code).
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
FLIP_PROB = 0.5
SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0
CROP_PAD_RATIO = 0.125
CUTOUT_RATIO = 0.5

_GEOMETRIC = ("crop", "flip", "scale", "rotate")


class AugmentParams(NamedTuple):
  """One explicit draw of DSA parameters.

  Every field is a float32 array of the same shape, `batch_shape`: `()` for
  one transformation shared by a whole batch (the siamese use), `(n,)` for one
  per image.

  Attributes:
    brightness: added to every pixel; DSA draws U(-0.5, 0.5). Identity 0.
    saturation: factor on the deviation from the per-pixel channel mean;
      DSA draws U(0, 2). Identity 1.
    contrast: factor on the deviation from the image mean; DSA draws
      U(0.5, 1.5). Identity 1.
    flip: 1.0 flips horizontally, 0.0 does not. Identity 0.
    scale_x: sampling-grid zoom along the width (> 1 shrinks the content);
      U(1/1.2, 1.2). Identity 1.
    scale_y: the same along the height.
    rotate: rotation in radians, U(-15, 15) degrees. Identity 0.
    translate_x: shift as a fraction of the width, U(-0.125, 0.125), rounded
      to whole pixels when applied. Identity 0.
    translate_y: the same along the height.
    cutout_size: side of the zeroed square as a fraction of the image side;
      0.5 when cutout is drawn, 0 (no cutout) for identity.
    cutout_x: centre of the square as a fraction of the width, U(0, 1).
    cutout_y: the same along the height.
  """
  brightness: jax.Array
  saturation: jax.Array
  contrast: jax.Array
  flip: jax.Array
  scale_x: jax.Array
  scale_y: jax.Array
  rotate: jax.Array
  translate_x: jax.Array
  translate_y: jax.Array
  cutout_size: jax.Array
  cutout_x: jax.Array
  cutout_y: jax.Array


_IDENTITY = AugmentParams(
    brightness=0.0, saturation=1.0, contrast=1.0, flip=0.0, scale_x=1.0,
    scale_y=1.0, rotate=0.0, translate_x=0.0, translate_y=0.0,
    cutout_size=0.0, cutout_x=0.5, cutout_y=0.5)

_FIELDS_OF = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("translate_x", "translate_y"),
    "cutout": ("cutout_size", "cutout_x", "cutout_y"),
    "flip": ("flip",),
    "scale": ("scale_x", "scale_y"),
    "rotate": ("rotate",),
}


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """Splits a strategy string into its components, in the given order.

  Args:
    strategy: components joined by "_", e.g. "color_crop_flip"; "none" or ""
      means no augmentation.

  Returns:
    The components, without duplicates.

  Raises:
    ConfigError: (a ValueError) naming an unknown component.
  """
  if not strategy or strategy.lower() == "none":
    return ()
  parts = []
  for part in strategy.split("_"):
    if part not in COMPONENTS:
      raise ConfigError(
          f"unknown augmentation component {part!r} in strategy {strategy!r};"
          f" known components: {', '.join(COMPONENTS)}")
    if part not in parts:
      parts.append(part)
  return tuple(parts)


def identity_params(batch_shape: Sequence[int] = ()) -> AugmentParams:
  """Parameters under which `apply` returns its input unchanged."""
  return AugmentParams(*(jnp.full(tuple(batch_shape), v, jnp.float32)
                         for v in _IDENTITY))


def sample_params(key: jax.Array, strategy: str = DEFAULT_STRATEGY,
                  batch_shape: Sequence[int] = (),
                  mode: str = DEFAULT_MODE) -> AugmentParams:
  """Draws DSA parameters.

  One uniform draw of shape (12, *batch_shape) feeds all fields, whatever the
  strategy, so the same key gives the same magnitudes under any strategy.

  Args:
    key: a PRNG key (public randomness: augmentation is not a privacy
      mechanism).
    strategy: which components may be non-identity.
    batch_shape: `()` for one shared draw, `(n,)` for one per image.
    mode: "single" picks one component of the strategy per draw (DSA's
      default; with `batch_shape=(n,)` each image picks its own, where DSA
      picks one per batch); "all" draws every component of the strategy.

  Returns:
    AugmentParams with fields of shape `batch_shape`; components outside the
    strategy (or not picked) hold identity values.

  Raises:
    ConfigError: for an unknown component or mode.
  """
  components = parse_strategy(strategy)
  if mode not in MODES:
    raise ConfigError(f"unknown augmentation mode {mode!r}; use one of {MODES}")
  uniform = _uniform(key, tuple(batch_shape))
  return _params_from_uniform(uniform, components, mode)


@functools.partial(jax.jit, static_argnums=1)
def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """All the randomness of one draw: U[0, 1) of shape (12, *shape)."""
  return jax.random.uniform(key, (12,) + shape, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _params_from_uniform(uniform: jax.Array, components: tuple[str, ...],
                         mode: str) -> AugmentParams:
  """Maps the uniforms of `_uniform` to parameters (jitted per strategy)."""
  shape = uniform.shape[1:]

  def u(i: int, lo: float = 0.0, hi: float = 1.0) -> jax.Array:
    return lo + (hi - lo) * uniform[i]

  rot = math.radians(ROTATE_DEGREES)
  drawn = AugmentParams(
      brightness=u(0, -0.5 * BRIGHTNESS, 0.5 * BRIGHTNESS),
      saturation=u(1, 0.0, SATURATION),
      contrast=u(2, CONTRAST, CONTRAST + 1.0),
      flip=(u(3) < FLIP_PROB).astype(jnp.float32),
      scale_x=u(4, 1.0 / SCALE_RATIO, SCALE_RATIO),
      scale_y=u(5, 1.0 / SCALE_RATIO, SCALE_RATIO),
      rotate=u(6, -rot, rot),
      translate_x=u(7, -CROP_PAD_RATIO, CROP_PAD_RATIO),
      translate_y=u(8, -CROP_PAD_RATIO, CROP_PAD_RATIO),
      cutout_size=jnp.full(shape, CUTOUT_RATIO, jnp.float32),
      cutout_x=u(9),
      cutout_y=u(10))
  out = identity_params(shape)._asdict()
  if components:
    if mode == "single":
      pick = jnp.minimum(jnp.floor(u(11) * len(components)),
                         len(components) - 1)
    for j, comp in enumerate(components):
      for name in _FIELDS_OF[comp]:
        value = getattr(drawn, name)
        out[name] = value if mode == "all" else jnp.where(pick == j, value,
                                                          out[name])
  return AugmentParams(**out)


def _restrict(params: AugmentParams,
              components: tuple[str, ...]) -> AugmentParams:
  """Replaces the fields of components outside `components` by identity."""
  fields = params._asdict()
  for comp in COMPONENTS:
    if comp not in components:
      for name in _FIELDS_OF[comp]:
        fields[name] = jnp.full_like(fields[name], getattr(_IDENTITY, name))
  return AugmentParams(**fields)


def _per_image(p: jax.Array) -> jax.Array:
  """Broadcasts a field of shape () or (n,) against images (n, H, W, C)."""
  return jnp.reshape(p, jnp.shape(p) + (1, 1, 1))


def _color(x: jax.Array, p: AugmentParams) -> jax.Array:
  """DSA brightness, then saturation, then contrast (exact at identity)."""
  channels = x.shape[-1]
  x = x + _per_image(p.brightness)
  if channels > 1:  # saturation is a no-op on one channel
    s = _per_image(p.saturation)
    # A sum of slices: XLA:CPU reduces a size-3 minor axis ~6x slower.
    mean = sum(x[..., i:i + 1] for i in range(channels)) / channels
    x = s * x + (1.0 - s) * mean
  c = _per_image(p.contrast)
  mean = jnp.mean(x.reshape(x.shape[0], -1), axis=1).reshape(-1, 1, 1, 1)
  return c * x + (1.0 - c) * mean


def _sampling_taps(p: AugmentParams, height: int,
                   width: int) -> tuple[jax.Array, jax.Array]:
  """Bilinear taps of the affine map of one image's (scalar) parameters.

  Output pixel (i, j) reads input position A (q - c) + c + t with q = (j, i),
  c the image centre, A = flip @ scale @ rotation and t the whole-pixel crop
  shift: DSA's order crop, flip, scale, rotate composed into one map.

  Returns:
    Flat input indices (4, H*W) int32 and weights (4, H*W) float32; taps
    outside the image have weight 0 (zero padding).
  """
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  v, u = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                      jnp.arange(width, dtype=jnp.float32) - cx, indexing="ij")
  u, v = u.reshape(-1), v.reshape(-1)
  cos, sin = jnp.cos(p.rotate), jnp.sin(p.rotate)
  sign = 1.0 - 2.0 * p.flip
  src_x = (sign * p.scale_x * (cos * u - sin * v) + cx
           + jnp.round(p.translate_x * width))
  src_y = (p.scale_y * (sin * u + cos * v) + cy
           + jnp.round(p.translate_y * height))
  x0, y0 = jnp.floor(src_x), jnp.floor(src_y)
  fx, fy = src_x - x0, src_y - y0
  indices, weights = [], []
  for dy, wy in ((0.0, 1.0 - fy), (1.0, fy)):
    for dx, wx in ((0.0, 1.0 - fx), (1.0, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
      xi = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
      yi = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
      indices.append(yi * width + xi)
      weights.append(jnp.where(inside, wy * wx, 0.0))
  return jnp.stack(indices), jnp.stack(weights)


def _resample_shared(x: jax.Array, p: AugmentParams) -> jax.Array:
  """Resamples all images (n, H, W, C) by the affine map of scalar `p`.

  Pixels are gathered as rows of n * C values; measured on XLA:CPU this is
  the fastest layout for the gradient w.r.t. `x` (one dense scatter-add).
  """
  n, height, width, channels = x.shape
  idx, w = _sampling_taps(p, height, width)
  rows = x.transpose(1, 2, 0, 3).reshape(height * width, n * channels)
  out = jnp.einsum("kp,kpq->pq", w.astype(x.dtype), rows[idx])
  return out.reshape(height, width, n, channels).transpose(2, 0, 1, 3)


def _resample_one(image: jax.Array, p: AugmentParams) -> jax.Array:
  """Resamples one image (H, W, C) by the affine map of scalar `p`."""
  height, width, channels = image.shape
  idx, w = _sampling_taps(p, height, width)
  w = w.astype(image.dtype)[..., None]
  flat = image.reshape(height * width, channels)
  # Four separate gathers fuse with the weighted sum (faster on XLA:CPU than
  # one stacked gather).
  out = sum(w[k] * flat[idx[k]] for k in range(4))
  return out.reshape(height, width, channels)


def _cutout_mask(p: AugmentParams, height: int, width: int) -> jax.Array:
  """(..., H, W, 1) mask: 0 inside the cutout square, 1 elsewhere."""
  def outside(centre, size):
    pos = jnp.arange(size, dtype=jnp.float32) + 0.5
    half = jnp.floor(p.cutout_size[..., None] * size + 0.5) / 2.0
    return jnp.abs(pos - centre[..., None] * size) >= half

  rows = outside(p.cutout_y, height)
  cols = outside(p.cutout_x, width)
  keep = rows[..., :, None] | cols[..., None, :]
  return keep.astype(jnp.float32)[..., None]


def apply(x: jax.Array, params: AugmentParams,
          strategy: str = DEFAULT_STRATEGY) -> jax.Array:
  """Applies the transformation described by `params` to images `x`.

  Pure and jittable (and jitted, with `strategy` static). Components outside
  `strategy` are skipped whatever their parameters hold.

  Args:
    x: float images (n, H, W, C), any normalisation.
    params: fields of shape () apply the same transformation to every image
      (siamese use: pass the same params for the real and the synthetic
      batch); fields of shape (n,) give image i the parameters i.
    strategy: components to apply (see module docstring).

  Returns:
    Augmented images of the shape and dtype of `x`.

  Raises:
    ConfigError: for an unknown strategy component.
    ValueError: if `x` is not 4-D or the params' batch shape does not fit.
  """
  components = parse_strategy(strategy)
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"expected images of shape (n, H, W, C), got {x.shape}")
  if not components:
    return x
  params = AugmentParams(*(jnp.asarray(f, jnp.float32) for f in params))
  batch_shape = params.flip.shape
  if batch_shape not in ((), x.shape[:1]):
    raise ValueError(f"params batch shape {batch_shape} fits neither one "
                     f"shared draw () nor {x.shape[0]} images")
  return _apply(x, params, components)


@functools.partial(jax.jit, static_argnums=2)
def _apply(x: jax.Array, params: AugmentParams,
           components: tuple[str, ...]) -> jax.Array:
  """`apply` after validation (jitted: one compile per shape and strategy)."""
  params = _restrict(params, components)
  dtype = x.dtype
  if "color" in components:
    x = _color(x, params)
  if any(c in components for c in _GEOMETRIC):
    if params.flip.shape:
      x = jax.vmap(_resample_one)(x, params)
    else:
      x = _resample_shared(x, params)
  if "cutout" in components:
    x = x * _cutout_mask(params, x.shape[1], x.shape[2]).astype(x.dtype)
  return x.astype(dtype)


def augment(key: jax.Array, x: jax.Array, strategy: str = DEFAULT_STRATEGY,
            per_image: bool = False, mode: str = DEFAULT_MODE) -> jax.Array:
  """Samples parameters and applies them: `apply(x, sample_params(...))`.

  Args:
    key: PRNG key for the parameters.
    x: images (n, H, W, C).
    strategy: components to use.
    per_image: one draw per image instead of one shared by the batch.
    mode: "single" (one component per draw, DSA default) or "all".

  Returns:
    Augmented images of the shape and dtype of `x`.
  """
  batch_shape = (jnp.shape(x)[0],) if per_image else ()
  return apply(x, sample_params(key, strategy, batch_shape, mode), strategy)
