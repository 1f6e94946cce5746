"""Data parallelism for the private passes: a device mesh with a `data` axis,
`jax.shard_map` sums reduced with `psum`, and multi-host start-up.

Every private release here has the same shape: each device computes clipped
per-example contributions of ITS examples, sums them locally, the local sums
are added across devices with `psum`, and Gaussian noise is added ONCE to
the replicated total, from one key that is the same on every device. The
result equals the unsharded computation on the same examples (up to float
summation order), so the guarantee does not depend on the device count.

Sharp edge (DESIGN.md): inside `shard_map`, the gradient with respect to a
replicated (device-invariant) parameter is summed over devices, so
per-example gradients of replicated parameters silently become sums of one
example per device, and clipping them bounds the wrong thing. `sharded_sum`
therefore makes the parameters device-varying with `jax.lax.pcast(...,
to='varying')` before the per-example function runs; `vary_params=False`
keeps the naive behaviour only so that a test can show the difference.

Poisson sampling with sharded data (`sharded_noisy_targets`,
`sharded_dp_sgd_batch`): each device samples its own examples with a key
folded with its device index, so every example is still included
independently with probability p. Each device's batch is padded to a fixed
capacity whose overflow probability is the batch's tail / devices (per
class for class-major data), so the union over devices keeps the tail
(and the delta the report adds for it) unchanged.

Multi-host: `initialize` starts JAX's distributed runtime (flags or the
standard JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
variables; gloo collectives on CPU); `global_rows` assembles a globally
sharded array from each process's local rows; only process 0 writes
outputs (`is_writer`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpgeng_jax import augment, mechanisms
from dpgeng_jax.clipping import (check_fixed_point, check_labels,
                                 clipped_class_sums)

DATA = "data"


# ---------------------------------------------------------------------------
# Mesh and layout.


def data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)
  with the axis name 'data'. An int n takes the first n global devices."""
  if devices is None:
    devices = jax.devices()
  elif isinstance(devices, int):
    all_devices = jax.devices()
    if not 1 <= devices <= len(all_devices):
      raise ValueError(f"devices={devices}: this run sees "
                       f"{len(all_devices)} device(s)")
    devices = all_devices[:devices]
  return Mesh(np.asarray(list(devices)), (DATA,))


def local_mesh(mesh: Mesh | None) -> Mesh | None:
  """The devices of `mesh` that belong to this process, as a data mesh
  (None if that is one device or `mesh` is None). Non-private training
  (evaluation models, the extractor pool) runs on it: its data are
  replicated on every process, so each process trains without cross-host
  collectives."""
  if mesh is None:
    return None
  mine = [d for d in mesh.devices.reshape(-1)
          if d.process_index == jax.process_index()]
  return data_mesh(mine) if len(mine) > 1 else None


def num_shards(mesh: Mesh) -> int:
  """Devices along the mesh's data axis."""
  return int(mesh.shape[DATA])


def local_shards(mesh: Mesh | None) -> int:
  """Devices of `mesh` that belong to this process (1 without a mesh):
  the layouts and per-device capacities follow the mesh actually used,
  which may hold fewer devices than the process has (--devices)."""
  if mesh is None:
    return 1
  return sum(d.process_index == jax.process_index()
             for d in mesh.devices.reshape(-1))


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-int(n) // multiple) * multiple


def pad_rows(tree: Any, mask: jax.Array, multiple: int):
  """Pads the leading axis of every array in `tree` and of `mask` with
  zero rows (mask 0) up to a multiple of `multiple`; padded rows
  contribute nothing to any masked sum."""
  n = mask.shape[0]
  extra = round_up(n, multiple) - n
  if extra == 0:
    return tree, mask

  def pad(a):
    return jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))

  return jax.tree.map(pad, tree), pad(mask)


