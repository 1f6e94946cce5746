"""Each private step is traced (so compiled) once, whatever the number of
calls: queries and DP-SGD steps take keys and indices as traced values."""

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax import counts, distill, expert, extractors, mechanisms, models
from dpgeng_jax import pergrad, pipeline, stages
from dpgeng_jax.config import Config
from dpgeng_jax.data import load_dataset


def _counting(monkeypatch, module, name):
  calls = []
  original = getattr(module, name)

  def wrapped(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapped)
  return calls


def test_dp_sgd_step_is_traced_once_for_all_steps(monkeypatch):
  traces = _counting(monkeypatch, pergrad, "convnet_clipped_grad_sum")
  model = models.ConvNet(num_classes=3, width=4, depth=2)
  params = models.init_params(model, jax.random.key(0), (8, 8, 1))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 8, 8, 1)).astype(np.float32)
  y = np.arange(30) % 3
  out = expert.dp_finetune(
      params, model, x, y, cfg=expert.ExpertConfig(steps=4),
      noise_multiplier=1.0, secret=jax.random.key(1))
  assert len(traces) == 1
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(out))


def test_queries_are_traced_once_for_all_queries(monkeypatch):
  traces = _counting(monkeypatch, mechanisms, "noisy_targets")
  ds = load_dataset("digits")
  cfg = Config(num_queries=3, extractor_width=4, quiet=True)
  plan = pipeline.resolve(cfg, tuple(ds.image_shape))
  model = models.ConvNet(ds.num_classes, width=4, depth=plan.depth)
  plan_q = distill.QueryPlan(
      extractor=extractors.random_pool(model, tuple(ds.image_shape)),
      embed_fn=models.embed_fn(model), num_classes=ds.num_classes,
      strategy=cfg.strategy)
  spec = mechanisms.QuerySpec(
      embed_fn=plan_q.embed_fn, num_classes=ds.num_classes, clip_norm=1.0,
      noise_multiplier=1.0, sampling_rate=0.5,
      capacity=0,  # answer_queries sets it from the bound on N
      strategy=cfg.strategy)
  sizes = counts.public_sizes(ds.y_train, ds.num_classes)
  targets, used = stages.answer_queries(
      cfg, spec, plan_q, jax.random.key(0), ds.normalize(ds.x_train), ds,
      jax.random.key(1), None, sizes, None)
  assert len(traces) == 1
  assert targets.shape[0] == 3 and bool(jnp.all(jnp.isfinite(targets)))
  assert used.capacity == mechanisms.poisson_capacity([len(ds.y_train)], 0.5)


def test_pool_and_evaluation_training_share_one_compiled_step(monkeypatch):
  """Training sets of different sizes and lengths (the pool on G, the
  evaluation on the decoded distilled set) run one compiled step: the
  step's body (its augmentation) is traced once."""
  from dpgeng_jax import augment, evaluate
  traces = _counting(monkeypatch, augment, "augment")
  evaluate._step_for.cache_clear()
  # the pool's and the evaluation's configurations differ in what the
  # step does not compute
  cfgs = (evaluate.EvalConfig(batch_size=16, epochs=2),
          evaluate.EvalConfig(batch_size=16, epochs=5, num_models=1,
                              learning_rate=0.03),
          evaluate.EvalConfig(batch_size=16, epochs=1, num_models=3))
  model = models.ConvNet(num_classes=3, width=4, depth=2)
  rng = np.random.default_rng(0)
  for (n, epochs), cfg in zip(((40, 2), (72, 1), (17, 3)), cfgs):
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    evaluate.train_one(jax.random.key(n), x, np.arange(n) % 3, model=model,
                       cfg=cfg, epochs=epochs)
  assert len(traces) == 1


def test_rate_outside_the_step_equals_optax_sgd_with_the_schedule():
  """The step's optimiser (decay + momentum trace, then -lr from
  learning_rate_at) is optax.sgd with the piecewise-constant schedule."""
  from dpgeng_jax import evaluate
  import optax
  cfg = evaluate.EvalConfig()
  total = 7
  ref = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(
      optax.piecewise_constant_schedule(cfg.learning_rate,
                                        {total // 2: 0.1}),
      momentum=cfg.momentum))
  ours = evaluate._optimizer(cfg.weight_decay, cfg.momentum)
  p = {"w": jnp.arange(5.0)}
  pr, po = p, p
  sr, so = ref.init(p), ours.init(p)
  rng = np.random.default_rng(1)
  for step in range(total):
    g = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
    ur, sr = ref.update(g, sr, pr)
    pr = optax.apply_updates(pr, ur)
    uo, so = ours.update(g, so, po)
    lr = evaluate.learning_rate_at(step, total, cfg)
    po = optax.apply_updates(po, jax.tree.map(lambda u: -lr * u, uo))
  np.testing.assert_allclose(po["w"], pr["w"], rtol=1e-6)
  # a schedule that does not drop is told apart
  assert evaluate.learning_rate_at(total - 1, total, cfg) < cfg.learning_rate


def test_test_accuracies_and_reference_distributions_trace_once(monkeypatch):
  # Each call used to build (so trace and compile) its own program: the
  # expert stage's two test accuracies and every evaluation compiled
  # theirs again, and p_ref's eager lax.map its loop.
  from dpgeng_jax import evaluate  # pylint: disable=import-outside-toplevel
  # A width no other test uses: programs another test traced first would
  # be found in jit's cache.
  model = models.ConvNet(num_classes=3, width=5, depth=2)
  applies = _counting(monkeypatch, models.ConvNet, "apply")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(23, 8, 8, 1)).astype(np.float32)
  y = np.arange(23) % 3
  for seed in range(3):  # other parameter values, the same shapes
    p = models.init_params(model, jax.random.key(seed), (8, 8, 1))
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), p)
    # 23 rows in batches of 8 (one padded row): one batch shape.
    evaluate.accuracies(stacked, model, x, y, batch_size=8)
    expert.reference_distributions(p, model, x[:18].reshape(3, 6, 8, 8, 1),
                                   0.5)
  assert len(applies) == 2  # one trace of each program
