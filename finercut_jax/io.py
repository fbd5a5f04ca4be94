"""Atomic writes: a file or directory appears whole under its final name, or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

import numpy as np


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
  import io
  buf = io.BytesIO()
  np.save(buf, array)
  atomic_write_bytes(path, buf.getvalue())
