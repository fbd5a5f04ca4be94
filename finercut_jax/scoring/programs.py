"""The scorer's device programs: pure functions of arrays, each compiled once per search.

- `reference_program`: the dense model's outputs at every calibration position (once).
- `prefix_program`: the current pruned model's residual stream at every sublayer boundary (once
  per greedy step, from the first sublayer that changed).
- `score_chunks`: one device's candidates, as a scan over chunks of W candidates (one `jax.vmap`
  each; W is the last axis of the `ChunkPlan` arrays, the scorer's `chunk_width`), each chunk
  running the calibration sequences of the call one after another: its suffix sublayers (keeping
  its states), then the fused LM head and divergence per block of positions. With `bound`, a
  chunk stops once none of its candidates can be the argmin; the best complete score is shared
  by every device of the candidate axis after each chunk (`lax.pmin`), so every device cuts
  against the best score found anywhere.

What a call computes, for which candidates and from where, is the host's choice
(`scoring/planner.py`): it arrives as a `ChunkPlan`, a named pytree of per-chunk arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.scoring import divergence


class ChunkPlan(NamedTuple):
  """One device's entries for a scoring call: `[chunks, W]`, the restart arrays `[chunks, W, N]`
  (one value per calibration sequence); the planner's layout of a call has a leading device axis.
  Padding entries repeat a real entry of their chunk."""
  slot: Any  # int32 [chunks, W]: the entry's kept-state slot on its device
  start: Any  # int32 [chunks, W]: its first removed sublayer, the prefix cache row it starts from
  resume: Any  # int32 [chunks, W, N]: the first sublayer it runs, per sequence
  from_state: Any  # bool [chunks, W, N]: start from its own kept state, not the prefix cache
  state_index: Any  # int32 [chunks, W, N]: which of its kept states
  partial: Any  # float32 [chunks, W]: its score over the sequences before this call
  valid: Any  # bool [chunks, W]; False: padding


class Calibration(NamedTuple):
  """The dense model's side of every metric, per calibration position: what
  `divergence.reference` keeps of its logits, the next-token targets and the position weights."""
  reference: Any  # float32 [N*T, V] ([N*T, 1] zeros for ppl)
  targets: Any  # int32 [N*T]
  weights: Any  # float32 [N*T]


@dataclasses.dataclass(frozen=True)
class ProgramConfig:
  """What the step program is specialized on (static: a change recompiles)."""
  graphdef: Any  # the model's nnx graph; the parameters arrive as a state pytree
  metric: divergence.Metric
  num_sequences: int
  seq_len: int
  position_block: int
  state_every: int
  num_states: int  # kept states per slot; 0 keeps none
  bound: bool  # stop chunks that cannot hold the argmin
  axis: str | None = None  # the mesh axis whose devices share the best score


def _model(graphdef, params):
  return nnx.merge(graphdef, params)


def embed(graphdef, params, tokens):
  """tokens: `int32 [N, T]`. Returns the residual stream entering sublayer 0, `[N, T, D]` in the
  model's compute dtype."""
  return _model(graphdef, params).embed_tokens(jnp.asarray(tokens))


def reference_program(graphdef, metric: divergence.Metric, params, h0):
  """h0: `[N, T, D]` from `embed`. Returns what the metric compares against, `float32 [N*T, V]`
  (`[N*T, 1]` zeros for `ppl`)."""
  model = _model(graphdef, params)
  h = model.layers(h0, np.arange(h0.shape[1]))
  logits = model.logits(h).reshape(-1, model.config.vocab_size)
  ref = divergence.reference(metric, logits)
  return jnp.zeros((logits.shape[0], 1), jnp.float32) if ref is None else ref


def prefix_program(graphdef, params, prefix, h0, keep_flat, first):
  """The prefix cache `[2L, N, T, D]` (`prefix`, donated) recomputed from sublayer `first`
  (`int32 []`) on, from h0 `[N, T, D]` if 0, for the model with sublayers `keep_flat`
  (`bool [2L]`). Row j holds the stream entering sublayer j."""
  layers = _model(graphdef, params).layers
  positions = np.arange(h0.shape[1])
  h = jnp.where(first == 0, h0, prefix[first])

  def body(j, carry):
    h, prefix = carry
    return layers.sublayer(j, h, positions, keep_flat[j]), prefix.at[j].set(h)

  return jax.lax.fori_loop(first, prefix.shape[0], body, (h, prefix))[1]


