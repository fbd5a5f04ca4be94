r"""Runs a FinerCut search: `python -m finercut_jax.main --config=configs/smollm2_135m.py`.

Any config field can be overridden, e.g. `--config.search.ratio=0.3 --config.run_dir=runs/x`.
Rerunning the same command on the same run directory resumes an interrupted search.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from finercut_jax.jobs import cli

# The --config flag; finercut_jax.compare reads the same one.
CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file under configs/.")


class ConfigError(ValueError):
  """The configuration asks for something impossible."""


def validate(config) -> None:
  """Checks everything that can be checked before any file is written."""
  import jax.numpy as jnp

  from finercut_jax import search
  from finercut_jax.scoring import divergence
  from finercut_jax.scoring.scorer import BACKENDS
  if not config.run_dir:
    raise ConfigError("config.run_dir is empty: set --config.run_dir=runs/<name>")
  divergence.check_metric(config.search.metric)
  if config.search.tie_break not in search.TIE_BREAKS:
    raise ConfigError(f"unknown search.tie_break {config.search.tie_break!r}; choose one of "
                      f"{search.TIE_BREAKS}")
  if config.search.pool not in search.POOLS:
    raise ConfigError(f"unknown search.pool {config.search.pool!r}; choose one of {search.POOLS}")
  for r in (config.search.ratio, *config.search.mask_ratios):
    if not 0.0 < r < 1.0:
      raise ConfigError(f"pruning ratio must be in (0, 1), got {r}")
  if not config.search.full_ordering and max(config.search.mask_ratios, default=0) > config.search.ratio:
    raise ConfigError(f"search.mask_ratios {tuple(config.search.mask_ratios)} go beyond "
                      f"search.ratio={config.search.ratio}; raise the ratio or set full_ordering")
  try:
    dtype = jnp.dtype(config.model.dtype)
  except TypeError:
    dtype = None
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ConfigError(f"unknown model.dtype {config.model.dtype!r}; choose float32 (CPU), "
                      f"bfloat16 (GPU/TPU) or float16")
  run_dir = os.path.abspath(config.run_dir)
  existing = next((p for p in (run_dir, *_parents(run_dir)) if os.path.exists(p)), None)
  if existing is not None and not os.path.isdir(existing):
    raise ConfigError(f"run_dir {config.run_dir}: {existing} is a file, not a directory")
  if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"run_dir {config.run_dir}: {existing} is not writable")
  if config.scorer.backend not in BACKENDS:
    raise ConfigError(f"unknown scorer.backend {config.scorer.backend!r}; choose one of {BACKENDS}")
  if config.heal.enabled:
    from finercut_jax.healing.run import check_config
    check_config(config.heal)
    if not config.checkpoint:
      raise ConfigError("heal.enabled needs the pruned checkpoints: set checkpoint=True")
    if not any(abs(config.heal.ratio - r) < 1e-9
               for r in (config.search.ratio, *config.search.mask_ratios)):
      raise ConfigError(f"heal.ratio {config.heal.ratio:g} is not among search.ratio and "
                        f"search.mask_ratios, whose pruned models are written")


def _parents(path: str):
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    yield path


@dataclasses.dataclass
class Job:
  """What every pruning run on one model starts from, read and checked before anything is
  written: the mesh, the model's config and tokenizer, the calibration tokens, and the
  fingerprint a resumed run must match (model files, tokenizer, tokens, dtype)."""
  mesh: object
  model_path: str
  model_cfg: object
  tokenizer: object
  tokens: object
  fingerprint: dict

  def scorer(self, settings, params, metric: str, max_candidates: int):
    """The scorer of the dense model `params` on the calibration tokens, by the config's
    `scorer` section `settings` (the dense reference pass runs here)."""
    from finercut_jax.model.modules import Llama
    from finercut_jax.scoring.scorer import Scorer
    return Scorer(Llama.from_params(self.model_cfg, params), self.tokens, metric=metric,
                  chunk_width=settings.chunk_width, position_block=settings.position_block,
                  mesh=self.mesh, backend=settings.backend, max_candidates=max_candidates,
                  state_every=settings.state_every,
                  state_memory=settings.state_memory_gb * 2**30)

  def load_params(self, dtype):
    from finercut_jax.model import loading
    from finercut_jax.parallel import sharding
    return loading.load_params(self.model_path, dtype,
                               sharding.param_sharding_fn(self.mesh, self.model_cfg))[1]


def prepare(config) -> Job:
  """Validates `config`, starts the distributed runtime, builds the mesh, and reads the model's
  config, tokenizer and calibration tokens; every bad input fails here."""
  import hashlib

  import jax

  from finercut_jax import data
  from finercut_jax.parallel import distributed
  from finercut_jax.model import loading
  from finercut_jax.parallel import sharding

  validate(config)
  distributed.initialize(distributed.Settings.from_config(config.get("distributed")))
  if config.get("compilation_cache"):
    from finercut_jax.scoring.scorer import enable_compilation_cache
    logging.info("compilation cache: %s", enable_compilation_cache(config.compilation_cache))
  # A device count the config's mesh does not fit fails here, before anything is read.
  mesh = sharding.make_mesh(cand=config.scorer.mesh_cand or None, model=config.scorer.mesh_model)
  where = (f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices, "
           f"{jax.local_device_count()} of them local")
  if jax.process_count() > 1:
    print(f"process {jax.process_index()} of {jax.process_count()}: {where}", flush=True)
  else:
    logging.info(where)
  model_path = loading.resolve_path(config.model.path)
  model_cfg = loading.load_config(model_path)  # a missing or unsupported checkpoint fails here
  if config.data.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"data.seq_len={config.data.seq_len} is beyond the model's "
                      f"max_position_embeddings={model_cfg.max_position_embeddings}")
  tokenizer = loading.load_tokenizer(model_path)
  if len(tokenizer) > model_cfg.vocab_size:  # its ids past the embedding would be clamped
    raise ConfigError(f"{model_path}: the tokenizer has {len(tokenizer)} tokens but the model's "
                      f"vocabulary is {model_cfg.vocab_size}: tokenizer and model do not match")
  tokens = data.calibration_tokens(tokenizer, config.data.source, config.data.num_sequences,
                                   config.data.seq_len)
  distributed.check_same("calibration tokens", tokens.tobytes())
  fingerprint = {"model": model_path, "dtype": config.model.dtype,
                 "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                 "weights": loading.weights_fingerprint(model_path),
                 "tokenizer": loading.tokenizer_fingerprint(tokenizer)}
  # Every host read its own copy of the checkpoint and tokenizer: they must be the same files.
  distributed.check_same("model files or tokenizer", json.dumps(
      {k: fingerprint[k] for k in ("weights", "tokenizer")}, sort_keys=True).encode())
  return Job(mesh, model_path, model_cfg, tokenizer, tokens, fingerprint)


def run(config) -> str:
  """Runs (or resumes) the search of `config`; returns the run directory.

  As several processes (a TPU pod slice, a GPU cluster), every process runs this same function:
  all of them load their own shards, score and choose identically; process 0 writes the files.
  """
  import jax.numpy as jnp
  import numpy as np

  from finercut_jax import search
  from finercut_jax.parallel import distributed
  from finercut_jax.rundir import atomic

  job = prepare(config)
  primary = distributed.is_primary()
  mesh, model_path, model_cfg, tokenizer, tokens = (job.mesh, job.model_path, job.model_cfg,
                                                    job.tokenizer, job.tokens)
  spec = search.SearchSpec(
      num_layers=model_cfg.num_layers, pool=config.search.pool,
      num_steps=None if config.search.full_ordering else search.steps_needed(
          config.search.ratio, model_cfg.num_layers, config.search.pool),
      protect_front=config.search.protect_front, one_shot=config.search.one_shot,
      tie_break=config.search.tie_break)

  # Everything that can fail on bad input runs before the run directory is written.
  run_dir = config.run_dir
  tokens_path = os.path.join(run_dir, "calibration_tokens.npy")
  state_path = os.path.join(run_dir, "search_state.json")
  fingerprint = dict(job.fingerprint, metric=config.search.metric)

  # One job per run directory: process 0 holds its lock until the job ends. An existing directory
  # is locked now, before minutes of loading; a new one just before it is first written.
  lock = contextlib.ExitStack()
  take_lock = lambda: distributed.on_primary(  # noqa: E731
      lambda: lock.enter_context(atomic.run_lock(run_dir)) and None)
  # Decided once, by process 0: each process looking for itself could see the directory before
  # and after process 0 creates it, and take part in different collectives.
  existed = distributed.on_primary(lambda: os.path.isdir(run_dir))
  if existed:
    take_lock()
  tokens_differ = distributed.on_primary(
      lambda: os.path.exists(tokens_path) and not np.array_equal(np.load(tokens_path), tokens))
  if tokens_differ:
    raise ConfigError(f"{tokens_path} differs from this config's calibration tokens; "
                      f"use a new run_dir")
  search.load_state(state_path, search.search_fingerprint(spec, fingerprint))
  params = job.load_params(jnp.dtype(config.model.dtype))
  # The dense reference pass: non-finite outputs stop the job here.
  scorer = job.scorer(config.scorer, params, config.search.metric, len(spec.pool_candidates()))
  if not existed:
    take_lock()
  with lock:
    _search_and_save(config, run_dir, tokens, state_path, fingerprint, spec,
                     scorer, params, tokenizer, model_path, model_cfg)
    del scorer, params
    if config.heal.enabled:
      from finercut_jax.healing.run import heal_run
      heal_run(run_dir, config.heal.ratio, config.heal, mesh=mesh,
               log=print if primary else (lambda *_: None))
    if config.eval.enabled:
      from finercut_jax.evaluation import evaluate_run
      evaluate_run(run_dir, config.eval, mesh=mesh)
  if primary:
    print(f"run directory: {run_dir}")
  return run_dir


def _search_and_save(config, run_dir, tokens, state_path, fingerprint, spec, scorer,
                     params, tokenizer, model_path, model_cfg) -> None:
  """Writes the run directory, runs (or resumes) the search, writes its results and checkpoints."""
  from tqdm import tqdm

  from finercut_jax import rundir, search
  from finercut_jax.parallel import distributed
  primary = distributed.is_primary()
  rundir.write_start(run_dir, config, tokens)

  bar = tqdm(total=spec.total_steps, desc="FinerCut", unit="step", file=sys.stdout,
             disable=not primary)

  def on_step(record):
    stats = record.get("stats") or {}
    bar.set_postfix_str(
        f"removed {record['kind']}{record['block']} score={record['score']:.4g} "
        f"{record['seconds']:.1f}s evals={stats.get('evaluation_fraction', 0):.2f}x "
        f"{stats.get('flops_per_second', 0) / 1e9:.1f} GFLOP/s")
    bar.update(1)

  steps = search.greedy_search(scorer, spec, state_path=state_path, fingerprint=fingerprint,
                               on_step=on_step)
  bar.close()

  ranking = {"model": model_path, "num_layers": model_cfg.num_layers, "pool": spec.pool,
             "metric": config.search.metric, "steps": [
                 {k: v for k, v in r.items() if k != "scores"} for r in steps]}
  masks = {}
  for ratio in sorted(set(config.search.mask_ratios) | {config.search.ratio}):
    n = search.steps_needed(ratio, model_cfg.num_layers, spec.pool)
    masks[f"{ratio:g}"] = search.keep_mask(model_cfg.num_layers, [r["sublayers"] for r in steps[:n]])
  rundir.save_results(run_dir, ranking, masks, model_cfg=model_cfg, params=params,
                      tokenizer=tokenizer, source=model_path, save_checkpoints=config.checkpoint)
  if primary:
    removed = steps[:search.steps_needed(config.search.ratio, model_cfg.num_layers, spec.pool)]
    print(f"removed {len(removed)} at ratio {config.search.ratio:g}: " + ", ".join(
        f"{r['kind']}{r['block']}" for r in removed))
    print(f"attention sublayers among them: {sum(r['kind'] == 'attn' for r in removed)}")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  with cli.expected_errors():
    run(CONFIG.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
