"""Hostile or unusual inputs to `dpgeng distill` and `dpgeng plan` end in
one `dpgeng: error:` line before any work, not in a traceback, a hang or
gigabytes of memory (found by a fuzzing review of the command line)."""

import os
import warnings
import zipfile

import numpy as np
import pytest

from dpgeng_jax import cli


def _dataset(path, n=40, classes=4, shape=(8, 8)):
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
           y_train=np.arange(n) % classes,
           x_test=rng.integers(0, 256, (12, *shape), dtype=np.uint8),
           y_test=np.arange(12) % classes)
  return path


def _one_line_error(capsys, argv, message):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  # (The command says the configuration's field names as flags.)
  assert err.startswith("dpgeng: error:") and cli.as_flags(message) in err, (
      err)
  assert "Traceback" not in err and err.count("\n") == 1, err
  return err


@pytest.mark.parametrize("flags,message", [
    (["--sampling-rate", "1e-160"], "sampling_rate must be in [1e-12, 1]"),
    (["--expert", "--expert-sampling-rate", "1e-300"],
     "expert_sampling_rate must be in [1e-12, 1]"),
    (["--clip-norm", "1e-300"], "outside the range an exact fixed-point"),
    (["--delta", "5e-324"], "delta must be >= 1e-300"),
])
def test_tiny_budget_values_are_refused_in_one_line(capsys, flags, message):
  """They ended in OverflowError tracebacks (a rate of 1e-160 squared its
  reciprocal past a float) or in scipy's 'f(a) and f(b) must have
  different signs'."""
  _one_line_error(capsys, ["plan", *flags], message)


def test_the_smallest_delta_still_plans(capsys):
  assert cli.main(["plan", "--delta", "1e-300"]) == 0
  assert "at delta 1e-300" in capsys.readouterr().out


def test_a_pipe_as_an_input_file_is_refused_not_waited_on(tmp_path, capsys):
  """A FIFO with no writer blocked the run forever at the npz check."""
  fifo = tmp_path / "data.npz"
  os.mkfifo(fifo)
  _one_line_error(capsys, ["distill", "--dataset", f"npz:{fifo}", "--out",
                           str(tmp_path / "out")], "is not a regular file")
  _one_line_error(capsys, ["distill", "--generator", f"npz:{fifo}",
                           "--generated-epsilon", "1", "--out",
                           str(tmp_path / "out")], "is not a regular file")
  assert not (tmp_path / "out").exists()


def test_a_pipe_named_like_a_font_is_skipped(tmp_path):
  from dpgeng_jax.generators.apis import text
  fonts = tmp_path / "fonts"
  fonts.mkdir()
  os.mkfifo(fonts / "a.ttf")
  with pytest.raises(ValueError, match="0 .ttf/.otf files"):
    text.usable_fonts(["0"], str(fonts))


def _truncated(path):
  np.savez(path, x=np.zeros((8, 8, 8, 1), np.float32), y=np.arange(8) % 4)
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])


def _corrupt(path):
  np.savez_compressed(path, x=np.zeros((8, 8, 8, 1), np.float32),
                      y=np.arange(8) % 4)
  raw = bytearray(path.read_bytes())
  for i in range(60, 80):
    raw[i] ^= 0xFF
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncated, _corrupt])
@pytest.mark.parametrize("spec", ["npz:", "pe:nearest:"])
def test_a_damaged_generator_file_is_a_one_line_error(tmp_path, capsys,
                                                      damage, spec):
  """The dataset loader named a truncated or corrupt file; the external
  and nearest-image generators let zipfile's and zlib's errors through."""
  data = _dataset(tmp_path / "d.npz")
  gen = tmp_path / "g.npz"
  damage(gen)
  extra = ["--generated-epsilon", "1"] if spec == "npz:" else []
  _one_line_error(capsys, ["distill", "--dataset", f"npz:{data}",
                           "--generator", f"{spec}{gen}", *extra,
                           "--delta", "1e-3", "--out",
                           str(tmp_path / "out")], str(gen))
  assert not (tmp_path / "out").exists()


def test_a_huge_declared_number_of_classes_is_refused_before_any_tally(
    tmp_path, capsys):
  """--num-classes 10^12 was tallied first (np.bincount of 10^12 entries:
  a MemoryError traceback; 10^9 took 9 GB and 22 s)."""
  data = _dataset(tmp_path / "d.npz")
  _one_line_error(capsys, ["distill", "--dataset", f"npz:{data}",
                           "--num-classes", str(10 ** 12), "--out",
                           str(tmp_path / "out")],
                  "num_classes=1000000000000 is more than there are "
                  "training examples")


