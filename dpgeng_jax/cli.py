"""The `dpgeng` command (also `python -m dpgeng_jax`).

    dpgeng distill --dataset digits --epsilon 10 --ipc 10 --out runs/d10
    dpgeng plan --method dpgeng --epsilon 1     # allocation; reads no data
    dpgeng audit --noise-multipliers 1 2 --out runs/audit  # privacy audit
    dpgeng mia --method dm --shadows 8 --out runs/mia  # membership inference
    dpgeng report runs/d10    # rebuild report.html and the figures

Every option of `Config` is a flag with its default shown by --help. Bad
input is reported as one line `dpgeng: error: ...` with exit status 2, and
no file is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import warnings

from dpgeng_jax.config import Config
from dpgeng_jax.errors import (ConfigError, DpgengError, PrivacyAbort,
                               RunCompleted, StageFailed)


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _add_config_options(parser: argparse.ArgumentParser,
                        skip: tuple[str, ...] = (),
                        defaults: bool = True) -> None:
  groups = {}
  for f in dataclasses.fields(Config):
    if f.name in skip:
      continue
    group = f.metadata.get("group", "method")
    if group not in groups:
      groups[group] = parser.add_argument_group(f"{group} options")
    g = groups[group]
    help_text = f.metadata.get("help", "")
    default = f.default if defaults else argparse.SUPPRESS
    if f.type in ("bool", bool):
      g.add_argument(_flag(f.name), dest=f.name, action="store_true",
                     default=default, help=help_text)
      if f.name == "expert":  # the default since the expert went off
        # SUPPRESS: --expert's default stands (and the help shows none).
        g.add_argument("--no-expert", dest=f.name, action="store_false",
                       default=argparse.SUPPRESS, help="turn the DP expert "
                       "off (it is off by default; accepted for older "
                       "commands)")
      continue
    typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
    g.add_argument(_flag(f.name), dest=f.name, type=typ, default=default,
                   choices=f.metadata.get("choices"),
                   help=f"{help_text} (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="dpgeng",
      description="Differentially private dataset distillation (DP-GenG) "
      "in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  distill = sub.add_parser(
      "distill", help="distill a dataset under an (epsilon, delta) budget",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  _add_config_options(distill)
  plan = sub.add_parser(
      "plan", help="print the budget allocation of a configuration without "
      "reading any data", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  _add_config_options(plan)
  _add_audit_parser(sub)
  _add_mia_parser(sub)
  rep = sub.add_parser(
      "report", help="rebuild report.html and the figures of a finished "
      "run from its directory")
  rep.add_argument("dir", help="the run's --out directory")
  return parser


def _add_audit_parser(sub) -> None:
  audit = sub.add_parser(
      "audit", help="empirical privacy audit: canary attacks on every "
      "private mechanism give lower bounds on epsilon to set against the "
      "accounted epsilon",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  audit.add_argument("--noise-multipliers", type=float, nargs="+",
                     default=[1.0, 2.0], help="claimed noise multipliers")
  audit.add_argument("--trials", type=int, default=100_000,
                     help="releases per neighbouring dataset")
  audit.add_argument("--delta", type=float, default=1e-5,
                     help="delta of the accounted epsilon and of the bound")
  audit.add_argument("--sampling-rate", type=float, default=0.5,
                     help="Poisson rate of the feature-matching query and "
                     "the DP-SGD step (the generators and the class "
                     "counts read all data)")
  audit.add_argument("--confidence", type=float, default=0.95,
                     help="confidence of the lower bounds")
  audit.add_argument("--mechanisms", nargs="+", default=None,
                     help="mechanisms to audit, any of "
                     "feature_matching, feature_matching_sharded, dp_sgd, "
                     "generator (DP-MERF), pe_histogram (Private "
                     "Evolution), pe_soft_histogram (its soft votes), "
                     "class_counts; None: all of them")
  audit.add_argument("--seed", type=int, default=0,
                     help="seed of the audit's (public) randomness")
  audit.add_argument("--faults", action="store_true",
                     help="also audit the broken variants of each "
                     "mechanism (0.8x noise, a double-counted example, "
                     "2x sampling rate, no clipping) at the first noise "
                     "multiplier: each must FAIL")
  audit.add_argument("--out", default=None,
                     help="directory for audit.json; None: print only")
  audit.add_argument("--overwrite", action="store_true",
                     help="replace an audit.json already in --out")


def _add_mia_parser(sub) -> None:
  from dpgeng_jax import mia  # for its method names and defaults

  p = sub.add_parser(
      "mia", help="membership inference (loss attack and LiRA with shadow "
      "runs) against the set a method releases",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  # The distill options, less those the attack sets itself.
  _add_config_options(p, skip=("method", "out", "no_eval", "references",
                               "resume", "checkpoint_every"))
  g = p.add_argument_group("membership inference options")
  # Validated by mia.validate (one-line error), so no argparse choices.
  g.add_argument("--method", default="dpgeng",
                 metavar="{" + ",".join(mia.MIA_METHODS) + "}",
                 help="the attacked method; random_real releases IPC real "
                 "member images per class (a non-private baseline)")
  g.add_argument("--shadows", type=int, default=mia.DEFAULT_SHADOWS,
                 help="shadow runs of LiRA (>= 2)")
  g.add_argument("--mia-seed", type=int, default=0,
                 help="public seed of the member splits (target and "
                 "shadows)")
  g.add_argument("--out", default=None,
                 help="directory for mia.json; None: print only")


def _given_options(argv) -> dict:
  """The distill options given on the command line (not defaulted)."""
  parser = argparse.ArgumentParser(add_help=False)
  _add_config_options(parser, defaults=False)
  given, _ = parser.parse_known_args(argv)
  return vars(given)


# Options that name input files, made absolute: a run's config.json and
# its --resume then read the same files from any working directory.
_PATH_PREFIXES = {"dataset": ("npz:",), "generator": ("npz:", "pe:nearest:")}
_PATH_OPTIONS = ("data_dir", "pe_font_dir")
_OUTPUT_OPTIONS = ("out", "resume", "tensorboard")


def missing_inputs(values: dict) -> list[str]:
  """Notes for the input files and directories `values` (Config fields)
  name that do not exist (`plan` reads no data, so it says so instead of
  failing)."""
  notes = []
  for name, prefixes in _PATH_PREFIXES.items():
    v = values.get(name)
    for prefix in prefixes:
      if isinstance(v, str) and v.startswith(prefix):
        path = os.path.expanduser(v[len(prefix):])
        if not os.path.isfile(path):
          notes.append(f"--{name} {v}: no such file here")
        break
  for name in _PATH_OPTIONS:
    v = values.get(name)
    if isinstance(v, str) and v and not os.path.isdir(os.path.expanduser(v)):
      notes.append(f"--{name.replace('_', '-')} {v}: no such directory here")
  return notes


def absolute_paths(values: dict) -> dict:
  """`values` (Config fields) with relative input paths made absolute
  and a leading ~ expanded (in a spec such as npz:~/x.npz the shell does
  not expand it)."""
  out = dict(values)
  full = lambda p: os.path.abspath(os.path.expanduser(p))
  for name, prefixes in _PATH_PREFIXES.items():
    v = out.get(name)
    for prefix in prefixes:
      if isinstance(v, str) and v.startswith(prefix) and v != prefix:
        out[name] = prefix + full(v[len(prefix):])
        break
  for name in _PATH_OPTIONS:
    if isinstance(out.get(name), str) and out[name]:
      out[name] = full(out[name])
  for name in _OUTPUT_OPTIONS:  # --out=~/runs: the shell leaves the ~
    if isinstance(out.get(name), str) and out[name].startswith("~"):
      out[name] = os.path.expanduser(out[name])
  # A resumed run writes its events where the first process meant them,
  # from any working directory.
  if isinstance(out.get("tensorboard"), str) and out["tensorboard"]:
    out["tensorboard"] = os.path.abspath(out["tensorboard"])
  return out


def resume_config(cfg: Config, argv) -> Config:
  """--resume DIR: the saved run's configuration, with the options given
  now on top (those that change the guarantee or a release must equal the
  saved ones; store.StageStore.check says which differ)."""
  from dpgeng_jax import outputs, pipeline, store as store_lib

  store = store_lib.StageStore(os.path.join(cfg.resume, outputs.STAGING,
                                         pipeline.STAGES_DIR))
  if os.path.isfile(os.path.join(cfg.resume, outputs.STAGING,
                                 outputs.MANIFEST)):
    # A publish stopped part-way (its manifest staged: every output
    # complete): opening the folder completes it (errors.RunCompleted),
    # or says what else is there.
    with pipeline.output_dir(cfg.resume, False, resume=True):
      pass
  if not store.exists():
    if outputs.read_manifest(cfg.resume) is not None:
      raise ConfigError(f"--resume {cfg.resume!r}: that run has finished; "
                        "there is nothing to resume")
    raise ConfigError(f"--resume {cfg.resume!r}: no unfinished run there "
                      f"(no {store.path})")
  saved = store.config()
  given = absolute_paths(_given_options(argv))
  if "out" in given and os.path.realpath(given["out"]) != os.path.realpath(
      cfg.resume):
    raise ConfigError(f"--resume {cfg.resume!r} continues the run in that "
                      f"directory and publishes it there; --out "
                      f"{given['out']!r} names another one (omit --out)")
  merged = {**saved, **given, "resume": cfg.resume, "out": cfg.resume}
  names = {f.name for f in dataclasses.fields(Config)}
  new = Config(**{k: v for k, v in merged.items() if k in names})
  store.check(json.loads(json.dumps(new.to_dict())))
  return new


def config_from_args(args: argparse.Namespace, argv=None,
                     skip: frozenset = frozenset()) -> Config:
  """The Config of parsed distill/plan/mia arguments: defaults, then the
  --preset's values, then the options given explicitly in `argv` (default
  the command line); the options in `skip` keep their defaults."""
  names = {f.name for f in dataclasses.fields(Config)} - set(skip)
  values = {k: v for k, v in vars(args).items() if k in names}
  if values.get("preset"):
    from dpgeng_jax import presets
    given = _given_options(sys.argv[1:] if argv is None else argv)
    values = {**values, **presets.values(values["preset"]),
              **{k: v for k, v in given.items() if k in names}}
  return Config(**absolute_paths(values))


def _retain_host_memory(cfg: Config) -> None:
  """Keep freed host memory mapped (hostmem) unless
  --no-retain-host-memory; before any device is used, so that JAX's
  worker threads share the kept heap. Only the command does this: it
  changes the whole process."""
  from dpgeng_jax import hostmem

  if not cfg.no_retain_host_memory:
    hostmem.retain_freed_memory()


def compile_cache_dir() -> str:
  """Where the dpgeng command keeps compiled programs."""
  from dpgeng_jax import outputs
  return outputs.user_cache_path("DPGENG_CACHE_DIR", "xla")


def _use_compile_cache(cfg: Config) -> None:
  """The persistent XLA compilation cache (before anything compiles).
  Safe because no private array is a constant of a compiled program
  (tests/test_guarantee.py, tests/test_compile_cache.py): a cache entry
  holds code and public constants only."""
  if cfg.no_compile_cache:
    return
  path = compile_cache_dir()
  try:
    os.makedirs(path, exist_ok=True)
    why = None if os.access(path, os.W_OK | os.X_OK) else "not writable"
  except OSError as e:
    why = e.strerror or str(e)
  if why:  # JAX would warn at every compilation instead
    print(f"dpgeng: compiling without the compilation cache: {path} "
          f"cannot be used ({why}); set DPGENG_CACHE_DIR, or pass "
          "--no-compile-cache to silence this", file=sys.stderr)
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _distill(cfg: Config, console: bool = False) -> int:
  # Imported here so that `--help` and argument errors are instant.
  from dpgeng_jax import parallel, pipeline, store as store_lib

  # Multi-host: start JAX's distributed runtime before any device is used
  # (a no-op for a single process).
  if console:
    _retain_host_memory(cfg)
    _use_compile_cache(cfg)
  parallel.initialize(cfg.coordinator_address or None,
                      cfg.num_processes or None,
                      None if cfg.process_id < 0 else cfg.process_id)
  writer = parallel.is_writer()
  pipeline.validate_config(cfg)
  if cfg.tensorboard and writer:
    from dpgeng_jax import outputs
    outputs.writable_dir(cfg.tensorboard, "--tensorboard")
    inside = outputs.replaced_by(cfg.out, pipeline.OUTPUT_FILES,
                                 cfg.tensorboard)
    if inside is not None:  # its events deleted by the next --overwrite
      raise ConfigError(
          f"--tensorboard {cfg.tensorboard!r} is inside "
          f"{os.path.join(cfg.out, inside)}, which this tool writes and "
          "replaces; choose a folder outside it, for example "
          f"{os.path.join(cfg.out, 'tensorboard')!r}")
  if not writer:  # one set of outputs, written by process 0
    pipeline.run(cfg)
    return 0
  # --out is created, locked and checked before any data is read.
  with pipeline.output_dir(cfg.out, cfg.overwrite, resume=bool(cfg.resume),
                           inputs=pipeline.input_paths(cfg)) as run_dir:
    store = pipeline.stage_store(run_dir)
    if not cfg.quiet:
      print("resolved config:\n" + json.dumps(cfg.to_dict(), indent=2),
            flush=True)
      if cfg.resume:
        done = [n for n in store.state()["finished"]
                if store_lib.PARTIAL not in n]
        print("resuming after the stages " + ", ".join(done) if done else
              "resuming: no stage had finished", flush=True)
    try:
      result = pipeline.run(cfg, store=store)
    except BaseException as e:
      # Bad input: nothing to resume, nothing written; but a stage that
      # failed after saved releases leaves a run to resume. Anything else
      # (an interrupt, a crash) keeps the saved stages, if there are any:
      # with none, a kept staging folder made the next run there refused
      # as an unfinished run that no --resume could finish.
      if not cfg.resume and not isinstance(e, StageFailed) and (
          isinstance(e, DpgengError) or not _any_saved(store)):
        run_dir.discard()
      raise
    paths = pipeline.write_outputs(result, cfg.out, run_dir=run_dir,
                                   store=store)
  if cfg.tensorboard:
    from dpgeng_jax import metric_writer
    try:
      paths.append(metric_writer.write(cfg.tensorboard, result, cfg.out))
    except OSError as e:
      raise ConfigError(
          f"the run finished and is published in {cfg.out!r}, but "
          f"--tensorboard {cfg.tensorboard!r} could not be written: "
          f"{e.strerror or e}") from e
  pr = result.privacy

  def figure(v, missing="inf"):  # None: no finite epsilon (or no PLD)
    if v is None:
      return missing if pr["private"] else "inf"
    return _epsilon_text(v)
  print("privacy: private; " if pr["private"] else
        "privacy: NOT PRIVATE (" + "; ".join(pr["not_private_because"])
        + "); its accounted mechanisms alone: ", end="")
  print(f"epsilon ({pr.get('accountant', 'pld').upper()}) = "
        f"{figure(pr.get('epsilon'))} at delta = {pr['delta']:g}; PLD "
        f"{figure(pr['epsilon_pld'], 'not computed')}, RDP "
        f"{figure(pr['epsilon_rdp'])}, "
        f"GDP-CLT {figure(pr['epsilon_gdp_clt'])}")
  if result.metrics is not None:
    m = result.metrics
    print(f"test accuracy: {100 * m['test_accuracy_mean']:.2f} +- "
          f"{100 * m['test_accuracy_std']:.2f} % over "
          f"{m['num_eval_models']} models")
    for key in ("reference_random_real_subset",
                "reference_full_training_set"):
      if key in m:
        print(f"{key} (NOT private): {100 * m[key]['test_accuracy_mean']:.2f}"
              f" +- {100 * m[key]['test_accuracy_std']:.2f} %")
  print("wrote " + ", ".join(paths))
  return 0


def _out_of_memory(e: BaseException) -> bool:
  """Whether `e` is the host or an accelerator running out of memory."""
  import jax
  return isinstance(e, MemoryError) or (
      isinstance(e, jax.errors.JaxRuntimeError)
      and "RESOURCE_EXHAUSTED" in str(e))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


def _any_saved(store) -> bool:
  """Whether the run's stage store holds a finished stage (or a
  generator's saved releases)."""
  if store is None or not store.exists():
    return False
  try:
    return bool(store.state().get("finished"))
  except DpgengError:  # an unreadable record: keep what is there
    return True


