"""DP-MERF: a DP generator with no public prior (plug-in `merf`).

The private step (mechanism M_G) is ONE Gaussian release:

    R = sum_i onehot(y_i) (x) v(x_i)  +  N(0, sigma_G^2 I),   R in R^{K x (2D+1)}

with v(x) = [cos(W x), sin(W x)] / sqrt(2 D)  concatenated with 1/sqrt(2):
random Fourier features of the (flattened, normalised) pixels with a fixed
public W, and a constant coordinate that carries the class count. Every
v(x) has L2 norm exactly 1 and one example touches one class row, so the
release has L2 sensitivity 1 under add/remove of one example: the event is
GaussianDpEvent(sigma_G). The sums are exact: each v(x_i), scaled by
CLIP_MARGIN (its float32 norm is 1 up to a few ulps), is quantised toward
zero to fixed point and summed as int32 (`clipping.fixed_point_class_sums`),
so removing an example moves them by its own quantised vector, norm <= 1;
float32 sums moved by 1.0000859 at 30000 rows of a class. The noisy class
counts used for normalisation are read from the constant coordinate of
the same release (nothing else about the private data is used).

Everything after the release is post-processing: a class-conditional
generator (Flax MLP) is trained with optax so that the mean features of its
samples match the released noisy class means, then sampled as often as
needed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dpgeng_jax import accounting, noise
from dpgeng_jax.clipping import (CLIP_MARGIN, fixed_point_bits,
                                 fixed_point_class_sums, fixed_point_scale)
from dpgeng_jax.generators import Output, check_mechanisms


class FeatureMap(NamedTuple):
  """Random Fourier features with norm exactly 1 (public parameters; a
  pytree, so it can be passed to jitted functions)."""
  w: jax.Array  # (input_dim, D)

  @classmethod
  def create(cls, key: jax.Array, input_dim: int, num_features: int,
             bandwidth: float | None = None) -> "FeatureMap":
    """W ~ N(0, 1 / bandwidth^2): features of a Gaussian kernel with this
    length scale; default bandwidth sqrt(input_dim) (images normalised to
    about unit variance per pixel)."""
    if bandwidth is not None and (
        isinstance(bandwidth, bool)
        or not isinstance(bandwidth, (int, float, np.integer, np.floating))
        or not 0 < bandwidth < math.inf):
      raise ValueError(f"bandwidth must be a finite number > 0 (None: "
                       f"sqrt(input_dim)), got {bandwidth!r}")
    bw = math.sqrt(input_dim) if bandwidth is None else float(bandwidth)
    w = jax.random.normal(key, (input_dim, num_features)) / bw
    return cls(w)

  @property
  def dim(self) -> int:
    """Length of `bounded` vectors: 2D + 1."""
    return 2 * self.w.shape[1] + 1

  def rff(self, x: jax.Array) -> jax.Array:
    """(n, H, W, C) -> (n, 2D) with norm exactly 1/sqrt(2) * sqrt(2) = 1."""
    proj = x.reshape(x.shape[0], -1).astype(jnp.float32) @ self.w
    d = self.w.shape[1]
    return jnp.concatenate([jnp.cos(proj), jnp.sin(proj)], -1) / math.sqrt(d)

  def bounded(self, x: jax.Array) -> jax.Array:
    """v(x) = [rff(x) / sqrt 2, 1 / sqrt 2]: L2 norm exactly 1."""
    f = self.rff(x) / math.sqrt(2.0)
    ones = jnp.full((x.shape[0], 1), 1.0 / math.sqrt(2.0), jnp.float32)
    return jnp.concatenate([f, ones], -1)


GENERATOR_SENSITIVITY = 1.0  # L2, add/remove one example (module docstring)


def release_class_features(feature_map: FeatureMap, x: jax.Array,
                           y: jax.Array, mask: jax.Array, *,
                           num_classes: int, noise_multiplier: float,
                           noise_key: jax.Array, mesh=None) -> jax.Array:
  """M_G: per-class sums of v(x) plus N(0, sigma_G^2) per coordinate.

  x: (n, H, W, C) normalised private images, y labels, mask 1 for real rows.
  With a `mesh` the rows are split over its devices and the local sums
  added with psum before the noise (added once). Returns the noisy
  (K, 2D + 1) sums.
  """
  # Fixed point: float32 sums round in a way that depends on the whole
  # sum (removing one of 30000 rows moved them by 1.0000859); int32 sums
  # of rows quantised toward zero move by that row alone, norm <= 1. The
  # features' float32 norm (1 up to a few ulps) is scaled by CLIP_MARGIN.
  bits = fixed_point_bits(x.shape[0], 1.0)

  def sums_of(fmap, xs, ys, ms):
    return fixed_point_class_sums(fmap.bounded(xs) * CLIP_MARGIN, ys, ms,
                                  num_classes, bits)

  if mesh is None:
    sums = sums_of(feature_map, x, y, mask)
  else:
    from dpgeng_jax import parallel  # parallel imports mechanisms
    # bits above are sized for all of x's rows, every device's together.
    sums = parallel.sharded_sum(sums_of, mesh, integer_sums_fit=True)(
        feature_map, x, y, mask)
  return noise.add_gaussian_noise(
      noise_key, sums, noise_multiplier * GENERATOR_SENSITIVITY,
      scale=fixed_point_scale(bits))


def count_stddev(noise_multiplier: float) -> float:
  """Std of the noisy class counts read from a release (the constant
  coordinate 1/sqrt(2) per example, noise sigma_G, scaled by sqrt(2))."""
  return math.sqrt(2.0) * noise_multiplier * GENERATOR_SENSITIVITY


def class_means_from_release(release: jax.Array, min_count: float = 1.0):
  """Post-processing: (noisy rff class means (K, 2D), noisy counts (K,))."""
  counts = release[:, -1] * math.sqrt(2.0)
  safe = jnp.maximum(counts, min_count)
  means = release[:, :-1] * math.sqrt(2.0) / safe[:, None]
  return means, counts


class Generator(nn.Module):
  """Class-conditional MLP generator: (z, label) -> image in [0, 1]."""
  num_classes: int
  image_shape: tuple
  hidden: int = 512

  @nn.compact
  def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.concatenate([z, jax.nn.one_hot(y, self.num_classes)], -1)
    h = nn.relu(nn.Dense(self.hidden // 2)(h))
    h = nn.relu(nn.Dense(self.hidden)(h))
    h = nn.Dense(int(np.prod(self.image_shape)))(h)
    return jax.nn.sigmoid(h).reshape((z.shape[0], *self.image_shape))


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Public hyperparameters of the built-in generator."""
  num_features: int = 500
  latent_dim: int = 16
  hidden: int = 512
  steps: int = 2000
  batch_per_class: int = 64
  learning_rate: float = 1e-3


