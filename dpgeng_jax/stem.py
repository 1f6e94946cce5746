"""The ConvNet's first block (3x3 conv -> instance norm -> ReLU -> 2x2
average pool) on images with few channels, computed from each example's
patch statistics.

On 28x28 or 32x32 inputs the first block's activations (H x W x width per
example) are the largest tensors of the network, while its convolution
has the fewest FLOPs (Cin = 1 or 3): on XLA:CPU the block's normalisation,
ReLU and pooling, forward and backward, took about half of a training
step's thread time while doing under 3 % of its FLOPs (memory traffic over
the 100 MB activation of a 256-image batch). This module never forms the
un-normalised convolution output or its statistics over pixels:

* the 9 Cin values of each pixel's 3x3 'SAME' patch, p, are gathered once
  (9 Cin numbers per pixel instead of `width`);
* instance norm's statistics of the convolution output z = p . k + b
  follow exactly from the patches' per-example mean m and covariance S
  (a 9Cin x 9Cin matrix per example): mean(z) = m . k + b and
  var(z) = k^T S k, so the normalised output is
  (p - m) . (k * a) + beta with a = scale / sqrt(var + eps), the
  convolution bias cancelling as it does in the unfused block;
* the pooled output is the mean over the four pixel phases (i, j) of
  ReLU of that per-example product on the phase's pixels, so no
  full-resolution tensor needs to be stored for the pool.

The result is the unfused block's up to float rounding (tests/test_stem.py
checks values, gradients with respect to parameters and inputs, and that
rows do not mix). The covariance is formed from centred patches (two
passes over the small patch tensor), so a near-constant image is as
accurate as with the two-pass variance of models.instance_norm.
`use_stem` picks it for 'auto' on the CPU backend, on maps of at least
MIN_PIXELS pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpgeng_jax.clipping import split_rows
from dpgeng_jax.errors import require_int

# The patch covariance is (9 Cin)^2 per example: cheap for image inputs
# (Cin 1 or 3), not for hidden layers.
MAX_CHANNELS = 4
# block_per_example's row chunks on CPU: one 96-row microbatch's block,
# forward and backward, all at once against chunks of this many bytes of
# pre-activations (8 rows at 28x28 x 128, 6 at 32x32 x 128): 23.6 -> 13.6
# ms and 41.2 -> 30.4 ms; chunks of 4 to 16 rows alike
# (benchmarks/bench_stem_chunks.py, RESULTS.md "The first block in
# chunks").
CHUNK_BYTES = 3_500_000
# Only maps this large gain (bench_train_step.py, training step, width
# 128: 28x28x1 and 32x32x3 1.08-1.09x faster; 16x16x3 0.98x; 8x8x1 0.87x at
# batch 100, where the layer-by-layer block is small enough already).
MIN_PIXELS = 512


def patches(x: jax.Array) -> jax.Array:
  """Each pixel's 3x3 'SAME' (zero-padded) patch: (n, H, W, C) ->
  (n, H, W, 9C), ordered like a (3, 3, C, Cout) kernel reshaped to
  (9C, Cout)."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate(
      [xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)


