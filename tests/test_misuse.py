"""Misuse of the public release functions fails loudly, never silently
weakens the guarantee (found by a review of the library API)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpgeng_jax import augment, expert, mechanisms, noise, pergrad
from dpgeng_jax.models import ConvNet, init_params
from dpgeng_jax.clipping import clipped_grad_sum

KEY = noise.deterministic_secret_key(1)


def _embed(params, x):
  del params
  return x.reshape(x.shape[0], -1)


def test_a_query_whose_batch_overflowed_releases_only_nan():
  """Capacity 1 at rate 1 with two examples of a class: truncation would
  let one example push the other out (a change of 2C); the sums are NaN
  beside the overflow flag."""
  spec = mechanisms.QuerySpec(_embed, 1, 1.0, 1.0, 1.0, 1, strategy="none")
  x = np.r_[np.ones((1, 1, 1, 1)), -np.ones((1, 1, 1, 1))].astype(
      np.float32)
  data = mechanisms.class_major(x, np.array([0, 0]), 1)
  sums, over = mechanisms.noisy_targets(
      spec, data, None, augment.identity_params((1,)), KEY)
  assert bool(over) and np.all(np.isnan(np.asarray(sums)))
  ok = mechanisms.class_major(x[:1], np.array([0]), 1)
  sums, over = mechanisms.noisy_targets(
      spec, ok, None, augment.identity_params((1,)), KEY)
  assert not bool(over) and np.all(np.isfinite(np.asarray(sums)))


def test_an_expert_step_whose_batch_overflowed_releases_only_nan():
  model = ConvNet(num_classes=2, width=4, depth=1)
  x = np.zeros((6, 8, 8, 1), np.float32)
  y = (np.arange(6) % 2).astype(np.int32)
  params = init_params(model, jax.random.key(0), x.shape[1:])
  cfg = expert.ExpertConfig(steps=1, sampling_rate=0.5)
  grad_sum = pergrad.make_grad_sum_fn(model, clip_norm=1.0)
  # A tail of 1/2: the capacity is the median batch, so a batch at rate
  # 0.5 over 6 rows overflows for some key.
  step, rows = expert.private_step(grad_sum, cfg, 1.0, x, y, 6,
                                   math.log(0.5))
  for i in range(50):
    g, over = step(params, *rows, jax.random.fold_in(KEY, i))
    leaves = [np.asarray(a) for a in jax.tree.leaves(g)]
    if bool(over):
      assert all(np.all(np.isnan(a)) for a in leaves)
      return
    assert all(np.all(np.isfinite(a)) for a in leaves)
  pytest.fail("no batch overflowed in 50 draws")


def test_class_major_data_whose_valid_is_wider_than_x_is_refused():
  """The gather clamps indices past a class's rows: one example would be
  counted three times."""
  spec = mechanisms.QuerySpec(_embed, 1, 1.0, 0.0, 1.0, 3, strategy="none")
  data = mechanisms.ClassMajorData(x=jnp.ones((1, 1, 1, 1, 1)),
                                   valid=jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="valid has shape"):
    mechanisms.noisy_targets(spec, data, None,
                             augment.identity_params((1,)), KEY)


def test_integer_sums_without_their_scale_are_refused():
  """int32 fixed-point sums are in units of 2^-bits: noise added to them
  without the scale would be 2^bits times too small."""
  ints = jnp.full((2, 3), 2 ** 27, jnp.int32)
  with pytest.raises(ValueError, match="need their scale"):
    noise.add_gaussian_noise(KEY, ints, 1.0)
  with pytest.raises(ValueError, match="need their scale"):
    noise.tree_add_gaussian_noise(KEY, {"a": ints}, 1.0)
  with pytest.raises(ValueError, match="fixed point"):  # and vice versa
    noise.add_gaussian_noise(KEY, jnp.ones(3), 1.0, scale=2.0 ** -27)
  # With the scale: the value 1 plus noise of std 1 in value units (noise
  # scaled by the unit as well would have std 2^-27).
  many = jnp.full((4000,), 2 ** 27, jnp.int32)
  resid = np.asarray(noise.add_gaussian_noise(KEY, many, 1.0,
                                              scale=2.0 ** -27)) - 1.0
  assert abs(resid.mean()) < 0.1 and 0.9 < resid.std() < 1.1


def test_a_grad_sum_fn_that_ignores_the_fixed_point_is_refused():
  """A grad_sum_fn returning float sums where the step asked for fixed
  point would have its gradient scaled by 2^-bits (the noise along)."""
  def loss(p, b):
    return jnp.mean((b[0] @ p - b[1]) ** 2)
  ignores_bits = lambda p, b, m, bits=None: clipped_grad_sum(
      loss, p, b, m, clip_norm=1.0)
  step = mechanisms.make_dp_sgd_step(
      None, optax.sgd(1.0), clip_norm=1.0, noise_multiplier=1.0,
      expected_batch_size=4.0, grad_sum_fn=ignores_bits)
  p = jnp.zeros(3)
  batch = (jnp.ones((4, 3)), jnp.ones(4))
  with pytest.raises(ValueError, match="fixed point"):
    step(p, optax.sgd(1.0).init(p), batch, jnp.ones(4), KEY)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("inf")])
def test_a_merf_bandwidth_that_is_not_positive_is_refused(bandwidth):
  from dpgeng_jax.generators import merf
  with pytest.raises(ValueError, match="bandwidth"):
    merf.FeatureMap.create(jax.random.key(0), 4, 3, bandwidth=bandwidth)


def test_a_dataset_built_directly_is_checked_before_any_private_work():
  """A Dataset constructed without from_arrays skipped its checks: a label
  >= K was dropped silently by the queries (run with public class sizes)
  before a misleading error. run() checks it first."""
  from dpgeng_jax import data, pipeline
  from dpgeng_jax.config import Config
  from dpgeng_jax.errors import DataError
  rng = np.random.default_rng(0)
  good = data.from_arrays(rng.random((20, 8, 8, 1)).astype(np.float32),
                          np.arange(20) % 2,
                          rng.random((4, 8, 8, 1)).astype(np.float32),
                          np.arange(4) % 2)
  assert good.check() is good
  y = (np.arange(20) % 2).astype(np.int32)
  y[3] = 7
  bad = data.Dataset("direct", good.x_train, y, good.x_test, good.y_test,
                     2, (0.5,), (0.5,), "given")
  with pytest.raises(DataError, match="labels outside 0..1"):
    pipeline.run(Config(public_class_sizes=True, method="ndpdc",
                        quiet=True), dataset=bad)
  wide = data.Dataset("direct", good.x_train.astype(np.float64), good.y_train,
                      good.x_test, good.y_test, 2, (0.5,), (0.5,), "given")
  with pytest.raises(DataError, match="float32"):
    wide.check()


@pytest.mark.parametrize("y", [[0, -1, 1], [0, 2, 1], [0.0, 1.0, 1.0]])
def test_pe_votes_refuse_labels_outside_the_classes(y):
  """A -1 label voted in class K-1 and a float one was truncated."""
  from dpgeng_jax.generators import pe
  pop = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match="labels"):
    pe.vote_counts(pop, jnp.ones((3, 3)), np.asarray(y), jnp.ones(3))


def test_class_size_helpers_refuse_labels_outside_the_classes():
  """public_sizes([0, 1, 5], 2) said 6 classes; check() failed on a
  broadcast error."""
  from dpgeng_jax import counts
  with pytest.raises(ValueError, match="labels must be in 0..1"):
    counts.public_sizes(np.array([0, 1, 5]), 2)
  sizes = counts.public_sizes(np.array([0, 1, 1]), 2)
  assert sizes.num_classes == 2
  with pytest.raises(ValueError, match="labels must be in 0..1"):
    sizes.check(np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="labels must be in 0..1"):
    sizes.check(np.array([0, -1]))


def test_a_jax_scalar_sampling_rate_is_accepted_and_a_traced_one_refused():
  spec = mechanisms.QuerySpec(_embed, 2, 1.0, 1.0, jnp.asarray(0.5), 4)
  assert float(spec.sampling_rate) == 0.5
  assert mechanisms.poisson_capacity([40], jnp.float32(0.5)) == (
      mechanisms.poisson_capacity([40], 0.5))

  @jax.jit
  def traced(rate):
    return mechanisms.poisson_capacity([40], rate)
  with pytest.raises(ValueError, match="concrete number"):
    traced(0.5)


MALFORMED = {
    "clip_norm_array": (dict(clip_norm=jnp.array([1.0, 2.0])),
                        "clip_norm must be one number"),
    "clip_norm_string": (dict(clip_norm="1"), "clip_norm must be one number"),
    "clip_norm_bool": (dict(clip_norm=True), "clip_norm must be one number"),
    "chunk_size_float": (dict(chunk_size=2.5),
                         "chunk_size must be an integer >= 1, got 2.5"),
}


@pytest.mark.parametrize("change, message", MALFORMED.values(),
                         ids=MALFORMED.keys())
def test_malformed_sum_arguments_are_named_not_deep_jax_errors(change,
                                                               message):
  """They failed inside numpy or jnp.pad with messages naming neither
  the argument nor the function (an array C: 'only 0-dimensional arrays
  can be converted', a float chunk: 'pad_width must be of integral
  type')."""
  from dpgeng_jax.clipping import clipped_class_sums
  args = dict(num_classes=2, clip_norm=1.0) | change
  with pytest.raises(ValueError, match=message):
    clipped_class_sums(_embed, None, jnp.ones((4, 3)), jnp.array([0, 1, 0, 1]),
                       jnp.ones(4), **args)


def test_array_likes_are_taken_as_arrays_with_the_same_sums():
  """Lists for x, labels and mask (and clip_rows' rows) give the sums of
  the arrays they hold; a list mask had failed in the gradient sum with
  "'>' not supported between 'list' and 'int'"."""
  from dpgeng_jax.clipping import clip_rows, clipped_class_sums
  x = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
  y, m = [0, 1, 0, 1], [1.0, 1.0, 0.0, 1.0]
  want = clipped_class_sums(_embed, None, jnp.asarray(x), jnp.asarray(y),
                            jnp.asarray(m), num_classes=2, clip_norm=1.0)
  got = clipped_class_sums(_embed, None, x.tolist(), y, m, num_classes=2,
                           clip_norm=1.0)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(clip_rows(x.tolist(), 1.0)),
                                np.asarray(clip_rows(jnp.asarray(x), 1.0)))

  def loss(p, b):
    return jnp.sum(b * p)

  g_list = clipped_grad_sum(loss, 1.0, jnp.asarray(x), m, clip_norm=1.0)
  g_arr = clipped_grad_sum(loss, 1.0, jnp.asarray(x), jnp.asarray(m),
                           clip_norm=1.0)
  np.testing.assert_array_equal(np.asarray(g_list), np.asarray(g_arr))


