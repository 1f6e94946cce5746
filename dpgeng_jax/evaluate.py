"""Train-on-distilled, test-on-real evaluation.

Trains `num_models` fresh ConvNets (one after another, one compiled step) on
a labelled set with DSA augmentation (per-image parameters), SGD momentum
0.9, weight decay 5e-4 and a tenfold learning-rate drop at half time, then
reports the test accuracy of each model on the real test split. Used for the
distilled set and, for context, for non-private references (a random real
subset of IPC images per class, and the full training set).

With `mesh` (a `parallel.data_mesh` of this process's devices), each
training step is data-parallel: the augmented batch is split over the
devices (padded with zero-weight rows to a multiple of the device count),
each device computes the gradient of its rows' summed loss, the local
gradients are added with psum and divided by the batch size. The same
step as on one device, up to float summation order (tests/sharded).

On one CPU device a batch whose first-layer activations exceed
CHUNK_BYTES is differentiated in row chunks (`chunk_rows`), unrolled in
the one jitted step, and the chunks' summed-loss gradients are added:
the same mean gradient up to float summation order, with each chunk's
activations small enough to stay in cache (width 128, batch 256, with
the patch-statistics first block: a step 1.18x faster at 28x28, 1.13x at
32x32x3; `lax.map`/`scan` over the chunks instead ran 5x slower on
XLA:CPU). benchmarks/bench_train_step.py measures it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpgeng_jax import augment, parallel
from dpgeng_jax.models import ConvNet, cross_entropy, init_params


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Hyperparameters of the evaluation models (public)."""
  num_models: int = 5
  epochs: int = 300
  batch_size: int = 256
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  width: int = 128
  depth: int = 3
  norm: str = "instance"
  strategy: str = augment.DEFAULT_STRATEGY
  conv_impl: str = "auto"


# Largest first-layer activation (rows x H x W x width float32 values) one
# gradient chunk may produce on CPU; None turns chunking off.
CHUNK_BYTES: int | None = 32 << 20
MAX_CHUNKS = 8


