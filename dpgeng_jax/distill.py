"""Distillation: optimise the synthetic pixels against cached noisy targets.

Everything here is post-processing of the released targets (plus, for the
non-private `dm` method, of real images). One jitted step updates all
classes at once: the synthetic set is class-major (K, IPC, H, W, C) and the
per-class matching is vmapped over classes.

A query q is fully described by public randomness: its extractor parameters
and its per-class augmentation parameters are derived from the public key
with `query_public_params(public_key, q)`, so the real side (computed once in
`mechanisms.noisy_targets`) and the synthetic side (recomputed at every step
that uses query q) see the same network and the same augmentation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpgeng_jax import augment
from dpgeng_jax.clipping import clip_rows


class Hoisted:
  """fn(arrays, *args) with the arrays it reads held apart.

  Called as fn(*args) it reads its own `arrays`. A jitted caller passes
  `arrays_of(f)` as an argument and calls `with_arrays(f, traced)`, so
  that the arrays are not constants of the compiled program: public arrays
  made in a run (the generated data's centres, a trained pool, the
  expert's parameters) would otherwise make every run's program new to
  the persistent compilation cache, and large ones slow compilation."""

  def __init__(self, fn: Callable[..., Any], arrays: Any):
    self.fn, self.arrays = fn, arrays

  def __call__(self, *args):
    return self.fn(self.arrays, *args)

  def with_arrays(self, arrays: Any) -> "Hoisted":
    return Hoisted(self.fn, arrays)


def arrays_of(f) -> Any:
  """The arrays a `Hoisted` f reads (None for any other callable)."""
  return f.arrays if isinstance(f, Hoisted) else None


def as_arguments(tree: Any) -> Any:
  """`tree`'s arrays as uncommitted device arrays (one host copy), so that
  jit places them beside a program's other arguments, as it placed the
  constants they replace: a pool trained on one process's devices and a
  step run on a global mesh would otherwise be refused as arguments on
  incompatible devices. An array spread over several processes must be
  replicated (pools, centres and the expert's parameters are)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError("a Hoisted array spread over processes must be "
                         "replicated")
      x = x.addressable_data(0)
    return jnp.asarray(np.asarray(x))

  return jax.tree.map(one, tree)


def with_arrays(f, arrays: Any):
  """f reading `arrays` instead of its own (f itself unless Hoisted)."""
  return f.with_arrays(arrays) if isinstance(f, Hoisted) else f


@dataclasses.dataclass(frozen=True)
class QueryPlan:
  """Public randomness of the queries: which extractor and augmentation.

  Attributes:
    extractor: (key, q) -> extractor params of query q (see
      `extractors.random_pool` and `extractors.fixed_pool`); key is already
      specific to query q.
    embed_fn: embed(params, x) -> (n, d).
    num_classes: K.
    strategy: DSA strategy.
  """
  extractor: Callable[[jax.Array, Any], Any]
  embed_fn: Callable[[Any, jax.Array], jax.Array]
  num_classes: int
  strategy: str = augment.DEFAULT_STRATEGY

  def arrays(self) -> Any:
    """The arrays the extractor pool reads (`Hoisted`), or None."""
    return arrays_of(self.extractor)

  def with_arrays(self, arrays: Any) -> "QueryPlan":
    """The same plan, its pool reading `arrays` (traced, in a jitted
    caller) instead of its own."""
    return dataclasses.replace(self, extractor=with_arrays(self.extractor,
                                                           arrays))

  def params(self, public_key: jax.Array, q):
    """(extractor params, per-class augmentation params) of query q."""
    k_ext, k_aug = jax.random.split(jax.random.fold_in(public_key, q))
    return (self.extractor(k_ext, q),
            augment.sample_params(k_aug, self.strategy,
                                  batch_shape=(self.num_classes,)))


def synthetic_class_means(plan: QueryPlan, params: Any,
                          aug_params: augment.AugmentParams,
                          syn: jax.Array, clip_norm: float) -> jax.Array:
  """mean_j clip_C(psi(aug(S_c)_j)) for every class: (K, m, ...) -> (K, d)."""

  def one_class(xc, pc):
    e = plan.embed_fn(params, augment.apply(xc, pc, plan.strategy))
    return jnp.mean(clip_rows(e, clip_norm), axis=0)

  return jax.vmap(one_class)(syn, aug_params)


def feature_matching_loss(plan: QueryPlan, params: Any,
                          aug_params: augment.AugmentParams,
                          syn: jax.Array, target_sums: jax.Array,
                          expected_counts: jax.Array,
                          clip_norm: float) -> jax.Array:
  """L_FM = sum_c || T[c] / n_c - mean_j clip_C(psi(aug(S_c)_j)) ||^2.

  `expected_counts` n_c are public constants, never realised batch sizes
  nor the exact class sizes N_c (private under add/remove): p * max(n~_c,
  1) from a count release (`counts.ClassSizes.expected_counts(p)`), or p N_c
  only where the class sizes are public knowledge.
  """
  means = synthetic_class_means(plan, params, aug_params, syn, clip_norm)
  if (jnp.shape(target_sums) != means.shape
      or jnp.shape(expected_counts) != means.shape[:1]):
    raise ValueError(
        f"targets of shape {jnp.shape(target_sums)} and expected counts of "
        f"shape {jnp.shape(expected_counts)} for {means.shape[0]} classes "
        f"of {means.shape[1]} features: expected {means.shape} and "
        f"({means.shape[0]},)")
  targets = target_sums / expected_counts[:, None]
  return jnp.sum(jnp.square(targets - means))


class DistillState(NamedTuple):
  """Synthetic images (K, IPC, H, W, C) and the image optimiser's state."""
  images: jax.Array
  opt_state: Any
  step: jax.Array


def image_optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Adam on pixels (normalised space).

  Chosen over distribution matching's SGD (momentum 0.5) because it does
  not depend on the scale of the clipped embeddings: on digits at epsilon 10
  (500 steps) Adam 0.05 reached 92.9 +- 0.7 % and SGD 1.0 / 30.0 reached
  83.7 / 92.3 %.
  """
  return optax.adam(learning_rate)


def init_state(images: jax.Array, opt: optax.GradientTransformation
               ) -> DistillState:
  return DistillState(images, opt.init(images), jnp.zeros((), jnp.int32))


def make_step(plan: QueryPlan, opt: optax.GradientTransformation, *,
              clip_norm: float, decode: Callable[[jax.Array], jax.Array]
              | None = None,
              extra_loss: Callable[[jax.Array], jax.Array] | None = None,
              class_chunk: int | None = None):
  """Builds step(state, targets, expected_counts, public_key) -> (state, loss).

  targets: (Q, K, d) cached noisy sums; the step uses query
  `state.step % Q`. `decode` maps stored images (K, IPC, ...) to the images
  the extractor sees (K, m, ...), image by image; identity by default.
  `extra_loss(decoded, classes)` (e.g. the weighted expert alignment
  term) is added to L_FM: the decoded images of the classes `classes`
  (an int array), a sum over those classes of terms that each read their
  own class's images only.

  `class_chunk`: differentiate the loss `class_chunk` classes at a time
  (unrolled in the one jitted step) and concatenate the image gradients.
  L_FM (and extra_loss, by its contract) is a sum over classes of terms
  that each read their own class's images only, so this is the same
  gradient up to float rounding, with each chunk's activations small
  enough to stay in cache on CPU (`evaluate.chunk_rows` sizes it; None:
  all classes at once). Each chunk is decoded once for both terms.

  A `Hoisted` pool or extra_loss has its arrays passed to the compiled
  step as arguments: one program for every run of the same shapes. The
  returned step is a plain function around the jitted one: `step.lower`
  lowers it with those arrays bound, and the compiled program takes them
  as a fifth argument, `step.arrays`.

  The step donates `state`: its images buffer is reused for the new
  images, so the array passed in (and any other reference to it, such as
  the images given to `init_state`) is deleted; copy it first to keep it.
  """
  if class_chunk is not None and (isinstance(class_chunk, bool) or not
                                  isinstance(class_chunk, int)
                                  or class_chunk < 1):
    raise ValueError(f"class_chunk must be None or an integer >= 1, got "
                     f"{class_chunk!r}")
  decode = decode or (lambda s: s)

  def loss_fn(images, params, aug_params, target, counts, classes, plan,
              extra):
    dec = decode(images)
    loss = feature_matching_loss(plan, params, aug_params, dec, target,
                                 counts, clip_norm)
    if extra is not None:
      loss = loss + extra(dec, classes)
    return loss

  def loss_and_grads(images, params, aug_params, target, counts, plan,
                     extra):
    k = images.shape[0]
    chunk = k if class_chunk is None else min(class_chunk, k)
    parts = []
    for lo in range(0, k, chunk):
      sl = slice(lo, lo + chunk)
      parts.append(jax.value_and_grad(loss_fn)(
          images[sl], params, jax.tree.map(lambda a: a[sl], aug_params),
          target[sl], counts[sl], jnp.arange(lo, min(lo + chunk, k)), plan,
          extra))
    if len(parts) == 1:
      return parts[0]
    return (sum(p[0] for p in parts),
            jnp.concatenate([p[1] for p in parts]))

  # The arrays the pool and the extra term read are arguments of the
  # compiled step, not constants (`Hoisted`).
  arrays = as_arguments((plan.arrays(), arrays_of(extra_loss)))

  def traced_step(state: DistillState, targets, expected_counts, public_key,
                  arrays):
    plan_a = plan.with_arrays(arrays[0])
    extra = with_arrays(extra_loss, arrays[1])
    k = state.images.shape[0]
    if (jnp.ndim(targets) != 3 or targets.shape[1] != k
        or jnp.shape(expected_counts) != (k,)):
      raise ValueError(
          f"targets must be (Q, K, d) and expected_counts (K,) for the K = "
          f"{k} classes of the images, got {jnp.shape(targets)} and "
          f"{jnp.shape(expected_counts)}")
    q = state.step % targets.shape[0]
    params, aug_params = plan_a.params(public_key, q)
    loss, grads = loss_and_grads(state.images, params, aug_params,
                                 targets[q], expected_counts, plan_a, extra)
    updates, opt_state = opt.update(grads, state.opt_state, state.images)
    images = optax.apply_updates(state.images, updates)
    return DistillState(images, opt_state, state.step + 1), loss

  jitted = jax.jit(traced_step, donate_argnums=0)

  def step(state: DistillState, targets, expected_counts, public_key):
    return jitted(state, targets, expected_counts, public_key, arrays)

  # For benchmarks: `step.lower(...).compile()(*args, step.arrays)`.
  step.arrays = arrays
  step.lower = lambda *a: jitted.lower(*a, arrays)
  return step
