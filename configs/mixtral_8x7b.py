"""FinerCut on Mixtral-8x7B with the paper's settings (finercut_jax.jobs.settings.paper_config).

The candidates are, per block, the attention sublayer and the whole mixture-of-experts FFN (router
and 8 experts), as in the paper. Expects a local Hugging Face checkpoint directory of
mistralai/Mixtral-8x7B-v0.1 (config.json + safetensors, the released per-expert layout); point
--config.model.path at it. WikiText-2 must be available to `datasets` locally, or set
--config.data.source to a local .txt/.jsonl/.parquet file.

Mesh: a 4-way model axis (every expert's FFN units split over 4 devices: 46.7B parameters, 23.3 GB
each in bfloat16) and a candidate axis over the rest, so it needs a multiple of 4 devices: 8x
H100/H200 run 2 candidate groups. Per-device memory compiled ahead of time for this mesh:
benchmarks/aot_memory.py (README, "Sizing a run ahead of time").
"""
from finercut_jax.jobs.settings import paper_config


def get_config():
  return paper_config("mixtral_8x7b", "Mixtral-8x7B-v0.1", model_axis=4)
