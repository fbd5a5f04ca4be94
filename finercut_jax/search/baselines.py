"""The pruning methods FinerCut is compared with, and the removal orders they produce.

Each method is one `Method`: a unit (whole blocks or single sublayers) and how it ranks them.
Three kinds of ranking:

- `search`: the greedy search with the compiled scorer (`greedy.greedy_search`), under another
  metric or candidate pool. SLEB (Song et al. 2024) removes, step by step, the block whose removal
  raises calibration perplexity least: pool `blocks`, metric `ppl`. BlockPruner (Zhong et al.
  2024) does the same over attention and MLP sublayers: pool `sublayers`, metric `ppl`. Both
  choose by perplexity, which is exp of the mean NLL the `ppl` metric scores, so the argmin is
  the same.
- `similarity`: one dense forward pass that keeps the residual stream at every sublayer boundary
  (`Llama.residual_streams`), then a statistic per unit, lowest removed first:
    ShortGPT (Men et al. 2024), block influence `1 - mean_t cos(x_l[t], x_{l+1}[t])` over every
    calibration token, `x_l` the input of block l;
    Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"), the angular
    distance `arccos(cos(x_l[T], x_{l+n}[T])) / pi` between the input of block l and the output of
    block l+n-1 at each sequence's final token T, averaged over sequences; for n blocks the run
    with the smallest distance goes, so its masks are not nested across ratios;
    LLM-Drop (He et al. 2024, "What Matters in Transformers?"), attention drop: each attention
    sublayer's `1 - mean_t cos(input, output)` over every token, attention sublayers only; its joint
    variant ranks attention and FFN sublayers together by the same statistic.
- `random`: a seeded permutation of the units (the comparison runs several seeds).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.model.modules import Llama
from finercut_jax.rundir import RemovalStep
from finercut_jax.scoring.divergence import Metric, check_metric
from finercut_jax.scoring.scorer import Candidate
from finercut_jax.search.greedy import Pool, parse_pool, removal_step


class Unit(enum.StrEnum):
  """What one removal takes out."""
  SUBLAYERS = "sublayers"
  BLOCKS = "blocks"


class RankingKind(enum.StrEnum):
  """How a method ranks its units (see the module docstring)."""
  SEARCH = "search"
  SIMILARITY = "similarity"
  RANDOM = "random"


def parse_unit(unit: Unit | str) -> Unit:
  """`unit` as a `Unit`; a `ValueError` naming the choices if it is none of them."""
  try:
    return Unit(unit)
  except ValueError:
    raise ValueError(f"unknown unit {unit!r}; choose one of {', '.join(Unit)}") from None


@dataclasses.dataclass(frozen=True)
class Method:
  """A pruning method; the enum fields may be given by their names."""
  name: str
  unit: Unit
  ranking: RankingKind
  metric: Metric | None = None  # search methods: the scorer's metric
  pool: Pool | None = None  # search methods: the candidate pool
  description: str = ""

  def __post_init__(self):
    object.__setattr__(self, "unit", parse_unit(self.unit))
    object.__setattr__(self, "ranking", RankingKind(self.ranking))
    if self.metric is not None:
      object.__setattr__(self, "metric", check_metric(self.metric))
    if self.pool is not None:
      object.__setattr__(self, "pool", parse_pool(self.pool))


METHODS = {m.name: m for m in (
    Method("finercut", Unit.SUBLAYERS, RankingKind.SEARCH, Metric.JS, Pool.SUBLAYERS,
           "FinerCut, textbook Jensen-Shannon divergence, greedy over sublayers"),
    Method("finercut_official", Unit.SUBLAYERS, RankingKind.SEARCH, Metric.JS_OFFICIAL,
           Pool.SUBLAYERS, "FinerCut with the official code's divergence (js_official)"),
    Method("shortgpt", Unit.BLOCKS, RankingKind.SIMILARITY,
           description="ShortGPT: block influence (1 - cosine of block input and output), one shot"),
    Method("gromov", Unit.BLOCKS, RankingKind.SIMILARITY,
           description="Gromov et al.: contiguous blocks with the least angular distance"),
    Method("sleb", Unit.BLOCKS, RankingKind.SEARCH, Metric.PPL, Pool.BLOCKS,
           description="SLEB: greedy whole blocks by calibration perplexity"),
    Method("llm_drop", Unit.SUBLAYERS, RankingKind.SIMILARITY,
           description="LLM-Drop attention drop: attention sublayers by 1 - cosine, one shot"),
    Method("llm_drop_joint", Unit.SUBLAYERS, RankingKind.SIMILARITY,
           description="LLM-Drop joint drop: attention and FFN sublayers by 1 - cosine, one shot"),
    Method("blockpruner", Unit.SUBLAYERS, RankingKind.SEARCH, Metric.PPL, Pool.SUBLAYERS,
           description="BlockPruner: greedy attention/MLP sublayers by calibration perplexity"),
    Method("random_sublayers", Unit.SUBLAYERS, RankingKind.RANDOM,
           description="random sublayers (seeded)"),
    Method("random_blocks", Unit.BLOCKS, RankingKind.RANDOM,
           description="random whole blocks (seeded)"),
)}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
  return METHODS[name]


def units_removed(method: Method, ratio: float, num_layers: int) -> int:
  """How many units a method removes at a ratio: `int(ratio * 2L)` sublayers, or for a block
  method the whole-block count nearest to `ratio * L` (halves round up)."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
  sublayers = int(ratio * 2 * num_layers)
  if method.unit is Unit.SUBLAYERS:
    if method.name == "llm_drop" and sublayers > num_layers:
      raise ValueError(f"llm_drop removes attention sublayers only: ratio {ratio:g} asks for "
                       f"{sublayers} of {2 * num_layers} sublayers but there are {num_layers} "
                       f"attention sublayers; use a ratio <= 0.5")
    if sublayers == 0:
      raise ValueError(f"ratio {ratio:g} removes no sublayer of {2 * num_layers}")
    return sublayers
  blocks = math.floor(ratio * num_layers + 0.5)
  if blocks >= num_layers:
    raise ValueError(f"ratio {ratio:g} of {num_layers} blocks rounds to every block")
  if blocks == 0:
    raise ValueError(f"ratio {ratio:g} of {num_layers} blocks rounds to zero whole blocks, so "
                     f"{method.name} would remove nothing; use a ratio of at least "
                     f"{0.5 / num_layers:.3g}")
  return blocks


