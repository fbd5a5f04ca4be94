"""The scorer's host side: which candidate runs where, from where, in which pass, and what it cost.

A `Planner` owns everything the device programs do not need to know between calls:
- slots: each candidate keeps one slot (so one device and one set of kept states) for the search;
- cache validity: up to which sublayer the prefix cache and each slot's kept states still hold
  the current model's streams, per calibration sequence;
- layout: the `ChunkPlan` arrays of a call, chunks of candidates per device;
- passes: the order in which a step's (candidate, sequence) pairs are scored;
- accounting: the sublayer evaluations, FLOPs and padding of what ran.

Passes of a bounded step (`passes`): (1) every candidate's first calibration sequence, which
every candidate needs; (2) the rest of the sequences of each device's most promising chunk (the
lowest first-sequence scores, chunked in score order), whose complete scores bound every device
from the start; (3) one pass per remaining sequence, with only the candidates whose partial score
is still at most the best complete score, repacked into full chunks. So a candidate stops at the
first sequence where it cannot be the argmin, whatever the chunk width. In pass 3 chunks are
grouped by restart point (a chunk runs from its smallest), lowest partial score first, and the
device program still stops a chunk mid-pass when a complete score found earlier in the pass, on
any device, exceeds all of it. With chunks of one candidate, pass 3 is a single pass over the
remaining sequences (`passes`).
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from finercut_jax.scoring.programs import ChunkPlan


class Selection(enum.StrEnum):
  """Which candidates a pass runs."""
  ALL = "all"  # every candidate
  FIRST = "first"  # each device's first chunk in score order
  ALIVE = "alive"  # those not complete whose partial score is still <= the best complete one


@dataclasses.dataclass(frozen=True)
class Pass:
  """Sequences `[first, stop)` for the candidates of `select`."""
  first: int
  stop: int
  select: Selection


def passes(num_sequences: int, bound: bool, chunk_width: int) -> list[Pass]:
  """A step's passes. With chunks of one candidate, pass 3 is one pass over all the remaining
  sequences: each chunk is one candidate that stops on its own, and a complete score found early
  in the pass tightens the bound for every later chunk at once."""
  if not bound or num_sequences == 1:
    return [Pass(0, num_sequences, Selection.ALL)]
  first = [Pass(0, 1, Selection.ALL), Pass(1, num_sequences, Selection.FIRST)]
  if chunk_width == 1:
    return first + [Pass(1, num_sequences, Selection.ALIVE)]
  return first + [Pass(g, g + 1, Selection.ALIVE) for g in range(1, num_sequences)]


class Planner:
  """Host bookkeeping of one scorer: `devices` candidate devices of `slots_per_device` slots,
  chunks of `chunk_width`, kept states every `state_every` sublayers (`num_states` of them per
  slot, 0: none), `num_sequences` calibration sequences, a model of `num_sublayers`."""

  def __init__(self, *, devices: int, slots_per_device: int, chunk_width: int,
               num_sublayers: int, num_sequences: int, state_every: int, num_states: int,
               sublayer_flops: np.ndarray, head_flops: float):
    self.devices, self.slots_per_device, self.chunk_width = devices, slots_per_device, chunk_width
    self.num_chunks = -(-slots_per_device // chunk_width)
    self.num_sublayers, self.num_sequences = num_sublayers, num_sequences
    self.state_every, self.num_states = state_every, num_states
    self.sublayer_flops = sublayer_flops  # float [2L]: one sublayer on one sequence
    self.head_flops = head_flops  # the LM head on one sequence
    self.keep = None  # bool [2L]: the keep mask the caches were computed for
    self.prefix_valid = -1  # prefix[j] is current for j <= this
    self.slot_of: dict = {}
    # [slots, N]: slot s's kept states are current for sequence g up to this sublayer
    self.states_valid = np.full((devices * slots_per_device, num_sequences), -1)

  @property
  def capacity(self) -> int:
    return self.devices * self.slots_per_device

  def invalidate(self, keep_flat: np.ndarray) -> None:
    """Marks what the caches still hold for the new mask `keep_flat` (`bool [2L]`): if sublayers
    were only removed (a greedy step), everything before the first newly removed one is
    unchanged; else nothing."""
    if self.keep is None or np.any(keep_flat & ~self.keep):
      self.prefix_valid = -1
      self.states_valid[:] = -1
    elif np.any(self.keep & ~keep_flat):
      first = int(np.flatnonzero(self.keep & ~keep_flat)[0])
      self.prefix_valid = min(self.prefix_valid, first)
      np.minimum(self.states_valid, first, out=self.states_valid)
    self.keep = keep_flat.copy()

  def prefix_start(self) -> int | None:
    """The first sublayer the prefix pass must recompute, or None if the cache is current."""
    return None if self.prefix_valid >= self.num_sublayers else max(self.prefix_valid, 0)

  def prefix_done(self) -> None:
    self.prefix_valid = self.num_sublayers

  def slots(self, candidates: list) -> np.ndarray:
    """Stable slot (and so device and kept states) for each candidate: `int [C]`."""
    if len(candidates) > self.capacity:
      raise ValueError(f"{len(candidates)} candidates exceed the scorer's {self.capacity} slots; "
                       f"construct it with max_candidates={len(candidates)}")
    new = [c for c in candidates if c not in self.slot_of]
    if len(self.slot_of) + len(new) > self.capacity:  # unknown candidates: start the table over
      self.slot_of = {}
      self.states_valid[:] = -1
      new = list(candidates)
    for c in new:
      self.slot_of[c] = len(self.slot_of)
    return np.asarray([self.slot_of[c] for c in candidates])

  def select(self, step: Pass, done: np.ndarray, scores: np.ndarray, best: float) -> np.ndarray:
    """The candidates a pass runs, `int [E]` indices, from the sequence each candidate stopped at
    (`done`, `int [C]`) and its (partial) score (`scores`, `float [C]`)."""
    if step.select is Selection.ALIVE:
      return np.flatnonzero((done == step.first) & (scores <= best))
    return np.flatnonzero(done == step.first)

  def layout(self, candidates: list, slots: np.ndarray, partial: np.ndarray,
             entries: np.ndarray, step: Pass) -> tuple[np.ndarray, ChunkPlan]:
    """The `ChunkPlan` of a pass, arrays `[devices, chunks, W(, N)]`, for `entries` (`int [E]`
    indices into `candidates`), from the candidates' slots (`int [C]`) and partial scores
    (`float [C]`). Returns `(index int [devices, chunks, W], plan)`: index holds each entry's
    position in `candidates` (-1: padding)."""
    d, w, every, n = self.devices, self.chunk_width, self.state_every, self.num_sequences
    restart = np.repeat(np.asarray([c.resume for c in candidates])[:, None], n, axis=1)
    from_state = np.zeros(restart.shape, bool)
    if self.num_states:
      # The latest kept state at or before what is still current for this candidate and sequence.
      kept = (np.minimum(self.states_valid[slots], self.num_sublayers - 1) // every) * every
      from_state = kept >= restart
      restart = np.where(from_state, kept, restart)
    index = np.full((d, self.num_chunks, w), -1)
    for dev in range(d):
      mine = entries[slots[entries] % d == dev]
      if step.select is Selection.FIRST:  # the most promising chunk first: chunks in score order
        mine = mine[np.argsort(partial[mine], kind="stable")]
        chunks = [mine[:w]]
      else:  # chunks of similar restart points (a chunk runs from its smallest), best first
        mine = mine[np.argsort(restart[mine, step.first], kind="stable")]
        chunks = [mine[i:i + w] for i in range(0, len(mine), w)]
        chunks.sort(key=lambda ch: partial[ch].min())
      for k, ch in enumerate(chunks):
        index[dev, k, :len(ch)] = ch
    valid = index >= 0
    # Padding repeats a real entry of its chunk (never lowering its restart point); chunks of
    # padding only are skipped on the device.
    filled = np.where(valid, index, np.maximum(index.max(axis=-1, keepdims=True), 0))
    take = lambda a: np.asarray(a)[filled]
    plan = ChunkPlan(slot=take(slots // d).astype(np.int32),
                     start=take([c.start for c in candidates]).astype(np.int32),
                     resume=take(restart).astype(np.int32), from_state=take(from_state),
                     state_index=(take(restart) // every).astype(np.int32),
                     partial=take(partial).astype(np.float32), valid=valid)
    return index, plan

  def ran(self, slots: np.ndarray, first: int, done: np.ndarray) -> None:
    """Candidates in `slots` (`int [E]`) ran sequences `first .. done-1` (`done` `int [E]`): their
    kept states are current."""
    g = np.arange(self.num_sequences)[None, :]
    ran = (g >= first) & (g < done[:, None])
    self.states_valid[slots] = np.where(ran, self.num_sublayers, self.states_valid[slots])

  # ------------------------------------------------------------------ accounting

  def _flops_from(self, keep_flat):
    """Per sequence: FLOPs and sublayer count of running the kept sublayers from j on, `[2L+1]`."""
    per = self.sublayer_flops * keep_flat
    flops_from = np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
    kept_from = np.concatenate([np.cumsum(keep_flat[::-1])[::-1], [0]])
    return flops_from, kept_from

  def prefix_cost(self, keep_flat, first: int) -> tuple[int, float]:
    """(sublayer evaluations, FLOPs) of the prefix pass from `first` on, every sequence, for the
    model with sublayers `keep_flat` (`bool [2L]`)."""
    flops_from, kept_from = self._flops_from(keep_flat)
    return self.num_sequences * int(kept_from[first]), self.num_sequences * float(flops_from[first])

  def pass_cost(self, keep_flat, plan: ChunkPlan, done: np.ndarray, first: int) -> dict:
    """What a pass computed: a chunk runs all its entries from their smallest restart point, then
    the LM head, for each sequence it ran (`done` `int [devices, chunks, W]`, the sequence each
    entry stopped at). Per device: sublayer evaluations `int64 [devices]` and FLOPs
    `float64 [devices]`; overall: (candidate, sequence) pairs of real entries and of padding, and
    the LM head's share of FLOPs."""
    w = self.chunk_width
    flops_from, kept_from = self._flops_from(keep_flat)
    evaluations, flops = np.zeros(self.devices, np.int64), np.zeros(self.devices)
    pairs = padding = head = 0
    for dev in range(self.devices):
      for r, ok, g in zip(plan.resume[dev], plan.valid[dev], done[dev]):
        if ok.any() and g[0] > first:
          start = r[:, first:g[0]].min(axis=0)  # the chunk's restart point per sequence it ran
          evaluations[dev] += w * int(kept_from[start].sum())
          flops[dev] += w * float(flops_from[start].sum() + self.head_flops * len(start))
          head += w * self.head_flops * len(start)
          pairs += int(ok.sum()) * len(start)
          padding += int((~ok).sum()) * len(start)
    return {"evaluations": evaluations, "flops": flops, "pairs": pairs, "padding": padding,
            "head_flops": head}
