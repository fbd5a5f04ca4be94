r"""Heals a pruned model of a run: `python -m finercut_jax.heal --run_dir=runs/x --ratio=0.25`.

Healing settings are the run's own `heal` section (its `config.json`; the fields and defaults are
in `finercut_jax/healing/`), with the command line's overrides on top:
`--heal.method=partial --heal.steps=100 --heal.learning_rate=1e-4`. `--ratio` defaults to
`heal.ratio`. Writes `<run_dir>/healed/ratio_<r>/` (the healed checkpoint, the training
checkpoints, `healing.json`, `healing.png`); rerun to resume an interrupted run. Then
`python -m finercut_jax.evaluate --run_dir=runs/x` evaluates it beside the pruned model. Multi-host
runs start as `finercut_jax.main` does.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from finercut_jax.jobs import cli
from finercut_jax.healing.run import default_heal_config

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory written by finercut_jax.main.")
_RATIO = flags.DEFINE_float("ratio", None, "Which pruned model (a ratio of masks.json); default "
                            "heal.ratio.")
try:  # ml_collections applies the command line's --heal.* overrides here, at definition
  _HEAL = config_flags.DEFINE_config_dict("heal", default_heal_config(),
                                          "Overrides of the run's healing settings.")
except (AttributeError, KeyError) as e:
  cli.unknown_setting(e, sys.argv)


def run_heal_config(run_dir: str, overrides: dict | None = None):
  """The healing settings a run was configured with, `overrides` (flat, dotted keys) on top."""
  import os

  from finercut_jax.healing.run import resolve_heal_config
  from finercut_jax.rundir.atomic import read_json
  run_config = read_json(os.path.join(run_dir, "config.json"))
  if run_config is None:
    raise FileNotFoundError(f"{run_dir}/config.json is missing: not a run directory")
  config = resolve_heal_config(run_config.get("heal"))
  config.update_from_flattened_dict(dict(overrides or {}))
  return config


def run(run_dir: str, ratio: float | None = None, overrides: dict | None = None) -> str:
  """Heals `ratio` of `run_dir` (every process of a multi-process job calls this)."""
  from finercut_jax.parallel import distributed
  from finercut_jax.healing.run import heal_run
  with cli.existing_run(run_dir):
    config = run_heal_config(run_dir, overrides)
    return heal_run(run_dir, config.ratio if ratio is None else ratio, config,
                    log=print if distributed.is_primary() else (lambda *_: None))


def main(argv):
  cli.start(argv)
  overrides = config_flags.get_override_values(flags.FLAGS["heal"])
  with cli.expected_errors():
    run(_RUN_DIR.value, _RATIO.value, overrides)


if __name__ == "__main__":
  flags.mark_flag_as_required("run_dir")
  app.run(main, flags_parser=cli.parse_flags)
