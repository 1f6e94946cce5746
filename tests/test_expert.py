"""The DP expert: DP fine-tuning and the alignment term."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import expert as E
from dpgeng_jax import mechanisms, noise, pergrad
from dpgeng_jax.models import ConvNet, init_params

MODEL = ConvNet(3, width=4, depth=1)
SHAPE = (4, 4, 1)


def _params(seed=0):
  return init_params(MODEL, jax.random.key(seed), SHAPE)


def test_alignment_is_minimal_when_reference_equals_the_experts_output():
  p = _params()
  syn = jax.random.normal(jax.random.key(1), (3, 1, *SHAPE))
  logits = jax.vmap(lambda x: MODEL.apply({"params": p}, x))(syn)[:, 0]
  p_ref = jax.nn.softmax(logits / 2.0, -1)
  loss = E.alignment_loss(p, MODEL, syn, p_ref, tau=2.0, beta=0.0)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)
  other = jnp.roll(p_ref, 1, axis=0)
  assert float(E.alignment_loss(p, MODEL, syn, other, tau=2.0,
                                beta=0.0)) > 1e-4


def test_alignment_cross_entropy_uses_each_images_own_class():
  p = _params()
  syn = jax.random.normal(jax.random.key(1), (3, 2, *SHAPE))
  uniform = jnp.full((3, 3), 1 / 3)
  ce_only = (E.alignment_loss(p, MODEL, syn, uniform, tau=1.0, beta=1.0)
             - E.alignment_loss(p, MODEL, syn, uniform, tau=1.0, beta=0.0))
  want = 0.0
  for c in range(3):
    logp = jax.nn.log_softmax(MODEL.apply({"params": p}, syn[c]), -1)
    want += -float(jnp.mean(logp[:, c]))
  assert float(ce_only) == pytest.approx(want, rel=1e-5)


def test_alignment_over_class_chunks_sums_to_all_classes():
  """distill.make_step hands the term a chunk of classes at a time: the
  chunks' terms (with their class indices) add up to the whole."""
  p = _params()
  syn = jax.random.normal(jax.random.key(1), (3, 2, *SHAPE))
  p_ref = jax.nn.softmax(jax.random.normal(jax.random.key(2), (3, 3)), -1)
  whole = E.alignment_loss(p, MODEL, syn, p_ref, tau=1.0, beta=0.5)
  last = E.alignment_loss(p, MODEL, syn[2:], p_ref, tau=1.0, beta=0.5,
                          classes=jnp.arange(2, 3))
  parts = E.alignment_loss(p, MODEL, syn[:2], p_ref, tau=1.0, beta=0.5,
                           classes=jnp.arange(2)) + last
  assert float(parts) == pytest.approx(float(whole), rel=1e-6)
  wrong = E.alignment_loss(p, MODEL, syn[2:], p_ref, tau=1.0, beta=0.5,
                           classes=jnp.arange(1))  # class 0's reference
  assert abs(float(wrong) - float(last)) > 1e-4


def test_alignment_gradient_reaches_the_pixels():
  p = _params()
  syn = jax.random.normal(jax.random.key(1), (3, 2, *SHAPE))
  p_ref = jnp.eye(3) * 0.8 + 0.2 / 3
  g = jax.grad(lambda s: E.alignment_loss(p, MODEL, s, p_ref, tau=1.0,
                                          beta=0.1))(syn)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


def test_dp_finetune_learns_and_depends_on_the_secret_key():
  rng = np.random.default_rng(0)
  y = np.arange(90) % 3
  x = (rng.normal(size=(90, *SHAPE)) + y[:, None, None, None] * 2.0).astype(
      np.float32)
  cfg = E.ExpertConfig(steps=30, sampling_rate=0.3, clip_norm=1.0,
                       learning_rate=0.5)
  p0 = _params()
  a = E.dp_finetune(p0, MODEL, x, y, cfg=cfg, noise_multiplier=0.5,
                    secret=jax.random.key(1))
  b = E.dp_finetune(p0, MODEL, x, y, cfg=cfg, noise_multiplier=0.5,
                    secret=jax.random.key(2))
  assert E.accuracy(a, MODEL, x, y) > max(0.6, E.accuracy(p0, MODEL, x, y))
  assert not np.allclose(np.asarray(a["head"]["kernel"]),
                         np.asarray(b["head"]["kernel"]))


def test_dp_finetune_raises_instead_of_truncating(monkeypatch):
  monkeypatch.setattr(mechanisms, "poisson_capacity", lambda *a, **k: 1)
  x = np.zeros((50, *SHAPE), np.float32)
  y = np.arange(50) % 3
  cfg = E.ExpertConfig(steps=2, sampling_rate=0.9)
  with pytest.raises(mechanisms.SamplingOverflowError):
    E.dp_finetune(_params(), MODEL, x, y, cfg=cfg, noise_multiplier=1.0,
                  secret=jax.random.key(0))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(a))
                         for a in jax.tree.leaves(tree)])


LOG_TAIL = math.log(mechanisms.OVERFLOW_TAIL)


