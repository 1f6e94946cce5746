"""The `dpgeng` command: outputs, privacy report, and bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dpgeng_jax import cli, mechanisms
from dpgeng_jax.config import Config

TINY = ["--ipc", "2", "--steps", "3", "--num-queries", "2", "--eval-epochs",
        "1", "--eval-models", "2", "--extractor-width", "8", "--eval-width",
        "8", "--quiet"]


def _run(argv, capsys=None):
  # ndpdc unless the test names a method (argparse keeps the last one).
  return cli.main(["distill", "--method", "ndpdc", *argv])


def _mechanism(priv, name):
  return next(m for m in priv["mechanisms"] if m["name"] == name)


def _npz(path, **over):
  rng = np.random.default_rng(0)
  arrays = dict(
      x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
      y_train=np.arange(40) % 4,
      x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
      y_test=np.arange(12) % 4)
  arrays.update(over)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_help_lists_every_option_with_its_default():
  out = subprocess.run([sys.executable, "-m", "dpgeng_jax", "distill",
                        "--help"], capture_output=True, text=True, check=True,
                       env={**os.environ, "COLUMNS": "200"}).stdout
  for f in dataclasses.fields(Config):
    assert "--" + f.name.replace("_", "-") in out, f.name
  assert "(default: 1.0)" in out or "default: 1.0" in out


def test_deterministic_run_writes_all_outputs_and_says_not_private(tmp_path):
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--deterministic", "--epsilon", "5",
               *TINY]) == 0
  for name in ("distilled.npz", "privacy.json", "config.json", "grid.png",
               "metrics.json"):
    assert (out / name).exists(), name
  d = np.load(out / "distilled.npz")
  assert d["x"].shape == (20, 8, 8, 1) and d["x"].dtype == np.float32
  np.testing.assert_array_equal(d["y"], np.repeat(np.arange(10), 2))
  priv = json.loads((out / "privacy.json").read_text())
  assert priv["private"] is False
  assert any("NOT private" in n for n in priv["notes"])
  assert 0.98 * 5 <= priv["epsilon_pld"] <= 5
  fm = _mechanism(priv, "feature_matching")
  assert fm["steps"] == 2 and fm["sampling_rate"] == 0.5
  assert priv["epsilon_rdp"] is not None and priv["epsilon_gdp_clt"]
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["num_eval_models"] == 2
  assert 0 <= metrics["test_accuracy_mean"] <= 1
  assert metrics["test_accuracy_std"] >= 0
  config = json.loads((out / "config.json").read_text())
  for f in dataclasses.fields(Config):
    assert f.name in config
  # The test-mode "secret" key must not appear in any output either.
  words = np.asarray(jax.random.key_data(
      mechanisms.deterministic_secret_key(0))).astype(np.uint32)
  files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
  assert any("stages" in f for f in files)  # the saved stages too
  for name in files:
    with open(name, "rb") as fh:
      blob = fh.read()
    assert words.tobytes() not in blob, name
    assert str(int(words[0])) not in blob.decode("latin-1"), name
  # Same seed, same outputs (the whole run is a function of the seed here).
  out2 = tmp_path / "run2"
  assert _run(["--out", str(out2), "--deterministic", "--epsilon", "5",
               *TINY]) == 0
  np.testing.assert_array_equal(np.load(out2 / "distilled.npz")["x"],
                                d["x"])


def test_private_run_is_marked_private_and_differs_between_runs(tmp_path):
  xs = []
  for i in range(2):
    out = tmp_path / f"r{i}"
    assert _run(["--out", str(out), "--no-eval", *TINY]) == 0
    priv = json.loads((out / "privacy.json").read_text())
    assert priv["private"] is True and priv["epsilon_pld"] <= 1.0
    assert not (out / "metrics.json").exists()
    # The loss curve is drawn without metrics.json (it was lost).
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert "loss.png" in json.loads((out / "manifest.json").read_text())[
        "files"]
    xs.append(np.load(out / "distilled.npz")["x"])
  # Same public seed, fresh OS-entropy noise: the outputs differ.
  assert not np.array_equal(xs[0], xs[1])


def test_dm_is_marked_non_private_everywhere(tmp_path):
  out = tmp_path / "dm"
  assert _run(["--out", str(out), "--method", "dm", *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert priv["private"] is False and priv["epsilon_pld"] is None
  assert "NOT private" in priv["notes"][0]
  assert json.loads((out / "metrics.json").read_text())["private"] is False


BAD_FLAGS = [
    (["--epsilon", "0"], "epsilon"),
    (["--epsilon", "-1"], "epsilon"),
    (["--epsilon", "inf"], "epsilon"),
    (["--delta", "0"], "delta"),
    (["--delta", "1"], "delta"),
    (["--delta", "0.001"], "1/N"),
    (["--ipc", "0"], "ipc"),
    (["--sampling-rate", "0"], "sampling_rate"),
    (["--num-queries", "0"], "num_queries"),
    (["--dataset", "mnist_from_nowhere"], "unknown dataset spec"),
    (["--dataset", "npz:/nonexistent/file.npz"], "file.npz"),
    (["--lr-img", "nan"], "lr_img"),
    (["--lr-img", "inf"], "lr_img"),
    (["--lr-img", "-1"], "lr_img"),
    (["--expert", "--expert-lr", "nan"], "expert_lr"),
    (["--expert", "--expert-weight", "nan"], "expert_weight"),
    (["--clip-norm", "nan"], "clip_norm"),
    (["--clip-norm", "1e-30"], "exact fixed-point sum"),
    (["--expert", "--expert-clip-norm", "1e40"], "exact fixed-point sum"),
    (["--image-size", "5000"], "image_size must be 0 (as stored) or 2...1024"),
    # Hours of rendering, past the count release (a review's finding).
    (["--pe-lookahead", "101"], "pe_lookahead must be <= 100"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_options_fail_cleanly_and_write_nothing(tmp_path, capsys, flags,
                                                    message):
  out = tmp_path / "out"
  assert _run(["--out", str(out), *TINY, *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and _said(message) in err
  assert not out.exists()


def _said(message: str) -> str:
  """How the command says an expected message: a bare option name
  ('lr_img') or one in a sentence ('pe_k = ...') as its flag."""
  if "_" in message and message in {
      f.name for f in dataclasses.fields(Config)}:
    return cli._flag(message)  # pylint: disable=protected-access
  return cli.as_flags(message)


def _nan_x(n):
  x = np.random.default_rng(0).random((n, 8, 8)).astype(np.float32)
  x[3, 2, 2] = np.nan
  return x


BAD_DATA = [
    ({"x_train": _nan_x(40)}, "NaN"),
    ({"y_train": np.arange(40) % 4 + 0.5}, "integer"),
    ({"y_train": np.arange(39) % 4}, "length"),
    ({"y_train": np.r_[np.arange(39) % 4, -1]}, "negative"),
    ({"y_test": np.r_[np.arange(11) % 4, 7]}, "test"),
    ({"y_train": np.arange(40) % 4 * 2}, "no training examples"),
    ({"y_train": np.r_[np.arange(39) % 4, 20]}, "and 6 more"),
    ({"x_test": None}, "x_test"),
    ({"x_train": np.zeros((40, 8), np.uint8)}, "rank"),
]


@pytest.mark.parametrize("arrays,message", BAD_DATA)
def test_bad_data_fails_cleanly_and_writes_nothing(tmp_path, capsys, arrays,
                                                   message):
  spec = _npz(tmp_path / "d.npz", **arrays)
  out = tmp_path / "p1" / "p2" / "out"  # its parents are made, then removed
  assert _run(["--out", str(out), "--dataset", spec, "--delta", "1e-3",
               *TINY]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:")
  assert message.lower() in err.lower(), err
  assert not (tmp_path / "p1").exists()


def test_npz_dataset_runs_end_to_end(tmp_path):
  spec = _npz(tmp_path / "d.npz")
  out = tmp_path / "out"
  assert _run(["--out", str(out), "--dataset", spec, "--delta", "1e-3",
               "--deterministic", *TINY]) == 0
  d = np.load(out / "distilled.npz")
  assert d["x"].shape == (8, 8, 8, 1)


GEN_TINY = ["--pe-iterations", "1", "--pe-population", "4",
            "--generator-steps", "5", "--generator-features", "20",
            "--generated-per-class", "8", "--pool-models", "1",
            "--pool-checkpoints", "2", "--pool-epochs", "1",
            "--expert-steps", "3", "--expert"]


def test_no_skip_padding_reaches_the_expert_and_the_queries(tmp_path,
                                                           monkeypatch):
  """--no-skip-padding (a performance option: the same releases) is passed
  to the microbatching of both private passes that Poisson-sample, the
  queries' clipped class sums and the expert's DP-SGD step (without it,
  the default, both skip their chunks of padding only)."""
  from dpgeng_jax import clipping
  seen, real = [], clipping.microbatched

  def recording(fn, microbatch, *, skip_padding=True):
    seen.append((getattr(fn, "clip_norm", None) is not None, skip_padding))
    return real(fn, microbatch, skip_padding=skip_padding)
  monkeypatch.setattr(clipping, "microbatched", recording)
  flags = ["--method", "dpgeng", "--generator", "merf", "--deterministic",
           "--no-eval", *GEN_TINY, *TINY]
  assert not Config().no_skip_padding
  assert _run(["--out", str(tmp_path / "run"), *flags,
               "--no-skip-padding"]) == 0
  # pergrad's grad-sum function carries its clip norm, the queries' class
  # sums do not: both passes were built, each with the flag.
  assert set(seen) == {(True, False), (False, False)}, seen


def test_dpgeng_with_merf_generator_and_factor_two(tmp_path):
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "dpgeng", "--factor", "2",
               "--generator", "merf", "--deterministic", "--epsilon", "4",
               "--extractors", "generated", *GEN_TINY, *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  names = [m["name"] for m in priv["mechanisms"]]
  assert names == ["class_counts", "generator", "feature_matching", "expert"]
  assert 0.98 * 4 <= priv["epsilon_pld"] <= 4
  expert = _mechanism(priv, "expert")
  assert expert["steps"] == 3
  assert expert["sampling_rate"] == Config().expert_sampling_rate
  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics["expert"]) >= {"test_accuracy_pretrained_on_generated",
                                    "test_accuracy_after_dp_finetuning"}
  assert any("release's noisy class counts refine" in n
             for n in priv["notes"])
  d = np.load(out / "distilled.npz")
  assert int(d["factor"]) == 2
  assert d["x"].shape == (20, 8, 8, 1)          # stored: IPC 2 per class
  assert d["x_decoded"].shape == (80, 8, 8, 1)  # 4 tiles each
  assert (out / "generated_grid.png").exists()
  config = json.loads((out / "config.json").read_text())
  assert config["resolved"]["init"] == "generated"
  assert config["resolved"]["extractors"] == "generated"  # as asked


@pytest.mark.parametrize("flags", [[], ["--expert", "--no-expert"]])
def test_the_expert_is_off_by_default_and_no_expert_still_reads(tmp_path,
                                                                flags):
  assert Config().expert is False
  out = tmp_path / "run"
  no_flag = [a for a in GEN_TINY if a != "--expert"]
  assert _run(["--out", str(out), "--method", "dpgeng", *flags,
               "--no-eval", "--deterministic", *no_flag, *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert [m["name"] for m in priv["mechanisms"]] == [
      "class_counts", "generator", "feature_matching"]
  config = json.loads((out / "config.json").read_text())
  assert config["expert"] is False
  assert config["resolved"]["extractors"] == "random"  # the default


def test_generator_only_baseline_spends_budget_on_generation_only(tmp_path):
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "generator",
               "--deterministic", *GEN_TINY, *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert [m["name"] for m in priv["mechanisms"]] == ["class_counts",
                                                     "generator"]
  assert np.load(out / "distilled.npz")["x"].shape == (20, 8, 8, 1)


def _gen_npz(tmp_path):
  """External generated data, 41 images: 5 of class 0, 4 of the others
  (any class sizes are allowed; the generated grid once assumed equal)."""
  rng = np.random.default_rng(1)
  return "npz:" + _save_npz(tmp_path / "gen.npz",
                            x=rng.random((41, 8, 8, 1)).astype(np.float32),
                            y=np.arange(41) % 10)


def _save_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_external_generated_data_without_guarantee_is_not_private(
    tmp_path, capsys):
  out = tmp_path / "run"
  gen = _gen_npz(tmp_path)
  assert _run(["--out", str(out), "--method", "dpgeng", "--generator",
               gen, "--no-eval", *GEN_TINY, *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  assert priv["private"] is False
  assert "no declared guarantee" in priv["notes"][0]
  assert any("no declared guarantee" in r
             for r in priv["not_private_because"])
  # The console says so where it gives the accounted figure, and gives
  # no "guarantee" (the figure covers the accounted mechanisms only).
  said = capsys.readouterr().out
  line = next(s for s in said.splitlines() if s.startswith("privacy:"))
  assert line.startswith("privacy: NOT PRIVATE (external generated data "
                         "came with no declared guarantee); its accounted "
                         "mechanisms alone: epsilon"), line
  assert cli.main(["plan", "--method", "dpgeng", "--generator", gen]) == 0
  said = capsys.readouterr().out
  line = next(s for s in said.splitlines() if s.startswith("guarantee:"))
  assert line.startswith("guarantee: NONE, the run would not be private "
                         "(external generated data came with no declared "
                         "guarantee); its accounted mechanisms alone: "
                         "epsilon"), line
  assert cli.main(["plan", "--method", "dpgeng"]) == 0
  said = capsys.readouterr().out
  assert "\nguarantee: epsilon " in said


DECLARED = [
    ["--generated-epsilon", "0.5", "--generated-delta", "1e-6"],
    ["--generated-mu", "0.5"],
    ["--generated-noise-multiplier", "3.0"],
]


def _check_composed(priv, declared):
  assert priv["private"] is True
  assert 0.98 * 2 <= priv["epsilon_pld"] <= 2
  if "--generated-epsilon" in declared:
    assert priv["external_generated_data"] == {"epsilon": 0.5,
                                               "delta": 1e-6}
  else:  # a declared Gaussian: its unit is the declaration, not C
    assert _mechanism(priv, "external_generator")["l2_sensitivity"] == (
        "declared")


def test_external_generated_guarantee_is_composed_into_the_budget(tmp_path):
  """A whole run with a declared (epsilon, delta); the other declarations
  through the plan (the run's report comes from the same accounting)."""
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "dpgeng", "--generator",
               _gen_npz(tmp_path), "--no-eval", "--epsilon", "2",
               *DECLARED[0], *GEN_TINY, *TINY]) == 0
  _check_composed(json.loads((out / "privacy.json").read_text()),
                  DECLARED[0])
  for declared in DECLARED:
    args = cli.build_parser().parse_args(
        ["plan", "--method", "dpgeng", "--generator", _gen_npz(tmp_path),
         "--epsilon", "2", *declared])
    from dpgeng_jax import pipeline  # pylint: disable=import-outside-toplevel
    _check_composed(pipeline.plan_budget(cli.config_from_args(args)),
                    declared)


