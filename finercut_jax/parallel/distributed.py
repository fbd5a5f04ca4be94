"""One program over many processes: starting JAX's distributed runtime, and the few things the job
does across processes (agreeing on inputs, writing from one process, sharing what it read).

A TPU pod slice or a GPU cluster runs the same command on every host; each process drives its own
devices and all of them see one global mesh. `initialize` must run before any JAX computation:

- explicit: `coordinator_address`, `num_processes`, `process_id` (config fields, else the
  environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`);
- detected: SLURM (`srun`, more than one task), Open MPI (`mpirun`), Cloud TPU VMs; JAX reads the
  cluster's own variables then;
- otherwise one process, exactly as without this module.

Everything else here is a no-op on one process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class DistributedError(ValueError):
  """The processes of a job disagree, or the distributed settings are incomplete."""


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @classmethod
  def from_config(cls, section) -> "Settings":
    """From a config's `distributed` section (None fields unset), the environment filling gaps."""
    get = (lambda k: section.get(k)) if section is not None else (lambda k: None)
    env = lambda k, cast: cast(os.environ[k]) if os.environ.get(k) else None
    address = get("coordinator_address") or env("JAX_COORDINATOR_ADDRESS", str)
    num = get("num_processes")
    num = num if num is not None else env("JAX_NUM_PROCESSES", int)
    pid = get("process_id")
    pid = pid if pid is not None else env("JAX_PROCESS_ID", int)
    return cls(address, num, pid)


def _cluster_processes() -> str | None:
  """Which launcher started this process as one of several, if any."""
  # A task of an `srun` job step (JAX's own detection needs these), not a shell in an allocation.
  if all(os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NODELIST")) and \
      int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  try:  # jax's own probe (TPU chips on the PCI bus); jax is pinned, so its location is known.
    from jax._src import hardware_utils  # lazy: a private module; failing to import it = no TPU
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return "Cloud TPU"
  except Exception:  # noqa: BLE001 - no probe, no TPU
    pass
  return None


_started = False


def initialize(settings: Settings | None = None) -> None:
  """Starts the distributed runtime when this job runs as several processes; idempotent."""
  global _started
  settings = settings or Settings.from_config(None)
  explicit = settings.num_processes is not None or settings.coordinator_address is not None
  if _started or (not explicit and jax.distributed.is_initialized()):
    return
  if explicit:
    missing = [k for k, v in dataclasses.asdict(settings).items() if v is None]
    if settings.num_processes == 1 and missing:
      return  # an explicit single process
    if missing:
      raise DistributedError(
          f"distributed settings incomplete: {', '.join(missing)} unset; give all three "
          f"(--config.distributed.coordinator_address=HOST:PORT "
          f"--config.distributed.num_processes=N --config.distributed.process_id=I) or none")
    if not 0 <= settings.process_id < settings.num_processes:
      raise DistributedError(f"distributed.process_id={settings.process_id} is not in "
                             f"[0, num_processes={settings.num_processes})")
    source = "explicit"
  else:
    source = _cluster_processes()
    if source is None:
      return
  # CPU processes need a collectives implementation to form one job (tests, CPU clusters); it
  # only affects the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if source == "explicit":
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                               settings.process_id)
  else:
    jax.distributed.initialize()
  _started = True
  logging.info("process %d of %d (%s): %d local devices of %d", jax.process_index(),
               jax.process_count(), source, jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
  """The process that writes files (JSON, arrays, plots, reports) and prints results."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_same(what: str, data: bytes) -> None:
  """Stops every process with a clear error unless all of them hold the same `data`."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
  if differ:
    raise DistributedError(
        f"processes {differ} hold different {what} than process 0 (sha256 "
        f"{bytes(digests[differ[0]]).hex()[:12]} vs {bytes(digests[0]).hex()[:12]}): every "
        f"process must read the same inputs; check that each host sees the same files and "
        f"versions")


def on_primary(fn):
  """`fn()` run by process 0 alone, its JSON-serialisable result returned on every process. If it
  raises, every process raises (process 0 its own exception, the others the same message), so no
  process is left waiting at the next collective for one that failed."""
  if jax.process_count() == 1:
    return fn()
  outcome, error = None, None
  if is_primary():
    try:
      outcome = {"value": fn()}
    except Exception as e:  # noqa: BLE001 - re-raised below, on every process
      error = e
      kind = "os" if isinstance(e, OSError) else "value" if isinstance(e, ValueError) else "bug"
      outcome = {"error": [kind, f"{e} (on process 0)"]}
  outcome = broadcast_json(outcome)
  if error is not None:
    raise error
  if "error" in outcome:
    kind, message = outcome["error"]
    raise {"os": OSError, "value": ValueError}.get(kind, RuntimeError)(message)
  return outcome["value"]


def broadcast_json(obj):
  """Process 0's JSON-serialisable `obj`, on every process (others may pass anything)."""
  if jax.process_count() == 1:
    return obj
  data = json.dumps(obj).encode() if is_primary() else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = np.zeros(size, np.uint8)
  if is_primary():
    buf[:] = np.frombuffer(data, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return json.loads(bytes(buf).decode())


def gather(x) -> np.ndarray:
  """A global array as one host array of the same shape and dtype on every process (fully
  addressable arrays: a plain fetch)."""
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def primary_print(*args) -> None:
  """`print` on process 0 and nothing on the others: a job's messages, printed once."""
  if is_primary():
    print(*args, flush=True)
