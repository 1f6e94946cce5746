"""Independent private draws of one configuration, side by side.

    python benchmarks/draws.py --draws 3 --epsilon 1 10 --out runs/draws \
        --checkout now=. --checkout before=/tmp/before
    python benchmarks/draws.py --draws 3 --epsilon 1 --out runs/draws_sizes \
        --variant default= --variant public="--public-class-sizes"

A private run draws fresh noise, so one run says little: repeated runs of
one configuration differ by more than the std over evaluation models. This
runs `python -m dpgeng_jax distill --dataset DATASET --epsilon E --quiet`
(plus --extra) `--draws` times per epsilon and per checkout (a source tree
put first on PYTHONPATH; compare two versions of the code on one machine)
and per --variant (extra flags of its own), interleaved (draw, epsilon,
checkout, variant) so that machine load hits every row alike, and prints
per row the test accuracy of each draw and their mean +- std over draws,
with the wall time. --report reprints from --out; --first-seed S runs
draw d at --seed S + d (fresh public randomness as well as fresh
noise). Flags that start with '--' go in as --extra="--flag" (argparse
reads a bare "--flag" as its own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _run(checkout: str, eps: str, out: str, args, flags: str = "") -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.path.abspath(checkout) + os.pathsep + env.get(
      "PYTHONPATH", "")
  out = os.path.abspath(out)
  cmd = [sys.executable, "-m", "dpgeng_jax", "distill", "--dataset",
         args.dataset, "--epsilon", eps, "--out", out, "--quiet",
         "--overwrite", *args.extra.split(), *flags.split()]
  t = time.time()
  # cwd = the checkout: `python -m` puts the working directory first on
  # sys.path, ahead of PYTHONPATH.
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        cwd=os.path.abspath(checkout))
  wall = time.time() - t
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  privacy = json.load(open(os.path.join(out, "privacy.json")))
  record = {"checkout": checkout, "epsilon": eps, "wall_s": wall,
            "dpgeng_jax": proc_module(checkout),
            "test_accuracy_mean": metrics["test_accuracy_mean"],
            "test_accuracy_std": metrics["test_accuracy_std"],
            "epsilon_reported": privacy.get("epsilon_pld"),
            "noise_multipliers": {m["name"]: m["noise_multiplier"]
                                  for m in privacy["mechanisms"]}}
  with open(os.path.join(out, "draw.json"), "w") as f:
    json.dump(record, f, indent=2)
  return record


def proc_module(checkout: str) -> str:
  """Where the subprocess imports dpgeng_jax from (checked, not assumed)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.path.abspath(checkout)
  return subprocess.run(
      [sys.executable, "-c", "import dpgeng_jax; print(dpgeng_jax.__file__)"],
      env=env, cwd=os.path.abspath(checkout), capture_output=True,
      text=True).stdout.strip()


def _table(records: list[dict]) -> str:
  rows = {}
  for r in records:
    rows.setdefault((r["checkout"], r["epsilon"]), []).append(r)
  lines = ["| checkout | epsilon | draws: test acc % | mean +- std over "
           "draws | std over eval models (mean) | wall s (mean) | noise "
           "multipliers (last draw) |",
           "|---|---|---|---|---|---|---|"]
  for (name, eps), rs in sorted(rows.items(), key=lambda kv: (
      float(kv[0][1]), kv[0][0])):
    accs = [100 * r["test_accuracy_mean"] for r in rs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    nm = ", ".join(f"{k} {v:.3g}" for k, v in rs[-1]["noise_multipliers"]
                   .items())
    eval_std = statistics.mean(100 * r["test_accuracy_std"] for r in rs)
    lines.append(f"| {name} | {eps} | {', '.join(f'{a:.1f}' for a in accs)}"
                 f" | {statistics.mean(accs):.1f} +- {std:.1f} | "
                 f"{eval_std:.1f} | "
                 f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {nm} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="runs/draws")
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--epsilon", nargs="+", default=["1", "10"])
  ap.add_argument("--draws", type=int, default=3)
  ap.add_argument("--checkout", action="append", default=None,
                  help="NAME=PATH of a source tree (repeatable; default "
                  "now=.)")
  ap.add_argument("--extra", default="", help="extra distill flags")
  ap.add_argument("--variant", action="append", default=None,
                  help="NAME=FLAGS: a row with these extra flags "
                  "(repeatable; default one row without)")
  ap.add_argument("--first-seed", type=int, default=None,
                  help="draw d runs with --seed FIRST_SEED + d (the public "
                  "randomness varies too; default: every draw at the "
                  "command's seed)")
  ap.add_argument("--report", action="store_true")
  ap.add_argument("--skip-done", action="store_true",
                  help="reuse the draws already in --out (draw.json)")
  args = ap.parse_args()
  checkouts = dict(c.split("=", 1) for c in (args.checkout or ["now=."]))
  variants = dict(v.split("=", 1) for v in (args.variant or ["="]))
  records = []
  if args.report:
    for root, _, files in os.walk(args.out):
      if "draw.json" in files:
        records.append(json.load(open(os.path.join(root, "draw.json"))))
  else:
    for d in range(args.draws):
      for eps in args.epsilon:
        for (name, path), (vname, flags) in (
            (c, v) for c in checkouts.items() for v in variants.items()):
          label = name + (f" {vname}" if vname else "")
          out = os.path.join(args.out,
                             f"{label.replace(' ', '_')}_eps{eps}_draw{d}")
          done = os.path.join(out, "draw.json")
          if args.skip_done and os.path.exists(done):
            records.append(json.load(open(done)))
            continue
          seed = ("" if args.first_seed is None
                  else f" --seed {args.first_seed + d}")
          r = _run(path, eps, out, args, flags + seed)
          r["checkout"] = label
          json.dump(r, open(os.path.join(out, "draw.json"), "w"), indent=2)
          records.append(r)
          print(f"{label} eps {eps} draw {d}: "
                f"{100 * r['test_accuracy_mean']:.1f} % in "
                f"{r['wall_s']:.0f} s", flush=True)
  print(_table(records))


if __name__ == "__main__":
  main()
