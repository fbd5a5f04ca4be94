"""The model's architecture description, and the rules for accepting a Hugging Face config.

One description covers the decoder families the model implements: Llama (2, 3, 3.1/3.2, SmolLM2),
Mistral (sliding-window attention), Qwen2/Qwen2.5 (biases on the q/k/v projections) and Mixtral
(the FFN sublayer is a sparse mixture of experts). Only what the model implements is accepted: a
field that would change the computation in a way the model does not reproduce is refused by name,
so nothing runs silently wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# "nemotron-nas" is the DeciLM layout (per-block `block_configs`) that `finercut_jax.export` writes
# for models with single sublayers removed; uniform blocks only (see `decilm_blocks`).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "nemotron-nas")
# transformers' MistralConfig default, which applies when a Mistral config.json omits the key
# (Mistral-7B-v0.1 uses this window; later Mistral releases write `"sliding_window": null`).
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096
# transformers' Qwen2Config default, applied only with `use_sliding_window`.
QWEN2_DEFAULT_SLIDING_WINDOW = 4096
# transformers' defaults for fields a config.json may omit, where a family's differ from Llama's.
_FAMILY_DEFAULTS = {"mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6}}


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
  # The Hugging Face `model_type` this architecture came from (names the exported architecture).
  model_type: str = "llama"
  # Qwen2: the q, k and v projections carry biases.
  qkv_bias: bool = False
  # Mistral: a query sees only the last `sliding_window` positions (its own included).
  sliding_window: int | None = None
  # Mixtral: the FFN sublayer is a mixture of `num_experts` SwiGLU experts of width
  # `intermediate_size`, each token routed to `num_experts_per_tok` of them (0: a dense FFN).
  num_experts: int = 0
  num_experts_per_tok: int = 0

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedConfigError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise UnsupportedConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise UnsupportedConfigError(
          f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
          f"num_experts={self.num_experts}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise UnsupportedConfigError(f"sliding_window={self.sliding_window} must be at least 1")

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def ffn_flops_per_token(self, *, computed: bool = False) -> int:
    """Forward FLOPs of one FFN sublayer per token: a SwiGLU's, or for a mixture its router's plus
    its routed experts' (with `computed`, every expert's: what the dense-masked dispatch runs)."""
    swiglu = 6 * self.hidden_size * self.intermediate_size
    if not self.is_moe:
      return swiglu
    experts = self.num_experts if computed else self.num_experts_per_tok
    return 2 * self.hidden_size * self.num_experts + experts * swiglu

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
    """Builds the config from a Hugging Face `config.json` dict, refusing what is not
    implemented."""

    def refuse(field, value, why):
      raise UnsupportedConfigError(
          f"{source}: unsupported config field {field}={value!r}: {why}")

    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
      refuse("model_type", model_type, f"only {SUPPORTED_MODEL_TYPES} are implemented")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      refuse("hidden_act", act, "only SwiGLU with silu is implemented")
    for field in ("attention_bias", "mlp_bias"):
      if hf.get(field):
        refuse(field, hf[field], "biases in attention/MLP projections are not implemented "
               "(only Qwen2's q/k/v biases)")
    window = _sliding_window(hf, model_type, refuse)
    experts, per_token = 0, 0
    if model_type == "mixtral":
      # (router_jitter_noise is training-time noise in transformers; a forward pass ignores it.)
      experts = int(hf.get("num_local_experts", 8))
      per_token = int(hf.get("num_experts_per_tok", 2))
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      refuse("partial_rotary_factor", hf["partial_rotary_factor"],
             "partial rotary is not implemented")

    # transformers >= 5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
      rope.update(scaling)
    defaults = _FAMILY_DEFAULTS.get(model_type, {})
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta",
                                                      defaults.get("rope_theta", 10000.0))))
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
        rms_norm_eps=float(hf.get("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6))),
        rope_theta=rope_theta,
        rope_llama3=llama3,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        model_type="llama" if model_type == "nemotron-nas" else model_type,
        qkv_bias=model_type == "qwen2",
        sliding_window=window,
        num_experts=experts,
        num_experts_per_tok=per_token,
    )

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` of this architecture (`LlamaForCausalLM`,
    `MistralForCausalLM`, `Qwen2ForCausalLM` or `MixtralForCausalLM`)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_llama3 is not None:
      factor, low, high, original = self.rope_llama3
      rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                  original_max_position_embeddings=original)
    family = {"architectures": [_ARCHITECTURES[self.model_type]], "model_type": self.model_type}
    if self.model_type in ("mistral", "mixtral"):
      family["sliding_window"] = self.sliding_window
    if self.model_type == "qwen2":  # a window, when there is one, on every layer
      family.update(use_sliding_window=self.sliding_window is not None,
                    sliding_window=self.sliding_window, max_window_layers=0)
    if self.is_moe:
      family.update(num_local_experts=self.num_experts,
                    num_experts_per_tok=self.num_experts_per_tok)
    return {**family,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            **({"attention_bias": False, "mlp_bias": False} if self.model_type == "llama" else {})}


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}


def _sliding_window(hf: Mapping[str, Any], model_type: str, refuse) -> int | None:
  """The attention window as transformers reads each family's config: Mistral's defaults to 4096
  when the key is absent; Mixtral's to none; Qwen2's applies only with `use_sliding_window` (then
  4096 when the key is absent), and only to the layers from `max_window_layers` on (a mix of
  windowed and full layers is refused); a Llama config has none."""
  window = hf.get("sliding_window")
  if model_type == "mistral":
    window = hf.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
  elif model_type == "qwen2":
    if not hf.get("use_sliding_window", False):
      return None
    window = hf.get("sliding_window", QWEN2_DEFAULT_SLIDING_WINDOW)
    layers = int(hf.get("num_hidden_layers", 0))
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= int(hf.get("max_window_layers", 28))
        else "full_attention" for i in range(layers)]
    if window is None or "sliding_attention" not in types:
      return None
    if "full_attention" in types:
      refuse("use_sliding_window", True, f"sliding windows on some layers only (layer_types "
             f"{types}) are not implemented; every layer must use the same attention")
  elif model_type in ("llama", "nemotron-nas") and window is not None:
    refuse("sliding_window", window, "a Llama config has no sliding window (use model_type "
           "mistral for sliding-window attention)")
  return None if window is None else int(window)


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
  """`(num_kv_heads, intermediate_size, present)` of a DeciLM (`nemotron-nas`) config; present is
  bool `[L, 2]`.

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
