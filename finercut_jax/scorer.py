"""The scoring engine: the divergence of every removal candidate from the dense model, in one
compiled program per greedy step.

How a step is computed (DESIGN.md section 3), every shortcut exact:
- Prefix reuse. Removing candidate c (sublayers `[start_c, resume_c)`) from the current pruned
  model leaves the residual stream unchanged up to `start_c`. One pass of the current model caches
  the stream at every sublayer boundary (`prefix`, `[2L, N, T, D]`); candidate c starts from the
  cached input of `start_c` and runs only sublayers `resume_c .. 2L-1`. After a removal at s*, the
  cache is only recomputed from s* on.
- Reuse across steps. Each candidate's own stream is also kept at every `state_every`-th sublayer
  boundary. After the greedy step removes s*, candidate c's model differs from last step's only
  from s* on, so c restarts from its latest kept state at or before s*. FinerCut removes deep
  sublayers first, so most candidates then run only a few sublayers.
- Early termination. Every metric is a sum of non-negative per-position terms, so a partial sum is
  a lower bound of the score. Candidates on a device are scored most-promising first; once a
  candidate's partial sum exceeds the best complete score seen on its device, it cannot be the
  argmin and its remaining position blocks are skipped (the search only needs the argmin). Its
  score is then reported as a lower bound (`complete=False`). `bound=False` scores everything.
- Batching. Candidates are spread over the devices of the mesh's `cand` axis and cut into chunks of
  `chunk_width`; a chunk is one `jax.vmap` over its candidates and runs sublayers from its smallest
  restart point on (each candidate's state only changes past its own).
- Skipping. Which sublayers are removed is shared by the whole batch, so a removed sublayer is a
  `lax.switch` branch that is never executed, not a multiplication by zero; chunks that hold only
  padding are skipped the same way.
- Fusion. The final norm, LM head, log-softmax and divergence run per block of positions, so the
  largest logits array is `[chunk_width, position_block, V]`; `[C, N, T, V]` never exists. The dense
  model's side (log-probabilities or logits, by metric) is computed once per search.
- Fixed shapes. The number of candidate slots is fixed for a search, so every step reuses one
  compiled program.

Backends: `jit` (default) runs `jax.shard_map` over the `cand` axis inside `jax.jit`, parameters
replicated over `cand` and sharded over `model` by the rules of `sharding.py`. `pmap` runs the same
per-device program under `jax.pmap` (replicated parameters only): since JAX 0.8 `jax.pmap` is a
wrapper over `jit(shard_map)` in maintenance mode, which is why it is not the default.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from finercut_jax import divergence
from finercut_jax.config import LlamaConfig
from finercut_jax.model import (Params, apply_sublayer, embed, final_logits, layer_params,
                                rope_tables, run_layers)
from finercut_jax.sharding import CAND, MODEL, logical_spec, make_mesh, replicated, shard_params

BACKENDS = ("jit", "pmap")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """Removing sublayers `start .. resume-1` (one sublayer, or both sublayers of a block)."""
  start: int
  resume: int


@dataclasses.dataclass
class StepStats:
  """What one scoring call did: sublayer evaluations against the naive count, time, FLOP/s."""
  evaluations: int
  naive_evaluations: int
  seconds: float
  flops: float
  head_fraction: float = 1.0  # share of candidates' LM-head position blocks actually computed

  @property
  def flops_per_second(self) -> float:
    return self.flops / max(self.seconds, 1e-12)

  def as_dict(self) -> dict:
    return {"evaluations": self.evaluations, "naive_evaluations": self.naive_evaluations,
            "evaluation_fraction": self.evaluations / max(self.naive_evaluations, 1),
            "head_fraction": self.head_fraction, "seconds": self.seconds, "flops": self.flops,
            "flops_per_second": self.flops_per_second}


def sublayer_flops(cfg: LlamaConfig, num_sequences: int, seq_len: int) -> tuple[float, float, float]:
  """Forward FLOPs of one attention sublayer, one FFN sublayer and the LM head on N x T tokens."""
  tokens = num_sequences * seq_len
  d, hd = cfg.hidden_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  # Projections, plus QK^T and AV over the causal half of the T x T scores.
  attn = 2 * tokens * d * (2 * q + 2 * kv) + 2 * num_sequences * seq_len * seq_len * cfg.num_heads * hd
  ffn = 6 * tokens * d * cfg.intermediate_size
  head = 2 * tokens * d * cfg.vocab_size
  return float(attn), float(ffn), float(head)


class Scorer:
  """Scores removal candidates of a model on a fixed calibration set.

  `scores, stats = scorer.score(keep, candidates)` with `keep` `[L, 2]` the current pruned model
  and `candidates` a list of `Candidate`: `scores[i]` is the metric of the model with candidate i
  removed as well. `score_step` is the search's form, with early termination.
  """

  def __init__(self, params: Params, cfg: LlamaConfig, tokens: np.ndarray, *, metric: str = "js",
               chunk_width: int = 1, position_block: int = 512, mesh=None, backend: str = "jit",
               max_candidates: int | None = None, reuse_states: bool = True,
               state_every: int = 2, dtype=None):
    self.cfg = cfg
    self.metric = divergence.check_metric(metric)
    if backend not in BACKENDS:
      raise ValueError(f"unknown scorer backend {backend!r}; choose one of {BACKENDS}")
    if chunk_width < 1 or state_every < 1:
      raise ValueError(f"chunk_width and state_every must be >= 1, got {chunk_width}, {state_every}")
    self.backend = backend
    self.mesh = mesh if mesh is not None else make_mesh(cand=1, model=1)
    if backend == "pmap" and self.mesh.shape[MODEL] != 1:
      raise ValueError("the pmap backend needs replicated parameters (model axis 1); use backend='jit'")
    self.tokens = np.asarray(tokens, np.int32)
    n, t = self.tokens.shape
    self.positions = n * t
    self.position_block = _largest_divisor_at_most(self.positions, position_block)
    self.num_blocks = self.positions // self.position_block
    self.chunk_width = chunk_width
    self.num_sublayers = cfg.num_sublayers
    self.dtype = dtype or params["embed"].dtype
    self.params = shard_params(params, self.mesh, cfg)
    self._flops = sublayer_flops(cfg, n, t)

    d = self.mesh.shape[CAND]
    self.slots_per_device = math.ceil((max_candidates or self.num_sublayers) / d)
    self.num_chunks = math.ceil(self.slots_per_device / chunk_width)
    self.state_every = state_every
    self.num_states = math.ceil(self.num_sublayers / state_every) if reuse_states else 0
    state_shape = (d, self.slots_per_device, self.num_states, n, t, cfg.hidden_size)
    state_bytes = math.prod(state_shape) * jnp.dtype(self.dtype).itemsize
    if reuse_states:
      logging.info("scorer keeps %.2f GB of candidate states (%.2f GB per device)",
                   state_bytes / 1e9, state_bytes / d / 1e9)

    rep = replicated(self.mesh)
    cand_sharding = NamedSharding(self.mesh, P(CAND))
    self.h0 = jax.device_put(embed(self.params, jnp.asarray(self.tokens), self.dtype), rep)
    targets, weights = divergence.position_weights(self.metric, self.tokens, cfg.vocab_size)
    self.targets = jax.device_put(targets, rep)
    self.weights = jax.device_put(weights, rep)
    ref_width = 1 if divergence.reference(self.metric, jnp.zeros((1, 1))) is None else cfg.vocab_size
    ref_sharding = NamedSharding(self.mesh, logical_spec(("positions", "vocab"),
                                                         (self.positions, ref_width), self.mesh))
    self.reference = jax.jit(self._reference, out_shardings=ref_sharding)(self.params, self.h0)
    self._prefix_fn = jax.jit(self._prefix_program, out_shardings=rep, donate_argnums=(1,))
    self.prefix = jax.jit(lambda: jnp.zeros((self.num_sublayers, n, t, cfg.hidden_size),
                                            self.dtype), out_shardings=rep)()
    self.states = jax.jit(lambda: jnp.zeros(state_shape, self.dtype),
                          out_shardings=cand_sharding)()
    self._programs = {}

    # Host bookkeeping of what the device caches hold (see `_invalidate`).
    self._keep = None  # the keep mask the caches were computed for
    self._prefix_valid = -1  # prefix[j] is current for j <= this
    self._slot_of: dict[Candidate, int] = {}
    self._states_valid = np.full(d * self.slots_per_device, -1)  # states valid up to sublayer

  # ------------------------------------------------------------------ device programs

  def _reference(self, params, h0):
    h = run_layers(params, self.cfg, h0)
    logits = final_logits(params, h, self.cfg).reshape(self.positions, -1)
    ref = divergence.reference(self.metric, logits)
    return jnp.zeros((self.positions, 1), jnp.float32) if ref is None else ref

  def _prefix_program(self, params, prefix, h0, keep_flat, first):
    """Recomputes the prefix cache from sublayer `first` on (from the embeddings if 0)."""
    rope = rope_tables(self.cfg, self.tokens.shape[1])
    h = jnp.where(first == 0, h0, prefix[first])

    def body(j, carry):
      h, prefix = carry
      prefix = prefix.at[j].set(h)
      lp = layer_params(params, j // 2)
      return apply_sublayer(lp, j % 2, h, rope, self.cfg, keep_flat[j]), prefix

    return jax.lax.fori_loop(first, self.num_sublayers, body, (h, prefix))[1]

  def _device_program(self, bound, params, prefix, states, reference, targets, weights, keep_flat,
                      slot, start, resume, from_state, state_index, valid):
    """One device's candidates, chunks `[chunks, W]` in scoring order.

    Returns (scores, position blocks computed, updated states).
    """
    cfg, metric = self.cfg, self.metric
    num_sub, pb, nb = self.num_sublayers, self.position_block, self.num_blocks
    every, reuse = self.state_every, self.num_states > 0
    n, t = self.tokens.shape
    rope = rope_tables(cfg, t)
    width = slot.shape[-1]
    column = lambda x: x[:, None, None, None]

    def suffix(h, states, slot, resume):
      """Runs sublayers j >= each candidate's restart point, keeping states along the way."""

      def body(j, carry):
        h, states = carry
        if reuse:
          def keep_state(states):
            old = states[slot, j // every]
            return states.at[slot, j // every].set(jnp.where(column(j >= resume), h, old))
          states = jax.lax.cond(j % every == 0, keep_state, lambda s: s, states)
        lp = layer_params(params, j // 2)
        run = lambda x: apply_sublayer(lp, j % 2, x, rope, cfg, keep_flat[j])
        return jnp.where(column(j >= resume), jax.vmap(run)(h), h), states

      return jax.lax.fori_loop(jnp.min(resume), num_sub, body, (h, states))

    def divergence_until(h, best):
      """Sums position blocks until done, or until every candidate's sum exceeds `best`."""
      h = h.reshape(width, n * t, -1)

      def more(carry):
        i, acc = carry
        return (i < nb) & jnp.any(acc <= best)

      def block(carry):
        i, acc = carry
        hb = jax.lax.dynamic_slice_in_dim(h, i * pb, pb, axis=1)
        logits = final_logits(params, hb, cfg)  # [W, pb, V] float32
        ref = jax.lax.dynamic_slice_in_dim(reference, i * pb, pb)
        tb = jax.lax.dynamic_slice_in_dim(targets, i * pb, pb)
        wb = jax.lax.dynamic_slice_in_dim(weights, i * pb, pb)
        terms = divergence.position_terms(metric, ref[None], logits, tb[None])
        return i + 1, acc + jnp.sum(terms * wb[None], axis=-1)

      return jax.lax.while_loop(more, block, (0, jnp.zeros((width,), jnp.float32)))

    def chunk(carry, xs):
      states, best = carry
      slot, start, resume, from_state, state_index, ok = xs

      def compute(operands):
        states, best = operands
        h = prefix[start]
        if reuse:
          h = jnp.where(column(from_state), states[slot, state_index], h)
        h, states = suffix(h, states, slot, resume)
        blocks, scores = divergence_until(h, best if bound else jnp.inf)
        if bound:
          done = ok & (blocks == nb)
          best = jnp.minimum(best, jnp.min(jnp.where(done, scores, jnp.inf)))
        return (states, best), (scores, jnp.full((width,), blocks))

      def skip(operands):  # all padding
        return operands, (jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.int32))

      return jax.lax.cond(jnp.any(ok), compute, skip, (states, best))

    (states, _), (scores, blocks) = jax.lax.scan(
        chunk, (states, jnp.float32(jnp.inf)),
        (slot, start, resume, from_state, state_index, valid))
    return scores, blocks, states

  def _program(self, bound: bool):
    if bound in self._programs:
      return self._programs[bound]
    local = lambda *args: self._device_program(bound, *args)
    if self.backend == "pmap":
      devices = self.mesh.devices[:, 0].tolist()
      fn = jax.pmap(local, in_axes=(None, None, 0) + (None,) * 4 + (0,) * 6, devices=devices,
                    donate_argnums=(2,))
    else:
      def per_device(*args):
        # shard_map hands each device its [1, ...] block of the cand-sharded arrays.
        squeeze = lambda x: x[0]
        args = list(args)
        args[2] = squeeze(args[2])
        args[7:] = [squeeze(a) for a in args[7:]]
        return jax.tree.map(lambda x: x[None], local(*args))

      cand = P(CAND)
      mapped = jax.shard_map(per_device, mesh=self.mesh,
                             in_specs=(P(), P(), cand) + (P(),) * 4 + (cand,) * 6,
                             out_specs=(cand, cand, cand), axis_names={CAND}, check_vma=False)
      fn = jax.jit(mapped, donate_argnums=(2,))
    self._programs[bound] = fn
    return fn

  # ------------------------------------------------------------------ host side

  @property
  def cand_devices(self) -> int:
    return self.mesh.shape[CAND]

  def _invalidate(self, keep_flat: np.ndarray) -> None:
    """Marks what the caches still hold for the new mask: if sublayers were only removed (a
    greedy step), everything before the first newly removed one is unchanged; else nothing."""
    if self._keep is None or np.any(keep_flat & ~self._keep):
      self._prefix_valid = -1
      self._states_valid[:] = -1
    elif np.any(self._keep & ~keep_flat):
      first = int(np.flatnonzero(self._keep & ~keep_flat)[0])
      self._prefix_valid = min(self._prefix_valid, first)
      np.minimum(self._states_valid, first, out=self._states_valid)
    self._keep = keep_flat.copy()

  def _slots(self, candidates: list[Candidate]) -> np.ndarray:
    """Stable slot (and so device and kept states) for each candidate."""
    capacity = self.cand_devices * self.slots_per_device
    if len(candidates) > capacity:
      raise ValueError(f"{len(candidates)} candidates exceed the scorer's {capacity} slots; "
                       f"construct it with max_candidates={len(candidates)}")
    new = [c for c in candidates if c not in self._slot_of]
    if len(self._slot_of) + len(new) > capacity:  # unknown candidates: start the table over
      self._slot_of = {}
      self._states_valid[:] = -1
      new = list(candidates)
    for c in new:
      self._slot_of[c] = len(self._slot_of)
    return np.asarray([self._slot_of[c] for c in candidates])

  def layout(self, candidates: list[Candidate], slots: np.ndarray, priority: np.ndarray):
    """Per-device chunk arrays `[devices, chunks, W]`, in scoring order, padding repeated.

    Returns `(index, arrays)`: index holds each entry's position in `candidates` (-1: padding).
    """
    d, w, every = self.cand_devices, self.chunk_width, self.state_every
    restart = np.asarray([c.resume for c in candidates])
    from_state = np.zeros(len(candidates), bool)
    if self.num_states:
      for i, (c, s) in enumerate(zip(candidates, slots)):
        # The latest kept state at or before what is still current for this candidate.
        k = (min(self._states_valid[s], self.num_sublayers - 1) // every) * every
        if k >= c.resume:
          restart[i], from_state[i] = k, True
    index = np.full((d, self.num_chunks, w), -1)
    for dev in range(d):
      mine = np.flatnonzero(slots % d == dev)
      # Chunks of similar restart points (a chunk runs from its smallest), most promising first.
      mine = mine[np.argsort(restart[mine], kind="stable")]
      chunks = [mine[i:i + w] for i in range(0, len(mine), w)]
      chunks.sort(key=lambda ch: priority[ch].min())
      for k, ch in enumerate(chunks):
        index[dev, k, :len(ch)] = ch
    valid = index >= 0
    # Padding repeats a real entry of its chunk (never lowering its restart point); chunks of
    # padding only are skipped on the device.
    filled = np.where(valid, index, np.maximum(index.max(axis=-1, keepdims=True), 0))
    take = lambda a: np.asarray(a)[filled]
    arrays = dict(slot=take(slots // d).astype(np.int32),
                  start=take([c.start for c in candidates]).astype(np.int32),
                  resume=take(restart).astype(np.int32), from_state=take(from_state),
                  state_index=(take(restart) // every).astype(np.int32), valid=valid)
    return index, arrays

  def score_step(self, keep: np.ndarray, candidates: list[Candidate], *, bound: bool = True,
                 priority=None):
    """Scores candidates; returns `(scores, complete, stats)`.

    With `bound`, a candidate that provably cannot be the argmin stops early: its score is then
    a lower bound and `complete` is False for it. `priority` (lower first) orders the scoring;
    by default the deepest candidates, usually the best, go first.
    """
    if not candidates:
      raise ValueError("no candidates to score")
    keep_flat = np.asarray(keep, bool).reshape(-1)
    if keep_flat.size != self.num_sublayers:
      raise ValueError(f"keep mask has {keep_flat.size} entries, the model {self.num_sublayers}")
    priority = (np.asarray(priority, np.float64) if priority is not None
                else -np.asarray([c.start for c in candidates], np.float64))
    begin = time.perf_counter()
    self._invalidate(keep_flat)
    prefix_first = max(self._prefix_valid, 0)
    prefix_evaluations = int(keep_flat[prefix_first:].sum()) if self._prefix_valid < self.num_sublayers else 0
    if self._prefix_valid < self.num_sublayers:
      self.prefix = self._prefix_fn(self.params, self.prefix, self.h0, jnp.asarray(keep_flat),
                                    jnp.int32(prefix_first if self._prefix_valid >= 0 else 0))
      self._prefix_valid = self.num_sublayers
    slots = self._slots(candidates)
    index, arrays = self.layout(candidates, slots, priority)
    names = ("slot", "start", "resume", "from_state", "state_index", "valid")
    common = (self.params, self.prefix)
    rest = (self.reference, self.targets, self.weights, jnp.asarray(keep_flat))
    if self.backend == "pmap":
      out = self._program(bound)(*common, self.states, *rest, *(arrays[k] for k in names))
    else:
      sharding = NamedSharding(self.mesh, P(CAND))
      out = self._program(bound)(*common, self.states, *rest,
                                 *(jax.device_put(arrays[k], sharding) for k in names))
    scores_dev, blocks_dev, self.states = out
    scores_dev = np.asarray(jax.device_get(scores_dev), np.float64)
    blocks_dev = np.asarray(jax.device_get(blocks_dev))
    seconds = time.perf_counter() - begin
    self._states_valid[slots] = self.num_sublayers

    valid = arrays["valid"]
    scores = np.full(len(candidates), np.nan)
    blocks = np.zeros(len(candidates), np.int64)
    scores[index[valid]] = scores_dev[valid]
    blocks[index[valid]] = blocks_dev[valid]
    if not np.all(np.isfinite(scores)):
      bad = [candidates[i] for i in np.flatnonzero(~np.isfinite(scores))]
      raise FloatingPointError(f"non-finite scores for candidates {bad[:4]}: the model produces "
                               f"NaN/inf (check the checkpoint and the dtype)")
    complete = blocks == self.num_blocks
    stats = self._account(keep_flat, arrays, blocks_dev, prefix_first, prefix_evaluations,
                          len(candidates), seconds)
    return scores, complete, stats

  def score(self, keep: np.ndarray, candidates: list[Candidate]) -> tuple[np.ndarray, StepStats]:
    """Exact scores of every candidate."""
    scores, _, stats = self.score_step(keep, candidates, bound=False)
    return scores, stats

  def _account(self, keep_flat, arrays, blocks, prefix_first, prefix_evaluations, count, seconds):
    """Sublayer applications and FLOPs the programs performed: each chunk runs all its slots
    from its smallest restart point; the LM head for the position blocks it computed."""
    attn, ffn, head = self._flops
    per = np.where(np.arange(self.num_sublayers) % 2 == 0, attn, ffn) * keep_flat
    flops_from = np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
    kept_from = np.concatenate([np.cumsum(keep_flat[::-1])[::-1], [0]])
    w = self.chunk_width
    evaluations, flops = prefix_evaluations, float(flops_from[prefix_first]) if prefix_evaluations else 0.0
    head_blocks = 0
    for r, ok, b in zip(arrays["resume"].reshape(-1, w), arrays["valid"].reshape(-1, w),
                        blocks.reshape(-1, w)):
      if ok.any():
        evaluations += w * int(kept_from[r.min()])
        flops += w * (flops_from[r.min()] + head * b[0] / self.num_blocks)
        head_blocks += w * int(b[0])
    return StepStats(evaluations=evaluations, naive_evaluations=count * self.num_sublayers,
                     seconds=seconds, flops=flops,
                     head_fraction=head_blocks / max(count * self.num_blocks, 1))


def _largest_divisor_at_most(n: int, limit: int) -> int:
  for d in range(min(n, max(limit, 1)), 0, -1):
    if n % d == 0:
      return d
  return 1
