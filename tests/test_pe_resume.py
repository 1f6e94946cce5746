"""A run killed or failing part-way through Private Evolution resumes from
the noisy histograms it had drawn (store.save_partial): none is drawn
twice, though an image API saw what each selected, and the resumed run
ends as an uninterrupted one."""

import json
import os

import numpy as np
import pytest

from dpgeng_jax import cli, outputs, store
from dpgeng_jax.generators import pe
from dpgeng_jax.generators.apis import text

ITERATIONS = 3
FLAGS = ["--method", "generator", "--ipc", "1", "--no-eval",
         "--pe-iterations", str(ITERATIONS), "--pe-population", "4",
         "--generated-per-class", "4", "--pool-models", "1",
         "--pool-checkpoints", "1", "--pool-epochs", "1",
         "--extractor-width", "8", "--deterministic", "--quiet"]


class Killed(BaseException):
  """Stands for SIGKILL in-process: no `except Exception` sees it."""


@pytest.fixture
def releases(monkeypatch):
  """Counts PE's histogram releases (over every process of a run)."""
  seen = []
  monkeypatch.setattr(pe, "release_histogram", _counter(seen))
  return seen


def _fail_at_variation(monkeypatch, nth: int, error: BaseException):
  """The text API's nth variation call raises `error` (after the
  iteration's release: the API is what sees the selection)."""
  real, calls = text.TextAPI.variation, [0]

  def variation(self, *a, **k):
    calls[0] += 1
    if calls[0] == nth:
      raise error
    return real(self, *a, **k)
  monkeypatch.setattr(text.TextAPI, "variation", variation)


def _published(out):
  priv = json.loads((out / "privacy.json").read_text())
  with np.load(out / "distilled.npz") as d:
    x = d["x"]
  with np.load(out / "stages" / "generate" / "arrays.npz") as g:
    hist = g[pe.RELEASES]
  return priv, x, hist


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("whole") / "run"
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 0
  return _published(out)


def test_a_run_killed_after_a_pe_release_reuses_it_on_resume(
    tmp_path, monkeypatch, releases, uninterrupted):
  """Killed in iteration 2's variation (its release saved, the API asked),
  resumed: PE draws only iteration 3's histogram, and the run equals an
  uninterrupted one (deterministic test mode: the same noise)."""
  out = tmp_path / "run"
  _fail_at_variation(monkeypatch, 2, Killed())
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *FLAGS])
  assert len(releases) == 2
  saved = store.StageStore(str(out / outputs.STAGING / "stages"))
  assert saved.partial("generate")[pe.RELEASES].shape[0] == 2
  assert not saved.finished("generate")
  releases.clear()
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert len(releases) == ITERATIONS - 2
  priv, x, hist = _published(out)
  want_priv, want_x, want_hist = uninterrupted
  assert priv == want_priv
  np.testing.assert_array_equal(hist, want_hist)
  np.testing.assert_array_equal(x, want_x)
  record = json.loads((out / "stages" / store.STATE).read_text())
  assert not any(store.PARTIAL in n for n in record["finished"])
  assert not any(store.PARTIAL in n for n in os.listdir(out / "stages"))


def test_an_image_api_failing_mid_run_keeps_the_run_to_resume(
    tmp_path, monkeypatch, capsys, releases, uninterrupted):
  """An API that fails at its second variation (a model server down) in a
  fresh run: exit 2 naming the saved releases and the --resume command,
  the run kept; resumed once the API works, it draws the rest only."""
  out = tmp_path / "run"
  _fail_at_variation(monkeypatch, 2, RuntimeError("server down"))
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 2
  err = capsys.readouterr().err
  assert "server down" in err and "2 of them are saved" in err
  assert f"continue with: dpgeng distill --resume {out}" in err
  monkeypatch.undo()
  releases.clear()
  monkeypatch.setattr(pe, "release_histogram", _counter(releases))
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert len(releases) == ITERATIONS - 2
  want_priv, _, want_hist = uninterrupted
  priv, _, hist = _published(out)
  assert priv == want_priv
  np.testing.assert_array_equal(hist, want_hist)


def _counter(seen):
  real = pe.release_histogram

  def counting(*a, **k):
    seen.append(1)
    return real(*a, **k)
  return counting


def test_saved_releases_that_do_not_fit_the_configuration_are_refused():
  cfg = pe.PEConfig(iterations=2, population=4)
  with pytest.raises(ValueError, match="do not fit"):
    pe._checked_releases(np.zeros((3, 2, 4)), 2, 2, 4, False)  # too many
  with pytest.raises(ValueError, match="do not fit"):
    pe._checked_releases(np.zeros((1, 2, 5)), 2, 2, 4, False)  # other N_s
  with pytest.raises(ValueError, match="public-only"):
    pe._checked_releases(np.zeros((1, 2, 4)), 2, 2, 4, True)
  assert len(pe._checked_releases(np.zeros((2, 2, 4)), cfg.iterations, 2,
                                  cfg.population, False)) == 2


