"""Local multi-process jobs (several CPU processes as one JAX job), shared by the benchmarks and
the tests that launch them: a free coordinator port, and waiting for every process under one
deadline so that a hang ends in a timeout, not a stuck run."""
from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> tuple[list[str], bool]:
  """Each process's output (stdout with stderr), and whether the deadline passed: then every
  process is killed and its output ends with a note saying so."""
  deadline = time.monotonic() + timeout
  outputs, timed_out = [], False
  for p in procs:
    try:
      out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out, _ = p.communicate()
      out += f"\n[killed after {timeout} s]"
      timed_out = True
    outputs.append(out)
  return outputs, timed_out
