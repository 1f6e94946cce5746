"""The built-in generator's samples at a given noise multiplier (a grid).

    python benchmarks/generator_probe.py --dataset npz:runs/shapes28.npz \
        --noise-multiplier 0 --steps 1000 --out runs/gen_probe.png

Releases the class feature sums with the given sigma_G (0: no noise, NOT
private; a diagnostic of what the generator can express at all), trains the
generator for --steps and saves 8 samples per class, one row per class.
Noise comes from a fixed key: this is a diagnostic, never a private run.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dpgeng_jax import data
from dpgeng_jax.generators import merf as generator


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--noise-multiplier", type=float, default=0.0)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--features", type=int, default=500)
  ap.add_argument("--out", default="runs/gen_probe.png")
  args = ap.parse_args()
  ds = data.load_dataset(args.dataset)
  x = ds.normalize(ds.x_train)
  k_map, k_noise, k_fit, k_sample = jax.random.split(jax.random.key(0), 4)
  fmap = generator.FeatureMap.create(k_map, int(np.prod(ds.image_shape)),
                                     args.features)
  release = generator.release_class_features(
      fmap, jnp.asarray(x), jnp.asarray(ds.y_train), jnp.ones(len(x)),
      num_classes=ds.num_classes, noise_multiplier=args.noise_multiplier,
      noise_key=k_noise)
  means, _ = generator.class_means_from_release(release)
  cfg = generator.GeneratorConfig(num_features=args.features,
                                  steps=args.steps)
  t = time.time()
  gen, params = generator.train_generator(
      k_fit, fmap, means, image_shape=ds.image_shape, normalize=ds.normalize,
      cfg=cfg)
  xs, ys = generator.sample(gen, params, k_sample, 8, cfg.latent_dim)
  xs, ys = np.asarray(xs), np.asarray(ys)
  rows = [np.concatenate(list(xs[ys == c][:8]), axis=1)
          for c in range(ds.num_classes)]
  grid = np.clip(np.concatenate(rows, axis=0), 0, 1)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  img = Image.fromarray((grid * 255).round().astype(np.uint8))
  img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(args.out)
  print(f"wrote {args.out} ({time.time() - t:.0f} s of generator training)")


if __name__ == "__main__":
  main()
