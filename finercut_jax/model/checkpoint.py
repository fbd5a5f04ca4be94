"""Pruned-model checkpoints: Orbax parameters with removed sublayers dropped, plus what rebuilds
them.

A checkpoint directory (a run's `rundir.RunDir.checkpoint_dir(ratio)`) holds
  params/      Orbax checkpoint of the pruned parameter pytree (empty stacks omitted: Orbax cannot
               store zero-size arrays; they are rebuilt from the config)
  model.json   the model config, the keep mask `[L, 2]`, the dtype and the source checkpoint
  tokenizer/   the tokenizer (save_pretrained), so the checkpoint runs without its source

`model.json` is written last and marks a complete checkpoint: a save interrupted at any point
leaves a directory without it, which loads as no checkpoint and is rewritten by the next save.
On several processes every process saves its own shards through Orbax, which commits the
`params/` directory atomically across hosts; process 0 writes `model.json` and the tokenizer.
A save whose checkpoint already exists with the same contents is skipped.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from finercut_jax.model.architecture import LlamaConfig
from finercut_jax.model.loading import load_config, load_model
from finercut_jax.model.modules import (Llama, Params, param_shapes, prune_params,
                                        sublayer_param_names)
from finercut_jax.parallel import distributed
from finercut_jax.parallel.sharding import param_sharding_fn, shard_state
from finercut_jax.rundir import RunDir
from finercut_jax.rundir.atomic import atomic_write_json, read_json


def read_meta(directory: str) -> dict | None:
  """A checkpoint's model.json (config, keep mask, dtype, source, and what healing adds), or
  None where the checkpoint is incomplete or absent."""
  return read_json(os.path.join(directory, "model.json"))


def save_pruned(directory: str, cfg: LlamaConfig, params: Params, keep: np.ndarray, *,
                tokenizer=None, source: str | None = None) -> str:
  """Writes the pruned model of `keep` (dense params in, removed weights dropped) to `directory`.
  Every process of a multi-process job calls it."""
  return save_model(directory, Llama.from_params(cfg, params).prune(keep), tokenizer=tokenizer,
                    source=source)


def save_model(directory: str, model: Llama, *, tokenizer=None, source: str | None = None,
               extra: dict | None = None) -> str:
  """Writes a (pruned) `Llama` as a checkpoint of its present sublayers; `extra` goes into
  model.json. Every process of a multi-process job calls it."""
  keep = model.present
  params = prune_params(model.params(), keep, keep)  # the pruned layout, whatever the model
  # As model.json will hold it (tuples become lists), so that it compares equal when unchanged.
  meta = json.loads(json.dumps({"config": model.config.to_dict(), "keep": keep.tolist(),
                                "dtype": jnp.dtype(params["embed"].dtype).name, "source": source,
                                **(extra or {})}))
  directory = os.path.abspath(directory)

  def unchanged() -> bool:
    _remove_leftovers(directory)
    return read_meta(directory) == meta
  # Process 0 decides for everyone, so that all make the same Orbax calls.
  if distributed.on_primary(unchanged):
    return directory
  stored = {k: v for k, v in params.items() if k not in ("attn", "ffn")}
  for group in ("attn", "ffn"):
    if next(iter(params[group].values())).shape[0]:
      stored[group] = params[group]

  def open_directory():
    os.makedirs(directory, exist_ok=True)
    for stale in ("model.json", "tokenizer"):  # the directory is incomplete from here on
      path = os.path.join(directory, stale)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.unlink(path)
  distributed.on_primary(open_directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), stored, force=True)
  checkpointer.wait_until_finished()

  def close_directory():
    if tokenizer is not None:
      tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    atomic_write_json(os.path.join(directory, "model.json"), meta)
  distributed.on_primary(close_directory)
  return directory


def _remove_leftovers(directory: str) -> None:
  """What interrupted saves left: Orbax's temporary directories beside `params`, and the
  temporary directories of this project's earlier checkpoint format beside `directory`."""
  parent = os.path.dirname(directory)
  for path in (glob.glob(os.path.join(directory, "params.orbax-checkpoint-tmp*")) +
               glob.glob(os.path.join(parent, ".tmp-" + os.path.basename(directory) + "*"))):
    shutil.rmtree(path, ignore_errors=True)


def _abstract_pruned(cfg: LlamaConfig, keep: np.ndarray, dtype, mesh) -> Params:
  """The stored pytree's shapes, dtypes and shardings (on `mesh` by the model's logical axes, else
  on this process's first device), read off an abstract model of the kept sublayers: Orbax
  restores straight into them."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, present=keep, param_dtype=dtype)))
  if mesh is not None:
    state = shard_state(state, mesh, cfg)
  else:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), state)
  tree = prune_params(nnx.merge(graphdef, state).params(), keep, keep)  # the pruned layout
  return {k: v for k, v in tree.items()  # empty stacks are not stored
          if k not in ("attn", "ffn") or next(iter(v.values())).shape[0]}


def restore_pruned(directory: str, *, dtype=None, mesh=None) -> tuple[Llama, object]:
  """`(Llama holding the kept sublayers, tokenizer or None)` from a checkpoint directory written
  by `save_pruned`; with `mesh`, the parameters are restored straight onto it, sharded by the
  sharding rules."""
  meta = read_meta(directory)
  if meta is None:
    raise FileNotFoundError(f"{os.path.join(directory, 'model.json')} is missing: {directory} is "
                            f"not a complete pruned checkpoint")
  cfg = LlamaConfig.from_dict(meta["config"])
  keep = np.asarray(meta["keep"], bool)
  target = _abstract_pruned(cfg, keep, jnp.dtype(meta["dtype"]), mesh)
  params = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), "params"), target)
  shapes = param_shapes(cfg)["layers"]
  for group, names in zip(("attn", "ffn"), sublayer_param_names(cfg)):
    if group not in params:
      params[group] = {n: jnp.zeros((0,) + shapes[n][1:], meta["dtype"]) for n in names}
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  tokenizer = None
  tok_dir = os.path.join(directory, "tokenizer")
  if os.path.isdir(tok_dir):
    from transformers import AutoTokenizer  # lazy: importing transformers takes ~0.5 s
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  return Llama.from_params(cfg, params, present=keep, dtype=dtype), tokenizer


def load_pruned(run_dir: str, ratio: float, *, healed: bool = False, dtype=None, mesh=None
                ) -> tuple[Llama, object]:
  """The pruned model of a search run at `ratio` (healed: after `finercut_jax.heal`), and its
  tokenizer."""
  run = RunDir(run_dir)
  directory = run.checkpoint_dir(ratio, healed=healed)
  if not os.path.isdir(directory):
    group = os.path.basename(run.checkpoint_group(healed=healed))
    raise FileNotFoundError(f"{directory}: no {group} checkpoint for ratio {ratio:g} "
                            f"(available: {run.checkpoint_names(healed=healed) or 'none'})")
  return restore_pruned(directory, dtype=dtype, mesh=mesh)


def load_source_model(run_dir: str, *, dtype=None, mesh=None, run_config: dict | None = None):
  """The dense model a run pruned, and its tokenizer, from the run's resolved config; with
  `mesh`, loaded straight onto it (each process reads only its own shards)."""
  if run_config is None:
    run_config = RunDir(run_dir).read_config()
  dtype = dtype or jnp.dtype(run_config["model"]["dtype"])
  path = run_config["model"]["path"]
  sharding_fn = None
  if mesh is not None:
    sharding_fn = param_sharding_fn(mesh, load_config(path))
  return load_model(path, dtype, sharding_fn=sharding_fn)
