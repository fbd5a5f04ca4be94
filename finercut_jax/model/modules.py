"""The Llama-family decoder as Flax NNX modules that take per-sublayer masks.

Modules: `RMSNorm`; `Attention` (its input norm, grouped-query attention with rotary embeddings,
Llama-3.1 frequency scaling included, Qwen2's q/k/v biases and Mistral's sliding window when
configured, and a KV-cache path for decoding); `MLP` (its input norm and the SwiGLU FFN); `MoE`
(Mixtral's FFN sublayer: its input norm, a router and SwiGLU `Experts`); `DecoderStack` (every
layer's attention and FFN, stacked by kind); `Llama`. One implementation of each sublayer serves
every family; the config says which parts a family has. Projections are `nnx.Linear`, so any of
them can be wrapped (e.g. in `nnx.LoRA`).

A model has L blocks; block l is two residual sublayers, `h + Attn_l(h)` then `h + MLP_l(h)`.
Sublayer id `s = 2*l + k` (k=0 attention, k=1 MLP). A `keep` mask `[L, 2]` of booleans removes
sublayers at call time; a removed sublayer's whole residual branch (its input norm included) is
skipped with `lax.switch`, never multiplied by zero. A pruned model (`Llama.prune`) holds only the
sublayers it keeps (`present`): `DecoderStack.attn` is stacked over the kept attention sublayers
and `DecoderStack.mlp` over the kept MLPs, so its removed sublayers cost neither memory nor time.

Every forward pass (the model's call, the scorer's per-sublayer programs, evaluation, cached
decoding) runs one sublayer at a time out of the stacks, inside one `lax.scan`/`fori_loop` body,
so an 80-layer model compiles as fast as a 2-layer one.

The modules are the one runtime representation of the parameters and declare every shape.
Parameters carry their logical axes (`out_sharding` metadata, e.g. `("layers", "embed",
"q_heads")`); `parallel/sharding.py` places them on a mesh by those axes (`shard_state`).

The checkpoint layout (`Params`: named arrays) lives at the edges: loading (model/loading.py
reads Hugging Face and GGUF tensors into it, each placed by its name's logical axes), the pruned
checkpoints (model/checkpoint.py stores it) and export (model/export_formats.py writes it out).
Its names are declared once, in the tables `_TOP_PATHS`, `_ATTN_PATHS`, `_MLP_PATHS` and
`_MOE_PATHS` below (name -> the variable it is in a `Llama`); `Llama.from_params` and
`Llama.params()` convert through them, and `param_shapes` / `logical_axes` read each name's
shape and axes off the modules. Beyond the edges, `forward(params, ...)` and `Llama.from_params`
take the layout as a public entry point for code holding loaded weights, and `Llama.prune` slices
the layout's stacks (`prune_params`). For L blocks:
  embed       [V, D]
  layers/attn_norm [L, D], wq [L, D, H*hd], wk [L, D, KV*hd], wv [L, D, KV*hd], wo [L, H*hd, D]
         (Qwen2 adds bq [L, H*hd], bk [L, KV*hd], bv [L, KV*hd])
  layers/ffn_norm  [L, D], w_gate [L, D, F], w_up [L, D, F], w_down [L, F, D]
         (Mixtral: router [L, D, E], w_gate [L, E, D, F], w_up [L, E, D, F], w_down [L, E, F, D])
  final_norm  [D]
  lm_head     [D, V]   (absent when embeddings are tied)
and, for a pruned model, `attn/{attn_norm, wq, wk, wv, wo}` `[n_attn, ...]` and
`ffn/{ffn_norm, w_gate, w_up, w_down}` `[n_ffn, ...]` in place of `layers`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from finercut_jax.model.architecture import LlamaConfig

Params = dict[str, Any]
ATTN, FFN = 0, 1
INIT_STD = 0.02

# The checkpoint layout's names, declared once: each name -> the path of its variable in a
# `Llama` (`_TOP_PATHS`) or in one module of a sublayer stack (`DecoderStack.attn`: `Attention`;
# `DecoderStack.mlp`: `MLP`, or `MoE` for a mixture). A config holds a subset (`layout_paths`):
# the biases with `qkv_bias` only, `lm_head` only when the embeddings are not tied.
_TOP_PATHS = {"embed": ("embed", "embedding"), "final_norm": ("final_norm", "weight"),
              "lm_head": ("lm_head", "kernel")}
_ATTN_PATHS = {"attn_norm": ("norm", "weight"), "wq": ("q_proj", "kernel"),
               "wk": ("k_proj", "kernel"), "wv": ("v_proj", "kernel"), "wo": ("o_proj", "kernel"),
               "bq": ("q_proj", "bias"), "bk": ("k_proj", "bias"), "bv": ("v_proj", "bias")}
_QKV_BIAS_NAMES = ("bq", "bk", "bv")
_MLP_PATHS = {"ffn_norm": ("norm", "weight"), "w_gate": ("gate_proj", "kernel"),
              "w_up": ("up_proj", "kernel"), "w_down": ("down_proj", "kernel")}
_MOE_PATHS = {"ffn_norm": ("norm", "weight"), "router": ("router", "kernel"),
              "w_gate": ("experts", "gate"), "w_up": ("experts", "up"),
              "w_down": ("experts", "down")}
# Every name an attention / FFN sublayer may hold (a config holds a subset:
# `sublayer_param_names`).
ATTN_PARAM_NAMES = tuple(_ATTN_PATHS)
FFN_PARAM_NAMES = tuple(dict.fromkeys([*_MOE_PATHS, *_MLP_PATHS]))
# The group of a sublayer's parameters in the checkpoint layout -> its stack in `DecoderStack`.
_STACKS = {"attn": "attn", "ffn": "mlp"}


def layout_paths(cfg: LlamaConfig) -> dict[str, tuple[str | None, tuple[str, ...]]]:
  """Each checkpoint-layout name of `cfg`'s model -> `(group, path)`: group None for a top-level
  parameter, "attn" or "ffn" for a sublayer's (stacked, in the layout, under `layers`, or under
  `attn` / `ffn` for a pruned model); path, that of its variable in a `Llama`'s state."""
  out = {name: (None, path) for name, path in _TOP_PATHS.items()
         if name != "lm_head" or not cfg.tie_embeddings}
  attn = {k: p for k, p in _ATTN_PATHS.items() if cfg.qkv_bias or k not in _QKV_BIAS_NAMES}
  for group, paths in (("attn", attn), ("ffn", _MOE_PATHS if cfg.is_moe else _MLP_PATHS)):
    out.update({name: (group, ("layers", _STACKS[group]) + path) for name, path in paths.items()})
  return out


