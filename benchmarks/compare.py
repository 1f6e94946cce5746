"""Side-by-side results of the methods in one run (README tables).

    python benchmarks/compare.py --out runs/table            # digits, all rows
    python benchmarks/make_shapes.py --out runs/shapes32.npz
    python benchmarks/compare.py --dataset npz:runs/shapes32.npz \
        --out runs/table_shapes --extra "--extractor-width 32 --eval-width 32"

Runs `dpgeng distill` one command after another, all with the default
settings otherwise, and prints a markdown table (mean +- std over the
evaluation models, the wall time of each command, the noise multipliers
G(enerator) / F(eature matching) / E(xpert), and the expert's test accuracy).
`--report` prints the table again from the runs in --out.
  --set full (default): at each --epsilon, dpgeng and its three ablations
    (noise init instead of generated init, random instead of generated
    extractors, with the expert), ndpdc and the generator-only baseline; then dm
    (non-private) with --references (random real subset, full training set).
    About 45 min for digits on 2 CPU cores.
  --set main: the same without the two ablations of init and extractors.
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
  ap.add_argument("--set", default="full", choices=("full", "main", "foundation"))
  ap.add_argument("--report", action="store_true",
                  help="print the table from the runs already in --out")
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
               (f"dpgeng-expert, eps {e}", [*dp, "--expert"]),
               (f"ndpdc, eps {e}", ["--method", "ndpdc"]),
               (f"generator, eps {e}", ["--method", "generator"])]
      if args.set == "main":  # without the init and extractor ablations
        del runs[-5:-3]
      for r in runs[-6 if args.set == "full" else -4:]:
        r[1].extend(["--epsilon", e])
  runs.append(("dm (NOT private)", ["--method", "dm", "--references"]))
  rows = []
  for name, flags in runs:
    out = os.path.join(args.out,
                       name.replace(", eps ", "_eps").split(" ")[0])
    cmd = [sys.executable, "-m", "dpgeng_jax", "distill", "--dataset",
           args.dataset, "--ipc", str(args.ipc), "--out", out, "--overwrite",
           "--quiet", *flags, *args.extra.split()]
    if not args.report:
      t = time.time()
      subprocess.run(cmd, check=True)
      with open(os.path.join(out, "wall_s.txt"), "w") as f:
        f.write(f"{time.time() - t:.1f}\n")
      print(" ".join(cmd[1:]), flush=True)
    rows.append((name, *_load(out)))
  _table(rows, args)


def _load(out):
  with open(os.path.join(out, "metrics.json")) as f:
    m = json.load(f)
  with open(os.path.join(out, "privacy.json")) as f:
    p = json.load(f)
  with open(os.path.join(out, "wall_s.txt")) as f:
    wall = float(f.read())
  return m, p, wall


def _fmt(m):
  return (f"{100 * m['test_accuracy_mean']:.1f} +- "
          f"{100 * m['test_accuracy_std']:.1f}")


def _table(rows, args):
  print(f"\n| method ({args.dataset}, IPC {args.ipc}) | epsilon (PLD) | "
        "test acc % | wall time | noise multipliers | expert test acc %: "
        "on G -> after DP-SGD |")
  print("|---|---|---|---|---|---|")
  for name, m, p, wall in rows:
    eps = p["epsilon_pld"]
    e = "inf (not private)" if eps is None else f"{eps:.3f}"
    sig = ", ".join(f"{x['name'].split('_')[0][0].upper()} "
                    f"{x['noise_multiplier']:.2f}"
                    for x in p.get("mechanisms", []) if eps is not None)
    ex = m.get("expert")
    ex = (f"{100 * ex['test_accuracy_pretrained_on_generated']:.1f} -> "
          f"{100 * ex['test_accuracy_after_dp_finetuning']:.1f}" if ex
          else "")
    print(f"| {name} | {e} | {_fmt(m)} | {wall:.0f} s | {sig} | {ex} |")
  _, m, _, _ = rows[-1]
  for key, label in (("reference_random_real_subset",
                      f"random real subset, {args.ipc}/class (NOT private)"),
                     ("reference_full_training_set",
                      "full training set (NOT private)")):
    if key in m:
      r = m[key]
      print(f"| {label} | inf | {_fmt(r)} | {r['seconds']:.0f} s (training "
            "only) | | |")


if __name__ == "__main__":
  main()
