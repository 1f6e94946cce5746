"""The batched-matmul per-example gradients equal jax.grad per example."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import clipping, pergrad, stem
from dpgeng_jax.clipping import (clipped_class_sums, clipped_grad_sum,
                                 microbatched)
from dpgeng_jax.models import ConvNet, cross_entropy, embed_fn, init_params


@functools.cache
def _case(norm):
  model = ConvNet(num_classes=4, width=8, depth=2, norm=norm)
  params = init_params(model, jax.random.key(1), (8, 8, 3))
  x = jax.random.normal(jax.random.key(2), (6, 8, 8, 3)) * 2
  y = jnp.arange(6) % 4
  return model, params, x, y


def _rel(a, b):
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))
  return max(float(jnp.max(jnp.abs(u - v))) for u, v in
             zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale


def _check_each(model, ref, params, x, y, rows, tol):
  """pergrad's per-example gradients on `model` equal jax.grad of each
  example through `ref` (the same parameters); returns them."""
  got = jax.jit(functools.partial(pergrad.per_example_grads, model))(
      params, x, y)
  one = jax.jit(lambda p, xi, yi: jax.grad(
      lambda q: cross_entropy(ref, q, xi, yi))(p))
  for i in rows:
    want = one(params, x[i:i + 1], y[i:i + 1])
    assert _rel(jax.tree.map(lambda g: g[i], got), want) < tol
  return got


def _check_sum(model, params, x, y, mask, clip_norm, tol, chunk=None):
  """pergrad's clipped gradient sum equals the generic path's; returns it."""
  loss = lambda p, b: cross_entropy(model, p, *b)
  want = clipped_grad_sum(loss, params, (x, y), mask, clip_norm=clip_norm)
  got = jax.jit(functools.partial(pergrad.convnet_clipped_grad_sum, model,
                                  clip_norm=clip_norm, chunk=chunk))(
                                      params, x, y, mask)
  assert _rel(got, want) < tol
  return got


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_per_example_grads_equal_jax_grad_of_each_example(norm):
  model, params, x, y = _case(norm)
  _check_each(model, model, params, x, y, (0, 5), 1e-5)


@pytest.mark.parametrize("size,depth", [(7, 2), (5, 2), (3, 1), (28, 3)])
def test_per_example_grads_equal_jax_grad_on_odd_maps(size, depth):
  """Odd maps (28 -> 14 -> 7 -> 3 at depth 3) pool as the model does:
  VALID 2x2 pooling drops the last row and column."""
  model = ConvNet(num_classes=3, width=4, depth=depth)
  params = init_params(model, jax.random.key(1), (size, size, 1))
  x = jax.random.normal(jax.random.key(2), (3, size, size, 1))
  y = jnp.arange(3)
  _check_each(model, model, params, x, y, range(3), 1e-5)


@pytest.mark.parametrize("clip_norm", [0.05, 1e9, math.inf])
def test_clipped_grad_sum_equals_the_generic_path(clip_norm):
  """Clipping active (0.05), inactive (1e9) and off (inf); padded rows."""
  model, params, x, y = _case("instance")
  mask = jnp.array([1, 1, 0, 1, 1, 1.0])
  _check_sum(model, params, x, y, mask, clip_norm, 1e-5)


def test_fixed_point_sum_equals_the_generic_path_and_is_exact_per_row():
  """With bits (as DP-SGD releases): int32 sums close to the generic
  path's, the same at every chunk size up to the per-example values'
  float differences, and one example moves them by its own quantised
  clipped gradient, norm <= C."""
  model, params, x, y = _case("instance")
  mask = jnp.array([1, 1, 0, 1, 1, 1.0])
  c, bits = 0.05, 24
  loss = lambda p, b: cross_entropy(model, p, *b)
  want = clipped_grad_sum(loss, params, (x, y), mask, clip_norm=c,
                          bits=bits)
  f = jax.jit(functools.partial(pergrad.convnet_clipped_grad_sum, model,
                                clip_norm=c, bits=bits),
              static_argnames="chunk")
  for chunk in (2, 6):
    got = f(params, x, y, mask, chunk=chunk)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.dtype == jnp.int32
      # a few units per example: float differences of the gradients
      assert int(jnp.max(jnp.abs(a - b))) <= 2 ** bits * c * 1e-4
  full = [np.asarray(a, np.int64) for a in jax.tree.leaves(f(
      params, x, y, mask, chunk=2))]
  for i in (0, 4):
    part = jax.tree.leaves(f(params, x, y, mask.at[i].set(0.0), chunk=2))
    one = jax.tree.leaves(f(params, x, y, jnp.zeros(6).at[i].set(1.0),
                            chunk=2))
    moved = np.concatenate([(a - np.asarray(b, np.int64)).ravel()
                            for a, b in zip(full, part)])
    np.testing.assert_array_equal(
        moved, np.concatenate([np.asarray(a).ravel() for a in one]))
    assert np.linalg.norm(moved * 2.0 ** -bits) <= c


@pytest.mark.parametrize("bad", [math.nan, 1e30])
def test_a_non_finite_or_huge_example_moves_no_other_rows_contribution(bad):
  """Its chunk takes the overflow-safe branch, whose norms rounded
  differently: adding one example with non-finite (or huge) gradients
  moved hundreds of OTHER rows' fixed-point coordinates. The sum must
  move by exactly that example's own contribution."""
  model, params, x, y = _case("instance")
  n = x.shape[0]
  c = 0.05
  bits = clipping.fixed_point_bits(n, c)
  f = jax.jit(functools.partial(pergrad.convnet_clipped_grad_sum, model,
                                clip_norm=c, bits=bits, chunk=n))
  flat = lambda t: np.concatenate([np.asarray(a, np.int64).ravel()
                                   for a in jax.tree.leaves(t)])
  with_bad = flat(f(params, x.at[n - 1].set(bad), y, jnp.ones(n)))
  without = flat(f(params, x.at[n - 1].set(0.0), y,
                   jnp.ones(n).at[n - 1].set(0.0)))
  alone = flat(f(params, x.at[n - 1].set(bad), y,
                 jnp.zeros(n).at[n - 1].set(1.0)))
  np.testing.assert_array_equal(with_bad - without, alone)
  assert np.linalg.norm(alone * 2.0 ** -bits) <= c


