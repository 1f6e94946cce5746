"""Generator-only PE-text on digits with other text-simulator settings.

    python benchmarks/pe_prior_probe.py --epsilon 1000 --seeds 0 1 2 \
        --text "size=(0.7,1.05),marks=0" --text "marks=2" [--config "pe_iterations=20"]

Each --text is a list of `TextConfig` fields (Python keyword syntax) over
its defaults (--config: `Config` fields for every row, for example the PE
options); each seed is a run of `--method generator` on --dataset (default
the embedded digits; IPC 10, 3 evaluation models x 100 epochs unless
--config says otherwise), the seed giving the
public randomness (fresh OS-entropy noise every run). At epsilon 1000 the
votes are exact up to 0.1 vote: what the simulator's prior allows PE to
reach. --save DIR keeps each run's generated set (x, y) as an npz.
Results: benchmarks/RESULTS.md, "Private Evolution defaults".
"""

import argparse
import ast
import dataclasses
import os
import time

import numpy as np

from dpgeng_jax import data, pipeline
from dpgeng_jax.config import Config
from dpgeng_jax.generators import pe
from dpgeng_jax.generators.apis.text import TextAPI, TextConfig


def fields(spec: str) -> dict:
  """"a=1,b=(0,1)" -> {"a": 1, "b": (0, 1)} (literals only)."""
  call = ast.parse(f"f({spec})", mode="eval").body
  return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--epsilon", type=float, nargs="+", default=[1000.0])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--text", action="append", default=None,
                  help="TextConfig fields of one row (repeatable)")
  ap.add_argument("--config", default="",
                  help="Config fields over the defaults, for every row "
                  "(for example \"pe_iterations=20\")")
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--save", default="")
  args = ap.parse_args()
  rows = args.text or [""]
  ds = data.load_dataset(args.dataset)
  shape = ds.x_train.shape[1:]
  results = {}
  for seed in args.seeds:          # interleaved: load hits every row alike
    for eps in args.epsilon:
      for row, spec in enumerate(rows):
        cfg = Config(**{"method": "generator", "epsilon": eps,
                        "eval_models": 3, "eval_epochs": 100, "quiet": True,
                        "seed": seed, **fields(args.config)})
        api = TextAPI(shape, ds.num_classes, TextConfig(**fields(spec)))
        t = time.time()
        gen = dataclasses.replace(pe.PrivateEvolution.from_config(cfg),
                                  api=api)   # cfg's PE options, this API
        r = pipeline.run(cfg, dataset=ds, generator=gen, log=None)
        acc = 100 * r.metrics["test_accuracy_mean"]
        results.setdefault((eps, spec), []).append(acc)
        print(f"eps {eps:g} seed {seed} [{spec}]: {acc:.1f} % "
              f"({time.time() - t:.0f} s)", flush=True)
        if args.save:
          os.makedirs(args.save, exist_ok=True)
          np.savez(os.path.join(args.save, f"eps{eps:g}_seed{seed}_"
                                f"row{row}.npz"),
                   x=r.x_generated, y=r.y_generated)
  print_summary({f"eps {eps:g} [{spec}]": v
                 for (eps, spec), v in results.items()})


def print_summary(rows: dict) -> None:
  """One line per row: its accuracies, their mean and std over draws."""
  for name, v in rows.items():
    std = f" +- {np.std(v, ddof=1):.1f}" if len(v) > 1 else ""
    print(f"{name}: {np.round(v, 1).tolist()} mean {np.mean(v):.1f}{std}")


if __name__ == "__main__":
  main()
