"""Public embeddings for Private Evolution's nearest-neighbour votes.

* ``pixels``: the normalised pixels, flattened;
* ``random``: the features of a randomly initialised ConvNet (public key);
* ``trained``: the features of a ConvNet trained with cross-entropy on the
  image API's own samples (public, so free).

Each is a function (normalised images (n, H, W, C)) -> (n, d), applied in
chunks under jit. None reads private data (the mechanism applies them to
the private set).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax import evaluate, models

EMBEDDINGS = ("pixels", "random", "trained")


def pixels(x):
  return x.reshape(x.shape[0], -1)


def make(kind: str, *, key, api, model: models.ConvNet, image_shape,
         num_classes: int, normalize, samples_per_class: int = 100,
         epochs: int = 20, progress=None):
  """The embedding `kind` as a jittable function of normalised images."""
  if kind == "pixels":
    return pixels
  if kind not in EMBEDDINGS:
    raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {kind!r}")
  k_init, k_data, k_train = jax.random.split(key, 3)
  if kind == "random":
    params = models.init_params(model, k_init, image_shape)
  else:
    labels = np.repeat(np.arange(num_classes, dtype=np.int32),
                       samples_per_class)
    x = normalize(api.random(k_data, labels).images)
    cfg = evaluate.EvalConfig(num_models=1, epochs=epochs,
                              width=model.width, depth=model.depth,
                              conv_impl=model.conv_impl)
    params = evaluate.train_one(k_train, x, jnp.asarray(labels),
                                model=model, cfg=cfg, epochs=epochs,
                                num_checkpoints=1, progress=progress)[-1]
  embed = models.embed_fn(model)
  return functools.partial(embed, params)


def apply(embed, x, chunk: int = 1024):
  """embed(x) in chunks of rows (same result, bounded memory)."""
  fn = jax.jit(embed)
  n = x.shape[0]
  return jnp.concatenate([fn(x[s:s + chunk]) for s in range(0, n, chunk)]
                         ) if n else fn(x)
