"""The up-front cost estimate and the whole-run progress line."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from dpgeng_jax import cli, estimate, models, planning, progress
from dpgeng_jax.config import Config


@pytest.mark.parametrize("shape,depth", [((8, 8, 1), 2), ((28, 28, 1), 3),
                                         ((32, 32, 3), 3)])
def test_forward_flops_match_xlas_count(shape, depth):
  m = models.ConvNet(10, width=32, depth=depth, conv_impl="xla")
  params = jax.eval_shape(lambda k: models.init_params(m, k, shape),
                          jax.random.key(0))
  x = jax.ShapeDtypeStruct((4, *shape), jnp.float32)
  xla = jax.jit(lambda p, x: m.apply({"params": p}, x)).lower(
      params, x).cost_analysis()["flops"] / 4
  ours = estimate.forward_flops(shape, 32, depth, 10)
  assert 0.8 < ours / xla < 1.25, (ours, xla)


def _flops(**kw):
  cfg = Config(**kw)
  plan = planning.resolve(cfg, (28, 28, 1))
  return estimate.stage_flops(cfg, plan, (28, 28, 1), 1000, 200, 10)


def test_stage_flops_follow_the_configuration():
  base = _flops()
  assert _flops(steps=2000)["distillation"] == pytest.approx(
      2 * base["distillation"])
  assert _flops(num_queries=2 * Config().num_queries)["queries"] == (
      pytest.approx(2 * base["queries"]))
  assert _flops(no_eval=True)["evaluation"] == 0
  nd = _flops(method="ndpdc")
  assert nd["generation"] == nd["extractor_pool"] == nd["expert"] == 0
  assert base["expert"] == 0 < _flops(expert=True)["expert"]
  # The expert stage also runs p_ref: one forward pass per generated image.
  e = [_flops(expert=True, generated_per_class=g)["expert"]
       for g in (200, 400)]
  per_image = _flops(expert=True, generated_per_class=200)["init"] / 2000
  assert e[1] - e[0] == pytest.approx(2000 * per_image) and per_image > 0
  assert nd["queries"] == pytest.approx(base["queries"])
  assert base["pe_api_samples"] == (10 + 1) * 10 * 100 + 10 * 200
  # A warm start: one variation of N_s per class per herding iteration
  # and the first population; feature and herding work on top.
  warm = _flops(pe_warm_start=5)
  assert warm["pe_api_samples"] - base["pe_api_samples"] == 6 * 10 * 100
  assert warm["generation"] > base["generation"]
  assert _flops(pe_warm_start=5, pe_public_only=True) == _flops(
      pe_public_only=True)
  assert _flops(generator="merf")["generation"] > 0
  # The pool: pool_models ConvNets for generated extractors, one for the
  # k-means init with random ones (the default), none when unused.
  centres = _flops(pool_models=3, centre_features="none")
  gen_ext = _flops(pool_models=3, centre_features="none",
                   extractors="generated")
  assert gen_ext["extractor_pool"] == pytest.approx(
      3 * centres["extractor_pool"]) and centres["extractor_pool"] > 0
  assert _flops(init="noise", centre_features="none")["extractor_pool"] == 0


def test_computing_the_padding_costs_the_capacity_over_the_expected_batch():
  """--no-skip-padding: the queries' and the expert's steps compute their
  padded capacity over the padded rows (1000 -> 1024), not q N rows."""
  from dpgeng_jax import mechanisms
  skip = _flops(expert=True)
  every = _flops(expert=True, no_skip_padding=True)
  cfg = Config()
  for stage, rate in (("queries", cfg.sampling_rate),
                      ("expert", cfg.expert_sampling_rate)):
    ratio = mechanisms.poisson_capacity([1024], rate) / (rate * 1000)
    extra = every[stage] - skip[stage]
    assert ratio > 1.05 and extra > 0
    if stage == "queries":
      assert every[stage] == pytest.approx(ratio * skip[stage])
  assert {k: v for k, v in every.items() if k not in ("queries", "expert")
          } == {k: v for k, v in skip.items() if k not in ("queries",
                                                          "expert")}


def test_machine_rate_is_measured_once_and_cached(tmp_path, monkeypatch):
  path = tmp_path / "sub" / "machine.json"
  monkeypatch.setenv("DPGENG_RATE_CACHE", str(path))
  calls = []
  monkeypatch.setattr(estimate, "measure_rate", lambda: calls.append(1) or {
      "matmul_flops_per_s": 1e10, "device": "x"})
  monkeypatch.setattr(estimate, "text_api_seconds",
                      lambda shape: calls.append(shape) or 0.001)
  r1 = estimate.machine_rate(image_shape=(8, 8, 1))
  r2 = estimate.machine_rate(image_shape=(8, 8, 1))
  assert r1 == r2 and r1["text_api_s_per_sample"] == 0.001
  assert calls == [1, (8, 8, 1)]
  estimate.machine_rate(image_shape=(28, 28, 1))  # a new shape: timed once
  assert calls == [1, (8, 8, 1), (28, 28, 1)]
  table = json.loads(path.read_text())
  assert set(next(iter(table.values()))["text_api"]) == {"8x8x1", "28x28x1"}
  # An unwritable cache is no error: measured again next time.
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("DPGENG_RATE_CACHE", str(tmp_path / "file" / "m.json"))
  assert estimate.machine_rate()["matmul_flops_per_s"] == 1e10


@pytest.mark.parametrize("content", ["null", "[1, 2]", "my notes\n"])
def test_a_rate_cache_path_holding_something_else_is_never_replaced(
    tmp_path, monkeypatch, content):
  """DPGENG_RATE_CACHE naming a user's file (text, or JSON that is not a
  table) replaced it with the rate table (a review's finding): it is
  left as it is, with a warning, and the rate measured."""
  path = tmp_path / "notes.txt"
  path.write_text(content)
  monkeypatch.setenv("DPGENG_RATE_CACHE", str(path))
  monkeypatch.setattr(estimate, "measure_rate", lambda: {
      "matmul_flops_per_s": 2e10, "device": "x"})
  with pytest.warns(UserWarning, match="not a table this tool wrote"):
    assert estimate.machine_rate()["matmul_flops_per_s"] == 2e10
  assert path.read_text() == content
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("content", [
    '{"KEY": 5}', '{"KEY": {"device": "x"}}',
    '{"KEY": {"matmul_flops_per_s": 0}}',
    '{"KEY": {"matmul_flops_per_s": -1}}',
    '{"KEY": {"matmul_flops_per_s": "fast"}}',
    '{"KEY": {"matmul_flops_per_s": 1e10, "text_api": {"8x8x1": -1}}}',
    '{"KEY": {"matmul_flops_per_s": 1e10, "text_api": [1]}}'])
def test_a_rate_cache_of_another_shape_is_measured_again(
    tmp_path, monkeypatch, content):
  """A table whose entry machine_rate did not write (a user's edit,
  another version's) is measured again and overwritten, never a crash or
  a negative estimate."""
  path = tmp_path / "machine.json"
  path.write_text(content.replace("KEY", estimate._device_key()))
  monkeypatch.setenv("DPGENG_RATE_CACHE", str(path))
  monkeypatch.setattr(estimate, "measure_rate", lambda: {
      "matmul_flops_per_s": 2e10, "device": "x"})
  monkeypatch.setattr(estimate, "text_api_seconds", lambda shape: 0.002)
  r = estimate.machine_rate(image_shape=(8, 8, 1))
  assert r["matmul_flops_per_s"] == 2e10
  assert r["text_api_s_per_sample"] == 0.002
  saved = json.loads(path.read_text())[estimate._device_key()]
  assert saved["matmul_flops_per_s"] == 2e10


def test_an_unwritable_rate_cache_leaves_no_temporary_file(tmp_path,
                                                           monkeypatch):
  target = tmp_path / "d"
  target.mkdir()  # a directory where the cache file should be
  monkeypatch.setenv("DPGENG_RATE_CACHE", str(target))
  monkeypatch.setattr(estimate, "measure_rate", lambda: {
      "matmul_flops_per_s": 1e10, "device": "x"})
  with pytest.warns(UserWarning, match="left as it is"):
    assert estimate.machine_rate()["matmul_flops_per_s"] == 1e10
  assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
  assert not list(target.iterdir())


def test_expected_time_is_flops_over_rate_plus_overhead():
  cfg = Config(method="ndpdc")
  plan = planning.resolve(cfg, (8, 8, 1))
  rate = {"matmul_flops_per_s": 1e9, "device": "test"}
  est = estimate.estimate(cfg, plan, (8, 8, 1), 1000, 100, 10, rate)
  fl = est["flops"]["distillation"]
  assert est["stages_s"]["distillation_s"] == pytest.approx(
      estimate.OVERHEAD_S["distillation"]
      + fl / (1e9 * estimate.EFFICIENCY["distillation"]))
  assert est["stages_s"]["expert_s"] == 0
  assert est["total_s"] == pytest.approx(sum(est["stages_s"].values()))
  assert "distillation" in estimate.format_table(est)
  # 28x28: the training stages' larger share of the rate
  big = estimate.estimate(cfg, planning.resolve(cfg, (28, 28, 1)), (28, 28, 1),
                          1000, 100, 10, rate)
  assert big["stages_s"]["distillation_s"] == pytest.approx(
      estimate.OVERHEAD_S["distillation"] + big["flops"]["distillation"]
      / (1e9 * estimate.EFFICIENCY_LARGE["distillation"]))
  # A narrower ConvNet on large maps: a share in proportion to its width.
  narrow = dataclasses.replace(cfg, extractor_width=32)
  small = estimate.estimate(narrow, planning.resolve(narrow, (28, 28, 1)),
                            (28, 28, 1), 1000, 100, 10, rate)
  assert small["stages_s"]["distillation_s"] == pytest.approx(
      estimate.OVERHEAD_S["distillation"] + small["flops"]["distillation"]
      / (1e9 * estimate.EFFICIENCY_LARGE["distillation"] * 32 / 128))
  assert estimate.efficiency("distillation", (28, 28, 1), 256) == (
      estimate.EFFICIENCY_LARGE["distillation"])
  assert estimate.efficiency("generation", (28, 28, 1)) == (
      estimate.EFFICIENCY["generation"])
  assert estimate.efficiency("queries", (8, 8, 1)) == (
      estimate.EFFICIENCY["queries"])


def test_progress_line_counts_stages_and_rescales_the_eta():
  lines = []
  est = {k: 10.0 for _, k in progress.STAGES}
  p = progress.Progress(est, write=lines.append)
  p.start("calibrate")
  assert lines[0].startswith("[stage 1/9: calibrate]")
  assert "90 s left" in lines[0]
  p.t0 -= 20.0  # calibration took 20 s against 10 estimated: 2x slower
  p.start("class_sizes")
  assert lines[1].startswith("[stage 2/9: class_sizes]")
  assert "160 s left" in lines[1]  # 8 stages x 10 s x 2
  quiet = progress.Progress(est, quiet=True, write=lines.append)
  quiet.start("calibrate")
  assert len(lines) == 2


def test_a_resumed_run_s_eta_leaves_out_the_stages_it_loads():
  """Stages a resumed run loads from its store take no time: counted as
  done with their estimates, they cut the scale to its floor and the time
  left of a 92 s distillation was printed as 14 s (a review's finding)."""
  lines = []
  est = {k: 10.0 for _, k in progress.STAGES}
  p = progress.Progress(est, write=lines.append)
  p.skip = frozenset(("calibrate", "class_sizes", "generate", "pool",
                      "query", "expert", "init"))
  for name in sorted(p.skip, key=p.names.index):
    p.start(name)
  p.start("distill")
  assert "20 s left" in lines[-1]  # distill and evaluate, unscaled
  p.t0 -= 30.0  # distillation took 30 s against 10 estimated
  p.start("evaluate")
  assert "30 s left" in lines[-1]  # evaluate, 3x


def test_plan_prints_the_estimate_of_a_known_dataset(capsys):
  assert cli.main(["plan", "--epsilon", "1"]) == 0  # digits
  out = capsys.readouterr().out
  assert "cost estimate" in out and "distillation" in out and "total" in out
  assert cli.main(["plan", "--dataset", "npz:x.npz"]) == 0
  assert "once the data is loaded" in capsys.readouterr().out