def _resume_line(out: str, line: str) -> str:
  """`line` (how to resume) where `out` holds an unfinished run (its
  staging folder survives a run that stopped only if a stage was saved);
  else that there is nothing to resume."""
  from dpgeng_jax import outputs
  if os.path.isdir(os.path.join(out, outputs.STAGING)):
    return line
  return "no stage had finished: nothing to resume"


def _epsilon_text(v: float) -> str:
  """An epsilon to 4 decimals, or to 4 significant digits below 0.01 (a
  target of 1e-6 printed as 0.0000)."""
  return format(v, ".4f") if v == 0 or abs(v) >= 0.01 else format(v, ".4g")


def _plan(cfg: Config) -> int:
  from dpgeng_jax import pipeline

  report = pipeline.plan_budget(cfg)
  print(f"method {cfg.method}: target epsilon {cfg.epsilon:g} at delta "
        f"{cfg.delta:g} ({report['neighbouring_relation']})")
  print(f"{'mechanism':<20} {'noise mult.':>12} {'samp. rate':>11} "
        f"{'steps':>7} {'eps alone':>10}")
  for m in report["mechanisms"]:
    e = m["epsilon_alone"]
    print(f"{m['name']:<20} {m['noise_multiplier']:>12.4f} "
          f"{m['sampling_rate']:>11.4g} {m['steps']:>7d} "
          f"{'inf' if e is None else _epsilon_text(e):>10}")
  for key in ("epsilon_pld", "epsilon_rdp", "epsilon_gdp_clt"):
    v = report[key]
    text = "inf" if v is None else _epsilon_text(v)
    if v is None and key == "epsilon_pld" and report["accountant"] != "pld":
      text = "not computed at this delta (see the note)"
    print(f"composed {key[8:]:<8} {text}")
  eps = report["epsilon"]
  if not report["private"]:
    print("guarantee: NONE, the run would not be private ("
          + "; ".join(report["not_private_because"]) + "); its accounted "
          "mechanisms alone: ", end="")
  else:
    print("guarantee: ", end="")
  print(f"epsilon {'inf' if eps is None else _epsilon_text(eps)} "
        f"({report['accountant']}) at "
        f"delta {report['delta']:g} = {report['delta_mechanisms']:.6g} "
        f"(mechanisms) + {report['delta_abort_events']:.3g} (abort events)"
        + (f" + {report['delta_sampler_support']:.3g} (sampler support)"
           if report.get("delta_sampler_support") else "")
        + (f" + {report['delta_external']:.3g} (external)"
           if report["delta_external"] else ""))
  for note in report["notes"]:
    print("note:", note)
  from dpgeng_jax import planning
  for line in planning.unused_options(cfg, planning.resolve(cfg)):
    print("note:", line)
  for line in missing_inputs(dataclasses.asdict(cfg)):
    print("note:", line)
  if cfg.delta >= 1e-3:
    print(f"note: a run refuses a delta of 1/N or more (N's upper bound "
          f"from the released class counts, N plus a margin of the count "
          f"noise): delta {cfg.delta:g} suits only datasets whose bound is "
          f"below {1 / cfg.delta:.0f} examples")
  from dpgeng_jax import estimate
  known = estimate.known_shape(cfg)
  if known is None:
    print("cost estimate: printed by `dpgeng distill` once the data is "
          f"loaded (the shape and size of {cfg.dataset} are not known here)")
  else:
    n_train, n_test, shape, k = known
    if cfg.num_classes and cfg.num_classes != k:
      print(f"note: --num-classes {cfg.num_classes}, but {cfg.dataset} has "
            f"{k} classes: `dpgeng distill` refuses that (the estimate "
            f"below is for {k})")
    print(estimate.format_table(estimate.estimate(
        cfg, planning.resolve(cfg, shape), shape, n_train, n_test, k)))
  return 0


