"""The full set of configuration fields, with defaults; config files under configs/ override them."""
from __future__ import annotations

import ml_collections

from finercut_jax.evaluation.run import default_eval_config
from finercut_jax.healing.settings import default_heal_config


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.run_dir = ""  # required: where the run's outputs go (resumes if it holds a search)
  # JAX's persistent compilation cache: a repeated or resumed job loads its compiled programs
  # from here instead of compiling them again ("": off).
  c.compilation_cache = "~/.cache/finercut_jax/xla"

  c.model = ml_collections.ConfigDict()
  c.model.path = "smollm2-135m"  # HF checkpoint dir, .gguf file, or "smollm2-135m"
  c.model.dtype = "float32"  # parameter and compute dtype: float32 on CPU, bfloat16 on accelerators

  c.data = ml_collections.ConfigDict()
  c.data.source = "wikitext2"  # "wikitext2" (paper), "packaged" (offline), or a .txt/.jsonl/.parquet
  c.data.num_sequences = 10  # N (paper: 10)
  c.data.seq_len = 256  # T (paper: 256)

  c.search = ml_collections.ConfigDict()
  c.search.metric = "js"  # js | js_official | kl | angular | logit_l2 | ppl
  c.search.ratio = 0.25  # fraction of sublayers (of blocks, for pool=blocks) to remove
  c.search.full_ordering = False  # run every step, not just up to `ratio`
  c.search.mask_ratios = (0.25,)  # masks and pruned checkpoints written for these ratios
  c.search.pool = "sublayers"  # sublayers | attn | ffn | blocks
  c.search.protect_front = ml_collections.config_dict.placeholder(float)  # None: no protection
  c.search.one_shot = False
  c.search.tie_break = "sublayer_id"  # exact ties: sublayer_id (lowest) | module_name (official)

  c.scorer = ml_collections.ConfigDict()
  c.scorer.backend = "jit"  # jit (jit + shard_map) | pmap
  c.scorer.chunk_width = 1  # candidates per vmapped chunk per device (1 on CPU; 4-16 on GPU/TPU)
  c.scorer.position_block = 256  # positions of a sequence per fused LM-head + divergence block
  c.scorer.mesh_model = 1  # tensor-parallel width; the candidate axis takes the other devices
  c.scorer.mesh_cand = 0  # 0: all devices not used by the model axis
  c.scorer.state_every = 2  # keep candidates' states every this many sublayer boundaries...
  c.scorer.state_memory_gb = 2.0  # ...coarser if they would exceed this per device (0: keep none)

  # Several processes (TPU pod slice, GPU cluster): unset, a SLURM/Open MPI/Cloud TPU launch is
  # detected and one process runs otherwise; set all three for any other launcher.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)  # "host:port"
  c.distributed.num_processes = ml_collections.config_dict.placeholder(int)
  c.distributed.process_id = ml_collections.config_dict.placeholder(int)

  c.checkpoint = True  # write Orbax checkpoints of the pruned models

  # Healing of one pruned model after the search (finercut_jax/healing/): the official code's
  # LoRA settings; off unless a config or --config.heal.enabled=True asks for it.
  c.heal = default_heal_config()

  # Evaluation of the dense and pruned (and healed) models after the search (finercut_jax/evaluation).
  c.eval = default_eval_config()
  c.eval.enabled = False  # config files switch it on
  return c


def paper_config(name: str, checkpoint: str, *, model_axis: int = 1) -> ml_collections.ConfigDict:
  """The paper's settings for one of its models: 10 x 256 WikiText-2 train tokens, the full
  ordering, evaluation on the first 1000 documents of each task plus MMLU, and the divergence and
  tie order of the official code that produced the paper's orderings (`js_official`, ties by
  module name). `--config.search.metric=js --config.search.tie_break=sublayer_id` gives the
  textbook Jensen-Shannon divergence the paper writes down."""
  c = base_config()
  c.run_dir = f"runs/{name}"
  c.model.path = f"checkpoints/{checkpoint}"
  c.model.dtype = "bfloat16"
  c.data.source = "wikitext2"
  c.data.num_sequences = 10
  c.data.seq_len = 256
  c.search.metric = "js_official"
  c.search.tie_break = "module_name"
  c.search.ratio = 0.25
  c.search.full_ordering = True
  c.search.mask_ratios = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
  c.scorer.chunk_width = 8
  c.scorer.mesh_model = model_axis
  c.eval.enabled = True
  c.eval.limit = 1000  # the paper's first 1000 documents per task
  c.eval.tasks += ",mmlu"
  c.eval.scoring.tokens_per_batch = 16384
  return c
