"""Per-example L2 clipping and per-class clipped sums.

The only way private examples enter a released statistic in this library is
through the functions here, so their bound is the sensitivity that the
mechanisms in `mechanisms.py` calibrate noise to:

* `clip_rows` maps each row v to v * min(1, C / ||v||_2). Rows that are not
  finite are replaced by zeros (their contribution is 0 <= C); zero rows stay
  zero. With C = inf it is the identity on finite rows.
* `clipped_class_sums` embeds a padded batch, clips each embedding and sums
  them per class. One example lands in exactly one class row with norm <= C,
  so adding or removing one example moves the (K, d) result by at most C in
  Frobenius (L2) norm: the L2 sensitivity is C.
* The releases take these sums in fixed point (`bits`): each clipped row
  truncated toward zero to a grid of 2^-bits (no coordinate grows) and
  summed as int32 (`fixed_point_class_sums`, `fixed_point_weighted_sum`),
  bits from the rows of the whole release (`fixed_point_bits`) so that
  nothing overflows. Integer sums are exact in any order, so removing a
  row moves them by exactly that row's quantised vector and the bound C
  holds for the computed sums, not only for exact arithmetic (a float32
  sum's rounding depends on every row). A row's own float value can
  depend on the batch shape (chunk size, devices), which neighbouring
  datasets share: one release runs one program on one padded shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax.errors import require_int

EmbedFn = Callable[[Any, jax.Array], jax.Array]


def row_norms(v: jax.Array) -> jax.Array:
  """L2 norms of the rows of `v`, (n, d) -> (n, 1): inf for a row with an
  infinite entry (per-layer norms that overflowed, in pergrad), nan rows
  are the caller's to remove.

  Rows are scaled by their largest entry before squaring, so rows of
  magnitude 1e30 get their true norm instead of inf; zero rows get norm 0
  with a zero (not nan) gradient. Rows whose largest entry passes 2^100
  are first scaled by 2^-100 (exact): XLA divides by multiplying with the
  reciprocal, and 1 / m for m above 8.5e37 is a subnormal that the CPU
  flushes to zero, which gave such rows norm 0, so they went unclipped
  (a review's finding). A norm beyond float32's range is inf.
  """
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(v), axis=-1, keepdims=True))
  pre = jnp.where(m > 2.0 ** 100, 2.0 ** -100, 1.0)
  safe_m = jnp.where(m > 0, m * pre, 1.0)
  sq = jnp.sum(jnp.square(v * pre / safe_m), axis=-1, keepdims=True)
  nonzero = sq > 0
  norm = jnp.where(nonzero, safe_m * jnp.sqrt(jnp.where(nonzero, sq, 1.0))
                   * jnp.where(pre < 1, 2.0 ** 100, 1.0), 0.0)
  # m = inf made sq nan, which read as a zero row: norm 0, weight 1, the
  # row unclipped (a review's finding, through pergrad's layer norms).
  return jnp.where(m == jnp.inf, jnp.inf, norm)


def check_clip_norm(clip_norm) -> None:
  """Raises ValueError unless C > 0 (inf allowed: no clipping). nan or a
  negative C would silently turn clipping off or flip the sums' sign. A
  traced C cannot be checked here; `clip_scale` then gives every row
  weight 0 unless C > 0, so a nan or negative traced C releases nothing
  rather than unclipped rows."""
  if isinstance(clip_norm, jax.core.Tracer):
    return
  a = np.asarray(clip_norm)
  if a.ndim != 0 or not (np.issubdtype(a.dtype, np.number)
                         and not np.issubdtype(a.dtype, np.bool_)):
    raise ValueError(f"clip_norm must be one number (inf: no clipping), "
                     f"got {clip_norm!r}")
  c = float(a)
  if not c > 0:
    raise ValueError(f"clip_norm must be > 0 (inf: no clipping), got {c}")


# Rows are clipped to C (1 - 2^-18): float32 rounding of the norm, the
# division and the product leaves a clipped row up to a few ulps (~2e-7
# relatively, measured) above its target, so without the margin norms of
# C (1 + 2e-7) were reached; the margin covers ~64 ulps.
CLIP_MARGIN = 1.0 - 2.0 ** -18


def clip_scale(norms: jax.Array, clip_norm: float) -> jax.Array:
  """min(1, C' / norm) with C' = C CLIP_MARGIN, elementwise; 1 for zero
  norms (never nan), so a scaled row's float32 norm is <= C. 0 everywhere
  unless C > 0 (a traced nan or negative C; a concrete one is refused)."""
  check_clip_norm(clip_norm)
  target = clip_norm * CLIP_MARGIN
  scale = jnp.where(norms > target,
                    target / jnp.where(norms > 0, norms, 1.0), 1.0)
  if isinstance(clip_norm, jax.core.Tracer):  # a concrete C was checked
    scale = jnp.where(clip_norm > 0, scale, 0.0)
  return scale


def unclipped(clip_norm) -> bool:
  """Whether C is a concrete inf (no clipping: the scale is skipped); a
  traced C always goes through `clip_scale`."""
  return (not isinstance(clip_norm, jax.core.Tracer)
          and math.isinf(float(np.asarray(clip_norm))))


def clip_rows(v: jax.Array, clip_norm: float) -> jax.Array:
  """Clips every row of `v` (shape (n, d)) to L2 norm <= clip_norm.

  Computed in float32. Non-finite rows become zero, and so may a row whose
  norm passes C by a factor of about 2^126 (its weight C / norm is a
  subnormal, which the CPU flushes to zero): either way its norm is <= C.
  Safe (finite values and gradients) for zero rows; clip_norm = inf is the
  identity on finite rows.
  `v` must have rank 2: the norm is over the last axis, so an (n, h, w)
  array would be clipped per (n, h) row, each example up to h C
  (`clip_vector` clips one array of any shape as a whole).
  """
  check_clip_norm(clip_norm)
  v = jnp.asarray(v)
  if jnp.ndim(v) != 2:
    raise ValueError(f"clip_rows clips the rows of an (n, d) array, got "
                     f"shape {jnp.shape(v)}; flatten each example first")
  v = v.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(v), axis=-1, keepdims=True)
  v = jnp.where(finite, v, 0.0)
  if unclipped(clip_norm):
    return v
  return v * clip_scale(row_norms(v), clip_norm)


def clip_vector(v: jax.Array, clip_norm: float) -> jax.Array:
  """Clips one vector (any shape, flattened for the norm) to norm <= C."""
  return clip_rows(v.reshape(1, -1), clip_norm).reshape(v.shape)


def check_labels(y, num_classes: int, rows: int) -> None:
  """Raises ValueError for labels that are not integers in 0..K-1, one per
  row (checked on concrete arrays only), or a class count below 1."""
  if isinstance(num_classes, bool) or not isinstance(
      num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be an integer >= 1, got "
                     f"{num_classes!r}")
  if isinstance(y, jax.core.Tracer):
    # The shape is static: a (1,) label vector would broadcast, every row
    # summed into one class.
    if y.shape != (rows,):
      raise ValueError(f"labels of shape {y.shape} for {rows} rows")
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return
  a = np.asarray(y)
  if a.shape != (rows,):
    raise ValueError(f"labels of shape {a.shape} for {rows} rows")
  if not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {a.dtype}")
  if a.size and (a.min() < 0 or a.max() >= num_classes):
    # Which side, not the private labels' extreme values.
    side = "negative labels" if a.min() < 0 else (
        f"labels >= {num_classes}")
    raise ValueError(f"labels must be in 0..{num_classes - 1}, got {side}")


def check_mask(mask, rows: int) -> None:
  """Raises ValueError unless the mask has one value per row, shape
  (rows,): a mask of shape (1,) or () would broadcast and count every
  padded row (one repeated example many times, above the sensitivity)."""
  if jnp.shape(mask) != (rows,):
    raise ValueError(f"mask must have shape ({rows},), one value per row, "
                     f"got {jnp.shape(mask)}")


def _check_class_rows(values, y, mask, num_classes: int, what: str) -> None:
  """The checks of a per-class sum: (n, d) rows, one label in 0..K-1 and
  one mask value per row."""
  if jnp.ndim(values) != 2:
    raise ValueError(f"{what} sums the rows of an (n, d) array, got shape "
                     f"{jnp.shape(values)}")
  check_labels(y, num_classes, values.shape[0])
  check_mask(mask, values.shape[0])


def class_sums(values: jax.Array, y: jax.Array, mask: jax.Array,
               num_classes: int) -> jax.Array:
  """Masked per-class sums of rows: (n, d) -> (K, d), in float32.

  Rows with mask 0 contribute exactly nothing (they are multiplied by an
  exact zero and also zeroed before the product, so inf/nan cannot leak).
  The mask is read as a boolean (> 0: a row counts once, whatever the
  value; nan counts as 0), as `clipped_grad_sum` reads it, so no row can
  weigh more than one. Labels outside 0..K-1 are refused where they are
  concrete (a traced batch is the caller's responsibility: such a row
  would be dropped). Precision.HIGHEST for the reason given in
  `weighted_sum`.
  """
  _check_class_rows(values, y, mask, num_classes, "class_sums")
  keep = (jnp.asarray(mask) > 0)[:, None]
  values = jnp.where(keep, values.astype(jnp.float32), 0.0)
  onehot = jnp.where(keep, jax.nn.one_hot(y, num_classes, dtype=jnp.float32),
                     0.0)
  return jnp.einsum("nk,nd->kd", onehot, values,
                    precision=jax.lax.Precision.HIGHEST)


MAX_FIXED_POINT_BITS = 100
# The most rows `fixed_point_bits` accepts: a row keeps at least 2^8 units
# of its range and all rows together fit int32, so rows <= (2^31 - 1) / 2^8.
MAX_FIXED_POINT_ROWS = (2 ** 31 - 1) // 2 ** 8


def fixed_point_bits(rows: int, bound: float) -> int:
  """Bits after the binary point for `fixed_point_class_sums` of `rows`
  values of magnitude <= bound: the largest integer s (negative for large
  bounds) with rows bound 2^s < 2^31, so no int32 sum can overflow, and
  at most MAX_FIXED_POINT_BITS. Refused when one row's range [-bound,
  bound] would hold fewer than 2^8 steps of 2^-s (more than 2^23 rows,
  or a bound below about 2^-92) or s < -MAX_FIXED_POINT_BITS."""
  if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)):
    raise ValueError(f"rows must be an integer, got {rows!r}")
  if not (rows >= 1 and 0 < float(bound) < math.inf):
    raise ValueError(f"need rows >= 1 and a finite bound > 0, got {rows}, "
                     f"{bound}")
  bound = float(bound)
  # In logs: the quotient overflows float for a bound below ~1e-300.
  s = math.floor(math.log2(2 ** 31 - 1) - math.log2(rows) - math.log2(bound))
  # 2^s is applied in float32 (range 2^-126 .. 2^127): s beyond +-100
  # would turn the scale into inf or 0 (a bound below 1e-21 or above 1e30).
  s = min(s, MAX_FIXED_POINT_BITS)
  while rows * bound * 2.0 ** s >= 2 ** 31 - 1:  # log2 rounding
    s -= 1
  if bound * 2.0 ** s < 2 ** 8 or s < -MAX_FIXED_POINT_BITS:
    raise ValueError(f"{rows} rows of magnitude <= {bound} leave "
                     f"{math.log2(bound) + s:.1f} bits of resolution per "
                     "row in an int32 sum (at least 8 needed, with a scale "
                     f"2^s, |s| <= {MAX_FIXED_POINT_BITS})")
  return s


def fixed_point_scale(bits: int | None) -> float | None:
  """The value of one unit of a fixed-point sum, 2^-bits (None for float
  sums, bits None): the `scale` of `noise.add_gaussian_noise`."""
  return None if bits is None else 2.0 ** -bits


def check_fixed_point(bits, rows: int, clip_norm) -> None:
  """Raises ValueError unless `bits` is an integer and `rows` values of
  magnitude <= C (a concrete, finite C) fit an int32 sum at 2^-bits. The
  caller checks the same against ALL the rows that one sum adds (over
  chunks and devices); this checks the rows it sees."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f"bits must be an integer, got {bits!r}")
  if isinstance(clip_norm, jax.core.Tracer) or unclipped(clip_norm):
    raise ValueError("fixed-point sums need a concrete, finite clip_norm "
                     "(it bounds every coordinate)")
  if bits > fixed_point_bits(rows, float(np.asarray(clip_norm))):
    raise ValueError(f"bits={bits} overflows an int32 sum of {rows} rows "
                     f"of magnitude <= {clip_norm}")


def fixed_point_class_sums(values: jax.Array, y: jax.Array, mask: jax.Array,
                           num_classes: int, bits: int) -> jax.Array:
  """Masked per-class sums of rows in fixed point: (n, d) -> (K, d) int32,
  the sums of trunc(v 2^bits) (toward zero, so each row's L2 norm can only
  shrink) over the kept rows, exact in any order and over any devices (an
  integer psum): removing a row moves the result by exactly that row's
  quantised vector. Multiply by 2^-bits in float64 to read them (the
  release does: `noise.add_gaussian_noise(..., scale=2.0 ** -bits)`).
  |v| must stay below 2^31 / (n 2^bits) per coordinate (`fixed_point_bits`
  with the total rows); non-finite rows and rows with mask 0 count 0.
  """
  _check_class_rows(values, y, mask, num_classes, "fixed_point_class_sums")
  v = values.astype(jnp.float32)
  keep = (jnp.asarray(mask) > 0) & jnp.all(jnp.isfinite(v), axis=1)
  q = quantise(jnp.where(keep[:, None], v, 0.0), bits)
  # A traced label outside 0..K-1 is dropped, as in class_sums: sent to
  # segment -1 before the int32 cast (an int64 label 2^32 + 1 wrapped to
  # class 1 and was counted there).
  y = jnp.asarray(y)
  y = jnp.where((y >= 0) & (y < num_classes), y, -1).astype(jnp.int32)
  return jax.ops.segment_sum(q, y, num_segments=num_classes)


def quantise(v: jax.Array, bits: int) -> jax.Array:
  """trunc(v 2^bits) as int32: the one rounding rule of the fixed-point
  sums, toward zero, so no coordinate (and no row's norm) grows. v is
  float32 and finite; 2^bits scales it exactly (a power of two)."""
  return jnp.trunc(v * 2.0 ** bits).astype(jnp.int32)


def clipped_class_sums(embed_fn: EmbedFn, params: Any, x: jax.Array,
                       y: jax.Array, mask: jax.Array, *, num_classes: int,
                       clip_norm: float,
                       chunk_size: int | None = None,
                       bits: int | None = None,
                       skip_padding: bool = True) -> jax.Array:
  """Sums of per-example clipped embeddings per class.

  Args:
    embed_fn: embed(params, x) -> (n, d), applied per example (it must not
      mix examples, e.g. no BatchNorm).
    params: parameters of the embedding.
    x: (n, H, W, C) padded batch.
    y: (n,) integer labels in [0, num_classes).
    mask: (n,) 1 for real rows, 0 for padding.
    num_classes: K.
    clip_norm: C, the per-example L2 bound (inf disables clipping).
    chunk_size: if set and smaller than n, the rows are embedded in chunks
      of this many (the last one padded with mask-0 rows) by a `lax.scan`
      that accumulates the sums. A performance option only: the result is
      the same up to float rounding (the rows' values may round
      differently at another chunk size; with bits, their int32 sums add
      exactly). On CPU, chunks whose activations fit the cache run faster
      than one large batch.
    bits: if set, the sums are in fixed point, as the releases take them:
      int32 sums of trunc(clip_C(v) 2^bits) (`fixed_point_class_sums`),
      exact in any order, so that removing one row moves them by exactly
      that row's quantised vector, norm <= C (a float32 sum of many rows
      rounds in a way that depends on every row: measured 1.00012 C over
      30000 rows). C must be a finite number and bits at most
      `fixed_point_bits(total rows, C)`.
    skip_padding: with chunks, skip those of padding only (faster; the
      time then follows the realised rows), or compute them (False: the
      time follows n). The same sums either way (`microbatched`).

  Returns:
    (K, d) float32 sums, or int32 in units of 2^-bits; L2 sensitivity C
    under add/remove of one row.
  """
  if chunk_size is not None:
    require_int(chunk_size, "chunk_size", 1)
  x, y, mask = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)
  if x.shape[0] == 0:
    raise ValueError(f"need n >= 1 rows, got x {x.shape}")
  check_mask(mask, x.shape[0])
  check_labels(y, num_classes, x.shape[0])  # before chunking reshapes y
  check_clip_norm(clip_norm)
  if bits is not None:
    check_fixed_point(bits, x.shape[0], clip_norm)

  def sums(p, batch, ms):
    xs, ys = batch
    clipped = clip_rows(embed_fn(p, xs), clip_norm)
    if bits is None:
      return class_sums(clipped, ys, ms, num_classes)
    return fixed_point_class_sums(clipped, ys, ms, num_classes, bits)

  return microbatched(sums, chunk_size, skip_padding=skip_padding)(
      params, (x, y), mask)

