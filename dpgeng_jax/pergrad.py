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
  patches(a_l)^T g_l (a batched matmul), conv bias sum(g_l), norm scale
  sum(xhat_l * g_l'), norm bias sum(g_l'), head kernel h^T g_z;
* per-example norms, clip factors min(1, C / norm) and the mask give one
  weight per example, and the clipped sum is the weighted sum of the
  per-example gradients.

The result equals `clipped_grad_sum(loss, ...)` with loss the per-example
cross-entropy (tests/test_pergrad.py checks it against the generic path,
including clipping, masking and non-finite examples), so the sensitivity
argument of clipping.py applies unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dpgeng_jax.clipping import clip_scale, row_norms
from dpgeng_jax.models import ConvNet, _check_norm

_EPS = 1e-5  # models.ConvNet's GroupNorm epsilon


def _normalise(u: jax.Array, groups: int) -> jax.Array:
  """Flax GroupNorm's normalisation (fast variance) without scale/bias."""
  n, h, w, c = u.shape
  g = u.reshape(n, h, w, groups, c // groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(g), axis=(1, 2, 4), keepdims=True)
                    - jnp.square(mean), 0.0)
  return ((g - mean) * jax.lax.rsqrt(var + _EPS)).reshape(u.shape)


def _groups(model: ConvNet) -> int:
  return model.width if model.norm == "instance" else min(32, model.width)


def _conv(a: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      a, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _patches(a: jax.Array) -> jax.Array:
  """(n, H, W, C) -> (n, H*W, C*9), feature order (c, kh, kw)."""
  p = jax.lax.conv_general_dilated_patches(
      a, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return p.reshape(p.shape[0], -1, p.shape[-1])


def _forward(model: ConvNet, params: Any, x: jax.Array, taps: dict):
  """Logits with zero taps added; also the recorded activations."""
  h = x.astype(jnp.float32)
  inputs, xhats = [], []
  for i in range(model.depth):
    conv = params[f"conv{i}"]
    inputs.append(h)
    u = _conv(h, conv["kernel"]) + conv["bias"] + taps["u"][i]
    if model.norm != "none":
      norm = params[f"norm{i}"]
      xhat = _normalise(u, _groups(model))
      xhats.append(xhat)
      u = xhat * norm["scale"] + norm["bias"] + taps["v"][i]
    h = jax.nn.relu(u)
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
  feat = h.reshape(h.shape[0], -1)
  logits = feat @ params["head"]["kernel"] + params["head"]["bias"]
  return logits + taps["z"], (inputs, xhats, feat)


def _taps(model: ConvNet, x: jax.Array) -> dict:
  """Zero taps built from x, so that inside shard_map they are
  device-varying like x: the gradient with respect to a device-invariant
  tap would be summed over devices (the sharp edge of parallel.py)."""
  n, h, w, _ = x.shape
  zero = jnp.zeros_like(x[:, :1, :1, :1], jnp.float32)
  u = []
  for _ in range(model.depth):
    u.append(jnp.broadcast_to(zero, (n, h, w, model.width)))
    h, w = h // 2, w // 2
  return {"u": u, "v": list(u) if model.norm != "none" else [],
          "z": jnp.broadcast_to(zero[:, 0, 0], (n, model.num_classes))}


def per_example_grads(model: ConvNet, params: Any, x: jax.Array,
                      y: jax.Array) -> Any:
  """Per-example gradients of the cross-entropy, a params-shaped pytree
  with a leading example axis, each leaf float32."""
  _check_norm(model.norm)
  if model.dtype != jnp.float32:
    raise ValueError("pergrad supports float32 ConvNets only")

  def total_loss(taps):
    logits, aux = _forward(model, params, x, taps)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(loss), aux

  g, (inputs, xhats, feat) = jax.grad(total_loss, has_aux=True)(
      _taps(model, x))
  n = x.shape[0]
  out = {"head": {"kernel": jnp.einsum("nd,nk->ndk", feat, g["z"]),
                  "bias": g["z"]}}
  for i in range(model.depth):
    gu = g["u"][i]
    cin = inputs[i].shape[-1]
    k = jnp.einsum("npf,npc->nfc", _patches(inputs[i]),
                   gu.reshape(n, -1, gu.shape[-1]))
    k = k.reshape(n, cin, 3, 3, -1).transpose(0, 2, 3, 1, 4)
    out[f"conv{i}"] = {"kernel": k, "bias": jnp.sum(gu, axis=(1, 2))}
    if model.norm != "none":
      gv = g["v"][i]
      out[f"norm{i}"] = {"scale": jnp.sum(xhats[i] * gv, axis=(1, 2)),
                         "bias": jnp.sum(gv, axis=(1, 2))}
  return out


def convnet_clipped_grad_sum(model: ConvNet, params: Any, x: jax.Array,
                             y: jax.Array, mask: jax.Array, *,
                             clip_norm: float) -> Any:
  """sum_i mask_i clip_C(grad_i) of the per-example cross-entropy of a
  ConvNet, float32, shaped like params (see module docstring).

  Same contract as `clipping.clipped_grad_sum(loss, params, (x, y), mask,
  clip_norm=C)` with loss the one-example cross-entropy: padded rows
  (mask 0) and non-finite gradients contribute nothing; L2 sensitivity C.
  """
  grads = per_example_grads(model, params, x, y)
  n = x.shape[0]
  flat = [g.reshape(n, -1) for g in jax.tree.leaves(grads)]
  finite = jnp.ones(n, bool)
  for g in flat:
    finite &= jnp.all(jnp.isfinite(g), axis=1)
  # Norm of each leaf, then of the vector of leaf norms: both scaled by
  # their largest entry (clipping.row_norms), so no square overflows.
  leaf_norms = jnp.concatenate(
      [row_norms(jnp.where(finite[:, None], g, 0.0)) for g in flat], axis=1)
  scale = jnp.ones(n) if math.isinf(clip_norm) else clip_scale(
      row_norms(leaf_norms)[:, 0], clip_norm)
  weights = jnp.where(finite & (mask > 0), scale, 0.0)
  return jax.tree.map(
      lambda g: jnp.tensordot(
          weights, jnp.where(finite.reshape((n,) + (1,) * (g.ndim - 1)),
                             g, 0.0), axes=(0, 0)), grads)


def make_grad_sum_fn(model: ConvNet, *, clip_norm: float):
  """grad_sum_fn(params, (x, y), mask) for `mechanisms.make_dp_sgd_step`
  and `parallel.sharded_grad_sum`, via the batched-matmul path."""

  def grad_sum(params, batch, mask):
    x, y = batch
    return convnet_clipped_grad_sum(model, params, x, y, mask,
                                    clip_norm=clip_norm)

  return grad_sum