def patch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each example's centred 3x3 patches pc (n, H, W, 9C) and their
  covariance over pixels (n, 9C, 9C), in float32: all the first block
  needs of its input."""
  _, h, w, _ = x.shape
  p = patches(x.astype(jnp.float32))
  pc = p - jnp.mean(p, axis=(1, 2), keepdims=True)
  return pc, jnp.einsum("nhwp,nhwq->npq", pc, pc) / (h * w)


def _check(x_shape, kernel_shape):
  _, h, w, cin = x_shape
  if tuple(kernel_shape[:3]) != (3, 3, cin) or h < 2 or w < 2:
    raise ValueError(
        f"conv_norm_relu_pool needs a (3, 3, {cin}, Cout) kernel and maps "
        f"of at least 2x2; got x {tuple(x_shape)}, kernel "
        f"{tuple(kernel_shape)}")


def _norm_gain(cov, k, scale, epsilon):
  """scale / sqrt(var + eps) of the convolution output per example and
  channel, var = k^T S k; k (P, C) shared or (n, P, C) per example."""
  if k.ndim == 2:
    var = jnp.sum(jnp.einsum("npq,qc->npc", cov, k) * k, axis=1)
  else:
    var = jnp.sum(jnp.einsum("npq,nqc->npc", cov, k) * k, axis=1)
  return jax.lax.rsqrt(jnp.maximum(var, 0.0) + epsilon) * scale


def _phase_mean(pc, product, norm_bias):
  """Mean over the 2x2 pool's four pixel phases of relu(product(phase) +
  norm_bias): the pooled block output, odd maps dropping their last row or
  column as nn.avg_pool does."""
  _, h, w, _ = pc.shape
  h2, w2 = h // 2, w // 2
  out = 0.0
  for i in range(2):
    for j in range(2):
      out = out + jax.nn.relu(product(pc[:, i:2 * h2:2, j:2 * w2:2])
                              + norm_bias)
  return out * 0.25


def conv_norm_relu_pool(x: jax.Array, kernel: jax.Array, conv_bias: jax.Array,
                        scale: jax.Array, norm_bias: jax.Array,
                        epsilon: float = 1e-5) -> jax.Array:
  """pool(relu(instance_norm(conv3x3(x, kernel) + conv_bias))) in float32:
  (n, H, W, Cin) -> (n, H // 2, W // 2, Cout), an odd map dropping its last
  row or column as nn.avg_pool does. `conv_bias` is accepted for the
  signature's sake: the normalisation removes it exactly. (Not in row
  chunks, unlike block_per_example: the training step already
  differentiates row chunks, and neither it nor the distillation step
  gained; benchmarks/RESULTS.md, "The first block in chunks".)"""
  del conv_bias  # mean subtraction cancels it (its gradient is zero)
  _check(x.shape, kernel.shape)
  pc, cov = patch_stats(x)
  k = kernel.astype(jnp.float32).reshape(9 * x.shape[-1], -1)
  a = _norm_gain(cov, k, scale, epsilon)                         # (n, Cout)
  return _phase_mean(pc, lambda ph: scaled_product(ph, k, a), norm_bias)


def block_per_example(pc: jax.Array, cov: jax.Array, kernel: jax.Array,
                      scale: jax.Array, norm_bias: jax.Array,
                      epsilon: float = 1e-5,
                      chunk: int | None = None) -> jax.Array:
  """The same block from `patch_stats(x)` with parameters given per
  example: kernel (n, 9 Cin, Cout), scale and norm_bias (n, Cout).
  Differentiating a sum of per-example losses with respect to these
  gives every example's own parameter gradient (pergrad.py) without the
  full-resolution activations; the patches are constants here (no input
  gradient). The pixels are taken pool phase by pool phase in one product
  per example, so that the kernel gradient is one (P x 4 h w) @
  (4 h w x Cout) product per example over untransposed arrays (per phase,
  XLA:CPU copied each phase's gradient transposed first: 1.5-1.8x slower,
  benchmarks/RESULTS.md).

  The rows go `chunk` at a time through a lax.map (None:
  `default_chunk`; 0: all at once), so that one chunk's full-resolution
  pre-activations (8 x 28 x 28 x 128 floats, 3 MB) stay in cache, forward
  and backward, where the microbatch's (38 MB at 96 rows) went through
  memory. Rows never mix, so the result does not depend on the chunk; the
  last chunk is padded with zero rows (finite through the block), whose
  outputs are dropped."""
  n, h, w, _ = pc.shape
  if chunk is None:
    chunk = default_chunk(h * w * kernel.shape[-1])
  require_int(chunk, "chunk", 0)
  rows = (pc, cov, kernel, scale, norm_bias)
  if not chunk or n <= chunk:
    return _block_per_example(*rows, epsilon)
  out = jax.lax.map(lambda t: _block_per_example(*t, epsilon),
                    split_rows(rows, chunk))
  return out.reshape(-1, *out.shape[2:])[:n]


def default_chunk(activations: int) -> int:
  """Rows per chunk of `block_per_example` whose rows hold `activations`
  floats each at full resolution (H W Cout): on CPU as many as fill
  CHUNK_BYTES (8 rows at 28x28 x 128, 6 at 32x32 x 128, at least 1), all
  at once (0) on accelerators (not measured there)."""
  if jax.default_backend() != "cpu":
    return 0
  return max(1, CHUNK_BYTES // (4 * activations))


def _block_per_example(pc, cov, kernel, scale, norm_bias, epsilon):
  """block_per_example on all of its rows at once."""
  a = _norm_gain(cov, kernel, scale, epsilon)
  kn = kernel * a[:, None, :]
  n, h, w, p = pc.shape
  h2, w2 = h // 2, w // 2
  z = jnp.einsum("nqp,npc->nqc", _phase_major(pc), kn)
  z = z.reshape(n, 4, h2, w2, -1)
  b = norm_bias[:, None, None, :]
  # Four adds, not a mean over the phase axis: XLA:CPU ran that mean as
  # a library reduction that needed its input (and ReLU's zeros) in
  # memory.
  return sum(jax.nn.relu(z[:, i] + b) for i in range(4)) * 0.25


def _phase_major(pc: jax.Array) -> jax.Array:
  """(n, H, W, P) -> (n, 4 (H // 2) (W // 2), P): the pixels of the 2x2
  pool's four phases one after the other (an odd map's last row or column
  dropped)."""
  n, h, w, p = pc.shape
  h2, w2 = h // 2, w // 2
  return (pc[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, p)
          .transpose(0, 2, 4, 1, 3, 5).reshape(n, 4 * h2 * w2, p))


@jax.custom_vjp
def scaled_product(p: jax.Array, k: jax.Array, a: jax.Array) -> jax.Array:
  """p[n] @ (k * a[n]) for every example n: (n, h, w, P) x (P, C) x (n, C)
  -> (n, h, w, C). The forward is one per-example product; the gradient
  with respect to p is (g * a) @ k^T, one product with the shared k
  (autodiff's per-example form transposed each (h w, C) cotangent first:
  a fifth of a 28x28 distillation step's thread time). Reverse mode only,
  as winograd.conv3x3: for jax.jvp use conv_impl='xla'."""
  return jnp.einsum("nhwp,npc->nhwc", p, k[None] * a[:, None, :])


def _scaled_product_fwd(p, k, a):
  return scaled_product(p, k, a), (p, k, a)


def _scaled_product_bwd(res, g):
  p, k, a = res
  gp = jnp.einsum("nhwc,pc->nhwp", g * a[:, None, None, :], k)
  gkn = jnp.einsum("nhwp,nhwc->npc", p, g)                      # (n, P, C)
  return gp, jnp.sum(gkn * a[:, None, :], axis=0), jnp.sum(gkn * k, axis=1)


scaled_product.defvjp(_scaled_product_fwd, _scaled_product_bwd)


def use_stem(impl: str, norm: str, x_shape, dtype) -> bool:
  """Whether a ConvNet's first block on inputs of `x_shape` (n, H, W, C)
  runs conv_norm_relu_pool: only for conv_impl 'auto' on the CPU backend,
  instance norm, float32, at most MAX_CHANNELS input channels and maps of
  at least MIN_PIXELS pixels ('xla' and 'winograd' keep the layer-by-layer
  block, the reference the tests compare against)."""
  return (impl == "auto" and jax.default_backend() == "cpu"
          and norm == "instance" and x_shape[-1] <= MAX_CHANNELS
          and x_shape[1] * x_shape[2] >= MIN_PIXELS and min(x_shape[1:3]) >= 2
          and jnp.dtype(dtype) == jnp.float32)
