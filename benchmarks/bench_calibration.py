"""Time to calibrate the noise of a run's mechanisms (reads no data).

    python benchmarks/bench_calibration.py

For each method and target epsilon: the wall time of
`planning.mechanisms_for` with an empty PLD cache (a fresh process's
first calibration), the PLDs it built at each discretisation, and the
composed PLD epsilon / target that the report then states.
"""

from __future__ import annotations

import collections
import time

from dpgeng_jax import accounting, planning
from dpgeng_jax.config import Config
from dpgeng_jax.errors import ConfigError


def main() -> None:
  orig = accounting.epsilon_pld
  built: collections.Counter = collections.Counter()

  def counting(event, delta, interval=accounting.PLD_DISCRETIZATION,
               max_points=accounting.MAX_PLD_POINTS):
    used = accounting.feasible_interval(event, interval, max_points)
    if (accounting._event_key(event), float(used)) not in (
        accounting._PLD_CACHE):
      built[f"{used:.2g}"] += 1
    return orig(event, delta, interval, max_points)

  accounting.epsilon_pld = counting
  print("| method | epsilon | seconds | PLDs built (interval: count) | "
        "epsilon / target |")
  print("|---|---|---|---|---|")
  for method in ("dpgeng", "ndpdc"):
    for eps in (0.5, 1.0, 4.0, 10.0, 100.0):
      cfg = Config(method=method, epsilon=eps)
      plan = planning.resolve(cfg, (8, 8, 1))
      best = None
      for _ in range(3):
        accounting._PLD_CACHE.clear()
        built.clear()
        t = time.perf_counter()
        try:
          mechs = planning.mechanisms_for(cfg, plan)
        except ConfigError as e:  # e.g. noise too small for the sampler
          mechs = str(e)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
      if isinstance(mechs, str):
        print(f"| {method} | {eps:g} | {best:.3f} | refused: "
              f"{mechs[:60]}... | |")
        continue
      got = orig(accounting.composed_event(mechs),
                 planning.delta_split(cfg, plan).mechanisms,
                 accounting.pld_interval(eps))
      print(f"| {method} | {eps:g} | {best:.3f} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(built.items()))
            + f" | {got / eps:.5f} |")


if __name__ == "__main__":
  main()
