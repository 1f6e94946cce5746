"""Killed runs resume from their saved stages (stages.py, --resume) without
running a private mechanism whose release is saved, and end with the
outputs of an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dpgeng_jax import cli, counts, expert, outputs, pipeline, stages, store
from dpgeng_jax.generators import merf, pe

FLAGS = ["--method", "dpgeng", "--ipc", "1", "--steps", "6",
         "--checkpoint-every", "3", "--num-queries", "2",
         "--extractor-width", "8", "--eval-width", "8", "--eval-models", "1",
         "--eval-epochs", "1", "--pe-iterations", "2", "--pe-population",
         "4", "--generator-steps", "3",
         "--generator-features", "16", "--generated-per-class", "4",
         "--pool-models", "1", "--pool-checkpoints", "1", "--pool-epochs",
         "1", "--expert-steps", "2", "--expert", "--deterministic", "--quiet"]
MECHANISMS = ("class_counts", "generator", "queries", "expert")


class Killed(BaseException):
  """Stands for SIGKILL in-process: no `except Exception` sees it."""


@pytest.fixture
def calls(monkeypatch):
  """Counts the calls of each private mechanism."""
  seen = {m: 0 for m in MECHANISMS}
  _count_again(monkeypatch, seen)
  return seen


def _kill_after(monkeypatch, nth_save: int):
  """The run dies right after its nth stage save (a stage boundary)."""
  real = store.StageStore.save
  count = [0]

  def save(self, name, *a, **k):
    real(self, name, *a, **k)
    count[0] += 1
    if count[0] == nth_save:
      raise Killed(name)

  monkeypatch.setattr(store.StageStore, "save", save)


def _visible(out):
  return sorted(p for p in os.listdir(out) if not p.startswith("."))


# What differs between an uninterrupted and a resumed run's metrics.json:
# times and memory of the processes, and the record of the resume.
_PROCESS_FIELDS = ("timings_s", "peak_rss_mb", "resumed", "seconds")


def _without_process_fields(v):
  if isinstance(v, dict):
    return {k: _without_process_fields(w) for k, w in v.items()
            if k not in _PROCESS_FIELDS}
  return v


def _outputs(out):
  """privacy.json, the distilled x and metrics.json without the process
  fields: a resumed run must reproduce all three (its loss history too;
  one zeroed on resume passed when only the first two were compared)."""
  priv = json.loads((out / "privacy.json").read_text())
  with np.load(out / "distilled.npz") as d:
    x = d["x"]
  metrics = _without_process_fields(
      json.loads((out / "metrics.json").read_text()))
  return priv, x, metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("whole") / "run"
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 0
  return _outputs(out)


def test_killed_at_every_stage_boundary_resumes_to_the_same_run(
    tmp_path, monkeypatch, calls, uninterrupted):
  """Killed after each save in turn (calibrate, class sizes, generator,
  pool, queries, expert, init, distillation at step 3 of 6, distillation
  done, evaluation), resumed each time: every private mechanism ran once,
  nothing was ever visible in --out before the end, and the outputs equal
  an uninterrupted run's (deterministic test mode: same noise)."""
  out = tmp_path / "run"
  seen_stages = []
  with pytest.raises(Killed) as info:
    _kill_after(monkeypatch, 1)
    cli.main(["distill", "--out", str(out), *FLAGS])
  seen_stages.append(str(info.value))
  for _ in range(9):
    assert _visible(out) == []  # no partial set, no manifest
    monkeypatch.undo()  # a fresh process: patch the counters again
    _count_again(monkeypatch, calls)
    _kill_after(monkeypatch, 1)
    with pytest.raises(Killed) as info:
      cli.main(["distill", "--resume", str(out), "--quiet"])
    seen_stages.append(str(info.value))
  assert seen_stages == ["calibrate", "class_sizes", "generate", "pool",
                         "query", "expert", "init", "distill", "distill",
                         "evaluate"]
  monkeypatch.undo()
  _count_again(monkeypatch, calls)
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert calls == {m: 1 for m in MECHANISMS}
  priv, x, metrics = _outputs(out)
  want_priv, want_x, want_metrics = uninterrupted
  assert priv == want_priv
  np.testing.assert_array_equal(x, want_x)
  assert metrics == want_metrics
  assert outputs.read_manifest(str(out)) is not None
  published = json.loads((out / "stages" / store.STATE).read_text())
  assert set(published["data"]) == {"image_shape", "num_classes",
                                    "normalisation"}  # no N, no fingerprint


def test_killed_while_saving_a_distillation_checkpoint_resumes(
    tmp_path, monkeypatch, calls, uninterrupted):
  """A kill (or a full disk) while the second distillation checkpoint was
  written left arrays.npz new and the state tree half deleted under the
  first checkpoint's digests: the resume refused the whole run as damaged
  (a review's finding). The re-save goes to the stage's other folder and
  the record switches in one write, so the first checkpoint is resumed;
  the superseded folder is removed once a later save lands."""
  out = tmp_path / "run"
  real = store._save_tree
  seen = []

  def save_tree(path, tree):
    seen.append(path)
    if os.path.basename(os.path.dirname(path)).startswith("distill") and (
        sum("distill" in p for p in seen) == 2):
      raise Killed(path)
    real(path, tree)

  monkeypatch.setattr(store, "_save_tree", save_tree)
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *FLAGS])
  staged = out / outputs.STAGING / "stages"
  assert (staged / "distill.next" / "arrays.npz").exists()
  state = json.loads((staged / store.STATE).read_text())
  assert state["info"]["distill"] == {"step": 3}
  monkeypatch.undo()
  _count_again(monkeypatch, calls)
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert calls == {m: 1 for m in MECHANISMS}
  priv, x, metrics = _outputs(out)
  assert priv == uninterrupted[0]
  np.testing.assert_array_equal(x, uninterrupted[1])
  assert metrics == uninterrupted[2]
  kept = sorted(p.name for p in (out / "stages").iterdir()
                if p.name.startswith("distill"))
  assert len(kept) == 1, kept


