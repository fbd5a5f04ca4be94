"""What pruning buys: parameters, FLOPs per token, and measured prefill and decode throughput.

FLOPs are analytic (2 per multiply-add, forward pass only, norms and softmax ignored):
  attention sublayer  2*D*(H*hd + 2*KV*hd) + 2*H*hd*D   projections
                      + 4*H*hd*ctx                       scores and weighted values over ctx keys
  FFN sublayer        6*D*F                              gate, up, down
  LM head             2*D*V
Prefill FLOPs per token use the mean causal context of a prompt of P tokens, (P+1)/2; decode
FLOPs per token the context at the middle of the decoded span.

Throughput is measured with the KV-cache engine (`decode.py`) on identical token ids for every
model: prefill = one jitted call on `[B, P]` prompts, decode = one jitted `lax.scan` of greedy
steps after it; each is timed after a compile-and-warm-up call, repeated, and the median kept.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from finercut_jax.evaluation import decode
from finercut_jax.evaluation.lm import EvalModel
from finercut_jax.model.architecture import LlamaConfig


def attended_keys(cfg: LlamaConfig, start: int, stop: int) -> float:
  """The mean number of keys a query attends over positions `start..stop-1` (position i sees i+1
  keys, at most the sliding window's)."""
  keys = np.arange(start, stop) + 1
  if cfg.sliding_window is not None:
    keys = np.minimum(keys, cfg.sliding_window)
  return float(keys.mean())


def flops_per_token(cfg: LlamaConfig, keep, context: float) -> dict:
  """Forward FLOPs per token of the model `keep` `[L, 2]` at `context` attended keys (on average:
  `attended_keys`).

  keep: bool [L, 2]. Returns {"total", "attn", "ffn", "lm_head"} FLOPs per token.
  """
  keep = np.asarray(keep, bool)
  D, V = cfg.hidden_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  attn = 2 * D * (q + 2 * kv) + 2 * q * D + 4 * q * context
  ffn = cfg.ffn_flops_per_token()
  head = 2 * D * V
  n_attn, n_ffn = int(keep[:, 0].sum()), int(keep[:, 1].sum())
  return {"total": n_attn * attn + n_ffn * ffn + head, "attn": n_attn * attn,
          "ffn": n_ffn * ffn, "lm_head": head}


class _Timer:
  """Compiled prefill and decode of one model on fixed prompts."""

  def __init__(self, model: EvalModel, tokens, decode_steps: int):
    self.model, self.tokens, self.decode_steps = model, tokens, decode_steps
    self.batch_size, self.prompt_len = tokens.shape
    self.lengths = jnp.full((self.batch_size,), self.prompt_len, jnp.int32)
    self.max_len = self.prompt_len + decode_steps + 1
    jax.block_until_ready(self.decode(*self.prefill()))  # compile both
    self.prefill_times, self.decode_times = [], []

  def prefill(self):
    m = self.model
    cache = m.model.init_cache(self.batch_size, self.max_len)
    return decode.prefill(m.graphdef, m.state, self.tokens, self.lengths, cache)

  def decode(self, logits, cache):
    m = self.model
    return decode.greedy_steps(m.graphdef, m.state, logits, cache, self.lengths,
                               num_steps=self.decode_steps)

  def time_once(self):
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(self.prefill())
    self.prefill_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(self.decode(logits, cache))
    self.decode_times.append(time.perf_counter() - start)


def compare(models: dict, *, batch_size: int = 1, prompt_len: int = 128, decode_steps: int = 32,
            repeats: int = 3, seed: int = 0, tokens: np.ndarray | None = None) -> dict:
  """`measure` for several models on the same prompts, their repeats interleaved (a model is
  never timed in one burst while another sees different machine load).

  tokens: int [batch_size, prompt_len] (None: random ids from `seed`).
  """
  models = {k: EvalModel.wrap(m) for k, m in models.items()}
  if tokens is None:
    vocab = min(m.cfg.vocab_size for m in models.values())
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch_size, prompt_len))
  tokens = jnp.asarray(np.asarray(tokens, np.int32).reshape(batch_size, prompt_len))
  timers = {k: _Timer(m, tokens, decode_steps) for k, m in models.items()}
  for _ in range(repeats):
    for timer in timers.values():
      timer.time_once()
  return {k: _report(t, repeats) for k, t in timers.items()}


def measure(model, *, batch_size: int = 1, prompt_len: int = 128, decode_steps: int = 32,
            repeats: int = 3, seed: int = 0, tokens: np.ndarray | None = None) -> dict:
  """Parameters, FLOPs per token and measured prefill / decode tokens per second.

  tokens: int [batch_size, prompt_len] (None: random ids from `seed`).
  """
  return compare({"model": model}, batch_size=batch_size, prompt_len=prompt_len,
                 decode_steps=decode_steps, repeats=repeats, seed=seed, tokens=tokens)["model"]


def _report(timer: _Timer, repeats: int) -> dict:
  model, cfg = timer.model, timer.model.cfg
  batch_size, prompt_len, decode_steps = timer.batch_size, timer.prompt_len, timer.decode_steps
  prefill_s = float(np.median(timer.prefill_times))
  decode_s = float(np.median(timer.decode_times))

  prefill_flops = flops_per_token(cfg, model.keep, attended_keys(cfg, 0, prompt_len))
  decode_flops = flops_per_token(cfg, model.keep,
                                 attended_keys(cfg, prompt_len, prompt_len + decode_steps))
  return {
      "params": model.num_params(),
      "num_attn": model.num_attn, "num_ffn": model.num_ffn,
      "flops_per_token_prefill": prefill_flops["total"],
      "flops_per_token_decode": decode_flops["total"],
      "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
      "decode_tokens_per_s": batch_size * decode_steps / decode_s,
      "prefill_seconds": prefill_s, "decode_seconds": decode_s,
      "batch_size": batch_size, "prompt_len": prompt_len, "decode_steps": decode_steps,
      "repeats": repeats, "device": jax.devices()[0].device_kind,
  }


def relative_to(dense: dict, pruned: dict) -> dict:
  """Pruned / dense ratios of the quantities `measure` reports."""
  keys = ("params", "flops_per_token_prefill", "flops_per_token_decode", "prefill_tokens_per_s",
          "decode_tokens_per_s")
  return {k: pruned[k] / dense[k] for k in keys if dense.get(k)}
