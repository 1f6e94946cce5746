"""3x3 stride-1 'SAME' convolutions by Winograd's minimal filtering
F(2x2, 3x3), written as one batched matrix product.

Each 2x2 block of output pixels is computed from the 4x4 input tile
around it: the tile is transformed (V = B^T d B), the kernel is
transformed (U = G g G^T), the 16 transformed positions are 16 independent
(tiles x Cin) @ (Cin x Cout) matrix products, and the output block is
A^T M A. That is 16 products per 2x2 block instead of 36 for the direct
convolution (2.25x fewer multiplications), and the products are plain
matmuls, which XLA:CPU runs near the machine's matmul rate while its own
convolution does not (benchmarks/RESULTS.md, bench_layers.py). Every
transform is additions and halvings, so the rounding error is that of a
direct convolution (tests/test_winograd.py checks both against float64).

Rows never mix: the matmul's rows are (example, tile) pairs, so output
row i depends on input row i alone, as per-example clipping requires. The
gradients (a custom VJP, see conv3x3) are Winograd products too; autodiff
of the forward gave the same values but compiled 2-3x slower and ran
about 1.2x slower.

`conv3x3` is the algorithm; `models.ConvNet` picks it or XLA's
convolution per layer (`use_winograd`): on CPU for layers with at least
`MIN_CHANNELS` input channels and `MIN_PIXELS` pixels, never on GPU/TPU,
where XLA calls cuDNN or the TPU's convolution units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# With fewer input channels the 16 products are thin (K = Cin): in
# one-off probes (memory kept, 4x4 to 16x16 maps) 16 and 32 channels lost
# 10-15 % on the forward pass and won 1.1-2x on the gradients; 64 and 128
# won both (forward 1.5-2.3x). The ConvNet's first layer (3 or 1
# channels) stays on XLA (bench_layers.py: Winograd took 2x its time).
MIN_CHANNELS = 64
# On maps smaller than 8x8 (digits' 4x4 layer) the convolution is cheap
# and Winograd's extra compile time (about 0.5 s forward, 1.5-2.5 s with
# the gradient, per layer and jitted function) is not repaid: a whole
# digits run took 181 s with it against 149 s without.
MIN_PIXELS = 64

IMPLS = ("auto", "xla", "winograd")


def _input_transform(d0, d1, d2, d3):
  """Rows of B^T d for F(2, 3): B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],
  [0,1,0,-1]]."""
  return (d0 - d2, d1 + d2, d2 - d1, d1 - d3)


def _output_transform(m0, m1, m2, m3):
  """Rows of A^T m for F(2, 3): A^T = [[1,1,1,0],[0,1,-1,-1]]."""
  return (m0 + m1 + m2, m1 - m2 - m3)


def _output_adjoint(g0, g1):
  """Rows of A g, the adjoint of _output_transform."""
  return (g0, g0 + g1, g0 - g1, -g1)


def kernel_transform(kernel: jax.Array) -> jax.Array:
  """U = G g G^T for every (Cin, Cout) pair: (..., 3, 3, Cin, Cout) ->
  (..., 16, Cin, Cout), with G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],
  [0,0,1]]."""

  def rows(g0, g1, g2):
    return (g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2)

  half = rows(*(kernel[..., i, :, :, :] for i in range(3)))
  u = [rows(*(h[..., j, :, :] for j in range(3))) for h in half]
  return jnp.stack([c for r in u for c in r], axis=-3)


def kernel_adjoint(du: jax.Array) -> jax.Array:
  """G^T du G, the adjoint of kernel_transform: (..., 16, Cin, Cout) ->
  (..., 3, 3, Cin, Cout)."""

  def rows(d0, d1, d2, d3):
    return (d0 + (d1 + d2) * 0.5, (d1 - d2) * 0.5, (d1 + d2) * 0.5 + d3)

  d = du.reshape(*du.shape[:-3], 4, 4, *du.shape[-2:])
  half = rows(*(d[..., i, :, :, :] for i in range(4)))
  return jnp.stack([jnp.stack(rows(*(h[..., j, :, :] for j in range(4))),
                              axis=-3) for h in half], axis=-4)


def _tiles(h: int, w: int) -> tuple[int, int]:
  return -(-h // 2), -(-w // 2)


def input_tiles(x: jax.Array) -> jax.Array:
  """V = B^T d B of every 4x4 input tile: (n, H, W, C) -> (16, n, T, C)
  with T = ceil(H/2) * ceil(W/2) tiles per example, row-major."""
  n, h, w, c = x.shape
  th, tw = _tiles(h, w)
  # 'SAME' adds one pixel each side; whole tiles may need one more.
  xp = jnp.pad(x, ((0, 0), (1, 1 + 2 * th - h), (1, 1 + 2 * tw - w),
                   (0, 0)))
  # Tile t along an axis reads padded pixels 2t .. 2t + 3. One transform
  # per axis, each its own stack (one stack of all 16 compiles 3x slower).
  rows = [xp[:, k:k + 2 * th - 1:2] for k in range(4)]      # (n, th, W', C)
  v = jnp.stack(_input_transform(*rows))                    # (4, n, th, W', C)
  cols = [v[:, :, :, k:k + 2 * tw - 1:2] for k in range(4)]
  v = jnp.stack(_input_transform(*cols), axis=1)            # (4, 4, n, th, tw, C)
  return v.reshape(16, n, th * tw, c)


def output_tiles_adjoint(g: jax.Array) -> jax.Array:
  """A g A^T of every 2x2 output block of g: (n, H, W, C) -> (16, n, T, C),
  the adjoint of the output transform (zero beyond H, W)."""
  n, h, w, c = g.shape
  th, tw = _tiles(h, w)
  gp = jnp.pad(g, ((0, 0), (0, 2 * th - h), (0, 2 * tw - w), (0, 0)))
  gp = gp.reshape(n, th, 2, tw, 2, c)
  v = jnp.stack(_output_adjoint(gp[:, :, 0], gp[:, :, 1]))  # (4, n, th, tw, 2, C)
  v = jnp.stack(_output_adjoint(v[..., 0, :], v[..., 1, :]), axis=1)
  return v.reshape(16, n, th * tw, c)


def _output(m: jax.Array, h: int, w: int) -> jax.Array:
  """A^T m A per tile: (16, n, T, C) -> (n, H, W, C)."""
  _, n, _, c = m.shape
  th, tw = _tiles(h, w)
  m = m.reshape(4, 4, n, th, tw, c)
  rows = _output_transform(*(m[i] for i in range(4)))       # 2 x (4, n, th, tw, C)
  y = jnp.stack([jnp.stack(_output_transform(*(r[j] for j in range(4))),
                           axis=3) for r in rows], axis=2)  # (n, th, 2, tw, 2, C)
  return y.reshape(n, 2 * th, 2 * tw, c)[:, :h, :w]


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, cin = x.shape
  v = input_tiles(x).reshape(16, -1, cin)
  m = jnp.einsum("bpc,bco->bpo", v, kernel_transform(kernel).astype(v.dtype))
  return _output(m.reshape(16, n, -1, kernel.shape[3]), h, w)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Same result as lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
  dimension_numbers=('NHWC', 'HWIO', 'NHWC')) for a (3, 3, Cin, Cout)
  kernel and any H, W (odd sizes are padded to whole tiles and cropped).

  Reverse-mode gradients are Winograd too (a custom VJP: the input
  gradient is conv3x3 of the output gradient with the kernel rotated 180
  degrees and Cin, Cout swapped; the kernel gradient is V^T (A g A^T)
  mapped back by G^T . G). Forward-mode (jax.jvp) is not defined; use
  conv_impl='xla' for it.
  """
  _check(x, kernel)
  return _conv(x, kernel)


