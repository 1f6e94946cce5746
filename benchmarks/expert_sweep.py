"""Sweep of the DP expert's public hyperparameters on digits.

    python benchmarks/expert_sweep.py --epsilon 1 10 --draws 3

For each target epsilon it runs the DP-GenG budget allocation of every
setting (T_E steps, q_E rate, learning rate; shares as configured), builds
the generated data G and the generated-data expert once (the release uses
the default setting's sigma_G), then fine-tunes the expert with DP-SGD
`--draws` times with fresh OS-entropy noise and reports its test accuracy
(mean +- std over draws). Test accuracy is used here only to choose public
defaults on this public benchmark dataset; it is not part of any private
run.
"""

import argparse
import dataclasses
import time

import jax
import numpy as np

from dpgeng_jax import Config, data, expert, extractors, mechanisms, models
from dpgeng_jax import generators, pipeline, stages

SETTINGS = (  # (steps, sampling rate, learning rate)
    (100, 0.1, 0.5), (100, 0.1, 0.05), (20, 0.3, 0.5), (20, 0.3, 0.1),
    (50, 0.2, 0.1), (10, 0.5, 0.2))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 10.0])
  ap.add_argument("--draws", type=int, default=3)
  ap.add_argument("--share-expert", type=float, default=1.0)
  args = ap.parse_args()
  ds = data.load_dataset("digits")
  x_train, x_test = ds.normalize(ds.x_train), ds.normalize(ds.x_test)
  rows = []
  for eps in args.epsilon:
    base = Config(method="dpgeng", epsilon=eps, quiet=True,
                  share_expert=args.share_expert)
    plan = pipeline.resolve(base, ds.image_shape)
    mechs = pipeline.mechanisms_for(base, plan)
    k_gen, k_pool = jax.random.split(jax.random.key(0))
    # A tuning tool (not private): the exact class sizes size the layout.
    model = models.ConvNet(ds.num_classes, width=base.pe_width,
                           depth=plan.depth)
    n = len(ds.y_train)
    out = generators.for_config(base).generate(
        generators.Context(x_train, ds.y_train, np.ones(n, np.float32),
                           None, tuple(ds.image_shape), ds.num_classes,
                           ds.normalize, k_gen, base.generated_per_class,
                           model, True),
        mechanisms.secret_key(), [stages.by_name(mechs, "generator")])
    x_gen, y_gen = out.x, out.y
    model = models.ConvNet(ds.num_classes, width=base.extractor_width,
                           depth=plan.depth)
    pcfg = dataclasses.replace(
        stages.eval_config(base, plan.depth),
        width=base.extractor_width)
    pool = extractors.train_generated_pool(
        k_pool, ds.normalize(x_gen), y_gen, num_classes=ds.num_classes,
        model=model, num_models=1, epochs=base.pool_epochs, checkpoints=1,
        cfg=pcfg)
    trained = extractors.fixed_pool(pool)(None, 0)
    acc0 = expert.accuracy(trained, model, x_test, ds.y_test)
    print(f"eps {eps}: expert pretrained on G: {100 * acc0:.1f}%", flush=True)
    for steps, q, lr in SETTINGS:
      cfg = dataclasses.replace(base, expert_steps=steps,
                                expert_sampling_rate=q, expert_lr=lr)
      sigma = stages.by_name(pipeline.mechanisms_for(cfg, plan),
                             "expert").noise_multiplier
      accs, t = [], time.time()
      for _ in range(args.draws):
        p = expert.dp_finetune(
            trained, model, x_train, ds.y_train,
            cfg=stages.expert_config(cfg),
            noise_multiplier=sigma, secret=mechanisms.secret_key())
        accs.append(expert.accuracy(p, model, x_test, ds.y_test))
      row = (eps, steps, q, lr, sigma, acc0, np.mean(accs), np.std(accs),
             (time.time() - t) / args.draws)
      rows.append(row)
      print(f"eps {eps} T {steps} q {q} lr {lr}: sigma_E {sigma:.2f} "
            f"{100 * row[6]:.1f} +- {100 * row[7]:.1f} ({row[8]:.0f} s/draw)",
            flush=True)
  print("\n| epsilon | T_E | q_E | lr | sigma_E | pretrained on G % | after "
        "DP fine-tuning % | s per draw |")
  print("|---|---|---|---|---|---|---|---|")
  for eps, steps, q, lr, sigma, a0, m, s, sec in rows:
    print(f"| {eps:g} | {steps} | {q} | {lr} | {sigma:.2f} | {100 * a0:.1f} "
          f"| {100 * m:.1f} +- {100 * s:.1f} | {sec:.0f} |")


if __name__ == "__main__":
  main()