def sublayer_param_names(cfg: LlamaConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The checkpoint-layout names of one attention sublayer's and one FFN sublayer's parameters."""
  paths = layout_paths(cfg)
  return tuple(tuple(k for k, (g, _) in paths.items() if g == group) for group in ("attn", "ffn"))


def _layout_variables(cfg: LlamaConfig) -> dict[str, tuple[str | None, nnx.Variable]]:
  """Each checkpoint-layout name -> `(group, variable)` of an abstract dense `Llama` of `cfg`
  (`jax.ShapeDtypeStruct` values: nothing is allocated)."""
  state = nnx.state(nnx.eval_shape(lambda: Llama(cfg)), nnx.Param)
  return {name: (group, functools.reduce(lambda node, key: node[key], path, state))
          for name, (group, path) in layout_paths(cfg).items()}


def param_shapes(cfg: LlamaConfig) -> Params:
  """Shapes of every parameter of the dense model, in the checkpoint layout (a fresh dict of
  tuples: `embed`, `final_norm`, `lm_head`, and `layers/<name>` `[L, ...]`), read off the
  modules."""
  out: Params = {}
  for name, (group, var) in _layout_variables(cfg).items():
    (out if group is None else out.setdefault("layers", {}))[name] = tuple(var.shape)
  return out


def logical_axes(cfg: LlamaConfig) -> dict[str, tuple[str, ...]]:
  """The logical axes of each checkpoint-layout parameter (e.g. `wq`: `("layers", "embed",
  "q_heads")`), read off the model's own variables (their `out_sharding` metadata)."""
  return {name: tuple(var.get_metadata()["out_sharding"])
          for name, (_, var) in _layout_variables(cfg).items()}


# ----------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies, float32 `[head_dim / 2]`, with Llama-3.1 wavelength-dependent scaling
  when configured."""
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


def rotary(cfg: LlamaConfig, positions) -> tuple[Any, Any]:
  """cos and sin, float32 `[..., t, head_dim]` (rotate-half layout), at int `positions`
  `[..., t]`. NumPy positions (a full sequence) give compile-time constants."""
  xp = np if isinstance(positions, np.ndarray) else jnp
  freqs = xp.asarray(positions).astype(xp.float32)[..., None] * rope_inv_freq(cfg)
  emb = xp.concatenate([freqs, freqs], axis=-1)
  return xp.cos(emb), xp.sin(emb)


def apply_rope(x: jax.Array, cos, sin) -> jax.Array:
  """x `[B, t, heads, hd]` rotated by the tables of `rotary` (float32 `[t, hd]` or `[B, t, hd]`);
  returns x's dtype and shape."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


# ----------------------------------------------------------------------------- modules


def _linear(d_in: int, d_out: int, axes: tuple[str, str], *, rngs, dtype, param_dtype,
            use_bias: bool = False, **kwargs) -> nnx.Linear:
  init = nnx.with_partitioning(nnx.initializers.normal(INIT_STD), axes, eager_sharding=False)
  bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=False)
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=init, bias_init=bias_init, rngs=rngs, **kwargs)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, cast back before the weight (as Hugging Face Llama does)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",),
                            eager_sharding=False)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x `[..., dim]` normalised over its last axis; x's dtype and shape."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_positions, k_positions,
           scale: float, window: int | None = None, segments=None) -> jax.Array:
  """Grouped-query attention of q `[B, t, H, hd]` over k, v `[B, S, KV, hd]`: a query sees the
  keys at positions up to its own (`q_positions` `[t]`/`[B, t]`, `k_positions` `[S]`), and with a
  `window` only the last `window` of them (its own included), as transformers' sliding window.

  Returns `[B, t, H, hd]` in q's dtype. `segments` int `[B, t]` (self-attention only) packs
  several sequences that share a prefix into one row: a query sees the keys of its own segment
  and of segment 0, the shared prefix, each sequence at its own positions (evaluation scores a
  context once for all its continuations)."""
  distance = q_positions[..., :, None] - k_positions[..., None, :]  # [t, S] or [B, t, S]
  visible = distance >= 0
  if window is not None:
    visible = visible & (distance < window)
  if segments is not None:
    same = segments[:, :, None] == segments[:, None, :]
    visible = visible & (same | (segments[:, None, :] == 0))
  visible = visible[None, None] if visible.ndim == 2 else visible[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=visible, scale=scale)