def test_external_guarantee_larger_than_target_is_refused(tmp_path, capsys):
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "dpgeng", "--generator",
               _gen_npz(tmp_path), "--epsilon", "1", "--generated-epsilon",
               "2", *GEN_TINY, *TINY]) == 2
  assert "leaves no budget" in capsys.readouterr().err
  assert not out.exists()


def test_default_method_is_dpgeng_without_the_expert(capsys):
  assert Config().method == "dpgeng"
  assert cli.main(["plan", "--epsilon", "1"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("mechanism"))
  end = next(i for i, l in enumerate(lines) if l.startswith("composed"))
  assert [l.split()[0] for l in lines[start + 1:end]] == [
      "class_counts", "generator", "feature_matching"]


def test_plan_reads_no_data_and_prints_the_allocation(monkeypatch, capsys):
  from dpgeng_jax import data as data_lib

  def no_data(*a, **k):
    raise AssertionError("plan must not read any dataset")

  monkeypatch.setattr(data_lib, "load_dataset", no_data)
  assert cli.main(["plan", "--method", "dpgeng", "--epsilon", "2",
                   "--dataset", "npz:/does/not/exist.npz", "--num-queries",
                   "5", "--expert-steps", "10", "--expert"]) == 0
  out = capsys.readouterr().out
  for name in ("generator", "feature_matching", "expert"):
    assert name in out
  pld_line = next(l for l in out.splitlines() if "composed pld" in l)
  assert 0.98 * 2 <= float(pld_line.split()[-1]) <= 2
  assert "not used" not in out
  assert "note: --dataset npz:/does/not/exist.npz: no such file here" in out


def test_plan_notes_input_files_that_exist_only_when_they_do_not(
    tmp_path, capsys):
  real = tmp_path / "g.npz"
  real.write_bytes(b"")
  for gen, missing in ((f"pe:nearest:{real}", False),
                       (f"pe:nearest:{tmp_path}/none.npz", True),
                       (f"npz:{tmp_path}/none.npz", True)):
    assert cli.main(["plan", "--epsilon", "2", "--generator", gen]) == 0
    out = capsys.readouterr().out
    assert ("no such file" in out) == missing, out
  assert cli.main(["plan", "--epsilon", "2", "--pe-font-dir",
                   str(tmp_path / "fonts")]) == 0
  assert "fonts: no such directory here" in capsys.readouterr().out


def test_plan_refuses_an_image_size_that_distill_refuses(capsys):
  """plan --image-size 5000 rendered text samples at 5000 px for minutes."""
  assert cli.main(["plan", "--image-size", "5000"]) == 2
  assert "--image-size must be 0 (as stored) or 2...1024" in (
      capsys.readouterr().err)


@pytest.mark.parametrize("spec", ["foo", "npz:", "tfds:a:b:c:d"])
def test_plan_refuses_a_dataset_spec_distill_would_refuse(capsys, spec):
  assert cli.main(["plan", "--dataset", spec]) == 2
  assert "spec" in capsys.readouterr().err.split("error:")[1]


def test_plan_names_the_options_a_method_does_not_read(capsys):
  assert cli.main(["plan", "--method", "ndpdc", "--generator", "merf",
                   "--expert", "--epsilon", "2"]) == 0
  out = capsys.readouterr().out
  assert "note: --generator not used: method ndpdc uses no generated" in out
  assert "note: --expert not used: the expert runs with method dpgeng" in out


def test_too_few_generated_images_for_kmeans_fail_before_private_work(
    tmp_path, capsys, monkeypatch):
  from dpgeng_jax.generators import merf, pe

  def no_release(*a, **k):
    raise AssertionError("the private release must not run")

  monkeypatch.setattr(merf, "release_class_features", no_release)
  monkeypatch.setattr(pe, "release_histogram", no_release)
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "dpgeng", "--ipc", "3",
               "--generated-per-class", "2", "--quiet"]) == 2
  assert "k-means initialisation needs >= 3" in capsys.readouterr().err
  assert not out.exists()
  # External data (4 per class): --generated-per-class cannot help there.
  assert _run(["--out", str(out), "--method", "dpgeng", "--ipc", "5",
               "--generator", _gen_npz(tmp_path), "--generated-epsilon",
               "0.1", "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "holds too few: add images or lower --ipc" in err
  assert "--generated-per-class" not in err


# ---------------------------------------------------------------------------
# Private Evolution through the command line and from Python.


@pytest.mark.parametrize("votes,steps", [
    ([], 3), (["--pe-k", "3", "--pe-vote-tau", "0.5"], 3),
    (["--pe-warm-start", "2", "--pe-warm-weight", "4", "--pe-start-degree",
      "0.5"], 3 + 4),
    (["--pe-warm-start", "2", "--pe-warm-weight", "4", "--pe-iterations",
      "0", "--generated-per-class", "4"], 4)])
def test_pe_text_run_writes_the_iterations_and_accounts_t_releases(
    tmp_path, votes, steps):
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "generator", "--generator",
               "pe:text", "--deterministic", *GEN_TINY, "--pe-iterations",
               "3", *votes, *TINY]) == 0
  priv = json.loads((out / "privacy.json").read_text())
  gen = _mechanism(priv, "generator")
  assert gen["steps"] == steps and gen["sampling_rate"] == 1.0
  assert gen["l2_sensitivity"] == "1"
  t = int(votes[votes.index("--pe-iterations") + 1]) if (
      "--pe-iterations" in votes) else 3
  from PIL import Image
  img = Image.open(out / "generator_iterations.png")
  if t:
    assert img.size[0] > 3 * img.size[1] // 2  # 4 populations side by side
  saved = np.load(out / "stages" / "generate" / "arrays.npz")
  assert saved["noisy_histograms"].shape == (t, 10, 4)
  assert saved["history"].shape[:2] == (t + 1, 10)
  warm = "--pe-warm-start" in votes
  assert ("warm_release" in saved) == warm
  if warm:  # class sums of 500 cos + 500 sin features and the constant
    assert saved["warm_release"].shape == (1, 10, 1001)
  assert any(n.startswith("PE's warm start") and "/ sqrt(4)" in n
             and f"4 of the generator's {t + 4}" in n
             for n in priv["notes"]) == warm
  config = json.loads((out / "config.json").read_text())
  assert config["resolved"]["generator"] == "pe:text"


