"""Plain references for the scorer and search tests, written independently of the scorer.

Everything here is the slow, obvious computation: one full forward pass of the model per
candidate with the keep mask (`finercut_jax.model.modules.forward`), logits materialized, the
divergence computed in float64 with numpy straight from each metric's definition (the list in
`scoring/divergence.py`'s docstring, written out again in `divergence` below), and a greedy loop
that scores every remaining candidate and removes the argmin (ties: lowest sublayer id).

The tiny model: 6 blocks (12 sublayers, so the prefix-reuse accounting of test 4 can reach its
bound), GQA with 8 query and 4 KV heads of head_dim 4, hidden 16, FFN 32, vocab 64. Every
tensor-parallel dimension (heads, KV heads, FFN units, vocab) divides a 4-way model axis at head
granularity. Weights have std 0.3 (not 0.02) so that every sublayer matters: the scores are
O(1e-4..10) by metric (js_official, averaged over the vocabulary too, is the smallest), far
above float32 rounding relative to each metric's scale, and the greedy steps have clear winners.
Norm weights are 1 + 0.1*normal, so that a norm weight not applied shows. `TINY_MOE` is the same
model with Mixtral's FFN: top-2 of 4 experts of width 32. The weights are drawn
with numpy, not `jax.random`: on CPU, XLA takes seconds to compile `jax.random.normal` for each
new shape.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from finercut_jax.model.architecture import LlamaConfig
from finercut_jax.model.modules import Llama, forward, param_shapes
from finercut_jax.parallel.sharding import make_mesh
from finercut_jax.scoring.scorer import Scorer
from finercut_jax.search.greedy import SearchSpec, greedy_search

TINY = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=6, num_heads=8,
                   num_kv_heads=4, head_dim=4, rope_theta=10000.0, tie_embeddings=False)
TINY_MOE = dataclasses.replace(TINY, model_type="mixtral", num_experts=4, num_experts_per_tok=2)
CONFIGS = {"llama": TINY, "mixtral": TINY_MOE}
N, T = 2, 8  # 16 positions
POSITION_BLOCK = 4  # 4 position blocks: the fused LM-head loop and early termination both run
METRICS = ("js", "js_official", "kl", "angular", "logit_l2", "ppl")

_forward = jax.jit(forward, static_argnums=1)


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0, family: str = "llama"):
  """(cfg, params, tokens) of the tiny model (`family` "llama" or "mixtral"); cached so that every
  test shares one copy."""
  cfg = CONFIGS[family]
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
    return jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, param_shapes(cfg),
                                            is_leaf=lambda x: isinstance(x, tuple))
  tokens = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, (N, T)).astype(np.int32)
  return cfg, params, tokens


def logits64(params, cfg, tokens, keep=None) -> np.ndarray:
  """`[N*T, V]` float64 logits of the model with the keep mask (full forward, nothing reused)."""
  keep = np.ones((cfg.num_layers, 2), bool) if keep is None else np.asarray(keep, bool)
  out = _forward(params, cfg, jnp.asarray(tokens), jnp.asarray(keep))
  return np.asarray(out, np.float64).reshape(-1, cfg.vocab_size)


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def divergence(metric: str, dense: np.ndarray, pruned: np.ndarray, tokens: np.ndarray) -> float:
  """The metric of pruned logits vs dense logits `[N*T, V]`, float64, from the definitions."""
  if metric in ("js", "js_official", "kl"):
    logp, logq = _log_softmax(dense), _log_softmax(pruned)
    p, q = np.exp(logp), np.exp(logq)
    m = 0.5 * (p + q)
    logm = np.log(m)
    if metric == "kl":  # KL(P||Q) summed over the vocabulary, mean over positions
      return float(np.mean(np.sum(p * (logp - logq), axis=-1)))
    if metric == "js":  # 0.5 KL(P||M) + 0.5 KL(Q||M), mean over positions
      kl_pm = np.sum(p * (logp - logm), axis=-1)
      kl_qm = np.sum(q * (logq - logm), axis=-1)
      return float(np.mean(0.5 * kl_pm + 0.5 * kl_qm))
    # js_official: 0.5 [KL(M||P) + KL(M||Q)], averaged over all position*vocab elements.
    elements = m * (logm - logp) + m * (logm - logq)
    return float(0.5 * np.mean(elements))
  if metric == "angular":  # arccos(cosine) / pi per position, mean
    cos = np.sum(dense * pruned, -1) / (np.linalg.norm(dense, axis=-1) * np.linalg.norm(pruned, axis=-1))
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi))
  if metric == "logit_l2":  # Euclidean distance of logit vectors, mean over positions
    return float(np.mean(np.linalg.norm(pruned - dense, axis=-1)))
  if metric == "ppl":  # next-token NLL of the pruned model; the last position has no target
    n, t = tokens.shape
    logq = _log_softmax(pruned).reshape(n, t, -1)
    nll = [-logq[i, j, tokens[i, j + 1]] for i in range(n) for j in range(t - 1)]
    return float(np.mean(nll))
  raise ValueError(metric)


def without(keep: np.ndarray, sublayers) -> np.ndarray:
  flat = np.asarray(keep, bool).reshape(-1).copy()
  flat[list(sublayers)] = False
  return flat.reshape(-1, 2)


def reference_scores(metric, params, cfg, tokens, keep, candidates) -> np.ndarray:
  """Score of each candidate (an object with `.start`, `.resume`, or a tuple of sublayers)."""
  dense = logits64(params, cfg, tokens)
  out = []
  for c in candidates:
    subs = range(c.start, c.resume) if hasattr(c, "start") else c
    out.append(divergence(metric, dense, logits64(params, cfg, tokens, without(keep, subs)), tokens))
  return np.asarray(out)


def pool(kind: str, num_layers: int) -> list[tuple[int, ...]]:
  """Candidate pools as tuples of sublayer ids (sublayer 2b is block b's attention, 2b+1 its FFN):
  `sublayers` every sublayer, `attn` / `ffn` those of one kind, `blocks` both sublayers of a block
  as one candidate."""
  if kind == "blocks":
    return [(2 * b, 2 * b + 1) for b in range(num_layers)]
  kinds = {"sublayers": (0, 1), "attn": (0,), "ffn": (1,)}[kind]
  return [(2 * b + k,) for b in range(num_layers) for k in kinds]


def reference_greedy(metric, params, cfg, tokens, kind="sublayers", num_steps=None,
                     protect_front=None):
  """The greedy loop. Returns (removed sublayer tuples in order, winning scores, margins, and per
  step a dict first sublayer -> score of every candidate scored), the margin being the relative
  gap between a step's best and second-best score (how far the ordering is from a tie, so a
  tolerance on scores cannot flip it)."""
  candidates = pool(kind, cfg.num_layers)
  n = len(candidates)
  num_steps = num_steps or n
  dense = logits64(params, cfg, tokens)
  keep = np.ones((cfg.num_layers, 2), bool)
  removed, scores, margins, all_scores = [], [], [], []
  for step in range(num_steps):
    remaining = [c for c in candidates if c not in removed]
    if protect_front is not None and step < int(n * protect_front) + 1:
      held = int(n * protect_front / 2)  # blocks 0..held are not candidates yet
      remaining = [c for c in remaining if c[0] // 2 > held]
    s = [divergence(metric, dense, logits64(params, cfg, tokens, without(keep, c)), tokens)
         for c in remaining]
    all_scores.append({c[0]: v for c, v in zip(remaining, s)})
    order = sorted(range(len(s)), key=lambda i: (s[i], remaining[i][0]))
    best = order[0]
    if len(order) > 1:
      margins.append((s[order[1]] - s[best]) / max(abs(s[best]), 1e-30))
    removed.append(remaining[best])
    scores.append(s[best])
    keep = without(keep, remaining[best])
  return removed, np.asarray(scores), np.asarray(margins), all_scores


def assert_scores_close(got, want, rtol, what=""):
  """Relative agreement, with the worst offender in the message."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
  worst = int(np.argmax(rel)) if rel.size else 0
  assert np.all(rel <= rtol), (f"{what}: max relative error {rel.max():.3g} at {worst} "
                               f"(got {got[worst]!r}, want {want[worst]!r}); tolerance {rtol}")


