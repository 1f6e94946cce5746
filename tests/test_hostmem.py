"""hostmem.retain_freed_memory: XLA:CPU's per-call buffers stop being
page-faulted in again (run in subprocesses: the setting is process-wide)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The jitted ConvNet forward of 100 32x32x3 images (width 128): 63 MiB of
# XLA temporaries per call. Prints the median minor page faults of 5 warm
# calls.
_PROBE = """
import resource, statistics, sys
import jax, jax.numpy as jnp
from dpgeng_jax import hostmem, models
if sys.argv[1] == "retain":
  assert hostmem.retain_freed_memory()
model = models.ConvNet(num_classes=10, width=128, depth=3)
params = models.init_params(model, jax.random.key(0), (32, 32, 3))
x = jnp.ones((100, 32, 32, 3), jnp.float32)
f = jax.jit(lambda p, x: jnp.sum(models.embed_fn(model)(p, x)))
for _ in range(3):
  f(params, x).block_until_ready()
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(params, x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def _faults(mode):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env,
                       check=True, capture_output=True, text=True,
                       timeout=300)
  return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc mallopt")
def test_retained_memory_removes_the_per_call_page_faults():
  default, retained = _faults("default"), _faults("retain")
  # 63 MiB of fresh pages is about 16000 faults; kept memory needs none.
  assert default > 8000, default
  assert retained < 500, retained


def test_returns_false_without_glibc(monkeypatch):
  import ctypes
  from dpgeng_jax import hostmem

  def no_libc(*args, **kwargs):
    raise OSError("no libc here")
  monkeypatch.setattr(ctypes, "CDLL", no_libc)
  assert hostmem.retain_freed_memory() is False
