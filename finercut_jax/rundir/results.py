"""The files of a run directory that a pruning method writes, whichever method ranked the
sublayers: `config.json` and `calibration_tokens.npy` when it starts, then `ranking.json`,
`masks.json` and one pruned Orbax checkpoint per ratio (`checkpoint.pruned_dir`).

Every process of a multi-process job calls these: process 0 writes the JSON and NumPy files,
and every process saves its own shards of the checkpoints.
"""
from __future__ import annotations

import json
import os

import numpy as np

from finercut_jax.model import checkpoint
from finercut_jax.parallel import distributed
from finercut_jax.rundir import atomic


def write_start(run_dir: str, config, tokens: np.ndarray) -> None:
  """The resolved config and the calibration tokens (a failed write stops every process)."""
  def write():
    os.makedirs(run_dir, exist_ok=True)
    atomic.atomic_write_json(os.path.join(run_dir, "config.json"), json.loads(config.to_json()))
    atomic.atomic_save_npy(os.path.join(run_dir, "calibration_tokens.npy"), tokens)
  distributed.on_primary(write)


def save_results(run_dir: str, ranking: dict, masks: dict[str, np.ndarray], *, model_cfg, params,
                 tokenizer, source: str, save_checkpoints: bool = True) -> None:
  """The pruned checkpoint of every mask (keyed by ratio), then `ranking.json` and `masks.json`:
  written last, they mark the results complete."""
  if save_checkpoints:
    for ratio, keep in masks.items():
      checkpoint.save_pruned(checkpoint.pruned_dir(run_dir, float(ratio)), model_cfg, params,
                             np.asarray(keep, bool), tokenizer=tokenizer, source=source)
  distributed.on_primary(lambda: (
      atomic.atomic_write_json(os.path.join(run_dir, "ranking.json"), ranking),
      atomic.atomic_write_json(os.path.join(run_dir, "masks.json"),
                           {r: np.asarray(k, bool).tolist() for r, k in masks.items()})) and None)
