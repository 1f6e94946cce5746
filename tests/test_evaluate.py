"""The shared training step differentiates large batches in row chunks on
CPU: the same update as the whole batch at once, chunk sizes as stated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import evaluate, models


def test_chunk_rows_splits_into_equal_chunks_that_fit(monkeypatch):
  monkeypatch.setattr(evaluate, "CHUNK_BYTES", 32 << 20)
  # 8x8 digits, width 128: 8 MB per 256-row batch, one chunk
  assert evaluate.chunk_rows(256, (8, 8), 128) == 256
  # 28x28: 98 MiB -> 4 chunks of 64; 32x32: 128 MiB -> 4 chunks of 64;
  # 36x36: 162 MiB -> 6 chunks of 43
  assert evaluate.chunk_rows(256, (28, 28), 128) == 64
  assert evaluate.chunk_rows(256, (32, 32), 128) == 64
  assert evaluate.chunk_rows(256, (36, 36), 128) == 43
  for batch, hw in ((256, (28, 28)), (100, (32, 32)), (37, (64, 64))):
    rows = evaluate.chunk_rows(batch, hw, 128)
    assert rows * hw[0] * hw[1] * 128 * 4 <= (32 << 20) or rows == 8
  assert evaluate.chunk_rows(5, (64, 64), 128) == 5
  monkeypatch.setattr(evaluate, "CHUNK_BYTES", None)
  assert evaluate.chunk_rows(256, (32, 32), 128) == 256
  monkeypatch.setattr(evaluate, "CHUNK_BYTES", 32 << 20)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert evaluate.chunk_rows(256, (32, 32), 128) == 256


@pytest.mark.parametrize("chunk_bytes", [16 * 16 * 8 * 4 * 5, 1])
def test_chunked_step_equals_the_whole_batch_step(monkeypatch, chunk_bytes):
  """Chunks of 5 rows (13 = 5 + 5 + 3) and of the 8-row minimum give the
  whole-batch step's parameters up to float summation order."""
  model = models.ConvNet(10, width=8, depth=2)
  cfg = evaluate.EvalConfig(width=8, depth=2)
  x = jax.random.normal(jax.random.key(1), (13, 16, 16, 3))
  y = jnp.arange(13, dtype=jnp.int32) % 10
  key = jax.random.key(2)
  out = {}
  for name, cb in (("whole", None), ("chunked", chunk_bytes)):
    monkeypatch.setattr(evaluate, "CHUNK_BYTES", cb)
    evaluate._step_for.cache_clear()
    step, opt = evaluate._train_step(model, cfg)
    p = models.init_params(model, jax.random.key(0), (16, 16, 3))
    s = opt.init(p)
    for t in range(2):
      p, s = step(p, s, jnp.float32(0.05), key, x, y, jnp.int32(t))
    out[name] = p
  evaluate._step_for.cache_clear()
  for a, b in zip(jax.tree.leaves(out["chunked"]), jax.tree.leaves(out["whole"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                               atol=2e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(out["whole"]),
      jax.tree.leaves(models.init_params(model, jax.random.key(0),
                                         (16, 16, 3)))))
  assert moved > 1e-3  # the steps did move the parameters


def test_chunk_count_is_capped(monkeypatch):
  """Each chunk is compiled unrolled: at most MAX_CHUNKS of them."""
  monkeypatch.setattr(evaluate, "CHUNK_BYTES", 32 << 20)
  rows = evaluate.chunk_rows(256, (128, 128), 128)
  assert -(-256 // rows) == evaluate.MAX_CHUNKS


def _halves(n, seed):
  """8x8 images: class 0 bright in the top half, class 1 in the bottom
  half, plus noise (a flip or small rotation keeps the class)."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % 2
  x = rng.normal(0.0, 0.3, (n, 8, 8, 1)).astype(np.float32)
  x[y == 0, :4] += 1.5
  x[y == 1, 4:] += 1.5
  return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def test_evaluation_models_learn_and_report_their_mean(monkeypatch):
  """The evaluation protocol trains: on a separable task its models are
  right on held-out images, and the reported mean and std are those of the
  listed per-model accuracies. (Gradient ascent in the shared step, which
  also trains the pool and the expert, passed every test before.) Each
  model's batches get per-image DSA, as the protocol says."""
  calls = []
  real = evaluate.augment.augment

  def spy(*args, **kw):
    calls.append(kw.get("per_image"))
    return real(*args, **kw)
  monkeypatch.setattr(evaluate.augment, "augment", spy)
  evaluate._step_for.cache_clear()
  x, y = _halves(40, 0)
  xt, yt = _halves(200, 1)
  cfg = evaluate.EvalConfig(num_models=3, epochs=40, width=8, depth=2,
                            batch_size=20)
  out = evaluate.evaluate(jax.random.key(0), x, y, xt, yt, num_classes=2,
                          cfg=cfg)
  evaluate._step_for.cache_clear()
  acc = np.array(out["test_accuracies"])
  assert len(acc) == 3 and np.all(acc >= 0.9), acc
  assert out["test_accuracy_mean"] == pytest.approx(float(np.mean(acc)))
  assert out["test_accuracy_std"] == pytest.approx(float(np.std(acc)))
  assert calls and all(c is True for c in calls)


def test_the_reported_mean_and_std_are_over_the_models(monkeypatch):
  """Models of different accuracies (per-class table given): the mean and
  std are those of the per-model accuracies, weighted by the test
  classes' sizes."""
  monkeypatch.setattr(evaluate, "train_models",
                      lambda *a, **k: (None, None))
  monkeypatch.setattr(evaluate, "class_accuracies", lambda *a, **k: np.array(
      [[1.0, 0.5], [0.5, 0.5], [0.0, 1.0]]))
  yt = jnp.asarray([0, 1, 1, 1], jnp.int32)  # class 1 weighs 3/4
  out = evaluate.evaluate(jax.random.key(0), None, None, None, yt,
                          num_classes=2, cfg=evaluate.EvalConfig())
  want = np.array([0.625, 0.5, 0.75])
  np.testing.assert_allclose(out["test_accuracies"], want)
  assert out["test_accuracy_mean"] == pytest.approx(want.mean())
  assert out["test_accuracy_std"] == pytest.approx(want.std())
