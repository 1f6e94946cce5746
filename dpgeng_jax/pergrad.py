"""Per-example gradients of the ConvNet's cross-entropy as batched matmuls.

`clipping.clipped_grad_sum` is generic: vmap of jax.grad over examples. On
XLA:CPU the per-example convolution weight gradients it produces run far
below the machine's matmul rate. This module computes the same clipped
gradient sum for `models.ConvNet` with the per-example weight gradients
written as batched matrix products:

* one forward pass records every conv layer's input a_l and every norm's
  normalised activation xhat_l; zero "taps" are added to each conv output,
  each norm output and the logits;
* one backward pass (jax.vjp of the SUM of per-example losses with respect
  to the taps) gives the per-example output gradients g_l. Examples do not
  interact (instance or group norm, never BatchNorm), so row i of g_l is
  example i's gradient;
* per-example parameter gradients follow in closed form: conv kernel
  patches(a_l)^T g_l (a batched matmul, also for layers whose forward and
  backward run Winograd: its per-example form, 16 products of K = tiles
  per example, ran slower; benchmarks/RESULTS.md), conv bias
  sum(g_l), norm scale sum(xhat_l * g_l'), norm bias sum(g_l'), head
  kernel h^T g_z;
* per-example norms, clip factors min(1, C / norm) and the mask give one
  weight per example, and the clipped sum is the weighted sum of the
  per-example gradients. Each chunk's norms come from one fused sum of
  squares per kernel; only a chunk where that is not finite (a non-finite
  row, or entries beyond ~1e19 whose squares overflow) or where a kept
  row's is so small that it may have underflowed (gradients below
  ~1e-13: a confident, correct example, or a tiny C) takes the
  overflow-safe norms of `clipping.row_norms` (a lax.cond, slower);
* where the model computes its first block from patch statistics
  (stem.use_stem: 28x28 or 32x32 inputs on CPU), that block's kernel,
  norm scale and norm bias enter as per-example copies (zero taps'
  counterpart): the gradient of the summed loss with respect to the copies
  is every example's own gradient of those parameters
  (stem.block_per_example), without the full-resolution activations; the
  conv bias, cancelled by the normalisation, has zero gradient.

The result equals `clipped_grad_sum(loss, ...)` with loss the per-example
cross-entropy (tests/test_pergrad.py checks it against the generic path,
including clipping, masking and non-finite examples), so the sensitivity
argument of clipping.py applies unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpgeng_jax import stem, winograd
from dpgeng_jax.clipping import (check_clip_norm, check_fixed_point,
                                 check_labels, check_mask, clip_scale,
                                 row_norms, split_rows, unclipped,
                                 weighted_sum)
from dpgeng_jax.models import ConvNet, _check_norm, instance_norm

_EPS = 1e-5  # models.ConvNet's GroupNorm epsilon
# With conv_impl 'auto' this path runs Winograd from 7x7 maps (28x28
# inputs' third layer), where models.ConvNet keeps XLA's convolution
# (winograd.MIN_PIXELS 64): the expert's DP-SGD step at 28x28 took 1.35 s
# instead of 1.58 (benchmarks/bench_expert.py), while the training step
# gained nothing (bench_train_step.py, "7x7 Winograd"). Same function up
# to float rounding.
WINOGRAD_MIN_PIXELS = 49


def _normalise(u: jax.Array, groups: int) -> jax.Array:
  """The model's normalisation without scale/bias: models.instance_norm
  for one channel per group, Flax GroupNorm's (fast variance) otherwise."""
  n, h, w, c = u.shape
  if groups == c:
    return instance_norm(u, 1.0, 0.0, _EPS)
  g = u.reshape(n, h, w, groups, c // groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(g), axis=(1, 2, 4), keepdims=True)
                    - jnp.square(mean), 0.0)
  return ((g - mean) * jax.lax.rsqrt(var + _EPS)).reshape(u.shape)