def test_fixed_point_sums_refuse_too_many_bits_or_no_clipping():
  model, params, x, y = _case("instance")
  with pytest.raises(ValueError, match="overflows"):
    pergrad.convnet_clipped_grad_sum(model, params, x, y, jnp.ones(6),
                                     clip_norm=1.0, bits=29)
  with pytest.raises(ValueError, match="finite clip_norm"):
    pergrad.convnet_clipped_grad_sum(model, params, x, y, jnp.ones(6),
                                     clip_norm=math.inf, bits=8)


def test_each_clipped_contribution_has_norm_at_most_c():
  """One real row at a time: the sum is that row's clipped gradient."""
  model, params, x, y = _case("instance")
  f = jax.jit(functools.partial(pergrad.convnet_clipped_grad_sum, model,
                                clip_norm=0.05))
  for i in range(6):
    g = f(params, x, y, jnp.zeros(6).at[i].set(1.0))
    norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64))))
                         for a in jax.tree.leaves(g)))
    assert norm <= 0.05  # exactly (the clip margin)
    assert norm > 0.049  # the raw gradients are far longer than 0.05


def test_padded_and_non_finite_rows_contribute_nothing():
  model, params, x, y = _case("instance")
  f = jax.jit(functools.partial(pergrad.convnet_clipped_grad_sum, model,
                                clip_norm=1.0))
  base = f(params, x[:3], y[:3], jnp.ones(3))
  xp = jnp.concatenate([x[:3], jnp.full((2, 8, 8, 3), 1e30),
                        x[:1].at[0, 0, 0, 0].set(jnp.nan)])
  yp = jnp.concatenate([y[:3], y[:3]])
  got = f(params, xp, yp, jnp.array([1, 1, 1, 0, 0, 1.0]))
  assert _rel(got, base) < 1e-6