def test_a_batch_whose_arrays_differ_in_length_is_refused_by_name():
  def loss(p, b):
    return jnp.sum(b[0] * p) + jnp.sum(b[1])

  with pytest.raises(ValueError, match=r"share their leading axis .* "
                     r"got lengths \[3, 4\]"):
    clipped_grad_sum(loss, 1.0, (jnp.ones((4, 3)), jnp.ones((3, 2))),
                     jnp.ones(4), clip_norm=1.0)


@pytest.mark.parametrize("microbatch", [2.5, "2", -1, True])
def test_a_microbatch_that_is_not_a_count_is_refused(microbatch):
  from dpgeng_jax.clipping import microbatched
  with pytest.raises(ValueError, match="microbatch must be an integer >= 0"):
    microbatched(lambda p, b, m: jnp.sum(b), microbatch)


def test_small_misuses_of_the_library_get_clear_answers():
  """From a review of the library API: an int shape for gaussian_noise
  ("'int' object is not iterable"), a fractional class_major padding
  (2.5 truncated to 2) and a nan or inf PLD interval (a float-to-int
  error, an IndexError)."""
  import dp_accounting
  from dpgeng_jax import accounting, mechanisms, noise
  from dpgeng_jax.errors import ConfigError
  assert noise.gaussian_noise(noise.deterministic_secret_key(0), 3,
                              1.0).shape == (3,)
  with pytest.raises(ConfigError, match="rows must be an integer"):
    mechanisms.class_major(np.zeros((4, 2)), np.array([0, 1, 0, 1]), 2,
                           rows=2.5)
  for bad in (float("nan"), float("inf"), 0.0):
    with pytest.raises(ValueError, match="PLD interval"):
      accounting.epsilon_of(dp_accounting.GaussianDpEvent(1.0), 1e-5, bad)


