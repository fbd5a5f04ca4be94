#!/usr/bin/env bash
# The device check (benchmarks/device_check.py) in an environment that already holds its own JAX,
# e.g. a GPU image with jax and its CUDA plugin, or a TPU VM's: installs this project WITHOUT
# touching that JAX, then runs the check (arguments go to it).
#
#   bash launch/device_check.sh                   # one GPU or TPU: at most 480 s, JSON + summary
#   bash launch/device_check.sh --budget_s 900    # more time: all 3 official-loop steps
#   bash launch/device_check.sh --tiny            # tiny shapes, any machine (a CPU: under a minute)
#
# - The project: `pip install --no-deps --no-build-isolation -e .`. Nothing is fetched and no
#   installed package changes; the check reports which declared requirement (setup.cfg's ranges)
#   this environment does not meet.
# - Missing pure-Python dependencies travel as wheels in $WHEELS (default .whl/), made where an
#   index is reachable, e.g. for an image whose Python is 3.12:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         -c constraints.txt -d .whl gguf ml-collections
#   Each wheel whose distribution is not installed already is installed (--no-index --no-deps);
#   the others are left alone. `import finercut_jax` needs gguf, flax, optax, orbax-checkpoint,
#   einops, safetensors and transformers; the check needs torch too.
# - PYTHON picks the interpreter (default python3: on the H200 image, the one holding torch, jax
#   and its CUDA plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  # The wheels whose distribution this environment lacks (a wheel's file name starts with its
  # normalized name and version).
  missing=$("$PYTHON" - "$WHEELS" <<'PY'
import glob, importlib.metadata as md, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
  name = os.path.basename(path).split("-")[0]
  try:
    md.version(name)
  except md.PackageNotFoundError:
    print(path)
PY
)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086  # one path a line, no spaces in wheel names
    "$PYTHON" -m pip install -q --no-index --no-deps $missing
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.device_check "$@"
