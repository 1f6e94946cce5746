"""The noise a whole run draws is the noise its privacy report accounts.

The function-level tests pin each release to `noise.add_gaussian_noise`
with the stddev it is handed; these pin what the stages hand it. A run in
--deterministic mode is made with a spy on the sampler that records the
stddev (and scale) of every Gaussian draw, and the SET of those stddevs
must be {noise_multiplier x L2 sensitivity} of the mechanisms listed in
its privacy.json: a stage that passed sigma / 2 (or sigma with another
mechanism's C) would release with twice the epsilon reported.
"""

import json

import jax
import numpy as np
import pytest

from dpgeng_jax import cli, noise

TINY = ["--ipc", "2", "--steps", "3", "--num-queries", "2", "--no-eval",
        "--extractor-width", "8", "--eval-width", "8", "--quiet"]
GEN_TINY = ["--pe-iterations", "2", "--pe-population", "4",
            "--generator-steps", "5", "--generator-features", "20",
            "--generated-per-class", "8", "--pool-models", "1",
            "--pool-checkpoints", "2", "--pool-epochs", "1",
            "--expert-steps", "3"]
# C of the queries and of the expert set apart from each other and from
# 1 (the counts' and the generators' sensitivity), so that a release
# calibrated with another mechanism's sensitivity shows too.
CLIPS = ["--clip-norm", "2", "--expert-clip-norm", "0.5"]


@pytest.fixture
def drawn(monkeypatch):
  """A list that fills with (stddev, scale) per Gaussian draw of the
  releases: recorded when the draw is traced (the stddev of every release
  is a static number) or, were it traced, when it runs. The compiled
  functions are dropped before and after, so that every release is
  traced again through the spy, and none keeps it afterwards."""
  seen = []
  real = noise.add_gaussian_noise

  def record(stddev, scale):
    seen.append((float(np.asarray(stddev)),
                 None if scale is None else float(np.asarray(scale))))

  def spy(key, value, stddev, scale=None):
    if any(isinstance(v, jax.core.Tracer) for v in (stddev, scale)):
      jax.debug.callback(record, stddev, scale)
    else:
      record(stddev, scale)
    return real(key, value, stddev, scale)

  # Every release calls noise.add_gaussian_noise (through the module, so
  # a release that called another name would be missing from the set).
  monkeypatch.setattr(noise, "add_gaussian_noise", spy)
  jax.clear_caches()
  yield seen
  jax.clear_caches()


def _accounted_stddevs(out):
  """{name: noise_multiplier x L2 sensitivity} of the run's mechanisms,
  from its privacy.json (C from its config.json)."""
  priv = json.loads((out / "privacy.json").read_text())
  config = json.loads((out / "config.json").read_text())
  clip = {"feature_matching": config["clip_norm"],
          "expert": config["expert_clip_norm"]}
  assert priv["clip_norm"] == config["clip_norm"]
  want = {}
  for m in priv["mechanisms"]:
    sens = 1.0 if m["l2_sensitivity"] == "1" else clip[m["name"]]
    assert m["l2_sensitivity"] in ("1", "C"), m
    assert m["noise_multiplier"] > 0, m
    want[m["name"]] = m["noise_multiplier"] * sens
  return want


@pytest.mark.parametrize("flags,names", [
    (["--method", "dpgeng", "--generator", "merf", "--expert"],
     ["class_counts", "generator", "feature_matching", "expert"]),
    (["--method", "generator", "--generator", "pe:text"],
     ["class_counts", "generator"]),
], ids=["dpgeng-merf-expert", "pe-text"])
def test_every_noise_draw_of_a_run_is_its_reported_multiplier_times_c(
    tmp_path, drawn, flags, names):
  out = tmp_path / "run"
  assert cli.main(["distill", "--out", str(out), "--deterministic",
                   "--epsilon", "4", *GEN_TINY, *TINY, *CLIPS,
                   *flags]) == 0
  want = _accounted_stddevs(out)
  assert list(want) == names
  # Distinct values, so that each release is told apart by its stddev.
  assert len({round(v, 9) for v in want.values()}) == len(want), want
  stddevs = sorted({round(s, 9) for s, _ in drawn})
  assert stddevs == pytest.approx(sorted(round(v, 9)
                                         for v in want.values()),
                                  rel=1e-9), (stddevs, want)
  # Every draw's scale is a unit of integer sums or counts: positive.
  assert all(s is not None and s > 0 for _, s in drawn), drawn