def test_a_dp_sgd_step_refuses_a_grad_sum_that_clips_to_another_norm():
  """pergrad's grad_sum_fn clipping to 1.5 under a step calibrated for
  1.0 was accepted at 2 rows (one example moved the release by 1.4975
  against noise sigma * 1.0); it carries its clip norm, kept through
  microbatching, and the step compares them."""
  from dpgeng_jax import clipping as clipping_lib
  model = ConvNet(num_classes=2, width=4, depth=1)
  for fn in (pergrad.make_grad_sum_fn(model, clip_norm=1.5),
             clipping_lib.microbatched(
                 pergrad.make_grad_sum_fn(model, clip_norm=1.5), 2)):
    assert fn.clip_norm == 1.5
    with pytest.raises(ValueError, match="clips to 1.5, the release's "
                       "clip_norm is 1.0"):
      mechanisms.make_dp_sgd_step(None, optax.sgd(1.0), clip_norm=1.0,
                                  noise_multiplier=1.0,
                                  expected_batch_size=1.0, grad_sum_fn=fn)
  mechanisms.make_dp_sgd_step(
      None, optax.sgd(1.0), clip_norm=1.5, noise_multiplier=1.0,
      expected_batch_size=1.0,
      grad_sum_fn=pergrad.make_grad_sum_fn(model, clip_norm=1.5))