# ----------------------------------------------------------------------------- similarities


@dataclasses.dataclass
class Similarities:
  """What the similarity methods read from one dense pass over the calibration tokens."""
  sublayer_cosine: np.ndarray  # float64 [L, 2]: mean over tokens of cos(sublayer input, output)
  block_cosine: np.ndarray  # float64 [L]: mean over tokens of cos(block input, output)
  angular: np.ndarray  # float64 [L+1, L+1]: mean over sequences of the final token's angular
                       # distance between block boundaries i and j (boundary l: block l's input)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  dot = jnp.sum(a * b, axis=-1)
  return dot / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


@functools.partial(jax.jit, static_argnums=0)
def _sequence_statistics(graphdef, state, tokens):
  """Per batch of sequences: the summed sublayer and block cosines, and the summed final-token
  angular distances between every pair of block boundaries."""
  model = nnx.merge(graphdef, state)
  x = model.residual_streams(tokens).astype(jnp.float32)  # [2L+1, B, T, D]
  sub = _cosine(x[:-1], x[1:]).sum(axis=(1, 2))  # [2L]
  block = _cosine(x[:-1:2], x[2::2]).sum(axis=(1, 2))  # [L]
  last = x[::2, :, -1]  # [L+1, B, D]
  cos = _cosine(last[:, None], last[None, :])  # [L+1, L+1, B]
  angular = (jnp.arccos(jnp.clip(cos, -1.0, 1.0)) / jnp.pi).sum(axis=-1)
  return sub, block, angular


