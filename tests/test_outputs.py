"""--out as one locked, atomically published set that never touches a
user's files (outputs.RunDirectory and the `dpgeng distill` command)."""

import collections
import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from dpgeng_jax import cli, data, outputs, pipeline, store
from dpgeng_jax.errors import ConfigError

TINY = ["--method", "ndpdc", "--ipc", "2", "--steps", "2", "--num-queries",
        "2", "--extractor-width", "8", "--deterministic", "--no-eval",
        "--quiet"]
USER_FILES = {"metrics.json": b'{"mine": 1}', "generated_grid.png": b"png?",
              "config.json": b'{"lr": 3}', "grid.png": b"mine",
              "notes.txt": b"my notes"}


def _distill(out, *flags):
  return cli.main(["distill", "--out", str(out), *TINY, *flags])


def _user_dir(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  for name, raw in USER_FILES.items():
    (out / name).write_bytes(raw)
  return out


def _no_data_read(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("the dataset was read before --out was checked")
  monkeypatch.setattr(data, "load_dataset", refuse)


def test_users_files_are_never_touched_without_overwrite(tmp_path, capsys,
                                                         monkeypatch):
  out = _user_dir(tmp_path)
  _no_data_read(monkeypatch)
  assert _distill(out) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and "metrics.json" in err
  assert {p.name: p.read_bytes() for p in out.iterdir()} == USER_FILES


def test_overwrite_replaces_only_the_tools_own_names(tmp_path):
  out = _user_dir(tmp_path)
  assert _distill(out, "--overwrite") == 0
  assert (out / "notes.txt").read_bytes() == b"my notes"
  # --no-eval writes no metrics.json: the user's file of that name is one
  # of our names, so --overwrite removes it; generated_grid.png likewise.
  assert not (out / "metrics.json").exists()
  assert not (out / "generated_grid.png").exists()
  manifest = json.loads((out / outputs.MANIFEST).read_text())
  assert set(manifest["files"]) == {"distilled.npz", "privacy.json",
                                    "config.json", "grid.png", "init_grid.png",
                                    "loss.png", "report.html", "stages"}
  assert sorted(p.name for p in out.iterdir()) == sorted(
      manifest["files"] + [outputs.MANIFEST, "notes.txt"])


def test_finished_run_is_refused_and_replaced_with_overwrite(tmp_path,
                                                             capsys):
  out = tmp_path / "run"
  assert _distill(out) == 0
  before = (out / "distilled.npz").read_bytes()
  assert _distill(out, "--seed", "1") == 2
  assert "already holds a finished run" in capsys.readouterr().err
  assert (out / "distilled.npz").read_bytes() == before
  assert _distill(out, "--seed", "1", "--overwrite") == 0
  assert (out / "distilled.npz").read_bytes() != before


def test_second_run_into_a_locked_out_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  with pipeline.output_dir(str(out), False):
    _no_data_read(monkeypatch)
    assert _distill(out) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and str(os.getpid()) in err
  assert not out.exists()  # the holder wrote nothing and cleaned up


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout
  (out / outputs.LOCK).write_text(dead)
  assert _distill(out) == 0
  assert not (out / outputs.LOCK).exists()


def _die_at_second_publish_move(monkeypatch, out):
  """Publishing into `out` moves one staged file, then is interrupted
  (Ctrl-C) at the second move; returns the list of moved paths."""
  real_replace, moved = os.replace, []

  def replace_then_die(src, dst):
    if os.path.basename(os.path.dirname(src)) == outputs.STAGING and (
        os.path.dirname(dst) == str(out)):
      if moved:
        raise KeyboardInterrupt
      moved.append(dst)
    return real_replace(src, dst)

  monkeypatch.setattr(outputs.os, "replace", replace_then_die)
  return moved


def test_interrupted_publish_leaves_no_finished_looking_set(tmp_path,
                                                           monkeypatch,
                                                           capsys):
  """A kill between the renames of the publish: the manifest (written
  last) is absent, so no reader takes the partial set for a run; every
  output was complete (staged), so the next command on the folder
  completes the publish (here a new run, which it then refuses as
  finished) rather than overwriting it silently."""
  out = tmp_path / "run"
  moved = _die_at_second_publish_move(monkeypatch, out)
  assert _distill(out) == 130  # interrupted: one line, no traceback
  assert f"--resume {out}" in capsys.readouterr().err
  monkeypatch.undo()
  assert len(moved) == 1 and os.path.exists(moved[0])
  assert outputs.read_manifest(str(out)) is None
  assert _distill(out) == 2
  err = capsys.readouterr().err
  assert "already holds a finished run" in err
  assert outputs.read_manifest(str(out)) is not None
  assert not (out / outputs.STAGING).exists()
  assert _distill(out, "--overwrite") == 0
  assert outputs.read_manifest(str(out)) is not None


@pytest.mark.parametrize("where", ["under_a_file", "proc", "read_only"])
def test_unwritable_out_fails_before_the_data_is_read(tmp_path, capsys,
                                                      monkeypatch, where):
  if where == "under_a_file":
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "run"
  elif where == "proc":
    out = "/proc/dpgeng_run"
  else:
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode bits: as for a user
      real_mkdir = os.mkdir

      def denied(path, *a, **k):
        if os.path.dirname(os.path.abspath(path)) == str(ro):
          raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)
      monkeypatch.setattr(os, "mkdir", denied)
    out = ro / "run"
  _no_data_read(monkeypatch)
  assert _distill(out) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and "--out" in err


def test_read_only_mount_fails_before_the_data_is_read(tmp_path, capsys,
                                                       monkeypatch):
  """A directory that exists but refuses writes (EROFS/EACCES): simulated
  by making the lock file's creation fail as on a read-only mount."""
  out = tmp_path / "mounted"
  out.mkdir()
  real_open = os.open

  def erofs(path, flags, *a):
    if str(path).startswith(str(out)) and flags & os.O_CREAT:
      raise OSError(30, "Read-only file system", str(path))
    return real_open(path, flags, *a)

  monkeypatch.setattr(outputs.os, "open", erofs)
  _no_data_read(monkeypatch)
  assert _distill(out) == 2
  assert "Read-only file system" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_files_follow_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    with pipeline.output_dir(str(tmp_path / "run"), False) as rd:
      rd.write("privacy.json", lambda f: f.write("{}"))
      paths = rd.publish()
  finally:
    os.umask(old)
  for path in paths + [str(tmp_path / "run" / outputs.MANIFEST)]:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


@pytest.mark.parametrize("kind", ["file", "link"])
def test_overwrite_replaces_a_file_or_link_named_like_an_output_directory(
    tmp_path, kind):
  """A file or a symbolic link named `stages` (a directory output) is
  replaced by the run's directory; a link's target is left alone."""
  out = tmp_path / "out"
  out.mkdir()
  target = tmp_path / "elsewhere"
  target.mkdir()
  (target / "mine.txt").write_text("keep")
  if kind == "file":
    (out / "stages").write_text("mine")
  else:
    (out / "stages").symlink_to(target, target_is_directory=True)
  assert _distill(out, "--overwrite") == 0
  assert (out / "stages").is_dir() and not (out / "stages").is_symlink()
  assert (target / "mine.txt").read_text() == "keep"


def test_an_unfinished_run_is_refused_with_the_resume_command(tmp_path,
                                                              capsys):
  out = tmp_path / "out"
  staging = out / outputs.STAGING
  staging.mkdir(parents=True)
  (staging / "stages").mkdir()
  assert _distill(out) == 2
  err = capsys.readouterr().err
  assert "unfinished run" in err and f"--resume {out}" in err


def test_a_link_in_the_locks_place_is_refused_and_its_target_untouched(
    tmp_path, capsys, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  (out / outputs.LOCK).symlink_to(victim)
  _no_data_read(monkeypatch)
  assert _distill(out) == 2
  assert "symbolic link" in capsys.readouterr().err
  assert victim.read_text() == "precious"
  assert (out / outputs.LOCK).is_symlink()


def test_a_link_in_the_staging_folders_place_is_refused(tmp_path, capsys,
                                                        monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  target = tmp_path / "elsewhere"
  target.mkdir()
  (target / "mine.txt").write_text("keep")
  (out / outputs.STAGING).symlink_to(target, target_is_directory=True)
  _no_data_read(monkeypatch)
  for flags in ((), ("--overwrite",)):
    assert _distill(out, *flags) == 2
    assert "symbolic link" in capsys.readouterr().err
  assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_a_users_folder_with_an_output_name_is_kept_even_with_overwrite(
    tmp_path, capsys, monkeypatch):
  """--overwrite replaces files with the tool's names, never a whole folder
  that no finished run of the tool lists."""
  out = tmp_path / "out"
  (out / "stages").mkdir(parents=True)
  (out / "stages" / "keep.txt").write_text("mine")
  _no_data_read(monkeypatch)
  assert _distill(out, "--overwrite") == 2
  assert "never replaced" in capsys.readouterr().err
  assert (out / "stages" / "keep.txt").read_text() == "mine"


def test_a_manifest_anyone_wrote_is_no_licence_to_delete_a_folder(
    tmp_path, capsys, monkeypatch):
  """A manifest.json that lists `stages` (any JSON a user or another tool
  wrote) made --overwrite delete the user's stages/ folder; only the
  tool's own mark inside a folder counts now."""
  out = tmp_path / "out"
  (out / "stages").mkdir(parents=True)
  (out / "stages" / "plan.txt").write_text("mine")
  (out / outputs.MANIFEST).write_text('{"files": ["stages"]}')
  _no_data_read(monkeypatch)
  assert _distill(out, "--overwrite") == 2
  assert "never replaced" in capsys.readouterr().err
  assert (out / "stages" / "plan.txt").read_text() == "mine"


def test_a_finished_run_from_before_the_folder_mark_is_still_replaced(
    tmp_path):
  """Runs published before folders carried the mark have an unmarked
  stages/ that their manifest lists and that holds a stage record:
  --overwrite replaces it (it was refused as 'not written by the tool')."""
  out = tmp_path / "out"
  (out / "stages").mkdir(parents=True)
  (out / "stages" / "state.json").write_text(
      '{"format": 1, "finished": ["calibrate"]}')
  (out / outputs.MANIFEST).write_text('{"files": ["stages"]}')
  rd = outputs.RunDirectory(str(out), overwrite=True, names=("stages",))
  with rd:
    os.mkdir(os.path.join(rd.staging, "stages"))
    rd.adopt("stages")
    rd.publish()
  assert os.listdir(out / "stages") == [outputs.FOLDER_MARK]


def test_a_resumed_run_never_replaces_a_users_folder(tmp_path):
  """--resume skipped the folder check and its publish deleted a user's
  unmarked stages/ folder."""
  out = tmp_path / "out"
  (out / outputs.STAGING).mkdir(parents=True)
  (out / outputs.STAGING / "x").write_text("staged")
  (out / "stages").mkdir()
  (out / "stages" / "mine.txt").write_text("mine")
  rd = outputs.RunDirectory(str(out), overwrite=False, names=("stages",),
                            resume=True)
  with pytest.raises(ConfigError, match="never replaced"):
    rd.open()
  assert (out / "stages" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("content", ["[1, 2]", '"x"', '{"files": 3}',
                                     '{"files": [1]}'])
def test_a_manifest_that_is_not_a_json_object_of_names_is_no_crash(
    tmp_path, capsys, monkeypatch, content):
  """A list in manifest.json crashed the checks (AttributeError); such a
  file counts as a finished run's listing nothing."""
  out = tmp_path / "out"
  out.mkdir()
  (out / outputs.MANIFEST).write_text(content)
  assert outputs.read_manifest(str(out))["files"] == []
  _no_data_read(monkeypatch)
  assert _distill(out) == 2
  assert "already holds a finished run" in capsys.readouterr().err


def test_a_folder_named_manifest_json_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch):
  """It passed as a finished run, and with --overwrite the run spent its
  budget and then failed to publish (os.remove on a folder)."""
  out = tmp_path / "out"
  (out / outputs.MANIFEST).mkdir(parents=True)
  (out / outputs.MANIFEST / "mine.txt").write_text("mine")
  _no_data_read(monkeypatch)
  for flags in ((), ("--overwrite",)):
    assert _distill(out, *flags) == 2
    assert "not a manifest of this tool" in capsys.readouterr().err
  assert (out / outputs.MANIFEST / "mine.txt").read_text() == "mine"


def test_an_out_where_publishing_would_replace_an_input_is_refused(
    tmp_path, capsys, monkeypatch):
  """The private dataset at --out/distilled.npz was replaced by the
  distilled set under --overwrite (the refusal without it even suggested
  --overwrite)."""
  out = tmp_path / "out"
  out.mkdir()
  rng = np.random.default_rng(0)
  x, y = rng.random((20, 8, 8, 1)).astype(np.float32), np.arange(20) % 2
  path = out / "distilled.npz"
  np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
  before = path.read_bytes()
  _no_data_read(monkeypatch)
  for flags in ((), ("--overwrite",)):
    assert _distill(out, "--dataset", f"npz:{path}", *flags) == 2
    assert "holds the input" in capsys.readouterr().err
  assert path.read_bytes() == before
  nested = out / "stages" / "d.npz"
  # Inside a folder the run would replace (the tool's own `stages`, its
  # mark in place): refused too. Without the check of nested paths the
  # run exited 0 and deleted the dataset (a review's mutation).
  nested.parent.mkdir()
  (nested.parent / outputs.FOLDER_MARK).write_text("")
  path.rename(nested)
  assert _distill(out, "--dataset", f"npz:{nested}", "--overwrite") == 2
  assert "holds the input" in capsys.readouterr().err
  assert nested.read_bytes() == before
  assert pipeline.input_paths(pipeline.Config(
      dataset=f"npz:{nested}", generator="pe:nearest:/p.npz",
      pe_font_dir="/f")) == (str(nested), "/p.npz", "/f")


def test_a_full_disk_while_saving_a_stage_is_one_os_error(tmp_path,
                                                          monkeypatch):
  """orbax reported ENOSPC from its writer threads as ValueError (a
  traceback per thread, none of the command's one-line message)."""
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1, 1, 10))
  with pytest.raises(OSError) as e:
    store._save_tree(str(tmp_path / "t"), {"w": np.ones(8)})
  assert e.value.errno == errno.ENOSPC
  assert not (tmp_path / "t").exists()


def test_an_interrupted_command_ends_with_os_exit_130(monkeypatch):
  """The interpreter's teardown after an interrupt crashed in XLA's
  threads (status 139); the console command ends with os._exit(130)."""
  def fake_exit(code):
    raise SystemExit(("os._exit", code))
  monkeypatch.setattr(cli, "main", lambda argv, console: 130)
  monkeypatch.setattr(os, "_exit", fake_exit)
  with pytest.raises(SystemExit) as e:
    cli.entry_point()
  assert e.value.code == ("os._exit", 130)
  monkeypatch.setattr(cli, "main", lambda argv, console: 2)
  assert cli.entry_point() == 2


def test_a_publish_killed_after_its_first_move_can_be_resumed(tmp_path,
                                                              monkeypatch,
                                                              capsys):
  """The saved stages move last, so a publish killed between its renames
  leaves them in the staging folder: --resume finishes the run from them
  (the releases are not drawn again)."""
  out = tmp_path / "run"
  _die_at_second_publish_move(monkeypatch, out)
  assert _distill(out) == 130
  monkeypatch.undo()
  assert os.path.isdir(out / outputs.STAGING / pipeline.STAGES_DIR)
  capsys.readouterr()
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert outputs.read_manifest(str(out)) is not None
  assert (out / pipeline.STAGES_DIR / outputs.FOLDER_MARK).exists()


def test_an_overwrite_killed_before_its_publish_resumes_over_the_old_run(
    tmp_path, monkeypatch, capsys):
  """--overwrite over a finished run, stopped after its count release:
  the old run's manifest is still there, yet the printed --resume
  continues the new run (it had been refused as "finished", leaving only a
  new --overwrite, which draws the saved releases again) and replaces the
  old outputs when it publishes."""
  out = tmp_path / "run"
  assert _distill(out) == 0
  old = (out / "privacy.json").read_bytes()
  real = store.StageStore.save

  def save(self, name, *a, **k):
    real(self, name, *a, **k)
    if name == "class_sizes":
      raise KeyboardInterrupt
  monkeypatch.setattr(store.StageStore, "save", save)
  assert _distill(out, "--seed", "1", "--overwrite") == 130
  monkeypatch.undo()
  assert f"continue with: dpgeng distill --resume {out}" in (
      capsys.readouterr().err)
  assert (out / "privacy.json").read_bytes() == old
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 0
  assert json.loads((out / "config.json").read_text())["seed"] == 1
  assert outputs.read_manifest(str(out)) is not None
  assert not (out / outputs.STAGING).exists()
  capsys.readouterr()
  assert cli.main(["distill", "--resume", str(out), "--quiet"]) == 2
  assert "that run has finished" in capsys.readouterr().err


def test_the_published_stage_record_keeps_only_the_evaluation_result(
    tmp_path):
  """The evaluate stage's record holds what that stage computed; the
  timings and memory figures added to metrics.json afterwards (figures
  that grow with N) are not copied into stages/state.json."""
  out = tmp_path / "run"
  flags = [f for f in TINY if f != "--no-eval"]
  assert cli.main(["distill", "--out", str(out), *flags, "--eval-models",
                   "1", "--eval-epochs", "1", "--eval-width", "8"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert {"timings_s", "peak_rss_mb"} <= set(metrics)
  record = json.loads((out / pipeline.STAGES_DIR / store.STATE).read_text())
  saved = record["info"]["evaluate"]["metrics"]
  assert saved["test_accuracy_mean"] == metrics["test_accuracy_mean"]
  assert not {"timings_s", "peak_rss_mb", "method"} & set(saved)


def test_a_hard_link_in_the_locks_place_is_refused_and_its_file_kept(
    tmp_path, capsys, monkeypatch):
  """O_NOFOLLOW stops a symbolic link, not a hard one: the pid was written
  into whatever file the lock's name was linked to, even by a refused
  run."""
  _no_data_read(monkeypatch)
  out = tmp_path / "run"
  out.mkdir()
  mine = tmp_path / "notes.txt"
  mine.write_bytes(b"my notes")
  try:
    os.link(mine, out / outputs.LOCK)
  except OSError:
    pytest.skip("this file system has no hard links")
  assert _distill(out) == 2
  assert "a hard link to another file" in capsys.readouterr().err
  assert mine.read_bytes() == b"my notes"


def test_text_outputs_are_utf8_whatever_the_locale(tmp_path):
  """report.html holds the dataset's path and the class texts: written in
  an ASCII locale's encoding, a path like dse/ with an accent stopped the
  finished run at its publish with a traceback."""
  path = tmp_path / "r.html"
  code = ("import sys; from dpgeng_jax import outputs; "
          "outputs.atomic_write(sys.argv[1], lambda f: f.write('npz:/d\\u00e9/"
          "\\u4e2d.npz'))")
  env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C"}
  env.pop("PYTHONIOENCODING", None)
  subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(path)],
                 env=env, check=True, capture_output=True)
  assert path.read_bytes().decode("utf-8") == "npz:/d\u00e9/\u4e2d.npz"


@pytest.mark.parametrize("command", ["audit", "mia"])
def test_an_empty_out_is_refused_before_the_work(command, capsys):
  assert cli.main([command, "--out", ""]) == 2
  assert "--out is empty" in capsys.readouterr().err
