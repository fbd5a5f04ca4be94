"""Safe file writes: a file appears whole under its final name or not at all, JSON read back with
a clear error when damaged, and a lock that lets one job at a time write a directory."""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import tempfile
import time

import numpy as np


class UnreadableFileError(ValueError):
  """A file exists but is not what it should be (invalid JSON, not UTF-8)."""


def read_json(path: str, default=None, *, missing_ok: bool = True):
  """The JSON in `path`; `default` if it does not exist (with `missing_ok`). A damaged file is an
  error naming it: it is never silently replaced by the default."""
  if missing_ok and not os.path.isfile(path):
    return default
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UnreadableFileError(f"{path}: not valid JSON ({e}); restore or delete it") from None


def atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, array)
  atomic_write_bytes(path, buf.getvalue())


class RunDirectoryBusy(ValueError):
  """Another job is writing the same directory."""


@contextlib.contextmanager
def exclusive_lock(lock_file: str, directory: str):
  """Holds an exclusive lock on `lock_file` while the block runs, so two jobs never mix their
  results in `directory`. The operating system releases it when the process ends, however it
  ends; the file only records who held it last."""
  os.makedirs(os.path.dirname(lock_file) or ".", exist_ok=True)
  fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
      raise RunDirectoryBusy(f"{directory} is in use by another job ({holder}): wait for it to "
                             f"finish or use another run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
