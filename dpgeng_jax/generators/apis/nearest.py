"""`nearest:PATH`: a public labelled image collection as a PE image API.

Sim-PE's NearestImage: `random` draws images of the class from the
collection uniformly; `variation` replaces each image by one of its k
nearest neighbours of the same class in the collection (in an embedding of
the collection, raw pixels by default), with k shrinking with the degree
(k = 1 + round(degree * (k_max - 1)), the image itself counting as its
own nearest neighbour, so that a hop at degree 0 stays put). The collection must be public: any dataset whose
use needs no privacy, or images made by a simulator.
"""

from __future__ import annotations

import numpy as np

from dpgeng_jax.generators.apis import Samples, numpy_rng


def load_collection(path: str, *, image_shape, num_classes: int):
  """(x in [0, 1] float32 NHWC, y) of an npz with arrays `x`, `y` checked
  like external generated data (same image shape, every class present)."""
  from dpgeng_jax.generators.external import load_external
  return load_external(path, image_shape=image_shape,
                       num_classes=num_classes, what="public collection")


class NearestAPI:
  """Images of a public collection; variation = a k-nearest-neighbour hop
  within the class."""

  def __init__(self, x, y, num_classes: int, *, k_max: int = 10,
               embed=None, chunk: int = 1024):
    self.x = np.asarray(x, np.float32)
    self.y = np.asarray(y, np.int32)
    self.image_shape = tuple(self.x.shape[1:])
    self.by_class = [np.flatnonzero(self.y == c) for c in range(num_classes)]
    if any(len(i) == 0 for i in self.by_class):
      raise ValueError("the collection lacks images of some class")
    # No class has more neighbours than images: a larger k_max only
    # repeats them (and a huge one asked for a (n, k_max) table).
    self.k_max = max(1, min(int(k_max), max(map(len, self.by_class))))
    e = self.x.reshape(len(self.x), -1) if embed is None else np.asarray(
        embed(self.x), np.float32)
    # Per image, its k_max nearest images of the same class (itself first).
    self.neighbours = np.zeros((len(self.x), self.k_max), np.int64)
    for idx in self.by_class:
      ec = e[idx]
      sq = np.sum(ec * ec, 1)
      k = min(self.k_max, len(idx))
      for s in range(0, len(idx), chunk):
        d = sq[s:s + chunk, None] - 2 * ec[s:s + chunk] @ ec.T + sq[None]
        d[np.arange(len(d)), np.arange(s, s + len(d))] = -np.inf
        near = np.argsort(d, axis=1)[:, :k]
        if k < self.k_max:  # a small class: each row cycles its own
          near = near[:, np.arange(self.k_max) % k]
        self.neighbours[idx[s:s + chunk]] = idx[near]

  def random(self, key, labels) -> Samples:
    labels = np.asarray(labels, np.int32)
    rng = numpy_rng(key)
    index = np.array([rng.choice(self.by_class[c]) for c in labels],
                     np.int64).reshape(len(labels))
    return Samples(self.x[index], labels, {"index": index})

  def variation(self, key, samples: Samples, degree: float) -> Samples:
    rng = numpy_rng(key)
    k = 1 + int(round(float(np.clip(degree, 0, 1)) * (self.k_max - 1)))
    pick = rng.integers(0, k, len(samples.labels))
    index = self.neighbours[samples.state["index"], pick]
    return Samples(self.x[index], samples.labels, {"index": index})