def _audit(args: argparse.Namespace) -> int:
  from dpgeng_jax import audit

  if args.out is not None:
    from dpgeng_jax import outputs
    outputs.check_output_file(args.out, "audit.json", args.overwrite)
    outputs.writable_dir(args.out)
  records = audit.audit_all(
      tuple(args.noise_multipliers), trials=args.trials, delta=args.delta,
      key=audit.seed_key(args.seed), sampling_rate=args.sampling_rate,
      confidence=args.confidence,
      names=tuple(args.mechanisms or audit.MECHANISMS))
  faults = audit.audit_faults(
      args.noise_multipliers[0], trials=args.trials, delta=args.delta,
      key=audit.seed_key(args.seed), sampling_rate=args.sampling_rate,
      confidence=args.confidence,
      names=tuple(args.mechanisms or audit.MECHANISMS)) if args.faults else []
  sampler = audit.sampler_check(key=audit.seed_key(args.seed))
  print(audit.format_table(records))
  if faults:
    print("broken variants (each must FAIL):")
    print(audit.format_table(faults))
  print(f"each lower bound holds with probability >= {args.confidence:g}; "
        "a lower bound above the accounted epsilon is a privacy bug")
  print(f"noise sampler: KS p = {sampler.ks_pvalue:.3g}; far tail "
        + ", ".join(f"|z| > {t:.2f}: KS p = {p:.3g}" for t, p in zip(
            sampler.tail_starts, sampler.tail_ks_pvalues))
        + f" ({'ok' if sampler.passed else 'FAIL'})")
  if args.out is not None:
    print("wrote " + audit.write_records(records, args.out, sampler, faults))
  failed = [r for r in records if not r.passed]
  undetected = [r for r in faults if r.passed]
  ok = sampler.passed and not failed and not undetected
  if failed:
    print(f"verdict: FAIL: {len(failed)} mechanism(s) with a lower bound "
          "above the accounted epsilon (a privacy bug)")
  if not sampler.passed:
    print("verdict: FAIL: the noise sampler's draws are not Gaussian")
  if undetected:
    print(f"verdict: {len(undetected)} broken variant(s) not caught at "
          f"{args.trials} trials: the audit lacks power there; rerun with "
          "more --trials before trusting a pass")
  if ok:
    print("verdict: ok")
  return 0 if ok else 1


