"""KV-cache incremental decoding of a pruned (or dense) model.

The cache holds keys and values of the kept attention sublayers only, `[n_attn, B, S_max, KV, hd]`
(a pruned model's cache shrinks with its attention count). `cached_forward` runs t new tokens per
row at explicit positions through the kept-sublayer schedule with one `lax.scan`, as
`pruned_hidden` does, writing their keys and values into the cache and attending to every cached
position up to each query's own. Rows may sit at different positions: prompts are right-padded,
and each row's decoding starts at its own length, overwriting the padding before attending to it.
The same function does prefill (t = prompt bucket, positions 0..t-1) and decode (t = 1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from finercut_jax import distributed
from finercut_jax.config import LlamaConfig
from finercut_jax.model import Params, embed, ffn_branch, final_logits, rms_norm, rope_inv_freq


def init_cache(cfg: LlamaConfig, num_attn: int, batch: int, max_len: int, dtype) -> dict:
  shape = (num_attn, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE of x `[B, t, heads, hd]` at per-token positions `[B, t]`, in float32."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, t, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _cached_attention(lp: Params, h: jax.Array, k_layer: jax.Array, v_layer: jax.Array,
                      positions: jax.Array, cfg: LlamaConfig, inv_freq):
  """Attn(RMSNorm(h)) for new tokens h `[B, t, D]` over one layer's cache `[B, S, KV, hd]`
  (read-only here); returns it and the new tokens' keys and values `[B, t, KV, hd]`."""
  B, t, _ = h.shape
  dt = h.dtype
  H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
  q = (x @ lp["wq"].astype(dt)).reshape(B, t, H, hd)
  k = (x @ lp["wk"].astype(dt)).reshape(B, t, KV, hd)
  v = (x @ lp["wv"].astype(dt)).reshape(B, t, KV, hd)
  q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
  k, v = k.astype(k_layer.dtype), v.astype(v_layer.dtype)
  rows = jnp.arange(B)[:, None]
  keys = k_layer.at[rows, positions].set(k)
  values = v_layer.at[rows, positions].set(v)
  G = H // KV
  qg = q.reshape(B, t, KV, G, hd).astype(jnp.float32)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(jnp.float32)) * hd ** -0.5
  key_pos = jnp.arange(keys.shape[1])
  visible = key_pos[None, None, None, None, :] <= positions[:, None, None, :, None]
  scores = jnp.where(visible, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(jnp.float32)).astype(dt)
  return o.reshape(B, t, H * hd) @ lp["wo"].astype(dt), k, v


def cached_hidden(params: Params, cfg: LlamaConfig, schedule, h: jax.Array, cache: dict,
                  positions: jax.Array):
  """Runs the schedule on new tokens' stream h `[B, t, D]` at `positions` `[B, t]`.

  The cache is only read inside the per-kind branch and written outside it, by a scatter on the
  scan carry that XLA performs in place (a cache passed through `lax.switch` would be copied at
  every sublayer). FFN steps scatter to an out-of-range slot, which is dropped.
  """
  if len(schedule) == 0:
    return h, cache
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  n_attn = params["attn"]["wq"].shape[0]
  has_ffn = params["ffn"]["w_up"].shape[0] > 0
  B, t, _ = h.shape
  kv_shape = (B, t, cfg.num_kv_heads, cfg.head_dim)
  kv_dtype = cache["k"].dtype

  def take(stack, i):
    return jax.tree.map(lambda w: w[i], stack)

  def attn(h, k_layer, v_layer, i):
    out, k, v = _cached_attention(take(params["attn"], i), h, k_layer, v_layer, positions, cfg,
                                  inv_freq)
    return h + out, k, v

  def ffn(h, k_layer, v_layer, i):
    return (h + ffn_branch(take(params["ffn"], i), h, cfg), jnp.zeros(kv_shape, kv_dtype),
            jnp.zeros(kv_shape, kv_dtype))

  def identity(h, k_layer, v_layer, i):
    return h, jnp.zeros(kv_shape, kv_dtype), jnp.zeros(kv_shape, kv_dtype)

  branches = (attn if n_attn else identity, ffn if has_ffn else identity)
  rows = jnp.arange(B)[:, None]

  def step(carry, row):
    h, kc, vc = carry
    kind, index = row[0], row[1]
    layer = jnp.where(kind == 0, index, 0)
    h, k, v = jax.lax.switch(kind, branches, h, kc[layer], vc[layer], index)
    slot = jnp.where(kind == 0, index, n_attn)  # out of range for FFN steps: dropped
    kc = kc.at[slot, rows, positions].set(k, mode="drop")
    vc = vc.at[slot, rows, positions].set(v, mode="drop")
    return (h, kc, vc), None

  if n_attn == 0:  # nothing to cache; keep a valid carry
    (h, _, _), _ = jax.lax.scan(step, (h, jnp.zeros((1,) + cache["k"].shape[1:], kv_dtype),
                                       jnp.zeros((1,) + cache["v"].shape[1:], kv_dtype)),
                                jnp.asarray(schedule, jnp.int32))
    return h, cache
  (h, k, v), _ = jax.lax.scan(step, (h, cache["k"], cache["v"]), jnp.asarray(schedule, jnp.int32))
  return h, {"k": k, "v": v}


