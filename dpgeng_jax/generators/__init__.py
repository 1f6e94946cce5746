"""DP generators behind one protocol.

A generator is one object with

* ``name``: what config.json and the report call it;
* ``mechanisms()``: its private mechanisms with noise 0, as templates the
  run's calibration sets the noise of (with the generator's budget share);
  empty when it spends none of the run's budget;
* ``fixed()``: mechanisms with declared noise (external data) and
  ``declared``: a declared (epsilon, delta), composed by basic composition;
* ``nonprivate_reason``: why its output is not private (None: it is);
* ``reads_private``: whether ``generate`` reads the private set;
* ``generate(ctx, secret, mechanisms) -> Output``: reads the private data
  only through its mechanisms (with the calibrated noise and the secret
  key) and returns the generated images; everything else is public.

Implementations: `pe.PrivateEvolution` (``pe:text``, ``pe:nearest:PATH``,
or any `apis.ImageAPI` from Python), `merf.Merf` (``merf``, DP-MERF, no
public prior) and `external.External` (``npz:PATH``, with a declared
guarantee). `for_config` picks the one a configuration names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Context:
  """What `generate` may read. `x_private`, `y_private`, `mask` are the
  private rows (normalised images, padded to the public `num_rows` with
  mask 0; on a mesh, split over its devices): only the mechanisms read
  them. The rest is public."""
  x_private: Any
  y_private: Any
  mask: Any
  mesh: Any
  image_shape: tuple
  num_classes: int
  normalize: Callable      # pixels in [0, 1] -> the models' input space
  key: jax.Array           # public key
  per_class: int           # generated images per class to return
  model: Any = None        # the run's ConvNet family (for embeddings)
  quiet: bool = True
  # Resuming a stage killed part-way: `checkpoint(arrays)` saves releases
  # as they are drawn (a generator whose releases, or anything derived
  # from them, leave the process before `generate` returns, such as
  # PE's queries to an image API, must save each release before that);
  # a resumed run hands them back as `saved` and they are reused, not
  # drawn again. None: no store (nothing is resumed).
  saved: dict | None = None
  checkpoint: Callable[[dict], None] | None = None


@dataclasses.dataclass
class Output:
  """Generated images in [0, 1] (class-major), labels, the noisy class
  counts a release carries (with their std; None if none) and arrays worth
  keeping (releases, per-iteration populations) under their names."""
  x: np.ndarray
  y: np.ndarray
  counts: np.ndarray | None = None
  count_std: float | None = None
  arrays: dict = dataclasses.field(default_factory=dict)


@runtime_checkable
class DPGenerator(Protocol):
  name: str
  declared: tuple | None
  nonprivate_reason: str | None
  reads_private: bool

  def mechanisms(self) -> tuple:
    ...

  def fixed(self) -> tuple:
    ...

  def generate(self, ctx: Context, secret: jax.Array,
               mechanisms: list) -> Output:
    ...


def check_mechanisms(generator, given) -> list:
  """`given` (calibrated mechanisms handed to `generate`) as a list, after
  checking that they are the releases `generator` makes: its
  mechanisms()'s names, sampling rates, steps and sensitivities in order.
  Noise calibrated for other releases (fewer steps, a subsampled rate)
  would not give the guarantee it was calibrated for."""
  given = list(given)
  want = [(m.name, m.sampling_rate, m.steps, m.sensitivity)
          for m in generator.mechanisms()]
  got = [(m.name, m.sampling_rate, m.steps, m.sensitivity) for m in given]
  if got != want:
    raise ValueError(
        f"{generator.name} makes the releases (name, sampling rate, steps, "
        f"sensitivity) {want}, but was given mechanisms calibrated for "
        f"{got}: calibrate the templates of its mechanisms()")
  return given


def check_images(x, y, *, image_shape, num_classes: int):
  """Generated images and labels as the stages read them: (x float32 in
  [0, 1], y int32). Refused with DataError (naming the arrays x and y;
  the caller says whose they are): images the private data's checks
  refuse (rank, channels, non-finite or out-of-range pixels; uint8 is
  read as 0..255), another image shape than the private data's, labels
  that are not integers in 0..K-1 one per image, a class with no image.
  For external files and for every plug-in's `Output`."""
  from dpgeng_jax.data import _images, _labels
  from dpgeng_jax.errors import DataError
  x = _images(np.asarray(x), "x")
  y = _labels(y, "y", len(x))
  if y.max() >= num_classes:
    raise DataError(f"y has labels >= the private data's {num_classes} "
                    "classes")
  missing = np.flatnonzero(np.bincount(y, minlength=num_classes) == 0)
  if missing.size:
    raise DataError(f"no image of class(es) {missing[:10].tolist()}; "
                    f"every class 0..{num_classes - 1} of the private data "
                    "needs generated images")
  if tuple(x.shape[1:]) != tuple(image_shape):
    raise DataError(f"x has images of shape {tuple(x.shape[1:])}, the "
                    f"private data {tuple(image_shape)}")
  return x, y.astype(np.int32)


GENERATOR_SPECS = "pe:text | pe:nearest:PATH | merf | npz:PATH"


def check_spec(spec: str) -> None:
  """Raises ValueError for a --generator value no generator reads."""
  ok = (spec in ("pe:text", "merf", "builtin")
        or (spec.startswith("pe:nearest:") and len(spec) > 11)
        or (spec.startswith("npz:") and len(spec) > 4))
  if not ok:
    raise ValueError(f"generator must be one of {GENERATOR_SPECS}, got "
                     f"{spec!r}")


def for_config(cfg) -> DPGenerator:
  """The generator `cfg.generator` names (reads no data)."""
  check_spec(cfg.generator)
  if cfg.generator in ("merf", "builtin"):
    from dpgeng_jax.generators.merf import Merf
    return Merf.from_config(cfg)
  if cfg.generator.startswith("npz:"):
    from dpgeng_jax.generators.external import External
    return External.from_config(cfg)
  from dpgeng_jax.generators.pe import PrivateEvolution
  return PrivateEvolution.from_config(cfg)
