"""Suite-wide settings: a persistent XLA compilation cache shared by the
tests and the subprocesses they start (the suite compiles many identical
programs from fresh closures; compile time dominates it on 2 cores), and
XLA:CPU's backend optimisation level 0 (below)."""

import os
import tempfile

_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "dpgeng_jax_test_xla_cache"))
# Shared by the pytest-xdist workers (-n 2): a program one compiled the
# other reads. jax writes an entry in place; an entry read half-written
# fails to load, and jax then warns and compiles it (compiler.py).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Compile for compile speed: the suite's programs are many and small, so
# XLA:CPU's LLVM optimisation (level 2 by default) costs more than it saves
# (level 0 ran a compile-heavy subset, test_shapes plus the dpgeng runs of
# test_cli, in 160 s against 276 s from an empty cache). It changes code
# generation only: the HLO passes and float semantics (no fast math) stay.
# Subprocesses the tests start inherit it.
_OPT = "--xla_backend_optimization_level=0"
if _OPT not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                             + _OPT).strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The cost estimate's machine rate (estimate.py), measured once for the
# suite, not in the user's cache.
os.environ.setdefault("DPGENG_RATE_CACHE", os.path.join(
    tempfile.gettempdir(), "dpgeng_jax_test_machine.json"))
# The key of the resume fingerprints (store.resume_key), likewise.
os.environ.setdefault("DPGENG_RESUME_KEY", os.path.join(
    tempfile.gettempdir(), "dpgeng_jax_test_resume.key"))

import jax  # noqa: E402  (after the variables above)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def noise_calls(monkeypatch):
  """What the releases hand the noise sampler: a list that fills with
  (value as numpy, stddev, scale) per `noise.add_gaussian_noise` call
  (eager calls only: under jit the value is a tracer)."""
  from dpgeng_jax import noise
  seen = []
  real = noise.add_gaussian_noise

  def spy(key, value, stddev, scale=None):
    seen.append((np.asarray(value), stddev, scale))
    return real(key, value, stddev, scale)
  monkeypatch.setattr(noise, "add_gaussian_noise", spy)
  return seen


# Files that run for minutes in subprocesses of their own (8 fake devices,
# two processes, whole commands): collected first, so that with -n 2 the
# other worker runs the rest of the suite beside them, not after them.
_FIRST = ("test_parallel.py", "test_compile_cache.py")
# Then the files of whole runs on several image shapes (a minute or more
# each from an empty compilation cache), so that the short files fill in
# at the end instead of one of these running alone on the last worker.
_NEXT = ("test_shapes.py", "test_cli.py", "test_audit.py",
         "test_centring.py", "test_resume.py", "test_guarantee.py")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: (item.path.name not in _FIRST,
                               item.path.name not in _NEXT))  # stable
