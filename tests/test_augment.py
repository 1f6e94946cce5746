"""Properties of differentiable siamese augmentation with explicit params."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import augment
from dpgeng_jax.augment import (COMPONENTS, DEFAULT_STRATEGY, AugmentParams,
                                apply, identity_params, sample_params)

# Few fixed shapes, so compiled functions are reused across tests.
N, H, W, C = 6, 8, 8, 3


def _images(seed=0, shape=(N, H, W, C)):
  # NumPy, not jax.random: an eager jax draw compiles once per shape (~1 s).
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _with(**fields):
  """Identity params (shared) with some fields replaced."""
  return identity_params()._replace(
      **{k: np.float32(v) for k, v in fields.items()})


@pytest.mark.parametrize("batch_shape", [(), (N,)])
def test_identity_params_return_input_exactly(batch_shape):
  x = _images()
  out = apply(x, identity_params(batch_shape), DEFAULT_STRATEGY)
  np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("strategy", ["none", "None", ""])
def test_none_strategy_is_identity_whatever_the_params(strategy):
  x = _images()
  params = sample_params(jax.random.key(1), DEFAULT_STRATEGY, mode="all")
  np.testing.assert_array_equal(apply(x, params, strategy), x)
  assert sample_params(jax.random.key(1), strategy) == identity_params()


def test_same_key_transforms_an_image_identically_in_any_batch():
  # Siamese property: the real and the synthetic batch share one draw, and an
  # image's result does not depend on which batch (or position) it is in.
  z = _images(seed=5, shape=(1, H, W, C))
  x_real = np.concatenate([_images(1)[:N - 1], z])      # z is real[N - 1]
  x_syn = np.concatenate([z, _images(2, (1, H, W, C))])  # z is syn[0]
  for mode in ("single", "all"):
    p_real = sample_params(jax.random.key(7), mode=mode)
    p_syn = sample_params(jax.random.key(7), mode=mode)
    assert all(np.array_equal(a, b) for a, b in zip(p_real, p_syn))
    np.testing.assert_allclose(apply(x_real, p_real)[N - 1],
                               apply(x_syn, p_syn)[0], atol=1e-6)


# One compiled gradient for all components: params are traced, and a draw
# restricted to one component holds identity values everywhere else.
_weighted_sum_grad = jax.jit(jax.grad(
    lambda x, params, weights: jnp.sum(apply(x, params) * weights)))


@pytest.mark.parametrize("component", COMPONENTS)
def test_gradient_wrt_images_is_finite_and_nonzero_for_each_component(
    component):
  x = _images()
  params = sample_params(jax.random.key(3), component, mode="all")
  if component == "flip":
    params = params._replace(flip=np.float32(1.0))  # a draw may not flip
  grad = np.asarray(_weighted_sum_grad(x, params, _images(seed=4)))
  assert np.all(np.isfinite(grad))
  assert np.abs(grad).sum() > 0.0
  # The gradient differs from the identity's, so it passes through the
  # component's transformation rather than around it.
  identity_grad = _weighted_sum_grad(x, identity_params(), _images(seed=4))
  assert not np.allclose(grad, identity_grad)


@pytest.mark.parametrize("batch_shape", [(), (N,)])
def test_gradient_is_the_adjoint_of_the_affine_map(batch_shape):
  # apply is affine in x (linear up to the brightness offset), so for any
  # cotangent g and direction v: <J^T g, v> = <g, apply(x + v) - apply(x)>.
  x, v, g = _images(20), _images(21), _images(22)
  params = sample_params(jax.random.key(8), batch_shape=batch_shape,
                         mode="all")
  grad = np.asarray(_weighted_sum_grad(x, params, g), np.float64)
  diff = np.asarray(apply(x + v, params), np.float64) - apply(x, params)
  np.testing.assert_allclose(np.vdot(grad, v), np.vdot(g, diff), rtol=1e-4)


def test_apply_under_jit_matches_eager():
  # Eager (op by op) costs ~3 s, so only the shared path runs it; the
  # per-image path is checked against the shared one image by image below.
  x = _images(shape=(2, H, W, C))
  params = sample_params(jax.random.key(9), mode="all")
  with jax.disable_jit():
    eager = apply(x, params)
  outer = jax.jit(lambda x, p: apply(x, p) * 1.0)
  np.testing.assert_allclose(outer(x, params), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["flip", DEFAULT_STRATEGY])
def test_flip_equals_reversing_the_width_axis_exactly(strategy):
  x = _images(shape=(N, H, 7, C))  # odd width too
  np.testing.assert_array_equal(apply(x, _with(flip=1.0), strategy),
                                x[:, :, ::-1])


def test_crop_shifts_by_whole_pixels_with_zero_padding():
  x = _images()
  out = apply(x, _with(translate_x=1.0 / W, translate_y=-1.0 / H), "crop")
  # Output (i, j) reads input (i - 1, j + 1); outside reads are zero.
  np.testing.assert_array_equal(out[:, 1:, :-1], x[:, :-1, 1:])
  np.testing.assert_array_equal(out[:, 0], 0.0)
  np.testing.assert_array_equal(out[:, :, -1], 0.0)


def test_cutout_zeroes_a_centred_square_of_half_the_side():
  x = _images() + 10.0  # no zeros of its own
  out = apply(x, _with(cutout_size=0.5, cutout_x=0.5, cutout_y=0.5), "cutout")
  inside = np.zeros((H, W), bool)
  inside[2:6, 2:6] = True
  np.testing.assert_array_equal(out[:, inside], 0.0)
  np.testing.assert_array_equal(out[:, ~inside], x[:, ~inside])


@pytest.mark.parametrize("degrees", [-15.0, 7.0, 15.0])
def test_rotate_keeps_a_centred_round_blob(degrees):
  size = 16
  centre = (size - 1) / 2
  r2 = ((np.arange(size)[:, None] - centre) ** 2
        + (np.arange(size)[None, :] - centre) ** 2)
  blob = np.exp(-r2 / 8.0).astype(np.float32)[None, :, :, None]
  out = apply(blob, _with(rotate=math.radians(degrees)), "rotate")
  assert abs(float(out.sum()) / float(blob.sum()) - 1.0) < 0.02
  assert np.abs(out - blob).max() < 0.05


def test_rotate_turns_an_off_centre_blob_away_from_its_place():
  size = 16
  centre = (size - 1) / 2
  yy, xx = np.mgrid[:size, :size]
  blob = np.exp(-((yy - centre) ** 2 + (xx - centre - 4) ** 2) / 2.0)
  blob = blob.astype(np.float32)[None, :, :, None]
  out = apply(blob, _with(rotate=math.radians(15.0)), "rotate")[0, :, :, 0]
  mass = float(out.sum())
  mean_y = float((out * yy).sum()) / mass
  mean_x = float((out * xx).sum()) / mass
  # Rotating the sampling grid by +15 degrees moves content by -15 degrees:
  # the blob at (0, +4) from the centre lands at 4 * (cos 15, -sin 15).
  np.testing.assert_allclose(mean_x - centre, 4 * math.cos(math.radians(15)),
                             atol=0.1)
  np.testing.assert_allclose(mean_y - centre, -4 * math.sin(math.radians(15)),
                             atol=0.1)


def test_per_image_params_differ_and_match_the_shared_path_image_by_image():
  x = _images()
  params = sample_params(jax.random.key(11), batch_shape=(N,), mode="all")
  for name in ("brightness", "scale_x", "rotate", "cutout_x"):
    assert len(np.unique(np.asarray(getattr(params, name)))) == N
  out = apply(x, params)
  for i in range(N):
    one = AugmentParams(*(np.asarray(f)[i] for f in params))
    np.testing.assert_allclose(out[i], apply(x, one)[i], atol=1e-5)


def test_vmap_over_classes_applies_each_class_its_own_shared_draw():
  x = _images(shape=(3, 2, H, W, C))  # (classes, images, H, W, C)
  params = sample_params(jax.random.key(12), batch_shape=(3,), mode="all")
  out = jax.jit(jax.vmap(apply))(x, params)
  for c in range(3):
    one = AugmentParams(*(np.asarray(f)[c] for f in params))
    np.testing.assert_allclose(out[c], apply(x[c], one), atol=1e-5)


_BOUNDS = {
    "brightness": (-0.5, 0.5),
    "saturation": (0.0, 2.0),
    "contrast": (0.5, 1.5),
    "scale_x": (1 / 1.2, 1.2),
    "scale_y": (1 / 1.2, 1.2),
    "rotate": (-math.radians(15.0), math.radians(15.0)),
    "translate_x": (-0.125, 0.125),
    "translate_y": (-0.125, 0.125),
    "cutout_x": (0.0, 1.0),
    "cutout_y": (0.0, 1.0),
}


def test_sample_params_stay_within_dsa_bounds_and_cover_them():
  params = sample_params(jax.random.key(13), batch_shape=(4096,), mode="all")
  for name, (lo, hi) in _BOUNDS.items():
    values = np.asarray(getattr(params, name))
    assert values.min() >= lo - 1e-6 and values.max() <= hi + 1e-6, name
    assert values.min() < lo + 0.02 * (hi - lo), name
    assert values.max() > hi - 0.02 * (hi - lo), name
  assert set(np.unique(np.asarray(params.flip))) == {0.0, 1.0}
  assert abs(float(params.flip.mean()) - 0.5) < 0.05
  np.testing.assert_array_equal(params.cutout_size, 0.5)


def _non_identity_components(params):
  ident = identity_params(params.flip.shape)
  changed = {comp: np.zeros(params.flip.shape, bool) for comp in COMPONENTS}
  for comp, names in augment._FIELDS_OF.items():
    for name in names:
      changed[comp] |= np.asarray(getattr(params, name)
                                  != getattr(ident, name))
  return changed


def test_single_mode_changes_at_most_one_component_each_about_equally_often():
  params = sample_params(jax.random.key(14), batch_shape=(4096,),
                         mode="single")
  changed = _non_identity_components(params)
  per_draw = sum(changed.values())
  assert per_draw.max() == 1
  for comp in COMPONENTS:
    expected = 0.5 / 6 if comp == "flip" else 1 / 6
    assert abs(changed[comp].mean() - expected) < 0.02, comp


def test_components_outside_the_strategy_keep_identity_values():
  params = sample_params(jax.random.key(15), "flip_rotate", (4096,), "all")
  changed = _non_identity_components(params)
  for comp in ("color", "crop", "cutout", "scale"):
    assert not changed[comp].any(), comp
  assert changed["rotate"].all()


def test_apply_ignores_params_of_components_outside_the_strategy():
  x = _images()
  drawn = sample_params(jax.random.key(16), mode="all")
  only_flip = _with(flip=1.0)
  np.testing.assert_array_equal(apply(x, drawn._replace(flip=1.0), "flip"),
                                apply(x, only_flip, "flip"))


@pytest.mark.parametrize("strategy", ["color_blur", "Flip", "crop__cutout"])
def test_unknown_strategy_component_raises_value_error_naming_it(strategy):
  bad = {"color_blur": "blur", "Flip": "Flip", "crop__cutout": "''"}[strategy]
  with pytest.raises(ValueError, match=bad):
    sample_params(jax.random.key(0), strategy)
  with pytest.raises(ValueError, match=bad):
    apply(_images(), identity_params(), strategy)


def test_unknown_mode_raises_value_error():
  with pytest.raises(ValueError, match="mode"):
    sample_params(jax.random.key(0), mode="multiple")


def test_params_batch_shape_that_fits_neither_form_raises():
  with pytest.raises(ValueError, match="batch shape"):
    apply(_images(), identity_params((N + 1,)))


@pytest.mark.parametrize("shape, dtype, per_image", [
    ((2, 8, 8, 1), jnp.float32, False),
    ((2, 8, 8, 1), jnp.bfloat16, True),
    ((3, 12, 10, 3), jnp.float32, True),
    ((3, 12, 10, 3), jnp.bfloat16, False),
])
def test_output_shape_and_dtype_are_preserved(shape, dtype, per_image):
  x = _images(shape=shape).astype(dtype)
  out = augment.augment(jax.random.key(17), x, per_image=per_image, mode="all")
  assert out.shape == x.shape and out.dtype == x.dtype


def test_augment_equals_sample_then_apply():
  x = _images()
  key = jax.random.key(18)
  expected = apply(x, sample_params(key, "crop_scale", (N,)), "crop_scale")
  np.testing.assert_array_equal(
      augment.augment(key, x, "crop_scale", per_image=True), expected)


def test_params_are_a_pytree_of_float32_arrays():
  params = sample_params(jax.random.key(19), batch_shape=(N,), mode="all")
  assert isinstance(params, AugmentParams)
  for leaf in jax.tree.leaves(params):
    assert leaf.shape == (N,) and leaf.dtype == jnp.float32
  assert jax.tree.leaves(identity_params())[0].shape == ()


def _bilinear_scaled(x, sx, sy):
  """Reference: out[i, j] = x at (sy (i - cy) + cy, sx (j - cx) + cx),
  bilinear, zero outside."""
  n, h, w, c = x.shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  out = np.zeros_like(x, dtype=np.float64)
  for i in range(h):
    for j in range(w):
      fy, fx = sy * (i - cy) + cy, sx * (j - cx) + cx
      y0, x0 = math.floor(fy), math.floor(fx)
      for yy, wy in ((y0, 1 - (fy - y0)), (y0 + 1, fy - y0)):
        for xx, wx in ((x0, 1 - (fx - x0)), (x0 + 1, fx - x0)):
          if 0 <= yy < h and 0 <= xx < w:
            out[:, i, j] += wy * wx * x[:, yy, xx]
  return out


@pytest.mark.parametrize("sx,sy", [(1.0, 1.3), (1.2, 0.8)])
def test_scale_reads_each_axis_at_its_own_factor(sx, sy):
  x = _images(3)
  got = apply(x, _with(scale_x=sx, scale_y=sy), "scale")
  np.testing.assert_allclose(got, _bilinear_scaled(x, sx, sy), atol=1e-5)


def test_colour_changes_brightness_saturation_and_contrast_as_dsa():
  """brightness adds b; saturation moves each pixel's channels toward
  their mean by s; contrast scales each image's deviations from its own
  mean by c (its mean kept)."""
  x = _images(4)
  b = apply(x, _with(brightness=0.3), "color")
  np.testing.assert_allclose(b, x + 0.3, atol=1e-6)
  s = apply(x, _with(saturation=0.4), "color")
  grey = x.mean(-1, keepdims=True)
  np.testing.assert_allclose(s, 0.4 * x + 0.6 * grey, atol=1e-5)
  c = apply(x, _with(contrast=1.5), "color")
  m = x.reshape(N, -1).mean(1)[:, None, None, None]
  np.testing.assert_allclose(c, 1.5 * (x - m) + m, atol=1e-5)