@dataclasses.dataclass(frozen=True)
class ClippedClassSum:
  """A per-class clipped-sum query that carries its own L2 sensitivity.

  Calling it is `clipped_class_sums` with the stored embedding, K and C;
  `l2_sensitivity` is what a Gaussian mechanism must calibrate to.
  """
  embed_fn: EmbedFn
  num_classes: int
  clip_norm: float

  def __post_init__(self):
    check_clip_norm(self.clip_norm)  # the sensitivity it reports
    check_labels(np.zeros(0, np.int32), self.num_classes, 0)

  @property
  def l2_sensitivity(self) -> float:
    return float(self.clip_norm)

  def __call__(self, params, x, y, mask, bits: int | None = None
               ) -> jax.Array:
    """The sums (int32 in fixed point with `bits`, as a release takes
    them: see `clipped_class_sums`)."""
    return clipped_class_sums(self.embed_fn, params, x, y, mask,
                              num_classes=self.num_classes,
                              clip_norm=self.clip_norm, bits=bits)


def clipped_grad_sum(loss_fn: Callable[..., jax.Array], params: Any,
                     batch: Any, mask: jax.Array, *,
                     clip_norm: float, bits: int | None = None) -> Any:
  """Sum over examples of per-example gradients clipped to L2 norm C.

  Args:
    loss_fn: loss_fn(params, example_batch) -> scalar, called with every
      example as a batch of one (leading axis 1), so any Flax model that
      expects a batch axis works unchanged. It must not mix examples.
    params: the parameters (any pytree).
    batch: pytree of arrays with a common leading axis n (padded).
    mask: (n,) 1 for real examples, 0 for padding.
    clip_norm: C; the norm is over the whole parameter pytree.
    bits: if set, the sums are int32 in fixed point, as DP-SGD releases
      them (`fixed_point_weighted_sum`; C finite, bits at most
      `fixed_point_bits(total rows, C)`).

  Returns:
    A pytree like params, float32 (int32 in units of 2^-bits): sum_i
    mask_i clip_C(grad_i). Padded examples contribute nothing; non-finite
    gradients contribute zero; the L2 sensitivity under add/remove of one
    example is C.
  """
  n = batch_rows(batch)
  if n == 0:
    raise ValueError("need n >= 1 examples, got an empty batch")
  mask = jnp.asarray(mask)
  check_mask(mask, n)
  check_clip_norm(clip_norm)
  if bits is not None:
    check_fixed_point(bits, n, clip_norm)

  if not jax.tree.leaves(params):
    raise ValueError("params has no arrays: there is nothing to "
                     "differentiate")
  # Inside a caller's shard_map, the gradient of a device-invariant
  # (replicated) parameter is summed over the devices, so each
  # "per-example" gradient would be a sum of one example per device,
  # clipped as one: params are made to vary like the batch first.
  params = vary_like(params, (batch, mask))

  def one(p, ex):
    return jax.grad(loss_fn)(p, jax.tree.map(lambda a: a[None], ex))

  grads = jax.vmap(one, in_axes=(None, 0))(params, batch)
  # float32 first, as the sums: a float64 value beyond float32's range is
  # non-finite here and zeroed, not turned into inf (times 0: NaN) later.
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  leaves = [g.reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)]
  flat = jnp.concatenate(leaves, axis=1)
  finite = jnp.all(jnp.isfinite(flat), axis=1)
  flat = jnp.where(finite[:, None], flat, 0.0)
  scale = clip_scale(row_norms(flat)[:, 0], clip_norm)
  weights = jnp.where(finite & (mask > 0), scale, 0.0)
  return jax.tree.map(
      lambda g: weighted_sum(weights, jnp.where(jnp.isfinite(g), g, 0.0),
                             bits),
      grads)


