"""Perplexity on held-out text: non-overlapping windows of T tokens, each scored on its own.

Held-out means never the calibration tokens: the calibration set is the first N*T tokens of its
source's stream (`data.calibration_tokens`), so for the same source the evaluation text starts at
offset N*T. Each window predicts its tokens 1..T-1 from the ones before (T-1 predictions per
window); perplexity is exp of the mean negative log-likelihood over all predictions.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.data.text import token_stream
from finercut_jax.evaluation.lm import EvalModel
from finercut_jax.parallel import distributed


class HeldOutError(ValueError):
  """Not enough held-out text."""


def heldout_tokens(tokenizer, source: str, offset: int, num_tokens: int, *,
                   calibration: np.ndarray | None = None) -> np.ndarray:
  """`num_tokens` ids of `source`'s token stream starting at `offset` (the calibration set's end).

  With `calibration` (a run's calibration tokens), the stream is checked to start with exactly
  them, so the held-out text provably follows the calibration text.

  calibration: int [N, T] (or any shape of N*T ids). Returns int32 [<= num_tokens].
  """
  stream = token_stream(tokenizer, source)
  if calibration is not None:
    calibration = np.asarray(calibration).reshape(-1)
    if offset != len(calibration) or not np.array_equal(stream[:offset], calibration):
      raise HeldOutError(
          f"the run's calibration tokens are not the first {offset} tokens of {source!r} as "
          f"tokenized now (tokenizer or data code changed since the search?): the held-out "
          f"text cannot be placed after them; set eval.perplexity.source to another text")
  available = len(stream) - offset
  if available < 2:
    raise HeldOutError(f"text source {source!r} has {len(stream)} tokens: nothing is left after "
                       f"the {offset} calibration tokens for held-out perplexity")
  return np.asarray(stream[offset:offset + num_tokens], np.int32)


@functools.partial(jax.jit, static_argnums=0)
def window_nll(graphdef, state, windows):
  """Summed next-token NLL of each window `[B, T]` over its T-1 predictions, float32 `[B]`.

  windows: int32 [B, T]. Returns float32 [B].
  """
  model = nnx.merge(graphdef, state)
  logp = jax.nn.log_softmax(model.logits(model.hidden(windows)[:, :-1]), axis=-1)
  tgt = jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(tgt, axis=-1)


def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 4) -> dict:
  """Perplexity of `model` on 1-D `tokens` cut into non-overlapping windows of `seq_len`.

  A tail shorter than a window is dropped (every prediction then has the same context budget).

  tokens: int [n] (any shape is flattened).
  """
  model = EvalModel.wrap(model)
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  n = len(tokens) // seq_len
  if n == 0:
    raise HeldOutError(f"{len(tokens)} held-out tokens make no window of {seq_len}")
  windows = tokens[:n * seq_len].reshape(n, seq_len)
  batch_size = min(batch_size, n)
  total = 0.0
  for b0 in range(0, n, batch_size):
    batch = windows[b0:b0 + batch_size]
    real = len(batch)
    if real < batch_size:  # pad with copies so one shape compiles; their NLL is dropped
      batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, 0)])
    nll = window_nll(model.graphdef, model.state, jnp.asarray(batch))
    total += float(distributed.gather(nll).astype(np.float64)[:real].sum())
  count = n * (seq_len - 1)
  mean = total / count
  return {"perplexity": math.exp(mean), "nll": mean, "num_predictions": count,
          "num_windows": n, "seq_len": seq_len}
