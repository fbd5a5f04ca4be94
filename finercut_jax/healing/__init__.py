"""Healing: a short fine-tune of a pruned model with optax (LoRA or partial fine-tuning)."""
from finercut_jax.healing.run import (LORA_TARGETS, METHODS, LoRALinear, NonFiniteLoss, Trainer,
                                      add_lora, batch_indices, check_config, check_no_overlap,
                                      default_heal_config, heal_run, healed_dir, merge_lora,
                                      resolve_heal_config, train, trainable_parts, training_data)

__all__ = ["LORA_TARGETS", "METHODS", "LoRALinear", "NonFiniteLoss", "Trainer", "add_lora",
           "batch_indices", "check_config", "check_no_overlap", "default_heal_config", "heal_run",
           "healed_dir", "merge_lora", "resolve_heal_config", "train", "trainable_parts",
           "training_data"]
