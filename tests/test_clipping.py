"""Properties of per-example clipping and per-class clipped sums."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import clipping
from dpgeng_jax.clipping import (ClippedClassSum, clip_rows,
                                 clip_vector, clipped_class_sums)


def _linear_embed(params, x):
  """A per-example embedding: flatten and multiply."""
  return x.reshape(x.shape[0], -1) @ params


def _rows():
  rng = np.random.default_rng(0)
  return np.concatenate([
      rng.normal(size=(20, 7)) * 1e-3,     # tiny
      rng.normal(size=(20, 7)),            # around 1
      rng.normal(size=(20, 7)) * 1e30,     # huge
      np.zeros((3, 7)),                    # zero rows
  ]).astype(np.float32)


@pytest.mark.parametrize("clip_norm", [0.1, 1.0, 37.0])
def test_clipped_norms_never_exceed_clip_norm(clip_norm):
  out = np.asarray(clip_rows(jnp.asarray(_rows()), clip_norm))
  norms = np.linalg.norm(out.astype(np.float64), axis=1)
  assert np.all(np.isfinite(out))
  assert np.all(norms <= clip_norm)  # exactly, in float64


@pytest.mark.parametrize("clip_norm", [1e-6, 0.37, 1.0, 1e3, 1e6])
def test_clipped_norms_never_exceed_clip_norm_even_by_rounding(clip_norm):
  """Without clipping's margin, float32 rounding left about half of these
  rows up to 2e-7 relatively above C (the helper's 20000-row probe)."""
  rng = np.random.default_rng(1)
  v = rng.normal(size=(20000, 33)).astype(np.float32) * clip_norm * 3
  out = np.asarray(clip_rows(jnp.asarray(v), clip_norm), np.float64)
  assert np.linalg.norm(out, axis=1).max() <= clip_norm


def test_rows_within_bound_are_unchanged_and_long_rows_keep_direction():
  v = _rows()
  out = np.asarray(clip_rows(jnp.asarray(v), 1.0))
  norms = np.linalg.norm(v.astype(np.float64), axis=1)
  short = norms <= 1.0
  np.testing.assert_array_equal(out[short], v[short])
  long = norms > 1.0
  cos = np.sum(out[long] * (v[long] / norms[long, None]), axis=1)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out[long], axis=1), 1.0,
                             rtol=1e-5)


def test_zero_rows_stay_zero_and_nonfinite_rows_become_zero():
  v = np.ones((4, 3), np.float32)
  v[0] = 0
  v[1, 1] = np.nan
  v[2, 0] = np.inf
  out = np.asarray(clip_rows(jnp.asarray(v), 1.0))
  np.testing.assert_array_equal(out[:3], 0.0)
  np.testing.assert_allclose(np.linalg.norm(out[3]), 1.0, rtol=1e-5)


def test_infinite_clip_norm_is_identity_on_finite_rows():
  v = _rows()
  np.testing.assert_array_equal(np.asarray(clip_rows(jnp.asarray(v),
                                                     math.inf)), v)


def test_clip_vector_bounds_whole_tensor():
  v = jnp.full((3, 4, 5), 10.0)
  assert float(jnp.linalg.norm(clip_vector(v, 2.0))) == pytest.approx(2.0,
                                                                      1e-5)


def _batch(n=12, k=3, d=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 2, 2, 1)).astype(np.float32) * 5
  y = rng.integers(0, k, size=n).astype(np.int32)
  params = rng.normal(size=(4, d)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y), jnp.asarray(params)