def test_a_stage_saved_again_switches_folders_in_one_record_write(tmp_path):
  st = store.StageStore(str(tmp_path / "s"))
  st.start({}, {})
  for step in range(1, 5):
    st.save("distill", arrays={"losses": np.arange(step)},
            info={"step": step})
    arrays, _, info = store.StageStore(st.root).load("distill")
    assert info == {"step": step}
    np.testing.assert_array_equal(arrays["losses"], np.arange(step))
    assert sorted(os.listdir(st.root)) == sorted(
        [store.STATE, "distill" + (".next" if step % 2 == 0 else "")])


def _count_again(monkeypatch, seen):
  def counting(name, fn):
    def wrapped(*a, **k):
      seen[name] += 1
      return fn(*a, **k)
    return wrapped
  monkeypatch.setattr(counts, "release_class_counts", counting(
      "class_counts", counts.release_class_counts))
  for plugin in (pe.PrivateEvolution, merf.Merf):
    monkeypatch.setattr(plugin, "generate", counting(
        "generator", plugin.generate))
  monkeypatch.setattr(stages, "answer_queries", counting(
      "queries", stages.answer_queries))
  monkeypatch.setattr(expert, "dp_finetune", counting(
      "expert", expert.dp_finetune))


def _killed_run(tmp_path, monkeypatch, after="query"):
  """A run killed right after the first save of stage `after`."""
  out = tmp_path / "run"
  real = store.StageStore.save

  def save(self, name, *a, **k):
    real(self, name, *a, **k)
    if name == after:
      raise Killed(name)
  monkeypatch.setattr(store.StageStore, "save", save)
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *FLAGS])
  monkeypatch.undo()
  return out


@pytest.mark.parametrize("flags,what", [
    (["--epsilon", "2"], "epsilon"),
    (["--num-queries", "3"], "num_queries (saved 2, now 3)"),
    (["--seed", "1"], "seed"),
    (["--references"], "references"),   # would make the run not private
    # C and the rates: the saved releases were clipped and sampled with
    # the saved ones (the calibration check sees no C).
    (["--clip-norm", "2"], ": clip_norm (saved 1.0, now 2.0)"),
    (["--expert-clip-norm", "2"], "expert_clip_norm (saved 1.0, now 2.0)"),
    (["--sampling-rate", "0.3"], "sampling_rate (saved 0.5, now 0.3)"),
    (["--out", "elsewhere"], "--out 'elsewhere' names another one"),
])
def test_resume_refuses_options_that_change_the_guarantee_or_a_release(
    tmp_path, monkeypatch, capsys, flags, what):
  out = _killed_run(tmp_path, monkeypatch)
  assert cli.main(["distill", "--resume", str(out), "--quiet", *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error: --resume") and cli.as_flags(
      what) in err
  assert _visible(out) == []


@pytest.mark.parametrize("saved, message", [
    ({"extractors": "generated"}, "extractors (saved 'generated', now "
                                  "'random')"),
    (None, "saved by an older dpgeng_jax"),
])
def test_resume_refuses_a_run_whose_auto_options_resolved_otherwise(
    tmp_path, monkeypatch, capsys, saved, message):
  # As if the run had started under another default (or an older version
  # that did not record its resolution): its saved releases were made
  # with other extractors, so continuing would mix the two.
  out = _killed_run(tmp_path, monkeypatch)
  st = store.StageStore(os.path.join(out, outputs.STAGING,
                                     pipeline.STAGES_DIR))
  state = st.state()
  state["resolved"] = None if saved is None else {**state["resolved"],
                                                  **saved}
  with open(st.path, "w") as f:
    json.dump(state, f)
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 2
  assert message in capsys.readouterr().err


def test_resume_refuses_other_training_data(tmp_path, monkeypatch, capsys):
  path = tmp_path / "d.npz"

  def save(seed):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8),
             y_train=np.arange(60) % 3,
             x_test=rng.integers(0, 256, (9, 8, 8), dtype=np.uint8),
             y_test=np.arange(9) % 3)

  save(0)
  out = tmp_path / "run"
  _kill_after(monkeypatch, 3)
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), "--dataset", f"npz:{path}",
              "--delta", "1e-3", *FLAGS])
  monkeypatch.undo()
  save(1)  # same spec, shapes and sizes; other pixels
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 2
  assert "training data differ" in capsys.readouterr().err


def test_resume_refuses_other_normalisation_constants(tmp_path):
  """The same pixels under other constants (an npz run started before a
  dataset preset chose the dataset's published ones) are other inputs to
  every saved stage; a record saved before the constants were kept is
  compared on what it holds."""
  x = np.zeros((4, 2, 2, 1), np.float32)
  y = np.arange(4) % 2
  half = ((0.5,), (0.5,))
  mnist = ((0.1307,), (0.3081,))
  st = store.StageStore(str(tmp_path / "s"))
  st.start({}, store.fingerprint(x, y, 2, half))
  st.check({}, store.fingerprint(x, y, 2, half))
  with pytest.raises(cli.ConfigError, match="normalisation constants"):
    st.check({}, store.fingerprint(x, y, 2, mnist))
  old = store.StageStore(str(tmp_path / "o"))
  old.start({}, store.fingerprint(x, y, 2))
  old.check({}, store.fingerprint(x, y, 2, mnist))