def cached_forward(params, cfg, schedule, tokens, cache, positions, dtype):
  """Float32 logits `[B, t, V]` of tokens `[B, t]` at `positions`, and the updated cache."""
  h, cache = cached_hidden(params, cfg, schedule, embed(params, tokens, dtype), cache, positions)
  return final_logits(params, h, cfg), cache


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("cache",))
def forward_step(params, schedule, tokens, cache, positions, *, cfg, dtype):
  """Jitted `cached_forward` (the cache buffer is donated and updated in place)."""
  return cached_forward(params, cfg, schedule, tokens, cache, positions, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("cache",))
def prefill(params, schedule, prompt, lengths, cache, *, cfg, dtype):
  """Runs right-padded prompts `[B, P]`; returns each row's next-token logits `[B, V]` (at
  position length-1) and the cache. Only those positions go through the LM head."""
  B, P = prompt.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  h, cache = cached_hidden(params, cfg, schedule, embed(params, prompt, jnp.dtype(dtype)), cache,
                           positions)
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return final_logits(params, last, cfg), cache


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "num_steps"),
                   donate_argnames=("cache",))
def greedy_steps(params, schedule, logits, cache, positions, *, cfg, dtype, num_steps):
  """`num_steps` greedy tokens per row from next-token `logits` `[B, V]`, the first written at
  `positions` `[B]`; returns tokens `[B, num_steps]`, the last logits and the cache."""

  def step(carry, _):
    logits, cache, pos = carry
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out, cache = cached_forward(params, cfg, schedule, tok[:, None], cache, pos[:, None],
                                jnp.dtype(dtype))
    return (out[:, 0], cache, pos + 1), tok

  (logits, cache, _), tokens = jax.lax.scan(step, (logits, cache, positions), None,
                                            length=num_steps)
  return tokens.T, logits, cache


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, *,
                    stop=None, chunk: int = 16, prompt_buckets=(64, 128, 256, 512, 1024, 2048)):
  """Greedy continuation ids (at most `max_new_tokens`) of each prompt, batched.

  `stop(row_index, new_ids) -> bool` is checked on the host after every `chunk` tokens; decoding
  ends early when every row has stopped. Rows are not trimmed here (the caller cuts at its stop
  strings). `model` is an `EvalModel`.
  """
  from finercut_jax.evaluation.lm import bucket
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
  dtype = jnp.dtype(model.compute_dtype)
  cache = init_cache(model.cfg, model.num_attn, B, max_len, dtype)
  sched = jnp.asarray(model.schedule)
  logits, cache = prefill(model.params, sched, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                          cfg=model.cfg, dtype=dtype.name)
  positions = jnp.asarray(lengths)
  out = np.zeros((B, 0), np.int32)
  for _ in range(num_chunks):
    new, logits, cache = greedy_steps(model.params, sched, logits, cache, positions, cfg=model.cfg,
                                      dtype=dtype.name, num_steps=chunk)
    positions = positions + chunk
    out = np.concatenate([out, distributed.gather(new)], axis=1)
    if stop is not None and all(stop(r, out[r].tolist()) for r in range(B)):
      break
  return [row[:max_new_tokens].tolist() for row in out]