def _varying_axes(a) -> frozenset:
  """The shard_map mesh axes `a` varies over (empty outside shard_map)."""
  t = jax.typeof(a)
  manual = getattr(t, "manual_axis_type", None)  # jax 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(t, "vma", ()))


def vary_like(params: Any, refs: Any) -> Any:
  """params with each leaf made device-varying (jax.lax.pcast) over the
  shard_map axes that the leaves of `refs` vary over and it does not: a
  no-op outside shard_map. Per-example gradients of the result are each
  example's own (see parallel.py's sharp edge)."""
  axes = frozenset().union(*(_varying_axes(a) for a in jax.tree.leaves(refs)))
  if not axes:
    return params

  def vary(p):
    missing = tuple(sorted(axes - _varying_axes(p)))
    return jax.lax.pcast(p, missing, to="varying") if missing else p

  return jax.tree.map(vary, params)


def weighted_sum(weights: jax.Array, values: jax.Array,
                 bits: int | None = None) -> jax.Array:
  """sum_i weights_i values_i over the leading axis, float32-exact, or
  with `bits` in fixed point (`fixed_point_weighted_sum`).

  Every sum that a sensitivity bound covers (clip weight times per-example
  value) goes through here or `class_sums`: Precision.HIGHEST, because the
  default precision of a float32 contraction is TF32 on recent GPUs and
  bf16 on TPUs, whose input rounding lets one clipped contribution exceed C
  by up to ~2^-11 (GPU) or ~2^-8 (TPU) relatively.
  """
  if bits is not None:
    return fixed_point_weighted_sum(weights, values, bits)
  return jnp.tensordot(weights.astype(jnp.float32),
                       values.astype(jnp.float32), axes=(0, 0),
                       precision=jax.lax.Precision.HIGHEST)


