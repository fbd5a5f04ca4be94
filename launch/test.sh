#!/usr/bin/env bash
# Sets up the environment with the test dependencies and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
exec .venv/bin/python -m pytest -q tests "$@"
