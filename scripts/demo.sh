#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/delia model prepare "$@"
