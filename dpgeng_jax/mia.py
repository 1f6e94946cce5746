"""Membership inference against a released (distilled) set.

The empirical counterpart of the privacy guarantee at the level of the whole
pipeline: how well can an attacker who sees only models trained on the
released set tell which private training examples were used?

Protocol (`run`):

* Candidates: every example of the private training split. The target's
  members are a random half of them (exactly floor(N / 2), drawn from the
  public MIA seed, `member_masks`); the rest are non-members.
* Target: the configured method runs on the members only (`pipeline.run`
  with the same `Config` as `dpgeng distill`; private methods draw their
  noise from OS entropy as always), or, for the baseline `random_real`, IPC
  real member images per class are released as they are (no distillation).
  Evaluation models are trained on the released set exactly as evaluation
  does (decoded images and labels, `evaluate.train_models` with the run's
  `EvalConfig`). For every candidate we record the loss of its true label
  and the logit-scaled confidence phi = log(p_y / (1 - p_y)), both averaged
  over the evaluation models.
* Loss attack: score = -loss (no shadows).
* LiRA (Carlini et al., "Membership Inference Attacks From First
  Principles", 2022; offline+online variant): S shadow runs, each on its
  own random half of the candidates with its own public seed, record phi of
  every candidate. Per candidate, Gaussians are fitted to its IN and OUT
  shadow phis: per-example means, and ONE GLOBAL variance per side (pooled
  within-example variance of all IN, resp. OUT, observations), the "fixed
  variance" choice Carlini et al. recommend with few shadows. The score is
  the log likelihood ratio log N(phi; mu_in, var_in) - log N(phi; mu_out,
  var_out) of the target's phi. A candidate that was never IN (never OUT)
  gets mu_in = mu_out + Delta (mu_out = mu_in - Delta), Delta the mean of
  mu_in - mu_out over the candidates seen on both sides (if none, the
  global IN and OUT means).

Metrics (pure numpy; membership labels 1 = member): rank-based ROC AUC with
ties counted one half (`roc_auc`), and TPR at a fixed FPR (`tpr_at_fpr`):
the largest TPR among the ROC points with FPR <= the level, no
interpolation between points (a conservative step function; tied scores form
one threshold, never broken at random). With M non-members the smallest
non-zero FPR is 1 / M, so for M < 1000 the TPR at 0.1 % FPR is the TPR at
FPR 0 (every non-member scored below the threshold).

Records (`MiaRecord`) go to DIR/mia.json with `dpgeng mia --out DIR`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax import data as data_lib, evaluate, outputs, pipeline, planning
from dpgeng_jax import stages
from dpgeng_jax.config import Config, METHODS
from dpgeng_jax.errors import ConfigError, require_int
from dpgeng_jax.models import ConvNet

BASELINE = "random_real"
MIA_METHODS = (*METHODS, BASELINE)
NONPRIVATE = ("dm", BASELINE)
ATTACKS = ("loss", "lira")
FPR_LEVELS = (0.01, 0.001)  # the TPR columns of a record
DEFAULT_SHADOWS = 8
MIN_SHADOWS = 2
_EVAL_STREAM = 0x4D49  # fold_in tags of a run's public key
_SELECT_STREAM = 0x5252
_CHUNK = 1000  # candidates per forward pass
_MIN_VARIANCE = 1e-8


@dataclasses.dataclass(frozen=True)
class MiaRecord:
  """One attack on one configuration.

  Attributes:
    method: one of `MIA_METHODS`.
    epsilon: the run's target epsilon; None for the non-private methods (dm
      and the random_real baseline).
    attack: one of `ATTACKS`.
    auc: ROC AUC of the attack (0.5 is chance).
    tpr_at_1pct_fpr: largest TPR at FPR <= 1 %.
    tpr_at_01pct_fpr: largest TPR at FPR <= 0.1 %.
    shadows: shadow runs the attack used (0 for the loss attack).
    members: target members (floor(candidates / 2)).
    candidates: all training examples scored.
    seconds: wall time of the runs the attack needed (target, plus the
      shadows for LiRA).
    dataset: the dataset's name.
    private: whether the target run claims differential privacy.
  """
  method: str
  epsilon: float | None
  attack: str
  auc: float
  tpr_at_1pct_fpr: float
  tpr_at_01pct_fpr: float
  shadows: int
  members: int
  candidates: int
  seconds: float
  dataset: str = ""
  private: bool = False

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Metrics (pure numpy).


def _check_scores(scores, labels):
  s = np.asarray(scores, np.float64).ravel()
  m = np.asarray(labels).ravel()
  if s.shape != m.shape:
    raise ConfigError(f"{s.size} scores but {m.size} membership labels")
  if np.any(np.isnan(s)):
    raise ConfigError("scores contain NaN")
  if not np.all((m == 0) | (m == 1)):
    raise ConfigError("membership labels must be 0/1 or boolean")
  m = m.astype(bool)
  if m.all() or not m.any():
    raise ConfigError("metrics need at least one member and one non-member")
  return s, m


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC points of "member iff score >= t" over every distinct score t.

  Args:
    scores: (n,) attack scores, higher = more likely a member.
    labels: (n,) membership, 1/True = member.

  Returns:
    (fpr, tpr, thresholds), starting at (0, 0) with threshold +inf and
    ending at (1, 1); tied scores form a single point.
  """
  s, m = _check_scores(scores, labels)
  order = np.argsort(-s, kind="stable")
  s, m = s[order], m[order]
  last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
  tp = np.cumsum(m)[last]
  fp = np.cumsum(~m)[last]
  return (np.r_[0.0, fp / (~m).sum()], np.r_[0.0, tp / m.sum()],
          np.r_[np.inf, s[last]])