class Attention(nnx.Module):
  """The attention sublayer's branch: Attn(RMSNorm(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    self.config = cfg
    D, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.q_proj = _linear(D, q, ("embed", "q_heads"), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = _linear(D, kv, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.v_proj = _linear(D, kv, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.o_proj = _linear(q, D, ("q_heads", "embed"), **kw)

  def _qkv(self, x, positions):
    hd = self.config.head_dim
    h = self.norm(x)
    heads = lambda y: rearrange(y, "b t (n d) -> b t n d", d=hd)
    q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
    cos, sin = rotary(self.config, positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def _out(self, o):
    return self.o_proj(rearrange(o, "b t n d -> b t (n d)"))

  def __call__(self, x: jax.Array, positions, segments=None) -> jax.Array:
    """The branch output `[B, T, D]` (compute dtype) of x `[B, T, D]` at int `positions` `[T]`
    (or `[B, T]`), causal (within `segments` `[B, T]`, see `attend`)."""
    q, k, v = self._qkv(x, positions)
    return self._out(attend(q, k, v, positions, positions, self.config.head_dim ** -0.5,
                            self.config.sliding_window, segments))

  def cached(self, x: jax.Array, positions: jax.Array, keys: jax.Array, values: jax.Array):
    """New tokens x `[B, t, D]` at `positions` `[B, t]` attending to themselves and this layer's
    cache `keys`, `values` `[B, S, KV, hd]` (read, not written: a cache position at or past a
    query's is replaced by the new token's or hidden). Returns the branch output and the new
    tokens' keys and values `[B, t, KV, hd]`, which the caller writes into the cache."""
    q, k, v = self._qkv(x, positions)
    k, v = k.astype(keys.dtype), v.astype(values.dtype)
    rows = jnp.arange(x.shape[0])[:, None]
    all_k, all_v = keys.at[rows, positions].set(k), values.at[rows, positions].set(v)
    o = attend(q, all_k.astype(q.dtype), all_v.astype(q.dtype), positions,
               jnp.arange(keys.shape[1]), self.config.head_dim ** -0.5, self.config.sliding_window)
    return self._out(o), k, v


