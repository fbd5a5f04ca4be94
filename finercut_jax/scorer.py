"""The scoring engine: the divergence of every removal candidate from the dense model, in one
compiled program per greedy step.

How a step is computed (DESIGN.md section 3), every shortcut exact:
- Prefix reuse. Removing candidate c (sublayers `[start_c, resume_c)`) from the current pruned
  model leaves the residual stream unchanged up to `start_c`. One pass of the current model caches
  the stream at every sublayer boundary (`prefix`, `[2L, N, T, D]`); candidate c starts from the
  cached input of `start_c` and runs only sublayers `resume_c .. 2L-1`. After a removal at s*, the
  cache is only recomputed from s* on.
- Reuse across steps. Each candidate's own stream is also kept at every `state_every`-th sublayer
  boundary (coarser if that would exceed `state_memory` bytes per device). After the greedy step removes s*, candidate c's model differs from last step's only
  from s* on, so c restarts from its latest kept state at or before s*. FinerCut removes deep
  sublayers first, so most candidates then run only a few sublayers.
- Early termination. Every metric is a sum of non-negative per-position terms, so a partial sum is
  a lower bound of the score. A candidate runs its calibration sequences one after another (its
  suffix sublayers, then the LM head and divergence, per sequence); candidates on a device are
  scored most-promising first, and once a candidate's partial sum exceeds the best complete score
  seen on its device it cannot be the argmin, so its remaining sequences are skipped: sublayers
  and LM head both (the search only needs the argmin). Its score is then reported as a lower bound
  (`complete=False`) and its kept states stay current only for the sequences it ran. `bound=False`
  scores everything.
- Batching. Candidates are spread over the devices of the mesh's `cand` axis and cut into chunks of
  `chunk_width`; a chunk is one `jax.vmap` over its candidates and runs sublayers from its smallest
  restart point on (each candidate's state only changes past its own).
- Skipping. Which sublayers are removed is shared by the whole batch, so a removed sublayer is a
  `lax.switch` branch that is never executed, not a multiplication by zero; chunks that hold only
  padding are skipped the same way.
- Fusion. The final norm, LM head, log-softmax and divergence run per block of positions of a
  sequence, so the largest logits array is `[chunk_width, position_block, V]`; `[C, N, T, V]` never
  exists. The dense model's side (log-probabilities or logits, by metric) is computed once per
  search.
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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from finercut_jax import distributed, divergence
from finercut_jax.config import LlamaConfig
from finercut_jax.model import Llama
from finercut_jax.sharding import CAND, MODEL, logical_spec, make_mesh, replicated, shard_state

BACKENDS = ("jit", "pmap")
# The per-chunk arrays of `Scorer.layout`, in the device program's argument order.
CHUNK_ARRAYS = ("slot", "start", "resume", "from_state", "state_index", "partial", "valid")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """Removing sublayers `start .. resume-1` (one sublayer, or both sublayers of a block)."""
  start: int
  resume: int

  @property
  def name(self) -> str:
    """`attn3`, `ffn3` or `block3`."""
    block, kind = divmod(self.start, 2)
    return f"block{block}" if self.resume - self.start == 2 else f"{('attn', 'ffn')[kind]}{block}"


class NonFiniteError(ValueError):
  """The model's outputs are NaN or infinite, so no score means anything."""


@dataclasses.dataclass
class StepStats:
  """What one scoring call did: sublayer evaluations (one sublayer applied to one calibration
  sequence) against the naive count (every candidate a full forward of every sequence), time,
  FLOP/s, and the share of (candidate, sequence) pairs computed before early termination."""
  evaluations: int
  naive_evaluations: int
  seconds: float
  flops: float
  sequence_fraction: float = 1.0

  @property
  def flops_per_second(self) -> float:
    return self.flops / max(self.seconds, 1e-12)

  def as_dict(self) -> dict:
    return {"evaluations": self.evaluations, "naive_evaluations": self.naive_evaluations,
            "evaluation_fraction": self.evaluations / max(self.naive_evaluations, 1),
            "sequence_fraction": self.sequence_fraction, "seconds": self.seconds, "flops": self.flops,
            "flops_per_second": self.flops_per_second}