def check_search(records, reference, rtol, what=""):
  """A greedy search's records against `reference_greedy`'s result: the same removals in the same
  order, the same winning scores, and every candidate score the search reports equal to the
  reference's, except those it marks as early-terminated lower bounds, which must not exceed it."""
  removed, scores, _, step_scores = reference
  got_order = [tuple(r["sublayers"]) for r in records]
  assert got_order == removed, f"{what}: ordering {got_order} != reference {removed}"
  assert_scores_close([r["score"] for r in records], scores, rtol, f"{what} winning scores")
  for r, want in zip(records, step_scores):
    if "scores" not in r:
      continue
    got = {int(k): v for k, v in r["scores"].items()}
    assert set(got) == set(want), f"{what} step {r['step']}: candidates {sorted(got)} != {sorted(want)}"
    bounds = set(r.get("lower_bounds") or ())
    exact = sorted(set(got) - bounds)
    assert_scores_close([got[k] for k in exact], [want[k] for k in exact], rtol,
                        f"{what} step {r['step']} scores")
    for k in bounds:
      assert got[k] <= want[k] * (1 + rtol), (f"{what} step {r['step']}: lower bound {got[k]} of "
                                              f"candidate {k} exceeds its score {want[k]}")


def abstract_params(params):
  """The parameter pytree as `jax.ShapeDtypeStruct`s: what the abstract (AOT) scorer takes."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def params_digest(params, tokens) -> str:
  """A hash of the model and tokens, so that two processes can check they built the same ones."""
  h = hashlib.sha256(np.asarray(tokens).tobytes())
  for leaf in jax.tree.leaves(params):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def shared_scorer(metric: str, family: str = "llama"):
  """One scorer per metric on one device (chunk width 1), shared by the tests of a session.

  Compiling a scorer's programs dominates these tests' time on a CPU. Sharing also tests that a
  scorer stays exact whatever it scored before (its caches are reused across calls and searches).
  """
  cfg, params, tokens = tiny_model(family=family)
  return Scorer(Llama.from_params(cfg, params), tokens, metric=metric, chunk_width=1,
                position_block=POSITION_BLOCK, mesh=make_mesh(1, 1),
                max_candidates=2 * cfg.num_layers)


def as_json(steps) -> list[dict]:
  """Removal steps (`rundir.RemovalStep`) as the JSON objects a search state file holds: what
  the tests check is that contract."""
  return [s.to_json() for s in steps]


@functools.lru_cache(maxsize=None)
def shared_search(metric: str = "js", family: str = "llama"):
  """The full greedy ordering of the tiny model by the shared scorer (step records as JSON)."""
  cfg = tiny_model(family=family)[0]
  return tuple(as_json(greedy_search(shared_scorer(metric, family),
                                     SearchSpec(num_layers=cfg.num_layers))))


@functools.lru_cache(maxsize=None)
def shared_reference_greedy(metric: str = "js", kind: str = "sublayers", protect_front=None,
                            family: str = "llama"):
  cfg, params, tokens = tiny_model(family=family)
  return reference_greedy(metric, params, cfg, tokens, kind, protect_front=protect_front)
