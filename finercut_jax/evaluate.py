r"""Evaluates an existing run: `python -m finercut_jax.evaluate --run_dir=runs/x`.

Evaluation settings are the run's own `eval` section (its `config.json`), with the command line's
overrides on top: `--eval.limit=100 --eval.tasks=piqa,boolq,mmlu --eval.ratios=0.25`. Writes
`eval_results.json`, the plots and `report.md` into the run directory. The models are loaded onto
the run's mesh (`scorer.mesh_model`); on a TPU pod slice or GPU cluster run it on every host as
the search was. The job itself is `finercut_jax.jobs.evaluate`.
"""
from __future__ import annotations

from absl import app, flags

from finercut_jax import jobs
from finercut_jax.evaluation import default_eval_config
from finercut_jax.jobs import cli

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory written by finercut_jax.main.")
cli.define_overrides("eval", default_eval_config(), "Overrides of the run's evaluation settings.")


def main(argv):
  cli.start(argv)
  with cli.expected_errors():
    jobs.evaluate(_RUN_DIR.value, cli.overrides("eval"))


if __name__ == "__main__":
  flags.mark_flag_as_required("run_dir")
  app.run(main, flags_parser=cli.parse_flags)