def sublayer_flops(cfg: LlamaConfig, num_sequences: int, seq_len: int) -> tuple[float, float, float]:
  """Forward FLOPs of one attention sublayer, one FFN sublayer and the LM head on N x T tokens."""
  tokens = num_sequences * seq_len
  d, hd = cfg.hidden_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  # Projections, plus QK^T and AV over the causal half of the T x T scores.
  attn = 2 * tokens * d * (2 * q + 2 * kv) + 2 * num_sequences * seq_len * seq_len * cfg.num_heads * hd
  ffn = tokens * cfg.ffn_flops_per_token(computed=True)
  head = 2 * tokens * d * cfg.vocab_size
  return float(attn), float(ffn), float(head)


class Scorer:
  """Scores removal candidates of a `Llama` on a fixed calibration set.

  `scores, stats = scorer.score(keep, candidates)` with `keep` `[L, 2]` the current pruned model
  and `candidates` a list of `Candidate`: `scores[i]` is the metric of the model with candidate i
  removed as well. `score_step` is the search's form, with early termination.
  """

  def __init__(self, model: Llama, tokens: np.ndarray, *, metric: str = "js",
               chunk_width: int = 1, position_block: int = 512, mesh=None, backend: str = "jit",
               max_candidates: int | None = None, state_every: int = 2,
               state_memory: float = 2 * 2**30):
    self.cfg = cfg = model.config
    self.metric = divergence.check_metric(metric)
    if backend not in BACKENDS:
      raise ValueError(f"unknown scorer backend {backend!r}; choose one of {BACKENDS}")
    if chunk_width < 1 or state_every < 1:
      raise ValueError(f"chunk_width and state_every must be >= 1, got {chunk_width}, {state_every}")
    self.backend = backend
    self.mesh = mesh if mesh is not None else make_mesh(cand=1, model=1)
    if backend == "pmap" and (self.mesh.shape[MODEL] != 1 or jax.process_count() > 1):
      raise ValueError("the pmap backend needs replicated parameters (model axis 1) on one "
                       "process; use backend='jit'")
    self.tokens = np.asarray(tokens, np.int32)
    n, t = self.tokens.shape
    self.positions = n * t
    self.position_block = _largest_divisor_at_most(t, position_block)
    self.chunk_width = chunk_width
    self.num_sublayers = cfg.num_sublayers
    self.dtype = model.compute_dtype
    # The device programs run the model's own modules: `nnx.merge(self.graphdef, state)` inside
    # them, with the state (its parameters) sharded over the mesh.
    self.graphdef, state = nnx.split(model)
    # An abstract model (`jax.ShapeDtypeStruct` leaves) makes an abstract scorer: nothing is
    # computed or allocated, and `lower()` gives its programs for ahead-of-time compilation.
    self.abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    self.params = shard_state(state, self.mesh, cfg)
    self._flops = sublayer_flops(cfg, n, t)

    d = self.mesh.shape[CAND]
    self.slots_per_device = math.ceil((max_candidates or self.num_sublayers) / d)
    self.num_chunks = math.ceil(self.slots_per_device / chunk_width)
    # Kept states: N*T*D per candidate slot and kept boundary, at most `state_memory` per device.
    one_state = n * t * cfg.hidden_size * jnp.dtype(self.dtype).itemsize
    fit = int(state_memory // (one_state * self.slots_per_device))
    self.num_states = min(math.ceil(self.num_sublayers / state_every), fit)
    self.state_every = math.ceil(self.num_sublayers / self.num_states) if self.num_states else 1
    if self.num_states:  # only the levels that spacing uses (e.g. 23, not 25, every 7 of 160)
      self.num_states = math.ceil(self.num_sublayers / self.state_every)
    state_shape = (d, self.slots_per_device, self.num_states, n, t, cfg.hidden_size)
    if self.num_states:
      logging.info("scorer keeps candidate states every %d sublayers: %.2f GB per device",
                   self.state_every, self.num_states * self.slots_per_device * one_state / 1e9)
    else:
      logging.info("scorer keeps no candidate states: one per candidate slot would need %.2f GB "
                   "per device, over state_memory", one_state * self.slots_per_device / 1e9)

    rep = replicated(self.mesh)
    cand_sharding = NamedSharding(self.mesh, P(CAND))
    self.h0 = self._build(lambda p: self._model(p).embed_tokens(jnp.asarray(self.tokens)), rep,
                          self.params)
    self.targets, self.weights = (
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) if self.abstract
        else jax.device_put(a, rep)
        for a in divergence.position_weights(self.metric, self.tokens, cfg.vocab_size))
    ref_width = 1 if divergence.reference(self.metric, jnp.zeros((1, 1))) is None else cfg.vocab_size
    ref_sharding = NamedSharding(self.mesh, logical_spec(("positions", "vocab"),
                                                         (self.positions, ref_width), self.mesh))
    self._reference_fn = jax.jit(self._reference, out_shardings=ref_sharding)
    self.reference = self._build(self._reference_fn, ref_sharding, self.params, self.h0)
    if not self.abstract:
      self._check_reference()
    self._prefix_fn = jax.jit(self._prefix_program, out_shardings=rep, donate_argnums=(1,))
    self.prefix = self._build(lambda: jnp.zeros((self.num_sublayers, n, t, cfg.hidden_size),
                                                self.dtype), rep)
    self.states = self._build(lambda: jnp.zeros(state_shape, self.dtype), cand_sharding)
    self._programs = {}

    # Host bookkeeping of what the device caches hold (see `_invalidate`).
    self._keep = None  # the keep mask the caches were computed for
    self._prefix_valid = -1  # prefix[j] is current for j <= this
    self._slot_of: dict[Candidate, int] = {}
    self._states_valid = np.full((d * self.slots_per_device, n), -1)  # per slot and sequence

  def _check_reference(self) -> None:
    """The dense model's outputs must be finite: NaN/inf there would make every score NaN (or,
    through a mask, 0), and the ordering meaningless."""
    bad = distributed.gather(jax.jit(lambda r: jnp.sum(~jnp.isfinite(r), axis=-1) > 0)(
        self.reference))
    if bad.any():
      n, t = self.tokens.shape
      first = int(np.flatnonzero(bad)[0])
      raise NonFiniteError(
          f"the dense model's outputs are NaN/inf at {int(bad.sum())} of {n * t} calibration "
          f"positions (first: sequence {first // t}, position {first % t}): its weights hold NaN/inf, "
          f"or the computation overflows in {jnp.dtype(self.dtype).name} (then run in float32: "
          f"--config.model.dtype=float32)")

  def _build(self, fn, sharding, *args):
    """`fn(*args)` computed into `sharding`; for an abstract scorer only its shape and sharding."""
    if self.abstract:
      out = jax.eval_shape(fn, *args)
      return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)
    return jax.jit(fn, out_shardings=sharding)(*args)

  def lower(self) -> dict[str, jax.stages.Lowered]:
    """The search's programs lowered for this scorer's shapes and shardings: `reference` (the
    dense pass, once per search), `prefix` (the current model's pass, once per step) and `step`
    (the candidates). With an abstract scorer this sizes a model this machine cannot hold:
    `lower()["step"].compile().memory_analysis()`."""
    if self.backend != "jit":
      raise ValueError("lower() is for the jit backend")
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    rep, cand = replicated(self.mesh), NamedSharding(self.mesh, P(CAND))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)
    keep = jax.ShapeDtypeStruct((self.num_sublayers,), jnp.bool_, sharding=rep)
    params, prefix, h0 = (jax.tree.map(abstract, x) for x in (self.params, self.prefix, self.h0))
    capacity = self.cand_devices * self.slots_per_device  # a full layout: every slot in use
    _, arrays = self.layout([Candidate(0, 1)] * capacity, np.arange(capacity), np.zeros(capacity))
    per_entry = [jax.ShapeDtypeStruct(arrays[k].shape, arrays[k].dtype, sharding=cand)
                 for k in CHUNK_ARRAYS]
    step_args = (params, prefix, abstract(self.states), abstract(self.reference),
                 abstract(self.targets), abstract(self.weights), keep,
                 jax.ShapeDtypeStruct((2,), jnp.int32, sharding=rep), scalar(jnp.float32))
    return {"reference": self._reference_fn.lower(params, h0),
            "prefix": self._prefix_fn.lower(params, prefix, h0, keep, scalar(jnp.int32)),
            "step": self._program(True).lower(*step_args, *per_entry)}

  # ------------------------------------------------------------------ device programs

  def _model(self, params) -> Llama:
    return nnx.merge(self.graphdef, params)

  def _reference(self, params, h0):
    model = self._model(params)
    h = model.layers(h0, np.arange(self.tokens.shape[1]))
    logits = model.logits(h).reshape(self.positions, -1)
    ref = divergence.reference(self.metric, logits)
    return jnp.zeros((self.positions, 1), jnp.float32) if ref is None else ref

  def _prefix_program(self, params, prefix, h0, keep_flat, first):
    """Recomputes the prefix cache from sublayer `first` on (from the embeddings if 0)."""
    layers, positions = self._model(params).layers, np.arange(self.tokens.shape[1])
    h = jnp.where(first == 0, h0, prefix[first])

    def body(j, carry):
      h, prefix = carry
      prefix = prefix.at[j].set(h)
      return layers.sublayer(j, h, positions, keep_flat[j]), prefix

    return jax.lax.fori_loop(first, self.num_sublayers, body, (h, prefix))[1]

  def _device_program(self, bound, params, prefix, states, reference, targets, weights, keep_flat,
                      sequences, best, slot, start, resume, from_state, state_index, partial,
                      valid):
    """One device's candidates, chunks `[chunks, W]` in scoring order (`resume`, `from_state` and
    `state_index` are per calibration sequence, `[chunks, W, N]`), on calibration sequences
    `sequences[0] .. sequences[1]-1`, adding to the `partial` sums of the sequences before; `best`
    is the best complete score known before the call.

    Returns (scores, the sequence each candidate stopped at, updated states).
    """
    metric = self.metric
    num_sub, pb = self.num_sublayers, self.position_block
    every, reuse = self.state_every, self.num_states > 0
    n, t = self.tokens.shape
    model, positions = self._model(params), np.arange(t)
    width = slot.shape[-1]
    rows = lambda x: x[:, None, None]  # a per-candidate flag against [W, T, D]

    def suffix(h, states, slot, resume, g):
      """Runs sequence g of each candidate (h `[W, T, D]`) through the sublayers from its restart
      point on, keeping its states along the way."""

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

    def sequence_terms(h, g):
      """The weighted sum of sequence g's per-position terms, LM head fused per position block."""

      def block(i, acc):
        at = g * t + i * pb
        logits = model.logits(jax.lax.dynamic_slice_in_dim(h, i * pb, pb, axis=1))
        ref = jax.lax.dynamic_slice_in_dim(reference, at, pb)
        tb = jax.lax.dynamic_slice_in_dim(targets, at, pb)
        wb = jax.lax.dynamic_slice_in_dim(weights, at, pb)
        terms = divergence.position_terms(metric, ref[None], logits, tb[None])
        return acc + jnp.sum(terms * wb[None], axis=-1)

      return jax.lax.fori_loop(0, t // pb, block, jnp.zeros((width,), jnp.float32))

    def chunk(carry, xs):
      states, best = carry
      slot, start, resume, from_state, state_index, partial, ok = xs
      limit = best if bound else jnp.inf

      def more(carry):  # sequences left, and some candidate can still be the argmin
        g, acc, _ = carry
        return (g < sequences[1]) & jnp.any(acc <= limit)

      def one_sequence(carry):
        g, acc, states = carry
        h = _take_rows(prefix, start, g)
        if reuse:
          h = jnp.where(rows(from_state[:, g]), _take_rows(states, slot, state_index[:, g], g), h)
        h, states = suffix(h, states, slot, resume[:, g], g)
        return g + 1, acc + sequence_terms(h, g), states

      def compute(operands):
        states, best = operands
        done, scores, states = jax.lax.while_loop(more, one_sequence,
                                                  (sequences[0], partial, states))
        if bound:
          best = jnp.minimum(best, jnp.min(jnp.where(ok & (done == n), scores, jnp.inf)))
        return (states, best), (scores, jnp.full((width,), done))

      def skip(operands):  # all padding
        return operands, (partial, jnp.full((width,), sequences[0]))

      return jax.lax.cond(jnp.any(ok), compute, skip, (states, best))

    (states, _), (scores, done) = jax.lax.scan(
        chunk, (states, best),
        (slot, start, resume, from_state, state_index, partial, valid))
    return scores, done, states

  def _program(self, bound: bool):
    if bound in self._programs:
      return self._programs[bound]
    local = lambda *args: self._device_program(bound, *args)
    if self.backend == "pmap":
      devices = self.mesh.devices[:, 0].tolist()
      fn = jax.pmap(local, in_axes=(None, None, 0) + (None,) * 6 + (0,) * 7, devices=devices,
                    donate_argnums=(2,))
    else:
      def per_device(*args):
        # shard_map hands each device its [1, ...] block of the cand-sharded arrays.
        squeeze = lambda x: x[0]
        args = list(args)
        args[2] = squeeze(args[2])
        args[9:] = [squeeze(a) for a in args[9:]]
        return jax.tree.map(lambda x: x[None], local(*args))

      cand = P(CAND)
      mapped = jax.shard_map(per_device, mesh=self.mesh,
                             in_specs=(P(), P(), cand) + (P(),) * 6 + (cand,) * 7,
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

  def layout(self, candidates: list[Candidate], slots: np.ndarray, partial: np.ndarray):
    """Per-device chunk arrays `[devices, chunks, W]` (`[..., N]` for the per-sequence restart
    arrays), lowest `partial` score first, padding repeated.

    Returns `(index, arrays)`: index holds each entry's position in `candidates` (-1: padding).
    """
    d, w, every = self.cand_devices, self.chunk_width, self.state_every
    n = self.tokens.shape[0]
    restart = np.repeat(np.asarray([c.resume for c in candidates])[:, None], n, axis=1)
    from_state = np.zeros(restart.shape, bool)
    if self.num_states:
      # The latest kept state at or before what is still current for this candidate and sequence.
      kept = (np.minimum(self._states_valid[slots], self.num_sublayers - 1) // every) * every
      from_state = kept >= restart
      restart = np.where(from_state, kept, restart)
    index = np.full((d, self.num_chunks, w), -1)
    for dev in range(d):
      mine = np.flatnonzero(slots % d == dev)
      # Chunks of similar restart points (a chunk runs from its smallest), most promising first.
      mine = mine[np.argsort(restart[mine, 0], kind="stable")]
      chunks = [mine[i:i + w] for i in range(0, len(mine), w)]
      chunks.sort(key=lambda ch: partial[ch].min())
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
                  state_index=(take(restart) // every).astype(np.int32),
                  partial=take(partial).astype(np.float32), valid=valid)
    return index, arrays

  def score_step(self, keep: np.ndarray, candidates: list[Candidate], *, bound: bool = True):
    """Scores candidates; returns `(scores, complete, stats)`.

    With `bound`, a candidate that provably cannot be the argmin stops early: its score is then
    a lower bound and `complete` is False for it. Scoring then runs in passes: every candidate's
    first calibration sequence (which every candidate needs anyway); then the other sequences,
    candidates in order of their first-sequence score, first only the most promising chunk of
    each device, so that the best of their complete scores bounds every device from the start,
    then the rest.
    """
    if self.abstract:
      raise ValueError("this scorer has abstract parameters (jax.ShapeDtypeStruct): it can only "
                       "be lowered (Scorer.lower), not run")
    if not candidates:
      raise ValueError("no candidates to score")
    keep_flat = np.asarray(keep, bool).reshape(-1)
    if keep_flat.size != self.num_sublayers:
      raise ValueError(f"keep mask has {keep_flat.size} entries, the model {self.num_sublayers}")
    n = self.tokens.shape[0]
    begin = time.perf_counter()
    self._invalidate(keep_flat)
    stats = StepStats(evaluations=0, naive_evaluations=len(candidates) * self.num_sublayers * n,
                      seconds=0.0, flops=0.0, sequence_fraction=0.0)
    if self._prefix_valid < self.num_sublayers:
      first = max(self._prefix_valid, 0)
      self.prefix = self._prefix_fn(self.params, self.prefix, self.h0, jnp.asarray(keep_flat),
                                    jnp.int32(first))
      self._prefix_valid = self.num_sublayers
      self._account_prefix(stats, keep_flat, first)
    slots = self._slots(candidates)
    scores = np.zeros(len(candidates))
    done = np.zeros(len(candidates), np.int64)  # the sequence each candidate stopped at
    best = np.inf
    for sequences, chunks in ([((0, 1), None), ((1, n), slice(0, 1)), ((1, n), slice(1, None))]
                              if bound and n > 1 else [((0, n), None)]):
      if chunks != slice(1, None):  # the last pass keeps the order of the one before
        index, arrays = self.layout(candidates, slots, scores)
      valid = arrays["valid"].copy()
      if chunks is not None:  # only these chunks of every device run in this pass
        in_pass = np.zeros_like(valid)
        in_pass[:, chunks] = True
        valid &= in_pass
      done_dev, scores_dev = self._run(bound, keep_flat, sequences, best, dict(arrays, valid=valid))
      scores[index[valid]] = scores_dev[valid]
      done[index[valid]] = done_dev[valid]
      # A stopped candidate's states are current only for the sequences it ran.
      ran = np.arange(n)[None, :] < done[:, None]
      self._states_valid[slots] = np.where(ran, self.num_sublayers, self._states_valid[slots])
      self._account_pass(stats, keep_flat, dict(arrays, valid=valid), done_dev, sequences[0])
      best = min(best, float(np.min(scores[done == n], initial=np.inf)))
    stats.seconds = time.perf_counter() - begin
    stats.sequence_fraction /= len(candidates) * n
    if not np.all(np.isfinite(scores)):
      bad = [candidates[i].name for i in np.flatnonzero(~np.isfinite(scores))]
      raise NonFiniteError(
          f"removing {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} gives non-finite "
          f"(NaN/inf) scores: the model's outputs overflow without them in "
          f"{jnp.dtype(self.dtype).name}; run in float32 (--config.model.dtype=float32)")
    return scores, done == n, stats

  def _run(self, bound: bool, keep_flat, sequences, best: float, arrays):
    """Runs the device program on a layout; returns (stop sequence, scores) `[devices, chunks, W]`."""
    args = (self.params, self.prefix, self.states, self.reference, self.targets, self.weights,
            jnp.asarray(keep_flat), jnp.asarray(sequences, jnp.int32), jnp.float32(best))
    if self.backend == "pmap":
      per_entry = [arrays[k] for k in CHUNK_ARRAYS]
    else:
      sharding = NamedSharding(self.mesh, P(CAND))
      per_entry = [jax.device_put(arrays[k], sharding) for k in CHUNK_ARRAYS]
    scores, done, self.states = self._program(bound)(*args, *per_entry)
    # On several processes each holds its own devices' entries: every process gathers all of them,
    # so the host-side choice is the same everywhere.
    return distributed.gather(done), distributed.gather(scores).astype(np.float64)

  def score(self, keep: np.ndarray, candidates: list[Candidate]) -> tuple[np.ndarray, StepStats]:
    """Exact scores of every candidate."""
    scores, _, stats = self.score_step(keep, candidates, bound=False)
    return scores, stats

  def _sublayer_flops_from(self, keep_flat):
    """Per sequence: FLOPs and sublayer count of running the kept sublayers from j on, `[2L+1]`."""
    attn, ffn, _ = self._flops
    per = np.where(np.arange(self.num_sublayers) % 2 == 0, attn, ffn) * keep_flat
    per = per / self.tokens.shape[0]
    flops_from = np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
    kept_from = np.concatenate([np.cumsum(keep_flat[::-1])[::-1], [0]])
    return flops_from, kept_from

  def _account_prefix(self, stats: StepStats, keep_flat, first: int) -> None:
    """The prefix pass: every sequence through the kept sublayers from `first` on."""
    n = self.tokens.shape[0]
    flops_from, kept_from = self._sublayer_flops_from(keep_flat)
    stats.evaluations += n * int(kept_from[first])
    stats.flops += n * float(flops_from[first])

  def _account_pass(self, stats: StepStats, keep_flat, arrays, done, seq_from: int) -> None:
    """Sublayer applications (one sublayer on one calibration sequence) and FLOPs of a pass: for
    each sequence it ran, a chunk runs all its slots from their smallest restart point, then the
    LM head."""
    n, w = self.tokens.shape[0], self.chunk_width
    head = self._flops[2] / n
    flops_from, kept_from = self._sublayer_flops_from(keep_flat)
    for r, ok, g in zip(arrays["resume"].reshape(-1, w, n), arrays["valid"].reshape(-1, w),
                        done.reshape(-1, w)):
      if ok.any():
        first = r[:, seq_from:g[0]].min(axis=0)  # the chunk's restart point per sequence it ran
        stats.evaluations += w * int(kept_from[first].sum())
        stats.flops += w * float(flops_from[first].sum() + head * len(first))
        stats.sequence_fraction += int(ok.sum()) * len(first)


def _largest_divisor_at_most(n: int, limit: int) -> int:
  for d in range(min(n, max(limit, 1)), 0, -1):
    if n % d == 0:
      return d
  return 1


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