def score_chunks(config: ProgramConfig, params, prefix, states, calibration: Calibration,
                 keep_flat, sequences, best, plan: ChunkPlan):
  """One device's chunks, in plan order, on calibration sequences `sequences[0] ..
  sequences[1]-1` (`int32 [2]`), adding to `plan.partial`; `best` (`float32 []`) is the best
  complete score known before.

  prefix: `[2L, N, T, D]` from `prefix_program`; states: this device's kept states
  `[slots, num_states, N, T, D]`; keep_flat: `bool [2L]`, the current model's sublayers.
  Returns `(scores float32 [chunks, W], the sequence each entry stopped at int32 [chunks, W],
  states)`.
  """
  model = _model(config.graphdef, params)
  n, t, pb = config.num_sequences, config.seq_len, config.position_block
  num_sub, every, reuse = prefix.shape[0], config.state_every, config.num_states > 0
  positions = np.arange(t)
  width = plan.slot.shape[-1]
  rows = lambda x: x[:, None, None]  # a per-candidate flag against [W, T, D]

  def suffix(h, states, slot, resume, g):
    """Sequence g of each candidate (h `[W, T, D]`) through the sublayers from its restart point
    on, keeping its states at every `every`-th boundary on the way."""

    def body(j, carry):
      h, states = carry
      if reuse:
        def keep_state(states):
          old = states[slot, j // every, g]
          return states.at[slot, j // every, g].set(jnp.where(rows(j >= resume), h, old))
        states = jax.lax.cond(j % every == 0, keep_state, lambda s: s, states)
      run = lambda x: model.layers.sublayer(j, x[None], positions, keep_flat[j])[0]
      return jnp.where(rows(j >= resume), jax.vmap(run)(h), h), states

    return jax.lax.fori_loop(jnp.min(resume), num_sub, body, (h, states))

  def sequence_score(h, g):
    """Sequence g's weighted divergence per candidate, the LM head fused per position block."""

    def block(i, acc):
      at = g * t + i * pb
      piece = lambda x: jax.lax.dynamic_slice_in_dim(x, at, pb)
      logits = model.logits(jax.lax.dynamic_slice_in_dim(h, i * pb, pb, axis=1))
      return acc + divergence.weighted_sum(config.metric, piece(calibration.reference), logits,
                                           piece(calibration.targets)[None],
                                           piece(calibration.weights))

    return jax.lax.fori_loop(0, t // pb, block, jnp.zeros((width,), jnp.float32))

  def chunk(carry, entry: ChunkPlan):
    states, best = carry
    limit = best if config.bound else jnp.inf

    def more(carry):  # sequences left, and some candidate of the chunk can still be the argmin
      g, acc, _ = carry
      return (g < sequences[1]) & jnp.any(acc <= limit)

    def one_sequence(carry):
      g, acc, states = carry
      h = _take_rows(prefix, entry.start, g)
      if reuse:
        kept = _take_rows(states, entry.slot, entry.state_index[:, g], g)
        h = jnp.where(rows(entry.from_state[:, g]), kept, h)
      h, states = suffix(h, states, entry.slot, entry.resume[:, g], g)
      return g + 1, acc + sequence_score(h, g), states

    def compute(operands):
      states, best = operands
      done, scores, states = jax.lax.while_loop(more, one_sequence,
                                                (sequences[0], entry.partial, states))
      if config.bound:
        best = jnp.minimum(best, jnp.min(jnp.where(entry.valid & (done == n), scores, jnp.inf)))
      return (states, best), (scores, jnp.full((width,), done))

    def skip(operands):  # padding only
      return operands, (entry.partial, jnp.full((width,), sequences[0]))

    (states, best), out = jax.lax.cond(jnp.any(entry.valid), compute, skip, (states, best))
    if config.bound and config.axis is not None:
      best = jax.lax.pmin(best, config.axis)
    return (states, best), out

  (states, _), (scores, done) = jax.lax.scan(chunk, (states, best), plan)
  return scores, done, states


def _take_rows(x, *index):
  """`x[index[0][i], index[1][i], ...]` for each i, as dynamic slices: each index a `[W]` vector or
  a scalar (shared). Not a gather: XLA:TPU splits a gather's operand into copies."""
  width = max(jnp.shape(i)[0] for i in index if jnp.ndim(i))
  k = len(index)
  out = []
  for w in range(width):
    start = tuple(i[w] if jnp.ndim(i) else i for i in index) + (0,) * (x.ndim - k)
    out.append(jax.lax.dynamic_slice(x, start, (1,) * k + x.shape[k:]).reshape(x.shape[k:]))
  return jnp.stack(out)