def roc_auc(scores, labels) -> float:
  """Rank-based ROC AUC (Mann-Whitney U / (P N)); ties count one half.

  Equals the probability that a random member scores above a random
  non-member, plus half the probability of a tie.
  """
  s, m = _check_scores(scores, labels)
  _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
  below = np.cumsum(counts) - counts
  ranks = below[inverse] + (counts[inverse] + 1) / 2.0  # midranks
  p, n = int(m.sum()), int((~m).sum())
  return float((ranks[m].sum() - p * (p + 1) / 2.0) / (p * n))


def tpr_at_fpr(scores, labels, max_fpr: float) -> float:
  """The largest TPR among ROC points with FPR <= max_fpr (no
  interpolation; 0 when every threshold with a true positive also has too
  many false positives)."""
  if not 0 <= max_fpr <= 1:
    raise ConfigError(f"max_fpr must be in [0, 1], got {max_fpr}")
  fpr, tpr, _ = roc_curve(scores, labels)
  return float(np.max(tpr[fpr <= max_fpr * (1 + 1e-12)]))


def attack_metrics(scores, labels) -> dict:
  """{auc, tpr_at_1pct_fpr, tpr_at_01pct_fpr} of one attack."""
  return {"auc": roc_auc(scores, labels),
          "tpr_at_1pct_fpr": tpr_at_fpr(scores, labels, FPR_LEVELS[0]),
          "tpr_at_01pct_fpr": tpr_at_fpr(scores, labels, FPR_LEVELS[1])}


# ---------------------------------------------------------------------------
# Attacks (pure numpy).


def loss_scores(loss) -> np.ndarray:
  """The loss-threshold attack: lower loss = member."""
  return -np.asarray(loss, np.float64)


def _side_fit(phi, side):
  """Per-example means, counts, and the within-example sum of squares and
  degrees of freedom of the observations on one side (IN or OUT)."""
  count = side.sum(0)
  mean = np.where(count > 0, (phi * side).sum(0) / np.maximum(count, 1),
                  np.nan)
  resid = np.where(side, phi - np.where(count > 0, mean, 0.0), 0.0)
  return mean, count, float((resid**2).sum()), int(
      count.sum() - np.count_nonzero(count))


