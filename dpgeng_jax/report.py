"""The run report: figures a person can look at, and report.html.

`figures` draws the PNGs of a run (matplotlib, no pyplot state): the
distilled set as a labelled grid with spacing (and, with the
multi-formation factor f > 1, the decoded crops models train on), the
initialisation and the generated set likewise, PE's population per
iteration, the distillation loss curve and the per-class test accuracy of
the evaluation models. `html` puts them, embedded, beside the privacy table
(each mechanism's share, noise multiplier, sampling rate, steps and epsilon
alone; the composed epsilon and delta; the public-metadata policy) and the
stage timings (beside the up-front estimate when the run has one) in one
self-contained file. `rebuild(DIR)` (`dpgeng report DIR`) makes both again
from a finished run directory.

Everything here reads released or public values only (the distilled set,
privacy.json, config.json, metrics.json, the saved generated set).
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import math
import os
import shlex
import stat
import warnings
import zipfile
from typing import Any

import numpy as np

from dpgeng_jax import data as data_lib
from dpgeng_jax.errors import ConfigError, DataError, RunCompleted

REPORT = "report.html"
FIGURES = ("grid.png", "decoded_grid.png", "init_grid.png",
           "generated_grid.png", "generator_iterations.png", "loss.png",
           "class_accuracy.png")
CAPTIONS = {
    "grid.png": "The distilled set (stored images), one row per class.",
    "decoded_grid.png": "Decoded crops of the first stored images of each "
                        "class (multi-formation: each stored image holds "
                        "f x f crops, upsampled to full size for training).",
    "init_grid.png": "The initialisation of the synthetic set.",
    "generated_grid.png": "The DP-generated set (first images per class).",
    "generator_iterations.png": "Private Evolution's population before the "
                                "first vote and after every iteration, left "
                                "to right.",
    "loss.png": "Distillation loss per step.",
    "class_accuracy.png": "Test accuracy per class of the evaluation models "
                          "(mean and std over models).",
}
# privacy.json mechanism name -> the config field of its budget share.
SHARES = {"class_counts": "share_counts", "generator": "share_generator",
          "feature_matching": "share_features", "expert": "share_expert"}
MAX_PER_CLASS = 10
# Image grids show at most this many classes (CIFAR-100 whole; beyond it
# the first ones, and the title says so): 300 classes made 15000-pixel
# tall figures.
MAX_CLASSES_SHOWN = 100


# ---------------------------------------------------------------------------
# Figures.


def _figure(width_px: float, height_px: float, dpi: int = 100):
  from matplotlib.figure import Figure
  return Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def canvas(x: np.ndarray, num_classes: int, per: int, cell: int,
           gap: int, labels: np.ndarray | None = None) -> np.ndarray:
  """uint8 (rows, cols, 3) image: the first `per` images of every class
  (in [0, 1]) upscaled to `cell` pixels (nearest), one row per class,
  `gap` white pixels between and around cells. Without `labels` x is
  class-major with the same number of images per class; with them (one
  per image) the classes may have any sizes, and a class with fewer than
  `per` images (or none) leaves the rest of its row white."""
  n, h, w, c = x.shape
  x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)
  labels = _labels(n, num_classes, labels)
  rows = [x[labels == r][:per] for r in range(num_classes)]
  per = min(per, max([len(r) for r in rows], default=0))
  s = max(1, cell // max(h, w))
  ch, cw = h * s, w * s
  out = np.full((num_classes * (ch + gap) + gap, max(per, 1) * (cw + gap)
                 + gap, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    if c == 1:
      row = np.repeat(row, 3, axis=-1)
    elif c != 3:
      row = np.repeat(row.mean(-1, keepdims=True), 3, axis=-1)
    row = row.repeat(s, axis=1).repeat(s, axis=2)
    img = (np.nan_to_num(row) * 255).round().astype(np.uint8)
    for j in range(len(img)):
      y0, x0 = gap + r * (ch + gap), gap + j * (cw + gap)
      out[y0:y0 + ch, x0:x0 + cw] = img[j]
  return out


def _labels(n: int, num_classes: int, labels=None) -> np.ndarray:
  """The labels of n images: as given, or those of class-major images
  with the same number per class."""
  if labels is None:
    return np.repeat(np.arange(num_classes), n // num_classes)
  return np.asarray(labels).reshape(-1)


def _first_classes(x: np.ndarray, num_classes: int, keep: int,
                   labels: np.ndarray | None = None):
  """(x, labels) of the images of the first `keep` classes (x
  class-major, or grouped by `labels` where they are given)."""
  labels = _labels(len(x), num_classes, labels)
  return np.asarray(x)[labels < keep], labels[labels < keep]


def _text_px(text: str, size: float) -> float:
  """Width in pixels of text at font size `size` (100 dpi, the default
  font), as the Agg renderer draws it."""
  from matplotlib.backends.backend_agg import RendererAgg
  from matplotlib.font_manager import FontProperties
  width, _, _ = RendererAgg(1, 1, 100).get_text_width_height_descent(
      text, FontProperties(size=size), ismath=False)
  return width


def _wrap(text: str, size: float, width_px: float) -> list[str]:
  """text in lines of at most width_px at font size `size`, broken at
  spaces (a word wider than that stays whole, on its own line)."""
  lines: list[str] = []
  for word in text.split():
    if lines and _text_px(lines[-1] + " " + word, size) <= width_px:
      lines[-1] += " " + word
    else:
      lines.append(word)
  return lines or [""]


def _shown_classes(title: str, names: list[str], total: int) -> str:
  """title, naming the range of classes drawn when not all `total` are."""
  if len(names) >= total:
    return title
  return f"{title} (classes {names[0]}-{names[-1]} of {total})"


def _margins(names: list[str], name_size: float, least_left: int,
             title: str, image_width: int) -> tuple[int, int, list[str], int]:
  """(left margin, figure width, title lines, top margin) for an image
  `image_width` pixels wide with the class names at its left (font size
  name_size) and the title above, wrapped to the width, both measured as
  the renderer draws them."""
  left = max(least_left,
             12 + math.ceil(max(_text_px(n, name_size) for n in names)))
  width = image_width + left + 10
  lines = _wrap(title, 10, width - 16)
  return left, width, lines, 26 + 15 * len(lines)


def grid_png(x: np.ndarray, num_classes: int, title: str,
             class_names: list[str] | None = None,
             per: int = MAX_PER_CLASS,
             labels: np.ndarray | None = None) -> bytes:
  """A labelled grid: one row per class (its name at the left), the first
  `per` images of each class, white spacing, legible at 8x8 and 32x32.
  x is class-major, or grouped by `labels` where they are given."""
  return _png(grid_figure(x, num_classes, title, class_names, per, labels))


def grid_figure(x: np.ndarray, num_classes: int, title: str,
                class_names: list[str] | None = None,
                per: int = MAX_PER_CLASS,
                labels: np.ndarray | None = None):
  """The matplotlib Figure of `grid_png`: wide enough for the class names,
  the title wrapped to its width; the first MAX_CLASSES_SHOWN classes."""
  names = list(class_names or [str(c) for c in range(num_classes)])
  if num_classes > MAX_CLASSES_SHOWN:
    x, labels = _first_classes(x, num_classes, MAX_CLASSES_SHOWN, labels)
    names = names[:MAX_CLASSES_SHOWN]
    title = _shown_classes(title, names, num_classes)
    num_classes = MAX_CLASSES_SHOWN
  h, w = x.shape[1:3]
  cell = max(h, w) * max(1, math.ceil(48 / max(h, w)))
  gap = max(2, cell // 12)
  img = canvas(x, num_classes, per, cell, gap, labels)
  left, fw, lines, top = _margins(names, 9, 60, title, img.shape[1])
  bottom = 10
  fh = img.shape[0] + top + bottom
  fig = _figure(fw, fh)
  ax = fig.add_axes((left / fw, bottom / fh, img.shape[1] / fw,
                     img.shape[0] / fh))
  ax.imshow(img, interpolation="nearest")
  step = img.shape[0] / num_classes
  ax.set_yticks([gap / 2 + step * (r + 0.5) for r in range(num_classes)],
                names, fontsize=9)
  ax.set_xticks([])
  for spine in ax.spines.values():
    spine.set_visible(False)
  ax.tick_params(length=0)
  fig.suptitle("\n".join(lines), fontsize=10, y=1 - 8 / fh, va="top")
  return fig


def decoded_png(x_decoded: np.ndarray, num_classes: int, factor: int,
                class_names=None) -> bytes:
  """The decoded crops (f^2 per stored image) of the first stored images
  of every class: at most 3 stored images, 4 crops each at f = 2."""
  per_stored = factor * factor
  stored = max(1, min(3, MAX_PER_CLASS // per_stored))
  return grid_png(x_decoded, num_classes,
                  f"decoded crops (f = {factor}: {per_stored} per stored "
                  "image)", class_names, per=stored * per_stored)


def iterations_png(history: np.ndarray, class_names=None) -> bytes:
  """PE's populations side by side: (T + 1, K, m, H, W, C), the first
  MAX_CLASSES_SHOWN classes."""
  total = np.shape(history)[1]
  history = np.asarray(history)[:, :MAX_CLASSES_SHOWN]
  t, k, m = history.shape[:3]
  h, w = history.shape[3:5]
  cell = max(h, w) * max(1, math.ceil(24 / max(h, w)))
  gap = max(1, cell // 12)
  blocks = [canvas(history[i].reshape(-1, *history.shape[3:]), k, m, cell,
                   gap) for i in range(t)]
  sep = np.full((blocks[0].shape[0], 3 * gap, 3), 255, np.uint8)
  row = [blocks[0]]
  for b in blocks[1:]:
    row += [sep, b]
  img = np.concatenate(row, 1)
  names = list(class_names or [str(c) for c in range(k)])[:k]
  left, fw, lines, top = _margins(
      names, 8, 40, _shown_classes(
          "PE population per iteration (0: before the first vote)", names,
          total), img.shape[1])
  fh = img.shape[0] + top + 10
  fig = _figure(fw, fh)
  ax = fig.add_axes((left / fw, 10 / fh, img.shape[1] / fw,
                     img.shape[0] / fh))
  ax.imshow(img, interpolation="nearest")
  step = img.shape[0] / k
  ax.set_yticks([step * (r + 0.5) for r in range(k)], names, fontsize=8)
  bw = blocks[0].shape[1] + sep.shape[1]
  ax.set_xticks([bw * i + blocks[0].shape[1] / 2 for i in range(t)],
                [str(i) for i in range(t)], fontsize=8)
  ax.xaxis.tick_top()
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)
  fig.suptitle("\n".join(lines), fontsize=10, y=1 - 4 / fh, va="top")
  return _png(fig)


def loss_png(losses, period: int | None = None) -> bytes:
  """The loss per step and its running mean over `period` steps (the
  number of cached queries: the loss cycles with the query; default
  1/50 of the steps)."""
  losses = np.asarray(losses, np.float64)
  fig = _figure(640, 360)
  ax = fig.add_subplot()
  steps = np.arange(1, len(losses) + 1)
  ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
  win = max(1, min(period or len(losses) // 50, len(losses)))
  if win > 1:
    smooth = np.convolve(losses, np.ones(win) / win, mode="valid")
    ax.plot(steps[win - 1:], smooth, lw=1.5, label=f"mean of {win} steps")
  ax.set_xlabel("distillation step")
  ax.set_ylabel("loss (feature matching + expert term)")
  ax.set_title("distillation loss", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _png(fig)


def per_class_array(per_class) -> np.ndarray:
  """metrics.json's test_accuracies_per_class (None: no test example) as
  a float (models, K) array with NaN."""
  return np.asarray([[np.nan if v is None else v for v in row]
                     for row in per_class], np.float64)


def class_accuracy_png(per_class, class_names=None) -> bytes:
  """per_class: (models, K) accuracies in [0, 1] (None: no test example)."""
  a = per_class_array(per_class) * 100
  k = a.shape[1]
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a class not tested
    mean, std = np.nanmean(a, 0), np.nanstd(a, 0)
  names = class_names or [str(c) for c in range(k)]
  # 28 px per class (room for 3 characters side by side at size 8) up to
  # MAX_CLASSES_SHOWN classes; beyond, the same width, every n-th named.
  per_px = 28 * min(1.0, MAX_CLASSES_SHOWN / k)
  fig = _figure(max(480, per_px * k + 120), 360)
  ax = fig.add_subplot()
  ax.bar(np.arange(k), mean, yerr=std, capsize=2 if k <= 100 else 0,
         color="#4c72b0")
  ax.axhline(np.nanmean(a), color="k", lw=0.8, ls="--",
             label=f"mean {np.nanmean(a):.1f}")
  every = math.ceil(k / MAX_CLASSES_SHOWN)
  ax.set_xticks(np.arange(0, k, every), names[::every], fontsize=8,
                rotation=0 if max(map(len, names)) <= 3 else 90)
  ax.set_xlim(-1, k)
  ax.set_ylim(0, 100)
  ax.set_xlabel("class")
  ax.set_ylabel("test accuracy %")
  models = a.shape[0]
  ax.set_title(f"per-class test accuracy ({models} evaluation model"
               f"{'' if models == 1 else 's'})", fontsize=10)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  return _png(fig)


def figures(*, x: np.ndarray, y: np.ndarray, factor: int = 1,
            x_decoded: np.ndarray | None = None,
            x_init: np.ndarray | None = None,
            x_generated: np.ndarray | None = None,
            y_generated: np.ndarray | None = None,
            history: np.ndarray | None = None,
            metrics: dict | None = None,
            class_names: list[str] | None = None,
            loss_period: int | None = None,
            losses=None) -> dict[str, bytes]:
  """Every PNG of a run (those it has data for), by file name. Images are
  in pixel space ([0, 1]), class-major. `loss_period`: the loss curve's
  smoothing window (the number of queries). `losses`: the distillation
  loss per step, drawn even without metrics (a --no-eval run); default
  metrics' distillation_losses."""
  k = int(np.max(y)) + 1
  out = {"grid.png": grid_png(x, k, f"distilled set ({len(x) // k} stored "
                              "images per class)", class_names)}
  if factor > 1 and x_decoded is not None:
    out["decoded_grid.png"] = decoded_png(x_decoded, k, factor, class_names)
  if x_init is not None:
    out["init_grid.png"] = grid_png(x_init, k, "initialisation",
                                    class_names)
  if x_generated is not None and len(x_generated):
    # External generated data may hold any number of images per class.
    out["generated_grid.png"] = grid_png(x_generated, k, "DP-generated set",
                                         class_names, labels=y_generated)
  if history is not None:
    out["generator_iterations.png"] = iterations_png(history, class_names)
  if losses is None and metrics:
    losses = metrics.get("distillation_losses")
  if losses is not None and len(losses):
    out["loss.png"] = loss_png(losses, loss_period)
  if metrics:
    if metrics.get("test_accuracies_per_class"):
      out["class_accuracy.png"] = class_accuracy_png(
          metrics["test_accuracies_per_class"], class_names)
  return out


