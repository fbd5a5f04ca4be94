"""KV-cache incremental decoding of a pruned (or dense) model.

The cache holds keys and values of the kept attention sublayers only, `[n_attn, B, S_max, KV, hd]`
(`Llama.init_cache`: a pruned model's cache shrinks with its attention count). The model's own
modules do the work (`Llama.cached_hidden`): t new tokens per row at explicit positions run through
the kept sublayers, their keys and values are written into the cache, and each query attends to
every cached position up to its own. Rows may sit at different positions: prompts are
right-padded, and each row's decoding starts at its own length, overwriting the padding before
attending to it. The same code does prefill (t = prompt bucket, positions 0..t-1) and decode
(t = 1). The compiled functions take the model split into graph and state (`nnx.split`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.evaluation.lm import bucket
from finercut_jax.parallel import distributed


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def forward_step(graphdef, state, tokens, cache, positions):
  """Float32 logits `[B, t, V]` of tokens `[B, t]` at `positions` `[B, t]`, and the updated
  cache (its buffer is donated and updated in place).

  tokens, positions: int32 [B, t]; cache: {"k", "v"}: [n_attn, B, S_max, KV, hd] (`init_cache`).
  Returns (logits: float32 [B, t, V], cache).
  """
  model = nnx.merge(graphdef, state)
  h, cache = model.cached_hidden(tokens, positions, cache)
  return model.logits(h), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("cache",))
def prefill(graphdef, state, prompt, lengths, cache):
  """Runs right-padded prompts `[B, P]`; returns each row's next-token logits `[B, V]` (at
  position length-1) and the cache. Only those positions go through the LM head.

  prompt: int32 [B, P]; lengths: int32 [B] (each >= 1); cache: {"k", "v"}:
  [n_attn, B, S_max, KV, hd]. Returns (logits: float32 [B, V], cache).
  """
  model = nnx.merge(graphdef, state)
  B, P = prompt.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  h, cache = model.cached_hidden(prompt, positions, cache)
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.logits(last), cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_steps",),
                   donate_argnames=("cache",))
def greedy_steps(graphdef, state, logits, cache, positions, *, num_steps):
  """`num_steps` greedy tokens per row from next-token `logits` `[B, V]`, the first written at
  `positions` `[B]`; returns tokens `[B, num_steps]`, the last logits and the cache.

  logits: float32 [B, V]; positions: int32 [B]; cache: {"k", "v"}: [n_attn, B, S_max, KV, hd].
  Returns (tokens: int32 [B, num_steps], logits: float32 [B, V], cache).
  """
  model = nnx.merge(graphdef, state)

  def step(carry, _):
    logits, cache, pos = carry
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    h, cache = model.cached_hidden(tok[:, None], pos[:, None], cache)
    return (model.logits(h)[:, 0], cache, pos + 1), tok

  (logits, cache, _), tokens = jax.lax.scan(step, (logits, cache, positions), None,
                                            length=num_steps)
  return tokens.T, logits, cache


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, *,
                    stop=None, chunk: int = 16, prompt_buckets=(64, 128, 256, 512, 1024, 2048)):
  """Greedy continuation ids (at most `max_new_tokens`) of each prompt, batched.

  `stop(row_index, new_ids) -> bool` is checked on the host after every `chunk` tokens; decoding
  ends early when every row has stopped. Rows are not trimmed here (the caller cuts at its stop
  strings). `model` is an `EvalModel`.

  prompts: B lists of token ids (each non-empty). Returns B lists of at most `max_new_tokens` ids.
  """
  B = len(prompts)
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  P = bucket(int(lengths.max()), prompt_buckets)
  num_chunks = -(-max_new_tokens // chunk)
  max_len = bucket(P + num_chunks * chunk, prompt_buckets)
  tokens = np.zeros((B, P), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
  cache = model.model.init_cache(B, max_len)
  logits, cache = prefill(model.graphdef, model.state, jnp.asarray(tokens), jnp.asarray(lengths),
                          cache)
  positions = jnp.asarray(lengths)
  out = np.zeros((B, 0), np.int32)
  for _ in range(num_chunks):
    new, logits, cache = greedy_steps(model.graphdef, model.state, logits, cache, positions,
                                      num_steps=chunk)
    positions = positions + chunk
    out = np.concatenate([out, distributed.gather(new)], axis=1)
    if stop is not None and all(stop(r, out[r].tolist()) for r in range(B)):
      break
  return [row[:max_new_tokens].tolist() for row in out]