def test_label_errors_do_not_print_the_private_labels(tmp_path, capsys):
  """Like the pixel range errors, label errors say which side is out of
  range, not the private data's extreme value."""
  data = tmp_path / "d.npz"
  rng = np.random.default_rng(0)
  np.savez(data, x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
           y_train=np.r_[np.arange(39) % 4, 987],
           x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
           y_test=np.arange(12) % 4)
  err = _one_line_error(capsys, ["distill", "--dataset", f"npz:{data}",
                                 "--num-classes", "4", "--out",
                                 str(tmp_path / "out")],
                        "y_train has labels >= num_classes=4")
  assert "987" not in err
  np.savez(data, x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
           y_train=np.r_[np.arange(39) % 4, -654],
           x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
           y_test=np.arange(12) % 4)
  err = _one_line_error(capsys, ["distill", "--dataset", f"npz:{data}",
                                 "--out", str(tmp_path / "out")],
                        "negative labels")
  assert "654" not in err


def test_an_npz_declaring_more_than_the_machines_memory_is_refused_unread(
    tmp_path, capsys, monkeypatch):
  """The zip directory's sizes are checked before np.load allocates (a
  91 MB file of deflated zeros declared 19.5 GiB); shown with the
  machine's memory made smaller than the file's arrays."""
  from dpgeng_jax import data as data_lib
  path = _dataset(tmp_path / "d.npz")
  with zipfile.ZipFile(path) as z:
    size = sum(i.file_size for i in z.infolist())
  monkeypatch.setattr(data_lib, "physical_memory", lambda: size - 1)
  _one_line_error(capsys, ["distill", "--dataset", f"npz:{path}", "--out",
                           str(tmp_path / "out")],
                  "more than this machine's memory")


@pytest.mark.parametrize("flags,message", [
    (["--num-processes", "-3"], "num_processes=-3 must be >= 1"),
    (["--num-processes", "2", "--process-id", "5",
      "--coordinator-address", "127.0.0.1:1"], "process_id=5 is outside"),
    (["--num-processes", "2", "--process-id", "1", "--coordinator-address",
      "::1"], "'::1' is not HOST:PORT"),
    (["--num-processes", "1", "--process-id", "0", "--coordinator-address",
      "garbage"], "'garbage' is not HOST:PORT"),
    (["--process-id", "3"], "process id 3 given without a coordinator"),
])
def test_bad_multi_process_settings_are_one_line_errors(tmp_path, capsys,
                                                        flags, message):
  """They were ValueError and IndexError tracebacks from JAX's start-up,
  or (a lone --process-id) silently a single-process run. (What is not
  given JAX may detect on a cluster: a missing id is JAX's to refuse.)"""
  _one_line_error(capsys, ["distill", *flags, "--out", str(tmp_path / "o")],
                  message)


