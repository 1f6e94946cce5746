"""Sensitivity bounds at the precision accelerators use by default.

The noise is calibrated to "one example moves the sum by at most C". A
float32 contraction at default precision rounds its inputs to TF32 on GPUs
and to bf16 on TPUs, so a clip weight C / ||g|| and the gradient it scales
can each be off by 2^-9 relatively, and one clipped contribution can exceed
C. Every sum a bound covers must therefore run at Precision.HIGHEST. These
tests evaluate the production functions with every non-HIGHEST contraction
fed bf16-rounded inputs (tests/precision_emulation.py) and check each
single example's clipped contribution; a default-precision weighted sum,
as pergrad and the generic path had, is caught.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import clipping, models, pergrad
from precision_emulation import emulate_default_precision

# Clip norms far below the gradients' norms: every example is clipped, and
# each C gives another clip weight, rounded up or down by bf16.
CLIPS = np.linspace(0.0101, 0.0199, 6)


def _model_and_example():
  model = models.ConvNet(3, width=4, depth=2)
  params = models.init_params(model, jax.random.key(0), (8, 8, 1))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  y = jnp.array([1, 2], jnp.int32)
  mask = jnp.array([1.0, 0.0])  # one real example, one padded row
  return model, params, x, y, mask


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64)))
                           for a in jax.tree.leaves(tree))))


def _pergrad_sum(model, clip):
  return lambda p, x, y, m: pergrad.convnet_clipped_grad_sum(
      model, p, x, y, m, clip_norm=clip)


def _generic_sum(model, clip):
  def loss(p, batch):
    return models.cross_entropy(model, p, *batch)
  return lambda p, x, y, m: clipping.clipped_grad_sum(
      loss, p, (x, y), m, clip_norm=clip)


def _microbatched_sum(model, clip):
  fn = clipping.microbatched(pergrad.make_grad_sum_fn(model, clip_norm=clip),
                             1)
  return lambda p, x, y, m: fn(p, (x, y), m)


def _worst_ratio(make_sum):
  model, params, x, y, mask = _model_and_example()
  ratios = []
  for clip in CLIPS:
    got = emulate_default_precision(make_sum(model, float(clip)))(
        params, x, y, mask)
    ratios.append(_norm(got) / clip)
  return max(ratios)


@pytest.mark.parametrize("make_sum", [_pergrad_sum, _generic_sum,
                                      _microbatched_sum],
                         ids=["pergrad", "generic", "microbatched"])
def test_one_clipped_gradient_stays_within_c_at_default_precision(make_sum):
  assert _worst_ratio(make_sum) <= 1.0  # exactly (the clip margin)


def test_one_clipped_embedding_stays_within_c_at_default_precision():
  model, params, x, y, mask = _model_and_example()
  embed = models.embed_fn(model)
  for chunk in (None, 1):
    for clip in CLIPS:
      sums = emulate_default_precision(
          lambda p, xx, yy, mm: clipping.clipped_class_sums(
              embed, p, xx * 50, yy, mm, num_classes=3,
              clip_norm=float(clip), chunk_size=chunk))(params, x, y, mask)
      assert np.linalg.norm(np.asarray(sums, np.float64)) <= clip


def test_a_default_precision_weighted_sum_is_caught(monkeypatch):
  # The broken variant: the clip-weighted sum at default precision (what
  # pergrad and clipping.clipped_grad_sum did before).
  monkeypatch.setattr(
      pergrad, "weighted_sum",
      lambda w, v, bits=None: jnp.tensordot(w, v.astype(jnp.float32),
                                            axes=(0, 0)))
  assert _worst_ratio(_pergrad_sum) > 1 + 1e-4
