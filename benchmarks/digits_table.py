"""Side-by-side results on the embedded digits dataset (README table).

    python benchmarks/digits_table.py --out runs/table [--ipc 10]

    python benchmarks/digits_table.py --set generated --out runs/table_gen

Runs `dpgeng distill` one command after another, all with the default
settings otherwise, and prints a markdown table (mean +- std over the
evaluation models, and the wall time of each command).
  --set foundation: ndpdc at epsilon 1 and 10 and dm (non-private, with
    --references: random real subset and full training set). About 10 min
    on 2 CPU cores.
  --set generated: at epsilon 1 and 10, generator-only, ndpdc, M_F with
    generated init + generated extractors (dpgeng --no-expert) and the full
    dpgeng (with the DP expert). About 30 min on 2 CPU cores.
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
  ap.add_argument("--set", default="foundation",
                  choices=("foundation", "generated"))
  args = ap.parse_args()
  if args.set == "foundation":
    runs = [
        ("ndpdc, eps 1", ["--method", "ndpdc", "--epsilon", "1"]),
        ("ndpdc, eps 10", ["--method", "ndpdc", "--epsilon", "10"]),
        ("dm (NOT private)", ["--method", "dm", "--references"]),
    ]
  else:
    runs = []
    for e in ("1", "10"):
      runs += [(f"generator, eps {e}", ["--method", "generator"]),
               (f"ndpdc, eps {e}", ["--method", "ndpdc"]),
               (f"dpgeng-no-expert, eps {e}", ["--method", "dpgeng",
                                               "--no-expert"]),
               (f"dpgeng, eps {e}", ["--method", "dpgeng"])]
      for r in runs[-4:]:
        r[1].extend(["--epsilon", e])
  rows = []
  for name, flags in runs:
    out = os.path.join(args.out,
                       name.replace(", eps ", "_eps").split(" ")[0])
    cmd = [sys.executable, "-m", "dpgeng_jax", "distill", "--dataset",
           "digits", "--ipc", str(args.ipc), "--out", out, "--overwrite",
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
          f"{r.get('seconds', float('nan')):.0f} s (training only) |")


if __name__ == "__main__":
  main()
