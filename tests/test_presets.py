"""Presets: resolution, explicit overrides, the record in config.json, and
a preset's dataset through TFDS (mock data)."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_base

from dpgeng_jax import cli, data, presets
from dpgeng_jax.config import Config
from dpgeng_jax.errors import ConfigError


def _cfg(*argv):
  args = cli.build_parser().parse_args(["distill", *argv])
  return cli.config_from_args(args, ["distill", *argv])


def test_preset_sets_the_papers_protocol():
  cfg = _cfg("--preset", "cifar10")
  assert (cfg.dataset, cfg.ipc, cfg.depth, cfg.extractor_width,
          cfg.factor, cfg.eval_models, cfg.eval_epochs) == (
              "tfds:cifar10", 50, 3, 128, 2, 5, 300)


def test_explicit_flags_override_the_preset_before_or_after_it():
  for argv in (("--preset", "cifar10", "--ipc", "10"),
               ("--ipc", "10", "--preset", "cifar10")):
    cfg = _cfg(*argv)
    assert cfg.ipc == 10 and cfg.dataset == "tfds:cifar10"
    assert presets.overridden(cfg) == {"ipc": {"preset": 50, "used": 10}}
  # Given explicitly with the default's value still overrides.
  cfg = _cfg("--preset", "mnist", "--ipc", "10", "--eval-epochs", "300",
             "--steps", "1000")
  assert presets.overridden(cfg) == {}


def test_presets_apply_left_to_right():
  cfg = _cfg("--preset", "cifar10,quick")
  assert cfg.ipc == 50 and cfg.steps == 200 and cfg.eval_models == 2
  assert cfg.eval_width == 32  # quick's, over cifar10's
  assert presets.names(cfg.preset) == ["cifar10", "quick"]


def test_library_config_matches_the_command_line():
  assert presets.config("mnist", ipc=50) == _cfg("--preset", "mnist",
                                                 "--ipc", "50")
  with pytest.raises(ConfigError, match="unknown options"):
    presets.config("mnist", ipcs=3)


def test_unknown_preset_is_refused(capsys):
  assert cli.main(["distill", "--preset", "imagenet", "--out", "x"]) == 2
  assert "unknown preset 'imagenet'" in capsys.readouterr().err
  assert cli.main(["plan", "--preset", "quick,nope"]) == 2


def test_every_preset_names_real_options_and_is_documented():
  fields = set(Config.__dataclass_fields__)
  for p in presets.PRESETS.values():
    assert set(p.values) <= fields
    assert p.about and p.hardware and p.runtime and p.result
    assert f"`{p.name}`" in presets.table()


def test_plan_of_a_preset_needs_no_data(capsys):
  assert cli.main(["plan", "--preset", "cifar100", "--epsilon", "1"]) == 0
  assert "feature_matching" in capsys.readouterr().out


def test_quick_preset_run_records_the_preset_in_config_json(tmp_path):
  out = tmp_path / "run"
  assert cli.main(["distill", "--preset", "quick", "--method", "ndpdc",
                   "--steps", "3", "--num-queries", "2", "--eval-models",
                   "1", "--eval-epochs", "1", "--extractor-width", "8",
                   "--eval-width", "8", "--deterministic", "--quiet",
                   "--out", str(out)]) == 0
  config = json.loads((out / "config.json").read_text())
  assert config["preset"] == "quick" and config["steps"] == 3
  rec = config["preset_record"]
  assert rec["names"] == ["quick"] and rec["values"]["steps"] == 200
  assert rec["overridden"]["steps"] == {"preset": 200, "used": 3}
  assert "eval_models" in rec["overridden"]
  assert "pool_epochs" not in rec["overridden"]  # taken from the preset


@pytest.fixture
def mocked_tfds(monkeypatch):
  # As tests/test_data.py: mock_data's batch reads go through __getitem__.
  monkeypatch.setattr(tfds_base.BaseDataSource, "__getitems__",
                      lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=40):
    yield


@pytest.mark.parametrize("name,shape,k", [("mnist", (28, 28, 1), 10),
                                          ("cifar10", (32, 32, 3), 10)])
def test_dataset_presets_load_their_tfds_dataset(mocked_tfds, name, shape, k):
  cfg = presets.config(name)
  ds = data.load_dataset(cfg.dataset, num_classes=cfg.num_classes or None,
                         label_feature=cfg.label_feature,
                         image_size=cfg.image_size)
  assert ds.image_shape == shape and ds.num_classes == k


def test_celeb_a_preset_reads_the_gender_attribute_and_resizes(mocked_tfds):
  cfg = presets.config("celeb_a")
  ds = data.load_dataset(cfg.dataset, num_classes=cfg.num_classes,
                         label_feature=cfg.label_feature,
                         image_size=cfg.image_size)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 2
  assert set(np.unique(ds.y_train)) <= {0, 1}
  assert 0.0 <= ds.x_train.min() <= ds.x_train.max() <= 1.0


def test_resize_images_crops_the_centre_and_keeps_the_range():
  x = np.zeros((2, 12, 8, 1), np.uint8)
  x[:, 2:10] = 255  # the centred 8x8 square is white, the rest black
  out = data.resize_images(x, 4)
  assert out.shape == (2, 4, 4, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out, 1.0, atol=1e-6)
  flat = data.resize_images(np.full((1, 6, 6, 3), 0.25, np.float32), 3)
  np.testing.assert_allclose(flat, 0.25, atol=1e-6)


def test_readme_presets_table_lists_every_preset():
  import pathlib
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md"
            ).read_text()
  section = readme.split("### Presets", 1)[1].split("\n### ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  assert sorted(r.split("`")[1] for r in rows) == sorted(presets.PRESETS)


def test_an_npz_copy_under_a_dataset_preset_takes_its_normalisation(
    tmp_path):
  """`--preset mnist --dataset npz:PATH` runs MNIST's protocol, its
  published constants included; other channel counts, other datasets and
  runs without a preset keep the data-independent 0.5 / 0.5."""
  from dpgeng_jax import pipeline
  rng = np.random.default_rng(0)

  def npz(channels):
    path = str(tmp_path / f"c{channels}.npz")
    x = rng.random((20, 6, 6, channels)).astype(np.float32)
    y = np.arange(20) % 2
    np.savez(path, x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    return "npz:" + path

  one, three = npz(1), npz(3)
  # (6x6 images of 2 classes: not MNIST's shape, which it says.)
  with pytest.warns(UserWarning, match="protocol is for mnist's 28x28x1 "
                    "images of 10 classes, and this npz holds 6x6x1 images "
                    "of 2"):
    ds = pipeline.load_data(presets.config("mnist", dataset=one))
  assert ds.mean == (0.1307,) and ds.std == (0.3081,)
  assert "mnist preset" in ds.normalisation_source
  with pytest.warns(UserWarning, match="cifar10's 32x32x3 images"):
    ds = pipeline.load_data(presets.config("cifar10,quick", dataset=three))
  assert ds.mean == (0.4914, 0.4822, 0.4465)
  for cfg in (presets.config("", dataset=one),
              presets.config("quick", dataset=one)):
    assert pipeline.load_data(cfg).mean == (0.5,) * (
        3 if cfg.dataset == three else 1)
  # ...and a preset whose constants do not fit the channels says so.
  with pytest.warns(UserWarning, match="for 1-channel images and these have "
                    "3: they are not used"):
    ds = pipeline.load_data(presets.config("mnist", dataset=three))
  assert ds.mean == (0.5,) * 3
  assert "mnist preset's published" in ds.normalisation_source


def test_an_npz_copy_of_the_presets_shape_loads_without_a_warning(tmp_path):
  """The shape warning is about the data, not the preset: an npz of
  MNIST's shape and class count loads quietly (a review found presets
  ran on 8x8 and 20x12 data with MNIST's and CIFAR-100's protocol and
  constants without a word)."""
  import warnings
  from dpgeng_jax import pipeline
  x = np.random.default_rng(0).random((20, 28, 28, 1)).astype(np.float32)
  y = np.arange(20) % 10
  path = str(tmp_path / "m.npz")
  np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ds = pipeline.load_data(presets.config("mnist", dataset="npz:" + path))
  assert ds.mean == (0.1307,)


@pytest.mark.parametrize("name,ipc", [("mnist", 10), ("fashion_mnist", 10),
                                      ("cifar10", 50), ("cifar100", 50),
                                      ("celeb_a", 50)])
def test_every_dataset_preset_is_the_papers_protocol(name, ipc):
  """IPC 10 on MNIST-like data, 50 on CIFAR and CelebA; ConvNet-3 of
  width 128 (extractors and evaluation), factor 2, 5 evaluation models x
  300 epochs (ALGORITHM.md). Only cifar10 and mnist's IPC were pinned."""
  cfg = presets.config(name)
  assert (cfg.ipc, cfg.depth, cfg.extractor_width, cfg.eval_width,
          cfg.factor, cfg.eval_models, cfg.eval_epochs) == (
              ipc, 3, 128, 128, 2, 5, 300)


def test_quick_changes_the_cost_options_the_readme_names():
  cfg = presets.config("quick")
  assert (cfg.steps, cfg.extractor_width, cfg.eval_width, cfg.eval_models,
          cfg.eval_epochs, cfg.pool_epochs, cfg.pe_population,
          cfg.generator_steps, cfg.generated_per_class) == (
              200, 32, 32, 2, 50, 10, 50, 500, 100)
  privacy = {f.name for f in dataclasses.fields(Config)
             if f.metadata.get("group") == "privacy"}
  assert privacy and not privacy & set(presets.values("quick"))
