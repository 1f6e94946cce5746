"""Side-by-side results of the methods in one run (README tables).

    python benchmarks/compare.py --out runs/table            # digits, all rows
    python benchmarks/make_shapes.py --out runs/shapes32.npz
    python benchmarks/compare.py --dataset npz:runs/shapes32.npz \
        --out runs/table_shapes --extra "--extractor-width 32 --eval-width 32"

Runs `dpgeng distill` one command after another, all with the default
settings otherwise, and prints a markdown table (mean +- std over the
evaluation models, and the wall time of each command).
  --set full (default): at each --epsilon, dpgeng and its three ablations
    (noise init instead of generated init, random instead of generated
    extractors, no expert), ndpdc and the generator-only baseline; then dm
    (non-private) with --references (random real subset, full training set).
    About 45 min for digits on 2 CPU cores.
  --set foundation: ndpdc at epsilon 1 and 10 and dm with --references.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/table")
  ap.add_argument("--ipc", type=int, default=10)
  ap.add_argument("--extra", default="", help="extra flags for every run")
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--epsilon", nargs="+", default=["1", "10"])
  ap.add_argument("--set", default="full", choices=("full", "foundation"))
  args = ap.parse_args()
  if args.set == "foundation":
    runs = [(f"ndpdc, eps {e}", ["--method", "ndpdc", "--epsilon", e])
            for e in args.epsilon]
  else:
    runs = []
    for e in args.epsilon:
      dp = ["--method", "dpgeng"]
      runs += [(f"dpgeng, eps {e}", [*dp]),
               (f"dpgeng-noise-init, eps {e}", [*dp, "--init", "noise"]),
               (f"dpgeng-random-extractors, eps {e}",
                [*dp, "--extractors", "random"]),
               (f"dpgeng-no-expert, eps {e}", [*dp, "--no-expert"]),
               (f"ndpdc, eps {e}", ["--method", "ndpdc"]),
               (f"generator, eps {e}", ["--method", "generator"])]
      for r in runs[-6:]:
        r[1].extend(["--epsilon", e])
  runs.append(("dm (NOT private)", ["--method", "dm", "--references"]))
  rows = []
  for name, flags in runs:
    out = os.path.join(args.out,
                       name.replace(", eps ", "_eps").split(" ")[0])
    cmd = [sys.executable, "-m", "dpgeng_jax", "distill", "--dataset",
           args.dataset, "--ipc", str(args.ipc), "--out", out, "--overwrite",
           "--quiet", *flags, *args.extra.split()]
    t = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t
    with open(os.path.join(out, "metrics.json")) as f:
      m = json.load(f)
    with open(os.path.join(out, "privacy.json")) as f:
      p = json.load(f)
    eps = p["epsilon_pld"]
    rows.append((name, m, wall, eps))
    print(" ".join(cmd[1:]), f"-> {wall:.0f} s", flush=True)

  def fmt(m):
    return (f"{100 * m['test_accuracy_mean']:.1f} +- "
            f"{100 * m['test_accuracy_std']:.1f}")

  print(f"\n| method (digits, IPC {args.ipc}) | epsilon (PLD) | test acc % "
        "| wall time |")
  print("|---|---|---|---|")
  for name, m, wall, eps in rows:
    e = "inf (not private)" if eps is None else f"{eps:.3f}"
    print(f"| {name} | {e} | {fmt(m)} | {wall:.0f} s (whole run) |")
  _, m, _, _ = rows[-1]
  for key, label in (("reference_random_real_subset",
                      f"random real subset, {args.ipc}/class (NOT private)"),
                     ("reference_full_training_set",
                      "full training set (NOT private)")):
    if key not in m:
      continue
    r = m[key]
    print(f"| {label} | inf | {fmt(r)} | "
          f"{r.get('seconds', float('nan')):.0f} s (training only) | |")


if __name__ == "__main__":
  main()
