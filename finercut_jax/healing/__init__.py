"""Healing: a short fine-tune of a pruned model with optax (LoRA or partial fine-tuning).

`settings` (the `heal` config and its checks), `lora` (which parameters train: LoRA adapters or
part of the model), `data` (training and held-out windows, batches), `trainer` (the optimizer
steps and the resumable loop) and `run` (`heal_run`: one healing run over a run directory).
"""
from finercut_jax.healing.data import TrainingData, batch_indices, check_no_overlap, training_data
from finercut_jax.healing.lora import (LORA_TARGETS, HealMethod, LoRALinear, add_lora, merge_lora,
                                       trainable_parts)
from finercut_jax.healing.run import heal_run
from finercut_jax.healing.settings import (METHODS, check_config, default_heal_config,
                                           resolve_heal_config)
from finercut_jax.healing.trainer import NonFiniteLoss, Trainer, train

__all__ = ["LORA_TARGETS", "METHODS", "HealMethod", "LoRALinear", "NonFiniteLoss", "Trainer",
           "TrainingData", "add_lora", "batch_indices", "check_config", "check_no_overlap",
           "default_heal_config", "heal_run", "merge_lora", "resolve_heal_config",
           "train", "trainable_parts", "training_data"]
