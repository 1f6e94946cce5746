"""Feature extractors for the M_F queries.

A pool is a function `(key, q) -> params` giving the extractor of query q,
where `key` is already specific to query q (derived from the public key by
`distill.QueryPlan.params`); the real side (the private query) and the
synthetic side (distillation) call it with the same arguments.

* `random_pool`: a fresh randomly initialised ConvNet per query (NDPDC).
* `fixed_pool`: a stack of trained parameters; query q uses member q mod P.
* `train_generated_pool`: trains ConvNets on generated data G with
  cross-entropy (different seeds) and keeps checkpoints from several epochs
  of each: features learnt without spending any private budget.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpgeng_jax import evaluate
from dpgeng_jax.models import ConvNet, init_params

Pool = Callable[[jax.Array, Any], Any]


def random_pool(model: ConvNet, image_shape) -> Pool:
  """Fresh random ConvNet per query, from the query's public key."""

  def params(key, q):
    del q  # the key is already the query's own
    return init_params(model, key, image_shape)

  return params


def fixed_pool(stacked: Any) -> Pool:
  """Query q uses member q mod P of stacked params (leading axis P)."""
  size = jax.tree.leaves(stacked)[0].shape[0]

  def params(key, q):
    del key
    return jax.tree.map(lambda a: a[q % size], stacked)

  return params


def pool_size(stacked: Any) -> int:
  return int(jax.tree.leaves(stacked)[0].shape[0])


def train_generated_pool(key: jax.Array, x_gen, y_gen, *, num_classes: int,
                         model: ConvNet, num_models: int, epochs: int,
                         checkpoints: int, cfg: evaluate.EvalConfig,
                         progress=None, mesh=None) -> Any:
  """Trains `num_models` ConvNets on generated data, keeping `checkpoints`
  evenly spaced checkpoints of each (the last at the end of training);
  each training step data-parallel over `mesh` if given.

  Returns stacked params with leading axis num_models * checkpoints.
  """
  members = []
  for k in jax.random.split(key, num_models):
    members.extend(evaluate.train_one(
        k, x_gen, y_gen, model=model, cfg=cfg, epochs=epochs,
        num_checkpoints=checkpoints, progress=progress, mesh=mesh))
  return jax.tree.map(lambda *a: jnp.stack(a), *members)
