"""The model's architecture description, and the rules for accepting a Hugging Face config.

Only what the model implements is accepted: a field that would change the computation in a way
the model does not reproduce is refused by name, so nothing runs silently wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# "nemotron-nas" is the DeciLM layout (per-block `block_configs`) that `finercut_jax.export` writes
# for models with single sublayers removed; uniform blocks only (see `decilm_blocks`).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "nemotron-nas")


class UnsupportedConfigError(ValueError):
  """A checkpoint's config asks for something this model does not implement."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama-3.1 style frequency scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings), or None for plain RoPE.
  rope_llama3: tuple[float, float, float, int] | None = None
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedConfigError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise UnsupportedConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

  @property
  def num_sublayers(self) -> int:
    return 2 * self.num_layers

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
    d = dict(d)
    if d.get("rope_llama3") is not None:
      d["rope_llama3"] = tuple(d["rope_llama3"])
    return cls(**d)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
    """Builds the config from a Hugging Face `config.json` dict, refusing what is not implemented."""

    def refuse(field, value, why):
      raise UnsupportedConfigError(
          f"{source}: unsupported config field {field}={value!r}: {why}")

    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
      refuse("model_type", model_type, f"only {SUPPORTED_MODEL_TYPES} (Llama-family dense) are implemented")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      refuse("hidden_act", act, "only SwiGLU with silu is implemented")
    for field in ("attention_bias", "mlp_bias"):
      if hf.get(field):
        refuse(field, hf[field], "biases in attention/MLP projections are not implemented")
    if hf.get("sliding_window") is not None:
      refuse("sliding_window", hf["sliding_window"], "sliding-window attention is not implemented")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      refuse("partial_rotary_factor", hf["partial_rotary_factor"], "partial rotary is not implemented")

    # transformers >= 5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
      rope.update(scaling)
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      refuse("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"],
             "partial rotary is not implemented")
    llama3 = None
    if rope_type == "llama3":
      llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope.get("original_max_position_embeddings",
                             hf.get("max_position_embeddings", 8192))))
    elif rope_type != "default":
      refuse("rope_type", rope_type, "only 'default' and 'llama3' RoPE are implemented")

    required = ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers") + (
        () if model_type == "nemotron-nas" else ("intermediate_size",))
    missing = [f for f in required if hf.get(f) is None]
    if missing:
      raise UnsupportedConfigError(f"{source}: required field(s) {', '.join(missing)} missing "
                                   f"(a Llama config.json has them all)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    intermediate = hf.get("intermediate_size")
    if model_type == "nemotron-nas":
      kv_heads, intermediate, _ = decilm_blocks(hf, source)
    return cls(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_llama3=llama3,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
    )

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` of a `LlamaForCausalLM` with this architecture."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_llama3 is not None:
      factor, low, high, original = self.rope_llama3
      rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                  original_max_position_embeddings=original)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": False,
            "mlp_bias": False}


def decilm_intermediate_size(ffn: Mapping[str, Any], hidden_size: int) -> int:
  """A DeciLM block's FFN width: its `intermediate_size`, else from `ffn_mult` as vLLM's
  nemotron_nas.py computes it (`int(2 * ffn_mult * hidden / 3)` rounded up to a multiple of
  256)."""
  if ffn.get("ffn_mult") is not None:
    size = int(2 * ffn["ffn_mult"] * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256
  return int(ffn["intermediate_size"])


def decilm_blocks(hf: Mapping[str, Any], source: str = "config.json"
                  ) -> tuple[int, int, np.ndarray]:
  """`(num_kv_heads, intermediate_size, present [L, 2])` of a DeciLM (`nemotron-nas`) config.

  Each block's `attention.no_op` / `ffn.no_op` removes that sublayer. The kept sublayers must all
  have the same shape (one `n_heads_in_group`, one FFN width): the model stacks them, so NVIDIA's
  variable-width Nemotron models (and `replace_with_linear`) are refused."""
  def refuse(what):
    raise UnsupportedConfigError(f"{source}: {what}")

  blocks = hf.get("block_configs")
  layers = int(hf["num_hidden_layers"])
  if not isinstance(blocks, list) or len(blocks) != layers:
    refuse(f"block_configs must list one entry per layer ({layers}), got "
           f"{len(blocks) if isinstance(blocks, list) else blocks!r}")
  present = np.ones((layers, 2), bool)
  groups, widths = set(), set()
  for l, block in enumerate(blocks):
    for k, name in enumerate(("attention", "ffn")):
      part = block.get(name) or {}
      unknown = {key for key, value in part.items() if value and key not in (
          "no_op", "replace_with_linear", "n_heads_in_group", "ffn_mult", "intermediate_size",
          "hidden_act")}
      if part.get("replace_with_linear") or unknown:
        refuse(f"block {l} {name}: {sorted(unknown) or 'replace_with_linear'} is not implemented "
               f"(only present or no_op sublayers)")
      present[l, k] = not part.get("no_op", False)
      if not present[l, k]:
        continue
      if k == 0:
        groups.add(int(part["n_heads_in_group"]))
      else:
        if part.get("hidden_act", hf.get("hidden_act", "silu")) != "silu":
          refuse(f"block {l} ffn: hidden_act={part['hidden_act']!r}; only silu is implemented")
        widths.add(decilm_intermediate_size(part, int(hf["hidden_size"])))
  if len(groups) > 1 or len(widths) > 1:
    refuse(f"blocks of different shapes (n_heads_in_group {sorted(groups)}, FFN widths "
           f"{sorted(widths)}) are not implemented: every kept sublayer must have the same shape")
  heads = int(hf["num_attention_heads"])
  kv_heads = heads // groups.pop() if groups else int(hf.get("num_key_value_heads") or heads)
  width = widths.pop() if widths else int(hf.get("intermediate_size") or 1)
  return kv_heads, width, present