def test_chunked_class_sums_equal_one_batch():
  model, params, x, y = _case("instance")
  x = jnp.concatenate([x, x[::-1]])[:11]
  y = jnp.concatenate([y, y])[:11]
  mask = jnp.ones(11).at[4].set(0.0)
  want = clipped_class_sums(embed_fn(model), params, x, y, mask,
                            num_classes=4, clip_norm=0.5)
  for chunk in (4, 6, 20):  # 3 chunks (scan), 2 (no scan), 1
    got = jax.jit(functools.partial(
        clipped_class_sums, embed_fn(model), num_classes=4, clip_norm=0.5,
        chunk_size=chunk))(params, x, y, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("mask", [[1, 0, 1, 1, 1, 1.0], [1, 1, 1, 0, 0, 0]])
@pytest.mark.parametrize("microbatch", [2, 4, 5])
def test_microbatched_grad_sum_equals_one_batch(microbatch, mask):
  """3 chunks (scan) and 2 chunks (no scan) of the generic path; 4 and 5
  give two balanced chunks of 3. The second mask is a packed Poisson
  batch whose last chunk (of 2) is padding only, which the scan skips."""
  model, params, x, y = _case("instance")
  mask = jnp.array(mask)
  loss = lambda p, b: cross_entropy(model, p, *b)
  fn = lambda p, b, m: clipped_grad_sum(loss, p, b, m, clip_norm=0.05)
  want = jax.jit(fn)(params, (x, y), mask)
  got = jax.jit(microbatched(fn, microbatch))(params, (x, y), mask)
  assert _rel(got, want) < 1e-5
  # Computing the chunks of padding too (--no-skip-padding) adds exact
  # zeros: the same sums bit for bit.
  every = jax.jit(microbatched(fn, microbatch, skip_padding=False))(
      params, (x, y), mask)
  for a, b in zip(jax.tree.leaves(every), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_microbatched_skips_only_the_chunks_of_padding_only():
  """A Poisson batch is packed (its padded slots last), so a chunk whose
  mask is all zero adds nothing and is not evaluated: a step's time then
  follows the realised batch, not the capacity. A function that returns
  nan on a chunk without real rows shows which chunks ran; a chunk with
  one real row still runs."""
  from dpgeng_jax.clipping import microbatched
  fn = lambda p, b, m: jnp.sum(b * m) / jnp.sum(m)  # nan on padding only
  x = jnp.arange(1.0, 10.0)
  run = jax.jit(microbatched(fn, 3))
  assert float(run(None, x, jnp.array([1.0] * 3 + [0] * 6))) == 2.0
  assert float(run(None, x, jnp.array([1.0] * 4 + [0] * 5))) == 6.0
  assert float(run(None, x, jnp.array([0.0] * 9))) == 0.0  # none ran
  assert np.isnan(float(jax.jit(fn)(None, x, jnp.zeros(9))))  # it would be


def test_microbatched_without_skipping_runs_every_chunk_to_the_same_sums():
  """skip_padding=False (--no-skip-padding) evaluates the chunks of
  padding only too, so a step's time follows the capacity, not the
  realised batch: the nan-on-padding function of the test above now
  returns nan; a function without that flaw gives the same sum either
  way."""
  from dpgeng_jax.clipping import microbatched
  nan_on_padding = lambda p, b, m: jnp.sum(b * m) / jnp.sum(m)
  x, mask = jnp.arange(1.0, 10.0), jnp.array([1.0] * 3 + [0] * 6)
  every = jax.jit(microbatched(nan_on_padding, 3, skip_padding=False))
  assert np.isnan(float(every(None, x, mask)))
  masked_sum = lambda p, b, m: jnp.sum(b * m)
  for m in (mask, jnp.array([1.0] * 4 + [0] * 5), jnp.zeros(9)):
    want = float(jnp.sum(x * m))
    for skip in (True, False):
      got = jax.jit(microbatched(masked_sum, 3, skip_padding=skip))(
          None, x, m)
      assert float(got) == want


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (29, 27, 3)])
def test_fused_first_block_per_example_grads_equal_the_layer_by_layer_model(
    shape, monkeypatch):
  """On maps where the first block runs from patch statistics
  (stem.use_stem), its per-example parameter gradients come from
  per-example copies of the block's parameters: they equal jax.grad per
  example of the same parameters through XLA's layer-by-layer model. The
  block goes in chunks of rows (stem.default_chunk, here 3: two chunks of
  2 rows)."""
  monkeypatch.setattr(stem, "default_chunk", lambda activations: 3)
  model = ConvNet(num_classes=3, width=4, depth=3)
  ref = ConvNet(num_classes=3, width=4, depth=3, conv_impl="xla")
  params = init_params(model, jax.random.key(1), shape)
  x = jax.random.normal(jax.random.key(2), (4, *shape)) * 2
  y = jnp.arange(4) % 3
  assert pergrad._fused_first(model, x) and not pergrad._fused_first(ref, x)
  taps = pergrad._taps(model, params, x)
  assert taps["stem"] is not None and taps["u"][0] is None  # fused ran
  got = _check_each(model, ref, params, x, y, range(4), 1e-4)
  # The conv bias cancels in the normalisation: its gradient is zero.
  assert float(jnp.max(jnp.abs(got["conv0"]["bias"]))) == 0.0


