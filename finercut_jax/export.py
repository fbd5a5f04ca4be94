r"""Exports a run's pruned model as a Hugging Face checkpoint:
`python -m finercut_jax.export --run_dir=runs/x --ratio=0.25 --out=DIR [--format=auto]`.

Formats (`finercut_jax/model/export_formats.py`): `llama` when whole blocks are removed
(transformers and vLLM load it as a plain Llama), `decilm` when single sublayers are removed
(vLLM's no-op blocks: `vllm serve DIR --trust-remote-code`, the remote code being the config class
alone), `llama_zeroed` (a plain Llama, removed sublayers as zero weights); `auto` picks `llama` or
`decilm`. `--ratio` defaults to the run's `search.ratio`; `--healed` exports the healed model of
`finercut_jax.heal`. The exported directory loads here too (`finercut_jax.load_model(DIR)`).
Multi-host runs start as `finercut_jax.main` does; process 0 writes. The job itself is
`finercut_jax.jobs.export`.
"""
from __future__ import annotations

from absl import app, flags

from finercut_jax import jobs
from finercut_jax.jobs import cli
from finercut_jax.model import FORMATS
from finercut_jax.model.export_formats import DEFAULT_SHARD_BYTES
from finercut_jax.parallel import distributed

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A run directory written by finercut_jax.main.")
_RATIO = flags.DEFINE_float("ratio", None, "Which pruned model (one of the run's mask ratios); "
                            "default the run's search.ratio.")
_OUT = flags.DEFINE_string("out", None, "The new output directory (must not exist, or be empty).")
_FORMAT = flags.DEFINE_enum("format", "auto", FORMATS, "The checkpoint format.")
_DTYPE = flags.DEFINE_string("dtype", None, "Weight dtype (bfloat16, float16, float32); default "
                             "the source checkpoint's.")
_HEALED = flags.DEFINE_bool("healed", False, "Export the healed model instead of the pruned one.")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", DEFAULT_SHARD_BYTES / 1e9,
                               "Largest safetensors file, in GB.")


def main(argv):
  cli.start(argv)
  with cli.expected_errors():
    fmt = jobs.export(_RUN_DIR.value, _OUT.value, _RATIO.value, fmt=_FORMAT.value,
                      dtype=_DTYPE.value, healed=_HEALED.value,
                      max_shard_bytes=int(_SHARD_GB.value * 1e9))
    distributed.primary_print(f"wrote {_OUT.value} ({fmt})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["run_dir", "out"])
  app.run(main, flags_parser=cli.parse_flags)