def test_private_step_releases_exactly_the_samplers_noise_of_sigma_c():
  """With every row padded nothing is sampled and the step's release is
  its noise alone: bit for bit the atom-free sampler's N(0, (sigma C)^2)
  draw, from the step key's noise half, on the zero fixed-point sums of
  the parameter tree. A step that drew with 0.9 sigma (which the audit
  at 50 000 trials does not tell apart) or with another key fails."""
  cfg = E.ExpertConfig(sampling_rate=0.3, clip_norm=0.7)
  sigma, rows = 1.3, 48
  x = np.random.default_rng(0).normal(size=(40, *SHAPE)).astype(np.float32)
  y = np.arange(40) % 3
  grad_sum = pergrad.make_grad_sum_fn(MODEL, clip_norm=cfg.clip_norm)
  step, (xd, yd, valid) = E.private_step(grad_sum, cfg, sigma, x, y, rows,
                                         LOG_TAIL)
  p = _params()
  bits = mechanisms.release_bits(E.step_capacity(cfg, rows, LOG_TAIL),
                                 cfg.clip_norm, sigma * cfg.clip_norm)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.int32), p)
  for seed in (3, 4):
    key = noise.deterministic_secret_key(seed)
    g, over = step(p, xd, yd, jnp.zeros_like(valid), key)
    assert not bool(over)
    want = noise.tree_add_gaussian_noise(
        jax.random.split(key)[1], zeros, sigma * cfg.clip_norm,
        scale=2.0 ** -bits)
    assert jax.tree.structure(g) == jax.tree.structure(want)
    np.testing.assert_array_equal(_flat(g), _flat(want))
  assert 0.8 < np.std(_flat(g)) / (sigma * cfg.clip_norm) < 1.2


def test_private_step_sums_exactly_the_rows_its_sampling_words_take():
  """The step's Poisson batch rebuilt from its key: real row i is in it
  iff word i of the sampling stream of the key's sampling half is below
  floor(q 2^32) (noise.bernoulli's definition). A grad sum that reports
  the rows it is given (C = inf, sigma = 0: plain sums) sees exactly
  those, once each; a rate 5 % above q would move some 20 of them."""
  n, rows, q = 1500, 1600, 0.3
  cfg = E.ExpertConfig(sampling_rate=q, clip_norm=math.inf)
  x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)  # a row: its index
  y = np.zeros(n, np.int32)

  def rows_seen(params, batch, mask, bits=None):
    del params
    assert bits is None  # no noise: the float path
    index = batch[0][:, 0, 0, 0].astype(jnp.int32)
    return {"rows": jnp.zeros(rows, jnp.float32).at[index].add(mask)}

  step, data = E.private_step(rows_seen, cfg, 0.0, x, y, rows, LOG_TAIL)
  for seed in range(3):
    key = noise.deterministic_secret_key(seed)
    g, over = step(None, *data, key)
    assert not bool(over)
    words = np.asarray(jax.random.bits(
        noise.sampling_stream(jax.random.split(key)[0]), (1, rows),
        jnp.uint32))[0]
    want = (words < np.uint32(math.floor(q * 2**32))) & (np.arange(rows) < n)
    assert 0.25 * n < want.sum() < 0.35 * n
    np.testing.assert_array_equal(np.asarray(g["rows"]),
                                  want.astype(np.float32))


def test_dp_finetune_pads_to_num_rows_and_divides_by_the_public_estimate(
    monkeypatch):
  """The private rows are padded to the public num_rows and the update is
  the summed gradient over q * expected_size: without noise, at rate 1,
  one momentum-free step moves the parameters by lr g / (q E), so E times
  the move is the same for any E. Using len(x) for either (the private N)
  passed every test before (a review's mutations)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, *SHAPE)).astype(np.float32)
  y = (np.arange(10) % 3).astype(np.int32)
  p0 = _params()
  cfg = E.ExpertConfig(steps=1, sampling_rate=1.0, clip_norm=1.0,
                       learning_rate=0.1, momentum=0.0)
  padded = []
  real = E.private_step

  def spy(*args, **kw):
    step, rows = real(*args, **kw)
    padded.append(rows[0].shape[0])
    return step, rows
  monkeypatch.setattr(E, "private_step", spy)
  moves = {}
  for size in (25.0, 400.0):
    p = E.dp_finetune(p0, MODEL, x, y, cfg=cfg, noise_multiplier=0.0,
                      secret=noise.deterministic_secret_key(0),
                      num_rows=16, expected_size=size)
    moves[size] = np.concatenate([
        (np.asarray(a) - np.asarray(b)).ravel()
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0))])
  assert padded == [16, 16]
  assert np.abs(moves[25.0]).max() > 1e-4
  scaled = moves[25.0] * 25.0
  # float32 parameters of size ~1 hold the smaller move to ~1e-7 absolute.
  np.testing.assert_allclose(moves[400.0] * 400.0, scaled, rtol=0,
                             atol=2e-3 * np.abs(scaled).max())


def test_reference_distributions_are_each_class_s_mean_tempered_softmax():
  p = _params()
  x = jax.random.normal(jax.random.key(3), (3, 4, *SHAPE)) * 3.0
  for tau in (0.5, 4.0):
    got = np.asarray(E.reference_distributions(p, MODEL, x, tau))
    for c in range(3):
      logits = np.asarray(MODEL.apply({"params": p}, x[c]), np.float64)
      z = np.exp(logits / tau - (logits / tau).max(1, keepdims=True))
      want = (z / z.sum(1, keepdims=True)).mean(0)
      np.testing.assert_allclose(got[c], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
