"""finercut_jax: FinerCut fine-grained layer pruning for Llama-family models (Llama, Mistral,
Qwen2, Mixtral) in JAX/Flax NNX.

What a JAX codebase needs, importable from here: the NNX model (`Llama`) and its loaders, the
compiled scorer and the greedy search, pruned checkpoints, and their Hugging Face export.
"""
from finercut_jax.model.checkpoint import load_pruned, restore_pruned, save_pruned
from finercut_jax.model.architecture import LlamaConfig, UnsupportedConfigError
from finercut_jax.model.export_formats import ExportError, export_model, export_pruned
from finercut_jax.model.loading import CheckpointError, load_model, load_params, load_tokenizer
from finercut_jax.model.modules import (Attention, DecoderStack, Experts, Llama, MLP, MoE, RMSNorm,
                                forward)
from finercut_jax.scoring.scorer import Candidate, Scorer
from finercut_jax.search.greedy import SearchSpec, greedy_search, keep_mask
from finercut_jax.parallel.sharding import make_mesh

__all__ = ["Attention", "Candidate", "CheckpointError", "DecoderStack", "Experts", "ExportError",
           "Llama", "LlamaConfig", "MLP", "MoE", "RMSNorm", "Scorer", "SearchSpec",
           "UnsupportedConfigError", "export_model", "export_pruned", "forward", "greedy_search",
           "keep_mask", "load_model", "load_params", "load_pruned", "load_tokenizer", "make_mesh",
           "restore_pruned", "save_pruned"]