def test_a_release_s_noise_and_clip_norm_must_be_static_numbers():
  """They choose fixed point or float sums and size the noise: traced,
  a clear TypeError naming them (it was JAX's tracer-conversion error);
  a traced C without noise is the non-private path and stays allowed."""
  with pytest.raises(TypeError, match="noise_multiplier must be a static"):
    jax.jit(lambda s: mechanisms.SumRelease(1.0, s).noise_stddev)(1.0)
  with pytest.raises(TypeError, match="clip_norm of a noisy release must "
                     "be a static"):
    jax.jit(lambda c: mechanisms.SumRelease(c, 1.0).noise_stddev)(1.0)
  assert jax.jit(lambda c: mechanisms.SumRelease(c, 0.0).noise_stddev)(
      1.0) == 0.0


# --- A second review of the library API (x64, traced arguments, extreme C).


def _tiny_gradient_convnet():
  """One confident, correct example (gradient norm ~1.4e-25) and a padded
  row: its squares underflow float32."""
  from dpgeng_jax import models
  model = ConvNet(num_classes=3, width=4, depth=2)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  params["head"]["bias"] = jnp.array([60.0, 0.0, 0.0])
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  y, mask = jnp.array([0, 0]), jnp.array([1.0, 0.0])
  loss = lambda p, b: models.cross_entropy(model, p, b[0], b[1])
  return model, params, x, y, mask, loss


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64)))
                           for a in jax.tree.leaves(tree))))


def test_pergrad_clips_gradients_whose_squares_underflow():
  """pergrad's plain norm is sqrt(sum of squares): at a C below ~1e-19 the
  squares of a row's entries flushed to 0, its norm read 0 and the row
  went unclipped (13.7 C at C = 1e-26, in the fixed-point release too).
  Such rows take the overflow-safe norms, as the generic path does."""
  model, params, x, y, mask, loss = _tiny_gradient_convnet()
  full = _norm(clipped_grad_sum(loss, params, (x, y), mask,
                                clip_norm=math.inf))
  assert 1e-26 < full < 1e-24
  for c in (1e-30, 1e-26):
    got = _norm(pergrad.convnet_clipped_grad_sum(model, params, x, y, mask,
                                                 clip_norm=c))
    want = _norm(clipped_grad_sum(loss, params, (x, y), mask, clip_norm=c))
    assert got <= c and got == pytest.approx(want, rel=1e-5)
  release = mechanisms.SumRelease(1e-26, 1.0)
  bits = release.release_bits(2)
  q = pergrad.convnet_clipped_grad_sum(model, params, x, y, mask,
                                       clip_norm=1e-26, bits=bits)
  assert _norm(q) * 2.0 ** -bits <= 1e-26
  # A gradient above the threshold keeps the plain norm's result.
  big = pergrad.convnet_clipped_grad_sum(model, params, x, y, mask,
                                         clip_norm=1e-21)
  assert _norm(big) == pytest.approx(full, rel=1e-5)


def test_pergrad_dp_sgd_step_runs_with_x64_enabled():
  """With jax_enable_x64 the fixed-point sums widened to int64 and
  pergrad's int32 scan carry failed; they stay int32."""
  model = ConvNet(num_classes=3, width=4, depth=2)
  with jax.enable_x64(True):
    params = init_params(model, jax.random.key(0), (8, 8, 1))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1), jnp.float32)
    y, mask = jnp.array([0, 1, 2, 0]), jnp.ones(4, jnp.float32)
    fn = pergrad.make_grad_sum_fn(model, clip_norm=1.0)
    q = fn(params, (x, y), mask, bits=12)
    assert {a.dtype for a in jax.tree.leaves(q)} == {jnp.dtype(jnp.int32)}
    step = mechanisms.make_dp_sgd_step(
        None, optax.sgd(0.1), clip_norm=1.0, noise_multiplier=1.0,
        expected_batch_size=4.0, grad_sum_fn=fn)
    _, _, g = step(params, optax.sgd(0.1).init(params), (x, y), mask, KEY)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(g))


