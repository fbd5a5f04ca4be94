"""The jobs the commands run, as library functions a notebook or another codebase can call:
`run_pruning` (the FinerCut search, pruned checkpoints, healing and evaluation as configured),
`run_comparison` (FinerCut beside the baselines), and `evaluate`, `heal`, `export` on a finished
run. `base_config`/`paper_config` give every setting with its default."""
from finercut_jax.jobs.comparison import (DEFAULT_RATIOS, ComparisonError, parse_methods,
                                          run_comparison)
from finercut_jax.jobs.finished_run import evaluate, existing_run, export, heal
from finercut_jax.jobs.job import ConfigError, Job, prepare, validate
from finercut_jax.jobs.pruning import run_pruning
from finercut_jax.jobs.settings import base_config, paper_config

__all__ = ["DEFAULT_RATIOS", "ComparisonError", "ConfigError", "Job", "base_config", "evaluate",
           "existing_run", "export", "heal", "paper_config", "parse_methods", "prepare",
           "run_comparison", "run_pruning", "validate"]
