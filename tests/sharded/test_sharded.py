"""Sharded private passes agree with the unsharded ones on fake CPU devices.

These tests need 8 devices. tests/test_parallel.py runs this file in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the
main test process has one device, so here they are skipped).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpgeng_jax import (augment, clipping, mechanisms, noise, parallel,
                        pergrad, stem)
from dpgeng_jax.clipping import clipped_class_sums, clipped_grad_sum
from dpgeng_jax.models import ConvNet, cross_entropy, embed_fn, init_params

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/test_parallel.py "
    "runs this file with 8 fake CPU devices)")

K = 3


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params


def _rows(n=37, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32) * 3
  y = rng.integers(0, K, n).astype(np.int32)
  mask = (rng.random(n) < 0.8).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)


@pytest.mark.parametrize("devices", [4, 8])
def test_sharded_clipped_class_sums_equal_unsharded(devices):
  x, y, mask = _rows()
  params = jnp.asarray(np.random.default_rng(1).normal(size=(16, 5)),
                       jnp.float32)
  want = clipped_class_sums(_linear, params, x, y, mask, num_classes=K,
                            clip_norm=1.0)
  got = jax.jit(functools.partial(
      parallel.sharded_clipped_class_sums, _linear, num_classes=K,
      clip_norm=1.0, mesh=parallel.data_mesh(devices)))(params, x, y, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


@functools.cache
def _convnet(n=24):
  model = ConvNet(num_classes=K, width=8, depth=2)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K, n), jnp.int32)
  mask = jnp.asarray((rng.random(n) < 0.9), jnp.float32)
  return model, params, x, y, mask


@functools.cache
def _reference_grad_sum(all_rows=False):
  """Unsharded clipped gradient sum (jitted once for the whole file)."""
  model, params, x, y, mask = _convnet()
  mask = jnp.ones_like(mask) if all_rows else mask
  loss = lambda p, b: cross_entropy(model, p, *b)
  return jax.jit(functools.partial(clipped_grad_sum, loss, clip_norm=0.5))(
      params, (x, y), mask)


def _max_rel_diff(a, b):
  """Largest difference relative to b's largest entry (some leaves, such
  as conv biases followed by instance norm, have gradients of ~0)."""
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))
  return max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale


@pytest.mark.parametrize("devices,path", [(4, "vmap"), (8, "pergrad"),
                                          (4, "pergrad")])
def test_sharded_clipped_grad_sums_equal_unsharded(devices, path):
  model, params, x, y, mask = _convnet()
  loss = lambda p, b: cross_entropy(model, p, *b)
  want = _reference_grad_sum()
  fn = (functools.partial(clipped_grad_sum, loss, clip_norm=0.5)
        if path == "vmap" else pergrad.make_grad_sum_fn(model, clip_norm=0.5))
  got = jax.jit(lambda p, b, m: parallel.sharded_grad_sum(
      fn, p, b, m, mesh=parallel.data_mesh(devices)))(params, (x, y), mask)
  assert _max_rel_diff(got, want) < 1e-4


def _naive_clipped_grad_sum(loss, params, batch, mask, *, clip_norm):
  """clipped_grad_sum without its guard (clipping.vary_like): the
  deliberately broken variant."""
  grads = jax.vmap(lambda p, ex: jax.grad(loss)(
      p, jax.tree.map(lambda a: a[None], ex)), in_axes=(None, 0))(
          params, batch)
  flat = jnp.concatenate([g.reshape(g.shape[0], -1)
                          for g in jax.tree.leaves(grads)], axis=1)
  w = clipping.clip_scale(jnp.linalg.norm(flat, axis=1), clip_norm) * mask
  return jax.tree.map(lambda g: jnp.tensordot(w, g, axes=(0, 0)), grads)


def test_naive_shard_map_without_pcast_breaks_per_example_clipping():
  """Without making the parameters device-varying, shard_map sums each
  per-example gradient over devices before it is clipped: the naive
  variant is caught. clipped_grad_sum makes its parameters vary like the
  batch itself, so it stays exact inside a user's own shard_map over
  replicated parameters (a review's finding: one example counted 4C
  there, and still 3C when masked out)."""
  model, params, x, y, mask = _convnet()
  loss = lambda p, b: cross_entropy(model, p, *b)
  want = _reference_grad_sum()
  for fn, broken in ((functools.partial(_naive_clipped_grad_sum, loss,
                                        clip_norm=0.5), True),
                     (functools.partial(clipped_grad_sum, loss,
                                        clip_norm=0.5), False)):
    got = jax.jit(lambda p, b, m, fn=fn: parallel.sharded_grad_sum(
        fn, p, b, m, mesh=parallel.data_mesh(8), vary_params=False))(
            params, (x, y), mask)
    assert (_max_rel_diff(got, want) > 0.1) == broken
    if not broken:
      assert _max_rel_diff(got, want) < 1e-4


def _query_setup(n=40, seed=3):
  rng = np.random.default_rng(seed)
  x = rng.random((n, 4, 4, 1)).astype(np.float32)
  y = np.arange(n) % K
  params = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  aug = augment.sample_params(jax.random.key(5), "flip_crop",
                              batch_shape=(K,))
  return x, y, params, aug


def _spec(sigma, p, cap, clip=1.0):
  return mechanisms.QuerySpec(embed_fn=_linear, num_classes=K,
                              clip_norm=clip, noise_multiplier=sigma,
                              sampling_rate=p, capacity=cap,
                              strategy="flip_crop")


def _sharded(x, y, devices, p, layout):
  """(data, per-device capacity) of the private rows on `devices` in
  `layout`: class-major (`sharded_class_major`) or flat (the run's:
  `local_rows`, capacity at the per-device share of the tail)."""
  if layout == "class_major":
    data = parallel.sharded_class_major(x, y, K if y.max() else 1, devices)
    return data, parallel.shard_capacity(data.valid, devices, p)
  mesh = parallel.data_mesh(devices)
  data = mechanisms.FlatData(*parallel.local_rows(mesh, x, y))
  return data, mechanisms.poisson_capacity(
      [parallel.rows_per_device(len(y), mesh)], p,
      mechanisms.OVERFLOW_TAIL / devices)


LAYOUTS = ["class_major", "flat"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_query_without_noise_or_sampling_equals_unsharded(layout):
  devices = 8
  x, y, params, aug = _query_setup()
  full = mechanisms.class_major(x, y, K)
  want, _ = mechanisms.noisy_targets(_spec(0.0, 1.0, 14), full, params, aug,
                                     jax.random.key(0))
  data, cap = _sharded(x, y, devices, 1.0, layout)
  got, over = jax.jit(functools.partial(
      parallel.sharded_noisy_targets, _spec(0.0, 1.0, cap),
      mesh=parallel.data_mesh(devices)))(data, params, aug,
                                         jax.random.key(1))
  assert not bool(over)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("devices,layout", [(1, "class_major"),
                                            (8, "class_major"), (8, "flat")])
def test_noise_is_added_once_whatever_the_device_count(devices, layout):
  """The residual std is sigma * C on any mesh (not sqrt(devices) times)."""
  x, y, _, _ = _query_setup()
  params = jnp.asarray(np.random.default_rng(4).normal(size=(16, 24)),
                       jnp.float32)
  aug = augment.identity_params((K,))
  data, cap = _sharded(x, y, devices, 1.0, layout)
  mesh = parallel.data_mesh(devices)

  def spec(sigma):
    return dataclasses.replace(_spec(sigma, 1.0, cap), strategy="none")

  clean = jax.jit(lambda s: parallel.sharded_noisy_targets(  # traced once
      spec(0.0), data, params, aug, s, mesh=mesh)[0])(jax.random.key(0))
  f = jax.jit(jax.vmap(lambda s: parallel.sharded_noisy_targets(
      spec(2.0), data, params, aug, s, mesh=mesh)[0]))
  outs = f(jax.random.split(jax.random.key(7), 300))
  resid = np.asarray(outs - clean).ravel()  # 300 x 72 draws
  assert stats.kstest(resid, "norm", args=(0, 2.0)).pvalue > 1e-3
  assert abs(resid.std() / 2.0 - 1) < 0.03


@pytest.mark.parametrize("layout", LAYOUTS)
def test_devices_sample_independently_with_rate_p(layout):
  """Batch sizes over many keys have mean N p and variance N p (1 - p): a
  shared key on every device would correlate the shards and inflate it."""
  devices, p = 8, 0.3
  x = np.zeros((800, 2, 2, 1), np.float32)
  y = np.zeros(800, np.int64)
  data, cap = _sharded(x, y, devices, p, layout)
  mesh = parallel.data_mesh(devices)
  ones = lambda params, xb: jnp.ones((xb.shape[0], 1))
  spec = mechanisms.QuerySpec(embed_fn=ones, num_classes=1, clip_norm=1.0,
                              noise_multiplier=0.0, sampling_rate=p,
                              capacity=cap, strategy="none")
  f = jax.jit(jax.vmap(lambda s: parallel.sharded_noisy_targets(
      spec, data, None, augment.identity_params((1,)), s, mesh=mesh)[0]))
  sizes = np.asarray(f(jax.random.split(jax.random.key(3), 2000))).ravel()
  assert abs(sizes.mean() / (800 * p) - 1) < 0.01
  assert abs(sizes.var() / (800 * p * (1 - p)) - 1) < 0.15


def test_sharded_layout_holds_every_example_once():
  x = np.arange(23, dtype=np.float32).reshape(23, 1, 1, 1)
  y = np.arange(23) % K
  data = parallel.sharded_class_major(x, y, K, 4)
  v = np.asarray(data.valid) > 0
  got = sorted(np.asarray(data.x)[v].ravel().tolist())
  assert got == list(range(23))
  for c in range(K):  # each class's values sit in its own row
    assert set(np.asarray(data.x)[c][v[c]].ravel() % K) == {c}


def test_shard_capacity_keeps_the_per_class_tail():  # library default
  valid = np.ones((2, 8 * 50))
  cap = parallel.shard_capacity(valid, 8, 0.5)
  tail = stats.binom.sf(cap, 50, 0.5)
  assert 8 * tail <= mechanisms.OVERFLOW_TAIL
  assert 8 * stats.binom.sf(cap - 1, 50, 0.5) > mechanisms.OVERFLOW_TAIL


def test_flat_capacity_splits_the_batch_tail_over_the_devices():
  # The queries' and the expert's per-device capacity: the batch overflows
  # with probability <= tau over all 8 devices (each <= tau / 8), and the
  # capacity is the smallest that does. Sized for tau per device, the
  # batch's overflow (an abort event) had 8 tau, beyond its delta reserve.
  import math
  from dpgeng_jax import expert, stages
  mesh = parallel.data_mesh(8)
  rows, p, log_tail = 800, 0.3, math.log(1e-9)
  cap = parallel.flat_capacity(rows, p, log_tail, mesh)
  per = parallel.rows_per_device(rows, mesh)
  assert per == 100
  assert 8 * stats.binom.sf(cap, per, p) <= math.exp(log_tail)
  assert 8 * stats.binom.sf(cap - 1, per, p) > math.exp(log_tail)
  assert stages.query_capacity(rows, p, log_tail, mesh) == cap
  assert expert.step_capacity(expert.ExpertConfig(sampling_rate=p), rows,
                              log_tail, mesh) == cap
  one = parallel.flat_capacity(rows, p, log_tail)
  assert stats.binom.sf(one, rows, p) <= math.exp(log_tail)
  assert stats.binom.sf(one - 1, rows, p) > math.exp(log_tail)


def test_sharded_dp_sgd_gradient_without_noise_equals_unsharded(devices=8):
  model, params, x, y, mask = _convnet()
  mask = jnp.ones_like(mask)
  want = _reference_grad_sum(all_rows=True)
  fn = pergrad.make_grad_sum_fn(model, clip_norm=0.5)
  (xs, ys), valid = parallel.pad_rows((x, y), mask, devices)
  got, over = jax.jit(functools.partial(
      parallel.sharded_dp_sgd_grad, fn, sampling_rate=1.0,
      capacity=xs.shape[0] // devices, mesh=parallel.data_mesh(devices),
      release=mechanisms.SumRelease(0.5, 0.0)))(params, xs, ys, valid,
                                                jax.random.key(0))
  assert not bool(over)
  assert _max_rel_diff(got, want) < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sharded_query_sizes_its_fixed_point_from_every_device(
    layout, monkeypatch):
  """bits must come from the rows of ALL devices (an int32 psum of per-
  device sums sized for one device's rows could overflow)."""
  devices = 8
  x, y, params, aug = _query_setup()
  data, cap = _sharded(x, y, devices, 0.5, layout)
  spec = _spec(1.0, 0.5, cap, clip=0.7)
  seen = []
  real = mechanisms.sampled_class_sums

  def spy(*args, **kwargs):
    seen.append(args[-1])  # bits (skip_padding goes by keyword)
    return real(*args, **kwargs)

  monkeypatch.setattr(mechanisms, "sampled_class_sums", spy)
  query = jax.jit(functools.partial(  # jitted: traced once, not op by op
      parallel.sharded_noisy_targets, spec, mesh=parallel.data_mesh(devices)))
  jax.block_until_ready(query(data, params, aug, jax.random.key(0)))
  rows = cap * devices * (1 if layout == "flat" else K)
  assert seen == [clipping.fixed_point_bits(rows, 0.7)]


def _one_full_device(devices=8, rows=4):
  """valid (devices * rows,): every row of the first device, one row of
  each other (the rows split over the devices in contiguous blocks)."""
  valid = np.zeros((devices, rows), np.float32)
  valid[0] = 1.0
  valid[1:, 0] = 1.0
  return jnp.asarray(valid.ravel())


def test_one_device_s_overflow_withholds_the_sharded_query():
  # Capacity 2 at rate 1: the first device's 4 rows overflow, the others'
  # single rows do not. The run must see the flag (an abort event) and the
  # sums must be withheld (NaN), not a truncated batch released.
  x, y, params, aug = _query_setup(n=32)
  data = mechanisms.FlatData(jnp.asarray(x), jnp.asarray(y, jnp.int32),
                             _one_full_device())
  mesh = parallel.data_mesh(8)
  for cap, overflows in ((2, True), (4, False)):
    got, over = jax.jit(functools.partial(
        parallel.sharded_noisy_targets, _spec(1.0, 1.0, cap), mesh=mesh))(
            data, params, aug, noise.deterministic_secret_key(0))
    assert bool(over) is overflows
    assert bool(np.all(np.isnan(np.asarray(got)))) is overflows


def test_one_device_s_overflow_withholds_the_sharded_dp_sgd_step():
  model, params, x, y, _ = _convnet(n=32)
  fn = pergrad.make_grad_sum_fn(model, clip_norm=0.5)
  for cap, overflows in ((2, True), (4, False)):
    got, over = jax.jit(functools.partial(
        parallel.sharded_dp_sgd_grad, fn, sampling_rate=1.0, capacity=cap,
        mesh=parallel.data_mesh(8),
        release=mechanisms.SumRelease(0.5, 1.0)))(
            params, x, y, _one_full_device(),
            noise.deterministic_secret_key(0))
    assert bool(over) is overflows
    leaves = [np.asarray(a) for a in jax.tree.leaves(got)]
    assert all(bool(np.all(np.isnan(a))) is overflows for a in leaves)


def test_sharded_steps_refuse_a_grad_sum_that_clips_to_another_norm():
  """As make_dp_sgd_step does: pergrad's grad_sum_fn clipping to 1.5 under
  a release for 1.0 had its sums released with 2/3 of the noise their
  sensitivity needs; sharded_grad_sum's bits would be checked at the
  other norm."""
  model, params, x, y, mask = _convnet()
  (xs, ys), valid = parallel.pad_rows((x, y), jnp.ones_like(mask), 8)
  fn = pergrad.make_grad_sum_fn(model, clip_norm=1.5)
  with pytest.raises(ValueError, match="clips to 1.5, the release's "
                     "clip_norm is 1.0"):
    parallel.sharded_dp_sgd_grad(
        fn, params, xs, ys, valid, noise.deterministic_secret_key(0),
        sampling_rate=1.0, capacity=xs.shape[0] // 8,
        mesh=parallel.data_mesh(8), release=mechanisms.SumRelease(1.0, 1.0))
  with pytest.raises(ValueError, match="clips to 1.5, clip_norm is 1.0"):
    parallel.sharded_grad_sum(fn, params, (x, y), mask,
                              mesh=parallel.data_mesh(8), bits=8,
                              clip_norm=1.0)


def test_a_sharded_dp_sgd_step_sizes_its_fixed_point_from_every_device():
  devices = 8
  model, params, x, y, mask = _convnet()
  (xs, ys), valid = parallel.pad_rows((x, y), jnp.ones_like(mask), devices)
  cap = xs.shape[0] // devices
  real = pergrad.make_grad_sum_fn(model, clip_norm=0.5)
  seen = []

  def fn(p, b, m, bits=None):
    seen.append(bits)
    return real(p, b, m, bits=bits)

  step = jax.jit(functools.partial(  # jitted: traced once, not op by op
      parallel.sharded_dp_sgd_grad, fn, sampling_rate=1.0, capacity=cap,
      mesh=parallel.data_mesh(devices),
      release=mechanisms.SumRelease(0.5, 1.0)))
  jax.block_until_ready(step(params, xs, ys, valid, jax.random.key(0)))
  assert seen == [clipping.fixed_point_bits(cap * devices, 0.5)]


def test_a_sharded_dp_sgd_step_adds_noise_of_std_sigma_c_once():
  """No valid rows on any of 8 devices: the step's noisy gradient sum is
  the noise alone, N(0, (sigma C)^2) per coordinate (KS; 2/3 and 3/2 of
  the std rejected): added once after the psum, not once per device
  (which would give sqrt(8) times the std)."""
  devices = 8
  model, params, x, y, mask = _convnet()
  (xs, ys), valid = parallel.pad_rows((x, y), jnp.zeros_like(mask),
                                      devices)
  fn = pergrad.make_grad_sum_fn(model, clip_norm=0.5)
  step = jax.jit(functools.partial(
      parallel.sharded_dp_sgd_grad, fn, sampling_rate=1.0,
      capacity=xs.shape[0] // devices, mesh=parallel.data_mesh(devices),
      release=mechanisms.SumRelease(0.5, 1.0)))
  z = []
  for i in range(4):  # 795 parameters per step
    g, over = step(params, xs, ys, valid, jax.random.fold_in(
        noise.deterministic_secret_key(8), i))
    assert not bool(over)
    z += [np.asarray(a).ravel() for a in jax.tree.leaves(g)]
  z = np.concatenate(z)
  assert z.size > 3000
  assert stats.kstest(z, "norm", args=(0, 0.5)).pvalue > 1e-4
  for wrong in (2 / 3, 3 / 2):
    assert stats.kstest(z, "norm", args=(0, 0.5 * wrong)).pvalue < 1e-6


def test_chunked_sharded_class_sums_equal_unsharded():
  x, y, mask = _rows(n=30)
  params = jnp.asarray(np.random.default_rng(1).normal(size=(16, 5)),
                       jnp.float32)
  want = clipped_class_sums(_linear, params, x, y, mask, num_classes=K,
                            clip_norm=1.0)
  got = jax.jit(functools.partial(
      parallel.sharded_clipped_class_sums, _linear, num_classes=K,
      clip_norm=1.0, mesh=parallel.data_mesh(4), chunk_size=3))(
          params, x, y, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
  # In fixed point (as the releases sum) the int32 sums add exactly: with
  # an elementwise embedding (each row's value independent of the batch
  # shape) the split changes nothing at all.
  bits = 20
  elementwise = lambda p, xb: jnp.tanh(xb.reshape(xb.shape[0], -1) * p)
  scale = jnp.asarray(np.random.default_rng(2).normal(size=16), jnp.float32)
  want = clipped_class_sums(elementwise, scale, x, y, mask, num_classes=K,
                            clip_norm=1.0, chunk_size=7, bits=bits)
  got = jax.jit(functools.partial(
      parallel.sharded_clipped_class_sums, elementwise, num_classes=K,
      clip_norm=1.0, mesh=parallel.data_mesh(4), chunk_size=3,
      bits=bits))(scale, x, y, mask)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_whole_dpgeng_run_on_8_devices_matches_one_device(tmp_path):
  """Deterministic test mode with p = q_E = 1: sampling includes every
  example and the noise keys are the same, so the sharded run (count and
  generator releases, queries with generated extractors, expert DP-SGD)
  must give the one-device result up to float summation order. Noise
  initialisation: k-means on the 5-step generator's near-identical samples
  flips its picks on 1-ulp differences of the generated images."""
  from dpgeng_jax import cli
  tiny = ["distill", "--method", "dpgeng", "--deterministic", "--no-eval",
          "--init", "noise",
          "--epsilon", "4", "--sampling-rate", "1", "--expert-sampling-rate",
          "1", "--ipc", "2", "--steps", "3", "--num-queries", "2",
          "--extractor-width", "8", "--generator-steps", "5",
          "--generator-features", "20", "--generated-per-class", "8",
          "--pe-iterations", "2", "--pe-population", "6",
          "--pool-models", "1", "--pool-checkpoints", "2", "--pool-epochs",
          "1", "--expert-steps", "2", "--expert", "--quiet"]
  outs = {}
  for devices in (1, 8):
    out = tmp_path / f"d{devices}"
    assert cli.main([*tiny, "--devices", str(devices), "--microbatch",
                     "16" if devices == 8 else "0", "--out", str(out)]) == 0
    outs[devices] = np.load(out / "distilled.npz")["x"]
  assert np.max(np.abs(outs[8] - outs[1])) < 1e-2 * np.max(np.abs(outs[1]))


def test_pe_with_a_warm_start_on_4_devices_matches_one_device(tmp_path):
  """Deterministic test mode, pixel embedding: the warm release (its
  fixed-point sums psum'd, the noise added once) and the histograms of a
  4-device run equal the one-device run's."""
  from dpgeng_jax import cli
  from dpgeng_jax.generators import pe
  tiny = ["distill", "--method", "generator", "--deterministic",
          "--no-eval", "--ipc", "1", "--generated-per-class", "4",
          "--pe-iterations", "2", "--pe-population", "5",
          "--pe-embedding", "pixels", "--pe-warm-start", "2",
          "--pool-models", "1", "--pool-checkpoints", "1",
          "--pool-epochs", "1", "--extractor-width", "8", "--quiet"]
  got = {}
  for devices in (1, 4):
    out = tmp_path / f"d{devices}"
    assert cli.main([*tiny, "--devices", str(devices), "--out",
                     str(out)]) == 0
    with np.load(out / "stages" / "generate" / "arrays.npz") as g:
      got[devices] = (g[pe.WARM], g[pe.RELEASES])
  np.testing.assert_allclose(got[4][0], got[1][0], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(got[4][1], got[1][1])


@pytest.mark.parametrize("devices", [4, 8])
def test_sharded_merf_release_equals_unsharded(devices):
  # The fixed-point sums (bits sized for all the rows) add up over the
  # devices exactly, and the noise is drawn once for the summed release:
  # with one key, the sharded release equals the unsharded one bit for bit.
  from dpgeng_jax.generators import merf
  rng = np.random.default_rng(9)
  n = 40  # a multiple of both device counts
  x = jnp.asarray(rng.normal(size=(n, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K, n), jnp.int32)
  mask = jnp.asarray((rng.random(n) < 0.8).astype(np.float32))
  fmap = merf.FeatureMap.create(jax.random.key(0), 16, 10)
  key = noise.deterministic_secret_key(3)
  for sigma in (0.0, 2.0):
    release = functools.partial(merf.release_class_features, num_classes=K,
                                noise_multiplier=sigma, noise_key=key)
    want = jax.jit(release)(fmap, x, y, mask)
    got = jax.jit(functools.partial(
        release, mesh=parallel.data_mesh(devices)))(fmap, x, y, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  noiseless = np.asarray(jax.jit(functools.partial(
      merf.release_class_features, num_classes=K, noise_multiplier=0.0,
      noise_key=key))(fmap, x, y, mask))
  # The constant coordinate carries the class counts (1/sqrt 2 each).
  counts = np.bincount(np.asarray(y)[np.asarray(mask) > 0], minlength=K)
  np.testing.assert_allclose(noiseless[:, -1] * np.sqrt(2), counts,
                             rtol=1e-5)


@pytest.mark.parametrize("devices,k,tau", [(4, 1, 0.0), (8, 3, 0.0),
                                           (4, 3, 0.4)])
def test_sharded_pe_histogram_equals_unsharded(devices, k, tau):
  from dpgeng_jax.generators import pe
  rng = np.random.default_rng(5)
  pop = jnp.asarray(rng.normal(size=(K, 7, 6)), jnp.float32)
  n = 40  # a multiple of both device counts
  x = jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K, n), jnp.int32)
  mask = jnp.asarray((rng.random(n) < 0.8).astype(np.float32))
  # Soft votes: the bits of all 40 rows (the default) on every device.
  want = pe.private_histogram(pop, x, y, mask, k=k, tau=tau)
  got = jax.jit(functools.partial(
      pe.private_histogram, k=k, chunk=4, tau=tau,
      mesh=parallel.data_mesh(devices)))(pop, x, y, mask)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  bits = pe.soft_bits(n) if tau else None
  # The noise is added once, to the summed histogram: released over 200
  # keys, the sharded counts' residuals are N(0, sigma^2) per bin.
  sigma, w = 2.0, pe.release_scale(k, tau, bits)
  keys = jax.random.split(noise.deterministic_secret_key(7), 200)
  noisy = jax.vmap(lambda key: pe.release_histogram(
      key, got, sigma, k=k, tau=tau, bits=bits))(keys)
  resid = (np.asarray(noisy, np.float64)
           - np.asarray(got, np.float64) * w).ravel()
  assert stats.kstest(resid, "norm", args=(0, sigma)).pvalue > 1e-4
  for wrong in (2 / 3, 3 / 2):
    assert stats.kstest(resid, "norm",
                        args=(0, wrong * sigma)).pvalue < 1e-6


def test_fewer_devices_than_the_process_has_sample_without_overflow(
    tmp_path):
  """--devices 2 of 8: layouts and per-device capacities follow the mesh
  actually used (they were sized for all 8 local devices, so every such
  run aborted with SamplingOverflowError), with Poisson sampling on."""
  from dpgeng_jax import cli
  out = tmp_path / "two"
  assert cli.main(["distill", "--method", "dpgeng", "--no-eval",
                   "--devices", "2", "--ipc", "2", "--steps", "2",
                   "--num-queries", "2", "--extractor-width", "8",
                   "--generator-steps", "3", "--generator-features", "8",
                   "--generated-per-class", "8", "--pe-iterations", "2",
                   "--pe-population", "6", "--pe-width", "8",
                   "--pool-models", "1", "--pool-checkpoints", "2",
                   "--pool-epochs", "1", "--expert-steps", "2", "--expert",
                   "--quiet", "--out",
                   str(out)]) == 0
  import json
  priv = json.loads((out / "privacy.json").read_text())
  assert priv["private"] is True
  assert parallel.local_shards(parallel.data_mesh(2)) == 2
  assert parallel.rows_per_device(100, parallel.data_mesh(2)) == 50


@pytest.mark.parametrize("n", [16, 30])
def test_sharded_evaluation_training_equals_one_device(n):
  """Non-private training split over 8 devices (n = 30: a batch padded
  with zero-weight rows) follows the one-device trajectory, and the
  padded rows change nothing."""
  from dpgeng_jax import evaluate
  model = ConvNet(num_classes=K, width=8, depth=2)
  cfg = evaluate.EvalConfig(epochs=3, batch_size=32, width=8, depth=2)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, K, n).astype(np.int32)
  key = jax.random.key(3)
  want = evaluate.train_one(key, x, y, model=model, cfg=cfg)[-1]
  mesh = parallel.local_mesh(parallel.data_mesh(8))  # one process: all 8
  assert parallel.num_shards(mesh) == 8
  got = evaluate.train_one(key, x, y, model=model, cfg=cfg, mesh=mesh)[-1]
  start = init_params(model, key, x.shape[1:])
  moved = jax.tree.map(lambda w, s: float(jnp.max(jnp.abs(w - s))), want,
                       start)
  assert moved["head"]["kernel"] > 1e-3  # it trained
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("path", ["query", "vmap", "pergrad"])
def test_winograd_convnet_sharded_equals_unsharded(path):
  """The Winograd convolution (custom VJP) under shard_map with
  device-varying parameters: same sums as one device."""
  model = ConvNet(num_classes=K, width=8, depth=2, conv_impl="winograd")
  params = init_params(model, jax.random.key(3), (8, 8, 1))
  _, _, x, y, mask = _convnet()
  mesh = parallel.data_mesh(4)
  if path == "query":
    embed = embed_fn(model)
    want = jax.jit(functools.partial(  # traced once, not op by op
        clipped_class_sums, embed, num_classes=K, clip_norm=0.5))(
            params, x, y, mask)
    got = jax.jit(functools.partial(
        parallel.sharded_clipped_class_sums, embed, num_classes=K,
        clip_norm=0.5, mesh=mesh))(params, x, y, mask)
  else:
    loss = lambda p, b: cross_entropy(model, p, *b)
    fn = (functools.partial(clipped_grad_sum, loss, clip_norm=0.5)
          if path == "vmap" else pergrad.make_grad_sum_fn(model,
                                                          clip_norm=0.5))
    want = jax.jit(fn)(params, (x, y), mask)
    got = jax.jit(lambda p, b, m: parallel.sharded_grad_sum(
        fn, p, b, m, mesh=mesh))(params, (x, y), mask)
  assert _max_rel_diff(got, want) < 1e-4


@pytest.mark.parametrize("stem_chunk", [None, 3])
def test_fused_first_block_pergrad_sharded_equals_unsharded(stem_chunk,
                                                            monkeypatch):
  """28x28 inputs: pergrad differentiates per-example copies of the first
  block's parameters (stem.py) built from the device-varying parameters
  of sharded_grad_sum; the sharded clipped sum equals one device's, also
  with the block in chunks of 3 rows (the lax.map inside shard_map: 2
  chunks of 2 rows per device, 6 chunks with 2 padded rows on one)."""
  if stem_chunk:
    monkeypatch.setattr(stem, "default_chunk", lambda activations: stem_chunk)
  model = ConvNet(num_classes=K, width=4, depth=3)
  params = init_params(model, jax.random.key(3), (28, 28, 1))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, K, 16).astype(np.int32))
  mask = jnp.asarray((rng.random(16) < 0.8).astype(np.float32))
  assert pergrad._fused_first(model, x)
  fn = pergrad.make_grad_sum_fn(model, clip_norm=0.05)
  want = jax.jit(fn)(params, (x, y), mask)
  got = jax.jit(lambda p, b, m: parallel.sharded_grad_sum(
      fn, p, b, m, mesh=parallel.data_mesh(4)))(params, (x, y), mask)
  assert _max_rel_diff(got, want) < 1e-4


