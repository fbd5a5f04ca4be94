"""How far a pruned model's outputs are from the dense model's, per position, in float32.

Each metric is split in two so that the scorer never materializes `[candidates, N, T, vocab]`:
`reference(metric, logits)` turns the dense model's logits into what the metric compares against
(computed once per search), and `position_terms(metric, ref, logits, targets)` maps a block of
positions of one candidate to per-position values. The score is `sum(terms * weights)`, with
`position_weights` making it the mean the metric defines.

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

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("js", "js_official", "kl", "angular", "logit_l2", "ppl")


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
  return metric


def reference(metric: str, logits: jax.Array) -> jax.Array | None:
  """What the metric keeps of the dense model's float32 logits `[P, V]` (None: nothing)."""
  logits = logits.astype(jnp.float32)
  if metric in ("js", "js_official", "kl"):
    return jax.nn.log_softmax(logits, axis=-1)
  if metric in ("angular", "logit_l2"):
    return logits
  return None


def position_terms(metric: str, ref, logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-position values `[..., P]` for candidate logits `[..., P, V]` (float32); all are >= 0."""
  logits = logits.astype(jnp.float32)
  if metric == "ppl":
    logq = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.maximum(targets, 0)
    return -jnp.take_along_axis(logq, jnp.broadcast_to(safe, logq.shape[:-1])[..., None],
                                axis=-1)[..., 0]
  if metric == "angular":
    dot = jnp.sum(ref * logits, axis=-1)
    norms = jnp.linalg.norm(ref, axis=-1) * jnp.linalg.norm(logits, axis=-1)
    return jnp.arccos(jnp.clip(dot / norms, -1.0, 1.0)) / jnp.pi
  if metric == "logit_l2":
    return jnp.linalg.norm(logits - ref, axis=-1)
  # KL and JS are >= 0; clamping float rounding below zero keeps every partial sum of a score a
  # lower bound of it, which the scorer's early termination relies on.
  logp = ref
  q, logq = _softmax_and_log(logits)
  p = jnp.exp(logp)
  if metric == "kl":
    return jnp.maximum(jnp.sum(p * (logp - logq), axis=-1), 0.0)
  # M = (P+Q)/2 from the probabilities: one log per element instead of a logaddexp (an exp and a
  # log1p), 2.5x faster on a CPU. M only underflows to 0 where P and Q both do; the limit of
  # every term there is 0 (x log x -> 0), which the `where` makes explicit instead of 0 * -inf.
  # It tests `m == 0`, not `m > 0`: a NaN must reach the score (and its finiteness check), and
  # `NaN > 0` is false. jnp.maximum propagates NaN too.
  m = 0.5 * (p + q)
  logm = jnp.log(m)
  if metric == "js":
    terms = p * (logp - logm) + q * (logq - logm)
  else:  # js_official: KL(M||P) + KL(M||Q) with M as the target distribution.
    terms = m * (2.0 * logm - logp - logq)
  return jnp.maximum(0.5 * jnp.sum(jnp.where(m == 0, 0.0, terms), axis=-1), 0.0)


def _softmax_and_log(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """softmax and log_softmax over the last axis sharing one exp per element."""
  z = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(z)
  total = jnp.sum(e, axis=-1, keepdims=True)
  return e / total, z - jnp.log(total)


def position_weights(metric: str, tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """`(targets [N*T], weights [N*T])` so that `score = sum(terms * weights)`.

  For `ppl` the last position of each sequence has no next token and weighs nothing.
  """
  n, t = tokens.shape
  if metric == "ppl":
    targets = np.concatenate([tokens[:, 1:], np.full((n, 1), -1, tokens.dtype)], axis=1).reshape(-1)
    weights = (targets >= 0).astype(np.float32) / (n * (t - 1))
    return targets.astype(np.int32), weights
  scale = 1.0 / (n * t) / (vocab_size if metric == "js_official" else 1)
  return np.full(n * t, -1, np.int32), np.full(n * t, scale, np.float32)
