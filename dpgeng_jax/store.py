"""Saved stage results, so that a killed run resumes without spending its
budget again.

A run (pipeline.run) is a sequence of named stages, `STAGES` (stages.py).
As soon as a stage is done its result is saved in the run directory's staging area
(`--out/.dpgeng-staging/stages/`): arrays as .npz, pytrees (extractor pool,
expert parameters, the distillation state) with orbax, small records as
JSON. What is saved is a release of a private mechanism (the noisy class
counts, the generated set, the noisy query targets, the expert's DP-SGD
parameters) or post-processing of releases: safe to keep. No key is ever
saved; the secret key is drawn afresh on resume and only mechanisms whose
release is not saved use it.

`dpgeng distill --resume DIR` opens DIR's store, checks that nothing that
changes the guarantee or the releases differs (`check`: the configuration
outside `RESUME_FREE` and the dataset's fingerprint), and the run skips
every finished stage: no private mechanism whose release is saved runs
again, and the privacy report is the one planned at the start.

The fingerprint of the training data is an HMAC of its pixels and labels
under a key kept in the user's cache (`resume_key`), not in the run's
folder, and the record holds no count of the data: an unfinished run's
folder tests no candidate dataset. The published `stages/` copy of the
record drops the fingerprint too.

Each finished stage's files are recorded by their SHA-256 in the record
(`digests`), and a resume first compares them: a file changed, added or
missing since the save (a damaged disk, an edit) is refused in one line
before anything reads it.

Single-process runs only: a multi-process run does not save stages.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import shutil
import stat
import warnings
import zipfile
from typing import Any

import numpy as np

from dpgeng_jax import outputs
from dpgeng_jax.config import resume_free_fields
from dpgeng_jax.errors import ConfigError

# The suffix of a stage's second folder: a re-saved stage alternates
# between `name` and `name + _RESAVED` (StageStore.save).
_RESAVED = ".next"
# Room kept beyond a saved tree's bytes (orbax's metadata, the file
# system's blocks) by the free-space check before a save.
_SAVE_MARGIN = 1 << 20
# What orbax's errors say when the file system failed (it raises them as
# ValueError from its writer threads): reported as an OSError.
_IO_FAILURES = ("No space left", "RESOURCE_EXHAUSTED", "Read-only file",
                "Permission denied", "quota", "Input/output error")

FORMAT = 1
STATE = "state.json"
STAGES = ("calibrate", "class_sizes", "generate", "pool", "query", "expert",
          "init", "distill", "evaluate", "report")
# The stages that hold no private release: a resumed run computes a
# damaged one again (from the saved releases and the public keys) instead
# of refusing (StageStore.drop_damaged).
RECOMPUTABLE = ("pool", "init", "distill", "evaluate")
# The suffix of a stage's checkpointed releases (StageStore.save_partial).
PARTIAL = "@partial"
# The JSON type of a stage's saved info where it is not an object (or
# null): the calibration's mechanisms, the queries' capacity.
_INFO_KINDS = {"calibrate": list, "query": int}
# Options that change neither the guarantee nor any release: they may
# differ between a run and its resumption (config.py's groups).
RESUME_FREE = resume_free_fields()


def fingerprint(x_train, y_train, num_classes: int,
                normalisation=None) -> dict:
  """What identifies the private data on resume, with the normalisation
  constants (mean, std) the stages saw: the same pixels under other
  constants are other inputs to every stage. The data enter only through
  an HMAC-SHA256 of their pixels, labels and shapes under this user's
  `resume_key`: a plain hash (or N) in an unfinished run's folder would
  let whoever holds the folder test a candidate dataset, for example D
  with and without one person."""
  key = resume_key()
  h = hmac.new(key, digestmod=hashlib.sha256)
  for a in (x_train, y_train):
    a = np.ascontiguousarray(a)
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  out = {"train_hmac": h.hexdigest(),
         "image_shape": list(np.shape(x_train)[1:]),
         "num_classes": int(num_classes)}
  if key is _PROCESS_KEY.get("key"):
    out["resume_key"] = "this process only"
  if normalisation is not None:
    out["normalisation"] = [[float(v) for v in part]
                            for part in normalisation]
  return out


def resume_key_path() -> str:
  return outputs.user_cache_path("DPGENG_RESUME_KEY", "resume.key")


# The key of a process whose user cache cannot hold one (see resume_key).
_PROCESS_KEY: dict = {}


def resume_key() -> bytes:
  """This user's secret key for the data fingerprints: 32 bytes of OS
  entropy, created once (mode 0600) in the user's cache
  (`DPGENG_RESUME_KEY` names another file), never in a run's folder.
  Made only where no file exists, by linking a finished temporary file
  into place, so that processes starting together agree on one key; an
  existing file shorter than 32 bytes is refused, not replaced (it may be
  a user's file, and replacing it would race); a warning if others may
  read it. A file named by DPGENG_RESUME_KEY that can be neither read nor
  made is a ConfigError (before any private work: `pipeline.run`
  fingerprints the data first); where the default one cannot be (a
  read-only or missing home, as in many containers) the run goes on with
  a key of this process only, with a warning: its folder cannot be
  resumed, and says so (`fingerprint`, `StageStore.check`)."""
  path = os.path.abspath(resume_key_path())
  try:
    if not os.path.lexists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.{os.getpid()}.tmp"
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
      try:
        with os.fdopen(fd, "wb") as f:
          f.write(os.urandom(32))
        try:
          os.link(tmp, path)  # fails if another process made one first
        except FileExistsError:
          pass
        except OSError:       # a file system without hard links
          if not os.path.lexists(path):
            os.replace(tmp, path)
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
    with open(path, "rb") as f:
      key = f.read()
    mode = os.stat(path).st_mode
  except OSError as e:
    if os.environ.get("DPGENG_RESUME_KEY"):
      raise ConfigError(
          f"cannot read or create the resume key {path} ("
          f"{e.strerror or e}): runs fingerprint their data with it; set "
          "DPGENG_RESUME_KEY to a file path you can write") from e
    if "key" not in _PROCESS_KEY:
      warnings.warn(
          f"cannot read or create the resume key {path} ("
          f"{e.strerror or e}): an interrupted run cannot be resumed (its "
          "data's fingerprint is keyed for this process only); set "
          "DPGENG_RESUME_KEY to a file path you can write to make runs "
          "resumable", stacklevel=2)
      _PROCESS_KEY["key"] = os.urandom(32)
    return _PROCESS_KEY["key"]
  if len(key) < 32:
    raise ConfigError(
        f"the resume key {path} holds {len(key)} bytes, fewer than 32: "
        "not a key this tool made; delete it (a run fingerprinted with it "
        "cannot be resumed) or point DPGENG_RESUME_KEY elsewhere")
  if mode & 0o077:
    warnings.warn(f"the resume key {path} may be read by other users "
                  f"(mode {mode & 0o777:o}); it should be private (chmod "
                  "600)", stacklevel=2)
  return key


class StageStore:
  """The saved stages of one run, in `root` (see module docstring)."""

  def __init__(self, root: str):
    self.root = root
    self._state: dict | None = None

  @property
  def path(self) -> str:
    return os.path.join(self.root, STATE)

  def exists(self) -> bool:
    return os.path.isfile(self.path)

  # -- the record --------------------------------------------------------

  def state(self) -> dict:
    if self._state is None:
      self._check_root()
      try:
        with open(self.path) as f:
          self._state = json.load(f)
      except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"cannot read the saved stages {self.path}: "
                          f"{e}") from e
      if not isinstance(self._state, dict):
        kind = type(self._state).__name__
        self._state = None
        raise ConfigError(damaged(self.path, f"its record is a JSON {kind}"
                                   ", not an object"))
      if self._state.get("format") != FORMAT:
        got, self._state = self._state.get("format"), None
        raise ConfigError(f"{self.path} has format {got}; expected "
                          f"{FORMAT}")
      kinds = {"config": dict, "data": dict, "finished": list, "info": dict}
      bad = [k for k, kind in kinds.items()
             if not isinstance(self._state.get(k), kind)]
      if not bad:  # each stage's info of the type it is saved with
        bad = [f"info of {k}" for k, v in self._state["info"].items()
               if not (v is None or isinstance(v, _INFO_KINDS.get(k, dict))
                       and not isinstance(v, bool))]
      timings = self._state.get("timings_s", {})
      if not (isinstance(timings, dict) and all(
          isinstance(v, (int, float)) and not isinstance(v, bool)
          for v in timings.values())):
        bad.append("timings_s")
      if bad:
        self._state = None
        raise ConfigError(damaged(self.path, "its record lacks or "
                                   f"mistypes {', '.join(bad)}"))
    return self._state

  def _check_root(self) -> None:
    """The stages' folder and its record are the tool's own: a symbolic
    link in their place (the saves would write through it, outside --out)
    is refused."""
    for path in (self.root, self.path):
      if os.path.islink(path):
        raise Damaged(path, "it is a symbolic link")

  def _write_state(self) -> None:
    self._check_root()
    os.makedirs(self.root, exist_ok=True)
    outputs.atomic_write(self.path, lambda f: json.dump(
        self._state, f, indent=2, default=_plain))

  def start(self, config: dict, data: dict,
            resolved: dict | None = None) -> None:
    """A new run: records its configuration, data fingerprint and what its
    `auto` options resolved to (planning.choices)."""
    self._state = {"format": FORMAT, "config": config, "data": data,
                   "resolved": resolved, "finished": [], "info": {}}
    self._write_state()

  def check(self, config: dict, data: dict | None = None,
            resolved: dict | None = None) -> None:
    """Refuses a resumption whose configuration (outside RESUME_FREE),
    data or resolved `auto` options differ from the saved run's."""
    saved = self.state()
    diff = sorted(k for k in set(saved["config"]) | set(config)
                  if k not in RESUME_FREE
                  and saved["config"].get(k) != config.get(k))
    if diff:
      raise ConfigError(
          "--resume: these options differ from the saved run's and would "
          "change its guarantee, its releases or the results its saved "
          "stages hold: " + ", ".join(
              f"{k} (saved {saved['config'].get(k)!r}, now "
              f"{config.get(k)!r})" for k in diff))
    if data is not None and "normalisation" in saved["data"] and (
        data.get("normalisation") != saved["data"]["normalisation"]):
      raise ConfigError(
          "--resume: the data's normalisation constants differ from the "
          f"saved run's (saved mean, std {saved['data']['normalisation']}, "
          f"now {data.get('normalisation')}): its saved stages saw the "
          "images under the saved ones")
    for record, when in ((saved["data"], "was started"),
                         (data or {}, "runs now")):
      if "resume_key" in record:
        raise ConfigError(
            f"--resume: that run cannot be resumed: it {when} without a "
            f"resume key (the key file {resume_key_path()} could not be "
            "read or made), so its data cannot be recognised; set "
            "DPGENG_RESUME_KEY to a file path you can write and start "
            "afresh")
    if data is not None and "train_hmac" not in saved["data"]:
      raise ConfigError(
          "--resume: that run was saved by an older dpgeng_jax, whose "
          "record of the data is a plain hash; finish it with that "
          "version or start afresh")
    if data is not None:  # a record saved before normalisation was kept
      data = {k: v for k, v in data.items() if k in saved["data"]}
    if data is not None and data != saved["data"]:
      raise ConfigError(
          "--resume: the training data differ from the saved run's "
          f"(saved images of shape {saved['data']['image_shape']} in "
          f"{saved['data']['num_classes']} classes; now "
          f"{data['image_shape']}, {data['num_classes']}; or other "
          "examples), or the run was started by another user or machine, or "
          "the key file changed since: the data's fingerprint is keyed "
          f"with the key file {resume_key_path()} of the user who started "
          "it")
    if resolved is not None and saved.get("resolved") != resolved:
      was = saved.get("resolved")
      if was is None:
        raise ConfigError(
            "--resume: that run was saved by an older dpgeng_jax, which "
            "does not record what its `auto` options resolved to (a "
            "default may have changed since); finish it with that "
            "version or start afresh")
      raise ConfigError(
          "--resume: the saved run's `auto` options resolved differently "
          "(a default changed since it started) or its generator declares "
          "another guarantee: " + ", ".join(
              f"{k} (saved {was.get(k)!r}, now {resolved.get(k)!r})"
              for k in sorted(set(was) | set(resolved))
              if was.get(k) != resolved.get(k))
          + "; finish it with the version that started it or start "
          "afresh")

  def config(self) -> dict:
    return dict(self.state()["config"])

  # -- stages ------------------------------------------------------------

  def finished(self, name: str) -> bool:
    return self._state is not None and name in self._state["finished"]

  def folder(self, name: str) -> str:
    """The folder of a stage's files: `name`, or after a re-save (a
    distillation checkpoint) the one the record names."""
    dirs = self.state().get("folders", {})
    sub = dirs.get(name, name) if isinstance(dirs, dict) else name
    if sub not in (name, name + _RESAVED):
      raise ConfigError(damaged(self.path, f"its record names folder "
                                f"{sub!r} for {name}"))
    return os.path.join(self.root, sub)

  def save(self, name: str, arrays: dict | None = None,
           trees: dict | None = None, info: Any = None) -> None:
    """Saves one stage's result and then marks it finished (a kill in
    between leaves it unfinished: it runs again on resume). A stage saved
    before (a distillation checkpoint) is written to the other of its two
    folders and the record switched to it in one write, so a kill or a
    full disk during the save leaves the previous checkpoint readable."""
    self._save(name, arrays, trees, info)

  def save_partial(self, stage: str, arrays: dict) -> None:
    """Checkpoints the releases a stage has made so far (PE's noisy
    histograms), under `stage + PARTIAL`, as soon as each is drawn and
    before anything derived from it leaves the process: a resumed run
    reuses them (`partial`) and draws only the rest, so no release is
    drawn twice. `drop_partial` removes them once the stage is saved."""
    self._save(stage + PARTIAL, arrays, None, None)

  def partial(self, stage: str) -> dict | None:
    """The arrays `save_partial` kept for `stage` (None: none)."""
    name = stage + PARTIAL
    if not (self.exists() and name in self.state()["finished"]):
      return None
    return dict(self.load(name)[0])

  def drop_partial(self, stage: str) -> None:
    """Forgets and deletes `stage`'s checkpointed releases (the finished
    stage holds them)."""
    self.forget(stage + PARTIAL)

  def _save(self, name: str, arrays: dict | None, trees: dict | None,
            info: Any) -> None:
    assert name.removesuffix(PARTIAL) in STAGES, name
    d = os.path.join(self.root, name)
    if self.finished(name) and self.folder(name) == d:
      d += _RESAVED
    _remove(d)  # a save that did not finish (or a link: never followed)
    os.makedirs(d, exist_ok=True)
    if arrays:
      outputs.atomic_write(os.path.join(d, "arrays.npz"), lambda f: np.savez(
          f, **{k: np.asarray(v) for k, v in arrays.items()}), mode="wb")
    for key, tree in (trees or {}).items():
      _save_tree(os.path.join(d, key), tree)
    state = self.state()
    state["info"][name] = info
    state.setdefault("digests", {})[name] = {**_digests(d),
                                            INFO_DIGEST: _info_digest(info)}
    folders = state.setdefault("folders", {})
    if os.path.basename(d) == name:
      folders.pop(name, None)
    else:
      folders[name] = os.path.basename(d)
    if name not in state["finished"]:
      state["finished"].append(name)
    self._write_state()
    other = os.path.join(self.root, name) if d.endswith(_RESAVED) else (
        d + _RESAVED)
    _remove(other)  # the superseded checkpoint

  def load(self, name: str, targets: dict | None = None):
    """(arrays, trees, info) of a finished stage; `targets` gives the
    structure of trees that are not plain nested dicts."""
    d = self.folder(name)
    self._check_digests(name, d)
    arrays, trees = Saved(d), Saved(d)
    try:
      npz = os.path.join(d, "arrays.npz")
      if os.path.exists(npz):
        if not zipfile.is_zipfile(npz):
          raise ConfigError(damaged(d, "arrays.npz is not an npz (zip) "
                                     "archive"))
        with np.load(npz, allow_pickle=False) as z:
          arrays.update({k: z[k] for k in z.files})
      for key in sorted(os.listdir(d)) if os.path.isdir(d) else ():
        if os.path.isdir(os.path.join(d, key)):
          trees[key] = _restore_tree(os.path.join(d, key),
                                     (targets or {}).get(key))
    except ConfigError:
      raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError,
            EOFError, zipfile.BadZipFile) as e:  # a damaged file's errors
      # (zip, npz and orbax, whose tensorstore reads raise ValueError)
      raise ConfigError(damaged(d, f"{type(e).__name__}: {e}")) from e
    return arrays, trees, self.state()["info"].get(name)

  def _check_digests(self, name: str, d: str) -> None:
    """Refuses a stage whose files differ from the SHA-256 digests recorded
    when it was saved (a record without them, from an older version, is
    not checked)."""
    digests = self.state().get("digests", {})
    want = digests.get(name) if isinstance(digests, dict) else None
    if want is None and isinstance(digests, dict):
      return
    if not (isinstance(want, dict)
            and all(isinstance(v, str) for v in want.values())):
      raise Damaged(self.path, f"its record mistypes the digests of {name}")
    try:
      have = _digests(d)
    except OSError as e:
      raise Damaged(d, f"{type(e).__name__}: {e}") from e
    if INFO_DIGEST in want:  # (records saved before it: not checked)
      have[INFO_DIGEST] = _info_digest(self.state()["info"].get(name))
    if have == want:
      return
    parts = []
    for what, names in (
        ("changed", [k for k in want if k in have and have[k] != want[k]]),
        ("missing", [k for k in want if k not in have]),
        ("added", [k for k in have if k not in want])):
      if names:
        names = sorted(names)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        parts.append(f"{what} {', '.join(names[:3])}{more}")
    raise Damaged(d, "its files differ from those saved: "
                  + "; ".join(parts))

  def drop_damaged(self) -> list[tuple[str, str]]:
    """Forgets the finished stages of RECOMPUTABLE whose files are damaged
    (the resumed run computes them again), with the stages computed from
    them (an evaluation of a dropped distillation); returns (stage, what
    is wrong) for each. Kept, and so refused on load: a damaged stage
    holding a release, and a damaged pool once a stage that used its
    extractors is finished (the queries' saved targets were computed
    with them; retrained, on an accelerator, they need not be equal)."""
    dropped = []
    for name in RECOMPUTABLE:
      if not self.finished(name) or (name == "pool" and any(
          self.finished(n) for n in ("query", "expert", "init"))):
        continue
      try:
        self._check_digests(name, self.folder(name))
      except Damaged as e:
        dropped.append((name, e.what))
      except ConfigError as e:  # the record names another folder
        dropped.append((name, str(e)))
      else:
        continue
      self.forget(name)
      if name == "distill":
        self.forget("evaluate")
    return dropped

  def save_timings(self, timings: dict) -> None:
    """Records stage times (seconds by timing key) over the saved ones."""
    state = self.state()
    state.setdefault("timings_s", {}).update(timings)
    self._write_state()

  def saved_timings(self) -> dict:
    """The stage times recorded by `save_timings` (any process)."""
    return dict(self.state().get("timings_s", {})) if self.exists() else {}

  def forget(self, name: str) -> None:
    """Removes a saved stage: its record entries and its folders."""
    state = self.state()
    if name in state["finished"] or name in state["info"]:
      for key in ("info", "digests", "folders"):
        if isinstance(state.get(key), dict):
          state[key].pop(name, None)
      if name in state["finished"]:
        state["finished"].remove(name)
      self._write_state()
    for d in (name, name + _RESAVED):
      _remove(os.path.join(self.root, d))

  def published_state(self) -> dict:
    """The record as published with the run: without the data's
    fingerprint (the record holds no count of the data)."""
    state = json.loads(json.dumps(self.state()))
    for key in _FINGERPRINT:
      state["data"].pop(key, None)
    return state


