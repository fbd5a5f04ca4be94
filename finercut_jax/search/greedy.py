"""The greedy FinerCut search, its variants, and its resumable state.

Step t scores every remaining candidate c as D(S_t + {c}) and removes the argmin (ties: the
lowest sublayer id). The ordering this produces is the whole result: the pruned model at any
ratio is a prefix of it. The state is written atomically after every step, so rerunning the same
search on the same state file resumes where it stopped and ends with the identical ordering.

Variants: candidate pools (`Pool`) `sublayers` (attention and FFN, the default), `attn`, `ffn`,
`blocks` (both sublayers of a block at once: the block-level baseline); a protected front
fraction (the first blocks are no candidates for the first removals, `SearchSpec.protect_front`);
one-shot (rank every candidate once against the dense model); the order among exactly tied
scores (`TieBreak`).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable

import numpy as np
from absl import logging

from finercut_jax.parallel import distributed
from finercut_jax.rundir import RemovalStep
from finercut_jax.rundir.atomic import atomic_write_json, read_json
from finercut_jax.scoring.scorer import Candidate, NonFiniteError, Scorer


class Pool(enum.StrEnum):
  """The removal candidates of a search."""
  SUBLAYERS = "sublayers"  # every attention and FFN sublayer
  ATTN = "attn"  # attention sublayers only
  FFN = "ffn"  # FFN sublayers only
  BLOCKS = "blocks"  # whole blocks (both sublayers at once)


class TieBreak(enum.StrEnum):
  """How exact ties between candidates' scores are broken: the lowest sublayer id, or the
  official FinerCut code's order, `sorted()` of the Hugging Face module names its hooks zero
  (block "10" before "2"; within a block `mlp.down_proj` before `self_attn.o_proj`)."""
  SUBLAYER_ID = "sublayer_id"
  MODULE_NAME = "module_name"


POOLS = tuple(p.value for p in Pool)
TIE_BREAKS = tuple(t.value for t in TieBreak)
KIND_NAMES = ("attn", "ffn")


class SearchStateError(ValueError):
  """The state file belongs to a different search."""


@dataclasses.dataclass(frozen=True)
class SearchSpec:
  """What a search removes and how; `pool` and `tie_break` may be given by their names."""
  num_layers: int
  pool: Pool = Pool.SUBLAYERS
  num_steps: int | None = None  # None: the full ordering
  protect_front: float | None = None
  one_shot: bool = False
  tie_break: TieBreak = TieBreak.SUBLAYER_ID

  def __post_init__(self):
    object.__setattr__(self, "pool", parse_pool(self.pool))
    try:
      object.__setattr__(self, "tie_break", TieBreak(self.tie_break))
    except ValueError:
      raise ValueError(f"unknown tie_break {self.tie_break!r}; choose one of "
                       f"{', '.join(TIE_BREAKS)}") from None
    if self.protect_front is not None and not 0.0 <= self.protect_front < 1.0:
      raise ValueError(f"protect_front must be in [0, 1), got {self.protect_front}")
    if self.num_steps is not None and not 0 < self.num_steps <= len(self.pool_candidates()):
      raise ValueError(f"{self.num_steps} removal steps requested but the {self.pool.value!r} "
                       f"pool has {len(self.pool_candidates())} candidates")

  def pool_candidates(self) -> list[Candidate]:
    L = self.num_layers
    if self.pool is Pool.BLOCKS:
      return [Candidate(2 * l, 2 * l + 2) for l in range(L)]
    kinds = {Pool.SUBLAYERS: (0, 1), Pool.ATTN: (0,), Pool.FFN: (1,)}[self.pool]
    return [Candidate(2 * l + k, 2 * l + k + 1) for l in range(L) for k in kinds]

  def tie_key(self, candidate: Candidate):
    """Among exactly equal scores, the smallest key wins."""
    if self.tie_break is TieBreak.MODULE_NAME:
      return module_name(candidate.start)
    return candidate.start

  @property
  def total_steps(self) -> int:
    return self.num_steps or len(self.pool_candidates())

  def protected_blocks(self, num_removed: int) -> int:
    """How many front blocks are not yet candidates. The official code's rule: with n candidates
    and fraction x, blocks 0..int(n*x/2) are held out until int(n*x)+1 removals."""
    if self.protect_front is None:
      return 0
    n = len(self.pool_candidates())
    if num_removed >= int(n * self.protect_front) + 1:
      return 0
    return int(n * self.protect_front / 2) + 1


def module_name(sublayer: int) -> str:
  """The Hugging Face module whose output removing `sublayer` zeroes (the official code's
  candidate name)."""
  block, kind = divmod(int(sublayer), 2)
  return f"model.layers.{block}." + ("self_attn.o_proj" if kind == 0 else "mlp.down_proj")


def parse_pool(pool: Pool | str) -> Pool:
  """`pool` as a `Pool`; a `ValueError` naming the choices if it is none of them."""
  try:
    return Pool(pool)
  except ValueError:
    raise ValueError(f"unknown candidate pool {pool!r}; choose one of {', '.join(POOLS)}") from None


def steps_needed(ratio: float, num_layers: int, pool: Pool | str) -> int:
  """Removals for a pruning ratio: `int(ratio * 2L)` sublayers, or `int(ratio * L)` blocks."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
  units = num_layers if parse_pool(pool) is Pool.BLOCKS else 2 * num_layers
  return int(ratio * units)