def test_pe_nearest_runs_on_a_public_collection(tmp_path):
  rng = np.random.default_rng(3)
  path = _save_npz(tmp_path / "public.npz",
                   x=rng.random((60, 8, 8, 1)).astype(np.float32),
                   y=np.arange(60) % 10)
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "generator", "--generator",
               f"pe:nearest:{path}", "--deterministic", *GEN_TINY,
               *TINY]) == 0
  x = np.load(out / "distilled.npz")["x"]
  with np.load(path) as f:  # every generated image is a collection image
    pool = f["x"].reshape(60, -1)
  for img in x.reshape(len(x), -1):
    assert np.min(np.abs(pool - img).max(1)) < 1e-6
  notes = json.loads((out / "privacy.json").read_text())["notes"]
  assert any(f"collection {path}, assumed public" in n for n in notes)


@pytest.mark.parametrize("flags,message", [
    (["--generator", "pe:nearest:/no/such.npz"], "cannot read public"),
    (["--generator", "pe:magic"], "generator must be one of"),
    (["--generator", "pe:text", "--pe-texts", "a,b"], "class texts"),
    (["--generator", "pe:text", "--pe-k", "9", "--pe-population", "4"],
     "pe_k"),
    (["--generator", "pe:text", "--pe-vote-tau", "-1"], "pe_vote_tau"),
    (["--generator", "pe:text", "--pe-vote-tau", "inf"], "pe_vote_tau"),
    (["--generator", "pe:text", "--pe-vote-tau", "0.5", "--pe-k", "5000",
      "--pe-population", "5000"], "soft votes"),
    (["--generator", "pe:text", "--pe-warm-start", "-1"], "pe_warm_start"),
    (["--generator", "pe:text", "--pe-warm-start", "2", "--pe-warm-weight",
      "0"], "pe_warm_weight"),
    (["--generator", "pe:text", "--pe-warm-start", "2", "--pe-public-only"],
     "public-only"),
    (["--generator", "pe:text", "--pe-iterations", "0"], "pe_iterations"),
    (["--generator", "pe:text", "--pe-iterations", "0", "--pe-warm-start",
      "2", "--pe-population", "3"], "pe_population >= 8"),
    (["--generator", "pe:text", "--pe-start-degree", "0"], "pe_start_degree"),
    (["--generator", "pe:text", "--pe-start-degree", "1.5"],
     "pe_start_degree"),
    (["--generator", "pe:text", "--pe-start-degree", "nan"],
     "pe_start_degree"),
    (["--generator", "pe:text", "--pe-marks", "-1"], "pe_marks"),
    (["--generator", "pe:text", "--pe-marks", "1000000"], "pe_marks"),
    (["--generator", "pe:text", "--pe-font-dir", "/no/fonts"],
     "font directory")])