def test_pergrad_refuses_images_without_channels_and_low_precision_params():
  model = ConvNet(num_classes=3, width=4, depth=2)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  x = jnp.zeros((4, 8, 8, 1))
  y, mask = jnp.array([0, 1, 2, 0]), jnp.ones(4)
  with pytest.raises(ValueError, match=r"\(n, H, W, C\)"):
    pergrad.convnet_clipped_grad_sum(model, params, x[..., 0], y, mask,
                                     clip_norm=1.0)
  half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  with pytest.raises(ValueError, match="float32 parameters"):
    pergrad.convnet_clipped_grad_sum(model, half, x, y, mask, clip_norm=1.0)


def test_a_query_refuses_class_major_data_of_another_class_count():
  """Under jit the extra classes' rows were silently dropped (and eagerly
  the error named labels the caller never gave)."""
  data = mechanisms.class_major(np.ones((9, 2, 2, 1), np.float32),
                                np.array([0, 1, 2] * 3), 3)
  aug = augment.identity_params((3,))
  for k in (2, 4):
    spec = mechanisms.QuerySpec(_embed, k, 1.0, 0.0, 1.0, 3,
                                strategy="none")
    with pytest.raises(ValueError, match=f"holds 3 classes.*query {k}"):
      jax.jit(lambda d, s=spec: mechanisms.noisy_targets(
          s, d, None, aug, KEY))(data)


def test_traced_labels_of_the_wrong_shape_are_refused():
  from dpgeng_jax.clipping import clipped_class_sums
  x = jnp.ones((3, 2, 2, 1))
  f = jax.jit(lambda y: clipped_class_sums(
      _embed, None, x, y, jnp.ones(3), num_classes=2, clip_norm=1.0))
  with pytest.raises(ValueError, match=r"labels of shape \(1,\) for 3 rows"):
    f(jnp.array([1]))
  assert f(jnp.array([0, 1, 1])).shape == (2, 4)


def test_fixed_point_sums_drop_a_traced_label_out_of_range_like_float_ones():
  """An int64 label 2^32 + 1 (K = 2) wrapped to class 1 in the int32 cast
  of the fixed-point path; both paths drop it."""
  from dpgeng_jax.clipping import clipped_class_sums
  with jax.enable_x64(True):
    x, mask = jnp.ones((2, 2, 2, 1), jnp.float32), jnp.ones(2, jnp.float32)
    y = jnp.array([0, 2**32 + 1], jnp.int64)
    sums = {bits: np.asarray(jax.jit(lambda l, b=bits: clipped_class_sums(
        _embed, None, x, l, mask, num_classes=2, clip_norm=1.0,
        bits=b))(y)) for bits in (None, 8)}
  assert np.all(sums[None][1] == 0) and np.all(sums[8][1] == 0)
  assert np.all(sums[8][0] > 0) and np.all(sums[None][0] > 0)


def test_a_traced_invalid_scale_releases_nan():
  """A concrete inf or negative scale is refused; traced, inf published
  each coordinate's sign and -1 flipped the release: NaN now."""
  v = jnp.array([5, -3, 0], jnp.int32)
  for sd in (0.0, 1.0):
    f = jax.jit(lambda s, sd=sd: noise.add_gaussian_noise(KEY, v, sd,
                                                          scale=s))
    for bad in (jnp.inf, -1.0, 0.0, jnp.nan):
      assert np.all(np.isnan(np.asarray(f(bad)))), (sd, bad)
    assert np.all(np.isfinite(np.asarray(f(0.5))))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda s: noise.add_gaussian_noise(
          KEY, v, 0.0, scale=s))(0.5)), [2.5, -1.5, 0.0])


def test_sharded_class_major_checks_labels_as_class_major_does():
  from dpgeng_jax import parallel
  x = np.zeros((4, 2, 2, 1), np.float32)
  for y, match in (([0, 1, 5, 5], "labels >= 2"),
                   ([0, 1, -1, 1], "negative labels"),
                   ([0.0, 1.0, 1.0, 0.0], "integers")):
    with pytest.raises(ValueError, match=match):
      parallel.sharded_class_major(x, np.array(y), 2, 2)