def test_fused_first_block_clipped_sum_equals_the_generic_path(monkeypatch):
  """The fused first block's clipped sum equals the generic path's, the
  block in chunks of 3 rows (5 rows: the last chunk padded with a zero
  row)."""
  monkeypatch.setattr(stem, "default_chunk", lambda activations: 3)
  model = ConvNet(num_classes=3, width=4, depth=3)
  params = init_params(model, jax.random.key(1), (28, 28, 1))
  x = jax.random.normal(jax.random.key(2), (5, 28, 28, 1))
  y = jnp.arange(5) % 3
  mask = jnp.array([1, 0, 1, 1, 1.0])
  _check_sum(model, params, x, y, mask, 0.05, 1e-4, chunk=2)


def test_gradients_whose_squares_overflow_are_clipped_as_the_generic_path():
  """A huge head makes the conv gradients finite but ~1e25, so their
  squared norms overflow float32: the chunk falls back to the
  overflow-safe norms instead of dropping those rows (the plain sum of
  squares would give inf, clip weight 0)."""
  model, params, x, y = _case("instance")
  params = jax.tree.map(lambda a: a, params)
  params["head"]["kernel"] = params["head"]["kernel"] * 1e25
  mask = jnp.ones(6)
  per = jax.jit(functools.partial(pergrad.per_example_grads, model))(
      params, x, y)
  sq = sum(jnp.sum(jnp.square(a.reshape(6, -1)), axis=1)
           for a in jax.tree.leaves(per))
  assert not bool(jnp.all(jnp.isfinite(sq)))  # some squares do overflow
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(per))
  got = _check_sum(model, params, x, y, mask, 1.0, 1e-5, chunk=4)
  norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64))))
                       for a in jax.tree.leaves(got)))
  assert norm <= 6.0  # six rows, each clipped to 1


def test_a_chunk_with_a_non_finite_row_keeps_its_finite_rows():
  """The fallback is per chunk: a nan row in a chunk zeroes that row only."""
  model, params, x, y = _case("instance")
  f = jax.jit(functools.partial(pergrad.convnet_clipped_grad_sum, model,
                                clip_norm=0.5, chunk=3))
  want = f(params, x, y, jnp.ones(6).at[1].set(0.0))
  got = f(params, x.at[1, 0, 0, 0].set(jnp.nan), y, jnp.ones(6))
  assert _rel(got, want) < 1e-6


@pytest.mark.parametrize("mask", [np.ones(1), np.float32(1.0), np.ones(7)],
                         ids=["(1,)", "()", "(7,)"])