def test_class_sums_match_a_loop_over_examples():
  x, y, params = _batch()
  mask = jnp.asarray(np.arange(12) % 4 != 0, jnp.float32)
  got = clipped_class_sums(_linear_embed, params, x, y, mask, num_classes=3,
                           clip_norm=1.5)
  want = np.zeros((3, 5))
  for i in range(12):
    if mask[i]:
      e = np.asarray(x[i]).reshape(-1) @ np.asarray(params)
      want[int(y[i])] += e * min(1.0, 1.5 / np.linalg.norm(e))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_padded_rows_contribute_exactly_nothing_even_if_not_finite():
  x, y, params = _batch()
  mask = jnp.asarray(np.r_[np.ones(8), np.zeros(4)], jnp.float32)
  zeros = x.at[8:].set(0.0)
  garbage = x.at[8:].set(jnp.nan).at[10].set(jnp.inf).at[11].set(1e30)
  f = lambda xx, c: clipped_class_sums(_linear_embed, params, xx, y, mask,
                                       num_classes=3, clip_norm=c)
  for c in (1.0, math.inf):
    a, b = f(garbage, c), f(zeros, c)
    # Bit-identical whatever the padded rows hold.
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And equal to the batch without the padded rows.
    ref = clipped_class_sums(_linear_embed, params, x[:8], y[:8], jnp.ones(8),
                             num_classes=3, clip_norm=c)
    np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("clip_norm", [0.5, 2.0])
def test_one_example_moves_class_sums_by_at_most_clip_norm(clip_norm):
  x, y, params = _batch(n=16, seed=3)
  full = clipped_class_sums(_linear_embed, params, x, y, jnp.ones(16),
                            num_classes=3, clip_norm=clip_norm)
  diffs = []
  for i in range(16):  # remove each example in turn (add/remove adjacency)
    mask = jnp.ones(16).at[i].set(0.0)
    nb = clipped_class_sums(_linear_embed, params, x, y, mask, num_classes=3,
                            clip_norm=clip_norm)
    diffs.append(float(np.linalg.norm(np.asarray(full, np.float64)
                                      - np.asarray(nb, np.float64))))
  assert max(diffs) <= clip_norm  # exactly (the clip margin)
  # The bound is attained: these embeddings are all longer than C.
  assert max(diffs) == pytest.approx(clip_norm, rel=1e-5)


def test_jit_and_non_jit_agree():
  x, y, params = _batch()
  mask = jnp.ones(12)
  f = lambda p, x, y, m: clipped_class_sums(_linear_embed, p, x, y, m,
                                            num_classes=3, clip_norm=1.0)
  np.testing.assert_allclose(np.asarray(jax.jit(f)(params, x, y, mask)),
                             np.asarray(f(params, x, y, mask)), rtol=1e-6,
                             atol=1e-6)


def test_clipped_class_sum_callable_carries_its_sensitivity():
  q = ClippedClassSum(_linear_embed, num_classes=3, clip_norm=0.7)
  assert q.l2_sensitivity == 0.7
  x, y, params = _batch()
  np.testing.assert_array_equal(
      np.asarray(q(params, x, y, jnp.ones(12))),
      np.asarray(clipped_class_sums(_linear_embed, params, x, y, jnp.ones(12),
                                    num_classes=3, clip_norm=0.7)))


# ---------------------------------------------------------------------------
# Bad parameters are refused where a silent result would break the bound.


def _lin(p, x):
  return x.reshape(x.shape[0], -1)[:, :4]


@pytest.mark.parametrize("clip", [float("nan"), -1.0, 0.0])
def test_a_clip_norm_that_is_not_positive_is_refused(clip):
  """nan compared false everywhere and turned clipping off; a negative C
  flipped the sums' sign."""
  x, y, m = jnp.ones((4, 8, 8, 1)), jnp.array([0, 1, 2, 0]), jnp.ones(4)
  with pytest.raises(ValueError, match="clip_norm"):
    clipped_class_sums(_lin, None, x, y, m, num_classes=3, clip_norm=clip)
  with pytest.raises(ValueError, match="clip_norm"):
    clipping.clipped_grad_sum(lambda p, b: jnp.sum(p * b[0]), jnp.ones(2),
                              (jnp.ones((3, 2)),), jnp.ones(3),
                              clip_norm=clip)


def test_a_mask_value_above_one_counts_the_row_once():
  """The mask is a boolean: 2 would have let one row move a sum by 2 C."""
  x, y = jnp.ones((4, 8, 8, 1)), jnp.array([0, 1, 2, 0])
  ones = clipped_class_sums(_lin, None, x, y, jnp.array([1., 1., 0., 1.]),
                            num_classes=3, clip_norm=1.0)
  odd = clipped_class_sums(_lin, None, x, y,
                           jnp.array([2., 1., jnp.nan, 0.5]),
                           num_classes=3, clip_norm=1.0)
  np.testing.assert_array_equal(np.asarray(odd), np.asarray(ones))