# What the published record leaves out (StageStore.published_state).
_FINGERPRINT = ("train_hmac", "train_sha256", "num_train")


def prepare_published(root: str) -> None:
  """Makes the saved stages in `root` what a run publishes: the record
  without the data's fingerprint, and no temporary file a killed write
  left (one of the record's holds the fingerprint). Idempotent: the
  publish runs it just before the stages move, and so does the command
  that completes a publish stopped before that (outputs.RunDirectory)."""
  for folder, _, files in os.walk(root):
    for name in files:
      if name.startswith(".") and name.endswith(".tmp"):
        os.remove(os.path.join(folder, name))  # atomic_write's leftovers
  store = StageStore(root)
  if not store.exists():
    return
  state = store.state()
  if isinstance(state.get("data"), dict) and any(
      k in state["data"] for k in _FINGERPRINT):
    outputs.atomic_write(store.path, lambda f: json.dump(
        store.published_state(), f, indent=2))


def damaged(path: str, what: str) -> str:
  """The message refusing a resume from a damaged or edited stage."""
  return (f"--resume: the saved stages cannot be read, {path} is damaged "
          f"({what}). A new run (without --resume) draws every release "
          "again: a new budget, which composes with the releases this run "
          "already made")


class Damaged(ConfigError):
  """A saved stage's files or digests are damaged: `damaged`'s refusal,
  with the stage folder and what is wrong as attributes."""

  def __init__(self, path: str, what: str):
    super().__init__(damaged(path, what))
    self.path, self.what = path, what


