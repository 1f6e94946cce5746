"""Resolution of `auto` options and what the pool stage trains."""

import numpy as np
import pytest

from dpgeng_jax import planning, presets
from dpgeng_jax.config import Config
from dpgeng_jax.errors import ConfigError

SHAPE = (8, 8, 1)


def _members(**kw):
  cfg = Config(**kw)
  return planning.pool_members(cfg, planning.resolve(cfg, SHAPE))


def test_dpgeng_queries_use_random_extractors_by_default():
  plan = planning.resolve(Config(), SHAPE)
  assert plan.extractors == "random" and plan.init == "generated"
  assert plan.centre == "generated"
  assert planning.resolve(Config(extractors="generated"),
                          SHAPE).extractors == "generated"


@pytest.mark.parametrize("kw, members", [
    ({}, 1),                                      # the k-means init's embedding
    ({"extractors": "generated", "pool_models": 3}, 3),
    ({"init": "noise"}, 0),                       # nothing uses a trained net
    ({"init": "noise", "expert": True}, 1),       # the expert's pretraining
    ({"method": "generator"}, 1),
    ({"method": "ndpdc"}, 0),
])
def test_the_pool_trains_only_the_networks_a_run_uses(kw, members):
  assert _members(**kw) == members


@pytest.mark.parametrize("kw, says", [
    ({"generator": "npz:g.npz", "generated_epsilon": 0.1,
      "generated_mu": 0.5}, "one way"),
    ({"generator": "npz:g.npz", "generated_mu": 0.5,
      "generated_noise_multiplier": 2.0}, "one way"),
    ({"generator": "npz:g.npz", "generated_delta": 1e-6}, "needs "
     "generated_epsilon"),
    ({"generated_epsilon": 0.5}, "but the generator is 'pe:text'"),
])
def test_a_declared_guarantee_of_generated_data_is_one_and_for_npz_only(
    kw, says):
  with pytest.raises(ConfigError, match=says):
    planning.validate_config(Config(**kw))


def test_one_declared_guarantee_of_npz_data_is_accepted():
  for kw in ({"generated_epsilon": 0.1, "generated_delta": 1e-7},
             {"generated_mu": 0.5}, {"generated_noise_multiplier": 2.0}):
    planning.validate_config(Config(generator="npz:g.npz", **kw))


@pytest.mark.parametrize("kw, lines", [
    ({"method": "ndpdc", "generator": "merf", "pe_k": 2},
     ["--generator, --pe-k not used: method ndpdc uses no generated data"]),
    ({"method": "ndpdc", "expert": True},
     ["--expert not used: the expert runs with method dpgeng and --expert "
      "only"]),
    ({"method": "generator", "factor": 2, "num_queries": 5},
     ["--num-queries not used: method generator makes no feature-matching "
      "queries", "--factor not used: method generator stores images at "
      "factor 1"]),
    ({"method": "generator", "init": "real"},
     ["--init not used: method generator picks its images from the "
      "generated data"]),
    ({"expert_weight": 0.3},
     ["--expert-weight not used: the expert is off (--expert)"]),
    ({"generator_steps": 5, "pe_nearest_k": 3},
     ["--pe-nearest-k, --generator-steps not used: the generator is "
      "pe:text"]),
    ({"generator": "merf", "pe_marks": 0, "generator_steps": 5},
     ["--pe-marks not used: the generator is merf"]),
    ({"dataset": "npz:/d.npz", "label_feature": "attributes/Male",
      "data_dir": "/x"},
     ["--label-feature, --data-dir not used: only tfds: datasets read "
      "them"]),
    ({"dataset": "tfds:mnist", "data_dir": "/x"}, []),
    ({"generator": "npz:/g.npz", "generated_steps": 5,
      "generated_sampling_rate": 0.5},
     ["--generated-sampling-rate, --generated-steps not used: no "
      "--generated-noise-multiplier is declared"]),
    ({"generator": "npz:/g.npz", "generated_steps": 5,
      "generated_noise_multiplier": 3.0}, []),
])
def test_options_a_run_does_not_read_are_named(kw, lines):
  cfg = Config(**kw)
  assert planning.unused_options(cfg, planning.resolve(cfg, SHAPE)) == lines


