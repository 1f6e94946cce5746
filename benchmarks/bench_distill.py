"""Wall time and per-stage times of one whole `dpgeng distill` run.

    python benchmarks/bench_distill.py --out runs/bench/distill.json               # the CLI defaults; not run here (estimate: minutes on a GPU)
    python benchmarks/bench_distill.py --quick --out runs/bench/distill_quick.json  # ~60-90 s on the 2-core VM

Runs, as a subprocess with this checkout first on PYTHONPATH,

    python -m dpgeng_jax distill --dataset digits --epsilon 1 --out DIR --quiet

(plus --method / --ipc / --extra-args if given; --quick adds flags that make
every stage tiny: --steps 20 --num-queries 2 --eval-epochs 2 --eval-models 1
--generator-steps 20 --pool-epochs 1 --expert-steps 2 --extractor-width 16
--eval-width 16), then reads what `pipeline.write_outputs` wrote:
config.json (the resolved config, `timings_s`, versions and backend),
metrics.json (accuracy, `timings_s`) and privacy.json (composed epsilon).

The table gives the subprocess's wall time and the pipeline's own stage
timings (`timings_s`, time.time() around each stage, so they include each
stage's XLA compilation):

  calibration_s     noise calibration of the budget (reads no data)
  generation_s      built-in DP generator: release + training on it
  extractor_pool_s  training the extractor pool on generated data
  queries_s         the Q private feature-matching queries (M_F)
  expert_s          DP-SGD fine-tuning of the expert (M_E)
  distillation_s    initialisation (k-means on generated data) + the steps
  evaluation_s      training and testing the evaluation models
  total_s           from the pipeline's start (after loading the data)

"outside the pipeline" = wall - total_s: interpreter start-up, imports,
loading the dataset, writing the outputs. Stages a method does not run are
absent. Output: markdown on stdout, all figures in --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402  pylint: disable=wrong-import-position

QUICK_FLAGS = ["--steps", "20", "--num-queries", "2", "--eval-epochs", "2",
               "--eval-models", "1", "--generator-steps", "20",
               "--pool-epochs", "1", "--expert-steps", "2",
               "--extractor-width", "16", "--eval-width", "16"]
STAGES = ("calibration_s", "generation_s", "extractor_pool_s", "queries_s",
          "expert_s", "distillation_s", "evaluation_s")


def build_parser():
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/bench/distill.json",
                  help="JSON file for all figures (default %(default)s)")
  ap.add_argument("--quick", action="store_true",
                  help="add flags that make every stage tiny (~60-90 s)")
  ap.add_argument("--dataset", default="digits",
                  help="dataset spec (default %(default)s)")
  ap.add_argument("--epsilon", type=float, default=1.0,
                  help="target epsilon (default %(default)s)")
  ap.add_argument("--method", default=None,
                  help="--method of the run (default: the CLI's, dpgeng)")
  ap.add_argument("--ipc", type=int, default=None,
                  help="--ipc of the run (default: the CLI's, 10)")
  ap.add_argument("--extra-args", default="",
                  help="more `dpgeng distill` flags, one shell-quoted "
                       "string, appended last (default none)")
  ap.add_argument("--run-dir", default="",
                  help="output directory of the run (default: a temporary "
                       "directory, removed afterwards unless --keep)")
  ap.add_argument("--keep", action="store_true",
                  help="keep the temporary run directory")
  ap.add_argument("--timeout", type=int, default=7200,
                  help="seconds before the run is killed (default "
                       "%(default)s)")
  ap.add_argument("--python", default=sys.executable,
                  help="interpreter of the run (default this one)")
  return ap


def _load(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def main(argv=None):
  args = build_parser().parse_args(argv)
  tmp = None
  run_dir = args.run_dir
  if not run_dir:
    tmp = tempfile.mkdtemp(prefix="bench_distill_")
    run_dir = os.path.join(tmp, "run")
  cmd = [args.python, "-m", "dpgeng_jax", "distill", "--dataset",
         args.dataset, "--epsilon", str(args.epsilon), "--out", run_dir,
         "--quiet"]
  if args.method:
    cmd += ["--method", args.method]
  if args.ipc is not None:
    cmd += ["--ipc", str(args.ipc)]
  if args.quick:
    cmd += QUICK_FLAGS
  cmd += shlex.split(args.extra_args)
  env = dict(os.environ)
  env["PYTHONPATH"] = _bench.REPO_ROOT + (
      os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  printable = "PYTHONPATH=" + shlex.quote(_bench.REPO_ROOT) + " " + \
      " ".join(shlex.quote(c) for c in cmd)
  print("running:", printable, flush=True)
  load_start = list(os.getloadavg())
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, cwd=_bench.REPO_ROOT,
                          capture_output=True, text=True,
                          timeout=args.timeout, check=False)
    rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    rc = "timeout"
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (
        e.stdout or "")
    stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (
        e.stderr or "")
  wall = time.perf_counter() - t0
  # Peak resident memory of the largest child so far (Linux: KiB).
  peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  print(stdout.rstrip())
  if rc != 0:
    print(stderr[-4000:].rstrip(), file=sys.stderr)
    print(f"run failed: rc {rc} after {wall:.1f} s", file=sys.stderr)

  config = _load(os.path.join(run_dir, "config.json"))
  metrics = _load(os.path.join(run_dir, "metrics.json"))
  privacy = _load(os.path.join(run_dir, "privacy.json"))
  timings = ((config or {}).get("timings_s")
             or (metrics or {}).get("timings_s") or {})
  total = timings.get("total_s")
  versions = (config or {}).get("versions", {})

  lines = [
      f"`dpgeng distill` on {args.dataset}, epsilon {args.epsilon:g}"
      + (" (--quick flags)" if args.quick else "")
      + f"; method {(config or {}).get('method', '?')}, IPC "
      f"{(config or {}).get('ipc', '?')}, steps "
      f"{(config or {}).get('steps', '?')}, backend "
      f"{versions.get('backend', '?')}, jax {versions.get('jax', '?')}; "
      f"{os.cpu_count()} CPUs, loadavg at start "
      + ", ".join(f"{v:.1f}" for v in load_start) + ". Stage times include "
      "XLA compilation.",
      "",
      "| stage | seconds | % of wall |",
      "|---|---:|---:|"]
  for s in STAGES:
    if s in timings:
      lines.append(f"| {s[:-2]} | {timings[s]:.2f} | "
                   f"{100 * timings[s] / wall:.1f} |")
  if total is not None:
    lines.append(f"| pipeline total | {total:.2f} | {100 * total / wall:.1f} |")
    lines.append(f"| outside the pipeline (start-up, imports, data, "
                 f"writing) | {wall - total:.2f} | "
                 f"{100 * (wall - total) / wall:.1f} |")
  lines.append(f"| **wall (subprocess)** | **{wall:.2f}** | 100.0 |")
  lines.append("")
  if metrics is not None:
    lines.append(
        f"test accuracy {100 * metrics['test_accuracy_mean']:.2f} +- "
        f"{100 * metrics['test_accuracy_std']:.2f} % over "
        f"{metrics['num_eval_models']} model(s)")
  if privacy is not None:
    lines.append(f"privacy: private={privacy.get('private')}, epsilon PLD "
                 f"{privacy.get('epsilon_pld')} at delta "
                 f"{privacy.get('delta')}")
  lines.append(f"peak RSS of the run: {peak_rss_mib:.0f} MiB; exit status "
               f"{rc}")
  table = "\n".join(lines)
  print()
  print(table)

  _bench.write_json(args.out, {
      "benchmark": "distill", "command": cmd, "command_printable": printable,
      "returncode": rc, "wall_s": wall, "timings_s": timings,
      "outside_pipeline_s": (wall - total) if total is not None else None,
      "peak_rss_mib": peak_rss_mib,
      "config": config, "metrics": metrics,
      "privacy_summary": None if privacy is None else {
          k: privacy.get(k) for k in ("private", "epsilon_pld",
                                      "epsilon_rdp", "epsilon_gdp_clt",
                                      "delta", "target_epsilon")},
      "environment": {"cpu_count": os.cpu_count(),
                      "loadavg_start": load_start,
                      "python": args.python},
      "stdout_tail": stdout[-4000:], "stderr_tail": stderr[-4000:],
      "bench_config": vars(args), "table_markdown": table})
  print(f"wrote {args.out}")
  if tmp is not None and not args.keep:
    shutil.rmtree(tmp, ignore_errors=True)
  elif tmp is not None:
    print(f"kept {run_dir}")
  return 0 if rc == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
