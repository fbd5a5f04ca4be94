"""The scoring engine: the divergence of every removal candidate from the dense model, in one
compiled program per greedy step.

How a step is computed (DESIGN.md section 3):
- Prefix reuse. Removing candidate c (sublayers `[start_c, resume_c)`) from the current pruned
  model leaves the residual stream unchanged up to `start_c`. One pass of the current model caches
  the stream at every sublayer boundary (`prefix`, `[2L, N, T, D]`); candidate c starts from the
  cached input of `start_c` and runs only sublayers `resume_c .. 2L-1`.
- Batching. Candidates, sorted by start, are dealt round-robin to the devices of the mesh's `cand`
  axis and cut into chunks of `chunk_width`; a chunk is one `jax.vmap` over its candidates and runs
  sublayers from its smallest start on (each candidate's state only changes past its own start).
- Skipping. Which sublayers are already removed is shared by the whole batch, so a removed
  sublayer is a `lax.switch` branch that is never executed, not a multiplication by zero; chunks
  that hold only padding are skipped the same way.
- Fusion. The final norm, LM head, log-softmax and divergence run per block of positions, so the
  largest logits array is `[chunk_width, position_block, V]`; `[C, N, T, V]` never exists. The dense
  model's side (log-probabilities or logits, by metric) is computed once per search.
- Fixed shapes. The number of candidate slots is fixed for a search (the first step's count), so
  every step reuses one compiled program.

Backends: `jit` (default) runs `jax.shard_map` over the `cand` axis inside `jax.jit`, parameters
replicated over `cand` and sharded over `model` by the rules of `sharding.py`. `pmap` runs the same
per-device program under `jax.pmap` (replicated parameters only): since JAX 0.8 `jax.pmap` is a
wrapper over `jit(shard_map)` in maintenance mode, which is why it is not the default.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
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

  @property
  def sublayers(self) -> tuple[int, ...]:
    return tuple(range(self.start, self.resume))


@dataclasses.dataclass
class StepStats:
  """What one scoring call did: sublayer evaluations against the naive count, time, FLOP/s."""
  evaluations: int
  naive_evaluations: int
  seconds: float
  flops: float

  @property
  def flops_per_second(self) -> float:
    return self.flops / max(self.seconds, 1e-12)

  def as_dict(self) -> dict:
    return {"evaluations": self.evaluations, "naive_evaluations": self.naive_evaluations,
            "evaluation_fraction": self.evaluations / max(self.naive_evaluations, 1),
            "seconds": self.seconds, "flops": self.flops, "flops_per_second": self.flops_per_second}


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

  Usage: `scores, stats = scorer.score(keep, candidates)` with `keep` `[L, 2]` the current pruned
  model and `candidates` a list of `Candidate`; `scores[i]` is the metric of the model with
  candidate i removed as well.
  """

  def __init__(self, params: Params, cfg: LlamaConfig, tokens: np.ndarray, *, metric: str = "js",
               chunk_width: int = 1, position_block: int = 512, mesh=None, backend: str = "jit",
               max_candidates: int | None = None, dtype=None):
    self.cfg = cfg
    self.metric = divergence.check_metric(metric)
    if backend not in BACKENDS:
      raise ValueError(f"unknown scorer backend {backend!r}; choose one of {BACKENDS}")
    if chunk_width < 1:
      raise ValueError(f"chunk_width must be >= 1, got {chunk_width}")
    self.backend = backend
    self.mesh = mesh if mesh is not None else make_mesh(cand=1, model=1)
    if backend == "pmap" and self.mesh.shape[MODEL] != 1:
      raise ValueError("the pmap backend needs replicated parameters (model axis 1); use backend='jit'")
    self.tokens = np.asarray(tokens, np.int32)
    n, t = self.tokens.shape
    self.positions = n * t
    self.position_block = _largest_divisor_at_most(self.positions, position_block)
    self.chunk_width = chunk_width
    self.num_sublayers = cfg.num_sublayers
    self.max_candidates = max_candidates or self.num_sublayers
    self.dtype = dtype or params["embed"].dtype
    self.params = shard_params(params, self.mesh)
    self._flops = sublayer_flops(cfg, n, t)

    rep = replicated(self.mesh)
    self.h0 = jax.device_put(embed(self.params, jnp.asarray(self.tokens), self.dtype), rep)
    targets, weights = divergence.position_weights(self.metric, self.tokens, cfg.vocab_size)
    self.targets = jax.device_put(targets, rep)
    self.weights = jax.device_put(weights, rep)
    ref_sharding = NamedSharding(self.mesh, logical_spec(("positions", "vocab"),
                                                         (self.positions, cfg.vocab_size), self.mesh))
    self.reference = jax.jit(self._reference, out_shardings=ref_sharding)(self.params, self.h0)
    self._prefix = jax.jit(self._prefix_fn, out_shardings=rep)
    self._score_fn = self._build_score_fn()

  # ------------------------------------------------------------------ programs

  def _reference(self, params, h0):
    h = run_layers(params, self.cfg, h0)
    logits = final_logits(params, h, self.cfg).reshape(self.positions, -1)
    return divergence.reference(self.metric, logits)

  def _prefix_fn(self, params, h0, keep):
    _, inputs = run_layers(params, self.cfg, h0, keep, collect=True)
    return inputs

  def _local_scores(self, params, prefix, reference, targets, weights, keep_flat, starts, resumes,
                    valid):
    """Scores of this device's candidate chunks `[chunks, W]` (the per-device program)."""
    cfg, metric = self.cfg, self.metric
    num_sub, pb = self.num_sublayers, self.position_block
    n, t = self.tokens.shape
    rope = rope_tables(cfg, t)
    width = starts.shape[-1]

    def suffix(h, start_resume):
      """Runs each candidate's suffix: sublayers j >= its resume point, if kept."""
      starts, resumes = start_resume
      first = jnp.min(resumes)

      def body(j, h):
        lp = layer_params(params, j // 2)
        run = lambda x: apply_sublayer(lp, j % 2, x, rope, cfg, keep_flat[j])
        return jnp.where((j >= resumes)[:, None, None, None], jax.vmap(run)(h), h)

      return jax.lax.fori_loop(first, num_sub, body, h)

    def chunk_divergence(h):
      h = h.reshape(width, n * t, -1)

      def block(i, acc):
        hb = jax.lax.dynamic_slice_in_dim(h, i * pb, pb, axis=1)
        logits = final_logits(params, hb, cfg)  # [W, pb, V] float32
        ref = None if reference is None else jax.lax.dynamic_slice_in_dim(reference, i * pb, pb)
        tb = jax.lax.dynamic_slice_in_dim(targets, i * pb, pb)
        wb = jax.lax.dynamic_slice_in_dim(weights, i * pb, pb)
        terms = divergence.position_terms(metric, None if ref is None else ref[None], logits, tb[None])
        return acc + jnp.sum(terms * wb[None], axis=-1)

      return jax.lax.fori_loop(0, n * t // pb, block, jnp.zeros((width,), jnp.float32))

    def chunk(args):
      s, r, ok = args

      def compute(_):
        # Padding slots repeat a real candidate of the chunk, so they never lower its start.
        h = prefix[s]
        return chunk_divergence(suffix(h, (s, r)))

      return jax.lax.cond(jnp.any(ok), compute, lambda _: jnp.zeros((width,), jnp.float32), None)

    return jax.lax.map(chunk, (starts, resumes, valid))

  def _build_score_fn(self):
    if self.backend == "pmap":
      devices = self.mesh.devices[:, 0].tolist()
      return jax.pmap(self._local_scores, in_axes=(None,) * 6 + (0, 0, 0), devices=devices)
    cand = P(CAND)
    mapped = jax.shard_map(
        self._local_scores, mesh=self.mesh,
        in_specs=(P(), P(), P(), P(), P(), P(), cand, cand, cand), out_specs=cand,
        axis_names={CAND}, check_vma=False)
    return jax.jit(mapped)

  # ------------------------------------------------------------------ host side

  @property
  def cand_devices(self) -> int:
    return self.mesh.shape[CAND]

  def layout(self, candidates: list[Candidate]):
    """Deals candidates (sorted by start) round-robin to devices, in chunks; pads with repeats.

    Returns `(order, starts, resumes, valid)`: arrays `[devices, chunks, W]` and, for each slot,
    the index of its candidate in `candidates` (-1 for padding).
    """
    if not candidates:
      raise ValueError("no candidates to score")
    if len(candidates) > self.max_candidates:
      raise ValueError(f"{len(candidates)} candidates exceed the scorer's {self.max_candidates} slots")
    d, w = self.cand_devices, self.chunk_width
    chunks = math.ceil(self.max_candidates / (d * w))
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].start, i))
    slots = np.full((d, chunks * w), -1, np.int64)
    for rank, i in enumerate(order):
      slots[rank % d, rank // d] = i
    slots = slots.reshape(d, chunks, w)
    valid = slots >= 0
    # Pad a chunk with its last real candidate (or the device's last, for all-padding chunks).
    filled = slots.copy()
    for dev in range(d):
      flat = filled[dev].reshape(-1)
      last = flat[0] if flat[0] >= 0 else order[-1]
      for k in range(flat.size):
        if flat[k] < 0:
          flat[k] = last
        last = flat[k]
    starts = np.asarray([candidates[i].start for i in filled.reshape(-1)], np.int32).reshape(filled.shape)
    resumes = np.asarray([candidates[i].resume for i in filled.reshape(-1)], np.int32).reshape(filled.shape)
    return slots, starts, resumes, valid

  def count_evaluations(self, keep_flat: np.ndarray, resumes: np.ndarray, valid: np.ndarray) -> int:
    """Sublayer applications the program performs (each chunk runs all its slots from its
    smallest resume point), plus the prefix pass."""
    kept_from = np.concatenate([np.cumsum(keep_flat[::-1])[::-1], [0]])  # kept sublayers j >= i
    total = int(keep_flat.sum())  # the prefix pass
    w = resumes.shape[-1]
    for r, ok in zip(resumes.reshape(-1, w), valid.reshape(-1, w)):
      if ok.any():
        total += w * int(kept_from[r.min()])
    return total

  def count_flops(self, keep_flat: np.ndarray, resumes: np.ndarray, valid: np.ndarray) -> float:
    attn, ffn, head = self._flops
    per = np.where(np.arange(self.num_sublayers) % 2 == 0, attn, ffn) * keep_flat
    from_ = np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
    w = resumes.shape[-1]
    total = float(per.sum())  # the prefix pass
    for r, ok in zip(resumes.reshape(-1, w), valid.reshape(-1, w)):
      if ok.any():
        total += w * (from_[r.min()] + head)
    return total

  def prefix(self, keep: np.ndarray) -> jax.Array:
    return self._prefix(self.params, self.h0, jnp.asarray(keep, bool))

  def score(self, keep: np.ndarray, candidates: list[Candidate]) -> tuple[np.ndarray, StepStats]:
    keep = np.asarray(keep, bool)
    keep_flat = keep.reshape(-1)
    begin = time.perf_counter()
    prefix = self.prefix(keep)
    slots, starts, resumes, valid = self.layout(candidates)
    args = (self.params, prefix, self.reference, self.targets, self.weights,
            jnp.asarray(keep_flat))
    if self.backend == "pmap":
      out = self._score_fn(*args, starts, resumes, valid)
    else:
      # Devices' chunk lists laid end to end; shard_map hands each device its own [chunks, W].
      sharding = NamedSharding(self.mesh, P(CAND))
      flat = (jax.device_put(a.reshape((-1,) + a.shape[2:]), sharding)
              for a in (starts, resumes, valid))
      out = self._score_fn(*args, *flat).reshape(starts.shape)
    out = np.asarray(jax.device_get(out), np.float64)
    seconds = time.perf_counter() - begin
    scores = np.full(len(candidates), np.nan)
    scores[slots[valid]] = out[valid]
    if not np.all(np.isfinite(scores)):
      bad = [candidates[i] for i in np.flatnonzero(~np.isfinite(scores))]
      raise FloatingPointError(f"non-finite scores for candidates {bad[:4]}: the model produces "
                               f"NaN/inf (check the checkpoint and the dtype)")
    stats = StepStats(evaluations=self.count_evaluations(keep_flat, resumes, valid),
                      naive_evaluations=len(candidates) * self.num_sublayers,
                      seconds=seconds, flops=self.count_flops(keep_flat, resumes, valid))
    return scores, stats


def _largest_divisor_at_most(n: int, limit: int) -> int:
  for d in range(min(n, max(limit, 1)), 0, -1):
    if n % d == 0:
      return d
  return 1
