"""Keep freed host memory mapped, so XLA:CPU's per-call buffers are not
page-faulted in again on every call.

XLA:CPU allocates each executable's temporary buffers (tens of MiB for a
ConvNet forward over 100 images) with malloc on every call and frees them
at the end. glibc serves allocations above its mmap threshold (at most
32 MiB) with fresh mmaps and returns them to the kernel on free, so every
call touches new pages: one minor page fault per 4 KiB, about 23 000 per
call of the query's forward on 100 32x32x3 images, which on the 2-core
development VM cost as much as the first convolution itself
(benchmarks/RESULTS.md, `bench_layers.py`). `retain_freed_memory` tells
glibc to serve large blocks from its heap and never to trim it, so freed
buffers are reused without faults. It also limits glibc to one arena:
the heaps of the extra arenas that XLA's worker threads would get hold at
most 64 MiB, and larger blocks from those threads are always fresh mmaps.
The price: the process keeps its peak heap (its resident memory no longer
shrinks after a large step), and threads share one malloc arena.

Process-wide and irreversible, and it must run before JAX starts its
worker threads (before the first computation: threads that already have
an arena keep it), so the library never calls it by itself: the `dpgeng`
command does (`--no-retain-host-memory` to opt out), and users can call it
at the top of their own driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2 ** 31 - 1


def retain_freed_memory() -> bool:
  """Sets glibc's M_MMAP_MAX to 0 (large blocks from the heap, not from
  mmap), M_TRIM_THRESHOLD to the largest int (never give the heap back)
  and M_ARENA_MAX to 1 (every thread allocates from the main heap).

  Returns True if glibc accepted both; False where there is no glibc
  mallopt (musl, macOS, Windows), in which case nothing changed.
  """
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return (mallopt(M_ARENA_MAX, 1) == 1 and mallopt(M_MMAP_MAX, 0) == 1
          and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1)
