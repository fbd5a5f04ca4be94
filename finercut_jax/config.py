"""The model's architecture description, and the rules for accepting a Hugging Face config.

Only what the model implements is accepted: a field that would change the computation in a way
the model does not reproduce is refused by name, so nothing runs silently wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


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

    missing = [f for f in ("num_attention_heads", "hidden_size", "vocab_size", "intermediate_size",
                           "num_hidden_layers") if hf.get(f) is None]
    if missing:
      raise UnsupportedConfigError(f"{source}: required field(s) {', '.join(missing)} missing "
                                   f"(a Llama config.json has them all)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    return cls(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_llama3=llama3,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
    )