def mia_config(args: argparse.Namespace, argv=None) -> Config:
  """The attacked run's Config from `dpgeng mia` arguments, resolved as
  `dpgeng distill` resolves its own (defaults, then --preset, then the
  options given in `argv`, default the command line); --out is the
  attack's directory, not the run's."""
  return config_from_args(args, argv, skip=frozenset({"out"}))


def _mia(args: argparse.Namespace, console: bool = False) -> int:
  from dpgeng_jax import mia

  cfg = mia_config(args)
  if console:
    _retain_host_memory(cfg)
  mia.validate(cfg, args.shadows, seed=args.mia_seed)
  if args.out is not None:
    mia.check_output_dir(args.out, cfg.overwrite)
    from dpgeng_jax import outputs
    outputs.writable_dir(args.out)
  records = mia.run(cfg, shadows=args.shadows, seed=args.mia_seed,
                    log=None if cfg.quiet else print)
  print(mia.format_table(records))
  non_members = records[0].candidates - records[0].members
  if non_members < 1000:
    at_zero = "0.1%" + (" and 1%" if non_members < 100 else "")
    print(f"note: {non_members} non-members: the smallest non-zero FPR is "
          f"{1 / non_members:.2g}, so TPR at {at_zero} FPR is the TPR at "
          "FPR 0")
  if args.out is not None:
    print("wrote " + mia.write_records(records, args.out))
  return 0


