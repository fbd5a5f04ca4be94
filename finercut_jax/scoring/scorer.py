"""The scoring engine: the divergence of every removal candidate from the dense model, in one
compiled program per greedy step.

How a step is computed, every shortcut exact:
- Prefix reuse. Removing candidate c (sublayers `[start_c, resume_c)`) from the current pruned
  model leaves the residual stream unchanged up to `start_c`. One pass of the current model caches
  the stream at every sublayer boundary (`prefix`, `[2L, N, T, D]`); candidate c starts from the
  cached input of `start_c` and runs only sublayers `resume_c .. 2L-1`. After a removal at s*, the
  cache is only recomputed from s* on.
- Reuse across steps. Each candidate's own stream is also kept at every `state_every`-th sublayer
  boundary (coarser if that would exceed `state_memory` bytes per device). After the greedy step
  removes s*, candidate c's model differs from last step's only from s* on, so c restarts from
  its latest kept state at or before s*. FinerCut removes deep sublayers first, so most
  candidates then run only a few sublayers.
- Early termination. Every metric is a sum of non-negative per-position terms, so a partial sum is
  a lower bound of the score. Scoring runs in passes over the calibration sequences (see
  `planner.py`): every candidate's first sequence, then the rest of the most promising candidates
  to find a complete score, then one sequence at a time for the candidates whose partial sum is
  still at most the best complete score, on any device. A candidate that cannot be the argmin
  stops there, sublayers and LM head both (the search only needs the argmin): its score is then a
  lower bound (`complete=False`) and its kept states stay current only for the sequences it ran.
  `bound=False` scores everything.
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
  compiled program, compiled ahead of its first call and timed apart (`StepStats`); with JAX's
  persistent compilation cache on (`enable_compilation_cache`), a repeated or resumed job loads
  it from disk instead.

The pieces: `programs.py` holds the device programs (pure functions of arrays and a
`ChunkPlan`), `planner.py` the host side (slots, cache validity, layout, passes, accounting);
`Scorer` joins them and holds the device arrays.

Backends: `jit` (default) runs `jax.shard_map` over the `cand` axis inside `jax.jit`, parameters
replicated over `cand` and sharded over `model` by the rules of `parallel/sharding.py`. `pmap`
runs the same per-device program under `jax.pmap` (replicated parameters only): since JAX 0.8
`jax.pmap` is a wrapper over `jit(shard_map)` in maintenance mode, which is why it is not the
default.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from finercut_jax.model.architecture import LlamaConfig
from finercut_jax.model.modules import Llama
from finercut_jax.parallel import distributed
from finercut_jax.parallel.sharding import (CAND, MODEL, logical_spec, make_mesh, replicated,
                                            shard_state)
from finercut_jax.scoring import divergence, programs
from finercut_jax.scoring.divergence import Metric
from finercut_jax.scoring.planner import Planner, passes
from finercut_jax.scoring.programs import Calibration, ChunkPlan, ProgramConfig


class Backend(enum.StrEnum):
  """How the step program is mapped over the candidate devices (see the module docstring)."""
  JIT = "jit"  # jax.jit over jax.shard_map
  PMAP = "pmap"  # jax.pmap: replicated parameters, one process


BACKENDS = tuple(b.value for b in Backend)


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
  sequence) against the naive count (every candidate a full forward of every sequence), FLOP/s,
  and the share of (candidate, sequence) pairs computed before early termination; where its time
  went (`seconds` is the whole call): compiling programs, planning on the host, the prefix pass,
  the candidate programs (dispatch to results on the host), and `padding_fraction`, the share of
  computed (slot, sequence) pairs that were padding, and `idle_fraction`, the share of candidate
  device time left idle by uneven work (1 - mean/max of the devices' FLOPs)."""
  evaluations: int
  naive_evaluations: int
  seconds: float
  flops: float  # of which `head_flops` in the LM head
  sequence_fraction: float = 1.0
  head_flops: float = 0.0
  compile_seconds: float = 0.0
  plan_seconds: float = 0.0
  prefix_seconds: float = 0.0
  device_seconds: float = 0.0
  passes: int = 0
  padding_fraction: float = 0.0
  idle_fraction: float = 0.0

  @property
  def flops_per_second(self) -> float:
    return self.flops / max(self.seconds - self.compile_seconds, 1e-12)

  def as_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(evaluation_fraction=self.evaluations / max(self.naive_evaluations, 1),
               flops_per_second=self.flops_per_second)
    return out


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


