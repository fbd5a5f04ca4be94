r"""Evaluates an existing run: `python -m finercut_jax.evaluate --run_dir=runs/x`.

Evaluation settings are the run's own `eval` section (its `config.json`), with the command line's
overrides on top: `--eval.limit=100 --eval.tasks=piqa,boolq,mmlu --eval.ratios=0.25`. Writes
`eval_results.json`, the plots and `report.md` into the run directory.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from finercut_jax.evaluation.run import default_eval_config, evaluate_run, run_eval_config

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory written by finercut_jax.main.")
_EVAL = config_flags.DEFINE_config_dict("eval", default_eval_config(),
                                        "Overrides of the run's evaluation settings.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  overrides = config_flags.get_override_values(flags.FLAGS["eval"])
  evaluate_run(_RUN_DIR.value, run_eval_config(_RUN_DIR.value, overrides))


if __name__ == "__main__":
  flags.mark_flag_as_required("run_dir")
  app.run(main)