def test_bad_pe_options_fail_cleanly(tmp_path, capsys, flags, message):
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--method", "generator", *GEN_TINY,
               *TINY, *flags]) == 2
  assert _said(message) in capsys.readouterr().err
  assert not (out / "manifest.json").exists()


def test_a_user_image_api_from_python(tmp_path):
  """A toy user API (uniform noise images; variation blends in fresh noise
  by the degree) through `run(..., generator=PrivateEvolution(api))`."""
  import jax
  from dpgeng_jax import pipeline
  from dpgeng_jax.generators import apis, pe
  calls = {"random": 0, "variation": 0}
  asked = []

  def random_fn(key, labels):
    calls["random"] += 1
    asked.append(len(labels))
    return np.asarray(jax.random.uniform(key, (len(labels), 8, 8, 1)))

  def variation_fn(key, images, labels, degree):
    calls["variation"] += 1
    w = 0.5 * degree
    return (1 - w) * images + w * np.asarray(jax.random.uniform(
        key, images.shape))

  gen = pe.PrivateEvolution(apis.FunctionAPI(random_fn, variation_fn,
                                             (8, 8, 1)),
                            pe.PEConfig(iterations=2, population=4))
  cfg = Config(method="generator", ipc=2, eval_epochs=1, eval_models=1,
               eval_width=8, extractor_width=8, generated_per_class=8,
               deterministic=True, quiet=True)
  result = pipeline.run(cfg, generator=gen)
  # One image per class checked before any release, then the population.
  assert calls == {"random": 2, "variation": 2} and asked == [10, 40]
  assert result.config["resolved"]["generator"] == "pe:user"
  assert _mechanism(result.privacy, "generator")["steps"] == 2
  # config.json said pe_iterations 10 (the configuration's, unused).
  given = result.config["generator_given"]
  assert given["name"] == "pe:user" and given["options"]["iterations"] == 2
  assert pipeline.run(cfg).config["generator_given"] is None
  assert result.x.shape == (20, 8, 8, 1)


