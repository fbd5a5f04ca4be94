"""What the benchmarks record about the machine and the process they ran in: the CPU model, and
this process's memory fields from /proc/self/status (Linux). Standard library only, so that any
benchmark side (JAX or torch) can use it without importing the other framework."""
from __future__ import annotations

import platform


def cpu_name() -> str:
  """The CPU model ("model name" of /proc/cpuinfo), else `platform.processor()`, else
  "unknown"."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def read_status_kib(field: str) -> int | None:
  """A field of /proc/self/status in KiB (e.g. "VmHWM", "VmRSS"); None where unavailable."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None
