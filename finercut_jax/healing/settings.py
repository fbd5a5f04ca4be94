"""The healing settings: their fields and defaults (`default_heal_config`), a run's overrides on
top (`resolve_heal_config`), and the checks that refuse settings that cannot train
(`check_config`)."""
from __future__ import annotations

import ml_collections

from finercut_jax.healing.lora import LORA_TARGETS, HealMethod
from finercut_jax.rundir.sections import override_section

# The public API named the methods by this tuple before `HealMethod`; kept for its callers.
METHODS = tuple(m.value for m in HealMethod)


def default_heal_config() -> ml_collections.ConfigDict:
  """The official code's LoRA settings (rank 8, alpha 32, dropout 0.1 on every projection; AdamW
  lr 3e-4, 100 warmup steps, sequences of 256, effective batch 128)."""
  c = ml_collections.ConfigDict()
  c.enabled = False  # the main job heals `ratio` after the search when set
  c.ratio = 0.25  # which pruned model of the run (a ratio of its masks.json)
  # A plain str, not the enum: ConfigDict overrides must keep the field's type (str).
  c.method = HealMethod.LORA.value  # lora | partial
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 32.0
  c.lora.dropout = 0.1
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.partial = ml_collections.ConfigDict()
  c.partial.lm_head = True  # the LM head (the embedding, when tied)
  c.partial.last_blocks = 2  # the last k blocks that still hold a sublayer
  c.steps = 200  # optimizer steps
  c.batch_size = 128  # sequences per optimizer step (the effective batch)
  c.micro_batch = 8  # sequences per forward/backward pass; divides batch_size
  c.seq_len = 256
  c.learning_rate = 3e-4
  c.warmup_steps = 100
  c.end_learning_rate = 0.0  # where the cosine decay ends
  c.weight_decay = 0.0
  c.clip_norm = 1.0  # 0: no clipping
  c.compute_dtype = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
  c.seed = 0
  c.data = ml_collections.ConfigDict()
  c.data.source = ""  # "": the calibration source (after the calibration and held-out text)
  c.data.format = "text"  # text | alpaca (then source is the JSON file)
  c.checkpoint_every = 50
  c.eval_every = 25  # held-out loss every this many steps (and at the end)
  c.eval_batches = 2  # at most this many micro-batches of held-out windows for that loss
  return c


def resolve_heal_config(heal_config=None) -> ml_collections.ConfigDict:
  """Defaults overridden by whatever fields `heal_config` sets; unknown fields are refused."""
  try:
    return override_section(default_heal_config(), heal_config, "heal",
                            "finercut_jax/healing/settings.py")
  except KeyError as e:
    raise ValueError(e.args[0]) from None


def check_config(c) -> None:
  """Refuses settings that cannot train, naming the field."""
  try:
    HealMethod(c.method)
  except ValueError:
    raise ValueError(f"heal.method {c.method!r}: choose one of {', '.join(HealMethod)}") from None
  for name in ("steps", "batch_size", "micro_batch", "seq_len", "checkpoint_every", "eval_every"):
    if int(c[name]) < 1:
      raise ValueError(f"heal.{name} must be >= 1, got {c[name]}")
  if c.seq_len < 2:
    raise ValueError(f"heal.seq_len must be >= 2, got {c.seq_len}")
  if c.batch_size % c.micro_batch:
    raise ValueError(f"heal.batch_size {c.batch_size} is not a multiple of heal.micro_batch "
                     f"{c.micro_batch}")
  if not 0 <= c.warmup_steps < max(c.steps, 1) + 1:
    raise ValueError(f"heal.warmup_steps {c.warmup_steps} must be in [0, heal.steps]")
  if not c.learning_rate > 0:
    raise ValueError(f"heal.learning_rate must be > 0, got {c.learning_rate}")
  if c.method == HealMethod.LORA:
    if c.lora.rank < 1 or not 0 <= c.lora.dropout < 1:
      raise ValueError(f"heal.lora.rank must be >= 1 and heal.lora.dropout in [0, 1), got "
                       f"{c.lora.rank}, {c.lora.dropout}")
    unknown = [t for t in lora_targets(c) if t not in LORA_TARGETS]
    if unknown or not lora_targets(c):
      raise ValueError(f"heal.lora.targets {c.lora.targets!r}: choose from "
                       f"{', '.join(LORA_TARGETS)}")
  if c.data.format not in ("text", "alpaca"):
    raise ValueError(f"heal.data.format {c.data.format!r}: choose text or alpaca")


def lora_targets(c) -> list[str]:
  """The names in `heal.lora.targets` (comma-separated), in order."""
  return [t.strip() for t in str(c.lora.targets).split(",") if t.strip()]