def fixed_point_weighted_sum(weights: jax.Array, values: jax.Array,
                             bits: int) -> jax.Array:
  """sum_i trunc(weights_i values_i 2^bits) over the leading axis, int32.

  The products are float32 (the clipped vectors, norm <= C), truncated
  toward zero (no coordinate grows) and added as integers: exact in any
  order, so removing one example moves the sum by exactly its quantised
  clipped vector. `values` must be finite (the callers zero non-finite
  rows) and |weights_i values_i| 2^bits times the rows of the whole sum
  below 2^31 (`fixed_point_bits`).
  """
  w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (values.ndim - 1))
  # dtype: with jax_enable_x64 on, jnp.sum widened int32 to int64 (and
  # pergrad's int32 scan carry then failed).
  return jnp.sum(quantise(w * values.astype(jnp.float32), bits), axis=0,
                 dtype=jnp.int32)


def default_query_chunk() -> int | None:
  """Chunk size of the forward-only clipped sums when the user sets none:
  100 examples on CPU (chunks of 50-100 ran 1.25-1.45x faster
  than one large batch there, benchmarks/RESULTS.md), the whole batch on
  accelerators."""
  return 100 if jax.default_backend() == "cpu" else None


def batch_rows(batch: Any) -> int:
  """The common leading axis of a batch's leaves (its rows); ValueError
  for a batch with no array or leaves of different lengths (vmap's own
  error names neither)."""
  shapes = [np.shape(a) for a in jax.tree.leaves(batch)]
  if not shapes or any(not s for s in shapes):
    raise ValueError("the batch must be arrays (or a pytree of arrays) "
                     "with a leading axis of examples")
  rows = {s[0] for s in shapes}
  if len(rows) > 1:
    raise ValueError(f"the batch's arrays must share their leading axis "
                     f"(one row per example), got lengths {sorted(rows)}")
  return shapes[0][0]


