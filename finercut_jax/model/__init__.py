"""The model: its architecture description, the Flax NNX modules that take per-sublayer masks,
the checkpoint layout they load from and save to, loading (Hugging Face directories, GGUF files,
the packaged default), pruned Orbax checkpoints and the Hugging Face export formats."""
from finercut_jax.model.architecture import LlamaConfig, UnsupportedConfigError
from finercut_jax.model.checkpoint import load_pruned, restore_pruned, save_pruned
from finercut_jax.model.export_formats import (FORMATS, ExportError, ExportFormat, export_model,
                                               export_pruned)
from finercut_jax.model.loading import (CheckpointError, load_config, load_model, load_params,
                                        load_tokenizer)
from finercut_jax.model.modules import (ATTN, FFN, MLP, Attention, DecoderStack, Experts, Llama,
                                        MoE, RMSNorm, forward)

__all__ = ["ATTN", "FFN", "Attention", "CheckpointError", "DecoderStack", "Experts", "ExportError",
           "ExportFormat", "FORMATS", "Llama", "LlamaConfig", "MLP", "MoE", "RMSNorm",
           "UnsupportedConfigError", "export_model", "export_pruned", "forward", "load_config",
           "load_model", "load_params", "load_pruned", "load_tokenizer", "restore_pruned",
           "save_pruned"]