# ---------------------------------------------------------------------------
# report.html


def _fmt(v, digits: int = 4) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if math.isinf(v):
      return "inf"
    return f"{v:.{digits}g}"
  return html_lib.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
  head = "".join(f"<th>{html_lib.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r)
                 + "</tr>" for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def privacy_rows(privacy: dict, config: dict) -> list[list[Any]]:
  rows = []
  for m in privacy.get("mechanisms", []):
    share = config.get(SHARES.get(m["name"], ""), "declared")
    rows.append([m["name"], share, m.get("noise_multiplier"),
                 m.get("sampling_rate"), m.get("steps"),
                 m.get("l2_sensitivity"), m.get("epsilon_alone")])
  return rows


def timing_rows(metrics: dict | None, config: dict) -> list[list[Any]]:
  measured = dict((metrics or {}).get("timings_s")
                  or config.get("timings_s") or {})
  estimate = dict((config.get("estimate") or {}).get("stages_s", {}))
  if estimate and "total_s" in measured:
    estimate["total_s"] = config["estimate"].get("total_s")
  memory = (metrics or {}).get("peak_rss_mb") or config.get(
      "peak_rss_mb") or {}
  rows = []
  for name in dict.fromkeys([*measured, *estimate]):
    m, e = measured.get(name), estimate.get(name)
    ratio = m / e if (m is not None and e) else None
    rows.append([name.removesuffix("_s"), m, e, ratio,
                 memory.get(name.removesuffix("_s"))])
  return rows


def html(privacy: dict, config: dict, metrics: dict | None,
         pngs: dict[str, bytes]) -> str:
  """The self-contained report (images embedded as data URIs)."""
  resolved = config.get("resolved", {})
  private = privacy.get("private")
  reasons = privacy.get("not_private_because") or []
  summary = [
      ["dataset", config.get("dataset_name", config.get("dataset"))],
      ["method", config.get("method")],
      ["generator", resolved.get("generator") or "-"],
      ["images per class", config.get("ipc")],
      ["multi-formation factor", resolved.get("factor")],
      ["private", "yes" if private else "NO: " + "; ".join(reasons)],
  ]
  if config.get("preset"):
    summary.append(["preset", config["preset"]])
  if metrics:
    acc = (f"{100 * metrics['test_accuracy_mean']:.2f} +- "
           f"{100 * metrics['test_accuracy_std']:.2f} % over "
           f"{metrics['num_eval_models']} models")
    summary.append(["test accuracy", acc])
    exp = metrics.get("expert")
    if exp:
      summary.append(["expert (information only)",
                      f"{100 * exp['test_accuracy_pretrained_on_generated']:.1f}"
                      f" % on generated data -> "
                      f"{100 * exp['test_accuracy_after_dp_finetuning']:.1f}"
                      " % after DP fine-tuning"])
    for ref in ("reference_random_real_subset", "reference_full_training_set"):
      if ref in metrics:
        r = metrics[ref]
        summary.append([ref.removeprefix("reference_").replace("_", " ")
                        + " (NOT private)",
                        f"{100 * r['test_accuracy_mean']:.2f} +- "
                        f"{100 * r['test_accuracy_std']:.2f} %"])
  # Which figure is the guarantee: the accountant's, and none at all for
  # a run that is not private (its figures account the mechanisms only).
  head = privacy.get("accountant", "pld")
  role = {name: ("the guarantee" if name == head else "cross-check")
          if private else "its mechanisms alone, NOT a guarantee"
          for name in ("pld", "rdp")}
  composed = [
      ["target epsilon", privacy.get("target_epsilon")],
      ["delta", privacy.get("delta")],
      [f"epsilon (PLD, {role['pld']})", privacy.get("epsilon_pld")],
      [f"epsilon (RDP, {role['rdp']})", privacy.get("epsilon_rdp")],
      ["epsilon (GDP-CLT, the paper's approximation)",
       privacy.get("epsilon_gdp_clt")],
      ["neighbouring relation", privacy.get("neighbouring_relation")],
      ["delta of the mechanisms", privacy.get("delta_mechanisms")],
      ["delta of the abort events", privacy.get("delta_abort_events")],
      ["delta reserved for the noise sampler's bounded support",
       privacy.get("delta_sampler_support")],
  ]
  ext = privacy.get("external_generated_data")
  parts = [
      "<h2>Run</h2>", _table(["", ""], summary),
      "<h2>Privacy</h2>",
      _table(["mechanism", "share", "noise multiplier", "sampling rate",
              "steps", "L2 sensitivity", "epsilon alone"],
             privacy_rows(privacy, config)),
      _table(["composed", ""], composed),
  ]
  if ext:
    parts.append("<p>External generated data: "
                 + html_lib.escape(json.dumps(ext)) + "</p>")
  parts.append("<h3>Public metadata</h3><ul>" + "".join(
      f"<li>{html_lib.escape(s)}</li>"
      for s in privacy.get("public_metadata", [])) + "</ul>")
  if privacy.get("notes"):
    parts.append("<h3>Notes</h3><ul>" + "".join(
        f"<li>{html_lib.escape(s)}</li>" for s in privacy["notes"])
        + "</ul>")
  trows = timing_rows(metrics, config)
  if trows:
    parts += ["<h2>Stage timings</h2>",
              _table(["stage", "measured s", "estimate s",
                      "measured / estimate", "peak memory so far (MB)"],
                     trows)]
  parts.append("<h2>Figures</h2>")
  for name in FIGURES:
    if name in pngs:
      data = base64.b64encode(pngs[name]).decode()
      parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,"
                   f"{data}'><figcaption>{html_lib.escape(name)}: "
                   f"{html_lib.escape(CAPTIONS[name])}</figcaption>"
                   "</figure>")
  title = (f"dpgeng_jax run: {config.get('method')} on "
           f"{config.get('dataset_name', config.get('dataset'))}, epsilon "
           f"{privacy.get('target_epsilon')}")
  style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;"
           "color:#222}table{border-collapse:collapse;margin:0.5em 0 1em}"
           "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;"
           "font-size:13px}th{background:#eee}figure{margin:1em 0}"
           "img{max-width:100%;image-rendering:pixelated}"
           "figcaption{font-size:12px;color:#555}")
  return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
          f"{html_lib.escape(title)}</title><style>{style}</style></head>"
          f"<body><h1>{html_lib.escape(title)}</h1>" + "".join(parts)
          + "</body></html>")