def _check(x, kernel):
  if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or x.ndim != 4 or (
      x.shape[-1] != kernel.shape[2]):
    raise ValueError(
        f"conv3x3 needs NHWC input and a (3, 3, Cin, Cout) kernel with "
        f"matching Cin; got x {x.shape}, kernel {kernel.shape}")


def _conv3x3_fwd(x, kernel):
  _check(x, kernel)
  return _conv(x, kernel), (x, kernel)


def kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The kernel gradient of sum(conv(x, k) * g) for a 3x3 'SAME' layer,
  V^T (A g A^T) mapped back by G^T . G: (3, 3, Cin, Cout). V
  (input_tiles(x)) is recomputed rather than saved by the forward: it is
  4x the layer's input, and its transforms are additions."""
  cin, cout = x.shape[-1], g.shape[-1]
  du = jnp.einsum("bpc,bpo->bco", input_tiles(x).reshape(16, -1, cin),
                  output_tiles_adjoint(g).reshape(16, -1, cout))
  return kernel_adjoint(du)


def _conv3x3_bwd(res, g):
  x, kernel = res
  gx = _conv(g, kernel[::-1, ::-1].swapaxes(2, 3))
  return gx.astype(x.dtype), kernel_grad(x, g).astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv_3x3_same(x: jax.Array, kernel: jax.Array,
                  impl: str = "auto", min_pixels: int | None = None
                  ) -> jax.Array:
  """The 3x3 stride-1 'SAME' NHWC/HWIO convolution by `impl` ('auto',
  'xla' or 'winograd'; see use_winograd)."""
  if use_winograd(impl, x.shape[-1], x.shape[1:3], min_pixels):
    return conv3x3(x, kernel)
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def use_winograd(impl: str, in_channels: int, spatial: tuple[int, int],
                 min_pixels: int | None = None) -> bool:
  """Whether a 3x3 'SAME' layer with `in_channels` inputs on (H, W) maps
  runs conv3x3: 'winograd' always, 'xla' never, 'auto' on the CPU backend
  for at least MIN_CHANNELS input channels and MIN_PIXELS pixels (or
  `min_pixels`, for a caller whose own measurements differ: pergrad.py).
  Decided at trace time from jax.default_backend()."""
  if impl not in IMPLS:
    raise ValueError(f"unknown conv_impl {impl!r}; expected one of {IMPLS}")
  if impl == "auto":
    floor = MIN_PIXELS if min_pixels is None else min_pixels
    return (jax.default_backend() == "cpu" and in_channels >= MIN_CHANNELS
            and spatial[0] * spatial[1] >= floor)
  return impl == "winograd"