def enable_compilation_cache(directory: str, min_compile_seconds: float = 0.5) -> str:
  """Turns on JAX's persistent compilation cache in `directory` (created if missing): a program
  that took at least `min_compile_seconds` to compile (the step program takes seconds to minutes
  on a large model) is then loaded from disk by every later or resumed job with the same shapes,
  JAX, jaxlib and device kind. Call it before the first compilation. Returns the absolute path."""
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


class Scorer:
  """Scores removal candidates of a `Llama` on a fixed calibration set.

  `scores, stats = scorer.score(keep, candidates)` with `keep` `bool [L, 2]` the current pruned
  model and `candidates` a list of `Candidate`: `scores[i]` is the metric of the model with
  candidate i removed as well. `score_step` is the search's form, with early termination.
  `tokens`, the calibration sequences, are `int32 [N, T]`; `metric` and `backend` are a
  `divergence.Metric` and a `Backend` or their names.
  """

  def __init__(self, model: Llama, tokens: np.ndarray, *, metric: Metric | str = Metric.JS,
               chunk_width: int = 1, position_block: int = 512, mesh=None,
               backend: Backend | str = Backend.JIT,
               max_candidates: int | None = None, state_every: int = 2,
               state_memory: float = 2 * 2**30):
    self.cfg = cfg = model.config
    self.metric = divergence.check_metric(metric)
    try:
      self.backend = Backend(backend)
    except ValueError:
      raise ValueError(f"unknown scorer backend {backend!r}; choose one of {BACKENDS}") from None
    if chunk_width < 1 or state_every < 1:
      raise ValueError(f"chunk_width and state_every must be >= 1, got {chunk_width}, {state_every}")
    self.mesh = mesh if mesh is not None else make_mesh(cand=1, model=1)
    if self.backend is Backend.PMAP and (self.mesh.shape[MODEL] != 1 or jax.process_count() > 1):
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

    d = self.mesh.shape[CAND]
    self.slots_per_device = math.ceil((max_candidates or self.num_sublayers) / d)
    # Kept states: N*T*D per candidate slot and kept boundary, at most `state_memory` per device.
    one_state = n * t * cfg.hidden_size * jnp.dtype(self.dtype).itemsize
    fit = int(state_memory // (one_state * self.slots_per_device))
    self.num_states = min(math.ceil(self.num_sublayers / state_every), fit)
    self.state_every = math.ceil(self.num_sublayers / self.num_states) if self.num_states else 1
    if self.num_states:  # only the levels that spacing uses (e.g. 23, not 25, every 7 of 160)
      self.num_states = math.ceil(self.num_sublayers / self.state_every)
    if self.num_states:
      logging.info("scorer keeps candidate states every %d sublayers: %.2f GB per device",
                   self.state_every, self.num_states * self.slots_per_device * one_state / 1e9)
    else:
      logging.info("scorer keeps no candidate states: one per candidate slot would need %.2f GB "
                   "per device, over state_memory", one_state * self.slots_per_device / 1e9)
    attn, ffn, head = sublayer_flops(cfg, n, t)
    self.planner = Planner(
        devices=d, slots_per_device=self.slots_per_device, chunk_width=chunk_width,
        num_sublayers=self.num_sublayers, num_sequences=n, state_every=self.state_every,
        num_states=self.num_states,
        sublayer_flops=np.where(np.arange(self.num_sublayers) % 2 == 0, attn, ffn) / n,
        head_flops=head / n)

    rep = replicated(self.mesh)
    self.h0 = self._build(functools.partial(programs.embed, self.graphdef, tokens=self.tokens),
                          rep, self.params)
    targets, weights = (
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) if self.abstract
        else jax.device_put(a, rep)
        for a in divergence.position_weights(self.metric, self.tokens, cfg.vocab_size))
    ref_width = 1 if divergence.reference(self.metric, jnp.zeros((1, 1))) is None else cfg.vocab_size
    ref_sharding = NamedSharding(self.mesh, logical_spec(("positions", "vocab"),
                                                         (self.positions, ref_width), self.mesh))
    self._reference_fn = jax.jit(
        functools.partial(programs.reference_program, self.graphdef, self.metric),
        out_shardings=ref_sharding)
    reference = self._build(self._reference_fn, ref_sharding, self.params, self.h0)
    self.calibration = Calibration(reference, targets, weights)
    if not self.abstract:
      self._check_reference()
    self._prefix_fn = jax.jit(functools.partial(programs.prefix_program, self.graphdef),
                              out_shardings=rep, donate_argnums=(1,))
    self.prefix = self._build(lambda: jnp.zeros((self.num_sublayers, n, t, cfg.hidden_size),
                                                self.dtype), rep)
    state_shape = (d, self.slots_per_device, self.num_states, n, t, cfg.hidden_size)
    self.states = self._build(lambda: jnp.zeros(state_shape, self.dtype),
                              NamedSharding(self.mesh, P(CAND)))
    self._programs, self._compiled = {}, {}

  reference = property(lambda self: self.calibration.reference)
  targets = property(lambda self: self.calibration.targets)
  weights = property(lambda self: self.calibration.weights)

  @property
  def cand_devices(self) -> int:
    return self.mesh.shape[CAND]

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

  # ------------------------------------------------------------------ programs

  def _program(self, bound: bool):
    """The step program over the mesh: `score_chunks` per candidate device."""
    if bound in self._programs:
      return self._programs[bound]
    n, t = self.tokens.shape
    config = ProgramConfig(
        graphdef=self.graphdef, metric=self.metric, num_sequences=n, seq_len=t,
        position_block=self.position_block, state_every=self.state_every,
        num_states=self.num_states, bound=bound, axis=CAND if self.cand_devices > 1 else None)
    local = functools.partial(programs.score_chunks, config)
    if self.backend is Backend.PMAP:
      devices = self.mesh.devices[:, 0].tolist()
      fn = jax.pmap(local, axis_name=CAND, in_axes=(None, None, 0) + (None,) * 4 + (0,),
                    devices=devices, donate_argnums=(2,))
    else:
      def per_device(params, prefix, states, calibration, keep_flat, sequences, best, plan):
        # shard_map hands each device its [1, ...] block of the cand-sharded arrays.
        plan = jax.tree.map(lambda x: x[0], plan)
        out = local(params, prefix, states[0], calibration, keep_flat, sequences, best, plan)
        return jax.tree.map(lambda x: x[None], out)

      cand = P(CAND)
      mapped = jax.shard_map(per_device, mesh=self.mesh,
                             in_specs=(P(), P(), cand) + (P(),) * 4 + (cand,),
                             out_specs=(cand, cand, cand), axis_names={CAND}, check_vma=False)
      fn = jax.jit(mapped, donate_argnums=(2,))
    self._programs[bound] = fn
    return fn

  def _step_args(self, keep_flat, sequences, best: float, plan: ChunkPlan):
    """The step program's arguments, placed as it was compiled for."""
    if self.backend is Backend.PMAP:
      return (self.params, self.prefix, self.states, self.calibration, keep_flat,
              np.asarray(sequences, np.int32), np.float32(best), plan)
    rep, cand = replicated(self.mesh), NamedSharding(self.mesh, P(CAND))
    put = lambda x, sharding: (jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                    sharding=sharding) if self.abstract
                               else jax.device_put(x, sharding))
    return (self.params, self.prefix, self.states, self.calibration, put(keep_flat, rep),
            put(np.asarray(sequences, np.int32), rep), put(np.float32(best), rep),
            jax.tree.map(lambda x: put(x, cand), plan))

  def lower(self) -> dict[str, jax.stages.Lowered]:
    """The search's programs lowered for this scorer's shapes and shardings: `reference` (the
    dense pass, once per search), `prefix` (the current model's pass, once per step) and `step`
    (the candidates). With an abstract scorer this sizes a model this machine cannot hold:
    `lower()["step"].compile().memory_analysis()`."""
    if self.backend is not Backend.JIT:
      raise ValueError("lower() is for the jit backend")
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    rep = replicated(self.mesh)
    keep = jax.ShapeDtypeStruct((self.num_sublayers,), jnp.bool_, sharding=rep)
    params, prefix, h0 = (jax.tree.map(abstract, x) for x in (self.params, self.prefix, self.h0))
    capacity = self.planner.capacity  # a full layout: every slot in use
    _, plan = self.planner.layout([Candidate(0, 1)] * capacity, np.arange(capacity),
                                  np.zeros(capacity), np.arange(capacity), passes(1, False, 1)[0])
    step_args = self._step_args(np.ones(self.num_sublayers, bool), (0, 1), 0.0, plan)
    step_args = jax.tree.map(abstract, step_args)
    return {"reference": self._reference_fn.lower(params, h0),
            "prefix": self._prefix_fn.lower(params, prefix, h0, keep,
                                            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)),
            "step": self._program(True).lower(*step_args)}

  # ------------------------------------------------------------------ scoring

  def score_step(self, keep: np.ndarray, candidates: list[Candidate], *, bound: bool = True):
    """Scores candidates with the model `keep` (`bool [L, 2]`) as the current pruned model;
    returns `(scores float64 [C], complete bool [C], stats)` for the C candidates.

    With `bound`, a candidate that provably cannot be the argmin stops early: its score is then
    a lower bound and `complete` is False for it (see `planner.passes` for the pass order).
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
    planner = self.planner
    planner.invalidate(keep_flat)
    stats = StepStats(evaluations=0, naive_evaluations=len(candidates) * self.num_sublayers * n,
                      seconds=0.0, flops=0.0, sequence_fraction=0.0)
    first = planner.prefix_start()
    if first is not None:
      tick = time.perf_counter()
      self.prefix = self._prefix_fn(self.params, self.prefix, self.h0,
                                    jnp.asarray(keep_flat), jnp.int32(first))
      jax.block_until_ready(self.prefix)
      stats.prefix_seconds = time.perf_counter() - tick
      planner.prefix_done()
      evaluations, flops = planner.prefix_cost(keep_flat, first)
      stats.evaluations += evaluations
      stats.flops += flops
    slots = planner.slots(candidates)
    scores = np.zeros(len(candidates))
    done = np.zeros(len(candidates), np.int64)  # the sequence each candidate stopped at
    best = np.inf
    device_flops = np.zeros(self.cand_devices)
    computed = padding = 0
    for step in passes(n, bound, self.chunk_width):
      tick = time.perf_counter()
      entries = planner.select(step, done, scores, best)
      if not entries.size:
        continue
      index, plan = planner.layout(candidates, slots, scores, entries, step)
      stats.plan_seconds += time.perf_counter() - tick
      done_dev, scores_dev = self._run(bound, keep_flat, (step.first, step.stop), best, plan, stats)
      tick = time.perf_counter()
      valid = plan.valid
      scores[index[valid]] = scores_dev[valid]
      done[index[valid]] = done_dev[valid]
      planner.ran(slots[index[valid]], step.first, done_dev[valid])
      cost = planner.pass_cost(keep_flat, plan, done_dev, step.first)
      stats.evaluations += int(cost["evaluations"].sum())
      stats.flops += float(cost["flops"].sum())
      stats.head_flops += cost["head_flops"]
      device_flops += cost["flops"]
      stats.sequence_fraction += cost["pairs"]
      computed += cost["pairs"] + cost["padding"]
      padding += cost["padding"]
      stats.passes += 1
      best = min(best, float(np.min(scores[done == n], initial=np.inf)))
      stats.plan_seconds += time.perf_counter() - tick
    stats.seconds = time.perf_counter() - begin
    stats.sequence_fraction /= len(candidates) * n
    stats.padding_fraction = padding / max(computed, 1)
    stats.idle_fraction = float(1 - device_flops.mean() / device_flops.max()) if device_flops.max() else 0.0
    if not np.all(np.isfinite(scores)):
      bad = [candidates[i].name for i in np.flatnonzero(~np.isfinite(scores))]
      raise NonFiniteError(
          f"removing {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} gives non-finite "
          f"(NaN/inf) scores: the model's outputs overflow without them in "
          f"{jnp.dtype(self.dtype).name}; run in float32 (--config.model.dtype=float32)")
    return scores, done == n, stats

  def _run(self, bound: bool, keep_flat, sequences, best: float, plan: ChunkPlan,
           stats: StepStats):
    """Runs the step program on a plan (compiling it first if this is its first call); returns
    (stop sequence `int32 [devices, chunks, W]`, scores `float64 [devices, chunks, W]`)."""
    args = self._step_args(keep_flat, sequences, best, plan)
    if bound not in self._compiled:
      tick = time.perf_counter()
      self._compiled[bound] = self._program(bound).lower(*args).compile()
      stats.compile_seconds += time.perf_counter() - tick
    tick = time.perf_counter()
    scores, done, self.states = self._compiled[bound](*args)
    # On several processes each holds its own devices' entries: every process gathers all of them,
    # so the host-side choice is the same everywhere.
    done, scores = distributed.gather(done), distributed.gather(scores).astype(np.float64)
    stats.device_seconds += time.perf_counter() - tick
    return done, scores

  def score(self, keep: np.ndarray, candidates: list[Candidate]) -> tuple[np.ndarray, StepStats]:
    """Exact scores of every candidate, `float64 [C]`, for the model `keep` (`bool [L, 2]`)."""
    scores, _, stats = self.score_step(keep, candidates, bound=False)
    return scores, stats


def _largest_divisor_at_most(n: int, limit: int) -> int:
  for d in range(min(n, max(limit, 1)), 0, -1):
    if n % d == 0:
      return d
  return 1