def chunk_rows(batch: int, image_shape, width: int) -> int:
  """Rows per gradient chunk for a batch of `image_shape` images through a
  ConvNet of `width`: the whole batch off CPU or when it fits CHUNK_BYTES,
  else the batch split into the fewest equal chunks that fit (at least 8
  rows each, at most MAX_CHUNKS chunks: each is compiled unrolled)."""
  if CHUNK_BYTES is None or jax.default_backend() != "cpu":
    return batch
  per_row = image_shape[0] * image_shape[1] * width * 4
  chunks = min(MAX_CHUNKS, -(-batch * per_row // CHUNK_BYTES))
  return max(min(batch, 8), -(-batch // chunks))


def _optimizer(weight_decay: float, momentum: float):
  """SGD with momentum and weight decay added to the gradient, WITHOUT the
  learning rate: the step scales the update by the current rate, a traced
  argument (`learning_rate_at`), so that one compiled step serves every
  training length. Equal to add_decayed_weights then optax.sgd with the
  piecewise schedule (optax.sgd also scales the momentum trace)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.trace(decay=momentum))


def learning_rate_at(step: int, total: int, cfg: EvalConfig) -> float:
  """The rate of optimiser step `step` of `total`: cfg.learning_rate, a
  tenfold drop from step max(1, total // 2) on."""
  drop = 0.1 if step >= max(1, total // 2) else 1.0
  return cfg.learning_rate * drop


def _train_step(model: ConvNet, cfg: EvalConfig, mesh=None):
  """`_step_for` keyed by what the step computes (not by cfg's epochs,
  number of models or learning rate, which differ between the pool and
  the evaluation)."""
  return _step_for(model.num_classes, model.width, model.depth, model.norm,
                   model.conv_impl, cfg.strategy, cfg.weight_decay,
                   cfg.momentum, mesh)


@functools.lru_cache(maxsize=32)
def _step_for(num_classes: int, width: int, depth: int, norm: str,
              conv_impl: str, strategy: str, weight_decay: float,
              momentum: float, mesh=None):
  """One jitted training step on one (already gathered) batch, shared by
  every model of the same architecture whatever its training set's size or
  length: the extractor pool (and so the expert's pretraining, a pool
  member), PE's trained embedding, the evaluation models and the
  references all run this one program when their batches have one shape.
  """
  model = ConvNet(num_classes, width=width, depth=depth, norm=norm,
                  conv_impl=conv_impl)
  opt = _optimizer(weight_decay, momentum)
  loss_fn = functools.partial(cross_entropy, model)
  if mesh is not None:
    summed = parallel.sharded_sum(
        jax.grad(functools.partial(_loss_sum, model)), mesh)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, lr, k, xb, yb, step):
    xb = augment.augment(jax.random.fold_in(k, -1 - step), xb, strategy,
                         per_image=True)
    if mesh is None:
      batch = xb.shape[0]
      rows = chunk_rows(batch, xb.shape[1:3], width)
      if rows >= batch:
        grads = jax.grad(loss_fn)(p, xb, yb)
      else:  # summed-loss gradients of row chunks, added, / batch
        grads = None
        for lo in range(0, batch, rows):
          g = jax.grad(functools.partial(_loss_sum, model))(
              p, xb[lo:lo + rows], yb[lo:lo + rows], 1.0)
          grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        grads = jax.tree.map(lambda g: g / batch, grads)
    else:  # mean gradient = (sum over devices of local sums) / batch
      batch = xb.shape[0]
      rows, w = parallel.pad_rows((xb, yb), jnp.ones((batch,)),
                                  parallel.num_shards(mesh))
      grads = jax.tree.map(lambda g: g / batch, summed(p, *rows, w))
    updates, s = opt.update(grads, s, p)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return optax.apply_updates(p, updates), s

  return step, opt


@functools.partial(jax.jit, static_argnames=("batch", "steps_per_epoch"))
def _batch(k, x, y, step, *, batch: int, steps_per_epoch: int):
  """Batch `step` of the epoch-wise shuffled (x, y): epoch e's order is a
  permutation drawn from fold_in(k, e), wrapping around at the end."""
  n = x.shape[0]
  epoch, b = step // steps_per_epoch, step % steps_per_epoch
  perm = jax.random.permutation(jax.random.fold_in(k, epoch), n)
  idx = jnp.take(perm, (b * batch + jnp.arange(batch)) % n)
  return x[idx], y[idx]


def _loss_sum(model: ConvNet, params: Any, x: jax.Array, y: jax.Array,
              weight: jax.Array) -> jax.Array:
  """Sum over rows of weight x softmax cross-entropy (0 on padding)."""
  logits = model.apply({"params": params}, x)
  return jnp.sum(weight * optax.softmax_cross_entropy_with_integer_labels(
      logits, y))


def training_steps(n: int, cfg: EvalConfig, epochs: int | None = None) -> int:
  """Optimiser steps of one model trained on n examples for `epochs`
  (default cfg.epochs) epochs of batches of min(cfg.batch_size, n)."""
  epochs = cfg.epochs if epochs is None else epochs
  return epochs * math.ceil(n / min(cfg.batch_size, n))


def train_one(key: jax.Array, x, y, *, model: ConvNet, cfg: EvalConfig,
              epochs: int | None = None, num_checkpoints: int = 1,
              progress=None, mesh=None) -> list:
  """Trains one ConvNet on (x, y) with DSA; returns `num_checkpoints`
  parameter snapshots taken at evenly spaced epochs (the last one at the
  end of training). With `mesh`, each step is data-parallel (module
  docstring)."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  n = x.shape[0]
  batch = min(cfg.batch_size, n)
  steps_per_epoch = math.ceil(n / batch)
  total = training_steps(n, cfg, epochs)
  step_fn, opt = _train_step(model, cfg, mesh)
  save_at = {round(total * (i + 1) / num_checkpoints)
             for i in range(num_checkpoints)}
  params = init_params(model, key, x.shape[1:])
  opt_state = opt.init(params)
  snapshots = []
  for step in range(total):
    t = jnp.int32(step)
    xb, yb = _batch(key, x, y, t, batch=batch,
                    steps_per_epoch=steps_per_epoch)
    params, opt_state = step_fn(
        params, opt_state, jnp.float32(learning_rate_at(step, total, cfg)),
        key, xb, yb, t)
    if step + 1 in save_at:
      # a copy: the next step donates (overwrites) the params it is given
      snapshots.append(jax.tree.map(jnp.copy, params))
    if progress is not None:
      progress(1)
  return snapshots


def train_models(key: jax.Array, x: jax.Array, y: jax.Array, *,
                 num_classes: int, cfg: EvalConfig, progress=None,
                 mesh=None) -> Any:
  """Trains cfg.num_models ConvNets on (x, y); returns (stacked params,
  model).

  Models are trained one after another with one compiled step: on XLA:CPU
  a vmap over models turns the convolutions into grouped convolutions that
  ran 3-4x slower than this loop (ConvNet-2, 8x8, width 128).
  """
  model = ConvNet(num_classes, width=cfg.width, depth=cfg.depth,
                  norm=cfg.norm, conv_impl=cfg.conv_impl)
  trained = [train_one(k, x, y, model=model, cfg=cfg, progress=progress,
                       mesh=mesh)[-1]
             for k in jax.random.split(key, cfg.num_models)]
  return jax.tree.map(lambda *a: jnp.stack(a), *trained), model


def class_accuracies(params: Any, model: ConvNet, x_test, y_test,
                     batch_size: int = 256) -> np.ndarray:
  """(models, K) test accuracy of each of the stacked models on each
  class (NaN for a class absent from the test split).

  One model at a time, the test images in equal batches of about
  `batch_size`, the last one padded with rows that count for no class:
  one program per model and batch shape, compiled once per process
  (`_class_hits`). On 2 CPU cores (28x28, width 128, 1000 test images,
  no compilation cache) one model took 0.44-0.48 s a call this way
  against 1.6 s for one batch of 1000 in a program built per call, and
  five stacked models 2.3-2.6 s against 5.8-6.8 s (that program,
  vmapped over the models) and 3.1-3.5 s (vmapped, batches of 32-256)."""
  k = model.num_classes
  x_test = np.asarray(x_test, np.float32)
  y_test = np.asarray(y_test, np.int32)
  n, models_ = len(x_test), jax.tree.leaves(params)[0].shape[0]
  support = np.bincount(y_test, minlength=k).astype(np.float64)
  total = np.zeros((models_, k), np.int64)
  if n:
    batches = -(-n // max(1, min(int(batch_size), n)))
    rows = -(-n // batches)
    pad = batches * rows - n
    xp = np.concatenate([x_test, np.zeros((pad,) + x_test.shape[1:],
                                          np.float32)])
    yp = np.concatenate([y_test, np.full(pad, k, np.int32)])  # k: no class
    for m in range(models_):
      p = jax.tree.map(lambda a, m=m: a[m], params)
      for i in range(0, len(xp), rows):
        total[m] += np.asarray(_class_hits(p, model, xp[i:i + rows],
                                           yp[i:i + rows]))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(support > 0, total / support, np.nan)


@functools.partial(jax.jit, static_argnums=1)
def _class_hits(params: Any, model: ConvNet, xb, yb) -> jax.Array:
  """(K,) correct predictions per class of one model on one batch; rows
  labelled K (padding) count for none."""
  logits = model.apply({"params": params}, xb)
  hit = (jnp.argmax(logits, -1) == yb).astype(jnp.int32)
  return jnp.zeros(model.num_classes, jnp.int32).at[yb].add(hit, mode="drop")


def overall_accuracies(per_class: np.ndarray, y_test) -> np.ndarray:
  """(models,) test accuracy from (models, K) per-class accuracies."""
  support = np.bincount(np.asarray(y_test, np.int64),
                        minlength=per_class.shape[1])
  return np.nansum(per_class * support, axis=1) / len(y_test)


def accuracies(params: Any, model: ConvNet, x_test, y_test,
               batch_size: int = 256) -> np.ndarray:
  """Test accuracy of each of the stacked models."""
  return overall_accuracies(
      class_accuracies(params, model, x_test, y_test, batch_size), y_test)


def evaluate(key: jax.Array, x_train, y_train, x_test, y_test, *,
             num_classes: int, cfg: EvalConfig, progress=None,
             mesh=None) -> dict:
  """Trains fresh models on (x_train, y_train) and tests them (training
  data-parallel over `mesh` if given).

  Returns:
    {test_accuracy_mean, test_accuracy_std, num_eval_models,
     test_accuracies, test_accuracies_per_class (models x K)} with
    accuracies as fractions in [0, 1].
  """
  params, model = train_models(key, x_train, y_train,
                               num_classes=num_classes, cfg=cfg,
                               progress=progress, mesh=mesh)
  per_class = class_accuracies(params, model, x_test, y_test)
  acc = overall_accuracies(per_class, y_test)
  return {
      "test_accuracy_mean": float(np.mean(acc)),
      "test_accuracy_std": float(np.std(acc)),
      "num_eval_models": int(len(acc)),
      "test_accuracies": [float(a) for a in acc],
      # (models, K); None where a class has no test example.
      "test_accuracies_per_class": [
          [None if np.isnan(a) else float(a) for a in row]
          for row in per_class],
  }


def random_real_subset(key: jax.Array, x, y, ipc: int, num_classes: int):
  """IPC real images per class chosen at random (a NON-private reference)."""
  x, y = np.asarray(x), np.asarray(y)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  idx = np.concatenate([
      rng.choice(np.flatnonzero(y == c), size=min(ipc, int(np.sum(y == c))),
                 replace=False) for c in range(num_classes)])
  return x[idx], y[idx]
