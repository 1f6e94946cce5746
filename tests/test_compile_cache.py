"""The dpgeng command's persistent compilation cache holds no private data.

A cache entry is a compiled program; a private array would be in it only
if it were a compile-time constant (closed over by a jitted function).
These tests scan every entry (decompressed as jax stores it) for the
bytes of the private images, on a real `dpgeng distill` run, and check
that the scan finds an array that IS closed over (the broken variant).
"""

import os
import subprocess
import sys
import zlib

import numpy as np

from dpgeng_jax import data

SMALL = ["--ipc", "1", "--steps", "2", "--num-queries", "2",
         "--extractor-width", "4", "--eval-width", "4", "--eval-models", "1",
         "--eval-epochs", "1", "--pe-iterations", "1", "--pe-population",
         "4", "--pe-width", "4", "--generated-per-class", "4",
         "--pool-models", "1", "--pool-checkpoints", "1", "--pool-epochs",
         "1", "--expert-steps", "2", "--expert", "--quiet"]


def _entries(cache_dir):
  from jax._src import compilation_cache
  out = []
  files = [os.path.join(root, f) for root, _, names in os.walk(cache_dir)
           for f in names]
  for path in sorted(files):
    raw = open(path, "rb").read()
    try:
      out.append(compilation_cache.decompress_executable(raw))
    except Exception:  # not an entry jax wrote
      out.append(zlib.decompress(raw) if raw[:1] == b"x" else raw)
  return out


def _private_windows(x: np.ndarray, rows=(0, 7, 23, 41)):
  """Byte windows of private images as a program would hold them: the
  [0, 1] pixels and the normalised values, float32."""
  ds = data.from_arrays(x, np.arange(len(x)) % 3, x[:3], np.arange(3),
                        name="cache-test")
  forms = [np.asarray(ds.x_train, np.float32),
           np.asarray(ds.normalize(ds.x_train), np.float32)]
  return [f[r].reshape(-1)[8:24].tobytes() for f in forms for r in rows]


def _found(cache_dir, windows) -> bool:
  return any(w in e for e in _entries(cache_dir) for w in windows)


def _dataset(path):
  rng = np.random.default_rng(11)
  x = rng.random((60, 8, 8, 1)).astype(np.float32)  # distinctive pixels
  np.savez(path, x_train=x, y_train=np.arange(60) % 3, x_test=x[:12],
           y_test=np.arange(12) % 3)
  return x


def _distill(tmp_path, cache, *flags):
  env = dict(os.environ, DPGENG_CACHE_DIR=str(cache))
  return subprocess.run(
      [sys.executable, "-m", "dpgeng_jax", "distill", "--dataset",
       f"npz:{tmp_path / 'd.npz'}", "--out",
       str(tmp_path / f"run_{cache.name}"),
       "--epsilon", "4", "--delta", "1e-3", *SMALL, *flags], env=env,
      capture_output=True, text=True, timeout=900)


def test_the_cache_of_a_run_holds_none_of_the_private_data(tmp_path):
  x = _dataset(tmp_path / "d.npz")
  cache = tmp_path / "cache"
  proc = _distill(tmp_path, cache)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len(_entries(cache)) > 10  # the run's programs were cached
  assert not _found(cache, _private_windows(x))
  # --no-compile-cache: nothing is written.
  off = tmp_path / "off"
  proc = _distill(tmp_path, off, "--no-compile-cache")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not off.exists() or not _entries(off)


def test_the_scan_finds_an_array_closed_over_by_a_jitted_function(tmp_path):
  x = _dataset(tmp_path / "d.npz")
  cache = tmp_path / "cache"
  code = f"""
import os
os.environ["DPGENG_CACHE_DIR"] = {str(cache)!r}
import jax, jax.numpy as jnp, numpy as np
from dpgeng_jax import cli, data
from dpgeng_jax.config import Config
cli._use_compile_cache(Config())  # the command's cache settings
with np.load({str(tmp_path / 'd.npz')!r}) as f:
  ds = data.from_arrays(f["x_train"], f["y_train"], f["x_test"], f["y_test"],
                        name="cache-test")
private = jnp.asarray(ds.normalize(ds.x_train))
print(jax.jit(lambda w: (private * w).sum())(2.0))  # closes over the data
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _found(cache, _private_windows(x))


def test_an_unusable_cache_directory_is_one_line_and_no_cache(
    tmp_path, monkeypatch, capsys):
  """A cache path that cannot be created (here below a regular file; a
  read-only home alike) turns the cache off with one line, instead of a
  JAX warning at every compilation; a usable one is set."""
  import jax
  from dpgeng_jax import cli
  from dpgeng_jax.config import Config
  set_ = {}
  monkeypatch.setattr(jax.config, "update",
                      lambda k, v: set_.__setitem__(k, v))
  (tmp_path / "afile").write_text("x")
  monkeypatch.setenv("DPGENG_CACHE_DIR", str(tmp_path / "afile" / "xla"))
  cli._use_compile_cache(Config())
  err = capsys.readouterr().err
  assert set_ == {} and len(err.splitlines()) == 1
  assert err.startswith("dpgeng: compiling without the compilation cache")
  monkeypatch.setenv("DPGENG_CACHE_DIR", str(tmp_path / "ok"))
  cli._use_compile_cache(Config())
  assert set_["jax_compilation_cache_dir"] == str(tmp_path / "ok")
  assert capsys.readouterr().err == ""
