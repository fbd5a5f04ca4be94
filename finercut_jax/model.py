"""The Llama-family decoder: a pure functional core over a parameter pytree, and its Flax NNX module.

The functional core is what the scorer compiles, vmaps and shards: parameters are a plain dict whose
per-layer tensors are stacked on a leading layer axis, so the stack runs as one `lax.scan` (an
80-layer model compiles as fast as a 2-layer one) and any sublayer can be picked out by index.

A model has L blocks; block l is two residual sublayers, attention then FFN. Sublayer id
`s = 2*l + k` (k=0 attention, k=1 FFN). A `keep` mask `[L, 2]` of booleans says which are present;
a removed sublayer's whole residual branch (its input norm included) is skipped: when the mask is
not batched the branch is not computed at all (`lax.cond`), not multiplied by zero.

Parameter layout (HF weights load by transpose only: rotary embeddings use the rotate-half layout):
  embed       [V, D]
  layers/attn_norm [L, D], wq [L, D, H*hd], wk [L, D, KV*hd], wv [L, D, KV*hd], wo [L, H*hd, D]
  layers/ffn_norm  [L, D], w_gate [L, D, F], w_up [L, D, F], w_down [L, F, D]
  final_norm  [D]
  lm_head     [D, V]   (absent when embeddings are tied)
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.config import LlamaConfig

Params = dict[str, Any]
ATTN, FFN = 0, 1
ATTN_PARAM_NAMES = ("attn_norm", "wq", "wk", "wv", "wo")
FFN_PARAM_NAMES = ("ffn_norm", "w_gate", "w_up", "w_down")
LAYER_PARAM_NAMES = ATTN_PARAM_NAMES + FFN_PARAM_NAMES


def param_shapes(cfg: LlamaConfig) -> Params:
  """Shapes of every parameter, in the layout above."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {
      "embed": (V, D),
      "layers": {
          "attn_norm": (L, D), "wq": (L, D, q), "wk": (L, D, kv), "wv": (L, D, kv),
          "wo": (L, q, D), "ffn_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F),
          "w_down": (L, F, D),
      },
      "final_norm": (D,),
  }
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
  """Random parameters (normal(0, std) weights, unit norms), for tests and tiny configs."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  out = []
  for k, shape, path in zip(keys, leaves, paths):
    if "norm" in path:
      out.append(jnp.ones(shape, dtype))
    else:
      out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, cast back before the weight (as Hugging Face Llama does)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies, with Llama-3.1 wavelength-dependent scaling when configured."""
  hd = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  if cfg.rope_llama3 is None:
    return inv_freq.astype(np.float32)
  factor, low_ff, high_ff, old_ctx = cfg.rope_llama3
  wavelen = 2 * math.pi / inv_freq
  low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
  # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
  between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  scaled = np.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return scaled.astype(np.float32)


def rope_tables(cfg: LlamaConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables `[T, head_dim]` in the rotate-half layout, float32."""
  freqs = np.arange(seq_len, dtype=np.float32)[:, None] * rope_inv_freq(cfg)[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x `[B, T, heads, hd]`; rotate-half rotary embedding in float32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)


def attention_branch(lp: Params, x: jax.Array, rope, cfg: LlamaConfig) -> jax.Array:
  """Attn(RMSNorm(x)) for one layer's params `lp`; x `[B, T, D]`."""
  B, T, _ = x.shape
  dt = x.dtype
  h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
  q = (h @ lp["wq"].astype(dt)).reshape(B, T, cfg.num_heads, cfg.head_dim)
  k = (h @ lp["wk"].astype(dt)).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  v = (h @ lp["wv"].astype(dt)).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
  cos, sin = rope
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  o = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=cfg.head_dim ** -0.5)
  return o.reshape(B, T, cfg.num_heads * cfg.head_dim) @ lp["wo"].astype(dt)