def test_a_process_id_that_jax_cannot_detect_is_a_one_line_error(tmp_path):
  """No --process-id and no cluster to detect it from: JAX's ValueError
  ('The process id of the current process must be defined') was a
  traceback. A fresh process: JAX starts only before any computation."""
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "SLURM_", "OMPI_", "PMI_"))}
  proc = subprocess.run(
      [sys.executable, "-m", "dpgeng_jax", "distill", "--num-processes", "2",
       "--coordinator-address", "127.0.0.1:1", "--out", str(tmp_path / "o")],
      capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.startswith("dpgeng: error: cannot start the "
                                "multi-process run: "), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_an_unreachable_coordinator_is_an_error_not_a_five_minute_hang():
  """A process other than 0 waits for the coordinator in Python (JAX's own
  wait ignored SIGTERM and ended in a C++ abort after 300 s)."""
  import socket
  import time
  from dpgeng_jax import parallel
  from dpgeng_jax.errors import ConfigError
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  t = time.monotonic()
  with pytest.raises(ConfigError, match=f"cannot reach the coordinator "
                     f"127.0.0.1:{port} within 1 s"):
    parallel.initialize(f"127.0.0.1:{port}", 2, 1, timeout_s=1)
  assert time.monotonic() - t < 10


@pytest.mark.parametrize("flags,message", [
    (["--extractor-width", "200000"], "--extractor-width 200000: a 3x3 "
     "convolution kernel of the extractors alone needs"),
    (["--eval-width", "200000"], "--eval-width 200000"),
    (["--generated-per-class", "50000000"], "--generated-per-class 50000000:"
     " the generated set alone needs"),
    (["--pe-population", "50000000"], "--pe-population 50000000"),
    (["--generator", "merf", "--generator-features", "1000000000"],
     "--generator-features 1000000000: DP-MERF's random-feature matrix"),
])
def test_sizes_whose_arrays_cannot_fit_are_refused_before_any_release(
    tmp_path, capsys, monkeypatch, flags, message):
  """Only --ipc had such a check: these ended in out-of-memory tracebacks
  or a C++ abort, some after the count release. Refused before it."""
  from dpgeng_jax import data as data_lib, pipeline
  calls = []
  monkeypatch.setattr(pipeline.stages, "class_sizes",
                      lambda *a: calls.append(a))
  # 16 GiB: each size below needs more, whatever this machine has (the
  # digits' own arrays need far less).
  monkeypatch.setattr(data_lib, "physical_memory", lambda: 16 * 2 ** 30)
  _one_line_error(capsys, ["distill", *flags, "--out", str(tmp_path / "o")],
                  message)
  assert not calls and not (tmp_path / "o").exists()


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 2.98 GiB"),
    "jax",  # XLA's RESOURCE_EXHAUSTED
])
def test_running_out_of_memory_mid_run_is_one_line_with_the_resume_hint(
    tmp_path, capsys, monkeypatch, error):
  """An allocation that fails inside a stage ended in a traceback; it is
  one line, with the --resume line where stages were saved."""
  import jax
  from dpgeng_jax import outputs, pipeline
  if error == "jax":
    error = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory allocating 1440000000000 bytes")
  out = tmp_path / "o"

  def run(cfg, store=None):
    store.start({}, {})
    store.save("calibrate", info=[])  # a finished stage
    raise error
  monkeypatch.setattr(pipeline, "run", run)
  assert cli.main(["distill", "--out", str(out), "--quiet"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error: out of memory (") and (
      "Traceback" not in err)
  assert f"continue with: dpgeng distill --resume {out}" in err
  assert (out / outputs.STAGING).is_dir()


def test_an_out_that_is_a_dangling_link_is_named_as_one(tmp_path, capsys):
  """It said 'cannot create --out ...: File exists'."""
  link = tmp_path / "out"
  os.symlink(tmp_path / "nowhere", link)
  _one_line_error(capsys, ["distill", "--out", str(link)],
                  "is a symbolic link to")
  assert os.path.islink(link) and not (tmp_path / "nowhere").exists()


def test_float_images_scaled_twice_are_warned_about():
  from dpgeng_jax import data
  rng = np.random.default_rng(0)
  x = (rng.integers(0, 256, (20, 8, 8, 1)) / 255.0 / 255.0).astype(
      np.float32)
  y = np.arange(20) % 2
  with pytest.warns(UserWarning, match="no value above 1/255"):
    data.from_arrays(x, y, x[:4], y[:4])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.from_arrays(x * 255.0, y, x[:4] * 255.0, y[:4])


def test_a_preset_of_only_commas_is_refused(capsys):
  """It ran as no preset while config.json recorded ", ," as one."""
  _one_line_error(capsys, ["plan", "--preset", ", ,"], "names no preset")


def test_a_data_error_names_the_values_a_preset_supplied(tmp_path, capsys):
  """--preset celeb_a sets num_classes 2: the error blamed num_classes=2,
  which the user never gave."""
  data = _dataset(tmp_path / "d.npz")
  err = _one_line_error(capsys, ["distill", "--preset", "celeb_a",
                                 "--dataset", f"npz:{data}", "--out",
                                 str(tmp_path / "o")],
                        "y_train has labels >= num_classes=2")
  assert "(from --preset celeb_a: " in err and "--num-classes=2" in err
  err = _one_line_error(capsys, ["distill", "--preset", "celeb_a",
                                 "--num-classes", "3", "--dataset",
                                 f"npz:{data}", "--out",
                                 str(tmp_path / "o")], "num_classes=3")
  assert "num-classes=2" not in err


def test_plan_says_when_a_declared_class_count_does_not_fit_the_dataset(
    capsys):
  """It printed a normal plan for --num-classes 10^12 on the digits."""
  assert cli.main(["plan", "--num-classes", str(10 ** 12)]) == 0
  assert "note: --num-classes 1000000000000, but digits has 10 classes" in (
      capsys.readouterr().out)
  assert cli.main(["plan", "--num-classes", "10"]) == 0
  assert "--num-classes" not in capsys.readouterr().out