def test_saved_releases_drawn_with_other_pe_settings_are_refused():
  """A plug-in given from Python is not in the saved configuration: its
  settings travel with the checkpoint, and another k (say) would reuse
  votes cast for other candidates."""
  gen = pe.PrivateEvolution("text", pe.PEConfig(iterations=2, k=1))
  saved = {pe.RELEASES: np.zeros((1, 2, 4)), pe.SETUP: gen._setup(3.0)}
  assert gen._saved_releases(saved, gen._setup(3.0)).shape == (1, 2, 4)
  assert gen._saved_releases(None, gen._setup(3.0)) is None
  for other, sigma in ((pe.PrivateEvolution(
      "text", pe.PEConfig(iterations=2, k=2)), 3.0), (gen, 2.5)):
    with pytest.raises(ValueError, match="drawn with other settings"):
      other._saved_releases(saved, other._setup(sigma))


def test_a_generated_set_the_run_cannot_use_keeps_the_run_to_resume(
    tmp_path, monkeypatch, capsys, releases):
  """The plug-in's answer refused after all its releases (the counts'
  and PE's, saved): the run is kept, and a resume (the plug-in fixed)
  draws none of them again."""
  from dpgeng_jax import generators
  from dpgeng_jax.errors import DataError
  out = tmp_path / "run"

  def refuse(*a, **k):
    raise DataError("no image of class(es) [3]")
  monkeypatch.setattr(generators, "check_images", refuse)
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 2
  err = capsys.readouterr().err
  assert "returned images the run cannot use" in err
  assert f"{ITERATIONS} of them are saved" in err
  assert f"continue with: dpgeng distill --resume {out}" in err
  monkeypatch.undo()
  releases.clear()
  monkeypatch.setattr(pe, "release_histogram", _counter(releases))
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert releases == []


WARM_FLAGS = [*FLAGS, "--pe-warm-start", "2", "--pe-warm-weight", "3"]


@pytest.fixture(scope="module")
def uninterrupted_warm(tmp_path_factory):
  out = tmp_path_factory.mktemp("whole_warm") / "run"
  assert cli.main(["distill", "--out", str(out), *WARM_FLAGS]) == 0
  with np.load(out / "stages" / "generate" / "arrays.npz") as g:
    warm = g[pe.WARM]
  return (*_published(out), warm)


@pytest.mark.parametrize("nth,histograms", [(1, 0), (4, 2)])
def test_a_run_killed_after_the_warm_release_reuses_it_on_resume(
    tmp_path, monkeypatch, releases, uninterrupted_warm, nth, histograms):
  """The warm start's release is saved before the API's first variation:
  killed in the warm start (variation 1 of its 2) or in the votes
  (variation 4: two histograms drawn), a resumed run draws no warm
  release again and only the missing histograms, and ends as an
  uninterrupted run."""
  from dpgeng_jax.generators import merf
  warm_draws = []
  real = merf.release_class_features

  def counting(*a, **k):
    warm_draws.append(1)
    return real(*a, **k)
  monkeypatch.setattr(merf, "release_class_features", counting)
  out = tmp_path / "run"
  _fail_at_variation(monkeypatch, nth, Killed())
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *WARM_FLAGS])
  assert len(warm_draws) == 1 and len(releases) == histograms
  saved = store.StageStore(str(out / outputs.STAGING / "stages"))
  partial = saved.partial("generate")
  assert partial[pe.WARM].shape[0] == 1
  assert len(partial.get(pe.RELEASES, ())) == histograms
  monkeypatch.setattr(text.TextAPI, "variation", _REAL_VARIATION)
  warm_draws.clear()
  releases.clear()
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert warm_draws == [] and len(releases) == ITERATIONS - histograms
  priv, x, hist = _published(out)
  want_priv, want_x, want_hist, want_warm = uninterrupted_warm
  assert priv == want_priv
  np.testing.assert_array_equal(hist, want_hist)
  np.testing.assert_array_equal(x, want_x)
  with np.load(out / "stages" / "generate" / "arrays.npz") as g:
    np.testing.assert_array_equal(g[pe.WARM], want_warm)


_REAL_VARIATION = text.TextAPI.variation


def test_an_api_failing_after_the_warm_release_counts_it_as_saved(
    tmp_path, monkeypatch, capsys):
  out = tmp_path / "run"
  _fail_at_variation(monkeypatch, 1, RuntimeError("server down"))
  assert cli.main(["distill", "--out", str(out), *WARM_FLAGS]) == 2
  assert "1 of them are saved" in capsys.readouterr().err


def test_a_saved_warm_release_of_another_shape_is_refused():
  assert pe._saved_warm(None, 2, 5) is None
  ok = np.zeros((1, 2, 5), np.float32)
  assert pe._saved_warm({pe.WARM: ok}, 2, 5).shape == (1, 2, 5)
  for bad in (np.zeros((2, 5)), np.zeros((1, 3, 5)),
              np.full((1, 2, 5), np.nan)):
    with pytest.raises(ValueError, match="warm release"):
      pe._saved_warm({pe.WARM: bad}, 2, 5)
  gen = pe.PrivateEvolution("text", pe.PEConfig(iterations=2, warm_start=1))
  other = pe.PrivateEvolution("text", pe.PEConfig(iterations=2, warm_start=1,
                                                  warm_weight=3))
  saved = {pe.WARM: ok, pe.SETUP: gen._setup(3.0)}
  assert gen._saved_releases(saved, gen._setup(3.0)) is None  # no votes yet
  with pytest.raises(ValueError, match="a warm release"):
    other._saved_releases(saved, other._setup(3.0))
