"""Probe of the generated set alone: runs a generator plug-in with the
noise the default run would calibrate for it, then trains ConvNets on the
whole generated set and reports their test accuracy (mean over draws).

    python benchmarks/pe_probe.py --epsilon 1 --draws 3 \
        --set pe_embedding=trained --set pe_k=2

Each --set NAME=VALUE changes one Config field (--set pe_public_only=true:
the same loop with no votes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from dpgeng_jax import config as config_lib, data, evaluate, models, planning
from dpgeng_jax import generators, noise


def parse_set(cfg, items):
  updates = {}
  for item in items:
    name, value = item.split("=", 1)
    typ = type(getattr(cfg, name))
    updates[name] = (value.lower() in ("1", "true")) if typ is bool else (
        typ(value))
  return dataclasses.replace(cfg, **updates)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--epsilon", type=float, default=1.0)
  ap.add_argument("--method", default="dpgeng")
  ap.add_argument("--draws", type=int, default=3)
  ap.add_argument("--epochs", type=int, default=30)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--set", action="append", default=[])
  ap.add_argument("--label", default="")
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  cfg = parse_set(config_lib.Config(dataset=args.dataset,
                                    epsilon=args.epsilon, method=args.method,
                                    quiet=True), args.set)
  ds = data.load_dataset(cfg.dataset)
  plan = planning.resolve(cfg, tuple(ds.image_shape))
  mechs = planning.mechanisms_for(cfg, plan)
  gen_mechs = [m for m in mechs if m.name == "generator"]
  gen = generators.for_config(cfg)
  x_tr = ds.normalize(ds.x_train)
  model = models.ConvNet(ds.num_classes, width=cfg.pe_width, depth=plan.depth)
  accs, times = [], []
  for d in range(args.draws):
    t0 = time.time()
    ctx = generators.Context(
        x_tr, ds.y_train, np.ones(len(ds.y_train), np.float32), None,
        tuple(ds.image_shape), ds.num_classes, ds.normalize,
        jax.random.key(100 + d), cfg.generated_per_class, model, True)
    out = gen.generate(ctx, noise.secret_key(), gen_mechs)
    times.append(time.time() - t0)
    ecfg = evaluate.EvalConfig(num_models=1, epochs=args.epochs,
                               width=args.width, depth=plan.depth)
    acc = evaluate.evaluate(jax.random.key(d), ds.normalize(out.x), out.y,
                            ds.normalize(ds.x_test), ds.y_test,
                            num_classes=ds.num_classes, cfg=ecfg)
    accs.append(acc["test_accuracy_mean"])
  res = {"label": args.label or " ".join(args.set) or "default",
         "epsilon": args.epsilon,
         "sigma": [m.noise_multiplier for m in gen_mechs],
         "acc_mean": float(np.mean(accs)),
         "acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
         "accs": accs, "generate_s": float(np.mean(times))}
  print(json.dumps(res))
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
  main()
