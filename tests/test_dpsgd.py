"""DP-SGD: clipped per-example gradient sums and the noisy step (M_E)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dpgeng_jax import clipping, mechanisms, noise
from dpgeng_jax.clipping import clipped_grad_sum
from dpgeng_jax.mechanisms import make_dp_sgd_step, poisson_batch_indices
from dpgeng_jax.models import ConvNet, init_params

MODEL = ConvNet(4, width=4, depth=1)


def _loss(params, batch):
  x, y = batch
  logits = MODEL.apply({"params": params}, x)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _setup(n=6, seed=0):
  params = init_params(MODEL, jax.random.key(seed), (4, 4, 1))
  x = 3 * jax.random.normal(jax.random.key(seed + 1), (n, 4, 4, 1))
  y = jnp.arange(n) % 4
  return params, (x, y)


def _flat(tree):
  return np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("clip_norm", [0.05, 1.0, 1e6])
def test_equals_individually_clipped_gradients_summed_one_by_one(clip_norm):
  params, (x, y) = _setup()
  got = _flat(clipped_grad_sum(_loss, params, (x, y), jnp.ones(6),
                               clip_norm=clip_norm))
  want = 0
  for i in range(6):
    g = _flat(jax.grad(_loss)(params, (x[i:i + 1], y[i:i + 1])))
    want = want + g * min(1.0, clip_norm / np.linalg.norm(g))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_equals_jax_privacy_clipped_grad():
  jp = pytest.importorskip("jax_privacy")
  params, (x, y) = _setup()
  theirs = jp.clipped_grad(_loss, l2_clip_norm=0.1, batch_argnums=1,
                           keep_batch_dim=True)(params, (x, y))
  ours = clipped_grad_sum(_loss, params, (x, y), jnp.ones(6), clip_norm=0.1)
  np.testing.assert_allclose(_flat(ours), _flat(theirs), rtol=1e-4,
                             atol=1e-7)


def test_padded_examples_contribute_nothing():
  params, (x, y) = _setup(n=8)
  mask = jnp.asarray([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
  garbage = x.at[5:].set(jnp.nan)
  a = _flat(clipped_grad_sum(_loss, params, (garbage, y), mask,
                             clip_norm=0.5))
  b = _flat(clipped_grad_sum(_loss, params, (x[:5], y[:5]), jnp.ones(5),
                             clip_norm=0.5))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_one_example_moves_the_sum_by_at_most_clip_norm():
  params, (x, y) = _setup(n=6)
  full = _flat(clipped_grad_sum(_loss, params, (x, y), jnp.ones(6),
                                clip_norm=0.01))
  diffs = []
  for i in range(6):
    part = _flat(clipped_grad_sum(_loss, params, (x, y),
                                  jnp.ones(6).at[i].set(0.0), clip_norm=0.01))
    diffs.append(np.linalg.norm(full.astype(np.float64) - part))
  assert max(diffs) <= 0.01  # exactly (the clip margin)
  assert max(diffs) == pytest.approx(0.01, rel=1e-3)  # attained


def test_jit_and_non_jit_agree():
  params, batch = _setup()
  f = lambda p, b: clipped_grad_sum(_loss, p, b, jnp.ones(6), clip_norm=0.3)
  np.testing.assert_allclose(_flat(jax.jit(f)(params, batch)),
                             _flat(f(params, batch)), rtol=1e-5, atol=1e-7)


def test_dp_sgd_noise_std_on_the_update_is_sigma_c_over_b():
  params, (x, y) = _setup()
  sigma, c, b = 1.7, 0.5, 8.0
  step = jax.jit(make_dp_sgd_step(_loss, optax.sgd(1.0), clip_norm=c,
                                  noise_multiplier=sigma,
                                  expected_batch_size=b))
  opt_state = optax.sgd(1.0).init(params)
  mask = jnp.zeros(6)  # no example: the update is pure noise
  samples = np.concatenate([
      _flat(step(params, opt_state, (x, y), mask, k)[2])
      for k in jax.random.split(jax.random.key(0), 20)])
  assert samples.size > 2000
  std = sigma * c / b
  assert stats.kstest(samples, "norm", args=(0, std)).pvalue > 1e-3
  assert stats.kstest(samples, "norm", args=(0, std * 2 / 3)).pvalue < 1e-6
  assert stats.kstest(samples, "norm", args=(0, std * 1.5)).pvalue < 1e-6


def test_dp_sgd_without_noise_divides_by_the_public_batch_size():
  params, batch = _setup()
  step = make_dp_sgd_step(_loss, optax.sgd(1.0), clip_norm=0.2,
                          noise_multiplier=0.0, expected_batch_size=4.0)
  _, _, g = step(params, optax.sgd(1.0).init(params), batch, jnp.ones(6),
                 jax.random.key(0))
  want = _flat(clipped_grad_sum(_loss, params, batch, jnp.ones(6),
                                clip_norm=0.2)) / 4.0
  np.testing.assert_allclose(_flat(g), want, rtol=1e-6)


def _linear_loss(w, batch):
  """The per-example gradient is the example itself: sums of positive
  rows grow with n, as a float32 rounding test needs."""
  return jnp.sum(batch.reshape(batch.shape[0], -1) @ w)


def test_gradient_sums_move_by_at_most_c_at_scale_in_fixed_point():
  """20000 examples whose gradients are all clipped to C: the float32 sum
  moved by more than C when one example went; the int32 sum that DP-SGD
  releases (bits) by exactly that example's quantised clipped gradient,
  norm <= C."""
  n, c = 20000, 1.0
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.abs(rng.normal(size=(n, 16))) + 0.5, jnp.float32)
  w = jnp.zeros(16)
  bits = clipping.fixed_point_bits(n, c)
  f = jax.jit(lambda m, b: clipped_grad_sum(_linear_loss, w, x, m,
                                            clip_norm=c, bits=b),
              static_argnums=1)
  ones = jnp.ones(n)
  full, full32 = np.asarray(f(ones, bits), np.int64), np.asarray(
      f(ones, None), np.float64)
  assert f(ones, bits).dtype == jnp.int32
  worst32 = 0.0
  for i in (0, 777, 19999):
    drop = ones.at[i].set(0.0)
    moved = full - np.asarray(f(drop, bits), np.int64)
    row = np.asarray(clipping.clip_rows(x[i:i + 1], c)[0], np.float64)
    np.testing.assert_array_equal(moved, np.trunc(row * 2.0 ** bits))
    assert np.linalg.norm(moved * 2.0 ** -bits) <= c
    worst32 = max(worst32, float(np.linalg.norm(
        full32 - np.asarray(f(drop, None), np.float64))))
  assert worst32 > c  # the float32 sum, as DP-SGD summed before


def test_dp_sgd_step_adds_the_noise_to_the_fixed_point_sum():
  """With noise the step's gradient is (int sum 2^-bits + noise) / B, bits
  from the padded batch and C, passed to its grad_sum_fn; without noise
  the float32 sum of the non-private path."""
  params, batch = _setup()
  seen = []

  def grad_sum_fn(p, b, m, bits=None):
    seen.append(bits)
    return clipped_grad_sum(_loss, p, b, m, clip_norm=0.2, bits=bits)

  opt = optax.sgd(1.0)
  step = make_dp_sgd_step(None, opt, clip_norm=0.2, noise_multiplier=1.5,
                          expected_batch_size=4.0, grad_sum_fn=grad_sum_fn)
  key = jax.random.key(3)
  _, _, g = step(params, opt.init(params), batch, jnp.ones(6), key)
  bits = clipping.fixed_point_bits(6, 0.2)
  assert seen == [bits] and mechanisms.release_bits(6, 0.2, 0.3) == bits
  ints = clipped_grad_sum(_loss, params, batch, jnp.ones(6), clip_norm=0.2,
                          bits=bits)
  want = mechanisms.tree_add_gaussian_noise(key, ints, 0.3,
                                            scale=2.0 ** -bits)
  np.testing.assert_array_equal(_flat(g), _flat(want) / np.float32(4.0))
  assert mechanisms.release_bits(6, float("inf"), 0.0) is None
  assert mechanisms.release_bits(6, 0.2, 0.0) is None
  quiet = make_dp_sgd_step(None, opt, clip_norm=0.2, noise_multiplier=0.0,
                           expected_batch_size=4.0, grad_sum_fn=grad_sum_fn)
  quiet(params, opt.init(params), batch, jnp.ones(6), key)
  assert seen[-1] is None


def test_poisson_batch_indices_cover_each_example_at_the_rate():
  keys = jax.random.split(jax.random.key(0), 3000)
  idx, mask, over = jax.vmap(
      lambda k: poisson_batch_indices(k, 20, 0.25, 20))(keys)
  counts = np.zeros(20)
  for i, m in zip(np.asarray(idx), np.asarray(mask)):
    counts[i[m > 0]] += 1
  assert not np.any(np.asarray(over))
  assert np.all(np.abs(counts / 3000 - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 3000))


def test_poisson_batch_indices_are_exactly_the_rows_whose_word_is_below_q():
  """Exact: row i is in the batch iff word i of the key's sampling stream
  is below floor(q 2^32), once, in increasing order, and the mask counts
  them (2000 rows: a rate 5 % above q flips about 25 of them)."""
  n, q = 2000, 0.25
  for seed in range(2):
    key = noise.deterministic_secret_key(seed)
    idx, mask, over = poisson_batch_indices(key, n, q, n)
    assert not bool(over)
    words = np.asarray(jax.random.bits(noise.sampling_stream(key), (1, n),
                                       jnp.uint32))[0]
    want = np.flatnonzero(words < np.uint32(np.floor(q * 2**32)))
    taken = np.asarray(mask) > 0
    np.testing.assert_array_equal(np.asarray(idx)[taken], want)
    assert taken.sum() == len(want) and np.all(taken[:len(want)])


@pytest.mark.parametrize("size", [0, -3, float("nan"), float("inf")])
def test_a_public_batch_size_that_is_not_positive_and_finite_is_refused(size):
  """0 gave nan parameters and -3 turned the step into gradient ascent."""
  with pytest.raises(ValueError, match="expected_batch_size"):
    make_dp_sgd_step(_loss, optax.sgd(0.1), clip_norm=1.0,
                     noise_multiplier=1.0, expected_batch_size=size)


def test_a_sum_release_carries_one_c_and_sigma_to_the_bits_and_the_noise():
  """The three DP-SGD releases (make_dp_sgd_step, the expert's step, the
  sharded step) take their fixed point and their noise from one
  SumRelease: its bits are release_bits of its C and sigma C, its noise
  std is sigma C (measured on 20000 coordinates of a pytree), and C = inf
  or sigma = 0 is the float path with no noise."""
  rel = mechanisms.SumRelease(0.2, 1.5)
  assert rel.noise_stddev == pytest.approx(0.3) and rel.l2_sensitivity == 0.2
  assert rel.release_bits(6) == clipping.fixed_point_bits(6, 0.2)
  tree = {"a": jnp.zeros((100, 100), jnp.int32),
          "b": jnp.zeros((10000,), jnp.int32)}
  bits = rel.release_bits(6)
  out = rel.release(jax.random.key(1), tree, bits)
  flat = np.concatenate([np.ravel(out["a"]), out["b"]])
  assert stats.kstest(flat / 0.3, "norm").pvalue > 1e-3
  assert stats.kstest(flat / 0.2, "norm").pvalue < 1e-6  # sigma, not 1
  for quiet in (mechanisms.SumRelease(float("inf"), 0.0),
                mechanisms.SumRelease(0.2, 0.0)):
    assert quiet.release_bits(6) is None
    f = {"a": jnp.arange(3.0)}
    np.testing.assert_array_equal(quiet.release(jax.random.key(1), f, None)
                                  ["a"], f["a"])
  with pytest.raises(ValueError, match="infinite"):
    mechanisms.SumRelease(float("inf"), 1.0)
  with pytest.raises(ValueError, match="clip_norm must be > 0"):
    mechanisms.SumRelease(-1.0, 1.0)


def test_a_noisy_release_refuses_float_sums_and_bits_that_do_not_fit_them():
  """A noisy release takes its sums in fixed point only: float32 sums of
  the same rows change with their order (their sensitivity exceeds C), so
  float sums with bits None, float sums labelled with bits, and integer
  sums without bits are refused, in the queries' and DP-SGD's releases
  alike, also under jit; the non-private path keeps float sums."""
  key = jax.random.key(0)
  spec = mechanisms.QuerySpec(lambda p, x: x, num_classes=2, clip_norm=1.0,
                              noise_multiplier=1.0, sampling_rate=0.5,
                              capacity=4)
  for release in (mechanisms.SumRelease(1.0, 1.0).release, spec.release):
    bits = spec.release_bits(8)
    ints, floats = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))
    assert release(key, ints, bits).shape == (2, 3)
    with pytest.raises(ValueError, match="fixed-point"):
      release(key, floats, None)
    with pytest.raises(ValueError, match="fixed-point"):
      jax.jit(lambda s: release(key, s, None))(floats)
    with pytest.raises(ValueError, match="values are float32"):
      release(key, floats, bits)
  quiet = mechanisms.SumRelease(1.0, 0.0)
  with pytest.raises(ValueError, match="need their scale"):
    quiet.release(key, jnp.zeros(3, jnp.int32), None)
  np.testing.assert_array_equal(quiet.release(key, jnp.ones(3), None),
                                np.ones(3))