@pytest.mark.parametrize("y", [[0, 1, 3, 0], [0, -1, 2, 0]])
def test_labels_outside_the_classes_are_refused(y):
  x, m = jnp.ones((4, 8, 8, 1)), jnp.ones(4)
  with pytest.raises(ValueError, match="labels"):
    clipped_class_sums(_lin, None, x, jnp.array(y), m, num_classes=3,
                       clip_norm=1.0)


def test_an_empty_batch_is_refused_with_a_message():
  with pytest.raises(ValueError, match="n >= 1 rows"):
    clipped_class_sums(_lin, None, jnp.zeros((0, 8, 8, 1)),
                       jnp.zeros((0,), jnp.int32), jnp.zeros((0,)),
                       num_classes=3, clip_norm=1.0)


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_a_class_count_that_is_not_a_positive_integer_is_refused(k):
  with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
    clipped_class_sums(lambda p, x: x, None, jnp.ones((2, 3)),
                       np.zeros(2, np.int32), jnp.ones(2), num_classes=k,
                       clip_norm=1.0)


@pytest.mark.parametrize("clip", [float("nan"), -1.0, 0.0])
def test_a_traced_clip_norm_that_is_not_positive_releases_nothing(clip):
  """A traced C cannot be refused; a nan C compared false everywhere and
  left rows unclipped, a negative one flipped their sign. Now every
  weight is 0, in the rows and in the gradient sums."""
  v = jnp.array([[3.0, 4.0], [1e30, 0.0], [0.1, 0.0]])
  np.testing.assert_array_equal(
      np.asarray(jax.jit(clip_rows)(v, clip)), np.zeros((3, 2)))
  grads = jax.jit(lambda c: clipping.clipped_grad_sum(
      lambda p, b: jnp.sum(p * b[0]), jnp.ones(2), (jnp.ones((3, 2)),),
      jnp.ones(3), clip_norm=c))(clip)
  np.testing.assert_array_equal(np.asarray(grads), np.zeros(2))
  # A positive traced C clips as the concrete one does.
  np.testing.assert_array_equal(np.asarray(jax.jit(clip_rows)(v, 1.0)),
                                np.asarray(clip_rows(v, 1.0)))


def test_clip_rows_refuses_arrays_that_are_not_rows_of_examples():
  """On (n, h, w) the last-axis norm clipped each of the h rows of an
  example to C: an example reached h C."""
  with pytest.raises(ValueError, match=r"\(n, d\) array"):
    clip_rows(jnp.ones((2, 4, 4)), 1.0)
  with pytest.raises(ValueError, match=r"\(n, d\) array"):
    clip_rows(jnp.ones(4), 1.0)
  assert float(jnp.linalg.norm(clip_vector(jnp.ones((4, 4)), 1.0))) <= 1.0


def test_class_sums_refuses_values_that_are_not_rows():
  """1-D values broadcast: every kept row added the whole vector,
  the masked row's entry included."""
  with pytest.raises(ValueError, match=r"\(n, d\) array"):
    clipping.class_sums(jnp.array([10., 20, 30, 40]), jnp.array([0, 1, 1, 2]),
                        jnp.array([1., 1, 0, 1]), 3)


def test_an_empty_batch_of_gradients_is_refused_with_a_message():
  with pytest.raises(ValueError, match="n >= 1 examples"):
    clipping.clipped_grad_sum(lambda p, b: jnp.sum(p * b[0]), jnp.ones(2),
                              (jnp.ones((0, 2)),), jnp.ones(0),
                              clip_norm=1.0)


def test_a_clipped_class_sum_query_cannot_carry_a_negative_sensitivity():
  with pytest.raises(ValueError, match="clip_norm"):
    ClippedClassSum(_lin, 3, -1.0)
  with pytest.raises(ValueError, match="num_classes"):
    ClippedClassSum(_lin, 0, 1.0)


