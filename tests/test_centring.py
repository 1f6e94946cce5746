"""Queries centred on the generated data's mean embedding
(--centre-features generated): public centres, sensitivity still C, the
same function on both sides of the query."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import distill, extractors, models, pipeline, planning
from dpgeng_jax.clipping import clip_rows, clipped_class_sums
from dpgeng_jax.config import Config

SHAPE = (8, 8, 1)


def _pool(width=4):
  model = models.ConvNet(num_classes=3, width=width, depth=2)
  return model, extractors.random_pool(model, SHAPE), models.embed_fn(model)


def test_a_zero_centre_is_the_uncentred_query():
  model, pool, embed = _pool()
  key = jax.random.key(0)
  x = jax.random.normal(jax.random.key(1), (12, *SHAPE))
  y, mask = jnp.arange(12) % 3, jnp.ones(12)
  d = models.feature_dim(model, SHAPE)
  centred = extractors.centred(pool, jnp.zeros((2, d)))
  params = pool(key, 1)
  want = clipped_class_sums(embed, params, x, y, mask, num_classes=3,
                            clip_norm=1.0)
  got = clipped_class_sums(extractors.centred_embed(embed),
                           centred(key, 1), x, y, mask, num_classes=3,
                           clip_norm=1.0)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_one_example_moves_a_centred_class_sum_by_at_most_c_attained():
  """Sensitivity C whatever the centre (here far from the features, so
  every centred embedding is clipped: the bound is attained); subtracting
  the centre after clipping instead (a broken variant) exceeds it."""
  model, pool, embed = _pool()
  key = jax.random.key(0)
  d = models.feature_dim(model, SHAPE)
  centre = 5.0 * jnp.ones((1, d))
  p = extractors.centred(pool, centre)(key, 0)
  cembed = extractors.centred_embed(embed)
  x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
  y, mask = jnp.array([0, 1, 2, 0, 1, 2]), jnp.ones(6)
  clip = 0.7
  full = clipped_class_sums(cembed, p, x, y, mask, num_classes=3,
                            clip_norm=clip)
  worst = 0.0
  for i in range(6):
    without = clipped_class_sums(cembed, p, x, y, mask.at[i].set(0.0),
                                 num_classes=3, clip_norm=clip)
    worst = max(worst, float(np.linalg.norm(np.asarray(full, np.float64)
                                            - np.asarray(without,
                                                         np.float64))))
  assert worst <= clip  # exactly: the clip margin covers float32 rounding
  assert worst >= clip * (1 - 1e-4)
  # The broken variant, measured the same way: class sums of
  # clip(e) - centre move by ||clip(e_i) - centre||, far above C.
  rows = clip_rows(embed(p["net"], x), clip) - centre[0]

  def broken(m):
    return jax.ops.segment_sum(rows * m[:, None], y, num_segments=3)
  worst_broken = max(float(jnp.linalg.norm(
      broken(mask) - broken(mask.at[i].set(0.0)))) for i in range(6))
  assert worst_broken > 2 * clip


def test_centres_are_the_generated_mean_embedding_under_each_query():
  model, pool, embed = _pool()
  key = jax.random.key(3)
  x_gen = jax.random.normal(jax.random.key(4), (3, 5, *SHAPE))
  got = extractors.generated_centres(pool, embed, key, x_gen, 4,
                                     "color_crop_cutout_flip_scale_rotate")
  plan = distill.QueryPlan(extractor=pool, embed_fn=embed, num_classes=3)
  for q in (0, 3):
    params, aug = plan.params(key, q)
    per_class = distill.synthetic_class_means(plan, params, aug, x_gen,
                                              math.inf)
    np.testing.assert_allclose(got[q], jnp.mean(per_class, 0), rtol=1e-5,
                               atol=1e-6)
  assert not np.allclose(got[0], got[3])  # each query its own centre


def test_both_sides_of_a_centred_query_clip_the_same_centred_embedding():
  """The synthetic side of query q is mean_j clip_C(psi_q(x_j) - c_q)."""
  model, pool, embed = _pool()
  key = jax.random.key(5)
  d = models.feature_dim(model, SHAPE)
  centres = jax.random.normal(jax.random.key(6), (3, d))
  plan = distill.QueryPlan(extractor=extractors.centred(pool, centres),
                           embed_fn=extractors.centred_embed(embed),
                           num_classes=3)
  syn = jax.random.normal(jax.random.key(7), (3, 4, *SHAPE))
  params, aug = plan.params(key, 2)
  got = distill.synthetic_class_means(plan, params, aug, syn, 1.0)
  raw = distill.QueryPlan(extractor=pool, embed_fn=embed, num_classes=3)
  rparams, raug = raw.params(key, 2)
  from dpgeng_jax import augment
  for c in range(3):
    e = embed(rparams, augment.apply(syn[c], jax.tree.map(
        lambda a: a[c], raug), raw.strategy)) - centres[2]
    np.testing.assert_allclose(got[c], jnp.mean(clip_rows(e, 1.0), 0),
                               rtol=1e-5, atol=1e-6)


def test_plan_resolves_the_centre():
  assert planning.resolve(Config()).centre == "generated"
  assert planning.resolve(Config(centre_features="none")).centre == "none"
  assert planning.resolve(Config(method="ndpdc")).centre == "none"
  p = planning.resolve(Config(method="ndpdc", centre_features="generated"))
  assert p.centre == "generated" and p.uses_generated
  assert planning.resolve(Config(method="dm",
                                 centre_features="generated")).centre == "none"


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_a_centred_run_finishes_and_says_so(tmp_path, shape):
  rng = np.random.default_rng(0)
  n = 60
  x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
  y = (np.arange(n) % 3).astype(np.int64)
  path = tmp_path / "d.npz"
  np.savez(path, x_train=x, y_train=y, x_test=x[:12], y_test=y[:12])
  cfg = Config(dataset=f"npz:{path}", centre_features="generated", ipc=1,
               steps=3, num_queries=2, extractor_width=4, eval_width=4,
               pe_iterations=1, pe_population=4, generated_per_class=4,
               pool_models=1, pool_checkpoints=1, pool_epochs=1,
               expert_steps=1, eval_models=1, eval_epochs=1, delta=1e-3,
               quiet=True, out=str(tmp_path / "out"))
  result = pipeline.run(cfg)
  assert result.x.shape[1:] == shape and np.all(np.isfinite(result.x))
  assert any("centre" in n for n in result.privacy["notes"])
  assert result.config["centre_features"] == "generated"


def test_centres_in_chunks_equal_one_call(monkeypatch):
  """With 15 generated images embedded 4 at a time (4 chunks, one padded
  row), the centres are those of one call."""
  from dpgeng_jax import clipping
  model, pool, embed = _pool()
  key = jax.random.key(3)
  x_gen = jax.random.normal(jax.random.key(4), (3, 5, *SHAPE))
  strategy = "color_crop_cutout_flip_scale_rotate"
  monkeypatch.setattr(clipping, "default_query_chunk", lambda: None)
  whole = extractors.generated_centres(pool, embed, key, x_gen, 3, strategy)
  monkeypatch.setattr(clipping, "default_query_chunk", lambda: 4)
  chunked = extractors.generated_centres(pool, embed, key, x_gen, 3, strategy)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_embed_in_chunks_drops_the_padding():
  model, pool, embed = _pool()
  p = pool(jax.random.key(0), 0)
  x = jax.random.normal(jax.random.key(1), (23, *SHAPE))
  one = embed(p, x)
  for chunk in (5, 7, 23, 100, None):
    got = extractors.embed_in_chunks(embed, p, x, chunk)
    assert got.shape == one.shape
    np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6)