@pytest.mark.parametrize("preset", ["", "quick", "mnist", "cifar10",
                                    "celeb_a,quick"])
@pytest.mark.parametrize("method", ["dpgeng", "ndpdc", "generator", "dm"])
def test_defaults_and_presets_name_no_unused_option(preset, method):
  # A preset's values are its protocol, not the user's choice: a preset
  # with a generator (cifar10: merf) under ndpdc says nothing.
  cfg = presets.config(preset, method=method)
  assert planning.unused_options(cfg, planning.resolve(cfg, SHAPE)) == []


@pytest.mark.parametrize("kw,events", [
    # K = 10 classes and the total, 5 queries at p < 1, 3 expert steps.
    ({"num_queries": 5, "expert": True, "expert_steps": 3}, 11 + 5 + 3),
    ({"num_queries": 5}, 11 + 5),  # the expert off by default
    ({"num_queries": 5, "sampling_rate": 1.0}, 11),  # no Poisson overflow
    ({"num_queries": 5, "public_class_sizes": True}, 5),  # no count release
    ({"method": "dm"}, 0),
])
def test_abort_events_count_every_event_the_delta_reserve_covers(kw,
                                                                 events):
  cfg = Config(**kw)
  assert planning.abort_events(cfg, planning.resolve(cfg), 10) == events


WRONG_TYPES = {
    "dataset_a_number": (dict(dataset=3), "dataset must be text, got 3"),
    "method_none": (dict(method=None), "method must be text, got None"),
    "epsilon_text": (dict(epsilon="1"), "epsilon must be a number, got '1'"),
    "clip_norm_text": (dict(clip_norm="inf"),
                       "clip_norm must be a number, got 'inf'"),
    "delta_a_bool": (dict(delta=True), "delta must be a number, got True"),
    "ipc_a_float": (dict(ipc=2.5), "ipc must be an integer, got 2.5"),
    "steps_a_bool": (dict(steps=True), "steps must be an integer, got True"),
    "flag_text": (dict(quiet="no"), "quiet must be True or False, got 'no'"),
    "out_a_number": (dict(out=5), "out must be text, got 5"),
}


@pytest.mark.parametrize("kw, message", WRONG_TYPES.values(),
                         ids=WRONG_TYPES.keys())
def test_an_option_of_another_type_is_refused_by_name(kw, message):
  """A Config built from Python can hold anything: a number for the
  dataset failed with "'int' object has no attribute 'startswith'", a
  text clip norm with "'>' not supported between 'str' and 'int'", and a
  text flag ("no") was simply true."""
  with pytest.raises(ConfigError, match=message):
    planning.validate_config(Config(**kw))


def test_paths_may_be_path_objects():
  import pathlib
  planning.validate_config(Config(out=pathlib.Path("o"),
                                  tensorboard=pathlib.Path("tb"),
                                  data_dir=pathlib.Path("d")))
  with pytest.raises(ConfigError, match="dataset must be text"):
    planning.validate_config(Config(dataset=pathlib.Path("x.npz")))


def test_a_generator_given_from_python_is_resumed_only_with_its_guarantee(
    tmp_path):
  """choices() records external data's declared guarantee, so a resume
  with the same file declared otherwise is refused (the saved calibration
  holds the first declaration; the name alone would match)."""
  from dpgeng_jax import store
  from dpgeng_jax.errors import ConfigError
  from dpgeng_jax.generators.external import External
  cfg = Config()
  def choices(gen):
    return planning.choices(planning.resolve(cfg, SHAPE, gen))
  first = choices(External("g.npz", mu=0.5))
  assert first["generator_guarantee"]["mechanisms"] == [
      ["external_generator", 2.0, 1.0, 1]]
  assert choices(External("g.npz", epsilon=0.5, delta=1e-6))[
      "generator_guarantee"] == {"epsilon_delta": [0.5, 1e-6],
                                 "mechanisms": []}
  assert "generator_guarantee" not in planning.choices(
      planning.resolve(cfg, SHAPE))
  store.StageStore(str(tmp_path / "s")).start({}, {}, first)
  st = store.StageStore(str(tmp_path / "s"))  # reads the saved JSON
  st.check({}, None, choices(External("g.npz", mu=0.5)))  # the same
  with pytest.raises(ConfigError, match="declares another guarantee: "
                     "generator_guarantee .*2.0.* now .*1.0"):
    st.check({}, None, choices(External("g.npz", mu=1.0)))