def as_flags(message: str) -> str:
  """A library message as the command says it: the configuration's field
  names with an underscore (pe_k, checkpoint_every) as their flags, where
  the message says something of the option (`pe_k = 50`, `checkpoint_every
  must be`, `num_queries (saved 2, ...`); a path or a value that happens
  to hold such a name (`--out clip_norm`) is left as it is."""
  import re
  names = sorted((f.name for f in dataclasses.fields(Config)
                  if "_" in f.name), key=len, reverse=True)
  said = r"(?= must\b| =|=| \(saved| >=| <=| is\b| needs?\b|:)"
  return re.sub(r"(?<![\w./'\"-])(" + "|".join(names) + r")" + said,
                lambda m: _flag(m.group(1)), message)


def _os_reason(e: OSError) -> str:
  where = " ".join(repr(f) for f in (e.filename, e.filename2) if f)
  return f"{e.strerror or e}" + (f": {where}" if where else "")


class Terminated(KeyboardInterrupt):
  """SIGTERM (a scheduler's or `timeout`'s stop) in the console command:
  handled as an interrupt (the stages finished before it are saved, the
  resume line is printed), with status 143."""


# The re-delivery of a stop signal whose exception was lost (see _on_stop).
_redeliver = None


def _on_stop(signum, frame):
  """SIGTERM's and SIGINT's handler: raises Terminated or
  KeyboardInterrupt, and sends the signal again in a second unless the
  command catches it first (`_stop_redelivery`): raised inside a callback
  whose exceptions Python ignores (XLA's garbage-collection callback), it
  was printed as 'Exception ignored' and the run went on (a Ctrl-C lost so
  is what tests/test_cli.py's signal test met twice)."""
  global _redeliver  # pylint: disable=global-statement
  del frame
  import threading
  if _redeliver is None or not _redeliver.is_alive():
    _redeliver = threading.Timer(1.0, os.kill, (os.getpid(), signum))
    _redeliver.daemon = True
    _redeliver.start()
  raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _install_stop_handlers() -> None:
  """The console command's SIGTERM and SIGINT handling (_on_stop). A
  SIGINT that the process was started ignoring (a background job of a
  script) stays ignored, as Python leaves it."""
  signal.signal(signal.SIGTERM, _on_stop)
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _on_stop)
  sys.unraisablehook = _unraisable


