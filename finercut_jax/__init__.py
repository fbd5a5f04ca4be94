"""finercut_jax: FinerCut fine-grained layer pruning for Llama-family models in JAX/Flax."""
from finercut_jax.config import LlamaConfig, UnsupportedConfigError
from finercut_jax.loading import CheckpointError, load_model, load_params, load_tokenizer
from finercut_jax.model import Llama, forward

__all__ = ["LlamaConfig", "UnsupportedConfigError", "CheckpointError", "load_model", "load_params",
           "load_tokenizer", "Llama", "forward"]