@pytest.mark.parametrize("kw, says", [
    ({"init": "bogus"}, "init must be one of"),
    ({"extractors": "bogus"}, "extractors must be one of"),
    ({"centre_features": "bogus"}, "centre_features must be one of"),
    ({"conv_impl": "bogus"}, "conv_impl must be one of"),
    ({"pe_polarity": "bogus"}, "pe_polarity must be one of"),
    ({"strategy": "color_bogus"}, "unknown augmentation component 'bogus'"),
    ({"ipc": np.int64(2)}, "int\\(x\\) for a numpy integer"),
    ({"lr_img": np.float32(np.inf)}, "float\\(x\\) for a numpy scalar"),
    ({"expert_lr": np.float32(0.1)}, "float\\(x\\) for a numpy scalar"),
    ({"quiet": np.bool_(True)}, "bool\\(x\\) for numpy's"),
])
def test_a_config_from_python_is_checked_as_the_command_line_is(kw, says):
  """The CLI's choices held only for the CLI: from Python, init, extractors
  and centre_features 'bogus' ran with a silent fallback, conv_impl and
  strategy failed after the count release, and a numpy float32 inf passed
  the finiteness check (a float32 would not go into config.json either);
  a review's findings. All are refused before any data is read."""
  with pytest.raises(ConfigError, match=says):
    planning.validate_config(Config(**kw))
  planning.validate_config(Config(lr_img=np.float64(0.1)))  # a float


def test_a_declared_external_noise_guarantee_is_composed_with_its_rate_and_steps():
  """--generated-noise-multiplier with --generated-sampling-rate and
  --generated-steps is SelfComposed(PoissonSampled(q, Gaussian(sigma)), T):
  accounted as one release (rate 1, one step), the run's epsilon would be
  understated (a review's mutation, which no test caught)."""
  import dp_accounting
  from dp_accounting.pld import pld_privacy_accountant
  def report(**kw):
    return planning.plan_budget(Config(generator="npz:g.npz", epsilon=10.0,
                                       **kw))
  rep = report(generated_noise_multiplier=2.0, generated_sampling_rate=0.1,
               generated_steps=50)
  (ext,) = [m for m in rep["mechanisms"] if m["name"] == "external_generator"]
  assert (ext["noise_multiplier"], ext["sampling_rate"], ext["steps"]) == (
      2.0, 0.1, 50)
  acc = pld_privacy_accountant.PLDAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.1, dp_accounting.GaussianDpEvent(2.0)), 50))
  want = acc.get_epsilon(rep["delta_mechanisms"])
  assert ext["epsilon_alone"] == pytest.approx(want, rel=2e-2)
  one = report(generated_noise_multiplier=2.0)
  (one_ext,) = [m for m in one["mechanisms"]
                if m["name"] == "external_generator"]
  assert one_ext["epsilon_alone"] != pytest.approx(ext["epsilon_alone"],
                                                   rel=0.05)


@pytest.mark.parametrize("init", ["auto", "real", "noise", "generated"])
def test_the_generator_method_picks_generated_images_whatever_init_says(init):
  """Method generator stores the k-means pick of its generated data: a
  --init real run was reported NOT private ("initialised from real
  training images") and config.json said init noise, though no real image
  and no noise was used (a review's finding)."""
  cfg = Config(method="generator", init=init)
  plan = planning.resolve(cfg, SHAPE)
  assert plan.init == "generated" and plan.uses_generated
  assert planning.nonprivate_reasons(cfg, plan) == []


def test_dm_names_real_images_among_its_reasons_only_when_it_uses_them():
  dm = Config(method="dm", init="generated")
  assert planning.nonprivate_reasons(dm, planning.resolve(dm, SHAPE)) == [
      "method dm: no clipping, no noise"]
  dm = Config(method="dm")
  assert planning.nonprivate_reasons(dm, planning.resolve(dm, SHAPE)) == [
      "method dm: no clipping, no noise, initialised from real images"]
