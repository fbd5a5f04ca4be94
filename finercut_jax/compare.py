r"""FinerCut beside the block- and sublayer-pruning baselines, on one model, one set of
calibration tokens and one evaluation:

  python -m finercut_jax.compare --config=configs/smollm2_135m.py

`--methods` (default: all of `search.baselines.METHODS`), `--ratios` (fractions of sublayers;
block methods remove the nearest whole-block count), `--seeds` (the random methods' draws),
`--limit` (documents per task) and `--comparison_dir` (default `<config.run_dir>_comparison`);
the config's own fields are overridable as for `finercut_jax.main` (`--config.eval.tasks=...`).

The comparison directory (`rundir.ComparisonDir`) holds a run directory per method, the dense
model's evaluation, made once, and comparison.json, comparison.md and their pictures. Rerunning
resumes. The job itself is `finercut_jax.jobs.run_comparison`.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from finercut_jax import jobs
from finercut_jax.jobs import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file under configs/.")
_METHODS = flags.DEFINE_string("methods", "all", "Comma-separated methods, or 'all'.")
_RATIOS = flags.DEFINE_string("ratios", ",".join(f"{r:g}" for r in jobs.DEFAULT_RATIOS),
                              "Comma-separated fractions of sublayers to remove.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Seeds of the random methods.")
_LIMIT = flags.DEFINE_integer("limit", 30, "Documents per task (0: all); MMLU: per subject.")
_DIR = flags.DEFINE_string("comparison_dir", None,
                           "Where the comparison goes; default <config.run_dir>_comparison.")


def _csv(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def main(argv):
  cli.start(argv)
  with cli.expected_errors():
    jobs.run_comparison(_CONFIG.value, methods=jobs.parse_methods(_METHODS.value),
                        ratios=[float(r) for r in _csv(_RATIOS.value)],
                        seeds=[int(s) for s in _csv(_SEEDS.value)], limit=_LIMIT.value,
                        comparison_dir=_DIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
