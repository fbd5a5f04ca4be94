"""FinerCut on Llama-2-70b-hf with the paper's settings (finercut_jax.jobs.settings.paper_config).

Expects a local Hugging Face checkpoint directory (config.json + safetensors); point
--config.model.path at it. WikiText-2 must be available to `datasets` locally, or set
--config.data.source to a local .txt/.jsonl/.parquet file.

Mesh: as configs/llama3_70b.py (an 8-way model axis, a multiple of 8 devices; the same layer
shapes, so the same meshes fit TPU slices: that file lists them. They were compiled for
Llama-3-70B, whose larger vocabulary makes its figures an upper bound here).
"""
from finercut_jax.jobs.settings import paper_config


def get_config():
  return paper_config("llama2_70b", "Llama-2-70b-hf", model_axis=8)
