"""The typed records a run directory holds as JSON: one removal step, and a ranking (the removal
order a method produced). They read what every earlier version of the product wrote, and write
the same keys, so runs stay readable across versions."""
from __future__ import annotations

import dataclasses
from typing import Any


class RecordError(ValueError):
  """A JSON file of a run directory does not hold the record it should."""


def _require(data: Any, fields: tuple[str, ...], what: str) -> dict:
  if not isinstance(data, dict):
    raise RecordError(f"{what}: expected a JSON object, got {type(data).__name__}")
  missing = [f for f in fields if f not in data]
  if missing:
    raise RecordError(f"{what}: missing {', '.join(missing)}")
  return data


@dataclasses.dataclass(frozen=True)
class RemovalStep:
  """One removal of a ranking: at `step`, the sublayers `sublayers` (ids `2*block + kind`, one
  for a sublayer, two for a whole block) were removed with divergence `score`.

  `stats` are the scorer's accounting of the step (greedy searches), `scores` every candidate's
  score by sublayer id (kept in the search state only) and `lower_bounds` the candidates whose
  score is a lower bound only (their scoring stopped once they could not win).
  """
  step: int
  sublayer: int
  sublayers: tuple[int, ...]
  block: int
  kind: str  # "attn", "ffn" or "block"
  score: float
  seconds: float = 0.0
  stats: dict | None = None
  scores: dict[str, float] | None = None
  lower_bounds: tuple[int, ...] | None = None

  @property
  def name(self) -> str:
    """`attn7`, `ffn16`, `block3`."""
    return f"{self.kind}{self.block}"

  @classmethod
  def from_json(cls, data: Any, where: str = "removal step") -> "RemovalStep":
    data = _require(data, ("step", "sublayers", "block", "kind", "score"), where)
    sublayers = tuple(int(s) for s in data["sublayers"])
    bounds = data.get("lower_bounds")
    return cls(step=int(data["step"]), sublayer=int(data.get("sublayer", sublayers[0])),
               sublayers=sublayers, block=int(data["block"]), kind=str(data["kind"]),
               score=float(data["score"]), seconds=float(data.get("seconds", 0.0)),
               stats=data.get("stats"), scores=data.get("scores"),
               lower_bounds=None if bounds is None else tuple(int(b) for b in bounds))

  def to_json(self, *, with_scores: bool = True) -> dict:
    """The JSON object; `with_scores=False` leaves out the per-candidate scores (as ranking.json
    does: they are in the search state)."""
    out = {"step": self.step, "sublayer": self.sublayer, "sublayers": list(self.sublayers),
           "block": self.block, "kind": self.kind, "score": self.score, "seconds": self.seconds}
    if self.stats is not None:
      out["stats"] = self.stats
    if with_scores and self.scores is not None:
      out["scores"] = self.scores
    if self.lower_bounds is not None:
      out["lower_bounds"] = list(self.lower_bounds)
    return out


@dataclasses.dataclass(frozen=True)
class Ranking:
  """The removal order a method produced on one model (`ranking.json`).

  `pool` is the candidate pool (`sublayers`, `attn`, `ffn`, `blocks`) or a baseline's unit;
  `metric` the divergence a search scored with (None for similarity and random methods).
  `nested` is False where the masks of different ratios are not prefixes of one order (Gromov
  et al.'s best contiguous runs, described per ratio in `runs`).
  """
  model: str
  num_layers: int
  pool: str
  metric: str | None
  steps: tuple[RemovalStep, ...]
  method: str | None = None
  seed: int | None = None
  nested: bool = True
  runs: dict | None = None

  @classmethod
  def from_json(cls, data: Any, where: str = "ranking") -> "Ranking":
    data = _require(data, ("num_layers", "steps"), where)
    if not isinstance(data["steps"], list):
      raise RecordError(f"{where}: steps must be a list")
    return cls(model=data.get("model"), num_layers=int(data["num_layers"]),
               pool=data.get("pool", "sublayers"), metric=data.get("metric"),
               steps=tuple(RemovalStep.from_json(s, f"{where}, step {i}")
                           for i, s in enumerate(data["steps"])),
               method=data.get("method"), seed=data.get("seed"),
               nested=bool(data.get("nested", True)), runs=data.get("runs"))

  def to_json(self) -> dict:
    out = {"model": self.model, "num_layers": self.num_layers}
    if self.method is not None:
      out["method"] = self.method
    out.update(pool=self.pool, metric=self.metric,
               steps=[s.to_json(with_scores=False) for s in self.steps])
    if self.seed is not None:
      out["seed"] = self.seed
    if not self.nested:
      out.update(nested=False, runs=self.runs)
    return out
