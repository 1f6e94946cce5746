"""The default method (dpgeng: generator, pool, centred queries, default
depth and factor rule; once more with the expert) end to end on the image shapes of real datasets,
with small widths and few steps. The 8x8 digits alone would not catch a
fast path that breaks on odd feature maps (28 -> 14 -> 7 -> 3)."""

import json

import numpy as np
import pytest

from dpgeng_jax import cli
from dpgeng_jax.config import Config

SMALL = ["--ipc", "1", "--steps", "2", "--num-queries", "2",
         "--extractor-width", "4", "--eval-width", "4", "--eval-models", "1",
         "--eval-epochs", "1", "--pe-iterations", "1", "--pe-population",
         "4", "--generator-steps", "2",
         "--generator-features", "16", "--generated-per-class", "4",
         "--pool-models", "1", "--pool-checkpoints", "1", "--pool-epochs",
         "1", "--expert-steps", "2", "--quiet"]


def _dataset(path, shape, n_train=60, n_test=12, classes=3):
  rng = np.random.default_rng(0)
  np.savez(path,
           x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
           y_train=np.arange(n_train) % classes,
           x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
           y_test=np.arange(n_test) % classes)
  return f"npz:{path}"


@pytest.mark.parametrize("shape,extra", [((28, 28, 1), []),
                                         ((32, 32, 3), []),
                                         ((32, 32, 3), ["--expert"])])
def test_default_method_finishes_on_real_image_shapes(tmp_path, shape,
                                                      extra):
  assert Config().method == "dpgeng" and Config().depth == 0
  spec = _dataset(tmp_path / "d.npz", shape)
  out = tmp_path / "run"
  assert cli.main(["distill", "--dataset", spec, "--delta", "1e-3",
                   "--out", str(out), *SMALL, *extra]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert [m["name"] for m in priv["mechanisms"]] == [
      "class_counts", "generator", "feature_matching",
      *(["expert"] if extra else [])]
  assert priv["private"] is True
  config = json.loads((out / "config.json").read_text())
  assert config["resolved"]["factor"] == 2   # >= 16 px
  assert config["resolved"]["depth"] == 3    # 28 -> 14 -> 7 -> 3
  d = np.load(out / "distilled.npz")
  assert d["x"].shape == (3, *shape)
  assert d["x_decoded"].shape == (12, *shape)
  assert np.all(np.isfinite(d["x"]))
  metrics = json.loads((out / "metrics.json").read_text())
  assert 0.0 <= metrics["test_accuracy_mean"] <= 1.0


def test_default_flags_on_odd_and_non_square_images(tmp_path):
  """31x33x3: the factor rule falls back to 1 where the sides do not
  halve exactly (the tiles of f = 2 would not fill the image), and the run
  finishes with the default method."""
  spec = _dataset(tmp_path / "d.npz", (31, 33, 3))
  out = tmp_path / "run"
  assert cli.main(["distill", "--dataset", spec, "--delta", "1e-3",
                   "--out", str(out), *SMALL]) == 0
  config = json.loads((out / "config.json").read_text())
  assert config["resolved"]["factor"] == 1
  d = np.load(out / "distilled.npz")
  assert d["x"].shape == (3, 31, 33, 3) and np.all(np.isfinite(d["x"]))


@pytest.mark.parametrize("shape,factor", [((16, 16, 1), 2), ((17, 17, 1), 1),
                                          ((32, 30, 3), 2), ((31, 33, 3), 1),
                                          ((8, 8, 1), 1)])
def test_factor_rule_tiles_only_sides_that_halve(shape, factor):
  from dpgeng_jax import planning
  assert planning.resolve(Config(), shape).factor == factor


def test_factor_two_on_odd_sides_is_refused_before_any_release(tmp_path,
                                                               capsys):
  spec = _dataset(tmp_path / "d.npz", (7, 9, 1))
  out = tmp_path / "run"
  assert cli.main(["distill", "--dataset", spec, "--delta", "1e-3",
                   "--factor", "2", "--out", str(out), *SMALL]) == 2
  assert "multiples of 2" in capsys.readouterr().err
  assert not out.exists()


def test_factor_two_on_images_under_four_pixels_a_side_is_refused(tmp_path,
                                                                  capsys):
  # 2x2 images ran on 1x1 tiles (one colour each) at 20 % accuracy.
  spec = _dataset(tmp_path / "d.npz", (2, 6, 1))
  assert cli.main(["distill", "--dataset", spec, "--delta", "1e-3",
                   "--factor", "2", "--out", str(tmp_path / "run"),
                   *SMALL]) == 2
  assert "tiles of 1x3 pixels" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()
