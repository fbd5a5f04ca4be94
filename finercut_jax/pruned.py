"""A pruned model: the removed sublayers physically dropped, and a schedule of those that remain.

The kept attention sublayers are stacked on one axis and the kept FFN sublayers on another; the
`schedule` `[n_kept, 2]` lists, in depth order, `(kind, index into that kind's stack)`. The forward
pass scans over the schedule and switches on the kind with an unbatched index, so each step runs
exactly one sublayer: removed sublayers cost nothing, and compile time does not grow with depth.
The dense model is the special case that keeps everything.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.config import LlamaConfig
from finercut_jax.model import (ATTN, ATTN_PARAM_NAMES, FFN, FFN_PARAM_NAMES, Params,
                                attention_branch, embed, ffn_branch, final_logits, rope_tables)


def make_schedule(keep: np.ndarray) -> np.ndarray:
  """`[n_kept, 2]` int32 rows (kind, index in that kind's stack), in depth order."""
  keep = np.asarray(keep, bool)
  rows, counts = [], [0, 0]
  for layer in range(keep.shape[0]):
    for kind in (ATTN, FFN):
      if keep[layer, kind]:
        rows.append((kind, counts[kind]))
        counts[kind] += 1
  return np.asarray(rows, np.int32).reshape(-1, 2)


def prune_params(params: Params, keep: np.ndarray) -> Params:
  """Drops removed sublayers' weights: `{'attn': {...}[n_attn], 'ffn': {...}[n_ffn], ...}`."""
  keep = np.asarray(keep, bool)
  attn_idx, ffn_idx = np.flatnonzero(keep[:, ATTN]), np.flatnonzero(keep[:, FFN])
  layers = params["layers"]
  out = {k: v for k, v in params.items() if k != "layers"}
  out["attn"] = {k: layers[k][attn_idx] for k in ATTN_PARAM_NAMES}
  out["ffn"] = {k: layers[k][ffn_idx] for k in FFN_PARAM_NAMES}
  return out


def pruned_hidden(params: Params, cfg: LlamaConfig, schedule, h: jax.Array) -> jax.Array:
  """Runs the kept sublayers, in schedule order, on the residual stream h `[B, T, D]`."""
  if len(schedule) == 0:
    return h
  rope = rope_tables(cfg, h.shape[1])

  def take(stack, index):
    return jax.tree.map(lambda w: w[index], stack)

  # A kind with no kept sublayer never appears in the schedule; its branch is the identity.
  def identity(h, i):
    return h

  def attn(h, i):
    return h + attention_branch(take(params["attn"], i), h, rope, cfg)

  def ffn(h, i):
    return h + ffn_branch(take(params["ffn"], i), h, cfg)

  # A kind with no kept sublayer never appears in the schedule; its branch is the identity.
  branches = (attn if params["attn"]["wq"].shape[0] else identity,
              ffn if params["ffn"]["w_up"].shape[0] else identity)

  def step(h, row):
    # `row` is not batched, so only the branch of its kind is executed.
    return jax.lax.switch(row[0], branches, h, row[1]), None

  h, _ = jax.lax.scan(step, h, jnp.asarray(schedule, jnp.int32))
  return h


def pruned_forward(params: Params, cfg: LlamaConfig, schedule, tokens: jax.Array, *,
                   dtype=None) -> jax.Array:
  """Logits `[B, T, V]` (float32) of the pruned model."""
  dtype = dtype or params["embed"].dtype
  h = pruned_hidden(params, cfg, schedule, embed(params, tokens, dtype))
  return final_logits(params, h, cfg)


class PrunedLlama(nnx.Module):
  """NNX module of a pruned model; `model(tokens)` returns float32 logits `[B, T, V]`."""

  def __init__(self, config: LlamaConfig, keep: np.ndarray, params: Params, *, dtype=None):
    self.config = config
    # Static structure as nested tuples: NNX treats arrays as data.
    self.keep = tuple(tuple(bool(x) for x in row) for row in np.asarray(keep, bool))
    self.schedule = tuple(tuple(int(x) for x in row) for row in make_schedule(np.asarray(keep)))
    self.dtype = dtype
    self.weights = nnx.data(jax.tree.map(nnx.Param, params))

  @classmethod
  def from_dense(cls, config: LlamaConfig, params: Params, keep, *, dtype=None) -> "PrunedLlama":
    return cls(config, keep, prune_params(params, keep), dtype=dtype)

  def params(self) -> Params:
    return jax.tree.map(lambda p: p[...], self.weights,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return pruned_forward(self.params(), self.config, np.asarray(self.schedule, np.int32).reshape(-1, 2),
                          tokens, dtype=self.dtype)

  def num_params(self) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(self.params())))

