"""Tiny random transformers models (Llama and the other families the model implements) saved to
disk: the independent reference for parity."""
import json
import os

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import finercut_jax

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


def saved_and_loaded(name: str, directory, batch: int, seq: int):
  """(HF torch model of tiny config `name`, the directory it is saved to, our model loaded from
  there, random tokens `[batch, seq]`)."""
  hf = make_hf_model(name, seed=1)
  directory = save_hf_model(hf, directory)
  model, tok = finercut_jax.load_model(directory, tokenizer=False)
  assert tok is None
  tokens = np.random.RandomState(0).randint(0, hf.config.vocab_size, (batch, seq))
  return hf, directory, model, tokens


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
  vocab = {w: i for i, w in enumerate(["[UNK]"] + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
  fast.save_pretrained(str(directory))
  return fast


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """q/k rows as llama.cpp's convert_hf_to_gguf.py stores them (interleaved RoPE pairs)."""
  d_out, d_in = w.shape
  hd = d_out // n_head
  return w.reshape(n_head, 2, hd // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def write_gguf(hf, path, *, drop=(), extra=None, skip_keys=(), extra_keys=None) -> str:
  """A float32 GGUF file of `hf` as llama.cpp's convert_hf_to_gguf.py writes it: its tensor names
  and metadata, for a Llama its q/k rows permuted, for a Qwen2 (architecture `qwen2`, NEOX RoPE)
  its q/k rows as they are and its q/k/v biases."""
  c = hf.config
  arch = c.model_type
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  assert arch in ("llama", "qwen2"), arch
  sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  tensors = {"token_embd.weight": sd["model.embed_tokens.weight"]}
  hf_layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  for layer in range(c.num_hidden_layers):
    for ours, theirs in hf_layer.items():
      w = sd[f"model.layers.{layer}.{theirs}.weight"]
      if ours == "attn_q" and arch == "llama":
        w = llama_cpp_permute(w, c.num_attention_heads)
      elif ours == "attn_k" and arch == "llama":
        w = llama_cpp_permute(w, c.num_key_value_heads)
      tensors[f"blk.{layer}.{ours}.weight"] = w
      if ours in ("attn_q", "attn_k", "attn_v") and arch == "qwen2":
        tensors[f"blk.{layer}.{ours}.bias"] = sd[f"model.layers.{layer}.{theirs}.bias"]
  tensors["output_norm.weight"] = sd["model.norm.weight"]
  if not c.tie_word_embeddings:
    tensors["output.weight"] = sd["lm_head.weight"]
  tensors.update(extra or {})
  p = arch + "."
  meta = {
      p + "block_count": ("uint32", c.num_hidden_layers),
      p + "context_length": ("uint32", c.max_position_embeddings),
      p + "embedding_length": ("uint32", c.hidden_size),
      p + "feed_forward_length": ("uint32", c.intermediate_size),
      p + "attention.head_count": ("uint32", c.num_attention_heads),
      p + "attention.head_count_kv": ("uint32", c.num_key_value_heads),
      p + "attention.key_length": ("uint32", head_dim),
      p + "attention.value_length": ("uint32", head_dim),
      p + "rope.freq_base": ("float32", c.rope_parameters["rope_theta"]),
      p + "attention.layer_norm_rms_epsilon": ("float32", c.rms_norm_eps),
  }
  meta.update(extra_keys or {})
  writer = gguf.GGUFWriter(str(path), arch)
  for key, (kind, value) in meta.items():
    if key not in skip_keys:
      getattr(writer, "add_" + kind)(key, value)
  for name, w in tensors.items():
    if name not in drop:
      writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)
