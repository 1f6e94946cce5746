"""Generator-only PE-text on digits with the text API's stroke range
(0, 0.06), the default, against (0, 0.15): the simulator's glyphs are
thinner than the digits' strokes, so does a prior with bolder glyphs help
PE?

    python benchmarks/pe_stroke_probe.py --draws 2

Prints the share of pixels above 0.5 in the data and in 300 simulator
samples per range, then one line per run: draws are interleaved (draw,
epsilon, stroke range); reduced evaluation (3 models x 100 epochs).
Results: benchmarks/RESULTS.md, "Private Evolution defaults".
"""

import argparse

import jax
import numpy as np

from dpgeng_jax import data, pipeline
from dpgeng_jax.config import Config
from dpgeng_jax.generators import pe
from dpgeng_jax.generators.apis.text import TextAPI, TextConfig
from pe_prior_probe import print_summary

RANGES = ((0.0, 0.06), (0.0, 0.15))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--draws", type=int, default=2)
  ap.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 10.0])
  args = ap.parse_args()
  ds = data.load_dataset("digits")
  shape = ds.x_train.shape[1:]
  print(f"data: pixels > 0.5: {np.mean(ds.x_train > 0.5):.3f}")
  for stroke in RANGES:
    api = TextAPI(shape, ds.num_classes, TextConfig(stroke=stroke))
    s = api.random(jax.random.key(0), np.repeat(np.arange(ds.num_classes),
                                                30))
    print(f"simulator, stroke {stroke}: pixels > 0.5: "
          f"{np.mean(s.images > 0.5):.3f}")
  rows = {}
  for draw in range(args.draws):
    for eps in args.epsilon:
      for stroke in RANGES:
        cfg = Config(method="generator", epsilon=eps, eval_models=3,
                     eval_epochs=100, quiet=True)
        api = TextAPI(shape, ds.num_classes, TextConfig(stroke=stroke))
        r = pipeline.run(cfg, dataset=ds,
                         generator=pe.PrivateEvolution(api), log=None)
        acc = 100 * r.metrics["test_accuracy_mean"]
        rows.setdefault((eps, stroke), []).append(acc)
        print(f"eps {eps} stroke {stroke} draw {draw}: {acc:.1f} %",
              flush=True)
  print_summary({f"eps {eps} stroke {stroke}": v
                 for (eps, stroke), v in rows.items()})


if __name__ == "__main__":
  main()
