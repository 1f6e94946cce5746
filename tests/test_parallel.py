"""Data parallelism: the sharded tests on 8 fake CPU devices, and a real
two-process run over JAX's distributed runtime (gloo on 127.0.0.1).

Both run in subprocesses: the device count is fixed when JAX starts, and
this test process has one device.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax import augment, mechanisms, parallel
from dpgeng_jax.clipping import clipped_class_sums, clipped_grad_sum
from dpgeng_jax.models import ConvNet, cross_entropy, init_params

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


def test_sharded_suite_passes_on_8_fake_cpu_devices():
  """tests/sharded: sharded == unsharded on 4 and 8 devices, the naive
  shard_map differs, noise is added once, devices sample independently."""
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       os.path.join(HERE, "sharded")],
      env=_env(XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_"
                          "host_platform_device_count=8").strip()),
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  assert " passed" in out and "skipped" not in out, out[-3000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_run_gives_the_one_process_sums(tmp_path):
  """Two processes x 2 CPU devices, each loading only its own rows, give
  the clipped class sums and clipped gradient sum of one process."""
  port, out = _free_port(), str(tmp_path / "out.npz")
  worker = os.path.join(HERE, "multihost", "worker.py")
  procs = [subprocess.Popen(
      [sys.executable, worker, str(port), str(i), out], env=_env(),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(
      log[-3000:] for log in logs)
  got = np.load(out)

  sys.path.insert(0, os.path.join(HERE, "multihost"))
  try:
    import worker as w
  finally:
    sys.path.pop(0)
  x, y = w.dataset()
  model = ConvNet(num_classes=w.K, width=8, depth=2)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  embed = lambda p, xb: model.apply({"params": p}, xb,
                                    method=ConvNet.features)
  want = clipped_class_sums(embed, params, jnp.asarray(x), jnp.asarray(y),
                            jnp.ones(len(x)), num_classes=w.K, clip_norm=0.5)
  np.testing.assert_allclose(got["sums"], np.asarray(want), rtol=1e-4,
                             atol=1e-5)
  # With noise (sigma 1, C 0.5): both processes hold the same release (the
  # noise key is broadcast, the noise added once), and what it added is
  # the one-process release's noise for that key, of std sigma C (the
  # band alone let 0.75-1.25 sigma pass).
  noisy = [np.load(f"{out}.noisy{i}.npy") for i in range(2)]
  alone = [np.load(f"{out}.noise{i}.npy") for i in range(2)]
  np.testing.assert_array_equal(noisy[0], noisy[1])
  np.testing.assert_array_equal(alone[0], alone[1])
  resid = noisy[0] - got["sums"]
  np.testing.assert_allclose(resid, alone[0], rtol=0, atol=1e-5 * max(
      1.0, float(np.abs(noisy[0]).max())))
  assert resid.size >= 90 and 0.36 < np.std(resid) < 0.64, np.std(resid)
  loss = lambda p, b: cross_entropy(model, p, *b)
  grad = jax.jit(lambda p: clipped_grad_sum(
      loss, p, (jnp.asarray(x), jnp.asarray(y)), jnp.ones(len(x)),
      clip_norm=0.5))(params)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad))
  for path, g in jax.tree_util.tree_leaves_with_path(grad):
    key = "grad/" + "/".join(str(k.key) for k in path)
    np.testing.assert_allclose(got[key], np.asarray(g), atol=1e-4 * scale)


def test_single_process_initialize_is_a_no_op(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize() is False
  assert parallel.is_writer()
  np.testing.assert_array_equal(parallel.process_rows(10), np.arange(10))
  y = np.array([2, 0, 2, 1, 0])
  np.testing.assert_array_equal(parallel.process_rows_by_class(y, 3),
                                np.arange(5))
  assert parallel.rows_per_device(7) == -(-7 // jax.local_device_count())
  # One device (or no mesh): training takes the unsharded path.
  assert parallel.local_mesh(None) is None
  assert parallel.local_mesh(parallel.data_mesh(1)) is None


def test_one_device_mesh_reproduces_the_unsharded_query():
  """The sharded query on a 1-device mesh is the unsharded computation."""
  rng = np.random.default_rng(0)
  x = rng.random((12, 4, 4, 1)).astype(np.float32)
  y = np.arange(12) % 3
  params = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  lin = lambda p, xb: xb.reshape(xb.shape[0], -1) @ p
  spec = mechanisms.QuerySpec(embed_fn=lin, num_classes=3, clip_norm=1.0,
                              noise_multiplier=0.0, sampling_rate=1.0,
                              capacity=4, strategy="none")
  aug = augment.identity_params((3,))
  want, _ = mechanisms.noisy_targets(spec, mechanisms.class_major(x, y, 3),
                                     params, aug, jax.random.key(0))
  got, over = parallel.sharded_noisy_targets(
      spec, parallel.sharded_class_major(x, y, 3, 1), params, aug,
      jax.random.key(1), mesh=parallel.data_mesh(1))
  assert not bool(over)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


def test_process_rows_split_every_class_evenly_whatever_the_order(
    monkeypatch):
  """Labels aligned with the process stride would put a whole class on
  one process under a plain stride; the per-class split never exceeds
  ceil(N_c / P), and the processes' rows partition the data."""
  procs = 3
  y = np.arange(30) % procs
  monkeypatch.setattr(jax, "process_count", lambda: procs)
  seen = []
  for i in range(procs):
    monkeypatch.setattr(jax, "process_index", lambda i=i: i)
    rows = parallel.process_rows_by_class(y, procs)
    counts = np.bincount(y[rows], minlength=procs)
    assert counts.max() <= -(-10 // procs)
    seen.append(rows)
    flat = parallel.process_rows(30)
    assert np.bincount(y[flat], minlength=procs).max() == 10  # the trap
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(30))
