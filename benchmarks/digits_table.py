"""Side-by-side results on the embedded digits dataset (README table).

    python benchmarks/digits_table.py --out runs/table [--ipc 10]

Runs, one after another in this process's machine, `dpgeng distill` for
ndpdc at epsilon 1 and 10 and for dm (non-private, with --references, which
adds the random-real-subset and full-data references), all with the default
settings otherwise, and prints a markdown table (mean +- std over the
evaluation models, and the wall time of each command). Expected runtime on
2 CPU cores: about 10-15 minutes.
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
  args = ap.parse_args()
  runs = [
      ("ndpdc, eps 1", ["--method", "ndpdc", "--epsilon", "1"]),
      ("ndpdc, eps 10", ["--method", "ndpdc", "--epsilon", "10"]),
      ("dm (NOT private)", ["--method", "dm", "--references"]),
  ]
  rows = []
  for name, flags in runs:
    out = os.path.join(args.out, name.split(",")[0].split(" ")[0] + (
        flags[3] if flags[1] == "ndpdc" else ""))
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
    r = m[key]
    print(f"| {label} | inf | {fmt(r)} | "
          f"{r.get('seconds', float('nan')):.0f} s (training only) |")


if __name__ == "__main__":
  main()
