#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded default (SmolLM2-135M, packaged data,
# offline). Extra arguments go to the job, e.g. --config.search.ratio=0.3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m finercut_jax.main --config=configs/smollm2_135m.py "$@"