def train_generator(key: jax.Array, feature_map: FeatureMap,
                    target_means: jax.Array, *, image_shape, normalize,
                    cfg: GeneratorConfig, progress=None):
  """Fits the generator to the released class means (post-processing).

  `normalize` maps [0, 1] pixels to the space the features were computed
  in. Returns (generator module, params).
  """
  k = target_means.shape[0]
  gen = Generator(k, tuple(image_shape), cfg.hidden)
  k_init, k_train = jax.random.split(key)
  params = gen.init(k_init, jnp.zeros((1, cfg.latent_dim)),
                    jnp.zeros((1,), jnp.int32))["params"]
  opt = optax.adam(cfg.learning_rate)
  opt_state = opt.init(params)
  y = jnp.repeat(jnp.arange(k, dtype=jnp.int32), cfg.batch_per_class)

  def loss_fn(p, z):
    x = normalize(gen.apply({"params": p}, z, y))
    f = feature_map.rff(x).reshape(k, cfg.batch_per_class, -1).mean(1)
    return jnp.sum(jnp.square(f - target_means))

  @jax.jit
  def step(p, s, i):
    z = jax.random.normal(jax.random.fold_in(k_train, i),
                          (k * cfg.batch_per_class, cfg.latent_dim))
    loss, g = jax.value_and_grad(loss_fn)(p, z)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  for i in range(cfg.steps):
    params, opt_state, _ = step(params, opt_state, i)
    if progress is not None:
      progress(1)
  return gen, params


