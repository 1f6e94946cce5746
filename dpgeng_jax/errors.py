"""Exception types raised for bad input.

Every problem with a user's data or configuration raises a subclass of
`DpgengError` (itself a `ValueError`) with a message that names the problem;
the command line turns it into a one-line error and exit status 2 without
writing any file.
"""


class DpgengError(ValueError):
  """Base class of all errors about user input."""


class DataError(DpgengError):
  """The dataset (spec, arrays, labels or splits) is unusable."""


class ConfigError(DpgengError):
  """A configuration value (budget, IPC, output directory, ...) is invalid."""


class StageFailed(ConfigError):
  """A stage failed (a generator's image API down, say) after private
  releases that are saved: the run is kept and `--resume` reuses them once
  the cause is fixed, instead of a new run drawing them again."""


def require_int(value, what: str, minimum: int) -> None:
  """Raises ConfigError unless `value` is an integer (not a bool) >=
  `minimum`; the message names it as `what`."""
  import numbers  # pylint: disable=import-outside-toplevel
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
      or value < minimum):
    shown = repr(value) if isinstance(value, str) else value
    raise ConfigError(f"{what} must be an integer >= {minimum}, got {shown}")


class RunCompleted(Exception):
  """--resume on a folder whose publish had been stopped with every output
  ready: opening it completed the run, and there is nothing left to do
  (the command says so with exit status 0)."""


class PrivacyAbort(RuntimeError):
  """A run aborted on a rare event whose probability is accounted in delta
  (a Poisson batch above its padded capacity, a class above its released
  upper bound). The release it occurs in is withheld; those saved before
  it are kept, and resuming (`--resume`) reuses them."""
