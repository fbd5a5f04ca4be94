"""The FinerCut job: search, pruned checkpoints, then (as configured) healing and evaluation."""
from __future__ import annotations

import contextlib
import json

import ml_collections
import numpy as np

from finercut_jax import healing, search
from finercut_jax.evaluation import evaluate_run
from finercut_jax.jobs.job import ConfigError, Job, masks_at, prepare
from finercut_jax.parallel import distributed
from finercut_jax.rundir import RunDir


def run_pruning(config: ml_collections.ConfigDict) -> RunDir:
  """Runs (or resumes) the search of `config`; returns its run directory.

  As several processes (a TPU pod slice, a GPU cluster), every process runs this same function:
  all of them load their own shards, score and choose identically; process 0 writes the files.
  """
  job = prepare(config)
  num_layers = job.model_cfg.num_layers
  spec = search.SearchSpec(
      num_layers=num_layers, pool=config.search.pool,
      num_steps=None if config.search.full_ordering else search.steps_needed(
          config.search.ratio, num_layers, config.search.pool),
      protect_front=config.search.protect_front, one_shot=config.search.one_shot,
      tie_break=config.search.tie_break)

  # Everything that can fail on bad input runs before the run directory is written.
  run_dir = RunDir(config.run_dir)
  # One job per run directory: process 0 holds its lock until the job ends. An existing directory
  # is locked now, before minutes of loading; a new one just before it is first written.
  lock = contextlib.ExitStack()
  take_lock = lambda: distributed.on_primary(  # noqa: E731
      lambda: lock.enter_context(run_dir.lock()) and None)
  # Decided once, by process 0: each process looking for itself could see the directory before
  # and after process 0 creates it, and take part in different collectives.
  existed = distributed.on_primary(run_dir.exists)
  if existed:
    take_lock()
  tokens_differ = distributed.on_primary(lambda: (
      (stored := run_dir.read_tokens()) is not None and not np.array_equal(stored, job.tokens)))
  if tokens_differ:
    raise ConfigError(f"{run_dir.tokens_file} differs from this config's calibration tokens; "
                      f"use a new run_dir")
  search.load_state(run_dir.state_file, search.search_fingerprint(
      spec, dict(job.fingerprint, metric=config.search.metric)))
  params = job.load_params()
  # The dense reference pass: non-finite outputs stop the job here.
  scorer = job.scorer(config.scorer, params, config.search.metric, len(spec.pool_candidates()))
  if not existed:
    take_lock()
  with lock:
    distributed.on_primary(lambda: run_dir.write_start(json.loads(config.to_json()), job.tokens))
    steps = job.search(scorer, spec, run_dir, config.search.metric, desc="FinerCut")
    del scorer
    _save(config, job, run_dir, spec, steps, params)
    del params
    if config.heal.enabled:
      healing.heal_run(run_dir.path, config.heal.ratio, config.heal, mesh=job.mesh,
                       log=distributed.primary_print)
    if config.eval.enabled:
      evaluate_run(run_dir.path, config.eval, mesh=job.mesh)
  distributed.primary_print(f"run directory: {run_dir}")
  return run_dir


def _save(config, job: Job, run_dir: RunDir, spec: search.SearchSpec, steps, params) -> None:
  """The ranking, the masks of every requested ratio and their pruned checkpoints."""
  num_layers = job.model_cfg.num_layers
  removals = lambda ratio: search.steps_needed(ratio, num_layers, spec.pool)  # noqa: E731
  masks = masks_at({config.search.ratio, *config.search.mask_ratios}, removals,
                   lambda n: steps, num_layers)
  job.save_results(run_dir, job.ranking(steps, pool=spec.pool, metric=config.search.metric),
                   masks, params, save_checkpoints=config.checkpoint)
  removed = steps[:removals(config.search.ratio)]
  distributed.primary_print(f"removed {len(removed)} at ratio {config.search.ratio:g}: "
                            + ", ".join(step.name for step in removed))
  distributed.primary_print(
      f"attention sublayers among them: {sum(step.kind == 'attn' for step in removed)}")
