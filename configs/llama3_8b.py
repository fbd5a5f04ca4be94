"""FinerCut on Meta-Llama-3-8B with the paper's settings (finercut_jax.jobs.settings.paper_config).

Expects a local Hugging Face checkpoint directory (config.json + safetensors); point
--config.model.path at it. WikiText-2 must be available to `datasets` locally, or set
--config.data.source to a local .txt/.jsonl/.parquet file.
"""
from finercut_jax.jobs.settings import paper_config


def get_config():
  return paper_config("llama3_8b", "Meta-Llama-3-8B")
