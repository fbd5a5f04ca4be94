"""How far a pruned model's outputs are from the dense model's, per position, in float32.

Each metric is split in two so that the scorer never materializes `[candidates, N, T, vocab]`:
`reference(metric, logits)` turns the dense model's logits into what the metric compares against
(computed once per search), and `position_terms(metric, ref, logits, targets)` maps a block of
positions of one candidate to per-position values. The score is `sum(terms * weights)`, with
`position_weights` making it the mean the metric defines; `weighted_sum` is that sum for a block,
computed the fast way.

  js           textbook Jensen-Shannon: 0.5*KL(P||M) + 0.5*KL(Q||M), M=(P+Q)/2, summed over the
               vocabulary, mean over positions (the paper's metric; default)
  js_official  0.5*[KL(M||P) + KL(M||Q)], averaged over all position*vocab elements: what the
               official FinerCut code computes (KL direction reversed), to reproduce its orderings
  kl           KL(P||Q), mean over positions
  angular      arccos(cosine(logits_P, logits_Q)) / pi, mean over positions
  logit_l2     Euclidean distance between logit vectors, mean over positions
  ppl          next-token NLL of the pruned model on the calibration tokens (log perplexity)
"""
from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np


class Metric(enum.StrEnum):
  """The divergences above; the values are the names configs and flags use."""
  JS = "js"
  JS_OFFICIAL = "js_official"
  KL = "kl"
  ANGULAR = "angular"
  LOGIT_L2 = "logit_l2"
  PPL = "ppl"


METRICS = tuple(m.value for m in Metric)


def check_metric(metric: Metric | str) -> Metric:
  """`metric` as a `Metric`; a `ValueError` naming the choices if it is none of them."""
  try:
    return Metric(metric)
  except ValueError:
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}") from None


def reference(metric: Metric | str, logits: jax.Array) -> jax.Array | None:
  """What the metric keeps of the dense model's logits `float [P, V]`: `float32 [P, V]`
  log-probabilities (KL family) or logits (`angular`, `logit_l2`), or None (`ppl`: nothing)."""
  metric = check_metric(metric)
  logits = logits.astype(jnp.float32)
  if metric in _VOCAB_SUMS:
    return jax.nn.log_softmax(logits, axis=-1)
  if metric in (Metric.ANGULAR, Metric.LOGIT_L2):
    return logits
  return None


def position_terms(metric: Metric | str, ref, logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-position values, all >= 0.

  ref: `reference(metric, ...)`, `float32 [P, V]` (None for `ppl`); logits: the candidates'
  `float [..., P, V]`; targets: `int32 [P]` next tokens (`ppl`; -1: none). Returns
  `float32 [..., P]`.
  """
  metric = check_metric(metric)
  logits = logits.astype(jnp.float32)
  if metric in _VOCAB_SUMS:
    return jnp.maximum(jnp.sum(_vocab_terms(metric, ref, logits), axis=-1), 0.0)
  if metric is Metric.PPL:
    logq = logits - _logsumexp(logits)
    safe = jnp.maximum(targets, 0)
    return -jnp.take_along_axis(logq, jnp.broadcast_to(safe, logq.shape[:-1])[..., None],
                                axis=-1)[..., 0]
  if metric is Metric.ANGULAR:
    # Row dot products as contractions, not as reductions of products: XLA:CPU runs a reduction
    # over the last axis of a fused elementwise computation many times slower.
    dot = lambda a, b: jnp.einsum("...v,...v->...", a, b)
    ref = jnp.broadcast_to(ref, logits.shape)
    cosine = dot(ref, logits) / jnp.sqrt(dot(ref, ref) * dot(logits, logits))
    return jnp.arccos(jnp.clip(cosine, -1.0, 1.0)) / jnp.pi
  if metric is Metric.LOGIT_L2:
    return jnp.linalg.norm(logits - ref, axis=-1)
  raise ValueError(f"unknown metric {metric!r}")


def weighted_sum(metric: Metric | str, ref, logits: jax.Array, targets: jax.Array,
                 weights: jax.Array) -> jax.Array:
  """`sum_p weights[p] * terms[..., p]`, `float32 [...]`, for candidate logits `float [..., P, V]`
  (`ref`, `targets` as for `position_terms`, weights `float32 [P]`): the scorer's form.

  For the KL family every element is weighted and summed over positions and vocabulary at once,
  then clamped at 0 (a block sum is >= 0 but for float rounding): a running total of these is
  then a lower bound of the score at every block. One reduction over both axes runs several
  times faster on XLA:CPU than per-position sums over the vocabulary.
  """
  metric = check_metric(metric)
  logits = logits.astype(jnp.float32)
  if metric in _VOCAB_SUMS:
    terms = _vocab_terms(metric, ref, logits) * weights[:, None]
    return jnp.maximum(jnp.sum(terms, axis=(-2, -1)), 0.0)
  return jnp.sum(position_terms(metric, ref, logits, targets) * weights, axis=-1)


_VOCAB_SUMS = (Metric.JS, Metric.JS_OFFICIAL, Metric.KL)
_TINY = float(np.finfo(np.float32).tiny)


def _logsumexp(logits: jax.Array) -> jax.Array:
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  return top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))


def _vocab_terms(metric: Metric, logp, logits: jax.Array) -> jax.Array:
  """Per-element terms `[..., P, V]` whose sum over the vocabulary is a position's KL or JS.

  Q is exp(log Q) again rather than the softmax's own exp divided by its sum: XLA then keeps the
  whole computation in one fusion instead of writing `[P, V]` intermediates (2x faster on a CPU).
  M = (P+Q)/2 from the probabilities: one log per element instead of a logaddexp. Where M
  underflows to 0, P and Q both have, and every term's limit is 0 (x log x -> 0): with log M
  taken of max(M, tiny) the term is 0 * finite. NaN propagates (jnp.maximum keeps it), so a NaN
  reaches the score and its finiteness check.
  """
  logq = logits - _logsumexp(logits)
  p, q = jnp.exp(logp), jnp.exp(logq)
  if metric is Metric.KL:
    return p * (logp - logq)
  m = 0.5 * (p + q)
  logm = jnp.log(jnp.maximum(m, _TINY))
  if metric is Metric.JS:
    return 0.5 * (p * (logp - logm) + q * (logq - logm))
  return 0.5 * m * (2.0 * logm - logp - logq)  # js_official: KL(M||P) + KL(M||Q), M the target


def position_weights(metric: Metric | str, tokens: np.ndarray,
                     vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """For calibration tokens `int [N, T]`: `(targets int32 [N*T], weights float32 [N*T])` so
  that `score = sum(terms * weights)`.

  For `ppl` the last position of each sequence has no next token (target -1) and weighs nothing;
  the other metrics have no targets (all -1).
  """
  metric = check_metric(metric)
  n, t = tokens.shape
  if metric is Metric.PPL:
    targets = np.concatenate([tokens[:, 1:], np.full((n, 1), -1, tokens.dtype)], axis=1).reshape(-1)
    weights = (targets >= 0).astype(np.float32) / (n * (t - 1))
    return targets.astype(np.int32), weights
  scale = 1.0 / (n * t) / (vocab_size if metric is Metric.JS_OFFICIAL else 1)
  return np.full(n * t, -1, np.int32), np.full(n * t, scale, np.float32)
