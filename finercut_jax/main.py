r"""Runs a FinerCut search: `python -m finercut_jax.main --config=configs/smollm2_135m.py`.

Any config field can be overridden, e.g. `--config.search.ratio=0.3 --config.run_dir=runs/x`.
Rerunning the same command on the same run directory resumes an interrupted search. The job
itself is `finercut_jax.jobs.run_pruning`; this file only parses the command line.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from finercut_jax import jobs
from finercut_jax.jobs import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file under configs/.")


def main(argv):
  cli.start(argv)
  with cli.expected_errors():
    jobs.run_pruning(_CONFIG.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