class MLP(nnx.Module):
  """The FFN sublayer's branch: SwiGLU of RMSNorm(x)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    D, F = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.gate_proj = _linear(D, F, ("embed", "mlp"), **kw)
    self.up_proj = _linear(D, F, ("embed", "mlp"), **kw)
    self.down_proj = _linear(F, D, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The branch output `[..., D]` (compute dtype) of x `[..., D]`."""
    h = self.norm(x)
    return self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class Experts(nnx.Module):
  """A mixture's SwiGLU experts, their weights stacked on a leading "experts" axis: `gate`, `up`
  `[E, D, F]` and `down` `[E, F, D]` (each expert's F units split over the model axis, like a
  dense FFN's)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    self.dtype = dtype

    def param(shape, axes):
      value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
      return nnx.Param(value.astype(param_dtype), out_sharding=axes, eager_sharding=False)

    self.gate = param((E, D, F), ("experts", "embed", "mlp"))
    self.up = param((E, D, F), ("experts", "embed", "mlp"))
    self.down = param((E, F, D), ("experts", "mlp", "embed"))

  def __call__(self, h: jax.Array, weights: jax.Array) -> jax.Array:
    """sum over experts e of `weights[..., e]` (float32 `[..., E]`) times expert e's SwiGLU of h
    `[..., D]`; `[..., D]` in the compute dtype.

    Every expert runs on every token and a token's unrouted experts get weight 0 (dense-masked
    dispatch): static shapes and no token ever dropped, so the output is transformers' (whose
    default grouped-matmul experts also weight each routed expert's output in float32, sum in
    float32 and round once; only the order of that sum differs). It costs E/k times the routed
    FLOPs; capacity-based dispatch would drop tokens past an expert's capacity and change the
    very output the scorer measures, and `jax.lax.ragged_dot` (dropless grouped matmuls) cannot
    be vmapped over the scorer's candidates in this JAX (its batching rule is not implemented)."""
    dtype = self.dtype or h.dtype
    h = h.astype(dtype)

    def expert(acc, xs):
      gate, up, down, w = xs
      y = jnp.dot(jax.nn.silu(h @ gate.astype(dtype)) * (h @ up.astype(dtype)), down.astype(dtype))
      # where, not a product: an unrouted expert's output (even inf) adds exactly nothing.
      return acc + jnp.where(w[..., None] > 0, y.astype(jnp.float32) * w[..., None], 0), None

    xs = (self.gate[...], self.up[...], self.down[...], jnp.moveaxis(weights, -1, 0))
    return jax.lax.scan(expert, jnp.zeros(h.shape, jnp.float32), xs)[0].astype(dtype)


class MoE(nnx.Module):
  """Mixtral's FFN sublayer branch: RMSNorm, then each token's top-k experts weighted by the
  router's softmax probabilities (float32) renormalised over those k, as transformers computes
  them."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    D = cfg.hidden_size
    self.top_k = cfg.num_experts_per_tok
    self.norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.router = _linear(D, cfg.num_experts, ("embed", "experts"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)
    self.experts = Experts(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def routing(self, h: jax.Array) -> jax.Array:
    """Each token's weight per expert `[..., E]` (float32; 0 for the experts it is not routed to)
    from the normed stream h."""
    probs = jax.nn.softmax(self.router(h).astype(jnp.float32), axis=-1)
    top, index = jax.lax.top_k(probs, self.top_k)
    top = top / top.sum(axis=-1, keepdims=True)
    # A product and a sum, not a matmul: no reduced-precision matmul pass touches the weights.
    return (top[..., None] * jax.nn.one_hot(index, probs.shape[-1])).sum(axis=-2)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The branch output `[..., D]` of x `[..., D]`, in x's dtype."""
    h = self.norm(x)
    return self.experts(h, self.routing(h)).astype(x.dtype)