def test_the_data_fingerprint_is_keyed_and_holds_no_count(tmp_path,
                                                           monkeypatch):
  """An unfinished run's folder must not let its holder test a candidate
  dataset (D with or without one person): the record keeps no N and only
  an HMAC under a key outside the folder; another key (another user or
  machine) does not match, and a record of the old plain hash is refused."""
  x = np.arange(4 * 4, dtype=np.float32).reshape(4, 2, 2, 1)
  y = np.arange(4) % 2
  key = tmp_path / "keys" / "resume.key"
  monkeypatch.setenv("DPGENG_RESUME_KEY", str(key))
  first = store.fingerprint(x, y, 2)
  assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
  assert first == store.fingerprint(x, y, 2)          # the key is kept
  assert "num_train" not in first and "train_sha256" not in first
  fewer = store.fingerprint(x[:3], y[:3], 2)
  assert fewer["train_hmac"] != first["train_hmac"]
  assert {k: v for k, v in fewer.items() if k != "train_hmac"} == {
      k: v for k, v in first.items() if k != "train_hmac"}
  st = store.StageStore(str(tmp_path / "s"))
  st.start({}, first)
  st.check({}, store.fingerprint(x, y, 2))
  with pytest.raises(cli.ConfigError, match="training data differ") as e:
    st.check({}, fewer)
  assert "3" not in str(e.value).replace(str(key), "")  # no count named
  monkeypatch.setenv("DPGENG_RESUME_KEY", str(tmp_path / "other.key"))
  with pytest.raises(cli.ConfigError, match="another user or machine"):
    st.check({}, store.fingerprint(x, y, 2))
  old = store.StageStore(str(tmp_path / "o"))
  old.start({}, {"train_sha256": "ab", "num_train": 4, "image_shape": [2, 2, 1],
                 "num_classes": 2})
  with pytest.raises(cli.ConfigError, match="older dpgeng_jax"):
    old.check({}, first)
  short = tmp_path / "user.txt"  # not a key this tool made: kept as it is
  short.write_bytes(b"x")
  monkeypatch.setenv("DPGENG_RESUME_KEY", str(short))
  with pytest.raises(cli.ConfigError, match="fewer than 32"):
    store.resume_key()
  assert short.read_bytes() == b"x"
  shared = tmp_path / "shared.key"
  shared.write_bytes(bytes(range(32)))
  shared.chmod(0o644)
  monkeypatch.setenv("DPGENG_RESUME_KEY", str(shared))
  with pytest.warns(UserWarning, match="other users"):
    assert store.resume_key() == bytes(range(32))
  monkeypatch.setenv("DPGENG_RESUME_KEY", str(tmp_path))  # a directory
  with pytest.raises(cli.ConfigError, match="DPGENG_RESUME_KEY"):
    store.fingerprint(x, y, 2)


def test_a_home_without_room_for_the_key_runs_but_cannot_resume(
    tmp_path, monkeypatch, capsys):
  """Where the default key file can be neither read nor made (a read-only
  or missing home, as in containers; here its folder is under a plain
  file, which stops root too) the run goes on, with one warning, under a
  key of this process only, and its folder says it cannot be resumed;
  a key file the user named (DPGENG_RESUME_KEY) is still required."""
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("")
  monkeypatch.delenv("DPGENG_RESUME_KEY")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
  monkeypatch.setattr(store, "_PROCESS_KEY", {})
  x = np.arange(16, dtype=np.float32).reshape(4, 2, 2, 1)
  y = np.arange(4) % 2
  with pytest.warns(UserWarning, match="cannot be resumed"):
    first = store.fingerprint(x, y, 2)
  assert first["resume_key"] == "this process only"
  assert store.fingerprint(x, y, 2) == first  # one key for the process
  assert not (blocker / "cache").exists()
  out = tmp_path / "run"
  _kill_after(monkeypatch, 2)
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *FLAGS])
  monkeypatch.undo()  # a fresh process
  monkeypatch.delenv("DPGENG_RESUME_KEY")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
  monkeypatch.setattr(store, "_PROCESS_KEY", {})
  capsys.readouterr()
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "cannot be resumed" in err and "DPGENG_RESUME_KEY" in err, err
  # A fresh run in the same home finishes.
  assert cli.main(["distill", "--out", str(tmp_path / "b"), *FLAGS]) == 0
  assert (tmp_path / "b" / "distilled.npz").exists()
  monkeypatch.setenv("DPGENG_RESUME_KEY", str(blocker / "key"))
  with pytest.raises(cli.ConfigError, match="DPGENG_RESUME_KEY"):
    store.resume_key()


def test_only_performance_evaluation_and_output_options_may_change():
  """Pinned by name, not rebuilt from the groups config.py gives its
  fields (a field put in the wrong group would move both sides): a
  resumption may change these options and no other."""
  from dpgeng_jax import config
  assert store.RESUME_FREE == {
      "checkpoint_every", "conv_impl", "coordinator_address", "data_dir",
      "devices", "eval_epochs", "eval_models", "eval_width", "microbatch",
      "no_compile_cache", "no_eval", "no_retain_host_memory",
      "no_skip_padding", "num_processes", "out", "overwrite", "process_id", "quiet", "resume",
      "tensorboard"}
  assert store.RESUME_FREE.isdisjoint(config.privacy_fields())
  # The options that set a mechanism or its sensitivity, by name.
  guarantee = {
      "epsilon", "delta", "clip_norm", "sampling_rate", "num_queries",
      "share_generator", "share_features", "share_expert", "share_counts",
      "public_class_sizes", "expert_steps", "expert_sampling_rate",
      "expert_clip_norm", "generated_epsilon", "generated_delta",
      "generated_mu", "generated_noise_multiplier",
      "generated_sampling_rate", "generated_steps", "pe_iterations",
      "pe_public_only", "deterministic"}
  assert guarantee <= set(config.privacy_fields())
  assert {"seed", "dataset", "steps", "references", "method",
          "generator"}.isdisjoint(store.RESUME_FREE)