# ---------------------------------------------------------------------------
# From a finished run directory.


# The most a file of the run is read into memory for the report (its
# JSON records and the PNGs it copies); the tool writes far smaller ones.
MAX_READ = 64 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _regular_file(path: str, limit: int | None = MAX_READ) -> None:
  """Refuses a run file that is a link, a FIFO, a device or larger than
  `limit` bytes: the tool writes regular files, and reading a planted
  link would copy someone else's file into the report, a FIFO hang it."""
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    return
  if not stat.S_ISREG(st.st_mode):
    raise ConfigError(f"{path} is not a regular file (a link, a folder or "
                      "a device); the run writes regular files there")
  if limit is not None and st.st_size > limit:
    raise ConfigError(f"{path} holds {st.st_size} bytes, more than any "
                      f"file the run writes there ({limit})")


def _read(path: str) -> bytes:
  """The bytes of a regular file of the run (`_regular_file`), opened
  without following a link placed after the check."""
  _regular_file(path)
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_NONBLOCK", 0))
  with os.fdopen(fd, "rb") as f:
    raw = f.read(MAX_READ + 1)
  if len(raw) > MAX_READ:  # it grew since the check
    raise ConfigError(f"{path} holds more than {MAX_READ} bytes, more "
                      "than any file the run writes there")
  return raw