def _stop_redelivery() -> None:
  if _redeliver is not None:
    _redeliver.cancel()


def _unraisable(info) -> None:
  """sys.unraisablehook: a Terminated or KeyboardInterrupt lost in such a
  callback is delivered again (_on_stop), so it is not printed as a
  traceback."""
  if not isinstance(info.exc_value, KeyboardInterrupt):
    sys.__unraisablehook__(info)


def _stopped(e: KeyboardInterrupt) -> str:
  return "terminated (SIGTERM)" if isinstance(e, Terminated) else (
      "interrupted")


def _stop_status(e: KeyboardInterrupt) -> int:
  return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_default_formatwarning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None):
  if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
    return f"dpgeng: warning: {message}\n"
  return _default_formatwarning(message, category, filename, lineno, line)


def entry_point() -> int:
  """The `dpgeng` console command (and `python -m dpgeng_jax`): `main` on
  the command line, with freed host memory kept mapped (hostmem;
  `--no-retain-host-memory` turns it off) and the persistent compilation
  cache (`--no-compile-cache` turns it off).

  SIGTERM is handled as an interrupt (`Terminated`, status 143); both it
  and Ctrl-C are delivered again if their exception is lost in a callback
  (`_on_stop`). After
  an interrupt (status 130 or 143) the process ends with os._exit, once
  its output is flushed: XLA's threads may still hold work of the
  interrupted computation, and the interpreter's normal teardown then
  crashed with a segmentation fault in about half of the tries (status
  139 after the --resume hint).

  Warnings raised in this package print as one line, `dpgeng: warning:
  ...` (the default format showed a line of the package's source)."""
  _install_stop_handlers()
  warnings.formatwarning = _format_warning
  code = main(None, console=True)
  if code in (130, 143):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  return code


