"""The jobs on a finished run: evaluate it, heal one of its pruned models, export one.

Each checks that the run directory exists, starts the distributed runtime (from the cluster's
launcher or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), holds the run directory's lock on process 0, and loads models onto the mesh the
run searched on. Every process of a multi-process job calls them; the run directory is on a file
system they all see, as the job's Orbax checkpoints need.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ml_collections
from jax.sharding import Mesh

from finercut_jax import healing
from finercut_jax.evaluation import evaluate_run, run_eval_config
from finercut_jax.model import export_pruned
from finercut_jax.parallel import distributed, sharding
from finercut_jax.rundir import RunDir


@contextlib.contextmanager
def existing_run(run_dir: str) -> Iterator[RunDir]:
  """The run directory `run_dir`, checked to exist, with the distributed runtime started and
  the directory's lock held by process 0 for the block."""
  run = RunDir(run_dir)
  if not run.exists():
    raise FileNotFoundError(f"{run_dir}: no such run directory")
  distributed.initialize()
  lock = contextlib.ExitStack()
  distributed.on_primary(lambda: lock.enter_context(run.lock()) and None)
  with lock:
    yield run


def run_mesh(run: RunDir) -> Mesh:
  """The mesh a run searched on (its config's `scorer.mesh_model`), over this job's devices."""
  config = run.read_config(missing_ok=True)
  return sharding.make_mesh(model=config.get("scorer", {}).get("mesh_model", 1))


def evaluate(run_dir: str, overrides: dict | None = None) -> dict:
  """Evaluates `run_dir` with its own `eval` settings, `overrides` (flat, dotted keys) on top;
  returns what eval_results.json holds."""
  with existing_run(run_dir) as run:
    config = run_eval_config(run.path, overrides)
    return evaluate_run(run.path, config, mesh=run_mesh(run))


def run_heal_config(run: RunDir, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The healing settings a run was configured with, `overrides` (flat, dotted keys) on top."""
  config = healing.resolve_heal_config(run.read_config().get("heal"))
  config.update_from_flattened_dict(dict(overrides or {}))
  return config


def heal(run_dir: str, ratio: float | None = None, overrides: dict | None = None) -> str:
  """Heals the pruned model of `ratio` (default: the run's `heal.ratio`); returns the healed
  checkpoint's directory."""
  with existing_run(run_dir) as run:
    config = run_heal_config(run, overrides)
    return healing.heal_run(run.path, config.ratio if ratio is None else ratio, config,
                            log=distributed.primary_print)


def export(run_dir: str, out: str, ratio: float | None = None, **kwargs) -> str:
  """Exports the pruned (or, `healed=True`, healed) model of `ratio` (default: the run's
  `search.ratio`) as a Hugging Face checkpoint in `out`; returns the format written. `kwargs`
  go to `model.export_pruned` (fmt, dtype, healed, max_shard_bytes)."""
  with existing_run(run_dir) as run:
    if ratio is None:
      ratio = run.read_config(missing_ok=True).get("search", {}).get("ratio")
      if ratio is None:
        raise FileNotFoundError(f"{run.config_file} has no search.ratio: pass --ratio")
    return export_pruned(run.path, ratio, out, mesh=run_mesh(run), **kwargs)
