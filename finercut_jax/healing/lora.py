"""Which parameters train during healing: LoRA adapters on the projections, or a part of the model.

Methods:
- `lora`: each target projection (`q, k, v, o` of attention, `gate, up, down` of the MLP) becomes
  `LoRALinear`: `base(x) + dropout(x) @ A @ B * alpha / rank` with `A`, `B` `nnx.LoRAParam`s (A
  Kaiming-uniform, B zero, so training starts from the pruned model exactly); only they train.
- `partial`: the LM head (the embedding, when tied) and the last `last_blocks` blocks that still
  hold a sublayer train in full; everything else is frozen.
"""
from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finercut_jax.model.modules import Llama


class HealMethod(enum.StrEnum):
  """The values `heal.method` accepts (a `str`: stored settings keep the plain string)."""
  LORA = "lora"
  PARTIAL = "partial"


LORA_TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"),
                "o": ("attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                "down": ("mlp", "down_proj")}


class DropoutKey(nnx.Variable):
  """A LoRA's dropout key (raw key data): set per micro-batch by the trainer, never trained."""


class LoRALinear(nnx.Module):
  """`base(x) + dropout(x) @ lora_a @ lora_b * alpha / rank` (the PEFT LoRA layer)."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float, *,
               rngs: nnx.Rngs):
    self.base = base
    init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PEFT's Kaiming
    self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (base.in_features, rank), jnp.float32))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), jnp.float32))
    self.scale = float(alpha) / rank
    self.rate = float(dropout)
    self.deterministic = True
    self.dropout_key = DropoutKey(jax.random.key_data(rngs.dropout()))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in_features] -> [..., out_features], in the dtype of `base(x)`."""
    y = self.base(x)
    h = x
    if self.rate and not self.deterministic:
      key = jax.random.wrap_key_data(self.dropout_key[...])
      keep = jax.random.bernoulli(key, 1 - self.rate, x.shape)
      h = jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)
    a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
    return y + ((h @ a) @ b * self.scale).astype(y.dtype)


def add_lora(model: Llama, *, rank: int, alpha: float, dropout: float,
             targets=tuple(LORA_TARGETS), seed: int = 0) -> Llama:
  """Wraps the target projections of every kept sublayer in `LoRALinear`, in place."""
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  experts = [t for t in targets if model.config.is_moe and LORA_TARGETS[t][0] == "mlp"]
  if experts:
    raise ValueError(f"heal.lora.targets {','.join(experts)}: LoRA on a mixture's experts is not "
                     f"implemented; set --config.heal.lora.targets=q,k,v,o (attention) or "
                     f"--config.heal.method=partial")
  for target in targets:
    kind, name = LORA_TARGETS[target]
    stack = getattr(model.layers, kind)
    n = getattr(stack, name).kernel.shape[0]
    if n == 0:
      continue

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def wrap(base, rngs):
      return LoRALinear(base, rank, alpha, dropout, rngs=rngs)

    setattr(stack, name, wrap(getattr(stack, name), rngs))
  return model


def merge_lora(model: Llama) -> Llama:
  """Folds every `LoRALinear` into its base kernel (`W + A @ B * alpha / rank`), in place."""
  for kind in ("attn", "mlp"):
    stack = getattr(model.layers, kind)
    for _, name in [v for v in LORA_TARGETS.values() if v[0] == kind]:
      lora = getattr(stack, name, None)  # (a mixture's FFN has no such projection)
      if isinstance(lora, LoRALinear):
        kernel = lora.base.kernel
        delta = jnp.einsum("nir,nro->nio", lora.lora_a[...], lora.lora_b[...]) * lora.scale
        kernel.set_value((kernel[...].astype(jnp.float32) + delta).astype(kernel.dtype))
        setattr(stack, name, lora.base)
  return model


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_parts(model: Llama, c):
  """(nnx filter of the trained variables, update mask per trained leaf as a function of its
  path and shape). LoRA: the `LoRAParam`s, whole. Partial: the LM head and the stacked rows of
  the last blocks.

  The mask is `1.0`, or for a leaf `[L, ...]` of a stacked sublayer, float32 `[L, 1, ..., 1]` of
  the leaf's rank (1 on the rows of the trained blocks, 0 elsewhere) to broadcast against it."""
  if c.method == HealMethod.LORA:
    return nnx.LoRAParam, lambda path, shape: 1.0
  head = "lm_head" if model.lm_head is not None else "embed"
  present = model.present
  holding = np.flatnonzero(present.any(axis=1))
  chosen = set(holding[-int(c.partial.last_blocks):].tolist()) if c.partial.last_blocks else set()
  rows = {}
  for kind, column in (("attn", 0), ("mlp", 1)):
    layers = np.flatnonzero(present[:, column])  # the stack's rows, by block
    rows[kind] = np.asarray([layer in chosen for layer in layers], np.float32)

  def selected(path, value):
    p = _path_str(path)
    if not isinstance(value, nnx.Param):
      return False
    if p.startswith(head + "/"):
      return bool(c.partial.lm_head)
    return any(p.startswith(f"layers/{k}/") and rows[k].any() for k in rows)

  def mask(path, shape):
    p = _path_str(path)
    for kind, r in rows.items():
      if p.startswith(f"layers/{kind}/"):
        return r.reshape((-1,) + (1,) * (len(shape) - 1))
    return 1.0

  if not (c.partial.lm_head or any(r.any() for r in rows.values())):
    raise ValueError("heal.method=partial with heal.partial.lm_head=False and last_blocks=0 "
                     "trains nothing")
  return selected, mask
