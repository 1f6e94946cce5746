"""Generator-only PE-text on digits with other text-simulator settings.

    python benchmarks/pe_prior_probe.py --epsilon 1000 --seeds 0 1 2 \
        --text "size=(0.7,1.05),marks=0" --text "marks=2" [--config "pe_iterations=20"]

Each --text is a list of `TextConfig` fields (Python keyword syntax) over
its defaults (--config: `Config` fields for every row, for example the PE
options; --pe: `pe.PEConfig` fields over those); each seed is a run of
`--method generator` on --dataset (default the embedded digits; IPC 10, 3
evaluation models x 100 epochs unless --config says otherwise), the seed
giving the public randomness (fresh OS-entropy noise every run). At epsilon 1000 the
votes are exact up to 0.1 vote: what the simulator's prior allows PE to
reach. (Since 2026-12-06 a private run at epsilon 1000 is refused, its
noise being too small for the sampler's support; such rows now need
`--config deterministic=True`, a fixed noise key: not private, the same
measurement.) --save DIR keeps each run's generated set (x, y) as an npz.
Two probe-only variants patch the PE loop for every row: --last-degree D
varies the final draw (the generated set) at degree max(D, 0) instead of
0; --noise-schedule late|early scales the noise of release t by w_t,
linear from 2 to 0.5 (late: less noise late) or 0.5 to 2, normalised so
that sum_t w_t^-2 = T: the same privacy as T releases at sigma (their
composition is one Gaussian with 1/sigma^2 summed).
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
from dpgeng_jax.generators import apis, pe
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
  ap.add_argument("--pe", default="",
                  help="PEConfig fields over --config's, for every row "
                  "(for example \"keep=True,selection='rank'\")")
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--save", default="")
  ap.add_argument("--last-degree", type=float, default=0.0)
  ap.add_argument("--noise-schedule", choices=("flat", "late", "early"),
                  default="flat")
  args = ap.parse_args()
  patch_loop(args.last_degree, args.noise_schedule)
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
        gen = pe.PrivateEvolution.from_config(cfg)
        gen = dataclasses.replace(gen, api=api, cfg=dataclasses.replace(
            gen.cfg, **fields(args.pe)))   # cfg's PE options, this API
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


def noise_weights(iterations: int, schedule: str) -> np.ndarray:
  """w_t with sum_t w_t^-2 = T (flat: all 1)."""
  r = np.linspace(0.0, 1.0, iterations)
  w = {"flat": np.ones(iterations), "late": 2.0 - 1.5 * r,
       "early": 0.5 + 1.5 * r}[schedule]
  return w * np.sqrt(np.sum(w ** -2.0) / iterations)


def patch_loop(last_degree: float, schedule: str) -> None:
  """The probe-only variants of the module docstring."""
  if last_degree > 0:
    degrees = apis.degrees

    def with_last(iterations):
      d = degrees(iterations)
      return d[:-1] + [max(d[-1], last_degree)] if d else d
    apis.degrees = with_last
  if schedule != "flat":
    release, evolve, t = pe.release_histogram, pe.evolve, [0, None]

    def scheduled_release(key, counts, sigma, **votes):
      w = noise_weights(t[1], schedule)[t[0]]
      t[0] += 1
      return release(key, counts, sigma * w, **votes)

    def counted_evolve(*a, cfg, **k):
      t[:] = [0, cfg.iterations]
      return evolve(*a, cfg=cfg, **k)
    pe.release_histogram, pe.evolve = scheduled_release, counted_evolve


def print_summary(rows: dict) -> None:
  """One line per row: its accuracies, their mean and std over draws."""
  for name, v in rows.items():
    std = f" +- {np.std(v, ddof=1):.1f}" if len(v) > 1 else ""
    print(f"{name}: {np.round(v, 1).tolist()} mean {np.mean(v):.1f}{std}")


if __name__ == "__main__":
  main()
