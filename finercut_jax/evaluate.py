r"""Evaluates an existing run: `python -m finercut_jax.evaluate --run_dir=runs/x`.

Evaluation settings are the run's own `eval` section (its `config.json`), with the command line's
overrides on top: `--eval.limit=100 --eval.tasks=piqa,boolq,mmlu --eval.ratios=0.25`. Writes
`eval_results.json`, the plots and `report.md` into the run directory. The models are loaded onto
the run's mesh (`scorer.mesh_model`); on a TPU pod slice or GPU cluster run it on every host as
the search was (the distributed runtime starts as in `finercut_jax.main`, from the cluster's
launcher or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from finercut_jax.jobs import cli

from finercut_jax.evaluation.run import default_eval_config, evaluate_run, run_eval_config

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory written by finercut_jax.main.")
try:  # ml_collections applies the command line's --eval.* overrides here, at definition
  _EVAL = config_flags.DEFINE_config_dict("eval", default_eval_config(),
                                          "Overrides of the run's evaluation settings.")
except (AttributeError, KeyError) as e:
  cli.unknown_setting(e, sys.argv)


def run(run_dir: str, overrides: dict | None = None) -> dict:
  """Evaluates `run_dir` (every process of a multi-process job calls this; the run directory is
  on a file system they all see, as the job's Orbax checkpoints need)."""
  with cli.existing_run(run_dir):
    config = run_eval_config(run_dir, overrides)
    return evaluate_run(run_dir, config, mesh=cli.run_mesh(run_dir))


def main(argv):
  cli.start(argv)
  overrides = config_flags.get_override_values(flags.FLAGS["eval"])
  with cli.expected_errors():
    run(_RUN_DIR.value, overrides)


if __name__ == "__main__":
  flags.mark_flag_as_required("run_dir")
  app.run(main, flags_parser=cli.parse_flags)
