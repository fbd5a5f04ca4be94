"""finercut_jax: FinerCut fine-grained layer pruning for Llama-family models (Llama, Mistral,
Qwen2, Mixtral) in JAX/Flax NNX.

What a JAX codebase needs most, importable from here: the NNX model (`Llama`) and its loaders,
the compiled scorer and the greedy search, pruned checkpoints, their Hugging Face export, and the
run directory. Each subpackage (`model`, `scoring`, `search`, `parallel`, `data`, `healing`,
`evaluation`, `rundir`, `jobs`) lists the rest of its public names.
"""
from finercut_jax.model import (MLP, Attention, CheckpointError, DecoderStack, Experts,
                                ExportError, Llama, LlamaConfig, MoE, RMSNorm,
                                UnsupportedConfigError, export_model, export_pruned, forward,
                                load_model, load_params, load_pruned, load_tokenizer,
                                restore_pruned, save_pruned)
from finercut_jax.parallel import make_mesh
from finercut_jax.rundir import RemovalStep, RunDir
from finercut_jax.scoring import Candidate, Scorer
from finercut_jax.search import SearchSpec, greedy_search, keep_mask

__all__ = ["Attention", "Candidate", "CheckpointError", "DecoderStack", "Experts", "ExportError",
           "Llama", "LlamaConfig", "MLP", "MoE", "RMSNorm", "RemovalStep", "RunDir", "Scorer",
           "SearchSpec", "UnsupportedConfigError", "export_model", "export_pruned", "forward",
           "greedy_search", "keep_mask", "load_model", "load_params", "load_pruned",
           "load_tokenizer", "make_mesh", "restore_pruned", "save_pruned"]
