"""One progress line for the whole run: which stage of how many, and the
time left, from the up-front estimate (estimate.py) corrected by how the
finished stages compared with theirs. Printed above each stage's own bar
(tqdm.write, so bars are not broken); silent with --quiet."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

# pipeline.run's stages, with their key in the estimate / timings_s.
STAGES = (("calibrate", "calibration_s"), ("class_sizes", "class_sizes_s"),
          ("generate", "generation_s"), ("pool", "extractor_pool_s"),
          ("query", "queries_s"), ("expert", "expert_s"), ("init", "init_s"),
          ("distill", "distillation_s"), ("evaluate", "evaluation_s"))


class Progress:
  def __init__(self, estimate_s: dict | None, quiet: bool = False,
               write=None):
    self.estimate_s = dict(estimate_s or {})
    self.quiet = quiet
    self.write = write or tqdm.write
    self.t0 = time.time()
    self.done: list[str] = []
    self.names = [n for n, _ in STAGES]
    # Stages a resumed run loads from its store (finished before this
    # process started): they take no time, so neither their estimates nor
    # the time they take enter the time left (counted as done, they cut
    # every later estimate by the scale's floor, 5x).
    self.skip: frozenset = frozenset()

  def eta(self, name: str) -> float | None:
    """Seconds left from the start of stage `name`: the estimates of it
    and of the stages after it, times measured / estimated so far."""
    if not self.estimate_s:
      return None
    key = dict(STAGES)
    i = self.names.index(name)
    left = sum(self.estimate_s.get(key[n], 0.0) for n in self.names[i:]
               if n not in self.skip)
    spent_est = sum(self.estimate_s.get(key[n], 0.0) for n in self.done
                    if n not in self.skip)
    elapsed = time.time() - self.t0
    scale = elapsed / spent_est if spent_est > 1.0 else 1.0
    return left * min(max(scale, 0.2), 5.0)

  def line(self, name: str) -> str:
    i = self.names.index(name) + 1
    eta = self.eta(name)
    text = (f"[stage {i}/{len(self.names)}: {name}] elapsed "
            f"{time.time() - self.t0:.0f} s")
    if eta is not None:
      text += f", about {eta:.0f} s left (estimate)"
    return text

  def start(self, name: str) -> None:
    """Stage `name` starts (so every stage before it has finished)."""
    for prev in self.names[:self.names.index(name)]:
      if prev not in self.done:
        self.done.append(prev)
    if not self.quiet:
      self.write(self.line(name))