def test_fixed_point_grad_sums_are_checked_against_every_device_s_rows():
  """bits sized for one device's rows, baked into grad_sum_fn, let the
  int32 psum wrap around (5 examples read as -3; a review's finding):
  such integer sums are refused; bits given to sharded_grad_sum are
  checked against all rows and the sums are exact."""
  mesh = parallel.data_mesh(4)
  loss = lambda p, b: jnp.sum(p * b)
  x = jnp.full((8, 1), 5.0)
  one_device = clipping.fixed_point_bits(8 // 4, 1.0)
  baked = functools.partial(clipped_grad_sum, loss, clip_norm=1.0,
                            bits=one_device)
  with pytest.raises(ValueError, match="integer .fixed-point. sums"):
    parallel.sharded_grad_sum(baked, jnp.zeros(1), x, jnp.ones(8),
                              mesh=mesh)
  fn = functools.partial(clipped_grad_sum, loss, clip_norm=1.0)
  with pytest.raises(ValueError, match="overflows"):
    parallel.sharded_grad_sum(fn, jnp.zeros(1), x, jnp.ones(8), mesh=mesh,
                              bits=one_device, clip_norm=1.0)
  bits = clipping.fixed_point_bits(8, 1.0)
  for k in range(1, 9):
    m = jnp.array([1.0] * k + [0.0] * (8 - k))
    got = parallel.sharded_grad_sum(fn, jnp.zeros(1), x, m, mesh=mesh,
                                    bits=bits, clip_norm=1.0)
    assert got.dtype == jnp.int32
    assert abs(float(got[0]) * 2.0**-bits - k) < 1e-4  # clip: 1 - 4e-6