def test_calibrate_takes_array_scalars_and_names_a_useless_delta():
  from dpgeng_jax import accounting
  ms = [accounting.Mechanism("a", 1.0, 0.1, 10)]
  a = accounting.calibrate(ms, jnp.float32(1.0), np.float64(1e-5))
  b = accounting.calibrate(ms, 1.0, 1e-5)
  assert a[0].noise_multiplier == b[0].noise_multiplier
  with pytest.raises(ValueError, match="lower the delta"):
    accounting.calibrate(ms, 1.0, 0.99)


def test_the_expert_step_refuses_a_grad_sum_clipping_to_another_norm():
  """expert.private_step (the step `dpgeng audit` audits) released a
  grad_sum clipping to 1.3 with noise for 1.0, as make_dp_sgd_step and
  the sharded step no longer do."""
  model = ConvNet(num_classes=2, width=4, depth=1)
  x = np.zeros((6, 8, 8, 1), np.float32)
  y = (np.arange(6) % 2).astype(np.int32)
  cfg = expert.ExpertConfig(steps=1, sampling_rate=0.5, clip_norm=1.0)
  with pytest.raises(ValueError, match="clips to 1.3, the release's"):
    expert.private_step(pergrad.make_grad_sum_fn(model, clip_norm=1.3), cfg,
                        1.0, x, y, 6, math.log(1e-6))
  expert.private_step(pergrad.make_grad_sum_fn(model, clip_norm=1.0), cfg,
                      1.0, x, y, 6, math.log(1e-6))


def test_the_expert_refuses_labels_it_would_cast_or_misplace():
  model = ConvNet(num_classes=3, width=4, depth=1)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  x = np.zeros((4, 8, 8, 1), np.float32)
  cfg = expert.ExpertConfig(steps=1, sampling_rate=0.5)
  grad_sum = pergrad.make_grad_sum_fn(model, clip_norm=cfg.clip_norm)
  for y, match in (([0, 1, 2, 2**32 + 1], "fit int32"),
                   ([0, 1, 2, -1], "fit int32"),
                   ([0.0, 1.0, 2.0, 0.0], "integers")):
    with pytest.raises(ValueError, match=match):
      expert.private_step(grad_sum, cfg, 1.0, x, np.array(y), 4,
                          math.log(1e-6))
  with pytest.raises(ValueError, match=r"labels must be in 0..2"):
    expert.dp_finetune(params, model, x, np.array([0, 1, 2, 7]), cfg=cfg,
                       noise_multiplier=1.0, secret=KEY)


def test_pe_votes_drop_a_traced_label_out_of_range():
  """Under jit an int64 label 2^32 + 1 voted in class 1 and a -1 in class
  K-1 (a concrete one is refused); they vote nowhere, like K itself."""
  from dpgeng_jax.generators import pe
  pop = jnp.zeros((3, 4, 2)).at[:, 0].set(1.0)
  priv, mask = jnp.ones((1, 2)), jnp.ones(1)
  with jax.enable_x64(True):
    for label in (2**32 + 1, -1, 3):
      got = jax.jit(lambda y: pe.vote_counts(pop, priv, y, mask, k=1))(
          jnp.array([label], jnp.int64))
      assert got.dtype == jnp.int32 and int(got.sum()) == 0, label
    got = jax.jit(lambda y: pe.vote_counts(pop, priv, y, mask, k=1))(
        jnp.array([1], jnp.int64))
    assert int(got[1, 0]) == 1 and int(got.sum()) == 1


def test_a_traced_invalid_stddev_releases_nan():
  v = jnp.zeros(3)
  f = jax.jit(lambda sd: noise.add_gaussian_noise(KEY, v, sd))
  for bad in (-1.0, jnp.inf, jnp.nan):
    assert np.all(np.isnan(np.asarray(f(bad)))), bad
  assert np.all(np.isfinite(np.asarray(f(1.0))))


def test_calibrate_takes_a_bfloat16_scalar():
  from dpgeng_jax import accounting
  ms = [accounting.Mechanism("a", 1.0, 0.1, 10)]
  assert accounting.calibrate(ms, jnp.bfloat16(1.0), 1e-5)[0] == (
      accounting.calibrate(ms, 1.0, 1e-5)[0])
