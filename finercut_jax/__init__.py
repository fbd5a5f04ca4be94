"""finercut_jax: FinerCut fine-grained layer pruning for Llama-family models (Llama, Mistral,
Qwen2, Mixtral) in JAX/Flax NNX.

What a JAX codebase needs, importable from here: the NNX model (`Llama`) and its loaders, the
compiled scorer and the greedy search, pruned checkpoints, and their Hugging Face export.
"""
from finercut_jax.checkpoint import load_pruned, restore_pruned, save_pruned
from finercut_jax.config import LlamaConfig, UnsupportedConfigError
from finercut_jax.hf_export import ExportError, export_model, export_pruned
from finercut_jax.loading import CheckpointError, load_model, load_params, load_tokenizer
from finercut_jax.model import (Attention, DecoderStack, Experts, Llama, MLP, MoE, RMSNorm,
                                forward)
from finercut_jax.scorer import Candidate, Scorer
from finercut_jax.search import SearchSpec, greedy_search, keep_mask
from finercut_jax.sharding import make_mesh

__all__ = ["Attention", "Candidate", "CheckpointError", "DecoderStack", "Experts", "ExportError",
           "Llama", "LlamaConfig", "MLP", "MoE", "RMSNorm", "Scorer", "SearchSpec",
           "UnsupportedConfigError", "export_model", "export_pruned", "forward", "greedy_search",
           "keep_mask", "load_model", "load_params", "load_pruned", "load_tokenizer", "make_mesh",
           "restore_pruned", "save_pruned"]
