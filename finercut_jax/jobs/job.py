"""What every pruning job on one model shares, whichever method ranks the sublayers: the checks
made before anything is written, the model, tokenizer and calibration tokens it starts from, the
search with its progress bar, and the results it writes into a run directory."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from finercut_jax import data, healing, search
from finercut_jax.model import Llama, LlamaConfig, checkpoint, loading
from finercut_jax.parallel import distributed, sharding
from finercut_jax.rundir import Ranking, RemovalStep, RunDir, ratio_key
from finercut_jax.scoring import BACKENDS, Scorer, divergence, enable_compilation_cache


class ConfigError(ValueError):
  """The configuration asks for something impossible."""


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks everything that can be checked before any file is written."""
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
  if (not config.search.full_ordering
      and max(config.search.mask_ratios, default=0) > config.search.ratio):
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
    healing.check_config(config.heal)
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
  written: the mesh, the model's config and tokenizer, the calibration tokens `int32 [N, T]`, and
  the fingerprint a resumed run must match (model files, tokenizer, tokens, dtype)."""
  mesh: Mesh
  model_path: str
  model_cfg: LlamaConfig
  tokenizer: object  # a transformers tokenizer
  tokens: np.ndarray
  fingerprint: dict
  dtype: jnp.dtype

  def load_params(self) -> dict:
    """The dense model's parameters (checkpoint layout), placed on the mesh."""
    return loading.load_params(self.model_path, self.dtype,
                               sharding.param_sharding_fn(self.mesh, self.model_cfg))[1]

  def scorer(self, settings: ml_collections.ConfigDict, params: dict, metric: str,
             max_candidates: int) -> Scorer:
    """The scorer of the dense model `params` on the calibration tokens, by the config's
    `scorer` section `settings` (the dense reference pass runs here)."""
    return Scorer(Llama.from_params(self.model_cfg, params), self.tokens, metric=metric,
                  chunk_width=settings.chunk_width, position_block=settings.position_block,
                  mesh=self.mesh, backend=settings.backend, max_candidates=max_candidates,
                  state_every=settings.state_every,
                  state_memory=settings.state_memory_gb * 2**30)

  def search(self, scorer: Scorer, spec: search.SearchSpec, run_dir: RunDir, metric: str, *,
             desc: str) -> list[RemovalStep]:
    """Runs (or resumes, from the run directory's search state) the greedy search, with a
    progress bar on process 0."""
    bar = tqdm(total=spec.total_steps, desc=desc, unit="step", file=sys.stdout,
               disable=not distributed.is_primary())

    def on_step(step: RemovalStep):
      stats = step.stats or {}
      bar.set_postfix_str(
          f"removed {step.name} score={step.score:.4g} {step.seconds:.1f}s "
          f"evals={stats.get('evaluation_fraction', 0):.2f}x "
          f"{stats.get('flops_per_second', 0) / 1e9:.1f} GFLOP/s")
      bar.update(1)
    try:
      return search.greedy_search(scorer, spec, state_path=run_dir.state_file,
                                  fingerprint=dict(self.fingerprint, metric=metric),
                                  on_step=on_step)
    finally:
      bar.close()

  def ranking(self, steps: Iterable[RemovalStep], *, pool: str, metric: str | None,
              **extra) -> Ranking:
    return Ranking(model=self.model_path, num_layers=self.model_cfg.num_layers, pool=pool,
                   metric=metric, steps=tuple(steps), **extra)

  def save_results(self, run_dir: RunDir, ranking: Ranking, masks: dict[str, np.ndarray],
                   params: dict, *, save_checkpoints: bool = True) -> None:
    """The pruned checkpoint of every mask (`{ratio key: keep bool [L, 2]}`), then
    `ranking.json` and `masks.json`, which mark the results complete. Every process calls it:
    each saves its own shards of the checkpoints, process 0 writes the files."""
    if save_checkpoints:
      for ratio, keep in masks.items():
        checkpoint.save_pruned(run_dir.checkpoint_dir(float(ratio)), self.model_cfg, params,
                               np.asarray(keep, bool), tokenizer=self.tokenizer,
                               source=self.model_path)
    distributed.on_primary(lambda: run_dir.write_results(ranking, masks))


def masks_at(ratios: Iterable[float], num_removed: Callable[[float], int],
             steps_for: Callable[[int], list[RemovalStep]], num_layers: int
             ) -> dict[str, np.ndarray]:
  """`{ratio key: keep bool [L, 2]}`: at each ratio, the first `num_removed(ratio)` removals of
  the order `steps_for(n)` gives for n removals."""
  out = {}
  for ratio in sorted(set(ratios)):
    n = num_removed(ratio)
    out[ratio_key(ratio)] = search.keep_mask(num_layers, [s.sublayers for s in steps_for(n)[:n]])
  return out


def prepare(config: ml_collections.ConfigDict) -> Job:
  """Validates `config`, starts the distributed runtime, builds the mesh, and reads the model's
  config, tokenizer and calibration tokens; every bad input fails here."""
  validate(config)
  distributed.initialize(distributed.Settings.from_config(config.get("distributed")))
  if config.get("compilation_cache"):
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
  return Job(mesh, model_path, model_cfg, tokenizer, tokens, fingerprint,
             jnp.dtype(config.model.dtype))