def _load_json(path: str) -> dict | None:
  try:
    return json.loads(_read(path))
  except FileNotFoundError:
    return None
  except (ValueError, RecursionError) as e:  # not JSON (damaged, edited)
    raise ConfigError(f"{path} is not readable JSON ({type(e).__name__}: "
                      f"{e}); the report is built from the run's JSON "
                      "files") from None


def rebuild(out: str) -> list[str]:
  """Makes report.html and the PNGs again from the finished run in `out`
  (`dpgeng report DIR`); returns the paths written. Only the tool's own
  names are written, and only into a directory holding a finished run
  (outputs.amend_finished)."""
  from dpgeng_jax import outputs
  if not os.path.isdir(out):
    raise ConfigError(f"{out!r} does not exist or is not a directory")
  if outputs.read_manifest(out) is None and os.path.isfile(os.path.join(
      out, outputs.STAGING, outputs.MANIFEST)) and not outputs.in_use(out):
    # A publish stopped with every output complete: finished first.
    from dpgeng_jax import pipeline
    try:
      with pipeline.output_dir(out, False, resume=True):
        pass
    except RunCompleted:
      pass
    except ConfigError:
      pass  # not completable: refused below as an unfinished run
  manifest = outputs.read_manifest(out)
  if manifest is None or manifest.get("tool") != "dpgeng_jax":
    unfinished = os.path.isdir(os.path.join(out, outputs.STAGING))
    if unfinished and outputs.in_use(out):
      raise ConfigError(f"{out!r} holds a run that is still going (its "
                        "lock is held); build its report once it finishes")
    raise ConfigError(
        f"{out!r} holds no finished dpgeng run (no manifest.json of this "
        "tool)" + (f"; it holds an unfinished one: finish it with `dpgeng "
                   f"distill --resume {shlex.quote(out)}`"
                   if unfinished else ""))
  try:
    files = _files_from_run(out, manifest)
  except ConfigError:
    raise
  except (KeyError, IndexError, TypeError, ValueError, AttributeError,
          OSError, zipfile.BadZipFile, ArithmeticError, RecursionError,
          MemoryError) as e:
    raise ConfigError(
        f"{out!r}: cannot rebuild the report from the run's files "
        f"({type(e).__name__}: {e}); they are not as the run wrote them "
        "(edited or damaged): run the distillation again") from e
  return outputs.amend_finished(out, files)