def _groups(model: ConvNet) -> int:
  return model.width if model.norm == "instance" else min(32, model.width)


def _kernel_grads(a: jax.Array, g: jax.Array) -> jax.Array:
  """Per-example conv kernel gradients (m, 3, 3, Cin, Cout) from the
  layer's inputs a (m, H, W, Cin) and output gradients g (m, H, W, Cout):
  patches(a)^T g, one product per example."""
  m, cin, cout = a.shape[0], a.shape[-1], g.shape[-1]
  # stem.patches: 9 shifted slices (XLA:CPU computes
  # conv_general_dilated_patches as a convolution, ~50x more work).
  k = jnp.einsum("npf,npc->nfc", stem.patches(a).reshape(m, -1, 9 * cin),
                 g.reshape(m, -1, cout))
  return k.reshape(m, 3, 3, cin, cout)


def _avg_pool_2x2(h: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2 and VALID padding, as the model's
  nn.avg_pool: an odd map drops its last row or column (7x7 -> 3x3)."""
  n, hh, ww, c = h.shape
  h = h[:, :hh // 2 * 2, :ww // 2 * 2]
  return h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def _fused_first(model: ConvNet, x: jax.Array) -> bool:
  """Whether the model runs its first block from patch statistics on x
  (stem.use_stem, as models.ConvNet decides)."""
  return stem.use_stem(model.conv_impl, model.norm, x.shape, model.dtype)


def _forward(model: ConvNet, params: Any, x: jax.Array, taps: dict,
             stats=None):
  """Logits with zero taps added; also the recorded activations. A first
  block computed from patch statistics (stats = stem.patch_stats(x))
  takes its parameters per example from taps["stem"] instead (their
  gradients are the per-example gradients of that block's parameters)."""
  h = x.astype(jnp.float32)
  inputs, xhats = [], []
  first = 0
  if taps["stem"] is not None:
    t = taps["stem"]
    h = stem.block_per_example(*stats, t["kernel"], t["scale"], t["bias"],
                               _EPS)
    inputs, xhats, first = [None], [None], 1
  for i in range(first, model.depth):
    conv = params[f"conv{i}"]
    inputs.append(h)
    u = (winograd.conv_3x3_same(h, conv["kernel"], model.conv_impl,
                                WINOGRAD_MIN_PIXELS)
         + conv["bias"] + taps["u"][i])
    if model.norm != "none":
      norm = params[f"norm{i}"]
      xhat = _normalise(u, _groups(model))
      xhats.append(xhat)
      u = xhat * norm["scale"] + norm["bias"] + taps["v"][i]
    h = jax.nn.relu(u)
    h = _avg_pool_2x2(h)
  feat = h.reshape(h.shape[0], -1)
  logits = feat @ params["head"]["kernel"] + params["head"]["bias"]
  return logits + taps["z"], (inputs, xhats, feat)


def _taps(model: ConvNet, params: Any, x: jax.Array) -> dict:
  """Zero taps built from x, so that inside shard_map they are
  device-varying like x: the gradient with respect to a device-invariant
  tap would be summed over devices (the sharp edge of parallel.py). A
  fused first block gets its parameters broadcast per example (made
  varying the same way)."""
  n, h, w, cin = x.shape
  zero = jnp.zeros_like(x[:, :1, :1, :1], jnp.float32)
  fused = _fused_first(model, x)
  u = []
  for i in range(model.depth):
    u.append(None if fused and i == 0 else
             jnp.broadcast_to(zero, (n, h, w, model.width)))
    h, w = h // 2, w // 2
  first = None
  if fused:
    z2 = zero[:, :, 0, 0]                                  # (n, 1)
    first = {"kernel": params["conv0"]["kernel"].reshape(9 * cin, -1)[None]
                       + z2[:, :, None],
             "scale": params["norm0"]["scale"][None] + z2,
             "bias": params["norm0"]["bias"][None] + z2}
  return {"u": u, "v": list(u) if model.norm != "none" else [],
          "z": jnp.broadcast_to(zero[:, 0, 0], (n, model.num_classes)),
          "stem": first}


def _backprop(model: ConvNet, params: Any, x: jax.Array, y: jax.Array):
  """One forward and one backward pass of the summed per-example losses
  to the taps: (tap gradients, conv inputs, normalised activations,
  features)."""
  _check_norm(model.norm)
  if model.dtype != jnp.float32:
    raise ValueError("pergrad supports float32 ConvNets only")
  taps = _taps(model, params, x)
  # The fused block's input statistics: constants, not differentiated.
  stats = None if taps["stem"] is None else stem.patch_stats(x)

  def total_loss(taps):
    logits, aux = _forward(model, params, x, taps, stats)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(loss), aux

  g, (inputs, xhats, feat) = jax.grad(total_loss, has_aux=True)(taps)
  return g, inputs, xhats, feat


def _small_grads(model: ConvNet, g, xhats, feat) -> dict:
  """Per-example gradients of every parameter except the conv kernels
  computed from patches (biases, norm scales, the head, and all of a
  fused first block's): cheap, (n, ...) each."""
  out = {"head": {"kernel": jnp.einsum("nd,nk->ndk", feat, g["z"]),
                  "bias": g["z"]}}
  for i in range(model.depth):
    if i == 0 and g["stem"] is not None:
      gk = g["stem"]["kernel"]
      n, width = gk.shape[0], gk.shape[-1]
      # The normalisation cancels the conv bias: its gradient is zero.
      out["conv0"] = {"kernel": gk.reshape(n, 3, 3, -1, width),
                      "bias": jnp.zeros((n, width), jnp.float32)}
      out["norm0"] = {"scale": g["stem"]["scale"],
                      "bias": g["stem"]["bias"]}
      continue
    out[f"conv{i}"] = {"bias": jnp.sum(g["u"][i], axis=(1, 2))}
    if model.norm != "none":
      gv = g["v"][i]
      out[f"norm{i}"] = {"scale": jnp.sum(xhats[i] * gv, axis=(1, 2)),
                         "bias": jnp.sum(gv, axis=(1, 2))}
  return out


def _patch_layers(model: ConvNet, g) -> list[int]:
  """The conv layers whose per-example kernel gradients are formed from
  their recorded inputs and output gradients (all but a fused block)."""
  return [i for i in range(model.depth) if g["u"][i] is not None]


def per_example_grads(model: ConvNet, params: Any, x: jax.Array,
                      y: jax.Array) -> Any:
  """Per-example gradients of the cross-entropy, a params-shaped pytree
  with a leading example axis, each leaf float32."""
  g, inputs, xhats, feat = _backprop(model, params, x, y)
  out = _small_grads(model, g, xhats, feat)
  for i in _patch_layers(model, g):
    out[f"conv{i}"]["kernel"] = _kernel_grads(inputs[i], g["u"][i])
  return out


def _finite_rows(leaves, n) -> jax.Array:
  finite = jnp.ones(n, bool)
  for a in leaves:
    finite &= jnp.all(jnp.isfinite(a.reshape(n, -1)), axis=1)
  return finite


def _clean(a: jax.Array, finite: jax.Array) -> jax.Array:
  return jnp.where(finite.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0)


def _leaf_norms(leaves, finite) -> jax.Array:
  """(n, L): each leaf's per-example norm, overflow-safe (row_norms)."""
  n = finite.shape[0]
  return jnp.concatenate(
      [row_norms(_clean(a, finite).reshape(n, -1)) for a in leaves], axis=1)


def convnet_clipped_grad_sum(model: ConvNet, params: Any, x: jax.Array,
                             y: jax.Array, mask: jax.Array, *,
                             clip_norm: float, chunk: int | None = None,
                             bits: int | None = None) -> Any:
  """sum_i mask_i clip_C(grad_i) of the per-example cross-entropy of a
  ConvNet, float32, shaped like params (see module docstring).

  Same contract as `clipping.clipped_grad_sum(loss, params, (x, y), mask,
  clip_norm=C)` with loss the one-example cross-entropy: padded rows
  (mask 0) and non-finite gradients contribute nothing; L2 sensitivity C.

  The per-example conv kernel gradients, the bulk of the work, are formed
  about `chunk` examples at a time (`_chunk_size`) inside a lax.scan (one
  buffer of cache size, reused, instead of one (n, 9 Cin, Cout) array per
  layer: on CPU the latter is dominated by memory traffic). Each chunk's
  examples get their full norms (all layers), clip weights and weighted
  kernel sums at once.
  chunk=None picks by backend (`default_chunk`); any chunk gives the same
  result up to float summation order. With `bits` the sums are int32 in
  fixed point (`clipping.fixed_point_weighted_sum`), as DP-SGD releases
  them: they add exactly over chunks and devices (a row's value may
  round differently at another chunk size).
  """
  if jnp.ndim(x) != 4:
    raise ValueError(f"images must be (n, H, W, C), got shape "
                     f"{jnp.shape(x)} (add a channel axis: x[..., None])")
  n = x.shape[0]
  if n == 0:
    raise ValueError(f"need n >= 1 examples, got x {x.shape}")
  other = sorted({str(a.dtype) for a in jax.tree.leaves(params)
                  if a.dtype != jnp.float32})
  if other:
    raise ValueError(f"pergrad takes float32 parameters, got {other} "
                     "leaves (cast them, or use clipping.clipped_grad_sum)")
  check_mask(mask, n)
  check_labels(y, model.num_classes, n)
  check_clip_norm(clip_norm)
  if bits is not None:
    check_fixed_point(bits, n, clip_norm)
  no_clip = unclipped(clip_norm)
  wsum = functools.partial(weighted_sum, bits=bits)
  g, inputs, xhats, feat = _backprop(model, params, x, y)
  small = _small_grads(model, g, xhats, feat)
  small_leaves = jax.tree.leaves(small)
  finite_small = _finite_rows(small_leaves, n)
  small_norms = _leaf_norms(small_leaves, finite_small)

  chunk = _chunk_size(n, chunk or default_chunk() or n)
  ok = finite_small & (mask > 0)
  layers = _patch_layers(model, g)
  # _chunk_size pads least, so split_rows keeps chunks of exactly `chunk`.
  xs = split_rows((tuple(inputs[i] for i in layers),
                   tuple(g["u"][i] for i in layers), small_norms, ok), chunk)
  zero = jnp.zeros_like(x.reshape(-1)[0], jnp.float32)  # varying like x
  init = tuple(jnp.broadcast_to(zero, params[f"conv{i}"]["kernel"].shape)
               .astype(jnp.float32 if bits is None else jnp.int32)
               for i in layers)

  def weights(norms, fin, ok_c):
    if no_clip:
      scale = jnp.ones(chunk)
    else:
      scale = clip_scale(norms, clip_norm)
    return jnp.where(fin & ok_c, scale, 0.0)

  # A square sum at least `tiny` is exact to 2^-20 relatively even where
  # every square of a row's `entries` coordinates underflowed (each lost
  # one is below 2^-126); a smaller one (gradients below ~1e-19, a C that
  # small) may have lost the whole norm to underflow, which read as 0 and
  # left the row unclipped (a review's finding): the robust pass.
  entries = sum(int(np.prod(a.shape[1:])) for a in small_leaves) + sum(
      int(np.prod(params[f"conv{i}"]["kernel"].shape)) for i in layers)
  tiny = np.float32(entries * 2.0 ** -106)

  def plain_ok(sq, ok_c):  # rows left out (weight 0) may be tiny or 0
    return jnp.isfinite(sq) & ((sq >= tiny) | ~ok_c)

  def robust(kernels, norms_c, ok_c, sq):
    """Overflow-safe norms, non-finite rows zeroed (the generic path's
    semantics). A row whose square sum is finite and not tiny keeps the
    plain norm, so its weight (and, in fixed point, its quantised
    contribution) does not depend on which branch its chunk took: one
    example's non-finite, huge or tiny gradient must not move the other
    rows' contributions."""
    fin = _finite_rows(kernels, chunk)
    norms = jnp.concatenate([norms_c, _leaf_norms(kernels, fin)], axis=1)
    safe = plain_ok(sq, ok_c)
    norm = jnp.where(safe, jnp.sqrt(jnp.where(safe, sq, 0.0)),
                     row_norms(norms)[:, 0])
    w = weights(norm, fin, ok_c)
    return tuple(wsum(w, _clean(k, fin)) for k in kernels), w

  def body(acc, c):
    a_c, g_c, norms_c, ok_c = c
    kernels = [_kernel_grads(a, gu) for a, gu in zip(a_c, g_c)]
    # One fused pass per kernel: squared norms. Where every square sum of
    # the chunk is finite and not tiny, so are its rows and the plain norm
    # is exact; otherwise (a non-finite or > 1e19 entry, or a norm that
    # may have underflowed) the robust pass decides.
    sq = jnp.square(norms_c).sum(axis=1)
    for k in kernels:
      sq = sq + jnp.sum(jnp.square(k), axis=tuple(range(1, k.ndim)))

    def plain(kernels, norms_c, ok_c, sq):
      w = weights(jnp.sqrt(sq), jnp.ones(chunk, bool), ok_c)
      return tuple(wsum(w, k) for k in kernels), w

    sums, w = jax.lax.cond(jnp.all(plain_ok(sq, ok_c)), plain, robust,
                           kernels, norms_c, ok_c, sq)
    return tuple(s + t for s, t in zip(acc, sums)), w

  kernel_sums, w = jax.lax.scan(body, init, xs)
  w = w.reshape(-1)[:n]
  out = jax.tree.map(lambda a: wsum(w, _clean(a, finite_small)),
                     small)
  for i, k in zip(layers, kernel_sums):
    out[f"conv{i}"]["kernel"] = k
  return out


def _chunk_size(n: int, target: int) -> int:
  """A chunk size within [target / 2, 3 target / 2] that pads n rows
  least (padded rows cost as much as real ones), nearest to target on
  ties; e.g. 121 rows (a 847-row Poisson batch in 7 microbatches) go in
  11 chunks of 11 instead of 16 of 8 (7 padded rows)."""
  target = max(1, min(target, n))
  sizes = range(max(1, target // 2), min(n, target * 3 // 2) + 1)
  return min(sizes, key=lambda c: (-(-n // c) * c - n, abs(c - target)))


def default_chunk() -> int | None:
  """Examples per chunk of per-example kernel gradients: 4 on CPU (cache
  sized: a chunk's patches and kernel gradients at 14x14 x 128 are about
  5 MB; 2-4 measured alike, 8 slower, benchmarks/RESULTS.md), the whole
  batch (None) on accelerators."""
  return 4 if jax.default_backend() == "cpu" else None


def make_grad_sum_fn(model: ConvNet, *, clip_norm: float):
  """grad_sum_fn(params, (x, y), mask, bits=None) for
  `mechanisms.make_dp_sgd_step` and `parallel.sharded_grad_sum`, via the
  batched-matmul path (int32 fixed-point sums when bits is set). The
  function carries its `clip_norm`, which the DP-SGD steps check against
  their release's (`mechanisms.SumRelease.check_grad_sum_fn`)."""

  def grad_sum(params, batch, mask, bits=None):
    x, y = batch
    return convnet_clipped_grad_sum(model, params, x, y, mask,
                                    clip_norm=clip_norm, bits=bits)

  grad_sum.clip_norm = clip_norm
  return grad_sum