class Saved(dict):
  """A saved stage's arrays or trees: a missing one (a damaged or edited
  stage folder) is a ConfigError naming the folder, not a KeyError."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def __missing__(self, key):
    raise ConfigError(damaged(self.path, f"{key!r} is missing"))

  def pop(self, key, *default):
    if key not in self and not default:
      return self.__missing__(key)
    return super().pop(key, *default)


def _plain(obj):
  """JSON for numpy and JAX scalars and arrays."""
  if hasattr(obj, "tolist"):
    return np.asarray(obj).tolist()
  return str(obj)


def _remove(path: str) -> None:
  """Removes a stage folder left by an earlier attempt: a symbolic link or
  a file in its place is removed itself (rmtree would fail on a link, and
  the save then wrote through it, outside --out)."""
  if os.path.islink(path) or (os.path.lexists(path)
                              and not os.path.isdir(path)):
    os.remove(path)
  else:
    shutil.rmtree(path, ignore_errors=True)


# The digests' entry for a stage's info in the record (a name no saved
# file has): an edited figure there (the evaluation's metrics, the
# queries' capacity) is damage like an edited file.
INFO_DIGEST = "<info in state.json>"


def _info_digest(info: Any) -> str:
  """SHA-256 of a stage's info as the record holds it (JSON, keys sorted)."""
  text = json.dumps(json.loads(json.dumps(info, default=_plain)),
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _digests(d: str) -> dict[str, str]:
  """SHA-256 of every file under d, by its path relative to d ('/'
  separators). A symbolic link (the folder itself or anything in it) or a
  file that is not a regular one (a FIFO would block the read) is refused
  as damage: the tool saves neither."""
  if os.path.islink(d):
    raise Damaged(d, "it is a symbolic link")
  out = {}
  for root, dirs, files in os.walk(d):
    dirs.sort()
    for name in sorted(files) + [n for n in dirs
                                 if os.path.islink(os.path.join(root, n))]:
      path = os.path.join(root, name)
      if not stat.S_ISREG(os.lstat(path).st_mode):
        raise Damaged(d, f"{os.path.relpath(path, d)} is not a regular "
                      "file")
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda f=f: f.read(1 << 20), b""):
          h.update(block)
      out[os.path.relpath(path, d).replace(os.sep, "/")] = h.hexdigest()
  return out