@pytest.mark.parametrize("error,rc,message", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (cli.Terminated(), 143, "terminated (SIGTERM)"),
    (OSError(28, "No space left on device", "/x/out/.dpgeng-staging/f"), 1,
     "No space left on device: '/x/out/.dpgeng-staging/f'")])
@pytest.mark.parametrize("saved", [True, False])
def test_interrupts_and_os_errors_end_with_a_line_that_says_how_to_resume(
    tmp_path, capsys, monkeypatch, error, rc, message, saved):
  """The --resume line where the run left saved stages (its staging
  folder); where none had finished (stopped while loading or compiling)
  it said the stages were saved and gave a --resume that then failed."""
  from dpgeng_jax import outputs
  out = tmp_path / "out"
  def fail(cfg, console):
    if saved:
      os.makedirs(out / outputs.STAGING)
    raise error
  monkeypatch.setattr(cli, "_distill", fail)
  assert _run(["--out", str(out), *TINY]) == rc
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert (f"dpgeng distill --resume {out}" in err) == saved
  assert ("no stage had finished: nothing to resume" in err) == (not saved)


def test_errors_name_options_as_flags_and_leave_paths_and_values_alone():
  """Messages named some options by their field (pe_k, checkpoint_every)
  and others by their flag (a sweep's finding); the command says flags.
  A path or value holding such a name is not rewritten (`--out clip_norm`
  became `--resume --clip-norm` in a first version)."""
  assert cli.as_flags("pe_k = 50 votes per example need pe_population >= "
                      "50") == ("--pe-k = 50 votes per example need "
                                "--pe-population >= 50")
  assert cli.as_flags("checkpoint_every must be >= 0, got -1; num_queries "
                      "(saved 2, now 3)") == (
                          "--checkpoint-every must be >= 0, got -1; "
                          "--num-queries (saved 2, now 3)")
  for untouched in ("continue it with --resume clip_norm, or",
                    "npz:/x/my data_dir.npz is missing",
                    "'clip_norm' must be a folder", "the train_hmac",
                    "--share-counts must"):
    assert cli.as_flags(untouched) == untouched