def keep_mask(num_layers: int, removed: list[list[int]]) -> np.ndarray:
  """The keep mask `bool [L, 2]` with the given candidates' sublayers (lists of sublayer ids
  `2 * block + kind`) removed."""
  keep = np.ones(2 * num_layers, bool)
  for sublayers in removed:
    keep[list(sublayers)] = False
  return keep.reshape(num_layers, 2)


def removal_step(step: int, candidate: Candidate, score: float, **fields) -> RemovalStep:
  """The record of removing `candidate` at `step` with divergence `score`; `fields` are the
  record's optional fields (seconds, stats, scores, lower_bounds)."""
  block, kind = divmod(candidate.start, 2)
  whole_block = candidate.resume - candidate.start == 2
  return RemovalStep(step=step, sublayer=candidate.start,
                     sublayers=tuple(range(candidate.start, candidate.resume)), block=block,
                     kind="block" if whole_block else KIND_NAMES[kind], score=float(score),
                     **fields)


def search_fingerprint(spec: SearchSpec, fingerprint: dict | None = None) -> dict:
  """What a state file must match to be resumed: the caller's fingerprint and the search spec.
  The ordering does not depend on how far it runs: a longer or shorter run may resume it."""
  identity = dataclasses.asdict(spec)
  if not spec.one_shot:
    identity.pop("num_steps")
  # The default tie break is left out, so that state files from before the option resume.
  if spec.tie_break is TieBreak.SUBLAYER_ID:
    identity.pop("tie_break")
  return dict(fingerprint or {}, spec=identity)


def load_state(path: str | None, fingerprint: dict) -> list[RemovalStep]:
  """The recorded steps of a state file (none if absent); an error if it holds another search.
  Process 0 reads it and every process gets its copy, so all make the same decision."""
  state = distributed.on_primary(lambda: read_json(path) if path is not None else None)
  if state is None:
    return []
  stored = state.get("fingerprint") or {}
  # A state written before weights and tokenizer were fingerprinted: resumable on the rest.
  legacy = [k for k in ("weights", "tokenizer") if k not in stored and k in fingerprint]
  if legacy:
    logging.warning("%s has no %s fingerprint (an older version wrote it): resuming on the "
                    "model path, dtype, tokens and settings alone", path, " or ".join(legacy))
    fingerprint = {k: v for k, v in fingerprint.items() if k not in legacy}
  if stored != fingerprint:
    raise SearchStateError(
        f"{path} holds a different search ({_differences(stored, fingerprint)} "
        f"differ); "
        f"use a new run directory or delete it to start over")
  return [RemovalStep.from_json(s, f"{path}, step {i}") for i, s in enumerate(state["steps"])]


def _differences(stored: dict, current: dict) -> str:
  """Which fingerprint entries differ, by name (`spec` entries by their own names)."""
  names = []
  for key in sorted(set(stored) | set(current)):
    a, b = stored.get(key), current.get(key)
    if key == "spec" and isinstance(a, dict) and isinstance(b, dict):
      names += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      names.append({"tokens_sha256": "calibration tokens"}.get(key, key))
  return ", ".join(names) or "its format"


def greedy_search(scorer: Scorer, spec: SearchSpec, *, state_path: str | None = None,
                  fingerprint: dict | None = None,
                  on_step: Callable[[RemovalStep], None] | None = None) -> list[RemovalStep]:
  """Runs (or resumes) the search; returns one record per removal, in order. Every process of a
  multi-process job runs it and gets the same records; process 0 writes the state."""
  fingerprint = search_fingerprint(spec, fingerprint)
  steps = load_state(state_path, fingerprint)
  pool = spec.pool_candidates()

  def save():  # a failed write (a full disk) stops every process, not only process 0
    if state_path is not None:
      distributed.on_primary(
          lambda: atomic_write_json(state_path, {"fingerprint": fingerprint,
                                                 "steps": [s.to_json() for s in steps]}))

  if spec.one_shot and not steps:
    scores, stats = scorer.score(np.ones((spec.num_layers, 2), bool), pool)  # all exact
    order = sorted(range(len(pool)), key=lambda i: (scores[i], spec.tie_key(pool[i])))
    per_step = stats.seconds / spec.total_steps
    for t, i in enumerate(order[:spec.total_steps]):
      steps.append(removal_step(t, pool[i], scores[i], seconds=per_step,
                                stats=stats.as_dict() if t == 0 else None))
      if on_step:
        on_step(steps[-1])
    save()
    return steps

  for record in steps:  # resumed steps are reported again, for progress displays
    if on_step:
      on_step(record)
  while len(steps) < spec.total_steps:
    removed = {r.sublayer for r in steps}
    front = spec.protected_blocks(len(steps))
    remaining = [c for c in pool if c.start not in removed]
    # Protection never leaves the search without candidates: it lifts when the rest are gone.
    candidates = [c for c in remaining if c.start >= 2 * front] or remaining
    keep = keep_mask(spec.num_layers, [r.sublayers for r in steps])
    try:
      scores, complete, stats = scorer.score_step(keep, candidates, bound=True)
    except NonFiniteError as e:
      raise NonFiniteError(f"step {len(steps)}: {e}") from None
    # Only complete scores compete: an incomplete one provably exceeds the best complete one.
    best = min(range(len(candidates)), key=lambda i: (
        scores[i] if complete[i] else np.inf, spec.tie_key(candidates[i])))
    record = removal_step(
        len(steps), candidates[best], scores[best], seconds=stats.seconds, stats=stats.as_dict(),
        scores={str(c.start): float(s) for c, s in zip(candidates, scores)},
        lower_bounds=tuple(c.start for c, done in zip(candidates, complete) if not done))
    steps.append(record)
    save()
    if on_step:
      on_step(record)
  return steps
