"""FinerCut on Meta-Llama-3-70B with the paper's settings: 10 x 256 WikiText-2 train tokens, JS divergence.

Expects a local Hugging Face checkpoint directory (config.json + safetensors); point
--config.model.path at it. WikiText-2 must be available to `datasets` locally, or set
--config.data.source to a local .txt/.jsonl/.parquet file.
"""
from finercut_jax.defaults import base_config


def get_config():
  c = base_config()
  c.run_dir = "runs/llama3_70b"
  c.model.path = "checkpoints/Meta-Llama-3-70B"
  c.model.dtype = "bfloat16"
  c.data.source = "wikitext2"
  c.data.num_sequences = 10
  c.data.seq_len = 256
  c.search.metric = "js"
  c.search.ratio = 0.25
  c.search.full_ordering = True
  c.search.mask_ratios = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
  c.scorer.chunk_width = 8
  c.scorer.mesh_model = 8
  c.scorer.reuse_states = False  # kept candidate states cost 2L/state_every x N*T*D per candidate
  c.eval.enabled = True
  c.eval.limit = 1000  # the paper's first 1000 documents per task
  c.eval.tasks += ",mmlu"
  c.eval.scoring.tokens_per_batch = 16384
  return c
