"""One process of the two-process CPU run in tests/test_parallel.py.

Usage: python worker.py PORT PROCESS_ID OUT.npz. Each process has 2 fake
CPU devices, loads only its own rows of a fixed dataset, and the 4 devices
of both processes form one global mesh. Process 0 writes the results.
"""

import os
import sys

if __name__ == "__main__":  # not when the test imports dataset() and K
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_"
                             "force_host_platform_device_count=2").strip()

import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpgeng_jax import augment, mechanisms, parallel, pergrad  # noqa: E402
from dpgeng_jax.models import ConvNet, init_params  # noqa: E402

K = 3


def dataset():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  y = (np.arange(40) % K).astype(np.int32)
  return x, y


def main():
  port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  assert parallel.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60)
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = parallel.data_mesh()
  x_all, y_all = dataset()
  rows = parallel.process_rows(len(x_all))
  x, y = x_all[rows], y_all[rows]  # this process's private rows only

  model = ConvNet(num_classes=K, width=8, depth=2)
  params = init_params(model, jax.random.key(0), (8, 8, 1))  # public seed
  embed = lambda p, xb: model.apply({"params": p}, xb,
                                    method=ConvNet.features)

  # M_F query with p = 1 and no noise: exactly the clipped class sums.
  local_devices = jax.local_device_count()
  data = parallel.sharded_class_major(x, y, K, local_devices,
                                      rows_per_shard=4, as_numpy=True)
  data = mechanisms.ClassMajorData(parallel.global_rows(mesh, data.x, 1),
                                   parallel.global_rows(mesh, data.valid, 1))
  spec = mechanisms.QuerySpec(embed_fn=embed, num_classes=K, clip_norm=0.5,
                              noise_multiplier=0.0, sampling_rate=1.0,
                              capacity=4, strategy="none")
  secret = parallel.broadcast_key(mechanisms.secret_key())
  sums, over = jax.jit(functools.partial(
      parallel.sharded_noisy_targets, spec, mesh=mesh))(
          data, params, augment.identity_params((K,)), secret)

  # The same query with noise: the key broadcast from process 0 gives
  # both processes the same noise, added once (each saves its copy).
  noisy, over_n = jax.jit(functools.partial(
      parallel.sharded_noisy_targets,
      dataclasses.replace(spec, noise_multiplier=1.0), mesh=mesh))(
          data, params, augment.identity_params((K,)), secret)
  np.save(f"{out}.noisy{pid}.npy", np.asarray(noisy))
  assert not bool(over_n)
  # The noise alone, from the same key on this process's first device
  # (the one-process release of no rows): what the sharded release must
  # have added to its sums.
  empty = mechanisms.ClassMajorData(np.zeros((K, 4, 8, 8, 1), np.float32),
                                    np.zeros((K, 4), np.float32))
  alone, _ = jax.jit(functools.partial(
      mechanisms.noisy_targets,
      dataclasses.replace(spec, noise_multiplier=1.0)))(
          empty, params, augment.identity_params((K,)), secret)
  np.save(f"{out}.noise{pid}.npy", np.asarray(alone))

  # DP-SGD gradient with q = 1 and no noise: the clipped gradient sum.
  n_loc = 10
  valid = np.zeros(n_loc * 2, np.float32)
  valid[:len(x)] = 1.0
  pad = lambda a: np.concatenate(
      [a, np.zeros((2 * n_loc - len(a),) + a.shape[1:], a.dtype)])
  xs, ys = (parallel.global_rows(mesh, pad(a)) for a in (x, y))
  grad, over_g = jax.jit(functools.partial(
      parallel.sharded_dp_sgd_grad, pergrad.make_grad_sum_fn(
          model, clip_norm=0.5), sampling_rate=1.0, capacity=n_loc,
      mesh=mesh, release=mechanisms.SumRelease(0.5, 0.0)))(params, xs, ys,
                                    parallel.global_rows(mesh, valid),
                                    secret)
  assert not bool(over) and not bool(over_g)
  if parallel.is_writer():
    flat = {"grad/" + "/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(grad)}
    np.savez(out, sums=np.asarray(sums), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
