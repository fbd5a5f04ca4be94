"""What the command-line entry points share: bad input and a bad environment end in one clear line
on stderr and exit code 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
import errno
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# Expected failures: invalid settings or files (ValueError and its subclasses), missing files and
# unwritable, read-only or full disks (OSError).
EXPECTED = (ValueError, OSError)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def start(argv: list[str]) -> None:
  """What every entry point does first: positional arguments are refused, and
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


def define_overrides(section: str, defaults: ml_collections.ConfigDict, help_text: str) -> None:
  """The flags `--<section>.<field>=...`, overrides of a finished run's own `section` settings
  (read back with `overrides(section)`). ml_collections applies the command line's overrides
  as it defines the flags: an unknown field ends the command here, with one line."""
  try:
    config_flags.DEFINE_config_dict(section, defaults, help_text)
  except (AttributeError, KeyError) as e:
    unknown_setting(e, sys.argv)


def overrides(section: str) -> dict:
  """The `--<section>.*` fields the command line set (flat, dotted keys)."""
  return config_flags.get_override_values(flags.FLAGS[section])