def ffn_branch(lp: Params, x: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """SwiGLU FFN of RMSNorm(x)."""
  dt = x.dtype
  h = rms_norm(x, lp["ffn_norm"], cfg.rms_norm_eps)
  gate = jax.nn.silu(h @ lp["w_gate"].astype(dt))
  return (gate * (h @ lp["w_up"].astype(dt))) @ lp["w_down"].astype(dt)


def apply_sublayer(lp: Params, kind, h: jax.Array, rope, cfg: LlamaConfig, keep=True) -> jax.Array:
  """h + branch(h) for sublayer `kind` (0 attn, 1 FFN) of a layer, or h unchanged if not `keep`.

  `kind` and `keep` may be traced scalars; when they are not batched, only the chosen branch runs.
  """
  branches = (
      lambda h: h,
      lambda h: h + attention_branch(lp, h, rope, cfg),
      lambda h: h + ffn_branch(lp, h, cfg),
  )
  if isinstance(kind, int) and isinstance(keep, bool):
    return branches[1 + kind](h) if keep else h
  index = jnp.where(keep, 1 + jnp.asarray(kind, jnp.int32), 0)
  return jax.lax.switch(index, branches, h)


def apply_stacked_sublayer(layers: Params, sublayer, h: jax.Array, rope, cfg: LlamaConfig,
                           keep=True) -> jax.Array:
  """`apply_sublayer` for sublayer id `sublayer` (traced) of the stacked `params["layers"]`.

  Each branch slices only its own weights out of the stack: slicing a whole layer for either
  kind copies the other kind's weights for nothing, ~20% of a sublayer loop's time on a CPU.
  """
  layer = sublayer // 2

  def take(names):
    return {k: layers[k][layer] for k in names}

  branches = (
      lambda h: h,
      lambda h: h + attention_branch(take(ATTN_PARAM_NAMES), h, rope, cfg),
      lambda h: h + ffn_branch(take(FFN_PARAM_NAMES), h, cfg),
  )
  return jax.lax.switch(jnp.where(keep, 1 + sublayer % 2, 0), branches, h)


def embed(params: Params, tokens: jax.Array, dtype) -> jax.Array:
  return params["embed"][tokens].astype(dtype)


def lm_head_weight(params: Params) -> jax.Array:
  """`[D, V]`: the output projection (the embedding, transposed, when tied)."""
  return params["lm_head"] if "lm_head" in params else params["embed"].T


def final_logits(params: Params, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """Final norm and LM head, logits in float32."""
  x = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
  w = lm_head_weight(params).astype(x.dtype)
  return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32)


def run_layers(params: Params, cfg: LlamaConfig, h: jax.Array, keep=None, *,
               collect: bool = False):
  """Runs the layer stack on the residual stream h `[B, T, D]`.

  Returns the final stream, and with `collect=True` also the stream at every sublayer boundary,
  `[2L, B, T, D]`, where entry s is the input of sublayer s (the prefix cache of the scorer).
  """
  rope = rope_tables(cfg, h.shape[1])
  if keep is None:
    keep = jnp.ones((cfg.num_layers, 2), bool)

  def block(h, xs):
    lp, keep_l = xs
    h_attn_in = h
    h = apply_sublayer(lp, ATTN, h, rope, cfg, keep_l[0])
    h_ffn_in = h
    h = apply_sublayer(lp, FFN, h, rope, cfg, keep_l[1])
    return h, (jnp.stack([h_attn_in, h_ffn_in]) if collect else None)

  h, inputs = jax.lax.scan(block, h, (params["layers"], jnp.asarray(keep, bool)))
  if collect:
    return h, inputs.reshape((2 * cfg.num_layers,) + h.shape)
  return h


def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, keep=None, *,
            dtype=None) -> jax.Array:
  """Logits `[B, T, V]` (float32) of int tokens `[B, T]`; `keep` `[L, 2]` removes sublayers."""
  dtype = dtype or params["embed"].dtype
  h = run_layers(params, cfg, embed(params, tokens, dtype), keep)
  return final_logits(params, h, cfg)


# ----------------------------------------------------------------------------- the NNX module


class Llama(nnx.Module):
  """Flax NNX Llama-family decoder; `model(tokens, keep=None)` returns float32 logits.

  Its parameters are the functional core's pytree (`model.params()`), so the scorer can split
  them off, shard and vmap over them.
  """

  def __init__(self, config: LlamaConfig, params: Params | None = None, *,
               rngs: nnx.Rngs | None = None, param_dtype=jnp.float32, dtype=None):
    self.config = config
    self.dtype = dtype
    if params is None:
      rngs = rngs or nnx.Rngs(0)
      params = init_params(config, rngs.params(), param_dtype)
    shapes = param_shapes(config)
    _check_shapes(params, shapes)
    self.embed = nnx.Param(params["embed"])
    self.layers = nnx.data({k: nnx.Param(params["layers"][k]) for k in LAYER_PARAM_NAMES})
    self.final_norm = nnx.Param(params["final_norm"])
    self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in params else None

  def params(self) -> Params:
    """The parameter pytree of the functional core."""
    p = {"embed": self.embed[...], "layers": {k: v[...] for k, v in self.layers.items()},
         "final_norm": self.final_norm[...]}
    if self.lm_head is not None:
      p["lm_head"] = self.lm_head[...]
    return p

  def __call__(self, tokens: jax.Array, keep=None) -> jax.Array:
    return forward(self.params(), self.config, tokens, keep, dtype=self.dtype)


def _check_shapes(params: Params, shapes: Params):
  expected = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
  for path, shape in expected:
    name = jax.tree_util.keystr(path)
    try:
      value = params
      for p in path:
        value = value[p.key]
    except (KeyError, TypeError):
      raise ValueError(f"parameter {name} is missing") from None
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"parameter {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
