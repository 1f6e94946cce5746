"""The DP expert (mechanism M_E) and its alignment term.

The expert E is a ConvNet (instance norm, never BatchNorm) pretrained on the
generated data G (free) and fine-tuned on the private data D with DP-SGD:
Poisson sampling at rate q_E, per-example gradient clipping to C_E, noise
N(0, (sigma_E C_E)^2) on the summed clipped gradients, division by the
public expected batch size q_E N, for T_E steps. Event:
SelfComposed(PoissonSampled(q_E, Gaussian(sigma_E)), T_E).

The alignment term used in distillation (post-processing of E):

    L_E(c) = mean_j [ KL(p_ref(c) || softmax(E(x_cj) / tau))
                      + beta * CE(E(x_cj), c) ]

with p_ref(c) the mean softmax(E(x_g) / tau) over generated images of
class c.
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

from dpgeng_jax import clipping, evaluate, mechanisms, parallel, pergrad
from dpgeng_jax.models import ConvNet


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """Public hyperparameters of the expert's DP fine-tuning."""
  steps: int = 10
  sampling_rate: float = 0.5
  clip_norm: float = 1.0
  learning_rate: float = 0.2
  momentum: float = 0.9


def default_microbatch() -> int:
  """Examples whose per-example gradients the expert's DP-SGD holds at
  once when the user sets no --microbatch: 96 on CPU, 1024 on
  accelerators, so that the step's memory does not grow with the Poisson
  batch (q_E N examples). Measured on 2 CPU cores, ConvNet-3 w128, 28x28,
  1024 examples: whole batch 5.3 s per step and 3.8 GB peak, chunks of 128
  3.3 s and 1.1 GB (benchmarks/RESULTS.md, "Memory"). Chunks of padding
  only are skipped (`clipping.microbatched`), so a smaller chunk wastes
  less of the padded capacity: 96 against 128 at N 1438, 1.35 against 1.54
  s per step at 28x28 and 1.70 against 2.00 at 32x32x3; at N 8000, 6.64
  against 6.54 (RESULTS.md, the expert's section)."""
  return 96 if jax.default_backend() == "cpu" else 1024


def dp_finetune(params: Any, model: ConvNet, x: np.ndarray, y: np.ndarray,
                *, cfg: ExpertConfig, noise_multiplier: float,
                secret: jax.Array, progress=None, mesh=None,
                microbatch: int = 0, skip_padding: bool = True,
                num_rows: int | None = None,
                expected_size: float | None = None,
                log_tail: float | None = None) -> Any:
  """DP-SGD fine-tuning of `params` on private (x, y).

  Reads the private data only through Poisson batches, clipped gradient
  sums (per-example gradients as batched matmuls, `pergrad`) and Gaussian
  noise. With a `mesh` of several devices (or processes) each device
  samples and clips its own rows (`parallel.sharded_dp_sgd_grad`); every
  process passes the same full (x, y) and keeps its `process_rows`.
  microbatch bounds the per-example gradients held at once;
  skip_padding: skip its chunks of padding only (`clipping.microbatched`:
  the step's time then follows the realised batch) or compute them. Raises
  SamplingOverflowError instead of truncating a batch.

  The private rows are padded to `num_rows` (a PUBLIC bound on N, e.g.
  counts.ClassSizes.padded_rows) and passed to the compiled step as
  arguments (never captured as constants); updates are divided by the
  public `q * expected_size` (e.g. ClassSizes.total_estimate). Both
  default to len(x), for callers to whom N is public. log_tail sets the
  overflow probability per step (default mechanisms.OVERFLOW_TAIL).
  """
  n = len(x)
  clipping.check_labels(np.asarray(y), model.num_classes, n)
  num_rows = n if num_rows is None else int(num_rows)
  if num_rows < n:
    raise ValueError(f"num_rows={num_rows} is below the number of examples "
                     "(the message names no private count)")
  expected = cfg.sampling_rate * (n if expected_size is None
                                  else expected_size)
  log_tail = math.log(mechanisms.OVERFLOW_TAIL) if log_tail is None else (
      log_tail)
  opt = optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
  grad_sum = clipping.microbatched(
      pergrad.make_grad_sum_fn(model, clip_norm=cfg.clip_norm), microbatch,
      skip_padding=skip_padding)
  if mesh is None or (parallel.num_shards(mesh) == 1
                      and jax.process_count() == 1):
    step, rows = private_step(grad_sum, cfg, noise_multiplier, x, y,
                              num_rows, log_tail)
  else:
    step, rows = _sharded_step(grad_sum, cfg, noise_multiplier, x, y, mesh,
                               num_rows, log_tail)

  opt_state = opt.init(params)
  for t in range(cfg.steps):
    g, over = step(params, *rows, jax.random.fold_in(secret, t))
    mechanisms.check_overflow(over)
    updates, opt_state = opt.update(
        jax.tree.map(lambda a: a / expected, g), opt_state, params)
    params = optax.apply_updates(params, updates)
    if progress is not None:
      progress(1)
  return params