def test_resume_may_change_performance_and_evaluation_options(
    tmp_path, monkeypatch, calls):
  out = _killed_run(tmp_path, monkeypatch, after="expert")
  calls.update({m: 0 for m in MECHANISMS})  # count the resumption only
  _count_again(monkeypatch, calls)
  assert cli.main(["distill", "--resume", str(out), "--quiet",
                   "--eval-models", "2", "--microbatch", "16"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["num_eval_models"] == 2
  assert calls == {m: 0 for m in MECHANISMS}  # all ran before the kill


def test_without_resume_an_unfinished_run_is_refused(tmp_path, monkeypatch,
                                                     capsys):
  out = _killed_run(tmp_path, monkeypatch, after="class_sizes")
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 2
  assert "unfinished run" in capsys.readouterr().err
  assert cli.main(["distill", "--resume", str(tmp_path / "elsewhere"),
                   "--quiet"]) == 2
  assert "no unfinished run" in capsys.readouterr().err


def test_sigkill_mid_run_then_resume_skips_the_saved_releases(
    tmp_path, monkeypatch, calls):
  """A real SIGKILL of the command once its queries are saved."""
  out = tmp_path / "run"
  state = out / outputs.STAGING / pipeline.STAGES_DIR / store.STATE
  proc = subprocess.Popen(
      [sys.executable, "-m", "dpgeng_jax", "distill", "--out", str(out),
       *FLAGS], cwd=os.path.dirname(os.path.dirname(__file__)),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  finished = []
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    try:
      finished = json.loads(state.read_text())["finished"]
    except (OSError, ValueError):
      finished = []
    if "query" in finished:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  finished = json.loads(state.read_text())["finished"]
  assert _visible(out) == []
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert calls["class_counts"] == 0 and calls["generator"] == 0
  assert calls["queries"] == 0
  assert calls["expert"] == (0 if "expert" in finished else 1)
  assert outputs.read_manifest(str(out)) is not None


def test_a_privacy_abort_exits_3_and_the_run_resumes(tmp_path, monkeypatch,
                                                     capsys, calls):
  """A Poisson batch above its capacity (a rare event paid for in delta)
  aborts the queries: exit 3 with the resume command; the class sizes and
  the generator's release already saved are not drawn again."""
  from dpgeng_jax import mechanisms

  def overflow(*a, **k):
    raise mechanisms.SamplingOverflowError("a Poisson batch overflowed")

  import shlex
  out = tmp_path / "my run"  # the printed command is shell-quoted
  with monkeypatch.context() as m:
    m.setattr(stages, "answer_queries", overflow)
    assert cli.main(["distill", "--out", str(out), *FLAGS]) == 3
  err = capsys.readouterr().err
  assert "aborted" in err
  command = err.split("continue with: ")[1].splitlines()[0]
  assert shlex.split(command) == ["dpgeng", "distill", "--resume", str(out)]
  assert _visible(out) == []
  calls.update({k: 0 for k in MECHANISMS})
  assert cli.main(shlex.split(command)[1:] + ["--quiet"]) == 0
  assert calls == {"class_counts": 0, "generator": 0, "queries": 1,
                   "expert": 1}


def test_a_resumed_run_reports_the_times_of_the_process_that_ran_each_stage(
    tmp_path, monkeypatch):
  """metrics.json's timings of the stages a resumed run loaded were their
  load times (a generator of seconds reported as milliseconds); now they
  are the killed process's, and the loaded stages are named."""
  out = _killed_run(tmp_path, monkeypatch, after="query")
  state = json.loads((out / outputs.STAGING / "stages" / store.STATE)
                     .read_text())
  first = state["timings_s"]
  assert {"calibration_s", "class_sizes_s", "generation_s",
          "extractor_pool_s"} <= set(first)
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  for key in ("calibration_s", "class_sizes_s", "generation_s",
              "extractor_pool_s"):
    assert metrics["timings_s"][key] == first[key]
  assert {"generate", "pool", "query"} <= set(
      metrics["resumed"]["stages_loaded"])
  assert "init" not in metrics["resumed"]["stages_loaded"]


def test_a_continued_distillation_is_named_and_timed_over_its_processes(
    tmp_path, monkeypatch):
  """A distillation resumed from its checkpoint was missing from the
  resumed stages and its time was this process's steps only (0.04 s for
  a stage of 5 s; a review's finding): it is named as continued, and its
  time adds the killed process's time to its checkpoint."""
  out = _killed_run(tmp_path, monkeypatch, after="distill")
  state = json.loads((out / outputs.STAGING / "stages" / store.STATE)
                     .read_text())
  assert state["info"]["distill"] == {"step": 3}  # killed at step 3 of 6
  assert state["timings_s"]["distillation_s"] > 0
  # The killed process's time, made large: this process's steps alone
  # cannot reach it.
  first = 1000.0
  _edit_state(out / outputs.STAGING / "stages" / store.STATE,
              lambda s: s["timings_s"].update(distillation_s=first))
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["resumed"]["stages_continued"] == ["distill"]
  assert "distill" not in metrics["resumed"]["stages_loaded"]
  assert metrics["timings_s"]["distillation_s"] > first
  assert len(metrics["distillation_losses"]) == 6


def test_a_resume_over_several_processes_is_refused_before_any_release(
    tmp_path, monkeypatch, calls, capsys):
  """Runs over several processes save no stages: resumed so, they drew
  every release again with fresh noise, and the killed run's saved
  releases were published beside the new ones (privacy.json accounting
  for one set)."""
  import jax
  out = _killed_run(tmp_path, monkeypatch, after="generate")
  calls.update({m: 0 for m in MECHANISMS})
  _count_again(monkeypatch, calls)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "--resume continues a run in one process only" in err
  assert calls == {m: 0 for m in MECHANISMS}
  assert _visible(out) == []
  monkeypatch.undo()
  # As one process the same run resumes.
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert "privacy.json" in _visible(out)


def test_a_generator_making_other_releases_than_calibrated_is_refused(
    tmp_path, monkeypatch, calls):
  """Resumed with a PE given from Python under the same name but with
  more iterations, the run loaded the saved calibration (2 releases) and
  made 3 at its noise, reporting 2. The saved calibration is now checked
  against the one this configuration and generator give, first."""
  from dpgeng_jax.config import Config
  from dpgeng_jax.errors import ConfigError
  out = _killed_run(tmp_path, monkeypatch, after="calibrate")
  calls.update({m: 0 for m in MECHANISMS})
  _count_again(monkeypatch, calls)
  st = store.StageStore(os.path.join(out, outputs.STAGING,
                                     pipeline.STAGES_DIR))
  cfg = Config(**{**st.config(), "resume": str(out)})
  more = pe.PrivateEvolution("text", pe.PEConfig(iterations=3,
                                                 population=4, k=4))
  with pytest.raises(ConfigError, match="its calibration differs .* "
                     "resumed with a generator that makes other releases"):
    pipeline.run(cfg, store=st, generator=more)
  assert calls["generator"] == 0
  # Called directly, PE itself refuses a mechanism of other steps.
  from dpgeng_jax import accounting
  with pytest.raises(ValueError, match="pe:text makes the releases .*1.0, "
                     "3, .1.*given mechanisms calibrated for .*1.0, 2, "):
    more.generate(None, None, [accounting.Mechanism("generator", 1.0, 1.0,
                                                    2, sensitivity="1")])


def _edit_state(path, change):
  state = json.loads(path.read_text())
  change(state)
  path.write_text(json.dumps(state))


def _without_digests(damage):
  """The damage in a record saved before stages had digests (an older
  version): the loaders' own checks must name it."""
  def both(d):
    _edit_state(d / "state.json", lambda s: s.pop("digests"))
    damage(d)
  return both


def _reshaped_generated_set(d):
  with np.load(d / "generate" / "arrays.npz") as z:
    a = {k: z[k] for k in z.files}
  a["x_gen"] = a["x_gen"][:, :4, :4]  # a valid npz of other shapes
  np.savez(d / "generate" / "arrays.npz", **a)


def _flip_a_byte(path):
  b = bytearray(path.read_bytes())
  b[len(b) // 2] ^= 0xFF
  path.write_bytes(bytes(b))


def _targets_not_npz(d):
  (d / "query" / "arrays.npz").write_text("junk")


def _pool_deleted(d):
  __import__("shutil").rmtree(d / "pool" / "pool")


DAMAGED = {
    "record_a_list": (lambda d: (d / "state.json").write_text("[]"),
                      "its record is a JSON list"),
    "record_without_config": (
        lambda d: _edit_state(d / "state.json", lambda s: s.pop("config")),
        "lacks or mistypes config"),
    # An edited stage info is damage to its digests; in a record saved
    # before they covered it, the calibration's own cross-check names it.
    "calibration_edited": (
        lambda d: _edit_state(d / "state.json", lambda s: s["info"].update(
            calibrate=[{"x": 1}])), "changed <info in state.json>"),
    "query_capacity_edited": (
        lambda d: _edit_state(d / "state.json", lambda s: s["info"].update(
            query=s["info"]["query"] + 1)),
        "query is damaged (its files differ from those saved: changed "
        "<info in state.json>"),
    "older_record_calibration_edited": (_without_digests(
        lambda d: _edit_state(d / "state.json", lambda s: s["info"].update(
            calibrate=[{"x": 1}]))), "its calibration"),
    "older_record_calibration_noise_edited": (_without_digests(
        lambda d: _edit_state(d / "state.json", lambda s: [
            m.update(noise_multiplier=10 * m["noise_multiplier"])
            for m in s["info"]["calibrate"]])),
        "its calibration differs from the one its configuration "
        "calibrates to"),
    "digests_edited": (
        lambda d: _edit_state(d / "state.json", lambda s: s["digests"]
                              .update(query=["x"])),
        "mistypes the digests of query"),
    "targets_not_npz": (_targets_not_npz, "its files differ from those "
                        "saved: changed arrays.npz"),
    "targets_missing": (lambda d: np.savez(d / "query" / "arrays.npz"),
                        "changed arrays.npz"),
    "generated_set_deleted": (lambda d: (d / "generate" / "arrays.npz"
                                         ).unlink(), "missing arrays.npz"),
    "generated_set_reshaped": (_reshaped_generated_set,
                               "generate is damaged (its files differ from "
                               "those saved: changed arrays.npz"),
    # The queries' targets were computed with the pool's extractors: a
    # damaged pool is not retrained under them (nor the counts' release).
    "pool_deleted_after_the_queries": (_pool_deleted, "missing pool/"),
    "pool_flipped_after_the_queries": (lambda d: _flip_a_byte(sorted(
        (d / "pool" / "pool").rglob("d/*"))[0]), "changed pool/"),
    "class_sizes_flipped": (lambda d: _flip_a_byte(
        d / "class_sizes" / "arrays.npz"), "class_sizes is damaged"),
    "file_added": (lambda d: (d / "query" / "extra.npz").write_text("x"),
                   "added extra.npz"),
    "older_record_targets_not_npz": (_without_digests(_targets_not_npz),
                                     "arrays.npz is not an npz (zip) "
                                     "archive"),
    "older_record_targets_missing": (_without_digests(
        lambda d: np.savez(d / "query" / "arrays.npz")),
        "'targets' is missing"),
    "older_record_pool_deleted": (_without_digests(_pool_deleted),
                                  "'pool' is missing"),
}


def _query_folder_linked(d):
  """The query folder moved outside the run and a symbolic link left in
  its place."""
  elsewhere = d.parent.parent.parent / "elsewhere"
  os.replace(d / "query", elsewhere)
  os.symlink(elsewhere, d / "query")


DAMAGED.update({  # a review's findings: tracebacks, a link, a FIFO
    "info_of_generate_mistyped": (
        lambda d: _edit_state(d / "state.json", lambda s: s["info"].update(
            generate="x")), "mistypes info of generate"),
    "info_of_query_mistyped": (
        lambda d: _edit_state(d / "state.json", lambda s: s["info"].update(
            query="abc")), "mistypes info of query"),
    "timings_mistyped": (
        lambda d: _edit_state(d / "state.json", lambda s: s.update(
            timings_s="x")), "mistypes timings_s"),
    "a_timing_mistyped": (
        lambda d: _edit_state(d / "state.json", lambda s: s["timings_s"]
                              .update(generation_s="x")),
        "mistypes timings_s"),
    "query_folder_a_link": (_query_folder_linked, "is a symbolic link"),
    "targets_a_fifo": (lambda d: ((d / "query" / "arrays.npz").unlink(),
                                  os.mkfifo(d / "query" / "arrays.npz")),
                       "arrays.npz is not a regular file"),
})


@pytest.mark.parametrize("damage, message", DAMAGED.values(),
                         ids=DAMAGED.keys())
def test_a_damaged_stage_folder_is_a_one_line_refusal_releasing_nothing(
    tmp_path, monkeypatch, capsys, damage, message):
  """A damaged or edited saved stage ended the resume in a traceback
  (KeyError 'targets', "'list' object has no attribute 'get'", numpy's
  pickle error for a file that is not an npz); it is refused, naming the
  folder and that a new run composes, and no private mechanism runs."""
  out = _killed_run(tmp_path, monkeypatch)
  damage(out / outputs.STAGING / "stages")
  seen = {m: 0 for m in MECHANISMS}
  _count_again(monkeypatch, seen)
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error: --resume: the saved stages cannot "
                        "be read") and message in err, err
  assert "composes with the releases this run already made" in err
  assert seen == {m: 0 for m in MECHANISMS}
  assert _visible(out) == []


def _distill_flipped(d):
  """A byte of the distillation checkpoint the record names flipped."""
  folders = json.loads((d / "state.json").read_text()).get("folders", {})
  _flip_a_byte(d / folders.get("distill", "distill") / "arrays.npz")


RECOMPUTED = {
    "pool_deleted": ("pool", _pool_deleted, "pool", "missing pool/"),
    "pool_byte_flipped": ("pool", lambda d: _flip_a_byte(sorted(
        (d / "pool" / "pool").rglob("d/*"))[0]), "pool", "changed pool/"),
    "distill_checkpoint_flipped": ("distill", _distill_flipped, "distill",
                                   "changed arrays.npz"),
    # An edited accuracy in the record: the evaluation is done again.
    "evaluation_metrics_edited": ("evaluate", lambda d: _edit_state(
        d / "state.json", lambda s: s["info"]["evaluate"]["metrics"].update(
            test_accuracy_mean=0.99)), "evaluate",
        "changed <info in state.json>"),
    # The evaluation of a dropped distillation goes with it.
    "distill_flipped_after_evaluation": ("evaluate", _distill_flipped,
                                         "distill", "changed arrays.npz"),
}


@pytest.mark.parametrize("after, damage, stage, what", RECOMPUTED.values(),
                         ids=RECOMPUTED.keys())
def test_a_damaged_stage_holding_no_release_is_computed_again(
    tmp_path, monkeypatch, calls, after, damage, stage, what):
  """A damaged extractor pool or distillation checkpoint refused the
  whole resume and pointed to a new run, a second budget, though every
  release was intact (a review's finding). Such a stage is forgotten
  with a warning and computed again; no release is drawn again."""
  out = _killed_run(tmp_path, monkeypatch, after=after)
  damage(out / outputs.STAGING / "stages")
  _count_again(monkeypatch, calls)
  calls.update({k: 0 for k in MECHANISMS})
  with pytest.warns(UserWarning, match=f"the saved {stage} stage is damaged "
                    f"\\(.*{what}.*\\); it holds no private release and is "
                    "computed again"):
    assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  # Only what the killed run had not reached (the queries and the expert
  # after the pool), as an undamaged resume would.
  assert calls == {**{k: 0 for k in MECHANISMS},
                   "queries": int(after == "pool"),
                   "expert": int(after == "pool")}
  metrics = json.loads((out / "metrics.json").read_text())
  assert stage not in metrics["resumed"]["stages_loaded"]
  assert "evaluate" not in metrics["resumed"]["stages_loaded"]
  assert len(metrics["distillation_losses"]) == 6


def test_a_link_in_place_of_a_stage_folder_is_not_written_through(
    tmp_path, monkeypatch, capsys):
  """A symbolic link where the next stage saves (left by anyone who can
  write --out): rmtree failed on it silently and the save wrote through
  it, replacing files outside --out, then published the link (a
  review's finding). The link itself is replaced by the stage's folder."""
  out = _killed_run(tmp_path, monkeypatch)
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "arrays.npz").write_text("a user's file")
  os.symlink(victim, out / outputs.STAGING / "stages" / "init")
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert os.listdir(victim) == ["arrays.npz"]
  assert (victim / "arrays.npz").read_text() == "a user's file"
  published = out / "stages" / "init"
  assert published.is_dir() and not published.is_symlink()


def test_an_interrupt_just_after_the_stages_moved_is_an_interrupt(
    tmp_path, monkeypatch, capsys):
  """Ctrl-C right after the saved stages moved into --out: the handler
  wrote into the staged folder that had just moved, and its
  FileNotFoundError replaced the interrupt (status 1). Status 130, and
  the next command completes the publish."""
  real = outputs.RunDirectory._move

  def move(self, name):
    real(self, name)
    if name == pipeline.STAGES_DIR:
      raise KeyboardInterrupt
  monkeypatch.setattr(outputs.RunDirectory, "_move", move)
  out = tmp_path / "run"
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 130
  assert "interrupted" in capsys.readouterr().err
  monkeypatch.undo()
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert outputs.read_manifest(str(out)) is not None


def _failing_replace(monkeypatch, fails):
  """os.replace failing (PermissionError) on the moves `fails(src, dst)`
  picks, once."""
  real, failed = os.replace, []

  def replace(src, dst, *a, **k):
    if not failed and fails(str(src), str(dst)):
      failed.append(src)
      raise PermissionError(13, "Permission denied", str(dst))
    return real(src, dst, *a, **k)

  monkeypatch.setattr(os, "replace", replace)
  return failed


def test_a_publish_failing_as_the_stages_move_leaves_the_run_resumable(
    tmp_path, monkeypatch, capsys, calls):
  """The published record (without the data's fingerprint) was written
  into the staged stages before they moved; a move that failed left a
  record --resume refused as an older version's, and the old run's
  stages folder half deleted (a review's finding). The record is put
  back when the move fails and the old folder is moved aside whole."""
  out = tmp_path / "run"
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 0
  staged_stages = os.path.join(outputs.STAGING, "stages")
  failed = _failing_replace(monkeypatch, lambda s, d: s.endswith(
      staged_stages) and d == str(out / "stages"))
  assert cli.main(["distill", "--out", str(out), "--overwrite",
                   *FLAGS]) == 1
  assert failed
  err = capsys.readouterr().err
  assert "Permission denied" in err and "continue with" in err
  monkeypatch.undo()
  _count_again(monkeypatch, calls)
  calls.update({k: 0 for k in MECHANISMS})
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert calls == {k: 0 for k in MECHANISMS}  # every stage was saved
  assert outputs.read_manifest(str(out)) is not None
  assert not (out / outputs.STAGING).exists()


def _killed_as(monkeypatch, out, name):
  """The publish killed (SIGKILL: no handler runs) just before the staged
  `name` moves: the staging folder as it was then is put back after the
  in-process failure (whose handler restored the record)."""
  from dpgeng_jax import outputs
  real, snap = outputs.RunDirectory._move, str(out) + ".at-kill"

  def move(self, n):
    if n == name:
      shutil.copytree(self.staging, snap, symlinks=True)
      raise Killed()
    return real(self, n)
  monkeypatch.setattr(outputs.RunDirectory, "_move", move)

  def restore():
    staging = os.path.join(out, outputs.STAGING)
    shutil.rmtree(staging)
    os.replace(snap, staging)
  return restore


@pytest.mark.parametrize("then", ["resume", "new run", "report"])
def test_a_kill_as_the_saved_stages_move_is_completed_by_the_next_command(
    tmp_path, monkeypatch, capsys, calls, then):
  """A kill between the published record (the saved stages' record
  without the data's fingerprint) and the stages' move left a run that
  --resume refused as an older version's and a new run as an unfinished
  one: only --overwrite (every release drawn again) got out (a review's
  finding). The staged manifest says every output is complete: the next
  command (--resume, a new run or `dpgeng report`) moves the rest."""
  from dpgeng_jax import outputs
  out = tmp_path / "run"
  restore = _killed_as(monkeypatch, out, pipeline.STAGES_DIR)
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *FLAGS])
  monkeypatch.undo()
  restore()
  staged = out / outputs.STAGING / pipeline.STAGES_DIR
  assert "train_hmac" not in json.loads((staged / "state.json").read_text())[
      "data"] and (staged / outputs.FOLDER_MARK).is_file()
  assert outputs.read_manifest(str(out)) is None
  capsys.readouterr()
  _count_again(monkeypatch, calls)
  calls.update({k: 0 for k in MECHANISMS})
  if then == "resume":
    assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
    assert "it is complete now" in capsys.readouterr().err
  elif then == "new run":  # completes it, then is refused by it
    assert cli.main(["distill", "--out", str(out), *FLAGS]) == 2
    assert "finished run" in capsys.readouterr().err
  else:
    assert cli.main(["report", str(out)]) == 0
  assert calls == {k: 0 for k in MECHANISMS}
  assert outputs.read_manifest(str(out)) is not None
  assert not (out / outputs.STAGING).exists()
  published = json.loads((out / "stages" / "state.json").read_text())
  assert "train_hmac" not in published["data"]