def similarities(model: Llama, tokens: np.ndarray, batch_size: int = 1) -> Similarities:
  """The dense model's similarity statistics on calibration tokens `int32 [N, T]`, computed
  `batch_size` sequences at a time (the streams of a batch are `[2L+1, B, T, D]`)."""
  if not model.present.all():
    raise ValueError("similarity statistics are measured on the dense model")
  tokens = np.asarray(tokens, np.int32)
  n, t = tokens.shape
  L = model.config.num_layers
  graphdef, state = nnx.split(model)
  sub, block, angular = np.zeros(2 * L), np.zeros(L), np.zeros((L + 1, L + 1))
  for b0 in range(0, n, batch_size):
    batch = tokens[b0:b0 + batch_size]
    if len(batch) < batch_size:  # one compiled shape: pad with copies, drop their share below
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
    s, b, a = jax.device_get(_sequence_statistics(graphdef, state, jnp.asarray(batch)))
    real = min(batch_size, n - b0)
    share = real / batch_size  # copies of one sequence contribute equally
    sub, block, angular = sub + s * share, block + b * share, angular + a * share
  return Similarities(sublayer_cosine=(sub / (n * t)).reshape(L, 2), block_cosine=block / (n * t),
                      angular=angular / n)


# ----------------------------------------------------------------------------- orders


def _ranked(scores: np.ndarray, candidates: list[Candidate]) -> list[RemovalStep]:
  """Removal records, lowest score first (ties: the lowest sublayer id)."""
  order = sorted(range(len(candidates)), key=lambda i: (scores[i], candidates[i].start))
  return [removal_step(t, candidates[i], scores[i]) for t, i in enumerate(order)]


def blocks(num_layers: int) -> list[Candidate]:
  return [Candidate(2 * l, 2 * l + 2) for l in range(num_layers)]


def shortgpt_steps(sim: Similarities) -> list[RemovalStep]:
  """Every block, lowest block influence first."""
  return _ranked(1.0 - sim.block_cosine, blocks(len(sim.block_cosine)))


def llm_drop_steps(sim: Similarities, joint: bool = False) -> list[RemovalStep]:
  """Attention sublayers (with `joint`, every sublayer), lowest `1 - cosine` first."""
  L = sim.sublayer_cosine.shape[0]
  kinds = (0, 1) if joint else (0,)
  candidates = [Candidate(2 * l + k, 2 * l + k + 1) for l in range(L) for k in kinds]
  scores = np.asarray([1.0 - sim.sublayer_cosine[c.start // 2, c.start % 2] for c in candidates])
  return _ranked(scores, candidates)


def gromov_run(sim: Similarities, n: int) -> tuple[int, float]:
  """The first block of the n contiguous blocks whose removal has the least angular distance
  (ties: the shallowest), and that distance."""
  L = sim.angular.shape[0] - 1
  if not 0 < n <= L:
    raise ValueError(f"cannot remove {n} contiguous blocks of {L}")
  distances = np.asarray([sim.angular[l, l + n] for l in range(L - n + 1)])
  start = int(np.argmin(distances))
  return start, float(distances[start])


def gromov_steps(sim: Similarities, n: int) -> list[RemovalStep]:
  """The n blocks of the best contiguous run, in depth order, each scored with the run's
  distance."""
  start, distance = gromov_run(sim, n)
  return [removal_step(t, Candidate(2 * l, 2 * l + 2), distance)
          for t, l in enumerate(range(start, start + n))]


def random_steps(num_layers: int, unit: Unit | str, seed: int) -> list[RemovalStep]:
  """A seeded random order of every block or every sublayer (score: the draw's position)."""
  candidates = blocks(num_layers) if parse_unit(unit) is Unit.BLOCKS else [
      Candidate(s, s + 1) for s in range(2 * num_layers)]
  order = np.random.default_rng(seed).permutation(len(candidates))
  return [removal_step(t, candidates[i], float(t)) for t, i in enumerate(order)]