def main(argv=None, console: bool = False) -> int:
  """Runs one `dpgeng` command with `argv` (default: the command line).

  console: the settings of the console command, process-wide: distill
  and mia call `hostmem.retain_freed_memory`, distill turns on the
  persistent compilation cache (in-process callers such as tests do not).
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    if args.command == "distill":
      cfg = config_from_args(args, argv)
      if cfg.resume:
        try:
          cfg = resume_config(cfg, sys.argv[1:] if argv is None else argv)
        except RunCompleted as e:  # a stopped publish, completed now
          print(f"dpgeng: {e}", file=sys.stderr)
          return 0
      resume = f"dpgeng distill --resume {shlex.quote(cfg.out)}"
      try:
        return _distill(cfg, console)
      except StageFailed as e:
        print(f"dpgeng: error: {e}\nonce that is fixed, continue with: "
              f"{resume}", file=sys.stderr)
        return 2
      except PrivacyAbort as e:
        # A rare event paid for in delta: nothing of the aborted mechanism
        # was released; the releases saved before it are reused.
        print(f"dpgeng: aborted: {e}\n"
              + _resume_line(cfg.out, f"continue with: {resume}"),
              file=sys.stderr)
        return 3
      except KeyboardInterrupt as e:
        _stop_redelivery()
        print(f"\ndpgeng: {_stopped(e)}; " + _resume_line(
            cfg.out, f"the stages finished before it are saved, continue "
            f"with: {resume}"), file=sys.stderr)
        return _stop_status(e)
      except OSError as e:  # disk full, permissions, a vanished directory
        print(f"dpgeng: error: {_os_reason(e)}\n" + _resume_line(
            cfg.out, f"the stages finished before it are saved; once that "
            f"is fixed, continue with: {resume}"), file=sys.stderr)
        return 1
      except Exception as e:  # pylint: disable=broad-except
        if not _out_of_memory(e):
          raise
        print(f"dpgeng: error: out of memory ({_first_line(e)}); lower the "
              "sizes of the stage that ran out (widths, --ipc, "
              "--generated-per-class, --microbatch, --devices)\n"
              + _resume_line(cfg.out, f"the stages finished before it are "
                             f"saved; continue with: {resume} (a changed "
                             "option that alters a release is refused "
                             "there)"), file=sys.stderr)
        return 1
    if args.command == "plan":
      return _plan(config_from_args(args, argv))
    if args.command == "audit":
      return _audit(args)
    if args.command == "mia":
      return _mia(args, console)
    if args.command == "report":
      from dpgeng_jax import report
      print("wrote " + ", ".join(report.rebuild(args.dir)))
      return 0
  except DpgengError as e:
    print(f"dpgeng: error: {as_flags(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # plan, audit, mia, report: no traceback
    _stop_redelivery()
    print(f"\ndpgeng: {_stopped(e)}", file=sys.stderr)
    return _stop_status(e)
  except OSError as e:  # the other commands: after their work, say why
    print(f"dpgeng: error: {_os_reason(e)}", file=sys.stderr)
    return 2
  parser.error(f"unknown command {args.command}")
  return 2


if __name__ == "__main__":
  sys.exit(main())