@pytest.mark.parametrize("command", ["report", "audit"])
def test_an_os_error_in_report_or_audit_is_one_line_with_status_2(
    tmp_path, capsys, monkeypatch, command):
  """A full disk or a permission error after an audit's or a report's
  work: one line naming the file, status 2 as for bad input (the audit
  keeps status 1 for its failed verdict), no traceback."""
  from dpgeng_jax import report
  def full(*a, **k):
    raise OSError(28, "No space left on device", "/x/out/report.html")
  monkeypatch.setattr(report, "rebuild", full)
  monkeypatch.setattr(cli, "_audit", full)
  argv = ["report", str(tmp_path)] if command == "report" else [
      "audit", "--out", str(tmp_path / "a")]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.strip() == ("dpgeng: error: No space left on device: "
                         "'/x/out/report.html'")


def test_a_crash_before_any_stage_finished_leaves_no_unfinished_run(
    tmp_path, capsys, monkeypatch):
  """An error that is not the tool's own (here an OverflowError) raised
  before any stage was saved discarded nothing: the next run in that
  --out was refused as an unfinished run that no --resume could finish."""
  from dpgeng_jax import outputs, pipeline
  def crash(*a, **k):  # after the stage record is written
    raise OverflowError("boom")
  monkeypatch.setattr(pipeline.stages, "calibrate", crash)
  out = tmp_path / "out"
  with pytest.raises(OverflowError):
    cli.main(["distill", "--out", str(out), *TINY])
  assert not (out / outputs.STAGING).exists()
  monkeypatch.undo()
  assert cli.main(["distill", "--out", str(out), *TINY]) == 0


def test_ctrl_c_in_plan_is_one_line_not_a_traceback(monkeypatch, capsys):
  def interrupted(cfg):
    raise KeyboardInterrupt
  monkeypatch.setattr(cli, "_plan", interrupted)
  assert cli.main(["plan", "--epsilon", "1"]) == 130
  assert capsys.readouterr().err.strip() == "dpgeng: interrupted"


@pytest.mark.parametrize("signum,rc,message", [
    (signal.SIGTERM, 143, "dpgeng: terminated (SIGTERM)"),
    (signal.SIGINT, 130, "dpgeng: interrupted")])
