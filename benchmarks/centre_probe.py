"""How much of the clipped class means is class signal, with and without
the queries' centre (benchmarks/RESULTS.md "Centred queries").

    dpgeng distill --dataset digits --epsilon 10 --out runs/digits
    python benchmarks/centre_probe.py --run runs/digits

Embeds the private digits with a random ConvNet and with one trained on
the run's generated set (RUN/stages/generate/arrays.npz, 30 epochs), and
prints, with no centre, with the generated data's mean embedding as the
centre, and with its per-class mean: the median norm of the (centred)
embeddings and, after clipping at that median, the spread of the class
means around their average: the class signal a query carries for noise
of a fixed size. A one-off measurement: no DP release is made.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax import evaluate, models
from dpgeng_jax.clipping import clip_rows
from dpgeng_jax.data import load_dataset


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", required=True, help="a finished digits run")
  ap.add_argument("--width", type=int, default=128)
  args = ap.parse_args()
  ds = load_dataset("digits")
  gen = np.load(os.path.join(args.run, "stages", "generate", "arrays.npz"))
  xg, yg = ds.normalize(gen["x_gen"]), gen["y_gen"]
  xr, yr = ds.normalize(ds.x_train), ds.y_train
  k = ds.num_classes
  model = models.ConvNet(k, width=args.width,
                         depth=models.default_depth(xr.shape[1]))
  shape = tuple(xr.shape[1:])
  nets = {
      "random": models.init_params(model, jax.random.key(1), shape),
      "trained on G": evaluate.train_one(
          jax.random.key(0), xg, yg, model=model,
          cfg=evaluate.EvalConfig(epochs=30))[-1]}
  embed = jax.jit(models.embed_fn(model))
  print("| extractor | centre | median norm | spread of clipped class means |")
  print("|---|---|---|---|")
  for name, params in nets.items():
    fr = np.asarray(embed(params, jnp.asarray(xr)))
    fg = np.asarray(embed(params, jnp.asarray(xg)))
    per_class = np.stack([fg[yg == c].mean(0) for c in range(k)])
    for label, centre in (("none", np.zeros_like(fg[0])),
                          ("generated mean", fg.mean(0)),
                          ("generated class mean", per_class[yr])):
      z = fr - centre
      scale = float(np.median(np.linalg.norm(z, axis=1)))
      clipped = np.asarray(clip_rows(jnp.asarray(z / scale), 1.0))
      means = np.stack([clipped[yr == c].mean(0) for c in range(k)])
      spread = np.sqrt(np.mean(np.sum((means - means.mean(0)) ** 2, 1)))
      print(f"| {name} | {label} | {scale:.2f} | {spread:.3f} |")


if __name__ == "__main__":
  main()
