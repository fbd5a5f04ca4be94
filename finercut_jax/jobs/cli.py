"""What the command-line entry points share: bad input and a bad environment end in one clear line
on stderr and exit code 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
import errno
import sys

from absl import app, flags, logging

# Expected failures: invalid settings or files (ValueError and its subclasses), missing files and
# unwritable, read-only or full disks (OSError).
EXPECTED = (ValueError, OSError)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def start(argv: list[str]) -> None:
  """What an entry point on a finished run does first: positional arguments are refused, and
  absl's log stays at WARNING unless --verbosity is given (Orbax logs every save and restore at
  INFO)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config overrides of fields that do not exist (ml_collections
  raises AttributeError/KeyError from inside the parser) reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{' '.join(str(e).split())}; see --helpfull")
  except (AttributeError, KeyError) as e:
    unknown_setting(e, argv)
  except OSError as e:  # a config file that does not exist or cannot be read
    fail(" ".join(str(e).split()))
  return []  # unreachable


def unknown_setting(error: Exception, argv: list[str]) -> None:
  """Exits naming the override of a config field that does not exist, with ml_collections'
  suggestion (`Did you mean ...`) when it has one."""
  message = str(error.args[0] if error.args else error)
  message = message.replace("\\n", "\n").replace("\\'", "'")  # a KeyError's repr, unescaped
  key, _, rest = message.partition("\n")
  key = key.strip().strip("\"'")
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith(("--config.", "--eval."))]
  name = next((o for o in overrides if key in o.split(".")[1:]
               or o.split(".", 1)[1] in message), None)
  hint = rest.strip().strip("\"'")
  fail(f"unknown setting {name or key}{' (in the config file)' if name is None else ''}"
       f"{': ' + hint if hint else ''}; the fields and their defaults are in "
       f"finercut_jax/jobs/settings.py (evaluation: finercut_jax/evaluation/run.py)")


@contextlib.contextmanager
def expected_errors():
  """Maps the expected failures of the block to one line and exit code 2."""
  try:
    yield
  except EXPECTED as e:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      fail(f"no space left on the device ({e.filename or e}); free some and rerun: finished "
           f"steps are kept")
    fail(str(e))


def override_section(defaults, given, name: str, where: str):
  """`defaults` (a ConfigDict) overridden by the fields `given` (a partial ConfigDict or dict)
  sets; a field that `defaults` lacks is refused with a KeyError naming `name.field` and the
  file `where` its fields are defined in."""
  if given is None:
    return defaults
  values = given.to_dict() if hasattr(given, "to_dict") else dict(given)

  def merge(into, values, prefix):
    for key, value in values.items():
      if key not in into:
        raise KeyError(f"unknown setting {prefix}{key}; the fields and their defaults are in "
                       f"{where}")
      if isinstance(value, dict):
        merge(into[key], value, f"{prefix}{key}.")
      else:
        with into.ignore_type():
          into[key] = value
  merge(defaults, values, f"{name}.")
  return defaults


def run_mesh(run_dir: str):
  """The mesh a run searched on (its config's `scorer.mesh_model`), over this job's devices."""
  import os

  from finercut_jax.rundir import atomic
  from finercut_jax.parallel import sharding
  run_config = atomic.read_json(os.path.join(run_dir, "config.json"), {})
  return sharding.make_mesh(model=run_config.get("scorer", {}).get("mesh_model", 1))


@contextlib.contextmanager
def existing_run(run_dir: str):
  """For the entry points that work on a finished run: checks it exists, starts the distributed
  runtime, and holds the run directory's lock on process 0 for the block."""
  import os

  from finercut_jax.parallel import distributed
  from finercut_jax.rundir import atomic
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"{run_dir}: no such run directory")
  distributed.initialize()
  lock = contextlib.ExitStack()
  distributed.on_primary(lambda: lock.enter_context(atomic.run_lock(run_dir)) and None)
  with lock:
    yield