def sample(gen: Generator, params: Any, key: jax.Array, per_class: int,
           latent_dim: int):
  """per_class images of every class: (K * per_class, H, W, C) in [0, 1],
  labels class-major."""
  k = gen.num_classes
  y = jnp.repeat(jnp.arange(k, dtype=jnp.int32), per_class)
  z = jax.random.normal(key, (k * per_class, latent_dim))
  return np.asarray(gen.apply({"params": params}, z, y)), np.asarray(y)


# ---------------------------------------------------------------------------
# The plug-in.


# The checkpointed release (one, with a leading axis) and the settings it
# was drawn with (generators.Context.checkpoint).
RELEASE, SETUP = "release", "setup"


def _saved_release(saved, setup: np.ndarray):
  """The release an earlier attempt of the run checkpointed, if any and
  drawn with these settings (refused otherwise: another release's)."""
  if not saved or RELEASE not in saved:
    return None
  r = np.asarray(saved[RELEASE])
  if str(saved.get(SETUP)) != str(setup) or r.ndim != 3 or r.shape[0] != 1 \
      or not np.all(np.isfinite(r)):
    raise ValueError(
        f"the saved DP-MERF release of this run (shape {r.shape}, drawn with "
        f"{saved.get(SETUP)}) does not fit the settings now ({setup}): "
        "resume with the settings that drew it, or start a new run "
        "(--overwrite; that release is spent)")
  return jnp.asarray(r[0])


@dataclasses.dataclass
class Merf:
  """DP-MERF as a generator plug-in: one Gaussian release of the class
  sums of norm-1 random features, a generator fitted to it."""
  num_features: int = 500
  steps: int = 2000
  name = "merf"
  declared = None
  nonprivate_reason = None
  reads_private = True

  @classmethod
  def from_config(cls, cfg) -> "Merf":
    return cls(cfg.generator_features, cfg.generator_steps)

  def mechanisms(self) -> tuple:
    return (accounting.Mechanism("generator", 0.0, 1.0, 1,
                                 sensitivity="1"),)

  def fixed(self) -> tuple:
    return ()

  def generate(self, ctx, secret, mechanisms):
    (mech,) = check_mechanisms(self, mechanisms)
    k_map, k_fit, k_sample = jax.random.split(ctx.key, 3)
    fmap = FeatureMap.create(k_map, int(np.prod(ctx.image_shape)),
                             self.num_features)
    setup = np.asarray(json.dumps({
        "noise_multiplier": mech.noise_multiplier,
        "num_features": self.num_features,
        "image_shape": list(ctx.image_shape),
        "num_classes": ctx.num_classes}, sort_keys=True))
    release = _saved_release(ctx.saved, setup)
    if release is None:
      release = jax.jit(functools.partial(
          release_class_features, num_classes=ctx.num_classes,
          noise_multiplier=mech.noise_multiplier, mesh=ctx.mesh))(
              fmap, ctx.x_private, ctx.y_private, ctx.mask, noise_key=secret)
      if ctx.checkpoint is not None:  # kept before the generator's training:
        # a run killed during it reuses the release on resume
        ctx.checkpoint({RELEASE: np.asarray(release)[None], SETUP: setup})
    means, noisy_counts = class_means_from_release(release)
    gcfg = GeneratorConfig(num_features=self.num_features, steps=self.steps)
    with tqdm(total=gcfg.steps, desc="generator (post-processing)",
              disable=ctx.quiet) as bar:
      gen, params = train_generator(
          k_fit, fmap, means, image_shape=ctx.image_shape,
          normalize=ctx.normalize, cfg=gcfg, progress=bar.update)
    x_gen, y_gen = sample(gen, params, k_sample, ctx.per_class,
                          gcfg.latent_dim)
    # The release's constant coordinate carries the noisy class counts.
    return Output(x_gen, y_gen, np.asarray(noisy_counts, np.float64),
                  count_stddev(mech.noise_multiplier),
                  {"release": np.asarray(release)})
