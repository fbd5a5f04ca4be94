"""What the command-line entry points share: bad input and a bad environment end in one clear line
on stderr and exit code 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
import errno
import sys

from absl import flags

# Expected failures: invalid settings or files (ValueError and its subclasses), missing files and
# unwritable, read-only or full disks (OSError).
EXPECTED = (ValueError, OSError)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config overrides of fields that do not exist (ml_collections
  raises AttributeError/KeyError from inside the parser) reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}; see --helpfull")
  except (AttributeError, KeyError) as e:
    unknown_setting(e, argv)
  return []  # unreachable


def unknown_setting(error: Exception, argv: list[str]) -> None:
  """Exits with the override naming a config field that does not exist."""
  key = str(error).strip("\"'")
  name = next((a.split("=")[0] for a in argv[1:] if key in a), key)
  fail(f"unknown setting {name}: the fields and their defaults are in finercut_jax/defaults.py "
       f"(evaluation: finercut_jax/evaluation/run.py)")


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