def test_a_mask_that_is_not_one_value_per_row_is_refused(mask):
  """A (1,) or () mask would broadcast: every padded row (a repeat of one
  example, in a Poisson layout) would count, above the sensitivity."""
  model, params, x, y = _case("instance")
  loss = lambda p, b: cross_entropy(model, p, *b)
  for f in (lambda: pergrad.convnet_clipped_grad_sum(
                model, params, x, y, jnp.asarray(mask), clip_norm=1.0),
            lambda: clipped_grad_sum(loss, params, (x, y), jnp.asarray(mask),
                                     clip_norm=1.0),
            lambda: clipped_class_sums(embed_fn(model), params, x, y,
                                       jnp.asarray(mask), num_classes=4,
                                       clip_norm=1.0)):
    with pytest.raises(ValueError, match="one value per row"):
      f()


@pytest.mark.parametrize("label", [4, -1])
def test_labels_outside_the_models_classes_are_refused(label):
  model, params, x, y = _case("instance")
  with pytest.raises(ValueError, match="labels must be in 0..3"):
    pergrad.convnet_clipped_grad_sum(model, params, x, y.at[0].set(label),
                                     jnp.ones(6), clip_norm=1.0)


@pytest.mark.parametrize("clip", [-math.inf, float("nan"), -1.0, 0.0])
def test_batched_path_refuses_a_clip_norm_that_is_not_positive(clip):
  """-inf passed the `isinf` shortcut and disabled clipping."""
  model, params, x, y = _case("instance")
  with pytest.raises(ValueError, match="clip_norm"):
    pergrad.convnet_clipped_grad_sum(model, params, x, y, jnp.ones(6),
                                     clip_norm=clip)


def test_batched_path_takes_a_traced_clip_norm():
  """A traced C raised a ConcretizationTypeError (math.isinf on a tracer);
  now it clips as the concrete C does, and a traced C <= 0 or nan
  releases nothing."""
  model, params, x, y = _case("instance")
  m = jnp.ones(6)
  f = jax.jit(lambda c: pergrad.convnet_clipped_grad_sum(
      model, params, x, y, m, clip_norm=c))
  want = pergrad.convnet_clipped_grad_sum(model, params, x, y, m,
                                          clip_norm=0.5)
  assert _rel(f(0.5), want) < 1e-5
  for bad in (float("nan"), -1.0):
    assert all(float(jnp.max(jnp.abs(a))) == 0.0
               for a in jax.tree.leaves(f(bad)))
  with pytest.raises(ValueError, match="n >= 1 examples"):
    pergrad.convnet_clipped_grad_sum(model, params, x[:0], y[:0], m[:0],
                                     clip_norm=1.0)


def test_a_layer_norm_that_overflows_is_clipped_not_passed_through():
  """One example's per-layer gradient norm overflowing to inf (finite
  entries, an infinite sum of squares: here a last norm layer's bias of
  5e37) made row_norms over the layer norms nan, read as a zero row: clip
  weight 1 and the gradient summed unclipped, 3.8e38 away from the sum
  without that example (a review's finding). Now its norm is inf and
  the example moves the sum by at most C."""
  from dpgeng_jax import clipping
  assert float(clipping.row_norms(jnp.array([[jnp.inf, 1.0]]))[0, 0]) == (
      math.inf)
  model = ConvNet(num_classes=10, width=16, depth=2)
  params = dict(init_params(model, jax.random.key(0), (8, 8, 1)))
  params["norm1"] = dict(params["norm1"],
                         bias=jnp.full_like(params["norm1"]["bias"], 5e37))
  params["head"] = dict(params["head"],
                        kernel=jnp.zeros_like(params["head"]["kernel"]))
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  y = jnp.arange(4)
  f = functools.partial(pergrad.convnet_clipped_grad_sum, model,
                        clip_norm=1.0, chunk=4)
  n = x.shape[0]
  for drop in (0, 3):
    a = f(params, x, y, jnp.ones(n))
    b = f(params, x, y, jnp.ones(n).at[drop].set(0.0))
    moved = np.sqrt(sum(np.sum(np.square(np.asarray(u, np.float64)
                                         - np.asarray(v, np.float64)))
                        for u, v in zip(jax.tree.leaves(a),
                                        jax.tree.leaves(b))))
    assert moved <= 1.0, (drop, moved)