def sharded_class_major(x: np.ndarray, y: np.ndarray, num_classes: int,
                        shards: int, rows_per_shard: int | None = None,
                        as_numpy: bool = False) -> mechanisms.ClassMajorData:
  """Class-major layout (K, shards * n_loc, ...) for `shards` devices.

  Example j of class c goes to shard j % shards, so every shard holds
  nearly the same number of examples of every class; padding has valid 0.
  Splitting axis 1 into `shards` equal blocks gives each device its part.
  rows_per_shard fixes n_loc (multi-host: every process must use the same
  one); by default it is the smallest that fits. as_numpy keeps the arrays
  on the host (for `global_rows`).
  """
  y = np.asarray(y)
  check_labels(y, num_classes, len(x))  # as class_major: none dropped
  counts = np.bincount(y, minlength=num_classes)
  n_loc = max(1, -(-int(counts.max()) // shards))
  if rows_per_shard is not None:
    if rows_per_shard < n_loc:
      raise ValueError(f"rows_per_shard={rows_per_shard} is below what a "
                       "class needs (the message names no private count)")
    n_loc = rows_per_shard
  xs = np.zeros((num_classes, n_loc, shards, *x.shape[1:]), x.dtype)
  valid = np.zeros((num_classes, n_loc, shards), np.float32)
  for c in range(num_classes):  # host-side layout, once per run
    idx = np.flatnonzero(y == c)
    j = np.arange(len(idx))
    xs[c, j // shards, j % shards] = x[idx]
    valid[c, j // shards, j % shards] = 1.0
  xs = np.moveaxis(xs, 2, 1).reshape(num_classes, shards * n_loc,
                                     *x.shape[1:])
  valid = np.moveaxis(valid, 2, 1).reshape(num_classes, shards * n_loc)
  if as_numpy:
    return mechanisms.ClassMajorData(xs, valid)
  return mechanisms.ClassMajorData(jnp.asarray(xs), jnp.asarray(valid))


def shard_capacity(valid: np.ndarray, shards: int, sampling_rate: float,
                   tail: float = mechanisms.OVERFLOW_TAIL) -> int:
  """Per-device, per-class capacity for Poisson batches of a sharded
  (K, shards * n_loc) valid table: overflow probability <= tail / shards
  for each device and class, so <= tail per class over all devices."""
  valid = np.asarray(valid)
  k = valid.shape[0]
  counts = valid.reshape(k, shards, -1).sum(-1).reshape(-1).astype(int)
  return mechanisms.poisson_capacity(counts, sampling_rate, tail / shards)


def flat_capacity(rows: int, sampling_rate: float, log_tail: float,
                  mesh: Mesh | None = None) -> int:
  """Padded Poisson slots per device of `mesh` (the one batch without
  one) for a batch of the flat layout over `rows` (a public bound on N,
  split by `process_rows`): each device overflows with probability <=
  exp(log_tail) / devices, so the batch with probability <= exp(log_tail).
  The queries' and the expert's capacity."""
  if mesh is None:
    return mechanisms.poisson_capacity([rows], sampling_rate,
                                       log_tail=log_tail)
  return mechanisms.poisson_capacity(
      [rows_per_device(rows, mesh)], sampling_rate,
      log_tail=log_tail - math.log(num_shards(mesh)))


# ---------------------------------------------------------------------------
# Sums across devices.


def sharded_sum(fn: Callable[..., Any], mesh: Mesh, *,
                vary_params: bool = True,
                integer_sums_fit: bool = False) -> Callable[..., Any]:
  """Data-parallel version of a per-example sum.

  fn(params, *rows) must return a pytree of sums over the leading axis of
  `rows` (for example clipped class sums or clipped gradient sums). The
  returned g(params, *rows) splits the rows over the mesh's data axis
  (their length must be a multiple of the device count; see `pad_rows`),
  runs fn on each device with params made device-varying, and adds the
  local sums with psum. The result is replicated.

  Integer sums are refused unless `integer_sums_fit` says they cannot
  overflow when added over ALL devices (fixed-point bits checked against
  every device's rows, or vote counts): bits sized for one device's rows
  let the int32 psum wrap around silently.
  """

  def local(params, *rows):
    if vary_params:
      params = jax.lax.pcast(params, DATA, to="varying")
    sums = fn(params, *rows)
    if not integer_sums_fit and any(
        jnp.issubdtype(a.dtype, jnp.integer) for a in jax.tree.leaves(sums)):
      raise ValueError(
          "fn returned integer (fixed-point) sums, whose bits must fit the "
          "rows of every device, not one: pass bits (and clip_norm) to "
          "sharded_grad_sum or sharded_clipped_class_sums, which check "
          "them and hand them to fn")
    return jax.lax.psum(sums, DATA)

  def call(params, *rows):
    n = jax.tree.leaves(rows)[0].shape[0]
    if n % num_shards(mesh):
      raise ValueError(f"{n} rows do not split over {num_shards(mesh)} "
                       "devices; pad them with parallel.pad_rows")
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(),) + tuple(P(DATA) for _ in rows),
        out_specs=P())(params, *rows)

  return call


def sharded_clipped_class_sums(embed_fn, params, x, y, mask, *,
                               num_classes: int, clip_norm: float,
                               mesh: Mesh, chunk_size: int | None = None,
                               bits: int | None = None):
  """`clipping.clipped_class_sums` with the rows split over `mesh`
  (padded to a multiple of the device count). Same (K, d) result, same
  L2 sensitivity C; with `bits` (checked against all the padded rows)
  the int32 sums add exactly across devices (the same as unsharded
  wherever the rows' values do not depend on the batch shape)."""
  (x, y), mask = pad_rows((x, y), mask, num_shards(mesh))
  if bits is not None:
    check_fixed_point(bits, x.shape[0], clip_norm)
  fn = functools.partial(_class_sums_rows, embed_fn, num_classes, clip_norm,
                         chunk_size, bits)
  return sharded_sum(fn, mesh, integer_sums_fit=bits is not None)(
      params, x, y, mask)


def _class_sums_rows(embed_fn, num_classes, clip_norm, chunk_size, bits,
                     params, x, y, mask):
  return clipped_class_sums(embed_fn, params, x, y, mask,
                            num_classes=num_classes, clip_norm=clip_norm,
                            chunk_size=chunk_size, bits=bits)


def sharded_grad_sum(grad_sum_fn: Callable[..., Any], params, batch, mask, *,
                     mesh: Mesh, vary_params: bool = True,
                     bits: int | None = None,
                     clip_norm: float | None = None):
  """grad_sum_fn(params, batch, mask) -> clipped gradient sum (for example
  `functools.partial(clipping.clipped_grad_sum, loss_fn, clip_norm=C)`),
  with the batch split over `mesh` and the local sums added by psum.

  With `bits` (and the clip_norm C that grad_sum_fn clips to) the sums are
  int32 in fixed point: bits are checked against all the padded rows of
  every device and passed on as grad_sum_fn(params, batch, mask,
  bits=bits). A grad_sum_fn returning integer sums otherwise (bits fixed
  inside it) is refused: bits sized for one device wrap the int32 psum.

  With vary_params=False the per-example gradients of the replicated
  parameters are summed over devices BEFORE clipping by a grad_sum_fn
  that does not make them vary itself (the sharp edge this module exists
  to avoid; clipping.clipped_grad_sum and pergrad do); only tests use it.
  """
  if clip_norm is not None:  # bits are checked at it
    mechanisms.check_declared_clip_norm(grad_sum_fn, clip_norm)
  batch, mask = pad_rows(batch, mask, num_shards(mesh))
  fn = grad_sum_fn
  if bits is not None:
    if clip_norm is None:
      raise ValueError("bits need the clip_norm grad_sum_fn clips to, to "
                       "check them against all the rows")
    check_fixed_point(bits, mask.shape[0], clip_norm)
    fn = lambda p, b, m: grad_sum_fn(p, b, m, bits=bits)
  return sharded_sum(fn, mesh, vary_params=vary_params,
                     integer_sums_fit=bits is not None)(params, batch, mask)


# ---------------------------------------------------------------------------
# Sharded mechanisms (sampling on each device, noise once).


def _device_key(key: jax.Array) -> jax.Array:
  return jax.random.fold_in(key, jax.lax.axis_index(DATA))


def sharded_noisy_targets(spec: mechanisms.QuerySpec,
                          data, params: Any,
                          aug_params: augment.AugmentParams,
                          secret: jax.Array, *, mesh: Mesh,
                          chunk_size: int | None = None,
                          skip_padding: bool = True):
  """The M_F query of `mechanisms.noisy_targets` with the private table
  split over `mesh` along its example axis: class-major data from
  `sharded_class_major` (per class), or flat data (`mechanisms.FlatData`)
  split by rows (`local_rows`).

  spec.capacity is the PER-DEVICE capacity (`shard_capacity` for
  class-major data; for flat data, `poisson_capacity` of the rows per
  device at the tail divided by the devices). Each device Poisson-samples
  its own examples (key folded with the device index), augments them with
  the shared public parameters, clips and sums them per class; the sums
  are added across devices and noise N(0, (sigma C)^2) is added once.
  Returns (noisy sums (K, d), overflow flag).
  """
  k_sample, k_noise = jax.random.split(secret)
  flat = isinstance(data, mechanisms.FlatData)
  # Fixed point over every device's rows: the int32 psum is exact.
  bits = spec.release_bits(mechanisms.batch_rows(spec, data)
                           * num_shards(mesh))

  def local(p, aug, key, *arrays):
    p = jax.lax.pcast(p, DATA, to="varying")
    part = (mechanisms.FlatData(*arrays) if flat
            else mechanisms.ClassMajorData(*arrays))
    sums, over = mechanisms.sampled_class_sums(
        spec, part, p, aug, _device_key(key), chunk_size, bits,
        skip_padding=skip_padding)
    return jax.lax.psum(sums, DATA), jax.lax.psum(over.astype(jnp.int32),
                                                  DATA) > 0

  split = P(DATA) if flat else P(None, DATA)
  sums, overflow = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(), P(), P()) + (split,) * len(data),
      out_specs=(P(), P()))(params, aug_params, k_sample, *data)
  return mechanisms.withheld_on_overflow(
      spec.release(k_noise, sums, bits), overflow), overflow


