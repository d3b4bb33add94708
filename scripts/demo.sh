#!/usr/bin/env bash
# The main job: install what is missing, then run the pipeline end to end on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
pixelpipe demo "$@"