def test_chunked_sums_name_a_label_count_that_does_not_match_the_rows():
  x, m = jnp.ones((5, 8, 8, 1)), jnp.ones(5)
  with pytest.raises(ValueError, match=r"labels of shape \(4,\) for 5 rows"):
    clipped_class_sums(_lin, None, x, jnp.array([0, 1, 2, 0]), m,
                       num_classes=3, clip_norm=1.0, chunk_size=2)


@pytest.mark.parametrize("top", [1e36, 9e37, 2e38, 3.4e38])
def test_rows_near_float32s_largest_are_measured_and_bounded(top):
  """XLA divides by multiplying with the reciprocal, and 1 / m above
  8.5e37 is a subnormal the CPU flushes to zero: row_norms gave such rows
  norm 0, so clip_rows, clipped_grad_sum and clipped_class_sums passed
  them through unclipped (one example moved a sum of sensitivity 1 by
  2e38; a review's finding). Their norms are now right (inf beyond
  float32), and every clipped row has norm <= C (a row whose clip weight
  C / norm is itself subnormal contributes zero)."""
  rng = np.random.default_rng(2)
  v = np.zeros((6, 9), np.float32)
  v[0, 0] = top
  v[1, :3] = [top, -top / 2, top / 4]
  v[2] = rng.uniform(-1, 1, 9) * top
  v[3, 4] = -top
  v[4, :2] = [top, 1.0]
  v[5] = rng.normal(size=9)
  want = np.linalg.norm(v.astype(np.float64), axis=1)
  got = np.asarray(clipping.row_norms(jnp.asarray(v)), np.float64)[:, 0]
  for g, w in zip(got, want):
    if w > np.finfo(np.float32).max:
      assert g == np.inf
    else:
      assert g == pytest.approx(w, rel=1e-6)
  for c in (1.0, 1e-3, 1e30):
    out = np.asarray(clip_rows(jnp.asarray(v), c), np.float64)
    assert np.all(np.linalg.norm(out, axis=1) <= c), (c, out)
  # One such example moves a clipped gradient sum by at most C.
  params = {"w": jnp.ones((2,))}

  def loss(p, ex):
    x, t = ex
    return jnp.sum((x @ p["w"] - t) ** 2)

  x = jnp.array([[1.0, 2.0], [0.5, 0.1], [top ** 0.5 * 0.7, 0.0]])
  t = jnp.zeros(3)
  with_it = clipping.clipped_grad_sum(loss, params, (x, t), jnp.ones(3), clip_norm=1.0)
  without = clipping.clipped_grad_sum(loss, params, (x, t), jnp.array([1.0, 1, 0]),
                             clip_norm=1.0)
  moved = np.linalg.norm(np.asarray(with_it["w"], np.float64)
                         - np.asarray(without["w"], np.float64))
  assert moved <= 1.0, moved
  emb = lambda p, a: a.reshape(a.shape[0], -1)  # noqa: E731
  rows = jnp.asarray(v).reshape(6, 9, 1, 1)
  sums = clipped_class_sums(emb, None, rows, jnp.zeros(6, jnp.int32),
                            jnp.ones(6), num_classes=1, clip_norm=1.0)
  assert float(jnp.linalg.norm(sums)) <= 6.0


def test_float64_gradients_beyond_float32_are_zeroed_not_nan():
  """With float64 parameters, a masked example whose gradient is beyond
  float32's range turned the whole float sum into NaN (its value became
  inf after the finiteness test, and 0 * inf is NaN; a review's finding):
  a NaN release tells the neighbours apart. It contributes nothing."""
  with jax.enable_x64(True):
    x = jnp.array([[0.5, 0.0], [1e39, 0.0]], jnp.float64)
    loss = lambda p, b: jnp.sum(p * b)
    for mask in ([1.0, 0.0], [1.0, 1.0]):
      got = clipping.clipped_grad_sum(loss, jnp.zeros(2, jnp.float64), x,
                                      jnp.array(mask), clip_norm=1.0)
      np.testing.assert_array_equal(np.asarray(got), [0.5, 0.0])


def test_params_without_arrays_are_refused():
  with pytest.raises(ValueError, match="params has no arrays"):
    clipping.clipped_grad_sum(lambda p, b: jnp.sum(b), {}, jnp.ones((2, 1)),
                              jnp.ones(2), clip_norm=1.0)
