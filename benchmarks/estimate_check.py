"""Cost estimate against measured stage times, from finished run dirs.

    python benchmarks/estimate_check.py runs/a runs/b ...

Every `dpgeng distill` run records its up-front estimate (config.json
"estimate": FLOPs and expected seconds per stage, the machine's matmul
rate) and its measured stage times and peak memory (metrics.json
"timings_s", "peak_rss_mb"). Per run and stage this prints: the measured
seconds, the estimate, measured / estimate, the stage's useful GFLOP, the
rate it achieved and that rate as a share of the machine's float32 matmul
rate, and the process's peak resident memory when the stage ended.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def table(run: str) -> str:
  config = json.load(open(os.path.join(run, "config.json")))
  metrics = json.load(open(os.path.join(run, "metrics.json")))
  est = config["estimate"]
  rate = est["matmul_flops_per_s"]
  t = metrics["timings_s"]
  mem = metrics.get("peak_rss_mb", {})
  names = {f"{s}_s": s for s in est["flops"]}
  lines = [f"{run}: {config.get('dataset_name')}, {config.get('method')}"
           f" (matmul rate {rate / 1e9:.0f} GFLOP/s, {est['device']})",
           "| stage | measured s | estimate s | measured / estimate | GFLOP "
           "| achieved GFLOP/s | share of matmul rate | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|"]
  for key, stage in names.items():
    m, e = t.get(key), est["stages_s"].get(key)
    if m is None:  # a stage this run did not have (the expert when off)
      continue
    fl = est["flops"][stage]
    ach = fl / m if m else 0.0
    lines.append(
        f"| {stage} | {m:.1f} | {e:.1f} | {m / e if e else float('nan'):.2f}"
        f" | {fl / 1e9:.1f} | {ach / 1e9:.1f} | {ach / rate:.0%} | "
        f"{mem.get(key.removesuffix('_s'), float('nan')):.0f} |")
  lines.append(f"| total | {t['total_s']:.1f} | {est['total_s']:.1f} | "
               f"{t['total_s'] / est['total_s']:.2f} | "
               f"{sum(est['flops'].values()) / 1e9:.1f} | | | "
               f"{max(mem.values()) if mem else float('nan'):.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("runs", nargs="+", metavar="RUN_DIR",
                  help="finished `dpgeng distill` output directories")
  for run in ap.parse_args().runs:
    if not os.path.isfile(os.path.join(run, "metrics.json")):
      sys.exit(f"{run}: no metrics.json (not a finished run with "
               "evaluation)")
    print(table(run))
    print()
