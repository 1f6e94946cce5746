"""The run directory: one locked set of outputs, published all at once.

A run writes nothing into --out until it has finished. At the start
(before any data is read) `RunDirectory.open`:

* creates --out and the staging directory `--out/.dpgeng-staging` (so an
  unwritable --out fails at once, not after the run),
* takes `--out/.dpgeng.lock` with an exclusive `flock` and writes its pid
  into it: a second run into the same --out is refused before any work;
  the kernel releases the lock when its process dies, so the lock file of
  a killed run is recognised as stale and taken over (the file is removed
  when the run ends),
* refuses (unless --overwrite) a directory that holds a finished run, an
  unfinished one (a staging directory left by a killed run), or any file
  with one of this tool's output names that it did not write.

Files are written into the staging directory (each atomically, with the
permissions of the process's umask). `publish` then moves them into --out
and writes `manifest.json` LAST: a run directory holds a finished run if
and only if manifest.json exists, and the files it lists are that run's
whole set. With --overwrite the previous manifest is removed first (its set
is no longer marked finished) and only this tool's own output names are
replaced or removed; other files in --out are never touched, a
folder with one of the tool's names is replaced only if the tool made it
(it holds the mark `.dpgeng-output`), and an --out where an output name
is one of the run's input files is refused. The manifest is staged
before the first move: from then on every output is complete, and a
publish stopped part-way (a kill, a full disk) is finished by the next
command that opens the folder (`_complete_publish`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import stat
import tempfile
from typing import Any, Callable, Iterable

from dpgeng_jax.errors import ConfigError, RunCompleted

MANIFEST = "manifest.json"
LOCK = ".dpgeng.lock"
STAGING = ".dpgeng-staging"
# Inside every folder the tool publishes: an output folder without it (and
# not listed by a finished run's manifest) is the user's, never replaced.
FOLDER_MARK = ".dpgeng-output"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w"
                 ) -> None:
  """Writes `path` through a temporary file in its directory and one
  rename; the file gets the permissions the umask gives a new file."""
  d = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path),
                             suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    # Text as UTF-8 whatever the locale (report.html holds the dataset's
    # path and the class texts, which a C locale cannot encode).
    with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def user_cache_path(env_var: str, name: str) -> str:
  """Where this tool keeps `name` in the user's cache: $env_var if set,
  else $XDG_CACHE_HOME/dpgeng_jax/name (default ~/.cache)."""
  if os.environ.get(env_var):
    return os.environ[env_var]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dpgeng_jax", name)


def _reason(e: OSError) -> str:
  return e.strerror or str(e)


def writable_dir(path: str, what: str = "--out") -> None:
  """Checks, before a command does its work and without creating
  anything, that directory `path` can be written or created: it or its
  nearest existing ancestor is a writable directory (ConfigError
  otherwise)."""
  probe = os.path.abspath(path)
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ConfigError(f"cannot create {what} {path!r}: {probe!r} is not a "
                      "directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError(f"{what} {path!r}: {probe!r} is not writable")


def replaced_by(out: str, names: Iterable[str], path: str) -> str | None:
  """The name in `out` (an output of `names`, the manifest or the staging
  folder) that is `path` or holds it, so that publishing a run there (or
  a later --overwrite) replaces or deletes it; None if there is none.
  Links resolved."""
  path = os.path.realpath(path)
  for name in (*names, MANIFEST, STAGING):
    target = os.path.realpath(os.path.join(out, name))
    if path == target or path.startswith(target + os.sep):
      return name
  return None


def read_manifest(out: str) -> dict | None:
  """The finished run's manifest in `out`, or None when there is none.

  An unreadable file, or one that is not a JSON object with a list of
  names, counts as a finished run's that lists nothing (refused without
  --overwrite; nothing it names is trusted). A folder or a link named
  manifest.json is not this tool's: ConfigError (it is never replaced).
  """
  path = os.path.join(out, MANIFEST)
  if not os.path.lexists(path):
    return None
  if os.path.islink(path) or not os.path.isfile(path):
    raise ConfigError(f"{path} is a folder or a link, not a manifest of "
                      "this tool; move it away or choose another directory")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError, RecursionError):
    return {"files": []}
  if not isinstance(manifest, dict):
    return {"files": []}
  files = manifest.get("files")
  if not (isinstance(files, list) and all(isinstance(n, str) for n in files)):
    manifest = {**manifest, "files": []}
  return manifest


def _holds_stage_record(path: str) -> bool:
  """Whether folder `path` holds a stage record (the `stages` folder a
  run published before folders carried the tool's mark)."""
  try:
    with open(os.path.join(path, "state.json")) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and {"format", "finished"} <= set(record)


# Staged names of our folders a publish replaces (deleted with staging).
_REPLACED = ".replaced-"


class RunDirectory:
  """--out for one run: staged writes, a lock, one publish (see module
  docstring). Use as a context manager, or `open()` ... `close()`.
  `inputs`: the paths of the run's input files, never replaced."""

  def __init__(self, out: str, *, overwrite: bool, names: Iterable[str],
               what: str = "run", resume: bool = False,
               inputs: Iterable[str] = (),
               prepare: dict[str, Callable[[str], None]] | None = None):
    self.out = out
    self.inputs = tuple(inputs)
    self.overwrite = overwrite
    self.resume = resume
    self.names = tuple(names)
    self.what = what
    self.staging = os.path.join(out, STAGING)
    self._lock_fd: int | None = None
    self._created: list[str] = []
    self._written: list[str] = []
    # name -> fn(staged path): makes a staged output what is published
    # (the saved stages' record without the data's fingerprint); run just
    # before its move, by the publish or by the command that completes a
    # stopped one, so it must be idempotent.
    self._prepare = dict(prepare or {})
    # How messages name the directory: the option a run was given it by
    # (`dpgeng report DIR` takes it as an argument: amend_finished).
    self.label = f"--out {out!r}"

  # -- start -------------------------------------------------------------

  def open(self) -> "RunDirectory":
    out = self.out
    if os.path.islink(out) and not os.path.exists(out):
      raise ConfigError(f"--out {out!r} is a symbolic link to "
                        f"{os.readlink(out)!r}, which does not exist; create "
                        "its target or choose another directory")
    if os.path.exists(out) and not os.path.isdir(out):
      raise ConfigError(f"--out {out!r} exists and is not a directory")
    # The folders this run makes: --out and any missing parents, removed
    # again by close() if the run leaves them empty.
    self._created = []
    parent = os.path.abspath(out)
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
      self._created.append(parent)
      parent = os.path.dirname(parent)
    try:
      os.makedirs(out, exist_ok=True)
    except OSError as e:
      raise ConfigError(f"cannot create --out {out!r}: {_reason(e)}") from e
    self._lock()
    try:
      if os.path.islink(self.staging):
        raise ConfigError(f"--out {out!r}: {self.staging} is a symbolic "
                          "link, not this tool's staging folder; remove it")
      self._check_inputs()
      completed = self._complete_publish()
      self._check_folders()  # a resumed run publishes too
      if self.resume:
        if completed:
          raise RunCompleted(
              f"--resume {out!r}: that {self.what} had finished, but its "
              "publishing was stopped before its manifest.json was "
              "written; every output was ready, and it is complete "
              "now: there is nothing to resume")
        self._check_resumable()
      else:
        self._check_conflicts()
        if os.path.isdir(self.staging):  # ours, left by a killed run
          shutil.rmtree(self.staging)
        os.mkdir(self.staging)
      probe = os.path.join(self.staging, ".write-test")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      self.close()
      raise ConfigError(f"--out {out!r} is not writable: {_reason(e)}") from e
    except BaseException:
      self.close()
      raise
    return self

  def _lock(self) -> None:
    path = os.path.join(self.out, LOCK)
    for _ in range(10):
      try:
        # O_NOFOLLOW: a link in the lock's place is refused (ELOOP),
        # never followed to overwrite the file it points at.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                     0o666 & ~_umask())
      except OSError as e:
        if e.errno == errno.ELOOP:
          raise ConfigError(
              f"{self.label}: its lock {path} is a symbolic link; "
              "remove it (this tool only writes a regular file there)"
          ) from None
        raise ConfigError(f"{self.label} is not writable: "
                          f"{_reason(e)}") from e
      st = os.fstat(fd)
      if st.st_nlink == 0:  # removed by its holder since our open
        os.close(fd)
        continue
      if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        # A hard link (or a FIFO) in the lock's place: writing the pid
        # would replace the contents of a file elsewhere.
        os.close(fd)
        what = ("not a regular file" if not stat.S_ISREG(st.st_mode)
                else "a hard link to another file")
        raise ConfigError(f"{self.label}: its lock {path} is {what}, "
                          "not a file this tool made; remove it")
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
          raise ConfigError(
              f"{self.label} is in use by another run (pid "
              f"{holder or '?'}; lock {path}); wait for it or choose "
              "another directory") from None
        raise ConfigError(f"cannot lock {path}: {_reason(e)}") from e
      # The holder may have removed the file between our open and flock:
      # then we hold a deleted file's lock; try again on the new one.
      try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    else:
      raise ConfigError(f"cannot lock {path}: it keeps being replaced")
    # A lock file whose flock was free belonged to a finished or killed
    # process (stale): it is taken over.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._lock_fd = fd

  def _staged(self) -> list[str]:
    """What the staging folder holds, less the old folders a publish moved
    aside there (deleted with it; they are no run)."""
    if not os.path.isdir(self.staging):
      return []
    return [n for n in os.listdir(self.staging)
            if not n.startswith(_REPLACED)]

  def _check_resumable(self) -> None:
    # A staged stage record is an unfinished run (a publish moves it out
    # of staging before its manifest), also where the manifest of an
    # earlier run it was to replace (--overwrite) is still there.
    if read_manifest(self.out) is not None and not any(
        _holds_stage_record(os.path.join(self.staging, n))
        for n in self._staged()):
      raise ConfigError(f"--resume {self.out!r}: that {self.what} has "
                        "finished; there is nothing to resume")
    if not (os.path.isdir(self.staging) and os.listdir(self.staging)):
      raise ConfigError(f"--resume {self.out!r}: no unfinished {self.what} "
                        f"there (no saved stages in {self.staging})")

  def _check_inputs(self) -> None:
    """Refuses an --out where publishing would replace or delete one of
    the run's input files (the private dataset, say), with or without
    --overwrite."""
    for given in self.inputs:
      name = replaced_by(self.out, self.names, given)
      if name is not None:
        raise ConfigError(
            f"--out {self.out!r}: publishing there would replace "
            f"{os.path.join(self.out, name)}, which holds the input "
            f"{given!r}; choose another directory")

  def _foreign_folders(self) -> list[str]:
    """The folders with one of the output names that this tool did not
    make. Ours: it holds the tool's mark (written into every folder it
    publishes); or, from a version before the mark, a finished run's
    manifest lists it AND it holds a stage record (state.json with the
    record's keys). A manifest.json alone, which anyone can write, is no
    proof."""
    out = self.out
    manifest = read_manifest(out)
    listed = set(manifest["files"]) if manifest else set()
    foreign = []
    for name in self.names:
      path = os.path.join(out, name)
      if not os.path.isdir(path) or os.path.islink(path):
        continue
      if os.path.isfile(os.path.join(path, FOLDER_MARK)):
        continue
      if name in listed and _holds_stage_record(path):
        continue
      foreign.append(name)
    return foreign

  def _check_folders(self) -> None:
    folders = self._foreign_folders()
    if folders:  # refused even with --overwrite: a whole folder of files
      raise ConfigError(
          f"--out {self.out!r} holds folders with this tool's output names "
          f"that it did not write: {', '.join(folders)}; they are never "
          "replaced (move them away or choose another directory)")

  def _check_conflicts(self) -> None:
    out = self.out
    manifest = read_manifest(out)
    if self.overwrite:
      return
    if manifest is not None:
      raise ConfigError(f"--out {out!r} already holds a finished "
                        f"{self.what}; choose another directory or pass "
                        "--overwrite")
    if self._staged():
      raise ConfigError(
          f"--out {out!r} holds an unfinished {self.what} (stopped before "
          f"it was published: killed, interrupted or failed; its saved "
          f"stages are in {self.staging}); continue it with --resume "
          f"{shlex.quote(out)}, pass --overwrite to discard it (the "
          "releases it made stay spent and compose with the new run's), or "
          "choose another directory")
    foreign = [n for n in self.names if os.path.lexists(os.path.join(out, n))]
    if foreign:
      raise ConfigError(
          f"--out {out!r} holds files with this tool's output names that "
          f"no finished {self.what} of it lists: {', '.join(foreign)}; "
          "choose another directory, or pass --overwrite to replace them "
          "(only these names are ever replaced)")

  # -- writing -----------------------------------------------------------

  def write(self, name: str, write: Callable[[Any], None],
            mode: str = "w") -> str:
    """Writes one output into the staging directory; its final path."""
    if name not in self.names:
      raise ValueError(f"{name!r} is not one of the output names "
                       f"{self.names}")
    atomic_write(os.path.join(self.staging, name), write, mode)
    if name not in self._written:
      self._written.append(name)
    return os.path.join(self.out, name)

  def adopt(self, name: str) -> None:
    """Publishes `name`, a file or directory already in the staging
    directory (such as the saved stages)."""
    if name not in self.names:
      raise ValueError(f"{name!r} is not one of the output names")
    if not os.path.lexists(os.path.join(self.staging, name)):
      raise FileNotFoundError(os.path.join(self.staging, name))
    if name not in self._written:
      self._written.append(name)

  def publish(self, info: dict | None = None) -> list[str]:
    """Moves the staged files into --out and writes the manifest last.
    The staged manifest comes first: from then on every output is
    complete, and a publish stopped anywhere after it is finished by the
    next command on the folder (`_complete_publish`)."""
    out = self.out
    self._check_folders()  # again: --out may have changed during the run
    manifest = {"files": list(self._written), **(info or {})}
    atomic_write(os.path.join(self.staging, MANIFEST),
                 lambda f: json.dump(manifest, f, indent=2))
    old = os.path.join(out, MANIFEST)
    if os.path.lexists(old):
      os.remove(old)  # the old set is no longer marked finished
    self._finish(list(self._written))
    return [os.path.join(out, n) for n in self._written]

  def _finish(self, files: list[str]) -> None:
    """Moves the staged `files` not yet moved (each prepared first),
    removes our names an earlier run left that `files` lacks, then moves
    the staged manifest into --out and drops the staging folder."""
    out = self.out
    # Folders last: the saved stages stay in the staging folder (so the run
    # can be resumed) until every file has moved.
    order = sorted(files, key=lambda n: os.path.isdir(
        os.path.join(self.staging, n)))
    for name in order:
      src = os.path.join(self.staging, name)
      if not os.path.lexists(src):
        continue  # moved before the publish was stopped
      if name in self._prepare:
        self._prepare[name](src)
      if os.path.isdir(src) and not os.path.islink(src):
        atomic_write(os.path.join(src, FOLDER_MARK), lambda f: None)
      self._move(name)
    for name in self.names:  # our names a replaced run left behind
      path = os.path.join(out, name)
      if name not in files and os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
    os.replace(os.path.join(self.staging, MANIFEST),
               os.path.join(out, MANIFEST))
    shutil.rmtree(self.staging, ignore_errors=True)

  def _move(self, name: str) -> None:
    """Moves the staged `name` into --out, replacing what is there."""
    src, dst = os.path.join(self.staging, name), os.path.join(self.out, name)
    if os.path.isdir(dst) and not os.path.islink(dst):
      # Our name (refused without --overwrite), moved aside in one
      # rename and deleted with the staging folder: a folder that cannot
      # be deleted no longer stops the publish half-way through it.
      os.replace(dst, os.path.join(self.staging, _REPLACED + name))
    elif os.path.isdir(src) and os.path.lexists(dst):
      os.remove(dst)  # a file or a link (never its target) in its place
    os.replace(src, dst)

  def _complete_publish(self) -> bool:
    """Finishes a publish that was stopped after its staged manifest was
    written (every output complete, some moved): the outputs still staged
    are prepared and moved, then the manifest; returns whether it did
    that. Before, such a folder was refused by --resume (its saved
    stages' record had lost the data's fingerprint), by a new run (as
    unfinished) and by `dpgeng report`: only --overwrite, a second
    budget, got out."""
    staged = os.path.join(self.staging, MANIFEST)
    if not os.path.isfile(staged) or os.path.lexists(
        os.path.join(self.out, MANIFEST)):
      return False
    files = read_manifest(self.staging)["files"]
    if not files or not all(
        n in self.names and (os.path.lexists(os.path.join(self.staging, n))
                             or os.path.lexists(os.path.join(self.out, n)))
        for n in files):
      return False
    self._finish(files)
    return True

  # -- end ---------------------------------------------------------------

  def discard(self) -> None:
    """Drops everything staged (a run refused for bad input: nothing in it
    can be resumed under a corrected configuration)."""
    shutil.rmtree(self.staging, ignore_errors=True)

  def close(self) -> None:
    """Releases and removes the lock; an empty staging directory is
    removed (one with files is kept: an unfinished run, refused later
    without --overwrite), and so is an --out this run created and left
    empty (a run that failed before writing anything)."""
    try:
      if os.path.isdir(self.staging) and not os.listdir(self.staging):
        os.rmdir(self.staging)
    except OSError:
      pass
    if self._lock_fd is not None:
      try:
        os.remove(os.path.join(self.out, LOCK))
      except OSError:
        pass
      os.close(self._lock_fd)
      self._lock_fd = None
    for made in self._created:  # deepest first, each only if empty
      try:
        os.rmdir(made)
      except OSError:
        break
    self._created = []

  def __enter__(self) -> "RunDirectory":
    return self.open()

  def __exit__(self, *exc) -> None:
    self.close()


def check_output_file(out: str, name: str, overwrite: bool) -> None:
  """Refuses, before any work, an `out` that is not a directory and an
  out/`name` already there unless `overwrite` (a folder or a link of that
  name always): for the commands that write one file (audit, mia)."""
  if not out:
    raise ConfigError("--out is empty; give the directory to write to")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out {out!r} exists and is not a directory")
  target = os.path.join(out, name)
  if not os.path.lexists(target):
    return
  if os.path.isdir(target) or os.path.islink(target):
    raise ConfigError(f"--out {out!r} already holds {name} as a folder or "
                      "a link; choose another directory")
  if not overwrite:
    raise ConfigError(f"--out {out!r} already holds {name}; choose another "
                      "directory or pass --overwrite")


def in_use(out: str) -> bool:
  """Whether a live process holds `out`'s run lock (a run still going)."""
  try:
    fd = os.open(os.path.join(out, LOCK), os.O_RDONLY | os.O_NOFOLLOW)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError:
    return True
  finally:
    os.close(fd)  # also releases a lock taken here
  return False


def amend_finished(out: str, files: dict[str, bytes],
                   what: str = "run") -> list[str]:
  """Adds or replaces files of a FINISHED run in `out` (such as a rebuilt
  report): under the run directory's lock, each file written atomically,
  then the manifest rewritten to list them. A name that exists but the
  manifest does not list is the user's file and is refused."""
  manifest = read_manifest(out)
  if manifest is None:
    raise ConfigError(f"{out!r} holds no finished {what} (no {MANIFEST})")
  rd = RunDirectory(out, overwrite=False, names=tuple(files), what=what)
  rd.label = f"the {what} directory {out!r}"
  rd._lock()
  try:
    listed = list(manifest.get("files", []))
    foreign = [n for n in files if n not in listed
               and os.path.lexists(os.path.join(out, n))]
    if foreign:
      raise ConfigError(
          f"{out!r} holds files named {', '.join(foreign)} that its run "
          "did not write; they are left alone (move them away first)")
    folders = [n for n in files if os.path.isdir(os.path.join(out, n))
               and not os.path.islink(os.path.join(out, n))]
    if folders:  # refused before any write (not half-way through them)
      raise ConfigError(
          f"{out!r} holds folders named {', '.join(folders)} where the run "
          "wrote files; they are left alone (move them away first)")
    for name, data in files.items():
      atomic_write(os.path.join(out, name), lambda f, d=data: f.write(d),
                   mode="wb")
    manifest["files"] = list(dict.fromkeys(listed + list(files)))
    atomic_write(os.path.join(out, MANIFEST),
                 lambda f: json.dump(manifest, f, indent=2))
  finally:
    rd.close()
  return [os.path.join(out, n) for n in files]
