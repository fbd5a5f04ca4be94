r"""Heals a pruned model of a run: `python -m finercut_jax.heal --run_dir=runs/x --ratio=0.25`.

Healing settings are the run's own `heal` section (its `config.json`; the fields and defaults are
in `finercut_jax/healing/settings.py`), with the command line's overrides on top:
`--heal.method=partial --heal.steps=100 --heal.learning_rate=1e-4`. `--ratio` defaults to
`heal.ratio`. Writes `<run_dir>/healed/ratio_<r>/` (the healed checkpoint, the training
checkpoints, `healing.json`, `healing.png`); rerun to resume an interrupted run. Then
`python -m finercut_jax.evaluate --run_dir=runs/x` evaluates it beside the pruned model. Multi-host
runs start as `finercut_jax.main` does. The job itself is `finercut_jax.jobs.heal`.
"""
from __future__ import annotations

from absl import app, flags

from finercut_jax import jobs
from finercut_jax.healing import default_heal_config
from finercut_jax.jobs import cli

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory written by finercut_jax.main.")
_RATIO = flags.DEFINE_float("ratio", None, "Which pruned model (one of the run's mask ratios); "
                            "default heal.ratio.")
cli.define_overrides("heal", default_heal_config(), "Overrides of the run's healing settings.")


def main(argv):
  cli.start(argv)
  with cli.expected_errors():
    jobs.heal(_RUN_DIR.value, _RATIO.value, cli.overrides("heal"))


if __name__ == "__main__":
  flags.mark_flag_as_required("run_dir")
  app.run(main, flags_parser=cli.parse_flags)