def split_rows(tree: Any, target: int) -> Any:
  """Every leaf (a common leading axis of n rows) as (chunks, size, ...):
  the fewest chunks of at most `target` rows, all of one size, the last
  padded with fewer zero rows than there are chunks (mask-0 rows where
  the tree holds a mask)."""
  n = jax.tree.leaves(tree)[0].shape[0]
  chunks = -(-n // max(1, target))
  size = -(-n // chunks)
  extra = chunks * size - n

  def split(a):
    a = jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((chunks, size, *a.shape[1:]))

  return jax.tree.map(split, tree)


def microbatched(grad_sum_fn: Callable[..., Any],
                 microbatch: int | None, *,
                 skip_padding: bool = True) -> Callable[..., Any]:
  """grad_sum_fn(params, batch, mask) evaluated on equal chunks of at most
  `microbatch` examples (padded with fewer mask-0 rows than chunks, not
  up to a multiple of `microbatch`) whose sums are added by
  a `lax.scan`: the per-example gradients of one chunk at a time are in
  memory. Keyword arguments (e.g. `bits`) go to every chunk's call. Same
  result up to float rounding (int32 sums add exactly; a row's value may
  round differently at another chunk size);
  None or 0 returns grad_sum_fn unchanged. With skip_padding (the
  default) a chunk whose mask is all zero is skipped (`lax.cond`): its
  rows add nothing, and the padded slots of a packed Poisson batch come
  last, so the time follows the realised batch, not the padded capacity
  (a timing side channel on the batch size; README, "Not protected").
  skip_padding=False computes every chunk (the same sums): the time then
  follows the padded capacity, a public bound."""
  if microbatch is None:
    return grad_sum_fn
  require_int(microbatch, "microbatch", 0)
  if microbatch == 0:
    return grad_sum_fn

  def chunked(params, batch, mask, **kwargs):
    mask = jnp.asarray(mask)
    if microbatch >= mask.shape[0]:
      return grad_sum_fn(params, batch, mask, **kwargs)
    batch_c, mask_c = split_rows((batch, mask), microbatch)
    # Zeros shaped like one chunk's sums (and device-varying like the
    # rows inside shard_map), so that the scan holds the only copy of
    # grad_sum_fn: half the compilation of peeling the first chunk.
    fn = functools.partial(grad_sum_fn, **kwargs)
    shapes = jax.eval_shape(fn, params,
                            jax.tree.map(lambda a: a[0], batch_c), mask_c[0])
    zero = jnp.zeros_like(mask.reshape(-1)[0], jnp.float32)
    init = jax.tree.map(
        lambda s: jnp.broadcast_to(zero.astype(s.dtype), s.shape), shapes)

    def body(total, chunk):
      if not skip_padding:
        return jax.tree.map(jnp.add, total, fn(params, *chunk)), None
      # A chunk of padding only (Poisson batches are packed: their padded
      # slots come last) adds exact zeros: skipped, so that a step's time
      # follows the realised batch, not the padded capacity.
      return jax.lax.cond(
          jnp.any(chunk[1] != 0),
          lambda: jax.tree.map(jnp.add, total, fn(params, *chunk)),
          lambda: total), None

    total, _ = jax.lax.scan(body, init, (batch_c, mask_c))
    return total

  if hasattr(grad_sum_fn, "clip_norm"):  # what it clips to, kept
    chunked.clip_norm = grad_sum_fn.clip_norm
  return chunked
