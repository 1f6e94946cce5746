"""Presets: the protocol of a standard dataset (or a reduced one) in one name.

    dpgeng distill --preset mnist --epsilon 1 --out runs/mnist
    dpgeng distill --preset cifar10,quick --epsilon 10 --out runs/c10q
    dpgeng distill --preset mnist --dataset npz:my_mnist.npz --ipc 50 ...

A preset is a set of option values applied over the defaults; options given
explicitly (flags, or keyword arguments of `config`) override it, and
several presets separated by commas apply left to right (`cifar10,quick`:
the CIFAR-10 protocol, reduced). config.json records the preset's name, its
values and which of them were overridden (pipeline.run).

The dataset presets use the TFDS names (prepared datasets, read with
`tfds.data_source`; `--dataset npz:PATH` with the same preset runs the
same protocol on an npz copy, with the dataset's published normalisation
constants: `normalisation_name`). Their IPC, ConvNet depth and width, factor
and evaluation recipe are the paper's protocol (ALGORITHM.md: ConvNet-3,
width 128, instance norm, multi-formation factor 2, 5 evaluation models of
300 epochs; IPC 50 on CIFAR-10/100 and CelebA as in its tables, IPC 10 on
MNIST-like data as in the NDPDC/Dosser anchors); the number of queries,
distillation steps and budget shares are this project's defaults (the paper
does not state them). `quick` is a reduced protocol for CPUs and smoke
tests that changes only cost options (steps, epochs, widths, population
sizes), the same for every method so comparisons under it stay fair.

`TABLE` (and README "Presets") lists each with the hardware it assumes and
its expected runtime and result: "not measured yet" until measured here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpgeng_jax.config import Config
from dpgeng_jax.errors import ConfigError

_PAPER = {"depth": 3, "extractor_width": 128, "eval_width": 128,
          "factor": 2, "eval_models": 5, "eval_epochs": 300}


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  values: dict
  about: str
  hardware: str
  runtime: str = "not measured yet"
  result: str = "not measured yet"
  paper: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("mnist", {"dataset": "tfds:mnist", "ipc": 10, **_PAPER,
                     "generator": "pe:text"},
           "MNIST 28x28x1, 60000/10000; PE over the text simulator",
           "one GPU",
           paper="NDPDC 93.1, DM (non-private) 97.8 at eps 1, IPC 10 "
                 "(other work)"),
    Preset("fashion_mnist", {"dataset": "tfds:fashion_mnist", "ipc": 10,
                             **_PAPER, "generator": "merf"},
           "Fashion-MNIST 28x28x1, 60000/10000; DP-MERF (the text "
           "simulator does not draw clothes: bring a public collection "
           "with --generator pe:nearest:PATH or a user API)", "one GPU"),
    Preset("cifar10", {"dataset": "tfds:cifar10", "ipc": 50, **_PAPER,
                       "generator": "merf"},
           "CIFAR-10 32x32x3, 50000/10000; DP-MERF unless a public "
           "collection or user API is given (the paper uses PE/PrivImage "
           "over models trained on public data)", "one GPU",
           paper="DP-GenG 56.9 / 65.5, NDPDC 42.6 / 53.9 at eps 1 / 10"),
    Preset("cifar100", {"dataset": "tfds:cifar100", "ipc": 50, **_PAPER,
                        "generator": "merf"},
           "CIFAR-100 32x32x3, 50000/10000, 100 classes; generator as "
           "cifar10", "one GPU",
           paper="DP-GenG 25.9 / 32.3, NDPDC 11.5 / 19.2 at eps 1 / 10"),
    Preset("celeb_a", {"dataset": "tfds:celeb_a", "label_feature":
                       "attributes/Male", "num_classes": 2,
                       "image_size": 32, "ipc": 50, **_PAPER,
                       "generator": "merf"},
           "CelebA gender (attribute Male), 162770/19962, centre-cropped "
           "and resized to 32x32x3 (public preprocessing)", "one GPU",
           paper="DP-GenG 82.1 / 85.7, NDPDC 80.4 / 82.3 at eps 1 / 10"),
    Preset("quick", {"steps": 200, "extractor_width": 32, "eval_width": 32,
                     "eval_models": 2, "eval_epochs": 50,
                     "pool_epochs": 10, "generator_steps": 500,
                     "generated_per_class": 100, "pe_population": 50,
                     "pe_width": 32},
           "reduced protocol for CPUs and smoke tests (cost options only; "
           "the same for every method)", "2 CPU cores",
           runtime="21 s on digits (warm compilation cache, 2026-12-04)",
           result="digits, dpgeng, eps 1: 80.0 +- 2.1 % (8 draws, "
                  "2026-12-07)"),
)}

_FIELDS = {f.name for f in dataclasses.fields(Config)}
for _p in PRESETS.values():  # a preset names real options only
  assert set(_p.values) <= _FIELDS, set(_p.values) - _FIELDS


def names(spec: str) -> list[str]:
  """'cifar10,quick' -> ['cifar10', 'quick'], each checked."""
  out = [s.strip() for s in spec.split(",") if s.strip()]
  if spec.strip() and not out:  # ", ," was recorded as a preset
    raise ConfigError(f"--preset {spec!r} names no preset; choose from "
                      + ", ".join(PRESETS))
  for n in out:
    if n not in PRESETS:
      raise ConfigError(f"unknown preset {n!r}; choose from "
                        + ", ".join(PRESETS))
  return out


def values(spec: str) -> dict:
  """The option values of the presets in `spec` (left to right)."""
  merged: dict = {}
  for n in names(spec):
    merged.update(PRESETS[n].values)
  return merged


def config(preset: str = "", **given: Any) -> Config:
  """A Config: defaults, then the preset's values, then `given`."""
  unknown = set(given) - _FIELDS
  if unknown:
    raise ConfigError(f"unknown options {sorted(unknown)}")
  merged = {**values(preset), **given} if preset else dict(given)
  return Config(**merged, preset=preset)


def normalisation_name(cfg: Config) -> str | None:
  """The dataset whose published normalisation constants an npz dataset
  takes under a dataset preset (its TFDS name: `--preset mnist` with
  `--dataset npz:PATH` runs MNIST's protocol); None otherwise."""
  if not cfg.preset or not cfg.dataset.startswith("npz:"):
    return None
  preset_data = values(cfg.preset).get("dataset", "")
  return preset_data[len("tfds:"):] if preset_data.startswith(
      "tfds:") else None


def overridden(cfg: Config) -> dict:
  """The preset's values the configuration does not use (given
  explicitly): {option: {"preset": v, "used": w}}."""
  if not cfg.preset:
    return {}
  return {k: {"preset": v, "used": getattr(cfg, k)}
          for k, v in values(cfg.preset).items() if getattr(cfg, k) != v}


def record(cfg: Config) -> dict | None:
  """What config.json says about the preset."""
  if not cfg.preset:
    return None
  return {"names": names(cfg.preset), "values": values(cfg.preset),
          "overridden": overridden(cfg)}


def table() -> str:
  """The presets as a markdown table (README "Presets")."""
  rows = ["| preset | what | hardware | runtime | result | paper |",
          "|---|---|---|---|---|---|"]
  for p in PRESETS.values():
    rows.append(f"| `{p.name}` | {p.about} | {p.hardware} | {p.runtime} | "
                f"{p.result} | {p.paper or '-'} |")
  return "\n".join(rows)
