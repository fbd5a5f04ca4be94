#!/usr/bin/env bash
# A separate virtual environment with libtpu, for `benchmarks/aot_memory.py --topology=...`: the
# TPU compiler runs deviceless on any Linux x86-64 host (no TPU needed) and compiles the search's
# programs for a named slice. Kept apart from .venv because with libtpu installed every plain JAX
# start probes for TPUs.
#
#   bash benchmarks/setup_tpu_aot.sh
#   .venv-tpu/bin/python -m benchmarks.aot_memory --config=configs/llama3_70b.py --topology=v5p:2x2x4
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv-tpu/bin/python ]; then
  "$PYTHON" -m venv .venv-tpu
fi
.venv-tpu/bin/pip install --upgrade pip
# The project at constraints.txt's versions, then libtpu at the version that jax release pins.
.venv-tpu/bin/pip install -c constraints.txt -e .
.venv-tpu/bin/pip install -c constraints.txt "jax[tpu]"
.venv-tpu/bin/python - <<'PY'
import importlib.metadata as md
print("jax", md.version("jax"), "jaxlib", md.version("jaxlib"), "libtpu", md.version("libtpu"))
PY
