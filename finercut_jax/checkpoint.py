"""Pruned-model checkpoints: Orbax parameters with removed sublayers dropped, plus what rebuilds them.

A checkpoint directory `run_dir/pruned/ratio_<r>/` holds
  params/      Orbax checkpoint of the pruned parameter pytree (empty stacks omitted: Orbax cannot
               store zero-size arrays; they are rebuilt from the config)
  model.json   the model config, the keep mask `[L, 2]`, the dtype and the source checkpoint
  tokenizer/   the tokenizer (save_pretrained), so the checkpoint runs without its source
The directory appears atomically: an interrupted save leaves no half-written checkpoint.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from finercut_jax.config import LlamaConfig
from finercut_jax.io import atomic_directory
from finercut_jax.model import Params, param_shapes
from finercut_jax.pruned import ATTN_PARAM_NAMES, FFN_PARAM_NAMES, PrunedLlama, prune_params


def ratio_name(ratio: float) -> str:
  return f"ratio_{ratio:g}"


def pruned_dir(run_dir: str, ratio: float) -> str:
  return os.path.join(run_dir, "pruned", ratio_name(ratio))


def save_pruned(directory: str, cfg: LlamaConfig, params: Params, keep: np.ndarray, *,
                tokenizer=None, source: str | None = None) -> str:
  """Writes the pruned model of `keep` (dense params in, removed weights dropped) to `directory`."""
  keep = np.asarray(keep, bool)
  pruned = prune_params(params, keep)
  stored = {k: v for k, v in pruned.items() if k not in ("attn", "ffn")}
  for group in ("attn", "ffn"):
    if next(iter(pruned[group].values())).shape[0]:
      stored[group] = pruned[group]
  dtype = jnp.dtype(params["embed"].dtype).name
  with atomic_directory(directory) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "params"), stored)
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump({"config": cfg.to_dict(), "keep": keep.tolist(), "dtype": dtype,
                 "source": source}, f, indent=1)
    if tokenizer is not None:
      tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
  return directory


def restore_pruned(directory: str, *, dtype=None) -> tuple[PrunedLlama, object]:
  """`(PrunedLlama, tokenizer or None)` from a checkpoint directory written by `save_pruned`."""
  meta_path = os.path.join(directory, "model.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{meta_path} is missing: {directory} is not a pruned checkpoint")
  with open(meta_path) as f:
    meta = json.load(f)
  cfg = LlamaConfig.from_dict(meta["config"])
  keep = np.asarray(meta["keep"], bool)
  params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), "params"))
  shapes = param_shapes(cfg)["layers"]
  for group, names, count in (("attn", ATTN_PARAM_NAMES, keep[:, 0].sum()),
                              ("ffn", FFN_PARAM_NAMES, keep[:, 1].sum())):
    if group not in params:
      if count:
        raise ValueError(f"{directory}: the checkpoint has no {group} weights but keeps {count}")
      params[group] = {n: jnp.zeros((0,) + shapes[n][1:], meta["dtype"]) for n in names}
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  tokenizer = None
  tok_dir = os.path.join(directory, "tokenizer")
  if os.path.isdir(tok_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  return PrunedLlama(cfg, keep, params, dtype=dtype), tokenizer


def load_pruned(run_dir: str, ratio: float, *, dtype=None) -> tuple[PrunedLlama, object]:
  """The pruned model of a search run at `ratio`, and its tokenizer."""
  directory = pruned_dir(run_dir, ratio)
  if not os.path.isdir(directory):
    available = sorted(os.listdir(os.path.join(run_dir, "pruned"))) if os.path.isdir(
        os.path.join(run_dir, "pruned")) else []
    raise FileNotFoundError(f"{directory}: no pruned checkpoint for ratio {ratio:g} "
                            f"(available: {available or 'none'})")
  return restore_pruned(directory, dtype=dtype)


def load_source_model(run_dir: str, *, dtype=None):
  """The dense model a run pruned, and its tokenizer, from the run's resolved config."""
  from finercut_jax.loading import load_model
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  dtype = dtype or jnp.dtype(config["model"]["dtype"])
  return load_model(config["model"]["path"], dtype)
