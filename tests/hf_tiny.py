"""Tiny random transformers models (Llama and the other families the model implements) saved to
disk: the independent reference for parity."""
import json
import os

import numpy as np
import torch
import transformers

# family -> (transformers config class, model class)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mixtral": ("MixtralConfig", "MixtralForCausalLM")}

TINY_CONFIGS = {
    # GQA with tied embeddings.
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Untied, Llama-3.1 rope scaling, head_dim != hidden / heads.
    "llama3_rope_headdim": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        max_position_embeddings=256),
    # A single KV head (multi-query attention).
    "single_kv": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
}

# The other families, each with what sets it apart from Llama.
FAMILY_CONFIGS = {
    # A sliding window of 6 positions, far below the tests' sequence length.
    "mistral_window": dict(family="mistral", num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=6, tie_word_embeddings=False),
    # q/k/v biases, tied embeddings, Qwen2.5's rope theta.
    "qwen2_tied": dict(family="qwen2", num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Top-2 of 4 experts, untied.
    "mixtral_top2": dict(family="mixtral", num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}


def make_hf_model(name: str, seed: int = 0, num_layers: int = 3, **overrides):
  """A tiny random transformers model of the config `name` (TINY_CONFIGS or FAMILY_CONFIGS)."""
  # initializer_range 0.1 (HF default 0.02) makes the logits O(1) (std ~0.8, max ~3) and the
  # attention non-uniform, so a parity tolerance of 1e-4 is a relative test, not a vacuous one.
  kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                rms_norm_eps=1e-5, max_position_embeddings=128, initializer_range=0.1)
  kwargs.update({**TINY_CONFIGS, **FAMILY_CONFIGS}[name])
  kwargs.update(overrides)
  config_class, model_class = FAMILIES[kwargs.pop("family", "llama")]
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
  # Default init makes norms exactly one and biases zero; random ones test that they are applied.
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif n.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


def hf_logits(hf, tokens, keep=None) -> np.ndarray:
  """The torch model's logits; sublayers with keep False have their module output zeroed."""
  handles = []
  if keep is not None:
    for layer, block in enumerate(hf.model.layers):
      if not keep[layer][0]:
        # LlamaAttention returns (attn_output, attn_weights); zero the output, keep the rest.
        handles.append(block.self_attn.register_forward_hook(
            lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:])))
      if not keep[layer][1]:
        handles.append(block.mlp.register_forward_hook(
            lambda mod, args, out: torch.zeros_like(out)))
  try:
    with torch.no_grad():
      return hf(torch.as_tensor(tokens)).logits.float().numpy()
  finally:
    for h in handles:
      h.remove()


def edit_config(directory, edit):
  """Applies `edit(dict)` to a saved checkpoint's config.json."""
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(path, "w") as f:
    json.dump(cfg, f)


def save_hf_model(model, directory) -> str:
  model.save_pretrained(str(directory), safe_serialization=True)
  return str(directory)


WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer(directory):
  """A word-level tokenizer of WORDS (ids 1..60, [UNK] 0), saved beside the model."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["[UNK]"] + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
  fast.save_pretrained(str(directory))
  return fast