def _stacked(make, n: int, rngs: nnx.Rngs):
  """`n` modules made by `make(rngs)`, their variables stacked on a leading "layers" axis."""

  @nnx.split_rngs(splits=max(n, 1))
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return make(rngs)

  module = create(rngs)
  if n == 0:  # an empty stack (every sublayer of this kind removed)
    graphdef, state = nnx.split(module)
    module = nnx.merge(graphdef, jax.tree.map(lambda x: x[:0], state))
  return module


def _slice(stack: tuple, i) -> nnx.Module:
  """Module i of a stacked module given as `nnx.split(stack)` (i may be traced)."""
  graphdef, state = stack
  return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))


class DecoderStack(nnx.Module):
  """The decoder blocks' sublayers: `attn` (an `Attention` whose variables are stacked over the
  kept attention sublayers) and `mlp` (likewise over the kept MLPs). `present` `[L][2]` says which
  sublayers the model holds; all of them for a dense model."""

  def __init__(self, cfg: LlamaConfig, present=None, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    present = np.ones((cfg.num_layers, 2), bool) if present is None else np.asarray(present, bool)
    if present.shape != (cfg.num_layers, 2):
      raise ValueError(f"present mask has shape {present.shape}, expected ({cfg.num_layers}, 2)")
    self.config = cfg
    self.present = tuple(tuple(bool(x) for x in row) for row in present)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn = _stacked(lambda r: Attention(cfg, rngs=r, **kw), int(present[:, ATTN].sum()), rngs)
    ffn = MoE if cfg.is_moe else MLP
    self.mlp = _stacked(lambda r: ffn(cfg, rngs=r, **kw), int(present[:, FFN].sum()), rngs)

  @property
  def present_mask(self) -> np.ndarray:
    return np.asarray(self.present, bool)

  @property
  def stack_index(self) -> np.ndarray:
    """`[2L]` int32: each sublayer's index in its kind's stack (0 where not present)."""
    present = self.present_mask
    return np.where(present, np.cumsum(present, axis=0) - 1, 0).reshape(-1).astype(np.int32)

  @property
  def schedule(self) -> np.ndarray:
    """`[n_present, 3]` int32 rows (kind, index in that kind's stack, sublayer id), in depth
    order."""
    ids = np.flatnonzero(self.present_mask.reshape(-1))
    return np.stack([ids % 2, self.stack_index[ids], ids], axis=1).astype(np.int32)

  def _branches(self, positions, cache=None, segments=None):
    """`lax.switch` branches on (h, stack index[, keys, values]): identity, attention, MLP. A kind
    with no kept sublayer never runs; its branch is the identity."""
    attn, mlp = nnx.split(self.attn), nnx.split(self.mlp)
    has_attn, has_mlp = any(r[ATTN] for r in self.present), any(r[FFN] for r in self.present)
    if cache is None:
      run_attn = lambda h, i: h + _slice(attn, i)(h, positions, segments)
      run_mlp = lambda h, i: h + _slice(mlp, i)(h)
      identity = lambda h, i: h
    else:
      kv_shape = cache[0].shape[1:2] + positions.shape[1:] + cache[0].shape[3:]
      zeros = lambda: jnp.zeros(kv_shape, cache[0].dtype)

      def run_attn(h, i, keys, values):
        out, k, v = _slice(attn, i).cached(h, positions, keys, values)
        return h + out, k, v

      run_mlp = lambda h, i, keys, values: (h + _slice(mlp, i)(h), zeros(), zeros())
      identity = lambda h, i, keys, values: (h, zeros(), zeros())
    return (identity, run_attn if has_attn else identity, run_mlp if has_mlp else identity)

  def sublayer(self, j, h: jax.Array, positions, keep=True) -> jax.Array:
    """h + branch(h) for sublayer id `j` (traced or not), or h unchanged when it is not kept or
    not present. Only the chosen branch runs when j and keep are not batched."""
    on = jnp.asarray(self.present_mask.reshape(-1))[j] & keep
    return jax.lax.switch(jnp.where(on, 1 + j % 2, 0), self._branches(positions), h,
                          jnp.asarray(self.stack_index)[j])

  def __call__(self, h: jax.Array, positions, keep=None, segments=None) -> jax.Array:
    """Runs the present sublayers (those of them that bool `keep` `[L, 2]` keeps) on h
    `[B, T, D]` at int `positions` `[T]` (or `[B, T]`; `segments` `[B, T]`: see `attend`);
    returns `[B, T, D]`."""
    rows = self.schedule
    if len(rows) == 0:
      return h
    flags = (np.ones(len(rows), bool) if keep is None
             else jnp.asarray(keep, bool).reshape(-1)[rows[:, 2]])
    branches = self._branches(positions, segments=segments)

    def step(h, xs):
      row, on = xs
      return jax.lax.switch(jnp.where(on, 1 + row[0], 0), branches, h, row[1]), None

    return jax.lax.scan(step, h, (jnp.asarray(rows), flags))[0]

  def streams(self, h: jax.Array, positions) -> jax.Array:
    """The residual stream entering each present sublayer, and leaving the last one:
    `[n_present + 1, B, T, D]`, in depth order (for a dense model, entry s is the input of
    sublayer s and entry 2L the final stream)."""
    branches = self._branches(positions)

    def step(h, row):
      h = jax.lax.switch(1 + row[0], branches, h, row[1])
      return h, h

    rows = self.schedule
    if len(rows) == 0:
      return h[None]
    return jnp.concatenate([h[None], jax.lax.scan(step, h, jnp.asarray(rows))[1]])

  def cached(self, h: jax.Array, positions: jax.Array, cache: dict):
    """Runs the present sublayers on new tokens' stream h `[B, t, D]` at `positions` `[B, t]`,
    writing their keys and values into `cache` (`init_cache`); returns h and the cache.

    The cache is read inside the attention branch and written outside it, by a scatter on the
    scan carry that XLA performs in place (a cache passed through `lax.switch` would be copied at
    every sublayer). MLP steps scatter to an out-of-range slot, which is dropped."""
    rows = self.schedule
    n_attn = int(self.present_mask[:, ATTN].sum())
    if len(rows) == 0:
      return h, cache
    keys, values = cache["k"], cache["v"]
    if n_attn == 0:  # nothing to cache; keep a valid carry
      keys = values = jnp.zeros((1,) + keys.shape[1:], keys.dtype)
    branches = self._branches(positions, (keys, values))
    b = jnp.arange(h.shape[0])[:, None]

    def step(carry, row):
      h, kc, vc = carry
      kind, index = row[0], row[1]
      layer = jnp.where(kind == ATTN, index, 0)
      h, k, v = jax.lax.switch(kind + 1, branches, h, index, kc[layer], vc[layer])
      slot = jnp.where(kind == ATTN, index, kc.shape[0])  # out of range for MLP steps: dropped
      return (h, kc.at[slot, b, positions].set(k, mode="drop"),
              vc.at[slot, b, positions].set(v, mode="drop")), None

    (h, keys, values), _ = jax.lax.scan(step, (h, keys, values), jnp.asarray(rows))
    return h, (cache if n_attn == 0 else {"k": keys, "v": values})


class Llama(nnx.Module):
  """Flax NNX Llama-family decoder; `model(tokens, keep=None)` returns float32 logits `[B, T, V]`.

  `Llama(config, rngs=nnx.Rngs(0))` is randomly initialised; `Llama.from_params` builds one from
  loaded weights; `model.prune(keep)` drops removed sublayers physically. `dtype` is the compute
  dtype (None: the parameters'). `present` makes a model that holds only those sublayers.
  """

  def __init__(self, config: LlamaConfig, *, present=None, rngs: nnx.Rngs | None = None,
               dtype=None, param_dtype=jnp.float32):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = None if dtype is None else jnp.dtype(dtype)
    V, D = config.vocab_size, config.hidden_size
    self.embed = nnx.Embed(V, D, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           embedding_init=nnx.with_partitioning(
                               nnx.initializers.normal(INIT_STD), ("vocab", "embed"),
                               eager_sharding=False))
    self.layers = DecoderStack(config, present, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.final_norm = RMSNorm(D, config.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if config.tie_embeddings else _linear(
        D, V, ("embed", "vocab"), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        preferred_element_type=jnp.float32)

  # ------------------------------------------------------------------ forward

  @property
  def compute_dtype(self):
    return self.dtype or self.embed.embedding.dtype

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The embeddings `[B, T, D]` (compute dtype) of int32 tokens `[B, T]`."""
    return self.embed(tokens).astype(self.compute_dtype)

  def hidden(self, tokens: jax.Array, keep=None, *, positions=None, segments=None) -> jax.Array:
    """The final residual stream `[B, T, D]` (compute dtype, before the final norm) of int32
    tokens `[B, T]`; bool `keep` `[L, 2]` removes sublayers. `positions` `[B, T]` and
    `segments` `[B, T]` pack sequences with a shared prefix into a row (`attend`); by default
    each row is one sequence at positions 0..T-1."""
    if positions is None:
      positions = np.arange(tokens.shape[-1])
    return self.layers(self.embed_tokens(tokens), positions, keep, segments)

  def residual_streams(self, tokens: jax.Array) -> jax.Array:
    """The residual stream of int32 tokens `[B, T]` at every sublayer boundary,
    `[n_present + 1, B, T, D]` in the compute dtype (`DecoderStack.streams`): what
    similarity-based pruning methods measure."""
    positions = np.arange(tokens.shape[-1])
    return self.layers.streams(self.embed_tokens(tokens), positions)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final norm and LM head of the stream h `[..., D]`; float32 logits `[..., V]`."""
    x = self.final_norm(h)
    if self.lm_head is not None:
      return self.lm_head(x)
    w = self.embed.embedding[...].astype(x.dtype)
    return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array, keep=None) -> jax.Array:
    """Float32 logits `[B, T, V]` of int32 tokens `[B, T]`; bool `keep` `[L, 2]` removes
    sublayers. One compiled program per (structure, shapes): calls after the first do not
    recompile."""
    graphdef, state = nnx.split(self)
    keep = None if keep is None else jnp.asarray(keep, bool)
    return _forward(graphdef, state, jnp.asarray(tokens), keep)

  # ------------------------------------------------------------------ decoding

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache `{k, v}`, each `[n_attn, B, max_len, KV, hd]` in the compute dtype (kept
    attention only)."""
    cfg = self.config
    shape = (int(self.layers.present_mask[:, ATTN].sum()), batch, max_len, cfg.num_kv_heads,
             cfg.head_dim)
    return {"k": jnp.zeros(shape, self.compute_dtype), "v": jnp.zeros(shape, self.compute_dtype)}

  def cached_hidden(self, tokens: jax.Array, positions: jax.Array, cache: dict):
    """New int32 tokens `[B, t]` at int32 `positions` `[B, t]` through the model with a KV cache
    (`init_cache`): the final stream `[B, t, D]` and the updated cache. Rows may sit at
    different positions."""
    return self.layers.cached(self.embed_tokens(tokens), positions, cache)

  # ------------------------------------------------------------------ structure

  @property
  def present(self) -> np.ndarray:
    """`[L, 2]`: the sublayers this model holds."""
    return self.layers.present_mask

  def num_params(self) -> int:
    """How many parameter elements the model holds."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(self, nnx.Param))))

  def prune(self, keep) -> "Llama":
    """A model holding only the sublayers that `keep` `[L, 2]` keeps (of those present)."""
    keep = np.asarray(keep, bool) & self.present
    if np.array_equal(keep, self.present):
      return self
    return Llama.from_params(self.config, prune_params(self.params(), keep, self.present),
                             present=keep, dtype=self.dtype)

  @classmethod
  def from_params(cls, config: LlamaConfig, params: Params, *, present=None,
                  dtype=None) -> "Llama":
    """A model holding `params` (the checkpoint layout: `layers` for a dense model, `attn` and
    `ffn` for one that holds only the `present` sublayers). Leaves may be arrays (sharded or
    not), tracers, or `jax.ShapeDtypeStruct` (an abstract model: it can be lowered, not run)."""
    pruned = "layers" not in params
    if pruned and present is None:
      raise ValueError("parameters in the pruned layout (attn/ffn) need the `present` mask")
    present = np.ones((config.num_layers, 2), bool) if present is None else np.asarray(present,
                                                                                      bool)
    if not pruned and not present.all():
      raise ValueError("dense parameters (layers) hold every sublayer; use model.prune(keep)")
    dtypes = {x.dtype for x in jax.tree.leaves(params)}
    param_dtype = jax.dtypes.canonicalize_dtype(dtypes.pop() if len(dtypes) == 1 else jnp.float32)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: cls(config, present=present, dtype=dtype, param_dtype=param_dtype)))
    pure: dict = {}  # the layout's arrays at their variables' paths
    for name, (group, path) in layout_paths(config).items():
      source = params if group is None else params[group if pruned else "layers"]
      node = functools.reduce(lambda node, key: node.setdefault(key, {}), path[:-1], pure)
      node[path[-1]] = source.get(name)
    _check_and_fill(state, pure)
    return nnx.merge(graphdef, state)

  def params(self) -> Params:
    """The parameters in the checkpoint layout (dense: `layers`; else `attn` and `ffn`): the
    model's own arrays (not copies), named by `layout_paths`."""
    state = nnx.to_pure_dict(nnx.state(self, nnx.Param))
    dense = self.present.all()
    out: Params = {}
    for name, (group, path) in layout_paths(self.config).items():
      node = out if group is None else out.setdefault("layers" if dense else group, {})
      node[name] = functools.reduce(lambda node, key: node[key], path, state)
    return out


