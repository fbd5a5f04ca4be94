"""The configuration class that a DeciLM export ships as `configuration_decilm.py`.

vLLM serves per-sublayer no-ops with its own model code (`DeciLMForCausalLM`,
vllm/model_executor/models/nemotron_nas.py), but neither vLLM nor transformers defines the config
class of `model_type: "nemotron-nas"`: they build it from the checkpoint's `auto_map`, so serving
needs `--trust-remote-code`. This file is that class and nothing else (no model code): a
transformers `LlamaConfig` whose `block_configs` entries read as attributes, the way vLLM's
`DeciLMDecoderLayer` reads them (`block_config.attention.no_op`, `.attention.n_heads_in_group`,
`.ffn.no_op`, `.ffn.ffn_mult` or `.ffn.intermediate_size`).

It imports only transformers, so that transformers' remote-code loader accepts it on its own.
"""
from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


class Fields(dict):
  """A JSON object whose keys also read as attributes; an absent key is an absent attribute."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def _block(block) -> Fields:
  return Fields({part: Fields(block.get(part) or {}) for part in ("attention", "ffn")})


@strict
class DeciLMConfig(LlamaConfig):
  model_type = "nemotron-nas"
  block_configs: list | None = None

  def __post_init__(self, **kwargs):
    self.block_configs = [_block(b) for b in self.block_configs or []]
    super().__post_init__(**kwargs)
