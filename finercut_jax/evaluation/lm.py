"""The model side of evaluation: any dense or pruned model as one jit-compiled scoring engine.

`EvalModel` wraps a dense or pruned `Llama` (a pruned one holds only its kept sublayers), so
perplexity, benchmarks, the lm-eval adapter, throughput and KV-cache decoding all run the model's
own modules, and removed sublayers cost nothing.

Log-likelihood scoring (`loglikelihood_tokens`) follows lm-evaluation-harness: the model reads
`(context + continuation)[-(max_length+1):][:-1]` and the continuation's tokens are scored at the
last positions; `is_greedy` says whether argmax decoding reproduces them. A context is read once
for all of its continuations: one row holds the context and then each continuation's tokens as
a segment of its own, at the positions it would have after the context and attending only to
the context and itself (`model.attend`'s segments), so a multiple-choice question costs its
context once, not once per choice. Rows are right-padded to a few bucket lengths and batched
under a token budget, and only the scored positions go through the LM head. The compiled shapes
are (rows, bucket length, scored slots) from small fixed sets, so nothing recompiles per item.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.model.architecture import LlamaConfig
from finercut_jax.model.modules import Llama, Params
from finercut_jax.parallel import distributed


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """Shapes the scorer compiles for. Lengths beyond the last bucket round up to a multiple of it."""
  seq_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048)
  slot_buckets: tuple[int, ...] = (16, 64, 256, 1024)
  tokens_per_batch: int = 1024  # rows per batch = max(1, tokens_per_batch // bucket length)
  max_batch: int = 64
  max_length: int = 2048  # the harness's max_length: longer inputs are truncated on the left
  share_contexts: bool = True  # one row per context for all its continuations (False: one each)


class EvalModel:
  """A dense or pruned `Llama` under a name. Its compiled calls take the model split once into
  graph and state (`nnx.split`), so nothing is re-split or recompiled per batch."""

  def __init__(self, model: Llama, name: str = "model"):
    self.model, self.name = model, name
    self.graphdef, self.state = nnx.split(model)

  @property
  def cfg(self) -> LlamaConfig:
    return self.model.config

  @property
  def keep(self) -> np.ndarray:
    """bool `[L, 2]`: the sublayers the model holds."""
    return self.model.present

  @property
  def num_attn(self) -> int:
    return int(self.keep[:, 0].sum())

  @property
  def num_ffn(self) -> int:
    return int(self.keep[:, 1].sum())

  @property
  def num_removed(self) -> int:
    return int((~self.keep).sum())

  def num_params(self) -> int:
    return self.model.num_params()

  @property
  def compute_dtype(self):
    return self.model.compute_dtype

  @classmethod
  def wrap(cls, model, name: str | None = None) -> "EvalModel":
    """From a `Llama` (dense or pruned) or an `EvalModel` (returned unchanged)."""
    if isinstance(model, EvalModel):
      return model
    if isinstance(model, Llama):
      return cls(model, name or ("dense" if model.present.all() else "pruned"))
    raise TypeError(f"cannot evaluate a {type(model).__name__}: pass a Llama")

  @classmethod
  def from_dense(cls, cfg: LlamaConfig, params: Params, keep=None, *, name: str = "dense",
                 dtype=None) -> "EvalModel":
    """Dense checkpoint-layout params with an optional keep mask, bool `[L, 2]` (removed
    sublayers dropped)."""
    model = Llama.from_params(cfg, params, dtype=dtype)
    return cls(model if keep is None else model.prune(keep), name)

  # -------------------------------------------------------------------------- compiled calls

  def score_slots(self, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray,
                  slot_pos: np.ndarray, slot_tgt: np.ndarray):
    """Log-probabilities and greedy flags `[B, C]` of `slot_tgt` at row indices `slot_pos`, for
    rows of `tokens` at `positions` in `segments` (all `[B, S]`; see `model.attend`).

    tokens, positions, segments: int32 [B, S]; slot_pos, slot_tgt: int32 [B, C].
    Returns (log-probabilities: float32 [B, C], greedy: bool [B, C]).
    """
    return score_slots(self.graphdef, self.state, *map(jnp.asarray, (
        tokens, positions, segments, slot_pos, slot_tgt)))

  def logits(self, tokens: np.ndarray) -> jax.Array:
    """Full logits `[B, T, V]` (float32); for tests and small inputs.

    tokens: int32 [B, T]. Returns float32 [B, T, V].
    """
    return self.model(jnp.asarray(tokens))


@functools.partial(jax.jit, static_argnums=0)
def score_slots(graphdef, state, tokens, positions, segments, slot_pos, slot_tgt):
  """The compiled scoring program behind `EvalModel.score_slots`, on the model split into
  `graphdef` (static) and `state` (`nnx.split`); only the scored positions go through the LM head.

  tokens, positions, segments: int32 [B, S]; slot_pos, slot_tgt: int32 [B, C].
  Returns (log p(slot_tgt): float32 [B, C], greedy: bool [B, C]).
  """
  model = nnx.merge(graphdef, state)
  h = model.hidden(tokens, positions=positions, segments=segments)
  # Only the scored positions go through the LM head: [B, C, D] -> [B, C, V].
  h = jnp.take_along_axis(h, slot_pos[..., None], axis=1)
  logp = jax.nn.log_softmax(model.logits(h), axis=-1)
  target_logp = jnp.take_along_axis(logp, slot_tgt[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logp, axis=-1) == slot_tgt
  return target_logp, greedy


# ----------------------------------------------------------------------------- packing


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n; beyond the last, the next multiple of the last bucket."""
  for b in buckets:
    if n <= b:
      return b
  last = buckets[-1]
  return -(-n // last) * last


@dataclasses.dataclass
class _Row:
  """One row of a batch: tokens at positions, in segments (0: the shared context; 1, 2, ...:
  one continuation each), and the scored slots (request index, row index, target token)."""
  tokens: list
  positions: list
  segments: list
  slots: list
  num_segments: int = 0


def _pack(requests, config: ScoringConfig) -> list[_Row]:
  rows: dict[tuple, _Row] = {}
  for i, (ctx, cont) in enumerate(requests):
    ctx, cont = list(ctx), list(cont)
    if not cont:
      raise ValueError(f"request {i} has an empty continuation")
    if not ctx:
      raise ValueError(f"request {i} has an empty context: prefix it with BOS/EOS")
    if config.share_contexts and len(ctx) + len(cont) - 1 <= config.max_length:
      # Nothing is truncated: the context's row, plus this continuation as a new segment. Its
      # first token is predicted at the context's last position, the rest at its own.
      row = rows.setdefault(("context", tuple(ctx)),
                            _Row(ctx, list(range(len(ctx))), [0] * len(ctx), []))
      row.num_segments += 1
      row.slots.append((i, len(ctx) - 1, cont[0]))
      offset = len(row.tokens)
      row.tokens = row.tokens + cont[:-1]
      row.positions = row.positions + list(range(len(ctx), len(ctx) + len(cont) - 1))
      row.segments = row.segments + [row.num_segments] * (len(cont) - 1)
      row.slots += [(i, offset + j - 1, cont[j]) for j in range(1, len(cont))]
      continue
    whole = (ctx + cont)[-(config.max_length + 1):]
    inp = whole[:-1]
    n_cont = min(len(cont), len(inp))
    start = len(inp) - n_cont
    # Requests whose input tokens are identical (one-token answers to one prompt) share a row.
    row = rows.setdefault(("input", tuple(inp)),
                          _Row(inp, list(range(len(inp))), [0] * len(inp), []))
    row.slots += [(i, start + j, whole[start + j + 1]) for j in range(n_cont)]
  return list(rows.values())


def loglikelihood_tokens(model: EvalModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                         config: ScoringConfig | None = None) -> list[tuple[float, bool]]:
  """`(sum of log p(continuation | context), is_greedy)` per `(context_ids, continuation_ids)`.

  The context must hold at least one token (the harness puts BOS/EOS there for empty contexts).
  """
  config = config or ScoringConfig()
  groups: dict[tuple[int, int], list[_Row]] = {}
  for row in _pack(requests, config):
    S = bucket(len(row.tokens), config.seq_buckets)
    C = min(bucket(len(row.slots), config.slot_buckets), max(S, len(row.slots)))
    groups.setdefault((S, C), []).append(row)

  logp = np.zeros(len(requests), np.float64)
  greedy = np.ones(len(requests), bool)
  for (S, C), group in sorted(groups.items()):
    per_batch = max(1, min(config.max_batch, config.tokens_per_batch // S))
    for b0 in range(0, len(group), per_batch):
      batch = group[b0:b0 + per_batch]
      # A partial batch is padded to a full one: one compiled shape per (bucket, slots), and
      # on a CPU (compute-bound) a small `tokens_per_batch` keeps the padding cheap. Padding
      # tokens are a segment (-1) of their own that no real token sees.
      B = per_batch
      tokens = np.zeros((B, S), np.int32)
      positions = np.zeros((B, S), np.int32)
      segments = np.full((B, S), -1, np.int32)
      pos = np.zeros((B, C), np.int32)
      tgt = np.zeros((B, C), np.int32)
      for r, row in enumerate(batch):
        n = len(row.tokens)
        tokens[r, :n], positions[r, :n], segments[r, :n] = row.tokens, row.positions, row.segments
        for c, (_, p, t) in enumerate(row.slots):
          pos[r, c], tgt[r, c] = p, t
      lp, gr = model.score_slots(tokens, positions, segments, pos, tgt)
      lp, gr = distributed.gather(lp).astype(np.float64), distributed.gather(gr)
      for r, row in enumerate(batch):
        for c, (i, _, _) in enumerate(row.slots):
          logp[i] += lp[r, c]
          greedy[i] &= bool(gr[r, c])
  return [(float(l), bool(g)) for l, g in zip(logp, greedy)]


def encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
  """Token ids as lm-eval 0.4.13's HFLM makes them: with `add_special_tokens=None` the tokenizer's
  own default (a Llama-3 tokenizer prepends BOS, SmolLM2's adds nothing), except that a string
  already starting with the prefix token's text gets none added."""
  kwargs = {}
  if add_special_tokens is not None:
    kwargs["add_special_tokens"] = add_special_tokens
  else:
    special = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
        tokenizer.eos_token_id
    prefix = tokenizer.decode([special]) if special is not None else ""
    if prefix and text.startswith(prefix):
      kwargs["add_special_tokens"] = False
  return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-eval's split: trailing context spaces move to the continuation; the continuation's ids
  are the whole string's ids after the context's (so a merge across the boundary is scored as
  the model would have produced it)."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = encode(tokenizer, context + continuation)
  ctx = encode(tokenizer, context)
  return ctx, whole[len(ctx):]


def prefix_token_id(tokenizer) -> int:
  """What conditions an empty context: BOS, else EOS (as lm-eval's HFLM)."""
  if tokenizer.bos_token_id is not None:
    return int(tokenizer.bos_token_id)
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has neither a BOS nor an EOS token, so an empty context "
                     "cannot be scored; give it one (e.g. tokenizer.eos_token = ...)")
  return int(tokenizer.eos_token_id)


def loglikelihood(model: EvalModel, tokenizer, pairs: Sequence[tuple[str, str]],
                  config: ScoringConfig | None = None) -> list[tuple[float, bool]]:
  """Harness-style log-likelihood of `(context, continuation)` string pairs."""
  requests = []
  for context, continuation in pairs:
    if context == "":
      cont = encode(tokenizer, continuation, add_special_tokens=False)
      bos = prefix_token_id(tokenizer)
      requests.append(([bos], cont) if cont[0] != bos else (cont[:1], cont[1:]))
    else:
      requests.append(encode_pair(tokenizer, context, continuation))
  return loglikelihood_tokens(model, requests, config)