def test_a_signal_stops_the_command_with_the_resume_line_and_its_status(
    tmp_path, signum, rc, message):
  """A real SIGTERM (a scheduler's stop) or SIGINT (Ctrl-C) to `dpgeng
  distill` while it runs: the resume line, status 143 or 130, no
  traceback; the process ends through entry_point's os._exit (a normal
  teardown after an interrupt crashed with status 139 in half the tries)."""
  out = tmp_path / "out"
  # SIGINT as a terminal's foreground command gets it: a runner that
  # ignores SIGINT (a background job of a script) passes SIG_IGN on, and
  # Python then keeps ignoring it, as it should for such a job.
  proc = subprocess.Popen(
      [sys.executable, "-m", "dpgeng_jax", "distill", "--out", str(out),
       "--method", "ndpdc", *TINY, "--steps", "100000"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  state = out / ".dpgeng-staging" / "stages" / "state.json"

  def saved():  # the count release is saved (the record written whole)
    try:
      return "class_sizes" in json.loads(state.read_text())["finished"]
    except (OSError, ValueError, KeyError):
      return False
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None and not saved():
    time.sleep(0.05)
  time.sleep(0.5)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == rc, err[-2000:]
  assert message in err, err[-2000:]
  assert f"dpgeng distill --resume {out}" in err
  assert "Traceback" not in err


def test_input_paths_are_recorded_absolute_so_a_run_resumes_from_anywhere(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  args = cli.build_parser().parse_args(
      ["distill", "--dataset", "npz:data/d.npz", "--generator",
       "pe:nearest:pub.npz", "--pe-font-dir", "fonts", "--out", "o"])
  cfg = cli.config_from_args(args, [])
  assert cfg.dataset == f"npz:{tmp_path}/data/d.npz"
  assert cfg.generator == f"pe:nearest:{tmp_path}/pub.npz"
  assert cfg.pe_font_dir == f"{tmp_path}/fonts"
  same = cli.absolute_paths({"dataset": "digits", "generator": "pe:text",
                             "data_dir": ""})
  assert same == {"dataset": "digits", "generator": "pe:text", "data_dir": ""}
  # npz:~/x.npz: the shell expands no ~ inside a spec; looked up as ./~.
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  home = cli.absolute_paths({"dataset": "npz:~/x.npz", "out": "~/o",
                             "tensorboard": "tb"})
  assert home["dataset"] == f"npz:{tmp_path}/home/x.npz"
  assert home["out"] == f"{tmp_path}/home/o"
  # A relative --tensorboard went to the resuming process's working
  # directory (a review's finding): recorded absolute like the inputs.
  assert home["tensorboard"] == f"{tmp_path}/tb"


def test_a_train_only_dataset_runs_with_no_eval_and_is_refused_without(
    tmp_path, capsys):
  """An npz with no test split (x_test and y_test left out) is enough for
  a run that does not evaluate, the expert's information-only accuracies
  included; a run that evaluates refuses it before writing anything."""
  spec = _npz(tmp_path / "train_only.npz", x_test=None, y_test=None)
  out = tmp_path / "run"
  assert _run(["--out", str(out), "--dataset", spec, "--method", "dpgeng",
               "--no-eval", "--epsilon", "4", *GEN_TINY, *TINY]) == 0
  assert (out / "distilled.npz").exists()
  assert not (out / "metrics.json").exists()
  capsys.readouterr()
  refused = tmp_path / "refused"
  assert _run(["--out", str(refused), "--dataset", spec, *TINY]) == 2
  err = capsys.readouterr().err
  assert "x_test" in err and "--no-eval" in err
  assert not refused.exists()


def test_a_distillation_loss_that_overflows_is_reported(tmp_path):
  """A clip norm of 1e30 makes the noisy targets ~1e30 and every squared
  distance inf in float32: the run finishes but warns (it was silent)."""
  with pytest.warns(RuntimeWarning, match="not finite at 3 of 3 steps"):
    assert _run(["--out", str(tmp_path / "run"), "--clip-norm", "1e30",
                 "--no-eval", *TINY]) == 0


def test_non_finite_distilled_images_are_refused_not_published(tmp_path,
                                                              capsys):
  """An expert trained at --expert-lr 1e30 made every distilled pixel
  nan; the run published them with status 0 and a warning that named
  other options. It is refused, naming the expert's, and leaves nothing
  to resume (the saved stages would distil the same way)."""
  out = tmp_path / "run"
  with pytest.warns(RuntimeWarning, match="--expert-lr 1e"):
    assert cli.main(["distill", "--out", str(out), "--generator", "merf",
                     "--expert-lr", "1e30", "--no-eval", *GEN_TINY,
                     *TINY]) == 2
  err = capsys.readouterr().err
  assert "the distilled images are not finite" in err
  assert "--expert-lr 1e+30" in err and "Traceback" not in err
  assert not out.exists()


def test_a_library_run_on_a_train_only_dataset_that_evaluates_is_refused_first():
  """A Dataset with an empty test split given to pipeline.run without
  no_eval crashed in the evaluation, after every release was drawn; it is
  now refused before any private stage."""
  from dpgeng_jax import data, pipeline
  from dpgeng_jax.errors import ConfigError
  rng = np.random.default_rng(0)
  ds = data.from_arrays(rng.random((40, 8, 8, 1)).astype(np.float32),
                        np.arange(40) % 4, None, None, require_test=False)
  cfg = Config(method="ndpdc", ipc=2, steps=3, num_queries=2,
               extractor_width=8, eval_width=8, quiet=True)
  calls = []
  real = pipeline.stages.class_sizes
  pipeline.stages.class_sizes = lambda *a: calls.append(a) or real(*a)
  try:
    with pytest.raises(ConfigError, match="no test split"):
      pipeline.run(cfg, dataset=ds, log=None)
  finally:
    pipeline.stages.class_sizes = real
  assert not calls  # refused before the count release
  pipeline.run(dataclasses.replace(cfg, no_eval=True), dataset=ds, log=None)


def test_the_packages_warnings_print_as_one_line_on_the_console():
  # The default format printed a line of dpgeng_jax's source under each.
  import warnings
  from dpgeng_jax import data
  line = cli._format_warning("x is uint8", UserWarning, data.__file__, 360)
  assert line == "dpgeng: warning: x is uint8\n"
  other = cli._format_warning("elsewhere", UserWarning, "/x/site.py", 3)
  assert other == warnings.formatwarning("elsewhere", UserWarning,
                                         "/x/site.py", 3)



def test_plan_prints_a_tiny_epsilon_with_its_digits(capsys):
  """Epsilons below 0.01 print to 4 significant digits: a target of 2e-5
  was shown as 'guarantee: epsilon 0.0000'."""
  assert cli.main(["plan", "--epsilon", "2e-5", "--method", "ndpdc"]) == 0
  out = capsys.readouterr().out
  line = next(x for x in out.splitlines() if x.startswith("guarantee:"))
  got = float(line.split()[2])
  assert 0.995 * 2e-5 <= got <= 2e-5, line
  pld = next(x for x in out.splitlines() if x.startswith("composed pld"))
  assert float(pld.split()[2]) == pytest.approx(got, rel=1e-3), pld


def test_the_real_subset_reference_says_how_many_images_each_class_had(
    tmp_path):
  """A class smaller than IPC gives all its images to the (non-private)
  random real subset; metrics.json says so instead of silently using
  fewer."""
  rng = np.random.default_rng(0)
  y = np.r_[np.zeros(30, int), np.ones(2, int)]
  data = tmp_path / "d.npz"
  np.savez(data, x_train=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8),
           y_train=y, x_test=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8),
           y_test=np.arange(6) % 2)
  out = tmp_path / "run"
  assert _run(["--dataset", f"npz:{data}", "--out", str(out), "--delta",
               "1e-3", "--references", *TINY, "--ipc", "3"]) == 0
  ref = json.loads((out / "metrics.json").read_text())[
      "reference_random_real_subset"]
  assert ref["images_per_class"] == [3, 2]


@pytest.mark.parametrize("signum,raised", [
    (signal.SIGTERM, cli.Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_stop_signal_lost_in_an_ignored_callback_is_delivered_again(
    monkeypatch, signum, raised):
  """Raised inside XLA's garbage-collection callback, whose exceptions
  Python only prints ('Exception ignored ... Traceback'), the Terminated
  or KeyboardInterrupt was lost and the run went on: the handler sends the
  signal again a second later unless the command caught it, and the hook
  prints nothing for it."""
  got = []
  old = signal.signal(signum, lambda s, f: got.append(s))
  try:
    with pytest.raises(raised) as e:
      cli._on_stop(signum, None)  # lost: nobody catches it
    assert isinstance(e.value, cli.Terminated) == (signum == signal.SIGTERM)
    deadline = time.time() + 10
    while not got and time.time() < deadline:
      time.sleep(0.05)
    assert got == [signum]
    with pytest.raises(raised):
      cli._on_stop(signum, None)
    cli._stop_redelivery()  # caught by the command: no second signal
    time.sleep(1.5)
    assert got == [signum]
  finally:
    signal.signal(signum, old)
  printed = []
  monkeypatch.setattr(sys, "__unraisablehook__", printed.append)
  info = type("U", (), {"exc_value": raised()})()
  cli._unraisable(info)
  other = type("U", (), {"exc_value": ValueError("x")})()
  cli._unraisable(other)
  assert printed == [other]


LOST_IN_A_CALLBACK = """
import gc, os, signal, sys, time
from dpgeng_jax import cli
cli._install_stop_handlers()
fired = []
def callback(phase, info):  # as XLA's gc callback: its exceptions are lost
  if phase == "start" and not fired:
    fired.append(1)
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100000):  # the handler runs in here
      pass
gc.callbacks.append(callback)
try:
  gc.collect()
  start = time.time()
  while time.time() - start < 20:
    time.sleep(0.01)
  print("went on")
except KeyboardInterrupt:
  print("stopped", round(time.time() - start, 1))
"""


def test_a_ctrl_c_lost_in_a_garbage_collection_callback_still_stops():
  """The console command's handlers in a real process: a SIGINT whose
  KeyboardInterrupt is raised inside a gc callback (and so only printed as
  'Exception ignored') is delivered again and stops the program; with
  Python's own handler the program went on (the signal test above met
  this with XLA's callback, the run then ran to its end)."""
  proc = subprocess.run(
      [sys.executable, "-c", LOST_IN_A_CALLBACK], capture_output=True,
      text=True, timeout=120,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert proc.stdout.startswith("stopped"), (proc.stdout, proc.stderr)
  assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in (
      proc.stderr), proc.stderr