@pytest.mark.parametrize("at", ["metrics.json", "prepare"])
def test_a_kill_before_the_stages_are_prepared_is_completed_without_the_fingerprint(
    tmp_path, monkeypatch, capsys, calls, at):
  """Killed mid-publish before the saved stages' record was rewritten for
  publishing (as a file moves, or in that rewrite itself), with a
  temporary file of a killed record write beside it (it holds the data's
  fingerprint): the next command completes the publish, drawing no
  release, and the published record and folder hold no fingerprint (a
  review's findings: a kill between the rewrite and a readiness mark left
  a run no command could finish, and such a temporary file was
  published)."""
  from dpgeng_jax import outputs
  out = tmp_path / "run"
  if at == "prepare":
    snap = str(out) + ".at-kill"

    def killed(path):
      shutil.copytree(os.path.join(out, outputs.STAGING), snap, symlinks=True)
      raise Killed()
    monkeypatch.setattr(pipeline.store_lib, "prepare_published", killed)

    def restore():
      staging = os.path.join(out, outputs.STAGING)
      shutil.rmtree(staging)
      os.replace(snap, staging)
  else:
    restore = _killed_as(monkeypatch, out, "metrics.json")
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *FLAGS])
  monkeypatch.undo()
  restore()
  staged = out / outputs.STAGING / pipeline.STAGES_DIR
  record = (staged / "state.json").read_text()
  assert "train_hmac" in record and not (staged / outputs.FOLDER_MARK).exists()
  (staged / ".state.jsonx1y2.tmp").write_text(record)  # a killed write's
  _count_again(monkeypatch, calls)
  calls.update({k: 0 for k in MECHANISMS})
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert "it is complete now" in capsys.readouterr().err
  assert calls == {k: 0 for k in MECHANISMS}
  assert outputs.read_manifest(str(out)) is not None
  published = out / "stages"
  assert not any("train_hmac" in p.read_text(errors="ignore")
                 for p in published.rglob("*") if p.is_file()
                 and p.suffix in (".json", ".tmp"))
  assert not list(published.rglob("*.tmp"))