def _int32_labels(y) -> np.ndarray:
  """Integer labels as int32, refused where the cast would change them
  (negative or beyond int32: an int64 2^32 + 1 became 1). The class
  count is dp_finetune's to check (it knows the model)."""
  a = np.asarray(y)
  if not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {a.dtype}")
  if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
    raise ValueError("labels must be class indices >= 0 that fit int32")
  return a.astype(np.int32)


def step_capacity(cfg: ExpertConfig, num_rows: int, log_tail: float,
                  mesh=None) -> int:
  """Padded Poisson slots of one step's batch, per device of `mesh` (all
  of them without one), for `num_rows` rows (a public bound on N) and
  overflow probability exp(log_tail) per step."""
  return parallel.flat_capacity(num_rows, cfg.sampling_rate, log_tail, mesh)


def private_step(grad_sum, cfg: ExpertConfig, noise_multiplier: float,
                 x: np.ndarray, y: np.ndarray, num_rows: int,
                 log_tail: float):
  """One device: (jitted step(params, x, y, valid, key) -> (noisy clipped
  gradient sum, overflow), the padded private rows (x, y, valid))."""
  capacity = step_capacity(cfg, num_rows, log_tail)
  release = mechanisms.SumRelease(cfg.clip_norm, noise_multiplier)
  release.check_grad_sum_fn(grad_sum)
  rows = tuple(map(jnp.asarray, parallel.padded_rows(
      num_rows, np.asarray(x, np.float32), _int32_labels(y))))
  bits = release.release_bits(capacity)

  @jax.jit
  def step(p, xd, yd, valid, key):
    k_sample, k_noise = jax.random.split(key)
    idx, mask, over = mechanisms.poisson_sample(
        k_sample, valid[None], cfg.sampling_rate, capacity)
    g = grad_sum(p, (xd[idx[0]], yd[idx[0]]), mask[0], bits=bits)
    return mechanisms.withheld_on_overflow(
        release.release(k_noise, g, bits), over), over

  return step, rows


def _sharded_step(grad_sum, cfg, noise_multiplier, x, y, mesh, num_rows,
                  log_tail):
  """The same on a mesh: this process's rows, padded to a public size."""
  capacity = step_capacity(cfg, num_rows, log_tail, mesh)
  rows = parallel.local_rows(mesh, np.asarray(x, np.float32),
                             _int32_labels(y), num_rows=num_rows)
  sharded = jax.jit(functools.partial(
      parallel.sharded_dp_sgd_grad, grad_sum, sampling_rate=cfg.sampling_rate,
      capacity=capacity, mesh=mesh,
      release=mechanisms.SumRelease(cfg.clip_norm, noise_multiplier)))
  return sharded, rows


@functools.partial(jax.jit, static_argnums=(1, 3))
def reference_distributions(params: Any, model: ConvNet, x_gen_cm: jax.Array,
                            tau: float) -> jax.Array:
  """p_ref: (K, K) mean softmax(E(x_g) / tau) per class of generated
  images x_gen_cm (K, m, H, W, C), one class at a time (lax.map: memory
  of m images' activations, not K m). Jitted (model and tau static): an
  eager lax.map traced and compiled its loop on every call."""
  def one(xc):
    return jnp.mean(jax.nn.softmax(model.apply({"params": params}, xc) / tau,
                                   -1), 0)

  return jax.lax.map(one, x_gen_cm)


def alignment_loss(params: Any, model: ConvNet, syn: jax.Array,
                   p_ref: jax.Array, *, tau: float, beta: float,
                   classes: jax.Array | None = None) -> jax.Array:
  """Sum over classes of L_E(c) for synthetic images syn (k, m, ...) of
  the classes `classes` (default all K, in order; p_ref is (K, K))."""
  classes = jnp.arange(syn.shape[0]) if classes is None else classes

  def one(xc, pc, c):
    logits = model.apply({"params": params}, xc)
    logq = jax.nn.log_softmax(logits / tau, -1)
    kl = jnp.sum(pc * (jnp.log(jnp.maximum(pc, 1e-12)) - logq), -1)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.full((xc.shape[0],), c))
    return jnp.mean(kl + beta * ce)

  return jnp.sum(jax.vmap(one)(syn, p_ref[classes], classes))


def accuracy(params: Any, model: ConvNet, x, y) -> float:
  """Test accuracy of the expert (for information only)."""
  stacked = jax.tree.map(lambda a: a[None], params)
  return float(evaluate.accuracies(stacked, model, x, y)[0])
