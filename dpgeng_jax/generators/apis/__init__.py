"""Image APIs of Private Evolution: public sources of images.

An API has two public operations (microsoft/DPSDA's `pe` structure):

* ``random(key, labels) -> Samples``: fresh images of the given classes;
* ``variation(key, samples, degree) -> Samples``: images close to the
  given ones, the closer the smaller ``degree`` (in [0, 1]; PE lowers it
  over its iterations, see `degrees`).

Images are float32 in [0, 1], NHWC, at the private data's shape. `Samples`
also carries the API's per-sample ``state`` (a dict of arrays with a leading
axis, or None): the text simulator keeps each image's rendering parameters
there so that a variation perturbs the parameters, not the pixels. Nothing
an API does reads private data; PE picks among its samples with votes.

Built in: `TextAPI` (glyph renderer, `text.py`), `NearestAPI` (a public
image collection, `nearest.py`), and `FunctionAPI`, which makes an API of
two plain functions (for example a diffusion model's sampler and its
image-to-image at strength = degree).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np


class Samples(NamedTuple):
  images: np.ndarray       # (n, H, W, C) float32 in [0, 1]
  labels: np.ndarray       # (n,) int32
  state: Any = None        # dict of (n, ...) arrays, or None

  def take(self, index: np.ndarray) -> "Samples":
    """The samples at `index` (with their state)."""
    index = np.asarray(index)
    state = None if self.state is None else {
        k: np.asarray(v)[index] for k, v in self.state.items()}
    return Samples(self.images[index], self.labels[index], state)


@runtime_checkable
class ImageAPI(Protocol):
  """What PE needs from a source of public images (module docstring)."""

  def random(self, key: jax.Array, labels: np.ndarray) -> Samples:
    ...

  def variation(self, key: jax.Array, samples: Samples,
                degree: float) -> Samples:
    ...


def degrees(iterations: int) -> list[float]:
  """The default degree schedule: linear from 1 (first variation) to 0
  (last), one value per iteration. The last variation makes the generated
  set, so it is 0 (the voted images themselves) even when it is the only
  one: with one iteration a degree of 1 redrew every voted image."""
  if iterations <= 1:
    return [0.0] * iterations
  return [1.0 - t / (iterations - 1) for t in range(iterations)]


def numpy_rng(key: jax.Array) -> np.random.Generator:
  """A NumPy generator determined by a JAX key (public randomness)."""
  data = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint64)
  return np.random.default_rng([int(v) for v in data])


def check_images(images, labels, image_shape, what: str) -> np.ndarray:
  """The images of an API as float32 (n, H, W, C) in [0, 1], checked."""
  x = np.asarray(images, np.float32)
  if x.ndim == 3 and len(image_shape) == 3 and image_shape[-1] == 1:
    x = x[..., None]
  if x.shape != (len(labels), *image_shape):
    raise ValueError(f"{what} returned images of shape {x.shape}, expected "
                     f"{(len(labels), *image_shape)}")
  if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
    raise ValueError(f"{what} returned pixels outside [0, 1] or non-finite")
  return x


class FunctionAPI:
  """An API from two functions of the user's:

      random_fn(key, labels) -> images
      variation_fn(key, images, labels, degree) -> images

  images (n, H, W, C) in [0, 1]; `degree` in [0, 1], 1 for the first
  variation of a PE run and 0 for the last (strength of an image-to-image
  model, noise scale of a perturbation, ...). Both must be public: they may
  use any public model or data, never the private set.
  """

  def __init__(self, random_fn: Callable, variation_fn: Callable,
               image_shape):
    self.random_fn, self.variation_fn = random_fn, variation_fn
    self.image_shape = tuple(image_shape)

  def random(self, key, labels):
    labels = np.asarray(labels, np.int32)
    x = check_images(self.random_fn(key, labels), labels, self.image_shape,
                     "random_fn")
    return Samples(x, labels)

  def variation(self, key, samples, degree):
    x = check_images(self.variation_fn(key, samples.images, samples.labels,
                                       float(degree)),
                     samples.labels, self.image_shape, "variation_fn")
    return Samples(x, samples.labels)
