"""External generated data (plug-in `npz:PATH`): images made by any DP
generator, brought with the guarantee the user declares for them."""

from __future__ import annotations

import numpy as np

from dpgeng_jax import accounting
from dpgeng_jax.errors import ConfigError, DataError
from dpgeng_jax.generators import Output


def load_external(path: str, *, image_shape, num_classes: int,
                  what: str = "generated data"):
  """Generated images and labels made by any DP generator, validated.

  The .npz holds `x` (uint8 or float in [0, 1], NHWC or NHW) and `y`
  (integer labels). Refused with DataError: a missing file or key, another
  image shape than the private data, non-finite or out-of-range pixels,
  labels out of range, a class with no image. Returns (x float32 in
  [0, 1], y).
  """
  from dpgeng_jax.data import NPZ_DAMAGE, _check_npz_file
  from dpgeng_jax.generators import check_images
  try:
    _check_npz_file(path, f"{what} is a zip archive of the arrays x and "
                    "y: np.savez(PATH, x=..., y=...)")
  except DataError as e:
    raise DataError(f"cannot read {what} {path!r}: {e}") from None
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in ("x", "y") if k not in f.files]
      if missing:
        raise DataError(f"{what} {path!r} lacks array(s) {missing} "
                        f"(found {sorted(f.files)})")
      x, y = f["x"], f["y"]
  except (OSError, ValueError, MemoryError, *NPZ_DAMAGE) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"cannot read {what} {path!r} ({type(e).__name__}: "
                    f"{e}); write it again") from e
  try:
    return check_images(x, y, image_shape=image_shape,
                        num_classes=num_classes)
  except DataError as e:
    raise DataError(f"{what} {path!r}: {e}") from e


class External:
  """Generated data from a file with the guarantee the user declares:
  (epsilon, delta) (basic composition), a Gaussian-DP mu, or noise
  parameters (both composed exactly). Spends none of the run's budget."""
  reads_private = False

  def __init__(self, path: str, *, epsilon=0.0, delta=0.0, mu=0.0,
               noise_multiplier=0.0, sampling_rate=1.0, steps=1):
    self.path, self.name = path, "npz:" + path
    self.declared, self._fixed = None, ()
    if sum(v > 0 for v in (epsilon, mu, noise_multiplier)) > 1:
      raise ConfigError("declare the guarantee of external generated data "
                        "one way: epsilon (with delta), mu or noise "
                        "parameters, not several")
    if epsilon > 0:
      self.declared = (epsilon, delta)
    elif mu > 0:
      self._fixed = (accounting.Mechanism("external_generator", 1.0 / mu,
                                          1.0, 1, sensitivity="declared"),)
    elif noise_multiplier > 0:
      self._fixed = (accounting.Mechanism("external_generator",
                                          noise_multiplier, sampling_rate,
                                          steps, sensitivity="declared"),)
    undeclared = self.declared is None and not self._fixed
    self.nonprivate_reason = ("external generated data came with no "
                              "declared guarantee") if undeclared else None

  @classmethod
  def from_config(cls, cfg) -> "External":
    return cls(cfg.generator[len("npz:"):], epsilon=cfg.generated_epsilon,
               delta=cfg.generated_delta, mu=cfg.generated_mu,
               noise_multiplier=cfg.generated_noise_multiplier,
               sampling_rate=cfg.generated_sampling_rate,
               steps=cfg.generated_steps)

  def mechanisms(self) -> tuple:
    return ()

  def fixed(self) -> tuple:
    return self._fixed

  def load(self, image_shape, num_classes: int):
    return load_external(self.path, image_shape=image_shape,
                         num_classes=num_classes)

  def generate(self, ctx, secret, mechanisms):
    del secret, mechanisms  # reads no private data
    x, y = self.load(ctx.image_shape, ctx.num_classes)
    return Output(x, y)
