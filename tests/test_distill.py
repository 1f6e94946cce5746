"""The distillation objective and step (post-processing of the targets)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import augment, distill, extractors
from dpgeng_jax.clipping import clip_rows
from dpgeng_jax.models import ConvNet, embed_fn

K, IPC, SHAPE = 3, 2, (8, 8, 1)


def _plan(strategy="color_crop_cutout_flip_scale_rotate"):
  m = ConvNet(K, width=8, depth=2)
  return distill.QueryPlan(
      extractor=extractors.random_pool(m, SHAPE),
      embed_fn=embed_fn(m), num_classes=K, strategy=strategy)


def _means_case():
  """A plan, synthetic images, query 0's parameters, their clipped class
  means and public counts."""
  plan = _plan()
  syn = jax.random.normal(jax.random.key(0), (K, IPC, *SHAPE))
  params, aug = plan.params(jax.random.key(1), 0)
  means = distill.synthetic_class_means(plan, params, aug, syn, 1.0)
  return plan, syn, params, aug, means, jnp.asarray([4.0, 5.0, 6.0])


def test_loss_is_zero_when_synthetic_means_equal_targets():
  plan, syn, params, aug, means, counts = _means_case()
  loss = distill.feature_matching_loss(plan, params, aug, syn,
                                       means * counts[:, None], counts, 1.0)
  assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_synthetic_means_match_a_loop_over_classes():
  plan = _plan()
  syn = jax.random.normal(jax.random.key(0), (K, IPC, *SHAPE))
  params, aug = plan.params(jax.random.key(1), 3)
  got = distill.synthetic_class_means(plan, params, aug, syn, 0.5)
  for c in range(K):
    pc = jax.tree.map(lambda a: a[c], aug)
    e = plan.embed_fn(params, augment.apply(syn[c], pc, plan.strategy))
    np.testing.assert_allclose(np.asarray(got[c]),
                               np.asarray(clip_rows(e, 0.5).mean(0)),
                               rtol=1e-5, atol=1e-6)


def test_query_public_params_are_reproducible_per_query():
  plan = _plan()
  a = plan.params(jax.random.key(7), 2)
  b = plan.params(jax.random.key(7), 2)
  c = plan.params(jax.random.key(7), 3)
  np.testing.assert_array_equal(np.asarray(a[0]["conv0"]["kernel"]),
                                np.asarray(b[0]["conv0"]["kernel"]))
  assert not np.allclose(np.asarray(a[0]["conv0"]["kernel"]),
                         np.asarray(c[0]["conv0"]["kernel"]))
  # The augmentation too: the same draw for a query, another for the next
  # (every query given one draw passed every test before).
  for x, y in zip(a[1], b[1]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not all(np.array_equal(np.asarray(x), np.asarray(y))
                 for x, y in zip(a[1], c[1]))


def test_gradient_reaches_the_pixels_through_augmentation():
  plan = _plan()
  syn = jax.random.normal(jax.random.key(0), (K, IPC, *SHAPE))
  params, aug = plan.params(jax.random.key(1), 0)
  targets = jnp.ones((K, 8 * 2 * 2)) * 0.1
  g = jax.grad(lambda s: distill.feature_matching_loss(
      plan, params, aug, s, targets, jnp.ones(K), 1.0))(syn)
  assert np.all(np.isfinite(np.asarray(g)))
  assert float(jnp.abs(g).sum()) > 0
  # Every class's images get gradient (the vmap covers all classes).
  assert np.all(np.asarray(jnp.abs(g).sum(axis=(1, 2, 3, 4))) > 0)


def test_steps_reduce_the_loss_and_compile_once():
  plan = _plan(strategy="none")
  traces = []
  orig = plan.embed_fn

  def counting_embed(p, x):
    traces.append(1)
    return orig(p, x)

  plan = distill.QueryPlan(plan.extractor, counting_embed, K, "none")
  key = jax.random.key(0)
  target_imgs = jax.random.normal(jax.random.key(5), (K, 4, *SHAPE))
  targets = jnp.stack([
      distill.synthetic_class_means(plan, *plan.params(key, q), target_imgs,
                                    math.inf) * 4.0 for q in range(2)])
  n_before = len(traces)
  opt = distill.image_optimizer(0.05)
  state = distill.init_state(jax.random.normal(jax.random.key(1),
                                               (K, IPC, *SHAPE)), opt)
  step = distill.make_step(plan, opt, clip_norm=math.inf)
  losses = []
  for _ in range(40):
    state, loss = step(state, targets, jnp.full((K,), 4.0), key)
    losses.append(float(loss))
  assert len(traces) - n_before == 1, "the step must be traced once"
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 40


@pytest.mark.parametrize("class_chunk", [1, 2])
def test_class_chunked_step_equals_the_all_classes_step(class_chunk):
  """Gradients taken a chunk of classes at a time (3 = 2 + 1 classes with
  chunks of 2), through a decode and with an extra loss weighted by each
  class's index, give the all-classes step's images and loss up to float
  rounding."""
  from dpgeng_jax import init as init_lib
  plan = _plan()
  shape = (16, 16, 1)
  m = ConvNet(K, width=8, depth=2)
  plan = distill.QueryPlan(extractors.random_pool(m, shape), embed_fn(m), K,
                           plan.strategy)
  key = jax.random.key(0)
  targets = jax.random.normal(jax.random.key(5), (2, K, 8 * 4 * 4 * 1))
  counts = jnp.asarray([4.0, 5.0, 6.0])
  opt = distill.image_optimizer(0.05)
  images = jax.random.normal(jax.random.key(1), (K, IPC, *shape))
  out = {}
  for name, chunk in (("all", None), ("chunked", class_chunk)):
    step = distill.make_step(
        plan, opt, clip_norm=1.0, decode=lambda s: init_lib.decode(s, 2),
        # Weighted by class index: a chunk handed the wrong classes fails.
        extra_loss=lambda d, c: 0.1 * jnp.sum(
            jnp.square(d) * (1.0 + c).reshape(-1, 1, 1, 1, 1)),
        class_chunk=chunk)
    state = distill.init_state(jnp.copy(images), opt)  # the step donates
    losses = []
    for _ in range(3):
      state, loss = step(state, targets, counts, key)
      losses.append(float(loss))
    out[name] = (np.asarray(state.images), losses)
  np.testing.assert_allclose(out["chunked"][0], out["all"][0], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(out["chunked"][1], out["all"][1], rtol=1e-5)
  assert np.max(np.abs(out["all"][0] - np.asarray(images))) > 1e-2


def test_distill_class_chunk_sizes(monkeypatch):
  from dpgeng_jax import evaluate, stages
  monkeypatch.setattr(evaluate, "CHUNK_BYTES", 32 << 20)
  # digits: all classes at once; 28x28 IPC 10, f = 2: 5 chunks of 2
  # classes; CIFAR-100 IPC 50: at most MAX_CHUNKS chunks
  assert stages.distill_class_chunk(10, 10, (8, 8, 1), 128) is None
  assert stages.distill_class_chunk(10, 40, (28, 28, 1), 128) == 2
  assert stages.distill_class_chunk(100, 200, (32, 32, 3), 128) == 13
  assert stages.distill_class_chunk(2, 400, (32, 32, 3), 128) == 1


def test_targets_and_counts_of_the_wrong_shape_are_refused():
  """(1, d) targets or (1,) counts broadcast over the classes silently."""
  plan, syn, params, aug, means, counts = _means_case()
  for t, n in ((means[:1], counts), (means[:, :1], counts),
               (means, counts[:1])):
    with pytest.raises(ValueError, match="expected"):
      distill.feature_matching_loss(plan, params, aug, syn, t, n, 1.0)
  opt = distill.image_optimizer(0.05)
  step = distill.make_step(plan, opt, clip_norm=1.0)
  state = distill.init_state(jnp.copy(syn), opt)
  with pytest.raises(ValueError, match=r"expected_counts \(K,\)"):
    step(state, means[None], counts[:1], jax.random.key(2))
  for chunk in (0, -1, 1.5):
    with pytest.raises(ValueError, match="class_chunk"):
      distill.make_step(plan, opt, clip_norm=1.0, class_chunk=chunk)


def test_step_t_uses_query_t_mod_q_its_parameters_and_each_class_s_target():
  """Step t's loss is L_FM of query t mod Q: that query's extractor and
  augmentation, and class c's images against class c's target over class
  c's count. Targets matched to the wrong classes, another query's
  parameters, or query 0 at every step passed every test before (a
  review's mutations)."""
  import optax
  plan = _plan()
  syn = jax.random.normal(jax.random.key(0), (K, IPC, *SHAPE))
  d = distill.synthetic_class_means(plan, *plan.params(jax.random.key(1), 0),
                                    syn, 1.0).shape[1]
  q_count = 3
  targets = jax.random.normal(jax.random.key(2), (q_count, K, d)) * 3.0
  counts = jnp.asarray([2.0, 5.0, 11.0])
  opt = optax.sgd(0.0)  # the images stay as they are
  step = distill.make_step(plan, opt, clip_norm=1.0)
  state = distill.init_state(jnp.array(syn), opt)  # a copy: donated
  key = jax.random.key(3)
  for t in range(2 * q_count + 1):
    state, loss = step(state, targets, counts, key)
    params, aug = plan.params(key, t % q_count)
    want = distill.feature_matching_loss(plan, params, aug, syn,
                                         targets[t % q_count], counts, 1.0)
    assert float(loss) == pytest.approx(float(want), rel=1e-5), t


def test_the_queries_real_side_and_the_step_s_synthetic_side_are_siamese():
  """Queries answered without noise, sampling or clipping on data X, and
  the step run from S = X with the exact class counts: every query's loss
  is 0, since both sides embed the same images through the same query's
  extractor and per-class augmentation. Answered with another query's
  parameters, the real side no longer matches."""
  import types
  import optax
  from dpgeng_jax import mechanisms, noise, stages
  plan = _plan()
  x = jax.random.normal(jax.random.key(4), (K, IPC, *SHAPE))
  y = np.repeat(np.arange(K, dtype=np.int32), IPC)
  spec = mechanisms.QuerySpec(
      embed_fn=plan.embed_fn, num_classes=K, clip_norm=math.inf,
      noise_multiplier=0.0, sampling_rate=1.0, capacity=0,
      strategy=plan.strategy)
  cfg = types.SimpleNamespace(microbatch=0, num_queries=3, quiet=True,
                              no_skip_padding=False)
  key = jax.random.key(5)

  def answered(plan_q):
    return stages.answer_queries(
        cfg, spec, plan_q, key, np.asarray(x).reshape(-1, *SHAPE),
        types.SimpleNamespace(y_train=y), noise.deterministic_secret_key(0),
        None, types.SimpleNamespace(padded_rows=len(y)), None)[0]

  def losses(targets):
    opt = optax.sgd(0.0)
    step = distill.make_step(plan, opt, clip_norm=math.inf)
    state, out = distill.init_state(jnp.array(x), opt), []
    for _ in range(3):
      state, loss = step(state, targets, jnp.full(K, float(IPC)), key)
      out.append(float(loss))
    return np.array(out)

  scale = float(jnp.sum(jnp.square(answered(plan)))) / (3 * IPC ** 2)
  assert np.all(losses(answered(plan)) < 1e-6 * scale)
  shifted = types.SimpleNamespace(
      params=lambda k, q: plan.params(k, q + 1), arrays=lambda: None)
  shifted.with_arrays = lambda arrays: shifted
  assert np.all(losses(answered(shifted)) > 1e-3 * scale)


def test_the_step_takes_the_pools_and_the_terms_arrays_as_arguments():
  """The generated data's centres, a trained pool's members and the
  expert's arrays are public but made anew in every run: as constants of
  the compiled step they made each run's program new to the persistent
  compilation cache (1.2 MB of constants in a small digits run with the
  expert). Plans and terms that differ only in those arrays now lower to
  one program, which holds none of their bytes; and the step reads the
  arrays it is given (another centre changes the loss)."""
  m = ConvNet(K, width=8, depth=2)
  d = embed_fn(m)(extractors.random_pool(m, SHAPE)(jax.random.key(0), 0),
                  jnp.zeros((1, *SHAPE))).shape[-1]
  def build(seed):
    members = jax.vmap(lambda k: extractors.random_pool(m, SHAPE)(k, 0))(
        jax.random.split(jax.random.key(3 + seed), 2))
    rng = np.random.default_rng(seed)
    centres = jnp.asarray(rng.normal(size=(2, d)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(K,)), jnp.float32)
    plan = distill.QueryPlan(
        extractor=extractors.centred(extractors.fixed_pool(members), centres),
        embed_fn=extractors.centred_embed(embed_fn(m)), num_classes=K)
    term = distill.Hoisted(
        lambda w, dec, classes: jnp.sum(w[classes] * jnp.mean(dec, (1, 2, 3,
                                                                   4))),
        weight)
    step = distill.make_step(plan, distill.image_optimizer(0.05),
                             clip_norm=1.0, extra_loss=term, class_chunk=2)
    return step, (centres, weight, jax.tree.leaves(members)[0])

  opt = distill.image_optimizer(0.05)
  images = jax.random.normal(jax.random.key(1), (K, IPC, *SHAPE))
  targets = jax.random.normal(jax.random.key(2), (2, K, d))
  args = (distill.init_state(images, opt), targets, jnp.full((K,), 4.0),
          jax.random.key(5))
  (step_a, arrays_a), (step_b, _) = build(0), build(1)
  text = step_a.lower(*args).as_text()
  assert text == step_b.lower(*args).as_text()
  for a in arrays_a:
    assert np.asarray(a)[:1].tobytes().hex().upper() not in text
  loss_a = float(step_a(distill.init_state(jnp.array(images), opt),
                        *args[1:])[1])
  loss_b = float(step_b(distill.init_state(jnp.array(images), opt),
                        *args[1:])[1])
  assert loss_a != loss_b