def sharded_dp_sgd_grad(grad_sum_fn: Callable[..., Any], params: Any,
                        x: jax.Array, y: jax.Array, valid: jax.Array,
                        secret: jax.Array, *, sampling_rate: float,
                        capacity: int, mesh: Mesh,
                        release: mechanisms.SumRelease):
  """Noisy clipped gradient SUM of one DP-SGD step on sharded data.

  x, y, valid: (N_pad, ...) private rows split over `mesh` (valid 0 on
  padding). Each device Poisson-samples its rows into `capacity` slots,
  calls grad_sum_fn(params, (x_b, y_b), mask, bits=bits) with
  device-varying params (bits: `release.release_bits` of all the
  devices' slots; grad_sum_fn clips to release.clip_norm; int32 sums,
  added exactly across devices), and `release` adds N(0, (sigma C)^2)
  once per coordinate. Returns (noisy gradient sum, overflow flag); the
  caller divides by the public expected batch size. A grad_sum_fn whose
  `clip_norm` attribute differs from release.clip_norm is refused
  (`SumRelease.check_grad_sum_fn`).
  """
  release.check_grad_sum_fn(grad_sum_fn)
  k_sample, k_noise = jax.random.split(secret)
  bits = release.release_bits(capacity * num_shards(mesh))

  def local(p, xs, ys, vs, key):
    p = jax.lax.pcast(p, DATA, to="varying")
    idx, mask, over = mechanisms.poisson_sample(
        _device_key(key), vs[None], sampling_rate, capacity)
    g = grad_sum_fn(p, (xs[idx[0]], ys[idx[0]]), mask[0], bits=bits)
    return jax.lax.psum(g, DATA), jax.lax.psum(over.astype(jnp.int32),
                                               DATA) > 0

  g, overflow = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(DATA), P(DATA), P(DATA), P()),
      out_specs=(P(), P()))(params, x, y, valid, k_sample)
  return mechanisms.withheld_on_overflow(release.release(k_noise, g, bits),
                                         overflow), overflow