def lira_scores(target_phi, shadow_phi, shadow_in) -> np.ndarray:
  """LiRA log likelihood ratios with per-example means, global variances.

  Args:
    target_phi: (n,) phi of each candidate under the target.
    shadow_phi: (S, n) phi of each candidate under each shadow.
    shadow_in: (S, n) bool, candidate i was a member of shadow s.

  Returns:
    (n,) scores log N(phi; mu_in, var_in) - log N(phi; mu_out, var_out);
    see the module docstring for the variance and the never-IN / never-OUT
    fallbacks.
  """
  t = np.asarray(target_phi, np.float64)
  phi = np.asarray(shadow_phi, np.float64)
  side_in = np.asarray(shadow_in, bool)
  if phi.ndim != 2 or phi.shape != side_in.shape or phi.shape[1:] != t.shape:
    raise ConfigError(f"shapes do not match: target {t.shape}, shadow phi "
                      f"{phi.shape}, membership {side_in.shape}")
  if not side_in.any() or side_in.all():
    raise ConfigError("shadows need both IN and OUT observations")
  mu_in, n_in, ss_in, dof_in = _side_fit(phi, side_in)
  mu_out, n_out, ss_out, dof_out = _side_fit(phi, ~side_in)
  both = (n_in > 0) & (n_out > 0)
  shift = (np.mean(mu_in[both] - mu_out[both]) if both.any() else
           phi[side_in].mean() - phi[~side_in].mean())
  mu_in, mu_out = (np.where(n_in > 0, mu_in, mu_out + shift),
                   np.where(n_out > 0, mu_out, mu_in - shift))
  pooled = ((ss_in + ss_out) / (dof_in + dof_out) if dof_in + dof_out
            else float(np.var(phi)))
  var_in = max(ss_in / dof_in if dof_in else pooled, _MIN_VARIANCE)
  var_out = max(ss_out / dof_out if dof_out else pooled, _MIN_VARIANCE)
  return (-0.5 * (t - mu_in)**2 / var_in + 0.5 * (t - mu_out)**2 / var_out
          - 0.5 * np.log(var_in / var_out))


# ---------------------------------------------------------------------------
# Targets and shadows.


def member_masks(seed: int, num_candidates: int, count: int) -> np.ndarray:
  """(count, n) bool masks, each exactly floor(n / 2) True.

  Row i is drawn by `np.random.default_rng([seed, i])` (public
  randomness): row 0 is the target's member set, rows 1.. the shadows'.
  """
  require_int(seed, "the MIA seed", 0)
  masks = np.zeros((count, num_candidates), bool)
  for i in range(count):
    rng = np.random.default_rng([int(seed), i])
    masks[i, rng.choice(num_candidates, num_candidates // 2,
                        replace=False)] = True
  return masks


def members_dataset(ds: data_lib.Dataset, members) -> data_lib.Dataset:
  """The dataset restricted to the training examples in `members` (same
  test split, classes and public normalisation)."""
  members = np.asarray(members, bool)
  sub = data_lib.from_arrays(ds.x_train[members], ds.y_train[members],
                             ds.x_test, ds.y_test, name=ds.name,
                             num_classes=ds.num_classes, require_test=False)
  return dataclasses.replace(sub, mean=ds.mean, std=ds.std,
                             normalisation_source=ds.normalisation_source)


def _as_distill(cfg: Config) -> Config:
  # random_real releases real images, checked like dm (ipc <= smallest
  # class); the pipeline never runs it.
  return dataclasses.replace(cfg, method="dm") if cfg.method == BASELINE \
      else cfg


def eval_config(cfg: Config, image_shape) -> evaluate.EvalConfig:
  """The evaluation models' hyperparameters, as `dpgeng distill` uses."""
  depth = pipeline.resolve(_as_distill(cfg), tuple(image_shape)).depth
  return stages.eval_config(cfg, depth)


def released_set(cfg: Config, ds: data_lib.Dataset, members,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
  """What a run on the members releases: (x, y) in pixel space.

  The configured method on the members (`pipeline.run`, public seed
  `seed`, no evaluation) and its decoded images; or, for `random_real`,
  cfg.ipc member images per class chosen at random.
  """
  sub = members_dataset(ds, members)
  if cfg.method == BASELINE:
    return evaluate.random_real_subset(
        jax.random.fold_in(jax.random.key(seed), _SELECT_STREAM),
        sub.x_train, sub.y_train, cfg.ipc, ds.num_classes)
  run_cfg = dataclasses.replace(cfg, seed=seed, no_eval=True,
                                references=False)
  result = pipeline.run(run_cfg, dataset=sub, log=None)
  return result.x_decoded, result.y_decoded


@functools.lru_cache(maxsize=8)
def _statistics_fn(model: ConvNet):
  """jit(vmap over stacked models) of (loss, phi) of labelled images."""

  def one(params, x, y):
    log_p = jax.nn.log_softmax(model.apply({"params": params}, x))
    log_py = jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]
    is_y = jax.nn.one_hot(y, model.num_classes, dtype=bool)
    log_rest = jax.nn.logsumexp(jnp.where(is_y, -jnp.inf, log_p), axis=-1)
    return -log_py, log_py - log_rest  # loss, log(p_y / (1 - p_y))

  return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