def _npz(out: str, name: str) -> dict:
  """The arrays of the run's npz file `name`; a file that is no npz archive
  is named as such (np.load would call it pickled data), and one whose
  arrays exceed the machine's memory is refused unread (data.
  _check_npz_file)."""
  path = os.path.join(out, name)
  try:
    _regular_file(path, limit=None)
    data_lib._check_npz_file(path, "the run wrote it with np.savez")
  except DataError as e:
    raise ConfigError(f"{out!r}: {e}; edited or damaged: run the "
                      "distillation again") from None
  with np.load(path, allow_pickle=False) as d:
    return {k: d[k] for k in d.files}


def _check_arrays(out: str, x, y, what: str, class_major: bool,
                  num_classes: int | None = None) -> int:
  """Refuses images and labels that are not as the run writes them:
  images (n, H, W, C) of finite numbers, integer labels (n,) in
  [0, num_classes) (class-major with the same number per class for the
  distilled set, whose labels define the classes); returns the number of
  classes. A report draws one grid row per class: a label of 10^8 in an
  edited file would have allocated rows for all of them."""
  x, y = np.asarray(x), np.asarray(y)
  problem = None
  if x.ndim != 4 or not x.size:
    problem = f"images of shape {x.shape}, not (n, H, W, C)"
  elif not (np.issubdtype(x.dtype, np.floating)
            or np.issubdtype(x.dtype, np.integer)):
    problem = f"images of dtype {x.dtype}"
  elif not np.all(np.isfinite(x)):
    problem = "images with non-finite values"
  elif (y.ndim != 1 or len(y) != len(x)
        or not np.issubdtype(y.dtype, np.integer)):
    problem = (f"labels of shape {y.shape} and dtype {y.dtype} for "
               f"{len(x)} images")
  elif y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
    problem = (f"labels in [{y.min()}, {y.max()}], outside [0, "
               f"{num_classes})")
  elif class_major:
    k = int(y.max()) + 1
    if len(y) % k or not np.array_equal(
        y, np.repeat(np.arange(k), len(y) // k)):
      problem = ("labels that are not class-major with the same number "
                 "of images per class")
  if problem:
    raise ConfigError(f"{out!r}: {what} holds {problem}; the run wrote "
                      "otherwise (edited or damaged): run the "
                      "distillation again")
  return int(y.max()) + 1


def _check_privacy_record(out: str, privacy: dict, config: dict) -> None:
  """Refuses a privacy.json whose figures its own mechanisms do not give,
  or whose target is not config.json's: the report repeats its figures,
  and a hand-edited headline was shown as the guarantee (a review's
  finding)."""
  from dpgeng_jax import accounting
  problems = accounting.check_report(privacy)
  for key, name in (("epsilon", "target_epsilon"), ("delta", "delta")):
    if key in config and not (
        isinstance(privacy.get(name), (int, float))
        and isinstance(config[key], (int, float))
        and math.isclose(privacy[name], config[key], rel_tol=1e-12)):
      problems.append(f"{name} {privacy.get(name)} is not config.json's "
                      f"{key} {config[key]}")
  if problems:
    raise ConfigError(
        f"{out!r}: privacy.json is not as the run wrote it (edited, "
        "damaged, or written by a version that accounts otherwise): "
        + "; ".join(problems) + "; run the distillation again")


def _files_from_run(out: str, manifest: dict) -> dict[str, bytes]:
  """The PNGs and report.html drawn from the run's files in `out`."""
  records = {}
  for name in ("privacy.json", "config.json", "metrics.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
      if name != "metrics.json":  # a --no-eval run has none
        raise ConfigError(f"{out!r}: {name} is missing")
      records[name] = None
      continue
    records[name] = _load_json(path)
    if not isinstance(records[name], dict):
      kind = {list: "an array", str: "a string", bool: "a boolean",
              int: "a number", float: "a number"}.get(
                  type(records[name]), "null")
      raise ConfigError(f"{out!r}: {name} holds {kind}, not the run's "
                        "record (a JSON object)")
  privacy, config, metrics = records.values()
  _check_privacy_record(out, privacy, config)
  arrays = _npz(out, "distilled.npz")
  k = _check_arrays(out, arrays["x"], arrays["y"], "distilled.npz",
                    class_major=True)
  if "x_decoded" in arrays and "y_decoded" in arrays:
    _check_arrays(out, arrays["x_decoded"], arrays["y_decoded"],
                  "distilled.npz's decoded images", class_major=True,
                  num_classes=k)
  gen = {}
  gen_path = os.path.join("stages", "generate", "arrays.npz")
  if os.path.exists(os.path.join(out, gen_path)):
    gen = _npz(out, gen_path)
    if "x_gen" in gen and "y_gen" in gen:
      _check_arrays(out, gen["x_gen"], gen.get("y_gen"), gen_path,
                    class_major=False, num_classes=k)
  x_init = None
  init_path = os.path.join("stages", "init", "arrays.npz")
  norm = config.get("normalisation")
  if norm and os.path.exists(os.path.join(out, init_path)):
    g = _npz(out, init_path)
    x_init = (g["images"].reshape(-1, *arrays["x"].shape[1:])
              * np.asarray(norm["std"], np.float32)
              + np.asarray(norm["mean"], np.float32))
  pngs = figures(x=arrays["x"], y=arrays["y"],
                 factor=int(arrays.get("factor", 1)),
                 x_decoded=arrays.get("x_decoded"), x_init=x_init,
                 x_generated=gen.get("x_gen"), y_generated=gen.get("y_gen"),
                 history=gen.get("history"), metrics=metrics,
                 loss_period=config.get("num_queries"))
  for name in FIGURES:  # figures this run has but we cannot redraw
    path = os.path.join(out, name)
    if name not in pngs and name in manifest.get("files", []) and (
        os.path.lexists(path)):
      raw = _read(path)
      if not raw.startswith(PNG_SIGNATURE):
        raise ConfigError(f"{path} is not a PNG image; the run wrote one")
      pngs[name] = raw
  files = dict(pngs)
  files[REPORT] = html(privacy, config, metrics, pngs).encode()
  return files