def test_a_publish_stopped_before_its_manifest_is_completed_not_stuck(
    tmp_path, monkeypatch, capsys):
  """Stopped after every output had moved but before manifest.json:
  --resume said there was nothing to resume, a new run that there was
  an unfinished one to resume, and `dpgeng report` to resume it (a
  review's finding). The next command on the folder completes it."""
  out = tmp_path / "run"
  failed = _failing_replace(monkeypatch, lambda s, d: d == str(
      out / outputs.MANIFEST))
  assert cli.main(["distill", "--out", str(out), *FLAGS]) == 1
  assert failed and outputs.read_manifest(str(out)) is None
  monkeypatch.undo()
  capsys.readouterr()
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert "it is complete now" in capsys.readouterr().err
  assert outputs.read_manifest(str(out)) is not None
  assert not (out / outputs.STAGING).exists()
  assert cli.main(["report", str(out)]) == 0


MERF_FLAGS = ["--method", "generator", "--generator", "merf", "--ipc", "1",
              "--no-eval", "--generator-steps", "3", "--generator-features",
              "16", "--generated-per-class", "4", "--pool-models", "1",
              "--pool-checkpoints", "1", "--pool-epochs", "1",
              "--extractor-width", "8", "--deterministic", "--quiet"]


def test_a_run_killed_in_dp_merfs_training_reuses_its_release(
    tmp_path, monkeypatch):
  """DP-MERF's one release was not checkpointed: a run killed while its
  generator trained drew the release again on resume (lost work; nothing
  derived from the first had left the process; a review's finding). It
  is saved as drawn and reused, and the resumed run equals an
  uninterrupted one (deterministic test mode)."""
  whole = tmp_path / "whole"
  assert cli.main(["distill", "--out", str(whole), *MERF_FLAGS]) == 0
  drawn = []
  real_release, real_train = merf.release_class_features, merf.train_generator
  monkeypatch.setattr(merf, "release_class_features",
                      lambda *a, **k: drawn.append(1) or real_release(*a, **k))

  def killed(*a, **k):
    raise Killed("training")
  monkeypatch.setattr(merf, "train_generator", killed)
  out = tmp_path / "run"
  with pytest.raises(Killed):
    cli.main(["distill", "--out", str(out), *MERF_FLAGS])
  assert len(drawn) == 1
  saved = store.StageStore(str(out / outputs.STAGING / "stages"))
  assert saved.partial("generate")[merf.RELEASE].shape[0] == 1
  monkeypatch.setattr(merf, "train_generator", real_train)
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert len(drawn) == 1  # reused, not drawn again
  for name in ("distilled.npz", "stages/generate/arrays.npz"):
    with np.load(whole / name) as a, np.load(out / name) as b:
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
  assert json.loads((out / "privacy.json").read_text()) == json.loads(
      (whole / "privacy.json").read_text())


def test_a_saved_dp_merf_release_of_other_settings_is_refused():
  """A release drawn with other settings (a plug-in given from Python
  with another noise or feature count) is not reused as this run's."""
  r = np.ones((1, 2, 5), np.float32)
  same = np.asarray('{"noise_multiplier": 2.0}')
  assert merf._saved_release(None, same) is None
  np.testing.assert_array_equal(
      merf._saved_release({merf.RELEASE: r, merf.SETUP: same}, same), r[0])
  for bad in ({merf.RELEASE: r, merf.SETUP: np.asarray("other")},
              {merf.RELEASE: r[0], merf.SETUP: same},
              {merf.RELEASE: r * np.nan, merf.SETUP: same}):
    with pytest.raises(ValueError, match="does not fit"):
      merf._saved_release(bad, same)