def model_statistics(params: Any, model: ConvNet, x, y,
                     batch_size: int = _CHUNK):
  """(loss, phi) of each labelled example, averaged over stacked models.

  Args:
    params: parameters stacked on a leading model axis (as returned by
      `evaluate.train_models`).
    model: their ConvNet.
    x: (n, H, W, C) normalised images.
    y: (n,) labels.
    batch_size: examples per forward pass.

  Returns:
    Two float64 (n,) arrays: the cross-entropy of the true label, and
    phi = log(p_y / (1 - p_y)) computed from log-probabilities (stable for
    p_y near 1).
  """
  fn = _statistics_fn(model)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  loss, phi = [], []
  for i in range(0, len(x), batch_size):
    lb, pb = fn(params, x[i:i + batch_size], y[i:i + batch_size])
    loss.append(np.asarray(lb, np.float64).mean(0))
    phi.append(np.asarray(pb, np.float64).mean(0))
  return np.concatenate(loss), np.concatenate(phi)


def candidate_statistics(key: jax.Array, x_released, y_released,
                         x_candidates, y_candidates, *, num_classes: int,
                         cfg: evaluate.EvalConfig):
  """Trains cfg.num_models evaluation models on the released set, then
  returns (loss, phi) of every candidate (`model_statistics`). All images
  normalised."""
  params, model = evaluate.train_models(
      key, jnp.asarray(x_released, jnp.float32),
      jnp.asarray(y_released, jnp.int32), num_classes=num_classes, cfg=cfg)
  return model_statistics(params, model, x_candidates, y_candidates)


def observe(cfg: Config, ds: data_lib.Dataset, members, seed: int):
  """One run (target or shadow): release from the members with public seed
  `seed`, train the evaluation models, score every training example.

  Returns:
    (loss, phi), each (N,) over the whole training split.
  """
  x, y = released_set(cfg, ds, members, seed)
  return candidate_statistics(
      jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM),
      ds.normalize(np.asarray(x, np.float32)), y,
      ds.normalize(ds.x_train), ds.y_train, num_classes=ds.num_classes,
      cfg=eval_config(cfg, ds.image_shape))


def validate(cfg: Config, shadows: int, ds: data_lib.Dataset | None = None,
             masks: np.ndarray | None = None, seed: int = 0) -> None:
  """Raises ConfigError before any computation: the method, the number of
  shadows, the MIA seed, the configuration, and (given the data and the
  member masks) the configuration on every member set."""
  if cfg.method not in MIA_METHODS:
    raise ConfigError(f"unknown method {cfg.method!r}; expected one of "
                      f"{MIA_METHODS}")
  require_int(shadows, "shadows", MIN_SHADOWS)
  require_int(seed, "the MIA seed", 0)
  pipeline.validate_config(_as_distill(cfg))
  if ds is None or masks is None:
    return
  if ds.num_train < 4:
    raise ConfigError(f"membership inference needs >= 4 training examples, "
                      f"got {ds.num_train}")
  for mask in masks:
    counts = np.bincount(ds.y_train[mask], minlength=ds.num_classes)
    if counts.min() == 0:
      raise ConfigError(
          f"a random half of the training split misses class "
          f"{int(np.argmin(counts))}; the dataset is too small for MIA")
    # The attack's own set-up (not a release): exact member counts.
    if cfg.delta >= 1.0 / int(mask.sum()):
      raise ConfigError(f"delta must be < 1/N = {1.0 / int(mask.sum()):.3g}"
                        f" for the {int(mask.sum())} members of a run")
    if cfg.method in ("dm", "random_real") and cfg.ipc > counts.min():
      raise ConfigError(f"ipc {cfg.ipc} exceeds the smallest class of a "
                        f"member set ({int(counts.min())} examples)")