def _save_tree(path: str, tree: Any) -> None:
  """Saves a pytree with orbax. A full disk is an OSError (ENOSPC): checked
  before the save (orbax reports it from its writer threads as a
  ValueError, with a traceback per thread), and an orbax error that says
  the file system failed is an OSError naming the path, which the
  command reports in one line with the --resume command."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree = jax.tree.map(np.asarray, tree)
  need = sum(a.nbytes for a in jax.tree.leaves(tree)) + _SAVE_MARGIN
  parent = os.path.dirname(os.path.abspath(path))
  if shutil.disk_usage(parent).free < need:
    raise OSError(errno.ENOSPC, f"no space left on the device to save a "
                  f"stage ({need} bytes needed)", parent)
  ckpt = ocp.StandardCheckpointer()
  try:
    ckpt.save(os.path.abspath(path), tree, force=True)
    ckpt.wait_until_finished()
  except Exception as e:
    try:
      ckpt.close()
    except Exception:  # pylint: disable=broad-except
      pass  # the save's own error is the one to report
    if not isinstance(e, OSError) and any(
        m in str(e) for m in _IO_FAILURES):  # orbax wraps I/O errors
      raise OSError(errno.EIO, f"saving a stage failed: {e}", path) from e
    raise
  ckpt.close()


def _restore_tree(path: str, target: Any = None) -> Any:
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckpt = ocp.StandardCheckpointer()
  try:
    if target is not None:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    tree = ckpt.restore(os.path.abspath(path), target)
  finally:  # its threads outlive a failed restore otherwise
    ckpt.close()
  return jax.tree.map(jax.numpy.asarray, tree)  # device arrays, as saved
