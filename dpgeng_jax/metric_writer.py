"""A run's scalars and figures for TensorBoard (`dpgeng distill
--tensorboard DIR`, or `write(DIR, result)` from Python).

Written with tensorboardX: a maintained writer of TensorBoard event files
that needs neither TensorFlow nor PyTorch (clu's metric_writers write
through tf.summary, and TensorFlow is not a dependency of this project).

What is written (all released or public values, as in report.html):
`distill/loss` per step; `eval/test_accuracy` per evaluation model (step =
model index) and `eval/test_accuracy_mean`, `eval/class_accuracy/<c>`;
`expert/*` accuracies; `privacy/epsilon_*` and each mechanism's noise
multiplier; `time/<stage>_s`; the figures of the run directory as images.
"""

from __future__ import annotations

import io
import os

import numpy as np

from dpgeng_jax import report as report_lib


def write(logdir: str, result, out: str | None = None) -> str:
  """Writes `result` (a pipeline.RunResult) to a new event file in
  `logdir` (created if needed; existing files are left alone); `out`: the
  run directory whose PNG figures are added as images. Returns the event
  file's path."""
  from PIL import Image
  from tensorboardX import SummaryWriter

  os.makedirs(logdir, exist_ok=True)
  before = set(os.listdir(logdir))
  w = SummaryWriter(logdir=logdir)
  try:
    m = result.metrics or {}
    for i, v in enumerate(m.get("distillation_losses") or []):
      w.add_scalar("distill/loss", v, i + 1)
    for i, v in enumerate(m.get("test_accuracies") or []):
      w.add_scalar("eval/test_accuracy", v, i)
    if "test_accuracy_mean" in m:
      w.add_scalar("eval/test_accuracy_mean", m["test_accuracy_mean"], 0)
      w.add_scalar("eval/test_accuracy_std", m["test_accuracy_std"], 0)
    per_class = m.get("test_accuracies_per_class")
    if per_class:
      a = report_lib.per_class_array(per_class)
      for c, v in enumerate(np.nanmean(a, 0)):
        if np.isfinite(v):
          w.add_scalar(f"eval/class_accuracy/{c}", float(v), 0)
    for name, v in (m.get("expert") or {}).items():
      if isinstance(v, float):
        w.add_scalar(f"expert/{name}", v, 0)
    p = result.privacy or {}
    for key in ("epsilon_pld", "epsilon_rdp", "epsilon_gdp_clt"):
      if isinstance(p.get(key), float):
        w.add_scalar(f"privacy/{key}", p[key], 0)
    for mech in p.get("mechanisms", []):
      w.add_scalar(f"privacy/noise_multiplier/{mech['name']}",
                   mech["noise_multiplier"], 0)
    for stage, s in (m.get("timings_s")
                     or result.config.get("timings_s") or {}).items():
      w.add_scalar(f"time/{stage}", s, 0)
    if out is not None:
      for name in report_lib.FIGURES:
        path = os.path.join(out, name)
        if os.path.exists(path):
          with open(path, "rb") as f:
            img = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
          w.add_image(f"figures/{name[:-4]}", img, 0, dataformats="HWC")
  finally:
    w.close()
  new = sorted(set(os.listdir(logdir)) - before)
  return os.path.join(logdir, new[0]) if new else logdir