# ---------------------------------------------------------------------------
# Multi-host.


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300) -> bool:
  """Starts JAX's distributed runtime when there is more than one process.

  Arguments override the standard variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; with none of them set (and no
  cluster that JAX detects by itself, such as SLURM or a TPU pod) this is a
  single-process run and nothing happens. On CPU the cross-process
  collectives use gloo. Returns whether a distributed runtime is running.
  Must run before anything touches a device.

  Raises ConfigError (a ValueError) for settings JAX would fail on later
  with a traceback or a C++ abort: a missing or malformed address, process
  count or id, and a coordinator that a process other than 0 cannot reach
  within `timeout_s` (waited for in Python, so an interrupt stops it; JAX's
  own wait ignored SIGTERM for its whole timeout).
  """
  from dpgeng_jax.errors import ConfigError
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  procs = num_processes or _env_int("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if address is None and procs is None:
    if pid is not None:
      raise ConfigError(f"process id {pid} given without a coordinator "
                        "address and a number of processes (--coordinator-"
                        "address, --num-processes)")
    return False
  if procs is not None and procs < 1:
    raise ConfigError(f"num_processes={procs} must be >= 1")
  if procs is not None and pid is not None and not 0 <= pid < procs:
    raise ConfigError(f"process_id={pid} is outside [0, {procs})")
  waited = 0.0
  if address is not None:
    host, port = _host_port(address)
    if pid is not None and pid > 0:  # (an id JAX detects: JAX waits)
      waited = _wait_for(host, port, timeout_s)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:  # what is not given JAX detects on a cluster (SLURM, MPI, TPU)
    jax.distributed.initialize(
        coordinator_address=address, num_processes=procs, process_id=pid,
        local_device_ids=local_device_ids,
        initialization_timeout=max(1, int(timeout_s - waited)))
  except ValueError as e:  # e.g. no id given and no cluster to detect it
    raise ConfigError(f"cannot start the multi-process run: {e} "
                      "(--coordinator-address HOST:PORT, --num-processes, "
                      "--process-id)") from None
  return True


def _host_port(address: str) -> tuple[str, int]:
  """(host, port) of HOST:PORT, an IPv6 host in brackets ([::1]:1234)."""
  from dpgeng_jax.errors import ConfigError
  host, sep, port = address.rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  elif ":" in host:  # bare IPv6, or a scheme such as dns:///
    host = ""
  if not (sep and host and "/" not in host and "[" not in host
          and "]" not in host and port.isdigit() and 0 < int(port) < 65536):
    raise ConfigError(f"coordinator address {address!r} is not HOST:PORT "
                      "(an IPv6 host in brackets: [::1]:1234)")
  return host, int(port)


def _wait_for(host: str, port: int, timeout_s: float) -> float:
  """Waits until the coordinator accepts connections (it may start after
  this process), polling, for at most timeout_s seconds; returns the
  seconds waited."""
  import socket
  import time
  from dpgeng_jax.errors import ConfigError
  start = time.monotonic()
  deadline = start + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return time.monotonic() - start
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(
            f"cannot reach the coordinator {host}:{port} within "
            f"{timeout_s:g} s ({e.strerror or e}); start process 0 first "
            "or check --coordinator-address") from None
    time.sleep(0.5)


def _env_int(name: str) -> int | None:
  from dpgeng_jax.errors import ConfigError
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not an integer") from None


def is_writer() -> bool:
  """Only process 0 writes outputs."""
  return jax.process_index() == 0


def process_rows(n: int) -> np.ndarray:
  """Indices of the rows of [0, n) that this process loads: every
  process_count-th row, starting at the process index. Strided, so each
  process holds about N_c / process_count examples of every class even
  when the data are sorted by class; the bounds below follow from public
  class sizes alone."""
  return np.arange(jax.process_index(), n, jax.process_count())


def process_rows_by_class(y: np.ndarray, num_classes: int) -> np.ndarray:
  """Indices of this process's rows for a per-class layout: every
  process_count-th example OF EACH CLASS, so a process holds at most
  ceil(N_c / process_count) examples of class c whatever the data order
  (the bound `rows_per_device` relies on)."""
  p, i = jax.process_count(), jax.process_index()
  y = np.asarray(y)
  return np.sort(np.concatenate([np.flatnonzero(y == c)[i::p]
                                 for c in range(num_classes)]))


def padded_rows(num_rows: int, *arrays: np.ndarray) -> tuple:
  """Each (n, ...) array padded with zero rows to `num_rows` (a PUBLIC
  length), and a float32 valid mask (1 on the n real rows, 0 on padding),
  as numpy arrays: the fixed-shape layout of the private data."""
  n = len(arrays[0])
  if num_rows < n:
    raise ValueError(f"the rows exceed the bound num_rows={num_rows} (the "
                     "message names no private count)")

  def pad(a):
    a = np.asarray(a)
    return np.concatenate([a, np.zeros((num_rows - n, *a.shape[1:]),
                                       a.dtype)])

  valid = np.r_[np.ones(n, np.float32), np.zeros(num_rows - n, np.float32)]
  return (*map(pad, arrays), valid)


def local_rows(mesh: Mesh, *arrays: np.ndarray, num_rows: int | None = None):
  """This process's `process_rows` of each (N, ...) array, padded to the
  public length (mesh devices of this process) x rows_per_device(num_rows)
  and split over the mesh; returns the global arrays and a valid mask (0
  on padding). num_rows is a PUBLIC bound on N (default N itself, for
  callers to whom N is public)."""
  n = len(arrays[0])
  num_rows = n if num_rows is None else int(num_rows)
  if n > num_rows:
    raise ValueError(f"the rows exceed the bound num_rows={num_rows} (the "
                     "message names no private count)")
  rows = process_rows(n)
  local = padded_rows(local_shards(mesh) * rows_per_device(num_rows, mesh),
                      *(np.asarray(a)[rows] for a in arrays))
  return tuple(global_rows(mesh, a) for a in local)


def rows_per_device(class_size: int, mesh: Mesh | None = None) -> int:
  """A public bound on the examples of one class that one device of `mesh`
  holds when rows are split by `process_rows_by_class` and then
  `sharded_class_major` (or on all rows, for the flat layouts of the
  generator and the expert split by `process_rows`, with class_size N).
  class_size is itself a public bound; without a mesh, every local device
  is assumed to take part."""
  per_process = -(-int(class_size) // jax.process_count())
  devices = jax.local_device_count() if mesh is None else local_shards(mesh)
  return max(1, -(-per_process // devices))


def global_rows(mesh: Mesh, local: np.ndarray, axis: int = 0) -> jax.Array:
  """A global array split over the mesh's data axis along `axis`, built
  from this process's rows (every process passes a block of equal shape;
  the global length along `axis` is the sum)."""
  spec = [None] * local.ndim
  spec[axis] = DATA
  return jax.make_array_from_process_local_data(
      NamedSharding(mesh, P(*spec)), local)


def broadcast_key(key: jax.Array) -> jax.Array:
  """Process 0's key on every process (multi-host: the secret key must be
  the same everywhere so that noise is added once, with one value)."""
  if jax.process_count() == 1:
    return key
  from jax.experimental import multihost_utils
  data = multihost_utils.broadcast_one_to_all(jax.random.key_data(key))
  return jax.random.wrap_key_data(jnp.asarray(data),
                                  impl=jax.random.key_impl(key))


def device_note(mesh: Mesh) -> str:
  """'N x <device kind> over P process(es)': the mesh, for reports."""
  d = mesh.devices.reshape(-1)[0]
  return (f"{num_shards(mesh)} x {d.device_kind} over "
          f"{jax.process_count()} process(es)")

