#!/usr/bin/env bash
# The test command: lint, then the whole suite. Integration tests use the servers named by PIXELPIPE_* variables,
# else testcontainers where Docker answers, else a local stack they start on free ports (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ruff check .
ruff format --check .
python -m pytest "$@"