def prune_params(params: Params, keep, present=None) -> Params:
  """Checkpoint-layout parameters of the sublayers `keep` `[L, 2]` keeps, in the pruned layout
  (`attn`, `ffn`); `params` hold the `present` sublayers (all, for the dense layout)."""
  keep = np.asarray(keep, bool)
  present = np.ones_like(keep) if present is None else np.asarray(present, bool)
  out = {k: v for k, v in params.items() if k not in ("layers", "attn", "ffn")}
  for group, names, kind in (("attn", ATTN_PARAM_NAMES, ATTN), ("ffn", FFN_PARAM_NAMES, FFN)):
    stack = params["layers"] if "layers" in params else params[group]
    index = np.flatnonzero(keep[present[:, kind], kind])
    # Every row kept: the same arrays, not a copy (a checkpoint of a model pruned already).
    out[group] = {k: stack[k] if len(index) == stack[k].shape[0] else stack[k][index]
                  for k in names if k in stack}
  return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, keep):
  model = nnx.merge(graphdef, state)
  return model.logits(model.hidden(tokens, keep))


def _check_and_fill(state: nnx.State, pure: dict) -> None:
  """Puts the leaves of `pure` into the abstract `state`, checking that each exists with the
  expected shape."""
  def fill(path, var):
    value = pure
    for p in path:
      value = value.get(p.key) if isinstance(value, dict) else None
    name = "/".join(str(p.key) for p in path)
    if value is None:
      raise ValueError(f"parameter {name} is missing")
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"parameter {name} has shape {tuple(value.shape)}, expected "
                       f"{tuple(var.shape)}")
    var.set_value(value)
    return var

  jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def forward(params: Params, cfg: LlamaConfig, tokens: jax.Array, keep=None, *,
            dtype=None) -> jax.Array:
  """Float32 logits `[B, T, V]` of int32 `tokens` `[B, T]` through a model given as
  checkpoint-layout parameters (the dense layout: `layers`); bool `keep` `[L, 2]` removes
  sublayers, `dtype` is the compute dtype. Traceable (`cfg` static under `jax.jit`)."""
  model = Llama.from_params(cfg, params, dtype=dtype)
  return model.logits(model.hidden(jnp.asarray(tokens), keep))