def run(cfg: Config, *, shadows: int = DEFAULT_SHADOWS, seed: int = 0,
        dataset: data_lib.Dataset | None = None,
        log: Callable[[str], Any] | None = print) -> list[MiaRecord]:
  """Membership inference against `cfg.method` (see the module docstring).

  Args:
    cfg: the run's configuration, as for `dpgeng distill`; `cfg.method` may
      also be `random_real`. `cfg.seed` is the target's public seed; shadow
      s uses cfg.seed + 1 + s. `out`, `no_eval` and `references` are
      ignored (the attack reads no test split: a train-only npz will do).
    shadows: S >= 2 shadow runs for LiRA.
    seed: public seed of the member splits (target and shadows).
    dataset: the private dataset; default `load_dataset(cfg.dataset)`.
    log: progress messages (None: silent).

  Returns:
    [loss attack record, LiRA record].

  Raises:
    ConfigError: for invalid input, before anything is computed.
  """
  log = log or (lambda s: None)
  validate(cfg, shadows, seed=seed)
  ds = dataset or pipeline.load_data(cfg, require_test=False)
  masks = member_masks(seed, ds.num_train, 1 + shadows)
  validate(cfg, shadows, ds, masks, seed)
  t0 = time.time()
  loss, phi = observe(cfg, ds, masks[0], cfg.seed)
  t_target = time.time() - t0
  log(f"target ({cfg.method}): {t_target:.1f} s")
  shadow_phi = np.zeros((shadows, ds.num_train))
  for s in range(shadows):
    t1 = time.time()
    _, shadow_phi[s] = observe(cfg, ds, masks[1 + s], cfg.seed + 1 + s)
    log(f"shadow {s + 1}/{shadows}: {time.time() - t1:.1f} s")
  t_all = time.time() - t0
  labels = masks[0]
  private = cfg.method not in NONPRIVATE and not planning.nonprivate_reasons(
      dataclasses.replace(cfg, references=False),  # ignored by the attack
      planning.resolve(cfg, tuple(ds.image_shape)))
  common = dict(method=cfg.method,
                epsilon=float(cfg.epsilon) if private else None,
                members=int(labels.sum()), candidates=int(ds.num_train),
                dataset=ds.name, private=private)
  return [
      MiaRecord(attack="loss", shadows=0, seconds=t_target,
                **attack_metrics(loss_scores(loss), labels), **common),
      MiaRecord(attack="lira", shadows=shadows, seconds=t_all,
                **attack_metrics(lira_scores(phi, shadow_phi, masks[1:]),
                                 labels), **common),
  ]


# ---------------------------------------------------------------------------
# Output.

OUTPUT_FILE = "mia.json"


def check_output_dir(out: str, overwrite: bool) -> None:
  """Refuses a non-directory `out` and, unless `overwrite`, an existing
  out/mia.json (checked before any computation)."""
  outputs.check_output_file(out, OUTPUT_FILE, overwrite)


def write_records(records: Sequence[MiaRecord], out: str) -> str:
  """Writes out/mia.json (a list of the records) atomically; its path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, OUTPUT_FILE)
  # pylint: disable-next=protected-access
  outputs.atomic_write(path, pipeline._json([r.to_dict() for r in records]))
  return path


def format_table(records: Sequence[MiaRecord]) -> str:
  """The records as a text table."""
  lines = [f"{'method':<12} {'epsilon':>8} {'attack':<6} {'AUC':>7} "
           f"{'TPR@1%FPR':>10} {'TPR@0.1%FPR':>12} {'shadows':>8} "
           f"{'members':>8} {'candidates':>10} {'seconds':>8}"]
  for r in records:
    eps = "-" if r.epsilon is None else format(r.epsilon, "g")
    lines.append(
        f"{r.method:<12} {eps:>8} {r.attack:<6} {r.auc:>7.4f} "
        f"{r.tpr_at_1pct_fpr:>10.4f} {r.tpr_at_01pct_fpr:>12.4f} "
        f"{r.shadows:>8d} {r.members:>8d} {r.candidates:>10d} "
        f"{r.seconds:>8.1f}")
  return "\n".join(lines)
